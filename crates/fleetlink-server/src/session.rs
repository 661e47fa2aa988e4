//! One task per connection: handshake (authentication), then the device or operator session.
//! Sessions decode and validate frames and forward them to the device's actor; they own no state
//! of the device themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use fleetlink_core::DeviceId;
use fleetlink_core::presence::{OfflineReason, SessionId};
use fleetlink_core::value::Batch;
use fleetlink_proto::v1::{
    self, ClientControl, ErrorCode, Hello, RejectReason, Role, ServerControl, StreamHeader,
    StreamKind, TelemetryBatch, client_control, server_control,
};
use fleetlink_proto::{HANDSHAKE_MAX_FRAME_BYTES, PROTOCOL_VERSION, SUPPORTED_VERSIONS};
use fleetlink_store::{Store, StoreError};
use fleetlink_transport::{FrameReader, TransportError, write_frame};
use tokio::sync::{oneshot, watch};
use tracing::Instrument as _;

use crate::actor::{Attach, Detach, DeviceActor, Ingest, Kick, Link};
use crate::bridge::BridgeSender;
use crate::registry::DeviceRegistry;
use crate::twin::{Ready, ReportTwin, TwinRequestError};
use crate::{ServerConfig, now_us};

/// What every session shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    pub registry: DeviceRegistry,
    pub fleet: Arc<crate::fleet::Fleet>,
    pub next_session: AtomicU64,
    pub shutting_down: watch::Receiver<bool>,
    /// TLS sessions for resumption, saved at shutdown.
    pub tls_sessions: Arc<crate::tls_sessions::SessionStore>,
    /// Becomes true once every provisioned device has its actor (after start-up).
    pub all_started: watch::Receiver<bool>,
    pub all_started_tx: watch::Sender<bool>,
    /// The device sessions running, for a graceful shutdown to let them end.
    pub sessions: LiveSessions,
}

/// The device sessions running ([`run_device`]): a graceful shutdown kicks them and waits (a
/// bounded time) until they ended, so that each sends what it holds (a held `TelemetryAck`) and
/// its error frame before the endpoint closes every connection.
#[derive(Debug, Default)]
pub(crate) struct LiveSessions(watch::Sender<usize>);

impl LiveSessions {
    fn enter(&self) -> LiveSession<'_> {
        self.0.send_modify(|n| *n += 1);
        LiveSession(self)
    }

    /// Waits until no session runs.
    pub(crate) async fn all_ended(&self) {
        let _ = self.0.subscribe().wait_for(|n| *n == 0).await;
    }
}

/// A running session, counted in [`LiveSessions`] until dropped.
struct LiveSession<'a>(&'a LiveSessions);

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n -= 1);
    }
}

impl Shared {
    /// Waits until every provisioned device has its actor.
    pub(crate) async fn actors_ready(&self) {
        let mut ready = self.all_started.clone();
        let _ = ready.wait_for(|r| *r).await;
    }
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The peer closed, or the connection was lost.
    Closed(String),
    /// We close the connection because of this error.
    Error(ErrorCode, String),
    /// The device's actor closed it (replaced, heartbeat timeout, storage failure, shutdown).
    Kicked(Kick),
}

impl End {
    fn from_transport(e: TransportError) -> End {
        use fleetlink_proto::FrameError;
        match e {
            TransportError::Frame(f @ FrameError::TooLarge { .. }) => {
                End::Error(ErrorCode::FrameTooLarge, f.to_string())
            }
            TransportError::Frame(f) => End::Error(ErrorCode::MalformedFrame, f.to_string()),
            other => End::Closed(other.to_string()),
        }
    }
}

/// Serves one incoming connection: its handshake, then an operator session to its end, or a
/// device session handed to a task of its own ([`run_device`]), so that a connected device does
/// not keep the handshake's state (this task is 896 bytes, the device's 1,280;
/// `-Zprint-type-sizes`).
pub(crate) fn serve_connection(
    incoming: quinn::Incoming,
    handshake: crate::admission::HandshakePermit,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send {
    let remote = incoming.remote_address();
    let session: SessionId = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", session, %remote);
    // Boxed: what the future captures it keeps to its end, and an `Incoming` is 384 bytes.
    let incoming = Box::new(incoming);
    async move {
        let timeout = Duration::from_millis(u64::from(shared.config.handshake_timeout_ms));
        // Bounded: a client that gave up mid-handshake would otherwise hold its handshake slot
        // until the QUIC idle timeout (a minute), and a reconnect storm leaves many of those.
        let conn = match tokio::time::timeout(timeout, *incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "QUIC handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("QUIC handshake not finished in time");
                return;
            }
        };
        drop(handshake);
        let Ok(Ok((send, recv))) = tokio::time::timeout(timeout, conn.accept_bi()).await else {
            tracing::debug!("no control stream opened in time");
            conn.close(crate::close_code(ErrorCode::ProtocolViolation), b"open the control stream and send a Hello");
            return;
        };
        let mut control = Control { send, reader: FrameReader::new(recv, HANDSHAKE_MAX_FRAME_BYTES) };
        let hello = match tokio::time::timeout(timeout, control.reader.read::<ClientControl>()).await {
            Ok(Ok(Some(ClientControl { msg: Some(client_control::Msg::Hello(h)) }))) => h,
            Ok(Err(e)) => {
                return reject(&conn, control, RejectReason::MalformedHello, format!("invalid Hello: {e}"), 0).await;
            }
            Ok(Ok(_)) => {
                let m = "the first frame on the control stream must be a ClientControl with a Hello".to_owned();
                return reject(&conn, control, RejectReason::MalformedHello, m, 0).await;
            }
            Err(_) => {
                let m = format!("no Hello within {} ms", timeout.as_millis());
                return reject(&conn, control, RejectReason::MalformedHello, m, 0).await;
            }
        };
        if !SUPPORTED_VERSIONS.contains(&hello.protocol_version) {
            let m = format!(
                "protocol version {} is not supported; this server speaks {:?}",
                hello.protocol_version, SUPPORTED_VERSIONS
            );
            return reject(&conn, control, RejectReason::UnsupportedVersion, m, 0).await;
        }
        if *shared.shutting_down.borrow() {
            let m = "the server is shutting down".to_owned();
            return reject(&conn, control, RejectReason::ShuttingDown, m, 5_000).await;
        }
        match Role::try_from(hello.role) {
            Ok(Role::Device) => match Box::pin(authenticate_device(&shared, &hello)).await {
                Ok(id) => {
                    // The running session gets a task of its own, and this one ends: what the
                    // handshake needed (the Hello, the steps above) is not kept for as long as
                    // the device stays connected.
                    let span = tracing::info_span!("device", device = %id);
                    let early_fin = hello.early_command_fin;
                    let acks = AckPolicy::from_hello(&hello, &shared.config);
                    let start = start_device(conn, control, shared, session, id, early_fin, acks);
                    if let Some(running) = Box::pin(start.instrument(span.clone())).await {
                        tokio::spawn(run_device(running).instrument(span));
                    }
                }
                Err((reason, message, retry)) => reject(&conn, control, reason, message, retry).await,
            },
            Ok(Role::Operator) => match Box::pin(shared.store.verify_admin_token(&hello.token)).await {
                Ok(true) => Box::pin(crate::operator::operator_session(conn, control, shared, session)).await,
                Ok(false) => {
                    let m = "wrong admin token: use the token the server printed (and wrote to admin.token) on first start"
                        .to_owned();
                    reject(&conn, control, RejectReason::BadToken, m, 0).await
                }
                Err(e) => reject(&conn, control, RejectReason::ServerBusy, format!("storage unavailable: {e}"), 1_000).await,
            },
            _ => {
                let m = format!("Hello.role is {}; use ROLE_DEVICE (1) or ROLE_OPERATOR (2)", hello.role);
                reject(&conn, control, RejectReason::MalformedHello, m, 0).await
            }
        }
    }
    .instrument(span)
}

/// How a device's session acks its telemetry: ack coalescing (protocol §5), from its Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckPolicy {
    /// How long an ack may be held after the first batch it covers is stored; 0 = none.
    delay_ms: u32,
    /// Stored batches unacked at which an ack goes at once; 0 = no bound but the delay.
    batches: u32,
}

impl AckPolicy {
    /// The device's request, its delay capped at half the heartbeat interval (a held ack must not
    /// make the device think the server is gone).
    pub(crate) fn from_hello(hello: &Hello, config: &ServerConfig) -> Self {
        Self {
            delay_ms: hello
                .telemetry_ack_delay_ms
                .min(config.heartbeat_interval_ms / 2),
            batches: hello.telemetry_ack_batches,
        }
    }

    fn delay(self) -> Duration {
        Duration::from_millis(u64::from(self.delay_ms))
    }

    /// Whether the ack of watermark `seq` goes now, with `acked` already acked and the device
    /// wanting `ack_through` acked without delay.
    pub(crate) fn due(self, seq: u64, acked: u64, ack_through: u64) -> bool {
        let unacked = seq.saturating_sub(acked);
        self.delay_ms == 0
            || self.batches == 1
            || (self.batches > 1 && unacked >= u64::from(self.batches))
            || (ack_through > acked && seq >= ack_through)
    }
}

/// The control stream of a connection.
pub(crate) struct Control {
    pub send: quinn::SendStream,
    pub reader: FrameReader,
}

async fn authenticate_device(
    shared: &Shared,
    hello: &Hello,
) -> Result<DeviceId, (RejectReason, String, u32)> {
    let id = DeviceId::new(hello.device_id.clone()).map_err(|e| {
        (
            RejectReason::MalformedHello,
            format!("invalid Hello.device_id: {e}"),
            0,
        )
    })?;
    match shared.store.device_token_hash(&id).await {
        Ok(None) => Err((
            RejectReason::UnknownDevice,
            format!("unknown device \"{id}\": provision it with `fleetlink device add {id}`"),
            0,
        )),
        Ok(Some(_)) if hello.token.is_empty() => Err((
            RejectReason::BadToken,
            format!("no token given for device \"{id}\""),
            0,
        )),
        Ok(Some(hash)) if !hash.verify(&hello.token) => Err((
            RejectReason::BadToken,
            format!(
                "wrong token for device \"{id}\": use the token printed by `fleetlink device add`"
            ),
            0,
        )),
        Ok(Some(_)) => Ok(id),
        Err(e) => Err((
            RejectReason::ServerBusy,
            format!("storage unavailable: {e}"),
            1_000,
        )),
    }
}

/// Sends a Reject, waits (briefly) for the client to read it and close, then closes. Boxed:
/// see [`Rare`].
fn reject(
    conn: &quinn::Connection,
    control: Control,
    reason: RejectReason,
    message: String,
    retry_after_ms: u32,
) -> Rare<'_, ()> {
    Box::pin(send_reject(conn, control, reason, message, retry_after_ms))
}

/// A step that most connections never take, or take once (authentication, reject, close), as a
/// boxed future. A task's future is as large as its largest step plus what is live across it, and
/// every idle device holds its connection's task for as long as it is connected: a step taken
/// inline would make every device pay for it while the session runs.
pub(crate) type Rare<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

async fn send_reject(
    conn: &quinn::Connection,
    mut control: Control,
    reason: RejectReason,
    message: String,
    retry_after_ms: u32,
) {
    tracing::info!(reason = reason.as_str_name(), %message, "connection rejected");
    let reject = v1::Reject {
        reason: reason.into(),
        message: message.clone(),
        retry_after_ms,
        supported_versions: SUPPORTED_VERSIONS.to_vec(),
    };
    let frame = ServerControl {
        msg: Some(server_control::Msg::Reject(reject)),
    };
    if write_frame(&mut control.send, &frame).await.is_ok() {
        let _ = control.send.finish();
        // The client closes the connection once it has read the Reject.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    let code = match reason {
        RejectReason::ServerBusy => ErrorCode::Unavailable,
        RejectReason::ShuttingDown => ErrorCode::ShuttingDown,
        RejectReason::UnsupportedVersion | RejectReason::MalformedHello => {
            ErrorCode::ProtocolViolation
        }
        _ => ErrorCode::Unauthenticated,
    };
    conn.close(crate::close_code(code), message.as_bytes());
}

pub(crate) fn welcome(shared: &Shared, session: SessionId, last_stored_seq: u64) -> ServerControl {
    let c = &shared.config;
    ServerControl {
        msg: Some(server_control::Msg::Welcome(v1::Welcome {
            protocol_version: PROTOCOL_VERSION,
            session_id: session.to_string(),
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            heartbeat_timeout_ms: c.heartbeat_timeout_ms,
            max_frame_bytes: c.max_frame_bytes,
            max_batch_points: c.max_batch_points,
            last_stored_seq,
            server_time_us: now_us(),
        })),
    }
}

fn error_frame(code: ErrorCode, message: &str) -> ServerControl {
    ServerControl {
        msg: Some(server_control::Msg::Error(v1::Error {
            code: code.into(),
            message: message.to_owned(),
        })),
    }
}

/// Writes `err` on the control stream (best effort), then closes the connection with it. Boxed:
/// see [`Rare`].
pub(crate) fn close_with_error<'a>(
    conn: &'a quinn::Connection,
    send: &'a mut quinn::SendStream,
    code: ErrorCode,
    message: &'a str,
) -> Rare<'a, ()> {
    Box::pin(send_error(conn, send, code, message))
}

async fn send_error(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: &str,
) {
    if write_frame(send, &error_frame(code, message)).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    conn.close(crate::close_code(code), message.as_bytes());
}

/// A device session past its handshake, as [`run_device`] takes it over.
struct Running {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    shared: Arc<Shared>,
    session: SessionId,
    id: DeviceId,
    actor: actix::Addr<DeviceActor>,
    durable: crate::actor::DurableWatch,
    heard: Arc<AtomicI64>,
    delta_rx: crate::outq::DeltaReceiver,
    out_tx: BridgeSender,
    out_rx: crate::outq::Receiver,
    kick_rx: oneshot::Receiver<Kick>,
    acks: AckPolicy,
}

/// Attaches an authenticated device to its actor and welcomes it; `None` if the connection was
/// rejected or lost on the way. Runs on the connection's handshake task, boxed (see [`Rare`]).
async fn start_device(
    conn: quinn::Connection,
    control: Control,
    shared: Arc<Shared>,
    session: SessionId,
    id: DeviceId,
    early_command_fin: bool,
    acks: AckPolicy,
) -> Option<Box<Running>> {
    let Control {
        mut send,
        mut reader,
    } = control;
    let actor = match shared.registry.get_or_start(&id).await {
        Ok(a) => a,
        Err(e) => {
            let reason = if matches!(e, StoreError::UnknownDevice(_)) {
                RejectReason::UnknownDevice
            } else {
                RejectReason::ServerBusy
            };
            let control = Control { send, reader };
            reject(&conn, control, reason, e.to_string(), 1_000).await;
            return None;
        }
    };
    let (kick_tx, kick_rx) = oneshot::channel();
    let attach = Attach {
        session,
        remote: conn.remote_address(),
        kick: kick_tx,
    };
    let attached = match actor.send(attach).await {
        Ok(a) => a,
        Err(e) => {
            let control = Control { send, reader };
            reject(
                &conn,
                control,
                RejectReason::ServerBusy,
                e.to_string(),
                1_000,
            )
            .await;
            return None;
        }
    };
    let mut durable = attached.durable;
    // Batches of an earlier connection may still be on their way to disk: announce the watermark
    // only once they are durable, so the device resends exactly what is missing.
    let wait = durable.reaches(attached.accepted);
    let settled = tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .is_ok();
    if !settled {
        let _ = actor
            .send(Detach {
                session,
                reason: OfflineReason::Error,
            })
            .await;
        let m = "earlier telemetry of this device is still being stored".to_owned();
        let control = Control { send, reader };
        reject(&conn, control, RejectReason::ServerBusy, m, 1_000).await;
        return None;
    }
    let last_stored = durable.current();
    if let Err(e) = write_frame(&mut send, &welcome(&shared, session, last_stored)).await {
        tracing::debug!(error = %e, "cannot send the Welcome");
        let _ = actor
            .send(Detach {
                session,
                reason: OfflineReason::Closed,
            })
            .await;
        return None;
    }
    reader.set_max_frame_bytes(shared.config.max_frame_bytes);
    tracing::debug!(last_stored, "welcome sent");
    let (delta_tx, delta_rx) = crate::outq::latest();
    let link = Link {
        session,
        conn: conn.clone(),
        early_command_fin,
        delta: delta_tx,
    };
    // One queue of frames for the control stream: the session's own answers and what the bridge
    // hands over (which it drops, rather than wait, once BRIDGE_QUEUE frames are waiting).
    let (out_tx, out_rx) = crate::outq::channel(crate::bridge::BRIDGE_QUEUE);
    shared.fleet.bridge.link(&id, session, out_tx.clone());
    if actor.send(Ready(link)).await.is_err() {
        shared.fleet.bridge.unlink(&id, session);
        return None;
    }
    Some(Box::new(Running {
        conn,
        send,
        reader,
        shared,
        session,
        id,
        actor,
        durable,
        heard: attached.heard,
        delta_rx,
        out_tx,
        out_rx,
        kick_rx,
        acks,
    }))
}

/// A running device session, to its end: three tasks (see the function), held by every connected
/// device, so their size is memory per device. Steps a session takes rarely or once are boxed
/// (see [`Rare`]), and so is each telemetry stream; the tasks are 640 (the control reader), 640
/// (the writer) and 384 bytes (the telemetry reader) (`-Zprint-type-sizes`, tokio task cells).
async fn run_device(running: Box<Running>) {
    let Running {
        conn,
        mut send,
        mut reader,
        shared,
        session,
        id,
        actor,
        mut durable,
        heard,
        mut delta_rx,
        out_tx,
        mut out_rx,
        kick_rx,
        acks,
    } = *running;
    // counted until the session ended (its connection closed and the actor told)
    let _live = shared.sessions.enter();
    let watermark = durable.seq().clone();
    // A session is three tasks, so that a wake-up polls only the part it is for: a slow device's
    // message wakes the telemetry reader once (the batch, posted to the actor without waiting for
    // an answer) and the writer once (the durable ack), and none of them polls the control stream or the others' channels
    // (one task with all of them in a `select!` polled every part on every wake-up).
    //
    // The writer: everything this session sends on the control stream goes through it, acks
    // coalesced (and held, if the device asked: protocol §5), and of twin deltas only the
    // latest. A held ack goes out at its deadline, when enough batches are unacked, when the
    // device wants it, or in front of any other frame (the same packet; the error frame that
    // ends a session included); the first ack of a session is never held. It hands back the send
    // stream, to close with an error.
    let mut writer = Part::spawn(async move {
        let ack = |seq| ServerControl {
            msg: Some(server_control::Msg::Ack(v1::TelemetryAck { seq })),
        };
        let welcomed = durable.seen(); // the Welcome's last_stored_seq
        let mut acked = welcomed;
        // The held ack's deadline: made at the first hold, then reset. An ack is held while
        // the watermark seen is past the one acked (every frame written acks what was seen).
        let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let holding = durable.seen() > acked;
            let frame = tokio::select! {
                // Ends once the session and the bridge (unlinked below) dropped their senders.
                m = out_rx.recv() => match m {
                    Some(m) => *m,
                    None => {
                        let stored = durable.current();
                        if stored > acked {
                            let _ = write_frame(&mut send, &ack(stored)).await;
                        }
                        return send;
                    }
                },
                seq = durable.changed() => {
                    // (the first ack tells a device that its new connection carries its
                    // telemetry, and frees the batches it resent)
                    if acked == welcomed || acks.due(seq, acked, durable.seq().ack_through()) {
                        ack(seq)
                    } else {
                        if !holding {
                            let at = tokio::time::Instant::now() + acks.delay();
                            match deadline.as_mut() {
                                Some(d) => d.as_mut().reset(at),
                                None => deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                            }
                        }
                        continue;
                    }
                }
                () = async { if let Some(d) = deadline.as_mut() { d.as_mut().await } }, if holding => {
                    ack(durable.current())
                }
                // (The actor drops its end when the session is replaced or ends: then this
                // branch just never completes.)
                delta = delta_rx.changed() => {
                    ServerControl { msg: Some(server_control::Msg::TwinDelta(delta)) }
                }
            };
            let seq = match &frame.msg {
                Some(server_control::Msg::Ack(a)) => a.seq,
                _ => {
                    // what is stored and not yet acked rides along, in front
                    let stored = durable.current();
                    if stored > acked && write_frame(&mut send, &ack(stored)).await.is_err() {
                        return send;
                    }
                    stored.max(acked)
                }
            };
            if write_frame(&mut send, &frame).await.is_err() {
                return send;
            }
            acked = acked.max(seq);
        }
    });
    let mut telemetry = {
        let (conn, shared, actor) = (conn.clone(), shared.clone(), actor.clone());
        let watermark = watermark.clone();
        Part::spawn(async move {
            loop {
                let stream = match conn.accept_uni().await {
                    Ok(s) => s,
                    Err(e) => return End::Closed(e.to_string()),
                };
                let read = telemetry(&shared, &actor, &watermark, session, stream);
                if let Err(end) = Box::pin(read).await {
                    return end;
                }
            }
        })
    };
    let control_reader = async {
        loop {
            let msg = match reader.read::<ClientControl>().await {
                Ok(Some(ClientControl { msg: Some(m) })) => m,
                Ok(Some(ClientControl { msg: None })) => {
                    return End::Error(
                        ErrorCode::UnknownMessage,
                        "a ClientControl frame with no known message".into(),
                    );
                }
                Ok(None) => return End::Closed("control stream finished by the device".into()),
                Err(e) => return End::from_transport(e),
            };
            // Heartbeats, the one request every device keeps sending, are answered inline.
            let answered = if let client_control::Msg::Heartbeat(h) = &msg {
                match device_heartbeat(&heard, &watermark, h) {
                    Some(answer) => queue(&out_tx, Box::new(answer)).await,
                    None => Ok(()),
                }
            } else {
                let ctx = (&shared, &id, &actor, session, &*heard);
                Box::pin(request(ctx, &out_tx, msg)).await
            };
            if let Err(end) = answered {
                return end;
            }
        }
    };
    let end = {
        tokio::pin!(control_reader, kick_rx);
        tokio::select! {
            end = &mut control_reader => end,
            end = telemetry.join() => end.unwrap_or_else(|e| End::Error(
                ErrorCode::Internal,
                format!("telemetry reader failed: {e}"),
            )),
            kick = &mut kick_rx => match kick {
                Ok(k) => End::Kicked(k),
                Err(_) => End::Closed("actor stopped".into()),
            },
            _ = writer.join() => End::Closed("control stream closed".into()),
        }
    };
    // No batch is read past the end (an error ends the session at the batch that caused it).
    drop(telemetry);
    drop(out_tx);
    shared.fleet.bridge.unlink(&id, session);
    let reason = match &end {
        End::Closed(why) => {
            tracing::debug!(why, "device connection closed");
            conn.close(0u32.into(), b"");
            OfflineReason::Closed
        }
        End::Error(code, message) => {
            tracing::warn!(code = code.as_str_name(), %message, "closing device connection on a protocol error");
            close_after_writer(&conn, writer, *code, message).await;
            OfflineReason::Error
        }
        End::Kicked(k) => {
            close_after_writer(&conn, writer, k.code, &k.message).await;
            match k.code {
                ErrorCode::HeartbeatTimeout => OfflineReason::Timeout,
                ErrorCode::ShuttingDown => OfflineReason::ServerShutdown,
                _ => OfflineReason::Error,
            }
        }
    };
    let _ = Box::pin(actor.send(Detach { session, reason })).await;
}

/// Closes a session's connection with an error frame once its writer has sent what was queued
/// and handed back the control stream (it does once every sender of its queue is dropped).
async fn close_after_writer(
    conn: &quinn::Connection,
    mut writer: Part<quinn::SendStream>,
    code: ErrorCode,
    message: &str,
) {
    match writer.join().await {
        Ok(mut send) => close_with_error(conn, &mut send, code, message).await,
        // the writer failed: no error frame, the close carries the code and message
        Err(_) => conn.close(crate::close_code(code), message.as_bytes()),
    }
}

/// A task of a session (see [`run_device`]), in the session's tracing span, aborted when the
/// session drops it.
struct Part<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> Part<T> {
    fn spawn(task: impl Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(task.instrument(tracing::Span::current())))
    }

    /// The task's result; an error if it panicked.
    fn join(&mut self) -> &mut tokio::task::JoinHandle<T> {
        &mut self.0
    }
}

impl<T> Drop for Part<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Queues `frame` for the control stream, waiting (boxed) only while the queue is full.
async fn queue(out: &BridgeSender, frame: Box<ServerControl>) -> Result<(), End> {
    match out.try_send(frame) {
        Ok(()) => Ok(()),
        Err(crate::outq::TrySendError::Full(frame)) => Box::pin(out.send(frame))
            .await
            .map_err(|_| End::Closed("control stream closed".into())),
        Err(crate::outq::TrySendError::Closed(_)) => {
            Err(End::Closed("control stream closed".into()))
        }
    }
}

/// Notes that the device was heard from, and makes the heartbeat's answer unless the device asked
/// for none. No message to the actor: it reads `heard` when it checks the timeout. (A replaced
/// session is kicked by the actor.)
fn heartbeat(heard: &AtomicI64, h: &v1::Heartbeat) -> Option<ServerControl> {
    heard.fetch_max(now_us(), Ordering::Relaxed);
    answer_heartbeat(h)
}

/// A device's heartbeat: [`heartbeat`], and one that sets `ack_through` (a device waiting for
/// its acks, protocol §5) is answered whatever `no_answer` says, so that the writer sends the
/// held ack in front of the answer.
fn device_heartbeat(
    heard: &AtomicI64,
    watermark: &crate::actor::DurableSeq,
    h: &v1::Heartbeat,
) -> Option<ServerControl> {
    if h.ack_through == 0 {
        return heartbeat(heard, h);
    }
    watermark.ack_now(h.ack_through);
    heartbeat(
        heard,
        &v1::Heartbeat {
            no_answer: false,
            ..*h
        },
    )
}

/// The server's answer to a client heartbeat: none if the client set `no_answer`.
pub(crate) fn answer_heartbeat(h: &v1::Heartbeat) -> Option<ServerControl> {
    (!h.no_answer).then(|| ServerControl {
        msg: Some(server_control::Msg::Heartbeat(v1::Heartbeat {
            time_us: now_us(),
            ..Default::default()
        })),
    })
}

/// A running session's own parts, as a request needs them: the shared state, the device, its
/// actor, the session and its heartbeat clock.
type SessionCtx<'a> = (
    &'a Arc<Shared>,
    &'a DeviceId,
    &'a actix::Addr<DeviceActor>,
    SessionId,
    &'a AtomicI64,
);

/// Serves one request of the control stream and queues its answer; boxed by the session (see
/// [`Rare`]), which answers heartbeats inline.
async fn request(
    (shared, id, actor, session, heard): SessionCtx<'_>,
    out_tx: &BridgeSender,
    msg: client_control::Msg,
) -> Result<(), End> {
    use client_control::Msg;
    let answer = match msg {
        Msg::Heartbeat(h) => match heartbeat(heard, &h) {
            Some(answer) => answer,
            None => return Ok(()),
        },
        Msg::TwinReport(report) => {
            let ack = match report_twin(actor, session, &report).await {
                Ok(version) => v1::TwinReportAck {
                    request_id: report.request_id,
                    reported_version: version,
                    error: None,
                },
                Err(TwinRequestError::NotCurrent) => {
                    return Err(End::Closed("replaced".into()));
                }
                Err(e) => v1::TwinReportAck {
                    request_id: report.request_id,
                    reported_version: 0,
                    error: Some(v1::Error {
                        code: twin_error_code(&e).into(),
                        message: e.to_string(),
                    }),
                },
            };
            ServerControl {
                msg: Some(server_control::Msg::TwinReportAck(ack)),
            }
        }
        Msg::Publish(p) => {
            let r =
                crate::bridge::publish(shared, Some((id, actor)), &p.topic, p.payload, p.retain)
                    .await;
            bridge_ack(p.request_id, r)
        }
        Msg::Subscribe(sub) => {
            let (ack, retained) =
                match crate::bridge::subscribe(shared, id, actor, &sub.filter).await {
                    Ok(retained) => (
                        bridge_ack(sub.request_id, Ok(retained.len() as u64)),
                        retained,
                    ),
                    Err(e) => (bridge_ack(sub.request_id, Err(e)), Vec::new()),
                };
            queue(out_tx, Box::new(ack)).await?;
            for m in retained {
                let frame = ServerControl {
                    msg: Some(server_control::Msg::TopicMessage(m)),
                };
                queue(out_tx, Box::new(frame)).await?;
            }
            return Ok(());
        }
        Msg::Unsubscribe(u) => {
            let r = crate::bridge::unsubscribe(shared, id, &u.filter).map(u64::from);
            bridge_ack(u.request_id, r)
        }
        Msg::SendDirect(d) => {
            let request_id = d.request_id;
            let r = crate::bridge::send_direct(shared, id, actor, d).await;
            bridge_ack(request_id, r)
        }
        Msg::DeviceCommand(c) => {
            let request_id = c.request_id;
            let r = crate::bridge::device_command(shared.clone(), id, actor, c).await;
            bridge_ack(request_id, r)
        }
        Msg::Hello(_) => {
            return Err(End::Error(
                ErrorCode::ProtocolViolation,
                "a second Hello on an established session".into(),
            ));
        }
    };
    queue(out_tx, Box::new(answer)).await
}

/// Batches of at most this many points are posted to the device's actor (see [`telemetry`]): a
/// device's mailbox holds 64 messages, so one posts at most that many small batches ahead of
/// its actor. Larger ones wait for the actor's answer, one at a time.
const POSTED_BATCH_POINTS: usize = 64;

/// Reads one telemetry stream to its end, handing each batch to the device's actor. Boxed, one
/// per stream: a session waiting for its next stream does not hold a batch's state.
async fn telemetry(
    shared: &Shared,
    actor: &actix::Addr<DeviceActor>,
    watermark: &crate::actor::DurableSeq,
    session: SessionId,
    stream: quinn::RecvStream,
) -> Result<(), End> {
    let mut stream = FrameReader::new(stream, shared.config.max_frame_bytes);
    match stream.read::<StreamHeader>().await {
        Ok(Some(h)) if h.kind == i32::from(StreamKind::Telemetry) => {}
        Ok(Some(h)) => {
            return Err(End::Error(
                ErrorCode::UnknownMessage,
                format!("unknown stream kind {} in StreamHeader", h.kind),
            ));
        }
        Ok(None) => return Ok(()),
        Err(e) => return Err(End::from_transport(e)),
    }
    let max_points = shared.config.max_batch_points as usize;
    loop {
        let batch = match stream.read::<TelemetryBatch>().await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => return Err(End::from_transport(e)),
        };
        if batch.ack_now {
            watermark.ack_now(batch.seq);
        }
        let batch = match Batch::from_proto(batch, max_points) {
            Ok(b) => b,
            Err(e) => return Err(End::Error(ErrorCode::InvalidValue, e.to_string())),
        };
        let mut ingest = Ingest {
            session,
            batch,
            posted: false,
        };
        if ingest.batch.points.len() <= POSTED_BATCH_POINTS {
            // Posted: the actor answers nobody (it closes the session itself if it refuses the
            // batch), so this task is not woken by the answer. Once the actor's mailbox is full,
            // the batch waits for room and for the answer as a large one does.
            ingest.posted = true;
            match actor.try_send(ingest) {
                Ok(()) => continue,
                Err(actix::dev::SendError::Full(mut waiting)) => {
                    waiting.posted = false;
                    ingest = waiting;
                }
                Err(actix::dev::SendError::Closed(_)) => {
                    return Err(End::Error(
                        ErrorCode::Internal,
                        "device actor unavailable: its mailbox is closed".into(),
                    ));
                }
            }
        }
        match actor.send(ingest).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(End::Error(e.code(), e.to_string())),
            Err(e) => {
                return Err(End::Error(
                    ErrorCode::Internal,
                    format!("device actor unavailable: {e}"),
                ));
            }
        }
    }
}

fn bridge_ack(request_id: u64, r: Result<u64, crate::bridge::Refused>) -> ServerControl {
    let (id, error) = match r {
        Ok(id) => (id, None),
        Err(e) => (
            0,
            Some(v1::Error {
                code: e.code.into(),
                message: e.message,
            }),
        ),
    };
    ServerControl {
        msg: Some(server_control::Msg::BridgeAck(v1::BridgeAck {
            request_id,
            error,
            id,
        })),
    }
}

async fn report_twin(
    actor: &actix::Addr<crate::actor::DeviceActor>,
    session: SessionId,
    report: &v1::TwinReport,
) -> Result<u64, TwinRequestError> {
    let patch = fleetlink_core::twin::TwinPatch::parse(&report.patch_json)?;
    actor
        .send(ReportTwin { session, patch })
        .await
        .map_err(|_| TwinRequestError::NotCurrent)?
}

/// The wire code of a failed twin request.
pub(crate) fn twin_error_code(e: &TwinRequestError) -> ErrorCode {
    use fleetlink_core::twin::TwinError;
    match e {
        TwinRequestError::Twin(TwinError::Conflict { .. }) => ErrorCode::Conflict,
        TwinRequestError::Twin(_) => ErrorCode::InvalidArgument,
        TwinRequestError::Store(_) => ErrorCode::Unavailable,
        TwinRequestError::NotCurrent => ErrorCode::Replaced,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(delay_ms: u32, batches: u32, heartbeat_interval_ms: u32) -> AckPolicy {
        let hello = Hello {
            telemetry_ack_delay_ms: delay_ms,
            telemetry_ack_batches: batches,
            ..Default::default()
        };
        let config = ServerConfig {
            heartbeat_interval_ms,
            ..Default::default()
        };
        AckPolicy::from_hello(&hello, &config)
    }

    #[test]
    fn without_a_delay_or_with_a_bound_of_one_every_batch_is_acked_at_once() {
        assert!(policy(0, 3, 10_000).due(1, 0, 0));
        assert!(policy(2_500, 1, 10_000).due(1, 0, 0));
    }

    #[test]
    fn an_ack_is_held_until_enough_batches_are_unacked() {
        let p = policy(2_500, 3, 10_000);
        assert!(!p.due(11, 10, 0));
        assert!(!p.due(12, 10, 0));
        assert!(p.due(13, 10, 0));
        assert!(
            p.due(20, 10, 0),
            "a jump of the watermark counts every batch"
        );
        // 0 = no bound but the delay
        assert!(!policy(2_500, 0, 10_000).due(1_000, 0, 0));
    }

    #[test]
    fn an_ack_the_device_wants_goes_once_the_batch_it_names_is_stored() {
        let p = policy(2_500, 100, 10_000);
        assert!(!p.due(11, 10, 12), "batch 12 is not stored yet");
        assert!(p.due(12, 10, 12));
        assert!(p.due(13, 10, 12));
        assert!(!p.due(13, 12, 12), "already acked through 12");
    }

    #[test]
    fn the_delay_is_capped_at_half_the_heartbeat_interval() {
        assert_eq!(policy(60_000, 3, 10_000).delay(), Duration::from_secs(5));
        assert_eq!(
            policy(2_500, 3, 10_000).delay(),
            Duration::from_millis(2_500)
        );
    }
}
