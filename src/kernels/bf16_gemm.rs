//! bf16 matrix products with f32 accumulation, for the frozen-weight products of a bf16 base:
//! `C[m, n] (+)= A[m, k] · B[k, n]` with `A` (activations or gradients) rounded to bf16 and `B`
//! (the weight) in bf16, packed in the pair-interleaved ("VNNI") layout both instructions read
//! (`B[2p][j]` and `B[2p + 1][j]` side by side).
//!
//! Both operands are stored tile by tile, each tile's 1 KB contiguous: `A` in tiles of 16 rows
//! by 32 values of `k`, `B` in tiles of 16 pairs of `k` by 16 columns ([`a_index`],
//! [`b_index`]). A tile load then reads one contiguous block instead of 16 rows strided across
//! the matrix, which is what kept the first version waiting on memory.
//!
//! Two instruction paths, chosen at run time:
//! - AMX (`tdpbf16ps` on 16×32 by 32×16 tiles into 16×16 f32 tiles), after Linux grants the
//!   process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! - AVX-512 BF16 (`vdpbf16ps`: 16 f32 lanes, each adding the dot product of a bf16 pair).
//!
//! Without either, callers keep their f32 path ([`kernel`] says `None`). [`reference`] computes
//! the same product in scalar code in the instructions' own order of operations, so the packing
//! and the arithmetic are tested on every machine and the instructions where the CPU has them.

use rayon::prelude::*;

/// Which bf16 product the CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Amx,
    Avx512Bf16,
    /// Neither: the f32 products are used.
    None,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512_bf16",
            Kernel::None => "none",
        }
    }
}

/// The bf16 kernel the products use, detected once: AMX where the CPU and OS allow it, else
/// AVX-512 BF16 where the CPU has it, else none (the f32 products).
/// `FERROTUNE_BF16_KERNEL=avx512_bf16` asks for the AVX-512 BF16 one and `none` for none.
///
/// How AVX-512 BF16 compares with the f32 products depends on the core. On an AMD EPYC
/// (Zen 4) `vdpbf16ps` does twice the multiply-adds of an f32 FMA per cycle (232 against 116
/// GFLOP/s on one core), and bf16 LoRA training ran at about 400 tokens/s with it against 220
/// with the f32 products. On the Intel AMX machine it did only as many (179 tokens/s against
/// 200, measured with an earlier version of the kernel), but there AMX is chosen anyway.
pub fn kernel() -> Kernel {
    static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| match std::env::var("FERROTUNE_BF16_KERNEL").as_deref() {
        Ok("none") => Kernel::None,
        Ok("avx512_bf16") => available_avx512_bf16(),
        _ => detect(),
    })
}

fn available_avx512_bf16() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512f") {
        return Kernel::Avx512Bf16;
    }
    Kernel::None
}

fn detect() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        return Kernel::Amx;
    }
    available_avx512_bf16()
}

/// The rounding and widening of bf16 values, as the GGUF code (and ggml) does them: rounding to
/// nearest even, NaNs kept NaN (quiet).
pub use crate::formats::gguf::quants::{bf16_to_f32, f32_to_bf16 as to_bf16};

/// Where `A[i][kk]` lies in a tiled `A` with `k_pad` columns: tiles of 16 rows × 32 values,
/// row-tile major.
#[inline]
pub fn a_index(i: usize, kk: usize, k_pad: usize) -> usize {
    ((i / 16 * (k_pad / 32) + kk / 32) * 16 + i % 16) * 32 + kk % 32
}

/// Where `B[2p + t][j]` lies in a packed `B` with `k_pad` rows: tiles of 16 pairs × 16
/// columns (64 bytes a row), column-tile major.
#[inline]
pub fn b_index(p: usize, j: usize, t: usize, k_pad: usize) -> usize {
    ((j / 16 * (k_pad / 32) + p / 16) * 16 + p % 16) * 32 + j % 16 * 2 + t
}

/// Rows of `src` (`rows × cols`, row-major, leading dimension `ld`) rounded to bf16 into a tiled
/// `A` of `rows` rounded up to 16 rows and `k_pad` columns, zero-padded.
pub fn round_rows(src: &[f32], rows: usize, cols: usize, ld: usize, k_pad: usize) -> Vec<u16> {
    assert!(cols <= k_pad && (rows == 0 || src.len() >= (rows - 1) * ld + cols), "bf16 gemm: rows to round");
    // Every value is written below, the padding as zeros.
    let mut out = super::output_vec(rows.next_multiple_of(16) * k_pad);
    // One row tile per task: 16 rows, each split into its 32-value pieces.
    out.par_chunks_mut(16 * k_pad).enumerate().for_each(|(it, tiles)| {
        for r in 0..16 {
            let i = it * 16 + r;
            for kt in 0..k_pad / 32 {
                let dst = &mut tiles[(kt * 16 + r) * 32..(kt * 16 + r + 1) * 32];
                let n = if i < rows { 32.min(cols.saturating_sub(kt * 32)) } else { 0 };
                if n > 0 {
                    round_slice(&src[i * ld + kt * 32..i * ld + kt * 32 + n], &mut dst[..n]);
                }
                dst[n..].fill(0);
            }
        }
    });
    out
}

/// [`to_bf16`] over a slice, branch-free so that it vectorises (AVX-512 where the CPU has it:
/// the bf16 products run only there).
fn round_slice(src: &[f32], dst: &mut [u16]) {
    #[inline(always)]
    fn body(src: &[f32], dst: &mut [u16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            let b = x.to_bits();
            let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
            let quiet_nan = ((b >> 16) | 0x40) as u16;
            *d = if b & 0x7fff_ffff > 0x7f80_0000 { quiet_nan } else { rounded };
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn wide(src: &[f32], dst: &mut [u16]) {
            body(src, dst)
        }
        if std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the features were just detected.
            return unsafe { wide(src, dst) };
        }
    }
    body(src, dst)
}

/// `k` rounded up to whole pairs of tile depth (32 bf16), `n` to whole tiles (16 columns).
pub fn padded(k: usize, n: usize) -> (usize, usize) {
    (k.next_multiple_of(32), n.next_multiple_of(16))
}

/// Packs `B[k, n] = Wᵀ` for a weight `W[n, k]` stored row-major in bf16 (the forward product
/// `x · Wᵀ`): the pair `(W[j][2p], W[j][2p+1])` is contiguous in `W` and lands at
/// [`b_index`]`(p, j, ·)`. Returns the packed matrix and its `(k_pad, n_pad)`.
pub fn pack_transposed(w: &[u16], n: usize, k: usize) -> (Vec<u16>, usize, usize) {
    let (k_pad, n_pad) = padded(k, n);
    let mut packed = vec![0u16; k_pad * n_pad];
    // One column tile (16 rows of W) per task; its tiles are consecutive. Each 64-byte tile row
    // gathers one pair from each of the 16 rows, which stay in L1 while the task walks along k.
    packed.par_chunks_mut(16 * k_pad).enumerate().for_each(|(jt, tiles)| {
        let rows: Vec<&[u16]> = (0..16.min(n.saturating_sub(jt * 16))).map(|c| &w[(jt * 16 + c) * k..(jt * 16 + c + 1) * k]).collect();
        for (p, dst) in tiles.chunks_exact_mut(32).enumerate().take(k.div_ceil(2)) {
            // Tile rows run p % 16 within tile p / 16: chunk i of the task holds pair row
            // (i / 16) · 16 + i % 16 = i.
            let kk = 2 * p;
            for (c, row) in rows.iter().enumerate() {
                dst[2 * c] = row[kk];
                if kk + 1 < k {
                    dst[2 * c + 1] = row[kk + 1];
                }
            }
        }
    });
    (packed, k_pad, n_pad)
}

/// Row `j` of the weight `W[n, k]` that [`pack_transposed`] packed (with `k_pad` from
/// [`padded`]), widened to f32 into `out` (`k` values).
pub fn unpack_transposed_row(packed: &[u16], j: usize, k_pad: usize, out: &mut [f32]) {
    for (p, pair) in out.chunks_mut(2).enumerate() {
        let at = b_index(p, j, 0, k_pad);
        for (t, v) in pair.iter_mut().enumerate() {
            *v = bf16_to_f32(packed[at + t]);
        }
    }
}

/// Packs `B[k, n] = W` for a weight `W[k, n]` stored row-major in bf16 (the input-gradient
/// product `g · W`, where `k` is the weight's output side): rows `2p` and `2p + 1` interleaved.
pub fn pack_rows(w: &[u16], k: usize, n: usize) -> (Vec<u16>, usize, usize) {
    let (k_pad, n_pad) = padded(k, n);
    let mut packed = vec![0u16; k_pad * n_pad];
    packed.par_chunks_mut(16 * k_pad).enumerate().for_each(|(jt, tiles)| {
        let (c0, cols) = (jt * 16, 16.min(n.saturating_sub(jt * 16)));
        for (p, dst) in tiles.chunks_exact_mut(32).enumerate().take(k.div_ceil(2)) {
            let even = &w[2 * p * n + c0..2 * p * n + c0 + cols];
            if 2 * p + 1 < k {
                let odd = &w[(2 * p + 1) * n + c0..(2 * p + 1) * n + c0 + cols];
                for ((pair, &e), &o) in dst.chunks_exact_mut(2).zip(even).zip(odd) {
                    pair[0] = e;
                    pair[1] = o;
                }
            } else {
                for (pair, &e) in dst.chunks_exact_mut(2).zip(even) {
                    pair[0] = e;
                }
            }
        }
    });
    (packed, k_pad, n_pad)
}

/// The operands of one product: `a` is a tiled `m_pad × k_pad` bf16 matrix (`m_pad` = `m`
/// rounded up to 16, [`round_rows`]), `b` packed `k_pad × n_pad`; the result is the top-left
/// `m × n` of the product.
pub struct Operands<'a> {
    pub a: &'a [u16],
    pub b: &'a [u16],
    pub m: usize,
    pub n: usize,
    pub k_pad: usize,
    pub n_pad: usize,
}

impl Operands<'_> {
    fn check(&self) {
        assert!(self.k_pad.is_multiple_of(32) && self.n_pad.is_multiple_of(16) && self.n <= self.n_pad, "bf16 gemm: padding");
        assert!(self.a.len() == self.m.next_multiple_of(16) * self.k_pad && self.b.len() == self.k_pad * self.n_pad, "bf16 gemm: operand sizes");
    }
}

/// `c[i * ldc + j] (+)= (A·B)[i][j]` for `i < m`, `j < n`, with `kernel` (which must be
/// available: [`kernel`]). Rows are shared among the worker threads.
pub fn gemm(kernel: Kernel, o: &Operands, c: &mut [f32], ldc: usize, accumulate: bool) {
    o.check();
    assert!(c.len() >= (o.m.max(1) - 1) * ldc + o.n, "bf16 gemm: output size");
    // Rows per task: enough to amortise the tile set-up, few enough to spread over threads.
    let rows_per_task = 64;
    let m_pad = o.m.next_multiple_of(16);
    // Task t owns output rows t·64.. (the last one fewer, its slice possibly short of a full row).
    c.par_chunks_mut(rows_per_task * ldc).take(o.m.div_ceil(rows_per_task)).enumerate().for_each(|(t, c_rows)| {
        let r0 = t * rows_per_task;
        let rows = rows_per_task.min(o.m - r0);
        let a = &o.a[r0 * o.k_pad..(r0 + rows.next_multiple_of(16)).min(m_pad) * o.k_pad];
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => unsafe { amx::block(a, rows, o, c_rows, ldc, accumulate) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => unsafe { avx512::block(a, rows, o, c_rows, ldc, accumulate) },
            _ => reference_block(a, rows, o, c_rows, ldc, accumulate, [0, 1], o.k_pad / 32),
        }
    });
}

/// The product in scalar code, in `kernel`'s order of operations: `k` is summed in the
/// kernel's blocks ([`k_block_tiles`]), each block from 0, pair by pair, the pair's two
/// products, each addition rounded to f32 (a product of two bf16 values is exact in f32), AMX
/// the even product first and AVX-512 BF16 the odd one; each block's sum is then added to `c`
/// (the first one stored, unless accumulating). Denormals are not flushed as the instructions
/// flush them, so the tests keep to normal values.
pub fn reference(kernel: Kernel, o: &Operands, c: &mut [f32], ldc: usize, accumulate: bool) {
    o.check();
    let order: [usize; 2] = if kernel == Kernel::Avx512Bf16 { [1, 0] } else { [0, 1] };
    reference_block(o.a, o.m, o, c, ldc, accumulate, order, k_block_tiles(kernel, o.k_pad / 32))
}

/// How many `k` tiles (of 32 values) `kernel` sums before adding to the output: all of them
/// for AMX; equal blocks of at most 24 for AVX-512 BF16, whose strips of `B` must stay in L2
/// (see `avx512::block`).
pub fn k_block_tiles(kernel: Kernel, k_tiles: usize) -> usize {
    const AVX512_MAX: usize = 24;
    match kernel {
        Kernel::Avx512Bf16 => k_tiles.div_ceil(k_tiles.div_ceil(AVX512_MAX).max(1)).max(1),
        _ => k_tiles.max(1),
    }
}

#[allow(clippy::too_many_arguments)]
fn reference_block(a: &[u16], rows: usize, o: &Operands, c: &mut [f32], ldc: usize, accumulate: bool, order: [usize; 2], block_tiles: usize) {
    for i in 0..rows {
        for j in 0..o.n {
            let c = &mut c[i * ldc + j];
            for (b, block) in (0..o.k_pad / 2).collect::<Vec<_>>().chunks(block_tiles * 16).enumerate() {
                let mut acc = 0f32;
                for &p in block {
                    for t in order {
                        let x = bf16_to_f32(a[a_index(i, 2 * p + t, o.k_pad)]);
                        let y = bf16_to_f32(o.b[b_index(p, j, t, o.k_pad)]);
                        acc += x * y;
                    }
                }
                *c = if accumulate || b > 0 { *c + acc } else { acc };
            }
        }
    }
}

/// Writes a finished 16-column strip of results into `c` (rows `i0..`, columns `j0..`),
/// clipped to the `rows × n` result.
#[inline]
fn store_tile(tile: &[f32; 256], c: &mut [f32], ldc: usize, i0: usize, j0: usize, rows: usize, n: usize, accumulate: bool) {
    for r in 0..16.min(rows.saturating_sub(i0)) {
        let cols = 16.min(n - j0);
        store_row(&tile[r * 16..r * 16 + cols], &mut c[(i0 + r) * ldc + j0..(i0 + r) * ldc + j0 + cols], accumulate);
    }
}

/// `dst (+)= src`.
#[inline]
fn store_row(src: &[f32], dst: &mut [f32], accumulate: bool) {
    if accumulate {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    } else {
        dst.copy_from_slice(src);
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{a_index, b_index, store_tile, Operands};
    use std::arch::asm;

    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    /// AMX-BF16 and AMX-TILE in CPUID, the tile state enabled by the OS (XCR0 bits 17 and 18),
    /// and Linux's permission for this process to use it.
    pub fn available() -> bool {
        use std::arch::x86_64::{__cpuid_count, _xgetbv};
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        let osxsave = __cpuid_count(1, 0).ecx >> 27 & 1 == 1;
        if !(amx_bf16 && amx_tile && osxsave) {
            return false;
        }
        // SAFETY: XGETBV is available when OSXSAVE is set.
        let xcr0 = unsafe { _xgetbv(0) };
        if xcr0 >> 17 & 3 != 3 {
            return false;
        }
        // SAFETY: a plain syscall with integer arguments.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// The tile configuration: palette 1; tiles 0–3 hold 16×16 f32 results, 4–5 rows of `A`
    /// (16 × 32 bf16), 6–7 packed `B` (16 pair-rows × 16 columns).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Rows `0..rows` of the product for the `A` rows in `a`, into `c` (row `i` at `i · ldc`).
    ///
    /// # Safety
    /// AMX must be [`available`]; `a` holds the tiles of `rows` rounded up to 16 rows.
    pub unsafe fn block(a: &[u16], rows: usize, o: &Operands, c: &mut [f32], ldc: usize, accumulate: bool) {
        let mut out = [[0f32; 256]; 4];
        // Every tile is 16 contiguous rows of 64 bytes.
        let stride = 64isize;
        let k_tiles = o.k_pad / 32;
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        for i0 in (0..rows).step_by(32) {
            // A second row tile only where there are rows for it.
            let two_rows = i0 + 16 < rows;
            for j0 in (0..o.n).step_by(32) {
                let two_cols = j0 + 16 < o.n;
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                let a0 = a.as_ptr().add(a_index(i0, 0, o.k_pad));
                let a1 = if two_rows { a.as_ptr().add(a_index(i0 + 16, 0, o.k_pad)) } else { a0 };
                let b0 = o.b.as_ptr().add(b_index(0, j0, 0, o.k_pad));
                let b1 = if two_cols { o.b.as_ptr().add(b_index(0, j0 + 16, 0, o.k_pad)) } else { b0 };
                for kt in 0..k_tiles {
                    // Consecutive tiles along k are 512 values apart in both operands.
                    let at = kt * 512;
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(at),
                        a1 = in(reg) a1.add(at),
                        b0 = in(reg) b0.add(at),
                        b1 = in(reg) b1.add(at),
                        s = in(reg) stride,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c1} + {s}*1], tmm1",
                    "tilestored [{c2} + {s}*1], tmm2",
                    "tilestored [{c3} + {s}*1], tmm3",
                    c0 = in(reg) out[0].as_mut_ptr(),
                    c1 = in(reg) out[1].as_mut_ptr(),
                    c2 = in(reg) out[2].as_mut_ptr(),
                    c3 = in(reg) out[3].as_mut_ptr(),
                    s = in(reg) 64isize,
                    options(nostack),
                );
                store_tile(&out[0], c, ldc, i0, j0, rows, o.n, accumulate);
                if two_cols {
                    store_tile(&out[1], c, ldc, i0, j0 + 16, rows, o.n, accumulate);
                }
                if two_rows {
                    store_tile(&out[2], c, ldc, i0 + 16, j0, rows, o.n, accumulate);
                    if two_cols {
                        store_tile(&out[3], c, ldc, i0 + 16, j0 + 16, rows, o.n, accumulate);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Operands;
    use std::arch::x86_64::*;

    /// Rows `0..rows` of the product, 4 rows by up to 4 column tiles (64 columns) at a time in
    /// 16 accumulators: per pair of `k`, 4 loads of packed `B` and 4 broadcast `A` pairs feed
    /// 16 `vdpbf16ps`.
    ///
    /// `k` is walked in blocks of at most 24 tiles ([`super::k_block_tiles`]), and within a block each
    /// 64-column strip of `B` serves all the rows before the next strip is read: the strip
    /// (at most 96 KB) and the rows' block of `A` (as much) then stay in L2. Walking the rows
    /// outermost instead read all of `B` again for every 4 rows, which the LM head's `B`
    /// (49k columns, 56 MB) could not survive: it ran at 160 GFLOP/s where the layers' products
    /// ran at 410.
    ///
    /// # Safety
    /// AVX-512 F and BF16 must be available; `a` holds the tiles of `rows` rounded up to 16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(a: &[u16], rows: usize, o: &Operands, c: &mut [f32], ldc: usize, accumulate: bool) {
        let k_tiles = o.k_pad / 32;
        let n_tiles = o.n.div_ceil(16);
        let block_tiles = super::k_block_tiles(super::Kernel::Avx512Bf16, k_tiles);
        for kt0 in (0..k_tiles).step_by(block_tiles) {
            let kts = block_tiles.min(k_tiles - kt0);
            // Later blocks add to what the first one stored.
            let add = accumulate || kt0 > 0;
            for jt0 in (0..n_tiles).step_by(4) {
                let b = [0, 1, 2, 3].map(|t| o.b.as_ptr().add((jt0 + t).min(n_tiles - 1) * k_tiles * 512 + kt0 * 512));
                for i0 in (0..rows).step_by(4) {
                    // Row i0 of its row tile, at the start of the block's first k tile.
                    let a_rows = a.as_ptr().add((i0 / 16 * k_tiles * 16 + i0 % 16) * 32 + kt0 * 512);
                    let acc = match n_tiles - jt0 {
                        1 => widen(micro::<1>(a_rows, b, kts)),
                        2 => widen(micro::<2>(a_rows, b, kts)),
                        3 => widen(micro::<3>(a_rows, b, kts)),
                        _ => micro::<4>(a_rows, b, kts),
                    };
                    for (r, row) in acc.iter().enumerate().take(rows.saturating_sub(i0).min(4)) {
                        for (t, v) in row.iter().enumerate() {
                            let j0 = (jt0 + t) * 16;
                            if j0 >= o.n {
                                break;
                            }
                            let cols = 16.min(o.n - j0);
                            store_strip(*v, &mut c[(i0 + r) * ldc + j0..(i0 + r) * ldc + j0 + cols], add);
                        }
                    }
                }
            }
        }
    }

    /// `dst (+)= v`'s first `dst.len()` (at most 16) lanes, in one masked vector store: a copy
    /// through a buffer went to `memcpy`, 3% of a bf16 training step.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_strip(v: __m512, dst: &mut [f32], add: bool) {
        debug_assert!(dst.len() <= 16);
        let mask: __mmask16 = ((1u32 << dst.len()) - 1) as __mmask16;
        let p = dst.as_mut_ptr();
        let v = if add { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v) } else { v };
        _mm512_mask_storeu_ps(p, mask, v);
    }

    #[inline(always)]
    fn widen<const NT: usize>(acc: [[__m512; NT]; 4]) -> [[__m512; 4]; 4] {
        // SAFETY (of the zero vector): plain register initialisation.
        let zero = unsafe { _mm512_setzero_ps() };
        acc.map(|row| std::array::from_fn(|t| if t < NT { row[t] } else { zero }))
    }

    /// 4 rows × `NT` column tiles over all of `k`: `a` points at the first row's first pair,
    /// `b[t]` at column tile `t`'s first tile.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn micro<const NT: usize>(a: *const u16, b: [*const u16; 4], k_tiles: usize) -> [[__m512; NT]; 4] {
        let mut acc = [[_mm512_setzero_ps(); NT]; 4];
        for kt in 0..k_tiles {
            let at = kt * 512;
            for q in 0..16 {
                let bv: [__m512bh; NT] = std::array::from_fn(|t| std::mem::transmute(_mm512_loadu_si512(b[t].add(at + q * 32) as *const _)));
                for (r, row) in acc.iter_mut().enumerate() {
                    let pair = (a.add(at + r * 32 + q * 2) as *const i32).read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    for (acc, bv) in row.iter_mut().zip(&bv) {
                        *acc = _mm512_dpbf16_ps(*acc, x, *bv);
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn normal_bf16(rng: &mut SplitMix64, n: usize) -> Vec<u16> {
        (0..n).map(|_| to_bf16((rng.next_f32() * 2.0 - 1.0) * 3.0 + 0.01)).collect()
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_to_f32(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        let xs: Vec<f32> = [1.0, f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000), -2.5e-3, f32::NAN, f32::NEG_INFINITY, f32::MAX].repeat(9);
        let mut wide = vec![0u16; xs.len()];
        round_slice(&xs, &mut wide);
        assert_eq!(wide, xs.iter().map(|&x| to_bf16(x)).collect::<Vec<_>>(), "the slice rounding is the scalar one");
    }

    #[test]
    fn both_packings_hold_the_matrix_they_were_given() {
        let mut rng = SplitMix64::new(3);
        let (n, k) = (21, 37);
        let w = normal_bf16(&mut rng, n * k);
        let (p, k_pad, n_pad) = pack_transposed(&w, n, k);
        for j in 0..n_pad {
            for kk in 0..k_pad {
                let want = if j < n && kk < k { w[j * k + kk] } else { 0 };
                assert_eq!(p[b_index(kk / 2, j, kk % 2, k_pad)], want, "Wᵀ[{kk}][{j}]");
            }
        }
        for j in 0..n {
            let mut row = vec![0f32; k];
            unpack_transposed_row(&p, j, k_pad, &mut row);
            assert_eq!(row, w[j * k..(j + 1) * k].iter().map(|&v| bf16_to_f32(v)).collect::<Vec<_>>(), "row {j} read back");
        }
        let (p, k_pad, n_pad) = pack_rows(&w, n, k);
        for r in 0..k_pad {
            for j in 0..n_pad {
                let want = if r < n && j < k { w[r * k + j] } else { 0 };
                assert_eq!(p[b_index(r / 2, j, r % 2, k_pad)], want, "W[{r}][{j}]");
            }
        }
    }

    /// The reference against a plain f64 product: the packing and the loop order are right, and
    /// the f32 accumulation error is what it should be.
    #[test]
    fn the_reference_is_the_product() {
        let mut rng = SplitMix64::new(5);
        let (m, n, k) = (19, 23, 70);
        let x: Vec<f32> = normal_bf16(&mut rng, m * k).into_iter().map(bf16_to_f32).collect();
        let w = normal_bf16(&mut rng, n * k);
        let (k_pad, _) = padded(k, n);
        let a = round_rows(&x, m, k, k, k_pad);
        for i in 0..m.next_multiple_of(16) {
            for kk in 0..k_pad {
                let want = if i < m && kk < k { to_bf16(x[i * k + kk]) } else { 0 };
                assert_eq!(a[a_index(i, kk, k_pad)], want, "A[{i}][{kk}]");
            }
        }
        let (b, k_pad, n_pad) = pack_transposed(&w, n, k);
        let mut c = vec![0f32; m * n];
        reference(Kernel::None, &Operands { a: &a, b: &b, m, n, k_pad, n_pad }, &mut c, n, false);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|kk| x[i * k + kk] as f64 * bf16_to_f32(w[j * k + kk]) as f64).sum();
                assert!((c[i * n + j] as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()), "({i}, {j}): {} vs {exact}", c[i * n + j]);
            }
        }
    }

    /// The kernels this CPU has: AVX-512 BF16 gives the reference's results bit for bit (its
    /// documented order of operations); AMX rounds inside a tile product in an order Intel
    /// does not document (no sequential order matched), so it is held to the error bound of an
    /// f32 sum of `k` terms against the exact product. Sizes leave partial row and column tiles.
    #[test]
    fn the_cpu_kernels_compute_the_product() {
        let mut kernels = vec![];
        if detect() == Kernel::Amx {
            kernels.push(Kernel::Amx);
        }
        if available_avx512_bf16() == Kernel::Avx512Bf16 {
            kernels.push(Kernel::Avx512Bf16);
        }
        if kernels.is_empty() {
            eprintln!("no bf16 instructions on this CPU: only the reference is tested");
        }
        let mut rng = SplitMix64::new(9);
        for k in kernels {
            for (m, n, kk) in [(16usize, 16usize, 32usize), (100, 72, 96), (33, 17, 64), (130, 48, 576), (20, 40, 1600)] {
                let a = normal_bf16(&mut rng, m.next_multiple_of(16) * kk);
                let w = normal_bf16(&mut rng, n * kk);
                let (b, k_pad, n_pad) = pack_transposed(&w, n, kk);
                let o = Operands { a: &a, b: &b, m, n, k_pad, n_pad };
                for accumulate in [false, true] {
                    let start: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.25).collect();
                    let (mut got, mut want) = (start.clone(), start.clone());
                    gemm(k, &o, &mut got, n, accumulate);
                    reference(k, &o, &mut want, n, accumulate);
                    if k == Kernel::Avx512Bf16 {
                        let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
                        assert_eq!(differ, 0, "{} at {m}×{n}×{kk}: {differ} of {} differ", k.name(), m * n);
                        continue;
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let terms = (0..kk).map(|t| bf16_to_f32(a[a_index(i, t, k_pad)]) as f64 * bf16_to_f32(w[j * kk + t]) as f64);
                            let (exact, size) = terms.fold((0.0, 0.0), |(s, z), x| (s + x, z + x.abs()));
                            let exact = exact + if accumulate { start[i * n + j] as f64 } else { 0.0 };
                            let bound = (kk + 2) as f64 * f32::EPSILON as f64 / 2.0 * (size + exact.abs());
                            let err = (got[i * n + j] as f64 - exact).abs();
                            assert!(err <= bound, "{} at {m}×{n}×{kk} ({i}, {j}): {} vs exact {exact} (bound {bound:e})", k.name(), got[i * n + j]);
                        }
                    }
                }
            }
        }
    }
}
