//! The `world` stage family: a simulated preference world whose gold reward
//! is computable from the prompt text and the response alone, so that reward
//! hacking, label noise and distribution shift can be measured honestly.
//!
//! `world.prompts` draws task prompts (sort, arith, keywords) from a `train`
//! or a `shifted` split; `world.demos` answers them with a reference solver
//! of controllable quality; `world.label` pairs completions of one prompt and
//! labels them with simulated, biased and noisy annotators, keeping the
//! ground truth in each pair's meta; `world.gold` scores completions with
//! the gold reward. Every random draw is a seeded hash of record ids, so the
//! results do not depend on the number of workers.

pub mod draws;
mod label;
mod stages;
pub mod tasks;

pub use label::Label;
pub use stages::{Demos, Gold, Prompts};

hone_sdk::export_stages!(Prompts, Demos, Label, Gold);

/// Test helpers: run a stage in-process with its descriptor's defaults.
#[cfg(test)]
pub(crate) mod testing {
    use hone_sdk::prelude::*;
    use std::collections::BTreeMap;

    /// Runs one round of `S` over `input` on `worker`, config overriding
    /// the defaults: its records and its metrics by name.
    pub fn run<S: StageFactory>(
        config: serde_json::Value,
        input: Vec<Record>,
        worker: usize,
    ) -> (Vec<Record>, BTreeMap<String, f64>) {
        let mut init = hone_sdk::testing::init::<S>(config);
        init.worker = worker;
        let inputs = if input.is_empty() {
            vec![]
        } else {
            vec![(0, input)]
        };
        let out = hone_sdk::testing::run_round::<S>(&init, inputs).unwrap();
        let _ = std::fs::remove_dir_all(&init.run_dir);
        (out.emitted(0).to_vec(), out.metrics())
    }
}
