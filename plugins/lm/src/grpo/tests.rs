//! In-process tests of `lm.grpo`: a known optimum is approached, every
//! parameter gets a gradient, missing inputs fail clearly.

use super::*;
use crate::sft::data::to_tensors;
use crate::sft::tests::{demos, run_sft, temp_run_dir, tiny_config};
use hone_models::tokenizer::load_tokenizer;
use hone_models::tokenizer::Tokenizer as _;
use hone_models::train::token_logprobs;
use hone_sdk::Collected;
use serde_json::json;

/// A policy artifact (a briefly fine-tuned tiny GPT) in `dir`.
pub(crate) fn policy(dir: &std::path::Path) -> ArtifactRef {
    let out = run_sft(
        dir,
        tiny_config(json!({"steps": 5, "checkpoint_every": 0})),
        demos(16),
    );
    out.artifacts(0).pop().expect("a policy")
}

/// log pi(text | prompt) per token under the checkpoint of `a`.
pub(crate) fn logprobs(
    dir: &std::path::Path,
    a: &ArtifactRef,
    prompt: &str,
    ids: &[u32],
) -> Vec<f32> {
    let ckpt = dir.join(&a.path);
    let ckpt = ckpt.parent().unwrap();
    let (gpt, _) = checkpoint::load_gpt(ckpt, &Device::Cpu).unwrap();
    let tok = load_tokenizer(ckpt).unwrap();
    let c = completion("x", "p", prompt, ids.to_vec(), vec![0.0; ids.len()]);
    let s = Sampled::new(tok.as_ref(), &c, gpt.config().context, 4);
    let (x, y, _) =
        to_tensors(std::slice::from_ref(&s.example), tok.pad_id(), &Device::Cpu).unwrap();
    let lp = token_logprobs(&gpt.forward(&x).unwrap(), &y)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    lp[0][s.first..s.first + ids.len()].to_vec()
}

pub(crate) fn completion(
    id: &str,
    prompt_id: &str,
    prompt: &str,
    ids: Vec<u32>,
    lp: Vec<f32>,
) -> Completion {
    Completion {
        id: id.into(),
        prompt_id: prompt_id.into(),
        prompt: prompt.into(),
        text: String::new(),
        ref_logprobs: lp.clone(),
        token_ids: ids,
        token_logprobs: lp,
        values: vec![],
        policy: None,
        meta: Default::default(),
    }
}

pub(crate) fn score(id: &str, value: f64) -> Record {
    Record::Score(Score {
        id: id.into(),
        prompt_id: String::new(),
        name: "reward".into(),
        value,
    })
}

/// Four samples of each prompt from lm.rollout (12 new tokens at most)
/// under policy `a`, scored by lm.logprobs with `a` as the reference too:
/// completions whose ratio and KL to the sampler start at exactly 1 and 0.
pub(crate) fn on_policy(
    dir: &std::path::Path,
    a: &ArtifactRef,
    prompts: Vec<Record>,
) -> Vec<Record> {
    sampled_with(dir, a, prompts, json!({}))
}

/// [`on_policy`] with lm.rollout's config overridden by `rollout`.
fn sampled_with(
    dir: &std::path::Path,
    a: &ArtifactRef,
    prompts: Vec<Record>,
    rollout: serde_json::Value,
) -> Vec<Record> {
    use crate::{Logprobs, Rollout};
    let mut rollout_config = json!({"n": 4, "max_new_tokens": 12});
    for (k, v) in rollout.as_object().unwrap() {
        rollout_config[k] = v.clone();
    }
    let stage = |kind: &str, config: serde_json::Value| {
        let mut init = StageInit::for_test(kind, config);
        init.run_dir = dir.to_path_buf();
        init
    };
    let policy_in = vec![Record::Artifact(a.clone())];
    let sampled = hone_sdk::testing::run_round::<Rollout>(
        &stage(
            "lm.rollout",
            hone_sdk::testing::full_config::<Rollout>(rollout_config),
        ),
        vec![(0, prompts), (1, policy_in.clone())],
    )
    .unwrap();
    let scored = hone_sdk::testing::run_round::<Logprobs>(
        &stage(
            "lm.logprobs",
            hone_sdk::testing::full_config::<Logprobs>(json!({"max_new_tokens": 12})),
        ),
        vec![(0, sampled.emitted(0).to_vec()), (1, policy_in)],
    )
    .unwrap();
    scored.emitted(0).to_vec()
}

fn run(
    dir: &std::path::Path,
    config: serde_json::Value,
    inputs: Vec<(usize, Vec<Record>)>,
) -> Result<Collected, StageError> {
    let mut c = hone_sdk::testing::full_config::<Grpo>(json!({"score": "reward"}));
    for (k, v) in config.as_object().unwrap() {
        c[k] = v.clone();
    }
    let mut init = StageInit::for_test("lm.grpo", c);
    init.stage_id = "grpo".into();
    init.run_dir = dir.to_path_buf();
    hone_sdk::testing::run_round::<Grpo>(&init, inputs)
}

/// Two answers to each of 8 prompts, " yes" rewarded and " no" not, with
/// the policy's own log-probs: each baseline moves probability to " yes".
#[test]
fn each_baseline_moves_the_policy_towards_the_rewarded_answer() {
    let dir = temp_run_dir("grpo-toy");
    let start = policy(&dir);
    let tok = hone_models::tokenizer::ByteTokenizer;
    let (yes, no) = (tok.encode(" yes"), tok.encode(" no"));
    let prompt = |i: usize| format!("Human: question {i}?\n\nAssistant:");
    let gap = |a: &ArtifactRef| -> f32 {
        let lp = |ids: &[u32]| logprobs(&dir, a, &prompt(0), ids).iter().sum::<f32>();
        lp(&yes) - lp(&no)
    };
    let before = gap(&start);
    for baseline in ["rloo", "grpo", "dr_grpo"] {
        let (mut comps, mut scores) = (Vec::new(), Vec::new());
        for i in 0..8 {
            for (k, (ids, r)) in [(&yes, 1.0), (&no, 0.0), (&yes, 1.0), (&no, 0.0)]
                .into_iter()
                .enumerate()
            {
                let id = format!("p{i}#{k}");
                let lp = logprobs(&dir, &start, &prompt(i), ids);
                comps.push(Record::Completion(completion(
                    &id,
                    &format!("p{i}"),
                    &prompt(i),
                    ids.clone(),
                    lp,
                )));
                scores.push(score(&id, r));
            }
        }
        let out = run(
            &dir,
            json!({"baseline": baseline, "epochs": 4, "lr": 3e-3, "batch_size": 8, "max_new_tokens": 4}),
            vec![(0, comps), (1, scores), (2, vec![Record::Artifact(start.clone())])],
        )
        .unwrap();
        assert_eq!(out.metric("groups", None), Some(8.0));
        assert_eq!(out.metric("reward", None), Some(0.5));
        let updated = out.artifacts(0).pop().expect("a policy");
        let after = gap(&updated);
        assert!(
            after > before + 1.0,
            "{baseline}: log-prob gap yes - no {before} -> {after}"
        );
        // On-policy at the first step: the k3 KL starts at 0 and stays small.
        let kl = out.metric("kl", None).unwrap();
        assert!((0.0..1.0).contains(&kl), "{baseline}: kl {kl}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn equal_rewards_teach_nothing_and_inputs_are_checked() {
    let dir = temp_run_dir("grpo-equal");
    let start = policy(&dir);
    let tok = hone_models::tokenizer::ByteTokenizer;
    let ids = tok.encode(" maybe");
    let lp = logprobs(&dir, &start, "q", &ids);
    let comps: Vec<Record> = (0..4)
        .map(|k| {
            Record::Completion(completion(
                &format!("c{k}"),
                "p",
                "q",
                ids.clone(),
                lp.clone(),
            ))
        })
        .collect();
    let scores: Vec<Record> = (0..4).map(|k| score(&format!("c{k}"), 0.7)).collect();
    let input = |comps: Vec<Record>| {
        vec![
            (0, comps),
            (1, scores.clone()),
            (2, vec![Record::Artifact(start.clone())]),
        ]
    };
    let out = run(&dir, json!({"kl": "none"}), input(comps.clone())).unwrap();
    // Zero advantages, ratio 1: the loss and its gradient are zero, so the
    // weights do not move.
    assert_eq!(out.metric("loss", None), Some(0.0));
    assert_eq!(out.artifacts(0)[0].sha256, start.sha256);
    // Without ref_logprobs, a KL setting says what to wire.
    let mut bare = comps.clone();
    for r in &mut bare {
        if let Record::Completion(c) = r {
            c.ref_logprobs.clear();
        }
    }
    let err = run(&dir, json!({"kl": "k3"}), input(bare)).err().unwrap();
    assert!(err.message.contains("lm.logprobs"), "{err}");
    assert_eq!(err.config_field(), Some("kl"));
    // Without token ids: a clear error.
    let mut text_only = comps.clone();
    if let Record::Completion(c) = &mut text_only[0] {
        c.token_ids.clear();
    }
    let err = run(&dir, json!({}), input(text_only)).err().unwrap();
    assert!(err.message.contains("token ids"), "{err}");
    // LoRA adapters are for SmolLM2: on hone's GPT they are refused by field.
    let err = run(&dir, json!({"lora_rank": 4}), input(comps.clone()))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("lora_rank"), "{err}");
    // No policy at all.
    let err = run(&dir, json!({}), vec![(0, input(vec![]).remove(1).1)]);
    assert!(err.is_ok(), "no completions: nothing to do");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Real samples from lm.rollout, scored by lm.logprobs under the same
/// policy: at the first step the ratio is 1 (nothing clipped) and the k3 KL
/// is 0, even for prompts longer than the room rollout keeps for them.
#[test]
fn on_policy_samples_start_at_ratio_one_and_zero_kl() {
    let dir = temp_run_dir("grpo-onpolicy");
    let start = policy(&dir);
    let long =
        "Human: tell me a long story about a river, a stone, a cloud and a tiger.\n\nAssistant:";
    let prompts: Vec<Record> = (0..3)
        .map(|i| {
            Record::Prompt(Prompt {
                id: format!("p{i}"),
                text: format!("{long} {i}"),
                meta: Default::default(),
            })
        })
        .collect();
    let policy_in = vec![Record::Artifact(start.clone())];
    let completions = on_policy(&dir, &start, prompts);
    assert_eq!(completions.len(), 12);
    let scores: Vec<Record> = completions
        .iter()
        .enumerate()
        .map(|(i, r)| score(r.id(), (i % 3) as f64))
        .collect();
    let out = run(
        &dir,
        json!({"epochs": 1, "batch_size": 12, "lr": 1e-9, "max_new_tokens": 12}),
        vec![(0, completions), (1, scores), (2, policy_in)],
    )
    .unwrap();
    assert_eq!(out.metric("clip_fraction", None), Some(0.0));
    let kl = out.metric("kl", None).unwrap();
    assert!(kl.abs() < 1e-4, "k3 to the policy itself: {kl}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn samples_drawn_at_another_temperature_are_refused() {
    let dir = temp_run_dir("grpo-temperature");
    let start = policy(&dir);
    let prompts: Vec<Record> = (0..2)
        .map(|i| {
            Record::Prompt(Prompt {
                id: format!("p{i}"),
                text: format!("Human: question {i}?\n\nAssistant:"),
                meta: Default::default(),
            })
        })
        .collect();
    let plain = sampled_with(&dir, &start, prompts.clone(), json!({}));
    assert!(plain.iter().all(|r| match r {
        Record::Completion(c) => !c.meta.contains_key("sampling"),
        _ => true,
    }));
    for rollout in [json!({"temperature": 0.7}), json!({"top_k": 5})] {
        let completions = sampled_with(&dir, &start, prompts.clone(), rollout.clone());
        let scores: Vec<Record> = completions.iter().map(|r| score(r.id(), 1.0)).collect();
        let err = run(
            &dir,
            json!({"max_new_tokens": 12}),
            vec![
                (0, completions),
                (1, scores),
                (2, vec![Record::Artifact(start.clone())]),
            ],
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("temperature 1 without top_k"),
            "{rollout}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stage restored from its snapshot at the end of round 0 takes round 1
/// exactly as the stage that never stopped (the policy's weights, AdamW
/// moments and step count came back).
#[test]
fn a_restored_stage_continues_exactly_as_one_that_never_stopped() {
    let dir = temp_run_dir("grpo-snapshot");
    let start = policy(&dir);
    let tok = hone_models::tokenizer::ByteTokenizer;
    let (mut comps, mut scores) = (Vec::new(), Vec::new());
    for i in 0..4 {
        let prompt = format!("Human: question {i}?\n\nAssistant:");
        for (k, (text, r)) in [(" yes", 1.0), (" no", 0.0)].into_iter().enumerate() {
            let id = format!("p{i}#{k}");
            let ids = tok.encode(text);
            let lp = logprobs(&dir, &start, &prompt, &ids);
            comps.push(Record::Completion(completion(
                &id,
                &format!("p{i}"),
                &prompt,
                ids,
                lp,
            )));
            scores.push(score(&id, r));
        }
    }
    let mut c = hone_sdk::testing::full_config::<Grpo>(json!({"score": "reward"}));
    c["lr"] = json!(3e-3);
    c["max_new_tokens"] = json!(4);
    c["batch_size"] = json!(4);
    let mut init = StageInit::for_test("lm.grpo", c);
    init.stage_id = "grpo".into();
    init.run_dir = dir.clone();
    let round = |stage: &mut Grpo, r: u64, policy: &ArtifactRef| -> Collected {
        let inputs = vec![
            (0, comps.clone()),
            (1, scores.clone()),
            (2, vec![Record::Artifact(policy.clone())]),
        ];
        hone_sdk::testing::run_round_of(stage, &init, r, inputs).unwrap()
    };
    let mut straight = Grpo::create(&init).unwrap();
    let a0 = round(&mut straight, 0, &start).artifacts(0).remove(0);
    let a1 = round(&mut straight, 1, &a0).artifacts(0).remove(0);
    let mut first = Grpo::create(&init).unwrap();
    let b0 = round(&mut first, 0, &start).artifacts(0).remove(0);
    assert_eq!(a0, b0);
    let bytes = first.snapshot(0).unwrap().expect("lm.grpo keeps state");
    let mut resumed = Grpo::create(&init).unwrap();
    resumed.restore(0, &bytes).unwrap();
    let b1 = round(&mut resumed, 1, &b0).artifacts(0).remove(0);
    assert_eq!(a1.sha256, b1.sha256);
    // Without the snapshot, round 1 starts a fresh optimizer: not the same.
    let mut forgetful = Grpo::create(&init).unwrap();
    let c1 = round(&mut forgetful, 1, &b0).artifacts(0).remove(0);
    assert_ne!(a1.sha256, c1.sha256);
    std::fs::remove_dir_all(&dir).unwrap();
}
