//! Parsing one record of each supported format.

use hone_sdk::{PreferencePair, Prompt};
use serde_json::Value;
use std::collections::BTreeMap;

/// What one input record turned into.
pub enum Parsed {
    /// A pair.
    Pair(Box<PreferencePair>),
    /// A record deliberately dropped (a PandaLM tie), with the reason for the metrics.
    Dropped(&'static str),
}

/// The `\n\nAssistant:` marker HH-RLHF transcripts end their prompt with.
const ASSISTANT: &str = "\n\nAssistant:";

/// Detects the format of one record.
pub fn detect(v: &Value) -> Result<&'static str, String> {
    if v.get("annotator1").is_some() {
        Ok("pandalm")
    } else if v.get("prompt").is_some() {
        Ok("trl")
    } else if v.get("chosen").is_some() && v.get("rejected").is_some() {
        Ok("hh-rlhf")
    } else {
        Err("cannot tell the format: expected `chosen`/`rejected` (hh-rlhf), `prompt`/`chosen`/`rejected` (trl) \
             or `annotator1..3` (pandalm); set `format` explicitly"
            .into())
    }
}

fn text_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "field `{key}` must be a string, found {}",
            type_name(other)
        )),
        None => Err(format!("missing field `{key}`")),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Splits an HH-RLHF transcript at its last `\n\nAssistant:`.
pub fn split_hh(transcript: &str) -> Option<(&str, &str)> {
    let at = transcript.rfind(ASSISTANT)? + ASSISTANT.len();
    Some((&transcript[..at], &transcript[at..]))
}

/// An HH-RLHF record.
pub fn hh(id: String, v: &Value) -> Result<Parsed, String> {
    let chosen = text_field(v, "chosen")?;
    let rejected = text_field(v, "rejected")?;
    let (p1, c) = split_hh(chosen).ok_or("`chosen` has no \"\\n\\nAssistant:\" turn")?;
    let (p2, r) = split_hh(rejected).ok_or("`rejected` has no \"\\n\\nAssistant:\" turn")?;
    if p1 != p2 {
        return Err(
            "`chosen` and `rejected` do not share the dialogue before the last Assistant turn"
                .into(),
        );
    }
    let pair = PreferencePair::new(id, p1, c.trim_start(), r.trim_start(), "human");
    Ok(Parsed::Pair(Box::new(pair)))
}

/// A chat message list rendered as an HH-style transcript; a string as is.
fn chat_text(v: &Value, key: &str) -> Result<String, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(messages)) => {
            let mut out = String::new();
            for m in messages {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or(format!("`{key}`: message without `role`"))?;
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or(format!("`{key}`: message without `content`"))?;
                let who = if role == "user" {
                    "Human"
                } else if role == "assistant" {
                    "Assistant"
                } else {
                    role
                };
                out.push_str(&format!("\n\n{who}: {content}"));
            }
            Ok(out)
        }
        Some(other) => Err(format!(
            "field `{key}` must be a string or a message list, found {}",
            type_name(other)
        )),
        None => Err(format!("missing field `{key}`")),
    }
}

/// A TRL-style record.
pub fn trl(id: String, v: &Value) -> Result<Parsed, String> {
    let mut pair = PreferencePair::new(
        id,
        chat_text(v, "prompt")?,
        chat_text(v, "chosen")?,
        chat_text(v, "rejected")?,
        "human",
    );
    for (key, slot) in [
        ("score_chosen", &mut pair.chosen_score),
        ("score_rejected", &mut pair.rejected_score),
    ] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => *slot = n.as_f64(),
            Some(other) => {
                return Err(format!(
                    "field `{key}` must be a number, found {}",
                    type_name(other)
                ))
            }
        }
    }
    if let Some(src) = v.get("label_source").and_then(Value::as_str) {
        pair.label_source = src.to_string();
    }
    Ok(Parsed::Pair(Box::new(pair)))
}

/// A PandaLM response. Six of the 999 test records hold a JSON boolean where
/// the model answered "True"/"False" (the file was written from Python):
/// those are read back as the text the model produced.
fn response_text(v: &Value, key: &str) -> Result<String, String> {
    match v.get(key) {
        Some(Value::Bool(true)) => Ok("True".into()),
        Some(Value::Bool(false)) => Ok("False".into()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => text_field(v, key).map(str::to_string),
    }
}

/// A PandaLM three-annotator record: majority vote, ties dropped.
pub fn pandalm(id: String, v: &Value) -> Result<Parsed, String> {
    let mut votes = [0u32; 3];
    for key in ["annotator1", "annotator2", "annotator3"] {
        let a = v
            .get(key)
            .and_then(Value::as_u64)
            .ok_or(format!("field `{key}` must be 0, 1 or 2"))?;
        if a > 2 {
            return Err(format!("field `{key}` must be 0, 1 or 2, found {a}"));
        }
        votes[a as usize] += 1;
    }
    let winner = if votes[1] >= 2 {
        1
    } else if votes[2] >= 2 {
        2
    } else {
        return Ok(Parsed::Dropped("ties_dropped"));
    };
    let instruction = text_field(v, "instruction")?;
    let input = v.get("input").and_then(Value::as_str).unwrap_or("");
    let prompt = if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    };
    let (r1, r2) = (
        response_text(v, "response1")?,
        response_text(v, "response2")?,
    );
    let (chosen, rejected) = if winner == 1 { (r1, r2) } else { (r2, r1) };
    let mut pair = PreferencePair::new(id, prompt, chosen, rejected, "majority-of-3");
    let agree = votes[winner as usize];
    pair.meta = BTreeMap::from([
        ("annotator_agreement".to_string(), format!("{agree}/3")),
        (
            "cmp_key".to_string(),
            v.get("cmp_key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
    ]);
    Ok(Parsed::Pair(Box::new(pair)))
}

/// A prompt from `{"prompt"}`, `{"text"}`, MT-Bench `{"turns": [...]}` (first
/// turn) or an HH-RLHF record (its prompt).
pub fn prompt(id: String, v: &Value) -> Result<Prompt, String> {
    let mut meta = BTreeMap::new();
    if let Some(c) = v.get("category").and_then(Value::as_str) {
        meta.insert("category".to_string(), c.to_string());
    }
    let text = if v.get("prompt").is_some() {
        chat_text(v, "prompt")?
    } else if let Some(t) = v.get("text").and_then(Value::as_str) {
        t.to_string()
    } else if let Some(turns) = v.get("turns").and_then(Value::as_array) {
        turns
            .first()
            .and_then(Value::as_str)
            .ok_or("field `turns` must hold strings")?
            .to_string()
    } else if let Some(chosen) = v.get("chosen").and_then(Value::as_str) {
        split_hh(chosen)
            .ok_or("`chosen` has no \"\\n\\nAssistant:\" turn")?
            .0
            .to_string()
    } else {
        return Err("expected a `prompt`, `text`, `turns` or HH-RLHF `chosen` field".into());
    };
    Ok(Prompt { id, text, meta })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hh_splits_at_the_last_assistant_turn() {
        let v = json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away",
        });
        let Parsed::Pair(p) = hh("x".into(), &v).unwrap() else {
            panic!()
        };
        assert_eq!(
            p.prompt,
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
        );
        assert_eq!(
            (p.chosen.as_str(), p.rejected.as_str()),
            ("see you", "go away")
        );
    }

    #[test]
    fn hh_rejects_mismatched_prompts() {
        let v = json!({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"});
        assert!(hh("x".into(), &v).is_err());
    }

    #[test]
    fn pandalm_majority_vote_and_ties() {
        let base = json!({"instruction": "Do", "input": "", "response1": "one", "response2": "two",
                          "annotator1": 2, "annotator2": 2, "annotator3": 1});
        let Parsed::Pair(p) = pandalm("x".into(), &base).unwrap() else {
            panic!()
        };
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("two", "one"));
        assert_eq!(p.meta["annotator_agreement"], "2/3");
        let tie = json!({"instruction": "Do", "response1": "a", "response2": "b",
                         "annotator1": 0, "annotator2": 1, "annotator3": 2});
        assert!(matches!(
            pandalm("y".into(), &tie).unwrap(),
            Parsed::Dropped("ties_dropped")
        ));
    }

    #[test]
    fn trl_reads_scores_and_message_lists() {
        let v = json!({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b",
                       "score_chosen": 7.5, "score_rejected": 2});
        let Parsed::Pair(p) = trl("x".into(), &v).unwrap() else {
            panic!()
        };
        assert_eq!(p.prompt, "\n\nHuman: hi");
        assert_eq!((p.chosen_score, p.rejected_score), (Some(7.5), Some(2.0)));
    }
}
