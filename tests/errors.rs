//! Error messages that keep their subject (issue 10, classes 4 to 6):
//! integers out of range are refused at their line with the range named,
//! every read error of a data file names the file, a pipeline that is not
//! UTF-8 or not TOML gets one located message, printed diagnostics are
//! capped, and the JSONL readers accept a byte-order mark and skip (and
//! count) a line that is not UTF-8.

use hone_tests::{
    assert_invalid, assert_invalid_with, expect, hone, metric, read_lines, text, TempDir,
};
use std::io::Write;
use std::time::{Duration, Instant};

const PAIRS: &str = "{\"prompt\": \"p1\", \"chosen\": \"a\", \"rejected\": \"b\"}\n\
                     {\"prompt\": \"p2\", \"chosen\": \"c\", \"rejected\": \"d\"}\n\
                     {\"prompt\": \"p3\", \"chosen\": \"e\", \"rejected\": \"f\"}\n";

/// A pipeline reading `file` with `config` extra keys and writing what it read.
fn reader(file: &str, extra: &str) -> String {
    format!(
        "[pipeline]\nname = \"r\"\n\n[stages.read]\nkind = \"jsonl.read-pairs\"\n\
         config = {{ path = \"{file}\"{extra} }}\n\n[stages.write]\nkind = \"jsonl.write\"\ninputs = [\"read\"]\n"
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

// ---- Class 4: numbers without a position -------------------------------------------------

#[test]
fn negative_counts_are_refused_at_their_line_naming_field_value_and_range() {
    let files: &[(&str, &[u8])] = &[("d.jsonl", PAIRS.as_bytes())];
    // `limit` read into a u64: used to pass validation and fail at run time with a bare serde message.
    assert_invalid_with(
        files,
        reader("d.jsonl", ", limit = -1").as_bytes(),
        "6:38",
        &[
            "`stages.read.config.limit` = -1",
            "out of range",
            "non-negative integer",
        ],
    );
    // `steps` of lm.sft, read into a usize.
    let sft =
        "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.sft]\nkind = \"lm.sft\"\n\
               inputs = [\"gen\"]\nconfig = { steps = -5 }\n";
    assert_invalid(
        sft,
        "7:20",
        &[
            "`stages.sft.config.steps` = -5",
            "non-negative integer of at least 1",
        ],
    );
    // A seed read into a u64.
    let split = "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.split]\nkind = \"filter.split\"\n\
                 inputs = [\"gen\"]\nconfig = { seed = -3 }\n";
    assert_invalid(
        split,
        "7:19",
        &["`stages.split.config.seed` = -3", "non-negative"],
    );
    // 0 where at least 1 is needed is caught before any stage is created.
    let zero = sft.replace("steps = -5", "batch_size = 0");
    assert_invalid(
        &zero,
        "7:25",
        &["`stages.sft.config.batch_size` = 0", "from 1 to 1048576"],
    );
    // In a list.
    let bon = "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.b]\nkind = \"eval.best-of-n\"\n\
               inputs = { completions = \"gen\" }\nconfig = { ns = [1, -2] }\n";
    let dir = TempDir::new("bon");
    let path = dir.write("p.toml", bon);
    expect(
        &dir.0,
        &["validate", path.to_str().unwrap()],
        2,
        &["`stages.b.config.ns[1]` = -2 is out of range"],
    );
}

#[test]
fn absurd_values_get_a_clear_limit() {
    let base = "[pipeline]\nrounds = ROUNDS\n\n[stages.gen]\nkind = \"testing.generate-pairs\"\n";
    // Used to spin silently.
    assert_invalid(
        &base.replace("ROUNDS", "9223372036854775807"),
        "2:10",
        &[
            "`pipeline.rounds` = 9223372036854775807",
            "from 0 to 1000000",
        ],
    );
    assert_invalid(
        &base.replace("ROUNDS", "1000001"),
        "2:10",
        &["from 0 to 1000000"],
    );
    assert_invalid(
        &base.replace("ROUNDS", "-2"),
        "2:10",
        &["`pipeline.rounds` = -2"],
    );
    // Beyond what a TOML integer (i64) holds: named, not "found string".
    assert_invalid(
        &base.replace("ROUNDS", "99999999999999999999"),
        "2:10",
        &["`pipeline.rounds` = 99999999999999999999", "out of range"],
    );
    let seed = "[pipeline]\nseed = 18446744073709551616\n\n[stages.gen]\nkind = \"testing.generate-pairs\"\n";
    assert_invalid(
        seed,
        "2:8",
        &[
            "`pipeline.seed` = 18446744073709551616",
            "at most 9223372036854775807",
        ],
    );
    // A model width that would only fail in an allocation.
    let sft =
        "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.sft]\nkind = \"lm.sft\"\n\
               inputs = [\"gen\"]\nconfig = { d_model = 1000000000000 }\n";
    assert_invalid(
        sft,
        "7:22",
        &[
            "`stages.sft.config.d_model` = 1000000000000",
            "from 1 to 65536",
        ],
    );
    // An ensemble size.
    let rm =
        "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.rm]\nkind = \"rm.train\"\n\
              inputs = { pairs = \"gen\" }\nconfig = { members = 100000 }\n";
    assert_invalid(
        rm,
        "7:22",
        &["`stages.rm.config.members` = 100000", "from 1 to 1024"],
    );
}

#[test]
fn set_overrides_are_bounded_like_the_file() {
    let dir = TempDir::new("set-bounds");
    dir.write("d.jsonl", PAIRS);
    let path = dir.write("p.toml", &reader("d.jsonl", ""));
    let p = path.to_str().unwrap();
    for (arg, needles) in [
        (
            "read.limit=-1",
            &["--set read.limit=-1: ", "`stages.read.config.limit` = -1"][..],
        ),
        (
            "pipeline.rounds=2000000",
            &["--set pipeline.rounds=2000000: ", "from 0 to 1000000"][..],
        ),
        (
            "pipeline.seed=-1",
            &["--set pipeline.seed=-1: ", "`pipeline.seed` = -1"][..],
        ),
    ] {
        for command in ["validate", "run"] {
            let out = hone(&dir.0, &[command, p, "--set", arg]);
            let (_, err) = text(&out);
            assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
            for needle in needles {
                assert!(err.contains(needle), "{arg}: `{needle}` not in {err}");
            }
        }
    }
    assert!(!dir.join("runs").exists());
    // In range: accepted.
    let out = hone(&dir.0, &["run", p, "--set", "read.limit=2", "-q"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(
        read_lines(&dir.join("runs/r/outputs/write/records.jsonl")).len(),
        2
    );
}

#[test]
fn plugins_document_the_ranges() {
    let dir = TempDir::new("plugins-ranges");
    let out = hone(&dir.0, &["plugins", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |kind: &str, name: &str| -> serde_json::Value {
        let stage = all
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == kind)
            .unwrap();
        let f = stage["config"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap();
        f["ty"].clone()
    };
    assert_eq!(
        field("jsonl.read-pairs", "limit"),
        serde_json::json!({"Unsigned": {"min": 0, "max": null}})
    );
    assert_eq!(
        field("lm.sft", "d_model"),
        serde_json::json!({"Unsigned": {"min": 1, "max": 65536}})
    );
    // No count, size, step or seed of a built-in stage is a plain (signed) integer.
    for stage in all.as_array().unwrap() {
        for f in stage["config"].as_array().unwrap() {
            assert_ne!(
                f["ty"], "Integer",
                "{}.{} is a signed integer",
                stage["kind"], f["name"]
            );
        }
    }
    let out = hone(&dir.0, &["plugins"]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("limit (non-negative integer) = 0"),
        "{stdout}"
    );
}

// ---- Class 5: messages that keep their subject --------------------------------------------

#[test]
fn a_damaged_gzip_input_names_the_file_and_line() {
    let mut lines = String::new();
    for i in 0..3000 {
        lines.push_str(&format!(
            "{{\"prompt\": \"prompt {i}\", \"chosen\": \"c{}\", \"rejected\": \"r{}\"}}\n",
            i * 7919 % 1013,
            i * 104729 % 997
        ));
    }
    let good = gzip(lines.as_bytes());
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 64] {
        *b ^= 0x5A;
    }
    let mut early = good.clone();
    for b in &mut early[10..40] {
        *b ^= 0xFF;
    }
    let truncated = good[..good.len() / 2].to_vec();
    for (name, bytes) in [
        ("corrupt.jsonl.gz", corrupt),
        ("early.jsonl.gz", early),
        ("truncated.jsonl.gz", truncated),
    ] {
        let dir = TempDir::new("gz");
        let data = dir.join(name);
        std::fs::write(&data, bytes).unwrap();
        // Skipping malformed lines: damaged data that still inflates to text is
        // skipped; the stream error itself still stops the run, naming the file.
        let path = dir.write("p.toml", &reader(name, ", on_error = \"skip\""));
        let out = hone(&dir.0, &["run", path.to_str().unwrap(), "-q"]);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        let line = err
            .lines()
            .find(|l| l.contains("stage `read`"))
            .unwrap_or_else(|| panic!("{name}: {err}"));
        // The file as the stage got it (absolute), then `:LINE: `.
        let at = line
            .find(data.file_name().unwrap().to_str().unwrap())
            .expect(line);
        let rest = &line[at + name.len()..];
        assert!(
            rest.starts_with(':') && rest[1..].split(':').next().unwrap().parse::<u64>().is_ok(),
            "{name}: no line number after the file in `{line}`"
        );
        assert!(line.contains("gzip"), "{name}: {line}");
    }
}

#[test]
fn a_non_utf8_pipeline_file_is_located() {
    assert_invalid_with(
        &[],
        b"[pipeline]\nname = \"r\"\ndescription = \"caf\xE9\"\n",
        "3:19",
        &["not UTF-8", "0xE9"],
    );
    // UTF-16, as some editors save.
    assert_invalid_with(
        &[],
        b"\xFF\xFE[\x00p\x00",
        "1:1",
        &["UTF-16", "save it as UTF-8"],
    );
    // An invalid byte after multi-byte characters: the column counts characters.
    assert_invalid_with(
        &[],
        "# é\n# ü \u{1F600}"
            .as_bytes()
            .iter()
            .chain(b"\xC0\n")
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
        "2:6",
        &["0xC0"],
    );
}

#[test]
fn problems_inside_dotted_headers_and_keys_point_at_the_key() {
    // A header on the first line used to be reported at 1:1.
    assert_invalid(
        "[stages.read.config.limit]\nx = 1\n[stages.read]\nkind = \"jsonl.read-pairs\"\n",
        "1:21",
        &["`stages.read.config.limit`", "found table"],
    );
    assert_invalid(
        "[stages.gen.inputs.pairs]\nx = \"a\"\n[stages.gen]\nkind = \"testing.generate-pairs\"\n",
        "1:20",
        &["`stages.gen.inputs.pairs` must be a string"],
    );
    assert_invalid(
        "[pipeline.rounds.x]\ny = 1\n[stages.gen]\nkind = \"testing.generate-pairs\"\n",
        "1:11",
        &["`pipeline.rounds`", "found table"],
    );
    assert_invalid(
        "[pipeline]\nname = \"a\"\n[pipeline.foo.bar]\ny = 1\n[stages.gen]\nkind = \"testing.generate-pairs\"\n",
        "3:11",
        &["unknown key `foo`"],
    );
    // Dotted keys.
    assert_invalid(
        "[stages.gen]\nkind = \"testing.generate-pairs\"\nconfig.count.deep = 1\n",
        "3:8",
        &["`stages.gen.config.count`", "found table"],
    );
    // An empty `[stages]` table: at its header, not at 1:1.
    assert_invalid(
        "[pipeline]\nname = \"a\"\n\n[stages]\n",
        "4:2",
        &["declares no stages"],
    );
}

#[test]
fn a_missing_plugin_directory_is_an_error_naming_it() {
    let dir = TempDir::new("plugin-path");
    let path = dir.write(
        "p.toml",
        "[stages.gen]\nkind = \"testing.generate-pairs\"\n",
    );
    let p = path.to_str().unwrap();
    let missing = dir.join("no-such-plugins");
    let file = dir.write("lib.txt", "not a directory");
    for bad in [&missing, &file] {
        for args in [
            vec!["validate", p],
            vec!["run", p],
            vec!["graph", p],
            vec!["plugins"],
        ] {
            let mut args = args.clone();
            args.extend(["--plugin-path", bad.to_str().unwrap()]);
            let out = hone(&dir.0, &args);
            let (_, err) = text(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(
                err.contains(&format!("--plugin-path {}: ", bad.display())),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!dir.join("runs").exists());
    // In the pipeline: at the entry's line and column, with the resolved directory.
    let p = "[pipeline]\nname = \"a\"\nplugin_path = [\".\", \"../nowhere\"]\n\n[stages.gen]\nkind = \"testing.generate-pairs\"\n";
    assert_invalid(
        p,
        "3:21",
        &[
            "`pipeline.plugin_path[1]` = \"../nowhere\"",
            "does not exist",
        ],
    );
}

// ---- Class 6: floods and leniency ------------------------------------------------------------

/// Stderr of `hone validate` on a file with `bytes`, which must exit 2 within `limit`.
fn validate_bytes(bytes: &[u8], limit: Duration) -> (String, String) {
    let dir = TempDir::new("flood");
    let path = dir.join("p.toml");
    std::fs::write(&path, bytes).unwrap();
    let started = Instant::now();
    let out = hone(&dir.0, &["validate", path.to_str().unwrap()]);
    let took = started.elapsed();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(took < limit, "took {took:?}");
    assert!(!err.contains("panicked"), "{err}");
    (err, path.display().to_string())
}

#[test]
fn a_data_file_handed_over_as_a_pipeline_gets_one_message_fast() {
    // ~50 MB of JSON lines.
    let mut jsonl = String::with_capacity(52 << 20);
    let mut i = 0;
    while jsonl.len() < 50 << 20 {
        jsonl.push_str(&format!(
            "{{\"prompt\": \"question number {i}\", \"chosen\": \"a fine answer\", \"rejected\": \"a worse one\"}}\n"
        ));
        i += 1;
    }
    let (err, path) = validate_bytes(jsonl.as_bytes(), Duration::from_secs(20));
    assert!(
        err.lines().count() <= 3,
        "{} lines:\n{}",
        err.lines().count(),
        &err[..err.len().min(2000)]
    );
    assert!(
        err.starts_with(&format!("{path}:1:1: this is not a TOML pipeline file")),
        "{err}"
    );
    assert!(err.contains("JSON") && err.contains("path"), "{err}");
    // A JSON document, pretty-printed, after comments.
    let (err, path) = validate_bytes(b"# data\n\n[\n  {\"a\": 1}\n]\n", Duration::from_secs(20));
    assert!(
        err.starts_with(&format!("{path}:3:1: this is not a TOML pipeline file")),
        "{err}"
    );
    // Gzip and binary files.
    let (err, path) = validate_bytes(&gzip(PAIRS.as_bytes()), Duration::from_secs(20));
    assert!(
        err.starts_with(&format!("{path}:1:1: ")) && err.contains("gzip"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let mut binary = b"\x7fELF\x02\x01\x01".to_vec();
    binary.extend(std::iter::repeat_n(0u8, 4096));
    let (err, _) = validate_bytes(&binary, Duration::from_secs(20));
    assert!(err.contains("binary"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_flood_of_errors_is_capped_and_counted() {
    // Prose: not TOML from its first line, and every line is an error.
    let prose = "This is not a pipeline, only some words.\n".repeat(200_000);
    let (err, path) = validate_bytes(prose.as_bytes(), Duration::from_secs(30));
    assert_eq!(err.lines().count(), 2, "{}", &err[..err.len().min(3000)]);
    assert!(err.ends_with("\n1 error found\n"), "{err}");
    assert!(
        err.starts_with(&format!("{path}:1:1: this is not a TOML pipeline file")),
        "{err}"
    );
    assert!(err.contains("TOML syntax errors in all"), "{err}");
    // A TOML file with many genuine errors: the first 20, then a count.
    let mut p = String::from("[pipeline]\n");
    for i in 0..150 {
        p.push_str(&format!("unknown{i} = 1\n"));
    }
    p.push_str("\n[stages.gen]\nkind = \"testing.generate-pairs\"\n");
    let (err, path) = validate_bytes(p.as_bytes(), Duration::from_secs(20));
    let located = err
        .lines()
        .filter(|l| l.starts_with(&format!("{path}:")))
        .count();
    assert_eq!(located, 20, "{err}");
    assert!(err.contains("... and 130 more errors"), "{err}");
    assert!(err.ends_with("150 errors found\n"), "{err}");
    // Few errors are all shown.
    let few = "[pipeline]\nx = 1\ny = 2\n\n[stages.gen]\nkind = \"testing.generate-pairs\"\n";
    let (err, _) = validate_bytes(few.as_bytes(), Duration::from_secs(20));
    assert!(!err.contains("more error"), "{err}");
    assert!(err.ends_with("2 errors found\n"), "{err}");
}

#[test]
fn on_error_skip_skips_and_counts_a_non_utf8_line() {
    let dir = TempDir::new("latin1");
    let mut data = PAIRS.as_bytes().to_vec();
    data.splice(
        0..0,
        b"{\"prompt\": \"caf\xE9\", \"chosen\": \"x\", \"rejected\": \"y\"}\n"
            .iter()
            .copied(),
    );
    std::fs::write(dir.join("d.jsonl"), &data).unwrap();
    std::fs::write(dir.join("d.jsonl.gz"), gzip(&data)).unwrap();
    for file in ["d.jsonl", "d.jsonl.gz"] {
        let name = file.replace('.', "-");
        let skip = dir.write(
            &format!("{name}-skip.toml"),
            &reader(file, ", on_error = \"skip\"")
                .replace("name = \"r\"", &format!("name = \"{name}-skip\"")),
        );
        let out = hone(&dir.0, &["run", skip.to_str().unwrap(), "-q"]);
        assert_eq!(out.status.code(), Some(0), "{file}: {:?}", text(&out));
        let run = dir.join(&format!("runs/{name}-skip"));
        assert_eq!(metric(&run, "read", "skipped"), Some(1.0), "{file}");
        assert_eq!(metric(&run, "read", "read"), Some(3.0), "{file}");
        assert_eq!(
            read_lines(&run.join("outputs/write/records.jsonl")).len(),
            3
        );

        let fail = dir.write(
            &format!("{name}-fail.toml"),
            &reader(file, "").replace("name = \"r\"", &format!("name = \"{name}-fail\"")),
        );
        let out = hone(&dir.0, &["run", fail.to_str().unwrap(), "-q"]);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        let data_path = dir.join(file).canonicalize().unwrap();
        assert!(
            err.contains(&format!("{}:1: ", data_path.display())),
            "{file}: {err}"
        );
        assert!(
            err.contains("not UTF-8") && err.contains("on_error = \"skip\""),
            "{file}: {err}"
        );
    }
}

#[test]
fn a_byte_order_mark_is_accepted_in_data_and_pipeline_files() {
    let dir = TempDir::new("bom");
    let bom = "\u{FEFF}";
    dir.write("d.jsonl", &format!("{bom}{PAIRS}"));
    std::fs::write(
        dir.join("d.jsonl.gz"),
        gzip(format!("{bom}{PAIRS}").as_bytes()),
    )
    .unwrap();
    dir.write(
        "d.json",
        &format!("{bom}[{}]", PAIRS.trim_end().replace('\n', ",")),
    );
    for (i, file) in ["d.jsonl", "d.jsonl.gz", "d.json"].iter().enumerate() {
        // The pipeline file has a byte-order mark too.
        let p = format!(
            "{bom}{}",
            reader(file, "").replace("name = \"r\"", &format!("name = \"bom{i}\""))
        );
        let path = dir.write(&format!("p{i}.toml"), &p);
        let out = hone(&dir.0, &["validate", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{file}: {:?}", text(&out));
        let out = hone(&dir.0, &["run", path.to_str().unwrap(), "-q"]);
        assert_eq!(out.status.code(), Some(0), "{file}: {:?}", text(&out));
        let run = dir.join(&format!("runs/bom{i}"));
        assert_eq!(metric(&run, "read", "read"), Some(3.0), "{file}");
        assert_eq!(metric(&run, "read", "skipped"), Some(0.0), "{file}");
    }
    // Positions after a byte-order mark are counted without it.
    let path = dir.write(
        "bad.toml",
        &format!("{bom}[pipeline]\nrounds = -1\n[stages.gen]\nkind = \"testing.generate-pairs\"\n"),
    );
    let out = hone(&dir.0, &["validate", path.to_str().unwrap()]);
    assert!(
        text(&out).1.contains(&format!("{}:2:10: ", path.display())),
        "{:?}",
        text(&out)
    );
}

#[test]
fn an_unnamed_output_port_is_the_one_the_input_takes_or_an_error_naming_the_ports() {
    // filter.split's two outputs both carry any record: the writer must say which.
    let split = "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.split]\nkind = \"filter.split\"\n\
                 inputs = \"gen\"\n\n[stages.write]\nkind = \"jsonl.write\"\ninputs = \"split\"\n";
    assert_invalid(
        split,
        "10:10",
        &[
            "`split` (filter.split) has several outputs",
            "more than one",
            "split.PORT",
            "train",
            "heldout",
        ],
    );
    // Records of any kind could go to either input of world.label.
    let any = "[stages.gen]\nkind = \"testing.generate-pairs\"\n\n[stages.split]\nkind = \"filter.split\"\n\
               inputs = \"gen\"\n\n[stages.label]\nkind = \"world.label\"\ninputs = \"split.train\"\n";
    assert_invalid(
        any,
        "10:10",
        &[
            "`label` (world.label) has 2 input ports",
            "more than one",
            "name the port",
        ],
    );
    // world.gold emits Scores and Completions: a Score input takes the Scores.
    let dir = TempDir::new("ports");
    let ok = "[stages.prompts]\nkind = \"world.prompts\"\nconfig = { count = 4 }\n\n\
              [stages.demos]\nkind = \"world.demos\"\ninputs = \"prompts\"\n\n\
              [stages.gold]\nkind = \"world.gold\"\ninputs = \"demos\"\n\n\
              [stages.pairs]\nkind = \"filter.pair-completions\"\n\
              inputs = { completions = \"demos\", scores = \"gold\" }\nconfig = { score = \"gold_reward\" }\n";
    let path = dir.write("ok.toml", ok);
    let out = hone(&dir.0, &["validate", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}
