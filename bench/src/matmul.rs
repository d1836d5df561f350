//! The machine's f32 matmul peak: GFLOP/s of candle's CPU matmul (the gemm
//! crate, which hone's fused ops call too) against PyTorch's at the LM
//! benchmark's shapes and a large square one, in the same run. The share
//! of this peak is what says how far a training step has left to go.

use crate::lm::run_torch;
use crate::median;
use hone_models::{Device, Tensor};
use std::time::Instant;

/// `[m, k] x [k, n]` products of a training step of the LM benchmark's GPT
/// (2,048 tokens, width 128, MLP 512, vocabulary 259), then a square one.
pub const SHAPES: [(usize, usize, usize, &str); 7] = [
    (2048, 128, 384, "qkv projection"),
    (2048, 128, 512, "MLP up"),
    (2048, 512, 128, "MLP down; its input gradient"),
    (2048, 128, 259, "LM head"),
    (384, 2048, 128, "a weight gradient (inner = tokens)"),
    (128, 32, 128, "attention scores, one head"),
    (1024, 1024, 1024, "square"),
];

fn gflops(m: usize, k: usize, n: usize, repeats: usize) -> hone_models::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
    let flop = 2.0 * (m * k * n) as f64;
    let iters = ((2.5e9 / flop) as usize).max(1);
    a.matmul(&b)?;
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        for _ in 0..iters {
            a.matmul(&b)?;
        }
        rates.push(iters as f64 * flop / start.elapsed().as_secs_f64() / 1e9);
    }
    Ok(median(rates))
}

/// The machine's f32 matmul peak for the current thread count, in GFLOP/s:
/// the faster of hone's gemm and PyTorch's (when it runs) on the large
/// square product, with which one it was.
pub fn peak(threads: usize) -> (f64, &'static str) {
    let (m, k, n, _) = SHAPES[SHAPES.len() - 1];
    let ours = gflops(m, k, n, 5).expect("hone matmul runs");
    let config = serde_json::json!({"threads": threads, "repeats": 5, "shapes": [[m, k, n]]});
    let theirs = run_torch("bench/torch/matmul_bench.py", &config, "bench/lm.sh")
        .ok()
        .and_then(|v| v["gflops"][0].as_f64());
    match theirs {
        Some(t) if t > ours => (t, "PyTorch"),
        _ => (ours, "hone's gemm"),
    }
}

/// Prints the table for `threads` kernel threads.
pub fn run(threads: usize, repeats: usize) {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let config = serde_json::json!({
        "threads": threads,
        "repeats": repeats,
        "shapes": SHAPES.iter().map(|&(m, k, n, _)| [m, k, n]).collect::<Vec<_>>(),
    });
    let reference = run_torch("bench/torch/matmul_bench.py", &config, "bench/lm.sh");
    println!("## f32 matmul, {threads} threads, GFLOP/s, median of {repeats}\n");
    println!("| [m, k] x [k, n] | what | hone (gemm) | PyTorch | hone / PyTorch |");
    println!("|---|---|---|---|---|");
    for (i, &(m, k, n, what)) in SHAPES.iter().enumerate() {
        let ours = gflops(m, k, n, repeats).expect("hone matmul runs");
        let theirs = reference
            .as_ref()
            .ok()
            .and_then(|v| v["gflops"][i].as_f64());
        match theirs {
            Some(t) => println!(
                "| [{m}, {k}] x [{k}, {n}] | {what} | {ours:.1} | {t:.1} | {:.2} |",
                ours / t
            ),
            None => println!("| [{m}, {k}] x [{k}, {n}] | {what} | {ours:.1} | - | - |"),
        }
    }
    match &reference {
        Ok(v) => println!("\nPyTorch {}.", v["torch"].as_str().unwrap_or("?")),
        Err(e) => println!("\n(PyTorch column missing: {e})"),
    }
}
