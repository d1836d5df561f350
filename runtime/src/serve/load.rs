//! A bounded load test of the label endpoint: `clients` threads post
//! labels for distinct pairs over loopback for a fixed time, each over a
//! fresh connection as a browser or script would. Used by `tests/serve.rs`
//! (which checks that none is lost) and `hone-bench serve` (the figures in
//! docs/benchmarks.md).

use std::time::{Duration, Instant};

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Client ids of the labels the server acknowledged (200).
    pub acked: Vec<String>,
    /// Latency of each acknowledged POST.
    pub latencies: Vec<Duration>,
    /// Requests that failed (not 200).
    pub failed: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Acknowledged labels per second.
    pub fn rate(&self) -> f64 {
        self.acked.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0 to 1) of the latencies, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut l: Vec<f64> = self
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        if l.is_empty() {
            return f64::NAN;
        }
        l.sort_by(f64::total_cmp);
        let i = ((l.len() as f64 - 1.0) * q).round() as usize;
        l[i]
    }
}

/// Posts labels for `items` (split among the clients) until `duration`
/// has passed or the items run out.
pub fn run(
    addr: &str,
    token: &str,
    items: &[i64],
    clients: usize,
    duration: Duration,
) -> LoadReport {
    let started = Instant::now();
    let deadline = started + duration;
    let shares: Vec<Vec<i64>> = (0..clients)
        .map(|c| items.iter().copied().skip(c).step_by(clients).collect())
        .collect();
    let handles: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(c, share)| {
            let (addr, token) = (addr.to_string(), token.to_string());
            std::thread::spawn(move || {
                let mut r = LoadReport::default();
                for item in share {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let client_id = format!("load-{c}-{item}");
                    let body = serde_json::json!({
                        "client_id": client_id, "item": item,
                        "choice": if item % 2 == 0 { "a" } else { "b" }, "annotator": format!("load-{c}"),
                    })
                    .to_string();
                    let t = Instant::now();
                    match crate::annotate::request(&addr, "POST", "/api/labels", &token, Some(&body)) {
                        Ok((200, _)) => {
                            r.latencies.push(t.elapsed());
                            r.acked.push(client_id);
                        }
                        _ => r.failed += 1,
                    }
                }
                r
            })
        })
        .collect();
    let mut all = LoadReport::default();
    for h in handles {
        let r = h.join().expect("a load client");
        all.acked.extend(r.acked);
        all.latencies.extend(r.latencies);
        all.failed += r.failed;
    }
    all.elapsed = started.elapsed();
    all
}
