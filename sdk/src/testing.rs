//! Running a stage in-process, for its own unit tests: create it with its
//! descriptor's defaults under a config, feed it batches, end the round, and
//! read back what it emitted. Plugin crates use this instead of each writing
//! the same harness (the runtime's end-to-end tests go through the `hone`
//! binary instead).

use crate::{
    ArtifactRef, Collected, Context, Event, Record, Stage, StageError, StageFactory, StageInit,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `S`'s config: every field's default, overridden by `config` (an object).
pub fn full_config<S: StageFactory>(config: serde_json::Value) -> serde_json::Value {
    let mut full = serde_json::Map::new();
    for field in S::descriptor().config {
        full.insert(field.name, field.default);
    }
    if let serde_json::Value::Object(overrides) = config {
        full.extend(overrides);
    }
    serde_json::Value::Object(full)
}

/// A fresh, empty directory under the temp directory, unique to this
/// process and call (tests run in parallel).
pub fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hone-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// What a stage is created with in a test: `StageInit::for_test` with the
/// descriptor's defaults, in a fresh run directory.
pub fn init<S: StageFactory>(config: serde_json::Value) -> StageInit {
    let mut init = StageInit::for_test(&S::descriptor().kind, full_config::<S>(config));
    init.run_dir = temp_dir("stage");
    init
}

/// Creates `S` under `config` over its defaults; the error if it refuses.
pub fn create<S: StageFactory>(config: serde_json::Value) -> Result<S, StageError> {
    S::create(&init::<S>(config))
}

/// Runs round 0 of a stage created with `init`: feeds `inputs`, (port,
/// records) batches in order, then ends the round.
pub fn run_round<S: StageFactory>(
    init: &StageInit,
    inputs: Vec<(usize, Vec<Record>)>,
) -> Result<Collected, StageError> {
    let mut stage = S::create(init)?;
    run_round_of(&mut stage, init, 0, inputs)
}

/// Runs round `round` of an existing stage (created with `init`): feeds
/// `inputs`, (port, records) batches in order, then ends the round. For
/// tests of what a stage carries from one round to the next.
pub fn run_round_of<S: Stage>(
    stage: &mut S,
    init: &StageInit,
    round: u64,
    inputs: Vec<(usize, Vec<Record>)>,
) -> Result<Collected, StageError> {
    let mut out = Collected::default();
    {
        let mut ctx = Context::new(&mut out, init, round);
        for (port, batch) in inputs {
            stage.on_batch(&mut ctx, port, batch)?;
        }
        stage.on_round_end(&mut ctx)?;
    }
    Ok(out)
}

impl Collected {
    /// The last value of metric `name` at `step` (`None`: without a step).
    pub fn metric(&self, name: &str, step: Option<u64>) -> Option<f64> {
        self.events.iter().rev().find_map(|e| match e {
            Event::Metric {
                name: n,
                value,
                step: s,
            } if n == name && *s == step => Some(*value),
            _ => None,
        })
    }

    /// Every metric by name, the last value of each.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        self.metric_list()
            .into_iter()
            .map(|(n, v, _)| (n, v))
            .collect()
    }

    /// Every metric as (name, value, step), in order.
    pub fn metric_list(&self) -> Vec<(String, f64, Option<u64>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Metric { name, value, step } => Some((name.clone(), *value, *step)),
                _ => None,
            })
            .collect()
    }

    /// Every value of metric `name`, in order.
    pub fn series(&self, name: &str) -> Vec<f64> {
        self.metric_list()
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, v, _)| v)
            .collect()
    }

    /// The log lines, in order.
    pub fn logs(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Log { message } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    /// The records emitted on output `port`.
    pub fn emitted(&self, port: usize) -> &[Record] {
        self.records.get(&port).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The artifacts emitted on output `port`.
    pub fn artifacts(&self, port: usize) -> Vec<ArtifactRef> {
        self.emitted(port)
            .iter()
            .filter_map(|r| match r {
                Record::Artifact(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }
}
