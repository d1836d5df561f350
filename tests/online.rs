//! The iterative online DPO loop end to end through the `hone` binary: each
//! round the current policy samples, the gold reward scores, the best and
//! the worst of each prompt form a pair, and DPO trains from the last
//! round's policy, against a fixed or a rolling reference.

use hone_tests::{metric, read_lines, text, TempDir};
use serde_json::Value;
use std::collections::BTreeMap;

const LOOPS: &str = r#"[pipeline]
name = "online"
rounds = 3
seed = 12

[stages.sft_prompts]
kind = "world.prompts"
config = { count = 40, every_round = false }

[stages.demos]
kind = "world.demos"
inputs = "sft_prompts"
config = { quality = 0.8, samples = 1, tag = "sft" }

[stages.sft]
kind = "lm.sft"
inputs = "demos"
config = { d_model = 32, n_layers = 1, n_heads = 2, context = 64, steps = 150, batch_size = 8, lr = 3e-3, eval_every = 0, checkpoint_every = 0 }

[stages.prompts]
kind = "world.prompts"
config = { count = 12, seed = 3 }

# Fixed reference: SFT, every round.
[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "fixed.policy" }
config = { n = 3, max_new_tokens = 12 }

[stages.gold]
kind = "world.gold"
inputs = "rollout"

[stages.pairs]
kind = "filter.pair-completions"
inputs = { completions = "rollout", scores = "gold" }
config = { score = "gold_reward" }

[stages.fixed]
kind = "lm.dpo"
inputs = { pairs = "pairs", policy = "sft.policy", reference = "sft.policy" }
feedback = { policy = "fixed.policy" }
config = { steps = 4, batch_size = 4, lr = 1e-3, eval_fraction = 0.0, eval_every = 0 }

# Rolling reference: no reference port, so each round's reference is the
# policy it starts from, the last round's (RLHFlow's scripts).
[stages.rollout_r]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "rolling.policy" }
config = { n = 3, max_new_tokens = 12 }

[stages.gold_r]
kind = "world.gold"
inputs = "rollout_r"

[stages.pairs_r]
kind = "filter.pair-completions"
inputs = { completions = "rollout_r", scores = "gold_r" }
config = { score = "gold_reward", strategy = "max_random" }

[stages.rolling]
kind = "lm.dpo"
inputs = { pairs = "pairs_r", policy = "sft.policy" }
feedback = { policy = "rolling.policy" }
config = { steps = 4, batch_size = 4, lr = 1e-3, eval_fraction = 0.0, eval_every = 0 }

[stages.samples]
kind = "jsonl.write"
inputs = "rollout"
config = { file = "samples-{round}.jsonl" }
"#;

/// The manifest's policy entries of `stage`, by round.
fn policies(run: &std::path::Path, stage: &str) -> BTreeMap<u64, Value> {
    read_lines(&run.join("manifest.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["stage"] == stage && v["kind"] == "policy")
        .map(|v| (v["round"].as_u64().unwrap(), v))
        .collect()
}

#[test]
fn each_rounds_policy_descends_from_the_last_with_a_fixed_or_rolling_reference() {
    let dir = TempDir::new("online");
    let path = dir.write("online.toml", LOOPS);
    let mut hashes = Vec::new();
    for workers in ["1", "2"] {
        let run = dir.join(&format!("runs/w{workers}"));
        let out = hone_tests::run_file(&dir.0, &path, &run, workers);
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        let final_id = |stage: &str, round: u64| format!("{stage}/final/model.safetensors@{round}");
        let sft = final_id("sft", 0);
        let fixed = policies(&run, "fixed");
        let rolling = policies(&run, "rolling");
        assert_eq!(fixed.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rolling.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
        for round in 0..3u64 {
            let start = if round == 0 {
                sft.clone()
            } else {
                final_id("fixed", round - 1)
            };
            let f = &fixed[&round];
            assert_eq!(
                f["inputs"],
                serde_json::json!([start, sft]),
                "round {round}: {f}"
            );
            assert_eq!(
                f["lineage"][0].as_str().unwrap(),
                format!("dpo from {start}, reference {sft}")
            );
            let start = if round == 0 {
                sft.clone()
            } else {
                final_id("rolling", round - 1)
            };
            let r = &rolling[&round];
            assert_eq!(
                r["inputs"],
                serde_json::json!([start, start]),
                "round {round}: {r}"
            );
            hashes.push((
                workers,
                round,
                f["sha256"].as_str().unwrap().to_string(),
                r["sha256"].as_str().unwrap().to_string(),
            ));
        }
        // The rollout samples from the policy of the round before.
        for round in 0..3u64 {
            let name = if round == 0 {
                "outputs/samples/samples-0.jsonl".to_string()
            } else {
                format!("outputs/samples/round-{round}/samples-{round}.jsonl")
            };
            let lines = read_lines(&run.join(name));
            assert_eq!(lines.len(), 36, "12 prompts x 3 samples in round {round}");
            let policy: Value = serde_json::from_str::<Value>(&lines[0]).unwrap()["policy"].clone();
            let expected = if round == 0 {
                sft.clone()
            } else {
                final_id("fixed", round - 1)
            };
            assert_eq!(policy["id"], expected.as_str(), "round {round}");
        }
        assert!(metric(&run, "pairs", "pairs").unwrap() > 0.0);
        assert!(metric(&run, "fixed", "pairs").unwrap() > 0.0);
    }
    // The same seed learns the same policies on 1 worker and on 2.
    let (one, two) = hashes.split_at(3);
    for (a, b) in one.iter().zip(two) {
        assert_eq!((a.1, &a.2, &a.3), (b.1, &b.2, &b.3), "round {}", a.1);
    }
}

const LABEL_LOOP: &str = r#"[pipeline]
name = "labels"
rounds = 3
seed = 13

[stages.sft_prompts]
kind = "world.prompts"
config = { count = 40, every_round = false }

[stages.demos]
kind = "world.demos"
inputs = "sft_prompts"
config = { quality = 0.8, samples = 1, tag = "sft" }

[stages.sft]
kind = "lm.sft"
inputs = "demos"
config = { d_model = 32, n_layers = 1, n_heads = 2, context = 64, steps = 150, batch_size = 8, lr = 3e-3, eval_every = 0, checkpoint_every = 0 }

[stages.seed_answers]
kind = "world.demos"
inputs = "sft_prompts"
config = { quality = 0.5, samples = 3 }

[stages.seed_labels]
kind = "world.label"
inputs = "seed_answers"

[stages.prompts]
kind = "world.prompts"
config = { count = 12, seed = 3, first_round = 1 }

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
config = { n = 3, max_new_tokens = 12 }

[stages.proxy]
kind = "rm.score"
inputs = { records = "rollout" }
feedback = { models = "rm.models" }

[stages.candidates]
kind = "filter.pair-completions"
inputs = { completions = "rollout", scores = "proxy.scores" }
config = { strategy = "all" }

[stages.strength]
kind = "rm.strength"
inputs = { pairs = "candidates" }
feedback = { models = "rm.models" }

[stages.select]
kind = "filter.select-pairs"
inputs = "strength"
config = { budget = 5 }

[stages.label]
kind = "world.label"
inputs = { pairs = "select.selected" }

[stages.rm]
kind = "rm.train"
inputs = { pairs = ["seed_labels", "label"], init = "sft.policy" }
config = { members = 2, init = "input", train_on = "all", start = "last", steps = 5, batch_size = 8, eval_every = 0 }
"#;

/// Sums a metric of a stage in a round over the workers.
fn summed(run: &std::path::Path, stage: &str, name: &str, round: u64) -> f64 {
    read_lines(&run.join("metrics.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| {
            v["stage"] == stage && v["name"] == name && v["round"] == round && v["step"].is_null()
        })
        .map(|v| v["value"].as_f64().unwrap())
        .sum()
}

/// Active label collection: each round the ensemble's most disputed
/// candidates on the policy's samples are labelled, join the pool, and
/// every member continues from its own last weights.
#[test]
fn selected_labels_join_the_pool_and_reward_models_continue() {
    let dir = TempDir::new("labels");
    let path = dir.write("labels.toml", LABEL_LOOP);
    let run = dir.join("runs/labels");
    let out = hone_tests::run_file(&dir.0, &path, &run, "2");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let seed = summed(&run, "seed_labels", "pairs", 0);
    assert!(seed > 0.0);
    // Every member instance sees every pair: the pool counts once per worker.
    assert_eq!(summed(&run, "rm", "pool", 0), 2.0 * seed);
    for round in 1..3u64 {
        assert_eq!(
            summed(&run, "select", "selected", round),
            5.0,
            "round {round}"
        );
        assert_eq!(summed(&run, "label", "pairs", round), 5.0, "round {round}");
        assert_eq!(
            summed(&run, "rm", "pool", round),
            2.0 * (seed + 5.0 * round as f64)
        );
        // The most disputed candidates are more disputed than the average.
        assert!(
            summed(&run, "select", "std_selected", round)
                >= summed(&run, "select", "std_all", round)
        );
    }
    let models: Vec<Value> = read_lines(&run.join("manifest.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["stage"] == "rm")
        .collect();
    assert_eq!(models.len(), 6, "2 members x 3 rounds");
    for m in &models {
        let round = m["round"].as_u64().unwrap();
        let id = m["id"].as_str().unwrap();
        let inputs = m["inputs"].as_array().unwrap();
        if round == 0 {
            assert_eq!(inputs.len(), 1, "{m}");
        } else {
            // sft, then the member's own model of the round before.
            let member = id.split('/').nth(1).unwrap();
            let last = format!("rm/{member}/model.safetensors@{}", round - 1);
            assert_eq!(inputs[1], last.as_str(), "{m}");
        }
    }
}
