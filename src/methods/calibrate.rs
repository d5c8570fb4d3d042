//! The `prepare` pass of data-driven inits (CorDA's covariances, EVA's activation SVD): the
//! base model runs forward over the run's first micro-batches with a recording hook on each
//! chosen site, which hands every sequence's inputs to that site's [`InputSink`] (padding left
//! out) and computes the base output unchanged. The hooks are removed afterwards.

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, ForwardCtx, Llama, SiteHook};
use candle_core::Tensor;
use std::sync::{Arc, Condvar, Mutex};

/// What a method accumulates from one site's inputs.
pub trait InputSink: Send {
    /// One sequence's inputs at this site: `rows × in_features`, row-major; `targets[j]` is the
    /// next-token target of position `j` (`-100`: none), as in [`Batch::targets`].
    fn add(&mut self, x: &[f32], rows: usize, in_features: usize, targets: &[i32]) -> Result<()>;

    /// A new batch begins, of sequences with these next-token targets (in [`Batch::targets`]'s
    /// form), before any of its inputs arrive.
    fn begin_batch(&mut self, _targets: &[Vec<i32>]) {}

    /// Whether it still wants inputs (a site whose PCA another site computes does not), so
    /// that its hook skips copying them.
    fn wants_input(&self) -> bool {
        true
    }
}

/// A hash of one input's values, to find sites that read the same input (a layer's q/k/v,
/// its gate/up), whose statistics are then computed once.
pub fn input_hash(x: &[f32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    x.iter().for_each(|v| v.to_bits().hash(&mut h));
    h.finish()
}

/// For each site, the first site whose first input hashed the same (itself when none did):
/// the site that computes its statistics.
pub fn leaders(first_hashes: &[Option<u64>]) -> Vec<usize> {
    (0..first_hashes.len())
        .map(|i| match first_hashes[i] {
            Some(h) => (0..i).find(|&j| first_hashes[j] == Some(h)).unwrap_or(i),
            None => i,
        })
        .collect()
}

/// The current micro-batch's sequences as the recording hooks see them: each one's next-token
/// targets (its length is theirs), indexed by [`ForwardCtx::sequence`].
#[derive(Default)]
struct Current {
    targets: Vec<Vec<i32>>,
    /// A forward failed (or panicked): hooks waiting for their turn give up.
    aborted: bool,
    /// The failure that aborted the batch (not the give-ups it caused).
    failure: Option<Error>,
}

struct Recorder<S> {
    sink: Mutex<S>,
    /// The sequence whose inputs go into the sink next. Sequences run concurrently, but f32
    /// sums depend on their order, so each site takes them in sequence order: the result does
    /// not depend on thread timing.
    turn: Mutex<usize>,
    turn_changed: Condvar,
    current: Arc<Mutex<Current>>,
    error: Mutex<Option<Error>>,
}

impl<S> Recorder<S> {
    fn wait_for_turn(&self, sequence: usize) -> candle_core::Result<std::sync::MutexGuard<'_, usize>> {
        let mut turn = self.turn.lock().expect("turn lock");
        while *turn != sequence {
            if self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).aborted {
                candle_core::bail!("another sequence's forward failed");
            }
            turn = self.turn_changed.wait_timeout(turn, std::time::Duration::from_millis(100)).expect("turn lock").0;
        }
        Ok(turn)
    }
}

impl<S: InputSink> SiteHook for Recorder<S> {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let y = add_bias(crate::kernels::frozen_linear(x, w0)?, b0)?;
        if !self.sink.lock().expect("sink lock").wants_input() {
            return Ok(y);
        }
        let (b, t, d) = x.dims3()?;
        if b != 1 {
            candle_core::bail!("a recording pass runs one sequence per forward, got {b}");
        }
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let targets = self.current.lock().expect("batch lock").targets[ctx.sequence].clone();
        let mut turn = self.wait_for_turn(ctx.sequence)?;
        if let Err(e) = self.sink.lock().expect("sink lock").add(&v, t, d, &targets) {
            self.error.lock().expect("error lock").get_or_insert(e);
        }
        *turn += 1;
        self.turn_changed.notify_all();
        Ok(y)
    }
}

/// Marks the batch aborted if its worker panics, so that the others stop waiting for a turn
/// that will not come (the scope joining them would otherwise wait for ever).
struct AbortOnPanic<'a>(&'a Mutex<Current>);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).aborted = true;
        }
    }
}

/// Runs `batches` through the bare `model` with a sink from `make_sink(site, in_features)` on
/// each of `sites`, cycling through them (1, 2, …, 1, 2, …) for at most `max_batches` forwards,
/// until `after_batch(sinks, forwards so far)` says to stop; returns the sinks in `sites` order.
/// `what` names the pass in progress lines.
///
/// A batch's sequences run one per forward at their own length (right padding changes nothing
/// at the real positions, attention being causal, so running it would only cost time), on as
/// many workers as the thread pool has threads, each on a single thread of its own: on a few
/// cores, whole sequences side by side beat splitting every product across the cores
/// (measured on the quickstart's SmolLM2 batches: 43 s → 29 s for the forwards).
pub fn cycle_inputs<S: InputSink + 'static>(
    model: &mut Llama,
    sites: &[String],
    batches: &[Batch],
    max_batches: usize,
    what: &str,
    mut make_sink: impl FnMut(&str, usize) -> S,
    mut after_batch: impl FnMut(&mut [&mut S], usize) -> Result<bool>,
) -> Result<Vec<S>> {
    if batches.is_empty() {
        return Err(Error::Model(format!("{what}: no batch to run")));
    }
    let current = Arc::new(Mutex::new(Current::default()));
    let mut recorders = Vec::new();
    for name in sites {
        let lin = model
            .linears_mut()
            .find(|l| &l.name == name)
            .ok_or_else(|| Error::Model(format!("module `{name}` is not a linear site of this model")))?;
        if lin.hook.is_some() {
            return Err(Error::Model(format!("module `{name}` already has a method attached")));
        }
        let rec = Arc::new(Recorder {
            sink: Mutex::new(make_sink(name, lin.info().in_features)),
            turn: Mutex::new(0),
            turn_changed: Condvar::new(),
            current: current.clone(),
            error: Mutex::new(None),
        });
        lin.hook = Some(rec.clone());
        recorders.push(rec);
    }
    let workers: Vec<rayon::ThreadPool> = (0..crate::kernels::threads())
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Model(format!("{what}: cannot start a worker thread: {e}")))?;
    let mut ticker = crate::console::Ticker::new(what, max_batches, "batches");
    let run = (|| -> Result<()> {
        for i in 0..max_batches {
            let b = &batches[i % batches.len()];
            let spans = b.example_spans();
            *current.lock().expect("batch lock") = Current { targets: spans.iter().map(|s| b.targets[s.clone()].to_vec()).collect(), ..Current::default() };
            {
                let cur = current.lock().expect("batch lock");
                for r in &recorders {
                    *r.turn.lock().expect("turn lock") = 0;
                    r.sink.lock().expect("sink lock").begin_batch(&cur.targets);
                }
            }
            let model: &Llama = model;
            let n_workers = workers.len();
            let workers = &workers;
            std::thread::scope(|scope| {
                for (w, pool) in workers.iter().enumerate() {
                    let (spans, current) = (&spans, &current);
                    scope.spawn(move || {
                        let _abort = AbortOnPanic(current);
                        pool.install(|| {
                            for (k, span) in spans.iter().enumerate().skip(w).step_by(n_workers) {
                                if let Err(e) = model.hidden(&b.input_ids[span.clone()], 1, span.len(), None, &ForwardCtx::recording(k)) {
                                    let mut cur = current.lock().expect("batch lock");
                                    if !cur.aborted {
                                        cur.aborted = true;
                                        cur.failure = Some(e.into());
                                    }
                                    return;
                                }
                            }
                        })
                    });
                }
            });
            if let Some(e) = current.lock().expect("batch lock").failure.take() {
                return Err(e);
            }
            if let Some(e) = recorders.iter().find_map(|r| r.error.lock().expect("error lock").take()) {
                return Err(e);
            }
            ticker.tick(i + 1, None);
            let mut guards: Vec<_> = recorders.iter().map(|r| r.sink.lock().expect("sink lock")).collect();
            let mut sinks: Vec<&mut S> = guards.iter_mut().map(|g| &mut **g).collect();
            if after_batch(&mut sinks, i + 1)? {
                break;
            }
        }
        Ok(())
    })();
    // The hooks come off whatever happened.
    for lin in model.linears_mut() {
        if sites.contains(&lin.name) {
            lin.hook = None;
        }
    }
    run?;
    Ok(recorders
        .into_iter()
        .map(|r| {
            let r = Arc::try_unwrap(r).unwrap_or_else(|_| unreachable!("the hooks holding the recorders were removed"));
            r.sink.into_inner().expect("sink lock")
        })
        .collect())
}
