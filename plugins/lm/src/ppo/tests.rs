//! In-process tests of `lm.ppo`: a known optimum is approached, every
//! parameter of the policy and the critic gets a gradient, a zero
//! advantage at ratio 1 moves nothing, the state carries across rounds,
//! and bad inputs fail clearly.

use super::*;
use crate::grpo::tests::{completion, logprobs, on_policy, policy, score};
use crate::sft::tests::temp_run_dir;
use hone_models::tokenizer::Tokenizer as _;
use hone_sdk::Collected;
use serde_json::json;

fn init(dir: &std::path::Path, config: serde_json::Value) -> StageInit {
    let mut c = hone_sdk::testing::full_config::<Ppo>(json!({"score": "reward"}));
    for (k, v) in config.as_object().unwrap() {
        c[k] = v.clone();
    }
    let mut init = StageInit::for_test("lm.ppo", c);
    init.stage_id = "ppo".into();
    init.run_dir = dir.to_path_buf();
    init
}

/// Runs `rounds` rounds of one stage instance, each fed the same inputs;
/// with `feedback`, the policy a round emits is the next round's `policy`
/// (as a feedback edge delivers it).
fn run_rounds(
    init: &StageInit,
    inputs: &[(usize, Vec<Record>)],
    rounds: u64,
    feedback: bool,
) -> Result<Vec<Collected>, StageError> {
    let mut stage = Ppo::create(init)?;
    let mut outs: Vec<Collected> = Vec::new();
    for round in 0..rounds {
        let policy = outs
            .last()
            .filter(|_| feedback)
            .map(|last| last.emitted(0).to_vec());
        outs.push(one_round(&mut stage, init, inputs, round, policy)?);
    }
    Ok(outs)
}

/// One round of `stage`, `policy` (when given) replacing port 2's input.
fn one_round(
    stage: &mut Ppo,
    init: &StageInit,
    inputs: &[(usize, Vec<Record>)],
    round: u64,
    policy: Option<Vec<Record>>,
) -> Result<Collected, StageError> {
    let inputs = inputs
        .iter()
        .map(|(port, batch)| match &policy {
            Some(p) if *port == 2 => (*port, p.clone()),
            _ => (*port, batch.clone()),
        })
        .collect();
    hone_sdk::testing::run_round_of(stage, init, round, inputs)
}

fn run(
    dir: &std::path::Path,
    config: serde_json::Value,
    inputs: Vec<(usize, Vec<Record>)>,
) -> Result<Collected, StageError> {
    Ok(run_rounds(&init(dir, config), &inputs, 1, false)?.remove(0))
}

const YES: &str = " yes";
const NO: &str = " no";

fn prompt(i: usize) -> String {
    format!("Human: question {i}?\n\nAssistant:")
}

/// Four answers to each of 8 prompts, " yes" rewarded and " no" not, with
/// the start policy's own log-probs (and the reference's, shifted by
/// `ref_shift` per token).
fn toy(dir: &std::path::Path, start: &ArtifactRef, ref_shift: f32) -> Vec<(usize, Vec<Record>)> {
    let tok = hone_models::tokenizer::ByteTokenizer;
    let (yes, no) = (tok.encode(YES), tok.encode(NO));
    let (mut comps, mut scores) = (Vec::new(), Vec::new());
    for i in 0..8 {
        for (k, (ids, r)) in [(&yes, 1.0), (&no, 0.0), (&yes, 1.0), (&no, 0.0)]
            .into_iter()
            .enumerate()
        {
            let id = format!("p{i}#{k}");
            let lp = logprobs(dir, start, &prompt(i), ids);
            let mut c = completion(&id, &format!("p{i}"), &prompt(i), ids.clone(), lp);
            for r in &mut c.ref_logprobs {
                *r -= ref_shift;
            }
            comps.push(Record::Completion(c));
            scores.push(score(&id, r));
        }
    }
    vec![
        (0, comps),
        (1, scores),
        (2, vec![Record::Artifact(start.clone())]),
    ]
}

/// log π(yes) − log π(no) for prompt 0.
/// The policy lineage line of the artifact a round registered.
fn steps(out: &Collected) -> String {
    out.events
        .iter()
        .find_map(|e| match e {
            hone_sdk::Event::Artifact {
                artifact, lineage, ..
            } if artifact.kind == "policy" => lineage.last().cloned(),
            _ => None,
        })
        .expect("a policy registered")
}

fn gap(dir: &std::path::Path, a: &ArtifactRef) -> f32 {
    let tok = hone_models::tokenizer::ByteTokenizer;
    let lp = |ids: &[u32]| logprobs(dir, a, &prompt(0), ids).iter().sum::<f32>();
    lp(&tok.encode(YES)) - lp(&tok.encode(NO))
}

/// The known optimum: within one round of 4 epochs (16 steps), PPO moves
/// probability to the rewarded answer.
#[test]
fn ppo_moves_the_policy_towards_the_rewarded_answer() {
    let dir = temp_run_dir("ppo-toy");
    let start = policy(&dir);
    let before = gap(&dir, &start);
    let out = run(
        &dir,
        json!({"epochs": 4, "lr": 3e-3, "critic_lr": 3e-3, "batch_size": 8, "max_new_tokens": 4}),
        toy(&dir, &start, 0.0),
    )
    .unwrap();
    let updated = out.artifacts(0).pop().expect("a policy");
    let after = gap(&dir, &updated);
    assert!(
        after > before + 1.0,
        "log-prob gap yes - no {before} -> {after}"
    );
    let m = out.metrics();
    assert_eq!(m["reward"], 0.5);
    // The samples are the reference's: the KL starts at exactly 0.
    assert_eq!(m["kl"], 0.0);
    assert_eq!(m["kl_k3"], 0.0);
    assert_eq!(m["no_eos"], 1.0);
    assert_eq!(m["epochs_run"], 4.0);
    assert_eq!(m["response_length"], 3.5);
    assert!(m["entropy"] > 0.0 && m["value_loss"] > 0.0, "{m:?}");
    assert!(
        m["clip_fraction"] > 0.0,
        "lr 3e-3 moves the ratio past 1.2: {m:?}"
    );
    // The critic is registered beside the policy.
    let critic = dir.join("outputs/ppo/critic/model.safetensors");
    assert!(critic.is_file(), "{}", critic.display());
    // The same seed gives the same weights.
    let again = run(
        &dir,
        json!({"epochs": 4, "lr": 3e-3, "critic_lr": 3e-3, "batch_size": 8, "max_new_tokens": 4}),
        toy(&dir, &start, 0.0),
    )
    .unwrap();
    assert_eq!(again.artifacts(0)[0].sha256, updated.sha256);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The loss of one mini-batch, built by hand: with advantage 0 at ratio 1
/// the policy gets no gradient while the critic still learns; with a
/// non-zero advantage every policy parameter and every critic parameter
/// but its unused LM head gets one.
#[test]
fn gradients_reach_every_parameter_and_a_zero_advantage_moves_no_policy_weight() {
    let dir = temp_run_dir("ppo-grads");
    let start = policy(&dir);
    let init = init(&dir, json!({"max_new_tokens": 4}));
    let mut stage = Ppo::create(&init).unwrap();
    let learner = Learner::resume_or_load(None, Some(&start), &stage.spec(&dir)).unwrap();
    stage
        .ensure_critic(&Context::new(&mut Collected::default(), &init, 0), &learner)
        .unwrap();
    let Learner::Gpt(trainee) = &learner else {
        panic!("a GPT policy loads as one")
    };
    let varmap = trainee.varmap.clone();
    let ids = trainee.tok.encode(YES);
    let sample = |advantage: f32| {
        let lp = logprobs(&dir, &start, &prompt(1), &ids);
        let c = completion("c", "p", &prompt(1), ids.clone(), lp);
        let sampled = learner.sampled(&c, 4).unwrap();
        let n = sampled.tokens();
        Sample {
            sampled,
            rewards: vec![0.0; n],
            values: vec![0.5; n],
            advantages: vec![advantage; n],
            returns: vec![1.0; n],
        }
    };
    let state = stage.critic.as_ref().unwrap();
    let zero = sample(0.0);
    let (loss, stats) = stage.loss(&learner, state, &[&zero]).unwrap();
    assert!(stats.policy_loss.abs() < 1e-7, "{}", stats.policy_loss);
    assert!(stats.approx_kl.abs() < 1e-6 && stats.clipped == 0.0);
    let grads = loss.backward().unwrap();
    for var in varmap.all_vars() {
        if let Some(g) = grads.get(&var) {
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm < 1e-12,
                "a policy weight moved with advantage 0: {norm}"
            );
        }
    }
    let critic_vars = state.vars();
    assert!(critic_vars.iter().all(|v| grads.get(v).is_some()));
    let one = sample(1.0);
    let (loss, _) = stage.loss(&learner, state, &[&one]).unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        hone_models::train::vars_without_gradient(&varmap, &grads).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        hone_models::train::vars_without_gradient(state.varmap(), &grads).unwrap(),
        ["lm_head.weight"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two rounds of one stage: the critic keeps learning (its value loss on
/// the same samples falls), an adaptive β rises when the KL is above the
/// target, by the controller's rule, and the policy's optimizer carries on
/// when the next round's policy is the one this stage emitted (and starts
/// afresh on another).
#[test]
fn the_critic_and_the_kl_controller_carry_across_rounds() {
    let dir = temp_run_dir("ppo-rounds");
    let start = policy(&dir);
    // ref 0.5 nats below each token: the sequence KL (k1) is 0.5 per token.
    let inputs = toy(&dir, &start, 0.5);
    let config = json!({"epochs": 2, "lr": 1e-9, "critic_lr": 3e-3, "batch_size": 8,
        "max_new_tokens": 4, "target_kl": 1.0, "horizon": 100.0, "beta": 0.05});
    let outs = run_rounds(&init(&dir, config.clone()), &inputs, 2, true).unwrap();
    let (a, b) = (outs[0].metrics(), outs[1].metrics());
    let kl = a["kl"];
    assert!((kl - 0.5 * 3.5).abs() < 1e-4, "kl {kl}");
    assert_eq!(a["beta"], 0.05);
    // kl / target − 1 = 0.625, clipped to 0.2; 32 samples over a horizon of 100.
    assert!(
        (b["beta"] - 0.05 * (1.0 + 0.2 * 32.0 / 100.0)).abs() < 1e-12,
        "{b:?}"
    );
    assert!(
        b["value_loss"] < a["value_loss"],
        "round 0 {} -> round 1 {}",
        a["value_loss"],
        b["value_loss"]
    );
    assert!(
        b["explained_variance"] > a["explained_variance"],
        "{a:?} {b:?}"
    );
    assert!(steps(&outs[0]).ends_with(", 8 optimizer steps in all"));
    assert!(steps(&outs[1]).ends_with(", 16 optimizer steps in all"));
    let reloaded = run_rounds(&init(&dir, config), &inputs, 2, false).unwrap();
    assert!(steps(&reloaded[1]).ends_with(", 8 optimizer steps in all"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn critic_warmup_trains_the_critic_first_and_only_in_its_first_round() {
    let dir = temp_run_dir("ppo-warmup");
    let start = policy(&dir);
    let inputs = toy(&dir, &start, 0.5);
    let config = |warmup: u64| {
        json!({"epochs": 1, "lr": 1e-9, "critic_lr": 3e-3, "batch_size": 8, "max_new_tokens": 4,
            "beta": 0.05, "critic_warmup": warmup})
    };
    let plain = run_rounds(&init(&dir, config(0)), &inputs, 1, true).unwrap();
    let outs = run_rounds(&init(&dir, config(4)), &inputs, 2, true).unwrap();
    let (a, b) = (outs[0].metrics(), outs[1].metrics());
    // 32 samples in batches of 8, 4 epochs: 16 value-only steps, the loss falling.
    let loss = outs[0].series("critic_warmup_loss");
    assert_eq!(loss.len(), 16);
    assert!(
        loss[12..].iter().sum::<f64>() < loss[..4].iter().sum::<f64>(),
        "{loss:?}"
    );
    // The advantages come from the warmed critic: it explains the returns better.
    assert!(
        a["explained_variance"] > a["explained_variance_before_warmup"],
        "{a:?}"
    );
    assert_eq!(
        a["explained_variance_before_warmup"],
        plain[0].metrics()["explained_variance"],
        "before the warm-up the critic is the one without"
    );
    // Later rounds do not warm up again.
    assert!(outs[1].series("critic_warmup_loss").is_empty());
    assert!(!b.contains_key("explained_variance_before_warmup"));
    // The policy's optimizer is untouched by the warm-up.
    assert!(steps(&outs[0]).ends_with(", 4 optimizer steps in all"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_settings_and_inputs_are_named() {
    let dir = temp_run_dir("ppo-errors");
    for (field, value) in [
        ("clip", json!(1.5)),
        ("gamma", json!(1.5)),
        ("lam", json!(-0.1)),
        ("value_clip", json!(0.0)),
        ("kl_estimator", json!("k2")),
        ("beta", json!(-1.0)),
        ("horizon", json!(0.0)),
    ] {
        let err = Ppo::create(&init(&dir, json!({ field: value })))
            .err()
            .unwrap_or_else(|| panic!("{field} = {value} accepted"));
        assert_eq!(err.config_field(), Some(field), "{err}");
    }
    let start = policy(&dir);
    let mut inputs = toy(&dir, &start, 0.0);
    for r in &mut inputs[0].1 {
        if let Record::Completion(c) = r {
            c.ref_logprobs.clear();
        }
    }
    let err = run(&dir, json!({"max_new_tokens": 4}), inputs.clone())
        .err()
        .unwrap();
    assert!(err.message.contains("lm.logprobs"), "{err}");
    assert_eq!(err.config_field(), Some("beta"));
    // Without a KL penalty, no reference is needed.
    let out = run(
        &dir,
        json!({"beta": 0.0, "max_new_tokens": 4}),
        inputs.clone(),
    )
    .unwrap();
    assert_eq!(out.metric("kl", None), Some(0.0));
    // A score missing is counted, not guessed.
    inputs[1].1.pop();
    let out = run(
        &dir,
        json!({"beta": 0.0, "max_new_tokens": 4}),
        inputs.clone(),
    )
    .unwrap();
    assert_eq!(out.metric("unscored", None), Some(1.0));
    // No policy: the error says what to wire.
    let err = run(&dir, json!({"beta": 0.0}), inputs[..2].to_vec())
        .err()
        .unwrap();
    assert!(err.message.contains("wire `policy`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Real samples from lm.rollout, scored by lm.logprobs under the same
/// policy, the reference wired: the ratio starts at 1 and every KL at 0.
#[test]
fn on_policy_samples_start_at_ratio_one_and_every_kl_at_zero() {
    let dir = temp_run_dir("ppo-onpolicy");
    let start = policy(&dir);
    let prompts: Vec<Record> = (0..3)
        .map(|i| {
            Record::Prompt(Prompt {
                id: format!("p{i}"),
                text: format!("Human: tell me about the river {i}.\n\nAssistant:"),
                meta: Default::default(),
            })
        })
        .collect();
    let policy_in = vec![Record::Artifact(start.clone())];
    let completions = on_policy(&dir, &start, prompts);
    let scores: Vec<Record> = completions
        .iter()
        .enumerate()
        .map(|(i, r)| score(r.id(), (i % 3) as f64))
        .collect();
    let out = run(
        &dir,
        json!({"epochs": 1, "batch_size": 12, "lr": 1e-9, "max_new_tokens": 12}),
        vec![
            (0, completions),
            (1, scores),
            (2, policy_in.clone()),
            (3, policy_in),
        ],
    )
    .unwrap();
    let m = out.metrics();
    assert_eq!(m["clip_fraction"], 0.0);
    assert!(m["approx_kl"].abs() < 1e-6, "{m:?}");
    for kl in ["kl", "kl_k3", "kl_exact"] {
        assert!(m[kl].abs() < 1e-4, "{kl} to the policy itself: {m:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stage restored from its snapshot at the end of round 0 takes round 1
/// exactly as the stage that never stopped: the same policy, the same
/// critic (weights, AdamW moments, step count, β and reward statistics all
/// came back). A snapshot that is not lm.ppo's is refused.
#[test]
fn a_restored_stage_continues_exactly_as_one_that_never_stopped() {
    let dir = temp_run_dir("ppo-snapshot");
    let start = policy(&dir);
    let inputs = toy(&dir, &start, 0.5);
    let config = json!({"epochs": 2, "lr": 3e-3, "critic_lr": 3e-3, "batch_size": 8,
        "max_new_tokens": 4, "target_kl": 1.0, "horizon": 100.0, "normalize_reward": true});
    let init = init(&dir, config);
    let straight = run_rounds(&init, &inputs, 2, true).unwrap();
    let mut first = Ppo::create(&init).unwrap();
    let round0 = one_round(&mut first, &init, &inputs, 0, None).unwrap();
    let bytes = first.snapshot(0).unwrap().expect("lm.ppo keeps state");
    drop(first);
    let mut resumed = Ppo::create(&init).unwrap();
    resumed.restore(0, &bytes).unwrap();
    let policy = Some(round0.emitted(0).to_vec());
    let round1 = one_round(&mut resumed, &init, &inputs, 1, policy).unwrap();
    assert_eq!(
        round1.artifacts(0)[0].sha256,
        straight[1].artifacts(0)[0].sha256
    );
    // Every metric but the wall times agrees.
    let timeless = |out: &Collected| {
        let mut m = out.metrics();
        m.retain(|k, _| !k.ends_with("_seconds"));
        m
    };
    assert_eq!(timeless(&round1), timeless(&straight[1]));
    assert_eq!(steps(&round1), steps(&straight[1]));
    // Not a snapshot of this stage: refused with the round named.
    let mut fresh = Ppo::create(&init).unwrap();
    let err = fresh.restore(3, &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(err.message.contains("round 3"), "{err}");
    let err = fresh
        .restore(3, &[bytes.as_slice(), &[0, 0]].concat())
        .unwrap_err();
    assert!(err.message.contains("not this stage's"), "{err}");
    // lm.grpo's snapshot (after the same toy round) is refused by name.
    let mut grpo_init = StageInit::for_test(
        "lm.grpo",
        hone_sdk::testing::full_config::<crate::Grpo>(
            json!({"score": "reward", "max_new_tokens": 4}),
        ),
    );
    grpo_init.stage_id = "grpo".into();
    grpo_init.run_dir = dir.clone();
    let mut grpo = crate::Grpo::create(&grpo_init).unwrap();
    hone_sdk::testing::run_round_of(&mut grpo, &grpo_init, 0, inputs.clone()).unwrap();
    let foreign = grpo.snapshot(0).unwrap().unwrap();
    let err = fresh.restore(0, &foreign).unwrap_err();
    assert!(
        err.message.contains("lm.grpo stage's, not lm.ppo's"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The options change the update as they say: an early stop on the
/// approximate KL ends the epochs, epochs visit every sample once when the
/// batch size does not divide them, and the k3 estimator, unwhitened
/// advantages, normalised rewards and a missing-EOS penalty each give
/// another policy than the defaults.
#[test]
fn early_stop_and_the_reward_options_take_effect() {
    let dir = temp_run_dir("ppo-options");
    let start = policy(&dir);
    let inputs = toy(&dir, &start, 0.5);
    let base = json!({"epochs": 4, "lr": 3e-3, "critic_lr": 3e-3, "batch_size": 12,
        "max_new_tokens": 4});
    let with = |extra: serde_json::Value| {
        let mut c = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        run(&dir, c, inputs.clone()).unwrap()
    };
    let plain = with(json!({}));
    // 32 samples in batches of 12: 3 per epoch (12, 12, 8), 12 steps.
    assert_eq!(plain.metric("epochs_run", None), Some(4.0));
    assert_eq!(plain.series("step_loss").len(), 12);
    let stopped = with(json!({"early_stop_kl": 1e-6}));
    let epochs = stopped.metric("epochs_run", None).unwrap();
    assert!(epochs < 1.0, "stopped after {epochs} epochs");
    assert!(
        stopped
            .logs()
            .iter()
            .any(|l| l.contains("early stop at step")),
        "{:?}",
        stopped.logs()
    );
    let sha = |out: &Collected| out.artifacts(0)[0].sha256.clone();
    for option in [
        json!({"kl_estimator": "k3"}),
        json!({"whiten_advantages": false}),
        json!({"normalize_reward": true}),
        json!({"missing_eos_penalty": 0.5}),
    ] {
        assert_ne!(
            sha(&with(option.clone())),
            sha(&plain),
            "{option} changed nothing"
        );
    }
    // The KL metrics do not depend on the estimator in the reward.
    let k3 = with(json!({"kl_estimator": "k3"}));
    assert_eq!(k3.metric("kl", None), plain.metric("kl", None));
    // An adaptive beta must start above 0.
    let err = Ppo::create(&init(&dir, json!({"beta": 0.0, "target_kl": 1.0})))
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("beta"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
