//! Reward models on SmolLM2-135M-Instruct (hone's f32 Llama port) whose top
//! `train_layers` decoder layers and final norm are fine-tuned with a linear
//! head on the hidden state of the text's last token, as TRL's reward models
//! on a causal LM read it (`AutoModelForSequenceClassification`: the score
//! of the last non-padding token). Each text is the prompt in SmolLM2's
//! ChatML template, then the response ended as a chat turn ends, so the
//! last token is always `<|im_end|>`: the head reads the model's state
//! after the whole answer.
//!
//! The frozen lower layers run once per distinct text, as for MiniLM
//! ([`crate::tuned`]); the LM head is never used.

use crate::tuned::{backbone_error, TopLayers};
use crate::OrStageError;
use hone_models::lora::LoraConfig;
use hone_models::{Device, Tensor};
use hone_pretrained::smollm::{chat_template, ChatLlama, MODEL_NAME};
use hone_pretrained::{Llama, VarMap};
use hone_sdk::prelude::*;
use std::collections::HashMap;

/// The end of a ChatML turn: what ends each response, and the token whose
/// state the head reads.
const TURN_END: &str = "<|im_end|>";

/// SmolLM2 with its pretrained weights, loaded once per stage instance.
pub(crate) struct FrozenLlama {
    chat: ChatLlama,
    turn_end: u32,
    max_tokens: usize,
}

impl FrozenLlama {
    /// SmolLM2-135M-Instruct (fetched on first use), texts cut to
    /// `max_tokens`.
    pub fn load(max_tokens: usize, device: &Device) -> Result<Self, StageError> {
        let dir = hone_sdk::pretrained::fetch(MODEL_NAME)
            .map_err(|e| StageError::new(format!("cannot fetch {MODEL_NAME}: {e}")))?;
        let doing = format!("cannot load {MODEL_NAME} from {}", dir.display());
        let chat = ChatLlama::load(&dir, device).or_stage(&doing)?;
        let turn_end = chat.tokenizer.token_to_id(TURN_END).ok_or_else(|| {
            StageError::new(format!("{MODEL_NAME}'s tokenizer has no {TURN_END}"))
        })?;
        Ok(FrozenLlama {
            chat,
            turn_end,
            max_tokens,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.chat.model.config().num_hidden_layers
    }

    /// The tokens of a (prompt, response): the templated prompt, the
    /// response, `<|im_end|>`. A text longer than `max_tokens` keeps its
    /// last `max_tokens`: the prompt loses its start first, and the end the
    /// head reads is always kept.
    pub fn encode(&self, prompt: &str, response: &str) -> Result<Vec<u32>, StageError> {
        let encode = |text: &str| {
            self.chat
                .encode(text)
                .or_stage(&format!("cannot tokenize for {MODEL_NAME}"))
        };
        let mut ids = encode(&chat_template(prompt))?;
        ids.extend(encode(response)?);
        ids.push(self.turn_end);
        let cut = ids.len().saturating_sub(self.max_tokens);
        Ok(ids.split_off(cut))
    }

    /// The residual stream after the frozen layers `0..split` of each
    /// (prompt, response), one [len, hidden] tensor each, computed in padded
    /// batches of similar lengths.
    pub fn states(
        &self,
        items: &[(&str, &str)],
        split: usize,
        batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, StageError> {
        let texts: Vec<Vec<u32>> = items
            .iter()
            .map(|(p, r)| self.encode(p, r))
            .collect::<Result<_, _>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out: Vec<Option<Tensor>> = vec![None; texts.len()];
        let device = self.chat.model.device().clone();
        let run = |chunk: &[usize]| -> hone_models::Result<Vec<Tensor>> {
            let t_max = chunk.iter().map(|&i| texts[i].len()).max().unwrap_or(1);
            // Padding follows each text, so causal attention keeps it out
            // of the text's rows; it is cut off below.
            let mut ids = Vec::with_capacity(chunk.len() * t_max);
            for &i in chunk {
                ids.extend_from_slice(&texts[i]);
                ids.extend(std::iter::repeat_n(self.turn_end, t_max - texts[i].len()));
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), t_max), &device)?;
            let x = self
                .chat
                .model
                .residual_after(&ids, split)
                .map_err(backbone_error)?
                .detach();
            chunk
                .iter()
                .enumerate()
                // A copy: a view would keep the whole padded batch alive.
                .map(|(row, &i)| Ok(x.get(row)?.narrow(0, 0, texts[i].len())?.copy()?))
                .collect()
        };
        let batch = batch.max(1);
        for (done, chunk) in order.chunks(batch).enumerate() {
            let states =
                run(chunk).or_stage(&format!("cannot run {MODEL_NAME}'s frozen layers"))?;
            for (&i, s) in chunk.iter().zip(states) {
                out[i] = Some(s);
            }
            progress(((done + 1) * batch).min(texts.len()), texts.len());
        }
        Ok(out
            .into_iter()
            .map(|t| t.expect("every text computed"))
            .collect())
    }

    /// A model for one member or one checkpoint: the layers from `split` up
    /// and the final norm are fresh variables (`overrides` where it names
    /// them, else copies of the pretrained ones); the frozen weights are
    /// shared with this instance, not copied (nothing trains them: the
    /// trained part starts from detached states).
    pub fn copy(
        &self,
        overrides: &HashMap<String, Tensor>,
        split: usize,
    ) -> Result<(LlamaTop, VarMap), StageError> {
        let vars = VarMap::new();
        {
            let source = self.chat.vars.data().lock().expect("VarMap lock");
            let mut data = vars.data().lock().expect("VarMap lock");
            for (name, var) in source.iter() {
                let var = if Llama::in_top(name, split) {
                    let t = overrides.get(name).unwrap_or(var.as_tensor());
                    let t = t
                        .to_device(var.device())
                        .and_then(|t| t.copy())
                        .or_stage(&format!("cannot copy {name}"))?;
                    candle_core::Var::from_tensor(&t).or_stage(&format!("cannot copy {name}"))?
                } else {
                    var.clone()
                };
                data.insert(name.clone(), var);
            }
        }
        let vb = candle_nn::VarBuilder::from_varmap(
            &vars,
            hone_models::DType::F32,
            self.chat.model.device(),
        );
        let model = Llama::new(self.chat.model.config(), vb)
            .or_stage(&format!("cannot build {MODEL_NAME} with fine-tuned layers"))?;
        Ok((LlamaTop { model }, vars))
    }
}

/// SmolLM2 with a member's top layers: what scores from frozen states.
pub(crate) struct LlamaTop {
    model: Llama,
}

impl TopLayers for LlamaTop {
    fn pooled_from(&self, states: &[&Tensor], split: usize) -> hone_models::Result<Tensor> {
        let lens: Vec<usize> = states
            .iter()
            .map(|s| s.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let t_max = lens.iter().copied().max().unwrap_or(1);
        let rows = states
            .iter()
            .zip(&lens)
            .map(|(s, &t)| {
                // Right padding: attention is causal, so it changes no
                // earlier row, the last real token's included.
                if t < t_max {
                    s.pad_with_zeros(0, 0, t_max - t)
                } else {
                    Ok((*s).clone())
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::stack(&rows, 0)?;
        let hidden = self.model.hidden_from(&x, split).map_err(backbone_error)?;
        let width = hidden.dim(candle_core::D::Minus1)?;
        let last: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(n, &t)| (n * t_max + t - 1) as u32)
            .collect();
        let flat = hidden.reshape((states.len() * t_max, width))?;
        Ok(flat.index_select(&Tensor::new(last.as_slice(), x.device())?, 0)?)
    }

    fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    fn add_lora(
        &mut self,
        config: &LoraConfig,
        split: usize,
        seed: u64,
    ) -> hone_models::Result<Vec<(String, candle_core::Var)>> {
        let layers = split..self.model.config().num_hidden_layers;
        self.model
            .add_lora(config, layers, seed)
            .map_err(backbone_error)
    }

    fn merged_weights(&self) -> hone_models::Result<Vec<(String, Tensor)>> {
        self.model.merged_weights().map_err(backbone_error)
    }

    fn trained_vars(&self, vars: &VarMap, split: usize) -> Vec<(String, candle_core::Var)> {
        let data = vars.data().lock().expect("VarMap lock");
        let mut out: Vec<(String, candle_core::Var)> = data
            .iter()
            .filter(|(name, _)| Llama::in_top(name, split))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
