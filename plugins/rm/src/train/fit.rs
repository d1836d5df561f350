//! One member's optimisation: the training loop with its metrics and loss
//! table, the Bradley–Terry loss over a batch, and held-out evaluation.

use super::{Example, Train};
use crate::OrStageError;
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW};
use hone_models::batches::Batches;
use hone_models::heads::RewardModel;
use hone_models::preference::{bradley_terry_losses, pair_accuracy};
use hone_models::reward::pad_right;
use hone_models::sample::Rng;
use hone_models::train::{clip_grad_norm, lr_at};
use hone_models::{Device, Tensor, VarMap};
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;

impl Train {
    /// The optimisation loop of one member, with its metrics and loss table.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fit(
        &self,
        ctx: &mut Context,
        member: usize,
        (seed, lr, dropout): (u64, f64, f64),
        net: &Net,
        varmap: &VarMap,
        (train, eval): (&[Example], &[Example]),
        init_desc: &str,
    ) -> Result<(), StageError> {
        let c = &self.config;
        let base = self.base_seed(ctx);
        let order_seed = if c.data_order == "same" { base } else { seed };
        let mut batches = Batches::new(train.iter().map(|e| e.id.clone()).collect(), order_seed);
        let vars = varmap.all_vars();
        let params = ParamsAdamW {
            lr,
            weight_decay: c.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), params).or_stage("cannot create the optimiser")?;
        ctx.log(format!(
            "member {member}: {} parameters, {} steps on {} pairs ({} held out), lr {lr}, dropout {dropout}, init {init_desc}",
            vars.iter().map(|v| v.elem_count()).sum::<usize>(),
            c.steps,
            train.len(),
            eval.len(),
        ));
        let train_name = format!("m{member}_train_loss");
        let eval_name = format!("m{member}_eval_loss");
        let acc_name = format!("m{member}_eval_accuracy");
        let mut table = vec![format!(
            "member {member}\n{:>6} {:>10} {:>10} {:>9}",
            "step", "train_loss", "eval_loss", "eval_acc"
        )];
        let every = (c.steps / 10).max(1);
        let mut since = Vec::new();
        let run_eval = |ctx: &mut Context, step: usize| -> Result<Option<(f64, f64)>, StageError> {
            if eval.is_empty() {
                return Ok(None);
            }
            let (loss, acc) =
                evaluate(net, eval, c.batch_size, &self.device).or_stage("evaluation failed")?;
            ctx.metric_at(&eval_name, loss, step as u64);
            ctx.metric_at(&acc_name, acc, step as u64);
            Ok(Some((loss, acc)))
        };
        let fmt_eval = |e: Option<(f64, f64)>| {
            e.map_or(("-".to_string(), "-".to_string()), |(l, a)| {
                (format!("{l:.4}"), format!("{a:.3}"))
            })
        };
        let (el, ea) = fmt_eval(run_eval(ctx, 0)?);
        table.push(format!("{:>6} {:>10} {el:>10} {ea:>9}", 0, "-"));
        let mut last_eval = None;
        for step in 1..=c.steps {
            opt.set_learning_rate(lr_at(step - 1, c.warmup, c.steps, lr, c.min_lr));
            let batch: Vec<&Example> = batches
                .next(c.batch_size)
                .into_iter()
                .map(|i| &train[i])
                .collect();
            let mask_seed = seeded_hash(seed, &format!("dropout:{step}"));
            let loss = bt_loss(net, &batch, Some((dropout as f32, mask_seed)), &self.device)
                .or_stage("training step failed")?;
            let value = f64::from(loss.to_scalar::<f32>().or_stage("training step failed")?);
            let mut grads = loss.backward().or_stage("training step failed")?;
            clip_grad_norm(&mut grads, &vars, c.clip).or_stage("training step failed")?;
            opt.step(&grads).or_stage("training step failed")?;
            ctx.metric_at(&train_name, value, step as u64);
            ctx.progress(&format!("member {member}"), step as u64, c.steps as u64);
            since.push(value);
            if (c.eval_every > 0 && step % c.eval_every == 0) || step == c.steps {
                last_eval = run_eval(ctx, step)?;
            }
            if step % every == 0 || step == c.steps {
                // The mean over the steps since the last row: the last window
                // can be shorter than `every`.
                let n = since.len().max(1);
                let mean = since.drain(..).sum::<f64>() / n as f64;
                let (el, ea) = fmt_eval(last_eval.take());
                table.push(format!("{step:>6} {mean:>10.4} {el:>10} {ea:>9}"));
            }
        }
        ctx.log(table.join("\n"));
        Ok(())
    }
}

/// What a training step scores examples with.
pub(super) enum Net<'a> {
    /// A GPT reward model; examples hold token ids.
    Gpt { rm: &'a RewardModel, pad: u32 },
    /// A linear head on cached embeddings; examples hold one row index.
    Head {
        head: &'a Linear,
        embeddings: &'a Tensor,
    },
    /// Fine-tuned top layers and a head over cached frozen states;
    /// examples hold one state index.
    Tuned {
        top: &'a dyn crate::tuned::TopLayers,
        head: &'a Linear,
        states: &'a [Tensor],
        split: usize,
    },
}

/// Dropout for a training step: the probability and the mask's seed; `None`
/// for evaluation.
type Dropout = Option<(f32, u64)>;

/// Rewards of chosen and rejected [B] each, one forward pass.
fn rewards(
    net: &Net,
    batch: &[&Example],
    dropout: Dropout,
    device: &Device,
) -> hone_models::Result<(Tensor, Tensor)> {
    let b = batch.len();
    let r = match net {
        Net::Gpt { rm, pad } => {
            let seqs: Vec<Vec<u32>> = batch
                .iter()
                .map(|e| e.chosen.clone())
                .chain(batch.iter().map(|e| e.rejected.clone()))
                .collect();
            let (ids, lengths) = pad_right(&seqs, *pad, device)?;
            match dropout {
                Some((p, seed)) => rm.score_train_seeded(&ids, &lengths, p, seed)?,
                None => rm.score(&ids, &lengths)?,
            }
        }
        Net::Head { head, embeddings } => {
            let rows: Vec<u32> = batch
                .iter()
                .map(|e| e.chosen[0])
                .chain(batch.iter().map(|e| e.rejected[0]))
                .collect();
            let rows = Tensor::from_vec(rows, 2 * b, embeddings.device())?;
            let mut x = embeddings.index_select(&rows, 0)?;
            if let Some((p, seed)) = dropout {
                x = seeded_dropout(&x, p, seed)?;
            }
            head.forward(&x)?.squeeze(1)?
        }
        Net::Tuned {
            top,
            head,
            states,
            split,
        } => {
            let rows: Vec<&Tensor> = batch
                .iter()
                .map(|e| &states[e.chosen[0] as usize])
                .chain(batch.iter().map(|e| &states[e.rejected[0] as usize]))
                .collect();
            let mut x = top.pooled_from(&rows, *split)?;
            if let Some((p, seed)) = dropout {
                x = seeded_dropout(&x, p, seed)?;
            }
            head.forward(&x)?.squeeze(1)?
        }
    };
    Ok((r.narrow(0, 0, b)?, r.narrow(0, b, b)?))
}

/// Dropout with probability `p` and a mask drawn from `seed`, as
/// `RewardModel::score_train_seeded` draws it for the GPT's last hidden state.
fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> hone_models::Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(hone_models::Error::Invalid(format!(
            "dropout probability must be in [0, 1), got {p}"
        )));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let mut rng = Rng::new(seed);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.next_f64() < f64::from(p) {
                0.0
            } else {
                keep
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// Per-pair losses [B] of a batch, and the reward differences.
fn pair_losses(
    net: &Net,
    batch: &[&Example],
    dropout: Dropout,
    device: &Device,
) -> hone_models::Result<(Tensor, Tensor)> {
    let (chosen, rejected) = rewards(net, batch, dropout, device)?;
    let diff = (chosen - rejected)?;
    let col = |f: fn(&Example) -> f32| {
        Tensor::from_vec(
            batch.iter().map(|e| f(e)).collect::<Vec<f32>>(),
            batch.len(),
            device,
        )
    };
    let (margin, weight, eps) = (
        col(|e| e.margin)?,
        col(|e| e.weight)?,
        col(|e| e.smoothing)?,
    );
    let loss = bradley_terry_losses(&diff, &margin, &weight, &eps)?;
    Ok((loss, diff))
}

/// The mean Bradley–Terry loss of a batch, with dropout.
fn bt_loss(
    net: &Net,
    batch: &[&Example],
    dropout: Dropout,
    device: &Device,
) -> hone_models::Result<Tensor> {
    Ok(pair_losses(net, batch, dropout, device)?.0.mean_all()?)
}

/// Mean loss and accuracy (reward of chosen above rejected; a tie counts
/// half, as everywhere in hone) over held-out pairs.
fn evaluate(
    net: &Net,
    eval: &[Example],
    batch_size: usize,
    device: &Device,
) -> hone_models::Result<(f64, f64)> {
    let (mut loss, mut diffs) = (0.0, Vec::with_capacity(eval.len()));
    for chunk in eval.chunks(batch_size) {
        let batch: Vec<&Example> = chunk.iter().collect();
        let (l, d) = pair_losses(net, &batch, None, device)?;
        loss += f64::from(l.detach().sum_all()?.to_scalar::<f32>()?);
        diffs.extend(d.detach().to_vec1::<f32>()?.into_iter().map(f64::from));
    }
    let n = eval.len().max(1) as f64;
    Ok((loss / n, pair_accuracy(diffs).unwrap_or(0.0)))
}
