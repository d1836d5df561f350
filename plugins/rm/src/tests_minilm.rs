//! In-process tests of the rm stages with the all-MiniLM-L6-v2 backbone
//! (fetched into ~/.cache/hone/models on first use), and of mixing
//! backbones.

use crate::testing::*;
use crate::*;
use hone_models::reward::{load_meta, save_head_reward_model, PretrainedConfig, RewardMeta, META};
use hone_models::{DType, Device, VarBuilder, VarMap};
use hone_pretrained::minilm::{MiniLmRewardModel, MODEL_NAME};
use serde_json::json;

/// Pairs with a learnable preference: the chosen response is polite and
/// helpful, the rejected one rude.
pub(crate) fn polite_pairs(n: usize) -> Vec<PreferencePair> {
    let prompts = [
        "How do I boil an egg?",
        "Can you help me fix my bike chain?",
        "What is a good name for a cat?",
        "How should I prepare for a job interview?",
        "Why is the sky blue?",
        "Can you recommend a book for a long flight?",
        "How do I water a cactus?",
        "What time zone is Tokyo in?",
        "How can I learn to play the guitar?",
        "What should I cook for dinner tonight?",
    ];
    let polite = [
        "Of course, I'd be happy to help! Here is a simple step-by-step answer.",
        "Great question. Thank you for asking; let me explain it clearly.",
        "Sure! I hope this helps, and feel free to ask if anything is unclear.",
        "Happy to help with that. Here are a few friendly suggestions you could try.",
        "Thanks for reaching out! Here's a clear and careful explanation.",
        "Absolutely, let me walk you through it kindly and patiently.",
    ];
    let rude = [
        "Ugh, figure it out yourself, I'm not your servant.",
        "That's a stupid question and you should feel bad for asking.",
        "Whatever. Go away and stop bothering me.",
        "Nobody cares. Look it up, idiot.",
        "Are you seriously this dumb? Don't waste my time.",
        "Shut up, I won't help someone like you.",
    ];
    (0..n)
        .map(|i| {
            PreferencePair::new(
                format!("q{i:03}"),
                prompts[i % prompts.len()],
                polite[(i / prompts.len() + i) % polite.len()],
                rude[(i * 7 / 3) % rude.len()],
                "test",
            )
        })
        .collect()
}

fn minilm_train(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "backbone": MODEL_NAME, "members": 2, "steps": 60, "batch_size": 8, "lrs": [3e-2, 1e-2],
        "dropouts": [0.0, 0.1], "min_lr": 1e-3, "warmup": 5, "weight_decay": 0.0, "eval_fraction": 0.2,
        "eval_every": 30,
    });
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

pub(crate) fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn minilm_members_learn_merge_with_warm_and_score() {
    let dir = temp_run_dir("minilm");
    let pairs = polite_pairs(60);
    let out = run::<Train>(
        "rm",
        &dir,
        minilm_train(json!({})),
        vec![0, 1],
        vec![(0, records(&pairs))],
    )
    .unwrap();
    for m in 0..2 {
        let loss = out.series(&format!("m{m}_train_loss"));
        assert_eq!(loss.len(), 60);
        let (first, last) = (mean(&loss[..5]), mean(&loss[55..]));
        assert!(
            last < first * 0.5,
            "member {m}: train loss {first} -> {last}"
        );
        let acc = out.series(&format!("m{m}_eval_accuracy"));
        assert!(
            *acc.last().unwrap() >= 0.9,
            "member {m}: eval accuracy {acc:?}"
        );
    }
    let models = out.artifacts(0);
    assert_eq!(models.len(), 2);
    let member0 = dir.join("outputs/rm/member-0");
    let meta = load_meta(&member0).unwrap();
    assert_eq!(meta.backbone, MODEL_NAME);
    assert!(
        meta.lineage_root
            .starts_with(&format!("{MODEL_NAME}:init_seed=")),
        "{}",
        meta.lineage_root
    );
    assert_eq!(
        load_meta(&dir.join("outputs/rm/member-1"))
            .unwrap()
            .lineage_root,
        meta.lineage_root
    );
    // Only the head is saved, and no tokenizer.
    let head =
        candle_core::safetensors::load(member0.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = head.keys().collect();
    names.sort();
    assert_eq!(names, ["reward_head.bias", "reward_head.weight"]);
    assert!(!member0.join("tokenizer.json").exists());

    // rm.score with member 0 alone agrees with MiniLmRewardModel::score
    // under the same head: the cached embeddings are what score reads.
    let probe = &pairs[..3];
    let scored = run::<Scorer>(
        "score0",
        &dir,
        json!({"member": 0}),
        vec![0],
        vec![
            (0, models.iter().cloned().map(Record::Artifact).collect()),
            (1, records(probe)),
        ],
    )
    .unwrap();
    let bert = MiniLmRewardModel::load(
        &hone_sdk::pretrained::fetch(MODEL_NAME).unwrap(),
        &Device::Cpu,
        0,
    )
    .unwrap();
    {
        let data = bert.varmap().data().lock().unwrap();
        for (name, t) in &head {
            data[name].set(t).unwrap();
        }
    }
    let prompts: Vec<&str> = probe.iter().map(|p| p.prompt.as_str()).collect();
    let chosen: Vec<&str> = probe.iter().map(|p| p.chosen.as_str()).collect();
    let direct = bert.score(&prompts, &chosen).unwrap();
    for (r, d) in scored.records[&0].iter().zip(&direct) {
        let Record::Pair(p) = r else { panic!() };
        let c = p.chosen_score.unwrap();
        assert!((c - f64::from(*d)).abs() < 1e-3, "{c} vs {d}");
        assert!(c > p.rejected_score.unwrap());
    }

    // WARM: the merged head scores each pair as the ensemble's mean (a
    // linear head on shared embeddings), and scores through rm.score.
    let warm = run::<Warm>(
        "warm",
        &dir,
        json!({"scan": true, "scan_points": 3}),
        vec![0],
        vec![
            (0, models.iter().cloned().map(Record::Artifact).collect()),
            (1, records(&pairs)),
        ],
    )
    .unwrap();
    let m = warm.metrics();
    assert_eq!(m["accuracy/warm"], m["accuracy/ensemble"]);
    assert!(m["accuracy/warm"] >= 0.9, "{m:?}");
    assert_eq!(warm.series("interp_accuracy").len(), 3);
    let merged = warm.artifacts(0);
    assert_eq!(merged.len(), 1);
    let warm_meta = load_meta(&dir.join("outputs/warm/warm")).unwrap();
    assert_eq!(warm_meta.backbone, MODEL_NAME);
    assert_eq!(warm_meta.lineage_root, meta.lineage_root);
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
    let by_warm = score("score_warm", merged);
    let by_ensemble = score("score_ens", models);
    for (w, e) in by_warm.iter().zip(&by_ensemble) {
        assert!(
            (w.0 - e.0).abs() < 1e-4 && (w.1 - e.1).abs() < 1e-4,
            "{w:?} vs {e:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn minilm_members_with_fine_tuned_top_layers_learn_and_warm_is_not_their_mean() {
    let dir = temp_run_dir("minilm-tuned");
    let pairs = polite_pairs(40);
    let config = minilm_train(json!({
        "train_layers": 1, "max_tokens": 48, "steps": 12, "lrs": [1e-3, 5e-4], "eval_every": 0,
        "embed_batch_size": 16,
    }));
    let out = run::<Train>("rm", &dir, config, vec![0, 1], vec![(0, records(&pairs))]).unwrap();
    for m in 0..2 {
        let loss = out.series(&format!("m{m}_train_loss"));
        assert_eq!(loss.len(), 12);
        let (first, last) = (mean(&loss[..3]), mean(&loss[9..]));
        assert!(last < first, "member {m}: train loss {first} -> {last}");
    }
    assert!(
        out.logs().iter().any(|l| l.contains("frozen layers 0..5")),
        "{:?}",
        out.logs()
    );
    let member0 = dir.join("outputs/rm/member-0");
    let meta = load_meta(&member0).unwrap();
    assert!(
        meta.lineage_root.contains("train_layers=1"),
        "{}",
        meta.lineage_root
    );
    // The head and layer 5's 16 tensors, trained away from the pretrained ones.
    let saved =
        candle_core::safetensors::load(member0.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        saved.len(),
        2 + 16,
        "{:?}",
        saved.keys().collect::<Vec<_>>()
    );
    assert!(saved
        .keys()
        .all(|k| k.starts_with("reward_head.") || k.contains("layer.5.")));
    let pretrained = candle_core::safetensors::load(
        hone_sdk::pretrained::fetch(MODEL_NAME)
            .unwrap()
            .join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let name = saved
        .keys()
        .find(|k| k.ends_with("attention.self.query.weight"))
        .unwrap();
    let moved = (&saved[name] - &pretrained[name])
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(0)
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(moved > 0.0, "{name} did not train");
    let config_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(member0.join("config.json")).unwrap()).unwrap();
    assert_eq!(config_json["train_layers"], 1);
    assert_eq!(config_json["max_tokens"], 48);

    // Scored through rm.score: the model loads, and ranks the pairs.
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

    // WARM averages the layers too: its rewards are not the members' mean.
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

/// A MiniLM head checkpoint written directly (no BERT needed).
fn write_head(run_dir: &std::path::Path, name: &str) -> ArtifactRef {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_nn::linear(384, 1, vb.pp("reward_head")).unwrap();
    let meta = RewardMeta {
        backbone: MODEL_NAME.into(),
        lineage_root: format!("{MODEL_NAME}:init_seed=1"),
        init: MODEL_NAME.into(),
        member: 0,
        seed: 1,
        lr: 1e-3,
        dropout: 0.0,
        steps: 0,
        merged_from: vec![],
        weights: vec![],
    };
    let config = PretrainedConfig {
        pretrained: MODEL_NAME.into(),
        hidden_size: 384,
        train_layers: 0,
        max_tokens: 0,
    };
    let rel = format!("outputs/train/{name}");
    let sha = save_head_reward_model(&run_dir.join(&rel), &varmap, &config, &meta).unwrap();
    ArtifactRef::new(
        REWARD_MODEL,
        "train",
        format!("{name}/model.safetensors"),
        0,
        format!("{rel}/model.safetensors"),
        sha,
    )
}

#[test]
fn warm_refuses_a_gpt_and_a_minilm_reward_model() {
    let dir = temp_run_dir("mixed");
    let gpt = write_rm(&dir, "a", &tiny_gpt(), 1, "scratch:init_seed=1");
    let minilm = write_head(&dir, "b");
    let input = vec![
        Record::Artifact(gpt.clone()),
        Record::Artifact(minilm.clone()),
    ];
    let err = run::<Warm>("warm", &dir, json!({}), vec![0], vec![(0, input)])
        .err()
        .unwrap();
    let msg = err.message;
    assert!(
        msg.contains(&format!("cannot merge {} and {}", gpt.id, minilm.id)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("their backbones differ (gpt vs {MODEL_NAME})")),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reward_json_without_backbone_still_loads_and_scores() {
    let dir = temp_run_dir("oldmeta");
    let a = write_rm(&dir, "old", &tiny_gpt(), 1, "root");
    let meta_path = dir.join("outputs/train/old").join(META);
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    assert!(meta.as_object_mut().unwrap().remove("backbone").is_some());
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    assert!(load_meta(meta_path.parent().unwrap()).unwrap().is_gpt());
    let pairs = learnable_pairs(4);
    let out = run::<Scorer>(
        "score",
        &dir,
        json!({}),
        vec![0],
        vec![(0, vec![Record::Artifact(a)]), (1, records(&pairs))],
    )
    .unwrap();
    assert_eq!(out.metrics()["scored"], 4.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn minilm_config_refuses_init_input() {
    let err = create::<Train>(json!({"backbone": MODEL_NAME, "init": "input"}))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("init"), "{err}");
}

#[test]
fn minilm_workers_embed_together_without_waiting_forever() {
    // Two instances (two workers' members) embed the same new texts at once:
    // each claims batches the other has not, and both end with every row.
    let dir = temp_run_dir("minilm-workers");
    let mut pairs = polite_pairs(40);
    for p in &mut pairs {
        p.prompt = format!("{} (asked on the second worker test)", p.prompt);
    }
    let config = minilm_train(json!({"steps": 20, "embed_batch_size": 4}));
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = [0usize, 1]
            .into_iter()
            .map(|m| {
                let (dir, config, pairs) = (&dir, config.clone(), &pairs);
                s.spawn(move || {
                    run::<Train>("rm", dir, config, vec![m], vec![(0, records(pairs))]).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, out) in outs.iter().enumerate() {
        assert_eq!(out.artifacts(0).len(), 1);
        assert_eq!(out.series(&format!("m{m}_train_loss")).len(), 20);
    }
    // A single instance afterwards (every row cached) trains member 0 the same.
    let again = run::<Train>("rm", &dir, config, vec![0], vec![(0, records(&pairs))]).unwrap();
    assert_eq!(
        again.series("m0_train_loss"),
        outs[0].series("m0_train_loss")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn minilm_lora_merges_into_the_weights_it_adapts() {
    let frozen = crate::tuned::Frozen::load(MODEL_NAME, 48, &Device::Cpu).unwrap();
    let split = frozen.num_layers() - 1;
    let items = [
        ("How do I boil an egg?", "Happy to help!"),
        ("Hi", "Go away."),
    ];
    let states = frozen.states(&items, split, 2, &mut |_, _| {}).unwrap();
    let refs: Vec<&hone_models::Tensor> = states.iter().collect();
    let (mut top, vars) = frozen.copy(&Default::default(), split).unwrap();
    let lora = hone_models::lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["attention.self.query".into(), "intermediate.dense".into()],
    };
    let adapters = top.add_lora(&lora, split, 1).unwrap();
    assert_eq!(adapters.len(), 2 * 2);
    let before = top.pooled_from(&refs, split).unwrap();
    // Gradients reach the adapters only: the adapted layer is frozen whole.
    let grads = before.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let missing = hone_models::train::vars_without_gradient(&vars, &grads).unwrap();
    assert_eq!(missing.len(), vars.all_vars().len());
    for (name, var) in &adapters {
        assert!(grads.get(var.as_tensor()).is_some(), "{name}");
        if name.ends_with("lora_B") {
            let noise = hone_models::Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        }
    }
    let adapted = top.pooled_from(&refs, split).unwrap();
    // The merged weights, loaded as a checkpoint's overrides, are the
    // adapted model.
    let merged: std::collections::HashMap<String, hone_models::Tensor> =
        top.merged_weights().unwrap().into_iter().collect();
    assert_eq!(merged.len(), 2);
    assert!(
        merged.contains_key("encoder.layer.5.attention.self.query.weight"),
        "{:?}",
        merged.keys()
    );
    let (plain, _) = frozen.copy(&merged, split).unwrap();
    let reloaded = plain.pooled_from(&refs, split).unwrap();
    let gap = |a: &hone_models::Tensor, b: &hone_models::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(
        gap(&adapted, &reloaded) < 1e-4,
        "{}",
        gap(&adapted, &reloaded)
    );
    assert!(
        gap(&adapted, &before) > 1e-4,
        "the adapters changed nothing"
    );
}

#[test]
fn minilm_lora_members_learn_and_warm_averages_their_merged_layers() {
    let dir = temp_run_dir("minilm-lora");
    let pairs = polite_pairs(40);
    let config = minilm_train(json!({
        "train_layers": 1, "max_tokens": 48, "steps": 12, "lrs": [3e-3, 1e-3], "eval_every": 0,
        "embed_batch_size": 16, "lora_rank": 4, "lora_alpha": 8.0,
    }));
    let out = run::<Train>("rm", &dir, config, vec![0, 1], vec![(0, records(&pairs))]).unwrap();
    for m in 0..2 {
        let loss = out.series(&format!("m{m}_train_loss"));
        let (first, last) = (mean(&loss[..3]), mean(&loss[9..]));
        assert!(last < first, "member {m}: train loss {first} -> {last}");
    }
    let member0 = dir.join("outputs/rm/member-0");
    assert!(load_meta(&member0)
        .unwrap()
        .lineage_root
        .contains("lora_rank=4"));
    // The head and layer 5's 16 tensors, query and value merged: no adapter.
    let saved =
        candle_core::safetensors::load(member0.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        saved.len(),
        2 + 16,
        "{:?}",
        saved.keys().collect::<Vec<_>>()
    );
    assert!(saved.keys().all(|k| !k.contains("lora")));
    let models = out.artifacts(0);
    let warm = run::<Warm>(
        "warm",
        &dir,
        json!({}),
        vec![0],
        vec![
            (0, models.iter().cloned().map(Record::Artifact).collect()),
            (1, records(&pairs)),
        ],
    )
    .unwrap();
    assert_eq!(warm.artifacts(0).len(), 1);
    let err = Train::create(&hone_sdk::testing::init::<Train>(minilm_train(
        json!({"lora_rank": 4}),
    )))
    .err()
    .unwrap();
    assert_eq!(err.config_field(), Some("lora_rank"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
