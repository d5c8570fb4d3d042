//! The adapter report: for each linear module a fine-tune changed, the size and shape of its
//! weight change `ΔW = W_ft − W_0` — norms, singular spectrum and effective ranks.

use crate::error::Result;
use crate::linalg::{self, Mat};
use serde::Serialize;

/// How many leading singular values a module's entry keeps.
pub const TOP_SINGULAR: usize = 32;

#[derive(Debug, Clone, Serialize)]
pub struct ChangeSpectrum {
    /// `‖ΔW‖_F`.
    pub frobenius: f64,
    /// `‖ΔW‖_F / ‖W_0‖_F`.
    pub relative: f64,
    /// `σ_1`, the spectral norm.
    pub spectral: f64,
    /// `‖ΔW‖_F² / σ_1²`: how many directions carry the change, counted by energy.
    pub stable_rank: f64,
    /// Roy & Vetterli's effective rank: `exp(H(p))`, `p_i = σ_i / Σσ` over the singular values
    /// above the noise floor (see `numerical_rank`).
    pub effective_rank: f64,
    /// Smallest k whose top-k singular values hold 90 % of `‖ΔW‖_F²`.
    pub rank_90: usize,
    /// Singular values above the noise floor `max(σ_1·1e-6, ε_f32·‖W_0‖_F)`. ΔW is a difference
    /// of f32 weights, whose rounding (at most ε_f32/2 per entry, relative) adds a noise matrix
    /// of spectral norm below `ε_f32·‖W_0‖_F`; without the floor a rank-16 LoRA on a 576×1536
    /// projection counts about 100.
    pub numerical_rank: usize,
    /// The leading singular values, descending (at most [`TOP_SINGULAR`]).
    pub singular_values: Vec<f64>,
}

/// Measures `delta` (the change) against `base` (the pre-trained weight, for the relative norm).
pub fn measure(base: &Mat, delta: &Mat) -> Result<ChangeSpectrum> {
    let s = linalg::singular_values(delta)?;
    Ok(from_singular_values(&s, base.norm()))
}

/// The report's numbers from a spectrum `s` (descending) and the base weight's norm.
pub fn from_singular_values(s: &[f64], base_norm: f64) -> ChangeSpectrum {
    let energy: f64 = s.iter().map(|x| x * x).sum();
    let frobenius = energy.sqrt();
    let spectral = s.first().copied().unwrap_or(0.0);
    let floor = (spectral * 1e-6).max(f32::EPSILON as f64 * base_norm);
    let signal: Vec<f64> = s.iter().copied().filter(|&x| x > floor && x > 0.0).collect();
    let total: f64 = signal.iter().sum();
    let entropy: f64 = signal.iter().map(|&x| x / total).map(|p| -p * p.ln()).sum();
    let mut acc = 0.0;
    let rank_90 = s
        .iter()
        .position(|x| {
            acc += x * x;
            acc >= 0.9 * energy
        })
        .map_or(0, |i| i + 1);
    ChangeSpectrum {
        frobenius,
        relative: if base_norm > 0.0 { frobenius / base_norm } else { f64::NAN },
        spectral,
        stable_rank: if spectral > 0.0 { energy / (spectral * spectral) } else { 0.0 },
        effective_rank: if total > 0.0 { entropy.exp() } else { 0.0 },
        rank_90: if energy > 0.0 { rank_90 } else { 0 },
        numerical_rank: signal.len(),
        singular_values: s.iter().take(TOP_SINGULAR).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_norms_of_a_known_spectrum() {
        // ΔW = diag(4, 3, 0) rotated: singular values 4, 3, 0.
        let delta = Mat::from_row_slice(3, 3, &[0.0, 4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let base = Mat::identity(3, 3) * 2.0;
        let r = measure(&base, &delta).unwrap();
        assert!((r.singular_values[0] - 4.0).abs() < 1e-12 && (r.singular_values[1] - 3.0).abs() < 1e-12 && r.singular_values[2].abs() < 1e-12);
        assert!((r.frobenius - 5.0).abs() < 1e-12 && (r.spectral - 4.0).abs() < 1e-12);
        assert!((r.relative - 5.0 / 12f64.sqrt()).abs() < 1e-12);
        assert!((r.stable_rank - 25.0 / 16.0).abs() < 1e-12);
        let (p, q) = (4.0f64 / 7.0, 3.0f64 / 7.0);
        assert!((r.effective_rank - (-p * p.ln() - q * q.ln()).exp()).abs() < 1e-12);
        // 16/25 = 64 % < 90 %, 25/25 reaches it.
        assert_eq!((r.rank_90, r.numerical_rank), (2, 2));
        // Values under the f32 noise floor of a base of norm 1e6 (ε·1e6 ≈ 0.12) do not count.
        let r = from_singular_values(&[4.0, 3.0, 0.1], 1e6);
        assert_eq!(r.numerical_rank, 2);
        assert!((r.effective_rank - (-p * p.ln() - q * q.ln()).exp()).abs() < 1e-12);
    }

    #[test]
    fn no_change_has_no_rank() {
        let r = from_singular_values(&[0.0, 0.0], 1.0);
        assert_eq!((r.frobenius, r.stable_rank, r.effective_rank, r.rank_90, r.numerical_rank), (0.0, 0.0, 0.0, 0, 0));
    }
}
