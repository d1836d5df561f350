//! Helpers shared by the eval stages: score lookup, grouping keys, ordering,
//! a seeded random stream.

use hone_sdk::prelude::*;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Scores of one round, by record id then score name. A later score of the
/// same id and name replaces an earlier one.
#[derive(Default)]
pub(crate) struct Scores(BTreeMap<String, BTreeMap<String, f64>>);

impl Scores {
    /// Adds a score.
    pub fn add(&mut self, score: Score) {
        self.0
            .entry(score.id)
            .or_default()
            .insert(score.name, score.value);
    }

    /// The score `name` of record `id`.
    pub fn get(&self, id: &str, name: &str) -> Option<f64> {
        self.0.get(id).and_then(|s| s.get(name)).copied()
    }

    /// Every score of record `id`, by name.
    pub fn all(&self, id: &str) -> Option<&BTreeMap<String, f64>> {
        self.0.get(id)
    }

    /// Whether there are no scores.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scores of a round's `port`, in arrival order (a later score of
    /// one record and name replaces an earlier one).
    pub fn of(input: &mut RoundInput, port: usize) -> Scores {
        let mut scores = Scores::default();
        for s in input.scores(port) {
            scores.add(s);
        }
        scores
    }
}

/// Where a completion's score was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The completion's own meta (`meta[name]`).
    Meta,
    /// A Score record joined by the completion's id.
    Score,
}

/// A round's completions (input port 0) and the scores joined to them
/// (port 1), buffered until the round ends.
#[derive(Default)]
pub(crate) struct ScoredCompletions;

impl ScoredCompletions {
    /// A round's completions (port 0) in id order (digit runs as numbers)
    /// and their scores (port 1); `None` when no completion arrived.
    pub fn take(input: &mut RoundInput) -> Option<(Vec<Completion>, Scores)> {
        let mut round = input.take();
        let mut completions = round.completions(0);
        let scores = Scores::of(&mut round, 1);
        if completions.is_empty() {
            return None;
        }
        completions.sort_by(|a, b| natural_cmp(&a.id, &b.id));
        Some((completions, scores))
    }
}

/// The score `name` of `c`: its meta value `name` if it parses as a number
/// (what eval.best-of-n writes on its picks), else the first of `scores`
/// that has one for `c.id`.
pub(crate) fn lookup(c: &Completion, name: &str, scores: &[&Scores]) -> Option<(f64, Source)> {
    if let Some(v) = c.meta.get(name).and_then(|v| v.parse::<f64>().ok()) {
        return Some((v, Source::Meta));
    }
    scores
        .iter()
        .find_map(|s| s.get(&c.id, name))
        .map(|v| (v, Source::Score))
}

/// How completions are grouped into players or policies: by the policy
/// artifact that generated them, or by a meta value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GroupBy {
    /// The policy artifact's stage and checkpoint (`sft/ckpt-250`).
    Policy,
    /// The value of this meta key.
    Meta(String),
}

impl GroupBy {
    /// Parses `policy` or `meta:KEY`; the error names `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self, StageError> {
        if value == "policy" {
            return Ok(GroupBy::Policy);
        }
        match value.strip_prefix("meta:") {
            Some(key) if !key.is_empty() => Ok(GroupBy::Meta(key.to_string())),
            _ => Err(StageError::config(
                field,
                format!(
                    "must be \"policy\" or \"meta:KEY\" (e.g. \"meta:quality\"), found \"{value}\""
                ),
            )),
        }
    }

    /// The group of `c`, or `None` when it has no policy / no such meta key.
    pub fn key(&self, c: &Completion) -> Option<String> {
        match self {
            GroupBy::Policy => c.policy.as_ref().map(policy_name),
            GroupBy::Meta(key) => c.meta.get(key).cloned(),
        }
    }

    /// What a completion lacks when [`GroupBy::key`] gives `None`.
    pub fn missing(&self) -> String {
        match self {
            GroupBy::Policy => "a policy artifact".to_string(),
            GroupBy::Meta(key) => format!("meta `{key}`"),
        }
    }
}

/// A policy's name: its stage and checkpoint directory, with the round
/// after an `@` from round 1 on (`sft/ckpt-250`, `sft/final@1`).
pub(crate) fn policy_name(p: &ArtifactRef) -> String {
    let dir = p
        .name
        .rsplit_once('/')
        .map_or(p.name.as_str(), |(dir, _)| dir);
    match p.round {
        0 => format!("{}/{dir}", p.stage),
        r => format!("{}/{dir}@{r}", p.stage),
    }
}

/// Orders ids with their digit runs compared as numbers, so that
/// `p:demo2` comes before `p:demo10`.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let run = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (run(a), run(b));
                let (da, db) = (&a[..na], &b[..nb]);
                let trim = |d: &[u8]| {
                    let zeros = d.iter().take_while(|&&c| c == b'0').count();
                    d[zeros..].to_vec()
                };
                let (ta, tb) = (trim(da), trim(db));
                let by_value = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(&tb));
                let ord = by_value.then_with(|| na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (&a[na..], &b[nb..]);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

/// The outcome of comparing two scores for the first: 1 win, 0.5 tie, 0 loss.
pub(crate) fn outcome(a: f64, b: f64) -> f64 {
    match a.partial_cmp(&b) {
        Some(Ordering::Greater) => 1.0,
        Some(Ordering::Less) => 0.0,
        _ => 0.5,
    }
}

/// Mean of `xs` (NaN when empty).
pub(crate) fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The logistic function.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// A seeded random stream (splitmix64).
pub(crate) struct Rng(u64);

impl Rng {
    /// A stream seeded from `seed` and `key`.
    pub fn new(seed: u64, key: &str) -> Self {
        Rng(hone_sdk::text::seeded_hash(seed, key))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        hone_sdk::text::splitmix64(&mut self.0)
    }

    /// A uniform index below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (hone_sdk::text::unit(self.next_u64()) * n as f64) as usize
    }

    /// Shuffles `xs` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1).min(i);
            xs.swap(i, j);
        }
    }
}

/// Checks a name used inside a metric name: not empty, no `/`, no `_vs_`.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), StageError> {
    if name.is_empty() {
        return Err(StageError::config(field, "must not be empty"));
    }
    if name.contains("_vs_") || name.contains('/') {
        return Err(StageError::config(
            field,
            format!("\"{name}\" is part of a metric name and must contain neither `_vs_` nor `/`"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_come_from_the_structured_reference() {
        let policy = |name: &str, round| ArtifactRef {
            id: String::new(),
            kind: "policy".into(),
            path: String::new(),
            sha256: String::new(),
            round,
            stage: "sft".into(),
            name: name.into(),
            step: None,
            member: None,
        };
        assert_eq!(
            policy_name(&policy("ckpt-250/model.safetensors", 0)),
            "sft/ckpt-250"
        );
        assert_eq!(
            policy_name(&policy("final/model.safetensors", 1)),
            "sft/final@1"
        );
    }

    #[test]
    fn natural_order_compares_numbers() {
        let mut ids = vec!["p:demo10", "p:demo2", "p:demo1", "p:demo02"];
        ids.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(ids, ["p:demo1", "p:demo2", "p:demo02", "p:demo10"]);
    }

    #[test]
    fn group_by_parses() {
        assert_eq!(GroupBy::parse("g", "policy").unwrap(), GroupBy::Policy);
        assert_eq!(
            GroupBy::parse("g", "meta:q").unwrap(),
            GroupBy::Meta("q".into())
        );
        let err = GroupBy::parse("g", "meta:").unwrap_err();
        assert_eq!(err.config_field(), Some("g"));
    }

    #[test]
    fn shuffle_is_seeded_and_a_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        Rng::new(1, "x").shuffle(&mut a);
        Rng::new(1, "x").shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        b.sort();
        assert_eq!(b, (0..50).collect::<Vec<_>>());
    }
}
