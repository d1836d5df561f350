//! Results pinned per stage family: seeded runs whose counts and accuracies
//! must not move when the code is reorganised. Every figure below was first
//! measured on the code before the typed-records change (commit 60aef9f) and
//! again after it, on one worker and on two: totals over workers agree
//! exactly. A deliberate change of results updates them, and says so.

use hone_tests::{run_file, text, workspace, TempDir};
use std::collections::BTreeMap;
use std::path::Path;

/// Runs `pipeline` (relative to the workspace) on `workers` workers and
/// returns every metric summed over workers, by `stage.name@step`.
fn totals(pipeline: &str, workers: &str) -> BTreeMap<String, f64> {
    let dir = TempDir::new("pinned");
    let run_dir = dir.join("run");
    let out = run_file(&dir.0, &workspace().join(pipeline), &run_dir, workers);
    assert_eq!(out.status.code(), Some(0), "{pipeline}: {:?}", text(&out));
    sum_metrics(&run_dir)
}

fn sum_metrics(run_dir: &Path) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for line in hone_tests::read_lines(&run_dir.join("metrics.jsonl")) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let step = v["step"]
            .as_u64()
            .map(|s| format!("@{s}"))
            .unwrap_or_default();
        let key = format!(
            "{}.{}{step}",
            v["stage"].as_str().unwrap(),
            v["name"].as_str().unwrap()
        );
        *totals.entry(key).or_insert(0.0) += v["value"].as_f64().unwrap();
    }
    totals
}

fn assert_pinned(got: &BTreeMap<String, f64>, pinned: &[(&str, f64)], places: i32) {
    let scale = 10f64.powi(places);
    for (key, want) in pinned {
        let value = got.get(*key).unwrap_or_else(|| panic!("no metric {key}"));
        assert_eq!(
            (value * scale).round() / scale,
            (want * scale).round() / scale,
            "{key}: {value} (pinned {want})"
        );
    }
}

#[test]
fn filter_family_keeps_and_drops_the_same_pairs() {
    for workers in ["1", "2"] {
        let got = totals("pipelines/hh-filter.toml", workers);
        assert_pinned(
            &got,
            &[
                ("read.read", 2307.0),
                ("read.skipped", 5.0),
                ("filter.kept", 2295.0),
                ("filter.dropped_identical", 3.0),
                ("filter.dropped_response_length", 9.0),
                ("filter.position_swapped", 1145.0),
                ("write.written", 2295.0),
            ],
            0,
        );
    }
}

#[test]
fn world_family_labels_the_same_pairs() {
    let got = totals("pipelines/world-labels.toml", "2");
    assert_pinned(
        &got,
        &[
            ("prompts.prompts", 300.0),
            ("demos.demos", 1200.0),
            ("label.pairs", 1350.0),
            ("label.flipped", 311.0),
            ("label.clean_agreement", 992.0),
            ("label.length_decided", 34.0),
            ("label.position_decided", 77.0),
            ("gold.gold_reward_sum", 910.517_624_733_9),
        ],
        3,
    );
}

#[test]
fn rm_and_eval_families_give_the_same_accuracies() {
    let got = totals("tests/pinned/rm.toml", "2");
    assert_pinned(
        &got,
        &[
            ("label.pairs", 207.0),
            ("label.flipped", 46.0),
            ("strength.flipped", 90.0),
            ("strength.smoothed", 134.0),
            ("rm.m0_eval_accuracy@10", 0.45),
            ("rm.m0_eval_accuracy@20", 0.4),
            ("denoised.m0_eval_accuracy@10", 0.9),
            ("denoised.m0_eval_accuracy@20", 0.9),
            ("accuracy.accuracy/gold", 0.614_286),
        ],
        3,
    );
}

#[test]
fn lm_family_trains_and_samples_the_same() {
    let got = totals("tests/pinned/lm.toml", "2");
    assert_pinned(
        &got,
        &[
            ("sft.eval_loss@0", 5.560_043),
            ("sft.eval_loss@15", 4.713_23),
            ("sft.eval_loss@30", 3.492_958),
            ("rollout.completions", 60.0),
            ("logprobs.completions", 60.0),
            ("rewards.completions@0", 60.0),
        ],
        3,
    );
}
