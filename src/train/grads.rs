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
use crate::error::Result;
use crate::models::{ForwardCtx, Llama};
use crate::rng::SplitMix64;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::sync::Arc;

/// Forward and backward over one optimizer step's micro-batches; returns the step loss (mean
/// NLL over all `n_targets` target tokens of the step) and the summed gradients, one buffer
/// per parameter.
pub fn step_gradients(
    model: &Llama,
    params: &[Var],
    batches: &[Batch],
    n_targets: usize,
    seed: u64,
    step: usize,
    checkpointing: bool,
) -> Result<(f64, Vec<Vec<f32>>)> {
    let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.elem_count()]).collect();
    let mut loss = 0f64;
    if n_targets == 0 {
        return Ok((0.0, grads));
    }
    let scale = 1.0 / n_targets as f64;
    for (mi, b) in batches.iter().enumerate() {
        if b.n_targets == 0 {
            continue;
        }
        let ctx = ForwardCtx { train: true, seed: SplitMix64::derive(seed, &[0xd20, step as u64, mi as u64]).next_u64(), sequence: 0 };
        let targets = Arc::new(b.targets.clone());
        loss += if checkpointing {
            checkpointed_backward(model, params, b, targets, scale, &ctx, &mut grads)?
        } else {
            let part = model.nll(&b.input_ids, targets, b.batch_size, b.seq_len, &ctx)?.sum_all()?.affine(scale, 0.0)?;
            accumulate(&part.backward()?, params, &mut grads)?;
            part.to_scalar::<f32>()? as f64
        };
    }
    Ok((loss, grads))
}

fn checkpointed_backward(
    model: &Llama,
    params: &[Var],
    b: &Batch,
    targets: Arc<Vec<i32>>,
    scale: f64,
    ctx: &ForwardCtx,
    grads: &mut [Vec<f32>],
) -> Result<f64> {
    // Forward, keeping only each block's input; every block's graph is dropped at once.
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut x = model.embed_ids(&b.input_ids, b.batch_size, b.seq_len)?;
    for li in 0..model.layers.len() {
        let y = model.block_forward(li, &x, 0, None, ctx)?.detach();
        inputs.push(x);
        x = y;
    }
    // The head: loss and the gradient reaching the last block's output.
    let x_last = Var::from_tensor(&x)?;
    let part = model.head_nll(x_last.as_tensor(), targets, ctx)?.sum_all()?.affine(scale, 0.0)?;
    let store = part.backward()?;
    accumulate(&store, params, grads)?;
    let mut g = grad_of(&store, x_last.as_tensor())?;
    // Blocks in reverse, one graph at a time.
    for li in (0..model.layers.len()).rev() {
        let x_in = Var::from_tensor(&inputs[li])?;
        let y = model.block_forward(li, x_in.as_tensor(), 0, None, ctx)?;
        let store = (y * &g)?.sum_all()?.backward()?;
        accumulate(&store, params, grads)?;
        g = grad_of(&store, x_in.as_tensor())?;
    }
    Ok(part.to_scalar::<f32>()? as f64)
}

fn grad_of(store: &GradStore, t: &Tensor) -> Result<Tensor> {
    Ok(match store.get(t) {
        Some(g) => g.detach(),
        None => t.zeros_like()?,
    })
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
