//! SaRA (`METHODS.md` §3.2): trains the entries of small magnitude, `|θ0| < τ`, which matter
//! least to the pre-trained model, with a nuclear-norm penalty that keeps the learned sparse
//! matrix low-rank, and one progressive re-selection that freezes the entries which have grown
//! past `τ` (now "effective") and keeps training the rest.
//!
//! - Selection: `|θ0| < sara_threshold` (τ, official 2e-3) on the `lora_target_modules`
//!   linears. The paper selects in every tensor; embeddings, norms and the head are left out
//!   here (they are not linear sites), so the count compares with LoRA on the same sites.
//! - Penalty: `λ·‖P‖_*` (`sara_rank_lambda`, official 5e-4), `P` the matrix holding the
//!   current trained values `θ[M]` and zeros elsewhere, evaluated as the official optimiser does
//!   on one randomly chosen eligible matrix per step (both sides > 64). Its subgradient
//!   `U·Vᵀ` (thin SVD of `P`), read at the trained entries, is added to their gradient after
//!   clipping, as an optimiser-side regulariser; the logged loss is the task loss.
//! - Progressive step `T_p` (`sara_progressive_step`; 0, the default, means half the run,
//!   where the official 2500 of a few thousand steps falls): `M' = M ∧ (|θ| < τ)`, with the
//!   optimizer started afresh for `M'` (zero moments; the step count that bias correction uses
//!   goes on).

use super::registry::Entry;
use super::sparse::{self, SparseSites};
use super::targets::TargetModules;
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG};
use crate::error::{Error, Result};
use crate::linalg;
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use crate::optim::{AdamWConfig, Optimizer};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub const SARA: Entry = Entry {
    name: "sara",
    summary: "SaRA: trains the small-magnitude entries |θ0| < τ of each target matrix, nuclear-norm regularised, with one progressive re-selection",
    keys: &["sara_threshold", "sara_rank_lambda", "sara_progressive_step"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

/// The smallest side a matrix needs for the rank penalty (the official rule).
const PENALTY_MIN_SIDE: usize = 64;

const STEP_STATE: &str = "sara.step";

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    targets: TargetModules,
    threshold: f64,
    rank_lambda: f64,
    /// 0: half the run.
    progressive_step: usize,
    seed: u64,
}

impl Settings {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "target_modules": self.targets.to_json(),
            "sara_threshold": self.threshold,
            "sara_rank_lambda": self.rank_lambda,
            "sara_progressive_step": self.progressive_step,
            "seed": self.seed,
        })
    }

    fn from_json(cfg: &serde_json::Value, src: &Path) -> Result<Self> {
        let bad = |k: &str| Error::format(src, format!("field `{k}` is missing or not a number"));
        let num = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).ok_or_else(|| bad(k));
        let int = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).ok_or_else(|| bad(k));
        Ok(Settings {
            targets: TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules").map_err(|e| Error::format(src, e.to_string()))?,
            threshold: num("sara_threshold")?,
            rank_lambda: num("sara_rank_lambda")?,
            progressive_step: int("sara_progressive_step")? as usize,
            seed: int("seed")?,
        })
    }

    /// The entries of `w` below the threshold in magnitude, among `among` (all when `None`).
    fn small(&self, w: &[f32], among: Option<&[u32]>) -> Vec<u32> {
        let tau = self.threshold as f32;
        match among {
            Some(m) => m.iter().copied().filter(|&i| w[i as usize].abs() < tau).collect(),
            None => (0..w.len() as u32).filter(|&i| w[i as usize].abs() < tau).collect(),
        }
    }
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let s = Settings {
        targets: spec.target_modules.clone(),
        threshold: spec.f64_or("sara_threshold", 2e-3)?,
        rank_lambda: spec.f64_or("sara_rank_lambda", 5e-4)?,
        progressive_step: spec.usize_or("sara_progressive_step", 0)?,
        seed: spec.seed,
    };
    if !(s.threshold > 0.0 && s.threshold.is_finite()) {
        return Err(Error::config("sara_threshold", format!("is {}; it must be a positive magnitude (official 2e-3)", s.threshold)));
    }
    if !(s.rank_lambda >= 0.0 && s.rank_lambda.is_finite()) {
        return Err(Error::config("sara_rank_lambda", format!("is {}; it must be 0 (no penalty) or positive", s.rank_lambda)));
    }
    Ok(Box::new(Sara { s, sites: SparseSites::default(), total_steps: 0, step: 0 }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let s = Settings::from_json(cfg, &dir.join(ADAPTER_CONFIG))?;
    Ok(Box::new(Sara { s, sites: SparseSites::load(model, dir)?, total_steps: 0, step: 0 }))
}

pub struct Sara {
    s: Settings,
    sites: SparseSites,
    total_steps: usize,
    /// Optimizer steps done (the penalty's draw depends on it).
    step: usize,
}

impl Sara {
    fn config(&self, base_model: &str) -> serde_json::Value {
        super::files::method_config("sara", base_model, self.s.to_json())
    }

    fn progressive_step(&self) -> usize {
        match self.s.progressive_step {
            0 => self.total_steps / 2,
            s => s,
        }
    }
}

/// `λ·∂‖P‖_*/∂θ` at the trained entries: `λ·(U·Vᵀ)[r, c]` for each, from the thin SVD of `P`.
pub fn nuclear_subgradient(rows: usize, cols: usize, mask: &[u32], theta: &[f32], lambda: f64) -> Result<Vec<f32>> {
    let mut p = vec![0f32; rows * cols];
    mask.iter().zip(theta).for_each(|(&i, &t)| p[i as usize] = t);
    let d = linalg::svd(&linalg::from_rows(rows, cols, &p))?;
    let k = d.s.len();
    Ok(mask
        .iter()
        .map(|&i| {
            let (r, c) = (i as usize / cols, i as usize % cols);
            (lambda * (0..k).map(|j| d.u[(r, j)] * d.vt[(j, c)]).sum::<f64>()) as f32
        })
        .collect())
}

impl Method for Sara {
    fn name(&self) -> &'static str {
        "sara"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let s = self.s.clone();
        self.sites = SparseSites::attach(model, &s.targets, |_, w| Ok(s.small(w, None)))?;
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.params()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.names()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        // The count depends on the weights, unknown before loading: plan for the threshold's
        // share of a Gaussian of the matrix's typical spread would be a guess, so plan for
        // LoRA-scale 1/8 of the entries and let run.json report the true count.
        let chosen = self.s.targets.select(sites, "lora_target_modules")?;
        let entries: u64 = chosen.iter().map(|s| (s.out_features * s.in_features / 8) as u64).sum();
        Ok(Some(PlannedMemory { trainable_params: entries, extra_bytes: entries * sparse::BYTES_PER_ENTRY, floats_per_token: 0, ..Default::default() }))
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        self.sites.optimizer(config)
    }

    fn set_total_steps(&mut self, total_steps: usize) {
        self.total_steps = total_steps;
    }

    fn grad_transform(&mut self, grads: &mut [Vec<f32>]) -> Result<()> {
        if self.s.rank_lambda == 0.0 {
            return Ok(());
        }
        let eligible: Vec<usize> = (0..self.sites.sites.len())
            .filter(|&i| {
                let (r, c) = self.sites.sites[i].dims();
                r.min(c) > PENALTY_MIN_SIDE && self.sites.sites[i].trained_entries() > 0
            })
            .collect();
        if eligible.is_empty() {
            return Ok(());
        }
        let pick = eligible[SplitMix64::derive(self.s.seed, &[0x5a7a, self.step as u64]).below(eligible.len() as u64) as usize];
        let site = &self.sites.sites[pick];
        let (rows, cols) = site.dims();
        let theta: Vec<f32> = site.theta().as_tensor().to_vec1()?;
        let (mask, lambda) = (site.mask(), self.s.rank_lambda);
        // In a thread of its own, so that the SVD's buffers come from another malloc arena: in
        // the main one they fragmented the heap, and the next step's activations peaked 1 GB
        // higher on SmolLM2 (measured with `bench --method sara`; 1.52 GB this way).
        let sub = std::thread::scope(|sc| sc.spawn(|| nuclear_subgradient(rows, cols, &mask, &theta, lambda)).join())
            .map_err(|_| Error::Training("sara: the rank penalty's SVD panicked".into()))??;
        grads[pick].iter_mut().zip(sub).for_each(|(g, s)| *g += s);
        Ok(())
    }

    fn on_step(&mut self, step: usize, model: &mut Llama) -> Result<()> {
        self.step = step;
        if step != self.progressive_step() || step >= self.total_steps {
            return Ok(());
        }
        let before = self.sites.trained_entries();
        let s = &self.s;
        self.sites.reselect(model, true, |site, w| Ok(s.small(w, Some(&site.mask()))))?;
        let after = self.sites.trained_entries();
        crate::note!("sara: progressive step {step}: {} of {before} entries grew past τ = {} and are frozen; {after} train on", before - after, s.threshold);
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(STEP_STATE.to_string(), Tensor::from_vec(vec![self.step as f32], 1, &Device::Cpu)?)])
    }

    fn restore_state(&mut self, mut state: HashMap<String, Tensor>, src: &Path) -> Result<()> {
        let t = state.remove(STEP_STATE).ok_or_else(|| Error::format(src, format!("tensor `{STEP_STATE}` is missing")))?;
        self.step = t.to_vec1::<f32>()?.first().copied().unwrap_or(0.0) as usize;
        match state.keys().min() {
            Some(k) => Err(Error::format(src, format!("tensor `{k}`: method `sara` keeps no such state"))),
            None => Ok(()),
        }
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.sites.save(dir, &self.config(base_model))
    }

    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.sites.save_checkpoint(dir, &self.config(base_model))
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.sites.merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.sites.describe();
        d["settings"] = self.s.to_json();
        d
    }
}
