//! LIFT (`METHODS.md` §3.1): the principal weights after rank reduction. For a weight `W`
//! (`m×n`), the rank-`r_f` truncated SVD `W_{r_f}` is formed and the `k` entries with the largest
//! `|W_{r_f}|` are the ones that train, `k = min((m + n)·r_L, m·n)`, as many values as a
//! rank-`r_L` LoRA on that matrix. (The method itself, training those entries with masked
//! AdamW and refreshing the mask, builds on this selection.)

use crate::error::{Error, Result};
use crate::linalg;

/// The number of entries a LoRA-equivalent budget of rank `r_l` buys in an `m×n` matrix.
pub fn budget(rows: usize, cols: usize, r_l: usize) -> usize {
    ((rows + cols) * r_l).min(rows * cols)
}

/// The flat indices (row-major, increasing) of the `k` entries of `w: [rows, cols]` whose
/// rank-`filter_rank` approximation is largest in magnitude.
pub fn principal_mask(w: &[f32], rows: usize, cols: usize, filter_rank: usize, k: usize) -> Result<Vec<u32>> {
    if w.len() != rows * cols || filter_rank == 0 {
        return Err(Error::Model(format!("LIFT mask: {} values for a {rows}×{cols} matrix at filter rank {filter_rank}", w.len())));
    }
    if rows * cols > u32::MAX as usize {
        return Err(Error::Model(format!("LIFT mask: a {rows}×{cols} matrix has more entries than 32-bit indices address")));
    }
    let k = k.min(rows * cols);
    let d = linalg::top_svd(&linalg::from_rows(rows, cols, w), filter_rank)?;
    // |W_r| entry by entry: row i of U·diag(s) against column j of Vᵀ.
    let r = d.s.len();
    let us: Vec<f64> = (0..rows).flat_map(|i| (0..r).map(move |c| (i, c))).map(|(i, c)| d.u[(i, c)] * d.s[c]).collect();
    let mut scored: Vec<(f64, u32)> = (0..rows * cols)
        .map(|idx| {
            let (i, j) = (idx / cols, idx % cols);
            let v: f64 = (0..r).map(|c| us[i * r + c] * d.vt[(c, j)]).sum();
            (v.abs(), idx as u32)
        })
        .collect();
    if k < scored.len() {
        // The k largest (ties broken by index, so the choice is deterministic).
        scored.select_nth_unstable_by(k, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.truncate(k);
    }
    let mut mask: Vec<u32> = scored.into_iter().map(|(_, i)| i).collect();
    mask.sort_unstable();
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The mask is the top-k of the rank-r approximation computed directly from the full SVD.
    #[test]
    fn the_mask_is_the_top_k_of_the_rank_reduced_matrix() {
        // Small (a full SVD) and large enough for the Lanczos path of `top_svd`.
        check(12, 20, 3);
        check(70, 96, 4);
    }

    fn check(rows: usize, cols: usize, r: usize) {
        let mut rng = SplitMix64::new(4);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
        let full = linalg::svd(&linalg::from_rows(rows, cols, &w)).unwrap();
        let approx: Vec<f64> = (0..rows * cols).map(|idx| (0..r).map(|c| full.u[(idx / cols, c)] * full.s[c] * full.vt[(c, idx % cols)]).sum::<f64>()).collect();
        let mut order: Vec<usize> = (0..rows * cols).collect();
        order.sort_by(|&a, &b| approx[b].abs().total_cmp(&approx[a].abs()));
        for k in [1, 17, budget(rows, cols, 2)] {
            let mut want: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            want.sort_unstable();
            assert_eq!(principal_mask(&w, rows, cols, r, k).unwrap(), want, "k = {k}");
        }
        assert_eq!(budget(rows, cols, 2), 2 * (rows + cols));
        assert_eq!(budget(rows, cols, 100), rows * cols, "the budget never exceeds the matrix");
        assert_eq!(principal_mask(&w, rows, cols, r, 10_000).unwrap().len(), rows * cols);
        assert!(principal_mask(&w, rows, cols + 1, r, 5).is_err());
    }
}
