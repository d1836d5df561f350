//! A completion the policy sampled, as teacher-forced training data for the
//! learners that learn from their own samples (lm.grpo, lm.ppo): the ids
//! laid out as lm.rollout fed them to the model, with the sampler's and the
//! reference's log-probs of each response token beside them.

use crate::sft::data::Example;
use hone_models::tokenizer::Tokenizer;
use hone_models::{Device, Tensor};
use hone_sdk::Completion;

/// One sampled completion ready to learn from.
pub(crate) struct Sampled {
    pub id: String,
    /// `BOS prompt completion`, cut as lm.rollout cut it; the mask is on the
    /// sampled tokens (from position `first`).
    pub example: Example,
    /// The first masked position: where the response's tokens start.
    pub first: usize,
    /// log π_old of each response token that fits (the sampler's).
    pub old: Vec<f32>,
    /// log π_ref of the same tokens (empty without lm.logprobs).
    pub reference: Vec<f32>,
}

impl Sampled {
    /// `BOS prompt` then the sampled ids, the prompt cut to its last
    /// `context - max_new_tokens` tokens exactly as lm.rollout cut it when
    /// sampling (and lm.logprobs when scoring), so the ratio starts at 1
    /// and the reference's log-probs line up.
    pub fn new(tok: &dyn Tokenizer, c: &Completion, context: usize, max_new_tokens: usize) -> Self {
        let mut ids = vec![tok.bos_id()];
        ids.extend(tok.encode(&c.prompt));
        let prompt_len = ids.len();
        ids.extend(&c.token_ids);
        let start =
            crate::teacher_forcing_start(prompt_len, c.token_ids.len(), context, max_new_tokens);
        let mut ids = ids.split_off(start);
        ids.truncate(context + 1);
        let first = prompt_len - 1 - start;
        let kept = (ids.len() - 1).saturating_sub(first);
        Sampled {
            id: c.id.clone(),
            example: Example {
                inputs: ids[..ids.len() - 1].to_vec(),
                targets: ids[1..].to_vec(),
                mask: (0..ids.len() - 1)
                    .map(|t| if t >= first { 1.0 } else { 0.0 })
                    .collect(),
            },
            first,
            old: c.token_logprobs[..kept.min(c.token_logprobs.len())].to_vec(),
            reference: c.ref_logprobs.iter().take(kept).copied().collect(),
        }
    }

    /// The response tokens that fit the context (the masked positions).
    pub fn tokens(&self) -> usize {
        self.old.len()
    }
}

/// Per-response-token values of each sample (`f` picks them: old or
/// reference log-probs, values, advantages) laid out like the targets of a
/// batch padded to `t` positions: [B,T], 0 off the response.
pub(crate) fn lay<S>(
    batch: &[S],
    t: usize,
    device: &Device,
    f: impl Fn(&S) -> (usize, &[f32]),
) -> hone_models::Result<Tensor> {
    let mut v = vec![0f32; batch.len() * t];
    for (i, s) in batch.iter().enumerate() {
        let (first, xs) = f(s);
        for (k, &x) in xs.iter().enumerate() {
            if first + k < t {
                v[i * t + first + k] = x;
            }
        }
    }
    Ok(Tensor::from_vec(v, (batch.len(), t), device)?)
}
