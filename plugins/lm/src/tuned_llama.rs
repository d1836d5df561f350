//! SmolLM2 (hone's f32 Llama port) as a policy lm.sft and lm.dpo train,
//! partly fine-tuned: the top `train_layers` decoder layers and the final
//! norm train; the token embedding (tied to the LM head: 28 M of the 135 M
//! weights) and the layers below stay frozen.
//!
//! With `lora`, the trained layers keep their weights frozen and learn LoRA
//! adapters instead (`hone_models::lora`); a checkpoint stores the merged
//! weights, so it loads as a plain SmolLM2.
//!
//! Two savings make a 135 M-parameter policy train on two CPU cores:
//! - The frozen layers' output (the residual stream entering the first
//!   trained layer) depends on the sequence only, so it is computed once per
//!   sequence and cached; a step runs only the trained layers.
//! - The LM head (576 × 49,152: the largest matmul) runs on the response
//!   positions only, the only ones whose log-probs the losses use, and its
//!   frozen weight is detached so the backward pass computes no gradient
//!   for it.

use crate::sft::data::{example_of, Example};
use candle_core::{DType, Device, Tensor, Var, D};
use hone_models::lora::{LoraConfig, LLAMA_TARGETS};
use hone_pretrained::smollm::{chat_template, ChatLlama};
use hone_pretrained::Llama;
use std::cell::RefCell;
use std::collections::HashMap;

/// The end of a ChatML turn: what ends each response.
const TURN_END: &str = "<|im_end|>";

/// A SmolLM2 chat model under partial fine-tuning.
pub(super) struct Tuned {
    pub chat: ChatLlama,
    /// Layers below this index are frozen and run once per sequence.
    frozen: usize,
    /// Tokens a sequence keeps (prompt first cut from its start).
    context: usize,
    /// LoRA adapters on the trained layers, by name; empty: the layers'
    /// own weights train.
    adapters: Vec<(String, Var)>,
    turn_end: u32,
    /// The residual stream after the frozen layers, per input sequence
    /// (keyed by its tokens, so a text seen twice runs once): [T, hidden],
    /// detached.
    prefixes: RefCell<HashMap<Vec<u32>, Tensor>>,
}

impl Tuned {
    /// `chat` with its top `train_layers` layers trainable (at least one, at
    /// most all), or with LoRA adapters on them (`lora`, their `A` drawn
    /// from `seed`), sequences cut to `context` tokens.
    pub fn new(
        mut chat: ChatLlama,
        train_layers: usize,
        context: usize,
        lora: Option<&LoraConfig>,
        seed: u64,
    ) -> Result<Self, hone_sdk::StageError> {
        let layers = chat.model.config().num_hidden_layers;
        if train_layers == 0 || train_layers > layers {
            return Err(hone_sdk::StageError::config(
                "train_layers",
                format!("must be in 1..={layers} for this model, found {train_layers}"),
            ));
        }
        let turn_end = chat.tokenizer.token_to_id(TURN_END).ok_or_else(|| {
            hone_sdk::StageError::new(format!(
                "the policy's tokenizer has no {TURN_END}: not a ChatML model"
            ))
        })?;
        let frozen = layers - train_layers;
        let adapters = match lora {
            None => Vec::new(),
            Some(cfg) => {
                if let Err((field, message)) = cfg.check(&LLAMA_TARGETS) {
                    return Err(hone_sdk::StageError::config(field, message));
                }
                chat.model
                    .add_lora(cfg, frozen..layers, seed)
                    .map_err(|e| {
                        hone_sdk::StageError::new(format!("cannot add LoRA adapters: {e}"))
                    })?
            }
        };
        Ok(Self {
            chat,
            frozen,
            context,
            adapters,
            turn_end,
            prefixes: RefCell::new(HashMap::new()),
        })
    }

    /// The variables a step updates, in name order: the LoRA adapters, or
    /// else the trained layers' weights and the final norm's.
    pub fn trainable(&self) -> Vec<Var> {
        if !self.adapters.is_empty() {
            return self.adapters.iter().map(|(_, v)| v.clone()).collect();
        }
        let data = self.chat.vars.data().lock().expect("VarMap lock poisoned");
        let mut vars: Vec<(&String, &Var)> = data
            .iter()
            .filter(|(name, _)| Llama::in_top(name, self.frozen))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(b.0));
        vars.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// The LoRA adapters' variables by name (empty without LoRA).
    pub fn adapters(&self) -> &[(String, Var)] {
        &self.adapters
    }

    /// Parameters trained, and in all (the adapters' included).
    pub fn counts(&self) -> (usize, usize) {
        let count = |vars: &[Var]| vars.iter().map(|v| v.elem_count()).sum::<usize>();
        let adapters: usize = self.adapters.iter().map(|(_, v)| v.elem_count()).sum();
        (
            count(&self.trainable()),
            count(&self.chat.vars.all_vars()) + adapters,
        )
    }

    /// A pair's two sequences: the prompt in SmolLM2's chat template (an
    /// HH-RLHF transcript becomes its turns), then each response, ended as
    /// a chat turn ends; and whether a response had to be cut.
    ///
    /// Both sides keep the same prompt tokens, as many as the longer
    /// response leaves room for (its start goes first, at least its last
    /// token stays): DPO compares the two responses' log-ratios, which
    /// means something only under one context. A response longer than the
    /// room left then loses its end.
    pub fn pair(
        &self,
        prompt: &str,
        chosen: &str,
        rejected: &str,
    ) -> Result<(Example, Example, bool), String> {
        let encode = |text: &str| self.chat.encode(text).map_err(|e| e.to_string());
        let prompt = encode(&chat_template(prompt))?;
        let response = |text: &str| -> Result<Vec<u32>, String> {
            let mut ids = encode(text)?;
            ids.push(self.turn_end);
            Ok(ids)
        };
        let (chosen, rejected) = (response(chosen)?, response(rejected)?);
        let longer = chosen.len().max(rejected.len());
        let room = (self.context + 1).saturating_sub(longer).max(1);
        let prompt = prompt[prompt.len().saturating_sub(room)..].to_vec();
        let cut = prompt.len() + longer > self.context + 1;
        Ok((
            example_of(prompt.clone(), &chosen, self.context),
            example_of(prompt, &rejected, self.context),
            cut,
        ))
    }

    /// A demonstration's sequence for SFT: the templated prompt, then the
    /// response ended as a chat turn ends; and whether the response had to
    /// lose its end (the prompt loses its start first, down to one token).
    pub fn demo(&self, prompt: &str, response: &str) -> Result<(Example, bool), String> {
        let encode = |text: &str| self.chat.encode(text).map_err(|e| e.to_string());
        let prompt = encode(&chat_template(prompt))?;
        let mut response = encode(response)?;
        response.push(self.turn_end);
        let cut = response.len() > self.context;
        Ok((example_of(prompt, &response, self.context), cut))
    }

    /// Runs the frozen layers once on the sequences not cached yet, in one
    /// padded batch (one sequence at a time would leave the matmuls a few
    /// rows each), and caches each one's rows.
    fn cache_prefixes(&self, examples: &[&Example], device: &Device) -> hone_models::Result<()> {
        let mut missing: Vec<&Example> = Vec::new();
        {
            let cache = self.prefixes.borrow();
            for e in examples {
                if !cache.contains_key(&e.inputs) && !missing.iter().any(|m| m.inputs == e.inputs) {
                    missing.push(e);
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let t_max = missing.iter().map(|e| e.inputs.len()).max().unwrap_or(1);
        // Padding ids follow each sequence, so causal attention keeps them
        // out of its rows; they are cut off below.
        let mut ids = Vec::with_capacity(missing.len() * t_max);
        for e in &missing {
            ids.extend_from_slice(&e.inputs);
            ids.extend(std::iter::repeat_n(self.turn_end, t_max - e.inputs.len()));
        }
        let ids = Tensor::from_vec(ids, (missing.len(), t_max), device)?;
        let x = self
            .chat
            .model
            .residual_after(&ids, self.frozen)
            .map_err(model_error)?
            .detach();
        let mut cache = self.prefixes.borrow_mut();
        for (row, e) in missing.into_iter().enumerate() {
            // A copy: a view would keep the whole padded batch alive.
            let rows = x.get(row)?.narrow(0, 0, e.inputs.len())?.copy()?;
            cache.insert(e.inputs.clone(), rows);
        }
        Ok(())
    }

    /// The log-prob of every response token (the masked targets, in
    /// sequence then position order) [N], differentiable in the trained
    /// layers, with each one's sequence and its flat position in the
    /// [S, T] layout of the batch's targets (T: the longest input).
    fn picked_logprobs(
        &self,
        examples: &[&Example],
        device: &Device,
    ) -> hone_models::Result<(Tensor, Vec<usize>, Vec<u32>, Tensor)> {
        let t_max = examples.iter().map(|e| e.inputs.len()).max().unwrap_or(1);
        let model = &self.chat.model;
        let x = self.prefix_batch(examples, device)?;
        let hidden = model.hidden_from(&x, self.frozen).map_err(model_error)?;
        let width = hidden.dim(D::Minus1)?;
        let flat = hidden.reshape((examples.len() * t_max, width))?;
        // The response positions, their targets, and which sequence each is of.
        let (mut at, mut targets, mut of) = (Vec::new(), Vec::new(), Vec::new());
        for (s, e) in examples.iter().enumerate() {
            for (t, (&m, &y)) in e.mask.iter().zip(&e.targets).enumerate() {
                if m > 0.0 {
                    at.push((s * t_max + t) as u32);
                    targets.push(y);
                    of.push(s);
                }
            }
        }
        let picked = flat.index_select(&Tensor::new(at.as_slice(), device)?, 0)?;
        // hone's fused linear: its backward skips the detached weight's
        // gradient (a [576, N] x [N, 49152] gemm a plain matmul would do).
        let head = hone_models::linear::Linear::new(model.head_weight().detach(), None);
        let logits = candle_core::Module::forward(&head, &picked)?;
        // One op, forward and backward: log-softmax over the 49,152-token
        // vocabulary, then gather, would allocate five such tensors each way.
        let token = hone_models::picked_logprobs::picked_logprobs(&logits, &targets)?;
        Ok((token, of, at, logits))
    }

    /// The residual stream after the frozen layers of each sequence [S, T,
    /// hidden] (T: the longest input, right-padded with zeros: attention is
    /// causal, so padding changes no earlier row), from the cache; what the
    /// trained layers, and a critic on them, take.
    pub fn prefix_batch(
        &self,
        examples: &[&Example],
        device: &Device,
    ) -> hone_models::Result<Tensor> {
        let t_max = examples.iter().map(|e| e.inputs.len()).max().unwrap_or(1);
        self.cache_prefixes(examples, device)?;
        let prefixes = self.prefixes.borrow();
        let mut rows = Vec::with_capacity(examples.len());
        for e in examples {
            let prefix = prefixes[&e.inputs].clone();
            let t = prefix.dim(0)?;
            rows.push(if t < t_max {
                prefix.pad_with_zeros(0, 0, t_max - t)?
            } else {
                prefix
            });
        }
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// The first layer that trains: the layers below it are frozen.
    pub fn frozen(&self) -> usize {
        self.frozen
    }

    /// log pi of each sequence's response (its masked targets) [S], and the
    /// responses' token counts [S]; differentiable in the trained layers.
    pub fn sequence_logprobs(
        &self,
        examples: &[&Example],
        device: &Device,
    ) -> hone_models::Result<(Tensor, Tensor)> {
        let (token, of, _, _) = self.picked_logprobs(examples, device)?;
        let n = of.len();
        // Sum each sequence's tokens: a [S, N] membership matrix times [N].
        let mut member = vec![0f32; examples.len() * n];
        for (k, &s) in of.iter().enumerate() {
            member[s * n + k] = 1.0;
        }
        let member = Tensor::from_vec(member, (examples.len(), n), device)?;
        let lp = member.matmul(&token.unsqueeze(1)?)?.squeeze(1)?;
        let len = member.sum(1)?.to_dtype(DType::F32)?;
        Ok((lp, len))
    }

    /// log pi of every target [S, T] (T: the longest input), 0 off the
    /// response (the mask): the per-token layout the policy-gradient
    /// losses take; differentiable in the trained layers.
    pub fn token_logprobs(
        &self,
        examples: &[&Example],
        device: &Device,
    ) -> hone_models::Result<Tensor> {
        Ok(self.token_logprobs_entropy(examples, device, false)?.0)
    }

    /// [`Tuned::token_logprobs`], and with `entropy` the policy's mean
    /// entropy over the response tokens (a diagnostic, without gradient).
    pub fn token_logprobs_entropy(
        &self,
        examples: &[&Example],
        device: &Device,
        entropy: bool,
    ) -> hone_models::Result<(Tensor, Option<f64>)> {
        let t_max = examples.iter().map(|e| e.inputs.len()).max().unwrap_or(1);
        let (token, _, at, logits) = self.picked_logprobs(examples, device)?;
        let zeros = Tensor::zeros(examples.len() * t_max, DType::F32, device)?;
        let n = at.len();
        let at = Tensor::new(at.as_slice(), device)?;
        let logp = zeros
            .index_add(&at, &token, 0)?
            .reshape((examples.len(), t_max))?;
        let entropy = if entropy && n > 0 {
            let h = hone_models::ppo::entropy(&logits.detach())?;
            Some(f64::from(h.mean_all()?.to_scalar::<f32>()?))
        } else {
            None
        };
        Ok((logp, entropy))
    }

    /// Forgets the cached frozen-layer states: a learner on its own samples
    /// sees each sequence in one round only, so the cache would only grow.
    pub fn clear_prefixes(&self) {
        self.prefixes.borrow_mut().clear();
    }

    /// The ids of `prompt` in the chat template, as lm.rollout fed them to
    /// the model before its sampled tokens.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, String> {
        self.chat
            .encode(&chat_template(prompt))
            .map_err(|e| e.to_string())
    }
}

/// A Llama error as the model core's, for the scorer the trainer calls.
fn model_error(e: hone_pretrained::Error) -> hone_models::Error {
    hone_models::Error::Invalid(e.to_string())
}

/// The LoRA options lm.sft, lm.dpo and the online learners share, added to `d`.
pub(crate) fn lora_options(d: hone_sdk::StageDescriptor) -> hone_sdk::StageDescriptor {
    use hone_sdk::FieldType;
    d.optional(
        "lora_rank",
        FieldType::unsigned().at_most(4096),
        0,
        "SmolLM2 policies: LoRA (Hu et al. 2021) of this rank on the top `train_layers` layers instead \
         of training their weights (0 = no LoRA: the layers' own weights and the final norm train). The \
         adapters start as PEFT's do (A Kaiming-uniform, B zero: the start is the base model), and the \
         checkpoint stores the merged weights W + (alpha / r) B A, so it loads as a plain SmolLM2 (and \
         a weight average of such checkpoints averages the merged updates, not A and B apart).",
    )
    .optional(
        "lora_alpha",
        FieldType::Float,
        16.0,
        "With lora_rank: the update is scaled by lora_alpha / lora_rank.",
    )
    .optional(
        "lora_targets",
        FieldType::List(Box::new(FieldType::one_of(&LLAMA_TARGETS))),
        serde_json::json!(["q_proj", "v_proj"]),
        "With lora_rank: the projections that get adapters (PEFT's default for Llama: q_proj and \
         v_proj; all seven: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).",
    )
}

/// The LoRA settings of `lora_options`, `None` when `rank` is 0.
pub(crate) fn lora_config(rank: usize, alpha: f64, targets: &[String]) -> Option<LoraConfig> {
    (rank > 0).then(|| LoraConfig {
        rank,
        alpha,
        targets: targets.to_vec(),
    })
}

/// The lineage line naming the base model and what of it trained.
pub(crate) fn base_lineage(train_layers: usize, lora: Option<&LoraConfig>) -> String {
    let base = hone_pretrained::smollm::MODEL_NAME;
    match lora {
        None => format!("base {base}, top {train_layers} layers trained"),
        Some(l) => format!(
            "base {base}, LoRA rank {} alpha {} on {} of the top {train_layers} layers, merged",
            l.rank,
            l.alpha,
            l.targets.join(", ")
        ),
    }
}
