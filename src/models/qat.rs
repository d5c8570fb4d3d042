//! Quantisation-aware linear sites (RoSTE, `METHODS.md` §5.8). A [`QatSite`] wraps a site (and
//! the method's hook on it) so that its output is computed as the quantised model would:
//! `y = Q_a(x·R)·Q_w((W0 + ΔW)·R)ᵀ + b`, `Q` fake quantisation with the straight-through
//! gradient ([`kernels::fake_quant`]), `R` the identity or a block Hadamard rotation of the
//! input dimension ([`kernels::hadamard_rotate`]; orthogonal, so without quantisation the output
//! is unchanged), `ΔW` the method's weight change ([`SiteHook::delta_weight`]), through which
//! the gradient reaches the method's parameters.
//!
//! The rotation is chosen per site by quantisation error: on calibration batches each site
//! compares `‖x·W0ᵀ − Q_a(x·R)·Q_w(W0·R)ᵀ‖²` with and without the rotation and keeps the
//! smaller ([`calibrate`]).

use super::linear::{add_bias, ForwardCtx, SiteHook};
use super::Llama;
use crate::error::{Error, Result};
use crate::kernels::{self, FrozenWeight, QuantGrid};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The quantised model a RoSTE run trains for, and the rotation it chose per site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QatPlan {
    pub weight_bits: u32,
    pub activation_bits: u32,
    /// The weights' clipping ratio (activations are not clipped).
    pub weight_clip_ratio: f32,
    /// Per site name: rotate its input by the block Hadamard matrix.
    pub rotations: BTreeMap<String, bool>,
}

impl QatPlan {
    fn weight_grid(&self) -> QuantGrid {
        QuantGrid { bits: self.weight_bits, clip_ratio: self.weight_clip_ratio }
    }
    fn activation_grid(&self) -> QuantGrid {
        QuantGrid { bits: self.activation_bits, clip_ratio: 1.0 }
    }
}

fn maybe_rotate(t: &Tensor, rotate: bool) -> candle_core::Result<Tensor> {
    if rotate {
        kernels::hadamard_rotate(t)
    } else {
        Ok(t.clone())
    }
}

/// `Q_a(x·R)·Q_w(W·R)ᵀ` for `x: [.., in]`, `w: [out, in]`.
fn quantised_product(x: &Tensor, w: &Tensor, rotate: bool, plan: &QatPlan) -> candle_core::Result<Tensor> {
    let xq = kernels::fake_quant(&maybe_rotate(x, rotate)?, plan.activation_grid())?;
    let wq = kernels::fake_quant(&maybe_rotate(w, rotate)?, plan.weight_grid())?;
    xq.broadcast_matmul(&wq.t()?)
}

pub struct QatSite {
    inner: Option<Arc<dyn SiteHook>>,
    /// `W0` as dense f32 (read once; the quantised product needs it whole).
    base: Tensor,
    rotate: bool,
    plan: Arc<QatPlan>,
}

impl SiteHook for QatSite {
    fn forward(&self, x: &Tensor, _w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let w = match &self.inner {
            None => self.base.clone(),
            Some(h) => match h.delta_weight(ctx.train) {
                Some(delta) => (&self.base + delta?)?,
                None => candle_core::bail!("quantisation-aware training needs the method's update as a weight change, and this site's method has none"),
            },
        };
        add_bias(quantised_product(x, &w, self.rotate, &self.plan)?, b0)
    }

    fn reference_forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match &self.inner {
            Some(h) => h.reference_forward(x, w0, b0),
            None => add_bias(kernels::frozen_linear(x, w0)?, b0),
        }
    }

    fn delta_weight(&self, train: bool) -> Option<candle_core::Result<Tensor>> {
        self.inner.as_ref().and_then(|h| h.delta_weight(train))
    }
}

/// During calibration: each site's squared output error with and without the rotation,
/// summed over the calibration tokens; the output itself is the site's unquantised one.
struct Measuring {
    inner: Option<Arc<dyn SiteHook>>,
    base: Tensor,
    plan: Arc<QatPlan>,
    errors: Mutex<[f64; 2]>,
}

impl SiteHook for Measuring {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let exact = x.broadcast_matmul(&self.base.t()?)?;
        let mut errors = [0f64; 2];
        for (i, rotate) in [false, true].into_iter().enumerate() {
            let d = (quantised_product(x, &self.base, rotate, &self.plan)? - &exact)?;
            errors[i] = d.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        let mut acc = self.errors.lock().expect("not poisoned");
        acc[0] += errors[0];
        acc[1] += errors[1];
        match &self.inner {
            Some(h) => h.forward(x, w0, b0, ctx),
            None => add_bias(exact, b0),
        }
    }
}

/// Chooses every linear site's rotation by the quantisation error of `W0` on the inputs
/// `forward` feeds it, and returns the plan with the choices filled in. The model's hooks are
/// as they were afterwards.
pub fn calibrate(model: &mut Llama, plan: &QatPlan, forward: &mut dyn FnMut(&Llama) -> Result<()>) -> Result<QatPlan> {
    let plan_arc = Arc::new(plan.clone());
    let mut probes = Vec::new();
    for lin in model.linears_mut() {
        let probe = Arc::new(Measuring { inner: lin.hook.clone(), base: lin.weight.to_tensor()?, plan: plan_arc.clone(), errors: Mutex::new([0.0; 2]) });
        probes.push((lin.name.clone(), lin.hook.take(), probe.clone()));
        lin.hook = Some(probe);
    }
    let result = forward(model);
    let mut chosen = plan.clone();
    for (lin, (name, original, probe)) in model.linears_mut().zip(probes) {
        lin.hook = original;
        let [plain, rotated] = *probe.errors.lock().expect("not poisoned");
        chosen.rotations.insert(name, rotated < plain);
    }
    result.map(|_| chosen)
}

/// Wraps every linear site of `model` (and its method's hook) in a quantisation-aware site
/// with the plan's rotation. Fails for sites whose method has no weight-change form.
pub fn attach(model: &mut Llama, plan: &QatPlan) -> Result<()> {
    let plan = Arc::new(plan.clone());
    for lin in model.linears_mut() {
        if let Some(h) = &lin.hook {
            if h.delta_weight(true).is_none() {
                return Err(Error::config(
                    "objective",
                    format!("\"roste\" quantises the merged weight W0 + ΔW, and the method at {} has no weight-change form (RoSTE trains with the LoRA family: lora, pissa, olora, eva, corda; lora_dropout = 0)", lin.name),
                ));
            }
        }
        let rotate = *plan.rotations.get(&lin.name).ok_or_else(|| Error::Model(format!("the quantisation plan has no rotation for {}", lin.name)))?;
        let site = QatSite { inner: lin.hook.take(), base: lin.weight.to_tensor()?, rotate, plan: plan.clone() };
        lin.hook = Some(Arc::new(site));
    }
    Ok(())
}

/// Where a RoSTE adapter (and a model merged from one) keeps its plan.
pub const PLAN_FILE: &str = "roste.json";

/// The plan kept in `dir`, if it has one.
pub fn read_plan(dir: &std::path::Path) -> Result<Option<QatPlan>> {
    let path = dir.join(PLAN_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::io_util::read_to_string(&path)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::format(&path, format!("not a quantisation plan: {e}")))
}
