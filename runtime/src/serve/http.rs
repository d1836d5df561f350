//! `hone serve`'s HTTP side (axum on tokio, on threads of its own, never
//! the timely workers'): the annotation page, the JSON API and `/metrics`.
//!
//! Every `/api/` request needs the bearer token. Bodies are capped
//! ([`MAX_BODY`], 413 beyond). A malformed label gets 400 naming the field.
//! JSON responses escape `<`, `>` and `&`, so user text is inert even in a
//! page that mishandles it; the page itself only ever sets `textContent`.

// Handlers return a `Response` either way; an error is one too, and boxing
// it would only add an allocation per refused request.
#![allow(clippy::result_large_err)]

use super::store::{Label, Posted, Store};
use crate::telemetry::Telemetry;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hone_sdk::feedback::Choice;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The largest request body accepted (a label is well under 1 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// Longest client id and annotator name accepted.
const MAX_NAME: usize = 200;

/// What every handler shares.
pub struct Shared {
    /// The label store and its open queues.
    pub store: Mutex<Store>,
    /// The bearer token writes need.
    pub token: String,
    /// The running pipeline's figures.
    pub telemetry: Arc<Telemetry>,
    /// The run directory (artifacts are served from it).
    pub run_dir: PathBuf,
}

type AppState = Arc<Shared>;

/// The router.
pub fn router(shared: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/page.js", get(script))
        .route("/page.css", get(style))
        .route("/api/pairs", get(pairs))
        .route("/api/labels", post(labels))
        .route("/api/status", get(status))
        .route("/api/artifacts", get(artifacts))
        .route("/api/artifacts/{kind}", get(artifact))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint: see docs/serve.md") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

fn with_headers(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Only hone's own script and style; nothing from elsewhere, nothing inline.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
        ),
    );
    r
}

async fn page() -> Response {
    with_headers(PAGE.into_response(), "text/html; charset=utf-8")
}

async fn script() -> Response {
    with_headers(SCRIPT.into_response(), "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    with_headers(STYLE.into_response(), "text/css; charset=utf-8")
}

/// JSON with `<`, `>` and `&` escaped (they occur only inside strings, where
/// `\u003c` and the like mean the same).
fn json(status: StatusCode, value: serde_json::Value) -> Response {
    let text = value
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    with_headers((status, text).into_response(), "application/json")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json(status, serde_json::json!({ "error": message.into() }))
}

/// Checks the bearer token; the error response otherwise.
fn authorised(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.trim().as_bytes(), shared.token.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::UNAUTHORIZED, "wrong bearer token")),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs `Authorization: Bearer TOKEN` (the token is in RUN_DIR/serve/token)",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a store call off the async threads (SQLite waits for the disk).
async fn with_store<T: Send + 'static>(
    shared: &AppState,
    f: impl FnOnce(&mut Store) -> Result<T, String> + Send + 'static,
) -> Result<T, Response> {
    let shared = shared.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut store)
    })
    .await;
    match joined {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the label store's call failed",
        )),
    }
}

async fn pairs(
    State(shared): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = authorised(&shared, &headers) {
        return r;
    }
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 10,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`limit` takes a whole number from 1 to 1000",
            )
        }
    };
    match with_store(&shared, move |s| Ok((s.pending(limit)?, s.queue_depth()?))).await {
        Ok((items, depth)) => json(
            StatusCode::OK,
            serde_json::json!({ "pairs": items, "queue_depth": depth }),
        ),
        Err(r) => r,
    }
}

/// Parses a label, naming the field that is wrong.
fn parse_label(body: &[u8]) -> Result<Label, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or("the body must be a JSON object: {\"client_id\", \"item\", \"choice\", ...}")?;
    for key in obj.keys() {
        if !["client_id", "item", "choice", "annotator", "time"].contains(&key.as_str()) {
            return Err(format!(
                "unknown field `{key}`: a label has client_id, item, choice, annotator and time"
            ));
        }
    }
    let name = |field: &str, required: bool| -> Result<Option<String>, String> {
        match obj.get(field) {
            None if required => Err(format!("missing field `{field}`")),
            None => Ok(None),
            Some(serde_json::Value::String(s))
                if !s.trim().is_empty() && s.chars().count() <= MAX_NAME =>
            {
                Ok(Some(s.clone()))
            }
            Some(_) => Err(format!(
                "field `{field}` must be a non-empty string of at most {MAX_NAME} characters"
            )),
        }
    };
    let client_id = name("client_id", true)?.expect("required");
    let annotator = name("annotator", false)?.unwrap_or_else(|| "anonymous".into());
    let item = match obj.get("item") {
        None => return Err("missing field `item`".into()),
        Some(v) => v
            .as_i64()
            .ok_or("field `item` must be the integer `item` of a pair from GET /api/pairs")?,
    };
    let choice = match obj.get("choice") {
        None => return Err("missing field `choice`".into()),
        Some(v) => v
            .as_str()
            .and_then(Choice::parse)
            .ok_or("field `choice` must be \"a\", \"b\", \"tie\" or \"skip\"")?,
    };
    let time = match obj.get("time") {
        None => crate::plugin::unix_now(),
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or("field `time` must be seconds since the Unix epoch")?,
    };
    Ok(Label {
        client_id,
        item,
        choice,
        annotator,
        time,
    })
}

async fn labels(
    State(shared): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Err(r) = authorised(&shared, &headers) {
        return r;
    }
    // Too large (413) or unreadable: said in JSON like every other refusal.
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            let why = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("the body is larger than {MAX_BODY} bytes")
            } else {
                e.body_text()
            };
            return error(status, why);
        }
    };
    let label = match parse_label(&body) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let item = label.item;
    match with_store(&shared, move |s| s.post(&label)).await {
        Ok(Posted::Accepted { remaining }) => json(
            StatusCode::OK,
            serde_json::json!({ "accepted": true, "duplicate": false, "remaining": remaining }),
        ),
        Ok(Posted::Duplicate) => json(
            StatusCode::OK,
            serde_json::json!({ "accepted": true, "duplicate": true }),
        ),
        Ok(Posted::Conflict(why)) => error(StatusCode::CONFLICT, why),
        Ok(Posted::Unknown) => error(
            StatusCode::NOT_FOUND,
            format!("no pair has item {item}: take items from GET /api/pairs"),
        ),
        Err(r) => r,
    }
}

async fn status(State(shared): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorised(&shared, &headers) {
        return r;
    }
    let f = shared.telemetry.figures();
    let round = f.current.as_ref().map(|(_, r)| *r).unwrap_or(f.completed);
    let result = with_store(&shared, move |s| {
        let counts = s.counts()?;
        Ok((
            s.queue_depth()?,
            s.waiting_rounds(),
            s.labels_in_round(round)?,
            counts,
        ))
    })
    .await;
    match result {
        Ok((depth, waiting, this_round, counts)) => json(
            StatusCode::OK,
            serde_json::json!({
                "round": round,
                "rounds_completed": f.completed,
                "finished": f.finished,
                "stage": f.current.map(|(s, _)| s),
                "queue_depth": depth,
                "waiting_for_labels": !waiting.is_empty(),
                "labels_this_round": this_round,
                "labels_total": counts.values().sum::<u64>(),
                "labels_by_choice": counts,
            }),
        ),
        Err(r) => r,
    }
}

/// The manifest's newest artifact of each kind (and stage).
fn latest_artifacts(run_dir: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("manifest.jsonl")).unwrap_or_default();
    let mut latest: BTreeMap<(String, String), serde_json::Value> = BTreeMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            let key = (
                v["kind"].as_str().unwrap_or("").to_string(),
                v["stage"].as_str().unwrap_or("").to_string(),
            );
            let newer = latest
                .get(&key)
                .is_none_or(|old| v["round"].as_u64() >= old["round"].as_u64());
            if newer {
                latest.insert(key, v);
            }
        }
    }
    latest.into_values().collect()
}

async fn artifacts(State(shared): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorised(&shared, &headers) {
        return r;
    }
    let run_dir = shared.run_dir.clone();
    let latest = tokio::task::spawn_blocking(move || latest_artifacts(&run_dir))
        .await
        .unwrap_or_default();
    let list: Vec<serde_json::Value> = latest
        .into_iter()
        .map(|v| {
            serde_json::json!({
                "kind": v["kind"], "stage": v["stage"], "round": v["round"],
                "path": v["path"], "sha256": v["sha256"],
                "download": format!("/api/artifacts/{}?stage={}",
                    v["kind"].as_str().unwrap_or(""), v["stage"].as_str().unwrap_or("")),
            })
        })
        .collect();
    json(StatusCode::OK, serde_json::json!({ "artifacts": list }))
}

/// The newest artifact of `kind` (`policy`, `reward-model`; `?stage=` picks
/// the stage) as a tar archive.
async fn artifact(
    State(shared): State<AppState>,
    headers: HeaderMap,
    UrlPath(kind): UrlPath<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = authorised(&shared, &headers) {
        return r;
    }
    let run_dir = shared.run_dir.clone();
    let latest = tokio::task::spawn_blocking(move || latest_artifacts(&run_dir))
        .await
        .unwrap_or_default();
    let newest = latest
        .into_iter()
        .filter(|v| v["kind"] == kind.as_str())
        .filter(|v| query.get("stage").is_none_or(|s| v["stage"] == s.as_str()))
        .max_by_key(|v| v["round"].as_u64());
    let Some(v) = newest else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no `{kind}` artifact yet: GET /api/artifacts lists what there is"),
        );
    };
    let rel = v["path"].as_str().unwrap_or("").to_string();
    let path = shared.run_dir.join(&rel);
    // Only what the run wrote: a manifest path leaving the run directory is refused.
    let inside = std::fs::canonicalize(&path)
        .ok()
        .zip(std::fs::canonicalize(&shared.run_dir).ok())
        .is_some_and(|(p, d)| p.starts_with(d));
    if !inside {
        return error(
            StatusCode::NOT_FOUND,
            format!("artifact {rel} is not inside the run directory"),
        );
    }
    let name = std::path::Path::new(&rel)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifact".into());
    let built = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        // A link inside an artifact is archived as a link, never followed
        // out of the run directory.
        tar.follow_symlinks(false);
        if path.is_dir() {
            tar.append_dir_all(&name, &path)?;
        } else {
            tar.append_path_with_name(&path, &name)?;
        }
        tar.into_inner()
    })
    .await;
    match built {
        Ok(Ok(bytes)) => {
            let mut r = with_headers(bytes.into_response(), "application/x-tar");
            if let Ok(v) = HeaderValue::from_str(&format!(
                "attachment; filename=\"{}-round-{}.tar\"",
                kind,
                v["round"].as_u64().unwrap_or(0)
            )) {
                r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            r
        }
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read artifact {rel}"),
        ),
    }
}

/// A Prometheus label value, escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(shared): State<AppState>) -> Response {
    let f = shared.telemetry.figures();
    let store = with_store(&shared, |s| Ok((s.counts()?, s.queue_depth()?))).await;
    let Ok((counts, depth)) = store else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "label store unavailable");
    };
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    family(
        "hone_rounds_completed",
        "counter",
        "Rounds completed and journalled.",
        vec![(String::new(), f.completed as f64)],
    );
    family(
        "hone_labels_total",
        "counter",
        "Labels stored, by choice.",
        ["a", "b", "tie", "skip"]
            .iter()
            .map(|c| {
                (
                    format!("{{choice=\"{c}\"}}"),
                    *counts.get(*c).unwrap_or(&0) as f64,
                )
            })
            .collect(),
    );
    family(
        "hone_queue_depth",
        "gauge",
        "Pairs awaiting a label.",
        vec![(String::new(), depth as f64)],
    );
    family(
        "hone_stage_seconds_total",
        "counter",
        "Seconds spent in each stage's calls, over all workers.",
        f.seconds
            .iter()
            .map(|(s, v)| (format!("{{stage=\"{}\"}}", label_value(s)), *v))
            .collect(),
    );
    // The learners' and evaluators' figures: rewards, KL, losses, accuracies.
    family(
        "hone_stage_metric",
        "gauge",
        "The latest value of each stage metric (rewards, KL, losses, accuracies).",
        f.latest
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|((s, n), v)| {
                (
                    format!(
                        "{{stage=\"{}\",name=\"{}\"}}",
                        label_value(s),
                        label_value(n)
                    ),
                    *v,
                )
            })
            .collect(),
    );
    let mut r = out.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_label_names_its_field() {
        let cases = [
            (&b"{"[..], "not JSON"),
            (b"[]", "JSON object"),
            (b"{\"item\": 1, \"choice\": \"a\"}", "`client_id`"),
            (b"{\"client_id\": \"x\", \"choice\": \"a\"}", "`item`"),
            (
                b"{\"client_id\": \"x\", \"item\": \"one\", \"choice\": \"a\"}",
                "`item`",
            ),
            (b"{\"client_id\": \"x\", \"item\": 1}", "`choice`"),
            (
                b"{\"client_id\": \"x\", \"item\": 1, \"choice\": \"left\"}",
                "`choice`",
            ),
            (
                b"{\"client_id\": \"\", \"item\": 1, \"choice\": \"a\"}",
                "`client_id`",
            ),
            (
                b"{\"client_id\": \"x\", \"item\": 1, \"choice\": \"a\", \"time\": -1}",
                "`time`",
            ),
            (
                b"{\"client_id\": \"x\", \"item\": 1, \"choice\": \"a\", \"colour\": 1}",
                "`colour`",
            ),
        ];
        for (body, want) in cases {
            let e = parse_label(body).unwrap_err();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
        }
        let l = parse_label(
            br#"{"client_id": "x", "item": 3, "choice": "tie", "annotator": "ann", "time": 5}"#,
        )
        .unwrap();
        assert_eq!((l.item, l.choice, l.time), (3, Choice::Tie, 5.0));
    }

    #[test]
    fn json_responses_escape_markup() {
        let r = json(
            StatusCode::OK,
            serde_json::json!({"a": "<script>alert('x')</script> & more"}),
        );
        let body = futures_body(r);
        assert!(
            !body.contains('<') && !body.contains('>') && !body.contains('&'),
            "{body}"
        );
        let back: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(back["a"], "<script>alert('x')</script> & more");
    }

    fn futures_body(r: Response) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
                .await
                .unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        })
    }

    #[test]
    fn prometheus_label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
