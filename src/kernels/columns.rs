//! Per-output-column scale and shift, `y[.., o] · g[o] (+ b[o])`: DoRA's magnitude and SSF's
//! γ and β.
//!
//! Composed from candle's `broadcast_mul`/`broadcast_add`, the gradient of the `[out]` vector
//! is a sum over every leading dimension, which candle's reduction walks element by element
//! through a strided index: on SmolLM2 that alone made a DoRA step 1.4× LoRA's. Here the
//! column sums are one pass over rows, split across threads, each with its own partial sum.

use super::{f32_slice, threads, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per work item of the row-parallel loops.
const ROWS: usize = 64;

/// `Σ_rows f(row)` into a vector of `cols`, rows split across the pool.
fn column_sums(rows: usize, cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per_thread = rows.div_ceil(threads()).max(ROWS);
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(per_thread))
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0f32; cols];
            for row in t * per_thread..((t + 1) * per_thread).min(rows) {
                f(row, &mut acc);
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; cols];
    for p in partials {
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    sum
}

/// Checks that `v` is a vector as long as `y`'s last dimension.
fn fit(op: &str, y: &Layout, v: &Layout) -> Result<()> {
    let cols = y.shape().dims().last().copied().unwrap_or(1);
    if v.shape().dims() != [cols] {
        bail!("{op}: a vector of {cols} was expected for {:?}, got {:?}", y.shape(), v.shape());
    }
    Ok(())
}

/// `out = y·g (+ b)` row by row.
fn scale_shift(y: &[f32], g: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let cols = g.len();
    let mut out = vec![0f32; y.len()];
    out.par_chunks_mut(cols * ROWS).zip(y.par_chunks(cols * ROWS)).for_each(|(o, y)| {
        for (o, y) in o.chunks_mut(cols).zip(y.chunks(cols)) {
            match b {
                Some(b) => o.iter_mut().zip(y).zip(g.iter().zip(b)).for_each(|((o, y), (g, b))| *o = y * g + b),
                None => o.iter_mut().zip(y).zip(g).for_each(|((o, y), g)| *o = y * g),
            }
        }
    });
    out
}

/// The backward of `y·g (+ b)`: `dy·g`, `Σ_rows dy·y` and (wanted or not) `Σ_rows dy`.
fn scale_shift_bwd(y: &[f32], g: &[f32], dy: &[f32], shift: bool) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let cols = g.len();
    let rows = y.len() / cols.max(1);
    let mut dy_out = vec![0f32; y.len()];
    dy_out.par_chunks_mut(cols * ROWS).zip(dy.par_chunks(cols * ROWS)).for_each(|(o, d)| {
        for (o, d) in o.chunks_mut(cols).zip(d.chunks(cols)) {
            o.iter_mut().zip(d).zip(g).for_each(|((o, d), g)| *o = d * g);
        }
    });
    let dg = column_sums(rows, cols, |row, acc| {
        let (y, dy) = (&y[row * cols..(row + 1) * cols], &dy[row * cols..(row + 1) * cols]);
        acc.iter_mut().zip(y).zip(dy).for_each(|((a, y), d)| *a += y * d);
    });
    let db = shift.then(|| column_sums(rows, cols, |row, acc| acc.iter_mut().zip(&dy[row * cols..(row + 1) * cols]).for_each(|(a, d)| *a += d)));
    (dy_out, dg, db)
}

struct ScaleColumns;

impl CustomOp2 for ScaleColumns {
    fn name(&self) -> &'static str {
        "scale-columns"
    }

    fn cpu_fwd(&self, sy: &CpuStorage, ly: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_slice(sy, ly, self.name())?, f32_slice(sg, lg, self.name())?);
        fit(self.name(), ly, lg)?;
        Ok((CpuStorage::F32(scale_shift(y, g, None)), ly.shape().clone()))
    }

    fn bwd(&self, y_t: &Tensor, g_t: &Tensor, _res: &Tensor, dy_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dy_out, dg, _) = with_f32(y_t, self.name(), |y| with_f32(g_t, self.name(), |g| with_f32(dy_t, self.name(), |dy| Ok(scale_shift_bwd(y, g, dy, false)))))?;
        Ok((Some(Tensor::from_vec(dy_out, y_t.shape(), y_t.device())?), Some(Tensor::from_vec(dg, g_t.shape(), g_t.device())?)))
    }
}

/// One op rather than a scale then an add, so that the graph does not also keep the scaled
/// intermediate (the add's input) for a backward that never reads it.
struct ScaleShiftColumns;

impl CustomOp3 for ScaleShiftColumns {
    fn name(&self) -> &'static str {
        "scale-shift-columns"
    }

    fn cpu_fwd(&self, sy: &CpuStorage, ly: &Layout, sg: &CpuStorage, lg: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g, b) = (f32_slice(sy, ly, self.name())?, f32_slice(sg, lg, self.name())?, f32_slice(sb, lb, self.name())?);
        fit(self.name(), ly, lg)?;
        fit(self.name(), ly, lb)?;
        Ok((CpuStorage::F32(scale_shift(y, g, Some(b))), ly.shape().clone()))
    }

    fn bwd(&self, y_t: &Tensor, g_t: &Tensor, b_t: &Tensor, _res: &Tensor, dy_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dy_out, dg, db) = with_f32(y_t, self.name(), |y| with_f32(g_t, self.name(), |g| with_f32(dy_t, self.name(), |dy| Ok(scale_shift_bwd(y, g, dy, true)))))?;
        let db = db.expect("the shift's gradient was asked for");
        Ok((
            Some(Tensor::from_vec(dy_out, y_t.shape(), y_t.device())?),
            Some(Tensor::from_vec(dg, g_t.shape(), g_t.device())?),
            Some(Tensor::from_vec(db, b_t.shape(), b_t.device())?),
        ))
    }
}

/// `y[.., o] · g[o]` for `y: [.., out]`, `g: [out]`; gradients flow to both.
pub fn scale_columns(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&g.contiguous()?, ScaleColumns)
}

/// `y[.., o] · g[o] + b[o]` for `y: [.., out]`, `g, b: [out]`; gradients flow to all three.
pub fn scale_shift_columns(y: &Tensor, g: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op3(&g.contiguous()?, &b.contiguous()?, ScaleShiftColumns)
}
