//! End-to-end tests of the `hone` command: the CLI contract, validation
//! errors, failures, the dataflow across workers and processes, and
//! out-of-tree plugins.

use hone_tests::{
    assert_invalid, expect, hone, metric, read_lines, text, workspace, TempDir, GOOD,
};
use std::path::Path;

#[test]
fn valid_pipeline_validates() {
    let dir = TempDir::new("valid");
    let path = dir.write("p.toml", GOOD);
    let out = hone(&dir.0, &["validate", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

#[test]
fn every_bundled_pipeline_validates() {
    let root = workspace();
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = hone(&root, &["validate", path.to_str().unwrap()]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}: {:?}",
                path.display(),
                text(&out)
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn toml_syntax_error_is_located() {
    assert_invalid(
        "[pipeline]\nname = \"x\"\nrounds = = 2\n",
        "3:10",
        &["TOML syntax error"],
    );
}

#[test]
fn unknown_keys_are_located_with_known_keys() {
    let p = GOOD.replace(
        "kind = \"filter.pairs\"",
        "kind = \"filter.pairs\"\ninptus = [\"gen\"]",
    );
    assert_invalid(
        &p,
        "10:1",
        &[
            "unknown key `inptus`",
            "did you mean `inputs`",
            "known keys",
        ],
    );
    let p = GOOD.replace(
        "config = { count = 50 }",
        "config = { count = 50, cuont = 3 }",
    );
    assert_invalid(
        &p,
        "6:24",
        &[
            "unknown config key `cuont`",
            "testing.generate-pairs",
            "count",
        ],
    );
}

#[test]
fn wrong_value_types_name_field_and_value() {
    let p = GOOD.replace("name = \"gen\"", "name = \"gen\"\nrounds = \"three\"");
    assert_invalid(
        &p,
        "3:10",
        &["pipeline.rounds", "non-negative integer", "\"three\""],
    );
    // rounds = 0 (until stopped) is valid; `hone run` refuses it (tests/serve.rs).
    let p = GOOD.replace("name = \"gen\"", "name = \"gen\"\nrounds = -1");
    assert_invalid(&p, "3:10", &["pipeline.rounds", "-1"]);
    let p = GOOD.replace("count = 50", "count = 5.5");
    assert_invalid(
        &p,
        "6:20",
        &["stages.gen.config.count", "must be an integer", "5.5"],
    );
}

#[test]
fn unknown_stage_kind_lists_known_kinds() {
    let p = GOOD.replace("kind = \"filter.pairs\"", "kind = \"filter.pears\"");
    assert_invalid(
        &p,
        "9:8",
        &[
            "unknown stage kind \"filter.pears\"",
            "did you mean \"filter.pairs\"",
            "jsonl.write",
        ],
    );
}

#[test]
fn input_naming_no_stage() {
    let p = GOOD.replace("inputs = [\"gen\"]", "inputs = [\"generate\"]");
    assert_invalid(
        &p,
        "10:11",
        &[
            "`generate`, which does not exist",
            "stages: filter, gen, write",
        ],
    );
}

#[test]
fn port_type_mismatch() {
    let p = r#"[stages.prompts]
kind = "jsonl.read-prompts"
config = { path = "p.toml" }

[stages.filter]
kind = "filter.pairs"
inputs = { pairs = "prompts.prompts" }
"#;
    assert_invalid(
        p,
        "7:20",
        &[
            "port type mismatch",
            "carries Prompt",
            "takes PreferencePair",
        ],
    );
}

#[test]
fn cycle_without_feedback_edge() {
    let p = r#"[stages.a]
kind = "filter.pairs"
inputs = ["b"]

[stages.b]
kind = "filter.pairs"
inputs = ["a"]
"#;
    assert_invalid(
        p,
        "7:11",
        &["cycle without a feedback edge", "a -> b -> a", "feedback"],
    );
}

#[test]
fn config_schema_errors() {
    let p = GOOD.replace(
        "inputs = [\"gen\"]",
        "inputs = [\"gen\"]\nconfig = { dedup = \"fuzzy\" }",
    );
    assert_invalid(
        &p,
        "11:20",
        &[
            "stages.filter.config.dedup",
            "\"fuzzy\" is not allowed",
            "\"near\"",
        ],
    );
    let p = "[stages.read]\nkind = \"jsonl.read-pairs\"\n";
    assert_invalid(p, "1:9", &["needs config `path`"]);
}

#[test]
fn config_rejected_by_the_stage_is_located() {
    // Valid for the schema, refused by the stage itself (a bad regex).
    let p = GOOD.replace(
        "inputs = [\"gen\"]",
        "inputs = [\"gen\"]\nconfig = { blocklist = [\"(\"] }",
    );
    let dir = TempDir::new("regex");
    let path = dir.write("p.toml", &p);
    let out = hone(&dir.0, &["run", path.to_str().unwrap()]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{}:11:24: ", path.display())),
        "{err}"
    );
    assert!(err.contains("invalid regular expression"), "{err}");
}

#[test]
fn set_overrides_config_and_reports_bad_values() {
    let dir = TempDir::new("set");
    let path = dir.write("p.toml", GOOD);
    let p = path.to_str().unwrap();
    let out = hone(
        &dir.0,
        &[
            "run",
            p,
            "--set",
            "gen.count=7",
            "--set",
            "pipeline.seed=3",
            "--quiet",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let run = dir.join("runs/gen");
    assert_eq!(metric(&run, "write", "written"), Some(7.0));
    let resolved = std::fs::read_to_string(run.join("pipeline.toml")).unwrap();
    assert!(
        resolved.contains("count = 7") && resolved.contains("seed = 3"),
        "{resolved}"
    );

    let out = hone(&dir.0, &["validate", p, "--set", "gen.count=lots"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("--set gen.count=lots: `stages.gen.config.count` must be an integer"),
        "{err}"
    );
    let out = hone(&dir.0, &["validate", p, "--set", "nosuch.count=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no stage `nosuch`"));
}

#[test]
fn panicking_stage_exits_1_with_stage_id_and_message() {
    let p = GOOD
        .replace(
            "kind = \"filter.pairs\"",
            "kind = \"testing.fault\"\nconfig = { after = 10, message = \"boom at ten\" }",
        )
        .replace("filter.pairs\"", "filter\"");
    let dir = TempDir::new("panic");
    let path = dir.write("p.toml", &p);
    let err = expect(
        &dir.0,
        &["run", path.to_str().unwrap(), "--workers", "2"],
        1,
        &["stage `filter` failed"],
    );
    assert!(
        err.contains("stage 'filter' panicked: boom at ten"),
        "{err}"
    );
    assert!(
        err.contains("plugins/testing/src/lib.rs"),
        "panic location missing: {err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
    // What completed before the failure is kept.
    assert!(dir.join("runs/gen/pipeline.toml").exists());
    assert_eq!(
        metric(&dir.join("runs/gen"), "gen", "generated"),
        Some(50.0)
    );
    // The failed round is not journalled as complete, so --resume runs it again.
    assert!(read_lines(&dir.join("runs/gen/journal.jsonl")).is_empty());
    let out = hone(&dir.0, &["run", path.to_str().unwrap(), "--resume"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(dir.join("runs/gen/attempts/0/pipeline.toml").exists());
}

#[test]
fn failing_stage_exits_1_with_stage_id_and_error() {
    let p = GOOD
        .replace(
            "kind = \"filter.pairs\"",
            "kind = \"testing.fault\"\nconfig = { mode = \"error\", message = \"disk on fire\" }",
        )
        .replace("filter.pairs\"", "filter\"");
    let dir = TempDir::new("fail");
    let path = dir.write("p.toml", &p);
    expect(
        &dir.0,
        &["run", path.to_str().unwrap()],
        1,
        &["stage `filter` failed on worker 0: disk on fire"],
    );
}

#[test]
fn malformed_input_line_is_reported_or_skipped_and_counted() {
    let dir = TempDir::new("malformed");
    dir.write("d.jsonl", "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{not json\n{\"prompt\": \"q\", \"chosen\": \"c\", \"rejected\": \"d\"}\n");
    let base = "[stages.read]\nkind = \"jsonl.read-pairs\"\nconfig = { path = \"d.jsonl\", on_error = \"ON\" }\n\n[stages.write]\nkind = \"jsonl.write\"\ninputs = [\"read\"]\n";
    let path = dir.write("fail.toml", &base.replace("ON", "fail"));
    expect(
        &dir.0,
        &["run", path.to_str().unwrap()],
        1,
        &["d.jsonl:2: invalid JSON"],
    );
    let path = dir.write("skip.toml", &base.replace("ON", "skip"));
    let out = hone(&dir.0, &["run", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let run = dir.join("runs/skip");
    assert_eq!(metric(&run, "read", "skipped"), Some(1.0));
    assert_eq!(
        read_lines(&run.join("outputs/write/records.jsonl")).len(),
        2
    );
}

#[test]
fn existing_run_directory_is_never_overwritten_silently() {
    let dir = TempDir::new("rundir");
    let path = dir.write("p.toml", GOOD);
    let p = path.to_str().unwrap();
    assert_eq!(hone(&dir.0, &["run", p, "-q"]).status.code(), Some(0));
    let out = hone(&dir.0, &["run", p, "-q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("already exists: pass --resume"),
        "{:?}",
        text(&out)
    );
    let out = hone(&dir.0, &["run", p, "--resume"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out).0.contains("already completed"),
        "{:?}",
        text(&out)
    );
    let marker = dir.join("runs/gen/marker");
    std::fs::write(&marker, "x").unwrap();
    assert_eq!(
        hone(&dir.0, &["run", p, "-q", "--replace"]).status.code(),
        Some(0)
    );
    assert!(!marker.exists());
}

#[test]
fn run_directory_records_manifest_metrics_and_journal() {
    let dir = TempDir::new("manifest");
    let path = dir.write("p.toml", GOOD);
    assert_eq!(
        hone(&dir.0, &["run", path.to_str().unwrap(), "-q"])
            .status
            .code(),
        Some(0)
    );
    let run = dir.join("runs/gen");
    let manifest = read_lines(&run.join("manifest.jsonl"));
    assert_eq!(manifest.len(), 1);
    let entry: serde_json::Value = serde_json::from_str(&manifest[0]).unwrap();
    assert_eq!(entry["stage"], "write");
    let bytes = std::fs::read(run.join(entry["path"].as_str().unwrap())).unwrap();
    use sha2_free::sha256_hex;
    assert_eq!(entry["sha256"], sha256_hex(&bytes));
    assert_eq!(read_lines(&run.join("journal.jsonl")).len(), 1);
    assert_eq!(metric(&run, "filter", "kept"), Some(50.0));
}

/// A tiny sha256 so the test checks the manifest independently of hone's own code.
mod sha2_free {
    pub fn sha256_hex(data: &[u8]) -> String {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(data)?;
                c.wait_with_output()
            })
            .expect("sha256sum runs");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
}

#[test]
fn feedback_edges_carry_output_into_the_next_round() {
    let p = r#"[pipeline]
name = "loop"
rounds = 3

[stages.gen]
kind = "testing.generate-pairs"
config = { count = 4, every_round = true }

[stages.acc]
kind = "testing.accumulate"
inputs = { records = "gen" }
feedback = { previous = "acc" }

[stages.write]
kind = "jsonl.write"
inputs = ["acc"]
"#;
    let dir = TempDir::new("loop");
    let path = dir.write("p.toml", p);
    let out = hone(
        &dir.0,
        &["run", path.to_str().unwrap(), "-q", "--workers", "2"],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let run = dir.join("runs/loop");
    for (round, expected) in [(0, 4), (1, 8), (2, 12)] {
        // One rule whatever the number of rounds: round 0 in outputs/STAGE/,
        // round R in outputs/STAGE/round-R/.
        let file = match round {
            0 => "outputs/write/records.jsonl".to_string(),
            r => format!("outputs/write/round-{r}/records.jsonl"),
        };
        let lines = read_lines(&run.join(file));
        assert_eq!(lines.len(), expected, "round {round}");
    }
    assert_eq!(read_lines(&run.join("journal.jsonl")).len(), 3);
}

fn filtered_pairs(workers: &str, dir: &TempDir) -> Vec<String> {
    let root = workspace();
    let run_dir = dir.join(&format!("w{workers}"));
    let out = hone(
        &root,
        &[
            "run",
            "pipelines/hh-filter.toml",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--workers",
            workers,
            "-q",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    read_lines(&run_dir.join("outputs/write/pairs.jsonl.gz"))
}

#[test]
fn two_workers_give_the_same_output_as_one() {
    let dir = TempDir::new("workers");
    let one = filtered_pairs("1", &dir);
    let two = filtered_pairs("2", &dir);
    assert!(one.len() > 2000, "{}", one.len());
    assert_eq!(one, two);
    for w in ["w1", "w2"] {
        let run = dir.join(w);
        assert_eq!(metric(&run, "read", "read"), Some(2307.0));
        assert_eq!(metric(&run, "read", "skipped"), Some(5.0));
        assert_eq!(metric(&run, "filter", "kept"), Some(one.len() as f64));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_processes_on_localhost_run_a_pipeline() {
    let dir = TempDir::new("cluster");
    let hostfile = dir.write(
        "hosts",
        &format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()),
    );
    let root = workspace();
    let run_dir = dir.join("run");
    let spawn = |i: &str| {
        std::process::Command::new(hone_tests::hone_bin())
            .args([
                "run",
                "pipelines/hh-filter.toml",
                "--run-dir",
                run_dir.to_str().unwrap(),
                "-q",
            ])
            .args([
                "--workers",
                "1",
                "--processes",
                "2",
                "--process",
                i,
                "--hostfile",
                hostfile.to_str().unwrap(),
            ])
            .current_dir(&root)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let p1 = spawn("1");
    let p0 = spawn("0");
    let (o0, o1) = (
        p0.wait_with_output().unwrap(),
        p1.wait_with_output().unwrap(),
    );
    assert_eq!(o0.status.code(), Some(0), "{:?}", text(&o0));
    assert_eq!(o1.status.code(), Some(0), "{:?}", text(&o1));
    let single = filtered_pairs("1", &dir);
    assert_eq!(
        read_lines(&run_dir.join("outputs/write/pairs.jsonl.gz")),
        single
    );
    // Both processes filtered a share of the pairs; worker 0 wrote every metric.
    let lines = read_lines(&run_dir.join("metrics.jsonl"));
    let workers: std::collections::BTreeSet<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "filter")
        .map(|v| v["worker"].to_string())
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
}

#[test]
fn plugins_lists_ports_and_documented_config() {
    let out = hone(Path::new("."), &["plugins"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    for needle in [
        "filter.pairs",
        "jsonl.read-pairs",
        "jsonl.write",
        "pairs: PreferencePair",
        "near_threshold (float) = 0.9",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing");
    }
}

#[test]
fn graph_prints_mermaid() {
    let root = workspace();
    let out = hone(&root, &["graph", "pipelines/hh-filter.toml"]);
    let (stdout, _) = text(&out);
    assert!(stdout.starts_with("flowchart LR"), "{stdout}");
    assert!(
        stdout.contains("s_read -- \"pairs → pairs\" --> s_filter"),
        "{stdout}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = hone(Path::new("."), &["run"]);
    assert_eq!(out.status.code(), Some(2));
    let out = hone(Path::new("."), &["run", "/nonexistent/p.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out)
        .1
        .contains("/nonexistent/p.toml: cannot read pipeline file"));
}

#[test]
fn data_parallel_stages_get_every_artifact_on_every_worker() {
    let p = r#"[stages.gen]
kind = "testing.generate-pairs"
config = { count = 3 }

[stages.first]
kind = "jsonl.write"
inputs = ["gen"]

[stages.pass]
kind = "testing.passthrough"
inputs = ["first.artifact"]

[stages.second]
kind = "jsonl.write"
inputs = ["pass"]
"#;
    let dir = TempDir::new("broadcast");
    let path = dir.write("p.toml", p);
    for workers in ["1", "2"] {
        let run = dir.join(&format!("w{workers}"));
        let args = [
            "run",
            path.to_str().unwrap(),
            "-q",
            "--workers",
            workers,
            "--run-dir",
        ];
        let out = hone(&dir.0, &[&args[..], &[run.to_str().unwrap()]].concat());
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        let lines = read_lines(&run.join("outputs/second/records.jsonl"));
        // One copy of the artifact per worker running the data-parallel stage.
        assert_eq!(lines.len().to_string(), workers);
        assert!(lines[0].contains("first/records.jsonl@0"), "{}", lines[0]);
    }
}

#[test]
fn pandalm_majority_vote_on_the_bundled_test_set() {
    let dir = TempDir::new("pandalm");
    let data = workspace().join("data/pandalm-human-testset/testset-v1.json");
    let p = format!(
        "[stages.read]\nkind = \"jsonl.read-pairs\"\nconfig = {{ path = {:?} }}\n\n[stages.write]\nkind = \"jsonl.write\"\ninputs = [\"read\"]\n",
        data.to_str().unwrap()
    );
    let path = dir.write("p.toml", &p);
    let out = hone(
        &dir.0,
        &["run", path.to_str().unwrap(), "-q", "--workers", "2"],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let run = dir.join("runs/p");
    // PROVENANCE.md: majority 2 -> 472, 1 -> 422, tie -> 105 of 999.
    assert_eq!(metric(&run, "read", "read"), Some(894.0));
    assert_eq!(metric(&run, "read", "ties_dropped"), Some(105.0));
    let lines = read_lines(&run.join("outputs/write/records.jsonl"));
    assert_eq!(lines.len(), 894);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["label_source"], "majority-of-3");
}

#[test]
fn metric_times_are_when_the_stage_raised_them() {
    // Three metrics raised 700 ms apart within one call: before, all three
    // were stamped when worker 0 wrote them, after the call returned.
    let dir = TempDir::new("times");
    let path = dir.write(
        "p.toml",
        "[pipeline]\nname = \"pace\"\n\n[stages.pace]\nkind = \"testing.pace\"\nconfig = { ticks = 3, interval_ms = 700 }\n",
    );
    let out = hone(&dir.0, &["run", path.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let times: Vec<f64> = read_lines(&dir.join("runs/pace/metrics.jsonl"))
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["name"] == "tick")
        .map(|v| v["time"].as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 3, "{times:?}");
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            (0.65..5.0).contains(&gap),
            "ticks {gap:.3} s apart: {times:?}"
        );
    }
}

#[test]
fn an_artifact_of_the_wrong_kind_is_refused_at_validation() {
    // A reward model wired into a policy port: refused where it is wired.
    let p = r#"[stages.gen]
kind = "testing.generate-pairs"

[stages.rm]
kind = "rm.train"
inputs = { pairs = "gen" }

[stages.prompts]
kind = "world.prompts"

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "rm.models" }
"#;
    assert_invalid(
        p,
        "13:42",
        &[
            "port type mismatch: `rm.models` carries Artifact(reward-model)",
            "input `policy` of stage `rollout` (lm.rollout) takes Artifact(policy)",
        ],
    );
    // A policy into a reward-model port, the other way round.
    let p = r#"[stages.demos]
kind = "testing.generate-pairs"

[stages.sft]
kind = "lm.sft"
inputs = "demos"

[stages.score]
kind = "rm.score"
inputs = { models = "sft.policy", records = "demos" }
"#;
    assert_invalid(
        p,
        "10:21",
        &["carries Artifact(policy)", "takes Artifact(reward-model)"],
    );
}
