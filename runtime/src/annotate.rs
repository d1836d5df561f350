//! `hone annotate`: a simulated annotator that labels over `hone serve`'s
//! HTTP API, as a person using the page would: it fetches the pairs
//! awaiting labels, prefers the response with the higher gold reward (the
//! `hint` a `human.label` stage with `gold_hint = true` passes along), and
//! posts each answer, retrying the same client id until the server
//! acknowledges it, across server restarts.
//!
//! Its client ids are derived from the pair, so a restarted annotator (or
//! a retried POST) is counted once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How the simulated annotator behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server, `HOST:PORT`.
    pub addr: String,
    /// The served run directory: when the server is unreachable its address
    /// is read again from there (a restarted server may listen elsewhere).
    pub run_dir: Option<PathBuf>,
    /// The bearer token.
    pub token: String,
    /// The name it labels under.
    pub annotator: String,
    /// The share of answers it flips (a seeded draw per pair).
    pub flip_rate: f64,
    /// The seed of the flips.
    pub seed: u64,
    /// Append each acknowledged label's client id to this file.
    pub ack_log: Option<PathBuf>,
    /// Exit once the server has been unreachable this long.
    pub give_up: Duration,
    /// Exit once the server's run has finished.
    pub until_finished: bool,
}

/// A response: status and body.
pub type Reply = (u16, String);

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    // Read the head, then as many body bytes as it announces (a server may
    // keep the connection open despite `Connection: close`).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "the connection closed before a response",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("a response without a status"))?;
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = raw.split_off(head_end + 4);
    match length {
        Some(n) => {
            while body.len() < n {
                let got = s.read(&mut buf)?;
                if got == 0 {
                    return Err(std::io::Error::other("the response ended early"));
                }
                body.extend_from_slice(&buf[..got]);
            }
            body.truncate(n);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The choice for a pair with gold rewards `hint`.
fn choose(hint: [f64; 2], flip: bool) -> &'static str {
    let first_better = hint[0] > hint[1];
    if hint[0] == hint[1] {
        "tie"
    } else if first_better != flip {
        "a"
    } else {
        "b"
    }
}

/// Labels until told to stop (see [`Options`]); returns the labels acknowledged.
pub fn run(o: &Options) -> Result<u64, String> {
    let mut acked = 0u64;
    let mut unreachable_since: Option<Instant> = None;
    let mut log = match &o.ack_log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    let addr = std::cell::RefCell::new(o.addr.clone());
    let unreachable = |since: &mut Option<Instant>| -> bool {
        let t = *since.get_or_insert_with(Instant::now);
        std::thread::sleep(Duration::from_millis(100));
        if let Some(dir) = &o.run_dir {
            if let Some(s) = std::fs::read(dir.join(hone_sdk::feedback::SERVING))
                .ok()
                .and_then(|b| serde_json::from_slice::<hone_sdk::feedback::Serving>(&b).ok())
            {
                *addr.borrow_mut() = s.addr;
            }
        }
        t.elapsed() > o.give_up
    };
    let request = |method: &str, path: &str, token: &str, body: Option<&str>| {
        let addr = addr.borrow().clone();
        request(&addr, method, path, token, body)
    };
    loop {
        let listed = match request("GET", "/api/pairs?limit=100", &o.token, None) {
            Ok((200, body)) => body,
            Ok((401, _)) => return Err("the server refused the token".into()),
            Ok((status, _)) if status >= 500 => {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Ok((status, body)) => return Err(format!("GET /api/pairs: {status} {body}")),
            Err(_) => {
                if unreachable(&mut unreachable_since) {
                    return Ok(acked);
                }
                continue;
            }
        };
        unreachable_since = None;
        let listed: serde_json::Value =
            serde_json::from_str(&listed).map_err(|e| format!("GET /api/pairs: {e}"))?;
        let pairs = listed["pairs"].as_array().cloned().unwrap_or_default();
        if pairs.is_empty() {
            if o.until_finished {
                if let Ok((200, s)) = request("GET", "/api/status", &o.token, None) {
                    if s.contains("\"finished\":true") {
                        return Ok(acked);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        for p in pairs {
            let item = p["item"].as_i64().ok_or("a listed pair without an item")?;
            let hint = match (p["hint"][0].as_f64(), p["hint"][1].as_f64()) {
                (Some(a), Some(b)) => [a, b],
                _ => {
                    return Err(format!(
                    "pair {} carries no gold hint, so a simulated annotator cannot judge it: set \
                         gold_hint = true on its human.label stage",
                    p["pair_id"]
                ))
                }
            };
            // The item too: a pair queued again with other texts is a new item.
            let key = format!(
                "{}/{}/{}/{item}",
                p["round"],
                p["stage"].as_str().unwrap_or(""),
                p["pair_id"].as_str().unwrap_or("")
            );
            let flip = hone_sdk::text::seeded_unit(o.seed, &key) < o.flip_rate;
            let client_id = format!(
                "{}-{:016x}",
                o.annotator,
                hone_sdk::text::stable_hash(key.as_bytes())
            );
            let body = serde_json::json!({
                "client_id": client_id, "item": item, "choice": choose(hint, flip),
                "annotator": o.annotator,
            })
            .to_string();
            // The same label until the server answers: a lost response is retried, counted once.
            loop {
                match request("POST", "/api/labels", &o.token, Some(&body)) {
                    Ok((200, _)) => {
                        acked += 1;
                        if let Some(f) = log.as_mut() {
                            writeln!(f, "{client_id}").map_err(|e| e.to_string())?;
                            f.flush().map_err(|e| e.to_string())?;
                        }
                        break;
                    }
                    // Labelled already, or its round moved on: nothing to retry.
                    Ok((404 | 409, _)) => {
                        std::thread::sleep(Duration::from_millis(20));
                        break;
                    }
                    // The server could not store it: the same label again, later.
                    Ok((status, _)) if status >= 500 => {
                        std::thread::sleep(Duration::from_millis(500))
                    }
                    Ok((status, body)) => return Err(format!("POST /api/labels: {status} {body}")),
                    Err(_) => {
                        if unreachable(&mut unreachable_since) {
                            return Ok(acked);
                        }
                    }
                }
            }
            unreachable_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_better_response_by_gold_is_chosen_and_flips_invert_it() {
        assert_eq!(choose([1.0, 0.0], false), "a");
        assert_eq!(choose([0.0, 1.0], false), "b");
        assert_eq!(choose([1.0, 0.0], true), "b");
        assert_eq!(choose([0.5, 0.5], true), "tie");
    }
}
