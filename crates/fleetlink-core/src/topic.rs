//! MQTT-style topics, topic filters and a subscription index, for the device-to-device bridge.
//!
//! A device publishes to a [`Topic`] (`yard/3/gate`); devices subscribed with a matching
//! [`TopicFilter`] receive the message. In a filter, `+` matches exactly one level and a last
//! level `#` matches zero or more levels, as in MQTT: `yard/#` matches `yard`, `yard/3` and
//! `yard/3/gate`. [`TopicIndex`] finds the subscribers of a topic without scanning every filter.
//!
//! Stricter than MQTT: levels are never empty (no `a//b`, no leading or trailing `/`), control
//! characters are refused, and names starting with `$` are reserved for the server's own topics.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// Longest topic or topic filter, in bytes of UTF-8.
pub const MAX_TOPIC_BYTES: usize = 256;

/// Most levels of a topic or topic filter (`a/b/c` has 3).
pub const MAX_LEVELS: usize = 16;

/// Why a topic or filter is invalid. Messages say what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The text is empty.
    #[error("{what} is empty: give 1 to {max} levels separated by '/', such as \"yard/3/gate\"")]
    Empty {
        /// "topic" or "topic filter".
        what: &'static str,
        /// [`MAX_LEVELS`].
        max: usize,
    },
    /// The text is longer than [`MAX_TOPIC_BYTES`].
    #[error("{what} is {len} bytes long; at most {max} bytes are allowed")]
    TooLong {
        /// "topic" or "topic filter".
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// [`MAX_TOPIC_BYTES`].
        max: usize,
    },
    /// The text has more than [`MAX_LEVELS`] levels.
    #[error("{what} {text:?} has {levels} levels; at most {max} are allowed")]
    TooManyLevels {
        /// "topic" or "topic filter".
        what: &'static str,
        /// The refused text.
        text: String,
        /// How many levels it has.
        levels: usize,
        /// [`MAX_LEVELS`].
        max: usize,
    },
    /// A level is empty: a leading, trailing or doubled '/'.
    #[error(
        "{what} {text:?} has an empty level {level}; levels must not be empty (no leading, trailing or doubled '/')"
    )]
    EmptyLevel {
        /// "topic" or "topic filter".
        what: &'static str,
        /// The refused text.
        text: String,
        /// Which level is empty, counting from 1.
        level: usize,
    },
    /// A topic (not a filter) holds '+' or '#'.
    #[error(
        "topic {text:?} contains the wildcard {wildcard:?}; wildcards '+' and '#' are allowed only in topic filters"
    )]
    WildcardInTopic {
        /// The refused topic.
        text: String,
        /// The wildcard found.
        wildcard: char,
    },
    /// A filter level holds '+' or '#' beside other characters, as in `a/b+`.
    #[error(
        "topic filter {text:?} has {wildcard:?} inside the level {level:?}; a wildcard must be a whole level, as in \"a/+/c\" or \"a/#\""
    )]
    WildcardNotWholeLevel {
        /// The refused filter.
        text: String,
        /// The offending level.
        level: String,
        /// The wildcard found.
        wildcard: char,
    },
    /// A filter has '#' before its last level, as in `a/#/b`.
    #[error(
        "topic filter {text:?} has '#' before its last level; '#' is allowed only as the last level, as in \"a/b/#\""
    )]
    HashNotLast {
        /// The refused filter.
        text: String,
    },
    /// The text holds a control character (NUL included).
    #[error(
        "{what} {text:?} contains the control character {ch:?} at byte {pos}; only printable characters are allowed"
    )]
    ControlChar {
        /// "topic" or "topic filter".
        what: &'static str,
        /// The refused text.
        text: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        pos: usize,
    },
    /// The text starts with '$'.
    #[error(
        "{what} {text:?} starts with '$'; names starting with '$' are reserved for the server's own topics"
    )]
    Reserved {
        /// "topic" or "topic filter".
        what: &'static str,
        /// The refused text.
        text: String,
    },
}

/// Checks the rules shared by topics and filters; `filter` allows wildcards as whole levels.
fn validate(s: &str, filter: bool) -> Result<(), TopicError> {
    let what = if filter { "topic filter" } else { "topic" };
    if s.is_empty() {
        return Err(TopicError::Empty {
            what,
            max: MAX_LEVELS,
        });
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong {
            what,
            len: s.len(),
            max: MAX_TOPIC_BYTES,
        });
    }
    if let Some((pos, ch)) = s.char_indices().find(|(_, c)| c.is_control()) {
        return Err(TopicError::ControlChar {
            what,
            text: s.to_owned(),
            ch,
            pos,
        });
    }
    if s.starts_with('$') {
        return Err(TopicError::Reserved {
            what,
            text: s.to_owned(),
        });
    }
    let levels = s.split('/').count();
    if levels > MAX_LEVELS {
        return Err(TopicError::TooManyLevels {
            what,
            text: s.to_owned(),
            levels,
            max: MAX_LEVELS,
        });
    }
    for (i, level) in s.split('/').enumerate() {
        if level.is_empty() {
            return Err(TopicError::EmptyLevel {
                what,
                text: s.to_owned(),
                level: i + 1,
            });
        }
        let Some(wildcard) = level.chars().find(|c| matches!(c, '+' | '#')) else {
            continue;
        };
        if !filter {
            return Err(TopicError::WildcardInTopic {
                text: s.to_owned(),
                wildcard,
            });
        }
        if level.len() > 1 {
            return Err(TopicError::WildcardNotWholeLevel {
                text: s.to_owned(),
                level: level.to_owned(),
                wildcard,
            });
        }
        if level == "#" && i + 1 != levels {
            return Err(TopicError::HashNotLast { text: s.to_owned() });
        }
    }
    Ok(())
}

/// A topic a message is published to: levels separated by '/', no wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    /// Validates `s`: 1 to [`MAX_LEVELS`] non-empty levels, at most [`MAX_TOPIC_BYTES`] bytes, no
    /// wildcards, no control characters, no leading '$'.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        validate(&s, false)?;
        Ok(Self(s))
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels, first to last (never empty strings).
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, TopicError> {
        Self::new(s)
    }
}

/// A subscription filter: a topic where a level may be `+` (exactly one level) and the last
/// level may be `#` (zero or more levels: `a/#` matches `a`, `a/b`, `a/b/c`, as in MQTT).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Validates `s`: the rules of [`Topic::new`], except that a whole level may be `+` and the
    /// last level may be `#`.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        validate(&s, true)?;
        Ok(Self(s))
    }

    /// The filter as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels, first to last, wildcards included.
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether `topic` matches this filter.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut topic = topic.levels();
        for level in self.levels() {
            match level {
                "#" => return true,
                "+" => {
                    if topic.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if topic.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        topic.next().is_none()
    }

    /// Whether every topic `other` matches is matched by `self` too (for policy checks of
    /// subscriptions: a device allowed on `yard/#` may subscribe to `yard/+/gate`).
    pub fn covers(&self, other: &TopicFilter) -> bool {
        // a topic has at least one level, so `#` alone matches just what `+/#` matches: the one
        // case where a `#` of `other` can be covered by something other than a `#` of `self`
        if other.as_str() == "#" {
            return matches!(self.as_str(), "#" | "+/#");
        }
        let mut mine = self.levels();
        let mut theirs = other.levels();
        loop {
            match (mine.next(), theirs.next()) {
                // `#` takes whatever is left of `other`, zero levels included
                (Some("#"), _) => return true,
                (None, None) => return true,
                // `self` needs more levels than `other` may have, or `other` allows more
                (Some(_), None) | (None, Some(_)) => return false,
                // `other` matches a topic ending here and longer ones; `self` not both
                (Some(_), Some("#")) => return false,
                (Some("+"), Some(_)) => {}
                // a literal matches neither every level `+` does nor a different literal
                (Some(mine), Some(theirs)) => {
                    if mine != theirs {
                        return false;
                    }
                }
            }
        }
    }

    /// Whether the filter has no wildcards (it matches exactly one topic).
    pub fn is_exact(&self) -> bool {
        self.levels().all(|l| l != "+" && l != "#")
    }
}

impl From<Topic> for TopicFilter {
    /// The filter that matches exactly `topic`.
    fn from(topic: Topic) -> Self {
        Self(topic.0)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl std::str::FromStr for TopicFilter {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, TopicError> {
        Self::new(s)
    }
}

/// One level of the [`TopicIndex`] trie: the subscribers of the filters that end here, and the
/// deeper levels.
#[derive(Debug, Clone)]
struct Node<S> {
    /// Children for literal levels.
    literal: HashMap<String, Node<S>>,
    /// The child for a `+` level.
    plus: Option<Box<Node<S>>>,
    /// Subscribers of the filter made of the path to here plus `#` (always a last level).
    hash: BTreeSet<S>,
    /// Subscribers of the filter that is exactly the path to here.
    exact: BTreeSet<S>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Self {
            literal: HashMap::new(),
            plus: None,
            hash: BTreeSet::new(),
            exact: BTreeSet::new(),
        }
    }
}

impl<S: Clone + Eq + std::hash::Hash + Ord> Node<S> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.exact.is_empty()
    }

    /// Adds the subscribers whose filters below this node match the rest of a topic, `levels`.
    fn collect<'a>(&'a self, levels: &[&str], out: &mut BTreeSet<&'a S>) {
        out.extend(&self.hash);
        let Some((first, rest)) = levels.split_first() else {
            out.extend(&self.exact);
            return;
        };
        if let Some(child) = self.literal.get(*first) {
            child.collect(rest, out);
        }
        if let Some(child) = &self.plus {
            child.collect(rest, out);
        }
    }

    /// Removes `subscriber` from the filter `levels` below this node, pruning emptied children.
    fn remove(&mut self, levels: &[&str], subscriber: &S) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            return self.exact.remove(subscriber);
        };
        match *first {
            "#" => self.hash.remove(subscriber),
            "+" => {
                let Some(child) = self.plus.as_deref_mut() else {
                    return false;
                };
                let removed = child.remove(rest, subscriber);
                if child.is_empty() {
                    self.plus = None;
                }
                removed
            }
            literal => {
                let Some(child) = self.literal.get_mut(literal) else {
                    return false;
                };
                let removed = child.remove(rest, subscriber);
                if child.is_empty() {
                    self.literal.remove(literal);
                }
                removed
            }
        }
    }
}

/// An index of subscriptions: which subscribers' filters match a topic, without scanning all
/// filters (a trie over levels, with `+` and `#` children).
///
/// `S` is the subscriber's key, such as a device id. Beside the trie, the index keeps each
/// subscriber's filters, so [`TopicIndex::remove_all`] costs only that subscriber's filters.
#[derive(Debug, Clone)]
pub struct TopicIndex<S> {
    root: Node<S>,
    by_subscriber: HashMap<S, BTreeSet<TopicFilter>>,
    len: usize,
}

impl<S> Default for TopicIndex<S> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            by_subscriber: HashMap::new(),
            len: 0,
        }
    }
}

impl<S: Clone + Eq + std::hash::Hash + Ord> TopicIndex<S> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a subscription; returns false if this subscriber already had this exact filter.
    pub fn insert(&mut self, filter: &TopicFilter, subscriber: S) -> bool {
        if !self
            .by_subscriber
            .entry(subscriber.clone())
            .or_default()
            .insert(filter.clone())
        {
            return false;
        }
        let mut node = &mut self.root;
        for level in filter.levels() {
            node = match level {
                "#" => {
                    // validation put `#` last
                    node.hash.insert(subscriber);
                    self.len += 1;
                    return true;
                }
                "+" => &mut **node.plus.get_or_insert_with(Box::default),
                literal => node.literal.entry(literal.to_owned()).or_default(),
            };
        }
        node.exact.insert(subscriber);
        self.len += 1;
        true
    }

    /// Removes one; returns whether it was there. Prunes empty trie nodes.
    pub fn remove(&mut self, filter: &TopicFilter, subscriber: &S) -> bool {
        let Some(filters) = self.by_subscriber.get_mut(subscriber) else {
            return false;
        };
        if !filters.remove(filter) {
            return false;
        }
        if filters.is_empty() {
            self.by_subscriber.remove(subscriber);
        }
        self.remove_from_trie(filter, subscriber);
        true
    }

    /// Removes every subscription of a subscriber (it went away); returns how many.
    pub fn remove_all(&mut self, subscriber: &S) -> usize {
        let Some(filters) = self.by_subscriber.remove(subscriber) else {
            return 0;
        };
        for filter in &filters {
            self.remove_from_trie(filter, subscriber);
        }
        filters.len()
    }

    /// Removes a pair known to be in the trie (it is in `by_subscriber`).
    fn remove_from_trie(&mut self, filter: &TopicFilter, subscriber: &S) {
        let levels: Vec<&str> = filter.levels().collect();
        let removed = self.root.remove(&levels, subscriber);
        debug_assert!(
            removed,
            "{filter} was indexed for its subscriber but not in the trie"
        );
        self.len -= 1;
    }

    /// Every subscriber with at least one filter matching `topic`, each once, sorted.
    pub fn subscribers(&self, topic: &Topic) -> Vec<S> {
        let levels: Vec<&str> = topic.levels().collect();
        let mut out = BTreeSet::new();
        self.root.collect(&levels, &mut out);
        out.into_iter().cloned().collect()
    }

    /// The filters of one subscriber, sorted (none if it has no subscription).
    pub fn filters_of(&self, subscriber: &S) -> Vec<TopicFilter> {
        self.by_subscriber
            .get(subscriber)
            .map(|filters| filters.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The number of (filter, subscriber) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no subscription at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn mqtt_spec_examples() {
        let player = f("sport/tennis/player1/#");
        assert!(player.matches(&t("sport/tennis/player1")));
        assert!(player.matches(&t("sport/tennis/player1/ranking")));
        assert!(player.matches(&t("sport/tennis/player1/score/wimbledon")));
        assert!(!player.matches(&t("sport/tennis/player2")));
        assert!(!player.matches(&t("sport/tennis")));

        assert!(!f("sport/+").matches(&t("sport/tennis/player1")));
        assert!(f("sport/+").matches(&t("sport/tennis")));
        assert!(!f("sport/+").matches(&t("sport")));
        assert!(f("sport/tennis/+").matches(&t("sport/tennis/player1")));
        assert!(!f("sport/tennis/+").matches(&t("sport/tennis/player1/ranking")));

        for topic in ["a", "sport", "sport/tennis/player1", "a/b/c/d/e"] {
            assert!(f("#").matches(&t(topic)), "# must match {topic}");
        }

        assert!(f("+/+").matches(&t("a/b")));
        assert!(!f("+/+").matches(&t("a")));
        assert!(!f("+/+").matches(&t("a/b/c")));
        assert!(f("+").matches(&t("a")));

        assert!(f("sport/#").matches(&t("sport")));
        assert!(!f("sport/#").matches(&t("sports")));
        assert!(f("+/tennis/#").matches(&t("sport/tennis")));
        assert!(f("sport/tennis").matches(&t("sport/tennis")));
        assert!(!f("sport/tennis").matches(&t("sport/tennis/player1")));
    }

    #[test]
    fn exact_filters_and_conversions() {
        assert!(f("a/b").is_exact());
        assert!(!f("a/+").is_exact());
        assert!(!f("#").is_exact());
        let filter = TopicFilter::from(t("yard/3/gate"));
        assert_eq!(filter.as_str(), "yard/3/gate");
        assert!(filter.is_exact());
        assert_eq!(t("a/b").levels().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(f("a/+/#").levels().collect::<Vec<_>>(), ["a", "+", "#"]);
        assert_eq!(format!("[{:<6}]", t("a/b")), "[a/b   ]");
        assert_eq!(f("a/#").to_string(), "a/#");
        assert_eq!("a/b".parse::<Topic>(), Ok(t("a/b")));
        assert_eq!("a/+".parse::<TopicFilter>(), Ok(f("a/+")));
        // unicode and spaces are fine, levels are opaque
        assert!(Topic::new("hall é/ 7 ").is_ok());
    }

    fn topic_err(s: &str) -> String {
        Topic::new(s).unwrap_err().to_string()
    }

    fn filter_err(s: &str) -> String {
        TopicFilter::new(s).unwrap_err().to_string()
    }

    #[test]
    fn every_error_says_what_is_allowed() {
        assert_eq!(
            Topic::new(""),
            Err(TopicError::Empty {
                what: "topic",
                max: MAX_LEVELS
            })
        );
        assert_eq!(
            topic_err(""),
            "topic is empty: give 1 to 16 levels separated by '/', such as \"yard/3/gate\""
        );
        assert_eq!(
            filter_err(""),
            "topic filter is empty: give 1 to 16 levels separated by '/', such as \"yard/3/gate\""
        );

        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert!(Topic::new("a".repeat(MAX_TOPIC_BYTES)).is_ok());
        assert_eq!(
            topic_err(&long),
            "topic is 257 bytes long; at most 256 bytes are allowed"
        );
        assert_eq!(
            filter_err(&long),
            "topic filter is 257 bytes long; at most 256 bytes are allowed"
        );

        let deep = vec!["a"; MAX_LEVELS + 1].join("/");
        assert!(Topic::new(vec!["a"; MAX_LEVELS].join("/")).is_ok());
        assert_eq!(
            topic_err(&deep),
            format!("topic {deep:?} has 17 levels; at most 16 are allowed")
        );

        for (s, level) in [("a//b", 2), ("/a", 1), ("a/", 2), ("/", 1)] {
            assert_eq!(
                topic_err(s),
                format!(
                    "topic {s:?} has an empty level {level}; levels must not be empty (no leading, trailing or doubled '/')"
                )
            );
        }
        assert_eq!(
            filter_err("a//#"),
            "topic filter \"a//#\" has an empty level 2; levels must not be empty (no leading, trailing or doubled '/')"
        );

        assert_eq!(
            topic_err("a/+/c"),
            "topic \"a/+/c\" contains the wildcard '+'; wildcards '+' and '#' are allowed only in topic filters"
        );
        assert_eq!(
            topic_err("a/b#"),
            "topic \"a/b#\" contains the wildcard '#'; wildcards '+' and '#' are allowed only in topic filters"
        );

        assert_eq!(
            filter_err("a/b+"),
            "topic filter \"a/b+\" has '+' inside the level \"b+\"; a wildcard must be a whole level, as in \"a/+/c\" or \"a/#\""
        );
        assert_eq!(
            filter_err("a/#b"),
            "topic filter \"a/#b\" has '#' inside the level \"#b\"; a wildcard must be a whole level, as in \"a/+/c\" or \"a/#\""
        );
        assert!(TopicFilter::new("++").is_err());

        assert_eq!(
            filter_err("a/#/b"),
            "topic filter \"a/#/b\" has '#' before its last level; '#' is allowed only as the last level, as in \"a/b/#\""
        );
        assert!(TopicFilter::new("#/#").is_err());

        assert_eq!(
            topic_err("a/\0"),
            "topic \"a/\\0\" contains the control character '\\0' at byte 2; only printable characters are allowed"
        );
        assert_eq!(
            filter_err("a\n/#"),
            "topic filter \"a\\n/#\" contains the control character '\\n' at byte 1; only printable characters are allowed"
        );

        assert_eq!(
            topic_err("$SYS/uptime"),
            "topic \"$SYS/uptime\" starts with '$'; names starting with '$' are reserved for the server's own topics"
        );
        assert_eq!(
            filter_err("$SYS/#"),
            "topic filter \"$SYS/#\" starts with '$'; names starting with '$' are reserved for the server's own topics"
        );
        // '$' elsewhere is an ordinary character
        assert!(Topic::new("price/$").is_ok());
    }

    #[test]
    fn covers_examples() {
        assert!(f("a/#").covers(&f("a/+/c")));
        assert!(f("a/+").covers(&f("a/b")));
        assert!(!f("a/+").covers(&f("a/#")));
        assert!(!f("+/+").covers(&f("a/#")));
        for other in ["a", "a/b", "+", "+/#", "#", "a/+/c/#"] {
            assert!(f("#").covers(&f(other)), "# must cover {other}");
        }
        assert!(f("yard/#").covers(&f("yard/+/gate")));
        assert!(f("yard/#").covers(&f("yard")));
        assert!(f("yard/#").covers(&f("yard/#")));
        assert!(!f("yard/+/gate").covers(&f("yard/#")));
        assert!(!f("a/b").covers(&f("a/+")));
        assert!(!f("a").covers(&f("a/#")));
        assert!(f("a/+/#").covers(&f("a/b/#")));
        assert!(!f("a/+/#").covers(&f("a/#")));
        assert!(!f("a/b").covers(&f("a/b/c")));
        assert!(!f("a/b/c").covers(&f("a/b")));
    }

    /// Found by `covers_is_sound_and_complete`: every topic has a first level, so `+/#` matches
    /// all that `#` matches.
    #[test]
    fn regression_plus_hash_covers_hash() {
        assert!(f("+/#").covers(&f("#")));
        assert!(f("#").covers(&f("+/#")));
        assert!(!f("+").covers(&f("#")));
        assert!(!f("+/+/#").covers(&f("#")));
        assert!(!f("a/#").covers(&f("#")));
        assert!(!f("a/+/#").covers(&f("a/#")));
    }

    #[test]
    fn index_finds_removes_and_prunes() {
        let mut index = TopicIndex::new();
        assert!(index.is_empty());
        assert!(index.insert(&f("yard/#"), "gate"));
        assert!(index.insert(&f("yard/+/temp"), "hvac"));
        assert!(index.insert(&f("yard/3/temp"), "hvac"));
        assert!(index.insert(&f("#"), "logger"));
        assert!(!index.insert(&f("yard/#"), "gate"));
        assert_eq!(index.len(), 4);

        assert_eq!(
            index.subscribers(&t("yard/3/temp")),
            ["gate", "hvac", "logger"]
        );
        assert_eq!(index.subscribers(&t("yard")), ["gate", "logger"]);
        assert_eq!(index.subscribers(&t("dock/1")), ["logger"]);
        assert_eq!(
            index.filters_of(&"hvac"),
            [f("yard/+/temp"), f("yard/3/temp")]
        );

        assert!(!index.remove(&f("yard/#"), &"hvac"));
        assert!(index.remove(&f("yard/#"), &"gate"));
        assert!(!index.remove(&f("yard/#"), &"gate"));
        assert_eq!(index.subscribers(&t("yard")), ["logger"]);

        assert_eq!(index.remove_all(&"hvac"), 2);
        assert_eq!(index.remove_all(&"hvac"), 0);
        assert!(index.filters_of(&"hvac").is_empty());
        assert_eq!(index.subscribers(&t("yard/3/temp")), ["logger"]);

        assert!(index.remove(&f("#"), &"logger"));
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "emptied nodes are pruned");
        assert!(index.by_subscriber.is_empty());
    }

    /// Levels from a small alphabet, so matches are frequent.
    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("c")]
    }

    fn any_topic() -> impl Strategy<Value = Topic> {
        proptest::collection::vec(level(), 1..=4).prop_map(|levels| t(&levels.join("/")))
    }

    /// 1 to 4 levels from {a, b, c, +}, then maybe `#` (and `#` alone).
    fn any_filter() -> impl Strategy<Value = TopicFilter> {
        let level = prop_oneof![3 => level(), 1 => Just("+")];
        (proptest::collection::vec(level, 0..=4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            f(&levels.join("/"))
        })
    }

    /// Every topic of 1 to `max_levels` levels over {a, b, c}.
    fn all_topics(max_levels: usize) -> Vec<Topic> {
        let mut all = Vec::new();
        let mut current: Vec<String> = vec![String::new()];
        for _ in 0..max_levels {
            current = current
                .iter()
                .flat_map(|prefix| {
                    ["a", "b", "c"].map(|l| {
                        if prefix.is_empty() {
                            l.to_owned()
                        } else {
                            format!("{prefix}/{l}")
                        }
                    })
                })
                .collect();
            all.extend(current.iter().map(|s| t(s)));
        }
        all
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(TopicFilter, u8),
        Remove(TopicFilter, u8),
        RemoveAll(u8),
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any_filter(), 0u8..5).prop_map(|(f, s)| Op::Insert(f, s)),
            2 => (any_filter(), 0u8..5).prop_map(|(f, s)| Op::Remove(f, s)),
            1 => (0u8..5).prop_map(Op::RemoveAll),
        ]
    }

    /// No node below the root is empty: removals prune.
    fn pruned<S: Clone + Eq + std::hash::Hash + Ord>(node: &Node<S>) -> bool {
        node.literal
            .values()
            .chain(node.plus.as_deref())
            .all(|child| !child.is_empty() && pruned(child))
    }

    proptest! {
        /// The trie answers what a scan of every subscription answers, after any history.
        #[test]
        fn index_agrees_with_brute_force(ops in proptest::collection::vec(any_op(), 0..40)) {
            let mut index = TopicIndex::new();
            let mut model: BTreeMap<u8, BTreeSet<TopicFilter>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(filter, s) => {
                        let new = model.entry(s).or_default().insert(filter.clone());
                        prop_assert_eq!(index.insert(&filter, s), new);
                    }
                    Op::Remove(filter, s) => {
                        let had = model.get_mut(&s).is_some_and(|fs| fs.remove(&filter));
                        prop_assert_eq!(index.remove(&filter, &s), had);
                    }
                    Op::RemoveAll(s) => {
                        let had = model.remove(&s).map_or(0, |fs| fs.len());
                        prop_assert_eq!(index.remove_all(&s), had);
                    }
                }
                let len: usize = model.values().map(BTreeSet::len).sum();
                prop_assert_eq!(index.len(), len);
                prop_assert_eq!(index.is_empty(), len == 0);
            }
            for s in 0u8..5 {
                let expected: Vec<_> = model.get(&s).into_iter().flatten().cloned().collect();
                prop_assert_eq!(index.filters_of(&s), expected);
            }
            for topic in all_topics(5) {
                let expected: Vec<u8> = model
                    .iter()
                    .filter(|(_, fs)| fs.iter().any(|f| f.matches(&topic)))
                    .map(|(s, _)| *s)
                    .collect();
                prop_assert_eq!(index.subscribers(&topic), expected, "topic {}", topic);
            }
            prop_assert!(pruned(&index.root));
        }

        /// `covers` is exactly "matches a superset", over every topic of up to 5 levels (enough
        /// to tell apart filters of up to 5 levels over this alphabet).
        #[test]
        fn covers_is_sound_and_complete(mine in any_filter(), theirs in any_filter()) {
            let counterexample = all_topics(5)
                .into_iter()
                .find(|topic| theirs.matches(topic) && !mine.matches(topic));
            prop_assert_eq!(
                mine.covers(&theirs),
                counterexample.is_none(),
                "{} covers {}? counterexample {:?}", mine, theirs, counterexample
            );
            prop_assert!(mine.covers(&mine));
        }

        #[test]
        fn a_topic_as_a_filter_matches_itself(topic in any_topic()) {
            let filter = TopicFilter::from(topic.clone());
            prop_assert!(filter.is_exact());
            prop_assert!(filter.matches(&topic));
        }

        /// Any text is accepted or refused, never a panic; a valid topic is a valid exact filter
        /// that matches it.
        #[test]
        fn arbitrary_text_never_panics(
            s in prop_oneof![any::<String>(), "[ab/+#$\\x00 é]{0,24}"]
        ) {
            let filter = TopicFilter::new(s.clone());
            if let Ok(topic) = Topic::new(s) {
                prop_assert_eq!(filter, Ok(TopicFilter::from(topic.clone())));
                prop_assert!(TopicFilter::from(topic.clone()).matches(&topic));
            } else if let Ok(filter) = filter {
                prop_assert!(!filter.is_exact(), "only wildcards make a filter valid but not a topic");
            }
        }
    }
}
