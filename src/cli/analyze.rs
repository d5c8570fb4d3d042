//! `ferrotune analyze`: what fine-tuning changed, as JSON and PNG plots. `tuco`: the tuning
//! contribution of each prompt; `intruders`: new singular directions per module; `forgetting`:
//! the loss on other texts before and after; `report`: each module's weight change.

use crate::analysis::tuco::{tuco, TucoLayer};
use crate::models::{ForwardCtx, Llama};
use crate::session::Session;
use anyhow::{bail, Context};
use std::path::Path;

pub struct TucoArgs<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub finetuned: Option<&'a Path>,
    pub prompts: &'a [String],
    pub prompts_file: Option<&'a Path>,
    pub chat: bool,
    pub kappa: f64,
    pub out: &'a Path,
}

#[derive(serde::Serialize)]
struct PromptTuco {
    prompt: String,
    tokens: usize,
    tuco: f64,
    /// The steered model's most likely next token.
    next_token: String,
    layers: Vec<TucoLayer>,
}

pub fn run_tuco(a: &TucoArgs) -> anyhow::Result<()> {
    if a.adapter.is_some() == a.finetuned.is_some() {
        bail!("give the fine-tune as --adapter DIR (the pre-trained model is --model with the adapter switched off) or as --finetuned MODEL, one of them");
    }
    if !a.kappa.is_finite() {
        bail!("--kappa {}: expected a number (1 = the fine-tuned model, 0 = fine-tuning switched off, > 1 amplifies it)", a.kappa);
    }
    let mut prompts = a.prompts.to_vec();
    if let Some(f) = a.prompts_file {
        prompts.extend(super::read_prompts(f)?);
    }
    if prompts.is_empty() {
        bail!("give at least one --prompt TEXT or --prompts FILE.jsonl");
    }
    let session = Session::load(a.model, a.adapter)?;
    let finetuned = a.finetuned.map(crate::models::load::load_model).transpose()?;
    if let Some(f) = &finetuned {
        let (b, c) = (&session.model.config, &f.config);
        if (b.hidden_size, b.num_hidden_layers, b.vocab_size) != (c.hidden_size, c.num_hidden_layers, c.vocab_size) {
            bail!(
                "--finetuned {} has another shape than --model (hidden, layers, vocabulary differ): not a fine-tune of it",
                a.finetuned.expect("set").display()
            );
        }
    }
    // The fine-tuned model: the session's with its adapter, or the other model.
    let ft_model: &Llama = finetuned.as_ref().unwrap_or(&session.model);
    let base = &session.model;
    let pre_ctx = if finetuned.is_some() { ForwardCtx::eval() } else { ForwardCtx::reference() };
    let mut results = Vec::new();
    for p in &prompts {
        let ids = crate::decode::prompt_ids(&session.tokenizer, p, a.chat)?;
        if ids.is_empty() {
            bail!("prompt {p:?} encodes to no tokens");
        }
        let x0 = ft_model.embed_ids(&ids, 1, ids.len())?;
        let r = tuco(
            x0,
            ft_model.layers.len(),
            a.kappa,
            |l, x| Ok(base.block_forward(l, x, 0, None, &pre_ctx)?),
            |l, x| Ok(ft_model.block_forward(l, x, 0, None, &ForwardCtx::eval())?),
        )?;
        let logits = crate::kernels::lm_head_logits(&ft_model.final_norm(&r.residual)?, ft_model.head_weight())?;
        let last: Vec<f32> = logits.get(ids.len() - 1)?.to_vec1()?;
        let next = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i) as u32;
        crate::note!("TuCo {:.4}  {p:?}", r.tuco);
        results.push(PromptTuco {
            prompt: p.clone(),
            tokens: ids.len(),
            tuco: r.tuco,
            next_token: session.tokenizer.decode(&[next], false)?,
            layers: r.layers,
        });
    }
    std::fs::create_dir_all(a.out).map_err(|e| crate::Error::io(a.out, e))?;
    let mean = results.iter().map(|r| r.tuco).sum::<f64>() / results.len() as f64;
    let json = serde_json::json!({ "kappa": a.kappa, "mean_tuco": mean, "prompts": results });
    crate::io_util::write_atomic(&a.out.join("tuco.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    // Per layer: TuCo of the sums so far, one line per prompt (the first 8) and the mean.
    let per_prompt: Vec<Vec<(f64, f64)>> = results.iter().map(|r| r.layers.iter().enumerate().map(|(l, x)| (l as f64, x.tuco_so_far)).collect()).collect();
    let layers = per_prompt[0].len();
    let mean_curve: Vec<(f64, f64)> = (0..layers).map(|l| (l as f64, per_prompt.iter().map(|c| c[l].1).sum::<f64>() / per_prompt.len() as f64)).collect();
    let labels: Vec<String> = (0..per_prompt.len().min(8)).map(|i| format!("prompt {}", i + 1)).collect();
    let mut series: Vec<crate::plot::Series> = vec![crate::plot::Series { label: "mean", points: &mean_curve }];
    series.extend(per_prompt.iter().zip(&labels).map(|(c, l)| crate::plot::Series { label: l, points: c }));
    let title = format!("TuCo through the layers (κ = {})", a.kappa);
    let chart = crate::plot::Chart {
        title: &title,
        x_label: "layer",
        y_label: "TuCo of the sums so far",
        size: crate::plot::CHART_SIZE,
        integer_x: true,
        count_y: false,
    };
    crate::plot::line_chart(&a.out.join("tuco.png"), &chart, &series)?;
    crate::note!("mean TuCo {mean:.4} over {} prompts; tuco.json and tuco.png written to {}", results.len(), a.out.display());
    Ok(())
}

pub struct IntruderArgs<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub finetuned: Option<&'a Path>,
    pub top_k: usize,
    pub out: &'a Path,
}

/// The thresholds ε the counts are reported for.
const EPSILONS: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// `analyze intruders` (METHODS.md §8.2): per changed matrix, the top-k left singular vectors of
/// the fine-tuned weight and their best |cosine| with the base's; intruder counts for every ε.
pub fn run_intruders(a: &IntruderArgs) -> anyhow::Result<()> {
    if a.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let (base, ft) = merged_pair(a.model, a.adapter, a.finetuned)?;
    let mut modules = serde_json::Map::new();
    let mut by_layer = vec![[0usize; EPSILONS.len()]; base.layers.len()];
    let mut totals = [0usize; EPSILONS.len()];
    let mut unchanged = 0;
    for (lb, lf) in base.linears().zip(ft.linears()) {
        let (w0, w) = (lb.weight.to_tensor()?, lf.weight.to_tensor()?);
        if w0.flatten_all()?.to_vec1::<f32>()? == w.flatten_all()?.to_vec1::<f32>()? {
            unchanged += 1;
            continue;
        }
        let cos = crate::posthoc::intruders::measure(&crate::linalg::from_tensor(&w0)?, &crate::linalg::from_tensor(&w)?, a.top_k)?;
        let counts: Vec<usize> = EPSILONS.iter().map(|e| cos.iter().filter(|c| **c < *e).count()).collect();
        for (i, n) in counts.iter().enumerate() {
            totals[i] += n;
            if let Some(l) = crate::models::block_index(&lb.name) {
                by_layer[l][i] += n;
            }
        }
        let at: serde_json::Map<String, serde_json::Value> = EPSILONS.iter().zip(&counts).map(|(e, n)| (format!("{e}"), (*n).into())).collect();
        modules.insert(lb.name.clone(), serde_json::json!({ "top_k_max_abs_cos": cos, "intruders": at }));
    }
    if modules.is_empty() {
        bail!("the fine-tune changes no linear module of --model: nothing to measure");
    }
    let total_at: serde_json::Map<String, serde_json::Value> = EPSILONS.iter().zip(&totals).map(|(e, n)| (format!("{e}"), (*n).into())).collect();
    let changed = modules.len();
    let json =
        serde_json::json!({ "top_k": a.top_k, "modules_changed": changed, "modules_unchanged": unchanged, "intruders_total": total_at, "modules": modules });
    std::fs::create_dir_all(a.out).map_err(|e| crate::Error::io(a.out, e))?;
    crate::io_util::write_atomic(&a.out.join("intruders.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    let by_eps: Vec<(f64, f64)> = EPSILONS.iter().zip(&totals).map(|(e, n)| (*e, *n as f64)).collect();
    let chart = crate::plot::Chart {
        title: "Intruder dimensions against ε",
        x_label: "ε (largest |cos| with the base below it)",
        y_label: "intruders, all modules",
        size: crate::plot::CHART_SIZE,
        integer_x: false,
        count_y: true,
    };
    crate::plot::line_chart(&a.out.join("intruders_by_epsilon.png"), &chart, &[crate::plot::Series { label: &format!("top {}", a.top_k), points: &by_eps }])?;
    let shown = [(2usize, "ε = 0.3"), (4, "ε = 0.5"), (6, "ε = 0.7")];
    let curves: Vec<Vec<(f64, f64)>> = shown.iter().map(|(i, _)| by_layer.iter().enumerate().map(|(l, c)| (l as f64, c[*i] as f64)).collect()).collect();
    let series: Vec<crate::plot::Series> = shown.iter().zip(&curves).map(|((_, label), c)| crate::plot::Series { label, points: c }).collect();
    let chart = crate::plot::Chart {
        title: "Intruder dimensions per layer",
        x_label: "layer",
        y_label: "intruders in the layer's modules",
        size: crate::plot::CHART_SIZE,
        integer_x: true,
        count_y: true,
    };
    crate::plot::line_chart(&a.out.join("intruders_by_layer.png"), &chart, &series)?;
    crate::note!("{changed} changed modules ({unchanged} unchanged), top {}: intruders at ε = 0.5: {}", a.top_k, totals[4]);
    crate::note!("intruders.json, intruders_by_epsilon.png and intruders_by_layer.png written to {}", a.out.display());
    Ok(())
}

/// The pre-trained model and the fine-tuned one in weight form: `--model` with `--adapter`
/// merged into it, or `--finetuned`; their linear modules must match.
fn merged_pair(model: &Path, adapter: Option<&Path>, finetuned: Option<&Path>) -> anyhow::Result<(Llama, Llama)> {
    let base = crate::models::load::load_model(model)?;
    let ft = match (adapter, finetuned) {
        (Some(dir), None) => crate::posthoc::merged_adapter(model, dir)?,
        (None, Some(path)) => crate::models::load::load_model(path)?,
        _ => bail!("give the fine-tune as --adapter DIR (merged into --model) or as --finetuned MODEL, one of them"),
    };
    if base.sites() != ft.sites() {
        bail!("the fine-tuned model's linear modules differ from --model's (names or shapes): not a fine-tune of it");
    }
    Ok((base, ft))
}

pub struct ForgettingArgs<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub finetuned: Option<&'a Path>,
    pub data: &'a [std::path::PathBuf],
    pub format: &'a str,
    pub sequence_len: usize,
    pub batch_size: usize,
    pub limit: Option<usize>,
    pub out: &'a Path,
}

/// `analyze forgetting` (METHODS.md §8.3): each file's loss under the pre-trained and the
/// fine-tuned model, with the examples that got most worse.
pub fn run_forgetting(a: &ForgettingArgs) -> anyhow::Result<()> {
    use crate::analysis::forgetting;
    use crate::train::eval::{nll_per_example_with, show_progress};
    if a.adapter.is_some() == a.finetuned.is_some() {
        bail!("give the fine-tune as --adapter DIR (of --model) or as --finetuned MODEL, one of them");
    }
    if a.sequence_len == 0 || a.batch_size == 0 {
        bail!("--sequence-len and --batch-size must be at least 1");
    }
    let before = Session::load(a.model, None)?;
    let after = match a.finetuned {
        Some(path) => Session::load(path, None)?,
        None => Session::load(a.model, a.adapter)?,
    };
    if let Some(path) = a.finetuned {
        crate::decode::check_same_tokenizer(("--model", &before.tokenizer), ("--finetuned", &after.tokenizer))
            .with_context(|| format!("--finetuned {}", path.display()))?;
    }
    let opts = crate::data::EncodeOptions { train_on_inputs: false, add_eos: false, sequence_len: a.sequence_len };
    let pad = before.tokenizer.pad_id();
    let mut files = Vec::new();
    for path in a.data {
        let spec = crate::config::DatasetSpec { path: path.clone(), format: a.format.to_string() };
        let mut data = crate::train::dataset::load_spec(&spec, &before.tokenizer, &opts)?;
        if let Some(n) = a.limit {
            data.examples.truncate(n);
        }
        if data.examples.iter().any(|e| e.rejected.is_some()) {
            bail!("{}: holds preference pairs; the probe scores texts (text, completion, chat or alpaca records)", path.display());
        }
        if data.examples.is_empty() {
            bail!("{}: no example has a target token to score ({} records)", path.display(), data.stats.records);
        }
        let name_of = path.display().to_string();
        let n = data.examples.len();
        let b = nll_per_example_with(&before.model, &data.examples, a.batch_size, pad, &mut show_progress(format!("{name_of}, pre-trained"), n))?;
        let f = nll_per_example_with(&after.model, &data.examples, a.batch_size, pad, &mut show_progress(format!("{name_of}, fine-tuned"), n))?;
        let name = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        let r = forgetting::compare(&name, &b, &f);
        if !(r.loss_before.is_finite() && r.loss_after.is_finite()) {
            bail!("{}: the loss is not finite (before {}, after {}): a model produces non-finite logits", path.display(), r.loss_before, r.loss_after);
        }
        crate::note!("{name}: loss {:.4} → {:.4} ({:+.4}, perplexity ×{:.3}) over {} tokens", r.loss_before, r.loss_after, r.change, r.perplexity_ratio, r.tokens);
        files.push(r);
    }
    std::fs::create_dir_all(a.out).map_err(|e| crate::Error::io(a.out, e))?;
    let json = serde_json::json!({ "files": files });
    crate::io_util::write_atomic(&a.out.join("forgetting.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    let names: Vec<String> = files.iter().map(|f| f.file.clone()).collect();
    let groups = [("pre-trained", files.iter().map(|f| f.loss_before).collect()), ("fine-tuned", files.iter().map(|f| f.loss_after).collect())];
    let chart = crate::plot::Chart {
        title: "Loss per file, before and after fine-tuning",
        x_label: "file",
        y_label: "mean NLL per token",
        size: crate::plot::CHART_SIZE,
        integer_x: true,
        count_y: false,
    };
    crate::plot::bar_chart(&a.out.join("forgetting.png"), &chart, &names, &groups)?;
    crate::note!("forgetting.json and forgetting.png written to {}", a.out.display());
    Ok(())
}

/// `analyze report`: per changed linear module, the norms, ranks and leading singular values of
/// `ΔW = W_ft − W_0`.
pub fn run_report(model: &Path, adapter: Option<&Path>, finetuned: Option<&Path>, out: &Path) -> anyhow::Result<()> {
    use crate::analysis::spectrum::{self, ChangeSpectrum};
    let (base, ft) = merged_pair(model, adapter, finetuned)?;
    let mut modules: Vec<(String, ChangeSpectrum)> = Vec::new();
    for (lb, lf) in base.linears().zip(ft.linears()) {
        let (w0, w) = (crate::linalg::from_tensor(&lb.weight.to_tensor()?)?, crate::linalg::from_tensor(&lf.weight.to_tensor()?)?);
        let delta = &w - &w0;
        if delta.iter().all(|x| *x == 0.0) {
            continue;
        }
        modules.push((lb.name.clone(), spectrum::measure(&w0, &delta)?));
    }
    if modules.is_empty() {
        bail!("the fine-tune changes no linear module of --model: nothing to report");
    }
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let json = serde_json::json!({
        "modules_changed": modules.len(),
        "modules": modules.iter().map(|(n, s)| (n.clone(), serde_json::to_value(s).expect("serialisable"))).collect::<serde_json::Map<_, _>>(),
    });
    crate::io_util::write_atomic(&out.join("report.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;

    // One line per kind of module (q_proj, down_proj, …), across the layers.
    let kind = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
    let mut kinds: Vec<String> = modules.iter().map(|(n, _)| kind(n)).collect();
    kinds.sort();
    kinds.dedup();
    let norms: Vec<Vec<(f64, f64)>> = kinds
        .iter()
        .map(|k| modules.iter().filter(|(n, _)| &kind(n) == k).filter_map(|(n, s)| crate::models::block_index(n).map(|l| (l as f64, s.frobenius))).collect())
        .collect();
    let series: Vec<crate::plot::Series> = kinds.iter().zip(&norms).map(|(k, p)| crate::plot::Series { label: k, points: p }).collect();
    let chart = crate::plot::Chart { title: "‖ΔW‖_F per layer", x_label: "layer", y_label: "‖ΔW‖_F", size: crate::plot::CHART_SIZE, integer_x: true, count_y: false };
    crate::plot::line_chart(&out.join("norms_by_layer.png"), &chart, &series)?;
    // Each kind's mean normalised spectrum σ_i/σ_1 over the layers.
    let spectra: Vec<Vec<(f64, f64)>> = kinds
        .iter()
        .map(|k| {
            let of_kind: Vec<&ChangeSpectrum> = modules.iter().filter(|(n, _)| &kind(n) == k).map(|(_, s)| s).collect();
            let len = of_kind.iter().map(|s| s.singular_values.len()).min().unwrap_or(0);
            (0..len).map(|i| (i as f64 + 1.0, of_kind.iter().map(|s| s.singular_values[i] / s.spectral).sum::<f64>() / of_kind.len() as f64)).collect()
        })
        .collect();
    let series: Vec<crate::plot::Series> = kinds.iter().zip(&spectra).map(|(k, p)| crate::plot::Series { label: k, points: p }).collect();
    let chart = crate::plot::Chart {
        title: "Singular spectrum of ΔW (mean over layers)",
        x_label: "i",
        y_label: "σ_i / σ_1",
        size: crate::plot::CHART_SIZE,
        integer_x: true,
        count_y: false,
    };
    crate::plot::line_chart(&out.join("spectra.png"), &chart, &series)?;
    let mean_eff = modules.iter().map(|(_, s)| s.effective_rank).sum::<f64>() / modules.len() as f64;
    crate::note!("{} changed modules, mean effective rank {mean_eff:.2}; report.json, norms_by_layer.png and spectra.png written to {}", modules.len(), out.display());
    Ok(())
}
