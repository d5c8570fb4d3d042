//! Optimisation: AdamW (dense, and masked for sparse fine-tuning), learning-rate schedules, gradient clipping, and the [`Optimizer`]
//! contract a method may fill with its own update rule (LoRA-Pro's adjusted AdamW).

pub mod adamw;
pub mod clip;
pub mod masked_adamw;
pub mod schedule;
pub mod zo;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::clip_grad_norm;
pub use masked_adamw::MaskedAdamW;
pub use schedule::{LrSchedule, Scheduler};

use crate::error::{Error, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// An update rule over a method's trainable parameters (in the method's `params()` order).
pub trait Optimizer: Send {
    /// One update of every parameter with its (clipped, transformed) gradient at rate `lr`.
    fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()>;
    /// Everything needed to continue bit for bit, as named tensors (names derived from the
    /// parameters' names) and the step count.
    fn state(&self, params: &[(String, Var)]) -> Result<OptimizerState>;
    /// Restores what [`Optimizer::state`] wrote; `src` names the file for errors.
    fn restore(&mut self, params: &[(String, Var)], state: &LoadedState, src: &Path) -> Result<()>;
}

pub struct OptimizerState {
    pub tensors: Vec<(String, Tensor)>,
    pub step: u64,
}

/// Optimizer state read back from a checkpoint.
pub struct LoadedState {
    pub tensors: HashMap<String, Tensor>,
    pub step: u64,
}

impl LoadedState {
    /// Tensor `key` as f32 values, which must number `len`.
    pub fn take_exact(&self, key: &str, len: usize, src: &Path) -> Result<Vec<f32>> {
        let t = self.tensors.get(key).ok_or_else(|| Error::format(src, format!("tensor `{key}` is missing")))?;
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if v.len() != len {
            return Err(Error::format(src, format!("tensor `{key}` has {} values, expected {len}", v.len())));
        }
        Ok(v)
    }
}
