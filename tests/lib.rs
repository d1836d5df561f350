//! Helpers for hone's integration tests: find the built `hone` binary and
//! run it on pipeline files written into fresh temporary directories.
//!
//! The tests need the workspace built first (`cargo build`), which the
//! README's test command does: `cdylib` plugins are not built by
//! `cargo test` alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A small valid pipeline: 50 generated pairs, filtered, written.
pub const GOOD: &str = r#"[pipeline]
name = "gen"

[stages.gen]
kind = "testing.generate-pairs"
config = { count = 50 }

[stages.filter]
kind = "filter.pairs"
inputs = ["gen"]

[stages.write]
kind = "jsonl.write"
inputs = { records = "filter.pairs" }
"#;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The directory holding the `hone` binary and the built plugins.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// The `hone` binary; panics with a hint when the workspace is not built.
pub fn hone_bin() -> PathBuf {
    let bin = bin_dir().join(format!("hone{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build` before `cargo test` (see README)",
        bin.display()
    );
    bin
}

/// Runs `hone ARGS` in `cwd`.
pub fn hone(cwd: &Path, args: &[&str]) -> Output {
    Command::new(hone_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("HONE_PLUGIN_PATH")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("hone runs")
}

/// Runs `hone run FILE --run-dir RUN_DIR --workers N -q` in `cwd`.
pub fn run_file(cwd: &Path, file: &Path, run_dir: &Path, workers: &str) -> Output {
    hone(
        cwd,
        &[
            "run",
            file.to_str().expect("a UTF-8 path"),
            "--run-dir",
            run_dir.to_str().expect("a UTF-8 path"),
            "--workers",
            workers,
            "-q",
        ],
    )
}

/// Runs `hone ARGS` in `cwd` and asserts its exit code and that its stderr
/// holds every one of `needles` (and no panic of hone's own: a stage's
/// contained panic is reported as an error); returns the stderr.
pub fn expect(cwd: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let out = hone(cwd, args);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    assert!(!err.contains("thread '"), "hone panicked: {err}");
    err
}

/// Asserts that `validate` and `run` of `pipeline` (written as p.toml in a
/// fresh directory holding `files`) exit 2 with an error at `line_col` that
/// contains every needle, and that the run left no run directory.
pub fn assert_invalid_with(
    files: &[(&str, &[u8])],
    pipeline: &[u8],
    line_col: &str,
    needles: &[&str],
) {
    let dir = TempDir::new("errors");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let path = dir.join("p.toml");
    std::fs::write(&path, pipeline).unwrap();
    for command in ["validate", "run"] {
        let out = hone(&dir.0, &[command, path.to_str().unwrap()]);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        let prefix = format!("{}:{line_col}: ", path.display());
        let line = err
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{command}: no `{prefix}` in:\n{err}"));
        for needle in needles {
            assert!(
                line.contains(needle),
                "{command}: `{needle}` not in `{line}`"
            );
        }
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
    }
    assert!(
        !dir.join("runs").exists(),
        "an invalid pipeline made a run directory"
    );
}

/// [`assert_invalid_with`] for a pipeline alone.
pub fn assert_invalid(pipeline: &str, line_col: &str, needles: &[&str]) {
    assert_invalid_with(&[], pipeline.as_bytes(), line_col, needles);
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A fresh, empty temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates one named after `label`.
    pub fn new(label: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hone-test-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Writes a file inside and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a `.jsonl` or `.jsonl.gz` file into lines.
pub fn read_lines(path: &Path) -> Vec<String> {
    use std::io::Read;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .expect("gzip");
    } else {
        text = String::from_utf8(bytes).expect("utf-8");
    }
    text.lines().map(str::to_string).collect()
}

/// Sum of a metric over workers in a run's `metrics.jsonl`.
pub fn metric(run_dir: &Path, stage: &str, name: &str) -> Option<f64> {
    let lines = read_lines(&run_dir.join("metrics.jsonl"));
    let mut total = None;
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line).expect("metrics line is JSON");
        if v["stage"] == stage && v["name"] == name {
            *total.get_or_insert(0.0) += v["value"].as_f64().unwrap_or(0.0);
        }
    }
    total
}
