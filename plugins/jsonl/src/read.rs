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
    #[serde(default = "auto")]
    format: String,
    on_error: String,
    limit: u64,
}

fn auto() -> String {
    "auto".into()
}

fn common(d: StageDescriptor) -> StageDescriptor {
    d.required("path", FieldType::Path, "The input file: .jsonl, .jsonl.gz, or a .json array (gzip is detected by content).")
        .optional(
            "on_error",
            FieldType::one_of(&["fail", "skip"]),
            "fail",
            "A malformed line: `fail` stops the run naming the file and line; `skip` counts it in the `skipped` metric.",
        )
        .optional("limit", FieldType::Integer, 0, "Read at most this many input records (0 = all).")
        // Every worker reads the file and parses its share of the records.
        .placement(Placement::DataParallel)
}

/// Opens a possibly gzipped file.
fn open(path: &Path) -> Result<Box<dyn BufRead>, StageError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| StageError::config("path", format!("cannot open {}: {e}", path.display())))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    let file = std::fs::File::open(path)?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// Calls `each(location, id, value)` for every record of a JSON-lines file or
/// a JSON array that belongs to this worker's shard (record `i` goes to worker
/// `i mod workers`, so parsing runs in parallel), and for at most `limit`
/// records in all (0 = no limit); stops at the first error `each` returns.
fn for_each_record(
    path: &Path,
    (worker, workers): (usize, usize),
    limit: u64,
    mut each: impl FnMut(&str, String, Result<Value, String>) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let mut reader = open(path)?;
    let stem = path.file_name().and_then(|n| n.to_str()).unwrap_or("input");
    let stem = stem.split('.').next().unwrap_or(stem).to_string();
    let first = reader
        .fill_buf()?
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .copied();
    if first == Some(b'[') {
        let mut text = String::new();
        reader.read_to_string(&mut text)?;
        let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            StageError::at(
                format!("{}:{}", path.display(), e.line()),
                format!("invalid JSON array: {e}"),
            )
        })?;
        for (i, item) in items.into_iter().enumerate() {
            if limit > 0 && i as u64 >= limit {
                break;
            }
            if i % workers != worker {
                continue;
            }
            let location = format!("{} element {i}", path.display());
            each(&location, format!("{stem}:{i:06}"), Ok(item))?;
        }
        return Ok(());
    }
    let mut index = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let location = format!("{}:{line_no}", path.display());
        let line = line.map_err(|e| StageError::at(&location, format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        index += 1;
        if limit > 0 && index > limit {
            break;
        }
        if (index - 1) % workers as u64 != worker as u64 {
            continue;
        }
        let value = serde_json::from_str::<Value>(&line).map_err(|e| format!("invalid JSON: {e}"));
        each(&location, format!("{stem}:{line_no:06}"), value)?;
    }
    Ok(())
}

impl ReadConfig {
    /// The validated config: the input file must exist.
    fn load(init: &StageInit) -> Result<Self, StageError> {
        let config: ReadConfig = init.config()?;
        if !config.path.is_file() {
            return Err(StageError::config(
                "path",
                format!("{} does not exist or is not a file", config.path.display()),
            ));
        }
        Ok(config)
    }
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

/// In round 0, reads this worker's share of the file and emits what `parse`
/// makes of each record, counting what was read, skipped and dropped.
fn read_round(
    ctx: &mut Context,
    c: &ReadConfig,
    mut parse: impl FnMut(String, Value) -> Result<Outcome, String>,
) -> Result<(), StageError> {
    if ctx.round() > 0 {
        return Ok(());
    }
    let mut counts = Counts::default();
    let shard = (ctx.init().worker, ctx.init().workers);
    for_each_record(&c.path, shard, c.limit, |location, id, value| {
        match value.and_then(|v| parse(id, v)) {
            Ok(Outcome::Emit(record)) => {
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
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config = ReadConfig::load(init)?;
        Ok(ReadPrompts { config })
    }
}

impl Stage for ReadPrompts {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        read_round(ctx, &self.config, |id, v| {
            formats::prompt(id, &v).map(|p| Outcome::Emit(Record::Prompt(p)))
        })
    }
}
