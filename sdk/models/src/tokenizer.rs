//! Tokenizers: the byte-level one, and loading one from a model directory.

use crate::{Error, Result};
use std::path::Path;

/// Text to token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text` (no BOS/EOS added).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Text of `ids`: lossy UTF-8, special ids skipped.
    fn decode(&self, ids: &[u32]) -> String;
    /// Number of ids, special ones included.
    fn vocab_size(&self) -> usize;
    /// Beginning-of-sequence id.
    fn bos_id(&self) -> u32;
    /// End-of-sequence id.
    fn eos_id(&self) -> u32;
    /// Padding id.
    fn pad_id(&self) -> u32;
    /// Writes `dir/tokenizer.json` so that [`load_tokenizer`] reads it back.
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Byte-level: ids 0..256 are bytes, 256 = BOS, 257 = EOS, 258 = PAD; vocab
/// 259. Needs no files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Beginning-of-sequence id.
    pub const BOS: u32 = 256;
    /// End-of-sequence id.
    pub const EOS: u32 = 257;
    /// Padding id.
    pub const PAD: u32 = 258;
    /// Vocabulary size.
    pub const VOCAB: usize = 259;
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| id < 256)
            .map(|&id| id as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB
    }

    fn bos_id(&self) -> u32 {
        Self::BOS
    }

    fn eos_id(&self) -> u32 {
        Self::EOS
    }

    fn pad_id(&self) -> u32 {
        Self::PAD
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        hone_sdk::fs::atomic_write(&path, b"{\"type\": \"byte\"}\n")
            .map_err(|e| Error::file(&path, e))
    }
}

/// Reads `dir/tokenizer.json`: `{"type": "byte"}` gives [`ByteTokenizer`].
/// A Hugging Face tokenizer.json is not supported yet and gives an error.
pub fn load_tokenizer(dir: &Path) -> Result<Box<dyn Tokenizer>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not JSON: {e}")))?;
    match value.get("type").and_then(|t| t.as_str()) {
        Some("byte") => Ok(Box::new(ByteTokenizer)),
        _ if value.get("model").is_some() => Err(Error::file(
            &path,
            "Hugging Face tokenizers are not supported yet; only {\"type\": \"byte\"} is",
        )),
        other => Err(Error::file(
            &path,
            format!("unknown tokenizer type {other:?}; expected {{\"type\": \"byte\"}}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_round_trip_skips_specials() {
        let t = ByteTokenizer;
        let mut ids = vec![t.bos_id()];
        ids.extend(t.encode("héllo"));
        ids.push(t.eos_id());
        ids.push(t.pad_id());
        assert_eq!(t.decode(&ids), "héllo");
        assert_eq!(t.encode("ab"), vec![97, 98]);
        assert_eq!(t.vocab_size(), 259);
    }

    #[test]
    fn save_then_load() {
        let dir = std::env::temp_dir().join(format!("hone-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ByteTokenizer.save(&dir).unwrap();
        let t = load_tokenizer(&dir).unwrap();
        assert_eq!(t.eos_id(), 257);
        std::fs::write(dir.join("tokenizer.json"), r#"{"model": {"type": "BPE"}}"#).unwrap();
        let err = load_tokenizer(&dir).err().unwrap().to_string();
        assert!(err.contains("not supported yet"), "{err}");
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
