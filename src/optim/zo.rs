//! Zeroth-order estimation (`METHODS.md` §4.1, MeZO-SGD): the gradient is estimated from two
//! forward passes, `g = (L(θ + εz) − L(θ − εz)) / 2ε` along a random direction `z ~ N(0, I)`,
//! and the update is `θ ← θ − lr·g·z`. `z` is never stored: it is regenerated from its seed,
//! tensor by tensor, each time it is needed (perturb, perturb back, update).
//!
//! The perturbation is applied in place, but the parameters are put back from the values they
//! had, not by subtracting `εz` again: `(θ + εz) − εz` need not round back to `θ`, and a step at
//! learning rate 0 must leave every weight bit-identical. The trainer's `optimizer = "mezo"`
//! runs [`Mezo::step`] on parameters in memory; with `zo_offload`, `train::zo_offload` runs the
//! same arithmetic ([`shifted`], [`descend`], the same directions) block by block over weights
//! kept in a file.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use candle_core::{Tensor, Var};
use std::path::Path;

/// Values of `z` drawn from one random stream; chunks are independent streams so that a large
/// tensor's direction is generated on every core, and a prefix never depends on the length.
const DIRECTION_CHUNK: usize = 8192;

/// The direction `z` for parameter tensor `index` of draw `seed`: standard normal values,
/// the same every time they are asked for.
pub fn direction(seed: u64, index: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    direction_into(seed, index, &mut out);
    out
}

/// [`direction`] written into `out` (its length is the tensor's).
pub fn direction_into(seed: u64, index: usize, out: &mut [f32]) {
    use rand_distr::Distribution;
    use rayon::prelude::*;
    out.par_chunks_mut(DIRECTION_CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut rng = Stream(SplitMix64::derive(seed, &[0x2e50, index as u64, c as u64]));
        chunk.iter_mut().for_each(|x| *x = rand_distr::StandardNormal.sample(&mut rng));
    });
}

/// SplitMix64 as the bits a `rand_distr` sampler draws from (its ziggurat is several times
/// faster than Box–Muller's logarithm and sine).
struct Stream(SplitMix64);

impl rand::RngCore for Stream {
    fn next_u32(&mut self) -> u32 {
        (self.0.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            chunk.copy_from_slice(&self.0.next_u64().to_le_bytes()[..chunk.len()]);
        }
    }
}

/// `θ + scale·z`, elementwise: the perturbed weights, computed as the in-place form computes them.
pub fn shifted(theta: &[f32], z: &[f32], scale: f32, out: &mut [f32]) {
    use rayon::prelude::*;
    out.par_chunks_mut(DIRECTION_CHUNK)
        .zip(theta.par_chunks(DIRECTION_CHUNK))
        .zip(z.par_chunks(DIRECTION_CHUNK))
        .for_each(|((o, t), z)| {
            o.iter_mut()
                .zip(t)
                .zip(z)
                .for_each(|((o, &w), &z)| *o = w + scale * z);
        });
}

/// MeZO-SGD's update of one tensor's values, `θ ← θ − (step·z + decay·θ)`, where `step` is
/// `lr·g` and `decay` is `lr·wd`.
pub fn descend(theta: &mut [f32], z: &[f32], step: f32, decay: f32) {
    use rayon::prelude::*;
    theta
        .par_chunks_mut(DIRECTION_CHUNK)
        .zip(z.par_chunks(DIRECTION_CHUNK))
        .for_each(|(t, z)| {
            t.iter_mut()
                .zip(z)
                .for_each(|(w, &z)| *w -= step * z + decay * *w);
        });
}

/// `θ ← θ + scale·z` for every parameter, `z` from `seed`.
pub fn perturb(params: &[Var], seed: u64, scale: f32) -> Result<()> {
    for (i, p) in params.iter().enumerate() {
        let v: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
        let z = direction(seed, i, v.len());
        let mut out = vec![0f32; v.len()];
        shifted(&v, &z, scale, &mut out);
        p.set(&Tensor::from_vec(out, p.shape(), p.device())?)?;
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
    let (step, decay) = ((lr * projected_grad) as f32, (lr * weight_decay) as f32);
    for (i, p) in params.iter().enumerate() {
        let mut v: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
        let z = direction(seed, i, v.len());
        descend(&mut v, &z, step, decay);
        p.set(&Tensor::from_vec(v, p.shape(), p.device())?)?;
    }
    Ok(())
}

/// MeZO-SGD as the trainer runs it: `n_spsa` directions per step, each from the run's seed and
/// the step (so a resumed run draws the same ones), their estimates taken at the same `θ` and
/// the updates applied after.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mezo {
    pub seed: u64,
    pub eps: f64,
    pub n_spsa: usize,
}

impl Mezo {
    /// The seed of direction `k` of optimizer step `step` (0-based).
    pub fn direction_seed(&self, step: usize, k: usize) -> u64 {
        SplitMix64::derive(self.seed, &[0x2e0, step as u64, k as u64]).next_u64()
    }

    /// One step: returns the mean loss at the perturbed points (the step's loss estimate) and
    /// the mean projected gradient.
    pub fn step(&self, params: &[Var], step: usize, lr: f64, weight_decay: f64, mut loss: impl FnMut() -> Result<f64>) -> Result<(f64, f64)> {
        let n = self.n_spsa.max(1);
        let mut estimates = Vec::with_capacity(n);
        for k in 0..n {
            let seed = self.direction_seed(step, k);
            estimates.push((seed, spsa(params, seed, self.eps, &mut loss)?));
        }
        for (k, (seed, e)) in estimates.iter().enumerate() {
            // θ ← θ − lr·(1/n)·Σ g_k z_k, weight decay once.
            update(params, *seed, e.projected_grad / n as f64, lr, if k == 0 { weight_decay } else { 0.0 })?;
        }
        let mean = |f: fn(&Spsa) -> f64| estimates.iter().map(|(_, e)| f(e)).sum::<f64>() / n as f64;
        Ok((mean(|e| (e.loss_plus + e.loss_minus) / 2.0), mean(|e| e.projected_grad)))
    }
}

/// The optimizer state of a MeZO run: the step count only (no moments).
#[derive(Debug, Clone, Copy, Default)]
pub struct MezoState {
    pub step: u64,
}

impl super::Optimizer for MezoState {
    fn step(&mut self, _params: &[Var], _grads: &[Vec<f32>], _lr: f64) -> Result<()> {
        Err(Error::Training("MeZO takes no gradients: the trainer steps it through optim::zo::Mezo".into()))
    }

    fn state(&self, _params: &[(String, Var)]) -> Result<super::OptimizerState> {
        Ok(super::OptimizerState { tensors: Vec::new(), step: self.step })
    }

    fn restore(&mut self, _params: &[(String, Var)], state: &super::LoadedState, _src: &Path) -> Result<()> {
        self.step = state.step;
        Ok(())
    }
}
