//! lm.ppo's critic, kept across rounds with its optimizer: for hone's GPT a
//! whole model of the policy's shape with a value head
//! (`hone_models::heads::Critic`); for a SmolLM2 policy, copies of the
//! policy's trained top layers with a value head, on the residual stream of
//! its frozen layers (`hone_pretrained::llama::critic`: the frozen layers
//! are the same for both, so the policy's cached states serve the critic).
//! Either starts from the policy's weights the first time.

use crate::sft::data::{to_tensors, Example};
use crate::trainee::{adam, Learner};
use crate::OrStageError;
use hone_models::adamw::{AdamW, AdamWState};
use hone_models::checkpoint::{self, restore_weights, weights_state, WeightsState};
use hone_models::gpt::{init_seeded, GptConfig};
use hone_models::heads::Critic;
use hone_models::train::vars_by_name;
use hone_models::{DType, Device, Tensor, Var, VarBuilder, VarMap};
use hone_pretrained::llama::critic::{CriticConfig, LlamaCritic};
use hone_sdk::StageError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The critic's model and weights.
enum Model {
    Gpt(Critic, GptConfig),
    Chat(LlamaCritic),
}

/// The critic, its variables and its optimizer.
pub(super) struct PpoCritic {
    model: Model,
    varmap: VarMap,
    pub opt: AdamW,
}

/// The critic in a snapshot: its shape, weights and optimizer state.
#[derive(Serialize, Deserialize)]
pub(super) enum CriticSnapshot {
    Gpt {
        config: GptConfig,
        weights: WeightsState,
        opt: AdamWState,
    },
    Chat {
        config: CriticConfig,
        weights: WeightsState,
        opt: AdamWState,
    },
}

impl PpoCritic {
    /// A critic started from `learner`'s weights (its value head seeded by
    /// `seed`), with a fresh AdamW at `lr`.
    pub fn for_learner(
        learner: &Learner,
        device: &Device,
        lr: f64,
        seed: u64,
    ) -> Result<Self, StageError> {
        let doing = "cannot build the critic";
        let (model, varmap) = match learner {
            Learner::Gpt(t) => {
                let config = t.gpt.config().clone();
                let varmap = VarMap::new();
                let critic = Critic::new(
                    &config,
                    VarBuilder::from_varmap(&varmap, DType::F32, device),
                )
                .or_stage(doing)?;
                init_seeded(&varmap, seed).or_stage(doing)?;
                let from = t.varmap.data().lock().expect("VarMap lock poisoned");
                let to = varmap.data().lock().expect("VarMap lock poisoned");
                for (name, var) in from.iter() {
                    if let Some(target) = to.get(name) {
                        target.set(var.as_tensor()).or_stage(doing)?;
                    }
                }
                drop(to);
                (Model::Gpt(critic, config), varmap)
            }
            Learner::Chat(t) => {
                let chat = &t.tuned.chat;
                let (critic, varmap) =
                    LlamaCritic::from_policy(&chat.model, &chat.vars, t.tuned.frozen(), seed)
                        .or_stage(doing)?;
                (Model::Chat(critic), varmap)
            }
        };
        Self::with_optimizer(model, varmap, lr)
    }

    fn with_optimizer(model: Model, varmap: VarMap, lr: f64) -> Result<Self, StageError> {
        let vars = match &model {
            Model::Gpt(..) => Critic::trainable(&varmap),
            Model::Chat(_) => vars_by_name(&varmap),
        };
        let opt = AdamW::new(vars, adam(lr)).or_stage("cannot create the critic's optimiser")?;
        Ok(PpoCritic { model, varmap, opt })
    }

    /// An error unless this critic values `learner`'s states: the same kind
    /// of model, of the same shape, and for SmolLM2 on the same frozen layers.
    pub fn check_fits(&self, learner: &Learner) -> Result<(), StageError> {
        let fits = match (&self.model, learner) {
            (Model::Gpt(_, config), Learner::Gpt(t)) => config == t.gpt.config(),
            (Model::Chat(c), Learner::Chat(t)) => {
                c.config().llama == *t.tuned.chat.model.config()
                    && c.config().first_layer == t.tuned.frozen()
            }
            _ => false,
        };
        if fits {
            return Ok(());
        }
        Err(StageError::new(
            "the policy's shape (or train_layers) changed between rounds; lm.ppo's critic was built \
             for the first policy: wire `policy` to one lineage (lm.sft, then this stage's feedback) \
             and keep train_layers",
        ))
    }

    /// The values [B, T] of the examples' states (position t: after token
    /// t), differentiable in the critic's weights. For SmolLM2 the input
    /// is the learner's cached frozen-layer states.
    pub fn values(
        &self,
        learner: &Learner,
        examples: &[Example],
        device: &Device,
    ) -> hone_models::Result<Tensor> {
        match (&self.model, learner) {
            (Model::Gpt(critic, _), Learner::Gpt(t)) => {
                let (x, _, _) = to_tensors(examples, t.tok.pad_id(), device)?;
                critic.values(&x)
            }
            (Model::Chat(critic), Learner::Chat(t)) => {
                let refs: Vec<&Example> = examples.iter().collect();
                let x = t.tuned.prefix_batch(&refs, device)?;
                critic
                    .values(&x)
                    .map_err(|e| hone_models::Error::Invalid(e.to_string()))
            }
            _ => Err(hone_models::Error::Invalid(
                "the critic is of another kind of model than the policy".into(),
            )),
        }
    }

    /// All the critic's variables (an unused LM head's included).
    #[cfg(test)]
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The variables the value loss trains.
    pub fn vars(&self) -> Vec<Var> {
        match &self.model {
            Model::Gpt(..) => Critic::trainable(&self.varmap),
            Model::Chat(_) => vars_by_name(&self.varmap),
        }
    }

    /// Shape, weights and optimizer state, for a snapshot.
    pub fn state(&self) -> hone_models::Result<CriticSnapshot> {
        let (weights, opt) = (weights_state(&self.varmap)?, self.opt.state()?);
        Ok(match &self.model {
            Model::Gpt(_, config) => CriticSnapshot::Gpt {
                config: config.clone(),
                weights,
                opt,
            },
            Model::Chat(c) => CriticSnapshot::Chat {
                config: c.config().clone(),
                weights,
                opt,
            },
        })
    }

    /// The critic a snapshot held.
    pub fn from_state(s: &CriticSnapshot, device: &Device, lr: f64) -> Result<Self, StageError> {
        let doing = "cannot restore the critic from the snapshot";
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let (model, weights, opt) = match s {
            CriticSnapshot::Gpt {
                config,
                weights,
                opt,
            } => (
                Model::Gpt(Critic::new(config, vb).or_stage(doing)?, config.clone()),
                weights,
                opt,
            ),
            CriticSnapshot::Chat {
                config,
                weights,
                opt,
            } => (
                Model::Chat(LlamaCritic::new(config, vb).or_stage(doing)?),
                weights,
                opt,
            ),
        };
        restore_weights(&varmap, weights).or_stage(doing)?;
        let mut critic = Self::with_optimizer(model, varmap, lr)?;
        critic.opt.restore(opt).or_stage(doing)?;
        Ok(critic)
    }

    /// Writes the critic as a checkpoint in `dir` (its weights, its shape,
    /// the policy's tokenizer).
    pub fn save(&self, dir: &Path, learner: &Learner) -> Result<(), StageError> {
        let doing = format!("cannot write the critic {}", dir.display());
        match (&self.model, learner) {
            (Model::Gpt(_, config), Learner::Gpt(t)) => {
                checkpoint::save(dir, &self.varmap, config, t.tok.as_ref()).or_stage(&doing)?;
            }
            (Model::Chat(c), Learner::Chat(t)) => {
                let chat = &t.tuned.chat;
                let eos = chat.stop_tokens[0];
                let tok = hone_pretrained::HfTokenizer::new(chat.tokenizer.clone(), eos, eos, eos);
                checkpoint::save(dir, &self.varmap, c.config(), &tok).or_stage(&doing)?;
            }
            _ => {
                return Err(StageError::new(format!(
                    "{doing}: the policy is of another kind"
                )))
            }
        }
        Ok(())
    }
}
