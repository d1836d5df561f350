//! A GPT-style causal language model: learned token and position
//! embeddings, pre-LN blocks of causal self-attention and a GELU MLP, a final
//! layer norm and an (untied) LM head, with a KV cache for generation.
//!
//! Layer norm, the causal softmax of attention and GELU are this crate's
//! fused CPU ops with their own backward pass (`crate::ops`; candle's fused
//! layer norm and softmax have none), falling back to differentiable
//! primitives off the CPU or for dtypes other than f32/f64.

use crate::linear::Linear;
use crate::sample::Rng;
use crate::{Error, Result, Tensor, VarBuilder, VarMap};
use candle_core::Module;
use candle_nn::{Embedding, Init};

/// Standard deviation of the normal initialisation of weight matrices.
pub const INIT_STD: f64 = 0.02;
const LN_EPS: f64 = 1e-5;

/// Shape of a [`Gpt`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention heads per block; must divide `d_model`.
    pub n_heads: usize,
    /// Maximum sequence length (number of learned positions).
    pub context: usize,
}

impl GptConfig {
    /// A tiny model for tests: d_model 64, 2 layers, 4 heads, context 64.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            context: 64,
        }
    }

    fn validate(&self) -> Result<()> {
        let mut errors = Vec::new();
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("context", self.context),
        ] {
            if value == 0 {
                errors.push(format!("{name} must be at least 1"));
            }
        }
        if self.n_heads > 0 && !self.d_model.is_multiple_of(self.n_heads) {
            errors.push(format!(
                "d_model {} is not divisible by n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "invalid GptConfig: {}",
                errors.join("; ")
            )))
        }
    }
}

/// A linear layer with normal(0, [`INIT_STD`]) weights and zero bias.
pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: INIT_STD,
    };
    let weight = vb.get_with_hints((d_out, d_in), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(d_out, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Layer norm over the last dimension (`crate::ops::layer_norm`).
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(d, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", Init::Const(0.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, LN_EPS)
    }
}

/// Causal multi-head self-attention.
struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            c_attn: linear(cfg.d_model, 3 * cfg.d_model, true, vb.pp("c_attn"))?,
            c_proj: linear(cfg.d_model, cfg.d_model, true, vb.pp("c_proj"))?,
            n_heads: cfg.n_heads,
            head_dim: cfg.d_model / cfg.n_heads,
        })
    }

    /// `x` [B,T,D] holds the positions after the `offset` ones whose keys
    /// and values `cache` holds; the cache is extended with them.
    fn forward(
        &self,
        x: &Tensor,
        cache: Option<(&mut Option<(Tensor, Tensor)>, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let Some((slot, offset)) = cache else {
            // Training and scoring: the fused op (crate::attention).
            let y = crate::attention::causal_self_attention(&qkv, self.n_heads)?;
            return Ok(self.c_proj.forward(&y)?);
        };
        let heads = qkv.reshape((b, t, 3, self.n_heads, self.head_dim))?;
        let new = |i: usize| -> Result<Tensor> {
            Ok(heads
                .narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (k, v) = crate::kv_buffers::append(slot, &new(1)?, &new(2)?, offset, CACHE_CHUNK)?;
        let y = crate::attention::cached_attention(&qkv, &k, &v, self.n_heads)?;
        Ok(self.c_proj.forward(&y)?)
    }
}

/// Positions a cache buffer grows by (`crate::kv_buffers`); 4 in unit
/// tests, so that their short sequences grow the buffers too.
const CACHE_CHUNK: usize = if cfg!(test) { 4 } else { 64 };

/// Position-wise feed-forward network: D -> 4D -> GELU -> D.
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            c_fc: linear(cfg.d_model, 4 * cfg.d_model, true, vb.pp("c_fc"))?,
            c_proj: linear(4 * cfg.d_model, cfg.d_model, true, vb.pp("c_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.c_proj
            .forward(&crate::ops::gelu(&self.c_fc.forward(x)?)?)
    }
}

/// A pre-LN transformer block.
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(cfg.d_model, vb.pp("ln_1"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ln_2: LayerNorm::new(cfg.d_model, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cache: Option<(&mut Option<(Tensor, Tensor)>, usize)>,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

/// Keys and values of the positions already processed, per layer, in
/// buffers that grow by chunks and are written in place (so not `Clone`:
/// a copy would share them).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model of `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every cached position.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// The GPT model. Variable names: `wte.weight`, `wpe.weight`,
/// `h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}`,
/// `ln_f.{weight,bias}`, `lm_head.weight`.
pub struct Gpt {
    cfg: GptConfig,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
}

impl Gpt {
    /// Builds the model, creating or fetching its variables through `vb`.
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let init = Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        };
        let wte = vb.get_with_hints((cfg.vocab_size, cfg.d_model), "wte.weight", init)?;
        let wpe = vb.get_with_hints((cfg.context, cfg.d_model), "wpe.weight", init)?;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(cfg, vb.pp(format!("h.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            wte: Embedding::new(wte, cfg.d_model),
            wpe: Embedding::new(wpe, cfg.d_model),
            blocks,
            ln_f: LayerNorm::new(cfg.d_model, vb.pp("ln_f"))?,
            lm_head: linear(cfg.d_model, cfg.vocab_size, false, vb.pp("lm_head"))?,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Hidden states after the final layer norm: ids [B,T] u32 -> [B,T,D].
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, None)
    }

    /// Logits [B,T,V] (in the model's dtype: f32 for an f32 model) of ids [B,T].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.hidden(ids)?)?)
    }

    /// Logits [B,t,V] of new tokens [B,t] placed after the `cache.len()`
    /// positions already in `cache`, which is extended by t.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Invalid(format!(
                "KvCache has {} layers but the model has {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let hidden = self.run(ids, Some(cache))?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    fn run(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if offset + t > self.cfg.context {
            return Err(Error::Invalid(format!(
                "sequence of {} positions exceeds the model's context of {}",
                offset + t,
                self.cfg.context
            )));
        }
        let positions = Tensor::arange(offset as u32, (offset + t) as u32, ids.device())?;
        let mut x = self
            .wte
            .forward(ids)?
            .broadcast_add(&self.wpe.forward(&positions)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_mut().map(|c| (&mut c.layers[i], c.len));
            x = block.forward(&x, slot)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(self.ln_f.forward(&x)?)
    }
}

/// Re-initialises every variable of `varmap` from a seeded [`Rng`], so that
/// the same seed gives the same weights (candle's CPU RNG cannot be seeded).
/// By name, as this crate's models create them: `*.bias` -> 0, `ln*.weight`
/// -> 1, everything else normal(0, [`INIT_STD`]). Variables are visited in
/// name order.
pub fn init_seeded(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let mut parts = name.rsplit('.');
        let (last, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let value = if last == "bias" {
            var.zeros_like()?
        } else if parent.starts_with("ln") {
            var.ones_like()?
        } else {
            let n = var.elem_count();
            let values: Vec<f64> = (0..n).map(|_| rng.next_normal() * INIT_STD).collect();
            Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?
        };
        var.set(&value)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{DType, Device};

    pub(crate) fn tiny(seed: u64) -> (Gpt, VarMap) {
        tiny_with(&GptConfig::tiny(259), DType::F32, seed)
    }

    pub(crate) fn tiny_with(cfg: &GptConfig, dtype: DType, seed: u64) -> (Gpt, VarMap) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let gpt = Gpt::new(cfg, vb).unwrap();
        init_seeded(&varmap, seed).unwrap();
        (gpt, varmap)
    }

    pub(crate) fn ids(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    #[test]
    fn shapes() {
        let (gpt, _) = tiny(1);
        let x = ids(&[&[1, 2, 3], &[4, 5, 6]]);
        assert_eq!(gpt.hidden(&x).unwrap().dims(), &[2, 3, 64]);
        let logits = gpt.forward(&x).unwrap();
        assert_eq!(logits.dims(), &[2, 3, 259]);
        assert_eq!(logits.dtype(), DType::F32);
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let (gpt, varmap) = tiny(2);
        let x = ids(&[&[1, 2, 3, 4, 5], &[9, 8, 7, 6, 5]]);
        let loss = gpt.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(varmap.all_vars().len(), 4 + 2 * 12 + 1);
        let none: Vec<String> = Vec::new();
        assert_eq!(
            crate::train::vars_without_gradient(&varmap, &grads).unwrap(),
            none
        );
    }

    #[test]
    fn finite_differences_agree_with_backprop() {
        let cfg = GptConfig {
            vocab_size: 11,
            d_model: 8,
            n_layers: 2,
            n_heads: 2,
            context: 8,
        };
        let (gpt, varmap) = tiny_with(&cfg, DType::F64, 3);
        let x = ids(&[&[1, 2, 3, 4], &[5, 6, 7, 8]]);
        let targets = ids(&[&[2, 3, 4, 5], &[6, 7, 8, 9]]);
        let mask = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let loss = |g: &Gpt| {
            crate::train::masked_lm_loss(&g.forward(&x).unwrap(), &targets, &mask).unwrap()
        };
        let grads = loss(&gpt).backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let eps = 1e-4;
        let mut checked = 0;
        for name in [
            "wte.weight",
            "wpe.weight",
            "h.0.ln_1.weight",
            "h.0.attn.c_attn.weight",
            "h.1.attn.c_proj.bias",
            "h.1.mlp.c_fc.weight",
            "ln_f.bias",
            "lm_head.weight",
        ] {
            let var = &data[name];
            let grad = grads.get(var).unwrap().flatten_all().unwrap();
            let grad: Vec<f64> = grad.to_vec1().unwrap();
            let orig: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            // The entry with the largest gradient, so the check is not of noise.
            let i = (0..grad.len())
                .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
                .unwrap();
            let at = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&gpt).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            let rel = (numeric - grad[i]).abs() / grad[i].abs().max(1e-8);
            assert!(
                rel < 1e-2,
                "{name}[{i}]: numeric {numeric} vs backprop {}",
                grad[i]
            );
            checked += 1;
        }
        assert_eq!(checked, 8);
    }

    #[test]
    fn cached_forward_matches_full_forward() {
        let (gpt, _) = tiny(4);
        let prompt: Vec<u32> = "hello world".bytes().map(u32::from).collect();
        let full = gpt.forward(&ids(&[&prompt])).unwrap();
        let mut cache = KvCache::new(2);
        // First two tokens at once, then one at a time.
        let mut last = gpt
            .forward_cached(&ids(&[&prompt[..2]]), &mut cache)
            .unwrap();
        for &tok in &prompt[2..] {
            last = gpt.forward_cached(&ids(&[&[tok]]), &mut cache).unwrap();
        }
        assert_eq!(cache.len(), prompt.len());
        let n = prompt.len();
        let want = full.narrow(1, n - 1, 1).unwrap();
        let diff = (want - last)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "max abs diff {diff}");
        cache.reset();
        assert!(cache.is_empty());
    }

    #[test]
    fn same_seed_same_weights() {
        let flat = |v: &VarMap| -> Vec<f32> {
            let data = v.data().lock().unwrap();
            let mut names: Vec<_> = data.keys().cloned().collect();
            names.sort();
            names
                .iter()
                .flat_map(|n| data[n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        let (_, a) = tiny(7);
        let (_, b) = tiny(7);
        let (_, c) = tiny(8);
        assert_eq!(flat(&a), flat(&b));
        assert_ne!(flat(&a), flat(&c));
    }

    #[test]
    fn context_overflow_is_an_error() {
        let cfg = GptConfig {
            context: 4,
            ..GptConfig::tiny(259)
        };
        let (gpt, _) = tiny_with(&cfg, DType::F32, 1);
        assert!(gpt.forward(&ids(&[&[1, 2, 3, 4, 5]])).is_err());
        let bad = GptConfig {
            n_heads: 3,
            ..GptConfig::tiny(259)
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let err = Gpt::new(&bad, vb).err().unwrap().to_string();
        assert!(err.contains("n_heads 3"), "{err}");
    }
}
