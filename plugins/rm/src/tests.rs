//! In-process tests of the rm stages.

use crate::testing::*;
use crate::*;
use hone_models::gpt::{init_seeded, Gpt, GptConfig};
use hone_models::reward::{load_meta, load_reward_model, score_texts};
use hone_models::tokenizer::ByteTokenizer;
use hone_models::{DType, Device, VarBuilder, VarMap};
use serde_json::json;

/// A tiny rm.train config, `overrides` on top.
fn tiny_train(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "d_model": 16, "n_layers": 1, "n_heads": 2, "context": 48, "steps": 100, "batch_size": 8,
        "lr": 1e-2, "min_lr": 1e-3, "warmup": 5, "weight_decay": 0.0, "eval_fraction": 0.2, "eval_every": 50,
    });
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn training_lowers_the_loss_and_raises_accuracy() {
    let dir = temp_run_dir("train");
    let pairs = learnable_pairs(64);
    let out = run::<Train>(
        "rm",
        &dir,
        tiny_train(json!({})),
        vec![0],
        vec![(0, records(&pairs))],
    )
    .unwrap();
    let loss = out.series("m0_train_loss");
    assert_eq!(loss.len(), 100);
    let (first, last) = (mean(&loss[..10]), mean(&loss[90..]));
    assert!(last < first * 0.5, "train loss {first} -> {last}");
    let eval = out.series("m0_eval_loss");
    assert!(eval.last().unwrap() < &eval[0], "eval loss {eval:?}");
    let acc = out.series("m0_eval_accuracy");
    assert!(*acc.last().unwrap() >= 0.9, "eval accuracy {acc:?}");
    let models = out.artifacts(0);
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].id, "rm/member-0/model.safetensors@0");
    assert_eq!(models[0].kind, REWARD_MODEL);
    // The model scores the learnt preference.
    let rm = load_reward_model(&dir.join("outputs/rm/member-0"), &Device::Cpu).unwrap();
    let r = score_texts(
        &rm.rm,
        rm.tok.as_ref(),
        &[("Q: new?", "x good y"), ("Q: new?", "x bad y")],
        4,
        &Device::Cpu,
    )
    .unwrap();
    assert!(r[0] > r[1], "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_loss_table_averages_each_window_over_its_own_steps() {
    // 23 steps, a row every 2: the last row's window is one step long.
    let dir = temp_run_dir("table");
    let out = run::<Train>(
        "rm",
        &dir,
        tiny_train(json!({"steps": 23, "eval_every": 0})),
        vec![0],
        vec![(0, records(&learnable_pairs(32)))],
    )
    .unwrap();
    let loss = out.series("m0_train_loss");
    let table = out
        .events
        .iter()
        .find_map(|e| match e {
            hone_sdk::Event::Log { message } if message.starts_with("member 0\n") => {
                Some(message.clone())
            }
            _ => None,
        })
        .expect("a loss table");
    let row = |step: usize| -> f64 {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&step.to_string()))
            .unwrap_or_else(|| panic!("no row {step} in\n{table}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!((row(22) - mean(&loss[20..22])).abs() < 1e-4, "{table}");
    assert!((row(23) - loss[22]).abs() < 1e-4, "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs rm.train for several rounds in one instance, each round's pairs
/// given; what each round produced.
fn train_rounds(
    dir: &std::path::Path,
    config: serde_json::Value,
    rounds: &[Vec<PreferencePair>],
) -> Vec<hone_sdk::Collected> {
    let mut init = hone_sdk::testing::init::<Train>(tiny_train(config));
    let _ = std::fs::remove_dir_all(&init.run_dir);
    init.stage_id = "rm".into();
    init.run_dir = dir.to_path_buf();
    init.members = vec![0];
    let mut stage = Train::create(&init).unwrap();
    rounds
        .iter()
        .enumerate()
        .map(|(r, pairs)| {
            hone_sdk::testing::run_round_of(&mut stage, &init, r as u64, vec![(0, records(pairs))])
                .unwrap()
        })
        .collect()
}

#[test]
fn the_label_pool_grows_and_members_continue_from_their_last_weights() {
    let dir = temp_run_dir("pool");
    let all = learnable_pairs(48);
    let (a, b) = (all[..24].to_vec(), all[24..].to_vec());
    let config = json!({"steps": 20, "eval_every": 0, "train_on": "all", "start": "last"});
    let outs = train_rounds(&dir, config.clone(), &[a.clone(), b.clone(), Vec::new()]);
    assert_eq!(outs[0].metric("pool", None), Some(24.0));
    assert_eq!(outs[1].metric("pool", None), Some(48.0));
    assert_eq!(outs[1].metric("pairs", None), Some(24.0));
    // No new labels: no new models; the last round's stand.
    assert!(outs[2].artifacts(0).is_empty());
    let first = outs[0].artifacts(0)[0].clone();
    let manifest_inputs = |out: &hone_sdk::Collected| -> Vec<Vec<String>> {
        out.events
            .iter()
            .filter_map(|e| match e {
                hone_sdk::Event::Artifact { inputs, .. } => Some(inputs.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(manifest_inputs(&outs[0]), [Vec::<String>::new()]);
    assert_eq!(manifest_inputs(&outs[1]), [vec![first.id.clone()]]);
    // Continuing means round 1 starts where round 0 ended: on the same
    // pairs, its eval loss before training is round 0's after.
    let same = train_rounds(&dir, config, &[a.clone(), a.clone()]);
    let (end0, start1) = (
        *same[0].series("m0_eval_loss").last().unwrap(),
        same[1].series("m0_eval_loss")[0],
    );
    assert!((end0 - start1).abs() < 1e-6, "{end0} {start1}");
    // A later label that reuses a pair id for other answers (a prompt
    // sampled again) joins the pool; the same pair again replaces itself.
    let reused: Vec<PreferencePair> = a
        .iter()
        .map(|p| {
            let mut q = p.clone();
            q.chosen = format!("{} again", p.chosen);
            q
        })
        .collect();
    let grown = train_rounds(
        &dir,
        json!({"steps": 2, "eval_every": 0, "train_on": "all"}),
        &[a.clone(), reused, a.clone()],
    );
    assert_eq!(grown[1].metric("pool", None), Some(48.0));
    assert_eq!(grown[2].metric("pool", None), Some(48.0));
    // Retraining from the shared init starts round 1 where round 0 started.
    let fresh = train_rounds(&dir, json!({"steps": 20, "eval_every": 0}), &[a.clone(), a]);
    let (start0, start1) = (
        fresh[0].series("m0_eval_loss")[0],
        fresh[1].series("m0_eval_loss")[0],
    );
    assert!((start0 - start1).abs() < 1e-6, "{start0} {start1}");
    assert!(
        start1 > end0 + 0.05,
        "training moved the loss: {start1} -> {end0}"
    );
    assert_eq!(fresh[1].metric("pool", None), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn members_differ_but_share_the_lineage_root() {
    let dir = temp_run_dir("members");
    let pairs = learnable_pairs(24);
    let config =
        tiny_train(json!({"members": 2, "steps": 5, "lrs": [1e-2, 3e-3], "dropouts": [0.0, 0.1]}));
    // The two members as the runtime would place them on two workers.
    let a = run::<Train>(
        "rm",
        &dir,
        config.clone(),
        vec![0],
        vec![(0, records(&pairs))],
    )
    .unwrap();
    let b = run::<Train>("rm", &dir, config, vec![1], vec![(0, records(&pairs))]).unwrap();
    let (a, b) = (&a.artifacts(0)[0], &b.artifacts(0)[0]);
    assert_eq!(b.id, "rm/member-1/model.safetensors@0");
    assert_ne!(a.sha256, b.sha256);
    let (ma, mb) = (
        load_meta(&dir.join("outputs/rm/member-0")).unwrap(),
        load_meta(&dir.join("outputs/rm/member-1")).unwrap(),
    );
    assert_eq!(ma.lineage_root, mb.lineage_root);
    assert!(
        ma.lineage_root.starts_with("scratch:init_seed="),
        "{}",
        ma.lineage_root
    );
    assert_ne!(ma.seed, mb.seed);
    assert_eq!((ma.lr, mb.lr, mb.dropout), (1e-2, 3e-3, 0.1));
    // Seeded dropout: training member 1 again gives the same weights.
    let again = temp_run_dir("members-again");
    let config =
        tiny_train(json!({"members": 2, "steps": 5, "lrs": [1e-2, 3e-3], "dropouts": [0.0, 0.1]}));
    let c = run::<Train>("rm", &again, config, vec![1], vec![(0, records(&pairs))]).unwrap();
    assert_eq!(c.artifacts(0)[0].sha256, b.sha256);
    std::fs::remove_dir_all(&again).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes a policy checkpoint as lm.sft would and returns its artifact.
fn write_policy(run_dir: &std::path::Path, name: &str, seed: u64) -> ArtifactRef {
    let cfg = tiny_gpt();
    let varmap = VarMap::new();
    Gpt::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(&varmap, seed).unwrap();
    let dir = run_dir.join("outputs/sft").join(name);
    let sha = hone_models::checkpoint::save(&dir, &varmap, &cfg, &ByteTokenizer).unwrap();
    ArtifactRef::new(
        "policy",
        "sft",
        format!("{name}/model.safetensors"),
        0,
        format!("outputs/sft/{name}/model.safetensors"),
        sha,
    )
}

#[test]
fn baklava_spread_starts_members_from_checkpoints_of_one_sft_run() {
    let dir = temp_run_dir("baklava");
    let policies = vec![
        Record::Artifact(write_policy(&dir, "final", 3)),
        Record::Artifact(write_policy(&dir, "ckpt-10", 1)),
        Record::Artifact(write_policy(&dir, "ckpt-20", 2)),
    ];
    let pairs = learnable_pairs(16);
    let config = tiny_train(
        json!({"members": 4, "steps": 2, "init": "input", "init_checkpoints": "spread"}),
    );
    let out = run::<Train>(
        "rm",
        &dir,
        config,
        vec![0, 1, 2, 3],
        vec![(0, records(&pairs)), (1, policies.clone())],
    )
    .unwrap();
    assert_eq!(out.artifacts(0).len(), 4);
    let inits: Vec<String> = (0..4)
        .map(|m| {
            let meta = load_meta(&dir.join(format!("outputs/rm/member-{m}"))).unwrap();
            assert_eq!(meta.lineage_root, "sft@0");
            meta.init
        })
        .collect();
    assert_eq!(
        inits,
        [
            "sft/ckpt-10/model.safetensors@0",
            "sft/ckpt-20/model.safetensors@0",
            "sft/final/model.safetensors@0",
            "sft/ckpt-10/model.safetensors@0"
        ]
    );
    // `last`: every member from the final checkpoint.
    let config = tiny_train(json!({"members": 2, "steps": 1, "init": "input"}));
    run::<Train>(
        "last",
        &dir,
        config,
        vec![1],
        vec![(0, records(&pairs)), (1, policies)],
    )
    .unwrap();
    let meta = load_meta(&dir.join("outputs/last/member-1")).unwrap();
    assert_eq!(meta.init, "sft/final/model.safetensors@0");
    // input without a policy: an error saying what to connect.
    let config = tiny_train(json!({"steps": 1, "init": "input"}));
    let err = run::<Train>("none", &dir, config, vec![0], vec![(0, records(&pairs))])
        .err()
        .unwrap();
    assert!(err.message.contains("`init` port"), "{err}");
    let mut at_round_2 = ArtifactRef::new("policy", "sft", "ckpt-5/model.safetensors", 2, "", "");
    at_round_2.step = Some(5);
    assert_eq!(train::trajectory(&at_round_2), "sft@2");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn assert_config_error<S: StageFactory>(config: serde_json::Value, field: &str) {
    match create::<S>(config.clone()) {
        Ok(_) => panic!("{config} accepted"),
        Err(e) => assert_eq!(e.config_field(), Some(field), "{config}: {e}"),
    }
}

#[test]
fn config_errors_name_the_field() {
    for (config, field) in [
        (json!({"members": 0}), "members"),
        (json!({"n_heads": 3}), "n_heads"),
        (json!({"steps": 0}), "steps"),
        (json!({"eval_fraction": 1.0}), "eval_fraction"),
        (json!({"label_smoothing": 0.5}), "label_smoothing"),
        (json!({"lr": 0.0}), "lr"),
        (json!({"lrs": []}), "lrs"),
        (json!({"lrs": [1e-3, -1.0]}), "lrs"),
        (json!({"dropouts": [1.0]}), "dropouts"),
        (json!({"device": "tpu"}), "device"),
    ] {
        assert_config_error::<Train>(config, field);
    }
    assert_config_error::<Scorer>(json!({"batch_size": 0}), "batch_size");
    assert_config_error::<Scorer>(json!({"name": " "}), "name");
    for (config, field) in [
        (json!({"bin_width": 0.0}), "bin_width"),
        (json!({"smoothing": 0.6}), "smoothing"),
        (json!({"adaptive_margin": -1.0}), "adaptive_margin"),
        (json!({"ambiguous_below": -0.1}), "ambiguous_below"),
    ] {
        assert_config_error::<Strength>(config, field);
    }
    assert_config_error::<Warm>(json!({"weights": []}), "weights");
    assert_config_error::<Warm>(json!({"weights": [1.0, -1.0]}), "weights");
    assert_config_error::<Warm>(json!({"scan": true, "scan_points": 1}), "scan_points");
    // The defaults are valid.
    assert!(create::<Train>(json!({})).is_ok());
    assert!(create::<Scorer>(json!({})).is_ok());
    assert!(create::<Strength>(json!({})).is_ok());
    assert!(create::<Warm>(json!({})).is_ok());
}

#[test]
fn warm_merge_of_three_is_the_elementwise_mean_and_scores_like_any_rm() {
    let dir = temp_run_dir("warm");
    let cfg = tiny_gpt();
    let members: Vec<ArtifactRef> = (1..=3)
        .map(|s| write_rm(&dir, &format!("member-{s}"), &cfg, s, "root"))
        .collect();
    let input = members.iter().cloned().map(Record::Artifact).collect();
    let pairs = learnable_pairs(6);
    let out = run::<Warm>(
        "warm",
        &dir,
        json!({"scan": true, "scan_points": 3}),
        vec![0],
        vec![(0, input), (1, records(&pairs))],
    )
    .unwrap();
    let merged = out.artifacts(0);
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0].id, "warm/warm/model.safetensors@0");
    assert_eq!(merged[0].kind, REWARD_MODEL);
    let load = |path: &str| candle_core::safetensors::load(dir.join(path), &Device::Cpu).unwrap();
    let m = load(&merged[0].path);
    let parts: Vec<_> = members.iter().map(|a| load(&a.path)).collect();
    assert_eq!(m.len(), parts[0].len());
    for (name, t) in &m {
        let want = ((&parts[0][name] + &parts[1][name]).unwrap() + &parts[2][name]).unwrap();
        let want = (want / 3.0).unwrap();
        let diff = (t - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{name}: {diff}");
    }
    let warm_dir = dir.join("outputs/warm/warm");
    let meta = load_meta(&warm_dir).unwrap();
    assert_eq!(meta.lineage_root, "root");
    assert_eq!(
        meta.merged_from,
        members.iter().map(|a| a.id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(meta.weights.len(), 3);
    let metrics = out.metrics();
    for name in [
        "accuracy/member0",
        "accuracy/member2",
        "accuracy/warm",
        "accuracy/ensemble",
    ] {
        assert!(
            metrics.contains_key(name),
            "{name} missing from {metrics:?}"
        );
    }
    assert_eq!(out.series("interp_accuracy").len(), 3);
    // The merged model loads and scores, also through rm.score.
    let rm = load_reward_model(&warm_dir, &Device::Cpu).unwrap();
    let direct = score_texts(
        &rm.rm,
        rm.tok.as_ref(),
        &[(pairs[0].prompt.as_str(), pairs[0].chosen.as_str())],
        1,
        &Device::Cpu,
    )
    .unwrap();
    let completion = Completion {
        id: "c1".into(),
        prompt_id: "p".into(),
        prompt: pairs[0].prompt.clone(),
        text: pairs[0].chosen.clone(),
        token_ids: vec![],
        token_logprobs: vec![],
        ref_logprobs: vec![],
        values: vec![],
        policy: None,
        meta: Default::default(),
    };
    let out = run::<Scorer>(
        "score",
        &dir,
        json!({}),
        vec![0],
        vec![
            (0, vec![Record::Artifact(merged[0].clone())]),
            (
                1,
                vec![
                    Record::Pair(pairs[0].clone()),
                    Record::Completion(completion),
                ],
            ),
        ],
    )
    .unwrap();
    let Record::Pair(p) = &out.records[&0][0] else {
        panic!("expected a pair")
    };
    assert!((p.chosen_score.unwrap() - f64::from(direct[0])).abs() < 1e-5);
    let Record::Score(s) = &out.records[&1][0] else {
        panic!("expected a score")
    };
    assert_eq!((s.id.as_str(), s.name.as_str()), ("c1", "proxy_reward"));
    assert!((s.value - f64::from(direct[0])).abs() < 1e-5);
    assert_eq!(metrics_of(&out, "scored"), 2.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn metrics_of(out: &hone_sdk::Collected, name: &str) -> f64 {
    out.metrics()[name]
}

#[test]
fn score_uses_the_ensemble_mean_of_the_newest_round() {
    let dir = temp_run_dir("score");
    let cfg = tiny_gpt();
    let a = write_rm(&dir, "a", &cfg, 1, "r");
    let b = write_rm(&dir, "b", &cfg, 2, "r");
    let mut old = write_rm(&dir, "old", &cfg, 3, "r");
    old.round = 0;
    let (mut a, mut b) = (a, b);
    a.round = 1;
    b.round = 1;
    // Two members of one ensemble.
    a.member = Some(0);
    b.member = Some(1);
    let pair = learnable_pairs(1).remove(0);
    let pair_for_only = pair.clone();
    let each: Vec<f64> = [&a, &b]
        .iter()
        .map(|m| {
            let rm = load_reward_model(dir.join(&m.path).parent().unwrap(), &Device::Cpu).unwrap();
            f64::from(
                score_texts(
                    &rm.rm,
                    rm.tok.as_ref(),
                    &[(&pair.prompt, &pair.chosen)],
                    1,
                    &Device::Cpu,
                )
                .unwrap()[0],
            )
        })
        .collect();
    let input = vec![
        Record::Artifact(old),
        Record::Artifact(a),
        Record::Artifact(b),
    ];
    let out = run::<Scorer>(
        "score",
        &dir,
        json!({}),
        vec![0],
        vec![(0, input.clone()), (1, vec![Record::Pair(pair)])],
    )
    .unwrap();
    let Record::Pair(p) = &out.records[&0][0] else {
        panic!("expected a pair")
    };
    assert!((p.chosen_score.unwrap() - (each[0] + each[1]) / 2.0).abs() < 1e-5);
    assert_eq!(metrics_of(&out, "models"), 2.0);
    // `member` picks one member of the ensemble; naming none is a config error.
    let only = |member: u64| {
        run::<Scorer>(
            "score",
            &dir,
            json!({ "member": member }),
            vec![0],
            vec![
                (0, input.clone()),
                (1, vec![Record::Pair(pair_for_only.clone())]),
            ],
        )
    };
    let out = only(1).unwrap();
    let Record::Pair(p) = &out.records[&0][0] else {
        panic!("expected a pair")
    };
    assert!((p.chosen_score.unwrap() - each[1]).abs() < 1e-5);
    assert_eq!(metrics_of(&out, "models"), 1.0);
    let err = only(7).err().unwrap();
    assert_eq!(err.config_field(), Some("member"));
    assert!(err.message.contains("train/a/model.safetensors@0"), "{err}");
    // Records but no model: an error saying what to connect.
    let err = run::<Scorer>(
        "score",
        &dir,
        json!({}),
        vec![0],
        vec![(1, records(&learnable_pairs(1)))],
    )
    .err()
    .unwrap();
    assert!(err.message.contains("`models`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Over rounds, WARM merges again only when there is something new: a
/// round with neither new members nor pairs to evaluate emits nothing (the
/// earlier average stands), one with pairs merges and evaluates.
#[test]
fn warm_does_not_merge_the_same_members_every_round() {
    let dir = temp_run_dir("warm-rounds");
    let cfg = tiny_gpt();
    let members: Vec<Record> = (1..=2)
        .map(|s| Record::Artifact(write_rm(&dir, &format!("member-{s}"), &cfg, s, "root")))
        .collect();
    let mut init = hone_sdk::testing::init::<Warm>(json!({}));
    init.stage_id = "warm".into();
    init.run_dir = dir.clone();
    let mut stage = Warm::create(&init).unwrap();
    let mut round = |r: u64, inputs: Vec<(usize, Vec<Record>)>| {
        hone_sdk::testing::run_round_of(&mut stage, &init, r, inputs).unwrap()
    };
    assert_eq!(round(0, vec![(0, members)]).artifacts(0).len(), 1);
    assert!(round(1, vec![]).artifacts(0).is_empty());
    let evaluated = round(2, vec![(1, records(&learnable_pairs(4)))]);
    assert_eq!(evaluated.artifacts(0).len(), 1);
    assert!(evaluated.metrics().contains_key("accuracy/warm"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn warm_refuses_members_of_different_initialisations() {
    let dir = temp_run_dir("lineage");
    let cfg = tiny_gpt();
    let a = write_rm(&dir, "a", &cfg, 1, "scratch:init_seed=1");
    let b = write_rm(&dir, "b", &cfg, 2, "sft@0");
    let input = vec![Record::Artifact(a.clone()), Record::Artifact(b.clone())];
    let err = run::<Warm>("warm", &dir, json!({}), vec![0], vec![(0, input)])
        .err()
        .unwrap();
    let msg = err.message;
    assert!(
        msg.contains(&format!("cannot merge {} and {}", a.id, b.id)),
        "{msg}"
    );
    assert!(
        msg.contains("do not share an initialisation (scratch:init_seed=1 vs sft@0)"),
        "{msg}"
    );
    assert!(msg.contains("one rm.train stage"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn warm_refuses_different_shapes() {
    let dir = temp_run_dir("shapes");
    let a = write_rm(&dir, "a", &tiny_gpt(), 1, "root");
    let wide = GptConfig {
        d_model: 32,
        ..tiny_gpt()
    };
    let b = write_rm(&dir, "b", &wide, 2, "root");
    let input = vec![Record::Artifact(a.clone()), Record::Artifact(b.clone())];
    let err = run::<Warm>("warm", &dir, json!({}), vec![0], vec![(0, input)])
        .err()
        .unwrap();
    assert!(
        err.message
            .contains(&format!("cannot merge {} and {}", a.id, b.id)),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("model configs differ"),
        "{}",
        err.message
    );
    // merge itself checks tensor shapes whatever the configs say.
    let files = vec![dir.join(&a.path), dir.join(&b.path)];
    match merge(&files, &[1.0, 1.0], &dir.join("out.safetensors")) {
        Err(MergeError::Mismatch { other: 1, what }) => assert!(what.contains("shape"), "{what}"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strength_flips_pairs_every_member_ranks_the_other_way() {
    let dir = temp_run_dir("strength");
    let cfg = tiny_gpt();
    let models: Vec<ArtifactRef> = (1..=3)
        .map(|s| write_rm(&dir, &format!("m{s}"), &cfg, s, "root"))
        .collect();
    let loaded: Vec<_> = models
        .iter()
        .map(|m| load_reward_model(dir.join(&m.path).parent().unwrap(), &Device::Cpu).unwrap())
        .collect();
    // Candidate pairs; find one every member prefers as labelled and one
    // every member prefers the other way round.
    let candidates: Vec<PreferencePair> = (0..60)
        .map(|i| {
            PreferencePair::new(
                format!("c{i:02}"),
                format!("Q{}", i % 7),
                "xyz ".repeat(1 + i % 9),
                format!("{i} apples"),
                "test",
            )
        })
        .collect();
    let diffs = |p: &PreferencePair| -> Vec<f32> {
        loaded
            .iter()
            .map(|rm| {
                let r = score_texts(
                    &rm.rm,
                    rm.tok.as_ref(),
                    &[(&p.prompt, &p.chosen), (&p.prompt, &p.rejected)],
                    2,
                    &Device::Cpu,
                )
                .unwrap();
                r[0] - r[1]
            })
            .collect()
    };
    let swap = |p: &PreferencePair| {
        let mut q = p.clone();
        std::mem::swap(&mut q.chosen, &mut q.rejected);
        q
    };
    // Oriented so that every member prefers chosen.
    let mut oriented = candidates.iter().filter_map(|p| {
        let d = diffs(p);
        if d.iter().all(|d| *d > 0.0) {
            Some(p.clone())
        } else if d.iter().all(|d| *d < 0.0) {
            Some(swap(p))
        } else {
            None
        }
    });
    let mut agree = oriented.next().expect("a pair all members agree on");
    let mut against = swap(&oriented.next().expect("two pairs all members agree on"));
    agree.meta.insert("flipped".into(), "false".into());
    against.meta.insert("flipped".into(), "true".into());
    let mut pairs = vec![agree.clone(), against.clone()];
    pairs.extend(candidates.iter().take(10).cloned());
    pairs.sort_by(|a, b| a.id.cmp(&b.id));
    pairs.dedup_by(|a, b| a.id == b.id);
    let input = models.iter().cloned().map(Record::Artifact).collect();
    let out = run::<Strength>(
        "strength",
        &dir,
        json!({"flip_below": 0.0, "bin_width": 0.001}),
        vec![0],
        vec![(0, input), (1, records(&pairs))],
    )
    .unwrap();
    let emitted: Vec<&PreferencePair> = out.records[&0]
        .iter()
        .map(|r| match r {
            Record::Pair(p) => p,
            _ => panic!("expected pairs"),
        })
        .collect();
    assert_eq!(emitted.len(), pairs.len());
    let find = |id: &str| *emitted.iter().find(|p| p.id == id).unwrap();
    let flipped = find(&against.id);
    assert_eq!(
        (flipped.chosen.as_str(), flipped.rejected.as_str()),
        (against.rejected.as_str(), against.chosen.as_str())
    );
    assert_eq!(flipped.meta["strength_flipped"], "true");
    assert!(flipped.strength_mean.unwrap() > 0.0);
    assert!(flipped.strength_std.unwrap() >= 0.0);
    let kept = find(&agree.id);
    assert_eq!(kept.chosen, agree.chosen);
    assert!(!kept.meta.contains_key("strength_flipped"));
    let m = out.metrics();
    let hist: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("strength_hist/"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(hist, pairs.len() as f64);
    assert_eq!(m["pairs"], pairs.len() as f64);
    assert!(m["flipped"] >= 1.0);
    assert_eq!(m["injected_flips"], 1.0);
    assert!(m.contains_key("injected_flips_in_lowest_decile"));
    assert_eq!(m["strength_flip_precision"], 1.0 / m["flipped"]);
    // One model is not an ensemble.
    let err = run::<Strength>(
        "strength",
        &dir,
        json!({}),
        vec![0],
        vec![
            (0, vec![Record::Artifact(models[0].clone())]),
            (1, records(&pairs)),
        ],
    )
    .err()
    .unwrap();
    assert!(err.message.contains("at least 2"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strength_policies_drop_smooth_and_margin() {
    let dir = temp_run_dir("policies");
    let cfg = tiny_gpt();
    let models: Vec<Record> = (1..=2)
        .map(|s| Record::Artifact(write_rm(&dir, &format!("m{s}"), &cfg, s, "root")))
        .collect();
    let mut pairs = learnable_pairs(12);
    for (i, p) in pairs.iter_mut().enumerate() {
        p.meta.insert(
            "agreement".into(),
            if i % 2 == 0 { "yes" } else { "no" }.into(),
        );
    }
    // Everything is ambiguous under a huge threshold.
    let run_with = |config: serde_json::Value| {
        run::<Strength>(
            "strength",
            &dir,
            config,
            vec![0],
            vec![(0, models.clone()), (1, records(&pairs))],
        )
        .unwrap()
    };
    let out = run_with(json!({"ambiguous_below": 1e9, "ambiguous": "drop"}));
    assert!(!out.records.contains_key(&0));
    assert_eq!(out.metrics()["dropped"], 12.0);
    assert!(!out.metrics().contains_key("mean_strength/yes"));
    let out = run_with(
        json!({"ambiguous_below": 1e9, "ambiguous": "smooth", "smoothing": 0.2,
        "group_by_meta": "agreement"}),
    );
    assert_eq!(out.metrics()["smoothed"], 12.0);
    assert!(out.metrics().contains_key("mean_strength/yes"));
    assert_eq!(out.metrics()["pairs/yes"], 6.0);
    assert_eq!(out.metrics()["pairs/no"], 6.0);
    for r in &out.records[&0] {
        let Record::Pair(p) = r else { panic!() };
        assert_eq!(p.label_smoothing, Some(0.2));
    }
    let out = run_with(json!({"adaptive_margin": 2.0}));
    for r in &out.records[&0] {
        let Record::Pair(p) = r else { panic!() };
        assert!((p.margin - 2.0 * p.strength_mean.unwrap().max(0.0)).abs() < 1e-12);
    }
    assert_eq!(strength::bin_label(-1.2, 0.5), "-1.5");
    assert_eq!(strength::bin_label(0.2, 0.5), "0");
    assert_eq!(strength::bin_label(0.35, 0.1), "0.3");
    std::fs::remove_dir_all(&dir).unwrap();
}
