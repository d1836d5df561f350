//! `hone graph`: the pipeline as a Mermaid flowchart.

use crate::pipeline::ResolvedPipeline;
use std::fmt::Write as _;

/// Renders the pipeline as Mermaid. Feedback edges are dotted and labelled
/// `t+1`.
pub fn mermaid(p: &ResolvedPipeline) -> String {
    let mut s = String::from("flowchart LR\n");
    for stage in &p.stages {
        let _ = writeln!(
            s,
            "    {}[\"{}<br/><i>{}</i>\"]",
            node_id(&stage.decl.id),
            stage.decl.id,
            stage.decl.kind
        );
    }
    for stage in &p.stages {
        for e in &stage.edges {
            let from = &p.stages[e.from];
            let label = format!(
                "{} → {}",
                from.descriptor.outputs[e.from_port].name, stage.descriptor.inputs[e.to_port].name
            );
            let arrow = if e.feedback {
                format!("-. \"{label} (t+1)\" .->")
            } else {
                format!("-- \"{label}\" -->")
            };
            let _ = writeln!(
                s,
                "    {} {arrow} {}",
                node_id(&from.decl.id),
                node_id(&stage.decl.id)
            );
        }
    }
    s
}

fn node_id(id: &str) -> String {
    format!("s_{}", id.replace('-', "_"))
}
