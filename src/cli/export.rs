//! `ferrotune export`: an adapter as a PEFT directory, a merged HF directory, a merged GGUF or
//! a llama.cpp LoRA GGUF; and the hidden `ferrotune logits` used by the llama.cpp check.

use crate::export::gguf::{self as gx, parse_lora_type, parse_merged_type};
use crate::export::ExportFormat;
use crate::formats::safetensors::SaveDType;
use crate::io_util::{check_output_path, OutputKind};
use crate::methods::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::models::ForwardCtx;
use crate::session::Session;
use anyhow::{anyhow, bail, Context};
use std::path::Path;

pub struct ExportArgs<'a> {
    pub model: &'a Path,
    pub adapter: &'a Path,
    pub format: &'a str,
    pub out: &'a Path,
    pub dtype: Option<&'a str>,
    pub quant: Option<&'a str>,
    pub overwrite: bool,
}

pub fn run(a: &ExportArgs) -> anyhow::Result<()> {
    let format = ExportFormat::parse(a.format)?;
    check_precision_flags(format, a.dtype, a.quant, "the adapter is copied as is")?;
    let kind = match format {
        ExportFormat::Peft | ExportFormat::MergedSafetensors => OutputKind::Dir,
        ExportFormat::MergedGguf | ExportFormat::GgufLora => OutputKind::File,
    };
    check_output_path(a.out, kind, a.overwrite)?;
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let load = || -> anyhow::Result<Session> {
        let session = Session::load(a.model, Some(a.adapter))
            .with_context(|| format!("the adapter {} does not load onto {}", a.adapter.display(), a.model.display()))?;
        let method = session.method.as_ref().expect("loaded with an adapter");
        method.can_export(format).map_err(|why| anyhow!("cannot export {} as {}: {why}", a.adapter.display(), format.name()))?;
        Ok(session)
    };
    match format {
        ExportFormat::Peft => {
            load()?;
            export_peft(a.adapter, a.out)
        }
        ExportFormat::MergedSafetensors | ExportFormat::MergedGguf => {
            let mut session = load()?;
            session.merge_adapter()?;
            write_merged(&session, format, a.out, a.dtype, a.quant)
        }
        ExportFormat::GgufLora => {
            let dtype = parse_lora_type(a.dtype.unwrap_or("f32"))?;
            for note in gx::check_lora_representable(a.adapter)? {
                crate::note!("note: {note}");
            }
            let session = load()?;
            let details = session.method.as_ref().expect("loaded with an adapter").describe();
            if details["use_rslora"].as_bool() == Some(true) {
                let (r, s) = (details["rank"].as_f64().unwrap_or(0.0), details["scaling"].as_f64().unwrap_or(0.0));
                crate::note!(
                    "note: rsLoRA adapter (scaling α/√r = {s:.6} at r = {r}); llama.cpp scales by adapter.lora.alpha / r and has no rsLoRA flag, so adapter.lora.alpha = α·√r = {:.6} is written",
                    s * r
                );
            }
            let r = gx::write_gguf_lora(&session, a.out, dtype)?;
            if r.rescaled > 0 {
                crate::note!(
                    "note: {} modules have a scaling other than adapter.lora.alpha / r (per-module ranks or alphas); their lora_b is scaled to give the same product",
                    r.rescaled
                );
            }
            crate::note!(
                "LoRA GGUF ({} pairs, r = {}, adapter.lora.alpha = {}, arch {}, {dtype}) written to {}",
                r.pairs,
                r.rank,
                r.alpha,
                r.architecture,
                a.out.display()
            );
            Ok(())
        }
    }
}

/// Refuses `--quant` / `--dtype` where `format` does not take them, before any (slow) model
/// load; `peft_values` says what a peft output's values are instead. Shared by `export` and
/// `combine`.
pub(super) fn check_precision_flags(format: ExportFormat, dtype: Option<&str>, quant: Option<&str>, peft_values: &str) -> anyhow::Result<()> {
    if quant.is_some() && format != ExportFormat::MergedGguf {
        let instead = if format == ExportFormat::Peft { String::new() } else { format!(" (for {} use --dtype)", format.name()) };
        bail!("--quant applies to --format merged-gguf only{instead}");
    }
    if dtype.is_some() && matches!(format, ExportFormat::MergedGguf | ExportFormat::Peft) {
        bail!(
            "--dtype does not apply to --format {} ({})",
            format.name(),
            if format == ExportFormat::Peft { peft_values } else { "use --quant f32|f16|bf16|q8_0|…" }
        );
    }
    Ok(())
}

/// Writes the model of `session` (its weights already final) as a merged Hugging Face folder
/// (`dtype`: f32, bf16, f16) or GGUF (`quant`); shared by `export` and `combine`.
pub(super) fn write_merged(session: &Session, format: ExportFormat, out: &Path, dtype: Option<&str>, quant: Option<&str>) -> anyhow::Result<()> {
    if format == ExportFormat::MergedSafetensors {
        let d = dtype.unwrap_or("f32");
        let dtype = SaveDType::parse(d).ok_or_else(|| anyhow!("--dtype `{d}`: expected f32, bf16 or f16"))?;
        crate::export::merged::write_hf_dir(session, out, dtype)?;
        crate::note!("merged model (safetensors, {d}) written to {}", out.display());
        return Ok(());
    }
    let quant = parse_merged_type(quant.unwrap_or("q8_0"))?;
    let r = gx::write_merged_gguf(session, out, quant)?;
    // One line per (row length, type used): which tensors fell back, as llama-quantize would.
    let mut groups: Vec<((usize, crate::formats::gguf::GgmlType), Vec<&str>)> = Vec::new();
    for f in &r.fallbacks {
        match groups.iter_mut().find(|(k, _)| *k == (f.row, f.used)) {
            Some((_, names)) => names.push(&f.tensor),
            None => groups.push(((f.row, f.used), vec![&f.tensor])),
        }
    }
    for ((row, used), names) in &groups {
        let shown = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
        let more = if names.len() > 3 { format!(", … ({} in all)", names.len()) } else { String::new() };
        crate::note!("note: rows of {row} are not whole {quant} blocks; stored as {used} (llama.cpp's fallback): {shown}{more}");
    }
    let meta = if r.metadata_from_source { "metadata copied from the source GGUF" } else { "llama metadata and tokenizer written from the HF directory" };
    crate::note!(
        "merged GGUF ({quant}, {} tensors, {:.1} MiB; {meta}) written to {}",
        r.tensors,
        r.bytes as f64 / (1 << 20) as f64,
        out.display()
    );
    Ok(())
}

/// Copies the adapter's two files (checked to load onto the model) to `out`.
fn export_peft(adapter: &Path, out: &Path) -> anyhow::Result<()> {
    crate::io_util::write_files_into(out, |tmp| {
        for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            let src = adapter.join(f);
            std::fs::copy(&src, tmp.join(f)).map_err(|e| crate::Error::io(&src, e))?;
        }
        Ok(())
    })?;
    crate::note!("PEFT adapter written to {}", out.display());
    Ok(())
}

/// Writes the logits of every position of `ids` (comma-separated token ids) as JSON:
/// `{"ids": [...], "vocab": V, "logits": [[V floats] per position]}`.
pub fn run_logits(model: &Path, adapter: Option<&Path>, ids: Option<&str>, text: Option<&str>, out: &Path) -> anyhow::Result<()> {
    let session = Session::load(model, adapter)?;
    let ids: Vec<u32> = match (ids, text) {
        (_, Some(text)) => session.tokenizer.encode(text, true)?,
        (Some(ids), None) => ids
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse::<u32>().map_err(|e| anyhow!("--ids: `{s}` is not a token id ({e})")))
            .collect::<anyhow::Result<_>>()?,
        (None, None) => bail!("give --ids or --text"),
    };
    if ids.is_empty() {
        bail!("--ids / --text: give at least one token");
    }
    let logits = session.model.logits(&ids, 1, ids.len(), None, &ForwardCtx::eval())?;
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let v = serde_json::json!({"ids": ids, "vocab": session.model.config.vocab_size, "logits": rows});
    crate::io_util::write_atomic(out, serde_json::to_string(&v)?.as_bytes())?;
    crate::note!("logits of {} positions written to {}", ids.len(), out.display());
    Ok(())
}
