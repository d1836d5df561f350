//! `filter.pair-completions`: preference pairs from a policy's own scored
//! samples, the step of online iterative DPO (RLHFlow, arXiv 2405.07863)
//! between scoring n responses per prompt and training on them: the best
//! against the worst (`max_min`), the best against a random other
//! (`max_random`), or two at random (`random`).
//!
//! A length penalty (the paper's answer to the reward model's length bias)
//! ranks by r - lambda * len instead of r. Pairs whose two ranking scores are
//! equal teach nothing and are dropped, and counted.

use hone_sdk::prelude::*;
use hone_sdk::text::{seeded_hash, splitmix64};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairConfig {
    score: String,
    gold: String,
    strategy: String,
    length_penalty: f64,
    length_unit: String,
    randomize_position: bool,
    seed: u64,
}

/// Pairs each prompt's scored completions.
pub struct PairCompletions {
    config: PairConfig,
    seed: u64,
    input: RoundInput,
}

/// One completion with what ranks it.
struct Candidate {
    completion: Completion,
    score: f64,
    /// `score - length_penalty * length`: what chooses the pair.
    ranked: f64,
    gold: Option<f64>,
}

impl StageFactory for PairCompletions {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "filter.pair-completions",
            "Preference pairs from each prompt's scored completions (online iterative DPO, RLHFlow): \
             `max_min` pairs the best against the worst, `max_random` the best against a seeded random \
             other, `random` two seeded random ones, `all` every two (the candidates of active label \
             selection); in each pair the better is chosen. Completions are ranked by \
             their `score` Score minus length_penalty x length (characters, or tokens: the completion's \
             token_ids); a pair whose two ranking values are equal is a tie, dropped and counted. Emits \
             PreferencePairs (id `A~B` in id order, label_source = the score's name, chosen_score and \
             rejected_score = the unpenalised scores, gold_chosen / gold_rejected from a `gold` Score \
             when one arrives, position_swapped from a seeded draw, meta prompt_id, chosen_id, \
             rejected_id, strategy, family and split). Metrics: prompts, pairs, ties, too_few \
             (prompts with fewer than 2 scored completions), unscored (completions without the score), \
             non_finite (completions whose score is NaN or infinite, left out), \
             chosen_score, rejected_score, chosen_length, rejected_length (means, characters) and, \
             with gold, gold_agreement (the share of pairs whose chosen is truly better, gold ties \
             left out).",
        )
        .input("completions", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .output("pairs", RecordKind::PreferencePair)
        .placement(Placement::DataParallel)
        .optional(
            "score",
            FieldType::String,
            "proxy_reward",
            "Name of the Score that ranks the completions (rm.score's `proxy_reward`, world.gold's `gold_reward`).",
        )
        .optional(
            "gold",
            FieldType::String,
            "gold_reward",
            "Name of a Score copied into gold_chosen / gold_rejected where it arrives (for measurement only; it does not rank).",
        )
        .optional(
            "strategy",
            FieldType::one_of(&["max_min", "max_random", "random", "all"]),
            "max_min",
            "Which two completions of a prompt form its pair (see the description).",
        )
        .optional(
            "length_penalty",
            FieldType::Float,
            0.0,
            "lambda: rank by score - lambda x length (0 = by score alone; >= 0).",
        )
        .optional(
            "length_unit",
            FieldType::one_of(&["chars", "tokens"]),
            "chars",
            "What length counts: characters of the text, or the completion's generated tokens.",
        )
        .optional(
            "randomize_position",
            FieldType::Bool,
            true,
            "Present the rejected response first with probability 1/2 (seeded per pair), recorded in `position_swapped`.",
        )
        .optional("seed", FieldType::unsigned(), 0, "Seed of the random picks and positions, combined with the pipeline seed and the round.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: PairConfig = init.config()?;
        if !(config.length_penalty >= 0.0 && config.length_penalty.is_finite()) {
            return Err(StageError::config(
                "length_penalty",
                format!(
                    "must be 0 or more, found {} (a negative penalty would reward length)",
                    config.length_penalty
                ),
            ));
        }
        if config.score.is_empty() {
            return Err(StageError::config(
                "score",
                "must name a Score, e.g. \"proxy_reward\"",
            ));
        }
        let seed = seeded_hash(
            init.seed,
            &format!("filter.pair-completions:{}", config.seed),
        );
        Ok(PairCompletions {
            config,
            seed,
            input: RoundInput::default(),
        })
    }
}

/// A seeded stream of draws for one prompt and round.
struct Draws(u64);

impl Draws {
    /// A uniform index below `n` (n >= 1).
    fn below(&mut self, n: usize) -> usize {
        (splitmix64(&mut self.0) % n as u64) as usize
    }
}

impl PairCompletions {
    /// The (a, b) index pairs of one prompt's candidates (sorted by id)
    /// that the strategy puts together.
    fn choose(&self, group: &[Candidate], draws: &mut Draws) -> Vec<(usize, usize)> {
        let n = group.len();
        if self.config.strategy == "all" {
            return (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .collect();
        }
        // The first best and the first worst in id order: deterministic on ties.
        let best = (0..n).fold(0, |b, i| {
            if group[i].ranked > group[b].ranked {
                i
            } else {
                b
            }
        });
        let worst = (0..n).fold(0, |w, i| {
            if group[i].ranked < group[w].ranked {
                i
            } else {
                w
            }
        });
        let (a, b) = match self.config.strategy.as_str() {
            "max_random" => {
                let other = draws.below(n - 1);
                (best, if other >= best { other + 1 } else { other })
            }
            "random" => {
                let a = draws.below(n);
                let b = draws.below(n - 1);
                (a, if b >= a { b + 1 } else { b })
            }
            _ => (best, worst),
        };
        vec![(a, b)]
    }

    /// (better, worse) by the ranking value, or `None` for a tie.
    fn orient(group: &[Candidate], (a, b): (usize, usize)) -> Option<(usize, usize)> {
        let (ra, rb) = (group[a].ranked, group[b].ranked);
        if ra == rb {
            return None;
        }
        Some(if ra > rb { (a, b) } else { (b, a) })
    }

    fn length(&self, c: &Completion) -> Result<f64, StageError> {
        if self.config.length_unit == "tokens" {
            if c.token_ids.is_empty() && !c.text.is_empty() {
                return Err(StageError::new(format!(
                    "completion {} has no token ids, so length_unit = \"tokens\" cannot measure it: \
                     pair completions from lm.rollout, or set length_unit = \"chars\"",
                    c.id
                )));
            }
            return Ok(c.token_ids.len() as f64);
        }
        Ok(c.text.chars().count() as f64)
    }

    fn pair(&self, chosen: &Candidate, rejected: &Candidate, swapped: bool) -> PreferencePair {
        let (c, r) = (&chosen.completion, &rejected.completion);
        let (first, second) = if c.id <= r.id { (c, r) } else { (r, c) };
        let mut pair = PreferencePair::new(
            format!("{}~{}", first.id, second.id),
            &c.prompt,
            &c.text,
            &r.text,
            &self.config.score,
        );
        pair.chosen_score = Some(chosen.score);
        pair.rejected_score = Some(rejected.score);
        pair.gold_chosen = chosen.gold;
        pair.gold_rejected = rejected.gold;
        pair.position_swapped = swapped;
        pair.meta = BTreeMap::from([
            ("prompt_id".to_string(), c.prompt_id.clone()),
            ("chosen_id".to_string(), c.id.clone()),
            ("rejected_id".to_string(), r.id.clone()),
            ("strategy".to_string(), self.config.strategy.clone()),
        ]);
        for key in ["family", "split"] {
            if let Some(v) = c.meta.get(key) {
                pair.meta.insert(key.to_string(), v.clone());
            }
        }
        pair
    }
}

impl Stage for PairCompletions {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        let completions = input.completions(0);
        let mut scores: BTreeMap<(String, String), f64> = BTreeMap::new();
        for s in input.scores(1) {
            scores.insert((s.id, s.name), s.value);
        }
        let get = |id: &str, name: &str| scores.get(&(id.to_string(), name.to_string())).copied();
        let mut by_prompt: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        let (mut unscored, mut non_finite) = (0u64, 0u64);
        for c in completions {
            let Some(score) = get(&c.id, &self.config.score) else {
                unscored += 1;
                continue;
            };
            // A NaN or infinite score (a diverged reward model) ranks nothing.
            if !score.is_finite() {
                non_finite += 1;
                continue;
            }
            let length = self.length(&c)?;
            let gold = get(&c.id, &self.config.gold);
            // A completion without a prompt id is grouped by its prompt text.
            let key = if c.prompt_id.is_empty() {
                format!("text:{}", hone_sdk::text::normalize(&c.prompt))
            } else {
                c.prompt_id.clone()
            };
            by_prompt.entry(key).or_default().push(Candidate {
                ranked: score - self.config.length_penalty * length,
                score,
                gold,
                completion: c,
            });
        }
        let (mut pairs, mut ties, mut too_few) = (0u64, 0u64, 0u64);
        let mut sums = [0.0f64; 4];
        let (mut gold_agree, mut gold_judged) = (0u64, 0u64);
        let prompts = by_prompt.len();
        for (prompt_id, mut group) in by_prompt {
            if group.len() < 2 {
                too_few += 1;
                continue;
            }
            group.sort_by(|x, y| x.completion.id.cmp(&y.completion.id));
            let mut draws = Draws(seeded_hash(
                self.seed,
                &format!("{prompt_id}#{}", ctx.round()),
            ));
            for chosen in self.choose(&group, &mut draws) {
                let Some((better, worse)) = Self::orient(&group, chosen) else {
                    ties += 1;
                    continue;
                };
                let swapped = self.config.randomize_position && draws.below(2) == 1;
                let (c, r) = (&group[better], &group[worse]);
                sums[0] += c.score;
                sums[1] += r.score;
                sums[2] += c.completion.text.chars().count() as f64;
                sums[3] += r.completion.text.chars().count() as f64;
                if let (Some(gc), Some(gr)) = (c.gold, r.gold) {
                    if gc != gr {
                        gold_judged += 1;
                        gold_agree += u64::from(gc > gr);
                    }
                }
                pairs += 1;
                ctx.emit(0, Record::Pair(self.pair(c, r, swapped)));
            }
        }
        ctx.metric("prompts", prompts as f64);
        ctx.metric("pairs", pairs as f64);
        ctx.metric("ties", ties as f64);
        ctx.metric("too_few", too_few as f64);
        ctx.metric("unscored", unscored as f64);
        ctx.metric("non_finite", non_finite as f64);
        if pairs > 0 {
            let n = pairs as f64;
            for (name, sum) in [
                "chosen_score",
                "rejected_score",
                "chosen_length",
                "rejected_length",
            ]
            .into_iter()
            .zip(sums)
            {
                ctx.metric(name, sum / n);
            }
        }
        if gold_judged > 0 {
            ctx.metric("gold_agreement", gold_agree as f64 / gold_judged as f64);
        }
        if unscored > 0 {
            ctx.log(format!(
                "{unscored} completions have no `{}` score and are not paired: wire the scorer's \
                 Scores to `scores` (rm.score names them proxy_reward, world.gold gold_reward)",
                self.config.score
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
