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

use crate::trainee::adam;
use crate::tuned_llama::Tuned;
use crate::{checkpoint_dir_in, OrStageError};
use hone_models::adamw::{AdamW, AdamWState};
use hone_models::Device;
use hone_pretrained::smollm::ChatLlama;
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
}

/// A [`ChatTrainee`] in a snapshot: its weights are its artifact's.
#[derive(Serialize, Deserialize)]
pub(crate) struct ChatTraineeState {
    artifact: ArtifactRef,
    opt: AdamWState,
    steps: u64,
}

impl ChatTrainee {
    /// The SmolLM2 policy `policy` (a checkpoint under `run_dir`), or the
    /// pretrained model `pretrained` when `policy` is `None`, with its top
    /// `train_layers` layers trainable and a fresh AdamW at `lr`.
    pub fn load(
        run_dir: &Path,
        policy: Option<&ArtifactRef>,
        pretrained: &str,
        train_layers: usize,
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
        Self::train(chat, policy.cloned(), train_layers, lr)
    }

    fn train(
        chat: ChatLlama,
        artifact: Option<ArtifactRef>,
        train_layers: usize,
        lr: f64,
    ) -> Result<ChatTrainee, StageError> {
        // Sequences are teacher-forced uncut, as lm.rollout sampled them:
        // the model's whole context.
        let context = chat.model.config().max_position_embeddings;
        let tuned = Tuned::new(chat, train_layers, context, None, 0)?;
        let opt =
            AdamW::new(tuned.trainable(), adam(lr)).or_stage("cannot create the optimiser")?;
        Ok(ChatTrainee {
            artifact,
            tuned: Box::new(tuned),
            opt,
            steps: 0,
        })
    }

    /// Optimizer state, step count and the artifact the weights are.
    pub fn state(&self) -> Result<ChatTraineeState, StageError> {
        let Some(artifact) = self.artifact.clone() else {
            return Err(StageError::new(
                "cannot snapshot the policy: it is the pretrained model, not yet an artifact",
            ));
        };
        Ok(ChatTraineeState {
            artifact,
            opt: self.opt.state().or_stage("cannot snapshot the policy")?,
            steps: self.steps,
        })
    }

    /// The trainee a snapshot held: its artifact's checkpoint under
    /// `run_dir`, the optimizer put back.
    pub fn from_state(
        state: ChatTraineeState,
        run_dir: &Path,
        train_layers: usize,
        device: &Device,
        lr: f64,
    ) -> Result<ChatTrainee, StageError> {
        let doing = format!(
            "cannot restore policy {} from the snapshot",
            state.artifact.id
        );
        let mut t = Self::load(run_dir, Some(&state.artifact), "", train_layers, device, lr)?;
        t.opt.restore(&state.opt).or_stage(&doing)?;
        t.steps = state.steps;
        Ok(t)
    }
}
