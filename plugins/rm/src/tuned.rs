//! Reward models on all-MiniLM-L6-v2 whose top `k` transformer layers are
//! fine-tuned with the head (partial fine-tuning). The frozen lower layers
//! run once per distinct text and their output is cached ([`Frozen`]); the
//! top layers, the mean pool and the head run per batch, with gradients in
//! training. A checkpoint holds the head and the top layers' tensors
//! (checkpoint names), and `config.json` says `train_layers` and
//! `max_tokens`, so scoring rebuilds the same model: the pretrained
//! weights with these in place of theirs. Their weights average as WARM
//! averages any checkpoint, and unlike heads on a frozen encoder the average
//! is not the mean of the predictions.

use crate::OrStageError;
use hone_models::{Device, Tensor};
use hone_pretrained::bert::{self, Bert};
use hone_pretrained::minilm::{HEAD_PREFIX, MODEL_NAME};
use hone_pretrained::tokenizers::Tokenizer;
use hone_pretrained::VarMap;
use hone_sdk::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

/// The pretrained encoder's frozen part, loaded once per stage instance.
pub(crate) struct Frozen {
    bert: Bert,
    tokenizer: Tokenizer,
    dir: PathBuf,
    max_tokens: usize,
    device: Device,
}

impl Frozen {
    /// all-MiniLM-L6-v2 (fetched on first use) with texts truncated to `max_tokens`.
    pub fn load(max_tokens: usize, device: &Device) -> Result<Self, StageError> {
        let dir = hone_sdk::pretrained::fetch(MODEL_NAME)
            .map_err(|e| StageError::new(format!("cannot fetch {MODEL_NAME}: {e}")))?;
        let doing = format!("cannot load {MODEL_NAME} from {}", dir.display());
        let (bert, _) = Bert::load(&dir, device).or_stage(&doing)?;
        let tokenizer = bert::pair_tokenizer(&dir, max_tokens).or_stage(&doing)?;
        Ok(Frozen {
            bert,
            tokenizer,
            dir,
            max_tokens,
            device: device.clone(),
        })
    }

    /// The texts' length limit.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Transformer layers of the encoder.
    pub fn num_layers(&self) -> usize {
        self.bert.num_layers()
    }

    /// Hidden states after the frozen layers `0..split` of each (prompt,
    /// response), one [len, 384] tensor each.
    pub fn states(
        &self,
        items: &[(&str, &str)],
        split: usize,
        batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, StageError> {
        let encoded = bert::encode_pairs(&self.tokenizer, items)
            .or_stage(&format!("cannot tokenize for {MODEL_NAME}"))?;
        self.bert
            .frozen_states(&encoded, split, batch, progress)
            .or_stage(&format!("cannot run {MODEL_NAME}'s frozen layers"))
    }

    /// A fresh copy of the encoder (pretrained weights, with `overrides`
    /// in place of theirs) whose layers a member trains or a model scores with.
    pub fn copy(&self, overrides: &HashMap<String, Tensor>) -> Result<(Bert, VarMap), StageError> {
        Bert::load_with(&self.dir, &self.device, overrides)
            .or_stage(&format!("cannot build {MODEL_NAME} with fine-tuned layers"))
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
    /// The encoder with these layers, built on first use and kept: a model
    /// scores many batches, in many calls.
    encoder: std::sync::OnceLock<(Bert, VarMap)>,
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

    /// The encoder with this model's top layers. The checkpoint must hold
    /// exactly the tensors of layers `split..`: a lower one would be
    /// applied while the cached frozen states came from pretrained weights.
    pub fn encoder(&self, frozen: &Frozen) -> Result<&Bert, StageError> {
        if let Some((bert, _)) = self.encoder.get() {
            return Ok(bert);
        }
        let layers: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(n, _)| !n.starts_with(&format!("{HEAD_PREFIX}.")))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let (bert, vars) = frozen.copy(&layers)?;
        let split = self.split(bert.num_layers());
        let expected: std::collections::BTreeSet<String> = bert
            .layer_vars(&vars, split..bert.num_layers())
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
        let _ = self.encoder.set((bert, vars));
        Ok(&self.encoder.get().expect("set above").0)
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

/// Rewards [N] of texts whose frozen states are `states`, through `bert`'s
/// layers `split..` and `head`.
pub(crate) fn rewards_from(
    bert: &Bert,
    head: &candle_nn::Linear,
    states: &[&Tensor],
    split: usize,
) -> hone_models::Result<Tensor> {
    use candle_nn::Module;
    let pooled = bert
        .pooled_from(states, split)
        .map_err(|e| hone_models::Error::Invalid(e.to_string()))?;
    Ok(head.forward(&pooled)?.squeeze(1)?)
}
