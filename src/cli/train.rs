use crate::config::TrainConfig;
use crate::train::memory::peak_resident_bytes;
use crate::train::{train, TrainOptions};
use anyhow::Context;
use std::path::Path;

pub fn run(config: &Path, set: &[String], resume: bool, overwrite: bool, force: bool) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(config, set)?;
    crate::train::interrupt::install();
    let summary = train(&cfg, &TrainOptions { resume, overwrite, force }).with_context(|| format!("training with {}", config.display()))?;
    if let (Some(b), Some(a)) = (summary.eval_before, summary.eval_after) {
        crate::note!("eval loss: {b:.4} before, {a:.4} after training");
    }
    crate::note!("adapter written to {}", summary.adapter_dir.display());
    let out = serde_json::json!({
        "steps": summary.steps,
        "train_loss": summary.last_loss,
        "eval_loss_before": summary.eval_before,
        "eval_loss_after": summary.eval_after,
        "tokens_per_s": summary.tokens_per_s,
        "adapter": summary.adapter_dir,
        // The estimate made before loading beside what the kernel measured (`VmHWM`).
        "memory_estimate_mib": summary.memory_estimate.map(|m| m.total_mib()),
        "peak_rss_mib": peak_resident_bytes().map(|b| (b as f64 / 1048576.0 * 10.0).round() / 10.0),
    });
    println!("{out}");
    Ok(())
}
