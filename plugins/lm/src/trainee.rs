//! The policy an online learner (lm.grpo, lm.ppo) trains, kept in the stage
//! from round to round with its optimizer. Round t + 1 samples from the
//! policy this stage emitted in round t, so the learner carries on with the
//! same weights and AdamW moments instead of reloading the checkpoint and
//! starting a fresh optimizer: with a handful of steps per round, a fresh
//! AdamW's first steps are close to sign descent (every weight moves by
//! about the learning rate whatever its gradient's size), which turns a
//! noisy policy gradient into a random walk. Its state (weights, moments,
//! step count) goes into the stage's snapshot.

use crate::{checkpoint_dir_in, OrStageError};
use hone_models::adamw::{AdamW, AdamWState, ParamsAdamW};
use hone_models::checkpoint::{restore_weights, weights_state, WeightsState};
use hone_models::gpt::{Gpt, GptConfig};
use hone_models::tokenizer::{load_tokenizer, Tokenizer};
use hone_models::train::vars_by_name;
use hone_models::{DType, Device, VarBuilder, VarMap};
use hone_sdk::{ArtifactRef, StageError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A policy being trained, with its optimizer.
pub(crate) struct Trainee {
    /// The artifact these weights are: the one loaded, then each one this
    /// stage emitted from them.
    pub artifact: ArtifactRef,
    pub gpt: Gpt,
    pub varmap: VarMap,
    pub tok: Box<dyn Tokenizer>,
    pub opt: AdamW,
    /// Optimizer steps taken since the weights were loaded.
    pub steps: u64,
}

/// A [`Trainee`] in a snapshot.
#[derive(Serialize, Deserialize)]
pub(crate) struct TraineeState {
    artifact: ArtifactRef,
    config: GptConfig,
    weights: WeightsState,
    opt: AdamWState,
    steps: u64,
}

/// AdamW without weight decay: with nothing to learn, the policy must stay
/// as it is.
pub(crate) fn adam(lr: f64) -> ParamsAdamW {
    ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    }
}

impl Trainee {
    /// The trainee for `policy`: `kept` when it holds exactly that artifact
    /// (the one this stage emitted last round), else `policy` loaded from
    /// its checkpoint with a fresh AdamW at `lr`.
    pub fn resume_or_load(
        kept: Option<Trainee>,
        run_dir: &Path,
        policy: &ArtifactRef,
        device: &Device,
        lr: f64,
    ) -> Result<Trainee, StageError> {
        if let Some(t) = kept.filter(|t| t.artifact == *policy) {
            return Ok(t);
        }
        let dir = checkpoint_dir_in(run_dir, policy);
        let doing = format!("cannot load policy {} from {}", policy.id, dir.display());
        let (gpt, varmap, tok) = crate::load_gpt_policy(&dir, device, &doing)?;
        let opt =
            AdamW::new(vars_by_name(&varmap), adam(lr)).or_stage("cannot create the optimiser")?;
        Ok(Trainee {
            artifact: policy.clone(),
            gpt,
            varmap,
            tok,
            opt,
            steps: 0,
        })
    }

    /// Weights, optimizer state and step count, for a snapshot.
    pub fn state(&self) -> Result<TraineeState, StageError> {
        let doing = "cannot snapshot the policy";
        Ok(TraineeState {
            artifact: self.artifact.clone(),
            config: self.gpt.config().clone(),
            weights: weights_state(&self.varmap).or_stage(doing)?,
            opt: self.opt.state().or_stage(doing)?,
            steps: self.steps,
        })
    }

    /// The trainee a snapshot held; its tokenizer comes from its artifact's
    /// checkpoint directory under `run_dir`.
    pub fn from_state(
        state: TraineeState,
        run_dir: &Path,
        device: &Device,
        lr: f64,
    ) -> Result<Trainee, StageError> {
        let doing = format!(
            "cannot restore policy {} from the snapshot",
            state.artifact.id
        );
        let varmap = VarMap::new();
        let gpt = Gpt::new(
            &state.config,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )
        .or_stage(&doing)?;
        restore_weights(&varmap, &state.weights).or_stage(&doing)?;
        let mut opt = AdamW::new(vars_by_name(&varmap), adam(lr)).or_stage(&doing)?;
        opt.restore(&state.opt).or_stage(&doing)?;
        let tok = load_tokenizer(&checkpoint_dir_in(run_dir, &state.artifact)).or_stage(&doing)?;
        Ok(Trainee {
            artifact: state.artifact,
            gpt,
            varmap,
            tok,
            opt,
            steps: state.steps,
        })
    }
}
