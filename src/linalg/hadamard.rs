//! Orthonormal Hadamard rotations for quantisation (RoSTE, QuaRot): `x ↦ x·H` on the last
//! dimension spreads an outlier channel over all channels without changing `x·Wᵀ` when the
//! weight is rotated alike (`(x·H)·(W·H)ᵀ = x·Wᵀ`, `H` orthogonal). A dimension that is not a
//! power of two (SmolLM2's 576 = 9·64) is rotated in blocks of its largest power-of-two
//! divisor: a block-diagonal matrix of Walsh–Hadamard blocks, still orthogonal.

/// The block a dimension is rotated in: its largest power-of-two divisor.
pub fn block_size(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << n.trailing_zeros()
    }
}

/// In place, every block of `block` entries of `v` becomes its Walsh–Hadamard transform
/// divided by `√block` (orthonormal, its own inverse).
fn fwht_blocks(v: &mut [f32], block: usize) {
    let norm = 1.0 / (block as f32).sqrt();
    for chunk in v.chunks_mut(block) {
        let mut h = 1;
        while h < block {
            for i in (0..block).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (chunk[j], chunk[j + h]);
                    chunk[j] = a + b;
                    chunk[j + h] = a - b;
                }
            }
            h *= 2;
        }
        chunk.iter_mut().for_each(|x| *x *= norm);
    }
}

/// Rotates every row (of `n` entries) of `data` by the block Hadamard matrix of `n`; applying
/// it twice gives the rows back.
pub fn rotate_rows(data: &mut [f32], n: usize) {
    assert!(n > 0 && data.len().is_multiple_of(n), "rotate rows: {} values are not rows of {n}", data.len());
    let block = block_size(n);
    data.chunks_mut(n).for_each(|row| fwht_blocks(row, block));
}
