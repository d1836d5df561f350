//! Seeded draws keyed by record ids, so that every result is reproducible
//! and independent of how records are spread over workers.

use hone_sdk::text::seeded_hash;

/// A stream of pseudo-random draws for one record: draw `n` hashes the
/// seed with `key#n`.
pub struct Draws {
    seed: u64,
    key: String,
    n: u64,
}

impl Draws {
    /// The stream for `key` under `seed`.
    pub fn new(seed: u64, key: impl Into<String>) -> Self {
        Draws {
            seed,
            key: key.into(),
            n: 0,
        }
    }

    /// The next raw 64-bit draw.
    pub fn next_u64(&mut self) -> u64 {
        self.n += 1;
        seeded_hash(self.seed, &format!("{}#{}", self.key, self.n))
    }

    /// A uniform draw in [0, 1).
    pub fn unit(&mut self) -> f64 {
        hone_sdk::text::unit(self.next_u64())
    }

    /// A uniform integer in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}
