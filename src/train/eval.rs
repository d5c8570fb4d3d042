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
    let mut sum = 0f64;
    let mut tokens = 0usize;
    for chunk in examples.chunks(batch_size.max(1)) {
        // A long evaluation must not hold up a Ctrl-C'd training run (no-op unless `train`
        // installed its signal handler).
        if let Some(signal) = super::interrupt::requested() {
            return Err(Error::Interrupted { signal, detail: "evaluation interrupted".into() });
        }
        let refs: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id);
        if batch.n_targets == 0 {
            continue;
        }
        let nll = model.nll(&batch.input_ids, Arc::new(batch.targets.clone()), batch.batch_size, batch.seq_len, &ForwardCtx::eval())?;
        let v: Vec<f32> = nll.to_vec1()?;
        sum += v.iter().map(|&x| x as f64).sum::<f64>();
        tokens += batch.n_targets;
    }
    let loss = if tokens == 0 { f64::NAN } else { sum / tokens as f64 };
    Ok(EvalResult { loss, tokens, perplexity: loss.exp() })
}
