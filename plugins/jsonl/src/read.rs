//! `jsonl.read-pairs` and `jsonl.read-prompts`: source stages.

use crate::formats::{self, Parsed};
use flate2::read::MultiGzDecoder;
use hone_sdk::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct ReadConfig {
    path: PathBuf,
    #[serde(default)]
    paths: Vec<PathBuf>,
    name: Option<String>,
    #[serde(default = "auto")]
    format: String,
    on_error: String,
    limit: u64,
    #[serde(default)]
    per_round: u64,
    #[serde(default)]
    every_round: bool,
    /// jsonl.read-prompts only: longer prompts are dropped and counted.
    #[serde(default)]
    max_chars: usize,
    /// The files `path` / `paths` name, globs expanded, in order.
    #[serde(skip)]
    files: Vec<PathBuf>,
}

fn auto() -> String {
    "auto".into()
}

fn common(d: StageDescriptor) -> StageDescriptor {
    d.required("path", FieldType::Path, "The input file: .jsonl, .jsonl.gz, or a .json array (gzip is detected by content). `*` and `?` in the file name (not in directories) match several files, read in name order.")
        .optional(
            "paths",
            FieldType::List(Box::new(FieldType::Path)),
            serde_json::Value::Array(vec![]),
            "More input files (globs allowed, as in `path`), read after `path` in the order given.",
        )
        .optional(
            "name",
            FieldType::String,
            serde_json::Value::Null,
            "The source name recorded in every record's meta `source` (default: its file's name); \
             meta `source_file` always holds the file's name. `eval.rm-accuracy` with \
             `split_by = \"source\"` reports accuracy per source.",
        )
        .optional(
            "on_error",
            FieldType::one_of(&["fail", "skip"]),
            "fail",
            "A malformed line: `fail` stops the run naming the file and line; `skip` counts it in the `skipped` metric.",
        )
        .optional("limit", FieldType::unsigned(), 0, "Read at most this many input records (0 = all).")
        .optional(
            "per_round",
            FieldType::unsigned(),
            0,
            "Deal the records over the rounds: round r emits records r * per_round to (r + 1) * per_round - 1 \
             (in file order, counting every file's records in turn, after `limit`), so an online loop \
             gets fresh prompts each round; a round past the end emits none. 0: all of them in round 0.",
        )
        .optional(
            "every_round",
            FieldType::Bool,
            false,
            "Emit every record again in every round: a fixed evaluation set an online loop's current \
             policy answers each round. Not with `per_round`.",
        )
        // Every worker reads the file and parses its share of the records.
        .placement(Placement::DataParallel)
}

/// The UTF-8 byte-order mark some tools write at the start of a text file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Opens a possibly gzipped file.
fn open(path: &Path) -> Result<Box<dyn BufRead>, StageError> {
    let cannot = |e: std::io::Error| {
        StageError::config("path", format!("cannot open {}: {e}", path.display()))
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let mut magic = [0u8; 2];
    let n = file
        .read(&mut magic)
        .map_err(|e| read_error(path, None, e))?;
    let file = std::fs::File::open(path).map_err(cannot)?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// An error reading a data file, naming the file (and the line, when known)
/// and what to do about it.
fn read_error(path: &Path, line: Option<usize>, e: std::io::Error) -> StageError {
    let location = match line {
        Some(n) => format!("{}:{n}", path.display()),
        None => path.display().to_string(),
    };
    let gz = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".gz"));
    let text = e.to_string();
    let hint = if gz || text.contains("deflate") || text.contains("gzip") {
        " (the gzip data is damaged or truncated: fetch or compress the file again; \
         `gzip -t FILE` checks it)"
    } else {
        ""
    };
    StageError::at(location, format!("cannot read the file: {e}{hint}"))
}

/// "not UTF-8 text (invalid byte 0xFF at column 7)" for a line that is not.
fn not_utf8(line: &[u8], e: std::str::Utf8Error) -> String {
    let at = e.valid_up_to();
    let column = String::from_utf8_lossy(&line[..at]).chars().count() + 1;
    format!(
        "the line is not UTF-8 text (invalid byte 0x{:02X} at column {column}); \
         convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        line[at]
    )
}

/// The free-form metadata of a record the readers emit.
fn meta_of(record: &mut Record) -> Option<&mut std::collections::BTreeMap<String, String>> {
    match record {
        Record::Pair(p) => Some(&mut p.meta),
        Record::Prompt(p) => Some(&mut p.meta),
        Record::Completion(c) => Some(&mut c.meta),
        Record::Score(_) | Record::Artifact(_) => None,
    }
}

/// Calls `each(location, id, value)` for every record of a JSON-lines file or
/// a JSON array that belongs to this worker's shard (record `i` goes to worker
/// `i mod workers`, so parsing runs in parallel), and for at most `limit`
/// records in all (0 = no limit); stops at the first error `each` returns.
/// A UTF-8 byte-order mark at the start of the file is ignored; a line that
/// is not UTF-8 is a malformed record (`each` gets an `Err`), and a file that
/// cannot be read (a damaged gzip stream) an error naming the file and line.
/// Returns how many records counted towards `limit` (every worker's).
fn for_each_record(
    path: &Path,
    (worker, workers): (usize, usize),
    limit: u64,
    mut each: impl FnMut(&str, String, u64, Result<Value, String>) -> Result<(), StageError>,
) -> Result<u64, StageError> {
    let mut reader = open(path)?;
    let stem = stem(path);
    let start = reader
        .fill_buf()
        .map_err(|e| read_error(path, Some(1), e))?;
    let bom = start.starts_with(BOM);
    let first = start[if bom { BOM.len() } else { 0 }..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .copied();
    if first == Some(b'[') {
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| read_error(path, None, e))?;
        let text = bytes.strip_prefix(BOM).unwrap_or(&bytes);
        let items: Vec<Value> = serde_json::from_slice(text).map_err(|e| {
            StageError::at(
                format!("{}:{}", path.display(), e.line()),
                format!("invalid JSON array: {e}"),
            )
        })?;
        let mut taken = 0;
        for (i, item) in items.into_iter().enumerate() {
            if limit > 0 && i as u64 >= limit {
                break;
            }
            taken += 1;
            if i % workers != worker {
                continue;
            }
            let location = format!("{} element {i}", path.display());
            each(&location, format!("{stem}:{i:06}"), i as u64, Ok(item))?;
        }
        return Ok(taken);
    }
    let mut index = 0u64;
    let mut buf = Vec::new();
    for line_no in 1usize.. {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| read_error(path, Some(line_no), e))?;
        if n == 0 {
            break;
        }
        let mut line = &buf[..];
        if line_no == 1 {
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        index += 1;
        if limit > 0 && index > limit {
            break;
        }
        if (index - 1) % workers as u64 != worker as u64 {
            continue;
        }
        let location = format!("{}:{line_no}", path.display());
        let value = match std::str::from_utf8(line) {
            Ok(text) => {
                serde_json::from_str::<Value>(text).map_err(|e| format!("invalid JSON: {e}"))
            }
            Err(e) => Err(not_utf8(line, e)),
        };
        each(&location, format!("{stem}:{line_no:06}"), index - 1, value)?;
    }
    Ok(index.min(if limit > 0 { limit } else { u64::MAX }))
}

impl ReadConfig {
    /// The validated config: `path` or `paths`, every file existing, globs
    /// matching at least one file, and no two files of one stem (their
    /// records' ids, `STEM:LINE`, would collide).
    fn load(init: &StageInit) -> Result<Self, StageError> {
        let mut config: ReadConfig = init.config()?;
        let patterns: Vec<(&str, &PathBuf)> = std::iter::once(("path", &config.path))
            .chain(config.paths.iter().map(|p| ("paths", p)))
            .collect();
        if config.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(StageError::config(
                "name",
                "must not be empty; leave it unset to use file names",
            ));
        }
        if config.every_round && config.per_round > 0 {
            return Err(StageError::config(
                "every_round",
                "deals nothing: with `per_round` each round has its own records; set one of the two",
            ));
        }
        let mut files: Vec<(&str, PathBuf)> = Vec::new();
        for (field, pattern) in &patterns {
            let found = expand(pattern).map_err(|e| StageError::config(*field, e))?;
            files.extend(found.into_iter().map(|f| (*field, f)));
        }
        let mut stems = std::collections::BTreeMap::new();
        for (field, f) in &files {
            if let Some(other) = stems.insert(stem(f), f) {
                return Err(StageError::config(
                    *field,
                    format!(
                        "{} and {} share the name `{}`, so their records' ids would collide: \
                         read them with two stages",
                        other.display(),
                        f.display(),
                        stem(f)
                    ),
                ));
            }
        }
        config.files = files.into_iter().map(|(_, f)| f).collect();
        Ok(config)
    }
}

/// The part of a file name before its first dot: records are `STEM:LINE`.
fn stem(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("input");
    name.split('.').next().unwrap_or(name).to_string()
}

/// The files a path names: itself, or with `*` / `?` in its file name, the
/// files of its directory that match, in name order (at least one).
fn expand(pattern: &Path) -> Result<Vec<PathBuf>, String> {
    let name = pattern.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.contains(['*', '?']) {
        if !pattern.is_file() {
            return Err(format!(
                "{} does not exist or is not a file",
                pattern.display()
            ));
        }
        return Ok(vec![pattern.to_path_buf()]);
    }
    let dir = pattern
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {} for `{name}`: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| glob_match(name, n))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no file in {} matches `{name}`", dir.display()));
    }
    Ok(files)
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters
/// and `?` any one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// What one input record became.
// Lives on the stack for one record at a time: boxing would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// A record to emit.
    Emit(Record),
    /// Dropped on purpose, counted under this metric name.
    Dropped(&'static str),
}

/// In round 0 (every round with `every_round`; with `per_round`, the
/// round's window of records), reads this worker's share of the files and
/// emits what `parse` makes of each record, counting what was read, skipped
/// and dropped. A dealt round still reads the files from their start: the
/// HH-RLHF split takes well under a second.
fn read_round(
    ctx: &mut Context,
    c: &ReadConfig,
    mut parse: impl FnMut(String, Value) -> Result<Outcome, String>,
) -> Result<(), StageError> {
    // The global record indexes this round emits: all in round 0 unless dealt.
    let round = ctx.round();
    let window = (c.per_round > 0).then(|| (round * c.per_round, (round + 1) * c.per_round));
    if window.is_none() && round > 0 && !c.every_round {
        return Ok(());
    }
    // Records in the files before this one (each file counts from 0).
    let mut offset = 0u64;
    let mut counts = Counts::default();
    let shard = (ctx.init().worker, ctx.init().workers);
    // `limit` counts records over all files; each file is sharded on its own.
    let mut left = c.limit;
    for file in &c.files {
        if c.limit > 0 && left == 0 {
            break;
        }
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let source = c.name.clone().unwrap_or_else(|| file_name.clone());
        let taken = for_each_record(file, shard, left, |location, id, index, value| {
            if let Some((lo, hi)) = window {
                if !(lo..hi).contains(&(offset + index)) {
                    return Ok(());
                }
            }
            match value.and_then(|v| parse(id, v)) {
                Ok(Outcome::Emit(mut record)) => {
                    if let Some(meta) = meta_of(&mut record) {
                        meta.insert("source".into(), source.clone());
                        meta.insert("source_file".into(), file_name.clone());
                    }
                    counts.read += 1;
                    ctx.emit(0, record);
                    if counts.read % 1000 == 0 {
                        ctx.progress("reading", counts.read, 0);
                    }
                }
                Ok(Outcome::Dropped(reason)) => *counts.dropped.entry(reason).or_default() += 1,
                Err(msg) => counts.malformed(ctx, &c.on_error, location, msg)?,
            }
            Ok(())
        })?;
        left = left.saturating_sub(taken);
        offset += taken;
    }
    counts.report(ctx);
    Ok(())
}

/// Counts kept while reading.
#[derive(Default)]
struct Counts {
    read: u64,
    skipped: u64,
    dropped: std::collections::BTreeMap<&'static str, u64>,
}

impl Counts {
    /// Handles a malformed record per `on_error`.
    fn malformed(
        &mut self,
        ctx: &mut Context,
        on_error: &str,
        location: &str,
        msg: String,
    ) -> Result<(), StageError> {
        if on_error == "skip" {
            self.skipped += 1;
            if self.skipped <= 3 {
                ctx.log(format!("skipping {location}: {msg}"));
            }
            Ok(())
        } else {
            Err(StageError::at(
                location,
                format!("{msg} (set on_error = \"skip\" to skip malformed lines)"),
            ))
        }
    }

    fn report(&self, ctx: &mut Context) {
        ctx.metric("read", self.read as f64);
        ctx.metric("skipped", self.skipped as f64);
        for (name, n) in &self.dropped {
            ctx.metric(name, *n as f64);
        }
    }
}

/// Reads preference pairs.
pub struct ReadPairs {
    config: ReadConfig,
}

impl StageFactory for ReadPairs {
    fn descriptor() -> StageDescriptor {
        common(StageDescriptor::new(
            "jsonl.read-pairs",
            "Reads preference pairs (HH-RLHF transcripts, TRL prompt/chosen/rejected, PandaLM majority vote).",
        ))
        .output("pairs", RecordKind::PreferencePair)
        .optional(
            "format",
            FieldType::one_of(&["auto", "hh-rlhf", "trl", "pandalm"]),
            "auto",
            "The record format; `auto` detects it per record.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config = ReadConfig::load(init)?;
        Ok(ReadPairs { config })
    }
}

impl Stage for ReadPairs {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let format = self.config.format.clone();
        read_round(ctx, &self.config, |id, v| {
            let format = if format == "auto" {
                formats::detect(&v)?
            } else {
                format.as_str()
            };
            let parsed = match format {
                "hh-rlhf" => formats::hh(id, &v),
                "trl" => formats::trl(id, &v),
                _ => formats::pandalm(id, &v),
            }?;
            Ok(match parsed {
                Parsed::Pair(pair) => Outcome::Emit(Record::Pair(*pair)),
                Parsed::Dropped(reason) => Outcome::Dropped(reason),
            })
        })
    }
}

/// Reads prompts.
pub struct ReadPrompts {
    config: ReadConfig,
}

impl StageFactory for ReadPrompts {
    fn descriptor() -> StageDescriptor {
        common(StageDescriptor::new(
            "jsonl.read-prompts",
            "Reads prompts from {\"prompt\"}, {\"text\"}, MT-Bench {\"turns\"} or HH-RLHF records.",
        ))
        .output("prompts", RecordKind::Prompt)
        .optional(
            "max_chars",
            FieldType::unsigned(),
            0,
            "Drop prompts longer than this many characters, counted in the `too_long` metric (a \
             policy's compute and memory grow with its prompt: an attention layer's weights with its \
             square). 0: no bound.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config = ReadConfig::load(init)?;
        Ok(ReadPrompts { config })
    }
}

impl Stage for ReadPrompts {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let max_chars = self.config.max_chars;
        read_round(ctx, &self.config, |id, v| {
            formats::prompt(id, &v).map(|p| {
                if max_chars > 0 && p.text.chars().count() > max_chars {
                    Outcome::Dropped("too_long")
                } else {
                    Outcome::Emit(Record::Prompt(p))
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hone-jsonl-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn globs_match_names() {
        assert!(glob_match("*.jsonl", "a.jsonl"));
        assert!(glob_match("test-?.jsonl.gz", "test-1.jsonl.gz"));
        assert!(!glob_match("test-?.jsonl.gz", "test-10.jsonl.gz"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*.jsonl", "a.jsonl.gz"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn a_glob_expands_in_name_order_or_says_what_it_missed() {
        let dir = std::env::temp_dir().join(format!("hone-glob-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["b.jsonl", "a.jsonl", "c.txt"] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        let files = expand(&dir.join("*.jsonl")).unwrap();
        assert_eq!(files, [dir.join("a.jsonl"), dir.join("b.jsonl")]);
        let e = expand(&dir.join("*.csv")).unwrap_err();
        assert!(e.contains("no file in") && e.contains("`*.csv`"), "{e}");
        let e = expand(&dir.join("absent.jsonl")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A record's location and its value or error.
    type Read = (String, Result<Value, String>);

    /// (location, value or error) of every record.
    fn records(path: &Path) -> Result<Vec<Read>, StageError> {
        let mut out = Vec::new();
        for_each_record(path, (0, 1), 0, |loc, _, _, v| {
            out.push((loc.to_string(), v));
            Ok(())
        })?;
        Ok(out)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// `per_round` deals five prompts over two files three a round, each
    /// once, in file order, the same on one worker or two.
    #[test]
    fn per_round_deals_the_records_over_the_rounds() {
        let a = temp(
            "deal-a.jsonl",
            b"{\"prompt\": \"a0\"}\n{\"prompt\": \"a1\"}\n",
        );
        let b = temp(
            "deal-b.jsonl",
            b"{\"prompt\": \"b0\"}\n{\"prompt\": \"b1\"}\n{\"prompt\": \"b2\"}\n",
        );
        let dealt = |workers: usize| -> Vec<Vec<String>> {
            (0..3u64)
                .map(|round| {
                    let mut texts = Vec::new();
                    for worker in 0..workers {
                        let config =
                            hone_sdk::testing::full_config::<ReadPrompts>(serde_json::json!({
                                "path": a, "paths": [b], "per_round": 3,
                            }));
                        let mut init = StageInit::for_test("jsonl.read-prompts", config);
                        (init.worker, init.workers) = (worker, workers);
                        let mut stage = ReadPrompts::create(&init).unwrap();
                        let out = hone_sdk::testing::run_round_of(&mut stage, &init, round, vec![])
                            .unwrap();
                        for r in out.emitted(0) {
                            if let Record::Prompt(p) = r {
                                texts.push(p.text.clone());
                            }
                        }
                    }
                    texts.sort();
                    texts
                })
                .collect()
        };
        let one = dealt(1);
        assert_eq!(one, [vec!["a0", "a1", "b0"], vec!["b1", "b2"], vec![]]);
        assert_eq!(dealt(2), one);
        // every_round repeats them all each round, and cannot deal too.
        let config = |extra: serde_json::Value| {
            let mut c =
                hone_sdk::testing::full_config::<ReadPrompts>(serde_json::json!({"path": a}));
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            StageInit::for_test("jsonl.read-prompts", c)
        };
        // max_chars drops the longer prompts, and counts them.
        let init = config(serde_json::json!({"max_chars": 2}));
        let out = ReadPrompts::create(&init)
            .and_then(|mut stage| hone_sdk::testing::run_round_of(&mut stage, &init, 0, vec![]))
            .unwrap();
        assert_eq!(out.emitted(0).len(), 2);
        assert_eq!(out.metric("too_long", None), None);
        let init = config(serde_json::json!({"max_chars": 1}));
        let out = ReadPrompts::create(&init)
            .and_then(|mut stage| hone_sdk::testing::run_round_of(&mut stage, &init, 0, vec![]))
            .unwrap();
        assert_eq!(out.emitted(0).len(), 0);
        assert_eq!(out.metric("too_long", None), Some(2.0));
        let init = config(serde_json::json!({"every_round": true}));
        let mut stage = ReadPrompts::create(&init).unwrap();
        for round in 0..2 {
            let out = hone_sdk::testing::run_round_of(&mut stage, &init, round, vec![]).unwrap();
            assert_eq!(out.emitted(0).len(), 2, "round {round}");
        }
        let err = ReadPrompts::create(&config(
            serde_json::json!({"every_round": true, "per_round": 1}),
        ))
        .err()
        .unwrap();
        assert_eq!(err.config_field(), Some("every_round"));
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        let path = temp("bom.jsonl", b"\xEF\xBB\xBF{\"a\": 1}\n{\"a\": 2}\n");
        let got = records(&path).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, Ok(serde_json::json!({"a": 1})));
        let path = temp("bom.json", b"\xEF\xBB\xBF [{\"a\": 1}]");
        assert_eq!(records(&path).unwrap().len(), 1);
        let path = temp("bom.jsonl.gz", &gzip(b"\xEF\xBB\xBF{\"a\": 1}\n"));
        assert_eq!(
            records(&path).unwrap()[0].1,
            Ok(serde_json::json!({"a": 1}))
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_a_malformed_record_with_its_line() {
        let path = temp(
            "latin1.jsonl",
            b"{\"a\": 1}\n{\"a\": \"caf\xE9\"}\n{\"a\": 3}\n",
        );
        let got = records(&path).unwrap();
        assert_eq!(got.len(), 3, "the lines after it are still read");
        assert_eq!(got[1].0, format!("{}:2", path.display()));
        let err = got[1].1.clone().unwrap_err();
        assert!(
            err.contains("not UTF-8") && err.contains("0xE9") && err.contains("column 11"),
            "{err}"
        );
        assert!(got[2].1.is_ok());
    }

    #[test]
    fn a_damaged_gzip_stream_names_the_file() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("{{\"i\": {i}, \"s\": \"{}\"}}\n", i * 7919 % 1000));
        }
        let mut bytes = gzip(text.as_bytes());
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5A;
        }
        let path = temp("damaged.jsonl.gz", &bytes);
        let err = records(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:", path.display())), "{err}");
        assert!(err.contains("gzip"), "{err}");
        // Damaged from the first block on: the error comes before any line.
        let mut bytes = gzip(text.as_bytes());
        for b in &mut bytes[10..40] {
            *b ^= 0xFF;
        }
        let path = temp("damaged-start.jsonl.gz", &bytes);
        let err = records(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:1: ", path.display())), "{err}");
    }
}
