//! PPO's critic for a partly fine-tuned Llama policy: its own copies of the
//! policy's top layers and final norm, with a value head, on the residual
//! stream the policy's frozen layers produce.
//!
//! A separate critic, as [`hone_models::heads::Critic`] is for hone's GPT
//! (the value loss cannot pull the policy's features; the policy stays a
//! plain checkpoint), but not a second whole model: the layers below the
//! first trained one never train in either, so they are the same function
//! for both and their output, which the policy's trainer caches per
//! sequence, is the critic's input too. The critic then costs its top
//! layers only (four of SmolLM2's thirty: 14 M weights), not another 135 M.

use super::{causal_mask, Layer, Llama, LlamaConfig, RmsNorm, Rotary};
use crate::{Error, Result};
use candle_core::{Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use hone_models::heads::ValueHead;

/// The shape of a [`LlamaCritic`]: the policy's, and the first layer it
/// has its own copy of.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriticConfig {
    /// The policy's shape.
    pub llama: LlamaConfig,
    /// The critic's layers are `first_layer..num_hidden_layers`; its input is
    /// the residual stream after the policy's first `first_layer` layers.
    pub first_layer: usize,
}

/// Values of the states of a sequence, from the residual stream after the
/// policy's frozen layers. Variables under the Llama's own names
/// (`model.layers.I.…`, `model.norm.weight`) and `value_head.weight`,
/// `value_head.bias`.
pub struct LlamaCritic {
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: ValueHead,
    rotary: Rotary,
    config: CriticConfig,
    device: Device,
}

impl LlamaCritic {
    /// Builds the critic from `vb` (variables it lacks are created, as a
    /// `VarMap` does: set them before use).
    pub fn new(config: &CriticConfig, vb: VarBuilder) -> Result<Self> {
        let c = &config.llama;
        if config.first_layer >= c.num_hidden_layers {
            return Err(Error::Input(format!(
                "a critic from layer {} of a model of {} layers has no layer to train",
                config.first_layer, c.num_hidden_layers
            )));
        }
        let layers = (config.first_layer..c.num_hidden_layers)
            .map(|i| Layer::new(c, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb.pp("model.norm"))?,
            head: ValueHead::new(c.hidden_size, vb.pp("value_head"))?,
            rotary: Rotary::new(c, vb.device())?,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    /// A critic started from `policy` (its weights `vars`): copies of its
    /// layers from `first_layer` up and of its final norm, and a value head
    /// whose weight is normal(0, 1 / hidden_size) from `seed`, its bias 0
    /// (so the first values are small and every weight below the head gets
    /// a gradient from the first step). Returns the critic's own variables.
    pub fn from_policy(
        policy: &Llama,
        vars: &VarMap,
        first_layer: usize,
        seed: u64,
    ) -> Result<(Self, VarMap)> {
        let config = CriticConfig {
            llama: policy.config().clone(),
            first_layer,
        };
        let varmap = VarMap::new();
        {
            let from = vars.data().lock().expect("VarMap lock");
            let mut to = varmap.data().lock().expect("VarMap lock");
            for (name, var) in from.iter() {
                if Llama::in_top(name, first_layer) {
                    // A copy: the critic trains its own.
                    to.insert(name.clone(), Var::from_tensor(&var.as_tensor().copy()?)?);
                }
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, policy.device());
        let critic = Self::new(&config, vb)?;
        {
            let data = varmap.data().lock().expect("VarMap lock");
            let h = config.llama.hidden_size;
            let mut rng = hone_models::sample::Rng::new(seed);
            let std = 1.0 / (h as f64).sqrt();
            let w: Vec<f32> = (0..h).map(|_| (rng.next_normal() * std) as f32).collect();
            data["value_head.weight"].set(&Tensor::from_vec(w, (1, h), policy.device())?)?;
            data["value_head.bias"].set(&data["value_head.bias"].zeros_like()?)?;
        }
        Ok((critic, varmap))
    }

    /// The critic's shape.
    pub fn config(&self) -> &CriticConfig {
        &self.config
    }

    /// Values [B, T] of the residual stream `x` [B, T, hidden] after the
    /// policy's first `first_layer` layers ([`Llama::residual_after`]): at
    /// position t, the value of the state after token t. Attention is
    /// causal, so right padding leaves the earlier positions alone.
    pub fn values(&self, x: &Tensor) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let mask = causal_mask(t, &self.device)?;
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, &self.rotary, &mask)?;
        }
        Ok(self.head.forward(&self.norm.forward(&x)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::tiny_llama;

    /// Started from the policy, the critic's trunk computes exactly the
    /// policy's final hidden states (the head is a linear map of them), and
    /// every one of its weights gets a gradient from a value loss.
    #[test]
    fn a_critic_from_the_policy_values_its_hidden_states_and_trains_every_weight() {
        let (model, vars) = tiny_llama();
        let layers = model.config().num_hidden_layers;
        let first = layers - 1;
        let (critic, critic_vars) = LlamaCritic::from_policy(&model, &vars, first, 3).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 2], [4, 4, 7, 3]], &Device::Cpu).unwrap();
        let x = model.residual_after(&ids, first).unwrap();
        let values = critic.values(&x).unwrap();
        assert_eq!(values.dims(), &[2, 4]);
        // The head by hand on the policy's own hidden states.
        let hidden = model.hidden_from(&x, first).unwrap();
        let data = critic_vars.data().lock().unwrap();
        let w = data["value_head.weight"].as_tensor().clone();
        let by_hand = hidden
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .squeeze(2)
            .unwrap();
        let gap = (values.clone() - by_hand)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gap < 1e-5, "critic and policy disagree by {gap}");
        drop(data);
        let loss = (values - 1.0).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let all = critic_vars.all_vars();
        // One layer's nine weights, the final norm and the head's two.
        assert_eq!(all.len(), 12);
        for v in all {
            let g = grads.get(&v).expect("a critic weight without a gradient");
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "a zero gradient for a {:?} weight", v.dims());
        }
        // The policy's weights are not the critic's: nothing flowed to them.
        for v in vars.all_vars() {
            assert!(
                grads.get(&v).is_none(),
                "the critic's loss reached the policy"
            );
        }
        // A critic with no layer of its own is refused.
        let config = CriticConfig {
            llama: model.config().clone(),
            first_layer: layers,
        };
        let vb = VarBuilder::from_varmap(&VarMap::new(), candle_core::DType::F32, &Device::Cpu);
        let err = LlamaCritic::new(&config, vb).err().unwrap();
        assert!(err.to_string().contains("no layer to train"), "{err}");
    }
}
