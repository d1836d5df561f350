//! lm.ppo on SmolLM2-135M-Instruct: the pretrained model samples
//! (lm.rollout), is its own reference (lm.logprobs), and learns from
//! rewarded samples with a critic on its frozen layers' states; the ratio
//! starts at 1; every trained weight of the policy and of the critic gets
//! a gradient; a restored stage continues exactly.

use super::*;
use crate::grpo::tests_smollm::{gains, inputs, reward, sampled, stage, NEW_TOKENS, SMOLLM};
use crate::sft::tests::temp_run_dir;
use hone_sdk::Collected;
use serde_json::json;

fn ppo_init(dir: &std::path::Path) -> StageInit {
    let config = hone_sdk::testing::full_config::<Ppo>(json!({
        "score": "reward", "pretrained": SMOLLM, "train_layers": 1, "epochs": 3,
        "batch_size": 4, "lr": 1e-4, "critic_lr": 1e-4, "beta": 0.05,
        "max_new_tokens": NEW_TOKENS,
    }));
    stage(dir, "lm.ppo", config)
}

/// A sample as PPO would hold it, with a constant advantage.
fn held(learner: &Learner, c: &Completion, advantage: f32) -> Sample {
    let sampled = learner.sampled(c, NEW_TOKENS).unwrap();
    let n = sampled.tokens();
    Sample {
        sampled,
        rewards: vec![0.0; n],
        values: vec![0.0; n],
        advantages: vec![advantage; n],
        returns: vec![reward(c) as f32; n],
    }
}

#[test]
fn smollm2_ppo_learns_from_its_own_rewarded_samples_and_resumes_exactly() {
    let dir = temp_run_dir("ppo-smollm");
    let comps = sampled(&dir);
    assert_eq!(comps.len(), 8);
    let init = ppo_init(&dir);
    let mut straight = Ppo::create(&init).unwrap();
    let out: Collected =
        hone_sdk::testing::run_round_of(&mut straight, &init, 0, inputs(&comps, None)).unwrap();
    // On its own samples the policy starts at ratio 1: the sampled and the
    // reference log-probs are the same model's, so the KL is 0.
    let kl = out.metric("kl", None).unwrap();
    assert!(kl.abs() < 0.05, "kl {kl}");
    for name in ["value_loss", "explained_variance", "entropy", "approx_kl"] {
        let v = out.metric(name, None).unwrap();
        assert!(v.is_finite(), "{name} {v}");
    }
    assert!(out.metric("entropy", None).unwrap() > 0.0);
    let a0 = out.artifacts(0).pop().expect("a policy");
    assert!(dir
        .join("outputs/lm_ppo/critic/model.safetensors")
        .is_file());
    // Under the updated policy the rewarded samples gained log-probability
    // against the others.
    let (up, down) = gains(&dir, &comps, &a0);
    assert!(
        up > down + 0.5,
        "log-prob change: rewarded {up}, others {down}"
    );
    // Round 1 from the snapshot taken after round 0 takes the same steps,
    // the critic's included.
    let bytes = straight.snapshot(0).unwrap().expect("lm.ppo keeps state");
    let run = |stage: &mut Ppo| {
        let out =
            hone_sdk::testing::run_round_of(stage, &init, 1, inputs(&comps, Some(&a0))).unwrap();
        (
            out.artifacts(0).remove(0).sha256,
            out.metric("value_loss", None).unwrap(),
        )
    };
    let a1 = run(&mut straight);
    let mut resumed = Ppo::create(&init).unwrap();
    resumed.restore(0, &bytes).unwrap();
    let b1 = run(&mut resumed);
    assert_eq!(a1, b1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// At ratio 1 with advantage 0 no policy weight moves; with an advantage
/// every weight of the trained layer and the final norm, and every weight
/// of the critic (its layer, its norm, its value head), gets a gradient.
#[test]
fn smollm2_ppo_gradients_reach_every_trained_weight_of_policy_and_critic() {
    let dir = temp_run_dir("ppo-smollm-grads");
    let comps = sampled(&dir);
    let init = ppo_init(&dir);
    let mut ppo = Ppo::create(&init).unwrap();
    let learner = Learner::resume_or_load(None, None, &ppo.spec(&dir)).unwrap();
    ppo.ensure_critic(&Context::new(&mut Collected::default(), &init, 0), &learner)
        .unwrap();
    let critic = ppo.critic.as_ref().unwrap();
    let norm = |g: &Tensor| {
        g.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let zero: Vec<Sample> = comps.iter().map(|c| held(&learner, c, 0.0)).collect();
    let batch: Vec<&Sample> = zero.iter().collect();
    let (loss, stats) = ppo.loss(&learner, critic, &batch).unwrap();
    // The sampler's log-probs (KV-cached decoding) are the teacher-forced ones.
    assert!(
        stats.approx_kl.abs() < 1e-4,
        "approx kl {}",
        stats.approx_kl
    );
    assert_eq!(stats.clipped, 0.0);
    let grads = loss.backward().unwrap();
    for v in learner.vars() {
        if let Some(g) = grads.get(&v) {
            assert!(norm(g) < 1e-10, "a policy weight moved with advantage 0");
        }
    }
    let signed: Vec<Sample> = comps
        .iter()
        .map(|c| held(&learner, c, if reward(c) > 0.0 { 1.0 } else { -1.0 }))
        .collect();
    let batch: Vec<&Sample> = signed.iter().collect();
    let (loss, _) = ppo.loss(&learner, critic, &batch).unwrap();
    let grads = loss.backward().unwrap();
    let (policy, critic) = (learner.vars(), critic.vars());
    // One layer's nine weights and the final norm; the critic has its own
    // copy of those and the value head's weight and bias.
    assert_eq!((policy.len(), critic.len()), (10, 12));
    for v in policy.iter().chain(&critic) {
        let g = grads.get(v).expect("a trained weight without a gradient");
        assert!(norm(g) > 0.0, "a zero gradient for a {:?} weight", v.dims());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smollm2_ppo_refuses_an_exact_kl_reference_and_another_policys_samples() {
    let dir = temp_run_dir("ppo-smollm-bad");
    let mut init = ppo_init(&dir);
    init.config["pretrained"] = json!("gpt-5");
    let err = Ppo::create(&init).err().unwrap();
    assert_eq!(err.config_field(), Some("pretrained"));
    let init = ppo_init(&dir);
    let c = crate::grpo::tests::completion(
        "p0#0",
        "p0",
        "\n\nHuman: Hi\n\nAssistant:",
        vec![5],
        vec![-1.0],
    );
    let mut c = c;
    c.ref_logprobs = vec![-1.0];
    let elsewhere = ArtifactRef {
        id: "elsewhere/policy@0".into(),
        kind: "policy".into(),
        path: "elsewhere/final/model.safetensors".into(),
        sha256: String::new(),
        round: 0,
        stage: "elsewhere".into(),
        name: "policy".into(),
        step: None,
        member: None,
    };
    // The exact KL needs the reference's whole distribution: GPT only.
    let mut with_reference = inputs(&[c.clone()], None);
    with_reference.push((3, vec![Record::Artifact(elsewhere.clone())]));
    let err = hone_sdk::testing::run_round::<Ppo>(&init, with_reference)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("leave `reference` unwired"),
        "{err}"
    );
    // Samples of another policy than the one it trains are refused by name.
    let mut other = inputs(&[c], None);
    if let Record::Completion(c) = &mut other[0].1[0] {
        c.policy = Some(elsewhere);
    }
    let err = hone_sdk::testing::run_round::<Ppo>(&init, other)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("sampled by elsewhere/policy@0"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
