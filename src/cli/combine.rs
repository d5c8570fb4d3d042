//! `ferrotune combine`: several fine-tunes of one base merged into one model by their task
//! vectors (task arithmetic, TIES, LiNeS; `crate::posthoc`), written as a merged model; or one
//! LoRA adapter without its intruder dimensions, written as an adapter or merged.

use super::export::check_precision_flags;
use crate::export::ExportFormat;
use crate::io_util::{check_output_path, OutputKind};
use crate::posthoc::intruders::IntruderSettings;
use crate::posthoc::{combine, concatenate_loras, reduce_intruders, Rule};
use anyhow::bail;
use std::path::{Path, PathBuf};

pub struct CombineArgs<'a> {
    pub model: &'a Path,
    pub inputs: &'a [PathBuf],
    pub weights: Option<&'a [f64]>,
    pub method: &'a str,
    pub density: Option<f64>,
    pub lambda: Option<f64>,
    pub beta: Option<f64>,
    pub lines_merge: Option<&'a str>,
    pub top_k: Option<usize>,
    pub threshold_epsilon: Option<f64>,
    pub mitigation_lambda: Option<f64>,
    pub format: &'a str,
    pub out: &'a Path,
    pub dtype: Option<&'a str>,
    pub quant: Option<&'a str>,
    pub overwrite: bool,
    pub graft: &'a GraftFlags,
}

/// `--method graft`'s settings.
#[derive(clap::Args, Debug, Default)]
pub struct GraftFlags {
    /// graft: the task's training data (JSONL in any format `train` reads) the mask is found on.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// graft: data the best epoch's mask is chosen on (default: --data).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// graft: the base patch's share of the changed modules' entries (1e-4).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// graft: step size of the mask scores (1e7, the paper's).
    #[arg(long)]
    pub graft_lr: Option<f64>,
    /// graft: passes over --data (10).
    #[arg(long)]
    pub graft_epochs: Option<usize>,
    /// graft: examples per step (4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// graft: tokens per example, longer ones cut (512).
    #[arg(long)]
    pub sequence_len: Option<usize>,
    /// graft: format of --data and --val: auto, text, completion, chat, alpaca.
    #[arg(long)]
    pub data_format: Option<String>,
    /// graft: seed of the scores' start and the data order (0).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl GraftFlags {
    /// The first flag given, if any.
    fn first_set(&self) -> Option<&'static str> {
        [
            ("--data", self.data.is_some()),
            ("--val", self.val.is_some()),
            ("--sparsity", self.sparsity.is_some()),
            ("--graft-lr", self.graft_lr.is_some()),
            ("--graft-epochs", self.graft_epochs.is_some()),
            ("--batch-size", self.batch_size.is_some()),
            ("--sequence-len", self.sequence_len.is_some()),
            ("--data-format", self.data_format.is_some()),
            ("--seed", self.seed.is_some()),
        ]
        .into_iter()
        .find(|(_, set)| *set)
        .map(|(f, _)| f)
    }
}

/// The rule the flags describe; flags that belong to another rule are refused by name.
fn rule(a: &CombineArgs) -> anyhow::Result<Rule> {
    let refuse = |flag: &str, set: bool, belongs: &str| -> anyhow::Result<()> {
        if set {
            bail!("{flag} is a setting of --method {belongs}");
        }
        Ok(())
    };
    let ties = |density: Option<f64>| -> anyhow::Result<Rule> {
        let density = density.unwrap_or(0.2);
        if !(density > 0.0 && density <= 1.0) {
            bail!("--density {density}: expected the share of entries each task vector keeps, in (0, 1] (TIES' default 0.2)");
        }
        Ok(Rule::Ties { density })
    };
    match a.method {
        "task_arithmetic" | "ties" => {
            refuse("--lambda", a.lambda.is_some(), "lines")?;
            refuse("--beta", a.beta.is_some(), "lines")?;
            refuse("--lines-merge", a.lines_merge.is_some(), "lines")?;
            if a.method == "ties" {
                ties(a.density)
            } else {
                refuse("--density", a.density.is_some(), "ties (or lines with --lines-merge ties)")?;
                Ok(Rule::TaskArithmetic)
            }
        }
        "lines" => {
            let base = match a.lines_merge.unwrap_or("task_arithmetic") {
                "task_arithmetic" => {
                    refuse("--density", a.density.is_some(), "ties (or lines with --lines-merge ties)")?;
                    Rule::TaskArithmetic
                }
                "ties" => ties(a.density)?,
                other => bail!("--lines-merge `{other}`: expected task_arithmetic or ties"),
            };
            Ok(Rule::Lines { base: Box::new(base), lambda: a.lambda, beta: a.beta })
        }
        other => bail!("--method `{other}`: expected task_arithmetic, ties, lines, intruders or graft"),
    }
}

pub fn run(a: &CombineArgs) -> anyhow::Result<()> {
    let intruder_flag =
        [("--top-k", a.top_k.is_some()), ("--threshold-epsilon", a.threshold_epsilon.is_some()), ("--mitigation-lambda", a.mitigation_lambda.is_some())];
    if a.method == "graft" {
        return run_graft(a);
    }
    if let Some(flag) = a.graft.first_set() {
        bail!("{flag} is a setting of --method graft");
    }
    if a.method == "intruders" {
        return run_intruders(a);
    }
    if let Some((flag, _)) = intruder_flag.iter().find(|(_, set)| *set) {
        bail!("{flag} is a setting of --method intruders");
    }
    let rule = rule(a)?;
    let format = ExportFormat::parse(a.format)?;
    let kind = match format {
        ExportFormat::MergedSafetensors | ExportFormat::Peft => OutputKind::Dir,
        ExportFormat::MergedGguf => OutputKind::File,
        other => bail!("--format {}: write peft (task arithmetic of LoRA adapters), merged-safetensors or merged-gguf", other.name()),
    };
    if format == ExportFormat::Peft && rule != Rule::TaskArithmetic {
        bail!("--format peft holds a combination exactly only for task_arithmetic of LoRA adapters (their ranks stacked); --method {} changes every entry, so write merged-safetensors or merged-gguf", a.method);
    }
    check_precision_flags(format, a.dtype, a.quant, "the adapter is written in f32")?;
    let weights: Vec<f32> = match a.weights {
        Some(w) if w.len() != a.inputs.len() => bail!("--weights has {} values for {} --inputs", w.len(), a.inputs.len()),
        Some(w) => w.iter().map(|&x| x as f32).collect(),
        None => vec![1.0; a.inputs.len()],
    };
    prepare_output(a, kind)?;
    if format == ExportFormat::Peft {
        concatenate_loras(a.model, a.inputs, &weights, a.out)?;
        crate::note!("task arithmetic of {} LoRA adapters (ranks stacked) written as a PEFT adapter to {}", a.inputs.len(), a.out.display());
        return Ok(());
    }
    let (session, report) = combine(a.model, a.inputs, &weights, &rule)?;
    for (input, l1) in a.inputs.iter().zip(&report.input_l1) {
        crate::note!("{}: ‖τ‖₁ = {l1:.6e}", input.display());
    }
    if let Some((alpha, beta)) = report.lines {
        crate::note!("LiNeS: α = {alpha:.6}, β = {beta:.6} (block l of L scaled by α + β·l/(L−1))");
    }
    crate::note!("{} of {} inputs over {} tensors: ‖θ − θ0‖₁ = {:.6e}", a.method, a.inputs.len(), report.tensors, report.merged_l1);
    super::export::write_merged(&session, format, a.out, a.dtype, a.quant)
}

/// Refuses the first of `flags` that is set: it belongs to another rule than `--method method`,
/// whose own settings are `own`.
fn refuse_others(method: &str, own: &str, flags: &[(&str, bool)]) -> anyhow::Result<()> {
    match flags.iter().find(|(_, set)| *set) {
        Some((flag, _)) => bail!("{flag} does not apply to --method {method} (its settings: {own})"),
        None => Ok(()),
    }
}

/// Checks `--out` for an output of `kind` and makes the folder it goes into.
fn prepare_output(a: &CombineArgs, kind: OutputKind) -> anyhow::Result<()> {
    check_output_path(a.out, kind, a.overwrite)?;
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
    }
    Ok(())
}

/// `--method intruders`: one LoRA adapter rewritten without its intruder dimensions.
fn run_intruders(a: &CombineArgs) -> anyhow::Result<()> {
    refuse_others(
        "intruders",
        "--top-k, --threshold-epsilon, --mitigation-lambda",
        &[
            ("--weights", a.weights.is_some()),
            ("--density", a.density.is_some()),
            ("--lambda", a.lambda.is_some()),
            ("--beta", a.beta.is_some()),
            ("--lines-merge", a.lines_merge.is_some()),
        ],
    )?;
    let [input] = a.inputs else { bail!("--method intruders rewrites one LoRA adapter: give one --inputs (got {})", a.inputs.len()) };
    let d = IntruderSettings::default();
    let settings = IntruderSettings {
        top_k: a.top_k.unwrap_or(d.top_k),
        threshold: a.threshold_epsilon.unwrap_or(d.threshold),
        lambda: a.mitigation_lambda.unwrap_or(d.lambda),
    };
    if settings.top_k == 0 || !(settings.threshold > 0.0 && settings.threshold <= 1.0) || !settings.lambda.is_finite() {
        bail!("--top-k must be at least 1 and --threshold-epsilon in (0, 1] (a cosine); --mitigation-lambda a number (PEFT's defaults: 10, 0.5, 0.75)");
    }
    let format = ExportFormat::parse(a.format)?;
    let kind = match format {
        ExportFormat::Peft | ExportFormat::MergedSafetensors => OutputKind::Dir,
        ExportFormat::MergedGguf => OutputKind::File,
        ExportFormat::GgufLora => bail!("--format gguf-lora: write peft, then `ferrotune export --format gguf-lora` from it"),
    };
    check_precision_flags(format, a.dtype, a.quant, "the adapter is written in f32")?;
    check_output_path(a.out, kind, a.overwrite)?;
    let mut r = reduce_intruders(a.model, input, &settings)?;
    let hit = r.with_intruders();
    crate::note!(
        "intruder dimensions (top {}, |cos| < {}, scaled by {}): {} of {} modules",
        settings.top_k,
        settings.threshold,
        settings.lambda,
        hit.len(),
        r.modules.len()
    );
    for (site, idx) in &hit {
        crate::note!("  {site}: {idx:?}");
    }
    if format == ExportFormat::Peft {
        r.write_adapter(input, a.out)?;
        crate::note!("PEFT adapter written to {}", a.out.display());
        return Ok(());
    }
    r.merge_into_base()?;
    super::export::write_merged(&r.session, format, a.out, a.dtype, a.quant)
}

/// `--method graft`: the entries of one fine-tune that carry its skill on `--data`, written as a
/// sparse diff (`--format sparse`) or merged into the base.
fn run_graft(a: &CombineArgs) -> anyhow::Result<()> {
    use crate::posthoc::graft::{Graft, GraftSettings};
    refuse_others(
        "graft",
        "--data, --val, --sparsity, --graft-lr, --graft-epochs, --batch-size, --sequence-len, --seed",
        &[
            ("--weights", a.weights.is_some()),
            ("--density", a.density.is_some()),
            ("--lambda", a.lambda.is_some()),
            ("--beta", a.beta.is_some()),
            ("--lines-merge", a.lines_merge.is_some()),
            ("--top-k", a.top_k.is_some()),
            ("--threshold-epsilon", a.threshold_epsilon.is_some()),
            ("--mitigation-lambda", a.mitigation_lambda.is_some()),
        ],
    )?;
    let g = a.graft;
    let [input] = a.inputs else { bail!("--method graft localizes the skill of one fine-tune: give one --inputs (got {})", a.inputs.len()) };
    let Some(data_path) = g.data.as_deref() else { bail!("--method graft needs the task's data to find the mask on: --data FILE.jsonl") };
    let (format, kind) = match a.format {
        "sparse" => (None, OutputKind::Dir),
        other => {
            let f = ExportFormat::parse(other)?;
            match f {
                ExportFormat::MergedSafetensors => (Some(f), OutputKind::Dir),
                ExportFormat::MergedGguf => (Some(f), OutputKind::File),
                _ => bail!("--format {other}: a graft is written as sparse (an adapter folder of its sparse diff), merged-safetensors or merged-gguf"),
            }
        }
    };
    if let Some(f) = format {
        check_precision_flags(f, a.dtype, a.quant, "the graft is written in f32")?;
    } else if a.dtype.is_some() || a.quant.is_some() {
        bail!("--dtype/--quant apply to the merged formats; --format sparse holds the grafted entries in f32");
    }
    let d = GraftSettings::default();
    let settings = GraftSettings {
        sparsity: g.sparsity.unwrap_or(d.sparsity),
        lr: g.graft_lr.unwrap_or(d.lr),
        epochs: g.graft_epochs.unwrap_or(d.epochs),
        bias: d.bias,
        batch_size: g.batch_size.unwrap_or(d.batch_size),
        seed: g.seed.unwrap_or(d.seed),
    };
    if !(settings.lr.is_finite() && settings.lr >= 0.0) || settings.batch_size == 0 {
        bail!("--graft-lr must be a number ≥ 0 and --batch-size at least 1");
    }
    let sequence_len = g.sequence_len.unwrap_or(512);
    if sequence_len == 0 {
        bail!("--sequence-len must be at least 1");
    }
    prepare_output(a, kind)?;

    let mut session = crate::session::Session::load(a.model, None)?;
    let finetuned = crate::posthoc::fine_tuned_model(a.model, input)?;
    if session.model.sites() != finetuned.sites() {
        bail!("{}: its linear modules differ from --model's (names or shapes): not a fine-tune of it", input.display());
    }
    let data_format = g.data_format.as_deref().unwrap_or("auto");
    let opts = crate::data::EncodeOptions { train_on_inputs: false, add_eos: true, sequence_len };
    let load = |path: &Path| -> anyhow::Result<Vec<crate::data::EncodedExample>> {
        let spec = crate::config::DatasetSpec { path: path.to_path_buf(), format: data_format.to_string() };
        let data = crate::train::dataset::load_spec(&spec, &session.tokenizer, &opts)?;
        if data.examples.iter().any(|e| e.rejected.is_some()) {
            bail!("{}: holds preference pairs; grafting scores the SFT loss of texts", path.display());
        }
        if data.examples.is_empty() {
            bail!("{}: no example has a target token ({} records)", path.display(), data.stats.records);
        }
        Ok(data.examples)
    };
    let train = load(data_path)?;
    let val = g.val.as_deref().map(load).transpose()?;
    let pad = session.tokenizer.pad_id();
    let judge = val.as_deref().unwrap_or(&train);
    // The two ends the graft lies between, on the data it is judged on.
    let loss_base = crate::train::evaluate(&session.model, judge, settings.batch_size, pad)?.loss;
    let loss_ft = crate::train::evaluate(&finetuned, judge, settings.batch_size, pad)?.loss;
    let mut graft = Graft::attach(&mut session.model, &finetuned, settings)?;
    drop(finetuned);
    crate::note!(
        "graft: {} changed modules, {} entries; base patch {} entries (s = {}); loss {loss_base:.4} (base) … {loss_ft:.4} (fine-tuned) on {}",
        graft.sites.len(),
        graft.entries(),
        graft.masks().iter().map(Vec::len).sum::<usize>(),
        settings.sparsity,
        if val.is_some() { "--val" } else { "--data" }
    );
    let recovered = |loss: f64| if loss_base != loss_ft { (loss_base - loss) / (loss_base - loss_ft) } else { f64::NAN };
    let (masks, history) = graft.optimise(&session.model, &train, val.as_deref(), pad, &mut |r| {
        crate::note!(
            "graft epoch {}: {} entries, loss {:.4} ({:.1} % of the fine-tune's gain){}",
            r.epoch,
            r.entries,
            r.mask_loss,
            100.0 * recovered(r.mask_loss),
            r.relaxed_loss.map_or(String::new(), |l| format!(", relaxed mask's training loss {l:.4}"))
        )
    })?;
    let best = history.iter().min_by(|x, y| x.mask_loss.total_cmp(&y.mask_loss)).expect("epoch 0 is always measured");
    let record = serde_json::json!({
        "source": input.display().to_string(),
        "sparsity": settings.sparsity,
        "lr": settings.lr,
        "epochs": settings.epochs,
        "bias": settings.bias,
        "seed": settings.seed,
        "entries": best.entries,
        "share": best.entries as f64 / graft.entries() as f64,
        "chosen_epoch": best.epoch,
        "loss_base": loss_base,
        "loss_finetuned": loss_ft,
        "loss_grafted": best.mask_loss,
        "history": history,
    });
    crate::note!(
        "graft: kept epoch {}'s mask, {} entries ({:.2e} of the changed modules'), loss {:.4}, {:.1} % of the fine-tune's gain",
        best.epoch,
        best.entries,
        best.entries as f64 / graft.entries() as f64,
        best.mask_loss,
        100.0 * recovered(best.mask_loss)
    );
    match format {
        None => {
            std::fs::create_dir_all(a.out).map_err(|e| crate::Error::io(a.out, e))?;
            graft.diff(&masks).save(&a.out.join(crate::methods::ADAPTER_WEIGHTS))?;
            let cfg = crate::methods::graft::config(&a.model.display().to_string(), record);
            crate::io_util::write_atomic(&a.out.join(crate::methods::ADAPTER_CONFIG), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
            crate::note!("graft written to {} (a sparse diff; `eval`, `merge` and `export` read it as an adapter)", a.out.display());
            Ok(())
        }
        Some(f) => {
            graft.merge_into(&mut session.model, &masks)?;
            super::export::write_merged(&session, f, a.out, a.dtype, a.quant)
        }
    }
}
