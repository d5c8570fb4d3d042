//! DoRA, weight-decomposed LoRA (PEFT's `use_dora = true`), computed as PEFT 0.21 does:
//! `y = g ⊙ (W0·x + s·B·A·x) + b` with `g = m / n`, where `m` is a trainable magnitude per
//! output row (initialised to the row norms of `W0`) and `n` the row norms of `W0 + s·B·A`,
//! computed from a detached `B·A` and detached as a whole: no gradient flows through `n`
//! (the DoRA paper's §4.3 suggestion, which PEFT follows). With dropout, as PEFT: the base
//! term keeps the undropped input, `y = W0·x + (g − 1) ⊙ W0·drop(x) + g ⊙ s·B·A·drop(x) + b`,
//! computed as `W0·(x − drop(x)) + g ⊙ (W0·drop(x) + s·B·A·drop(x)) + b`.
//!
//! `n² = ‖W0ᵢ‖² + 2s·⟨W0ᵢ, (B·A)ᵢ⟩ + s²·‖(B·A)ᵢ‖²` per row, with `‖W0ᵢ‖²` computed once and the
//! cross term from `A·W0ᵀ` (an `r × out` product), so a quantized base is never expanded to f32.
//! Adapters are PEFT's layout: `lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`.

use super::lora::{kaiming_init, peft_key, read_peft_config, read_peft_tensors, take_checked, Lora, LoraConfig};
use super::files::refuse_leftovers;
use super::registry::Entry;
use super::targets::hook_targets;
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG};
use crate::error::Result;
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, BlockSiteInfo, ForwardCtx, Llama, SiteHook, SiteInfo};
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use std::path::Path;
use std::sync::Arc;

pub const DORA: Entry = Entry {
    name: "dora",
    summary: "DoRA (PEFT use_dora): LoRA direction with a trained magnitude per output row, g = m/‖W0 + s·B·A‖, PEFT's layout",
    keys: &[],
    create,
    load,
    claims_peft: |cfg| cfg.get("peft_type").and_then(|v| v.as_str()) == Some("LORA") && cfg.get("use_dora").and_then(|v| v.as_bool()) == Some(true),
};

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    Lora::new(spec.lora_config(), spec.seed)?; // the shared checks of r and dropout
    Ok(Box::new(Dora { config: spec.lora_config(), seed: spec.seed, sites: Vec::new() }))
}

fn load(model: &mut Llama, dir: &Path, _cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let config = read_peft_config(&dir.join(ADAPTER_CONFIG), true)?;
    let (mut tensors, w_path) = read_peft_tensors(dir)?;
    let mut d = Dora { config, seed: 0, sites: Vec::new() };
    d.attach_with(model, |_, site, n, out, r, _| {
        let a = take_checked(&mut tensors, &peft_key(site, 'A'), &[r, n], site, &w_path)?;
        let b = take_checked(&mut tensors, &peft_key(site, 'B'), &[out, r], site, &w_path)?;
        let m = take_checked(&mut tensors, &magnitude_key(site), &[out], site, &w_path)?;
        Ok((a, b, m))
    })?;
    refuse_leftovers(&tensors, &w_path, "adapted module")?;
    Ok(Box::new(d))
}

/// PEFT's key for a site's magnitude vector.
pub fn magnitude_key(site: &str) -> String {
    format!("base_model.model.{site}.lora_magnitude_vector")
}

struct DoraSite {
    site: String,
    /// `[r, in]`, `[out, r]`, `[out]`.
    a: Var,
    b: Var,
    m: Var,
    scaling: f64,
    dropout: f32,
    stream: u64,
    /// `‖W0ᵢ‖²` per output row.
    w0_sq: Vec<f64>,
}

impl DoraSite {
    /// Row norms of `W0 + s·B·A` (no gradient).
    fn weight_norm(&self, w0: &FrozenWeight) -> Result<Vec<f32>> {
        let a: Vec<f32> = self.a.as_detached_tensor().flatten_all()?.to_vec1()?;
        let b: Vec<f32> = self.b.as_detached_tensor().flatten_all()?.to_vec1()?;
        let (out, inp) = w0.dims();
        let r = a.len() / inp;
        // A·W0ᵀ: [r, out]; AAᵀ: [r, r].
        let mut aw = vec![0f32; r * out];
        w0.matmul_t(&a, r, &mut aw, false);
        let aat: Vec<f64> = (0..r * r)
            .map(|k| {
                let (i, j) = (k / r, k % r);
                (0..inp).map(|c| a[i * inp + c] as f64 * a[j * inp + c] as f64).sum()
            })
            .collect();
        let s = self.scaling;
        Ok((0..out)
            .map(|o| {
                let bo = &b[o * r..(o + 1) * r];
                let cross: f64 = (0..r).map(|k| bo[k] as f64 * aw[k * out + o] as f64).sum();
                let ba_sq: f64 = (0..r).map(|i| (0..r).map(|j| bo[i] as f64 * aat[i * r + j] * bo[j] as f64).sum::<f64>()).sum();
                (self.w0_sq[o] + 2.0 * s * cross + s * s * ba_sq).max(0.0).sqrt() as f32
            })
            .collect())
    }
}

impl SiteHook for DoraSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let t = |v: &Var| if ctx.train { v.as_tensor().clone() } else { v.as_detached_tensor() };
        let (a, b, m) = (t(&self.a), t(&self.b), t(&self.m));
        let norm = self.weight_norm(w0).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let norm = Tensor::from_vec(norm, m.dims(), m.device())?;
        let g = (m / norm)?;
        let dropout = if ctx.train { self.dropout } else { 0.0 };
        let y = if dropout == 0.0 {
            crate::kernels::scale_columns(&crate::kernels::lora_linear(x, w0, &a, &b, self.scaling as f32, 0.0, 0)?, &g)?
        } else {
            let seed = SplitMix64::derive(ctx.seed, &[self.stream]).next_u64();
            let xd = crate::kernels::dropout(x, dropout, seed)?;
            // W0·x + (g − 1)⊙W0·xd + g⊙s·B·A·xd = W0·(x − xd) + g⊙(W0·xd + s·B·A·xd): one base
            // product fewer than PEFT's three-term form.
            let branch = crate::kernels::scale_columns(&crate::kernels::lora_linear(&xd, w0, &a, &b, self.scaling as f32, 0.0, 0)?, &g)?;
            (crate::kernels::frozen_linear(&(x - &xd)?, w0)? + branch)?
        };
        add_bias(y, b0)
    }
}

pub struct Dora {
    config: LoraConfig,
    seed: u64,
    sites: Vec<Arc<DoraSite>>,
}

impl Dora {
    fn attach_with(
        &mut self,
        model: &mut Llama,
        mut init: impl FnMut(usize, &str, usize, usize, usize, &[f64]) -> Result<(Tensor, Tensor, Tensor)>,
    ) -> Result<()> {
        let config = &self.config;
        let sites = hook_targets(model, &config.target_modules, |i, lin| {
            let info = lin.info();
            let w0 = lin.weight.to_f32_vec();
            let n = info.in_features;
            let w0_sq: Vec<f64> = (0..info.out_features).map(|o| w0[o * n..(o + 1) * n].iter().map(|&w| w as f64 * w as f64).sum()).collect();
            let (a, b, m) = init(i, &lin.name, info.in_features, info.out_features, config.rank_of(&lin.name), &w0_sq)?;
            Ok(Arc::new(DoraSite {
                site: lin.name.clone(),
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                m: Var::from_tensor(&m)?,
                scaling: config.scaling_of(&lin.name),
                dropout: config.dropout,
                stream: i as u64,
                w0_sq,
            }))
        })?;
        self.sites.extend(sites);
        Ok(())
    }
}

impl Method for Dora {
    fn name(&self) -> &'static str {
        "dora"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let seed = self.seed;
        self.attach_with(model, |i, _, n, out, r, w0_sq| {
            let (a, b) = kaiming_init(seed, i, n, out, r)?;
            // m = ‖W0ᵢ‖ (B = 0, so m / n = 1 and the first forward is the base model's).
            let m: Vec<f32> = w0_sq.iter().map(|s| s.sqrt() as f32).collect();
            Ok((a, b, Tensor::from_vec(m, out, &Device::Cpu)?))
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites
            .iter()
            .flat_map(|s| [(peft_key(&s.site, 'A'), s.a.clone()), (peft_key(&s.site, 'B'), s.b.clone()), (magnitude_key(&s.site), s.m.clone())])
            .collect()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.config.target_modules.select(sites, "lora_target_modules")?;
        let r = self.config.r as u64;
        let trainable_params = chosen.iter().map(|s| r * (s.in_features + s.out_features) as u64 + s.out_features as u64).sum();
        // Kept for the backward: the fused LoRA op's rank-r product, the branch output and its
        // rescaling per site; with dropout also the dropped input, `x − drop(x)` and the base
        // product of it.
        let per_site = |s: &&SiteInfo| r + if self.config.dropout > 0.0 { (2 * s.in_features + 3 * s.out_features) as u64 } else { 2 * s.out_features as u64 };
        let floats_per_token = chosen.iter().map(per_site).sum();
        Ok(Some(PlannedMemory { trainable_params, extra_bytes: 0, floats_per_token, ..Default::default() }))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        Lora::save_tensors_with(dir, base_model, "dora", &self.config, &tensors, &[("use_dora", serde_json::Value::from(true))])
    }

    fn peft_compatible(&self) -> bool {
        true
    }

    /// `W ← (m / n) ⊙ (W0 + s·B·A)`, PEFT's merge.
    fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            let Some(s) = self.sites.iter().find(|s| s.site == lin.name) else { continue };
            let norm = s.weight_norm(&lin.weight)?;
            let g = (s.m.as_detached_tensor() / Tensor::from_vec(norm, s.m.dims(), &Device::Cpu)?)?;
            let w = (lin.weight.to_tensor()? + (s.b.as_detached_tensor().matmul(&s.a.as_detached_tensor())? * s.scaling)?)?;
            lin.weight = FrozenWeight::from_tensor(&w.broadcast_mul(&g.unsqueeze(1)?)?)?;
            lin.hook = None;
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn can_export(&self, format: crate::export::ExportFormat) -> std::result::Result<(), String> {
        match format {
            crate::export::ExportFormat::GgufLora => Err(
                "DoRA's magnitude vectors (lora_magnitude_vector) have no place in a llama.cpp LoRA GGUF (only lora_a/lora_b pairs) and `dora` would lose them; write a merged model instead".into(),
            ),
            _ => Ok(()),
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "scaling": self.config.scaling(), "rank": self.config.r, "use_rslora": self.config.use_rslora, "magnitude": "m / ‖W0 + s·B·A‖ per row, norm detached" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `y = g ⊙ (W0·x + s·B·A·x)` in f64 for one token, with `g` given (held fixed).
    fn site_output(w0: &[f64], a: &[f64], b: &[f64], g: &[f64], s: f64, x: &[f64], out: usize, inp: usize, r: usize) -> Vec<f64> {
        let ax: Vec<f64> = (0..r).map(|k| (0..inp).map(|c| a[k * inp + c] * x[c]).sum()).collect();
        (0..out)
            .map(|o| g[o] * ((0..inp).map(|c| w0[o * inp + c] * x[c]).sum::<f64>() + s * (0..r).map(|k| b[o * r + k] * ax[k]).sum::<f64>()))
            .collect()
    }

    /// Row norms of `W0 + s·B·A` in f64.
    fn row_norms(w0: &[f64], a: &[f64], b: &[f64], s: f64, out: usize, inp: usize, r: usize) -> Vec<f64> {
        (0..out)
            .map(|o| (0..inp).map(|c| w0[o * inp + c] + s * (0..r).map(|k| b[o * r + k] * a[k * inp + c]).sum::<f64>()).map(|w| w * w).sum::<f64>().sqrt())
            .collect()
    }

    /// DoRA's defining gradient: backprop through the site gives `A` and `B` the gradient of
    /// `g ⊙ (W0·x + s·B·A·x)` with `g = m / ‖W0 + s·B·A‖` held fixed (PEFT detaches the norm), which
    /// finite differences with the norm frozen reproduce, and which differs from the gradient
    /// with the norm live. The forward equals the formula, and `m` gets `(W0·x + s·B·A·x) / n`.
    #[test]
    fn a_and_b_gradients_hold_the_norm_fixed() {
        let (out, inp, r, tokens, s) = (5usize, 7usize, 3usize, 4usize, 0.7f64);
        let mut rng = SplitMix64::new(11);
        let mut draw = |n: usize, scale: f64| -> Vec<f64> { (0..n).map(|_| (rng.next_f32() as f64 * 2.0 - 1.0) * scale).collect() };
        let (w0, a, b, x, weights) = (draw(out * inp, 1.0), draw(r * inp, 0.5), draw(out * r, 0.5), draw(tokens * inp, 1.0), draw(tokens * out, 1.0));
        let m: Vec<f64> = draw(out, 0.5).iter().map(|v| 1.0 + v).collect();
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        // The test's reference uses the f32-rounded values the site sees.
        let round = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<f64>>();
        let (w0, a, b, x, weights, m) = (round(&w0), round(&a), round(&b), round(&x), round(&weights), round(&m));

        let frozen = FrozenWeight::from_f32(f32s(&w0), out, inp).unwrap();
        let var = |v: &[f64], shape: &[usize]| Var::from_tensor(&Tensor::from_vec(f32s(v), shape, &Device::Cpu).unwrap()).unwrap();
        let w0_sq = (0..out).map(|o| w0[o * inp..(o + 1) * inp].iter().map(|w| w * w).sum()).collect();
        let site = DoraSite { site: "t".into(), a: var(&a, &[r, inp]), b: var(&b, &[out, r]), m: var(&m, &[out]), scaling: s, dropout: 0.0, stream: 0, w0_sq };
        let xt = Tensor::from_vec(f32s(&x), (1, tokens, inp), &Device::Cpu).unwrap();
        let y = site.forward(&xt, &frozen, None, &ForwardCtx::train(0)).unwrap();
        let loss = (&y * Tensor::from_vec(f32s(&weights), (1, tokens, out), &Device::Cpu).unwrap()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let grad = |v: &Var| -> Vec<f32> { grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
        let (ga, gb, gm) = (grad(&site.a), grad(&site.b), grad(&site.m));

        let norms = row_norms(&w0, &a, &b, s, out, inp, r);
        let g_fixed: Vec<f64> = (0..out).map(|o| m[o] / norms[o]).collect();
        let objective = |a: &[f64], b: &[f64], g: Option<&[f64]>| -> f64 {
            let live: Vec<f64>;
            let g = match g {
                Some(g) => g,
                None => {
                    let n = row_norms(&w0, a, b, s, out, inp, r);
                    live = (0..out).map(|o| m[o] / n[o]).collect();
                    &live
                }
            };
            (0..tokens).map(|t| site_output(&w0, a, b, g, s, &x[t * inp..(t + 1) * inp], out, inp, r).iter().zip(&weights[t * out..(t + 1) * out]).map(|(y, w)| y * w).sum::<f64>()).sum()
        };

        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for t in 0..tokens {
            let expect = site_output(&w0, &a, &b, &g_fixed, s, &x[t * inp..(t + 1) * inp], out, inp, r);
            for o in 0..out {
                assert!((y[t * out + o] as f64 - expect[o]).abs() < 1e-5 * (1.0 + expect[o].abs()), "y[{t},{o}] = {} vs {}", y[t * out + o], expect[o]);
            }
        }

        let h = 1e-5;
        let mut largest_norm_effect = 0f64;
        for (name, values, backprop, is_a) in [("A", &a, &ga, true), ("B", &b, &gb, false)] {
            for i in 0..values.len() {
                let fd = |g: Option<&[f64]>| {
                    let (mut plus, mut minus) = (values.clone(), values.clone());
                    plus[i] += h;
                    minus[i] -= h;
                    let f = |v: &[f64]| if is_a { objective(v, &b, g) } else { objective(&a, v, g) };
                    (f(&plus) - f(&minus)) / (2.0 * h)
                };
                let held = fd(Some(&g_fixed));
                assert!((backprop[i] as f64 - held).abs() < 1e-4 * (1.0 + held.abs()), "d loss / d {name}[{i}]: backprop {} vs finite difference with the norm held {held}", backprop[i]);
                largest_norm_effect = largest_norm_effect.max((fd(None) - held).abs());
            }
        }
        // Were the norm not detached, backprop would match the live-norm differences instead.
        assert!(largest_norm_effect > 1e-2, "the norm's own gradient is too small ({largest_norm_effect}) for this test to tell a detached norm from a live one");

        for o in 0..out {
            let expect: f64 = (0..tokens).map(|t| weights[t * out + o] * site_output(&w0, &a, &b, &vec![1.0 / norms[o]; out], s, &x[t * inp..(t + 1) * inp], out, inp, r)[o]).sum();
            assert!((gm[o] as f64 - expect).abs() < 1e-4 * (1.0 + expect.abs()), "d loss / d m[{o}]: {} vs {expect}", gm[o]);
        }
    }
}
