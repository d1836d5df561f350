//! Nothing a user types destroys data, and a stage that brings the process
//! down or stalls is named: run-directory names, `--replace` and `--resume`
//! on directories that are not runs, stages that abort, exit or hang, stages
//! that reject their config, and cluster flags.

use hone_tests::{hone, read_lines, text, TempDir, GOOD};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

/// A user's working directory: a pipeline, data, notes and an earlier run.
fn users_home(label: &str) -> TempDir {
    let home = TempDir::new(label);
    home.write("notes.txt", "my notes\n");
    std::fs::create_dir_all(home.join("data")).unwrap();
    home.write("data/pairs.jsonl", "{\"prompt\": \"p\"}\n");
    let out = hone(
        &home.0,
        &[
            "run",
            home.write("earlier.toml", GOOD).to_str().unwrap(),
            "-q",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(home.join("runs/gen/.hone-run").is_file());
    home
}

/// Asserts that no file under `dir` changed since `before`, naming those that did.
fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
    let after = snapshot(dir);
    let changed: Vec<_> = before
        .iter()
        .filter(|(p, b)| after.get(*p) != Some(*b))
        .map(|(p, _)| p.display().to_string())
        .chain(
            after
                .keys()
                .filter(|p| !before.contains_key(*p))
                .map(|p| format!("new {}", p.display())),
        )
        .collect();
    assert!(changed.is_empty(), "{what} changed files: {changed:?}");
}

/// Runs `hone ARGS` in `cwd` and asserts that it is refused (exit 2) with
/// `needle` in its message, and that no file under `home` changed.
fn assert_refused(
    cwd: &Path,
    args: &[&str],
    needle: &str,
    home: &Path,
    before: &BTreeMap<PathBuf, Vec<u8>>,
) {
    let (out, err) = run(cwd, args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert_unchanged(home, before, &format!("{args:?}"));
}

fn run(cwd: &Path, args: &[&str]) -> (Output, String) {
    let out = hone(cwd, args);
    let err = text(&out).1;
    assert!(!err.contains("panicked"), "{err}");
    (out, err)
}

#[test]
fn unsafe_names_are_refused_at_their_line_and_nothing_is_deleted() {
    let home = users_home("names");
    let ok = home.write("ok.toml", GOOD);
    for name in [
        "..", "", ".", "a/../..", "../x", "/tmp/x", ".hidden", "-rf", "a b",
    ] {
        let p = GOOD.replace("name = \"gen\"", &format!("name = \"{name}\""));
        let path = home.write("bad.toml", &p);
        let before = snapshot(&home.0);
        for flags in [&["--replace"][..], &["--resume"], &[]] {
            let mut args = vec!["run", path.to_str().unwrap()];
            args.extend_from_slice(flags);
            let (out, err) = run(&home.0, &args);
            assert_eq!(out.status.code(), Some(2), "name {name:?}: {err}");
            assert!(
                err.contains(&format!("{}:2:8: `pipeline.name`", path.display())),
                "name {name:?}: {err}"
            );
            assert_unchanged(
                &home.0,
                &before,
                &format!("name {name:?} {flags:?} changed files"),
            );
        }
        // The same names from the command line.
        let set = format!("pipeline.name={name}");
        let (out, err) = run(
            &home.0,
            &["run", ok.to_str().unwrap(), "--set", &set, "--replace"],
        );
        assert_eq!(out.status.code(), Some(2), "--set name {name:?}: {err}");
        assert!(err.contains("`pipeline.name`"), "{err}");
        assert_unchanged(
            &home.0,
            &before,
            &format!("--set name {name:?} changed files"),
        );
    }
}

#[test]
fn a_file_name_makes_a_safe_default_name() {
    let home = TempDir::new("stem");
    let path = home.write(
        "my pipeline (v2).toml",
        &GOOD.replace("name = \"gen\"\n", ""),
    );
    let (out, err) = run(&home.0, &["run", path.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(home.join("runs/my-pipeline--v2-/.hone-run").is_file());
}

#[test]
fn replace_and_resume_leave_a_directory_that_is_not_a_run_alone() {
    let home = users_home("thesis");
    std::fs::create_dir_all(home.join("thesis/chapters")).unwrap();
    home.write("thesis/main.tex", "\\documentclass{book}");
    home.write("thesis/chapters/one.tex", "Once upon a time");
    // Looks like a run but has no marker.
    home.write("thesis/journal.jsonl", "");
    home.write("thesis/pipeline.toml", GOOD);
    let path = home.write("p.toml", GOOD);
    let before = snapshot(&home.0);
    for flag in ["--replace", "--resume"] {
        let (out, err) = run(
            &home.0,
            &["run", path.to_str().unwrap(), "--run-dir", "thesis", flag],
        );
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains("is not a hone run directory"), "{flag}: {err}");
        assert!(err.contains(&format!("so {flag} leaves it alone")), "{err}");
        assert_unchanged(&home.0, &before, &format!("{flag} changed files"));
    }
    // A plain file where the run directory would go.
    assert_refused(
        &home.0,
        &[
            "run",
            path.to_str().unwrap(),
            "--run-dir",
            "notes.txt",
            "--replace",
        ],
        "is not a directory",
        &home.0,
        &before,
    );
}

#[test]
fn replace_never_deletes_the_current_directory_or_a_parent_even_a_marked_one() {
    let home = users_home("parents");
    // A user who (wrongly) marked their working tree as a run.
    home.write(".hone-run", "{}");
    std::fs::create_dir_all(home.join("sub/deeper")).unwrap();
    home.write("sub/deeper/keep.txt", "keep");
    let path = home.write("p.toml", GOOD);
    let before = snapshot(&home.0);
    for (cwd, run_dir) in [
        (home.0.clone(), "."),
        (home.join("sub"), ".."),
        (home.join("sub/deeper"), "../.."),
        (home.join("sub/deeper"), home.0.to_str().unwrap()),
    ] {
        let p = path.to_str().unwrap();
        let args = ["run", p, "--run-dir", run_dir, "--replace"];
        assert_refused(&cwd, &args, "--replace refuses to delete", &home.0, &before);
    }
    // The directory holding the pipeline file being run, from elsewhere.
    let elsewhere = TempDir::new("elsewhere");
    let (p, h) = (path.to_str().unwrap(), home.0.to_str().unwrap());
    let args = ["run", p, "--run-dir", h, "--replace"];
    let needle = "the pipeline file being run";
    assert_refused(&elsewhere.0, &args, needle, &home.0, &before);
}

#[test]
fn replace_deletes_a_marked_run_and_only_it() {
    let home = users_home("replace-ok");
    home.write("runs/gen/stale.txt", "old");
    home.write("runs/other.txt", "a neighbour");
    let path = home.write("p.toml", GOOD);
    let (out, err) = run(&home.0, &["run", path.to_str().unwrap(), "-q", "--replace"]);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!home.join("runs/gen/stale.txt").exists());
    assert!(home.join("runs/gen/.hone-run").is_file());
    assert!(home.join("runs/other.txt").is_file());
    assert!(home.join("notes.txt").is_file() && home.join("data/pairs.jsonl").is_file());
}

/// The pipeline with its filter replaced by a fault of `mode`.
fn faulty(mode: &str, after: u64) -> String {
    GOOD.replace(
        "kind = \"filter.pairs\"",
        &format!("kind = \"testing.fault\"\nconfig = {{ mode = \"{mode}\", after = {after} }}"),
    )
    .replace("filter.pairs\"", "filter\"")
}

/// After a crash the run directory is whole and `--resume` finishes the run.
fn resume_after_crash(home: &TempDir, path: &Path) {
    let run_dir = home.join("runs/gen");
    assert!(run_dir.join(".hone-run").is_file());
    assert!(run_dir.join("pipeline.toml").is_file());
    let journal = run_dir.join("journal.jsonl");
    assert!(!journal.exists() || read_lines(&journal).is_empty());
    let (out, err) = run(
        &home.0,
        &[
            "run",
            path.to_str().unwrap(),
            "--resume",
            "-q",
            "--set",
            "filter.mode=error",
            "--set",
            "filter.after=1000",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(run_dir.join("attempts/0/pipeline.toml").is_file());
    assert_eq!(read_lines(&journal).len(), 1);
    assert_eq!(
        read_lines(&run_dir.join("outputs/write/records.jsonl")).len(),
        50
    );
}

#[test]
fn a_stage_that_aborts_is_named_with_its_round() {
    for workers in ["1", "2"] {
        let home = TempDir::new("abort");
        let path = home.write("p.toml", &faulty("abort", 5));
        let (out, err) = run(
            &home.0,
            &["run", path.to_str().unwrap(), "--workers", workers],
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(6), "{err}");
        assert!(
            err.contains("error: stage `filter` (testing.fault) on worker ")
                && err.contains(", in round 0 (on_batch) aborted the process (SIGABRT"),
            "{err}"
        );
        assert!(err.contains("--resume"), "{err}");
        resume_after_crash(&home, &path);
    }
}

#[test]
fn a_stage_that_calls_exit_is_named_and_hone_exits_1() {
    for code in [3, 0] {
        let home = TempDir::new("exit");
        let p = faulty("exit", 0).replace("after = 0", &format!("after = 0, exit_code = {code}"));
        let path = home.write("p.toml", &p);
        let (out, err) = run(&home.0, &["run", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "exit({code}): {err}");
        assert!(
            err.contains("error: stage `filter` (testing.fault) on worker 0, in round 0 (on_batch) ended the process by calling exit()"),
            "{err}"
        );
        resume_after_crash(&home, &path);
    }
}

#[test]
fn a_stalled_stage_is_stopped_by_the_stage_timeout() {
    let home = TempDir::new("hang");
    let path = home.write("p.toml", &faulty("hang", 0));
    let started = Instant::now();
    let (out, err) = run(
        &home.0,
        &[
            "run",
            path.to_str().unwrap(),
            "--stage-timeout",
            "2",
            "--workers",
            "2",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        err.contains("error: stage `filter` (testing.fault) on worker ")
            && err.contains("over the limit set by --stage-timeout (2 s)"),
        "{err}"
    );
    resume_after_crash(&home, &path);
    // The limit is a positive number of seconds.
    for bad in ["0", "-1", "soon"] {
        let (out, err) = run(
            &home.0,
            &["run", path.to_str().unwrap(), "--stage-timeout", bad],
        );
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--stage-timeout takes a whole number"),
            "{err}"
        );
    }
}

#[test]
fn a_stage_rejecting_its_config_leaves_nothing_behind() {
    let home = TempDir::new("reject");
    let read = "[pipeline]\nname = \"r\"\n\n[stages.read]\nkind = \"jsonl.read-pairs\"\nconfig = { path = \"PATH\" }\n\n[stages.write]\nkind = \"jsonl.write\"\ninputs = [\"read\"]\n";
    for (pipeline, run_dir) in [
        (read.replace("PATH", "missing.jsonl"), "runs/r"),
        (bad_regex_pipeline(), "runs/gen"),
    ] {
        let path = home.write("p.toml", &pipeline);
        for workers in ["1", "2"] {
            let (out, err) = run(
                &home.0,
                &["run", path.to_str().unwrap(), "--workers", workers],
            );
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(err.contains("rejected config"), "{err}");
            assert!(err.contains("nothing was written"), "{err}");
            assert!(!home.join(run_dir).exists(), "{run_dir} left behind: {err}");
        }
    }
    // The corrected re-run needs no --replace.
    home.write(
        "d.jsonl",
        "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
    );
    let path = home.write("p.toml", &read.replace("PATH", "d.jsonl"));
    let (out, err) = run(&home.0, &["run", path.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // A rejected --replace keeps the earlier run exactly as it was.
    let path = home.write("p.toml", &read.replace("PATH", "gone.jsonl"));
    let before = snapshot(&home.0);
    let (out, err) = run(&home.0, &["run", path.to_str().unwrap(), "--replace"]);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_unchanged(&home.0, &before, "this run");
    // So does a rejected --resume of an unfinished run: nothing moves to attempts/.
    let path = home.write("p.toml", &faulty("error", 0));
    let (out, _) = run(&home.0, &["run", path.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(1));
    let path = home.write("p.toml", &bad_regex_pipeline());
    let before = snapshot(&home.0);
    let (out, err) = run(&home.0, &["run", path.to_str().unwrap(), "--resume"]);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_unchanged(&home.0, &before, "this run");
    assert!(!home.join("runs/gen/attempts").exists());
}

fn bad_regex_pipeline() -> String {
    GOOD.replace(
        "inputs = [\"gen\"]",
        "inputs = [\"gen\"]\nconfig = { blocklist = [\"(\"] }",
    )
}

#[test]
fn resume_that_cannot_proceed_moves_nothing() {
    let home = TempDir::new("resume");
    let path = home.write("p.toml", &faulty("error", 0));
    let (out, _) = run(&home.0, &["run", path.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(1));
    // `attempts` taken by a file: the earlier attempt has nowhere to go.
    home.write("runs/gen/attempts", "not a directory");
    let before = snapshot(&home.0);
    let (out, err) = run(&home.0, &["run", path.to_str().unwrap(), "--resume"]);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("attempts is not a directory"), "{err}");
    assert_unchanged(&home.0, &before, "this run");
    // A run directory under a file cannot be made: said before anything runs.
    let (out, err) = run(
        &home.0,
        &["run", path.to_str().unwrap(), "--run-dir", "p.toml/run"],
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("p.toml/run"), "{err}");
    assert_unchanged(&home.0, &before, "this run");
}

#[test]
fn worker_and_process_counts_are_bounded_with_clear_messages() {
    let home = TempDir::new("counts");
    let path = home.write("p.toml", GOOD);
    let p = path.to_str().unwrap();
    for (args, needle) in [
        (
            &["--workers", "-5"][..],
            "--workers takes a whole number from 1 to 1024, not -5",
        ),
        (
            &["--workers", "100000"],
            "--workers takes a whole number from 1 to 1024, not 100000",
        ),
        (
            &["--workers", "0"],
            "--workers takes a whole number from 1 to 1024, not 0",
        ),
        (
            &["-w", "many"],
            "--workers takes a whole number from 1 to 1024, not \"many\"",
        ),
        (
            &["--processes", "-2"],
            "--processes takes a whole number from 1 to 1024",
        ),
        (
            &["--processes", "2", "--process", "2"],
            "--process 2 is not below --processes 2",
        ),
        (&["--process", "-1"], "--process takes this process's index"),
    ] {
        let mut all = vec!["run", p];
        all.extend_from_slice(args);
        let (out, err) = run(&home.0, &all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("-- -"), "clap's misleading tip: {err}");
    }
    assert!(!home.join("runs").exists());
}

#[test]
fn a_bad_hostfile_is_named_with_its_line() {
    let home = TempDir::new("hostfile");
    let path = home.write("p.toml", GOOD);
    let p = path.to_str().unwrap();
    for (hosts, needle) in [
        (
            "localhost:2101\nlocalhost\n",
            "hosts:2: \"localhost\" is not a process address (no `:PORT`)",
        ),
        (
            "localhost:2101\nlocalhost:http\n",
            "hosts:2: \"localhost:http\"",
        ),
        (
            "# only one\nlocalhost:2101\n",
            "1 process address for --processes 2",
        ),
    ] {
        home.write("hosts", hosts);
        let (out, err) = run(
            &home.0,
            &["run", p, "--processes", "2", "--hostfile", "hosts"],
        );
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let (out, err) = run(
        &home.0,
        &["run", p, "--processes", "2", "--hostfile", "absent"],
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--hostfile absent: cannot read it"), "{err}");
    assert!(!home.join("runs").exists());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn peers_that_never_come_time_out_with_a_clear_message() {
    let home = TempDir::new("peers");
    let path = home.write("p.toml", GOOD);
    let p = path.to_str().unwrap();
    home.write(
        "hosts",
        &format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()),
    );
    // Each process alone, with the hostfile; then process 1 without one,
    // looking for process 0 at localhost:2101.
    let cases = [
        (
            "0",
            Some("hosts"),
            "process 0 of 2: the other processes did not connect within 2 s",
        ),
        (
            "1",
            Some("hosts"),
            "process 1 of 2: the other processes did not connect within 2 s",
        ),
        ("1", None, "process 0 at localhost:2101"),
    ];
    for (process, hosts, needle) in cases {
        let run_dir = format!("run{process}{}", hosts.is_some());
        let mut args = vec!["run", p, "--processes", "2", "--process", process];
        args.extend(["--connect-timeout", "2", "--run-dir", &run_dir]);
        if let Some(h) = hosts {
            args.extend(["--hostfile", h]);
        }
        let started = Instant::now();
        let (out, err) = run(&home.0, &args);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn replace_and_resume_keep_what_the_pipeline_reads_and_where_the_user_is() {
    let home = users_home("inputs");
    // A pipeline that reads the very run it would replace.
    let reads_its_run = "[pipeline]\nname = \"gen\"\n\n[stages.read]\nkind = \"jsonl.read-pairs\"\n\
                         config = { path = \"runs/gen/outputs/write/records.jsonl\", format = \"trl\" }\n";
    let path = home.write("reads.toml", reads_its_run);
    let before = snapshot(&home.0);
    let p = path.to_str().unwrap();
    let needle = "it holds stage `read`'s input `path`";
    assert_refused(&home.0, &["run", p, "--replace"], needle, &home.0, &before);
    // --resume (of an unfinished run) would move it into attempts/: refused too.
    std::fs::remove_file(home.join("runs/gen/journal.jsonl")).unwrap();
    let before = snapshot(&home.0);
    assert_refused(&home.0, &["run", p, "--resume"], needle, &home.0, &before);
    // Standing inside the run directory, --resume would move the user's
    // current directory away.
    let inside = home.join("runs/gen/outputs");
    let good = home.write("good.toml", GOOD);
    let before = snapshot(&home.0);
    let g = good.to_str().unwrap();
    let args = ["run", g, "--run-dir", "..", "--resume"];
    let needle = "--resume refuses to move the files of";
    assert_refused(&inside, &args, needle, &home.0, &before);
}

#[test]
fn a_hostfile_line_holds_one_address() {
    let home = TempDir::new("hostline");
    let path = home.write("p.toml", GOOD);
    home.write("hosts", "localhost:2101 localhost:2102\nlocalhost:2103\n");
    let p = path.to_str().unwrap();
    let (out, err) = run(
        &home.0,
        &["run", p, "--processes", "2", "--hostfile", "hosts"],
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("hosts:1: one process address a line"), "{err}");
}
