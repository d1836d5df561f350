//! The hand-over between a stage that asks people for labels
//! (`human.label`) and `hone serve`, which shows the pairs in its page and
//! API and stores the answers. The two meet in the run directory, in files
//! each side writes atomically:
//!
//! - the stage writes `serve/queue/round-R/STAGE.json` (a [`Queue`]) at the
//!   round's end, then waits;
//! - the server shows its pairs, stores every answer in its database before
//!   acknowledging it, and once every pair has one writes
//!   `serve/labels/round-R/STAGE.jsonl` (one [`Answer`] a line);
//! - the stage reads the answers and emits the labelled pairs.
//!
//! Files, not a channel: the database stays in the runtime alone (a second
//! copy of SQLite inside a plugin would break its file locks), and after a
//! crash both sides pick up where the files say, so a resumed round sees
//! every label acknowledged before the crash.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where `hone serve` notes that it is serving this run directory.
pub const SERVING: &str = "serve/serving.json";

/// What [`SERVING`] holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Serving {
    /// The serving process: a stage in another process (a `hone run` of the
    /// same directory) finds no server waiting for its queue.
    pub pid: u32,
    /// The address the server listens on.
    pub addr: String,
}

/// One round's pairs awaiting labels from one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    /// The round.
    pub round: u64,
    /// The asking stage's id.
    pub stage: String,
    /// The pairs, in the order the stage will read their answers back.
    pub pairs: Vec<QueuedPair>,
}

/// A pair as people see it: `a` is shown first (on the left), `b` second.
/// The stage chose the order at random and keeps which is which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedPair {
    /// The candidate pair's id (unique within the stage's round).
    pub pair_id: String,
    /// The shared prompt.
    pub prompt: String,
    /// The response shown first.
    pub a: String,
    /// The response shown second.
    pub b: String,
    /// The simulated world's gold reward of `a` and `b`, for a simulated
    /// annotator (`hone annotate`); only with `gold_hint = true`, never
    /// shown on the page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<[f64; 2]>,
}

/// A person's answer to one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// The response shown first is better.
    A,
    /// The response shown second is better.
    B,
    /// Neither is better.
    Tie,
    /// The person declined to judge.
    Skip,
}

impl Choice {
    /// The name used in the API, the database and the files.
    pub fn as_str(self) -> &'static str {
        match self {
            Choice::A => "a",
            Choice::B => "b",
            Choice::Tie => "tie",
            Choice::Skip => "skip",
        }
    }

    /// Parses [`Choice::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Choice> {
        Some(match s {
            "a" => Choice::A,
            "b" => Choice::B,
            "tie" => Choice::Tie,
            "skip" => Choice::Skip,
            _ => return None,
        })
    }
}

/// The answer recorded for one queued pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The pair.
    pub pair_id: String,
    /// What the person chose.
    pub choice: Choice,
    /// Who answered (as the client named them).
    pub annotator: String,
    /// [`digest`] of the pair as it was shown: an answers file left by an
    /// earlier attempt of the round, whose pairs differ, is never taken
    /// for this one's.
    pub digest: String,
}

/// A pair's fingerprint as shown: its prompt and both responses in their
/// positions.
pub fn digest(pair: &QueuedPair) -> String {
    let text = format!("{}\0{}\0{}\0{}", pair.pair_id, pair.prompt, pair.a, pair.b);
    format!("{:016x}", crate::text::stable_hash(text.as_bytes()))
}

/// Whether `answers` answer exactly `queue`'s pairs, as they were shown.
pub fn answers_match(queue: &Queue, answers: &[Answer]) -> bool {
    answers.len() == queue.pairs.len()
        && queue
            .pairs
            .iter()
            .zip(answers)
            .all(|(p, a)| a.pair_id == p.pair_id && a.digest == digest(p))
}

/// `serve/queue/round-R/STAGE.json` under `run_dir`.
pub fn queue_path(run_dir: &Path, round: u64, stage: &str) -> PathBuf {
    run_dir
        .join("serve/queue")
        .join(format!("round-{round}"))
        .join(format!("{stage}.json"))
}

/// `serve/labels/round-R/STAGE.jsonl` under `run_dir`.
pub fn answers_path(run_dir: &Path, round: u64, stage: &str) -> PathBuf {
    run_dir
        .join("serve/labels")
        .join(format!("round-{round}"))
        .join(format!("{stage}.jsonl"))
}

/// Reads an answers file: one [`Answer`] a line.
pub fn read_answers(path: &Path) -> Result<Vec<Answer>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}
