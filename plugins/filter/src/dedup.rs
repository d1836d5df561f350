//! Exact and near-duplicate removal within groups of the same prompt.

use hone_sdk::text::normalize;
use hone_sdk::PreferencePair;
use std::collections::{BTreeMap, HashSet};

/// Word 3-gram shingles of normalised text (the whole text when shorter).
fn shingles(text: &str) -> HashSet<u64> {
    let norm = normalize(text);
    let words: Vec<&str> = norm.split(' ').collect();
    if words.len() < 3 {
        return HashSet::from([hone_sdk::text::stable_hash(norm.as_bytes())]);
    }
    words
        .windows(3)
        .map(|w| hone_sdk::text::stable_hash(w.join(" ").as_bytes()))
        .collect()
}

/// The shingles of a kept pair's chosen and rejected responses.
type PairShingles = (HashSet<u64>, HashSet<u64>);

fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    let inter = a.intersection(b).count() as f64;
    let union = (a.len() + b.len()) as f64 - inter;
    if union == 0.0 {
        1.0
    } else {
        inter / union
    }
}

/// Removes duplicates; returns the survivors sorted by id, and the number
/// dropped as exact and as near duplicates. Within a prompt the pair with the
/// smallest id survives, whatever order the pairs arrived in.
pub fn dedup(
    mut pairs: Vec<PreferencePair>,
    mode: &str,
    threshold: f64,
) -> (Vec<PreferencePair>, u64, u64) {
    pairs.sort_by(|a, b| a.id.cmp(&b.id));
    if mode == "none" {
        return (pairs, 0, 0);
    }
    let mut groups: BTreeMap<String, Vec<PairShingles>> = BTreeMap::new();
    let mut exact_seen = HashSet::new();
    let (mut exact, mut near) = (0, 0);
    let mut kept = Vec::new();
    for p in pairs {
        if !exact_seen.insert((p.prompt.clone(), p.chosen.clone(), p.rejected.clone())) {
            exact += 1;
            continue;
        }
        if mode == "near" {
            let group = groups.entry(normalize(&p.prompt)).or_default();
            let (c, r) = (shingles(&p.chosen), shingles(&p.rejected));
            if group
                .iter()
                .any(|(gc, gr)| jaccard(&c, gc) >= threshold && jaccard(&r, gr) >= threshold)
            {
                near += 1;
                continue;
            }
            group.push((c, r));
        }
        kept.push(p);
    }
    (kept, exact, near)
}
