//! LT-SFT, lottery-ticket sparse fine-tuning (`METHODS.md` §3.3), in one run of two phases:
//! 1. full fine-tuning of the target matrices from `θ0` for `lt_sft_phase1_steps` steps;
//! 2. the `K` entries with the largest `|θ1 − θ0|` over all target matrices form the mask, every
//!    weight goes back to `θ0`, and only the masked entries train for the rest of the run.
//!
//! Both phases add the L1 pull `λ·Σ|θ − θ0| / N` (`lt_sft_l1`, official 0.1; `N` the number of
//! maskable values) through its gradient `λ·sign(θ − θ0) / N`, after clipping. The result is
//! the sparse diff `φ = θ2 − θ0` (the adapter folder), which composes with other diffs by
//! addition ([`crate::formats::sparse_diff::SparseDiff::add`]): `θ0 + φ_task + φ_language`.
//!
//! Choices: `K` (`lt_sft_entries`) defaults to a rank-`lora_r` LoRA's count on the same
//! matrices, so it compares with LoRA at equal budget; phase 1 defaults to half the run; one
//! learning-rate schedule spans both phases (the paper runs each phase as its own training,
//! with its own schedule: use `lr_scheduler = "constant"` to give both the same rate); phase 2
//! starts a new optimizer (zero moments, step count from 0) as a new training would; a single
//! iteration (the paper's `I = 1`).

use super::full::Full;
use super::registry::Entry;
use super::sparse::{self, SparseSite, SparseSites};
use super::targets::TargetModules;
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG};
use crate::error::{Error, Result};
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use crate::optim::{AdamW, AdamWConfig, LoadedState, Optimizer, OptimizerState};
use candle_core::Var;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub const LT_SFT: Entry = Entry {
    name: "lt_sft",
    summary: "LT-SFT: full fine-tuning, then the top-K entries by |θ − θ0| are reset and trained alone (a composable sparse diff); L1 pull to θ0",
    keys: &["lt_sft_entries", "lt_sft_phase1_steps", "lt_sft_l1"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    targets: TargetModules,
    /// `K`; 0: a rank-`r` LoRA's count.
    entries: usize,
    r: usize,
    /// 0: half the run.
    phase1_steps: usize,
    l1: f64,
}

impl Settings {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "target_modules": self.targets.to_json(),
            "lt_sft_entries": self.entries,
            "lora_r": self.r,
            "lt_sft_phase1_steps": self.phase1_steps,
            "lt_sft_l1": self.l1,
        })
    }

    fn from_json(cfg: &serde_json::Value, src: &Path) -> Result<Self> {
        let bad = |k: &str| Error::format(src, format!("field `{k}` is missing or not a number"));
        let int = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(k));
        Ok(Settings {
            targets: TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules").map_err(|e| Error::format(src, e.to_string()))?,
            entries: int("lt_sft_entries")?,
            r: int("lora_r")?,
            phase1_steps: int("lt_sft_phase1_steps")?,
            l1: cfg.get("lt_sft_l1").and_then(|v| v.as_f64()).ok_or_else(|| bad("lt_sft_l1"))?,
        })
    }

    /// `K` for these sites.
    fn k(&self, sites: &[(usize, usize)]) -> usize {
        let all: usize = sites.iter().map(|(m, n)| m * n).sum();
        match self.entries {
            0 => sites.iter().map(|&(m, n)| super::lift::budget(m, n, self.r)).sum::<usize>(),
            k => k,
        }
        .min(all)
    }
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let s = Settings {
        targets: spec.target_modules.clone(),
        entries: spec.usize_or("lt_sft_entries", 0)?,
        r: spec.r,
        phase1_steps: spec.usize_or("lt_sft_phase1_steps", 0)?,
        l1: spec.f64_or("lt_sft_l1", 0.1)?,
    };
    if !(s.l1 >= 0.0 && s.l1.is_finite()) {
        return Err(Error::config("lt_sft_l1", format!("is {}; it must be 0 (no pull) or positive", s.l1)));
    }
    Ok(Box::new(LtSft::new(s, Phase::Dense(Full::new("lt_sft", spec.target_modules.clone())))))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let s = Settings::from_json(cfg, &dir.join(ADAPTER_CONFIG))?;
    let phase = match cfg.get("lt_sft_phase").and_then(|v| v.as_u64()) {
        Some(1) => Phase::Dense(Full::load(model, dir, cfg, "lt_sft")?),
        Some(2) => {
            let sites = SparseSites::load(model, dir)?;
            Phase::Sparse(sites)
        }
        _ => return Err(Error::format(&dir.join(ADAPTER_CONFIG), "field `lt_sft_phase` must be 1 or 2")),
    };
    let mut m = LtSft::new(s, phase);
    m.record_base(model);
    if let Phase::Sparse(sites) = &m.phase {
        *m.switched.lock().unwrap_or_else(|p| p.into_inner()) = Some(sites.sites.clone());
    }
    Ok(Box::new(m))
}

enum Phase {
    /// Phase 1: the target matrices train whole.
    Dense(Full),
    /// Phase 2: the chosen entries train.
    Sparse(SparseSites),
}

pub struct LtSft {
    s: Settings,
    phase: Phase,
    total_steps: usize,
    /// Phase 2's sites, for the optimizer to switch to (shared with it).
    switched: Arc<Mutex<Option<Vec<Arc<SparseSite>>>>>,
    /// `θ0` of each phase-1 site (the L1 pull needs it; phase 2's sites keep their own).
    base: Vec<Vec<f32>>,
}

impl LtSft {
    fn new(s: Settings, phase: Phase) -> Self {
        LtSft { s, phase, total_steps: 0, switched: Arc::new(Mutex::new(None)), base: Vec::new() }
    }

    /// Records `θ0` of the phase-1 sites from the model's (unchanged) base weights.
    fn record_base(&mut self, model: &Llama) {
        if let (Phase::Dense(f), true) = (&self.phase, self.s.l1 > 0.0) {
            let names = f.sites();
            self.base = names.iter().map(|n| model.linears().find(|l| &l.name == n).map_or(Vec::new(), |l| l.weight.to_f32_vec())).collect();
        }
    }

    fn phase1_steps(&self) -> usize {
        match self.s.phase1_steps {
            0 => self.total_steps / 2,
            s => s,
        }
    }

    fn config(&self, base_model: &str) -> serde_json::Value {
        let mut cfg = super::files::method_config("lt_sft", base_model, self.s.to_json());
        cfg["lt_sft_phase"] = match self.phase {
            Phase::Dense(_) => 1,
            Phase::Sparse(_) => 2,
        }
        .into();
        cfg
    }

    /// The end of phase 1: choose the top-K entries by |θ1 − θ0| over all matrices, put every
    /// weight back to θ0, and attach sparse sites training those entries.
    fn switch(&mut self, model: &mut Llama) -> Result<()> {
        let Phase::Dense(full) = &self.phase else { return Ok(()) };
        let names = full.sites();
        let trained: Vec<Vec<f32>> = full.params().iter().map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?;
        let mut bases = Vec::with_capacity(names.len());
        let mut shapes = Vec::with_capacity(names.len());
        for name in &names {
            let lin = model.linears().find(|l| &l.name == name).expect("a trained site is a linear of the model");
            bases.push(lin.weight.to_f32_vec());
            shapes.push(lin.weight.dims());
        }
        let k = self.s.k(&shapes);
        let moved: Vec<Vec<f32>> = trained.iter().zip(&bases).map(|(t, b)| t.iter().zip(b).map(|(t, b)| (t - b).abs()).collect()).collect();
        drop(bases);
        let masks = sparse::global_top_k(&moved, k);
        // Back to θ0: the dense sites come off, sparse ones (θ = θ0) go on.
        for lin in model.linears_mut() {
            if names.contains(&lin.name) {
                lin.hook = None;
            }
        }
        let mut per_site = names.iter().cloned().zip(masks).collect::<std::collections::HashMap<_, _>>();
        let sites = SparseSites::attach(model, &TargetModules::Names(names.clone()), |lin, _| Ok(per_site.remove(&lin.name).unwrap_or_default()))?;
        *self.switched.lock().unwrap_or_else(|p| p.into_inner()) = Some(sites.sites.clone());
        self.phase = Phase::Sparse(sites);
        self.base.clear();
        Ok(())
    }
}

impl Method for LtSft {
    fn name(&self) -> &'static str {
        "lt_sft"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        match &mut self.phase {
            Phase::Dense(full) => full.attach(model)?,
            Phase::Sparse(_) => return Err(Error::Model("lt_sft: already in phase 2".into())),
        }
        self.record_base(model);
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        match &self.phase {
            Phase::Dense(f) => f.params(),
            Phase::Sparse(s) => s.params(),
        }
    }

    fn sites(&self) -> Vec<String> {
        match &self.phase {
            Phase::Dense(f) => f.sites(),
            Phase::Sparse(s) => s.names(),
        }
    }

    fn planned_memory(&self, sites: &[SiteInfo], blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        // Phase 1 is full fine-tuning of the targets: it sets the peak (with θ0 kept for the pull).
        let plan = Full::new("lt_sft", self.s.targets.clone()).planned_memory(sites, blocks)?;
        Ok(plan.map(|p| PlannedMemory { extra_bytes: p.extra_bytes + if self.s.l1 > 0.0 { 4 * p.trainable_params } else { 0 }, ..p }))
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        let dense: Vec<Var> = match &self.phase {
            Phase::Dense(f) => f.params().into_iter().map(|(_, v)| v).collect(),
            Phase::Sparse(_) => Vec::new(),
        };
        Box::new(PhasedAdamW { config, dense: Some(AdamW::new(config, &dense)), sparse: None, switched: self.switched.clone() })
    }

    fn set_total_steps(&mut self, total_steps: usize) {
        self.total_steps = total_steps;
    }

    fn grad_transform(&mut self, grads: &mut [Vec<f32>]) -> Result<()> {
        if self.s.l1 == 0.0 {
            return Ok(());
        }
        // N: the maskable values (every entry of the target matrices).
        let step = (self.s.l1 / (self.sites_entries() as f64).max(1.0)) as f32;
        // λ·sign(θ − θ0)/N, tensor by tensor (θ0 borrowed: it is as large as the targets).
        let pull = |g: &mut [f32], theta: &[f32], theta0: &[f32]| {
            for ((g, p), b) in g.iter_mut().zip(theta).zip(theta0) {
                let d = p - b;
                if d != 0.0 {
                    *g += step * d.signum();
                }
            }
        };
        match &self.phase {
            Phase::Dense(f) => {
                if self.base.is_empty() {
                    return Err(Error::Training("lt_sft: θ0 was not recorded before the first step".into()));
                }
                for ((g, (_, v)), b) in grads.iter_mut().zip(f.params()).zip(&self.base) {
                    pull(g, &v.as_tensor().flatten_all()?.to_vec1::<f32>()?, b);
                }
            }
            Phase::Sparse(s) => {
                for (g, site) in grads.iter_mut().zip(&s.sites) {
                    pull(g, &site.theta().as_tensor().to_vec1::<f32>()?, &site.theta0());
                }
            }
        }
        Ok(())
    }

    fn on_step(&mut self, step: usize, model: &mut Llama) -> Result<()> {
        if step == self.phase1_steps() && step < self.total_steps && matches!(self.phase, Phase::Dense(_)) {
            let t0 = std::time::Instant::now();
            self.switch(model)?;
            let k: usize = match &self.phase {
                Phase::Sparse(s) => s.trained_entries(),
                Phase::Dense(_) => 0,
            };
            crate::note!("lt_sft: phase 1 done at step {step}; the {k} entries that moved most are reset to θ0 and train alone from here ({:.1} s)", t0.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        match &self.phase {
            Phase::Dense(f) => {
                f.save(dir, base_model)?;
                // Full's config, plus this method's settings and phase.
                let path = dir.join(ADAPTER_CONFIG);
                let mut cfg = self.config(base_model);
                cfg["target_modules"] = f.targets().to_json();
                crate::io_util::write_atomic(&path, serde_json::to_string_pretty(&cfg).expect("serialisable").as_bytes())
            }
            Phase::Sparse(s) => s.save(dir, &self.config(base_model)),
        }
    }

    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        match &self.phase {
            Phase::Dense(_) => self.save(dir, base_model),
            Phase::Sparse(s) => s.save_checkpoint(dir, &self.config(base_model)),
        }
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        match &self.phase {
            Phase::Dense(f) => f.merge(model),
            Phase::Sparse(s) => s.merge(model),
        }
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = match &self.phase {
            Phase::Dense(f) => f.describe(),
            Phase::Sparse(s) => s.describe(),
        };
        d["settings"] = self.s.to_json();
        d
    }
}

impl LtSft {
    fn sites_entries(&self) -> usize {
        match &self.phase {
            Phase::Dense(f) => f.num_params(),
            Phase::Sparse(s) => s.sites.iter().map(|s| s.dims().0 * s.dims().1).sum(),
        }
    }
}

/// Phase 1's dense AdamW until the method switches, then a fresh masked AdamW over phase 2's
/// entries (a new optimizer, as a new training would start).
struct PhasedAdamW {
    config: AdamWConfig,
    dense: Option<AdamW>,
    sparse: Option<Box<dyn Optimizer>>,
    switched: Arc<Mutex<Option<Vec<Arc<SparseSite>>>>>,
}

impl PhasedAdamW {
    /// The phase-2 optimizer, created on first need once the method has switched.
    fn follow(&mut self) {
        if self.sparse.is_none() {
            if let Some(sites) = self.switched.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                self.sparse = Some(SparseSites { sites: sites.clone() }.optimizer(self.config));
                self.dense = None;
            }
        }
    }
}

impl Optimizer for PhasedAdamW {
    fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.follow();
        match (&mut self.sparse, &mut self.dense) {
            (Some(s), _) => s.step(params, grads, lr),
            (None, Some(d)) => d.step(params, grads, lr),
            (None, None) => unreachable!("one phase is always active"),
        }
    }

    fn state(&self, params: &[(String, Var)]) -> Result<OptimizerState> {
        if let Some(s) = &self.sparse {
            return s.state(params);
        }
        if let Some(sites) = self.switched.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // Switched after the last step: phase 2's optimizer, not yet stepped.
            return SparseSites { sites: sites.clone() }.optimizer(self.config).state(params);
        }
        self.dense.as_ref().expect("phase 1").state(params)
    }

    fn restore(&mut self, params: &[(String, Var)], state: &LoadedState, src: &Path) -> Result<()> {
        self.follow();
        match (&mut self.sparse, &mut self.dense) {
            (Some(s), _) => s.restore(params, state, src),
            (None, Some(d)) => d.restore(params, state, src),
            (None, None) => unreachable!("one phase is always active"),
        }
    }
}
