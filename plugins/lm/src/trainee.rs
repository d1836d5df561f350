//! The policy an online learner (lm.grpo, lm.ppo) trains, kept in the stage
//! from round to round with its optimizer. Round t + 1 samples from the
//! policy this stage emitted in round t, so the learner carries on with the
//! same weights and AdamW moments instead of reloading the checkpoint and
//! starting a fresh optimizer: with a handful of steps per round, a fresh
//! AdamW's first steps are close to sign descent (every weight moves by
//! about the learning rate whatever its gradient's size), which turns a
//! noisy policy gradient into a random walk.

use crate::{checkpoint_dir, OrStageError};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use hone_models::checkpoint;
use hone_models::gpt::Gpt;
use hone_models::tokenizer::{load_tokenizer, Tokenizer};
use hone_models::{Device, VarMap};
use hone_sdk::{ArtifactRef, Context, StageError};

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

impl Trainee {
    /// The trainee for `policy`: `kept` when it holds exactly that artifact
    /// (the one this stage emitted last round), else `policy` loaded from
    /// its checkpoint with a fresh AdamW at `lr` (no weight decay: with
    /// nothing to learn, the policy must stay as it is).
    pub fn resume_or_load(
        kept: Option<Trainee>,
        ctx: &Context,
        policy: &ArtifactRef,
        device: &Device,
        lr: f64,
    ) -> Result<Trainee, StageError> {
        if let Some(t) = kept.filter(|t| t.artifact == *policy) {
            return Ok(t);
        }
        let dir = checkpoint_dir(ctx, policy);
        let doing = format!("cannot load policy {} from {}", policy.id, dir.display());
        let (gpt, varmap) = checkpoint::load_gpt(&dir, device).or_stage(&doing)?;
        let tok = load_tokenizer(&dir).or_stage(&doing)?;
        let params = ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        };
        let opt = AdamW::new(varmap.all_vars(), params).or_stage("cannot create the optimiser")?;
        Ok(Trainee {
            artifact: policy.clone(),
            gpt,
            varmap,
            tok,
            opt,
            steps: 0,
        })
    }
}
