//! Post-hoc tools on fine-tuned checkpoints, no training (METHODS.md §6): `ferrotune combine`
//! merges several fine-tunes of one base into one model by their task vectors
//! `τ_t = θ_t − θ0` ([`merge`]: task arithmetic, TIES, LiNeS), or rewrites one LoRA adapter
//! without its intruder dimensions ([`intruders`]).
//!
//! A fine-tune is an adapter folder of any method that merges (folded into the base first) or
//! a whole model (Hugging Face folder or GGUF) with the base's tensors. Every tensor of the base
//! is combined, embeddings and norms included, in f32; the result replaces the base's tensors
//! in the loaded model, which the merged exports then write.

pub mod graft;
pub mod intruders;
pub mod merge;

use crate::error::{Error, Result};
use crate::methods::ADAPTER_CONFIG;
use crate::session::Session;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How the task vectors become one.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// `Σ w_t τ_t`.
    TaskArithmetic,
    /// TIES with each vector trimmed to `density` of its entries.
    Ties { density: f64 },
    /// LiNeS over the merge of `base` (task arithmetic or TIES): one input, `α = λ`,
    /// `β = 1 − λ`; several, `α = ‖Σ τ_t‖₁ / (T·‖τ_MTL‖₁)` and the given `β`.
    Lines { base: Box<Rule>, lambda: Option<f64>, beta: Option<f64> },
}

/// What a combination did, for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineReport {
    /// `‖τ_t‖₁` of every input.
    pub input_l1: Vec<f64>,
    /// `‖θ − θ0‖₁` of the result.
    pub merged_l1: f64,
    /// LiNeS's α and β where used.
    pub lines: Option<(f64, f64)>,
    pub tensors: usize,
}

/// The model at `base` with the adapter folder `dir` folded into its weights; refused for an
/// adapter whose method cannot merge.
pub fn merged_adapter(base: &Path, dir: &Path) -> Result<crate::models::Llama> {
    let mut s = Session::load(base, Some(dir))?;
    let method = s.method.as_ref().expect("loaded with an adapter");
    if !method.mergeable() {
        return Err(Error::Model(format!("{} is a `{}` adapter, which cannot be folded into the base weights", dir.display(), method.name())));
    }
    s.merge_adapter()?;
    Ok(s.model)
}

/// A fine-tune of the model at `base` in weight form: an adapter folder merged into it, or a
/// whole model.
pub fn fine_tuned_model(base: &Path, input: &Path) -> Result<crate::models::Llama> {
    if input.join(ADAPTER_CONFIG).is_file() {
        merged_adapter(base, input)
    } else {
        crate::models::load::load_model(input)
    }
}

/// Every tensor of a fine-tune of `base`, by Hugging Face name, in f32.
fn fine_tuned_weights(base: &Path, input: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(fine_tuned_model(base, input)?.named_weights()?.into_iter().collect())
}

/// Combines the fine-tunes `inputs` of the model at `base` under `rule` with per-input
/// `weights`; returns the base's session with the combined tensors in place of its own.
pub fn combine(base: &Path, inputs: &[PathBuf], weights: &[f32], rule: &Rule) -> Result<(Session, CombineReport)> {
    if inputs.is_empty() {
        return Err(Error::config("--inputs", "give at least one fine-tune"));
    }
    if weights.len() != inputs.len() {
        return Err(Error::config("--weights", format!("has {} values for {} inputs", weights.len(), inputs.len())));
    }
    let mut session = Session::load(base, None)?;
    let theta0 = session.model.named_weights()?;
    // Task vectors, input by input, tensor by tensor in the base's order.
    let mut taus: Vec<Vec<Vec<f32>>> = Vec::with_capacity(inputs.len());
    for input in inputs {
        let mut ft = fine_tuned_weights(base, input)?;
        let mut tau = Vec::with_capacity(theta0.len());
        for (name, t0) in &theta0 {
            let t = ft.remove(name).ok_or_else(|| Error::format(input, format!("tensor `{name}` of the base is missing")))?;
            if t.dims() != t0.dims() {
                return Err(Error::format(
                    input,
                    format!("tensor `{name}` has shape {:?}, the base's is {:?}: not a fine-tune of this base", t.dims(), t0.dims()),
                ));
            }
            let (a, b): (Vec<f32>, Vec<f32>) = (t.flatten_all()?.to_vec1()?, t0.flatten_all()?.to_vec1()?);
            tau.push(a.iter().zip(&b).map(|(x, y)| x - y).collect());
        }
        if let Some(extra) = ft.keys().min() {
            return Err(Error::format(input, format!("tensor `{extra}` is not in the base model")));
        }
        taus.push(tau);
    }
    let merged_by = |rule: &Rule, i: usize| -> Result<Vec<f32>> {
        let per_input: Vec<&[f32]> = taus.iter().map(|t| t[i].as_slice()).collect();
        match rule {
            Rule::TaskArithmetic => Ok(merge::task_arithmetic(&per_input, weights)),
            Rule::Ties { density } => Ok(merge::ties(&per_input, weights, *density)),
            Rule::Lines { .. } => Err(Error::config("--lines-merge", "expected task_arithmetic or ties")),
        }
    };
    let (merged, lines): (Vec<Vec<f32>>, Option<(f64, f64)>) = match rule {
        Rule::Lines { base: inner, lambda, beta } => {
            let tau_mtl: Vec<Vec<f32>> = (0..theta0.len()).map(|i| merged_by(inner, i)).collect::<Result<_>>()?;
            let (alpha, beta) = match (inputs.len(), lambda, beta) {
                (1, Some(l), None) => (*l, 1.0 - l),
                (1, _, _) => {
                    return Err(Error::config(
                        "--lambda",
                        "LiNeS on one fine-tune takes --lambda λ (α = λ, β = 1 − λ; tune it on a grid such as 0, 0.1, …, 1), and no --beta",
                    ))
                }
                (t, None, Some(b)) => {
                    // α = ‖Σ_t τ_t‖₁ / (T·‖τ_MTL‖₁): 1/T for plain task arithmetic.
                    let sum_l1: f64 = (0..theta0.len())
                        .map(|i| merge::l1(&merge::task_arithmetic(&taus.iter().map(|t| t[i].as_slice()).collect::<Vec<_>>(), &vec![1.0; t])))
                        .sum();
                    let mtl_l1: f64 = tau_mtl.iter().map(|v| merge::l1(v)).sum();
                    (if mtl_l1 > 0.0 { sum_l1 / (t as f64 * mtl_l1) } else { 1.0 / t as f64 }, *b)
                }
                _ => return Err(Error::config("--beta", "LiNeS on several fine-tunes takes --beta β (tune it on validation, in (0, 1]), and no --lambda")),
            };
            let layers = session.model.layers.len();
            let scaled = theta0
                .iter()
                .zip(tau_mtl)
                .map(|((name, _), v)| {
                    let f = merge::lines_factor(crate::models::block_index(name), layers, alpha, beta) as f32;
                    v.into_iter().map(|x| f * x).collect()
                })
                .collect();
            (scaled, Some((alpha, beta)))
        }
        other => ((0..theta0.len()).map(|i| merged_by(other, i)).collect::<Result<_>>()?, None),
    };
    let report = CombineReport {
        input_l1: taus.iter().map(|t| t.iter().map(|v| merge::l1(v)).sum()).collect(),
        merged_l1: merged.iter().map(|v| merge::l1(v)).sum(),
        lines,
        tensors: theta0.len(),
    };
    drop(taus);
    for ((name, t0), tau) in theta0.iter().zip(merged) {
        let base: Vec<f32> = t0.flatten_all()?.to_vec1()?;
        let theta: Vec<f32> = base.iter().zip(&tau).map(|(b, t)| b + t).collect();
        session.model.set_named_weight(name, &Tensor::from_vec(theta, t0.shape(), t0.device())?)?;
    }
    Ok((session, report))
}

/// A LoRA adapter with its intruder dimensions reduced ([`intruders`]), module by module.
pub struct IntruderReduction {
    /// The base model, its weights as loaded (no adapter attached).
    pub session: Session,
    /// Per adapted module (site order): its scaling and result.
    pub modules: Vec<(String, f64, intruders::Mitigated)>,
}

impl IntruderReduction {
    /// The modules that had intruders, with their indices.
    pub fn with_intruders(&self) -> Vec<(&str, &[usize])> {
        self.modules.iter().filter(|(_, _, m)| !m.intruders.is_empty()).map(|(s, _, m)| (s.as_str(), m.intruders.as_slice())).collect()
    }

    /// Writes the new adapter: the input's config and tensors, with every module's factors
    /// replaced (PEFT's layout, as PEFT's `reduce_intruder_dimension` leaves it).
    pub fn write_adapter(&self, input: &Path, out: &Path) -> Result<()> {
        let (mut tensors, _) = crate::methods::lora::read_peft_tensors(input)?;
        for (site, _, m) in &self.modules {
            tensors.insert(crate::methods::lora::peft_key(site, 'A'), crate::linalg::to_tensor(&m.a)?);
            tensors.insert(crate::methods::lora::peft_key(site, 'B'), crate::linalg::to_tensor(&m.b)?);
        }
        let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let cfg = crate::io_util::read(&input.join(ADAPTER_CONFIG))?;
        crate::io_util::write_files_into(out, |tmp| {
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            crate::formats::safetensors::save(&tmp.join(crate::methods::ADAPTER_WEIGHTS), &tensors, crate::formats::safetensors::SaveDType::F32, Some(meta))?;
            crate::io_util::write_atomic(&tmp.join(ADAPTER_CONFIG), &cfg)
        })
    }

    /// Puts `W0 + s·B'·A'` into the base model's adapted modules (for a merged export).
    pub fn merge_into_base(&mut self) -> Result<()> {
        for (site, scaling, m) in &self.modules {
            let lin = self.session.model.linears().find(|l| &l.name == site).expect("the module came from this model");
            let w = crate::linalg::from_tensor(&lin.weight.to_tensor()?)? + crate::linalg::matmul(&m.b, &m.a) * *scaling;
            self.session.model.set_named_weight(&format!("{site}.weight"), &crate::linalg::to_tensor(&w)?)?;
        }
        Ok(())
    }
}

/// Intruder-dimension mitigation of the LoRA adapter `adapter` trained on `base`.
pub fn reduce_intruders(base: &Path, adapter: &Path, settings: &intruders::IntruderSettings) -> Result<IntruderReduction> {
    if !adapter.join(ADAPTER_CONFIG).is_file() {
        return Err(Error::config(
            "--inputs",
            format!("{} is not an adapter folder (it has no {ADAPTER_CONFIG}); intruder mitigation rewrites a LoRA adapter", adapter.display()),
        ));
    }
    let mut session = Session::load(base, Some(adapter))?;
    let method = session.method.take().expect("loaded with an adapter");
    let pairs = match (method.name(), method.as_lora()) {
        ("lora", Some(p)) => p,
        (name, _) => {
            return Err(Error::config(
                "--inputs",
                format!("{} is a `{name}` adapter; intruder mitigation rewrites plain LoRA adapters (as PEFT's reduce_intruder_dimension)", adapter.display()),
            ))
        }
    };
    // The adapter is detached: the session's model is the base as loaded.
    for lin in session.model.linears_mut() {
        lin.hook = None;
    }
    let mut modules = Vec::with_capacity(pairs.len());
    for p in pairs {
        let lin = session.model.linears().find(|l| l.name == p.site).expect("the adapter was attached to this model");
        let w0 = crate::linalg::from_tensor(&lin.weight.to_tensor()?)?;
        let m = intruders::mitigate(&w0, &crate::linalg::from_tensor(&p.a)?, &crate::linalg::from_tensor(&p.b)?, p.scaling, settings)?;
        modules.push((p.site, p.scaling, m));
    }
    Ok(IntruderReduction { session, modules })
}

/// Task arithmetic of LoRA adapters as one LoRA adapter, exactly (PEFT's `add_weighted_adapter`
/// with `combination_type = "cat"`): per module the ranks are stacked, `A = [w_1·s_1·A_1; …]`,
/// `B = [B_1, …]` (zeros where an input does not adapt the module), and the result has
/// `r = lora_alpha = Σ r_t` (scaling 1) on the union of the inputs' modules, so that
/// `B·A = Σ w_t·s_t·B_t·A_t`. Its config is the first input's with those changes.
pub fn concatenate_loras(base: &Path, inputs: &[PathBuf], weights: &[f32], out: &Path) -> Result<()> {
    let mut per_input = Vec::with_capacity(inputs.len());
    // The base's modules (names and shapes), from the last model loaded.
    let mut all_sites = Vec::new();
    for input in inputs {
        let mut s = Session::load(base, Some(input))?;
        let method = s.method.take().expect("loaded with an adapter");
        all_sites = s.model.sites();
        match (method.name(), method.as_lora()) {
            ("lora", Some(pairs)) => per_input.push(pairs),
            (name, _) => {
                return Err(Error::config(
                    "--format",
                    format!("peft holds the combination exactly only when every input is a plain LoRA adapter, and {} is `{name}` (write merged-safetensors or merged-gguf)", input.display()),
                ))
            }
        }
    }
    // Each input takes as many rows as its largest module rank (per-module ranks are padded).
    let ranks: Vec<usize> = per_input.iter().map(|pairs| pairs.iter().map(|p| p.a.dims()[0]).max().unwrap_or(0)).collect();
    let total_rank: usize = ranks.iter().sum();
    // Every module any input adapts, in the model's order.
    let sites: Vec<crate::models::SiteInfo> = all_sites.into_iter().filter(|s| per_input.iter().any(|pairs| pairs.iter().any(|p| p.site == s.name))).collect();
    let mut tensors = Vec::new();
    for site in &sites {
        let mut a = vec![0f32; total_rank * site.in_features];
        let mut b = vec![0f32; site.out_features * total_rank];
        let mut offset = 0;
        for ((pairs, &w), &rank) in per_input.iter().zip(weights).zip(&ranks) {
            if let Some(p) = pairs.iter().find(|p| p.site == site.name) {
                let r = p.a.dims()[0];
                let (pa, pb): (Vec<f32>, Vec<f32>) = (p.a.flatten_all()?.to_vec1()?, p.b.flatten_all()?.to_vec1()?);
                let f = w * p.scaling as f32;
                for i in 0..r {
                    for j in 0..site.in_features {
                        a[(offset + i) * site.in_features + j] = f * pa[i * site.in_features + j];
                    }
                }
                for o in 0..site.out_features {
                    for i in 0..r {
                        b[o * total_rank + offset + i] = pb[o * r + i];
                    }
                }
            }
            offset += rank;
        }
        tensors.push((crate::methods::lora::peft_key(&site.name, 'A'), Tensor::from_vec(a, (total_rank, site.in_features), &candle_core::Device::Cpu)?));
        tensors.push((crate::methods::lora::peft_key(&site.name, 'B'), Tensor::from_vec(b, (site.out_features, total_rank), &candle_core::Device::Cpu)?));
    }
    let first = inputs.first().expect("checked: at least one input");
    let cfg_path = first.join(ADAPTER_CONFIG);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&crate::io_util::read_to_string(&cfg_path)?).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
    cfg["r"] = total_rank.into();
    cfg["lora_alpha"] = total_rank.into();
    cfg["use_rslora"] = false.into();
    cfg["rank_pattern"] = serde_json::json!({});
    cfg["alpha_pattern"] = serde_json::json!({});
    cfg["target_modules"] = sites.iter().map(|s| s.name.clone()).collect::<Vec<_>>().into();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    crate::io_util::write_files_into(out, |tmp| {
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::formats::safetensors::save(&tmp.join(crate::methods::ADAPTER_WEIGHTS), &tensors, crate::formats::safetensors::SaveDType::F32, Some(meta))?;
        crate::io_util::write_atomic(&tmp.join(ADAPTER_CONFIG), serde_json::to_string_pretty(&cfg).expect("JSON values always serialise").as_bytes())
    })
}
