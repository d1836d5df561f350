//! `eval.compare`: a policy's completions before and after an improvement,
//! side by side on the same prompts, for a person to read.
//!
//! The numbers say whether the improvement holds on average; the examples
//! say what it looks like. The examples are the first prompts in id order,
//! never chosen by score, so that they are not the flattering ones.

use crate::common::{check_name, lookup, mean, natural_cmp, outcome, Scores};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareConfig {
    before_name: String,
    after_name: String,
    scores: Vec<String>,
    examples: usize,
}

/// Before-and-after comparison of completions of the same prompts.
pub struct Compare {
    config: CompareConfig,
    input: RoundInput,
}

/// The file the report reads.
pub const COMPARISON_FILE: &str = "comparison.json";

impl StageFactory for Compare {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "eval.compare",
            "Before and after, side by side: pairs each prompt's first `before` completion with its first \
             `after` completion (ids in natural order) and compares them by each score in `scores` (a \
             completion's meta value, as eval.best-of-n writes on its picks, else a Score joined by id from \
             `scores`). Metrics per score S: `before/S`, `after/S` (means), `gain/S` (the mean paired \
             difference after - before), `gain_se/S` (its standard error, from 2 prompts), and \
             `after_wins/S` (the share of prompts where after scores higher; ties count half); also \
             `prompts`, `length/before` and `length/after` (mean characters), `same` (prompts whose two \
             completions are the same text), `unpaired` (prompts on one side only) and `non_finite/S` \
             (prompts left out of S because a score is NaN or infinite). Writes \
             OUTPUT_DIR/comparison.json with the figures and the first `examples` prompts in id order \
             (never chosen by score), which `hone report` shows as a before-and-after table.",
        )
        .input("before", RecordKind::Completion)
        .input("after", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .optional("before_name", FieldType::String, "before", "What `before` is, in the report (e.g. `SmolLM2`).")
        .optional("after_name", FieldType::String, "after", "What `after` is, in the report (e.g. `best-of-4 by WARM`).")
        .required(
            "scores",
            FieldType::List(Box::new(FieldType::String)),
            "The score names compared, e.g. [\"proxy_reward\", \"gold_reward\"] (no `/`).",
        )
        .optional(
            "examples",
            FieldType::unsigned().at_most(1000),
            8,
            "Prompts shown side by side in comparison.json and the report (the first in id order).",
        )
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: CompareConfig = init.config()?;
        if config.scores.is_empty() {
            return Err(StageError::config(
                "scores",
                "must name at least one score, e.g. [\"gold_reward\"]",
            ));
        }
        for s in &config.scores {
            check_name("scores", s)?;
        }
        Ok(Compare {
            config,
            input: RoundInput::default(),
        })
    }
}

/// One side's completion of a prompt with its scores.
struct Side {
    completion: Completion,
    scores: BTreeMap<String, f64>,
}

impl Stage for Compare {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        let (before, after) = (input.completions(0), input.completions(1));
        let scores = Scores::of(&mut input, 2);
        if before.is_empty() && after.is_empty() {
            return Ok(());
        }
        let names = &self.config.scores;
        let side = |cs: Vec<Completion>| {
            let mut first: BTreeMap<String, Completion> = BTreeMap::new();
            for c in cs {
                match first.get(&c.prompt_id) {
                    Some(kept) if natural_cmp(&kept.id, &c.id).is_le() => {}
                    _ => {
                        first.insert(c.prompt_id.clone(), c);
                    }
                }
            }
            first
                .into_iter()
                .map(|(prompt, c)| {
                    let found = names
                        .iter()
                        .filter_map(|n| lookup(&c, n, &[&scores]).map(|(v, _)| (n.clone(), v)))
                        .collect();
                    (
                        prompt,
                        Side {
                            completion: c,
                            scores: found,
                        },
                    )
                })
                .collect::<BTreeMap<String, Side>>()
        };
        let (before, after) = (side(before), side(after));
        let mut prompts: Vec<&String> = before.keys().filter(|p| after.contains_key(*p)).collect();
        prompts.sort_by(|a, b| natural_cmp(a, b));
        let unpaired = before.len() + after.len() - 2 * prompts.len();
        ctx.metric("prompts", prompts.len() as f64);
        ctx.metric("unpaired", unpaired as f64);
        if prompts.is_empty() {
            ctx.log("no prompt has a completion on both sides: nothing to compare");
            return Ok(());
        }
        let chars = |s: &Side| s.completion.text.chars().count() as f64;
        let length_before = mean(
            &prompts
                .iter()
                .map(|p| chars(&before[*p]))
                .collect::<Vec<_>>(),
        );
        let length_after = mean(
            &prompts
                .iter()
                .map(|p| chars(&after[*p]))
                .collect::<Vec<_>>(),
        );
        ctx.metric("length/before", length_before);
        ctx.metric("length/after", length_after);
        let same = prompts
            .iter()
            .filter(|p| before[**p].completion.text == after[**p].completion.text)
            .count();
        ctx.metric("same", same as f64);
        let mut figures = serde_json::Map::new();
        let mut table = vec![format!(
            "{:<16} {:>10} {:>10} {:>10} {:>8} {:>10} {:>8}",
            "score", "before", "after", "gain", "se", "after wins", "prompts"
        )];
        for name in names {
            let both: Vec<(f64, f64)> = prompts
                .iter()
                .filter_map(|p| Some((*before[*p].scores.get(name)?, *after[*p].scores.get(name)?)))
                .collect();
            // A NaN or infinite score would make every figure NaN: counted, left out.
            let paired: Vec<(f64, f64)> = both
                .iter()
                .copied()
                .filter(|(b, a)| b.is_finite() && a.is_finite())
                .collect();
            if paired.len() < both.len() {
                ctx.metric(
                    &format!("non_finite/{name}"),
                    (both.len() - paired.len()) as f64,
                );
            }
            if paired.is_empty() {
                ctx.log(format!(
                    "no prompt has `{name}` on both sides: it is left out"
                ));
                continue;
            }
            let n = paired.len() as f64;
            let b = mean(&paired.iter().map(|p| p.0).collect::<Vec<_>>());
            let a = mean(&paired.iter().map(|p| p.1).collect::<Vec<_>>());
            let diffs: Vec<f64> = paired.iter().map(|p| p.1 - p.0).collect();
            let gain = mean(&diffs);
            let se = if paired.len() >= 2 {
                let var = diffs.iter().map(|d| (d - gain).powi(2)).sum::<f64>() / (n - 1.0);
                Some((var / n).sqrt())
            } else {
                None
            };
            let wins = paired.iter().map(|&(b, a)| outcome(a, b)).sum::<f64>() / n;
            ctx.metric(&format!("before/{name}"), b);
            ctx.metric(&format!("after/{name}"), a);
            ctx.metric(&format!("gain/{name}"), gain);
            if let Some(se) = se {
                ctx.metric(&format!("gain_se/{name}"), se);
            }
            ctx.metric(&format!("after_wins/{name}"), wins);
            table.push(format!(
                "{name:<16} {b:>10.4} {a:>10.4} {gain:>+10.4} {:>8} {wins:>10.3} {:>8}",
                se.map_or("-".to_string(), |s| format!("{s:.4}")),
                paired.len()
            ));
            figures.insert(
                name.clone(),
                serde_json::json!({
                    "before": b, "after": a, "gain": gain, "gain_se": se,
                    "after_wins": wins, "prompts": paired.len(),
                }),
            );
        }
        let examples: Vec<serde_json::Value> = prompts
            .iter()
            .take(self.config.examples)
            .map(|p| {
                let (b, a) = (&before[*p], &after[*p]);
                serde_json::json!({
                    "prompt_id": p,
                    "prompt": b.completion.prompt,
                    "before": {"id": b.completion.id, "text": b.completion.text, "scores": b.scores},
                    "after": {"id": a.completion.id, "text": a.completion.text, "scores": a.scores},
                })
            })
            .collect();
        let (bn, an) = (&self.config.before_name, &self.config.after_name);
        ctx.log(format!(
            "{an} against {bn} on {} prompts (length {length_before:.0} -> {length_after:.0} characters; \
             {same} prompts with the same completion):\n{}",
            prompts.len(),
            table.join("\n")
        ));
        let body = serde_json::to_string_pretty(&serde_json::json!({
            "round": ctx.round(),
            "before_name": bn,
            "after_name": an,
            "prompts": prompts.len(),
            "unpaired": unpaired,
            "same": same,
            "length": {"before": length_before, "after": length_after},
            "scores": figures,
            "examples": examples,
        }))
        .map_err(|e| StageError::new(format!("cannot serialise {COMPARISON_FILE}: {e}")))?;
        let path = ctx.output_dir()?.join(COMPARISON_FILE);
        hone_sdk::fs::atomic_write(&path, format!("{body}\n").as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{completion, create, run, score};

    fn with_text(id: &str, prompt: &str, text: &str, meta: &[(&str, &str)]) -> Record {
        let mut r = completion(id, prompt, meta);
        if let Record::Completion(c) = &mut r {
            c.text = text.into();
        }
        r
    }

    #[test]
    fn paired_gain_with_its_standard_error_and_examples_in_id_order() {
        // Three prompts; after beats before by 1, 2 and 3 on `judge` (meta),
        // and the `warm` Scores joined by id say the same by 2 each.
        let before = vec![
            with_text("p10#0", "p10", "short", &[("judge", "0")]),
            with_text("p2#0", "p2", "tiny", &[("judge", "1")]),
            with_text("p1#0", "p1", "<b>x</b>", &[("judge", "0")]),
            // A later sample of p1: not the first, so not compared.
            with_text("p1#3", "p1", "ignored", &[("judge", "9")]),
        ];
        let after = vec![
            with_text("p1#2", "p1", "longer answer", &[("judge", "1")]),
            with_text("p2#1", "p2", "tiny", &[("judge", "3")]),
            with_text("p10#3", "p10", "much longer answer", &[("judge", "3")]),
            with_text("lonely#0", "lonely", "no partner", &[("judge", "5")]),
        ];
        let warm = ["p1#0", "p2#0", "p10#0"]
            .iter()
            .map(|id| score(id, "warm", 0.0))
            .chain(
                ["p1#2", "p2#1", "p10#3"]
                    .iter()
                    .map(|id| score(id, "warm", 2.0)),
            )
            .collect();
        let out = run::<Compare>(
            serde_json::json!({"scores": ["judge", "warm", "absent"], "examples": 2}),
            vec![(0, before), (1, after), (2, warm)],
        )
        .unwrap();
        assert_eq!(out.metric("prompts", None), Some(3.0));
        assert_eq!(out.metric("unpaired", None), Some(1.0));
        assert_eq!(out.metric("gain/judge", None), Some(2.0));
        // Differences 1, 2 and 3: mean 2, standard deviation 1.
        assert_eq!(out.metric("before/judge", None), Some(1.0 / 3.0));
        assert_eq!(out.metric("after_wins/judge", None), Some(1.0));
        let se = out.metric("gain_se/judge", None).unwrap();
        assert!((se - (1.0f64 / 3.0).sqrt()).abs() < 1e-12, "{se}");
        assert_eq!(out.metric("gain/warm", None), Some(2.0));
        assert_eq!(out.metric("gain_se/warm", None), Some(0.0));
        assert_eq!(out.metric("gain/absent", None), None);
        assert_eq!(out.metric("same", None), Some(1.0));
        assert_eq!(
            out.metric("length/before", None),
            Some((8.0 + 4.0 + 5.0) / 3.0)
        );
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.run_dir.join("outputs/test/comparison.json")).unwrap(),
        )
        .unwrap();
        let examples = json["examples"].as_array().unwrap();
        // The first two prompts in natural id order, whatever their scores.
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0]["prompt_id"], "p1");
        assert_eq!(examples[0]["before"]["text"], "<b>x</b>");
        assert_eq!(examples[0]["after"]["id"], "p1#2");
        assert_eq!(examples[1]["prompt_id"], "p2");
        assert_eq!(json["scores"]["judge"]["gain"], 2.0);
        assert!(out
            .logs
            .iter()
            .any(|l| l.contains("no prompt has `absent`")));
    }

    #[test]
    fn one_prompt_has_no_standard_error_and_no_prompt_is_said_so() {
        let out = run::<Compare>(
            serde_json::json!({"scores": ["judge"]}),
            vec![
                (0, vec![completion("a#0", "a", &[("judge", "1")])]),
                (1, vec![completion("a#1", "a", &[("judge", "0")])]),
            ],
        )
        .unwrap();
        assert_eq!(out.metric("gain/judge", None), Some(-1.0));
        assert_eq!(out.metric("after_wins/judge", None), Some(0.0));
        assert_eq!(out.metric("gain_se/judge", None), None);
        let nan = run::<Compare>(
            serde_json::json!({"scores": ["judge"]}),
            vec![
                (
                    0,
                    vec![
                        completion("a#0", "a", &[("judge", "NaN")]),
                        completion("b#0", "b", &[("judge", "1")]),
                    ],
                ),
                (
                    1,
                    vec![
                        completion("a#1", "a", &[("judge", "0")]),
                        completion("b#1", "b", &[("judge", "2")]),
                    ],
                ),
            ],
        )
        .unwrap();
        assert_eq!(nan.metric("non_finite/judge", None), Some(1.0));
        assert_eq!(nan.metric("gain/judge", None), Some(1.0));
        let none = run::<Compare>(
            serde_json::json!({"scores": ["judge"]}),
            vec![
                (0, vec![completion("a#0", "a", &[])]),
                (1, vec![completion("b#0", "b", &[])]),
            ],
        )
        .unwrap();
        assert_eq!(none.metric("prompts", None), Some(0.0));
        assert_eq!(none.metric("unpaired", None), Some(2.0));
        assert!(none.logs.iter().any(|l| l.contains("nothing to compare")));
    }

    #[test]
    fn scores_must_be_named() {
        let err = create::<Compare>(serde_json::json!({"scores": []}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("scores"));
        let err = create::<Compare>(serde_json::json!({"scores": ["a/b"]}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("scores"));
    }
}
