use super::*;
use crate::testing::run;

/// `prompts` prompts with three completions each, of distinct lengths and
/// distinct gold rewards (0.75, 1 and 0.2).
fn completions(prompts: usize) -> Vec<Record> {
    let mut out = Vec::new();
    for i in 0..prompts {
        for (k, text) in ["1 3 5", "1 3 5 9", "9 5 3 1 1"].iter().enumerate() {
            out.push(Record::Completion(Completion {
                id: format!("p{i:05}:c{k}"),
                prompt_id: format!("p{i:05}"),
                prompt: "Sort ascending: 5 3 9 1".into(),
                text: text.to_string(),
                token_ids: Vec::new(),
                token_logprobs: Vec::new(),
                ref_logprobs: Vec::new(),
                values: Vec::new(),
                policy: None,
                meta: BTreeMap::new(),
            }));
        }
    }
    out
}

fn pairs(records: Vec<Record>) -> Vec<PreferencePair> {
    records
        .into_iter()
        .map(|r| match r {
            Record::Pair(p) => p,
            other => panic!("{other:?}"),
        })
        .collect()
}

/// |observed - expected| within 3 standard errors of a rate over n draws.
fn assert_rate(name: &str, hits: f64, n: f64, expected: f64) {
    let observed = hits / n;
    let se = (expected * (1.0 - expected) / n).sqrt();
    assert!(
        (observed - expected).abs() < 3.0 * se,
        "{name}: observed {observed:.4} over {n} vs configured {expected} (3 se = {:.4})",
        3.0 * se
    );
}

#[test]
fn labels_reproduce_configured_flip_position_and_length_rates() {
    let config = serde_json::json!({
        "temperature": 0.0, "flip_rate": 0.25, "position_bias": 0.2, "length_bias": 0.3,
        "annotators": 4, "annotator_spread": 0.5,
    });
    let (out, m) = run::<Label>(config, completions(1400), 0);
    let pairs = pairs(out);
    let n = pairs.len() as f64;
    assert_eq!(n, 4200.0);
    assert_eq!(m["pairs"], n);
    assert_rate("flip_rate", m["flipped"], n, 0.25);
    assert_rate("position_bias", m["position_decided"], n, 0.2);
    assert_rate(
        "length_bias",
        m["length_decided"],
        n - m["position_decided"],
        0.3,
    );
    for p in &pairs {
        let flipped = p.meta["flipped"] == "true";
        let shown_first = !p.position_swapped;
        let longer = p.chosen.len() > p.rejected.len();
        match p.meta["bias"].as_str() {
            "position" => assert_eq!(shown_first, !flipped, "{p:?}"),
            "length" => assert_eq!(longer, !flipped, "{p:?}"),
            // Temperature 0: the truly better one wins unless flipped.
            _ => assert_eq!(p.meta["clean_label"] == "true", !flipped, "{p:?}"),
        }
    }
    let annotators: std::collections::BTreeSet<&str> =
        pairs.iter().map(|p| p.meta["annotator"].as_str()).collect();
    assert_eq!(annotators.len(), 4);
}

#[test]
fn noiseless_zero_temperature_labels_agree_with_gold() {
    let (out, m) = run::<Label>(serde_json::json!({"temperature": 0.0}), completions(50), 0);
    assert_eq!(m["clean_agreement"], 150.0);
    assert_eq!(m["flipped"], 0.0);
    for p in pairs(out) {
        assert_eq!(p.meta["clean_label"], "true");
        assert!(p.gold_chosen.unwrap() > p.gold_rejected.unwrap());
    }
}

#[test]
fn bradley_terry_temperature_softens_labels() {
    let (_, sharp) = run::<Label>(
        serde_json::json!({"temperature": 0.05}),
        completions(500),
        0,
    );
    let (_, soft) = run::<Label>(serde_json::json!({"temperature": 1.0}), completions(500), 0);
    assert!(
        sharp["clean_agreement"] > soft["clean_agreement"] + 100.0,
        "{sharp:?} {soft:?}"
    );
    // sigmoid of gaps 0.25, 0.55 and 0.8 at temperature 1: mean 0.631.
    assert_rate("bt", soft["clean_agreement"], 1500.0, 0.6313);
}

#[test]
fn labels_are_seeded_and_do_not_depend_on_workers() {
    let config = serde_json::json!({"flip_rate": 0.25, "position_bias": 0.1, "length_bias": 0.1, "annotators": 3});
    let input = completions(200);
    let (all, _) = run::<Label>(config.clone(), input.clone(), 0);
    let (again, _) = run::<Label>(config.clone(), input.clone(), 0);
    assert_eq!(all, again);
    // Two workers, each seeing the prompts that shard to it, in reverse order.
    let (mut even, mut odd): (Vec<Record>, Vec<Record>) = input
        .into_iter()
        .rev()
        .partition(|r| r.shard_key() % 2 == 0 || r.id() < "p00100");
    let (mut split, _) = run::<Label>(config.clone(), std::mem::take(&mut even), 0);
    split.extend(run::<Label>(config.clone(), std::mem::take(&mut odd), 1).0);
    split.sort_by(|a, b| a.id().cmp(b.id()));
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.id().cmp(b.id()));
    assert_eq!(sorted, split);
    let (other_seed, _) = run::<Label>(
        serde_json::json!({"flip_rate": 0.25, "position_bias": 0.1, "length_bias": 0.1, "annotators": 3, "seed": 9}),
        completions(200),
        0,
    );
    assert_ne!(all, other_seed);
}

#[test]
fn best_vs_random_pairs_the_best_once_per_prompt() {
    let (out, m) = run::<Label>(
        serde_json::json!({"pairing": "best-vs-random", "temperature": 0.0}),
        completions(40),
        0,
    );
    assert_eq!(m["pairs"], 40.0);
    for p in pairs(out) {
        assert!(p.chosen == "1 3 5 9" || p.rejected == "1 3 5 9");
    }
    let (_, m) = run::<Label>(
        serde_json::json!({"pairing": "adjacent"}),
        completions(40),
        0,
    );
    assert_eq!(m["pairs"], 80.0);
}

#[test]
fn rates_outside_zero_one_are_config_errors() {
    let mut full = serde_json::Map::new();
    for field in Label::descriptor().config {
        full.insert(field.name, field.default);
    }
    full.insert("flip_rate".into(), serde_json::json!(1.5));
    let init = StageInit::for_test("world.label", serde_json::Value::Object(full));
    let err = Label::create(&init).err().unwrap();
    assert_eq!(err.config_field(), Some("flip_rate"));
}

#[test]
fn pairs_carry_the_family_and_split_of_their_completions() {
    let mut records = completions(2);
    for r in &mut records {
        if let Record::Completion(c) = r {
            c.meta.insert("family".into(), "sort".into());
            c.meta.insert("split".into(), "shifted".into());
            c.meta.insert("quality".into(), "0.5".into());
        }
    }
    let (out, _) = run::<Label>(serde_json::json!({}), records, 0);
    let pairs = pairs(out);
    assert!(!pairs.is_empty());
    for p in &pairs {
        assert_eq!(p.meta["family"], "sort");
        assert_eq!(p.meta["split"], "shifted");
        assert!(!p.meta.contains_key("quality"));
    }
}

#[test]
fn candidate_pairs_are_labelled_like_the_completions_they_hold() {
    // Every two completions of a prompt as candidate pairs, in either
    // orientation: the labels are those of the completions themselves.
    let cs: Vec<Completion> = completions(20)
        .into_iter()
        .map(|r| match r {
            Record::Completion(c) => c,
            _ => unreachable!(),
        })
        .collect();
    let config = serde_json::json!({ "temperature": 0.0, "flip_rate": 0.2, "position_bias": 0.1 });
    let records: Vec<Record> = cs.iter().cloned().map(Record::Completion).collect();
    let direct = pairs(run::<Label>(config.clone(), records, 0).0);
    for reversed in [false, true] {
        let mut candidates = Vec::new();
        for group in cs.chunks(3) {
            for i in 0..3 {
                for j in i + 1..3 {
                    let (c, r) = if reversed {
                        (&group[j], &group[i])
                    } else {
                        (&group[i], &group[j])
                    };
                    let mut cand = PreferencePair::new(
                        format!("{}~{}", group[i].id, group[j].id),
                        &c.prompt,
                        &c.text,
                        &r.text,
                        "proxy_reward",
                    );
                    cand.meta.insert("chosen_id".into(), c.id.clone());
                    cand.meta.insert("rejected_id".into(), r.id.clone());
                    cand.meta.insert("prompt_id".into(), c.prompt_id.clone());
                    cand.meta
                        .insert("selected_by".into(), "disagreement".into());
                    candidates.push(Record::Pair(cand));
                }
            }
        }
        let init = hone_sdk::testing::init::<Label>(config.clone());
        let out = hone_sdk::testing::run_round::<Label>(&init, vec![(1, candidates)]).unwrap();
        let labelled = pairs(out.emitted(0).to_vec());
        assert_eq!(labelled.len(), direct.len());
        for (l, d) in labelled.iter().zip(&direct) {
            assert_eq!(
                (&l.id, &l.chosen, &l.rejected),
                (&d.id, &d.chosen, &d.rejected)
            );
            assert_eq!(l.meta["flipped"], d.meta["flipped"]);
            assert_eq!(l.position_swapped, d.position_swapped);
            assert_eq!(l.meta["selected_by"], "disagreement");
        }
    }
}
