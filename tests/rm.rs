//! End to end through the `hone` binary: reward-model ensembles across
//! workers, WARM merging and its refusal, preference strength, and the eval
//! stages scoring a reward model and best-of-n.

use hone_tests::{hone, metric, read_lines, text, TempDir};
use std::path::{Path, PathBuf};

/// World pairs with 25% flipped labels, shared by the pipelines below.
const WORLD: &str = r#"
[stages.prompts]
kind = "world.prompts"
config = { count = 40, split = "train" }

[stages.demos]
kind = "world.demos"
inputs = "prompts"
config = { quality = 0.5, samples = 4 }

[stages.label]
kind = "world.label"
inputs = "demos"
config = { flip_rate = 0.25 }
"#;

/// A tiny reward model: seconds, not minutes.
const TINY: &str = "d_model = 16, n_layers = 1, n_heads = 2, context = 64, steps = 8, batch_size = 8, eval_every = 0";

fn run(
    dir: &TempDir,
    name: &str,
    pipeline: &str,
    workers: &str,
) -> (PathBuf, std::process::Output) {
    let file = dir.write(&format!("{name}.toml"), pipeline);
    let run_dir = dir.join(name);
    let out = hone(
        &dir.0,
        &[
            "run",
            file.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--workers",
            workers,
            "-q",
        ],
    );
    (run_dir, out)
}

/// The workers that reported `name` for `stage`.
fn workers_of(run_dir: &Path, stage: &str, name: &str) -> Vec<u64> {
    let mut workers: Vec<u64> = read_lines(&run_dir.join("metrics.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == stage && v["name"] == name)
        .map(|v| v["worker"].as_u64().unwrap())
        .collect();
    workers.sort();
    workers.dedup();
    workers
}

#[test]
fn an_ensemble_trains_across_two_workers_and_warm_merges_it() {
    let dir = TempDir::new("rm-ensemble");
    let pipeline = format!(
        r#"[pipeline]
name = "ensemble"
seed = 5
{WORLD}
[stages.rm]
kind = "rm.train"
inputs = {{ pairs = "label" }}
config = {{ members = 2, lrs = [3e-3, 1e-3], dropouts = [0.0, 0.1], {TINY} }}

[stages.single]
kind = "rm.train"
inputs = {{ pairs = "label" }}
config = {{ members = 1, {TINY} }}

[stages.warm]
kind = "rm.warm"
inputs = {{ models = "rm", pairs = "label" }}
config = {{ truth = "gold" }}

[stages.scored]
kind = "rm.score"
inputs = {{ models = "warm", records = "label" }}

[stages.accuracy]
kind = "eval.rm-accuracy"
inputs = {{ pairs = "scored.pairs" }}
config = {{ set = "train_gold", truth = "gold" }}

[stages.strength]
kind = "rm.strength"
inputs = {{ models = "rm", pairs = "label" }}
config = {{ flip_below = 0.0 }}
"#
    );
    let (run_dir, out) = run(&dir, "ensemble", &pipeline, "2");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    // Member 0 on worker 0, member 1 on worker 1; the next per-member stage
    // starts where the ensemble left off, on worker 0 (2 members before it).
    assert_eq!(workers_of(&run_dir, "rm", "m0_train_loss"), vec![0]);
    assert_eq!(workers_of(&run_dir, "rm", "m1_train_loss"), vec![1]);
    assert_eq!(workers_of(&run_dir, "single", "m0_train_loss"), vec![0]);
    // The merged model is a reward model like any other: it scores pairs.
    let manifest = std::fs::read_to_string(run_dir.join("manifest.jsonl")).unwrap();
    assert!(
        manifest.contains("warm/warm/model.safetensors@0"),
        "{manifest}"
    );
    let accuracy = metric(&run_dir, "accuracy", "accuracy/train_gold").unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    // rm.warm measures the merged model on the same pairs itself.
    let warm = metric(&run_dir, "warm", "accuracy/warm").unwrap();
    assert!((warm - accuracy).abs() < 1e-9, "{warm} vs {accuracy}");
    let pairs = metric(&run_dir, "label", "pairs").unwrap();
    assert_eq!(metric(&run_dir, "strength", "pairs"), Some(pairs));
}

#[test]
fn one_member_stages_spread_over_workers() {
    let dir = TempDir::new("rm-spread");
    let pipeline = format!(
        r#"[pipeline]
name = "spread"
seed = 5
{WORLD}
[stages.a]
kind = "rm.train"
inputs = {{ pairs = "label" }}
config = {{ {TINY} }}

[stages.b]
kind = "rm.train"
inputs = {{ pairs = "label" }}
config = {{ {TINY} }}
"#
    );
    let (run_dir, out) = run(&dir, "spread", &pipeline, "2");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(workers_of(&run_dir, "a", "m0_train_loss"), vec![0]);
    assert_eq!(workers_of(&run_dir, "b", "m0_train_loss"), vec![1]);
}

#[test]
fn warm_refuses_reward_models_of_different_initialisations() {
    let dir = TempDir::new("rm-lineage");
    let pipeline = format!(
        r#"[pipeline]
name = "lineage"
seed = 5
{WORLD}
[stages.a]
kind = "rm.train"
inputs = {{ pairs = "label" }}
config = {{ init_seed = 1, {TINY} }}

[stages.b]
kind = "rm.train"
inputs = {{ pairs = "label" }}
config = {{ init_seed = 2, {TINY} }}

[stages.warm]
kind = "rm.warm"
inputs = {{ models = ["a", "b"] }}
"#
    );
    let (run_dir, out) = run(&dir, "lineage", &pipeline, "1");
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("warm"), "{stderr}");
    assert!(
        stderr.contains("a/member-0/model.safetensors@0")
            && stderr.contains("b/member-0/model.safetensors@0")
            && stderr.contains("initialisation"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing merged was written.
    assert!(!run_dir.join("outputs/warm/warm/model.safetensors").exists());
}
