//! `rm.strength`: preference strength over a reward-model ensemble
//! (Secrets of RLHF II): flip, drop or smooth the pairs the ensemble
//! disagrees with, or give strong pairs a larger margin.

use crate::model::Scoring;
use crate::{device, load_rm, Models};
use hone_models::Device;
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrengthConfig {
    flip_below: Option<f64>,
    ambiguous_below: Option<f64>,
    ambiguous: String,
    smoothing: f64,
    adaptive_margin: f64,
    bin_width: f64,
    group_by_meta: Option<String>,
    batch_size: usize,
    device: String,
}

/// Measures preference strength with an ensemble and applies the policies.
pub struct Strength {
    config: StrengthConfig,
    device: Device,
    /// Scores with the models; holds a pretrained backbone once for all heads.
    scoring: Scoring,
    models: Models,
}

impl StageFactory for Strength {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "rm.strength",
            "Preference strength: for each pair, d_i = r_i(chosen) - r_i(rejected) under each of the newest \
             round's M >= 2 reward models; sets strength_mean and strength_std (population), then applies, in \
             order: flip_below (swap chosen and rejected, meta strength_flipped=true, mean negated), \
             ambiguous_below with ambiguous = keep / drop / smooth (meta smoothing = eps, which rm.train reads), \
             adaptive_margin (margin = scale * max(mean, 0)). Metrics: pairs, flipped, dropped, smoothed, \
             strength_hist/BIN_LOW, negative_mean_share; with world meta `flipped`: injected_flips, \
             injected_flips_in_lowest_decile, injected_flips_in_lowest_quartile, strength_flip_precision; with \
             group_by_meta = KEY: mean_strength/VALUE and pairs/VALUE per value of meta KEY.",
        )
        .input("models", RecordKind::Artifact(ArtifactKind::RewardModel))
        .input("pairs", RecordKind::PreferencePair)
        .output("pairs", RecordKind::PreferencePair)
        .placement(Placement::Single)
        .optional(
            "flip_below",
            FieldType::Float,
            serde_json::Value::Null,
            "If set, pairs whose mean strength is below it have chosen and rejected swapped (likely label errors); unset = never.",
        )
        .optional(
            "ambiguous_below",
            FieldType::Float,
            serde_json::Value::Null,
            "If set, pairs whose absolute mean strength (after flipping) is below it are ambiguous and handled by `ambiguous`.",
        )
        .optional(
            "ambiguous",
            FieldType::one_of(&["keep", "drop", "smooth"]),
            "keep",
            "What happens to ambiguous pairs: kept as they are, dropped, or given `label_smoothing` = smoothing.",
        )
        .optional("smoothing", FieldType::Float, 0.1, "Label-smoothing eps in [0, 0.5) written to ambiguous pairs with ambiguous = \"smooth\".")
        .optional("adaptive_margin", FieldType::Float, 0.0, "Scale of the adaptive margin: margin = scale * max(mean strength, 0); 0 = leave margins alone.")
        .optional("bin_width", FieldType::Float, 0.5, "Width of the strength_hist bins.")
        .optional(
            "group_by_meta",
            FieldType::String,
            serde_json::Value::Null,
            "A meta key (e.g. `annotator_agreement`): report mean_strength/VALUE and pairs/VALUE for each value \
             it takes (pairs without it are left out); unset = no grouping.",
        )
        .optional("batch_size", FieldType::positive().at_most(1 << 20), 32, "Sequences per forward pass (GPT or the pretrained backbone).")
        .optional("device", FieldType::String, "cpu", "`cpu`, `cuda` or `cuda:N`.")
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: StrengthConfig = init.config()?;
        let device = device(&config.device)?;
        if config.bin_width.is_nan() || config.bin_width <= 0.0 {
            return Err(StageError::config(
                "bin_width",
                format!("must be > 0, found {}", config.bin_width),
            ));
        }
        if !(0.0..0.5).contains(&config.smoothing) {
            return Err(StageError::config(
                "smoothing",
                format!("must be in [0, 0.5), found {}", config.smoothing),
            ));
        }
        if config.adaptive_margin < 0.0 {
            return Err(StageError::config(
                "adaptive_margin",
                format!("must be >= 0 (0 = off), found {}", config.adaptive_margin),
            ));
        }
        if let Some(a) = config.ambiguous_below {
            if a < 0.0 {
                return Err(StageError::config(
                    "ambiguous_below",
                    format!("must be >= 0 (it bounds |mean|), found {a}"),
                ));
            }
        }
        if config.batch_size == 0 {
            return Err(StageError::config("batch_size", "must be at least 1"));
        }
        if config
            .group_by_meta
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            return Err(StageError::config(
                "group_by_meta",
                "must name a meta key; leave it unset for no grouping",
            ));
        }
        let scoring = Scoring::new(device.clone(), config.batch_size);
        Ok(Strength {
            config,
            device,
            scoring,
            models: Models::default(),
        })
    }
}

impl Stage for Strength {
    fn round_input(&mut self) -> Option<&mut RoundInput> {
        Some(self.models.buffer())
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("rm.strength", &self.models.state()).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        self.models
            .restore(hone_sdk::snapshot::decode("rm.strength", round, snapshot)?);
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let mut input = self.models.take_round()?;
        let mut pairs = input.pairs(1);
        if pairs.is_empty() {
            ctx.metric("pairs", 0.0);
            return Ok(());
        }
        pairs.sort_by(|a, b| a.id.cmp(&b.id));
        let models = self.models.newest();
        if models.len() < 2 {
            return Err(StageError::new(format!(
                "preference strength needs an ensemble of at least 2 reward models, found {}: connect `models` \
                 to an rm.train stage with members >= 2",
                models.len()
            )));
        }
        let mut diffs: Vec<Vec<f64>> = vec![Vec::with_capacity(models.len()); pairs.len()];
        for m in &models {
            let rm = load_rm(ctx.init(), m, &self.device)?;
            for (d, (c, r)) in diffs
                .iter_mut()
                .zip(self.scoring.pair_rewards(&rm, &pairs)?)
            {
                d.push(c - r);
            }
        }
        let stats: Vec<(f64, f64)> = diffs.iter().map(|d| mean_std(d)).collect();
        let means: Vec<f64> = stats.iter().map(|s| s.0).collect();
        report(
            ctx,
            &pairs,
            &means,
            self.config.bin_width,
            self.config.group_by_meta.as_deref(),
        );
        let c = &self.config;
        let (mut flipped, mut dropped, mut smoothed, mut true_flips) =
            (0usize, 0usize, 0usize, 0usize);
        for (mut p, (mut mean, std)) in pairs.into_iter().zip(stats) {
            if c.flip_below.is_some_and(|t| mean < t) {
                std::mem::swap(&mut p.chosen, &mut p.rejected);
                std::mem::swap(&mut p.chosen_score, &mut p.rejected_score);
                p.meta.insert("strength_flipped".into(), "true".into());
                mean = -mean;
                flipped += 1;
                true_flips += usize::from(p.meta.get("flipped").is_some_and(|f| f == "true"));
            }
            p.strength_mean = Some(mean);
            p.strength_std = Some(std);
            if c.ambiguous_below.is_some_and(|a| mean.abs() < a) {
                match c.ambiguous.as_str() {
                    "drop" => {
                        dropped += 1;
                        continue;
                    }
                    "smooth" => {
                        p.label_smoothing = Some(c.smoothing);
                        smoothed += 1;
                    }
                    _ => {}
                }
            }
            if c.adaptive_margin > 0.0 {
                p.margin = c.adaptive_margin * mean.max(0.0);
            }
            ctx.emit(0, Record::Pair(p));
        }
        ctx.metric("flipped", flipped as f64);
        ctx.metric("dropped", dropped as f64);
        ctx.metric("smoothed", smoothed as f64);
        if flipped > 0 && c.flip_below.is_some() {
            ctx.metric(
                "strength_flip_precision",
                true_flips as f64 / flipped as f64,
            );
        }
        ctx.log(format!(
            "{} models: flipped {flipped}, dropped {dropped}, smoothed {smoothed}",
            models.len()
        ));
        Ok(())
    }
}

/// Mean and population standard deviation.
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// A bin's lower edge as a plain number (`-1.5`, `0`, `0.5`).
pub(crate) fn bin_label(mean: f64, width: f64) -> String {
    let low = (mean / width).floor() * width;
    let low = (low * 1e6).round() / 1e6 + 0.0;
    format!("{low}")
}

/// The metrics that describe the strengths before any policy applies.
fn report(
    ctx: &mut Context,
    pairs: &[PreferencePair],
    means: &[f64],
    bin_width: f64,
    group_by: Option<&str>,
) {
    let n = pairs.len();
    ctx.metric("pairs", n as f64);
    let mut hist: BTreeMap<i64, (String, usize)> = BTreeMap::new();
    for &m in means {
        let key = (m / bin_width).floor() as i64;
        hist.entry(key)
            .or_insert_with(|| (bin_label(m, bin_width), 0))
            .1 += 1;
    }
    for (label, count) in hist.values() {
        ctx.metric(&format!("strength_hist/{label}"), *count as f64);
    }
    let negative = means.iter().filter(|&&m| m < 0.0).count();
    ctx.metric("negative_mean_share", negative as f64 / n as f64);
    // Ground truth from the simulated world: which labels were flipped.
    if pairs.iter().any(|p| p.meta.contains_key("flipped")) {
        let mut rank: Vec<usize> = (0..n).collect();
        rank.sort_by(|&a, &b| means[a].total_cmp(&means[b]).then(a.cmp(&b)));
        let mut position = vec![0usize; n];
        for (r, &i) in rank.iter().enumerate() {
            position[i] = r;
        }
        let injected: Vec<usize> = (0..n)
            .filter(|&i| pairs[i].meta.get("flipped").is_some_and(|f| f == "true"))
            .collect();
        ctx.metric("injected_flips", injected.len() as f64);
        if !injected.is_empty() {
            for (name, share) in [("decile", 0.1), ("quartile", 0.25)] {
                let k = (share * n as f64).ceil() as usize;
                let inside = injected.iter().filter(|&&i| position[i] < k).count();
                ctx.metric(
                    &format!("injected_flips_in_lowest_{name}"),
                    inside as f64 / injected.len() as f64,
                );
            }
        }
    }
    let Some(key) = group_by else {
        return;
    };
    let mut groups: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (p, m) in pairs.iter().zip(means) {
        if let Some(value) = p.meta.get(key) {
            let e = groups.entry(value.as_str()).or_default();
            e.0 += m;
            e.1 += 1;
        }
    }
    let mut rows = vec![format!("{key:>12} {:>7} {:>13}", "pairs", "mean_strength")];
    for (value, (sum, count)) in groups {
        ctx.metric(&format!("mean_strength/{value}"), sum / count as f64);
        ctx.metric(&format!("pairs/{value}"), count as f64);
        rows.push(format!(
            "{value:>12} {count:>7} {:>13.4}",
            sum / count as f64
        ));
    }
    ctx.log(format!("strength by meta {key}\n{}", rows.join("\n")));
}
