//! In-process tests of the rm stages with the SmolLM2-135M-Instruct
//! backbone (fetched into ~/.cache/hone/models on first use): its top layer
//! and a head fine-tuned, scored, and merged by WARM.

use crate::testing::*;
use crate::tests_minilm::{mean, polite_pairs};
use crate::*;
use hone_models::reward::load_meta;
use hone_pretrained::smollm::MODEL_NAME as SMOLLM;
use serde_json::json;

fn smollm_train(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "backbone": SMOLLM, "members": 2, "train_layers": 1, "max_tokens": 48, "steps": 10,
        "batch_size": 8, "lrs": [3e-4, 1e-4], "dropouts": [0.0, 0.1], "min_lr": 1e-5, "warmup": 2,
        "weight_decay": 0.0, "eval_fraction": 0.2, "eval_every": 0, "embed_batch_size": 16,
    });
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn smollm2_gradients_reach_the_trained_top_and_nothing_frozen() {
    use candle_nn::Module;
    let frozen = crate::tuned::Frozen::load(SMOLLM, 48, &hone_models::Device::Cpu).unwrap();
    let split = frozen.num_layers() - 2;
    let states = frozen
        .states(
            &[("Hi?", " Hello there."), ("Hi?", " No.")],
            split,
            2,
            &mut |_, _| {},
        )
        .unwrap();
    assert_ne!(states[0].dim(0).unwrap(), states[1].dim(0).unwrap());
    let (top, vars) = frozen.copy(&Default::default(), split).unwrap();
    let (head, head_vars) =
        hone_pretrained::minilm::seeded_head(top.hidden_size(), 1, &hone_models::Device::Cpu)
            .unwrap();
    let refs: Vec<&hone_models::Tensor> = states.iter().collect();
    let pooled = top.pooled_from(&refs, split).unwrap();
    assert_eq!(pooled.dims(), &[2, 576]);
    let r = head.forward(&pooled).unwrap().squeeze(1).unwrap();
    // Not the difference of the two: the bias would cancel out of it.
    let loss = r.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let trained = top.trained_vars(&vars, split);
    // Two layers of 9 weights each, and the final norm.
    assert_eq!(trained.len(), 2 * 9 + 1);
    let missing = hone_models::train::vars_without_gradient(&vars, &grads).unwrap();
    let names: std::collections::BTreeSet<String> = trained.into_iter().map(|(n, _)| n).collect();
    let all = vars.data().lock().unwrap();
    let mut frozen_names: Vec<String> = all
        .keys()
        .filter(|n| !names.contains(*n))
        .cloned()
        .collect();
    frozen_names.sort();
    assert_eq!(missing, frozen_names);
    drop(all);
    let head_missing = hone_models::train::vars_without_gradient(&head_vars, &grads).unwrap();
    assert!(head_missing.is_empty(), "{head_missing:?}");
    // The pooled state is the last token's, whatever the padding: the
    // shorter text alone gives the same row.
    let alone = top.pooled_from(&refs[1..], split).unwrap();
    let gap = (alone.get(0).unwrap() - pooled.get(1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        gap < 1e-3,
        "padding changed the last token's state by {gap}"
    );
}

#[test]
fn smollm2_members_learn_score_and_merge_with_warm() {
    let dir = temp_run_dir("smollm-rm");
    let pairs = polite_pairs(30);
    let out = run::<Train>(
        "rm",
        &dir,
        smollm_train(json!({})),
        vec![0, 1],
        vec![(0, records(&pairs))],
    )
    .unwrap();
    for m in 0..2 {
        let loss = out.series(&format!("m{m}_train_loss"));
        assert_eq!(loss.len(), 10);
        let (first, last) = (mean(&loss[..3]), mean(&loss[7..]));
        assert!(
            last < first,
            "member {m}: train loss {first} -> {last}: {loss:?}"
        );
    }
    assert!(
        out.logs().iter().any(|l| l.contains("frozen layers 0..29")),
        "{:?}",
        out.logs()
    );
    let member0 = dir.join("outputs/rm/member-0");
    let meta = load_meta(&member0).unwrap();
    assert_eq!(meta.backbone, SMOLLM);
    // The head, layer 29's 9 tensors and the final norm.
    let saved = candle_core::safetensors::load(
        member0.join("model.safetensors"),
        &hone_models::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        saved.len(),
        2 + 9 + 1,
        "{:?}",
        saved.keys().collect::<Vec<_>>()
    );
    assert!(saved.keys().all(|k| k.starts_with("reward_head.")
        || k.starts_with("model.layers.29.")
        || k == "model.norm.weight"));

    let models = out.artifacts(0);
    let score = |stage: &str, models: Vec<ArtifactRef>| {
        let out = run::<Scorer>(
            stage,
            &dir,
            json!({}),
            vec![0],
            vec![
                (0, models.into_iter().map(Record::Artifact).collect()),
                (1, records(&pairs)),
            ],
        )
        .unwrap();
        out.records[&0]
            .iter()
            .map(|r| match r {
                Record::Pair(p) => (p.chosen_score.unwrap(), p.rejected_score.unwrap()),
                _ => panic!(),
            })
            .collect::<Vec<_>>()
    };
    let by_ensemble = score("score_ens", models.clone());
    let right = by_ensemble.iter().filter(|(c, r)| c > r).count();
    assert!(
        right * 10 >= by_ensemble.len() * 7,
        "{right} of {}",
        by_ensemble.len()
    );
    // WARM averages the layers: its rewards are not the members' mean.
    let warm = run::<Warm>(
        "warm",
        &dir,
        json!({}),
        vec![0],
        vec![(0, models.iter().cloned().map(Record::Artifact).collect())],
    )
    .unwrap();
    let by_warm = score("score_warm", warm.artifacts(0));
    let gap = by_warm
        .iter()
        .zip(&by_ensemble)
        .map(|(w, e)| (w.0 - e.0).abs().max((w.1 - e.1).abs()))
        .fold(0.0, f64::max);
    assert!(gap > 1e-4, "WARM equals the ensemble mean (gap {gap})");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn smollm2_without_trained_layers_is_a_config_error() {
    let init = hone_sdk::testing::init::<Train>(smollm_train(json!({"train_layers": 0})));
    let err = <Train as StageFactory>::create(&init).err().unwrap();
    assert_eq!(err.config_field(), Some("train_layers"), "{err}");
}
