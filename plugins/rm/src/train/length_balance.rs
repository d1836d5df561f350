//! Length-balanced pair weights (`rm.train`'s `length_balance`).
//!
//! Preference sets carry a length bias, and each its own: on HH-RLHF
//! harmless-base the shorter response is chosen 55 % of the time, on PandaLM
//! the longer one 67 %. A reward model fitted to either learns its set's
//! direction and reverses on the other (docs/results.md, "Across
//! datasets"). Reweighting the pairs so that, within each source, the pairs
//! whose chosen response is the longer and those whose chosen response is
//! the shorter carry equal total weight takes away the incentive: a reward
//! that is only length then lowers the weighted loss of one half exactly as
//! much as it raises the other's, to first order, so the gradient has to
//! find something else. (It balances the marginal only: a model can still
//! use length together with content.)

use hone_sdk::PreferencePair;
use std::collections::BTreeMap;

/// The meta key that names a pair's source (the jsonl readers' `name`).
pub(super) const SOURCE: &str = "source";

/// Which response of a pair is longer, in characters.
fn longer_chosen(p: &PreferencePair) -> Option<bool> {
    let (c, r) = (p.chosen.chars().count(), p.rejected.chars().count());
    (c != r).then_some(c > r)
}

/// Each pair's weight factor, and one line per source saying what it did.
/// Within a source, pairs whose chosen response is longer are scaled by
/// `total / (2 W_longer)` and the others with unequal lengths by
/// `total / (2 W_shorter)`, so both sides carry half of the two's weight
/// `total` and the source's total weight is unchanged. Pairs of equal
/// length keep their weight, and so does a source where one side is empty
/// or weighs nothing (there is nothing to balance against; its line says
/// so). Pairs without a source form one group.
pub(super) fn length_balance(pairs: &[&PreferencePair]) -> (Vec<f64>, Vec<String>) {
    // source -> [weight of chosen-shorter, chosen-longer], [counts]
    let mut sides: BTreeMap<&str, ([f64; 2], [usize; 2])> = BTreeMap::new();
    for p in pairs {
        if let Some(longer) = longer_chosen(p) {
            let source = p.meta.get(SOURCE).map_or("", String::as_str);
            let side = sides.entry(source).or_default();
            side.0[usize::from(longer)] += p.weight;
            side.1[usize::from(longer)] += 1;
        }
    }
    let factors: BTreeMap<&str, [f64; 2]> = sides
        .iter()
        .map(|(&source, &(w, _))| {
            let total = w[0] + w[1];
            let f = if w[0] > 0.0 && w[1] > 0.0 {
                [total / (2.0 * w[0]), total / (2.0 * w[1])]
            } else {
                [1.0, 1.0]
            };
            (source, f)
        })
        .collect();
    let out = pairs
        .iter()
        .map(|p| match longer_chosen(p) {
            Some(longer) => {
                let source = p.meta.get(SOURCE).map_or("", String::as_str);
                factors[source][usize::from(longer)]
            }
            None => 1.0,
        })
        .collect();
    let lines = sides
        .iter()
        .map(|(&source, &(w, n))| {
            let name = if source.is_empty() { "(no source)" } else { source };
            let f = factors[source];
            if f == [1.0, 1.0] && !(w[0] > 0.0 && w[1] > 0.0) {
                format!(
                    "length balance, {name}: chosen longer in {} pairs, shorter in {}: one side is empty, weights unchanged",
                    n[1], n[0]
                )
            } else {
                format!(
                    "length balance, {name}: chosen longer in {} pairs (weight x {:.3}), shorter in {} (x {:.3})",
                    n[1], f[1], n[0], f[0]
                )
            }
        })
        .collect();
    (out, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(source: &str, chosen: &str, rejected: &str) -> PreferencePair {
        let mut p = PreferencePair::new("id", "prompt", chosen, rejected, "human");
        if !source.is_empty() {
            p.meta.insert(SOURCE.into(), source.into());
        }
        p
    }

    #[test]
    fn each_source_weighs_its_longer_and_shorter_chosen_pairs_equally() {
        let pairs = [
            pair("hh", "a", "bbb"),
            pair("hh", "a", "bb"),
            pair("hh", "a", "bbbb"),
            pair("hh", "aaaa", "b"),
            pair("hh", "ab", "cd"),
            pair("pl", "aaaa", "b"),
            pair("pl", "a", "bb"),
        ];
        let refs: Vec<&PreferencePair> = pairs.iter().collect();
        let (f, lines) = length_balance(&refs);
        // hh: 3 shorter-chosen, 1 longer-chosen, total 4: x 2/3 and x 2.
        let expect = [2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 2.0, 1.0, 1.0, 1.0];
        for (a, b) in f.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{f:?}");
        }
        let (shorter, longer): (f64, f64) = (f[..3].iter().sum(), f[3]);
        assert!((shorter - longer).abs() < 1e-12);
        assert_eq!(lines.len(), 2);
        assert!(lines[0]
            .contains("hh: chosen longer in 1 pairs (weight x 2.000), shorter in 3 (x 0.667)"));
    }

    #[test]
    fn a_source_with_one_side_only_keeps_its_weights_and_says_so() {
        let pairs = [pair("", "aaa", "b"), pair("", "aa", "b")];
        let refs: Vec<&PreferencePair> = pairs.iter().collect();
        let (f, lines) = length_balance(&refs);
        assert_eq!(f, vec![1.0, 1.0]);
        assert!(lines[0].contains("(no source)") && lines[0].contains("unchanged"));
    }

    #[test]
    fn existing_weights_are_balanced_not_replaced() {
        let mut heavy = pair("s", "a", "bb");
        heavy.weight = 3.0;
        let pairs = [heavy, pair("s", "aa", "b")];
        let refs: Vec<&PreferencePair> = pairs.iter().collect();
        let (f, _) = length_balance(&refs);
        // Sides 3 and 1, total 4: the heavy pair x 2/3 (to 2), the other x 2.
        assert!((f[0] * 3.0 - 2.0).abs() < 1e-12 && (f[1] - 2.0).abs() < 1e-12);
    }
}
