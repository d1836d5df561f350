//! Loaded reward models of either backbone, and batched scoring that holds
//! the frozen pretrained backbone once per stage instance.
//!
//! A GPT reward model ([`Rm::Gpt`]) is a whole model in its checkpoint. A
//! reward model on all-MiniLM-L6-v2 ([`Rm::Head`]) is only a linear head
//! `reward_head.{weight,bias}` on the frozen BERT's mean-pooled pair
//! embedding ([`MiniLmRewardModel::pool_pairs`]): [`Scoring`] loads the BERT
//! once, embeds each distinct (prompt, response) once per round, and applies
//! every head to the same embeddings, so M heads cost one BERT pass.

use crate::OrStageError;
use hone_models::checkpoint;
use hone_models::reward::{
    load_meta, load_reward_model, score_texts, LoadedRm, PretrainedConfig, RewardMeta,
};
use hone_models::{Device, Tensor};
use hone_pretrained::minilm::{MiniLmRewardModel, HEAD_PREFIX, MODEL_NAME};
use hone_sdk::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// A reward model loaded from its checkpoint directory.
pub(crate) enum Rm {
    /// A byte-level GPT with a reward head.
    Gpt(LoadedRm),
    /// A linear head on a frozen pretrained backbone.
    Head(HeadRm),
}

/// A linear head on a frozen pretrained backbone's pooled embedding.
pub(crate) struct HeadRm {
    /// `reward.json`.
    pub meta: RewardMeta,
    /// `config.json`.
    pub config: PretrainedConfig,
    /// `reward_head.weight`, flattened (`hidden_size` values).
    pub weight: Vec<f32>,
    /// `reward_head.bias`.
    pub bias: f32,
}

impl HeadRm {
    /// The head from `reward_head.{weight,bias}` among `tensors`.
    pub fn from_tensors(
        meta: RewardMeta,
        config: PretrainedConfig,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Self, String> {
        let get = |name: &str| -> Result<Vec<f32>, String> {
            let key = format!("{HEAD_PREFIX}.{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| format!("no tensor {key}"))?;
            t.flatten_all()
                .and_then(|t| t.to_dtype(hone_models::DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("tensor {key}: {e}"))
        };
        let weight = get("weight")?;
        let bias = get("bias")?;
        if weight.len() != config.hidden_size || bias.len() != 1 {
            return Err(format!(
                "the head has {} weights and {} biases; config.json says hidden_size {} (and one bias)",
                weight.len(),
                bias.len(),
                config.hidden_size
            ));
        }
        Ok(HeadRm {
            meta,
            config,
            weight,
            bias: bias[0],
        })
    }

    /// The reward of one pooled embedding.
    fn reward(&self, embedding: &[f32]) -> f64 {
        let dot: f64 = self
            .weight
            .iter()
            .zip(embedding)
            .map(|(w, e)| f64::from(*w) * f64::from(*e))
            .sum();
        dot + f64::from(self.bias)
    }
}

/// Loads the reward model in `dir`, whichever its backbone (`reward.json`'s
/// `backbone`); GPT weights go to `device`, heads stay on the CPU.
pub(crate) fn load_rm_dir(dir: &Path, device: &Device) -> Result<Rm, String> {
    let meta = load_meta(dir).map_err(|e| e.to_string())?;
    if meta.is_gpt() {
        return load_reward_model(dir, device)
            .map(Rm::Gpt)
            .map_err(|e| e.to_string());
    }
    if meta.backbone != MODEL_NAME {
        return Err(format!(
            "{}: unknown backbone {:?} (this build knows \"gpt\" and \"{MODEL_NAME}\")",
            dir.join(hone_models::reward::META).display(),
            meta.backbone
        ));
    }
    let config: PretrainedConfig = checkpoint::load_config(dir).map_err(|e| e.to_string())?;
    if config.pretrained != meta.backbone {
        return Err(format!(
            "{}: config.json names {} but reward.json {}",
            dir.display(),
            config.pretrained,
            meta.backbone
        ));
    }
    let file = dir.join(checkpoint::WEIGHTS);
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    HeadRm::from_tensors(meta, config, &tensors)
        .map(Rm::Head)
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// Scores texts with reward models of either backbone; holds the frozen
/// pretrained backbone (loaded on first use) and the round's embeddings.
pub(crate) struct Scoring {
    device: Device,
    /// Sequences per forward pass (GPT or BERT).
    batch_size: usize,
    minilm: Option<MiniLmRewardModel>,
    /// Pooled embeddings of (prompt, response) seen this round.
    cache: HashMap<(String, String), Vec<f32>>,
}

impl Scoring {
    pub fn new(device: Device, batch_size: usize) -> Self {
        Scoring {
            device,
            batch_size: batch_size.max(1),
            minilm: None,
            cache: HashMap::new(),
        }
    }

    /// Forgets the round's embeddings (the backbone stays loaded).
    pub fn end_round(&mut self) {
        self.cache.clear();
    }

    /// all-MiniLM-L6-v2, fetched and loaded on first use.
    pub fn minilm(&mut self) -> Result<&MiniLmRewardModel, StageError> {
        if self.minilm.is_none() {
            let dir = hone_sdk::pretrained::fetch(MODEL_NAME)
                .map_err(|e| StageError::new(format!("cannot fetch {MODEL_NAME}: {e}")))?;
            let model = MiniLmRewardModel::load(&dir, &self.device, 0)
                .or_stage(&format!("cannot load {MODEL_NAME} from {}", dir.display()))?;
            self.minilm = Some(model);
        }
        Ok(self.minilm.as_ref().expect("loaded above"))
    }

    /// The backbone's pooled embedding of each `(prompt, response)` (rows of
    /// `hidden_size`), each distinct item embedded once per round;
    /// `progress(done, total)` after each batch of new items.
    pub fn embed(
        &mut self,
        items: &[(&str, &str)],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>, StageError> {
        let mut missing: Vec<(&str, &str)> = items
            .iter()
            .filter(|(p, r)| !self.cache.contains_key(&(p.to_string(), r.to_string())))
            .copied()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        // Similar lengths batched together: less padding.
        missing.sort_by_key(|(p, r)| p.len() + r.len());
        let batch_size = self.batch_size;
        let total = missing.len();
        let model = self.minilm()?;
        let mut fresh = Vec::with_capacity(total);
        for (done, chunk) in missing.chunks(batch_size).enumerate() {
            let prompts: Vec<&str> = chunk.iter().map(|(p, _)| *p).collect();
            let responses: Vec<&str> = chunk.iter().map(|(_, r)| *r).collect();
            let rows = model
                .pool_pairs(&prompts, &responses)
                .and_then(|t| Ok(t.to_dtype(hone_models::DType::F32)?.to_vec2::<f32>()?))
                .or_stage(&format!("cannot embed with {MODEL_NAME}"))?;
            fresh.extend(chunk.iter().copied().zip(rows));
            progress((done * batch_size + chunk.len()).min(total), total);
        }
        for ((p, r), row) in fresh {
            self.cache.insert((p.to_string(), r.to_string()), row);
        }
        Ok(items
            .iter()
            .map(|(p, r)| self.cache[&(p.to_string(), r.to_string())].clone())
            .collect())
    }

    /// Rewards of `(prompt, response)` items under one model, as f64.
    pub fn rewards(&mut self, rm: &Rm, items: &[(&str, &str)]) -> Result<Vec<f64>, StageError> {
        match rm {
            Rm::Gpt(rm) => Ok(score_texts(
                &rm.rm,
                rm.tok.as_ref(),
                items,
                self.batch_size,
                &self.device,
            )
            .or_stage("scoring failed")?
            .into_iter()
            .map(f64::from)
            .collect()),
            Rm::Head(head) => {
                if head.meta.backbone != MODEL_NAME {
                    return Err(StageError::new(format!(
                        "unknown backbone {}",
                        head.meta.backbone
                    )));
                }
                let embeddings = self.embed(items, &mut |_, _| {})?;
                Ok(embeddings.iter().map(|e| head.reward(e)).collect())
            }
        }
    }

    /// Per pair, the reward of chosen and of rejected under one model.
    pub fn pair_rewards(
        &mut self,
        rm: &Rm,
        pairs: &[PreferencePair],
    ) -> Result<Vec<(f64, f64)>, StageError> {
        let mut items: Vec<(&str, &str)> = Vec::with_capacity(2 * pairs.len());
        for p in pairs {
            items.push((&p.prompt, &p.chosen));
            items.push((&p.prompt, &p.rejected));
        }
        let r = self.rewards(rm, &items)?;
        Ok(r.chunks(2).map(|c| (c[0], c[1])).collect())
    }
}
