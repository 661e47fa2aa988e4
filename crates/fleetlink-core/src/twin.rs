//! Device twins: the reported and desired documents of a device, merge patches, versions, deltas.
//!
//! A twin document is a nested JSON object. Its leaves are JSON scalars or arrays (never objects,
//! never null), and each leaf carries the time it was last updated. Documents change only through
//! [`TwinPatch`]es, which follow RFC 7386 (JSON Merge Patch): `null` deletes a field, an object
//! merges recursively, anything else replaces. A document never holds an empty object: one that a
//! patch creates or leaves behind is removed, so "RFC 7386, then drop empty objects" is the whole
//! rule.
//!
//! Values compare with serde_json's `==`: `1` and `1.0` are different values, so changing one into
//! the other is a change (a new update time, a new version, a delta entry).

use std::collections::BTreeMap;

use crate::TimeUs;

/// A JSON value.
pub type Json = serde_json::Value;

/// A JSON object.
pub type JsonMap = serde_json::Map<String, Json>;

/// Why a patch or a stored document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// The patch is valid JSON but not an object; the payload names what it is ("an array").
    #[error("a twin patch must be a JSON object, got {0}")]
    NotAnObject(String),
    /// The patch is not JSON (or holds a number JSON cannot carry).
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// A field name is empty, too long, or holds a control character or a '.'.
    #[error("invalid twin field name {path:?}: {why}")]
    InvalidKey {
        /// Dotted path of the field, ending with the offending name.
        path: String,
        /// What is wrong with the name.
        why: String,
    },
    /// Objects (or arrays) nest deeper than [`MAX_DEPTH`].
    #[error("twin field {path} nests deeper than {max} levels")]
    TooDeep {
        /// Dotted path of the field whose value is too deep.
        path: String,
        /// [`MAX_DEPTH`].
        max: usize,
    },
    /// A patch, or the document a patch would produce, serializes to more than [`MAX_DOC_BYTES`].
    #[error("twin document too large: {size} bytes, at most {max}")]
    TooLarge {
        /// Serialized size in bytes.
        size: usize,
        /// [`MAX_DOC_BYTES`].
        max: usize,
    },
    /// The caller's expected version is not the current one (see [`check_version`]).
    #[error(
        "version conflict: expected version {expected}, the current version is {current}; read the twin again and retry"
    )]
    Conflict {
        /// The version the caller read.
        expected: u64,
        /// The version stored now.
        current: u64,
    },
    /// A stored document cannot be a twin document (see [`TwinDoc::from_parts`]).
    #[error("corrupt stored twin: {0}")]
    Corrupt(String),
}

/// Most nesting levels of a document or patch; the top-level object is level 1. Arrays count as a
/// level too, so no value nests deeper than this.
pub const MAX_DEPTH: usize = 8;

/// Largest serialized (compact) size of a patch and of a document a patch produces.
pub const MAX_DOC_BYTES: usize = 64 * 1024;

/// Longest field name, in characters.
pub const MAX_KEY_LEN: usize = 128;

/// A validated merge patch (RFC 7386 JSON Merge Patch semantics): a JSON object where `null`
/// deletes a field, an object merges recursively, anything else (scalar or array) replaces.
///
/// Field names are 1..=[`MAX_KEY_LEN`] characters without control characters and without '.'
/// (the path separator of [`TwinDoc::get`]); the patch nests at most [`MAX_DEPTH`] levels and
/// serializes to at most [`MAX_DOC_BYTES`]. Array content is opaque: objects inside arrays may
/// use any keys, and nulls inside arrays are ordinary values.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinPatch(JsonMap);

impl TwinPatch {
    /// Parses and validates a patch.
    pub fn parse(json: &str) -> Result<Self, TwinError> {
        let value: Json =
            serde_json::from_str(json).map_err(|e| TwinError::InvalidJson(e.to_string()))?;
        Self::from_json(value)
    }

    /// Validates a patch.
    pub fn from_json(value: Json) -> Result<Self, TwinError> {
        let Json::Object(map) = value else {
            return Err(TwinError::NotAnObject(kind(&value).to_owned()));
        };
        validate_patch(&map, "", 1)?;
        let size = serialized_len(&map);
        if size > MAX_DOC_BYTES {
            return Err(TwinError::TooLarge {
                size,
                max: MAX_DOC_BYTES,
            });
        }
        Ok(Self(map))
    }

    /// The patch as a JSON object.
    pub fn as_map(&self) -> &JsonMap {
        &self.0
    }

    /// The patch as a JSON value (always an object).
    pub fn into_json(self) -> Json {
        Json::Object(self.0)
    }

    /// Whether the patch has no fields (it changes nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A node of a document: a leaf with its update time, or a non-empty object.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Leaf { value: Json, updated_us: TimeUs },
    Object(BTreeMap<String, Node>),
}

/// One document (reported or desired) with its version and per-leaf update times.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TwinDoc {
    /// Never holds an empty object.
    root: BTreeMap<String, Node>,
    version: u64,
}

impl TwinDoc {
    /// An empty document, version 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version: how many patches changed the document.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the document has no fields.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// The document as a JSON object (no metadata).
    pub fn to_json(&self) -> Json {
        Json::Object(values_json(&self.root))
    }

    /// Same shape as [`TwinDoc::to_json`], but every leaf replaced by its last-updated time (a JSON
    /// integer, microseconds).
    pub fn metadata_json(&self) -> Json {
        Json::Object(metadata_map(&self.root))
    }

    /// Rebuilds a document from what [`TwinDoc::to_json`], [`TwinDoc::metadata_json`] and
    /// [`TwinDoc::version`] produced (for storage). A leaf missing from `metadata` gets update
    /// time 0; `metadata` may be `null` (no times at all); metadata of fields `doc` lacks is
    /// ignored. Empty objects in `doc` are dropped.
    ///
    /// Fails with [`TwinError::Corrupt`] if `doc` is not an object, holds a null, an invalid field
    /// name or nests too deep, or if metadata has the wrong shape or a non-integer time.
    pub fn from_parts(doc: &Json, metadata: &Json, version: u64) -> Result<Self, TwinError> {
        let Json::Object(doc) = doc else {
            return Err(TwinError::Corrupt(format!(
                "the document is {}, expected an object",
                kind(doc)
            )));
        };
        let metadata = match metadata {
            Json::Null => None,
            Json::Object(m) => Some(m),
            other => {
                return Err(TwinError::Corrupt(format!(
                    "the metadata is {}, expected an object",
                    kind(other)
                )));
            }
        };
        Ok(Self {
            root: build_nodes(doc, metadata, "", 1)?,
            version,
        })
    }

    /// Applies a merge patch at time `now_us`.
    ///
    /// Leaves whose value changes (or are new) get update time `now_us`; unchanged leaves keep
    /// theirs. Deleting a missing field is a no-op. Empty objects, whether left behind by
    /// deletions or written by the patch, are removed. If anything changed, the version goes up
    /// by one. Returns whether anything changed.
    ///
    /// Fails with [`TwinError::TooLarge`], leaving the document unchanged, if the result would
    /// serialize to more than [`MAX_DOC_BYTES`].
    pub fn apply(&mut self, patch: &TwinPatch, now_us: TimeUs) -> Result<bool, TwinError> {
        let mut root = self.root.clone();
        if !merge(&mut root, patch.as_map(), now_us) {
            return Ok(false);
        }
        let size = serialized_len(&values_json(&root));
        if size > MAX_DOC_BYTES {
            return Err(TwinError::TooLarge {
                size,
                max: MAX_DOC_BYTES,
            });
        }
        self.root = root;
        // a version cannot realistically reach u64::MAX; saturating keeps a corrupt one from panicking
        self.version = self.version.saturating_add(1);
        Ok(true)
    }

    /// The value at a dotted path ("engine.mode"), if it is a leaf or an object.
    pub fn get(&self, path: &str) -> Option<Json> {
        Some(match self.node(path)? {
            Node::Leaf { value, .. } => value.clone(),
            Node::Object(children) => Json::Object(values_json(children)),
        })
    }

    /// Last-updated time of the leaf at a dotted path (None for objects and missing fields).
    pub fn updated_us(&self, path: &str) -> Option<TimeUs> {
        match self.node(path)? {
            Node::Leaf { updated_us, .. } => Some(*updated_us),
            Node::Object(_) => None,
        }
    }

    fn node(&self, path: &str) -> Option<&Node> {
        let mut parts = path.split('.');
        let mut node = self.root.get(parts.next()?)?;
        for part in parts {
            match node {
                Node::Object(children) => node = children.get(part)?,
                Node::Leaf { .. } => return None,
            }
        }
        Some(node)
    }
}

/// Optimistic concurrency: `expected` None always passes; `Some(v)` must equal `current`.
pub fn check_version(expected: Option<u64>, current: u64) -> Result<(), TwinError> {
    match expected {
        Some(expected) if expected != current => Err(TwinError::Conflict { expected, current }),
        _ => Ok(()),
    }
}

/// The delta the device must act on: every desired leaf whose value differs from the reported
/// leaf at the same path (or that reported lacks, or where reported has an object or a value of
/// another type), as a nested JSON object of those desired leaves. An empty map means in sync.
///
/// Applied to `reported` as a patch, the delta brings every desired leaf into `reported`.
pub fn delta(desired: &TwinDoc, reported: &TwinDoc) -> JsonMap {
    delta_map(&desired.root, Some(&reported.root))
}

fn delta_map(
    desired: &BTreeMap<String, Node>,
    reported: Option<&BTreeMap<String, Node>>,
) -> JsonMap {
    let mut out = JsonMap::new();
    for (key, node) in desired {
        let theirs = reported.and_then(|r| r.get(key));
        match node {
            Node::Leaf { value, .. } => {
                let in_sync = matches!(theirs, Some(Node::Leaf { value: v, .. }) if v == value);
                if !in_sync {
                    out.insert(key.clone(), value.clone());
                }
            }
            Node::Object(children) => {
                let theirs = match theirs {
                    Some(Node::Object(c)) => Some(c),
                    _ => None,
                };
                let sub = delta_map(children, theirs);
                if !sub.is_empty() {
                    out.insert(key.clone(), Json::Object(sub));
                }
            }
        }
    }
    out
}

/// Merges `patch` into `target`; returns whether anything changed. Keeps `target` free of empty
/// objects, provided it was free of them before.
fn merge(target: &mut BTreeMap<String, Node>, patch: &JsonMap, now_us: TimeUs) -> bool {
    let mut changed = false;
    for (key, value) in patch {
        match value {
            Json::Null => changed |= target.remove(key).is_some(),
            Json::Object(sub) => {
                if let Some(Node::Object(children)) = target.get_mut(key) {
                    if merge(children, sub, now_us) {
                        changed = true;
                        if children.is_empty() {
                            target.remove(key);
                        }
                    }
                } else {
                    // RFC 7386: a missing field or a leaf becomes an empty object, then merges
                    let mut children = BTreeMap::new();
                    merge(&mut children, sub, now_us);
                    if children.is_empty() {
                        changed |= target.remove(key).is_some();
                    } else {
                        target.insert(key.clone(), Node::Object(children));
                        changed = true;
                    }
                }
            }
            leaf => {
                let same =
                    matches!(target.get(key), Some(Node::Leaf { value: v, .. }) if v == leaf);
                if !same {
                    target.insert(
                        key.clone(),
                        Node::Leaf {
                            value: leaf.clone(),
                            updated_us: now_us,
                        },
                    );
                    changed = true;
                }
            }
        }
    }
    changed
}

fn values_json(nodes: &BTreeMap<String, Node>) -> JsonMap {
    nodes
        .iter()
        .map(|(key, node)| {
            let value = match node {
                Node::Leaf { value, .. } => value.clone(),
                Node::Object(children) => Json::Object(values_json(children)),
            };
            (key.clone(), value)
        })
        .collect()
}

fn metadata_map(nodes: &BTreeMap<String, Node>) -> JsonMap {
    nodes
        .iter()
        .map(|(key, node)| {
            let value = match node {
                Node::Leaf { updated_us, .. } => Json::from(*updated_us),
                Node::Object(children) => Json::Object(metadata_map(children)),
            };
            (key.clone(), value)
        })
        .collect()
}

/// Builds the nodes of the object at `prefix` (nesting level `level`) from storage.
fn build_nodes(
    doc: &JsonMap,
    metadata: Option<&JsonMap>,
    prefix: &str,
    level: usize,
) -> Result<BTreeMap<String, Node>, TwinError> {
    let mut nodes = BTreeMap::new();
    for (key, value) in doc {
        let path = join(prefix, key);
        if let Some(why) = key_problem(key) {
            return Err(TwinError::Corrupt(format!(
                "invalid field name {:?}: {why}",
                shorten(&path)
            )));
        }
        let meta = metadata.and_then(|m| m.get(key));
        match value {
            Json::Null => {
                return Err(TwinError::Corrupt(format!(
                    "field {path} is null, a document holds no nulls"
                )));
            }
            Json::Object(children) => {
                if level >= MAX_DEPTH {
                    return Err(TwinError::Corrupt(format!(
                        "field {path} nests deeper than {MAX_DEPTH} levels"
                    )));
                }
                let meta = match meta {
                    None => None,
                    Some(Json::Object(m)) => Some(m),
                    Some(other) => {
                        return Err(TwinError::Corrupt(format!(
                            "metadata of {path} is {}, expected an object",
                            kind(other)
                        )));
                    }
                };
                let children = build_nodes(children, meta, &path, level + 1)?;
                if !children.is_empty() {
                    nodes.insert(key.clone(), Node::Object(children));
                }
            }
            leaf => {
                if let Err(e) = check_leaf(leaf, MAX_DEPTH - level, &path) {
                    return Err(TwinError::Corrupt(e.to_string()));
                }
                let updated_us = match meta {
                    None => 0,
                    Some(t) => t.as_i64().ok_or_else(|| {
                        TwinError::Corrupt(format!(
                            "metadata of {path} is {}, expected an integer time in microseconds",
                            kind(t)
                        ))
                    })?,
                };
                nodes.insert(
                    key.clone(),
                    Node::Leaf {
                        value: leaf.clone(),
                        updated_us,
                    },
                );
            }
        }
    }
    Ok(nodes)
}

/// Validates the patch object at `prefix`, which sits at nesting level `level`.
fn validate_patch(map: &JsonMap, prefix: &str, level: usize) -> Result<(), TwinError> {
    for (key, value) in map {
        let path = join(prefix, key);
        if let Some(why) = key_problem(key) {
            return Err(TwinError::InvalidKey {
                path: shorten(&path),
                why,
            });
        }
        match value {
            Json::Object(sub) => {
                if level >= MAX_DEPTH {
                    return Err(TwinError::TooDeep {
                        path,
                        max: MAX_DEPTH,
                    });
                }
                validate_patch(sub, &path, level + 1)?;
            }
            other => check_leaf(other, MAX_DEPTH - level, &path)?,
        }
    }
    Ok(())
}

/// Checks a non-object value of the field at `path`: finite numbers, and (for arrays) at most
/// `levels_left` levels of nesting.
fn check_leaf(value: &Json, levels_left: usize, path: &str) -> Result<(), TwinError> {
    fn walk(value: &Json, levels_left: usize) -> Result<(), Problem> {
        let children: Box<dyn Iterator<Item = &Json>> = match value {
            Json::Number(n) if n.as_f64().is_some_and(|f| !f.is_finite()) => {
                return Err(Problem::NotFinite);
            }
            Json::Array(items) => Box::new(items.iter()),
            Json::Object(fields) => Box::new(fields.values()),
            _ => return Ok(()),
        };
        let Some(levels_left) = levels_left.checked_sub(1) else {
            return Err(Problem::TooDeep);
        };
        children.into_iter().try_for_each(|c| walk(c, levels_left))
    }
    enum Problem {
        NotFinite,
        TooDeep,
    }
    walk(value, levels_left).map_err(|problem| match problem {
        Problem::NotFinite => TwinError::InvalidJson(format!(
            "twin field {path} holds a number that is not finite"
        )),
        Problem::TooDeep => TwinError::TooDeep {
            path: path.to_owned(),
            max: MAX_DEPTH,
        },
    })
}

/// What is wrong with a field name, if anything.
fn key_problem(key: &str) -> Option<String> {
    let len = key.chars().count();
    if len == 0 {
        Some("a field name cannot be empty".to_owned())
    } else if len > MAX_KEY_LEN {
        Some(format!(
            "a field name has at most {MAX_KEY_LEN} characters, this one has {len}"
        ))
    } else if key.chars().any(char::is_control) {
        Some("a field name cannot contain control characters".to_owned())
    } else if key.contains('.') {
        Some("a field name cannot contain '.', which separates the levels of a path".to_owned())
    } else {
        None
    }
}

/// `prefix.key`, or `key` at the top level.
fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A path short enough for a message (an over-long field name would flood it).
fn shorten(path: &str) -> String {
    const KEEP: usize = MAX_KEY_LEN + 32;
    match path.char_indices().nth(KEEP) {
        Some((cut, _)) => format!("{}...", &path[..cut]),
        None => path.to_owned(),
    }
}

/// What a JSON value is, for messages.
fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Compact serialized size, without building the string.
fn serialized_len(map: &JsonMap) -> usize {
    struct ByteCount(usize);
    impl std::io::Write for ByteCount {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = ByteCount(0);
    match serde_json::to_writer(&mut count, map) {
        Ok(()) => count.0,
        // serializing a `Value` cannot fail; if it ever did, refuse rather than store it
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn patch(value: Json) -> TwinPatch {
        TwinPatch::from_json(value).unwrap()
    }

    fn doc(value: Json) -> TwinDoc {
        TwinDoc::from_parts(&value, &Json::Null, 0).unwrap()
    }

    /// RFC 7386 section 2, verbatim, as the reference for [`TwinDoc::apply`].
    fn rfc7386_merge(target: Json, patch: &Json) -> Json {
        let Json::Object(patch) = patch else {
            return patch.clone();
        };
        let mut target = match target {
            Json::Object(t) => t,
            _ => JsonMap::new(),
        };
        for (name, value) in patch {
            if value.is_null() {
                target.remove(name);
            } else {
                let old = target.remove(name).unwrap_or(Json::Null);
                target.insert(name.clone(), rfc7386_merge(old, value));
            }
        }
        Json::Object(target)
    }

    /// Drops empty objects (outside arrays), bottom-up: what a [`TwinDoc`] does to RFC results.
    fn prune_empty(value: Json) -> Json {
        match value {
            Json::Object(map) => Json::Object(
                map.into_iter()
                    .map(|(k, v)| (k, prune_empty(v)))
                    .filter(|(_, v)| v.as_object().is_none_or(|m| !m.is_empty()))
                    .collect(),
            ),
            other => other,
        }
    }

    /// Every leaf of a document-shaped object as (dotted path, value).
    fn leaves(map: &JsonMap) -> Vec<(String, Json)> {
        fn walk(map: &JsonMap, prefix: &str, out: &mut Vec<(String, Json)>) {
            for (k, v) in map {
                let path = join(prefix, k);
                match v {
                    Json::Object(sub) => walk(sub, &path, out),
                    leaf => out.push((path, leaf.clone())),
                }
            }
        }
        let mut out = Vec::new();
        walk(map, "", &mut out);
        out
    }

    fn as_map(value: Json) -> JsonMap {
        match value {
            Json::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    /// RFC 7386 Appendix A: (original, patch, result).
    const RFC_7386_EXAMPLES: &[(&str, &str, &str)] = &[
        (r#"{"a":"b"}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
        (r#"{"a":"b"}"#, r#"{"b":"c"}"#, r#"{"a":"b","b":"c"}"#),
        (r#"{"a":"b"}"#, r#"{"a":null}"#, r#"{}"#),
        (r#"{"a":"b","b":"c"}"#, r#"{"a":null}"#, r#"{"b":"c"}"#),
        (r#"{"a":["b"]}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
        (r#"{"a":"c"}"#, r#"{"a":["b"]}"#, r#"{"a":["b"]}"#),
        (
            r#"{"a":{"b":"c"}}"#,
            r#"{"a":{"b":"d","c":null}}"#,
            r#"{"a":{"b":"d"}}"#,
        ),
        (r#"{"a":[{"b":"c"}]}"#, r#"{"a":[1]}"#, r#"{"a":[1]}"#),
        (r#"["a","b"]"#, r#"["c","d"]"#, r#"["c","d"]"#),
        (r#"{"a":"b"}"#, r#"["c"]"#, r#"["c"]"#),
        (r#"{"a":"foo"}"#, r#"null"#, r#"null"#),
        (r#"{"a":"foo"}"#, r#""bar""#, r#""bar""#),
        (r#"{"e":null}"#, r#"{"a":1}"#, r#"{"e":null,"a":1}"#),
        (r#"[1,2]"#, r#"{"a":"b","c":null}"#, r#"{"a":"b"}"#),
        (
            r#"{}"#,
            r#"{"a":{"bb":{"ccc":null}}}"#,
            r#"{"a":{"bb":{}}}"#,
        ),
    ];

    /// Every Appendix A example: the reference merge reproduces it, and a twin document agrees
    /// wherever the example is a twin (an object without nulls patched by an object). A twin drops
    /// the empty objects of the last example: `{"a":{"bb":{}}}` is `{}` there.
    #[test]
    fn merge_matches_rfc_7386_appendix_a() {
        for &(original, p, result) in RFC_7386_EXAMPLES {
            let original: Json = serde_json::from_str(original).unwrap();
            let p: Json = serde_json::from_str(p).unwrap();
            let result: Json = serde_json::from_str(result).unwrap();
            assert_eq!(
                rfc7386_merge(original.clone(), &p),
                result,
                "{original} + {p}"
            );

            let twin_patch = TwinPatch::from_json(p.clone());
            if !p.is_object() {
                assert!(matches!(twin_patch, Err(TwinError::NotAnObject(_))), "{p}");
                continue;
            }
            let Ok(mut twin) = TwinDoc::from_parts(&original, &Json::Null, 0) else {
                // `[1,2]` and `{"e":null}` cannot be twin documents
                assert!(!original.is_object() || original.to_string().contains("null"));
                continue;
            };
            twin.apply(&twin_patch.unwrap(), 1).unwrap();
            assert_eq!(twin.to_json(), prune_empty(result), "{original} + {p}");
        }
    }

    #[test]
    fn apply_tracks_times_and_versions() {
        let mut d = TwinDoc::new();
        assert!(
            d.apply(&patch(json!({"engine": {"mode": "eco", "rpm": 900}})), 10)
                .unwrap()
        );
        assert!(
            d.apply(&patch(json!({"engine": {"rpm": 1200}})), 20)
                .unwrap()
        );
        assert_eq!(d.version(), 2);
        assert_eq!(d.get("engine.mode"), Some(json!("eco")));
        assert_eq!(d.updated_us("engine.mode"), Some(10));
        assert_eq!(d.updated_us("engine.rpm"), Some(20));
        assert_eq!(d.updated_us("engine"), None);
        assert_eq!(d.get("engine"), Some(json!({"mode": "eco", "rpm": 1200})));
        assert_eq!(d.get("engine.mode.x"), None);
        assert_eq!(d.get(""), None);

        // same value, deleting what is missing: no change, no new version
        assert!(
            !d.apply(&patch(json!({"engine": {"mode": "eco"}, "gone": null})), 30)
                .unwrap()
        );
        assert_eq!(d.version(), 2);
        assert_eq!(d.updated_us("engine.mode"), Some(10));

        // 1 and 1.0 are different values
        assert!(
            d.apply(&patch(json!({"engine": {"rpm": 1200.0}})), 40)
                .unwrap()
        );
        assert_eq!(d.updated_us("engine.rpm"), Some(40));

        // deleting the last leaf removes the emptied object
        assert!(
            d.apply(&patch(json!({"engine": {"mode": null, "rpm": null}})), 50)
                .unwrap()
        );
        assert!(d.is_empty());
        assert_eq!(d.to_json(), json!({}));
        assert_eq!(d.version(), 4);
    }

    #[test]
    fn an_empty_object_in_a_patch_creates_nothing() {
        let mut d = TwinDoc::new();
        assert!(
            !d.apply(&patch(json!({"a": {}, "b": {"c": {}}})), 1)
                .unwrap()
        );
        assert!(d.is_empty());
        assert_eq!(d.version(), 0);
    }

    #[test]
    fn delta_lists_desired_leaves_the_device_lacks() {
        let desired = doc(json!({"engine": {"mode": "eco", "rpm": 900}, "light": true, "n": 1}));
        let reported =
            doc(json!({"engine": {"mode": "eco", "rpm": 800}, "light": {"on": true}, "n": 1.0}));
        assert_eq!(
            Json::Object(delta(&desired, &reported)),
            json!({"engine": {"rpm": 900}, "light": true, "n": 1})
        );
        assert!(delta(&reported, &reported).is_empty());
    }

    #[test]
    fn patches_that_are_not_objects_are_refused() {
        assert_eq!(
            TwinPatch::parse("[1, 2]"),
            Err(TwinError::NotAnObject("an array".into()))
        );
        assert_eq!(
            TwinPatch::parse("null").unwrap_err().to_string(),
            "a twin patch must be a JSON object, got null"
        );
        assert_eq!(
            TwinPatch::from_json(json!("x")),
            Err(TwinError::NotAnObject("a string".into()))
        );
    }

    #[test]
    fn invalid_json_is_refused() {
        let err = TwinPatch::parse("{\"a\": ").unwrap_err();
        assert!(matches!(err, TwinError::InvalidJson(_)), "{err:?}");
        assert!(err.to_string().starts_with("invalid JSON: "), "{err}");
    }

    #[test]
    fn invalid_field_names_are_refused_with_their_path() {
        let cases = [
            (json!({"engine": {"": 1}}), "engine.", "empty"),
            (json!({"engine": {"mo.de": 1}}), "engine.mo.de", "'.'"),
            (json!({"engine": {"mo\nde": 1}}), "engine.mo\nde", "control"),
            (
                json!({"engine": {"x".repeat(129): 1}}),
                "",
                "at most 128 characters, this one has 129",
            ),
        ];
        for (value, path, why) in cases {
            let err = TwinPatch::from_json(value).unwrap_err();
            let TwinError::InvalidKey { path: p, why: w } = &err else {
                panic!("{err:?}");
            };
            if !path.is_empty() {
                assert_eq!(p, path);
            }
            assert!(w.contains(why), "{w}");
            assert!(
                err.to_string()
                    .starts_with("invalid twin field name \"engine."),
                "{err}"
            );
        }
        // exactly the limit, and non-ASCII names, are fine
        patch(json!({"x".repeat(128): 1, "émission": {"ñ": [null]}}));
        // keys inside arrays are content, not field names
        patch(json!({"a": [{"": null, "b.c": 1}]}));
    }

    #[test]
    fn nesting_is_limited() {
        let mut deep = json!(1);
        for key in ["i", "h", "g", "f", "e", "d", "c", "b", "a"] {
            deep = json!({ key: deep });
        }
        // 9 objects: the value of a.b.c.d.e.f.g.h is the ninth level
        let err = TwinPatch::from_json(deep.clone()).unwrap_err();
        assert_eq!(
            err,
            TwinError::TooDeep {
                path: "a.b.c.d.e.f.g.h".into(),
                max: MAX_DEPTH
            }
        );
        assert_eq!(
            err.to_string(),
            "twin field a.b.c.d.e.f.g.h nests deeper than 8 levels"
        );
        // 8 objects are fine
        patch(deep["a"].clone());
        // arrays count as levels too
        let err = TwinPatch::from_json(json!({"a": [[[[[[[[1]]]]]]]]})).unwrap_err();
        assert_eq!(
            err,
            TwinError::TooDeep {
                path: "a".into(),
                max: MAX_DEPTH
            }
        );
        patch(json!({"a": [[[[[[[1]]]]]]]}));
    }

    #[test]
    fn large_patches_and_documents_are_refused() {
        let big = "x".repeat(MAX_DOC_BYTES);
        let err = TwinPatch::from_json(json!({ "a": big })).unwrap_err();
        assert!(
            matches!(err, TwinError::TooLarge { size, max: MAX_DOC_BYTES } if size == MAX_DOC_BYTES + 8),
            "{err:?}"
        );

        let half = "x".repeat(MAX_DOC_BYTES / 2);
        let mut d = TwinDoc::new();
        assert!(d.apply(&patch(json!({ "a": half })), 1).unwrap());
        let before = d.clone();
        let err = d.apply(&patch(json!({ "b": half })), 2).unwrap_err();
        assert!(matches!(err, TwinError::TooLarge { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with("twin document too large: "),
            "{err}"
        );
        assert_eq!(d, before);
        // replacing instead of adding fits
        assert!(d.apply(&patch(json!({ "a": null, "b": half })), 3).unwrap());
    }

    #[test]
    fn check_version_is_optimistic_concurrency() {
        assert_eq!(check_version(None, 7), Ok(()));
        assert_eq!(check_version(Some(7), 7), Ok(()));
        let err = check_version(Some(6), 7).unwrap_err();
        assert_eq!(
            err,
            TwinError::Conflict {
                expected: 6,
                current: 7
            }
        );
        assert_eq!(
            err.to_string(),
            "version conflict: expected version 6, the current version is 7; read the twin again and retry"
        );
    }

    #[test]
    fn corrupt_stored_documents_are_refused() {
        let cases = [
            (json!([1]), Json::Null, "the document is an array"),
            (json!({"a": {"b": null}}), Json::Null, "field a.b is null"),
            (json!({"a.b": 1}), Json::Null, "invalid field name \"a.b\""),
            (
                json!({"a": 1}),
                json!({"a": "yesterday"}),
                "metadata of a is a string",
            ),
            (
                json!({"a": 1}),
                json!({"a": 1.5}),
                "metadata of a is a number",
            ),
            (
                json!({"a": {"b": 1}}),
                json!({"a": 3}),
                "metadata of a is a number",
            ),
            (json!({"a": 1}), json!([]), "the metadata is an array"),
        ];
        for (d, m, message) in cases {
            let err = TwinDoc::from_parts(&d, &m, 1).unwrap_err();
            assert!(matches!(err, TwinError::Corrupt(_)), "{err:?}");
            assert!(err.to_string().contains(message), "{err}");
            assert!(
                err.to_string().starts_with("corrupt stored twin: "),
                "{err}"
            );
        }
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!({ "k": deep });
        }
        let err = TwinDoc::from_parts(&deep, &Json::Null, 1).unwrap_err();
        assert!(err.to_string().contains("nests deeper"), "{err}");
    }

    #[test]
    fn from_parts_tolerates_missing_metadata_and_empty_objects() {
        let d = TwinDoc::from_parts(
            &json!({"a": 1, "b": {"c": 2}, "e": {}}),
            &json!({"a": 5, "z": 9}),
            3,
        )
        .unwrap();
        assert_eq!(d.updated_us("a"), Some(5));
        assert_eq!(d.updated_us("b.c"), Some(0));
        assert_eq!(d.to_json(), json!({"a": 1, "b": {"c": 2}}));
        assert_eq!(d.version(), 3);
    }

    fn leaf() -> impl Strategy<Value = Json> {
        prop_oneof![
            4 => (-2i64..3).prop_map(Json::from),
            1 => Just(json!(1.0)),
            2 => any::<bool>().prop_map(Json::from),
            2 => "[xy]{0,2}".prop_map(Json::from),
            1 => proptest::collection::vec((0i64..3).prop_map(Json::from), 0..3).prop_map(Json::from),
            1 => Just(json!([null, {"a": 1}])),
        ]
    }

    /// Small objects, keys "a".."e", `levels` levels deep; with `nulls`, a patch.
    fn object(levels: u32, nulls: bool) -> BoxedStrategy<JsonMap> {
        let value = if levels <= 1 {
            leaf().boxed()
        } else {
            prop_oneof![
                3 => leaf(),
                2 => object(levels - 1, nulls).prop_map(Json::Object),
            ]
            .boxed()
        };
        let value = if nulls {
            prop_oneof![4 => value, 1 => Just(Json::Null)].boxed()
        } else {
            value
        };
        proptest::collection::btree_map("[a-e]", value, 0..4)
            .prop_map(|m| m.into_iter().collect())
            .boxed()
    }

    fn any_patch() -> impl Strategy<Value = TwinPatch> {
        object(3, true).prop_map(|m| patch(Json::Object(m)))
    }

    /// A document built by a few patches at times 1, 2, ... (so it has seen deletions too).
    fn any_doc() -> impl Strategy<Value = TwinDoc> {
        proptest::collection::vec(any_patch(), 0..4).prop_map(|patches| {
            let mut d = TwinDoc::new();
            for (t, p) in patches.iter().enumerate() {
                d.apply(p, t as TimeUs + 1).unwrap();
            }
            d
        })
    }

    proptest! {
        /// Applying the delta to the reported document brings it in sync.
        #[test]
        fn applying_the_delta_syncs(desired in any_doc(), reported in any_doc()) {
            let d = delta(&desired, &reported);
            let mut synced = reported.clone();
            let changed = synced.apply(&patch(Json::Object(d.clone())), 100).unwrap();
            prop_assert_eq!(changed, !d.is_empty());
            prop_assert!(delta(&desired, &synced).is_empty());
        }

        /// The delta holds desired leaves only, with the desired values; every desired leaf it
        /// leaves out has the same value in the reported document.
        #[test]
        fn delta_is_exactly_the_differing_desired_leaves(desired in any_doc(), reported in any_doc()) {
            let d = delta(&desired, &reported);
            let in_delta = leaves(&d);
            for (path, value) in &in_delta {
                prop_assert!(desired.updated_us(path).is_some(), "{} is not a desired leaf", path);
                prop_assert_eq!(desired.get(path), Some(value.clone()));
                prop_assert!(reported.updated_us(path).is_none() || reported.get(path) != Some(value.clone()));
            }
            for (path, value) in leaves(&as_map(desired.to_json())) {
                if !in_delta.iter().any(|(p, _)| *p == path) {
                    prop_assert_eq!(reported.get(&path), Some(value));
                    prop_assert!(reported.updated_us(&path).is_some());
                }
            }
        }

        /// A document is in sync with itself.
        #[test]
        fn delta_with_itself_is_empty(d in any_doc()) {
            prop_assert!(delta(&d, &d).is_empty());
        }

        /// The second application of a patch changes nothing: not a value, a time or the version.
        #[test]
        fn apply_is_idempotent(mut d in any_doc(), p in any_patch()) {
            d.apply(&p, 50).unwrap();
            let once = d.clone();
            prop_assert!(!d.apply(&p, 60).unwrap());
            prop_assert_eq!(d, once);
        }

        /// Storage round trip.
        #[test]
        fn from_parts_round_trips(d in any_doc()) {
            let back = TwinDoc::from_parts(&d.to_json(), &d.metadata_json(), d.version()).unwrap();
            prop_assert_eq!(back, d);
        }

        /// `apply` is RFC 7386 followed by dropping empty objects; exactly the changed leaves get
        /// the new time, and the version moves iff the document did.
        #[test]
        fn apply_is_rfc_7386(mut d in any_doc(), p in any_patch()) {
            let before = d.clone();
            let expected = prune_empty(rfc7386_merge(before.to_json(), &p.clone().into_json()));
            let changed = d.apply(&p, 1_000).unwrap();
            prop_assert_eq!(d.to_json(), expected);
            prop_assert_eq!(changed, d.to_json() != before.to_json());
            prop_assert_eq!(d.version(), before.version() + u64::from(changed));
            for (path, value) in leaves(&as_map(d.to_json())) {
                let kept = before.updated_us(&path).is_some() && before.get(&path) == Some(value);
                let expected_time = if kept { before.updated_us(&path) } else { Some(1_000) };
                prop_assert_eq!(d.updated_us(&path), expected_time, "{}", path);
            }
        }

        /// Deleting some leaves (random patches rarely empty a whole object) removes exactly those,
        /// and the objects they leave empty, as RFC 7386 plus pruning says.
        #[test]
        fn deleting_leaves_prunes_emptied_objects(mut d in any_doc(), mask in proptest::collection::vec(any::<bool>(), 64)) {
            let before = d.to_json();
            let mut deletion = json!({});
            let mut deleted = 0;
            for ((path, _), delete) in leaves(&as_map(before.clone())).into_iter().zip(mask) {
                if delete {
                    let mut at = &mut deletion;
                    for part in path.split('.') {
                        at = at.as_object_mut().unwrap().entry(part).or_insert_with(|| json!({}));
                    }
                    *at = Json::Null;
                    deleted += 1;
                }
            }
            let changed = d.apply(&patch(deletion.clone()), 1_000).unwrap();
            prop_assert_eq!(changed, deleted > 0);
            prop_assert_eq!(d.to_json(), prune_empty(rfc7386_merge(before.clone(), &deletion)));
            prop_assert_eq!(leaves(&as_map(d.to_json())).len() + deleted, leaves(&as_map(before)).len());
        }

        /// Any JSON text either parses to a patch or is refused with a typed error; never a panic.
        #[test]
        fn parse_never_panics(s in "[{}\\[\\]\"a.:,0-9 null]{0,24}") {
            let _ = TwinPatch::parse(&s);
        }
    }
}
