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
        other => bail!("--method `{other}`: expected task_arithmetic, ties, lines or intruders"),
    }
}

pub fn run(a: &CombineArgs) -> anyhow::Result<()> {
    let intruder_flag =
        [("--top-k", a.top_k.is_some()), ("--threshold-epsilon", a.threshold_epsilon.is_some()), ("--mitigation-lambda", a.mitigation_lambda.is_some())];
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
    check_output_path(a.out, kind, a.overwrite)?;
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
    }
    if format == ExportFormat::Peft {
        concatenate_loras(a.model, a.inputs, &weights, a.out)?;
        eprintln!("task arithmetic of {} LoRA adapters (ranks stacked) written as a PEFT adapter to {}", a.inputs.len(), a.out.display());
        return Ok(());
    }
    let (session, report) = combine(a.model, a.inputs, &weights, &rule)?;
    for (input, l1) in a.inputs.iter().zip(&report.input_l1) {
        eprintln!("{}: ‖τ‖₁ = {l1:.6e}", input.display());
    }
    if let Some((alpha, beta)) = report.lines {
        eprintln!("LiNeS: α = {alpha:.6}, β = {beta:.6} (block l of L scaled by α + β·l/(L−1))");
    }
    eprintln!("{} of {} inputs over {} tensors: ‖θ − θ0‖₁ = {:.6e}", a.method, a.inputs.len(), report.tensors, report.merged_l1);
    super::export::write_merged(&session, format, a.out, a.dtype, a.quant)
}

/// `--method intruders`: one LoRA adapter rewritten without its intruder dimensions.
fn run_intruders(a: &CombineArgs) -> anyhow::Result<()> {
    for (flag, set) in [
        ("--weights", a.weights.is_some()),
        ("--density", a.density.is_some()),
        ("--lambda", a.lambda.is_some()),
        ("--beta", a.beta.is_some()),
        ("--lines-merge", a.lines_merge.is_some()),
    ] {
        if set {
            bail!("{flag} does not apply to --method intruders (its settings: --top-k, --threshold-epsilon, --mitigation-lambda)");
        }
    }
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
    eprintln!(
        "intruder dimensions (top {}, |cos| < {}, scaled by {}): {} of {} modules",
        settings.top_k,
        settings.threshold,
        settings.lambda,
        hit.len(),
        r.modules.len()
    );
    for (site, idx) in &hit {
        eprintln!("  {site}: {idx:?}");
    }
    if format == ExportFormat::Peft {
        r.write_adapter(input, a.out)?;
        eprintln!("PEFT adapter written to {}", a.out.display());
        return Ok(());
    }
    r.merge_into_base()?;
    super::export::write_merged(&r.session, format, a.out, a.dtype, a.quant)
}
