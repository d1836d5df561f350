//! `filter.split`: a seeded train / held-out split.

use hone_sdk::prelude::*;
use hone_sdk::text::{normalize, seeded_hash, seeded_unit};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitConfig {
    heldout_fraction: f64,
    by: String,
    seed: u64,
}

/// Splits records into a training and a held-out stream.
pub struct Split {
    fraction: f64,
    by_prompt: bool,
    seed: u64,
    counts: [u64; 2],
}

impl StageFactory for Split {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "filter.split",
            "Splits records into `train` and `heldout` by a seeded hash, so that the split does not \
             depend on arrival order or the number of workers. Split `by = \"prompt\"` (the default) keeps \
             every record about one prompt on the same side, so no prompt leaks from training into \
             evaluation. Metrics: `train`, `heldout` (counts).",
        )
        .input("records", RecordKind::Any)
        .output("train", RecordKind::Any)
        .output("heldout", RecordKind::Any)
        .placement(Placement::DataParallel)
        .optional(
            "heldout_fraction",
            FieldType::Float,
            0.2,
            "Expected fraction of records (or prompts) sent to `heldout`, in [0, 1].",
        )
        .optional(
            "by",
            FieldType::one_of(&["prompt", "id"]),
            "prompt",
            "`prompt`: hash the normalised prompt; `id`: hash the record id.",
        )
        .optional("seed", FieldType::unsigned(), 0, "Seed, combined with the pipeline seed.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: SplitConfig = init.config()?;
        if !(0.0..=1.0).contains(&config.heldout_fraction) {
            return Err(StageError::config(
                "heldout_fraction",
                format!("must be between 0 and 1, found {}", config.heldout_fraction),
            ));
        }
        let by_prompt = match config.by.as_str() {
            "prompt" => true,
            "id" => false,
            other => {
                return Err(StageError::config(
                    "by",
                    format!("must be `prompt` or `id`, found `{other}`"),
                ))
            }
        };
        Ok(Split {
            fraction: config.heldout_fraction,
            by_prompt,
            seed: seeded_hash(init.seed, &format!("filter.split:{}", config.seed)),
            counts: [0, 0],
        })
    }
}

impl Split {
    /// The output port of `record`: 0 train, 1 held out.
    fn side(&self, record: &Record) -> usize {
        let key = match (self.by_prompt, record) {
            (true, Record::Prompt(p)) => normalize(&p.text),
            (true, Record::Pair(p)) => normalize(&p.prompt),
            (true, Record::Completion(c)) => normalize(&c.prompt),
            _ => record.id().to_string(),
        };
        usize::from(seeded_unit(self.seed, &key) < self.fraction)
    }
}

impl Stage for Split {
    fn on_batch(
        &mut self,
        ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for record in batch {
            let side = self.side(&record);
            self.counts[side] += 1;
            ctx.emit(side, record);
        }
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let [train, heldout] = std::mem::take(&mut self.counts);
        ctx.metric("train", train as f64);
        ctx.metric("heldout", heldout as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hone_sdk::Collected;

    fn run(config: serde_json::Value, input: Vec<Record>) -> Result<[Vec<Record>; 2], StageError> {
        let mut full = serde_json::json!({"heldout_fraction": 0.2, "by": "prompt", "seed": 0});
        for (k, v) in config.as_object().unwrap() {
            full[k] = v.clone();
        }
        let init = StageInit::for_test("filter.split", full);
        let mut stage = Split::create(&init)?;
        let mut out = Collected::default();
        {
            let mut ctx = Context::new(&mut out, &init, 0);
            stage.on_batch(&mut ctx, 0, input)?;
            stage.on_round_end(&mut ctx)?;
        }
        Ok([
            out.records.remove(&0).unwrap_or_default(),
            out.records.remove(&1).unwrap_or_default(),
        ])
    }

    fn pairs(n: usize, per_prompt: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                Record::Pair(PreferencePair::new(
                    format!("p:{i}"),
                    format!("prompt {}", i / per_prompt),
                    "a",
                    "b",
                    "test",
                ))
            })
            .collect()
    }

    #[test]
    fn split_is_near_the_fraction_and_keeps_prompts_together() {
        let [train, heldout] = run(serde_json::json!({}), pairs(3000, 3)).unwrap();
        assert_eq!(train.len() + heldout.len(), 3000);
        let share = heldout.len() as f64 / 3000.0;
        // 1000 prompts: standard error of the share is about 0.013.
        assert!((share - 0.2).abs() < 0.05, "held-out share {share}");
        let prompts = |rs: &[Record]| {
            rs.iter()
                .map(|r| match r {
                    Record::Pair(p) => p.prompt.clone(),
                    _ => unreachable!(),
                })
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert!(prompts(&train).is_disjoint(&prompts(&heldout)));
        // Same seed, same split; another seed, another split.
        let [again, _] = run(serde_json::json!({}), pairs(3000, 3)).unwrap();
        assert_eq!(train, again);
        let [other, _] = run(serde_json::json!({"seed": 1}), pairs(3000, 3)).unwrap();
        assert_ne!(train, other);
    }

    #[test]
    fn by_id_splits_records_of_one_prompt() {
        let [train, heldout] = run(serde_json::json!({"by": "id"}), pairs(200, 200)).unwrap();
        assert!(!train.is_empty() && !heldout.is_empty());
    }

    #[test]
    fn a_fraction_outside_zero_one_names_the_field() {
        let err = run(serde_json::json!({"heldout_fraction": 1.5}), vec![])
            .err()
            .unwrap();
        assert_eq!(err.config_field(), Some("heldout_fraction"));
    }
}
