//! Fake quantisation with the straight-through estimator (RoSTE's quantisation-aware training,
//! `METHODS.md` §5.8): every row of the last dimension (a weight's output channel, an
//! activation's token) is rounded to a symmetric signed `bits`-bit grid and mapped back,
//! `q(v) = s·clamp(round(v/s), −2^{b−1}, 2^{b−1} − 1)` with `s = c·max|row| / (2^{b−1} − 1)`,
//! `c ≤ 1` the clipping ratio. The backward passes the gradient straight through where `v`
//! lies inside the grid's range `[−2^{b−1}·s, (2^{b−1} − 1)·s]` and stops it where `v` was
//! clipped; the scale is treated as a constant.

use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A symmetric per-row integer grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantGrid {
    pub bits: u32,
    /// The fraction of each row's largest magnitude the grid's top reaches (1 = no clipping).
    pub clip_ratio: f32,
}

impl QuantGrid {
    fn levels(&self) -> (f32, f32) {
        let half = (1u64 << (self.bits - 1)) as f32;
        (-half, half - 1.0)
    }

    /// The row's step `s` (0 for an all-zero row).
    pub fn scale(&self, row: &[f32]) -> f32 {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        max * self.clip_ratio / self.levels().1
    }

    /// The integer code of `v` at step `s`.
    pub fn code(&self, v: f32, s: f32) -> f32 {
        let (lo, hi) = self.levels();
        if s == 0.0 {
            0.0
        } else {
            (v / s).round_ties_even().clamp(lo, hi)
        }
    }

    /// Whether `v` lies inside the grid's range at step `s` (the gradient passes).
    fn passes(&self, v: f32, s: f32) -> bool {
        let (lo, hi) = self.levels();
        v >= lo * s && v <= hi * s
    }
}

struct FakeQuant(QuantGrid);

impl FakeQuant {
    fn row_len(l: &Layout) -> Result<usize> {
        match l.dims().last() {
            Some(&n) if n > 0 => Ok(n),
            _ => bail!("fake-quant: expected a tensor with a non-empty last dimension, got {:?}", l.dims()),
        }
    }
}

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let n = Self::row_len(l)?;
        let g = self.0;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(yr, xr)| {
            let s = g.scale(xr);
            yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = s * g.code(v, s));
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let n = *x.dims().last().unwrap_or(&1);
        let g = self.0;
        let dx = with_f32(x, self.name(), |xv| {
            with_f32(dy, self.name(), |dyv| {
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(n).zip(xv.par_chunks(n).zip(dyv.par_chunks(n))).for_each(|(d, (xr, gr))| {
                    let s = g.scale(xr);
                    for ((o, &v), &gv) in d.iter_mut().zip(xr).zip(gr) {
                        *o = if g.passes(v, s) { gv } else { 0.0 };
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fake-quantises every row of `x`'s last dimension on `grid`, with the straight-through
/// gradient.
pub fn fake_quant(x: &Tensor, grid: QuantGrid) -> Result<Tensor> {
    if !((2..=16).contains(&grid.bits) && grid.clip_ratio > 0.0 && grid.clip_ratio <= 1.0) {
        bail!("fake-quant: bits {} must be 2..=16 and the clipping ratio {} in (0, 1]", grid.bits, grid.clip_ratio);
    }
    x.contiguous()?.apply_op1(FakeQuant(grid))
}
