//! A linear *site*: one named projection of the base model (PEFT's module name, e.g.
//! `model.layers.3.self_attn.q_proj`) with its frozen weight and, optionally, the hook a
//! fine-tuning method attached to it. Methods only ever see sites, never model internals.

use crate::kernels::decoder_block::{LoraFactors, Projection};
use crate::kernels::{self, FrozenWeight};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// Per-forward facts a method may need: whether we are training (dropout on), a seed that
/// changes every micro-batch, from which each site derives its own random stream, in a
/// recording pass (data-driven inits) which of the pass's sequences this forward computes, and
/// whether this is a *reference* pass: the model with the method switched off, which
/// objectives comparing with the starting model (ASFT, DPO) run instead of a second copy.
/// A forward over packed rows also carries each token's position inside its own example.
#[derive(Debug, Clone)]
pub struct ForwardCtx {
    pub train: bool,
    pub seed: u64,
    pub sequence: usize,
    pub reference: bool,
    /// Per token of the `[b, t]` input, its position inside its packed example, where rows
    /// hold several (`sample_packing`); RoPE and attention restart at each example.
    pub positions: Option<Arc<[u32]>>,
}

impl ForwardCtx {
    pub fn eval() -> Self {
        Self { train: false, seed: 0, sequence: 0, reference: false, positions: None }
    }

    /// This forward over `batch`: its packed positions, if its rows hold several examples.
    pub fn over(self, batch: &crate::data::Batch) -> Self {
        Self { positions: batch.positions.clone(), ..self }
    }

    /// The reference model: every method switched off, no gradient, no dropout.
    pub fn reference() -> Self {
        Self { reference: true, ..Self::eval() }
    }

    /// A training forward (dropout on) with the micro-batch's seed.
    pub fn train(seed: u64) -> Self {
        Self { train: true, seed, ..Self::eval() }
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

    /// The output with the method switched off, for reference passes: the base site. A method
    /// that changed the base weight itself (PiSSA/CorDA's residual) gives back what the site
    /// computed before it was attached.
    fn reference_forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>) -> Result<Tensor> {
        add_bias(kernels::frozen_linear(x, w0)?, b0)
    }

    /// The method's change of the weight, `W = W0 + ΔW`, as `[out, in]` (carrying the graph
    /// to the method's parameters when `train`), for methods whose output is exactly
    /// `x·(W0 + ΔW)ᵀ + b`; `None` for the others (and where dropout gives the branch no weight
    /// form). Quantisation-aware training (RoSTE) quantises `W0 + ΔW`.
    fn delta_weight(&self, _train: bool) -> Option<Result<Tensor>> {
        None
    }

    /// The site as exactly a LoRA branch on the base, `x·W0ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`, in
    /// this forward: the factors, scaling and dropout the fused decoder block
    /// ([`kernels::decoder_block`]) then runs it with. `None` (the default) keeps the site on
    /// its own [`SiteHook::forward`].
    fn lora_factors(&self, _ctx: &ForwardCtx) -> Option<LoraFactors> {
        None
    }
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

    /// The site for the fused decoder block in this forward: the plain base, or a base with
    /// a LoRA branch; `None` for any other method's hook (and in reference passes).
    pub fn fused_projection(&self, ctx: &ForwardCtx) -> Option<Projection> {
        let lora = match &self.hook {
            _ if ctx.reference => return None,
            None => None,
            Some(h) => Some(h.lora_factors(ctx)?),
        };
        Some(Projection { weight: self.weight.clone(), bias: self.bias.clone(), lora })
    }

    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.hook {
            Some(h) if ctx.reference => h.reference_forward(x, &self.weight, self.bias.as_ref()),
            Some(h) => h.forward(x, &self.weight, self.bias.as_ref(), ctx),
            None => add_bias(kernels::frozen_linear(x, &self.weight)?, self.bias.as_ref()),
        }
    }
}
