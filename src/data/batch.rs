//! Batches of encoded examples, and the (deterministic) order examples are visited in.

use super::encode::{EncodedExample, IGNORE_INDEX};
use crate::rng::SplitMix64;
use std::sync::Arc;

/// A padded batch, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Default)]
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
    /// Preference pairs in the batch: rows `0..pairs` are their chosen sequences and rows
    /// `pairs..2·pairs` their rejected ones, in the same order (0 for plain examples).
    pub pairs: usize,
    /// Per row, the reference model's log-probability of the row's targets, where it was
    /// computed before training (DPO's cached reference).
    pub reference_logps: Option<Vec<f32>>,
    /// Sampled completions (GRPO): per row, its reward and its group-normalised advantage.
    pub rollout: Option<RolloutRows>,
    /// Where rows hold several packed examples: per token, its position inside its own
    /// example (row-major `[batch_size, seq_len]`); the forward restarts RoPE and attention there.
    pub positions: Option<Arc<[u32]>>,
}

/// Per row of a batch of sampled completions, what the online objectives need.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RolloutRows {
    pub rewards: Vec<f32>,
    pub advantages: Vec<f32>,
}

impl Batch {
    /// Whether the input token at flat position `i` (row-major `[batch_size, seq_len]`) is a
    /// response token: the target of the position before it in its row.
    pub fn is_response_input(&self, i: usize) -> bool {
        !i.is_multiple_of(self.seq_len) && self.targets[i - 1] != IGNORE_INDEX
    }

    /// Each example's tokens, as a range of flat positions: a row's real tokens, or, in packed
    /// rows, each of the examples it holds (padding left out).
    pub fn example_spans(&self) -> Vec<std::ops::Range<usize>> {
        let mut spans = Vec::new();
        for (j, &len) in self.lengths.iter().enumerate() {
            let row = j * self.seq_len..j * self.seq_len + len.min(self.seq_len);
            let mut start = row.start;
            for i in row.clone().skip(1) {
                if self.positions.as_ref().is_some_and(|p| p[i] == 0) {
                    spans.push(start..i);
                    start = i;
                }
            }
            if start < row.end {
                spans.push(start..row.end);
            }
        }
        spans
    }

    /// Target tokens per row (its response tokens).
    pub fn targets_per_row(&self) -> Vec<usize> {
        self.targets.chunks(self.seq_len.max(1)).map(|r| r.iter().filter(|&&t| t != IGNORE_INDEX).count()).collect()
    }
}

/// Pads `examples` on the right to the longest one and shifts labels into next-token targets.
/// Right padding needs no attention mask for a causal model: padded positions come after every
/// real one, and their targets are `-100`. Preference pairs give two rows each: all chosen
/// sequences first, then the rejected ones (see [`Batch::pairs`]).
pub fn make_batch(examples: &[&EncodedExample], pad_id: u32) -> Batch {
    let pairs = examples.iter().filter(|e| e.rejected.is_some()).count();
    assert!(pairs == 0 || pairs == examples.len(), "a batch mixes preference pairs and plain examples");
    let rows: Vec<&EncodedExample> = examples.iter().copied().chain(examples.iter().filter_map(|e| e.rejected.as_deref())).collect();
    let b = rows.len();
    let t = rows.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut input_ids = vec![pad_id; b * t];
    let mut targets = vec![IGNORE_INDEX; b * t];
    let mut lengths = Vec::with_capacity(b);
    let mut n_targets = 0;
    for (i, ex) in rows.iter().enumerate() {
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
    let reference_logps = rows.iter().map(|e| e.reference_logp).collect::<Option<Vec<f32>>>();
    let positions = rows.iter().any(|e| !e.packed.is_empty()).then(|| rows.iter().flat_map(|e| super::pack::positions(e, t)).collect());
    Batch {
        input_ids,
        targets,
        batch_size: b,
        seq_len: t,
        n_targets,
        lengths,
        pairs,
        reference_logps,
        rollout: None,
        positions,
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
