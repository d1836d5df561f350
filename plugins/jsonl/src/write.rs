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
        .output("artifact", RecordKind::Artifact(ArtifactKind::Dataset))
        .optional(
            "file",
            FieldType::String,
            "records.jsonl",
            "File name under the round's output directory (RUN_DIR/outputs/STAGE_ID/ in round 0, \
             .../round-R/ in round R); `{round}` is replaced by the round.",
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

/// The file name of `round`: the template with `{round}` replaced. Rounds
/// are told apart by their output directories, not by names that would
/// depend on how many rounds the pipeline has.
fn file_name(template: &str, round: u64) -> String {
    template.replace("{round}", &round.to_string())
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
        let name = file_name(&self.config.file, ctx.round());
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
    fn the_round_goes_into_the_name_only_where_asked() {
        assert_eq!(file_name("pairs.jsonl", 0), "pairs.jsonl");
        assert_eq!(file_name("pairs.jsonl.gz", 2), "pairs.jsonl.gz");
        assert_eq!(file_name("p-{round}.jsonl", 4), "p-4.jsonl");
    }
}
