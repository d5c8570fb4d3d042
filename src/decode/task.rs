//! Task metrics by generation: each example's prompt (its tokens before the first target, as
//! training sees it) is continued greedily, and the continuation is scored against the
//! example's reference completion by a [`Reward`] (GSM8K's `####` answer, exact match,
//! containment, a pattern). Prompts are decoded in batches with the batched generator.

use super::{generate_batch, SamplingOptions, Stops};
use crate::data::{EncodedExample, TextTokenizer};
use crate::error::Result;
use crate::models::Llama;
use crate::objectives::reward::Reward;
use serde::Serialize;
use std::time::Instant;

/// One scored example.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub prompt: String,
    pub completion: String,
    pub reference: String,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskScore {
    pub task: String,
    pub accuracy: f64,
    pub correct: usize,
    pub examples: usize,
    pub generated_tokens: usize,
    pub tokens_per_s: f64,
}

/// Scores `examples` under `reward`, `batch_size` prompts decoded together, at most
/// `max_new_tokens` each; `on_batch(done, total)` after every batch.
pub fn score(
    model: &Llama,
    tok: &TextTokenizer,
    examples: &[EncodedExample],
    reward: &Reward,
    max_new_tokens: usize,
    batch_size: usize,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<(TaskScore, Vec<Prediction>)> {
    let greedy = SamplingOptions { max_new_tokens, ..Default::default() };
    let stop = Stops::of_model(model, tok);
    let t0 = Instant::now();
    let mut predictions = Vec::with_capacity(examples.len());
    let mut generated = 0;
    for chunk in examples.chunks(batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt_ids().to_vec()).collect();
        let completions = generate_batch(model, &prompts, 1, &greedy, &stop, &mut |_, _| {})?;
        for ((e, prompt), c) in chunk.iter().zip(&prompts).zip(completions) {
            generated += c.ids.len();
            let completion = tok.decode(&c.ids, true)?;
            let reference = tok.decode(&e.target_ids(), true)?;
            let correct = reward.score(&completion, &reference) > 0.5;
            predictions.push(Prediction { prompt: tok.decode(prompt, false)?, completion, reference, correct });
        }
        on_batch(predictions.len(), examples.len());
    }
    let correct = predictions.iter().filter(|p| p.correct).count();
    let score = TaskScore {
        task: reward.name().into(),
        accuracy: correct as f64 / examples.len().max(1) as f64,
        correct,
        examples: examples.len(),
        generated_tokens: generated,
        tokens_per_s: generated as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    };
    Ok((score, predictions))
}
