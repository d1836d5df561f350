//! End to end: the simulated preference world through the `hone` binary.
//! Prompts, noisy demonstrations, simulated labels: the same pairs with one
//! worker and with two, each carrying its ground truth.

use hone_tests::{hone, metric, read_lines, text, TempDir};

const PIPELINE: &str = r#"[pipeline]
name = "world-labels"
seed = 3

[stages.prompts]
kind = "world.prompts"
config = { count = 60, split = "train" }

[stages.demos]
kind = "world.demos"
inputs = ["prompts"]
config = { quality = 0.7, samples = 4 }

[stages.label]
kind = "world.label"
inputs = ["demos"]
config = { flip_rate = 0.25, position_bias = 0.1, length_bias = 0.1, annotators = 3, annotator_spread = 0.5 }

[stages.write]
kind = "jsonl.write"
inputs = { records = "label.pairs" }
config = { file = "pairs.jsonl" }
"#;

fn labelled_pairs(dir: &TempDir, workers: &str) -> Vec<String> {
    let pipeline = dir.write("world.toml", PIPELINE);
    let run_dir = dir.join(&format!("w{workers}"));
    let out = hone(
        &dir.0,
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--workers",
            workers,
            "-q",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let lines = read_lines(&run_dir.join("outputs/write/pairs.jsonl"));
    assert_eq!(metric(&run_dir, "label", "pairs"), Some(lines.len() as f64));
    lines
}

#[test]
fn world_labels_are_the_same_on_one_and_two_workers_and_keep_ground_truth() {
    let dir = TempDir::new("world");
    let one = labelled_pairs(&dir, "1");
    let two = labelled_pairs(&dir, "2");
    // 60 prompts, 4 demos each: at most 6 pairs a prompt, fewer where demos coincide.
    assert!(one.len() > 60 && one.len() <= 360, "{}", one.len());
    assert_eq!(one, two);
    let mut flipped = 0;
    for line in &one {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let pair = &v;
        assert_eq!(pair["label_source"], "simulated", "{line}");
        let meta = &pair["meta"];
        for key in ["gold_chosen", "gold_rejected"] {
            assert!(pair[key].is_f64(), "{key} missing in {line}");
        }
        for key in ["clean_label", "flipped", "annotator", "bias"] {
            assert!(meta.get(key).is_some(), "{key} missing in {line}");
        }
        let gold = |k: &str| pair[k].as_f64().unwrap();
        let clean = gold("gold_chosen") >= gold("gold_rejected");
        assert_eq!(meta["clean_label"], clean.to_string(), "{line}");
        flipped += usize::from(meta["flipped"] == "true");
    }
    assert!(
        flipped > 0 && flipped < one.len() / 2,
        "{flipped} of {}",
        one.len()
    );
}
