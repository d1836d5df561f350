//! Pipeline files: parsing with locations ([`parse`]), overrides and
//! validation against the loaded stage kinds ([`validate`]).

pub mod node;
mod parse;
pub mod text;
mod validate;

pub use parse::{apply_override, parse_pipeline};
pub use validate::{config_origin, validate, Edge, ResolvedPipeline, ResolvedStage};

use crate::diag::Origin;
use node::Entry;
use std::path::PathBuf;

/// A pipeline file as written, with the location of everything in it.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// `pipeline.name` (defaults to the file stem).
    pub name: String,
    /// `pipeline.description`.
    pub description: String,
    /// `pipeline.rounds`: how many rounds the dataflow runs.
    pub rounds: u64,
    /// `pipeline.seed`: the seed every stage derives its randomness from.
    pub seed: u64,
    /// `pipeline.plugin_path`, resolved against the file's directory.
    pub plugin_path: Vec<PathBuf>,
    /// The stages, in key order.
    pub stages: Vec<StageDecl>,
    /// The directory relative paths are resolved against.
    pub dir: PathBuf,
}

/// One `[stages.ID]` table.
#[derive(Debug, Clone)]
pub struct StageDecl {
    /// The stage id (the table's key).
    pub id: String,
    /// Where the id was written.
    pub id_origin: Origin,
    /// The stage kind.
    pub kind: String,
    /// Where the kind was written.
    pub kind_origin: Origin,
    /// Edges into this stage within a round.
    pub inputs: Vec<Binding>,
    /// Edges into this stage from the previous round (loops).
    pub feedback: Vec<Binding>,
    /// The `config` table as written (and overridden).
    pub config: Vec<Entry>,
    /// Where the config table (or, without one, the stage table) was written.
    pub config_origin: Origin,
}

/// `PORT = "STAGE.PORT"`: one edge into a stage.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The input port, or `None` for the stage's sole input port.
    pub port: Option<String>,
    /// The upstream stage.
    pub source: String,
    /// The upstream output port, or `None` for its sole output port.
    pub source_port: Option<String>,
    /// Where the reference was written.
    pub origin: Origin,
}
