//! Policy learners end to end through the `hone` binary: SFT, then DPO on
//! the simulated world's noisy pairs, then sampling from the DPO policy and
//! scoring it with the gold reward.

use hone_tests::{hone, metric, read_lines, text, TempDir};

const PIPELINE: &str = r#"[pipeline]
name = "dpo"
seed = 4

[stages.prompts]
kind = "world.prompts"
config = { count = 40, split = "train" }

[stages.demos]
kind = "world.demos"
inputs = "prompts"
config = { quality = 0.8, samples = 1, tag = "sft" }

[stages.sft]
kind = "lm.sft"
inputs = "demos"
config = { d_model = 32, n_layers = 1, n_heads = 2, context = 64, steps = 20, batch_size = 8, eval_every = 0, checkpoint_every = 0 }

[stages.candidates]
kind = "world.demos"
inputs = "prompts"
config = { quality = 0.5, samples = 3 }

[stages.label]
kind = "world.label"
inputs = "candidates"
config = { flip_rate = 0.1 }

[stages.dpo]
kind = "lm.dpo"
inputs = { pairs = "label", policy = "sft.policy" }
config = { steps = 20, batch_size = 8, lr = 3e-3, beta = 0.2, eval_every = 10 }

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "dpo.policy" }
config = { n = 2, max_new_tokens = 16 }

[stages.gold]
kind = "world.gold"
inputs = "rollout"

[stages.write]
kind = "jsonl.write"
inputs = "rollout"
"#;

#[test]
fn dpo_trains_the_sft_policy_and_rollout_samples_from_it() {
    let dir = TempDir::new("dpo");
    let path = dir.write("dpo.toml", PIPELINE);
    let out = hone(
        &dir.0,
        &["run", path.to_str().unwrap(), "-q", "--workers", "2"],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let run = dir.join("runs/dpo");
    let pairs = metric(&run, "dpo", "pairs").unwrap();
    assert_eq!(Some(pairs), metric(&run, "label", "pairs"));
    // Its metrics, under TRL's names, at every step.
    let series = |name: &str| -> Vec<f64> {
        read_lines(&run.join("metrics.jsonl"))
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "dpo" && v["name"] == name)
            .map(|v| v["value"].as_f64().unwrap())
            .collect()
    };
    for name in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "log_ratio",
    ] {
        assert_eq!(series(name).len(), 20, "{name}");
    }
    let loss = series("loss");
    assert!(
        loss[15..].iter().sum::<f64>() < loss[..5].iter().sum::<f64>(),
        "{loss:?}"
    );
    // The DPO policy's lineage names where it came from, and rollout uses it.
    let manifest = std::fs::read_to_string(run.join("manifest.jsonl")).unwrap();
    assert!(
        manifest.contains(
            "dpo from sft/final/model.safetensors@0, reference sft/final/model.safetensors@0"
        ),
        "{manifest}"
    );
    let samples = read_lines(&run.join("outputs/write/records.jsonl"));
    assert_eq!(samples.len(), 80);
    for s in &samples {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        assert_eq!(v["policy"]["id"], "dpo/final/model.safetensors@0", "{s}");
    }
    assert_eq!(
        metric(&run, "gold", "scored").unwrap() + metric(&run, "gold", "skipped").unwrap(),
        80.0
    );
}

const LOOP: &str = r#"[pipeline]
name = "grpo"
rounds = 3
seed = 2

[stages.demos]
kind = "testing.generate-pairs"
config = { count = 32 }

[stages.sft]
kind = "lm.sft"
inputs = "demos"
config = { d_model = 32, n_layers = 1, n_heads = 2, context = 64, steps = 10, batch_size = 8, eval_every = 0, checkpoint_every = 0 }

[stages.prompts]
kind = "world.prompts"
config = { count = 6, split = "train" }

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "grpo.policy" }
config = { n = 4, max_new_tokens = 12 }

[stages.ref]
kind = "lm.logprobs"
inputs = { completions = "rollout", reference = "sft.policy" }
config = { max_new_tokens = 12 }

[stages.gold]
kind = "world.gold"
inputs = "ref"

[stages.grpo]
kind = "lm.grpo"
inputs = { completions = "ref", scores = "gold", policy = "sft.policy" }
feedback = { policy = "grpo.policy" }
config = { score = "gold_reward", max_new_tokens = 12, lr = 1e-3 }

[stages.write]
kind = "jsonl.write"
inputs = "rollout"
"#;

#[test]
fn grpo_closes_the_loop_over_three_rounds() {
    let dir = TempDir::new("grpo");
    let path = dir.write("grpo.toml", LOOP);
    let out = hone(
        &dir.0,
        &["run", path.to_str().unwrap(), "-q", "--workers", "2"],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let run = dir.join("runs/grpo");
    assert_eq!(read_lines(&run.join("journal.jsonl")).len(), 3);
    // Round t samples from the policy round t - 1 produced (SFT in round 0).
    for (round, file, policy) in [
        (
            0,
            "outputs/write/records.jsonl",
            "sft/final/model.safetensors@0",
        ),
        (
            1,
            "outputs/write/round-1/records.jsonl",
            "grpo/final/model.safetensors@0",
        ),
        (
            2,
            "outputs/write/round-2/records.jsonl",
            "grpo/final/model.safetensors@1",
        ),
    ] {
        let samples = read_lines(&run.join(file));
        assert_eq!(samples.len(), 24, "round {round}");
        for s in &samples {
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            assert_eq!(v["policy"]["id"], policy, "round {round}: {s}");
        }
    }
    // Each round's update reports its reward and KL to the SFT reference.
    let per_round = |name: &str| -> Vec<f64> {
        read_lines(&run.join("metrics.jsonl"))
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "grpo" && v["name"] == name)
            .map(|v| v["value"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(per_round("groups"), [6.0, 6.0, 6.0]);
    let kl = per_round("kl");
    assert_eq!(kl.len(), 3);
    assert!(kl.iter().all(|k| *k >= 0.0), "k3 is never negative: {kl:?}");
    let manifest = std::fs::read_to_string(run.join("manifest.jsonl")).unwrap();
    assert!(
        manifest.contains("grpo from grpo/final/model.safetensors@0"),
        "{manifest}"
    );
}

/// A PPO loop and an RLOO loop side by side, from one SFT policy.
const TWO_LOOPS: &str = r#"[pipeline]
name = "rl"
rounds = 3
seed = 7

[stages.demos]
kind = "testing.generate-pairs"
config = { count = 32 }

[stages.sft]
kind = "lm.sft"
inputs = "demos"
config = { d_model = 32, n_layers = 1, n_heads = 2, context = 64, steps = 10, batch_size = 8, eval_every = 0, checkpoint_every = 0 }

[stages.prompts]
kind = "world.prompts"
config = { count = 6, split = "train" }

[stages.rollout_ppo]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "ppo.policy" }
config = { n = 2, max_new_tokens = 12 }

[stages.ref_ppo]
kind = "lm.logprobs"
inputs = { completions = "rollout_ppo", reference = "sft.policy" }
config = { max_new_tokens = 12 }

[stages.gold_ppo]
kind = "world.gold"
inputs = "ref_ppo"

[stages.ppo]
kind = "lm.ppo"
inputs = { completions = "ref_ppo", scores = "gold_ppo", policy = "sft.policy", reference = "sft.policy" }
feedback = { policy = "ppo.policy" }
config = { score = "gold_reward", max_new_tokens = 12, lr = 1e-3, epochs = 2, batch_size = 4, target_kl = 1.0, horizon = 100.0 }

[stages.rollout_rloo]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "rloo.policy" }
config = { n = 4, max_new_tokens = 12 }

[stages.ref_rloo]
kind = "lm.logprobs"
inputs = { completions = "rollout_rloo", reference = "sft.policy" }
config = { max_new_tokens = 12 }

[stages.gold_rloo]
kind = "world.gold"
inputs = "ref_rloo"

[stages.rloo]
kind = "lm.grpo"
inputs = { completions = "ref_rloo", scores = "gold_rloo", policy = "sft.policy" }
feedback = { policy = "rloo.policy" }
config = { baseline = "rloo", score = "gold_reward", max_new_tokens = 12, lr = 1e-3 }
"#;

/// The sha256 of every policy and critic the run registered, by id.
fn learned(run: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    read_lines(&run.join("manifest.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| ["ppo", "rloo"].contains(&v["stage"].as_str().unwrap_or("")))
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// PPO and RLOO over three rounds: each round's policy feeds the next
/// rollout, and 1 worker and 2 workers learn the same weights.
#[test]
fn ppo_and_rloo_loops_learn_the_same_policies_on_one_and_two_workers() {
    let dir = TempDir::new("two-loops");
    let path = dir.write("rl.toml", TWO_LOOPS);
    let mut runs = Vec::new();
    for workers in ["1", "2"] {
        let run = dir.join(&format!("runs/w{workers}"));
        let out = hone_tests::run_file(&dir.0, &path, &run, workers);
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        runs.push(learned(&run));
    }
    let ids: Vec<&String> = runs[0].keys().collect();
    for id in [
        "ppo/final/model.safetensors@2",
        "ppo/critic/model.safetensors@2",
        "rloo/final/model.safetensors@2",
    ] {
        assert!(runs[0].contains_key(id), "{id} not in {ids:?}");
    }
    assert_eq!(runs[0], runs[1], "1 worker and 2 workers differ");
    // The weights moved each round.
    let ppo: std::collections::BTreeSet<&String> = (0..3)
        .map(|r| &runs[0][&format!("ppo/final/model.safetensors@{r}")])
        .collect();
    assert_eq!(ppo.len(), 3);
    let run = dir.join("runs/w2");
    let per_round = |name: &str| -> Vec<f64> {
        read_lines(&run.join("metrics.jsonl"))
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "ppo" && v["name"] == name && v["step"].is_null())
            .map(|v| v["value"].as_f64().unwrap())
            .collect()
    };
    // Round 0 samples the reference itself: every KL is 0 there.
    let exact = per_round("kl_exact");
    assert_eq!(exact.len(), 3);
    assert!(exact[0].abs() < 1e-4, "{exact:?}");
    assert!(
        exact[1] > 1e-4 && exact[2] > 1e-4,
        "the policy moved: {exact:?}"
    );
    let beta = per_round("beta");
    // Round 0's KL is 0, so the error is clipped at -0.2: 12 samples over a
    // horizon of 100 take 2.4% off beta.
    assert_eq!(beta[0], 0.05);
    assert_eq!(beta[1], 0.05 * (1.0 - 0.2 * 12.0 / 100.0), "{beta:?}");
}
