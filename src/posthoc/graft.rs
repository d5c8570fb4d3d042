//! Skill localization by grafting (METHODS.md §6.2): the few entries of a fine-tune's task
//! vector `τ = θ_ft − θ0` that carry the skill, found by optimising a relaxed mask on the
//! task's data. The grafted model is `θ0 + γ ⊙ τ` for a binary mask `γ`: no value is
//! re-trained, entries outside the mask stay `θ0` exactly.
//!
//! 1. Base patch `γ0`: the `s·N` entries of largest `|τ|` over every changed linear module
//!    (`N` their entries; embeddings, norms, biases and the head are not grafted).
//! 2. Scores `S ~ U[0, 1)`, bias `b` (10): relaxed mask `m = γ0 + (1 − 2γ0) ⊙ σ(S − b)`, which
//!    starts at `γ0` within σ(−9) ≈ 1.2e-4.
//! 3. Loss of `θ0 + m ⊙ τ` on the data; `∇_S = (1 − 2γ0) ⊙ (∇_θ L ⊙ τ) ⊙ σ'(S − b)`; plain
//!    gradient descent `S ← S − η ∇_S` with the paper's very large η (1e7).
//! 4. The binary mask is `m > 1/2`; after every epoch (and for `γ0` itself) its loss is
//!    measured, and the best mask is kept. The paper keeps the best train+validation accuracy;
//!    with no task metric here the criterion is the loss (on `--val` when given).

use crate::data::batch::make_batch;
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::formats::sparse_diff::{SparseDiff, SparseTensor};
use crate::kernels::FrozenWeight;
use crate::models::{ForwardCtx, Llama, SiteHook};
use crate::objectives::{Objective, Sft};
use crate::rng::SplitMix64;
use crate::train::grads::{step_gradients, StepPlan};
use candle_core::{Tensor, Var};
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
pub struct GraftSettings {
    /// The base patch's share `s` of the grafted modules' entries.
    pub sparsity: f64,
    /// η of the score update.
    pub lr: f64,
    pub epochs: usize,
    /// `b`: how far the scores start from switching an entry.
    pub bias: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for GraftSettings {
    fn default() -> Self {
        // 1e-4: the paper's headline, 0.01 % of the parameters; η, epochs and b are its code's.
        Self { sparsity: 1e-4, lr: 1e7, epochs: 10, bias: 10.0, batch_size: 4, seed: 0 }
    }
}

/// One changed linear module.
pub struct GraftSite {
    pub name: String,
    pub shape: (usize, usize),
    pub theta0: Vec<f32>,
    pub tau: Vec<f32>,
    /// The base patch.
    pub gamma0: Vec<bool>,
    /// The relaxed mask's scores.
    pub scores: Vec<f32>,
    /// The weight the model computes with, `θ0 + m ⊙ τ`.
    w: Var,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl GraftSite {
    /// `m`, the relaxed mask.
    pub fn relaxed(&self, bias: f32) -> Vec<f32> {
        self.gamma0.iter().zip(&self.scores).map(|(&g, &s)| if g { 1.0 - sigmoid(s - bias) } else { sigmoid(s - bias) }).collect()
    }

    /// The binary mask's flat indices: where `m > 1/2`.
    pub fn mask(&self, bias: f32) -> Vec<u32> {
        self.relaxed(bias).iter().enumerate().filter(|(_, &m)| m > 0.5).map(|(i, _)| i as u32).collect()
    }

    fn set_weight(&self, mask: &[f32]) -> Result<()> {
        let w: Vec<f32> = self.theta0.iter().zip(&self.tau).zip(mask).map(|((t0, t), m)| t0 + m * t).collect();
        self.w.set(&Tensor::from_vec(w, self.shape, &candle_core::Device::Cpu)?)?;
        Ok(())
    }
}

/// Computes the site with the graft's current weight.
struct GraftHook {
    w: Var,
}

impl SiteHook for GraftHook {
    fn forward(&self, x: &Tensor, _w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        crate::methods::full::dense_forward(&self.w, x, b0, ctx)
    }
}

/// The sites of a graft, attached to the base model.
pub struct Graft {
    pub sites: Vec<GraftSite>,
    pub settings: GraftSettings,
}

/// Per epoch: the mean relaxed loss over the epoch's batches, and the binary mask's loss.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub relaxed_loss: Option<f64>,
    pub mask_loss: f64,
    pub entries: usize,
}

impl Graft {
    /// Hooks every linear module where `finetuned` differs from `model` and picks the base patch.
    /// The two must have the same modules (checked by the caller).
    pub fn attach(model: &mut Llama, finetuned: &Llama, settings: GraftSettings) -> Result<Self> {
        if !(settings.sparsity > 0.0 && settings.sparsity <= 1.0) {
            return Err(Error::flag(
                "--sparsity",
                format!("is {}; expected the base patch's share of the entries, in (0, 1], such as 1e-4", settings.sparsity),
            ));
        }
        let mut rng = SplitMix64::derive(settings.seed, &[0x9af7]);
        let mut sites = Vec::new();
        let ft: std::collections::HashMap<&str, &crate::models::Linear> = finetuned.linears().map(|l| (l.name.as_str(), l)).collect();
        for lin in model.linears_mut() {
            let Some(f) = ft.get(lin.name.as_str()) else { continue };
            let theta0 = lin.weight.to_f32_vec();
            let tau: Vec<f32> = f.weight.to_f32_vec().iter().zip(&theta0).map(|(a, b)| a - b).collect();
            if tau.iter().all(|&t| t == 0.0) {
                continue;
            }
            if lin.hook.is_some() {
                return Err(Error::Model(format!("module `{}` already has a method attached", lin.name)));
            }
            let shape = lin.weight.dims();
            let w = Var::from_tensor(&lin.weight.to_tensor()?)?;
            lin.hook = Some(Arc::new(GraftHook { w: w.clone() }));
            let scores = (0..tau.len()).map(|_| rng.next_f32()).collect();
            sites.push(GraftSite { name: lin.name.clone(), shape, gamma0: vec![false; tau.len()], theta0, tau, scores, w });
        }
        if sites.is_empty() {
            return Err(Error::Model("the fine-tune changes no linear module of the base: nothing to graft".into()));
        }
        let mut g = Graft { sites, settings };
        g.pick_base_patch();
        Ok(g)
    }

    /// Entries of all grafted modules.
    pub fn entries(&self) -> usize {
        self.sites.iter().map(|s| s.tau.len()).sum()
    }

    /// `γ0`: the `max(1, round(s·N))` entries of largest `|τ|`, ties broken by position.
    fn pick_base_patch(&mut self) {
        let k = ((self.settings.sparsity * self.entries() as f64).round() as usize).clamp(1, self.entries());
        let mut all: Vec<f32> = self.sites.iter().flat_map(|s| s.tau.iter().map(|t| t.abs())).collect();
        let (_, kth, _) = all.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let threshold = *kth;
        let above: usize = self.sites.iter().map(|s| s.tau.iter().filter(|t| t.abs() > threshold).count()).sum();
        let mut ties = k - above;
        for s in &mut self.sites {
            for (g, t) in s.gamma0.iter_mut().zip(&s.tau) {
                let a = t.abs();
                *g = a > threshold
                    || (a == threshold && ties > 0 && {
                        ties -= 1;
                        true
                    });
            }
        }
    }

    fn params(&self) -> Vec<Var> {
        self.sites.iter().map(|s| s.w.clone()).collect()
    }

    fn set_relaxed(&self) -> Result<()> {
        let b = self.settings.bias as f32;
        self.sites.iter().try_for_each(|s| s.set_weight(&s.relaxed(b)))
    }

    fn set_binary(&self, masks: &[Vec<u32>]) -> Result<()> {
        for (s, mask) in self.sites.iter().zip(masks) {
            let mut m = vec![0f32; s.tau.len()];
            mask.iter().for_each(|&i| m[i as usize] = 1.0);
            s.set_weight(&m)?;
        }
        Ok(())
    }

    /// The current binary masks, site by site.
    pub fn masks(&self) -> Vec<Vec<u32>> {
        self.sites.iter().map(|s| s.mask(self.settings.bias as f32)).collect()
    }

    /// The relaxed model's mean loss on `batch` and `∇_S` of it, site by site.
    pub fn score_gradients(&self, model: &Llama, examples: &[&EncodedExample], pad_id: u32) -> Result<(f64, Vec<Vec<f32>>)> {
        self.set_relaxed()?;
        let batch = make_batch(examples, pad_id);
        let units = Sft.units(&batch);
        let plan = StepPlan { seed: self.settings.seed, step: 0, total_steps: 1, checkpointing: false };
        let g = step_gradients(model, &self.params(), std::slice::from_ref(&batch), units, &plan, &Sft)?;
        let b = self.settings.bias as f32;
        let grads = self
            .sites
            .iter()
            .zip(g.grads)
            .map(|(s, gw)| {
                s.gamma0
                    .iter()
                    .zip(&s.scores)
                    .zip(s.tau.iter().zip(gw))
                    .map(|((&g0, &sc), (&t, gw))| {
                        let p = sigmoid(sc - b);
                        let sign = if g0 { -1.0 } else { 1.0 };
                        sign * gw * t * p * (1.0 - p)
                    })
                    .collect()
            })
            .collect();
        Ok((g.loss, grads))
    }

    /// The grafted model's mean loss on `examples` with binary `masks`.
    fn mask_loss(&self, model: &Llama, masks: &[Vec<u32>], examples: &[EncodedExample], pad_id: u32) -> Result<f64> {
        self.set_binary(masks)?;
        Ok(crate::train::evaluate(model, examples, self.settings.batch_size, pad_id)?.loss)
    }

    /// Optimises the scores on `train` for the set epochs and returns the best binary masks
    /// (lowest loss on `val`, or on `train` without it) with the epochs' record. Leaves the
    /// model computing with the best masks.
    pub fn optimise(
        &mut self,
        model: &Llama,
        train: &[EncodedExample],
        val: Option<&[EncodedExample]>,
        pad_id: u32,
        on_epoch: &mut dyn FnMut(&EpochReport),
    ) -> Result<(Vec<Vec<u32>>, Vec<EpochReport>)> {
        let judge = val.unwrap_or(train);
        let mut best = self.masks();
        let mut best_loss = self.mask_loss(model, &best, judge, pad_id)?;
        let mut history = vec![EpochReport { epoch: 0, relaxed_loss: None, mask_loss: best_loss, entries: best.iter().map(Vec::len).sum() }];
        on_epoch(&history[0]);
        let mut order: Vec<usize> = (0..train.len()).collect();
        for epoch in 1..=self.settings.epochs {
            SplitMix64::derive(self.settings.seed, &[0x9af8, epoch as u64]).shuffle(&mut order);
            let (mut sum, mut n) = (0.0, 0);
            for chunk in order.chunks(self.settings.batch_size.max(1)) {
                if let Some(signal) = crate::train::interrupt::requested() {
                    return Err(Error::Interrupted { signal, detail: "grafting interrupted".into() });
                }
                let examples: Vec<&EncodedExample> = chunk.iter().map(|&i| &train[i]).collect();
                let (loss, grads) = self.score_gradients(model, &examples, pad_id)?;
                if !loss.is_finite() {
                    return Err(Error::Training(format!("grafting: the relaxed model's loss is {loss} in epoch {epoch}")));
                }
                let lr = self.settings.lr as f32;
                for (s, g) in self.sites.iter_mut().zip(grads) {
                    s.scores.iter_mut().zip(g).for_each(|(sc, g)| *sc -= lr * g);
                }
                sum += loss;
                n += 1;
            }
            let masks = self.masks();
            let loss = self.mask_loss(model, &masks, judge, pad_id)?;
            let report = EpochReport { epoch, relaxed_loss: Some(sum / n.max(1) as f64), mask_loss: loss, entries: masks.iter().map(Vec::len).sum() };
            on_epoch(&report);
            history.push(report);
            if loss < best_loss {
                (best, best_loss) = (masks, loss);
            }
        }
        self.set_binary(&best)?;
        Ok((best, history))
    }

    /// Makes the grafted weights `θ0 + γ ⊙ τ` the model's own and removes the hooks.
    pub fn merge_into(&self, model: &mut Llama, masks: &[Vec<u32>]) -> Result<()> {
        for (s, mask) in self.sites.iter().zip(masks) {
            let lin = model.linears_mut().find(|l| l.name == s.name).ok_or_else(|| Error::Model(format!("module `{}` is gone", s.name)))?;
            let mut w = s.theta0.clone();
            mask.iter().for_each(|&i| w[i as usize] += s.tau[i as usize]);
            lin.weight = FrozenWeight::from_tensor(&Tensor::from_vec(w, s.shape, &candle_core::Device::Cpu)?)?;
            lin.hook = None;
        }
        Ok(())
    }

    /// The graft as a sparse diff: `τ` at the mask's entries.
    pub fn diff(&self, masks: &[Vec<u32>]) -> SparseDiff {
        let mut d = SparseDiff::default();
        for (s, mask) in self.sites.iter().zip(masks) {
            if mask.is_empty() {
                continue;
            }
            let t = SparseTensor {
                shape: vec![s.shape.0, s.shape.1],
                indices: mask.iter().map(|&i| i as u64).collect(),
                values: mask.iter().map(|&i| s.tau[i as usize]).collect(),
            };
            d.tensors.insert(crate::methods::sparse::key(&s.name), t);
        }
        d
    }
}
