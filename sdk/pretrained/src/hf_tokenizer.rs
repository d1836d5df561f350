//! [`hone_models::tokenizer::Tokenizer`] over a Hugging Face `tokenizers::Tokenizer`:
//! one read from a `tokenizer.json`, or the one [`crate::SmolLm`] rebuilds
//! from its GGUF metadata.

use std::path::Path;

use hone_models::tokenizer::Tokenizer as _;

use crate::{Error, Result};

/// Candidate names of the special tokens, most specific first, for
/// tokenizer.json files that do not say which is which.
const BOS_NAMES: &[&str] = &[
    "<|im_start|>",
    "<s>",
    "<|begin_of_text|>",
    "[CLS]",
    "<|endoftext|>",
];
const EOS_NAMES: &[&str] = &[
    "<|im_end|>",
    "</s>",
    "<|end_of_text|>",
    "[SEP]",
    "<|endoftext|>",
];
const PAD_NAMES: &[&str] = &["<pad>", "[PAD]", "<|endoftext|>"];

/// A Hugging Face tokenizer with its BOS, EOS and padding ids.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl HfTokenizer {
    /// Wraps `inner` with the given special ids.
    pub fn new(inner: tokenizers::Tokenizer, bos: u32, eos: u32, pad: u32) -> Self {
        Self {
            inner,
            bos,
            eos,
            pad,
        }
    }

    /// Reads a `tokenizer.json`. The special ids are found by name
    /// (`<|im_start|>`/`<|im_end|>`, `<s>`/`</s>`, `[CLS]`/`[SEP]`, ...);
    /// padding falls back to EOS. Use [`HfTokenizer::new`] to set them.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Input(format!("cannot load {}: {e}", path.display())))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = find(EOS_NAMES).ok_or_else(|| {
            Error::Input(format!(
                "{} has none of the EOS tokens {EOS_NAMES:?}; build it with HfTokenizer::new",
                path.display()
            ))
        })?;
        let bos = find(BOS_NAMES).unwrap_or(eos);
        let pad = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| find(PAD_NAMES))
            .unwrap_or(eos);
        Ok(Self::new(inner, bos, eos, pad))
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl hone_models::tokenizer::Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        // Encoding a &str with this crate's pipelines does not fail; an
        // error here would be a bug in the tokenizer definition.
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn bos_id(&self) -> u32 {
        self.bos
    }

    fn eos_id(&self) -> u32 {
        self.eos
    }

    fn pad_id(&self) -> u32 {
        self.pad
    }

    fn save(&self, dir: &Path) -> hone_models::Result<()> {
        let path = dir.join("tokenizer.json");
        std::fs::create_dir_all(dir).map_err(|e| hone_models::Error::file(dir, e))?;
        // `tokenizers::Tokenizer::save` writes in place: a crash mid-write
        // would leave half a file, so write the JSON atomically instead.
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| hone_models::Error::file(&path, e))?;
        hone_sdk::fs::atomic_write(&path, json.as_bytes())
            .map_err(|e| hone_models::Error::file(&path, e))
    }
}

/// The special ids, for error messages and tests.
impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}
