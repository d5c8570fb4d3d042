//! HFT, Half Fine-Tuning (`METHODS.md` §3.5): half of the model's block projections train
//! (whole matrices, as full fine-tuning trains them) and the other half stay frozen, which the
//! paper reads as a regulariser that keeps prior knowledge. The selection is redrawn for every
//! fine-tuning stage.
//!
//! The rule (flagged unconfirmed in the spec, from a re-implementation): in every layer 2 of the
//! 4 attention projections (q, k, v, o) train; of the 3 MLP projections (gate, up, down), a
//! random half of the layers train 1 and the other layers train 2, so over every pair of layers
//! exactly half of the projections train. With an odd number of layers the odd one out trains 2
//! of its MLP projections (⌊L/2⌋ layers train 1).
//!
//! Choices: embeddings, norms and the LM head stay frozen (the spec leaves them open; frozen is
//! what LoRA-style runs compare against); the draw comes from the run's `seed` and
//! `hft_stage` (default 0): a later stage (SFT, then DPO, …) sets `hft_stage = 1, 2, …` to
//! redraw with the same seed. The adapter holds the trained matrices, as `full`'s does.

use super::full::Selected;
use super::registry::Entry;
use super::{Method, MethodSpec};
use crate::error::{Error, Result};
use crate::models::{Llama, SiteInfo};
use crate::rng::SplitMix64;
use std::collections::BTreeMap;
use std::path::Path;

pub const HFT: Entry = Entry {
    name: "hft",
    summary: "Half Fine-Tuning: half of the block projections train whole (2 of 4 attention per layer, 1 or 2 of 3 MLP), redrawn per stage (hft_stage)",
    keys: &["hft_stage"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

const ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let stage = spec.usize_or("hft_stage", 0)?;
    Ok(Box::new(Selected::new("hft", rule, serde_json::json!({ "seed": spec.seed, "hft_stage": stage }))))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    Ok(Box::new(Selected::load(model, dir, cfg, "hft", rule)?))
}

fn rule(sites: &[SiteInfo], settings: &serde_json::Value) -> Result<Vec<String>> {
    let num = |k: &str| settings.get(k).and_then(|v| v.as_u64()).ok_or_else(|| Error::Model(format!("hft: setting `{k}` is missing")));
    let chosen = select(sites, num("seed")?, num("hft_stage")?);
    if chosen.is_empty() {
        return Err(Error::Model("hft: the model has no block projections (q/k/v/o_proj, gate/up/down_proj) to choose from".into()));
    }
    Ok(chosen)
}

/// The projections HFT trains among `sites` (full names), for `seed` and `stage`. Layers are
/// the sites' `model.layers.<i>.` prefixes; sites of other names are never chosen.
pub fn select(sites: &[SiteInfo], seed: u64, stage: u64) -> Vec<String> {
    let mut layers: BTreeMap<usize, Vec<&SiteInfo>> = BTreeMap::new();
    for s in sites {
        let layer = s.name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
        if let Some(i) = layer {
            layers.entry(i).or_default().push(s);
        }
    }
    let mut rng = SplitMix64::derive(seed, &[0x4af7, stage]);
    let n_layers = layers.len();
    let one_mlp = rng.choose(n_layers, n_layers / 2);
    let mut out = Vec::new();
    for (li, (_, layer_sites)) in layers.iter().enumerate() {
        let pick = |names: &[&str], k: usize, rng: &mut SplitMix64| -> Vec<String> {
            let present: Vec<&&SiteInfo> = names.iter().filter_map(|n| layer_sites.iter().find(|s| s.short_name() == *n)).collect();
            rng.choose(present.len(), k.min(present.len())).into_iter().map(|i| present[i].name.clone()).collect()
        };
        out.extend(pick(&ATTENTION, 2, &mut rng));
        let mlp = if one_mlp.contains(&li) { 1 } else { 2 };
        out.extend(pick(&MLP, mlp, &mut rng));
    }
    out
}

