//! Asks SmolLM2-135M-Instruct one question and scores its answer with a
//! freshly initialised MiniLM reward model:
//! `cargo run -p hone-pretrained --example chat -- "What is the capital of France?"`.

use std::time::Instant;

use hone_pretrained::{minilm, smollm, Device, MiniLmRewardModel, SmolLm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the capital of France?".to_string());
    let device = Device::Cpu;

    let started = Instant::now();
    let mut policy = SmolLm::load(&hone_sdk::pretrained::fetch(smollm::MODEL_NAME)?, &device)?;
    println!("SmolLM2 loaded in {:.2?}", started.elapsed());

    let started = Instant::now();
    let (answer, logprobs) = policy.generate(&SmolLm::chat_prompt(&question), 128, 0.0, 0)?;
    let elapsed = started.elapsed();
    let total: f32 = logprobs.iter().sum();
    println!(
        "{answer}\n({} tokens in {elapsed:.2?} with the prompt's prefill, log-prob {total:.3})",
        logprobs.len()
    );

    let reward_model = MiniLmRewardModel::load(
        &hone_sdk::pretrained::fetch(minilm::MODEL_NAME)?,
        &device,
        0,
    )?;
    let reward = reward_model.score(&[&question], &[&answer])?[0];
    println!("reward (untrained head, seed 0): {reward:.4}");
    Ok(())
}
