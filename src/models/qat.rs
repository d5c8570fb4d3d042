//! Quantisation-aware linear sites (RoSTE, `METHODS.md` §5.8). A [`QatSite`] wraps a site (and
//! the method's hook on it) so that its output is computed as the quantised model would:
//! `y = Q_a(x·R)·Q_w((W0 + ΔW)·R)ᵀ + b`, `Q` fake quantisation with the straight-through
//! gradient ([`kernels::fake_quant`]), `R` the identity or a block Hadamard rotation of the
//! input dimension ([`kernels::hadamard_rotate`]; orthogonal, so without quantisation the output
//! is unchanged), `ΔW` the method's weight change ([`SiteHook::delta_weight`]), through which
//! the gradient reaches the method's parameters.
//!
//! The rotation is chosen per site by quantisation error: on calibration batches each site
//! compares `‖x·Wᵀ − Q_a(x·R)·Q_w(W·R)ᵀ‖²`, `W = W0 + ΔW` its current weight, with and without
//! the rotation and keeps the smaller ([`QatSites::choose_rotations`]).

use super::linear::{add_bias, ForwardCtx, SiteHook};
use super::Llama;
use crate::error::{Error, Result};
use crate::kernels::{self, FrozenWeight, QuantGrid};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
    name: String,
    inner: Option<Arc<dyn SiteHook>>,
    /// `W0` as dense f32 (read once; the quantised product needs it whole).
    base: Tensor,
    rotate: AtomicBool,
    plan: Arc<QatPlan>,
    /// While rotations are being chosen: the squared output error without and with the
    /// rotation, summed over the tokens seen.
    probe: Mutex<Option<[f64; 2]>>,
}

impl QatSite {
    /// `W0 + ΔW`, with the graph to the method's parameters when `train`.
    fn weight(&self, train: bool) -> candle_core::Result<Tensor> {
        match &self.inner {
            None => Ok(self.base.clone()),
            Some(h) => match h.delta_weight(train) {
                Some(delta) => &self.base + delta?,
                None => candle_core::bail!("{}: quantisation-aware training needs the method's update as a weight change, and this site's method has none", self.name),
            },
        }
    }

    /// Adds this input's quantisation errors, with and without the rotation, to the probe.
    fn measure(&self, x: &Tensor) -> candle_core::Result<()> {
        let (x, w) = (x.detach(), self.weight(false)?);
        let exact = x.broadcast_matmul(&w.t()?)?;
        let mut errors = [0f64; 2];
        for (i, rotate) in [false, true].into_iter().enumerate() {
            let d = (quantised_product(&x, &w, rotate, &self.plan)? - &exact)?;
            errors[i] = d.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        if let Some(acc) = self.probe.lock().expect("not poisoned").as_mut() {
            acc[0] += errors[0];
            acc[1] += errors[1];
        }
        Ok(())
    }
}

impl SiteHook for QatSite {
    fn forward(&self, x: &Tensor, _w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if self.probe.lock().expect("not poisoned").is_some() {
            self.measure(x)?;
        }
        add_bias(quantised_product(x, &self.weight(ctx.train)?, self.rotate.load(Ordering::Relaxed), &self.plan)?, b0)
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

/// The quantisation-aware sites of a model, to choose and read their rotations.
pub struct QatSites {
    sites: Vec<Arc<QatSite>>,
    plan: Arc<QatPlan>,
}

impl QatSites {
    /// Chooses every site's rotation by the quantisation error of its current weight
    /// `W0 + ΔW` on the inputs `forward` feeds it (through the quantised model as it stands).
    pub fn choose_rotations(&self, model: &Llama, forward: &mut dyn FnMut(&Llama) -> Result<()>) -> Result<()> {
        self.sites.iter().for_each(|s| *s.probe.lock().expect("not poisoned") = Some([0.0; 2]));
        let result = forward(model);
        for s in &self.sites {
            let errors = s.probe.lock().expect("not poisoned").take();
            if let (Ok(()), Some([plain, rotated])) = (&result, errors) {
                s.rotate.store(rotated < plain, Ordering::Relaxed);
            }
        }
        result
    }

    /// The plan with the sites' current rotations.
    pub fn plan(&self) -> QatPlan {
        QatPlan { rotations: self.sites.iter().map(|s| (s.name.clone(), s.rotate.load(Ordering::Relaxed))).collect(), ..(*self.plan).clone() }
    }
}

/// Wraps every linear site of `model` (and its method's hook) in a quantisation-aware site,
/// rotated as the plan says (not rotated where it names no rotation). Fails for sites whose
/// method has no weight-change form.
pub fn attach(model: &mut Llama, plan: &QatPlan) -> Result<QatSites> {
    let plan = Arc::new(plan.clone());
    let mut sites = Vec::new();
    for lin in model.linears_mut() {
        if let Some(h) = &lin.hook {
            if h.delta_weight(true).is_none() {
                return Err(Error::config(
                    "objective",
                    format!("\"roste\" quantises the merged weight W0 + ΔW, and the method at {} has no weight-change form (RoSTE trains with the LoRA family: lora, pissa, olora, eva, corda; lora_dropout = 0)", lin.name),
                ));
            }
        }
        let rotate = plan.rotations.get(&lin.name).copied().unwrap_or(false);
        let site = Arc::new(QatSite {
            name: lin.name.clone(),
            inner: lin.hook.take(),
            base: lin.weight.to_tensor()?,
            rotate: AtomicBool::new(rotate),
            plan: plan.clone(),
            probe: Mutex::new(None),
        });
        lin.hook = Some(site.clone());
        sites.push(site);
    }
    Ok(QatSites { sites, plan })
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
