//! Intruder-dimension mitigation for LoRA (METHODS.md §6.3; "LoRA vs Full Fine-tuning: An
//! Illusion of Equivalence"), with the defaults and semantics of PEFT's
//! `reduce_intruder_dimension`. Per adapted matrix, `W_m = W0 + s·B·A`; among the top-`k`
//! left singular vectors of `W_m`, those whose largest |cosine| with any left singular vector
//! of `W0` is below `ε` are intruders. Their components are scaled by `λ`,
//! `W_m' = W_m + (λ − 1)·Σ_intr σ_j u_j v_jᵀ`, and `(W_m' − W0)/s` is factored back into the
//! module's rank `r` by truncated SVD, √σ on each side. Modules without intruders keep their
//! factors. Computed in f64 (PEFT works in f32).

use crate::error::Result;
use crate::linalg::{self, Mat};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntruderSettings {
    /// How many of `W_m`'s leading singular vectors are examined.
    pub top_k: usize,
    /// `ε`: a vector whose best |cosine| with the base's is below this is an intruder.
    pub threshold: f64,
    /// `λ`: the factor intruder components are scaled by.
    pub lambda: f64,
}

impl Default for IntruderSettings {
    fn default() -> Self {
        IntruderSettings { top_k: 10, threshold: 0.5, lambda: 0.75 }
    }
}

/// For each of the first `k` columns of `u` (a fine-tuned matrix's left singular vectors),
/// its largest |cosine| with any column of `base_u` (the base matrix's).
pub fn max_abs_cosines(base_u: &Mat, u: &Mat, k: usize) -> Vec<f64> {
    let k = k.min(u.ncols());
    let cos = linalg::matmul(&u.columns(0, k).transpose(), base_u);
    (0..k).map(|i| cos.row(i).iter().fold(0f64, |acc, c| acc.max(c.abs()))).collect()
}

/// Intruder measurement (METHODS.md §8.2) of one matrix: the top-`k` |cosines| of the
/// fine-tuned `w` against the base `w0`.
pub fn measure(w0: &Mat, w: &Mat, k: usize) -> Result<Vec<f64>> {
    Ok(max_abs_cosines(&linalg::svd(w0)?.u, &linalg::svd(w)?.u, k))
}

/// One module's result.
pub struct Mitigated {
    /// Indices (into `W_m`'s singular vectors, descending) of the intruders.
    pub intruders: Vec<usize>,
    /// For each of the top-`k` vectors, its largest |cosine| with the base's.
    pub max_abs_cos: Vec<f64>,
    /// The new factors `a: [r, in]`, `b: [out, r]` (the old ones where there is no intruder).
    pub a: Mat,
    pub b: Mat,
}

/// Mitigates one module: base weight `w0: [out, in]`, factors `a: [r, in]`, `b: [out, r]`,
/// scaling `s`.
pub fn mitigate(w0: &Mat, a: &Mat, b: &Mat, scaling: f64, settings: &IntruderSettings) -> Result<Mitigated> {
    let merged = w0 + linalg::matmul(b, a) * scaling;
    let base = linalg::svd(w0)?;
    let m = linalg::svd(&merged)?;
    let max_abs_cos = max_abs_cosines(&base.u, &m.u, settings.top_k);
    let k = max_abs_cos.len();
    let intruders: Vec<usize> = (0..k).filter(|&i| max_abs_cos[i] < settings.threshold).collect();
    if intruders.is_empty() {
        return Ok(Mitigated { intruders, max_abs_cos, a: a.clone(), b: b.clone() });
    }
    let mut scaled = merged;
    for &j in &intruders {
        scaled += (settings.lambda - 1.0) * m.s[j] * (m.u.column(j) * m.vt.row(j));
    }
    let delta = (scaled - w0) / scaling;
    let r = a.nrows();
    let d = linalg::svd(&delta)?.truncate(r);
    let root: Vec<f64> = d.s.iter().map(|s| s.max(0.0).sqrt()).collect();
    let new_b = Mat::from_fn(b.nrows(), r, |i, j| d.u[(i, j)] * root[j]);
    let new_a = Mat::from_fn(r, a.ncols(), |i, j| root[i] * d.vt[(i, j)]);
    Ok(Mitigated { intruders, max_abs_cos, a: new_a, b: new_b })
}
