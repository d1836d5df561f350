//! `hone report RUN_DIR`: one self-contained HTML file (inline CSS, inline
//! SVG, no scripts) summarising a run directory. The metric naming
//! conventions it reads are documented in `docs/report.md`.

mod svg;

use self::svg::{bar_chart, esc, fmt_num, line_chart, Series};
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
    std::fs::write(out, html).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(warnings)
}

/// Mean over workers (and repeats) of each key.
fn mean<K: Ord>(items: impl Iterator<Item = (K, f64)>) -> BTreeMap<K, f64> {
    let mut acc: BTreeMap<K, (f64, f64)> = BTreeMap::new();
    for (k, v) in items {
        let e = acc.entry(k).or_default();
        (e.0, e.1) = (e.0 + v, e.1 + 1.0);
    }
    acc.into_iter().map(|(k, (s, c))| (k, s / c)).collect()
}

fn is_loss(n: &str) -> bool {
    n.ends_with("loss")
}
fn is_special(n: &str) -> bool {
    is_loss(n)
        || matches!(n, "kl" | "gold_reward" | "proxy_reward")
        || ["win_rate/", "elo/", "strength_hist/", "accuracy/"]
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
    reward_kl(&mut h, ms);
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
.none{color:#888;font-style:italic}section{margin-bottom:2em}svg{display:block;margin:.5em 0}";

fn none(h: &mut String, title: &str, what: &str) {
    let _ = write!(h, "<section><h2>{title}</h2><p class=\"none\">No data: no metrics named {what}.</p></section>");
}

fn table(h: &mut String, head: &[&str], rows: &[Vec<String>]) {
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

fn losses(h: &mut String, ms: &[Metric], stages: &[&str]) {
    let mut any = false;
    for st in stages {
        let rounds: std::collections::BTreeSet<u64> = ms
            .iter()
            .filter(|m| m.stage == *st)
            .map(|m| m.round)
            .collect();
        let by = mean(
            ms.iter()
                .filter(|m| m.stage == *st && is_loss(&m.name))
                .filter_map(|m| Some(((m.name.clone(), m.round, (m.step? * 1e6) as i64), m.value))),
        );
        if by.is_empty() {
            continue;
        }
        if !any {
            h.push_str("<section><h2>Losses</h2>");
            any = true;
        }
        let mut series: BTreeMap<(String, u64), Vec<(f64, f64)>> = BTreeMap::new();
        for ((n, r, s), v) in by {
            series.entry((n, r)).or_default().push((s as f64 / 1e6, v));
        }
        let series: Vec<Series> = series
            .into_iter()
            .map(|((n, r), points)| Series {
                label: if rounds.len() > 1 {
                    format!("{n} r{r}")
                } else {
                    n
                },
                points,
            })
            .collect();
        h.push_str(&line_chart(
            &format!("{st}: losses"),
            "step",
            "loss",
            &series,
            false,
        ));
    }
    if any {
        h.push_str("</section>");
    } else {
        none(h, "Losses", "<code>*loss</code> with a step");
    }
}

fn reward_kl(h: &mut String, ms: &[Metric]) {
    let by = mean(
        ms.iter()
            .filter(|m| matches!(m.name.as_str(), "kl" | "gold_reward" | "proxy_reward"))
            .map(|m| {
                let step = m.step.map(|s| (s * 1e6) as i64);
                ((m.stage.clone(), m.round, step, m.name.clone()), m.value)
            }),
    );
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut rows = Vec::new();
    for ((st, r, step, n), kl) in by.iter().filter(|(k, _)| k.3 == "kl") {
        let _ = n;
        let get = |w: &str| by.get(&(st.clone(), *r, *step, w.to_string())).copied();
        let (g, p) = (get("gold_reward"), get("proxy_reward"));
        for (w, v) in [("gold", g), ("proxy", p)] {
            if let Some(v) = v {
                series
                    .entry(format!("{st} {w}"))
                    .or_default()
                    .push((*kl, v));
            }
        }
        if g.is_some() || p.is_some() {
            let f = |v: Option<f64>| v.map(fmt_num).unwrap_or_default();
            let s = step.map(|s| fmt_num(s as f64 / 1e6)).unwrap_or_default();
            rows.push(vec![st.clone(), r.to_string(), s, fmt_num(*kl), f(g), f(p)]);
        }
    }
    if series.is_empty() {
        return none(h, "Gold and proxy reward against KL", "<code>gold_reward</code>/<code>proxy_reward</code> beside a <code>kl</code> at the same stage, round and step");
    }
    let series: Vec<Series> = series
        .into_iter()
        .map(|(label, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series { label, points }
        })
        .collect();
    h.push_str("<section><h2>Gold and proxy reward against KL</h2>");
    h.push_str(&line_chart(
        "reward against KL(π‖π_ref)",
        "KL (nats)",
        "reward",
        &series,
        true,
    ));
    table(
        h,
        &[
            "stage",
            "round",
            "step",
            "kl",
            "gold_reward",
            "proxy_reward",
        ],
        &rows,
    );
    h.push_str("</section>");
}

/// Last-round values of `prefix*` metrics, mean over workers, keyed by (stage, suffix).
fn last_round(ms: &[Metric], last: u64, prefix: &str) -> BTreeMap<(String, String), f64> {
    mean(ms.iter().filter(|m| m.round == last).filter_map(|m| {
        let rest = m.name.strip_prefix(prefix)?;
        Some(((m.stage.clone(), rest.to_string()), m.value))
    }))
}

fn win_rates(h: &mut String, ms: &[Metric], last: u64) {
    let w = last_round(ms, last, "win_rate/");
    if w.is_empty() {
        return none(h, "Win rates", "<code>win_rate/A_vs_B</code>");
    }
    h.push_str("<section><h2>Win rates</h2>");
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for ((st, pair), v) in &w {
        let (a, b) = pair.split_once("_vs_").unwrap_or((pair, "?"));
        rows.push(vec![st.clone(), a.into(), b.into(), fmt_num(*v)]);
        bars.push((format!("{a} vs {b}"), *v));
    }
    table(h, &["stage", "A", "B", "win rate of A"], &rows);
    h.push_str(&bar_chart(
        "win rate of A against B",
        "pair",
        "win rate",
        &bars,
    ));
    h.push_str("</section>");
}

fn elo(h: &mut String, ms: &[Metric], last: u64) {
    let mut e: Vec<_> = last_round(ms, last, "elo/").into_iter().collect();
    if e.is_empty() {
        return none(h, "Elo", "<code>elo/POLICY</code>");
    }
    e.sort_by(|a, b| b.1.total_cmp(&a.1));
    let rows: Vec<Vec<String>> = e
        .iter()
        .enumerate()
        .map(|(i, ((st, p), v))| {
            vec![
                (i + 1).to_string(),
                p.clone(),
                format!("{v:.1}"),
                st.clone(),
            ]
        })
        .collect();
    h.push_str("<section><h2>Elo</h2>");
    table(h, &["rank", "policy", "elo", "stage"], &rows);
    h.push_str("</section>");
}

fn histogram(h: &mut String, ms: &[Metric], last: u64) {
    let mut bins: BTreeMap<String, f64> = BTreeMap::new();
    for m in ms.iter().filter(|m| m.round == last) {
        if let Some(b) = m.name.strip_prefix("strength_hist/") {
            *bins.entry(b.to_string()).or_default() += m.value;
        }
    }
    if bins.is_empty() {
        return none(
            h,
            "Preference strength",
            "<code>strength_hist/BIN_LOW</code>",
        );
    }
    let mut bars: Vec<(String, f64)> = bins.into_iter().collect();
    bars.sort_by(|a, b| {
        let p = |s: &str| s.parse::<f64>().unwrap_or(f64::MAX);
        p(&a.0).total_cmp(&p(&b.0))
    });
    h.push_str("<section><h2>Preference strength</h2>");
    h.push_str(&bar_chart(
        "preference-strength histogram",
        "bin (lower edge)",
        "pairs",
        &bars,
    ));
    h.push_str("</section>");
}

fn accuracy(h: &mut String, ms: &[Metric], last: u64) {
    let a = last_round(ms, last, "accuracy/");
    if a.is_empty() {
        return none(h, "Reward-model accuracy", "<code>accuracy/SET</code>");
    }
    let mut sets: Vec<&str> = a.keys().map(|k| k.1.as_str()).collect();
    sets.dedup();
    sets.sort();
    sets.dedup();
    let mut st: Vec<&str> = a.keys().map(|k| k.0.as_str()).collect();
    st.dedup();
    let rows: Vec<Vec<String>> = st
        .iter()
        .map(|s| {
            let mut r = vec![s.to_string()];
            r.extend(sets.iter().map(|set| {
                a.get(&(s.to_string(), set.to_string()))
                    .map(|v| fmt_num(*v))
                    .unwrap_or_default()
            }));
            r
        })
        .collect();
    let mut head = vec!["stage"];
    head.extend(sets.iter().copied());
    h.push_str("<section><h2>Reward-model accuracy</h2>");
    table(h, &head, &rows);
    h.push_str("</section>");
}

fn counts(h: &mut String, ms: &[Metric], last: u64) {
    // The last value each worker reported, summed over workers.
    let mut per: BTreeMap<(String, String, u64), f64> = BTreeMap::new();
    for m in ms
        .iter()
        .filter(|m| m.round == last && !is_special(&m.name))
    {
        per.insert((m.stage.clone(), m.name.clone(), m.worker), m.value);
    }
    let mut sum: BTreeMap<(String, String), f64> = BTreeMap::new();
    for ((st, n, _), v) in per {
        *sum.entry((st, n)).or_default() += v;
    }
    if sum.is_empty() {
        return none(h, "Counts", "other than the above");
    }
    let rows: Vec<Vec<String>> = sum
        .into_iter()
        .map(|((s, n), v)| vec![s, n, fmt_num(v)])
        .collect();
    let _ = write!(h, "<section><h2>Counts (round {last})</h2>");
    table(h, &["stage", "metric", "value (sum over workers)"], &rows);
    h.push_str("</section>");
}
