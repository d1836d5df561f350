//! `eval.best-of-n`: rejection sampling with a proxy reward.

use crate::common::{mean, natural_cmp, Scores};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BestOfNConfig {
    ns: Vec<i64>,
    keep: Option<i64>,
    keep_all: bool,
}

/// Best-of-n selection by a proxy reward, measured by a gold reward.
pub struct BestOfN {
    ns: Vec<usize>,
    keep: usize,
    keep_all: bool,
    input: RoundInput,
}

/// The analytic KL(π_best-of-n ‖ π) of best-of-n sampling: log n − (n−1)/n.
pub fn best_of_n_kl(n: usize) -> f64 {
    let n = n as f64;
    n.ln() - (n - 1.0) / n
}

impl StageFactory for BestOfN {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "eval.best-of-n",
            "Best-of-n (rejection sampling): for each prompt, the first n samples (ordered by id, digit runs \
             as numbers) and the one with the highest `proxy` score. For each n in `ns`, metrics at step n: \
             `kl` (the analytic log n - (n-1)/n), `proxy_reward` and `gold_reward` (mean scores of the picks), \
             `gold_reward_oracle` (mean best gold among the first n), `prompts` (prompts with at least n \
             scored samples) and `too_few_samples`. Emits the picks at n = `keep` (or, with `keep_all`, \
             at every n) on `best`, with meta `best_of`, `proxy_reward` and `gold_reward`.",
        )
        .input("completions", RecordKind::Completion)
        .input("proxy", RecordKind::Score)
        .input("gold", RecordKind::Score)
        .output("best", RecordKind::Completion)
        .optional(
            "ns",
            FieldType::List(Box::new(FieldType::positive().at_most(1 << 20))),
            serde_json::json!([1, 2, 4, 8, 16, 32, 64]),
            "The n values to measure, each at least 1.",
        )
        .optional(
            "keep",
            FieldType::positive().at_most(1 << 20),
            serde_json::Value::Null,
            "The n whose picks are emitted on `best`. Unset: the largest of `ns`.",
        )
        .optional(
            "keep_all",
            FieldType::Bool,
            false,
            "Emit the picks of every n in `ns` (each with meta `best_of`), e.g. for eval.elo with \
             `player = \"meta:best_of\"` and `score = \"gold_reward\"`.",
        )
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: BestOfNConfig = init.config()?;
        if config.ns.is_empty() {
            return Err(StageError::config(
                "ns",
                "must list at least one n, e.g. [1, 4, 16]",
            ));
        }
        if let Some(bad) = config.ns.iter().find(|&&n| n < 1) {
            return Err(StageError::config(
                "ns",
                format!("every n must be at least 1, found {bad}"),
            ));
        }
        let mut ns: Vec<usize> = config.ns.iter().map(|&n| n as usize).collect();
        ns.sort_unstable();
        ns.dedup();
        let keep = match config.keep {
            Some(k) if k < 1 => {
                return Err(StageError::config(
                    "keep",
                    format!("must be at least 1, found {k}"),
                ))
            }
            Some(k) => k as usize,
            None => *ns.last().expect("ns is not empty"),
        };
        Ok(BestOfN {
            ns,
            keep,
            keep_all: config.keep_all,
            input: RoundInput::default(),
        })
    }
}

impl Stage for BestOfN {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        let completions = input.completions(0);
        let proxy = Scores::of(&mut input, 1);
        let gold = Scores::of(&mut input, 2);
        if completions.is_empty() {
            return Ok(());
        }
        // Scored samples per prompt, in id order.
        let mut unscored = 0u64;
        let mut by_prompt: BTreeMap<String, Vec<(Completion, f64)>> = BTreeMap::new();
        for c in completions {
            match first_score(&proxy, &c.id) {
                Some(p) => by_prompt
                    .entry(c.prompt_id.clone())
                    .or_default()
                    .push((c, p)),
                None => unscored += 1,
            }
        }
        for samples in by_prompt.values_mut() {
            samples.sort_by(|a, b| natural_cmp(&a.0.id, &b.0.id));
        }
        if unscored > 0 {
            ctx.log(format!(
                "{unscored} completions have no `proxy` score and are skipped: wire `proxy` to the scorer of `completions`"
            ));
        }
        ctx.metric("unscored", unscored as f64);
        let has_gold = !gold.is_empty();
        let mut table = vec![format!(
            "{:>5} {:>8} {:>8} {:>12} {:>12} {:>8}",
            "n", "kl", "proxy", "gold", "gold_oracle", "prompts"
        )];
        let mut ns = self.ns.clone();
        if !ns.contains(&self.keep) {
            ns.push(self.keep);
        }
        for &n in &ns {
            let (mut proxies, mut golds, mut oracles) = (Vec::new(), Vec::new(), Vec::new());
            let mut too_few = 0u64;
            for samples in by_prompt.values() {
                if samples.len() < n {
                    too_few += 1;
                    continue;
                }
                let first = &samples[..n];
                // The highest proxy score; ties go to the first.
                let best =
                    first
                        .iter()
                        .enumerate()
                        .fold(0, |best, (i, s)| if s.1 > first[best].1 { i } else { best });
                let (pick, proxy_reward) = &first[best];
                proxies.push(*proxy_reward);
                let gold_reward = first_score(&gold, &pick.id);
                if let Some(g) = gold_reward {
                    golds.push(g);
                }
                let oracle = first
                    .iter()
                    .filter_map(|(c, _)| first_score(&gold, &c.id))
                    .fold(f64::NEG_INFINITY, f64::max);
                if oracle.is_finite() {
                    oracles.push(oracle);
                }
                if n == self.keep || (self.keep_all && self.ns.contains(&n)) {
                    let mut c = pick.clone();
                    c.meta.insert("best_of".into(), n.to_string());
                    c.meta
                        .insert("proxy_reward".into(), proxy_reward.to_string());
                    if let Some(g) = gold_reward {
                        c.meta.insert("gold_reward".into(), g.to_string());
                    }
                    ctx.emit(0, Record::Completion(c));
                }
            }
            if !self.ns.contains(&n) {
                continue;
            }
            let step = n as u64;
            ctx.metric_at("prompts", proxies.len() as f64, step);
            ctx.metric_at("too_few_samples", too_few as f64, step);
            if proxies.is_empty() {
                table.push(format!("{n:>5} (no prompt has {n} scored samples)"));
                continue;
            }
            let kl = best_of_n_kl(n);
            ctx.metric_at("kl", kl, step);
            ctx.metric_at("proxy_reward", mean(&proxies), step);
            let fmt = |xs: &[f64]| {
                if xs.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.4}", mean(xs))
                }
            };
            if has_gold && !golds.is_empty() {
                ctx.metric_at("gold_reward", mean(&golds), step);
                if golds.len() < proxies.len() {
                    ctx.metric_at("gold_missing", (proxies.len() - golds.len()) as f64, step);
                }
            }
            if has_gold && !oracles.is_empty() {
                ctx.metric_at("gold_reward_oracle", mean(&oracles), step);
            }
            table.push(format!(
                "{n:>5} {kl:>8.4} {:>8.4} {:>12} {:>12} {:>8}",
                mean(&proxies),
                fmt(&golds),
                fmt(&oracles),
                proxies.len()
            ));
        }
        ctx.log(format!(
            "best-of-n over {} prompts:\n{}",
            by_prompt.len(),
            table.join("\n")
        ));
        Ok(())
    }
}

/// The score of `id` on a port that carries one score name (the first by
/// name if several).
fn first_score(scores: &Scores, id: &str) -> Option<f64> {
    scores.all(id).and_then(|s| s.values().next().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{completion, create, run, score};

    /// `prompts` prompts with `samples` completions each; sample i of prompt
    /// p has proxy score i and gold score -(i - 2)^2 (hacked beyond 2).
    fn inputs(prompts: usize, samples: usize, gold: bool) -> Vec<(usize, Vec<Record>)> {
        let (mut cs, mut proxy, mut golds) = (Vec::new(), Vec::new(), Vec::new());
        for p in 0..prompts {
            // Reverse order of arrival: the stage orders them.
            for i in (0..samples).rev() {
                let id = format!("p{p}:s{i}");
                cs.push(completion(&id, &format!("p{p}"), &[]));
                proxy.push(score(&id, "proxy_reward", i as f64));
                golds.push(score(&id, "gold_reward", -((i as f64 - 2.0).powi(2))));
            }
        }
        let mut v = vec![(0, cs), (1, proxy)];
        if gold {
            v.push((2, golds));
        }
        v
    }

    #[test]
    fn kl_formula() {
        assert_eq!(best_of_n_kl(1), 0.0);
        assert!((best_of_n_kl(2) - (2f64.ln() - 0.5)).abs() < 1e-12);
        assert!((best_of_n_kl(16) - (16f64.ln() - 15.0 / 16.0)).abs() < 1e-12);
    }

    #[test]
    fn selects_the_highest_proxy_among_the_first_n() {
        let out = run::<BestOfN>(
            serde_json::json!({"ns": [1, 2, 4, 8], "keep": 4}),
            inputs(3, 6, true),
        )
        .unwrap();
        assert_eq!(out.metric("kl", Some(1)), Some(0.0));
        assert_eq!(out.metric("proxy_reward", Some(1)), Some(0.0));
        assert_eq!(out.metric("proxy_reward", Some(4)), Some(3.0));
        assert_eq!(out.metric("gold_reward", Some(4)), Some(-1.0));
        assert_eq!(out.metric("gold_reward", Some(2)), Some(-1.0));
        assert_eq!(out.metric("gold_reward_oracle", Some(4)), Some(0.0));
        assert_eq!(out.metric("prompts", Some(4)), Some(3.0));
        // Six samples a prompt: none reaches n = 8.
        assert_eq!(out.metric("prompts", Some(8)), Some(0.0));
        assert_eq!(out.metric("too_few_samples", Some(8)), Some(3.0));
        assert_eq!(out.metric("kl", Some(8)), None);
        assert_eq!(out.records.len(), 3);
        let Record::Completion(c) = &out.records[0] else {
            panic!()
        };
        assert_eq!(c.id, "p0:s3");
        assert_eq!(c.meta["best_of"], "4");
        assert_eq!(c.meta["proxy_reward"], "3");
        assert_eq!(c.meta["gold_reward"], "-1");
        assert!(out
            .logs
            .iter()
            .any(|l| l.contains("best-of-n over 3 prompts")));
        // keep_all: the picks of every n that some prompt reaches.
        let all = run::<BestOfN>(
            serde_json::json!({"ns": [1, 2, 4, 8], "keep_all": true}),
            inputs(3, 6, true),
        )
        .unwrap();
        let mut levels: Vec<String> = all
            .records
            .iter()
            .map(|r| match r {
                Record::Completion(c) => c.meta["best_of"].clone(),
                _ => panic!(),
            })
            .collect();
        levels.dedup();
        assert_eq!(levels, ["1", "2", "4"]);
        assert_eq!(all.records.len(), 9);
    }

    #[test]
    fn ties_go_to_the_first_and_gold_is_optional() {
        let cs = vec![completion("q:s1", "q", &[]), completion("q:s0", "q", &[])];
        let proxy = vec![score("q:s0", "rm", 1.0), score("q:s1", "rm", 1.0)];
        let out =
            run::<BestOfN>(serde_json::json!({"ns": [2]}), vec![(0, cs), (1, proxy)]).unwrap();
        let Record::Completion(c) = &out.records[0] else {
            panic!()
        };
        assert_eq!(c.id, "q:s0");
        assert!(!c.meta.contains_key("gold_reward"));
        assert_eq!(out.metric("gold_reward", Some(2)), None);
        assert_eq!(out.metric("proxy_reward", Some(2)), Some(1.0));
    }

    #[test]
    fn unscored_completions_are_counted() {
        let mut v = inputs(1, 2, false);
        v[0].1.push(completion("p0:s9", "p0", &[]));
        let out = run::<BestOfN>(serde_json::json!({"ns": [2]}), v).unwrap();
        assert_eq!(out.metric("unscored", None), Some(1.0));
        assert_eq!(out.metric("prompts", Some(2)), Some(1.0));
    }

    #[test]
    fn bad_ns_names_the_field() {
        let err = create::<BestOfN>(serde_json::json!({"ns": [0, 2]}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("ns"));
        let err = create::<BestOfN>(serde_json::json!({"ns": []}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("ns"));
        let err = create::<BestOfN>(serde_json::json!({"keep": 0}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("keep"));
    }
}
