//! [`ConfigError`]: why a rules file was refused, and where.
//!
//! Every way a rules file can be wrong ends here, located: a YAML syntax error by line and
//! column, everything else by the dotted path of the field (`rate_limits.endpoints[1].window`),
//! as ripgrep's `ignore::Error::WithPath` wraps a cause with its place. The first problem found
//! refuses the whole file (DESIGN §2): a rule set is either entirely valid or not built at all.

/// Why a rules file was refused. Prints as `<file>: <where>: <why>`, one line, ready for a log or
/// a `--validate` run:
///
/// ```text
/// rules.yaml: rate_limits.endpoints[1].window: "0s" must be greater than zero
/// rules.yaml: line 3, column 7: did not find expected key, while parsing a block mapping
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The text is not well-formed YAML, or a mapping repeats a key; located by line and column
    /// (both counted from 1).
    #[error("{file}: line {line}, column {column}: {reason}")]
    Syntax {
        /// The file name the caller gave `RuleSet::from_yaml`.
        file: String,
        /// The line of the problem, from 1.
        line: usize,
        /// The column of the problem, from 1.
        column: usize,
        /// The YAML parser's message, without its own position suffix.
        reason: String,
    },
    /// The YAML as a whole cannot be used, and the parser gave no position: an empty file,
    /// several documents in one file, an alias expansion past the parser's limit.
    #[error("{file}: {reason}")]
    Document {
        /// The file name the caller gave `RuleSet::from_yaml`.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Well-formed YAML with a field that is unknown, of the wrong type, or has a value we
    /// refuse (a zero window, an unknown algorithm, a duplicate rule, ...).
    #[error("{file}: {field}: {reason}")]
    Invalid {
        /// The file name the caller gave `RuleSet::from_yaml`.
        file: String,
        /// Where, as a dotted path with sequence indices: `rate_limits.endpoints[1].window`.
        field: String,
        /// Why, in words, quoting the offending value where there is one.
        reason: String,
    },
}

impl ConfigError {
    /// The file name the caller gave `RuleSet::from_yaml`.
    pub fn file(&self) -> &str {
        match self {
            ConfigError::Syntax { file, .. }
            | ConfigError::Document { file, .. }
            | ConfigError::Invalid { file, .. } => file,
        }
    }

    /// The dotted path of the offending field, when the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Syntax { .. } | ConfigError::Document { .. } => None,
        }
    }

    /// `(line, column)`, both from 1, when the error is a YAML syntax error.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Syntax { line, column, .. } => Some((*line, *column)),
            ConfigError::Document { .. } | ConfigError::Invalid { .. } => None,
        }
    }

    /// Why, without the file and the location.
    pub fn reason(&self) -> &str {
        match self {
            ConfigError::Syntax { reason, .. }
            | ConfigError::Document { reason, .. }
            | ConfigError::Invalid { reason, .. } => reason,
        }
    }
}

/// A problem with one field, before the file name is attached. `parse` works in these so that
/// its helpers need not carry the file name around; [`FieldError::in_file`] makes the public
/// error at the boundary.
#[derive(Debug)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) reason: String,
}

impl FieldError {
    /// A problem with `field`, for `reason`.
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The public error, naming `file`.
    pub(crate) fn in_file(self, file: &str) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_owned(),
            field: self.field,
            reason: self.reason,
        }
    }
}
