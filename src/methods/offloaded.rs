//! Full fine-tuning whose trained weights live in a file, not in memory (`adapter = "full"`
//! with `zo_offload = true`): the storage side of ZO2-style zeroth-order training (METHODS.md
//! §4.2). Each target site's f32 master copy sits at a fixed offset of a scratch file in the
//! output folder; the zeroth-order step (`train::zo_offload`) reads a block's matrices, sets
//! the values its forward is to use on the sites, and writes the updated matrices back. Any
//! other forward (evaluation, a reference pass) reads a site's weight from the file when it
//! needs it and drops it after.
//!
//! The adapter it writes is `full`'s (`<site>.weight` under Hugging Face names, the same
//! config), so `eval`, `merge`, `export` and a run without offloading read it as `full`. It is
//! written tensor by tensor from the file, never whole in memory.

use super::files::method_config;
use super::targets::{hook_targets, TargetModules};
use super::{Method, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::formats::safetensors as st;
use crate::kernels::FrozenWeight;
use crate::models::linear::add_bias;
use crate::models::{ForwardCtx, Llama, SiteHook};
use candle_core::{Device, Tensor, Var};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The scratch file the trained matrices live in during a run, in the output folder. Not an
/// artefact: the run's adapter and checkpoints are written from it, and it is removed when the
/// run finishes.
pub const STORE_FILE: &str = "zo_offload_weights.f32";

/// A file of f32 values read and written at offsets (`pread`/`pwrite`: page cache, not this
/// process's memory).
struct StoreFile {
    path: PathBuf,
    file: std::fs::File,
}

impl StoreFile {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; 4 * len];
        self.file.read_exact_at(&mut bytes, offset).map_err(|e| Error::io(&self.path, e))?;
        Ok(st::le_f32s(&bytes))
    }

    fn write(&self, offset: u64, values: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.write_all_at(&bytes, offset).map_err(|e| Error::io(&self.path, e))
    }
}

/// A trained site: where its matrix lies in the file, and the values the current forward
/// uses when the zeroth-order step has set them (the perturbed `θ ± εz`).
pub struct OffloadedSite {
    site: String,
    shape: (usize, usize),
    offset: u64,
    file: Arc<StoreFile>,
    current: Mutex<Option<Tensor>>,
}

impl OffloadedSite {
    fn len(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    fn stored(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.file.read(self.offset, self.len())?, self.shape, &Device::Cpu)?)
    }
}

impl SiteHook for OffloadedSite {
    fn forward(&self, x: &Tensor, _w0: &FrozenWeight, b0: Option<&Tensor>, _ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let set = self.current.lock().expect("no forward panics while holding it").clone();
        let w = match set {
            Some(w) => w,
            None => self.stored().map_err(candle_core::Error::wrap)?,
        };
        // As `full`'s site computes it, so that both give the same values bit for bit.
        add_bias(x.broadcast_matmul(&w.t()?)?, b0)
    }
}

/// The trained matrices of an offloaded run, in site order (the order of `full`'s parameters,
/// which fixes each matrix's random direction), grouped by the block they belong to.
pub struct OffloadedWeights {
    file: Arc<StoreFile>,
    sites: Vec<Arc<OffloadedSite>>,
    blocks: Vec<Vec<usize>>,
}

impl OffloadedWeights {
    /// The indices (into site order) of block `layer`'s trained matrices.
    pub fn block(&self, layer: usize) -> &[usize] {
        self.blocks.get(layer).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self, i: usize) -> usize {
        self.sites[i].len()
    }

    /// Matrix `i`'s stored values.
    pub fn read(&self, i: usize) -> Result<Vec<f32>> {
        let s = &self.sites[i];
        self.file.read(s.offset, s.len())
    }

    pub fn write(&self, i: usize, values: &[f32]) -> Result<()> {
        let s = &self.sites[i];
        debug_assert_eq!(values.len(), s.len());
        self.file.write(s.offset, values)
    }

    /// The values site `i`'s forward uses until [`OffloadedWeights::clear`]; the stored ones
    /// otherwise.
    pub fn set(&self, i: usize, values: Vec<f32>) -> Result<()> {
        let s = &self.sites[i];
        *s.current.lock().expect("no forward panics while holding it") = Some(Tensor::from_vec(values, s.shape, &Device::Cpu)?);
        Ok(())
    }

    pub fn clear(&self, i: usize) {
        *self.sites[i].current.lock().expect("no forward panics while holding it") = None;
    }

    pub fn num_values(&self) -> usize {
        self.sites.iter().map(|s| s.len()).sum()
    }

    /// Bytes of the largest block's matrices.
    pub fn largest_block_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.iter().map(|&i| 4 * self.len(i)).sum()).max().unwrap_or(0)
    }
}

/// `adapter = "full"` with its matrices offloaded.
pub struct OffloadedFull {
    targets: TargetModules,
    weights: Arc<OffloadedWeights>,
}

impl OffloadedFull {
    /// Attaches to the sites `targets` selects, with the store at `store` (created afresh).
    /// The matrices start from `from`'s `full` adapter (a checkpoint or `init_adapter`), or
    /// else from the loaded weights, dequantized; either way one matrix at a time.
    pub fn attach(model: &mut Llama, targets: TargetModules, store: &Path, from: Option<&Path>) -> Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(store).map_err(|e| Error::io(store, e))?;
        let file = Arc::new(StoreFile { path: store.to_path_buf(), file });
        let (targets, source) = match from {
            Some(dir) => {
                let cfg: serde_json::Value = serde_json::from_str(&crate::io_util::read_to_string(&dir.join(ADAPTER_CONFIG))?)
                    .map_err(|e| Error::format(dir.join(ADAPTER_CONFIG), e.to_string()))?;
                let method = cfg.get(super::METHOD_KEY).and_then(|m| m.as_str()).unwrap_or("a PEFT");
                if method != "full" {
                    return Err(Error::config("adapter", format!("is \"full\" (zo_offload), but {} holds a `{method}` adapter", dir.display())));
                }
                let t = TargetModules::from_json(cfg.get("target_modules").unwrap_or(&serde_json::Value::Null), "target_modules")
                    .map_err(|e| Error::format(dir.join(ADAPTER_CONFIG), e.to_string()))?;
                let w = dir.join(ADAPTER_WEIGHTS);
                let header = st::read_header(&w)?;
                (t, Some((w, header)))
            }
            None => (targets, None),
        };
        let mut offset = 0u64;
        let sites = hook_targets(model, &targets, |_, lin| {
            let shape = lin.weight.dims();
            let values = match &source {
                Some((path, header)) => {
                    let key = format!("{}.weight", lin.name);
                    let e = header.get(&key).ok_or_else(|| Error::format(path, format!("tensor `{key}` is missing")))?;
                    if e.shape != [shape.0, shape.1] {
                        return Err(Error::format(path, format!("tensor `{key}` has shape {:?}, expected {:?}", e.shape, [shape.0, shape.1])));
                    }
                    st::read_tensor_f32(path, &key, e)?
                }
                None => lin.weight.to_tensor()?.flatten_all()?.to_vec1()?,
            };
            file.write(offset, &values)?;
            let site = Arc::new(OffloadedSite { site: lin.name.clone(), shape, offset, file: file.clone(), current: Mutex::new(None) });
            offset += 4 * values.len() as u64;
            Ok(site)
        })?;
        if let Some((path, header)) = &source {
            if let Some(extra) = header.keys().filter(|k| !sites.iter().any(|s| format!("{}.weight", s.site) == **k)).min() {
                return Err(Error::format(path, format!("tensor `{extra}` does not belong to any trained module of this model")));
            }
        }
        let mut blocks = vec![Vec::new(); model.layers.len()];
        for (i, s) in sites.iter().enumerate() {
            let layer = crate::models::block_index(&s.site)
                .filter(|&l| l < blocks.len())
                .ok_or_else(|| Error::Model(format!("module `{}` is not inside a block", s.site)))?;
            blocks[layer].push(i);
        }
        Ok(OffloadedFull { targets, weights: Arc::new(OffloadedWeights { file, sites, blocks }) })
    }

    pub fn weights(&self) -> Arc<OffloadedWeights> {
        self.weights.clone()
    }
}

impl Method for OffloadedFull {
    fn name(&self) -> &'static str {
        "full"
    }

    fn attach(&mut self, _model: &mut Llama) -> Result<()> {
        Err(Error::Model("an offloaded `full` is attached by OffloadedFull::attach".into()))
    }

    /// None in memory: the zeroth-order step updates the file.
    fn params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn num_params(&self) -> usize {
        self.weights.num_values()
    }

    fn sites(&self) -> Vec<String> {
        self.weights.sites.iter().map(|s| s.site.clone()).collect()
    }

    fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let w = &self.weights;
        let tensors: Vec<(String, Vec<usize>)> = w.sites.iter().map(|s| (format!("{}.weight", s.site), vec![s.shape.0, s.shape.1])).collect();
        st::save_streamed(&dir.join(ADAPTER_WEIGHTS), &tensors, st::SaveDType::F32, None, |i| w.read(i))?;
        let cfg = method_config("full", base_model, serde_json::json!({ "target_modules": self.targets.to_json() }));
        let text = serde_json::to_string_pretty(&cfg).expect("JSON values always serialise");
        crate::io_util::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    fn merge(&self, model: &mut Llama) -> Result<()> {
        for lin in model.linears_mut() {
            if let Some(site) = self.weights.sites.iter().find(|s| s.site == lin.name) {
                lin.weight = FrozenWeight::from_tensor(&site.stored()?)?;
                lin.hook = None;
            }
        }
        Ok(())
    }

    fn mergeable(&self) -> bool {
        true
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "sites": self.weights.sites.len(), "trained_entries": self.num_params(), "offloaded_to": self.weights.file.path })
    }
}
