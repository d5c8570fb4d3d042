//! Key/value caches for decoding. [`KvCache`] holds one batch's keys and values as tensors and
//! grows by concatenation (prefill, single-sequence use); [`RowCache`] holds a batch of
//! sequences that sit at different positions, each in its own fixed-capacity row, so a batch
//! of prompts of different lengths decodes together without padding.

use crate::error::{Error, Result};
use candle_core::Tensor;

/// Keys and values of the positions seen so far, per layer (`[b, t, h_kv, d]`).
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![None; n_layers] }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[1])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per layer, keys and values of `rows` sequences in buffers `[rows, cap, width]` (`width` =
/// key/value heads × head dimension); row `i` holds its first `lens[i]` positions.
pub struct RowCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    lens: Vec<usize>,
    cap: usize,
    width: usize,
}

impl RowCache {
    pub fn new(n_layers: usize, rows: usize, cap: usize, width: usize) -> Self {
        let buf = || vec![0f32; rows * cap * width];
        Self { keys: (0..n_layers).map(|_| buf()).collect(), values: (0..n_layers).map(|_| buf()).collect(), lens: vec![0; rows], cap, width }
    }

    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Positions cached per row (the position the row's next token takes).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Copies a one-sequence cache (a prompt's prefill) into `row`, replacing what it held.
    pub fn fill_row(&mut self, row: usize, from: &KvCache) -> Result<()> {
        let n = from.len();
        if n > self.cap {
            return Err(Error::Model(format!("a prompt of {n} positions does not fit a decoding cache of {}", self.cap)));
        }
        for (li, layer) in from.layers.iter().enumerate() {
            let (k, v) = layer.as_ref().ok_or_else(|| Error::Model("the prefill cache misses a layer".into()))?;
            let at = row * self.cap * self.width;
            let (k, v): (Vec<f32>, Vec<f32>) = (k.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?);
            if k.len() != n * self.width {
                return Err(Error::Model(format!("prefill keys of {} values, expected {} positions × {}", k.len(), n, self.width)));
            }
            self.keys[li][at..at + k.len()].copy_from_slice(&k);
            self.values[li][at..at + v.len()].copy_from_slice(&v);
        }
        self.lens[row] = n;
        Ok(())
    }

    /// Writes one new position per row into layer `li` (at each row's current length), from
    /// `k, v: [rows, width]`. [`RowCache::advance`] counts them once every layer has its own.
    pub(super) fn write(&mut self, li: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let w = self.width;
        for (row, &n) in self.lens.iter().enumerate() {
            if n >= self.cap {
                return Err(Error::Model(format!("row {row} of the decoding cache is full ({} positions)", self.cap)));
            }
            let at = (row * self.cap + n) * w;
            self.keys[li][at..at + w].copy_from_slice(&k[row * w..(row + 1) * w]);
            self.values[li][at..at + w].copy_from_slice(&v[row * w..(row + 1) * w]);
        }
        Ok(())
    }

    pub(super) fn layer(&self, li: usize) -> (&[f32], &[f32]) {
        (&self.keys[li], &self.values[li])
    }

    pub(super) fn advance(&mut self) {
        self.lens.iter_mut().for_each(|n| *n += 1);
    }

    /// Keeps the rows whose flag is set, in order (finished sequences leave the batch).
    pub fn retain(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.rows(), "one flag per row");
        let row_len = self.cap * self.width;
        let kept: Vec<usize> = (0..keep.len()).filter(|&r| keep[r]).collect();
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            for (to, &from) in kept.iter().enumerate() {
                if to != from {
                    buf.copy_within(from * row_len..(from + 1) * row_len, to * row_len);
                }
            }
            buf.truncate(kept.len() * row_len);
        }
        self.lens = kept.iter().map(|&r| self.lens[r]).collect();
    }
}
