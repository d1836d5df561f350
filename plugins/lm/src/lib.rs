//! The `lm` stage family: causal language models on hone's model core.
//!
//! - `lm.sft`: supervised fine-tuning of a byte-level GPT (from scratch or
//!   from a policy artifact) on demonstrations, with the loss masked to the
//!   responses; emits its checkpoints as `policy` artifacts.
//! - `lm.rollout`: samples completions of prompts from the latest policy
//!   artifact, with per-token log-probabilities.
//! - `lm.logprobs`: scores completions under a reference policy
//!   (teacher-forced), for KL estimates.

mod logprobs;
mod rollout;
mod sft;

pub use logprobs::Logprobs;
pub use rollout::Rollout;
pub use sft::Sft;

use hone_sdk::StageError;

hone_sdk::export_stages!(Sft, Rollout, Logprobs);

/// Turns a model-core (or candle) error into a stage error saying what was
/// being done.
trait OrStageError<T> {
    fn or_stage(self, doing: &str) -> Result<T, StageError>;
}

impl<T, E: std::fmt::Display> OrStageError<T> for Result<T, E> {
    fn or_stage(self, doing: &str) -> Result<T, StageError> {
        self.map_err(|e| StageError::new(format!("{doing}: {e}")))
    }
}

/// The device named by the `device` field, or a config error naming it.
fn device(name: &str) -> Result<hone_models::Device, StageError> {
    hone_models::device::device(name).map_err(|e| StageError::config("device", e.to_string()))
}
