//! The crate's one error type.

use std::path::PathBuf;

/// Errors of the model core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// (De)serialising JSON failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A file could not be read, written or understood; names the file.
    #[error("{}: {message}", path.display())]
    File {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong and, where possible, how to fix it.
        message: String,
    },
    /// The device name is unknown or the device is not available.
    #[error("{0}")]
    Device(String),
    /// An argument is out of range or inconsistent (shapes, lengths, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::File`] for `path`.
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
