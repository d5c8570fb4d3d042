//! TriAdaptLoRA (METHODS.md §2.5): `ΔW = (α / r_cur) · B·C·A` with a square transformation
//! `C = L + U` made of a block-lower-triangular `L` and a block-upper-triangular `U`, and ranks
//! that grow during training, in blocks, where the importance of `C` grew most.
//!
//! Growth appends: block `k` (rows `r_{k-1}..r_k`) adds rows of `A`, columns of `B`, a row
//! strip `[block, 0..r_k]` of `L` and a column strip `[0..r_k, block]` of `U`. Here every tensor
//! is allocated at its largest size (`r_max`) up front and the inactive part is masked out of
//! the forward, so its gradient is exactly zero: the parameter set and the optimizer state
//! never change shape, and a new block starts with zero Adam moments, as a new optimizer group
//! would. The masks follow from the block boundaries, which are the method's state (with the
//! importance of the last evaluation) and are checkpointed, so a resumed run grows exactly as
//! the uninterrupted one.
//!
//! Choices where the spec is unconfirmed or silent (§2.5):
//! - init of a block: rows of `A` ~ N(0, 0.02²), columns of `B` = 0, the block's diagonal
//!   square of `L` = identity and the rest of both strips 0 (so `ΔW = 0` and `B` learns first);
//! - `r_max`, the most one matrix may grow to, is `2·lora_r` (`tri_r_max`);
//! - the schedule's `T` is the run's last step; a growth is capped by `r_max` and by the budget;
//! - the orthogonality penalty `λ·mean(‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)` over the active parts is
//!   added through its gradient in `grad_transform` (the logged loss is the task loss alone).

use super::lora::{read_peft_tensors, Lora, LoraConfig};
use super::registry::Entry;
use super::files::refuse_leftovers;
use super::targets::{hook_targets, TargetModules};
use super::{LoraPair, Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, METHOD_KEY};
use crate::error::{Error, Result};
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, BlockSiteInfo, ForwardCtx, Llama, SiteHook, SiteInfo};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

pub const TRIADAPTLORA: Entry = Entry {
    name: "triadaptlora",
    summary: "TriAdaptLoRA: ΔW = (α/r)·B·(L+U)·A with triangular L, U and ranks that grow by importance during training",
    keys: &["tri_r_init", "tri_increment", "tri_r_max", "tri_interval", "tri_warmup", "tri_growth", "tri_orth_reg"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

/// The plan's settings (all in the adapter config, so a checkpoint re-attaches exactly).
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    targets: TargetModules,
    /// `r_ref`: the average rank the budget allows (`lora_r`).
    r_ref: usize,
    alpha: f64,
    r_init: usize,
    increment: usize,
    r_max: usize,
    interval: usize,
    warmup: usize,
    nonlinear: bool,
    orth_reg: f64,
    seed: u64,
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let r = spec.r;
    let s = Settings {
        targets: spec.target_modules.clone(),
        r_ref: r,
        alpha: spec.alpha,
        r_init: spec.usize_or("tri_r_init", 1)?,
        increment: spec.usize_or("tri_increment", (r / 2).max(1))?,
        r_max: spec.usize_or("tri_r_max", 2 * r)?,
        interval: spec.usize_or("tri_interval", 10)?,
        warmup: spec.usize_or("tri_warmup", 0)?,
        nonlinear: spec.choice_or("tri_growth", &["linear", "nonlinear"])? == "nonlinear",
        orth_reg: spec.f64_or("tri_orth_reg", 0.5)?,
        seed: spec.seed,
    };
    for (k, v) in [("lora_r", r), ("tri_r_init", s.r_init), ("tri_increment", s.increment), ("tri_interval", s.interval)] {
        if v == 0 {
            return Err(Error::config(k, "must be at least 1"));
        }
    }
    if s.r_max < s.r_init {
        return Err(Error::config("tri_r_max", format!("is {}, below tri_r_init = {}: no matrix could start", s.r_max, s.r_init)));
    }
    if !(s.orth_reg >= 0.0) {
        return Err(Error::config("tri_orth_reg", format!("is {}; expected 0 or a positive weight", s.orth_reg)));
    }
    Ok(Box::new(TriAdaptLora { s, sites: Vec::new(), total_steps: 0, final_form: None }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if cfg.get("tri_native").and_then(|v| v.as_bool()) != Some(true) {
        // The final adapter: the active part as a plain PEFT LoRA with per-module ranks.
        let lora = Lora::load_peft(model, dir)?;
        let s = Settings {
            targets: lora.config.target_modules.clone(),
            r_ref: lora.config.r,
            alpha: lora.config.alpha,
            r_init: 1,
            increment: 1,
            r_max: lora.config.r,
            interval: 1,
            warmup: 0,
            nonlinear: false,
            orth_reg: 0.0,
            seed: 0,
        };
        return Ok(Box::new(TriAdaptLora { s, sites: Vec::new(), total_steps: 0, final_form: Some(lora) }));
    }
    let num = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).ok_or_else(|| Error::format(&cfg_path, format!("field `{k}`: missing or not a number")));
    let targets = TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules")
        .map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    let s = Settings {
        targets,
        r_ref: num("r")? as usize,
        alpha: num("lora_alpha")?,
        r_init: num("tri_r_init")? as usize,
        increment: num("tri_increment")? as usize,
        r_max: num("tri_r_max")? as usize,
        interval: num("tri_interval")? as usize,
        warmup: num("tri_warmup")? as usize,
        nonlinear: cfg.get("tri_growth").and_then(|v| v.as_str()) == Some("nonlinear"),
        orth_reg: num("tri_orth_reg")?,
        seed: num("seed")? as u64,
    };
    let (mut tensors, w_path) = read_peft_tensors(dir)?;
    let mut m = TriAdaptLora { s, sites: Vec::new(), total_steps: 0, final_form: None };
    let rm = m.s.r_max;
    m.attach_with(model, |_, site, n, out| {
        let mut take = |w: &str, shape: &[usize]| super::lora::take_checked(&mut tensors, &key(site, w), shape, site, &w_path);
        Ok([take("A", &[rm, n])?, take("B", &[out, rm])?, take("L", &[rm, rm])?, take("U", &[rm, rm])?])
    })?;
    refuse_leftovers(&tensors, &w_path, "adapted module")?;
    Ok(Box::new(m))
}

fn key(site: &str, which: &str) -> String {
    format!("{site}.tri_{which}")
}

/// A site's block structure and the masks it implies.
struct Growth {
    /// Cumulative ranks at the end of each block (`[r_1, r_2, …]`); the last is `r_cur`.
    bounds: Vec<usize>,
    mask_l: Tensor,
    mask_u: Tensor,
    /// `‖C‖_F / #blocks` at the last evaluation.
    s_prev: f64,
}

impl Growth {
    fn new(bounds: Vec<usize>, r_max: usize, s_prev: f64) -> Result<Self> {
        // Row i of L reaches the end of its own block; column j of U likewise.
        let end_of = |i: usize| bounds.iter().copied().find(|&b| i < b);
        let mut l = vec![0f32; r_max * r_max];
        let mut u = vec![0f32; r_max * r_max];
        for i in 0..r_max {
            for j in 0..r_max {
                if end_of(i).is_some_and(|e| j < e) {
                    l[i * r_max + j] = 1.0;
                }
                if end_of(j).is_some_and(|e| i < e) {
                    u[i * r_max + j] = 1.0;
                }
            }
        }
        let mask = |v| Tensor::from_vec(v, (r_max, r_max), &Device::Cpu);
        Ok(Self { bounds, mask_l: mask(l)?, mask_u: mask(u)?, s_prev })
    }

    fn rank(&self) -> usize {
        *self.bounds.last().expect("at least the first block")
    }
}

struct TriSite {
    site: String,
    /// `[r_max, in]`, `[out, r_max]`, `[r_max, r_max]` × 2.
    a: Var,
    b: Var,
    l: Var,
    u: Var,
    alpha: f64,
    growth: RwLock<Growth>,
}

impl TriSite {
    fn vars(&self) -> [(&'static str, &Var); 4] {
        [("A", &self.a), ("B", &self.b), ("L", &self.l), ("U", &self.u)]
    }

    /// `(C·A, B, α/r_cur)` with the inactive parts masked out.
    fn factors(&self, train: bool) -> candle_core::Result<(Tensor, Tensor, f64)> {
        let t = |v: &Var| if train { v.as_tensor().clone() } else { v.as_detached_tensor() };
        let g = self.growth.read().expect("growth lock");
        let c = ((t(&self.l) * &g.mask_l)? + (t(&self.u) * &g.mask_u)?)?;
        Ok((c.matmul(&t(&self.a))?, t(&self.b), self.alpha / g.rank() as f64))
    }

    fn c_norm(&self) -> Result<f64> {
        let g = self.growth.read().expect("growth lock");
        let c = ((self.l.as_detached_tensor() * &g.mask_l)? + (self.u.as_detached_tensor() * &g.mask_u)?)?;
        let sq: f32 = c.sqr()?.sum_all()?.to_scalar()?;
        Ok((sq as f64).sqrt() / g.bounds.len() as f64)
    }
}

impl SiteHook for TriSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (a, b, s) = self.factors(ctx.train)?;
        add_bias(crate::kernels::lora_linear(x, w0, &a.contiguous()?, &b, s as f32, 0.0, 0)?, b0)
    }
}

pub struct TriAdaptLora {
    s: Settings,
    sites: Vec<Arc<TriSite>>,
    total_steps: usize,
    /// Set when loaded from a final adapter (plain LoRA with per-module ranks).
    final_form: Option<Lora>,
}

/// Fresh values for block `[r0, r1)` of a site: rows of A ~ N(0, 0.02²), B's columns 0, the
/// block's diagonal square of L the identity, the rest of its strips 0.
fn init_block(site: &TriSite, seed: u64, index: usize, r0: usize, r1: usize) -> Result<()> {
    let rm = site.l.dims()[0];
    let mut rng = SplitMix64::derive(seed, &[0x7a1, index as u64, r0 as u64]);
    let edit = |v: &Var, f: &mut dyn FnMut(&mut [f32], &[usize])| -> Result<()> {
        let dims = v.dims().to_vec();
        let mut x: Vec<f32> = v.as_detached_tensor().flatten_all()?.to_vec1()?;
        f(&mut x, &dims);
        v.set(&Tensor::from_vec(x, dims.as_slice(), &Device::Cpu)?)?;
        Ok(())
    };
    edit(&site.a, &mut |x, d| {
        for i in r0..r1 {
            for j in 0..d[1] {
                let u1 = rng.next_f32().max(f32::MIN_POSITIVE);
                let u2 = rng.next_f32();
                x[i * d[1] + j] = 0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            }
        }
    })?;
    edit(&site.b, &mut |x, d| (0..d[0]).for_each(|i| (r0..r1).for_each(|j| x[i * d[1] + j] = 0.0)))?;
    edit(&site.l, &mut |x, _| {
        for i in r0..r1 {
            for j in 0..r1 {
                x[i * rm + j] = if i == j { 1.0 } else { 0.0 };
            }
        }
    })?;
    edit(&site.u, &mut |x, _| (0..r1).for_each(|i| (r0..r1).for_each(|j| x[i * rm + j] = 0.0)))?;
    Ok(())
}

impl TriAdaptLora {
    fn attach_with(&mut self, model: &mut Llama, mut init: impl FnMut(usize, &str, usize, usize) -> Result<[Tensor; 4]>) -> Result<()> {
        let s = &self.s;
        let sites = hook_targets(model, &s.targets, |i, lin| {
            let info = lin.info();
            let [a, b, l, u] = init(i, &lin.name, info.in_features, info.out_features)?;
            Ok(Arc::new(TriSite {
                site: lin.name.clone(),
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                l: Var::from_tensor(&l)?,
                u: Var::from_tensor(&u)?,
                alpha: s.alpha,
                growth: RwLock::new(Growth::new(vec![s.r_init], s.r_max, 0.0)?),
            }))
        })?;
        self.sites.extend(sites);
        Ok(())
    }

    /// The current rank of every adapted site, in site order.
    pub fn ranks(&self) -> Vec<usize> {
        self.sites.iter().map(|s| s.growth.read().expect("growth lock").rank()).collect()
    }

    /// How many matrices grow at step `t` (§2.5): `⌊(R_target − R_now)·c⌋` (linear) or
    /// `⌊exp(c·ln(R_target − R_now))⌋`, `c = (t − t_warm)/(T − t_warm)`, at least 1.
    pub fn growth_count(remaining: usize, t: usize, warmup: usize, total: usize, nonlinear: bool) -> usize {
        let c = if total > warmup { (t.saturating_sub(warmup)) as f64 / (total - warmup) as f64 } else { 1.0 };
        let k = if nonlinear { (c * (remaining as f64).ln()).exp().floor() } else { (remaining as f64 * c).floor() };
        (k as usize).max(1)
    }

    fn lora_pairs(&self) -> Result<Vec<LoraPair>> {
        if let Some(l) = &self.final_form {
            return Ok(l.pairs());
        }
        self.sites
            .iter()
            .map(|s| {
                let (ca, b, scaling) = s.factors(false)?;
                let r = s.growth.read().expect("growth lock").rank();
                Ok(LoraPair { site: s.site.clone(), a: ca.narrow(0, 0, r)?, b: b.narrow(1, 0, r)?.contiguous()?, scaling })
            })
            .collect()
    }
}

impl Method for TriAdaptLora {
    fn name(&self) -> &'static str {
        "triadaptlora"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let rm = self.s.r_max;
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        self.attach_with(model, |_, _, n, m| Ok([zeros((rm, n))?, zeros((m, rm))?, zeros((rm, rm))?, zeros((rm, rm))?]))?;
        for (i, site) in self.sites.iter().enumerate() {
            init_block(site, self.s.seed, i, 0, self.s.r_init)?;
        }
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        if let Some(l) = &self.final_form {
            return l.params();
        }
        self.sites.iter().flat_map(|s| s.vars().map(|(w, v)| (key(&s.site, w), v.clone()))).collect()
    }

    fn sites(&self) -> Vec<String> {
        match &self.final_form {
            Some(l) => Method::sites(l),
            None => self.sites.iter().map(|s| s.site.clone()).collect(),
        }
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let rm = self.s.r_max as u64;
        let chosen = self.s.targets.select(sites, "lora_target_modules")?;
        let trainable_params = chosen.iter().map(|s| rm * (s.in_features + s.out_features) as u64 + 2 * rm * rm).sum();
        // The fused LoRA op keeps its rank-r product per token and site.
        Ok(Some(PlannedMemory { trainable_params, extra_bytes: 0, floats_per_token: rm * chosen.len() as u64, ..Default::default() }))
    }

    fn set_total_steps(&mut self, total_steps: usize) {
        self.total_steps = total_steps;
    }

    fn grad_transform(&mut self, grads: &mut [Vec<f32>]) -> Result<()> {
        if self.s.orth_reg == 0.0 || self.final_form.is_some() || self.sites.is_empty() {
            return Ok(());
        }
        // d/dM ‖MMᵀ − I‖_F = 2(MMᵀ − I)M / ‖MMᵀ − I‖_F over the active rows of A and (as Bᵀ)
        // the active columns of B; weighted λ / #sites for the mean.
        let w = self.s.orth_reg / self.sites.len() as f64;
        for (i, s) in self.sites.iter().enumerate() {
            let r = s.growth.read().expect("growth lock").rank();
            for (which, t, slot) in [(0, s.a.as_detached_tensor().narrow(0, 0, r)?, 4 * i), (1, s.b.as_detached_tensor().narrow(1, 0, r)?.t()?, 4 * i + 1)] {
                let m = crate::linalg::from_tensor(&t.contiguous()?)?;
                let e = &m * m.transpose() - crate::linalg::Mat::identity(r, r);
                let norm = e.norm();
                if norm < 1e-12 {
                    continue;
                }
                let g = (&e * &m) * (2.0 * w / norm);
                let cols = m.ncols();
                let g_buf = &mut grads[slot];
                for k in 0..r {
                    for j in 0..cols {
                        // A: row k, column j of [r_max, in]; B: (j, k) of [out, r_max].
                        let idx = if which == 0 { k * cols + j } else { j * s.b.dims()[1] + k };
                        g_buf[idx] += g[(k, j)] as f32;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_step(&mut self, step: usize, _model: &mut Llama) -> Result<()> {
        let s = &self.s;
        if self.final_form.is_some() || step <= s.warmup || (step - s.warmup) % s.interval != 0 {
            return Ok(());
        }
        let budget = s.r_ref * self.sites.len();
        let now: usize = self.ranks().iter().sum();
        // Importance: the change of ‖C‖_F / #blocks since the last evaluation.
        let mut importance = Vec::with_capacity(self.sites.len());
        for site in &self.sites {
            let norm = site.c_norm()?;
            let mut g = site.growth.write().expect("growth lock");
            importance.push(norm - g.s_prev);
            g.s_prev = norm;
        }
        if now >= budget {
            return Ok(());
        }
        let k = Self::growth_count(budget - now, step, s.warmup, self.total_steps.max(step), s.nonlinear).min(self.sites.len());
        let mut order: Vec<usize> = (0..self.sites.len()).collect();
        order.sort_by(|&x, &y| importance[y].total_cmp(&importance[x]).then(x.cmp(&y)));
        let threshold = importance[order[k - 1]];
        let mut left = budget - now;
        for &i in order.iter().take_while(|&&i| importance[i] >= threshold) {
            let site = &self.sites[i];
            let r0 = site.growth.read().expect("growth lock").rank();
            let grow = s.increment.min(s.r_max - r0).min(left);
            if grow == 0 {
                continue;
            }
            init_block(site, s.seed, i, r0, r0 + grow)?;
            let mut g = site.growth.write().expect("growth lock");
            let mut bounds = g.bounds.clone();
            bounds.push(r0 + grow);
            *g = Growth::new(bounds, s.r_max, g.s_prev)?;
            left -= grow;
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for site in &self.sites {
            let g = site.growth.read().expect("growth lock");
            let bounds: Vec<f32> = g.bounds.iter().map(|&b| b as f32).collect();
            out.push((key(&site.site, "bounds"), Tensor::from_vec(bounds, g.bounds.len(), &Device::Cpu)?));
            // f64 → two f32 halves would be exact; an f32 of the norm rounds. Store the bits.
            let bits = g.s_prev.to_bits();
            let halves = vec![f32::from_bits((bits >> 32) as u32), f32::from_bits(bits as u32)];
            out.push((key(&site.site, "s_prev"), Tensor::from_vec(halves, 2, &Device::Cpu)?));
        }
        Ok(out)
    }

    fn restore_state(&mut self, mut state: HashMap<String, Tensor>, src: &Path) -> Result<()> {
        for site in &self.sites {
            let mut get = |w: &str| -> Result<Vec<f32>> {
                let k = key(&site.site, w);
                let t = state.remove(&k).ok_or_else(|| Error::format(src, format!("tensor `{k}` is missing")))?;
                Ok(t.flatten_all()?.to_vec1()?)
            };
            let bounds: Vec<usize> = get("bounds")?.iter().map(|&b| b as usize).collect();
            let halves = get("s_prev")?;
            if bounds.is_empty() || bounds.windows(2).any(|w| w[0] >= w[1]) || *bounds.last().unwrap() > self.s.r_max || halves.len() != 2 {
                return Err(Error::format(src, format!("the growth state of `{}` is inconsistent", site.site)));
            }
            let s_prev = f64::from_bits(((halves[0].to_bits() as u64) << 32) | halves[1].to_bits() as u64);
            *site.growth.write().expect("growth lock") = Growth::new(bounds, self.s.r_max, s_prev)?;
        }
        match state.keys().min() {
            Some(k) => Err(Error::format(src, format!("tensor `{k}` does not belong to this adapter"))),
            None => Ok(()),
        }
    }

    /// The final adapter: the active part as a plain PEFT LoRA (`A' = C·A`, `B'`, per-module
    /// ranks in `rank_pattern`; the scaling α/r_cur is LoRA's with that rank).
    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        if let Some(l) = &self.final_form {
            return l.save_as(dir, base_model, "triadaptlora", &[]);
        }
        let pairs = self.lora_pairs()?;
        let rank_pattern: BTreeMap<String, usize> = pairs.iter().map(|p| (p.site.clone(), p.a.dims()[0])).collect();
        let config = LoraConfig {
            r: self.s.r_ref,
            alpha: self.s.alpha,
            dropout: 0.0,
            target_modules: self.s.targets.clone(),
            use_rslora: false,
            rank_pattern,
            alpha_pattern: BTreeMap::new(),
        };
        let tensors: Vec<(String, Tensor)> = pairs
            .into_iter()
            .flat_map(|p| [(super::lora::peft_key(&p.site, 'A'), p.a), (super::lora::peft_key(&p.site, 'B'), p.b)])
            .collect();
        Lora::save_tensors(dir, base_model, "triadaptlora", &config, &tensors)
    }

    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        if self.final_form.is_some() {
            return self.save(dir, base_model);
        }
        let s = &self.s;
        let cfg = serde_json::json!({
            METHOD_KEY: "triadaptlora",
            "tri_native": true,
            "base_model_name_or_path": base_model,
            "target_modules": s.targets.to_json(),
            "r": s.r_ref, "lora_alpha": s.alpha, "tri_r_init": s.r_init, "tri_increment": s.increment,
            "tri_r_max": s.r_max, "tri_interval": s.interval, "tri_warmup": s.warmup,
            "tri_growth": if s.nonlinear { "nonlinear" } else { "linear" }, "tri_orth_reg": s.orth_reg, "seed": s.seed,
        });
        super::files::write_adapter(dir, &super::files::param_tensors(self.params()), &cfg, false)
    }

    fn peft_compatible(&self) -> bool {
        true
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        let pairs = self.lora_pairs()?;
        for lin in model.linears_mut() {
            if let Some(p) = pairs.iter().find(|p| p.site == lin.name) {
                let delta = (p.b.matmul(&p.a)? * p.scaling)?;
                lin.weight = FrozenWeight::from_tensor(&(lin.weight.to_tensor()? + delta)?)?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        self.lora_pairs().ok()
    }

    fn describe(&self) -> serde_json::Value {
        let ranks: BTreeMap<String, usize> = match &self.final_form {
            Some(l) => l.sites.iter().map(|s| (s.site.clone(), s.a.dims()[0])).collect(),
            None => self.sites.iter().zip(self.ranks()).map(|(s, r)| (s.site.clone(), r)).collect(),
        };
        serde_json::json!({ "r_ref": self.s.r_ref, "r_max": self.s.r_max, "budget": self.s.r_ref * ranks.len(), "ranks": ranks })
    }
}
