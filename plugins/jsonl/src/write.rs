//! `jsonl.write`: writes any records as JSON lines, one file per round.

use flate2::write::GzEncoder;
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::io::Write as _;

#[derive(Deserialize)]
struct WriteConfig {
    file: String,
    sort: bool,
}

/// Writes records to the stage's output directory.
pub struct Write {
    config: WriteConfig,
    records: Vec<Record>,
}

impl StageFactory for Write {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "jsonl.write",
            "Writes records as JSON lines (gzip when the name ends in .gz); emits the file as a dataset artifact.",
        )
        .input("records", RecordKind::Any)
        .output("artifact", RecordKind::Artifact)
        .optional(
            "file",
            FieldType::String,
            "records.jsonl",
            "File name under RUN_DIR/outputs/STAGE_ID/; `{round}` is replaced by the round \
                 (added before the extension when the pipeline has several rounds).",
        )
        .optional(
            "sort",
            FieldType::Bool,
            true,
            "Sort records by id, so that the file does not depend on the number of workers.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: WriteConfig = init.config()?;
        if config.file.is_empty() || config.file.contains('/') || config.file.contains("..") {
            return Err(StageError::config(
                "file",
                format!(
                    "\"{}\" must be a plain file name such as \"pairs.jsonl\"",
                    config.file
                ),
            ));
        }
        Ok(Write {
            config,
            records: Vec::new(),
        })
    }
}

fn file_name(template: &str, round: u64, rounds: u64) -> String {
    if template.contains("{round}") {
        return template.replace("{round}", &round.to_string());
    }
    if rounds == 1 {
        return template.to_string();
    }
    let (stem, ext) = template.split_once('.').unwrap_or((template, ""));
    if ext.is_empty() {
        format!("{stem}.r{round}")
    } else {
        format!("{stem}.r{round}.{ext}")
    }
}

fn to_json(record: &Record) -> serde_json::Value {
    match record {
        Record::Prompt(p) => serde_json::to_value(p),
        Record::Pair(p) => serde_json::to_value(p),
        Record::Completion(c) => serde_json::to_value(c),
        Record::Score(s) => serde_json::to_value(s),
        Record::Artifact(a) => serde_json::to_value(a),
    }
    .expect("records encode as JSON")
}

impl Stage for Write {
    fn on_batch(
        &mut self,
        _ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        self.records.extend(batch);
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut records = std::mem::take(&mut self.records);
        if self.config.sort {
            records.sort_by(|a, b| a.id().cmp(b.id()));
        }
        let mut text = Vec::new();
        for r in &records {
            serde_json::to_writer(&mut text, &to_json(r))
                .map_err(|e| StageError::new(e.to_string()))?;
            text.push(b'\n');
        }
        let name = file_name(&self.config.file, ctx.round(), ctx.init().rounds);
        let bytes = if name.ends_with(".gz") {
            let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&text)?;
            enc.finish()?
        } else {
            text
        };
        let path = ctx.output_dir()?.join(&name);
        hone_sdk::fs::atomic_write(&path, &bytes)
            .map_err(|e| StageError::new(format!("cannot write {}: {e}", path.display())))?;
        let artifact = ctx.register_artifact(
            "dataset",
            &path,
            Vec::new(),
            vec![format!("{} records", records.len())],
        )?;
        ctx.emit(0, Record::Artifact(artifact));
        ctx.metric("written", records.len() as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::file_name;

    #[test]
    fn round_goes_into_the_name_when_there_are_several() {
        assert_eq!(file_name("pairs.jsonl", 0, 1), "pairs.jsonl");
        assert_eq!(file_name("pairs.jsonl.gz", 2, 3), "pairs.r2.jsonl.gz");
        assert_eq!(file_name("p-{round}.jsonl", 4, 9), "p-4.jsonl");
    }
}
