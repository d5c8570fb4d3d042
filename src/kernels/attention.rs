//! Causal scaled-dot-product attention with grouped-query heads, on `[batch, seq, heads, dim]`
//! tensors (the layout the projections produce, so no transposes are needed).
//!
//! Queries may be fewer than keys (decoding with a KV cache): query `i` sits at position
//! `i + (t_k − t_q)` and sees keys `0..=` that position. Each (batch, head) is one task made of
//! GEMMs on strided views, one block of [`ROW_BLOCK`] query rows at a time: `S = Q·Kᵀ` over the
//! keys the block sees, masked softmax, `O = P·V`. The forward keeps only its output; the
//! backward recomputes each block's `P` from q and k (as flash attention does). A task holds
//! one block's `ROW_BLOCK × t_k` scores (and, in the backward, their gradients), never a
//! `t × t` square: attention's memory grows linearly with the sequence.
//!
//! Packed rows (several examples in one sequence, `sample_packing`) give each token its
//! position inside its own example; a query then sees only the keys of its example, from
//! `i − position(i)` to `i`. A block's products start at its first row's example, so short
//! packed examples also cost less than one long sequence.

use super::vexp::{exp_sub, lane_max, lane_sum};
use super::gemm::{matmul_view, View};
use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

struct CausalAttention {
    /// Per token of `[b, t]`, its position inside its packed example (`None`: one example a row).
    positions: Option<Arc<[u32]>>,
}

/// Query rows per causal block (a 256-token sequence then computes 5/8 of the full square).
pub const ROW_BLOCK: usize = 64;

#[derive(Clone, Copy)]
struct Dims<'a> {
    positions: Option<&'a [u32]>,
    b: usize,
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    scale: f32,
}

/// Rows `i0..i1` of a causal block, and the keys `k0..keys` its rows see between them.
#[derive(Clone, Copy)]
struct Block {
    i0: usize,
    i1: usize,
    k0: usize,
    keys: usize,
}

impl Block {
    fn rows(&self) -> usize {
        self.i1 - self.i0
    }
    fn width(&self) -> usize {
        self.keys - self.k0
    }
}

impl<'a> Dims<'a> {
    fn new(q: &[usize], k: &[usize], v: &[usize], positions: Option<&'a [u32]>) -> Result<Self> {
        let (&[b, tq, hq, d], &[bk, tk, hkv, dk]) = (q, k) else {
            bail!("attention: expected 4-d q/k, got {q:?} {k:?}");
        };
        if k != v || b != bk || d != dk || hkv == 0 || hq % hkv != 0 || tq > tk {
            bail!("attention: incompatible shapes q {q:?} k {k:?} v {v:?}");
        }
        if let Some(p) = positions {
            if tq != tk || p.len() != b * tq {
                bail!("attention: {} packed positions for q {q:?} and k {k:?} (expected one per token, and no cache)", p.len());
            }
            if let Some((at, _)) = p.iter().enumerate().find(|&(at, &pos)| pos as usize > at % tq) {
                bail!("attention: token {} of row {} has position {}, past its own index", at % tq, at / tq, p[at]);
            }
        }
        Ok(Self { positions, b, tq, tk, hq, hkv, d, scale: 1.0 / (d as f32).sqrt() })
    }
    /// Rows of head `h` of batch `b` in a `[b, t_q, h_q, d]` tensor.
    fn q_view(&self, b: usize, h: usize) -> View {
        View::rows((b * self.tq * self.hq + h) * self.d, self.hq * self.d)
    }
    /// Rows of kv head `g` of batch `b` in a `[b, t_k, h_kv, d]` tensor.
    fn k_view(&self, b: usize, g: usize) -> View {
        View::rows((b * self.tk * self.hkv + g) * self.d, self.hkv * self.d)
    }
    fn group(&self) -> usize {
        self.hq / self.hkv
    }
    /// Query rows of batch row `b` in blocks of [`ROW_BLOCK`], each with the keys its rows see:
    /// from its first row's first key to its last row's last. Products over a block stay
    /// inside those, so the masked upper triangle (and, packed, the earlier examples) is
    /// (mostly) never computed.
    fn row_blocks(&self, b: usize) -> impl Iterator<Item = Block> + '_ {
        (0..self.tq).step_by(ROW_BLOCK).map(move |i0| {
            let i1 = (i0 + ROW_BLOCK).min(self.tq);
            Block { i0, i1, k0: self.first_key(b, i0), keys: self.visible(i1 - 1) }
        })
    }
    /// Number of keys query `i` may attend to: the end of its visible range.
    fn visible(&self, i: usize) -> usize {
        i + (self.tk - self.tq) + 1
    }
    /// The first key query `i` of batch row `b` may attend to: its packed example's start.
    fn first_key(&self, b: usize, i: usize) -> usize {
        self.positions.map_or(0, |p| i - p[b * self.tq + i] as usize)
    }
}

/// The rows of a `[b, t_q, h_q, d]` tensor's head `h` in block `blk`.
fn block_rows(dm: &Dims, b: usize, h: usize, blk: Block) -> View {
    let qv = dm.q_view(b, h);
    View::rows(qv.offset + blk.i0 * qv.row_stride, qv.row_stride)
}

/// The keys (or values) of kv head `g` that block `blk` sees, from its first.
fn block_keys(dm: &Dims, b: usize, g: usize, blk: Block) -> View {
    let kv = dm.k_view(b, g);
    View::rows(kv.offset + blk.k0 * kv.row_stride, kv.row_stride)
}

/// Block `blk`'s rows of `P = softmax(scale · Q_h K_gᵀ)` with the causal (and packed-example)
/// mask, over the keys it sees, into `p` (`rows × width`, row-major, zero where masked).
/// Attention is computed one such block at a time, so no task ever holds more than
/// [`ROW_BLOCK`] rows of scores: memory linear in the sequence length.
fn block_probabilities(dm: &Dims, q: &[f32], k: &[f32], b: usize, h: usize, blk: Block, p: &mut [f32]) {
    let w = blk.width();
    let (qb, kb) = (block_rows(dm, b, h, blk), block_keys(dm, b, h / dm.group(), blk));
    matmul_view(p, View::rows(0, w), q, qb, k, kb.t(), blk.rows(), dm.d, w, false, dm.scale);
    for (r, row) in p.chunks_mut(w).take(blk.rows()).enumerate() {
        let i = blk.i0 + r;
        let (lo, hi) = (dm.first_key(b, i) - blk.k0, dm.visible(i) - blk.k0);
        row[..lo].fill(0.0);
        let live = &mut row[lo..hi];
        exp_sub(live, lane_max(live));
        let inv = (1.0 / lane_sum(live)) as f32;
        live.iter_mut().for_each(|v| *v *= inv);
        row[hi..].fill(0.0);
    }
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
        let dm = Dims::new(l1.dims(), l2.dims(), l3.dims(), self.positions.as_deref())?;
        Ok((CpuStorage::F32(forward(&dm, q, k, v)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q_t: &Tensor,
        k_t: &Tensor,
        v_t: &Tensor,
        o_t: &Tensor,
        do_t: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::new(q_t.dims(), k_t.dims(), v_t.dims(), self.positions.as_deref())?;
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

fn forward(dm: &Dims, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let d = dm.d;
    let work = tasks(dm, super::threads());
    let outs: Vec<Vec<f32>> = work
        .par_iter()
        .map(|task| {
            let (b, h) = (task.b, task.h);
            let mut p = vec![0f32; ROW_BLOCK.min(dm.tq) * dm.tk];
            let mut o = vec![0f32; (task.i1() - task.i0()) * d];
            for &blk in &task.blocks {
                block_probabilities(dm, q, k, b, h, blk, &mut p);
                let vb = block_keys(dm, b, h / dm.group(), blk);
                let rows = View::rows((blk.i0 - task.i0()) * d, d);
                matmul_view(&mut o, rows, &p, View::rows(0, blk.width()), v, vb, blk.rows(), blk.width(), d, false, 1.0);
            }
            o
        })
        .collect();
    gather_rows(dm, &work, |t| &outs[t])
}

/// Query, key and value shapes `[b, t, h_q, d]`, `[b, t, h_kv, d]` of a training forward (no
/// cache), for the slice entry points the fused decoder block uses.
#[derive(Clone, Copy)]
pub(super) struct Shape4 {
    pub b: usize,
    pub t: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

impl Shape4 {
    fn dims<'a>(&self, positions: Option<&'a [u32]>) -> Result<Dims<'a>> {
        let Shape4 { b, t, hq, hkv, d } = *self;
        Dims::new(&[b, t, hq, d], &[b, t, hkv, d], &[b, t, hkv, d], positions)
    }
}

/// [`causal_attention`] (or, with `positions`, [`packed_causal_attention`]) on slices.
pub(super) fn forward_slices(s: Shape4, positions: Option<&[u32]>, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
    Ok(forward(&s.dims(positions)?, q, k, v))
}

/// Its backward: `(dq, dk, dv)` from the output `o` and its gradient `dout`.
pub(super) fn backward_slices(s: Shape4, positions: Option<&[u32]>, q: &[f32], k: &[f32], v: &[f32], o: &[f32], dout: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    Ok(backward(&s.dims(positions)?, q, k, v, o, dout))
}

/// One task of the attention: head `h` of batch row `b`, over a run of its row blocks.
struct Task {
    b: usize,
    h: usize,
    blocks: Vec<Block>,
}

impl Task {
    fn i0(&self) -> usize {
        self.blocks[0].i0
    }
    fn i1(&self) -> usize {
        self.blocks[self.blocks.len() - 1].i1
    }
    /// The keys its rows see: from its first block's first to its last block's last.
    fn keys(&self) -> std::ops::Range<usize> {
        self.blocks[0].k0..self.blocks[self.blocks.len() - 1].keys
    }
}

/// The work as tasks: each (batch row, query head), and where those are too few to keep every
/// thread busy (one sequence of 9 heads on 2 threads leaves one idle a ninth of the time, and
/// the backward's 3 key-value groups a third), each further cut into runs of row blocks of
/// about equal cost (a causal block costs its rows times the keys it sees).
fn tasks(dm: &Dims, threads: usize) -> Vec<Task> {
    let heads = dm.b * dm.hq;
    let parts = (4 * threads).div_ceil(heads.max(1)).max(1);
    let mut out = Vec::new();
    for b in 0..dm.b {
        let blocks: Vec<Block> = dm.row_blocks(b).collect();
        let total: usize = blocks.iter().map(|k| k.rows() * k.width()).sum();
        for h in 0..dm.hq {
            let (mut run, mut done, mut part) = (Vec::new(), 0, 1);
            for &blk in &blocks {
                run.push(blk);
                done += blk.rows() * blk.width();
                if done * parts >= total * part && part < parts {
                    out.push(Task { b, h, blocks: std::mem::take(&mut run) });
                    part += 1;
                }
            }
            if !run.is_empty() {
                out.push(Task { b, h, blocks: run });
            }
        }
    }
    out
}

/// The tasks' `[rows, d]` results (`part(t)` for task `t`) in `[b, t_q, h_q, d]` order,
/// one token row of all heads per job: a token row holds rows of several tasks, so the
/// tasks cannot write their own (gathering on one thread was 2% of a 2048-token step).
fn gather_rows<'a>(dm: &Dims, work: &[Task], part: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<f32> {
    let (d, hq) = (dm.d, dm.hq);
    let mut by_head: Vec<Vec<usize>> = vec![Vec::new(); dm.b * hq];
    for (ti, task) in work.iter().enumerate() {
        by_head[task.b * hq + task.h].push(ti);
    }
    let mut out = super::output_vec(dm.b * dm.tq * hq * d);
    out.par_chunks_mut(hq * d).enumerate().for_each(|(row, dst)| {
        let (b, i) = (row / dm.tq, row % dm.tq);
        for (h, dst) in dst.chunks_exact_mut(d).enumerate() {
            // Every row of every head belongs to exactly one task.
            let ti = by_head[b * hq + h].iter().copied().find(|&ti| (work[ti].i0()..work[ti].i1()).contains(&i)).expect("tasks cover every row");
            let r = i - work[ti].i0();
            dst.copy_from_slice(&part(ti)[r * d..(r + 1) * d]);
        }
    });
    out
}

/// The sum of the tasks' shares of a key gradient (`share(t)` for task `t`, over its keys) in
/// `[b, t_k, h_kv, d]` order, each key row's shares added in task order (so the result does
/// not depend on scheduling), one token row per job.
fn sum_key_shares<'a>(dm: &Dims, work: &[Task], share: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<f32> {
    let (d, hkv) = (dm.d, dm.hkv);
    let mut by_group: Vec<Vec<usize>> = vec![Vec::new(); dm.b * hkv];
    for (ti, task) in work.iter().enumerate() {
        by_group[task.b * hkv + task.h / dm.group()].push(ti);
    }
    let mut out = vec![0f32; dm.b * dm.tk * hkv * d];
    out.par_chunks_mut(hkv * d).enumerate().for_each(|(row, dst)| {
        let (b, j) = (row / dm.tk, row % dm.tk);
        for (g, dst) in dst.chunks_exact_mut(d).enumerate() {
            for &ti in &by_group[b * hkv + g] {
                let keys = work[ti].keys();
                if keys.contains(&j) {
                    let r = j - keys.start;
                    dst.iter_mut().zip(&share(ti)[r * d..(r + 1) * d]).for_each(|(a, b)| *a += b);
                }
            }
        }
    });
    out
}

/// A task's gradients: dQ of its rows, and its share of dK and dV over the keys it saw (the
/// shares of a key-value head's tasks are summed afterwards).
struct TaskGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Values the backward's tasks hold in their shares of dK and dV until they are summed, for
/// `b` sequences of `t` tokens on `threads` threads (the memory estimate counts them).
pub fn backward_share_floats(b: usize, t: usize, hq: usize, hkv: usize, d: usize, threads: usize) -> usize {
    match Dims::new(&[b, t, hq, d], &[b, t, hkv, d], &[b, t, hkv, d], None) {
        Ok(dm) if t > 0 => tasks(&dm, threads).iter().map(|task| 2 * task.keys().len() * d).sum(),
        _ => 0,
    }
}

fn backward(dm: &Dims, q: &[f32], k: &[f32], v: &[f32], o: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (tq, tk, d) = (dm.tq, dm.tk, dm.d);
    let work = tasks(dm, super::threads());
    let grads: Vec<TaskGrads> = work
        .par_iter()
        .map(|task| {
            let (b, h, g) = (task.b, task.h, task.h / dm.group());
            let (i0, keys) = (task.i0(), task.keys());
            let mut dk = vec![0f32; keys.len() * d];
            let mut dv = vec![0f32; keys.len() * d];
            let mut dq = vec![0f32; (task.i1() - i0) * d];
            // One row block's probabilities and score gradients, reused block after block.
            let mut p = vec![0f32; ROW_BLOCK.min(tq) * tk];
            let mut ds = vec![0f32; ROW_BLOCK.min(tq) * tk];
            let qv = dm.q_view(b, h);
            for &blk in &task.blocks {
                let (rows, w) = (blk.rows(), blk.width());
                block_probabilities(dm, q, k, b, h, blk, &mut p);
                let (qb, kb) = (block_rows(dm, b, h, blk), block_keys(dm, b, g, blk));
                let seen = View::rows((blk.k0 - keys.start) * d, d);
                // dV[seen] += P[blk]ᵀ·dO[blk]
                matmul_view(&mut dv, seen, &p, View::rows(0, w).t(), dout, qb, w, rows, d, true, 1.0);
                // dP[blk] = dO[blk]·V[seen]ᵀ
                matmul_view(&mut ds, View::rows(0, w), dout, qb, v, kb.t(), rows, d, w, false, 1.0);
                // dS = P ⊙ (dP − rowsum(dO ⊙ O)), pre-scaled (zero where P is masked).
                for r in 0..rows {
                    let at = qv.offset + (blk.i0 + r) * qv.row_stride;
                    let delta: f32 = dout[at..at + d].iter().zip(&o[at..at + d]).map(|(a, b)| a * b).sum();
                    for (s, &pv) in ds[r * w..(r + 1) * w].iter_mut().zip(&p[r * w..(r + 1) * w]) {
                        *s = pv * (*s - delta) * dm.scale;
                    }
                }
                // dQ[blk] = dS·K[seen], dK[seen] += dSᵀ·Q[blk]
                matmul_view(&mut dq, View::rows((blk.i0 - i0) * d, d), &ds, View::rows(0, w), k, kb, rows, w, d, false, 1.0);
                matmul_view(&mut dk, seen, &ds, View::rows(0, w).t(), q, qb, w, rows, d, true, 1.0);
            }
            TaskGrads { dq, dk, dv }
        })
        .collect();
    let dq = gather_rows(dm, &work, |t| &grads[t].dq);
    let dk = sum_key_shares(dm, &work, |t| &grads[t].dk);
    let dv = sum_key_shares(dm, &work, |t| &grads[t].dv);
    debug_assert!(dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len());
    (dq, dk, dv)
}

/// Causal attention: `q: [b, t_q, h_q, d]`, `k, v: [b, t_k, h_kv, d]` with `h_q % h_kv == 0`
/// and `t_q ≤ t_k`; returns `[b, t_q, h_q, d]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, CausalAttention { positions: None })
}

/// Causal attention over packed rows: `positions[b·t + i]` is token `i`'s position inside its
/// own example of row `b`, and it sees only that example's keys (`t_q = t_k`, no cache).
pub fn packed_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, positions: &Arc<[u32]>) -> Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, CausalAttention { positions: Some(positions.clone()) })
}
