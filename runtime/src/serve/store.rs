//! The label store: SQLite in WAL mode with `synchronous = FULL`, so a
//! label is on disk before the HTTP response says OK and a kill -9 at any
//! moment loses none that was acknowledged. SQLite because it is the most
//! tested embedded store there is, one file to back up (`.backup`), and
//! readable with the `sqlite3` shell.
//!
//! Two tables: `items`, every pair ever queued (as shown: `a` first, `b`
//! second), and `labels`, one answer per item, keyed by the client's id so
//! that a retried POST is counted once.

use hone_sdk::feedback::{self, Answer, Choice, Queue};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The database file inside the run directory.
pub const DATABASE: &str = "serve/feedback.db";

/// A pair awaiting an answer, as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Item {
    /// The store's id for it: what a label names.
    pub item: i64,
    /// Its round.
    pub round: u64,
    /// The asking stage.
    pub stage: String,
    /// The candidate pair's id.
    pub pair_id: String,
    /// The prompt.
    pub prompt: String,
    /// Shown first.
    pub a: String,
    /// Shown second.
    pub b: String,
    /// Gold rewards of `a` and `b`, for a simulated annotator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<[f64; 2]>,
}

/// A label as posted.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// The client's id for this label (idempotency key).
    pub client_id: String,
    /// The item answered.
    pub item: i64,
    /// The answer.
    pub choice: Choice,
    /// Who answered.
    pub annotator: String,
    /// When they answered (seconds since the Unix epoch; the client's clock,
    /// else the server's).
    pub time: f64,
}

/// What became of a posted label.
#[derive(Debug, Clone, PartialEq)]
pub enum Posted {
    /// Stored now.
    Accepted {
        /// Pairs of the item's queue still without an answer.
        remaining: usize,
    },
    /// The same client id was stored before with the same content: counted once.
    Duplicate,
    /// Refused, with why (409).
    Conflict(String),
    /// No such item (404).
    Unknown,
}

/// One stage's queue of one round that still awaits answers.
struct Open {
    /// Its items, their pair ids and digests, in queue order.
    items: Vec<(i64, String, String)>,
    /// The items answered so far (kept here so that a label costs no scan).
    answered: HashSet<i64>,
}

/// The store and the queues it is answering.
pub struct Store {
    db: Connection,
    run_dir: PathBuf,
    /// (round, stage) → its items, for queues whose answers file is not written yet.
    open: BTreeMap<(u64, String), Open>,
    /// Each open item's queue.
    owner: HashMap<i64, (u64, String)>,
    /// Queue files already read, with their length and modification time.
    seen: BTreeMap<PathBuf, (u64, std::time::SystemTime)>,
    /// Rounds below this one are closed for good in this process (rounds
    /// only move on), so their queue files are not looked at again.
    floor: u64,
}

fn sql(e: rusqlite::Error) -> String {
    format!("label store: {e}")
}

impl Store {
    /// Opens (creating) the run's label store.
    pub fn open(run_dir: &Path) -> Result<Store, String> {
        let path = run_dir.join(DATABASE);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let db = Connection::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode: String = db
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if mode != "wal" {
            return Err(format!(
                "{}: SQLite refused WAL mode ({mode}); is the file system a network one?",
                path.display()
            ));
        }
        db.execute_batch(
            "PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS items (
                 item INTEGER PRIMARY KEY,
                 round INTEGER NOT NULL,
                 stage TEXT NOT NULL,
                 pair_id TEXT NOT NULL,
                 prompt TEXT NOT NULL,
                 a TEXT NOT NULL,
                 b TEXT NOT NULL,
                 hint TEXT,
                 queued REAL NOT NULL,
                 UNIQUE (round, stage, pair_id, prompt, a, b)
             );
             CREATE TABLE IF NOT EXISTS labels (
                 client_id TEXT PRIMARY KEY,
                 item INTEGER NOT NULL UNIQUE REFERENCES items (item),
                 choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
                 annotator TEXT NOT NULL,
                 time REAL NOT NULL,
                 received REAL NOT NULL
             );",
        )
        .map_err(sql)?;
        Ok(Store {
            db,
            run_dir: run_dir.to_path_buf(),
            open: BTreeMap::new(),
            owner: HashMap::new(),
            seen: BTreeMap::new(),
            floor: 0,
        })
    }

    /// Reads queue files written since the last look; closes queues whose
    /// pairs all have answers. Returns the queues it closed. A queue file
    /// that cannot be read is reported and skipped, not fatal: the others
    /// are still served.
    pub fn scan(&mut self) -> Result<Vec<(u64, String)>, String> {
        let root = self.run_dir.join("serve/queue");
        let mut files = Vec::new();
        if let Ok(rounds) = std::fs::read_dir(&root) {
            for round in rounds.flatten() {
                let number = round
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("round-"))
                    .and_then(|n| n.parse::<u64>().ok());
                if number.is_none_or(|r| r < self.floor) {
                    continue;
                }
                if let Ok(stages) = std::fs::read_dir(round.path()) {
                    for f in stages.flatten() {
                        let path = f.path();
                        if path.extension().is_some_and(|e| e == "json") {
                            files.push(path);
                        }
                    }
                }
            }
        }
        files.sort();
        for path in files {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
            if self.seen.get(&path) == Some(&stamp) {
                continue;
            }
            let queue: Queue = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(q) => q,
                Err(e) => {
                    eprintln!("error: {}: not a queue file ({e}); skipped", path.display());
                    self.seen.insert(path, stamp);
                    continue;
                }
            };
            let answers = feedback::answers_path(&self.run_dir, queue.round, &queue.stage);
            if answers.exists() {
                let matching = feedback::read_answers(&answers)
                    .is_ok_and(|a| feedback::answers_match(&queue, &a));
                if matching {
                    self.seen.insert(path, stamp);
                    continue;
                }
                // An earlier attempt's answers to other pairs: kept, aside,
                // and this queue is asked afresh.
                let aside = answers
                    .with_extension(format!("jsonl.stale-{}", crate::plugin::unix_now() as u64));
                std::fs::rename(&answers, &aside)
                    .map_err(|e| format!("cannot move {} aside: {e}", answers.display()))?;
                eprintln!(
                    "warning: {} answered other pairs than its round's queue now holds; moved to {}",
                    answers.display(),
                    aside.display()
                );
            }
            self.enqueue(&queue)?;
            self.seen.insert(path, stamp);
        }
        let keys: Vec<(u64, String)> = self.open.keys().cloned().collect();
        let mut closed = Vec::new();
        for key in keys {
            if self.close_if_answered(&key)? {
                closed.push(key);
            }
        }
        Ok(closed)
    }

    /// Stores a queue's pairs (once: a resumed round queues the same pairs
    /// again and finds the answers already given) and opens it.
    fn enqueue(&mut self, queue: &Queue) -> Result<(), String> {
        let tx = self.db.transaction().map_err(sql)?;
        let mut items = Vec::new();
        for p in &queue.pairs {
            let hint = p.hint.map(|h| serde_json::json!(h).to_string());
            tx.execute(
                "INSERT OR IGNORE INTO items (round, stage, pair_id, prompt, a, b, hint, queued)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    queue.round as i64,
                    queue.stage,
                    p.pair_id,
                    p.prompt,
                    p.a,
                    p.b,
                    hint,
                    crate::plugin::unix_now()
                ],
            )
            .map_err(sql)?;
            let item: i64 = tx
                .query_row(
                    "SELECT item FROM items WHERE round = ?1 AND stage = ?2 AND pair_id = ?3
                     AND prompt = ?4 AND a = ?5 AND b = ?6",
                    params![
                        queue.round as i64,
                        queue.stage,
                        p.pair_id,
                        p.prompt,
                        p.a,
                        p.b
                    ],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            items.push((item, p.pair_id.clone(), feedback::digest(p)));
        }
        tx.commit().map_err(sql)?;
        let mut answered = HashSet::new();
        {
            let mut stmt = self
                .db
                .prepare(
                    "SELECT l.item FROM labels l JOIN items i ON i.item = l.item
                     WHERE i.round = ?1 AND i.stage = ?2",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![queue.round as i64, queue.stage], |r| r.get(0))
                .map_err(sql)?;
            for item in rows {
                answered.insert(item.map_err(sql)?);
            }
        }
        let key = (queue.round, queue.stage.clone());
        if let Some(old) = self.open.remove(&key) {
            for (item, ..) in old.items {
                self.owner.remove(&item);
            }
        }
        let queued: HashSet<i64> = items.iter().map(|(i, ..)| *i).collect();
        answered.retain(|i| queued.contains(i));
        for (item, ..) in &items {
            self.owner.insert(*item, key.clone());
        }
        self.open.insert(key, Open { items, answered });
        Ok(())
    }

    /// Writes the answers file of a queue whose every pair has an answer.
    fn close_if_answered(&mut self, key: &(u64, String)) -> Result<bool, String> {
        let Some(open) = self.open.get(key) else {
            return Ok(false);
        };
        if open.answered.len() < open.items.len() {
            return Ok(false);
        }
        let mut answers = Vec::with_capacity(open.items.len());
        for (item, pair_id, digest) in &open.items {
            let row: Option<(String, String)> = self
                .db
                .query_row(
                    "SELECT choice, annotator FROM labels WHERE item = ?1",
                    [item],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(sql)?;
            let Some((choice, annotator)) = row else {
                return Ok(false);
            };
            answers.push(Answer {
                pair_id: pair_id.clone(),
                choice: Choice::parse(&choice).ok_or("label store: a stored choice is unknown")?,
                annotator,
                digest: digest.clone(),
            });
        }
        let lines: String = answers
            .iter()
            .map(|a| serde_json::to_string(a).expect("answers encode") + "\n")
            .collect();
        let path = feedback::answers_path(&self.run_dir, key.0, &key.1);
        hone_sdk::fs::atomic_write(&path, lines.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        if let Some(open) = self.open.remove(key) {
            for (item, ..) in open.items {
                self.owner.remove(&item);
            }
        }
        self.floor = self.floor.max(key.0);
        Ok(true)
    }

    /// Stores a label (committed to disk before this returns), or says why not.
    pub fn post(&mut self, label: &Label) -> Result<Posted, String> {
        let before: Option<(i64, String, String)> = self
            .db
            .query_row(
                "SELECT item, choice, annotator FROM labels WHERE client_id = ?1",
                [&label.client_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql)?;
        if let Some((item, choice, annotator)) = before {
            return Ok(
                if item == label.item
                    && choice == label.choice.as_str()
                    && annotator == label.annotator
                {
                    Posted::Duplicate
                } else {
                    Posted::Conflict(format!(
                        "client_id {:?} was already used for another label: give each label its own id",
                        label.client_id
                    ))
                },
            );
        }
        let Some(key) = self.owner.get(&label.item).cloned() else {
            let known: bool = self
                .db
                .query_row(
                    "SELECT COUNT(*) > 0 FROM items WHERE item = ?1",
                    [label.item],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            return Ok(if known {
                Posted::Conflict(format!(
                    "item {} no longer awaits a label (its round's labels were handed on)",
                    label.item
                ))
            } else {
                Posted::Unknown
            });
        };
        if self.open[&key].answered.contains(&label.item) {
            return Ok(Posted::Conflict(format!(
                "item {} is already labelled",
                label.item
            )));
        }
        self.db
            .execute(
                "INSERT INTO labels (client_id, item, choice, annotator, time, received)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    label.client_id,
                    label.item,
                    label.choice.as_str(),
                    label.annotator,
                    label.time,
                    crate::plugin::unix_now()
                ],
            )
            .map_err(sql)?;
        let open = self.open.get_mut(&key).expect("owned items are open");
        open.answered.insert(label.item);
        let remaining = open.items.len() - open.answered.len();
        if remaining == 0 {
            // The label is stored: a failure to write the answers file is
            // the server's to retry (the scan closes answered queues), not
            // the client's.
            if let Err(e) = self.close_if_answered(&key) {
                eprintln!("error: {e} (retried)");
            }
        }
        Ok(Posted::Accepted { remaining })
    }

    /// Up to `limit` pairs awaiting answers, oldest round first.
    pub fn pending(&self, limit: usize) -> Result<Vec<Item>, String> {
        let mut out = Vec::new();
        for open in self.open.values() {
            for (item, ..) in open
                .items
                .iter()
                .filter(|(i, ..)| !open.answered.contains(i))
            {
                if out.len() >= limit {
                    return Ok(out);
                }
                let row = self
                    .db
                    .query_row(
                        "SELECT i.round, i.stage, i.pair_id, i.prompt, i.a, i.b, i.hint
                         FROM items i LEFT JOIN labels l ON l.item = i.item
                         WHERE i.item = ?1 AND l.item IS NULL",
                        [item],
                        |r| {
                            Ok(Item {
                                item: *item,
                                round: r.get::<_, i64>(0)? as u64,
                                stage: r.get(1)?,
                                pair_id: r.get(2)?,
                                prompt: r.get(3)?,
                                a: r.get(4)?,
                                b: r.get(5)?,
                                hint: r
                                    .get::<_, Option<String>>(6)?
                                    .and_then(|h| serde_json::from_str(&h).ok()),
                            })
                        },
                    )
                    .optional()
                    .map_err(sql)?;
                out.extend(row);
            }
        }
        Ok(out)
    }

    /// Pairs awaiting answers, in all.
    pub fn queue_depth(&self) -> Result<usize, String> {
        Ok(self
            .open
            .values()
            .map(|o| o.items.len() - o.answered.len())
            .sum())
    }

    /// The open queues' rounds (the rounds waiting for people).
    pub fn waiting_rounds(&self) -> Vec<u64> {
        self.open.keys().map(|(r, _)| *r).collect()
    }

    /// Labels stored, by choice.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>, String> {
        let mut stmt = self
            .db
            .prepare("SELECT choice, COUNT(*) FROM labels GROUP BY choice")
            .map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Labels stored for round `round`'s items.
    pub fn labels_in_round(&self, round: u64) -> Result<u64, String> {
        self.db
            .query_row(
                "SELECT COUNT(*) FROM labels l JOIN items i ON i.item = l.item WHERE i.round = ?1",
                [round as i64],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sql)
    }

    /// Every stored label's client id (for tests and audits).
    pub fn client_ids(&self) -> Result<Vec<String>, String> {
        let mut stmt = self
            .db
            .prepare("SELECT client_id FROM labels ORDER BY client_id")
            .map_err(sql)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hone_sdk::feedback::QueuedPair;

    fn queue(round: u64, n: usize) -> Queue {
        Queue {
            round,
            stage: "ask".into(),
            pairs: (0..n)
                .map(|i| QueuedPair {
                    pair_id: format!("p{i}"),
                    prompt: format!("q{i}"),
                    a: "x".into(),
                    b: "y".into(),
                    hint: None,
                })
                .collect(),
        }
    }

    fn write(dir: &Path, q: &Queue) {
        hone_sdk::fs::atomic_write(
            &feedback::queue_path(dir, q.round, &q.stage),
            &serde_json::to_vec(q).unwrap(),
        )
        .unwrap();
    }

    fn label(id: &str, item: i64, choice: Choice) -> Label {
        Label {
            client_id: id.into(),
            item,
            choice,
            annotator: "ann".into(),
            time: 1.0,
        }
    }

    #[test]
    fn labels_are_idempotent_by_client_id_and_close_their_round() {
        let dir = hone_sdk::testing::temp_dir("store");
        write(&dir, &queue(1, 2));
        let mut s = Store::open(&dir).unwrap();
        assert!(s.scan().unwrap().is_empty());
        let items = s.pending(10).unwrap();
        assert_eq!(items.len(), 2);
        let (i0, i1) = (items[0].item, items[1].item);
        assert_eq!(
            s.post(&label("c1", i0, Choice::A)).unwrap(),
            Posted::Accepted { remaining: 1 }
        );
        assert_eq!(
            s.post(&label("c1", i0, Choice::A)).unwrap(),
            Posted::Duplicate
        );
        assert!(matches!(
            s.post(&label("c1", i1, Choice::B)).unwrap(),
            Posted::Conflict(_)
        ));
        assert!(matches!(
            s.post(&label("c2", i0, Choice::B)).unwrap(),
            Posted::Conflict(_)
        ));
        assert_eq!(
            s.post(&label("c9", 999, Choice::B)).unwrap(),
            Posted::Unknown
        );
        assert_eq!(s.queue_depth().unwrap(), 1);
        assert_eq!(
            s.post(&label("c3", i1, Choice::Tie)).unwrap(),
            Posted::Accepted { remaining: 0 }
        );
        let answers = feedback::read_answers(&feedback::answers_path(&dir, 1, "ask")).unwrap();
        assert_eq!(
            answers.iter().map(|a| a.choice).collect::<Vec<_>>(),
            [Choice::A, Choice::Tie]
        );
        // Closed: a late label is refused, not silently dropped.
        assert!(matches!(
            s.post(&label("c4", i1, Choice::A)).unwrap(),
            Posted::Conflict(_)
        ));
        assert_eq!(s.labels_in_round(1).unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_earlier_attempts_answers_to_other_pairs_are_moved_aside_not_reused() {
        let dir = hone_sdk::testing::temp_dir("store-stale");
        write(&dir, &queue(0, 1));
        {
            let mut s = Store::open(&dir).unwrap();
            s.scan().unwrap();
            let item = s.pending(1).unwrap()[0].item;
            s.post(&label("c1", item, Choice::A)).unwrap();
        }
        let answers = feedback::answers_path(&dir, 0, "ask");
        assert!(answers.exists());
        // The round runs again with other texts under the same pair id.
        let mut changed = queue(0, 1);
        changed.pairs[0].a = "other".into();
        write(&dir, &changed);
        let mut s = Store::open(&dir).unwrap();
        s.scan().unwrap();
        assert!(!answers.exists(), "the stale answers are not this queue's");
        let stale: Vec<_> = std::fs::read_dir(answers.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("stale"))
            .collect();
        assert_eq!(stale.len(), 1, "kept aside");
        let pending = s.pending(10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].a, "other");
        s.post(&label("c2", pending[0].item, Choice::B)).unwrap();
        let read = feedback::read_answers(&answers).unwrap();
        assert!(feedback::answers_match(&changed, &read));
        // A queue file that is not one is skipped, and the others still served.
        hone_sdk::fs::atomic_write(&feedback::queue_path(&dir, 5, "junk"), b"{").unwrap();
        write(&dir, &queue(6, 1));
        s.scan().unwrap();
        assert_eq!(s.pending(10).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reopened_store_finds_the_labels_of_a_requeued_round() {
        let dir = hone_sdk::testing::temp_dir("store-reopen");
        write(&dir, &queue(2, 2));
        let item = {
            let mut s = Store::open(&dir).unwrap();
            s.scan().unwrap();
            let item = s.pending(1).unwrap()[0].item;
            s.post(&label("c1", item, Choice::B)).unwrap();
            item
        };
        // The round runs again after a crash: the same queue is written again.
        write(&dir, &queue(2, 2));
        let mut s = Store::open(&dir).unwrap();
        s.scan().unwrap();
        let pending = s.pending(10).unwrap();
        assert_eq!(pending.len(), 1, "the answered pair is not asked again");
        assert_ne!(pending[0].item, item);
        s.post(&label("c2", pending[0].item, Choice::A)).unwrap();
        let answers = feedback::read_answers(&feedback::answers_path(&dir, 2, "ask")).unwrap();
        assert_eq!(answers[0].choice, Choice::B);
        assert_eq!(s.client_ids().unwrap(), ["c1", "c2"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
