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
use hone_pretrained::smollm::MODEL_NAME as SMOLLM;
use hone_sdk::prelude::*;
use hone_sdk::text::seeded_hash;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Pooled embeddings of the process, by [`text_key`], and the keys some
/// stage instance is computing now.
#[derive(Default)]
struct SharedEmbeddings {
    rows: HashMap<u128, Arc<[f32]>>,
    claimed: HashSet<u128>,
}

/// At most this many embeddings are kept (about 0.6 GB at 384 floats);
/// beyond, the map is emptied (instances waiting for some recompute them).
const SHARED_CAP: usize = 400_000;

fn shared() -> &'static (Mutex<SharedEmbeddings>, Condvar) {
    static SHARED: OnceLock<(Mutex<SharedEmbeddings>, Condvar)> = OnceLock::new();
    SHARED.get_or_init(Default::default)
}

/// A 128-bit key of (backbone, prompt, response).
fn text_key(prompt: &str, response: &str) -> u128 {
    let text = format!("{MODEL_NAME}\u{0}{prompt}\u{0}{response}");
    (u128::from(seeded_hash(1, &text)) << 64) | u128::from(seeded_hash(2, &text))
}

/// A reward model loaded from its checkpoint directory.
pub(crate) enum Rm {
    /// A byte-level GPT with a reward head.
    Gpt(LoadedRm),
    /// A linear head on a frozen pretrained backbone.
    Head(HeadRm),
    /// A head and fine-tuned top layers on a pretrained backbone.
    Tuned(crate::tuned::TunedRm),
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
    if meta.backbone != MODEL_NAME && meta.backbone != SMOLLM {
        return Err(format!(
            "{}: unknown backbone {:?} (this build knows \"gpt\", \"{MODEL_NAME}\" and \"{SMOLLM}\")",
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
    if config.train_layers > 0 {
        return Ok(Rm::Tuned(crate::tuned::TunedRm::new(meta, config, tensors)));
    }
    if meta.backbone == SMOLLM {
        return Err(format!(
            "{}: a {SMOLLM} reward model fine-tunes its top layers, but config.json says train_layers 0",
            dir.display()
        ));
    }
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
    /// The encoder's frozen part for partly fine-tuned models, loaded on first use.
    frozen: Option<crate::tuned::Frozen>,
    /// Frozen states by (text, split, max_tokens), shared by the models
    /// scored in one instance, and the floats they hold (emptied beyond
    /// [`STATES_CAP`]).
    states: HashMap<u128, Tensor>,
    states_floats: usize,
}

/// Floats of frozen states kept for scoring partly fine-tuned models
/// (about 2 GB): beyond, the cache is emptied before new states join it.
const STATES_CAP: usize = 500_000_000;

impl Scoring {
    pub fn new(device: Device, batch_size: usize) -> Self {
        Scoring {
            device,
            batch_size: batch_size.max(1),
            minilm: None,
            frozen: None,
            states: HashMap::new(),
            states_floats: 0,
        }
    }

    /// The frozen `backbone` for texts of `max_tokens`, loaded on first use.
    pub fn frozen(
        &mut self,
        backbone: &str,
        max_tokens: usize,
    ) -> Result<&crate::tuned::Frozen, StageError> {
        if self
            .frozen
            .as_ref()
            .is_none_or(|f| f.max_tokens() != max_tokens || f.backbone() != backbone)
        {
            self.frozen = Some(crate::tuned::Frozen::load(
                backbone,
                max_tokens,
                &self.device,
            )?);
            self.states.clear();
            self.states_floats = 0;
        }
        Ok(self.frozen.as_ref().expect("loaded above"))
    }

    /// Frozen states after layers `0..split` of each item, computed once
    /// per distinct text in this instance.
    pub fn frozen_states(
        &mut self,
        items: &[(&str, &str)],
        split: usize,
        (backbone, max_tokens): (&str, usize),
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tensor>, StageError> {
        let key =
            |p: &str, r: &str| text_key(&format!("{backbone}/{split}/{max_tokens}\u{0}{p}"), r);
        let mut todo: Vec<(&str, &str)> = Vec::new();
        let mut queued = HashSet::new();
        for (p, r) in items {
            let k = key(p, r);
            if !self.states.contains_key(&k) && queued.insert(k) {
                todo.push((p, r));
            }
        }
        let batch = self.batch_size;
        let computed = self
            .frozen(backbone, max_tokens)?
            .states(&todo, split, batch, progress)?;
        let mut fresh = HashMap::new();
        for ((p, r), t) in todo.iter().zip(computed) {
            fresh.insert(key(p, r), t);
        }
        // The answer first, from the new states and the cached ones; only
        // then may the cache make room.
        let out: Vec<Tensor> = items
            .iter()
            .map(|(p, r)| {
                let k = key(p, r);
                fresh
                    .get(&k)
                    .or_else(|| self.states.get(&k))
                    .cloned()
                    .ok_or_else(|| {
                        StageError::new("a frozen state went missing (a bug: please report it)")
                    })
            })
            .collect::<Result<_, _>>()?;
        let added: usize = fresh.values().map(|t| t.elem_count()).sum();
        if self.states_floats + added > STATES_CAP {
            self.states.clear();
            self.states_floats = 0;
        }
        if added <= STATES_CAP {
            self.states_floats += added;
            self.states.extend(fresh);
        }
        Ok(out)
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
    /// `hidden_size`). Each distinct item is embedded once in the process
    /// (shared with the other stage instances, which may compute some of
    /// them); `progress(done, total)` as they arrive.
    pub fn embed(
        &mut self,
        items: &[(&str, &str)],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Arc<[f32]>>, StageError> {
        let keys: Vec<u128> = items.iter().map(|(p, r)| text_key(p, r)).collect();
        let mut todo: Vec<(u128, &str, &str)> = Vec::new();
        let mut seen = HashSet::new();
        for (k, (p, r)) in keys.iter().zip(items) {
            if seen.insert(*k) {
                todo.push((*k, p, r));
            }
        }
        // Similar lengths batched together: less padding.
        todo.sort_by_key(|(_, p, r)| p.len() + r.len());
        let total = todo.len();
        let mut mine: HashMap<u128, Arc<[f32]>> = HashMap::with_capacity(total);
        let (lock, ready) = shared();
        let batch_size = self.batch_size;
        loop {
            let batch: Vec<(u128, &str, &str)> = {
                let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                todo.retain(|(k, _, _)| match guard.rows.get(k) {
                    Some(row) => {
                        mine.insert(*k, row.clone());
                        false
                    }
                    None => true,
                });
                if todo.is_empty() {
                    break;
                }
                let batch: Vec<(u128, &str, &str)> = todo
                    .iter()
                    .filter(|(k, _, _)| !guard.claimed.contains(k))
                    .take(batch_size)
                    .copied()
                    .collect();
                if batch.is_empty() {
                    // Everything left is being computed elsewhere.
                    let _ = ready
                        .wait_timeout(guard, Duration::from_millis(500))
                        .unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                guard.claimed.extend(batch.iter().map(|(k, _, _)| *k));
                batch
            };
            let prompts: Vec<&str> = batch.iter().map(|(_, p, _)| *p).collect();
            let responses: Vec<&str> = batch.iter().map(|(_, _, r)| *r).collect();
            let rows = self.minilm().and_then(|model| {
                model
                    .pool_pairs(&prompts, &responses)
                    .and_then(|t| Ok(t.to_dtype(hone_models::DType::F32)?.to_vec2::<f32>()?))
                    .or_stage(&format!("cannot embed with {MODEL_NAME}"))
            });
            {
                let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                for (k, _, _) in &batch {
                    guard.claimed.remove(k);
                }
                if let Ok(rows) = &rows {
                    if guard.rows.len() + rows.len() > SHARED_CAP {
                        guard.rows.clear();
                    }
                    for ((k, _, _), row) in batch.iter().zip(rows) {
                        let row: Arc<[f32]> = row.as_slice().into();
                        guard.rows.insert(*k, row.clone());
                        mine.insert(*k, row);
                    }
                }
            }
            ready.notify_all();
            rows?;
            todo.retain(|(k, _, _)| !mine.contains_key(k));
            progress(total - todo.len(), total);
        }
        progress(total, total);
        Ok(keys.iter().map(|k| mine[k].clone()).collect())
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
            Rm::Tuned(tuned) => {
                let max_tokens = tuned.config.max_tokens;
                let backbone = tuned.meta.backbone.as_str();
                let layers = self.frozen(backbone, max_tokens)?.num_layers();
                let split = tuned.split(layers);
                let states =
                    self.frozen_states(items, split, (backbone, max_tokens), &mut |_, _| {})?;
                let device = self.device.clone();
                let frozen = self.frozen(backbone, max_tokens)?;
                let top = tuned.encoder(frozen)?;
                let head = tuned.head(&device)?;
                let mut out = Vec::with_capacity(items.len());
                for chunk in states.chunks(self.batch_size) {
                    let refs: Vec<&Tensor> = chunk.iter().collect();
                    let r = crate::tuned::rewards_from(top, &head, &refs, split)
                        .and_then(|t| Ok(t.to_vec1::<f32>()?))
                        .or_stage("scoring failed")?;
                    out.extend(r.into_iter().map(f64::from));
                }
                Ok(out)
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
