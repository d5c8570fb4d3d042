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

use super::vexp::{exp_sub, lane_max, lane_sum};
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

fn active_rows(targets: &[i32]) -> Vec<usize> {
    (0..targets.len()).filter(|&i| targets[i] != IGNORE_INDEX).collect()
}

/// Logits of the given rows of `h: [n, d]` under the head `w`: `[rows.len(), vocab]`.
fn chunk_logits(w: &FrozenWeight, h: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut hc = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        hc.extend_from_slice(&h[r * d..(r + 1) * d]);
    }
    let mut logits = super::output_vec(rows.len() * w.dims().0);
    w.matmul_t(&hc, rows.len(), &mut logits, false);
    logits
}

/// `∂/∂h` of the given rows from `∂/∂logits` rows (`[rows.len(), vocab]`), scattered into `dh`.
fn scatter_row_grads(w: &FrozenWeight, dlogits: &[f32], rows: &[usize], d: usize, dh: &mut [f32]) {
    let mut dhc = super::output_vec(rows.len() * d);
    w.matmul(dlogits, rows.len(), &mut dhc, false);
    for (i, &r) in rows.iter().enumerate() {
        dh[r * d..(r + 1) * d].copy_from_slice(&dhc[i * d..(i + 1) * d]);
    }
}

fn check_targets(targets: &[i32], vocab: usize, op: &str) -> Result<()> {
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
        bail!("{op}: target id {bad} outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// Replaces a logit row by `exp(logit − max)` and returns its log-sum-exp and the sum of the
/// exponentials. The sum runs over the whole vocabulary (tens of thousands of terms), where a
/// plain f32 running sum drifts by ~1e-4 relative; [`lane_sum`] keeps it at rounding level.
fn exp_in_place(row: &mut [f32]) -> (f32, f64) {
    let m = lane_max(row);
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
        check_targets(&self.targets, vocab, self.name())?;
        let mut nll = vec![0f32; n];
        let mut row_grads = if self.want_grad { Some(vec![0f32; n * d]) } else { None };
        for rows in active_rows(&self.targets).chunks(CHUNK_ROWS) {
            let mut logits = chunk_logits(&self.w, h, rows, d);
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
                scatter_row_grads(&self.w, &logits, rows, d, dh);
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

/// The NLL op with, per row, the full-vocabulary KL divergence `KL(p_ref ‖ p_θ)` from a
/// reference model's distribution (ASFT's anchor), computed chunk by chunk like the NLL: the
/// reference's logits come from its final hidden states through the same (frozen) head.
struct LmHeadNllKl {
    w: FrozenWeight,
    targets: Arc<Vec<i32>>,
    /// The reference model's final hidden states `[n, d]`.
    reference: Tensor,
    want_grad: bool,
    /// `∂nll_i/∂h_i` and `∂kl_i/∂h_i` for every row.
    row_grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

thread_local! {
    /// One vocabulary-long row per thread (fresh pages cost more than the arithmetic here).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CustomOp1 for LmHeadNllKl {
    fn name(&self) -> &'static str {
        "lm-head-nll-kl"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(s1, l1, self.name())?;
        let (n, d) = l1.shape().dims2()?;
        let (vocab, dw) = self.w.dims();
        if d != dw || n != self.targets.len() || self.reference.dims() != [n, d] {
            bail!("{}: hidden {:?}, reference {:?}, head [{vocab}, {dw}], {} targets", self.name(), l1.dims(), self.reference.dims(), self.targets.len());
        }
        check_targets(&self.targets, vocab, self.name())?;
        let reference = self.reference.contiguous()?;
        let mut out = vec![0f32; n * 2];
        let mut grads = self.want_grad.then(|| (vec![0f32; n * d], vec![0f32; n * d]));
        with_f32(&reference, self.name(), |href| {
            for rows in active_rows(&self.targets).chunks(CHUNK_ROWS) {
                let mut theta = chunk_logits(&self.w, h, rows, d);
                let mut refl = chunk_logits(&self.w, href, rows, d);
                let vals: Vec<(f32, f32)> = theta
                    .par_chunks_mut(vocab)
                    .zip(refl.par_chunks_mut(vocab))
                    .zip(rows.par_iter())
                    .map(|((l, r), &row)| {
                        let target = self.targets[row] as usize;
                        let target_logit = l[target];
                        // KL = Σ q·(r − l) + lse(l) − lse(r), q = softmax(r): the differences are
                        // taken before both rows are exponentiated in place.
                        let weighted = SCRATCH.with(|s| {
                            let mut diff = s.borrow_mut();
                            diff.clear();
                            diff.extend(r.iter().zip(l.iter()).map(|(a, b)| a - b));
                            let (lse_r, sum_r) = exp_in_place(r);
                            let dot: f64 = r.iter().zip(diff.iter()).map(|(&e, &x)| e as f64 * x as f64).sum();
                            (dot / sum_r, lse_r, sum_r)
                        });
                        let (dot, lse_r, sum_r) = weighted;
                        let (lse, sum) = exp_in_place(l);
                        let kl = (dot + lse as f64 - lse_r as f64).max(0.0) as f32;
                        if self.want_grad {
                            // Rows become ∂nll/∂logits = p − onehot and ∂kl/∂logits = p − q.
                            let (inv, inv_r) = ((1.0 / sum) as f32, (1.0 / sum_r) as f32);
                            l.iter_mut().zip(r.iter_mut()).for_each(|(p, q)| {
                                *p *= inv;
                                *q = *p - *q * inv_r;
                            });
                            l[target] -= 1.0;
                        }
                        (lse - target_logit, kl)
                    })
                    .collect();
                for (&row, (nll, kl)) in rows.iter().zip(vals) {
                    out[row * 2] = nll;
                    out[row * 2 + 1] = kl;
                }
                if let Some((gn, gk)) = grads.as_mut() {
                    scatter_row_grads(&self.w, &theta, rows, d, gn);
                    scatter_row_grads(&self.w, &refl, rows, d, gk);
                }
            }
            Ok(())
        })?;
        *self.row_grads.lock().unwrap() = grads;
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    fn bwd(&self, h_t: &Tensor, _res: &Tensor, g_t: &Tensor) -> Result<Option<Tensor>> {
        let d = h_t.dim(1)?;
        let Some((mut gn, gk)) = self.row_grads.lock().unwrap().take() else {
            bail!("{}: a gradient was asked of a forward run without `want_grad`", self.name());
        };
        with_f32(g_t, self.name(), |g| {
            gn.par_chunks_mut(d).zip(gk.par_chunks(d)).zip(g.par_chunks(2)).for_each(|((row, krow), gi)| {
                row.iter_mut().zip(krow).for_each(|(v, &k)| *v = gi[0] * *v + gi[1] * k);
            });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(gn, h_t.shape(), h_t.device())?))
    }
}

/// Per-token NLL and full-vocabulary `KL(p_ref ‖ p_θ)` as `[n, 2]` (zeros where the target is
/// ignored), for hidden states `h: [n, d]` and a reference model's `reference: [n, d]` under the
/// same head `W: [vocab, d]`. Gradients flow to `h` only, and only when `want_grad`.
pub fn lm_head_nll_kl(h: &Tensor, reference: &Tensor, w: &FrozenWeight, targets: Arc<Vec<i32>>, want_grad: bool) -> Result<Tensor> {
    let op = LmHeadNllKl { w: w.clone(), targets, reference: reference.detach(), want_grad, row_grads: Mutex::new(None) };
    h.contiguous()?.apply_op1(op)
}

/// The most likely next token of every row of `h: [n, d]` under the head `W: [vocab, d]` (IFT's
/// greedy predictions), chunk by chunk: the full logits never exist at once.
pub fn lm_head_argmax(h: &Tensor, w: &FrozenWeight) -> Result<Vec<u32>> {
    let (n, d) = h.dims2()?;
    let vocab = w.dims().0;
    with_f32(&h.contiguous()?, "lm-head-argmax", |hv| {
        let mut out = Vec::with_capacity(n);
        let rows: Vec<usize> = (0..n).collect();
        for chunk in rows.chunks(CHUNK_ROWS) {
            let logits = chunk_logits(w, hv, chunk, d);
            out.extend(logits.par_chunks(vocab).map(|l| l.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32).collect::<Vec<_>>());
        }
        Ok(out)
    })
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
