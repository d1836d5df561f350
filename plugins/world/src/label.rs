//! `world.label`: pairs completions of one prompt and labels each pair with
//! a simulated annotator, keeping the ground truth beside the label.

use crate::draws::Draws;
use crate::tasks::gold_reward;
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelConfig {
    pairing: String,
    temperature: f64,
    flip_rate: f64,
    position_bias: f64,
    length_bias: f64,
    annotators: u64,
    annotator_spread: f64,
    seed: u64,
}

/// One simulated annotator's rates.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Annotator {
    flip_rate: f64,
    position_bias: f64,
    length_bias: f64,
}

/// Labels pairs of completions with simulated annotators.
pub struct Label {
    config: LabelConfig,
    seed: u64,
    pool: Vec<Annotator>,
    input: RoundInput,
}

const RATES: [&str; 3] = ["flip_rate", "position_bias", "length_bias"];

impl StageFactory for Label {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "world.label",
            "Pairs the completions of each prompt at the round's end and labels every pair with a simulated \
             annotator from a pool. Per pair, in order: with probability position_bias the first-shown \
             response wins (bias `position`); else, if the lengths differ, with probability length_bias the \
             longer wins (bias `length`); else Bradley-Terry, P(a > b) = sigmoid((gold_a - gold_b) / temperature). \
             Then the label is flipped with probability flip_rate. Emits PreferencePairs (label_source \
             `simulated`, `position_swapped` = the rejected response was shown first, `gold_chosen` and \
             `gold_rejected` set) with meta `clean_label`, `flipped`, `annotator`, `bias`, `prompt_id`, and the completions' `family` and \
             `split`. Candidate pairs arriving on `pairs` (e.g. filter.select-pairs' choice) are labelled as \
             they are, whatever their chosen/rejected order: their two responses are the two completions \
             (ids from meta chosen_id / rejected_id, else PAIR:a and PAIR:b). Metrics (counts): pairs, flipped, \
             position_decided, length_decided, clean_agreement, skipped_identical, skipped_no_gold.",
        )
        .input("completions", RecordKind::Completion)
        .input("pairs", RecordKind::PreferencePair)
        .output("pairs", RecordKind::PreferencePair)
        .placement(Placement::DataParallel)
        .optional(
            "pairing",
            FieldType::one_of(&["all", "adjacent", "best-vs-random"]),
            "all",
            "`all` pairs of a prompt's completions, `adjacent` ones in id order, or the gold-best against one seeded random other.",
        )
        .optional("temperature", FieldType::Float, 0.1, "Bradley-Terry temperature on the gold reward difference; 0 = always the truly better.")
        .optional("flip_rate", FieldType::Float, 0.0, "Probability that label noise flips a label (the WARM paper uses 0.25).")
        .optional("position_bias", FieldType::Float, 0.0, "Probability that an annotator simply prefers the response shown first.")
        .optional("length_bias", FieldType::Float, 0.0, "Probability that an annotator prefers the longer response, when not position-decided and lengths differ.")
        .optional("annotators", FieldType::positive().at_most(1_000_000), 1, "Annotators in the pool; each pair is labelled by one, drawn per pair.")
        .optional(
            "annotator_spread",
            FieldType::Float,
            0.0,
            "Relative spread of each annotator's rates around the configured ones (0.5: +-50%), centred so the pool's mean is the configured rate.",
        )
        .optional("seed", FieldType::unsigned(), 0, "Seed, combined with the pipeline seed.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: LabelConfig = init.config()?;
        let rates = [config.flip_rate, config.position_bias, config.length_bias];
        for (name, rate) in RATES.iter().zip(rates) {
            if !(0.0..=1.0).contains(&rate) {
                return Err(StageError::config(
                    *name,
                    format!("must be between 0 and 1, found {rate}"),
                ));
            }
        }
        if config.temperature < 0.0 {
            return Err(StageError::config(
                "temperature",
                format!("must be >= 0, found {}", config.temperature),
            ));
        }
        if config.annotators == 0 {
            return Err(StageError::config("annotators", "must be at least 1"));
        }
        let seed = seeded_hash(init.seed, &format!("world.label:{}", config.seed));
        let pool = annotator_pool(&config, seed);
        Ok(Label {
            config,
            seed,
            pool,
            input: RoundInput::default(),
        })
    }
}

/// Per-annotator rates: the configured rate times 1 + spread x offset, the
/// offsets seeded and centred on zero so the pool's mean stays the
/// configured rate (up to clamping at 0 and 1).
fn annotator_pool(config: &LabelConfig, seed: u64) -> Vec<Annotator> {
    let n = config.annotators as usize;
    let offsets: Vec<[f64; 3]> = (0..n)
        .map(|k| {
            let mut rng = Draws::new(seed, format!("annotator{k}"));
            [0; 3].map(|_| 2.0 * rng.unit() - 1.0)
        })
        .collect();
    let mean = |i: usize| offsets.iter().map(|o| o[i]).sum::<f64>() / n as f64;
    let centre = [mean(0), mean(1), mean(2)];
    let rate = |base: f64, o: f64, c: f64| {
        (base * (1.0 + config.annotator_spread * (o - c))).clamp(0.0, 1.0)
    };
    offsets
        .iter()
        .map(|o| Annotator {
            flip_rate: rate(config.flip_rate, o[0], centre[0]),
            position_bias: rate(config.position_bias, o[1], centre[1]),
            length_bias: rate(config.length_bias, o[2], centre[2]),
        })
        .collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Label {
    /// The index pairs of a prompt's completions (sorted by id) to label.
    fn pairs_of(&self, prompt_id: &str, group: &[Completion], gold: &[f64]) -> Vec<(usize, usize)> {
        let n = group.len();
        match self.config.pairing.as_str() {
            "adjacent" => (1..n).map(|j| (j - 1, j)).collect(),
            "best-vs-random" if n >= 2 => {
                let best = (0..n).fold(0, |b, i| if gold[i] > gold[b] { i } else { b });
                let other = Draws::new(self.seed, prompt_id).range(0, n as u64 - 2) as usize;
                let other = if other >= best { other + 1 } else { other };
                vec![(best.min(other), best.max(other))]
            }
            "best-vs-random" => Vec::new(),
            _ => (0..n)
                .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                .collect(),
        }
    }

    /// Labels one pair; `a` and `b` are in id order.
    fn label(&self, a: &Completion, b: &Completion, gold_a: f64, gold_b: f64) -> PreferencePair {
        let id = format!("{}~{}", a.id, b.id);
        let mut rng = Draws::new(self.seed, &id);
        let annotator = rng.range(0, self.pool.len() as u64 - 1) as usize;
        let rates = self.pool[annotator];
        let a_first = rng.chance(0.5);
        let (len_a, len_b) = (a.text.chars().count(), b.text.chars().count());
        // Draw every variable each time so one bias's rate does not shift
        // the draws of the others.
        let (u_position, u_length, u_bt, u_flip) = (rng.unit(), rng.unit(), rng.unit(), rng.unit());
        let (mut a_wins, bias) = if u_position < rates.position_bias {
            (a_first, "position")
        } else if len_a != len_b && u_length < rates.length_bias {
            (len_a > len_b, "length")
        } else if self.config.temperature == 0.0 {
            let tie_break = u_bt < 0.5;
            (
                if gold_a == gold_b {
                    tie_break
                } else {
                    gold_a > gold_b
                },
                "",
            )
        } else {
            (
                u_bt < sigmoid((gold_a - gold_b) / self.config.temperature),
                "",
            )
        };
        let flipped = u_flip < rates.flip_rate;
        a_wins ^= flipped;
        let (chosen, rejected, gold_c, gold_r) = if a_wins {
            (a, b, gold_a, gold_b)
        } else {
            (b, a, gold_b, gold_a)
        };
        let mut pair =
            PreferencePair::new(&id, &a.prompt, &chosen.text, &rejected.text, "simulated");
        pair.position_swapped = a_first != a_wins;
        pair.gold_chosen = Some(gold_c);
        pair.gold_rejected = Some(gold_r);
        pair.meta = BTreeMap::from([
            ("clean_label".to_string(), (gold_c >= gold_r).to_string()),
            ("flipped".to_string(), flipped.to_string()),
            ("annotator".to_string(), annotator.to_string()),
            ("bias".to_string(), bias.to_string()),
            ("prompt_id".to_string(), a.prompt_id.clone()),
        ]);
        // The task family and split travel along, for per-family and
        // in/out-of-distribution breakdowns (`split_by`).
        for key in ["family", "split"] {
            if let Some(v) = a.meta.get(key) {
                pair.meta.insert(key.to_string(), v.clone());
            }
        }
        pair
    }
}

impl Stage for Label {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut counts: BTreeMap<&str, u64> = [
            "pairs",
            "flipped",
            "position_decided",
            "length_decided",
            "clean_agreement",
            "skipped_identical",
            "skipped_no_gold",
        ]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
        let mut by_prompt: BTreeMap<String, Vec<Completion>> = BTreeMap::new();
        let mut input = self.input.take();
        for c in input.completions(0) {
            by_prompt.entry(c.prompt_id.clone()).or_default().push(c);
        }
        for (prompt_id, mut group) in by_prompt {
            group.sort_by(|x, y| x.id.cmp(&y.id));
            let gold: Option<Vec<f64>> = group
                .iter()
                .map(|c| gold_reward(&c.prompt, &c.text))
                .collect();
            let Some(gold) = gold else {
                *counts.get_mut("skipped_no_gold").expect("listed") += group.len() as u64;
                continue;
            };
            for (i, j) in self.pairs_of(&prompt_id, &group, &gold) {
                if group[i].text == group[j].text {
                    *counts.get_mut("skipped_identical").expect("listed") += 1;
                    continue;
                }
                let pair = self.label(&group[i], &group[j], gold[i], gold[j]);
                count(&mut counts, &pair);
                ctx.emit(0, Record::Pair(pair));
            }
        }
        for p in input.pairs_by_id(1) {
            let [a, b] = candidate_sides(&p);
            let (Some(gold_a), Some(gold_b)) = (
                gold_reward(&a.prompt, &a.text),
                gold_reward(&b.prompt, &b.text),
            ) else {
                *counts.get_mut("skipped_no_gold").expect("listed") += 2;
                continue;
            };
            if a.text == b.text {
                *counts.get_mut("skipped_identical").expect("listed") += 1;
                continue;
            }
            let mut pair = self.label(&a, &b, gold_a, gold_b);
            if let Some(by) = p.meta.get("selected_by") {
                pair.meta.insert("selected_by".into(), by.clone());
            }
            count(&mut counts, &pair);
            ctx.emit(0, Record::Pair(pair));
        }
        for (name, n) in counts {
            ctx.metric(name, n as f64);
        }
        Ok(())
    }
}

/// Adds a labelled pair to the round's counts.
fn count(counts: &mut BTreeMap<&str, u64>, pair: &PreferencePair) {
    let mut bump = |k: &str, yes: bool| *counts.get_mut(k).expect("listed") += u64::from(yes);
    bump("pairs", true);
    bump("flipped", pair.meta["flipped"] == "true");
    bump("position_decided", pair.meta["bias"] == "position");
    bump("length_decided", pair.meta["bias"] == "length");
    bump("clean_agreement", pair.meta["clean_label"] == "true");
}

/// A candidate pair's two responses as completions, in id order: what an
/// annotator is shown, whatever order the candidate put them in.
fn candidate_sides(p: &PreferencePair) -> [Completion; 2] {
    let side = |key: &str, suffix: &str, text: &str| Completion {
        id: p
            .meta
            .get(key)
            .cloned()
            .unwrap_or_else(|| format!("{}:{suffix}", p.id)),
        prompt_id: p.meta.get("prompt_id").cloned().unwrap_or_default(),
        prompt: p.prompt.clone(),
        text: text.to_string(),
        token_ids: Vec::new(),
        token_logprobs: Vec::new(),
        ref_logprobs: Vec::new(),
        values: Vec::new(),
        policy: None,
        meta: ["family", "split"]
            .iter()
            .filter_map(|k| p.meta.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect(),
    };
    let mut sides = [
        side("chosen_id", "a", &p.chosen),
        side("rejected_id", "b", &p.rejected),
    ];
    sides.sort_by(|x, y| x.id.cmp(&y.id));
    sides
}

#[cfg(test)]
mod tests;
