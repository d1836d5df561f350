//! `--resume` continues a crashed run where it stopped: every stage is
//! restored from its snapshot of the last completed round, the records the
//! feedback edges carried are replayed, and the finished rounds are not
//! redone. The artifacts equal those of a run that never stopped.

use hone_tests::{hone_bin, read_lines, text, TempDir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

/// An online DPO loop, a PPO loop, and an RM loop that keeps learning from
/// selected labels, 5 rounds (the reward models learn seed labels in round 0, the
/// policy samples from round 1); `crash` (armed by HONE_TEST_CRASH) calls
/// exit() when round 3's DPO policy arrives.
const LOOP: &str = r#"[pipeline]
name = "resume"
rounds = 5
seed = 21

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

[stages.rm]
kind = "rm.train"
inputs = { pairs = ["seed_labels", "label"], init = "sft.policy" }
config = { members = 2, init = "input", train_on = "all", start = "last", steps = 5, batch_size = 8, eval_every = 0 }

[stages.prompts]
kind = "world.prompts"
config = { count = 12, seed = 3, first_round = 1, per_round = "same" }

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "dpo.policy" }
config = { n = 3, max_new_tokens = 12 }

[stages.proxy]
kind = "rm.score"
inputs = { records = "rollout" }
feedback = { models = "rm.models" }

[stages.pairs]
kind = "filter.pair-completions"
inputs = { completions = "rollout", scores = "proxy.scores" }

[stages.dpo]
kind = "lm.dpo"
inputs = { pairs = "pairs", policy = "sft.policy", reference = "sft.policy" }
feedback = { policy = "dpo.policy" }
config = { steps = 4, batch_size = 4, lr = 1e-3, rpo_alpha = 1.0, eval_fraction = 0.0, eval_every = 0 }

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

[stages.warm]
kind = "rm.warm"
inputs = { models = "rm" }

[stages.gold]
kind = "world.gold"
inputs = "rollout"

[stages.elo]
kind = "eval.elo"
inputs = { completions = "gold.completions" }
config = { across_rounds = true, method = "bt", bootstrap = 10 }

# PPO, which keeps its policy, AdamW moments, critic and KL controller in
# memory from round to round.
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
config = { score = "gold_reward", max_new_tokens = 12, lr = 1e-3, epochs = 1, batch_size = 8, target_kl = 1.0, horizon = 100.0 }

[stages.crash]
kind = "testing.fault"
inputs = "dpo"
config = { mode = "exit", after = 2, only_if_env = "HONE_TEST_CRASH" }
"#;

fn run(dir: &Path, file: &Path, run_dir: &Path, extra: &[&str], crash: bool) -> Output {
    let mut cmd = Command::new(hone_bin());
    cmd.args([
        "run",
        file.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--workers",
        "2",
        "-q",
    ])
    .args(extra)
    .current_dir(dir)
    .env_remove("HONE_PLUGIN_PATH")
    .env_remove("HONE_TEST_CRASH");
    if crash {
        cmd.env("HONE_TEST_CRASH", "1");
    }
    cmd.output().expect("hone runs")
}

/// Every artifact the run registered: id -> sha256.
fn artifacts(run_dir: &Path) -> BTreeMap<String, String> {
    read_lines(&run_dir.join("manifest.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn journal(run_dir: &Path) -> Vec<Value> {
    read_lines(&run_dir.join("journal.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The last round's metric `name` of `stage` (worker 0).
fn last_metric(run_dir: &Path, stage: &str, name: &str) -> Option<f64> {
    read_lines(&run_dir.join("metrics.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["stage"] == stage && v["name"] == name && v["round"] == 4)
        .map(|v| v["value"].as_f64().unwrap())
        .next_back()
}

#[test]
fn a_crashed_loop_resumes_from_its_last_round_and_ends_as_if_it_never_stopped() {
    let dir = TempDir::new("resume");
    let file = dir.write("loop.toml", LOOP);
    let whole = dir.join("runs/whole");
    let out = run(&dir.0, &file, &whole, &[], false);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let expected = artifacts(&whole);
    assert_eq!(journal(&whole).len(), 5);
    assert!(last_metric(&whole, "elo", "games").unwrap() > 0.0);
    // Exit in round 2 (the fault trips once it has seen `after` DPO
    // policies, one a round from round 1), and in round 4, the last: the
    // feedback records of round 3 must be replayed into it too.
    for after in [2, 4] {
        let crashed = dir.join(&format!("runs/crashed-{after}"));
        let file = dir.write(
            &format!("loop-{after}.toml"),
            &LOOP.replace("after = 2", &format!("after = {after}")),
        );
        let out = run(&dir.0, &file, &crashed, &[], true);
        assert_eq!(
            out.status.code(),
            Some(1),
            "the injected exit: {:?}",
            text(&out)
        );
        let done = journal(&crashed);
        assert!(!done.is_empty() && done.len() < 5, "{done:?}");
        let last = done.len() as u64 - 1;
        // The journal names each snapshot with its sha256.
        let snapshots = done[last as usize]["snapshots"].as_object().unwrap();
        for key in [
            "/dpo/worker-0.state",
            "/dpo/worker-0.feedback",
            "/rm/worker-1.state",
            "/ppo/worker-0.state",
        ] {
            assert!(
                snapshots.keys().any(|k| k.contains(key)),
                "{key}: {snapshots:?}"
            );
        }
        let interrupted = crashed.join(format!("outputs/dpo/round-{}", last + 1));
        let had_interrupted = interrupted.exists();

        let out = run(&dir.0, &file, &crashed, &["--resume"], false);
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        let rounds = journal(&crashed);
        assert_eq!(
            rounds
                .iter()
                .map(|v| v["round"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        // The completed rounds were not redone: their journal lines are the
        // crashed attempt's own.
        for r in 0..=last as usize {
            assert_eq!(rounds[r]["time"], done[r]["time"], "round {r} ran again");
        }
        // Bit for bit the artifacts of the run that never stopped.
        let got = artifacts(&crashed);
        assert_eq!(
            got.len(),
            expected.len(),
            "{:?}",
            got.keys().collect::<Vec<_>>()
        );
        for (id, sha) in &expected {
            assert_eq!(got.get(id), Some(sha), "crash after {after}: {id}");
        }
        // State beyond the artifacts came back too: the Elo table of every round.
        assert_eq!(
            last_metric(&crashed, "elo", "games"),
            last_metric(&whole, "elo", "games")
        );
        // The crashed attempt's logs, and what its interrupted round wrote, are kept.
        assert!(crashed.join("attempts/0/metrics.jsonl").is_file());
        if had_interrupted {
            assert!(crashed
                .join(format!("attempts/0/outputs/dpo/round-{}", last + 1))
                .is_dir());
        }
        // Snapshots of all but the newest completed rounds are deleted, and
        // the last round saves none: round 3's remain.
        let mut kept: Vec<String> = std::fs::read_dir(crashed.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["round-3"]);
    }
}

#[test]
fn a_corrupt_snapshot_or_a_changed_pipeline_is_refused_by_name() {
    let dir = TempDir::new("resume-refused");
    let file = dir.write("loop.toml", LOOP);
    let run_dir = dir.join("runs/r");
    let out = run(&dir.0, &file, &run_dir, &[], true);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    let done = journal(&run_dir);
    let last = done.last().unwrap();
    let (rel, _) = last["snapshots"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.ends_with("dpo/worker-0.state"))
        .unwrap();
    // A changed pipeline mixes two in one run.
    let out = run(
        &dir.0,
        &file,
        &run_dir,
        &["--resume", "--set", "dpo.lr=0.01"],
        false,
    );
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not the one the run started with"), "{err}");
    // So do other workers.
    let mut cmd = Command::new(hone_bin());
    let out = cmd
        .args([
            "run",
            file.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--resume",
            "-q",
        ])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--workers 2"), "{err}");
    // A flipped byte in a snapshot.
    let path = run_dir.join(rel);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let out = run(&dir.0, &file, &run_dir, &["--resume"], false);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(rel.as_str()) && err.contains("does not match the sha256"),
        "{err}"
    );
    // Nothing moved or changed: the journal is as the crash left it.
    assert_eq!(journal(&run_dir), done);
    assert!(!run_dir.join("attempts").exists());
}
