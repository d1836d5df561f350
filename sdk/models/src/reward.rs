//! Reward-model checkpoints and scoring.
//!
//! A reward-model checkpoint is a directory holding `model.safetensors` (the
//! [`RewardModel`]'s VarMap: the GPT backbone at the root and
//! `reward_head.{weight,bias}`), `config.json` (the backbone's [`GptConfig`],
//! so the backbone still loads with [`checkpoint::load_gpt`]),
//! `tokenizer.json`, and `reward.json` (a [`RewardMeta`]: where the model
//! comes from, which WARM needs to decide whether models may be averaged).
//!
//! A reward model on a frozen pretrained backbone (`backbone` in
//! `reward.json` other than `"gpt"`, e.g. `all-minilm-l6-v2`) keeps only
//! its trainable head in `model.safetensors` (`reward_head.{weight,bias}`),
//! names the backbone in `config.json` (a [`PretrainedConfig`]) and has no
//! `tokenizer.json` (the backbone brings its own); it is written by
//! [`save_head_reward_model`] and loaded by the `rm` stage family, which
//! holds the backbone; [`load_reward_model`] refuses it with a message
//! saying so.
//!
//! Texts are encoded as `lm.sft` encodes demonstrations, `BOS prompt
//! response EOS` cut from the left to the model's context, and scored at the
//! last real token.

use crate::checkpoint;
use crate::gpt::GptConfig;
use crate::heads::RewardModel;
use crate::tokenizer::{load_tokenizer, Tokenizer};
use crate::{DType, Device, Error, Result, Tensor, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Name of the metadata file in a reward-model checkpoint directory.
pub const META: &str = "reward.json";

/// The `backbone` of a byte-level GPT reward model (the default).
pub const GPT_BACKBONE: &str = "gpt";

fn gpt_backbone() -> String {
    GPT_BACKBONE.into()
}

/// Where a reward model comes from; `reward.json` in its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardMeta {
    /// The backbone: [`GPT_BACKBONE`] (the whole model is in
    /// `model.safetensors`), or the name of a frozen pretrained backbone
    /// (`all-minilm-l6-v2`: `model.safetensors` holds only the head).
    /// Checkpoints written before the field existed are GPTs.
    #[serde(default = "gpt_backbone")]
    pub backbone: String,
    /// The shared initialisation: models with the same root were fine-tuned
    /// from one set of weights and may be weight-averaged (WARM).
    pub lineage_root: String,
    /// Human description of the initialisation (`scratch`, a policy artifact id).
    pub init: String,
    /// Ensemble member index.
    pub member: usize,
    /// The member's seed (data order, dropout).
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Dropout on the last hidden state during training.
    pub dropout: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Artifact ids this model was averaged from; empty unless merged.
    pub merged_from: Vec<String>,
    /// The (normalised) weights of `merged_from`; empty unless merged.
    pub weights: Vec<f64>,
}

impl RewardMeta {
    /// Whether the model is a byte-level GPT ([`load_reward_model`] loads it).
    pub fn is_gpt(&self) -> bool {
        self.backbone == GPT_BACKBONE
    }
}

/// `config.json` of a reward model on a pretrained backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainedConfig {
    /// The backbone's name in `hone_sdk::pretrained` (`all-minilm-l6-v2`).
    pub pretrained: String,
    /// Width of the pooled embedding the head reads.
    pub hidden_size: usize,
    /// Top transformer layers fine-tuned with the head (their weights are
    /// in the checkpoint beside the head's); 0: the backbone is frozen.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub train_layers: usize,
    /// With `train_layers`: the tokens a (prompt, response) is truncated to,
    /// in training and scoring alike.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_tokens: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A reward model loaded from its checkpoint directory.
pub struct LoadedRm {
    /// The model.
    pub rm: RewardModel,
    /// Its variables (trainable further).
    pub varmap: VarMap,
    /// Its tokenizer.
    pub tok: Box<dyn Tokenizer>,
    /// `reward.json`.
    pub meta: RewardMeta,
    /// The backbone's shape (`config.json`).
    pub config: GptConfig,
}

/// Writes a reward-model checkpoint into `dir` (each file atomically);
/// returns the sha256 hex of `model.safetensors`.
pub fn save_reward_model(
    dir: &Path,
    varmap: &VarMap,
    cfg: &GptConfig,
    tok: &dyn Tokenizer,
    meta: &RewardMeta,
) -> Result<String> {
    let sha = checkpoint::save(dir, varmap, cfg, tok)?;
    save_meta(dir, meta)?;
    Ok(sha)
}

/// Writes the checkpoint of a reward model on a frozen pretrained backbone
/// into `dir` (each file atomically): `model.safetensors` (the `varmap`:
/// the head only), `config.json` (`config`) and `reward.json` (`meta`,
/// whose `backbone` must be `config.pretrained`). Returns the sha256 hex of
/// `model.safetensors`.
pub fn save_head_reward_model(
    dir: &Path,
    varmap: &VarMap,
    config: &PretrainedConfig,
    meta: &RewardMeta,
) -> Result<String> {
    if meta.backbone != config.pretrained {
        return Err(Error::Invalid(format!(
            "reward.json says backbone {} but config.json {}",
            meta.backbone, config.pretrained
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let weights = dir.join(checkpoint::WEIGHTS);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        checkpoint::WEIGHTS,
        std::process::id()
    ));
    varmap
        .save(&tmp)
        .map_err(|e| Error::file(&weights, format!("cannot write weights: {e}")))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &weights))
        .map_err(|e| Error::file(&weights, e))?;
    let config_path = dir.join(checkpoint::CONFIG);
    let json = serde_json::to_vec_pretty(config)?;
    hone_sdk::fs::atomic_write(&config_path, &json).map_err(|e| Error::file(&config_path, e))?;
    save_meta(dir, meta)?;
    hone_sdk::fs::sha256_file(&weights).map_err(|e| Error::file(&weights, e))
}

/// Writes `dir/reward.json` atomically.
pub fn save_meta(dir: &Path, meta: &RewardMeta) -> Result<()> {
    let path = dir.join(META);
    let json = serde_json::to_vec_pretty(meta)?;
    hone_sdk::fs::atomic_write(&path, &json).map_err(|e| Error::file(&path, e))
}

/// Reads `dir/reward.json`; errors name the file.
pub fn load_meta(dir: &Path) -> Result<RewardMeta> {
    let path = dir.join(META);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::file(
            &path,
            format!("{e} (not a reward-model checkpoint written by rm.train or rm.warm?)"),
        )
    })?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, e))
}

/// Loads the GPT reward model in `dir` (f32) on `device`; errors name the
/// file. A reward model on a pretrained backbone is refused (the `rm` stage
/// family loads those).
pub fn load_reward_model(dir: &Path, device: &Device) -> Result<LoadedRm> {
    let meta = load_meta(dir)?;
    if !meta.is_gpt() {
        return Err(Error::file(
            dir.join(META),
            format!(
                "a reward model on the pretrained backbone {}, not a GPT: only its head is in the checkpoint; \
                 load it with the rm stage family (hone_rm), which holds the backbone",
                meta.backbone
            ),
        ));
    }
    let config: GptConfig = checkpoint::load_config(dir)?;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let rm = RewardModel::new(&config, vb)?;
    checkpoint::load_weights(dir, &mut varmap)?;
    let tok = load_tokenizer(dir)?;
    Ok(LoadedRm {
        rm,
        varmap,
        tok,
        meta,
        config,
    })
}

/// The ids a reward model scores for `prompt` + `response`: `BOS prompt
/// response EOS`, at most `context` tokens. Too long a sequence loses the
/// start of the prompt first (the turn being answered is at its end; one
/// prompt token, or BOS, is kept), then the end of the response. The same
/// cut as `lm.sft`'s training examples.
pub fn encode(tok: &dyn Tokenizer, prompt: &str, response: &str, context: usize) -> Vec<u32> {
    let mut ids = vec![tok.bos_id()];
    ids.extend(tok.encode(prompt));
    let response_start = ids.len();
    ids.extend(tok.encode(response));
    ids.push(tok.eos_id());
    let cut = ids
        .len()
        .saturating_sub(context)
        .min(response_start.saturating_sub(1));
    let mut ids = ids.split_off(cut);
    ids.truncate(context.max(1));
    ids
}

/// Right-pads `seqs` with `pad` into ids [B,L] u32 (L the longest, at least
/// 1) and returns the real lengths, as [`RewardModel::score`] takes them.
pub fn pad_right(seqs: &[Vec<u32>], pad: u32, device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let len = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut lengths = Vec::with_capacity(seqs.len());
    for seq in seqs {
        if seq.is_empty() {
            return Err(Error::Invalid("pad_right: an empty sequence".into()));
        }
        ids.extend_from_slice(seq);
        ids.extend(std::iter::repeat_n(pad, len - seq.len()));
        lengths.push(seq.len());
    }
    Ok((Tensor::from_vec(ids, (seqs.len(), len), device)?, lengths))
}

/// Rewards of `(prompt, response)` items, `batch_size` sequences at a time,
/// without building a gradient graph.
pub fn score_texts(
    rm: &RewardModel,
    tok: &dyn Tokenizer,
    items: &[(&str, &str)],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f32>> {
    let context = rm.backbone.config().context;
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(p, r)| encode(tok, p, r, context))
            .collect();
        let (ids, lengths) = pad_right(&seqs, tok.pad_id(), device)?;
        let scores = rm.score(&ids, &lengths)?.detach();
        out.extend(scores.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::init_seeded;
    use crate::tokenizer::ByteTokenizer;

    fn meta() -> RewardMeta {
        RewardMeta {
            backbone: GPT_BACKBONE.into(),
            lineage_root: "scratch:test".into(),
            init: "scratch".into(),
            member: 1,
            seed: 7,
            lr: 1e-3,
            dropout: 0.1,
            steps: 10,
            merged_from: vec![],
            weights: vec![],
        }
    }

    #[test]
    fn encode_cuts_the_prompt_start_first() {
        let t = ByteTokenizer;
        assert_eq!(encode(&t, "ab", "xy", 64), vec![256, 97, 98, 120, 121, 257]);
        assert_eq!(
            encode(&t, "0123456789", "xy", 5),
            vec![56, 57, 120, 121, 257]
        );
        // A response longer than the context keeps one token before it.
        assert_eq!(encode(&t, "a", "0123456789", 4), vec![97, 48, 49, 50]);
    }

    #[test]
    fn save_load_and_score_batched_like_one_by_one() {
        let dir = std::env::temp_dir().join(format!("hone-rm-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = GptConfig {
            vocab_size: 259,
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            context: 16,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let rm = RewardModel::new(&cfg, vb).unwrap();
        init_seeded(&varmap, 3).unwrap();
        let sha = save_reward_model(&dir, &varmap, &cfg, &ByteTokenizer, &meta()).unwrap();
        assert_eq!(sha.len(), 64);
        let loaded = load_reward_model(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.meta, meta());
        assert_eq!(loaded.config, cfg);
        // The backbone still loads as a plain GPT.
        assert!(checkpoint::load_gpt(&dir, &Device::Cpu).is_ok());
        let items = [("q", "a long answer that gets cut"), ("q", "b"), ("", "")];
        let batched =
            score_texts(&loaded.rm, loaded.tok.as_ref(), &items, 8, &Device::Cpu).unwrap();
        let single: Vec<f32> = items
            .iter()
            .flat_map(|it| score_texts(&rm, &ByteTokenizer, &[*it], 1, &Device::Cpu).unwrap())
            .collect();
        assert_eq!(batched.len(), 3);
        for (a, b) in batched.iter().zip(&single) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        std::fs::remove_file(dir.join(META)).unwrap();
        let err = load_reward_model(&dir, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("reward.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reward_json_without_backbone_is_a_gpt() {
        let old = r#"{"lineage_root": "scratch:x", "init": "scratch", "member": 0, "seed": 1,
            "lr": 0.001, "dropout": 0.0, "steps": 5, "merged_from": [], "weights": []}"#;
        let meta: RewardMeta = serde_json::from_str(old).unwrap();
        assert_eq!(meta.backbone, GPT_BACKBONE);
        assert!(meta.is_gpt());
    }

    #[test]
    fn head_checkpoints_are_refused_by_the_gpt_loader() {
        let dir = std::env::temp_dir().join(format!("hone-rm-head-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        candle_nn::linear(4, 1, vb.pp("reward_head")).unwrap();
        let config = PretrainedConfig {
            pretrained: "all-minilm-l6-v2".into(),
            hidden_size: 4,
            train_layers: 0,
            max_tokens: 0,
        };
        let mut m = meta();
        assert!(save_head_reward_model(&dir, &varmap, &config, &m).is_err());
        m.backbone = "all-minilm-l6-v2".into();
        let sha = save_head_reward_model(&dir, &varmap, &config, &m).unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(load_meta(&dir).unwrap(), m);
        let back: PretrainedConfig = checkpoint::load_config(&dir).unwrap();
        assert_eq!(back, config);
        let err = load_reward_model(&dir, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("all-minilm-l6-v2") && err.contains("hone_rm"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
