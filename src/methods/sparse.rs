//! What every sparse method (LIFT, SaRA, …) shares: linear sites that train chosen *entries*
//! of their base weight, their optimizer, and their artefact.
//!
//! A site keeps its base weight as loaded (GGUF blocks, bf16 or f32) and beside it only:
//! - the entries changed so far, as flat indices with `Δ = θ − θ0` (the sparse diff);
//! - the mask, the entries that train now (a subset of those), as a trainable vector `θ` of
//!   their current values, with `θ0` for them.
//!
//! So the f32 "master copy" of a masked matrix is `W0 + Δ`, held sparsely: memory grows with
//! the trained entries, not with the matrices holding them ([`crate::kernels::sparse_linear`]
//! forms the products and the masked gradient without a dense `Δ` or `gᵀx`).
//!
//! Masks may change between steps (LIFT's refresh, SaRA's progressive re-selection): entries
//! that stay keep `θ` bit for bit, entries that leave keep their `Δ` frozen in the diff,
//! entries that join start from `θ0 + Δ`. The optimizer ([`SparseAdamW`]) sees the change at
//! its next step and carries the moments of the entries that stay.
//!
//! Files: the adapter folder's `adapter_model.safetensors` is the sparse diff
//! ([`SparseDiff`], tensor `<site>.weight`), which `merge`/`export` add to a base. A checkpoint
//! adds [`TRAINED_FILE`], the mask with the exact `θ` values, so a resumed run continues bit
//! for bit.

use super::targets::TargetModules;
use super::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::formats::sparse_diff::{SparseDiff, SparseTensor};
use crate::kernels::{sparse_linear, FrozenWeight, SparseChange};
use crate::models::{add_bias, ForwardCtx, Linear, Llama, SiteHook};
use crate::optim::{AdamWConfig, LoadedState, MaskedAdamW, Optimizer, OptimizerState};
use candle_core::{Device, Tensor, Var};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A checkpoint's trained entries: per site the mask (`indices`) and `θ` there (`values`).
pub const TRAINED_FILE: &str = "trained_entries.safetensors";

/// Bytes a trained entry costs beyond its value, gradient and two moments (which memory
/// estimates count as trainable parameters): its index in the diff and the mask, `Δ`, `θ0`,
/// its column, row and position in the product's plan, and the optimizer's index.
pub const BYTES_PER_ENTRY: u64 = 7 * 4;

/// The parameter and diff name of a site's weight.
pub fn key(site: &str) -> String {
    format!("{site}.weight")
}

struct SiteState {
    /// Every entry changed so far, flat indices of `[out, in]`, increasing.
    flat: Vec<u32>,
    /// The trained entries, increasing, all in `flat`.
    mask: Vec<u32>,
    /// Their current values.
    theta: Var,
    /// The product's plan: columns and rows, `Δ` of the changed entries (stale for the trained
    /// ones, whose `Δ` is `θ − θ0`), `θ0` of the trained ones.
    change: Arc<SparseChange>,
    /// Counts mask changes, so the optimizer knows when to re-map its moments.
    generation: u64,
    /// The last generation whose change started every entry's moments afresh.
    reset_at: u64,
}

impl SiteState {
    fn theta_values(&self) -> Result<Vec<f32>> {
        Ok(self.theta.as_tensor().to_vec1()?)
    }

    /// `Δ` of every changed entry, the trained ones from `θ`.
    fn deltas(&self) -> Result<Vec<f32>> {
        Ok(self.change.values(&self.theta_values()?))
    }
}

/// A linear site trained at chosen entries of its weight.
pub struct SparseSite {
    pub site: String,
    out: usize,
    inp: usize,
    state: Mutex<SiteState>,
}

/// Positions of `mask` in `flat` (both increasing); `None` if an entry is missing.
fn positions(flat: &[u32], mask: &[u32]) -> Option<Vec<u32>> {
    let mut out = Vec::with_capacity(mask.len());
    let mut j = 0;
    for &m in mask {
        while j < flat.len() && flat[j] < m {
            j += 1;
        }
        if flat.get(j) != Some(&m) {
            return None;
        }
        out.push(j as u32);
    }
    Some(out)
}

fn strictly_increasing(v: &[u32]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

impl SparseSite {
    /// A site with changed entries `flat` (with `Δ`) of which `mask` trains, at values `theta`
    /// (`θ0 + Δ` when not given); `w0` is the site's base weight as f32.
    #[allow(clippy::too_many_arguments)]
    fn build(site: &str, out: usize, inp: usize, w0: &[f32], flat: Vec<u32>, delta: Vec<f32>, mask: Vec<u32>, theta: Option<Vec<f32>>) -> Result<SparseSite> {
        let bad = |what: String| Error::Model(format!("sparse site `{site}`: {what}"));
        if !strictly_increasing(&flat) || !strictly_increasing(&mask) || flat.last().is_some_and(|&l| l as usize >= out * inp) || flat.len() != delta.len() {
            return Err(bad(format!("{} changed entries with {} values, expected strictly increasing indices below {}", flat.len(), delta.len(), out * inp)));
        }
        let pos = positions(&flat, &mask).ok_or_else(|| bad("a trained entry is not among the changed ones".into()))?;
        let base: Vec<f32> = mask.iter().map(|&i| w0[i as usize]).collect();
        let theta = match theta {
            Some(t) if t.len() == mask.len() => t,
            Some(t) => return Err(bad(format!("{} values for {} trained entries", t.len(), mask.len()))),
            None => pos.iter().zip(&base).map(|(&p, &b)| b + delta[p as usize]).collect(),
        };
        let n = theta.len();
        let theta = Var::from_tensor(&Tensor::from_vec(theta, n, &Device::Cpu)?)?;
        let change = Arc::new(SparseChange::new(out, inp, &flat, delta, pos, base));
        Ok(SparseSite { site: site.to_string(), out, inp, state: Mutex::new(SiteState { flat, mask, theta, change, generation: 0, reset_at: 0 }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SiteState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The trainable vector `θ` (the trained entries' current values, in mask order).
    pub fn theta(&self) -> Var {
        self.lock().theta.clone()
    }

    /// `θ0` of the trained entries, in mask order.
    pub fn theta0(&self) -> Vec<f32> {
        self.lock().change.base.clone()
    }

    pub fn mask(&self) -> Vec<u32> {
        self.lock().mask.clone()
    }

    /// The mask's generation and the last one that reset the moments.
    fn generation(&self) -> (u64, u64) {
        let st = self.lock();
        (st.generation, st.reset_at)
    }

    /// Entries changed so far (trained now or before).
    pub fn changed_entries(&self) -> usize {
        self.lock().flat.len()
    }

    /// `θ − θ0` over the changed entries.
    pub fn diff(&self) -> Result<SparseTensor> {
        let st = self.lock();
        Ok(SparseTensor { shape: vec![self.out, self.inp], indices: st.flat.iter().map(|&i| i as u64).collect(), values: st.deltas()? })
    }

    /// The current weight `W0 + Δ` in f32, for selections made from it and for merging.
    pub fn current_weight(&self, w0: &FrozenWeight) -> Result<Vec<f32>> {
        self.applied_to(w0.to_f32_vec())
    }

    /// `Δ` added to `w` (the base weight, dequantized).
    fn applied_to(&self, mut w: Vec<f32>) -> Result<Vec<f32>> {
        self.diff()?.apply(&mut w)?;
        Ok(w)
    }

    /// Entries that train now.
    pub fn trained_entries(&self) -> usize {
        self.lock().mask.len()
    }

    /// Trains `mask` from now on: entries that stay keep `θ` exactly, leaving ones keep their
    /// `Δ`, joining ones start from their current value `θ0 + Δ` (`Δ = 0` for new ones). The
    /// optimizer carries the moments of entries that stay, or with `reset_moments` starts all
    /// of them from zero (a new optimizer for the new set). `w0` is the base weight, dequantized.
    pub fn set_mask(&self, w0: &[f32], mask: Vec<u32>, reset_moments: bool) -> Result<()> {
        if !strictly_increasing(&mask) || mask.last().is_some_and(|&l| l as usize >= self.out * self.inp) {
            return Err(Error::Model(format!("sparse site `{}`: a new mask must be strictly increasing indices below {}", self.site, self.out * self.inp)));
        }
        let mut st = self.lock();
        let (old_theta, deltas) = (st.theta_values()?, st.deltas()?);
        // The union of the changed entries and the new mask, with their Δ.
        let (mut flat, mut delta) = (Vec::with_capacity(st.flat.len() + mask.len()), Vec::with_capacity(st.flat.len() + mask.len()));
        let (mut i, mut j) = (0, 0);
        while i < st.flat.len() || j < mask.len() {
            let (a, b) = (st.flat.get(i).copied().unwrap_or(u32::MAX), mask.get(j).copied().unwrap_or(u32::MAX));
            if a <= b {
                flat.push(a);
                delta.push(deltas[i]);
                i += 1;
                j += (a == b) as usize;
            } else {
                flat.push(b);
                delta.push(0.0);
                j += 1;
            }
        }
        let pos = positions(&flat, &mask).expect("the mask is in the union");
        let mut theta: Vec<f32> = pos.iter().zip(&mask).map(|(&p, &m)| w0[m as usize] + delta[p as usize]).collect();
        // Entries that stay: θ carried exactly.
        let mut k = 0;
        for (o, &m) in st.mask.iter().enumerate() {
            while k < mask.len() && mask[k] < m {
                k += 1;
            }
            if mask.get(k) == Some(&m) {
                theta[k] = old_theta[o];
            }
        }
        let generation = st.generation + 1;
        let fresh = SparseSite::build(&self.site, self.out, self.inp, w0, flat, delta, mask, Some(theta))?;
        let mut new = fresh.state.into_inner().unwrap_or_else(|p| p.into_inner());
        new.generation = generation;
        new.reset_at = if reset_moments { generation } else { st.reset_at };
        *st = new;
        Ok(())
    }
}

impl SiteHook for SparseSite {
    fn forward(&self, x: &Tensor, w0: &FrozenWeight, b0: Option<&Tensor>, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (change, theta) = {
            let st = self.lock();
            (st.change.clone(), st.theta.clone())
        };
        let theta = if ctx.train { theta.as_tensor().clone() } else { theta.as_detached_tensor() };
        add_bias(sparse_linear(x, w0, &change, &theta)?, b0)
    }
}

/// The sparse sites of one method.
#[derive(Default)]
pub struct SparseSites {
    pub sites: Vec<Arc<SparseSite>>,
}

impl SparseSites {
    /// Attaches a site to every linear `targets` selects, training the entries
    /// `select(site, W0 as f32)` gives (strictly increasing flat indices).
    pub fn attach(model: &mut Llama, targets: &TargetModules, mut select: impl FnMut(&Linear, &[f32]) -> Result<Vec<u32>>) -> Result<SparseSites> {
        let sites = super::targets::hook_targets(model, targets, |_, lin| {
            let (out, inp) = lin.weight.dims();
            check_addressable(&lin.name, out, inp)?;
            let w0 = lin.weight.to_f32_vec();
            let mask = select(lin, &w0)?;
            let n = mask.len();
            Ok(Arc::new(SparseSite::build(&lin.name, out, inp, &w0, mask.clone(), vec![0.0; n], mask, None)?))
        })?;
        Ok(SparseSites { sites })
    }

    /// Reads an adapter folder's sparse diff (and, in a checkpoint, the trained entries) and
    /// attaches it. Without [`TRAINED_FILE`] the changed entries are the ones that train.
    pub fn load(model: &mut Llama, dir: &Path) -> Result<SparseSites> {
        let diff_path = dir.join(ADAPTER_WEIGHTS);
        let mut diff = SparseDiff::load(&diff_path)?.tensors;
        let trained_path = dir.join(TRAINED_FILE);
        let mut trained = if trained_path.is_file() { Some(SparseDiff::load(&trained_path)?.tensors) } else { None };
        let mut sites = Vec::new();
        for lin in model.linears_mut() {
            let Some(d) = diff.remove(&key(&lin.name)) else { continue };
            let (out, inp) = lin.weight.dims();
            if d.shape != [out, inp] {
                return Err(Error::format(&diff_path, format!("tensor `{}` is {:?} but this model's `{}` is [{out}, {inp}]: the adapter was trained for a different model", key(&lin.name), d.shape, lin.name)));
            }
            if let Some(i) = d.values.iter().position(|v| !v.is_finite()) {
                return Err(Error::format(&diff_path, format!("tensor `{}` holds {} at entry {i}: the adapter is corrupt or its training diverged", key(&lin.name), d.values[i])));
            }
            if lin.hook.is_some() {
                return Err(Error::Model(format!("module `{}` already has a method attached", lin.name)));
            }
            check_addressable(&lin.name, out, inp)?;
            let flat: Vec<u32> = d.indices.iter().map(|&i| i as u32).collect();
            let (mask, theta) = match trained.as_mut() {
                Some(t) => {
                    let e = t.remove(&key(&lin.name)).ok_or_else(|| Error::format(&trained_path, format!("tensor `{}` is missing", key(&lin.name))))?;
                    (e.indices.iter().map(|&i| i as u32).collect(), Some(e.values))
                }
                None => (flat.clone(), None),
            };
            let w0 = lin.weight.to_f32_vec();
            let site = Arc::new(SparseSite::build(&lin.name, out, inp, &w0, flat, d.values, mask, theta).map_err(|e| Error::format(&diff_path, e.to_string()))?);
            lin.hook = Some(site.clone());
            sites.push(site);
        }
        if let Some(extra) = diff.keys().next() {
            return Err(Error::format(&diff_path, format!("tensor `{extra}` does not belong to any linear module of this model")));
        }
        if let Some(extra) = trained.as_ref().and_then(|t| t.keys().next()) {
            return Err(Error::format(&trained_path, format!("tensor `{extra}` has no changed entries in {}", diff_path.display())));
        }
        Ok(SparseSites { sites })
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        self.sites.iter().map(|s| (key(&s.site), s.theta())).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.site.clone()).collect()
    }

    pub fn changed_entries(&self) -> usize {
        self.sites.iter().map(|s| s.changed_entries()).sum()
    }

    pub fn trained_entries(&self) -> usize {
        self.sites.iter().map(|s| s.trained_entries()).sum()
    }

    pub fn diff(&self) -> Result<SparseDiff> {
        let mut d = SparseDiff::default();
        for s in &self.sites {
            d.tensors.insert(key(&s.site), s.diff()?);
        }
        Ok(d)
    }

    /// Writes the adapter folder: the sparse diff and `config`.
    pub fn save(&self, dir: &Path, config: &serde_json::Value) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.diff()?.save(&dir.join(ADAPTER_WEIGHTS))?;
        let text = serde_json::to_string_pretty(config).expect("JSON values always serialise");
        crate::io_util::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// The adapter folder plus the trained entries' masks and exact values.
    pub fn save_checkpoint(&self, dir: &Path, config: &serde_json::Value) -> Result<()> {
        self.save(dir, config)?;
        self.save_trained(dir)
    }

    /// [`TRAINED_FILE`]: what a checkpoint adds to the adapter folder.
    pub fn save_trained(&self, dir: &Path) -> Result<()> {
        let mut t = SparseDiff::default();
        for s in &self.sites {
            let st = s.lock();
            t.tensors.insert(key(&s.site), SparseTensor { shape: vec![s.out, s.inp], indices: st.mask.iter().map(|&i| i as u64).collect(), values: st.theta_values()? });
        }
        t.save(&dir.join(TRAINED_FILE))
    }

    /// Adds each site's diff to its base weight (which becomes f32) and removes the hooks.
    pub fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            if let Some(site) = self.sites.iter().find(|s| s.site == lin.name) {
                let w = site.current_weight(&lin.weight)?;
                let (out, inp) = lin.weight.dims();
                lin.weight = FrozenWeight::from_f32(w, out, inp)?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    /// Gives every site a new mask, `select(site, current weight W0 + Δ)` (see
    /// [`SparseSite::set_mask`]); returns how many trained entries are new.
    pub fn reselect(&self, model: &Llama, reset_moments: bool, mut select: impl FnMut(&SparseSite, &[f32]) -> Result<Vec<u32>>) -> Result<usize> {
        let mut joined = 0;
        for lin in model.linears() {
            let Some(site) = self.sites.iter().find(|s| s.site == lin.name) else { continue };
            // The base dequantized once: for the current weight and for the new θ0.
            let w0 = lin.weight.to_f32_vec();
            let mask = select(site, &site.applied_to(w0.clone())?)?;
            let old = site.mask();
            joined += mask.iter().filter(|m| old.binary_search(m).is_err()).count();
            site.set_mask(&w0, mask, reset_moments)?;
        }
        Ok(joined)
    }

    pub fn optimizer(&self, config: AdamWConfig) -> Box<dyn Optimizer> {
        let masks = self.sites.iter().map(|s| s.mask()).collect();
        let inner = MaskedAdamW::new(config, masks).expect("site masks are strictly increasing");
        Box::new(SparseAdamW { sites: self.sites.clone(), generations: self.sites.iter().map(|s| s.generation().0).collect(), inner })
    }

    pub fn describe(&self) -> serde_json::Value {
        let trained = self.trained_entries();
        let total: usize = self.sites.iter().map(|s| s.out * s.inp).sum();
        serde_json::json!({
            "sites": self.sites.len(),
            "trained_entries": trained,
            "changed_entries": self.changed_entries(),
            "entries_of_the_sites": total,
            "trained_fraction": if total > 0 { trained as f64 / total as f64 } else { 0.0 },
            "state_bytes": trained as u64 * (16 + BYTES_PER_ENTRY),
        })
    }
}

fn check_addressable(site: &str, out: usize, inp: usize) -> Result<()> {
    if out * inp > u32::MAX as usize {
        return Err(Error::Model(format!("`{site}` has {out}×{inp} entries, more than sparse fine-tuning's 32-bit indices address")));
    }
    Ok(())
}

/// AdamW over the sites' trained entries ([`MaskedAdamW`]), following their masks: when a
/// site's mask changed since the last step, the moments of entries that stay are carried and
/// joining entries start from zero.
struct SparseAdamW {
    sites: Vec<Arc<SparseSite>>,
    /// The mask generation each matrix's moments follow.
    generations: Vec<u64>,
    inner: MaskedAdamW,
}

impl SparseAdamW {
    /// The moments re-mapped to the sites' current masks.
    fn follow_masks(sites: &[Arc<SparseSite>], generations: &mut [u64], inner: &mut MaskedAdamW) -> Result<()> {
        for (i, s) in sites.iter().enumerate() {
            let (g, reset_at) = s.generation();
            if g != generations[i] {
                if reset_at > generations[i] {
                    inner.set_mask(i, Vec::new())?;
                }
                inner.set_mask(i, s.mask())?;
                generations[i] = g;
            }
        }
        Ok(())
    }
}

impl Optimizer for SparseAdamW {
    fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        Self::follow_masks(&self.sites, &mut self.generations, &mut self.inner)?;
        let mut values: Vec<Vec<f32>> = params.iter().map(|p| p.as_tensor().to_vec1()).collect::<candle_core::Result<_>>()?;
        self.inner.step_values(&mut values.iter_mut().map(|v| v.as_mut_slice()).collect::<Vec<_>>(), grads, lr)?;
        for (p, v) in params.iter().zip(values) {
            let n = v.len();
            p.set(&Tensor::from_vec(v, n, &Device::Cpu)?)?;
        }
        Ok(())
    }

    fn state(&self, params: &[(String, Var)]) -> Result<OptimizerState> {
        let mut inner = MaskedAdamW { config: self.inner.config, step: self.inner.step, tensors: self.inner.tensors.clone() };
        Self::follow_masks(&self.sites, &mut self.generations.clone(), &mut inner)?;
        let mut tensors = Vec::with_capacity(2 * params.len());
        for ((key, _), t) in params.iter().zip(&inner.tensors) {
            let n = t.indices.len();
            tensors.push((format!("{key}.exp_avg"), Tensor::from_slice(&t.exp_avg, n, &Device::Cpu)?));
            tensors.push((format!("{key}.exp_avg_sq"), Tensor::from_slice(&t.exp_avg_sq, n, &Device::Cpu)?));
        }
        Ok(OptimizerState { tensors, step: inner.step })
    }

    fn restore(&mut self, params: &[(String, Var)], state: &LoadedState, src: &Path) -> Result<()> {
        for (i, ((key, _), s)) in params.iter().zip(&self.sites).enumerate() {
            let mask = s.mask();
            let n = mask.len();
            self.inner.set_mask(i, mask)?;
            self.inner.tensors[i].exp_avg = state.take_exact(&format!("{key}.exp_avg"), n, src)?;
            self.inner.tensors[i].exp_avg_sq = state.take_exact(&format!("{key}.exp_avg_sq"), n, src)?;
            self.generations[i] = s.generation().0;
        }
        self.inner.step = state.step;
        Ok(())
    }
}

/// Per matrix, the flat indices of its entries among the `k` largest `scores` over all
/// matrices (increasing); ties at the threshold go to the earlier matrix and index, so the
/// choice is deterministic.
pub fn global_top_k(scores: &[Vec<f32>], k: usize) -> Vec<Vec<u32>> {
    let total: usize = scores.iter().map(|s| s.len()).sum();
    let k = k.min(total);
    if k == 0 {
        return scores.iter().map(|_| Vec::new()).collect();
    }
    let threshold = {
        let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
        let at = all.len() - k;
        *all.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1
    };
    let above: usize = scores.iter().map(|s| s.iter().filter(|v| v.total_cmp(&threshold).is_gt()).count()).sum();
    let mut ties_left = k - above;
    scores
        .iter()
        .map(|s| {
            (0..s.len() as u32)
                .filter(|&i| match s[i as usize].total_cmp(&threshold) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal if ties_left > 0 => {
                        ties_left -= 1;
                        true
                    }
                    _ => false,
                })
                .collect()
        })
        .collect()
}
