//! Merging task vectors `τ_t = θ_t − θ0` (METHODS.md §6): task arithmetic, TIES, and LiNeS's
//! layer-increasing scaling. Plain functions on one tensor's values at a time; which tensor
//! belongs to which block, and the norms LiNeS needs over the whole model, are the caller's.
//!
//! TIES follows Hugging Face PEFT's `ties` merge utility (the semantics its users know): each
//! task vector is trimmed to its `density` share of largest-magnitude entries, tensor by
//! tensor; the sign of every entry is elected by the sum of the trimmed vectors (unweighted);
//! the merged entry is the sum of the weighted entries that carry the elected sign, divided by
//! how many of them there are.

/// `Σ_t w_t τ_t`.
pub fn task_arithmetic(taus: &[&[f32]], weights: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; taus.first().map_or(0, |t| t.len())];
    for (tau, &w) in taus.iter().zip(weights) {
        out.iter_mut().zip(tau.iter()).for_each(|(o, &x)| *o += w * x);
    }
    out
}

/// `tau` with all but its `⌊density·n⌋` largest-magnitude entries set to 0 (ties at the
/// threshold are kept in index order).
pub fn trim(tau: &[f32], density: f64) -> Vec<f32> {
    let n = tau.len();
    let k = ((density * n as f64) as usize).min(n);
    if k == n {
        return tau.to_vec();
    }
    if k == 0 {
        return vec![0.0; n];
    }
    let mut mags: Vec<f32> = tau.iter().map(|x| x.abs()).collect();
    let threshold = *mags.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b)).1;
    // Entries above the threshold are kept; of those equal to it, as many as k still allows.
    let mut at_threshold = k - tau.iter().filter(|x| x.abs() > threshold).count();
    tau.iter()
        .map(|&x| {
            if x.abs() > threshold {
                x
            } else if x.abs() == threshold && at_threshold > 0 {
                at_threshold -= 1;
                x
            } else {
                0.0
            }
        })
        .collect()
}

/// TIES-merging of `taus` with per-input `weights`, keeping `density` of each (see the module
/// notes for the exact rule).
pub fn ties(taus: &[&[f32]], weights: &[f32], density: f64) -> Vec<f32> {
    let trimmed: Vec<Vec<f32>> = taus.iter().map(|t| trim(t, density)).collect();
    let n = taus.first().map_or(0, |t| t.len());
    (0..n)
        .map(|j| {
            let total: f32 = trimmed.iter().map(|t| t[j]).sum();
            let elected = if total >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0f32, 0f32);
            for (t, &w) in trimmed.iter().zip(weights) {
                // A zero has no sign: it never agrees.
                if t[j] != 0.0 && t[j].signum() == elected {
                    sum += w * t[j];
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

/// LiNeS's factor for a tensor of block `layer` of `layers` (`None`: outside the blocks):
/// `α + β·l/(L−1)` in the blocks, `α` elsewhere. A single block is the last one.
pub fn lines_factor(layer: Option<usize>, layers: usize, alpha: f64, beta: f64) -> f64 {
    match layer {
        Some(l) if layers > 1 => alpha + beta * l as f64 / (layers - 1) as f64,
        Some(_) => alpha + beta,
        None => alpha,
    }
}

/// `Σ |x|` in f64.
pub fn l1(values: &[f32]) -> f64 {
    values.iter().map(|x| x.abs() as f64).sum()
}
