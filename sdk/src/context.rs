//! The stage's window on the runtime: emitting records, metrics, artifacts.

use crate::{ArtifactRef, Record, StageError, StageInit};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Something a stage tells the runtime besides records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A scalar metric for this round, written to `metrics.jsonl`.
    Metric {
        /// Metric name (`kept`, `loss`, ...).
        name: String,
        /// Its value.
        value: f64,
        /// An optional step within the round (training steps).
        step: Option<u64>,
    },
    /// An artifact written to the run directory, for `manifest.jsonl`.
    Artifact {
        /// The reference records will carry.
        artifact: ArtifactRef,
        /// Ids of the artifacts it was made from.
        inputs: Vec<String>,
        /// Free-form lineage (`"fine-tuned from X"`, `"init: Y"`).
        lineage: Vec<String>,
    },
    /// Progress of a long step.
    Progress {
        /// What is progressing.
        label: String,
        /// Units done.
        done: u64,
        /// Units in all (0 if unknown).
        total: u64,
    },
    /// A log line.
    Log {
        /// The message.
        message: String,
    },
}

/// Where a checkpoint stands in its stage's training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The training step (`None` for the final model).
    pub step: Option<u64>,
    /// The ensemble member.
    pub member: Option<u64>,
}

/// The output directory of `round` under a stage's `base` directory.
pub fn round_output_dir(base: &Path, round: u64) -> PathBuf {
    if round == 0 {
        base.to_path_buf()
    } else {
        base.join(format!("round-{round}"))
    }
}

/// Where a [`Context`] sends what the stage produces. The plugin glue
/// implements it over the C ABI; tests and benchmarks implement it in-process.
pub trait HostLink {
    /// A batch of records for output port `port`.
    fn emit_batch(&mut self, port: usize, batch: Vec<Record>);
    /// An event.
    fn event(&mut self, event: Event);
}

/// Records emitted and events raised, collected in memory.
#[derive(Debug, Default)]
pub struct Collected {
    /// Records per output port, in emission order.
    pub records: BTreeMap<usize, Vec<Record>>,
    /// Events in order.
    pub events: Vec<Event>,
}

impl HostLink for Collected {
    fn emit_batch(&mut self, port: usize, batch: Vec<Record>) {
        self.records.entry(port).or_default().extend(batch);
    }
    fn event(&mut self, event: Event) {
        self.events.push(event);
    }
}

const FLUSH_AT: usize = 1024;

/// Handed to every stage call.
pub struct Context<'a> {
    link: &'a mut dyn HostLink,
    init: &'a StageInit,
    round: u64,
    pending: BTreeMap<usize, Vec<Record>>,
}

impl<'a> Context<'a> {
    /// A context for one call. The runtime's glue makes these; tests may too.
    pub fn new(link: &'a mut dyn HostLink, init: &'a StageInit, round: u64) -> Self {
        Context {
            link,
            init,
            round,
            pending: BTreeMap::new(),
        }
    }

    /// Emits a record on output port `port`. Records are batched.
    pub fn emit(&mut self, port: usize, record: Record) {
        let buf = self.pending.entry(port).or_default();
        buf.push(record);
        if buf.len() >= FLUSH_AT {
            let batch = std::mem::take(buf);
            self.link.emit_batch(port, batch);
        }
    }

    /// Records a metric for this round.
    pub fn metric(&mut self, name: &str, value: f64) {
        self.link.event(Event::Metric {
            name: name.into(),
            value,
            step: None,
        });
    }

    /// Records a metric at a training step.
    pub fn metric_at(&mut self, name: &str, value: f64, step: u64) {
        self.link.event(Event::Metric {
            name: name.into(),
            value,
            step: Some(step),
        });
    }

    /// Reports progress (shown as a bar on a terminal, log lines otherwise).
    pub fn progress(&mut self, label: &str, done: u64, total: u64) {
        self.link.event(Event::Progress {
            label: label.into(),
            done,
            total,
        });
    }

    /// Writes a log line.
    pub fn log(&mut self, message: impl Into<String>) {
        self.link.event(Event::Log {
            message: message.into(),
        });
    }

    /// Registers a file already written under the run directory as an
    /// artifact: hashes it and records it in the manifest.
    pub fn register_artifact(
        &mut self,
        kind: &str,
        path: &Path,
        inputs: Vec<String>,
        lineage: Vec<String>,
    ) -> Result<ArtifactRef, StageError> {
        self.register_checkpoint(kind, path, Checkpoint::default(), inputs, lineage)
    }

    /// [`Context::register_artifact`] for a training checkpoint: its step
    /// and ensemble member travel as fields of the reference, so that no
    /// consumer parses them back out of the id or the path.
    pub fn register_checkpoint(
        &mut self,
        kind: &str,
        path: &Path,
        at: Checkpoint,
        inputs: Vec<String>,
        lineage: Vec<String>,
    ) -> Result<ArtifactRef, StageError> {
        let sha256 = crate::fs::sha256_file(path).map_err(|e| {
            StageError::new(format!("cannot hash artifact {}: {e}", path.display()))
        })?;
        let rel = self
            .init
            .relative_to_run(path)
            .to_string_lossy()
            .into_owned();
        // Named by the path under the round's output directory, so that
        // checkpoints `ckpt-100/model.safetensors` and `final/model.safetensors`
        // get distinct names; the round is in the id.
        let name = path
            .strip_prefix(self.round_dir())
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
            .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let artifact = ArtifactRef {
            id: format!("{}/{}@{}", self.init.stage_id, name, self.round),
            kind: kind.into(),
            path: rel,
            sha256,
            round: self.round,
            stage: self.init.stage_id.clone(),
            name,
            step: at.step,
            member: at.member,
        };
        self.link.event(Event::Artifact {
            artifact: artifact.clone(),
            inputs,
            lineage,
        });
        Ok(artifact)
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// What the stage was created with.
    pub fn init(&self) -> &StageInit {
        self.init
    }

    /// This round's output directory, created on demand:
    /// `RUN_DIR/outputs/STAGE_ID/` in round 0 and `.../round-R/` in round R
    /// after it. The rule depends on the round only, never on how many
    /// rounds the pipeline has, so a one-round run and the first round of a
    /// loop write to the same place.
    pub fn output_dir(&self) -> Result<PathBuf, StageError> {
        let dir = self.round_dir();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StageError::new(format!(
                "cannot create output directory {}: {e}",
                dir.display()
            ))
        })?;
        Ok(dir)
    }

    fn round_dir(&self) -> PathBuf {
        round_output_dir(&self.init.output_dir(), self.round)
    }

    /// Sends every pending batch to the host. The glue calls this after each
    /// stage call; stages need not.
    pub fn flush(&mut self) {
        for (port, batch) in std::mem::take(&mut self.pending) {
            if !batch.is_empty() {
                self.link.emit_batch(port, batch);
            }
        }
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_in_different_directories_get_different_ids() {
        let init = StageInit::for_test("x", serde_json::json!({}));
        let mut link = Collected::default();
        let mut ctx = Context::new(&mut link, &init, 3);
        let dir = ctx.output_dir().unwrap();
        let mut ids = Vec::new();
        for sub in ["ckpt-100", "final"] {
            let path = dir.join(sub).join("model.safetensors");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, sub).unwrap();
            let at = Checkpoint {
                step: (sub == "ckpt-100").then_some(100),
                member: None,
            };
            let a = ctx
                .register_checkpoint("policy", &path, at, vec![], vec![])
                .unwrap();
            // Round 3 writes under round-3/, whatever the number of rounds.
            assert_eq!(
                a.path,
                format!("outputs/test/round-3/{sub}/model.safetensors")
            );
            assert_eq!((a.stage.as_str(), a.round, a.step), ("test", 3, at.step));
            assert_eq!(a.name, format!("{sub}/model.safetensors"));
            ids.push(a.id);
        }
        assert_eq!(
            ids,
            [
                "test/ckpt-100/model.safetensors@3",
                "test/final/model.safetensors@3"
            ]
        );
        std::fs::remove_dir_all(&init.run_dir).unwrap();
    }
}
