//! Validation diagnostics: every problem of a document, each with its place.

use std::fmt;

use crate::yaml::Pos;

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The document is refused.
    Error,
    /// The document is accepted; something is probably a mistake.
    Warning,
}

/// One validation finding: `PATH: message` at a line and column.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Where in the document, e.g. `policies[1].rules[0].per`.
    pub path: String,
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
    /// What is wrong, naming the policy, rule and offending value where there is one.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `PATH: message`, the form that scenario `expect_policy_error` matches against.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A policy document was refused: every error found, at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors {
    /// The errors (and any warnings found alongside), in document order.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyErrors {
    /// Only the errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors: Vec<_> = self.errors().collect();
        write!(f, "invalid policy document ({} errors)", errors.len())?;
        for d in errors {
            write!(f, "\n  {}:{}: {d}", d.line, d.column)?;
        }
        Ok(())
    }
}

/// Collects diagnostics while a document is read.
#[derive(Default)]
pub(crate) struct Diags {
    pub(crate) list: Vec<Diagnostic>,
}

impl Diags {
    pub(crate) fn error(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Error, path, pos, message.into());
    }

    pub(crate) fn warning(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Warning, path, pos, message.into());
    }

    fn push(&mut self, severity: Severity, path: &str, pos: Pos, message: String) {
        self.list.push(Diagnostic {
            severity,
            path: path.to_string(),
            line: pos.line,
            column: pos.column,
            message,
        });
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }
}
