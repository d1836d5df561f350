//! `eval.elo`: Elo ratings of policies from per-prompt games, averaged over
//! seeded orderings of the games.

use crate::common::{lookup, outcome, GroupBy, Rng, ScoredCompletions, Source};
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EloConfig {
    player: String,
    score: String,
    k: f64,
    initial: f64,
    permutations: i64,
    bootstrap: u64,
    across_rounds: bool,
    method: String,
    seed: u64,
}

/// Elo ratings of the players (policies, checkpoints or meta values) whose
/// completions meet on the same prompts.
pub struct Elo {
    config: EloConfig,
    player: GroupBy,
    seed: u64,
    input: RoundInput,
    /// prompt id -> (player, completion id) -> score: this round's, or with
    /// `across_rounds` every round's so far.
    kept: BTreeMap<String, BTreeMap<(String, String), f64>>,
}

/// A prompt's kept entries in a snapshot: (player, completion id, score).
type KeptPrompt = (String, Vec<(String, String, f64)>);

/// One game: players `a` and `b` (indices), and a's result (1, 0.5 or 0).
#[derive(Debug, Clone, Copy)]
struct Game {
    a: usize,
    b: usize,
    result: f64,
}

/// Bradley-Terry ratings on the Elo scale: the maximum-likelihood strengths
/// of P(a beats b) = 1 / (1 + 10^((r_b - r_a) / 400)) given the games (a
/// draw is half a win each), by Hunter's MM algorithm, centred on
/// `initial`. Their order does not matter, unlike online Elo's. One virtual
/// draw between every two players who met keeps the rating of a player who
/// won or lost every game finite.
fn bradley_terry(games: &[Game], players: usize, initial: f64) -> Vec<f64> {
    let mut wins = vec![vec![0.0f64; players]; players];
    let mut met = vec![vec![0.0f64; players]; players];
    for g in games {
        wins[g.a][g.b] += g.result;
        wins[g.b][g.a] += 1.0 - g.result;
        met[g.a][g.b] += 1.0;
        met[g.b][g.a] += 1.0;
    }
    for i in 0..players {
        for j in 0..players {
            if i != j && met[i][j] > 0.0 {
                wins[i][j] += 0.5;
                met[i][j] += 1.0;
            }
        }
    }
    let total: Vec<f64> = wins.iter().map(|w| w.iter().sum()).collect();
    let mut p = vec![1.0f64; players];
    for _ in 0..10_000 {
        let mut next: Vec<f64> = (0..players)
            .map(|i| {
                let denominator: f64 = (0..players)
                    .filter(|&j| met[i][j] > 0.0)
                    .map(|j| met[i][j] / (p[i] + p[j]))
                    .sum();
                if denominator > 0.0 {
                    total[i] / denominator
                } else {
                    p[i]
                }
            })
            .collect();
        // Fix the scale: the geometric mean strength is 1 (mean rating = initial).
        let log_mean = next.iter().map(|x| x.ln()).sum::<f64>() / players as f64;
        for x in &mut next {
            *x /= log_mean.exp();
        }
        let change = next
            .iter()
            .zip(&p)
            .map(|(a, b)| (a.ln() - b.ln()).abs())
            .fold(0.0, f64::max);
        p = next;
        if change < 1e-12 {
            break;
        }
    }
    p.iter().map(|x| initial + 400.0 * x.log10()).collect()
}

/// Elo ratings after playing `games` in order, every player from `initial`.
fn play(games: &[Game], players: usize, k: f64, initial: f64) -> Vec<f64> {
    let mut r = vec![initial; players];
    for g in games {
        let expected = 1.0 / (1.0 + 10f64.powf((r[g.b] - r[g.a]) / 400.0));
        let delta = k * (g.result - expected);
        r[g.a] += delta;
        r[g.b] -= delta;
    }
    r
}

impl StageFactory for Elo {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "eval.elo",
            "Elo ratings of players: on each prompt, every completion of one player meets every completion \
             of each other player, and the higher `score` wins (ties are draws). A completion's score is its \
             meta value `score` if it has one (eval.best-of-n writes one on its picks), else the Score of \
             its id; an id that several players share cannot be joined and is left out (`ambiguous`). Ratings start at `initial`, \
             move by `k`, and are averaged over `permutations` seeded shuffles of the game order. Metrics: \
             `elo/PLAYER`, `elo_lo/PLAYER` and `elo_hi/PLAYER` (a 95% interval from `bootstrap` resamples \
             of the prompts), `games`, `unplayed` (completions without a player or a score). With \
             across_rounds, every round's players stay in the table. Logs a table of rating, interval, \
             games and wins.",
        )
        .input("completions", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .optional(
            "player",
            FieldType::String,
            "policy",
            "`policy`: the generating policy artifact's stage and checkpoint (`sft/ckpt-250`); \
             `meta:KEY`: the completion's meta value (e.g. `meta:quality`).",
        )
        .optional("score", FieldType::String, "gold_reward", "Name of the Score that decides a game.")
        .optional("k", FieldType::Float, 16.0, "Elo K factor: the most a rating moves in one game.")
        .optional("initial", FieldType::Float, 1000.0, "Every player's starting rating.")
        .optional(
            "permutations",
            FieldType::positive().at_most(1_000_000),
            100,
            "Seeded shuffles of the game order whose final ratings are averaged.",
        )
        .optional(
            "bootstrap",
            FieldType::unsigned().at_most(100_000),
            200,
            "Bootstrap resamples of the prompts (with replacement) for each rating's 95% interval, metrics \
             elo_lo/PLAYER and elo_hi/PLAYER (0 = none).",
        )
        .optional(
            "method",
            FieldType::one_of(&["online", "bt"]),
            "online",
            "`online`: Elo updates game by game, averaged over `permutations` orders; `bt`: Bradley-Terry \
             maximum likelihood on the Elo scale (Chatbot Arena's ratings), which does not depend on the \
             order of the games, so its bootstrap intervals hold no ordering noise.",
        )
        .optional(
            "across_rounds",
            FieldType::Bool,
            false,
            "Keep every round's completions: each round rates every player seen so far in one table, and \
             players of different rounds meet on shared prompts (every round's checkpoint of an online \
             loop). A player's completion seen again (same id) replaces itself.",
        )
        .optional("seed", FieldType::unsigned(), 0, "Seed of the shuffles and resamples, combined with the pipeline seed.")
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: EloConfig = init.config()?;
        let player = GroupBy::parse("player", &config.player)?;
        if !(config.k > 0.0 && config.k.is_finite()) {
            return Err(StageError::config(
                "k",
                format!("must be a positive number, found {}", config.k),
            ));
        }
        if config.permutations < 1 {
            return Err(StageError::config(
                "permutations",
                format!("must be at least 1, found {}", config.permutations),
            ));
        }
        if config.score.is_empty() {
            return Err(StageError::config(
                "score",
                "must name a score, e.g. \"gold_reward\"",
            ));
        }
        let seed = seeded_hash(init.seed, &format!("eval.elo:{}", config.seed));
        Ok(Elo {
            config,
            player,
            seed,
            input: RoundInput::default(),
            kept: BTreeMap::new(),
        })
    }
}

impl Stage for Elo {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        if !self.config.across_rounds {
            // Each round is rated on its own: nothing carries over.
            return Ok(None);
        }
        let kept: Vec<KeptPrompt> = self
            .kept
            .iter()
            .map(|(prompt, entries)| {
                let entries = entries
                    .iter()
                    .map(|((player, id), &score)| (player.clone(), id.clone(), score));
                (prompt.clone(), entries.collect())
            })
            .collect();
        hone_sdk::snapshot::encode("eval.elo", &kept).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        let kept: Vec<KeptPrompt> = hone_sdk::snapshot::decode("eval.elo", round, snapshot)?;
        self.kept = kept
            .into_iter()
            .map(|(prompt, entries)| {
                (
                    prompt,
                    entries
                        .into_iter()
                        .map(|(player, id, score)| ((player, id), score))
                        .collect(),
                )
            })
            .collect();
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let Some((completions, scores)) = ScoredCompletions::take(&mut self.input) else {
            return Ok(());
        };
        let mut unplayed = 0u64;
        // Ids joined to a Score record, with the player they were joined for:
        // the same id under two players cannot tell whose score it is.
        let mut joined: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut entries = Vec::new();
        for c in &completions {
            let found = lookup(c, &self.config.score, &[&scores]);
            let (Some(player), Some((score, source))) = (self.player.key(c), found) else {
                unplayed += 1;
                continue;
            };
            if source == Source::Score {
                joined.entry(&c.id).or_default().push(player.clone());
            }
            entries.push((c, player, score, source));
        }
        let ambiguous: std::collections::BTreeSet<&str> = joined
            .iter()
            .filter(|(_, players)| players.iter().any(|p| p != &players[0]))
            .map(|(id, _)| *id)
            .collect();
        if !self.config.across_rounds {
            self.kept.clear();
        }
        for (c, player, score, source) in entries {
            if source == Source::Score && ambiguous.contains(c.id.as_str()) {
                continue;
            }
            // A player's completion seen again (the same policy re-sampled
            // with the same seed in a later round) replaces itself.
            self.kept
                .entry(c.prompt_id.clone())
                .or_default()
                .insert((player, c.id.clone()), score);
        }
        if let Some(id) = ambiguous.iter().next() {
            ctx.log(format!(
                "{} completion ids (e.g. {id}) belong to several players and are left out: scores are joined by \
                 id, so give each player distinct ids, or put the score in each completion's meta `{}` \
                 (eval.best-of-n writes meta gold_reward and proxy_reward on its picks)",
                ambiguous.len(),
                self.config.score
            ));
        }
        ctx.metric("ambiguous", ambiguous.len() as f64);
        let mut names: Vec<String> = Vec::new();
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        // Every prompt's games, kept apart so the bootstrap can resample
        // prompts: games on one prompt are not independent.
        let mut by_prompt: Vec<Vec<Game>> = Vec::new();
        for entries in self.kept.values() {
            let entries: Vec<(usize, f64)> = entries
                .iter()
                .map(|((player, _), &score)| {
                    let i = *index.entry(player.as_str()).or_insert_with(|| {
                        names.push(player.clone());
                        names.len() - 1
                    });
                    (i, score)
                })
                .collect();
            let mut games = Vec::new();
            for (x, ex) in entries.iter().enumerate() {
                for ey in &entries[x + 1..] {
                    if ex.0 != ey.0 {
                        games.push(Game {
                            a: ex.0,
                            b: ey.0,
                            result: outcome(ex.1, ey.1),
                        });
                    }
                }
            }
            if !games.is_empty() {
                by_prompt.push(games);
            }
        }
        let games: Vec<Game> = by_prompt.iter().flatten().copied().collect();
        ctx.metric("games", games.len() as f64);
        ctx.metric("unplayed", unplayed as f64);
        if unplayed > 0 {
            ctx.log(format!(
                "{unplayed} completions without {} or a `{}` score are left out",
                self.player.missing(),
                self.config.score
            ));
        }
        if games.is_empty() {
            ctx.log(format!(
                "no games: no prompt has scored completions of two players ({} players)",
                names.len()
            ));
            return Ok(());
        }
        let (k, initial) = (self.config.k, self.config.initial);
        let permutations = self.config.permutations as usize;
        let mut sums = vec![0.0; names.len()];
        let mut order = games.clone();
        for p in 0..if self.config.method == "bt" {
            0
        } else {
            permutations
        } {
            order.copy_from_slice(&games);
            Rng::new(self.seed, &format!("permutation {p} round {}", ctx.round()))
                .shuffle(&mut order);
            for (s, r) in sums.iter_mut().zip(play(&order, names.len(), k, initial)) {
                *s += r;
            }
        }
        let ratings: Vec<f64> = if self.config.method == "bt" {
            bradley_terry(&games, names.len(), initial)
        } else {
            sums.iter().map(|s| s / permutations as f64).collect()
        };
        let intervals = self.bootstrap(&by_prompt, names.len(), ctx.round());
        let (mut played, mut wins) = (vec![0u64; names.len()], vec![0.0f64; names.len()]);
        for g in &games {
            played[g.a] += 1;
            played[g.b] += 1;
            wins[g.a] += g.result;
            wins[g.b] += 1.0 - g.result;
        }
        let mut rows: Vec<usize> = (0..names.len()).collect();
        rows.sort_by(|&x, &y| ratings[y].total_cmp(&ratings[x]));
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0).max(24);
        let mut table = vec![format!(
            "{:<width$} {:>9} {:>17} {:>7} {:>8}",
            "player", "rating", "95% interval", "games", "wins"
        )];
        for &i in &rows {
            ctx.metric(&format!("elo/{}", names[i]), ratings[i]);
            let interval = match &intervals {
                Some(iv) => {
                    ctx.metric(&format!("elo_lo/{}", names[i]), iv[i].0);
                    ctx.metric(&format!("elo_hi/{}", names[i]), iv[i].1);
                    format!("{:.0} .. {:.0}", iv[i].0, iv[i].1)
                }
                None => "-".to_string(),
            };
            table.push(format!(
                "{:<width$} {:>9.1} {:>17} {:>7} {:>8.1}",
                names[i], ratings[i], interval, played[i], wins[i]
            ));
        }
        ctx.log(format!(
            "Elo over {} games on {} prompts, {}{}:\n{}",
            games.len(),
            by_prompt.len(),
            if self.config.method == "bt" {
                "Bradley-Terry maximum likelihood".to_string()
            } else {
                format!("{permutations} orderings (k = {k})")
            },
            match intervals {
                Some(_) => format!(
                    ", intervals from {} bootstrap resamples of the prompts",
                    self.config.bootstrap
                ),
                None => String::new(),
            },
            table.join("\n")
        ));
        Ok(())
    }
}

impl Elo {
    /// 95% percentile intervals of each player's rating over `bootstrap`
    /// resamples of the prompts with replacement, each played in one seeded
    /// order (Chatbot Arena's bootstrap of online Elo, clustered by prompt).
    fn bootstrap(
        &self,
        by_prompt: &[Vec<Game>],
        players: usize,
        round: u64,
    ) -> Option<Vec<(f64, f64)>> {
        let resamples = self.config.bootstrap as usize;
        if resamples == 0 {
            return None;
        }
        let (k, initial) = (self.config.k, self.config.initial);
        let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); players];
        let mut games = Vec::new();
        for b in 0..resamples {
            let mut rng = Rng::new(self.seed, &format!("bootstrap {b} round {round}"));
            games.clear();
            for _ in 0..by_prompt.len() {
                games.extend_from_slice(&by_prompt[rng.below(by_prompt.len())]);
            }
            let ratings = if self.config.method == "bt" {
                bradley_terry(&games, players, initial)
            } else {
                rng.shuffle(&mut games);
                play(&games, players, k, initial)
            };
            // A player absent from a resample keeps its initial rating,
            // which widens its interval, as it should.
            for (d, r) in draws.iter_mut().zip(ratings) {
                d.push(r);
            }
        }
        Some(
            draws
                .into_iter()
                .map(|mut d| {
                    d.sort_by(f64::total_cmp);
                    (percentile(&d, 0.025), percentile(&d, 0.975))
                })
                .collect(),
        )
    }
}

/// The `q` quantile of sorted `xs` (linear interpolation between ranks).
fn percentile(xs: &[f64], q: f64) -> f64 {
    let pos = q * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{completion, create, run, score};

    /// Three players of rising strength on 20 prompts, two samples each:
    /// player q scores q * (1 + sample) on every prompt.
    fn inputs() -> Vec<(usize, Vec<Record>)> {
        let (mut cs, mut ss) = (Vec::new(), Vec::new());
        for p in 0..20 {
            for q in ["1", "2", "3"] {
                for s in 0..2 {
                    let id = format!("p{p}:q{q}:s{s}");
                    cs.push(completion(&id, &format!("p{p}"), &[("quality", q)]));
                    let value = q.parse::<f64>().unwrap() * (1.0 + s as f64) + (p % 3) as f64 * 0.1;
                    ss.push(score(&id, "gold_reward", value));
                }
            }
        }
        vec![(0, cs), (1, ss)]
    }

    #[test]
    fn stronger_players_rate_higher_and_results_are_seeded() {
        let cfg = serde_json::json!({"player": "meta:quality", "permutations": 20});
        let out = run::<Elo>(cfg.clone(), inputs()).unwrap();
        let (r1, r2, r3) = (
            out.metric("elo/1", None).unwrap(),
            out.metric("elo/2", None).unwrap(),
            out.metric("elo/3", None).unwrap(),
        );
        assert!(r3 > r2 && r2 > r1, "{r1} {r2} {r3}");
        // Zero-sum: the mean rating stays at the initial one.
        assert!(((r1 + r2 + r3) / 3.0 - 1000.0).abs() < 1e-9);
        // 20 prompts x 3 player pairs x 2 x 2 samples.
        assert_eq!(out.metric("games", None), Some(240.0));
        let again = run::<Elo>(cfg, inputs()).unwrap();
        assert_eq!(again.metric("elo/3", None), Some(r3));
        let other = run::<Elo>(
            serde_json::json!({"player": "meta:quality", "permutations": 20, "seed": 5}),
            inputs(),
        )
        .unwrap();
        assert_ne!(other.metric("elo/3", None), Some(r3));
        assert!(out.logs.iter().any(|l| l.contains("rating")));
    }

    #[test]
    fn shared_ids_are_ambiguous_unless_meta_holds_the_score() {
        let cs = vec![
            completion("p:demo0", "p", &[("quality", "1")]),
            completion("p:demo0", "p", &[("quality", "2")]),
            completion("p:demo1", "p", &[("quality", "1"), ("gold_reward", "0")]),
            completion("p:demo1", "p", &[("quality", "2"), ("gold_reward", "1")]),
        ];
        let ss = vec![score("p:demo0", "gold_reward", 1.0)];
        let out = run::<Elo>(
            serde_json::json!({"player": "meta:quality", "permutations": 1}),
            vec![(0, cs), (1, ss)],
        )
        .unwrap();
        assert_eq!(out.metric("ambiguous", None), Some(1.0));
        assert_eq!(out.metric("games", None), Some(1.0));
        assert_eq!(out.metric("elo/2", None), Some(1008.0));
        assert!(out.logs[0].contains("distinct ids"), "{:?}", out.logs);
    }

    #[test]
    fn policy_players_use_the_checkpoint_name() {
        let mut cs = Vec::new();
        let mut ss = Vec::new();
        for (ckpt, value) in [("ckpt-100", 0.0), ("final", 1.0)] {
            let Record::Completion(mut c) = completion(&format!("p:{ckpt}"), "p", &[]) else {
                panic!()
            };
            c.policy = Some(ArtifactRef::new(
                "policy",
                "sft",
                format!("{ckpt}/model.safetensors"),
                0,
                "",
                "",
            ));
            ss.push(score(&c.id, "gold_reward", value));
            cs.push(Record::Completion(c));
        }
        let out = run::<Elo>(
            serde_json::json!({"permutations": 1}),
            vec![(0, cs), (1, ss)],
        )
        .unwrap();
        assert_eq!(out.metric("elo/sft/final", None), Some(1008.0));
        assert_eq!(out.metric("elo/sft/ckpt-100", None), Some(992.0));
    }

    #[test]
    fn bootstrap_intervals_bracket_the_ratings_and_separate_clear_players() {
        let out = run::<Elo>(
            serde_json::json!({"player": "meta:quality", "permutations": 20, "bootstrap": 100}),
            inputs(),
        )
        .unwrap();
        let get = |m: &str, q: &str| out.metric(&format!("{m}/{q}"), None).unwrap();
        for q in ["1", "2", "3"] {
            let (lo, r, hi) = (get("elo_lo", q), get("elo", q), get("elo_hi", q));
            assert!(lo < hi, "{q}: {lo} {hi}");
            // One ordering per resample is noisier than the averaged rating,
            // but a 95% interval of it must still cover it.
            assert!(lo <= r && r <= hi, "{q}: {lo} {r} {hi}");
        }
        // Player 3 beats 1 in every game: their intervals do not overlap.
        assert!(get("elo_lo", "3") > get("elo_hi", "1"));
        assert!(out.logs.iter().any(|l| l.contains("95% interval")));
        let none = run::<Elo>(
            serde_json::json!({"player": "meta:quality", "permutations": 2, "bootstrap": 0}),
            inputs(),
        )
        .unwrap();
        assert_eq!(none.metric("elo_lo/3", None), None);
        assert!(none.metric("elo/3", None).is_some());
    }

    /// Round r's records of `inputs()` for the one player `q`.
    fn player_round(q: &str) -> Vec<(usize, Vec<Record>)> {
        inputs()
            .into_iter()
            .map(|(port, records)| {
                let keep = records
                    .into_iter()
                    .filter(|r| match r {
                        Record::Completion(c) => c.meta["quality"] == q,
                        Record::Score(s) => s.id.contains(&format!(":q{q}:")),
                        _ => false,
                    })
                    .collect();
                (port, keep)
            })
            .collect()
    }

    #[test]
    fn across_rounds_keeps_every_rounds_players_in_one_table() {
        let config = |across: bool| serde_json::json!({"player": "meta:quality", "permutations": 4, "bootstrap": 0, "across_rounds": across});
        for across in [true, false] {
            let init = hone_sdk::testing::init::<Elo>(config(across));
            let mut stage = Elo::create(&init).unwrap();
            let mut last = None;
            // One player a round, as an online loop's checkpoints arrive;
            // player 1 is seen twice (the same completions again).
            for (round, q) in ["1", "2", "3", "1"].into_iter().enumerate() {
                let out = hone_sdk::testing::run_round_of(
                    &mut stage,
                    &init,
                    round as u64,
                    player_round(q),
                )
                .unwrap();
                last = Some(out);
            }
            let out = last.unwrap();
            if across {
                let r: Vec<f64> = ["1", "2", "3"]
                    .iter()
                    .map(|q| out.metric(&format!("elo/{q}"), None).unwrap())
                    .collect();
                assert!(r[2] > r[1] && r[1] > r[0], "{r:?}");
                // Player 1's repeat replaced itself: 240 games, as in one round.
                assert_eq!(out.metric("games", None), Some(240.0));
            } else {
                assert_eq!(out.metric("games", None), Some(0.0));
                assert_eq!(out.metric("elo/1", None), None);
            }
        }
    }

    #[test]
    fn bradley_terry_ratings_are_the_likelihood_maximum_and_ignore_game_order() {
        // A beats B in 3 games of 4; with the virtual draw, 3.5 wins of 5:
        // p_A / p_B = 3.5 / 1.5, 400 log10(7/3) points apart around 1000.
        let games: Vec<Game> = [1.0, 1.0, 0.0, 1.0]
            .iter()
            .map(|&result| Game { a: 0, b: 1, result })
            .collect();
        let r = bradley_terry(&games, 2, 1000.0);
        let gap = 400.0 * (7.0f64 / 3.0).log10();
        assert!((r[0] - (1000.0 + gap / 2.0)).abs() < 1e-6, "{r:?}");
        assert!((r[1] - (1000.0 - gap / 2.0)).abs() < 1e-6, "{r:?}");
        let mut reversed = games.clone();
        reversed.reverse();
        assert_eq!(bradley_terry(&reversed, 2, 1000.0), r);
        // Through the stage: the order of rising strength, and intervals.
        let cfg = serde_json::json!({"player": "meta:quality", "method": "bt", "bootstrap": 50});
        let out = run::<Elo>(cfg, inputs()).unwrap();
        let get = |m: &str, q: &str| out.metric(&format!("{m}/{q}"), None).unwrap();
        assert!(get("elo", "3") > get("elo", "2") && get("elo", "2") > get("elo", "1"));
        for q in ["1", "2", "3"] {
            assert!(get("elo_lo", q) <= get("elo", q) && get("elo", q) <= get("elo_hi", q));
        }
        assert!(out.logs.iter().any(|l| l.contains("Bradley-Terry")));
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = create::<Elo>(serde_json::json!({"player": "quality"}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("player"));
        let err = create::<Elo>(serde_json::json!({"permutations": 0}))
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("permutations"));
        let err = create::<Elo>(serde_json::json!({"k": -1.0})).err().unwrap();
        assert_eq!(err.config_field(), Some("k"));
    }
}
