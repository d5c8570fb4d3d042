//! Dense linear algebra for method initialisation and analysis (SVD, QR, solves), in f64 over
//! nalgebra: these run once per site, not per step, so exactness matters more than speed.
//! Tensors cross over as row-major `[rows, cols]` f32.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use nalgebra::DMatrix;

pub type Mat = DMatrix<f64>;

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
    if m.iter().any(|x| !x.is_finite()) {
        return Err(Error::Model("SVD of a matrix with non-finite entries".into()));
    }
    let d = nalgebra::SVD::new(m.clone(), true, true);
    let (u, vt) = (d.u.expect("requested U"), d.v_t.expect("requested Vᵀ"));
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| d.singular_values[b].total_cmp(&d.singular_values[a]));
    let s = order.iter().map(|&i| d.singular_values[i]).collect();
    let u = Mat::from_fn(m.nrows(), k, |i, j| u[(i, order[j])]);
    let vt = Mat::from_fn(k, m.ncols(), |i, j| vt[(order[i], j)]);
    Ok(Svd { u, s, vt })
}

/// Thin QR `m = Q·R`, `q: [rows, k]` with orthonormal columns, `r: [k, cols]` upper
/// triangular, `k = min(rows, cols)`.
pub fn qr(m: &Mat) -> (Mat, Mat) {
    let d = nalgebra::QR::new(m.clone());
    (d.q(), d.r())
}

/// `a⁻¹`, or an error naming `what` when `a` is singular.
pub fn inverse(a: &Mat, what: &str) -> Result<Mat> {
    a.clone().try_inverse().ok_or_else(|| Error::Model(format!("{what} is singular")))
}

/// Solves `a·x = b` (LU with partial pivoting).
pub fn solve(a: &Mat, b: &Mat, what: &str) -> Result<Mat> {
    a.clone().lu().solve(b).ok_or_else(|| Error::Model(format!("{what} is singular")))
}

/// Eigen-decomposition of a symmetric matrix, eigenvalues descending: `(values, vectors as
/// columns)`.
pub fn sym_eig(a: &Mat) -> (Vec<f64>, Mat) {
    let d = nalgebra::SymmetricEigen::new(a.clone());
    let n = a.nrows();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d.eigenvalues[y].total_cmp(&d.eigenvalues[x]));
    let vals = order.iter().map(|&i| d.eigenvalues[i]).collect();
    let vecs = Mat::from_fn(n, n, |i, j| d.eigenvectors[(i, order[j])]);
    (vals, vecs)
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
}
