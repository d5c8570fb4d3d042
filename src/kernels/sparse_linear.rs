//! A frozen linear layer whose weight has a sparse trainable change: `y = x · (W0 + Δ)ᵀ`, where
//! `Δ` is nonzero on a fixed set of entries and, of those, the *trained* ones are
//! `Δ_j = θ_j − θ0_j` for the op's input `θ` (the entries' current values). The other entries
//! of `Δ` are frozen (trained earlier, then left out of the mask).
//!
//! Sparse fine-tuning (LIFT, SaRA, LT-SFT, …) trains a few percent of a matrix's entries.
//! Gathered products over so few entries run far below a GEMM's speed, so the forward and the
//! input gradient stay GEMMs: `Δ` is added to each tile of `W0` as the tile is dequantized
//! (the patched products of [`FrozenWeight`]), and the sum is never held whole. Only the
//! weight gradient is sparse: `∂L/∂θ_j = Σ_t g[t, r_j] · x[t, c_j]`, one dot product per
//! trained entry over the tokens, on transposed copies of `g` and `x` so each dot reads two
//! contiguous rows. Neither a dense `gᵀx` nor a dense `Δ` is ever formed, so what training
//! keeps grows with the trained entries.

use super::frozen_weight::{FrozenWeight, RowPatch};
use super::skinny::dot;
use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Tokens per pass of the weight-gradient dots: the transposed `x` rows of one pass stay in
/// L2 while every trained entry reads them.
const TOKEN_CHUNK: usize = 128;

/// The entries of a sparse change of an `[out, in]` weight, row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseChange {
    pub out: usize,
    pub inp: usize,
    /// CSR row pointers (`out + 1`) and columns of the changed entries, in flat-index order.
    pub row_ptr: Vec<u32>,
    pub cols: Vec<u32>,
    /// `Δ` of every entry; the trained entries' values here are ignored (they come from `θ`).
    pub frozen: Vec<f32>,
    /// Positions (into the entries) of the trained ones, increasing, and their rows.
    pub trained: Vec<u32>,
    pub trained_rows: Vec<u32>,
    /// `θ0` of the trained entries.
    pub base: Vec<f32>,
}

impl SparseChange {
    /// From flat indices (strictly increasing) with their `Δ`, and the positions among them of
    /// the trained entries with their `θ0`.
    pub fn new(out: usize, inp: usize, flat: &[u32], frozen: Vec<f32>, trained: Vec<u32>, base: Vec<f32>) -> Self {
        assert!(flat.len() == frozen.len() && trained.len() == base.len(), "sparse change: lengths");
        assert!(flat.windows(2).all(|w| w[0] < w[1]) && flat.last().is_none_or(|&l| (l as usize) < out * inp), "sparse change: indices");
        assert!(trained.windows(2).all(|w| w[0] < w[1]) && trained.last().is_none_or(|&l| (l as usize) < flat.len()), "sparse change: trained positions");
        let mut row_ptr = vec![0u32; out + 1];
        for &f in flat {
            row_ptr[f as usize / inp + 1] += 1;
        }
        for r in 0..out {
            row_ptr[r + 1] += row_ptr[r];
        }
        let cols = flat.iter().map(|&f| f % inp as u32).collect();
        let trained_rows = trained.iter().map(|&p| flat[p as usize] / inp as u32).collect();
        Self { out, inp, row_ptr, cols, frozen, trained, trained_rows, base }
    }

    /// `Δ` of every entry for the trained entries' values `theta`.
    pub fn values(&self, theta: &[f32]) -> Vec<f32> {
        let mut v = self.frozen.clone();
        for ((&p, &t), &b) in self.trained.iter().zip(theta).zip(&self.base) {
            v[p as usize] = t - b;
        }
        v
    }

    fn patch<'a>(&'a self, values: &'a [f32]) -> RowPatch<'a> {
        RowPatch { row_ptr: &self.row_ptr, cols: &self.cols, values }
    }

    /// `∂L/∂θ` from the output gradient `g: [m, out]` and the input `x: [m, in]`.
    fn theta_grad(&self, g: &[f32], x: &[f32], m: usize) -> Vec<f32> {
        let k = self.trained.len();
        let mut grad = vec![0f32; k];
        if k == 0 || m == 0 {
            return grad;
        }
        let g_t = transpose(g, m, self.out);
        let x_t = transpose(x, m, self.inp);
        let col_of = |j: usize| self.cols[self.trained[j] as usize] as usize;
        let per_task = k.div_ceil(4 * super::threads()).max(256);
        grad.par_chunks_mut(per_task).enumerate().for_each(|(ci, acc)| {
            let first = ci * per_task;
            for t0 in (0..m).step_by(TOKEN_CHUNK) {
                let t1 = (t0 + TOKEN_CHUNK).min(m);
                for (i, a) in acc.iter_mut().enumerate() {
                    let (r, c) = (self.trained_rows[first + i] as usize, col_of(first + i));
                    *a += dot(&g_t[r * m + t0..r * m + t1], &x_t[c * m + t0..c * m + t1]);
                }
            }
        });
        grad
    }
}

/// `a: [rows, cols]` → `[cols, rows]`, in blocks so both sides stream.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut t = vec![0f32; a.len()];
    t.par_chunks_mut(B * rows).enumerate().for_each(|(cb, dst)| {
        let c0 = cb * B;
        let cn = dst.len() / rows.max(1);
        for r0 in (0..rows).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in 0..cn {
                    dst[c * rows + r] = a[r * cols + c0 + c];
                }
            }
        }
    });
    t
}

struct SparseLinear {
    w: FrozenWeight,
    change: Arc<SparseChange>,
}

impl CustomOp2 for SparseLinear {
    fn name(&self) -> &'static str {
        "sparse-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, st: &CpuStorage, lt: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, theta) = (f32_slice(sx, lx, self.name())?, f32_slice(st, lt, self.name())?);
        let (out_f, in_f) = self.w.dims();
        let dims = lx.shape().dims();
        if dims.last() != Some(&in_f) {
            bail!("sparse-linear: input {dims:?} does not end in {in_f}");
        }
        if theta.len() != self.change.trained.len() {
            bail!("sparse-linear: {} values for {} trained entries", theta.len(), self.change.trained.len());
        }
        let rows = x.len() / in_f;
        let values = self.change.values(theta);
        let mut y = vec![0f32; rows * out_f];
        self.w.matmul_t_patched(x, rows, &mut y, false, Some(&self.change.patch(&values)));
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out_f;
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, x_t: &Tensor, theta_t: &Tensor, _res: &Tensor, dy_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let in_f = self.w.dims().1;
        let rows = x_t.elem_count() / in_f;
        let (dx, dtheta) = with_f32(x_t, self.name(), |x| {
            with_f32(theta_t, self.name(), |theta| {
                with_f32(dy_t, self.name(), |dy| {
                    let values = self.change.values(theta);
                    let mut dx = vec![0f32; rows * in_f];
                    self.w.matmul_patched(dy, rows, &mut dx, false, Some(&self.change.patch(&values)));
                    Ok((dx, self.change.theta_grad(dy, x, rows)))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x_t.shape(), x_t.device())?), Some(Tensor::from_vec(dtheta, theta_t.shape(), theta_t.device())?)))
    }
}

/// `x · (W0 + Δ)ᵀ` for `x: [.., in]`, a frozen `W0: [out, in]` and the sparse change `Δ`
/// whose trained entries hold `theta − θ0` (`theta: [trained entries]`). Gradients flow to `x`
/// and `theta`.
pub fn sparse_linear(x: &Tensor, w: &FrozenWeight, change: &Arc<SparseChange>, theta: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&theta.contiguous()?, SparseLinear { w: w.clone(), change: change.clone() })
}
