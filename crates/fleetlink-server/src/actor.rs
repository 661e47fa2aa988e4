//! `DeviceActor`: one per device, owner of its live state (presence, last values, sequence window).
//! Sessions talk to it with bounded `send`s; it hands accepted batches to the store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use fleetlink_core::command::{CommandId, CommandOutbox, OutboxLimits};
use fleetlink_core::presence::{OfflineReason, Presence, PresenceChange, SessionId};
use fleetlink_core::seq::{SeqRegression, SeqVerdict, SeqWindow};
use fleetlink_core::twin::TwinDoc;
use fleetlink_core::value::{Batch, MetricTypes, ValueError};
use fleetlink_core::{DeviceId, MetricName, Point, TimeUs, Value};
use fleetlink_proto::v1::ErrorCode;
use fleetlink_store::{
    AppendBatch, CommandRecord, DurabilityListener, MetricValue, PresenceRecord, Store, StoreError,
    StoredTwin,
};
use tokio::sync::oneshot;

use crate::now_us;

/// Why the actor wants a session closed.
#[derive(Debug, Clone)]
pub(crate) struct Kick {
    pub code: ErrorCode,
    pub message: String,
}

/// What every device actor is configured with.
#[derive(Debug, Clone)]
pub(crate) struct ActorSettings {
    /// Groups, standing queries and the event bus, shared by every actor.
    pub fleet: Arc<crate::fleet::Fleet>,
    pub heartbeat_timeout: Duration,
    pub outbox_limits: OutboxLimits,
    /// See `CommandsConfig::delivery_write_delay_ms`.
    pub delivery_write_delay: Duration,
    pub max_frame_bytes: u32,
    /// The QUIC IO runtime: command streams are served there.
    pub io: tokio::runtime::Handle,
    /// Wakes the sessions whose devices' batches became durable.
    pub durable_wakeups: Arc<DurableWakeups>,
}

/// Wakes the sessions waiting on their devices' durable watermarks, from the server's runtime.
///
/// The store's writer thread raises the watermarks of a commit's devices and queues them here,
/// and one task on the runtime wakes their waiters. Waking each waiter from the writer thread cost
/// a cross-thread wake-up per device and commit (on a current-thread runtime, an `eventfd` write
/// each): now it is one per commit.
#[derive(Debug, Default)]
pub(crate) struct DurableWakeups {
    raised: std::sync::Mutex<Vec<Arc<DurableSeq>>>,
    ready: tokio::sync::Notify,
}

impl DurableWakeups {
    /// Starts the waking task on the current runtime.
    pub(crate) fn start() -> Arc<Self> {
        let this = Arc::new(Self::default());
        let hub = this.clone();
        tokio::spawn(async move {
            let mut raised = Vec::new();
            loop {
                hub.ready.notified().await;
                std::mem::swap(&mut raised, &mut *hub.lock());
                for durable in raised.drain(..) {
                    durable.grew.notify_waiters();
                }
            }
        });
        this
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<DurableSeq>>> {
        // a push or a swap cannot leave the vector half-changed
        self.raised
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn raise(&self, durable: Arc<DurableSeq>) {
        let first = {
            let mut raised = self.lock();
            raised.push(durable);
            raised.len() == 1
        };
        if first {
            // the task is woken once per batch of raises (a permit if it is busy)
            self.ready.notify_one();
        }
    }
}

/// What an actor loads from the store when it starts.
#[derive(Debug)]
pub(crate) struct StoredState {
    /// The latest stored presence event, to know since when an offline device is offline.
    pub last_presence: Option<PresenceRecord>,
    pub pending_direct: Vec<fleetlink_store::DirectRecord>,
    pub tags: std::collections::BTreeMap<String, String>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub last_seq: u64,
    pub last_values: Vec<MetricValue>,
    pub twin: StoredTwin,
    pub open_commands: Vec<CommandRecord>,
}

/// The session a device is reachable through once its Welcome is sent.
#[derive(Debug)]
pub(crate) struct Link {
    pub session: SessionId,
    pub conn: quinn::Connection,
    /// The device's Hello set `early_command_fin`: a command stream's server side ends with the
    /// request.
    pub early_command_fin: bool,
    /// The latest twin delta; the session writes every change of it to the control stream.
    pub delta: crate::outq::DeltaSender,
}

/// A map keyed by what devices send: foldhash, not SipHash (a device's maps are looked up for
/// every batch it sends).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Per metric, the time and value of its latest point.
type LastValues = FastMap<MetricName, (TimeUs, Value)>;

/// The live state of one device.
pub(crate) struct DeviceActor {
    pub(crate) id: DeviceId,
    pub(crate) store: Arc<dyn Store>,
    presence: Presence,
    seq: SeqWindow,
    types: MetricTypes,
    last_values: LastValues,
    durable: Arc<DurableSeq>,
    session_kick: Option<oneshot::Sender<Kick>>,
    /// The session closed for a refused posted batch: its later batches are refused too.
    refused: Option<SessionId>,
    /// When the current session last heard a heartbeat (µs since the epoch; 0 = not yet),
    /// written by the session itself: a heartbeat costs no message to the actor, which folds it
    /// into `presence` when it needs it ([`Self::fold_heard`]).
    heard: Arc<AtomicI64>,
    pub(crate) settings: Arc<ActorSettings>,
    pub(crate) reported: TwinDoc,
    pub(crate) desired: TwinDoc,
    pub(crate) link: Option<Link>,
    pub(crate) outbox: CommandOutbox,
    /// Unfinished commands, by id.
    pub(crate) open: HashMap<CommandId, CommandRecord>,
    /// Commands written to the device now: dropping the sender cancels the delivery.
    pub(crate) in_flight: HashMap<CommandId, tokio::sync::oneshot::Sender<()>>,
    /// Finished commands whose final state is not durable yet, and who waits for them.
    pub(crate) settling: HashMap<CommandId, crate::command::Settling>,
    /// Operators waiting for an unfinished command.
    pub(crate) waiters: HashMap<CommandId, Vec<tokio::sync::oneshot::Sender<CommandRecord>>>,
    /// The pending expiry timer: (deadline it fires for, handle).
    pub(crate) expiry: Option<(TimeUs, SpawnHandle)>,
    /// The heartbeat-timeout check, which runs only while the device is online: an offline
    /// device (most of a large fleet's, at times) costs no timer.
    heartbeat_check: Option<SpawnHandle>,
    pub(crate) tags: crate::facts::Tags,
    pub(crate) attributes: serde_json::Map<String, serde_json::Value>,
    /// Standing queries this device matches now.
    pub(crate) matching: std::collections::HashSet<u64>,
    /// Direct messages waiting for this device, oldest first.
    pub(crate) pending_direct: Vec<fleetlink_store::DirectRecord>,
    /// Commands being written to the store, not yet in the outbox (they count against its limit).
    pub(crate) submitting: usize,
}

impl std::fmt::Debug for DeviceActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceActor")
            .field("id", &self.id)
            .field("presence", &self.presence)
            .finish_non_exhaustive()
    }
}

/// The device's durable watermark, written by the store writer, read by the actor and watched by
/// the device's session ([`DurableWatch`]) for its acks. An atomic and one `Notify`: every
/// provisioned device has one, and a tokio `watch` channel would be ~340 bytes.
#[derive(Debug)]
pub(crate) struct DurableSeq {
    seq: AtomicU64,
    /// With ack coalescing, the session acks at once once `seq` reaches this (a batch's
    /// `ack_now`, a heartbeat's `ack_through`; protocol §5). Written by the session's readers,
    /// read by its writer.
    ack_through: AtomicU64,
    grew: tokio::sync::Notify,
    actor: std::sync::OnceLock<Recipient<StorageFailed>>,
    /// Wakes `grew`'s waiters on the runtime; without it, the store's thread wakes them.
    wakeups: Option<Arc<DurableWakeups>>,
    me: std::sync::Weak<DurableSeq>,
}

impl DurableSeq {
    fn new(seq: u64, wakeups: Option<Arc<DurableWakeups>>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            seq: AtomicU64::new(seq),
            ack_through: AtomicU64::new(0),
            grew: tokio::sync::Notify::new(),
            actor: std::sync::OnceLock::new(),
            wakeups,
            me: me.clone(),
        })
    }

    pub(crate) fn get(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// The device wants every batch up to `seq` acked as soon as it is stored. Called before
    /// the batch is handed to the actor, so the writer sees it when the watermark reaches `seq`.
    pub(crate) fn ack_now(&self, seq: u64) {
        self.ack_through.fetch_max(seq, Ordering::AcqRel);
    }

    /// The highest sequence number the device wants acked without delay.
    pub(crate) fn ack_through(&self) -> u64 {
        self.ack_through.load(Ordering::Acquire)
    }
}

/// A session's watch on its device's [`DurableSeq`]: what it has seen so far.
#[derive(Debug)]
pub(crate) struct DurableWatch {
    durable: Arc<DurableSeq>,
    seen: u64,
}

impl DurableWatch {
    pub(crate) fn new(durable: Arc<DurableSeq>) -> Self {
        let seen = durable.get();
        Self { durable, seen }
    }

    /// The device's watermark itself (for the session's readers).
    pub(crate) fn seq(&self) -> &Arc<DurableSeq> {
        &self.durable
    }

    /// The last watermark returned.
    pub(crate) fn seen(&self) -> u64 {
        self.seen
    }

    /// The watermark now, marked as seen.
    pub(crate) fn current(&mut self) -> u64 {
        self.seen = self.seen.max(self.durable.get());
        self.seen
    }

    /// Waits until the watermark is at least `seq`. Cancel safe.
    pub(crate) async fn reaches(&mut self, seq: u64) {
        while self.current() < seq {
            self.wait_above(self.seen).await;
        }
    }

    /// Waits until the watermark moves past what was seen, and returns it (marked as seen).
    /// Cancel safe.
    pub(crate) async fn changed(&mut self) -> u64 {
        let seen = self.seen;
        self.wait_above(seen).await;
        self.current()
    }

    async fn wait_above(&self, seen: u64) {
        loop {
            let grew = self.durable.grew.notified();
            tokio::pin!(grew);
            // registered before the check: an advance after it wakes us
            grew.as_mut().enable();
            if self.durable.get() > seen {
                return;
            }
            grew.await;
        }
    }
}

impl DurabilityListener for DurableSeq {
    fn durable(&self, seq: u64) {
        if self.seq.fetch_max(seq, Ordering::AcqRel) < seq {
            match (&self.wakeups, self.me.upgrade()) {
                (Some(wakeups), Some(me)) => wakeups.raise(me),
                _ => self.grew.notify_waiters(),
            }
        }
    }

    fn failed(&self, seq: u64, error: &StoreError) {
        if let Some(actor) = self.actor.get() {
            // Rare; the actor must learn it even when its mailbox is full.
            actor.do_send(StorageFailed {
                seq,
                error: error.to_string(),
            });
        }
    }
}

/// Presence after a restart, from the latest stored event. A device whose latest event says
/// online was connected when the server stopped without recording it (a crash): it is offline
/// since then, reason `server_shutdown`.
fn restored_presence(last: Option<PresenceRecord>) -> Presence {
    let Some(e) = last else {
        return Presence::new();
    };
    let reason = if e.online {
        OfflineReason::ServerShutdown
    } else {
        OfflineReason::parse(&e.reason).unwrap_or(OfflineReason::Closed)
    };
    let remote = (!e.remote_addr.is_empty()).then_some(e.remote_addr);
    Presence::offline(e.at_us, reason, e.at_us, remote)
}

impl DeviceActor {
    pub(crate) fn new(
        id: DeviceId,
        store: Arc<dyn Store>,
        stored: StoredState,
        settings: Arc<ActorSettings>,
    ) -> Self {
        let StoredState {
            last_presence,
            pending_direct,
            tags,
            attributes,
            last_seq,
            last_values: last,
            twin,
            open_commands,
        } = stored;
        let mut outbox = CommandOutbox::new();
        let mut open = HashMap::new();
        for c in open_commands {
            outbox.push(c.id, c.concurrent, c.deadline_us);
            open.insert(c.id, c);
        }
        let mut types = MetricTypes::default();
        let mut last_values = LastValues::default();
        for v in last {
            types.insert(v.metric.clone(), v.value.kind());
            last_values.insert(v.metric, (v.time_us, v.value));
        }
        Self {
            id,
            store,
            presence: restored_presence(last_presence),
            seq: SeqWindow::new(last_seq),
            types,
            last_values,
            durable: DurableSeq::new(last_seq, Some(settings.durable_wakeups.clone())),
            session_kick: None,
            refused: None,
            heard: Arc::new(AtomicI64::new(0)),
            settings,
            reported: twin.reported,
            desired: twin.desired,
            link: None,
            outbox,
            open,
            in_flight: HashMap::new(),
            settling: HashMap::new(),
            waiters: HashMap::new(),
            expiry: None,
            tags: tags.into(),
            attributes,
            matching: std::collections::HashSet::new(),
            pending_direct,
            submitting: 0,
            heartbeat_check: None,
        }
    }

    /// Starts the periodic heartbeat-timeout check unless it runs already; it stops itself at
    /// the first tick that finds the device offline.
    fn check_heartbeats(&mut self, ctx: &mut Context<Self>) {
        if self.heartbeat_check.is_some() {
            return;
        }
        let every = (self.settings.heartbeat_timeout / 4).max(Duration::from_millis(10));
        self.heartbeat_check = Some(ctx.run_interval(every, |actor, ctx| {
            let timeout_us = actor.settings.heartbeat_timeout.as_micros() as i64;
            actor.fold_heard();
            let change = actor.presence.check_timeout(now_us(), timeout_us);
            if change.is_some() {
                actor.kick(
                    ErrorCode::HeartbeatTimeout,
                    format!(
                        "no heartbeat for {} ms; reconnect",
                        actor.settings.heartbeat_timeout.as_millis()
                    ),
                );
            }
            actor.went_offline(change);
            if actor.presence.session().is_none()
                && let Some(check) = actor.heartbeat_check.take()
            {
                ctx.cancel_future(check);
            }
        }));
    }

    /// Brings `presence` up to date with the current session's heartbeats.
    fn fold_heard(&mut self) {
        let heard = self.heard.load(Ordering::Relaxed);
        if let (true, Some(session)) = (heard > 0, self.presence.session()) {
            self.presence.seen(session, heard);
        }
    }

    /// The session the device is online with.
    pub(crate) fn presence_session(&self) -> Option<SessionId> {
        self.presence.session()
    }

    fn sync_durable(&mut self) {
        let durable = self.durable.get();
        self.seq.mark_durable(durable);
    }

    fn kick(&mut self, code: ErrorCode, message: String) {
        if let Some(kick) = self.session_kick.take() {
            let _ = kick.send(Kick { code, message });
        }
    }

    fn went_offline(&mut self, change: Option<PresenceChange>) {
        if let Some(PresenceChange::Offline { session, reason }) = change {
            tracing::info!(device = %self.id, session, reason = reason.name(), "device offline");
            let remote = self.presence.remote_addr().unwrap_or_default().to_owned();
            self.record_presence(false, session, reason.name(), remote);
            self.unlink(session);
        }
    }

    /// Appends to the stored connection history (queued in order; failures are logged), tells
    /// presence subscribers and re-evaluates the standing queries that read presence.
    fn record_presence(&mut self, online: bool, session: SessionId, reason: &str, remote: String) {
        let record = PresenceRecord {
            online,
            at_us: now_us(),
            reason: reason.to_owned(),
            remote_addr: remote,
            session,
        };
        crate::fleet::publish(&self.settings.fleet.bus.presence, Some(&self.id), || {
            fleetlink_proto::v1::event::Event::Presence(fleetlink_proto::v1::PresenceChange {
                device_id: self.id.to_string(),
                event: Some(crate::operator::presence_event(&record)),
            })
        });
        let write = self.store.record_presence(&self.id, record);
        self.facts_changed(fleetlink_core::query::Reads {
            presence: true,
            ..Default::default()
        });
        let device = self.id.clone();
        actix::spawn(async move {
            if let Err(error) = write.await {
                tracing::error!(%device, %error, "cannot store a presence event");
            }
        });
    }

    /// The session is gone: commands written on it will be written again on the next one.
    fn unlink(&mut self, session: SessionId) {
        if self.link.as_ref().is_some_and(|l| l.session == session) {
            self.link = None;
            self.outbox.connection_lost();
            self.in_flight.clear(); // their streams die with the connection
        }
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(64);
        let _ = self.durable.actor.set(ctx.address().recipient());
        self.schedule_expiry(ctx);
        // A device that appears after a standing query was registered joins it now.
        for sq in self.settings.fleet.standing.affected(None) {
            self.evaluate_standing(&sq);
        }
        let waiting: Vec<(u64, i64)> = self
            .pending_direct
            .iter()
            .map(|m| (m.id, m.expires_us))
            .collect();
        for (id, expires_us) in waiting {
            self.expire_direct_later(id, expires_us, ctx);
        }
        if self.presence.session().is_some() {
            self.check_heartbeats(ctx);
        }
    }
}

/// A session authenticated as this device.
#[derive(Message)]
#[rtype(result = "Attached")]
pub(crate) struct Attach {
    pub session: SessionId,
    pub remote: SocketAddr,
    pub kick: oneshot::Sender<Kick>,
}

/// What a new session needs.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Highest batch handed to storage when the session attached; the Welcome waits until it is durable.
    pub accepted: u64,
    /// The durable watermark, for acks.
    pub durable: DurableWatch,
    /// Where the session notes the time of each heartbeat (µs since the epoch).
    pub heard: Arc<AtomicI64>,
}

impl Handler<Attach> for DeviceActor {
    type Result = MessageResult<Attach>;

    fn handle(&mut self, msg: Attach, ctx: &mut Self::Context) -> Self::Result {
        self.sync_durable();
        self.check_heartbeats(ctx);
        let change = self
            .presence
            .connect(msg.session, msg.remote.to_string(), now_us());
        if let PresenceChange::Online {
            replaced: Some(old),
        } = change
        {
            tracing::info!(device = %self.id, old_session = old, session = msg.session, "device reconnected; closing its older connection");
            self.kick(
                ErrorCode::Replaced,
                "another connection authenticated as this device".into(),
            );
            self.record_presence(false, old, OfflineReason::Kicked.name(), String::new());
            self.unlink(old);
        }
        self.record_presence(true, msg.session, "", msg.remote.to_string());
        self.session_kick = Some(msg.kick);
        // A fresh cell per session: a replaced session's late heartbeats do not count.
        self.heard = Arc::new(AtomicI64::new(0));
        self.seq.start_session();
        tracing::info!(device = %self.id, session = msg.session, remote = %msg.remote, "device online");
        MessageResult(Attached {
            accepted: self.seq.accepted(),
            durable: DurableWatch::new(self.durable.clone()),
            heard: self.heard.clone(),
        })
    }
}

/// A session ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Detach {
    pub session: SessionId,
    pub reason: OfflineReason,
}

impl Handler<Detach> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: Detach, _: &mut Self::Context) {
        let change = self.presence.disconnect(msg.session, msg.reason, now_us());
        if change.is_some() {
            self.session_kick = None;
        }
        self.went_offline(change);
    }
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    #[error(transparent)]
    Regression(#[from] SeqRegression),
    #[error(transparent)]
    Invalid(#[from] ValueError),
    #[error("this connection was replaced by a newer one of the same device")]
    NotCurrent,
    #[error("storage is unavailable: {0}")]
    Store(#[from] StoreError),
}

impl IngestError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            IngestError::Regression(_) => ErrorCode::SequenceRegression,
            IngestError::Invalid(_) => ErrorCode::InvalidValue,
            IngestError::NotCurrent => ErrorCode::Replaced,
            IngestError::Store(_) => ErrorCode::Unavailable,
        }
    }
}

/// A validated batch from a session.
#[derive(Message)]
#[rtype(result = "Result<(), IngestError>")]
pub(crate) struct Ingest {
    pub session: SessionId,
    pub batch: Batch,
    /// Sent without waiting for the answer ([`Addr::try_send`]): the actor itself closes the
    /// session if it refuses the batch, and refuses every later batch of that session.
    pub posted: bool,
}

impl Handler<Ingest> for DeviceActor {
    type Result = IngestResponse;

    fn handle(&mut self, msg: Ingest, _: &mut Self::Context) -> Self::Result {
        let (posted, session) = (msg.posted, msg.session);
        let response = self.ingest(msg);
        if posted && let IngestResponse::Ready(Err(e)) = &response {
            self.refuse_posted(session, e);
        }
        response
    }
}

impl DeviceActor {
    fn ingest(&mut self, msg: Ingest) -> IngestResponse {
        let now = now_us();
        let ready = IngestResponse::Ready;
        if self.refused == Some(msg.session) || !self.presence.seen(msg.session, now) {
            return ready(Err(IngestError::NotCurrent));
        }
        self.sync_durable();
        let seq = msg.batch.seq;
        match self.seq.classify(seq) {
            Err(e) => return ready(Err(e.into())),
            Ok(SeqVerdict::Duplicate) => {
                tracing::debug!(device = %self.id, seq, "duplicate batch dropped");
                let _ = self.seq.offer(seq);
                return ready(Ok(()));
            }
            Ok(SeqVerdict::Accept) => {}
        }
        if let Err(e) = self.types.check(&msg.batch) {
            return ready(Err(e.into()));
        }
        let _ = self.seq.offer(seq);
        update_last_values(&mut self.last_values, &msg.batch.points);
        crate::fleet::publish(&self.settings.fleet.bus.telemetry, Some(&self.id), || {
            fleetlink_proto::v1::event::Event::Telemetry(fleetlink_proto::v1::TelemetryEvent {
                device_id: self.id.to_string(),
                points: msg
                    .batch
                    .points
                    .iter()
                    .map(fleetlink_core::Point::to_proto)
                    .collect(),
            })
        });
        self.facts_changed(fleetlink_core::query::Reads {
            metrics: true,
            ..Default::default()
        });
        let job = AppendBatch {
            device: self.id.clone(),
            batch: msg.batch,
            received_us: now,
            listener: self.durable.clone(),
        };
        match self.store.try_append(job) {
            Ok(None) => ready(Ok(())),
            Err(e) => ready(Err(e.into())),
            Ok(Some(job)) => {
                let store = self.store.clone();
                let (posted, session) = (msg.posted, msg.session);
                IngestResponse::WaitForRoom(AtomicResponse::new(Box::pin(
                    async move { store.append(job).await.map_err(IngestError::from) }
                        .into_actor(self)
                        .map(move |result, act, _| {
                            if posted && let Err(e) = &result {
                                act.refuse_posted(session, e);
                            }
                            result
                        }),
                )))
            }
        }
    }

    /// A posted batch of `session` was refused: nobody waits for the answer, so the actor
    /// closes the session with the error itself (the code and message a session closes with when
    /// its awaited batch is refused), and refuses the batches it posted after that one. A session
    /// that is no longer current was closed when its successor attached.
    fn refuse_posted(&mut self, session: SessionId, e: &IngestError) {
        if matches!(e, IngestError::NotCurrent) || self.presence.session() != Some(session) {
            return;
        }
        tracing::warn!(device = %self.id, session, code = e.code().as_str_name(), error = %e, "closing device connection on a refused batch");
        self.refused = Some(session);
        self.kick(e.code(), e.to_string());
    }
}

/// The answer to an [`Ingest`]: at once when the store's queue had room (the common case: no
/// future to allocate and poll), else once it has. Waiting is atomic: the actor handles no other
/// message until the batch is queued, so a full store slows the device's stream down instead of
/// growing a queue, and batches reach the store in the order they were accepted.
pub(crate) enum IngestResponse {
    Ready(Result<(), IngestError>),
    WaitForRoom(AtomicResponse<DeviceActor, Result<(), IngestError>>),
}

impl actix::dev::MessageResponse<DeviceActor, Ingest> for IngestResponse {
    fn handle(
        self,
        ctx: &mut Context<DeviceActor>,
        tx: Option<actix::dev::OneshotSender<Result<(), IngestError>>>,
    ) {
        match self {
            Self::Ready(r) => {
                if let Some(tx) = tx {
                    let _ = tx.send(r);
                }
            }
            Self::WaitForRoom(wait) => <AtomicResponse<_, _> as actix::dev::MessageResponse<
                DeviceActor,
                Ingest,
            >>::handle(wait, ctx, tx),
        }
    }
}

/// Keeps, per metric, the value of the latest point (by time; of equal times, the later one in
/// the batch). A small batch (the usual: a slow device's one or few points) is applied point by
/// point, with no map of its own. A large one is first reduced to its latest point per metric,
/// so that a value is copied once per metric it carries, not per point: a batch is often
/// hundreds of points of one metric, and string values are copied on the heap.
fn update_last_values(last: &mut LastValues, points: &[Point]) {
    if points.len() <= SMALL_BATCH_POINTS {
        for p in points {
            keep_if_latest(last, p);
        }
        return;
    }
    // metric → index of its latest point in the batch
    let mut latest: FastMap<&MetricName, usize> = FastMap::default();
    for (i, p) in points.iter().enumerate() {
        let at = latest.entry(&p.metric).or_insert(i);
        if p.time_us >= points[*at].time_us {
            *at = i;
        }
    }
    for at in latest.into_values() {
        keep_if_latest(last, &points[at]);
    }
}

/// Batches of at most this many points update the last values point by point.
const SMALL_BATCH_POINTS: usize = 8;

fn keep_if_latest(last: &mut LastValues, p: &Point) {
    match last.get_mut(&p.metric) {
        Some(slot) => {
            if p.time_us >= slot.0 {
                *slot = (p.time_us, p.value.clone());
            }
        }
        None => {
            last.insert(p.metric.clone(), (p.time_us, p.value.clone()));
        }
    }
}

/// The store could not commit a batch of this device.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StorageFailed {
    seq: u64,
    error: String,
}

impl Handler<StorageFailed> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: StorageFailed, _: &mut Self::Context) {
        tracing::error!(device = %self.id, seq = msg.seq, error = %msg.error, "batch not stored; asking the device to resend");
        self.sync_durable();
        self.seq.rollback_to_durable();
        self.kick(
            ErrorCode::Unavailable,
            format!("storage failed ({}); reconnect and resend", msg.error),
        );
    }
}

/// A copy of the live state.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub presence: Presence,
    pub last_values: Vec<MetricValue>,
    pub durable_seq: u64,
    pub tags: std::collections::BTreeMap<String, String>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub groups: Vec<String>,
}

#[derive(Message)]
#[rtype(result = "Snapshot")]
pub(crate) struct GetSnapshot;

impl Handler<GetSnapshot> for DeviceActor {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, _: GetSnapshot, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.snapshot())
    }
}

impl DeviceActor {
    pub(crate) fn snapshot(&mut self) -> Snapshot {
        self.sync_durable();
        self.fold_heard();
        let mut last_values: Vec<MetricValue> = self
            .last_values
            .iter()
            .map(|(m, (t, v))| MetricValue {
                metric: m.clone(),
                time_us: *t,
                value: v.clone(),
            })
            .collect();
        last_values.sort_by(|a, b| a.metric.cmp(&b.metric));
        Snapshot {
            presence: self.presence.clone(),
            last_values,
            durable_seq: self.seq.durable(),
            tags: self.tags.to_map(),
            attributes: self.attributes.clone(),
            groups: self.groups(),
        }
    }

    pub(crate) fn is_online(&self) -> bool {
        self.presence.is_online()
    }

    /// The latest value of every metric, by name.
    pub(crate) fn metric_map(&self) -> HashMap<String, Value> {
        self.last_values
            .iter()
            .map(|(m, (_, v))| (m.to_string(), v.clone()))
            .collect()
    }

    /// The latest value of a metric.
    pub(crate) fn last_value(&self, name: &str) -> Option<Value> {
        let name = MetricName::new(name).ok()?;
        self.last_values.get(&name).map(|(_, v)| v.clone())
    }
}

/// The server is stopping: every session goes offline with reason `server_shutdown`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Shutdown;

impl Handler<Shutdown> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) {
        if let Some(session) = self.presence.session() {
            let change = self
                .presence
                .disconnect(session, OfflineReason::ServerShutdown, now_us());
            self.went_offline(change);
        }
        // Deliveries still inside their write delay: written now, so the next start finds them.
        for record in self.open.values() {
            if record.state == fleetlink_core::command::CommandState::Delivered {
                self.persist(crate::command::update_of(record));
            }
        }
        self.kick(
            ErrorCode::ShuttingDown,
            "the server is shutting down; reconnect later".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(metric: &str, time_us: TimeUs, v: i64) -> Point {
        Point {
            metric: MetricName::new(metric).expect("valid"),
            time_us,
            value: Value::Int(v),
        }
    }

    fn get(last: &LastValues, metric: &str) -> (TimeUs, Value) {
        last[&MetricName::new(metric).expect("valid")].clone()
    }

    #[test]
    fn last_values_keep_the_latest_point_of_each_metric() {
        let mut last = LastValues::default();
        // out of order in the batch; of two points at the same time, the later one in the batch
        update_last_values(
            &mut last,
            &[
                p("speed", 30, 3),
                p("rpm", 5, 50),
                p("speed", 10, 1),
                p("speed", 30, 4),
                p("speed", 20, 2),
            ],
        );
        assert_eq!(last.len(), 2);
        assert_eq!(get(&last, "speed"), (30, Value::Int(4)));
        assert_eq!(get(&last, "rpm"), (5, Value::Int(50)));
        // a later batch with older points (buffered history) does not replace newer values;
        // one at the same time does, as a later point would
        update_last_values(&mut last, &[p("speed", 25, 9), p("rpm", 5, 51)]);
        assert_eq!(get(&last, "speed"), (30, Value::Int(4)));
        assert_eq!(get(&last, "rpm"), (5, Value::Int(51)));
        // the same rule for a batch reduced to its latest point per metric first
        let mut large = vec![p("speed", 40, 5), p("rpm", 1, 60), p("speed", 50, 6)];
        large.extend((0..SMALL_BATCH_POINTS as i64).map(|i| p("temp", 7, i)));
        large.extend([p("speed", 50, 7), p("speed", 45, 8)]);
        assert!(large.len() > SMALL_BATCH_POINTS);
        update_last_values(&mut last, &large);
        assert_eq!(get(&last, "speed"), (50, Value::Int(7)));
        assert_eq!(get(&last, "rpm"), (5, Value::Int(51)));
        assert_eq!(
            get(&last, "temp"),
            (7, Value::Int(SMALL_BATCH_POINTS as i64 - 1))
        );
        // many metrics in one batch
        let many: Vec<Point> = (0..500).map(|i| p(&format!("m{i}"), i, i)).collect();
        update_last_values(&mut last, &many);
        assert_eq!(last.len(), 503);
        assert_eq!(get(&last, "m499"), (499, Value::Int(499)));
    }

    #[tokio::test]
    async fn a_durable_watch_wakes_on_every_advance_and_sees_the_latest() {
        durable_watch_wakes(None).await;
    }

    /// The same through the runtime's waking task, with the watermarks raised from another
    /// thread, as the store's writer does.
    #[tokio::test]
    async fn a_durable_watch_wakes_through_the_runtime_when_another_thread_raises_it() {
        durable_watch_wakes(Some(DurableWakeups::start())).await;
        // many devices raised in one go, from the writer's thread: every waiter wakes
        let wakeups = DurableWakeups::start();
        let seqs: Vec<Arc<DurableSeq>> = (0..100)
            .map(|_| DurableSeq::new(0, Some(wakeups.clone())))
            .collect();
        let waiters: Vec<_> = seqs
            .iter()
            .map(|d| {
                let mut watch = DurableWatch::new(d.clone());
                tokio::spawn(async move { watch.reaches(3).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let raised = seqs.clone();
        std::thread::spawn(move || {
            for d in &raised {
                d.durable(3);
            }
        })
        .join()
        .unwrap();
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(10), w)
                .await
                .expect("a waiter was not woken")
                .unwrap();
        }
    }

    async fn durable_watch_wakes(wakeups: Option<Arc<DurableWakeups>>) {
        let durable = DurableSeq::new(5, wakeups);
        let mut watch = DurableWatch::new(durable.clone());
        assert_eq!(watch.current(), 5);
        // nothing new: a wait (abandoned, as a select! branch that lost) does not complete
        let abandoned =
            tokio::time::timeout(std::time::Duration::from_millis(1), watch.changed()).await;
        assert!(abandoned.is_err());
        // an advance wakes a waiter on another task
        let writer = durable.clone();
        let waiter = tokio::spawn(async move {
            let first = watch.changed().await;
            (first, watch)
        });
        tokio::task::yield_now().await;
        writer.durable(7);
        let (first, mut watch) = waiter.await.unwrap();
        assert_eq!(first, 7);
        // a lower or equal watermark is not a change; several advances read as the latest
        writer.durable(6);
        writer.durable(7);
        assert_eq!(durable.get(), 7);
        writer.durable(8);
        writer.durable(9);
        assert_eq!(watch.changed().await, 9);
        // reaching a watermark already passed returns at once; a later one waits for it
        watch.reaches(3).await;
        let reach = tokio::spawn(async move { watch.reaches(12).await });
        tokio::task::yield_now().await;
        writer.durable(11);
        tokio::task::yield_now().await;
        assert!(!reach.is_finished(), "11 is not 12 yet");
        writer.durable(12);
        reach.await.unwrap();
    }
}
