//! SNELLA's sparse update matrix as one op (`METHODS.md` §2.9): from the tables
//! `P: [H, n, d]`, `Q: [H, m, d]` and the scalars `s = [α, γ, β]`,
//!
//! ```text
//! K0[i, o] = Σ_h c_h‖P_h[i] − Q_h[o]‖,   K = K0 + α·softmax_o(K0/γ) + β,
//! out[i, o] = K·|K| where |K| is above the ρ-quantile of |K|, else 0   (|K| taken as a constant)
//! ```
//!
//! Composed from candle ops, the graph kept ~30 `n×m` tensors per site for the backward (and
//! formed as many again): 18 GB on SmolLM2. Here the forward keeps nothing but its inputs, and
//! the backward recomputes `K` (the same inputs give the same quantile and mask) and walks back
//! through it row by row; the distance gradients are two GEMMs per head:
//! `dP_h = rowsum(W)·P_h − W·Q_h`, `dQ_h = colsum(W)·Q_h − Wᵀ·P_h`, `W = c_h·dK0 / D_h`.

use super::gemm::{matmul_nn, matmul_nt, matmul_tn_scaled};
use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Added under the square root: a finite gradient where two vectors meet.
const DIST_EPS: f32 = 1e-12;

/// The kernel's per-head weight `c_h = 0.1·(−1)^h`.
pub fn head_weight(h: usize) -> f32 {
    if h.is_multiple_of(2) { 0.1 } else { -0.1 }
}

struct Forward {
    /// Per head, the distances `D_h: [n, m]`.
    dist: Vec<Vec<f32>>,
    k0: Vec<f32>,
    soft: Vec<f32>,
    k: Vec<f32>,
    /// Entries kept (above the quantile).
    keep: Vec<bool>,
}

struct DistanceKernel {
    heads: usize,
    n: usize,
    m: usize,
    d: usize,
    /// The share of entries zeroed.
    rho: f64,
}

impl DistanceKernel {
    fn check(&self, p: &[f32], q: &[f32], s: &[f32]) -> Result<()> {
        let (h, n, m, d) = (self.heads, self.n, self.m, self.d);
        if p.len() != h * n * d || q.len() != h * m * d || s.len() != 3 {
            bail!("distance-kernel: P {} (expected {}), Q {} (expected {}), scalars {} (expected 3)", p.len(), h * n * d, q.len(), h * m * d, s.len());
        }
        Ok(())
    }

    fn forward(&self, p: &[f32], q: &[f32], s: &[f32]) -> Forward {
        let (n, m, d) = (self.n, self.m, self.d);
        let (alpha, gamma, beta) = (s[0], s[1], s[2]);
        let mut k0 = vec![0f32; n * m];
        let mut dist = Vec::with_capacity(self.heads);
        for h in 0..self.heads {
            let (ph, qh) = (&p[h * n * d..(h + 1) * n * d], &q[h * m * d..(h + 1) * m * d]);
            let norms = |t: &[f32]| -> Vec<f32> { t.chunks(d).map(|r| r.iter().map(|x| x * x).sum()).collect() };
            let (pn, qn) = (norms(ph), norms(qh));
            let mut g = vec![0f32; n * m];
            matmul_nt(&mut g, ph, qh, n, d, m, false);
            let c = head_weight(h);
            g.par_chunks_mut(m).zip(k0.par_chunks_mut(m)).enumerate().for_each(|(i, (row, k))| {
                for o in 0..m {
                    let dd = ((pn[i] + qn[o] - 2.0 * row[o]).max(0.0) + DIST_EPS).sqrt();
                    row[o] = dd;
                    k[o] += c * dd;
                }
            });
            dist.push(g);
        }
        let mut soft = vec![0f32; n * m];
        let mut k = vec![0f32; n * m];
        soft.par_chunks_mut(m).zip(k.par_chunks_mut(m)).zip(k0.par_chunks(m)).for_each(|((sr, kr), k0r)| {
            let mx = k0r.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v / gamma));
            let mut z = 0f32;
            for (so, &v) in sr.iter_mut().zip(k0r) {
                *so = (v / gamma - mx).exp();
                z += *so;
            }
            for ((so, ko), &v) in sr.iter_mut().zip(kr.iter_mut()).zip(k0r) {
                *so /= z;
                *ko = v + alpha * *so + beta;
            }
        });
        let keep = if self.rho > 0.0 && !k.is_empty() {
            let mut mags: Vec<f32> = k.iter().map(|v| v.abs()).collect();
            let at = ((mags.len() as f64 * self.rho).ceil() as usize).clamp(1, mags.len()) - 1;
            let threshold = *mags.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1;
            k.iter().map(|v| v.abs() > threshold).collect()
        } else {
            vec![true; k.len()]
        };
        Forward { dist, k0, soft, k, keep }
    }
}

impl CustomOp3 for DistanceKernel {
    fn name(&self) -> &'static str {
        "distance-kernel"
    }

    fn cpu_fwd(&self, sp: &CpuStorage, lp: &Layout, sq: &CpuStorage, lq: &Layout, ss: &CpuStorage, ls: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, q, s) = (f32_slice(sp, lp, self.name())?, f32_slice(sq, lq, self.name())?, f32_slice(ss, ls, self.name())?);
        self.check(p, q, s)?;
        let f = self.forward(p, q, s);
        let out: Vec<f32> = f.k.iter().zip(&f.keep).map(|(&v, &keep)| if keep { v * v.abs() } else { 0.0 }).collect();
        Ok((CpuStorage::F32(out), Shape::from((self.n, self.m))))
    }

    fn bwd(&self, p_t: &Tensor, q_t: &Tensor, s_t: &Tensor, _res: &Tensor, dout_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, m, d) = (self.n, self.m, self.d);
        let (dp, dq, ds) = with_f32(p_t, self.name(), |p| {
            with_f32(q_t, self.name(), |q| {
                with_f32(s_t, self.name(), |s| {
                    with_f32(dout_t, self.name(), |dout| {
                        let f = self.forward(p, q, s);
                        let (alpha, gamma) = (s[0], s[1]);
                        // Per row: dK = dout·|K|·keep; through K = K0 + αS + β and the softmax.
                        let mut dk0 = vec![0f32; n * m];
                        let sums: Vec<[f32; 3]> = dk0
                            .par_chunks_mut(m)
                            .enumerate()
                            .map(|(i, dr)| {
                                let r = i * m..(i + 1) * m;
                                let (kr, sr, k0r, keep, dor) = (&f.k[r.clone()], &f.soft[r.clone()], &f.k0[r.clone()], &f.keep[r.clone()], &dout[r]);
                                let (mut d_alpha, mut d_beta, mut d_gamma, mut dot) = (0f32, 0f32, 0f32, 0f32);
                                for o in 0..m {
                                    let dk = if keep[o] { dor[o] * kr[o].abs() } else { 0.0 };
                                    dr[o] = dk;
                                    d_beta += dk;
                                    d_alpha += dk * sr[o];
                                    dot += alpha * dk * sr[o];
                                }
                                for o in 0..m {
                                    // dz = S ⊙ (dS − Σ dS⊙S), dS = α·dK; z = K0/γ.
                                    let dz = sr[o] * (alpha * dr[o] - dot);
                                    dr[o] += dz / gamma;
                                    d_gamma -= dz * k0r[o] / (gamma * gamma);
                                }
                                [d_alpha, d_gamma, d_beta]
                            })
                            .collect();
                        let ds: Vec<f32> = (0..3).map(|j| sums.iter().map(|s| s[j]).sum()).collect();
                        let mut dp = vec![0f32; p.len()];
                        let mut dq = vec![0f32; q.len()];
                        for h in 0..self.heads {
                            let c = head_weight(h);
                            // W = c·dK0 / D.
                            let w: Vec<f32> = dk0.par_iter().zip(f.dist[h].par_iter()).map(|(g, dd)| c * g / dd).collect();
                            let (ph, qh) = (&p[h * n * d..(h + 1) * n * d], &q[h * m * d..(h + 1) * m * d]);
                            let (dph, dqh) = (&mut dp[h * n * d..(h + 1) * n * d], &mut dq[h * m * d..(h + 1) * m * d]);
                            // dP = rowsum(W)·P − W·Q;  dQ = colsum(W)·Q − Wᵀ·P.
                            matmul_nn(dph, &w, qh, n, m, d, false);
                            dph.iter_mut().for_each(|v| *v = -*v);
                            for i in 0..n {
                                let rs: f32 = w[i * m..(i + 1) * m].iter().sum();
                                for j in 0..d {
                                    dph[i * d + j] += rs * ph[i * d + j];
                                }
                            }
                            matmul_tn_scaled(dqh, &w, ph, m, n, d, false, -1.0);
                            let mut cs = vec![0f32; m];
                            for row in w.chunks(m) {
                                cs.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                            }
                            for o in 0..m {
                                for j in 0..d {
                                    dqh[o * d + j] += cs[o] * qh[o * d + j];
                                }
                            }
                        }
                        Ok((dp, dq, ds))
                    })
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dp, p_t.shape(), p_t.device())?),
            Some(Tensor::from_vec(dq, q_t.shape(), q_t.device())?),
            Some(Tensor::from_vec(ds, s_t.shape(), s_t.device())?),
        ))
    }
}

/// SNELLA's `ΔWᵀ: [n, m]` from `p: [H, n, d]`, `q: [H, m, d]`, `scalars = [α, γ, β]`, with the
/// share `rho` of smallest-|K| entries zeroed. Gradients flow to all three inputs.
pub fn distance_kernel(p: &Tensor, q: &Tensor, scalars: &Tensor, rho: f64) -> Result<Tensor> {
    let (heads, n, d) = p.dims3()?;
    let (hq, m, dq) = q.dims3()?;
    if hq != heads || dq != d {
        bail!("distance-kernel: P {:?} and Q {:?} differ in heads or width", p.dims(), q.dims());
    }
    p.contiguous()?.apply_op3(&q.contiguous()?, &scalars.contiguous()?, DistanceKernel { heads, n, m, d, rho })
}
