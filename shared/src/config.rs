//! The tiers' YAML files, loaded with located errors: rules files ([`RuleSet::from_yaml`])
//! and each binary's own configuration ([`from_yaml`]).
//!
//! Both go the same way: the text into a YAML value first (syntax errors located by line and
//! column), then the value into the typed shape through `serde_path_to_error` (an unknown,
//! missing or mistyped field located by its dotted path). A binary checks what serde cannot
//! (a threshold in `(0, 1]`, a file that exists) and reports it as a
//! [`ConfigError::Invalid`] naming the field, so every refusal reads the same way:
//!
//! ```text
//! regional.yaml: breaker.cooldown: "60" has no unit; expected <n>ms, <n>s, <n>m, <n>h or <n>d, as in 60s
//! ```
//!
//! [`RuleSet::from_yaml`]: crate::RuleSet::from_yaml

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_yaml_ng::Value;

use crate::{ConfigError, Nanos};

/// Reads `yaml` (the contents of `file`, which names it in errors) as a `T`.
///
/// # Errors
///
/// [`ConfigError::Syntax`] for malformed YAML, [`ConfigError::Document`] for an empty file,
/// [`ConfigError::Invalid`] naming the field for anything serde refuses.
pub fn from_yaml<T: DeserializeOwned>(file: &str, yaml: &str) -> Result<T, ConfigError> {
    match serde_yaml_ng::from_str::<Value>(yaml) {
        Ok(Value::Null) => Err(ConfigError::Document {
            file: file.to_owned(),
            reason: "the file is empty".to_owned(),
        }),
        Ok(value) => shape(file, value),
        Err(err) => Err(yaml_error(file, &err)),
    }
}

/// A loader error as a `ConfigError`. The loader's message ends in ` at line L column C`; we
/// move the position to the front, in our format, and drop it from the message.
pub(crate) fn yaml_error(file: &str, err: &serde_yaml_ng::Error) -> ConfigError {
    let message = err.to_string();
    match err.location() {
        Some(at) => {
            let suffix = format!(" at line {} column {}", at.line(), at.column());
            ConfigError::Syntax {
                file: file.to_owned(),
                line: at.line(),
                column: at.column(),
                reason: message.replacen(&suffix, "", 1),
            }
        }
        None => ConfigError::Document {
            file: file.to_owned(),
            reason: message,
        },
    }
}

/// A YAML value into `T`, with serde's errors located by field path. The value carries no
/// positions, so serde's messages carry none either; syntax errors, which do, come from the
/// loader.
pub(crate) fn shape<T: DeserializeOwned>(file: &str, value: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." {
            "(top level)".to_owned()
        } else {
            path
        };
        ConfigError::Invalid {
            file: file.to_owned(),
            field,
            reason: err.into_inner().to_string(),
        }
    })
}

/// A duration, `<n>ms`, `<n>s`, `<n>m`, `<n>h` or `<n>d`, greater than zero.
///
/// # Errors
///
/// Why not, quoting `text`: no unit, an unknown unit, zero, or too long for `u64`
/// nanoseconds.
pub fn parse_duration(text: &str) -> Result<Nanos, String> {
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    if number.is_empty() {
        return Err(not_a_duration(text));
    }
    if unit.is_empty() {
        return Err(format!(
            "{text:?} has no unit; expected <n>ms, <n>s, <n>m, <n>h or <n>d, as in {number}s"
        ));
    }
    let Some(unit) = unit_nanos(unit) else {
        return Err(not_a_duration(text));
    };
    // Only ASCII digits reach here, so the parse fails only on overflow.
    let count: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is too long"))?;
    if count == 0 {
        return Err(format!("{text:?} must be greater than zero"));
    }
    count
        .checked_mul(unit)
        .map(Nanos)
        .ok_or_else(|| format!("{text:?} is too long"))
}

fn not_a_duration(text: &str) -> String {
    format!("{text:?} is not a duration; expected <n>ms, <n>s, <n>m, <n>h or <n>d, as in 1m")
}

/// Nanoseconds in one `unit`.
pub(crate) fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "d" => 86_400 * 1_000_000_000,
        _ => return None,
    })
}

/// A duration field written as text (`100ms`, `60s`): `#[serde(deserialize_with =
/// "shared::config::duration")]`. A bare number is refused, since its unit would be a guess.
///
/// # Errors
///
/// What [`parse_duration`] says, located at the field by [`from_yaml`].
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Text(String),
        Number(u64),
    }
    let text = match Text::deserialize(deserializer)? {
        Text::Text(text) => text,
        Text::Number(n) => n.to_string(),
    };
    parse_duration(&text)
        .map(Duration::from)
        .map_err(serde::de::Error::custom)
}

/// An optional duration field: `#[serde(default, deserialize_with =
/// "shared::config::optional_duration")]`; absent is `None`, present is read as [`duration`].
///
/// # Errors
///
/// As [`duration`].
pub fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        name: String,
        #[serde(deserialize_with = "duration")]
        every: Duration,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(deserialize_with = "duration")]
        wait: Duration,
    }

    #[test]
    fn reads_a_typed_file_with_durations() {
        let e: Example = from_yaml("x.yaml", "name: a\nevery: 250ms\ninner: {wait: 2s}\n").unwrap();
        assert_eq!(e.name, "a");
        assert_eq!(e.every, Duration::from_millis(250));
        assert_eq!(e.inner.unwrap().wait, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let err =
            from_yaml::<Example>("x.yaml", "name: a\nevery: 1s\ninner: {wait: 60}\n").unwrap_err();
        assert_eq!(err.field(), Some("inner.wait"));
        assert!(
            err.to_string()
                .starts_with("x.yaml: inner.wait: \"60\" has no unit"),
            "{err}"
        );

        let err = from_yaml::<Example>("x.yaml", "name: a\nevery: 1s\nbogus: 1\n").unwrap_err();
        assert_eq!(err.field(), Some("bogus"));
        assert!(err.reason().contains("unknown field `bogus`"), "{err}");

        let err = from_yaml::<Example>("x.yaml", "name: a\n  every: [\n").unwrap_err();
        assert!(err.position().is_some(), "{err}");

        let err = from_yaml::<Example>("x.yaml", "\n").unwrap_err();
        assert_eq!(err.to_string(), "x.yaml: the file is empty");
    }
}

/// `tls:` in every tier's configuration: the deployment CA's certificate, this node's
/// certificate and its private key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The deployment CA's certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The same files with relative paths taken from `dir` (the configuration file's
    /// directory, so a deployment directory can be moved whole).
    pub fn relative_to(self, dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join(self.ca),
            cert: dir.join(self.cert),
            key: dir.join(self.key),
        }
    }
}
