//! all-MiniLM-L6-v2 as a reward-model backbone: candle's BERT, frozen, with
//! attention-masked mean pooling and a trainable scalar head.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use rand::{Rng, SeedableRng};
use tokenizers::{EncodeInput, Encoding, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{Error, Result};

/// The model's name in [`hone_sdk::pretrained`].
pub const MODEL_NAME: &str = "all-minilm-l6-v2";

/// The prefix of the reward head's variables in [`MiniLmRewardModel::varmap`].
pub const HEAD_PREFIX: &str = "reward_head";

/// A reward model: `reward(prompt, response) = w · mean_pool(bert(prompt, response)) + b`.
///
/// The BERT weights are plain tensors (frozen); `w` and `b` live in a
/// [`VarMap`] so an optimiser can train them.
pub struct MiniLmRewardModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    head: Linear,
    varmap: VarMap,
    device: Device,
}

impl MiniLmRewardModel {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from
    /// `dir` (as returned by `hone_sdk::pretrained::fetch(MODEL_NAME)`) and
    /// initialises the head from `seed` like PyTorch's `nn.Linear`
    /// (uniform in ±1/√hidden).
    pub fn load(dir: &Path, device: &Device, seed: u64) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Config =
            serde_json::from_str(&config_text).map_err(|source| Error::Config {
                path: config_path,
                source,
            })?;

        let weights_path = dir.join("model.safetensors");
        let weights = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)?;
        let bert = BertModel::load(vb, &config)?;

        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), &config)?;

        let (head, varmap) = seeded_head(config.hidden_size, seed, device)?;
        Ok(Self {
            bert,
            tokenizer,
            head,
            varmap,
            device: device.clone(),
        })
    }

    /// The trainable head's variables (`reward_head.weight`, `reward_head.bias`).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The tokenizer (padding to the longest in a batch, truncating to the
    /// model's 512 positions).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// One reward per (prompt, response) pair.
    pub fn score(&self, prompts: &[&str], responses: &[&str]) -> Result<Vec<f32>> {
        Ok(self.score_tensor(prompts, responses)?.to_vec1::<f32>()?)
    }

    /// [`MiniLmRewardModel::score`] as a `(batch,)` tensor that carries
    /// gradients to the head, for training it.
    pub fn score_tensor(&self, prompts: &[&str], responses: &[&str]) -> Result<Tensor> {
        if prompts.len() != responses.len() {
            return Err(Error::Input(format!(
                "{} prompts but {} responses: score takes them in pairs",
                prompts.len(),
                responses.len()
            )));
        }
        let pairs: Vec<EncodeInput> = prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| (*p, *r).into())
            .collect();
        let pooled = self.mean_pooled(pairs)?;
        Ok(self.head.forward(&pooled)?.squeeze(1)?)
    }

    /// What the head reads for each (prompt, response) pair: the pair
    /// encoded as BERT's two segments (`[CLS] prompt [SEP] response [SEP]`,
    /// truncated longest-first to the model's 512 positions), BERT's last
    /// hidden states averaged over the real tokens, not normalised. Exactly
    /// the input of the head in [`MiniLmRewardModel::score`], so a head
    /// trained on cached `pool_pairs` rows scores the same. Shape
    /// `(pairs, hidden)`.
    pub fn pool_pairs(&self, prompts: &[&str], responses: &[&str]) -> Result<Tensor> {
        if prompts.len() != responses.len() {
            return Err(Error::Input(format!(
                "{} prompts but {} responses: pool_pairs takes them in pairs",
                prompts.len(),
                responses.len()
            )));
        }
        let pairs: Vec<EncodeInput> = prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| (*p, *r).into())
            .collect();
        self.mean_pooled(pairs)
    }

    /// Width of the pooled embedding (384).
    pub fn hidden_size(&self) -> usize {
        self.head.weight().dim(1).unwrap_or(0)
    }

    /// A fresh head (`reward_head.{weight,bias}` in a new [`VarMap`])
    /// initialised from `seed` as [`MiniLmRewardModel::load`] initialises
    /// its own: several heads trained on one frozen BERT.
    pub fn new_head(&self, seed: u64) -> Result<(Linear, VarMap)> {
        seeded_head(self.hidden_size(), seed, &self.device)
    }

    /// Sentence embeddings as all-MiniLM-L6-v2 defines them: attention-masked
    /// mean of the last hidden states, L2-normalised. Shape `(texts, 384)`.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let inputs: Vec<EncodeInput> = texts.iter().map(|t| (*t).into()).collect();
        let pooled = self.mean_pooled(inputs)?;
        let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        Ok(pooled.broadcast_div(&norm.clamp(1e-12, f64::MAX)?)?)
    }

    /// Encodes a batch and averages BERT's last hidden states over the real
    /// (unpadded) tokens. Shape `(batch, hidden)`.
    fn mean_pooled(&self, inputs: Vec<EncodeInput>) -> Result<Tensor> {
        if inputs.is_empty() {
            return Err(Error::Input("an empty batch".into()));
        }
        let encodings = self.tokenizer.encode_batch(inputs, true)?;
        let ids = self.stack(&encodings, Encoding::get_ids)?;
        let type_ids = self.stack(&encodings, Encoding::get_type_ids)?;
        let mask = self.stack(&encodings, Encoding::get_attention_mask)?;
        let hidden = self.bert.forward(&ids, &type_ids, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        Ok(summed.broadcast_div(&counts)?)
    }

    /// One field of every encoding as a `(batch, seq)` u32 tensor; the
    /// tokenizer pads them to one length.
    fn stack(&self, encodings: &[Encoding], field: fn(&Encoding) -> &[u32]) -> Result<Tensor> {
        let rows = encodings
            .iter()
            .map(|e| Tensor::new(field(e), &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// tokenizer.json pads every input to 128 tokens and truncates there; pad
/// to the batch's longest instead and truncate at the model's positions.
fn load_tokenizer(path: &Path, config: &Config) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)?;
    let mut padding = tokenizer.get_padding().cloned().unwrap_or_default();
    padding.strategy = PaddingStrategy::BatchLongest;
    tokenizer.with_padding(Some(padding));
    let mut truncation = tokenizer
        .get_truncation()
        .cloned()
        .unwrap_or_else(TruncationParams::default);
    truncation.max_length = config.max_position_embeddings;
    tokenizer.with_truncation(Some(truncation))?;
    Ok(tokenizer)
}

/// A `hidden -> 1` linear layer in a fresh [`VarMap`], initialised from
/// `seed` (candle's CPU RNG cannot be seeded), as PyTorch's `nn.Linear`.
pub fn seeded_head(hidden: usize, seed: u64, device: &Device) -> Result<(Linear, VarMap)> {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let head = candle_nn::linear(hidden, 1, vb.pp(HEAD_PREFIX))?;
    let bound = 1.0 / (hidden as f32).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
    let weight = Tensor::from_vec(uniform(hidden), (1, hidden), device)?;
    let bias = Tensor::from_vec(uniform(1), 1, device)?;
    varmap.set_one(format!("{HEAD_PREFIX}.weight"), weight)?;
    varmap.set_one(format!("{HEAD_PREFIX}.bias"), bias)?;
    Ok((head, varmap))
}
