//! The run directory: the resolved pipeline, `manifest.jsonl`,
//! `metrics.jsonl`, `journal.jsonl` and the stages' outputs. Every file is
//! written atomically (temp file, fsync, rename).

use crate::dataflow::RoutedEvent;
use hone_sdk::fs::atomic_write;
use hone_sdk::Event;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to do when the run directory already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the default: nothing is overwritten silently).
    Refuse,
    /// Delete it and start over.
    Replace,
    /// Keep it: a finished run is left as it is; an unfinished one is re-run,
    /// its earlier files moved to `attempts/N/`.
    Resume,
}

/// What `prepare` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Run into the directory.
    Run,
    /// The journal says every round completed: nothing to do.
    AlreadyComplete,
}

/// Makes the run directory ready, honouring `existing`.
pub fn prepare(dir: &Path, existing: Existing, rounds: u64) -> Result<Prepared, String> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        match existing {
            Existing::Refuse => {
                return Err(format!(
                    "run directory {} already exists: pass --resume to continue it, --replace to \
                     delete it and start over, or --run-dir to pick another",
                    dir.display()
                ))
            }
            Existing::Replace => std::fs::remove_dir_all(dir)
                .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?,
            Existing::Resume => {
                if completed_rounds(dir) >= rounds && rounds > 0 {
                    return Ok(Prepared::AlreadyComplete);
                }
                let attempts = dir.join("attempts");
                let n = std::fs::read_dir(&attempts).map(|d| d.count()).unwrap_or(0);
                let target = attempts.join(n.to_string());
                std::fs::create_dir_all(&target)
                    .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
                for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
                    if entry.file_name() != "attempts" {
                        std::fs::rename(entry.path(), target.join(entry.file_name()))
                            .map_err(|e| format!("cannot move {}: {e}", entry.path().display()))?;
                    }
                }
            }
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create run directory {}: {e}", dir.display()))?;
    Ok(Prepared::Run)
}

/// Rounds recorded as complete in the run's journal.
pub fn completed_rounds(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("journal.jsonl"))
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("\"completed\":true"))
                .count() as u64
        })
        .unwrap_or(0)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Worker 0's writer of metrics, manifest and journal.
pub struct EventLog {
    dir: PathBuf,
    rounds: u64,
    metrics: String,
    manifest: String,
    journal: String,
    completed: u64,
    dirty: bool,
    last_write: Instant,
}

impl EventLog {
    /// A log writing into `dir`.
    pub fn new(dir: &Path, rounds: u64) -> Self {
        EventLog {
            dir: dir.to_path_buf(),
            rounds,
            metrics: String::new(),
            manifest: String::new(),
            journal: String::new(),
            completed: 0,
            dirty: true,
            last_write: Instant::now(),
        }
    }

    /// Adds an event.
    pub fn record(&mut self, e: RoutedEvent) {
        let line = match e.event {
            Event::Metric { name, value, step } => {
                let line = serde_json::json!({
                    "stage": e.stage, "round": e.round, "worker": e.worker,
                    "name": name, "value": value, "step": step, "time": now(),
                });
                self.metrics.push_str(&line.to_string());
                &mut self.metrics
            }
            Event::Artifact {
                artifact,
                inputs,
                lineage,
            } => {
                let line = serde_json::json!({
                    "id": artifact.id, "kind": artifact.kind, "path": artifact.path,
                    "sha256": artifact.sha256, "stage": e.stage, "round": artifact.round,
                    "inputs": inputs, "lineage": lineage, "time": now(),
                });
                self.manifest.push_str(&line.to_string());
                &mut self.manifest
            }
            Event::Progress { .. } | Event::Log { .. } => return,
        };
        line.push('\n');
        self.dirty = true;
    }

    /// Called with the sink's frontier: journals completed rounds and writes
    /// the files when a round completes, the run ends, or 2 s have passed.
    /// After a failure (`aborted`) the frontier runs out without the rounds
    /// completing, so nothing more is journalled.
    pub fn advance(&mut self, frontier: Option<u64>, aborted: bool) {
        let done_up_to = match frontier {
            _ if aborted => self.completed,
            Some(t) => t,
            None => self.rounds,
        };
        let mut round_completed = false;
        while self.completed < done_up_to {
            let line =
                serde_json::json!({ "round": self.completed, "completed": true, "time": now() });
            self.journal.push_str(&line.to_string());
            self.journal.push('\n');
            self.completed += 1;
            round_completed = true;
        }
        if round_completed
            || frontier.is_none()
            || (self.dirty && self.last_write.elapsed() > Duration::from_secs(2))
        {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for (name, text) in [
            ("metrics.jsonl", &self.metrics),
            ("manifest.jsonl", &self.manifest),
            ("journal.jsonl", &self.journal),
        ] {
            if let Err(e) = atomic_write(&self.dir.join(name), text.as_bytes()) {
                eprintln!("error: cannot write {}: {e}", self.dir.join(name).display());
            }
        }
        self.dirty = false;
        self.last_write = Instant::now();
    }
}
