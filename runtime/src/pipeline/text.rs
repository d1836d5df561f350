//! A pipeline file's bytes before they are parsed: a byte-order mark is
//! dropped, and a file that is not UTF-8, or is not TOML at all (a data file,
//! a binary, JSON), is refused with one message instead of one per line.

use crate::diag::Diagnostic;

/// The UTF-8 byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Why the bytes are not a pipeline's text: 1-based line and column (in
/// characters) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// Line of the offending byte.
    pub line: usize,
    /// Column of the offending byte, in characters.
    pub col: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// The text of a pipeline file, without a leading byte-order mark.
pub fn decode(bytes: &[u8]) -> Result<String, Undecodable> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    let at = |offset: usize, message: String| {
        let before = &bytes[..offset];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        Undecodable {
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            col: String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1,
            message,
        }
    };
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(at(
            0,
            "this is a gzip-compressed file, not a TOML pipeline: give the pipeline's .toml \
             file (a compressed data file goes in a reader stage's `path`)"
                .into(),
        ));
    }
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return Err(at(
            0,
            "the pipeline file is UTF-16 text (it starts with a UTF-16 byte-order mark): save \
             it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8 FILE`)"
                .into(),
        ));
    }
    let head = &bytes[..bytes.len().min(8192)];
    if let Some(nul) = head.iter().position(|&b| b == 0) {
        return Err(at(
            nul,
            "this is a binary file (it holds NUL bytes), not a TOML pipeline: give the \
             pipeline's .toml file"
                .into(),
        ));
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let offset = e.valid_up_to();
            Err(at(
                offset,
                format!(
                    "the pipeline file is not UTF-8 text (invalid byte 0x{:02X}): save it as \
                     UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)",
                    bytes[offset]
                ),
            ))
        }
    }
}

/// What the first significant line (not blank, not a comment) says about
/// the text, when it cannot begin a TOML document.
#[derive(Debug, Clone, PartialEq)]
pub struct NotToml {
    /// Where that line starts, with the message.
    pub diagnostic: Diagnostic,
    /// Whether it looks like JSON (a document or JSON lines): then the text
    /// is refused before parsing, as parsing it would give an error per line.
    pub json: bool,
}

/// `Some` when the first significant line cannot begin a TOML document (a
/// `[table]` header or a `key = value` pair).
pub fn not_toml(text: &str) -> Option<NotToml> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if starts_like_toml(trimmed) {
            return None;
        }
        let indent = line.len() - line.trim_start().len();
        let after_bracket = trimmed.strip_prefix('[').map(str::trim_start);
        let json = trimmed.starts_with('{')
            || after_bracket.is_some_and(|r| {
                r.is_empty()
                    || r.starts_with(['{', '[', '"', '-'])
                    || r.starts_with(|c: char| c.is_ascii_digit())
            });
        let what = if json {
            "it looks like JSON (a data file?): data goes in a reader stage's `path`, \
             e.g. `config = { path = \"data.jsonl\" }`"
        } else {
            "a pipeline starts with a `[pipeline]` or `[stages.ID]` header (see \
             docs/pipeline-reference.md)"
        };
        return Some(NotToml {
            diagnostic: Diagnostic::at(
                start + indent..start + indent + 1,
                format!(
                    "this is not a TOML pipeline file: its first line is neither a `[table]` \
                     header nor a `key = value` pair; {what}"
                ),
            ),
            json,
        });
    }
    None
}

/// Whether `line` (trimmed, not a comment) can begin a TOML document.
fn starts_like_toml(line: &str) -> bool {
    if let Some(rest) = line.strip_prefix('[') {
        let rest = rest.strip_prefix('[').unwrap_or(rest);
        // `[a.b]`, `[[a]]`, `["quoted"]`: a key, then `]`.
        return key_end(rest.trim_start())
            .is_some_and(|end| rest.trim_start()[end..].trim_start().starts_with(']'));
    }
    key_end(line).is_some_and(|end| line[end..].trim_start().starts_with('='))
}

/// The byte length of a (possibly dotted) TOML key at the start of `s`.
fn key_end(s: &str) -> Option<usize> {
    let mut i = 0;
    loop {
        let rest = &s[i..];
        let part = match rest.chars().next()? {
            '"' => closing(rest, '"')?,
            '\'' => closing(rest, '\'')?,
            _ => {
                let n = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                    .unwrap_or(rest.len());
                if n == 0 {
                    return None;
                }
                n
            }
        };
        i += part;
        let after = s[i..].trim_start();
        if let Some(next) = after.strip_prefix('.') {
            i = s.len() - next.trim_start().len();
        } else {
            return Some(i);
        }
    }
}

/// Length of a quoted key, quotes included (a `\"` in a basic key is skipped).
fn closing(s: &str, quote: char) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            '\\' if quote == '"' && !escaped => escaped = true,
            c if c == quote && !escaped => return Some(i + 1),
            '\n' => return None,
            _ => escaped = false,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_is_dropped() {
        assert_eq!(decode(b"\xEF\xBB\xBF[pipeline]\n").unwrap(), "[pipeline]\n");
    }

    #[test]
    fn invalid_utf8_is_located() {
        let e = decode(b"[pipeline]\nname = \"caf\xE9\"\n").unwrap_err();
        assert_eq!((e.line, e.col), (2, 12));
        assert!(e.message.contains("0xE9"), "{}", e.message);
        let e = decode(b"\xFF\xFE[\x00").unwrap_err();
        assert!(e.message.contains("UTF-16"), "{}", e.message);
        let e = decode(b"\x1f\x8b\x08\x00").unwrap_err();
        assert!(e.message.contains("gzip"), "{}", e.message);
        let e = decode(b"ab\ncd\x00ef").unwrap_err();
        assert_eq!((e.line, e.col), (2, 3));
        assert!(e.message.contains("binary"), "{}", e.message);
    }

    #[test]
    fn toml_starts_are_accepted() {
        for ok in [
            "[pipeline]\n",
            "# c\n\n  [ stages.a ]\n",
            "[[x]]\n",
            "[\"quoted key\".b]\n",
            "name = 1\n",
            "a.\"b c\".d = 1\n",
            "'lit' = 2\n",
            "",
            "# only a comment\n",
        ] {
            assert!(not_toml(ok).is_none(), "{ok:?}");
        }
    }

    #[test]
    fn other_starts_are_refused_at_their_line() {
        for (bad, json) in [
            ("{\"prompt\": \"hi\"}\n{\"prompt\": \"ho\"}\n", true),
            ("\n[\n  {\"a\": 1}\n]\n", true),
            ("[{\"a\": 1}]\n", true),
            ("[1, 2]\n", true),
            ("Hello, this is a README\n", false),
            ("a b = 1\n", false),
            ("[pipeline\n", false),
        ] {
            let n = not_toml(bad).unwrap_or_else(|| panic!("{bad:?}"));
            assert_eq!(n.json, json, "{bad:?}");
            assert_eq!(n.diagnostic.message.contains("JSON"), json, "{bad:?}");
        }
        let n = not_toml("\n\n  {}\n").unwrap();
        assert_eq!(n.diagnostic.origin, crate::diag::Origin::File(4..5));
    }
}
