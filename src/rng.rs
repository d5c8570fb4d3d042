//! Small deterministic random numbers. One run seed drives everything; each consumer derives
//! its own stream by hashing the seed with its coordinates (step, site, …), so results never
//! depend on the order in which streams are used, and resuming needs no saved RNG state
//! beyond the seed and the step counter.

/// SplitMix64: tiny, fast, and good enough for initialisation, dropout and shuffling.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A stream derived from a seed and any number of coordinates.
    pub fn derive(seed: u64, coords: &[u64]) -> Self {
        let mut s = Self::new(seed);
        for &c in coords {
            s.state = s.next_u64() ^ c.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        }
        Self::new(s.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Puts `v` in a uniformly random order (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// `k` distinct values of `0..n` (`k ≤ n`), uniformly (a partial Fisher–Yates shuffle),
    /// in increasing order.
    pub fn choose(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below((n - i) as u64) as usize;
            idx.swap(i, j);
        }
        let mut chosen = idx[..k].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Uniform in `0..n` (`n > 0`), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        // The top `2^64 mod n` values are rejected so that every residue is equally likely.
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
