//! DPO (`METHODS.md` §5.3) with the sigmoid loss, as TRL's `DPOTrainer` computes it:
//! per pair, `z = β·((log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)))` with
//! sequence log-probabilities summed over the response tokens, and the loss
//! `−(1 − ε)·log σ(z) − ε·log σ(−z)` (ε = `dpo_label_smoothing`, conservative DPO), averaged
//! over pairs. The reference log-probabilities are computed once before training, with the
//! method switched off (TRL's `precompute_ref_log_probs`), and kept with the run, so a step runs
//! the policy only: chosen and rejected sequences side by side in one batch.

use super::{HeadInputs, LossSum, Objective, ObjectiveSpec, ValidationScore};
use crate::data::batch::{make_batch, Batch};
use crate::data::EncodedExample;
use crate::error::{Error, Result};
use crate::models::{ForwardCtx, Llama};
use candle_core::{DType, Tensor};
use std::sync::Arc;

pub struct Dpo {
    pub beta: f64,
    pub label_smoothing: f64,
}

impl Dpo {
    pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        Ok(Box::new(Self::from_spec(spec)?))
    }

    pub fn from_spec(spec: &ObjectiveSpec) -> Result<Self> {
        let keys = spec.keys();
        let beta = keys.f64_or("dpo_beta", 0.1)?;
        if beta <= 0.0 {
            return Err(Error::config("dpo_beta", format!("is {beta}; expected a positive number such as 0.1")));
        }
        let label_smoothing = keys.f64_in("dpo_label_smoothing", 0.0, 0.0, 0.5)?;
        Ok(Self { beta, label_smoothing })
    }

    /// The loss of one pair with margin `z`, `−(1 − ε)·log σ(z) − ε·log σ(−z)`, and its
    /// derivative `−(1 − ε)·σ(−z) + ε·σ(z)`, in f64 and stable for any `z`.
    fn pair_loss(&self, z: f64) -> (f64, f64) {
        // log σ(t) = −softplus(−t), softplus(x) = max(x, 0) + ln(1 + e^{−|x|}).
        let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let eps = self.label_smoothing;
        ((1.0 - eps) * softplus(-z) + eps * softplus(z), -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z))
    }

    /// The summed loss of margins `z` (per pair) as a graph node with the exact value and
    /// derivative: `Σ (c·z) + (L − c·z)`, the coefficients `c = dL/dz` and the correction held
    /// constant. (Composing it from candle's `minimum`/`abs` would take a one-sided derivative
    /// at `z = 0`, which is exactly where every pair starts.)
    fn pair_losses(&self, z: &Tensor) -> Result<Tensor> {
        let zs: Vec<f32> = z.to_vec1()?;
        let (values, slopes): (Vec<f64>, Vec<f64>) = zs.iter().map(|&v| self.pair_loss(v as f64)).unzip();
        let c = Tensor::from_vec(slopes.iter().map(|&v| v as f32).collect::<Vec<_>>(), zs.len(), z.device())?;
        let linear = (z * &c)?.sum_all()?;
        let correction = values.iter().sum::<f64>() - linear.to_scalar::<f32>()? as f64;
        Ok(linear.affine(1.0, correction)?)
    }
}

/// Per row of `batch`, the sum of the log-probabilities of its targets, from the per-position
/// NLL `[b·t]` a head produced.
fn row_logps(nll: &Tensor, batch: &Batch) -> Result<Tensor> {
    Ok(nll.reshape((batch.batch_size, batch.seq_len))?.sum(1)?.neg()?)
}

/// What DPO reports on preference pairs: mean loss, the share of pairs whose implicit reward
/// prefers the chosen response, and the mean reward margin (§5.4's implicit-reward view).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpoScore {
    pub loss: f64,
    pub reward_accuracy: f64,
    pub reward_margin: f64,
    pub pairs: usize,
}

/// Per-pair rewards `β·(logp − ref)` of chosen and rejected, and the margin `z`.
fn rewards(beta: f64, policy: &[f32], reference: &[f32], pairs: usize) -> Vec<(f64, f64)> {
    (0..pairs)
        .map(|i| {
            let r = |row: usize| beta * (policy[row] as f64 - reference[row] as f64);
            (r(i), r(pairs + i))
        })
        .collect()
}

impl Objective for Dpo {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn units(&self, batch: &Batch) -> usize {
        batch.pairs
    }

    fn uses_reference(&self) -> bool {
        true
    }

    fn needs_reference_logps(&self) -> bool {
        true
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        let b = inputs.batch;
        if b.pairs == 0 || b.batch_size != 2 * b.pairs {
            return Err(Error::Training("objective = \"dpo\" trains on preference pairs ({\"prompt\", \"chosen\", \"rejected\"}); this batch holds plain examples".into()));
        }
        let reference = b.reference_logps.as_ref().ok_or_else(|| Error::Training("DPO: the reference log-probabilities were not computed before training".into()))?;
        let logps = row_logps(&model.head_nll(x, inputs.targets.clone(), inputs.ctx)?, b)?;
        let p = b.pairs;
        let reference_t = Tensor::from_vec(reference.clone(), b.batch_size, x.device())?;
        let delta = (&logps - reference_t)?;
        let z = ((delta.narrow(0, 0, p)? - delta.narrow(0, p, p)?)? * self.beta)?;
        let loss = self.pair_losses(&z)?.sum_all()?;
        let policy: Vec<f32> = logps.to_dtype(DType::F32)?.to_vec1()?;
        let r = rewards(self.beta, &policy, reference, p);
        let sum = |f: &dyn Fn(usize) -> f64| (0..p).map(f).sum::<f64>();
        let metrics = vec![
            ("rewards/chosen", sum(&|i| r[i].0)),
            ("rewards/rejected", sum(&|i| r[i].1)),
            ("rewards/accuracies", sum(&|i| (r[i].0 > r[i].1) as u8 as f64)),
            ("rewards/margins", sum(&|i| r[i].0 - r[i].1)),
            ("logps/chosen", sum(&|i| policy[i] as f64)),
            ("logps/rejected", sum(&|i| policy[p + i] as f64)),
        ];
        Ok(LossSum { loss, metrics })
    }

    fn validation_score(&self, model: &Llama, val: &[EncodedExample], batch_size: usize, pad_id: u32) -> Option<Result<ValidationScore>> {
        Some(score(model, val, batch_size, pad_id, self).map(|s| ValidationScore {
            loss: s.loss,
            summary: format!("eval: DPO loss {:.4}, reward accuracy {:.3}, reward margin {:.4} on {} pairs", s.loss, s.reward_accuracy, s.reward_margin, s.pairs),
        }))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "name": "dpo", "dpo_beta": self.beta, "dpo_label_smoothing": self.label_smoothing, "reference": "the model with the method switched off, log-probabilities computed once before training" })
    }
}

/// Sequence log-probabilities (summed over each row's targets) of a batch, without gradients:
/// under the reference model (`reference`) or the model as it is.
pub fn batch_logps(model: &Llama, batch: &Batch, reference: bool) -> Result<Vec<f32>> {
    let ctx = if reference { ForwardCtx::reference() } else { ForwardCtx::eval() };
    let nll = model.nll(&batch.input_ids, Arc::new(batch.targets.clone()), batch.batch_size, batch.seq_len, &ctx)?;
    Ok(row_logps(&nll, batch)?.to_vec1()?)
}

/// Fills in every pair's reference log-probabilities (chosen and rejected), `batch_pairs` pairs
/// per forward; `progress(done, total)` is told after each batch.
pub fn compute_reference_logps(model: &Llama, pairs: &mut [EncodedExample], batch_pairs: usize, pad_id: u32, mut progress: impl FnMut(usize, usize)) -> Result<()> {
    let total = pairs.len();
    let mut done = 0;
    for chunk in pairs.chunks_mut(batch_pairs.max(1)) {
        let batch = make_batch(&chunk.iter().collect::<Vec<_>>(), pad_id);
        let logps = batch_logps(model, &batch, true)?;
        let n = chunk.len();
        for (i, e) in chunk.iter_mut().enumerate() {
            e.reference_logp = Some(logps[i]);
            if let Some(r) = e.rejected.as_mut() {
                r.reference_logp = Some(logps[n + i]);
            }
        }
        done += n;
        progress(done, total);
    }
    Ok(())
}

/// Scores `policy` on preference pairs whose reference log-probabilities are filled in.
pub fn score(model: &Llama, pairs: &[EncodedExample], batch_pairs: usize, pad_id: u32, dpo: &Dpo) -> Result<DpoScore> {
    let mut s = DpoScore { pairs: pairs.len(), ..Default::default() };
    for chunk in pairs.chunks(batch_pairs.max(1)) {
        let batch = make_batch(&chunk.iter().collect::<Vec<_>>(), pad_id);
        let reference = batch.reference_logps.as_ref().ok_or_else(|| Error::Training("DPO: reference log-probabilities missing".into()))?;
        let policy = batch_logps(model, &batch, false)?;
        let p = batch.pairs;
        let r = rewards(dpo.beta, &policy, reference, p);
        s.loss += r.iter().map(|(c, rj)| dpo.pair_loss(c - rj).0).sum::<f64>();
        s.reward_accuracy += r.iter().filter(|(c, rj)| c > rj).count() as f64;
        s.reward_margin += r.iter().map(|(c, rj)| c - rj).sum::<f64>();
    }
    let n = s.pairs.max(1) as f64;
    Ok(DpoScore { loss: s.loss / n, reward_accuracy: s.reward_accuracy / n, reward_margin: s.reward_margin / n, ..s })
}
