//! GRPO (`METHODS.md` §1.5): for each prompt, `G` completions are sampled from the current
//! policy (the batched KV-cache generator), each scored by a verifiable reward against the
//! example's reference completion ([`super::reward`]); the advantage of completion `i` is
//! `Â_i = (R_i − mean(R)) / (std(R) + 1e-4)` within its group (std with Bessel's correction, as
//! TRL), shared by all its tokens. The loss per token is
//! `−min(ρ_t·Â, clip(ρ_t, 1 − ε, 1 + ε)·Â) + β·(π_ref/π_θ − log(π_ref/π_θ) − 1)`, averaged over
//! each completion's tokens, then over completions (the original GRPO normalisation, TRL's
//! `loss_type = "grpo"`).
//!
//! Each batch of rollouts is used for one update (TRL's default `num_iterations = 1`), so the
//! sampling policy is the policy being updated: `ρ_t = π_θ/π_θ_old = exp(log π − sg(log π))`
//! is 1 in value, inside the clip range, and the surrogate's gradient is exactly `Â·∇log π`.
//! The clip would only bind if rollouts were reused for several updates, which ferrotune does
//! not do; so `ε` is not a setting. The reference `π_ref` is the model with the method switched
//! off (a reference pass per micro-batch), skipped when `β = 0`.

use super::reward::Reward;
use super::{HeadInputs, LossSum, Objective, ObjectiveSpec};
use crate::data::batch::Batch;
use crate::decode::SamplingOptions;
use crate::error::{Error, Result};
use crate::kernels;
use crate::models::Llama;
use candle_core::Tensor;

/// How an online objective samples and scores completions.
#[derive(Debug, Clone)]
pub struct RolloutPlan {
    /// Completions per prompt (`G`, TRL's `num_generations`).
    pub group_size: usize,
    /// Temperature, top-p and length of the completions; the seed is set per step.
    pub sampling: SamplingOptions,
    pub reward: Reward,
}

pub struct Grpo {
    pub plan: RolloutPlan,
    pub beta: f64,
}

/// GRPO's plan keys (SASR accepts them too).
pub const KEYS: &[&str] = &["grpo_group_size", "grpo_beta", "grpo_temperature", "grpo_top_p", "grpo_top_k", "grpo_stop", "grpo_max_new_tokens", "grpo_reward", "grpo_reward_pattern"];

impl Grpo {
    pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        Ok(Box::new(Self::from_spec(spec)?))
    }

    pub fn from_spec(spec: &ObjectiveSpec) -> Result<Self> {
        let keys = spec.keys();
        let group_size = keys.usize_or("grpo_group_size", 8)?;
        if group_size < 2 {
            return Err(Error::config("grpo_group_size", format!("is {group_size}; GRPO compares completions within a group, so it needs at least 2 (TRL's default is 8)")));
        }
        let beta = keys.f64_or("grpo_beta", 0.04)?;
        if beta < 0.0 {
            return Err(Error::config("grpo_beta", format!("is {beta}; expected 0 (no KL term) or a positive weight such as 0.04")));
        }
        let sampling = SamplingOptions {
            max_new_tokens: keys.usize_or("grpo_max_new_tokens", 256)?,
            temperature: keys.f64_or("grpo_temperature", 1.0)?,
            top_p: keys.f64_or("grpo_top_p", 1.0)?,
            top_k: keys.usize_or("grpo_top_k", 0)?,
            stop_strings: keys.string("grpo_stop")?.into_iter().collect(),
            seed: 0,
        };
        if sampling.temperature <= 0.0 {
            return Err(Error::config("grpo_temperature", format!("is {}; GRPO needs varied samples, so a positive temperature such as 1.0", sampling.temperature)));
        }
        if sampling.max_new_tokens == 0 {
            return Err(Error::config("grpo_max_new_tokens", "is 0; completions need room, e.g. 256"));
        }
        sampling.validate().map_err(|e| Error::config("grpo_top_p, grpo_top_k or grpo_stop", e.to_string()))?;
        Ok(Self { plan: RolloutPlan { group_size, sampling, reward: Reward::from_spec(spec)? }, beta })
    }

    pub fn describe_fields(&self) -> serde_json::Value {
        let s = &self.plan.sampling;
        serde_json::json!({
            "grpo_group_size": self.plan.group_size, "grpo_beta": self.beta, "grpo_temperature": s.temperature,
            "grpo_top_p": s.top_p, "grpo_top_k": s.top_k, "grpo_stop": s.stop_strings.first(), "grpo_max_new_tokens": s.max_new_tokens, "grpo_reward": self.plan.reward.describe(),
            "updates_per_rollout": 1, "loss_normalisation": "per completion, then over completions",
        })
    }
}

/// `(R − mean)/(std + 1e-4)` within each run of `group` consecutive rewards (std with Bessel's
/// correction): zero mean per group, all zeros for a group of equal rewards.
pub fn group_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    assert!(group >= 2 && rewards.len().is_multiple_of(group), "rewards come in whole groups of at least 2");
    rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / group as f64;
            let std = (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (group - 1) as f64).sqrt();
            g.iter().map(move |r| (r - mean) / (std + 1e-4))
        })
        .collect()
}

impl Objective for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
    }

    fn uses_reference(&self) -> bool {
        self.beta > 0.0
    }

    fn needs_reference(&self, batch: &Batch) -> bool {
        self.beta > 0.0 && batch.rollout.is_some()
    }

    /// Completions (with at least one token): the loss is a mean over completions.
    fn units(&self, batch: &Batch) -> usize {
        batch.targets_per_row().iter().filter(|&&n| n > 0).count()
    }

    fn rollouts(&self) -> Option<&RolloutPlan> {
        Some(&self.plan)
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        let batch = inputs.batch;
        let rows = batch.rollout.as_ref().ok_or_else(|| Error::Training("GRPO trains on sampled completions; this batch holds none".into()))?;
        let (n, t) = (batch.batch_size, batch.seq_len);
        let dev = x.device();
        let nll = model.head_nll(x, inputs.targets.clone(), inputs.ctx)?.reshape((n, t))?;
        let counts = batch.targets_per_row();
        let mask = super::target_mask(batch, dev)?;
        let inv_len = Tensor::from_vec(counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect::<Vec<_>>(), (n, 1), dev)?;
        let advantages = Tensor::from_vec(rows.advantages.clone(), (n, 1), dev)?;
        // ρ = exp(log π − sg(log π)) = exp(sg(ℓ) − ℓ): 1 in value, ∇ρ = ∇log π.
        let ratio = (nll.detach() - &nll)?.exp()?;
        let mut per_token = ratio.broadcast_mul(&advantages)?.neg()?;
        let mut kl_sum = 0.0;
        if self.beta > 0.0 {
            let reference = inputs.reference.ok_or_else(|| Error::Training("GRPO's KL term needs a reference pass, and none was run".into()))?;
            let ref_nll = kernels::lm_head_nll(reference, model.head_weight(), inputs.targets.clone(), false)?.reshape((n, t))?;
            // d = log π_ref − log π; the estimator e^d − d − 1 ≥ 0, 0 where the two agree.
            let d = (&nll - ref_nll)?;
            let kl = ((d.exp()? - &d)? - 1.0)?;
            let kl = (kl * &mask)?;
            kl_sum = kl.sum(1)?.broadcast_mul(&inv_len.squeeze(1)?)?.sum_all()?.to_scalar::<f32>()? as f64;
            per_token = (per_token + (kl * self.beta)?)?;
        }
        let per_row = (per_token * &mask)?.sum_keepdim(1)?.broadcast_mul(&inv_len)?;
        let live = |i: usize| counts[i] > 0;
        let sum = |f: &dyn Fn(usize) -> f64| (0..n).filter(|&i| live(i)).map(f).sum::<f64>();
        let metrics = vec![
            ("reward", sum(&|i| rows.rewards[i] as f64)),
            ("kl", kl_sum),
            ("completion_length", sum(&|i| counts[i] as f64)),
        ];
        Ok(LossSum { loss: per_row.sum_all()?, metrics })
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.describe_fields();
        d["name"] = "grpo".into();
        d
    }
}
