//! Decoding products on int8 activations: `x·Wᵀ` for a few rows of `x` and a weight kept in
//! GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K), without dequantizing the weight.
//!
//! Each activation row is quantized once per product in blocks of 32 values, as llama.cpp's
//! `Q8_0`/`Q8_1` do: `p = round(x / d)` with `d = max|x| / 127`, and the block's sum `Σp` kept
//! beside it. A weight block then meets an activation block in integer arithmetic:
//! - Q8_0 (`w = d_w·q`): `d_w·d_x·Σ q·p`;
//! - Q4_0 (`w = d_w·(q − 8)`, `q` a nibble): `d_w·d_x·(Σ q·p − 8·Σp)`;
//! - Q4_1 (`w = d_w·q + m_w`): `d_w·d_x·Σ q·p + m_w·d_x·Σp`;
//! - Q4_K, per 32-value sub-block `j` of its 256 (`w = d·sc_j·q − dmin·m_j`): the same with
//!   scale `d·sc_j` and offset `−dmin·m_j`;
//! - Q6_K (`w = d·sc_g·(q − 32)`, a scale per 16 values): `d·d_x·(sc_a·Σ_a (q − 32)·p +
//!   sc_b·Σ_b (q − 32)·p)` over the two halves of each 32 values.
//!
//! Every type is thus read as units of 32 values, each a scale per half, an offset and 32
//! quants.
//!
//! Decoding reads every weight once per generated token and does little arithmetic with it;
//! widening it to f32 first (four bytes written and read again per value) cost more than the
//! products. Here a Q4 value stays half a byte, and AVX2's `vpmaddubsw` multiplies 32 of them
//! in one instruction. The activations lose precision (8 bits per value, per block of 32), so
//! this path is for generation only: [`with_int8_activations`] turns it on for a scope, and
//! training and evaluation never see it. [`dot_rows_reference`] is the same arithmetic in
//! scalar code, so the vector kernel is tested against it on every machine that has AVX2.

use crate::formats::gguf::quants::{f16_at, scale_min_k4, GgmlType};
use std::cell::Cell;

/// Values per block, of the weight types here and of the quantized activations.
const QK: usize = 32;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the products of blocked weights on int8 activations where they can be
/// ([`supports`]); the setting is the calling thread's and is restored afterwards. (A product
/// reads it on the thread that calls it, before its work is split; generation never runs
/// beside training, so no training product can meet the setting.) `FERROTUNE_DECODE_INT8=0`
/// keeps the f32 products (for comparing).
pub fn with_int8_activations<R>(f: impl FnOnce() -> R) -> R {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let allowed = *ALLOWED.get_or_init(|| std::env::var("FERROTUNE_DECODE_INT8").map_or(true, |v| v != "0"));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(allowed)));
    f()
}

/// Whether the calling thread is inside [`with_int8_activations`].
pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Whether rows of `ty` with `k` values each have an int8 product here.
pub fn supports(ty: GgmlType, k: usize) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K) && k.is_multiple_of(ty.block_size())
}

/// Rows of activations quantized in blocks of 32 values.
pub struct Q8Rows {
    blocks: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// Per block, `d·Σp`: what a weight block's offset multiplies.
    scaled_sums: Vec<f32>,
}

impl Q8Rows {
    /// `x: [m, k]` with `k` a multiple of 32.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK) && x.len() >= m * k, "q8 rows: {m} rows of {k} values");
        let blocks = m * k / QK;
        let mut out = Q8Rows { blocks: k / QK, q: vec![0; m * k], d: Vec::with_capacity(blocks), scaled_sums: Vec::with_capacity(blocks) };
        for (xb, qb) in x[..m * k].chunks_exact(QK).zip(out.q.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (v * inv).round() as i8;
                sum += *q as i32;
            }
            out.d.push(d);
            out.scaled_sums.push(d * sum as f32);
        }
        out
    }

    fn rows(&self) -> usize {
        self.d.len() / self.blocks.max(1)
    }
}

/// How a unit's 32 quants are stored, from the byte [`Unit::at`] gives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quants {
    /// 16 bytes: low nibbles are values 0..16, high nibbles 16..32 (Q4_0, Q4_1).
    Split,
    /// The low (or high) nibbles of 32 bytes (a Q4_K sub-block).
    Low,
    High,
    /// 32 signed bytes (Q8_0).
    Signed,
    /// Q6_K's 6-bit values less 32: the low (`upper` false) or high nibbles of 32 bytes from
    /// `at`, with two more bits each from `qh_at`'s 32 bytes, shifted right by `shift`.
    Six {
        upper: bool,
        qh_at: usize,
        shift: u32,
    },
}

/// The parts of one 32-value unit of a weight row that enter its products: its scale, its
/// offset (Q4_1's `m`; Q4_0's `−8·d` and Q4_K's `−dmin·m_j`, which meet `Σp` the same way),
/// where its quants start in the row, and how they are stored.
struct Unit {
    /// The scale of values 0..16 and of 16..32 (the same but in Q6_K).
    scale: [f32; 2],
    offset: f32,
    at: usize,
    quants: Quants,
}

/// Unit `u` of a weight row `row` of `ty` blocks, with `f16` widening the block's scales.
#[inline(always)]
fn unit(ty: GgmlType, row: &[u8], u: usize, f16: impl Fn(&[u8], usize) -> f32) -> Unit {
    match ty {
        GgmlType::Q4K => {
            let (b, j) = (u / 8 * ty.type_size(), u % 8);
            let (d, dmin) = (f16(row, b), f16(row, b + 2));
            let (sc, m) = scale_min_k4(j, &row[b + 4..b + 16]);
            let scale = d * sc as f32;
            let quants = if j % 2 == 0 { Quants::Low } else { Quants::High };
            return Unit { scale: [scale; 2], offset: -dmin * m as f32, at: b + 16 + 32 * (j / 2), quants };
        }
        GgmlType::Q6K => {
            // ql[128], qh[64], scales[16] (i8), d: unit k of half c is values 128c + 32k..
            let (b, c, k) = (u / 8 * ty.type_size(), u % 8 / 4, u % 4);
            let d = f16(row, b + 208);
            let sc = |g: usize| d * row[b + 192 + 8 * c + 2 * k + g] as i8 as f32;
            let quants = Quants::Six { upper: k >= 2, qh_at: b + 128 + 32 * c, shift: 2 * k as u32 };
            return Unit { scale: [sc(0), sc(1)], offset: 0.0, at: b + 64 * c + 32 * (k % 2), quants };
        }
        _ => {}
    }
    let b = u * ty.type_size();
    let d = f16(row, b);
    match ty {
        GgmlType::Q4_0 => Unit { scale: [d; 2], offset: -8.0 * d, at: b + 2, quants: Quants::Split },
        GgmlType::Q4_1 => Unit { scale: [d; 2], offset: f16(row, b + 2), at: b + 4, quants: Quants::Split },
        _ => Unit { scale: [d; 2], offset: 0.0, at: b + 2, quants: Quants::Signed },
    }
}

/// `o[i·n + r] = x_i · w_r` for the `n` weight rows in `w` (each `row_bytes` of `ty` blocks)
/// and every row of `x`; `o: [rows of x, n]`.
pub fn dot_rows(ty: GgmlType, w: &[u8], row_bytes: usize, n: usize, x: &Q8Rows, o: &mut [f32]) {
    assert!(
        supports(ty, x.blocks * QK) && w.len() >= n * row_bytes && row_bytes * ty.block_size() == x.blocks * QK * ty.type_size() && o.len() >= x.rows() * n,
        "q8 dot: operand sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has the features the function was compiled for; sizes checked above.
        return unsafe { avx2::dot_rows(ty, w, row_bytes, n, x, o) };
    }
    dot_rows_reference(ty, w, row_bytes, n, x, o)
}

/// [`dot_rows`] in scalar code: the integer sums exactly, then block by block in f32.
pub fn dot_rows_reference(ty: GgmlType, w: &[u8], row_bytes: usize, n: usize, x: &Q8Rows, o: &mut [f32]) {
    for r in 0..n {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for i in 0..x.rows() {
            let mut acc = 0f32;
            for u in 0..x.blocks {
                let at = i * x.blocks + u;
                let un = unit(ty, wr, u, f16_at);
                let (p, qs) = (&x.q[at * QK..(at + 1) * QK], &wr[un.at..]);
                let q = |j: usize| -> i32 {
                    match un.quants {
                        Quants::Signed => qs[j] as i8 as i32,
                        Quants::Split if j < QK / 2 => (qs[j] & 0x0F) as i32,
                        Quants::Split => (qs[j - QK / 2] >> 4) as i32,
                        Quants::Low => (qs[j] & 0x0F) as i32,
                        Quants::High => (qs[j] >> 4) as i32,
                        Quants::Six { upper, qh_at, shift } => {
                            let low = if upper { qs[j] >> 4 } else { qs[j] & 0x0F };
                            (low | ((wr[qh_at + j] >> shift) & 3) << 4) as i32 - 32
                        }
                    }
                };
                let half = |h: usize| (16 * h..16 * h + 16).map(|j| q(j) * p[j] as i32).sum::<i32>() as f32;
                acc += x.d[at] * (un.scale[0] * half(0) + un.scale[1] * half(1)) + un.offset * x.scaled_sums[at];
            }
            o[i * n + r] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{unit, Q8Rows, Quants, QK};
    use crate::formats::gguf::quants::GgmlType;
    use std::arch::x86_64::*;

    /// How far ahead of the row being multiplied its successors are prefetched.
    const PREFETCH_BYTES: usize = 2048;

    #[inline(always)]
    unsafe fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([*b.get_unchecked(i), *b.get_unchecked(i + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// A unit's 32 quants as bytes: nibbles and Q6_K's 6-bit values as unsigned values (Q6_K's
    /// 32 is taken off in [`unit_dot`]), Q8_0's as signed.
    #[inline(always)]
    unsafe fn weight_bytes(quants: Quants, row: *const u8, qs: *const u8) -> __m256i {
        let low = _mm256_set1_epi8(0x0F);
        match quants {
            Quants::Six { upper, qh_at, shift } => {
                let ql = _mm256_loadu_si256(qs as *const __m256i);
                let nibbles = if upper { _mm256_and_si256(_mm256_srli_epi16(ql, 4), low) } else { _mm256_and_si256(ql, low) };
                let qh = _mm256_loadu_si256(row.add(qh_at) as *const __m256i);
                // Shifting 16-bit lanes moves the neighbour byte's bits into each byte's top
                // bits only; the mask keeps bits 0-1, which are the byte's own.
                let two = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi8(3));
                _mm256_or_si256(nibbles, _mm256_slli_epi16(two, 4))
            }
            Quants::Signed => _mm256_loadu_si256(qs as *const __m256i),
            Quants::Low => _mm256_and_si256(_mm256_loadu_si256(qs as *const __m256i), low),
            Quants::High => _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256(qs as *const __m256i), 4), low),
            Quants::Split => {
                let packed = _mm_loadu_si128(qs as *const __m128i);
                let low = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(packed, low);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                _mm256_set_m128i(hi, lo)
            }
        }
    }

    /// Eight i32 partial sums of `w · p` over one unit.
    #[inline(always)]
    unsafe fn unit_dot(quants: Quants, w: __m256i, p: *const i8) -> __m256i {
        let p = _mm256_loadu_si256(p as *const __m256i);
        // vpmaddubsw multiplies unsigned by signed bytes: Q8_0's signed weights go in as their
        // magnitudes, their signs moved onto the activations.
        let ones = _mm256_set1_epi16(1);
        match quants {
            Quants::Signed => _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(p, w)), ones),
            // Σ (q − 32)·p = Σ q·p − Σ 32·p, per lane of 4 values (lanes 0-3 are the first 16).
            Quants::Six { .. } => {
                _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, p), ones), _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(32), p), ones))
            }
            _ => _mm256_madd_epi16(_mm256_maddubs_epi16(w, p), ones),
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Unit `bi` of weight row `wr` against rows `i0..i0 + G` of `x`, into `acc` (the unit
    /// products) and `offset` (the offset terms).
    #[inline(always)]
    unsafe fn add_block<const G: usize>(ty: GgmlType, wr: &[u8], bi: usize, x: &Q8Rows, i0: usize, acc: &mut [__m256; G], offset: &mut [f32; G]) {
        let un = unit(ty, wr, bi, |b, i| f16_at(b, i));
        let w = weight_bytes(un.quants, wr.as_ptr(), wr.as_ptr().add(un.at));
        let [sa, sb] = un.scale;
        let scale = _mm256_setr_ps(sa, sa, sa, sa, sb, sb, sb, sb);
        for g in 0..G {
            let at = (i0 + g) * x.blocks + bi;
            let sums = unit_dot(un.quants, w, x.q.as_ptr().add(at * QK));
            let s = _mm256_mul_ps(scale, _mm256_set1_ps(*x.d.get_unchecked(at)));
            acc[g] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums), acc[g]);
            offset[g] = un.offset.mul_add(*x.scaled_sums.get_unchecked(at), offset[g]);
        }
    }

    /// Up to four rows of `x` (from `i0`) against weight row `wr`: each weight block is
    /// unpacked once and meets every row while in registers. Even and odd blocks go to
    /// separate sums, so one row's chain of dependent multiply-adds is split in two.
    #[inline(always)]
    unsafe fn row_group<const G: usize>(ty: GgmlType, wr: &[u8], x: &Q8Rows, i0: usize, out: &mut [f32; 4]) {
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); G], [_mm256_setzero_ps(); G]);
        let (mut off0, mut off1) = ([0f32; G], [0f32; G]);
        let mut bi = 0;
        while bi + 2 <= x.blocks {
            add_block(ty, wr, bi, x, i0, &mut acc0, &mut off0);
            add_block(ty, wr, bi + 1, x, i0, &mut acc1, &mut off1);
            bi += 2;
        }
        if bi < x.blocks {
            add_block(ty, wr, bi, x, i0, &mut acc0, &mut off0);
        }
        for g in 0..G {
            out[g] = hsum(_mm256_add_ps(acc0[g], acc1[g])) + off0[g] + off1[g];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(ty: GgmlType, w: &[u8], row_bytes: usize, n: usize, x: &Q8Rows, o: &mut [f32]) {
        let m = x.rows();
        let mut out = [0f32; 4];
        // The weight streams from memory once per step and the arithmetic is too little to hide
        // its latency: asking for the row about 2 KB ahead took one-row decoding of SmolLM2
        // from 39 to about 70 tokens/s (the hardware prefetcher alone did not keep up).
        let ahead = PREFETCH_BYTES.div_ceil(row_bytes);
        for r in 0..n {
            let wr = &w[r * row_bytes..(r + 1) * row_bytes];
            if r + ahead < n {
                let next = w.as_ptr().add((r + ahead) * row_bytes);
                for line in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(line) as *const i8);
                }
            }
            let mut i = 0;
            while i < m {
                let g = (m - i).min(4);
                match g {
                    4 => row_group::<4>(ty, wr, x, i, &mut out),
                    3 => row_group::<3>(ty, wr, x, i, &mut out),
                    2 => row_group::<2>(ty, wr, x, i, &mut out),
                    _ => row_group::<1>(ty, wr, x, i, &mut out),
                }
                for (j, &v) in out[..g].iter().enumerate() {
                    o[(i + j) * n + r] = v;
                }
                i += g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::quants::{dequantize, quantize};
    use crate::rng::SplitMix64;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| (r.next_f32() - 0.5) * 4.0).collect()
    }

    /// The int8 products equal the f32 products of the dequantized weight with the dequantized
    /// activations (up to f32 rounding), whichever path the CPU takes; and stay within the
    /// activations' quantization error of the exact f32 product.
    #[test]
    fn int8_products_match_the_dequantized_arithmetic() {
        for (ty, k) in [(GgmlType::Q4_0, 96), (GgmlType::Q4_1, 96), (GgmlType::Q8_0, 96), (GgmlType::Q4K, 512), (GgmlType::Q6K, 512)] {
            let n = 7;
            let w = quantize(ty, &values(n * k, 1)).unwrap();
            let wf = dequantize(ty, &w, n * k).unwrap();
            let row_bytes = w.len() / n;
            for m in [1, 3, 4, 6] {
                let mut x = values(m * k, 2 + m as u64);
                x[5] = 0.0;
                x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block (d = 0)
                let xq = Q8Rows::quantize(&x, m, k);
                let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
                dot_rows(ty, &w, row_bytes, n, &xq, &mut fast);
                dot_rows_reference(ty, &w, row_bytes, n, &xq, &mut slow);
                for i in 0..m {
                    let xd: Vec<f32> = (0..k).map(|j| xq.q[i * k + j] as f32 * xq.d[(i * k + j) / QK]).collect();
                    for r in 0..n {
                        let wr = &wf[r * k..(r + 1) * k];
                        let exact: f64 = wr.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let size: f64 = wr.iter().zip(&xd).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>().max(1e-6);
                        for (name, v) in [("vector", fast[i * n + r]), ("scalar", slow[i * n + r])] {
                            assert!((v as f64 - exact).abs() <= 1e-5 * size, "{ty} m={m} ({i},{r}) {name}: {v} vs {exact}");
                        }
                        // Against unquantized activations: within half a quantization step per value.
                        let plain: f64 = wr.iter().zip(&x[i * k..(i + 1) * k]).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let step: f64 = (0..k).map(|j| wr[j].abs() as f64 * xq.d[(i * k + j) / QK] as f64 / 2.0).sum();
                        assert!((fast[i * n + r] as f64 - plain).abs() <= step * 1.01 + 1e-5, "{ty}: {} vs {plain} (bound {step})", fast[i * n + r]);
                    }
                }
            }
        }
    }

    #[test]
    fn the_scope_turns_the_path_on_and_back_off() {
        assert!(!enabled());
        let inside = with_int8_activations(enabled);
        assert_eq!(inside, std::env::var("FERROTUNE_DECODE_INT8").map_or(true, |v| v != "0"));
        assert!(!enabled());
        assert!(supports(GgmlType::Q4_1, 64) && !supports(GgmlType::Q4_1, 48) && !supports(GgmlType::F16, 256));
        assert!(supports(GgmlType::Q4K, 512) && !supports(GgmlType::Q4K, 96));
    }
}
