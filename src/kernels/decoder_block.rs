//! A Llama decoder block's two residual sublayers, each one op for training:
//! `x + o(attention(rope(q(n(x))), rope(k(n(x))), v(n(x))))` and `x + down(swiglu(gate(n(x)),
//! up(n(x))))`, every projection its frozen weight with an optional LoRA branch.
//!
//! Built from one op per step, a block was some twenty autograd nodes, and candle gives every
//! node's input gradient a zero-filled buffer and an addition into it, on the thread that
//! runs the graph while the workers wait: a tenth of a bf16 training step. Here the backward
//! is written out in order, each projection's input gradient summed in place, and the LoRA
//! factors' gradients go to the open gradient sink ([`super::grad_sink`]) instead of through
//! the graph (an op takes at most three tensor inputs). The arithmetic is the unfused ops'
//! own (the same kernel functions), so both paths give the same numbers.
//!
//! Each op keeps what its backward reads: the normed input, the projections' outputs (q and
//! k after RoPE), the attention output, the MLP's gate, up and the gate's sigmoid, and each
//! LoRA branch's rank-r activations.

use super::attention::{self, Shape4};
use super::frozen_weight::FrozenWeight;
use super::lora_linear::Branch;
use super::rope::{self, RopeTables};
use super::{f32_slice, grad_sink, output_vec, rmsnorm, swiglu, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId, Var};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Whether training forwards may fuse their blocks: yes unless `FERROTUNE_FUSED_BLOCK=0`
/// (kept for measuring against the unfused graph).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("FERROTUNE_FUSED_BLOCK").as_deref() != Ok("0"))
}

/// A LoRA branch's trainable factors `A: [r, in]`, `B: [out, r]`, its scaling, and its
/// dropout probability with the seed of its mask.
#[derive(Clone)]
pub struct LoraFactors {
    pub a: Var,
    pub b: Var,
    pub scaling: f32,
    pub dropout: f32,
    pub seed: u64,
}

/// One projection of a block: its frozen weight and bias, and the LoRA branch on it, if any.
pub struct Projection {
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraFactors>,
}

/// A projection with its parameters read out for one forward and backward.
struct Site {
    w: FrozenWeight,
    bias: Option<Vec<f32>>,
    lora: Option<SiteLora>,
}

struct SiteLora {
    ids: (TensorId, TensorId),
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scaling: f32,
    dropout: f32,
    seed: u64,
}

impl Site {
    fn new(p: &Projection, in_f: usize, out_f: usize, name: &str) -> Result<Self> {
        if p.weight.dims() != (out_f, in_f) {
            bail!("{name}: weight {:?} where [{out_f}, {in_f}] was expected", p.weight.dims());
        }
        let bias = match &p.bias {
            Some(b) if b.elem_count() != out_f => bail!("{name}: bias of {} values for {out_f} outputs", b.elem_count()),
            Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let lora = match &p.lora {
            Some(l) => {
                let (r, a_in) = l.a.dims2()?;
                if a_in != in_f || l.b.dims2()? != (out_f, r) {
                    bail!("{name}: LoRA factors A {:?}, B {:?} do not fit [{out_f}, {in_f}]", l.a.dims(), l.b.dims());
                }
                Some(SiteLora {
                    ids: (l.a.as_tensor().id(), l.b.as_tensor().id()),
                    a: l.a.as_tensor().flatten_all()?.to_vec1()?,
                    b: l.b.as_tensor().flatten_all()?.to_vec1()?,
                    r,
                    scaling: l.scaling,
                    dropout: l.dropout,
                    seed: l.seed,
                })
            }
            None => None,
        };
        Ok(Self { w: p.weight.clone(), bias, lora })
    }

    fn branch(&self) -> Option<Branch<'_>> {
        self.lora.as_ref().map(|l| Branch { a: &l.a, b: &l.b, r: l.r, scaling: l.scaling, dropout: l.dropout, seed: l.seed })
    }

    /// The projection of `rows` rows of `x`, and its LoRA branch's rank-r activations.
    fn forward(&self, x: &[f32], rows: usize) -> (Vec<f32>, Option<Vec<f32>>) {
        let out_f = self.w.dims().0;
        let (mut y, rank) = match self.branch() {
            Some(branch) => {
                let (y, h) = branch.forward(&self.w, x, rows);
                (y, Some(h))
            }
            None => {
                let mut y = output_vec(rows * out_f);
                self.w.matmul_t(x, rows, &mut y, false);
                (y, None)
            }
        };
        if let Some(bias) = &self.bias {
            y.par_chunks_mut(out_f).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
        }
        (y, rank)
    }

    /// `dx (+)= ∂L/∂x` from the output gradient `dy`; the LoRA factors' gradients go to the sink.
    #[allow(clippy::too_many_arguments)]
    fn backward(&self, x: &[f32], rows: usize, rank: Option<&[f32]>, dy: &[f32], dx: &mut [f32], accumulate: bool) -> Result<()> {
        match (self.branch(), rank, &self.lora) {
            (Some(branch), Some(h), Some(l)) => {
                let (da, db) = branch.backward(&self.w, x, rows, h, dy, dx, accumulate);
                grad_sink::deliver(l.ids.0, da)?;
                grad_sink::deliver(l.ids.1, db)?;
            }
            (None, _, _) => self.w.matmul(dy, rows, dx, accumulate),
            _ => bail!("fused block: a LoRA site's backward without its forward's activations"),
        }
        Ok(())
    }
}

/// `[b, t, d]` of the residual stream an op received, with its data.
fn stream<'a>(s: &'a CpuStorage, l: &Layout, d: usize, name: &str) -> Result<(&'a [f32], usize, usize)> {
    let x = f32_slice(s, l, name)?;
    match l.dims() {
        &[b, t, dd] if dd == d => Ok((x, b, t)),
        dims => bail!("{name}: input {dims:?} where [batch, seq, {d}] was expected"),
    }
}

/// `x + y`, written into `y`.
fn add_residual(x: &[f32], mut y: Vec<f32>) -> Vec<f32> {
    y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(a, b)| *a += b));
    y
}

struct AttentionSublayer {
    norm: Vec<f32>,
    eps: f32,
    /// q, k, v, o.
    sites: [Site; 4],
    heads: Shape4,
    rope: Arc<RopeTables>,
    positions: Option<Arc<[u32]>>,
    saved: OnceLock<AttentionSaved>,
}

struct AttentionSaved {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    ranks: [Option<Vec<f32>>; 4],
}

impl AttentionSublayer {
    fn shape(&self, b: usize, t: usize) -> Shape4 {
        Shape4 { b, t, ..self.heads }
    }
}

impl CustomOp2 for AttentionSublayer {
    fn name(&self) -> &'static str {
        "fused-attention-sublayer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b, t) = stream(s, l, self.norm.len(), self.name())?;
        let sh = self.shape(b, t);
        let rows = b * t;
        let positions = self.positions.as_ref();
        let h = rmsnorm::forward_rows(x, &self.norm, self.eps);
        let (q, rq) = self.sites[0].forward(&h, rows);
        let (k, rk) = self.sites[1].forward(&h, rows);
        let (v, rv) = self.sites[2].forward(&h, rows);
        let q = rope::rotate(&self.rope, positions, &q, &[b, t, sh.hq, sh.d], 1.0)?;
        let k = rope::rotate(&self.rope, positions, &k, &[b, t, sh.hkv, sh.d], 1.0)?;
        let a = attention::forward_slices(sh, positions.map(|p| &p[..]), &q, &k, &v)?;
        let (o, ro) = self.sites[3].forward(&a, rows);
        let y = add_residual(x, o);
        let _ = self.saved.set(AttentionSaved { h, q, k, v, a, ranks: [rq, rk, rv, ro] });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x_t: &Tensor, _anchor: &Tensor, _res: &Tensor, dy_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(sv) = self.saved.get() else { bail!("{}: backward before the forward", self.name()) };
        let (b, t, d) = x_t.dims3()?;
        let sh = self.shape(b, t);
        let rows = b * t;
        let positions = self.positions.as_ref();
        let rank = |i: usize| sv.ranks[i].as_deref();
        let dx = with_f32(x_t, self.name(), |x| {
            with_f32(dy_t, self.name(), |dy| {
                let mut da = output_vec(rows * sh.hq * sh.d);
                self.sites[3].backward(&sv.a, rows, rank(3), dy, &mut da, false)?;
                let (dq, dk, dv) = attention::backward_slices(sh, positions.map(|p| &p[..]), &sv.q, &sv.k, &sv.v, &sv.a, &da)?;
                drop(da);
                let dq = rope::rotate(&self.rope, positions, &dq, &[b, t, sh.hq, sh.d], -1.0)?;
                let dk = rope::rotate(&self.rope, positions, &dk, &[b, t, sh.hkv, sh.d], -1.0)?;
                let mut dh = output_vec(rows * d);
                self.sites[0].backward(&sv.h, rows, rank(0), &dq, &mut dh, false)?;
                self.sites[1].backward(&sv.h, rows, rank(1), &dk, &mut dh, true)?;
                self.sites[2].backward(&sv.h, rows, rank(2), &dv, &mut dh, true)?;
                Ok(input_gradient(x_t, x, dy, &dh, &self.norm, self.eps))
            })
        })?;
        Ok((dx.map(|dx| Tensor::from_vec(dx, x_t.shape(), x_t.device())).transpose()?, None))
    }
}

struct MlpSublayer {
    norm: Vec<f32>,
    eps: f32,
    /// gate, up, down.
    sites: [Site; 3],
    saved: OnceLock<MlpSaved>,
}

struct MlpSaved {
    h: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// `sigmoid(g)`, kept in place of the product `silu(g) ⊙ u` (rebuilt from it without
    /// exponentials for the down projection's backward).
    s: Vec<f32>,
    ranks: [Option<Vec<f32>>; 3],
}

impl CustomOp2 for MlpSublayer {
    fn name(&self) -> &'static str {
        "fused-mlp-sublayer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b, t) = stream(s, l, self.norm.len(), self.name())?;
        let rows = b * t;
        let h = rmsnorm::forward_rows(x, &self.norm, self.eps);
        let (g, rg) = self.sites[0].forward(&h, rows);
        let (u, ru) = self.sites[1].forward(&h, rows);
        let (m, s) = swiglu::forward_keeping_sigmoid(&g, &u);
        let (o, rd) = self.sites[2].forward(&m, rows);
        drop(m);
        let y = add_residual(x, o);
        let _ = self.saved.set(MlpSaved { h, g, u, s, ranks: [rg, ru, rd] });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x_t: &Tensor, _anchor: &Tensor, _res: &Tensor, dy_t: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(sv) = self.saved.get() else { bail!("{}: backward before the forward", self.name()) };
        let (b, t, d) = x_t.dims3()?;
        let rows = b * t;
        let rank = |i: usize| sv.ranks[i].as_deref();
        let dx = with_f32(x_t, self.name(), |x| {
            with_f32(dy_t, self.name(), |dy| {
                let m = swiglu::product(&sv.g, &sv.u, &sv.s);
                let mut dm = output_vec(m.len());
                self.sites[2].backward(&m, rows, rank(2), dy, &mut dm, false)?;
                drop(m);
                let (dg, du) = swiglu::backward_given(&sv.g, &sv.u, &sv.s, &dm);
                drop(dm);
                let mut dh = output_vec(rows * d);
                self.sites[0].backward(&sv.h, rows, rank(0), &dg, &mut dh, false)?;
                self.sites[1].backward(&sv.h, rows, rank(1), &du, &mut dh, true)?;
                Ok(input_gradient(x_t, x, dy, &dh, &self.norm, self.eps))
            })
        })?;
        Ok((dx.map(|dx| Tensor::from_vec(dx, x_t.shape(), x_t.device())).transpose()?, None))
    }
}

/// `dy + ∂(norm)/∂x · dh` (the residual path and the normed one), or `None` where the input
/// takes no gradient (the first block's, from the frozen embedding).
fn input_gradient(x_t: &Tensor, x: &[f32], dy: &[f32], dh: &[f32], norm: &[f32], eps: f32) -> Option<Vec<f32>> {
    if !x_t.track_op() {
        return None;
    }
    let mut dx = output_vec(dy.len());
    rmsnorm::backward_rows(x, norm, dh, eps, &mut dx, Some(dy));
    Some(dx)
}

/// What the op hangs on in the graph besides `x`: one of its LoRA factors, so that candle
/// records the op (and runs its backward) even where `x` itself takes no gradient; `x` again
/// where the sublayer trains nothing.
fn anchor(x: &Tensor, projections: &[&Projection]) -> Tensor {
    projections.iter().find_map(|p| p.lora.as_ref()).map_or_else(|| x.clone(), |l| l.a.as_tensor().clone())
}

fn norm_weights(norm: &Tensor, d: usize, name: &str) -> Result<Vec<f32>> {
    if norm.elem_count() != d {
        bail!("{name}: norm weight of {} values for width {d}", norm.elem_count());
    }
    norm.flatten_all()?.to_vec1()
}

/// The attention sublayer of a Llama block for `x: [b, t, d]`: `x + o(attention)` with
/// RMSNorm weight `norm`, projections `[q, k, v, o]`, `heads = [h_q, h_kv, head_dim]`, RoPE
/// from `rope` at positions `0..t` (or `positions`, one per token of packed rows).
/// Gradients flow to `x` through the graph and to the LoRA factors through the open
/// gradient sink, which must be open ([`grad_sink::is_open`]).
pub fn attention_sublayer(
    x: &Tensor,
    norm: &Tensor,
    eps: f64,
    projections: [&Projection; 4],
    heads: [usize; 3],
    rope: &Arc<RopeTables>,
    positions: Option<&Arc<[u32]>>,
) -> Result<Tensor> {
    let name = "fused-attention-sublayer";
    let d = x.dim(candle_core::D::Minus1)?;
    let [hq, hkv, hd] = heads;
    let [q, k, v, o] = projections;
    let sites = [Site::new(q, d, hq * hd, name)?, Site::new(k, d, hkv * hd, name)?, Site::new(v, d, hkv * hd, name)?, Site::new(o, hq * hd, d, name)?];
    let op = AttentionSublayer {
        norm: norm_weights(norm, d, name)?,
        eps: eps as f32,
        sites,
        heads: Shape4 { b: 0, t: 0, hq, hkv, d: hd },
        rope: rope.clone(),
        positions: positions.cloned(),
        saved: OnceLock::new(),
    };
    let x = x.contiguous()?;
    x.apply_op2(&anchor(&x, &projections), op)
}

/// The MLP sublayer of a Llama block for `x: [b, t, d]`: `x + down(silu(gate(n(x))) ⊙
/// up(n(x)))` with RMSNorm weight `norm` and projections `[gate, up, down]`; gradients as
/// [`attention_sublayer`].
pub fn mlp_sublayer(x: &Tensor, norm: &Tensor, eps: f64, projections: [&Projection; 3]) -> Result<Tensor> {
    let name = "fused-mlp-sublayer";
    let d = x.dim(candle_core::D::Minus1)?;
    let [gate, up, down] = projections;
    let ff = gate.weight.dims().0;
    let sites = [Site::new(gate, d, ff, name)?, Site::new(up, d, ff, name)?, Site::new(down, ff, d, name)?];
    let op = MlpSublayer { norm: norm_weights(norm, d, name)?, eps: eps as f32, sites, saved: OnceLock::new() };
    let x = x.contiguous()?;
    x.apply_op2(&anchor(&x, &projections), op)
}
