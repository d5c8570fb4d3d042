//! Gradients of one optimizer step: forward and backward over its micro-batches, either with
//! the whole autograd graph alive at once, or with per-block activation checkpointing.
//!
//! Checkpointing (`gradient_checkpointing = true`) keeps only the residual stream entering
//! each block during the forward and rebuilds one block's graph at a time in the backward:
//! the gradient reaching block `i`'s output, `g`, is pushed through it by back-propagating
//! the surrogate `sum(block_i(x_i) ⊙ g)`, whose gradient w.r.t. `x_i` and the block's
//! adapter parameters is exactly the chain rule's. One extra forward per block buys memory
//! that no longer grows with the number of layers.

use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::kernels::grad_sink;
use crate::models::{ForwardCtx, Llama};
use crate::objectives::{reference_hidden, HeadInputs, LossSum, Objective, StepInfo};
use crate::rng::SplitMix64;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the forward of micro-batch `mi` of a step starts from, the same for a gradient step
/// and a zeroth-order one: its seed (dropout, Masked Thought's draws), the reference model's
/// hidden states where the objective compares with them, and the input embeddings.
pub(super) struct MicroBatch {
    pub seed: u64,
    pub reference: Option<Tensor>,
    pub x0: Tensor,
}

impl MicroBatch {
    pub(super) fn prepare(model: &Llama, b: &Batch, mi: usize, plan: &StepPlan, objective: &dyn Objective) -> Result<Self> {
        let seed = SplitMix64::derive(plan.seed, &[0xd20, plan.step as u64, mi as u64]).next_u64();
        let at = StepInfo { step: plan.step, total_steps: plan.total_steps, seed };
        let reference = if objective.needs_reference(b) { Some(reference_hidden(model, b)?) } else { None };
        let x0 = match objective.input_embeddings(model, b, &at)? {
            Some(x) => x,
            None => model.embed_ids(&b.input_ids, b.batch_size, b.seq_len)?,
        };
        Ok(Self { seed, reference, x0 })
    }
}

/// One optimizer step's loss (the objective's, as a mean over all target tokens of the step),
/// its gradients (summed over micro-batches, one buffer per parameter) and the step means of
/// the objective's own quantities.
pub struct StepGradients {
    pub loss: f64,
    pub grads: Vec<Vec<f32>>,
    pub metrics: BTreeMap<String, f64>,
}

/// What is fixed for all micro-batches of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    /// The run's seed (each micro-batch derives its own).
    pub seed: u64,
    /// Optimizer steps done before this one, and the run's total.
    pub step: usize,
    pub total_steps: usize,
    pub checkpointing: bool,
}

/// Forward and backward over one optimizer step's micro-batches under `objective`; `units` is
/// what the step's loss is averaged over (the sum of `objective.units` over its batches).
pub fn step_gradients(model: &Llama, params: &[Var], batches: &[Batch], units: usize, plan: &StepPlan, objective: &dyn Objective) -> Result<StepGradients> {
    let mut out = StepGradients { loss: 0.0, grads: params.iter().map(|p| vec![0f32; p.elem_count()]).collect(), metrics: BTreeMap::new() };
    if units == 0 {
        return Ok(out);
    }
    let scale = 1.0 / units as f64;
    for (mi, b) in batches.iter().enumerate() {
        if objective.units(b) == 0 {
            continue;
        }
        let MicroBatch { seed, reference, x0 } = MicroBatch::prepare(model, b, mi, plan, objective)?;
        let ctx = ForwardCtx::train(seed).over(b);
        let inputs = HeadInputs { batch: b, targets: Arc::new(b.targets.clone()), reference: reference.as_ref(), ctx: &ctx };
        // Fused blocks deliver their LoRA gradients to the sink rather than the graph's store.
        let (part, delivered) = grad_sink::collecting(|| -> Result<LossSum> {
            if plan.checkpointing {
                return checkpointed_backward(model, params, x0, &inputs, objective, scale, &mut out.grads);
            }
            let x = model.residual_from(x0, &ctx)?;
            let part = objective.loss_sum(model, &x, &inputs)?;
            let loss = part.loss.affine(scale, 0.0)?;
            accumulate(&loss.backward()?, params, &mut out.grads)?;
            Ok(LossSum { loss, metrics: part.metrics })
        });
        let part = part?;
        add_delivered(delivered, params, &mut out.grads)?;
        out.loss += part.loss.to_scalar::<f32>()? as f64;
        for (name, v) in part.metrics {
            *out.metrics.entry(name.to_string()).or_default() += v * scale;
        }
    }
    Ok(out)
}

/// The loss of one optimizer step's micro-batches under `objective`, forward only: no dropout,
/// no graph (the parameters enter detached). What a zeroth-order step evaluates twice.
pub fn step_loss(model: &Llama, batches: &[Batch], units: usize, plan: &StepPlan, objective: &dyn Objective) -> Result<f64> {
    if units == 0 {
        return Ok(0.0);
    }
    let mut loss = 0.0;
    for (mi, b) in batches.iter().enumerate() {
        if objective.units(b) == 0 {
            continue;
        }
        let ctx = ForwardCtx::eval().over(b);
        let MicroBatch { reference, x0, .. } = MicroBatch::prepare(model, b, mi, plan, objective)?;
        let inputs = HeadInputs { batch: b, targets: Arc::new(b.targets.clone()), reference: reference.as_ref(), ctx: &ctx };
        let x = model.residual_from(x0, &ctx)?;
        loss += objective.loss_sum(model, &x, &inputs)?.loss.to_scalar::<f32>()? as f64;
    }
    Ok(loss / units as f64)
}

/// The step's loss and gradients for one micro-batch with per-block checkpointing; returns the
/// (scaled) loss and the objective's metric sums.
fn checkpointed_backward(model: &Llama, params: &[Var], x0: Tensor, inputs: &HeadInputs, objective: &dyn Objective, scale: f64, grads: &mut [Vec<f32>]) -> Result<LossSum> {
    let ctx = inputs.ctx;
    // Forward, keeping only each block's input; every block's graph is dropped at once.
    let mut block_inputs = Vec::with_capacity(model.layers.len());
    let mut x = x0;
    for li in 0..model.layers.len() {
        let y = model.block_forward(li, &x, 0, None, ctx)?.detach();
        block_inputs.push(x);
        x = y;
    }
    // The head: loss and the gradient reaching the last block's output.
    let x_last = Var::from_tensor(&x)?;
    let part = objective.loss_sum(model, x_last.as_tensor(), inputs)?;
    let loss = part.loss.affine(scale, 0.0)?;
    let store = loss.backward()?;
    accumulate(&store, params, grads)?;
    let mut g = grad_of(&store, x_last.as_tensor())?;
    // Blocks in reverse, one graph at a time.
    for li in (0..model.layers.len()).rev() {
        let x_in = Var::from_tensor(&block_inputs[li])?;
        let y = model.block_forward(li, x_in.as_tensor(), 0, None, ctx)?;
        let store = (y * &g)?.sum_all()?.backward()?;
        accumulate(&store, params, grads)?;
        g = grad_of(&store, x_in.as_tensor())?;
    }
    Ok(LossSum { loss, metrics: part.metrics })
}

fn grad_of(store: &GradStore, t: &Tensor) -> Result<Tensor> {
    Ok(match store.get(t) {
        Some(g) => g.detach(),
        None => t.zeros_like()?,
    })
}

/// Adds the gradients fused ops delivered to the step's; every one must be a parameter's.
fn add_delivered(delivered: grad_sink::Delivered, params: &[Var], grads: &mut [Vec<f32>]) -> Result<()> {
    for (id, g) in delivered {
        let Some(i) = params.iter().position(|p| p.as_tensor().id() == id) else {
            return Err(Error::Training("a fused block delivered the gradient of a tensor that is not a trained parameter".into()));
        };
        if g.len() != grads[i].len() {
            return Err(Error::Training(format!("a fused block delivered {} gradient values for a parameter of {}", g.len(), grads[i].len())));
        }
        grads[i].iter_mut().zip(g).for_each(|(a, x)| *a += x);
    }
    Ok(())
}

fn accumulate(store: &GradStore, params: &[Var], grads: &mut [Vec<f32>]) -> Result<()> {
    for (p, acc) in params.iter().zip(grads.iter_mut()) {
        if let Some(g) = store.get(p.as_tensor()) {
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            acc.iter_mut().zip(g).for_each(|(a, x)| *a += x);
        }
    }
    Ok(())
}
