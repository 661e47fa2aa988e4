//! What the device actors share: the group table, the standing queries, and the event bus that
//! feeds operator live streams. Each piece is read far more often than written (every actor reads
//! them on every state change), so they sit behind `RwLock`s held for microseconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fleetlink_core::DeviceId;
use fleetlink_core::query::{DeviceFacts, Query, Reads};
use fleetlink_proto::v1;
use tokio::sync::{broadcast, mpsc};

/// Static groups (named member sets) and dynamic groups (named queries).
#[derive(Debug, Default)]
pub(crate) struct Groups {
    table: RwLock<GroupTable>,
}

#[derive(Debug, Default)]
struct GroupTable {
    members: HashMap<String, HashSet<DeviceId>>,
    queries: HashMap<String, Query>,
}

/// Dynamic groups may refer to other groups; this bounds the chain (and breaks cycles).
const MAX_GROUP_NESTING: usize = 4;

impl Groups {
    pub(crate) fn set_static(&self, name: &str, members: HashSet<DeviceId>) {
        if let Ok(mut t) = self.table.write() {
            t.queries.remove(name);
            t.members.insert(name.to_owned(), members);
        }
    }

    pub(crate) fn set_dynamic(&self, name: &str, query: Query) {
        if let Ok(mut t) = self.table.write() {
            t.members.remove(name);
            t.queries.insert(name.to_owned(), query);
        }
    }

    pub(crate) fn remove(&self, name: &str) {
        if let Ok(mut t) = self.table.write() {
            t.members.remove(name);
            t.queries.remove(name);
        }
    }

    /// Whether `facts` (whose own group lookups come back here) is in group `name`.
    pub(crate) fn contains(&self, name: &str, facts: &dyn DeviceFacts, depth: usize) -> bool {
        let query = {
            let Ok(t) = self.table.read() else {
                return false;
            };
            if let Some(m) = t.members.get(name) {
                return m.iter().any(|d| d.as_str() == facts.id());
            }
            match t.queries.get(name) {
                Some(q) => q.clone(),
                None => return false,
            }
        };
        depth < MAX_GROUP_NESTING
            && query.matches(&Nested {
                facts,
                groups: self,
                depth: depth + 1,
            })
    }

    /// Every group name.
    pub(crate) fn names(&self) -> Vec<String> {
        self.table
            .read()
            .map(|t| t.members.keys().chain(t.queries.keys()).cloned().collect())
            .unwrap_or_default()
    }
}

/// The facts of a device seen from inside a dynamic group's query: group lookups go one level
/// deeper, so a group defined by itself matches nothing instead of recursing forever.
struct Nested<'a> {
    facts: &'a dyn DeviceFacts,
    groups: &'a Groups,
    depth: usize,
}

impl DeviceFacts for Nested<'_> {
    fn id(&self) -> &str {
        self.facts.id()
    }
    fn online(&self) -> bool {
        self.facts.online()
    }
    fn tag(&self, key: &str) -> Option<&str> {
        self.facts.tag(key)
    }
    fn attribute(&self, path: &str) -> Option<serde_json::Value> {
        self.facts.attribute(path)
    }
    fn in_group(&self, group: &str) -> bool {
        // Not `self.facts.in_group`: that starts again at depth 0, and a group defined by itself
        // would recurse until the stack overflows.
        self.groups.contains(group, self.facts, self.depth)
    }
    fn metric(&self, name: &str) -> Option<fleetlink_core::Value> {
        self.facts.metric(name)
    }
    fn reported(&self, path: &str) -> Option<serde_json::Value> {
        self.facts.reported(path)
    }
    fn desired(&self, path: &str) -> Option<serde_json::Value> {
        self.facts.desired(path)
    }
}

/// A device entering or leaving a standing query's set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MatchChange {
    pub device: DeviceId,
    pub matches: bool,
}

/// A query kept evaluated by every actor: each actor tells it when its device starts or stops
/// matching.
#[derive(Debug)]
pub(crate) struct StandingQuery {
    pub id: u64,
    pub query: Query,
    pub reads: Reads,
    pub changes: mpsc::UnboundedSender<MatchChange>,
}

/// Every standing query, by id.
#[derive(Debug, Default)]
pub(crate) struct StandingQueries {
    next: AtomicU64,
    queries: RwLock<BTreeMap<u64, Arc<StandingQuery>>>,
}

impl StandingQueries {
    /// Registers a query; the receiver gets every change after the actors evaluated it once.
    pub(crate) fn add(
        &self,
        query: Query,
    ) -> (Arc<StandingQuery>, mpsc::UnboundedReceiver<MatchChange>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let sq = Arc::new(StandingQuery {
            id,
            reads: query.reads(),
            query,
            changes: tx,
        });
        if let Ok(mut q) = self.queries.write() {
            q.insert(id, sq.clone());
        }
        (sq, rx)
    }

    pub(crate) fn remove(&self, id: u64) {
        if let Ok(mut q) = self.queries.write() {
            q.remove(&id);
        }
    }

    /// The queries that read any of `changed` (all of them when `changed` is `None`).
    pub(crate) fn affected(&self, changed: Option<Reads>) -> Vec<Arc<StandingQuery>> {
        let Ok(q) = self.queries.read() else {
            return Vec::new();
        };
        q.values()
            .filter(|sq| changed.is_none_or(|c| overlaps(sq.reads, c)))
            .cloned()
            .collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queries.read().map_or(true, |q| q.is_empty())
    }
}

/// Whether a query reading `a` may change its answer when `b` changed. Group membership may
/// depend on anything (dynamic groups), so a query that reads groups is always affected.
pub(crate) fn overlaps(a: Reads, b: Reads) -> bool {
    a.groups
        || (a.presence && b.presence)
        || (a.tags && b.tags)
        || (a.attributes && b.attributes)
        || (a.metrics && b.metrics)
        || (a.twin && b.twin)
}

/// One event on the bus: whose, and what (already in wire form, built once for every subscriber).
#[derive(Debug)]
pub(crate) struct BusEvent {
    pub device: Option<DeviceId>,
    pub event: v1::Event,
}

/// Events for operator live streams, one broadcast channel per kind. A slow subscriber's receiver
/// falls behind and is told how many events it missed (`Overflow`); senders never wait.
#[derive(Debug)]
pub(crate) struct EventBus {
    pub telemetry: broadcast::Sender<Arc<BusEvent>>,
    pub presence: broadcast::Sender<Arc<BusEvent>>,
    pub twin: broadcast::Sender<Arc<BusEvent>>,
    pub commands: broadcast::Sender<Arc<BusEvent>>,
    pub jobs: broadcast::Sender<Arc<BusEvent>>,
}

impl EventBus {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(16);
        Self {
            telemetry: broadcast::channel(capacity).0,
            presence: broadcast::channel(capacity).0,
            twin: broadcast::channel(capacity).0,
            commands: broadcast::channel(capacity).0,
            jobs: broadcast::channel(capacity).0,
        }
    }
}

/// Sends `event` to the subscribers of `channel`, if there are any (building it costs nothing
/// when nobody listens).
pub(crate) fn publish(
    channel: &broadcast::Sender<Arc<BusEvent>>,
    device: Option<&DeviceId>,
    event: impl FnOnce() -> v1::event::Event,
) {
    if channel.receiver_count() == 0 {
        return;
    }
    let _ = channel.send(Arc::new(BusEvent {
        device: device.cloned(),
        event: v1::Event {
            at_us: crate::now_us(),
            event: Some(event()),
        },
    }));
}

/// Everything the actors share.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub bridge: crate::bridge::Bridge,
    pub jobs: crate::jobs::Jobs,
    pub groups: Groups,
    pub standing: StandingQueries,
    pub bus: EventBus,
}

impl Fleet {
    pub(crate) fn new(event_buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            bridge: crate::bridge::Bridge::default(),
            jobs: crate::jobs::Jobs::default(),
            groups: Groups::default(),
            standing: StandingQueries::default(),
            bus: EventBus::new(event_buffer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose group lookups go back to the group table, like an actor's facts.
    struct Member<'a>(&'a Groups);

    impl DeviceFacts for Member<'_> {
        fn id(&self) -> &str {
            "dev-1"
        }
        fn online(&self) -> bool {
            true
        }
        fn tag(&self, _: &str) -> Option<&str> {
            None
        }
        fn attribute(&self, _: &str) -> Option<serde_json::Value> {
            None
        }
        fn in_group(&self, group: &str) -> bool {
            self.0.contains(group, self, 0)
        }
        fn metric(&self, _: &str) -> Option<fleetlink_core::Value> {
            None
        }
        fn reported(&self, _: &str) -> Option<serde_json::Value> {
            None
        }
        fn desired(&self, _: &str) -> Option<serde_json::Value> {
            None
        }
    }

    /// Group definitions that refer to each other in a cycle used to overflow the stack (and so
    /// abort the server): the nesting limit must hold through every level.
    #[test]
    fn cyclic_dynamic_groups_match_nothing_instead_of_recursing_forever() {
        let groups = Groups::default();
        groups.set_dynamic("a", Query::parse(r#"group == "b""#).unwrap());
        groups.set_dynamic("b", Query::parse(r#"group == "a" or online"#).unwrap());
        groups.set_dynamic("self", Query::parse(r#"group == "self""#).unwrap());
        let facts = Member(&groups);
        assert!(!groups.contains("self", &facts, 0));
        // b holds through its own `online`; a holds through b
        assert!(groups.contains("b", &facts, 0));
        assert!(groups.contains("a", &facts, 0));
        groups.set_static("fixed", [DeviceId::new("dev-1").unwrap()].into());
        assert!(groups.contains("fixed", &facts, 0));
    }
}
