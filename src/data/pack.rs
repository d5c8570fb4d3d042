//! Sample packing (`sample_packing = true`): several short examples share one training row, so
//! a batch spends its compute on tokens rather than on padding.
//!
//! Examples go into rows of at most `capacity` tokens by best-fit decreasing, as TRL's
//! `pack_dataset(strategy="bfd")` does: longest first, each into the row whose free space fits
//! it most tightly (a new row when none fits). Packing happens once, before training, so the
//! run's order, step count and resume logic work on packed rows exactly as on plain examples.
//!
//! A packed row keeps its examples apart: the first label of each example is ignored (nothing
//! is predicted across a boundary), and [`EncodedExample::packed`] records the examples'
//! lengths, from which batches give each token its position inside its own example. RoPE
//! restarts there and attention sees only the example's own keys, so a packed row computes
//! what its examples would alone (`tests/train_e2e.rs` checks the update, `tests/kernels.rs` the
//! attention and RoPE).

use super::encode::{EncodedExample, IGNORE_INDEX};
use std::collections::BTreeSet;

/// What packing did, for the run's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackStats {
    pub examples: usize,
    pub rows: usize,
    pub tokens: usize,
    pub capacity: usize,
}

impl PackStats {
    /// The share of the rows' capacity holding tokens.
    pub fn fill(&self) -> f64 {
        self.tokens as f64 / (self.rows * self.capacity).max(1) as f64
    }
}

/// Packs `examples` (none longer than `capacity`, none a preference pair) into rows of at most
/// `capacity` tokens. Deterministic: ties in length keep the examples' order.
pub fn pack(examples: Vec<EncodedExample>, capacity: usize) -> (Vec<EncodedExample>, PackStats) {
    assert!(examples.iter().all(|e| e.rejected.is_none() && e.len() <= capacity && e.packed.is_empty()), "pack: examples must be plain and fit the row");
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    // Rows by (free space, row index): the tightest fit is the first entry with room enough.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let n = examples[i].len();
        let (room, row) = match free.range((n, 0)..).next().copied() {
            Some(entry) => {
                free.remove(&entry);
                entry
            }
            None => {
                rows.push(Vec::new());
                (capacity, rows.len() - 1)
            }
        };
        rows[row].push(i);
        free.insert((room - n, row));
    }
    let stats = PackStats { examples: examples.len(), rows: rows.len(), tokens: examples.iter().map(|e| e.len()).sum(), capacity };
    let mut slots: Vec<Option<EncodedExample>> = examples.into_iter().map(Some).collect();
    let packed = rows.iter().map(|row| join(row.iter().map(|&i| slots[i].take().expect("each example is packed once")).collect())).collect();
    (packed, stats)
}

/// One row of `parts`, in order.
fn join(parts: Vec<EncodedExample>) -> EncodedExample {
    if parts.len() == 1 {
        return parts.into_iter().next().expect("one part");
    }
    let mut row = EncodedExample { packed: parts.iter().map(|p| p.len()).collect(), ..Default::default() };
    for p in parts {
        let first = row.labels.len();
        row.input_ids.extend_from_slice(&p.input_ids);
        row.labels.extend_from_slice(&p.labels);
        // Never predict an example's first token from the one before it.
        if let Some(l) = row.labels.get_mut(first) {
            *l = IGNORE_INDEX;
        }
        row.truncated |= p.truncated;
        row.targets_cut += p.targets_cut;
    }
    row
}

/// Per token of `row` (padded to `len`), its position inside its own packed example; the
/// padding continues the last example's positions.
pub fn positions(row: &EncodedExample, len: usize) -> impl Iterator<Item = u32> + '_ {
    let one = [row.len()];
    let parts: &[usize] = if row.packed.is_empty() { &one } else { &row.packed };
    let last = *parts.last().unwrap_or(&0);
    let head: Vec<u32> = parts.iter().flat_map(|&n| 0..n as u32).collect();
    let tail = last as u32..(last + len - row.len()) as u32;
    head.into_iter().chain(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, id: u32) -> EncodedExample {
        EncodedExample { input_ids: vec![id; n], labels: vec![id as i32; n], ..Default::default() }
    }

    #[test]
    fn best_fit_decreasing_fills_the_tightest_row() {
        // Capacity 10, longest first: 7 opens row 0 (3 free); 6 does not fit it and opens row 1
        // (4 free); 4 fits only row 1; 3 fits row 0 exactly; 2 fits nowhere and opens row 2.
        let (rows, stats) = pack(vec![ex(3, 1), ex(7, 2), ex(4, 3), ex(6, 4), ex(2, 5)], 10);
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.input_ids.clone()).collect();
        assert_eq!(ids, vec![[vec![2; 7], vec![1; 3]].concat(), [vec![4; 6], vec![3; 4]].concat(), vec![5; 2]]);
        assert_eq!(rows[0].packed, vec![7, 3]);
        assert!(rows[2].packed.is_empty(), "a row of one example is the example itself");
        assert_eq!(stats, PackStats { examples: 5, rows: 3, tokens: 22, capacity: 10 });
        // Each example's first label is ignored in a packed row, the others kept.
        assert_eq!(rows[0].labels[0], IGNORE_INDEX);
        assert_eq!(rows[0].labels[7], IGNORE_INDEX);
        assert_eq!(rows[0].labels[8], 1);
        assert_eq!(rows[2].labels, vec![5, 5], "an unpacked example keeps its labels");
    }

    #[test]
    fn positions_restart_at_each_example_and_continue_into_padding() {
        let (rows, _) = pack(vec![ex(3, 1), ex(2, 2)], 8);
        assert_eq!(positions(&rows[0], 7).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(positions(&ex(2, 1), 4).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }
}
