//! The model lm.sft trains: hone's byte-level GPT (every weight trains), or
//! SmolLM2-135M-Instruct partly fine-tuned ([`Tuned`]: the top layers and
//! the final norm train, the frozen layers run once per sequence).

use super::data::{to_tensors, tokenize, Demo, Example};
use crate::tuned_llama::Tuned;
use hone_models::checkpoint;
use hone_models::gpt::Gpt;
use hone_models::tokenizer::Tokenizer;
use hone_models::train::masked_lm_loss;
use hone_models::{Device, Tensor, Var, VarMap};
use std::path::Path;

pub(super) enum Net {
    Gpt {
        gpt: Gpt,
        varmap: VarMap,
        tok: Box<dyn Tokenizer>,
    },
    Llama(Box<Tuned>),
}

impl Net {
    /// The variables an optimiser step updates.
    pub fn trainable(&self) -> Vec<Var> {
        match self {
            Net::Gpt { varmap, .. } => varmap.all_vars(),
            Net::Llama(t) => t.trainable(),
        }
    }

    /// Parameters trained, and in all.
    pub fn counts(&self) -> (usize, usize) {
        match self {
            Net::Gpt { varmap, .. } => {
                let n = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
                (n, n)
            }
            Net::Llama(t) => t.counts(),
        }
    }

    /// A demo as this model reads it, and whether its response lost its end
    /// to fit `context` (SmolLM2; the GPT's responses are cut silently, as
    /// they always were, in bytes).
    pub fn encode(&self, d: &Demo, context: usize) -> Result<(Example, bool), String> {
        match self {
            Net::Gpt { tok, .. } => Ok((
                tokenize(tok.as_ref(), &d.prompt, &d.response, context),
                false,
            )),
            Net::Llama(t) => t.demo(&d.prompt, &d.response),
        }
    }

    /// The mean next-token loss over the response tokens of `batch` (each
    /// token weighs the same), and how many tokens that is.
    pub fn loss(&self, batch: &[Example], device: &Device) -> hone_models::Result<(Tensor, f64)> {
        match self {
            Net::Gpt { gpt, tok, .. } => {
                let (x, y, mask) = to_tensors(batch, tok.pad_id(), device)?;
                let tokens = f64::from(mask.sum_all()?.to_scalar::<f32>()?);
                Ok((masked_lm_loss(&gpt.forward(&x)?, &y, &mask)?, tokens))
            }
            Net::Llama(t) => {
                let refs: Vec<&Example> = batch.iter().collect();
                let (lp, len) = t.sequence_logprobs(&refs, device)?;
                let tokens = f64::from(len.sum_all()?.to_scalar::<f32>()?);
                Ok(((lp.sum_all()?.neg()? / tokens.max(1.0))?, tokens))
            }
        }
    }

    /// Writes the model as a checkpoint in `dir` (a SmolLM2 one with its
    /// own tokenizer and config, which lm.rollout and lm.dpo load).
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        match self {
            Net::Gpt { gpt, varmap, tok } => {
                checkpoint::save(dir, varmap, gpt.config(), tok.as_ref())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Net::Llama(t) => t.chat.save(dir).map(|_| ()).map_err(|e| e.to_string()),
        }
    }
}
