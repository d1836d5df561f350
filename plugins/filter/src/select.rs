//! `filter.select-pairs`: active label selection. Of the round's candidate
//! pairs, the `budget` whose labels would teach the reward models the most
//! go to the labeller: where the ensemble disagrees most (the largest
//! standard deviation of its reward differences d_i), or where it is least
//! sure of the direction (the smallest |mean d_i|, Secrets of RLHF II's
//! ambiguous pairs). `random` is the baseline at the same budget.
//!
//! Selection is global over the round (the top B of all candidates), so it
//! runs on one worker; the candidates not chosen leave on `rest`, so none is
//! lost.

use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectConfig {
    by: String,
    budget: usize,
    seed: u64,
}

/// Chooses the round's pairs to label.
pub struct SelectPairs {
    config: SelectConfig,
    seed: u64,
    input: RoundInput,
}

impl StageFactory for SelectPairs {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "filter.select-pairs",
            "Active label selection: of the round's candidate pairs (scored by rm.strength, which sets \
             strength_mean and strength_std over an RM ensemble), sends the `budget` most informative \
             on `selected`: `disagreement` the largest strength_std (the members disagree), \
             `uncertainty` the smallest |strength_mean| (the ensemble cannot tell the direction), \
             `random` a seeded random choice (the baseline). Ties are broken by pair id. The others \
             leave on `rest`. Metrics: candidates, selected, rest, and the mean strength_std and \
             |strength_mean| of the selected and of all candidates (std_selected, std_all, \
             abs_mean_selected, abs_mean_all).",
        )
        .input("pairs", RecordKind::PreferencePair)
        .output("selected", RecordKind::PreferencePair)
        .output("rest", RecordKind::PreferencePair)
        .placement(Placement::Single)
        .optional(
            "by",
            FieldType::one_of(&["disagreement", "uncertainty", "random"]),
            "disagreement",
            "What makes a pair worth a label (see the description).",
        )
        .optional("budget", FieldType::positive().at_most(1 << 30), 64, "Labels per round: pairs sent on `selected`.")
        .optional("seed", FieldType::unsigned(), 0, "Seed of `random`, combined with the pipeline seed and the round.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: SelectConfig = init.config()?;
        if config.budget == 0 {
            return Err(StageError::config("budget", "must be at least 1"));
        }
        let seed = seeded_hash(init.seed, &format!("filter.select-pairs:{}", config.seed));
        Ok(SelectPairs {
            config,
            seed,
            input: RoundInput::default(),
        })
    }
}

impl Stage for SelectPairs {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let pairs = self.input.take().pairs_by_id(0);
        let n = pairs.len();
        ctx.metric("candidates", n as f64);
        if n == 0 {
            return Ok(());
        }
        let by = self.config.by.as_str();
        let strength = |p: &PreferencePair| p.strength_mean.zip(p.strength_std);
        if by != "random" {
            if let Some(p) = pairs.iter().find(|p| strength(p).is_none()) {
                return Err(StageError::new(format!(
                    "pair {} has no preference strength, so by = \"{by}\" cannot rank it: score the candidates \
                     with rm.strength (an ensemble of at least 2 reward models) before this stage, or use \
                     by = \"random\"",
                    p.id
                )));
            }
        }
        // Larger key = more worth a label.
        let round = ctx.round();
        let key = |p: &PreferencePair| -> f64 {
            match by {
                "random" => hone_sdk::text::seeded_unit(self.seed, &format!("{}#{round}", p.id)),
                "uncertainty" => -p.strength_mean.map_or(0.0, f64::abs),
                _ => p.strength_std.unwrap_or(0.0),
            }
        };
        let mut order: Vec<(f64, usize)> =
            pairs.iter().enumerate().map(|(i, p)| (key(p), i)).collect();
        // pairs_by_id is in id order, so equal keys keep it.
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let budget = self.config.budget.min(n);
        let mut chosen = vec![false; n];
        for &(_, i) in &order[..budget] {
            chosen[i] = true;
        }
        let means = |pick: &dyn Fn(usize) -> bool| -> (f64, f64, usize) {
            let (mut std, mut abs, mut k) = (0.0, 0.0, 0);
            for (_, p) in pairs.iter().enumerate().filter(|(i, _)| pick(*i)) {
                if let Some((m, s)) = strength(p) {
                    std += s;
                    abs += m.abs();
                    k += 1;
                }
            }
            (std / k.max(1) as f64, abs / k.max(1) as f64, k)
        };
        let (std_sel, abs_sel, k_sel) = means(&|i| chosen[i]);
        let (std_all, abs_all, k_all) = means(&|_| true);
        if k_all > 0 {
            if k_sel > 0 {
                ctx.metric("std_selected", std_sel);
                ctx.metric("abs_mean_selected", abs_sel);
            }
            ctx.metric("std_all", std_all);
            ctx.metric("abs_mean_all", abs_all);
        }
        ctx.metric("selected", budget as f64);
        ctx.metric("rest", (n - budget) as f64);
        for (p, chosen) in pairs.into_iter().zip(chosen) {
            let mut p = p;
            p.meta.insert("selected_by".into(), by.to_string());
            ctx.emit(usize::from(!chosen), Record::Pair(p));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hone_sdk::testing::{create, init, run_round};
    use serde_json::json;

    fn candidate(i: usize, mean: Option<f64>, std: Option<f64>) -> Record {
        let mut p = PreferencePair::new(
            format!("c{i:02}"),
            "q",
            format!("a{i}"),
            format!("b{i}"),
            "proxy_reward",
        );
        p.strength_mean = mean;
        p.strength_std = std;
        Record::Pair(p)
    }

    fn select(config: serde_json::Value, pairs: Vec<Record>) -> (Vec<String>, hone_sdk::Collected) {
        let out = run_round::<SelectPairs>(&init::<SelectPairs>(config), vec![(0, pairs)]).unwrap();
        let ids = out.emitted(0).iter().map(|r| r.id().to_string()).collect();
        (ids, out)
    }

    /// Candidate i has mean (i - 5) / 2 and std i / 10.
    fn candidates() -> Vec<Record> {
        (0..10)
            .map(|i| candidate(i, Some((i as f64 - 5.0) / 2.0), Some(i as f64 / 10.0)))
            .collect()
    }

    #[test]
    fn each_criterion_picks_its_budget_and_the_rest_is_kept() {
        let (ids, out) = select(json!({"by": "disagreement", "budget": 3}), candidates());
        assert_eq!(ids, ["c07", "c08", "c09"]);
        assert_eq!(out.emitted(1).len(), 7);
        assert_eq!(out.metric("selected", None), Some(3.0));
        assert_eq!(out.metric("rest", None), Some(7.0));
        assert!((out.metric("std_selected", None).unwrap() - 0.8).abs() < 1e-12);
        assert!((out.metric("std_all", None).unwrap() - 0.45).abs() < 1e-12);
        // |mean| 0 at c05, 0.5 at c04 and c06: the tie goes to the smaller id.
        let (ids, _) = select(json!({"by": "uncertainty", "budget": 2}), candidates());
        assert_eq!(ids, ["c04", "c05"]);
        let (a, out) = select(json!({"by": "random", "budget": 4}), candidates());
        let (b, _) = select(json!({"by": "random", "budget": 4}), candidates());
        assert_eq!(a, b, "seeded");
        assert_eq!(a.len(), 4);
        assert_eq!(out.emitted(1).len(), 6);
        let (c, _) = select(
            json!({"by": "random", "budget": 4, "seed": 9}),
            candidates(),
        );
        assert_ne!(a, c);
        // A budget above the candidates sends them all.
        let (all, out) = select(json!({"budget": 50}), candidates());
        assert_eq!(all.len(), 10);
        assert_eq!(out.metric("rest", None), Some(0.0));
    }

    #[test]
    fn pairs_without_strength_are_refused_unless_random() {
        let pairs = vec![candidate(0, Some(1.0), Some(0.1)), candidate(1, None, None)];
        let err =
            run_round::<SelectPairs>(&init::<SelectPairs>(json!({})), vec![(0, pairs.clone())])
                .err()
                .unwrap();
        assert!(
            err.to_string().contains("c01") && err.to_string().contains("rm.strength"),
            "{err}"
        );
        let (ids, _) = select(json!({"by": "random", "budget": 1}), pairs);
        assert_eq!(ids.len(), 1);
        let err = create::<SelectPairs>(json!({"budget": 0})).err().unwrap();
        assert_eq!(err.config_field(), Some("budget"));
    }
}
