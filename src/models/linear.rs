//! A linear *site*: one named projection of the base model (PEFT's module name, e.g.
//! `model.layers.3.self_attn.q_proj`) with its frozen weight and, optionally, the hook a
//! fine-tuning method attached to it. Methods only ever see sites, never model internals.

use crate::kernels::{self, FrozenWeight};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// Per-forward facts a method may need: whether we are training (dropout on), a seed that
/// changes every micro-batch, from which each site derives its own random stream, and, in a
/// recording pass (data-driven inits), which of the pass's sequences this forward computes.
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx {
    pub train: bool,
    pub seed: u64,
    pub sequence: usize,
}

impl ForwardCtx {
    pub fn eval() -> Self {
        Self { train: false, seed: 0, sequence: 0 }
    }

    /// Inference on sequence `sequence` of a recording pass.
    pub fn recording(sequence: usize) -> Self {
        Self { sequence, ..Self::eval() }
    }
}

/// What a method does at a linear site. The hook computes the site's whole output, base
/// included, so that a method can fuse its branch with the base matmul, or act on the biased
/// output (SSF scales and shifts `x·W0ᵀ + b`).
pub trait SiteHook: Send + Sync {
    /// The site's output for the frozen base weight `w0: [out, in]` and bias `b0: [out]`.
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> Result<Tensor>;
}

/// `y + b` where there is a bias.
pub fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A site as methods see it: its name and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteInfo {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

impl SiteInfo {
    /// The last path component (`q_proj`), which `target_modules` lists usually name.
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
}

pub struct Linear {
    pub name: String,
    /// `[out, in]`, torch Linear layout; frozen, f32 or in GGUF blocks.
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub hook: Option<Arc<dyn SiteHook>>,
}

impl Linear {
    pub fn new(name: String, weight: FrozenWeight, bias: Option<Tensor>) -> Self {
        Self { name, weight, bias, hook: None }
    }

    pub fn info(&self) -> SiteInfo {
        let (out_features, in_features) = self.weight.dims();
        SiteInfo { name: self.name.clone(), in_features, out_features }
    }

    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.hook {
            Some(h) => h.forward(x, &self.weight, self.bias.as_ref(), ctx),
            None => add_bias(kernels::frozen_linear(x, &self.weight)?, self.bias.as_ref()),
        }
    }
}
