//! LoRA (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language
//! Models*): a frozen linear layer `y = x W^T` learns a low-rank update,
//! `y = x W^T + (alpha / r) · x A^T B^T`, with `A` [r, in] and `B` [out, r]
//! the only trained weights.
//!
//! As in PEFT, `A` starts from Kaiming-uniform draws (bound `1/sqrt(in)`) and
//! `B` from zeros, so an adapted model starts exactly where the base model
//! is; `B` gets a gradient from the first step, `A` once `B` is non-zero.
//!
//! A checkpoint stores the merged weight `W + (alpha / r) · B A` under the
//! layer's own name, so it loads like any checkpoint of the base model. That
//! is also what weight averaging (WARM) must average: the mean of merged
//! weights is `W + mean(ΔW_i)`, while averaging `A` and `B` separately gives
//! `mean(B_i) · mean(A_i)`, which is not the mean of the products (and is
//! not even a function of the members' updates: the same ΔW has many
//! factorisations).

use candle_core::{Device, Tensor, Var};

use crate::sample::Rng;
use crate::{Error, Result};

/// The projections of a transformer block an adapter can go on, by the
/// Hugging Face names of Llama's linear layers.
pub const LLAMA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The projections of a BERT layer an adapter can go on, by their paths in
/// the layer's checkpoint names (`encoder.layer.I.attention.self.query`).
pub const BERT_TARGETS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// What adapters to add: rank, scale and which projections.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// r: the update's rank.
    pub rank: usize,
    /// alpha: the update is scaled by alpha / r.
    pub alpha: f64,
    /// The projections adapted, e.g. `["q_proj", "v_proj"]` (PEFT's
    /// default for Llama).
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// An error naming the first problem: rank 0, a non-positive alpha, no
    /// targets, or a target not among `known`.
    pub fn check(&self, known: &[&str]) -> std::result::Result<(), (&'static str, String)> {
        if self.rank == 0 {
            return Err(("lora_rank", "must be at least 1".into()));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err((
                "lora_alpha",
                format!("must be above 0, found {}", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(("lora_targets", format!("name at least one of {known:?}")));
        }
        if let Some(t) = self.targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err((
                "lora_targets",
                format!("unknown projection {t:?}: the model has {known:?}"),
            ));
        }
        Ok(())
    }
}

/// One layer's adapter: `A` [r, in], `B` [out, r] and the scale alpha / r.
#[derive(Clone, Debug)]
pub struct Lora {
    a: Var,
    b: Var,
    scale: f64,
}

impl Lora {
    /// A fresh adapter for a layer of weight [out, in]: `A` drawn from
    /// `seed`, `B` zero.
    pub fn new(
        (out_dim, in_dim): (usize, usize),
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::Invalid("a LoRA rank must be at least 1".into()));
        }
        let bound = 1.0 / (in_dim as f64).sqrt();
        let mut rng = Rng::new(seed);
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Ok(Lora {
            a: Var::from_tensor(&Tensor::from_vec(a, (rank, in_dim), device)?)?,
            b: Var::zeros((out_dim, rank), candle_core::DType::F32, device)?,
            scale: alpha / rank as f64,
        })
    }

    /// `A` and `B`, the weights a step trains.
    pub fn vars(&self) -> [&Var; 2] {
        [&self.a, &self.b]
    }

    /// The update's output `(alpha / r) · x A^T B^T` for `x` [.., in].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let low = x.broadcast_matmul(&self.a.as_tensor().t()?)?;
        low.broadcast_matmul(&self.b.as_tensor().t()?)? * self.scale
    }

    /// The weight update `(alpha / r) · B A` [out, in], with gradients: for
    /// a layer that adds it to its frozen weight before its product (BERT's
    /// packed q/k/v projection).
    pub fn update(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }

    /// The weight update `(alpha / r) · B A` [out, in], detached: what a
    /// checkpoint adds to the base weight.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?.detach())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Linear;
    use candle_core::Module;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn an_adapted_layer_computes_the_merged_weight_and_starts_at_the_base() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let lora = Lora::new((6, 5), 2, 4.0, 7, &dev).unwrap();
        let base = Linear::new(w.clone(), None);
        let adapted = Linear::new(w.clone(), None).with_adapter(lora.clone());
        // B starts at zero: the adapted layer is the base layer.
        let y0 = adapted.forward(&x).unwrap();
        assert_eq!(max_diff(&y0, &base.forward(&x).unwrap()), 0.0);
        // With B non-zero it is the layer of the merged weight.
        lora.vars()[1]
            .set(&Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap())
            .unwrap();
        let merged = Linear::new((&w + lora.delta().unwrap()).unwrap(), None);
        let y = adapted.forward(&x).unwrap();
        assert!(max_diff(&y, &merged.forward(&x).unwrap()) < 1e-5);
        // The scale is alpha / r: delta = 2 · B A.
        let ba = lora.vars()[1].matmul(lora.vars()[0].as_tensor()).unwrap();
        assert!(max_diff(&lora.delta().unwrap(), &(ba * 2.0).unwrap()) < 1e-6);
    }

    #[test]
    fn gradients_reach_a_and_b_and_not_the_frozen_weight() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let lora = Lora::new((4, 3), 2, 2.0, 1, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let adapted = Linear::new(w.as_tensor().clone(), None).with_adapter(lora.clone());
        // At the start only B's gradient is non-zero (A's is B^T times
        // something, and B is zero).
        let grads = adapted
            .forward(&x)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = grads.backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "the base weight is frozen"
        );
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let [a, b] = lora.vars();
        assert!(norm(grads.get(b.as_tensor()).unwrap()) > 0.0);
        assert_eq!(norm(grads.get(a.as_tensor()).unwrap()), 0.0);
        b.set(&Tensor::randn(0f32, 1.0, (4, 2), &dev).unwrap())
            .unwrap();
        let grads = adapted
            .forward(&x)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = grads.backward().unwrap();
        assert!(norm(grads.get(a.as_tensor()).unwrap()) > 0.0);
        assert!(norm(grads.get(b.as_tensor()).unwrap()) > 0.0);
    }

    #[test]
    fn bad_settings_name_their_field() {
        let c = |rank, alpha, targets: &[&str]| LoraConfig {
            rank,
            alpha,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        };
        assert!(c(8, 16.0, &["q_proj", "v_proj"])
            .check(&LLAMA_TARGETS)
            .is_ok());
        assert_eq!(
            c(0, 16.0, &["q_proj"]).check(&LLAMA_TARGETS).unwrap_err().0,
            "lora_rank"
        );
        assert_eq!(
            c(8, 0.0, &["q_proj"]).check(&LLAMA_TARGETS).unwrap_err().0,
            "lora_alpha"
        );
        assert_eq!(
            c(8, 1.0, &[]).check(&LLAMA_TARGETS).unwrap_err().0,
            "lora_targets"
        );
        let err = c(8, 1.0, &["qkv"]).check(&LLAMA_TARGETS).unwrap_err();
        assert!(err.1.contains("\"qkv\""), "{}", err.1);
    }
}
