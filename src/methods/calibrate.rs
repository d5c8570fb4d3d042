//! The `prepare` pass of data-driven inits (CorDA's covariances, EVA's activation SVD): the
//! base model runs forward over the run's first micro-batches with a recording hook on each
//! chosen site, which hands every sequence's inputs to that site's [`InputSink`] (padding left
//! out) and computes the base output unchanged. The hooks are removed afterwards.

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::kernels::FrozenWeight;
use crate::models::{add_bias, ForwardCtx, Llama, SiteHook};
use candle_core::Tensor;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a method accumulates from one site's inputs.
pub trait InputSink: Send {
    /// One sequence's inputs at this site: `rows × in_features`, row-major; `targets[j]` is the
    /// next-token target of position `j` (`-100`: none), as in [`Batch::targets`].
    fn add(&mut self, x: &[f32], rows: usize, in_features: usize, targets: &[i32]) -> Result<()>;

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

/// The current micro-batch as the recording hooks see it.
#[derive(Default, Clone)]
struct Current {
    lengths: Vec<usize>,
    targets: Vec<i32>,
}

struct Recorder<S> {
    sink: Mutex<S>,
    current: Arc<Mutex<Current>>,
    error: Mutex<Option<Error>>,
}

impl<S: InputSink> SiteHook for Recorder<S> {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, _ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let mut sink = self.sink.lock().expect("sink lock");
        if !sink.wants_input() {
            return add_bias(crate::kernels::frozen_linear(x, w0)?, b0);
        }
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let cur = self.current.lock().expect("batch lock").clone();
        for (i, &len) in cur.lengths.iter().enumerate().take(b) {
            let len = len.min(t);
            if let Err(e) = sink.add(&v[i * t * d..(i * t + len) * d], len, d, &cur.targets[i * t..i * t + len]) {
                self.error.lock().expect("error lock").get_or_insert(e);
            }
        }
        add_bias(crate::kernels::frozen_linear(x, w0)?, b0)
    }
}

/// Runs `batches` through the bare `model` with a sink from `make_sink(site, in_features)` on
/// each of `sites`, cycling through them (1, 2, …, 1, 2, …) for at most `max_batches` forwards,
/// until `after_batch(sinks, forwards so far)` says to stop; returns the sinks in `sites` order.
/// `what` names the pass in progress lines.
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
        let rec = Arc::new(Recorder { sink: Mutex::new(make_sink(name, lin.info().in_features)), current: current.clone(), error: Mutex::new(None) });
        lin.hook = Some(rec.clone());
        recorders.push(rec);
    }
    let t0 = Instant::now();
    let run = (|| -> Result<()> {
        for i in 0..max_batches {
            let b = &batches[i % batches.len()];
            *current.lock().expect("batch lock") = Current { lengths: b.lengths.clone(), targets: b.targets.clone() };
            model.hidden(&b.input_ids, b.batch_size, b.seq_len, None, &ForwardCtx::eval())?;
            if let Some(e) = recorders.iter().find_map(|r| r.error.lock().expect("error lock").take()) {
                return Err(e);
            }
            eprint!("\r{what}: batch {}/{} ({:.0} s)\x1b[K", i + 1, max_batches, t0.elapsed().as_secs_f64());
            let mut guards: Vec<_> = recorders.iter().map(|r| r.sink.lock().expect("sink lock")).collect();
            let mut sinks: Vec<&mut S> = guards.iter_mut().map(|g| &mut **g).collect();
            if after_batch(&mut sinks, i + 1)? {
                break;
            }
        }
        eprintln!();
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
