//! `hone-bench llama-gen`: greedy generation with SmolLM2-135M (f32,
//! dequantized from the pinned GGUF) through hone's trainable Llama port,
//! with its KV cache and without (a forward pass over the whole sequence
//! per token), beside candle-transformers' quantized-Llama runner that
//! `lm.rollout` uses for the pretrained model. Batch 1 and 8, the same
//! prompt; medians of the repeats.

use candle_core::{Device, Tensor, D};
use hone_pretrained::llama::Llama;
use hone_pretrained::sample::continuations;
use hone_pretrained::smollm::{SmolLm, GGUF_FILE, MODEL_NAME};
use std::time::Instant;

/// The benchmark's settings.
pub struct LlamaGenBench {
    /// New tokens per generation.
    pub tokens: usize,
    /// Repeats (median reported).
    pub repeats: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn argmax_last(logits: &Tensor) -> Vec<u32> {
    let (_, t, _) = logits.dims3().unwrap();
    logits
        .narrow(1, t - 1, 1)
        .and_then(|l| l.squeeze(1))
        .and_then(|l| l.argmax(D::Minus1))
        .and_then(|l| l.to_vec1::<u32>())
        .unwrap()
}

/// Generated tokens per second for `batch` copies of `prompt`.
fn port(model: &Llama, prompt: &[u32], batch: usize, tokens: usize, cached: bool) -> f64 {
    let rows: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let mut ids = Tensor::from_vec(rows, (batch, prompt.len()), &Device::Cpu).unwrap();
    let started = Instant::now();
    if cached {
        let mut cache = model.new_cache();
        let mut next = argmax_last(&model.forward_cached(&ids, &mut cache).unwrap());
        for _ in 1..tokens {
            let step = Tensor::from_vec(next.clone(), (batch, 1), &Device::Cpu).unwrap();
            next = argmax_last(&model.forward_cached(&step, &mut cache).unwrap());
        }
    } else {
        for _ in 0..tokens {
            let next = argmax_last(&model.forward(&ids).unwrap());
            let step = Tensor::from_vec(next, (batch, 1), &Device::Cpu).unwrap();
            ids = Tensor::cat(&[&ids, &step], 1).unwrap();
        }
    }
    (batch * tokens) as f64 / started.elapsed().as_secs_f64()
}

/// Runs the benchmark and prints its table.
pub fn run(b: LlamaGenBench) {
    let dir = hone_sdk::pretrained::fetch(MODEL_NAME).expect("SmolLM2 fetched");
    let (model, _vars) = Llama::from_gguf(&dir.join(GGUF_FILE), &Device::Cpu).unwrap();
    let mut runner = SmolLm::load(&dir, &Device::Cpu).unwrap();
    let prompt = SmolLm::chat_prompt("Give three tips for staying healthy.");
    let ids = runner
        .tokenizer()
        .encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    println!(
        "# SmolLM2-135M f32 greedy generation, {} new tokens after a {}-token prompt, median of {}, {} threads\n",
        b.tokens,
        ids.len(),
        b.repeats,
        candle_core::utils::get_num_threads()
    );
    println!("| path | batch | tokens/s |");
    println!("|---|---|---|");
    let times = |f: &mut dyn FnMut() -> f64| median((0..b.repeats).map(|_| f()).collect());
    let runner_rate = times(&mut || {
        let t = Instant::now();
        runner.generate(&prompt, b.tokens, 0.0, 0).unwrap();
        b.tokens as f64 / t.elapsed().as_secs_f64()
    });
    println!("| candle-transformers quantized_llama (SmolLm, the reference runner) | 1 | {runner_rate:.1} |");
    for batch in [1, 8] {
        // lm.rollout's path: `batch` samples of one prompt (one prefill,
        // copied to every row), temperature 0.7, no stop token so that
        // every row runs the full length.
        let seeds: Vec<u64> = (0..batch as u64).collect();
        let sampled = times(&mut || {
            let t = Instant::now();
            continuations(&model, &ids, &seeds, b.tokens, 0.7, &[]).unwrap();
            (batch * b.tokens) as f64 / t.elapsed().as_secs_f64()
        });
        println!("| hone sample::continuations (lm.rollout), samples of one prompt | {batch} | {sampled:.1} |");
        let cached = times(&mut || port(&model, &ids, batch, b.tokens, true));
        let uncached = times(&mut || port(&model, &ids, batch, b.tokens, false));
        println!("| hone Llama port, KV cache | {batch} | {cached:.1} |");
        println!(
            "| hone Llama port, no cache | {batch} | {uncached:.1} (cache: {:.1}x) |",
            cached / uncached
        );
    }
}
