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

use super::full::Full;
use super::registry::Entry;
use super::targets::TargetModules;
use super::{Method, MethodSpec, PlannedMemory};
use crate::error::{Error, Result};
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use crate::optim::{AdamWConfig, Optimizer};
use crate::rng::SplitMix64;
use candle_core::{Tensor, Var};
use std::collections::{BTreeMap, HashMap};
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
    let stage = spec.usize_or("hft_stage", 0)? as u64;
    Ok(Box::new(Hft { seed: spec.seed, stage, full: None }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let num = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).ok_or_else(|| Error::format(&dir.join(super::ADAPTER_CONFIG), format!("field `{k}` is missing or not a whole number")));
    Ok(Box::new(Hft { seed: num("hft_seed")?, stage: num("hft_stage")?, full: Some(Full::load(model, dir, cfg, "hft")?) }))
}

/// `k` of `0..n`, drawn without replacement, increasing.
fn choose(rng: &mut SplitMix64, n: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut chosen = idx[..k].to_vec();
    chosen.sort_unstable();
    chosen
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
    let one_mlp = choose(&mut rng, n_layers, n_layers / 2);
    let mut out = Vec::new();
    for (li, (_, layer_sites)) in layers.iter().enumerate() {
        let pick = |names: &[&str], k: usize, rng: &mut SplitMix64| -> Vec<String> {
            let present: Vec<&&SiteInfo> = names.iter().filter_map(|n| layer_sites.iter().find(|s| s.short_name() == *n)).collect();
            choose(rng, present.len(), k.min(present.len())).into_iter().map(|i| present[i].name.clone()).collect()
        };
        out.extend(pick(&ATTENTION, 2, &mut rng));
        let mlp = if one_mlp.contains(&li) { 1 } else { 2 };
        out.extend(pick(&MLP, mlp, &mut rng));
    }
    out
}

pub struct Hft {
    seed: u64,
    stage: u64,
    /// The trained matrices, once chosen.
    full: Option<Full>,
}

impl Hft {
    fn full(&self) -> &Full {
        self.full.as_ref().expect("HFT is used only once attached")
    }
}

impl Method for Hft {
    fn name(&self) -> &'static str {
        "hft"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let chosen = select(&model.sites(), self.seed, self.stage);
        if chosen.is_empty() {
            return Err(Error::Model("hft: the model has no block projections (q/k/v/o_proj, gate/up/down_proj) to choose from".into()));
        }
        let mut full = Full::new("hft", TargetModules::Names(chosen));
        full.attach(model)?;
        self.full = Some(full);
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.full.as_ref().map_or(Vec::new(), |f| f.params())
    }

    fn sites(&self) -> Vec<String> {
        self.full.as_ref().map_or(Vec::new(), |f| f.sites())
    }

    fn planned_memory(&self, sites: &[SiteInfo], blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        Full::new("hft", TargetModules::Names(select(sites, self.seed, self.stage))).planned_memory(sites, blocks)
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        self.full().optimizer(config)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.full().state()
    }

    fn restore_state(&mut self, state: HashMap<String, Tensor>, src: &Path) -> Result<()> {
        self.full.as_mut().expect("attached").restore_state(state, src)
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.full().save(dir, base_model)?;
        // The draw, so a reloaded adapter says which stage it was.
        let path = dir.join(super::ADAPTER_CONFIG);
        let mut cfg: serde_json::Value = serde_json::from_str(&crate::io_util::read_to_string(&path)?).map_err(|e| Error::format(&path, e.to_string()))?;
        cfg["hft_seed"] = self.seed.into();
        cfg["hft_stage"] = self.stage.into();
        crate::io_util::write_atomic(&path, serde_json::to_string_pretty(&cfg).expect("serialisable").as_bytes())
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.full().merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.full.as_ref().map_or(serde_json::json!({}), |f| f.describe());
        d["hft_stage"] = self.stage.into();
        d["trained_modules"] = self.sites().into();
        d
    }
}
