//! `ferrotune combine`: several fine-tunes of one base merged into one model by their task
//! vectors (task arithmetic, TIES, LiNeS; `crate::posthoc`), written as a merged model.

use crate::export::ExportFormat;
use crate::io_util::{check_output_path, OutputKind};
use crate::posthoc::{combine, Rule};
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
        other => bail!("--method `{other}`: expected task_arithmetic, ties or lines"),
    }
}

pub fn run(a: &CombineArgs) -> anyhow::Result<()> {
    let rule = rule(a)?;
    let format = ExportFormat::parse(a.format)?;
    let kind = match format {
        ExportFormat::MergedSafetensors => OutputKind::Dir,
        ExportFormat::MergedGguf => OutputKind::File,
        other => bail!("--format {}: a combination is a whole model; write merged-safetensors or merged-gguf", other.name()),
    };
    if a.quant.is_some() && format != ExportFormat::MergedGguf {
        bail!("--quant applies to --format merged-gguf only (for merged-safetensors use --dtype)");
    }
    if a.dtype.is_some() && format == ExportFormat::MergedGguf {
        bail!("--dtype does not apply to --format merged-gguf (use --quant f32|f16|bf16|q8_0|…)");
    }
    let weights: Vec<f32> = match a.weights {
        Some(w) if w.len() != a.inputs.len() => bail!("--weights has {} values for {} --inputs", w.len(), a.inputs.len()),
        Some(w) => w.iter().map(|&x| x as f32).collect(),
        None => vec![1.0; a.inputs.len()],
    };
    check_output_path(a.out, kind, a.overwrite)?;
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
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
