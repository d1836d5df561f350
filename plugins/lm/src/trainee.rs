//! The policy an online learner (lm.grpo, lm.ppo) trains, kept in the stage
//! from round to round with its optimizer. Round t + 1 samples from the
//! policy this stage emitted in round t, so the learner carries on with the
//! same weights and AdamW moments instead of reloading the checkpoint and
//! starting a fresh optimizer: with a handful of steps per round, a fresh
//! AdamW's first steps are close to sign descent (every weight moves by
//! about the learning rate whatever its gradient's size), which turns a
//! noisy policy gradient into a random walk. Its state (weights, moments,
//! step count) goes into the stage's snapshot.

use crate::chat_trainee::{ChatTrainee, ChatTraineeState};
use crate::sampled::Sampled;
use crate::sft::data::{to_tensors, Example};
use crate::{checkpoint_dir_in, OrStageError};
use candle_core::backprop::GradStore;
use hone_models::adamw::{AdamW, AdamWState, ParamsAdamW};
use hone_models::checkpoint::{self, restore_weights, weights_state, WeightsState};
use hone_models::gpt::{Gpt, GptConfig};
use hone_models::lora::LoraConfig;
use hone_models::tokenizer::{load_tokenizer, Tokenizer};
use hone_models::train::{token_logprobs, vars_by_name};
use hone_models::{DType, Device, Tensor, Var, VarBuilder, VarMap};
use hone_pretrained::smollm::ChatLlama;
use hone_sdk::{ArtifactRef, Completion, StageError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A policy being trained, with its optimizer.
pub(crate) struct Trainee {
    /// The artifact these weights are: the one loaded, then each one this
    /// stage emitted from them.
    pub artifact: ArtifactRef,
    pub gpt: Gpt,
    pub varmap: VarMap,
    pub tok: Box<dyn Tokenizer>,
    pub opt: AdamW,
    /// Optimizer steps taken since the weights were loaded.
    pub steps: u64,
}

/// A [`Trainee`] in a snapshot.
#[derive(Serialize, Deserialize)]
pub(crate) struct TraineeState {
    artifact: ArtifactRef,
    config: GptConfig,
    weights: WeightsState,
    opt: AdamWState,
    steps: u64,
}

/// AdamW without weight decay: with nothing to learn, the policy must stay
/// as it is.
pub(crate) fn adam(lr: f64) -> ParamsAdamW {
    ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    }
}

impl Trainee {
    /// The trainee for `policy`: `kept` when it holds exactly that artifact
    /// (the one this stage emitted last round), else `policy` loaded from
    /// its checkpoint with a fresh AdamW at `lr`.
    pub fn resume_or_load(
        kept: Option<Trainee>,
        run_dir: &Path,
        policy: &ArtifactRef,
        device: &Device,
        lr: f64,
    ) -> Result<Trainee, StageError> {
        if let Some(t) = kept.filter(|t| t.artifact == *policy) {
            return Ok(t);
        }
        let dir = checkpoint_dir_in(run_dir, policy);
        let doing = format!("cannot load policy {} from {}", policy.id, dir.display());
        let (gpt, varmap, tok) = crate::load_gpt_policy(&dir, device, &doing)?;
        let opt =
            AdamW::new(vars_by_name(&varmap), adam(lr)).or_stage("cannot create the optimiser")?;
        Ok(Trainee {
            artifact: policy.clone(),
            gpt,
            varmap,
            tok,
            opt,
            steps: 0,
        })
    }

    /// Weights, optimizer state and step count, for a snapshot.
    pub fn state(&self) -> Result<TraineeState, StageError> {
        let doing = "cannot snapshot the policy";
        Ok(TraineeState {
            artifact: self.artifact.clone(),
            config: self.gpt.config().clone(),
            weights: weights_state(&self.varmap).or_stage(doing)?,
            opt: self.opt.state().or_stage(doing)?,
            steps: self.steps,
        })
    }

    /// The trainee a snapshot held; its tokenizer comes from its artifact's
    /// checkpoint directory under `run_dir`.
    pub fn from_state(
        state: TraineeState,
        run_dir: &Path,
        device: &Device,
        lr: f64,
    ) -> Result<Trainee, StageError> {
        let doing = format!(
            "cannot restore policy {} from the snapshot",
            state.artifact.id
        );
        let varmap = VarMap::new();
        let gpt = Gpt::new(
            &state.config,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )
        .or_stage(&doing)?;
        restore_weights(&varmap, &state.weights).or_stage(&doing)?;
        let mut opt = AdamW::new(vars_by_name(&varmap), adam(lr)).or_stage(&doing)?;
        opt.restore(&state.opt).or_stage(&doing)?;
        let tok = load_tokenizer(&checkpoint_dir_in(run_dir, &state.artifact)).or_stage(&doing)?;
        Ok(Trainee {
            artifact: state.artifact,
            gpt,
            varmap,
            tok,
            opt,
            steps: state.steps,
        })
    }
}

/// The policy an online learner trains: hone's GPT or a SmolLM2.
pub(crate) enum Learner {
    Gpt(Trainee),
    Chat(ChatTrainee),
}

/// A [`Learner`] in a snapshot.
#[derive(Serialize, Deserialize)]
pub(crate) enum LearnerState {
    Gpt(TraineeState),
    Chat(ChatTraineeState),
}

/// The options of an online learner (lm.grpo, lm.ppo) that pick and
/// shape a SmolLM2 policy, added to `d`.
pub(crate) fn learner_options(d: hone_sdk::StageDescriptor) -> hone_sdk::StageDescriptor {
    use hone_sdk::FieldType;
    let d = crate::tuned_llama::lora_options(d);
    d.optional(
            "pretrained",
            FieldType::String,
            "",
            "`smollm2-135m-instruct`: the policy until a `policy` artifact arrives (lm.rollout's \
             `pretrained` too, so round 0 samples it; later rounds get this stage's output fed back). \
             Empty: round 0 needs a policy artifact (hone's GPT, or a SmolLM2 one lm.sft or lm.dpo wrote).",
        )
        .optional(
            "train_layers",
            FieldType::positive().at_most(1 << 10),
            4,
            "SmolLM2 policies: the top layers that train, with the final norm (the embedding, tied to \
             the LM head, and the layers below stay frozen; their states are computed once per sample). \
             Samples are teacher-forced uncut, as lm.rollout drew them (set max_new_tokens as there).",
        )
}

/// The LoRA settings of [`learner_options`] (`None`: lora_rank 0), checked.
pub(crate) fn learner_lora(
    rank: usize,
    alpha: f64,
    targets: &[String],
) -> Result<Option<LoraConfig>, StageError> {
    let lora = crate::tuned_llama::lora_config(rank, alpha, targets);
    if let Some(l) = &lora {
        l.check(&hone_models::lora::LLAMA_TARGETS)
            .map_err(|(field, message)| StageError::config(field, message))?;
    }
    Ok(lora)
}

/// How a [`Learner`] is loaded when it is not kept from the last round.
pub(crate) struct LearnerSpec<'a> {
    pub run_dir: &'a Path,
    pub device: &'a Device,
    pub lr: f64,
    /// The pretrained SmolLM2 that is the policy before any artifact.
    pub pretrained: &'a str,
    /// SmolLM2: the top layers that train.
    pub train_layers: usize,
    /// SmolLM2: LoRA adapters on those layers instead of their weights.
    pub lora: Option<&'a LoraConfig>,
    /// Seeds the adapters' start.
    pub seed: u64,
}

impl Learner {
    /// The learner for `policy` (`None`: the pretrained model): `kept` when
    /// its weights are exactly that policy, else loaded afresh.
    pub fn resume_or_load(
        kept: Option<Learner>,
        policy: Option<&ArtifactRef>,
        spec: &LearnerSpec,
    ) -> Result<Learner, StageError> {
        if let Some(l) = kept.filter(|l| l.artifact() == policy) {
            return Ok(l);
        }
        let chat = match policy {
            None => true,
            Some(a) => ChatLlama::is_checkpoint(&checkpoint_dir_in(spec.run_dir, a)),
        };
        if chat {
            let t = ChatTrainee::load(
                spec.run_dir,
                policy,
                spec.pretrained,
                spec.train_layers,
                spec.lora,
                spec.seed,
                spec.device,
                spec.lr,
            )?;
            return Ok(Learner::Chat(t));
        }
        let policy = policy.expect("a GPT policy is an artifact");
        if spec.lora.is_some() {
            return Err(StageError::config(
                "lora_rank",
                format!(
                    "LoRA adapters are for SmolLM2 policies, and {} is one of hone's GPT, which \
                     trains whole: set lora_rank = 0",
                    policy.id
                ),
            ));
        }
        Trainee::resume_or_load(None, spec.run_dir, policy, spec.device, spec.lr).map(Learner::Gpt)
    }

    /// The artifact the weights are (`None`: the pretrained model).
    pub fn artifact(&self) -> Option<&ArtifactRef> {
        match self {
            Learner::Gpt(t) => Some(&t.artifact),
            Learner::Chat(t) => t.artifact.as_ref(),
        }
    }

    /// Records that the weights are now `artifact` (just emitted).
    pub fn set_artifact(&mut self, artifact: ArtifactRef) {
        match self {
            Learner::Gpt(t) => t.artifact = artifact,
            Learner::Chat(t) => t.artifact = Some(artifact),
        }
    }

    /// An error unless `c` was sampled by the policy this learner trains
    /// (a SmolLM2's; `pretrained` names the model before any artifact):
    /// the ratio is against the sampler's log-probs, so samples of another
    /// policy would train with a wrong pi_old (and, from another kind of
    /// model, ids of another vocabulary). `stage` names the learner.
    pub fn check_sampler(
        &self,
        c: &Completion,
        pretrained: &str,
        stage: &str,
    ) -> Result<(), StageError> {
        if !matches!(self, Learner::Chat(_)) || c.policy.as_ref() == self.artifact() {
            return Ok(());
        }
        let name =
            |p: Option<&ArtifactRef>| p.map_or_else(|| pretrained.to_string(), |a| a.id.clone());
        Err(StageError::new(format!(
            "completion {} was sampled by {}, but {stage} trains {}: wire `policy` to the policy \
             lm.rollout samples (with feedback from this stage's output)",
            c.id,
            name(c.policy.as_ref()),
            name(self.artifact())
        )))
    }

    /// A completion as teacher-forced training data, its prompt encoded as
    /// the policy's sampler encoded it.
    pub fn sampled(&self, c: &Completion, max_new_tokens: usize) -> Result<Sampled, StageError> {
        match self {
            Learner::Gpt(t) => Ok(Sampled::new(
                t.tok.as_ref(),
                c,
                t.gpt.config().context,
                max_new_tokens,
            )),
            Learner::Chat(t) => {
                let prompt = t.tuned.prompt_ids(&c.prompt).map_err(|e| {
                    StageError::new(format!("cannot tokenize the prompt of {}: {e}", c.id))
                })?;
                let context = t.tuned.chat.model.config().max_position_embeddings;
                Ok(Sampled::after(prompt, c, context, max_new_tokens))
            }
        }
    }

    /// log pi of each target [B,T] and the response mask [B,T];
    /// differentiable in the trained weights.
    pub fn token_logprobs(
        &self,
        examples: &[Example],
        device: &Device,
    ) -> hone_models::Result<(Tensor, Tensor)> {
        match self {
            Learner::Gpt(t) => {
                let (x, y, mask) = to_tensors(examples, t.tok.pad_id(), device)?;
                Ok((token_logprobs(&t.gpt.forward(&x)?, &y)?, mask))
            }
            Learner::Chat(t) => {
                let (_, _, mask) = to_tensors(examples, 0, device)?;
                let refs: Vec<&Example> = examples.iter().collect();
                Ok((t.tuned.token_logprobs(&refs, device)?, mask))
            }
        }
    }

    /// [`Learner::token_logprobs`] and the policy's mean entropy per
    /// response token (a diagnostic, without gradient).
    pub fn token_logprobs_entropy(
        &self,
        examples: &[Example],
        device: &Device,
    ) -> hone_models::Result<(Tensor, Tensor, f64)> {
        match self {
            Learner::Gpt(t) => {
                let (x, y, mask) = to_tensors(examples, t.tok.pad_id(), device)?;
                let logits = t.gpt.forward(&x)?;
                let logp = token_logprobs(&logits, &y)?;
                let h = hone_models::ppo::entropy(&logits.detach())?;
                let tokens = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
                let h = (h * &mask)?.sum_all()?.to_scalar::<f32>()? / tokens;
                Ok((logp, mask, f64::from(h)))
            }
            Learner::Chat(t) => {
                let (_, _, mask) = to_tensors(examples, 0, device)?;
                let refs: Vec<&Example> = examples.iter().collect();
                let (logp, h) = t.tuned.token_logprobs_entropy(&refs, device, true)?;
                Ok((logp, mask, h.unwrap_or(0.0)))
            }
        }
    }

    /// The ids a sampled response ends with when the policy stopped it (not
    /// cut at max_new_tokens).
    pub fn stop_ids(&self) -> Vec<u32> {
        match self {
            Learner::Gpt(t) => vec![t.tok.eos_id()],
            Learner::Chat(t) => t.tuned.chat.stop_tokens.clone(),
        }
    }

    /// The variables a step updates.
    pub fn vars(&self) -> Vec<Var> {
        match self {
            Learner::Gpt(t) => vars_by_name(&t.varmap),
            Learner::Chat(t) => t.tuned.trainable(),
        }
    }

    /// One optimizer step on `grads`; returns the steps taken so far.
    pub fn step(&mut self, grads: &GradStore) -> hone_models::Result<u64> {
        let (opt, steps) = match self {
            Learner::Gpt(t) => (&mut t.opt, &mut t.steps),
            Learner::Chat(t) => (&mut t.opt, &mut t.steps),
        };
        opt.step(grads)?;
        *steps += 1;
        Ok(*steps)
    }

    /// Optimizer steps since the weights were loaded.
    pub fn steps(&self) -> u64 {
        match self {
            Learner::Gpt(t) => t.steps,
            Learner::Chat(t) => t.steps,
        }
    }

    /// The round is over: a SmolLM2's cached frozen states go.
    pub fn end_round(&self) {
        if let Learner::Chat(t) = self {
            t.tuned.clear_prefixes();
        }
    }

    /// Writes the weights as a checkpoint in `dir` (loaded back like any
    /// policy of their kind).
    pub fn save(&self, dir: &Path) -> Result<(), StageError> {
        let doing = format!("cannot write checkpoint {}", dir.display());
        match self {
            Learner::Gpt(t) => {
                checkpoint::save(dir, &t.varmap, t.gpt.config(), t.tok.as_ref())
                    .or_stage(&doing)?;
            }
            Learner::Chat(t) => {
                t.tuned.chat.save(dir).or_stage(&doing)?;
            }
        }
        Ok(())
    }

    /// The learner for a snapshot.
    pub fn state(&self) -> Result<LearnerState, StageError> {
        Ok(match self {
            Learner::Gpt(t) => LearnerState::Gpt(t.state()?),
            Learner::Chat(t) => LearnerState::Chat(t.state()?),
        })
    }

    /// The learner a snapshot held.
    pub fn from_state(state: LearnerState, spec: &LearnerSpec) -> Result<Learner, StageError> {
        Ok(match state {
            LearnerState::Gpt(s) => {
                Learner::Gpt(Trainee::from_state(s, spec.run_dir, spec.device, spec.lr)?)
            }
            LearnerState::Chat(s) => Learner::Chat(ChatTrainee::from_state(s, spec)?),
        })
    }
}
