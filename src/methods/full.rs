//! Full fine-tuning of chosen linear sites (`adapter = "full"`): every site that
//! `lora_target_modules` selects trains its whole weight, held as an f32 master copy; the rest
//! of the model stays as loaded (GGUF blocks, bf16, f32), and the weight gradient `gᵀx` is
//! formed for the chosen sites only. The adapter folder holds the trained matrices under their
//! Hugging Face names (`<site>.weight`), so resuming is exact and merging is a replacement.

use super::files::{refuse_leftovers, write_adapter};
use super::registry::Entry;
use super::targets::{hook_targets, TargetModules};
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHOD_KEY};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::kernels::FrozenWeight;
use crate::models::linear::add_bias;
use crate::models::{BlockSiteInfo, ForwardCtx, Llama, SiteHook, SiteInfo};
use candle_core::{Tensor, Var};
use std::path::Path;
use std::sync::Arc;

pub const FULL: Entry = Entry {
    name: "full",
    summary: "full fine-tuning of the target linears' whole weights (f32 master copies of those only); merges by replacement",
    keys: &[],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    Ok(Box::new(Full::new("full", spec.target_modules.clone())))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    Ok(Box::new(Full::load(model, dir, cfg, "full")?))
}

impl Full {
    /// Trains the whole weights of the sites `targets` selects; `name` is the method it serves
    /// (`full`, or a selection rule such as HFT's), written to the adapter config.
    pub fn new(name: &'static str, targets: TargetModules) -> Self {
        Full { name, targets, sites: Vec::new() }
    }

    /// Reads and attaches an adapter folder written by [`Method::save`].
    pub fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value, name: &'static str) -> Result<Self> {
        let targets = TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules")
            .map_err(|e| Error::format(&dir.join(ADAPTER_CONFIG), e.to_string()))?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        let mut tensors = st::load_f32(&w_path)?;
        let mut full = Full::new(name, targets);
        full.attach_with(model, |lin| {
            let (out_f, in_f) = lin.weight.dims();
            super::lora::take_checked(&mut tensors, &key(&lin.name), &[out_f, in_f], &lin.name, &w_path)
        })?;
        refuse_leftovers(&tensors, &w_path, "trained module")?;
        Ok(full)
    }

    pub fn targets(&self) -> &TargetModules {
        &self.targets
    }
}

fn key(site: &str) -> String {
    format!("{site}.weight")
}

struct FullSite {
    site: String,
    /// The trained weight `[out, in]`, f32.
    w: Var,
}

/// A site computed with a dense weight `w: [out, in]` of its own in place of the frozen one,
/// differentiable in training, detached otherwise (full fine-tuning, grafting).
pub(crate) fn dense_forward(w: &Var, x: &Tensor, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
    let w = if ctx.train { w.as_tensor().clone() } else { w.as_detached_tensor() };
    add_bias(x.broadcast_matmul(&w.t()?)?, b0)
}

impl SiteHook for FullSite {
    fn forward(&self, x: &Tensor, _w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        dense_forward(&self.w, x, b0, ctx)
    }
}

pub struct Full {
    name: &'static str,
    targets: TargetModules,
    sites: Vec<Arc<FullSite>>,
}

impl Full {
    fn attach_with(&mut self, model: &mut Llama, mut init: impl FnMut(&crate::models::Linear) -> Result<Tensor>) -> Result<()> {
        let sites = hook_targets(model, &self.targets, |_, lin| Ok(Arc::new(FullSite { site: lin.name.clone(), w: Var::from_tensor(&init(lin)?)? })))?;
        self.sites.extend(sites);
        Ok(())
    }
}

impl Method for Full {
    fn name(&self) -> &'static str {
        self.name
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        // The master copy starts as the loaded weight, dequantized.
        self.attach_with(model, |lin| Ok(lin.weight.to_tensor()?))
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.iter().map(|s| (key(&s.site), s.w.clone())).collect()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.targets.select(sites, "lora_target_modules")?;
        let weights: u64 = chosen.iter().map(|s| (s.out_features * s.in_features) as u64).sum();
        // The trainable values (with gradient and moments, counted by the estimate), and per
        // token each chosen site's input, kept for the weight gradient.
        Ok(Some(PlannedMemory { trainable_params: weights, extra_bytes: 0, floats_per_token: chosen.iter().map(|s| s.in_features as u64).sum(), ..Default::default() }))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let cfg = serde_json::json!({
            METHOD_KEY: self.name,
            "base_model_name_or_path": base_model,
            "target_modules": self.targets.to_json(),
            "ferrotune_version": env!("CARGO_PKG_VERSION"),
        });
        let tensors: Vec<(String, Tensor)> = self.sites.iter().map(|s| (key(&s.site), s.w.as_detached_tensor())).collect();
        write_adapter(dir, &tensors, &cfg, false)
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            if let Some(site) = self.sites.iter().find(|s| s.site == lin.name) {
                lin.weight = FrozenWeight::from_tensor(&site.w.as_detached_tensor())?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "sites": self.sites.len(), "trained_entries": self.num_params() })
    }
}

/// Full fine-tuning of the sites a rule picks from the model when the method is attached:
/// HFT's half of the projections, LocFT-BF's location. The rule's settings are written to the
/// adapter config (`selection`), and a reloaded adapter trains the sites it holds.
pub struct Selected {
    name: &'static str,
    rule: fn(&[SiteInfo], &serde_json::Value) -> Result<Vec<String>>,
    settings: serde_json::Value,
    full: Option<Full>,
}

impl Selected {
    pub fn new(name: &'static str, rule: fn(&[SiteInfo], &serde_json::Value) -> Result<Vec<String>>, settings: serde_json::Value) -> Self {
        Selected { name, rule, settings, full: None }
    }

    /// Reads an adapter folder a `Selected` of this `name` wrote.
    pub fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value, name: &'static str, rule: fn(&[SiteInfo], &serde_json::Value) -> Result<Vec<String>>) -> Result<Self> {
        let settings = cfg.get("selection").cloned().ok_or_else(|| Error::format(&dir.join(ADAPTER_CONFIG), "field `selection` is missing"))?;
        Ok(Selected { name, rule, settings, full: Some(Full::load(model, dir, cfg, name)?) })
    }

    fn full(&self) -> &Full {
        self.full.as_ref().expect("used only once attached")
    }
}

impl Method for Selected {
    fn name(&self) -> &'static str {
        self.name
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let chosen = (self.rule)(&model.sites(), &self.settings)?;
        let mut full = Full::new(self.name, TargetModules::Names(chosen));
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
        Full::new(self.name, TargetModules::Names((self.rule)(sites, &self.settings)?)).planned_memory(sites, blocks)
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.full().save(dir, base_model)?;
        super::files::amend_config(dir, &[("selection", self.settings.clone())])
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.full().merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.full.as_ref().map_or(serde_json::json!({}), |f| f.describe());
        d["selection"] = self.settings.clone();
        d["trained_modules"] = self.sites().into();
        d
    }
}
