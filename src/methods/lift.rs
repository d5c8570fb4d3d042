//! LIFT (`METHODS.md` §3.1): the principal weights after rank reduction. For a weight `W`
//! (`m×n`), the rank-`r_f` truncated SVD `W_{r_f}` is formed and the `k` entries with the largest
//! `|W_{r_f}|` are the ones that train, `k = min((m + n)·r_L, m·n)`, as many values as a
//! rank-`r_L` LoRA on that matrix. Those entries train with masked AdamW (the sparse sites of
//! [`super::sparse`]), and every `lift_mask_interval` steps the mask is chosen again from the
//! current weights; entries that stay keep their moments, new ones start from zero.
//!
//! Choices where the spec leaves room: the sites are `lora_target_modules` (LoRA's, so the two
//! compare at equal budget; the paper's default, every linear of the blocks, is
//! `lora_target_modules = "all-linear"`); `r_L` (`lift_rank`) defaults to `lora_r`, and the
//! filter rank `r_f` (`lift_filter_rank`) to `r_L / 2`, the ratio of the official 7B configs
//! (128 and 64); the exact truncated SVD is used (Lanczos for large matrices), not a randomised
//! one; no refresh happens at the last step (it would change nothing that trains).

use super::registry::Entry;
use super::sparse::{self, SparseSites};
use super::targets::TargetModules;
use super::{Method, MethodSpec, PlannedMemory, ADAPTER_CONFIG};
use crate::error::{Error, Result};
use crate::linalg;
use crate::models::{BlockSiteInfo, Llama, SiteInfo};
use crate::optim::{AdamWConfig, Optimizer};
use candle_core::Var;
use std::path::Path;

pub const LIFT: Entry = Entry {
    name: "lift",
    summary: "LIFT: trains the principal entries of each target matrix (top-k of its rank-r_f approximation, as many as a rank-r_L LoRA), mask refreshed every K steps",
    keys: &["lift_rank", "lift_filter_rank", "lift_mask_interval"],
    create,
    load,
    claims_peft: super::registry::not_peft,
};

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    targets: TargetModules,
    /// `r_L`: the LoRA-equivalent rank that sets each matrix's budget.
    rank: usize,
    /// `r_f`: the rank of the approximation the entries are ranked by.
    filter_rank: usize,
    /// Steps between mask refreshes (0: never).
    interval: usize,
}

impl Settings {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "target_modules": self.targets.to_json(),
            "lift_rank": self.rank,
            "lift_filter_rank": self.filter_rank,
            "lift_mask_interval": self.interval,
        })
    }

    fn from_json(cfg: &serde_json::Value, src: &Path) -> Result<Self> {
        let bad = |k: &str| Error::format(src, format!("field `{k}` is missing or not a whole number"));
        let num = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(k));
        Ok(Settings {
            targets: TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules").map_err(|e| Error::format(src, e.to_string()))?,
            rank: num("lift_rank")?,
            filter_rank: num("lift_filter_rank")?,
            interval: num("lift_mask_interval")?,
        })
    }

    /// The site's mask from its current weight.
    fn select(&self, w: &[f32], rows: usize, cols: usize) -> Result<Vec<u32>> {
        principal_mask(w, rows, cols, self.filter_rank.min(rows.min(cols)), budget(rows, cols, self.rank))
    }
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let rank = spec.usize_or("lift_rank", spec.r)?;
    let s = Settings {
        targets: spec.target_modules.clone(),
        rank,
        filter_rank: spec.usize_or("lift_filter_rank", (rank / 2).max(1))?,
        interval: spec.usize_or("lift_mask_interval", 400)?,
    };
    for (k, v) in [("lift_rank", s.rank), ("lift_filter_rank", s.filter_rank)] {
        if v == 0 {
            return Err(Error::config(k, "must be at least 1"));
        }
    }
    Ok(Box::new(Lift { s, sites: SparseSites::default(), total_steps: 0 }))
}

fn load(model: &mut Llama, dir: &Path, cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let s = Settings::from_json(cfg, &dir.join(ADAPTER_CONFIG))?;
    Ok(Box::new(Lift { s, sites: SparseSites::load(model, dir)?, total_steps: 0 }))
}

pub struct Lift {
    s: Settings,
    sites: SparseSites,
    total_steps: usize,
}

impl Lift {
    fn config(&self, base_model: &str) -> serde_json::Value {
        super::files::method_config("lift", base_model, self.s.to_json())
    }
}

impl Method for Lift {
    fn name(&self) -> &'static str {
        "lift"
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        let s = self.s.clone();
        self.sites = SparseSites::attach(model, &s.targets, |lin, w| {
            let (rows, cols) = lin.weight.dims();
            s.select(w, rows, cols)
        })?;
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.sites.params()
    }

    fn sites(&self) -> Vec<String> {
        self.sites.names()
    }

    fn planned_memory(&self, sites: &[SiteInfo], _blocks: &[BlockSiteInfo]) -> Result<Option<PlannedMemory>> {
        let chosen = self.s.targets.select(sites, "lora_target_modules")?;
        let entries: u64 = chosen.iter().map(|s| budget(s.out_features, s.in_features, self.s.rank) as u64).sum();
        Ok(Some(PlannedMemory { trainable_params: entries, extra_bytes: entries * sparse::BYTES_PER_ENTRY, floats_per_token: 0, ..Default::default() }))
    }

    fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        self.sites.optimizer(config)
    }

    fn set_total_steps(&mut self, total_steps: usize) {
        self.total_steps = total_steps;
    }

    fn on_step(&mut self, step: usize, model: &mut Llama) -> Result<()> {
        if self.s.interval == 0 || !step.is_multiple_of(self.s.interval) || step >= self.total_steps {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let s = &self.s;
        let joined = self.sites.reselect(model, false, |site, w| {
            let (rows, cols) = site.dims();
            s.select(w, rows, cols)
        })?;
        crate::note!("lift: mask refreshed at step {step} in {:.1} s, {joined} entries joined", t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.sites.save(dir, &self.config(base_model))
    }

    fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        self.sites.save_checkpoint(dir, &self.config(base_model))
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.sites.merge(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.sites.describe();
        d["settings"] = self.s.to_json();
        d
    }
}

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
