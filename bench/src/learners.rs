//! The learner benchmark: a DPO step and a PPO step of hone's model core
//! against the same losses in PyTorch on CPU, at the LM benchmark's GPT
//! (width 128, 4 layers, context 128), side by side in one run.
//! `bench/learners.sh` installs PyTorch in a virtualenv and runs this.
//!
//! - DPO: 8 pairs a step (16 sequences of 128 tokens, the last 64 the
//!   response), the reference's log-probs cached (as lm.dpo caches them), so
//!   a step is the policy's forward and backward and an AdamW step.
//! - PPO: 16 sampled sequences of 128 tokens (the last 64 the response), a
//!   separate critic of the policy's shape (as lm.ppo builds it): the
//!   clipped surrogate plus 0.1 x the clipped value loss, one backward, two
//!   AdamW steps.
//!
//! - Reward model: 16 pairs a step (32 sequences of 256 tokens), the GPT
//!   trunk with a reward head on the last token, the Bradley-Terry loss, an
//!   AdamW step (the shape of the comparison with TRL's
//!   RewardTrainer).
//!
//! The PyTorch side also times DPO recomputing the reference's log-probs
//! every step, as TRL's DPOTrainer does by default (`precompute_ref_log_probs`
//! off). Tokens/s counts each sequence's tokens once per step.

use crate::median;
use hone_models::adamw::{AdamW, ParamsAdamW};
use hone_models::gpt::{init_seeded, Gpt, GptConfig};
use hone_models::heads::{Critic, RewardModel};
use hone_models::policy_gradient::clipped_surrogate;
use hone_models::ppo::clipped_value_loss;
use hone_models::preference::{bradley_terry_losses, dpo_losses, DpoBatch, DpoLoss, DpoParams};
use hone_models::train::{sequence_logprobs, token_logprobs};
use hone_models::{DType, Device, Tensor, VarBuilder, VarMap};
use std::time::Instant;

const CFG: GptConfig = GptConfig {
    vocab_size: 259,
    d_model: 128,
    n_layers: 4,
    n_heads: 4,
    context: 128,
};
/// The reward model's shape: the GPT's, with a context of 256.
const RM_CFG: GptConfig = GptConfig {
    context: 256,
    ..CFG
};
/// Pairs per reward-model step.
const RM_PAIRS: usize = 16;
/// Sequences per step (8 DPO pairs; 16 PPO samples).
const SEQUENCES: usize = 16;
/// Response tokens at the end of each sequence.
const RESPONSE: usize = 64;

/// The run's sizes (the same JSON goes to the PyTorch script).
#[derive(Clone, Copy)]
pub struct LearnerBench {
    pub threads: usize,
    pub steps: usize,
    pub repeats: usize,
}

/// Seeded random token ids [rows, context + 1] and the response mask
/// [rows, context] over the last RESPONSE target positions.
fn data(device: &Device) -> hone_models::Result<(Tensor, Tensor, Tensor)> {
    let mut rng = hone_models::sample::Rng::new(0);
    let n = SEQUENCES * (CFG.context + 1);
    let ids: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % CFG.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (SEQUENCES, CFG.context + 1), device)?;
    let mask: Vec<f32> = (0..SEQUENCES * CFG.context)
        .map(|i| f32::from(u8::from(i % CFG.context >= CFG.context - RESPONSE)))
        .collect();
    let mask = Tensor::from_vec(mask, (SEQUENCES, CFG.context), device)?;
    Ok((
        ids.narrow(1, 0, CFG.context)?.contiguous()?,
        ids.narrow(1, 1, CFG.context)?.contiguous()?,
        mask,
    ))
}

fn policy(device: &Device) -> hone_models::Result<(Gpt, VarMap)> {
    let varmap = VarMap::new();
    let gpt = Gpt::new(&CFG, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    init_seeded(&varmap, 0)?;
    Ok((gpt, varmap))
}

fn adam(varmap: &VarMap) -> hone_models::Result<AdamW> {
    AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-5,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}

/// Median tokens/s of `steps` calls of `step`, over `repeats`, after one
/// warm-up call; a step trains on `tokens`.
fn rate(
    b: &LearnerBench,
    tokens: usize,
    mut step: impl FnMut() -> hone_models::Result<()>,
) -> hone_models::Result<f64> {
    step()?;
    let mut rates = Vec::new();
    for _ in 0..b.repeats {
        let start = Instant::now();
        for _ in 0..b.steps {
            step()?;
        }
        rates.push((b.steps * tokens) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

fn reward_model(b: &LearnerBench, device: &Device) -> hone_models::Result<f64> {
    let varmap = VarMap::new();
    let rm = RewardModel::new(
        &RM_CFG,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    init_seeded(&varmap, 0)?;
    let mut opt = adam(&varmap)?;
    let rows = 2 * RM_PAIRS;
    let mut rng = hone_models::sample::Rng::new(1);
    let ids: Vec<u32> = (0..rows * RM_CFG.context)
        .map(|_| (rng.next_u64() % RM_CFG.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (rows, RM_CFG.context), device)?;
    let lengths = vec![RM_CFG.context; rows];
    let zeros = Tensor::zeros(RM_PAIRS, DType::F32, device)?;
    let ones = Tensor::ones(RM_PAIRS, DType::F32, device)?;
    rate(b, rows * RM_CFG.context, || {
        // Chosen first, rejected second, as rm.train batches them.
        let r = rm.score_train(&ids, &lengths, 0.0)?;
        let diff = (r.narrow(0, 0, RM_PAIRS)? - r.narrow(0, RM_PAIRS, RM_PAIRS)?)?;
        let loss = bradley_terry_losses(&diff, &zeros, &ones, &zeros)?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        loss.to_scalar::<f32>()?;
        Ok(())
    })
}

fn dpo(b: &LearnerBench, device: &Device) -> hone_models::Result<f64> {
    let (gpt, varmap) = policy(device)?;
    let mut opt = adam(&varmap)?;
    let (x, y, mask) = data(device)?;
    let pairs = SEQUENCES / 2;
    // The reference's log-probs, cached: computed once, as lm.dpo does.
    let cached = sequence_logprobs(&gpt.forward(&x)?, &y, &mask)?.detach();
    let zeros = Tensor::zeros(pairs, DType::F32, device)?;
    let ones = Tensor::ones(pairs, DType::F32, device)?;
    let len = (Tensor::ones(pairs, DType::F32, device)? * RESPONSE as f64)?;
    rate(b, SEQUENCES * CFG.context, || {
        let lp = sequence_logprobs(&gpt.forward(&x)?, &y, &mask)?;
        let batch = DpoBatch {
            policy_chosen: &lp.narrow(0, 0, pairs)?,
            policy_rejected: &lp.narrow(0, pairs, pairs)?,
            reference_chosen: &cached.narrow(0, 0, pairs)?,
            reference_rejected: &cached.narrow(0, pairs, pairs)?,
            chosen_len: &len,
            rejected_len: &len,
            margin: &zeros,
            weight: &ones,
            epsilon: &zeros,
        };
        let params = DpoParams {
            beta: 0.1,
            label_smoothing: 0.0,
            gamma: 0.5,
        };
        let (losses, _, _) = dpo_losses(DpoLoss::Sigmoid, params, &batch)?;
        let loss = losses.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        loss.to_scalar::<f32>()?;
        Ok(())
    })
}

fn ppo(b: &LearnerBench, device: &Device) -> hone_models::Result<f64> {
    let (gpt, varmap) = policy(device)?;
    let critic_vars = VarMap::new();
    let critic = Critic::new(
        &CFG,
        VarBuilder::from_varmap(&critic_vars, DType::F32, device),
    )?;
    init_seeded(&critic_vars, 1)?;
    let mut opt = adam(&varmap)?;
    let mut critic_opt = AdamW::new(
        Critic::trainable(&critic_vars),
        ParamsAdamW {
            lr: 1e-5,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let (x, y, mask) = data(device)?;
    // The sampler's log-probs and values, and seeded advantages and returns.
    let old = token_logprobs(&gpt.forward(&x)?, &y)?.detach();
    let old_values = critic.values(&x)?.detach();
    let advantages = Tensor::randn(0f32, 1.0, (SEQUENCES, CFG.context), device)?;
    let returns = (&old_values + Tensor::randn(0f32, 0.5, (SEQUENCES, CFG.context), device)?)?;
    let tokens = (SEQUENCES * RESPONSE) as f64;
    rate(b, SEQUENCES * CFG.context, || {
        let logp = token_logprobs(&gpt.forward(&x)?, &y)?;
        let policy_loss =
            ((clipped_surrogate(&logp, &old, &advantages, 0.2)? * &mask)?.sum_all()? / tokens)?;
        let values = critic.values(&x)?;
        let (value_loss, _) = clipped_value_loss(&values, &old_values, &returns, 0.2)?;
        let value_loss = ((value_loss * &mask)?.sum_all()? / tokens)?;
        let loss = (policy_loss + (value_loss * 0.1)?)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        critic_opt.step(&grads)?;
        loss.to_scalar::<f32>()?;
        Ok(())
    })
}

fn torch(b: &LearnerBench) -> Result<serde_json::Value, String> {
    let config = serde_json::json!({
        "threads": b.threads, "vocab": CFG.vocab_size, "d_model": CFG.d_model, "n_layers": CFG.n_layers,
        "n_heads": CFG.n_heads, "context": CFG.context, "sequences": SEQUENCES, "response": RESPONSE,
        "steps": b.steps, "repeats": b.repeats,
        "rm_context": RM_CFG.context, "rm_pairs": RM_PAIRS,
    });
    crate::lm::run_torch(
        "bench/torch/learners_bench.py",
        &config,
        "bench/learners.sh",
    )
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(b: LearnerBench) {
    std::env::set_var("RAYON_NUM_THREADS", b.threads.to_string());
    let device = Device::Cpu;
    println!(
        "## Learner steps, GPT {}x{} layers, context {}: {} threads, {} sequences a step ({} response tokens), median of {}\n",
        CFG.d_model, CFG.n_layers, CFG.context, b.threads, SEQUENCES, RESPONSE, b.repeats
    );
    let ours_dpo = dpo(&b, &device).expect("hone's DPO step runs");
    let ours_ppo = ppo(&b, &device).expect("hone's PPO step runs");
    let ours_rm = reward_model(&b, &device).expect("hone's reward-model step runs");
    let reference = torch(&b);
    let field = |k: &str| reference.as_ref().ok().and_then(|v| v[k].as_f64());
    println!("| training tokens/s | hone | PyTorch | hone / PyTorch |");
    println!("|---|---|---|---|");
    for (label, ours, key) in [
        (
            "DPO step (sigmoid, cached reference)",
            ours_dpo,
            "dpo_tok_s",
        ),
        (
            "DPO step, against PyTorch recomputing the reference (TRL's default)",
            ours_dpo,
            "dpo_recompute_tok_s",
        ),
        ("PPO step (policy + separate critic)", ours_ppo, "ppo_tok_s"),
        (
            "reward model step (Bradley-Terry, 16 pairs x 256 tokens)",
            ours_rm,
            "rm_tok_s",
        ),
    ] {
        match field(key) {
            Some(theirs) => println!(
                "| {label} | {ours:.0} | {theirs:.0} | {:.2} |",
                ours / theirs
            ),
            None => println!("| {label} | {ours:.0} | - | - |"),
        }
    }
    match &reference {
        Err(e) => println!("\n(PyTorch column missing: {e})"),
        Ok(v) => println!("\nPyTorch {}.", v["torch"].as_str().unwrap_or("?")),
    }
}
