//! Reward models on all-MiniLM-L6-v2 (or SmolLM2-135M-Instruct:
//! [`crate::tuned_llama`]) whose top `k` transformer layers are fine-tuned
//! with the head (partial fine-tuning). The frozen lower layers run once per
//! distinct text and their output is cached ([`Frozen`]); the top layers,
//! the pool (MiniLM's mean, SmolLM2's last token) and the head run per
//! batch, with gradients in training. A checkpoint holds the head and the top layers' tensors
//! (checkpoint names), and `config.json` says `train_layers` and
//! `max_tokens`, so scoring rebuilds the same model: the pretrained
//! weights with these in place of theirs. Their weights average as WARM
//! averages any checkpoint, and unlike heads on a frozen encoder the average
//! is not the mean of the predictions.

use crate::tuned_llama::FrozenLlama;
use crate::OrStageError;
use hone_models::lora::LoraConfig;
use hone_models::{Device, Tensor};
use hone_pretrained::bert::{self, Bert};
use hone_pretrained::minilm::{HEAD_PREFIX, MODEL_NAME as MINILM};
use hone_pretrained::smollm::MODEL_NAME as SMOLLM;
use hone_pretrained::tokenizers::Tokenizer;
use hone_pretrained::VarMap;
use hone_sdk::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

/// A backbone's fine-tuned top: what turns the frozen states of texts into
/// the pooled representation the head reads, with gradients in the
/// trained weights.
pub(crate) trait TopLayers: Send + Sync {
    /// The pooled representations [N, hidden] of texts whose states after
    /// layer `split` are `states`: layers `split..` run here.
    fn pooled_from(&self, states: &[&Tensor], split: usize) -> hone_models::Result<Tensor>;
    fn hidden_size(&self) -> usize;
    /// The variables that train above `split`, by checkpoint name.
    fn trained_vars(&self, vars: &VarMap, split: usize) -> Vec<(String, candle_core::Var)>;
    /// LoRA adapters on the layers from `split` (`config.targets` as
    /// rm.train resolves them, its default included), freezing those
    /// layers' own weights; the adapters' variables by name.
    fn add_lora(
        &mut self,
        config: &LoraConfig,
        split: usize,
        seed: u64,
    ) -> hone_models::Result<Vec<(String, candle_core::Var)>>;
    /// The merged weight of every adapted projection, by checkpoint name.
    fn merged_weights(&self) -> hone_models::Result<Vec<(String, Tensor)>>;
}

/// A pretrained backbone's error as the model core's.
pub(crate) fn backbone_error(e: hone_pretrained::Error) -> hone_models::Error {
    hone_models::Error::Invalid(e.to_string())
}

/// MiniLM: the mean pool of the last hidden states.
impl TopLayers for Bert {
    fn pooled_from(&self, states: &[&Tensor], split: usize) -> hone_models::Result<Tensor> {
        Bert::pooled_from(self, states, split)
            .map_err(|e| hone_models::Error::Invalid(e.to_string()))
    }

    fn hidden_size(&self) -> usize {
        Bert::hidden_size(self)
    }

    fn trained_vars(&self, vars: &VarMap, split: usize) -> Vec<(String, candle_core::Var)> {
        self.layer_vars(vars, split..Bert::num_layers(self))
    }

    fn add_lora(
        &mut self,
        config: &LoraConfig,
        split: usize,
        seed: u64,
    ) -> hone_models::Result<Vec<(String, candle_core::Var)>> {
        let layers = split..Bert::num_layers(self);
        Bert::add_lora(self, config, layers, seed).map_err(backbone_error)
    }

    fn merged_weights(&self) -> hone_models::Result<Vec<(String, Tensor)>> {
        Bert::merged_weights(self).map_err(backbone_error)
    }
}

/// The backbones a reward model can fine-tune the top of.
enum Encoder {
    MiniLm { bert: Bert, tokenizer: Tokenizer },
    SmolLm(FrozenLlama),
}

/// The pretrained backbone's frozen part, loaded once per stage instance.
pub(crate) struct Frozen {
    encoder: Encoder,
    backbone: String,
    dir: PathBuf,
    max_tokens: usize,
    device: Device,
}

impl Frozen {
    /// `backbone` (all-MiniLM-L6-v2 or SmolLM2-135M-Instruct, fetched on
    /// first use) with texts truncated to `max_tokens`.
    pub fn load(backbone: &str, max_tokens: usize, device: &Device) -> Result<Self, StageError> {
        let dir = hone_sdk::pretrained::fetch(backbone)
            .map_err(|e| StageError::new(format!("cannot fetch {backbone}: {e}")))?;
        let encoder = match backbone {
            MINILM => {
                let doing = format!("cannot load {MINILM} from {}", dir.display());
                let (bert, _) = Bert::load(&dir, device).or_stage(&doing)?;
                let tokenizer = bert::pair_tokenizer(&dir, max_tokens).or_stage(&doing)?;
                Encoder::MiniLm { bert, tokenizer }
            }
            SMOLLM => Encoder::SmolLm(FrozenLlama::load(max_tokens, device)?),
            other => {
                return Err(StageError::new(format!(
                    "no fine-tunable backbone {other:?}: \"{MINILM}\" or \"{SMOLLM}\""
                )))
            }
        };
        Ok(Frozen {
            encoder,
            backbone: backbone.to_string(),
            dir,
            max_tokens,
            device: device.clone(),
        })
    }

    /// The backbone's name.
    pub fn backbone(&self) -> &str {
        &self.backbone
    }

    /// The texts' length limit.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Transformer layers of the backbone.
    pub fn num_layers(&self) -> usize {
        match &self.encoder {
            Encoder::MiniLm { bert, .. } => bert.num_layers(),
            Encoder::SmolLm(llama) => llama.num_layers(),
        }
    }

    /// Hidden states after the frozen layers `0..split` of each (prompt,
    /// response), one [len, hidden] tensor each.
    pub fn states(
        &self,
        items: &[(&str, &str)],
        split: usize,
        batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, StageError> {
        match &self.encoder {
            Encoder::MiniLm { bert, tokenizer } => {
                let encoded = bert::encode_pairs(tokenizer, items)
                    .or_stage(&format!("cannot tokenize for {MINILM}"))?;
                bert.frozen_states(&encoded, split, batch, progress)
                    .or_stage(&format!("cannot run {MINILM}'s frozen layers"))
            }
            Encoder::SmolLm(llama) => llama.states(items, split, batch, progress),
        }
    }

    /// A fresh copy of the backbone's top (pretrained weights, with
    /// `overrides` in place of theirs) whose layers from `split` a member
    /// trains or a model scores with.
    pub fn copy(
        &self,
        overrides: &HashMap<String, Tensor>,
        split: usize,
    ) -> Result<(Box<dyn TopLayers>, VarMap), StageError> {
        match &self.encoder {
            Encoder::MiniLm { .. } => {
                let (bert, vars) = Bert::load_with(&self.dir, &self.device, overrides)
                    .or_stage(&format!("cannot build {MINILM} with fine-tuned layers"))?;
                Ok((Box::new(bert), vars))
            }
            Encoder::SmolLm(llama) => {
                let (top, vars) = llama.copy(overrides, split)?;
                Ok((Box::new(top), vars))
            }
        }
    }
}

/// A loaded partly fine-tuned reward model: its encoder and head.
pub(crate) struct TunedRm {
    /// `reward.json`.
    pub meta: hone_models::reward::RewardMeta,
    /// `config.json` (`train_layers`, `max_tokens`).
    pub config: hone_models::reward::PretrainedConfig,
    /// The checkpoint's tensors: the head's and the top layers'.
    pub tensors: HashMap<String, Tensor>,
    /// The backbone's top with these layers, built on first use and kept:
    /// a model scores many batches, in many calls.
    encoder: std::sync::OnceLock<(Box<dyn TopLayers>, VarMap)>,
}

impl TunedRm {
    /// A model from its checkpoint's parts.
    pub fn new(
        meta: hone_models::reward::RewardMeta,
        config: hone_models::reward::PretrainedConfig,
        tensors: HashMap<String, Tensor>,
    ) -> Self {
        TunedRm {
            meta,
            config,
            tensors,
            encoder: std::sync::OnceLock::new(),
        }
    }

    /// The first layer that is fine-tuned (the frozen ones are `0..split`).
    pub fn split(&self, layers: usize) -> usize {
        layers.saturating_sub(self.config.train_layers)
    }

    /// The backbone's top with this model's layers. The checkpoint must
    /// hold exactly the tensors of the part above `split`: a lower one
    /// would be applied while the cached frozen states came from pretrained
    /// weights.
    pub fn encoder(&self, frozen: &Frozen) -> Result<&dyn TopLayers, StageError> {
        if let Some((top, _)) = self.encoder.get() {
            return Ok(top.as_ref());
        }
        let layers: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(n, _)| !n.starts_with(&format!("{HEAD_PREFIX}.")))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let split = self.split(frozen.num_layers());
        let (top, vars) = frozen.copy(&layers, split)?;
        let expected: std::collections::BTreeSet<String> = top
            .trained_vars(&vars, split)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let given: std::collections::BTreeSet<String> = layers.keys().cloned().collect();
        if given != expected {
            let missing: Vec<_> = expected.difference(&given).collect();
            let extra: Vec<_> = given.difference(&expected).collect();
            return Err(StageError::new(format!(
                "the checkpoint does not hold exactly the top {} layers (missing {missing:?}, unexpected {extra:?})",
                self.config.train_layers
            )));
        }
        let _ = self.encoder.set((top, vars));
        Ok(self.encoder.get().expect("set above").0.as_ref())
    }

    /// The head as a linear layer on `device`.
    pub fn head(&self, device: &Device) -> Result<candle_nn::Linear, StageError> {
        let get = |name: &str| {
            self.tensors
                .get(&format!("{HEAD_PREFIX}.{name}"))
                .ok_or_else(|| {
                    StageError::new(format!("the checkpoint has no {HEAD_PREFIX}.{name}"))
                })?
                .to_device(device)
                .or_stage("cannot move the head")
        };
        Ok(candle_nn::Linear::new(get("weight")?, Some(get("bias")?)))
    }
}

/// Rewards [N] of texts whose frozen states are `states`, through `top`'s
/// layers `split..` and `head`.
pub(crate) fn rewards_from(
    top: &dyn TopLayers,
    head: &candle_nn::Linear,
    states: &[&Tensor],
    split: usize,
) -> hone_models::Result<Tensor> {
    use candle_nn::Module;
    let pooled = top.pooled_from(states, split)?;
    Ok(head.forward(&pooled)?.squeeze(1)?)
}
