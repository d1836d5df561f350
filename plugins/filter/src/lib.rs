//! The `filter` stage family: the data filtering of the online iterative
//! RLHF recipe (RLHFlow, arXiv 2405.07863) for preference pairs.
//!
//! Per pair, as batches arrive: length bounds, identical chosen/rejected, a
//! minimum score margin where scores exist, a regex blocklist. At the end of
//! the round, per prompt: exact and near-duplicate removal (records are
//! sharded by normalised prompt, so duplicates meet on one worker), keeping
//! the pair with the smallest id so the result does not depend on the number
//! of workers. Finally the order in which each pair's two responses are
//! presented is randomised with a seeded per-pair draw, recorded in
//! `position_swapped`, against position bias.

mod dedup;
mod pair;
mod select;
mod split;

pub use pair::PairCompletions;
pub use select::SelectPairs;
pub use split::Split;

use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use regex::RegexSet;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct FilterConfig {
    min_prompt_chars: u64,
    max_prompt_chars: u64,
    min_response_chars: u64,
    max_response_chars: u64,
    drop_identical: bool,
    min_score_margin: Option<f64>,
    blocklist: Vec<String>,
    dedup: String,
    near_threshold: f64,
    randomize_position: bool,
}

/// Filters preference pairs.
pub struct FilterPairs {
    config: FilterConfig,
    blocklist: Option<RegexSet>,
    kept: Vec<PreferencePair>,
    counts: BTreeMap<&'static str, u64>,
}

impl StageFactory for FilterPairs {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "filter.pairs",
            "Filters preference pairs: length bounds, identical responses, score margin, regex blocklist, \
             exact and near duplicates, position randomisation.",
        )
        .input("pairs", RecordKind::PreferencePair)
        .output("pairs", RecordKind::PreferencePair)
        .placement(Placement::DataParallel)
        .optional("min_prompt_chars", FieldType::unsigned(), 1, "Drop pairs whose prompt is shorter (characters).")
        .optional("max_prompt_chars", FieldType::unsigned(), 0, "Drop pairs whose prompt is longer (0 = no bound).")
        .optional("min_response_chars", FieldType::unsigned(), 1, "Drop pairs with a response shorter than this.")
        .optional("max_response_chars", FieldType::unsigned(), 0, "Drop pairs with a response longer than this (0 = no bound).")
        .optional("drop_identical", FieldType::Bool, true, "Drop pairs whose chosen and rejected are the same text (after normalisation).")
        .optional(
            "min_score_margin",
            FieldType::Float,
            serde_json::Value::Null,
            "Where both responses have scores, drop pairs with chosen_score - rejected_score below this (unset = keep all).",
        )
        .optional(
            "blocklist",
            FieldType::List(Box::new(FieldType::String)),
            serde_json::json!([]),
            "Regular expressions; a pair whose prompt or responses match any is dropped.",
        )
        .optional(
            "dedup",
            FieldType::one_of(&["none", "exact", "near"]),
            "near",
            "Duplicate removal within a prompt: `exact` text, or `near` (word 3-gram Jaccard of both responses >= near_threshold).",
        )
        .optional("near_threshold", FieldType::Float, 0.9, "Jaccard similarity at which two pairs count as near duplicates.")
        .optional(
            "randomize_position",
            FieldType::Bool,
            true,
            "Randomly (seeded per pair) present the rejected response first, recorded in `position_swapped`.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: FilterConfig = init.config()?;
        let blocklist = if config.blocklist.is_empty() {
            None
        } else {
            Some(RegexSet::new(&config.blocklist).map_err(|e| {
                StageError::config("blocklist", format!("invalid regular expression: {e}"))
            })?)
        };
        if !(0.0..=1.0).contains(&config.near_threshold) {
            return Err(StageError::config(
                "near_threshold",
                format!("must be between 0 and 1, found {}", config.near_threshold),
            ));
        }
        Ok(FilterPairs {
            config,
            blocklist,
            kept: Vec::new(),
            counts: BTreeMap::new(),
        })
    }
}

impl FilterPairs {
    /// Why a pair is dropped by the per-pair checks, if it is.
    fn reject_reason(&self, p: &PreferencePair) -> Option<&'static str> {
        let c = &self.config;
        let len = |s: &str| s.chars().count() as u64;
        let out_of = |n: u64, min: u64, max: u64| n < min || (max > 0 && n > max);
        if out_of(len(&p.prompt), c.min_prompt_chars, c.max_prompt_chars) {
            return Some("dropped_prompt_length");
        }
        if out_of(len(&p.chosen), c.min_response_chars, c.max_response_chars)
            || out_of(len(&p.rejected), c.min_response_chars, c.max_response_chars)
        {
            return Some("dropped_response_length");
        }
        if c.drop_identical
            && hone_sdk::text::normalize(&p.chosen) == hone_sdk::text::normalize(&p.rejected)
        {
            return Some("dropped_identical");
        }
        if let (Some(min), Some(cs), Some(rs)) =
            (c.min_score_margin, p.chosen_score, p.rejected_score)
        {
            if cs - rs < min {
                return Some("dropped_score_margin");
            }
        }
        if let Some(set) = &self.blocklist {
            if set.is_match(&p.prompt) || set.is_match(&p.chosen) || set.is_match(&p.rejected) {
                return Some("dropped_blocklist");
            }
        }
        None
    }
}

impl Stage for FilterPairs {
    fn on_batch(
        &mut self,
        _ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for record in batch {
            let Record::Pair(pair) = record else { continue };
            *self.counts.entry("input").or_default() += 1;
            match self.reject_reason(&pair) {
                Some(reason) => *self.counts.entry(reason).or_default() += 1,
                None => self.kept.push(pair),
            }
        }
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let pairs = std::mem::take(&mut self.kept);
        let (kept, exact, near) =
            dedup::dedup(pairs, &self.config.dedup, self.config.near_threshold);
        let mut counts = std::mem::take(&mut self.counts);
        counts.insert("dropped_duplicate", exact);
        counts.insert("dropped_near_duplicate", near);
        let seed = ctx.init().seed;
        let mut swapped = 0u64;
        let total = kept.len() as u64;
        for mut pair in kept {
            if self.config.randomize_position {
                pair.position_swapped = seeded_hash(seed, &pair.id) & 1 == 1;
                swapped += u64::from(pair.position_swapped);
            }
            ctx.emit(0, Record::Pair(pair));
        }
        counts.insert("kept", total);
        counts.insert("position_swapped", swapped);
        counts.entry("input").or_default();
        for (name, n) in counts {
            ctx.metric(name, n as f64);
        }
        Ok(())
    }
}

hone_sdk::export_stages!(FilterPairs, PairCompletions, SelectPairs, Split);

#[cfg(test)]
mod tests {
    use super::*;
    use hone_sdk::Collected;

    fn pair(id: &str, prompt: &str, chosen: &str, rejected: &str) -> Record {
        Record::Pair(PreferencePair::new(id, prompt, chosen, rejected, "human"))
    }

    fn run(
        config: serde_json::Value,
        input: Vec<Record>,
    ) -> (Vec<PreferencePair>, BTreeMap<String, f64>) {
        let mut full = serde_json::json!({
            "min_prompt_chars": 1, "max_prompt_chars": 0, "min_response_chars": 1, "max_response_chars": 0,
            "drop_identical": true, "min_score_margin": null, "blocklist": [], "dedup": "near",
            "near_threshold": 0.9, "randomize_position": true,
        });
        for (k, v) in config.as_object().unwrap() {
            full[k] = v.clone();
        }
        let init = StageInit::for_test("filter.pairs", full);
        let mut stage = FilterPairs::create(&init).unwrap();
        let mut out = Collected::default();
        {
            let mut ctx = Context::new(&mut out, &init, 0);
            stage.on_batch(&mut ctx, 0, input).unwrap();
            stage.on_round_end(&mut ctx).unwrap();
        }
        let pairs = out
            .records
            .remove(&0)
            .unwrap_or_default()
            .into_iter()
            .map(|r| match r {
                Record::Pair(p) => p,
                _ => panic!(),
            })
            .collect();
        let metrics = out
            .events
            .into_iter()
            .filter_map(|e| match e {
                hone_sdk::Event::Metric { name, value, .. } => Some((name, value)),
                _ => None,
            })
            .collect();
        (pairs, metrics)
    }

    #[test]
    fn drops_by_length_identity_and_blocklist() {
        let (kept, m) = run(
            serde_json::json!({"max_response_chars": 20, "blocklist": ["(?i)forbidden"]}),
            vec![
                pair("a", "q1", "fine answer", "bad answer"),
                pair("b", "q2", "this answer is far too long to keep", "short"),
                pair("c", "q3", "Same text.", "same text"),
                pair("d", "q4", "a FORBIDDEN word", "other"),
            ],
        );
        assert_eq!(
            kept.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(m["dropped_response_length"], 1.0);
        assert_eq!(m["dropped_identical"], 1.0);
        assert_eq!(m["dropped_blocklist"], 1.0);
        assert_eq!(m["kept"], 1.0);
    }

    #[test]
    fn score_margin_applies_only_where_scores_exist() {
        let mut scored = PreferencePair::new("s", "q", "x y", "z w", "rm");
        scored.chosen_score = Some(1.0);
        scored.rejected_score = Some(0.8);
        let (kept, m) = run(
            serde_json::json!({"min_score_margin": 0.5}),
            vec![Record::Pair(scored), pair("u", "q2", "x y", "z w")],
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].id, "u");
        assert_eq!(m["dropped_score_margin"], 1.0);
    }

    #[test]
    fn near_duplicates_keep_the_smallest_id() {
        let long = "the quick brown fox jumps over the lazy dog near the river bank today";
        let (kept, m) = run(
            serde_json::json!({}),
            vec![
                pair("b", "Q?", long, "no"),
                pair("a", "q", &format!("{long}!"), "no"),
                pair("c", "q", "something else entirely different here", "no"),
            ],
        );
        let ids: Vec<&str> = kept.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(m["dropped_near_duplicate"], 1.0);
    }

    #[test]
    fn bad_regex_is_a_config_error() {
        let init = StageInit::for_test(
            "filter.pairs",
            serde_json::json!({
                "min_prompt_chars": 1, "max_prompt_chars": 0, "min_response_chars": 1, "max_response_chars": 0,
                "drop_identical": true, "min_score_margin": null, "blocklist": ["("], "dedup": "near",
                "near_threshold": 0.9, "randomize_position": true,
            }),
        );
        let err = FilterPairs::create(&init).err().unwrap();
        assert_eq!(err.config_field(), Some("blocklist"));
    }

    #[test]
    fn position_randomisation_is_seeded_and_balanced() {
        let input: Vec<Record> = (0..2000)
            .map(|i| pair(&format!("p{i}"), &format!("prompt {i}"), "yes", "no"))
            .collect();
        let (kept, m) = run(serde_json::json!({}), input.clone());
        let swapped = m["position_swapped"];
        assert!((800.0..1200.0).contains(&swapped), "{swapped}");
        let (again, _) = run(serde_json::json!({}), input);
        assert_eq!(kept, again);
    }
}
