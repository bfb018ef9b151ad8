//! A strict reader of the Prometheus text exposition format (and its OpenMetrics superset), so
//! tests can check that `/metrics` parses as what a Prometheus server scrapes, and then read
//! values out of it.
//!
//! Accepted, line by line: `# HELP name text`, `# TYPE name type` (at most once per name, before
//! its samples), `# UNIT name unit`, `# EOF` (last), other `#` comments, blank lines, and samples
//! `name{label="value",…} value [timestamp]` with the format's name, label and escape rules.
//! Anything else is an error naming the line.

use std::collections::{BTreeMap, HashSet};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric name, suffix included (`edge_checks_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// The sum of the samples named `name` whose labels include every pair in `labels`; `None`
    /// when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            if labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// As [`Metrics::sum`], panicking with the exposition's names when nothing matches.
    ///
    /// # Panics
    ///
    /// When no sample matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or_else(|| {
            let names: HashSet<&str> = self.samples.iter().map(|s| s.name.as_str()).collect();
            panic!("no sample {name} {labels:?}; names: {names:?}")
        })
    }
}

/// Parses `text`, or says which line is wrong and why.
///
/// # Errors
///
/// The first line that is not valid exposition format.
pub fn parse(text: &str) -> Result<Metrics, String> {
    let mut metrics = Metrics::default();
    let mut typed = HashSet::new();
    let mut eof = false;
    for (i, line) in text.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
        if eof {
            return Err(at("content after # EOF".into()));
        }
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("EOF") if comment.trim() == "EOF" => eof = true,
                Some(kind @ ("HELP" | "TYPE" | "UNIT")) => {
                    let name = words.next().unwrap_or("");
                    if !is_name(name) {
                        return Err(at(format!("bad metric name {name:?} in # {kind}")));
                    }
                    if kind == "TYPE" {
                        let t = words.next().unwrap_or("");
                        const TYPES: [&str; 9] = [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "untyped",
                            "unknown",
                            "info",
                            "stateset",
                            "gaugehistogram",
                        ];
                        if !TYPES.contains(&t) {
                            return Err(at(format!("unknown type {t:?}")));
                        }
                        if !typed.insert(name.to_owned()) {
                            return Err(at(format!("second # TYPE for {name}")));
                        }
                        if metrics.samples.iter().any(|s| family_of(&s.name, name)) {
                            return Err(at(format!("# TYPE for {name} after its samples")));
                        }
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        metrics.samples.push(sample(line).map_err(at)?);
    }
    Ok(metrics)
}

/// Whether sample `sample` belongs to family `family` (`family_total`, `family_bucket`, …).
fn family_of(sample: &str, family: &str) -> bool {
    sample == family
        || sample.strip_prefix(family).is_some_and(|rest| {
            ["_total", "_bucket", "_sum", "_count", "_created", "_info"].contains(&rest)
        })
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("a label without '='")?;
            let key = &rest[..eq];
            if !is_label_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            let (value, after) = label_value(&rest[eq + 1..])?;
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            rest = after.strip_prefix(',').unwrap_or(after);
            if !rest.starts_with('}') && !after.starts_with(',') {
                return Err("labels not separated by ','".into());
            }
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ');
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next()
        && ts.parse::<f64>().is_err()
    {
        return Err(format!("bad timestamp {ts:?}"));
    }
    if fields.next().is_some() {
        return Err("more than a value and a timestamp".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A quoted label value and what follows it.
fn label_value(s: &str) -> Result<(String, &str), String> {
    let body = s.strip_prefix('"').ok_or("a label value without quotes")?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &body[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                other => return Err(format!("bad escape {other:?} in a label value")),
            },
            '\n' => return Err("a newline in a label value".into()),
            c => value.push(c),
        }
    }
    Err("an unterminated label value".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_prometheus_reads_and_refuses_the_rest() {
        let text = "# HELP a_total Things.\n# TYPE a counter\na_total{rule=\"x\",path=\"l\\\"q\"} 3\n\
                    a_total{rule=\"y\"} 4 1700000000\nb 1.5e3\n# EOF\n";
        let m = parse(text).unwrap();
        assert_eq!(m.get("a_total", &[]), 7.0);
        assert_eq!(m.get("a_total", &[("path", "l\"q")]), 3.0);
        assert_eq!(m.get("b", &[]), 1500.0);
        assert_eq!(m.sum("c", &[]), None);
        for bad in [
            "a{rule=x} 1",
            "a{rule=\"x\" 1",
            "a 1 2 3",
            "a one",
            "1a 1",
            "# TYPE a nonsense",
            "a 1\n# TYPE a counter",
            "# EOF\na 1",
            "a{r=\"1\"r2=\"2\"} 1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
