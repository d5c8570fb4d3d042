//! Masked Thought (`METHODS.md` §5.5): SFT on a corrupted prefix. Each response token of the
//! input is replaced, with probability `p`, by a mask token; the labels stay the original
//! tokens, so the model learns to predict the next reasoning step from a partly hidden one.
//! Prompt tokens are never masked. `p` ramps linearly from 0 to `mft_p_max` over the first
//! `mft_ramp_ratio` of the steps (the GSM8K script: 0.4 over the first 66 %).
//!
//! The mask token is a vector, not a vocabulary entry: the mean of the token embeddings, which is
//! how the paper initialises its added `<mask>` token (the embeddings are frozen under an adapter,
//! so it stays that). Masking happens in the embeddings the trained pass reads.

use super::{HeadInputs, LossSum, Objective, ObjectiveSpec, StepInfo};
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::models::Llama;
use crate::rng::SplitMix64;
use candle_core::Tensor;
use std::sync::OnceLock;

pub struct MaskedThought {
    p_max: f64,
    ramp_ratio: f64,
    mask: OnceLock<Vec<f32>>,
}

impl MaskedThought {
    pub fn create(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        let keys = spec.keys();
        let p_max = keys.f64_in("mft_p_max", 0.4, 0.0, 1.0)?;
        let ramp_ratio = keys.f64_in("mft_ramp_ratio", 0.66, 0.0, 1.0)?;
        if p_max == 1.0 {
            return Err(Error::config("mft_p_max", "is 1: every response token would be masked; expected a rate below 1 such as 0.4"));
        }
        Ok(Box::new(Self::new(p_max, ramp_ratio)))
    }

    pub fn new(p_max: f64, ramp_ratio: f64) -> Self {
        Self { p_max, ramp_ratio, mask: OnceLock::new() }
    }

    /// The masking rate at optimizer step `step` (0-based) of `total`.
    pub fn rate(&self, step: usize, total: usize) -> f64 {
        let ramp = self.ramp_ratio * total as f64;
        if ramp <= 0.0 {
            self.p_max
        } else {
            self.p_max * (step as f64 / ramp).min(1.0)
        }
    }
}

/// The input positions of `batch` to mask at rate `p`: response tokens only (the token at
/// position `j` is a response token when it is the target of position `j − 1`), each drawn
/// independently from the micro-batch's seed.
pub fn mask_positions(batch: &Batch, p: f64, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::derive(seed, &[0x3a5c]);
    (0..batch.input_ids.len())
        .filter(|&i| batch.is_response_input(i))
        .filter(|_| (rng.next_f32() as f64) < p)
        .collect()
}

impl Objective for MaskedThought {
    fn name(&self) -> &'static str {
        "masked_thought"
    }

    fn packs(&self) -> bool {
        true
    }

    fn input_embeddings(&self, model: &Llama, batch: &Batch, at: &StepInfo) -> Result<Option<Tensor>> {
        let p = self.rate(at.step, at.total_steps);
        let masked = mask_positions(batch, p, at.seed);
        if masked.is_empty() {
            return Ok(None);
        }
        let mask = self.mask.get_or_init(|| model.mean_embedding());
        let d = mask.len();
        let x = model.embed_ids(&batch.input_ids, batch.batch_size, batch.seq_len)?;
        let mut v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for i in masked {
            v[i * d..(i + 1) * d].copy_from_slice(mask);
        }
        Ok(Some(Tensor::from_vec(v, x.shape(), x.device())?))
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        Ok(LossSum { loss: model.head_nll(x, inputs.targets.clone(), inputs.ctx)?.sum_all()?, metrics: Vec::new() })
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "name": "masked_thought", "mft_p_max": self.p_max, "mft_ramp_ratio": self.ramp_ratio, "mask": "mean token embedding" })
    }
}
