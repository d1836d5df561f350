//! `hone-bench serve`: the label endpoint under load. A served run with a
//! queue of pairs; N clients post labels over loopback, each request on a
//! fresh connection, for a fixed time; then the database is checked
//! against what was acknowledged. Prints labels/s and latency quantiles
//! for each client count (medians over the repeats).

use crate::median;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The benchmark's settings.
pub struct ServeBench {
    /// Client counts to measure.
    pub clients: Vec<usize>,
    /// Seconds each load runs.
    pub seconds: u64,
    /// Repeats of each (a fresh server and database each).
    pub repeats: usize,
}

const PIPELINE: &str = r#"[pipeline]
name = "serve-load"
rounds = 1

[stages.read]
kind = "jsonl.read-pairs"
config = { path = "pairs.jsonl", format = "trl" }

[stages.ask]
kind = "human.label"
inputs = "read"
"#;

/// One server, one load: (labels/s, p50 ms, p99 ms).
fn once(hone: &Path, dir: &Path, clients: usize, seconds: u64) -> (f64, f64, f64) {
    let run_dir = dir.join(format!("run-{clients}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let mut child = Command::new(hone)
        .args(["serve", "load.toml", "--run-dir"])
        .arg(&run_dir)
        .args(["--addr", "127.0.0.1:0", "-q"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("hone serve starts");
    let serving = run_dir.join(hone_sdk::feedback::SERVING);
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = loop {
        let v: Option<serde_json::Value> = std::fs::read(&serving)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(v) = v.filter(|v| v["pid"] == child.id()) {
            break v["addr"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "hone serve never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    let token = std::fs::read_to_string(run_dir.join("serve/token")).unwrap();
    let token = token.trim();
    // The queue is in the database once the stage has written it.
    let db = rusqlite::Connection::open(run_dir.join("serve/feedback.db")).unwrap();
    let items: Vec<i64> = loop {
        let items: Vec<i64> = db
            .prepare("SELECT item FROM items ORDER BY item")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_default();
        if items.len() >= 50_000 {
            break items;
        }
        assert!(Instant::now() < deadline, "the queue never arrived");
        std::thread::sleep(Duration::from_millis(50));
    };
    let report =
        hone::serve::load::run(&addr, token, &items, clients, Duration::from_secs(seconds));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let stored: std::collections::BTreeSet<String> = db
        .prepare("SELECT client_id FROM labels")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .unwrap();
    let acked: std::collections::BTreeSet<String> = report.acked.iter().cloned().collect();
    assert_eq!(
        stored, acked,
        "the database holds exactly the acknowledged labels"
    );
    assert_eq!(report.failed, 0, "no request failed");
    let _ = std::fs::remove_dir_all(&run_dir);
    (
        report.rate(),
        report.quantile_ms(0.5),
        report.quantile_ms(0.99),
    )
}

/// Runs the benchmark and prints its table.
pub fn run(b: ServeBench) {
    let hone: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("hone");
    assert!(
        hone.is_file(),
        "{} is missing: cargo build first",
        hone.display()
    );
    let dir = std::env::temp_dir().join(format!("hone-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lines: String = (0..50_000)
        .map(|i| {
            serde_json::json!({"prompt": format!("q{i}"), "chosen": format!("c{i}"), "rejected": format!("r{i}")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), lines).unwrap();
    std::fs::write(dir.join("load.toml"), PIPELINE).unwrap();
    println!(
        "# hone serve: POST /api/labels on loopback, a fresh connection a request, SQLite WAL + synchronous=FULL\n\
         # {} s a load, median of {} (a fresh server each); every acknowledged label checked in the database\n",
        b.seconds, b.repeats
    );
    println!("| clients | labels/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    for &clients in &b.clients {
        let runs: Vec<(f64, f64, f64)> = (0..b.repeats)
            .map(|_| once(&hone, &dir, clients, b.seconds))
            .collect();
        println!(
            "| {clients} | {:.0} | {:.1} | {:.1} |",
            median(runs.iter().map(|r| r.0).collect()),
            median(runs.iter().map(|r| r.1).collect()),
            median(runs.iter().map(|r| r.2).collect()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
