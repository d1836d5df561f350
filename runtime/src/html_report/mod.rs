//! `hone report RUN_DIR`: one self-contained HTML file (inline CSS, inline
//! SVG, no scripts) summarising a run directory. The metric naming
//! conventions it reads are documented in `docs/report.md`.

mod comparison;
mod sections;
mod svg;

use self::sections::{
    accuracy, across_rounds, counts, elo, histogram, losses, reward_kl, win_rates,
};
use self::svg::esc;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug)]
pub struct Metric {
    /// Stage name.
    pub stage: String,
    /// Round.
    pub round: u64,
    /// Worker index.
    pub worker: u64,
    /// Metric name.
    pub name: String,
    /// Value.
    pub value: f64,
    /// Step, when the stage reports one.
    pub step: Option<f64>,
}

/// Reads `metrics.jsonl`; malformed lines come back as `file:line: why` warnings.
pub fn read_metrics(path: &Path) -> Result<(Vec<Metric>, Vec<String>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut out, mut warn) = (Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match parse_line(line) {
            Ok(m) => out.push(m),
            Err(e) => warn.push(format!("{}:{}: {e}; skipped", path.display(), i + 1)),
        }
    }
    Ok((out, warn))
}

fn parse_line(line: &str) -> Result<Metric, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let n = |k: &str| v.get(k).and_then(|x| x.as_f64());
    Ok(Metric {
        stage: s("stage").ok_or("missing string field `stage`")?,
        name: s("name").ok_or("missing string field `name`")?,
        value: n("value").ok_or("missing number field `value`")?,
        round: v.get("round").and_then(|x| x.as_u64()).unwrap_or(0),
        worker: v.get("worker").and_then(|x| x.as_u64()).unwrap_or(0),
        step: n("step"),
    })
}

/// Writes the report for `dir` to `out`; returns the warnings (malformed lines).
pub fn write(dir: &Path, out: &Path) -> Result<Vec<String>, String> {
    let (metrics, warnings) = read_metrics(&dir.join("metrics.jsonl"))?;
    let html = render(dir, &metrics, &warnings);
    hone_sdk::fs::atomic_write(out, html.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(warnings)
}

/// Mean over workers (and repeats) of each key.
pub(super) fn mean<K: Ord>(items: impl Iterator<Item = (K, f64)>) -> BTreeMap<K, f64> {
    let mut acc: BTreeMap<K, (f64, f64)> = BTreeMap::new();
    for (k, v) in items {
        let e = acc.entry(k).or_default();
        (e.0, e.1) = (e.0 + v, e.1 + 1.0);
    }
    acc.into_iter().map(|(k, (s, c))| (k, s / c)).collect()
}

pub(super) fn is_loss(n: &str) -> bool {
    n.ends_with("loss")
}
pub(super) fn is_special(n: &str) -> bool {
    is_loss(n)
        || matches!(n, "kl" | "gold_reward" | "proxy_reward")
        || [
            "win_rate/",
            "elo/",
            "strength_hist/",
            "accuracy/",
            "longer_wins/",
        ]
        .iter()
        .any(|p| n.starts_with(p))
}

/// Renders the whole page.
pub fn render(dir: &Path, ms: &[Metric], warnings: &[String]) -> String {
    let last = ms.iter().map(|m| m.round).max().unwrap_or(0);
    let mut stages: Vec<&str> = Vec::new();
    for m in ms {
        if !stages.contains(&m.stage.as_str()) {
            stages.push(&m.stage);
        }
    }
    let name = std::fs::read_to_string(dir.join("pipeline.toml"))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("pipeline")?.get("name")?.as_str().map(str::to_string))
        .unwrap_or_else(|| dir.display().to_string());
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>hone report: {n}</title><style>{CSS}</style></head><body><h1>hone report: {n}</h1>",
        n = esc(&name)
    );
    summary(&mut h, dir, &name, &stages);
    if !warnings.is_empty() {
        h.push_str("<h2>Skipped metric lines</h2><ul>");
        for w in warnings {
            let _ = write!(h, "<li>{}</li>", esc(w));
        }
        h.push_str("</ul>");
    }
    losses(&mut h, ms, &stages);
    comparison::comparisons(&mut h, dir);
    reward_kl(&mut h, ms);
    across_rounds(&mut h, ms);
    win_rates(&mut h, ms, last);
    elo(&mut h, ms, last);
    histogram(&mut h, ms, last);
    accuracy(&mut h, ms, last);
    counts(&mut h, ms, last);
    h.push_str("</body></html>\n");
    h
}

const CSS: &str = "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}code{font-size:90%}\
.none{color:#888;font-style:italic}section{margin-bottom:2em}svg{display:block;margin:.5em 0}\
table.sbs td{vertical-align:top;width:33%}table.sbs pre{white-space:pre-wrap;word-break:break-word;margin:0;font-family:inherit}";

pub(super) fn none(h: &mut String, title: &str, what: &str) {
    let _ = write!(h, "<section><h2>{title}</h2><p class=\"none\">No data: no metrics named {what}.</p></section>");
}

pub(super) fn table(h: &mut String, head: &[&str], rows: &[Vec<String>]) {
    h.push_str("<table><tr>");
    for c in head {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>");
    for r in rows {
        h.push_str("<tr>");
        for c in r {
            let numeric = c.parse::<f64>().is_ok();
            let _ = write!(
                h,
                "<td{}>{}</td>",
                if numeric { " class=\"n\"" } else { "" },
                esc(c)
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

fn summary(h: &mut String, dir: &Path, name: &str, stages: &[&str]) {
    let rounds = crate::rundir::completed_rounds(dir);
    let _ = write!(
        h,
        "<section><h2>Run summary</h2><table><tr><th>pipeline</th><td>{}</td></tr><tr><th>run directory</th><td>{}</td></tr><tr><th>rounds completed</th><td>{rounds}</td></tr><tr><th>stages</th><td>{}</td></tr></table><h3>Artifacts</h3>",
        esc(name),
        esc(&dir.display().to_string()),
        esc(&stages.join(", "))
    );
    let rows: Vec<Vec<String>> = std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let s = |k: &str| {
                v.get(k)
                    .map(|x| x.as_str().map(str::to_string).unwrap_or(x.to_string()))
                    .unwrap_or_default()
            };
            vec![
                s("id"),
                s("kind"),
                s("stage"),
                s("round"),
                s("sha256").chars().take(12).collect(),
            ]
        })
        .collect();
    if rows.is_empty() {
        h.push_str("<p class=\"none\">No data: manifest.jsonl lists no artifacts.</p>");
    } else {
        table(h, &["artifact", "kind", "stage", "round", "sha256"], &rows);
    }
    h.push_str("</section>");
}
