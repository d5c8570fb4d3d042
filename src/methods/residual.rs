//! LoRA initialised from a decomposition of the base weight, which then trains on the
//! *residual* `W_res = W − s·B0·A0` (so the model is unchanged at step 0): PiSSA (top singular
//! directions of `W`), OLoRA (QR of `W`) and CorDA (METHODS.md §2.3: SVD of `W·C` for the input
//! covariance `C` collected over the run's first batches; IPM keeps the largest directions, KPM
//! the smallest). Each follows PEFT 0.21's `pissa_init`, `olora_init` and `corda_init`.
//!
//! The touched matrices become f32 residuals (also on a GGUF base: counted in the memory
//! estimate). Two forms on disk:
//! - checkpoints (`save_checkpoint`) are *native*: `A`, `B` and the initial `A0`, `B0`, from which
//!   loading rebuilds the residual from the original base exactly (`ferrotune_residual = true`);
//! - the final adapter (`save`) is PEFT's conversion onto the **original** base, as PEFT's
//!   `path_initial_model_for_weight_conversion` writes it: a plain LoRA of rank 2r with
//!   `A' = [A; A0]`, `B' = [B, −B0]`, `r` and `lora_alpha` doubled (rsLoRA: alpha ·√2), so
//!   `s'·B'·A' = s·(B·A − B0·A0)`. Any LoRA tool loads it on the unmodified base model.

use super::calibrate::{cycle_inputs, input_hash, leaders, InputSink};
use super::lora::{peft_key, read_peft_config, read_peft_tensors, take_checked, Lora, LoraConfig};
use super::registry::Entry;
use super::{LoraPair, Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::kernels::gemm::{gram_entry, gram_lower_accumulate};
use crate::kernels::FrozenWeight;
use crate::linalg::{self, Mat};
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const PISSA: Entry = Entry {
    name: "pissa",
    summary: "PiSSA: LoRA initialised with W's top-r singular directions, training on the residual; saved as a plain LoRA on the original base",
    keys: &[],
    create: |spec| create(spec, Kind::Pissa),
    load: |model, dir, cfg| load(model, dir, cfg, "pissa"),
    claims_peft: super::registry::not_peft,
};

pub const OLORA: Entry = Entry {
    name: "olora",
    summary: "OLoRA: LoRA initialised from the QR decomposition of W, training on the residual; saved as a plain LoRA on the original base",
    keys: &[],
    create: |spec| create(spec, Kind::Olora),
    load: |model, dir, cfg| load(model, dir, cfg, "olora"),
    claims_peft: super::registry::not_peft,
};

pub const CORDA: Entry = Entry {
    name: "corda",
    summary: "CorDA: LoRA initialised from the SVD of W·C (C: input covariance over the first init_batches), IPM or KPM; saved as a plain LoRA on the original base",
    keys: &["corda_method", "init_batches"],
    create: |spec| {
        let kpm = spec.choice_or("corda_method", &["ipm", "kpm"])? == "kpm";
        let batches = spec.usize_or("init_batches", 16)?;
        if batches == 0 {
            return Err(Error::config("init_batches", "is 0; CorDA needs at least one batch of inputs for its covariances"));
        }
        create(spec, Kind::Corda { kpm, batches, covariances: HashMap::new() })
    },
    load: |model, dir, cfg| load(model, dir, cfg, "corda"),
    claims_peft: super::registry::not_peft,
};

enum Kind {
    Pissa,
    Olora,
    /// Sites reading the same input share one covariance.
    Corda { kpm: bool, batches: usize, covariances: HashMap<String, Arc<Covariance>> },
}

pub struct ResidualLora {
    name: &'static str,
    kind: Kind,
    lora: Lora,
    /// `(A0, B0)` per site: the initial adapter, subtracted from the base.
    init: BTreeMap<String, (Tensor, Tensor)>,
    /// Loaded from a converted (final) adapter: a plain LoRA on the original base.
    converted: bool,
}

fn create(spec: &MethodSpec, kind: Kind) -> Result<Box<dyn Method>> {
    let name = match kind {
        Kind::Pissa => "pissa",
        Kind::Olora => "olora",
        Kind::Corda { .. } => "corda",
    };
    Ok(Box::new(ResidualLora { name, kind, lora: Lora::new(spec.lora_config(), spec.seed)?, init: BTreeMap::new(), converted: false }))
}

fn init_key(site: &str, which: char) -> String {
    format!("base_model.model.{site}.lora_{which}0.weight")
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value, name: &'static str) -> Result<Box<dyn Method>> {
    let kind = match name {
        "pissa" => Kind::Pissa,
        "olora" => Kind::Olora,
        _ => Kind::Corda { kpm: false, batches: 0, covariances: HashMap::new() },
    };
    if cfg.get("ferrotune_residual").and_then(|v| v.as_bool()) != Some(true) {
        let lora = Lora::load_peft(model, dir)?;
        return Ok(Box::new(ResidualLora { name, kind, lora, init: BTreeMap::new(), converted: true }));
    }
    // Native: rebuild each residual from the original base and the initial adapter.
    let config = read_peft_config(&dir.join(ADAPTER_CONFIG), false)?;
    let (mut tensors, w_path) = read_peft_tensors(dir)?;
    let chosen = config.target_modules.site_names(model)?;
    let mut init = BTreeMap::new();
    for lin in model.linears_mut().filter(|l| chosen.contains(&l.name)) {
        let info = lin.info();
        let r = config.rank_of(&lin.name);
        let a0 = take_checked(&mut tensors, &init_key(&lin.name, 'A'), &[r, info.in_features], &lin.name, &w_path)?;
        let b0 = take_checked(&mut tensors, &init_key(&lin.name, 'B'), &[info.out_features, r], &lin.name, &w_path)?;
        lin.weight = residual_weight(lin.weight.to_f32_vec(), &a0, &b0, config.scaling_of(&lin.name), info.out_features, info.in_features)?;
        init.insert(lin.name.clone(), (a0, b0));
    }
    let mut lora = Lora::new(config, 0)?;
    lora.residual_of = init.clone();
    lora.attach_given(model, tensors, &w_path)?;
    Ok(Box::new(ResidualLora { name, kind, lora, init, converted: false }))
}

/// The residual base weight `W − s·B0·A0` (f32, as the adapter adds `s·B0·A0` back). Attaching
/// and loading a native checkpoint both build it here, so a resumed run's base is bit-identical.
fn residual_weight(w: Vec<f32>, a0: &Tensor, b0: &Tensor, s: f64, out: usize, inp: usize) -> Result<FrozenWeight> {
    let mut w = w;
    let ba: Vec<f32> = b0.matmul(a0)?.flatten_all()?.to_vec1()?;
    w.iter_mut().zip(&ba).for_each(|(w, d)| *w -= s as f32 * d);
    Ok(FrozenWeight::from_f32(w, out, inp)?)
}

/// `XᵀX` summed over sequences, each scaled by `1/|max(X)|` as PEFT's CorDA hook does (the
/// largest signed value, not the largest magnitude), accumulated in f32 as PEFT does, and the
/// number of sequences.
struct Covariance {
    /// Lower triangle, see [`gram_lower_accumulate`].
    c: Vec<f32>,
    n: usize,
    count: usize,
    first_hash: Option<u64>,
    /// Another site reads the same input and computes this covariance.
    alias: bool,
}

impl Covariance {
    fn new(n: usize) -> Self {
        Self { c: vec![0.0; n * n], n, count: 0, first_hash: None, alias: false }
    }

    fn mean(&self) -> Mat {
        let count = self.count as f64;
        Mat::from_fn(self.n, self.n, |i, j| gram_entry(&self.c, self.n, i, j) as f64 / count)
    }
}

impl InputSink for Covariance {
    fn wants_input(&self) -> bool {
        !self.alias
    }

    fn add(&mut self, x: &[f32], rows: usize, n: usize, _targets: &[i32]) -> Result<()> {
        if rows == 0 || self.alias {
            return Ok(());
        }
        self.first_hash.get_or_insert_with(|| input_hash(x));
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max).abs();
        if !max.is_finite() || max == 0.0 {
            return Err(Error::Model("CorDA: a site's inputs are zero or not finite; the covariance would be invalid".into()));
        }
        // (X/max)ᵀ(X/max) = XᵀX/max²
        gram_lower_accumulate(&mut self.c, x, rows, n, 1.0 / (max * max));
        self.count += 1;
        Ok(())
    }
}

/// CorDA's damped covariance `C + δ·mean(diag C)·I` and its Cholesky factor, δ doubling from
/// 0.01 until solves with it are accurate (PEFT's `collect_eigens_for_layer` doubles δ until its
/// f32 inverse is accurate). Only `C⁻¹` applied to the r kept directions is needed, so a
/// Cholesky solve replaces the inverse: a third of the work, and no n³ product to check it.
struct Damped {
    fixed: Mat,
    chol: linalg::Cholesky,
}

fn damp(cov: &Mat) -> Result<Damped> {
    let n = cov.nrows();
    let mean_diag = (0..n).map(|i| cov[(i, i)]).sum::<f64>() / n as f64;
    let mut rng = crate::rng::SplitMix64::new(0xc0da);
    let probe = Mat::from_fn(n, 4, |_, _| rng.next_f32() as f64 - 0.5);
    let mut damp = 0.01;
    loop {
        let fixed = cov + Mat::identity(n, n) * (mean_diag * damp);
        if let Some(chol) = linalg::Cholesky::new(&fixed) {
            let err = (linalg::matmul(&fixed, &chol.solve(&probe)) - &probe).norm() / probe.norm();
            if err < 1e-6 {
                return Ok(Damped { fixed, chol });
            }
        }
        damp *= 2.0;
        if damp > 1e6 {
            return Err(Error::Model("CorDA: the input covariance cannot be inverted even with heavy damping".into()));
        }
    }
}

/// CorDA's decomposition of one site (PEFT's `corda_init`) from its damped covariance: the SVD
/// of `W·C`, of which IPM keeps the r largest directions (computed alone, see
/// [`linalg::top_svd`]) and KPM the r smallest (from the full SVD: the small singular values
/// need it).
fn corda_factors(w: &Mat, d: &Damped, r: usize, s: f64, kpm: bool) -> Result<(Mat, Mat)> {
    let wc = linalg::matmul(w, &d.fixed);
    let kept = if kpm {
        linalg::svd(&wc)?.tail(r)
    } else {
        linalg::top_svd(&wc, r)?
    };
    // A = √(S/s)·Vh·C⁻¹ by rows (Aᵀ = C⁻¹·V·√(S/s): C is symmetric), B = U·√(S/s) by columns.
    let v_inv = d.chol.solve(&kept.vt.transpose());
    let a = Mat::from_fn(r, w.ncols(), |i, j| v_inv[(j, i)] * (kept.s[i] / s).sqrt());
    let b = Mat::from_fn(w.nrows(), r, |i, j| kept.u[(i, j)] * (kept.s[j] / s).sqrt());
    Ok((a, b))
}

/// PiSSA: `A = √(S_r/s)·Vᵀ_r`, `B = U_r·√(S_r/s)`.
fn pissa_factors(w: &Mat, r: usize, s: f64) -> Result<(Mat, Mat)> {
    let d = linalg::top_svd(w, r)?;
    let a = Mat::from_fn(r, w.ncols(), |i, j| d.vt[(i, j)] * (d.s[i] / s).sqrt());
    let b = Mat::from_fn(w.nrows(), r, |i, j| d.u[(i, j)] * (d.s[j] / s).sqrt());
    Ok((a, b))
}

/// OLoRA: `W = Q·R`, `B = Q[:, :r]`, `A = R[:r]`.
fn olora_factors(w: &Mat, r: usize) -> (Mat, Mat) {
    let (q, rr) = linalg::qr(w);
    (rr.rows(0, r).into_owned(), q.columns(0, r).into_owned())
}

impl Method for ResidualLora {
    fn name(&self) -> &'static str {
        self.name
    }

    fn init_batches(&self) -> usize {
        match &self.kind {
            Kind::Corda { batches, .. } => *batches,
            _ => 0,
        }
    }

    fn prepare(&mut self, model: &mut Llama, batches: &[Batch]) -> Result<()> {
        let Kind::Corda { covariances, .. } = &mut self.kind else { return Ok(()) };
        let sites = self.lora.config.target_modules.site_names(model)?;
        let mut leader: Vec<usize> = (0..sites.len()).collect();
        let sinks = cycle_inputs(model, &sites, batches, batches.len(), "CorDA: collecting input covariances", |_, n| Covariance::new(n), |sinks, count| {
            if count == 1 {
                // Sites reading the same input (q/k/v, gate/up) share the first one's covariance.
                leader = leaders(&sinks.iter().map(|s| s.first_hash).collect::<Vec<_>>());
                for (_, s) in sinks.iter_mut().enumerate().filter(|(i, _)| leader[*i] != *i) {
                    s.alias = true;
                    s.c = Vec::new();
                }
            }
            Ok(false)
        })?;
        let mut shared: Vec<Option<Arc<Covariance>>> = vec![None; sites.len()];
        for (i, cov) in sinks.into_iter().enumerate() {
            // A leader comes before the sites that share its covariance.
            shared[i] = match leader[i] {
                l if l != i => shared[l].clone(),
                _ if cov.count == 0 => return Err(Error::Model(format!("CorDA: no input reached `{}`", sites[i]))),
                _ => Some(Arc::new(cov)),
            };
        }
        covariances.extend(sites.into_iter().zip(shared.into_iter().flatten()));
        Ok(())
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let config = self.lora.config.clone();
        let chosen = config.target_modules.site_names(model)?;
        if config.r > model.sites().iter().filter(|s| chosen.contains(&s.name)).map(|s| s.in_features.min(s.out_features)).min().unwrap_or(usize::MAX) {
            return Err(Error::config("lora_r", format!("is {}, above the smallest dimension of a target matrix", config.r)));
        }
        // Sites reading the same input share one covariance: each group in parallel damps and
        // factors its covariance once, decomposes its sites, and lets go of both (the
        // covariances and Cholesky factors of a whole model would take gigabytes).
        let mut groups: Vec<(Option<Arc<Covariance>>, Vec<(String, FrozenWeight)>)> = Vec::new();
        for lin in model.linears().filter(|l| chosen.contains(&l.name)) {
            let cov = match &mut self.kind {
                Kind::Corda { covariances, .. } => Some(
                    covariances.remove(&lin.name).ok_or_else(|| Error::Model(format!("CorDA: no covariance for `{}` (prepare did not run)", lin.name)))?,
                ),
                _ => None,
            };
            let site = (lin.name.clone(), lin.weight.clone());
            match groups.iter_mut().find(|(c, _)| matches!((c, &cov), (Some(a), Some(b)) if Arc::ptr_eq(a, b))) {
                Some((_, sites)) => sites.push(site),
                None => groups.push((cov, vec![site])),
            }
        }
        let kpm = matches!(self.kind, Kind::Corda { kpm: true, .. });
        let kind = &self.kind;
        crate::note!("{}: decomposing {} matrices", self.name, groups.iter().map(|g| g.1.len()).sum::<usize>());
        let done: Vec<(String, Tensor, Tensor, FrozenWeight)> = groups
            .into_par_iter()
            .map(|(cov, sites)| {
                let damped = cov.map(|c| damp(&c.mean())).transpose()?;
                sites
                    .into_iter()
                    .map(|(name, weight)| {
                        let (r, s) = (config.rank_of(&name), config.scaling_of(&name));
                        let (out, inp) = weight.dims();
                        let w32 = weight.to_f32_vec();
                        let w = linalg::from_rows(out, inp, &w32);
                        let (a, b) = match (kind, &damped) {
                            (Kind::Pissa, _) => pissa_factors(&w, r, s)?,
                            (Kind::Olora, _) => olora_factors(&w, r),
                            (Kind::Corda { .. }, Some(d)) => corda_factors(&w, d, r, s, kpm)?,
                            (Kind::Corda { .. }, None) => unreachable!("CorDA sites are grouped with their covariance"),
                        };
                        drop(w);
                        let (a, b) = (linalg::to_tensor(&a)?, linalg::to_tensor(&b)?);
                        let residual = residual_weight(w32, &a, &b, s, out, inp)?;
                        Ok((name, a, b, residual))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        for (name, a, b, residual) in done {
            model.linears_mut().find(|l| l.name == name).expect("chosen from this model").weight = residual;
            self.init.insert(name, (a, b));
        }
        let init = &self.init;
        self.lora.residual_of = init.clone();
        self.lora.attach_with(model, |_, site, _, _, _| Ok(init[site].clone()))
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.lora.params()
    }

    fn sites(&self) -> Vec<String> {
        Method::sites(&self.lora)
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.lora.config.target_modules.select(sites, "lora_target_modules")?;
        let r = self.lora.config.r as u64;
        let trainable_params = chosen.iter().map(|s| r * (s.in_features + s.out_features) as u64).sum();
        // The f32 residuals (replacing what the base stored), the initial A0, B0, and for CorDA
        // one in×in f32 covariance per site during prepare's first batch (then one per distinct
        // input).
        let residual: u64 = chosen.iter().map(|s| 4 * (s.in_features * s.out_features) as u64 + 4 * r * (s.in_features + s.out_features) as u64).sum();
        let cov: u64 = match self.kind {
            Kind::Corda { .. } => chosen.iter().map(|s| 4 * (s.in_features * s.in_features) as u64).sum(),
            _ => 0,
        };
        Ok(Some(PlannedMemory { trainable_params, extra_bytes: residual + cov, floats_per_token: 0, fused_blocks: true, ..Default::default() }))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        if self.converted {
            return self.lora.save_as(dir, base_model, self.name, &[]);
        }
        let pairs = self.as_lora().expect("a residual LoRA converts to LoRA pairs");
        let c = &self.lora.config;
        let config = LoraConfig {
            r: 2 * c.r,
            alpha: if c.use_rslora { c.alpha * 2f64.sqrt() } else { 2.0 * c.alpha },
            rank_pattern: c.rank_pattern.iter().map(|(k, v)| (k.clone(), 2 * v)).collect(),
            alpha_pattern: c.alpha_pattern.iter().map(|(k, v)| (k.clone(), 2.0 * v)).collect(),
            ..c.clone()
        };
        let tensors: Vec<(String, Tensor)> = pairs.into_iter().flat_map(|p| [(peft_key(&p.site, 'A'), p.a), (peft_key(&p.site, 'B'), p.b)]).collect();
        Lora::save_tensors(dir, base_model, self.name, &config, &tensors)
    }

    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        if self.converted {
            return self.save(dir, base_model);
        }
        let extra: Vec<(String, Tensor)> =
            self.init.iter().flat_map(|(site, (a0, b0))| [(init_key(site, 'A'), a0.clone()), (init_key(site, 'B'), b0.clone())]).collect();
        let mut tensors: Vec<(String, Tensor)> = self.lora.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        tensors.extend(extra);
        Lora::save_tensors_with(dir, base_model, self.name, &self.lora.config, &tensors, &[("ferrotune_residual", serde_json::Value::from(true))])
    }

    fn peft_compatible(&self) -> bool {
        true
    }

    /// On the residual base: `W_res + s·B·A = W0 + s·(B·A − B0·A0)`.
    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.lora.merge_into(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    /// The pairs relative to the *original* base: `[A; A0]`, `[B, −B0]` (rank 2r).
    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        if self.converted {
            return Some(self.lora.pairs());
        }
        self.lora
            .pairs()
            .into_iter()
            .map(|p| {
                let (a0, b0) = self.init.get(&p.site)?;
                let a = Tensor::cat(&[&p.a, a0], 0).ok()?;
                let b = Tensor::cat(&[&p.b, &b0.neg().ok()?], 1).ok()?;
                Some(LoraPair { site: p.site, a, b, scaling: p.scaling })
            })
            .collect()
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.lora.describe_lora();
        d["init"] = serde_json::Value::from(match &self.kind {
            Kind::Pissa => "pissa (top-r SVD of W)".to_string(),
            Kind::Olora => "olora (QR of W)".to_string(),
            Kind::Corda { kpm, .. } => format!("corda ({})", if *kpm { "kpm" } else { "ipm" }),
        });
        d["residual_sites"] = serde_json::Value::from(self.init.len());
        d
    }
}
