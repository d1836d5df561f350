//! A trainable f32 Llama-family causal LM (SmolLM2's architecture), written
//! from differentiable candle primitives: RMSNorm, rotate-half rotary
//! embeddings, grouped-query attention with a causal mask and `ops::softmax`,
//! and a SwiGLU MLP. The fused candle norms, `softmax_last_dim` and SDPA have
//! no backward pass, so none of them appear here.
//!
//! [`Llama::from_gguf`] dequantizes a llama.cpp GGUF into `Var`s of a
//! [`VarMap`] (named as in Hugging Face checkpoints), undoing the Q/K row
//! permutation llama.cpp's converter applies for its interleaved RoPE.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Embedding, VarBuilder, VarMap};
use hone_models::linear::Linear;

use crate::{Error, Result};

/// Shape of a [`Llama`], read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// Maximum sequence length.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn from_gguf(content: &Content) -> Result<Self> {
        let arch = get(content, "general.architecture")?
            .to_string()
            .map_err(|e| Error::Metadata(format!("general.architecture: {e}")))?
            .clone();
        let u = |key: &str| -> Result<usize> {
            let key = format!("{arch}.{key}");
            Ok(get(content, &key)?
                .to_u32()
                .map_err(|e| Error::Metadata(format!("{key}: {e}")))? as usize)
        };
        let f = |key: &str, default: f64| -> Result<f64> {
            let key = format!("{arch}.{key}");
            match content.metadata.get(&key) {
                None => Ok(default),
                Some(v) => Ok(v
                    .to_f32()
                    .map_err(|e| Error::Metadata(format!("{key}: {e}")))?
                    as f64),
            }
        };
        let vocab_size = get(content, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| Error::Metadata(format!("tokenizer.ggml.tokens: {e}")))?
            .len();
        Ok(Self {
            vocab_size,
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: u("attention.head_count")?,
            num_key_value_heads: u("attention.head_count_kv")?,
            rope_theta: f("rope.freq_base", 10_000.0)?,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5)?,
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        })
    }
}

/// Opens a GGUF file and reads its header (metadata and tensor index).
pub(crate) fn open_gguf(path: &Path) -> Result<(std::fs::File, Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| Error::Input(format!("{} is not a GGUF file: {e}", path.display())))?;
    Ok((file, content))
}

fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| Error::Metadata(format!("no {key}")))
}

/// RMSNorm from primitives: `x / sqrt(mean(x²) + eps) * weight`.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// Frozen: no backward pass computes a gradient for the weight.
    fn freeze(&mut self) {
        self.weight = self.weight.detach();
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)
    }
}

/// Cos/sin tables for rotate-half (Hugging Face layout) rotary embeddings.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), device)?.unsqueeze(0)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Rotates `x` of shape [B, H, T, D] at positions `offset..offset + T`.
    fn apply_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * head_dim,
            cfg.num_key_value_heads * head_dim,
        );
        let linear =
            |i, o, name| -> Result<Linear> { Ok(Linear::new(vb.get((o, i), name)?, None)) };
        Ok(Self {
            q_proj: linear(h, q, "q_proj.weight")?,
            k_proj: linear(h, kv, "k_proj.weight")?,
            v_proj: linear(h, kv, "v_proj.weight")?,
            o_proj: linear(q, h, "o_proj.weight")?,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim,
        })
    }

    /// Attention of `x`'s T tokens at positions `offset..offset + T`; with a
    /// cache slot, over the cached keys and values of the earlier positions
    /// too (which the slot then holds with these appended).
    fn forward_at(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        offset: usize,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotary.apply_at(&heads(self.q_proj.forward(x)?, self.n_heads)?, offset)?;
        let k = rotary.apply_at(&heads(self.k_proj.forward(x)?, self.n_kv_heads)?, offset)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads)?;
        // The cache holds keys and values before the GQA grouping: n_rep
        // times less memory than repeated ones.
        let (k, v) = match slot {
            None => (k, v),
            Some(slot) => hone_models::kv_buffers::append(slot, &k, &v, offset, CACHE_CHUNK)?,
        };
        // Grouped-query attention without copying k and v n_rep times: the
        // n_rep query heads that share a kv head are stacked along T
        // ([B, H, T, D] -> [B, KV, n_rep * T, D]; head h uses kv head
        // h / n_rep, as in Hugging Face's repeat_kv), so that one matmul per
        // kv head serves them all.
        let (kv, n_rep, d) = (
            self.n_kv_heads,
            self.n_heads / self.n_kv_heads,
            self.head_dim,
        );
        let l = k.dim(2)?;
        let q = q.reshape((b, kv, n_rep * t, d))?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let scores = scores.reshape((b, kv, n_rep, t, l))?.broadcast_add(mask)?;
        let weights =
            candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((b, kv, n_rep * t, l))?;
        let out = weights
            .matmul(&v)?
            .reshape((b, self.n_heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * d))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// Positions a cache buffer grows by: a step writes into room already
/// there instead of concatenating (and copying) every earlier key.
/// (4 in unit tests, so that their short sequences grow the buffers too.)
const CACHE_CHUNK: usize = if cfg!(test) { 4 } else { 256 };

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(vb.get((i, h), "gate_proj.weight")?, None),
            up_proj: Linear::new(vb.get((i, h), "up_proj.weight")?, None),
            down_proj: Linear::new(vb.get((h, i), "down_proj.weight")?, None),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let silu = (&gate * candle_nn::ops::sigmoid(&gate)?)?;
        self.down_proj.forward(&(silu * self.up_proj.forward(x)?)?)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    /// Where projection `name` sits in the layer: `self_attn.q_proj`,
    /// `mlp.up_proj`.
    fn path(name: &str) -> String {
        let module = if ["gate_proj", "up_proj", "down_proj"].contains(&name) {
            "mlp"
        } else {
            "self_attn"
        };
        format!("{module}.{name}")
    }

    /// The layer's projections by their Hugging Face names.
    fn linears(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("q_proj", &mut a.q_proj),
            ("k_proj", &mut a.k_proj),
            ("v_proj", &mut a.v_proj),
            ("o_proj", &mut a.o_proj),
            ("gate_proj", &mut m.gate_proj),
            ("up_proj", &mut m.up_proj),
            ("down_proj", &mut m.down_proj),
        ]
    }

    fn forward(&self, x: &Tensor, rotary: &Rotary, mask: &Tensor) -> Result<Tensor> {
        self.forward_at(x, rotary, mask, 0, None)
    }

    fn forward_at(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        offset: usize,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let h = self.self_attn.forward_at(
            &self.input_layernorm.forward(x)?,
            rotary,
            mask,
            offset,
            slot,
        )?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

pub mod critic;

/// A Llama-family causal LM whose weights are trainable `Var`s.
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    cfg: LlamaConfig,
    device: Device,
}

impl Llama {
    /// Builds the model from `vb` (Hugging Face tensor names).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let embed = vb.get(
            (cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens.weight",
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm"))?,
            lm_head: Linear::new(lm_head, None),
            rotary: Rotary::new(cfg, vb.device())?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// Loads every layer of a llama.cpp GGUF as f32 `Var`s.
    pub fn from_gguf(path: &Path, device: &Device) -> Result<(Self, VarMap)> {
        Self::load_gguf(path, device, None)
    }

    /// Loads only the first `n_layers` layers (embedding, final norm and LM
    /// head included): a smaller, faster model for tests.
    pub fn from_gguf_truncated(
        path: &Path,
        device: &Device,
        n_layers: usize,
    ) -> Result<(Self, VarMap)> {
        Self::load_gguf(path, device, Some(n_layers))
    }

    fn load_gguf(path: &Path, device: &Device, n_layers: Option<usize>) -> Result<(Self, VarMap)> {
        let (mut file, content) = open_gguf(path)?;
        Self::from_gguf_content(&content, &mut file, device, n_layers)
    }

    /// [`Llama::from_gguf`] from a GGUF already opened by [`open_gguf`], so
    /// that a caller who also reads its metadata (the tokenizer) parses the
    /// header once.
    pub(crate) fn from_gguf_content(
        content: &Content,
        file: &mut std::fs::File,
        device: &Device,
        n_layers: Option<usize>,
    ) -> Result<(Self, VarMap)> {
        let mut cfg = LlamaConfig::from_gguf(content)?;
        if let Some(n) = n_layers {
            cfg.num_hidden_layers = cfg.num_hidden_layers.min(n);
        }
        let varmap = VarMap::new();
        {
            let mut vars = varmap.data().lock().expect("VarMap lock");
            let mut load = |gguf: &str, hf: String, unpermute: Option<usize>| -> Result<()> {
                let tensor = content
                    .tensor(&mut *file, gguf, &Device::Cpu)?
                    .dequantize(&Device::Cpu)?;
                let tensor = match unpermute {
                    Some(n_head) => unpermute_rows(&tensor, n_head)?,
                    None => tensor,
                };
                vars.insert(hf, Var::from_tensor(&tensor.to_device(device)?)?);
                Ok(())
            };
            load(
                "token_embd.weight",
                "model.embed_tokens.weight".into(),
                None,
            )?;
            load("output_norm.weight", "model.norm.weight".into(), None)?;
            if !cfg.tie_word_embeddings {
                load("output.weight", "lm_head.weight".into(), None)?;
            }
            for i in 0..cfg.num_hidden_layers {
                let hf = |name: &str| format!("model.layers.{i}.{name}");
                let gguf = |name: &str| format!("blk.{i}.{name}.weight");
                let heads = Some(cfg.num_attention_heads);
                let kv_heads = Some(cfg.num_key_value_heads);
                load(&gguf("attn_norm"), hf("input_layernorm.weight"), None)?;
                load(&gguf("attn_q"), hf("self_attn.q_proj.weight"), heads)?;
                load(&gguf("attn_k"), hf("self_attn.k_proj.weight"), kv_heads)?;
                load(&gguf("attn_v"), hf("self_attn.v_proj.weight"), None)?;
                load(&gguf("attn_output"), hf("self_attn.o_proj.weight"), None)?;
                load(
                    &gguf("ffn_norm"),
                    hf("post_attention_layernorm.weight"),
                    None,
                )?;
                load(&gguf("ffn_gate"), hf("mlp.gate_proj.weight"), None)?;
                load(&gguf("ffn_up"), hf("mlp.up_proj.weight"), None)?;
                load(&gguf("ffn_down"), hf("mlp.down_proj.weight"), None)?;
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Self::new(&cfg, vb)?;
        Ok((model, varmap))
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Final-norm hidden states [B, T, hidden] of token ids [B, T].
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        self.hidden_from(&self.residual_after(ids, 0)?, 0)
    }

    /// The residual stream [B, T, hidden] of token ids [B, T] after the
    /// embedding and the first `layers` layers: what a partial fine-tune
    /// computes once per sequence when those layers are frozen.
    ///
    /// With `layers` > 0 it is detached, and so is the stream after every
    /// layer: the weights are variables, so each op would otherwise keep
    /// its inputs alive until the end, every layer's activations at once
    /// (for four sequences of 2,000 tokens, about 0.6 GB of attention
    /// weights a layer). Detached, a layer's activations go as the next
    /// one runs. With `layers` = 0 it is the embedding, gradient and all.
    pub fn residual_after(&self, ids: &Tensor, layers: usize) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "{t} tokens exceed the {}-token context",
                self.cfg.max_position_embeddings
            )));
        }
        if layers > self.layers.len() {
            return Err(Error::Input(format!(
                "{layers} layers asked of a model of {}",
                self.layers.len()
            )));
        }
        let mask = causal_mask(t, &self.device)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers[..layers] {
            x = layer.forward(&x.detach(), &self.rotary, &mask)?.detach();
        }
        Ok(x)
    }

    /// Final-norm hidden states [B, T, hidden] from `x`, the residual stream
    /// after the first `layer` layers ([`Llama::residual_after`]), through
    /// the remaining layers. Positions start at 0 and attention is causal,
    /// so right padding does not change the earlier positions.
    pub fn hidden_from(&self, x: &Tensor, layer: usize) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let mask = causal_mask(t, &self.device)?;
        let mut x = x.clone();
        for layer in &self.layers[layer.min(self.layers.len())..] {
            x = layer.forward(&x, &self.rotary, &mask)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Adds LoRA adapters (`config`'s rank, alpha and target projections)
    /// to layers `layers`, their `A` drawn from `seed`. Every weight of
    /// those layers and the final norm is then frozen (detached, so that no
    /// backward pass computes the gradients of the MLP's and the other
    /// projections' weights: most of a step's cost); the adapters are all
    /// that trains. Returns the adapters' variables by name
    /// (`model.layers.I.self_attn.q_proj.lora_A`, `.lora_B`), sorted.
    pub fn add_lora(
        &mut self,
        config: &hone_models::lora::LoraConfig,
        layers: std::ops::Range<usize>,
        seed: u64,
    ) -> Result<Vec<(String, Var)>> {
        config
            .check(&hone_models::lora::LLAMA_TARGETS)
            .map_err(|(field, message)| Error::Input(format!("{field}: {message}")))?;
        if layers.end > self.layers.len() {
            return Err(Error::Input(format!(
                "LoRA on layers {layers:?} of a model of {}",
                self.layers.len()
            )));
        }
        let device = self.device.clone();
        let mut vars = Vec::new();
        self.norm.freeze();
        for i in layers {
            self.layers[i].input_layernorm.freeze();
            self.layers[i].post_attention_layernorm.freeze();
            for (name, linear) in self.layers[i].linears_mut() {
                if !config.targets.iter().any(|t| t == name) {
                    *linear = linear.clone().frozen();
                    continue;
                }
                let full = format!("{}{}", Self::layer_prefix(i), Layer::path(name));
                let shape = linear.weight().dims2()?;
                let lora = hone_models::lora::Lora::new(
                    shape,
                    config.rank,
                    config.alpha,
                    hone_sdk::text::seeded_hash(seed, &full),
                    &device,
                )?;
                let [a, b] = lora.vars();
                vars.push((format!("{full}.lora_A"), a.clone()));
                vars.push((format!("{full}.lora_B"), b.clone()));
                *linear = linear.clone().with_adapter(lora);
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// The merged weight `W + (alpha / r) B A` of every layer with a LoRA
    /// adapter, under the base weight's name: what a checkpoint stores in
    /// its place, so it loads as the plain model.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, linear) in layer.linears() {
                if let Some(lora) = linear.adapter() {
                    let full = format!("{}{}.weight", Self::layer_prefix(i), Layer::path(name));
                    out.push((full, (linear.weight() + lora.delta()?)?));
                }
            }
        }
        Ok(out)
    }

    /// The LM head's weight [vocab, hidden] (the token embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// The prefix of layer `i`'s variable names (`model.layers.I.`).
    pub fn layer_prefix(i: usize) -> String {
        format!("model.layers.{i}.")
    }

    /// Whether variable `name` is one a partial fine-tune from layer
    /// `first` trains: a weight of layer `first` or above, or the final norm
    /// (not the embedding, which is tied to the LM head).
    pub fn in_top(name: &str, first: usize) -> bool {
        name == "model.norm.weight"
            || name
                .strip_prefix("model.layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= first)
    }

    /// Next-token logits [B, T, vocab] of token ids [B, T].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.hidden(ids)?)?)
    }

    /// An empty cache of keys and values for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Next-token logits [B, T, vocab] of token ids [B, T] that follow the
    /// `cache.len()` tokens already in `cache` (every row at the same
    /// positions), which then holds these too. A prompt goes in whole (the
    /// prefill), then one token a step: each step costs attention over the
    /// cached keys instead of a forward pass over the whole sequence.
    ///
    /// **Inference only.** Keys and values are written in place into the
    /// cache's buffers, which are not part of the autograd graph, so no
    /// gradient flows through them (nor through this call's own keys and
    /// values): train with [`Llama::forward`].
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.hidden_cached(ids, cache)?)?)
    }

    /// Like [`Llama::forward_cached`], but the logits [B, vocab] of the last
    /// position only: a prefill of T tokens then skips T - 1 rows of the LM
    /// head, its largest matmul (49,152 × 576 for SmolLM2).
    pub fn next_logits_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.hidden_cached(ids, cache)?;
        let t = hidden.dim(1)?;
        // Contiguous: a strided [B, hidden] is refused by CUDA's gemm.
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        Ok(self.lm_head.forward(&last)?)
    }

    /// Final-norm hidden states [B, T, hidden] of `ids` after the cached tokens.
    fn hidden_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.len;
        if cache.layers.len() != self.layers.len() {
            return Err(Error::Input(format!(
                "a cache of {} layers for a model of {}: make it with this model's new_cache()",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        if offset + t > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "{} tokens exceed the {}-token context",
                offset + t,
                self.cfg.max_position_embeddings
            )));
        }
        let mask = causal_mask_at(t, offset, &self.device)?;
        // Generation takes no gradient: detached after every layer, a
        // layer's activations are freed as the next one runs (a long
        // prompt's prefill would otherwise hold all 30 layers' at once),
        // and the cached keys and values hold no graph.
        let mut x = self.embed_tokens.forward(ids)?.detach();
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer
                .forward_at(&x, &self.rotary, &mask, offset, Some(slot))?
                .detach();
        }
        cache.len += t;
        Ok(self.norm.forward(&x)?)
    }
}

/// Keys and values of the tokens a [`Llama`] has seen, per layer
/// ([B, KV heads, capacity, head dim] buffers, after the rotary embedding,
/// written in place: a clone would share them, so there is none; copy rows
/// with [`KvCache::select_rows`]).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A cache of the rows `rows` of this one, in that order (an index may
    /// repeat): `&[0; n]` copies a one-row prefill to n samples, and a
    /// subset drops the rows whose sequences have ended.
    pub fn select_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let Some(device) = self.layers.iter().flatten().map(|(k, _)| k.device()).next() else {
            return Err(Error::Input(
                "the cache is empty: run a prefill first".into(),
            ));
        };
        let index = Tensor::new(rows, device)?;
        let layers = self
            .layers
            .iter()
            .map(|slot| match slot {
                Some((k, v)) => Ok(Some((
                    k.index_select(&index, 0)?,
                    v.index_select(&index, 0)?,
                ))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: self.len,
        })
    }
}

/// [T, T] additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    causal_mask_at(t, 0, device)
}

/// [T, offset + T] additive mask for T new tokens after `offset` cached
/// ones: new token i sees every cached token and new tokens up to i.
fn causal_mask_at(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..offset + t).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_slice(&mask, (t, offset + t), device)?)
}

/// Inverts llama.cpp's converter, which reorders each head's rows from
/// rotate-half to interleaved pairs:
/// `w.reshape(n_head, 2, hd/2, dim).swapaxes(1, 2).reshape(...)`.
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, dim) = w.dims2()?;
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, dim))?
        .transpose(1, 2)?
        .reshape((rows, dim))?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// llama.cpp's `permute`: per head, rows `[first half | second half]`
    /// become interleaved pairs.
    fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
        let (rows, dim) = w.dims2().unwrap();
        w.reshape((n_head, 2, rows / n_head / 2, dim))
            .and_then(|w| w.transpose(1, 2))
            .and_then(|w| w.reshape((rows, dim)))
            .unwrap()
    }

    #[test]
    fn unpermute_rows_inverts_llama_cpp_permute() {
        let w = Tensor::arange(0f32, 3.0 * 8.0 * 2.0, &Device::Cpu)
            .and_then(|w| w.reshape((24, 2)))
            .unwrap();
        let permuted = llama_cpp_permute(&w, 3);
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        let restored = unpermute_rows(&permuted, 3).unwrap();
        assert_eq!(
            restored.to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    /// The largest absolute difference between two tensors of one shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    /// A tiny model with random weights (GQA: 4 query heads, 2 kv heads).
    pub(crate) fn tiny() -> Llama {
        tiny_llama().0
    }

    /// [`tiny`] with its weights.
    pub(crate) fn tiny_llama() -> (Llama, VarMap) {
        let cfg = LlamaConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Llama::new(&cfg, vb).unwrap();
        // The var builder makes every weight zero: norms to one, the rest
        // seeded normal(0, 0.2), in name order.
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut rng = hone_models::sample::Rng::new(11);
        for name in names {
            let var = &data[name];
            let value = if name.ends_with("norm.weight") {
                var.ones_like().unwrap()
            } else {
                let values: Vec<f32> = (0..var.elem_count())
                    .map(|_| (rng.next_normal() * 0.2) as f32)
                    .collect();
                Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()
            };
            var.set(&value).unwrap();
        }
        drop(data);
        (model, varmap)
    }

    #[test]
    fn the_forward_split_at_any_layer_is_the_whole_forward() {
        let model = tiny();
        let ids = Tensor::new(&[[3u32, 17, 42, 8, 1, 29]], &Device::Cpu).unwrap();
        let whole = model.hidden(&ids).unwrap();
        for at in 0..=2 {
            let split = model
                .hidden_from(&model.residual_after(&ids, at).unwrap(), at)
                .unwrap();
            let diff = max_diff(&whole, &split);
            assert!(diff < 1e-6, "split at {at}: {diff}");
        }
        assert!(model.residual_after(&ids, 3).is_err());
    }

    #[test]
    fn cached_decoding_gives_the_logits_of_the_whole_sequence() {
        let model = tiny();
        let ids: Vec<u32> = vec![3, 17, 42, 8, 8, 1, 29, 11, 5, 40, 2, 33];
        let mut flat = ids.clone();
        flat.extend(ids.iter().rev());
        let rows = Tensor::from_vec(flat, (2, ids.len()), &Device::Cpu).unwrap();
        let whole = model.forward(&rows).unwrap();
        // A 5-token prefill, then one token a step.
        let mut cache = model.new_cache();
        let mut parts = vec![model
            .forward_cached(&rows.narrow(1, 0, 5).unwrap(), &mut cache)
            .unwrap()];
        for t in 5..ids.len() {
            parts.push(
                model
                    .forward_cached(&rows.narrow(1, t, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), ids.len());
        let cached = Tensor::cat(&parts, 1).unwrap();
        let diff = max_diff(&whole, &cached);
        assert!(diff < 1e-4, "cached logits differ by {diff}");
        // Past the context: an error, not a panic.
        let long = Tensor::zeros((1, 60), DType::U32, &Device::Cpu).unwrap();
        assert!(model.forward_cached(&long, &mut cache).is_err());
    }

    #[test]
    fn the_top_of_a_partial_fine_tune_is_its_layers_from_the_first_and_the_final_norm() {
        assert!(Llama::in_top("model.layers.29.mlp.up_proj.weight", 28));
        assert!(Llama::in_top("model.layers.28.input_layernorm.weight", 28));
        assert!(!Llama::in_top("model.layers.27.mlp.up_proj.weight", 28));
        // By number, not by text: layer 2 is not layer 28's prefix.
        assert!(!Llama::in_top("model.layers.2.mlp.up_proj.weight", 28));
        assert!(Llama::in_top("model.layers.100.mlp.up_proj.weight", 28));
        assert!(Llama::in_top("model.norm.weight", 28));
        assert!(!Llama::in_top("model.embed_tokens.weight", 28));
    }

    #[test]
    fn causal_mask_hides_only_the_future() {
        let mask = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in mask.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v == f32::NEG_INFINITY, j > i, "mask[{i}][{j}] = {v}");
            }
        }
    }
}
