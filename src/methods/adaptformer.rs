//! AdaptFormer (METHODS.md §2.7): a bottleneck adapter in parallel with each MLP block, on the
//! model's MLP block sites: `x'' = x' + MLP(norm(x')) + a`, with
//! `a = s · W_up·ReLU(W_down·x' + b_down) + b_up` reading the residual stream `x'` itself (not
//! its norm). `W_down` Kaiming-uniform (a = √5), `W_up`, both biases 0: the block is unchanged
//! at step 0. Non-linear, so it cannot be merged; the branch stays at inference.
//!
//! MoSA (METHODS.md §2.8, `adapter = "mosa"`) is the same adapter split into `K` disjoint
//! sparse modules (`mosa_modules`): a fixed random partition assigns every entry of `W_down`
//! and `W_up` to one module, and each training forward uses only the entries of the
//! `mosa_active` modules drawn for it (`W ⊙ Π_k`), so only those receive gradients. At
//! inference the modules are summed, which is the dense adapter itself: no extra cost.
//! Choices where the spec is unconfirmed: the draw is per site and micro-batch (from the
//! forward's seed); biases are shared by all modules; the optimizer is plain AdamW over the
//! whole adapter (as a masked forward in PyTorch gives: an inactive entry has no gradient, but
//! its moments and weight decay still move it); no hierarchical variant.

use super::files::{param_tensors, refuse_leftovers, write_adapter};
use super::registry::Entry;
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHOD_KEY};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::models::{BlockHook, BlockSiteInfo, ForwardCtx, Llama, SiteInfo};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;
use std::sync::Arc;

pub const ADAPTFORMER: Entry = Entry {
    name: "adaptformer",
    summary: "AdaptFormer: a ReLU bottleneck beside every MLP block, a = s·W_up·ReLU(W_down·x + b_down) + b_up; not mergeable",
    keys: &["adapter_bottleneck", "adapter_scale"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

pub const MOSA: Entry = Entry {
    name: "mosa",
    summary: "MoSA: the AdaptFormer bottleneck split into disjoint sparse modules, one drawn per training forward; summed (the dense adapter) at inference",
    keys: &["adapter_bottleneck", "adapter_scale", "mosa_modules", "mosa_active"],
    create: create_mosa,
    load,
    claims_peft: super::registry::not_peft,
};

/// MoSA's split: `modules` disjoint parts, `active` of them used by each training forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    pub modules: usize,
    pub active: usize,
    /// Seeds the partition.
    pub seed: u64,
}

impl Split {
    /// The module of each entry of a site's `[rows, cols]` weight (`which`: 0 down, 1 up).
    pub fn partition(&self, site: usize, which: u64, len: usize) -> Vec<u8> {
        let mut rng = SplitMix64::derive(self.seed, &[0x305a, site as u64, which]);
        (0..len).map(|_| rng.below(self.modules as u64) as u8).collect()
    }

    /// The modules a training forward with `seed` uses at `site`.
    pub fn drawn(&self, site: usize, seed: u64) -> Vec<u8> {
        SplitMix64::derive(seed, &[0x305b, site as u64]).choose(self.modules, self.active).into_iter().map(|m| m as u8).collect()
    }
}

/// The official defaults: bottleneck 64, fixed scale 0.1.
const DEFAULT_BOTTLENECK: usize = 64;
const DEFAULT_SCALE: f64 = 0.1;

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    Ok(Box::new(adaptformer(spec)?))
}

fn adaptformer(spec: &MethodSpec) -> Result<AdaptFormer> {
    let bottleneck = spec.usize_or("adapter_bottleneck", DEFAULT_BOTTLENECK)?;
    if bottleneck == 0 {
        return Err(Error::config("adapter_bottleneck", "is 0; expected a bottleneck width of at least 1, such as 64"));
    }
    let scale = spec.f64_or("adapter_scale", DEFAULT_SCALE)?;
    if scale == 0.0 {
        return Err(Error::config("adapter_scale", "is 0: the adapter's output would be multiplied away and training would change nothing"));
    }
    Ok(AdaptFormer { bottleneck, scale, seed: spec.seed, sites: Vec::new(), split: None })
}

fn create_mosa(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let mut af = adaptformer(spec)?;
    let modules = spec.usize_or("mosa_modules", 4)?;
    let active = spec.usize_or("mosa_active", 1)?;
    if !(2..=255).contains(&modules) {
        return Err(Error::config("mosa_modules", format!("is {modules}; expected 2 to 255 modules to split the adapter into")));
    }
    if active == 0 || active >= modules {
        return Err(Error::config("mosa_active", format!("is {active}; expected at least 1 and fewer than mosa_modules = {modules}")));
    }
    af.split = Some(Split { modules, active, seed: spec.seed });
    Ok(Box::new(af))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let field = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).ok_or_else(|| Error::format(&cfg_path, format!("field `{k}`: missing or not a number")));
    let bottleneck = field("adapter_bottleneck")? as usize;
    let scale = field("adapter_scale")?;
    let w_path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = st::load_f32(&w_path)?;
    let split = match cfg.get("mosa_modules") {
        Some(_) => Some(Split { modules: field("mosa_modules")? as usize, active: field("mosa_active")? as usize, seed: field("mosa_seed")? as u64 }),
        None => None,
    };
    let mut af = AdaptFormer { bottleneck, scale, seed: 0, sites: Vec::new(), split };
    af.attach_with(model, |_, site, d| {
        let mut take = |which: &str, shape: &[usize]| super::lora::take_checked(&mut tensors, &key(site, which), shape, site, &w_path);
        Ok([take("down.weight", &[bottleneck, d])?, take("down.bias", &[bottleneck])?, take("up.weight", &[d, bottleneck])?, take("up.bias", &[d])?])
    })?;
    refuse_leftovers(&tensors, &w_path, "MLP block")?;
    Ok(Box::new(af))
}

fn key(site: &str, which: &str) -> String {
    format!("{site}.adaptformer.{which}")
}

struct Branch {
    site: String,
    /// `[bottleneck, d]`, `[bottleneck]`, `[d, bottleneck]`, `[d]`.
    down_w: Var,
    down_b: Var,
    up_w: Var,
    up_b: Var,
    scale: f64,
    /// MoSA: the site's index, its split and each weight entry's module.
    split: Option<(usize, Split, Tensor, Tensor)>,
}

impl Branch {
    fn vars(&self) -> [(&'static str, &Var); 4] {
        [("down.weight", &self.down_w), ("down.bias", &self.down_b), ("up.weight", &self.up_w), ("up.bias", &self.up_b)]
    }
}

impl BlockHook for Branch {
    fn forward(&self, x: &Tensor, mlp_out: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let t = |v: &Var| if ctx.train { v.as_tensor().clone() } else { v.as_detached_tensor() };
        let (mut down, mut up) = (t(&self.down_w), t(&self.up_w));
        if let (Some((site, split, down_part, up_part)), true) = (&self.split, ctx.train) {
            // W ⊙ Π: the drawn modules' entries only (a 0/1 mask, so the others get no gradient).
            let drawn = split.drawn(*site, ctx.seed);
            let mask = |part: &Tensor| -> candle_core::Result<Tensor> {
                let ids: Vec<u8> = part.flatten_all()?.to_vec1()?;
                let m: Vec<f32> = ids.iter().map(|i| drawn.contains(i) as u8 as f32).collect();
                Tensor::from_vec(m, part.shape(), part.device())
            };
            down = (down * mask(down_part)?)?;
            up = (up * mask(up_part)?)?;
        }
        let (b, n, d) = x.dims3()?;
        let x2 = x.reshape((b * n, d))?;
        let h = x2.matmul(&down.t()?)?.broadcast_add(&t(&self.down_b))?.relu()?;
        let a = (h.matmul(&up.t()?)? * self.scale)?.broadcast_add(&t(&self.up_b))?;
        mlp_out + a.reshape((b, n, d))?
    }
}

pub struct AdaptFormer {
    bottleneck: usize,
    scale: f64,
    seed: u64,
    sites: Vec<Arc<Branch>>,
    /// MoSA's split (`None`: plain AdaptFormer).
    split: Option<Split>,
}

impl AdaptFormer {
    /// One branch per MLP block site, its four tensors from `init(index, site, hidden)`.
    fn attach_with(&mut self, model: &mut Llama, mut init: impl FnMut(usize, &str, usize) -> Result<[Tensor; 4]>) -> Result<()> {
        for (i, site) in model.block_sites_mut().enumerate() {
            if site.hook.is_some() {
                return Err(Error::Model(format!("block `{}` already has a method attached", site.info.name)));
            }
            let [dw, db, uw, ub] = init(i, &site.info.name, site.info.hidden_size)?;
            let split = match self.split {
                Some(s) => {
                    let part = |which: u64, t: &Tensor| Tensor::from_vec(s.partition(i, which, t.elem_count()), t.shape(), &Device::Cpu);
                    Some((i, s, part(0, &dw)?, part(1, &uw)?))
                }
                None => None,
            };
            let branch = Arc::new(Branch {
                site: site.info.name.clone(),
                down_w: Var::from_tensor(&dw)?,
                down_b: Var::from_tensor(&db)?,
                up_w: Var::from_tensor(&uw)?,
                up_b: Var::from_tensor(&ub)?,
                scale: self.scale,
                split,
            });
            site.hook = Some(branch.clone());
            self.sites.push(branch);
        }
        Ok(())
    }
}

impl Method for AdaptFormer {
    fn name(&self) -> &'static str {
        if self.split.is_some() { "mosa" } else { "adaptformer" }
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let (r, seed) = (self.bottleneck, self.seed);
        self.attach_with(model, |i, _, d| {
            // kaiming_uniform_(a=√5) on [r, d]: bound = 1/√d.
            let bound = 1.0 / (d as f32).sqrt();
            let mut rng = SplitMix64::derive(seed, &[0xada, i as u64]);
            let dw: Vec<f32> = (0..r * d).map(|_| (2.0 * rng.next_f32() - 1.0) * bound).collect();
            let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
            Ok([Tensor::from_vec(dw, (r, d), &Device::Cpu)?, zeros(&[r])?, zeros(&[d, r])?, zeros(&[d])?])
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.iter().flat_map(|s| s.vars().map(|(w, v)| (key(&s.site, w), v.clone()))).collect()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn planned_memory(&self, _sites: &[SiteInfo], blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let r = self.bottleneck as u64;
        let trainable_params = blocks.iter().map(|b| 2 * r * b.hidden_size as u64 + r + b.hidden_size as u64).sum();
        // The bottleneck's pre- and post-ReLU values and the branch output and sum, per block.
        let floats_per_token = blocks.iter().map(|b| 2 * r + 2 * b.hidden_size as u64).sum();
        Ok(Some(PlannedMemory { trainable_params, extra_bytes: 0, floats_per_token, ..Default::default() }))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let mut cfg = serde_json::json!({
            METHOD_KEY: self.name(),
            "base_model_name_or_path": base_model,
            "adapter_bottleneck": self.bottleneck,
            "adapter_scale": self.scale,
            "ferrotune_version": env!("CARGO_PKG_VERSION"),
        });
        if let Some(s) = &self.split {
            cfg["mosa_modules"] = s.modules.into();
            cfg["mosa_active"] = s.active.into();
            cfg["mosa_seed"] = s.seed.into();
        }
        write_adapter(dir, &param_tensors(self.params()), &cfg, false)
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = serde_json::json!({ "bottleneck": self.bottleneck, "scale": self.scale, "blocks": self.sites.len() });
        if let Some(s) = &self.split {
            d["mosa_modules"] = s.modules.into();
            d["mosa_active"] = s.active.into();
        }
        d
    }
}
