//! The `rm` stage family: Bradley–Terry reward models and what is built on
//! them.
//!
//! - `rm.train`: trains an ensemble of reward models on preference pairs,
//!   one member per worker, from a shared initialisation (scratch or policy
//!   artifacts, Baklava-style spread over SFT checkpoints), diversified by
//!   seed, learning rate and dropout; emits `reward-model` artifacts.
//! - `rm.score`: scores pairs and completions with one reward model or the
//!   mean of an ensemble (prediction ensembling).
//! - `rm.strength`: preference strength (mean and spread of the reward
//!   difference over an ensemble), with flip / drop / smooth / adaptive
//!   margin policies (Secrets of RLHF II).
//! - `rm.warm`: weight-averaged reward models (WARM), merged one member at a
//!   time, refusing members that do not share an initialisation.
//!
//! Reward models have one of three backbones (`reward.json`'s `backbone`): a
//! byte-level GPT trained whole; all-MiniLM-L6-v2 under a trained linear
//! head, frozen (`model.rs`) or with its top layers fine-tuned (`tuned.rs`);
//! or SmolLM2-135M-Instruct with its top layers fine-tuned
//! (`tuned_llama.rs`).

mod merge;
mod model;
mod score;
mod strength;
mod train;
mod tuned;
mod tuned_llama;
mod warm;

pub use merge::{merge, MergeError, MergeStats};
pub use score::Scorer;
pub use strength::Strength;
pub use train::Train;
pub use warm::Warm;

use hone_models::Device;
use hone_sdk::prelude::*;
use model::{load_rm_dir, Rm};
use std::path::PathBuf;

hone_sdk::export_stages!(Train, Scorer, Strength, Warm);

/// The artifact kind this family emits and consumes.
pub const REWARD_MODEL: &str = "reward-model";

/// Turns a model-core (or candle) error into a stage error saying what was
/// being done.
trait OrStageError<T> {
    fn or_stage(self, doing: &str) -> Result<T, StageError>;
}

impl<T, E: std::fmt::Display> OrStageError<T> for Result<T, E> {
    fn or_stage(self, doing: &str) -> Result<T, StageError> {
        self.map_err(|e| StageError::new(format!("{doing}: {e}")))
    }
}

/// The device named by the `device` field, or a config error naming it.
fn device(name: &str) -> Result<Device, StageError> {
    hone_models::device::device(name).map_err(|e| StageError::config("device", e.to_string()))
}

/// The checkpoint directory of an artifact (the directory of its file).
fn artifact_dir(init: &StageInit, artifact: &ArtifactRef) -> PathBuf {
    let file = init.run_dir.join(&artifact.path);
    file.parent().map(PathBuf::from).unwrap_or(file)
}

/// What a stage scoring with the newest reward models keeps: every model
/// that arrived on port 0 so far, across rounds, and the round's input.
#[derive(Default)]
struct Models {
    seen: Vec<ArtifactRef>,
    input: RoundInput,
}

impl Models {
    /// The buffer the stage's `round_input` hands out.
    fn buffer(&mut self) -> &mut RoundInput {
        &mut self.input
    }

    /// The round's input; its reward models (port 0, checked to be reward
    /// models) join those seen before.
    fn take_round(&mut self) -> Result<RoundInput, StageError> {
        let mut input = self.input.take();
        self.seen
            .extend(input.artifacts(0, ArtifactKind::RewardModel, "models")?);
        Ok(input)
    }

    /// The newest round's models (see [`newest_models`]).
    fn newest(&self) -> Vec<ArtifactRef> {
        newest_models(&self.seen)
    }

    /// What a snapshot keeps: the newest round's models, which decide every
    /// later round's `newest` as the whole list would (an older model never
    /// wins again).
    fn state(&self) -> Vec<ArtifactRef> {
        self.newest()
    }

    /// Back from [`Models::state`].
    fn restore(&mut self, seen: Vec<ArtifactRef>) {
        self.seen = seen;
    }
}

/// The `reward-model` artifacts of the newest round among `seen`, sorted by
/// id and without duplicates.
fn newest_models(seen: &[ArtifactRef]) -> Vec<ArtifactRef> {
    let models: Vec<&ArtifactRef> = seen.iter().filter(|a| a.kind == REWARD_MODEL).collect();
    let Some(round) = models.iter().map(|a| a.round).max() else {
        return Vec::new();
    };
    let mut newest: Vec<ArtifactRef> = models
        .into_iter()
        .filter(|a| a.round == round)
        .cloned()
        .collect();
    newest.sort_by(|a, b| a.id.cmp(&b.id));
    newest.dedup_by(|a, b| a.id == b.id);
    newest
}

/// Loads the reward model an artifact points at, whichever its backbone.
fn load_rm(init: &StageInit, artifact: &ArtifactRef, device: &Device) -> Result<Rm, StageError> {
    load_rm_dir(&artifact_dir(init, artifact), device)
        .map_err(|e| StageError::new(format!("cannot load reward model {}: {e}", artifact.id)))
}

/// What a pair says is better: `Some(true)` if chosen, `Some(false)` if
/// rejected, `None` when it cannot say (a gold tie or missing gold).
fn truth(pair: &PreferencePair, gold: bool) -> Option<bool> {
    if !gold {
        return Some(true);
    }
    pair.gold_prefers_chosen()
}

/// Fraction of pairs whose reward difference agrees with their truth;
/// `None` when no pair has one.
fn accuracy(pairs: &[PreferencePair], rewards: &[(f64, f64)], gold: bool) -> Option<f64> {
    let (mut right, mut n) = (0.0, 0usize);
    for (p, (c, r)) in pairs.iter().zip(rewards) {
        if let Some(chosen_better) = truth(p, gold) {
            n += 1;
            // A reward tie counts half, as in eval.rm-accuracy.
            right += if c == r {
                0.5
            } else if (c > r) == chosen_better {
                1.0
            } else {
                0.0
            };
        }
    }
    (n > 0).then(|| right / n as f64)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_minilm;
#[cfg(test)]
mod tests_smollm;

/// Test helpers: run a stage in-process with its descriptor's defaults.
#[cfg(test)]
pub(crate) mod testing {
    use hone_models::gpt::{init_seeded, GptConfig};
    use hone_models::heads::RewardModel;
    use hone_models::reward::{save_reward_model, RewardMeta};
    use hone_models::tokenizer::ByteTokenizer;
    use hone_models::{DType, Device, VarBuilder, VarMap};
    use hone_sdk::prelude::*;
    use hone_sdk::Collected;
    use std::path::{Path, PathBuf};

    /// A fresh run directory under the temp directory.
    pub fn temp_run_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hone-rm-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Creates `S` with `config` over the defaults; the error if it refuses.
    pub fn create<S: StageFactory>(config: serde_json::Value) -> Result<S, StageError> {
        hone_sdk::testing::create::<S>(config)
    }

    /// Runs one round of `S` as stage `stage_id` in `run_dir`, feeding
    /// `inputs` as (port, records); `members` as the runtime would give.
    pub fn run<S: StageFactory>(
        stage_id: &str,
        run_dir: &Path,
        config: serde_json::Value,
        members: Vec<usize>,
        inputs: Vec<(usize, Vec<Record>)>,
    ) -> Result<Collected, StageError> {
        let mut init = hone_sdk::testing::init::<S>(config);
        let _ = std::fs::remove_dir_all(&init.run_dir);
        init.stage_id = stage_id.into();
        init.run_dir = run_dir.to_path_buf();
        init.members = members;
        hone_sdk::testing::run_round::<S>(&init, inputs)
    }

    /// A tiny backbone shape.
    pub fn tiny_gpt() -> GptConfig {
        GptConfig {
            vocab_size: ByteTokenizer::VOCAB,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            context: 48,
        }
    }

    /// Writes a randomly initialised reward model (weights from `seed`) as
    /// `run_dir/outputs/STAGE/NAME/` and returns its artifact.
    pub fn write_rm(
        run_dir: &Path,
        name: &str,
        cfg: &GptConfig,
        seed: u64,
        root: &str,
    ) -> ArtifactRef {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        RewardModel::new(cfg, vb).unwrap();
        init_seeded(&varmap, seed).unwrap();
        let meta = RewardMeta {
            backbone: "gpt".into(),
            lineage_root: root.into(),
            init: "scratch".into(),
            member: 0,
            seed,
            lr: 1e-3,
            dropout: 0.0,
            steps: 0,
            merged_from: vec![],
            weights: vec![],
        };
        let rel = format!("outputs/train/{name}");
        let dir = run_dir.join(&rel);
        let sha = save_reward_model(&dir, &varmap, cfg, &ByteTokenizer, &meta).unwrap();
        ArtifactRef::new(
            super::REWARD_MODEL,
            "train",
            format!("{name}/model.safetensors"),
            0,
            format!("{rel}/model.safetensors"),
            sha,
        )
    }

    /// Pairs with a learnable preference: the chosen response contains
    /// the word `good`, the rejected one does not.
    pub fn learnable_pairs(n: usize) -> Vec<PreferencePair> {
        let words = [
            "apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano",
        ];
        (0..n)
            .map(|i| {
                let w = words[i % words.len()];
                let v = words[(i / 8 + 3) % words.len()];
                PreferencePair::new(
                    format!("p{i:03}"),
                    format!("Q: {w}?"),
                    format!("{v} good {w}"),
                    format!("{v} bad {w}"),
                    "test",
                )
            })
            .collect()
    }

    /// Pairs as records.
    pub fn records(pairs: &[PreferencePair]) -> Vec<Record> {
        pairs.iter().cloned().map(Record::Pair).collect()
    }
}
