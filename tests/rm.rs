//! End to end through the `hone` binary: reward-model ensembles across
//! workers, WARM merging and its refusal, preference strength, and the eval
//! stages scoring a reward model and best-of-n.

use hone_tests::{metric, read_lines, run_file, text, TempDir};
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
    let out = run_file(&dir.0, &file, &run_dir, workers);
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

/// A pipeline scoring the world's pairs with the reward model(s) `models`
/// names, and measuring accuracy against gold.
fn scoring(name: &str, models: &str) -> String {
    format!(
        r#"[pipeline]
name = "{name}"
seed = 5
{WORLD}
[stages.scored]
kind = "rm.score"
inputs = {{ models = "{models}", records = "label" }}

[stages.accuracy]
kind = "eval.rm-accuracy"
inputs = {{ pairs = "scored.pairs" }}
config = {{ set = "gold", truth = "gold" }}
"#
    )
}

fn load_stage(id: &str, path: &Path) -> String {
    format!(
        "\n[stages.{id}]\nkind = \"artifact.load\"\nconfig = {{ path = \"{}\" }}\n",
        path.display()
    )
}

#[test]
fn reward_models_from_earlier_runs_score_and_merge_without_retraining() {
    let dir = TempDir::new("rm-reuse");
    // Runs of one pipeline seed and init_seed start from one initialisation.
    let train = |name: &str, init_seed: u64, lr: f64| {
        let pipeline = format!(
            "{}\n[stages.rm]\nkind = \"rm.train\"\ninputs = {{ pairs = \"label\" }}\nconfig = {{ init_seed = {init_seed}, lrs = [{lr}], {TINY} }}\n",
            scoring(name, "rm")
        );
        let (run_dir, out) = run(&dir, name, &pipeline, "1");
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        run_dir
    };
    let first = train("first", 1, 1e-3);
    let trained = metric(&first, "accuracy", "accuracy/gold").unwrap();
    let ckpt = first.join("outputs/rm/member-0");

    // The same model on the same pairs, loaded instead of trained: the same accuracy.
    let reuse = format!("{}{}", scoring("reuse", "rm"), load_stage("rm", &ckpt));
    let (reuse_dir, out) = run(&dir, "reuse", &reuse, "1");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(
        metric(&reuse_dir, "accuracy", "accuracy/gold"),
        Some(trained)
    );
    assert!(metric(&reuse_dir, "rm", "m0_train_loss").is_none());
    let manifest = std::fs::read_to_string(reuse_dir.join("manifest.jsonl")).unwrap();
    assert!(
        manifest.contains("loaded rm/member-0/model.safetensors@0 from run")
            && manifest.contains("shared init: scratch:init_seed="),
        "lineage not carried over: {manifest}"
    );

    // WARM across runs: models of one initialisation merge, of another are refused.
    let second = train("second", 1, 3e-3);
    let other = train("other", 2, 1e-3);
    let merge = |name: &str, b: &Path| {
        let pipeline = format!(
            "{}{}{}\n[stages.warm]\nkind = \"rm.warm\"\ninputs = {{ models = [\"a\", \"b\"] }}\n",
            scoring(name, "warm"),
            load_stage("a", &ckpt),
            load_stage("b", &b.join("outputs/rm/member-0"))
        );
        run(&dir, name, &pipeline, "1")
    };
    let (merged, out) = merge("merged", &second);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(merged.join("outputs/warm/warm/model.safetensors").is_file());
    assert!(metric(&merged, "accuracy", "accuracy/gold").is_some());
    let (refused, out) = merge("refused", &other);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("initialisation"), "{err}");
    assert!(!refused.join("outputs/warm/warm/model.safetensors").exists());

    // A tampered checkpoint is refused before anything runs, naming both hashes.
    let model = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, &bytes).unwrap();
    let (tampered, out) = run(
        &dir,
        "tampered",
        &reuse.replace("\"reuse\"", "\"tampered\""),
        "1",
    );
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rejected config `path`") && err.contains("refusing to load it"),
        "{err}"
    );
    let recorded = read_lines(&first.join("manifest.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["id"] == "rm/member-0/model.safetensors@0")
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains(&recorded), "{err}");
    assert!(!tampered.exists());
}

#[test]
fn one_reader_takes_several_files_and_accuracy_is_reported_per_source() {
    let dir = TempDir::new("rm-sources");
    let pair = |i: usize, good: bool| {
        let (c, r) = if good {
            ("a good answer", "bad")
        } else {
            ("bad", "a good answer")
        };
        format!("{{\"prompt\": \"question {i}\", \"chosen\": \"{c} {i}\", \"rejected\": \"{r} {i}\"}}\n")
    };
    std::fs::create_dir_all(dir.join("held")).unwrap();
    dir.write(
        "held/a.jsonl",
        &(0..3).map(|i| pair(i, true)).collect::<String>(),
    );
    dir.write(
        "held/b.jsonl",
        &(3..5).map(|i| pair(i, false)).collect::<String>(),
    );
    dir.write("held/notes.txt", "not data");
    dir.write(
        "extra.jsonl",
        &(5..9).map(|i| pair(i, true)).collect::<String>(),
    );
    let pipeline = format!(
        r#"[pipeline]
name = "sources"

[stages.read]
kind = "jsonl.read-pairs"
config = {{ path = "held/a*.jsonl", paths = ["held/b*"], format = "trl" }}

[stages.other]
kind = "jsonl.read-pairs"
config = {{ path = "extra.jsonl", name = "expert", format = "trl" }}

[stages.rm]
kind = "rm.train"
inputs = {{ pairs = ["read", "other"] }}
config = {{ {TINY} }}

[stages.scored]
kind = "rm.score"
inputs = {{ models = "rm", records = ["read", "other"] }}

[stages.accuracy]
kind = "eval.rm-accuracy"
inputs = {{ pairs = "scored.pairs" }}
config = {{ set = "held", split_by = "source" }}
"#
    );
    let (run_dir, out) = run(&dir, "sources", &pipeline, "2");
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let m = |name: &str| metric(&run_dir, "accuracy", name);
    assert_eq!(m("pairs/held_a.jsonl"), Some(3.0));
    assert_eq!(m("pairs/held_b.jsonl"), Some(2.0));
    assert_eq!(m("pairs/held_expert"), Some(4.0));
    // The overall accuracy is the pair-weighted mean of the sources'.
    let weighted = (3.0 * m("accuracy/held_a.jsonl").unwrap()
        + 2.0 * m("accuracy/held_b.jsonl").unwrap()
        + 4.0 * m("accuracy/held_expert").unwrap())
        / 9.0;
    assert!((m("accuracy/held").unwrap() - weighted).abs() < 1e-9);
    // Every pair says where it came from.
    let reader = read_lines(&run_dir.join("metrics.jsonl"))
        .iter()
        .filter(|l| l.contains("\"stage\":\"read\"") && l.contains("\"name\":\"read\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["value"]
                .as_f64()
                .unwrap()
        })
        .sum::<f64>();
    assert_eq!(reader, 5.0);
    // A glob that matches nothing is refused at its line, before anything runs.
    let bad = pipeline.replace("held/a*.jsonl", "held/*.csv");
    let (bad_dir, out) = run(&dir, "nomatch", &bad, "1");
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(":6:") && err.contains("matches `*.csv`"),
        "{err}"
    );
    assert!(!bad_dir.exists());
}
