//! AdamW with decoupled weight decay, bias-corrected, eps outside the square root: the
//! arithmetic of `torch.optim.AdamW` (single-tensor path) step for step, in f32, so that a run
//! started from the same adapter follows PEFT's trajectory.

use crate::error::Result;
use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far (torch's `state["step"]`).
    pub step: u64,
    /// First and second moments, one buffer per parameter.
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[Var]) -> Self {
        let zeros = |p: &Var| vec![0f32; p.elem_count()];
        Self { config, step: 0, exp_avg: params.iter().map(zeros).collect(), exp_avg_sq: params.iter().map(zeros).collect() }
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.step += 1;
        let k = self.config.coefficients(self.step, lr);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let mut w: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
            let (m, v) = (&mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            for j in 0..w.len() {
                k.update(&mut w[j], g[j], &mut m[j], &mut v[j]);
            }
            p.set(&Tensor::from_vec(w, p.shape(), p.device())?)?;
        }
        Ok(())
    }
}

/// The per-step constants of an AdamW update (step `t`, rate `lr`), in f32 as torch computes
/// the element update.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepCoefficients {
    step_size: f32,
    bc2_sqrt: f32,
    decay: Option<f32>,
    w1: f32,
    b2: f32,
    w2: f32,
    eps: f32,
}

impl AdamWConfig {
    pub(crate) fn coefficients(&self, t: u64, lr: f64) -> StepCoefficients {
        let t = t as i32;
        StepCoefficients {
            step_size: (lr / (1.0 - self.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            decay: (self.weight_decay != 0.0).then_some((1.0 - lr * self.weight_decay) as f32),
            w1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
        }
    }
}

impl StepCoefficients {
    /// One weight's update from its gradient `g` and moments `m`, `v`.
    #[inline(always)]
    pub(crate) fn update(&self, w: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if let Some(d) = self.decay {
            *w *= d;
        }
        *m += self.w1 * (g - *m); // torch: exp_avg.lerp_(grad, 1 − β1)
        *v = *v * self.b2 + self.w2 * (g * g);
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *w += -self.step_size * (*m / denom);
    }
}

impl super::Optimizer for AdamW {
    fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        AdamW::step(self, params, grads, lr)
    }

    fn state(&self, params: &[(String, Var)]) -> Result<super::OptimizerState> {
        let mut tensors = Vec::with_capacity(2 * params.len());
        for (i, (key, var)) in params.iter().enumerate() {
            tensors.push((format!("{key}.exp_avg"), Tensor::from_slice(&self.exp_avg[i], var.shape(), var.device())?));
            tensors.push((format!("{key}.exp_avg_sq"), Tensor::from_slice(&self.exp_avg_sq[i], var.shape(), var.device())?));
        }
        Ok(super::OptimizerState { tensors, step: self.step })
    }

    fn restore(&mut self, params: &[(String, Var)], state: &super::LoadedState, src: &std::path::Path) -> Result<()> {
        for (i, (key, _)) in params.iter().enumerate() {
            for (suffix, buf) in [("exp_avg", &mut self.exp_avg[i]), ("exp_avg_sq", &mut self.exp_avg_sq[i])] {
                *buf = state.take_exact(&format!("{key}.{suffix}"), buf.len(), src)?;
            }
        }
        self.step = state.step;
        Ok(())
    }
}
