//! The few largest eigenpairs of a large symmetric matrix, without the whole decomposition:
//! block Lanczos with thick restarts and an explicit Rayleigh–Ritz step.
//!
//! The basis `V` is kept orthonormal by full re-orthogonalisation (twice, classical
//! Gram–Schmidt against the whole basis), and `A·V` is stored beside it, so the projected
//! matrix `Vᵀ·A·V` and every Ritz residual `‖A·u − θ·u‖` are computed exactly rather than
//! inferred from a three-term recurrence. That makes convergence a measured fact, which is what
//! lets [`top_eigen`](super::top_eigen) trust the result or fall back to the full decomposition.
//! A block (not a single vector) finds repeated eigenvalues up to the block size and turns the
//! products with `A` into small GEMMs. When the Krylov space closes (an invariant subspace) the
//! missing directions are refilled with random ones, so rank-deficient matrices, whose top `k`
//! may include zeros, converge too.

use crate::rng::SplitMix64;
use faer::{Accum, MatMut, MatRef, Par};

/// Columns added per expansion.
const BLOCK: usize = 8;

/// Ritz pairs count as converged when `‖A·u − θ·u‖ ≤ TOL·|θ₁|`.
const TOL: f64 = 1e-10;

/// The basis size the solver works with for `k` wanted pairs; [`top_eigen`](super::top_eigen)
/// uses the solver only where this is small beside `n`.
pub fn basis_size(k: usize) -> usize {
    (2 * k + 2 * BLOCK).div_ceil(BLOCK) * BLOCK
}

/// The `k` largest eigenvalues (descending) of the symmetric `n × n` matrix `a` (column-major)
/// and their eigenvectors (`n × k`, column-major), or `None` when they have not converged within
/// `max_products` products of `a` with a vector.
pub fn top_pairs(a: &[f64], n: usize, k: usize, max_products: usize, par: Par) -> Option<(Vec<f64>, Vec<f64>)> {
    let m = basis_size(k);
    assert!(k >= 1 && m + BLOCK <= n, "lanczos: basis {m} too large for n = {n}");
    let a = MatRef::from_column_major_slice(a, n, n);
    // Ritz vectors kept across a restart: the wanted ones and as many again, rounded to blocks.
    let keep = (k + (m - k) / 2).min(m - BLOCK);
    let mut rng = SplitMix64::new(0x1a2c_205e_ed00 ^ (n as u64) << 8 ^ k as u64);
    let mut v = vec![0f64; n * m];
    let mut av = vec![0f64; n * m];
    let mut next = vec![0f64; n * BLOCK];
    next.iter_mut().for_each(|x| *x = rng.next_f32() as f64 - 0.5);
    orthonormalise_against(&mut next, &v[..0], n, &mut rng);
    v[..n * BLOCK].copy_from_slice(&next);
    let (mut cols, mut done, mut products) = (BLOCK, 0, 0);
    loop {
        // A · (the columns without a product yet): one block.
        {
            let (vs, avs) = (&v[n * done..n * cols], &mut av[n * done..n * cols]);
            let dst = MatMut::from_column_major_slice_mut(avs, n, cols - done);
            faer::linalg::matmul::matmul(dst, Accum::Replace, a, MatRef::from_column_major_slice(vs, n, cols - done), 1.0, par);
        }
        products += cols - done;
        done = cols;
        // The next block: A·(last block), projected off the basis.
        next.copy_from_slice(&av[n * (cols - BLOCK)..n * cols]);
        orthonormalise_against(&mut next, &v[..n * cols], n, &mut rng);
        if cols + BLOCK <= m {
            v[n * cols..n * (cols + BLOCK)].copy_from_slice(&next);
            cols += BLOCK;
            continue;
        }
        // Rayleigh–Ritz on the full basis.
        let vr = MatRef::from_column_major_slice(&v[..n * cols], n, cols);
        let avr = MatRef::from_column_major_slice(&av[..n * cols], n, cols);
        let mut t = faer::Mat::<f64>::zeros(cols, cols);
        faer::linalg::matmul::matmul(t.as_mut(), Accum::Replace, vr.transpose(), avr, 1.0, par);
        let t = super::Mat::from_fn(cols, cols, |i, j| 0.5 * (t[(i, j)] + t[(j, i)]));
        let (theta, y) = super::sym_eig(&t);
        let y = faer::Mat::<f64>::from_fn(cols, keep, |i, j| y[(i, j)]);
        let mut u = faer::Mat::<f64>::zeros(n, keep);
        let mut au = faer::Mat::<f64>::zeros(n, keep);
        faer::linalg::matmul::matmul(u.as_mut(), Accum::Replace, vr, y.as_ref(), 1.0, par);
        faer::linalg::matmul::matmul(au.as_mut(), Accum::Replace, avr, y.as_ref(), 1.0, par);
        let scale = theta.iter().fold(0f64, |s, t| s.max(t.abs())).max(f64::MIN_POSITIVE);
        let converged = (0..k).all(|j| {
            let r2: f64 = (0..n).map(|i| (au[(i, j)] - theta[j] * u[(i, j)]).powi(2)).sum();
            r2.sqrt() <= TOL * scale
        });
        if converged {
            let vecs = (0..k).flat_map(|j| (0..n).map(move |i| (i, j))).map(|(i, j)| u[(i, j)]).collect();
            return Some((theta[..k].to_vec(), vecs));
        }
        if products >= max_products {
            return None;
        }
        // Restart from the best `keep` Ritz vectors and the block that continues the space
        // (it is orthogonal to every Ritz vector, which all lie in the old basis).
        for j in 0..keep {
            for i in 0..n {
                v[j * n + i] = u[(i, j)];
                av[j * n + i] = au[(i, j)];
            }
        }
        v[n * keep..n * (keep + BLOCK)].copy_from_slice(&next);
        done = keep;
        cols = keep + BLOCK;
    }
}

/// Makes the `BLOCK` columns of `w` (column-major, `n` rows) orthonormal and orthogonal to the
/// orthonormal columns of `basis`: two passes of block Gram–Schmidt against the basis, then
/// one column at a time within the block. A column that was (numerically) inside the space
/// already is replaced by a random direction, so the block always adds `BLOCK` new ones.
fn orthonormalise_against(w: &mut [f64], basis: &[f64], n: usize, rng: &mut SplitMix64) {
    let c = basis.len() / n;
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let project_off_basis = |w: &mut [f64], cols: usize| {
        if c == 0 {
            return;
        }
        let b = MatRef::from_column_major_slice(basis, n, c);
        for _ in 0..2 {
            let mut h = faer::Mat::<f64>::zeros(c, cols);
            faer::linalg::matmul::matmul(h.as_mut(), Accum::Replace, b.transpose(), MatRef::from_column_major_slice(w, n, cols), 1.0, Par::Seq);
            faer::linalg::matmul::matmul(MatMut::from_column_major_slice_mut(w, n, cols), Accum::Add, b, h.as_ref(), -1.0, Par::Seq);
        }
    };
    let before: Vec<f64> = w.chunks(n).map(norm).collect();
    project_off_basis(w, BLOCK);
    for j in 0..BLOCK {
        for attempt in 0.. {
            let (prev, rest) = w.split_at_mut(j * n);
            let col = &mut rest[..n];
            for _ in 0..2 {
                for p in prev.chunks(n) {
                    let d: f64 = p.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
                    col.iter_mut().zip(p).for_each(|(x, &q)| *x -= d * q);
                }
            }
            let len = norm(col);
            let reference = if attempt == 0 { before[j] } else { 1.0 };
            if len > 1e-8 * reference && len > 0.0 {
                col.iter_mut().for_each(|x| *x /= len);
                break;
            }
            assert!(attempt < 8, "lanczos: no direction left outside the basis");
            col.iter_mut().for_each(|x| *x = rng.next_f32() as f64 - 0.5);
            project_off_basis(col, 1);
        }
    }
}
