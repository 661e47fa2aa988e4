//! The device-to-device bridge: topics (publish/subscribe with `+`/`#` filters and retained
//! messages), direct messages between devices (held for an offline target up to their TTL) and
//! device-to-device commands (through the target's command outbox). Every action is checked
//! against the policy with the facts of both devices, read from their actors; a denial is
//! answered with `PERMISSION_DENIED` and logged with both ids.
//!
//! Topic messages are delivered at most once: each connected subscriber has a bounded queue, and
//! a subscriber too slow to drain it loses messages (counted in the log) rather than slowing the
//! publisher. Direct messages are stored until delivered or expired.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use actix::Addr;
use fleetlink_core::DeviceId;
use fleetlink_core::policy::{Action, Decision, Policy, Target};
use fleetlink_core::presence::SessionId;
use fleetlink_core::topic::{Topic, TopicFilter, TopicIndex};
use fleetlink_proto::v1::{self, ErrorCode, ServerControl, server_control};
use fleetlink_store::{DirectRecord, NewCommand, RetainedRecord};

use crate::actor::DeviceActor;
use crate::facts::{GetFacts, OwnedFacts};
use crate::now_us;
use crate::session::Shared;

/// Messages a connected device's session writes on its control stream, from the bridge.
pub(crate) type BridgeSender = crate::outq::Sender;

/// Room in each session's bridge queue.
pub(crate) const BRIDGE_QUEUE: usize = 1_024;

/// The bridge's shared state.
#[derive(Debug, Default)]
pub(crate) struct Bridge {
    subscriptions: RwLock<TopicIndex<DeviceId>>,
    /// The bridge queue of every connected device, with its session.
    links: RwLock<HashMap<DeviceId, (SessionId, BridgeSender)>>,
    retained: RwLock<BTreeMap<Topic, v1::TopicMessage>>,
    policy: RwLock<Arc<Policy>>,
}

/// A refused bridge request.
#[derive(Debug)]
pub(crate) struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

fn refused(code: ErrorCode, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

impl Bridge {
    pub(crate) fn set_policy(&self, policy: Policy) {
        if let Ok(mut p) = self.policy.write() {
            *p = Arc::new(policy);
        }
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy.read().map(|p| p.clone()).unwrap_or_default()
    }

    pub(crate) fn load_retained(&self, records: Vec<RetainedRecord>) {
        let Ok(mut r) = self.retained.write() else {
            return;
        };
        for m in records {
            if let Ok(topic) = Topic::new(m.topic.clone()) {
                r.insert(
                    topic,
                    v1::TopicMessage {
                        topic: m.topic,
                        payload: m.payload,
                        from_device: m.from_device,
                        retained: true,
                        published_us: m.published_us,
                    },
                );
            }
        }
    }

    /// A session can receive bridge messages now.
    pub(crate) fn link(&self, device: &DeviceId, session: SessionId, tx: BridgeSender) {
        if let Ok(mut l) = self.links.write() {
            l.insert(device.clone(), (session, tx));
        }
        // A new connection starts with no subscriptions (the older one's end with it).
        if let Ok(mut subs) = self.subscriptions.write() {
            subs.remove_all(device);
        }
    }

    /// A session ended: its subscriptions end with it.
    pub(crate) fn unlink(&self, device: &DeviceId, session: SessionId) {
        let current = self
            .links
            .write()
            .map(|mut l| {
                if l.get(device).is_some_and(|(s, _)| *s == session) {
                    l.remove(device);
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if current && let Ok(mut subs) = self.subscriptions.write() {
            subs.remove_all(device);
        }
    }

    /// Hands `frame` to a connected device's session; false if it is not connected or too slow.
    pub(crate) fn send_to(&self, device: &DeviceId, frame: ServerControl) -> bool {
        let tx = match self.links.read() {
            Ok(l) => l.get(device).map(|(_, tx)| tx.clone()),
            Err(_) => None,
        };
        match tx {
            Some(tx) => match tx.try_send(Box::new(frame)) {
                Ok(()) => true,
                Err(crate::outq::TrySendError::Full(_)) => {
                    tracing::warn!(device = %device, "bridge queue full: a message to this device was dropped");
                    false
                }
                Err(crate::outq::TrySendError::Closed(_)) => false,
            },
            None => false,
        }
    }

    /// Delivers a topic message to every matching subscriber; returns how many got it.
    pub(crate) fn fan_out(&self, topic: &Topic, message: v1::TopicMessage) -> u64 {
        let subscribers = match self.subscriptions.read() {
            Ok(s) => s.subscribers(topic),
            Err(_) => return 0,
        };
        let mut delivered = 0;
        for device in subscribers {
            let frame = ServerControl {
                msg: Some(server_control::Msg::TopicMessage(message.clone())),
            };
            if self.send_to(&device, frame) {
                delivered += 1;
            }
        }
        delivered
    }
}

async fn facts(actor: &Addr<DeviceActor>) -> Result<OwnedFacts, Refused> {
    actor.send(GetFacts).await.map_err(|e| {
        refused(
            ErrorCode::Unavailable,
            format!("device actor unavailable: {e}"),
        )
    })
}

fn check(decision: Decision, action: Action, from: &DeviceId, target: &str) -> Result<(), Refused> {
    if decision.allowed {
        return Ok(());
    }
    tracing::warn!(from = %from, to = target, action = action.name(), reason = %decision.reason, "bridge action denied");
    Err(refused(
        ErrorCode::PermissionDenied,
        format!(
            "{from} may not {} {target}: {}",
            match action {
                Action::Publish => "publish to",
                Action::Subscribe => "subscribe to",
                Action::Message => "send a message to",
                Action::Command => "run a command on",
            },
            decision.reason
        ),
    ))
}

/// Room a ServerControl wrapper and its length prefix take around a bridge message.
const FRAME_OVERHEAD: usize = 16;

/// Refuses a message whose frame to the receiving device would exceed the frame limit.
fn check_fits(shared: &Shared, encoded_len: usize) -> Result<(), Refused> {
    let max = shared.config.max_frame_bytes as usize;
    if encoded_len + FRAME_OVERHEAD > max {
        return Err(refused(
            ErrorCode::FrameTooLarge,
            format!(
                "the message would be a {} byte frame to its receiver, above max_frame_bytes ({max}); send a smaller payload",
                encoded_len + FRAME_OVERHEAD
            ),
        ));
    }
    Ok(())
}

fn topic(s: &str) -> Result<Topic, Refused> {
    Topic::new(s).map_err(|e| refused(ErrorCode::InvalidArgument, e.to_string()))
}

fn filter(s: &str) -> Result<TopicFilter, Refused> {
    TopicFilter::new(s).map_err(|e| refused(ErrorCode::InvalidArgument, e.to_string()))
}

/// Publishes to a topic; `from` is `None` for an operator (trusted, no policy check).
pub(crate) async fn publish(
    shared: &Shared,
    from: Option<(&DeviceId, &Addr<DeviceActor>)>,
    topic_name: &str,
    payload: Vec<u8>,
    retain: bool,
) -> Result<u64, Refused> {
    let bridge = &shared.fleet.bridge;
    let topic = topic(topic_name)?;
    if let Some((id, actor)) = from {
        let me = facts(actor).await?;
        let decision =
            bridge
                .policy()
                .decide(Action::Publish, &me, &me.groups, Target::Topic(&topic));
        check(decision, Action::Publish, id, topic.as_str())?;
    }
    let from_device = from.map(|(id, _)| id.to_string()).unwrap_or_default();
    let message = v1::TopicMessage {
        topic: topic.to_string(),
        payload,
        from_device,
        retained: false,
        published_us: now_us(),
    };
    check_fits(shared, prost::Message::encoded_len(&message))?;
    if retain {
        let record = RetainedRecord {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            from_device: message.from_device.clone(),
            published_us: message.published_us,
        };
        shared
            .store
            .put_retained(record)
            .await
            .map_err(|e| refused(ErrorCode::Unavailable, e.to_string()))?;
        if let Ok(mut r) = bridge.retained.write() {
            if message.payload.is_empty() {
                r.remove(&topic);
            } else {
                let mut kept = message.clone();
                kept.retained = true;
                r.insert(topic.clone(), kept);
            }
        }
    }
    Ok(bridge.fan_out(&topic, message))
}

/// Subscribes a connected device; returns the retained messages its filter matches.
pub(crate) async fn subscribe(
    shared: &Shared,
    id: &DeviceId,
    actor: &Addr<DeviceActor>,
    filter_text: &str,
) -> Result<Vec<v1::TopicMessage>, Refused> {
    let bridge = &shared.fleet.bridge;
    let filter = filter(filter_text)?;
    let me = facts(actor).await?;
    let decision =
        bridge
            .policy()
            .decide(Action::Subscribe, &me, &me.groups, Target::Filter(&filter));
    check(decision, Action::Subscribe, id, filter.as_str())?;
    if let Ok(mut subs) = bridge.subscriptions.write() {
        subs.insert(&filter, id.clone());
    }
    let retained = bridge
        .retained
        .read()
        .map(|r| {
            r.iter()
                .filter(|(t, _)| filter.matches(t))
                .map(|(_, m)| m.clone())
                .collect()
        })
        .unwrap_or_default();
    Ok(retained)
}

pub(crate) fn unsubscribe(
    shared: &Shared,
    id: &DeviceId,
    filter_text: &str,
) -> Result<bool, Refused> {
    let filter = filter(filter_text)?;
    Ok(shared
        .fleet
        .bridge
        .subscriptions
        .write()
        .map(|mut s| s.remove(&filter, id))
        .unwrap_or(false))
}

/// The target's actor, after checking the policy for `action` from `id` to it.
async fn allowed_target(
    shared: &Shared,
    id: &DeviceId,
    actor: &Addr<DeviceActor>,
    action: Action,
    to: &str,
) -> Result<(DeviceId, Addr<DeviceActor>), Refused> {
    let to_id =
        DeviceId::new(to).map_err(|e| refused(ErrorCode::InvalidArgument, e.to_string()))?;
    let target = shared
        .registry
        .get_or_start(&to_id)
        .await
        .map_err(|e| match e {
            fleetlink_store::StoreError::UnknownDevice(_) => {
                refused(ErrorCode::NotFound, format!("unknown device \"{to_id}\""))
            }
            other => refused(ErrorCode::Unavailable, other.to_string()),
        })?;
    let me = facts(actor).await?;
    let them = facts(&target).await?;
    let decision = shared.fleet.bridge.policy().decide(
        action,
        &me,
        &me.groups,
        Target::Device(&them, &them.groups),
    );
    check(decision, action, id, to_id.as_str())?;
    Ok((to_id, target))
}

/// Longest TTL of a direct message.
const MAX_DIRECT_TTL_MS: u32 = 7 * 24 * 3_600 * 1_000;
/// TTL of a direct message sent without one.
const DEFAULT_DIRECT_TTL_MS: u32 = 3_600 * 1_000;

/// Stores a direct message for its target (which delivers it when it can); returns its id.
pub(crate) async fn send_direct(
    shared: &Shared,
    id: &DeviceId,
    actor: &Addr<DeviceActor>,
    request: v1::SendDirect,
) -> Result<u64, Refused> {
    if request.ttl_ms > MAX_DIRECT_TTL_MS {
        return Err(refused(
            ErrorCode::InvalidArgument,
            format!(
                "ttl_ms {} is above the maximum of {MAX_DIRECT_TTL_MS}",
                request.ttl_ms
            ),
        ));
    }
    let (to, target) =
        allowed_target(shared, id, actor, Action::Message, &request.to_device).await?;
    // the DirectMessage frame carries the payload, the sender and a few numbers
    check_fits(shared, request.payload.len() + id.as_str().len() + 32)?;
    let ttl = if request.ttl_ms == 0 {
        DEFAULT_DIRECT_TTL_MS
    } else {
        request.ttl_ms
    };
    let now = now_us();
    let record = DirectRecord {
        id: 0,
        to,
        from: id.clone(),
        payload: request.payload,
        sent_us: now,
        expires_us: now + i64::from(ttl) * 1_000,
    };
    target
        .send(crate::direct::QueueDirect(record))
        .await
        .map_err(|e| refused(ErrorCode::Unavailable, e.to_string()))?
        .map_err(|e| refused(ErrorCode::Unavailable, e.to_string()))
}

/// Queues a command on another device for `id`; its end is sent to `id` as a
/// DeviceCommandResult. Returns the command's id.
pub(crate) async fn device_command(
    shared: Arc<Shared>,
    id: &DeviceId,
    actor: &Addr<DeviceActor>,
    request: v1::DeviceCommand,
) -> Result<u64, Refused> {
    let (to, target) =
        allowed_target(&shared, id, actor, Action::Command, &request.to_device).await?;
    crate::command::check_command_name(&request.name)
        .map_err(|m| refused(ErrorCode::InvalidArgument, m))?;
    let args_json = if request.args_json.trim().is_empty() {
        "null".to_owned()
    } else {
        serde_json::from_str::<serde_json::Value>(&request.args_json)
            .map_err(|e| {
                refused(
                    ErrorCode::InvalidArgument,
                    format!("command arguments are not valid JSON: {e}"),
                )
            })?
            .to_string()
    };
    let now = now_us();
    let timeout_us = if request.timeout_ms == 0 {
        i64::try_from(shared.config.commands.default_timeout_s).unwrap_or(3_600) * 1_000_000
    } else {
        i64::from(request.timeout_ms) * 1_000
    };
    let new = NewCommand {
        device: to,
        name: request.name,
        args_json,
        idempotency_key: None,
        concurrent: false,
        created_us: now,
        deadline_us: now + timeout_us,
    };
    let submitted = target
        .send(crate::command::SubmitCommand { new, watch: true })
        .await
        .map_err(|e| refused(ErrorCode::Unavailable, e.to_string()))?
        .map_err(|e| refused(crate::operator::command_error_code(&e), e.to_string()))?;
    let command_id = submitted.record.id;
    let requester = id.clone();
    let request_id = request.request_id;
    tokio::spawn(async move {
        let done = match submitted.done {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        let done = match done {
            Some(d) => Some(d),
            None if submitted.record.state.is_terminal() => Some(submitted.record),
            None => shared.store.command(command_id).await.ok().flatten(),
        };
        let Some(done) = done else { return };
        let frame = ServerControl {
            msg: Some(server_control::Msg::DeviceCommandResult(
                v1::DeviceCommandResult {
                    request_id,
                    command_id,
                    state: crate::operator::command_state_to_proto(done.state).into(),
                    result_json: done.result_json.unwrap_or_default(),
                    error: done.error.unwrap_or_default(),
                },
            )),
        };
        if !shared.fleet.bridge.send_to(&requester, frame) {
            tracing::info!(device = %requester, command = command_id, "the requester of a device command is gone; its result stays readable by id");
        }
    });
    Ok(command_id)
}
