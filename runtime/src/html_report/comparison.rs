//! The report's "Before and after" section: the `comparison.json` files
//! `eval.compare` writes, as a table of paired gains and the examples side
//! by side, for a person to read what the improvement looks like.

use super::svg::{esc, fmt_num};
use super::table;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The file eval.compare writes in its output directory.
const FILE: &str = "comparison.json";

/// Longest prompt excerpt shown before the full prompt is folded away.
const PROMPT_CHARS: usize = 400;

pub(super) fn comparisons(h: &mut String, dir: &Path) {
    let files = comparison_files(dir);
    if files.is_empty() {
        return;
    }
    h.push_str("<section><h2>Before and after</h2>");
    for (stage, path) in files {
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => one(h, &stage, &v),
            Err(e) => {
                let _ = write!(
                    h,
                    "<p class=\"none\">{}: cannot read: {}</p>",
                    esc(&path.display().to_string()),
                    esc(&e)
                );
            }
        }
    }
    h.push_str("</section>");
}

/// `(stage, file)` for every stage directory under `outputs/` holding a
/// comparison, the newest round's (`round-R/` beats the stage's own
/// directory, which is round 0), in the order of the stages' names.
fn comparison_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir.join("outputs")) else {
        return Vec::new();
    };
    let mut stages: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    stages.sort();
    let mut out = Vec::new();
    for (stage, path) in stages {
        let newest_round = std::fs::read_dir(&path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let r: u64 = name.strip_prefix("round-")?.parse().ok()?;
                e.path()
                    .join(FILE)
                    .is_file()
                    .then_some((r, e.path().join(FILE)))
            })
            .max_by_key(|(r, _)| *r);
        match newest_round {
            Some((_, file)) => out.push((stage, file)),
            None if path.join(FILE).is_file() => out.push((stage, path.join(FILE))),
            None => {}
        }
    }
    out
}

fn one(h: &mut String, stage: &str, v: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let n = |v: &serde_json::Value| v.as_f64().map(fmt_num).unwrap_or_else(|| "-".into());
    let (before, after) = (s(&v["before_name"]), s(&v["after_name"]));
    let _ = write!(
        h,
        "<h3>{} against {} <small>({}, {} prompts)</small></h3>",
        esc(&after),
        esc(&before),
        esc(stage),
        n(&v["prompts"])
    );
    let mut rows: Vec<Vec<String>> = Vec::new();
    if let Some(scores) = v["scores"].as_object() {
        for (name, f) in scores {
            let se = f["gain_se"]
                .as_f64()
                .map(|se| format!(" ± {}", fmt_num(se)))
                .unwrap_or_default();
            rows.push(vec![
                name.clone(),
                n(&f["before"]),
                n(&f["after"]),
                format!("{}{se}", n(&f["gain"])),
                n(&f["after_wins"]),
            ]);
        }
    }
    rows.push(vec![
        "length (characters)".into(),
        n(&v["length"]["before"]),
        n(&v["length"]["after"]),
        String::new(),
        String::new(),
    ]);
    table(
        h,
        &["score", &before, &after, "gain ± se", "after wins"],
        &rows,
    );
    let _ = write!(
        h,
        "<p>Gains are means over prompts of after − before; ± one standard error. \
         {} of the prompts kept the same completion. The examples are the first prompts \
         by id, not chosen by score.</p>",
        n(&v["same"])
    );
    let Some(examples) = v["examples"].as_array().filter(|e| !e.is_empty()) else {
        return;
    };
    let _ = write!(
        h,
        "<table class=\"sbs\"><tr><th>prompt</th><th>{}</th><th>{}</th></tr>",
        esc(&before),
        esc(&after)
    );
    for e in examples {
        let prompt = s(&e["prompt"]);
        let shown = last_turn(&prompt);
        let _ = write!(h, "<tr><td>{}", esc(&excerpt(shown, PROMPT_CHARS)));
        if shown.len() < prompt.trim().len() {
            let _ = write!(
                h,
                "<details><summary>whole prompt</summary><pre>{}</pre></details>",
                esc(prompt.trim())
            );
        }
        h.push_str("</td>");
        for side in ["before", "after"] {
            let scores: Vec<String> = e[side]["scores"]
                .as_object()
                .map(|m| m.iter().map(|(k, x)| format!("{k} {}", n(x))).collect())
                .unwrap_or_default();
            let _ = write!(
                h,
                "<td><pre>{}</pre><small>{}</small></td>",
                esc(&s(&e[side]["text"])),
                esc(&scores.join(", "))
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

/// The last human turn of an HH-RLHF transcript; other text whole.
fn last_turn(prompt: &str) -> &str {
    let body = prompt.trim();
    let Some(body) = body.strip_suffix("\n\nAssistant:") else {
        return body;
    };
    match body.rfind("\n\nHuman:") {
        Some(at) => body[at + "\n\nHuman:".len()..].trim(),
        None => body.strip_prefix("Human:").unwrap_or(body).trim(),
    }
}

/// At most `max` characters of `text`, an ellipsis marking a cut.
fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_human_turn_is_shown_and_long_text_is_cut_at_a_character() {
        let hh = "\n\nHuman: first\n\nAssistant: reply\n\nHuman: second question\n\nAssistant:";
        assert_eq!(last_turn(hh), "second question");
        assert_eq!(last_turn("plain prompt"), "plain prompt");
        // "Human:" inside a turn is text, not a turn.
        let quoted = "\n\nHuman: say \"Human: hi\"\n\nAssistant:";
        assert_eq!(last_turn(quoted), "say \"Human: hi\"");
        assert_eq!(excerpt("ééé", 2), "éé…");
        assert_eq!(excerpt("ab", 2), "ab");
    }

    #[test]
    fn the_newest_round_of_each_stage_is_read_and_text_is_escaped() {
        let dir = std::env::temp_dir().join(format!("hone-cmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let body = |name: &str| {
            serde_json::json!({
                "before_name": "SmolLM2", "after_name": name, "prompts": 2, "same": 0,
                "length": {"before": 10.0, "after": 20.0},
                "scores": {"judge": {"before": 0.1, "after": 0.4, "gain": 0.3, "gain_se": 0.1, "after_wins": 0.75}},
                "examples": [{"prompt": "\n\nHuman: <script>x</script>\n\nAssistant:",
                              "before": {"text": "a<b", "scores": {"judge": 0.1}},
                              "after": {"text": "c&d", "scores": {"judge": 0.4}}}],
            })
            .to_string()
        };
        for (sub, name) in [
            ("cmp", "round 0"),
            ("cmp/round-2", "round 2"),
            ("cmp/round-10", "round 10"),
        ] {
            std::fs::create_dir_all(dir.join("outputs").join(sub)).unwrap();
            std::fs::write(dir.join("outputs").join(sub).join(FILE), body(name)).unwrap();
        }
        std::fs::create_dir_all(dir.join("outputs/broken")).unwrap();
        std::fs::write(dir.join("outputs/broken").join(FILE), "{").unwrap();
        let mut h = String::new();
        comparisons(&mut h, &dir);
        assert!(h.contains("round 10 against SmolLM2"), "{h}");
        assert!(!h.contains("round 2 against"), "{h}");
        assert!(h.contains("0.3 ± 0.1"), "{h}");
        assert!(
            h.contains("&lt;script&gt;") && !h.contains("<script>"),
            "{h}"
        );
        assert!(h.contains("a&lt;b") && h.contains("c&amp;d"), "{h}");
        assert!(h.contains("broken") && h.contains("cannot read"), "{h}");
        let mut empty = String::new();
        comparisons(&mut empty, &dir.join("nowhere"));
        assert!(empty.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
