//! How a stage describes itself: name, ports, config schema, placement.

use crate::RecordKind;
use serde::{Deserialize, Serialize};

/// A typed input or output port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port {
    /// Port name, unique among the stage's inputs (or outputs).
    pub name: String,
    /// The records it carries.
    pub kind: RecordKind,
}

/// The type of a config field, checked by the runtime before anything runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FieldType {
    /// A string.
    String,
    /// A path; a relative path is resolved against the pipeline file's directory.
    Path,
    /// An integer, negative ones included. For a count, size, step, limit or
    /// seed use [`FieldType::Unsigned`] ([`FieldType::unsigned`],
    /// [`FieldType::positive`], [`FieldType::range`]) so that the runtime
    /// rejects a negative or absurd value at its line before anything runs.
    Integer,
    /// A whole number from `min` to `max` inclusive (`max` unset: up to the
    /// largest TOML integer, 2^63 - 1). It reaches the stage as a JSON number
    /// that always fits a `u64` (and a `usize` on 64-bit targets); give a
    /// `max` that fits any narrower type the stage's config struct uses.
    Unsigned {
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed; `None` for no bound below 2^63 - 1.
        max: Option<u64>,
    },
    /// A float (an integer is accepted too).
    Float,
    /// A boolean.
    Bool,
    /// One of a fixed set of strings.
    Enum(Vec<String>),
    /// A list of values of one type.
    List(Box<FieldType>),
}

impl FieldType {
    /// A short human name, used in messages and docs.
    pub fn describe(&self) -> String {
        match self {
            FieldType::String => "string".into(),
            FieldType::Path => "path".into(),
            FieldType::Integer => "integer".into(),
            FieldType::Unsigned { min, max } => match (min, max) {
                (0, None) => "non-negative integer".into(),
                (m, None) => format!("non-negative integer of at least {m}"),
                (m, Some(x)) => format!("non-negative integer from {m} to {x}"),
            },
            FieldType::Float => "float".into(),
            FieldType::Bool => "boolean".into(),
            FieldType::Enum(options) => {
                let quoted: Vec<String> = options.iter().map(|o| format!("\"{o}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            FieldType::List(inner) => format!("list of {}", inner.describe()),
        }
    }

    /// [`FieldType::describe`] with an article, for "must be ..." messages.
    pub fn expected(&self) -> String {
        match self {
            FieldType::Enum(_) => self.describe(),
            FieldType::Integer => "an integer".into(),
            FieldType::Unsigned { .. } => format!("a {}", self.describe()),
            _ => format!("a {}", self.describe()),
        }
    }
}

/// One documented config field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigField {
    /// The key in the stage's `config` table.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// What it does, in one or two sentences.
    pub doc: String,
    /// Whether the field must be given (then `default` is unused).
    pub required: bool,
    /// The default as JSON (`null` for "unset").
    pub default: serde_json::Value,
}

/// Where a stage's instances run and how input reaches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// One instance, on worker 0; all input is routed there.
    Single,
    /// One instance per worker; records are exchanged by [`crate::Record::shard_key`].
    DataParallel,
    /// An ensemble: member `i` runs on worker `i mod N`; every instance sees
    /// all input. The member count is read from the named integer config field.
    PerMember {
        /// The config field holding the number of members.
        members_field: String,
    },
}

/// Everything the runtime knows about a stage kind before creating it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageDescriptor {
    /// The kind named in pipeline files (`family.name`, e.g. `jsonl.read-pairs`).
    pub kind: String,
    /// One line saying what it does.
    pub description: String,
    /// Typed input ports.
    pub inputs: Vec<Port>,
    /// Typed output ports.
    pub outputs: Vec<Port>,
    /// The config schema.
    pub config: Vec<ConfigField>,
    /// Where it runs.
    pub placement: Placement,
}

impl StageDescriptor {
    /// A stage with no ports, no config, placed on a single worker.
    pub fn new(kind: impl Into<String>, description: impl Into<String>) -> Self {
        StageDescriptor {
            kind: kind.into(),
            description: description.into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            config: Vec::new(),
            placement: Placement::Single,
        }
    }

    /// Adds an input port.
    pub fn input(mut self, name: &str, kind: RecordKind) -> Self {
        self.inputs.push(Port {
            name: name.into(),
            kind,
        });
        self
    }

    /// Adds an output port.
    pub fn output(mut self, name: &str, kind: RecordKind) -> Self {
        self.outputs.push(Port {
            name: name.into(),
            kind,
        });
        self
    }

    /// Adds a required config field.
    pub fn required(mut self, name: &str, ty: FieldType, doc: &str) -> Self {
        self.config.push(ConfigField {
            name: name.into(),
            ty,
            doc: doc.into(),
            required: true,
            default: serde_json::Value::Null,
        });
        self
    }

    /// Adds an optional config field with its default.
    pub fn optional(
        mut self,
        name: &str,
        ty: FieldType,
        default: impl Into<serde_json::Value>,
        doc: &str,
    ) -> Self {
        self.config.push(ConfigField {
            name: name.into(),
            ty,
            doc: doc.into(),
            required: false,
            default: default.into(),
        });
        self
    }

    /// Sets the placement.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Index of the input port with this name.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|p| p.name == name)
    }

    /// Index of the output port with this name.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|p| p.name == name)
    }
}

/// Builds an `Enum` field type from string literals.
pub fn one_of(options: &[&str]) -> FieldType {
    FieldType::Enum(options.iter().map(|s| s.to_string()).collect())
}

impl FieldType {
    /// Shorthand for [`one_of`].
    pub fn one_of(options: &[&str]) -> FieldType {
        one_of(options)
    }

    /// The largest integer a pipeline file can hold (TOML integers are `i64`).
    pub const INTEGER_MAX: u64 = i64::MAX as u64;

    /// A non-negative integer: a count, a limit, a seed (0 allowed).
    pub fn unsigned() -> FieldType {
        FieldType::Unsigned { min: 0, max: None }
    }

    /// An integer of at least 1: a size, a step count, a batch.
    pub fn positive() -> FieldType {
        FieldType::Unsigned { min: 1, max: None }
    }

    /// An integer from `min` to `max` inclusive.
    pub fn range(min: u64, max: u64) -> FieldType {
        assert!(min <= max, "FieldType::range({min}, {max}): min above max");
        FieldType::Unsigned {
            min,
            max: Some(max),
        }
    }

    /// The same unsigned type with an upper bound (`positive().at_most(1024)`).
    /// Other types are returned unchanged.
    pub fn at_most(self, max: u64) -> FieldType {
        match self {
            FieldType::Unsigned { min, .. } => FieldType::range(min, max),
            other => other,
        }
    }

    /// The bounds an integer must lie in, for [`FieldType::Integer`] and
    /// [`FieldType::Unsigned`]; `None` for other types.
    pub fn integer_bounds(&self) -> Option<(i64, i64)> {
        let clamp = |v: u64| v.min(Self::INTEGER_MAX) as i64;
        match self {
            FieldType::Integer => Some((i64::MIN, i64::MAX)),
            FieldType::Unsigned { min, max } => {
                Some((clamp(*min), clamp(max.unwrap_or(Self::INTEGER_MAX))))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_types_describe_their_range() {
        assert_eq!(FieldType::unsigned().describe(), "non-negative integer");
        assert_eq!(FieldType::unsigned().expected(), "a non-negative integer");
        assert_eq!(
            FieldType::positive().describe(),
            "non-negative integer of at least 1"
        );
        assert_eq!(
            FieldType::positive().at_most(64).expected(),
            "a non-negative integer from 1 to 64"
        );
        assert_eq!(FieldType::range(2, 9).integer_bounds(), Some((2, 9)));
        assert_eq!(FieldType::unsigned().integer_bounds(), Some((0, i64::MAX)));
        assert_eq!(FieldType::Float.integer_bounds(), None);
        assert_eq!(FieldType::Float.at_most(3), FieldType::Float);
    }

    #[test]
    fn unsigned_types_cross_the_boundary_as_json() {
        let ty = FieldType::positive().at_most(1024);
        let json = serde_json::to_string(&ty).unwrap();
        assert_eq!(json, r#"{"Unsigned":{"min":1,"max":1024}}"#);
        assert_eq!(serde_json::from_str::<FieldType>(&json).unwrap(), ty);
    }
}
