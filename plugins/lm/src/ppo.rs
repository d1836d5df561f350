//! `lm.ppo`: proximal policy optimisation of the policy on its own samples
//! against a scalar reward with a per-token KL penalty to the reference
//! (Ziegler et al. 2019; Ouyang et al. 2022), with a critic.
//!
//! The policy is hone's GPT or a SmolLM2 (pretrained, or a checkpoint lm.sft
//! or lm.dpo wrote), whose top `train_layers` layers train. The critic is a
//! separate model started from the policy's weights in the first round and
//! kept, with the KL controller and the reward statistics, across rounds
//! (`critic.rs`: for SmolLM2, copies of the trained layers on the frozen
//! layers' states). A separate critic, not a head on the policy: the value
//! loss cannot pull the policy's features, and the policy artifact stays a
//! plain checkpoint that every lm stage loads.
//!
//! Each round: the completions of round t (their sampled `token_ids`, old
//! `token_logprobs` and `ref_logprobs` from lm.logprobs) and their `Score`s
//! become per-token rewards (−β·KL on each token, the score on the last),
//! GAE(γ, λ) turns them and the critic's values into advantages and
//! returns, and `epochs` passes of mini-batches train the clipped surrogate
//! and the clipped value loss. The updated policy goes out for a feedback
//! edge to lm.rollout.

mod critic;

use crate::sampled::{lay, OwnSamples, Sampled};
use crate::sft::data::{to_tensors, Example};
use crate::trainee::{Learner, LearnerSpec, LearnerState};
use crate::{device, NewestPolicy, OrStageError};
use critic::{CriticSnapshot, PpoCritic};
use hone_models::batches::Batches;
use hone_models::checkpoint;
use hone_models::gpt::Gpt;
use hone_models::lora::LoraConfig;
use hone_models::policy_gradient::clipped_surrogate;
use hone_models::ppo::{
    clipped_value_loss, exact_kl, explained_variance, gae, mean_std, token_rewards, whiten,
    KlController, KlEstimator, RunningMoments,
};
use hone_models::train::clip_grad_norm;
use hone_models::{DType, Device, Tensor};
use hone_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PpoConfig {
    score: String,
    kl_estimator: String,
    beta: f64,
    target_kl: f64,
    horizon: f64,
    gamma: f64,
    lam: f64,
    clip: f64,
    value_clip: f64,
    vf_coef: f64,
    whiten_advantages: bool,
    normalize_reward: bool,
    reward_clip: f64,
    missing_eos_penalty: f64,
    epochs: usize,
    batch_size: usize,
    early_stop_kl: f64,
    lr: f64,
    critic_lr: f64,
    critic_warmup: usize,
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

/// Updates the policy that sampled a round's completions, with a critic.
pub struct Ppo {
    config: PpoConfig,
    estimator: KlEstimator,
    device: Device,
    input: RoundInput,
    policy: NewestPolicy,
    /// Optional: the reference model, for the exact KL metric.
    reference: NewestPolicy,
    /// The policy in training and its optimizer, kept across rounds.
    trainee: Option<Learner>,
    critic: Option<PpoCritic>,
    kl: KlController,
    moments: RunningMoments,
    /// Where the run's artifacts are, for restoring a snapshot.
    run_dir: std::path::PathBuf,
    /// SmolLM2 policies: LoRA adapters instead of the top layers' weights.
    lora: Option<LoraConfig>,
    /// Seeds the LoRA adapters' start.
    lora_seed: u64,
}

/// Everything lm.ppo carries from one round to the next, as its snapshot
/// holds it.
#[derive(Serialize, Deserialize)]
struct PpoState {
    policy: Option<ArtifactRef>,
    reference: Option<ArtifactRef>,
    trainee: Option<LearnerState>,
    critic: Option<CriticSnapshot>,
    kl: KlController,
    moments: RunningMoments,
}

impl StageFactory for Ppo {
    fn descriptor() -> StageDescriptor {
        let (count, size) = (
            FieldType::unsigned(),
            FieldType::positive().at_most(1 << 20),
        );
        let d = StageDescriptor::new(
            "lm.ppo",
            "PPO on the policy's own samples with a critic (a separate model of the policy's shape \
             with a value head, started from the policy's weights and kept across rounds; for a \
             SmolLM2 policy, copies of its top train_layers layers on its frozen layers' states). Per \
             completion (lm.rollout, then lm.logprobs for ref_logprobs): per-token rewards -beta * \
             KL (`kl_estimator` k1 or k3, against ref_logprobs) plus its `score` Score on the last \
             token (less missing_eos_penalty when it did not end with EOS; optionally normalised by \
             running statistics and clipped), then GAE(gamma, lam) with the critic's values, \
             advantages whitened, and `epochs` passes over mini-batches of the clipped surrogate \
             (clip) and the clipped value loss (value_clip, weighted vf_coef), stopping early when \
             the approximate KL to the sampler passes early_stop_kl. beta is fixed, or adapted \
             towards target_kl (nats per sequence) over `horizon` samples. Wire `reference` (the \
             SFT policy; hone's GPT only) to also log the exact KL. Emits the updated `policy` (final/) for a \
             feedback edge to lm.rollout, and registers the critic (critic/). Metrics: reward, \
             reward_std, kl (k1 sum per sequence), kl_k3, kl_exact (with `reference`), beta, \
             entropy, clip_fraction, approx_kl, value_loss, value_clip_fraction, \
             explained_variance, policy_loss, response_length, no_eos, epochs_run, unscored, and the \
             wall time of its phases: values_seconds (the critic's forward), exact_kl_seconds, \
             update_seconds.",
        )
        .input("completions", RecordKind::Completion)
        .input("scores", RecordKind::Score)
        .input("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .input("reference", RecordKind::Artifact(ArtifactKind::Policy))
        .output("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .optional("score", FieldType::String, "proxy_reward", "The `name` of the Scores that are the reward.")
        .optional("kl_estimator", FieldType::one_of(&["k1", "k3"]), "k1", "Per-token KL estimate in the reward: k1 = logp - ref (unbiased, can be negative), k3 (never negative).")
        .optional("beta", FieldType::Float, 0.05, "KL coefficient (the start, when target_kl adapts it).")
        .optional("target_kl", FieldType::Float, 0.0, "Adaptive KL: the sequence KL (nats) to steer beta towards; 0 keeps beta fixed.")
        .optional("horizon", FieldType::Float, 10000.0, "Adaptive KL: the number of samples over which beta adapts.")
        .optional("gamma", FieldType::Float, 1.0, "GAE discount, in [0, 1].")
        .optional("lam", FieldType::Float, 0.95, "GAE lambda, in [0, 1].")
        .optional("clip", FieldType::Float, 0.2, "epsilon of the clipped surrogate, in (0, 1).")
        .optional("value_clip", FieldType::Float, 0.2, "How far a value may move from the rollout's in one round, above 0.")
        .optional("vf_coef", FieldType::Float, 0.1, "Weight of the value loss, above 0. The critic has its own AdamW, which is blind to a gradient's scale: vf_coef only changes how soon the critic's max_grad_norm clip bites.")
        .optional("whiten_advantages", FieldType::Bool, true, "Whiten the advantages over the round's tokens.")
        .optional("normalize_reward", FieldType::Bool, false, "Normalise scores by the running mean and std of every round so far.")
        .optional("reward_clip", FieldType::Float, 0.0, "Clip (normalised) scores to [-c, c]; 0 = no clip.")
        .optional("missing_eos_penalty", FieldType::Float, 0.0, "Subtracted from the score of a completion that did not end with EOS (cut at max_new_tokens); 0 = none.")
        .optional("epochs", size.clone(), 4, "PPO epochs over the round's completions.")
        .optional("batch_size", size.clone(), 8, "Completions per mini-batch (one optimiser step each).")
        .optional("early_stop_kl", FieldType::Float, 0.0, "Stop the round's epochs once a mini-batch's approximate KL (per token, to the sampler) exceeds this; 0 = never.")
        .optional("lr", FieldType::Float, 1e-4, "Policy learning rate (AdamW, constant).")
        .optional("critic_lr", FieldType::Float, 1e-4, "Critic learning rate (AdamW, constant).")
        .optional("critic_warmup", FieldType::unsigned().at_most(1000), 0, "In the critic's first round, this many epochs of value-only steps (on the samples' Monte-Carlo returns) before the values are taken for GAE, so the first policy update does not learn from an untrained critic (OpenRLHF's freezing_actor_steps); 0 = none.")
        .optional("max_grad_norm", FieldType::Float, 1.0, "Gradient-norm clip, for the policy and the critic each.")
        .optional("max_new_tokens", size, 64, "lm.rollout's max_new_tokens: it fixes how rollout cut each prompt (so the ratio starts at 1).")
        .optional("seed", count, 0, "Seed of the mini-batch order and the value head's start, combined with the pipeline seed.")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.");
        crate::trainee::learner_options(d)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: PpoConfig = init.config()?;
        crate::check_pretrained(&config.pretrained, "train")?;
        let lora = crate::trainee::learner_lora(
            config.lora_rank,
            config.lora_alpha,
            &config.lora_targets,
        )?;
        let lora_seed = config.seed ^ init.seed ^ 0x10_4a;
        let estimator = KlEstimator::parse(&config.kl_estimator).ok_or_else(|| {
            StageError::config(
                "kl_estimator",
                format!("unknown estimator `{}`", config.kl_estimator),
            )
        })?;
        let within = |name: &str, v: f64, ok: bool, rule: &str| {
            if ok && v.is_finite() {
                Ok(())
            } else {
                Err(StageError::config(
                    name,
                    format!("must be {rule}, found {v}"),
                ))
            }
        };
        let c = &config;
        within("clip", c.clip, c.clip > 0.0 && c.clip < 1.0, "in (0, 1)")?;
        within("value_clip", c.value_clip, c.value_clip > 0.0, "above 0")?;
        within("vf_coef", c.vf_coef, c.vf_coef > 0.0, "above 0")?;
        within("beta", c.beta, c.beta >= 0.0, "0 or more")?;
        within(
            "target_kl",
            c.target_kl,
            c.target_kl >= 0.0,
            "0 (fixed beta) or more",
        )?;
        if c.target_kl > 0.0 && c.beta == 0.0 {
            return Err(StageError::config(
                "beta",
                "must be above 0 when target_kl adapts it: the controller multiplies beta, so it \
                 never leaves 0",
            ));
        }
        within("horizon", c.horizon, c.horizon > 0.0, "above 0")?;
        within(
            "gamma",
            c.gamma,
            (0.0..=1.0).contains(&c.gamma),
            "in [0, 1]",
        )?;
        within("lam", c.lam, (0.0..=1.0).contains(&c.lam), "in [0, 1]")?;
        within(
            "reward_clip",
            c.reward_clip,
            c.reward_clip >= 0.0,
            "0 (none) or more",
        )?;
        within(
            "early_stop_kl",
            c.early_stop_kl,
            c.early_stop_kl >= 0.0,
            "0 (never) or more",
        )?;
        within("lr", c.lr, c.lr > 0.0, "above 0")?;
        within("critic_lr", c.critic_lr, c.critic_lr > 0.0, "above 0")?;
        within(
            "missing_eos_penalty",
            c.missing_eos_penalty,
            true,
            "a number",
        )?;
        let device = device(&config.device)?;
        let kl = KlController {
            beta: config.beta,
            target: (config.target_kl > 0.0).then_some(config.target_kl),
            horizon: config.horizon,
        };
        Ok(Ppo {
            config,
            estimator,
            device,
            input: RoundInput::default(),
            policy: NewestPolicy::new("policy", "policy", "policy"),
            reference: NewestPolicy::new("reference", "reference", "reference policy"),
            trainee: None,
            critic: None,
            kl,
            moments: RunningMoments::default(),
            run_dir: init.run_dir.clone(),
            lora,
            lora_seed,
        })
    }
}

impl Stage for Ppo {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        let critic = self
            .critic
            .as_ref()
            .map(PpoCritic::state)
            .transpose()
            .or_stage("cannot snapshot the critic")?;
        let state = PpoState {
            policy: self.policy.newest.clone(),
            reference: self.reference.newest.clone(),
            trainee: self.trainee.as_ref().map(Learner::state).transpose()?,
            critic,
            kl: self.kl.clone(),
            moments: self.moments.clone(),
        };
        hone_sdk::snapshot::encode("lm.ppo", &state).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        let state: PpoState = hone_sdk::snapshot::decode("lm.ppo", round, snapshot)?;
        let spec = self.spec(&self.run_dir);
        self.trainee = state
            .trainee
            .map(|t| Learner::from_state(t, &spec))
            .transpose()?;
        self.critic = state
            .critic
            .map(|s| PpoCritic::from_state(&s, &self.device, self.config.critic_lr))
            .transpose()?;
        self.policy.newest = state.policy;
        self.reference.newest = state.reference;
        self.kl = state.kl;
        self.moments = state.moments;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        self.policy.offer_all(&mut input, 2)?;
        self.reference.offer_all(&mut input, 3)?;
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

/// One completion with what PPO computed for it before the update.
struct Sample {
    sampled: Sampled,
    /// The reward of each response token: -beta KL, and the score on the last.
    rewards: Vec<f32>,
    /// The critic's values of the response's states at rollout time.
    values: Vec<f32>,
    advantages: Vec<f32>,
    returns: Vec<f32>,
}

/// Sums over one mini-batch, for the round's metrics.
#[derive(Default)]
struct StepStats {
    policy_loss: f64,
    value_loss: f64,
    clipped: f64,
    value_clipped: f64,
    approx_kl: f64,
    entropy: f64,
}

impl Ppo {
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
        if let (Learner::Chat(_), Some(reference)) = (&trainee, &self.reference.newest) {
            return Err(StageError::new(format!(
                "`reference` ({}) is wired, but the exact KL is computed for hone's GPT policies \
                 only, and this policy is a SmolLM2: leave `reference` unwired (the kl and kl_k3 \
                 metrics estimate the KL from the samples' ref_logprobs)",
                reference.id
            )));
        }
        let result = self
            .ensure_critic(ctx, &trainee)
            .and_then(|()| self.learn(ctx, &mut trainee, completions, rewards));
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

    /// One round's update of `trainee` (and the critic).
    fn learn(
        &mut self,
        ctx: &mut Context,
        trainee: &mut Learner,
        completions: Vec<Completion>,
        rewards: &BTreeMap<String, f64>,
    ) -> Result<(), StageError> {
        let policy = trainee.artifact().cloned();
        let needs_reference = self.config.beta > 0.0 || self.kl.target.is_some();
        let (c, estimator) = (&self.config, self.estimator);
        let stop_ids = trainee.stop_ids();

        // Completions with their scores; one without a score is counted.
        let (mut scored, mut unscored, mut no_eos) = (Vec::new(), 0u64, 0u64);
        for comp in completions {
            let Some(&raw) = rewards.get(&comp.id) else {
                unscored += 1;
                continue;
            };
            check_completion(&comp, needs_reference)?;
            trainee.check_sampler(&comp, &c.pretrained, "lm.ppo")?;
            let ended = comp.token_ids.last().is_some_and(|t| stop_ids.contains(t));
            no_eos += u64::from(!ended);
            let sampled = trainee.sampled(&comp, c.max_new_tokens)?;
            if sampled.tokens() > 0 {
                scored.push((sampled, raw, ended));
            }
        }
        ctx.metric("unscored", unscored as f64);
        if scored.is_empty() {
            return Ok(());
        }
        let n = scored.len();
        ctx.metric("no_eos", no_eos as f64 / n as f64);
        let raw: Vec<f32> = scored.iter().map(|(_, r, _)| *r as f32).collect();
        let (mean, std) = mean_std(&raw);
        ctx.metric("reward", mean);
        ctx.metric("reward_std", std);
        // The scores PPO optimises: less the missing-EOS penalty, then (with
        // normalize_reward) in units of every round's penalised scores so far.
        let penalised: Vec<f64> = scored
            .iter()
            .map(|(_, r, ended)| {
                if *ended {
                    *r
                } else {
                    r - c.missing_eos_penalty
                }
            })
            .collect();
        if c.normalize_reward {
            self.moments.extend(penalised.iter().copied());
        }
        let beta = self.kl.beta;
        ctx.metric("beta", beta);

        // Values at rollout time, then rewards, GAE and returns.
        let critic = self.critic.as_ref().expect("ensured above");
        let mut samples = Vec::with_capacity(n);
        let (mut kl_k1, mut kl_k3) = (0.0, 0.0);
        let chunk: Vec<&Sampled> = scored.iter().map(|(s, _, _)| s).collect();
        // Wall time of each phase, so a round's time can be split (the
        // benchmark in docs/benchmarks.md reads these).
        let clock = std::time::Instant::now();
        let values = self
            .values(critic, trainee, &chunk)
            .or_stage("cannot compute the critic's values")?;
        ctx.metric("values_seconds", clock.elapsed().as_secs_f64());
        for (((sampled, _, _), values), mut score) in scored.into_iter().zip(values).zip(penalised)
        {
            if c.normalize_reward {
                score = self.moments.normalise(score);
            }
            if c.reward_clip > 0.0 {
                score = score.clamp(-c.reward_clip, c.reward_clip);
            }
            let reference: Vec<f32> = if sampled.reference.len() == sampled.tokens() {
                sampled.reference.clone()
            } else {
                sampled.old.clone()
            };
            kl_k1 += sampled
                .old
                .iter()
                .zip(&reference)
                .map(|(&o, &r)| f64::from(KlEstimator::K1.per_token(o, r)))
                .sum::<f64>();
            kl_k3 += sampled
                .old
                .iter()
                .zip(&reference)
                .map(|(&o, &r)| f64::from(KlEstimator::K3.per_token(o, r)))
                .sum::<f64>();
            let token_rewards = token_rewards(
                score as f32,
                &sampled.old,
                &reference,
                beta as f32,
                estimator,
            );
            let (advantages, returns) = gae(&token_rewards, &values, c.gamma as f32, c.lam as f32)
                .or_stage("GAE failed")?;
            samples.push(Sample {
                sampled,
                rewards: token_rewards,
                values,
                advantages,
                returns,
            });
        }
        self.warm_up_critic(ctx, trainee, &mut samples)?;
        let (kl_k1, kl_k3) = (kl_k1 / n as f64, kl_k3 / n as f64);
        ctx.metric("kl", kl_k1);
        ctx.metric("kl_k3", kl_k3);
        let clock = std::time::Instant::now();
        if let Learner::Gpt(t) = &*trainee {
            if let Some(kl) = self.exact_kl(ctx, &t.gpt, &samples, t.tok.pad_id())? {
                ctx.metric("kl_exact", kl);
                ctx.metric("exact_kl_seconds", clock.elapsed().as_secs_f64());
            }
        }
        let all = |f: fn(&Sample) -> &Vec<f32>| -> Vec<f32> {
            samples.iter().flat_map(|s| f(s).iter().copied()).collect()
        };
        ctx.metric(
            "explained_variance",
            explained_variance(&all(|s| &s.values), &all(|s| &s.returns)),
        );
        let tokens: usize = samples.iter().map(|s| s.sampled.tokens()).sum();
        ctx.metric("response_length", tokens as f64 / n as f64);
        if self.config.whiten_advantages {
            let mut flat = all(|s| &s.advantages);
            whiten(&mut flat);
            let mut rest = &flat[..];
            for s in &mut samples {
                let (mine, tail) = rest.split_at(s.advantages.len());
                s.advantages.copy_from_slice(mine);
                rest = tail;
            }
        }

        let mut critic = self.critic.take().expect("ensured before");
        let clock = std::time::Instant::now();
        let optimised = self.optimise(ctx, trainee, &mut critic, &samples);
        self.critic = Some(critic);
        let (steps, stats) = optimised?;
        ctx.metric("update_seconds", clock.elapsed().as_secs_f64());
        let per = |x: f64| x / steps.max(1) as f64;
        ctx.metric("policy_loss", per(stats.policy_loss));
        ctx.metric("value_loss", per(stats.value_loss));
        ctx.metric("clip_fraction", per(stats.clipped));
        ctx.metric("value_clip_fraction", per(stats.value_clipped));
        ctx.metric("approx_kl", per(stats.approx_kl));
        ctx.metric("entropy", per(stats.entropy));
        let batches_per_epoch = n.div_ceil(self.config.batch_size);
        let epochs_run = steps as f64 / batches_per_epoch as f64;
        ctx.metric("epochs_run", epochs_run);
        self.kl.update(kl_k1, n);
        ctx.log(format!(
            "ppo on {n} completions ({steps} steps, {epochs_run:.2} epochs): reward {mean:.4} \
             (std {std:.4}), kl {kl_k1:.4} (k3 {kl_k3:.4}), beta {beta:.4} -> {:.4}, clip fraction \
             {:.3}, value loss {:.4}, entropy {:.3}",
            self.kl.beta,
            per(stats.clipped),
            per(stats.value_loss),
            per(stats.entropy),
        ));
        self.save(ctx, policy.as_ref(), trainee, n)
    }

    /// In the critic's first round (it has taken no step), `critic_warmup`
    /// epochs of value-only steps towards each sample's Monte-Carlo return
    /// (the sum of its rewards to go, which needs no values), then fresh
    /// values, advantages and returns from the warmed critic. The policy does
    /// not move. Metrics: critic_warmup_loss (first and last step, by step),
    /// explained_variance_before_warmup.
    fn warm_up_critic(
        &mut self,
        ctx: &mut Context,
        trainee: &Learner,
        samples: &mut [Sample],
    ) -> Result<(), StageError> {
        let c = &self.config;
        let mut critic = self.critic.take().expect("ensured before");
        if c.critic_warmup == 0 || critic.opt.steps() > 0 || samples.is_empty() {
            self.critic = Some(critic);
            return Ok(());
        }
        let all = |samples: &[Sample], f: fn(&Sample) -> &Vec<f32>| -> Vec<f32> {
            samples.iter().flat_map(|s| f(s).iter().copied()).collect()
        };
        ctx.metric(
            "explained_variance_before_warmup",
            explained_variance(&all(samples, |s| &s.values), &all(samples, |s| &s.returns)),
        );
        let failed = "critic warm-up failed";
        let mut targets = Vec::with_capacity(samples.len());
        for s in samples.iter() {
            let zeros = vec![0.0; s.rewards.len()];
            targets.push(
                gae(&s.rewards, &zeros, c.gamma as f32, 1.0)
                    .or_stage(failed)?
                    .1,
            );
        }
        let critic_vars = critic.vars();
        let seed = c.seed ^ ctx.init().seed ^ ctx.round() ^ 0xc417_0a11;
        let mut order = Batches::new(samples.iter().map(|s| s.sampled.id.clone()).collect(), seed);
        let d = &self.device;
        let mut step = 0u64;
        for _ in 0..c.critic_warmup {
            for batch in order.epoch(c.batch_size) {
                let examples: Vec<Example> = batch
                    .iter()
                    .map(|&i| samples[i].sampled.example.clone())
                    .collect();
                let chosen: Vec<(&Sample, &Vec<f32>)> =
                    batch.iter().map(|&i| (&samples[i], &targets[i])).collect();
                let run = || -> hone_models::Result<(Tensor, f32)> {
                    let (_, _, mask) = to_tensors(&examples, 0, d)?;
                    let (_, t) = mask.dims2()?;
                    let returns = lay(&chosen, t, d, |(s, r)| (s.sampled.first, &r[..]))?;
                    let values = critic.values(trainee, &examples, d)?;
                    let tokens = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
                    let loss = ((((values - returns)?.sqr()? * 0.5)? * &mask)?.sum_all()?
                        / f64::from(tokens))?;
                    let value = loss.to_scalar::<f32>()?;
                    Ok((loss, value))
                };
                let (loss, value) = run().or_stage(failed)?;
                let mut grads = loss.backward().or_stage(failed)?;
                clip_grad_norm(&mut grads, &critic_vars, c.max_grad_norm).or_stage(failed)?;
                critic.opt.step(&grads).or_stage(failed)?;
                step += 1;
                ctx.metric_at("critic_warmup_loss", f64::from(value), step);
            }
        }
        // The values GAE needs, from the warmed critic.
        let chunk: Vec<&Sampled> = samples.iter().map(|s| &s.sampled).collect();
        let values = self.values(&critic, trainee, &chunk).or_stage(failed)?;
        self.critic = Some(critic);
        for (s, v) in samples.iter_mut().zip(values) {
            let (advantages, returns) =
                gae(&s.rewards, &v, c.gamma as f32, c.lam as f32).or_stage(failed)?;
            (s.values, s.advantages, s.returns) = (v, advantages, returns);
        }
        ctx.log(format!(
            "critic warm-up: {step} value-only steps before the first policy update"
        ));
        Ok(())
    }

    /// Starts the critic from the policy's weights (and a seeded value
    /// head) the first time; later rounds keep training the same critic.
    fn ensure_critic(&mut self, ctx: &Context, trainee: &Learner) -> Result<(), StageError> {
        if let Some(critic) = &self.critic {
            return critic.check_fits(trainee);
        }
        let seed = self.config.seed ^ ctx.init().seed ^ 0x5eed_c417;
        self.critic = Some(PpoCritic::for_learner(
            trainee,
            &self.device,
            self.config.critic_lr,
            seed,
        )?);
        Ok(())
    }

    /// The critic's values of each sample's response states (no gradient),
    /// in forward passes of `batch_size` samples.
    fn values(
        &self,
        critic: &PpoCritic,
        trainee: &Learner,
        samples: &[&Sampled],
    ) -> hone_models::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(samples.len());
        for batch in samples.chunks(self.config.batch_size) {
            let examples: Vec<Example> = batch.iter().map(|s| s.example.clone()).collect();
            let v = critic
                .values(trainee, &examples, &self.device)?
                .detach()
                .to_vec2::<f32>()?;
            out.extend(
                batch
                    .iter()
                    .zip(v)
                    .map(|(s, row)| row[s.first..s.first + s.tokens()].to_vec()),
            );
        }
        Ok(out)
    }

    /// The exact KL(π_old‖π_ref) per sequence, summed over its tokens and
    /// averaged, when a reference is wired.
    fn exact_kl(
        &mut self,
        ctx: &Context,
        gpt: &Gpt,
        samples: &[Sample],
        pad: u32,
    ) -> Result<Option<f64>, StageError> {
        if self.reference.newest.is_none() {
            return Ok(None);
        }
        self.reference.load(ctx, &self.device)?;
        let (_, reference, _) = self.reference.get().expect("loaded above");
        let mut total = 0.0;
        let mut run = || -> hone_models::Result<f64> {
            for batch in samples.chunks(self.config.batch_size) {
                let examples: Vec<Example> =
                    batch.iter().map(|s| s.sampled.example.clone()).collect();
                let (x, _, mask) = to_tensors(&examples, pad, &self.device)?;
                let kl = exact_kl(&gpt.forward(&x)?, &reference.forward(&x)?)?;
                total += f64::from((kl * mask)?.sum_all()?.to_scalar::<f32>()?);
            }
            Ok(total / samples.len() as f64)
        };
        run().or_stage("cannot compute the exact KL").map(Some)
    }

    /// `epochs` passes of mini-batches, stopping early on the approximate
    /// KL; returns the steps taken and the sums of their statistics.
    fn optimise(
        &self,
        ctx: &mut Context,
        trainee: &mut Learner,
        critic: &mut PpoCritic,
        samples: &[Sample],
    ) -> Result<(usize, StepStats), StageError> {
        let c = &self.config;
        let policy_vars = trainee.vars();
        let critic_vars = critic.vars();
        let seed = c.seed ^ ctx.init().seed ^ ctx.round();
        let mut order = Batches::new(samples.iter().map(|s| s.sampled.id.clone()).collect(), seed);
        let steps = c.epochs * samples.len().div_ceil(c.batch_size);
        let mut stats = StepStats::default();
        let failed = "PPO step failed";
        // Each epoch visits every sample once; the last batch of an epoch is
        // smaller when batch_size does not divide the samples.
        let batches = (0..c.epochs).flat_map(|_| order.epoch(c.batch_size));
        for (step, batch) in (1..).zip(batches) {
            let batch: Vec<&Sample> = batch.into_iter().map(|i| &samples[i]).collect();
            let (loss, s) = self.loss(trainee, critic, &batch).or_stage(failed)?;
            let mut grads = loss.backward().or_stage(failed)?;
            clip_grad_norm(&mut grads, &policy_vars, c.max_grad_norm).or_stage(failed)?;
            clip_grad_norm(&mut grads, &critic_vars, c.max_grad_norm).or_stage(failed)?;
            let policy_steps = trainee.step(&grads).or_stage(failed)?;
            critic.opt.step(&grads).or_stage(failed)?;
            let value = f64::from(loss.to_scalar::<f32>().or_stage(failed)?);
            ctx.metric_at("step_loss", value, policy_steps);
            let stop = c.early_stop_kl > 0.0 && s.approx_kl > c.early_stop_kl;
            stats.policy_loss += s.policy_loss;
            stats.value_loss += s.value_loss;
            stats.clipped += s.clipped;
            stats.value_clipped += s.value_clipped;
            stats.approx_kl += s.approx_kl;
            stats.entropy += s.entropy;
            if stop {
                ctx.log(format!(
                    "early stop at step {step} of {steps}: approx KL {:.4} > {}",
                    s.approx_kl, c.early_stop_kl
                ));
                return Ok((step, stats));
            }
        }
        Ok((steps, stats))
    }

    /// One mini-batch's loss (policy surrogate + vf_coef · value loss, each
    /// a mean over the batch's response tokens) and its statistics.
    fn loss(
        &self,
        trainee: &Learner,
        critic: &PpoCritic,
        batch: &[&Sample],
    ) -> hone_models::Result<(Tensor, StepStats)> {
        let c = &self.config;
        let examples: Vec<Example> = batch.iter().map(|s| s.sampled.example.clone()).collect();
        let (logp, mask, entropy) = trainee.token_logprobs_entropy(&examples, &self.device)?;
        let (_, t) = mask.dims2()?;
        let d = &self.device;
        let at = |s: &&Sample| s.sampled.first;
        let old = lay(batch, t, d, |s| (at(s), &s.sampled.old[..]))?;
        let advantages = lay(batch, t, d, |s| (at(s), &s.advantages[..]))?;
        let returns = lay(batch, t, d, |s| (at(s), &s.returns[..]))?;
        let old_values = lay(batch, t, d, |s| (at(s), &s.values[..]))?;
        let tokens = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
        let mean = |x: &Tensor| -> hone_models::Result<Tensor> {
            Ok(((x * &mask)?.sum_all()? / f64::from(tokens))?)
        };
        let policy_loss = mean(&clipped_surrogate(&logp, &old, &advantages, c.clip)?)?;
        let values = critic.values(trainee, &examples, &self.device)?;
        let (value_loss, value_clipped) =
            clipped_value_loss(&values, &old_values, &returns, c.value_clip)?;
        let value_loss = mean(&value_loss)?;
        let loss = (&policy_loss + (&value_loss * c.vf_coef)?)?;
        // Diagnostics, without gradient.
        let log_ratio = (logp.detach() - &old)?;
        let ratio = log_ratio.exp()?;
        // Where the clipped term is the one in force (TRL's pg_clipfrac):
        // ratio past 1 + ε with a positive advantage, or under 1 − ε with a
        // negative one. Ratios outside the band that the min ignores do not
        // count.
        let up = (ratio.gt(1.0 + c.clip)?.to_dtype(DType::F32)?
            * advantages.gt(0.0)?.to_dtype(DType::F32)?)?;
        let down = (ratio.lt(1.0 - c.clip)?.to_dtype(DType::F32)?
            * advantages.lt(0.0)?.to_dtype(DType::F32)?)?;
        let outside = (up + down)?;
        // (ρ − 1) − log ρ: the k3 estimate of KL(π_old‖π), never negative.
        let approx = ((&ratio - 1.0)? - &log_ratio)?;
        let scalar = |x: Tensor| -> hone_models::Result<f64> {
            Ok(f64::from(mean(&x)?.to_scalar::<f32>()?))
        };
        let stats = StepStats {
            policy_loss: f64::from(policy_loss.to_scalar::<f32>()?),
            value_loss: f64::from(value_loss.to_scalar::<f32>()?),
            clipped: scalar(outside)?,
            value_clipped: scalar(value_clipped)?,
            approx_kl: scalar(approx)?,
            entropy,
        };
        Ok((loss, stats))
    }

    /// Writes the policy (emitted) and the critic (registered) to this
    /// round's output directory; the trainee becomes the emitted artifact.
    fn save(
        &self,
        ctx: &mut Context,
        policy: Option<&ArtifactRef>,
        trainee: &mut Learner,
        n: usize,
    ) -> Result<(), StageError> {
        let c = &self.config;
        let out = ctx.output_dir()?.join("final");
        trainee.save(&out)?;
        let from = policy.map_or_else(|| c.pretrained.clone(), |a| a.id.clone());
        let mut lineage = vec![format!("ppo from {from}")];
        if let Learner::Chat(_) = trainee {
            lineage.push(crate::tuned_llama::base_lineage(
                c.train_layers,
                self.lora.as_ref(),
            ));
        }
        lineage.push(format!(
            "lm.ppo round {}: {n} completions, {} beta {} (target {}), gamma {} lam {}, clip {}, \
             value clip {}, epochs {}, {} optimizer steps in all",
            ctx.round(),
            c.kl_estimator,
            c.beta,
            c.target_kl,
            c.gamma,
            c.lam,
            c.clip,
            c.value_clip,
            c.epochs,
            trainee.steps()
        ));
        let parents: Vec<String> = policy.iter().map(|a| a.id.clone()).collect();
        let artifact = ctx.register_artifact(
            "policy",
            &out.join(checkpoint::WEIGHTS),
            parents.clone(),
            lineage,
        )?;
        let critic = self.critic.as_ref().expect("ensured before");
        let critic_dir = ctx.output_dir()?.join("critic");
        critic.save(&critic_dir, trainee)?;
        ctx.register_artifact(
            "critic",
            &critic_dir.join(checkpoint::WEIGHTS),
            parents,
            vec![format!("lm.ppo critic, round {}", ctx.round())],
        )?;
        trainee.set_artifact(artifact.clone());
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }
}

/// A completion PPO can learn from: sampled token ids with their log-probs,
/// and the reference's when the KL penalty needs them.
fn check_completion(comp: &Completion, needs_reference: bool) -> Result<(), StageError> {
    if comp.token_ids.is_empty() || comp.token_ids.len() != comp.token_logprobs.len() {
        return Err(StageError::new(format!(
            "completion {} has {} token ids for {} token log-probs: lm.ppo learns from lm.rollout's \
             samples, which record both",
            comp.id,
            comp.token_ids.len(),
            comp.token_logprobs.len()
        )));
    }
    if needs_reference && comp.ref_logprobs.len() != comp.token_ids.len() {
        return Err(StageError::config(
            "beta",
            format!(
                "the KL penalty needs each completion's ref_logprobs, and {} has none: put an \
                 lm.logprobs stage (reference = the SFT policy) between lm.rollout and this one, or \
                 set beta = 0 and target_kl = 0 (no KL penalty)",
                comp.id
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_smollm;
