//! A vectorised `exp` for the softmax loops (attention, LM-head cross-entropy). The libm `expf`
//! is a scalar call of ~15 cycles; at 50M+ exponentials per training step it showed as 5% of
//! the profile. This is the Cephes single-precision scheme (range reduction by ln 2 split in
//! two parts, degree-6 polynomial, exponent built from bits): within 2 ulp of `f32::exp` on
//! the range softmax uses, written branch-free so the compiler vectorises it, and compiled
//! for AVX2+FMA behind a run-time check with a portable fallback.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this `exp` underflows f32's normal range; the result is flushed to 0.
const MIN_ARG: f32 = -87.33654;
const MAX_ARG: f32 = 88.37626;

#[inline(always)]
fn exp_one(x: f32) -> f32 {
    let xc = x.clamp(MIN_ARG, MAX_ARG);
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from the rounded integer's bits; n ∈ [-126, 127] after the clamp.
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32 + 127) << 23) as u32);
    if x < MIN_ARG {
        0.0
    } else {
        y * two_n
    }
}

#[inline(always)]
fn exp_sub_portable(v: &mut [f32], m: f32) {
    for x in v.iter_mut() {
        *x = exp_one(*x - m);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_avx2(v: &mut [f32], m: f32) {
    exp_sub_portable(v, m)
}

/// `v[i] = exp(v[i] − m)` in place.
pub fn exp_sub(v: &mut [f32], m: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { exp_sub_avx2(v, m) };
    }
    exp_sub_portable(v, m)
}

#[inline(always)]
fn sigmoid_portable(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + exp_one(-v));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_avx2(x: &[f32], out: &mut [f32]) {
    sigmoid_portable(x, out)
}

/// `out[i] = 1 / (1 + exp(−x[i]))` (the logistic function, SwiGLU's gate).
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { sigmoid_avx2(x, out) };
    }
    sigmoid_portable(x, out)
}

/// The largest value of a slice (`−∞` for an empty one; NaNs ignored, as `f32::max` does), in
/// sixteen independent lanes: a single running maximum waits on each comparison before the
/// next, which made the softmax rows' maxima a tenth of long-sequence attention.
pub fn lane_max(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut blocks = v.chunks_exact(16);
    for block in &mut blocks {
        for (l, &x) in lanes.iter_mut().zip(block) {
            *l = l.max(x);
        }
    }
    let tail = blocks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

/// Sum of a slice in eight f32 lanes (the order vectorised code adds in) folded into f64 every
/// 1024 elements, so that sums over a whole vocabulary stay at f32 rounding level.
pub fn lane_sum(v: &[f32]) -> f64 {
    let mut total = 0f64;
    for chunk in v.chunks(1024) {
        let mut lanes = [0f32; 8];
        let mut blocks = chunk.chunks_exact(8);
        for block in &mut blocks {
            for (l, x) in lanes.iter_mut().zip(block) {
                *l += x;
            }
        }
        for (l, x) in lanes.iter_mut().zip(blocks.remainder()) {
            *l += x;
        }
        total += lanes.iter().map(|&x| x as f64).sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_max_is_the_maximum() {
        for n in [0usize, 1, 15, 16, 17, 100, 1023] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.5).collect();
            assert_eq!(lane_max(&v), v.iter().copied().fold(f32::NEG_INFINITY, f32::max), "{n} values");
        }
        assert_eq!(lane_max(&[f32::NAN, -3.0, f32::NAN]), -3.0);
    }

    #[test]
    fn matches_std_exp_within_two_ulp() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -87.0 + i as f32 * (175.0 / 200_000.0)).collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 88.0, -87.3]);
        let mut ys = xs.clone();
        exp_sub(&mut ys, 0.0);
        for (x, y) in xs.iter().zip(&ys) {
            let want = x.exp();
            let ulp = (want.to_bits() as i64 - y.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {y}, std gives {want} ({ulp} ulp apart)");
        }
    }

    #[test]
    fn underflow_and_minus_infinity_give_zero() {
        let mut v = [f32::NEG_INFINITY, -1000.0, -88.0];
        exp_sub(&mut v, 0.0);
        assert_eq!(v, [0.0, 0.0, 0.0]);
        let mut w = [3.0f32, 5.0];
        exp_sub(&mut w, 5.0);
        assert!((w[0] - (-2f32).exp()).abs() < 1e-7 && w[1] == 1.0);
    }

    #[test]
    fn sigmoid_matches_the_formula_and_saturates() {
        let xs: Vec<f32> = (0..20_001).map(|i| -100.0 + i as f32 * 0.01).collect();
        let mut s = vec![0f32; xs.len()];
        sigmoid(&xs, &mut s);
        for (x, y) in xs.iter().zip(&s) {
            let want = 1.0 / (1.0 + (-(*x as f64)).exp());
            assert!((*y as f64 - want).abs() <= 2e-7 * want.max(1e-30) + 1e-38, "sigmoid({x}) = {y}, want {want}");
        }
        let mut ends = [0f32; 2];
        sigmoid(&[-1000.0, 1000.0], &mut ends);
        assert!(ends[0] < 1e-30 && ends[1] == 1.0, "{ends:?}");
    }

    #[test]
    fn lane_sum_is_accurate_on_long_rows() {
        let v: Vec<f32> = (0..49_152).map(|i| 1.0 + (i % 7) as f32 * 1e-3).collect();
        let exact: f64 = v.iter().map(|&x| x as f64).sum();
        let rel = (lane_sum(&v) - exact).abs() / exact;
        assert!(rel < 1e-6, "relative error {rel}");
    }
}
