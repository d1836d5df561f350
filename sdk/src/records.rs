//! The records that flow on dataflow edges. They cross the plugin boundary
//! as bincode batches, so every field is plain data: no `serde_json::Value`,
//! no skipped fields. Tensors never travel as records: a model is an
//! artifact, and records carry an [`ArtifactRef`] to it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A prompt for a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Stable id (`source:line`), used to order and deduplicate.
    pub id: String,
    /// The prompt text, in the format the policy expects.
    pub text: String,
    /// Free-form metadata (task family, split, ...).
    pub meta: BTreeMap<String, String>,
}

/// A preference pair: for `prompt`, `chosen` was preferred over `rejected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Stable id (`source:line`), used to order and deduplicate.
    pub id: String,
    /// The shared context.
    pub prompt: String,
    /// The preferred response.
    pub chosen: String,
    /// The dispreferred response.
    pub rejected: String,
    /// Where the label came from (`human`, `majority-of-3`, `rm`, `gold`, ...).
    pub label_source: String,
    /// A score of the chosen response, where one exists (RM or annotator).
    pub chosen_score: Option<f64>,
    /// A score of the rejected response, where one exists.
    pub rejected_score: Option<f64>,
    /// Mean of the reward difference over an RM ensemble (preference strength).
    pub strength_mean: Option<f64>,
    /// Standard deviation of the reward difference over an RM ensemble.
    pub strength_std: Option<f64>,
    /// Margin subtracted inside the Bradley-Terry loss.
    pub margin: f64,
    /// Per-pair loss weight.
    pub weight: f64,
    /// When true, present `rejected` first (position-bias randomisation).
    pub position_swapped: bool,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
}

impl PreferencePair {
    /// A pair with default margin 0, weight 1 and no scores.
    pub fn new(
        id: impl Into<String>,
        prompt: impl Into<String>,
        chosen: impl Into<String>,
        rejected: impl Into<String>,
        label_source: impl Into<String>,
    ) -> Self {
        PreferencePair {
            id: id.into(),
            prompt: prompt.into(),
            chosen: chosen.into(),
            rejected: rejected.into(),
            label_source: label_source.into(),
            chosen_score: None,
            rejected_score: None,
            strength_mean: None,
            strength_std: None,
            margin: 0.0,
            weight: 1.0,
            position_swapped: false,
            meta: BTreeMap::new(),
        }
    }
}

/// A policy's completion of a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Stable id of this completion.
    pub id: String,
    /// Id of the prompt it completes.
    pub prompt_id: String,
    /// The prompt text.
    pub prompt: String,
    /// The generated text.
    pub text: String,
    /// Log-probability of each generated token under the policy.
    pub token_logprobs: Vec<f32>,
    /// The policy artifact that generated it.
    pub policy: Option<ArtifactRef>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
}

/// A scalar score of some record (a reward, an accuracy, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Id of the scored record.
    pub id: String,
    /// What the score measures (`gold_reward`, `rm_reward`, ...).
    pub name: String,
    /// The value.
    pub value: f64,
}

/// A reference to an artifact in the run's artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Unique id within the run (`stage/name@round`).
    pub id: String,
    /// What it is (`policy`, `reward-model`, `dataset`, ...).
    pub kind: String,
    /// Path relative to the run directory.
    pub path: String,
    /// Hex sha256 of the artifact's main file.
    pub sha256: String,
    /// The round that produced it.
    pub round: u64,
}

/// One record on a dataflow edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A prompt.
    Prompt(Prompt),
    /// A preference pair.
    Pair(PreferencePair),
    /// A completion.
    Completion(Completion),
    /// A score.
    Score(Score),
    /// An artifact reference.
    Artifact(ArtifactRef),
}

impl Record {
    /// The kind of this record, as ports declare it.
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Prompt(_) => RecordKind::Prompt,
            Record::Pair(_) => RecordKind::PreferencePair,
            Record::Completion(_) => RecordKind::Completion,
            Record::Score(_) => RecordKind::Score,
            Record::Artifact(_) => RecordKind::Artifact,
        }
    }

    /// The record's stable id.
    pub fn id(&self) -> &str {
        match self {
            Record::Prompt(p) => &p.id,
            Record::Pair(p) => &p.id,
            Record::Completion(c) => &c.id,
            Record::Score(s) => &s.id,
            Record::Artifact(a) => &a.id,
        }
    }

    /// The key data-parallel stages are sharded by: the normalised prompt,
    /// so that every record about one prompt meets on one worker (duplicate
    /// removal, best-of-n, pairing best with worst need that).
    pub fn shard_key(&self) -> u64 {
        let text = match self {
            Record::Prompt(p) => &p.text,
            Record::Pair(p) => &p.prompt,
            Record::Completion(c) => &c.prompt,
            Record::Score(s) => &s.id,
            Record::Artifact(a) => &a.id,
        };
        crate::text::stable_hash(crate::text::normalize(text).as_bytes())
    }
}

/// The type of a port: what records it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordKind {
    /// [`Prompt`] records.
    Prompt,
    /// [`PreferencePair`] records.
    PreferencePair,
    /// [`Completion`] records.
    Completion,
    /// [`Score`] records.
    Score,
    /// [`ArtifactRef`] records.
    Artifact,
    /// Any record (sinks and generic stages).
    Any,
}

impl RecordKind {
    /// Whether an output of kind `self` may feed an input of kind `input`.
    pub fn feeds(self, input: RecordKind) -> bool {
        self == input || input == RecordKind::Any || self == RecordKind::Any
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            RecordKind::Prompt => "Prompt",
            RecordKind::PreferencePair => "PreferencePair",
            RecordKind::Completion => "Completion",
            RecordKind::Score => "Score",
            RecordKind::Artifact => "Artifact",
            RecordKind::Any => "Any",
        };
        f.write_str(s)
    }
}
