//! GreenTrainer (`METHODS.md` §3.6): trains the whole weights of the linear sites that buy the
//! most loss reduction within a FLOPs budget for the backward pass.
//!
//! - Cost model ([`CostModel`]): the sites in backward order (output to input); per site the
//!   FLOPs of its weight gradient `t_dw = 2·m·n` and of pushing the activation gradient through
//!   it `t_dy = 2·m·n` per token. Attention's backward (`8·T·q` per token and layer, the
//!   benchmark's count) is paid to get below a layer's `o_proj`, so it is part of that site's
//!   `t_dy`; the LM head's input gradient (`2·V·d`) is paid by any selection. The forward and the
//!   full backward add up to the FLOPs `bench` counts for full fine-tuning (tested).
//! - Importance, on the run's first micro-batch: every candidate trains for one AdamW step at the
//!   run's learning rate, `Δw` is recorded, the gradient `g` at the new point is taken, and
//!   `I_k = −Σ g_k ⊙ Δw_k`, normalised by `max |I|`; the weights are then put back.
//! - Selection ([`select`]): maximise `Σ I_k` over selections whose backward costs at most
//!   `ρ_bp·T_bp`, `ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp` floored at 0.05, by dynamic programming
//!   over (deepest selected site, time quantised to 1000 units of `T_bp`). Sites with
//!   `I ≤ 0` are never worth a FLOP.
//!
//! `greentrainer_rho` is ρ (default 0.5, "GreenTrainer-0.5"). The selection is made once, at
//! the start: the paper re-selects every 2 epochs, which a run of a few epochs reaches at most
//! once; a re-selection that freezes trained tensors and unfreezes others is left for later.

use super::full::Full;
use super::registry::Entry;
use super::targets::TargetModules;
use super::{Method, MethodSpec, PlannedMemory};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::models::{BlockSiteInfo, ForwardCtx, Llama, ModelConfig, SiteInfo};
use crate::optim::{AdamW, AdamWConfig, Optimizer};
use candle_core::Var;
use std::path::Path;
use std::sync::Arc;

pub const GREENTRAINER: Entry = Entry {
    name: "greentrainer",
    summary: "GreenTrainer: trains whole the target linears that buy the most loss reduction within a backward-FLOPs budget (rho), chosen by DP on a one-step importance probe",
    keys: &["greentrainer_rho"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

/// Time is quantised to this many units of the full backward.
const UNITS: usize = 1000;

/// Per-token FLOPs of the backward, site by site in backward order.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    /// Site names, output to input.
    pub names: Vec<String>,
    pub dw: Vec<f64>,
    pub dy: Vec<f64>,
    /// Backward FLOPs every selection pays (the LM head's input gradient).
    pub fixed: f64,
    /// The forward.
    pub forward: f64,
}

impl CostModel {
    /// For the `candidates` among `sites` (execution order), on sequences of `seq` tokens.
    pub fn new(cfg: &ModelConfig, sites: &[SiteInfo], candidates: &TargetModules, seq: usize) -> Result<CostModel> {
        let chosen = candidates.select(sites, "lora_target_modules")?;
        let attention = 8.0 * seq as f64 * (cfg.num_attention_heads * cfg.head_dim) as f64;
        let head = 2.0 * (cfg.vocab_size * cfg.hidden_size) as f64;
        let mut m = CostModel { names: Vec::new(), dw: Vec::new(), dy: Vec::new(), fixed: head, forward: head + attention / 2.0 * cfg.num_hidden_layers as f64 };
        for s in chosen.iter().rev() {
            let w = 2.0 * (s.out_features * s.in_features) as f64;
            m.names.push(s.name.clone());
            m.dw.push(w);
            m.dy.push(w + if s.short_name() == "o_proj" { attention } else { 0.0 });
            m.forward += w;
        }
        Ok(m)
    }

    /// The backward when every candidate trains, `T_bp`.
    pub fn full_backward(&self) -> f64 {
        self.fixed + self.dw.iter().sum::<f64>() + self.dy.iter().sum::<f64>()
    }

    /// The backward of a selection: its weight gradients, and activation gradients down to the
    /// deepest selected site.
    pub fn backward(&self, selected: &[bool]) -> f64 {
        let deepest = selected.iter().rposition(|&s| s);
        self.fixed + selected.iter().zip(&self.dw).filter(|(s, _)| **s).map(|(_, w)| w).sum::<f64>() + deepest.map_or(0.0, |d| self.dy[..=d].iter().sum())
    }

    /// `ρ_bp` for the total-FLOPs ratio `rho`.
    pub fn backward_ratio(&self, rho: f64) -> f64 {
        let r = self.forward / self.full_backward();
        (rho * (1.0 + r) - r).max(0.05)
    }

    /// Costs in quantised units of `T_bp` (rounded up, so a selection within budget in units is
    /// within it in FLOPs), and the budget in units for `rho`.
    pub fn units(&self, rho: f64) -> (Vec<usize>, Vec<usize>, usize) {
        let t = self.full_backward();
        let q = |x: f64| (x / t * UNITS as f64).ceil() as usize;
        let budget = ((self.backward_ratio(rho) * t - self.fixed) / t * UNITS as f64).floor().max(0.0) as usize;
        (self.dw.iter().map(|&x| q(x)).collect(), self.dy.iter().map(|&x| q(x)).collect(), budget)
    }
}

/// The selection (in backward order) maximising `Σ importance` with
/// `Σ_selected dw + Σ_{k ≤ deepest} dy ≤ budget` (all in units); only positive importances.
pub fn select(importance: &[f64], dw: &[usize], dy: &[usize], budget: usize) -> Vec<bool> {
    let n = importance.len();
    // best[c]: the largest value of items 0..k with weight-gradient cost at most c, built up
    // item by item; keep[k][c]: whether item k is in that best at c.
    let mut best = vec![0f64; budget + 1];
    let mut keep = vec![vec![false; budget + 1]; n];
    let mut prefix_dy = 0usize;
    let mut answer: (f64, Option<usize>) = (0.0, None);
    for k in 0..n {
        prefix_dy += dy[k];
        // k as the deepest selected site: the rest is the best of items 0..k within what is left.
        if importance[k] > 0.0 {
            if let Some(left) = budget.checked_sub(prefix_dy + dw[k]) {
                let v = importance[k] + best[left];
                if v > answer.0 {
                    answer = (v, Some(k));
                }
            }
        }
        // Add item k to the knapsack for deeper sites.
        if importance[k] > 0.0 {
            for c in (dw[k]..=budget).rev() {
                let with = best[c - dw[k]] + importance[k];
                if with > best[c] {
                    best[c] = with;
                    keep[k][c] = true;
                }
            }
        }
    }
    let mut chosen = vec![false; n];
    if let (_, Some(d)) = answer {
        chosen[d] = true;
        let mut c = budget - prefix(dy, d) - dw[d];
        for k in (0..d).rev() {
            if keep[k][c] {
                chosen[k] = true;
                c -= dw[k];
            }
        }
    }
    chosen
}

fn prefix(dy: &[usize], d: usize) -> usize {
    dy[..=d].iter().sum()
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let rho = spec.f64_or("greentrainer_rho", 0.5)?;
    if !(rho > 0.0 && rho <= 1.0) {
        return Err(Error::config("greentrainer_rho", format!("is {rho}; it is the fraction of full fine-tuning's FLOPs to spend, in (0, 1]")));
    }
    Ok(Box::new(GreenTrainer { targets: spec.target_modules.clone(), rho, lr: spec.learning_rate, chosen: None, full: None, report: serde_json::Value::Null }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let full = Full::load(model, dir, cfg, "greentrainer")?;
    let rho = cfg.get("greentrainer_rho").and_then(|v| v.as_f64()).unwrap_or(0.5);
    let targets = full.targets().clone();
    Ok(Box::new(GreenTrainer { targets: targets.clone(), rho, lr: 0.0, chosen: Some(targets), full: Some(full), report: cfg.get("greentrainer").cloned().unwrap_or_default() }))
}

pub struct GreenTrainer {
    /// The candidates.
    targets: TargetModules,
    rho: f64,
    lr: f64,
    /// The selection, once made.
    chosen: Option<TargetModules>,
    full: Option<Full>,
    /// What the selection saw (importances, costs), for run.json and the adapter config.
    report: serde_json::Value,
}

impl GreenTrainer {
    fn full(&self) -> &Full {
        self.full.as_ref().expect("GreenTrainer is used only once attached")
    }

    /// Each candidate's importance `−Σ g ⊙ Δw` after one AdamW step on `batch`.
    fn importance(&self, model: &mut Llama, batch: &Batch, names: &[String]) -> Result<Vec<f64>> {
        let mut probe = Full::new("greentrainer", TargetModules::Names(names.to_vec()));
        probe.attach(model)?;
        let params: Vec<Var> = probe.params().into_iter().map(|(_, v)| v).collect();
        let grads = |model: &Llama| -> Result<Vec<Vec<f32>>> {
            let nll = model.nll(&batch.input_ids, Arc::new(batch.targets.clone()), batch.batch_size, batch.seq_len, &ForwardCtx::train(0).over(batch))?;
            let loss = nll.sum_all()?.affine(1.0 / batch.n_targets.max(1) as f64, 0.0)?;
            let store = loss.backward()?;
            params.iter().map(|p| Ok(store.get(p.as_tensor()).map_or(Ok(vec![0f32; p.elem_count()]), |g| g.flatten_all()?.to_vec1())?)).collect()
        };
        let before: Vec<Vec<f32>> = params.iter().map(|p| p.as_tensor().flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?;
        let g0 = grads(model)?;
        AdamW::new(AdamWConfig::default(), &params).step(&params, &g0, self.lr)?;
        let g1 = grads(model)?;
        let mut importance = Vec::with_capacity(params.len());
        for ((p, w0), g) in params.iter().zip(&before).zip(&g1) {
            let w1: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
            importance.push(-w1.iter().zip(w0).zip(g).map(|((a, b), g)| ((a - b) * g) as f64).sum::<f64>());
        }
        // Put the weights back: the probe's hooks come off.
        for lin in model.linears_mut() {
            if names.contains(&lin.name) {
                lin.hook = None;
            }
        }
        Ok(importance)
    }
}

impl Method for GreenTrainer {
    fn name(&self) -> &'static str {
        "greentrainer"
    }

    fn init_batches(&self) -> usize {
        1
    }

    fn prepare(&mut self, model: &mut Llama, batches: &[Batch]) -> Result<()> {
        let batch = batches.first().ok_or_else(|| Error::Training("greentrainer: the importance probe needs a training batch".into()))?;
        let cost = CostModel::new(&model.config, &model.sites(), &self.targets, batch.seq_len)?;
        let mut importance = self.importance(model, batch, &cost.names)?;
        let max = importance.iter().fold(0f64, |m, x| m.max(x.abs()));
        if max > 0.0 {
            importance.iter_mut().for_each(|x| *x /= max);
        }
        let (dw, dy, budget) = cost.units(self.rho);
        let chosen = select(&importance, &dw, &dy, budget);
        let names: Vec<String> = cost.names.iter().zip(&chosen).filter(|(_, c)| **c).map(|(n, _)| n.clone()).collect();
        if names.is_empty() {
            return Err(Error::config("greentrainer_rho", format!("is {}: no target module's weight gradient fits that FLOPs budget with positive importance; raise it", self.rho)));
        }
        let fraction = cost.backward(&chosen) / cost.full_backward();
        crate::note!("greentrainer: {} of {} modules train; their backward is {:.0}% of full fine-tuning's (rho = {})", names.len(), cost.names.len(), 100.0 * fraction, self.rho);
        self.report = serde_json::json!({
            "backward_fraction": fraction,
            "importance": cost.names.iter().zip(&importance).map(|(n, i)| (n.clone(), serde_json::json!(i))).collect::<serde_json::Map<_, _>>(),
        });
        self.chosen = Some(TargetModules::Names(names));
        Ok(())
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let chosen = self.chosen.clone().ok_or_else(|| Error::Training("greentrainer: attach before the importance probe".into()))?;
        let mut full = Full::new("greentrainer", chosen);
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
        // The probe trains every candidate for a step: full fine-tuning's memory, once.
        Full::new("greentrainer", self.targets.clone()).planned_memory(sites, blocks)
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        self.full().optimizer(config)
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.full().save(dir, base_model)?;
        super::files::amend_config(dir, &[("greentrainer_rho", self.rho.into()), ("greentrainer", self.report.clone())])
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.full().merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.full.as_ref().map_or(serde_json::json!({}), |f| f.describe());
        d["rho"] = self.rho.into();
        d["trained_modules"] = self.sites().into();
        d["selection"] = self.report.clone();
        d
    }
}
