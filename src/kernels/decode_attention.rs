//! Attention of one new token per sequence over that sequence's own cached keys: decoding a
//! batch whose sequences have different lengths. Each sequence reads only its first `lens[i]`
//! cache positions, so nothing is padded and no mask is needed. Inference only (no backward).

use super::skinny::dot;
use super::vexp::exp_sub;
use rayon::prelude::*;

/// The shape of a decode-attention call.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    /// Query heads, key/value heads (`h_q % h_kv == 0`), head dimension.
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    /// Positions each sequence's cache buffer holds.
    pub cap: usize,
}

/// `q: [b, h_q, d]` (one query per sequence), `k, v: [b, cap, h_kv, d]` cache buffers of which
/// sequence `i` uses its first `lens[i]` positions (its new token included); returns
/// `[b, h_q, d]`.
pub fn decode_attention(q: &[f32], k: &[f32], v: &[f32], lens: &[usize], s: DecodeShape) -> Vec<f32> {
    let DecodeShape { hq, hkv, d, cap } = s;
    let b = lens.len();
    assert_eq!(q.len(), b * hq * d, "decode attention: q is not [b, h_q, d]");
    assert!(k.len() >= b * cap * hkv * d && v.len() == k.len(), "decode attention: cache buffers too small");
    assert!(lens.iter().all(|&n| n >= 1 && n <= cap), "decode attention: every sequence needs 1..=cap keys");
    let scale = 1.0 / (d as f32).sqrt();
    let group = hq / hkv;
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
        let (row, h) = (task / hq, task % hq);
        let g = h / group;
        let qh = &q[task * d..(task + 1) * d];
        let n = lens[row];
        let at = |j: usize| ((row * cap + j) * hkv + g) * d;
        // `skinny::dot` keeps several partial sums: a plain iterator sum is one serial chain of
        // adds, which made the scores most of this kernel's time.
        let mut p: Vec<f32> = (0..n).map(|j| scale * dot(qh, &k[at(j)..at(j) + d])).collect();
        let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        exp_sub(&mut p, m);
        let inv = 1.0 / p.iter().sum::<f32>();
        for (j, &pj) in p.iter().enumerate() {
            let w = pj * inv;
            o.iter_mut().zip(&v[at(j)..at(j) + d]).for_each(|(acc, &x)| *acc += w * x);
        }
    });
    out
}
