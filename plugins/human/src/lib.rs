//! The `human` stage family: labels from people.
//!
//! `human.label` sends the round's candidate pairs (from
//! `filter.select-pairs`, say) to the people using `hone serve`'s page or
//! API, waits until each has an answer, and emits the labelled pairs. The
//! hand-over is [`hone_sdk::feedback`]'s: a queue file out, an answers file
//! back, both in the run directory, so that a crash on either side loses no
//! acknowledged label and a resumed round reads the answers already given.

use hone_sdk::feedback::{self, Answer, Choice, Queue, QueuedPair, Serving};
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_unit;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelConfig {
    gold_hint: bool,
    poll_ms: u64,
}

/// Asks people to label the round's candidate pairs.
pub struct HumanLabel {
    config: LabelConfig,
    init: StageInit,
    input: RoundInput,
}

impl StageFactory for HumanLabel {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "human.label",
            "Labels from people, through `hone serve`: at the round's end the candidate pairs are queued \
             for the annotation page and the JSON API (each pair's two responses in a seeded random order, \
             recorded), and the stage waits until every pair has an answer: the first or the second \
             response, a tie, or a skip. Decisive answers leave as PreferencePairs (label_source \
             `human`, meta annotator and shown = which position won; position_swapped when the chosen \
             one was shown second; gold copied from the candidate where known). Ties and skips are \
             counted, not trained on. Only `hone serve` answers: under `hone run` the stage fails at \
             once instead of waiting forever. Metrics: queued, labelled, ties, skips, first_share (the \
             share of decisive answers that chose the response shown first: position bias), \
             gold_agreement (where gold is known), wait_seconds.",
        )
        .input("pairs", RecordKind::PreferencePair)
        .output("labels", RecordKind::PreferencePair)
        .placement(Placement::Single)
        .optional(
            "gold_hint",
            FieldType::Bool,
            false,
            "Pass the candidates' gold rewards to the API as `hint`, for a simulated annotator \
             (`hone annotate`); the page never shows them. For simulations only.",
        )
        .optional(
            "poll_ms",
            FieldType::range(1, 60_000),
            50,
            "How often the waiting stage looks for the answers (milliseconds).",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        Ok(HumanLabel {
            config: init.config()?,
            init: init.clone(),
            input: RoundInput::default(),
        })
    }
}

/// Which candidate side was shown first: `false` keeps chosen first.
fn swapped(seed: u64, round: u64, pair_id: &str) -> bool {
    seeded_unit(seed, &format!("human.label:{round}:{pair_id}")) < 0.5
}

impl HumanLabel {
    /// Fails unless `hone serve` in this very process is serving the run.
    fn check_served(&self) -> Result<(), StageError> {
        let path = self.init.run_dir.join(feedback::SERVING);
        let serving: Option<Serving> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match serving {
            Some(s) if s.pid == std::process::id() => Ok(()),
            _ => Err(StageError::new(
                "human.label waits for people's labels, which only `hone serve` collects: run this \
                 pipeline with `hone serve PIPELINE` (see docs/serve.md)",
            )),
        }
    }
}

impl Stage for HumanLabel {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let round = ctx.round();
        let candidates = self.input.take().pairs_by_id(0);
        ctx.metric("queued", candidates.len() as f64);
        if candidates.is_empty() {
            return Ok(());
        }
        self.check_served()?;
        let seed = self.init.seed;
        let mut seen = BTreeMap::new();
        let pairs: Vec<QueuedPair> = candidates
            .iter()
            .map(|p| {
                if seen.insert(p.id.clone(), ()).is_some() {
                    return Err(StageError::new(format!(
                        "two candidate pairs share the id {}: people's answers are matched by pair id, \
                         so each must be unique within a round",
                        p.id
                    )));
                }
                let swap = swapped(seed, round, &p.id);
                let (a, b) = if swap {
                    (&p.rejected, &p.chosen)
                } else {
                    (&p.chosen, &p.rejected)
                };
                let hint = match (self.config.gold_hint, p.gold_chosen, p.gold_rejected) {
                    (true, Some(c), Some(r)) => Some(if swap { [r, c] } else { [c, r] }),
                    (true, _, _) => {
                        return Err(StageError::new(format!(
                            "gold_hint = true, but candidate {} has no gold_chosen / gold_rejected: give \
                             filter.pair-completions world.gold's scores (its `gold` option), or turn \
                             gold_hint off",
                            p.id
                        )))
                    }
                    _ => None,
                };
                Ok(QueuedPair {
                    pair_id: p.id.clone(),
                    prompt: p.prompt.clone(),
                    a: a.clone(),
                    b: b.clone(),
                    hint,
                })
            })
            .collect::<Result<_, _>>()?;
        let stage = self.init.stage_id.clone();
        let queue = Queue {
            round,
            stage: stage.clone(),
            pairs,
        };
        let queue_path = feedback::queue_path(&self.init.run_dir, round, &stage);
        let bytes = serde_json::to_vec(&queue).map_err(|e| StageError::new(e.to_string()))?;
        hone_sdk::fs::atomic_write(&queue_path, &bytes)
            .map_err(|e| StageError::new(format!("cannot write {}: {e}", queue_path.display())))?;
        ctx.log(format!(
            "round {round}: {} pairs await labels in hone serve's page",
            queue.pairs.len()
        ));
        let answers_path = feedback::answers_path(&self.init.run_dir, round, &stage);
        let started = Instant::now();
        let mut reported = Instant::now();
        let answers = loop {
            if answers_path.exists() {
                // An answers file of an earlier attempt whose pairs differ
                // (say, the pipeline changed before any round completed) is
                // not this queue's: the server moves it aside and asks again.
                let answers = feedback::read_answers(&answers_path).map_err(StageError::new)?;
                if feedback::answers_match(&queue, &answers) {
                    break answers;
                }
            }
            // The server may have stopped (another process now serves the run).
            self.check_served()?;
            if reported.elapsed() > Duration::from_secs(10) {
                // People are slow; say the stage is waiting, not stuck.
                ctx.progress("waiting for labels", 0, queue.pairs.len() as u64);
                reported = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(self.config.poll_ms));
        };
        ctx.metric("wait_seconds", started.elapsed().as_secs_f64());
        let by_id: BTreeMap<&str, &Answer> =
            answers.iter().map(|a| (a.pair_id.as_str(), a)).collect();
        let (mut labelled, mut ties, mut skips, mut first) = (0u64, 0u64, 0u64, 0u64);
        let (mut gold_agree, mut gold_judged) = (0u64, 0u64);
        for p in candidates {
            let Some(answer) = by_id.get(p.id.as_str()) else {
                return Err(StageError::new(format!(
                    "{} has no answer for pair {}: every queued pair gets one before the server writes \
                     the file; was it edited by hand?",
                    answers_path.display(),
                    p.id
                )));
            };
            let swap = swapped(seed, round, &p.id);
            // Whether the candidate's own `chosen` won.
            let chosen_won = match answer.choice {
                Choice::Tie => {
                    ties += 1;
                    continue;
                }
                Choice::Skip => {
                    skips += 1;
                    continue;
                }
                Choice::A => {
                    first += 1;
                    !swap
                }
                Choice::B => swap,
            };
            labelled += 1;
            let mut pair = PreferencePair::new(
                &p.id,
                &p.prompt,
                if chosen_won { &p.chosen } else { &p.rejected },
                if chosen_won { &p.rejected } else { &p.chosen },
                "human",
            );
            (pair.gold_chosen, pair.gold_rejected) = if chosen_won {
                (p.gold_chosen, p.gold_rejected)
            } else {
                (p.gold_rejected, p.gold_chosen)
            };
            if let (Some(c), Some(r)) = (pair.gold_chosen, pair.gold_rejected) {
                if c != r {
                    gold_judged += 1;
                    gold_agree += u64::from(c > r);
                }
            }
            // Shown second and chosen: the order was swapped relative to chosen-first.
            pair.position_swapped = answer.choice == Choice::B;
            pair.meta = p.meta.clone();
            pair.meta
                .insert("annotator".into(), answer.annotator.clone());
            pair.meta
                .insert("shown".into(), answer.choice.as_str().to_string());
            ctx.emit(0, Record::Pair(pair));
        }
        ctx.metric("labelled", labelled as f64);
        ctx.metric("ties", ties as f64);
        ctx.metric("skips", skips as f64);
        if labelled > 0 {
            ctx.metric("first_share", first as f64 / labelled as f64);
        }
        if gold_judged > 0 {
            ctx.metric("gold_agreement", gold_agree as f64 / gold_judged as f64);
        }
        Ok(())
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        // Nothing is kept across rounds: the answers live in the run directory.
        Ok(None)
    }
}

hone_sdk::export_stages!(HumanLabel);

#[cfg(test)]
mod tests {
    use super::*;
    use hone_sdk::testing::{init, run_round};
    use serde_json::json;

    fn candidate(i: usize) -> Record {
        let mut p = PreferencePair::new(
            format!("c{i}"),
            format!("prompt {i}"),
            format!("good {i}"),
            format!("bad {i}"),
            "proxy_reward",
        );
        p.gold_chosen = Some(1.0);
        p.gold_rejected = Some(0.0);
        Record::Pair(p)
    }

    /// Plays the server: waits for the queue, answers each pair with
    /// `answer(i, pair)`, as `hone serve` would.
    fn serve(
        run_dir: std::path::PathBuf,
        answer: fn(usize, &QueuedPair) -> Choice,
    ) -> std::thread::JoinHandle<Queue> {
        std::thread::spawn(move || {
            let path = feedback::queue_path(&run_dir, 0, "test");
            let queue: Queue = loop {
                if let Ok(b) = std::fs::read(&path) {
                    break serde_json::from_slice(&b).unwrap();
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let lines: String = queue
                .pairs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let a = Answer {
                        pair_id: p.pair_id.clone(),
                        choice: answer(i, p),
                        annotator: "ann".into(),
                        digest: feedback::digest(p),
                    };
                    serde_json::to_string(&a).unwrap() + "\n"
                })
                .collect();
            hone_sdk::fs::atomic_write(
                &feedback::answers_path(&run_dir, 0, "test"),
                lines.as_bytes(),
            )
            .unwrap();
            queue
        })
    }

    fn served_init(config: serde_json::Value) -> StageInit {
        let mut init = init::<HumanLabel>(config);
        init.run_dir = std::env::temp_dir().join(format!(
            "hone-human-{}-{}",
            std::process::id(),
            seeded_unit(0, &format!("{:?}", std::thread::current().id())).to_bits()
        ));
        let _ = std::fs::remove_dir_all(&init.run_dir);
        let serving = Serving {
            pid: std::process::id(),
            addr: "test".into(),
        };
        hone_sdk::fs::atomic_write(
            &init.run_dir.join(feedback::SERVING),
            &serde_json::to_vec(&serving).unwrap(),
        )
        .unwrap();
        init
    }

    #[test]
    fn answers_become_pairs_in_the_positions_people_saw() {
        let init = served_init(json!({"gold_hint": true, "poll_ms": 1}));
        // Pick the better response by the hint, except: pair 0 a tie, pair 1 a skip.
        let server = serve(init.run_dir.clone(), |i, p| match i {
            0 => Choice::Tie,
            1 => Choice::Skip,
            _ if p.hint.unwrap()[0] > p.hint.unwrap()[1] => Choice::A,
            _ => Choice::B,
        });
        let input: Vec<Record> = (0..40).map(candidate).collect();
        let out = run_round::<HumanLabel>(&init, vec![(0, input)]).unwrap();
        let queue = server.join().unwrap();
        // Both orders occur, and the hint follows the texts.
        let swaps = queue
            .pairs
            .iter()
            .filter(|p| p.a.starts_with("bad"))
            .count();
        assert!((8..32).contains(&swaps), "{swaps}");
        for p in &queue.pairs {
            assert_eq!(p.a.starts_with("good"), p.hint.unwrap()[0] == 1.0);
        }
        let labels = out.emitted(0);
        assert_eq!(labels.len(), 38);
        for r in labels {
            let Record::Pair(p) = r else { panic!() };
            assert!(p.chosen.starts_with("good"), "{p:?}");
            assert_eq!(p.label_source, "human");
            assert_eq!(p.meta["annotator"], "ann");
            let shown_first = queue.pairs.iter().find(|q| q.pair_id == p.id).unwrap().a == p.chosen;
            assert_eq!(p.position_swapped, !shown_first);
            assert_eq!(p.meta["shown"], if shown_first { "a" } else { "b" });
        }
        assert_eq!(out.metric("ties", None), Some(1.0));
        assert_eq!(out.metric("skips", None), Some(1.0));
        assert_eq!(out.metric("labelled", None), Some(38.0));
        assert_eq!(out.metric("gold_agreement", None), Some(1.0));
        let first = out.metric("first_share", None).unwrap();
        assert!((0.2..0.8).contains(&first), "{first}");
        let _ = std::fs::remove_dir_all(&init.run_dir);
    }

    #[test]
    fn without_a_server_it_fails_at_once_naming_hone_serve() {
        let mut init = served_init(json!({"gold_hint": false, "poll_ms": 1}));
        std::fs::remove_file(init.run_dir.join(feedback::SERVING)).unwrap();
        init.config = json!({"gold_hint": false, "poll_ms": 1});
        let err = run_round::<HumanLabel>(&init, vec![(0, vec![candidate(0)])])
            .err()
            .unwrap();
        assert!(err.to_string().contains("hone serve"), "{err}");
        // No candidates: nothing to ask, no server needed.
        let out = run_round::<HumanLabel>(&init, vec![(0, vec![])]).unwrap();
        assert_eq!(out.metric("queued", None), Some(0.0));
        let _ = std::fs::remove_dir_all(&init.run_dir);
    }

    #[test]
    fn gold_hint_without_gold_is_refused_by_pair_id() {
        let init = served_init(json!({"gold_hint": true, "poll_ms": 1}));
        let p = PreferencePair::new("nogold", "q", "x", "y", "proxy");
        let err = run_round::<HumanLabel>(&init, vec![(0, vec![Record::Pair(p)])])
            .err()
            .unwrap();
        assert!(err.to_string().contains("nogold"), "{err}");
        let _ = std::fs::remove_dir_all(&init.run_dir);
    }
}
