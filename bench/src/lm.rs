//! The LM benchmark: training and generation tokens/s of hone's GPT on
//! candle against the same architecture in PyTorch on CPU, side by side in
//! one run. `bench/lm.sh` sets up PyTorch in a virtualenv and runs this.

use crate::median;
use hone_models::gpt::{Gpt, GptConfig, KvCache};
use hone_models::{DType, Device, Tensor, VarBuilder, VarMap};
use std::process::Command;
use std::time::Instant;

/// The benchmark's model and run sizes (the same JSON goes to the PyTorch script).
#[derive(Clone, Copy)]
pub struct LmBench {
    pub threads: usize,
    pub batch: usize,
    pub train_steps: usize,
    pub repeats: usize,
    pub gen_tokens: usize,
}

const CFG: GptConfig = GptConfig {
    vocab_size: 259,
    d_model: 128,
    n_layers: 4,
    n_heads: 4,
    context: 128,
};

/// Where a training step's time goes, in seconds per step.
#[derive(Default, Clone, Copy)]
struct Phases {
    forward: f64,
    backward: f64,
    optimiser: f64,
}

fn train(b: &LmBench, device: &Device) -> hone_models::Result<(f64, Phases)> {
    use candle_nn::Optimizer;
    let varmap = VarMap::new();
    let model = Gpt::new(&CFG, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    hone_models::gpt::init_seeded(&varmap, 0)?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let mut rng = hone_models::sample::Rng::new(0);
    let n = b.batch * (CFG.context + 1);
    let data: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % CFG.vocab_size as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(data, (b.batch, CFG.context + 1), device)?;
    let (input, target) = (
        ids.narrow(1, 0, CFG.context)?,
        ids.narrow(1, 1, CFG.context)?,
    );
    let mut phases = Phases::default();
    let mut step = |phases: &mut Phases| -> hone_models::Result<()> {
        let t0 = Instant::now();
        let logits = model.forward(&input)?;
        let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &target.flatten_all()?)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        phases.forward += (t1 - t0).as_secs_f64();
        phases.backward += (t2 - t1).as_secs_f64();
        phases.optimiser += (t3 - t2).as_secs_f64();
        Ok(())
    };
    step(&mut Phases::default())?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..b.repeats {
        let start = Instant::now();
        for _ in 0..b.train_steps {
            step(&mut phases)?;
        }
        rates.push((b.train_steps * b.batch * CFG.context) as f64 / start.elapsed().as_secs_f64());
    }
    let steps = (b.repeats * b.train_steps) as f64;
    let per_step = Phases {
        forward: phases.forward / steps,
        backward: phases.backward / steps,
        optimiser: phases.optimiser / steps,
    };
    Ok((median(rates), per_step))
}

fn generate(b: &LmBench, batch: usize, device: &Device) -> hone_models::Result<f64> {
    let varmap = VarMap::new();
    let model = Gpt::new(&CFG, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    hone_models::gpt::init_seeded(&varmap, 0)?;
    let prompt = Tensor::from_vec(vec![1u32; batch * 8], (batch, 8), device)?;
    let mut rates = Vec::new();
    for _ in 0..b.repeats {
        let start = Instant::now();
        let mut cache = KvCache::new(CFG.n_layers);
        let mut logits = model.forward_cached(&prompt, &mut cache)?;
        for _ in 0..b.gen_tokens {
            let last = logits.narrow(1, logits.dim(1)? - 1, 1)?;
            let next = last.argmax(candle_core::D::Minus1)?;
            logits = model.forward_cached(&next, &mut cache)?;
        }
        rates.push((batch * b.gen_tokens) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

fn torch(b: &LmBench) -> Result<serde_json::Value, String> {
    let config = serde_json::json!({
        "threads": b.threads, "vocab": CFG.vocab_size, "d_model": CFG.d_model, "n_layers": CFG.n_layers,
        "n_heads": CFG.n_heads, "context": CFG.context, "batch": b.batch, "train_steps": b.train_steps,
        "repeats": b.repeats, "gen_tokens": b.gen_tokens,
    });
    run_torch("bench/torch/gpt_bench.py", &config, "bench/lm.sh")
}

/// Runs a PyTorch reference `script` of bench/torch with `config` (JSON)
/// in the benchmark virtualenv (`$HONE_TORCH_PYTHON` to use another
/// Python); the JSON object it prints. `setup` names the script that
/// installs PyTorch, for the error.
pub fn run_torch(
    script: &str,
    config: &serde_json::Value,
    setup: &str,
) -> Result<serde_json::Value, String> {
    let python =
        std::env::var("HONE_TORCH_PYTHON").unwrap_or_else(|_| "bench/.venv/bin/python".into());
    let out = Command::new(&python)
        .arg(script)
        .arg(config.to_string())
        .output()
        .map_err(|e| format!("cannot run {python} (run {setup}, which installs PyTorch): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("PyTorch reference printed no JSON: {e}"))
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(b: LmBench) {
    // candle's CPU kernels read the thread count on first use.
    std::env::set_var("RAYON_NUM_THREADS", b.threads.to_string());
    let device = Device::Cpu;
    println!(
        "## GPT {}x{} layers, {} heads, context {}, vocab {}: {} threads, batch {}, median of {}\n",
        CFG.d_model,
        CFG.n_layers,
        CFG.n_heads,
        CFG.context,
        CFG.vocab_size,
        b.threads,
        b.batch,
        b.repeats
    );
    let (train_rate, phases) = train(&b, &device).expect("hone training runs");
    let gen1 = generate(&b, 1, &device).expect("hone generation runs");
    let gen16 = generate(&b, 16, &device).expect("hone generation runs");
    let reference = torch(&b);
    let field = |k: &str| reference.as_ref().ok().and_then(|v| v[k].as_f64());
    println!("| tokens/s | hone (candle 0.11) | PyTorch | hone / PyTorch |");
    println!("|---|---|---|---|");
    for (label, ours, key) in [
        ("train, batch 16 x 128", train_rate, "train_tok_s"),
        ("generate, KV cache, batch 1", gen1, "gen_b1_tok_s"),
        ("generate, KV cache, batch 16", gen16, "gen_b16_tok_s"),
    ] {
        match field(key) {
            Some(theirs) => println!(
                "| {label} | {ours:.0} | {theirs:.0} | {:.2} |",
                ours / theirs
            ),
            None => println!("| {label} | {ours:.0} | - | - |"),
        }
    }
    if let Err(e) = &reference {
        println!("\n(PyTorch column missing: {e})");
    } else if let Ok(v) = &reference {
        println!(
            "\nPyTorch {}; {} parameters.",
            v["torch"].as_str().unwrap_or("?"),
            v["params"]
        );
    }
    // Useful FLOPs of a training token: 6 per matmul weight (forward and
    // backward) plus attention's scores and mixing over the whole context
    // (3 x 4 T D a layer); hone's recomputed probabilities not counted.
    let weights = CFG.n_layers * 12 * CFG.d_model * CFG.d_model + CFG.d_model * CFG.vocab_size;
    let flop_per_token = (6 * weights + CFG.n_layers * 12 * CFG.context * CFG.d_model) as f64;
    let (peak, by) = crate::matmul::peak(b.threads);
    println!(
        "
Training at {:.1} MFLOP a token; the matmul peak is {peak:.0} GFLOP/s ({by}, [1024, 1024] x [1024, 1024]):",
        flop_per_token / 1e6
    );
    for (who, rate) in [
        ("hone", Some(train_rate)),
        ("PyTorch", field("train_tok_s")),
    ] {
        if let Some(rate) = rate {
            let gflops = rate * flop_per_token / 1e9;
            println!(
                "- {who}: {gflops:.1} GFLOP/s, {:.0}% of the peak",
                100.0 * gflops / peak
            );
        }
    }
    let total = phases.forward + phases.backward + phases.optimiser;
    println!(
        "\nhone training step: {:.0} ms (forward {:.0} ms = {:.0}%, backward {:.0} ms = {:.0}%, optimiser {:.0} ms = {:.0}%)",
        total * 1e3,
        phases.forward * 1e3,
        100.0 * phases.forward / total,
        phases.backward * 1e3,
        100.0 * phases.backward / total,
        phases.optimiser * 1e3,
        100.0 * phases.optimiser / total
    );
}
