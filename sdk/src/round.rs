//! A round's input, buffered by port: for stages that need all of a round's
//! records before they work (training, pairing, merging, evaluation), which
//! otherwise each write the same "push by port in `on_batch`, take in
//! `on_round_end`".
//!
//! A stage holds a [`RoundInput`] and hands it to the SDK through
//! [`crate::Stage::round_input`]; the default `on_batch` then buffers every
//! batch, and `on_round_end` takes the round's records by port and type.

use crate::{
    ArtifactKind, ArtifactRef, Completion, PreferencePair, Prompt, Record, Score, StageError,
};
use std::collections::BTreeMap;

/// The records of one round, by input port, in arrival order.
#[derive(Debug, Default)]
pub struct RoundInput {
    ports: BTreeMap<usize, Vec<Record>>,
}

impl RoundInput {
    /// Buffers a batch that arrived on `port`.
    pub fn add(&mut self, port: usize, batch: Vec<Record>) {
        self.ports.entry(port).or_default().extend(batch);
    }

    /// Takes everything buffered, leaving the buffer empty for the next round.
    pub fn take(&mut self) -> RoundInput {
        std::mem::take(self)
    }

    /// Whether nothing arrived.
    pub fn is_empty(&self) -> bool {
        self.ports.values().all(Vec::is_empty)
    }

    /// The records of `port`, in arrival order (taken).
    pub fn records(&mut self, port: usize) -> Vec<Record> {
        self.ports.remove(&port).unwrap_or_default()
    }

    /// The prompts of `port` (other records there are ignored).
    pub fn prompts(&mut self, port: usize) -> Vec<Prompt> {
        self.of(port, |r| match r {
            Record::Prompt(p) => Some(p),
            _ => None,
        })
    }

    /// The preference pairs of `port`.
    pub fn pairs(&mut self, port: usize) -> Vec<PreferencePair> {
        self.of(port, |r| match r {
            Record::Pair(p) => Some(p),
            _ => None,
        })
    }

    /// The preference pairs of `port` in id order, one per id (the first to
    /// arrive): what a trainer needs so that its data does not depend on
    /// arrival order or on a pair reaching it twice.
    pub fn pairs_by_id(&mut self, port: usize) -> Vec<PreferencePair> {
        let mut pairs = self.pairs(port);
        pairs.sort_by(|a, b| a.id.cmp(&b.id));
        pairs.dedup_by(|a, b| a.id == b.id);
        pairs
    }

    /// The completions of `port`.
    pub fn completions(&mut self, port: usize) -> Vec<Completion> {
        self.of(port, |r| match r {
            Record::Completion(c) => Some(c),
            _ => None,
        })
    }

    /// The scores of `port`.
    pub fn scores(&mut self, port: usize) -> Vec<Score> {
        self.of(port, |r| match r {
            Record::Score(s) => Some(s),
            _ => None,
        })
    }

    /// The artifacts of `port`, each checked to be of `kind` (`name` is the
    /// port's name, for the error).
    pub fn artifacts(
        &mut self,
        port: usize,
        kind: ArtifactKind,
        name: &str,
    ) -> Result<Vec<ArtifactRef>, StageError> {
        let artifacts = self.of(port, |r| match r {
            Record::Artifact(a) => Some(a),
            _ => None,
        });
        for a in &artifacts {
            a.check_kind(kind, name)?;
        }
        Ok(artifacts)
    }

    fn of<T>(&mut self, port: usize, pick: impl Fn(Record) -> Option<T>) -> Vec<T> {
        self.records(port).into_iter().filter_map(pick).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_by_port_and_type_and_the_buffer_empties() {
        let mut buffer = RoundInput::default();
        assert!(buffer.is_empty());
        let pair = |id: &str| Record::Pair(PreferencePair::new(id, "q", "a", "b", "t"));
        let policy = ArtifactRef::new("policy", "sft", "final/model.safetensors", 0, "", "");
        buffer.add(0, vec![pair("b"), pair("a")]);
        buffer.add(1, vec![Record::Artifact(policy.clone())]);
        buffer.add(0, vec![pair("c")]);
        let mut round = buffer.take();
        assert!(buffer.is_empty() && !round.is_empty());
        let ids: Vec<String> = round.pairs(0).into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["b", "a", "c"], "arrival order");
        assert!(round.pairs(0).is_empty(), "taken");
        let err = round
            .clone_artifacts_for_test(1, ArtifactKind::RewardModel)
            .unwrap_err();
        assert!(
            err.message.contains("takes reward-model artifacts"),
            "{err}"
        );
        assert_eq!(
            round.artifacts(1, ArtifactKind::Policy, "init").unwrap(),
            [policy]
        );
    }

    impl RoundInput {
        fn clone_artifacts_for_test(
            &self,
            port: usize,
            kind: ArtifactKind,
        ) -> Result<Vec<ArtifactRef>, StageError> {
            let mut copy = RoundInput::default();
            copy.add(port, self.ports.get(&port).cloned().unwrap_or_default());
            copy.artifacts(port, kind, "models")
        }
    }
}
