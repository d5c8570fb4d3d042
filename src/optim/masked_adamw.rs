//! AdamW over chosen entries of large matrices (sparse fine-tuning: LIFT, SaRA, LT-SFT, …):
//! moments are kept for the trainable entries only, as sorted flat indices with their values,
//! so optimizer memory grows with the entries trained, not with the matrices holding them.
//! Weight decay applies to those entries only; every other entry is never written.
//!
//! A mask may change between steps ([`MaskedAdamW::set_mask`]): entries that stay keep their
//! moments, entries that join start from zero moments. Bias correction uses the optimizer's
//! global step count (as torch keeps one step per parameter tensor), also for joining entries.

use super::adamw::AdamWConfig;
use crate::error::{Error, Result};

/// One matrix's trainable entries and their moments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaskedMoments {
    /// Flat indices into the matrix, strictly increasing.
    pub indices: Vec<u32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl MaskedMoments {
    fn new(indices: Vec<u32>) -> Self {
        let n = indices.len();
        Self { indices, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n] }
    }
}

pub struct MaskedAdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub tensors: Vec<MaskedMoments>,
}

fn check_sorted(indices: &[u32]) -> Result<()> {
    if indices.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Training("a sparse mask's indices must be strictly increasing".into()));
    }
    Ok(())
}

impl MaskedAdamW {
    /// One mask (sorted flat indices) per trained matrix.
    pub fn new(config: AdamWConfig, masks: Vec<Vec<u32>>) -> Result<Self> {
        masks.iter().try_for_each(|m| check_sorted(m))?;
        Ok(Self { config, step: 0, tensors: masks.into_iter().map(MaskedMoments::new).collect() })
    }

    /// Replaces matrix `i`'s mask: moments of entries in both masks are carried over, new
    /// entries start at zero, dropped entries forget theirs.
    pub fn set_mask(&mut self, i: usize, indices: Vec<u32>) -> Result<()> {
        check_sorted(&indices)?;
        let old = std::mem::take(&mut self.tensors[i]);
        let mut new = MaskedMoments::new(indices);
        let mut j = 0;
        for (k, &idx) in new.indices.iter().enumerate() {
            while j < old.indices.len() && old.indices[j] < idx {
                j += 1;
            }
            if j < old.indices.len() && old.indices[j] == idx {
                new.exp_avg[k] = old.exp_avg[j];
                new.exp_avg_sq[k] = old.exp_avg_sq[j];
            }
        }
        self.tensors[i] = new;
        Ok(())
    }

    /// One update at rate `lr`: `weights[i]` is matrix `i` (all its entries), `grads[i]` the
    /// gradient of its masked entries, in mask order.
    pub fn step(&mut self, weights: &mut [&mut [f32]], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if weights.len() != self.tensors.len() {
            return Err(Error::Training(format!("masked AdamW: {} matrices, {} weights", self.tensors.len(), weights.len())));
        }
        for (t, w) in self.tensors.iter().zip(weights.iter()) {
            if t.indices.last().is_some_and(|&last| last as usize >= w.len()) {
                return Err(Error::Training(format!("masked AdamW: an index past the matrix's {} entries", w.len())));
            }
        }
        let mut values: Vec<Vec<f32>> = self.tensors.iter().zip(weights.iter()).map(|(t, w)| t.indices.iter().map(|&i| w[i as usize]).collect()).collect();
        self.step_values(&mut values.iter_mut().map(|v| v.as_mut_slice()).collect::<Vec<_>>(), grads, lr)?;
        for ((t, w), v) in self.tensors.iter().zip(weights.iter_mut()).zip(values) {
            t.indices.iter().zip(v).for_each(|(&i, v)| w[i as usize] = v);
        }
        Ok(())
    }

    /// One update at rate `lr` where `values[i]` holds only matrix `i`'s masked entries, in mask
    /// order (what a sparse site keeps).
    pub fn step_values(&mut self, values: &mut [&mut [f32]], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if values.len() != self.tensors.len() || grads.len() != self.tensors.len() {
            return Err(Error::Training(format!("masked AdamW: {} matrices, {} weights, {} gradients", self.tensors.len(), values.len(), grads.len())));
        }
        // Everything is checked before anything is written.
        for ((t, g), v) in self.tensors.iter().zip(grads).zip(values.iter()) {
            if g.len() != t.indices.len() || v.len() != t.indices.len() {
                return Err(Error::Training(format!("masked AdamW: {} gradients and {} values for {} masked entries", g.len(), v.len(), t.indices.len())));
            }
        }
        self.step += 1;
        let k = self.config.coefficients(self.step, lr);
        for ((t, v), g) in self.tensors.iter_mut().zip(values.iter_mut()).zip(grads) {
            for j in 0..t.indices.len() {
                k.update(&mut v[j], g[j], &mut t.exp_avg[j], &mut t.exp_avg_sq[j]);
            }
        }
        Ok(())
    }

    /// Bytes the moments and indices take.
    pub fn state_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.indices.len() * 12).sum()
    }
}
