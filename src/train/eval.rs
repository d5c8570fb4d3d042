//! Token-weighted evaluation loss over a set of encoded examples.

use crate::data::batch::make_batch;
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::models::{ForwardCtx, Llama};
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct EvalResult {
    /// Mean NLL over every target token.
    pub loss: f64,
    pub tokens: usize,
    pub perplexity: f64,
}

/// Mean NLL over all target tokens of `examples` (each token counts once, whatever its
/// example's length), in batches of `batch_size`.
pub fn evaluate(model: &Llama, examples: &[EncodedExample], batch_size: usize, pad_id: u32) -> Result<EvalResult> {
    evaluate_with(model, examples, batch_size, pad_id, &mut |_, _| {})
}

/// [`evaluate`], calling `on_batch(examples done, tokens done)` after every batch.
pub fn evaluate_with(model: &Llama, examples: &[EncodedExample], batch_size: usize, pad_id: u32, on_batch: &mut dyn FnMut(usize, usize)) -> Result<EvalResult> {
    let per = nll_per_example_with(model, examples, batch_size, pad_id, on_batch)?;
    let sum: f64 = per.iter().map(|e| e.nll_sum).sum();
    let tokens: usize = per.iter().map(|e| e.tokens).sum();
    let loss = if tokens == 0 { f64::NAN } else { sum / tokens as f64 };
    Ok(EvalResult { loss, tokens, perplexity: loss.exp() })
}

/// One example's summed NLL over its target tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExampleNll {
    pub nll_sum: f64,
    pub tokens: usize,
}

/// Each example's NLL sum and target count, in order, computed in batches of `batch_size`.
pub fn nll_per_example(model: &Llama, examples: &[EncodedExample], batch_size: usize, pad_id: u32) -> Result<Vec<ExampleNll>> {
    nll_per_example_with(model, examples, batch_size, pad_id, &mut |_, _| {})
}

/// [`nll_per_example`], calling `on_batch(examples done, tokens done)` after every batch.
pub fn nll_per_example_with(model: &Llama, examples: &[EncodedExample], batch_size: usize, pad_id: u32, on_batch: &mut dyn FnMut(usize, usize)) -> Result<Vec<ExampleNll>> {
    let mut out = Vec::with_capacity(examples.len());
    let mut tokens_done = 0;
    for chunk in examples.chunks(batch_size.max(1)) {
        // A long evaluation must not hold up a Ctrl-C'd training run (no-op unless `train`
        // installed its signal handler).
        if let Some(signal) = super::interrupt::requested() {
            return Err(Error::Interrupted { signal, detail: "evaluation interrupted".into() });
        }
        let refs: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id);
        if batch.pairs > 0 {
            return Err(Error::Model("the NLL of preference pairs is scored by their objective (DPO), not per example".into()));
        }
        tokens_done += chunk.iter().map(|e| e.input_ids.len()).sum::<usize>();
        if batch.n_targets == 0 {
            out.extend(chunk.iter().map(|_| ExampleNll { nll_sum: 0.0, tokens: 0 }));
            on_batch(out.len(), tokens_done);
            continue;
        }
        let nll = model.nll(&batch.input_ids, Arc::new(batch.targets.clone()), batch.batch_size, batch.seq_len, &ForwardCtx::eval().over(&batch))?;
        let v: Vec<f32> = nll.to_vec1()?;
        // Row i's positions are v[i·t .. (i+1)·t]; ignored targets contribute 0.
        let t = batch.seq_len;
        for i in 0..chunk.len() {
            let row = i * t..(i + 1) * t;
            out.push(ExampleNll {
                nll_sum: v[row.clone()].iter().map(|&x| x as f64).sum(),
                tokens: batch.targets[row].iter().filter(|&&x| x != -100).count(),
            });
        }
        on_batch(out.len(), tokens_done);
    }
    Ok(out)
}

/// An `on_batch` callback for the functions above that shows the evaluation's progress (examples
/// done, tokens/s, time left) through [`crate::console::Ticker`].
pub fn show_progress(label: impl Into<String>, total: usize) -> impl FnMut(usize, usize) {
    let mut ticker = crate::console::Ticker::new(label, total, "examples");
    move |done, tokens| ticker.tick(done, Some((tokens as f64, "tokens")))
}
