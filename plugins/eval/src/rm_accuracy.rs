//! `eval.rm-accuracy`: accuracy and calibration of a reward model on scored
//! preference pairs.

use crate::common::{check_name, sigmoid};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RmAccuracyConfig {
    set: String,
    truth: String,
    split_by: Option<String>,
    bins: i64,
    skip_unscored: bool,
}

/// One scored pair, reduced to what the metrics need.
struct Judged {
    /// σ(chosen_score − rejected_score): the model's probability that
    /// `chosen` is better.
    p: f64,
    /// Whether the truth says `chosen` is better.
    y: bool,
    /// 1 when the model agrees with the truth, 0.5 on a reward tie, else 0.
    correct: f64,
    /// The same for the "longer response wins" heuristic (characters): the
    /// baseline a reward model must beat, since length is what a weak one
    /// learns first.
    longer: f64,
    /// Whether the model scores the longer response (characters) higher: 1,
    /// 0.5 on a reward tie, else 0; `None` when both are equally long. Its
    /// mean against the set's `longer_wins` says how far the model leans on
    /// length: a model that only measured length would match the
    /// heuristic's choice on every pair.
    prefers_longer: Option<f64>,
    /// The `split_by` meta value, if any.
    split: Option<String>,
}

/// The share of pairs of unequal length where the model scores the longer
/// response higher; `None` when every pair's responses are equally long.
fn mean_prefers_longer<'a>(judged: impl Iterator<Item = &'a Judged>) -> Option<f64> {
    let (sum, n) = judged
        .filter_map(|j| j.prefers_longer)
        .fold((0.0, 0u64), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn prefers_longer_text(share: Option<f64>) -> String {
    share.map_or(String::new(), |s| format!(", prefers longer {s:.4}"))
}

/// Accuracy and expected calibration error of a reward model.
pub struct RmAccuracy {
    config: RmAccuracyConfig,
    judged: Vec<Judged>,
    unscored: u64,
    gold_ties: u64,
    no_split: u64,
}

impl StageFactory for RmAccuracy {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "eval.rm-accuracy",
            "Accuracy and calibration of a reward model on preference pairs scored by it (chosen_score and \
             rejected_score set, e.g. by rm.score). Metrics: `accuracy/SET` (fraction of pairs where the \
             reward difference agrees with the truth; a reward tie counts half), `ece/SET` (expected \
             calibration error of p = sigmoid(chosen_score - rejected_score) as the probability that \
             `chosen` is better, each pair counted in both orientations so the label order does not matter), `pairs/SET`, `longer_wins/SET` (the accuracy of the \"longer response wins\" heuristic on the same pairs, \
             in characters, equal lengths counting half: the baseline to beat), `prefers_longer/SET` (how often \
             the model scores the longer response higher, over pairs of unequal length, a reward tie counting \
             half: how far it leans on length, whatever the labels say), and with `split_by` `accuracy/SET_VALUE`, \
             `longer_wins/SET_VALUE`, `prefers_longer/SET_VALUE` and `pairs/SET_VALUE` per meta value (`split_by = \"source\"`: per input file of the jsonl readers). \
             Logs the reliability table.",
        )
        .input("pairs", RecordKind::PreferencePair)
        .required(
            "set",
            FieldType::String,
            "Name of the held-out set, used in the metric names (`clean`, `noisy`, `ood`, `hh_test`...).",
        )
        .optional(
            "truth",
            FieldType::one_of(&["label", "gold"]),
            "label",
            "`label`: the pair's own label (chosen is preferred). `gold`: chosen is preferred when \
             `gold_chosen` > `gold_rejected` (world.label pairs); pairs with equal gold are skipped and \
             counted as `gold_ties`.",
        )
        .optional(
            "split_by",
            FieldType::String,
            serde_json::Value::Null,
            "A meta key: also report `accuracy/SET_VALUE` for each of its values (e.g. `clean_label`).",
        )
        .optional("bins", FieldType::positive().at_most(1_000_000), 10, "Equal-width bins of p in [0, 1] for the calibration error.")
        .optional(
            "skip_unscored",
            FieldType::Bool,
            false,
            "Skip (and count) pairs without chosen_score/rejected_score instead of failing.",
        )
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: RmAccuracyConfig = init.config()?;
        check_name("set", &config.set)?;
        if config.truth != "label" && config.truth != "gold" {
            return Err(StageError::config(
                "truth",
                format!("must be \"label\" or \"gold\", found \"{}\"", config.truth),
            ));
        }
        if config.bins < 1 {
            return Err(StageError::config(
                "bins",
                format!("must be at least 1, found {}", config.bins),
            ));
        }
        if config.split_by.as_deref() == Some("") {
            return Err(StageError::config(
                "split_by",
                "must name a meta key, or be left unset",
            ));
        }
        Ok(RmAccuracy {
            config,
            judged: Vec::new(),
            unscored: 0,
            gold_ties: 0,
            no_split: 0,
        })
    }
}

impl Stage for RmAccuracy {
    fn on_batch(
        &mut self,
        _ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for record in batch {
            let Record::Pair(pair) = record else { continue };
            let (Some(chosen), Some(rejected)) = (pair.chosen_score, pair.rejected_score) else {
                if self.config.skip_unscored {
                    self.unscored += 1;
                    continue;
                }
                let missing = if pair.chosen_score.is_none() {
                    "chosen_score"
                } else {
                    "rejected_score"
                };
                return Err(StageError::new(format!(
                    "pair {} has no {missing}: eval.rm-accuracy needs pairs scored by the reward model; \
                     put an rm.score stage before this one, or set skip_unscored = true",
                    pair.id
                )));
            };
            let y = if self.config.truth == "gold" {
                let (Some(gc), Some(gr)) = (pair.gold_chosen, pair.gold_rejected) else {
                    let missing = if pair.gold_chosen.is_none() {
                        "gold_chosen"
                    } else {
                        "gold_rejected"
                    };
                    return Err(StageError::new(format!(
                        "pair {} has no {missing}, which truth = \"gold\" needs (world.label \
                         writes it); use truth = \"label\" for pairs without gold rewards",
                        pair.id
                    )));
                };
                if gc == gr {
                    self.gold_ties += 1;
                    continue;
                }
                gc > gr
            } else {
                true
            };
            let (lc, lr) = (pair.chosen.chars().count(), pair.rejected.chars().count());
            let longer = match lc.cmp(&lr) {
                std::cmp::Ordering::Equal => 0.5,
                // Chosen is longer: right when chosen is truly better.
                std::cmp::Ordering::Greater => f64::from(u8::from(y)),
                std::cmp::Ordering::Less => f64::from(u8::from(!y)),
            };
            let delta = chosen - rejected;
            let correct = if delta == 0.0 {
                0.5
            } else if (delta > 0.0) == y {
                1.0
            } else {
                0.0
            };
            let prefers_longer = match lc.cmp(&lr) {
                std::cmp::Ordering::Equal => None,
                _ if delta == 0.0 => Some(0.5),
                order => Some(f64::from(u8::from(
                    (order == std::cmp::Ordering::Greater) == (delta > 0.0),
                ))),
            };
            let split = match &self.config.split_by {
                Some(key) => {
                    let value = pair.meta.get(key).cloned();
                    if value.is_none() {
                        self.no_split += 1;
                    }
                    value
                }
                None => None,
            };
            self.judged.push(Judged {
                p: sigmoid(delta),
                y,
                correct,
                longer,
                prefers_longer,
                split,
            });
        }
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let judged = std::mem::take(&mut self.judged);
        let (unscored, gold_ties, no_split) = (self.unscored, self.gold_ties, self.no_split);
        (self.unscored, self.gold_ties, self.no_split) = (0, 0, 0);
        let set = self.config.set.clone();
        if unscored > 0 {
            ctx.metric(&format!("unscored/{set}"), unscored as f64);
        }
        if gold_ties > 0 {
            ctx.metric(&format!("gold_ties/{set}"), gold_ties as f64);
        }
        if no_split > 0 {
            ctx.metric(&format!("no_split/{set}"), no_split as f64);
        }
        if judged.is_empty() {
            return Ok(());
        }
        let n = judged.len() as f64;
        let accuracy = judged.iter().map(|j| j.correct).sum::<f64>() / n;
        ctx.metric(&format!("accuracy/{set}"), accuracy);
        ctx.metric(&format!("pairs/{set}"), n);
        let longer = judged.iter().map(|j| j.longer).sum::<f64>() / n;
        ctx.metric(&format!("longer_wins/{set}"), longer);
        let prefers_longer = mean_prefers_longer(judged.iter());
        if let Some(share) = prefers_longer {
            ctx.metric(&format!("prefers_longer/{set}"), share);
        }
        let bins = self.config.bins as usize;
        let (ece, table) = calibration(&judged, bins);
        ctx.metric(&format!("ece/{set}"), ece);
        let mut by_split: BTreeMap<&str, Vec<&Judged>> = BTreeMap::new();
        for j in &judged {
            if let Some(s) = &j.split {
                by_split.entry(s).or_default().push(j);
            }
        }
        let mut lines = vec![format!(
            "set {set}: accuracy {accuracy:.4} (longer wins {longer:.4}{}), ECE {ece:.4} over {} pairs",
            prefers_longer_text(prefers_longer),
            judged.len()
        )];
        for (value, js) in &by_split {
            let count = js.len();
            let acc = js.iter().map(|j| j.correct).sum::<f64>() / count as f64;
            let longer = js.iter().map(|j| j.longer).sum::<f64>() / count as f64;
            let prefers = mean_prefers_longer(js.iter().copied());
            ctx.metric(&format!("accuracy/{set}_{value}"), acc);
            ctx.metric(&format!("longer_wins/{set}_{value}"), longer);
            if let Some(share) = prefers {
                ctx.metric(&format!("prefers_longer/{set}_{value}"), share);
            }
            ctx.metric(&format!("pairs/{set}_{value}"), count as f64);
            lines.push(format!(
                "  {}={value}: accuracy {acc:.4} (longer wins {longer:.4}{}) over {count} pairs",
                self.split_key(),
                prefers_longer_text(prefers)
            ));
        }
        lines.push(format!(
            "{:>11} {:>6} {:>8} {:>8}",
            "p bin", "pairs", "mean p", "frac y"
        ));
        lines.extend(table);
        ctx.log(lines.join("\n"));
        Ok(())
    }
}

impl RmAccuracy {
    fn split_key(&self) -> &str {
        self.config.split_by.as_deref().unwrap_or("")
    }
}

/// The expected calibration error Σ_b (n_b/N)·|mean p − mean y| over `bins`
/// equal-width bins of p, and the reliability table's lines.
///
/// Each pair counts in both orientations, (p, y) and (1 − p, 1 − y): which
/// response a data set calls `chosen` is arbitrary, and without the mirror
/// a set whose labels all agree with the truth (y = 1 everywhere) could
/// only be "calibrated" by a model certain of every pair.
fn calibration(judged: &[Judged], bins: usize) -> (f64, Vec<String>) {
    let mut sums = vec![(0.0f64, 0.0f64, 0u64); bins];
    let both = judged.iter().flat_map(|j| [(j.p, j.y), (1.0 - j.p, !j.y)]);
    for (p, y) in both {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        sums[b].0 += p;
        sums[b].1 += if y { 1.0 } else { 0.0 };
        sums[b].2 += 1;
    }
    let total = 2.0 * judged.len() as f64;
    let mut ece = 0.0;
    let mut lines = Vec::new();
    for (b, (p, y, count)) in sums.iter().enumerate() {
        if *count == 0 {
            continue;
        }
        let (mp, my) = (p / *count as f64, y / *count as f64);
        ece += *count as f64 / total * (mp - my).abs();
        let (lo, hi) = (b as f64 / bins as f64, (b + 1) as f64 / bins as f64);
        lines.push(format!("[{lo:.2},{hi:.2}) {count:>6} {mp:>8.4} {my:>8.4}"));
    }
    (ece, lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{create, run};

    fn pair(id: &str, chosen: Option<f64>, rejected: Option<f64>, meta: &[(&str, &str)]) -> Record {
        let mut p = PreferencePair::new(id, "q", "a", "b", "world");
        p.chosen_score = chosen;
        p.rejected_score = rejected;
        p.meta = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Gold rewards are typed fields; the tests give them as meta for brevity.
        let mut gold = |k: &str| p.meta.remove(k).map(|v| v.parse::<f64>().unwrap());
        p.gold_chosen = gold("gold_chosen");
        p.gold_rejected = gold("gold_rejected");
        Record::Pair(p)
    }

    #[test]
    fn accuracy_counts_ties_half_and_ece_is_computed() {
        let pairs = vec![
            pair("a", Some(2.0), Some(0.0), &[("clean_label", "true")]),
            pair("b", Some(1.0), Some(1.0), &[("clean_label", "true")]),
            pair("c", Some(0.0), Some(3.0), &[("clean_label", "false")]),
            pair("d", Some(5.0), Some(0.0), &[("clean_label", "false")]),
        ];
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "clean", "split_by": "clean_label", "bins": 2}),
            vec![(0, pairs)],
        )
        .unwrap();
        assert_eq!(out.metric("accuracy/clean", None), Some(2.5 / 4.0));
        assert_eq!(out.metric("accuracy/clean_true", None), Some(0.75));
        assert_eq!(out.metric("accuracy/clean_false", None), Some(0.5));
        assert_eq!(out.metric("pairs/clean", None), Some(4.0));
        // Responses "a" and "b": equal lengths, so the heuristic scores half.
        assert_eq!(out.metric("longer_wins/clean", None), Some(0.5));
        assert_eq!(out.metric("longer_wins/clean_true", None), Some(0.5));
        // y = 1 everywhere; mirrored, (1 - p, 0) too. Bin [0, .5) holds
        // σ(-3) (y 1) and the mirrors of σ(2), σ(5) (y 0); bin [.5, 1] the
        // rest, with both orientations of the tie.
        let low = [
            (sigmoid(-3.0), 1.0),
            (sigmoid(-2.0), 0.0),
            (sigmoid(-5.0), 0.0),
        ];
        let high = [
            (sigmoid(2.0), 1.0),
            (0.5, 1.0),
            (0.5, 0.0),
            (sigmoid(5.0), 1.0),
            (sigmoid(3.0), 0.0),
        ];
        let gap = |bin: &[(f64, f64)]| {
            let n = bin.len() as f64;
            (bin.iter().map(|b| b.0).sum::<f64>() / n - bin.iter().map(|b| b.1).sum::<f64>() / n)
                .abs()
        };
        let ece = 3.0 / 8.0 * gap(&low) + 5.0 / 8.0 * gap(&high);
        assert!((out.metric("ece/clean", None).unwrap() - ece).abs() < 1e-12);
        assert!(out.logs[0].contains("mean p"));
    }

    #[test]
    fn longer_wins_is_right_when_the_truly_better_response_is_longer() {
        let text = |id: &str, chosen: &str, rejected: &str, gold: Option<(f64, f64)>| {
            let mut p = PreferencePair::new(id, "q", chosen, rejected, "world");
            (p.chosen_score, p.rejected_score) = (Some(1.0), Some(0.0));
            (p.gold_chosen, p.gold_rejected) = (gold.map(|g| g.0), gold.map(|g| g.1));
            Record::Pair(p)
        };
        // By label: chosen longer (right), shorter (wrong), equal (half).
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "s"}),
            vec![(
                0,
                vec![
                    text("a", "long one", "short", None),
                    text("b", "x", "longer", None),
                    text("c", "ab", "cd", None),
                ],
            )],
        )
        .unwrap();
        assert_eq!(out.metric("longer_wins/s", None), Some(1.5 / 3.0));
        // By gold: rejected is truly better and longer, so the heuristic is right.
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "s", "truth": "gold"}),
            vec![(0, vec![text("a", "x", "longer", Some((0.0, 1.0)))])],
        )
        .unwrap();
        assert_eq!(out.metric("longer_wins/s", None), Some(1.0));
    }

    #[test]
    fn prefers_longer_counts_the_models_choice_whatever_the_label() {
        let scored = |id: &str, chosen: &str, rejected: &str, scores: (f64, f64), source: &str| {
            let mut p = PreferencePair::new(id, "q", chosen, rejected, "world");
            (p.chosen_score, p.rejected_score) = (Some(scores.0), Some(scores.1));
            p.meta.insert("source".into(), source.into());
            Record::Pair(p)
        };
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "s", "split_by": "source"}),
            vec![(
                0,
                vec![
                    // Longer chosen, scored higher: prefers longer, and right.
                    scored("a", "long one", "short", (1.0, 0.0), "x"),
                    // Longer rejected, scored higher: prefers longer, and wrong.
                    scored("b", "x", "longer", (0.0, 1.0), "x"),
                    // Longer rejected, scored lower: prefers shorter.
                    scored("c", "x", "longer", (1.0, 0.0), "y"),
                    // A reward tie counts half.
                    scored("d", "xx", "y", (0.5, 0.5), "y"),
                    // Equal lengths are left out of the share.
                    scored("e", "ab", "cd", (1.0, 0.0), "y"),
                ],
            )],
        )
        .unwrap();
        assert_eq!(out.metric("prefers_longer/s", None), Some(2.5 / 4.0));
        assert_eq!(out.metric("prefers_longer/s_x", None), Some(1.0));
        assert_eq!(out.metric("prefers_longer/s_y", None), Some(0.25));
        assert!(
            out.logs[0].contains("prefers longer 0.6250"),
            "{}",
            out.logs[0]
        );
        // Only equal lengths: no share to report.
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "s"}),
            vec![(0, vec![scored("e", "ab", "cd", (1.0, 0.0), "y")])],
        )
        .unwrap();
        assert_eq!(out.metric("prefers_longer/s", None), None);
    }

    #[test]
    fn gold_truth_reads_the_gold_rewards_and_skips_ties() {
        let pairs = vec![
            // Gold says rejected is better; the RM agrees (chosen scored lower).
            pair(
                "a",
                Some(0.0),
                Some(1.0),
                &[("gold_chosen", "0.2"), ("gold_rejected", "0.9")],
            ),
            pair(
                "b",
                Some(1.0),
                Some(0.0),
                &[("gold_chosen", "1"), ("gold_rejected", "0")],
            ),
            pair(
                "c",
                Some(1.0),
                Some(0.0),
                &[("gold_chosen", "0.5"), ("gold_rejected", "0.5")],
            ),
        ];
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "ood", "truth": "gold"}),
            vec![(0, pairs)],
        )
        .unwrap();
        assert_eq!(out.metric("accuracy/ood", None), Some(1.0));
        assert_eq!(out.metric("gold_ties/ood", None), Some(1.0));
        let missing = vec![pair("x", Some(1.0), Some(0.0), &[])];
        let err = run::<RmAccuracy>(
            serde_json::json!({"set": "ood", "truth": "gold"}),
            vec![(0, missing)],
        )
        .err()
        .unwrap();
        assert!(err.message.contains("gold_chosen"), "{err}");
    }

    #[test]
    fn unscored_pairs_fail_or_are_skipped() {
        let pairs = vec![pair("a", Some(1.0), None, &[])];
        let err = run::<RmAccuracy>(
            serde_json::json!({"set": "clean"}),
            vec![(0, pairs.clone())],
        )
        .err()
        .unwrap();
        assert!(err.message.contains("rejected_score"), "{err}");
        assert!(err.message.contains("rm.score"), "{err}");
        let out = run::<RmAccuracy>(
            serde_json::json!({"set": "clean", "skip_unscored": true}),
            vec![(0, pairs)],
        )
        .unwrap();
        assert_eq!(out.metric("unscored/clean", None), Some(1.0));
        assert_eq!(out.metric("accuracy/clean", None), None);
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = create::<RmAccuracy>(serde_json::json!({"set": "a/b"}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("set"));
        let err = create::<RmAccuracy>(serde_json::json!({"set": "a", "bins": 0}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("bins"));
    }
}
