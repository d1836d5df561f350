//! The author-facing traits.

use crate::{Context, Record, StageDescriptor, StageError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a stage instance is created with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageInit {
    /// The stage's id in the pipeline file.
    pub stage_id: String,
    /// The stage's kind.
    pub kind: String,
    /// The validated config, defaults filled in and paths resolved, as JSON.
    pub config: serde_json::Value,
    /// This worker's index.
    pub worker: usize,
    /// The number of workers in the whole computation (all processes).
    pub workers: usize,
    /// For per-member stages: the members this instance runs.
    pub members: Vec<usize>,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Number of rounds the run lasts (0 = until stopped).
    pub rounds: u64,
    /// The pipeline's seed.
    pub seed: u64,
}

impl StageInit {
    /// Deserialises the config into the stage's own config struct.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value(self.config.clone())
            .map_err(|e| StageError::new(format!("invalid config: {e}")))
    }

    /// Where this stage writes its outputs: `RUN_DIR/outputs/STAGE_ID/`.
    pub fn output_dir(&self) -> PathBuf {
        self.run_dir.join("outputs").join(&self.stage_id)
    }

    /// A path relative to the run directory, for artifact references.
    pub fn relative_to_run<'a>(&self, path: &'a Path) -> &'a Path {
        path.strip_prefix(&self.run_dir).unwrap_or(path)
    }

    /// A minimal init for tests and in-process use.
    pub fn for_test(kind: &str, config: serde_json::Value) -> Self {
        StageInit {
            stage_id: "test".into(),
            kind: kind.into(),
            config,
            worker: 0,
            workers: 1,
            members: vec![0],
            run_dir: std::env::temp_dir().join(format!("hone-test-{}", std::process::id())),
            rounds: 1,
            seed: 0,
        }
    }
}

/// A stage instance. Streaming stages work in [`Stage::on_batch`]; stages
/// that need all of a round's input (training, dedup, merge) buffer there and
/// work in [`Stage::on_round_end`].
pub trait Stage: Send {
    /// A batch of records arrived on input port `port` for the current round.
    fn on_batch(
        &mut self,
        ctx: &mut Context,
        port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        let _ = (ctx, batch);
        Err(StageError::new(format!(
            "this stage takes no input, but got records on port {port}"
        )))
    }

    /// No more input can arrive for `ctx.round()`. Called once per round, in
    /// order, also for stages without inputs (sources produce here).
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let _ = ctx;
        Ok(())
    }
}

/// Describes and creates a stage kind. [`crate::export_stages!`] exports
/// the types implementing it.
pub trait StageFactory: Stage + Sized + 'static {
    /// The stage's self-description.
    fn descriptor() -> StageDescriptor;
    /// Creates an instance from a validated config.
    fn create(init: &StageInit) -> Result<Self, StageError>;
}
