//! `rm.warm`: weight-averaged reward models (WARM, Ramé et al. 2024).

use crate::merge::{merge, MergeError};
use crate::model::{load_rm_dir, HeadRm, Rm, Scoring};
use crate::{accuracy, artifact_dir, device, load_rm, Models, OrStageError, REWARD_MODEL};
use hone_models::checkpoint;
use hone_models::gpt::GptConfig;
use hone_models::heads::RewardModel;
use hone_models::reward::{load_meta, save_meta, LoadedRm, PretrainedConfig, RewardMeta};
use hone_models::{DType, Device, Tensor, VarBuilder, VarMap};
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmConfig {
    weights: Option<Vec<f64>>,
    scan: bool,
    scan_points: usize,
    truth: String,
    batch_size: usize,
    device: String,
}

/// Averages the weights of reward models fine-tuned from one initialisation.
pub struct Warm {
    config: WarmConfig,
    device: Device,
    /// Scores with the models; holds a pretrained backbone once for all heads.
    scoring: Scoring,
    models: Models,
    /// The members of the last merge: a later round that brings no new
    /// members and no pairs to evaluate merges nothing again (their average
    /// is already out, and rm.score keeps it).
    merged: Option<Vec<ArtifactRef>>,
}

impl StageFactory for Warm {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "rm.warm",
            "Weight-averages the reward-model artifacts of the newest round seen (WARM) into one reward model, \
             streaming one member at a time; refuses members whose model config, tensors or shared \
             initialisation (reward.json backbone and lineage_root) differ. With pairs connected, reports accuracy/member{i}, \
             accuracy/warm and accuracy/ensemble (mean reward), and with scan = true interp_accuracy at step \
             round(100 alpha) along the line between the first two members.",
        )
        .input("models", RecordKind::Artifact(ArtifactKind::RewardModel))
        .input("pairs", RecordKind::PreferencePair)
        .output("model", RecordKind::Artifact(ArtifactKind::RewardModel))
        .placement(Placement::Single)
        .optional(
            "weights",
            FieldType::List(Box::new(FieldType::Float)),
            serde_json::Value::Null,
            "Per-member weights in artifact-id order, normalised to sum to 1; unset = uniform.",
        )
        .optional("scan", FieldType::Bool, false, "Scan the linear interpolation between the first two members (by id) on the pairs.")
        .optional("scan_points", FieldType::unsigned().at_most(100_000), 11, "Points of the scan, alpha = 0..1 inclusive.")
        .optional(
            "truth",
            FieldType::one_of(&["label", "gold"]),
            "label",
            "What accuracy is measured against: the pair's label (chosen is better), or the gold reward in meta \
             gold_chosen / gold_rejected (ties skipped).",
        )
        .optional("batch_size", FieldType::positive().at_most(1 << 20), 32, "Sequences per forward pass when scoring pairs.")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N` (for scoring; the merge runs on the CPU).")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: WarmConfig = init.config()?;
        let device = device(&config.device)?;
        if let Some(w) = &config.weights {
            if w.is_empty()
                || w.iter().any(|x| !x.is_finite() || *x < 0.0)
                || w.iter().sum::<f64>() <= 0.0
            {
                return Err(StageError::config(
                    "weights",
                    format!("must be non-negative numbers with a positive sum, one per member, found {w:?}"),
                ));
            }
        }
        if config.scan && config.scan_points < 2 {
            return Err(StageError::config(
                "scan_points",
                "must be at least 2 (alpha = 0 and 1)",
            ));
        }
        if config.batch_size == 0 {
            return Err(StageError::config("batch_size", "must be at least 1"));
        }
        let scoring = Scoring::new(device.clone(), config.batch_size);
        Ok(Warm {
            config,
            device,
            scoring,
            models: Models::default(),
            merged: None,
        })
    }
}

impl Stage for Warm {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(self.models.buffer())
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("rm.warm", &(self.models.state(), &self.merged)).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        // What was merged last decides whether the next round merges again.
        let (seen, merged) = hone_sdk::snapshot::decode("rm.warm", round, snapshot)?;
        self.models.restore(seen);
        self.merged = merged;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.models.take_round()?;
        let mut pairs = input.pairs(1);
        pairs.sort_by(|a, b| a.id.cmp(&b.id));
        let models = self.models.newest();
        ctx.metric("models", models.len() as f64);
        if models.is_empty() || (pairs.is_empty() && self.merged.as_ref() == Some(&models)) {
            return Ok(());
        }
        let n = models.len();
        let weights = match &self.config.weights {
            None => vec![1.0 / n as f64; n],
            Some(w) if w.len() != n => {
                return Err(StageError::config(
                    "weights",
                    format!(
                    "{} weights for {n} reward models ({}): give one per member or leave it unset",
                    w.len(),
                    ids(&models)
                ),
                ))
            }
            Some(w) => {
                let total: f64 = w.iter().sum();
                w.iter().map(|x| x / total).collect()
            }
        };
        let root = check_compatible(ctx.init(), &models)?;
        let dir = ctx.output_dir()?.join("warm");
        let inputs: Vec<PathBuf> = models
            .iter()
            .map(|m| ctx.init().run_dir.join(&m.path))
            .collect();
        let out = dir.join(checkpoint::WEIGHTS);
        let stats = merge(&inputs, &weights, &out).map_err(|e| match e {
            MergeError::Mismatch { other, what } => StageError::new(format!(
                "cannot merge {} and {}: {what}; WARM averages reward models of one architecture fine-tuned \
                 from one shared initialisation",
                models[0].id, models[other].id
            )),
            MergeError::Other(msg) => StageError::new(format!("cannot merge {}: {msg}", ids(&models))),
        })?;
        // config.json, tokenizer.json (GPT only) and reward.json beside the
        // weights.
        let first = artifact_dir(ctx.init(), &models[0]);
        let first_meta = load_meta(&first).or_stage("cannot read the member metadata")?;
        let config: serde_json::Value =
            checkpoint::load_config(&first).or_stage("cannot read the member config")?;
        let json = serde_json::to_vec_pretty(&config).or_stage("cannot write config.json")?;
        hone_sdk::fs::atomic_write(&dir.join(checkpoint::CONFIG), &json)?;
        if first_meta.is_gpt() {
            let tok = hone_models::tokenizer::load_tokenizer(&first)
                .or_stage("cannot read the member tokenizer")?;
            tok.save(&dir).or_stage("cannot write tokenizer.json")?;
        }
        let meta = RewardMeta {
            backbone: first_meta.backbone.clone(),
            lineage_root: root.clone(),
            init: first_meta.init.clone(),
            member: 0,
            seed: 0,
            lr: 0.0,
            dropout: 0.0,
            steps: first_meta.steps,
            merged_from: models.iter().map(|m| m.id.clone()).collect(),
            weights: weights.clone(),
        };
        save_meta(&dir, &meta).or_stage("cannot write reward.json")?;
        ctx.log(format!(
            "merged {} reward models ({} tensors, {} parameters each) with weights {:?}",
            stats.members, stats.tensors, stats.parameters, weights
        ));
        ctx.metric("parameters", stats.parameters as f64);
        let lineage = vec![
            format!("shared init: {root}"),
            format!(
                "rm.warm: weight average of {} ({})",
                ids(&models),
                fmt_weights(&weights)
            ),
        ];
        let artifact =
            ctx.register_artifact(REWARD_MODEL, &out, meta.merged_from.clone(), lineage)?;
        ctx.emit(0, Record::Artifact(artifact));
        if !pairs.is_empty() {
            self.evaluate(ctx, &models, &dir, &pairs)?;
        }
        self.merged = Some(models);
        Ok(())
    }
}

fn ids(models: &[ArtifactRef]) -> String {
    models
        .iter()
        .map(|m| m.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_weights(w: &[f64]) -> String {
    w.iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that every member has the first's backbone, model config and
/// lineage root; returns the root.
fn check_compatible(init: &StageInit, models: &[ArtifactRef]) -> Result<String, StageError> {
    let read = |m: &ArtifactRef| -> Result<(serde_json::Value, RewardMeta), StageError> {
        let dir = artifact_dir(init, m);
        let doing = format!("cannot read reward model {}", m.id);
        Ok((
            checkpoint::load_config(&dir).or_stage(&doing)?,
            load_meta(&dir).or_stage(&doing)?,
        ))
    };
    let (cfg0, meta0) = read(&models[0])?;
    for m in &models[1..] {
        let (cfg, meta) = read(m)?;
        if meta.backbone != meta0.backbone {
            return Err(StageError::new(format!(
                "cannot merge {} and {}: their backbones differ ({} vs {}); WARM averages the weights of reward \
                 models of one backbone fine-tuned from one shared initialisation, and a {} reward model cannot \
                 be averaged with a {} one — merge each backbone's members in its own rm.warm stage",
                models[0].id, m.id, meta0.backbone, meta.backbone, meta0.backbone, meta.backbone
            )));
        }
        if cfg != cfg0 {
            return Err(StageError::new(format!(
                "cannot merge {} and {}: their model configs differ ({} vs {}); WARM averages reward models of \
                 one architecture fine-tuned from one shared initialisation",
                models[0].id, m.id, cfg0, cfg
            )));
        }
        if meta.lineage_root != meta0.lineage_root {
            return Err(StageError::new(format!(
                "cannot merge {} and {}: they do not share an initialisation ({} vs {}); WARM averages reward \
                 models fine-tuned from one shared initialisation — train them with one rm.train stage (scratch \
                 or a pretrained backbone with one init_seed, or init = \"input\" from the checkpoints of one \
                 lm.sft run)",
                models[0].id, m.id, meta0.lineage_root, meta.lineage_root
            )));
        }
    }
    Ok(meta0.lineage_root)
}

impl Warm {
    /// Accuracies of the members, the ensemble, the WARM model and the scan.
    fn evaluate(
        &mut self,
        ctx: &mut Context,
        models: &[ArtifactRef],
        warm_dir: &std::path::Path,
        pairs: &[PreferencePair],
    ) -> Result<(), StageError> {
        let gold = self.config.truth == "gold";
        let n = models.len() as f64;
        let mut ensemble = vec![(0.0, 0.0); pairs.len()];
        for (i, m) in models.iter().enumerate() {
            let rm = load_rm(ctx.init(), m, &self.device)?;
            let r = self.scoring.pair_rewards(&rm, pairs)?;
            for (e, (c, x)) in ensemble.iter_mut().zip(&r) {
                e.0 += c / n;
                e.1 += x / n;
            }
            if let Some(a) = accuracy(pairs, &r, gold) {
                ctx.metric(&format!("accuracy/member{i}"), a);
            }
        }
        if let Some(a) = accuracy(pairs, &ensemble, gold) {
            ctx.metric("accuracy/ensemble", a);
        }
        let warm = load_rm_dir(warm_dir, &self.device)
            .map_err(|e| StageError::new(format!("cannot load the merged reward model: {e}")))?;
        let r = self.scoring.pair_rewards(&warm, pairs)?;
        let warm_acc = accuracy(pairs, &r, gold);
        if let Some(a) = warm_acc {
            ctx.metric("accuracy/warm", a);
        }
        if self.config.scan && models.len() >= 2 {
            self.scan(ctx, &models[..2], pairs, gold)?;
        }
        Ok(())
    }

    /// Accuracy along (1 - alpha) * first + alpha * second.
    fn scan(
        &mut self,
        ctx: &mut Context,
        ends: &[ArtifactRef],
        pairs: &[PreferencePair],
        gold: bool,
    ) -> Result<(), StageError> {
        let load = |m: &ArtifactRef| {
            candle_core::safetensors::load(ctx.init().run_dir.join(&m.path), &self.device)
                .or_stage(&format!("cannot read reward model {}", m.id))
        };
        let (a, b) = (load(&ends[0])?, load(&ends[1])?);
        let first = load_rm(ctx.init(), &ends[0], &self.device)?;
        let points = self.config.scan_points;
        let mut rows = vec![format!("{:>6} {:>9}", "alpha", "accuracy")];
        for k in 0..points {
            let alpha = k as f64 / (points - 1) as f64;
            let mut mix = HashMap::with_capacity(a.len());
            for (name, ta) in &a {
                let tb = b.get(name).ok_or_else(|| {
                    StageError::new(format!("scan: {} has no tensor {name}", ends[1].id))
                })?;
                let t: Tensor = ((ta * (1.0 - alpha)).and_then(|x| x + (tb * alpha)?))
                    .or_stage("scan failed")?;
                mix.insert(name.clone(), t);
            }
            let rm = interpolated(ctx.init(), &ends[0], &first, mix, &self.device)?;
            let scored = self.scoring.pair_rewards(&rm, pairs)?;
            if let Some(acc) = accuracy(pairs, &scored, gold) {
                ctx.metric_at("interp_accuracy", acc, (alpha * 100.0).round() as u64);
                rows.push(format!("{alpha:>6.2} {acc:>9.3}"));
            }
        }
        ctx.log(format!(
            "interpolation {} -> {}\n{}",
            ends[0].id,
            ends[1].id,
            rows.join("\n")
        ));
        Ok(())
    }
}

/// A model shaped like `first` (the member at `end`) with the weights `mix`.
fn interpolated(
    init: &StageInit,
    end: &ArtifactRef,
    first: &Rm,
    mix: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Rm, StageError> {
    let doing = "scan: cannot build the interpolated model";
    match first {
        Rm::Gpt(loaded) => {
            let vb = VarBuilder::from_tensors(mix, DType::F32, device);
            let config: GptConfig = loaded.config.clone();
            let rm = RewardModel::new(&config, vb).or_stage(doing)?;
            let tok =
                hone_models::tokenizer::load_tokenizer(&artifact_dir(init, end)).or_stage(doing)?;
            Ok(Rm::Gpt(LoadedRm {
                rm,
                varmap: VarMap::new(),
                tok,
                meta: loaded.meta.clone(),
                config,
            }))
        }
        Rm::Head(head) => {
            let config: PretrainedConfig = head.config.clone();
            HeadRm::from_tensors(head.meta.clone(), config, &mix)
                .map(Rm::Head)
                .map_err(|e| StageError::new(format!("{doing}: {e}")))
        }
        Rm::Tuned(tuned) => Ok(Rm::Tuned(crate::tuned::TunedRm::new(
            tuned.meta.clone(),
            tuned.config.clone(),
            mix,
        ))),
    }
}
