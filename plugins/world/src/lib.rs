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
    use hone_sdk::{Collected, Event};
    use std::collections::BTreeMap;

    /// Runs one round of `S` over `input`, config overriding the defaults.
    pub fn run<S: StageFactory>(
        config: serde_json::Value,
        input: Vec<Record>,
        worker: usize,
    ) -> (Vec<Record>, BTreeMap<String, f64>) {
        let mut full = serde_json::Map::new();
        for field in S::descriptor().config {
            full.insert(field.name, field.default);
        }
        for (k, v) in config.as_object().unwrap() {
            full.insert(k.clone(), v.clone());
        }
        let mut init = StageInit::for_test("world", serde_json::Value::Object(full));
        init.worker = worker;
        let mut stage = S::create(&init).unwrap();
        let mut out = Collected::default();
        {
            let mut ctx = Context::new(&mut out, &init, 0);
            if !input.is_empty() {
                stage.on_batch(&mut ctx, 0, input).unwrap();
            }
            stage.on_round_end(&mut ctx).unwrap();
        }
        let records = out.records.remove(&0).unwrap_or_default();
        let metrics = out
            .events
            .into_iter()
            .filter_map(|e| match e {
                Event::Metric { name, value, .. } => Some((name, value)),
                _ => None,
            })
            .collect();
        (records, metrics)
    }
}
