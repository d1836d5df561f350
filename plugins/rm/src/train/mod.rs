//! `rm.train`: a Bradley–Terry reward-model ensemble, one member per worker.

mod fit;
mod length_balance;
mod source_balance;

use crate::model::Scoring;
use crate::{artifact_dir, device, OrStageError, REWARD_MODEL};
use fit::Net;
use hone_models::checkpoint;
use hone_models::gpt::{init_seeded, GptConfig};
use hone_models::heads::RewardModel;
use hone_models::reward::{
    encode, save_head_reward_model, save_reward_model, PretrainedConfig, RewardMeta, GPT_BACKBONE,
};
use hone_models::tokenizer::{load_tokenizer, ByteTokenizer, Tokenizer};
use hone_models::train::{check_shape, Shape};
use hone_models::{DType, Device, Tensor, VarBuilder, VarMap};
use hone_pretrained::minilm::MODEL_NAME as MINILM;
use hone_pretrained::smollm::MODEL_NAME as SMOLLM;
use hone_sdk::prelude::*;
use hone_sdk::text::{seeded_hash, seeded_unit};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainConfig {
    members: usize,
    backbone: String,
    train_layers: usize,
    max_tokens: usize,
    embed_batch_size: usize,
    init: String,
    init_checkpoints: String,
    init_seed: u64,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    context: usize,
    seed: u64,
    lrs: Option<Vec<f64>>,
    dropouts: Vec<f64>,
    data_order: String,
    steps: usize,
    batch_size: usize,
    lr: f64,
    min_lr: f64,
    warmup: usize,
    weight_decay: f64,
    clip: f64,
    eval_fraction: f64,
    eval_every: usize,
    margin_scale: f64,
    label_smoothing: f64,
    length_balance: bool,
    source_balance: bool,
    train_on: String,
    start: String,
    device: String,
    lora_rank: usize,
    lora_alpha: f64,
    lora_targets: Vec<String>,
}

/// Overwrites the variables of `varmap` that `wanted` names with the
/// tensors of the same names in the safetensors `file`; a missing one is an
/// error that starts with `doing`.
fn set_weights(
    varmap: &VarMap,
    file: &std::path::Path,
    device: &Device,
    doing: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<(), StageError> {
    let tensors = candle_core::safetensors::load(file, device).or_stage(doing)?;
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    for (name, var) in data.iter().filter(|(n, _)| wanted(n)) {
        let t = tensors
            .get(name)
            .ok_or_else(|| StageError::new(format!("{doing}: no tensor {name}")))?;
        var.set(&t.to_dtype(DType::F32).or_stage(doing)?)
            .or_stage(doing)?;
    }
    Ok(())
}

/// A pair's place in the label pool: its id and its texts, so that the
/// same pair sent again replaces itself while a later label that reuses an
/// id for other answers (a prompt sampled again in a later round) joins.
fn pool_key(p: &PreferencePair) -> String {
    let texts = format!("{}\u{0}{}\u{0}{}", p.prompt, p.chosen, p.rejected);
    format!(
        "{}#{:016x}",
        p.id,
        hone_sdk::text::stable_hash(texts.as_bytes())
    )
}

/// What an rm.train snapshot holds: the init policies seen, the label pool,
/// and each member's last model (artifact id, weights file).
type TrainState = (
    Vec<ArtifactRef>,
    Vec<PreferencePair>,
    BTreeMap<usize, (String, String)>,
);

/// Trains the members of a reward-model ensemble that this instance runs.
pub struct Train {
    config: TrainConfig,
    lrs: Vec<f64>,
    device: Device,
    /// Holds the pretrained backbone (loaded once) and embeds the pairs.
    scoring: Scoring,
    input: RoundInput,
    /// Every policy seen on `init`, across rounds.
    policies: Vec<ArtifactRef>,
    /// With train_on = "all": every pair received so far, by id (a pair
    /// sent again replaces itself).
    pool: BTreeMap<String, PreferencePair>,
    /// With start = "last": each member's last trained model (its artifact
    /// id and weights file relative to the run directory), which the next
    /// round continues.
    last: BTreeMap<usize, (String, String)>,
}

impl StageFactory for Train {
    fn descriptor() -> StageDescriptor {
        let count = FieldType::unsigned();
        let size = FieldType::positive().at_most(1 << 20);
        let float = FieldType::Float;
        let floats = FieldType::List(Box::new(FieldType::Float));
        StageDescriptor::new(
            "rm.train",
            "Trains an ensemble of Bradley-Terry reward models on preference pairs (member i on worker (offset + i) mod N, offset = members of earlier per-member stages; \
             every member sees every pair) from one shared initialisation, diversified by seed, learning rate and \
             dropout. Loss per pair: -weight * [(1-eps) log sigmoid(d - m) + eps log sigmoid(m - d)], d = r(chosen) - \
             r(rejected), m = margin_scale * margin, eps = the pair's `label_smoothing` or this stage's. Emits one \
             `reward-model` artifact per member. Metrics per member i: m{i}_train_loss, m{i}_eval_loss (by step), \
             m{i}_eval_accuracy.",
        )
        .input("pairs", RecordKind::PreferencePair)
        .input("init", RecordKind::Artifact(ArtifactKind::Policy))
        .output("models", RecordKind::Artifact(ArtifactKind::RewardModel))
        .placement(Placement::PerMember {
            members_field: "members".into(),
        })
        .optional("members", FieldType::range(1, 1024), 1, "Ensemble size M; member i runs on worker (offset + i) mod N, where offset counts the members of earlier per-member stages.")
        .optional(
            "backbone",
            FieldType::one_of(&["gpt", MINILM, SMOLLM]),
            GPT_BACKBONE,
            "`gpt`: a byte-level GPT reward model, trained whole (init scratch or input). `all-minilm-l6-v2`: \
             the pretrained sentence encoder, frozen, under a trained linear head on its mean-pooled embedding \
             of (prompt, response); each distinct text is embedded once and the members train their heads on \
             the cached embeddings (init must be scratch; d_model..context are ignored). \
             `smollm2-135m-instruct`: the pretrained chat model with its top `train_layers` layers and final \
             norm fine-tuned under a linear head on the last token's hidden state (the prompt in its ChatML \
             template, the response ended by <|im_end|>, as TRL's reward models on a causal LM read it); \
             train_layers >= 1 (with lora_rank, LoRA adapters on those layers train instead, the final norm \
             frozen).",
        )
        .optional(
            "train_layers",
            FieldType::range(0, 64),
            0,
            "With a pretrained backbone: fine-tune its top k transformer layers with the head \
             (partial fine-tuning; 0 = the encoder frozen, only the head trains: MiniLM only). The frozen lower layers run \
             once per distinct text and their output is cached; each member trains its own copy of the top \
             layers from the pretrained weights, so WARM averages non-linear weights. The checkpoint holds \
             the head and the top layers; it loads like any reward model.",
        )
        .optional(
            "max_tokens",
            FieldType::range(8, 512),
            256,
            "With train_layers > 0: each (prompt, response) is truncated to this many tokens, in training and \
             in scoring (it is saved in config.json): MiniLM cuts the longest of the two first, SmolLM2 keeps \
             the text's last tokens (the prompt loses its start first; the end the head reads stays).",
        )
        .optional(
            "embed_batch_size",
            size.clone(),
            32,
            "With a pretrained backbone: texts per forward pass when embedding the pairs.",
        )
        .optional(
            "init",
            FieldType::one_of(&["scratch", "input"]),
            "scratch",
            "`scratch`: a fresh GPT shaped by d_model..context, weights from init_seed (shared by all members). \
             `input`: the policy artifacts arriving on the `init` port (e.g. lm.sft's checkpoints).",
        )
        .optional(
            "init_checkpoints",
            FieldType::one_of(&["last", "spread"]),
            "last",
            "With init = \"input\": `last` starts every member from the last checkpoint (highest round and step), \
             `spread` (Baklava) starts member i from the i-th checkpoint in step order, modulo their count.",
        )
        .optional("init_seed", count.clone(), 0, "Seed of the shared initialisation (the scratch backbone and the reward head); combined with the pipeline seed.")
        .optional("d_model", FieldType::range(1, 65_536), 64, "Width of a scratch backbone.")
        .optional("n_layers", FieldType::range(1, 1024), 2, "Transformer blocks of a scratch backbone.")
        .optional("n_heads", FieldType::range(1, 1024), 4, "Attention heads of a scratch backbone; must divide d_model.")
        .optional("context", size.clone(), 128, "Context of a scratch backbone, in tokens; longer texts lose the start of the prompt.")
        .optional("seed", count.clone(), 0, "Ensemble seed: member i's seed is a hash of (seed, pipeline seed, i) and drives its data order.")
        .optional("lrs", floats.clone(), serde_json::Value::Null, "Per-member peak learning rates: member i uses lrs[i % len]. Unset = [lr].")
        .optional("dropouts", floats, serde_json::json!([0.0]), "Per-member dropout on the last hidden state: member i uses dropouts[i % len].")
        .optional(
            "data_order",
            FieldType::one_of(&["shuffle", "same"]),
            "shuffle",
            "`shuffle`: each member sees the pairs in its own seeded order; `same`: all members share one order.",
        )
        .optional("steps", FieldType::positive(), 200, "Optimiser steps per member and round.")
        .optional("batch_size", size, 16, "Pairs per step.")
        .optional("lr", float.clone(), 1e-3, "Peak learning rate (AdamW), unless lrs is set.")
        .optional("min_lr", float.clone(), 1e-4, "Learning rate at the end of the cosine decay.")
        .optional("warmup", count.clone(), 10, "Steps of linear warm-up.")
        .optional("weight_decay", float.clone(), 0.01, "AdamW weight decay.")
        .optional("clip", float.clone(), 1.0, "Clip the global gradient norm to this.")
        .optional("eval_fraction", float.clone(), 0.1, "Fraction of pairs held out for the eval metrics (seeded per pair id, the same for all members).")
        .optional("eval_every", count, 50, "Evaluate every this many steps (0 = only before and after training).")
        .optional("margin_scale", float.clone(), 1.0, "Multiplies each pair's `margin` inside the loss (0 = ignore margins).")
        .optional("label_smoothing", float.clone(), 0.0, "Label smoothing eps in [0, 0.5); a pair's own `label_smoothing` (set by rm.strength) overrides it.")
        .optional(
            "length_balance",
            FieldType::Bool,
            false,
            "Reweight the training pairs so that, within each source (meta `source`: each input file of \
             the jsonl readers), pairs whose chosen response is the longer and pairs whose chosen response \
             is the shorter carry equal total weight; equal lengths and a source with only one side keep \
             their weights; each source's total weight is unchanged. Takes away a set's length bias \
             (HH-RLHF harmless prefers the shorter response, PandaLM the longer), so the models cannot \
             lower their loss by learning length. Logs the factors per source.",
        )
        .optional(
            "source_balance",
            FieldType::Bool,
            false,
            "Reweight the training pairs so that every source (meta `source`) carries the same total \
             weight, the training set's total unchanged: on the union of a large set and a small one, the \
             small one then counts as much in the loss. Applied after `length_balance` when both are set \
             (which keeps each source's total). Logs the factors per source.",
        )
        .optional(
            "train_on",
            FieldType::one_of(&["round", "all"]),
            "round",
            "`round`: each round trains on that round's pairs; `all`: on every pair received so far (the \
             label pool of an online loop: each round's new labels join it; the same pair, id and texts, \
             sent again replaces itself).",
        )
        .optional(
            "start",
            FieldType::one_of(&["init", "last"]),
            "init",
            "`init`: every round trains each member afresh from the shared initialisation; `last`: from its \
             second round on, each member continues from its own weights of the round before (a fresh \
             AdamW and schedule), so the members keep their shared initialisation and WARM can still \
             average them.",
        )
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
        .optional(
            "lora_rank",
            FieldType::unsigned().at_most(4096),
            0,
            "With a pretrained backbone and train_layers > 0: LoRA (Hu et al. 2021) of this rank on the \
             top train_layers layers instead of training their weights (0 = no LoRA); the head trains as \
             always. The adapters start as PEFT's do (A Kaiming-uniform from init_seed, shared by the \
             members; B zero), and the checkpoint stores the merged weights W + (alpha / r) B A, so it \
             loads and scores like any partly fine-tuned model, and rm.warm's average of members is the \
             mean of their merged updates, not of A and B apart (mean(B_i) mean(A_i) is not the mean of \
             the products). Not with start = \"last\".",
        )
        .optional("lora_alpha", FieldType::Float, 16.0, "With lora_rank: the update is scaled by lora_alpha / lora_rank.")
        .optional(
            "lora_targets",
            FieldType::List(Box::new(FieldType::String)),
            serde_json::json!([]),
            "With lora_rank: the projections that get adapters. SmolLM2: q_proj, k_proj, v_proj, o_proj, \
             gate_proj, up_proj, down_proj; MiniLM: attention.self.query, attention.self.key, \
             attention.self.value, attention.output.dense, intermediate.dense, output.dense. Empty: the \
             query and value projections (PEFT's default).",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: TrainConfig = init.config()?;
        if config.lora_rank > 0 && config.backbone != GPT_BACKBONE {
            if config.train_layers == 0 {
                return Err(StageError::config(
                    "lora_rank",
                    "LoRA adapts the fine-tuned top layers: set train_layers to 1 or more (and a \
                     pretrained backbone)",
                ));
            }
            if config.start == "last" {
                return Err(StageError::config(
                    "lora_rank",
                    "LoRA members cannot continue (start = \"last\"): their checkpoints hold merged \
                     weights, not adapters; use start = \"init\"",
                ));
            }
            let known: &[&str] = if config.backbone == SMOLLM {
                &hone_models::lora::LLAMA_TARGETS
            } else {
                &hone_models::lora::BERT_TARGETS
            };
            let mut lora = hone_models::lora::LoraConfig {
                rank: config.lora_rank,
                alpha: config.lora_alpha,
                targets: config.lora_targets.clone(),
            };
            if lora.targets.is_empty() {
                lora.targets = vec![known[0].to_string()];
            }
            lora.check(known)
                .map_err(|(field, message)| StageError::config(field, message))?;
        }
        let device = device(&config.device)?;
        let shape = Shape::new(
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.context,
        );
        let positive = [
            ("members", config.members),
            ("steps", config.steps),
            ("batch_size", config.batch_size),
            ("embed_batch_size", config.embed_batch_size),
        ];
        check_shape(shape, &positive, config.eval_fraction)
            .map_err(|(field, message)| StageError::config(field, message))?;
        if !(0.0..0.5).contains(&config.label_smoothing) {
            return Err(StageError::config(
                "label_smoothing",
                format!("must be in [0, 0.5), found {}", config.label_smoothing),
            ));
        }
        if config.lr.is_nan() || config.lr <= 0.0 {
            return Err(StageError::config(
                "lr",
                format!("must be > 0, found {}", config.lr),
            ));
        }
        if config.min_lr < 0.0 {
            return Err(StageError::config(
                "min_lr",
                format!("must be >= 0, found {}", config.min_lr),
            ));
        }
        if config.lora_rank > 0 && config.backbone == GPT_BACKBONE {
            return Err(StageError::config(
                "lora_rank",
                "LoRA adapts the top layers of a pretrained backbone: set backbone = \"all-minilm-l6-v2\" \
                 or \"smollm2-135m-instruct\" (a gpt reward model trains whole)",
            ));
        }
        if config.train_layers > 0 && config.backbone == GPT_BACKBONE {
            return Err(StageError::config(
                "train_layers",
                "fine-tunes the top layers of a pretrained backbone: set backbone = \"all-minilm-l6-v2\" \
                 or \"smollm2-135m-instruct\" (a gpt reward model trains whole)",
            ));
        }
        if config.train_layers == 0 && config.backbone == SMOLLM {
            return Err(StageError::config(
                "train_layers",
                format!(
                    "a {SMOLLM} reward model fine-tunes its top layers with the head: set train_layers \
                     to 1 or more (2 to 4 fit two cores)"
                ),
            ));
        }
        if config.backbone != GPT_BACKBONE && config.init != "scratch" {
            return Err(StageError::config(
                "init",
                format!(
                    "backbone = \"{}\" starts from its pretrained weights and a fresh head: init must be \
                     \"scratch\" (the head from init_seed), found \"{}\"",
                    config.backbone, config.init
                ),
            ));
        }
        let lrs = config.lrs.clone().unwrap_or_else(|| vec![config.lr]);
        if lrs.is_empty() || lrs.iter().any(|lr| lr.is_nan() || *lr <= 0.0) {
            return Err(StageError::config(
                "lrs",
                format!("must be a non-empty list of learning rates > 0, found {lrs:?} (leave it unset to use lr)"),
            ));
        }
        if config.dropouts.is_empty() || config.dropouts.iter().any(|d| !(0.0..1.0).contains(d)) {
            return Err(StageError::config(
                "dropouts",
                format!(
                    "must be a non-empty list of probabilities in [0, 1), found {:?}",
                    config.dropouts
                ),
            ));
        }
        let scoring = Scoring::new(device.clone(), config.embed_batch_size);
        Ok(Train {
            config,
            lrs,
            device,
            scoring,
            input: RoundInput::default(),
            policies: Vec::new(),
            pool: BTreeMap::new(),
            last: BTreeMap::new(),
        })
    }
}

impl Stage for Train {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(&mut self.input)
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        let pool: Vec<&PreferencePair> = self.pool.values().collect();
        hone_sdk::snapshot::encode("rm.train", &(&self.policies, pool, &self.last)).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        // The init policies seen, the label pool, and each member's last
        // model: the weights themselves are its registered artifacts.
        let (policies, pool, last): TrainState =
            hone_sdk::snapshot::decode("rm.train", round, snapshot)?;
        self.policies = policies;
        self.pool = pool.into_iter().map(|p| (pool_key(&p), p)).collect();
        self.last = last;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.input.take();
        self.policies
            .extend(input.artifacts(1, ArtifactKind::Policy, "init")?);
        let mut pairs = input.pairs_by_id(0);
        ctx.metric("pairs", pairs.len() as f64);
        if self.config.train_on == "all" {
            if pairs.is_empty() {
                // Nothing new: the pool's models of the round before stand.
                return Ok(());
            }
            for p in pairs {
                self.pool.insert(pool_key(&p), p);
            }
            pairs = self.pool.values().cloned().collect();
            ctx.metric("pool", pairs.len() as f64);
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let members = ctx.init().members.clone();
        if members.is_empty() {
            return Ok(());
        }
        if self.config.backbone != GPT_BACKBONE && self.config.train_layers > 0 {
            let cache = self.frozen_pairs(ctx, &pairs)?;
            for member in members {
                self.train_tuned_member(ctx, member, &pairs, &cache)?;
            }
            return Ok(());
        }
        if self.config.backbone != GPT_BACKBONE {
            let cache = self.embed_pairs(ctx, &pairs)?;
            for member in members {
                self.train_head_member(ctx, member, &pairs, &cache)?;
            }
            return Ok(());
        }
        let inits = self.init_checkpoints()?;
        for member in members {
            self.train_member(ctx, member, &pairs, &inits)?;
        }
        Ok(())
    }
}

/// Where a member's weights start.
#[derive(Clone)]
enum InitFrom {
    Scratch(GptConfig),
    Policy(ArtifactRef),
}

/// A freshly initialised member and what it needs besides the weights.
struct Built {
    rm: RewardModel,
    varmap: VarMap,
    cfg: GptConfig,
    tok: Box<dyn Tokenizer>,
    /// The lineage root.
    root: String,
    /// Human description of the initialisation.
    desc: String,
}

/// One pair, encoded: token ids (GPT) or the one row of its text in the
/// embedding cache (pretrained backbone).
struct Example {
    id: String,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    margin: f32,
    weight: f32,
    smoothing: f32,
}

/// The step of a checkpoint, the final model (no step) after every
/// numbered one.
fn checkpoint_step(a: &ArtifactRef) -> u64 {
    a.step.unwrap_or(u64::MAX)
}

/// The SFT trajectory of a policy artifact: its stage and round (`sft@0`).
pub(crate) fn trajectory(a: &ArtifactRef) -> String {
    format!("{}@{}", a.stage, a.round)
}

impl Train {
    /// The shared-initialisation seed.
    fn init_seed(&self, ctx: &Context) -> u64 {
        seeded_hash(
            ctx.init().seed,
            &format!("rm.train:init:{}", self.config.init_seed),
        )
    }

    /// The ensemble seed, from which member seeds and the hold-out derive.
    fn base_seed(&self, ctx: &Context) -> u64 {
        seeded_hash(ctx.init().seed, &format!("rm.train:{}", self.config.seed))
    }

    /// The checkpoints members start from, in order (empty for scratch):
    /// the policy artifacts of the newest round seen, by step.
    fn init_checkpoints(&self) -> Result<Vec<ArtifactRef>, StageError> {
        if self.config.init == "scratch" {
            return Ok(Vec::new());
        }
        let Some(round) = self.policies.iter().map(|a| a.round).max() else {
            return Err(StageError::new(
                "init = \"input\" but no policy artifact arrived on the `init` port: connect it to a policy \
                 source (inputs = { pairs = \"...\", init = \"sft.policy\" }) or set init = \"scratch\"",
            ));
        };
        let mut policies: Vec<ArtifactRef> = self
            .policies
            .iter()
            .filter(|a| a.round == round)
            .cloned()
            .collect();
        policies.sort_by(|a, b| (checkpoint_step(a), &a.id).cmp(&(checkpoint_step(b), &b.id)));
        policies.dedup_by(|a, b| a.id == b.id);
        if self.config.init_checkpoints == "last" {
            policies.drain(..policies.len() - 1);
        }
        Ok(policies)
    }

    fn member_init(&self, member: usize, inits: &[ArtifactRef]) -> InitFrom {
        if inits.is_empty() {
            let c = &self.config;
            return InitFrom::Scratch(GptConfig {
                vocab_size: ByteTokenizer::VOCAB,
                d_model: c.d_model,
                n_layers: c.n_layers,
                n_heads: c.n_heads,
                context: c.context,
            });
        }
        InitFrom::Policy(inits[member % inits.len()].clone())
    }

    /// Builds the reward model: backbone and head from the shared init seed,
    /// then the backbone overwritten by the policy's weights if there is one.
    fn build(&self, ctx: &Context, from: &InitFrom) -> Result<Built, StageError> {
        let init_seed = self.init_seed(ctx);
        let (cfg, tok, root, desc, weights): (
            GptConfig,
            Box<dyn Tokenizer>,
            String,
            String,
            Option<PathBuf>,
        ) = match from {
            InitFrom::Scratch(cfg) => {
                let json = serde_json::to_string(cfg).or_stage("cannot describe the model")?;
                (
                    cfg.clone(),
                    Box::new(ByteTokenizer),
                    format!("scratch:init_seed={init_seed}:{json}"),
                    "scratch".into(),
                    None,
                )
            }
            InitFrom::Policy(a) => {
                let dir = artifact_dir(ctx.init(), a);
                let doing = format!("cannot load init policy {}", a.id);
                let cfg: GptConfig = checkpoint::load_config(&dir).or_stage(&doing)?;
                let tok = load_tokenizer(&dir).or_stage(&doing)?;
                (
                    cfg,
                    tok,
                    trajectory(a),
                    a.id.clone(),
                    Some(dir.join(checkpoint::WEIGHTS)),
                )
            }
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &self.device);
        let rm = RewardModel::new(&cfg, vb).or_stage("cannot build the reward model")?;
        init_seeded(&varmap, init_seed).or_stage("cannot initialise the reward model")?;
        if let Some(file) = weights {
            // The policy has no reward head: that stays from the init seed.
            let doing = format!("cannot load init weights {}", file.display());
            set_weights(&varmap, &file, &self.device, &doing, |n| {
                !n.starts_with("reward_head.")
            })?;
        }
        Ok(Built {
            rm,
            varmap,
            cfg,
            tok,
            root,
            desc,
        })
    }

    /// A member's seed, learning rate and dropout.
    fn member_setup(&self, ctx: &Context, member: usize) -> (u64, f64, f64) {
        let c = &self.config;
        let seed = seeded_hash(self.base_seed(ctx), &format!("member{member}"));
        (
            seed,
            self.lrs[member % self.lrs.len()],
            c.dropouts[member % c.dropouts.len()],
        )
    }

    /// One pair as an example, its texts encoded by `encode_text`, its
    /// weight multiplied by `factor`.
    fn example(
        &self,
        p: &PreferencePair,
        factor: f64,
        encode_text: &dyn Fn(&str, &str) -> Vec<u32>,
    ) -> Example {
        let c = &self.config;
        Example {
            id: p.id.clone(),
            chosen: encode_text(&p.prompt, &p.chosen),
            rejected: encode_text(&p.prompt, &p.rejected),
            margin: (c.margin_scale * p.margin) as f32,
            weight: (p.weight * factor) as f32,
            smoothing: p.label_smoothing.unwrap_or(c.label_smoothing) as f32,
        }
    }

    /// The seeded hold-out (the same for all members) and the training
    /// examples, length- and source-balanced if configured; all pairs train when too
    /// few remain.
    fn split(
        &self,
        ctx: &mut Context,
        pairs: &[PreferencePair],
        encode_text: &dyn Fn(&str, &str) -> Vec<u32>,
    ) -> (Vec<Example>, Vec<Example>) {
        let base = self.base_seed(ctx);
        let holdout = |p: &PreferencePair| {
            seeded_unit(base, &format!("holdout:{}", p.id)) < self.config.eval_fraction
        };
        let (e, t): (Vec<&PreferencePair>, Vec<&PreferencePair>) =
            pairs.iter().partition(|p| holdout(p));
        let eval: Vec<Example> = e
            .into_iter()
            .map(|p| self.example(p, 1.0, encode_text))
            .collect();
        // Too few pairs to hold any out: train on the held-out ones.
        let t = if t.is_empty() {
            pairs.iter().collect()
        } else {
            t
        };
        let mut factors = if self.config.length_balance {
            let (factors, lines) = length_balance::length_balance(&t);
            for line in lines {
                ctx.log(line);
            }
            factors
        } else {
            vec![1.0; t.len()]
        };
        if self.config.source_balance {
            let weights: Vec<f64> = t.iter().zip(&factors).map(|(p, f)| p.weight * f).collect();
            let (more, lines) = source_balance::source_balance(&t, &weights);
            for line in lines {
                ctx.log(line);
            }
            factors.iter_mut().zip(more).for_each(|(f, m)| *f *= m);
        }
        let train = t
            .into_iter()
            .zip(factors)
            .map(|(p, f)| self.example(p, f, encode_text))
            .collect();
        (eval, train)
    }

    fn train_member(
        &mut self,
        ctx: &mut Context,
        member: usize,
        pairs: &[PreferencePair],
        inits: &[ArtifactRef],
    ) -> Result<(), StageError> {
        let (seed, lr, dropout) = self.member_setup(ctx, member);
        let from = self.member_init(member, inits);
        let Built {
            rm,
            varmap,
            cfg,
            tok,
            root,
            desc: init_desc,
        } = self.build(ctx, &from)?;
        let continued = self.continue_last(ctx, member, &varmap)?;
        let init_desc = continued
            .as_ref()
            .map_or(init_desc, |id| format!("continued from {id}"));
        let encode_text = |p: &str, r: &str| encode(tok.as_ref(), p, r, cfg.context);
        let (eval, train) = self.split(ctx, pairs, &encode_text);
        let net = Net::Gpt {
            rm: &rm,
            pad: tok.pad_id(),
        };
        self.fit(
            ctx,
            member,
            (seed, lr, dropout),
            &net,
            &varmap,
            (&train, &eval),
            &init_desc,
        )?;
        let dir = self.member_dir(ctx, member)?;
        let meta = RewardMeta {
            backbone: GPT_BACKBONE.into(),
            lineage_root: root.clone(),
            init: init_desc.clone(),
            member,
            seed,
            lr,
            dropout,
            steps: self.config.steps,
            merged_from: Vec::new(),
            weights: Vec::new(),
        };
        save_reward_model(&dir, &varmap, &cfg, tok.as_ref(), &meta)
            .or_stage(&format!("cannot write reward model {}", dir.display()))?;
        let mut inputs = match &from {
            InitFrom::Policy(a) => vec![a.id.clone()],
            InitFrom::Scratch(_) => Vec::new(),
        };
        inputs.extend(continued);
        self.emit(ctx, &dir, inputs, &meta)
    }

    /// Embeds every distinct (prompt, response) of the pairs once with the
    /// frozen backbone: the rows, and each text's row index.
    fn embed_pairs(
        &mut self,
        ctx: &mut Context,
        pairs: &[PreferencePair],
    ) -> Result<EmbeddingCache, StageError> {
        let (index, items) = distinct_texts(pairs);
        let start = std::time::Instant::now();
        let every = (items.len() / 20).max(1);
        let mut next = every;
        let rows = {
            let mut progress = |done: usize, total: usize| {
                if done >= next || done == total {
                    ctx.progress("embed", done as u64, total as u64);
                    next = done + every;
                }
            };
            self.scoring.embed(&items, &mut progress)?
        };
        let hidden = rows.first().map_or(0, |r| r.len());
        ctx.log(format!(
            "embedded {} distinct texts of {} pairs with {} in {:.1} s",
            items.len(),
            pairs.len(),
            self.config.backbone,
            start.elapsed().as_secs_f64()
        ));
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let n = flat.len() / hidden.max(1);
        let embeddings = Tensor::from_vec(flat, (n, hidden), &self.device)
            .or_stage("cannot hold the embeddings")?;
        Ok(EmbeddingCache { embeddings, index })
    }

    /// Trains member `member`'s head on the cached embeddings.
    fn train_head_member(
        &mut self,
        ctx: &mut Context,
        member: usize,
        pairs: &[PreferencePair],
        cache: &EmbeddingCache,
    ) -> Result<(), StageError> {
        let (seed, lr, dropout) = self.member_setup(ctx, member);
        let init_seed = self.init_seed(ctx);
        let backbone = self.config.backbone.clone();
        let (head, varmap, hidden) = {
            let model = self.scoring.minilm()?;
            let (head, varmap) = model
                .new_head(init_seed)
                .or_stage("cannot build the reward head")?;
            (head, varmap, model.hidden_size())
        };
        let root = format!("{backbone}:init_seed={init_seed}");
        let continued = self.continue_last(ctx, member, &varmap)?;
        let init_desc = continued
            .as_ref()
            .map_or(backbone.clone(), |id| format!("continued from {id}"));
        let encode_text = |p: &str, r: &str| vec![cache.index[&(p.to_string(), r.to_string())]];
        let (eval, train) = self.split(ctx, pairs, &encode_text);
        let net = Net::Head {
            head: &head,
            embeddings: &cache.embeddings,
        };
        self.fit(
            ctx,
            member,
            (seed, lr, dropout),
            &net,
            &varmap,
            (&train, &eval),
            &init_desc,
        )?;
        let dir = self.member_dir(ctx, member)?;
        let meta = RewardMeta {
            backbone: backbone.clone(),
            lineage_root: root,
            init: init_desc,
            member,
            seed,
            lr,
            dropout,
            steps: self.config.steps,
            merged_from: Vec::new(),
            weights: Vec::new(),
        };
        let config = PretrainedConfig {
            pretrained: backbone,
            hidden_size: hidden,
            train_layers: 0,
            max_tokens: 0,
        };
        save_head_reward_model(&dir, &varmap, &config, &meta)
            .or_stage(&format!("cannot write reward model {}", dir.display()))?;
        self.emit(ctx, &dir, continued.into_iter().collect(), &meta)
    }

    /// The frozen layers' states of every distinct (prompt, response) of the
    /// pairs, computed once for all members.
    fn frozen_pairs(
        &mut self,
        ctx: &mut Context,
        pairs: &[PreferencePair],
    ) -> Result<FrozenCache, StageError> {
        let backbone = self.config.backbone.clone();
        let layers = self
            .scoring
            .frozen(&backbone, self.config.max_tokens)?
            .num_layers();
        if self.config.train_layers > layers {
            return Err(StageError::config(
                "train_layers",
                format!(
                    "{backbone} has {layers} transformer layers, so at most {layers} can be fine-tuned, not {}",
                    self.config.train_layers
                ),
            ));
        }
        let split = layers - self.config.train_layers;
        let (index, items) = distinct_texts(pairs);
        let start = std::time::Instant::now();
        let max_tokens = self.config.max_tokens;
        let states = {
            let mut progress = |done: usize, total: usize| {
                ctx.progress("frozen layers", done as u64, total as u64);
            };
            self.scoring
                .frozen_states(&items, split, (&backbone, max_tokens), &mut progress)?
        };
        let tokens: usize = states.iter().map(|t| t.dim(0).unwrap_or(0)).sum();
        ctx.log(format!(
            "ran {backbone}'s frozen layers 0..{split} once over {} distinct texts of {} pairs ({tokens} tokens, \
             at most {max_tokens} a text) in {:.1} s",
            items.len(),
            pairs.len(),
            start.elapsed().as_secs_f64()
        ));
        Ok(FrozenCache {
            states,
            index,
            split,
        })
    }

    /// Trains member `member`'s top layers and head on the frozen states.
    fn train_tuned_member(
        &mut self,
        ctx: &mut Context,
        member: usize,
        pairs: &[PreferencePair],
        cache: &FrozenCache,
    ) -> Result<(), StageError> {
        let (seed, lr, dropout) = self.member_setup(ctx, member);
        let init_seed = self.init_seed(ctx);
        let backbone = self.config.backbone.clone();
        let (mut top, all) = self
            .scoring
            .frozen(&backbone, self.config.max_tokens)?
            .copy(&HashMap::new(), cache.split)?;
        let hidden = top.hidden_size();
        let (head, head_vars) =
            hone_pretrained::minilm::seeded_head(hidden, init_seed, &self.device)
                .or_stage("cannot build the reward head")?;
        let lora = self.lora();
        // The adapters start from the shared init seed too: WARM's members
        // share their whole initialisation.
        let adapters = match &lora {
            None => Vec::new(),
            Some(l) => top
                .add_lora(l, cache.split, init_seed)
                .or_stage("cannot add LoRA adapters")?,
        };
        // What the optimiser sees: the head and the top layers (the same
        // variables the encoder copy computes with), or the head and the
        // LoRA adapters on them.
        let trainable = VarMap::new();
        {
            let mut data = trainable.data().lock().expect("VarMap lock");
            for (name, var) in head_vars.data().lock().expect("VarMap lock").iter() {
                data.insert(name.clone(), var.clone());
            }
            let trained = if lora.is_some() {
                adapters
            } else {
                top.trained_vars(&all, cache.split)
            };
            for (name, var) in trained {
                data.insert(name, var);
            }
        }
        let mut root = format!(
            "{backbone}:init_seed={init_seed}:train_layers={}:max_tokens={}",
            self.config.train_layers, self.config.max_tokens
        );
        let mut tuned = format!("{backbone}, top {} layers tuned", self.config.train_layers);
        if let Some(l) = &lora {
            root.push_str(&format!(
                ":lora_rank={}:lora_alpha={}:lora_targets={}",
                l.rank,
                l.alpha,
                l.targets.join(",")
            ));
            tuned = format!(
                "{backbone}, LoRA rank {} on the top {} layers, merged",
                l.rank, self.config.train_layers
            );
        }
        let continued = self.continue_last(ctx, member, &trainable)?;
        let init_desc = continued
            .as_ref()
            .map_or(tuned, |id| format!("continued from {id}"));
        let encode_text = |p: &str, r: &str| vec![cache.index[&(p.to_string(), r.to_string())]];
        let (eval, train) = self.split(ctx, pairs, &encode_text);
        let net = Net::Tuned {
            top: top.as_ref(),
            head: &head,
            states: &cache.states,
            split: cache.split,
        };
        self.fit(
            ctx,
            member,
            (seed, lr, dropout),
            &net,
            &trainable,
            (&train, &eval),
            &init_desc,
        )?;
        let dir = self.member_dir(ctx, member)?;
        let meta = RewardMeta {
            backbone: backbone.clone(),
            lineage_root: root,
            init: init_desc,
            member,
            seed,
            lr,
            dropout,
            steps: self.config.steps,
            merged_from: Vec::new(),
            weights: Vec::new(),
        };
        let config = PretrainedConfig {
            pretrained: backbone,
            hidden_size: hidden,
            train_layers: self.config.train_layers,
            max_tokens: self.config.max_tokens,
        };
        // With LoRA the checkpoint holds what it holds without: the head and
        // the top layers' weights, the adapted ones merged, so it loads,
        // scores and averages (WARM: the mean of merged weights, so of the
        // updates) like any partly fine-tuned model.
        let saved = if lora.is_some() {
            let merged: HashMap<String, Tensor> = top
                .merged_weights()
                .or_stage("cannot merge the LoRA adapters")?
                .into_iter()
                .collect();
            let saved = VarMap::new();
            {
                let mut data = saved.data().lock().expect("VarMap lock");
                for (name, var) in head_vars.data().lock().expect("VarMap lock").iter() {
                    data.insert(name.clone(), var.clone());
                }
                let mut merged = merged;
                for (name, var) in top.trained_vars(&all, cache.split) {
                    let var = match merged.remove(&name) {
                        Some(w) => candle_core::Var::from_tensor(&w)
                            .or_stage("cannot merge the LoRA adapters")?,
                        None => var,
                    };
                    data.insert(name, var);
                }
                // Every merged weight must replace one the checkpoint holds;
                // one left over would be an update silently lost.
                if !merged.is_empty() {
                    let left: Vec<&String> = merged.keys().collect();
                    return Err(StageError::new(format!(
                        "merged LoRA weights {left:?} are not among the top layers' tensors (a bug: please report it)"
                    )));
                }
            }
            saved
        } else {
            trainable
        };
        save_head_reward_model(&dir, &saved, &config, &meta)
            .or_stage(&format!("cannot write reward model {}", dir.display()))?;
        drop(all);
        self.emit(ctx, &dir, continued.into_iter().collect(), &meta)
    }

    /// The LoRA settings, if `lora_rank` asks for adapters (empty targets:
    /// the backbone's default, chosen where the adapters are added).
    fn lora(&self) -> Option<hone_models::lora::LoraConfig> {
        let c = &self.config;
        // The default resolved here, so that the lineage root names the
        // projections whether they were given or not.
        let targets = match (c.lora_targets.is_empty(), c.backbone == SMOLLM) {
            (false, _) => c.lora_targets.clone(),
            (true, true) => vec!["q_proj".into(), "v_proj".into()],
            (true, false) => vec!["attention.self.query".into(), "attention.self.value".into()],
        };
        (c.lora_rank > 0).then_some(hone_models::lora::LoraConfig {
            rank: c.lora_rank,
            alpha: c.lora_alpha,
            targets,
        })
    }

    /// With start = "last", overwrites a freshly built member's weights with
    /// its own of the round before; the id of that model, if it did.
    fn continue_last(
        &self,
        ctx: &Context,
        member: usize,
        varmap: &VarMap,
    ) -> Result<Option<String>, StageError> {
        if self.config.start != "last" {
            return Ok(None);
        }
        let Some((id, path)) = self.last.get(&member) else {
            return Ok(None);
        };
        let file = ctx.init().run_dir.join(path);
        let doing = format!(
            "cannot continue member {member} from {id} ({})",
            file.display()
        );
        set_weights(varmap, &file, &self.device, &doing, |_| true)?;
        Ok(Some(id.clone()))
    }

    /// Where member `member`'s checkpoint goes.
    fn member_dir(&self, ctx: &Context, member: usize) -> Result<PathBuf, StageError> {
        Ok(ctx.output_dir()?.join(format!("member-{member}")))
    }

    /// Registers and emits a saved member.
    fn emit(
        &mut self,
        ctx: &mut Context,
        dir: &std::path::Path,
        inputs: Vec<String>,
        meta: &RewardMeta,
    ) -> Result<(), StageError> {
        let lineage = vec![
            format!("shared init: {}", meta.lineage_root),
            format!(
                "rm.train member {}: seed {}, lr {}, dropout {}, init {}",
                meta.member, meta.seed, meta.lr, meta.dropout, meta.init
            ),
        ];
        let at = Checkpoint {
            step: None,
            member: Some(meta.member as u64),
        };
        let artifact = ctx.register_checkpoint(
            REWARD_MODEL,
            &dir.join(checkpoint::WEIGHTS),
            at,
            inputs,
            lineage,
        )?;
        self.last
            .insert(meta.member, (artifact.id.clone(), artifact.path.clone()));
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }
}

/// Each distinct (prompt, response)'s row in a round's cache.
type TextIndex = HashMap<(String, String), u32>;

/// Every distinct (prompt, response) of the pairs, in first-seen order, and
/// each one's index: what a pretrained backbone runs once per round.
fn distinct_texts(pairs: &[PreferencePair]) -> (TextIndex, Vec<(&str, &str)>) {
    let mut index = TextIndex::new();
    let mut items: Vec<(&str, &str)> = Vec::new();
    for p in pairs {
        for r in [&p.chosen, &p.rejected] {
            let key = (p.prompt.clone(), r.clone());
            if let std::collections::hash_map::Entry::Vacant(e) = index.entry(key) {
                e.insert(items.len() as u32);
                items.push((&p.prompt, r));
            }
        }
    }
    (index, items)
}

/// The frozen layers' output for the round's texts (partial fine-tuning).
struct FrozenCache {
    /// One [len, hidden] tensor a distinct text.
    states: Vec<Tensor>,
    /// Each (prompt, response)'s index.
    index: HashMap<(String, String), u32>,
    /// The first trained layer.
    split: usize,
}

/// The pretrained backbone's embeddings of the round's texts.
struct EmbeddingCache {
    /// `(texts, hidden)`, on the training device.
    embeddings: Tensor,
    /// Each (prompt, response)'s row.
    index: HashMap<(String, String), u32>,
}
