//! Byte-level mutations, the layer under every structure-aware mutator: bit flips, overwrites
//! with boundary values, truncation, insertion, deletion, duplication and splicing.

use crate::rng::SplitMix64;

/// 8-, 32- and 64-bit values that tend to sit on a boundary of some check.
pub const INTERESTING_U64: [u64; 14] = [
    0,
    1,
    2,
    0x7F,
    0xFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    1 << 40,
    1 << 60,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Uniform in `0..n`, and 0 when `n` is 0 (so callers need no special case for empty inputs).
pub fn below(rng: &mut SplitMix64, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        rng.below(n as u64) as usize
    }
}

/// True with probability `1/n`.
pub fn one_in(rng: &mut SplitMix64, n: u64) -> bool {
    rng.below(n) == 0
}

pub fn pick<'a, T>(rng: &mut SplitMix64, items: &'a [T]) -> &'a T {
    &items[below(rng, items.len())]
}

/// A boundary value, or a value near the input's own length (the size a length field would
/// have to exceed).
pub fn interesting(rng: &mut SplitMix64, len: usize) -> u64 {
    match rng.below(4) {
        0 => (len as u64).wrapping_add(rng.below(3)).wrapping_sub(1),
        1 => rng.next_u64() >> rng.below(64),
        _ => *pick(rng, &INTERESTING_U64),
    }
}

/// Overwrites `width` bytes at `pos` (clipped to the buffer) with `v` in little endian.
pub fn put_le(buf: &mut [u8], pos: usize, width: usize, v: u64) {
    let bytes = v.to_le_bytes();
    for i in 0..width.min(8) {
        if let Some(b) = buf.get_mut(pos + i) {
            *b = bytes[i];
        }
    }
}

/// Applies one to four random byte-level mutations. `others` are splice partners.
pub fn havoc(rng: &mut SplitMix64, buf: &mut Vec<u8>, others: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        mutate_once(rng, buf, others);
    }
}

fn mutate_once(rng: &mut SplitMix64, buf: &mut Vec<u8>, others: &[Vec<u8>]) {
    let len = buf.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = below(rng, len);
            buf[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = below(rng, len);
            buf[i] = *pick(rng, &[0u8, 0xFF, 0x7F, 0x80, b'"', b'{', b'[', b'\\', b'\n', 0xC3]);
        }
        2 if len > 0 => {
            let width = *pick(rng, &[1usize, 2, 4, 8]);
            let v = interesting(rng, len);
            put_le(buf, below(rng, len), width, v);
        }
        3 => buf.truncate(below(rng, len + 1)),
        4 => {
            let at = below(rng, len + 1);
            let n = 1 + below(rng, 16);
            let fill: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            buf.splice(at..at, fill);
        }
        5 if len > 0 => {
            let at = below(rng, len);
            let n = 1 + below(rng, (len - at).min(64));
            buf.drain(at..at + n);
        }
        6 if len > 0 => {
            // Duplicate a range (repeats a record, a key, a length field …).
            let at = below(rng, len);
            let n = 1 + below(rng, (len - at).min(256));
            let chunk = buf[at..at + n].to_vec();
            let to = below(rng, len + 1);
            buf.splice(to..to, chunk);
        }
        7 if !others.is_empty() => {
            // Splice: our head with another input's tail.
            let other = pick(rng, others);
            let cut = below(rng, len + 1);
            let from = below(rng, other.len() + 1);
            buf.truncate(cut);
            buf.extend_from_slice(&other[from..]);
        }
        8 if one_in(rng, 8) => {
            // Pure noise, sometimes starting with the right magic or brace.
            let n = below(rng, 512);
            let keep = below(rng, len.min(8) + 1);
            buf.truncate(keep);
            buf.extend((0..n).map(|_| rng.next_u64() as u8));
        }
        _ if len > 0 => {
            let i = below(rng, len);
            buf[i] = rng.next_u64() as u8;
        }
        _ => buf.push(rng.next_u64() as u8),
    }
}
