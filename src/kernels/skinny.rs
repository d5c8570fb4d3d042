//! Dot products of a few activation rows with many weight rows: the `x·Wᵀ` of decoding, where
//! `x` has one row per sequence being generated. There the weight is read once per step and
//! each of its rows meets only a handful of inputs, so a GEMM's packing and per-tile threading
//! cost more than the arithmetic; plain vectorised dot products over each weight row, with the
//! row hot in L1, do not.

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent lanes: the compiler vectorises lane-wise sums (a single running sum
    // would be a serial dependency it may not reorder).
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn block_portable(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, o: &mut [f32]) {
    for r in 0..n {
        let wr = &w[r * k..(r + 1) * k];
        for i in 0..m {
            o[i * n + r] = dot_portable(&x[i * k..(i + 1) * k], wr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, o: &mut [f32]) {
    block_portable(x, m, w, n, k, o)
}

/// `o[i, r] = x_i · w_r` for the `m` rows of `x: [m, k]` and the `n` rows of `w: [n, k]`;
/// `o: [m, n]`.
pub fn dot_block(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, o: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && o.len() >= m * n, "dot block: operand sizes");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { block_avx2(x, m, w, n, k, o) };
    }
    block_portable(x, m, w, n, k, o)
}
