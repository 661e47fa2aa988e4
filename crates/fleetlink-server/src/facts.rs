//! A device's facts (presence, tags, attributes, groups, last values, twin) as the query language
//! sees them, read straight from its actor's live state; the actor's side of fleet queries,
//! standing queries and tag/attribute changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix::prelude::*;
use fleetlink_core::Value;
use fleetlink_core::query::{DeviceFacts, Query, Reads};
use fleetlink_core::twin::{TwinDoc, TwinPatch};
use fleetlink_store::StoreError;

use crate::actor::DeviceActor;
use crate::fleet::{MatchChange, StandingQuery};

/// A device's tags, sorted by key, in one allocation of their size. The actor of every
/// provisioned device holds them: a `BTreeMap` would allocate a node of eleven entries (544
/// bytes) for a device with a single tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tags(Box<[(String, String)]>);

impl Tags {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok()?;
        Some(self.0[i].1.as_str())
    }

    /// Removes the `remove` keys, then sets `set` (so a key in both is set).
    pub(crate) fn update(&mut self, set: BTreeMap<String, String>, remove: &[String]) {
        let mut map = self.to_map();
        for k in remove {
            map.remove(k);
        }
        map.extend(set);
        *self = Tags::from(map);
    }

    pub(crate) fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(map: BTreeMap<String, String>) -> Self {
        // in key order, as the map iterates
        Tags(map.into_iter().collect())
    }
}

/// A borrowed view of an actor's state for the query evaluator.
pub(crate) struct ActorFacts<'a>(pub &'a DeviceActor);

fn json_path(
    root: &serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Option<serde_json::Value> {
    let mut parts = path.split('.');
    let mut node = root.get(parts.next()?)?;
    for part in parts {
        node = node.as_object()?.get(part)?;
    }
    Some(node.clone())
}

fn twin_path(doc: &TwinDoc, path: &str) -> Option<serde_json::Value> {
    doc.get(path)
}

impl DeviceFacts for ActorFacts<'_> {
    fn id(&self) -> &str {
        self.0.id.as_str()
    }
    fn online(&self) -> bool {
        self.0.is_online()
    }
    fn tag(&self, key: &str) -> Option<&str> {
        self.0.tags.get(key)
    }
    fn attribute(&self, path: &str) -> Option<serde_json::Value> {
        json_path(&self.0.attributes, path)
    }
    fn in_group(&self, group: &str) -> bool {
        self.0.settings.fleet.groups.contains(group, self, 0)
    }
    fn metric(&self, name: &str) -> Option<Value> {
        self.0.last_value(name)
    }
    fn reported(&self, path: &str) -> Option<serde_json::Value> {
        twin_path(&self.0.reported, path)
    }
    fn desired(&self, path: &str) -> Option<serde_json::Value> {
        twin_path(&self.0.desired, path)
    }
}

impl DeviceActor {
    /// Something the queries can read changed: tell the standing queries whose answer flipped.
    pub(crate) fn facts_changed(&mut self, what: Reads) {
        let fleet = self.settings.fleet.clone();
        if fleet.standing.is_empty() && self.matching.is_empty() {
            return;
        }
        for sq in fleet.standing.affected(Some(what)) {
            self.evaluate_standing(&sq);
        }
        // Queries that were dropped meanwhile.
        if !self.matching.is_empty() {
            let live: BTreeSet<u64> = fleet.standing.affected(None).iter().map(|q| q.id).collect();
            self.matching.retain(|id| live.contains(id));
        }
    }

    /// Evaluates one standing query and reports a change of the answer. Returns the answer.
    pub(crate) fn evaluate_standing(&mut self, sq: &StandingQuery) -> bool {
        let now = sq.query.matches(&ActorFacts(self));
        let before = self.matching.contains(&sq.id);
        if now != before {
            if now {
                self.matching.insert(sq.id);
            } else {
                self.matching.remove(&sq.id);
            }
            let _ = sq.changes.send(MatchChange {
                device: self.id.clone(),
                matches: now,
            });
        }
        now
    }

    /// The groups this device is in now.
    pub(crate) fn groups(&self) -> Vec<String> {
        let facts = ActorFacts(self);
        let mut names: Vec<String> = self
            .settings
            .fleet
            .groups
            .names()
            .into_iter()
            .filter(|g| self.settings.fleet.groups.contains(g, &facts, 0))
            .collect();
        names.sort();
        names
    }
}

/// A new standing query: evaluate it once and start tracking it. Answers whether it matches.
#[derive(Message)]
#[rtype(result = "bool")]
pub(crate) struct EvaluateStanding(pub Arc<StandingQuery>);

impl Handler<EvaluateStanding> for DeviceActor {
    type Result = bool;

    fn handle(&mut self, msg: EvaluateStanding, _: &mut Self::Context) -> bool {
        if self.matching.contains(&msg.0.id) {
            return true; // a change already reported it
        }
        let now = msg.0.query.matches(&ActorFacts(self));
        if now {
            self.matching.insert(msg.0.id);
        }
        now
    }
}

/// Something outside the actor changed what its queries may answer (a group was edited).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FactsChanged(pub Reads);

impl Handler<FactsChanged> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: FactsChanged, _: &mut Self::Context) {
        self.facts_changed(msg.0);
    }
}

/// Does the device match this query? Answers with its snapshot if it does.
#[derive(Message)]
#[rtype(result = "Option<crate::actor::Snapshot>")]
pub(crate) struct Evaluate(pub Query);

impl Handler<Evaluate> for DeviceActor {
    type Result = MessageResult<Evaluate>;

    fn handle(&mut self, msg: Evaluate, _: &mut Self::Context) -> Self::Result {
        if msg.0.matches(&ActorFacts(self)) {
            MessageResult(Some(self.snapshot()))
        } else {
            MessageResult(None)
        }
    }
}

/// Change tags and attributes.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub(crate) struct UpdateMeta {
    pub set_tags: BTreeMap<String, String>,
    pub remove_tags: Vec<String>,
    pub attributes_patch: Option<TwinPatch>,
}

impl Handler<UpdateMeta> for DeviceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;

    fn handle(&mut self, msg: UpdateMeta, _: &mut Self::Context) -> Self::Result {
        self.tags.update(msg.set_tags, &msg.remove_tags);
        if let Some(patch) = &msg.attributes_patch {
            merge_patch(&mut self.attributes, patch.as_map());
        }
        let write = self
            .store
            .update_device(&self.id, self.tags.to_map(), self.attributes.clone());
        self.facts_changed(Reads {
            tags: true,
            attributes: true,
            ..Default::default()
        });
        Box::pin(write)
    }
}

/// RFC 7386 JSON merge patch on a plain JSON object.
fn merge_patch(
    target: &mut serde_json::Map<String, serde_json::Value>,
    patch: &serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in patch {
        match v {
            serde_json::Value::Null => {
                target.remove(k);
            }
            serde_json::Value::Object(p) => {
                let slot = target
                    .entry(k.clone())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if !slot.is_object() {
                    *slot = serde_json::Value::Object(Default::default());
                }
                if let serde_json::Value::Object(t) = slot {
                    merge_patch(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// A copy of a device's facts, to decide a policy question away from its actor.
#[derive(Debug, Clone)]
pub(crate) struct OwnedFacts {
    pub id: String,
    pub online: bool,
    pub tags: BTreeMap<String, String>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub groups: Vec<String>,
    pub metrics: std::collections::HashMap<String, Value>,
    pub reported: TwinDoc,
    pub desired: TwinDoc,
}

impl DeviceFacts for OwnedFacts {
    fn id(&self) -> &str {
        &self.id
    }
    fn online(&self) -> bool {
        self.online
    }
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
    fn attribute(&self, path: &str) -> Option<serde_json::Value> {
        json_path(&self.attributes, path)
    }
    fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
    fn metric(&self, name: &str) -> Option<Value> {
        self.metrics.get(name).cloned()
    }
    fn reported(&self, path: &str) -> Option<serde_json::Value> {
        twin_path(&self.reported, path)
    }
    fn desired(&self, path: &str) -> Option<serde_json::Value> {
        twin_path(&self.desired, path)
    }
}

/// A copy of the device's facts.
#[derive(Message)]
#[rtype(result = "OwnedFacts")]
pub(crate) struct GetFacts;

impl Handler<GetFacts> for DeviceActor {
    type Result = MessageResult<GetFacts>;

    fn handle(&mut self, _: GetFacts, _: &mut Self::Context) -> Self::Result {
        MessageResult(OwnedFacts {
            id: self.id.to_string(),
            online: self.is_online(),
            tags: self.tags.to_map(),
            attributes: self.attributes.clone(),
            groups: self.groups(),
            metrics: self.metric_map(),
            reported: self.reported.clone(),
            desired: self.desired.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn tags_answer_like_the_map_they_were_made_from() {
        let source = map(&[("site", "north"), ("bench", "yes"), ("model", "x2")]);
        let tags = Tags::from(source.clone());
        for (k, v) in &source {
            assert_eq!(tags.get(k), Some(v.as_str()));
        }
        assert_eq!(tags.get("absent"), None);
        assert_eq!(tags.get(""), None);
        assert_eq!(tags.to_map(), source);
        assert_eq!(Tags::default().get("site"), None);
    }

    #[test]
    fn tag_updates_remove_then_set() {
        let mut tags = Tags::from(map(&[("a", "1"), ("b", "2"), ("c", "3")]));
        let removed = ["a".to_owned(), "c".to_owned(), "never-set".to_owned()];
        tags.update(map(&[("c", "30"), ("d", "4")]), &removed);
        assert_eq!(tags.to_map(), map(&[("b", "2"), ("c", "30"), ("d", "4")]));
        // still sorted: a key before every other is found
        tags.update(map(&[("0", "zero")]), &[]);
        assert_eq!(tags.get("0"), Some("zero"));
        assert_eq!(tags.get("d"), Some("4"));
    }
}
