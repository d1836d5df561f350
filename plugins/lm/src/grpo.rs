//! `lm.grpo`: group-baseline reinforcement learning on the policy's own
//! samples, one stage with a switch: RLOO (leave-one-out baseline), GRPO
//! (group mean and std) or Dr. GRPO (no std, no length normalisation). No
//! value head: the k samples of a prompt are each other's baseline. The
//! objectives live in `hone_models::policy_gradient`.
//!
//! It learns from round t's completions (their sampled `token_ids` and
//! `token_logprobs`, the old log-probs of the ratio) and the `Score`s of
//! them, and emits the updated policy; a feedback edge hands it to
//! `lm.rollout` for round t + 1.

use crate::sampled::{lay, OwnSamples, Sampled};
use crate::sft::data::Example;
use crate::trainee::{Learner, LearnerSpec, LearnerState};
use crate::{device, NewestPolicy, OrStageError};
use hone_models::batches::Batches;
use hone_models::checkpoint;
use hone_models::lora::LoraConfig;
use hone_models::policy_gradient::{clipped_surrogate, group_advantages, k3, Baseline};
use hone_models::train::clip_grad_norm;
use hone_models::{Device, Tensor};
use hone_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpoConfig {
    baseline: String,
    score: String,
    kl: String,
    beta: f64,
    clip: f64,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    max_grad_norm: f64,
    max_new_tokens: usize,
    seed: u64,
    device: String,
    pretrained: String,
    train_layers: usize,
    lora_rank: usize,
    lora_alpha: f64,
    lora_targets: Vec<String>,
}

/// Updates the policy that sampled a round's completions from their scores.
pub struct Grpo {
    config: GrpoConfig,
    baseline: Baseline,
    device: Device,
    input: RoundInput,
    /// The newest policy seen on `policy`, across rounds (round, then
    /// arrival); loaded here with its weights to train, not by NewestPolicy.
    policy: NewestPolicy,
    /// The policy in training and its optimizer, kept across rounds.
    trainee: Option<Learner>,
    /// Where the run's artifacts are, for restoring a snapshot.
    run_dir: std::path::PathBuf,
    /// SmolLM2 policies: LoRA adapters instead of the top layers' weights.
    lora: Option<LoraConfig>,
    /// Seeds the LoRA adapters' start.
    lora_seed: u64,
}

/// What lm.grpo carries from one round to the next, as its snapshot holds it.
#[derive(Serialize, Deserialize)]
struct GrpoState {
    policy: Option<ArtifactRef>,
    trainee: Option<LearnerState>,
}

impl StageFactory for Grpo {
    fn descriptor() -> StageDescriptor {
        let (count, size) = (
            FieldType::unsigned(),
            FieldType::positive().at_most(1 << 20),
        );
        let d = StageDescriptor::new(
            "lm.grpo",
            "Group-baseline RL (no value head) on the policy's own samples: for each prompt's k \
             completions (lm.rollout with n = k), advantages from their `score` Scores by `baseline` \
             (`rloo`: reward minus the others' mean; `grpo`: minus the group mean, over its std; \
             `dr_grpo`: minus the mean, and the loss summed over tokens / max_new_tokens instead of \
             averaged per sequence), then `epochs` passes of the clipped surrogate (clip) over \
             mini-batches, ratio against the completions' own token_logprobs. `kl`: `k3` adds beta * \
             the k3 estimate of KL(pi || pi_ref) per token to the loss; `sequence` subtracts beta * \
             sum(logp_old - ref) from each reward; both need ref_logprobs (lm.logprobs before this \
             stage); `none`. Emits the updated `policy` (final/, in round R's output directory) for \
             a feedback edge back to lm.rollout. Metrics: reward, reward_std, kl (k3, mean per \
             token), clip_fraction, loss, response_length, groups, unscored.",
        )
        .input("completions", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .input("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .output("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .optional("baseline", FieldType::one_of(&["rloo", "grpo", "dr_grpo"]), "grpo", "How a group's rewards become advantages.")
        .optional("score", FieldType::String, "proxy_reward", "The `name` of the Scores that are the reward.")
        .optional("kl", FieldType::one_of(&["k3", "sequence", "none"]), "k3", "How the KL to the reference enters (see the description).")
        .optional("beta", FieldType::Float, 0.04, "The KL coefficient.")
        .optional("clip", FieldType::Float, 0.2, "epsilon of the clipped surrogate, in (0, 1).")
        .optional("epochs", size.clone(), 1, "Passes over the round's completions.")
        .optional("batch_size", size.clone(), 8, "Completions per optimiser step.")
        .optional("lr", FieldType::Float, 1e-4, "Learning rate (AdamW, constant).")
        .optional("max_grad_norm", FieldType::Float, 1.0, "Gradient-norm clip.")
        .optional("max_new_tokens", size, 64, "lm.rollout's max_new_tokens: it fixes how rollout cut each prompt (so the ratio starts at 1), and Dr. GRPO divides by it.")
        .optional("seed", count, 0, "Seed of the mini-batch order, combined with the pipeline seed.")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.");
        crate::trainee::learner_options(d)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: GrpoConfig = init.config()?;
        let baseline = Baseline::parse(&config.baseline).ok_or_else(|| {
            StageError::config(
                "baseline",
                format!("unknown baseline `{}`", config.baseline),
            )
        })?;
        if !(config.clip > 0.0 && config.clip < 1.0) {
            return Err(StageError::config(
                "clip",
                format!("must be in (0, 1), found {}", config.clip),
            ));
        }
        if !(config.beta >= 0.0 && config.beta.is_finite()) {
            return Err(StageError::config(
                "beta",
                format!("must be 0 or more, found {}", config.beta),
            ));
        }
        crate::check_pretrained(&config.pretrained, "train")?;
        let lora = crate::trainee::learner_lora(
            config.lora_rank,
            config.lora_alpha,
            &config.lora_targets,
        )?;
        let lora_seed = config.seed ^ init.seed ^ 0x10_4a;
        let device = device(&config.device)?;
        Ok(Grpo {
            config,
            baseline,
            device,
            input: RoundInput::default(),
            policy: NewestPolicy::new("policy", "policy", "policy"),
            trainee: None,
            run_dir: init.run_dir.clone(),
            lora,
            lora_seed,
        })
    }
}

impl Stage for Grpo {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        let state = GrpoState {
            policy: self.policy.newest.clone(),
            trainee: self.trainee.as_ref().map(Learner::state).transpose()?,
        };
        hone_sdk::snapshot::encode("lm.grpo", &state).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        let state: GrpoState = hone_sdk::snapshot::decode("lm.grpo", round, snapshot)?;
        let spec = self.spec(&self.run_dir);
        self.trainee = state
            .trainee
            .map(|t| Learner::from_state(t, &spec))
            .transpose()?;
        self.policy.newest = state.policy;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        self.policy.offer_all(&mut input, 2)?;
        let pretrained = !self.config.pretrained.is_empty();
        let Some(round) = OwnSamples::take(
            &mut input,
            &self.policy,
            pretrained,
            &self.config.score,
            ctx.round(),
        )?
        else {
            return Ok(());
        };
        self.update(
            ctx,
            round.policy.as_ref(),
            round.completions,
            &round.rewards,
        )
    }
}

/// One completion ready to learn from, with its group-relative advantage.
struct Sample {
    sampled: Sampled,
    advantage: f32,
}

impl Grpo {
    /// How the policy is loaded when it is not kept from the last round.
    fn spec<'a>(&'a self, run_dir: &'a std::path::Path) -> LearnerSpec<'a> {
        LearnerSpec {
            run_dir,
            device: &self.device,
            lr: self.config.lr,
            pretrained: &self.config.pretrained,
            train_layers: self.config.train_layers,
            lora: self.lora.as_ref(),
            seed: self.lora_seed,
        }
    }

    fn update(
        &mut self,
        ctx: &mut Context,
        policy: Option<&ArtifactRef>,
        completions: Vec<Completion>,
        rewards: &BTreeMap<String, f64>,
    ) -> Result<(), StageError> {
        let run_dir = ctx.init().run_dir.clone();
        let kept = self.trainee.take();
        let mut trainee = Learner::resume_or_load(kept, policy, &self.spec(&run_dir))?;
        let result = self.learn(ctx, &mut trainee, completions, rewards);
        trainee.end_round();
        // Kept only as an artifact: a round with nothing to learn from leaves
        // the pretrained model untouched, and it reloads for free.
        if trainee.artifact().is_none() {
            return result;
        }
        // A round that failed half-way leaves weights that are no artifact:
        // the next round reloads the policy it is given.
        self.trainee = result.is_ok().then_some(trainee);
        result
    }

    /// One round's update of `trainee`.
    fn learn(
        &self,
        ctx: &mut Context,
        trainee: &mut Learner,
        completions: Vec<Completion>,
        rewards: &BTreeMap<String, f64>,
    ) -> Result<(), StageError> {
        let c = &self.config;
        let needs_reference = c.kl != "none" && c.beta > 0.0;
        let policy = trainee.artifact().cloned();
        let from = policy
            .as_ref()
            .map_or_else(|| c.pretrained.clone(), |a| a.id.clone());
        // Group by prompt; a completion without its reward is counted, not used.
        let mut groups: BTreeMap<String, Vec<(Completion, f64)>> = BTreeMap::new();
        let mut unscored = 0u64;
        for comp in completions {
            trainee.check_sampler(&comp, &c.pretrained, "lm.grpo")?;
            if comp.token_ids.is_empty() || comp.token_ids.len() != comp.token_logprobs.len() {
                return Err(StageError::new(format!(
                    "completion {} has {} token ids for {} token log-probs: lm.grpo learns from \
                     lm.rollout's samples, which record both",
                    comp.id,
                    comp.token_ids.len(),
                    comp.token_logprobs.len()
                )));
            }
            if needs_reference && comp.ref_logprobs.len() != comp.token_ids.len() {
                return Err(StageError::config(
                    "kl",
                    format!(
                        "kl = \"{}\" needs each completion's ref_logprobs, and {} has none: put an \
                         lm.logprobs stage (reference = the SFT policy) between lm.rollout and this one, \
                         or set kl = \"none\"",
                        c.kl, comp.id
                    ),
                ));
            }
            match rewards.get(&comp.id) {
                Some(&r) => groups
                    .entry(comp.prompt_id.clone())
                    .or_default()
                    .push((comp, r)),
                None => unscored += 1,
            }
        }
        ctx.metric("unscored", unscored as f64);
        ctx.metric("groups", groups.len() as f64);
        let (mut all_rewards, mut samples) = (Vec::new(), Vec::new());
        for (_, group) in groups {
            let shaped: Vec<f64> = group
                .iter()
                .map(|(comp, r)| {
                    all_rewards.push(*r);
                    if c.kl == "sequence" {
                        let kl: f64 = comp
                            .token_logprobs
                            .iter()
                            .zip(&comp.ref_logprobs)
                            .map(|(&o, &rf)| f64::from(o - rf))
                            .sum();
                        r - c.beta * kl
                    } else {
                        *r
                    }
                })
                .collect();
            let advantages = group_advantages(&shaped, self.baseline);
            for ((comp, _), a) in group.into_iter().zip(advantages) {
                samples.push(Sample {
                    sampled: trainee.sampled(&comp, c.max_new_tokens)?,
                    advantage: a as f32,
                });
            }
        }
        let n = all_rewards.len().max(1) as f64;
        let mean = all_rewards.iter().sum::<f64>() / n;
        let std = (all_rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        ctx.metric("reward", mean);
        ctx.metric("reward_std", std);
        if samples.is_empty() {
            return Ok(());
        }
        let lengths: f64 = samples.iter().map(|s| s.sampled.tokens() as f64).sum();
        ctx.metric("response_length", lengths / samples.len() as f64);
        let vars = trainee.vars();
        let seed = c.seed ^ ctx.init().seed ^ ctx.round();
        let mut order = Batches::new(samples.iter().map(|s| s.sampled.id.clone()).collect(), seed);
        let steps = c.epochs * samples.len().div_ceil(c.batch_size);
        let (mut loss_sum, mut kl_sum, mut clipped_sum) = (0.0, 0.0, 0.0);
        // Each epoch visits every sample once; the last batch of an epoch is
        // smaller when batch_size does not divide the samples.
        for batch in (0..c.epochs).flat_map(|_| order.epoch(c.batch_size)) {
            let batch: Vec<&Sample> = batch.into_iter().map(|i| &samples[i]).collect();
            let (loss, kl, clipped) = self
                .loss(trainee, &batch, needs_reference)
                .or_stage("policy step failed")?;
            let mut grads = loss.backward().or_stage("policy step failed")?;
            clip_grad_norm(&mut grads, &vars, c.max_grad_norm).or_stage("policy step failed")?;
            let step = trainee.step(&grads).or_stage("policy step failed")?;
            let value = f64::from(loss.to_scalar::<f32>().or_stage("policy step failed")?);
            ctx.metric_at("step_loss", value, step);
            loss_sum += value;
            kl_sum += kl;
            clipped_sum += clipped;
        }
        ctx.metric("loss", loss_sum / steps as f64);
        ctx.metric("kl", kl_sum / steps as f64);
        ctx.metric("clip_fraction", clipped_sum / steps as f64);
        ctx.log(format!(
            "{} on {} completions ({} steps): reward {mean:.4} (std {std:.4}), kl {:.4}, clip fraction {:.3}",
            c.baseline,
            samples.len(),
            steps,
            kl_sum / steps as f64,
            clipped_sum / steps as f64
        ));
        let out = ctx.output_dir()?.join("final");
        trainee.save(&out)?;
        let mut lineage = vec![format!("{} from {from}", c.baseline)];
        if let Learner::Chat(_) = trainee {
            lineage.push(crate::tuned_llama::base_lineage(
                c.train_layers,
                self.lora.as_ref(),
            ));
        }
        lineage.push(format!(
            "lm.grpo round {}: {} completions, kl {} beta {}, clip {}, epochs {}, {} optimizer \
                 steps in all",
            ctx.round(),
            samples.len(),
            c.kl,
            c.beta,
            c.clip,
            c.epochs,
            trainee.steps()
        ));
        let artifact = ctx.register_artifact(
            "policy",
            &out.join(checkpoint::WEIGHTS),
            policy.iter().map(|a| a.id.clone()).collect(),
            lineage,
        )?;
        trainee.set_artifact(artifact.clone());
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }

    /// The batch's loss, its mean k3 KL per token and its clip fraction.
    fn loss(
        &self,
        trainee: &Learner,
        batch: &[&Sample],
        with_kl: bool,
    ) -> hone_models::Result<(Tensor, f64, f64)> {
        let c = &self.config;
        let examples: Vec<Example> = batch.iter().map(|s| s.sampled.example.clone()).collect();
        let (logp, mask) = trainee.token_logprobs(&examples, &self.device)?;
        let (b, t) = mask.dims2()?;
        let old = lay(batch, t, &self.device, |s| {
            (s.sampled.first, &s.sampled.old)
        })?;
        let advantages = Tensor::from_vec(
            batch.iter().map(|s| s.advantage).collect::<Vec<f32>>(),
            b,
            &self.device,
        )?;
        let mut per_token = clipped_surrogate(&logp, &old, &advantages, c.clip)?;
        let mut kl = 0.0;
        let tokens = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
        if with_kl {
            let reference = lay(batch, t, &self.device, |s| {
                (s.sampled.first, &s.sampled.reference)
            })?;
            let k = k3(&logp, &reference)?;
            kl = f64::from((k.detach() * &mask)?.sum_all()?.to_scalar::<f32>()? / tokens);
            if c.kl == "k3" {
                per_token = (per_token + (k * c.beta)?)?;
            }
        }
        let masked = (per_token * &mask)?;
        let loss = match self.baseline {
            // Each sequence's mean over its tokens, then the batch's mean.
            Baseline::Rloo | Baseline::Grpo => {
                let lengths = mask.sum(1)?.maximum(1.0)?;
                (masked.sum(1)? / lengths)?.mean_all()?
            }
            // A constant divisor: no preference for short or long answers.
            Baseline::DrGrpo => (masked.sum_all()? / (b * c.max_new_tokens) as f64)?,
        };
        // Where the clipped term is the one in force (TRL's clipfrac): ratio
        // past 1 + ε with a positive advantage, or under 1 − ε with a
        // negative one.
        let f32 = hone_models::DType::F32;
        let ratio = (logp.detach() - &old)?.exp()?;
        let a = advantages.unsqueeze(1)?.broadcast_as(ratio.shape())?;
        let up = (ratio.gt(1.0 + c.clip)?.to_dtype(f32)? * a.gt(0.0)?.to_dtype(f32)?)?;
        let down = (ratio.lt(1.0 - c.clip)?.to_dtype(f32)? * a.lt(0.0)?.to_dtype(f32)?)?;
        let outside = (up + down)?;
        let clipped = f64::from((outside * &mask)?.sum_all()?.to_scalar::<f32>()? / tokens);
        Ok((loss, kl, clipped))
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
pub(crate) mod tests_smollm;
