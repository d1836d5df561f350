//! The quickstart pipeline end to end through the `hone` binary, shrunk with
//! `--set` so that it runs in seconds: real HH-RLHF pairs, SFT from scratch,
//! rollout on two workers, samples written with log-probabilities.

use hone_tests::{hone, read_lines, text, workspace, TempDir};

#[test]
fn quickstart_trains_a_policy_and_writes_samples_with_logprobs() {
    let root = workspace();
    let dir = TempDir::new("quickstart");
    let run_dir = dir.join("run");
    let pipeline = root.join("pipelines/quickstart.toml");
    let mut args = vec![
        "run",
        pipeline.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--workers",
        "2",
    ];
    for set in [
        "read.limit=300",
        "sft.steps=30",
        "sft.d_model=32",
        "sft.n_layers=1",
        "sft.context=64",
        "sft.warmup=5",
        "sft.lr=0.01",
        "sft.eval_every=10",
        "sft.checkpoint_every=15",
        "rollout.max_new_tokens=16",
    ] {
        args.extend(["--set", set]);
    }
    let out = hone(&root, &args);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));

    let metrics: Vec<serde_json::Value> = read_lines(&run_dir.join("metrics.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let series = |name: &str| -> Vec<f64> {
        metrics
            .iter()
            .filter(|m| m["stage"] == "sft" && m["name"] == name)
            .map(|m| m["value"].as_f64().unwrap())
            .collect()
    };
    let train = series("train_loss");
    assert_eq!(train.len(), 30);
    let last5 = train[25..].iter().sum::<f64>() / 5.0;
    assert!(last5 < train[0] * 0.8, "train loss {} -> {last5}", train[0]);
    let eval = series("eval_loss");
    assert!(eval.last().unwrap() < &eval[0], "eval loss {eval:?}");

    // ckpt-15 and final are registered as policies.
    let manifest = read_lines(&run_dir.join("manifest.jsonl")).join("\n");
    assert!(
        manifest.contains("outputs/sft/ckpt-15/model.safetensors"),
        "{manifest}"
    );
    assert!(
        manifest.contains("outputs/sft/final/model.safetensors"),
        "{manifest}"
    );

    let samples = read_lines(&run_dir.join("outputs/samples/samples.jsonl"));
    assert_eq!(samples.len(), 16, "8 prompts x 2 samples");
    for line in &samples {
        let c: serde_json::Value = serde_json::from_str(line).unwrap();
        let logprobs = c["token_logprobs"].as_array().unwrap();
        let new_tokens: usize = c["meta"]["new_tokens"].as_str().unwrap().parse().unwrap();
        assert!(
            !logprobs.is_empty() && logprobs.len() == new_tokens,
            "{line}"
        );
        assert!(
            logprobs.iter().all(|lp| lp.as_f64().unwrap() <= 0.0),
            "{line}"
        );
        let policy = c["policy"]["path"].as_str().unwrap();
        assert_eq!(policy, "outputs/sft/final/model.safetensors", "{line}");
    }
}

#[test]
fn rollout_from_pretrained_smollm2_answers_and_records_logprobs() {
    let dir = TempDir::new("smollm-rollout");
    dir.write(
        "prompts.jsonl",
        "{\"prompt\": \"What is the capital of France?\"}\n",
    );
    let p = dir.write(
        "p.toml",
        r#"[stages.prompts]
kind = "jsonl.read-prompts"
config = { path = "prompts.jsonl" }

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts" }
config = { pretrained = "smollm2-135m-instruct", temperature = 0.0, max_new_tokens = 12 }

[stages.write]
kind = "jsonl.write"
inputs = ["rollout"]
"#,
    );
    let out = hone(&dir.0, &["run", p.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let lines = read_lines(&dir.join("runs/p/outputs/write/records.jsonl"));
    assert_eq!(lines.len(), 1);
    let c: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(c["text"].as_str().unwrap().contains("Paris"), "{c}");
    let logprobs = c["token_logprobs"].as_array().unwrap();
    assert!(!logprobs.is_empty() && logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert_eq!(c["meta"]["pretrained"], "smollm2-135m-instruct");
}
