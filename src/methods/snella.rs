//! SNELLA (`METHODS.md` §2.9): a sparse update matrix made by a distance kernel of two small
//! embedding tables, with per-matrix sparsity set by a bi-level competition.
//!
//! For a target linear `W0: [m, n]` (m outputs, n inputs) and heads `h = 0..H` (`H = 2`):
//! `P_h: [n, q/H]` (one vector per input), `Q_h: [m, q/H]` (one per output), `q = lora_r`.
//! - kernel: `K[i, o] = Σ_h c_h‖P_h[i] − Q_h[o]‖₂`, `c_h = 0.1·(−1)^h`, then
//!   `K ← K + α·softmax_o(K/γ) + β` with learnable scalars `α = 1, γ = 1, β = 0` at init;
//! - sparsification inside the matrix: entries with `|K|` at or below the matrix's
//!   `ρ_l`-quantile are zeroed, and each survivor is multiplied by its own detached magnitude
//!   (`K·sg(|K|)`, as the official code does): `ΔWᵀ = that matrix`;
//! - forward `y = W0·x + DropPath(ΔW·x)` (`snella_drop_path`, 0.1: the branch of a whole
//!   sequence is dropped, the others scaled by `1/(1 − p)`), and merging is `W0 + ΔW`;
//! - competition across matrices: per entry of `P` and `Q`, `s = |θ ⊙ ∇θ|`, smoothed
//!   `Ī ← β1·Ī + (1−β1)·s`, uncertainty `Ū ← β2·Ū + (1−β2)·|s − Ī|`; a matrix's score is the
//!   mean of `Ī⊙Ū` over its `P` plus that over its `Q`, normalised to sum 1; every
//!   `snella_mask_interval` steps the budget of non-zeros `V(t)` ([`budget_at`], cubic from
//!   `(1 − ρ_init)·Σmn` to `(1 − ρ_target)·Σmn`) is shared out in proportion to the scores,
//!   capped at each matrix's size ([`allocate`]), and `ρ_l = 1 − alloc_l/(m·n)`.
//!
//! `P`, `Q` start Kaiming-uniform (a = √5, bound `1/√(q/H)`), so `ΔW ≠ 0` at step 0: the method
//! does not start from the pre-trained function. Defaults are the official FGVC script's
//! (`ρ_init = 0`, `ρ_target = 0.3`, interval 1, β1 = β2 = 0.85, no warm-ups). The update is
//! one op ([`crate::kernels::distance_kernel`]) whose graph keeps only its `n×m` output per
//! site; `gradient_checkpointing = true` keeps one block's.

use super::files::{param_tensors, refuse_leftovers, write_adapter};
use super::registry::Entry;
use super::targets::{hook_targets, TargetModules};
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, BlockSiteInfo, ForwardCtx, Llama, SiteHook, SiteInfo};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

pub const SNELLA: Entry = Entry {
    name: "snella",
    summary: "SNELLA: a sparse update from a distance kernel of two small tables per matrix (rank above q), sparsity per matrix from a bi-level budget competition",
    keys: &["snella_heads", "snella_rho_init", "snella_rho_target", "snella_mask_interval", "snella_beta1", "snella_beta2", "snella_drop_path"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

/// Kernel-sized f32 buffers the backward of one site's update forms while it runs (the
/// recomputed distances per head, `K0`, softmax, `K`, mask, `dK0`, `W`, and the update's
/// gradient); only the update itself stays in the graph.
const BACKWARD_COPIES: u64 = 9;

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    targets: TargetModules,
    q: usize,
    heads: usize,
    rho_init: f64,
    rho_target: f64,
    interval: usize,
    beta1: f64,
    beta2: f64,
    drop_path: f64,
}

impl Settings {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "target_modules": self.targets.to_json(), "lora_r": self.q, "snella_heads": self.heads,
            "snella_rho_init": self.rho_init, "snella_rho_target": self.rho_target, "snella_mask_interval": self.interval,
            "snella_beta1": self.beta1, "snella_beta2": self.beta2, "snella_drop_path": self.drop_path,
        })
    }

    fn from_json(cfg: &serde_json::Value, src: &Path) -> Result<Self> {
        let num = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).ok_or_else(|| Error::format(src, format!("field `{k}` is missing or not a number")));
        Ok(Settings {
            targets: TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules").map_err(|e| Error::format(src, e.to_string()))?,
            q: num("lora_r")? as usize,
            heads: num("snella_heads")? as usize,
            rho_init: num("snella_rho_init")?,
            rho_target: num("snella_rho_target")?,
            interval: num("snella_mask_interval")? as usize,
            beta1: num("snella_beta1")?,
            beta2: num("snella_beta2")?,
            drop_path: num("snella_drop_path")?,
        })
    }
}

/// The budget of non-zeros at step `t` of `total`: `v0` until `t_i`, then cubic down to `vt`,
/// reached `t_f` steps before the end.
pub fn budget_at(t: usize, total: usize, t_i: usize, t_f: usize, v0: f64, vt: f64) -> f64 {
    let span = total.saturating_sub(t_i + t_f);
    if t <= t_i || span == 0 {
        return if t <= t_i { v0 } else { vt };
    }
    if t >= total - t_f {
        return vt;
    }
    let progress = (t - t_i) as f64 / span as f64;
    vt + (v0 - vt) * (1.0 - progress).powi(3)
}

/// `budget` non-zeros shared out in proportion to `scores`, each matrix capped at its size; what
/// the caps leave is shared again among the others, until nothing is left or all are full.
pub fn allocate(scores: &[f64], sizes: &[usize], budget: f64) -> Vec<f64> {
    let mut alloc = vec![0f64; scores.len()];
    let mut left = budget.min(sizes.iter().sum::<usize>() as f64);
    let mut open: Vec<usize> = (0..scores.len()).collect();
    while left > 1e-9 && !open.is_empty() {
        let total: f64 = open.iter().map(|&i| scores[i].max(0.0)).sum();
        let share = |i: usize| if total > 0.0 { scores[i].max(0.0) / total } else { 1.0 / open.len() as f64 };
        let mut spent = 0.0;
        let mut still_open = Vec::new();
        for &i in &open {
            let room = sizes[i] as f64 - alloc[i];
            let give = (left * share(i)).min(room);
            alloc[i] += give;
            spent += give;
            if give < room {
                still_open.push(i);
            }
        }
        left -= spent;
        if still_open.len() == open.len() {
            break;
        }
        open = still_open;
    }
    alloc
}

/// The smoothed sensitivity and uncertainty of one site's `P` and `Q` entries.
#[derive(Debug, Clone, Default)]
struct Importance {
    i_bar: Vec<f32>,
    u_bar: Vec<f32>,
}

struct SnellaSite {
    site: String,
    m: usize,
    n: usize,
    /// `[H, n, q/H]`, `[H, m, q/H]`, and the scalars `[α, γ, β]`.
    p: Var,
    q: Var,
    scalars: Var,
    /// The share of entries zeroed, `ρ_l`.
    rho: RwLock<f64>,
    drop_path: f64,
    /// The site's index among all linear sites (its drop-path stream).
    stream: u64,
}

impl SnellaSite {
    fn vars(&self) -> [(&'static str, &Var); 3] {
        [("P", &self.p), ("Q", &self.q), ("scalars", &self.scalars)]
    }

    /// The sparse update `ΔWᵀ: [n, m]` (with the graph to the parameters when `train`).
    fn update_t(&self, train: bool) -> candle_core::Result<Tensor> {
        let t = |v: &Var| if train { v.as_tensor().clone() } else { v.as_detached_tensor() };
        crate::kernels::distance_kernel(&t(&self.p), &t(&self.q), &t(&self.scalars), *self.rho.read().expect("rho lock"))
    }
}

impl SiteHook for SnellaSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let base = crate::kernels::frozen_linear(x, w0)?;
        // As a 2-D product: a broadcast one would copy the update once per sequence.
        let rows = x.elem_count() / self.n.max(1);
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has a feature axis") = self.m;
        let mut branch = x.reshape((rows, self.n))?.matmul(&self.update_t(ctx.train)?)?.reshape(out_dims)?;
        if ctx.train && self.drop_path > 0.0 && x.rank() == 3 {
            // Drop the branch of whole sequences, scale the kept ones by 1/(1 − p).
            let b = x.dim(0)?;
            let mut rng = SplitMix64::derive(ctx.seed, &[0x5e11, self.stream]);
            let keep: Vec<f32> = (0..b).map(|_| if (rng.next_f32() as f64) < self.drop_path { 0.0 } else { (1.0 / (1.0 - self.drop_path)) as f32 }).collect();
            branch = branch.broadcast_mul(&Tensor::from_vec(keep, (b, 1, 1), x.device())?)?;
        }
        add_bias((base + branch)?, b0)
    }
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let s = Settings {
        targets: spec.target_modules.clone(),
        q: spec.r,
        heads: spec.usize_or("snella_heads", 2)?,
        rho_init: spec.f64_or("snella_rho_init", 0.0)?,
        rho_target: spec.f64_or("snella_rho_target", 0.3)?,
        interval: spec.usize_or("snella_mask_interval", 1)?,
        beta1: spec.f64_or("snella_beta1", 0.85)?,
        beta2: spec.f64_or("snella_beta2", 0.85)?,
        drop_path: spec.f64_or("snella_drop_path", 0.1)?,
    };
    if s.heads == 0 || !s.q.is_multiple_of(s.heads) {
        return Err(Error::config("snella_heads", format!("is {}; it must divide lora_r = {} (each head holds q/H dimensions)", s.heads, s.q)));
    }
    for (k, v) in [("snella_rho_init", s.rho_init), ("snella_rho_target", s.rho_target), ("snella_drop_path", s.drop_path)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::config(k, format!("is {v}; expected a fraction in [0, 1)")));
        }
    }
    for (k, v) in [("snella_beta1", s.beta1), ("snella_beta2", s.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::config(k, format!("is {v}; expected a smoothing factor in [0, 1)")));
        }
    }
    Ok(Box::new(Snella { s, seed: spec.seed, sites: Vec::new(), importance: Vec::new(), total_steps: 0, step: 0 }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let s = Settings::from_json(cfg, &dir.join(ADAPTER_CONFIG))?;
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = st::load_f32(&w_path)?;
    let mut m = Snella { s, seed: 0, sites: Vec::new(), importance: Vec::new(), total_steps: 0, step: 0 };
    let rhos = cfg.get("rho").and_then(|v| v.as_object()).cloned().unwrap_or_default();
    m.attach_with(model, |site, n, mm, heads, d| {
        let mut take = |w: &str, shape: &[usize]| super::lora::take_checked(&mut tensors, &key(site, w), shape, site, &w_path);
        Ok(([take("P", &[heads, n, d])?, take("Q", &[heads, mm, d])?, take("scalars", &[3])?], rhos.get(site).and_then(|v| v.as_f64()).unwrap_or(0.0)))
    })?;
    refuse_leftovers(&tensors, &w_path, "adapted module")?;
    Ok(Box::new(m))
}

fn key(site: &str, which: &str) -> String {
    format!("{site}.snella.{which}")
}

pub struct Snella {
    s: Settings,
    seed: u64,
    sites: Vec<Arc<SnellaSite>>,
    importance: Vec<Importance>,
    total_steps: usize,
    /// Optimizer steps done (the budget schedule's `t`).
    step: usize,
}

type Init = ([Tensor; 3], f64);

impl Snella {
    fn attach_with(&mut self, model: &mut Llama, mut init: impl FnMut(&str, usize, usize, usize, usize) -> Result<Init>) -> Result<()> {
        let (heads, d, drop_path) = (self.s.heads, self.s.q / self.s.heads, self.s.drop_path);
        let sites = hook_targets(model, &self.s.targets, |i, lin| {
            let (m, n) = lin.weight.dims();
            let ([p, q, scalars], rho) = init(&lin.name, n, m, heads, d)?;
            Ok(Arc::new(SnellaSite {
                site: lin.name.clone(),
                m,
                n,
                p: Var::from_tensor(&p)?,
                q: Var::from_tensor(&q)?,
                scalars: Var::from_tensor(&scalars)?,
                rho: RwLock::new(rho),
                drop_path,
                stream: i as u64,
            }))
        })?;
        self.importance = sites.iter().map(|_| Importance::default()).collect();
        self.sites = sites;
        Ok(())
    }

    fn config(&self, base_model: &str) -> serde_json::Value {
        let mut cfg = super::files::method_config("snella", base_model, self.s.to_json());
        cfg["rho"] = self.sites.iter().map(|s| (s.site.clone(), serde_json::json!(*s.rho.read().expect("rho lock")))).collect::<serde_json::Map<_, _>>().into();
        cfg
    }
}

impl Method for Snella {
    fn name(&self) -> &'static str {
        "snella"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let (seed, rho) = (self.seed, self.s.rho_init);
        self.attach_with(model, |_, n, m, heads, d| {
            // kaiming_uniform_(a = √5) on [rows, d]: bound 1/√d.
            let bound = 1.0 / (d as f32).sqrt();
            let mut rng = SplitMix64::derive(seed, &[0x5e1a, n as u64, m as u64]);
            let mut table = |rows: usize| -> Result<Tensor> {
                let v: Vec<f32> = (0..heads * rows * d).map(|_| (2.0 * rng.next_f32() - 1.0) * bound).collect();
                Ok(Tensor::from_vec(v, (heads, rows, d), &Device::Cpu)?)
            };
            // α = 1, γ = 1, β = 0.
            Ok(([table(n)?, table(m)?, Tensor::from_vec(vec![1f32, 1.0, 0.0], 3, &Device::Cpu)?], rho))
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.iter().flat_map(|s| s.vars().map(|(w, v)| (key(&s.site, w), v.clone()))).collect()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.s.targets.select(sites, "lora_target_modules")?;
        let trainable: u64 = chosen.iter().map(|s| (self.s.q * (s.in_features + s.out_features) + 3) as u64).sum();
        // The graph keeps each site's update (kernel-sized); the backward forms a few more while
        // it passes one site. The importance averages are small.
        let kernels: u64 = chosen.iter().map(|s| (s.in_features * s.out_features) as u64).sum();
        let largest: u64 = chosen.iter().map(|s| (s.in_features * s.out_features) as u64).max().unwrap_or(0);
        // Per token, the branch's outputs beside the base product (the update's product, the
        // drop-path product, the sum and what the backward of the products keeps): about 7
        // output-sized values per site, measured on SmolLM2 (6.28 GB peak at 4×256 without
        // checkpointing, 0.58 GB with); 8 planned, to err on the safe side.
        let floats_per_token = chosen.iter().map(|s| 8 * s.out_features as u64).sum();
        Ok(Some(PlannedMemory { trainable_params: trainable, extra_bytes: 8 * trainable + BACKWARD_COPIES * 4 * largest, floats_per_token, graph_bytes: 4 * kernels, ..Default::default() }))
    }

    fn set_total_steps(&mut self, total_steps: usize) {
        self.total_steps = total_steps;
    }

    /// The bi-level competition reads the step's gradients: sensitivities, their averages, and
    /// at each interval the new per-matrix sparsity.
    fn grad_transform(&mut self, grads: &mut [Vec<f32>]) -> Result<()> {
        let (b1, b2) = (self.s.beta1 as f32, self.s.beta2 as f32);
        let mut scores = Vec::with_capacity(self.sites.len());
        for (i, site) in self.sites.iter().enumerate() {
            // Parameters of site i are grads[3i] (P) and grads[3i + 1] (Q).
            let mut score = 0.0;
            let mut offset = 0;
            let imp = &mut self.importance[i];
            for (which, var) in [(0, &site.p), (1, &site.q)] {
                let theta: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
                let g = &grads[3 * i + which];
                if imp.i_bar.len() < offset + theta.len() {
                    imp.i_bar.resize(offset + theta.len(), 0.0);
                    imp.u_bar.resize(offset + theta.len(), 0.0);
                }
                let mut sum = 0f64;
                for j in 0..theta.len() {
                    let s = (theta[j] * g[j]).abs();
                    let s = if s.is_finite() { s } else { 0.0 };
                    let ib = &mut imp.i_bar[offset + j];
                    *ib = b1 * *ib + (1.0 - b1) * s;
                    let ub = &mut imp.u_bar[offset + j];
                    *ub = b2 * *ub + (1.0 - b2) * (s - imp.i_bar[offset + j]).abs();
                    sum += (imp.i_bar[offset + j] * imp.u_bar[offset + j]) as f64;
                }
                score += sum / theta.len().max(1) as f64;
                offset += theta.len();
            }
            scores.push(score);
        }
        let next = self.step + 1;
        if self.s.interval > 0 && next.is_multiple_of(self.s.interval) {
            let total: f64 = scores.iter().sum();
            if total > 0.0 {
                scores.iter_mut().for_each(|s| *s /= total);
            }
            let sizes: Vec<usize> = self.sites.iter().map(|s| s.m * s.n).collect();
            let all: f64 = sizes.iter().sum::<usize>() as f64;
            let budget = budget_at(next, self.total_steps, 0, 0, (1.0 - self.s.rho_init) * all, (1.0 - self.s.rho_target) * all);
            for ((site, a), size) in self.sites.iter().zip(allocate(&scores, &sizes, budget)).zip(&sizes) {
                *site.rho.write().expect("rho lock") = (1.0 - a / *size as f64).clamp(0.0, 1.0);
            }
        }
        Ok(())
    }

    fn on_step(&mut self, step: usize, _model: &mut Llama) -> Result<()> {
        self.step = step;
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("snella.step".to_string(), Tensor::from_vec(vec![self.step as f32], 1, &Device::Cpu)?)];
        for (s, imp) in self.sites.iter().zip(&self.importance) {
            let n = imp.i_bar.len();
            out.push((key(&s.site, "i_bar"), Tensor::from_vec(imp.i_bar.clone(), n, &Device::Cpu)?));
            out.push((key(&s.site, "u_bar"), Tensor::from_vec(imp.u_bar.clone(), n, &Device::Cpu)?));
            // ρ as the two halves of its f64 bits: an f32 of it would round.
            let bits = s.rho.read().expect("rho lock").to_bits();
            out.push((key(&s.site, "rho"), Tensor::from_vec(vec![f32::from_bits((bits >> 32) as u32), f32::from_bits(bits as u32)], 2, &Device::Cpu)?));
        }
        Ok(out)
    }

    fn restore_state(&mut self, mut state: HashMap<String, Tensor>, src: &Path) -> Result<()> {
        let mut take = |k: String| -> Result<Vec<f32>> {
            let t = state.remove(&k).ok_or_else(|| Error::format(src, format!("tensor `{k}` is missing")))?;
            Ok(t.flatten_all()?.to_vec1()?)
        };
        self.step = take("snella.step".into())?.first().copied().unwrap_or(0.0) as usize;
        for (s, imp) in self.sites.iter().zip(self.importance.iter_mut()) {
            imp.i_bar = take(key(&s.site, "i_bar"))?;
            imp.u_bar = take(key(&s.site, "u_bar"))?;
            let h = take(key(&s.site, "rho"))?;
            if h.len() != 2 {
                return Err(Error::format(src, format!("tensor `{}` must hold 2 values", key(&s.site, "rho"))));
            }
            *s.rho.write().expect("rho lock") = f64::from_bits(((h[0].to_bits() as u64) << 32) | h[1].to_bits() as u64);
        }
        match state.keys().min() {
            Some(k) => Err(Error::format(src, format!("tensor `{k}`: method `snella` keeps no such state"))),
            None => Ok(()),
        }
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        write_adapter(dir, &param_tensors(self.params()), &self.config(base_model), false)
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            if let Some(site) = self.sites.iter().find(|s| s.site == lin.name) {
                let delta = site.update_t(false)?.t()?;
                lin.weight = FrozenWeight::from_tensor(&(lin.weight.to_tensor()? + delta)?)?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let rho: Vec<f64> = self.sites.iter().map(|s| *s.rho.read().expect("rho lock")).collect();
        serde_json::json!({
            "sites": self.sites.len(), "q": self.s.q, "heads": self.s.heads,
            "mean_rho": if rho.is_empty() { 0.0 } else { rho.iter().sum::<f64>() / rho.len() as f64 },
            "settings": self.s.to_json(),
        })
    }
}
