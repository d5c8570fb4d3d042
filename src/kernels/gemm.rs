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
    gemm_views(c, View::rows(0, n), a, View::rows(0, k), b, View::rows(0, k).t(), m, k, n, accumulate, 1.0, parallelism(m, n, k));
}

/// `c[m,n] (+)= a[m,k] · b[k,n]`.
pub fn matmul_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    gemm_views(c, View::rows(0, n), a, View::rows(0, k), b, View::rows(0, n), m, k, n, accumulate, 1.0, parallelism(m, n, k));
}

/// `c[m,n] = accumulate·c + beta·a[m,k] · b[n,k]ᵀ`: [`matmul_nt`] with the product scaled.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_scaled(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool, beta: f32) {
    gemm_views(c, View::rows(0, n), a, View::rows(0, k), b, View::rows(0, k).t(), m, k, n, accumulate, beta, parallelism(m, n, k));
}

/// `c[m,n] = accumulate·c + beta·a[m,k] · b[k,n]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn_scaled(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool, beta: f32) {
    gemm_views(c, View::rows(0, n), a, View::rows(0, k), b, View::rows(0, n), m, k, n, accumulate, beta, parallelism(m, n, k));
}

/// `c[m,n] = accumulate·c + beta·a[k,m]ᵀ · b[k,n]` (both operands stored with `k` rows: the
/// weight-gradient shape `dyᵀ·x`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn_scaled(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool, beta: f32) {
    gemm_views(c, View::rows(0, n), a, View::rows(0, m).t(), b, View::rows(0, n), m, k, n, accumulate, beta, parallelism(m, n, k));
}

/// `c[n,n] += beta·xᵀ·x` for `x: [rows, n]`, on and below the diagonal only: the lower
/// triangle in column blocks, about half the work of the full product (a Gram matrix is
/// symmetric). Entries above the diagonal are partly written; read with [`gram_entry`].
pub fn gram_lower_accumulate(c: &mut [f32], x: &[f32], rows: usize, n: usize, beta: f32) {
    const BLOCK: usize = 128;
    assert!(c.len() == n * n && x.len() >= rows * n);
    for j0 in (0..n).step_by(BLOCK) {
        let w = BLOCK.min(n - j0);
        // c[j0.., j0..j0+w] += beta · x[:, j0..]ᵀ · x[:, j0..j0+w]
        let xt = View { offset: j0, row_stride: 1, col_stride: n };
        matmul_strided(c, View::rows(j0 * n + j0, n), x, xt, x, View::rows(j0, n), n - j0, rows, w, true, beta);
    }
}

/// Entry `(i, j)` of a Gram matrix [`gram_lower_accumulate`] wrote.
pub fn gram_entry(c: &[f32], n: usize, i: usize, j: usize) -> f32 {
    if i >= j {
        c[i * n + j]
    } else {
        c[j * n + i]
    }
}

/// A row-major matrix view inside a larger buffer: element `(i, j)` is at
/// `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub struct View {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    pub fn rows(offset: usize, row_stride: usize) -> Self {
        Self { offset, row_stride, col_stride: 1 }
    }
    /// The transpose of a row-major view.
    pub fn t(self) -> Self {
        Self { offset: self.offset, row_stride: self.col_stride, col_stride: self.row_stride }
    }
    fn max_index(&self, rows: usize, cols: usize) -> usize {
        self.offset + rows.saturating_sub(1) * self.row_stride + cols.saturating_sub(1) * self.col_stride
    }
}

/// `c[m,n] (+)= beta·a[m,k]·b[k,n]` on strided views, multi-threaded when large enough.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    c: &mut [f32], cv: View, a: &[f32], av: View, b: &[f32], bv: View,
    m: usize, k: usize, n: usize, accumulate: bool, beta: f32,
) {
    gemm_views(c, cv, a, av, b, bv, m, k, n, accumulate, beta, parallelism(m, n, k))
}

/// `c[m,n] (+)= beta·a[m,k]·b[k,n]` on strided views, single-threaded (callers parallelise
/// over independent products, e.g. attention heads).
#[allow(clippy::too_many_arguments)]
pub fn matmul_view(
    c: &mut [f32], cv: View, a: &[f32], av: View, b: &[f32], bv: View,
    m: usize, k: usize, n: usize, accumulate: bool, beta: f32,
) {
    gemm_views(c, cv, a, av, b, bv, m, k, n, accumulate, beta, Parallelism::None)
}

#[allow(clippy::too_many_arguments)]
fn gemm_views(
    c: &mut [f32], cv: View, a: &[f32], av: View, b: &[f32], bv: View,
    m: usize, k: usize, n: usize, accumulate: bool, beta: f32, par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(cv.max_index(m, n) < c.len() && (k == 0 || (av.max_index(m, k) < a.len() && bv.max_index(k, n) < b.len())));
    // SAFETY: the assert bounds every element gemm reads or writes through these strides.
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr().add(cv.offset), cv.col_stride as isize, cv.row_stride as isize, accumulate,
            a.as_ptr().add(av.offset), av.col_stride as isize, av.row_stride as isize,
            b.as_ptr().add(bv.offset), bv.col_stride as isize, bv.row_stride as isize,
            1.0, beta, false, false, false,
            par,
        )
    }
}
