//! `lm.logprobs`: the log-probability of each completion under a reference
//! policy, teacher-forced, for KL(π‖π_ref) estimates.

use crate::sampled::Sampled;
use crate::sft::data::Example;
use crate::tuned_llama::Tuned;
use crate::{device, NewestPolicy, OrStageError};
use hone_pretrained::smollm::ChatLlama;

use hone_models::gpt::Gpt;
use hone_models::tokenizer::Tokenizer;
use hone_models::{DType, Device, Tensor};
use hone_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogprobsConfig {
    max_new_tokens: usize,
    stop: Vec<String>,
    device: String,
    #[serde(default)]
    pretrained: String,
}

/// Scores completions under a reference policy.
pub struct Logprobs {
    config: LogprobsConfig,
    device: Device,
    input: RoundInput,
    /// The newest reference policy artifact, loaded when scoring.
    reference: NewestPolicy,
    /// A SmolLM2 reference once loaded: the pretrained one (`None`) or an
    /// artifact.
    chat: Option<(Option<ArtifactRef>, Tuned)>,
}

/// How the tokens a completion was sampled as are recovered from its text.
#[derive(Debug, PartialEq)]
enum Tokens {
    /// These ids, which the policy's log-probs (if any) cover one for one.
    Ids(Vec<u32>),
    /// Not recoverable from the text; the reason.
    Unknown(String),
}

impl StageFactory for Logprobs {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "lm.logprobs",
            "Scores completions under a reference policy (the newest `reference` artifact, e.g. from lm.sft), \
             teacher-forced on the tokens lm.rollout sampled (its `token_ids`; for completions without \
             them, the text's tokens, then the closing EOS or the stop string when token_logprobs cover them). Sets \
             `ref_logprobs` (log pi_ref per token), `token_ids` where they were rebuilt, and meta `ref_policy`; \
             the sum over tokens of token_logprobs - ref_logprobs estimates KL(policy || reference) \
             (eval.rewards averages it). Completions whose tokens cannot be recovered (non-UTF-8 bytes in \
             the text, an ending no `stop` string explains, too long for the context) pass through without \
             ref_logprobs and are counted as `unmatched`. A SmolLM2 reference (a checkpoint, or \
             `pretrained`) scores the completions' token_ids after the prompt in its chat template, \
             uncut, as lm.rollout sampled them; a completion without token_ids is unmatched.",
        )
        .input("completions", RecordKind::Completion)
        .input("reference", RecordKind::Artifact(ArtifactKind::Policy))
        .output("completions", RecordKind::Completion)
        .optional(
            "max_new_tokens",
            FieldType::positive().at_most(1 << 20),
            64,
            "lm.rollout's max_new_tokens: the prompt is cut from the left to leave this much room, as rollout cut it.",
        )
        .optional(
            "stop",
            FieldType::List(Box::new(FieldType::String)),
            serde_json::json!([]),
            "lm.rollout's stop strings: a stop string is cut from the text but was sampled, so it is scored too.",
        )
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
        .optional(
            "pretrained",
            FieldType::String,
            "",
            "`smollm2-135m-instruct`: the reference until a `reference` artifact arrives (e.g. the \
             pretrained start of an online loop, lm.rollout's and lm.grpo's `pretrained`).",
        )
        .placement(Placement::DataParallel)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: LogprobsConfig = init.config()?;
        let device = device(&config.device)?;
        if config.max_new_tokens == 0 {
            return Err(StageError::config(
                "max_new_tokens",
                "must be at least 1, as in lm.rollout",
            ));
        }
        crate::check_pretrained(&config.pretrained, "score under")?;
        Ok(Logprobs {
            config,
            device,
            input: RoundInput::default(),
            reference: NewestPolicy::new("reference", "reference", "reference policy"),
            chat: None,
        })
    }
}

impl Stage for Logprobs {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("lm.logprobs", &self.reference.newest).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        self.reference.newest = hone_sdk::snapshot::decode("lm.logprobs", round, snapshot)?;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        self.reference.offer_all(&mut input, 1)?;
        let mut completions = input.completions(0);
        if completions.is_empty() {
            return Ok(());
        }
        // Sorted, so that the output does not depend on arrival order.
        completions.sort_by(|a, b| a.id.cmp(&b.id));
        match self.reference.newest.clone() {
            None if !self.config.pretrained.is_empty() => {
                return self.score_chat(ctx, completions, None);
            }
            Some(a) if ChatLlama::is_checkpoint(&crate::checkpoint_dir(ctx, &a)) => {
                return self.score_chat(ctx, completions, Some(a));
            }
            _ => {}
        }
        self.reference.load(ctx, &self.device)?;
        let (reference, gpt, tok) = self
            .reference
            .get()
            .expect("load loads a reference or fails");
        let (mut scored, mut unmatched, mut kl_sum, mut kl_n) = (0u64, 0u64, 0.0, 0u64);
        let total = completions.len() as u64;
        for (done, mut c) in completions.into_iter().enumerate() {
            let mut tokens = self.tokens(tok, &c);
            // Ids another model sampled (a SmolLM2's, up to 49,151) are no
            // byte-level GPT's tokens.
            let vocab = gpt.config().vocab_size;
            if let Tokens::Ids(ids) = &tokens {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    tokens = Tokens::Unknown(format!(
                        "token id {id} is outside the reference's vocabulary of {vocab}: the \
                         completion was sampled by another kind of model"
                    ));
                }
            }
            let mut lps = Vec::new();
            if let Tokens::Ids(ids) = &tokens {
                lps = self.score(gpt, tok, &c.prompt, ids).or_stage(&format!(
                    "scoring completion {} under {}",
                    c.id, reference.id
                ))?;
                if lps.len() < ids.len() {
                    let context = gpt.config().context;
                    tokens = Tokens::Unknown(format!(
                        "{} tokens do not fit the reference's context of {context}",
                        ids.len()
                    ));
                }
            }
            match tokens {
                Tokens::Ids(ids) => {
                    c.ref_logprobs = lps.iter().map(|&l| l as f32).collect();
                    if c.token_ids.is_empty() {
                        c.token_ids = ids;
                    }
                    if let Some(kl) = c.logprob_minus_ref() {
                        kl_sum += kl;
                        kl_n += 1;
                    }
                    scored += 1;
                }
                Tokens::Unknown(why) => {
                    if unmatched == 0 {
                        ctx.log(format!(
                            "completion {}: {why}; passed on without ref_logprobs",
                            c.id
                        ));
                    }
                    unmatched += 1;
                }
            }
            c.meta.insert("ref_policy".into(), reference.id.clone());
            ctx.emit(0, Record::Completion(c));
            ctx.progress("logprobs", done as u64 + 1, total);
        }
        ctx.metric("completions", scored as f64);
        ctx.metric("unmatched", unmatched as f64);
        if kl_n > 0 {
            ctx.metric("mean_logprob_minus_ref", kl_sum / kl_n as f64);
        }
        Ok(())
    }
}

impl Logprobs {
    /// Scores completions under a SmolLM2 reference: the pretrained model
    /// (`artifact` None) or a checkpoint fine-tuned from it.
    fn score_chat(
        &mut self,
        ctx: &mut Context,
        completions: Vec<Completion>,
        artifact: Option<ArtifactRef>,
    ) -> Result<(), StageError> {
        let name = artifact
            .as_ref()
            .map_or_else(|| self.config.pretrained.clone(), |a| a.id.clone());
        if self.chat.as_ref().is_none_or(|(a, _)| *a != artifact) {
            let chat = crate::load_chat(
                &ctx.init().run_dir,
                artifact.as_ref(),
                &self.config.pretrained,
                &self.device,
                &format!("cannot load reference {name}"),
            )?;
            let context = chat.model.config().max_position_embeddings;
            // Nothing trains: one "trained" layer is the least Tuned runs,
            // and the pass is the whole model either way.
            self.chat = Some((artifact.clone(), Tuned::new(chat, 1, context, None, 0)?));
        }
        let tuned = &self.chat.as_ref().expect("loaded above").1;
        let context = tuned.chat.model.config().max_position_embeddings;
        let (mut scored, mut unmatched, mut kl_sum, mut kl_n) = (0u64, 0u64, 0.0, 0u64);
        let total = completions.len() as u64;
        // A sequence that had to be cut to fit the context scores only part
        // of its tokens: unmatched, not a short ref_logprobs.
        let whole = |s: &Sampled, c: &Completion| s.tokens() == c.token_ids.len();
        // Scored only with its sampled ids, one per log-prob.
        let fits =
            |c: &Completion| !c.token_ids.is_empty() && c.token_ids.len() == c.token_logprobs.len();
        // A few sequences a pass: the matmuls get rows, the graph stays small.
        for (done, chunk) in completions.chunks(4).enumerate() {
            let mut ready = Vec::new();
            for c in chunk {
                if !fits(c) {
                    if unmatched == 0 {
                        ctx.log(format!(
                            "completion {}: {} token ids for {} token log-probs (a SmolLM2 reference \
                             scores the ids lm.rollout sampled); passed on without ref_logprobs",
                            c.id,
                            c.token_ids.len(),
                            c.token_logprobs.len()
                        ));
                    }
                    unmatched += 1;
                    continue;
                }
                let prompt = tuned.prompt_ids(&c.prompt).map_err(|e| {
                    StageError::new(format!("cannot tokenize the prompt of {}: {e}", c.id))
                })?;
                ready.push(Sampled::after(
                    prompt,
                    c,
                    context,
                    self.config.max_new_tokens,
                ));
            }
            let rows = if ready.is_empty() {
                Vec::new()
            } else {
                let examples: Vec<&Example> = ready.iter().map(|s| &s.example).collect();
                let doing = format!("scoring completions under {name}");
                let lp = tuned
                    .token_logprobs(&examples, &self.device)
                    .and_then(|t| Ok(t.detach().to_device(&Device::Cpu)?.to_vec2::<f32>()?))
                    .or_stage(&doing)?;
                tuned.clear_prefixes();
                lp
            };
            let mut rows = ready.iter().zip(rows);
            for c in chunk {
                let mut c = c.clone();
                if fits(&c) {
                    let (s, row) = rows.next().expect("a row per scored completion");
                    if whole(s, &c) {
                        c.ref_logprobs = row[s.first..s.first + s.tokens()].to_vec();
                        if let Some(kl) = c.logprob_minus_ref() {
                            kl_sum += kl;
                            kl_n += 1;
                        }
                        scored += 1;
                    } else {
                        unmatched += 1;
                        ctx.log(format!(
                            "completion {}: {} tokens do not fit the reference's context of \
                             {context} after the prompt; passed on without ref_logprobs",
                            c.id,
                            c.token_ids.len()
                        ));
                    }
                }
                c.meta.insert("ref_policy".into(), name.clone());
                ctx.emit(0, Record::Completion(c));
            }
            ctx.progress(
                "logprobs",
                ((done + 1) * 4).min(total as usize) as u64,
                total,
            );
        }
        ctx.metric("completions", scored as f64);
        ctx.metric("unmatched", unmatched as f64);
        if kl_n > 0 {
            ctx.metric("mean_logprob_minus_ref", kl_sum / kl_n as f64);
        }
        Ok(())
    }

    /// The tokens `c` was sampled as: its text's tokens, then EOS or a stop
    /// string when token_logprobs has room for them. Without token_logprobs
    /// (demonstrations), the text and EOS.
    fn tokens(&self, tok: &dyn Tokenizer, c: &Completion) -> Tokens {
        // lm.rollout records the sampled ids: nothing to reconstruct.
        if !c.token_ids.is_empty() {
            return if c.token_ids.len() == c.token_logprobs.len() {
                Tokens::Ids(c.token_ids.clone())
            } else {
                Tokens::Unknown(format!(
                    "token_ids holds {} ids for {} token log-probs",
                    c.token_ids.len(),
                    c.token_logprobs.len()
                ))
            };
        }
        if c.text.contains('\u{FFFD}') {
            return Tokens::Unknown(
                "the text holds a replacement character (the sampled bytes were not UTF-8), so its tokens are lost"
                    .into(),
            );
        }
        let mut ids = tok.encode(&c.text);
        let sampled = c.token_logprobs.len();
        if sampled == 0 {
            ids.push(tok.eos_id());
            return Tokens::Ids(ids);
        }
        if sampled == ids.len() {
            return Tokens::Ids(ids);
        }
        // The endings that fit: EOS, or a stop string that first occurs where
        // the text was cut.
        let mut endings: Vec<Vec<u32>> = Vec::new();
        if sampled == ids.len() + 1 {
            endings.push(vec![tok.eos_id()]);
        }
        for stop in self.config.stop.iter().filter(|s| !s.is_empty()) {
            let stop_ids = tok.encode(stop);
            let cut_here = format!("{}{stop}", c.text).find(stop.as_str()) == Some(c.text.len());
            if ids.len() + stop_ids.len() == sampled && cut_here && !endings.contains(&stop_ids) {
                endings.push(stop_ids);
            }
        }
        match endings.len() {
            1 => {
                ids.extend(endings.pop().expect("one ending"));
                Tokens::Ids(ids)
            }
            0 => Tokens::Unknown(format!(
                "{sampled} token log-probs for a text of {} tokens, and neither EOS nor a `stop` string makes \
                 up the difference (set `stop` as in lm.rollout)",
                ids.len()
            )),
            _ => Tokens::Unknown(format!(
                "{sampled} token log-probs for a text of {} tokens: several endings fit (EOS, or `stop` \
                 strings of one length), and the completion does not say which",
                ids.len()
            )),
        }
    }

    /// log π_ref of each of `ids` after `BOS prompt`, teacher-forced, the
    /// prompt cut from the left as lm.rollout cut it.
    fn score(
        &self,
        gpt: &Gpt,
        tok: &dyn Tokenizer,
        prompt: &str,
        ids: &[u32],
    ) -> hone_models::Result<Vec<f64>> {
        let context = gpt.config().context;
        let mut prompt_ids = vec![tok.bos_id()];
        prompt_ids.extend(tok.encode(prompt));
        let start = crate::teacher_forcing_start(
            prompt_ids.len(),
            ids.len(),
            context,
            self.config.max_new_tokens,
        );
        let mut input = prompt_ids[start..].to_vec();
        let first = input.len() - 1;
        input.extend(&ids[..ids.len() - 1]);
        input.truncate(context);
        let n = input.len();
        let x = Tensor::from_vec(input, (1, n), &self.device)?;
        let logits = gpt.forward(&x)?.squeeze(0)?;
        let rows: Vec<Vec<f32>> = logits
            .narrow(0, first, n - first)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2()?;
        // The same log-softmax as hone_models::sample::sample_token.
        Ok(rows
            .iter()
            .zip(ids)
            .map(|(row, &id)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let log_norm = max
                    + row
                        .iter()
                        .map(|&l| (l as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                (row[id as usize] as f64 - log_norm) as f32 as f64
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Rollout;
    use crate::sft::tests::{demos, run_sft, temp_run_dir, tiny_config};
    use std::collections::BTreeMap;

    fn prompts() -> Vec<Record> {
        let long = "Human: tell me a long story about a river, a stone and a cloud.\n\nAssistant:";
        [("a", "Human: say apple\n\nAssistant:"), ("b", long)]
            .iter()
            .map(|(id, text)| {
                Record::Prompt(Prompt {
                    id: id.to_string(),
                    text: text.to_string(),
                    meta: BTreeMap::new(),
                })
            })
            .collect()
    }

    /// Runs one round of `S` on `run_dir`: `inputs` are (port, records).
    fn run<S: StageFactory>(
        kind: &str,
        run_dir: &std::path::Path,
        config: serde_json::Value,
        inputs: Vec<(usize, Vec<Record>)>,
    ) -> Result<hone_sdk::Collected, StageError> {
        let mut init = StageInit::for_test(kind, config);
        init.run_dir = run_dir.to_path_buf();
        let mut stage = S::create(&init)?;
        let mut out = hone_sdk::Collected::default();
        {
            let mut ctx = Context::new(&mut out, &init, 0);
            for (port, batch) in inputs {
                stage.on_batch(&mut ctx, port, batch)?;
            }
            stage.on_round_end(&mut ctx)?;
        }
        Ok(out)
    }

    fn completions(out: &hone_sdk::Collected) -> Vec<Completion> {
        out.records[&0]
            .iter()
            .map(|r| match r {
                Record::Completion(c) => c.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_policy_as_its_own_reference_gives_zero_kl() {
        let dir = temp_run_dir("logprobs");
        let sft = run_sft(
            &dir,
            tiny_config(serde_json::json!({"steps": 40, "checkpoint_every": 0})),
            demos(20),
        );
        let Some(Record::Artifact(policy)) = sft.records[&0].last() else {
            panic!()
        };
        // Greedy with a stop string, and sampled without: EOS, stop strings and
        // max_new_tokens endings (context 64, so the long prompt is cut).
        for (stop, temperature) in [(vec![" a"], 0.0), (vec![], 0.0), (vec![], 0.7)] {
            let rollout_config = serde_json::json!({
                "n": 3, "temperature": temperature, "top_k": 0, "top_p": 1.0, "max_new_tokens": 20,
                "stop": stop, "seed": 7, "seed_per_round": true, "device": "cpu", "pretrained": "",
            });
            let rolled = run::<Rollout>(
                "lm.rollout",
                &dir,
                rollout_config,
                vec![(0, prompts()), (1, vec![Record::Artifact(policy.clone())])],
            )
            .unwrap();
            let config = serde_json::json!({"max_new_tokens": 20, "stop": stop, "device": "cpu"});
            let scored = run::<Logprobs>(
                "lm.logprobs",
                &dir,
                config,
                vec![
                    (0, rolled.records[&0].clone()),
                    (1, vec![Record::Artifact(policy.clone())]),
                ],
            )
            .unwrap();
            let cs = completions(&scored);
            assert_eq!(cs.len(), 6);
            let mut matched = 0;
            for c in &cs {
                // Rollout records its token ids, so even texts whose bytes
                // are not UTF-8 are scored.
                assert_eq!(c.token_ids.len(), c.token_logprobs.len());
                assert_eq!(
                    c.ref_logprobs.len(),
                    c.token_logprobs.len(),
                    "{c:?} {:?}",
                    scored.events
                );
                matched += 1;
                // The reference is the sampling policy: per token, the same log-prob.
                for (t, (lp, rlp)) in c.token_logprobs.iter().zip(&c.ref_logprobs).enumerate() {
                    assert!(
                        (lp - rlp).abs() < 1e-3,
                        "{} token {t}: {lp} vs {rlp} ({:?})",
                        c.id,
                        c.text
                    );
                }
                let kl = c.logprob_minus_ref().unwrap();
                assert!(kl.abs() < 1e-3 * c.token_logprobs.len() as f64, "{kl}");
                assert_eq!(c.meta["ref_policy"], policy.id);
            }
            assert_eq!(matched, 6, "every completion is scored: {cs:?}");
        }
        // Demonstrations (no token_logprobs): text and EOS, unless too long
        // for the reference's context (64).
        let demo = |id: &str, text: &str| {
            Record::Completion(Completion {
                id: id.into(),
                prompt_id: "p".into(),
                prompt: "Human: say apple\n\nAssistant:".into(),
                text: text.into(),
                token_ids: vec![],
                token_logprobs: vec![],
                ref_logprobs: vec![],
                values: vec![],
                policy: None,
                meta: BTreeMap::new(),
            })
        };
        let config = serde_json::json!({"max_new_tokens": 20, "stop": [], "device": "cpu"});
        let scored = run::<Logprobs>(
            "lm.logprobs",
            &dir,
            config,
            vec![
                (
                    0,
                    vec![demo("short", " apple."), demo("long", &"apple ".repeat(20))],
                ),
                (1, vec![Record::Artifact(policy.clone())]),
            ],
        )
        .unwrap();
        let cs = completions(&scored);
        assert_eq!(cs[0].id, "long");
        assert!(cs[0].ref_logprobs.is_empty());
        // " apple." and EOS, scored; no sampling log-probs, so no KL.
        assert_eq!(cs[1].ref_logprobs.len(), 8);
        assert_eq!(cs[1].token_ids.len(), 8);
        assert_eq!(cs[1].logprob_minus_ref(), None);
        assert!(scored.events.contains(&hone_sdk::Event::Metric {
            name: "unmatched".into(),
            value: 1.0,
            step: None
        }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_follow_the_sampled_ending() {
        let init = StageInit::for_test(
            "lm.logprobs",
            serde_json::json!({"max_new_tokens": 8, "stop": ["\n\nHuman:"], "device": "cpu"}),
        );
        let stage = Logprobs::create(&init).unwrap();
        let tok = hone_models::tokenizer::ByteTokenizer;
        let c = |text: &str, sampled: usize| Completion {
            id: "x".into(),
            prompt_id: "p".into(),
            prompt: "q".into(),
            text: text.into(),
            token_ids: vec![],
            token_logprobs: vec![-1.0; sampled],
            ref_logprobs: vec![],
            values: vec![],
            policy: None,
            meta: BTreeMap::new(),
        };
        assert_eq!(
            stage.tokens(&tok, &c("hi", 3)),
            Tokens::Ids(vec![104, 105, 257])
        );
        assert_eq!(stage.tokens(&tok, &c("hi", 2)), Tokens::Ids(vec![104, 105]));
        assert_eq!(
            stage.tokens(&tok, &c("hi", 0)),
            Tokens::Ids(vec![104, 105, 257])
        );
        let Tokens::Ids(ids) = stage.tokens(&tok, &c("hi", 10)) else {
            panic!()
        };
        assert_eq!(ids.len(), 10);
        assert!(matches!(
            stage.tokens(&tok, &c("hi", 5)),
            Tokens::Unknown(_)
        ));
        // A one-token stop string and EOS cannot be told apart.
        let init = StageInit::for_test(
            "lm.logprobs",
            serde_json::json!({"max_new_tokens": 8, "stop": ["\n"], "device": "cpu"}),
        );
        let one = Logprobs::create(&init).unwrap();
        assert!(matches!(one.tokens(&tok, &c("hi", 3)), Tokens::Unknown(_)));
        assert_eq!(one.tokens(&tok, &c("hi", 2)), Tokens::Ids(vec![104, 105]));
        assert!(matches!(
            stage.tokens(&tok, &c("h\u{FFFD}", 4)),
            Tokens::Unknown(_)
        ));
        // Recorded ids win over the text, and must cover the log-probs.
        let mut recorded = c("h\u{FFFD}", 3);
        recorded.token_ids = vec![104, 200, 257];
        assert_eq!(
            stage.tokens(&tok, &recorded),
            Tokens::Ids(vec![104, 200, 257])
        );
        recorded.token_logprobs.pop();
        assert!(
            matches!(stage.tokens(&tok, &recorded), Tokens::Unknown(m) if m.contains("3 ids for 2"))
        );
    }

    #[test]
    fn without_a_reference_it_fails_clearly() {
        let dir = temp_run_dir("logprobs-none");
        let config = serde_json::json!({"max_new_tokens": 8, "stop": [], "device": "cpu"});
        let c = Record::Completion(Completion {
            id: "x".into(),
            prompt_id: "p".into(),
            prompt: "q".into(),
            text: "t".into(),
            token_ids: vec![],
            token_logprobs: vec![],
            ref_logprobs: vec![],
            values: vec![],
            policy: None,
            meta: BTreeMap::new(),
        });
        let err = run::<Logprobs>("lm.logprobs", &dir, config, vec![(0, vec![c])])
            .err()
            .unwrap();
        assert!(
            err.message.contains("no reference policy artifact"),
            "{err}"
        );
        let bad = StageInit::for_test(
            "lm.logprobs",
            serde_json::json!({"max_new_tokens": 0, "stop": [], "device": "cpu"}),
        );
        assert_eq!(
            Logprobs::create(&bad).err().unwrap().config_field(),
            Some("max_new_tokens")
        );
    }
}
