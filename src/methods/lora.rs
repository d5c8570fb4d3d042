//! LoRA and rsLoRA (METHODS.md §1.1): `y = W0·x + b + s · B·(A·dropout(x))`, `s = α/r` (or
//! `α/√r`), A Kaiming-uniform(a=√5), B = 0. Adapters are read and written in PEFT's layout,
//! so they move freely between ferrotune and Hugging Face PEFT.

use super::files::{param_tensors, refuse_leftovers, write_adapter};
use super::registry::Entry;
use super::targets::{hook_targets, TargetModules};
use super::{LoraPair, Method, MethodSpec, METHOD_KEY};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::kernels::decoder_block::LoraFactors;
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, ForwardCtx, Llama, SiteHook};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub use super::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};

pub const LORA: Entry = Entry {
    name: "lora",
    summary: "LoRA (rsLoRA with use_rslora = true): y = W0·x + s·B·A·x, PEFT's layout",
    keys: &[],
    create: create_lora,
    load: load_lora,
    claims_peft: is_peft_lora,
};

fn create_lora(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    Ok(Box::new(Lora::new(spec.lora_config(), spec.seed)?))
}

fn load_lora(model: &mut Llama, dir: &Path, _cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    Ok(Box::new(Lora::load_peft(model, dir)?))
}

fn is_peft_lora(cfg: &serde_json::Value) -> bool {
    cfg.get("peft_type").and_then(|v| v.as_str()) == Some("LORA") && cfg.get("use_dora").and_then(|v| v.as_bool()) != Some(true)
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// Per-module ranks (PEFT's `rank_pattern`): a key applies to the site it names or ends
    /// (`.<key>`); other sites use `r`. EVA writes one when it redistributes ranks.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (PEFT's `alpha_pattern`), matched like `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl Default for LoraConfig {
    /// PEFT's `LoraConfig()` defaults on the attention projections (the plan's defaults).
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec()),
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// PEFT's rule for a pattern key: it names the module, or its last components.
fn pattern_value<T: Copy>(pattern: &BTreeMap<String, T>, site: &str) -> Option<T> {
    pattern.iter().find(|(k, _)| site == k.as_str() || site.ends_with(&format!(".{k}"))).map(|(_, v)| *v)
}

impl LoraConfig {
    /// The scaling of sites that follow the global `r` and `lora_alpha`.
    pub fn scaling(&self) -> f64 {
        self.scaling_for(self.r, self.alpha)
    }

    fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    pub fn rank_of(&self, site: &str) -> usize {
        pattern_value(&self.rank_pattern, site).unwrap_or(self.r)
    }

    pub fn scaling_of(&self, site: &str) -> f64 {
        self.scaling_for(self.rank_of(site), pattern_value(&self.alpha_pattern, site).unwrap_or(self.alpha))
    }
}

/// One adapted site's parameters; also the hook that runs them.
pub struct LoraSite {
    pub site: String,
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scaling: f64,
    dropout: f32,
    /// Distinguishes this site's dropout stream from every other site's.
    stream: u64,
    /// The initial `(A, B)` where the base weight is a residual `W − s·B0·A0` (PiSSA, OLoRA,
    /// CorDA): what a reference pass adds back to recover the original site.
    initial: Option<(Tensor, Tensor)>,
}

impl LoraSite {
    /// The seed of this site's dropout mask in the forward `ctx`.
    fn dropout_seed(&self, ctx: &ForwardCtx) -> u64 {
        SplitMix64::derive(ctx.seed, &[self.stream]).next_u64()
    }
}

impl SiteHook for LoraSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        // Outside training the parameters enter as constants, so no autograd graph (and none
        // of the activations it would keep alive) is built for evaluation or generation.
        let (a, b) = if ctx.train {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        };
        let dropout = if ctx.train { self.dropout } else { 0.0 };
        add_bias(crate::kernels::lora_linear(x, w0, &a, &b, self.scaling as f32, dropout, self.dropout_seed(ctx))?, b0)
    }

    fn lora_factors(&self, ctx: &ForwardCtx) -> Option<LoraFactors> {
        // Only where `forward` tracks the factors: the fused block's gradients are theirs.
        ctx.train.then(|| LoraFactors {
            a: self.a.clone(),
            b: self.b.clone(),
            scaling: self.scaling as f32,
            dropout: self.dropout,
            seed: self.dropout_seed(ctx),
        })
    }

    fn delta_weight(&self, train: bool) -> Option<candle_core::Result<Tensor>> {
        if train && self.dropout > 0.0 {
            return None;
        }
        let (a, b) = if train { (self.a.as_tensor().clone(), self.b.as_tensor().clone()) } else { (self.a.as_detached_tensor(), self.b.as_detached_tensor()) };
        Some(b.matmul(&a).and_then(|d| d * self.scaling))
    }

    fn reference_forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match &self.initial {
            Some((a0, b0_)) => add_bias(crate::kernels::lora_linear(x, w0, a0, b0_, self.scaling as f32, 0.0, 0)?, b0),
            None => add_bias(crate::kernels::frozen_linear(x, w0)?, b0),
        }
    }
}

/// LoRA and rsLoRA on the linear sites `target_modules` selects.
pub struct Lora {
    pub config: LoraConfig,
    pub sites: Vec<Arc<LoraSite>>,
    /// Seed of the Kaiming init of A (unused once attached).
    seed: u64,
    /// Per site, the initial factors a reference pass adds back (see [`LoraSite`]); set before
    /// attaching, by the residual methods.
    pub residual_of: BTreeMap<String, (Tensor, Tensor)>,
}

/// PEFT's key for a site's tensor: `base_model.model.<site>.lora_A.weight`.
pub fn peft_key(site: &str, which: char) -> String {
    format!("base_model.model.{site}.lora_{which}.weight")
}

/// PEFT's default init for one site: A Kaiming-uniform(a=√5) on `[r, in]`, whose bound is
/// gain·√(3/fan_in) = 1/√in, and B = 0; `i` is the site's index among all linear sites.
pub fn kaiming_init(seed: u64, i: usize, in_f: usize, out_f: usize, r: usize) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (in_f as f32).sqrt();
    let mut rng = SplitMix64::derive(seed, &[0x10a, i as u64]);
    let a: Vec<f32> = (0..r * in_f).map(|_| (2.0 * rng.next_f32() - 1.0) * bound).collect();
    Ok((Tensor::from_vec(a, (r, in_f), &Device::Cpu)?, Tensor::zeros((out_f, r), candle_core::DType::F32, &Device::Cpu)?))
}

impl Lora {
    /// A LoRA not yet attached to any model; [`Method::attach`] initialises it as PEFT does.
    pub fn new(config: LoraConfig, seed: u64) -> Result<Self> {
        if config.r == 0 {
            return Err(Error::config("lora_r", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::config("lora_dropout", "must be in [0, 1)"));
        }
        Ok(Self { config, sites: Vec::new(), seed, residual_of: BTreeMap::new() })
    }

    /// Attaches freshly initialised adapters (PEFT's default init) to the target sites.
    pub fn attach(model: &mut Llama, config: LoraConfig, seed: u64) -> Result<Self> {
        let mut lora = Self::new(config, seed)?;
        Method::attach(&mut lora, model)?;
        Ok(lora)
    }

    /// Attaches adapters with given tensors (PEFT keys), checking every shape and value.
    pub fn attach_tensors(model: &mut Llama, config: LoraConfig, tensors: HashMap<String, Tensor>, src: &Path) -> Result<Self> {
        let mut lora = Self::new(config, 0)?;
        lora.attach_given(model, tensors, src)?;
        Ok(lora)
    }

    /// Attaches this LoRA's sites with given tensors (PEFT keys), checking every shape and value.
    pub fn attach_given(&mut self, model: &mut Llama, mut tensors: HashMap<String, Tensor>, src: &Path) -> Result<()> {
        self.attach_with(model, |_, site, in_f, out_f, r| {
            let a = take_checked(&mut tensors, &peft_key(site, 'A'), &[r, in_f], site, src)?;
            let b = take_checked(&mut tensors, &peft_key(site, 'B'), &[out_f, r], site, src)?;
            Ok((a, b))
        })?;
        refuse_leftovers(&tensors, src, "adapted module")
    }

    /// Attaches one adapter per selected site, with tensors from `init(site index, site name,
    /// in, out, rank)`.
    pub fn attach_with(
        &mut self,
        model: &mut Llama,
        mut init: impl FnMut(usize, &str, usize, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<()> {
        let config = &self.config;
        let sites = hook_targets(model, &config.target_modules, |i, lin| {
            let info = lin.info();
            let (a, b) = init(i, &lin.name, info.in_features, info.out_features, config.rank_of(&lin.name))?;
            Ok(Arc::new(LoraSite {
                site: lin.name.clone(),
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scaling: config.scaling_of(&lin.name),
                dropout: config.dropout,
                stream: i as u64,
                initial: self.residual_of.get(&lin.name).cloned(),
            }))
        })?;
        self.sites.extend(sites);
        Ok(())
    }

    /// Loads a PEFT LoRA adapter directory and attaches it.
    pub fn load_peft(model: &mut Llama, dir: &Path) -> Result<Self> {
        let config = read_peft_config(&dir.join(ADAPTER_CONFIG), false)?;
        let (tensors, w_path) = read_peft_tensors(dir)?;
        Self::attach_tensors(model, config, tensors, &w_path)
    }

    /// Writes `adapter_config.json` (with `ferrotune_method = method`) and the tensors.
    pub fn save_as(&self, dir: &Path, base_model: &str, method: &str, extra: &[(String, Tensor)]) -> Result<()> {
        let mut tensors = param_tensors(self.params());
        tensors.extend(extra.iter().cloned());
        Self::save_tensors(dir, base_model, method, &self.config, &tensors)
    }

    /// Writes a PEFT LoRA folder for `config` with the given tensors (PEFT keys), marked as
    /// written by `method`.
    pub fn save_tensors(dir: &Path, base_model: &str, method: &str, config: &LoraConfig, tensors: &[(String, Tensor)]) -> Result<()> {
        Self::save_tensors_with(dir, base_model, method, config, tensors, &[])
    }

    /// As [`Lora::save_tensors`], with some `adapter_config.json` fields set to other values
    /// (`use_dora`, `init_lora_weights`, …).
    pub fn save_tensors_with(
        dir: &Path,
        base_model: &str,
        method: &str,
        config: &LoraConfig,
        tensors: &[(String, Tensor)],
        fields: &[(&str, serde_json::Value)],
    ) -> Result<()> {
        let mut cfg = peft_config_json(config, base_model);
        cfg[METHOD_KEY] = serde_json::Value::from(method);
        for (k, v) in fields {
            cfg[*k] = v.clone();
        }
        write_adapter(dir, tensors, &cfg, true)
    }

    /// Writes the adapter as PEFT does.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.save_as(dir, base_model, "lora", &[])
    }

    /// Trainable parameters under their PEFT keys, in site order (A then B).
    pub fn params(&self) -> Vec<(String, Var)> {
        self.sites
            .iter()
            .flat_map(|s| [(peft_key(&s.site, 'A'), s.a.clone()), (peft_key(&s.site, 'B'), s.b.clone())])
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Folds every adapter into its base weight (`W ← W0 + s·B·A`, in f32 over the dequantized
    /// base: a merged weight is f32 whatever the base was stored in) and detaches the hooks.
    pub fn merge_into(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            if let Some(site) = self.sites.iter().find(|x| x.site == lin.name) {
                let delta = (site.b.as_tensor().matmul(site.a.as_tensor())? * site.scaling)?;
                lin.weight = FrozenWeight::from_tensor(&(lin.weight.to_tensor()? + delta)?)?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    pub fn pairs(&self) -> Vec<LoraPair> {
        self.sites
            .iter()
            .map(|s| LoraPair { site: s.site.clone(), a: s.a.as_detached_tensor(), b: s.b.as_detached_tensor(), scaling: s.scaling })
            .collect()
    }

    /// `run.json`'s account of a LoRA-family adapter.
    pub fn describe_lora(&self) -> serde_json::Value {
        let ranks: BTreeMap<&str, usize> = self.sites.iter().map(|s| (s.site.as_str(), s.a.dims()[0])).collect();
        let uniform = ranks.values().all(|&r| r == self.config.r);
        serde_json::json!({
            "scaling": self.config.scaling(),
            "use_rslora": self.config.use_rslora,
            "rank": self.config.r,
            "ranks": if uniform { serde_json::Value::Null } else { serde_json::json!(ranks) },
        })
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let seed = self.seed;
        self.attach_with(model, |i, _, in_f, out_f, r| kaiming_init(seed, i, in_f, out_f, r))
    }

    fn params(&self) -> Vec<(String, Var)> {
        Lora::params(self)
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.save_peft(dir, base_model)
    }

    fn peft_compatible(&self) -> bool {
        true
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.merge_into(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        Some(self.pairs())
    }

    fn describe(&self) -> serde_json::Value {
        self.describe_lora()
    }
}

/// Removes tensor `key` from `tensors`, checking its shape and that every value is finite.
pub fn take_checked(tensors: &mut HashMap<String, Tensor>, key: &str, shape: &[usize], site: &str, src: &Path) -> Result<Tensor> {
    let t = tensors
        .remove(key)
        .ok_or_else(|| Error::format(src, format!("tensor `{key}` is missing (the adapter config targets `{site}`)")))?;
    if t.dims() != shape {
        return Err(Error::format(
            src,
            format!("tensor `{key}` has shape {:?} but this model needs {:?}: the adapter was trained for a different model", t.dims(), shape),
        ));
    }
    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(src, format!("tensor `{key}` holds {} at index {i}: the adapter is corrupt or its training diverged", values[i])));
    }
    Ok(t)
}

/// An adapter folder's tensors, keys normalised (PEFT may save `lora_A.default.weight`), and
/// the file they came from.
pub fn read_peft_tensors(dir: &Path) -> Result<(HashMap<String, Tensor>, std::path::PathBuf)> {
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let tensors = st::load_f32(&w_path)?;
    let tensors = tensors.into_iter().map(|(k, v)| (k.replace(".default.weight", ".weight"), v)).collect();
    Ok((tensors, w_path))
}

fn peft_config_json(c: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "alpha_pattern": c.alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": c.alpha,
        "lora_bias": false,
        "lora_dropout": crate::io_util::f32_json(c.dropout),
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": c.r,
        "rank_pattern": c.rank_pattern,
        "revision": null,
        "target_modules": c.target_modules.to_json(),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": c.use_rslora,
        "ferrotune_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Reads a PEFT `adapter_config.json`, refusing what this LoRA cannot represent exactly.
pub fn read_peft_config(path: &Path, dora: bool) -> Result<LoraConfig> {
    let text = crate::io_util::read_to_string(path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    let bad = |k: &str, what: &str| Error::format(path, format!("field `{k}`: {what}"));
    let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad("peft_type", &format!("`{peft_type}` is not supported (expected \"LORA\")")));
    }
    let r = v.get("r").and_then(|x| x.as_u64()).ok_or_else(|| bad("r", "missing or not an integer"))? as usize;
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).ok_or_else(|| bad("lora_alpha", "missing or not a number"))?;
    let dropout = v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
    let use_rslora = v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
    let target_modules = TargetModules::from_json(v.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules")
        .map_err(|e| Error::format(path, e.to_string()))?;
    let pattern = |k: &str| -> Result<BTreeMap<String, f64>> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
            Some(serde_json::Value::Object(o)) => o
                .iter()
                .map(|(name, x)| match x.as_f64() {
                    Some(f) if f.is_finite() && f > 0.0 => Ok((name.clone(), f)),
                    _ => Err(bad(k, &format!("entry `{name}` is {x}; expected a positive number"))),
                })
                .collect(),
            Some(other) => Err(bad(k, &format!("is {other}; expected an object of module name → value"))),
        }
    };
    let alpha_pattern = pattern("alpha_pattern")?;
    let mut rank_pattern = BTreeMap::new();
    for (name, r) in pattern("rank_pattern")? {
        if r.fract() != 0.0 {
            return Err(bad("rank_pattern", &format!("entry `{name}` is {r}; expected a whole rank")));
        }
        rank_pattern.insert(name, r as usize);
    }
    if (v.get("use_dora").and_then(|x| x.as_bool()) == Some(true)) != dora {
        return Err(bad("use_dora", if dora { "expected true for a DoRA adapter" } else { "a DoRA adapter is not a plain LoRA (load it as `dora`)" }));
    }
    if let Some(init) = v.get("init_lora_weights").and_then(|x| x.as_str()) {
        if init.starts_with("pissa") || init == "olora" || init == "corda" || init == "loftq" {
            return Err(bad(
                "init_lora_weights",
                &format!("`{init}`: this adapter was saved relative to a residual base model that PEFT made from the original one, so on the original base it gives another model. Save it with PEFT's `path_initial_model_for_weight_conversion` (a plain LoRA on the original base) and load that"),
            ));
        }
    }
    if v.get("bias").and_then(|x| x.as_str()).is_some_and(|b| b != "none") {
        return Err(bad("bias", "only \"none\" is supported"));
    }
    if v.get("fan_in_fan_out").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad("fan_in_fan_out", "only false (torch Linear layout) is supported"));
    }
    if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
        return Err(bad("modules_to_save", "fully trained extra modules are not supported yet"));
    }
    Ok(LoraConfig { r, alpha, dropout, target_modules, use_rslora, rank_pattern, alpha_pattern })
}
