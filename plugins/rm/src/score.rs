//! `rm.score`: rewards from one reward model or the mean of an ensemble.

use crate::model::{Rm, Scoring};
use crate::{device, load_rm, Models};
use hone_models::Device;
use hone_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreConfig {
    name: String,
    member: Option<u64>,
    stage: Option<String>,
    batch_size: usize,
    device: String,
}

/// Scores pairs and completions with the newest reward models.
pub struct Scorer {
    config: ScoreConfig,
    device: Device,
    models: Models,
    /// The models loaded last, by artifact id, reused while they stay newest.
    loaded: Vec<(String, Rm)>,
    /// Scores with them; holds a pretrained backbone once for all heads.
    scoring: Scoring,
}

impl StageFactory for Scorer {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "rm.score",
            "Scores records with the reward-model artifacts of the newest round seen (one model, or the mean \
             reward of an ensemble): a PreferencePair leaves on `pairs` with chosen_score / rejected_score set; \
             a Completion gives a Score (id = the completion's id) on `scores`. Metrics: scored, models.",
        )
        .input("models", RecordKind::Artifact(ArtifactKind::RewardModel))
        .input("records", RecordKind::Any)
        .output("pairs", RecordKind::PreferencePair)
        .output("scores", RecordKind::Score)
        .placement(Placement::DataParallel)
        .optional("name", FieldType::String, "proxy_reward", "The `name` of the Scores emitted for completions.")
        .optional(
            "member",
            FieldType::unsigned().at_most(1 << 16),
            serde_json::Value::Null,
            "Use only this member of an ensemble (rm.train's member N); unset = every model of the \
             newest round.",
        )
        .optional(
            "stage",
            FieldType::String,
            serde_json::Value::Null,
            "Use only the reward models this stage registered (its id); unset = any.",
        )
        .optional("batch_size", FieldType::positive().at_most(1 << 20), 32, "Sequences per forward pass (GPT or the pretrained backbone).")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: ScoreConfig = init.config()?;
        let device = device(&config.device)?;
        if config.batch_size == 0 {
            return Err(StageError::config("batch_size", "must be at least 1"));
        }
        if config.stage.as_deref().is_some_and(|o| o.is_empty()) {
            return Err(StageError::config(
                "stage",
                "must not be empty; leave it unset to use every model",
            ));
        }
        if config.name.trim().is_empty() {
            return Err(StageError::config("name", "must not be empty"));
        }
        let scoring = Scoring::new(device.clone(), config.batch_size);
        Ok(Scorer {
            config,
            device,
            models: Models::default(),
            loaded: Vec::new(),
            scoring,
        })
    }
}

impl Stage for Scorer {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(self.models.buffer())
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("rm.score", &self.models.state()).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        // The models scored with; the loaded ones are a cache, reloaded on use.
        self.models
            .restore(hone_sdk::snapshot::decode("rm.score", round, snapshot)?);
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.models.take_round()?;
        let records: Vec<Record> = input
            .records(1)
            .into_iter()
            .filter(|r| matches!(r, Record::Pair(_) | Record::Completion(_)))
            .collect();
        let mut models = self.models.newest();
        let all = models.len();
        let c = &self.config;
        if c.member.is_some() || c.stage.is_some() {
            models.retain(|m| {
                c.member.is_none_or(|n| m.member == Some(n))
                    && c.stage.as_ref().is_none_or(|s| &m.stage == s)
            });
            if models.is_empty() && all > 0 {
                let field = if c.member.is_some() {
                    "member"
                } else {
                    "stage"
                };
                let wanted = match (&c.member, &c.stage) {
                    (Some(n), Some(s)) => format!("member {n} of stage `{s}`"),
                    (Some(n), None) => format!("member {n}"),
                    (None, Some(s)) => format!("stage `{s}`"),
                    (None, None) => unreachable!(),
                };
                return Err(StageError::config(
                    field,
                    format!(
                        "no reward model of the newest round is {wanted}; they are: {}",
                        self.models
                            .newest()
                            .iter()
                            .map(|m| m.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        ctx.metric("models", models.len() as f64);
        if records.is_empty() {
            ctx.metric("scored", 0.0);
            return Ok(());
        }
        if models.is_empty() {
            return Err(StageError::new(format!(
                "{} records to score but no reward-model artifact arrived on the `models` port: connect it to \
                 rm.train's `models` or rm.warm's `model`",
                records.len()
            )));
        }
        let ids: Vec<&str> = self.loaded.iter().map(|(id, _)| id.as_str()).collect();
        if ids != models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>() {
            self.loaded.clear();
            for m in &models {
                self.loaded
                    .push((m.id.clone(), load_rm(ctx.init(), m, &self.device)?));
            }
        }
        let (mut pairs, mut completions) = (Vec::new(), Vec::new());
        for r in records {
            match r {
                Record::Pair(p) => pairs.push(p),
                Record::Completion(c) => completions.push(c),
                _ => {}
            }
        }
        let n = self.loaded.len() as f64;
        let mut pair_sums = vec![(0.0, 0.0); pairs.len()];
        let mut completion_sums = vec![0.0; completions.len()];
        let items: Vec<(&str, &str)> = completions
            .iter()
            .map(|c| (c.prompt.as_str(), c.text.as_str()))
            .collect();
        for (_, rm) in &self.loaded {
            for (sum, (c, r)) in pair_sums
                .iter_mut()
                .zip(self.scoring.pair_rewards(rm, &pairs)?)
            {
                sum.0 += c / n;
                sum.1 += r / n;
            }
            for (sum, r) in completion_sums
                .iter_mut()
                .zip(self.scoring.rewards(rm, &items)?)
            {
                *sum += r / n;
            }
        }
        let scored = pairs.len() + completions.len();
        for (mut p, (c, r)) in pairs.into_iter().zip(pair_sums) {
            p.chosen_score = Some(c);
            p.rejected_score = Some(r);
            ctx.emit(0, Record::Pair(p));
        }
        for (c, value) in completions.into_iter().zip(completion_sums) {
            ctx.emit(
                1,
                Record::Score(Score {
                    id: c.id,
                    prompt_id: c.prompt_id,
                    name: self.config.name.clone(),
                    value,
                }),
            );
        }
        ctx.metric("scored", scored as f64);
        Ok(())
    }
}
