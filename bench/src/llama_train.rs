//! `hone-bench llama-train`: one training step of SmolLM2-135M as lm.sft
//! and lm.dpo take it (`plugins/lm/src/tuned_llama.rs`): the top 4 of 30
//! layers run from the cached output of the 26 frozen ones, the LM head on
//! the response positions only (its weight frozen), the token log-probs
//! (`hone_models::picked_logprobs`), the mean NLL, the backward pass and an
//! AdamW step. Two ways of training those layers: their own weights and the
//! final norm (14.2 M parameters), or LoRA rank 16 on their seven
//! projections (the weights frozen). 8 sequences of 192 tokens, the last 96
//! the response; medians of 5 repeats of 2 steps, at `RAYON_NUM_THREADS` threads.
//!
//! The first against PyTorch/transformers in the same run
//! (bench/torch/llama_train_bench.py: the same GGUF, ids, step and AdamW),
//! with both sides' first loss, to show they compute the same thing.

use crate::median;
use candle_core::{Device, Tensor, Var, D};
use candle_nn::{AdamW, Module, Optimizer, ParamsAdamW};
use hone_models::lora::{LoraConfig, LLAMA_TARGETS};
use hone_models::picked_logprobs::picked_logprobs;
use hone_pretrained::llama::Llama;
use hone_pretrained::smollm::{GGUF_FILE, MODEL_NAME};
use std::time::Instant;

/// The benchmark's settings.
pub struct LlamaTrainBench {
    pub batch: usize,
    pub tokens: usize,
    pub response: usize,
    pub steps: usize,
    pub repeats: usize,
}

const FROZEN: usize = 26;

/// Milliseconds per step over `b.repeats` repeats of `b.steps` steps, and
/// the first step's loss.
fn time_steps(
    model: &Llama,
    vars: Vec<Var>,
    x: &Tensor,
    targets: &[u32],
    b: &LlamaTrainBench,
) -> (Vec<f64>, f32) {
    let dev = Device::Cpu;
    let t = b.tokens;
    let at: Vec<u32> = (0..b.batch)
        .flat_map(|s| ((t - b.response)..t).map(move |p| (s * t + p) as u32))
        .collect();
    let at = Tensor::new(at.as_slice(), &dev).unwrap();
    let head = hone_models::linear::Linear::new(model.head_weight().detach(), None);
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-5,
            ..Default::default()
        },
    )
    .unwrap();
    let mut step = || {
        let hidden = model.hidden_from(x, FROZEN).unwrap();
        let width = hidden.dim(D::Minus1).unwrap();
        let flat = hidden.reshape((b.batch * t, width)).unwrap();
        let picked = flat.index_select(&at, 0).unwrap();
        let logits = head.forward(&picked).unwrap();
        let loss = picked_logprobs(&logits, targets)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
        loss.to_scalar::<f32>().unwrap()
    };
    // Warm-up: the first steps grow the allocator's pool (page faults) and
    // would be timed otherwise.
    let first = step();
    for _ in 0..2 {
        step();
    }
    let ms = (0..b.repeats)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..b.steps {
                step();
            }
            started.elapsed().as_secs_f64() * 1000.0 / b.steps as f64
        })
        .collect();
    (ms, first)
}

pub fn run(b: LlamaTrainBench) {
    let dir = hone_sdk::pretrained::fetch(MODEL_NAME).expect("cannot fetch SmolLM2");
    let dev = Device::Cpu;
    let (mut model, varmap) =
        Llama::from_gguf(&dir.join(GGUF_FILE), &dev).expect("cannot load SmolLM2");
    // Seeded token ids (what they are does not change a step's cost).
    let mut s = 7u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % 49_000) as u32
    };
    let ids: Vec<u32> = (0..b.batch * b.tokens).map(|_| next()).collect();
    let targets: Vec<u32> = (0..b.batch * b.response).map(|_| next()).collect();
    let torch_config = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(), "model_dir": dir, "gguf_file": GGUF_FILE,
        "ids": ids, "targets": targets, "batch": b.batch, "tokens": b.tokens,
        "response": b.response, "frozen": FROZEN, "steps": b.steps, "repeats": b.repeats,
    });
    let ids = Tensor::from_vec(ids, (b.batch, b.tokens), &dev).unwrap();
    let x = model.residual_after(&ids, FROZEN).unwrap().detach();
    let trained: Vec<Var> = {
        let data = varmap.data().lock().unwrap();
        let mut named: Vec<(&String, &Var)> = data
            .iter()
            .filter(|(n, _)| Llama::in_top(n, FROZEN))
            .collect();
        named.sort_by(|a, c| a.0.cmp(c.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    };
    let count = |v: &[Var]| v.iter().map(|v| v.elem_count()).sum::<usize>();
    let tokens = (b.batch * b.tokens) as f64;
    println!(
        "SmolLM2 training step: {} sequences of {} tokens ({} response), top {} layers from cached states, {} threads",
        b.batch,
        b.tokens,
        b.response,
        30 - FROZEN,
        candle_core::utils::get_num_threads()
    );
    let n = count(&trained);
    let (times, first) = time_steps(&model, trained, &x, &targets, &b);
    let ms = median(times);
    println!(
        "  top layers trained ({n} parameters): {ms:.0} ms/step, {:.0} tokens/s (first loss {first:.5})",
        tokens / ms * 1000.0
    );
    match crate::lm::run_torch(
        "bench/torch/llama_train_bench.py",
        &torch_config,
        "bench/llama-train.sh",
    ) {
        Ok(v) => {
            let theirs = v["ms"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  PyTorch {} / transformers {}, the same step: {theirs:.0} ms/step, {:.0} tokens/s (first loss {:.5}); hone / PyTorch {:.2}",
                v["torch"].as_str().unwrap_or("?"),
                v["transformers"].as_str().unwrap_or("?"),
                tokens / theirs * 1000.0,
                v["first_loss"].as_f64().unwrap_or(f64::NAN),
                theirs / ms
            );
        }
        Err(e) => println!("  (PyTorch comparison missing: {e})"),
    }
    let lora = LoraConfig {
        rank: 16,
        alpha: 32.0,
        targets: LLAMA_TARGETS.iter().map(|t| t.to_string()).collect(),
    };
    let adapters: Vec<Var> = model
        .add_lora(&lora, FROZEN..30, 1)
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let n = count(&adapters);
    let lora_ms = median(time_steps(&model, adapters, &x, &targets, &b).0);
    println!(
        "  LoRA rank 16 on all 7 projections ({n} parameters): {lora_ms:.0} ms/step, {:.0} tokens/s ({:.2}x the full layers' speed)",
        tokens / lora_ms * 1000.0,
        ms / lora_ms
    );
}
