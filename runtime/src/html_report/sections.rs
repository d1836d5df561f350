//! The report's plotted and tabled sections, one function each; see `docs/report.md`.

use super::svg::{bar_chart, fmt_num, line_chart, Series};
use super::{is_loss, is_special, mean, none, table, Metric};
use std::collections::BTreeMap;
use std::fmt::Write;

pub(super) fn losses(h: &mut String, ms: &[Metric], stages: &[&str]) {
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

pub(super) fn reward_kl(h: &mut String, ms: &[Metric]) {
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

pub(super) fn win_rates(h: &mut String, ms: &[Metric], last: u64) {
    let w = last_round(ms, last, "win_rate/");
    let se = last_round(ms, last, "win_rate_se/");
    if w.is_empty() {
        return none(h, "Win rates", "<code>win_rate/A_vs_B</code>");
    }
    h.push_str("<section><h2>Win rates</h2>");
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for ((st, pair), v) in &w {
        let (a, b) = pair.split_once("_vs_").unwrap_or((pair, "?"));
        let e = se.get(&(st.clone(), pair.clone()));
        rows.push(vec![
            st.clone(),
            a.into(),
            b.into(),
            fmt_num(*v),
            e.map(|e| fmt_num(*e)).unwrap_or_default(),
        ]);
        bars.push((format!("{a} vs {b}"), *v));
    }
    table(
        h,
        &["stage", "A", "B", "win rate of A", "standard error"],
        &rows,
    );
    h.push_str(&bar_chart(
        "win rate of A against B",
        "pair",
        "win rate",
        &bars,
    ));
    h.push_str("</section>");
}

pub(super) fn elo(h: &mut String, ms: &[Metric], last: u64) {
    let mut e: Vec<_> = last_round(ms, last, "elo/").into_iter().collect();
    let (lo, hi) = (
        last_round(ms, last, "elo_lo/"),
        last_round(ms, last, "elo_hi/"),
    );
    if e.is_empty() {
        return none(h, "Elo", "<code>elo/POLICY</code>");
    }
    e.sort_by(|a, b| b.1.total_cmp(&a.1));
    let rows: Vec<Vec<String>> = e
        .iter()
        .enumerate()
        .map(|(i, ((st, p), v))| {
            let key = (st.clone(), p.clone());
            let interval = match (lo.get(&key), hi.get(&key)) {
                (Some(l), Some(u)) => format!("{l:.0} .. {u:.0}"),
                _ => String::new(),
            };
            vec![
                (i + 1).to_string(),
                p.clone(),
                format!("{v:.1}"),
                interval,
                st.clone(),
            ]
        })
        .collect();
    h.push_str("<section><h2>Elo</h2>");
    table(
        h,
        &["rank", "policy", "elo", "95% interval", "stage"],
        &rows,
    );
    h.push_str("</section>");
}

pub(super) fn histogram(h: &mut String, ms: &[Metric], last: u64) {
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

pub(super) fn accuracy(h: &mut String, ms: &[Metric], last: u64) {
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
    // The "longer response wins" baseline on the same pairs, where a stage
    // reports it (eval.rm-accuracy's longer_wins/SET).
    let longer = last_round(ms, last, "longer_wins/");
    let mut rows = rows;
    let mut baselines: Vec<&str> = longer.keys().map(|k| k.0.as_str()).collect();
    baselines.dedup();
    for s in baselines {
        let mut r = vec![format!("{s}: longer response wins")];
        r.extend(sets.iter().map(|set| {
            longer
                .get(&(s.to_string(), set.to_string()))
                .map(|v| fmt_num(*v))
                .unwrap_or_default()
        }));
        rows.push(r);
    }
    let mut head = vec!["stage"];
    head.extend(sets.iter().copied());
    h.push_str("<section><h2>Reward-model accuracy</h2>");
    table(h, &head, &rows);
    h.push_str("</section>");
}

pub(super) fn counts(h: &mut String, ms: &[Metric], last: u64) {
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

/// The loop's figures against the round: for each of gold reward, proxy
/// reward, response length and KL, one line per stage that reports it in
/// two rounds or more (mean over workers and steps within a round). Drawn
/// only for runs of several rounds.
pub(super) fn across_rounds(h: &mut String, ms: &[Metric]) {
    const NAMES: [(&str, &str); 4] = [
        ("gold_reward", "gold reward"),
        ("proxy_reward", "proxy reward"),
        ("length", "response length (characters)"),
        ("kl", "KL(π‖π_ref) (nats)"),
    ];
    let by = mean(
        ms.iter()
            .filter(|m| NAMES.iter().any(|(n, _)| *n == m.name))
            .map(|m| ((m.name.clone(), m.stage.clone(), m.round), m.value)),
    );
    let mut charts = Vec::new();
    for (name, label) in NAMES {
        let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for ((n, st, r), v) in &by {
            if n == name {
                series.entry(st.as_str()).or_default().push((*r as f64, *v));
            }
        }
        let series: Vec<Series> = series
            .into_iter()
            .filter(|(_, points)| points.len() >= 2)
            .map(|(st, points)| Series {
                label: st.to_string(),
                points,
            })
            .collect();
        if !series.is_empty() {
            charts.push(line_chart(
                &format!("{label} by round"),
                "round",
                label,
                &series,
                true,
            ));
        }
    }
    if charts.is_empty() {
        return;
    }
    h.push_str("<section><h2>Across rounds</h2>");
    for c in charts {
        h.push_str(&c);
    }
    h.push_str("</section>");
}
