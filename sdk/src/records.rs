//! The records that flow on dataflow edges. They cross the plugin boundary
//! as bincode batches, so every field is plain data: no `serde_json::Value`,
//! no skipped fields. Tensors never travel as records: a model is an
//! artifact, and records carry an [`ArtifactRef`] to it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The record layouts, field by field in declaration order, as they cross
/// the plugin boundary (bincode encodes fields in order, without names). Any
/// change to a record struct must change this text: a test pins the encoded
/// layout of a sample of every record and fails until it does. Its
/// fingerprint ([`RECORD_FINGERPRINT`]) is part of the plugin handshake, so a
/// plugin built against other layouts is refused instead of misreading
/// records.
pub const RECORD_SCHEMA: &str = "\
Prompt{id:str,text:str,meta:map<str,str>}\
PreferencePair{id:str,prompt:str,chosen:str,rejected:str,label_source:str,chosen_score:opt<f64>,\
rejected_score:opt<f64>,strength_mean:opt<f64>,strength_std:opt<f64>,margin:f64,weight:f64,\
position_swapped:bool,gold_chosen:opt<f64>,gold_rejected:opt<f64>,label_smoothing:opt<f64>,\
meta:map<str,str>}\
Completion{id:str,prompt_id:str,prompt:str,text:str,token_ids:vec<u32>,token_logprobs:vec<f32>,\
ref_logprobs:vec<f32>,values:vec<f32>,policy:opt<ArtifactRef>,meta:map<str,str>}\
Score{id:str,prompt_id:str,name:str,value:f64}\
ArtifactRef{id:str,kind:str,path:str,sha256:str,round:u64,stage:str,name:str,step:opt<u64>,\
member:opt<u64>}\
Record{Prompt,Pair,Completion,Score,Artifact}";

/// A short fingerprint of [`RECORD_SCHEMA`] (16 hex digits of its FNV-1a hash).
pub const RECORD_FINGERPRINT: &str = match std::str::from_utf8(&fingerprint(RECORD_SCHEMA)) {
    Ok(s) => s,
    Err(_) => panic!("hex digits are ASCII"),
};

const fn fingerprint(text: &str) -> [u8; 16] {
    let bytes = text.as_bytes();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    let digits = b"0123456789abcdef";
    let mut out = [0u8; 16];
    let mut j = 0;
    while j < 16 {
        out[j] = digits[((h >> (60 - 4 * j)) & 0xf) as usize];
        j += 1;
    }
    out
}

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
    /// The true reward of the chosen response, where one is known (the
    /// simulated world's gold reward model).
    pub gold_chosen: Option<f64>,
    /// The true reward of the rejected response, where one is known.
    pub gold_rejected: Option<f64>,
    /// Label-smoothing epsilon for this pair in [0, 0.5) (set by
    /// `rm.strength` on ambiguous pairs); overrides a trainer's own.
    pub label_smoothing: Option<f64>,
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
            gold_chosen: None,
            gold_rejected: None,
            label_smoothing: None,
            meta: BTreeMap::new(),
        }
    }

    /// Whether the gold reward says chosen is better: `Some(true)` or
    /// `Some(false)`, `None` without gold rewards or on a gold tie.
    pub fn gold_prefers_chosen(&self) -> Option<bool> {
        let (c, r) = (self.gold_chosen?, self.gold_rejected?);
        (c != r).then_some(c > r)
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
    /// The generated token ids, in the policy's tokenizer (empty when the
    /// text did not come from a tokenizer, e.g. a dataset's responses).
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token under the policy.
    pub token_logprobs: Vec<f32>,
    /// Log-probability of each generated token under the reference policy
    /// (filled by `lm.logprobs`; empty until then). KL(π‖π_ref) estimates
    /// are per token: `token_logprobs[t] - ref_logprobs[t]`.
    pub ref_logprobs: Vec<f32>,
    /// A value estimate per generated token (a critic's, for PPO; empty
    /// until one fills it).
    pub values: Vec<f32>,
    /// The policy artifact that generated it.
    pub policy: Option<ArtifactRef>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
}

impl Completion {
    /// The Monte-Carlo estimate of KL(π‖π_ref) on this sample: the sum over
    /// its tokens of `token_logprobs[t] - ref_logprobs[t]`, when both are
    /// recorded for the same tokens.
    pub fn logprob_minus_ref(&self) -> Option<f64> {
        let n = self.token_logprobs.len();
        (n > 0 && self.ref_logprobs.len() == n).then(|| {
            self.token_logprobs
                .iter()
                .zip(&self.ref_logprobs)
                .map(|(&lp, &rlp)| f64::from(lp) - f64::from(rlp))
                .sum()
        })
    }
}

/// A scalar score of some record (a reward, an accuracy, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Id of the scored record.
    pub id: String,
    /// Id of the prompt the scored record answers (empty when it answers
    /// none). Scores shard by it, so a data-parallel stage sees the n scored
    /// completions of a prompt on one worker.
    pub prompt_id: String,
    /// What the score measures (`gold_reward`, `rm_reward`, ...).
    pub name: String,
    /// The value.
    pub value: f64,
}

/// A reference to an artifact in the run's artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Unique id within the run (`stage/name@round`), for messages and the
    /// manifest. Read the structured fields below instead of parsing it.
    pub id: String,
    /// What it is (`policy`, `reward-model`, `dataset`, ...).
    pub kind: String,
    /// Path relative to the run directory (absolute for an artifact loaded
    /// from elsewhere).
    pub path: String,
    /// Hex sha256 of the artifact's main file.
    pub sha256: String,
    /// The round that produced it.
    pub round: u64,
    /// The stage that registered it.
    pub stage: String,
    /// Its name within that stage's outputs (`member-0/model.safetensors`).
    pub name: String,
    /// The training step of a checkpoint (`None` for a final model or a
    /// non-checkpoint artifact).
    pub step: Option<u64>,
    /// The ensemble member it belongs to, for per-member stages.
    pub member: Option<u64>,
}

impl ArtifactRef {
    /// A reference to `stage`'s artifact `name` of `round`, with the id
    /// `stage/name@round`, no step and no member.
    pub fn new(
        kind: impl Into<String>,
        stage: impl Into<String>,
        name: impl Into<String>,
        round: u64,
        path: impl Into<String>,
        sha256: impl Into<String>,
    ) -> Self {
        let (stage, name) = (stage.into(), name.into());
        ArtifactRef {
            id: format!("{stage}/{name}@{round}"),
            kind: kind.into(),
            path: path.into(),
            sha256: sha256.into(),
            round,
            stage,
            name,
            step: None,
            member: None,
        }
    }

    /// Refuses an artifact that is not of `kind` arriving on input `port`.
    /// Validation refuses such wiring between typed ports; this catches what
    /// comes through a port typed `Artifact` (any kind), such as
    /// `artifact.load`'s.
    pub fn check_kind(&self, kind: ArtifactKind, port: &str) -> Result<(), crate::StageError> {
        if kind.admits(&self.kind) {
            return Ok(());
        }
        Err(crate::StageError::new(format!(
            "artifact {} is a {}, but input `{port}` takes {} artifacts: wire a stage that emits \
             one (check `kind` of an artifact.load)",
            self.id,
            self.kind,
            kind.name()
        )))
    }
}

/// The kinds of artifact hone's stages exchange, as ports declare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArtifactKind {
    /// A language-model policy checkpoint.
    Policy,
    /// A reward model.
    RewardModel,
    /// A dataset file.
    Dataset,
    /// Any artifact (generic stages, sinks).
    Any,
}

impl ArtifactKind {
    /// The name written in manifests and [`ArtifactRef::kind`].
    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Policy => "policy",
            ArtifactKind::RewardModel => "reward-model",
            ArtifactKind::Dataset => "dataset",
            ArtifactKind::Any => "any",
        }
    }

    /// Whether an artifact of manifest kind `kind` is of this kind.
    pub fn admits(self, kind: &str) -> bool {
        self == ArtifactKind::Any || self.name() == kind
    }
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
            Record::Artifact(a) => RecordKind::Artifact(match a.kind.as_str() {
                "policy" => ArtifactKind::Policy,
                "reward-model" => ArtifactKind::RewardModel,
                "dataset" => ArtifactKind::Dataset,
                _ => ArtifactKind::Any,
            }),
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
    ///
    /// A completion and the scores of it shard by the prompt's id instead
    /// (by the prompt text when a completion has no prompt id),
    /// so that the n completions of a prompt and their scores meet on one
    /// worker (pairing best against worst needs all of them).
    pub fn shard_key(&self) -> u64 {
        let text = match self {
            Record::Prompt(p) => &p.text,
            Record::Pair(p) => &p.prompt,
            Record::Completion(c) if !c.prompt_id.is_empty() => {
                return crate::text::stable_hash(c.prompt_id.as_bytes())
            }
            Record::Completion(c) => &c.prompt,
            Record::Score(s) if !s.prompt_id.is_empty() => {
                return crate::text::stable_hash(s.prompt_id.as_bytes())
            }
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
    /// [`ArtifactRef`] records of one kind of artifact.
    Artifact(ArtifactKind),
    /// Any record (sinks and generic stages).
    Any,
}

impl RecordKind {
    /// Whether an output of kind `self` may feed an input of kind `input`:
    /// the same kind, or either side `Any`; for artifacts, the same artifact
    /// kind or either side `Artifact(Any)`.
    pub fn feeds(self, input: RecordKind) -> bool {
        match (self, input) {
            (RecordKind::Any, _) | (_, RecordKind::Any) => true,
            (RecordKind::Artifact(a), RecordKind::Artifact(b)) => {
                a == b || a == ArtifactKind::Any || b == ArtifactKind::Any
            }
            (a, b) => a == b,
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            RecordKind::Prompt => "Prompt",
            RecordKind::PreferencePair => "PreferencePair",
            RecordKind::Completion => "Completion",
            RecordKind::Score => "Score",
            RecordKind::Artifact(ArtifactKind::Any) => "Artifact",
            RecordKind::Artifact(k) => return write!(f, "Artifact({})", k.name()),
            RecordKind::Any => "Any",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record of every kind with every field set.
    fn sample() -> Vec<Record> {
        let meta: BTreeMap<String, String> = [("k".to_string(), "v".to_string())].into();
        let artifact = ArtifactRef {
            id: "s/n@1".into(),
            kind: "policy".into(),
            path: "outputs/s/n".into(),
            sha256: "ab".into(),
            round: 1,
            stage: "s".into(),
            name: "n".into(),
            step: Some(2),
            member: Some(3),
        };
        let mut pair = PreferencePair::new("p1", "q", "c", "r", "human");
        pair.chosen_score = Some(1.0);
        pair.rejected_score = Some(2.0);
        pair.strength_mean = Some(3.0);
        pair.strength_std = Some(4.0);
        pair.margin = 5.0;
        pair.weight = 6.0;
        pair.position_swapped = true;
        pair.gold_chosen = Some(7.0);
        pair.gold_rejected = Some(8.0);
        pair.label_smoothing = Some(0.1);
        pair.meta = meta.clone();
        vec![
            Record::Prompt(Prompt {
                id: "q1".into(),
                text: "q".into(),
                meta: meta.clone(),
            }),
            Record::Pair(pair),
            Record::Completion(Completion {
                id: "c1".into(),
                prompt_id: "q1".into(),
                prompt: "q".into(),
                text: "t".into(),
                token_ids: vec![1, 2],
                token_logprobs: vec![-0.5],
                ref_logprobs: vec![-0.25],
                values: vec![0.75],
                policy: Some(artifact.clone()),
                meta,
            }),
            Record::Score(Score {
                id: "c1".into(),
                prompt_id: "q1".into(),
                name: "gold".into(),
                value: 9.0,
            }),
            Record::Artifact(artifact),
        ]
    }

    #[test]
    fn the_record_layout_matches_the_declared_schema() {
        let bytes = crate::abi::encode_batch(&sample());
        // If this fails, a record struct changed: update RECORD_SCHEMA to say
        // how (its fingerprint then changes and old plugins are refused),
        // then pin the new layout hash and fingerprint here.
        assert_eq!(
            (crate::fs::sha256_hex(&bytes).as_str(), RECORD_FINGERPRINT),
            (LAYOUT_SHA256, PINNED_FINGERPRINT)
        );
    }

    const LAYOUT_SHA256: &str = "1db83fed7ae8a5f246a4f882110ccff52d8fa00c5f2eeefad58577e8d07b418f";
    const PINNED_FINGERPRINT: &str = "3e40cc22bdc03045";

    #[test]
    fn artifact_kinds_feed_their_own_kind_or_any() {
        use ArtifactKind::*;
        let a = RecordKind::Artifact;
        assert!(a(Policy).feeds(a(Policy)));
        assert!(!a(RewardModel).feeds(a(Policy)));
        assert!(a(Any).feeds(a(Policy)) && a(RewardModel).feeds(a(Any)));
        assert!(a(Policy).feeds(RecordKind::Any));
        assert!(!a(Policy).feeds(RecordKind::Score));
        assert_eq!(a(RewardModel).to_string(), "Artifact(reward-model)");
        assert_eq!(a(Any).to_string(), "Artifact");
    }
}
