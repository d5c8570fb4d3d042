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
    /// One sequence's inputs at this site: `rows × in_features`, row-major.
    fn add(&mut self, x: &[f32], rows: usize, in_features: usize) -> Result<()>;
}

struct Recorder<S> {
    sink: Mutex<S>,
    /// Real lengths of the current micro-batch's rows.
    lengths: Arc<Mutex<Vec<usize>>>,
    error: Mutex<Option<Error>>,
}

impl<S: InputSink> SiteHook for Recorder<S> {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, _ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let lengths = self.lengths.lock().expect("lengths lock").clone();
        let mut sink = self.sink.lock().expect("sink lock");
        for (i, &len) in lengths.iter().enumerate().take(b) {
            let len = len.min(t);
            if let Err(e) = sink.add(&v[i * t * d..(i * t + len) * d], len, d) {
                self.error.lock().expect("error lock").get_or_insert(e);
            }
        }
        add_bias(crate::kernels::frozen_linear(x, w0)?, b0)
    }
}

/// Runs `batches` through the bare `model` with a sink from `make_sink(site, in_features)` on
/// each of `sites`; returns the sinks in `sites` order. `what` names the pass in progress lines.
pub fn collect_inputs<S: InputSink + Sync + 'static>(
    model: &mut Llama,
    sites: &[String],
    batches: &[Batch],
    what: &str,
    mut make_sink: impl FnMut(&str, usize) -> S,
) -> Result<Vec<S>> {
    let lengths = Arc::new(Mutex::new(Vec::new()));
    let mut recorders = Vec::new();
    for name in sites {
        let lin = model
            .linears_mut()
            .find(|l| &l.name == name)
            .ok_or_else(|| Error::Model(format!("module `{name}` is not a linear site of this model")))?;
        if lin.hook.is_some() {
            return Err(Error::Model(format!("module `{name}` already has a method attached")));
        }
        let rec = Arc::new(Recorder { sink: Mutex::new(make_sink(name, lin.info().in_features)), lengths: lengths.clone(), error: Mutex::new(None) });
        lin.hook = Some(rec.clone());
        recorders.push(rec);
    }
    let t0 = Instant::now();
    let run = (|| -> Result<()> {
        for (i, b) in batches.iter().enumerate() {
            *lengths.lock().expect("lengths lock") = b.lengths.clone();
            model.hidden(&b.input_ids, b.batch_size, b.seq_len, None, &ForwardCtx::eval())?;
            if let Some(e) = recorders.iter().find_map(|r| r.error.lock().expect("error lock").take()) {
                return Err(e);
            }
            eprint!("\r{what}: batch {}/{} ({:.0} s)", i + 1, batches.len(), t0.elapsed().as_secs_f64());
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
