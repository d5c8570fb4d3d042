//! Progress display: an indicatif bar on a terminal, plain log lines otherwise (CI, pipes).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
}

impl Progress {
    pub fn new(total: usize, start: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                    .expect("the template is valid"),
            );
            b.set_position(start as u64);
            b
        });
        Self { bar, total }
    }

    /// Shows step `step` with that step's own loss, learning rate and gradient norm (none for a
    /// zeroth-order step).
    pub fn step(&self, step: usize, loss: f64, lr: f64, grad_norm: Option<f64>, tokens_per_s: f64, log: bool) {
        let norm = grad_norm.map_or(String::new(), |g| format!("  grad norm {g:.3}"));
        let lr = if lr == 0.0 { "0".to_string() } else { format!("{lr:.2e}") };
        let msg = format!("loss {loss:.4}  lr {lr}{norm}  {tokens_per_s:.0} tok/s");
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg);
            }
            None if log => eprintln!("step {step}/{}  {msg}", self.total),
            None => {}
        }
    }

    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
