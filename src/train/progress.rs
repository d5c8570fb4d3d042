//! Training progress: an indicatif bar on a terminal, a log line per logged step otherwise (CI,
//! pipes), a JSON record per logged step under `--json-logs`, nothing under `--quiet`.
//!
//! The time left counts training steps only: evaluations and checkpoints in between would make
//! a rate over wall-clock time promise too much after a pause and too little after a long one.

use crate::console::{self, Mode};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    /// Seconds spent in the steps this process ran, and how many.
    step_s: f64,
    steps_timed: usize,
}

/// One step as shown: its own loss, learning rate, gradient norm (none for a zeroth-order step),
/// throughput and duration.
pub struct StepShown {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: f64,
    pub step_s: f64,
}

impl Progress {
    pub fn new(total: usize, start: usize) -> Self {
        let drawn = console::mode() == Mode::Normal && std::io::stderr().is_terminal();
        let bar = drawn.then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}]").expect("the template is valid"));
            b.set_position(start as u64);
            console::set_bar(Some(b.clone()));
            b
        });
        Self { bar, total, step_s: 0.0, steps_timed: 0 }
    }

    /// Seconds the remaining steps should take at the mean pace of the steps timed so far.
    fn seconds_left(&self, step: usize) -> f64 {
        self.step_s / self.steps_timed.max(1) as f64 * self.total.saturating_sub(step) as f64
    }

    /// Shows `s` (on the bar every step; as a line or record only when `log`).
    pub fn step(&mut self, s: &StepShown, log: bool) {
        self.step_s += s.step_s;
        self.steps_timed += 1;
        let left = self.seconds_left(s.step);
        let norm = s.grad_norm.map_or(String::new(), |g| format!("  grad norm {g:.3}"));
        let lr = if s.lr == 0.0 { "0".to_string() } else { format!("{:.2e}", s.lr) };
        let msg = format!("loss {:.4}  lr {lr}{norm}  {:.0} tok/s", s.loss, s.tokens_per_s);
        let eta = if s.step < self.total { format!("  about {} left", console::duration(left)) } else { String::new() };
        match &self.bar {
            Some(b) => {
                b.set_position(s.step as u64);
                b.set_message(format!("{msg}{eta}"));
            }
            None if log => {
                let fields = serde_json::json!({
                    "step": s.step, "total_steps": self.total, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
                    "tokens_per_s": s.tokens_per_s, "step_s": s.step_s, "eta_s": (left * 10.0).round() / 10.0,
                });
                console::record("step", fields, Some(&format!("step {}/{}  {msg}{eta}", s.step, self.total)));
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            console::set_bar(None);
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_counts_step_time_only() {
        let mut p = Progress { bar: None, total: 10, step_s: 0.0, steps_timed: 0 };
        // Whatever happened between the steps (evaluations), only their own 2 s count.
        for step in 1..=4 {
            p.step(&StepShown { step, loss: 1.0, lr: 0.0, grad_norm: None, tokens_per_s: 1.0, step_s: 2.0 }, false);
        }
        assert_eq!(p.seconds_left(4), 12.0, "6 steps left at 2 s each");
    }
}
