//! What a run on preference pairs (`objective = "dpo"`) needs around the loop: the data must be
//! pairs (and only then), and every pair's reference log-probabilities are computed once before
//! training and kept in the run folder, so `--resume` reuses them instead of recomputing.

use super::dataset::Prepared;
use super::run_dir::REFERENCE_LOGPS_FILE;
use crate::config::TrainConfig;
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::models::Llama;
use crate::objectives::{dpo, Objective};
use serde::{Deserialize, Serialize};

/// Pairs for DPO, plain examples for every other objective.
pub fn check_objective_data(cfg: &TrainConfig, objective: &dyn Objective, data: &Prepared) -> Result<()> {
    let wants_pairs = objective.needs_reference_logps();
    let count = |set: &[EncodedExample]| set.iter().filter(|e| e.rejected.is_some()).count();
    for (what, set) in [("datasets", &data.train), ("val_set", &data.val)] {
        let pairs = count(set);
        if wants_pairs && pairs < set.len() {
            return Err(Error::config(what, format!("objective = \"{}\" trains on preference pairs ({{\"prompt\", \"chosen\", \"rejected\"}}), and {} of {} examples are not pairs", cfg.objective, set.len() - pairs, set.len())));
        }
        if !wants_pairs && pairs > 0 {
            return Err(Error::config(what, format!("holds {pairs} preference pairs ({{\"prompt\", \"chosen\", \"rejected\"}}); they train with objective = \"dpo\", and this plan has objective = \"{}\"", cfg.objective)));
        }
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Cached {
    data_fingerprint: String,
    /// `[chosen, rejected]` per pair, training pairs then validation pairs.
    train: Vec<[f32; 2]>,
    val: Vec<[f32; 2]>,
}

fn stored(set: &[EncodedExample]) -> Vec<[f32; 2]> {
    set.iter().map(|e| [e.reference_logp.unwrap_or(f32::NAN), e.rejected.as_ref().and_then(|r| r.reference_logp).unwrap_or(f32::NAN)]).collect()
}

fn restore(set: &mut [EncodedExample], values: &[[f32; 2]]) {
    for (e, v) in set.iter_mut().zip(values) {
        e.reference_logp = Some(v[0]);
        if let Some(r) = e.rejected.as_mut() {
            r.reference_logp = Some(v[1]);
        }
    }
}

/// Fills in the reference log-probabilities of every pair: from the run folder when it holds
/// them for this data, else by one pass of the reference model (the method switched off) over
/// the training and validation pairs, saved for `--resume`.
pub fn reference_logps(cfg: &TrainConfig, model: &Llama, data: &mut Prepared, fingerprint: &str, pad_id: u32) -> Result<()> {
    let path = cfg.output_dir.join(REFERENCE_LOGPS_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        // A cache that cannot be used is recomputed (and replaced), saying why.
        let why = match serde_json::from_str::<Cached>(&text) {
            Err(e) => format!("is not a valid cache ({e})"),
            Ok(c) if c.data_fingerprint != fingerprint || c.train.len() != data.train.len() || c.val.len() != data.val.len() => {
                "was computed for other data".to_string()
            }
            Ok(c) if c.train.iter().chain(&c.val).flatten().any(|v| !v.is_finite() || *v > 0.0) => {
                "holds values that are not log-probabilities (non-finite or positive)".to_string()
            }
            Ok(c) => {
                restore(&mut data.train, &c.train);
                restore(&mut data.val, &c.val);
                crate::note!("reference log-probabilities: read from {}", path.display());
                return Ok(());
            }
        };
        crate::note!("note: {} {why}; computing the reference log-probabilities again", path.display());
    }
    let ticker = std::cell::RefCell::new(crate::console::Ticker::new("reference log-probabilities", data.train.len() + data.val.len(), "pairs"));
    let ticker = &ticker;
    let report = |base: usize| move |done: usize, _: usize| ticker.borrow_mut().tick(base + done, None);
    dpo::compute_reference_logps(model, &mut data.train, cfg.micro_batch_size, pad_id, report(0))?;
    let n = data.train.len();
    dpo::compute_reference_logps(model, &mut data.val, cfg.micro_batch_size, pad_id, report(n))?;
    let cached = Cached { data_fingerprint: fingerprint.to_string(), train: stored(&data.train), val: stored(&data.val) };
    crate::io_util::write_atomic(&path, serde_json::to_string(&cached).expect("serialisable").as_bytes())
}
