//! Small, generic SVG charts: one line chart, one bar chart, nice ticks.
//! Output is a self-contained `<svg>` element; no scripts, no fonts.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 320.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 44.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One named line of a line chart.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick values covering [lo, hi] at a 1, 2 or 5 × 10^k spacing, about `n` of them.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).floor() * step;
    let mut out = Vec::new();
    while t <= hi + step * 0.5 && out.len() < 50 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// Formats a tick label compactly.
pub fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e5 || v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)
    }
}

fn open(svg: &mut String, title: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" font-family="sans-serif" font-size="11"><title>{t}</title><text x="{LEFT}" y="16" font-size="13" font-weight="bold">{t}</text>"#,
        t = esc(title)
    );
}

fn axes(svg: &mut String, f: &Frame, xt: &[f64], yt: &[f64], xl: &str, yl: &str) {
    let (b, r) = (H - BOTTOM, W - RIGHT);
    for &y in yt {
        let p = f.py(y);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{r}" y1="{p:.1}" y2="{p:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 4.0,
            p + 4.0,
            fmt_num(y)
        );
    }
    for &x in xt {
        let p = f.px(x);
        let _ = write!(
            svg,
            r##"<line x1="{p:.1}" x2="{p:.1}" y1="{b}" y2="{:.1}" stroke="#444"/><text x="{p:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            b + 4.0,
            b + 16.0,
            fmt_num(x)
        );
    }
    let _ = write!(
        svg,
        r##"<path d="M{LEFT} {TOP}V{b}H{r}" fill="none" stroke="#444"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        (LEFT + r) / 2.0,
        H - 8.0,
        esc(xl),
        (TOP + b) / 2.0,
        esc(yl)
    );
}

/// A line chart of every series with axes, ticks and a legend; `markers` adds a dot per
/// point (series of 20 points or fewer always get them).
pub fn line_chart(title: &str, xl: &str, yl: &str, series: &[Series], markers: bool) -> String {
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts().filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (xt, yt) = (nice_ticks(x0, x1, 6), nice_ticks(y0, y1, 5));
    let f = Frame {
        x0: xt[0],
        x1: *xt.last().unwrap_or(&1.0),
        y0: yt[0],
        y1: *yt.last().unwrap_or(&1.0),
    };
    let mut svg = String::new();
    open(&mut svg, title);
    axes(&mut svg, &f, &xt, &yt, xl, yl);
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let ok: Vec<_> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let d: Vec<String> = ok
            .iter()
            .enumerate()
            .map(|(j, (x, y))| {
                format!(
                    "{}{:.1} {:.1}",
                    if j == 0 { 'M' } else { 'L' },
                    f.px(*x),
                    f.py(*y)
                )
            })
            .collect();
        let _ = write!(
            svg,
            r#"<path d="{}" fill="none" stroke="{c}" stroke-width="1.5"/>"#,
            d.join("")
        );
        if markers || ok.len() <= 20 {
            for (x, y) in &ok {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                    f.px(*x),
                    f.py(*y)
                );
            }
        }
        let ly = TOP + 14.0 * i as f64 + 6.0;
        let lx = W - RIGHT + 10.0;
        let _ = write!(
            svg,
            r#"<line x1="{lx}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 16.0,
            lx + 20.0,
            ly + 4.0,
            esc(&s.label)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A vertical bar chart of labelled values, with a zero baseline.
pub fn bar_chart(title: &str, xl: &str, yl: &str, bars: &[(String, f64)]) -> String {
    let vals = bars.iter().map(|b| b.1).filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((0f64, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let yt = nice_ticks(lo, if hi > lo { hi } else { lo + 1.0 }, 5);
    let f = Frame {
        x0: 0.0,
        x1: bars.len().max(1) as f64,
        y0: yt[0],
        y1: *yt.last().unwrap_or(&1.0),
    };
    let mut svg = String::new();
    open(&mut svg, title);
    axes(&mut svg, &f, &[], &yt, xl, yl);
    let slot = f.px(1.0) - f.px(0.0);
    let base = f.py(0f64.clamp(f.y0, f.y1));
    for (i, (label, v)) in bars.iter().enumerate() {
        let v = if v.is_finite() { *v } else { 0.0 };
        let (x, y) = (f.px(i as f64) + slot * 0.1, f.py(v));
        let _ = write!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
            y.min(base),
            slot * 0.8,
            (y - base).abs(),
            COLORS[0],
            esc(label),
            fmt_num(v)
        );
        if bars.len() <= 24 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                f.px(i as f64 + 0.5),
                H - BOTTOM + 14.0,
                esc(label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}
