//! In-process tests of `lm.sft`, and helpers the rollout tests reuse.

use super::*;
use hone_sdk::{Collected, Event};
use net::Net;

/// The config of a tiny model that trains in seconds, with `overrides`.
pub(crate) fn tiny_config(overrides: serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::json!({
        "init": "scratch", "d_model": 32, "n_layers": 1, "n_heads": 4, "context": 64,
        "steps": 40, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup": 5, "grad_accum": 1,
        "clip": 1.0, "weight_decay": 0.0, "eval_fraction": 0.2, "eval_every": 20,
        "checkpoint_every": 20, "seed": 0, "device": "cpu", "pretrained": "", "train_layers": 4,
        "max_tokens": 256, "lora_rank": 0, "lora_alpha": 16.0, "lora_targets": ["q_proj", "v_proj"],
    });
    for (k, v) in overrides.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

/// Demonstrations with a learnable pattern: the answer repeats a word of the question.
pub(crate) fn demos(n: usize) -> Vec<Record> {
    let words = [
        "apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano",
    ];
    (0..n)
        .map(|i| {
            let w = words[i % words.len()];
            let prompt = format!("Human: say {w}\n\nAssistant:");
            Record::Pair(PreferencePair::new(
                format!("d{i:03}"),
                prompt,
                format!(" {w} {w} {w}."),
                "no",
                "test",
            ))
        })
        .collect()
}

/// Runs one SFT round as stage `sft` in `run_dir`; returns emitted records
/// and events.
pub(crate) fn run_sft(
    run_dir: &std::path::Path,
    config: serde_json::Value,
    input: Vec<Record>,
) -> Collected {
    run_sft_as("sft", run_dir, config, input)
}

fn run_sft_as(
    stage_id: &str,
    run_dir: &std::path::Path,
    config: serde_json::Value,
    input: Vec<Record>,
) -> Collected {
    let mut init = StageInit::for_test("lm.sft", config);
    init.stage_id = stage_id.into();
    init.run_dir = run_dir.to_path_buf();
    let mut stage = Sft::create(&init).unwrap();
    let mut out = Collected::default();
    {
        let mut ctx = Context::new(&mut out, &init, 0);
        stage.on_batch(&mut ctx, 0, input).unwrap();
        stage.on_round_end(&mut ctx).unwrap();
    }
    out
}

pub(crate) fn temp_run_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hone-lm-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn metrics(out: &Collected, wanted: &str) -> Vec<f64> {
    out.events
        .iter()
        .filter_map(|e| match e {
            Event::Metric { name, value, .. } if name == wanted => Some(*value),
            _ => None,
        })
        .collect()
}

#[test]
fn sft_loss_falls_and_checkpoints_are_emitted() {
    let dir = temp_run_dir("sft");
    let out = run_sft(&dir, tiny_config(serde_json::json!({})), demos(60));
    let eval = metrics(&out, "eval_loss");
    let train = metrics(&out, "train_loss");
    assert_eq!(train.len(), 40);
    assert_eq!(eval.len(), 3, "before, at 20 and at the end: {eval:?}");
    let (first, last) = (eval[0], *eval.last().unwrap());
    assert!(last < first * 0.6, "eval loss {first} -> {last}");
    let policies: Vec<&ArtifactRef> = out.records[&0]
        .iter()
        .map(|r| match r {
            Record::Artifact(a) => a,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(policies.len(), 2, "ckpt-20 and final");
    assert!(
        policies[1].path.ends_with("final/model.safetensors"),
        "{}",
        policies[1].path
    );
    for a in &policies {
        assert_eq!(a.kind, "policy");
        let file = dir.join(&a.path);
        assert_eq!(hone_sdk::fs::sha256_file(&file).unwrap(), a.sha256);
        assert!(file.with_file_name("config.json").is_file());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_empty_round_emits_nothing() {
    let dir = temp_run_dir("sft-empty");
    let prompt = Record::Prompt(Prompt {
        id: "p".into(),
        text: "hi".into(),
        meta: Default::default(),
    });
    let out = run_sft(&dir, tiny_config(serde_json::json!({})), vec![prompt]);
    assert!(out.records.is_empty());
    assert_eq!(metrics(&out, "ignored"), vec![1.0]);
}

#[test]
fn bad_init_and_device_are_config_errors() {
    let init = StageInit::for_test(
        "lm.sft",
        tiny_config(serde_json::json!({"init": "no/such/dir"})),
    );
    let err = Sft::create(&init).err().unwrap();
    assert_eq!(err.config_field(), Some("init"), "{err}");
    let init = StageInit::for_test("lm.sft", tiny_config(serde_json::json!({"device": "tpu"})));
    assert_eq!(
        Sft::create(&init).err().unwrap().config_field(),
        Some("device")
    );
}

#[test]
fn fine_tuning_starts_from_the_init_checkpoint() {
    let dir = temp_run_dir("sft-init");
    let first = run_sft(&dir, tiny_config(serde_json::json!({})), demos(60));
    let trained = *metrics(&first, "eval_loss").last().unwrap();
    let config =
        tiny_config(serde_json::json!({"init": "outputs/sft/final", "steps": 5, "d_model": 64}));
    let second = run_sft_as("sft2", &dir, config, demos(60));
    // Same seed, same held-out set: it starts where the first run ended
    // (its shape is the checkpoint's, not d_model 64).
    assert!((metrics(&second, "eval_loss")[0] - trained).abs() < 1e-4);
    let lineage = second.events.iter().find_map(|e| match e {
        Event::Artifact { lineage, .. } => Some(lineage.clone()),
        _ => None,
    });
    assert_eq!(lineage.unwrap()[0], "fine-tuned from outputs/sft/final");
    std::fs::remove_dir_all(&dir).unwrap();
}

const SMOLLM: &str = hone_pretrained::smollm::MODEL_NAME;

/// SmolLM2 fine-tuned briefly, its top layer only, on short sequences.
fn smollm_config(overrides: serde_json::Value) -> serde_json::Value {
    let mut config = tiny_config(serde_json::json!({
        "pretrained": SMOLLM, "train_layers": 1, "max_tokens": 40, "steps": 6, "batch_size": 4,
        "lr": 3e-4, "min_lr": 3e-5, "warmup": 1, "eval_fraction": 0.25, "eval_every": 0,
        "checkpoint_every": 0,
    }));
    for (k, v) in overrides.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

#[test]
fn smollm2_gradients_reach_the_trained_layers_only() {
    let dir = hone_sdk::pretrained::fetch(SMOLLM).unwrap();
    let chat = ChatLlama::load(&dir, &Device::Cpu).unwrap();
    let net = Net::Llama(Box::new(Tuned::new(chat, 1, 40, None, 0).unwrap()));
    let demo = Demo {
        id: "d".into(),
        prompt: "Human: say apple\n\nAssistant:".into(),
        response: " apple apple apple.".into(),
    };
    let (example, cut) = net.encode(&demo, 40).unwrap();
    assert!(!cut);
    let (loss, tokens) = net.loss(&[example], &Device::Cpu).unwrap();
    // " apple apple apple." and the turn's end.
    assert_eq!(tokens, 5.0);
    let grads = loss.backward().unwrap();
    let Net::Llama(tuned) = &net else {
        unreachable!()
    };
    let missing = hone_models::train::vars_without_gradient(&tuned.chat.vars, &grads).unwrap();
    let vars = tuned.chat.vars.data().lock().unwrap();
    let trained = |n: &str| n == "model.norm.weight" || n.starts_with("model.layers.29.");
    let mut frozen: Vec<String> = vars.keys().filter(|n| !trained(n)).cloned().collect();
    frozen.sort();
    assert_eq!(missing, frozen);
    drop(vars);
    assert_eq!(net.trainable().len(), 9 + 1);
}

#[test]
fn smollm2_sft_lowers_the_loss_and_its_checkpoint_trains_again() {
    let dir = temp_run_dir("sft-smollm");
    let out = run_sft(&dir, smollm_config(serde_json::json!({})), demos(16));
    let eval = metrics(&out, "eval_loss");
    assert_eq!(eval.len(), 2, "before and after: {eval:?}");
    assert!(eval[1] < eval[0] * 0.8, "eval loss {eval:?}");
    let train = metrics(&out, "train_loss");
    assert!(train[5] < train[0], "train loss {train:?}");
    let logs = out.logs();
    assert!(
        logs.iter().any(|l| l.contains("of 134515008 parameters")),
        "{logs:?}"
    );
    let policy = out.artifacts(0).pop().expect("a policy");
    let ckpt = crate::checkpoint_dir_in(&dir, &policy);
    assert!(ChatLlama::is_checkpoint(&ckpt));
    let lineage = out.events.iter().find_map(|e| match e {
        Event::Artifact { lineage, .. } => Some(lineage.clone()),
        _ => None,
    });
    assert_eq!(
        lineage.unwrap(),
        vec![
            format!("fine-tuned from {SMOLLM} (pretrained)"),
            "lm.sft step 6".to_string(),
            format!("base {SMOLLM}, top 1 layers trained"),
        ]
    );
    // From its own checkpoint, training starts where it ended (same seed,
    // same held-out demos).
    let config = smollm_config(serde_json::json!({
        "pretrained": "", "init": "outputs/sft/final", "steps": 1,
    }));
    let second = run_sft_as("sft2", &dir, config, demos(16));
    let resumed = metrics(&second, "eval_loss")[0];
    assert!(
        (resumed - eval[1]).abs() < 1e-4,
        "{resumed} against {eval:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_start_named_twice_or_an_unknown_model_is_a_config_error() {
    let both = smollm_config(serde_json::json!({"init": "outputs/sft/final"}));
    let err = Sft::create(&StageInit::for_test("lm.sft", both))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("pretrained"), "{err}");
    assert!(err.to_string().contains("both name a start"), "{err}");
    let unknown = smollm_config(serde_json::json!({"pretrained": "gpt-5"}));
    let err = Sft::create(&StageInit::for_test("lm.sft", unknown))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("pretrained"), "{err}");
}

#[test]
fn smollm2_lora_trains_only_its_adapters_and_saves_the_merged_model() {
    use hone_models::lora::LoraConfig;
    let dir = hone_sdk::pretrained::fetch(SMOLLM).unwrap();
    let chat = ChatLlama::load(&dir, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let tuned = Tuned::new(chat, 2, 40, Some(&lora), 3).unwrap();
    // Per layer: q's A [4, 576] and B [576, 4], v's A [4, 576] and B [192, 4].
    let trainable = tuned.trainable();
    assert_eq!(trainable.len(), 2 * 2 * 2);
    assert_eq!(tuned.counts().0, 2 * (2 * 4 * 576 + 4 * 576 + 4 * 192));
    let names: Vec<&str> = tuned.adapters().iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"model.layers.29.self_attn.q_proj.lora_A"),
        "{names:?}"
    );
    assert!(names
        .iter()
        .all(|n| n.starts_with("model.layers.28.") || n.starts_with("model.layers.29.")));
    let demo = Demo {
        id: "d".into(),
        prompt: "Human: say apple\n\nAssistant:".into(),
        response: " apple apple apple.".into(),
    };
    let (example, _) = tuned.demo(&demo.prompt, &demo.response).unwrap();
    let (lp, _) = tuned.sequence_logprobs(&[&example], &Device::Cpu).unwrap();
    let grads = lp.sum_all().unwrap().backward().unwrap();
    // No weight of the model itself gets a gradient (the adapted layers are
    // frozen whole); B's do from the start.
    let missing = hone_models::train::vars_without_gradient(&tuned.chat.vars, &grads).unwrap();
    assert_eq!(missing.len(), tuned.chat.vars.all_vars().len());
    for (name, var) in tuned.adapters() {
        let g = grads.get(var.as_tensor()).expect(name);
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(norm > 0.0, name.ends_with("lora_B"), "{name}: {norm}");
    }
    // With B moved off zero, the saved checkpoint is the adapted model.
    for (name, var) in tuned.adapters() {
        if name.ends_with("lora_B") {
            let noise = hone_models::Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
            var.set(&noise).unwrap();
        }
    }
    let adapted = tuned
        .sequence_logprobs(&[&example], &Device::Cpu)
        .unwrap()
        .0;
    let adapted = adapted.to_vec1::<f32>().unwrap()[0];
    let out = temp_run_dir("sft-lora-merged");
    tuned.chat.save(&out).unwrap();
    let plain = ChatLlama::from_checkpoint(&out, &Device::Cpu).unwrap();
    let row = |v: &[u32]| {
        hone_models::Tensor::new(v, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let mask = hone_models::Tensor::new(example.mask.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = plain.model.forward(&row(&example.inputs)).unwrap();
    let whole = hone_models::train::sequence_logprobs(&logits, &row(&example.targets), &mask)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(
        (adapted - whole).abs() < 1e-3 * whole.abs().max(1.0),
        "adapted {adapted}, merged checkpoint {whole}"
    );
    // And the adapters moved it: the saved weights are the base ones plus
    // the update, where there is one.
    let base = ChatLlama::load(&dir, &Device::Cpu).unwrap();
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let moved = |name: &str| {
        let base = base.vars.data().lock().unwrap()[name].as_tensor().clone();
        (&saved[name] - base)
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
    assert!(moved("model.layers.29.self_attn.q_proj.weight") > 1e-4);
    assert!(moved("model.layers.28.self_attn.v_proj.weight") > 1e-4);
    assert_eq!(moved("model.layers.29.self_attn.k_proj.weight"), 0.0);
    assert_eq!(moved("model.layers.27.self_attn.q_proj.weight"), 0.0);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn smollm2_sft_with_lora_lowers_the_loss() {
    let dir = temp_run_dir("sft-smollm-lora");
    let config = smollm_config(serde_json::json!({
        "lora_rank": 8, "lora_alpha": 16.0, "lr": 1e-2, "min_lr": 1e-3,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }));
    let out = run_sft(&dir, config, demos(16));
    let eval = metrics(&out, "eval_loss");
    assert!(eval[1] < eval[0] * 0.9, "eval loss {eval:?}");
    let policy = out.artifacts(0).pop().expect("a policy");
    assert!(ChatLlama::is_checkpoint(&crate::checkpoint_dir_in(
        &dir, &policy
    )));
    let lineage = out.events.iter().find_map(|e| match e {
        Event::Artifact { lineage, .. } => Some(lineage.clone()),
        _ => None,
    });
    assert_eq!(
        lineage.unwrap()[2],
        format!(
            "base {SMOLLM}, LoRA rank 8 alpha 16 on q_proj, k_proj, v_proj, o_proj, gate_proj, \
             up_proj, down_proj of the top 1 layers, merged"
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lora_on_the_gpt_or_with_a_bad_alpha_is_a_config_error() {
    let gpt = tiny_config(serde_json::json!({"lora_rank": 4}));
    let err = Sft::create(&StageInit::for_test("lm.sft", gpt))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("lora_rank"), "{err}");
    let alpha = smollm_config(serde_json::json!({"lora_rank": 4, "lora_alpha": 0.0}));
    let err = Sft::create(&StageInit::for_test("lm.sft", alpha))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("lora_alpha"), "{err}");
    let target = smollm_config(serde_json::json!({"lora_rank": 4, "lora_targets": ["qkv"]}));
    let err = Sft::create(&StageInit::for_test("lm.sft", target))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("lora_targets"), "{err}");
}
