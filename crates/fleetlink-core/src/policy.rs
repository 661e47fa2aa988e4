//! Who may do what on the device-to-device bridge: publish to a topic, subscribe to a filter,
//! send a direct message to a device, run a command on a device.
//!
//! A policy is an ordered list of rules and a default. The first rule that matches an action
//! decides it (allow or deny); when none matches, the default decides. A rule matches when
//!
//! - its `actions` contain the action (an empty list = every action),
//! - its `from` query matches the sending device (none = any device),
//! - for `message` and `command`: its `to` query matches the target device (none = any device)
//!   and it names no topics,
//! - for `publish`: it names no `to`, and one of its `topics` filters matches the topic (no topics
//!   = any topic),
//! - for `subscribe`: it names no `to`, and one of its `topics` filters covers the requested filter
//!   (every topic the request could receive is inside the rule's filter).
//!
//! The default `same-group` lets a device talk only within its own groups: `message` and `command`
//! need a group both devices are in; `publish` and `subscribe` are allowed under
//! `group/<name>/...` for every group `<name>` the device is in.

use std::fmt;

use crate::query::{DeviceFacts, Query, QueryError};
use crate::topic::{Topic, TopicError, TopicFilter};

/// Something a device asks the bridge to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Publish a message to a topic.
    Publish,
    /// Subscribe to a topic filter.
    Subscribe,
    /// Send a direct message to a device.
    Message,
    /// Run a command on a device.
    Command,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 4] = [
        Action::Publish,
        Action::Subscribe,
        Action::Message,
        Action::Command,
    ];

    /// Lower-case name, as in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Message => "message",
            Action::Command => "command",
        }
    }

    /// The action with this name.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a matching rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The action is allowed.
    Allow,
    /// The action is refused.
    Deny,
}

/// What decides when no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultRule {
    /// Devices talk only within their own groups (see the module documentation).
    #[default]
    SameGroup,
    /// Everything is allowed.
    Allow,
    /// Everything is refused.
    Deny,
}

impl DefaultRule {
    /// Parses `same-group`, `allow` or `deny`.
    pub fn parse(s: &str) -> Option<DefaultRule> {
        match s {
            "same-group" => Some(DefaultRule::SameGroup),
            "allow" => Some(DefaultRule::Allow),
            "deny" => Some(DefaultRule::Deny),
            _ => None,
        }
    }
}

/// Why a rule could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An unknown action name.
    #[error("rule {rule}: unknown action {name:?}; use publish, subscribe, message or command")]
    UnknownAction {
        /// The rule's position (1-based).
        rule: usize,
        /// What was given.
        name: String,
    },
    /// An unknown effect.
    #[error("rule {rule}: unknown effect {name:?}; use allow or deny")]
    UnknownEffect {
        /// The rule's position (1-based).
        rule: usize,
        /// What was given.
        name: String,
    },
    /// An unknown default.
    #[error("unknown policy default {0:?}; use same-group, allow or deny")]
    UnknownDefault(String),
    /// A `from` or `to` query does not parse.
    #[error("rule {rule}, `{field}`: {error}")]
    Query {
        /// The rule's position (1-based).
        rule: usize,
        /// `from` or `to`.
        field: &'static str,
        /// The parse error.
        error: QueryError,
    },
    /// A topic filter is invalid.
    #[error("rule {rule}, topic {filter:?}: {error}")]
    Topic {
        /// The rule's position (1-based).
        rule: usize,
        /// What was given.
        filter: String,
        /// Why it is invalid.
        error: TopicError,
    },
    /// A rule names both target devices and topics, which no action has.
    #[error(
        "rule {rule}: `to` applies to message and command, `topics` to publish and subscribe; a rule cannot have both"
    )]
    ToAndTopics {
        /// The rule's position (1-based).
        rule: usize,
    },
}

/// One rule, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleSpec {
    /// `allow` or `deny`.
    pub effect: String,
    /// Action names; empty = every action.
    pub actions: Vec<String>,
    /// A query over the sending device.
    pub from: Option<String>,
    /// A query over the target device.
    pub to: Option<String>,
    /// Topic filters.
    pub topics: Vec<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    effect: Effect,
    actions: Vec<Action>,
    from: Option<Query>,
    to: Option<Query>,
    topics: Vec<TopicFilter>,
    text: String,
}

/// What a policy decided, and why (for the sender's error and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the action may go ahead.
    pub allowed: bool,
    /// Which rule decided, or the default and why.
    pub reason: String,
}

/// The target of an action.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// `message` and `command`: the target device and the groups it is in.
    Device(&'a dyn DeviceFacts, &'a [String]),
    /// `publish`: the topic.
    Topic(&'a Topic),
    /// `subscribe`: the filter.
    Filter(&'a TopicFilter),
}

impl fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Device(d, _) => write!(f, "Device({})", d.id()),
            Target::Topic(t) => write!(f, "Topic({t})"),
            Target::Filter(t) => write!(f, "Filter({t})"),
        }
    }
}

/// An ordered list of rules and a default.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    default: DefaultRule,
}

impl Policy {
    /// Builds a policy; every error names the rule (1-based) and field.
    pub fn new(rules: &[RuleSpec], default: &str) -> Result<Policy, PolicyError> {
        let default = DefaultRule::parse(default)
            .ok_or_else(|| PolicyError::UnknownDefault(default.into()))?;
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, spec)| Rule::new(i + 1, spec))
            .collect::<Result<_, _>>()?;
        Ok(Policy { rules, default })
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (only the default).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides whether `from` (in groups `from_groups`) may do `action` to `target`.
    pub fn decide(
        &self,
        action: Action,
        from: &dyn DeviceFacts,
        from_groups: &[String],
        target: Target<'_>,
    ) -> Decision {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(action, from, target) {
                return Decision {
                    allowed: rule.effect == Effect::Allow,
                    reason: format!("rule {}: {}", i + 1, rule.text),
                };
            }
        }
        match self.default {
            DefaultRule::Allow => Decision {
                allowed: true,
                reason: "default: allow".into(),
            },
            DefaultRule::Deny => Decision {
                allowed: false,
                reason: "default: deny (no rule allows it)".into(),
            },
            DefaultRule::SameGroup => same_group(action, from_groups, target),
        }
    }
}

fn same_group(action: Action, from_groups: &[String], target: Target<'_>) -> Decision {
    let (allowed, detail) = match target {
        Target::Device(to, to_groups) => match from_groups.iter().find(|g| to_groups.contains(g)) {
            Some(g) => (true, format!("both devices are in group {g:?}")),
            None => (
                false,
                format!("no group has both the sender and {}", to.id()),
            ),
        },
        Target::Topic(topic) => {
            let mut levels = topic.levels();
            let ok = levels.next() == Some("group")
                && levels
                    .next()
                    .is_some_and(|g| from_groups.iter().any(|m| m == g));
            let detail = if ok {
                "the topic is under one of the sender's groups".into()
            } else {
                format!("the sender may publish only under group/<its group>/..., not {topic}")
            };
            (ok, detail)
        }
        Target::Filter(filter) => {
            let ok = from_groups.iter().any(|g| {
                TopicFilter::new(format!("group/{g}/#")).is_ok_and(|own| own.covers(filter))
            });
            let detail = if ok {
                "the filter is inside one of the sender's groups".into()
            } else {
                format!("the sender may subscribe only under group/<its group>/..., not {filter}")
            };
            (ok, detail)
        }
    };
    let _ = action;
    Decision {
        allowed,
        reason: format!("default same-group: {detail}"),
    }
}

impl Rule {
    fn new(n: usize, spec: &RuleSpec) -> Result<Rule, PolicyError> {
        let effect = match spec.effect.as_str() {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            other => {
                return Err(PolicyError::UnknownEffect {
                    rule: n,
                    name: other.into(),
                });
            }
        };
        let actions = spec
            .actions
            .iter()
            .map(|a| {
                Action::parse(a).ok_or_else(|| PolicyError::UnknownAction {
                    rule: n,
                    name: a.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let query = |field: &'static str, q: &Option<String>| {
            q.as_deref()
                .map(Query::parse)
                .transpose()
                .map_err(|error| PolicyError::Query {
                    rule: n,
                    field,
                    error,
                })
        };
        let from = query("from", &spec.from)?;
        let to = query("to", &spec.to)?;
        let topics = spec
            .topics
            .iter()
            .map(|t| {
                TopicFilter::new(t.clone()).map_err(|error| PolicyError::Topic {
                    rule: n,
                    filter: t.clone(),
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if to.is_some() && !topics.is_empty() {
            return Err(PolicyError::ToAndTopics { rule: n });
        }
        let mut text = format!(
            "{} {}",
            if effect == Effect::Allow {
                "allow"
            } else {
                "deny"
            },
            if actions.is_empty() {
                "every action".to_owned()
            } else {
                actions
                    .iter()
                    .map(|a| a.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        if let Some(f) = &from {
            text.push_str(&format!(" from `{f}`"));
        }
        if let Some(t) = &to {
            text.push_str(&format!(" to `{t}`"));
        }
        if !topics.is_empty() {
            let t: Vec<&str> = topics.iter().map(TopicFilter::as_str).collect();
            text.push_str(&format!(" on {}", t.join(", ")));
        }
        Ok(Rule {
            effect,
            actions,
            from,
            to,
            topics,
            text,
        })
    }

    fn matches(&self, action: Action, from: &dyn DeviceFacts, target: Target<'_>) -> bool {
        if !self.actions.is_empty() && !self.actions.contains(&action) {
            return false;
        }
        if self.from.as_ref().is_some_and(|q| !q.matches(from)) {
            return false;
        }
        match target {
            Target::Device(to, _) => {
                self.topics.is_empty() && self.to.as_ref().is_none_or(|q| q.matches(to))
            }
            Target::Topic(topic) => {
                self.to.is_none()
                    && (self.topics.is_empty() || self.topics.iter().any(|f| f.matches(topic)))
            }
            Target::Filter(filter) => {
                self.to.is_none()
                    && (self.topics.is_empty() || self.topics.iter().any(|f| f.covers(filter)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::Value;

    struct Dev {
        id: String,
        tags: BTreeMap<String, String>,
        groups: Vec<String>,
    }

    impl DeviceFacts for Dev {
        fn id(&self) -> &str {
            &self.id
        }
        fn online(&self) -> bool {
            true
        }
        fn tag(&self, key: &str) -> Option<&str> {
            self.tags.get(key).map(String::as_str)
        }
        fn attribute(&self, _: &str) -> Option<serde_json::Value> {
            None
        }
        fn in_group(&self, group: &str) -> bool {
            self.groups.iter().any(|g| g == group)
        }
        fn metric(&self, _: &str) -> Option<Value> {
            None
        }
        fn reported(&self, _: &str) -> Option<serde_json::Value> {
            None
        }
        fn desired(&self, _: &str) -> Option<serde_json::Value> {
            None
        }
    }

    fn dev(id: &str, role: &str, groups: &[&str]) -> Dev {
        Dev {
            id: id.into(),
            tags: BTreeMap::from([("role".to_owned(), role.to_owned())]),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    fn rule(
        effect: &str,
        actions: &[&str],
        from: Option<&str>,
        to: Option<&str>,
        topics: &[&str],
    ) -> RuleSpec {
        RuleSpec {
            effect: effect.into(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            from: from.map(Into::into),
            to: to.map(Into::into),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn device_decision(p: &Policy, action: Action, from: &Dev, to: &Dev) -> Decision {
        p.decide(action, from, &from.groups, Target::Device(to, &to.groups))
    }

    #[test]
    fn the_default_lets_devices_talk_within_their_groups_only() {
        let p = Policy::new(&[], "same-group").unwrap();
        let truck = dev("truck-1", "truck", &["yard-a"]);
        let gate = dev("gate-1", "gate", &["yard-a", "gates"]);
        let far = dev("gate-9", "gate", &["yard-b"]);
        assert!(device_decision(&p, Action::Command, &truck, &gate).allowed);
        let d = device_decision(&p, Action::Message, &truck, &far);
        assert!(!d.allowed);
        assert!(
            d.reason.contains("no group has both the sender and gate-9"),
            "{}",
            d.reason
        );

        let own = Topic::new("group/yard-a/status").unwrap();
        let other = Topic::new("group/yard-b/status").unwrap();
        let free = Topic::new("status").unwrap();
        assert!(
            p.decide(Action::Publish, &truck, &truck.groups, Target::Topic(&own))
                .allowed
        );
        assert!(
            !p.decide(
                Action::Publish,
                &truck,
                &truck.groups,
                Target::Topic(&other)
            )
            .allowed
        );
        assert!(
            !p.decide(Action::Publish, &truck, &truck.groups, Target::Topic(&free))
                .allowed
        );
        let inside = TopicFilter::new("group/yard-a/+/gate").unwrap();
        let outside = TopicFilter::new("group/+/status").unwrap();
        assert!(
            p.decide(
                Action::Subscribe,
                &truck,
                &truck.groups,
                Target::Filter(&inside)
            )
            .allowed
        );
        assert!(
            !p.decide(
                Action::Subscribe,
                &truck,
                &truck.groups,
                Target::Filter(&outside)
            )
            .allowed
        );
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let p = Policy::new(
            &[
                rule(
                    "deny",
                    &["command"],
                    Some(r#"tag.role == "truck""#),
                    Some(r#"id == "gate-2""#),
                    &[],
                ),
                rule(
                    "allow",
                    &["command", "message"],
                    Some(r#"tag.role == "truck""#),
                    Some(r#"tag.role == "gate""#),
                    &[],
                ),
                rule("allow", &["publish", "subscribe"], None, None, &["yard/#"]),
            ],
            "deny",
        )
        .unwrap();
        let truck = dev("truck-1", "truck", &[]);
        let gate1 = dev("gate-1", "gate", &[]);
        let gate2 = dev("gate-2", "gate", &[]);
        let d = device_decision(&p, Action::Command, &truck, &gate1);
        assert!(d.allowed);
        assert!(
            d.reason.starts_with("rule 2: allow command, message from"),
            "{}",
            d.reason
        );
        let d = device_decision(&p, Action::Command, &truck, &gate2);
        assert!(!d.allowed);
        assert!(d.reason.starts_with("rule 1: deny"), "{}", d.reason);
        let d = device_decision(&p, Action::Command, &gate1, &truck);
        assert_eq!(
            d,
            Decision {
                allowed: false,
                reason: "default: deny (no rule allows it)".into()
            }
        );
        let yard = Topic::new("yard/3/gate").unwrap();
        assert!(
            p.decide(Action::Publish, &gate1, &[], Target::Topic(&yard))
                .allowed
        );
        let narrow = TopicFilter::new("yard/+/gate").unwrap();
        let wide = TopicFilter::new("#").unwrap();
        assert!(
            p.decide(Action::Subscribe, &gate1, &[], Target::Filter(&narrow))
                .allowed
        );
        assert!(
            !p.decide(Action::Subscribe, &gate1, &[], Target::Filter(&wide))
                .allowed
        );
    }

    #[test]
    fn bad_rules_name_the_rule_and_field() {
        let e = Policy::new(&[rule("allow", &["teleport"], None, None, &[])], "deny").unwrap_err();
        assert_eq!(
            e.to_string(),
            "rule 1: unknown action \"teleport\"; use publish, subscribe, message or command"
        );
        let e = Policy::new(
            &[
                rule("allow", &[], None, None, &[]),
                rule("permit", &[], None, None, &[]),
            ],
            "deny",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("rule 2: unknown effect"), "{e}");
        let e =
            Policy::new(&[rule("allow", &[], Some("tag.x = 1"), None, &[])], "deny").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("rule 1, `from`: query error at column"),
            "{e}"
        );
        let e = Policy::new(&[rule("allow", &[], None, None, &["a/#/b"])], "deny").unwrap_err();
        assert!(e.to_string().starts_with("rule 1, topic \"a/#/b\""), "{e}");
        let e =
            Policy::new(&[rule("allow", &[], None, Some("online"), &["a"])], "deny").unwrap_err();
        assert!(matches!(e, PolicyError::ToAndTopics { rule: 1 }));
        let e = Policy::new(&[], "maybe").unwrap_err();
        assert_eq!(e, PolicyError::UnknownDefault("maybe".into()));
    }

    proptest! {
        /// A policy with no rules decides by its default alone, and the same-group default is
        /// symmetric for device actions.
        #[test]
        fn same_group_is_symmetric(a in proptest::collection::vec(0u8..4, 0..3), b in proptest::collection::vec(0u8..4, 0..3)) {
            let p = Policy::new(&[], "same-group").unwrap();
            let names = |v: &[u8]| v.iter().map(|g| format!("g{g}")).collect::<Vec<_>>();
            let x = Dev { id: "x".into(), tags: BTreeMap::new(), groups: names(&a) };
            let y = Dev { id: "y".into(), tags: BTreeMap::new(), groups: names(&b) };
            let xy = device_decision(&p, Action::Message, &x, &y).allowed;
            let yx = device_decision(&p, Action::Message, &y, &x).allowed;
            prop_assert_eq!(xy, yx);
            prop_assert_eq!(xy, a.iter().any(|g| b.contains(g)));
        }

        /// Rules are checked in order: putting a catch-all rule first makes it decide everything.
        #[test]
        fn a_catch_all_first_rule_decides_everything(allow in any::<bool>(), action in 0usize..4) {
            let effect = if allow { "allow" } else { "deny" };
            let p = Policy::new(
                &[rule(effect, &[], None, None, &[]), rule("deny", &[], None, None, &[])],
                "deny",
            )
            .unwrap();
            let a = dev("a", "x", &[]);
            let b = dev("b", "x", &[]);
            let action = Action::ALL[action];
            let d = match action {
                Action::Message | Action::Command => device_decision(&p, action, &a, &b),
                Action::Publish => p.decide(action, &a, &[], Target::Topic(&Topic::new("t").unwrap())),
                Action::Subscribe => p.decide(action, &a, &[], Target::Filter(&TopicFilter::new("#").unwrap())),
            };
            prop_assert_eq!(d.allowed, allow);
            prop_assert!(d.reason.starts_with("rule 1:"));
        }
    }
}
