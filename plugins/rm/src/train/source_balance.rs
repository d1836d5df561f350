//! Source-balanced pair weights (`rm.train`'s `source_balance`).
//!
//! A reward model trained on the union of preference sets learns mostly the
//! largest one: HH-RLHF harmless-base gives 1,818 training pairs, PandaLM
//! 536, and the union model sat at chance on PandaLM (docs/results.md,
//! "Both datasets together"). Reweighting so that every source carries the
//! same total weight makes each set count equally in the loss, the way
//! multi-task training balances its tasks, without dropping or repeating a
//! pair.

use super::length_balance::SOURCE;
use hone_sdk::PreferencePair;
use std::collections::BTreeMap;

/// Each pair's weight factor, given each pair's current weight (`weights`,
/// the pair's own times any earlier factor), and one line per source. Every
/// source is scaled to `total / k` of the `k` sources' total weight (those
/// that weigh something), so the training set's total weight is unchanged.
/// A source that weighs nothing keeps its weights. Pairs without a source form one group.
pub(super) fn source_balance(
    pairs: &[&PreferencePair],
    weights: &[f64],
) -> (Vec<f64>, Vec<String>) {
    let source = |p: &PreferencePair| p.meta.get(SOURCE).map_or("", String::as_str).to_string();
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (p, w) in pairs.iter().zip(weights) {
        let e = sums.entry(source(p)).or_default();
        e.0 += w;
        e.1 += 1;
    }
    let total: f64 = sums.values().map(|s| s.0).sum();
    // Only sources that weigh something share the total: one that weighs
    // nothing stays at nothing whatever its factor.
    let weighing = sums.values().filter(|s| s.0 > 0.0).count();
    let share = total / weighing.max(1) as f64;
    let factor = |sum: f64| if sum > 0.0 { share / sum } else { 1.0 };
    let out = pairs.iter().map(|p| factor(sums[&source(p)].0)).collect();
    let lines = sums
        .iter()
        .map(|(name, &(sum, n))| {
            let name = if name.is_empty() { "(no source)" } else { name };
            format!(
                "source balance, {name}: {n} pairs weighing {sum:.1}, weight x {:.3}",
                factor(sum)
            )
        })
        .collect();
    (out, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(source: &str) -> PreferencePair {
        let mut p = PreferencePair::new("id", "prompt", "a", "b", "human");
        if !source.is_empty() {
            p.meta.insert(SOURCE.into(), source.into());
        }
        p
    }

    #[test]
    fn every_source_carries_the_same_total_weight_and_the_total_is_kept() {
        let pairs = [pair("hh"), pair("hh"), pair("hh"), pair("pl"), pair("")];
        let refs: Vec<&PreferencePair> = pairs.iter().collect();
        let weights = [1.0, 1.0, 2.0, 1.0, 0.5];
        let (f, lines) = source_balance(&refs, &weights);
        // Total 5.5 over 3 sources: 11/6 each.
        let share = 5.5 / 3.0;
        let totals = |src: &str| -> f64 {
            refs.iter()
                .zip(&f)
                .zip(&weights)
                .filter(|((p, _), _)| p.meta.get(SOURCE).map_or("", String::as_str) == src)
                .map(|((_, f), w)| f * w)
                .sum()
        };
        for src in ["hh", "pl", ""] {
            assert!((totals(src) - share).abs() < 1e-12, "{src}: {f:?}");
        }
        assert!((f[0] - share / 4.0).abs() < 1e-12 && f[0] == f[2]);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("(no source): 1 pairs"), "{lines:?}");
        assert!(
            lines[1].contains("hh: 3 pairs weighing 4.0, weight x 0.458"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_source_that_weighs_nothing_keeps_its_weights() {
        let pairs = [pair("a"), pair("b")];
        let refs: Vec<&PreferencePair> = pairs.iter().collect();
        let (f, _) = source_balance(&refs, &[0.0, 2.0]);
        assert_eq!(f[0], 1.0);
        // The total (2) is kept: it is all b's.
        assert!((f[1] - 1.0).abs() < 1e-12);
    }
}
