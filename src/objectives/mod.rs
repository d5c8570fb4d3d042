//! Training objectives: what a micro-batch's loss is, given the model's outputs. SFT's token
//! cross-entropy is one of them; DFT and ASFT reweight it and anchor it to a reference model.
//! An objective never sees a method: it works on the last block's output and the frozen LM head.
//! Objectives that compare with the starting
//! model ask for a *reference pass*, the same model with the method switched off
//! ([`ForwardCtx::reference`]), so no second copy of the base is ever held.
//!
//! *Online* objectives (GRPO, and SASR's GRPO steps) train on completions the trainer samples
//! from the policy ([`Objective::rollouts`]); the batch then carries each completion's reward
//! and advantage. RoSTE changes the forward itself: before training it makes the model's sites
//! quantisation-aware ([`Objective::prepare_model`]) and keeps SFT's loss. So every objective
//! combines with every method, except RoSTE, which needs the method's update as a weight change
//! (the LoRA family).
//!
//! Every objective keeps the head's cross-entropy chunked: nothing here forms the
//! `tokens × vocab` logits of a batch.

mod dft;
pub mod dpo;
pub mod grpo;
mod ift;
pub mod masked_thought;
pub mod reward;
pub mod roste;
pub mod sasr;
mod sft;

pub use dft::Dft;
pub use dpo::Dpo;
pub use grpo::{Grpo, RolloutPlan};
pub use sft::Sft;

use crate::data::batch::Batch;
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::models::{ForwardCtx, Llama};
use crate::plan_keys::PlanKeys;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What one micro-batch's head sees.
pub struct HeadInputs<'a> {
    pub batch: &'a Batch,
    /// Next-token targets of the batch (`batch.targets`, shared with the head kernel).
    pub targets: Arc<Vec<i32>>,
    /// The reference model's final hidden states `[b·t, hidden]`, for objectives that ask.
    pub reference: Option<&'a Tensor>,
    pub ctx: &'a ForwardCtx,
}

/// Where in the run a micro-batch is: for schedules (Masked Thought's ramp) and seeded choices.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Optimizer steps done before this one.
    pub step: usize,
    pub total_steps: usize,
    /// This micro-batch's seed (also its forward's dropout seed); for the per-step choice of
    /// [`Objective::step_kind`], the run's seed.
    pub seed: u64,
}

/// A micro-batch's loss summed over its units (target tokens, or pairs; a scalar carrying the
/// graph), and named quantities summed over the same units (the trainer logs their step means).
pub struct LossSum {
    pub loss: Tensor,
    pub metrics: Vec<(&'static str, f64)>,
}

pub trait Objective: Send + Sync {
    fn name(&self) -> &'static str;

    /// Whether the objective may train on packed rows (`sample_packing`): true for those whose
    /// loss is a sum over target tokens, false for those that need one example per row (DPO's
    /// pairs, IFT's and GRPO's per-sequence means).
    fn packs(&self) -> bool {
        false
    }

    /// Whether this micro-batch needs a reference pass ([`HeadInputs::reference`]).
    fn needs_reference(&self, _batch: &Batch) -> bool {
        false
    }

    /// Whether the objective compares with the reference model at all (ASFT, DPO, GRPO with a
    /// KL term).
    fn uses_reference(&self) -> bool {
        false
    }

    /// Online objectives (GRPO, SASR): how completions are sampled and rewarded.
    fn rollouts(&self) -> Option<&RolloutPlan> {
        None
    }

    /// What step `at` trains on: the data's demonstrations, or completions sampled from the
    /// policy ([`Objective::rollouts`]). SASR chooses per step from `mix`.
    fn step_kind(&self, _at: &StepInfo, _mix: &MixState) -> StepKind {
        if self.rollouts().is_some() {
            StepKind::Rollouts
        } else {
            StepKind::Demonstrations
        }
    }

    /// Memory the objective needs beyond the method's: bytes held for the run, and f32 values
    /// per training token kept for the backward (RoSTE's dense weights and quantised copies).
    fn planned_memory(&self, _model: &crate::models::ModelConfig) -> (u64, u64) {
        (0, 0)
    }

    /// Micro-batches (the run's first, in its order) [`Objective::prepare_model`] needs.
    fn init_batches(&self) -> usize {
        0
    }

    /// Changes the model before training, after the method is attached (RoSTE makes its sites
    /// quantisation-aware, choosing rotations on `batches`); `resume` is the checkpoint a
    /// resumed run continues from, whose [`Objective::save_extras`] files it may read.
    fn prepare_model(&self, _model: &mut Llama, _batches: &[Batch], _resume: Option<&std::path::Path>) -> Result<()> {
        Ok(())
    }

    /// After optimizer step `step` (counted from 1) of `total_steps` (RoSTE's periodic
    /// rotation search).
    fn on_step(&self, _model: &Llama, _step: usize, _total_steps: usize) -> Result<()> {
        Ok(())
    }

    /// Writes the objective's own files beside the adapter and into checkpoints (RoSTE's
    /// quantisation plan).
    fn save_extras(&self, _dir: &std::path::Path) -> Result<()> {
        Ok(())
    }

    /// Records what a finished step tells the step choice (SASR: its gradient norm).
    fn after_step(&self, _mix: &mut MixState, _at: &StepInfo, _kind: StepKind, _grad_norm: f64) {}

    /// Whether the reference model's sequence log-probabilities must be computed once before
    /// training ([`Batch::reference_logps`]; DPO).
    fn needs_reference_logps(&self) -> bool {
        false
    }

    /// What the loss is averaged over in a batch: its target tokens (SFT and its variants), or
    /// its preference pairs (DPO).
    fn units(&self, batch: &Batch) -> usize {
        batch.n_targets
    }

    /// The input embeddings `[b, t, hidden]` of the pass that is trained, where the objective
    /// changes them (Masked Thought masks response tokens, IFT mixes in the model's own
    /// predictions); `None` for the tokens' own embeddings.
    fn input_embeddings(&self, _model: &Llama, _batch: &Batch, _at: &StepInfo) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The loss summed over the batch's units, from the last block's output `x: [b, t, hidden]`
    /// (the trainer divides by the step's units, so micro-batching leaves the step unchanged).
    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum>;

    /// How validation examples are scored where the token NLL is not this objective's measure
    /// (DPO: its loss over pairs, with reward accuracy and margin); `None` for the NLL.
    fn validation_score(&self, _model: &Llama, _val: &[EncodedExample], _batch_size: usize, _pad_id: u32) -> Option<Result<ValidationScore>> {
        None
    }

    /// The objective and its settings, for `run.json`.
    fn describe(&self) -> serde_json::Value;
}

/// What an optimizer step trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// The dataset's examples (SFT and its variants, DPO's pairs).
    Demonstrations,
    /// Completions sampled from the policy and scored by a reward (GRPO).
    Rollouts,
}

/// The state behind an objective's step choices, kept in checkpoints so a resumed run chooses
/// as the uninterrupted one would (SASR's gradient norms).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MixState {
    /// The SFT gradient norm at the last warm-up step (`G_warm`).
    pub warmup_grad_norm: Option<f64>,
    /// The gradient norm of the most recent SFT step.
    pub last_sft_grad_norm: Option<f64>,
}

/// An objective's own validation score: the number logged as `eval_loss`, and a line for the
/// console.
pub struct ValidationScore {
    pub loss: f64,
    pub summary: String,
}

/// The plan's choice: `objective = "<name>"` and that objective's own keys.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectiveSpec {
    pub name: String,
    pub options: BTreeMap<String, toml::Value>,
}

impl ObjectiveSpec {
    pub fn keys(&self) -> PlanKeys<'_> {
        PlanKeys(&self.options)
    }
}

struct Entry {
    name: &'static str,
    /// The objective's plan keys, in groups (SASR takes GRPO's too).
    keys: &'static [&'static [&'static str]],
    create: fn(&ObjectiveSpec) -> Result<Box<dyn Objective>>,
}

const ENTRIES: &[Entry] = &[
    Entry { name: "sft", keys: &[], create: |_| Ok(Box::new(sft::Sft)) },
    Entry { name: "dft", keys: &[], create: |_| Ok(Box::new(dft::Dft::plain())) },
    Entry { name: "asft", keys: &[&["asft_lambda"]], create: dft::Dft::asft },
    Entry { name: "dpo", keys: &[&["dpo_beta", "dpo_label_smoothing"]], create: dpo::Dpo::create },
    Entry { name: "masked_thought", keys: &[&["mft_p_max", "mft_ramp_ratio"]], create: masked_thought::MaskedThought::create },
    Entry { name: "ift", keys: &[&["ift_lambda", "ift_gamma"]], create: ift::Ift::create },
    Entry { name: "grpo", keys: &[grpo::KEYS], create: grpo::Grpo::create },
    Entry { name: "sasr", keys: &[sasr::KEYS, grpo::KEYS], create: sasr::Sasr::create },
    Entry { name: "roste", keys: &[roste::KEYS], create: roste::Roste::create },
];

pub fn names() -> Vec<&'static str> {
    ENTRIES.iter().map(|e| e.name).collect()
}

/// Whether some objective declares `key` as one of its plan keys.
pub fn is_objective_key(key: &str) -> bool {
    ENTRIES.iter().any(|e| e.declares(key))
}

impl Entry {
    fn declares(&self, key: &str) -> bool {
        self.keys.iter().any(|group| group.contains(&key))
    }
}

/// The plan's objective: a known name, only its own keys, values it accepts.
pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
    let e = ENTRIES
        .iter()
        .find(|e| e.name == spec.name)
        .ok_or_else(|| Error::config("objective", format!("`{}` is not an objective ferrotune knows (known: {})", spec.name, names().join(", "))))?;
    for key in spec.options.keys() {
        if !e.declares(key) {
            let owners: Vec<&str> = ENTRIES.iter().filter(|o| o.declares(key)).map(|o| o.name).collect();
            return Err(Error::config(key.as_str(), format!("applies to objective = {}, and this plan has objective = \"{}\"", owners.join(" or "), e.name)));
        }
    }
    (e.create)(spec)
}

/// 1 where a position of the batch has a target, else 0, `[b, t]`.
pub(crate) fn target_mask(batch: &Batch, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = batch.targets.iter().map(|&v| (v != crate::data::IGNORE_INDEX) as u8 as f32).collect();
    Tensor::from_vec(mask, (batch.batch_size, batch.seq_len), dev)
}

/// The reference model's final hidden states for a batch: the model with every method switched
/// off, no graph.
pub fn reference_hidden(model: &Llama, batch: &Batch) -> Result<Tensor> {
    Ok(model.hidden(&batch.input_ids, batch.batch_size, batch.seq_len, None, &ForwardCtx::reference().over(batch))?.detach())
}
