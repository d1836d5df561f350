//! From a TOML tree to a [`Pipeline`], collecting every error.

use super::node::{self, Entry, Node, Value};
use super::{Binding, Pipeline, StageDecl};
use crate::diag::{Diagnostic, Origin};
use hone_sdk::FieldType;
use std::path::Path;

const TOP_KEYS: &[&str] = &["pipeline", "stages"];
const PIPELINE_KEYS: &[&str] = &["name", "description", "rounds", "seed", "plugin_path"];
const STAGE_KEYS: &[&str] = &["kind", "inputs", "feedback", "config"];

/// Parses a pipeline file's text. `path` is used for the default name and to
/// resolve relative paths.
pub fn parse_pipeline(path: &Path, text: &str) -> Result<Pipeline, Vec<Diagnostic>> {
    let doc = node::parse_document(text)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        ".".into()
    } else {
        dir
    };
    // Absolute, so that the resolved pipeline.toml in the run directory runs from anywhere.
    let dir = dir.canonicalize().unwrap_or(dir);
    let mut p = Pipeline {
        name: path
            .file_stem()
            .map(|s| crate::rundir::name_from_stem(&s.to_string_lossy()))
            .unwrap_or_default(),
        description: String::new(),
        rounds: 1,
        seed: 0,
        plugin_path: Vec::new(),
        stages: Vec::new(),
        dir,
    };
    let mut errors = Vec::new();
    let Value::Table(top) = doc.value else {
        unreachable!("a document is a table")
    };
    let mut saw_stages = None;
    for entry in top {
        match entry.key.as_str() {
            "pipeline" => parse_header(&entry.node, &mut p, &mut errors),
            "stages" => {
                saw_stages = Some(entry.key_origin.clone());
                let Some(stages) = expect_table(&entry, "stages", &mut errors) else {
                    continue;
                };
                for stage in stages {
                    if let Some(decl) = parse_stage(stage, &mut errors) {
                        p.stages.push(decl);
                    }
                }
            }
            _ => errors.push(unknown_key(&entry, "the top level", TOP_KEYS)),
        }
    }
    match &saw_stages {
        None => errors.push(Diagnostic::at(
            0..0,
            "the pipeline declares no stages: add a `[stages.ID]` table with a `kind`",
        )),
        Some(origin) if p.stages.is_empty() && errors.is_empty() => errors.push(Diagnostic::new(
            origin,
            "`stages` declares no stages: add a `[stages.ID]` table with a `kind`",
        )),
        Some(_) => {}
    }
    if errors.is_empty() {
        Ok(p)
    } else {
        Err(errors)
    }
}

fn parse_header(node: &Node, p: &mut Pipeline, errors: &mut Vec<Diagnostic>) {
    let Value::Table(entries) = &node.value else {
        errors.push(Diagnostic::new(
            &node.origin,
            "`pipeline` must be a table: write `[pipeline]`",
        ));
        return;
    };
    for e in entries {
        let field = format!("pipeline.{}", e.key);
        match e.key.as_str() {
            "name" => {
                if let Some(name) = run_name(&e.node, errors) {
                    p.name = name;
                }
            }
            "description" => p.description = string(&e.node, &field, errors).unwrap_or_default(),
            "rounds" => p.rounds = rounds(&e.node, errors).unwrap_or(1),
            "seed" => p.seed = seed(&e.node, errors).unwrap_or(0),
            "plugin_path" => match &e.node.value {
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(s) = string(item, &field, errors) {
                            let dir = p.dir.join(&s);
                            if !dir.is_dir() {
                                let what = if dir.exists() {
                                    "is not a directory"
                                } else {
                                    "does not exist"
                                };
                                errors.push(Diagnostic::new(
                                    &item.origin,
                                    format!(
                                        "`{field}[{i}]` = \"{s}\": {} {what}; give the directory \
                                         that holds the plugin libraries (relative paths are \
                                         resolved against the pipeline file's directory)",
                                        dir.display()
                                    ),
                                ));
                            }
                            p.plugin_path.push(dir);
                        }
                    }
                }
                other => errors.push(Diagnostic::new(
                    &e.node.origin,
                    format!(
                        "`{field}` must be an array of directory paths, found {} {}",
                        other.type_name(),
                        other.to_toml_text()
                    ),
                )),
            },
            _ => errors.push(unknown_key(e, "[pipeline]", PIPELINE_KEYS)),
        }
    }
}

fn parse_stage(entry: &Entry, errors: &mut Vec<Diagnostic>) -> Option<StageDecl> {
    let id = entry.key.clone();
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        errors.push(Diagnostic::new(
            &entry.key_origin,
            format!("stage id \"{id}\" may only use letters, digits, `_` and `-` (no dots)"),
        ));
    }
    let Value::Table(fields) = &entry.node.value else {
        errors.push(Diagnostic::new(
            &entry.node.origin,
            format!("`stages.{id}` must be a table: write `[stages.{id}]` with a `kind`"),
        ));
        return None;
    };
    let mut decl = StageDecl {
        id: id.clone(),
        id_origin: entry.key_origin.clone(),
        kind: String::new(),
        kind_origin: entry.key_origin.clone(),
        inputs: Vec::new(),
        feedback: Vec::new(),
        config: Vec::new(),
        config_origin: entry.key_origin.clone(),
    };
    let mut has_kind = false;
    for f in fields {
        let field = format!("stages.{id}.{}", f.key);
        match f.key.as_str() {
            "kind" => {
                if let Some(kind) = string(&f.node, &field, errors) {
                    decl.kind = kind;
                    decl.kind_origin = f.node.origin.clone();
                    has_kind = true;
                }
            }
            "inputs" => decl.inputs = bindings(&f.node, &field, errors),
            "feedback" => decl.feedback = bindings(&f.node, &field, errors),
            "config" => match &f.node.value {
                Value::Table(entries) => {
                    decl.config = entries.clone();
                    decl.config_origin = f.key_origin.clone();
                }
                other => errors.push(Diagnostic::new(
                    &f.node.origin,
                    format!("`{field}` must be a table, found {}", other.type_name()),
                )),
            },
            _ => errors.push(unknown_key(f, &format!("[stages.{id}]"), STAGE_KEYS)),
        }
    }
    if !has_kind && !fields.iter().any(|f| f.key == "kind") {
        errors.push(Diagnostic::new(
            &entry.key_origin,
            format!("stage `{id}` has no `kind`: add `kind = \"...\"` (see `hone plugins`)"),
        ));
    }
    Some(decl)
}

/// `inputs` / `feedback`: a reference, a list of references (both for the
/// sole input port), or a table from port name to reference(s).
fn bindings(node: &Node, field: &str, errors: &mut Vec<Diagnostic>) -> Vec<Binding> {
    let mut out = Vec::new();
    match &node.value {
        Value::Str(_) | Value::Array(_) => references(node, None, field, &mut out, errors),
        Value::Table(entries) => {
            for e in entries {
                let f = format!("{field}.{}", e.key);
                references(&e.node, Some(e.key.clone()), &f, &mut out, errors);
            }
        }
        other => errors.push(Diagnostic::new(
            &node.origin,
            format!(
                "`{field}` must be \"STAGE\", \"STAGE.PORT\", a list of them, or a table \
                 {{ PORT = \"STAGE.PORT\" }}; found {} {}",
                other.type_name(),
                other.to_toml_text()
            ),
        )),
    }
    out
}

fn references(
    node: &Node,
    port: Option<String>,
    field: &str,
    out: &mut Vec<Binding>,
    errors: &mut Vec<Diagnostic>,
) {
    let items: Vec<&Node> = match &node.value {
        Value::Array(items) => items.iter().collect(),
        _ => vec![node],
    };
    for item in items {
        let Some(text) = string(item, field, errors) else {
            continue;
        };
        let (source, source_port) = match text.split_once('.') {
            Some((s, p)) => (s.to_string(), Some(p.to_string())),
            None => (text.clone(), None),
        };
        if source.is_empty() || source_port.as_deref() == Some("") {
            errors.push(Diagnostic::new(
                &item.origin,
                format!(
                    "`{field}` = \"{text}\" is not a reference: write \"STAGE\" or \"STAGE.PORT\""
                ),
            ));
            continue;
        }
        out.push(Binding {
            port: port.clone(),
            source,
            source_port,
            origin: item.origin.clone(),
        });
    }
}

fn expect_table<'a>(
    entry: &'a Entry,
    field: &str,
    errors: &mut Vec<Diagnostic>,
) -> Option<&'a [Entry]> {
    match &entry.node.value {
        Value::Table(entries) => Some(entries),
        other => {
            errors.push(Diagnostic::new(
                &entry.node.origin,
                format!(
                    "`{field}` must be a table of stages, found {}",
                    other.type_name()
                ),
            ));
            None
        }
    }
}

fn string(node: &Node, field: &str, errors: &mut Vec<Diagnostic>) -> Option<String> {
    match &node.value {
        Value::Str(s) => Some(s.clone()),
        other => {
            errors.push(Diagnostic::new(
                &node.origin,
                format!(
                    "`{field}` must be a string, found {} {}",
                    other.type_name(),
                    other.to_toml_text()
                ),
            ));
            None
        }
    }
}

/// The most rounds a pipeline may run: each round is a timely epoch with a
/// call into every stage, so a larger count is a typo that would run for days.
pub const MAX_ROUNDS: u64 = 1_000_000;

/// An integer of type `ty` (its bounds checked), or an error at its line.
fn bounded(node: &Node, field: &str, ty: &FieldType, errors: &mut Vec<Diagnostic>) -> Option<u64> {
    let (min, max) = ty.integer_bounds().expect("an integer type");
    let message = match &node.value {
        Value::Int(i) if (min..=max).contains(i) => return Some(*i as u64),
        Value::Int(i) => super::validate::out_of_range(field, &i.to_string(), ty),
        Value::BigInt(digits) => super::validate::out_of_range(field, digits, ty),
        other => super::validate::wrong_type(field, ty, other),
    };
    errors.push(Diagnostic::new(&node.origin, message));
    None
}

fn seed(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<u64> {
    bounded(node, "pipeline.seed", &FieldType::unsigned(), errors)
}

/// `rounds`: at most [`MAX_ROUNDS`]; 0 means until stopped, which only
/// `hone serve` runs (`hone run` refuses it with that advice).
fn rounds(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<u64> {
    bounded(
        node,
        "pipeline.rounds",
        &FieldType::range(0, MAX_ROUNDS),
        errors,
    )
}

/// `pipeline.name`, which names the run directory `runs/NAME`: checked so
/// that it cannot leave `runs/` or name it (`..`, `""`, `a/../..`).
fn run_name(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<String> {
    let name = string(node, "pipeline.name", errors)?;
    match crate::rundir::check_name(&name) {
        Ok(()) => Some(name),
        Err(message) => {
            errors.push(Diagnostic::new(&node.origin, message));
            None
        }
    }
}

fn unknown_key(entry: &Entry, place: &str, known: &[&str]) -> Diagnostic {
    let hint = crate::diag::closest(&entry.key, known.iter().copied())
        .map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    Diagnostic::new(
        &entry.key_origin,
        format!(
            "unknown key `{}` in {place}{hint}; known keys: {}",
            entry.key,
            known.join(", ")
        ),
    )
}

/// Applies `--set STAGE.KEY=VALUE` (or `pipeline.KEY=VALUE`). VALUE is read as
/// a TOML value, or as a string when it is not one.
pub fn apply_override(p: &mut Pipeline, arg: &str) -> Result<(), Diagnostic> {
    let origin = Origin::Cli(arg.to_string());
    let Some((path, raw)) = arg.split_once('=') else {
        return Err(Diagnostic::new(
            &origin,
            "expected STAGE.KEY=VALUE, e.g. `--set filter.min_response_chars=10`",
        ));
    };
    let Some((stage, key)) = path.trim().split_once('.') else {
        return Err(Diagnostic::new(
            &origin,
            "expected STAGE.KEY=VALUE: the key needs a stage id before a dot",
        ));
    };
    let node = node::parse_value(raw.trim(), &origin).unwrap_or(Node {
        origin: origin.clone(),
        value: Value::Str(raw.to_string()),
    });
    if stage == "pipeline" {
        let mut errors = Vec::new();
        match key {
            "rounds" => p.rounds = rounds(&node, &mut errors).unwrap_or(p.rounds),
            "seed" => p.seed = seed(&node, &mut errors).unwrap_or(p.seed),
            "name" => p.name = run_name(&node, &mut errors).unwrap_or_else(|| p.name.clone()),
            _ => {
                return Err(Diagnostic::new(
                    &origin,
                    "only pipeline.rounds, pipeline.seed and pipeline.name can be set from the command line",
                ))
            }
        }
        return errors.into_iter().next().map_or(Ok(()), Err);
    }
    let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
    let known = ids.join(", ");
    let Some(decl) = p.stages.iter_mut().find(|s| s.id == stage) else {
        return Err(Diagnostic::new(
            &origin,
            format!("no stage `{stage}` in the pipeline; stages: {known}"),
        ));
    };
    let entry = Entry {
        key: key.to_string(),
        key_origin: origin,
        node,
    };
    match decl.config.iter_mut().find(|e| e.key == key) {
        Some(existing) => *existing = entry,
        None => decl.config.push(entry),
    }
    Ok(())
}
