//! `hone-bench llama-gen`: greedy generation with SmolLM2-135M (f32,
//! dequantized from the pinned GGUF) through hone's trainable Llama port,
//! with its KV cache and without (a forward pass over the whole sequence
//! per token), beside candle-transformers' quantized-Llama runner that
//! `lm.rollout` uses for the pretrained model. Batch 1 and 8, the same
//! prompt; medians of the repeats. Then PyTorch/transformers on the same
//! GGUF file and prompt ids (bench/torch/llama_gen_bench.py, in
//! bench/.venv: `bench/llama-gen.sh` installs it), in the same run.

use crate::median;
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

fn argmax_last(logits: &Tensor) -> Vec<u32> {
    let (_, t, _) = logits.dims3().unwrap();
    logits
        .narrow(1, t - 1, 1)
        .and_then(|l| l.squeeze(1))
        .and_then(|l| l.argmax(D::Minus1))
        .and_then(|l| l.to_vec1::<u32>())
        .unwrap()
}

/// The greedy continuation of `batch` copies of `prompt` with the KV
/// cache (the LM head on the last position only); the first row's tokens.
fn cached_greedy(model: &Llama, prompt: &[u32], batch: usize, tokens: usize) -> Vec<u32> {
    let rows: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let ids = Tensor::from_vec(rows, (batch, prompt.len()), &Device::Cpu).unwrap();
    let argmax = |logits: Tensor| logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let mut cache = model.new_cache();
    let mut next = argmax(model.next_logits_cached(&ids, &mut cache).unwrap());
    let mut first_row = vec![next[0]];
    for _ in 1..tokens {
        let step = Tensor::from_vec(next.clone(), (batch, 1), &Device::Cpu).unwrap();
        next = argmax(model.next_logits_cached(&step, &mut cache).unwrap());
        first_row.push(next[0]);
    }
    first_row
}

/// Generated tokens per second for `batch` copies of `prompt`.
fn port(model: &Llama, prompt: &[u32], batch: usize, tokens: usize, cached: bool) -> f64 {
    let rows: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let mut ids = Tensor::from_vec(rows, (batch, prompt.len()), &Device::Cpu).unwrap();
    let started = Instant::now();
    if cached {
        cached_greedy(model, prompt, batch, tokens);
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
    let mut port_rates = Vec::new();
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
        port_rates.push((batch, cached));
        println!(
            "| hone Llama port, no cache | {batch} | {uncached:.1} (cache: {:.1}x) |",
            cached / uncached
        );
    }
    let config = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(), "model_dir": dir, "gguf_file": GGUF_FILE,
        "prompt": ids, "tokens": b.tokens, "batches": [1, 8], "repeats": b.repeats,
    });
    let reference = crate::lm::run_torch(
        "bench/torch/llama_gen_bench.py",
        &config,
        "bench/llama-gen.sh",
    );
    let v = match reference {
        Ok(v) => v,
        Err(e) => {
            println!("\n(PyTorch comparison missing: {e})");
            return;
        }
    };
    println!("\n| batch | hone port, KV cache | transformers, forward loop with cache | hone / that | transformers `generate` | hone / that |");
    println!("|---|---|---|---|---|---|");
    for (batch, ours) in port_rates {
        let (lp, gen) = (
            v[format!("loop_{batch}")].as_f64().unwrap_or(f64::NAN),
            v[format!("generate_{batch}")].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "| {batch} | {ours:.1} | {lp:.1} | {:.2} | {gen:.1} | {:.2} |",
            ours / lp,
            ours / gen
        );
    }
    let ours = cached_greedy(&model, &ids, 1, b.tokens);
    let theirs: Vec<u32> = v["greedy_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default();
    let agree = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
    println!(
        "\nPyTorch {}, transformers {}. The two greedy continuations agree on their first {agree} of {} tokens.",
        v["torch"].as_str().unwrap_or("?"),
        v["transformers"].as_str().unwrap_or("?"),
        b.tokens
    );
}
