//! `eval.rewards`: mean rewards and the Monte-Carlo KL(π‖π_ref) of groups
//! of completions (policy checkpoints, or meta values).

use crate::common::{mean, GroupBy, ScoredCompletions};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardsConfig {
    group_by: String,
    final_step: Option<i64>,
}

/// Mean rewards and KL per group of completions.
pub struct Rewards {
    config: RewardsConfig,
    group_by: GroupBy,
    input: RoundInput,
}

/// What one group's completions add up to.
#[derive(Default)]
struct Group {
    n: u64,
    /// Score values by name.
    scores: BTreeMap<String, Vec<f64>>,
    /// Σ_t token_logprobs − ref_logprobs, for completions that have both.
    kl: Vec<f64>,
    /// Σ response length in characters.
    length: f64,
    /// The policy the group's completions came from (`group_by = "policy"`).
    policy: Option<ArtifactRef>,
}

impl StageFactory for Rewards {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "eval.rewards",
            "Mean rewards and KL per group of completions (a policy checkpoint, or a meta value): joins \
             `scores` to completions by id and reports, at step = the group's step (the checkpoint step of \
             `sft/ckpt-250`, `final_step` for a final checkpoint, a numeric meta value, else the group's \
             index), the mean of each score name (`gold_reward`, `proxy_reward`, ...) and `kl`, the mean of \
             the sum over tokens of `token_logprobs` - `ref_logprobs` (lm.logprobs fills the latter): a Monte-Carlo estimate of \
             KL(policy || reference). Also `completions` and `length` (the mean response length in characters) at each step, and `ungrouped`; writes \
             OUTPUT_DIR/rewards.json and logs a table.",
        )
        .input("completions", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .optional(
            "group_by",
            FieldType::String,
            "policy",
            "`policy`: the generating policy artifact (`sft/ckpt-250`); `meta:KEY`: a meta value.",
        )
        .optional(
            "final_step",
            FieldType::unsigned(),
            serde_json::Value::Null,
            "Step of a `final` checkpoint. Unset: one more than the largest checkpoint step seen.",
        )
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: RewardsConfig = init.config()?;
        let group_by = GroupBy::parse("group_by", &config.group_by)?;
        if let Some(step) = config.final_step.filter(|s| *s < 0) {
            return Err(StageError::config(
                "final_step",
                format!("must be >= 0, found {step}"),
            ));
        }
        Ok(Rewards {
            config,
            group_by,
            input: RoundInput::default(),
        })
    }
}

impl Stage for Rewards {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let Some((completions, scores)) = ScoredCompletions::take(&mut self.input) else {
            return Ok(());
        };
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        let mut ungrouped = 0u64;
        for c in &completions {
            let Some(key) = self.group_by.key(c) else {
                ungrouped += 1;
                continue;
            };
            let g = groups.entry(key).or_default();
            g.n += 1;
            g.policy = g.policy.take().or_else(|| c.policy.clone());
            for (name, value) in scores.all(&c.id).into_iter().flatten() {
                g.scores.entry(name.clone()).or_default().push(*value);
            }
            if let Some(kl) = c.logprob_minus_ref() {
                g.kl.push(kl);
            }
            g.length += c.text.chars().count() as f64;
        }
        ctx.metric("ungrouped", ungrouped as f64);
        if ungrouped > 0 {
            ctx.log(format!(
                "{ungrouped} completions without {} are left out (group_by = \"{}\")",
                self.group_by.missing(),
                self.config.group_by
            ));
        }
        let steps = self.steps(&groups);
        let mut by_step: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for (name, step) in &steps {
            by_step.entry(*step).or_default().push(name);
        }
        if let Some((step, names)) = by_step.iter().find(|(_, names)| names.len() > 1) {
            ctx.log(format!(
                "warning: groups {} share step {step}; their points coincide in the report",
                names.join(", ")
            ));
        }
        let mut table = vec![format!(
            "{:<28} {:>6} {:>7} {:>10}  rewards",
            "group", "step", "n", "kl"
        )];
        let mut json = serde_json::Map::new();
        for (name, g) in &groups {
            let step = steps[name];
            ctx.metric_at("completions", g.n as f64, step);
            // Length drift (reward models' length bias) shows here first.
            ctx.metric_at("length", g.length / g.n as f64, step);
            let mut means = serde_json::Map::new();
            let mut cells = Vec::new();
            for (score, values) in &g.scores {
                let m = mean(values);
                ctx.metric_at(score, m, step);
                means.insert(
                    score.clone(),
                    serde_json::json!({"mean": m, "n": values.len()}),
                );
                cells.push(format!("{score} {m:.4}"));
            }
            let kl = (!g.kl.is_empty()).then(|| mean(&g.kl));
            if let Some(kl) = kl {
                ctx.metric_at("kl", kl, step);
            }
            table.push(format!(
                "{name:<28} {step:>6} {:>7} {:>10}  {}",
                g.n,
                kl.map_or("-".to_string(), |k| format!("{k:.5}")),
                cells.join(", ")
            ));
            json.insert(
                name.clone(),
                serde_json::json!({
                    "step": step,
                    "completions": g.n,
                    "kl": kl,
                    "kl_n": g.kl.len(),
                    "scores": means,
                }),
            );
        }
        ctx.log(table.join("\n"));
        let path = ctx.output_dir()?.join("rewards.json");
        let body = serde_json::to_string_pretty(&serde_json::json!({
            "round": ctx.round(),
            "group_by": self.config.group_by,
            "groups": json,
        }))
        .map_err(|e| StageError::new(format!("cannot serialise rewards.json: {e}")))?;
        hone_sdk::fs::atomic_write(&path, format!("{body}\n").as_bytes())?;
        Ok(())
    }
}

impl Rewards {
    /// The step of each group (see the descriptor).
    fn steps(&self, groups: &BTreeMap<String, Group>) -> BTreeMap<String, u64> {
        let mut steps = BTreeMap::new();
        match &self.group_by {
            GroupBy::Policy => {
                let step_of = |g: &Group| g.policy.as_ref().and_then(|p| p.step);
                // A final model is registered without a step, as `final/...`.
                let is_final = |g: &Group| {
                    g.policy
                        .as_ref()
                        .is_some_and(|p| p.step.is_none() && p.name.starts_with("final/"))
                };
                let largest = groups.values().filter_map(step_of).max();
                let final_step = self
                    .config
                    .final_step
                    .map(|s| s as u64)
                    .unwrap_or_else(|| largest.map_or(0, |s| s + 1));
                for (i, (name, g)) in groups.iter().enumerate() {
                    let step = step_of(g)
                        .or_else(|| is_final(g).then_some(final_step))
                        .unwrap_or(i as u64);
                    steps.insert(name.clone(), step);
                }
            }
            GroupBy::Meta(_) => {
                for (i, name) in groups.keys().enumerate() {
                    steps.insert(name.clone(), name.trim().parse().unwrap_or(i as u64));
                }
            }
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{completion, create, run, score};

    fn from_policy(id: &str, policy: &str, logprob: f64, ref_logprob: f64) -> Record {
        let Record::Completion(mut c) = completion(id, "p", &[]) else {
            panic!()
        };
        // Two tokens, so the KL is a sum over tokens.
        c.token_logprobs = vec![(logprob / 2.0) as f32; 2];
        c.ref_logprobs = vec![(ref_logprob / 2.0) as f32; 2];
        let mut p = ArtifactRef::new(
            "policy",
            "sft",
            format!("{policy}/model.safetensors"),
            0,
            "",
            "",
        );
        p.step = policy.strip_prefix("ckpt-").map(|s| s.parse().unwrap());
        c.policy = Some(p);
        Record::Completion(c)
    }

    #[test]
    fn groups_by_checkpoint_with_kl_and_rewards_at_the_same_step() {
        let cs = vec![
            from_policy("a0", "ckpt-50", -3.0, -3.5),
            from_policy("a1", "ckpt-50", -2.0, -2.5),
            from_policy("b0", "final", -1.0, -3.0),
            completion("orphan", "p", &[]),
        ];
        let ss = vec![
            score("a0", "gold_reward", 0.2),
            score("a1", "gold_reward", 0.4),
            score("a0", "proxy_reward", 1.0),
            score("b0", "gold_reward", 0.9),
        ];
        let out = run::<Rewards>(serde_json::json!({}), vec![(1, ss), (0, cs)]).unwrap();
        assert_eq!(out.metric("kl", Some(50)), Some(0.5));
        // "text a0", "text a1": 7 characters each.
        assert_eq!(out.metric("length", Some(50)), Some(7.0));
        assert!((out.metric("gold_reward", Some(50)).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(out.metric("proxy_reward", Some(50)), Some(1.0));
        assert_eq!(out.metric("completions", Some(50)), Some(2.0));
        // final: one past the largest checkpoint step.
        assert_eq!(out.metric("kl", Some(51)), Some(2.0));
        assert_eq!(out.metric("gold_reward", Some(51)), Some(0.9));
        assert_eq!(out.metric("ungrouped", None), Some(1.0));
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.run_dir.join("outputs/test/rewards.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["groups"]["sft/final"]["step"], 51);
        assert_eq!(json["groups"]["sft/ckpt-50"]["completions"], 2);
        let _ = std::fs::remove_dir_all(&out.run_dir);
    }

    #[test]
    fn meta_groups_use_numeric_values_as_steps() {
        let cs = vec![
            completion("x", "p", &[("round", "3")]),
            completion("y", "p", &[("round", "7")]),
        ];
        let ss = vec![
            score("x", "gold_reward", 1.0),
            score("y", "gold_reward", 0.0),
        ];
        let out = run::<Rewards>(
            serde_json::json!({"group_by": "meta:round", "final_step": 9}),
            vec![(0, cs), (1, ss)],
        )
        .unwrap();
        assert_eq!(out.metric("gold_reward", Some(3)), Some(1.0));
        assert_eq!(out.metric("gold_reward", Some(7)), Some(0.0));
        assert_eq!(out.metric("kl", Some(3)), None);
        let _ = std::fs::remove_dir_all(&out.run_dir);
    }

    #[test]
    fn bad_group_by_names_the_field() {
        let err = create::<Rewards>(serde_json::json!({"group_by": "checkpoint"}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("group_by"));
        let err = create::<Rewards>(serde_json::json!({"final_step": -1}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("final_step"));
    }
}
