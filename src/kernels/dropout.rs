//! Inverted dropout whose mask is a pure function of `(seed, element index)`: the forward
//! draws it in parallel without a random-number stream, and the backward draws it again
//! instead of keeping a mask tensor alive between the two (a mask per adapted site would cost
//! as much memory as the activations themselves).

use super::{f32_slice, with_f32};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 8192;

struct Dropout {
    seed: u64,
    p: f32,
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of the element's coordinates.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// Applies the mask (scaled by 1/(1−p)) to `src`.
    fn apply(&self, src: &[f32]) -> Vec<f32> {
        // Keep an element when its 24-bit uniform draw is below 1 − p.
        let threshold = ((1.0 - self.p as f64) * (1u64 << 24) as f64) as u64;
        let scale = 1.0 / (1.0 - self.p);
        let base = mix(self.seed);
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(c, (o, s))| {
            for (i, (ov, sv)) in o.iter_mut().zip(s).enumerate() {
                let idx = (c * CHUNK + i) as u64;
                let draw = mix(base ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 40;
                *ov = if draw < threshold { sv * scale } else { 0.0 };
            }
        });
        out
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        Ok((CpuStorage::F32(self.apply(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(dy, self.name(), |dy| Ok(self.apply(dy)))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The dropout mask for `(p, seed)` applied to a slice: what [`dropout`] computes, for kernels
/// that fuse dropout into a larger op.
pub(crate) fn apply_mask(src: &[f32], p: f32, seed: u64) -> Vec<f32> {
    Dropout { seed, p }.apply(src)
}

/// Zeroes each element with probability `p` and scales the rest by `1/(1−p)`; the same
/// `seed` gives the same mask.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(Dropout { seed, p })
}
