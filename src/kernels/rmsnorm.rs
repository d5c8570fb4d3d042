//! RMSNorm as Llama defines it: `y = w ⊙ (x · rsqrt(mean(x²) + eps))`, computed in f32 in that
//! order (normalise first, then scale), as transformers does.

use super::{f32_slice, with_f32};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct RmsNorm {
    eps: f32,
}

fn rstd(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// `w ⊙ (x · rstd(x))` for every row of `x` (`w.len()` wide).
pub(super) fn forward_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = super::output_vec(x.len());
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
        let r = rstd(xr, eps);
        for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = wv * (xv * r);
        }
    });
    y
}

/// `dx = base + ∂L/∂x` (or without `base`) for the rows of `x` given their output gradients
/// `dy` (the weight held constant): `r · (g − x̂ · mean(g ⊙ x̂))`, with `g = dy ⊙ w` and
/// `x̂ = x · r`. `base` is the residual path's gradient where the norm sits on a branch.
pub(super) fn backward_rows(x: &[f32], w: &[f32], dy: &[f32], eps: f32, dx: &mut [f32], base: Option<&[f32]>) {
    let d = w.len();
    dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).enumerate().for_each(|(row, (dxr, (xr, dyr)))| {
        let base = base.map(|b| &b[row * d..(row + 1) * d]);
        let r = rstd(xr, eps);
        let mut dot = 0f32;
        for i in 0..d {
            dot += dyr[i] * w[i] * xr[i] * r;
        }
        let mean = dot / d as f32;
        for i in 0..d {
            let g = r * (dyr[i] * w[i] - xr[i] * r * mean);
            dxr[i] = base.map_or(g, |b| b[i] + g);
        }
    });
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        Ok((CpuStorage::F32(forward_rows(x, w, self.eps)), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let want_dw = w.track_op();
        let (dx, dw) = with_f32(x, self.name(), |x| {
            with_f32(w, self.name(), |w| {
                with_f32(dy, self.name(), |dy| {
                    let mut dx = super::output_vec(x.len());
                    backward_rows(x, w, dy, self.eps, &mut dx, None);
                    let dw = want_dw.then(|| {
                        let mut dw = vec![0f32; d];
                        for (xr, dyr) in x.chunks(d).zip(dy.chunks(d)) {
                            let r = rstd(xr, self.eps);
                            for i in 0..d {
                                dw[i] += dyr[i] * xr[i] * r;
                            }
                        }
                        dw
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device())).transpose()?;
        Ok((Some(dx), dw))
    }
}

/// RMSNorm over the last dimension of `x` with weight `w` (`[d]`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}
