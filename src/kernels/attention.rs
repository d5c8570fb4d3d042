//! Causal scaled-dot-product attention with grouped-query heads, on `[batch, seq, heads, dim]`
//! tensors (the layout the projections produce, so no transposes are needed).
//!
//! Queries may be fewer than keys (decoding with a KV cache): query `i` sits at position
//! `i + (t_k − t_q)` and sees keys `0..=` that position. Nothing `T × T` is stored: the forward
//! keeps only its output, and the backward recomputes each score row from q and k (as flash
//! attention does), first the row's log-sum-exp, then the gradients.

use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct CausalAttention;

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    scale: f32,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let (&[b, tq, hq, d], &[bk, tk, hkv, dk]) = (q, k) else {
            bail!("attention: expected 4-d q/k, got {q:?} {k:?}");
        };
        if k != v || b != bk || d != dk || hkv == 0 || hq % hkv != 0 || tq > tk {
            bail!("attention: incompatible shapes q {q:?} k {k:?} v {v:?}");
        }
        Ok(Self { b, tq, tk, hq, hkv, d, scale: 1.0 / (d as f32).sqrt() })
    }
    fn q_row(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.tq + i) * self.hq + h) * self.d
    }
    fn k_row(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.tk + j) * self.hkv + g) * self.d
    }
    fn group(&self) -> usize {
        self.hq / self.hkv
    }
    /// Number of keys query `i` may attend to.
    fn visible(&self, i: usize) -> usize {
        i + (self.tk - self.tq) + 1
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scaled scores of query row `qi` against the first `n` keys of kv head `g` of batch `b`.
fn scores(dm: &Dims, q: &[f32], k: &[f32], b: usize, g: usize, n: usize, out: &mut Vec<f32>) {
    out.clear();
    for j in 0..n {
        let kr = dm.k_row(b, j, g);
        out.push(dot(q, &k[kr..kr + dm.d]) * dm.scale);
    }
}

fn log_sum_exp(s: &[f32]) -> f32 {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = s.iter().map(|v| (v - m).exp()).sum();
    m + sum.ln()
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let dm = Dims::new(l1.dims(), l2.dims(), l3.dims())?;
        let mut out = vec![0f32; q.len()];
        // One task per (batch, query position): it owns that position's output for all heads.
        out.par_chunks_mut(dm.hq * dm.d).enumerate().for_each(|(row, o)| {
            let (b, i) = (row / dm.tq, row % dm.tq);
            let n = dm.visible(i);
            let mut s = Vec::with_capacity(n);
            for h in 0..dm.hq {
                let g = h / dm.group();
                let qr = dm.q_row(b, i, h);
                scores(&dm, &q[qr..qr + dm.d], k, b, g, n, &mut s);
                let lse = log_sum_exp(&s);
                let oh = &mut o[h * dm.d..(h + 1) * dm.d];
                for (j, &sj) in s.iter().enumerate() {
                    let p = (sj - lse).exp();
                    let vr = dm.k_row(b, j, g);
                    for (ov, vv) in oh.iter_mut().zip(&v[vr..vr + dm.d]) {
                        *ov += p * vv;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q_t: &Tensor,
        k_t: &Tensor,
        v_t: &Tensor,
        o_t: &Tensor,
        do_t: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::new(q_t.dims(), k_t.dims(), v_t.dims())?;
        let name = self.name();
        let (dq, dk, dv) = with_f32(q_t, name, |q| {
            with_f32(k_t, name, |k| {
                with_f32(v_t, name, |v| {
                    with_f32(o_t, name, |o| with_f32(do_t, name, |dout| Ok(backward(&dm, q, k, v, o, dout))))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dq, q_t.shape(), q_t.device())?),
            Some(Tensor::from_vec(dk, k_t.shape(), k_t.device())?),
            Some(Tensor::from_vec(dv, v_t.shape(), v_t.device())?),
        ))
    }
}

fn backward(dm: &Dims, q: &[f32], k: &[f32], v: &[f32], o: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = dm.d;
    // Per (batch, position, head): the row's log-sum-exp and D = dO·O.
    let n_rows = dm.b * dm.tq * dm.hq;
    let mut lse = vec![0f32; n_rows];
    let mut delta = vec![0f32; n_rows];
    lse.par_chunks_mut(dm.hq).zip(delta.par_chunks_mut(dm.hq)).enumerate().for_each(|(row, (l, dl))| {
        let (b, i) = (row / dm.tq, row % dm.tq);
        let mut s = Vec::new();
        for h in 0..dm.hq {
            let qr = dm.q_row(b, i, h);
            scores(dm, &q[qr..qr + d], k, b, h / dm.group(), dm.visible(i), &mut s);
            l[h] = log_sum_exp(&s);
            dl[h] = dot(&dout[qr..qr + d], &o[qr..qr + d]);
        }
    });
    let stat = |b: usize, i: usize, h: usize| (b * dm.tq + i) * dm.hq + h;

    // dQ_i = scale · Σ_j dS_ij k_j, with dS_ij = P_ij (dO_i·v_j − D_i).
    let mut dq = vec![0f32; q.len()];
    dq.par_chunks_mut(dm.hq * d).enumerate().for_each(|(row, dqr)| {
        let (b, i) = (row / dm.tq, row % dm.tq);
        let mut s = Vec::new();
        for h in 0..dm.hq {
            let g = h / dm.group();
            let qr = dm.q_row(b, i, h);
            scores(dm, &q[qr..qr + d], k, b, g, dm.visible(i), &mut s);
            let (l, dl) = (lse[stat(b, i, h)], delta[stat(b, i, h)]);
            let dqh = &mut dqr[h * d..(h + 1) * d];
            for (j, &sj) in s.iter().enumerate() {
                let kr = dm.k_row(b, j, g);
                let p = (sj - l).exp();
                let ds = p * (dot(&dout[qr..qr + d], &v[kr..kr + d]) - dl) * dm.scale;
                for (a, kv) in dqh.iter_mut().zip(&k[kr..kr + d]) {
                    *a += ds * kv;
                }
            }
        }
    });

    // dK_j, dV_j: one task per (batch, key position) owns that key's rows for all kv heads.
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let off = dm.tk - dm.tq;
    dk.par_chunks_mut(dm.hkv * d)
        .zip(dv.par_chunks_mut(dm.hkv * d))
        .enumerate()
        .for_each(|(row, (dkr, dvr))| {
            let (b, j) = (row / dm.tk, row % dm.tk);
            let first_i = j.saturating_sub(off);
            for g in 0..dm.hkv {
                let kr = dm.k_row(b, j, g);
                let (kj, vj) = (&k[kr..kr + d], &v[kr..kr + d]);
                let dkh = &mut dkr[g * d..(g + 1) * d];
                let dvh = &mut dvr[g * d..(g + 1) * d];
                for h in g * dm.group()..(g + 1) * dm.group() {
                    for i in first_i..dm.tq {
                        let qr = dm.q_row(b, i, h);
                        let (qi, doi) = (&q[qr..qr + d], &dout[qr..qr + d]);
                        let p = (dot(qi, kj) * dm.scale - lse[stat(b, i, h)]).exp();
                        let ds = p * (dot(doi, vj) - delta[stat(b, i, h)]) * dm.scale;
                        for c in 0..d {
                            dkh[c] += ds * qi[c];
                            dvh[c] += p * doi[c];
                        }
                    }
                }
            }
        });
    (dq, dk, dv)
}

/// Causal attention: `q: [b, t_q, h_q, d]`, `k, v: [b, t_k, h_kv, d]` with `h_q % h_kv == 0`
/// and `t_q ≤ t_k`; returns `[b, t_q, h_q, d]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, CausalAttention)
}
