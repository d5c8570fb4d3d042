//! RoSTE (`METHODS.md` §5.8): quantisation-aware SFT. Before training, each linear site picks
//! its rotation (identity or block Hadamard of its input) by the quantisation error of the base
//! weight on the run's first micro-batches; then every forward runs the sites as the quantised
//! model would, weights `roste_weight_bits`-bit per output channel and activations
//! `roste_activation_bits`-bit per token, both in the rotated basis, with straight-through
//! gradients ([`crate::models::qat`]). The loss is SFT's. The adapter folder gets `roste.json`,
//! the plan (bits, clipping, rotation per site) that a merged model is quantised with.
//!
//! Not (yet) covered, against the paper: KV-cache quantisation, the residual-stream rotation
//! `R1` folded into the weights (rotations here are per site and online), and re-running the
//! rotation search during training (it runs once, at the start).

use super::{HeadInputs, LossSum, Objective, ObjectiveSpec, Sft};
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::models::qat::{self, QatPlan};
use crate::models::{ForwardCtx, Llama};
use candle_core::Tensor;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct Roste {
    plan: QatPlan,
    calibration_batches: usize,
    chosen: Mutex<Option<QatPlan>>,
}

pub const KEYS: &[&str] = &["roste_weight_bits", "roste_activation_bits", "roste_clip_ratio", "roste_calibration_batches"];

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
        Ok(Box::new(Self { plan, calibration_batches, chosen: Mutex::new(None) }))
    }

    /// The plan with its rotations, once [`Objective::prepare_model`] chose them.
    pub fn chosen(&self) -> Option<QatPlan> {
        self.chosen.lock().expect("not poisoned").clone()
    }
}

impl Objective for Roste {
    fn name(&self) -> &'static str {
        "roste"
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        Sft.loss_sum(model, x, inputs)
    }

    fn init_batches(&self) -> usize {
        self.calibration_batches
    }

    fn prepare_model(&self, model: &mut Llama, batches: &[Batch]) -> Result<()> {
        let chosen = qat::calibrate(model, &self.plan, &mut |m| {
            for b in batches {
                m.nll(&b.input_ids, Arc::new(b.targets.clone()), b.batch_size, b.seq_len, &ForwardCtx::eval())?;
            }
            Ok(())
        })?;
        qat::attach(model, &chosen)?;
        let rotated = chosen.rotations.values().filter(|&&r| r).count();
        eprintln!("roste: {rotated} of {} sites rotated (block Hadamard), chosen on {} micro-batches", chosen.rotations.len(), batches.len());
        *self.chosen.lock().expect("not poisoned") = Some(chosen);
        Ok(())
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
            "rotated_sites": rotated,
        })
    }
}
