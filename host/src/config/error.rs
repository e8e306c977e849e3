//! Why a `config.kdl` was refused: every problem found, each pinned to a
//! place in the file, renderable by `miette` as file, line and column.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource};
use miette::{SourceCode, SourceSpan};

/// A configuration that could not be read or is not valid.
///
/// Validation never stops at the first problem: [`ConfigError::Invalid`]
/// carries all of them, so one edit-check cycle can fix them all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file is missing or unreadable (permissions, a directory, not UTF-8).
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file as it was named.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The file was read but is not valid KDL or not a valid configuration.
    #[error("{} has {} problem{}", src.name(), problems.len(), if problems.len() == 1 { "" } else { "s" })]
    Invalid {
        /// The file's name and text, for rendering snippets.
        src: NamedSource<Arc<str>>,
        /// Every problem found, in file order. Never empty.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem as `(line, column, message)`, 1-based, in file order.
    /// A read failure is one problem at line 0, column 0 (no place in the
    /// file).
    pub fn problems(&self) -> Vec<(usize, usize, String)> {
        match self {
            ConfigError::Read { .. } => vec![(0, 0, self.to_string())],
            ConfigError::Invalid { problems, .. } => problems
                .iter()
                .map(|p| (p.line, p.column, p.message.clone()))
                .collect(),
        }
    }

    /// The full report as plain text (no colours): the header, then every
    /// problem with its `file:line:column`, snippet and help. For logs and
    /// the admin UI; a terminal should render the error with `miette`.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let handler =
            GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(100);
        if handler.render_report(&mut out, self).is_err() {
            // Rendering only fails on a formatter error; fall back to the
            // bare list rather than losing the problems.
            out = self.to_string();
            for (line, column, message) in self.problems() {
                out.push_str(&format!("\n{line}:{column}: {message}"));
            }
        }
        out
    }
}

impl Diagnostic for ConfigError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(match self {
            ConfigError::Read { .. } => "cistern::config::read",
            ConfigError::Invalid { .. } => "cistern::config::invalid",
        }))
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { src, .. } => Some(src),
        }
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { problems, .. } => {
                Some(Box::new(problems.iter().map(|p| p as &dyn Diagnostic)))
            }
        }
    }
}

/// One problem in a config file. Rendered by `miette` as a related
/// diagnostic of [`ConfigError::Invalid`], whose source it shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong, as a sentence a user can act on.
    pub message: String,
    /// Where, as a byte range of the file.
    pub span: SourceSpan,
    /// 1-based line of the span's start.
    pub line: usize,
    /// 1-based column (in characters) of the span's start.
    pub column: usize,
    /// A short note under the underlined text, if one helps.
    pub label: Option<String>,
    /// How to fix it, if that is not obvious from the message.
    pub help: Option<String>,
}

impl Problem {
    /// A problem at `span` of `text`, with line and column worked out.
    pub(crate) fn new(text: &str, span: SourceSpan, message: impl Into<String>) -> Problem {
        let (line, column) = line_column(text, span.offset());
        Problem {
            message: message.into(),
            span,
            line,
            column,
            label: None,
            help: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            self.label.clone(),
            self.span,
        ))))
    }
}

/// 1-based line and character column of byte `offset` in `text`. Offsets
/// past the end (a parser pointing at end of input) land after the last
/// character.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn line_column_counts_characters_from_one() {
        let text = "ab\nçd\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 1), (1, 2));
        assert_eq!(line_column(text, 3), (2, 1));
        // 'ç' is two bytes: the 'd' after it is the second character.
        assert_eq!(line_column(text, 5), (2, 2));
        assert_eq!(line_column(text, 99), (3, 1));
    }
}
