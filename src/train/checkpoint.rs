//! Checkpoints: `checkpoints/step-N/` holds the method's adapter folder (PEFT layout where the
//! method has one), the optimizer state, the method's own state (if any) and
//! `trainer_state.json` (step, data position, seed). A checkpoint is written into a temporary
//! folder and renamed into place, so a crash leaves the previous one intact.

use crate::config::TrainConfig;
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::methods::Method;
use crate::optim::{LoadedState, Optimizer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const METHOD_STATE_FILE: &str = "method_state.safetensors";

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
    /// What the run is (see [`plan_identity`]); `--resume` continues only the same run.
    /// Absent in checkpoints written before it was recorded.
    #[serde(default)]
    pub plan: Option<serde_json::Value>,
    /// SHA-256 of the encoded training and validation examples (see [`data_fingerprint`]).
    #[serde(default)]
    pub data_fingerprint: Option<String>,
    /// What the objective's step choices depend on (SASR's gradient norms).
    #[serde(default)]
    pub mix: crate::objectives::MixState,
}

pub fn step_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(super::run_dir::CHECKPOINTS_DIR).join(format!("step-{step}"))
}

/// Writes a checkpoint; `extras` adds the objective's own files (RoSTE's plan).
pub fn save(dir: &Path, method: &dyn Method, opt: &dyn Optimizer, state: &TrainerState, base_model: &str, extras: &dyn Fn(&Path) -> Result<()>) -> Result<()> {
    crate::io_util::write_dir_atomic(dir, |tmp| {
        method.save_checkpoint(tmp, base_model)?;
        extras(tmp)?;
        crate::failpoint::hit("checkpoint");
        let o = opt.state(&method.params())?;
        let meta = HashMap::from([("adam_step".to_string(), o.step.to_string())]);
        st::save(&tmp.join(OPTIMIZER_FILE), &o.tensors, SaveDType::F32, Some(meta))?;
        let extra = method.state()?;
        if !extra.is_empty() {
            st::save(&tmp.join(METHOD_STATE_FILE), &extra, SaveDType::F32, None)?;
        }
        let json = serde_json::to_string_pretty(state).expect("state always serialises");
        crate::io_util::write_atomic(&tmp.join(STATE_FILE), json.as_bytes())
    })
}

/// The checkpoint with the highest step under `output_dir/checkpoints`, if any.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    super::run_dir::checkpoint_dirs(output_dir).into_iter().rev().map(|(_, p)| p).find(|p| p.join(STATE_FILE).is_file())
}

/// Keys that say how a run is carried out, not what it computes: they may differ on `--resume`.
/// (`max_steps`/`num_epochs` may change too; the trainer checks them against the checkpoint's step.)
const RUN_ONLY_KEYS: &[&str] = &["threads", "logging_steps", "save_steps", "eval_steps", "output_dir", "max_steps", "num_epochs"];

/// The plan as what it computes: the run-only keys dropped and file paths made absolute, so the
/// same run started from another working directory compares equal.
pub fn plan_identity(cfg: &TrainConfig) -> serde_json::Value {
    let mut cfg = cfg.clone();
    for p in cfg.file_paths_mut() {
        if let Ok(c) = std::fs::canonicalize(&*p) {
            *p = c;
        }
    }
    let mut v = serde_json::to_value(&cfg).expect("the plan serialises");
    if let Some(map) = v.as_object_mut() {
        for k in RUN_ONLY_KEYS {
            map.remove(*k);
        }
    }
    v
}

/// SHA-256 over every encoded example's tokens and labels: the data a run trains on, whatever
/// files and formats it came from.
pub fn data_fingerprint(train: &[EncodedExample], val: &[EncodedExample]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (tag, set) in [(b"train", train), (b"valid", val)] {
        h.update(tag);
        h.update((set.len() as u64).to_le_bytes());
        for e in set.iter().flat_map(|e| e.sequences()) {
            h.update((e.input_ids.len() as u64).to_le_bytes());
            e.input_ids.iter().for_each(|t| h.update(t.to_le_bytes()));
            e.labels.iter().for_each(|l| h.update(l.to_le_bytes()));
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses to continue, under the current plan, a run recorded with another one, naming the
/// first key that differs and both values. `what` names where the recorded plan came from.
pub fn check_same_plan(recorded: &serde_json::Value, current: &serde_json::Value, what: &Path) -> Result<()> {
    let (Some(old), Some(new)) = (recorded.as_object(), current.as_object()) else {
        return Err(Error::format(what, "the recorded plan is not a JSON object"));
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (a, b) = (old.get(k.as_str()), new.get(k.as_str()));
        if a != b {
            let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
            return Err(Error::config(
                k.as_str(),
                format!(
                    "--resume: the run in {} was started with {k} = {}, this plan says {k} = {}; resuming would silently keep the old value. \
                     Set it back to continue that run, or start a new one with --overwrite or another output_dir",
                    what.display(),
                    show(a),
                    show(b)
                ),
            ));
        }
    }
    Ok(())
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    serde_json::from_str(&crate::io_util::read_to_string(&path)?).map_err(|e| Error::format(&path, format!("invalid trainer state: {e}")))
}

/// Restores the optimizer state and the method's own state saved in a checkpoint.
pub fn load_optimizer(dir: &Path, method: &mut dyn Method, opt: &mut dyn Optimizer) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors = st::load_f32(&path)?;
    let bytes = crate::io_util::read(&path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adam_step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::format(&path, "metadata `adam_step` is missing"))?;
    opt.restore(&method.params(), &LoadedState { tensors, step }, &path)?;
    let state_path = dir.join(METHOD_STATE_FILE);
    let extra = if state_path.is_file() { st::load_f32(&state_path)? } else { HashMap::new() };
    method.restore_state(extra, &state_path)
}
