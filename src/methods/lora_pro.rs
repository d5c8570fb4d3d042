//! LoRA-Pro (METHODS.md §2.1): ordinary LoRA factors and forward, with the update replaced.
//! The raw gradients `(g_A, g_B)` only see the full-weight gradient `G` through `s·Bᵀ·G` and
//! `s·G·Aᵀ`; LoRA-Pro picks the pair whose *equivalent gradient* `s·B·g̃_A + s·g̃_B·A` is the
//! Frobenius projection of `G` onto `{B·X + Y·A}`, with the free `r×r` matrix `X` chosen by a
//! Sylvester equation to stay closest to the raw pair.
//!
//! Its optimizer is the official code's AdamW variant: Adam moments on the full-size `m×n`
//! equivalent gradient, the Adam direction mapped back to the factors and adjusted again, then
//! a plain SGD step (with AdamW's decoupled weight decay on A and B, which the official code
//! inherits from its AdamW; our choice to keep it, so `weight_decay` means what it means for
//! LoRA). The moments make its optimizer state as large as full fine-tuning's for the adapted
//! matrices: `Method::planned_memory` counts them.
//!
//! Numerics follow the official code: inverses of `BᵀB + δI` and `AAᵀ + δI` with `δ = 1e-8`;
//! the Sylvester equation is solved through eigen-decompositions of the two (symmetric)
//! matrices, in f64 here. While `B = 0` (the first step) the `X` term and the projector are
//! dropped: `g̃_A = g_A`, `g̃_B = g_B·(AAᵀ)⁻¹/s²`.

use super::lora::{Lora, LoraSite};
use super::registry::Entry;
use super::{LoraPair, Method, MethodSpec, PlannedMemory};
use crate::error::{Error, Result};
use crate::linalg::{self, Mat};
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use crate::optim::{AdamWConfig, LoadedState, Optimizer, OptimizerState};
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

pub const LORA_PRO: Entry = Entry {
    name: "lora_pro",
    summary: "LoRA-Pro: LoRA whose update follows the projection of the full gradient (Sylvester-adjusted factor gradients, full-size Adam moments)",
    keys: &[],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    Ok(Box::new(LoraPro { lora: Lora::new(spec.lora_config(), spec.seed)? }))
}

fn load(model: &mut Llama, dir: &Path, _cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    Ok(Box::new(LoraPro { lora: Lora::load_peft(model, dir)? }))
}

/// The regulariser of both `r×r` inverses.
const DELTA: f64 = 1e-8;

pub struct LoraPro {
    lora: Lora,
}

impl Method for LoraPro {
    fn name(&self) -> &'static str {
        "lora_pro"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        Method::attach(&mut self.lora, model)
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.lora.params()
    }

    fn sites(&self) -> Vec<String> {
        Method::sites(&self.lora)
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.lora.config.target_modules.select(sites, "lora_target_modules")?;
        let r = self.lora.config.r as u64;
        let lora: u64 = chosen.iter().map(|s| r * (s.in_features + s.out_features) as u64).sum();
        // Two f32 moments of every adapted matrix's full size, plus the step's f64 work
        // matrices of one site per thread (bounded by the largest site).
        let full: u64 = chosen.iter().map(|s| (s.in_features * s.out_features) as u64).sum();
        let largest = chosen.iter().map(|s| (s.in_features * s.out_features) as u64).max().unwrap_or(0);
        let work = 4 * 8 * largest * rayon::current_num_threads() as u64;
        Ok(Some(PlannedMemory { trainable_params: lora, extra_bytes: 2 * 4 * full + work, floats_per_token: 0, fused_blocks: true, ..Default::default() }))
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        Box::new(LoraProAdamW::new(config, &self.lora.sites))
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.lora.save_as(dir, base_model, "lora_pro", &[])
    }

    fn peft_compatible(&self) -> bool {
        true
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.lora.merge_into(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        Some(self.lora.pairs())
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.lora.describe_lora();
        d["optimizer"] = serde_json::Value::from("LoRA-Pro AdamW (full-size moments)");
        d
    }
}

/// `(M + δI)⁻¹` for a symmetric positive semi-definite `M`.
fn reg_inverse(m: &Mat, what: &str) -> Result<Mat> {
    let n = m.nrows();
    linalg::inverse(&(m + Mat::identity(n, n) * DELTA), what)
}

/// The solution of `P·X + X·Q = C` for symmetric positive semi-definite `P` (r×r) and `Q`
/// (r×r), through their eigen-decompositions: with `P = U·diag(λ)·Uᵀ`, `Q = V·diag(μ)·Vᵀ`,
/// `X = U·((Uᵀ·C·V) ⊘ (λᵢ + μⱼ))·Vᵀ`.
pub fn solve_sylvester(p: &Mat, q: &Mat, c: &Mat) -> Mat {
    let (lam, u) = linalg::sym_eig(p);
    let (mu, v) = linalg::sym_eig(q);
    let mut y = u.transpose() * c * &v;
    for i in 0..y.nrows() {
        for j in 0..y.ncols() {
            let d = lam[i] + mu[j];
            y[(i, j)] = if d.abs() > 1e-300 { y[(i, j)] / d } else { 0.0 };
        }
    }
    u * y * v.transpose()
}

/// LoRA-Pro's adjusted factor gradients for `a: [r, n]`, `b: [m, r]` at scaling `s`, from the
/// raw gradients `ga = s·Bᵀ·G`, `gb = s·G·Aᵀ`; with `sylvester` the optimal `X` (else `X = 0`).
pub fn adjusted_grads(a: &Mat, b: &Mat, ga: &Mat, gb: &Mat, s: f64, sylvester: bool) -> Result<(Mat, Mat)> {
    let inv_s2 = 1.0 / (s * s);
    let aat_inv = reg_inverse(&(a * a.transpose()), "AAᵀ + δI")?;
    if b.iter().all(|&x| x == 0.0) {
        return Ok((ga.clone(), gb * &aat_inv * inv_s2));
    }
    let btb = b.transpose() * b;
    let btb_inv = reg_inverse(&btb, "BᵀB + δI")?;
    let ga_t = &btb_inv * ga * inv_s2;
    // P_B·g_B = g_B − B·(BᵀB)⁻¹·Bᵀ·g_B.
    let pb_gb = gb - b * (&btb_inv * (b.transpose() * gb));
    let gb_t = pb_gb * &aat_inv * inv_s2;
    if !sylvester {
        return Ok((ga_t, gb_t));
    }
    let aat = a * a.transpose();
    let c = -(&ga_t * a.transpose());
    let x = solve_sylvester(&btb, &aat, &c);
    Ok((ga_t + &x * a, gb_t - b * &x))
}

/// The official AdamW variant (module docs), one state per adapted site.
pub struct LoraProAdamW {
    config: AdamWConfig,
    step: u64,
    scalings: Vec<f64>,
    /// Full-size `[m, n]` moments, row-major, per site.
    exp_avg: Vec<Vec<f32>>,
    exp_avg_sq: Vec<Vec<f32>>,
}

impl LoraProAdamW {
    fn new(config: AdamWConfig, sites: &[Arc<LoraSite>]) -> Self {
        let full = |s: &Arc<LoraSite>| vec![0f32; s.b.dims()[0] * s.a.dims()[1]];
        Self {
            config,
            step: 0,
            scalings: sites.iter().map(|s| s.scaling).collect(),
            exp_avg: sites.iter().map(full).collect(),
            exp_avg_sq: sites.iter().map(full).collect(),
        }
    }
}

fn mat_of(v: &Var) -> Result<Mat> {
    linalg::from_tensor(&v.as_detached_tensor())
}

impl Optimizer for LoraProAdamW {
    fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if params.len() != 2 * self.scalings.len() {
            return Err(Error::Training(format!("LoRA-Pro: {} parameters for {} sites (expected A, B per site)", params.len(), self.scalings.len())));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let decay = 1.0 - lr * c.weight_decay;
        let updates: Vec<Result<(Tensor, Tensor)>> = (0..self.scalings.len())
            .into_par_iter()
            .zip(self.exp_avg.par_iter_mut().zip(self.exp_avg_sq.par_iter_mut()))
            .map(|(i, (m1, m2))| {
                let (pa, pb) = (&params[2 * i], &params[2 * i + 1]);
                let s = self.scalings[i];
                let (a, b) = (mat_of(pa)?, mat_of(pb)?);
                let (r, n) = a.shape();
                let m = b.nrows();
                let ga = linalg::from_rows(r, n, &grads[2 * i]);
                let gb = linalg::from_rows(m, r, &grads[2 * i + 1]);
                // 1. The equivalent full-size gradient of the X = 0 pair.
                let (ga0, gb0) = adjusted_grads(&a, &b, &ga, &gb, s, false)?;
                let g_hat = (&b * &ga0 + &gb0 * &a) * s;
                // 2. Adam on it, in full size (row-major like the stored moments).
                let mut u = Mat::zeros(m, n);
                for row in 0..m {
                    for col in 0..n {
                        let k = row * n + col;
                        let g = g_hat[(row, col)] as f32;
                        m1[k] += (1.0 - c.beta1 as f32) * (g - m1[k]);
                        m2[k] = m2[k] * c.beta2 as f32 + (1.0 - c.beta2 as f32) * g * g;
                        let denom = (m2[k] as f64 / bc2).sqrt() + c.eps;
                        u[(row, col)] = (m1[k] as f64 / bc1) / denom;
                    }
                }
                // 3–4. Back to the factors, adjusted with the Sylvester X.
                let (ha, hb) = ((b.transpose() * &u) * s, (&u * a.transpose()) * s);
                let (da, db) = adjusted_grads(&a, &b, &ha, &hb, s, true)?;
                // 5. SGD with AdamW's decoupled decay.
                let new_a = a * decay - da * lr;
                let new_b = b * decay - db * lr;
                Ok((linalg::to_tensor(&new_a)?, linalg::to_tensor(&new_b)?))
            })
            .collect();
        for (i, u) in updates.into_iter().enumerate() {
            let (a, b) = u?;
            params[2 * i].set(&a)?;
            params[2 * i + 1].set(&b)?;
        }
        Ok(())
    }

    fn state(&self, params: &[(String, Var)]) -> Result<OptimizerState> {
        let mut tensors = Vec::new();
        for (i, pair) in params.chunks(2).enumerate() {
            let (m, n) = (pair[1].1.dims()[0], pair[0].1.dims()[1]);
            let key = &pair[0].0;
            tensors.push((format!("{key}.lora_pro_exp_avg"), Tensor::from_slice(&self.exp_avg[i], (m, n), &candle_core::Device::Cpu)?));
            tensors.push((format!("{key}.lora_pro_exp_avg_sq"), Tensor::from_slice(&self.exp_avg_sq[i], (m, n), &candle_core::Device::Cpu)?));
        }
        Ok(OptimizerState { tensors, step: self.step })
    }

    fn restore(&mut self, params: &[(String, Var)], state: &LoadedState, src: &Path) -> Result<()> {
        for (i, pair) in params.chunks(2).enumerate() {
            let key = &pair[0].0;
            let len = self.exp_avg[i].len();
            self.exp_avg[i] = state.take_exact(&format!("{key}.lora_pro_exp_avg"), len, src)?;
            self.exp_avg_sq[i] = state.take_exact(&format!("{key}.lora_pro_exp_avg_sq"), len, src)?;
        }
        self.step = state.step;
        Ok(())
    }
}
