//! Operator live streams: one request stream per subscription, on which the server keeps writing
//! `Event`s. Events come from the bus (broadcast channels the actors publish to); a subscriber that
//! reads too slowly falls behind its channel and gets an `Overflow` event saying how many it
//! missed, so it never stalls the server or the devices. Streams scoped by a query keep the
//! matching set current through a standing query evaluated by the actors.

use std::collections::HashSet;
use std::sync::Arc;

use fleetlink_core::DeviceId;
use fleetlink_core::query::Query;
use fleetlink_proto::v1::{self, ErrorCode, OperatorResponse, operator_response, subscribe};
use fleetlink_transport::write_frame;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

use crate::facts::EvaluateStanding;
use crate::fleet::{BusEvent, MatchChange, StandingQuery};
use crate::now_us;
use crate::session::Shared;

fn event_frame(event: v1::event::Event) -> OperatorResponse {
    OperatorResponse {
        response: Some(operator_response::Response::Event(v1::Event {
            at_us: now_us(),
            event: Some(event),
        })),
    }
}

fn error_frame(code: ErrorCode, message: String) -> OperatorResponse {
    OperatorResponse {
        response: Some(operator_response::Response::Error(v1::Error {
            code: code.into(),
            message,
        })),
    }
}

/// Parses a stream's query; empty = every device.
pub(crate) fn parse_scope(query: &str) -> Result<Option<Query>, String> {
    if query.trim().is_empty() {
        return Ok(None);
    }
    Query::parse(query).map(Some).map_err(|e| e.to_string())
}

/// A standing query and the set of devices matching it now.
pub(crate) struct Scope {
    standing: Arc<StandingQuery>,
    changes: mpsc::UnboundedReceiver<MatchChange>,
    pub members: HashSet<DeviceId>,
    shared: Arc<Shared>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.shared.fleet.standing.remove(self.standing.id);
    }
}

impl Scope {
    /// Registers the query and asks every actor for its answer: the initial set.
    pub(crate) async fn open(shared: Arc<Shared>, query: Query) -> Scope {
        shared.actors_ready().await;
        let (standing, changes) = shared.fleet.standing.add(query);
        let mut asks = JoinSet::new();
        for (id, actor) in shared.registry.all_by_id() {
            let sq = standing.clone();
            asks.spawn(async move { (id, actor.send(EvaluateStanding(sq)).await) });
        }
        let mut members = HashSet::new();
        while let Some(answer) = asks.join_next().await {
            if let Ok((id, Ok(true))) = answer {
                members.insert(id);
            }
        }
        Scope {
            standing,
            changes,
            members,
            shared,
        }
    }

    /// Applies every change already reported. An actor reports a device entering before it
    /// publishes that device's later events, so applying these first never filters out an event
    /// of a device that had entered.
    fn apply_pending(&mut self) {
        while let Ok(change) = self.changes.try_recv() {
            if change.matches {
                self.members.insert(change.device);
            } else {
                self.members.remove(&change.device);
            }
        }
    }

    /// The next change of the set that actually changes it.
    pub(crate) async fn next_change(&mut self) -> Option<MatchChange> {
        loop {
            let change = self.changes.recv().await?;
            let changed = if change.matches {
                self.members.insert(change.device.clone())
            } else {
                self.members.remove(&change.device)
            };
            if changed {
                return Some(change);
            }
        }
    }
}

enum Kind {
    Telemetry(HashSet<String>),
    Presence,
    Twin,
    Commands,
    Jobs(u64),
    Matches,
}

/// Serves one Subscribe request until the operator stops the stream.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    request: v1::Subscribe,
    mut send: quinn::SendStream,
) {
    use subscribe::Stream;
    let bus = &shared.fleet.bus;
    let (kind, query, rx) = match request.stream {
        Some(Stream::Telemetry(t)) => (
            Kind::Telemetry(t.metrics.into_iter().collect()),
            t.query,
            bus.telemetry.subscribe(),
        ),
        Some(Stream::Presence(q)) => (Kind::Presence, q.query, bus.presence.subscribe()),
        Some(Stream::Twin(q)) => (Kind::Twin, q.query, bus.twin.subscribe()),
        Some(Stream::Commands(q)) => (Kind::Commands, q.query, bus.commands.subscribe()),
        Some(Stream::Jobs(j)) => (Kind::Jobs(j.job_id), String::new(), bus.jobs.subscribe()),
        Some(Stream::Query(q)) => (Kind::Matches, q.query, bus.presence.subscribe()),
        None => {
            let e = error_frame(
                ErrorCode::InvalidArgument,
                "Subscribe names no stream".into(),
            );
            let _ = write_frame(&mut send, &e).await;
            let _ = send.finish();
            return;
        }
    };
    let query = match parse_scope(&query) {
        Ok(q) => q,
        Err(e) => {
            let _ = write_frame(&mut send, &error_frame(ErrorCode::InvalidArgument, e)).await;
            let _ = send.finish();
            return;
        }
    };
    // A standing-query stream over every device still needs the actors' answers.
    let query = match (&kind, query) {
        (Kind::Matches, None) => Some(Query::all()),
        (_, q) => q,
    };
    let mut scope = match query {
        Some(q) => Some(Scope::open(shared.clone(), q).await),
        None => None,
    };
    let initial = scope.as_ref().map_or(0, |s| s.members.len());
    let subscribed = v1::event::Event::Subscribed(v1::Subscribed {
        initial_matches: u32::try_from(initial).unwrap_or(u32::MAX),
    });
    if write_frame(&mut send, &event_frame(subscribed))
        .await
        .is_err()
    {
        return;
    }
    if let (Kind::Matches, Some(s)) = (&kind, &scope) {
        let mut ids: Vec<&DeviceId> = s.members.iter().collect();
        ids.sort();
        for id in ids {
            let m = v1::event::Event::Match(v1::QueryMatch {
                device_id: id.to_string(),
                matches: true,
                initial: true,
            });
            if write_frame(&mut send, &event_frame(m)).await.is_err() {
                return;
            }
        }
    }
    tracing::debug!("operator subscription started");
    pump(&kind, rx, scope.as_mut(), &mut send).await;
    tracing::debug!("operator subscription ended");
}

/// Forwards events until the stream or the bus ends.
async fn pump(
    kind: &Kind,
    mut rx: broadcast::Receiver<Arc<BusEvent>>,
    mut scope: Option<&mut Scope>,
    send: &mut quinn::SendStream,
) {
    let matches_only = matches!(kind, Kind::Matches);
    loop {
        let frame = tokio::select! {
            change = async {
                match scope.as_mut() {
                    Some(s) => s.next_change().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(change) = change else { return };
                if !matches_only {
                    continue;
                }
                event_frame(v1::event::Event::Match(v1::QueryMatch {
                    device_id: change.device.to_string(),
                    matches: change.matches,
                    initial: false,
                }))
            }
            event = rx.recv(), if !matches_only => match event {
                Ok(event) => {
                    if let Some(s) = scope.as_mut() {
                        s.apply_pending();
                    }
                    let Some(frame) = filter(kind, &event, scope.as_deref()) else { continue };
                    frame
                }
                Err(broadcast::error::RecvError::Lagged(dropped)) => {
                    tracing::debug!(dropped, "slow operator subscription skipped events");
                    event_frame(v1::event::Event::Overflow(v1::Overflow { dropped }))
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = send.stopped() => return,
        };
        if write_frame(send, &frame).await.is_err() {
            return;
        }
    }
}

/// The frame for `event` if this subscription wants it.
fn filter(kind: &Kind, event: &BusEvent, scope: Option<&Scope>) -> Option<OperatorResponse> {
    if let (Some(scope), Some(device)) = (scope, &event.device)
        && !scope.members.contains(device)
    {
        return None;
    }
    let inner = event.event.event.as_ref()?;
    match (kind, inner) {
        (Kind::Telemetry(metrics), v1::event::Event::Telemetry(t)) if !metrics.is_empty() => {
            let points: Vec<_> = t
                .points
                .iter()
                .filter(|p| metrics.contains(&p.metric))
                .cloned()
                .collect();
            if points.is_empty() {
                return None;
            }
            Some(event_frame(v1::event::Event::Telemetry(
                v1::TelemetryEvent {
                    device_id: t.device_id.clone(),
                    points,
                },
            )))
        }
        (Kind::Jobs(id), v1::event::Event::Job(j)) if *id != 0 && j.job_id != *id => None,
        _ => Some(OperatorResponse {
            response: Some(operator_response::Response::Event(event.event.clone())),
        }),
    }
}
