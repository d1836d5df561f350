//! all-MiniLM-L6-v2's BERT encoder, trainable layer by layer: hone's fused
//! ops with their own backward passes (`hone_models::fused`: layer norm,
//! GELU) and the fused linear layer, because candle's fused layer norm and
//! `softmax_last_dim` have no backward pass, and candle-transformers'
//! `BertModel` runs its layers only all at once.
//!
//! Every weight is a `Var` of one [`VarMap`], named as in the checkpoint, so
//! a trainer can hand the optimiser just the top layers' variables
//! ([`Bert::layer_vars`]) while the lower layers run once per text
//! ([`Bert::run_layers`] over a range), their outputs cached.

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Embedding, Module, VarBuilder, VarMap};
use candle_transformers::models::bert::{Config, HiddenAct};
use hone_models::linear::Linear;
use hone_models::lora::{Lora, LoraConfig, BERT_TARGETS};

use crate::{Error, Result};

/// Layer norm, `(x - mean) / sqrt(var + eps) * w + b`, fused.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    /// Frozen: no backward pass computes gradients for its weights.
    fn freeze(&mut self) {
        self.weight = self.weight.detach();
        self.bias = self.bias.detach();
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        hone_models::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((o, i), "weight")?,
        Some(vb.get(o, "bias")?),
    ))
}

struct Layer {
    /// The query, key and value projections' weights `[H, H]` and biases
    /// `[H]`, each its own checkpoint tensor (and `Var`), concatenated into
    /// one projection per call.
    qkv: [(Tensor, Tensor); 3],
    /// LoRA adapters on the query, key and value projections, whose
    /// updates join the frozen weights before the packed product.
    qkv_adapters: [Option<Lora>; 3],
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
    heads: usize,
    act: HiddenAct,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("attention");
        let projection = |name: &str| -> Result<(Tensor, Tensor)> {
            let vb = a.pp(name);
            Ok((vb.get((h, h), "weight")?, vb.get(h, "bias")?))
        };
        Ok(Self {
            qkv: [
                projection("self.query")?,
                projection("self.key")?,
                projection("self.value")?,
            ],
            qkv_adapters: [None, None, None],
            attention_out: linear(h, h, a.pp("output.dense"))?,
            attention_norm: Norm::new(h, cfg.layer_norm_eps, a.pp("output.LayerNorm"))?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            output: linear(cfg.intermediate_size, h, vb.pp("output.dense"))?,
            output_norm: Norm::new(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// `x` [B, T, H].
    fn forward(&self, x: &Tensor, mask: &KeyMask) -> Result<Tensor> {
        // One [3H, H] projection: one gemm instead of three, and the fused
        // attention reads q, k and v out of its rows.
        let [(wq, bq), (wk, bk), (wv, bv)] = &self.qkv;
        let adapted = |w: &Tensor, a: &Option<Lora>| -> candle_core::Result<Tensor> {
            match a {
                None => Ok(w.clone()),
                Some(a) => w + a.update()?,
            }
        };
        let [aq, ak, av] = &self.qkv_adapters;
        let qkv = Linear::new(
            Tensor::cat(&[adapted(wq, aq)?, adapted(wk, ak)?, adapted(wv, av)?], 0)?,
            Some(Tensor::cat(&[bq, bk, bv], 0)?),
        )
        .forward(x)?;
        let context = match mask {
            KeyMask::Lengths(lengths) => {
                hone_models::fused::padded_self_attention(&qkv, self.heads, lengths)?
            }
            KeyMask::Additive(mask) => {
                hone_models::fused::masked_self_attention(&qkv, self.heads, mask)?
            }
        };
        let attended = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&attended)?;
        let inner = match self.act {
            HiddenAct::Gelu => hone_models::fused::gelu_erf(&inner)?,
            HiddenAct::GeluApproximate => hone_models::fused::gelu(&inner)?,
            HiddenAct::Relu => inner.relu()?,
        };
        Ok(self
            .output_norm
            .forward(&(self.output.forward(&inner)? + attended)?)?)
    }
}

impl Layer {
    /// Adds `config`'s adapters (targets from `BERT_TARGETS`) and freezes
    /// every other weight of the layer; returns the adapters by the
    /// projection's path, with the merged-weight name each one updates.
    fn add_lora(
        &mut self,
        config: &LoraConfig,
        seed: impl Fn(&str) -> u64,
    ) -> Result<Vec<(&'static str, Lora)>> {
        let mut added = Vec::new();
        let wanted = |path: &str| config.targets.iter().any(|t| t == path);
        for (j, path) in BERT_TARGETS[..3].iter().enumerate() {
            let (w, b) = &mut self.qkv[j];
            *w = w.detach();
            *b = b.detach();
            if wanted(path) {
                let lora = Lora::new(
                    w.dims2()?,
                    config.rank,
                    config.alpha,
                    seed(path),
                    w.device(),
                )?;
                self.qkv_adapters[j] = Some(lora.clone());
                added.push((*path, lora));
            }
        }
        for (path, linear) in [
            (BERT_TARGETS[3], &mut self.attention_out),
            (BERT_TARGETS[4], &mut self.intermediate),
            (BERT_TARGETS[5], &mut self.output),
        ] {
            if wanted(path) {
                let lora = Lora::new(
                    linear.weight().dims2()?,
                    config.rank,
                    config.alpha,
                    seed(path),
                    linear.weight().device(),
                )?;
                *linear = linear.clone().with_adapter(lora.clone());
                added.push((path, lora));
            } else {
                *linear = linear.clone().frozen();
            }
        }
        self.attention_norm.freeze();
        self.output_norm.freeze();
        Ok(added)
    }

    /// Each adapted projection's merged weight `W + (alpha / r) B A`, by
    /// its path.
    fn merged_weights(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let mut out = Vec::new();
        for (j, a) in self.qkv_adapters.iter().enumerate() {
            if let Some(a) = a {
                out.push((BERT_TARGETS[j], (&self.qkv[j].0 + a.delta()?)?));
            }
        }
        for (path, linear) in [
            (BERT_TARGETS[3], &self.attention_out),
            (BERT_TARGETS[4], &self.intermediate),
            (BERT_TARGETS[5], &self.output),
        ] {
            if let Some(a) = linear.adapter() {
                out.push((path, (linear.weight() + a.delta()?)?));
            }
        }
        Ok(out)
    }
}

/// Which keys BERT's attention sees.
enum KeyMask {
    /// Each sequence's first n tokens are real, the rest padding: the
    /// fused attention.
    Lengths(Vec<usize>),
    /// Any other 0/1 mask, as the additive [B, 1, 1, T] one.
    Additive(Tensor),
}

impl KeyMask {
    /// From a 0/1 attention mask [B, T].
    fn of(mask: &Tensor) -> Result<Self> {
        let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let lengths: Vec<usize> = rows
            .iter()
            .map(|r| r.iter().take_while(|&&m| m != 0).count())
            .collect();
        let padded_at_end = rows
            .iter()
            .zip(&lengths)
            .all(|(r, &n)| n > 0 && r[n..].iter().all(|&m| m == 0));
        if padded_at_end {
            Ok(KeyMask::Lengths(lengths))
        } else {
            Ok(KeyMask::Additive(additive_mask(mask)?))
        }
    }
}

/// A BERT encoder whose weights are `Var`s.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    prefix: String,
    device: Device,
}

impl Bert {
    /// Loads `model.safetensors` and `config.json` from `dir` (as
    /// `hone_sdk::pretrained::fetch("all-minilm-l6-v2")` returns it): every
    /// tensor becomes a `Var` of the returned map, under its checkpoint name.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, VarMap)> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let cfg: Config = serde_json::from_str(&text).map_err(|source| Error::Config {
            path: config_path,
            source,
        })?;
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        let varmap = VarMap::new();
        let prefix = if weights.keys().any(|k| k.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        {
            let mut vars = varmap.data().lock().expect("VarMap lock");
            for (name, tensor) in weights {
                let tensor = tensor.to_dtype(DType::F32)?;
                vars.insert(name, Var::from_tensor(&tensor)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let vb = if prefix.is_empty() { vb } else { vb.pp("bert") };
        let bert = Self::new(&cfg, vb, prefix)?;
        Ok((bert, varmap))
    }

    fn new(cfg: &Config, vb: VarBuilder, prefix: &str) -> Result<Self> {
        let e = vb.pp("embeddings");
        let h = cfg.hidden_size;
        let embedding = |n: usize, name: &str| -> Result<Embedding> {
            Ok(Embedding::new(e.get((n, h), &format!("{name}.weight"))?, h))
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: embedding(cfg.vocab_size, "word_embeddings")?,
            position: embedding(cfg.max_position_embeddings, "position_embeddings")?,
            token_type: embedding(cfg.type_vocab_size, "token_type_embeddings")?,
            embedding_norm: Norm::new(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
            prefix: prefix.to_string(),
            device: vb.device().clone(),
        })
    }

    /// [`Bert::load`], then the tensors of `overrides` (checkpoint names,
    /// say a fine-tuned reward model's top layers) in place of the
    /// pretrained ones; a name the model lacks is an error.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        overrides: &std::collections::HashMap<String, Tensor>,
    ) -> Result<(Self, VarMap)> {
        let (bert, varmap) = Self::load(dir, device)?;
        {
            let vars = varmap.data().lock().expect("VarMap lock");
            for (name, tensor) in overrides {
                let var = vars.get(name).ok_or_else(|| {
                    Error::Input(format!("the BERT checkpoint has no tensor {name}"))
                })?;
                var.set(&tensor.to_dtype(DType::F32)?.to_device(device)?)?;
            }
        }
        Ok((bert, varmap))
    }

    /// The checkpoint-name prefix of layer `i`'s tensors.
    pub fn layer_prefix(&self, i: usize) -> String {
        format!("{}encoder.layer.{i}.", self.prefix)
    }

    /// Width of the hidden states (384 for MiniLM-L6).
    pub fn hidden_size(&self) -> usize {
        self.word.hidden_size()
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The variables of layers `range` (for an optimiser that trains only them).
    pub fn layer_vars(&self, varmap: &VarMap, range: Range<usize>) -> Vec<(String, Var)> {
        let data = varmap.data().lock().expect("VarMap lock");
        let mut out: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| {
                range
                    .clone()
                    .any(|i| name.starts_with(&format!("{}encoder.layer.{i}.", self.prefix)))
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Adds LoRA adapters (`config`; targets from
    /// `hone_models::lora::BERT_TARGETS`) to layers `layers`, their `A`
    /// drawn from `seed`, and freezes every other weight of those layers:
    /// the adapters are all that trains there. Returns the adapters'
    /// variables by name (`encoder.layer.I.attention.self.query.lora_A`,
    /// `.lora_B`), sorted.
    pub fn add_lora(
        &mut self,
        config: &LoraConfig,
        layers: Range<usize>,
        seed: u64,
    ) -> Result<Vec<(String, Var)>> {
        config
            .check(&BERT_TARGETS)
            .map_err(|(field, message)| Error::Input(format!("{field}: {message}")))?;
        if layers.end > self.layers.len() {
            return Err(Error::Input(format!(
                "LoRA on layers {layers:?} of a model of {}",
                self.layers.len()
            )));
        }
        let mut vars = Vec::new();
        for i in layers {
            let prefix = self.layer_prefix(i);
            let seed_of =
                |path: &str| hone_sdk::text::seeded_hash(seed, &format!("{prefix}{path}"));
            for (path, lora) in self.layers[i].add_lora(config, seed_of)? {
                let [a, b] = lora.vars();
                vars.push((format!("{prefix}{path}.lora_A"), a.clone()));
                vars.push((format!("{prefix}{path}.lora_B"), b.clone()));
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// The merged weight of every projection with a LoRA adapter, under the
    /// base weight's checkpoint name: what a checkpoint stores in its place.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (path, w) in layer.merged_weights()? {
                out.push((format!("{}{path}.weight", self.layer_prefix(i)), w));
            }
        }
        Ok(out)
    }

    /// The embedding layer's output [B, T, H] for token ids and segment ids [B, T].
    pub fn embed(&self, ids: &Tensor, type_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let x = self
            .word
            .forward(ids)?
            .add(&self.token_type.forward(type_ids)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        Ok(self.embedding_norm.forward(&x)?)
    }

    /// Runs layers `range` over hidden states [B, T, H]; `mask` is the
    /// attention mask [B, T] (1 for real tokens).
    pub fn run_layers(&self, x: &Tensor, mask: &Tensor, range: Range<usize>) -> Result<Tensor> {
        let mask = KeyMask::of(mask)?;
        let mut x = x.clone();
        for layer in &self.layers[range] {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }

    /// The last hidden states [B, T, H] (every layer).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self.embed(ids, type_ids)?;
        self.run_layers(&x, mask, 0..self.layers.len())
    }

    /// The hidden states after layers `0..split` of each encoded text (ids
    /// and segment ids), one [len, H] tensor a text, computed `batch` texts
    /// a pass (similar lengths together) and detached: the frozen part of a
    /// partly fine-tuned model, run once per distinct text.
    pub fn frozen_states(
        &self,
        texts: &[(Vec<u32>, Vec<u32>)],
        split: usize,
        batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].0.len());
        let mut out: Vec<Option<Tensor>> = vec![None; texts.len()];
        for (done, chunk) in order.chunks(batch.max(1)).enumerate() {
            let rows: Vec<&(Vec<u32>, Vec<u32>)> = chunk.iter().map(|&i| &texts[i]).collect();
            let (ids, types, mask) = pad(&rows, &self.device)?;
            let x = self.embed(&ids, &types)?;
            let x = self.run_layers(&x, &mask, 0..split)?.detach();
            for (row, &i) in chunk.iter().enumerate() {
                let len = texts[i].0.len();
                out[i] = Some(x.get(row)?.narrow(0, 0, len)?.contiguous()?);
            }
            progress(((done + 1) * batch).min(texts.len()), texts.len());
        }
        Ok(out
            .into_iter()
            .map(|t| t.expect("every text computed"))
            .collect())
    }

    /// The mean-pooled last hidden states [B, H] of texts whose states
    /// after layer `split` are `states` (from [`Bert::frozen_states`]):
    /// layers `split..` run here, with gradients.
    pub fn pooled_from(&self, states: &[&Tensor], split: usize) -> Result<Tensor> {
        let hidden = states
            .first()
            .ok_or_else(|| Error::Input("an empty batch".into()))?
            .dim(1)?;
        let longest = states
            .iter()
            .map(|s| s.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let t = longest.iter().copied().max().unwrap_or(0);
        let mut rows = Vec::with_capacity(states.len());
        let mut mask = Vec::with_capacity(states.len() * t);
        for (s, &len) in states.iter().zip(&longest) {
            let padded = if len < t {
                Tensor::cat(
                    &[
                        *s,
                        &Tensor::zeros((t - len, hidden), DType::F32, &self.device)?,
                    ],
                    0,
                )?
            } else {
                (*s).clone()
            };
            rows.push(padded);
            mask.extend((0..t).map(|j| u32::from(j < len)));
        }
        let x = Tensor::stack(&rows, 0)?;
        let mask = Tensor::from_vec(mask, (states.len(), t), &self.device)?;
        let x = self.run_layers(&x, &mask, split..self.layers.len())?;
        mean_pool(&x, &mask)
    }
}

/// Pads encoded texts to the longest: ids, segment ids and mask [B, T].
pub fn pad(rows: &[&(Vec<u32>, Vec<u32>)], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ty) in rows.iter().map(|r| (&r.0, &r.1)) {
        for j in 0..t {
            ids.push(i.get(j).copied().unwrap_or(0));
            types.push(ty.get(j).copied().unwrap_or(0));
            mask.push(u32::from(j < i.len()));
        }
    }
    let shape = (rows.len(), t);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(types, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// all-MiniLM-L6-v2's tokenizer for (prompt, response) pairs as BERT's two
/// segments, truncated longest-first to `max_tokens`; no padding (texts are
/// padded per batch).
pub fn pair_tokenizer(dir: &Path, max_tokens: usize) -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))?;
    tokenizer.with_padding(None);
    let mut truncation = tokenizer.get_truncation().cloned().unwrap_or_default();
    truncation.max_length = max_tokens;
    tokenizer.with_truncation(Some(truncation))?;
    Ok(tokenizer)
}

/// Encodes (prompt, response) pairs: ids and segment ids of each.
pub fn encode_pairs(
    tokenizer: &tokenizers::Tokenizer,
    pairs: &[(&str, &str)],
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let inputs: Vec<tokenizers::EncodeInput> = pairs.iter().map(|(p, r)| (*p, *r).into()).collect();
    Ok(tokenizer
        .encode_batch(inputs, true)?
        .into_iter()
        .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
        .collect())
}

/// [B, T] 0/1 mask as the additive [B, 1, 1, T] one BERT's attention adds:
/// 0 for real tokens, f32::MIN for padding (as Hugging Face does).
fn additive_mask(mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
    Ok(((mask.ones_like()? - &mask)? * f32::MIN as f64)?)
}

/// Mean of `hidden` [B, T, H] over the real tokens of `mask` [B, T].
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    Ok(summed.broadcast_div(&mask.sum(1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer BERT of width 8 with random weights.
    fn layer() -> Layer {
        let cfg = Config {
            hidden_size: 8,
            num_attention_heads: 2,
            intermediate_size: 16,
            ..Config::default()
        };
        let device = Device::Cpu;
        let mut tensors = std::collections::HashMap::new();
        for (name, shape) in [
            ("attention.self.query", &[8usize, 8][..]),
            ("attention.self.key", &[8, 8]),
            ("attention.self.value", &[8, 8]),
            ("attention.output.dense", &[8, 8]),
            ("intermediate.dense", &[16, 8]),
            ("output.dense", &[8, 16]),
        ] {
            let w = Tensor::randn(0f32, 0.5, shape, &device).unwrap();
            let b = Tensor::randn(0f32, 0.1, shape[0], &device).unwrap();
            tensors.insert(format!("{name}.weight"), w);
            tensors.insert(format!("{name}.bias"), b);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            tensors.insert(
                format!("{name}.weight"),
                Tensor::ones(8, DType::F32, &device).unwrap(),
            );
            tensors.insert(
                format!("{name}.bias"),
                Tensor::zeros(8, DType::F32, &device).unwrap(),
            );
        }
        Layer::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &device)).unwrap()
    }

    #[test]
    fn padding_at_the_end_takes_the_fused_attention_and_agrees_with_the_additive_mask() {
        let layer = layer();
        let x = Tensor::randn(0f32, 1.0, (3, 5, 8), &Device::Cpu).unwrap();
        let mask = Tensor::new(
            &[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let fused = KeyMask::of(&mask).unwrap();
        assert!(matches!(&fused, KeyMask::Lengths(n) if n == &[5, 3, 1]));
        let additive = KeyMask::Additive(additive_mask(&mask).unwrap());
        let a = layer.forward(&x, &fused).unwrap();
        let b = layer.forward(&x, &additive).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "the two attention paths differ by {diff}");
    }

    #[test]
    fn a_mask_with_holes_takes_the_additive_path() {
        let mask = Tensor::new(&[[1u32, 0, 1], [1, 1, 1]], &Device::Cpu).unwrap();
        assert!(matches!(KeyMask::of(&mask).unwrap(), KeyMask::Additive(_)));
        let empty = Tensor::new(&[[0u32, 0, 0]], &Device::Cpu).unwrap();
        assert!(matches!(KeyMask::of(&empty).unwrap(), KeyMask::Additive(_)));
    }
}
