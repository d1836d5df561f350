//! A SmolLM2 policy an online learner (lm.grpo) trains, kept from round to
//! round with its optimizer, as [`crate::trainee::Trainee`] keeps hone's
//! GPT (its module note says why the AdamW moments must carry over).
//!
//! The top `train_layers` layers and the final norm train (`Tuned`); the
//! frozen layers' states are cached per sequence for the round's epochs and
//! forgotten at its end.
//!
//! Its snapshot holds the artifact its weights are, not the weights: after
//! every round the trainee's weights are exactly the checkpoint it emitted
//! (a round that fails drops the trainee), so the 540 MB of a SmolLM2 need
//! not be copied into every round's snapshot. The optimizer moments of the
//! trained layers are there (113 MB for the top four).
//!
//! With LoRA the adapters sit on the model the trainee was first loaded
//! from (its `base`) and keep training across rounds; each emitted
//! checkpoint holds the merged weights. Loading that checkpoint and adding
//! the adapters again would count the update twice, and starting fresh
//! adapters on it would lose the trained ones (a resumed run would not
//! take the steps the straight one took), so the snapshot holds the base
//! and the adapters themselves (a few MB) instead.

use crate::trainee::adam;
use crate::tuned_llama::Tuned;
use crate::{checkpoint_dir_in, OrStageError};
use hone_models::adamw::{AdamW, AdamWState};
use hone_models::checkpoint::{restore_weights, weights_state, WeightsState};
use hone_models::lora::LoraConfig;
use hone_models::{Device, VarMap};
use hone_sdk::{ArtifactRef, StageError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A SmolLM2 policy being trained, with its optimizer.
pub(crate) struct ChatTrainee {
    /// The artifact these weights are; `None` for the pretrained model, before
    /// the first round's update.
    pub artifact: Option<ArtifactRef>,
    pub tuned: Box<Tuned>,
    pub opt: AdamW,
    /// Optimizer steps taken since the weights were loaded.
    pub steps: u64,
    /// With LoRA: the model the adapters sit on (`None`: the pretrained
    /// one); `None` without LoRA.
    lora_base: Option<Option<ArtifactRef>>,
    /// With LoRA: its alpha, for the snapshot.
    lora_alpha: f64,
}

/// A [`ChatTrainee`] in a snapshot: its weights are its artifact's.
#[derive(Serialize, Deserialize)]
pub(crate) struct ChatTraineeState {
    artifact: ArtifactRef,
    opt: AdamWState,
    steps: u64,
    /// With LoRA: the base the adapters sit on, and the adapters.
    lora: Option<LoraState>,
}

/// A LoRA trainee's adapters in a snapshot, and the model under them.
#[derive(Serialize, Deserialize)]
struct LoraState {
    base: Option<ArtifactRef>,
    adapters: WeightsState,
    /// The update's scale is alpha / rank: adapters trained under one alpha
    /// mean another update under another (the rank and the targets show in
    /// the adapters' shapes and names).
    alpha: f64,
}

impl ChatTrainee {
    /// The SmolLM2 policy `policy` (a checkpoint under `run_dir`), or the
    /// pretrained model `pretrained` when `policy` is `None`, with its top
    /// `train_layers` layers trainable (or, with `lora`, adapters on them,
    /// drawn from `seed`) and a fresh AdamW at `lr`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        run_dir: &Path,
        policy: Option<&ArtifactRef>,
        pretrained: &str,
        train_layers: usize,
        lora: Option<&LoraConfig>,
        seed: u64,
        device: &Device,
        lr: f64,
    ) -> Result<ChatTrainee, StageError> {
        let doing = match policy {
            Some(a) => format!(
                "cannot load policy {} from {}",
                a.id,
                checkpoint_dir_in(run_dir, a).display()
            ),
            None => format!("cannot load {pretrained}"),
        };
        let chat = crate::load_chat(run_dir, policy, pretrained, device, &doing)?;
        // Sequences are teacher-forced uncut, as lm.rollout sampled them:
        // the model's whole context.
        let context = chat.model.config().max_position_embeddings;
        let tuned = Tuned::new(chat, train_layers, context, lora, seed)?;
        let opt =
            AdamW::new(tuned.trainable(), adam(lr)).or_stage("cannot create the optimiser")?;
        Ok(ChatTrainee {
            artifact: policy.cloned(),
            tuned: Box::new(tuned),
            opt,
            steps: 0,
            lora_base: lora.map(|_| policy.cloned()),
            lora_alpha: lora.map_or(0.0, |l| l.alpha),
        })
    }

    /// The adapters as a VarMap (the same variables), for their snapshot.
    fn adapters(&self) -> VarMap {
        let map = VarMap::new();
        {
            let mut data = map.data().lock().expect("VarMap lock poisoned");
            for (name, var) in self.tuned.adapters() {
                data.insert(name.clone(), var.clone());
            }
        }
        map
    }

    /// Optimizer state, step count and the artifact the weights are.
    pub fn state(&self) -> Result<ChatTraineeState, StageError> {
        let Some(artifact) = self.artifact.clone() else {
            return Err(StageError::new(
                "cannot snapshot the policy: it is the pretrained model, not yet an artifact",
            ));
        };
        let doing = "cannot snapshot the policy";
        let lora = match &self.lora_base {
            None => None,
            Some(base) => Some(LoraState {
                base: base.clone(),
                adapters: weights_state(&self.adapters()).or_stage(doing)?,
                alpha: self.lora_alpha,
            }),
        };
        Ok(ChatTraineeState {
            artifact,
            opt: self.opt.state().or_stage(doing)?,
            steps: self.steps,
            lora,
        })
    }

    /// The trainee a snapshot held: its artifact's checkpoint under
    /// `run_dir` (with LoRA: its base, `pretrained` when that is `None`, and
    /// the adapters on it), the optimizer put back.
    pub fn from_state(
        state: ChatTraineeState,
        spec: &crate::trainee::LearnerSpec,
    ) -> Result<ChatTrainee, StageError> {
        let doing = format!(
            "cannot restore policy {} from the snapshot",
            state.artifact.id
        );
        let (run_dir, layers) = (spec.run_dir, spec.train_layers);
        let (device, lr) = (spec.device, spec.lr);
        let mut t =
            match (&state.lora, spec.lora) {
                (None, None) => Self::load(
                    run_dir,
                    Some(&state.artifact),
                    "",
                    layers,
                    None,
                    0,
                    device,
                    lr,
                )?,
                (Some(l), Some(cfg)) => {
                    if l.alpha != cfg.alpha {
                        return Err(StageError::config(
                            "lora_alpha",
                            format!(
                            "{doing}: its adapters were trained with lora_alpha {}, and the stage \
                             now has {}; keep lora_alpha as it was to resume",
                            l.alpha, cfg.alpha
                        ),
                        ));
                    }
                    let base = l.base.as_ref();
                    let mut t = Self::load(
                        run_dir,
                        base,
                        spec.pretrained,
                        layers,
                        Some(cfg),
                        spec.seed,
                        device,
                        lr,
                    )?;
                    restore_weights(&t.adapters(), &l.adapters).or_stage(&doing)?;
                    t.artifact = Some(state.artifact.clone());
                    t
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(StageError::config(
                        "lora_rank",
                        format!(
                        "{doing}: it was trained {} LoRA adapters and the stage now asks {}; keep \
                         lora_rank as it was to resume",
                        if state.lora.is_some() { "with" } else { "without" },
                        if spec.lora.is_some() { "for them" } else { "for none" }
                    ),
                    ));
                }
            };
        t.opt.restore(&state.opt).or_stage(&doing)?;
        t.steps = state.steps;
        Ok(t)
    }
}
