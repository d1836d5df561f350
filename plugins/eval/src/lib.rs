//! The `eval` stage family: measures policies and reward models from the
//! records other stages emit. Model-free: it reads completions, scores and
//! scored preference pairs, never a model.
//!
//! - `eval.rewards`: mean rewards and the Monte-Carlo KL(π‖π_ref) per policy
//!   checkpoint (or per meta value), for the report's reward-against-KL plot.
//! - `eval.win-rate`: how often one set of completions beats another on the
//!   same prompts.
//! - `eval.elo`: Elo ratings of several policies from per-prompt games,
//!   averaged over seeded orderings of the games.
//! - `eval.rm-accuracy`: accuracy and expected calibration error of a reward
//!   model on a held-out set of scored pairs.
//! - `eval.best-of-n`: rejection sampling with a proxy reward: proxy and
//!   gold reward of the best of n samples against the analytic KL.
//! - `eval.compare`: completions before and after an improvement, side by
//!   side on the same prompts: paired gains with standard errors, and
//!   examples a person can read.
//!
//! Every stage is `Placement::Single`: all records meet on worker 0, so the
//! metrics are global, whatever the number of workers.

mod best_of_n;
mod common;
mod compare;
mod elo;
mod rewards;
mod rm_accuracy;
mod win_rate;

pub use best_of_n::BestOfN;
pub use compare::Compare;
pub use elo::Elo;
pub use rewards::Rewards;
pub use rm_accuracy::RmAccuracy;
pub use win_rate::WinRate;

hone_sdk::export_stages!(Rewards, WinRate, Elo, RmAccuracy, BestOfN, Compare);

/// Test helpers: run a stage in-process with its descriptor's defaults,
/// feeding records on several input ports.
#[cfg(test)]
pub(crate) mod testing {
    use hone_sdk::prelude::*;

    /// What one round of a stage produced.
    pub struct Output {
        /// Records emitted on output port 0.
        pub records: Vec<Record>,
        /// Metrics as (name, value, step), in order.
        pub metrics: Vec<(String, f64, Option<u64>)>,
        /// Log lines, in order.
        pub logs: Vec<String>,
        /// The run directory the stage wrote to.
        pub run_dir: std::path::PathBuf,
    }

    impl Output {
        /// The value of metric `name` (without a step, or at `step`).
        pub fn metric(&self, name: &str, step: Option<u64>) -> Option<f64> {
            self.metrics
                .iter()
                .rev()
                .find(|(n, _, s)| n == name && *s == step)
                .map(|(_, v, _)| *v)
        }
    }

    /// Creates `S` with `config` over its defaults.
    pub fn create<S: StageFactory>(config: serde_json::Value) -> Result<S, StageError> {
        hone_sdk::testing::create::<S>(config)
    }

    /// Runs one round of `S`, `inputs` being (port, records) batches fed in
    /// order, config overriding the defaults.
    pub fn run<S: StageFactory>(
        config: serde_json::Value,
        inputs: Vec<(usize, Vec<Record>)>,
    ) -> Result<Output, StageError> {
        let init = hone_sdk::testing::init::<S>(config);
        let out = hone_sdk::testing::run_round::<S>(&init, inputs)?;
        Ok(Output {
            records: out.emitted(0).to_vec(),
            metrics: out.metric_list(),
            logs: out.logs(),
            run_dir: init.run_dir,
        })
    }

    /// A completion `id` of `prompt_id`, with meta.
    pub fn completion(id: &str, prompt_id: &str, meta: &[(&str, &str)]) -> Record {
        Record::Completion(Completion {
            id: id.into(),
            prompt_id: prompt_id.into(),
            prompt: format!("prompt {prompt_id}"),
            text: format!("text {id}"),
            token_ids: Vec::new(),
            token_logprobs: Vec::new(),
            ref_logprobs: Vec::new(),
            values: Vec::new(),
            policy: None,
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// A score `name` of record `id`.
    pub fn score(id: &str, name: &str, value: f64) -> Record {
        Record::Score(Score {
            id: id.into(),
            prompt_id: String::new(),
            name: name.into(),
            value,
        })
    }
}
