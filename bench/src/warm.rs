//! The WARM merge benchmark: `hone_rm::merge` of M synthetic reward models
//! (GB/s of input read) against a plain memory copy and a plain file read of
//! the same bytes, measured in the same run, and the merge's peak RSS per M,
//! each merge run in a fresh child process (`hone-bench warm-child`).
//!
//! The files are read from the page cache (dropping it needs root): a warm-up
//! merge runs before the measurements.

use crate::median;
use hone_models::{Device, Tensor};
use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The benchmark's sizes.
pub struct WarmBench {
    /// The numbers of members to merge, one table row each.
    pub members: Vec<usize>,
    /// The target size of one model in MB (10^6 bytes) of f32.
    pub mb: f64,
    /// Repetitions per measurement (the median is reported).
    pub reps: usize,
}

const VOCAB: usize = 259;
const CONTEXT: usize = 1024;
const LAYERS: usize = 12;
/// The tensor whose merge is checked against the mean of the inputs.
const CHECKED: &str = "h.0.attn.c_proj.weight";

/// The tensor names and shapes of hone's GPT (`sdk/models/src/gpt.rs`) with
/// 12 layers, vocabulary 259 and context 1024.
fn gpt_shapes(d: usize) -> Vec<(String, Vec<usize>)> {
    let mut s = vec![
        ("wte.weight".to_string(), vec![VOCAB, d]),
        ("wpe.weight".to_string(), vec![CONTEXT, d]),
    ];
    for i in 0..LAYERS {
        let mut push = |name: &str, shape: Vec<usize>| s.push((format!("h.{i}.{name}"), shape));
        for (name, d_in, d_out) in [
            ("ln_1", 0, d),
            ("attn.c_attn", d, 3 * d),
            ("attn.c_proj", d, d),
            ("ln_2", 0, d),
            ("mlp.c_fc", d, 4 * d),
            ("mlp.c_proj", 4 * d, d),
        ] {
            // d_in 0: a layer norm, whose weight is a vector.
            let weight = if d_in == 0 {
                vec![d_out]
            } else {
                vec![d_out, d_in]
            };
            push(&format!("{name}.weight"), weight);
            push(&format!("{name}.bias"), vec![d_out]);
        }
    }
    s.push(("ln_f.weight".to_string(), vec![d]));
    s.push(("ln_f.bias".to_string(), vec![d]));
    s.push(("lm_head.weight".to_string(), vec![VOCAB, d]));
    s
}

fn parameters(shapes: &[(String, Vec<usize>)]) -> usize {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// The width (a multiple of 32) whose model is closest to `mb` MB of f32.
fn width_for(mb: f64) -> usize {
    let target = mb * 1e6 / 4.0;
    (1..=256)
        .map(|k| 32 * k)
        .min_by(|a, b| {
            let da = (parameters(&gpt_shapes(*a)) as f64 - target).abs();
            let db = (parameters(&gpt_shapes(*b)) as f64 - target).abs();
            da.partial_cmp(&db).expect("no NaN")
        })
        .expect("widths")
}

/// Writes member `seed`'s weights: uniform in [-0.05, 0.05), seeded.
fn write_member(path: &Path, shapes: &[(String, Vec<usize>)], seed: u64) {
    let mut rng = hone_models::sample::Rng::new(seed);
    let mut tensors = HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
            .collect();
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).expect("tensor");
        tensors.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&tensors, path).expect("write member");
}

/// `(VmRSS, VmHWM)` of this process in kB, from `/proc/self/status`.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `hone-bench warm-child OUT FILE...`: one merge with equal weights in a
/// fresh process; prints `rss_before_kb hwm_kb seconds`.
pub fn child(args: &[String]) {
    let out = PathBuf::from(&args[0]);
    let inputs: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
    let weights = vec![1.0; inputs.len()];
    let (before, _) = rss_kb();
    let start = Instant::now();
    hone_rm::merge(&inputs, &weights, &out).expect("merge");
    let secs = start.elapsed().as_secs_f64();
    let (_, hwm) = rss_kb();
    println!("{before} {hwm} {secs}");
}

/// Runs one merge in a fresh child process: `(RSS before, peak RSS)` in bytes.
fn child_rss(inputs: &[PathBuf], out: &Path) -> (f64, f64) {
    let exe = std::env::current_exe().expect("exe");
    let o = Command::new(exe)
        .arg("warm-child")
        .arg(out)
        .args(inputs)
        .output()
        .expect("child runs");
    assert!(
        o.status.success(),
        "warm-child: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line = String::from_utf8_lossy(&o.stdout);
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().expect("number"))
        .collect();
    (v[0] * 1024.0, v[1] * 1024.0)
}

/// Checks that the merged `CHECKED` tensor is the mean of the inputs' (1e-6).
fn check(bufs: &[Vec<u8>], merged: &Path) {
    let load = |b: &[u8]| -> Vec<f32> {
        let t = candle_core::safetensors::load_buffer(b, &Device::Cpu).expect("parse");
        t[CHECKED]
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("f32")
    };
    let got = load(&std::fs::read(merged).expect("read merged"));
    let inputs: Vec<Vec<f32>> = bufs.iter().map(|b| load(b)).collect();
    let worst = (0..got.len())
        .map(|j| {
            let mean = inputs.iter().map(|v| f64::from(v[j])).sum::<f64>() / inputs.len() as f64;
            (f64::from(got[j]) - mean).abs()
        })
        .fold(0.0, f64::max);
    assert!(
        worst <= 1e-6,
        "merged {CHECKED} differs from the mean of the inputs by {worst}"
    );
}

/// Removes the temporary directory however the benchmark ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(b: &WarmBench) {
    let d = width_for(b.mb);
    let shapes = gpt_shapes(d);
    let params = parameters(&shapes);
    assert!(
        b.members.iter().all(|&m| m >= 1),
        "--members: counts of at least 1"
    );
    let max_m = b.members.iter().copied().max().unwrap_or(2);
    let dir = TempDir(std::env::temp_dir().join(format!("hone-bench-warm-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let start = Instant::now();
    let files: Vec<PathBuf> = (0..max_m)
        .map(|i| {
            let p = dir.0.join(format!("member-{i}.safetensors"));
            write_member(&p, &shapes, 1000 + i as u64);
            p
        })
        .collect();
    let file_bytes = std::fs::metadata(&files[0]).expect("member").len() as f64;
    eprintln!(
        "wrote {max_m} members in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let out = dir.0.join("merged.safetensors");
    let reps = b.reps.max(1);
    println!(
        "## WARM merge: GPT d_model {d}, {LAYERS} layers, vocab {VOCAB}, {params} f32 parameters \
         ({:.1} MB per file), median of {reps}\n",
        file_bytes / 1e6
    );
    println!(
        "| M | model MB | merge GB/s | memcpy GB/s | read GB/s | merge / memcpy | merge / read | \
         child RSS before merge MB | peak RSS MB | peak RSS / model | (peak - before) / model |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut write_secs = Vec::new();
    for &m in &b.members {
        let inputs = &files[..m];
        let weights = vec![1.0; m];
        let bytes = m as f64 * file_bytes;
        // Warm-up: brings the files into the page cache; checks the result.
        let bufs: Vec<Vec<u8>> = inputs
            .iter()
            .map(|p| std::fs::read(p).expect("read"))
            .collect();
        hone_rm::merge(inputs, &weights, &out).expect("merge");
        check(&bufs, &out);
        let merge = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    hone_rm::merge(inputs, &weights, &out).expect("merge");
                    bytes / t.elapsed().as_secs_f64() / 1e9
                })
                .collect(),
        );
        let mut dst = vec![0u8; bufs[0].len()];
        dst.copy_from_slice(&bufs[0]);
        let memcpy = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    for src in &bufs {
                        dst.copy_from_slice(black_box(src));
                        black_box(&mut dst);
                    }
                    bytes / t.elapsed().as_secs_f64() / 1e9
                })
                .collect(),
        );
        drop(dst);
        let read = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    for p in inputs {
                        black_box(std::fs::read(p).expect("read"));
                    }
                    bytes / t.elapsed().as_secs_f64() / 1e9
                })
                .collect(),
        );
        // What the merge spends writing its output: one model, written and fsync'd.
        for _ in 0..reps {
            let p = dir.0.join("write-test");
            let t = Instant::now();
            std::fs::write(&p, &bufs[0]).expect("write");
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .expect("sync");
            write_secs.push(t.elapsed().as_secs_f64());
        }
        drop(bufs);
        let (before, peak) = child_rss(inputs, &out);
        println!(
            "| {m} | {:.1} | {merge:.2} | {memcpy:.2} | {read:.2} | {:.3} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} |",
            file_bytes / 1e6,
            merge / memcpy,
            merge / read,
            before / 1e6,
            peak / 1e6,
            peak / file_bytes,
            (peak - before) / file_bytes,
        );
    }
    println!(
        "\nEach merge also writes and fsyncs one model: writing + fsync of {:.1} MB alone takes \
         {:.3} s (median). Merged tensor {CHECKED} checked against the mean of the inputs (1e-6).",
        file_bytes / 1e6,
        median(write_secs)
    );
}
