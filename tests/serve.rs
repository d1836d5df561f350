//! `hone serve`: the online loop with labels arriving over HTTP. Its API
//! refuses what it must (tokens, sizes, fields) and escapes user text; a
//! served run without a last round stops on SIGTERM and resumes; and
//! killed with SIGKILL at random points while an annotator posts labels,
//! it loses no acknowledged label, counts none twice, and ends with the
//! artifacts of a run that was never interrupted.

use hone::annotate::request;
use hone_tests::{hone_bin, read_lines, text, TempDir};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A small online loop: reward models learn seed labels in round 0; from
/// round 1 the policy samples, the ensemble's most disputed pairs go to
/// `ask` (people, with gold hints for the simulated annotator), and the
/// members continue on the growing pool; DPO trains the policy.
pub const LOOP: &str = r#"[pipeline]
name = "serve-loop"
rounds = 5
seed = 5

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
config = { d_model = 32, n_layers = 1, n_heads = 2, context = 64, steps = 60, batch_size = 8, lr = 3e-3, eval_every = 0, checkpoint_every = 0 }

[stages.seed_answers]
kind = "world.demos"
inputs = "sft_prompts"
config = { quality = 0.5, samples = 3 }

[stages.seed_labels]
kind = "world.label"
inputs = "seed_answers"

[stages.rm]
kind = "rm.train"
inputs = { pairs = ["seed_labels", "ask"], init = "sft.policy" }
config = { members = 2, init = "input", train_on = "all", start = "last", steps = 5, batch_size = 8, eval_every = 0 }

[stages.prompts]
kind = "world.prompts"
config = { count = 8, seed = 3, first_round = 1 }

[stages.rollout]
kind = "lm.rollout"
inputs = { prompts = "prompts", policy = "sft.policy" }
feedback = { policy = "dpo.policy" }
config = { n = 3, max_new_tokens = 12 }

[stages.gold]
kind = "world.gold"
inputs = "rollout"

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
inputs = { completions = "rollout", scores = ["proxy.scores", "gold.scores"] }
config = { strategy = "all" }

[stages.strength]
kind = "rm.strength"
inputs = { pairs = "candidates" }
feedback = { models = "rm.models" }

[stages.select]
kind = "filter.select-pairs"
inputs = "strength"
config = { budget = 6 }

[stages.ask]
kind = "human.label"
inputs = { pairs = "select.selected" }
config = { gold_hint = true, poll_ms = 10 }
"#;

/// Pairs from a file, asked of people once, written out: for the API and
/// the page. Their texts carry markup that must stay text.
pub const ASK: &str = r#"[pipeline]
name = "serve-ask"
rounds = 1

[stages.read]
kind = "jsonl.read-pairs"
config = { path = "pairs.jsonl", format = "trl" }

[stages.ask]
kind = "human.label"
inputs = "read"

[stages.write]
kind = "jsonl.write"
inputs = "ask"
"#;

/// Markup in a prompt and responses: shown as text, never run.
pub const XSS: &str = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">";

/// Writes `n` pairs whose chosen response starts with `good`.
pub fn write_pairs(dir: &TempDir, n: usize) {
    let lines: String = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Question {i}? {XSS}"),
                "chosen": format!("good answer {i} <b>bold</b>"),
                "rejected": format!("bad answer {i} {XSS}"),
            })
            .to_string()
                + "\n"
        })
        .collect();
    dir.write("pairs.jsonl", &lines);
}

/// A `hone serve` process.
pub struct Served {
    /// The process.
    pub child: Child,
    /// Its run directory.
    pub run_dir: PathBuf,
    /// Where it listens.
    pub addr: String,
    /// Its bearer token.
    pub token: String,
}

impl Served {
    /// Starts `hone serve FILE` on a free loopback port and waits until it listens.
    pub fn start(cwd: &Path, file: &Path, run_dir: &Path, extra: &[&str]) -> Served {
        let mut child = Command::new(hone_bin())
            .args(["serve", file.to_str().unwrap(), "--run-dir"])
            .arg(run_dir)
            .args(["--addr", "127.0.0.1:0", "-q"])
            .args(extra)
            .current_dir(cwd)
            .env_remove("HONE_PLUGIN_PATH")
            .env_remove("HONE_SERVE_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hone serve starts");
        let serving = run_dir.join("serve/serving.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let noted: Option<Value> = std::fs::read(&serving)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(v) = noted.filter(|v| v["pid"] == child.id()) {
                let token = std::fs::read_to_string(run_dir.join("serve/token")).unwrap();
                return Served {
                    addr: v["addr"].as_str().unwrap().to_string(),
                    token: token.trim().to_string(),
                    child,
                    run_dir: run_dir.to_path_buf(),
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "hone serve exited ({status}) before listening: {:?}",
                    text(&out)
                );
            }
            assert!(
                Instant::now() < deadline,
                "hone serve did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A request with the token.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.addr, method, path, &self.token, body).expect("the server answers")
    }

    /// The pairs awaiting labels, once at least `n` are listed.
    pub fn pending(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.call("GET", "/api/pairs?limit=1000", None);
            assert_eq!(status, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            let pairs = v["pairs"].as_array().unwrap().clone();
            if pairs.len() >= n {
                return pairs;
            }
            assert!(
                Instant::now() < deadline,
                "{n} pairs never arrived ({} did)",
                pairs.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits for the process to exit; its code and output.
    pub fn wait(self, within: Duration) -> (Option<i32>, String, String) {
        let mut child = self.child;
        let deadline = Instant::now() + within;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("hone serve did not exit in {within:?}: {:?}", text(&out));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let (o, e) = text(&out);
        (out.status.code(), o, e)
    }
}

/// The label a person who prefers `good` answers would give.
fn good_choice(pair: &Value) -> &'static str {
    if pair["a"].as_str().unwrap().starts_with("good") {
        "a"
    } else {
        "b"
    }
}

fn label(client_id: &str, item: &Value, choice: &str, annotator: &str) -> String {
    serde_json::json!({"client_id": client_id, "item": item, "choice": choice, "annotator": annotator})
        .to_string()
}

#[test]
fn the_api_checks_tokens_sizes_and_fields_escapes_markup_and_survives_sigterm() {
    let dir = TempDir::new("serve-api");
    write_pairs(&dir, 3);
    let file = dir.write("ask.toml", ASK);
    let run_dir = dir.join("runs/ask");
    let s = Served::start(&dir.0, &file, &run_dir, &[]);
    let pairs = s.pending(3);

    // Tokens: none, or a wrong one, is 401; the page itself needs none.
    let (status, _) = request(&s.addr, "GET", "/api/pairs", "", None).unwrap();
    assert_eq!(status, 401);
    let (status, body) = request(&s.addr, "POST", "/api/labels", "wrong", Some("{}")).unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, page) = request(&s.addr, "GET", "/", "", None).unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("page.js") && !page.contains("http"),
        "no outside references"
    );

    // Sizes and fields.
    let big = format!("{{\"client_id\": \"{}\"}}", "x".repeat(100_000));
    assert_eq!(s.call("POST", "/api/labels", Some(&big)).0, 413);
    let (status, body) = s.call(
        "POST",
        "/api/labels",
        Some("{\"client_id\": \"c\", \"item\": 1}"),
    );
    assert_eq!(status, 400);
    assert!(body.contains("`choice`"), "{body}");
    let (status, body) = s.call("POST", "/api/labels", Some("not json"));
    assert_eq!(status, 400);
    assert!(body.contains("not JSON"), "{body}");
    let (status, _) = s.call(
        "POST",
        "/api/labels",
        Some(&label("c0", &Value::from(99_999), "a", "x")),
    );
    assert_eq!(status, 404);
    assert_eq!(s.call("GET", "/api/pairs?limit=0", None).0, 400);

    // Markup posted by a client and queued by a stage comes back escaped.
    let first = &pairs[0];
    let body = label("c1", &first["item"], good_choice(first), XSS);
    let (status, reply) = s.call("POST", "/api/labels", Some(&body));
    assert_eq!(status, 200, "{reply}");
    // A retry of the same label is counted once; another label for the pair is refused.
    let (status, reply) = s.call("POST", "/api/labels", Some(&body));
    assert_eq!(status, 200);
    assert!(reply.contains("\"duplicate\":true"), "{reply}");
    let (status, _) = s.call(
        "POST",
        "/api/labels",
        Some(&label("c2", &first["item"], "b", "y")),
    );
    assert_eq!(status, 409);
    for path in ["/api/pairs", "/api/status", "/api/artifacts"] {
        let (status, body) = s.call("GET", path, None);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.contains('<') && !body.contains('>'), "{path}: {body}");
    }
    let (_, listed) = s.call("GET", "/api/pairs", None);
    assert!(listed.contains("\\u003cscript\\u003e"), "{listed}");
    let (_, status) = s.call("GET", "/api/status", None);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["labels_total"], 1);
    assert_eq!(status["queue_depth"], 2);
    assert_eq!(status["waiting_for_labels"], true);
    let (_, metrics) = request(&s.addr, "GET", "/metrics", "", None).unwrap();
    let choice = good_choice(first);
    assert!(
        metrics.contains(&format!("hone_labels_total{{choice=\"{choice}\"}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains("hone_queue_depth 2"), "{metrics}");

    // SIGTERM while the round waits for people: exit 0 at once, labels kept.
    s.signal("TERM");
    let (code, _, err) = s.wait(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");

    // Restarted, it asks only what is still unanswered, and ends the round
    // once every pair has an answer.
    let s = Served::start(&dir.0, &file, &run_dir, &[]);
    let rest = s.pending(2);
    assert_eq!(rest.len(), 2, "the answered pair is not asked again");
    assert!(rest.iter().all(|p| p["pair_id"] != first["pair_id"]));
    for (i, p) in rest.iter().enumerate() {
        let (status, reply) = s.call(
            "POST",
            "/api/labels",
            Some(&label(&format!("r{i}"), &p["item"], good_choice(p), "ann")),
        );
        assert_eq!(status, 200, "{reply}");
    }
    let (code, _, err) = s.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let written: Vec<Value> = read_lines(&run_dir.join("outputs/write/records.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written.len(), 3, "every acknowledged label, once");
    for pair in &written {
        assert!(
            pair["chosen"].as_str().unwrap().starts_with("good"),
            "{pair}"
        );
        assert_eq!(pair["label_source"], "human");
    }
    let annotators: BTreeSet<&str> = written
        .iter()
        .map(|r| r["meta"]["annotator"].as_str().unwrap())
        .collect();
    assert!(annotators.contains(XSS) && annotators.contains("ann"));
}

#[test]
fn hone_run_refuses_people_and_endless_rounds_and_replace_keeps_labels() {
    let dir = TempDir::new("serve-refuse");
    write_pairs(&dir, 1);
    let file = dir.write("ask.toml", ASK);
    let out = Command::new(hone_bin())
        .args(["run", file.to_str().unwrap(), "--run-dir", "runs/x", "-q"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("hone serve"), "{err}");
    let endless = dir.write("endless.toml", &ASK.replace("rounds = 1", "rounds = 0"));
    let out = Command::new(hone_bin())
        .args(["run", endless.to_str().unwrap(), "-q"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rounds = 0") && err.contains("hone serve"),
        "{err}"
    );
    // A served run directory holds people's labels: --replace leaves it.
    let run_dir = dir.join("runs/served");
    let s = Served::start(&dir.0, &file, &run_dir, &[]);
    s.pending(1);
    // While it serves, neither a second server nor `hone run` touches it.
    for args in [
        vec![
            "serve",
            "ask.toml",
            "--addr",
            "127.0.0.1:0",
            "-q",
            "--run-dir",
        ],
        vec!["run", "ask.toml", "--resume", "-q", "--run-dir"],
    ] {
        let out = Command::new(hone_bin())
            .args(&args)
            .arg(&run_dir)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("being served"), "{args:?}: {err}");
    }
    s.signal("TERM");
    assert_eq!(s.wait(Duration::from_secs(20)).0, Some(0));
    let out = Command::new(hone_bin())
        .args(["run", file.to_str().unwrap(), "--run-dir"])
        .arg(&run_dir)
        .args(["--replace", "-q"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("people's labels"), "{err}");
    assert!(run_dir.join("serve/feedback.db").is_file());
}

fn journal_rounds(run_dir: &Path) -> Vec<u64> {
    let path = run_dir.join("journal.jsonl");
    if !path.exists() {
        return Vec::new();
    }
    read_lines(&path)
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["round"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn wait_for_rounds(run_dir: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while journal_rounds(run_dir).len() < n {
        assert!(Instant::now() < deadline, "{n} rounds never completed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn without_a_last_round_it_runs_until_sigterm_and_resumes_where_it_stopped() {
    let dir = TempDir::new("serve-endless");
    let file = dir.write("loop.toml", &LOOP.replace("rounds = 5", "rounds = 0"));
    let run_dir = dir.join("runs/endless");
    let s = Served::start(&dir.0, &file, &run_dir, &["--simulate-annotator"]);
    wait_for_rounds(&run_dir, 3);
    // While it runs: status, the learners' figures, and the newest models.
    // Status counts a round once the journal on disk names it, so it may
    // trail the journal file by the moment between the write and the count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let (_, status) = s.call("GET", "/api/status", None);
        let status: Value = serde_json::from_str(&status).unwrap();
        if status["rounds_completed"].as_u64().unwrap() >= 3 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "status never caught up: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status["labels_total"].as_u64().unwrap() >= 12, "{status}");
    let (_, metrics) = request(&s.addr, "GET", "/metrics", "", None).unwrap();
    for needle in [
        "hone_rounds_completed ",
        "hone_stage_seconds_total{stage=\"dpo\"}",
        "hone_stage_metric{stage=\"dpo\",name=\"rewards/margins\"}",
        "hone_stage_metric{stage=\"ask\",name=\"first_share\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} in {metrics}");
    }
    let (status, listed) = s.call("GET", "/api/artifacts", None);
    assert_eq!(status, 200);
    assert!(
        listed.contains("\"policy\"") && listed.contains("\"reward-model\""),
        "{listed}"
    );
    for kind in ["policy", "reward-model"] {
        let (status, tar) = s.call("GET", &format!("/api/artifacts/{kind}"), None);
        assert_eq!(status, 200, "{kind}");
        assert_eq!(tar.get(257..262), Some("ustar"), "{kind}: a tar archive");
    }
    assert_eq!(s.call("GET", "/api/artifacts/nosuch", None).0, 404);
    s.signal("TERM");
    let (code, _, err) = s.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let first = journal_rounds(&run_dir);
    assert_eq!(first, (0..first.len() as u64).collect::<Vec<_>>());
    let s = Served::start(&dir.0, &file, &run_dir, &["--simulate-annotator"]);
    wait_for_rounds(&run_dir, first.len() + 2);
    s.signal("TERM");
    let (code, _, err) = s.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let rounds = journal_rounds(&run_dir);
    assert_eq!(
        rounds,
        (0..rounds.len() as u64).collect::<Vec<_>>(),
        "each round once, in order"
    );
    assert!(run_dir
        .join(format!("snapshots/round-{}", rounds.len() - 1))
        .is_dir());
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

/// The labels in a run's database: client id -> item.
fn stored_labels(run_dir: &Path) -> BTreeMap<String, i64> {
    let db = rusqlite::Connection::open(run_dir.join("serve/feedback.db")).unwrap();
    let mut stmt = db.prepare("SELECT client_id, item FROM labels").unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

#[test]
fn killed_at_random_points_it_loses_no_acknowledged_label_and_ends_as_if_never_killed() {
    let dir = TempDir::new("serve-kill");
    let file = dir.write("loop.toml", LOOP);
    // Uninterrupted, with the annotator in the process.
    let whole = dir.join("runs/whole");
    let s = Served::start(&dir.0, &file, &whole, &["--simulate-annotator"]);
    let (code, _, err) = s.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    let expected = artifacts(&whole);
    let expected_labels = stored_labels(&whole);
    assert_eq!(
        expected_labels.len(),
        4 * 6,
        "6 pairs in each of rounds 1-4"
    );

    // Killed again and again while an annotator in another process posts.
    let run_dir = dir.join("runs/killed");
    let acks = dir.join("acks.txt");
    let mut s = Served::start(&dir.0, &file, &run_dir, &[]);
    let mut annotator = Command::new(hone_bin())
        .args(["annotate", "--run-dir"])
        .arg(&run_dir)
        .args(["--annotator", "simulated", "--give-up", "120", "--ack-log"])
        .arg(&acks)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A seeded sequence of delays: the kills land in every phase of a round.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    let finished = loop {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(150 + (state >> 33) % 900);
        let deadline = Instant::now() + delay;
        let mut exited = None;
        while Instant::now() < deadline {
            if let Some(status) = s.child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = exited {
            break status;
        }
        if kills >= 12 {
            // Enough: let it finish.
            let (code, _, err) = s.wait(Duration::from_secs(120));
            assert_eq!(code, Some(0), "{err}");
            break std::process::ExitStatus::default();
        }
        s.child.kill().unwrap(); // SIGKILL
        s.child.wait().unwrap();
        kills += 1;
        s = Served::start(&dir.0, &file, &run_dir, &[]);
    };
    assert!(finished.success(), "{finished}");
    assert!(kills >= 10, "only {kills} kills before the run ended");
    let _ = annotator.kill();
    let _ = annotator.wait();

    // Every acknowledged label is stored, once; nothing else is.
    let stored = stored_labels(&run_dir);
    let acked: BTreeSet<String> = std::fs::read_to_string(&acks)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    for id in &acked {
        assert!(stored.contains_key(id), "acknowledged label {id} lost");
    }
    assert_eq!(
        stored.keys().collect::<BTreeSet<_>>(),
        expected_labels.keys().collect::<BTreeSet<_>>(),
        "the same labels as the uninterrupted run, each once"
    );
    let items: BTreeSet<i64> = stored.values().copied().collect();
    assert_eq!(items.len(), stored.len(), "one label per pair");
    assert_eq!(artifacts(&run_dir), expected, "after {kills} kills");
}

/// Chrome DevTools Protocol over a WebSocket: one call, its result.
struct Devtools {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
}

impl Devtools {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.socket
            .send(tungstenite::Message::Text(msg.to_string().into()))
            .unwrap();
        loop {
            let reply = self.socket.read().unwrap();
            let Ok(text) = reply.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expression, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy; its value.
    fn until(&mut self, expression: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(expression);
            if !(v.is_null() || v == false || v == "") {
                return v;
            }
            assert!(Instant::now() < deadline, "never true: {expression}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Presses and releases a key that types `key`.
    fn press(&mut self, key: &str) {
        let code = key.chars().next().unwrap() as u32;
        for kind in ["keyDown", "keyUp"] {
            let mut p =
                serde_json::json!({"type": kind, "key": key, "windowsVirtualKeyCode": code});
            if kind == "keyDown" {
                p["text"] = Value::from(key);
            }
            self.call("Input.dispatchKeyEvent", p);
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            _ => 63,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, c)| acc | (value(*c) << (18 - 6 * i)));
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn chromium_labels_pairs_with_the_keyboard_on_a_phone_sized_page() {
    let found = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output();
    assert!(
        found.map(|o| o.status.success()).unwrap_or(false),
        "chromium is not installed: `.ci/run` installs it (apt-get install chromium)"
    );
    let dir = TempDir::new("serve-page");
    write_pairs(&dir, 2);
    let file = dir.write("ask.toml", ASK);
    let run_dir = dir.join("runs/page");
    let s = Served::start(&dir.0, &file, &run_dir, &[]);
    s.pending(2);
    let profile = dir.join("chrome");
    let mut chromium = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=390,844",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{}/#token={}", s.addr, s.token))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    // Chromium writes the port it chose here.
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Ok(t) = std::fs::read_to_string(profile.join("DevToolsActivePort")) {
            if let Some(p) = t.lines().next().filter(|p| !p.is_empty()) {
                break p.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "chromium's DevTools never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let devtools_addr = format!("127.0.0.1:{port}");
    let page_ws = loop {
        let (_, list) = request(&devtools_addr, "GET", "/json/list", "", None).unwrap();
        let list: Value = serde_json::from_str(&list).unwrap_or(Value::Null);
        let page = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page" && t["url"].as_str().unwrap_or("").contains(&s.addr));
        if let Some(p) = page {
            break p["webSocketDebuggerUrl"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no page in {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (socket, _) = tungstenite::connect(page_ws.as_str()).expect("DevTools WebSocket");
    let mut dt = Devtools { socket, next: 0 };
    dt.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    );
    dt.until(
        "!document.getElementById('task').hidden && document.getElementById('prompt').textContent",
    );
    let shown = dt.eval(
        "JSON.stringify({prompt: document.getElementById('prompt').textContent, \
         a: document.getElementById('a').textContent, b: document.getElementById('b').textContent, \
         pwned: typeof window.pwned, images: document.querySelectorAll('img, main b').length, \
         overflow: document.documentElement.scrollWidth > window.innerWidth, \
         progress: document.getElementById('progress').textContent})",
    );
    let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert!(
        shown["prompt"].as_str().unwrap().contains(XSS),
        "markup shown as text: {shown}"
    );
    assert_eq!(shown["pwned"], "undefined", "no script ran: {shown}");
    assert_eq!(shown["images"], 0, "no markup became elements: {shown}");
    assert_eq!(shown["overflow"], false, "fits a phone's width: {shown}");
    assert!(
        shown["progress"].as_str().unwrap().contains("2 awaiting"),
        "{shown}"
    );
    let shot = dt.call(
        "Page.captureScreenshot",
        serde_json::json!({"format": "png"}),
    );
    let png = base64_decode(shot["data"].as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target = hone_tests::workspace().join("target/serve-page.png");
    std::fs::write(&target, &png).unwrap();
    if std::env::var_os("HONE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(hone_tests::workspace().join("docs/serve-page.png"), &png).unwrap();
    }

    // 1 picks the response shown first; then the next pair comes, and 2 the second.
    let first_a = shown["a"].as_str().unwrap().to_string();
    let first_prompt = shown["prompt"].as_str().unwrap().to_string();
    dt.press("1");
    let next = dt.until(&format!(
        "document.getElementById('prompt').textContent !== {} && document.getElementById('b').textContent",
        Value::from(first_prompt.clone())
    ));
    let second_b = next.as_str().unwrap().to_string();
    dt.until("document.getElementById('progress').textContent.startsWith('1 labelled')");
    dt.press("2");
    let (code, _, err) = s.wait(Duration::from_secs(60));
    let _ = chromium.kill();
    let _ = chromium.wait();
    assert_eq!(code, Some(0), "{err}");
    let written: Vec<Value> = read_lines(&run_dir.join("outputs/write/records.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written.len(), 2, "both key presses arrived as labels");
    let first = written
        .iter()
        .find(|p| p["prompt"] == first_prompt.as_str())
        .unwrap();
    assert_eq!(first["chosen"], first_a.as_str());
    assert_eq!(first["meta"]["shown"], "a");
    let second = written
        .iter()
        .find(|p| p["prompt"] != first_prompt.as_str())
        .unwrap();
    assert_eq!(second["chosen"], second_b.as_str());
    assert_eq!(second["meta"]["shown"], "b");
}

#[test]
fn a_bounded_load_of_concurrent_clients_loses_no_label() {
    let dir = TempDir::new("serve-load");
    write_pairs(&dir, 300);
    let file = dir.write("ask.toml", ASK);
    let run_dir = dir.join("runs/load");
    let s = Served::start(&dir.0, &file, &run_dir, &[]);
    let items: Vec<i64> = s
        .pending(300)
        .iter()
        .map(|p| p["item"].as_i64().unwrap())
        .collect();
    let report = hone::serve::load::run(&s.addr, &s.token, &items, 8, Duration::from_secs(2));
    println!(
        "load: 8 clients, {} labels in {:.2} s: {:.0} labels/s, p50 {:.1} ms, p99 {:.1} ms",
        report.acked.len(),
        report.elapsed.as_secs_f64(),
        report.rate(),
        report.quantile_ms(0.5),
        report.quantile_ms(0.99)
    );
    assert_eq!(report.failed, 0);
    assert!(!report.acked.is_empty());
    s.signal("TERM");
    assert_eq!(s.wait(Duration::from_secs(30)).0, Some(0));
    let stored = stored_labels(&run_dir);
    let acked: BTreeSet<&String> = report.acked.iter().collect();
    assert_eq!(
        stored.keys().collect::<BTreeSet<_>>(),
        acked,
        "every acknowledged label stored, nothing else"
    );
}
