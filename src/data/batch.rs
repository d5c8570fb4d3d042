//! Batches of encoded examples, and the (deterministic) order examples are visited in.

use super::encode::{EncodedExample, IGNORE_INDEX};

/// A padded batch, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// Next-token targets: `targets[i*t + j] = labels[i][j + 1]`, and `-100` where that label is
    /// ignored, for padding, and at each row's last real position. A causal model's output at
    /// position `j` is scored against `targets[.., j]`.
    pub targets: Vec<i32>,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Number of targets that are not `-100` (the loss's denominator).
    pub n_targets: usize,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
}

/// Pads `examples` on the right to the longest one and shifts labels into next-token targets.
/// Right padding needs no attention mask for a causal model: padded positions come after every
/// real one, and their targets are `-100`.
pub fn make_batch(examples: &[&EncodedExample], pad_id: u32) -> Batch {
    let b = examples.len();
    let t = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut input_ids = vec![pad_id; b * t];
    let mut targets = vec![IGNORE_INDEX; b * t];
    let mut lengths = Vec::with_capacity(b);
    let mut n_targets = 0;
    for (i, ex) in examples.iter().enumerate() {
        let n = ex.input_ids.len();
        lengths.push(n);
        input_ids[i * t..i * t + n].copy_from_slice(&ex.input_ids);
        for j in 0..n.saturating_sub(1) {
            let label = ex.labels.get(j + 1).copied().unwrap_or(IGNORE_INDEX);
            if label != IGNORE_INDEX {
                targets[i * t + j] = label;
                n_targets += 1;
            }
        }
    }
    Batch {
        input_ids,
        targets,
        batch_size: b,
        seq_len: t,
        n_targets,
        lengths,
    }
}

/// splitmix64: a small, well-mixed 64-bit generator; the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        // 2^64 mod n values at the top are rejected so that every residue is equally likely.
        let rem = (u64::MAX % n + 1) % n;
        let zone = u64::MAX - rem;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % n;
            }
        }
    }
}

/// The order examples `0..n` are visited in during `epoch`: a Fisher–Yates shuffle driven by
/// splitmix64 seeded from `seed` and `epoch` (so each epoch differs, and the same seed and
/// epoch give the same order on every machine), or `0..n` when `shuffle` is false.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if !shuffle || n < 2 {
        return order;
    }
    let mut mix = SplitMix64::new(seed);
    let a = mix.next_u64();
    let mut rng = SplitMix64::new(a ^ SplitMix64::new(epoch ^ 0xD1B5_4A32_D192_ED03).next_u64());
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}
