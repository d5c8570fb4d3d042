//! Thin safe wrappers over the `gemm` crate for row-major f32 matrices.

use gemm::Parallelism;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    // Tiny products are faster on one thread than on a woken pool.
    if m * n * k < 32 * 32 * 32 {
        Parallelism::None
    } else {
        Parallelism::Rayon(super::threads())
    }
}

/// `c[m,n] (+)= a[m,k] · b[n,k]ᵀ` (b stored row-major as `[n, k]`, e.g. a torch Linear weight).
pub fn matmul_nt(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    // SAFETY: the asserts above bound every index gemm touches given these strides.
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, n as isize, accumulate,
            a.as_ptr(), 1, k as isize,
            b.as_ptr(), k as isize, 1,
            1.0, 1.0, false, false, false,
            parallelism(m, n, k),
        )
    }
}

/// `c[m,n] (+)= a[m,k] · b[k,n]`.
pub fn matmul_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, n as isize, accumulate,
            a.as_ptr(), 1, k as isize,
            b.as_ptr(), 1, n as isize,
            1.0, 1.0, false, false, false,
            parallelism(m, n, k),
        )
    }
}

/// `c[m,n] (+)= a[k,m]ᵀ · b[k,n]` (a weight-gradient shaped product).
pub fn matmul_tn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert!(a.len() >= k * m && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: as above.
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, n as isize, accumulate,
            a.as_ptr(), m as isize, 1,
            b.as_ptr(), 1, n as isize,
            1.0, 1.0, false, false, false,
            parallelism(m, n, k),
        )
    }
}
