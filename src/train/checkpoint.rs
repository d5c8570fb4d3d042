//! Checkpoints: `checkpoints/step-N/` holds the adapter (PEFT layout), the optimizer moments
//! and `trainer_state.json` (step, data position, seed). A checkpoint is written into a
//! temporary folder and renamed into place, so a crash leaves the previous one intact.

use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::methods::Lora;
use crate::optim::AdamW;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Training examples consumed so far (across epochs); fixes the data position.
    pub samples_seen: u64,
    /// The run seed; with `step` it determines every random stream (dropout, shuffling).
    pub seed: u64,
    pub total_steps: usize,
    pub ferrotune_version: String,
}

pub fn step_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join("checkpoints").join(format!("step-{step}"))
}

pub fn save(dir: &Path, lora: &Lora, opt: &AdamW, state: &TrainerState, base_model: &str) -> Result<()> {
    crate::io_util::write_dir_atomic(dir, |tmp| {
        lora.save_peft(tmp, base_model)?;
        let mut tensors = Vec::new();
        for (i, (key, var)) in lora.params().iter().enumerate() {
            tensors.push((format!("{key}.exp_avg"), Tensor::from_slice(&opt.exp_avg[i], var.shape(), var.device())?));
            tensors.push((format!("{key}.exp_avg_sq"), Tensor::from_slice(&opt.exp_avg_sq[i], var.shape(), var.device())?));
        }
        let meta = HashMap::from([("adam_step".to_string(), opt.step.to_string())]);
        st::save(&tmp.join(OPTIMIZER_FILE), &tensors, SaveDType::F32, Some(meta))?;
        let json = serde_json::to_string_pretty(state).expect("state always serialises");
        crate::io_util::write_atomic(&tmp.join(STATE_FILE), json.as_bytes())
    })
}

/// The checkpoint with the highest step under `output_dir/checkpoints`, if any.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output_dir.join("checkpoints")).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let step: usize = n.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    serde_json::from_str(&crate::io_util::read_to_string(&path)?).map_err(|e| Error::format(&path, format!("invalid trainer state: {e}")))
}

/// Restores the optimizer moments saved next to an adapter.
pub fn load_optimizer(dir: &Path, lora: &Lora, opt: &mut AdamW) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors = st::load_f32(&path)?;
    for (i, (key, _)) in lora.params().iter().enumerate() {
        for (suffix, buf) in [("exp_avg", &mut opt.exp_avg[i]), ("exp_avg_sq", &mut opt.exp_avg_sq[i])] {
            let k = format!("{key}.{suffix}");
            let t = tensors.get(&k).ok_or_else(|| Error::format(&path, format!("tensor `{k}` is missing")))?;
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if v.len() != buf.len() {
                return Err(Error::format(&path, format!("tensor `{k}` has {} values, expected {}", v.len(), buf.len())));
            }
            *buf = v;
        }
    }
    let bytes = crate::io_util::read(&path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
    opt.step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adam_step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::format(&path, "metadata `adam_step` is missing"))?;
    Ok(())
}
