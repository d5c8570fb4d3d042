//! ggml tensor element types: block layouts, dequantization and (reference) quantization.
//!
//! Every quantized type stores its values in fixed-size blocks along the innermost dimension
//! (ggml's `ne[0]`): 32 values per block for the "legacy" types (Q4_0 ... Q8_1) and 256 for the
//! K-quants (a super-block of 8 or 16 sub-blocks with packed 6- or 8-bit sub-scales).
//!
//! Numerics contract: dequantization reproduces, bit for bit, what gguf-py's
//! `gguf.quants.dequantize` (0.19) computes in numpy float32. numpy evaluates each `*`, `+` and
//! `-` as a separate float32 operation with its own rounding, so every kernel below writes the
//! product into an f32 first and then adds/subtracts, in exactly gguf-py's order. Rust never
//! contracts `a * b + c` into a fused multiply-add, and we never call `mul_add`. The order used
//! by each type is written next to its kernel.
//!
//! (In fact every product here is exact in f32: an f16 scale has 11 significant bits, sub-scales
//! at most 8 and quants at most 6, so products fit f32's 24 bits. Only Q8_K's f32 scale times
//! an i8 can round, and that is a single multiply. So just the final add/subtract rounds, and
//! a fused multiply-add would give the same answer. Keeping gguf-py's grouping still matters:
//! regrouping e.g. Q2_K as `dl * (q - ml/dl)` changes results by an ulp, which the gguf-py
//! parity test catches.)
//!
//! Quantization follows ggml's scalar reference functions (`quantize_row_*_ref`). For the
//! legacy types the result equals gguf-py's `gguf.quants.quantize` byte for byte (both follow
//! the C reference). The K-quants have no gguf-py quantizer; ours follows ggml's algorithm but
//! is not promised to be byte-identical to the C output (a C compiler may fuse `a*b+c`).

use half::f16;

/// Elements per block of the legacy quant types.
pub const QK: usize = 32;
/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;
/// ggml's `GROUP_MAX_EPS`: below this a group is treated as all-zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// A ggml tensor element type. The discriminant-free enum is mapped to the on-disk type id by
/// [`GgmlType::to_u32`]; types we can only carry (not convert) are listed so that files using
/// them still open and can be inspected or copied.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// Every type, for lookups by id or name.
    pub const ALL: [GgmlType; 32] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Q8K,
        Self::IQ2XXS,
        Self::IQ2XS,
        Self::IQ3XXS,
        Self::IQ1S,
        Self::IQ4NL,
        Self::IQ3S,
        Self::IQ2S,
        Self::IQ4XS,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::IQ1M,
        Self::BF16,
        Self::TQ1_0,
        Self::TQ2_0,
        Self::MXFP4,
    ];

    /// (type id, name, elements per block, bytes per block), as in ggml's type traits.
    /// An exhaustive match, so adding a variant without its traits does not compile.
    const fn traits(self) -> (u32, &'static str, usize, usize) {
        match self {
            Self::F32 => (0, "F32", 1, 4),
            Self::F16 => (1, "F16", 1, 2),
            Self::Q4_0 => (2, "Q4_0", QK, 2 + 16),
            Self::Q4_1 => (3, "Q4_1", QK, 2 + 2 + 16),
            Self::Q5_0 => (6, "Q5_0", QK, 2 + 4 + 16),
            Self::Q5_1 => (7, "Q5_1", QK, 2 + 2 + 4 + 16),
            Self::Q8_0 => (8, "Q8_0", QK, 2 + 32),
            // ggml's block_q8_1 is two f16 (d, s) + 32 i8 = 36 bytes. (gguf-py's table says 40,
            // a leftover from when d and s were f32; ggml itself is authoritative here.)
            Self::Q8_1 => (9, "Q8_1", QK, 2 + 2 + 32),
            Self::Q2K => (10, "Q2_K", QK_K, 16 + 64 + 2 + 2),
            Self::Q3K => (11, "Q3_K", QK_K, 32 + 64 + 12 + 2),
            Self::Q4K => (12, "Q4_K", QK_K, 2 + 2 + 12 + 128),
            Self::Q5K => (13, "Q5_K", QK_K, 2 + 2 + 12 + 32 + 128),
            Self::Q6K => (14, "Q6_K", QK_K, 128 + 64 + 16 + 2),
            Self::Q8K => (15, "Q8_K", QK_K, 4 + 256 + 32),
            Self::IQ2XXS => (16, "IQ2_XXS", QK_K, 2 + 64),
            Self::IQ2XS => (17, "IQ2_XS", QK_K, 2 + 64 + 8),
            Self::IQ3XXS => (18, "IQ3_XXS", QK_K, 2 + 64 + 32),
            Self::IQ1S => (19, "IQ1_S", QK_K, 2 + 32 + 16),
            Self::IQ4NL => (20, "IQ4_NL", QK, 2 + 16),
            Self::IQ3S => (21, "IQ3_S", QK_K, 2 + 64 + 32 + 8 + 4),
            Self::IQ2S => (22, "IQ2_S", QK_K, 2 + 64 + 16),
            Self::IQ4XS => (23, "IQ4_XS", QK_K, 2 + 2 + 128 + 4),
            Self::I8 => (24, "I8", 1, 1),
            Self::I16 => (25, "I16", 1, 2),
            Self::I32 => (26, "I32", 1, 4),
            Self::I64 => (27, "I64", 1, 8),
            Self::F64 => (28, "F64", 1, 8),
            Self::IQ1M => (29, "IQ1_M", QK_K, 32 + 16 + 8),
            Self::BF16 => (30, "BF16", 1, 2),
            Self::TQ1_0 => (34, "TQ1_0", QK_K, 2 + 52),
            Self::TQ2_0 => (35, "TQ2_0", QK_K, 2 + 64),
            Self::MXFP4 => (39, "MXFP4", QK, 1 + 16),
        }
    }

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.to_u32() == v)
    }

    pub fn to_u32(self) -> u32 {
        self.traits().0
    }

    /// Elements per block (1 for the plain float/int types).
    pub fn block_size(self) -> usize {
        self.traits().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.traits().3
    }

    /// ggml's name for the type: "Q4_1", "F32", "Q6_K", ...
    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Case-insensitive inverse of [`GgmlType::name`] ("q8_0", "q4_k", "f16").
    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Bytes that `n` elements occupy, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        dequant_kernel(self).is_some()
    }

    /// Whether [`quantize`] supports this type.
    pub fn can_quantize(self) -> bool {
        quant_kernel(self).is_some()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Dequantizes `n` elements (a multiple of the block size) from raw block bytes.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    // Check sizes before allocating so a bogus `n` cannot request a huge buffer.
    check_sizes(ty, bytes.len(), n)?;
    let mut out = vec![0f32; n];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Dequantizes into `out`; `bytes` must hold exactly `out.len()` elements.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    check_sizes(ty, bytes.len(), out.len())?;
    // Plain float types: a direct loop (a kernel call per 1-element "block" is 5x slower).
    match ty {
        GgmlType::F32 => widen(bytes, out, f32::from_le_bytes),
        GgmlType::F16 => widen(bytes, out, |b| f16::from_le_bytes(b).to_f32()),
        GgmlType::BF16 => widen(bytes, out, |b| bf16_to_f32(u16::from_le_bytes(b))),
        _ => return dequantize_blocks(ty, bytes, out),
    }
    Ok(())
}

fn dequantize_blocks(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just detected.
        if unsafe { dequantize_blocks_avx2(ty, bytes, out) } {
            return Ok(());
        }
    }
    let kernel = dequant_kernel(ty)
        .ok_or_else(|| format!("dequantizing {} tensors is not supported", ty.name()))?;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    for (block, y) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
        kernel(block, y);
    }
    Ok(())
}

/// The block types decoding and training read most, with their kernels inlined into an AVX2
/// loop so that they vectorise (a call per block through a pointer does not). The arithmetic is
/// the scalar kernels' own, operation for operation (no fused multiply-add), so the values are
/// bit for bit the same. `false`: not one of these types.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_blocks_avx2(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
    macro_rules! each_block {
        ($kernel:ident) => {{
            for (block, y) in bytes.chunks_exact(ty.type_size()).zip(out.chunks_exact_mut(ty.block_size())) {
                $kernel(block, y);
            }
            true
        }};
    }
    match ty {
        GgmlType::Q4_0 => each_block!(deq_q4_0),
        GgmlType::Q4_1 => each_block!(deq_q4_1),
        GgmlType::Q5_0 => each_block!(deq_q5_0),
        GgmlType::Q5_1 => each_block!(deq_q5_1),
        GgmlType::Q8_0 => each_block!(deq_q8_0),
        GgmlType::Q4K => each_block!(deq_q4_k),
        GgmlType::Q5K => each_block!(deq_q5_k),
        GgmlType::Q6K => each_block!(deq_q6_k),
        _ => false,
    }
}

fn widen<const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
    for (v, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        *v = f(a);
    }
}

fn check_sizes(ty: GgmlType, n_bytes: usize, n: usize) -> Result<(), String> {
    let expected = ty.bytes_for(n).ok_or_else(|| {
        format!(
            "{n} elements is not a multiple of the {} block size {}",
            ty,
            ty.block_size()
        )
    })?;
    if n_bytes != expected {
        return Err(format!(
            "{n} {ty} elements take {expected} bytes, got {n_bytes}"
        ));
    }
    Ok(())
}

/// One block in, `block_size` values out.
type DequantFn = fn(&[u8], &mut [f32]);

fn dequant_kernel(ty: GgmlType) -> Option<DequantFn> {
    Some(match ty {
        GgmlType::F32 => deq_f32,
        GgmlType::F16 => deq_f16,
        GgmlType::BF16 => deq_bf16,
        GgmlType::Q4_0 => deq_q4_0,
        GgmlType::Q4_1 => deq_q4_1,
        GgmlType::Q5_0 => deq_q5_0,
        GgmlType::Q5_1 => deq_q5_1,
        GgmlType::Q8_0 => deq_q8_0,
        GgmlType::Q8_1 => deq_q8_1,
        GgmlType::Q2K => deq_q2_k,
        GgmlType::Q3K => deq_q3_k,
        GgmlType::Q4K => deq_q4_k,
        GgmlType::Q5K => deq_q5_k,
        GgmlType::Q6K => deq_q6_k,
        GgmlType::Q8K => deq_q8_k,
        _ => return None,
    })
}

/// Reads the little-endian f16 at byte `i` and widens it (exact, like numpy's astype).
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// f16 → f32 without branches on the common path (the `half` crate's software conversion,
/// without F16C at compile time, branches per value and showed as 9% of a decoding step).
/// Normal and subnormal values: the exponent and mantissa moved into place and scaled by 2^112
/// (exact). Infinities and NaNs as `half` widens them (a NaN comes out quiet).
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    let finite = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000);
    let bits = match magnitude {
        0x7c00 => 0x7f80_0000,
        m if m > 0x7c00 => 0x7fc0_0000 | (m & 0x3ff) << 13,
        _ => finite.to_bits(),
    };
    f32::from_bits(bits | sign)
}

fn deq_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn deq_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

/// bf16 is the top half of an f32: shift the bits up (gguf-py: `int32(bits) << 16`).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

fn deq_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
}

/// Q4_0: f16 d, 16 bytes; low nibbles are values 0..15, high nibbles 16..31.
/// gguf-py: `d * f32(q - 8)` with `q - 8` in integers.
#[inline(always)]
fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = y.split_at_mut(16);
    for (v, &q) in lo.iter_mut().zip(qs) {
        *v = d * ((q & 0x0F) as i32 - 8) as f32;
    }
    for (v, &q) in hi.iter_mut().zip(qs) {
        *v = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: f16 d, f16 m, 16 nibble bytes. gguf-py: `(d * f32(q)) + m`.
#[inline(always)]
fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    // Low nibbles then high ones, each a straight run that vectorises.
    let (lo, hi) = y.split_at_mut(16);
    for (v, &q) in lo.iter_mut().zip(qs) {
        *v = d * (q & 0x0F) as f32 + m;
    }
    for (v, &q) in hi.iter_mut().zip(qs) {
        *v = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit value `j` of a Q5 block: nibble from `qs`, fifth bit `j` of the u32 `qh`.
fn q5_value(qs: &[u8], qh: u32, j: usize) -> u8 {
    let nibble = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    nibble | ((((qh >> j) & 1) as u8) << 4)
}

/// Q5_0: f16 d, u32 qh, 16 nibble bytes. gguf-py: `d * f32(q - 16)`.
#[inline(always)]
fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * (q5_value(qs, qh, j) as i32 - 16) as f32;
    }
}

/// Q5_1: f16 d, f16 m, u32 qh, 16 nibble bytes. gguf-py: `(d * f32(q)) + m`.
#[inline(always)]
fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * q5_value(qs, qh, j) as f32 + m;
    }
}

/// Q8_0: f16 d, 32 i8. gguf-py: `f32(q) * d` (one rounding; commutative).
#[inline(always)]
fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = d * (q as i8) as f32;
    }
}

/// Q8_1: f16 d, f16 s (sum, unused here), 32 i8: `d * f32(q)`. (gguf-py has no Q8_1.)
fn deq_q8_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[4..36]) {
        *v = d * (q as i8) as f32;
    }
}

/// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), f16 d, f16 dmin.
/// Value `i` = 128*c + 32*s + l takes bits `2s` of `qs[32c + l]`; sub-block `i / 16`.
/// gguf-py: `dl = d * f32(sc & 0xF)`, `ml = dmin * f32(sc >> 4)`, value `(dl * q) - ml`.
fn deq_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (i, v) in y.iter_mut().enumerate() {
        let (c, s, l) = (i / 128, (i / 32) % 4, i % 32);
        let q = (qs[32 * c + l] >> (2 * s)) & 3;
        let sc = scales[i / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *v = dl * q as f32 - ml;
    }
}

/// Q3_K's sixteen 6-bit signed scales: low 4 bits from bytes 0..8 (low nibble for 0..8, high
/// nibble for 8..16), top 2 bits from bytes 8..12, then minus 32.
fn q3_k_scale(sc: &[u8], i: usize) -> i32 {
    let low = if i < 8 { sc[i] & 0x0F } else { sc[i - 8] >> 4 };
    let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Q3_K: hmask[32], qs[64] (2 low bits), scales[12], f16 d.
/// Value `i` = 128*c + 32*s + l: low bits `2s` of `qs[32c + l]`, high bit `(4c + s)` of
/// `hmask[l]`; a *clear* high bit subtracts 4.
/// gguf-py: `dl = d * f32(scale - 32)`, value `dl * f32(q_low - 4*(1 - hbit))`.
fn deq_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    for (i, v) in y.iter_mut().enumerate() {
        let (c, s, l) = (i / 128, (i / 32) % 4, i % 32);
        let low = ((qs[32 * c + l] >> (2 * s)) & 3) as i32;
        let hbit = ((hmask[l] >> (i / 32)) & 1) as i32;
        let q = low - ((hbit ^ 1) << 2);
        let dl = d * q3_k_scale(sc, i / 16) as f32;
        *v = dl * q as f32;
    }
}

/// Unpacks sub-block `j`'s 6-bit (scale, min) from a K-quant's 12 scale bytes (ggml's
/// `get_scale_min_k4`): bytes 0..4 scales 0..4, bytes 4..8 mins 0..4; sub-blocks 4..8 take
/// their low 4 bits from bytes 8..12 and the top 2 bits from bits 6..7 of bytes 0..8.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// Q4_K: f16 d, f16 dmin, scales[12], qs[128]. Sub-block j (of 8, 32 values) reads nibble
/// `4*(j%2)` of `qs[32*(j/2) + l]`.
/// gguf-py: `d_j = d * f32(sc_j)`, `dm_j = dmin * f32(m_j)`, value `(d_j * q) - dm_j`.
#[inline(always)]
fn deq_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, ys) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let dj = d * sc as f32;
        let dmj = dmin * m as f32;
        let (q, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
        for (v, &byte) in ys.iter_mut().zip(q) {
            *v = dj * ((byte >> shift) & 0x0F) as f32 - dmj;
        }
    }
}

/// Q5_K: f16 d, f16 dmin, scales[12], qh[32], qs[128]. Like Q4_K, plus bit j of `qh[l]` as
/// the fifth bit of sub-block j. gguf-py: value `(d_j * f32(q)) - dm_j`.
#[inline(always)]
fn deq_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, ys) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let dj = d * sc as f32;
        let dmj = dmin * m as f32;
        let (q, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
        for (l, v) in ys.iter_mut().enumerate() {
            let q5 = ((q[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            *v = dj * q5 as f32 - dmj;
        }
    }
}

/// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8), f16 d.
/// In each 128-value half c, value 32*k + l (k in 0..4) takes the low nibble (k < 2) or high
/// nibble (k >= 2) of `ql[64c + 32*(k%2) + l]` and bits `2k` of `qh[32c + l]`.
/// gguf-py: `d_g = d * f32(scale_g)` per 16 values, value `d_g * f32(q - 32)`.
#[inline(always)]
fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (i, v) in y.iter_mut().enumerate() {
        let (c, k, l) = (i / 128, (i / 32) % 4, i % 32);
        let low = (ql[64 * c + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
        let high = (qh[32 * c + l] >> (2 * k)) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        let dg = d * (scales[i / 16] as i8) as f32;
        *v = dg * q as f32;
    }
}

/// Q8_K: f32 d, 256 i8, 16 i16 block sums (unused here): `d * f32(q)`. (gguf-py has no Q8_K.)
fn deq_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (v, &q) in y.iter_mut().zip(&b[4..260]) {
        *v = d * (q as i8) as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization (ggml's scalar reference algorithms)
// ---------------------------------------------------------------------------------------------

/// Quantizes `data` (a multiple of the block size) into raw block bytes.
pub fn quantize(ty: GgmlType, data: &[f32]) -> Result<Vec<u8>, String> {
    let kernel =
        quant_kernel(ty).ok_or_else(|| format!("quantizing to {} is not supported", ty.name()))?;
    let n_bytes = ty.bytes_for(data.len()).ok_or_else(|| {
        format!(
            "{} values is not a multiple of the {} block size {}",
            data.len(),
            ty,
            ty.block_size()
        )
    })?;
    let mut out = vec![0u8; n_bytes];
    let (bs, ts) = (ty.block_size(), ty.type_size());
    for (x, block) in data.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
        kernel(x, block);
    }
    Ok(out)
}

/// `block_size` values in, one block out (the output starts zeroed).
type QuantFn = fn(&[f32], &mut [u8]);

fn quant_kernel(ty: GgmlType) -> Option<QuantFn> {
    Some(match ty {
        GgmlType::F32 => |x, y| y.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, y| put_f16(y, 0, x[0]),
        GgmlType::BF16 => |x, y| y.copy_from_slice(&f32_to_bf16(x[0]).to_le_bytes()),
        GgmlType::Q4_0 => quant_q4_0,
        GgmlType::Q4_1 => quant_q4_1,
        GgmlType::Q5_0 => quant_q5_0,
        GgmlType::Q5_1 => quant_q5_1,
        GgmlType::Q8_0 => quant_q8_0,
        GgmlType::Q8_1 => quant_q8_1,
        GgmlType::Q4K => quant_q4_k,
        GgmlType::Q5K => quant_q5_k,
        GgmlType::Q6K => quant_q6_k,
        GgmlType::Q8K => quant_q8_k,
        _ => return None,
    })
}

/// Stores `v` as f16 (round to nearest even, like ggml's FP32_TO_FP16) at byte `i`.
fn put_f16(y: &mut [u8], i: usize, v: f32) {
    y[i..i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaNs are forced quiet, everything else is rounded to
/// nearest even by adding 0x7fff plus the lowest kept bit before truncating.
pub fn f32_to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    // Cannot overflow: the largest non-NaN pattern, 0xff800000, plus 0x8000 fits in u32.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// ggml's `nearest_int` (the 1.5*2^23 trick) rounds half to even; for the in-range values it
/// is used on this is exactly `round_ties_even`. Out of range (or NaN) we saturate instead of
/// producing ggml's garbage.
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// The value with the largest magnitude (first one on ties), as ggml's loops pick it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    (min, max)
}

fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `quantize_row_q4_0_ref`: d = max / -8 (signed absmax), q = min(15, trunc(x/d + 8.5)).
fn quant_q4_0(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    for j in 0..16 {
        // `as i8` truncates toward zero like C's (int8_t) cast (and saturates on overflow).
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

/// `quantize_row_q4_1_ref`: d = (max - min) / 15, m = min, q = min(15, trunc((x-min)/d + 0.5)).
fn quant_q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

/// Packs 32 five-bit values: low nibbles into 16 bytes (value j and j+16 share a byte), the
/// fifth bits into a little-endian u32 (bit j = value j).
fn pack_q5(q: &[u8; 32], qh_out: &mut [u8], qs_out: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        qs_out[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
        qh |= (((q[j] >> 4) & 1) as u32) << j;
        qh |= (((q[j + 16] >> 4) & 1) as u32) << (j + 16);
    }
    qh_out.copy_from_slice(&qh.to_le_bytes());
}

/// `quantize_row_q5_0_ref`: d = max / -16, q = min(31, trunc(x/d + 16.5)).
fn quant_q5_0(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    let mut q = [0u8; 32];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = ((v * id + 16.5) as i8).min(31) as u8;
    }
    let (qh, qs) = y[2..].split_at_mut(4);
    pack_q5(&q, qh, qs);
}

/// `quantize_row_q5_1_ref`: d = (max - min) / 31, m = min, q = trunc((x-min)/d + 0.5).
fn quant_q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut q = [0u8; 32];
    for (qj, &v) in q.iter_mut().zip(x) {
        // Clamped to 31 for safety with non-finite inputs; finite ones never exceed it.
        *qj = (((v - min) * id + 0.5) as i8).min(31) as u8;
    }
    let (qh, qs) = y[4..].split_at_mut(4);
    pack_q5(&q, qh, qs);
}

fn absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |a, &v| if v.abs() > a { v.abs() } else { a })
}

/// `quantize_row_q8_0_ref`: d = amax / 127, q = roundf(x / d) (half away from zero).
fn quant_q8_0(x: &[f32], y: &mut [u8]) {
    let d = absmax(x) / 127.0;
    let id = inverse_or_zero(d);
    put_f16(y, 0, d);
    for (q, &v) in y[2..34].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

/// `quantize_row_q8_1_ref`: like Q8_0, plus s = f32(sum of q) * d.
fn quant_q8_1(x: &[f32], y: &mut [u8]) {
    let d = absmax(x) / 127.0;
    let id = inverse_or_zero(d);
    let mut sum = 0i32;
    for (q, &v) in y[4..36].iter_mut().zip(x) {
        let qi = (v * id).round() as i8;
        sum += qi as i32;
        *q = qi as u8;
    }
    put_f16(y, 0, d);
    put_f16(y, 2, sum as f32 * d);
}

/// `quantize_row_q8_K_ref`: iscale = -127 / max (signed absmax), q = min(127, nearest(x*is)),
/// d = 1 / iscale (f32), plus the 16 sums of 16 quants.
fn quant_q8_k(x: &[f32], y: &mut [u8]) {
    let max = signed_absmax(x);
    if max == 0.0 {
        return; // all-zero block: d = 0 and zero quants (the output starts zeroed)
    }
    let iscale = -127.0 / max;
    let mut q = [0i8; QK_K];
    for (qj, &v) in q.iter_mut().zip(x) {
        *qj = nearest_int(iscale * v).clamp(-128, 127) as i8;
    }
    y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (dst, &qj) in y[4..260].iter_mut().zip(&q) {
        *dst = qj as u8;
    }
    for (g, sum_bytes) in y[260..292].chunks_exact_mut(2).enumerate() {
        let sum: i32 = q[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum();
        sum_bytes.copy_from_slice(&(sum as i16).to_le_bytes());
    }
}

/// ggml's `make_qkx2_quants` (with `use_mad = false`): finds a scale and a (non-positive)
/// offset for `x` under `weights` so that `x ≈ scale * L + min`, L in 0..=nmax. Starts from
/// the min/max fit, then tries `nstep + 1` alternative inverse scales
/// `(rmin + rdelta*is + nmax) / (max - min)`, solving the weighted least-squares scale and min
/// for each level assignment and keeping the lowest weighted squared error.
/// Returns `(scale, -min)`; `levels` receives L.
struct Qkx2Search {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
}

impl Qkx2Search {
    fn run(&self, x: &[f32], weights: &[f32], levels: &mut [u8]) -> (f32, f32) {
        let nmax = self.nmax;
        let (mut min, mut max) = (x[0], x[0]);
        let (mut sum_w, mut sum_x) = (0f32, 0f32);
        for (&v, &w) in x.iter().zip(weights) {
            min = if v < min { v } else { min };
            max = if v > max { v } else { max };
            sum_w += w;
            sum_x += w * v;
        }
        if min > 0.0 {
            min = 0.0;
        }
        if max == min {
            levels.fill(0);
            return (0.0, -min);
        }
        let mut iscale = nmax as f32 / (max - min);
        let mut scale = 1.0 / iscale;
        let mut best_error = 0f32;
        for ((l, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
            *l = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
            let diff = scale * *l as f32 + min - v;
            best_error += w * (diff * diff);
        }
        let mut aux = [0u8; 32];
        let aux = &mut aux[..x.len()];
        for is in 0..=self.nstep {
            iscale = (self.rmin + self.rdelta * is as f32 + nmax as f32) / (max - min);
            let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
            for ((a, &v), &w) in aux.iter_mut().zip(x).zip(weights) {
                let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
                *a = l as u8;
                let lf = l as f32;
                sum_l += w * lf;
                sum_l2 += w * lf * lf;
                sum_xl += w * lf * v;
            }
            let det = sum_w * sum_l2 - sum_l * sum_l;
            if det <= 0.0 {
                continue;
            }
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for ((&a, &v), &w) in aux.iter().zip(x).zip(weights) {
                let diff = this_scale * a as f32 + this_min - v;
                cur_error += w * (diff * diff);
            }
            if cur_error < best_error {
                levels.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
        (scale, -min)
    }
}

/// The shared part of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: per 32-value
/// sub-block, weights `sqrt(mean(x^2)) + |x|` and a `make_qkx2_quants` fit; the 8 scales and 8
/// mins are then quantized to 6 bits against the super-block's d = max_scale/63 and
/// dmin = max_min/63, and every value is re-quantized with the rounded sub-block parameters.
/// Writes d, dmin and the 12 scale bytes into `head` (16 bytes) and returns the levels.
fn quantize_k_super_block(x: &[f32], head: &mut [u8], search: &Qkx2Search) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().fold(0.0, |a, &v| a + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = search.run(xs, &weights, &mut levels[32 * j..32 * j + 32]);
        scales[j] = scale;
        mins[j] = min;
        max_scale = if scale > max_scale { scale } else { max_scale };
        max_min = if min > max_min { min } else { max_min };
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
    }
    put_f16(head, 0, max_scale / 63.0);
    put_f16(head, 2, max_min / 63.0);
    pack_scale_min_k4(&ls, &lm, &mut head[4..16]);

    let (d, dmin) = (f16_at(head, 0), f16_at(head, 2));
    let nmax = search.nmax;
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &head[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue; // keep the levels from the search, as ggml does
        }
        let dmj = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dmj) / dj).clamp(0, nmax) as u8;
        }
    }
    levels
}

/// Inverse of [`scale_min_k4`]: 6-bit scales `ls` and mins `lm` into 12 bytes.
pub(crate) fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], out: &mut [u8]) {
    for j in 0..4 {
        out[j] = (ls[j] & 63) | ((ls[j + 4] >> 4) << 6);
        out[j + 4] = (lm[j] & 63) | ((lm[j + 4] >> 4) << 6);
        out[j + 8] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4);
    }
}

/// `quantize_row_q4_K_ref`: search parameters rmin = -1, rdelta = 0.1, 20 steps, 4-bit levels.
fn quant_q4_k(x: &[f32], y: &mut [u8]) {
    let search = Qkx2Search {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
    };
    let levels = quantize_k_super_block(x, &mut y[0..16], &search);
    let qs = &mut y[16..144];
    // Sub-blocks 2c and 2c+1 share the 32 bytes qs[32c..]: low and high nibbles.
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
        }
    }
}

/// `quantize_row_q5_K_ref`: rmin = -0.5, rdelta = 0.1, 15 steps, 5-bit levels; the fifth bit
/// of sub-block j goes to bit j of `qh[l]`.
fn quant_q5_k(x: &[f32], y: &mut [u8]) {
    let search = Qkx2Search {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
    };
    let levels = quantize_k_super_block(x, &mut y[0..16], &search);
    let (qh, qs) = y[16..176].split_at_mut(32);
    for c in 0..4 {
        for l in 0..32 {
            let (a, b) = (levels[64 * c + l], levels[64 * c + 32 + l]);
            qs[32 * c + l] = (a & 0x0F) | ((b & 0x0F) << 4);
            qh[l] |= ((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1));
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights x^2) and no importance weights: a
/// symmetric fit `x ≈ scale * (L - nmax)`, L - nmax in -nmax..nmax-1, trying inverse scales
/// `-(nmax + 0.1*is) / max` for is in -9..=9 and keeping the best weighted correlation.
/// Returns the scale (negative when the largest-magnitude value is positive); `levels` gets L.
fn make_qx_quants(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = (quant(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = (quant(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref`: 16 sub-blocks of 16 values fitted with `make_qx_quants(nmax 32)`;
/// sub-scales quantized to i8 against d = max_scale / -128; values re-quantized to 6 bits.
/// Where ggml leaves a sub-block's levels untouched because its rounded scale is 0, we keep
/// the search's levels too (they dequantize to 0 either way).
fn quant_q6_k(x: &[f32], y: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(
            &x[16 * ib..16 * ib + 16],
            32,
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return; // all-zero block (the output starts zeroed)
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    for ib in 0..16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).clamp(-128, 127) as i8 as u8;
    }
    let d = f16_at(y, 208);
    for j in 0..16 {
        let dj = d * (y[192 + j] as i8) as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    pack_q6_k(&levels, y);
}

/// Packs 256 six-bit levels into Q6_K's ql[128] and qh[64] (see [`deq_q6_k`] for the layout).
fn pack_q6_k(levels: &[u8; QK_K], y: &mut [u8]) {
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for c in 0..2 {
        let lv = &levels[128 * c..128 * c + 128];
        for l in 0..32 {
            ql[64 * c + l] = (lv[l] & 0x0F) | ((lv[l + 64] & 0x0F) << 4);
            ql[64 * c + 32 + l] = (lv[l + 32] & 0x0F) | ((lv[l + 96] & 0x0F) << 4);
            qh[32 * c + l] = (lv[l] >> 4)
                | ((lv[l + 32] >> 4) << 2)
                | ((lv[l + 64] >> 4) << 4)
                | ((lv[l + 96] >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod f16_tests {
    /// Every one of the 65,536 f16 values widens as the `half` crate widens it.
    #[test]
    fn f16_widening_is_halfs_for_every_value() {
        for h in 0..=u16::MAX {
            let (got, want) = (super::f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert_eq!(got.to_bits(), want.to_bits(), "f16 {h:#06x}: {got} vs {want}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.to_u32()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()), Some(t));
        }
        let ids: std::collections::HashSet<u32> =
            GgmlType::ALL.iter().map(|t| t.to_u32()).collect();
        assert_eq!(ids.len(), GgmlType::ALL.len(), "duplicate type ids");
        assert_eq!(GgmlType::from_u32(4), None);
        assert_eq!(GgmlType::from_name("q4_k"), Some(GgmlType::Q4K));
    }

    #[test]
    fn k_scale_packing_round_trips() {
        let ls = [0, 1, 17, 63, 40, 5, 33, 62];
        let lm = [63, 2, 0, 31, 16, 47, 1, 60];
        let mut packed = [0u8; 12];
        pack_scale_min_k4(&ls, &lm, &mut packed);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (ls[j], lm[j]), "sub-block {j}");
        }
    }

    #[test]
    fn bf16_rounding_matches_ggml() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)) & 0x7fc0, 0x7fc0);
    }
}
