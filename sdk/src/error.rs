use std::fmt;

/// An error a stage reports to the runtime. The runtime prefixes it with the
/// stage id, so the message should say what went wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    /// Where the problem lies: a config field name (`"path"`), a file and
    /// line (`"data.jsonl:12"`), or empty.
    pub location: String,
    /// What went wrong and how to fix it.
    pub message: String,
}

impl StageError {
    /// An error with no particular location.
    pub fn new(message: impl Into<String>) -> Self {
        StageError {
            location: String::new(),
            message: message.into(),
        }
    }

    /// An error about one config field; the runtime maps it to the field's
    /// line and column in the pipeline file.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        StageError {
            location: format!("config.{}", field.into()),
            message: message.into(),
        }
    }

    /// An error at a place in an input file (`"data.jsonl:12"`).
    pub fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        StageError {
            location: location.into(),
            message: message.into(),
        }
    }

    /// The config field this error names, if it names one.
    pub fn config_field(&self) -> Option<&str> {
        self.location.strip_prefix("config.")
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

impl std::error::Error for StageError {}

impl From<std::io::Error> for StageError {
    fn from(e: std::io::Error) -> Self {
        StageError::new(e.to_string())
    }
}
