//! Sampling several continuations of one prompt from a [`Llama`] at once.
//!
//! The prompt's prefill runs once, on one row; its keys and values are then
//! copied to every sample's row and the rows decode together, one token a
//! step, so that the weights are read once a step for all of them (batch-1
//! decoding is bound by reading the 540 MB of SmolLM2's weights per token).
//! A row leaves the batch when it draws a stop token.
//!
//! Each sample draws from its own RNG stream, seeded by the caller: a
//! sample's tokens depend on its seed and the prompt, not on which other
//! samples share its batch.

use candle_core::{Tensor, D};
use candle_transformers::generation::LogitsProcessor;

use crate::llama::Llama;
use crate::{Error, Result};

/// One sampled continuation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuation {
    /// The generated tokens, the stop token left out.
    pub tokens: Vec<u32>,
    /// The log-probability of every drawn token under the model's own
    /// distribution (temperature 1), the stop token included.
    pub logprobs: Vec<f32>,
    /// The stop token it ended at; None when it ran to `max_new_tokens`.
    pub stop_token: Option<u32>,
}

/// Samples `seeds.len()` continuations of `prompt` (token ids), each of at
/// most `max_new_tokens` tokens, ending at any of `stop_tokens`.
///
/// `temperature` 0 decodes greedily; above 0 it samples from the tempered
/// softmax with an RNG seeded by the sample's seed. The log-probabilities
/// are always the untempered ones.
pub fn continuations(
    model: &Llama,
    prompt: &[u32],
    seeds: &[u64],
    max_new_tokens: usize,
    temperature: f64,
    stop_tokens: &[u32],
) -> Result<Vec<Continuation>> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() + max_new_tokens > context {
        return Err(Error::Input(format!(
            "prompt ({} tokens) + max_new_tokens ({max_new_tokens}) exceeds the {context}-token context",
            prompt.len()
        )));
    }
    let mut out = vec![Continuation::default(); seeds.len()];
    if seeds.is_empty() || max_new_tokens == 0 {
        return Ok(out);
    }
    let device = model.device();
    let temperature = (temperature > 0.0).then_some(temperature);
    let mut samplers: Vec<LogitsProcessor> = seeds
        .iter()
        .map(|&seed| LogitsProcessor::new(seed, temperature, None))
        .collect();
    let mut cache = model.new_cache();
    let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
    // [rows, vocab]; after the prefill, one row that every sample draws from.
    let mut logits = model.next_logits_cached(&ids, &mut cache)?;
    let mut cache = cache.select_rows(&vec![0; seeds.len()])?;
    // The sample each batch row belongs to.
    let mut active: Vec<usize> = (0..seeds.len()).collect();
    for step in 0..max_new_tokens {
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let shared = logits.dim(0)? == 1;
        let (mut keep, mut next) = (Vec::new(), Vec::new());
        for (row, &sample) in active.iter().enumerate() {
            let at = if shared { 0 } else { row };
            let token = samplers[sample].sample(&logits.get(at)?)?;
            let logprob = logprobs.get(at)?.get(token as usize)?.to_scalar::<f32>()?;
            let c = &mut out[sample];
            c.logprobs.push(logprob);
            if stop_tokens.contains(&token) {
                c.stop_token = Some(token);
                continue;
            }
            c.tokens.push(token);
            keep.push(row as u32);
            next.push(token);
        }
        if keep.is_empty() || step + 1 == max_new_tokens {
            break;
        }
        if keep.len() < active.len() {
            cache = cache.select_rows(&keep)?;
            active = keep.iter().map(|&r| active[r as usize]).collect();
        }
        let step_ids = Tensor::from_vec(next, (active.len(), 1), device)?;
        logits = model.next_logits_cached(&step_ids, &mut cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::tiny;

    const PROMPT: [u32; 6] = [3, 17, 42, 8, 1, 29];

    /// log_softmax of the whole sequence's logits at each generated token.
    fn teacher_forced(model: &Llama, c: &Continuation, stop: Option<u32>) -> Vec<f32> {
        let mut ids = PROMPT.to_vec();
        ids.extend(&c.tokens);
        let drawn: Vec<u32> = c.tokens.iter().copied().chain(stop).collect();
        let input = Tensor::new(ids.as_slice(), model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&model.forward(&input).unwrap(), D::Minus1)
            .unwrap()
            .squeeze(0)
            .unwrap();
        drawn
            .iter()
            .enumerate()
            .map(|(i, &tok)| {
                let at = PROMPT.len() - 1 + i;
                logp.get(at)
                    .unwrap()
                    .get(tok as usize)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn rows_that_stop_leave_the_batch_and_the_others_keep_their_logprobs() {
        let model = tiny();
        // One token in five stops: rows end at different steps, so the
        // cache is cut down several times.
        let stop: Vec<u32> = (0..50).step_by(5).collect();
        let seeds: Vec<u64> = (0..16).collect();
        let out = continuations(&model, &PROMPT, &seeds, 12, 1.0, &stop).unwrap();
        let mut lengths: Vec<usize> = out.iter().map(|c| c.tokens.len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        assert!(
            lengths.len() >= 3,
            "rows ended at too few distinct steps: {lengths:?}"
        );
        for c in &out {
            assert!(c.tokens.iter().all(|t| t % 5 != 0), "{c:?}");
            match c.stop_token {
                Some(t) => assert!(t % 5 == 0 && c.logprobs.len() == c.tokens.len() + 1),
                None => assert!(c.tokens.len() == 12 && c.logprobs.len() == 12),
            }
            let expected = teacher_forced(&model, c, c.stop_token);
            for (a, b) in c.logprobs.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-4, "log-prob {a} against {b} in {c:?}");
            }
        }
    }

    #[test]
    fn a_sample_depends_on_its_seed_not_its_batch() {
        let model = tiny();
        let seeds = [11, 12, 13, 14];
        let together = continuations(&model, &PROMPT, &seeds, 10, 0.8, &[0]).unwrap();
        for (i, &seed) in seeds.iter().enumerate() {
            let alone = continuations(&model, &PROMPT, &[seed], 10, 0.8, &[0]).unwrap();
            assert_eq!(alone[0].tokens, together[i].tokens, "seed {seed}");
        }
        assert_ne!(
            together[0].tokens, together[1].tokens,
            "seeds 11 and 12 drew alike"
        );
        // Temperature 0: every seed decodes greedily, to the same tokens.
        let greedy = continuations(&model, &PROMPT, &seeds, 10, 0.0, &[]).unwrap();
        assert!(greedy
            .iter()
            .all(|c| c.tokens == greedy[0].tokens && c.stop_token.is_none()));
    }

    #[test]
    fn an_empty_prompt_or_one_past_the_context_is_an_error() {
        let model = tiny();
        let err = continuations(&model, &[], &[1], 4, 1.0, &[]).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = continuations(&model, &PROMPT, &[1], 60, 1.0, &[]).unwrap_err();
        assert!(err.to_string().contains("64-token context"), "{err}");
    }
}
