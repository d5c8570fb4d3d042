//! Zeroth-order estimation (`METHODS.md` §4.1, MeZO-SGD): the gradient is estimated from two
//! forward passes, `g = (L(θ + εz) − L(θ − εz)) / 2ε` along a random direction `z ~ N(0, I)`,
//! and the update is `θ ← θ − lr·g·z`. `z` is never stored: it is regenerated from its seed,
//! tensor by tensor, each time it is needed (perturb, perturb back, update).
//!
//! The perturbation is applied in place, but the parameters are put back from the values they
//! had, not by subtracting `εz` again: `(θ + εz) − εz` need not round back to `θ`, and a step at
//! learning rate 0 must leave every weight bit-identical. (This is the building block; the
//! trainer's `optimizer = "mezo"` and the streamed full-weight form come with issue 11.)

use crate::error::Result;
use crate::rng::SplitMix64;
use candle_core::{Tensor, Var};

/// The direction `z` for parameter tensor `index` of draw `seed`: standard normal values,
/// the same every time they are asked for.
pub fn direction(seed: u64, index: usize, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::derive(seed, &[0x2e50, index as u64]);
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        // Box–Muller: two uniforms give two independent normals.
        let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(len);
    out
}

/// `θ ← θ + scale·z` for every parameter, `z` from `seed`.
pub fn perturb(params: &[Var], seed: u64, scale: f32) -> Result<()> {
    for (i, p) in params.iter().enumerate() {
        let mut v: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
        let z = direction(seed, i, v.len());
        v.iter_mut().zip(&z).for_each(|(w, z)| *w += scale * z);
        p.set(&Tensor::from_vec(v, p.shape(), p.device())?)?;
    }
    Ok(())
}

/// One two-point estimate along `z` of draw `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spsa {
    pub loss_plus: f64,
    pub loss_minus: f64,
    /// `(L+ − L−) / 2ε`, the directional derivative's estimate.
    pub projected_grad: f64,
}

/// Evaluates `loss` at `θ + εz` and `θ − εz` and puts the parameters back exactly.
pub fn spsa(params: &[Var], seed: u64, eps: f64, mut loss: impl FnMut() -> Result<f64>) -> Result<Spsa> {
    let saved: Vec<Tensor> = params.iter().map(|p| p.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
    let restore = |params: &[Var]| -> Result<()> {
        for (p, s) in params.iter().zip(&saved) {
            p.set(s)?;
        }
        Ok(())
    };
    let result = (|| {
        perturb(params, seed, eps as f32)?;
        let loss_plus = loss()?;
        restore(params)?;
        perturb(params, seed, -eps as f32)?;
        let loss_minus = loss()?;
        Ok(Spsa { loss_plus, loss_minus, projected_grad: (loss_plus - loss_minus) / (2.0 * eps) })
    })();
    // Put back whatever happened in between (a failed forward must not leave θ perturbed).
    restore(params)?;
    result
}

/// MeZO-SGD's update `θ ← θ − lr·(g·z + wd·θ)` with `z` of draw `seed`.
pub fn update(params: &[Var], seed: u64, projected_grad: f64, lr: f64, weight_decay: f64) -> Result<()> {
    if lr == 0.0 {
        return Ok(());
    }
    for (i, p) in params.iter().enumerate() {
        let mut v: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
        let z = direction(seed, i, v.len());
        let (step, decay) = ((lr * projected_grad) as f32, (lr * weight_decay) as f32);
        v.iter_mut().zip(&z).for_each(|(w, z)| *w -= step * z + decay * *w);
        p.set(&Tensor::from_vec(v, p.shape(), p.device())?)?;
    }
    Ok(())
}
