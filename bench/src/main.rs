//! hone's benchmarks, printed as tables with medians and ratios measured in
//! the same run. Build the release workspace first:
//!
//! ```sh
//! cargo build --release && ./target/release/hone-bench
//! ```
//!
//! 1. Pipeline throughput: records/s through `jsonl.read-pairs -> filter.pairs
//!    -> testing.discard` at 1 and 2 workers, against reading alone.
//! 2. The plugin boundary: `testing.passthrough` called through the C ABI
//!    (bincode batches both ways) against the same stage called in-process.
//! 3. `hone-bench lm --threads T`: the GPT of hone-models against PyTorch (run
//!    through `bench/lm.sh`, which installs PyTorch in a virtualenv).
//! 4. `hone-bench learners --threads T`: a DPO step and a PPO step against
//!    the same losses in PyTorch (through `bench/learners.sh`).
//! 5. `hone-bench matmul --threads T`: f32 matmul GFLOP/s, hone's gemm
//!    against PyTorch's, at the LM benchmark's shapes and a square one.
//! 6. `hone-bench minilm --threads T`: all-MiniLM-L6-v2 embedding texts/s
//!    against PyTorch/transformers on the same HH-RLHF texts (through
//!    `bench/minilm.sh`).
//! 7. `hone-bench warm [--members 2,4,8] [--mb 135] [--reps 5]`: WARM merge
//!    (`hone_rm::merge`) GB/s against memcpy and file reads, and peak RSS per M.

mod learners;
mod llama_gen;
mod llama_train;
mod lm;
mod matmul;
mod minilm;
mod serve;
mod warm;

use hone::plugin::{Emitted, Registry, StageInstance};
use hone_sdk::abi::{decode_batch, encode_batch};
use hone_sdk::{Collected, Context, PreferencePair, Record, Stage, StageFactory, StageInit};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const REPEATS: usize = 5;

/// The median of the repeats' figures (every benchmark reports medians:
/// the machine is noisy).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs[xs.len() / 2]
}

fn release_dir() -> PathBuf {
    std::env::current_exe()
        .expect("exe")
        .parent()
        .expect("dir")
        .to_path_buf()
}

fn pair(i: usize) -> PreferencePair {
    PreferencePair::new(
        format!("bench:{i:09}"),
        format!(
            "\n\nHuman: question number {i}: how do I keep my {} plants alive?\n\nAssistant:",
            i % 13
        ),
        format!(
            " Water them when the top inch of soil is dry, variant {}.",
            i % 101
        ),
        format!(" Plants are hard, variant {}.", i % 89),
        "synthetic",
    )
}

fn write_dataset(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("pairs.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create dataset"));
    for i in 0..n {
        let p = pair(i);
        let line =
            serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected});
        writeln!(f, "{line}").expect("write dataset");
    }
    path
}

fn run_pipeline(hone: &Path, dir: &Path, data: &Path, with_filter: bool, workers: usize) -> f64 {
    let filter = if with_filter {
        "[stages.filter]\nkind = \"filter.pairs\"\ninputs = [\"read\"]\nconfig = { dedup = \"exact\" }\n\n"
    } else {
        ""
    };
    let sink_input = if with_filter { "filter" } else { "read" };
    let pipeline = format!(
        "[stages.read]\nkind = \"jsonl.read-pairs\"\nconfig = {{ path = {:?}, format = \"trl\" }}\n\n{filter}\
         [stages.sink]\nkind = \"testing.discard\"\ninputs = [\"{sink_input}\"]\n",
        data.to_string_lossy()
    );
    let p = dir.join("bench.toml");
    std::fs::write(&p, pipeline).expect("write pipeline");
    let start = Instant::now();
    let out = Command::new(hone)
        .args([
            "run",
            p.to_str().expect("utf-8"),
            "--replace",
            "-q",
            "--workers",
            &workers.to_string(),
        ])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .output()
        .expect("hone runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed().as_secs_f64()
}

fn pipeline_bench(n: usize) {
    let dir = std::env::temp_dir().join(format!("hone-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let data = write_dataset(&dir, n);
    let hone = release_dir().join("hone");
    println!(
        "## Pipeline throughput ({n} pairs, {} MB of JSON lines, median of {REPEATS})\n",
        std::fs::metadata(&data)
            .map(|m| m.len() / 1_000_000)
            .unwrap_or(0)
    );
    println!("| pipeline | workers | wall s | records/s | vs read only, 1 worker |");
    println!("|---|---|---|---|---|");
    let mut baseline = None;
    for (with_filter, label) in [
        (false, "jsonl.read-pairs -> discard"),
        (true, "jsonl.read-pairs -> filter.pairs -> discard"),
    ] {
        for workers in [1, 2] {
            let secs = median(
                (0..REPEATS)
                    .map(|_| run_pipeline(&hone, &dir, &data, with_filter, workers))
                    .collect(),
            );
            let rate = n as f64 / secs;
            let base = *baseline.get_or_insert(rate);
            println!(
                "| {label} | {workers} | {secs:.3} | {rate:.0} | {:.2}x |",
                rate / base
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn score(i: usize) -> Record {
    Record::Score(hone_sdk::Score {
        id: format!("s{i}"),
        prompt_id: format!("p{}", i % 64),
        name: "r".into(),
        value: i as f64,
    })
}

/// Makes the `i`-th record of a case.
type MakeRecord = fn(usize) -> Record;

/// Records/s of `calls` calls of one batch, median of [`REPEATS`].
fn rate(calls: usize, batch: usize, mut call: impl FnMut() -> usize) -> f64 {
    median(
        (0..REPEATS)
            .map(|_| {
                let start = Instant::now();
                let emitted: usize = (0..calls).map(|_| call()).sum();
                assert_eq!(emitted, calls * batch);
                (calls * batch) as f64 / start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn boundary_bench(total: usize) {
    let registry = Registry::load(&[release_dir()]);
    let kind = registry
        .kinds
        .get("testing.passthrough")
        .expect("build the workspace in release first");
    let init = StageInit::for_test("testing.passthrough", serde_json::json!({}));
    println!("\n## Plugin boundary: testing.passthrough, {total} records per measurement, median of {REPEATS}\n");
    println!(
        "| record | batch | in-process | in-process + the same bincode round trips | through the C ABI | ABI / in-process | ABI / in-process + bincode |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cases: [(&str, MakeRecord); 2] = [
        ("PreferencePair (~150 B of text)", |i| Record::Pair(pair(i))),
        ("Score (small)", score),
    ];
    for (label, make) in cases {
        for batch in [1usize, 16, 64, 256, 1024, 4096] {
            let records: Vec<Record> = (0..batch).map(make).collect();
            let calls = total / batch;
            let mut stage = hone_testing::Passthrough::create(&init).expect("create");
            let in_process = rate(calls, batch, || {
                let mut out = Collected::default();
                {
                    let mut ctx = Context::new(&mut out, &init, 0);
                    stage.on_batch(&mut ctx, 0, records.clone()).expect("batch");
                }
                out.records.values().map(Vec::len).sum()
            });
            // What the boundary does besides the call: encode, decode, and the same for the output.
            let with_bincode = rate(calls, batch, || {
                let bytes = encode_batch(&records);
                let input = decode_batch(&bytes).expect("decode");
                let mut out = Collected::default();
                {
                    let mut ctx = Context::new(&mut out, &init, 0);
                    stage.on_batch(&mut ctx, 0, input).expect("batch");
                }
                out.records
                    .values()
                    .map(|b| decode_batch(&encode_batch(b)).expect("decode").len())
                    .sum()
            });
            let mut instance = StageInstance::create(kind, &init).expect("create");
            let through_abi = rate(calls, batch, || {
                let mut out = Emitted::default();
                instance.on_batch(0, 0, &records, &mut out).expect("batch");
                out.records.iter().map(|(_, b)| b.len()).sum()
            });
            println!(
                "| {label} | {batch} | {in_process:.0} | {with_bincode:.0} | {through_abi:.0} | {:.2} | {:.2} |",
                through_abi / in_process,
                through_abi / with_bincode
            );
        }
    }
}

/// The `--threads T` argument (2 when absent).
fn threads(args: &[String]) -> usize {
    args.iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok())
        .unwrap_or(2)
}

fn main() {
    // As `hone` itself does: the models train in its process.
    hone::allocator::keep_freed_memory();
    hone::kernel_threads::one_kernel_pool();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("lm") {
        let threads = threads(&args);
        lm::run(lm::LmBench {
            threads,
            batch: 16,
            train_steps: 10,
            repeats: 5,
            gen_tokens: 64,
        });
        return;
    }
    if args.first().map(String::as_str) == Some("matmul") {
        matmul::run(threads(&args), 5);
        return;
    }
    if args.first().map(String::as_str) == Some("minilm") {
        minilm::run(minilm::MiniLmBench {
            threads: threads(&args),
            texts: 512,
            batch: 32,
            max_tokens: 128,
            repeats: 5,
        });
        return;
    }
    if args.first().map(String::as_str) == Some("learners") {
        let threads = threads(&args);
        learners::run(learners::LearnerBench {
            threads,
            steps: 5,
            repeats: 5,
        });
        return;
    }
    if args.first().map(String::as_str) == Some("llama-gen") {
        llama_gen::run(llama_gen::LlamaGenBench {
            tokens: 32,
            repeats: 3,
        });
        return;
    }
    if args.first().map(String::as_str) == Some("llama-train") {
        llama_train::run(llama_train::LlamaTrainBench {
            batch: 8,
            tokens: 192,
            response: 96,
            steps: 2,
            repeats: 5,
        });
        return;
    }
    if args.first().map(String::as_str) == Some("serve") {
        serve::run(serve::ServeBench {
            clients: vec![1, 4, 16],
            seconds: 5,
            repeats: 3,
        });
        return;
    }
    if args.first().map(String::as_str) == Some("warm-child") {
        warm::child(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("warm") {
        let flag = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
        };
        warm::run(&warm::WarmBench {
            members: flag("--members")
                .map(|s| {
                    s.split(',')
                        .map(|m| m.trim().parse().expect("--members: comma-separated counts"))
                        .collect()
                })
                .unwrap_or_else(|| vec![2, 4, 8]),
            mb: flag("--mb")
                .map(|s| s.parse().expect("--mb: a number"))
                .unwrap_or(135.0),
            reps: flag("--reps")
                .map(|s| s.parse().expect("--reps: a number"))
                .unwrap_or(5),
        });
        return;
    }
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    println!(
        "# hone benchmarks ({} cores)\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    pipeline_bench(n);
    boundary_bench(200_000);
}
