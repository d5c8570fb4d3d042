//! A frozen base weight `[out, in]` (torch Linear layout) kept in the form it was loaded or
//! chosen in: plain f32, or rows of GGUF blocks (BF16, F16, Q8_0, Q4_K, …). The kernels read
//! it through two products only, `x·Wᵀ` (forward) and `g·W` (input gradient), so a
//! quantized weight is never dequantized whole: each product walks it in tiles of rows,
//! dequantizes one tile into a small scratch buffer and runs the GEMM on that tile.
//!
//! Every GGUF type stores a matrix row as whole blocks, so a row is a contiguous byte range
//! and a tile of rows is a slice of the tensor's bytes.

use super::bf16_gemm;
use super::gemm::{matmul_strided, View};
use super::q8_dot::{self, Q8Rows};
use super::skinny::dot_block;
use crate::formats::gguf::quants::{dequantize_into, f32_to_bf16, GgmlType};
use candle_core::{bail, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Tiles hold about this many dequantized elements (256 KB of f32: resident in L2 while the
/// GEMM streams the activations past it).
const TILE_ELEMS: usize = 65536;

/// Up to this many rows of `x`, `x·Wᵀ` takes the dot-product path (decoding a batch).
const SKINNY_ROWS: usize = 32;

/// Weight elements per task of the dot-product path (64 KB of f32: in L2 with room for `x`).
const SKINNY_BLOCK_ELEMS: usize = 16384;

thread_local! {
    /// A worker's dequantized rows in the decoding product, reused from call to call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bf16 kernel bf16 matrices are tiled for, if the CPU has one.
fn tiling_kernel() -> Option<bf16_gemm::Kernel> {
    Some(bf16_gemm::kernel()).filter(|k| *k != bf16_gemm::Kernel::None)
}

#[derive(Clone)]
pub struct FrozenWeight {
    out: usize,
    inp: usize,
    data: Arc<Data>,
}

enum Data {
    F32(Vec<f32>),
    Blocks { ty: GgmlType, bytes: Vec<u8>, row_bytes: usize },
    /// A bf16 matrix on a CPU with a bf16 kernel, held only in the two tiled layouts that
    /// kernel reads: `x·Wᵀ`'s ([`bf16_gemm::pack_transposed`]) and `g·W`'s
    /// ([`bf16_gemm::pack_rows`]). Packing in every product instead cost a bf16 training step
    /// about 15% (the packing itself, and page faults on the fresh 56 MB buffers of the LM
    /// head), for twice the bytes of plain bf16 here.
    Bf16Tiles { kernel: bf16_gemm::Kernel, forward: Vec<u16>, backward: Vec<u16> },
}

impl std::fmt::Debug for FrozenWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrozenWeight[{}, {}; {}]", self.out, self.inp, self.dtype_name())
    }
}

impl FrozenWeight {
    pub fn from_f32(data: Vec<f32>, out: usize, inp: usize) -> Result<Self> {
        if data.len() != out * inp {
            bail!("frozen weight: {} values for a [{out}, {inp}] matrix", data.len());
        }
        Ok(Self { out, inp, data: Arc::new(Data::F32(data)) })
    }

    /// From a 2-D f32 tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (out, inp) = t.dims2()?;
        Self::from_f32(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?, out, inp)
    }

    /// From GGUF block bytes: `out` rows of `inp` elements each, rows stored one after another.
    pub fn from_blocks(ty: GgmlType, bytes: Vec<u8>, out: usize, inp: usize) -> Result<Self> {
        if !ty.can_dequantize() {
            bail!("frozen weight: {ty} blocks cannot be dequantized");
        }
        let Some(row_bytes) = ty.bytes_for(inp) else {
            bail!("frozen weight: rows of {inp} elements are not whole {ty} blocks of {}", ty.block_size());
        };
        if bytes.len() != out * row_bytes {
            bail!("frozen weight: {} bytes for [{out}, {inp}] {ty} (expected {})", bytes.len(), out * row_bytes);
        }
        if ty == GgmlType::F32 {
            let v = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            return Self::from_f32(v, out, inp);
        }
        if let (GgmlType::BF16, Some(kernel)) = (ty, tiling_kernel()) {
            let values: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            drop(bytes);
            let forward = bf16_gemm::pack_transposed(&values, out, inp).0;
            let backward = bf16_gemm::pack_rows(&values, out, inp).0;
            return Ok(Self { out, inp, data: Arc::new(Data::Bf16Tiles { kernel, forward, backward }) });
        }
        Ok(Self { out, inp, data: Arc::new(Data::Blocks { ty, bytes, row_bytes }) })
    }

    /// Bytes a bf16 frozen matrix `[out, inp]` takes: its two tiled layouts, each padded to
    /// whole tiles, where the CPU has a bf16 kernel ([`Data::Bf16Tiles`]), else 2 a value.
    /// What the memory estimate counts.
    pub fn bf16_storage_bytes(out: usize, inp: usize) -> u64 {
        if tiling_kernel().is_none() {
            return 2 * (out * inp) as u64;
        }
        let (k_fwd, n_fwd) = bf16_gemm::padded(inp, out);
        let (k_bwd, n_bwd) = bf16_gemm::padded(out, inp);
        2 * (k_fwd * n_fwd + k_bwd * n_bwd) as u64
    }

    /// The same weight rounded to bf16 (round to nearest even), for the bf16 path.
    pub fn to_bf16(&self) -> Result<Self> {
        // The f32 copy goes before the bytes are tiled: at most 6 bytes a value exist at once
        // (the memory estimate's load peak counts them).
        let bytes = self.to_f32_vec().iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect();
        Self::from_blocks(GgmlType::BF16, bytes, self.out, self.inp)
    }

    /// A bf16 weight's tiles, where the CPU has a bf16 kernel: the products then round their
    /// other operand to bf16 too (as PyTorch's bf16 autocast does) and run on that kernel,
    /// accumulating in f32.
    fn bf16_tiles(&self) -> Option<(bf16_gemm::Kernel, &[u16], &[u16])> {
        match &*self.data {
            Data::Bf16Tiles { kernel, forward, backward } => Some((*kernel, forward, backward)),
            _ => None,
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Storage type: `F32`, `BF16`, `Q4_1`, …
    pub fn dtype_name(&self) -> &'static str {
        match &*self.data {
            Data::F32(_) => "F32",
            Data::Blocks { ty, .. } => ty.name(),
            Data::Bf16Tiles { .. } => GgmlType::BF16.name(),
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn storage_bytes(&self) -> usize {
        match &*self.data {
            Data::F32(v) => v.len() * 4,
            Data::Blocks { bytes, .. } => bytes.len(),
            Data::Bf16Tiles { forward, backward, .. } => 2 * (forward.len() + backward.len()),
        }
    }

    /// Rows `r0..r0 + out.len() / in`, dequantized into `out`.
    pub fn rows_into(&self, r0: usize, out: &mut [f32]) {
        let n_rows = out.len() / self.inp.max(1);
        assert!(r0 + n_rows <= self.out && out.len() == n_rows * self.inp, "frozen weight: rows out of range");
        match &*self.data {
            Data::F32(v) => out.copy_from_slice(&v[r0 * self.inp..(r0 + n_rows) * self.inp]),
            Data::Blocks { ty, bytes, row_bytes } => {
                // Small chunks of rows in parallel: generation (one token) spends most of its
                // time here.
                let rows_per_task = (4096 / self.inp).max(1);
                out.par_chunks_mut(rows_per_task * self.inp).enumerate().for_each(|(c, o)| {
                    let first = r0 + c * rows_per_task;
                    let n = o.len() / self.inp;
                    let src = &bytes[first * row_bytes..(first + n) * row_bytes];
                    dequantize_into(*ty, src, o).expect("sizes were checked at construction");
                });
            }
            Data::Bf16Tiles { forward, .. } => {
                let k_pad = bf16_gemm::padded(self.inp, self.out).0;
                out.par_chunks_mut(self.inp).enumerate().for_each(|(r, o)| bf16_gemm::unpack_transposed_row(forward, r0 + r, k_pad, o));
            }
        }
    }

    /// The whole matrix in f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.out * self.inp];
        self.rows_into(0, &mut v);
        v
    }

    /// The whole matrix as an f32 tensor (merging, exports, checks).
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_f32_vec(), (self.out, self.inp), &Device::Cpu)
    }

    /// Calls `f(first_row, rows, tile)` for consecutive tiles of rows covering the matrix, each
    /// in f32 with `patch` added. An unpatched f32 matrix is one tile, read in place; otherwise
    /// tiles are dequantized (or copied) one at a time into one reused scratch buffer.
    fn for_each_tile(&self, patch: Option<&RowPatch>, mut f: impl FnMut(usize, usize, &[f32])) {
        let (out, inp) = (self.out, self.inp);
        if let (Data::F32(w), None) = (&*self.data, patch) {
            return f(0, out, w);
        }
        let tile = (TILE_ELEMS / inp.max(1)).clamp(16, 1024);
        let mut scratch = vec![0f32; tile.min(out) * inp];
        for r0 in (0..out).step_by(tile) {
            let n = tile.min(out - r0);
            let w = &mut scratch[..n * inp];
            self.rows_into(r0, w);
            if let Some(p) = patch {
                p.add_to_rows(r0, inp, w);
            }
            f(r0, n, w);
        }
    }

    /// `y[m, out] (+)= x[m, in] · Wᵀ`.
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        self.matmul_t_patched(x, m, y, accumulate, None)
    }

    /// `y[m, out] (+)= x[m, in] · (W + P)ᵀ` for a sparse change `P` of the weight, added to each
    /// tile as it is formed (the sum is never held whole).
    pub fn matmul_t_patched(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool, patch: Option<&RowPatch>) {
        let (out, inp) = (self.out, self.inp);
        assert!(x.len() == m * inp && y.len() == m * out, "frozen weight: x·Wᵀ operand sizes");
        if let Some(p) = patch {
            p.check(out, inp);
        }
        if m <= SKINNY_ROWS {
            return self.matmul_t_skinny(x, m, y, accumulate, patch);
        }
        if let (None, Some((kernel, b, _))) = (patch, self.bf16_tiles()) {
            let (k_pad, n_pad) = bf16_gemm::padded(inp, out);
            let a = bf16_gemm::round_rows(x, m, inp, inp, k_pad);
            return bf16_gemm::gemm(kernel, &bf16_gemm::Operands { a: &a, b, m, n: out, k_pad, n_pad }, y, out, accumulate);
        }
        self.for_each_tile(patch, |r0, n, w| {
            // y[:, r0..r0+n] (+)= x · w_tileᵀ
            matmul_strided(y, View::rows(r0, out), x, View::rows(0, inp), w, View::rows(0, inp).t(), m, inp, n, accumulate, 1.0);
        });
    }

    /// [`FrozenWeight::matmul_t`] for a few rows of `x` (decoding): one parallel pass over
    /// blocks of weight rows, each dequantized into a small per-task buffer and dotted with
    /// every row of `x` while it is in cache. Inside [`q8_dot::with_int8_activations`]
    /// (generation), rows of the types [`q8_dot::supports`] are instead multiplied in their
    /// blocks with `x` quantized to int8.
    fn matmul_t_skinny(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool, patch: Option<&RowPatch>) {
        let (out, inp) = (self.out, self.inp);
        let x8 = match (&*self.data, patch) {
            (Data::Blocks { ty, .. }, None) if q8_dot::enabled() && q8_dot::supports(*ty, inp) => Some(Q8Rows::quantize(x, m, inp)),
            _ => None,
        };
        // The int8 products read a quarter (Q8_0) to an eighth (Q4) of the bytes per value:
        // tasks of four times the values keep a task's weight bytes about the same.
        let per_task = if x8.is_some() { 4 * SKINNY_BLOCK_ELEMS } else { SKINNY_BLOCK_ELEMS };
        let rows = (per_task / inp.max(1)).clamp(1, out.max(1));
        let blocks: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(rows))
            .into_par_iter()
            .map(|bi| {
                let (r0, n) = (bi * rows, rows.min(out - bi * rows));
                let mut o = vec![0f32; m * n];
                match (&*self.data, patch, &x8) {
                    (Data::F32(w), None, _) => dot_block(x, m, &w[r0 * inp..(r0 + n) * inp], n, inp, &mut o),
                    (Data::Blocks { ty, bytes, row_bytes }, _, Some(x8)) => {
                        q8_dot::dot_rows(*ty, &bytes[r0 * row_bytes..(r0 + n) * row_bytes], *row_bytes, n, x8, &mut o)
                    }
                    (data, patch, _) => SCRATCH.with(|scratch| {
                        // Each worker reuses its buffer: a fresh zeroed one per block of rows
                        // cost a decoding step 6% in memset alone. Every value is overwritten.
                        let mut scratch = scratch.borrow_mut();
                        if scratch.len() < n * inp {
                            scratch.resize(n * inp, 0.0);
                        }
                        let w = &mut scratch[..n * inp];
                        match data {
                            Data::F32(full) => w.copy_from_slice(&full[r0 * inp..(r0 + n) * inp]),
                            Data::Blocks { ty, bytes, row_bytes } => {
                                dequantize_into(*ty, &bytes[r0 * row_bytes..(r0 + n) * row_bytes], w).expect("sizes were checked at construction")
                            }
                            Data::Bf16Tiles { forward, .. } => {
                                let k_pad = bf16_gemm::padded(inp, out).0;
                                w.chunks_exact_mut(inp).enumerate().for_each(|(r, row)| bf16_gemm::unpack_transposed_row(forward, r0 + r, k_pad, row));
                            }
                        }
                        if let Some(p) = patch {
                            p.add_to_rows(r0, inp, w);
                        }
                        dot_block(x, m, w, n, inp, &mut o);
                    }),
                }
                (r0, o)
            })
            .collect();
        for (r0, o) in blocks {
            let n = o.len() / m.max(1);
            for i in 0..m {
                let dst = &mut y[i * out + r0..i * out + r0 + n];
                let src = &o[i * n..(i + 1) * n];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
    }

    /// `dx[m, in] (+)= g[m, out] · W`.
    pub fn matmul(&self, g: &[f32], m: usize, dx: &mut [f32], accumulate: bool) {
        self.matmul_patched(g, m, dx, accumulate, None)
    }

    /// `dx[m, in] (+)= g[m, out] · (W + P)` for a sparse change `P` of the weight.
    pub fn matmul_patched(&self, g: &[f32], m: usize, dx: &mut [f32], accumulate: bool, patch: Option<&RowPatch>) {
        let (out, inp) = (self.out, self.inp);
        assert!(g.len() == m * out && dx.len() == m * inp, "frozen weight: g·W operand sizes");
        if let Some(p) = patch {
            p.check(out, inp);
        }
        if let (true, None, Some((kernel, _, b))) = (m > SKINNY_ROWS, patch, self.bf16_tiles()) {
            let (k_pad, n_pad) = bf16_gemm::padded(out, inp);
            let a = bf16_gemm::round_rows(g, m, out, out, k_pad);
            return bf16_gemm::gemm(kernel, &bf16_gemm::Operands { a: &a, b, m, n: inp, k_pad, n_pad }, dx, inp, accumulate);
        }
        self.for_each_tile(patch, |r0, n, w| {
            // dx (+)= g[:, r0..r0+n] · w_tile; every tile after the first adds to the previous ones.
            matmul_strided(dx, View::rows(0, inp), g, View::rows(r0, out), w, View::rows(0, inp), m, n, inp, accumulate || r0 > 0, 1.0);
        });
    }
}

/// A sparse change of a matrix `[out, in]`, row by row (CSR): entry `e` of row `r` (for `e` in
/// `row_ptr[r]..row_ptr[r + 1]`) adds `values[e]` at column `cols[e]`.
#[derive(Debug, Clone, Copy)]
pub struct RowPatch<'a> {
    pub row_ptr: &'a [u32],
    pub cols: &'a [u32],
    pub values: &'a [f32],
}

impl RowPatch<'_> {
    fn check(&self, out: usize, inp: usize) {
        assert!(
            self.row_ptr.len() == out + 1
                && self.cols.len() == self.values.len()
                && self.row_ptr[out] as usize == self.values.len()
                && self.cols.iter().all(|&c| (c as usize) < inp),
            "sparse patch: does not fit a [{out}, {inp}] matrix"
        );
    }

    /// Adds the entries of rows `r0..` to `tile`, which holds those rows (`inp` wide).
    fn add_to_rows(&self, r0: usize, inp: usize, tile: &mut [f32]) {
        let n = tile.len() / inp.max(1);
        for r in 0..n {
            let (a, b) = (self.row_ptr[r0 + r] as usize, self.row_ptr[r0 + r + 1] as usize);
            let row = &mut tile[r * inp..(r + 1) * inp];
            for (&c, &v) in self.cols[a..b].iter().zip(&self.values[a..b]) {
                row[c as usize] += v;
            }
        }
    }
}
