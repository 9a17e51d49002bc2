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

/// What a TOML text opens and must close again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delimiter {
    Array,
    InlineTable,
    MultiLineString,
    MultiLineLiteral,
}

impl Delimiter {
    /// What it is, in words.
    pub fn name(self) -> &'static str {
        match self {
            Delimiter::Array => "array",
            Delimiter::InlineTable => "inline table",
            Delimiter::MultiLineString | Delimiter::MultiLineLiteral => "multi-line string",
        }
    }

    /// The text that closes it.
    pub fn closer(self) -> &'static str {
        match self {
            Delimiter::Array => "]",
            Delimiter::InlineTable => "}",
            Delimiter::MultiLineString => "\"\"\"",
            Delimiter::MultiLineLiteral => "'''",
        }
    }
}

/// The innermost delimiter opened before byte `offset` of a TOML text and never closed in the
/// whole text, with the byte offset where it opens.
///
/// A parser reports a missing `]` where it notices it — at the next key, often lines later,
/// under that key's name — while the mistake is where the array opens. This scan finds that
/// place so the report can point at it. It knows just enough TOML to count brackets: strings
/// (with escapes), comments and `[table]` headers are skipped.
pub fn unclosed_before(source: &str, offset: usize) -> Option<(Delimiter, usize)> {
    let bytes = source.as_bytes();
    let mut open: Vec<(Delimiter, usize)> = Vec::new();
    let mut i = 0;
    // Only blanks since the last newline, outside any array or inline table: a `[` here
    // starts a table header, not an array.
    let mut line_start = true;
    // The end of the line holding byte `i` (the newline itself is not consumed).
    let line_end = |i: usize| {
        bytes[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |n| i + n)
    };
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\n' => {
                line_start = open.is_empty();
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => i = line_end(i),
            b'[' if line_start => i = line_end(i),
            b'"' | b'\'' if bytes[i..].starts_with(&[b; 3]) => {
                let start = i;
                i += 3;
                loop {
                    if i >= bytes.len() {
                        let kind = if b == b'"' {
                            Delimiter::MultiLineString
                        } else {
                            Delimiter::MultiLineLiteral
                        };
                        open.push((kind, start));
                        break;
                    }
                    if b == b'"' && bytes[i] == b'\\' {
                        i += 2;
                    } else if bytes[i..].starts_with(&[b; 3]) {
                        i += 3;
                        // Up to two more quotes may end the string's content.
                        while i < bytes.len() && bytes[i] == b {
                            i += 1;
                        }
                        break;
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' | b'\'' => {
                // A one-line string ends at its quote, or (unterminated) at the line's end,
                // which the parser reports on that line itself.
                i += 1;
                while i < bytes.len() && bytes[i] != b && bytes[i] != b'\n' {
                    i += if b == b'"' && bytes[i] == b'\\' { 2 } else { 1 };
                }
                if i < bytes.len() && bytes[i] == b {
                    i += 1;
                }
            }
            b'[' => {
                open.push((Delimiter::Array, i));
                i += 1;
            }
            b'{' => {
                open.push((Delimiter::InlineTable, i));
                i += 1;
            }
            b']' | b'}' => {
                open.pop();
                i += 1;
            }
            _ => i += 1,
        }
        line_start = false;
    }
    open.into_iter().rev().find(|&(_, at)| at < offset)
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

    #[test]
    fn unclosed_delimiters_are_found_where_they_open() {
        let src = "a = 1\nrequires = [\"api\"\nenv = { A = \"]\" }\n[t]\nx = [1, [2]]\n";
        let at_env = src.find("env").unwrap();
        assert_eq!(
            unclosed_before(src, at_env),
            Some((Delimiter::Array, src.find('[').unwrap()))
        );
        // Closed arrays, brackets in strings and comments, and table headers count for nothing.
        let fine = "a = [\n  \"]\", # ] [\n  'x[',\n]\n[[b]]\nc = {d = [1]}\ne = \"\"\"]\"\"\"\"\n";
        assert_eq!(unclosed_before(fine, fine.len()), None);
        let src = "d = \"\"\"never\nclosed\nx = 1\n";
        assert_eq!(
            unclosed_before(src, src.len()),
            Some((Delimiter::MultiLineString, 4))
        );
        let src = "d = '''a'''\nt = { a = 1\nx = 1\n";
        assert_eq!(
            unclosed_before(src, src.len()),
            Some((Delimiter::InlineTable, src.find('{').unwrap()))
        );
        // An error before the opening is not about it.
        assert_eq!(unclosed_before("x = 1\ny = [", 2), None);
    }

    proptest::proptest! {
        /// Any text, any offset: no panic, and what is found opens before the offset on a
        /// character that opens something.
        #[test]
        fn unclosed_before_never_panics(text in "[\\[\\]{}\"'#\\\\\n a=]{0,64}", at in 0usize..80) {
            if let Some((kind, open)) = unclosed_before(&text, at) {
                proptest::prop_assert!(open < at);
                let first = text.as_bytes()[open];
                let expected = match kind {
                    Delimiter::Array => b'[',
                    Delimiter::InlineTable => b'{',
                    Delimiter::MultiLineString => b'"',
                    Delimiter::MultiLineLiteral => b'\'',
                };
                proptest::prop_assert_eq!(first, expected);
            }
        }
    }
}
