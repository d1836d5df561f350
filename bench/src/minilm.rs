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

use candle_core::Device;
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
/// first records of HH-RLHF's harmless-base test split.
fn hh_texts(n: usize) -> Vec<(String, String)> {
    let file = std::fs::File::open(HH).unwrap_or_else(|e| panic!("cannot open {HH}: {e}"));
    let reader = BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let mut out = Vec::with_capacity(n);
    for line in reader.lines() {
        let record: serde_json::Value =
            serde_json::from_str(&line.expect("HH-RLHF reads")).expect("HH-RLHF is JSON Lines");
        for key in ["chosen", "rejected"] {
            let transcript = record[key].as_str().expect("a transcript");
            if let Some(at) = transcript.rfind(ASSISTANT) {
                let (prompt, response) = transcript.split_at(at + ASSISTANT.len());
                out.push((prompt.to_string(), response.to_string()));
            }
        }
        if out.len() >= n {
            break;
        }
    }
    out.truncate(n);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Texts/s of hone's BERT over `batches` (ids and segment ids of each text).
fn ours(model: &Bert, batches: &[Vec<&(Vec<u32>, Vec<u32>)>], repeats: usize) -> f64 {
    let device = Device::Cpu;
    let texts: usize = batches.iter().map(Vec::len).sum();
    let layers = model.num_layers();
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        for rows in batches {
            let (ids, types, mask) = bert::pad(rows, &device).unwrap();
            let x = model.embed(&ids, &types).unwrap();
            let x = model.run_layers(&x, &mask, 0..layers).unwrap();
            bert::mean_pool(&x, &mask)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
        }
        rates.push(texts as f64 / started.elapsed().as_secs_f64());
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

    let hone_rate = ours(&model, &batches, b.repeats);
    let config = serde_json::json!({
        "threads": b.threads, "model_dir": dir, "ids_file": ids_file, "repeats": b.repeats,
    });
    let reference = crate::lm::run_torch("bench/torch/minilm_bench.py", &config, "bench/minilm.sh");
    let _ = std::fs::remove_file(&ids_file);
    println!("| | hone | PyTorch | hone / PyTorch |");
    println!("|---|---|---|---|");
    match &reference {
        Ok(v) => {
            let theirs = v["texts_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| embedding texts/s | {hone_rate:.1} | {theirs:.1} | {:.2} |",
                hone_rate / theirs
            );
            println!(
                "\nPyTorch {}, transformers {}; largest difference of the embeddings {}.",
                v["torch"].as_str().unwrap_or("?"),
                v["transformers"].as_str().unwrap_or("?"),
                check(&model, &batches, v)
            );
        }
        Err(e) => {
            println!("| embedding texts/s | {hone_rate:.1} | - | - |");
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
fn check(model: &Bert, batches: &[Vec<&(Vec<u32>, Vec<u32>)>], v: &serde_json::Value) -> String {
    let Some(theirs) = v["first_batch"].as_array() else {
        return "not returned".into();
    };
    let device = Device::Cpu;
    let (ids, types, mask) = bert::pad(&batches[0], &device).unwrap();
    let x = model.embed(&ids, &types).unwrap();
    let x = model.run_layers(&x, &mask, 0..model.num_layers()).unwrap();
    let ours = bert::mean_pool(&x, &mask)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f64;
    for (a, b) in ours.iter().zip(theirs) {
        for (x, y) in a.iter().zip(b.as_array().into_iter().flatten()) {
            worst = worst.max((*x as f64 - y.as_f64().unwrap_or(f64::NAN)).abs());
        }
    }
    format!("{worst:.1e}")
}
