//! `world.prompts`, `world.demos` and `world.gold`.

use crate::draws::Draws;
use crate::tasks::{self, Split, FAMILIES};
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The stage's own seed combined with the pipeline's.
fn stage_seed(init: &StageInit, kind: &str, seed: u64) -> u64 {
    seeded_hash(init.seed, &format!("{kind}:{seed}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptsConfig {
    families: Vec<String>,
    count: u64,
    split: String,
    seed: u64,
    #[serde(default = "every_round")]
    every_round: bool,
    #[serde(default = "fresh")]
    per_round: String,
    #[serde(default)]
    pool: u64,
    #[serde(default)]
    first_round: u64,
}

fn fresh() -> String {
    "fresh".to_string()
}

fn every_round() -> bool {
    true
}

/// Draws world task prompts.
pub struct Prompts {
    config: PromptsConfig,
    split: Split,
    seed: u64,
}

impl StageFactory for Prompts {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "world.prompts",
            "Draws world task prompts (sort, arith, keywords) from the train or the shifted split, \
             `count` per round, with ids `world:{split}:{i:06}` and meta `family` and `split`.",
        )
        .output("prompts", RecordKind::Prompt)
        .optional(
            "families",
            FieldType::List(Box::new(FieldType::one_of(&FAMILIES))),
            serde_json::json!(FAMILIES),
            "Task families, taken in turn: `sort`, `arith`, `keywords`.",
        )
        .optional("count", FieldType::unsigned(), 100, "Prompts emitted per round.")
        .optional(
            "split",
            FieldType::one_of(&["train", "shifted"]),
            "train",
            "`train`: 4-6 numbers below 50, two operands up to 20, train keywords. `shifted`: 8-12 numbers \
             up to 1000, three operands up to 100, keywords never seen in train.",
        )
        .optional("seed", FieldType::unsigned(), 0, "Seed, combined with the pipeline seed.")
        .optional(
            "every_round",
            FieldType::Bool,
            true,
            "Emit prompts in every round; false: in round 0 only (e.g. SFT data in a loop).",
        )
        .optional(
            "per_round",
            FieldType::one_of(&["fresh", "same", "resample"]),
            "fresh",
            "Which prompts each round gets: `fresh` ones (round r: prompts r*count .. (r+1)*count, a per-round \
             split, so a one-round stage with count = R*count and the same seed holds every round's), the \
             `same` count every round (held-out evaluation prompts of a loop), or a seeded `resample` of \
             count prompts from a fixed pool of `pool` (different in each round).",
        )
        .optional(
            "first_round",
            FieldType::unsigned(),
            0,
            "Emit nothing before this round (a loop whose reward models first train on seed labels in round 0 \
             starts sampling in round 1); rounds count from it for `fresh` prompts.",
        )
        .optional("pool", FieldType::unsigned(), 0, "With per_round = \"resample\": the pool size, at least count.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: PromptsConfig = init.config()?;
        let split = Split::parse(&config.split).ok_or_else(|| {
            StageError::config(
                "split",
                format!("must be `train` or `shifted`, found `{}`", config.split),
            )
        })?;
        if config.families.is_empty() {
            return Err(StageError::config(
                "families",
                "must name at least one family",
            ));
        }
        if let Some(bad) = config
            .families
            .iter()
            .find(|f| !FAMILIES.contains(&f.as_str()))
        {
            return Err(StageError::config(
                "families",
                format!("unknown family `{bad}`; known: sort, arith, keywords"),
            ));
        }
        if config.per_round == "resample" && config.pool < config.count {
            return Err(StageError::config(
                "pool",
                format!(
                    "per_round = \"resample\" draws {} prompts a round from a pool of `pool`, which must be at \
                     least as large, found {}",
                    config.count, config.pool
                ),
            ));
        }
        let seed = stage_seed(init, "world.prompts", config.seed);
        Ok(Prompts {
            config,
            split,
            seed,
        })
    }
}

impl Stage for Prompts {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let Some(round) = ctx.round().checked_sub(self.config.first_round) else {
            return Ok(());
        };
        if round > 0 && !self.config.every_round {
            return Ok(());
        }
        let count = self.config.count;
        let indices: Vec<u64> = match self.config.per_round.as_str() {
            "same" => (0..count).collect(),
            "resample" => resample(
                self.config.pool,
                count,
                &mut Draws::new(self.seed, format!("resample#{round}")),
            ),
            _ => (round * count..(round + 1) * count).collect(),
        };
        for i in indices {
            let family = &self.config.families[(i % self.config.families.len() as u64) as usize];
            let id = format!("world:{}:{i:06}", self.config.split);
            let text = tasks::generate(family, self.split, &mut Draws::new(self.seed, &id))
                .expect("families are validated");
            let meta = BTreeMap::from([
                ("family".to_string(), family.clone()),
                ("split".to_string(), self.config.split.clone()),
            ]);
            ctx.emit(0, Record::Prompt(Prompt { id, text, meta }));
        }
        ctx.metric("prompts", count as f64);
        Ok(())
    }
}

/// `count` distinct indices below `pool`, in increasing order: a partial
/// Fisher-Yates shuffle.
fn resample(pool: u64, count: u64, draws: &mut Draws) -> Vec<u64> {
    let mut all: Vec<u64> = (0..pool).collect();
    for i in 0..count as usize {
        let j = draws.range(i as u64, pool - 1) as usize;
        all.swap(i, j);
    }
    let mut picked = all[..count as usize].to_vec();
    picked.sort_unstable();
    picked
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemosConfig {
    quality: f64,
    samples: u64,
    seed: u64,
    tag: String,
}

/// Answers world prompts with the reference solver.
pub struct Demos {
    config: DemosConfig,
    seed: u64,
}

impl StageFactory for Demos {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "world.demos",
            "Answers world prompts with the reference solver: `samples` Completion demonstrations per \
             prompt (ids `PROMPT_ID:demoN`, or `PROMPT_ID:TAG:demoN` with a `tag`), of controllable quality. Prompts that are not world tasks are \
             skipped and counted.",
        )
        .input("prompts", RecordKind::Prompt)
        .output("completions", RecordKind::Completion)
        .placement(Placement::DataParallel)
        .optional(
            "quality",
            FieldType::Float,
            1.0,
            "1 = always right; below 1 each of three mistake opportunities strikes with probability 1 - quality.",
        )
        .optional("samples", FieldType::positive().at_most(1_000_000), 1, "Demonstrations per prompt.")
        .optional("seed", FieldType::unsigned(), 0, "Seed, combined with the pipeline seed.")
        .optional(
            "tag",
            FieldType::String,
            "",
            "Put into the ids (`PROMPT_ID:TAG:demoN`), so that completions of one prompt from several \
             demos stages keep distinct ids when their scores share a stream.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: DemosConfig = init.config()?;
        if config.tag.contains(char::is_whitespace) {
            return Err(StageError::config(
                "tag",
                format!("must not contain whitespace, found `{}`", config.tag),
            ));
        }
        if !(0.0..=1.0).contains(&config.quality) {
            return Err(StageError::config(
                "quality",
                format!("must be between 0 and 1, found {}", config.quality),
            ));
        }
        if config.samples == 0 {
            return Err(StageError::config("samples", "must be at least 1"));
        }
        let seed = stage_seed(init, "world.demos", config.seed);
        Ok(Demos { config, seed })
    }
}

impl Stage for Demos {
    fn on_batch(
        &mut self,
        ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        let (mut made, mut skipped) = (0u64, 0u64);
        for record in batch {
            let Record::Prompt(prompt) = record else {
                continue;
            };
            for s in 0..self.config.samples {
                let id = match self.config.tag.as_str() {
                    "" => format!("{}:demo{s}", prompt.id),
                    tag => format!("{}:{tag}:demo{s}", prompt.id),
                };
                let mut rng = Draws::new(self.seed, &id);
                let Some(text) = tasks::solve(&prompt.text, self.config.quality, &mut rng) else {
                    skipped += 1;
                    break;
                };
                let mut meta = prompt.meta.clone();
                meta.insert("quality".into(), self.config.quality.to_string());
                ctx.emit(
                    0,
                    Record::Completion(Completion {
                        id,
                        prompt_id: prompt.id.clone(),
                        prompt: prompt.text.clone(),
                        text,
                        token_ids: Vec::new(),
                        token_logprobs: Vec::new(),
                        ref_logprobs: Vec::new(),
                        values: Vec::new(),
                        policy: None,
                        meta,
                    }),
                );
                made += 1;
            }
        }
        self.add_counts(ctx, made, skipped);
        Ok(())
    }
}

impl Demos {
    fn add_counts(&mut self, ctx: &mut Context, made: u64, skipped: u64) {
        if made > 0 {
            ctx.metric("demos", made as f64);
        }
        if skipped > 0 {
            ctx.metric("skipped", skipped as f64);
        }
    }
}

/// Scores completions with the gold reward.
pub struct Gold {
    sum: f64,
    scored: u64,
    skipped: u64,
}

impl StageFactory for Gold {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "world.gold",
            "Scores completions of world prompts with the gold reward: a Score (name `gold_reward`, id = \
             the completion's id) each, and on `completions` the completion itself with meta \
             `gold_reward` (for eval.elo and eval.win-rate when several policies' completions share ids). \
             Metrics: `scored`, `gold_reward_sum` and `mean_gold_reward` (per worker), `skipped` (not \
             world prompts).",
        )
        .input("completions", RecordKind::Completion)
        .output("scores", RecordKind::Score)
        .output("completions", RecordKind::Completion)
        .placement(Placement::DataParallel)
    }

    fn create(_init: &StageInit) -> Result<Self, StageError> {
        Ok(Gold {
            sum: 0.0,
            scored: 0,
            skipped: 0,
        })
    }
}

impl Stage for Gold {
    fn on_batch(
        &mut self,
        ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for record in batch {
            let Record::Completion(mut c) = record else {
                continue;
            };
            match tasks::gold_reward(&c.prompt, &c.text) {
                Some(value) => {
                    self.sum += value;
                    self.scored += 1;
                    let score = Score {
                        id: c.id.clone(),
                        prompt_id: c.prompt_id.clone(),
                        name: "gold_reward".into(),
                        value,
                    };
                    ctx.emit(0, Record::Score(score));
                    // `{:?}` writes the shortest text that parses back to the same f64.
                    c.meta.insert("gold_reward".into(), format!("{value:?}"));
                    ctx.emit(1, Record::Completion(c));
                }
                None => self.skipped += 1,
            }
        }
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        ctx.metric("scored", self.scored as f64);
        ctx.metric("gold_reward_sum", self.sum);
        if self.scored > 0 {
            ctx.metric("mean_gold_reward", self.sum / self.scored as f64);
        }
        ctx.metric("skipped", self.skipped as f64);
        (self.sum, self.scored, self.skipped) = (0.0, 0, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::run;

    #[test]
    fn prompts_come_every_round_unless_told_otherwise() {
        let rounds = |every_round: bool| -> Vec<usize> {
            let config = serde_json::json!({"count": 5, "every_round": every_round});
            let init = hone_sdk::testing::init::<Prompts>(config);
            let mut stage = Prompts::create(&init).unwrap();
            let counts = (0..3)
                .map(|round| {
                    let mut out = hone_sdk::Collected::default();
                    let mut ctx = Context::new(&mut out, &init, round);
                    stage.on_round_end(&mut ctx).unwrap();
                    drop(ctx);
                    out.emitted(0).len()
                })
                .collect();
            let _ = std::fs::remove_dir_all(&init.run_dir);
            counts
        };
        assert_eq!(rounds(true), [5, 5, 5]);
        assert_eq!(rounds(false), [5, 0, 0]);
    }

    #[test]
    fn per_round_gives_fresh_same_or_resampled_prompts() {
        let ids = |config: serde_json::Value| -> Vec<Vec<String>> {
            let init = hone_sdk::testing::init::<Prompts>(config);
            let mut stage = Prompts::create(&init).unwrap();
            (0..3)
                .map(|round| {
                    let out =
                        hone_sdk::testing::run_round_of(&mut stage, &init, round, vec![]).unwrap();
                    out.emitted(0)
                        .iter()
                        .map(|r| match r {
                            Record::Prompt(p) => p.id.clone(),
                            _ => panic!(),
                        })
                        .collect()
                })
                .collect()
        };
        let fresh = ids(serde_json::json!({"count": 4}));
        assert_eq!(fresh[1][0], "world:train:000004");
        // The per-round split: a one-round stage of count 12 holds all three.
        let all = ids(serde_json::json!({"count": 12, "every_round": false}));
        assert_eq!(all[0], fresh.concat());
        let same = ids(serde_json::json!({"count": 4, "per_round": "same"}));
        assert!(same.iter().all(|r| r == &fresh[0]));
        let resampled = ids(serde_json::json!({"count": 4, "per_round": "resample", "pool": 10}));
        for round in &resampled {
            assert_eq!(round.len(), 4);
            assert!(round.windows(2).all(|w| w[0] < w[1]), "distinct: {round:?}");
            assert!(
                round.iter().all(|id| id.as_str() < "world:train:000010"),
                "{round:?}"
            );
        }
        assert_ne!(resampled[0], resampled[1]);
        let late = ids(serde_json::json!({"count": 4, "first_round": 1}));
        assert!(late[0].is_empty());
        assert_eq!(late[1], fresh[0], "rounds count from first_round");
        assert_eq!(
            resampled,
            ids(serde_json::json!({"count": 4, "per_round": "resample", "pool": 10}))
        );
        let err = hone_sdk::testing::create::<Prompts>(
            serde_json::json!({"count": 4, "per_round": "resample", "pool": 3}),
        )
        .err()
        .unwrap();
        assert_eq!(err.config_field(), Some("pool"));
    }

    #[test]
    fn prompts_are_seeded_and_follow_the_split() {
        let cfg = serde_json::json!({"count": 30, "split": "shifted"});
        let (a, m) = run::<Prompts>(cfg.clone(), vec![], 0);
        let (b, _) = run::<Prompts>(cfg, vec![], 0);
        assert_eq!(a, b);
        assert_eq!(m["prompts"], 30.0);
        let Record::Prompt(p) = &a[0] else { panic!() };
        assert_eq!(p.id, "world:shifted:000000");
        assert_eq!(p.meta["split"], "shifted");
        let (c, _) = run::<Prompts>(
            serde_json::json!({"count": 30, "split": "shifted", "seed": 1}),
            vec![],
            0,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn gold_passes_each_completion_on_with_its_score_in_meta() {
        let (prompts, _) = run::<Prompts>(serde_json::json!({"count": 6}), vec![], 0);
        let (demos, _) = run::<Demos>(serde_json::json!({"quality": 0.5}), prompts, 0);
        let init = hone_sdk::testing::init::<Gold>(serde_json::json!({}));
        let out = hone_sdk::testing::run_round::<Gold>(&init, vec![(0, demos)]).unwrap();
        let (scores, passed) = (out.emitted(0), out.emitted(1));
        assert_eq!(scores.len(), passed.len());
        for (s, c) in scores.iter().zip(passed) {
            let (Record::Score(s), Record::Completion(c)) = (s, c) else {
                panic!("{s:?} {c:?}")
            };
            assert_eq!(s.id, c.id);
            // Exactly the Score's value, read back.
            assert_eq!(c.meta["gold_reward"].parse::<f64>().unwrap(), s.value);
        }
    }

    #[test]
    fn demos_and_gold_agree_on_quality() {
        let (prompts, _) = run::<Prompts>(serde_json::json!({"count": 60}), vec![], 0);
        let mean = |quality: f64| {
            let (demos, _) = run::<Demos>(
                serde_json::json!({"quality": quality, "samples": 2}),
                prompts.clone(),
                0,
            );
            assert_eq!(demos.len(), 120);
            let (_, m) = run::<Gold>(serde_json::json!({}), demos, 0);
            m["mean_gold_reward"]
        };
        assert_eq!(mean(1.0), 1.0);
        let (tagged, _) = run::<Demos>(serde_json::json!({"tag": "q9"}), prompts.clone(), 0);
        assert_eq!(tagged[0].id(), "world:train:000000:q9:demo0");
        assert!(mean(0.5) < 0.9);
    }
}
