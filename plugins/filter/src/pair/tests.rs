use super::*;
use hone_sdk::testing::{create, init, run_round};
use serde_json::json;

fn completion(prompt: &str, i: usize, text: &str) -> Completion {
    Completion {
        id: format!("{prompt}#{i}"),
        prompt_id: prompt.to_string(),
        prompt: format!("question {prompt}"),
        text: text.to_string(),
        token_ids: text.bytes().map(u32::from).collect(),
        token_logprobs: Vec::new(),
        ref_logprobs: Vec::new(),
        values: Vec::new(),
        policy: None,
        meta: BTreeMap::from([("family".to_string(), "sum".to_string())]),
    }
}

fn score(c: &Completion, name: &str, value: f64) -> Record {
    Record::Score(Score {
        id: c.id.clone(),
        prompt_id: c.prompt_id.clone(),
        name: name.to_string(),
        value,
    })
}

/// Prompt `p` with completions of the given (text, proxy, gold).
fn group(prompt: &str, items: &[(&str, f64, f64)]) -> (Vec<Record>, Vec<Record>) {
    let (mut cs, mut ss) = (Vec::new(), Vec::new());
    for (i, &(text, proxy, gold)) in items.iter().enumerate() {
        let c = completion(prompt, i, text);
        ss.push(score(&c, "proxy_reward", proxy));
        ss.push(score(&c, "gold_reward", gold));
        cs.push(Record::Completion(c));
    }
    (cs, ss)
}

fn pairs_of(
    config: serde_json::Value,
    groups: &[(Vec<Record>, Vec<Record>)],
) -> (Vec<PreferencePair>, hone_sdk::Collected) {
    let init = init::<PairCompletions>(config);
    let cs: Vec<Record> = groups.iter().flat_map(|g| g.0.clone()).collect();
    let ss: Vec<Record> = groups.iter().flat_map(|g| g.1.clone()).collect();
    let out = run_round::<PairCompletions>(&init, vec![(0, cs), (1, ss)]).unwrap();
    let pairs = out
        .emitted(0)
        .iter()
        .map(|r| match r {
            Record::Pair(p) => p.clone(),
            other => panic!("not a pair: {other:?}"),
        })
        .collect();
    (pairs, out)
}

#[test]
fn max_min_pairs_the_best_against_the_worst_and_keeps_the_scores() {
    let g = group(
        "p",
        &[("mid", 0.5, 0.2), ("best", 0.9, 0.1), ("worst", -0.3, 0.3)],
    );
    let (pairs, out) = pairs_of(json!({}), &[g]);
    assert_eq!(pairs.len(), 1);
    let p = &pairs[0];
    assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("best", "worst"));
    assert_eq!((p.chosen_score, p.rejected_score), (Some(0.9), Some(-0.3)));
    // Gold is carried for measurement, not used to rank: here it disagrees.
    assert_eq!((p.gold_chosen, p.gold_rejected), (Some(0.1), Some(0.3)));
    assert_eq!(p.id, "p#1~p#2");
    assert_eq!(p.label_source, "proxy_reward");
    assert_eq!(p.meta["chosen_id"], "p#1");
    assert_eq!(p.meta["rejected_id"], "p#2");
    assert_eq!(p.meta["family"], "sum");
    assert_eq!(out.metric("gold_agreement", None), Some(0.0));
    assert_eq!(out.metric("pairs", None), Some(1.0));
}

#[test]
fn ties_are_dropped_and_counted_and_lone_or_unscored_samples_too() {
    let tie = group("t", &[("a", 0.4, 0.0), ("b", 0.4, 0.0), ("c", 0.4, 0.0)]);
    let lone = group("l", &[("only", 1.0, 0.0)]);
    let (mut cs, ss) = group("u", &[("x", 1.0, 1.0), ("y", 0.0, 0.0)]);
    cs.push(Record::Completion(completion("u", 9, "never scored")));
    let (pairs, out) = pairs_of(json!({}), &[tie, lone, (cs, ss)]);
    assert_eq!(pairs.len(), 1, "only prompt u has a pair");
    assert_eq!(out.metric("ties", None), Some(1.0));
    assert_eq!(out.metric("too_few", None), Some(1.0));
    assert_eq!(out.metric("unscored", None), Some(1.0));
    assert_eq!(out.metric("prompts", None), Some(3.0));
    assert_eq!(out.metric("gold_agreement", None), Some(1.0));
}

#[test]
fn the_length_penalty_ranks_by_score_minus_lambda_times_length() {
    // Without a penalty the long answer wins; at lambda = 0.1 per character
    // the long one (score 1.0, 12 chars: -0.2) loses to the short one
    // (score 0.5, 2 chars: 0.3).
    let items = [("long answer!", 1.0, 0.0), ("ok", 0.5, 0.0)];
    let (plain, _) = pairs_of(json!({}), &[group("p", &items)]);
    assert_eq!(plain[0].chosen, "long answer!");
    let (penalised, out) = pairs_of(json!({ "length_penalty": 0.1 }), &[group("p", &items)]);
    assert_eq!(penalised[0].chosen, "ok");
    // The scores recorded are the unpenalised ones.
    assert_eq!(penalised[0].chosen_score, Some(0.5));
    assert_eq!(out.metric("chosen_length", None), Some(2.0));
    assert_eq!(out.metric("rejected_length", None), Some(12.0));
    // Tokens count the generated ids, not characters: "é" is 2 bytes here.
    let items = [("éé", 1.0, 0.0), ("abc", 0.95, 0.0)];
    let (chars, _) = pairs_of(json!({ "length_penalty": 0.1 }), &[group("p", &items)]);
    assert_eq!(chars[0].chosen, "éé", "2 chars: 0.8 against 0.65");
    let (tokens, _) = pairs_of(
        json!({ "length_penalty": 0.1, "length_unit": "tokens" }),
        &[group("p", &items)],
    );
    assert_eq!(tokens[0].chosen, "abc", "4 tokens: 0.6 against 0.65");
}

#[test]
fn random_strategies_are_seeded_and_choose_the_better_of_their_two() {
    let groups: Vec<_> = (0..40)
        .map(|p| {
            let name = format!("p{p}");
            let items: Vec<(String, f64, f64)> = (0..4)
                .map(|i| (format!("answer {i}"), i as f64, i as f64))
                .collect();
            let items: Vec<(&str, f64, f64)> =
                items.iter().map(|(t, s, g)| (t.as_str(), *s, *g)).collect();
            group(&name, &items)
        })
        .collect();
    for strategy in ["max_random", "random"] {
        let config = json!({ "strategy": strategy });
        let (a, _) = pairs_of(config.clone(), &groups);
        let (b, _) = pairs_of(config, &groups);
        assert_eq!(a, b, "{strategy}: the same seed gives the same pairs");
        assert_eq!(a.len(), 40);
        for p in &a {
            assert!(p.chosen_score > p.rejected_score, "{strategy}: {p:?}");
            if strategy == "max_random" {
                assert_eq!(p.chosen, "answer 3");
            }
        }
        let rejected: std::collections::BTreeSet<&str> =
            a.iter().map(|p| p.rejected.as_str()).collect();
        assert!(
            rejected.len() >= 3,
            "{strategy}: the other is drawn, not fixed: {rejected:?}"
        );
        let swapped = a.iter().filter(|p| p.position_swapped).count();
        assert!(
            (8..=32).contains(&swapped),
            "{strategy}: positions drawn: {swapped} of 40"
        );
    }
    let (fixed, _) = pairs_of(json!({ "randomize_position": false }), &groups);
    assert!(fixed.iter().all(|p| !p.position_swapped));
}

#[test]
fn bad_settings_and_untokenized_completions_are_refused_by_name() {
    let err = create::<PairCompletions>(json!({ "length_penalty": -0.1 }))
        .err()
        .unwrap();
    assert!(err.to_string().contains("length_penalty"), "{err}");
    let err = create::<PairCompletions>(json!({ "score": "" }))
        .err()
        .unwrap();
    assert!(err.to_string().contains("score"), "{err}");
    let (mut cs, ss) = group("p", &[("a", 1.0, 0.0), ("b", 0.0, 0.0)]);
    if let Record::Completion(c) = &mut cs[0] {
        c.token_ids.clear();
    }
    let init = init::<PairCompletions>(json!({ "length_unit": "tokens" }));
    let err = run_round::<PairCompletions>(&init, vec![(0, cs), (1, ss)])
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("p#0") && err.to_string().contains("chars"),
        "{err}"
    );
}

#[test]
fn all_pairs_every_two_oriented_by_score_with_ties_dropped() {
    let g = group(
        "p",
        &[
            ("a", 0.1, 0.0),
            ("b", 0.5, 0.0),
            ("c", 0.5, 0.0),
            ("d", -1.0, 0.0),
        ],
    );
    let (pairs, out) = pairs_of(json!({ "strategy": "all" }), &[g]);
    // 6 pairs of 4, less the tie b = c.
    assert_eq!(pairs.len(), 5);
    assert_eq!(out.metric("ties", None), Some(1.0));
    for p in &pairs {
        assert!(p.chosen_score > p.rejected_score, "{p:?}");
    }
    let ids: std::collections::BTreeSet<&str> = pairs.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids.len(), 5, "distinct ids: {ids:?}");
}

#[test]
fn non_finite_scores_rank_nothing_and_prompts_without_ids_group_by_text() {
    let g = group(
        "p",
        &[
            ("nan", f64::NAN, 0.0),
            ("good", 0.9, 0.0),
            ("bad", 0.1, 0.0),
        ],
    );
    let (pairs, out) = pairs_of(json!({}), &[g]);
    assert_eq!(pairs.len(), 1);
    assert_eq!(
        (pairs[0].chosen.as_str(), pairs[0].rejected.as_str()),
        ("good", "bad")
    );
    assert_eq!(out.metric("non_finite", None), Some(1.0));
    // Two prompts without ids: paired within each prompt's text, not across.
    let (mut a, sa) = group("x", &[("a1", 1.0, 0.0), ("a2", 0.0, 0.0)]);
    let (mut b, sb) = group("y", &[("b1", 1.0, 0.0), ("b2", 0.0, 0.0)]);
    for r in a.iter_mut().chain(b.iter_mut()) {
        if let Record::Completion(c) = r {
            c.prompt_id.clear();
        }
    }
    let (pairs, _) = pairs_of(json!({}), &[(a, sa), (b, sb)]);
    assert_eq!(pairs.len(), 2);
    for p in &pairs {
        assert_eq!(p.chosen.chars().next(), p.rejected.chars().next(), "{p:?}");
    }
}
