//! A completion the policy sampled, as teacher-forced training data for the
//! learners that learn from their own samples (lm.grpo, lm.ppo): the ids
//! laid out as lm.rollout fed them to the model, with the sampler's and the
//! reference's log-probs of each response token beside them.

use crate::sft::data::Example;
use crate::NewestPolicy;
use hone_models::tokenizer::Tokenizer;
use hone_models::{Device, Tensor};
use hone_sdk::{ArtifactRef, Completion, RoundInput, StageError};
use std::collections::BTreeMap;

/// A round's input to a learner from its own samples: the completions on
/// port 0 (in id order, whatever order they arrived in), the rewards of
/// them on port 1 (the Scores named `score`, by completion id), and the
/// policy that sampled them (`None`: the pretrained model, before the first
/// policy artifact).
pub(crate) struct OwnSamples {
    pub completions: Vec<Completion>,
    pub rewards: BTreeMap<String, f64>,
    pub policy: Option<ArtifactRef>,
}

impl OwnSamples {
    /// The round's samples; `None` when no completion came; an error naming
    /// what to wire when completions came without a policy and no
    /// `pretrained` model is the policy before one.
    pub fn take(
        input: &mut RoundInput,
        policy: &NewestPolicy,
        pretrained: bool,
        score: &str,
        round: u64,
    ) -> Result<Option<OwnSamples>, StageError> {
        let mut completions = input.completions(0);
        completions.sort_by(|a, b| a.id.cmp(&b.id));
        let rewards = input
            .scores(1)
            .into_iter()
            .filter(|s| s.name == score)
            .map(|s| (s.id, s.value))
            .collect();
        if completions.is_empty() {
            return Ok(None);
        }
        // The ratio pi / pi_old and the KL estimates take token_logprobs as
        // the log-probabilities of the distribution that drew the tokens.
        if let Some(c) = completions
            .iter()
            .find(|c| c.meta.contains_key(crate::rollout::SAMPLING))
        {
            return Err(StageError::new(format!(
                "completion {} was sampled with {} (lm.rollout), but its token_logprobs are the plain \
                 softmax's, so they are not the log-probabilities of what drew it and the ratio and the KL \
                 would be wrong: sample the learner's completions at temperature 1 without top_k or top_p",
                c.id,
                c.meta[crate::rollout::SAMPLING]
            )));
        }
        let policy = policy.newest.clone();
        if policy.is_none() && !pretrained {
            return Err(StageError::new(format!(
                "no policy artifact arrived by round {round}: wire `policy` to the policy that \
                 sampled the completions (its first from lm.sft, later rounds from this stage's own \
                 output, as feedback)"
            )));
        }
        Ok(Some(OwnSamples {
            completions,
            rewards,
            policy,
        }))
    }
}

/// One sampled completion ready to learn from.
pub(crate) struct Sampled {
    pub id: String,
    /// The prompt's ids (`BOS prompt` for hone's GPT, the chat template for
    /// SmolLM2) then the completion's, cut as lm.rollout cut it; the mask is on the
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
        Self::after(ids, c, context, max_new_tokens)
    }

    /// The completion after `prompt` ids (the model's own encoding of its
    /// prompt: `BOS prompt` for hone's GPT, the chat template for SmolLM2),
    /// cut as [`Sampled::new`] says.
    pub fn after(prompt: Vec<u32>, c: &Completion, context: usize, max_new_tokens: usize) -> Self {
        let mut ids = prompt;
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
