//! Fuzzing of every parser that reads user files, on stable Rust.
//!
//! Each [`Target`] is one parser (or a loader built on it) with seed inputs and a mutator that
//! knows the format: GGUF headers and metadata ([`gguf_mut`]), JSON, JSON Lines and TOML trees
//! ([`json_mut`]), Jinja templates ([`template_mut`]), all on top of byte-level havoc
//! ([`mutate`]). The input of case `i` depends only on the run seed, the target name and `i`
//! (a [`SplitMix64`] stream derived from the three), so any failure is reproduced by its case
//! index alone (`examples/fuzz.rs --only NAME --case I`).
//!
//! The property checked on every case: the parser returns `Ok` or an [`Error`]; it never
//! panics (caught with `catch_unwind`), never runs longer than [`Options::slow_case`] (a case
//! still running after [`Options::hang_limit`] aborts the process with its index, since a hang
//! cannot be interrupted), and — when [`alloc::TrackingAlloc`] is the global allocator — never
//! makes a single allocation larger than [`alloc_bound`] of the input's size. An error must
//! also carry its context: a bare tensor-library error ([`Error::Candle`], which names no file)
//! counts as a failure too.

pub mod alloc;
mod gguf_mut;
mod json_mut;
mod mutate;
mod targets;
mod template_mut;

pub use targets::{all_targets, Mutator, Runner, Target};

use crate::error::Error;
use crate::rng::SplitMix64;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub cases: u64,
    /// A case that takes longer than this is a failure.
    pub slow_case: Duration,
    /// A case still running after this long is a hang: the process prints the case and aborts.
    pub hang_limit: Duration,
    /// Scratch space; each target uses its own subfolder.
    pub workdir: PathBuf,
}

impl Options {
    pub fn new(seed: u64, cases: u64, workdir: PathBuf) -> Self {
        Options {
            seed,
            cases,
            // A template that burns its whole fuel takes about a second per render on a busy
            // 2-core machine; ten leaves room for a loaded CI box, and anything slower than
            // that is a bug.
            slow_case: Duration::from_secs(10),
            hang_limit: Duration::from_secs(120),
            workdir,
        }
    }
}

/// A fresh scratch folder for a run, in memory (`/dev/shm`) when the system has one: every case
/// writes its input to a file, and on a disk each rewrite of a file costs a flush.
pub fn scratch_dir(tag: &str) -> std::io::Result<PathBuf> {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let dir = base.join(format!("ferrotune-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// What went wrong in one case.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureKind {
    Panic(String),
    Slow(Duration),
    /// The largest single allocation exceeded the bound for an input of `input` bytes.
    Allocation { bytes: usize, input: usize },
    /// An error without the context the user needs (a bare tensor-library error).
    Unclear(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub case: u64,
    pub kind: FailureKind,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            FailureKind::Panic(m) => write!(f, "case {}: panic: {m}", self.case),
            FailureKind::Slow(d) => write!(f, "case {}: took {:.1}s", self.case, d.as_secs_f64()),
            FailureKind::Allocation { bytes, input } => {
                write!(f, "case {}: allocated {bytes} bytes at once for a {input}-byte input", self.case)
            }
            FailureKind::Unclear(m) => write!(f, "case {}: unclear error: {m}", self.case),
        }
    }
}

/// Counts of one target's run.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub cases: u64,
    pub ok: u64,
    pub errors: u64,
    pub failures: Vec<Failure>,
    /// The first few distinct error messages, to see what users would read.
    pub sample_errors: Vec<String>,
    pub elapsed: Duration,
}

impl Report {
    pub fn panics(&self) -> usize {
        self.failures.iter().filter(|f| matches!(f.kind, FailureKind::Panic(_))).count()
    }
}

/// The largest single allocation a case may make: a generous constant plus a multiple of the
/// input size (a parser may hold its input a few times over, or expand it, e.g. dequantizing
/// 4-bit blocks to f32 is ×7). Anything beyond was sized by a number read from the input.
pub fn alloc_bound(input_len: usize) -> usize {
    (64 << 20) + 64 * input_len
}

thread_local! {
    /// Set while a case runs on this thread, so the panic hook captures instead of printing.
    static CAPTURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records the message and location of a panic inside a case
/// instead of printing it, and defers to the previous hook everywhere else.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURE.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let msg = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(non-string payload)".into());
                        let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
                        *slot = format!("{msg}{at}");
                        true
                    }
                    None => false,
                }
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

/// Runs `opts.cases` cases of `target`.
pub fn run_target(target: &Target, opts: &Options) -> Report {
    install_panic_hook();
    let dir = opts.workdir.join(target.name);
    let _ = std::fs::create_dir_all(&dir);
    let mut report = Report {
        target: target.name,
        cases: 0,
        ok: 0,
        errors: 0,
        failures: Vec::new(),
        sample_errors: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    // The watchdog: the case index and its start time (ms since `started`), u64::MAX when idle.
    let current = AtomicU64::new(u64::MAX);
    let current_start = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| watchdog(target.name, opts, started, &current, &current_start, &done));
        for case in 0..opts.cases {
            let input = target.input(opts.seed, case);
            current_start.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            current.store(case, Ordering::Relaxed);
            alloc::begin_case(target.name, case);
            CAPTURE.with(|c| *c.borrow_mut() = Some(String::new()));
            let t0 = Instant::now();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input, &dir)));
            let took = t0.elapsed();
            let panic_msg = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
            let peak = alloc::peak();
            current.store(u64::MAX, Ordering::Relaxed);
            report.cases += 1;
            let mut fail = |kind| report.failures.push(Failure { case, kind });
            match outcome {
                Err(_) => fail(FailureKind::Panic(panic_msg)),
                Ok(Ok(())) => report.ok += 1,
                Ok(Err(e)) => {
                    report.errors += 1;
                    if let Error::Candle(_) = e {
                        fail(FailureKind::Unclear(e.to_string()));
                    }
                    let msg = e.to_string();
                    if report.sample_errors.len() < 12 && !report.sample_errors.contains(&msg) {
                        report.sample_errors.push(msg);
                    }
                }
            }
            if took > opts.slow_case {
                report.failures.push(Failure { case, kind: FailureKind::Slow(took) });
            }
            if alloc::installed() && peak > alloc_bound(input.len()) {
                report.failures.push(Failure {
                    case,
                    kind: FailureKind::Allocation { bytes: peak, input: input.len() },
                });
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    report.elapsed = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    report
}

fn watchdog(name: &str, opts: &Options, started: Instant, current: &AtomicU64, start_ms: &AtomicU64, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let case = current.load(Ordering::Relaxed);
        let since = Duration::from_millis(start_ms.load(Ordering::Relaxed));
        if case != u64::MAX && started.elapsed().saturating_sub(since) > opts.hang_limit {
            eprintln!(
                "fuzz: target `{name}` case {case} (seed {}) has run for more than {:?}: hang; aborting",
                opts.seed, opts.hang_limit
            );
            std::process::abort();
        }
    }
}

/// A 64-bit hash of a target name, so each target gets its own input streams.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

impl Target {
    /// The input of case `case` of a run with seed `seed`.
    pub fn input(&self, seed: u64, case: u64) -> Vec<u8> {
        let mut rng = SplitMix64::derive(seed, &[name_hash(self.name), case]);
        if self.seeds.is_empty() || mutate::one_in(&mut rng, 64) {
            let n = mutate::below(&mut rng, 256);
            return (0..n).map(|_| rng.next_u64() as u8).collect();
        }
        let seed_input = mutate::pick(&mut rng, &self.seeds);
        if mutate::one_in(&mut rng, 64) {
            return seed_input.clone(); // the seeds themselves must keep passing
        }
        let mut input = (self.mutate)(&mut rng, seed_input, &self.seeds);
        // Stacked mutations reach states one edit cannot.
        while mutate::one_in(&mut rng, 4) {
            input = (self.mutate)(&mut rng, &input, &self.seeds);
        }
        input
    }
}
