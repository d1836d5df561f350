//! `eval.win-rate`: how often completions `a` beat completions `b` of the
//! same prompts.

use crate::common::{check_name, lookup, natural_cmp, outcome, Scores, Source};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::BTreeSet;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WinRateConfig {
    a_name: String,
    b_name: String,
    score: String,
}

/// Win rate of one set of completions against another, by a score.
pub struct WinRate {
    config: WinRateConfig,
    input: RoundInput,
}

impl StageFactory for WinRate {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "eval.win-rate",
            "Win rate of completions `a` against completions `b`: for each prompt present in both, every \
             a-completion is compared with every b-completion by the score `score` (ties count half): the \
             completion's meta value `score` if it has one, else a Score joined by id, from `a_scores` \
             (`b_scores`) for side a (b), then from `scores`. Two stages answering the same prompts often \
             give the same ids (world.demos, lm.rollout): score each side with its own scorer and wire \
             `a_scores` and `b_scores`; shared ids joined through `scores` are an error. \
             Metrics: `win_rate/A_vs_B` in [0, 1], `win_rate_se/A_vs_B` (its standard error, prompts as clusters; from 2 prompts), `comparisons`, `prompts`, `unscored` (completions \
             without the score, skipped). Logs the win rate with its standard error (prompts as clusters).",
        )
        .input("a", RecordKind::Completion)
        .input("b", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .input("a_scores", RecordKind::Score)
        .input("b_scores", RecordKind::Score)
        .required("a_name", FieldType::String, "Name of the `a` side in the metric name (no `_vs_`, no `/`).")
        .required("b_name", FieldType::String, "Name of the `b` side in the metric name (no `_vs_`, no `/`).")
        .optional("score", FieldType::String, "gold_reward", "Name of the Score compared.")
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: WinRateConfig = init.config()?;
        check_name("a_name", &config.a_name)?;
        check_name("b_name", &config.b_name)?;
        if config.a_name == config.b_name {
            return Err(StageError::config(
                "b_name",
                format!("must differ from a_name (\"{}\")", config.a_name),
            ));
        }
        if config.score.is_empty() {
            return Err(StageError::config(
                "score",
                "must name a score, e.g. \"gold_reward\"",
            ));
        }
        Ok(WinRate {
            config,
            input: RoundInput::default(),
        })
    }
}

impl Stage for WinRate {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        let (a, b) = (input.completions(0), input.completions(1));
        let scores = Scores::of(&mut input, 2);
        let a_scores = Scores::of(&mut input, 3);
        let b_scores = Scores::of(&mut input, 4);
        if a.is_empty() && b.is_empty() {
            return Ok(());
        }
        let name = &self.config.score;
        let mut unscored = 0u64;
        // Ids whose score came from the shared `scores` port, per side.
        let mut shared: [BTreeSet<String>; 2] = Default::default();
        let mut side = |cs: Vec<Completion>, own: &Scores, shared: &mut BTreeSet<String>| {
            let mut by_prompt: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
            for c in cs {
                let found = lookup(&c, name, &[own]).or_else(|| lookup(&c, name, &[&scores]));
                match found {
                    Some((v, source)) => {
                        if source == Source::Score && own.get(&c.id, name).is_none() {
                            shared.insert(c.id.clone());
                        }
                        by_prompt.entry(c.prompt_id).or_default().push((c.id, v));
                    }
                    None => unscored += 1,
                }
            }
            for v in by_prompt.values_mut() {
                v.sort_by(|x, y| natural_cmp(&x.0, &y.0));
            }
            by_prompt
        };
        let [shared_a, shared_b] = &mut shared;
        let (a, b) = (side(a, &a_scores, shared_a), side(b, &b_scores, shared_b));
        if let Some(id) = shared_a.intersection(shared_b).next() {
            return Err(StageError::new(format!(
                "completion id {id} is on both sides and its `{name}` score came through the shared `scores` \
                 port, so it cannot tell a from b: score each side with its own scorer and wire `a_scores` \
                 and `b_scores` instead"
            )));
        }
        // Per prompt: (wins, comparisons).
        let mut per_prompt = Vec::new();
        for (prompt, xs) in &a {
            let Some(ys) = b.get(prompt) else { continue };
            let wins: f64 = xs
                .iter()
                .flat_map(|x| ys.iter().map(move |y| outcome(x.1, y.1)))
                .sum();
            per_prompt.push((wins, (xs.len() * ys.len()) as f64));
        }
        let comparisons: f64 = per_prompt.iter().map(|p| p.1).sum();
        ctx.metric("comparisons", comparisons);
        ctx.metric("prompts", per_prompt.len() as f64);
        ctx.metric("unscored", unscored as f64);
        let (an, bn) = (&self.config.a_name, &self.config.b_name);
        if per_prompt.is_empty() {
            ctx.log(format!(
                "no prompt has scored completions on both sides ({unscored} completions without a `{name}` score): \
                 no win_rate/{an}_vs_{bn}"
            ));
            return Ok(());
        }
        let rate = per_prompt.iter().map(|p| p.0).sum::<f64>() / comparisons;
        ctx.metric(&format!("win_rate/{an}_vs_{bn}"), rate);
        let se = cluster_stderr(&per_prompt, rate);
        if se.is_finite() {
            ctx.metric(&format!("win_rate_se/{an}_vs_{bn}"), se);
        }
        ctx.log(format!(
            "win_rate/{an}_vs_{bn} = {rate:.4} ± {se:.4} (standard error, prompts as clusters) over {comparisons} \
             comparisons on {} prompts; {unscored} unscored",
            per_prompt.len()
        ));
        Ok(())
    }
}

/// Standard error of a ratio estimate Σw/Σn over clusters (wins, comparisons):
/// sqrt(Σ (w_i − r·n_i)² / (k(k−1))) / mean n, with k clusters.
fn cluster_stderr(clusters: &[(f64, f64)], rate: f64) -> f64 {
    let k = clusters.len() as f64;
    if k < 2.0 {
        return f64::NAN;
    }
    let mean_n = clusters.iter().map(|c| c.1).sum::<f64>() / k;
    let ss: f64 = clusters.iter().map(|(w, n)| (w - rate * n).powi(2)).sum();
    (ss / (k * (k - 1.0))).sqrt() / mean_n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{completion, create, run, score};

    #[test]
    fn compares_every_pair_of_a_prompt_and_counts_ties_half() {
        let a = vec![
            completion("p1:a0", "p1", &[]),
            completion("p1:a1", "p1", &[]),
            completion("p2:a0", "p2", &[]),
        ];
        let b = vec![
            completion("p1:b0", "p1", &[]),
            completion("p3:b0", "p3", &[]),
            completion("p2:b0", "p2", &[]),
            completion("p2:b1", "p2", &[]),
        ];
        let scores = vec![
            score("p1:a0", "gold_reward", 1.0),
            score("p1:a1", "gold_reward", 0.0),
            score("p1:b0", "gold_reward", 0.5),
            score("p2:a0", "gold_reward", 0.5),
            score("p2:b0", "gold_reward", 0.5),
            score("p3:b0", "gold_reward", 0.5),
            // p2:b1 unscored
        ];
        let out = run::<WinRate>(
            serde_json::json!({"a_name": "big", "b_name": "small"}),
            vec![(2, scores), (0, a), (1, b)],
        )
        .unwrap();
        // p1: 1 win + 1 loss; p2: 1 tie.
        assert_eq!(out.metric("comparisons", None), Some(3.0));
        assert_eq!(out.metric("win_rate/big_vs_small", None), Some(1.5 / 3.0));
        // Both prompts at the rate exactly: no spread between clusters.
        assert_eq!(out.metric("win_rate_se/big_vs_small", None), Some(0.0));
        assert_eq!(out.metric("unscored", None), Some(1.0));
        assert_eq!(out.metric("prompts", None), Some(2.0));
        assert!(out.logs[0].contains("±"), "{:?}", out.logs);
    }

    #[test]
    fn shared_ids_need_per_side_scores() {
        let a = vec![completion("p:demo0", "p", &[])];
        let b = vec![completion("p:demo0", "p", &[])];
        let shared = vec![score("p:demo0", "gold_reward", 1.0)];
        let cfg = serde_json::json!({"a_name": "x", "b_name": "y"});
        let err = run::<WinRate>(
            cfg.clone(),
            vec![(0, a.clone()), (1, b.clone()), (2, shared)],
        )
        .err()
        .unwrap();
        assert!(err.message.contains("a_scores"), "{err}");
        let per_side = vec![
            (0, a),
            (1, b),
            (3, vec![score("p:demo0", "gold_reward", 1.0)]),
            (4, vec![score("p:demo0", "gold_reward", 0.0)]),
        ];
        let out = run::<WinRate>(cfg, per_side).unwrap();
        assert_eq!(out.metric("win_rate/x_vs_y", None), Some(1.0));
    }

    #[test]
    fn names_with_vs_are_rejected() {
        let err = create::<WinRate>(serde_json::json!({"a_name": "x_vs_y", "b_name": "z"}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("a_name"));
        let err = create::<WinRate>(serde_json::json!({"a_name": "x", "b_name": "x"}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("b_name"));
    }
}
