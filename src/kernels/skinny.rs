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

/// `x_i · w` for four rows of `x` at once: four independent sets of sixteen lane sums, so
/// the FMA units have eight vector chains in flight instead of two, and each weight value
/// loaded serves four products.
#[inline(always)]
fn dot4_portable(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let lanes = |s: &[f32]| -> [f32; 16] { s.try_into().expect("a chunk of 16") };
    let chunks = w.chunks_exact(16).zip(x[0].chunks_exact(16)).zip(x[1].chunks_exact(16)).zip(x[2].chunks_exact(16)).zip(x[3].chunks_exact(16));
    for ((((wc, c0), c1), c2), c3) in chunks {
        let (wc, c0, c1, c2, c3) = (lanes(wc), lanes(c0), lanes(c1), lanes(c2), lanes(c3));
        for l in 0..16 {
            a0[l] += c0[l] * wc[l];
            a1[l] += c1[l] * wc[l];
            a2[l] += c2[l] * wc[l];
            a3[l] += c3[l] * wc[l];
        }
    }
    let k = w.len() / 16 * 16;
    let tail = |xi: &[f32]| xi[k..].iter().zip(&w[k..]).map(|(p, q)| p * q).sum::<f32>();
    [a0.iter().sum::<f32>() + tail(x[0]), a1.iter().sum::<f32>() + tail(x[1]), a2.iter().sum::<f32>() + tail(x[2]), a3.iter().sum::<f32>() + tail(x[3])]
}

#[inline(always)]
fn block_portable(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, o: &mut [f32]) {
    let row = |i: usize| &x[i * k..(i + 1) * k];
    for r in 0..n {
        let wr = &w[r * k..(r + 1) * k];
        let mut i = 0;
        while i + 4 <= m {
            let d = dot4_portable([row(i), row(i + 1), row(i + 2), row(i + 3)], wr);
            for (j, v) in d.into_iter().enumerate() {
                o[(i + j) * n + r] = v;
            }
            i += 4;
        }
        for i in i..m {
            o[i * n + r] = dot_portable(row(i), wr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, o: &mut [f32]) {
    block_portable(x, m, w, n, k, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// `a · b` over the shorter of the two.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
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
