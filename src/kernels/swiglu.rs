//! SwiGLU gate: `silu(g) ⊙ u`, the Llama MLP's element-wise middle, fused with its backward.

use super::vexp::sigmoid;
use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct SwiGlu;

const CHUNK: usize = 4096;


/// `silu(g) ⊙ u`.
pub(super) fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = super::output_vec(g.len());
    y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
        let mut s = [0f32; CHUNK];
        let s = &mut s[..y.len()];
        sigmoid(g, s);
        for i in 0..y.len() {
            y[i] = g[i] * s[i] * u[i];
        }
    });
    y
}

/// `(silu(g) ⊙ u, sigmoid(g))`: the output and the gate's sigmoid, which a caller keeping it
/// for the backward ([`backward_given`]) saves that pass its exponentials.
pub(super) fn forward_keeping_sigmoid(g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut s = super::output_vec(g.len());
    s.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(s, g)| sigmoid(g, s));
    (product(g, u, &s), s)
}

/// `g ⊙ s ⊙ u`: the output again from the kept sigmoid `s`.
pub(super) fn product(g: &[f32], u: &[f32], s: &[f32]) -> Vec<f32> {
    let mut y = super::output_vec(g.len());
    y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, y)| {
        let o = c * CHUNK;
        for (i, y) in y.iter_mut().enumerate() {
            *y = g[o + i] * s[o + i] * u[o + i];
        }
    });
    y
}

/// The gradients `(dg, du)` reaching the gate and up inputs from the output's `dy`.
pub(super) fn backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    backward_inner(g, u, None, dy)
}

/// [`backward`] with the gate's sigmoid `s` as the forward kept it.
pub(super) fn backward_given(g: &[f32], u: &[f32], s: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    backward_inner(g, u, Some(s), dy)
}

fn backward_inner(g: &[f32], u: &[f32], kept: Option<&[f32]>, dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = super::output_vec(g.len());
    let mut du = super::output_vec(g.len());
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
        let o = c * CHUNK;
        let mut buf = [0f32; CHUNK];
        let sig: &[f32] = match kept {
            Some(s) => &s[o..o + dg.len()],
            None => {
                sigmoid(&g[o..o + dg.len()], &mut buf[..dg.len()]);
                &buf[..dg.len()]
            }
        };
        for i in 0..dg.len() {
            let (gv, uv, d) = (g[o + i], u[o + i], dy[o + i]);
            let s = sig[i];
            du[i] = d * gv * s;
            // d silu(g)/dg = s · (1 + g · (1 − s))
            dg[i] = d * uv * s * (1.0 + gv * (1.0 - s));
        }
    });
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, self.name())?;
        let u = f32_slice(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            bail!("swiglu: gate {:?} and up {:?} differ", l1.shape(), l2.shape());
        }
        Ok((CpuStorage::F32(forward(g, u)), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(g, self.name(), |g| {
            with_f32(u, self.name(), |u| {
                with_f32(dy, self.name(), |dy| {
                    let (dg, du) = backward(g, u, dy);
                    Ok((dg, du))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// `silu(gate) ⊙ up`, both of the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}
