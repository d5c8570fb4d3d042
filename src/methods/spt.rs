//! SPT, sensitivity-aware parameter budget allocation (`METHODS.md` §3.4): a sensitivity pass
//! ranks every entry of the target matrices by `S = Σ_batches (∂L/∂θ)²`; the `τ` most
//! sensitive entries (`spt_budget`) are the budget; then per matrix, if it holds at least
//! `N_struct / α` of them (`N_struct = r(m + n)`, a rank-`r` LoRA's count; `α = spt_alpha`,
//! default 10) it is tuned **structurally**, with a LoRA of rank `lora_r`, and otherwise only its
//! sensitive entries train (**unstructured**, a sparse site). Matrices with none stay frozen.
//!
//! Choices: the sensitivity pass runs on the run's first `spt_batches` micro-batches (default
//! 8, as the official 8 batches) with the SFT loss of the base model; `τ` defaults to a
//! rank-`lora_r` LoRA's count over the targets; the spec's adapters-as-structure alternative and
//! the vector rule (norms, biases: not linear sites here) are left out. The adapter folder holds
//! the sparse diff (`adapter_model.safetensors`) and the LoRA factors under PEFT's keys
//! ([`LORA_FILE`]); merging adds both.

use super::full::Full;
use super::lora::{Lora, LoraConfig};
use super::registry::Entry;
use super::sparse::{self, SparseSites};
use super::targets::TargetModules;
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, METHOD_KEY};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::models::{BlockSiteInfo, ForwardCtx, Llama, SiteInfo};
use crate::optim::{AdamW, AdamWConfig, LoadedState, Optimizer, OptimizerState};
use candle_core::Var;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const SPT: Entry = Entry {
    name: "spt",
    summary: "SPT: a sensitivity pass picks the budget's most sensitive entries; matrices holding many get a LoRA, the others train just those entries",
    keys: &["spt_budget", "spt_alpha", "spt_batches"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

/// The LoRA part of an SPT adapter folder (PEFT keys).
pub const LORA_FILE: &str = "spt_lora.safetensors";

/// How one matrix is tuned.
#[derive(Debug, Clone, PartialEq)]
pub enum Allocation {
    /// A LoRA of the run's rank.
    Structured,
    /// These entries (flat indices, increasing).
    Unstructured(Vec<u32>),
    Frozen,
}

/// SPT's rule: the `tau` most sensitive entries over all matrices (`sensitivity[l]` holds
/// matrix `l`'s scores, `shapes[l]` its `(rows, cols)`); a matrix holding at least
/// `r(m + n) / alpha` of them is structured, one holding fewer (but some) unstructured.
pub fn allocate(sensitivity: &[Vec<f32>], shapes: &[(usize, usize)], tau: usize, r: usize, alpha: f64) -> Vec<Allocation> {
    sparse::global_top_k(sensitivity, tau)
        .into_iter()
        .zip(shapes)
        .map(|(mask, &(m, n))| {
            if mask.is_empty() {
                Allocation::Frozen
            } else if mask.len() as f64 >= (r * (m + n)) as f64 / alpha {
                Allocation::Structured
            } else {
                Allocation::Unstructured(mask)
            }
        })
        .collect()
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let alpha = spec.f64_or("spt_alpha", 10.0)?;
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(Error::config("spt_alpha", format!("is {alpha}; it must be positive (official 10)")));
    }
    let batches = spec.usize_or("spt_batches", 8)?;
    if batches == 0 {
        return Err(Error::config("spt_batches", "must be at least 1: the sensitivity pass needs data"));
    }
    Ok(Box::new(Spt {
        targets: spec.target_modules.clone(),
        lora_config: LoraConfig { target_modules: TargetModules::Names(Vec::new()), ..spec.lora_config() },
        budget: spec.usize_or("spt_budget", 0)?,
        alpha,
        batches,
        seed: spec.seed,
        plan: None,
        lora: None,
        sparse: SparseSites::default(),
    }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let src = dir.join(ADAPTER_CONFIG);
    let bad = |k: &str| Error::format(&src, format!("field `{k}` is missing or has the wrong type"));
    let num = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).ok_or_else(|| bad(k));
    let structural = TargetModules::from_json(cfg.get("structured").ok_or_else(|| bad("structured"))?, "structured").map_err(|e| Error::format(&src, e.to_string()))?;
    let lora_config = LoraConfig {
        r: num("lora_r")? as usize,
        alpha: num("lora_alpha")?,
        dropout: num("lora_dropout")? as f32,
        target_modules: structural.clone(),
        use_rslora: cfg.get("use_rslora").and_then(|v| v.as_bool()).ok_or_else(|| bad("use_rslora"))?,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
    };
    let lora = match &structural {
        TargetModules::Names(n) if n.is_empty() => None,
        _ => {
            let path = dir.join(LORA_FILE);
            Some(Lora::attach_tensors(model, lora_config.clone(), st::load_f32(&path)?, &path)?)
        }
    };
    let sparse = SparseSites::load(model, dir)?;
    Ok(Box::new(Spt {
        targets: TargetModules::from_json(cfg.get("target_modules").ok_or_else(|| bad("target_modules"))?, "target_modules").map_err(|e| Error::format(&src, e.to_string()))?,
        lora_config,
        budget: num("spt_budget")? as usize,
        alpha: num("spt_alpha")?,
        batches: num("spt_batches")? as usize,
        seed: 0,
        plan: None,
        lora,
        sparse,
    }))
}

pub struct Spt {
    targets: TargetModules,
    /// The LoRA settings; its targets are the structured matrices.
    lora_config: LoraConfig,
    /// `τ`; 0: a rank-`r` LoRA's count over the targets.
    budget: usize,
    alpha: f64,
    batches: usize,
    seed: u64,
    /// Per target site, its allocation (after the sensitivity pass).
    plan: Option<Vec<(String, Allocation)>>,
    lora: Option<Lora>,
    sparse: SparseSites,
}

impl Spt {
    /// `S = Σ (∂L/∂W)²` per entry of each target matrix, over `batches`, with the SFT loss.
    fn sensitivity(model: &mut Llama, names: &[String], batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        let mut probe = Full::new("spt", TargetModules::Names(names.to_vec()));
        probe.attach(model)?;
        let params: Vec<Var> = probe.params().into_iter().map(|(_, v)| v).collect();
        let mut s: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.elem_count()]).collect();
        for b in batches.iter().filter(|b| b.n_targets > 0) {
            let nll = model.nll(&b.input_ids, Arc::new(b.targets.clone()), b.batch_size, b.seq_len, &ForwardCtx::train(0).over(b))?;
            let store = nll.sum_all()?.affine(1.0 / b.n_targets as f64, 0.0)?.backward()?;
            for (p, acc) in params.iter().zip(s.iter_mut()) {
                if let Some(g) = store.get(p.as_tensor()) {
                    let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
                    acc.iter_mut().zip(g).for_each(|(a, g)| *a += g * g);
                }
            }
        }
        for lin in model.linears_mut() {
            if names.contains(&lin.name) {
                lin.hook = None;
            }
        }
        Ok(s)
    }

    fn config(&self, base_model: &str) -> serde_json::Value {
        let c = &self.lora_config;
        serde_json::json!({
            METHOD_KEY: "spt",
            "base_model_name_or_path": base_model,
            "target_modules": self.targets.to_json(),
            "structured": c.target_modules.to_json(),
            "unstructured": self.sparse.names(),
            "lora_r": c.r, "lora_alpha": c.alpha, "lora_dropout": crate::io_util::f32_json(c.dropout), "use_rslora": c.use_rslora,
            "spt_budget": self.budget, "spt_alpha": self.alpha, "spt_batches": self.batches,
            "ferrotune_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn lora_params(&self) -> Vec<(String, Var)> {
        self.lora.as_ref().map_or(Vec::new(), |l| l.params())
    }
}

impl Method for Spt {
    fn name(&self) -> &'static str {
        "spt"
    }

    fn init_batches(&self) -> usize {
        self.batches
    }

    fn prepare(&mut self, model: &mut Llama, batches: &[Batch]) -> Result<()> {
        let sites: Vec<SiteInfo> = self.targets.select(&model.sites(), "lora_target_modules")?.into_iter().cloned().collect();
        let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
        let shapes: Vec<(usize, usize)> = sites.iter().map(|s| (s.out_features, s.in_features)).collect();
        let s = Self::sensitivity(model, &names, batches)?;
        let r = self.lora_config.r;
        let tau = match self.budget {
            0 => shapes.iter().map(|&(m, n)| super::lift::budget(m, n, r)).sum(),
            t => t,
        };
        let plan: Vec<(String, Allocation)> = names.into_iter().zip(allocate(&s, &shapes, tau, r, self.alpha)).collect();
        let count = |f: fn(&Allocation) -> bool| plan.iter().filter(|(_, a)| f(a)).count();
        crate::note!(
            "spt: of {} matrices, {} get a LoRA, {} train their sensitive entries, {} stay frozen (τ = {tau})",
            plan.len(),
            count(|a| matches!(a, Allocation::Structured)),
            count(|a| matches!(a, Allocation::Unstructured(_))),
            count(|a| matches!(a, Allocation::Frozen))
        );
        self.plan = Some(plan);
        Ok(())
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let plan = self.plan.clone().ok_or_else(|| Error::Training("spt: attach before the sensitivity pass".into()))?;
        let structured: Vec<String> = plan.iter().filter(|(_, a)| *a == Allocation::Structured).map(|(n, _)| n.clone()).collect();
        let mut masks: BTreeMap<String, Vec<u32>> = plan.into_iter().filter_map(|(n, a)| if let Allocation::Unstructured(m) = a { Some((n, m)) } else { None }).collect();
        self.lora_config.target_modules = TargetModules::Names(structured.clone());
        if !structured.is_empty() {
            self.lora = Some(Lora::attach(model, self.lora_config.clone(), self.seed)?);
        }
        if !masks.is_empty() {
            let names = TargetModules::Names(masks.keys().cloned().collect());
            self.sparse = SparseSites::attach(model, &names, |lin, _| Ok(masks.remove(&lin.name).unwrap_or_default()))?;
        }
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.lora_params();
        p.extend(self.sparse.params());
        p
    }

    fn sites(&self) -> Vec<String> {
        let mut s: Vec<String> = self.lora.as_ref().map_or(Vec::new(), |l| l.sites.iter().map(|x| x.site.clone()).collect());
        s.extend(self.sparse.names());
        s
    }

    fn planned_memory(&self, sites: &[SiteInfo], blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        // The sensitivity pass forms every target's full gradient once: full fine-tuning's
        // footprint; training after it holds at most a LoRA's worth plus masks.
        Full::new("spt", self.targets.clone()).planned_memory(sites, blocks)
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        let dense: Vec<Var> = self.lora_params().into_iter().map(|(_, v)| v).collect();
        Box::new(SplitAdamW { n_dense: dense.len(), dense: AdamW::new(config, &dense), sparse: self.sparse.optimizer(config) })
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.sparse.save(dir, &self.config(base_model))?;
        if self.lora.is_some() {
            st::save(&dir.join(LORA_FILE), &super::files::param_tensors(self.lora_params()), SaveDType::F32, None)?;
        }
        Ok(())
    }

    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.save(dir, base_model)?;
        self.sparse.save_trained(dir)
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        if let Some(l) = &self.lora {
            l.merge_into(model)?;
        }
        self.sparse.merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.sparse.describe();
        d["structured"] = self.lora.as_ref().map_or(Vec::new(), |l| l.sites.iter().map(|x| x.site.clone()).collect::<Vec<_>>()).into();
        d["lora_params"] = self.lora_params().iter().map(|(_, v)| v.elem_count()).sum::<usize>().into();
        d["spt_alpha"] = self.alpha.into();
        d
    }
}

/// AdamW over the LoRA factors (the first `n_dense` parameters) and masked AdamW over the
/// sparse entries, stepping together.
struct SplitAdamW {
    n_dense: usize,
    dense: AdamW,
    sparse: Box<dyn Optimizer>,
}

impl Optimizer for SplitAdamW {
    fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        let n = self.n_dense;
        self.dense.step(&params[..n], &grads[..n], lr)?;
        self.sparse.step(&params[n..], &grads[n..], lr)
    }

    fn state(&self, params: &[(String, Var)]) -> Result<OptimizerState> {
        let n = self.n_dense;
        let mut d = Optimizer::state(&self.dense, &params[..n])?;
        let s = self.sparse.state(&params[n..])?;
        d.tensors.extend(s.tensors);
        Ok(OptimizerState { tensors: d.tensors, step: d.step.max(s.step) })
    }

    fn restore(&mut self, params: &[(String, Var)], state: &LoadedState, src: &Path) -> Result<()> {
        let n = self.n_dense;
        Optimizer::restore(&mut self.dense, &params[..n], state, src)?;
        self.sparse.restore(&params[n..], state, src)
    }
}
