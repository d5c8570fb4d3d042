//! LoRA and rsLoRA (METHODS.md §1.1): `y = W0·x + b + s · B·(A·dropout(x))`, `s = α/r` (or
//! `α/√r`), A Kaiming-uniform(a=√5), B = 0. Adapters are read and written in PEFT's layout,
//! so they move freely between ferrotune and Hugging Face PEFT.

use super::targets::TargetModules;
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SaveDType};
use crate::kernels::FrozenWeight;
use crate::models::{ForwardCtx, Llama, SiteHook};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One adapted site's parameters; also the hook that runs them.
pub struct LoraSite {
    pub site: String,
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    scaling: f64,
    dropout: f32,
    /// Distinguishes this site's dropout stream from every other site's.
    stream: u64,
}

impl SiteHook for LoraSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        // Outside training the parameters enter as constants, so no autograd graph (and none
        // of the activations it would keep alive) is built for evaluation or generation.
        let (a, b) = if ctx.train {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        };
        let dropout = if ctx.train { self.dropout } else { 0.0 };
        let seed = SplitMix64::derive(ctx.seed, &[self.stream]).next_u64();
        crate::kernels::lora_linear(x, w0, &a, &b, self.scaling as f32, dropout, seed)
    }
}

pub struct Lora {
    pub config: LoraConfig,
    pub sites: Vec<Arc<LoraSite>>,
}

/// PEFT's key for a site's tensor: `base_model.model.<site>.lora_A.weight`.
pub fn peft_key(site: &str, which: char) -> String {
    format!("base_model.model.{site}.lora_{which}.weight")
}

impl Lora {
    /// Attaches freshly initialised adapters (PEFT's default init) to the target sites.
    pub fn attach(model: &mut Llama, config: LoraConfig, seed: u64) -> Result<Self> {
        Self::attach_with(model, config, |i, _site, in_f, out_f, r| {
            // kaiming_uniform_(a=√5) on [r, in]: bound = gain·√(3/fan_in) = 1/√in.
            let bound = 1.0 / (in_f as f32).sqrt();
            let mut rng = SplitMix64::derive(seed, &[0x10a, i as u64]);
            let a: Vec<f32> = (0..r * in_f).map(|_| (2.0 * rng.next_f32() - 1.0) * bound).collect();
            Ok((Tensor::from_vec(a, (r, in_f), &Device::Cpu)?, Tensor::zeros((out_f, r), candle_core::DType::F32, &Device::Cpu)?))
        })
    }

    /// Attaches adapters with given tensors (PEFT keys), checking every shape.
    pub fn attach_tensors(model: &mut Llama, config: LoraConfig, mut tensors: HashMap<String, Tensor>, src: &Path) -> Result<Self> {
        let lora = Self::attach_with(model, config, |_, site, in_f, out_f, r| {
            let mut get = |which: char, shape: [usize; 2]| -> Result<Tensor> {
                let key = peft_key(site, which);
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::format(src, format!("tensor `{key}` is missing (the adapter config targets `{site}`)")))?;
                if t.dims() != shape {
                    return Err(Error::format(
                        src,
                        format!("tensor `{key}` has shape {:?} but this model needs {:?}: the adapter was trained for a different model", t.dims(), shape),
                    ));
                }
                let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::format(
                        src,
                        format!("tensor `{key}` holds {} at index {i}: the adapter is corrupt or its training diverged", values[i]),
                    ));
                }
                Ok(t)
            };
            Ok((get('A', [r, in_f])?, get('B', [out_f, r])?))
        })?;
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::format(src, format!("tensor `{extra}` does not belong to any adapted module of this model")));
        }
        Ok(lora)
    }

    fn attach_with(
        model: &mut Llama,
        config: LoraConfig,
        mut init: impl FnMut(usize, &str, usize, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        if config.r == 0 {
            return Err(Error::config("lora_r", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::config("lora_dropout", "must be in [0, 1)"));
        }
        let all = model.sites();
        let chosen: Vec<String> = config.target_modules.select(&all, "lora_target_modules")?.into_iter().map(|s| s.name.clone()).collect();
        let mut sites = Vec::new();
        for (i, lin) in model.linears_mut().enumerate() {
            if !chosen.contains(&lin.name) {
                continue;
            }
            if lin.hook.is_some() {
                return Err(Error::Model(format!("module `{}` already has a method attached", lin.name)));
            }
            let info = lin.info();
            let (a, b) = init(i, &lin.name, info.in_features, info.out_features, config.r)?;
            let site = Arc::new(LoraSite {
                site: lin.name.clone(),
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scaling: config.scaling(),
                dropout: config.dropout,
                stream: i as u64,
            });
            lin.hook = Some(site.clone());
            sites.push(site);
        }
        Ok(Self { config, sites })
    }

    /// Loads a PEFT LoRA adapter directory and attaches it.
    pub fn load_peft(model: &mut Llama, dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let config = read_peft_config(&cfg_path)?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        let tensors = st::load_f32(&w_path)?;
        // PEFT may save keys with the adapter name (`lora_A.default.weight`) in some versions.
        let tensors = tensors.into_iter().map(|(k, v)| (k.replace(".default.weight", ".weight"), v)).collect();
        Self::attach_tensors(model, config, tensors, &w_path)
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

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT does.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        st::save(&dir.join(ADAPTER_WEIGHTS), &tensors, SaveDType::F32, Some(meta))?;
        let cfg = peft_config_json(&self.config, base_model);
        let text = serde_json::to_string_pretty(&cfg).expect("JSON values always serialise");
        crate::io_util::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Folds every adapter into its base weight (`W ← W0 + s·B·A`, in f32 over the dequantized
    /// base: a merged weight is f32 whatever the base was stored in) and detaches the hooks.
    pub fn merge_into(&self, model: &mut Llama) -> Result<()> {
        let s = self.config.scaling();
        for lin in model.linears_mut() {
            if let Some(site) = self.sites.iter().find(|x| x.site == lin.name) {
                let delta = (site.b.as_tensor().matmul(site.a.as_tensor())? * s)?;
                lin.weight = FrozenWeight::from_tensor(&(lin.weight.to_tensor()? + delta)?)?;
                lin.hook = None;
            }
        }
        Ok(())
    }
}

fn peft_config_json(c: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "alpha_pattern": {},
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
        "lora_dropout": c.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": c.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": c.target_modules.to_json(),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": c.use_rslora,
        "ferrotune_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Reads a PEFT `adapter_config.json`, refusing what this LoRA cannot represent exactly.
pub fn read_peft_config(path: &Path) -> Result<LoraConfig> {
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
    let non_empty = |k: &str| v.get(k).and_then(|x| x.as_object()).is_some_and(|o| !o.is_empty());
    for k in ["rank_pattern", "alpha_pattern"] {
        if non_empty(k) {
            return Err(bad(k, "per-module ranks/alphas are not supported yet"));
        }
    }
    if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad("use_dora", "DoRA adapters are not supported yet"));
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
    Ok(LoraConfig { r, alpha, dropout, target_modules, use_rslora })
}
