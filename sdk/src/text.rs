//! Text helpers shared by the runtime and stages, so that every worker and
//! process agrees on keys.

/// Normalises text for duplicate detection and sharding: lower case,
/// alphanumeric words only, single spaces.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// 64-bit FNV-1a: stable across processes, platforms and Rust releases
/// (unlike `std`'s hasher), which exchange keys and seeded choices need.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (from splitmix64) so that nearby inputs spread over workers.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A seeded hash of a string: a reproducible pseudo-random draw per record.
pub fn seeded_hash(seed: u64, key: &str) -> u64 {
    let mut bytes = seed.to_le_bytes().to_vec();
    bytes.extend_from_slice(key.as_bytes());
    stable_hash(&bytes)
}

/// A uniform draw in [0, 1) from 64 random bits (their top 53).
pub fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform draw in [0, 1) per (seed, key): a reproducible coin per record.
pub fn seeded_unit(seed: u64, key: &str) -> f64 {
    unit(seeded_hash(seed, key))
}

/// One SplitMix64 step: advances `state` and returns the next 64 random
/// bits. The generator behind hone's seeded streams (sampling, shuffles).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalize("  Hello,   WORLD!\n"), "hello world");
        assert_eq!(normalize("Hello world"), normalize("hello -- world."));
        assert_ne!(normalize("hello world"), normalize("hello there world"));
    }

    #[test]
    fn stable_hash_is_fixed() {
        // A change here changes how records shard: it must be deliberate.
        assert_eq!(stable_hash(b""), stable_hash(b""));
        assert_ne!(stable_hash(b"a"), stable_hash(b"b"));
        assert_ne!(seeded_hash(1, "x"), seeded_hash(2, "x"));
    }
}
