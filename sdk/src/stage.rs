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
    /// Deserialises the config into the stage's own config struct. A value
    /// the struct cannot hold is reported against its field (see
    /// [`StageError::config`]), so that the runtime points at its line.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value::<T>(self.config.clone()).map_err(|e| {
            let message = format!("invalid config: {e}");
            match culprit::<T>(&self.config) {
                Some(field) => StageError::config(field, message),
                None => StageError::new(message),
            }
        })
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

/// The one field of a config object that makes deserialising it into `T`
/// fail: the field whose removal lets it succeed, or turns the error into
/// "missing field" for that field (serde reports a missing field only after
/// every present one deserialised).
fn culprit<T: DeserializeOwned>(config: &serde_json::Value) -> Option<String> {
    let object = config.as_object()?;
    let mut found = None;
    for key in object.keys() {
        let mut without = object.clone();
        without.remove(key);
        let cured = match serde_json::from_value::<T>(without.into()) {
            Ok(_) => true,
            Err(e) => e.to_string() == format!("missing field `{key}`"),
        };
        if cured {
            if found.is_some() {
                return None;
            }
            found = Some(key.clone());
        }
    }
    found
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
        let _ = ctx;
        match self.round_input() {
            Some(buffer) => {
                buffer.add(port, batch);
                Ok(())
            }
            None => Err(StageError::new(format!(
                "this stage takes no input, but got records on port {port}"
            ))),
        }
    }

    /// The buffer the default [`Stage::on_batch`] fills, for a stage that
    /// works on a whole round's input in `on_round_end`: hold a
    /// [`crate::RoundInput`], return it here, and `take()` it at the round's
    /// end. `None` (the default) for stages without input or with their own
    /// `on_batch`.
    fn round_input(&mut self) -> Option<&mut crate::RoundInput> {
        None
    }

    /// No more input can arrive for `ctx.round()`. Called once per round, in
    /// order, also for stages without inputs (sources produce here).
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let _ = ctx;
        Ok(())
    }

    /// The stage's state at the end of `round`, after `on_round_end`: what a
    /// fresh instance needs to carry on with round `round + 1` as if it had
    /// run every round itself (weights, optimizer moments, learning-rate
    /// step, RNG state, data position). `None`, the default, means the stage
    /// keeps nothing from round to round.
    fn snapshot(&mut self, round: u64) -> Result<Option<Vec<u8>>, StageError> {
        let _ = round;
        Ok(None)
    }

    /// Restores a fresh instance from what [`Stage::snapshot`] returned at
    /// the end of `round`, before any call for a later round.
    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        let _ = (round, snapshot);
        Err(StageError::new(
            "this stage saves no snapshots, so there is nothing to restore it from",
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Config {
        name: String,
        limit: u64,
        #[serde(default)]
        small: u8,
    }

    #[test]
    fn a_value_the_struct_cannot_hold_names_its_field() {
        let init = StageInit::for_test("t", serde_json::json!({"name": "a", "limit": -1}));
        let e = init.config::<Config>().unwrap_err();
        assert_eq!(e.config_field(), Some("limit"), "{e}");
        assert!(e.message.contains("-1"), "{e}");
        let init = StageInit::for_test(
            "t",
            serde_json::json!({"name": "a", "limit": 1, "small": 300}),
        );
        let e = init.config::<Config>().unwrap_err();
        assert_eq!(e.config_field(), Some("small"), "{e}");
        let init = StageInit::for_test("t", serde_json::json!({"name": "a", "limit": 3}));
        assert!(init.config::<Config>().is_ok());
    }
}
