//! `lm.sft`: supervised fine-tuning of a causal LM on demonstrations, with
//! the next-token loss masked to the responses.

pub(crate) mod data;
#[cfg(test)]
pub(crate) mod tests;

use crate::{device, OrStageError};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use data::{prepare, to_tensors, Demo, Example};
use hone_models::checkpoint;
use hone_models::gpt::{init_seeded, Gpt, GptConfig};
use hone_models::tokenizer::{load_tokenizer, ByteTokenizer, Tokenizer};
use hone_models::train::{accumulate, check_shape, clip_grad_norm, lr_at, masked_lm_loss, Shape};
use hone_models::{DType, Device, Var, VarBuilder, VarMap};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::path::PathBuf;

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
}

/// Fine-tunes a policy on demonstrations.
pub struct Sft {
    config: SftConfig,
    /// The checkpoint to start from; `None` = a fresh model.
    init_dir: Option<PathBuf>,
    device: Device,
    demos: Vec<Demo>,
    ignored: u64,
}

impl StageFactory for Sft {
    fn descriptor() -> StageDescriptor {
        let count = FieldType::unsigned();
        let size = FieldType::positive().at_most(1 << 20);
        let float = FieldType::Float;
        StageDescriptor::new(
            "lm.sft",
            "Supervised fine-tuning of a byte-level GPT on demonstrations (pairs: prompt + chosen; completions: \
             prompt + text), loss masked to the responses; emits checkpoints as policy artifacts.",
        )
        .input("demos", RecordKind::Any)
        .output("policy", RecordKind::Artifact(ArtifactKind::Policy))
        .optional("init", FieldType::String, "scratch", "`scratch` for a fresh model shaped by d_model..context, or the directory of a policy \
            checkpoint (relative to the run directory, e.g. `outputs/sft/final`), whose shape is then kept. Each round starts from it.")
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
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: SftConfig = init.config()?;
        let device = device(&config.device)?;
        let shape = Shape::new(
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.context,
        );
        let positive = [
            ("steps", config.steps),
            ("batch_size", config.batch_size),
            ("grad_accum", config.grad_accum),
        ];
        check_shape(shape, &positive, config.eval_fraction)
            .map_err(|(field, message)| StageError::config(field, message))?;
        let init_dir = match config.init.as_str() {
            "scratch" => None,
            path => {
                let dir = init.run_dir.join(path);
                crate::refuse_llama(&dir, &dir.display().to_string())
                    .map_err(|e| StageError::config("init", e.message))?;
                checkpoint::load_config::<GptConfig>(&dir).map_err(|e| {
                    StageError::config(
                        "init",
                        format!("not a policy checkpoint ({e}): give \"scratch\" or a directory written by lm.sft"),
                    )
                })?;
                Some(dir)
            }
        };
        Ok(Sft {
            config,
            init_dir,
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

/// A model being trained and what it needs besides the weights.
struct Model {
    gpt: Gpt,
    varmap: VarMap,
    tok: Box<dyn Tokenizer>,
}

impl Sft {
    fn seed(&self, ctx: &Context) -> u64 {
        self.config.seed ^ ctx.init().seed
    }

    fn initial_model(&self, seed: u64) -> Result<Model, StageError> {
        let Some(dir) = &self.init_dir else {
            let c = &self.config;
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
            return Ok(Model {
                gpt,
                varmap,
                tok: Box::new(ByteTokenizer),
            });
        };
        let doing = format!("cannot load the init checkpoint {}", dir.display());
        let (gpt, varmap) = checkpoint::load_gpt(dir, &self.device).or_stage(&doing)?;
        let tok = load_tokenizer(dir).or_stage(&doing)?;
        Ok(Model { gpt, varmap, tok })
    }

    fn train(&self, ctx: &mut Context, demos: Vec<Demo>) -> Result<(), StageError> {
        let c = &self.config;
        let seed = self.seed(ctx);
        let model = self.initial_model(seed)?;
        let context = model.gpt.config().context;
        let (mut batches, eval) =
            prepare(&demos, model.tok.as_ref(), context, seed, c.eval_fraction);
        let vars = model.varmap.all_vars();
        let params: usize = vars.iter().map(|v| v.elem_count()).sum();
        ctx.log(format!(
            "training {params} parameters for {} steps on {} demos ({} held out), from {}",
            c.steps,
            batches.len(),
            eval.len(),
            c.init
        ));
        let adamw = ParamsAdamW {
            lr: c.lr,
            weight_decay: c.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), adamw).or_stage("cannot create the optimiser")?;
        let pad = model.tok.pad_id();
        let evaluate = |ctx: &mut Context, step: usize| -> Result<Option<f64>, StageError> {
            if eval.is_empty() {
                return Ok(None);
            }
            let loss = eval_loss(&model.gpt, &eval, c.batch_size, pad, &self.device)
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
            let loss = train_step(
                &model.gpt,
                &vars,
                &mut opt,
                &micro,
                pad,
                c.clip,
                &self.device,
            )
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

    /// Saves the model into `OUTPUT_DIR/[round-R/]NAME/`, registers it and
    /// emits it on the `policy` port.
    fn checkpoint(
        &self,
        ctx: &mut Context,
        model: &Model,
        name: &str,
        step: usize,
    ) -> Result<(), StageError> {
        let dir = ctx.output_dir()?.join(name);
        checkpoint::save(&dir, &model.varmap, model.gpt.config(), model.tok.as_ref())
            .or_stage(&format!("cannot write checkpoint {}", dir.display()))?;
        let origin = match self.init_dir {
            None => "init: scratch".to_string(),
            Some(_) => format!("fine-tuned from {}", self.config.init),
        };
        let lineage = vec![origin, format!("lm.sft step {step}")];
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
    gpt: &Gpt,
    vars: &[Var],
    opt: &mut AdamW,
    micro: &[Vec<Example>],
    pad: u32,
    clip: f64,
    device: &Device,
) -> hone_models::Result<f64> {
    let mut grads = None;
    let mut total = 0.0;
    for batch in micro {
        let (x, y, mask) = to_tensors(batch, pad, device)?;
        let loss = masked_lm_loss(&gpt.forward(&x)?, &y, &mask)?;
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
    gpt: &Gpt,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
    device: &Device,
) -> hone_models::Result<f64> {
    let (mut sum, mut count) = (0.0, 0.0);
    for chunk in examples.chunks(batch_size) {
        let (x, y, mask) = to_tensors(chunk, pad, device)?;
        let tokens = f64::from(mask.sum_all()?.to_scalar::<f32>()?);
        let loss = masked_lm_loss(&gpt.forward(&x)?, &y, &mask)?;
        sum += f64::from(loss.to_scalar::<f32>()?) * tokens;
        count += tokens;
    }
    Ok(if count > 0.0 { sum / count } else { 0.0 })
}
