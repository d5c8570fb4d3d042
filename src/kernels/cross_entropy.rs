//! Next-token cross-entropy fused with the LM head, computed in chunks of rows so the full
//! `tokens × vocab` logits never exist at once (for a 49k vocabulary and 1k tokens that matrix
//! alone would be 200 MB, twice over with its gradient).
//!
//! The op returns the per-token NLL (0 where the target is ignored); the caller sums and
//! normalises it, which keeps "mean over all target tokens of the optimizer step" a caller's
//! decision. When the caller will want the gradient, the forward also forms each row's
//! `∂nll_i/∂h_i = (softmax − onehot)·W` while the chunk's logits are at hand and keeps only
//! that (`tokens × hidden`, a few MB): the backward then just scales rows, instead of
//! recomputing the logits GEMM.

use super::vexp::{exp_sub, lane_sum};
use super::frozen_weight::FrozenWeight;
use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Label value meaning "no loss at this position" (transformers' convention).
pub const IGNORE_INDEX: i32 = -100;

/// Rows of hidden states per chunk: 128 rows × 49k vocab × 4 B ≈ 25 MB of logits.
const CHUNK_ROWS: usize = 128;

struct LmHeadNll {
    /// LM head `[vocab, d]`.
    w: FrozenWeight,
    targets: Arc<Vec<i32>>,
    /// Form the per-row gradients during the forward.
    want_grad: bool,
    /// `∂nll_i/∂h_i` for every row (zero rows where the target is ignored).
    row_grads: Mutex<Option<Vec<f32>>>,
}

impl LmHeadNll {
    fn active_rows(&self) -> Vec<usize> {
        (0..self.targets.len()).filter(|&i| self.targets[i] != IGNORE_INDEX).collect()
    }

    /// Logits of the given rows: `[rows.len(), vocab]`.
    fn chunk_logits(&self, h: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
        let mut hc = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            hc.extend_from_slice(&h[r * d..(r + 1) * d]);
        }
        let mut logits = vec![0f32; rows.len() * self.w.dims().0];
        self.w.matmul_t(&hc, rows.len(), &mut logits, false);
        logits
    }
}

/// Replaces a logit row by `exp(logit − max)` and returns its log-sum-exp and the sum of the
/// exponentials. The sum runs over the whole vocabulary (tens of thousands of terms), where a
/// plain f32 running sum drifts by ~1e-4 relative; [`lane_sum`] keeps it at rounding level.
fn exp_in_place(row: &mut [f32]) -> (f32, f64) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    exp_sub(row, m);
    let sum = lane_sum(row);
    (m + sum.ln() as f32, sum)
}

impl CustomOp1 for LmHeadNll {
    fn name(&self) -> &'static str {
        "lm-head-nll"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(s1, l1, self.name())?;
        let (n, d) = l1.shape().dims2()?;
        let (vocab, dw) = self.w.dims();
        if d != dw || n != self.targets.len() {
            bail!("lm-head-nll: hidden {:?}, head [{vocab}, {dw}], {} targets", l1.dims(), self.targets.len());
        }
        if let Some(bad) = self.targets.iter().find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
            bail!("lm-head-nll: target id {bad} outside the vocabulary of {vocab}");
        }
        let mut nll = vec![0f32; n];
        let mut row_grads = if self.want_grad { Some(vec![0f32; n * d]) } else { None };
        for rows in self.active_rows().chunks(CHUNK_ROWS) {
            let mut logits = self.chunk_logits(h, rows, d);
            let vals: Vec<f32> = logits
                .par_chunks_mut(vocab)
                .zip(rows.par_iter())
                .map(|(l, &r)| {
                    let target = self.targets[r] as usize;
                    let target_logit = l[target];
                    let (lse, sum) = exp_in_place(l);
                    if self.want_grad {
                        // The row becomes ∂nll/∂logits = softmax − onehot(target).
                        let inv = (1.0 / sum) as f32;
                        l.iter_mut().for_each(|v| *v *= inv);
                        l[target] -= 1.0;
                    }
                    lse - target_logit
                })
                .collect();
            for (&r, v) in rows.iter().zip(vals) {
                nll[r] = v;
            }
            if let Some(dh) = row_grads.as_mut() {
                let mut dhc = vec![0f32; rows.len() * d];
                self.w.matmul(&logits, rows.len(), &mut dhc, false);
                for (i, &r) in rows.iter().enumerate() {
                    dh[r * d..(r + 1) * d].copy_from_slice(&dhc[i * d..(i + 1) * d]);
                }
            }
        }
        *self.row_grads.lock().unwrap() = row_grads;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, h_t: &Tensor, _res: &Tensor, g_t: &Tensor) -> Result<Option<Tensor>> {
        let d = h_t.dim(1)?;
        let Some(mut dh) = self.row_grads.lock().unwrap().take() else {
            bail!("lm-head-nll: a gradient was asked of a forward run without `want_grad`");
        };
        with_f32(g_t, self.name(), |g| {
            dh.par_chunks_mut(d).zip(g.par_iter()).for_each(|(row, &gi)| row.iter_mut().for_each(|v| *v *= gi));
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dh, h_t.shape(), h_t.device())?))
    }
}

/// Per-token negative log-likelihood of `targets` under `softmax(h · Wᵀ)`, for hidden states
/// `h: [n, d]` and LM head `W: [vocab, d]`; `[n]`, zero where the target is [`IGNORE_INDEX`].
/// Gradients flow to `h` only (the head is frozen), and only when `want_grad` (which costs a
/// second GEMM in the forward; evaluation passes `false`).
pub fn lm_head_nll(h: &Tensor, w: &FrozenWeight, targets: Arc<Vec<i32>>, want_grad: bool) -> Result<Tensor> {
    let op = LmHeadNll { w: w.clone(), targets, want_grad, row_grads: Mutex::new(None) };
    h.contiguous()?.apply_op1(op)
}

/// Full logits `[n, vocab]` for inference (generation, logit checks); no gradient.
pub fn lm_head_logits(h: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    let vocab = w.dims().0;
    let logits = with_f32(h, "lm-head-logits", |h| {
        let mut out = vec![0f32; n * vocab];
        w.matmul_t(h, n, &mut out, false);
        Ok(out)
    })?;
    Tensor::from_vec(logits, (n, vocab), h.device())
}
