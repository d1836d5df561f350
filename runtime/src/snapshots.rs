//! Snapshots at round boundaries, for `--resume` to continue a run where it
//! stopped instead of re-running it.
//!
//! At the end of every round but the last, each stage instance's
//! [`hone_sdk::Stage::snapshot`] (if it keeps state) and the records it sent
//! on feedback edges that round (what the next round's stages receive from
//! it) are written under `RUN_DIR/snapshots/round-R/STAGE/worker-W.*`, and
//! their sha256 go into that round's journal line. A resume verifies every
//! file of the last completed round against the journal, restores each
//! instance from it, replays the feedback records into the next round, and
//! starts there. Only the last two completed rounds' snapshots are kept.

use hone_sdk::fs::{atomic_write, sha256_file};
use hone_sdk::Record;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The journal's key for a stage whose plugin cannot snapshot
/// (`cannot-snapshot/STAGE`): a run with one re-runs on `--resume`.
pub const CANNOT: &str = "cannot-snapshot/";

/// The directory of `round`'s snapshots.
pub fn round_dir(run_dir: &Path, round: u64) -> PathBuf {
    run_dir.join("snapshots").join(format!("round-{round}"))
}

/// A snapshot file's path relative to the run directory, as the journal
/// names it: `snapshots/round-R/STAGE/worker-W.KIND` (`state` or `feedback`).
pub fn relative(round: u64, stage: &str, worker: usize, kind: &str) -> String {
    format!("snapshots/round-{round}/{stage}/worker-{worker}.{kind}")
}

/// Writes a snapshot file atomically; its sha256.
pub fn write(run_dir: &Path, rel: &str, bytes: &[u8]) -> Result<String, String> {
    let path = run_dir.join(rel);
    atomic_write(&path, bytes)
        .map_err(|e| format!("cannot write snapshot {}: {e}", path.display()))?;
    Ok(hone_sdk::fs::sha256_hex(bytes))
}

/// The records a stage sent on its feedback ports in one round.
pub fn encode_feedback(records: &[(u32, Record)]) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(records, bincode::config::standard())
        .map_err(|e| format!("cannot encode feedback records: {e}"))
}

/// Reads back [`encode_feedback`]'s bytes.
pub fn decode_feedback(bytes: &[u8]) -> Result<Vec<(u32, Record)>, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(records, _)| records)
        .map_err(|e| format!("cannot decode feedback records: {e}"))
}

/// Where a run can continue from: its last completed round, the workers it
/// ran on, and that round's snapshot files with their sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumable {
    /// The last completed round.
    pub round: u64,
    /// The number of workers the run used (snapshots are per worker).
    pub workers: usize,
    /// Relative path -> sha256.
    pub files: BTreeMap<String, String>,
}

/// The last completed round of the run in `dir` and its snapshots, from the
/// journal. `None` when no round completed, or when the journal predates
/// snapshots (a run that can only be re-run).
pub fn resumable(dir: &Path) -> Result<Option<Resumable>, String> {
    let path = dir.join("journal.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut last = None;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        // A journal hone cannot read is no base to continue from: the run
        // re-runs, as before snapshots.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            eprintln!(
                "note: {}:{} is not a journal line, so the run is re-run rather than continued",
                path.display(),
                n + 1
            );
            return Ok(None);
        };
        if v["completed"] != true {
            continue;
        }
        let round = v["round"]
            .as_u64()
            .ok_or_else(|| format!("{}:{}: no round", path.display(), n + 1))?;
        let expected = last.as_ref().map_or(0, |(r, _): &(u64, _)| r + 1);
        if round != expected {
            return Err(format!(
                "{}:{}: round {round} follows round {} (the journal is not in order)",
                path.display(),
                n + 1,
                expected as i64 - 1
            ));
        }
        last = Some((round, v));
    }
    let Some((round, v)) = last else {
        return Ok(None);
    };
    let (Some(files), Some(workers)) = (v["snapshots"].as_object(), v["workers"].as_u64()) else {
        return Ok(None);
    };
    if files.keys().any(|k| k.starts_with(CANNOT)) {
        return Ok(None);
    }
    let files = files
        .iter()
        .map(|(k, sha)| {
            Ok((
                k.clone(),
                sha.as_str()
                    .ok_or("a snapshot sha256 is not a string")?
                    .to_string(),
            ))
        })
        .collect::<Result<_, String>>()?;
    Ok(Some(Resumable {
        round,
        workers: workers as usize,
        files,
    }))
}

/// Checks every snapshot file of `r` against its sha256: a missing or
/// changed file is refused by name, never loaded.
pub fn verify(dir: &Path, r: &Resumable) -> Result<(), String> {
    for (rel, sha) in &r.files {
        let path = dir.join(rel);
        let found = sha256_file(&path).map_err(|e| {
            format!(
                "snapshot {} of round {} cannot be read ({e}): cannot resume from it; --replace starts over",
                path.display(),
                r.round
            )
        })?;
        if &found != sha {
            return Err(format!(
                "snapshot {} of round {} does not match the sha256 the journal recorded ({} against {}): it is \
                 corrupt or was changed, so it is not loaded; --replace starts over",
                path.display(),
                r.round,
                &found[..12],
                sha.chars().take(12).collect::<String>()
            ));
        }
    }
    Ok(())
}

/// Deletes the snapshots of rounds before `keep_from` (hone's own files,
/// under the run directory's `snapshots/`).
pub fn prune(run_dir: &Path, keep_from: u64) {
    let Ok(entries) = std::fs::read_dir(run_dir.join("snapshots")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(round) = name
            .to_str()
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|r| r.parse::<u64>().ok())
        else {
            continue;
        };
        if round < keep_from {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
