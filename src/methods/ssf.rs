//! SSF, Scaling & Shifting Features (METHODS.md §2.6): after each selected linear site a
//! per-channel scale and shift, `y = γ ⊙ (W0·x + b) + β`. Merges exactly into the site:
//! `W ← diag(γ)·W0`, `b ← γ ⊙ b + β` (a site without a bias gains one).
//!
//! Init: the paper's code draws `γ ~ N(1, 0.02²)`, `β ~ N(0, 0.02²)`; ferrotune's default is
//! `γ = 1, β = 0` exactly (`ssf_init = "identity"`), so that attaching SSF leaves the model's
//! output unchanged, as every other method here does at step 0; `ssf_init = "normal"` gives
//! the official draw.

use super::files::{param_tensors, refuse_leftovers, write_adapter};
use super::registry::Entry;
use super::targets::{hook_targets, TargetModules};
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHOD_KEY};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::kernels::FrozenWeight;
use crate::models::{BlockSiteInfo, ForwardCtx, Llama, SiteHook, SiteInfo};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub const SSF: Entry = Entry {
    name: "ssf",
    summary: "SSF: per-channel scale γ and shift β after each target linear, y = γ⊙(W0·x + b) + β; merges into weight and bias",
    keys: &["ssf_init"],
    create: create,
    load: load,
    claims_peft: super::registry::not_peft,
};

const INITS: &[&str] = &["identity", "normal"];

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let init = spec.choice_or("ssf_init", INITS)?;
    Ok(Box::new(Ssf { targets: spec.target_modules.clone(), init, seed: spec.seed, sites: Vec::new() }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let targets = TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules")
        .map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = st::load_f32(&w_path)?;
    let mut ssf = Ssf { targets, init: "identity", seed: 0, sites: Vec::new() };
    ssf.attach_with(model, |_, site, out_f| {
        let take = |t: &mut HashMap<String, Tensor>, which: &str| super::lora::take_checked(t, &key(site, which), &[out_f], site, &w_path);
        Ok((take(&mut tensors, "scale")?, take(&mut tensors, "shift")?))
    })?;
    refuse_leftovers(&tensors, &w_path, "adapted module")?;
    Ok(Box::new(ssf))
}

/// The adapter file's key for a site's γ (`scale`) or β (`shift`).
fn key(site: &str, which: &str) -> String {
    format!("{site}.ssf_{which}")
}

struct SsfSite {
    site: String,
    /// γ, `[out]`.
    scale: Var,
    /// β, `[out]`.
    shift: Var,
}

impl SiteHook for SsfSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (g, b) = if ctx.train {
            (self.scale.as_tensor().clone(), self.shift.as_tensor().clone())
        } else {
            (self.scale.as_detached_tensor(), self.shift.as_detached_tensor())
        };
        // γ⊙(W0·x + b0) + β as γ⊙(W0·x) + (γ⊙b0 + β): the bias rides on the shift, so no
        // biased copy of the output is made or kept for the backward.
        let shift = match b0 {
            Some(b0) => ((&g * b0)? + &b)?,
            None => b,
        };
        crate::kernels::scale_shift_columns(&crate::kernels::frozen_linear(x, w0)?, &g, &shift)
    }
}

pub struct Ssf {
    targets: TargetModules,
    init: &'static str,
    seed: u64,
    sites: Vec<Arc<SsfSite>>,
}

impl Ssf {
    fn attach_with(&mut self, model: &mut Llama, mut init: impl FnMut(usize, &str, usize) -> Result<(Tensor, Tensor)>) -> Result<()> {
        let sites = hook_targets(model, &self.targets, |i, lin| {
            let (scale, shift) = init(i, &lin.name, lin.info().out_features)?;
            Ok(Arc::new(SsfSite { site: lin.name.clone(), scale: Var::from_tensor(&scale)?, shift: Var::from_tensor(&shift)? }))
        })?;
        self.sites.extend(sites);
        Ok(())
    }
}

/// `n` draws of N(mean, std²) (Box–Muller over the seeded stream).
fn normal(rng: &mut SplitMix64, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = rng.next_f32().max(f32::MIN_POSITIVE);
            let u2 = rng.next_f32();
            mean + std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

impl Method for Ssf {
    fn name(&self) -> &'static str {
        "ssf"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let (init, seed) = (self.init, self.seed);
        self.attach_with(model, |i, _, out_f| {
            let (g, b) = if init == "normal" {
                let mut rng = SplitMix64::derive(seed, &[0x55f, i as u64]);
                (normal(&mut rng, out_f, 1.0, 0.02), normal(&mut rng, out_f, 0.0, 0.02))
            } else {
                (vec![1.0; out_f], vec![0.0; out_f])
            };
            Ok((Tensor::from_vec(g, out_f, &Device::Cpu)?, Tensor::from_vec(b, out_f, &Device::Cpu)?))
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.iter().flat_map(|s| [(key(&s.site, "scale"), s.scale.clone()), (key(&s.site, "shift"), s.shift.clone())]).collect()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.targets.select(sites, "lora_target_modules")?;
        // Kept per token for the backward: each site's unscaled output (γ's gradient reads it).
        Ok(Some(PlannedMemory { trainable_params: chosen.iter().map(|s| 2 * s.out_features as u64).sum(), extra_bytes: 0, floats_per_token: chosen.iter().map(|s| s.out_features as u64).sum(), ..Default::default() }))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let cfg = serde_json::json!({
            METHOD_KEY: "ssf",
            "base_model_name_or_path": base_model,
            "target_modules": self.targets.to_json(),
            "ssf_init": self.init,
            "ferrotune_version": env!("CARGO_PKG_VERSION"),
        });
        write_adapter(dir, &param_tensors(self.params()), &cfg, false)
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            let Some(site) = self.sites.iter().find(|s| s.site == lin.name) else { continue };
            let g = site.scale.as_detached_tensor();
            let w = lin.weight.to_tensor()?.broadcast_mul(&g.unsqueeze(1)?)?;
            let b = match &lin.bias {
                Some(b0) => ((b0 * &g)? + site.shift.as_detached_tensor())?,
                None => site.shift.as_detached_tensor(),
            };
            lin.weight = FrozenWeight::from_tensor(&w)?;
            lin.bias = Some(b);
            lin.hook = None;
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "init": self.init, "sites": self.sites.len() })
    }
}
