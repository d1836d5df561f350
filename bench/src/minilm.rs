//! `hone-bench minilm --threads T`: all-MiniLM-L6-v2 embedding of HH-RLHF
//! (prompt, response) texts through hone's BERT (`hone_pretrained::bert`,
//! the encoder `rm.train` fine-tunes and scores with), against
//! PyTorch/transformers' `BertModel` on the same token ids, in one run.
//!
//! Both sides see the same texts, tokenized once here (BERT's two segments,
//! truncated longest-first to 128 tokens, as `rm.train` does), sorted by
//! length and padded per batch of 32, as `Bert::frozen_states` batches
//! them. A text's embedding is the attention-masked mean of its last hidden
//! states; no gradients. Reported: texts/s, median of the repeats.
//!
//! Then a reward-model training step as `rm.train` runs it with
//! `train_layers = 2`: the pairs' hidden states after the frozen layers
//! 0-3 computed once (not timed), and each step 16 pairs through layers
//! 4-5, the mean pool and a linear head, the Bradley-Terry loss, its
//! backward pass and an AdamW step on those layers and the head; PyTorch
//! runs the same step on the same states' token ids. Reported: training
//! tokens/s (real tokens of the step's texts), median of the repeats.

use crate::median;
use candle_core::{Device, Tensor};
use hone_pretrained::bert::{self, Bert};
use std::io::{BufRead, BufReader};
use std::time::Instant;

/// The benchmark's settings.
pub struct MiniLmBench {
    pub threads: usize,
    /// Distinct texts embedded per repeat.
    pub texts: usize,
    pub batch: usize,
    pub max_tokens: usize,
    pub repeats: usize,
}

const HH: &str = "data/hh-rlhf-harmless-base-test/test.jsonl.gz";
const ASSISTANT: &str = "\n\nAssistant:";

/// (prompt, response) of the chosen and the rejected transcript of the
/// first records of HH-RLHF's harmless-base test split: text 2i is the
/// chosen and 2i + 1 the rejected response of pair i.
fn hh_texts(n: usize) -> Vec<(String, String)> {
    let file = std::fs::File::open(HH).unwrap_or_else(|e| panic!("cannot open {HH}: {e}"));
    let reader = BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let mut out = Vec::with_capacity(n);
    for line in reader.lines() {
        let record: serde_json::Value =
            serde_json::from_str(&line.expect("HH-RLHF reads")).expect("HH-RLHF is JSON Lines");
        let split = |key: &str| {
            let transcript = record[key].as_str().expect("a transcript");
            let at = transcript.rfind(ASSISTANT)?;
            let (prompt, response) = transcript.split_at(at + ASSISTANT.len());
            Some((prompt.to_string(), response.to_string()))
        };
        if let (Some(c), Some(r)) = (split("chosen"), split("rejected")) {
            out.extend([c, r]);
        }
        if out.len() >= n {
            break;
        }
    }
    out.truncate(n);
    out
}

type Padded = (Tensor, Tensor, Tensor);

/// Each batch padded: ids, segment ids, mask.
fn padded(batches: &[Vec<&(Vec<u32>, Vec<u32>)>]) -> Vec<Padded> {
    batches
        .iter()
        .map(|rows| bert::pad(rows, &Device::Cpu).unwrap())
        .collect()
}

/// The embeddings of one padded batch.
fn embed(model: &Bert, (ids, types, mask): &Padded) -> Vec<Vec<f32>> {
    let x = model.embed(ids, types).unwrap();
    let x = model.run_layers(&x, mask, 0..model.num_layers()).unwrap();
    bert::mean_pool(&x, mask).unwrap().to_vec2::<f32>().unwrap()
}

/// Texts/s of hone's BERT over the padded `batches` (padded before the
/// clock starts, as the PyTorch side's are).
fn ours(model: &Bert, batches: &[Padded], repeats: usize) -> f64 {
    let texts: usize = batches.iter().map(|b| b.0.dim(0).unwrap()).sum();
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        for batch in batches {
            embed(model, batch);
        }
        rates.push(texts as f64 / started.elapsed().as_secs_f64());
    }
    median(rates)
}

/// Pairs a training step takes, layers frozen below, steps per repeat.
const STEP_PAIRS: usize = 16;
const SPLIT: usize = 4;
const STEPS: usize = 5;

/// Training tokens/s of `rm.train`'s step with the top layers tuned, over
/// the pairs of `encoded` (text 2i chosen, 2i + 1 rejected).
fn ours_train(dir: &std::path::Path, encoded: &[(Vec<u32>, Vec<u32>)], repeats: usize) -> f64 {
    use candle_nn::{AdamW, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
    let device = Device::Cpu;
    let (model, varmap) = Bert::load(dir, &device).expect("MiniLM loads");
    let layers = model.num_layers();
    let states = model
        .frozen_states(encoded, SPLIT, 32, &mut |_, _| {})
        .expect("frozen layers run");
    let head_vars = VarMap::new();
    let head = candle_nn::linear(
        model.hidden_size(),
        1,
        VarBuilder::from_varmap(&head_vars, candle_core::DType::F32, &device),
    )
    .unwrap();
    let mut vars: Vec<candle_core::Var> = model
        .layer_vars(&varmap, SPLIT..layers)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    vars.extend(head_vars.all_vars());
    let params = ParamsAdamW {
        lr: 1e-4,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, params).unwrap();
    let pairs = encoded.len() / 2;
    assert!(
        pairs > STEP_PAIRS,
        "{pairs} pairs for steps of {STEP_PAIRS}"
    );
    let mut step = 0usize;
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        let mut tokens = 0;
        for _ in 0..STEPS {
            let first = (step * STEP_PAIRS) % (pairs - STEP_PAIRS + 1);
            step += 1;
            let chosen = (first..first + STEP_PAIRS).map(|i| &states[2 * i]);
            let rejected = (first..first + STEP_PAIRS).map(|i| &states[2 * i + 1]);
            let rows: Vec<&Tensor> = chosen.chain(rejected).collect();
            tokens += rows.iter().map(|t| t.dim(0).unwrap()).sum::<usize>();
            let pooled = model.pooled_from(&rows, SPLIT).unwrap();
            let r = head.forward(&pooled).unwrap().squeeze(1).unwrap();
            let diff = (r.narrow(0, 0, STEP_PAIRS).unwrap()
                - r.narrow(0, STEP_PAIRS, STEP_PAIRS).unwrap())
            .unwrap();
            let zeros = diff.zeros_like().unwrap();
            let ones = diff.ones_like().unwrap();
            let loss = hone_models::preference::bradley_terry_losses(&diff, &zeros, &ones, &zeros)
                .unwrap()
                .mean_all()
                .unwrap();
            opt.backward_step(&loss).unwrap();
            loss.to_scalar::<f32>().unwrap();
        }
        rates.push(tokens as f64 / started.elapsed().as_secs_f64());
    }
    median(rates)
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(b: MiniLmBench) {
    std::env::set_var("RAYON_NUM_THREADS", b.threads.to_string());
    let dir = hone_sdk::pretrained::fetch(bert_name()).expect("all-MiniLM-L6-v2 fetches");
    let (model, _) = Bert::load(&dir, &Device::Cpu).expect("MiniLM loads");
    let tokenizer = bert::pair_tokenizer(&dir, b.max_tokens).expect("MiniLM's tokenizer loads");
    let texts = hh_texts(b.texts);
    let pairs: Vec<(&str, &str)> = texts
        .iter()
        .map(|(p, r)| (p.as_str(), r.as_str()))
        .collect();
    let encoded = bert::encode_pairs(&tokenizer, &pairs).expect("texts tokenize");
    let mut order: Vec<&(Vec<u32>, Vec<u32>)> = encoded.iter().collect();
    order.sort_by_key(|e| e.0.len());
    let batches: Vec<Vec<&(Vec<u32>, Vec<u32>)>> =
        order.chunks(b.batch).map(<[_]>::to_vec).collect();
    let tokens: usize = encoded.iter().map(|e| e.0.len()).sum();
    println!(
        "## all-MiniLM-L6-v2 embedding, {} HH-RLHF texts ({} tokens, at most {} a text), batch {}: {} threads, median of {}\n",
        encoded.len(),
        tokens,
        b.max_tokens,
        b.batch,
        b.threads,
        b.repeats
    );

    // The same batches, as token ids, for the PyTorch side: too long for an
    // argument, so they go through a file.
    let ids_file =
        std::env::temp_dir().join(format!("hone-bench-minilm-{}.json", std::process::id()));
    let as_json: Vec<serde_json::Value> = batches
        .iter()
        .map(|rows| {
            serde_json::json!(rows
                .iter()
                .map(|(ids, types)| serde_json::json!([ids, types]))
                .collect::<Vec<_>>())
        })
        .collect();
    std::fs::write(&ids_file, serde_json::to_vec(&as_json).unwrap()).expect("ids file writes");

    // The pairs in text order, for the training step.
    let pairs_file = std::env::temp_dir().join(format!(
        "hone-bench-minilm-pairs-{}.json",
        std::process::id()
    ));
    std::fs::write(&pairs_file, serde_json::to_vec(&encoded).unwrap()).expect("pairs file writes");

    let padded = padded(&batches);
    let hone_rate = ours(&model, &padded, b.repeats);
    let hone_train = ours_train(&dir, &encoded, b.repeats);
    let config = serde_json::json!({
        "threads": b.threads, "model_dir": dir, "ids_file": ids_file, "repeats": b.repeats,
        "pairs_file": pairs_file, "split": SPLIT, "step_pairs": STEP_PAIRS, "steps": STEPS,
    });
    let reference = crate::lm::run_torch("bench/torch/minilm_bench.py", &config, "bench/minilm.sh");
    let _ = std::fs::remove_file(&ids_file);
    let _ = std::fs::remove_file(&pairs_file);
    println!("| | hone | PyTorch | hone / PyTorch |");
    println!("|---|---|---|---|");
    match &reference {
        Ok(v) => {
            let theirs = v["texts_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| embedding texts/s | {hone_rate:.1} | {theirs:.1} | {:.2} |",
                hone_rate / theirs
            );
            let theirs = v["train_tok_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| reward-model step, layers {SPLIT}-5 and head, {STEP_PAIRS} pairs: training tokens/s | {hone_train:.0} | {theirs:.0} | {:.2} |",
                hone_train / theirs
            );
            println!(
                "\nPyTorch {}, transformers {}; largest difference of the embeddings {}.",
                v["torch"].as_str().unwrap_or("?"),
                v["transformers"].as_str().unwrap_or("?"),
                check(&model, &padded[0], v)
            );
        }
        Err(e) => {
            println!("| embedding texts/s | {hone_rate:.1} | - | - |");
            println!("| reward-model step: training tokens/s | {hone_train:.0} | - | - |");
            println!("\n(PyTorch column missing: {e})");
        }
    }
}

fn bert_name() -> &'static str {
    "all-minilm-l6-v2"
}

/// The largest absolute difference between hone's embedding of the first
/// batch and the one PyTorch returned for it: the two must compute the same
/// function for the rates to compare.
fn check(model: &Bert, first: &Padded, v: &serde_json::Value) -> String {
    let Some(theirs) = v["first_batch"].as_array() else {
        return "not returned".into();
    };
    let ours = embed(model, first);
    let mut worst = 0f64;
    for (a, b) in ours.iter().zip(theirs) {
        for (x, y) in a.iter().zip(b.as_array().into_iter().flatten()) {
            worst = worst.max((*x as f64 - y.as_f64().unwrap_or(f64::NAN)).abs());
        }
    }
    format!("{worst:.1e}")
}
