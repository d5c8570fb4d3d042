//! Rotary position embedding in transformers' "rotate half" convention: for `i < d/2`,
//! `y[i] = x[i]·cos − x[i+d/2]·sin` and `y[i+d/2] = x[i+d/2]·cos + x[i]·sin`, with the angle
//! `pos · inv_freq[i]`. The backward is the rotation by the opposite angle.

use super::{f32_slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Precomputed cos/sin for positions `0..max_pos`, `[max_pos, d/2]` each.
#[derive(Debug)]
pub struct RopeTables {
    half: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    /// `inv_freq` has `head_dim / 2` entries (already adjusted for any rope scaling).
    pub fn new(inv_freq: &[f32], max_pos: usize) -> Arc<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in inv_freq {
                // transformers forms the angle as an f32 product, then takes cos/sin of it.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Arc::new(Self { half, max_pos, cos, sin })
    }

    pub fn max_pos(&self) -> usize {
        self.max_pos
    }
}

struct Rope {
    tables: Arc<RopeTables>,
    positions: Positions,
}

enum Positions {
    /// Position of each sequence's first token, the rest following on: one entry for all
    /// sequences, or one per sequence (decoding a batch whose rows sit at different positions).
    Starts(Arc<[usize]>),
    /// One position per token (packed rows, where positions restart at each example).
    PerToken(Arc<[u32]>),
}

impl Rope {
    /// Rotates every `[.., t, h, d]` row; `sign` = 1 forward, −1 for the backward.
    fn apply(&self, x: &[f32], dims: &[usize], sign: f32) -> Result<Vec<f32>> {
        let (t, h, d) = match dims {
            [.., t, h, d] => (*t, *h, *d),
            _ => bail!("rope: expected [.., seq, heads, head_dim], got {dims:?}"),
        };
        let half = self.tables.half;
        if d != 2 * half {
            bail!("rope: head_dim {d} does not match the tables ({})", 2 * half);
        }
        let sequences = x.len() / (t * h * d).max(1);
        let last = match &self.positions {
            Positions::Starts(starts) if starts.len() != 1 && starts.len() != sequences => {
                bail!("rope: {} start positions for {sequences} sequences", starts.len())
            }
            Positions::Starts(starts) => starts.iter().max().copied().unwrap_or(0) + t,
            Positions::PerToken(p) if p.len() != sequences * t => bail!("rope: {} positions for {} tokens", p.len(), sequences * t),
            Positions::PerToken(p) => p.iter().max().map_or(0, |&m| m as usize + 1),
        };
        if last > self.tables.max_pos {
            bail!("rope: position {last} beyond the precomputed {}", self.tables.max_pos);
        }
        let position = |row: usize| match &self.positions {
            Positions::Starts(starts) if starts.len() == 1 => starts[0] + row % t,
            Positions::Starts(starts) => starts[row / t] + row % t,
            Positions::PerToken(p) => p[row] as usize,
        };
        let mut y = super::output_vec(x.len());
        y.par_chunks_mut(h * d).zip(x.par_chunks(h * d)).enumerate().for_each(|(row, (yr, xr))| {
            let pos = position(row);
            let cos = &self.tables.cos[pos * half..(pos + 1) * half];
            let sin = &self.tables.sin[pos * half..(pos + 1) * half];
            for (yh, xh) in yr.chunks_mut(d).zip(xr.chunks(d)) {
                let (x1, x2) = xh.split_at(half);
                let (y1, y2) = yh.split_at_mut(half);
                for i in 0..half {
                    let s = sign * sin[i];
                    y1[i] = x1[i] * cos[i] - x2[i] * s;
                    y2[i] = x2[i] * cos[i] + x1[i] * s;
                }
            }
        });
        Ok(y)
    }
}

/// Rotates `x: [.., t, h, d]` with token `j` of each sequence at position `j`, or at
/// `positions` (one per token, packed rows); `sign = −1` undoes it (the backward).
pub(super) fn rotate(tables: &Arc<RopeTables>, positions: Option<&Arc<[u32]>>, x: &[f32], dims: &[usize], sign: f32) -> Result<Vec<f32>> {
    let positions = match positions {
        Some(p) => Positions::PerToken(p.clone()),
        None => Positions::Starts(Arc::new([0])),
    };
    Rope { tables: tables.clone(), positions }.apply(x, dims, sign)
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let y = self.apply(x, l.shape().dims(), 1.0)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(dy, self.name(), |dy| self.apply(dy, x.dims(), -1.0))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Applies RoPE to `x: [batch, seq, heads, head_dim]`; token `j` has position `pos0 + j`.
pub fn rope(x: &Tensor, tables: &Arc<RopeTables>, pos0: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope { tables: tables.clone(), positions: Positions::Starts(Arc::new([pos0])) })
}

/// RoPE for a batch whose sequences start at different positions: token `j` of sequence `i`
/// has position `starts[i] + j`.
pub fn rope_at(x: &Tensor, tables: &Arc<RopeTables>, starts: &[usize]) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope { tables: tables.clone(), positions: Positions::Starts(starts.into()) })
}

/// RoPE with one position per token: token `j` of sequence `i` has `positions[i·seq + j]`
/// (packed rows, whose positions restart at each example).
pub fn rope_positions(x: &Tensor, tables: &Arc<RopeTables>, positions: &Arc<[u32]>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope { tables: tables.clone(), positions: Positions::PerToken(positions.clone()) })
}
