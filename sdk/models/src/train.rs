//! Training utilities: learning-rate schedule, gradient clipping and
//! accumulation, the masked LM loss and batch padding. Optimise with
//! [`candle_nn::AdamW`] (`set_learning_rate` each step, then
//! [`candle_nn::Optimizer::step`] with the [`GradStore`]).

use crate::{DType, Device, Error, Result, Tensor, Var};
use candle_core::backprop::GradStore;
use candle_core::D;

/// Linear warm-up to `peak` over `warmup` steps (step `warmup - 1` reaches
/// `peak`), then cosine decay from `peak` at step `warmup` to `min_lr` at
/// step `total` and after.
pub fn lr_at(step: usize, warmup: usize, total: usize, peak: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    if step >= total || total <= warmup {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (total - warmup) as f64;
    min_lr + 0.5 * (peak - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Clips the gradients of `vars` in place to a global L2 norm of at most
/// `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sum = 0.0;
    for var in vars {
        if let Some(g) = grads.get(var) {
            sum += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum.sqrt();
    if norm > max_norm && norm > 0.0 {
        let scale = max_norm / norm;
        for var in vars {
            if let Some(g) = grads.remove(var) {
                grads.insert(var, (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Adds `other`'s gradients of `vars` into `acc` (gradient accumulation);
/// entries missing from `acc` are inserted, and an empty `acc` takes `other`.
pub fn accumulate(acc: &mut Option<GradStore>, other: GradStore, vars: &[Var]) -> Result<()> {
    let Some(store) = acc.as_mut() else {
        *acc = Some(other);
        return Ok(());
    };
    for var in vars {
        if let Some(g) = other.get(var) {
            let sum = match store.get(var) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            store.insert(var, sum);
        }
    }
    Ok(())
}

/// Next-token cross-entropy averaged over positions where mask == 1.
/// `logits` [B,T,V]; `targets` [B,T] u32 holds the token each position must
/// predict (the caller shifts: `targets[t] = ids[t + 1]`); `mask` [B,T] f32.
/// A mask of all zeros gives a loss of 0.
pub fn masked_lm_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (picked, mask) = masked_token_logprobs("masked_lm_loss", logits, targets, mask)?;
    let count = mask.sum_all()?.maximum(1.0)?;
    Ok(picked.sum_all()?.neg()?.div(&count)?)
}

/// Teacher-forced log-probability of each sequence's masked tokens, summed:
/// [B], differentiable. `logits` [B,T,V], `targets` [B,T] (the token each
/// position predicts), `mask` [B,T] (1 on response tokens: prompt and
/// padding positions do not count). What DPO compares between policy and
/// reference, and what PPO's ratio and a KL estimate are made of.
pub fn sequence_logprobs(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (picked, _) = masked_token_logprobs("sequence_logprobs", logits, targets, mask)?;
    Ok(picked.sum(1)?)
}

/// Teacher-forced log-probability of each target token [B,T],
/// differentiable: log softmax(logits) at `targets`. What a policy-gradient
/// ratio π/π_old and a per-token KL are made of.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(log_probs
        .gather(&targets.to_dtype(DType::U32)?.unsqueeze(2)?, 2)?
        .squeeze(2)?)
}

/// log softmax(logits) at `targets`, times `mask`: [B,T], and the mask in
/// the logits' dtype.
fn masked_token_logprobs(
    what: &str,
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (b, t, _) = logits.dims3()?;
    if targets.dims() != [b, t] || mask.dims() != [b, t] {
        return Err(Error::Invalid(format!(
            "{what}: logits {:?} need targets and mask [{b}, {t}], got {:?} and {:?}",
            logits.dims(),
            targets.dims(),
            mask.dims()
        )));
    }
    let picked = token_logprobs(logits, targets)?;
    let mask = mask.to_dtype(logits.dtype())?;
    Ok(((picked * &mask)?, mask))
}

/// The variables of `varmap` in name order. `VarMap::all_vars` follows a
/// hash map's order, which differs from one map to the next: an optimizer
/// whose state is saved by position, or a sum over variables that must come
/// out the same in every run, needs this order instead.
pub fn vars_by_name(varmap: &crate::VarMap) -> Vec<crate::Var> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut named: Vec<(&String, &crate::Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

/// The variables of `varmap` that `grads` gives no gradient, or an
/// all-zero one, by name (sorted). candle's fused layer norm, softmax and
/// SDPA have no backward pass, so a model built on them trains without an
/// error while the gradient silently stops: every model and learner has a
/// test that this list is empty (or names the one variable expected).
pub fn vars_without_gradient(varmap: &crate::VarMap, grads: &GradStore) -> Result<Vec<String>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Invalid("the VarMap's lock is poisoned".into()))?;
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let zero = match grads.get(var) {
            None => true,
            Some(g) => {
                g.abs()?
                    .sum_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    == 0.0
            }
        };
        if zero {
            missing.push(name.clone());
        }
    }
    missing.sort();
    Ok(missing)
}

/// A GPT's shape as a stage's config gives it, for [`check_shape`].
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Width.
    pub d_model: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Attention heads (must divide `d_model`).
    pub n_heads: usize,
    /// Context length.
    pub context: usize,
}

impl Shape {
    /// The shape of `d_model` wide, `n_layers` deep, `n_heads` heads and a
    /// context of `context` tokens.
    pub fn new(d_model: usize, n_layers: usize, n_heads: usize, context: usize) -> Self {
        Shape {
            d_model,
            n_layers,
            n_heads,
            context,
        }
    }
}

/// Checks a model-and-training shape before anything is built: the shape's
/// sizes and every `positive` (name, value) at least 1, `n_heads` dividing
/// `d_model`, and `eval_fraction` in [0, 1). The error names the field.
pub fn check_shape(
    shape: Shape,
    positive: &[(&'static str, usize)],
    eval_fraction: f64,
) -> std::result::Result<(), (&'static str, String)> {
    let Shape {
        d_model,
        n_layers,
        n_heads,
        context,
    } = shape;
    let sizes = [
        ("d_model", d_model),
        ("n_layers", n_layers),
        ("n_heads", n_heads),
        ("context", context),
    ];
    if let Some((field, _)) = sizes.iter().chain(positive).find(|(_, v)| *v == 0) {
        return Err((field, "must be at least 1".into()));
    }
    if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
        return Err((
            "n_heads",
            format!("{n_heads} does not divide d_model {d_model}"),
        ));
    }
    if !(0.0..1.0).contains(&eval_fraction) {
        return Err((
            "eval_fraction",
            format!("must be in [0, 1), found {eval_fraction}"),
        ));
    }
    Ok(())
}

/// Pads `seqs` (each truncated to its first `max_len` tokens) with `pad` into
/// ids [B,L] u32 and mask [B,L] f32 (1 = real token), L the longest
/// truncated length (at least 1).
pub fn pad_batch(
    seqs: &[Vec<u32>],
    pad: u32,
    max_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let len = seqs
        .iter()
        .map(|s| s.len().min(max_len))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut mask = Vec::with_capacity(seqs.len() * len);
    for seq in seqs {
        let real = seq.len().min(max_len);
        ids.extend_from_slice(&seq[..real]);
        ids.extend(std::iter::repeat_n(pad, len - real));
        mask.extend(std::iter::repeat_n(1f32, real));
        mask.extend(std::iter::repeat_n(0f32, len - real));
    }
    let b = seqs.len();
    Ok((
        Tensor::from_vec(ids, (b, len), device)?,
        Tensor::from_vec(mask, (b, len), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::tests::tiny;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    #[test]
    fn sequence_logprobs_sum_the_masked_tokens_and_have_gradients() {
        let logits = Var::new(
            &[[[0.0f32, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let targets = Tensor::new(&[[2u32, 0, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0f32, 1.0, 1.0]], &Device::Cpu).unwrap();
        let lp = sequence_logprobs(logits.as_tensor(), &targets, &mask).unwrap();
        let ln = |row: [f32; 3], k: usize| row[k] - row.iter().map(|x| x.exp()).sum::<f32>().ln();
        let want = ln([2.0, 0.0, 0.0], 0) + ln([0.0, 0.0, 0.0], 1);
        assert!((lp.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-5);
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let g = grads.get(&logits).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(
            g[0][0],
            [0.0, 0.0, 0.0],
            "a masked position gets no gradient"
        );
        assert!(g[0][1][0] > 0.0 && g[0][2][1] > 0.0);
    }

    #[test]
    fn shape_checks_name_the_field() {
        let shape = |d_model, n_heads| Shape {
            d_model,
            n_layers: 1,
            n_heads,
            context: 8,
        };
        assert_eq!(check_shape(shape(16, 4), &[("steps", 3)], 0.1), Ok(()));
        let field = |r: std::result::Result<(), (&'static str, String)>| r.unwrap_err().0;
        assert_eq!(
            field(check_shape(shape(16, 4), &[("steps", 0)], 0.1)),
            "steps"
        );
        assert_eq!(field(check_shape(shape(0, 4), &[], 0.1)), "d_model");
        assert_eq!(field(check_shape(shape(16, 3), &[], 0.1)), "n_heads");
        assert_eq!(field(check_shape(shape(16, 4), &[], 1.0)), "eval_fraction");
    }

    #[test]
    fn lr_schedule_endpoints() {
        let (peak, min) = (1e-3, 1e-5);
        assert!((lr_at(0, 10, 100, peak, min) - peak / 10.0).abs() < 1e-12);
        assert!((lr_at(9, 10, 100, peak, min) - peak).abs() < 1e-12);
        assert!((lr_at(10, 10, 100, peak, min) - peak).abs() < 1e-12);
        let mid = lr_at(55, 10, 100, peak, min);
        assert!((mid - (min + peak) / 2.0).abs() < 1e-9, "{mid}");
        assert!((lr_at(100, 10, 100, peak, min) - min).abs() < 1e-12);
        assert!((lr_at(500, 10, 100, peak, min) - min).abs() < 1e-12);
        assert!((lr_at(0, 0, 100, peak, min) - peak).abs() < 1e-12);
    }

    fn norm(grads: &GradStore, vars: &[Var]) -> f64 {
        vars.iter()
            .filter_map(|v| grads.get(v))
            .map(|g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn clipping_reduces_the_norm_to_max_norm() {
        let a = Var::new(&[3f32, 0.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0f32, 4.0], &Device::Cpu).unwrap();
        // d/dx of sum(x^2 / 2) is x: gradient norm 5.
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap()
            * 0.5)
            .unwrap();
        let vars = [a.clone(), b.clone()];
        let mut grads = loss.backward().unwrap();
        let before = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-5);
        assert!((norm(&grads, &vars) - 1.0).abs() < 1e-5);
        let g: Vec<f32> = grads.get(&a).unwrap().to_vec1().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5);
        // Under the limit: unchanged.
        let again = clip_grad_norm(&mut grads, &vars, 10.0).unwrap();
        assert!((again - 1.0).abs() < 1e-5);
        assert!((norm(&grads, &vars) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn accumulate_adds_and_inserts() {
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[1f32], &Device::Cpu).unwrap();
        let vars = [a.clone(), b.clone()];
        let mut acc = None;
        let g1 = a.as_tensor().sum_all().unwrap().backward().unwrap();
        accumulate(&mut acc, g1, &vars).unwrap();
        let l2 =
            (a.as_tensor().sum_all().unwrap() * 2.0 + b.as_tensor().sum_all().unwrap()).unwrap();
        accumulate(&mut acc, l2.backward().unwrap(), &vars).unwrap();
        let acc = acc.unwrap();
        assert_eq!(
            acc.get(&a).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 3.0]
        );
        assert_eq!(acc.get(&b).unwrap().to_vec1::<f32>().unwrap(), vec![1.0]);
    }

    #[test]
    fn masked_loss_ignores_masked_positions() {
        let logits = Tensor::new(&[[[0f32, 0.0], [10.0, -10.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap();
        let only_first = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let loss = masked_lm_loss(&logits, &targets, &only_first).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap();
        assert!((loss - std::f32::consts::LN_2).abs() < 1e-5, "{loss}");
        let both = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
        let loss = masked_lm_loss(&logits, &targets, &both).unwrap();
        assert!(
            (loss.to_scalar::<f32>().unwrap() - (std::f32::consts::LN_2 + 20.0) / 2.0).abs() < 1e-3
        );
    }

    #[test]
    fn pad_batch_truncates_and_masks() {
        let (ids, mask) = pad_batch(&[vec![1, 2, 3, 4], vec![5]], 9, 3, &Device::Cpu).unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3], vec![5, 9, 9]]
        );
        assert_eq!(
            mask.to_vec2::<f32>().unwrap(),
            vec![vec![1., 1., 1.], vec![1., 0., 0.]]
        );
    }

    #[test]
    fn adamw_training_halves_the_loss() {
        let (gpt, varmap) = tiny(21);
        let text: Vec<u32> = "the quick brown fox jumps over the lazy dog"
            .bytes()
            .map(u32::from)
            .collect();
        let n = text.len() - 1;
        let x = Tensor::from_vec(text[..n].to_vec(), (1, n), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(text[1..].to_vec(), (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap();
        let vars = varmap.all_vars();
        let params = ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.clone(), params).unwrap();
        let mut losses = Vec::new();
        for step in 0..100 {
            opt.set_learning_rate(lr_at(step, 10, 100, 3e-3, 3e-4));
            let loss = masked_lm_loss(&gpt.forward(&x).unwrap(), &y, &mask).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let mut grads = loss.backward().unwrap();
            clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
            opt.step(&grads).unwrap();
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < first / 2.0, "loss {first} -> {last}");
    }
}
