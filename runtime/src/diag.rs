//! Diagnostics: every user-facing error about a pipeline, rendered as
//! `PATH:LINE:COL: message`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A byte range in the pipeline file.
    File(Range<usize>),
    /// A `--set` argument on the command line.
    Cli(String),
}

/// One problem found in a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where.
    pub origin: Origin,
    /// What, naming the field and the value, and how to fix it.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at a byte range of the file.
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Diagnostic {
            origin: Origin::File(span),
            message: message.into(),
        }
    }

    /// A diagnostic at an origin.
    pub fn new(origin: &Origin, message: impl Into<String>) -> Self {
        Diagnostic {
            origin: origin.clone(),
            message: message.into(),
        }
    }
}

/// The text of a pipeline file, for turning byte offsets into lines and columns.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user gave it.
    pub path: PathBuf,
    /// Its contents.
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    /// Wraps a file's text.
    pub fn new(path: &Path, text: String) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceFile {
            path: path.to_path_buf(),
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self
            .text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(0);
        (line + 1, col + 1)
    }

    /// Renders a diagnostic as `PATH:LINE:COL: message`.
    pub fn render(&self, d: &Diagnostic) -> String {
        match &d.origin {
            Origin::File(span) => {
                let (line, col) = self.line_col(span.start);
                format!("{}:{}:{}: {}", self.path.display(), line, col, d.message)
            }
            Origin::Cli(arg) => format!("--set {arg}: {}", d.message),
        }
    }
}

/// Every diagnostic of a failed validation, rendered.
#[derive(Debug)]
pub struct Diagnostics(pub Vec<String>);

/// At most this many diagnostics are printed; the rest are counted.
pub const MAX_SHOWN: usize = 20;

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.0.iter().take(MAX_SHOWN) {
            writeln!(f, "{line}")?;
        }
        if self.0.len() > MAX_SHOWN {
            let more = self.0.len() - MAX_SHOWN;
            writeln!(
                f,
                "... and {more} more error{} (fix the first ones and validate again)",
                if more == 1 { "" } else { "s" }
            )?;
        }
        write!(
            f,
            "{} error{} found",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for Diagnostics {}

/// The known name closest to `name` (edit distance at most 2), for
/// "did you mean" hints.
pub fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_are_capped_and_counted() {
        let lines: Vec<String> = (0..25).map(|i| format!("e{i}")).collect();
        let text = Diagnostics(lines).to_string();
        assert_eq!(text.lines().count(), MAX_SHOWN + 2, "{text}");
        assert!(text.contains("e19\n... and 5 more errors"), "{text}");
        assert!(!text.contains("e20"), "{text}");
        assert!(text.ends_with("25 errors found"), "{text}");
        let text = Diagnostics(vec!["one".into()]).to_string();
        assert_eq!(text, "one\n1 error found");
    }

    #[test]
    fn line_col_counts_from_one_and_in_characters() {
        let f = SourceFile::new(Path::new("p.toml"), "a = 1\nbé = 2\n".into());
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(6), (2, 1));
        assert_eq!(f.line_col(9), (2, 3)); // after the two-byte 'é'
        let d = Diagnostic::at(6..7, "bad");
        assert_eq!(f.render(&d), "p.toml:2:1: bad");
    }
}
