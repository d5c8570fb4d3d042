//! DFT (`METHODS.md` §5.1) and ASFT (§5.2).
//!
//! DFT weighs each token's cross-entropy by the model's own probability of the target, detached:
//! `Σ_t sg(p_t)·ℓ_t`, so the gradient is `p_t·∇ℓ_t` (TRL's `loss_type = "dft"`). ASFT adds the
//! full-vocabulary `λ·KL(p_ref ‖ p_θ)` at every response position, against the model training
//! started from (a reference pass), computed chunk by chunk in the head kernel.

use super::{HeadInputs, LossSum, Objective, ObjectiveSpec};
use crate::error::{Error, Result};
use crate::kernels;
use crate::models::Llama;
use candle_core::{IndexOp, Tensor};

pub struct Dft {
    /// ASFT's KL weight; `None` for plain DFT.
    lambda: Option<f64>,
}

impl Dft {
    pub fn plain() -> Self {
        Self { lambda: None }
    }

    /// ASFT; `asft_lambda` defaults to the paper's 0.1.
    pub fn asft(spec: &ObjectiveSpec) -> Result<Box<dyn Objective>> {
        let lambda = spec.keys().f64_or("asft_lambda", 0.1)?;
        if lambda < 0.0 {
            return Err(Error::config("asft_lambda", format!("is {lambda}; expected 0 or a positive weight such as 0.1")));
        }
        Ok(Box::new(Self { lambda: Some(lambda) }))
    }
}

/// `Σ_t sg(p_t)·ℓ_t` over the rows of `nll` (ignored rows are 0 and stay 0), and `Σ_t ℓ_t`.
fn dft_sum(nll: &Tensor) -> Result<(Tensor, f64)> {
    let p = nll.neg()?.exp()?.detach();
    let plain = nll.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(((nll * p)?.sum_all()?, plain))
}

impl Objective for Dft {
    fn name(&self) -> &'static str {
        if self.lambda.is_some() {
            "asft"
        } else {
            "dft"
        }
    }

    fn packs(&self) -> bool {
        true
    }

    fn uses_reference(&self) -> bool {
        self.lambda.is_some()
    }

    fn needs_reference(&self, _batch: &crate::data::batch::Batch) -> bool {
        self.lambda.is_some()
    }

    fn loss_sum(&self, model: &Llama, x: &Tensor, inputs: &HeadInputs) -> Result<LossSum> {
        let Some(lambda) = self.lambda else {
            let nll = model.head_nll(x, inputs.targets.clone(), inputs.ctx)?;
            let (loss, plain) = dft_sum(&nll)?;
            return Ok(LossSum { loss, metrics: vec![("nll", plain)] });
        };
        let reference = inputs.reference.ok_or_else(|| Error::Training("ASFT needs a reference pass, and none was run".into()))?;
        let h = model.final_norm(x)?;
        let both = kernels::lm_head_nll_kl(&h, reference, model.head_weight(), inputs.targets.clone(), inputs.ctx.train)?;
        let (nll, kl) = (both.i((.., 0))?, both.i((.., 1))?);
        let (dft, plain) = dft_sum(&nll)?;
        let kl_sum = kl.sum_all()?;
        let kl_value = kl_sum.to_scalar::<f32>()? as f64;
        Ok(LossSum { loss: (dft + kl_sum.affine(lambda, 0.0)?)?, metrics: vec![("nll", plain), ("kl", kl_value)] })
    }

    fn describe(&self) -> serde_json::Value {
        match self.lambda {
            Some(l) => serde_json::json!({ "name": "asft", "asft_lambda": l }),
            None => serde_json::json!({ "name": "dft" }),
        }
    }
}
