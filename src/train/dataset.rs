//! Turning the plan's dataset entries into encoded training and validation examples.

use crate::config::{DatasetSpec, TrainConfig};
use crate::data::pack::{pack, PackStats};
use crate::data::{epoch_order, load_jsonl_dataset, DatasetFormat, EncodeOptions, EncodedDataset, EncodedExample, TextTokenizer};
use crate::error::{Error, Result};

pub struct Prepared {
    pub train: Vec<EncodedExample>,
    pub val: Vec<EncodedExample>,
    /// Examples dropped because no target token survived truncation.
    pub skipped: usize,
    /// Examples cut at `sequence_len`.
    pub truncated: usize,
    /// With `sample_packing`, how the training examples were packed (`train` then holds rows).
    pub packing: Option<PackStats>,
    /// Training examples cut at `sequence_len`, and the target tokens the cut removed (counted
    /// before packing, so per example, not per row).
    pub train_cut: (usize, usize),
}

impl Prepared {
    /// Training examples, whether or not they were packed into rows.
    pub fn train_examples(&self) -> usize {
        self.packing.map_or(self.train.len(), |p| p.examples)
    }
}

/// Of `examples`, those cut at `sequence_len`, and the target tokens the cuts removed.
pub fn truncation(examples: &[EncodedExample]) -> (usize, usize) {
    (examples.iter().filter(|e| e.truncated).count(), examples.iter().map(|e| e.targets_cut).sum())
}

/// Reads and encodes one dataset entry of a plan.
pub fn load_spec(spec: &DatasetSpec, tok: &TextTokenizer, opts: &EncodeOptions) -> Result<EncodedDataset> {
    let format = DatasetFormat::from_config("datasets.type", &spec.format)?;
    load_jsonl_dataset(&spec.path, format, tok, opts)
}

pub fn encode_options(cfg: &TrainConfig) -> EncodeOptions {
    EncodeOptions { train_on_inputs: cfg.train_on_inputs, add_eos: cfg.add_eos, sequence_len: cfg.sequence_len }
}

pub fn prepare(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let opts = encode_options(cfg);
    let (mut skipped, mut truncated) = (0, 0);
    let mut load = |spec: &DatasetSpec| -> Result<Vec<EncodedExample>> {
        let d = load_spec(spec, tok, &opts)?;
        skipped += d.stats.without_targets;
        truncated += d.stats.truncated;
        Ok(d.examples)
    };
    let mut train = Vec::new();
    for spec in &cfg.datasets {
        train.extend(load(spec)?);
    }
    let explicit_val = cfg.val_set.as_ref().map(&mut load).transpose()?;
    if train.is_empty() {
        return Err(Error::config(
            "datasets",
            format!("no training example has a target token ({skipped} had none left after truncation to sequence_len = {}); check sequence_len and the dataset formats", cfg.sequence_len),
        ));
    }
    let val = match (explicit_val, cfg.val_size) {
        (Some(v), _) => v,
        (None, Some(size)) => {
            let n = train.len();
            let k = if size < 1.0 { (size * n as f64).round().max(1.0) as usize } else { size as usize };
            if k >= n {
                return Err(Error::config("val_size", format!("holds out {k} of {n} examples, leaving none to train on")));
            }
            // A seed-determined split, independent of the training order's shuffling.
            let order = epoch_order(n, cfg.seed ^ 0x5EED_0F5A_11D0, 0, true);
            let mut is_val = vec![false; n];
            order[..k].iter().for_each(|&i| is_val[i] = true);
            let (mut val, mut rest) = (Vec::with_capacity(k), Vec::with_capacity(n - k));
            for (i, e) in train.into_iter().enumerate() {
                if is_val[i] {
                    val.push(e)
                } else {
                    rest.push(e)
                }
            }
            train = rest;
            val
        }
        (None, None) => Vec::new(),
    };
    let train_cut = truncation(&train);
    let mut packing = None;
    if cfg.sample_packing {
        if train.iter().any(|e| e.rejected.is_some()) {
            return Err(Error::config("sample_packing", "packs plain examples, and the training data holds preference pairs (chosen/rejected); remove sample_packing"));
        }
        let (rows, stats) = pack(train, cfg.sequence_len);
        train = rows;
        packing = Some(stats);
    }
    Ok(Prepared { train, val, skipped, truncated, packing, train_cut })
}
