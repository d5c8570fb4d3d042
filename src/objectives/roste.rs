//! RoSTE (`METHODS.md` §5.8): quantisation-aware SFT. Before training, each linear site picks
//! its rotation (identity or block Hadamard of its input) by the quantisation error of the base
//! weight on the run's first micro-batches; then every forward runs the sites as the quantised
//! model would, weights `roste_weight_bits`-bit per output channel and activations
//! `roste_activation_bits`-bit per token, both in the rotated basis, with straight-through
//! gradients ([`crate::models::qat`]). The loss is SFT's. The adapter folder gets `roste.json`,
//! the plan (bits, clipping, rotation per site) that a merged model is quantised with.
//!
//! The rotation search re-runs every `roste_rotation_refresh_steps` steps on the same
//! micro-batches with the weights as they are then (the paper's bilevel alternation); 0 keeps
//! the first choice. Checkpoints keep the plan, so `--resume` continues with the rotations the
//! run had. Not covered, against the paper: KV-cache quantisation, and the residual-stream
//! rotation `R1` folded into the weights (rotations here are per site and online).

use super::{HeadInputs, LossSum, Objective, ObjectiveSpec, Sft};
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::models::qat::{self, QatPlan, QatSites};
use crate::models::{ForwardCtx, Llama};
use candle_core::Tensor;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct Roste {
    plan: QatPlan,
    calibration_batches: usize,
    refresh_steps: usize,
    /// The model's quantisation-aware sites and the micro-batches their rotations are chosen
    /// on, once [`Objective::prepare_model`] ran.
    state: Mutex<Option<(QatSites, Vec<Batch>)>>,
}

pub const KEYS: &[&str] = &["roste_weight_bits", "roste_activation_bits", "roste_clip_ratio", "roste_calibration_batches", "roste_rotation_refresh_steps"];

/// Runs the model over `batches` (no graph): the inputs the rotation search sees.
fn calibration_pass(model: &Llama, batches: &[Batch]) -> Result<()> {
    for b in batches {
        model.nll(&b.input_ids, Arc::new(b.targets.clone()), b.batch_size, b.seq_len, &ForwardCtx::eval().over(b))?;
    }
    Ok(())
}

impl Roste {
    pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        let keys = spec.keys();
        let bits = |key: &str, default: usize| -> Result<u32> {
            let b = keys.usize_or(key, default)?;
            if !(2..=16).contains(&b) {
                return Err(Error::config(key, format!("is {b}; expected 2 to 16 bits")));
            }
            Ok(b as u32)
        };
        let plan = QatPlan {
            weight_bits: bits("roste_weight_bits", 4)?,
            activation_bits: bits("roste_activation_bits", 8)?,
            weight_clip_ratio: keys.f64_in("roste_clip_ratio", 1.0, 0.05, 1.0)? as f32,
            rotations: Default::default(),
        };
        let calibration_batches = keys.usize_or("roste_calibration_batches", 4)?.max(1);
        let refresh_steps = keys.usize_or("roste_rotation_refresh_steps", 0)?;
        Ok(Box::new(Self { plan, calibration_batches, refresh_steps, state: Mutex::new(None) }))
    }

    /// The plan with the rotations the sites have now, once [`Objective::prepare_model`] ran.
    pub fn chosen(&self) -> Option<QatPlan> {
        self.state.lock().expect("not poisoned").as_ref().map(|(sites, _)| sites.plan())
    }
}

impl Objective for Roste {
    fn name(&self) -> &'static str {
        "roste"
    }

    fn packs(&self) -> bool {
        true
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        Sft.loss_sum(model, x, inputs)
    }

    /// Per linear weight, seven f32 copies live during a step (`W0` dense, `W0 + ΔW`, rotated,
    /// quantised, and the gradients of the last three, which candle keeps to the end of the
    /// backward); per token, each site's rotated and quantised input and their gradients.
    fn planned_memory(&self, c: &crate::models::ModelConfig) -> (u64, u64) {
        let sites = crate::train::memory::site_shapes(c);
        let weights: u64 = sites.iter().map(|s| (s.in_features * s.out_features) as u64).sum();
        let site_inputs: u64 = sites.iter().map(|s| s.in_features as u64).sum();
        (7 * 4 * weights, 4 * site_inputs)
    }

    fn init_batches(&self) -> usize {
        self.calibration_batches
    }

    fn prepare_model(&self, model: &mut Llama, batches: &[Batch], resume: Option<&Path>) -> Result<()> {
        // A resumed run continues with the rotations its checkpoint had.
        let resumed = resume.map(qat::read_plan).transpose()?.flatten();
        let sites = qat::attach(model, resumed.as_ref().unwrap_or(&self.plan))?;
        if resumed.is_none() {
            sites.choose_rotations(model, &mut |m| calibration_pass(m, batches))?;
        }
        let plan = sites.plan();
        let rotated = plan.rotations.values().filter(|&&r| r).count();
        let how = if resumed.is_some() { "as the checkpoint had them".to_string() } else { format!("chosen on {} micro-batches", batches.len()) };
        crate::note!("roste: {rotated} of {} sites rotated (block Hadamard), {how}", plan.rotations.len());
        *self.state.lock().expect("not poisoned") = Some((sites, batches.to_vec()));
        Ok(())
    }

    fn on_step(&self, model: &Llama, step: usize, total_steps: usize) -> Result<()> {
        if self.refresh_steps == 0 || !step.is_multiple_of(self.refresh_steps) || step >= total_steps {
            return Ok(());
        }
        match self.state.lock().expect("not poisoned").as_ref() {
            Some((sites, batches)) => sites.choose_rotations(model, &mut |m| calibration_pass(m, batches)),
            None => Ok(()),
        }
    }

    fn save_extras(&self, dir: &Path) -> Result<()> {
        match self.chosen() {
            Some(plan) => crate::io_util::write_atomic(&dir.join(qat::PLAN_FILE), serde_json::to_string_pretty(&plan).expect("serialisable").as_bytes()),
            None => Ok(()),
        }
    }

    fn describe(&self) -> serde_json::Value {
        let rotated = self.chosen().map(|p| p.rotations.values().filter(|&&r| r).count());
        serde_json::json!({
            "name": "roste", "roste_weight_bits": self.plan.weight_bits, "roste_activation_bits": self.plan.activation_bits,
            "roste_clip_ratio": self.plan.weight_clip_ratio, "roste_calibration_batches": self.calibration_batches,
            "roste_rotation_refresh_steps": self.refresh_steps,
            "rotated_sites": rotated,
        })
    }
}
