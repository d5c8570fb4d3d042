//! EVA, Explained Variance Adaptation (METHODS.md §2.2; PEFT's `init_lora_weights = "eva"`):
//! LoRA whose `A` rows start as the top principal directions of each site's inputs over the
//! run's first micro-batches, with ranks redistributed across sites by explained variance.
//!
//! `prepare` runs the base model over the batches (cycling 1, 2, …, 1, 2, … as PEFT does),
//! accumulating per site the inputs' sum and `XᵀX` (positions whose label is ignored left out
//! when `eva_use_label_mask`; a batch with fewer rows than components is skipped, as PEFT
//! does). Sites that see identical inputs (q/k/v of a block) share one PCA, found by hashing
//! the first inputs, as PEFT does. After each batch the top `r·ρ` components are refreshed by
//! subspace iteration warm-started from the last ones; a site has converged when each component
//! it will use has cosine similarity ≥ `τ` with the previous batch's. When all have (or after
//! `eva_max_passes` passes over the batches, 1 by default, where PEFT has no bound), an exact eigen-decomposition of each covariance
//! gives the components and explained-variance ratios. PEFT's incremental PCA uses a randomised
//! low-rank SVD per update instead; the exact PCA here is the one the reference's
//! `ranks_if_exact_pca_fed_the_same_budget_rule` describes.
//!
//! Ranks: the budget `r × sites` goes to the largest explained-variance ratios among the first
//! `r·ρ` of every site (a site gets at most `r·ρ`, possibly 0: then it gets no adapter). With
//! `eva_adjust_scaling_factors`, `alpha_pattern` keeps `α_l / r_l = α / r`. Saved as a plain
//! PEFT LoRA with `rank_pattern` / `alpha_pattern`.

use super::calibrate::{cycle_inputs, input_hash, leaders, InputSink};
use super::lora::{read_peft_config, Lora, LoraConfig};
use super::registry::Entry;
use super::targets::TargetModules;
use super::{LoraPair, Method, MethodSpec};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::kernels::gemm::{gram_lower_accumulate, matmul_nn};
use crate::linalg::{self, Mat};
use crate::models::Llama;
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

pub const EVA: Entry = Entry {
    name: "eva",
    summary: "EVA: LoRA whose A starts as the top principal directions of each site's inputs, ranks redistributed by explained variance",
    keys: &["init_batches", "eva_rho", "eva_tau", "eva_use_label_mask", "eva_whiten", "eva_adjust_scaling_factors", "eva_max_passes"],
    create,
    load,
    claims_peft: |cfg| {
        cfg.get("peft_type").and_then(|v| v.as_str()) == Some("LORA") && cfg.get("init_lora_weights").and_then(|v| v.as_str()) == Some("eva")
    },
};

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    batches: usize,
    rho: f64,
    tau: f64,
    label_mask: bool,
    whiten: bool,
    adjust_scaling: bool,
    max_passes: usize,
}

fn create(spec: &MethodSpec) -> Result<Box<dyn Method>> {
    let s = Settings {
        batches: spec.usize_or("init_batches", 16)?,
        rho: spec.f64_or("eva_rho", 2.0)?,
        tau: spec.f64_or("eva_tau", 0.99)?,
        label_mask: spec.bool_or("eva_use_label_mask", true)?,
        whiten: spec.bool_or("eva_whiten", false)?,
        adjust_scaling: spec.bool_or("eva_adjust_scaling_factors", true)?,
        // PEFT cycles until every component converged, which on real data can take many
        // passes (near-equal eigenvalues keep rotating); one pass bounds the time and the
        // note below says when components had not converged.
        max_passes: spec.usize_or("eva_max_passes", 1)?,
    };
    if s.batches == 0 {
        return Err(Error::config("init_batches", "is 0; EVA needs at least one batch of inputs"));
    }
    if !(s.rho >= 1.0) {
        return Err(Error::config("eva_rho", format!("is {}; expected ≥ 1 (1: no redistribution)", s.rho)));
    }
    if !(0.0..=1.0).contains(&s.tau) {
        return Err(Error::config("eva_tau", format!("is {}; expected a cosine similarity in [0, 1]", s.tau)));
    }
    if s.max_passes == 0 {
        return Err(Error::config("eva_max_passes", "must be at least 1"));
    }
    Ok(Box::new(Eva { s, config: spec.lora_config(), seed: spec.seed, init: BTreeMap::new(), lora: None }))
}

fn load(model: &mut Llama, dir: &Path, _cfg: &serde_json::Value) -> Result<Box<dyn Method>> {
    let lora = Lora::load_peft(model, dir)?;
    let config = read_peft_config(&dir.join(super::ADAPTER_CONFIG), false)?;
    let s = Settings { batches: 0, rho: 1.0, tau: 1.0, label_mask: true, whiten: false, adjust_scaling: true, max_passes: 1 };
    Ok(Box::new(Eva { s, config, seed: 0, init: BTreeMap::new(), lora: Some(lora) }))
}

/// One site's running statistics (the committed ones and the current batch's).
struct Pca {
    n: usize,
    k: usize,
    label_mask: bool,
    /// Rows in the committed statistics, and in the current batch's.
    rows: f64,
    batch_rows: usize,
    /// The current batch has fewer rows than components: PEFT skips it.
    skip_batch: bool,
    sum: Vec<f64>,
    /// `XᵀX`, lower triangle (see gram_lower_accumulate), summed in f32 as PEFT's torch
    /// statistics are: an f64 copy would double what every site holds and touches.
    xtx: Vec<f32>,
    /// Hash of the first inputs seen, to find sites with identical inputs.
    first_hash: Option<u64>,
    /// Another site computes this one's PCA.
    alias: bool,
    /// The last components `[k, n]` (rows) and which have converged.
    components: Option<Mat>,
    converged: Vec<bool>,
    /// Explained-variance ratios of the last components.
    ratios: Vec<f64>,
}

/// The positions of one sequence whose inputs EVA uses: all of them, or with the label mask
/// those whose label is trained. Position j's label is the target of position j − 1; the first
/// position's is taken as trained when the sequence's first target is.
fn kept_positions(targets: &[i32], label_mask: bool) -> Vec<usize> {
    (0..targets.len()).filter(|&j| !label_mask || if j == 0 { targets[0] != -100 } else { targets[j - 1] != -100 }).collect()
}

impl Pca {
    fn new(n: usize, k: usize, label_mask: bool) -> Self {
        Self {
            n,
            k,
            label_mask,
            rows: 0.0,
            batch_rows: 0,
            skip_batch: false,
            sum: vec![0.0; n],
            xtx: vec![0.0; n * n],
            first_hash: None,
            alias: false,
            components: None,
            converged: vec![false; k],
            ratios: Vec::new(),
        }
    }

    /// Takes the current batch into the committed statistics; whether it added rows.
    fn commit(&mut self) -> bool {
        self.rows += self.batch_rows as f64;
        std::mem::take(&mut self.batch_rows) > 0
    }

    /// Entry `(i, j)`, `i ≥ j`, of the covariance of everything committed (sklearn's, divided
    /// by rows − 1), from the running sums.
    fn covariance_entry(&self) -> impl Fn(usize, usize) -> f64 + '_ {
        let m = self.rows.max(2.0);
        let mean: Vec<f64> = self.sum.iter().map(|s| s / m).collect();
        move |i, j| (self.xtx[i * self.n + j] as f64 - m * mean[i] * mean[j]) / (m - 1.0)
    }

    /// The covariance, in f64 for the exact PCA.
    fn covariance(&self) -> Mat {
        let entry = self.covariance_entry();
        Mat::from_fn(self.n, self.n, |i, j| entry(i.max(j), i.min(j)))
    }

    /// The same covariance as a full row-major f32 matrix, for the per-batch estimate.
    fn covariance_f32(&self) -> Vec<f32> {
        let n = self.n;
        let entry = self.covariance_entry();
        let mut c = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = entry(i, j) as f32;
                c[i * n + j] = v;
                c[j * n + i] = v;
            }
        }
        c
    }
}

impl InputSink for Pca {
    fn wants_input(&self) -> bool {
        !self.alias
    }

    fn begin_batch(&mut self, targets: &[Vec<i32>]) {
        let rows: usize = targets.iter().map(|t| kept_positions(t, self.label_mask).len()).sum();
        self.skip_batch = rows < self.k;
    }

    fn add(&mut self, x: &[f32], rows: usize, n: usize, targets: &[i32]) -> Result<()> {
        if self.alias || rows == 0 {
            return Ok(());
        }
        self.first_hash.get_or_insert_with(|| input_hash(x));
        let keep = kept_positions(&targets[..rows], self.label_mask);
        if keep.is_empty() || self.skip_batch {
            return Ok(());
        }
        let sel: Vec<f32> = keep.iter().flat_map(|&j| x[j * n..(j + 1) * n].iter().copied()).collect();
        for row in sel.chunks(n) {
            self.sum.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
        }
        gram_lower_accumulate(&mut self.xtx, &sel, keep.len(), n, 1.0);
        self.batch_rows += keep.len();
        Ok(())
    }
}

/// sklearn's `svd_flip` on rows: each component's largest-magnitude entry made positive.
fn flip_signs(c: &mut Mat) {
    for i in 0..c.nrows() {
        let (mut best, mut sign) = (0.0, 1.0);
        for j in 0..c.ncols() {
            if c[(i, j)].abs() > best {
                best = c[(i, j)].abs();
                sign = c[(i, j)].signum();
            }
        }
        for j in 0..c.ncols() {
            c[(i, j)] *= sign;
        }
    }
}

/// Top-`k` eigenvectors (as rows) and eigenvalues of the symmetric `c` (`n × n`, row-major
/// f32) by subspace iteration warm-started from `start` (`k × n`, rows), with a Rayleigh–Ritz
/// step. Runs in f32 on the GEMM, orthonormalising by Cholesky QR in f64: this estimate only
/// decides when the components have converged (cosine ≥ τ); the components EVA keeps come
/// from the exact f64 PCA at the end.
fn subspace_top(c: &[f32], n: usize, start: &Mat, iters: usize) -> (Mat, Vec<f64>) {
    let k = start.nrows();
    // Q: n × k, row-major.
    let mut q: Vec<f32> = (0..n).flat_map(|i| (0..k).map(move |j| start[(j, i)] as f32)).collect();
    orthonormalise(&mut q, n, k);
    let mut cq = vec![0f32; n * k];
    for _ in 0..iters {
        matmul_nn(&mut cq, c, &q, n, n, k, false);
        std::mem::swap(&mut q, &mut cq);
        orthonormalise(&mut q, n, k);
    }
    matmul_nn(&mut cq, c, &q, n, n, k, false);
    // T = Qᵀ·C·Q, symmetrised; its eigenvectors rotate Q onto the Ritz vectors.
    let to_mat = |v: &[f32]| Mat::from_fn(n, k, |i, j| v[i * k + j] as f64);
    let q = to_mat(&q);
    let t = q.tr_mul(&to_mat(&cq));
    let (vals, vecs) = linalg::sym_eig(&((&t + t.transpose()) * 0.5));
    ((q * vecs).transpose(), vals)
}

/// Makes the columns of `y` (`n × k`, row-major) orthonormal, spanning the same space: Cholesky
/// QR (`YᵀY = RᵀR`, `Y ← Y·R⁻¹`) with the small products in f64, or Householder QR where `Y`
/// is too close to rank-deficient for it.
fn orthonormalise(y: &mut [f32], n: usize, k: usize) {
    let yd = Mat::from_fn(n, k, |i, j| y[i * k + j] as f64);
    let cholesky_qr = nalgebra::Cholesky::new(yd.tr_mul(&yd))
        .and_then(|ch| ch.l().transpose().try_inverse())
        .map(|r_inv| &yd * r_inv)
        // One pass leaves an orthogonality error of order eps·cond(Y)²; where that shows,
        // Householder QR takes over.
        .filter(|q| q.iter().all(|v| v.is_finite()) && (q.tr_mul(q) - Mat::identity(k, k)).abs().max() < 1e-6);
    let q = cholesky_qr.unwrap_or_else(|| linalg::qr(&yd).0);
    for i in 0..n {
        for j in 0..k {
            y[i * k + j] = q[(i, j)] as f32;
        }
    }
}

/// PEFT's rank distribution: the `budget` largest ratios among all sites' (each `ratios[i]`
/// holds the first `r·ρ` of site `i`) give their site one rank each.
pub fn distribute_ranks(ratios: &[Vec<f64>], budget: usize) -> Vec<usize> {
    let mut all: Vec<(f64, usize)> = ratios.iter().enumerate().flat_map(|(i, r)| r.iter().map(move |&v| (v, i))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut counts = vec![0; ratios.len()];
    for &(_, i) in all.iter().take(budget) {
        counts[i] += 1;
    }
    counts
}

pub struct Eva {
    s: Settings,
    config: LoraConfig,
    seed: u64,
    /// The initial `A` (`[rank, in]`) of every site that gets an adapter.
    init: BTreeMap<String, Tensor>,
    lora: Option<Lora>,
}

impl Eva {
    fn lora(&self) -> &Lora {
        self.lora.as_ref().expect("EVA is attached before it is used")
    }

    /// The initial `A` rows chosen for each site (after `prepare`).
    pub fn initial_components(&self) -> &BTreeMap<String, Tensor> {
        &self.init
    }
}

impl Method for Eva {
    fn name(&self) -> &'static str {
        "eva"
    }

    fn init_batches(&self) -> usize {
        self.s.batches
    }

    fn prepare(&mut self, model: &mut Llama, batches: &[Batch]) -> Result<()> {
        let r = self.config.r;
        let sites = self.config.target_modules.site_names(model)?;
        let k = ((r as f64 * self.s.rho).round() as usize).max(r);
        let tau = self.s.tau;
        let budget = r * sites.len();
        let mut leader: Vec<usize> = (0..sites.len()).collect();
        let seed = self.seed;
        let mut converged_sites = 0;
        let mut step = |pcas: &mut [&mut Pca], count: usize| -> Result<bool> {
            if count == 1 {
                // Sites whose first inputs hash alike share the first such site's PCA.
                leader = leaders(&pcas.iter().map(|p| p.first_hash).collect::<Vec<_>>());
                pcas.iter_mut().enumerate().for_each(|(i, p)| p.alias = leader[i] != i);
            }
            let leaders: Vec<usize> = (0..pcas.len()).filter(|&i| !pcas[i].alias).collect();
            let updated: Vec<(usize, Option<(Mat, Vec<f64>, Vec<bool>)>)> = {
                let work: Vec<(usize, &mut Pca)> = pcas.iter_mut().enumerate().filter(|(_, p)| !p.alias).map(|(i, p)| (i, &mut **p)).collect();
                work.into_par_iter()
                    .map(|(i, p)| {
                        if !p.commit() || p.rows < 2.0 {
                            return (i, None);
                        }
                        let k = p.k.min(p.n);
                        // The first estimate from a random start, the later ones warm-started
                        // from the last: subspace iteration runs on the GEMM (blocked products).
                        // A few iterations suffice for a convergence test (PEFT's own per-batch
                        // update is a randomised low-rank SVD with a few power iterations).
                        let c = p.covariance_f32();
                        let trace = (0..p.n).map(|d| c[d * p.n + d] as f64).sum::<f64>();
                        let (mut comps, vals) = match &p.components {
                            Some(prev) => subspace_top(&c, p.n, prev, 4),
                            None => {
                                let mut rng = SplitMix64::derive(seed, &[0xe7a, i as u64]);
                                subspace_top(&c, p.n, &Mat::from_fn(k, p.n, |_, _| rng.next_f32() as f64 - 0.5), 16)
                            }
                        };
                        flip_signs(&mut comps);
                        let converged = match &p.components {
                            Some(prev) => (0..k).map(|j| (comps.row(j) * prev.row(j).transpose())[(0, 0)] / (comps.row(j).norm() * prev.row(j).norm()) >= tau).collect(),
                            None => vec![false; k],
                        };
                        let ratios = vals.iter().map(|v| v / trace.max(f64::MIN_POSITIVE)).collect();
                        (i, Some((comps, ratios, converged)))
                    })
                    .collect()
            };
            for (i, u) in updated {
                if let Some((comps, ratios, converged)) = u {
                    pcas[i].components = Some(comps);
                    pcas[i].ratios = ratios;
                    pcas[i].converged = converged;
                }
            }
            if leaders.iter().any(|&i| pcas[i].components.is_none()) {
                return Ok(false);
            }
            let ratios: Vec<Vec<f64>> = (0..pcas.len()).map(|i| pcas[leader[i]].ratios.clone()).collect();
            let ranks = distribute_ranks(&ratios, budget);
            let done = (0..pcas.len()).all(|i| pcas[leader[i]].converged.iter().take(ranks[i]).all(|&c| c));
            converged_sites = (0..pcas.len()).filter(|&i| pcas[leader[i]].converged.iter().take(ranks[i]).all(|&c| c)).count();
            Ok(done)
        };
        let max = self.s.max_passes * batches.len();
        let mut pcas = cycle_inputs(model, &sites, batches, max, "EVA: principal directions of site inputs", |_, n| Pca::new(n, k, self.s.label_mask), &mut step)?;
        crate::note!("EVA: {converged_sites} of {} sites converged", sites.len());
        if !pcas.iter().all(|p| p.alias || p.converged.iter().all(|&c| c)) {
            crate::note!("note: EVA: not every site's components converged (τ = {tau}) within {max} batches; using them as they are");
        }
        // Exact PCA of what was collected.
        let exact: Vec<Option<(Mat, Vec<f64>, Vec<f64>)>> = pcas
            .par_iter_mut()
            .map(|p| {
                if p.alias {
                    return Ok(None);
                }
                if p.rows < 2.0 {
                    return Err(Error::Model("EVA: a site received fewer than two input rows; give more init_batches (or set eva_use_label_mask = false)".into()));
                }
                let c = p.covariance();
                let trace: f64 = (0..p.n).map(|d| c[(d, d)]).sum();
                let k = p.k.min(p.n);
                let (vals, vecs) = linalg::top_eigen(&c, k);
                let mut comps = vecs.transpose();
                flip_signs(&mut comps);
                let vals: Vec<f64> = vals[..k].iter().map(|v| v.max(0.0)).collect();
                let ratios = vals.iter().map(|v| v / trace.max(f64::MIN_POSITIVE)).collect();
                Ok(Some((comps, vals, ratios)))
            })
            .collect::<Result<_>>()?;
        let get = |i: usize| exact[leader[i]].as_ref().expect("leaders have results");
        let ratios: Vec<Vec<f64>> = (0..sites.len()).map(|i| get(i).2.clone()).collect();
        let mut ranks = distribute_ranks(&ratios, budget);
        // As PEFT: a site computing a shared PCA gets the larger rank of the pair.
        for i in 0..sites.len() {
            let j = leader[i];
            if j != i && ranks[j] < ranks[i] {
                ranks.swap(i, j);
            }
        }
        for (i, site) in sites.iter().enumerate() {
            if ranks[i] == 0 {
                continue;
            }
            let (comps, vals, _) = get(i);
            let mut a = comps.rows(0, ranks[i]).into_owned();
            if self.s.whiten {
                for row in 0..ranks[i] {
                    // The singular value of the centred inputs: √(variance · (rows − 1)).
                    let sv = (vals[row] * (pcas[leader[i]].rows - 1.0)).sqrt().max(f64::MIN_POSITIVE);
                    a.row_mut(row).iter_mut().for_each(|v| *v /= sv);
                }
            }
            self.init.insert(site.clone(), linalg::to_tensor(&a)?);
        }
        let total: usize = ranks.iter().sum();
        crate::note!("EVA: ranks {}..{} over {} sites (budget {budget}, used {total})", ranks.iter().min().unwrap_or(&0), ranks.iter().max().unwrap_or(&0), sites.len());
        Ok(())
    }

    fn attach(&mut self, model: &mut Llama) -> Result<()> {
        if self.init.is_empty() {
            return Err(Error::Model("EVA's initialisation needs its prepare pass over training batches first".into()));
        }
        let (r, alpha) = (self.config.r, self.config.alpha);
        let mut config = self.config.clone();
        let all = model.sites();
        let chosen = config.target_modules.select(&all, "lora_target_modules")?.len();
        if self.init.len() < chosen {
            config.target_modules = TargetModules::Names(self.init.keys().cloned().collect());
        }
        for (site, a) in &self.init {
            let k = a.dims()[0];
            if k != r {
                config.rank_pattern.insert(site.clone(), k);
                if self.s.adjust_scaling {
                    config.alpha_pattern.insert(site.clone(), alpha * k as f64 / r as f64);
                }
            }
        }
        let mut lora = Lora::new(config, self.seed)?;
        let init = &self.init;
        lora.attach_with(model, |_, site, _, out, k| Ok((init[site].clone(), Tensor::zeros((out, k), DType::F32, &Device::Cpu)?)))?;
        self.lora = Some(lora);
        Ok(())
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.lora().params()
    }

    fn sites(&self) -> Vec<String> {
        Method::sites(self.lora())
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        let lora = self.lora();
        let tensors: Vec<(String, Tensor)> = lora.params().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        Lora::save_tensors_with(dir, base_model, "eva", &lora.config, &tensors, &[("init_lora_weights", serde_json::Value::from("eva"))])
    }

    fn peft_compatible(&self) -> bool {
        true
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        self.lora().merge_into(model)
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn as_lora(&self) -> Option<Vec<LoraPair>> {
        Some(self.lora().pairs())
    }

    fn describe(&self) -> serde_json::Value {
        let mut d = self.lora().describe_lora();
        d["eva"] = serde_json::json!({ "rho": self.s.rho, "tau": self.s.tau, "label_mask": self.s.label_mask, "whiten": self.s.whiten });
        d
    }
}
