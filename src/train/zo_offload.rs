//! ZO2-style zeroth-order steps over offloaded weights (`zo_offload = true`, METHODS.md §4.2):
//! MeZO-SGD on full weights whose f32 master copies live in a file
//! ([`crate::methods::offloaded`]), so that only a window of blocks is ever in memory.
//!
//! One step is one sweep over the blocks, in order. While block `i` computes, a reader thread
//! brings block `i+1`'s matrices in from the file (the window). At its visit, block `i`:
//! 1. receives the previous step's update, deferred to now (ZO2's deferred update: the
//!    projected gradient is only known after the last block, and a second sweep would read
//!    every weight twice);
//! 2. runs both perturbed forwards, the `+` and the `−` streams of every micro-batch, with
//!    `θ + εz` and then `θ − εz` computed beside `θ` (so `θ` itself is never perturbed and
//!    needs no restore);
//! 3. is written back when the update changed it.
//!
//! The losses at the two points give the projected gradient, whose update waits for the next
//! step's sweep, or for [`ZoOffload::flush`] before an evaluation or a checkpoint. Every value
//! is computed as the in-memory MeZO step ([`crate::optim::zo::Mezo`]) computes it, with the
//! same directions, so the two give bit-identical weights (a test checks it).

use super::grads::{MicroBatch, StepPlan};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::methods::offloaded::OffloadedWeights;
use crate::models::{ForwardCtx, Llama};
use crate::objectives::{HeadInputs, Objective};
use crate::optim::zo::{descend, direction, shifted, Mezo};
use candle_core::Tensor;
use std::sync::Arc;

/// A step's update, not yet applied: its direction's seed, `lr·g` and `lr·wd`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seed: u64,
    step: f32,
    decay: f32,
}

pub struct ZoOffload {
    weights: Arc<OffloadedWeights>,
    mezo: Mezo,
    /// Blocks in memory at once: the one computing and those read ahead (at least 1).
    window: usize,
    pending: Option<Pending>,
    /// Set when a sweep failed part-way: the file then mixes blocks with and without the
    /// pending update, and only a restart from a checkpoint is sound.
    broken: bool,
}

/// A step's two loss estimates.
#[derive(Debug, Clone, Copy)]
pub struct ZoStep {
    /// The mean of the losses at `θ ± εz`.
    pub loss: f64,
    pub projected_grad: f64,
}

impl ZoOffload {
    pub fn new(weights: Arc<OffloadedWeights>, mezo: Mezo, window: usize) -> Result<Self> {
        if mezo.n_spsa > 1 {
            return Err(Error::config("zo_n_spsa", "is above 1, and zo_offload runs one direction per step (as ZO2 does)"));
        }
        Ok(ZoOffload { weights, mezo, window: window.max(1), pending: None, broken: false })
    }

    /// One zeroth-order step over `batches` (optimizer step `plan.step`) at learning rate `lr`.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: &Llama,
        batches: &[Batch],
        units: usize,
        plan: &StepPlan,
        objective: &dyn Objective,
        lr: f64,
        weight_decay: f64,
    ) -> Result<ZoStep> {
        self.check()?;
        let seed = self.mezo.direction_seed(plan.step, 0);
        let eps = self.mezo.eps as f32;
        let mut started = Vec::new();
        if units > 0 {
            for (mi, b) in batches.iter().enumerate().filter(|(_, b)| objective.units(b) > 0) {
                started.push((b, MicroBatch::prepare(model, b, mi, plan, objective)?));
            }
        }
        let ctxs: Vec<ForwardCtx> = started.iter().map(|(b, _)| ForwardCtx::eval().over(b)).collect();
        let mut plus: Vec<Tensor> = started.iter().map(|(_, m)| m.x0.clone()).collect();
        let mut minus = plus.clone();
        let pending = self.pending.take();
        let weights = self.weights.clone();
        self.sweep(model.layers.len(), |li, theta| {
            let idx = weights.block(li);
            if let Some(p) = pending {
                for (t, &i) in theta.iter_mut().zip(idx) {
                    let z = direction(p.seed, i, t.len());
                    descend(t, &z, p.step, p.decay);
                }
            }
            let z: Vec<Vec<f32>> = idx.iter().map(|&i| direction(seed, i, weights.len(i))).collect();
            let mut passes = || -> Result<()> {
                for (scale, streams) in [(eps, &mut plus), (-eps, &mut minus)] {
                    for ((t, z), &i) in theta.iter().zip(&z).zip(idx) {
                        let mut w = vec![0f32; t.len()];
                        shifted(t, z, scale, &mut w);
                        weights.set(i, w)?;
                    }
                    for (x, ctx) in streams.iter_mut().zip(&ctxs) {
                        *x = model.block_forward(li, x, 0, None, ctx)?;
                    }
                }
                Ok(())
            };
            let done = passes();
            // Whatever happened, later forwards read the stored weights, never perturbed ones.
            idx.iter().for_each(|&i| weights.clear(i));
            done?;
            Ok(pending.is_some())
        })?;
        let loss_at = |streams: &[Tensor]| -> Result<f64> {
            if units == 0 {
                return Ok(0.0);
            }
            let mut sum = 0.0;
            for (((b, m), x), ctx) in started.iter().zip(streams).zip(&ctxs) {
                let inputs = HeadInputs { batch: b, targets: Arc::new(b.targets.clone()), reference: m.reference.as_ref(), ctx };
                sum += objective.loss_sum(model, x, &inputs)?.loss.to_scalar::<f32>()? as f64;
            }
            Ok(sum / units as f64)
        };
        let (loss_plus, loss_minus) = (loss_at(&plus)?, loss_at(&minus)?);
        let projected_grad = (loss_plus - loss_minus) / (2.0 * self.mezo.eps);
        if lr != 0.0 {
            self.pending = Some(Pending { seed, step: (lr * projected_grad) as f32, decay: (lr * weight_decay) as f32 });
        }
        Ok(ZoStep { loss: (loss_plus + loss_minus) / 2.0, projected_grad })
    }

    /// Applies the pending update to every block (one sweep), so that the file holds the
    /// current weights: before an evaluation, a checkpoint, the final adapter.
    pub fn flush(&mut self, model: &Llama) -> Result<()> {
        self.check()?;
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let weights = self.weights.clone();
        self.sweep(model.layers.len(), |li, theta| {
            for (t, &i) in theta.iter_mut().zip(weights.block(li)) {
                let z = direction(p.seed, i, t.len());
                descend(t, &z, p.step, p.decay);
            }
            Ok(true)
        })
    }

    fn check(&self) -> Result<()> {
        if self.broken {
            return Err(Error::Training("an offloaded zeroth-order step failed part-way; restart from the last checkpoint (--resume)".into()));
        }
        Ok(())
    }

    /// Visits blocks `0..layers` in order with their matrices read from the file, the next
    /// ones read ahead on another thread; writes a block back when `visit` says it changed.
    fn sweep(&mut self, layers: usize, mut visit: impl FnMut(usize, &mut [Vec<f32>]) -> Result<bool>) -> Result<()> {
        let w = &*self.weights;
        let read_block = |li: usize| -> Result<Vec<Vec<f32>>> { w.block(li).iter().map(|&i| w.read(i)).collect() };
        let mut visit_one = |li: usize, mut theta: Vec<Vec<f32>>| -> Result<()> {
            if visit(li, &mut theta)? {
                for (t, &i) in theta.iter().zip(w.block(li)) {
                    w.write(i, t)?;
                }
            }
            Ok(())
        };
        let result = if self.window <= 1 {
            (0..layers).try_for_each(|li| visit_one(li, read_block(li)?))
        } else {
            std::thread::scope(|s| {
                // The reader holds one block ready while it waits to hand it over, so a channel
                // of `window − 2` places keeps `window` blocks in memory with the computing one.
                let (tx, rx) = std::sync::mpsc::sync_channel(self.window - 2);
                s.spawn(move || {
                    for li in 0..layers {
                        let block = read_block(li);
                        let failed = block.is_err();
                        if tx.send(block).is_err() || failed {
                            break;
                        }
                    }
                });
                (0..layers).try_for_each(|li| visit_one(li, rx.recv().map_err(|_| Error::Training("the weight reader stopped".into()))??))
            })
        };
        if result.is_err() {
            self.broken = true;
        }
        result
    }
}
