//! SASR (`METHODS.md` §5.7): SFT warm-up on the demonstrations, then at every step either an
//! SFT step on demonstrations or a GRPO step on sampled completions of the same prompts.
//!
//! The switching rule, which METHODS.md flags as unconfirmed (the paper's code was not
//! available to us; a third-party rendering of its algorithm confirms the shape: `G_warm`, the
//! SFT gradient norm at the last warm-up step, the norm of the latest SFT step, and a
//! hyperparameter `γ` in the probability): step `t` after warm-up is an SFT step with
//! probability `p_t = ‖g_sft‖ / (‖g_sft‖ + γ·G_warm)`, `‖g_sft‖` the gradient norm (before
//! clipping) of the most recent SFT step, else a GRPO step. A demonstration gradient that grows
//! past the warm-up's (the policy drifting from the demonstrations) raises the share of SFT;
//! one that shrinks (the demonstrations are learnt) hands the steps to GRPO's exploration.
//! `γ = 1` gives `p = 1/2` right after warm-up. The draw is seeded by the run's seed and the
//! step, so a resumed run makes the same choices.

use super::grpo::{Grpo, RolloutPlan};
use super::{HeadInputs, LossSum, MixState, Objective, ObjectiveSpec, Sft, StepInfo, StepKind};
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::models::Llama;
use crate::rng::SplitMix64;
use candle_core::Tensor;

pub struct Sasr {
    grpo: Grpo,
    /// SFT steps before the hybrid phase; `None`: a tenth of the run (at least 1).
    warmup_steps: Option<usize>,
    gamma: f64,
}

/// SASR's own keys; GRPO's apply to its GRPO steps.
pub const KEYS: &[&str] = &["sasr_warmup_steps", "sasr_gamma"];

/// `‖g‖ / (‖g‖ + γ·G_warm)`: the probability that a hybrid step is an SFT step.
pub fn sft_probability(last_sft_norm: f64, warm_norm: f64, gamma: f64) -> f64 {
    let denominator = last_sft_norm + gamma * warm_norm;
    if denominator > 0.0 {
        last_sft_norm / denominator
    } else {
        0.5
    }
}

impl Sasr {
    pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        let keys = spec.keys();
        let warmup_steps = match spec.options.get("sasr_warmup_steps") {
            None => None,
            Some(_) => Some(keys.usize_or("sasr_warmup_steps", 1)?),
        };
        if warmup_steps == Some(0) {
            return Err(Error::config("sasr_warmup_steps", "is 0; SASR measures the SFT gradient norm during warm-up, so it needs at least 1 step"));
        }
        let gamma = keys.f64_or("sasr_gamma", 1.0)?;
        if gamma <= 0.0 {
            return Err(Error::config("sasr_gamma", format!("is {gamma}; expected a positive number (1 = even odds right after warm-up)")));
        }
        Ok(Box::new(Self { grpo: Grpo::from_spec(spec)?, warmup_steps, gamma }))
    }

    fn warmup(&self, total_steps: usize) -> usize {
        self.warmup_steps.unwrap_or(total_steps.div_ceil(10).max(1))
    }
}

impl Objective for Sasr {
    fn name(&self) -> &'static str {
        "sasr"
    }

    fn uses_reference(&self) -> bool {
        self.grpo.uses_reference()
    }

    fn needs_reference(&self, batch: &Batch) -> bool {
        self.grpo.needs_reference(batch)
    }

    fn units(&self, batch: &Batch) -> usize {
        if batch.rollout.is_some() {
            self.grpo.units(batch)
        } else {
            batch.n_targets
        }
    }

    fn rollouts(&self) -> Option<&RolloutPlan> {
        self.grpo.rollouts()
    }

    fn step_kind(&self, at: &StepInfo, mix: &MixState) -> StepKind {
        if at.step < self.warmup(at.total_steps) {
            return StepKind::Demonstrations;
        }
        let (Some(last), Some(warm)) = (mix.last_sft_grad_norm, mix.warmup_grad_norm) else {
            return StepKind::Demonstrations;
        };
        let u = SplitMix64::derive(at.seed, &[0x5a5, at.step as u64]).next_f32() as f64;
        if u < sft_probability(last, warm, self.gamma) {
            StepKind::Demonstrations
        } else {
            StepKind::Rollouts
        }
    }

    fn after_step(&self, mix: &mut MixState, at: &StepInfo, kind: StepKind, grad_norm: f64) {
        if kind == StepKind::Demonstrations {
            mix.last_sft_grad_norm = Some(grad_norm);
            if at.step + 1 == self.warmup(at.total_steps) {
                mix.warmup_grad_norm = Some(grad_norm);
            }
        }
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        if inputs.batch.rollout.is_some() {
            self.grpo.loss_sum(model, x, inputs)
        } else {
            Sft.loss_sum(model, x, inputs)
        }
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.grpo.describe_fields();
        d["name"] = "sasr".into();
        d["sasr_warmup_steps"] = self.warmup_steps.map_or("a tenth of the steps".into(), Into::into);
        d["sasr_gamma"] = self.gamma.into();
        d["switching_rule"] = "SFT with probability |g_sft| / (|g_sft| + gamma * G_warm), else GRPO".into();
        d
    }
}
