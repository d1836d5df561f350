//! Checks a parsed pipeline against the loaded stage kinds: kinds, ports,
//! port types, cycles and every stage's config schema. Every error is
//! collected; nothing runs unless there are none.

use super::node::{toml_key, toml_string, Entry, Node, Value};
use super::{Binding, Pipeline, StageDecl};
use crate::diag::{closest, Diagnostic, Origin};
use hone_sdk::{FieldType, Placement, StageDescriptor};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A pipeline ready to run.
#[derive(Debug, Clone)]
pub struct ResolvedPipeline {
    /// The pipeline as parsed.
    pub pipeline: Pipeline,
    /// The stages, in the pipeline's order.
    pub stages: Vec<ResolvedStage>,
    /// Stage indices in an order where every non-feedback edge points forward.
    pub order: Vec<usize>,
}

/// A stage with its descriptor, validated config and incoming edges.
#[derive(Debug, Clone)]
pub struct ResolvedStage {
    /// The declaration.
    pub decl: StageDecl,
    /// The kind's descriptor.
    pub descriptor: StageDescriptor,
    /// The config with defaults filled and paths resolved.
    pub config: serde_json::Value,
    /// Incoming edges.
    pub edges: Vec<Edge>,
    /// Ensemble size for per-member stages, 1 otherwise.
    pub members: usize,
}

/// An edge between an output port and an input port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// Index of the upstream stage.
    pub from: usize,
    /// Its output port.
    pub from_port: usize,
    /// The input port it feeds.
    pub to_port: usize,
    /// Whether it carries round `t` output into round `t + 1`.
    pub feedback: bool,
}

/// Validates `p` against the known stage kinds.
pub fn validate(
    p: Pipeline,
    kinds: &BTreeMap<String, StageDescriptor>,
) -> Result<ResolvedPipeline, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let index: BTreeMap<&str, usize> = p
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let descriptors: Vec<Option<&StageDescriptor>> = p
        .stages
        .iter()
        .map(|s| {
            let d = kinds.get(&s.kind);
            if d.is_none() && !s.kind.is_empty() {
                let hint = closest(&s.kind, kinds.keys().map(String::as_str))
                    .map(|k| format!(" (did you mean \"{k}\"?)"))
                    .unwrap_or_default();
                let known: Vec<&str> = kinds.keys().map(String::as_str).collect();
                errors.push(Diagnostic::new(
                    &s.kind_origin,
                    format!(
                        "unknown stage kind \"{}\" for stage `{}`{hint}; known kinds: {} \
                         (a third-party stage needs `--plugin-path DIR`)",
                        s.kind,
                        s.id,
                        known.join(", ")
                    ),
                ));
            }
            d
        })
        .collect();

    let mut stages = Vec::new();
    for (i, decl) in p.stages.iter().enumerate() {
        let Some(descriptor) = descriptors[i] else {
            continue;
        };
        let mut edges = Vec::new();
        for (feedback, list) in [(false, &decl.inputs), (true, &decl.feedback)] {
            for b in list {
                if let Some(edge) = resolve_binding(
                    decl,
                    descriptor,
                    b,
                    feedback,
                    &index,
                    &descriptors,
                    &mut errors,
                ) {
                    edges.push(edge);
                }
            }
        }
        let config = check_config(decl, descriptor, &p, &mut errors);
        let members = match &descriptor.placement {
            Placement::PerMember { members_field } => config
                .get(members_field)
                .and_then(|v| v.as_u64())
                .unwrap_or(1)
                .max(1) as usize,
            _ => 1,
        };
        stages.push(ResolvedStage {
            decl: decl.clone(),
            descriptor: descriptor.clone(),
            config,
            edges,
            members,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    match topological_order(&stages) {
        Ok(order) => Ok(ResolvedPipeline {
            pipeline: p,
            stages,
            order,
        }),
        Err(e) => Err(vec![e]),
    }
}

fn resolve_binding(
    decl: &StageDecl,
    descriptor: &StageDescriptor,
    b: &Binding,
    feedback: bool,
    index: &BTreeMap<&str, usize>,
    descriptors: &[Option<&StageDescriptor>],
    errors: &mut Vec<Diagnostic>,
) -> Option<Edge> {
    let section = if feedback { "feedback" } else { "inputs" };
    // The input ports this binding may mean: the one named, or all.
    let ins: Vec<usize> = match &b.port {
        Some(name) => match descriptor.input_index(name) {
            Some(i) => vec![i],
            None => {
                errors.push(Diagnostic::new(
                    &b.origin,
                    format!(
                        "stage `{}` ({}) has no input port `{name}`; its inputs: {}",
                        decl.id,
                        descriptor.kind,
                        port_list(&descriptor.inputs)
                    ),
                ));
                return None;
            }
        },
        None => (0..descriptor.inputs.len()).collect(),
    };
    let Some(&from) = index.get(b.source.as_str()) else {
        let ids: Vec<&str> = index.keys().copied().collect();
        let hint = closest(&b.source, ids.iter().copied())
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        errors.push(Diagnostic::new(
            &b.origin,
            format!(
                "`stages.{}.{section}` names stage `{}`, which does not exist{hint}; stages: {}",
                decl.id,
                b.source,
                ids.join(", ")
            ),
        ));
        return None;
    };
    let upstream = descriptors[from]?;
    // The output ports it may mean: the one named, or all.
    let outs: Vec<usize> = match &b.source_port {
        Some(name) => match upstream.output_index(name) {
            Some(o) => vec![o],
            None => {
                errors.push(Diagnostic::new(
                    &b.origin,
                    format!(
                        "stage `{}` ({}) has no output port `{name}`; its outputs: {} (write \"{}.PORT\")",
                        b.source,
                        upstream.kind,
                        port_list(&upstream.outputs),
                        b.source
                    ),
                ));
                return None;
            }
        },
        None => (0..upstream.outputs.len()).collect(),
    };
    if outs.is_empty() || ins.is_empty() {
        let (stage, kind, what) = if outs.is_empty() {
            (
                b.source.as_str(),
                upstream.kind.as_str(),
                "outputs: nothing can read from it",
            )
        } else {
            (
                decl.id.as_str(),
                descriptor.kind.as_str(),
                "inputs: it cannot be wired",
            )
        };
        errors.push(Diagnostic::new(
            &b.origin,
            format!("stage `{stage}` ({kind}) has no {what}"),
        ));
        return None;
    }
    let (from_port, to_port) = match (outs.as_slice(), ins.as_slice()) {
        // One each: a wrong type is reported below as a mismatch.
        ([o], [i]) => (*o, *i),
        _ => {
            // Several on a side left unnamed: the one combination whose
            // records fit (world.gold's Scores to a `scores` port, a
            // Completion stream to world.label's `completions`), if only one does.
            let fitting: Vec<(usize, usize)> = outs
                .iter()
                .flat_map(|&o| ins.iter().map(move |&i| (o, i)))
                .filter(|&(o, i)| upstream.outputs[o].kind.feeds(descriptor.inputs[i].kind))
                .collect();
            match fitting.as_slice() {
                [one] => *one,
                _ => {
                    let fits = if fitting.is_empty() {
                        "none"
                    } else {
                        "more than one"
                    };
                    let message = if ins.len() > 1 {
                        format!(
                            "stage `{}` ({}) has {} input ports ({}) and {fits} of them takes what `{}` \
                             emits: name the port, e.g. `{section} = {{ {} = \"{}\" }}`",
                            decl.id,
                            descriptor.kind,
                            descriptor.inputs.len(),
                            port_list(&descriptor.inputs),
                            b.source,
                            descriptor.inputs.first().map(|p| p.name.as_str()).unwrap_or("PORT"),
                            b.source
                        )
                    } else {
                        let input = &descriptor.inputs[ins[0]];
                        format!(
                            "stage `{}` ({}) has several outputs and input `{}` of stage `{}` takes {fits} of \
                             them ({}): name one (write \"{}.PORT\"); its outputs: {}",
                            b.source,
                            upstream.kind,
                            input.name,
                            decl.id,
                            input.kind,
                            b.source,
                            port_list(&upstream.outputs),
                        )
                    };
                    errors.push(Diagnostic::new(&b.origin, message));
                    return None;
                }
            }
        }
    };
    let (out, input) = (&upstream.outputs[from_port], &descriptor.inputs[to_port]);
    if !out.kind.feeds(input.kind) {
        errors.push(Diagnostic::new(
            &b.origin,
            format!(
                "port type mismatch: `{}.{}` carries {} but input `{}` of stage `{}` ({}) takes {}",
                b.source, out.name, out.kind, input.name, decl.id, descriptor.kind, input.kind
            ),
        ));
        return None;
    }
    Some(Edge {
        from,
        from_port,
        to_port,
        feedback,
    })
}

fn port_list(ports: &[hone_sdk::Port]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    ports
        .iter()
        .map(|p| format!("{} ({})", p.name, p.kind))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_config(
    decl: &StageDecl,
    d: &StageDescriptor,
    p: &Pipeline,
    errors: &mut Vec<Diagnostic>,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for entry in &decl.config {
        let Some(field) = d.config.iter().find(|f| f.name == entry.key) else {
            let names: Vec<&str> = d.config.iter().map(|f| f.name.as_str()).collect();
            let hint = closest(&entry.key, names.iter().copied())
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            errors.push(Diagnostic::new(
                &entry.key_origin,
                format!(
                    "unknown config key `{}` for stage `{}` ({}){hint}; known keys: {}",
                    entry.key,
                    decl.id,
                    d.kind,
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
            continue;
        };
        let name = format!("stages.{}.config.{}", decl.id, entry.key);
        if let Some(v) = check_value(&entry.node, &field.ty, &name, p, errors) {
            out.insert(field.name.clone(), v);
        }
    }
    for field in &d.config {
        if out.contains_key(&field.name) || decl.config.iter().any(|e| e.key == field.name) {
            continue;
        }
        match field.required {
            false => {
                out.insert(field.name.clone(), field.default.clone());
            }
            true => errors.push(Diagnostic::new(
                &decl.config_origin,
                format!(
                    "stage `{}` ({}) needs config `{}` ({}): {}",
                    decl.id,
                    d.kind,
                    field.name,
                    field.ty.describe(),
                    field.doc
                ),
            )),
        }
    }
    serde_json::Value::Object(out)
}

fn check_value(
    node: &Node,
    ty: &FieldType,
    name: &str,
    p: &Pipeline,
    errors: &mut Vec<Diagnostic>,
) -> Option<serde_json::Value> {
    let mismatch = |errors: &mut Vec<Diagnostic>| {
        errors.push(Diagnostic::new(
            &node.origin,
            wrong_type(name, ty, &node.value),
        ));
        None
    };
    match (ty, &node.value) {
        (FieldType::String, Value::Str(s)) => Some(s.clone().into()),
        (FieldType::Path, Value::Str(s)) => {
            let path = std::path::Path::new(s);
            let resolved = if path.is_absolute() || matches!(node.origin, Origin::Cli(_)) {
                path.to_path_buf()
            } else {
                p.dir.join(path)
            };
            Some(resolved.to_string_lossy().into_owned().into())
        }
        (FieldType::Integer | FieldType::Unsigned { .. }, Value::Int(i)) => {
            let (min, max) = ty.integer_bounds().expect("integer types have bounds");
            if (min..=max).contains(i) {
                Some((*i).into())
            } else {
                errors.push(Diagnostic::new(
                    &node.origin,
                    out_of_range(name, &i.to_string(), ty),
                ));
                None
            }
        }
        (FieldType::Integer | FieldType::Unsigned { .. }, Value::BigInt(digits)) => {
            errors.push(Diagnostic::new(
                &node.origin,
                out_of_range(name, digits, ty),
            ));
            None
        }
        (FieldType::Float, Value::Int(i)) => Some((*i as f64).into()),
        (FieldType::Float, Value::Float(f)) => Some(node.value.to_json())
            .filter(|_| f.is_finite())
            .or_else(|| {
                errors.push(Diagnostic::new(
                    &node.origin,
                    format!("`{name}` must be a finite number, found {f}"),
                ));
                None
            }),
        (FieldType::Bool, Value::Bool(b)) => Some((*b).into()),
        (FieldType::Enum(options), Value::Str(s)) => {
            if options.contains(s) {
                Some(s.clone().into())
            } else {
                let hint = closest(s, options.iter().map(String::as_str))
                    .map(|k| format!(" (did you mean \"{k}\"?)"))
                    .unwrap_or_default();
                errors.push(Diagnostic::new(
                    &node.origin,
                    format!(
                        "`{name}` = \"{s}\" is not allowed{hint}; use {}",
                        ty.describe()
                    ),
                ));
                None
            }
        }
        (FieldType::List(inner), Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(check_value(
                    item,
                    inner,
                    &format!("{name}[{i}]"),
                    p,
                    errors,
                )?);
            }
            Some(out.into())
        }
        _ => mismatch(errors),
    }
}

/// "`NAME` must be TYPE, found TYPE VALUE" (for a bounded integer, with the
/// range to use).
pub(super) fn wrong_type(name: &str, ty: &FieldType, value: &Value) -> String {
    let found = format!("found {} {}", value.type_name(), value.to_toml_text());
    match ty {
        FieldType::Unsigned { .. } => {
            format!(
                "`{name}` must be an integer, {found}; use {}",
                ty.expected()
            )
        }
        _ => format!("`{name}` must be {}, {found}", ty.expected()),
    }
}

/// "`NAME` = VALUE is out of range: use ...", naming the allowed range.
pub(super) fn out_of_range(name: &str, value: &str, ty: &FieldType) -> String {
    let negative = value.starts_with('-');
    let limit = match (ty, negative) {
        (FieldType::Unsigned { max: Some(_), .. }, _) => String::new(),
        (FieldType::Unsigned { .. }, false) => format!(" (at most {})", FieldType::INTEGER_MAX),
        (FieldType::Unsigned { .. }, true) => String::new(),
        (_, true) => format!(" (at least {})", i64::MIN),
        (_, false) => format!(" (at most {})", i64::MAX),
    };
    format!(
        "`{name}` = {value} is out of range: use {}{limit}",
        ty.expected()
    )
}

/// Orders stages so that every non-feedback edge points forward, or reports
/// a cycle.
fn topological_order(stages: &[ResolvedStage]) -> Result<Vec<usize>, Diagnostic> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        stages: &[ResolvedStage],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), Diagnostic> {
        marks[i] = Mark::Active;
        path.push(i);
        for e in stages[i].edges.iter().filter(|e| !e.feedback) {
            match marks[e.from] {
                Mark::Done => {}
                Mark::New => visit(e.from, stages, marks, path, order)?,
                Mark::Active => {
                    let start = path.iter().position(|&s| s == e.from).unwrap_or(0);
                    // `path` follows edges upstream; print the cycle the way data
                    // flows, starting from the stage the closing edge comes from.
                    let mut names: Vec<&str> = path[start..]
                        .iter()
                        .rev()
                        .map(|&s| stages[s].decl.id.as_str())
                        .collect();
                    names.rotate_right(1);
                    let binding = stages[i]
                        .decl
                        .inputs
                        .iter()
                        .find(|b| b.source == stages[e.from].decl.id)
                        .map(|b| b.origin.clone())
                        .unwrap_or_else(|| stages[i].decl.id_origin.clone());
                    return Err(Diagnostic::new(
                        &binding,
                        format!(
                            "cycle without a feedback edge: {} -> {}. Loops carry data from one \
                             round to the next: move one edge of the cycle from `inputs` to \
                             `feedback` (e.g. `feedback = {{ PORT = \"{}\" }}`)",
                            names.join(" -> "),
                            names[0],
                            stages[e.from].decl.id
                        ),
                    ));
                }
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        order.push(i);
        Ok(())
    }
    let mut marks = vec![Mark::New; stages.len()];
    let mut order = Vec::new();
    for i in 0..stages.len() {
        if marks[i] == Mark::New {
            visit(i, stages, &mut marks, &mut Vec::new(), &mut order)?;
        }
    }
    Ok(order)
}

impl ResolvedPipeline {
    /// The resolved pipeline as TOML: explicit ports, overrides applied,
    /// defaults filled in. Written to the run directory as `pipeline.toml`.
    pub fn to_toml(&self) -> String {
        let p = &self.pipeline;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Resolved by hone {}: defaults filled in, --set applied.",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(s, "[pipeline]\nname = {}", toml_string(&p.name));
        if !p.description.is_empty() {
            let _ = writeln!(s, "description = {}", toml_string(&p.description));
        }
        let _ = writeln!(s, "rounds = {}\nseed = {}", p.rounds, p.seed);
        if !p.plugin_path.is_empty() {
            let dirs: Vec<String> = p
                .plugin_path
                .iter()
                .map(|d| toml_string(&d.to_string_lossy()))
                .collect();
            let _ = writeln!(s, "plugin_path = [{}]", dirs.join(", "));
        }
        for stage in &self.stages {
            let _ = writeln!(
                s,
                "\n[stages.{}]\nkind = {}",
                toml_key(&stage.decl.id),
                toml_string(&stage.decl.kind)
            );
            for (feedback, key) in [(false, "inputs"), (true, "feedback")] {
                let mut ports: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for e in stage.edges.iter().filter(|e| e.feedback == feedback) {
                    let from = &self.stages[e.from];
                    ports
                        .entry(stage.descriptor.inputs[e.to_port].name.as_str())
                        .or_default()
                        .push(toml_string(&format!(
                            "{}.{}",
                            from.decl.id, from.descriptor.outputs[e.from_port].name
                        )));
                }
                if !ports.is_empty() {
                    let parts: Vec<String> = ports
                        .iter()
                        .map(|(k, v)| format!("{} = [{}]", toml_key(k), v.join(", ")))
                        .collect();
                    let _ = writeln!(s, "{key} = {{ {} }}", parts.join(", "));
                }
            }
            if let Some(obj) = stage.config.as_object() {
                if !obj.is_empty() {
                    let _ = writeln!(s, "[stages.{}.config]", toml_key(&stage.decl.id));
                    for (k, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
                        let _ = writeln!(s, "{} = {}", toml_key(k), json_to_toml(v));
                    }
                }
            }
        }
        s
    }
}

fn json_to_toml(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "\"\"".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => {
            if n.is_f64() {
                Value::Float(n.as_f64().unwrap_or(0.0)).to_toml_text()
            } else {
                n.to_string()
            }
        }
        serde_json::Value::String(s) => toml_string(s),
        serde_json::Value::Array(a) => format!(
            "[{}]",
            a.iter().map(json_to_toml).collect::<Vec<_>>().join(", ")
        ),
        serde_json::Value::Object(o) => format!(
            "{{ {} }}",
            o.iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), json_to_toml(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Entries of a config table, for callers that map a stage's config error
/// back to where the field was written.
pub fn config_origin(decl: &StageDecl, field: &str) -> Origin {
    decl.config
        .iter()
        .find(|e: &&Entry| e.key == field)
        .map(|e| e.node.origin.clone())
        .unwrap_or_else(|| decl.config_origin.clone())
}
