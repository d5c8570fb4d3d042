//! `metrics.jsonl`: one JSON object per logged step or evaluation.

use crate::error::{Error, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Default)]
pub struct StepMetrics {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds the step took (its forward, backward or perturbed passes, and the update).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// The objective's own step means (`nll`, `kl`, …).
    #[serde(flatten)]
    pub objective: std::collections::BTreeMap<String, f64>,
}

/// `loss.png`'s width and height in pixels.
pub const LOSS_PLOT_SIZE: (u32, u32) = crate::plot::CHART_SIZE;

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log; on resume, lines after `keep_through_step` (written by the interrupted
    /// run after its last checkpoint) are dropped so the file matches the resumed trajectory.
    pub fn open(path: &Path, keep_through_step: Option<usize>) -> Result<Self> {
        match keep_through_step {
            None => crate::io_util::write_atomic(path, b"")?,
            Some(last) if path.exists() => {
                let text = crate::io_util::read_to_string(path)?;
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s as usize <= last)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                crate::io_util::write_atomic(path, kept.as_bytes())?;
            }
            Some(_) => crate::io_util::write_atomic(path, b"")?,
        }
        Ok(Self { path: path.to_path_buf() })
    }

    /// Draws the log's training loss (every step) and evaluation loss (where evaluated)
    /// against the step as a PNG at `png`.
    pub fn plot(&self, png: &Path, title: &str) -> Result<()> {
        let text = crate::io_util::read_to_string(&self.path)?;
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            let Some(step) = v.get("step").and_then(|s| s.as_f64()) else { continue };
            if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
                train.push((step, l));
            }
            if let Some(l) = v.get("eval_loss").and_then(|l| l.as_f64()) {
                eval.push((step, l));
            }
        }
        let mut series = vec![crate::plot::Series { label: "training loss", points: &train }];
        if !eval.is_empty() {
            series.push(crate::plot::Series { label: "evaluation loss", points: &eval });
        }
        crate::plot::line_chart(png, &crate::plot::Chart { title, x_label: "step", y_label: "loss", size: LOSS_PLOT_SIZE, integer_x: true, count_y: false }, &series)
    }

    pub fn append(&self, m: &StepMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let line = serde_json::to_string(m).expect("metrics always serialise");
        writeln!(f, "{line}").map_err(|e| Error::io(&self.path, e))
    }
}
