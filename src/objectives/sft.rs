//! SFT (`METHODS.md` §1.4): the mean token cross-entropy over the response tokens.

use super::{HeadInputs, LossSum, Objective};
use crate::error::Result;
use crate::models::Llama;
use candle_core::Tensor;

pub struct Sft;

impl Objective for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }

    fn packs(&self) -> bool {
        true
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        let loss = model.head_nll(x, inputs.targets.clone(), inputs.ctx)?.sum_all()?;
        Ok(LossSum { loss, metrics: Vec::new() })
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "name": "sft" })
    }
}
