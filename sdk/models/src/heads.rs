//! Heads on a [`Gpt`] backbone: a scalar reward model, a per-token value
//! head, and PPO's critic (a trunk with a value head).

use crate::gpt::{linear, Gpt, GptConfig};
use crate::linear::Linear;
use crate::sample::Rng;
use crate::{Error, Result, Tensor, VarBuilder};
use candle_core::{Module, D};

/// Scalar reward from the hidden state at each sequence's last non-padding
/// token. Variables: the backbone's at the root, the head under
/// `reward_head`. The backbone's `lm_head.weight` is unused by [`score`]
/// and gets no gradient (it keeps a checkpoint loadable as a plain [`Gpt`]).
///
/// [`score`]: RewardModel::score
pub struct RewardModel {
    /// The transformer whose final hidden states are scored.
    pub backbone: Gpt,
    head: Linear,
}

impl RewardModel {
    /// Builds the backbone at `vb`'s root and the head under `reward_head`.
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            backbone: Gpt::new(cfg, vb.clone())?,
            head: linear(cfg.d_model, 1, true, vb.pp("reward_head"))?,
        })
    }

    /// Rewards [B] of right-padded ids [B,T], where sequence b has
    /// `lengths[b]` real tokens (1..=T). For inference: no dropout.
    pub fn score(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let last = self.last_hidden(ids, lengths)?;
        Ok(self.head.forward(&last)?.squeeze(D::Minus1)?)
    }

    /// [`RewardModel::score`] for training: applies dropout with probability
    /// `dropout` (in [0, 1); 0 = none) to the last hidden state before the
    /// head. The dropout mask comes from candle's RNG, which is not seeded.
    pub fn score_train(&self, ids: &Tensor, lengths: &[usize], dropout: f32) -> Result<Tensor> {
        let mut last = self.last_hidden(ids, lengths)?;
        if dropout > 0.0 {
            last = candle_nn::ops::dropout(&last, dropout)?;
        }
        Ok(self.head.forward(&last)?.squeeze(D::Minus1)?)
    }

    /// [`RewardModel::score_train`] with a reproducible dropout mask drawn
    /// from a [`Rng`] seeded with `seed` (candle's CPU RNG cannot be seeded).
    pub fn score_train_seeded(
        &self,
        ids: &Tensor,
        lengths: &[usize],
        dropout: f32,
        seed: u64,
    ) -> Result<Tensor> {
        let mut last = self.last_hidden(ids, lengths)?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Invalid(format!(
                "dropout probability must be in [0, 1), got {dropout}"
            )));
        }
        if dropout > 0.0 {
            let mut rng = Rng::new(seed);
            let keep = 1.0 / (1.0 - dropout);
            let mask: Vec<f32> = (0..last.elem_count())
                .map(|_| {
                    if rng.next_f64() < f64::from(dropout) {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect();
            let mask =
                Tensor::from_vec(mask, last.shape(), last.device())?.to_dtype(last.dtype())?;
            last = (last * mask)?;
        }
        Ok(self.head.forward(&last)?.squeeze(D::Minus1)?)
    }

    /// Hidden states [B,D] at each sequence's last real token.
    fn last_hidden(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if lengths.len() != b {
            return Err(Error::Invalid(format!(
                "score: {} lengths for a batch of {b}",
                lengths.len()
            )));
        }
        let rows = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                if len == 0 || len > t {
                    Err(Error::Invalid(format!(
                        "score: length {len} of sequence {i} is outside 1..={t}"
                    )))
                } else {
                    Ok((i * t + len - 1) as u32)
                }
            })
            .collect::<Result<Vec<u32>>>()?;
        let hidden = self.backbone.hidden(ids)?;
        let d = hidden.dim(2)?;
        let rows = Tensor::from_vec(rows, b, ids.device())?;
        Ok(hidden.reshape((b * t, d))?.index_select(&rows, 0)?)
    }
}

/// Per-token value estimates for PPO. Variables `weight` and `bias` at
/// `vb`'s root.
pub struct ValueHead {
    head: Linear,
}

impl ValueHead {
    /// A linear map from `d_model` to one value.
    pub fn new(d_model: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            head: linear(d_model, 1, true, vb)?,
        })
    }

    /// Values [B,T] of hidden states [B,T,D].
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(hidden)?.squeeze(D::Minus1)?)
    }
}

/// PPO's critic: a transformer of the policy's shape with a [`ValueHead`]
/// on its final hidden states, one value per position. A separate model
/// rather than a head on the policy (OpenRLHF's and TRL's choice too): the
/// value loss cannot pull the policy's features, the policy checkpoint
/// stays a plain [`Gpt`], and the critic can start from the policy's
/// weights. Variables: the trunk's at the root (`lm_head.weight` unused,
/// see [`Critic::trainable`]), the head under `value_head`.
pub struct Critic {
    /// The transformer whose hidden states are valued.
    pub trunk: Gpt,
    head: ValueHead,
}

impl Critic {
    /// Builds the trunk at `vb`'s root and the head under `value_head`.
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            trunk: Gpt::new(cfg, vb.clone())?,
            head: ValueHead::new(cfg.d_model, vb.pp("value_head"))?,
        })
    }

    /// Values [B,T] of ids [B,T]: at position t, the value of the state
    /// after token t, i.e. before the token that position predicts.
    pub fn values(&self, ids: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.trunk.hidden(ids)?)
    }

    /// The variables the value loss trains: all but the trunk's unused LM
    /// head (it would get no gradient, and AdamW's weight decay would
    /// shrink it for nothing).
    pub fn trainable(varmap: &crate::VarMap) -> Vec<crate::Var> {
        let lm_head = varmap
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .get("lm_head.weight")
            .cloned();
        crate::train::vars_by_name(varmap)
            .into_iter()
            .filter(|v| lm_head.as_ref().is_none_or(|h| h.id() != v.id()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::init_seeded;
    use crate::gpt::tests::ids;
    use crate::{DType, Device, VarMap};

    fn reward_model() -> (RewardModel, VarMap) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let rm = RewardModel::new(&GptConfig::tiny(259), vb).unwrap();
        init_seeded(&varmap, 5).unwrap();
        (rm, varmap)
    }

    #[test]
    fn every_reward_model_parameter_gets_a_gradient() {
        let (rm, varmap) = reward_model();
        let x = ids(&[&[1, 2, 3, 4], &[5, 6, 258, 258]]);
        let scores = rm.score(&x, &[4, 2]).unwrap();
        assert_eq!(scores.dims(), &[2]);
        // A Bradley-Terry loss plus the usual centring term (the margin
        // alone cancels the head's bias).
        let margin = (scores.get(0).unwrap() - scores.get(1).unwrap()).unwrap();
        let bt = candle_nn::ops::sigmoid(&margin)
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap();
        let centring = (scores.sum_all().unwrap().sqr().unwrap() * 0.01).unwrap();
        let loss = (bt + centring).unwrap();
        let grads = loss.backward().unwrap();
        {
            let data = varmap.data().lock().unwrap();
            assert!(data.contains_key("reward_head.weight"));
            assert!(data.contains_key("wte.weight"));
        }
        // The unused LM head is the one variable without a gradient.
        assert_eq!(
            crate::train::vars_without_gradient(&varmap, &grads).unwrap(),
            ["lm_head.weight"]
        );
    }

    #[test]
    fn score_train_with_dropout_trains_every_parameter_and_without_equals_score() {
        let (rm, varmap) = reward_model();
        let x = ids(&[&[1, 2, 3, 4], &[5, 6, 258, 258]]);
        let plain: Vec<f32> = rm.score(&x, &[4, 2]).unwrap().to_vec1().unwrap();
        let same: Vec<f32> = rm.score_train(&x, &[4, 2], 0.0).unwrap().to_vec1().unwrap();
        assert_eq!(plain, same);
        let scores = rm.score_train(&x, &[4, 2], 0.1).unwrap();
        assert_eq!(scores.dims(), &[2]);
        let margin = (scores.get(0).unwrap() - scores.get(1).unwrap()).unwrap();
        let loss = (candle_nn::ops::sigmoid(&margin)
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap()
            + (scores.sum_all().unwrap().sqr().unwrap() * 0.01).unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter().filter(|(n, _)| n.as_str() != "lm_head.weight") {
            assert!(grads.get(var).is_some(), "no gradient for {name}");
        }
        assert!(rm.score_train(&x, &[4, 2], 1.0).is_err());
        // The seeded variant: the same seed, the same mask.
        let a: Vec<f32> = rm
            .score_train_seeded(&x, &[4, 2], 0.5, 9)
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = rm
            .score_train_seeded(&x, &[4, 2], 0.5, 9)
            .unwrap()
            .to_vec1()
            .unwrap();
        let c: Vec<f32> = rm
            .score_train_seeded(&x, &[4, 2], 0.0, 9)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(c, plain);
        assert_ne!(a, plain);
        assert!(rm.score_train_seeded(&x, &[4, 2], 1.0, 9).is_err());
    }

    #[test]
    fn score_ignores_padding_after_length() {
        let (rm, _) = reward_model();
        let a = rm.score(&ids(&[&[5, 6, 258, 258]]), &[2]).unwrap();
        let b = rm.score(&ids(&[&[5, 6, 1, 2]]), &[2]).unwrap();
        let c = rm.score(&ids(&[&[5, 6, 1, 2]]), &[4]).unwrap();
        let (a, b, c) = (
            a.to_vec1::<f32>().unwrap()[0],
            b.to_vec1::<f32>().unwrap()[0],
            c.to_vec1::<f32>().unwrap()[0],
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        assert!((a - c).abs() > 1e-7);
        assert!(rm.score(&ids(&[&[5, 6]]), &[3]).is_err());
    }

    #[test]
    fn every_critic_parameter_but_the_lm_head_gets_a_gradient() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let critic = Critic::new(&GptConfig::tiny(259), vb).unwrap();
        init_seeded(&varmap, 3).unwrap();
        let values = critic.values(&ids(&[&[1, 2, 3], &[4, 5, 6]])).unwrap();
        assert_eq!(values.dims(), &[2, 3]);
        let target = Tensor::new(&[[1f32, 0.0, 2.0], [0.5, 0.5, 0.5]], &Device::Cpu).unwrap();
        let loss = (values - target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(
            crate::train::vars_without_gradient(&varmap, &grads).unwrap(),
            ["lm_head.weight"]
        );
        let trainable = Critic::trainable(&varmap);
        assert_eq!(trainable.len(), varmap.all_vars().len() - 1);
        assert!(trainable.iter().all(|v| grads.get(v).is_some()));
    }

    #[test]
    fn value_head_shape_and_gradient() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let head = ValueHead::new(8, vb.pp("value_head")).unwrap();
        let hidden = Tensor::randn(0f32, 1.0, (2, 3, 8), &Device::Cpu).unwrap();
        let values = head.forward(&hidden).unwrap();
        assert_eq!(values.dims(), &[2, 3]);
        let grads = values.sum_all().unwrap().backward().unwrap();
        for var in varmap.all_vars() {
            assert!(grads.get(&var).is_some());
        }
    }
}
