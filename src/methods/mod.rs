//! Fine-tuning methods, all behind one contract ([`Method`], METHODS.md §0). A method is one
//! file here plus one line in [`registry`]; the trainer, `eval`, `generate`, `merge`, `export`,
//! checkpoints and `bench` reach it only through the trait, and never learn its name.
//!
//! Life of a method in a run: [`registry::create`] builds it from the plan (unattached);
//! [`Method::prepare`] gets the run's first batches if it asked for them ([`Method::init_batches`]);
//! [`Method::attach`] puts hooks on the model's sites and creates the trainable tensors; each step
//! runs backward → clip → [`Method::grad_transform`] → the method's [`Method::optimizer`] →
//! [`Method::on_step`]; [`Method::save`] writes the adapter; [`registry::load`] reads it back,
//! attached, for `--resume`, `init_adapter`, `eval`, `generate`, `merge` and `export`.

pub mod adaptformer;
pub mod calibrate;
pub mod dora;
pub mod eva;
pub mod files;
pub mod flora;
pub mod full;
pub mod graft;
pub mod offloaded;
pub mod greentrainer;
pub mod hft;
pub mod lift;
pub mod locft;
pub mod lora;
pub mod lora_pro;
pub mod lt_sft;
pub mod options;
pub mod registry;
pub mod residual;
pub mod sara;
pub mod snella;
pub mod sparse;
pub mod spt;
pub mod ssf;
pub mod targets;
pub mod triadaptlora;

pub use lora::{Lora, LoraConfig};
pub use options::MethodSpec;
pub use targets::TargetModules;

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::export::ExportFormat;
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use crate::optim::{AdamW, AdamWConfig, Optimizer};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// The files every method's adapter folder holds: PEFT's names, so a PEFT-compatible method's
/// folder is a PEFT adapter as is.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The key in `adapter_config.json` that names the ferrotune method which wrote it.
pub const METHOD_KEY: &str = "ferrotune_method";

/// One adapted linear site as a plain LoRA pair: `ΔW = scaling · B·A`, with `a: [r, in]`,
/// `b: [out, r]`. What a llama.cpp LoRA GGUF can hold.
pub struct LoraPair {
    pub site: String,
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
}

/// What a method will hold, known before the model is loaded (for the memory check).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PlannedMemory {
    /// Trainable values; each costs itself, its gradient and the optimizer's two moments.
    pub trainable_params: u64,
    /// Bytes beyond that: full-size optimizer moments (LoRA-Pro), f32 residual base matrices
    /// (CorDA, PiSSA on a quantized base), masks.
    pub extra_bytes: u64,
    /// f32 values per training token that its ops keep for the backward beyond LoRA's, over
    /// the whole model (DoRA's rescaled outputs, AdaptFormer's bottleneck activations).
    pub floats_per_token: u64,
    /// Bytes its ops keep in the autograd graph whatever the batch, over the whole model
    /// (SNELLA's weight-sized kernels); with activation checkpointing one block's share.
    pub graph_bytes: u64,
    /// Its sites are plain LoRA branches, so training runs the fused decoder block
    /// (`kernels::decoder_block`), which keeps fewer activations than the op-by-op graph.
    pub fused_blocks: bool,
}

pub trait Method: Send {
    /// The config name (`adapter = "<name>"`).
    fn name(&self) -> &'static str;

    /// How many of the run's training micro-batches [`Method::prepare`] wants (0: none).
    fn init_batches(&self) -> usize {
        0
    }

    /// A pass over data before the trainable tensors exist (EVA's activation SVD, CorDA's
    /// covariances). The model is the bare base; the method may attach temporary hooks.
    fn prepare(&mut self, _model: &mut Llama, _batches: &[Batch]) -> Result<()> {
        Ok(())
    }

    /// Selects the sites, puts the method's hooks on them and creates the trainable tensors.
    fn attach(&mut self, model: &mut Llama) -> Result<()>;

    /// Trainable tensors under stable names (PEFT keys where PEFT has them), in a fixed order:
    /// the order of gradients and optimizer state. [`Method::on_step`] may replace them (a
    /// sparse method's new mask), so the trainer asks again every step.
    fn params(&self) -> Vec<(String, Var)>;

    fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The sites it touches (linear or block), for `run.json` and messages.
    fn sites(&self) -> Vec<String>;

    /// What it will hold on a model with these sites; `None`: as much as a LoRA of the plan's
    /// `lora_r` on its `lora_target_modules`.
    fn planned_memory(&self, _sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        Ok(None)
    }

    /// The update rule for [`Method::params`]; AdamW unless the method has its own.
    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        let vars: Vec<Var> = self.params().into_iter().map(|(_, v)| v).collect();
        Box::new(AdamW::new(config, &vars))
    }

    /// Rewrites the step's gradients (in [`Method::params`] order) after clipping and before
    /// the optimizer: projections, sparse masks.
    fn grad_transform(&mut self, _grads: &mut [Vec<f32>]) -> Result<()> {
        Ok(())
    }

    /// The run's length in optimizer steps, told once before the first step (schedules that
    /// run to the end of training need it).
    fn set_total_steps(&mut self, _total_steps: usize) {}

    /// After optimizer step `step` (1-based): schedules, rank growth, mask refresh.
    fn on_step(&mut self, _step: usize, _model: &mut Llama) -> Result<()> {
        Ok(())
    }

    /// State beyond the parameters that a bit-exact resume needs (importance scores, masks).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Restores [`Method::state`]; `src` names the file for errors.
    fn restore_state(&mut self, state: HashMap<String, Tensor>, src: &Path) -> Result<()> {
        match state.keys().min() {
            None => Ok(()),
            Some(k) => Err(Error::format(src, format!("tensor `{k}`: method `{}` keeps no state", self.name()))),
        }
    }

    /// Writes the adapter folder ([`ADAPTER_CONFIG`] with [`METHOD_KEY`], [`ADAPTER_WEIGHTS`]).
    fn save(&self, dir: &Path, base_model: &str) -> Result<()>;

    /// Writes what a checkpoint needs to re-attach the method exactly; by default the adapter.
    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.save(dir, base_model)
    }

    /// Whether the adapter folder loads in Hugging Face PEFT as it is.
    fn peft_compatible(&self) -> bool {
        false
    }

    /// Folds the method into the base weights and removes its hooks, or says why it cannot.
    fn merge(&self, _model: &mut Llama) -> Result<()> {
        Err(Error::Model(format!("method `{}` cannot be merged into the base weights", self.name())))
    }

    fn mergeable(&self) -> bool {
        false
    }

    /// The method as plain LoRA pairs, where it is one (or converts exactly to one).
    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        None
    }

    /// Whether `format` can hold this method's result; the error says what would be lost.
    fn can_export(&self, format: ExportFormat) -> std::result::Result<(), String> {
        let name = self.name();
        match format {
            ExportFormat::Peft if !self.peft_compatible() => {
                Err(format!("`{name}` has no PEFT layout: Hugging Face PEFT could not load its parameters (write a merged model instead, where the method can be merged)"))
            }
            ExportFormat::MergedSafetensors | ExportFormat::MergedGguf if !self.mergeable() => {
                Err(format!("`{name}` cannot be folded into the base weights (it is not linear in them), so a merged model would lose it"))
            }
            ExportFormat::GgufLora if self.as_lora().is_none() => {
                Err(format!("a llama.cpp LoRA GGUF holds only lora_a/lora_b pairs, and `{name}` is not one: its parameters would be lost"))
            }
            _ => Ok(()),
        }
    }

    /// What `run.json` records of the method beyond the plan (scalings, ranks per site, …).
    fn describe(&self) -> serde_json::Value;
}
