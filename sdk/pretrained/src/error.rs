//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong loading or running a pretrained model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed, or a weight file did not hold what the
    /// model expects.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Building, encoding or decoding with a tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] tokenizers::Error),
    /// A model file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON config file did not parse.
    #[error("cannot parse {}: {source}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The GGUF metadata lacks a key the tokenizer needs, or holds the wrong
    /// type there.
    #[error("GGUF metadata: {0}; is this a llama.cpp GPT-2-style (byte-level BPE) model?")]
    Metadata(String),
    /// Reading or writing a hone checkpoint failed (the message names the file).
    #[error("{0}")]
    Checkpoint(#[from] hone_models::Error),
    /// The caller's arguments do not fit the model.
    #[error("{0}")]
    Input(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
