//! lm.grpo on SmolLM2-135M-Instruct: the pretrained model samples (lm.rollout),
//! is its own reference (lm.logprobs), and learns from rewarded samples;
//! every trained weight gets a gradient; a restored stage continues exactly.

use super::tests::score;
use super::*;
use crate::sft::tests::temp_run_dir;
use crate::{Logprobs, Rollout};
use hone_sdk::Collected;
use serde_json::json;

pub(crate) const SMOLLM: &str = hone_pretrained::smollm::MODEL_NAME;
pub(crate) const NEW_TOKENS: usize = 8;

pub(crate) fn stage(dir: &std::path::Path, kind: &str, config: serde_json::Value) -> StageInit {
    let mut init = StageInit::for_test(kind, config);
    init.stage_id = kind.replace('.', "_");
    init.run_dir = dir.to_path_buf();
    init
}

fn prompts() -> Vec<Record> {
    ["What is a good name for a cat?", "How do I boil an egg?"]
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Record::Prompt(Prompt {
                id: format!("p{i}"),
                text: format!("\n\nHuman: {q}\n\nAssistant:"),
                meta: Default::default(),
            })
        })
        .collect()
}

/// The completions scored under `reference` (`None`: the pretrained model).
pub(crate) fn under(
    dir: &std::path::Path,
    completions: Vec<Record>,
    reference: Option<&ArtifactRef>,
) -> Vec<Completion> {
    let pretrained = if reference.is_some() { "" } else { SMOLLM };
    let config = hone_sdk::testing::full_config::<Logprobs>(
        json!({"max_new_tokens": NEW_TOKENS, "pretrained": pretrained}),
    );
    let artifact: Vec<Record> = reference
        .cloned()
        .map(Record::Artifact)
        .into_iter()
        .collect();
    let out = hone_sdk::testing::run_round::<Logprobs>(
        &stage(dir, "lm.logprobs", config),
        vec![(0, completions), (1, artifact)],
    )
    .unwrap();
    assert_eq!(out.metric("unmatched", None), Some(0.0));
    out.emitted(0)
        .iter()
        .map(|r| match r {
            Record::Completion(c) => c.clone(),
            other => panic!("not a completion: {other:?}"),
        })
        .collect()
}

/// Four samples of each prompt from the pretrained model at temperature 1,
/// with the pretrained model's teacher-forced log-probs as the reference.
pub(crate) fn sampled(dir: &std::path::Path) -> Vec<Completion> {
    let config = hone_sdk::testing::full_config::<Rollout>(
        json!({"pretrained": SMOLLM, "n": 4, "max_new_tokens": NEW_TOKENS, "seed": 7}),
    );
    let out = hone_sdk::testing::run_round::<Rollout>(
        &stage(dir, "lm.rollout", config),
        vec![(0, prompts())],
    )
    .unwrap();
    under(dir, out.emitted(0).to_vec(), None)
}

/// Sample 0 and 1 of each prompt are rewarded, 2 and 3 not.
pub(crate) fn reward(c: &Completion) -> f64 {
    if c.id.ends_with("#0") || c.id.ends_with("#1") {
        1.0
    } else {
        0.0
    }
}

/// The mean change of log-probability of the rewarded samples and of the
/// others, from the sampler's to `policy`'s (scored by lm.logprobs).
pub(crate) fn gains(
    dir: &std::path::Path,
    comps: &[Completion],
    policy: &ArtifactRef,
) -> (f64, f64) {
    let after = under(
        dir,
        comps.iter().cloned().map(Record::Completion).collect(),
        Some(policy),
    );
    let gain = |rewarded: bool| -> f64 {
        let moved: Vec<f64> = after
            .iter()
            .filter(|c| (reward(c) > 0.0) == rewarded)
            .map(|c| {
                let before = comps.iter().find(|b| b.id == c.id).unwrap();
                c.ref_logprobs
                    .iter()
                    .zip(&before.token_logprobs)
                    .map(|(n, o)| f64::from(n - o))
                    .sum()
            })
            .collect();
        moved.iter().sum::<f64>() / moved.len() as f64
    };
    (gain(true), gain(false))
}

fn grpo_init(dir: &std::path::Path) -> StageInit {
    let config = hone_sdk::testing::full_config::<Grpo>(json!({
        "score": "reward", "pretrained": SMOLLM, "train_layers": 1, "epochs": 3,
        "batch_size": 4, "lr": 1e-4, "max_new_tokens": NEW_TOKENS,
    }));
    stage(dir, "lm.grpo", config)
}

/// The round's inputs: `comps` as if `policy` had sampled them.
pub(crate) fn inputs(
    comps: &[Completion],
    policy: Option<&ArtifactRef>,
) -> Vec<(usize, Vec<Record>)> {
    let records = comps
        .iter()
        .cloned()
        .map(|mut c| {
            c.policy = policy.cloned();
            Record::Completion(c)
        })
        .collect();
    let scores = comps.iter().map(|c| score(&c.id, reward(c))).collect();
    let policy = policy.cloned().map(Record::Artifact).into_iter().collect();
    vec![(0, records), (1, scores), (2, policy)]
}

#[test]
fn smollm2_learns_from_its_own_rewarded_samples_and_resumes_exactly() {
    let dir = temp_run_dir("grpo-smollm");
    let comps = sampled(&dir);
    assert_eq!(comps.len(), 8);
    // The sampler's log-probs (KV-cached decoding) and the teacher-forced
    // ones agree, so the ratio starts at 1 and the KL at 0.
    for c in &comps {
        assert!(!c.token_ids.is_empty(), "{}: no token ids", c.id);
        assert_eq!(c.token_ids.len(), c.token_logprobs.len(), "{}", c.id);
        assert_eq!(c.ref_logprobs.len(), c.token_ids.len(), "{}", c.id);
        for (a, b) in c.token_logprobs.iter().zip(&c.ref_logprobs) {
            assert!(
                (a - b).abs() < 2e-3,
                "{}: sampled {a}, teacher-forced {b}",
                c.id
            );
        }
    }
    let init = grpo_init(&dir);
    let mut straight = Grpo::create(&init).unwrap();
    let out: Collected =
        hone_sdk::testing::run_round_of(&mut straight, &init, 0, inputs(&comps, None)).unwrap();
    assert_eq!(out.metric("groups", None), Some(2.0));
    // The mean over the round's steps: 0 at the first, growing as it learns.
    let kl = out.metric("kl", None).unwrap();
    assert!(kl > 0.0 && kl < 0.5, "kl {kl}");
    let a0 = out.artifacts(0).pop().expect("a policy");
    // Under the updated policy the rewarded samples gained log-probability
    // against the others.
    let (up, down) = gains(&dir, &comps, &a0);
    assert!(
        up > down + 0.5,
        "log-prob change: rewarded {up}, others {down}"
    );
    // Round 1 from the snapshot taken after round 0 takes the same steps.
    let bytes = straight.snapshot(0).unwrap().expect("lm.grpo keeps state");
    let a1 = hone_sdk::testing::run_round_of(&mut straight, &init, 1, inputs(&comps, Some(&a0)))
        .unwrap()
        .artifacts(0)
        .remove(0);
    let mut resumed = Grpo::create(&init).unwrap();
    resumed.restore(0, &bytes).unwrap();
    let b1 = hone_sdk::testing::run_round_of(&mut resumed, &init, 1, inputs(&comps, Some(&a0)))
        .unwrap()
        .artifacts(0)
        .remove(0);
    assert_eq!(a1.sha256, b1.sha256);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every weight of the trained layer and the final norm gets a gradient
/// from the GRPO loss, with the k3 KL term.
#[test]
fn smollm2_grpo_gradients_reach_every_trained_weight() {
    let dir = temp_run_dir("grpo-smollm-grads");
    let comps = sampled(&dir);
    let grpo = Grpo::create(&grpo_init(&dir)).unwrap();
    let learner = Learner::resume_or_load(None, None, &grpo.spec(&dir)).unwrap();
    let samples: Vec<Sample> = comps
        .iter()
        .map(|c| Sample {
            sampled: learner.sampled(c, NEW_TOKENS).unwrap(),
            advantage: if reward(c) > 0.0 { 1.0 } else { -1.0 },
        })
        .collect();
    let batch: Vec<&Sample> = samples.iter().collect();
    let (loss, _, _) = grpo.loss(&learner, &batch, true).unwrap();
    let grads = loss.backward().unwrap();
    let vars = learner.vars();
    // One layer's nine weights (four attention, three MLP, two norms) and the final norm.
    assert_eq!(vars.len(), 10);
    for v in &vars {
        let g = grads.get(v).expect("a trained weight without a gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "a zero gradient for a {:?} weight", v.dims());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smollm2_settings_that_cannot_work_are_refused() {
    let dir = temp_run_dir("grpo-smollm-bad");
    let mut init = grpo_init(&dir);
    init.config["pretrained"] = json!("gpt-5");
    let err = Grpo::create(&init).err().unwrap();
    assert_eq!(err.config_field(), Some("pretrained"));
    // A completion without token ids (not lm.rollout's) is refused by name.
    let c = super::tests::completion(
        "p0#0",
        "p0",
        "\n\nHuman: Hi\n\nAssistant:",
        vec![],
        vec![-1.0],
    );
    let init = grpo_init(&dir);
    let err = hone_sdk::testing::run_round::<Grpo>(&init, inputs(&[c], None))
        .err()
        .unwrap();
    assert!(err.to_string().contains("token ids"), "{err}");
    // Samples of another policy than the one it trains are refused by name.
    let c = super::tests::completion(
        "p0#0",
        "p0",
        "\n\nHuman: Hi\n\nAssistant:",
        vec![5],
        vec![-1.0],
    );
    let mut inputs = inputs(&[c], None);
    if let Record::Completion(c) = &mut inputs[0].1[0] {
        c.policy = Some(ArtifactRef {
            id: "elsewhere/policy@0".into(),
            kind: "policy".into(),
            path: "elsewhere/final/model.safetensors".into(),
            sha256: String::new(),
            round: 0,
            stage: "elsewhere".into(),
            name: "policy".into(),
            step: None,
            member: None,
        });
    }
    let err = hone_sdk::testing::run_round::<Grpo>(&init, inputs)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("sampled by elsewhere/policy@0"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With LoRA the adapters alone train (rank 4 on q_proj and v_proj of the
/// top layer: four variables), the rewarded samples gain log-probability,
/// the emitted checkpoint is a plain SmolLM2 (lm.logprobs scores under it),
/// and a stage restored from its snapshot continues exactly: the adapters
/// and their base are in the snapshot, not re-derived from the merged
/// checkpoint.
#[test]
fn smollm2_grpo_with_lora_trains_the_adapters_and_resumes_exactly() {
    let dir = temp_run_dir("grpo-smollm-lora");
    let comps = sampled(&dir);
    let mut init = grpo_init(&dir);
    init.config["lora_rank"] = json!(4);
    init.config["lr"] = json!(2e-3);
    let mut straight = Grpo::create(&init).unwrap();
    let learner = Learner::resume_or_load(None, None, &straight.spec(&dir)).unwrap();
    let Learner::Chat(t) = &learner else {
        panic!("the pretrained policy is a SmolLM2")
    };
    let names: Vec<&str> = t.tuned.adapters().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.29.self_attn.q_proj.lora_A",
            "model.layers.29.self_attn.q_proj.lora_B",
            "model.layers.29.self_attn.v_proj.lora_A",
            "model.layers.29.self_attn.v_proj.lora_B",
        ]
    );
    assert_eq!(learner.vars().len(), 4);
    drop(learner);
    let out =
        hone_sdk::testing::run_round_of(&mut straight, &init, 0, inputs(&comps, None)).unwrap();
    let a0 = out.artifacts(0).pop().expect("a policy");
    let (up, down) = gains(&dir, &comps, &a0);
    assert!(
        up > down + 0.5,
        "log-prob change: rewarded {up}, others {down}"
    );
    let bytes = straight.snapshot(0).unwrap().expect("lm.grpo keeps state");
    let a1 = hone_sdk::testing::run_round_of(&mut straight, &init, 1, inputs(&comps, Some(&a0)))
        .unwrap()
        .artifacts(0)
        .remove(0);
    let mut resumed = Grpo::create(&init).unwrap();
    resumed.restore(0, &bytes).unwrap();
    let b1 = hone_sdk::testing::run_round_of(&mut resumed, &init, 1, inputs(&comps, Some(&a0)))
        .unwrap()
        .artifacts(0)
        .remove(0);
    assert_eq!(a1.sha256, b1.sha256);
    // A snapshot of LoRA training does not restore into a stage without it.
    let mut plain = Grpo::create(&grpo_init(&dir)).unwrap();
    let err = plain.restore(0, &bytes).err().unwrap();
    assert_eq!(err.config_field(), Some("lora_rank"), "{err}");
    // Nor into one whose alpha scales the same adapters to another update.
    let mut other = init.clone();
    other.config["lora_alpha"] = json!(32.0);
    let err = Grpo::create(&other)
        .unwrap()
        .restore(0, &bytes)
        .err()
        .unwrap();
    assert_eq!(err.config_field(), Some("lora_alpha"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
