//! IFT, Intuitive Fine-Tuning (`METHODS.md` §5.6), as the official code computes it
//! (`TsinghuaC3I/Intuitive-Fine-Tuning`, loss `ift` with its defaults: propagation of the loss,
//! to the left, L1 norm):
//! 1. a pass without gradients takes the model's greedy prediction at every position;
//! 2. *temporal residual connection*: on response positions the trained pass reads
//!    `(1 − λ)·E[y_t] + λ·E[ŷ_t]`, `ŷ_t` the prediction made for position `t`;
//! 3. *relation propagation*: with `u_t = ℓ_t / n` (n response tokens of the sequence),
//!    `w_t = Σ_{k ≥ t} γ^{k−t} u_k` on response positions, renormalised to sum to `n`;
//! 4. loss per sequence `(1/n)·Σ_t w_t·ℓ_t`, averaged over sequences. The weights are not
//!    detached (the gradient flows through them too). `γ = 0` makes every weight 1 (the
//!    official special case), so `γ = 0, λ = 0` is SFT with a per-sequence mean.

use super::{HeadInputs, LossSum, Objective, ObjectiveSpec, StepInfo};
use crate::data::batch::Batch;
use crate::error::Result;
use crate::kernels;
use crate::models::{ForwardCtx, Llama};
use candle_core::{DType, Tensor};

pub struct Ift {
    lambda: f64,
    gamma: f64,
}

impl Ift {
    pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        let keys = spec.keys();
        Ok(Box::new(Self { lambda: keys.f64_in("ift_lambda", 0.2, 0.0, 1.0)?, gamma: keys.f64_in("ift_gamma", 0.95, 0.0, 1.0)? }))
    }
}

impl Objective for Ift {
    fn name(&self) -> &'static str {
        "ift"
    }

    /// Sequences (with at least one response token): IFT averages per sequence.
    fn units(&self, batch: &Batch) -> usize {
        batch.targets_per_row().iter().filter(|&&n| n > 0).count()
    }

    fn input_embeddings(&self, model: &Llama, batch: &Batch, _at: &StepInfo) -> Result<Option<Tensor>> {
        if self.lambda == 0.0 {
            return Ok(None);
        }
        let (b, t) = (batch.batch_size, batch.seq_len);
        let h = model.hidden(&batch.input_ids, b, t, None, &ForwardCtx::eval())?;
        let predicted = kernels::lm_head_argmax(&h, model.head_weight())?;
        // Position j reads the prediction made at j − 1 where its token is a response token.
        let further: Vec<u32> = (0..b * t)
            .map(|i| if batch.is_response_input(i) { predicted[i - 1] } else { batch.input_ids[i] })
            .collect();
        let e = model.embed_ids(&batch.input_ids, b, t)?;
        let e_further = model.embed_ids(&further, b, t)?;
        Ok(Some(((e * (1.0 - self.lambda))? + (e_further * self.lambda)?)?))
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        let batch = inputs.batch;
        let (b, t) = (batch.batch_size, batch.seq_len);
        let nll = model.head_nll(x, inputs.targets.clone(), inputs.ctx)?.reshape((b, t))?;
        let counts = batch.targets_per_row();
        let dev = x.device();
        let mask = super::target_mask(batch, dev)?;
        // Rows without targets contribute 0; n = 1 keeps their division finite.
        let n = Tensor::from_vec(counts.iter().map(|&c| c.max(1) as f32).collect::<Vec<_>>(), (b, 1), dev)?;
        let weights = if self.gamma == 0.0 {
            mask.clone()
        } else {
            // w = u·D with D[k, j] = γ^{k−j} for k ≥ j: the discounted sum of the losses ahead.
            let discount: Vec<f32> = (0..t * t).map(|i| (i / t, i % t)).map(|(k, j)| if k >= j { self.gamma.powi((k - j) as i32) as f32 } else { 0.0 }).collect();
            let discount = Tensor::from_vec(discount, (t, t), dev)?;
            let u = nll.broadcast_div(&n)?;
            let w = (u.matmul(&discount)? * &mask)?;
            let total = w.sum_keepdim(1)?.clamp(1e-30, f32::INFINITY)?;
            w.broadcast_mul(&n)?.broadcast_div(&total)?
        };
        let per_row = (&nll * weights)?.sum_keepdim(1)?.broadcast_div(&n)?;
        let plain: f64 = nll.sum_keepdim(1)?.broadcast_div(&n)?.sum_all()?.to_dtype(DType::F64)?.to_scalar()?;
        Ok(LossSum { loss: per_row.sum_all()?, metrics: vec![("nll", plain)] })
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "name": "ift", "ift_lambda": self.lambda, "ift_gamma": self.gamma, "propagation": "loss, left, L1 (the official defaults)" })
    }
}
