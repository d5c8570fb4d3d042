//! FLoRA (METHODS.md §2.4): the update of an N-mode weight is a Tucker product of a small core
//! `G ∈ R^{r_1×…×r_N}` with one factor per mode `U_i ∈ R^{n_i×r_i}`:
//! `ΔW = s · G ×_1 U_1 ×_2 U_2 … ×_N U_N`, modes ordered (in, out, extra…) and the first two
//! swapped to the framework's (out, in, …) layout. [`tucker_product`] is that for any N; the
//! linear sites used now are N = 2, where `ΔW = s · U_out·Gᵀ·U_inᵀ`: a low-rank product with a
//! full `r×r` core, run through the fused LoRA kernel as `A = U_inᵀ`, `B = U_out·Gᵀ`.
//!
//! Init: every `U_i` Kaiming-normal (a = √3: std = 1/√(2·r_i), fan-in being the factor's second
//! dimension as torch counts it), `G = 0`, so `ΔW = 0` at step 0. Scaling: the official
//! example's `s = 4` is for convolutions; on linear sites ferrotune uses LoRA's `s = α/r`
//! (`lora_alpha`, `lora_r`), so FLoRA and LoRA runs share their keys. PEFT has no FLoRA: the
//! adapter folder holds FLoRA's own tensors; merged models and llama.cpp LoRA GGUFs (the exact
//! `A`, `B` above) carry it to other tools.

use super::lora::take_checked;
use super::files::{param_tensors, refuse_leftovers, write_adapter};
use super::registry::Entry;
use super::targets::{hook_targets, TargetModules};
use super::{LoraPair, Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHOD_KEY};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, BlockSiteInfo, ForwardCtx, Llama, SiteHook, SiteInfo};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;
use std::sync::Arc;

pub const FLORA: Entry = Entry {
    name: "flora",
    summary: "FLoRA: Tucker-core update ΔW = s·G ×₁ U_in ×₂ U_out (a full r×r core between two factors on linear sites)",
    keys: &[],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    if spec.r == 0 {
        return Err(Error::config("lora_r", "must be at least 1"));
    }
    let scaling = spec.alpha / spec.r as f64;
    Ok(Box::new(Flora { targets: spec.target_modules.clone(), r: spec.r, alpha: spec.alpha, scaling, seed: spec.seed, sites: Vec::new() }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let num = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).ok_or_else(|| Error::format(&cfg_path, format!("field `{k}`: missing or not a number")));
    let (r, alpha) = (num("r")? as usize, num("lora_alpha")?);
    if r == 0 {
        return Err(Error::format(&cfg_path, "field `r`: must be at least 1"));
    }
    let targets = TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules")
        .map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = st::load_f32(&w_path)?;
    let mut f = Flora { targets, r, alpha, scaling: alpha / r as f64, seed: 0, sites: Vec::new() };
    f.attach_with(model, |_, site, n, m| {
        let mut take = |which: &str, shape: &[usize]| take_checked(&mut tensors, &key(site, which), shape, site, &w_path);
        Ok([take("in", &[n, r])?, take("out", &[m, r])?, take("core", &[r, r])?])
    })?;
    refuse_leftovers(&tensors, &w_path, "adapted module")?;
    Ok(Box::new(f))
}

fn key(site: &str, which: &str) -> String {
    format!("{site}.flora_{which}")
}

/// `core ×_1 U_1 ×_2 U_2 … ×_N U_N` for a row-major core of dims `core_dims` (`r_1…r_N`) and
/// row-major factors `U_i: [n_i, r_i]`; returns the row-major result of dims `n_1…n_N`. Each
/// mode product replaces mode `i`'s `r_i` by `n_i`: `out[…, a, …] = Σ_k U_i[a, k] · t[…, k, …]`.
pub fn tucker_product(core: &[f32], core_dims: &[usize], factors: &[(&[f32], usize)]) -> Vec<f32> {
    assert_eq!(core_dims.len(), factors.len(), "one factor per mode");
    let mut t = core.to_vec();
    let mut dims = core_dims.to_vec();
    for (mode, &(u, n)) in factors.iter().enumerate() {
        let r = dims[mode];
        assert_eq!(u.len(), n * r, "factor {mode} must be [{n}, {r}]");
        let outer: usize = dims[..mode].iter().product();
        let inner: usize = dims[mode + 1..].iter().product();
        let mut next = vec![0f32; outer * n * inner];
        for o in 0..outer {
            for a in 0..n {
                for k in 0..r {
                    let w = u[a * r + k];
                    if w == 0.0 {
                        continue;
                    }
                    let src = &t[(o * r + k) * inner..(o * r + k + 1) * inner];
                    let dst = &mut next[(o * n + a) * inner..(o * n + a + 1) * inner];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += w * s);
                }
            }
        }
        t = next;
        dims[mode] = n;
    }
    t
}

struct FloraSite {
    site: String,
    /// `U_in: [in, r]`, `U_out: [out, r]`, core `G: [r_in, r_out]`.
    u_in: Var,
    u_out: Var,
    core: Var,
    scaling: f64,
}

impl FloraSite {
    fn vars(&self) -> [(&'static str, &Var); 3] {
        [("in", &self.u_in), ("out", &self.u_out), ("core", &self.core)]
    }

    /// The LoRA form of the 2-mode update: `A = U_inᵀ`, `B = U_out·Gᵀ`.
    fn lora_factors(&self, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let t = |v: &Var| if train { v.as_tensor().clone() } else { v.as_detached_tensor() };
        let a = t(&self.u_in).t()?.contiguous()?;
        let b = t(&self.u_out).matmul(&t(&self.core).t()?)?;
        Ok((a, b))
    }
}

impl SiteHook for FloraSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (a, b) = self.lora_factors(ctx.train)?;
        add_bias(crate::kernels::lora_linear(x, w0, &a, &b, self.scaling as f32, 0.0, 0)?, b0)
    }
}

pub struct Flora {
    targets: TargetModules,
    r: usize,
    alpha: f64,
    scaling: f64,
    seed: u64,
    sites: Vec<Arc<FloraSite>>,
}

impl Flora {
    fn attach_with(&mut self, model: &mut Llama, mut init: impl FnMut(usize, &str, usize, usize) -> Result<[Tensor; 3]>) -> Result<()> {
        let scaling = self.scaling;
        let sites = hook_targets(model, &self.targets, |i, lin| {
            let info = lin.info();
            let [u_in, u_out, core] = init(i, &lin.name, info.in_features, info.out_features)?;
            Ok(Arc::new(FloraSite {
                site: lin.name.clone(),
                u_in: Var::from_tensor(&u_in)?,
                u_out: Var::from_tensor(&u_out)?,
                core: Var::from_tensor(&core)?,
                scaling,
            }))
        })?;
        self.sites.extend(sites);
        Ok(())
    }

    /// `ΔW = s·U_out·Gᵀ·U_inᵀ`, `[out, in]`, through the N-mode product.
    fn delta(&self, s: &FloraSite) -> Result<Tensor> {
        let v = |x: &Var| -> Result<Vec<f32>> { Ok(x.as_detached_tensor().flatten_all()?.to_vec1()?) };
        let (n, m) = (s.u_in.dims()[0], s.u_out.dims()[0]);
        // Modes (in, out): the result is [in, out]; swap to [out, in].
        let d = tucker_product(&v(&s.core)?, &[self.r, self.r], &[(&v(&s.u_in)?, n), (&v(&s.u_out)?, m)]);
        Ok((Tensor::from_vec(d, (n, m), &Device::Cpu)?.t()? * s.scaling)?)
    }
}

impl Method for Flora {
    fn name(&self) -> &'static str {
        "flora"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let (r, seed) = (self.r, self.seed);
        self.attach_with(model, |i, _, n, m| {
            // Kaiming-normal with a = √3 on [n_i, r]: gain √(2/(1+3)), fan-in r.
            let std = (0.5f32).sqrt() / (r as f32).sqrt();
            let mut rng = SplitMix64::derive(seed, &[0xf10, i as u64]);
            let mut normal = |len: usize| -> Vec<f32> {
                (0..len)
                    .map(|_| {
                        let u1 = rng.next_f32().max(f32::MIN_POSITIVE);
                        let u2 = rng.next_f32();
                        std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            Ok([
                Tensor::from_vec(normal(n * r), (n, r), &Device::Cpu)?,
                Tensor::from_vec(normal(m * r), (m, r), &Device::Cpu)?,
                Tensor::zeros((r, r), DType::F32, &Device::Cpu)?,
            ])
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.iter().flat_map(|s| s.vars().map(|(w, v)| (key(&s.site, w), v.clone()))).collect()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let r = self.r as u64;
        let chosen = self.targets.select(sites, "lora_target_modules")?;
        let trainable_params = chosen.iter().map(|s| r * (s.in_features + s.out_features) as u64 + r * r).sum();
        // The fused LoRA op keeps its rank-r product per token and site.
        Ok(Some(PlannedMemory { trainable_params, extra_bytes: 0, floats_per_token: r * chosen.len() as u64, ..Default::default() }))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let cfg = serde_json::json!({
            METHOD_KEY: "flora",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": self.targets.to_json(),
            "ferrotune_version": env!("CARGO_PKG_VERSION"),
        });
        write_adapter(dir, &param_tensors(self.params()), &cfg, false)
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            if let Some(s) = self.sites.iter().find(|s| s.site == lin.name) {
                lin.weight = FrozenWeight::from_tensor(&(lin.weight.to_tensor()? + self.delta(s)?)?)?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        self.sites
            .iter()
            .map(|s| s.lora_factors(false).ok().map(|(a, b)| LoraPair { site: s.site.clone(), a, b, scaling: s.scaling }))
            .collect()
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "rank": self.r, "scaling": self.scaling, "core": [self.r, self.r] })
    }
}
