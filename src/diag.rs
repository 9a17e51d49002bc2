//! Diagnostics that point into configuration files.
//!
//! Every loader reports problems as [`Diagnostic`]s: a sentence, the file, and where known the
//! line, column and key, printed the way compilers do (`path:line:col: message`) so editors can
//! jump to them. Loaders collect all diagnostics before failing ([`Diagnostics`]), so one run
//! of `ccmgr check` shows every problem, not only the first.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A place in a file: 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
}

/// One problem, said as a sentence, with where it is and optional follow-up notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: Option<PathBuf>,
    pub line_col: Option<(usize, usize)>,
    pub message: String,
    pub notes: Vec<String>,
}

impl Diagnostic {
    /// A problem about a whole file (or none, when `path` is `None`).
    pub fn in_file(path: Option<&Path>, message: impl Into<String>) -> Self {
        Self {
            path: path.map(Path::to_path_buf),
            line_col: None,
            message: message.into(),
            notes: Vec::new(),
        }
    }

    /// A problem at a byte span of `source`, the text of the file at `path`.
    pub fn at_span(
        path: &Path,
        source: &str,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            path: Some(path.to_path_buf()),
            line_col: Some(line_col(source, span.start)),
            message: message.into(),
            notes: Vec::new(),
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn location(&self) -> Option<Location> {
        let path = self.path.clone()?;
        let (line, column) = self.line_col?;
        Some(Location { path, line, column })
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.line_col) {
            (Some(path), Some((line, col))) => write!(f, "{}:{line}:{col}: ", path.display())?,
            (Some(path), None) => write!(f, "{}: ", path.display())?,
            (None, _) => {}
        }
        f.write_str(&self.message)?;
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}

/// All the problems one load found. Empty means the load succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.0.push(diagnostic);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(source, offset.min(source.len()));
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = source[line_start..offset].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The dotted key whose line holds byte `offset`, e.g. `coordinator.restart_time_span`: the key
/// before `=` on that line, prefixed by the nearest `[table]` header above it. `None` when the
/// line assigns nothing (a table header, a continuation line of an array).
pub fn key_at(source: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(source, offset.min(source.len()));
    let line_start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[offset..]
        .find('\n')
        .map_or(source.len(), |i| offset + i);
    let line = &source[line_start..line_end];
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let key = key.trim_matches('"');
    let table = source[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && !l.starts_with("[[")).then(|| {
            l.trim_start_matches('[')
                .trim_end_matches(']')
                .trim()
                .to_owned()
        })
    });
    Some(match table {
        Some(table) if !table.is_empty() => format!("{table}.{key}"),
        _ => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 11), (2, 6));
        assert_eq!(line_col(src, 999), (3, 1));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let src = "d = \"é\" x";
        assert_eq!(line_col(src, src.find('x').unwrap()), (1, 9));
    }

    #[test]
    fn key_at_names_the_table_and_key() {
        let src = "instance = \"x\"\n[coordinator]\nrestart_time_span = \"5 parsecs\"\n";
        assert_eq!(key_at(src, 0).as_deref(), Some("instance"));
        let off = src.find("5 parsecs").unwrap();
        assert_eq!(
            key_at(src, off).as_deref(),
            Some("coordinator.restart_time_span")
        );
        assert_eq!(key_at(src, src.find("[coord").unwrap()), None);
    }

    #[test]
    fn display_is_compiler_style() {
        let d = Diagnostic::at_span(Path::new("s/web.toml"), "a = 1\nb = 2", 6..7, "bad b")
            .with_note("try c");
        assert_eq!(d.to_string(), "s/web.toml:2:1: bad b\n  note: try c");
    }
}
