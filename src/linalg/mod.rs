//! Dense linear algebra for method initialisation and analysis (SVD, QR, solves), in f64:
//! these run once per site, not per step, so exactness matters more than speed. Matrices are
//! nalgebra's; the O(n³) decompositions of large matrices (SVD, symmetric eigen, inverse) run
//! in faer, whose blocked algorithms are several times faster than nalgebra's unblocked ones
//! (EVA and CorDA decompose 1536×1536 matrices by the dozen). Tensors cross over as row-major
//! `[rows, cols]` f32.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use faer::linalg::solvers::DenseSolveCore;
use nalgebra::DMatrix;

pub mod hadamard;
mod lanczos;

pub type Mat = DMatrix<f64>;

/// Matrices from this size on go to faer; below it nalgebra is as fast, and LoRA-Pro's per-step
/// r×r solves stay as they were.
const FAER_FROM: usize = 64;

fn to_faer(m: &Mat) -> faer::Mat<f64> {
    faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)])
}

fn check_finite(m: &Mat, what: &str) -> Result<()> {
    if m.iter().any(|x| !x.is_finite()) {
        return Err(Error::Model(format!("{what} of a matrix with non-finite entries")));
    }
    Ok(())
}

/// `a·b`; large products in faer (blocked and multi-threaded), small ones in nalgebra.
pub fn matmul(a: &Mat, b: &Mat) -> Mat {
    assert_eq!(a.ncols(), b.nrows(), "matmul: inner dimensions differ");
    if a.nrows().min(a.ncols()).min(b.ncols()) < FAER_FROM {
        return a * b;
    }
    let mut c = faer::Mat::<f64>::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(&mut c, faer::Accum::Replace, &to_faer(a), &to_faer(b), 1.0, faer::get_global_parallelism());
    Mat::from_fn(a.nrows(), b.ncols(), |i, j| c[(i, j)])
}

/// A 2-D f32 tensor as an f64 matrix.
pub fn from_tensor(t: &Tensor) -> Result<Mat> {
    let (r, c) = t.dims2()?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(Mat::from_row_iterator(r, c, v.into_iter().map(f64::from)))
}

/// A matrix as a row-major f32 tensor on the CPU.
pub fn to_tensor(m: &Mat) -> Result<Tensor> {
    let (r, c) = m.shape();
    let v: Vec<f32> = (0..r).flat_map(|i| (0..c).map(move |j| (i, j))).map(|(i, j)| m[(i, j)] as f32).collect();
    Ok(Tensor::from_vec(v, (r, c), &Device::Cpu)?)
}

/// A matrix from row-major values.
pub fn from_rows(rows: usize, cols: usize, v: &[f32]) -> Mat {
    Mat::from_row_iterator(rows, cols, v.iter().map(|&x| f64::from(x)))
}

/// Thin SVD `m = U·diag(s)·Vᵀ` with singular values in descending order: `u: [rows, k]`,
/// `s: [k]`, `vt: [k, cols]`, `k = min(rows, cols)`.
pub struct Svd {
    pub u: Mat,
    pub s: Vec<f64>,
    pub vt: Mat,
}

pub fn svd(m: &Mat) -> Result<Svd> {
    let k = m.nrows().min(m.ncols());
    if k == 0 {
        return Err(Error::Model("SVD of an empty matrix".into()));
    }
    check_finite(m, "SVD")?;
    // (u, s, v) in any order of the singular values.
    let (u, s, v): (Mat, Vec<f64>, Mat) = if k >= FAER_FROM {
        let d = to_faer(m).thin_svd().map_err(|e| Error::Model(format!("SVD did not converge: {e:?}")))?;
        let (u, v, s) = (d.U(), d.V(), d.S().column_vector());
        (Mat::from_fn(m.nrows(), k, |i, j| u[(i, j)]), (0..k).map(|i| s[i]).collect(), Mat::from_fn(m.ncols(), k, |i, j| v[(i, j)]))
    } else {
        let d = nalgebra::SVD::new(m.clone(), true, true);
        (d.u.expect("requested U"), d.singular_values.iter().copied().collect(), d.v_t.expect("requested Vᵀ").transpose())
    };
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    Ok(Svd {
        u: Mat::from_fn(m.nrows(), k, |i, j| u[(i, order[j])]),
        s: order.iter().map(|&i| s[i]).collect(),
        vt: Mat::from_fn(k, m.ncols(), |i, j| v[(j, order[i])]),
    })
}

/// The singular values of `m`, descending, without the singular vectors (much cheaper than
/// [`svd`] for the large matrices of a report).
pub fn singular_values(m: &Mat) -> Result<Vec<f64>> {
    let k = m.nrows().min(m.ncols());
    if k == 0 {
        return Err(Error::Model("singular values of an empty matrix".into()));
    }
    check_finite(m, "singular values")?;
    let mut s: Vec<f64> = if k >= FAER_FROM {
        to_faer(m).singular_values().map_err(|e| Error::Model(format!("SVD did not converge: {e:?}")))?
    } else {
        nalgebra::SVD::new(m.clone(), false, false).singular_values.iter().copied().collect()
    };
    s.sort_by(|a, b| b.total_cmp(a));
    Ok(s)
}

/// Thin QR `m = Q·R`, `q: [rows, k]` with orthonormal columns, `r: [k, cols]` upper
/// triangular, `k = min(rows, cols)`.
pub fn qr(m: &Mat) -> (Mat, Mat) {
    let d = nalgebra::QR::new(m.clone());
    (d.q(), d.r())
}

/// `a⁻¹`, or an error naming `what` when `a` is singular.
pub fn inverse(a: &Mat, what: &str) -> Result<Mat> {
    let singular = || Error::Model(format!("{what} is singular"));
    if a.nrows() < FAER_FROM {
        return a.clone().try_inverse().ok_or_else(singular);
    }
    check_finite(a, what)?;
    let inv = to_faer(a).partial_piv_lu().inverse();
    let out = Mat::from_fn(a.nrows(), a.ncols(), |i, j| inv[(i, j)]);
    // LU with partial pivoting does not stop at a zero pivot; it leaves infinities.
    if out.iter().any(|x| !x.is_finite()) {
        return Err(singular());
    }
    Ok(out)
}

/// Solves `a·x = b` (LU with partial pivoting).
pub fn solve(a: &Mat, b: &Mat, what: &str) -> Result<Mat> {
    a.clone().lu().solve(b).ok_or_else(|| Error::Model(format!("{what} is singular")))
}

/// Eigen-decomposition of a symmetric matrix, eigenvalues descending: `(values, vectors as
/// columns)`.
pub fn sym_eig(a: &Mat) -> (Vec<f64>, Mat) {
    let n = a.nrows();
    let faer = (n >= FAER_FROM).then(|| to_faer(a).self_adjoint_eigen(faer::Side::Lower).ok()).flatten();
    let (vals, vecs): (Vec<f64>, Mat) = match faer {
        Some(d) => ((0..n).map(|i| d.S().column_vector()[i]).collect(), Mat::from_fn(n, n, |i, j| d.U()[(i, j)])),
        // Small, or faer did not converge (nalgebra's iteration always returns).
        None => {
            let d = nalgebra::SymmetricEigen::new(a.clone());
            (d.eigenvalues.iter().copied().collect(), d.eigenvectors)
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| vals[y].total_cmp(&vals[x]));
    (order.iter().map(|&i| vals[i]).collect(), Mat::from_fn(n, n, |i, j| vecs[(i, order[j])]))
}

/// The `k` largest eigenvalues (descending) of the symmetric `a` and their eigenvectors
/// (columns, `[n, k]`). Where `k` is small beside `n`, block Lanczos ([`lanczos`]) finds them
/// without the whole decomposition; it stops once every wanted pair's residual is measured
/// small, or gives up after as many products with `a` as the full decomposition would cost
/// (slowly converging, flat spectra), and the full decomposition is truncated instead.
pub fn top_eigen(a: &Mat, k: usize) -> (Vec<f64>, Mat) {
    let n = a.nrows();
    let k = k.min(n);
    if k > 0 && n >= 4 * lanczos::basis_size(k) && a.iter().all(|x| x.is_finite()) {
        // nalgebra stores column-major, as the solver reads.
        if let Some((vals, vecs)) = lanczos::top_pairs(a.as_slice(), n, k, n / 2, faer::get_global_parallelism()) {
            return (vals, Mat::from_column_slice(n, k, &vecs));
        }
    }
    let (vals, vecs) = sym_eig(a);
    (vals[..k].to_vec(), vecs.columns(0, k).into_owned())
}

/// The `k` largest singular values of `m` and their vectors (`u: [rows, k]`, `vt: [k, cols]`),
/// from [`top_eigen`] of the smaller Gram matrix (`mᵀm` or `m·mᵀ`); the other side's vectors
/// are `m·v/σ` (or `mᵀ·u/σ`). Squaring costs the small singular values their accuracy, not the
/// large ones kept here; when the k-th is too small for that (`m` nearly rank-deficient), the
/// full SVD is truncated instead.
pub fn top_svd(m: &Mat, k: usize) -> Result<Svd> {
    let (rows, cols) = m.shape();
    let k = k.min(rows.min(cols));
    check_finite(m, "SVD")?;
    if k == 0 || rows.min(cols) < FAER_FROM {
        return svd(m).map(|d| d.truncate(k));
    }
    let tall = rows >= cols;
    let mt = m.transpose();
    let gram = if tall { matmul(&mt, m) } else { matmul(m, &mt) };
    let (vals, vecs) = top_eigen(&gram, k);
    let s: Vec<f64> = vals.iter().map(|v| v.max(0.0).sqrt()).collect();
    if !(s[k - 1] > 1e-6 * s[0]) {
        return svd(m).map(|d| d.truncate(k));
    }
    let inv_s = Mat::from_diagonal(&nalgebra::DVector::from_iterator(k, s.iter().map(|v| 1.0 / v)));
    Ok(if tall {
        Svd { u: matmul(m, &vecs) * inv_s, s, vt: vecs.transpose() }
    } else {
        Svd { vt: (matmul(&mt, &vecs) * inv_s).transpose(), s, u: vecs }
    })
}

impl Svd {
    /// The first `k` singular triplets.
    pub fn truncate(self, k: usize) -> Svd {
        Svd { u: self.u.columns(0, k).into_owned(), s: self.s[..k].to_vec(), vt: self.vt.rows(0, k).into_owned() }
    }

    /// The last `k` singular triplets (the smallest, still in descending order).
    pub fn tail(self, k: usize) -> Svd {
        let from = self.s.len() - k;
        Svd { u: self.u.columns(from, k).into_owned(), s: self.s[from..].to_vec(), vt: self.vt.rows(from, k).into_owned() }
    }
}

/// The Cholesky factor of a symmetric positive-definite matrix, for solves; `None` when the
/// matrix is not positive definite (or not finite).
pub struct Cholesky {
    factor: faer::linalg::solvers::Llt<f64>,
}

impl Cholesky {
    pub fn new(a: &Mat) -> Option<Cholesky> {
        if a.iter().any(|x| !x.is_finite()) {
            return None;
        }
        to_faer(a).llt(faer::Side::Lower).ok().map(|factor| Cholesky { factor })
    }

    /// `a⁻¹·b`.
    pub fn solve(&self, b: &Mat) -> Mat {
        use faer::linalg::solvers::Solve;
        let x = self.factor.solve(to_faer(b));
        Mat::from_fn(b.nrows(), b.ncols(), |i, j| x[(i, j)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Mat, b: &Mat, tol: f64) -> bool {
        a.shape() == b.shape() && (a - b).abs().max() < tol
    }

    #[test]
    fn svd_reconstructs_sorted() {
        let m = Mat::from_fn(5, 3, |i, j| ((i * 7 + j * 3) % 5) as f64 - 1.5 + (i == j) as u8 as f64 * 4.0);
        let d = svd(&m).unwrap();
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        let back = &d.u * Mat::from_diagonal(&nalgebra::DVector::from_vec(d.s.clone())) * &d.vt;
        assert!(close(&back, &m, 1e-10));
        assert!(close(&(d.u.transpose() * &d.u), &Mat::identity(3, 3), 1e-10));
    }

    /// The faer path (matrices of at least FAER_FROM), against the defining identities.
    #[test]
    fn large_svd_eig_inverse() {
        let n = FAER_FROM + 9;
        let m = Mat::from_fn(n + 5, n, |i, j| (((i * 31 + j * 17) % 23) as f64 - 11.0) / 7.0 + (i == j) as u8 as f64 * 3.0);
        let d = svd(&m).unwrap();
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        let back = &d.u * Mat::from_diagonal(&nalgebra::DVector::from_vec(d.s.clone())) * &d.vt;
        assert!(close(&back, &m, 1e-9));
        let sym = m.transpose() * &m;
        let (vals, vecs) = sym_eig(&sym);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        for (v, s) in vals.iter().zip(&d.s) {
            assert!((v - s * s).abs() < 1e-8 * vals[0], "eigenvalue {v} vs squared singular value {}", s * s);
        }
        let back = &vecs * Mat::from_diagonal(&nalgebra::DVector::from_vec(vals)) * vecs.transpose();
        assert!(close(&back, &sym, 1e-8));
        assert!(close(&(&sym * inverse(&sym, "m").unwrap()), &Mat::identity(n, n), 1e-8));
        assert!(close(&matmul(&m.transpose(), &m), &sym, 1e-10));
        assert!(inverse(&Mat::zeros(n, n), "zeros").is_err());
    }

    #[test]
    fn qr_solve_eig() {
        let m = Mat::from_fn(4, 4, |i, j| 1.0 / (1 + i + j) as f64 + (i == j) as u8 as f64);
        let (q, r) = qr(&m);
        assert!(close(&(&q * &r), &m, 1e-12));
        let b = Mat::from_fn(4, 2, |i, j| (i + j) as f64);
        assert!(close(&(&m * solve(&m, &b, "m").unwrap()), &b, 1e-10));
        assert!(close(&(&m * inverse(&m, "m").unwrap()), &Mat::identity(4, 4), 1e-10));
        let (vals, vecs) = sym_eig(&m);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        let back = &vecs * Mat::from_diagonal(&nalgebra::DVector::from_vec(vals)) * vecs.transpose();
        assert!(close(&back, &m, 1e-10));
        let t = to_tensor(&m).unwrap();
        assert!(close(&from_tensor(&t).unwrap(), &m, 1e-6));
    }

    /// A symmetric PSD matrix with a decaying spectrum, like an activation covariance.
    fn covariance_like(n: usize) -> Mat {
        let mut rng = crate::rng::SplitMix64::new(7);
        let x = Mat::from_fn(2 * n, n, |_, j| (rng.next_f32() as f64 - 0.5) / (1.0 + j as f64 / 8.0));
        x.transpose() * x
    }

    #[test]
    fn top_eigen_gives_the_largest_pairs() {
        let n = 200;
        let a = covariance_like(n);
        let k = 12;
        let (vals, vecs) = top_eigen(&a, k);
        assert_eq!((vals.len(), vecs.shape()), (k, (n, k)));
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        for j in 0..k {
            assert!((&a * vecs.column(j) - vecs.column(j) * vals[j]).norm() < 1e-10 * vals[0], "pair {j}");
        }
        // The largest: above everything the full spectrum has below the k-th.
        assert!(vals[k - 1] >= sym_eig(&a).0[k] - 1e-12 * vals[0]);
    }

    /// `Q·diag(d)·Qᵀ` for a random orthogonal `Q`.
    fn with_spectrum(d: &[f64], seed: u64) -> Mat {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let n = d.len();
        let q = qr(&Mat::from_fn(n, n, |_, _| rng.next_f32() as f64 - 0.5)).0;
        &q * Mat::from_diagonal(&nalgebra::DVector::from_column_slice(d)) * q.transpose()
    }

    /// The cases a single-vector Krylov method gets wrong: a repeated top eigenvalue, and a
    /// rank below `k` (the Krylov space closes and the zero eigenvalues must still be found).
    #[test]
    fn top_eigen_finds_repeated_and_zero_eigenvalues() {
        let n = 260;
        let k = 12;
        let mut d = vec![0.0; n];
        d[..3].fill(5.0);
        for (i, v) in d.iter_mut().enumerate().take(9).skip(3) {
            *v = 4.0 - i as f64 * 0.25;
        }
        let a = with_spectrum(&d, 11);
        assert!(n >= 4 * lanczos::basis_size(k), "the test must exercise the Lanczos path");
        let (vals, vecs) = top_eigen(&a, k);
        for j in 0..k {
            assert!((vals[j] - d[j]).abs() < 1e-9, "eigenvalue {j}: {} vs {}", vals[j], d[j]);
            assert!((&a * vecs.column(j) - vecs.column(j) * vals[j]).norm() < 1e-9, "pair {j}");
        }
        assert!(close(&(vecs.transpose() * &vecs), &Mat::identity(k, k), 1e-10));
    }

    /// A flat spectrum converges slowly; with too small a budget the solver says so (and
    /// `top_eigen` then takes the full decomposition).
    #[test]
    fn lanczos_gives_up_rather_than_guess() {
        let n = 240;
        let d: Vec<f64> = (0..n).map(|i| 1.0 - i as f64 * 1e-3).collect();
        let a = with_spectrum(&d, 5);
        let par = faer::Par::Seq;
        assert!(lanczos::top_pairs(a.as_slice(), n, 8, 40, par).is_none());
        let (vals, vecs) = top_eigen(&a, 8);
        for j in 0..8 {
            assert!((vals[j] - d[j]).abs() < 1e-10);
            assert!((&a * vecs.column(j) - vecs.column(j) * vals[j]).norm() < 1e-9);
        }
    }

    #[test]
    fn top_svd_matches_the_full_svd_on_both_shapes() {
        let mut rng = crate::rng::SplitMix64::new(3);
        for (rows, cols) in [(150, 90), (90, 150)] {
            let m = Mat::from_fn(rows, cols, |i, j| (rng.next_f32() as f64 - 0.5) / (1.0 + (i + j) as f64 / 20.0));
            let full = svd(&m).unwrap();
            let k = 10;
            let top = top_svd(&m, k).unwrap();
            assert_eq!((top.u.shape(), top.vt.shape()), ((rows, k), (k, cols)));
            for j in 0..k {
                assert!((top.s[j] - full.s[j]).abs() < 1e-10 * full.s[0]);
                // Both singular vectors flip together: compare the rank-one pieces.
                let piece = |d: &Svd| d.u.column(j) * d.vt.row(j);
                assert!(close(&piece(&top), &piece(&full), 1e-8), "{rows}×{cols}, triplet {j}");
            }
        }
        // A rank-deficient matrix falls back to the full SVD (σ_k = 0 leaves m·v/σ undefined).
        let low = Mat::from_fn(100, 80, |i, j| ((i % 3) as f64 + 1.0) * ((j % 5) as f64 - 2.0));
        let d = top_svd(&low, 4).unwrap();
        assert!(d.u.iter().chain(d.vt.iter()).all(|x| x.is_finite()));
        assert!((d.s[0] - svd(&low).unwrap().s[0]).abs() < 1e-9 * d.s[0]);
    }

    #[test]
    fn cholesky_solves_and_refuses_indefinite() {
        let a = covariance_like(100) + Mat::identity(100, 100) * 0.01;
        let b = Mat::from_fn(100, 3, |i, j| (i * 3 + j) as f64 / 100.0);
        let x = Cholesky::new(&a).expect("positive definite").solve(&b);
        assert!(close(&(&a * x), &b, 1e-9));
        let mut indefinite = a.clone();
        indefinite[(5, 5)] = -1.0;
        assert!(Cholesky::new(&indefinite).is_none());
    }
}
