//! The run directory: the resolved pipeline, `manifest.jsonl`,
//! `metrics.jsonl`, `journal.jsonl` and the stages' outputs. Every file is
//! written atomically (temp file, fsync, rename).

use crate::dataflow::RoutedEvent;
use hone_sdk::fs::atomic_write;
use hone_sdk::Event;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The file that makes a directory a hone run directory. It is written
/// first, before anything else, so `--replace` and `--resume` can prove a
/// directory is hone's own before they delete or move anything in it.
pub const MARKER: &str = ".hone-run";

/// Longest pipeline name accepted (a file name, with room for suffixes).
const MAX_NAME: usize = 100;

/// Checks a pipeline name, which becomes the directory `runs/NAME`: letters,
/// digits, `.`, `_` and `-`, not starting with `.` or `-`, so that it can
/// neither leave `runs/` (`..`, `a/../..`), nor name `runs/` itself (`""`,
/// `.`), nor hide or look like a flag.
pub fn check_name(name: &str) -> Result<(), String> {
    let fix = "use letters, digits, `.`, `_` and `-`, starting with a letter or digit \
               (e.g. `name = \"my-run\"`), or pass --run-dir DIR";
    if name.is_empty() {
        return Err(format!(
            "`pipeline.name` is empty; it names the run directory runs/NAME: {fix}"
        ));
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "`pipeline.name` is {} bytes long, over the limit of {MAX_NAME}: choose a shorter name",
            name.len()
        ));
    }
    let bad = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
    let first = name.chars().next().unwrap_or('.');
    if let Some(c) = bad {
        return Err(format!(
            "`pipeline.name` = \"{name}\" contains {c:?}; it names the run directory runs/NAME: {fix}"
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "`pipeline.name` = \"{name}\" starts with {first:?}; it names the run directory runs/NAME: {fix}"
        ));
    }
    Ok(())
}

/// A pipeline name made from a file stem: characters outside the safe set
/// become `-` (a file `my pipeline.toml` runs as `my-pipeline`).
pub fn name_from_stem(stem: &str) -> String {
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches(['.', '-']);
    if name.is_empty() {
        "pipeline".into()
    } else {
        name.chars().take(MAX_NAME).collect()
    }
}

/// What to do when the run directory already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the default: nothing is overwritten silently).
    Refuse,
    /// Delete it and start over (only a hone run directory).
    Replace,
    /// Keep it: a finished run is left as it is; an unfinished one is re-run,
    /// its earlier files moved to `attempts/N/`.
    Resume,
}

/// What will happen to the run directory, decided and checked before any
/// stage is created, and carried out ([`Plan::commit`]) only once every stage
/// has been created: a pipeline a stage rejects leaves nothing behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The journal says every round completed: nothing to do.
    AlreadyComplete,
    /// Run into `dir`, after doing `action` to what is there.
    Run {
        /// The run directory.
        dir: PathBuf,
        /// What to do first.
        action: Action,
    },
}

/// What [`Plan::commit`] does before the run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The directory is absent or empty: create it.
    Create,
    /// Delete the earlier run (it carries the marker), then create it.
    Replace,
    /// Move the earlier attempt's files to `attempts/N/`.
    Resume {
        /// The attempt number.
        attempt: usize,
    },
    /// Continue in place from the round after the last completed one,
    /// restoring the stages from its snapshots: the logs are copied to
    /// `attempts/N/` and cut back to the completed rounds.
    Continue {
        /// The attempt number (where the logs as they were are copied).
        attempt: usize,
        /// The last completed round and its verified snapshots.
        from: crate::snapshots::Resumable,
    },
}

/// What a resume checks a run against before continuing it in place.
pub struct ThisRun<'a> {
    /// The resolved pipeline, as `pipeline.toml` holds it.
    pub pipeline_toml: &'a str,
    /// Worker threads per process.
    pub workers: usize,
    /// Processes in the cluster.
    pub processes: usize,
}

/// A place `--replace` and `--resume` must leave where it is: what it is
/// (for the message) and its path.
pub type Protected = (String, PathBuf);

/// Decides what to do with `dir` and checks that it can be done, changing
/// nothing. `protected` (the pipeline file, the stages' input paths) and the
/// current directory are never deleted or moved, even inside a marked run
/// directory: a stage reading an earlier checkpoint of the run it replaces
/// would otherwise lose it.
pub fn plan(
    dir: &Path,
    existing: Existing,
    rounds: u64,
    protected: &[Protected],
    this_run: &ThisRun,
) -> Result<Plan, String> {
    let shown = dir.display();
    let meta = std::fs::symlink_metadata(dir);
    if let Ok(m) = &meta {
        let a_directory = m.is_dir() || (m.file_type().is_symlink() && dir.is_dir());
        if !a_directory {
            return Err(format!(
                "run directory {shown} exists and is not a directory: pass --run-dir DIR or \
                 choose another pipeline.name"
            ));
        }
    }
    let empty = match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(format!("cannot read run directory {shown}: {e}")),
    };
    let run = |action| Plan::Run {
        dir: dir.to_path_buf(),
        action,
    };
    if empty {
        check_writable(dir)?;
        return Ok(run(Action::Create));
    }
    let is_run = dir.join(MARKER).is_file();
    let not_a_run = |flag: &str| {
        format!(
            "{shown} is not a hone run directory (it has no {MARKER} file), so {flag} leaves it \
             alone: pass --run-dir DIR to run elsewhere. (A run made by a hone older than the \
             marker can be adopted with `touch {}`.)",
            dir.join(MARKER).display()
        )
    };
    match existing {
        Existing::Refuse => Err(format!(
            "run directory {shown} already exists: pass --resume to continue it, --replace to \
             delete it and start over, or --run-dir to pick another"
        )),
        Existing::Replace => {
            if !is_run {
                return Err(not_a_run("--replace"));
            }
            let labels = dir.join("serve/feedback.db");
            if labels.exists() {
                return Err(format!(
                    "{shown} holds people's labels ({}), so --replace leaves it alone: continue it with \
                     `hone serve`, or move the run directory away yourself",
                    labels.display()
                ));
            }
            check_not_holding_user_places(dir, protected, "--replace refuses to delete")?;
            check_writable(dir)?;
            if let Some(parent) = std::path::absolute(dir)
                .ok()
                .as_deref()
                .and_then(Path::parent)
            {
                check_writable(parent)?;
            }
            Ok(run(Action::Replace))
        }
        Existing::Resume => {
            if !is_run {
                return Err(not_a_run("--resume"));
            }
            if completed_rounds(dir) >= rounds && rounds > 0 {
                return Ok(Plan::AlreadyComplete);
            }
            check_not_holding_user_places(dir, protected, "--resume refuses to move the files of")?;
            check_writable(dir)?;
            let attempts = dir.join("attempts");
            if attempts.exists() && !attempts.is_dir() {
                return Err(format!(
                    "cannot resume {shown}: {} is not a directory, so the earlier attempt has                      nowhere to go; move it away and run again",
                    attempts.display()
                ));
            }
            if attempts.exists() {
                check_writable(&attempts)?;
            }
            let attempt = next_attempt(&attempts);
            match continuable(dir, this_run)? {
                Some(from) => Ok(run(Action::Continue { attempt, from })),
                None => Ok(run(Action::Resume { attempt })),
            }
        }
    }
}

/// Whether the run in `dir` can continue in place: a completed round with
/// snapshots (verified here), the same resolved pipeline, and the same
/// workers. `None` when it can only be re-run (no round completed, or a
/// journal from before snapshots, or a cluster run); an error when it has
/// snapshots but must not continue from them.
fn continuable(
    dir: &Path,
    this_run: &ThisRun,
) -> Result<Option<crate::snapshots::Resumable>, String> {
    let Some(from) = crate::snapshots::resumable(dir)? else {
        return Ok(None);
    };
    let shown = dir.display();
    if this_run.processes > 1 {
        // Cluster runs re-run: process 0 alone cannot check every process's snapshots.
        return Ok(None);
    }
    let before = std::fs::read_to_string(dir.join("pipeline.toml")).unwrap_or_default();
    if before != this_run.pipeline_toml {
        return Err(format!(
            "cannot resume {shown}: the pipeline is not the one the run started with (its resolved form differs \
             from {}; a changed stage or --set would mix two pipelines in one run): run it as it was, or \
             --replace to start over",
            dir.join("pipeline.toml").display()
        ));
    }
    if from.workers != this_run.workers {
        return Err(format!(
            "cannot resume {shown}: it ran on {} workers and its snapshots are per worker: resume with \
             --workers {}",
            from.workers, from.workers
        ));
    }
    crate::snapshots::verify(dir, &from)?;
    Ok(Some(from))
}

/// The first `attempts/N` not taken.
fn next_attempt(attempts: &Path) -> usize {
    (0..)
        .find(|n: &usize| !attempts.join(n.to_string()).exists())
        .unwrap_or(0)
}

/// `--replace` and `--resume` never delete or move the current directory,
/// one of its parents, or a directory holding a `protected` place, even in a
/// marked run directory. A directory that cannot be resolved is refused too:
/// when in doubt, nothing is deleted.
fn check_not_holding_user_places(
    dir: &Path,
    protected: &[Protected],
    refusal: &str,
) -> Result<(), String> {
    let target = dir
        .canonicalize()
        .map_err(|e| format!("{refusal} {}: cannot resolve it ({e})", dir.display()))?;
    let cwd = std::env::current_dir()
        .ok()
        .map(|d| ("the current directory".to_string(), d));
    for (what, place) in cwd.iter().chain(protected) {
        // A place that does not exist yet cannot be lost; resolve its parent.
        let resolved = place.canonicalize().ok().or_else(|| {
            let parent = std::path::absolute(place)
                .ok()?
                .parent()?
                .canonicalize()
                .ok()?;
            Some(parent.join(place.file_name()?))
        });
        if resolved.is_some_and(|p| p.starts_with(&target)) {
            return Err(format!(
                "{refusal} {}: it holds {what} ({}). Pass --run-dir DIR to run elsewhere",
                dir.display(),
                place.display()
            ));
        }
    }
    Ok(())
}

/// The run directory, or the nearest existing directory above it, must be
/// writable: checked before anything moves, so a refused run changes nothing.
fn check_writable(dir: &Path) -> Result<(), String> {
    let absolute = std::path::absolute(dir).unwrap_or(dir.to_path_buf());
    let mut at = absolute.as_path();
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => return Ok(()),
        }
    }
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: access(2) reads a NUL-terminated path and nothing else.
    let ok = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    if ok {
        Ok(())
    } else {
        let err = std::io::Error::last_os_error();
        Err(format!(
            "cannot write the run directory {}: {} is not writable ({err}); fix its permissions \
             or pass --run-dir DIR",
            dir.display(),
            at.display()
        ))
    }
}

impl Plan {
    /// Carries out the plan: deletes or moves what was there, creates the
    /// directory and writes the marker, then the resolved pipeline. On a
    /// failed move during a resume, what was moved is moved back.
    pub fn commit(&self, pipeline_toml: &str) -> Result<(), String> {
        let Plan::Run { dir, action } = self else {
            return Ok(());
        };
        match action {
            Action::Create => {}
            Action::Replace => {
                // Checked again at the last moment: only a marked directory is deleted.
                if !dir.join(MARKER).is_file() {
                    return Err(format!(
                        "{} lost its {MARKER} marker; not deleting it",
                        dir.display()
                    ));
                }
                // Renamed aside first (one atomic step), deleted after: a
                // deletion that fails half-way (a read-only file inside)
                // then leaves the old run whole under the aside name.
                let aside = aside_name(dir);
                std::fs::rename(dir, &aside)
                    .map_err(|e| format!("cannot move {} aside: {e}", dir.display()))?;
                if let Err(e) = std::fs::remove_dir_all(&aside) {
                    eprintln!(
                        "warning: the replaced run is kept at {}: it could not be deleted ({e})",
                        aside.display()
                    );
                }
            }
            Action::Resume { attempt } => move_to_attempt(dir, *attempt)?,
            Action::Continue { attempt, from } => cut_back(dir, *attempt, from.round)?,
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create run directory {}: {e}", dir.display()))?;
        let marker = serde_json::json!({
            "hone": env!("CARGO_PKG_VERSION"),
            "created": now(),
        });
        let write = |name: &str, bytes: &[u8]| {
            atomic_write(&dir.join(name), bytes)
                .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
        };
        write(MARKER, format!("{marker}\n").as_bytes())?;
        write("pipeline.toml", pipeline_toml.as_bytes())
    }
}

/// `DIR`'s sibling `.DIR.replaced-PID`, where `--replace` moves the old run.
fn aside_name(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    dir.with_file_name(format!(".{name}.replaced-{}", std::process::id()))
}

/// Moves every entry but `attempts/` (and `serve/`) into `attempts/N/`; on failure moves
/// them back and removes `attempts/N/`, leaving the directory as it was.
fn move_to_attempt(dir: &Path, attempt: usize) -> Result<(), String> {
    let target = dir.join("attempts").join(attempt.to_string());
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name())
        // `serve/` holds people's labels, which a re-run of the rounds
        // must find again: it stays.
        .filter(|n| n != "attempts" && n != MARKER && n != "serve")
        .collect();
    let mut moved = Vec::new();
    for name in entries {
        if let Err(e) = std::fs::rename(dir.join(&name), target.join(&name)) {
            for back in moved.iter().rev() {
                let _ = std::fs::rename(target.join(back), dir.join(back));
            }
            let _ = std::fs::remove_dir(&target);
            return Err(format!(
                "cannot move {} to {}: {e}; nothing was moved",
                dir.join(&name).display(),
                target.display()
            ));
        }
        moved.push(name);
    }
    Ok(())
}

/// Copies the logs to `attempts/N/` and moves there what the rounds after
/// `round` wrote under `outputs/` (nothing is lost), then keeps in the logs
/// only what rounds up to `round` wrote: the incomplete rounds run again.
fn cut_back(dir: &Path, attempt: usize, round: u64) -> Result<(), String> {
    let target = dir.join("attempts").join(attempt.to_string());
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    move_later_rounds(dir, &target, round)?;
    for name in ["metrics.jsonl", "manifest.jsonl", "journal.jsonl"] {
        let path = dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(format!(
                    "cannot read {}: {e}; nothing was cut back",
                    path.display()
                ))
            }
        };
        atomic_write(&target.join(name), text.as_bytes()).map_err(|e| {
            format!(
                "cannot copy {} to {}: {e}",
                path.display(),
                target.display()
            )
        })?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["round"].as_u64())
                    .is_some_and(|r| r <= round)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        atomic_write(&path, kept.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Moves `outputs/STAGE/round-K/` for every K after `round` (what the
/// interrupted rounds wrote) to `target/outputs/STAGE/round-K/`.
fn move_later_rounds(dir: &Path, target: &Path, round: u64) -> Result<(), String> {
    let Ok(stages) = std::fs::read_dir(dir.join("outputs")) else {
        return Ok(());
    };
    for stage in stages.flatten() {
        let Ok(rounds) = std::fs::read_dir(stage.path()) else {
            continue;
        };
        for r in rounds.flatten() {
            let later = r
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|k| k.parse::<u64>().ok())
                .is_some_and(|k| k > round);
            if !later {
                continue;
            }
            let to = target
                .join("outputs")
                .join(stage.file_name())
                .join(r.file_name());
            std::fs::create_dir_all(to.parent().expect("a path under outputs/"))
                .and_then(|()| std::fs::rename(r.path(), &to))
                .map_err(|e| {
                    format!(
                        "cannot move {} to {}: {e}",
                        r.path().display(),
                        to.display()
                    )
                })?;
        }
    }
    Ok(())
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
    workers: usize,
    metrics: String,
    manifest: String,
    journal: String,
    completed: u64,
    /// A continued run's logs are still to be read back.
    unread: bool,
    /// Each round's snapshot files and their sha256, for its journal line.
    snapshots: std::collections::BTreeMap<u64, serde_json::Map<String, serde_json::Value>>,
    dirty: bool,
    last_write: Instant,
}

impl EventLog {
    /// A log writing into `dir`, for a run of `workers` workers (in all)
    /// starting at round `start`: a continued run keeps what the completed
    /// rounds wrote.
    pub fn new(dir: &Path, rounds: u64, workers: usize, start: u64) -> Self {
        EventLog {
            dir: dir.to_path_buf(),
            rounds,
            workers,
            metrics: String::new(),
            manifest: String::new(),
            journal: String::new(),
            completed: start,
            unread: start > 0,
            snapshots: Default::default(),
            dirty: true,
            last_write: Instant::now(),
        }
    }

    /// A continued run's logs as the completed rounds left them, read at
    /// first use: after the plan has cut them back, not when the log is made.
    fn read_back(&mut self) {
        if !std::mem::take(&mut self.unread) {
            return;
        }
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        (self.metrics, self.manifest, self.journal) = (
            read("metrics.jsonl"),
            read("manifest.jsonl"),
            read("journal.jsonl"),
        );
    }

    /// Notes a snapshot file of `round` for its journal line.
    pub fn record_snapshot(&mut self, round: u64, rel: String, sha256: String) {
        self.snapshots
            .entry(round)
            .or_default()
            .insert(rel, serde_json::Value::String(sha256));
    }

    /// Adds an event.
    pub fn record(&mut self, e: RoutedEvent) {
        self.read_back();
        let line = match e.event {
            Event::Metric { name, value, step } => {
                let line = serde_json::json!({
                    "stage": e.stage, "round": e.round, "worker": e.worker,
                    "name": name, "value": value, "step": step, "time": e.time,
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
                    "inputs": inputs, "lineage": lineage, "time": e.time,
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
        self.read_back();
        let done_up_to = match frontier {
            _ if aborted => self.completed,
            Some(t) => t,
            None => self.rounds,
        };
        let mut round_completed = false;
        while self.completed < done_up_to {
            let snapshots = self.snapshots.remove(&self.completed).unwrap_or_default();
            let line = serde_json::json!({
                "round": self.completed, "completed": true, "time": now(),
                "workers": self.workers, "snapshots": snapshots,
            });
            self.journal.push_str(&line.to_string());
            self.journal.push('\n');
            self.completed += 1;
            round_completed = true;
        }
        let mut written = false;
        if round_completed
            || frontier.is_none()
            || (self.dirty && self.last_write.elapsed() > Duration::from_secs(2))
        {
            written = self.flush();
        }
        // Only once the journal on disk names the newer snapshots.
        if round_completed && written {
            // The journal now names the last completed round's snapshots;
            // the two newest rounds' are kept, older ones are hone's to delete.
            crate::snapshots::prune(&self.dir, self.completed.saturating_sub(2));
        }
    }

    /// Rounds journalled so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Writes the three logs; whether all were written.
    fn flush(&mut self) -> bool {
        let mut ok = true;
        for (name, text) in [
            ("metrics.jsonl", &self.metrics),
            ("manifest.jsonl", &self.manifest),
            ("journal.jsonl", &self.journal),
        ] {
            if let Err(e) = atomic_write(&self.dir.join(name), text.as_bytes()) {
                eprintln!("error: cannot write {}: {e}", self.dir.join(name).display());
                ok = false;
            }
        }
        self.dirty = false;
        self.last_write = Instant::now();
        ok
    }
}
