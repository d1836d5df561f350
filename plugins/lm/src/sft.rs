//! `lm.sft`: supervised fine-tuning of a causal LM on demonstrations, with
//! the next-token loss masked to the responses.

use crate::{device, OrStageError};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use hone_models::checkpoint;
use hone_models::gpt::{init_seeded, Gpt, GptConfig};
use hone_models::tokenizer::{load_tokenizer, ByteTokenizer, Tokenizer};
use hone_models::train::{accumulate, clip_grad_norm, lr_at, masked_lm_loss};
use hone_models::{DType, Device, Tensor, Var, VarBuilder, VarMap};
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
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

/// A prompt and the response to imitate.
struct Demo {
    id: String,
    prompt: String,
    response: String,
}

/// One training sequence: `inputs[t]` predicts `targets[t]`, and `mask[t]`
/// is 1 where that target is a response token (or the closing EOS).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Example {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
}

/// Tokenizes `BOS prompt response EOS` into an [`Example`] of at most
/// `context` positions. Too long a sequence loses the start of the prompt
/// first (the turn being answered is at its end), then the end of the
/// response.
pub(crate) fn tokenize(
    tok: &dyn Tokenizer,
    prompt: &str,
    response: &str,
    context: usize,
) -> Example {
    let mut ids = vec![tok.bos_id()];
    ids.extend(tok.encode(prompt));
    let response_start = ids.len();
    ids.extend(tok.encode(response));
    ids.push(tok.eos_id());
    // Keep one token before the response, so its first token is predicted.
    let cut = ids
        .len()
        .saturating_sub(context + 1)
        .min(response_start - 1);
    let mut ids = ids.split_off(cut);
    ids.truncate(context + 1);
    let response_start = response_start - cut;
    Example {
        inputs: ids[..ids.len() - 1].to_vec(),
        targets: ids[1..].to_vec(),
        mask: (1..ids.len())
            .map(|t| if t >= response_start { 1.0 } else { 0.0 })
            .collect(),
    }
}

impl StageFactory for Sft {
    fn descriptor() -> StageDescriptor {
        let int = FieldType::Integer;
        let float = FieldType::Float;
        StageDescriptor::new(
            "lm.sft",
            "Supervised fine-tuning of a byte-level GPT on demonstrations (pairs: prompt + chosen; completions: \
             prompt + text), loss masked to the responses; emits checkpoints as policy artifacts.",
        )
        .input("demos", RecordKind::Any)
        .output("policy", RecordKind::Artifact)
        .optional("init", FieldType::String, "scratch", "`scratch` for a fresh model shaped by d_model..context, or the directory of a policy \
            checkpoint (relative to the run directory, e.g. `outputs/sft/final`), whose shape is then kept. Each round starts from it.")
        .optional("d_model", int.clone(), 64, "Width of a fresh model.")
        .optional("n_layers", int.clone(), 2, "Transformer blocks of a fresh model.")
        .optional("n_heads", int.clone(), 4, "Attention heads of a fresh model; must divide d_model.")
        .optional("context", int.clone(), 128, "Context length of a fresh model, in bytes; longer demos lose the start of the prompt.")
        .optional("steps", int.clone(), 300, "Optimiser steps per round.")
        .optional("batch_size", int.clone(), 16, "Sequences per micro-batch.")
        .optional("lr", float.clone(), 3e-3, "Peak learning rate (AdamW).")
        .optional("min_lr", float.clone(), 3e-4, "Learning rate at the end of the cosine decay.")
        .optional("warmup", int.clone(), 20, "Steps of linear warm-up.")
        .optional("grad_accum", int.clone(), 1, "Micro-batches whose gradients are summed into one step.")
        .optional("clip", float.clone(), 1.0, "Clip the global gradient norm to this.")
        .optional("weight_decay", float.clone(), 0.01, "AdamW weight decay.")
        .optional("eval_fraction", float.clone(), 0.1, "Fraction of demos held out for eval_loss (seeded per demo id).")
        .optional("eval_every", int.clone(), 50, "Report eval_loss every this many steps (0 = only before and after training).")
        .optional("checkpoint_every", int.clone(), 100, "Write and emit a checkpoint every this many steps (0 = only the final one).")
        .optional("seed", int, 0, "Seed of initialisation, hold-out split and batch order, combined with the pipeline seed.")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
        .placement(Placement::Single)
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: SftConfig = init.config()?;
        let device = device(&config.device)?;
        let positive = [
            ("d_model", config.d_model),
            ("n_layers", config.n_layers),
            ("n_heads", config.n_heads),
            ("context", config.context),
            ("steps", config.steps),
            ("batch_size", config.batch_size),
            ("grad_accum", config.grad_accum),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(StageError::config(*field, "must be at least 1"));
        }
        if !config.d_model.is_multiple_of(config.n_heads) {
            return Err(StageError::config(
                "n_heads",
                format!(
                    "{} does not divide d_model {}",
                    config.n_heads, config.d_model
                ),
            ));
        }
        if !(0.0..1.0).contains(&config.eval_fraction) {
            return Err(StageError::config(
                "eval_fraction",
                format!("must be in [0, 1), found {}", config.eval_fraction),
            ));
        }
        let init_dir = match config.init.as_str() {
            "scratch" => None,
            path => {
                let dir = init.run_dir.join(path);
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
        let (train, eval) = split(&demos, seed, c.eval_fraction);
        let encode = |set: Vec<&Demo>| -> Vec<(String, Example)> {
            set.into_iter()
                .map(|d| {
                    (
                        d.id.clone(),
                        tokenize(model.tok.as_ref(), &d.prompt, &d.response, context),
                    )
                })
                .collect()
        };
        let (train, eval) = (encode(train), encode(eval));
        let eval: Vec<Example> = eval.into_iter().map(|(_, e)| e).collect();
        let mut batches = Batches::new(train, seed);
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
        let mut dir = ctx.output_dir()?;
        if ctx.init().rounds != 1 {
            dir = dir.join(format!("round-{}", ctx.round()));
        }
        let dir = dir.join(name);
        checkpoint::save(&dir, &model.varmap, model.gpt.config(), model.tok.as_ref())
            .or_stage(&format!("cannot write checkpoint {}", dir.display()))?;
        let origin = match self.init_dir {
            None => "init: scratch".to_string(),
            Some(_) => format!("fine-tuned from {}", self.config.init),
        };
        let lineage = vec![origin, format!("lm.sft step {step}")];
        let artifact = ctx.register_artifact(
            "policy",
            &dir.join(checkpoint::WEIGHTS),
            Vec::new(),
            lineage,
        )?;
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }
}

/// The loss table logged after training: a row every ~10% of the steps,
/// with the mean train loss since the previous row and the eval loss if one
/// was computed since.
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

    /// Adds a row at `step` if it is due.
    fn row(&mut self, step: usize) {
        if !step.is_multiple_of(self.every) && step != self.last {
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

/// A uniform draw in [0, 1) from a seeded hash.
fn draw(seed: u64, key: &str) -> f64 {
    (seeded_hash(seed, key) >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits demos into training and held-out sets by a seeded draw per id, so
/// the split does not depend on arrival order. With several demos and a
/// non-zero fraction, at least one is held out.
fn split(demos: &[Demo], seed: u64, eval_fraction: f64) -> (Vec<&Demo>, Vec<&Demo>) {
    let mut sorted: Vec<&Demo> = demos.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let holdout = |d: &Demo| draw(seed, &format!("holdout:{}", d.id));
    let (mut eval, mut train): (Vec<&Demo>, Vec<&Demo>) =
        sorted.into_iter().partition(|d| holdout(d) < eval_fraction);
    if eval.is_empty() && eval_fraction > 0.0 && train.len() > 1 {
        let i = (0..train.len())
            .min_by(|&a, &b| holdout(train[a]).total_cmp(&holdout(train[b])))
            .unwrap_or(0);
        eval.push(train.remove(i));
    }
    (train, eval)
}

/// Cycles through the training examples, reshuffled (seeded) every epoch.
struct Batches {
    examples: Vec<(String, Example)>,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    seed: u64,
}

impl Batches {
    fn new(examples: Vec<(String, Example)>, seed: u64) -> Self {
        let mut b = Batches {
            examples,
            order: Vec::new(),
            cursor: 0,
            epoch: 0,
            seed,
        };
        b.shuffle();
        b
    }

    fn len(&self) -> usize {
        self.examples.len()
    }

    fn shuffle(&mut self) {
        let key = |i: usize| {
            seeded_hash(
                self.seed,
                &format!("order:{}:{}", self.epoch, self.examples[i].0),
            )
        };
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.sort_by_key(|&i| (key(i), i));
        self.order = order;
    }

    fn next(&mut self, size: usize) -> Vec<Example> {
        let mut batch = Vec::with_capacity(size);
        while batch.len() < size.min(self.examples.len()) {
            if self.cursor == self.order.len() {
                self.cursor = 0;
                self.epoch += 1;
                self.shuffle();
            }
            batch.push(self.examples[self.order[self.cursor]].1.clone());
            self.cursor += 1;
        }
        batch
    }
}

/// Pads examples into inputs and targets [B,L] u32 and a loss mask [B,L] f32.
fn to_tensors(
    examples: &[Example],
    pad: u32,
    device: &Device,
) -> hone_models::Result<(Tensor, Tensor, Tensor)> {
    let len = examples
        .iter()
        .map(|e| e.inputs.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let (mut inputs, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        let fill = len - e.inputs.len();
        inputs.extend(
            e.inputs
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, fill)),
        );
        targets.extend(
            e.targets
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, fill)),
        );
        mask.extend(e.mask.iter().copied().chain(std::iter::repeat_n(0.0, fill)));
    }
    let shape = (examples.len(), len);
    Ok((
        Tensor::from_vec(inputs, shape, device)?,
        Tensor::from_vec(targets, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hone_sdk::{Collected, Event};

    /// The config of a tiny model that trains in seconds, with `overrides`.
    pub(crate) fn tiny_config(overrides: serde_json::Value) -> serde_json::Value {
        let mut config = serde_json::json!({
            "init": "scratch", "d_model": 32, "n_layers": 1, "n_heads": 4, "context": 64,
            "steps": 40, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup": 5, "grad_accum": 1,
            "clip": 1.0, "weight_decay": 0.0, "eval_fraction": 0.2, "eval_every": 20,
            "checkpoint_every": 20, "seed": 0, "device": "cpu",
        });
        for (k, v) in overrides.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    /// Demonstrations with a learnable pattern: the answer repeats a word of the question.
    pub(crate) fn demos(n: usize) -> Vec<Record> {
        let words = [
            "apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano",
        ];
        (0..n)
            .map(|i| {
                let w = words[i % words.len()];
                let prompt = format!("Human: say {w}\n\nAssistant:");
                Record::Pair(PreferencePair::new(
                    format!("d{i:03}"),
                    prompt,
                    format!(" {w} {w} {w}."),
                    "no",
                    "test",
                ))
            })
            .collect()
    }

    /// Runs one SFT round in `run_dir`; returns emitted records and events.
    pub(crate) fn run_sft(
        run_dir: &std::path::Path,
        config: serde_json::Value,
        input: Vec<Record>,
    ) -> Collected {
        let mut init = StageInit::for_test("lm.sft", config);
        init.stage_id = "sft".into();
        init.run_dir = run_dir.to_path_buf();
        let mut stage = Sft::create(&init).unwrap();
        let mut out = Collected::default();
        {
            let mut ctx = Context::new(&mut out, &init, 0);
            stage.on_batch(&mut ctx, 0, input).unwrap();
            stage.on_round_end(&mut ctx).unwrap();
        }
        out
    }

    pub(crate) fn temp_run_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hone-lm-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn metrics(out: &Collected, wanted: &str) -> Vec<f64> {
        out.events
            .iter()
            .filter_map(|e| match e {
                Event::Metric { name, value, .. } if name == wanted => Some(*value),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn loss_mask_covers_only_the_response_and_eos() {
        let t = ByteTokenizer;
        let e = tokenize(&t, "ab", "xy", 64);
        assert_eq!(e.inputs, vec![256, 97, 98, 120, 121]);
        assert_eq!(e.targets, vec![97, 98, 120, 121, 257]);
        assert_eq!(e.mask, vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        // Too long: the prompt loses its start, the response keeps its mask.
        let e = tokenize(&t, "0123456789", "xy", 6);
        assert_eq!(e.inputs, vec![54, 55, 56, 57, 120, 121]);
        assert_eq!(e.targets, vec![55, 56, 57, 120, 121, 257]);
        assert_eq!(e.mask, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        // A response longer than the context keeps one prompt token and its own start.
        let e = tokenize(&t, "a", "0123456789", 4);
        assert_eq!(e.inputs, vec![97, 48, 49, 50]);
        assert_eq!(e.mask, vec![1.0; 4]);
    }

    #[test]
    fn sft_loss_falls_and_checkpoints_are_emitted() {
        let dir = temp_run_dir("sft");
        let out = run_sft(&dir, tiny_config(serde_json::json!({})), demos(60));
        let eval = metrics(&out, "eval_loss");
        let train = metrics(&out, "train_loss");
        assert_eq!(train.len(), 40);
        assert_eq!(eval.len(), 3, "before, at 20 and at the end: {eval:?}");
        let (first, last) = (eval[0], *eval.last().unwrap());
        assert!(last < first * 0.6, "eval loss {first} -> {last}");
        let policies: Vec<&ArtifactRef> = out.records[&0]
            .iter()
            .map(|r| match r {
                Record::Artifact(a) => a,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(policies.len(), 2, "ckpt-20 and final");
        assert!(
            policies[1].path.ends_with("final/model.safetensors"),
            "{}",
            policies[1].path
        );
        for a in &policies {
            assert_eq!(a.kind, "policy");
            let file = dir.join(&a.path);
            assert_eq!(hone_sdk::fs::sha256_file(&file).unwrap(), a.sha256);
            assert!(file.with_file_name("config.json").is_file());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_round_emits_nothing() {
        let dir = temp_run_dir("sft-empty");
        let prompt = Record::Prompt(Prompt {
            id: "p".into(),
            text: "hi".into(),
            meta: Default::default(),
        });
        let out = run_sft(&dir, tiny_config(serde_json::json!({})), vec![prompt]);
        assert!(out.records.is_empty());
        assert_eq!(metrics(&out, "ignored"), vec![1.0]);
    }

    #[test]
    fn bad_init_and_device_are_config_errors() {
        let init = StageInit::for_test(
            "lm.sft",
            tiny_config(serde_json::json!({"init": "no/such/dir"})),
        );
        let err = Sft::create(&init).err().unwrap();
        assert_eq!(err.config_field(), Some("init"), "{err}");
        let init = StageInit::for_test("lm.sft", tiny_config(serde_json::json!({"device": "tpu"})));
        assert_eq!(
            Sft::create(&init).err().unwrap().config_field(),
            Some("device")
        );
    }
}
