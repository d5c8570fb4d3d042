//! What the program tells the person (or script) running it, on stderr, and how much.
//!
//! Three modes, chosen once by the global flags: normal (notes, progress lines, a progress bar on
//! a terminal), `--quiet` (warnings and errors only) and `--json-logs` (every note, warning,
//! progress line, training step and evaluation as one JSON object per line, for scripts).
//! Results stay on stdout in every mode, so `2>log.jsonl >result.json` separates the two.
//!
//! A progress bar, while one is drawn, registers itself here so that lines printed meanwhile go
//! above it instead of through it.

use indicatif::ProgressBar;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Quiet,
    Json,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Quiet,
        2 => Mode::Json,
        _ => Mode::Normal,
    }
}

/// Something worth knowing that needs no action: silent under `--quiet`.
pub fn note(message: &str) {
    match mode() {
        Mode::Normal => line(message),
        Mode::Quiet => {}
        Mode::Json => event("note", json!({ "message": message.strip_prefix("note: ").unwrap_or(message) })),
    }
}

/// A setting or input that probably does not do what its author meant: shown in every mode.
/// `message` is the warning without its `warning: ` prefix.
pub fn warning(message: &str) {
    match mode() {
        Mode::Json => event("warning", json!({ "message": message })),
        _ => line(&format!("warning: {message}")),
    }
}

/// The error a command ends with: shown in every mode.
pub fn error(message: &str) {
    match mode() {
        Mode::Json => event("error", json!({ "message": message })),
        _ => line(&format!("error: {message}")),
    }
}

/// A structured record (a training step, an evaluation): one JSON line under `--json-logs`,
/// `human` (when given) in normal mode, nothing under `--quiet`.
pub fn record(kind: &str, fields: Value, human: Option<&str>) {
    match (mode(), human) {
        (Mode::Json, _) => event(kind, fields),
        (Mode::Normal, Some(h)) => line(h),
        _ => {}
    }
}

/// `{"event": kind, ...fields}` on one stderr line.
fn event(kind: &str, fields: Value) {
    let mut obj = serde_json::Map::new();
    obj.insert("event".into(), Value::from(kind));
    match fields {
        Value::Object(m) => obj.extend(m),
        other => {
            obj.insert("value".into(), other);
        }
    }
    line(&Value::Object(obj).to_string());
}

fn line(text: &str) {
    match BAR.lock().ok().as_deref().and_then(Option::as_ref) {
        Some(bar) => bar.println(text),
        None => eprintln!("{text}"),
    }
}

/// Registers the bar being drawn (or, with `None`, that it is gone).
pub(crate) fn set_bar(bar: Option<ProgressBar>) {
    if let Ok(mut b) = BAR.lock() {
        *b = bar;
    }
}

/// `note!("…{x}…")`: [`note`] with `format!` arguments.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => { $crate::console::note(&format!($($arg)*)) };
}

/// `warning!("…{x}…")`: [`warning`] with `format!` arguments.
#[macro_export]
macro_rules! warning {
    ($($arg:tt)*) => { $crate::console::warning(&format!($($arg)*)) };
}

/// Progress of a long piece of work, at most one line every few seconds (none for work that
/// ends sooner): items done of the total, an optional rate, and the time left.
pub struct Ticker {
    label: String,
    unit: &'static str,
    total: usize,
    started: Instant,
    last: Instant,
}

impl Ticker {
    const EVERY_S: f64 = 5.0;

    /// `unit` names what is counted, in the plural ("examples", "tensors").
    pub fn new(label: impl Into<String>, total: usize, unit: &'static str) -> Self {
        let now = Instant::now();
        Self { label: label.into(), unit, total, started: now, last: now }
    }

    /// After `done` items, with `rate` = (an amount so far, its unit) shown per second, such as
    /// tokens read. Shows the line when one is due.
    pub fn tick(&mut self, done: usize, rate: Option<(f64, &str)>) {
        if let Some((text, fields)) = self.due(done, rate) {
            record("progress", fields, Some(&text));
        }
    }

    /// The line [`Ticker::tick`] would show now, and its JSON fields; `None` when none is due.
    pub fn due(&mut self, done: usize, rate: Option<(f64, &str)>) -> Option<(String, Value)> {
        if self.last.elapsed().as_secs_f64() < Self::EVERY_S || done >= self.total {
            return None;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        let left = secs / done.max(1) as f64 * (self.total - done) as f64;
        let per_s = rate.map(|(amount, unit)| (amount / secs.max(1e-9), unit));
        let shown_rate = per_s.map_or(String::new(), |(r, unit)| format!(", {r:.0} {unit}/s"));
        let text = format!("{}: {done}/{} {}{shown_rate}, about {} left", self.label, self.total, self.unit, duration(left));
        let mut fields = json!({ "task": self.label, "done": done, "total": self.total, "unit": self.unit, "eta_s": round1(left) });
        if let Some((r, unit)) = per_s {
            fields[format!("{unit}_per_s")] = Value::from(round1(r));
        }
        Some((text, fields))
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Seconds as a person reads them: `45 s`, `3 min 05 s`, `1 h 02 min`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_would() {
        assert_eq!(duration(0.4), "0 s");
        assert_eq!(duration(59.4), "59 s");
        assert_eq!(duration(185.0), "3 min 05 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
    }

    #[test]
    fn a_ticker_is_silent_until_due_and_at_the_end() {
        let mut t = Ticker::new("eval", 10, "examples");
        assert!(t.due(3, None).is_none(), "nothing before the first interval");
        t.started -= std::time::Duration::from_secs(10);
        t.last -= std::time::Duration::from_secs(10);
        assert!(t.due(10, None).is_none(), "nothing once all is done");
        let (text, fields) = t.due(5, Some((500.0, "tokens"))).expect("due after the interval");
        // 5 of 10 in 10 s: 10 s left, 50 tokens/s.
        assert_eq!(text, "eval: 5/10 examples, 50 tokens/s, about 10 s left");
        assert_eq!(fields["eta_s"], 10.0);
        assert_eq!(fields["tokens_per_s"], 50.0);
        assert!(t.due(6, None).is_none(), "the next line waits another interval");
    }
}
