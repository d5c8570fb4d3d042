//! A GRPO step's data: completions sampled from the policy for the step's prompts, scored by
//! the reward against each example's reference completion, with group-normalised advantages,
//! packed into micro-batches of completions.
//!
//! An example's prompt is its tokens before the first target (what a completion continues:
//! the question, the chat up to the assistant turn), and its reference is its target tokens.

use crate::data::batch::{make_batch, Batch, RolloutRows};
use crate::data::{EncodedExample, TextTokenizer, IGNORE_INDEX};
use crate::decode::{generate_batch, SamplingOptions, Stops};
use crate::error::{Error, Result};
use crate::models::Llama;
use crate::objectives::grpo::{group_advantages, RolloutPlan};
use std::time::Instant;

/// The micro-batches of one rollout step and what it measured.
pub struct Rollouts {
    pub batches: Vec<Batch>,
    /// Tokens generated, and the seconds generation took.
    pub generated_tokens: usize,
    pub seconds: f64,
    /// Mean reward over all completions, and the share of groups whose rewards differ (only
    /// those carry a policy gradient).
    pub mean_reward: f64,
    pub informative_groups: f64,
}

impl Rollouts {
    /// Adds the rollout's own figures to a step's metrics.
    pub fn record(&self, metrics: &mut std::collections::BTreeMap<String, f64>) {
        metrics.insert("rollout/tokens_per_s".into(), self.generated_tokens as f64 / self.seconds.max(1e-9));
        metrics.insert("rollout/seconds".into(), self.seconds);
        metrics.insert("rollout/mean_reward".into(), self.mean_reward);
        metrics.insert("rollout/informative_groups".into(), self.informative_groups);
    }
}

/// Refuses data a rollout cannot use: every example needs a prompt and a reference the reward
/// can read. Returns how many references the reward cannot read (they can never score 1).
pub fn check_examples(examples: &[EncodedExample], plan: &RolloutPlan, tok: &TextTokenizer, train_on_inputs: bool) -> Result<usize> {
    if train_on_inputs {
        return Err(Error::config("train_on_inputs", "is true; GRPO needs the prompt of each example (the tokens that are not trained on), so set it to false"));
    }
    let mut unreadable = 0;
    for ex in examples {
        let reference = tok.decode(&ex.target_ids(), true)?;
        if plan.reward.key_of(&reference).is_none() {
            unreadable += 1;
        }
    }
    if unreadable == examples.len() {
        return Err(Error::config(
            "grpo_reward",
            format!("is \"{}\", and no training example's reference completion has what it compares (e.g. GSM8K's `#### <number>`)", plan.reward.name()),
        ));
    }
    Ok(unreadable)
}

/// Samples `plan.group_size` completions of each example's prompt with the current policy and
/// packs them, `micro_batch_size` completions per batch. `seed` fixes the samples.
pub fn sample(model: &Llama, tok: &TextTokenizer, examples: &[&EncodedExample], plan: &RolloutPlan, micro_batch_size: usize, pad_id: u32, seed: u64) -> Result<Rollouts> {
    let g = plan.group_size;
    let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt_ids().to_vec()).collect();
    let sampling = SamplingOptions { seed, ..plan.sampling.clone() };
    let t0 = Instant::now();
    let completions = generate_batch(model, &prompts, g, &sampling, &Stops::of_model(model, tok), &mut |_, _| {})?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut rewards = Vec::with_capacity(completions.len());
    for (row, c) in completions.iter().enumerate() {
        let reference = tok.decode(&examples[row / g].target_ids(), true)?;
        rewards.push(plan.reward.score(&c.text(tok, &sampling)?, &reference));
    }
    let advantages = group_advantages(&rewards, g);
    let sequences: Vec<EncodedExample> = completions
        .iter()
        .enumerate()
        .map(|(row, c)| {
            let prompt = &prompts[row / g];
            let completion: Vec<u32> = c.ids.iter().copied().chain(c.stop).collect();
            EncodedExample {
                input_ids: prompt.iter().chain(&completion).copied().collect(),
                labels: std::iter::repeat_n(IGNORE_INDEX, prompt.len()).chain(completion.iter().map(|&t| t as i32)).collect(),
                ..Default::default()
            }
        })
        .collect();
    let mut batches = Vec::new();
    for (i, chunk) in sequences.chunks(micro_batch_size.max(1)).enumerate() {
        let rows = i * micro_batch_size..i * micro_batch_size + chunk.len();
        let mut b = make_batch(&chunk.iter().collect::<Vec<_>>(), pad_id);
        b.rollout = Some(RolloutRows {
            rewards: rewards[rows.clone()].iter().map(|&r| r as f32).collect(),
            advantages: advantages[rows].iter().map(|&a| a as f32).collect(),
        });
        batches.push(b);
    }
    let informative = rewards.chunks(g).filter(|grp| grp.iter().any(|&r| r != grp[0])).count();
    Ok(Rollouts {
        batches,
        generated_tokens: completions.iter().map(|c| c.ids.len()).sum(),
        seconds,
        mean_reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
        informative_groups: informative as f64 / examples.len().max(1) as f64,
    })
}
