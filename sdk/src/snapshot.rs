//! Encoding a stage's state for [`crate::Stage::snapshot`] and reading it
//! back in [`crate::Stage::restore`]: bincode (standard configuration) of
//! `(kind, state)`, led by the stage's kind so that another stage's snapshot
//! is refused by name rather than misread.

use crate::StageError;

/// A `kind` stage's state as snapshot bytes.
pub fn encode<T: serde::Serialize>(kind: &str, state: &T) -> Result<Vec<u8>, StageError> {
    bincode::serde::encode_to_vec((kind, state), bincode::config::standard())
        .map_err(|e| StageError::new(format!("cannot encode the snapshot: {e}")))
}

/// The state a `kind` stage's snapshot of `round` holds; another stage's
/// snapshot, or bytes of another shape, are an error saying so, never a
/// half-restored stage.
pub fn decode<T: serde::de::DeserializeOwned>(
    kind: &str,
    round: u64,
    bytes: &[u8],
) -> Result<T, StageError> {
    let unreadable =
        |e: String| StageError::new(format!("the snapshot of round {round} cannot be read: {e}"));
    let config = bincode::config::standard();
    let (found, _): (String, usize) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| unreadable(e.to_string()))?;
    if found != kind {
        return Err(StageError::new(format!(
            "the snapshot of round {round} is a {found} stage's, not {kind}'s"
        )));
    }
    let ((_, state), read): ((String, T), usize) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| unreadable(e.to_string()))?;
    if read != bytes.len() {
        return Err(StageError::new(format!(
            "the snapshot of round {round} has {} bytes after its state: it is not this stage's",
            bytes.len() - read
        )));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_comes_back_and_another_kinds_is_refused() {
        let state = (7u64, vec!["a".to_string()]);
        let bytes = encode("x.y", &state).unwrap();
        assert_eq!(
            decode::<(u64, Vec<String>)>("x.y", 3, &bytes).unwrap(),
            state
        );
        let err = decode::<(u64, Vec<String>)>("x.z", 3, &bytes).unwrap_err();
        assert!(err.to_string().contains("x.y stage's, not x.z's"), "{err}");
        let err = decode::<u64>("x.y", 3, &bytes).unwrap_err();
        assert!(err.to_string().contains("bytes after its state"), "{err}");
    }
}
