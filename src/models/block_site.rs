//! Block-level *sites*: places beside a whole sub-block where a method can add a branch that no
//! single linear site can express (AdaptFormer's parallel MLP adapter), or read what a block
//! receives and returns (TuCo). Named like PEFT names modules: `model.layers.3.mlp`.

use super::linear::ForwardCtx;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// What a method does at an MLP block site.
pub trait BlockHook: Send + Sync {
    /// The MLP branch's new output. `x` is the residual stream entering the MLP sub-block
    /// (before its norm), `[b, t, hidden]`; `mlp_out` is the frozen MLP's output for it. The
    /// block then adds the returned tensor to `x`. Returning `mlp_out` unchanged is a no-op.
    fn forward(&self, x: &Tensor, mlp_out: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;
}

/// A block site as methods see it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSiteInfo {
    /// `model.layers.<i>.mlp`.
    pub name: String,
    /// Width of the residual stream the hook reads and writes.
    pub hidden_size: usize,
}

/// A block site with its hook slot.
pub struct BlockSite {
    pub info: BlockSiteInfo,
    pub hook: Option<Arc<dyn BlockHook>>,
}

impl BlockSite {
    pub fn new(name: String, hidden_size: usize) -> Self {
        Self { info: BlockSiteInfo { name, hidden_size }, hook: None }
    }

    /// The MLP branch as the hook (if any) changes it.
    pub fn apply(&self, x: &Tensor, mlp_out: Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.hook {
            // A reference pass runs the model with every method switched off.
            Some(h) if !ctx.reference => h.forward(x, &mlp_out, ctx),
            _ => Ok(mlp_out),
        }
    }
}
