//! [`PathPattern`]: the path part of a rule's selector, parsed once from the YAML.
//!
//! A pattern is a sequence of `/`-separated segments: a literal (`api`), a one-segment wildcard
//! (`{name}` or `*`; the name documents the segment and is not captured), or `**`, the rest of
//! the path, only as the last segment. Parsing is where every malformed pattern is refused, so
//! the matcher can assume well-formed segments. Request paths are split by [`Segments`], which
//! is shared by the matcher's trie and by [`PathPattern::matches`] so both read a path the same
//! way.

use std::fmt;

/// A parsed path pattern such as `/api/orders/{id}` or `/static/**`.
///
/// A pattern matches a request path when their segments correspond one to one, except that
/// `**` matches whatever is left, including nothing (`/api/**` matches `/api`, `/api/a` and
/// `/api/a/b`). Request paths are read by segments: the query (`?...`) and fragment (`#...`)
/// are ignored, and empty segments are skipped, so `/api//login/` is `/api/login`. That keeps a
/// client from slipping past a limit by doubling a slash. The matcher does not percent-decode
/// or resolve `.`/`..` segments: whoever hands it a path must normalize it as the backend
/// would (the edge's HTTP API and proxy do, `edge_agent::proxy::decision_path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    /// The pattern as the operator wrote it, for names and messages.
    text: String,
    segments: Vec<Segment>,
}

/// One segment of a [`PathPattern`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// This exact text.
    Literal(String),
    /// `{name}`: any one segment. The name is for readers; it is not captured.
    Param(String),
    /// `*`: any one segment.
    Any,
    /// `**`: everything left, possibly nothing. Always the last segment.
    Rest,
}

impl PathPattern {
    /// The pattern as written in the rules file.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed segments; empty for `/`.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True when every segment is a literal.
    pub fn is_literal(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// Whether `path` matches, by a direct walk over this one pattern.
    ///
    /// The rule set does not use this to match requests (its trie looks at every pattern at
    /// once); it is the plain statement of the semantics, which tests compare the trie against.
    pub fn matches(&self, path: &str) -> bool {
        let mut path = Segments::new(path);
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::Param(_) | Segment::Any => {
                    if path.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if path.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        path.next().is_none()
    }

    /// Parses `text`, or says what is wrong with it (the reason of a `ConfigError`).
    pub(crate) fn parse(text: &str) -> Result<PathPattern, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?} must start with \"/\""));
        }
        if let Some(c) = text
            .chars()
            .find(|c| matches!(c, '?' | '#') || c.is_whitespace())
        {
            return Err(format!("{text:?} may not contain {c:?}"));
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(format!(
                "{text:?} may not contain the control character {c:?}"
            ));
        }
        let mut segments = Vec::new();
        if text == "/" {
            return Ok(PathPattern {
                text: text.to_owned(),
                segments,
            });
        }
        // `text` starts with '/', so the first piece of the split is the empty string before it.
        for piece in text.split('/').skip(1) {
            if segments.last() == Some(&Segment::Rest) {
                return Err(format!("{text:?}: \"**\" must be the last segment"));
            }
            let segment = parse_segment(text, piece)?;
            if let Segment::Param(name) = &segment {
                let seen = segments.contains(&Segment::Param(name.clone()));
                if seen {
                    return Err(format!("{text:?}: the parameter {{{name}}} appears twice"));
                }
            }
            segments.push(segment);
            if segments.len() > MAX_PATTERN_SEGMENTS {
                return Err(format!(
                    "{text:?} has more than {MAX_PATTERN_SEGMENTS} segments"
                ));
            }
        }
        Ok(PathPattern {
            text: text.to_owned(),
            segments,
        })
    }

    /// The pattern with parameter names erased (`/a/{id}` and `/a/*` are both `/a/*`): two
    /// rules whose shapes, methods and keys are equal select exactly the same requests.
    pub(crate) fn shape(&self) -> String {
        let mut shape = String::new();
        for segment in &self.segments {
            shape.push('/');
            match segment {
                Segment::Literal(lit) => shape.push_str(lit),
                Segment::Param(_) | Segment::Any => shape.push('*'),
                Segment::Rest => shape.push_str("**"),
            }
        }
        if shape.is_empty() {
            shape.push('/');
        }
        shape
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The deepest pattern we accept. The matcher walks the trie recursively, one level per
/// segment, so this bounds its stack use whatever the rules file says; real APIs stay far
/// below it.
pub const MAX_PATTERN_SEGMENTS: usize = 64;

/// One piece between slashes of the pattern `text`.
fn parse_segment(text: &str, piece: &str) -> Result<Segment, String> {
    match piece {
        "" => return Err(format!("{text:?} has an empty segment")),
        "*" => return Ok(Segment::Any),
        "**" => return Ok(Segment::Rest),
        _ => {}
    }
    if let Some(inner) = piece.strip_prefix('{') {
        let Some(name) = inner.strip_suffix('}') else {
            return Err(if inner.contains('}') {
                format!("{text:?}: \"{{...}}\" must be a whole segment, found {piece:?}")
            } else {
                format!("{text:?}: unclosed \"{{\" in {piece:?}")
            });
        };
        if name.is_empty() {
            return Err(format!("{text:?}: a parameter needs a name, as in {{id}}"));
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "{text:?}: parameter name {name:?} may hold only letters, digits and '_'"
            ));
        }
        return Ok(Segment::Param(name.to_owned()));
    }
    if piece.contains('{') || piece.contains('}') {
        return Err(format!(
            "{text:?}: \"{{...}}\" must be a whole segment, found {piece:?}"
        ));
    }
    if piece.contains('*') {
        return Err(format!(
            "{text:?}: \"*\" and \"**\" must be whole segments, found {piece:?}"
        ));
    }
    Ok(Segment::Literal(piece.to_owned()))
}

/// The non-empty segments of a request path, before any `?` or `#`.
///
/// `Copy`, so the trie walk can fork at a node (try the literal child, then the wildcard child)
/// by copying the cursor instead of allocating.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Segments<'a> {
    pub(crate) fn new(path: &'a str) -> Segments<'a> {
        // Bytes, not chars: `?`, `#` and `/` are ASCII, so they never split a UTF-8 sequence,
        // and a byte loop over a short path is cheaper than a char searcher.
        let end = path
            .bytes()
            .position(|b| b == b'?' || b == b'#')
            .unwrap_or(path.len());
        Segments {
            rest: path.get(..end).unwrap_or(path),
        }
    }

    /// What is left of the path, as written.
    pub(crate) fn as_str(&self) -> &'a str {
        self.rest
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.rest.as_bytes();
        let start = bytes.iter().position(|&b| b != b'/').unwrap_or(bytes.len());
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(bytes.len(), |i| start + i);
        // Both ends sit next to an ASCII `/` or at an end of the string: char boundaries.
        let segment = self.rest.get(start..end).unwrap_or("");
        self.rest = self.rest.get(end..).unwrap_or("");
        (!segment.is_empty()).then_some(segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(path: &str) -> Vec<&str> {
        Segments::new(path).collect()
    }

    #[test]
    fn request_paths_split_into_non_empty_segments() {
        assert_eq!(segs("/api/login"), ["api", "login"]);
        assert_eq!(segs("//api//login/"), ["api", "login"]);
        assert_eq!(segs("/api/search?q=a/b#x"), ["api", "search"]);
        assert!(segs("/").is_empty());
        assert!(segs("").is_empty());
        assert!(segs("/?x=/a").is_empty());
    }

    #[test]
    fn patterns_parse_into_segments() {
        let p = PathPattern::parse("/api/orders/{id}/*/**").unwrap();
        assert_eq!(
            p.segments(),
            [
                Segment::Literal("api".into()),
                Segment::Literal("orders".into()),
                Segment::Param("id".into()),
                Segment::Any,
                Segment::Rest,
            ]
        );
        assert_eq!(p.shape(), "/api/orders/*/*/**");
        assert!(PathPattern::parse("/").unwrap().segments().is_empty());
        assert!(PathPattern::parse("/a/b").unwrap().is_literal());
    }

    #[test]
    fn bad_patterns_say_why() {
        let cases = [
            ("api", "must start with"),
            ("/a//b", "empty segment"),
            ("/a/", "empty segment"),
            ("/**/a", "must be the last segment"),
            ("/a/{id", "unclosed"),
            ("/a/{}", "needs a name"),
            ("/a/x{id}", "whole segment"),
            ("/a/{id}x", "whole segment"),
            ("/a/{a-b}", "letters, digits"),
            ("/a/b*", "whole segments"),
            ("/a/***", "whole segments"),
            ("/a?x=1", "may not contain"),
            ("/a b", "may not contain"),
            ("/{id}/{id}", "appears twice"),
        ];
        for (text, want) in cases {
            let err = PathPattern::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let deep = "/a".repeat(MAX_PATTERN_SEGMENTS + 1);
        assert!(PathPattern::parse(&deep).unwrap_err().contains("more than"));
    }

    #[test]
    fn direct_match_follows_the_documented_semantics() {
        let p = |s| PathPattern::parse(s).unwrap();
        assert!(p("/api/login").matches("/api/login"));
        assert!(p("/api/login").matches("/api//login/?next=/x"));
        assert!(!p("/api/login").matches("/api/login/x"));
        assert!(p("/api/{id}").matches("/api/7"));
        assert!(!p("/api/{id}").matches("/api"));
        assert!(p("/api/**").matches("/api"));
        assert!(p("/api/**").matches("/api/a/b/c"));
        assert!(!p("/api/**").matches("/apix"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/a"));
        assert!(p("/**").matches("/anything/at/all"));
    }
}
