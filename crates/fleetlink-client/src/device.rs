//! `DeviceClient`: a machine's connection to the fleet.
//!
//! Points go into a bounded buffer (`max_buffered_points`); `send` waits while it is full (the
//! documented overflow policy: block the caller, never drop). A background task seals points into
//! batches (by count, size, or after `linger`), numbers them, writes them on the telemetry stream,
//! and frees them only when the server acks them as durable. After a reconnect it resends every
//! batch above the `last_stored_seq` of the new Welcome.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlink_core::backoff::Backoff;
use fleetlink_core::value::MetricTypes;
use fleetlink_core::{DeviceId, Point};
use fleetlink_proto::v1::{
    self, ClientControl, RejectReason, ServerControl, StreamHeader, StreamKind, client_control,
    server_control,
};
use fleetlink_transport::{
    ClientTransport, DEVICE_ACK_DELAY, MAX_ACK_DELAY, Resumption, TransportError, write_frame,
};
use prost::Message as _;
use rand::Rng as _;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::command::{CommandHandlers, CommandOutput, CommandRunner};
use crate::connect::{Endpoint, Session, hello, open_session, quic_config};
use crate::{ClientError, ServerAddress};

/// A sealed batch, encoded once and resent as is.
#[derive(Debug, Clone)]
struct Frame {
    seq: u64,
    points: usize,
    bytes: bytes::Bytes,
}

/// How a device connects and buffers.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The server.
    pub server: ServerAddress,
    /// This device's id.
    pub device_id: DeviceId,
    /// This device's token (from `fleetlink device add`).
    pub token: String,
    /// Points kept until the server acks them; `send` waits while the buffer is full.
    pub max_buffered_points: usize,
    /// Most points per batch (the server's limit applies too).
    pub max_batch_points: usize,
    /// A batch is sent at the latest this long after its first point.
    pub linger: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// An attempt to connect (QUIC and TLS handshakes, Hello, Welcome) is abandoned after this
    /// long and retried after the backoff. A restarting server does not answer the first packets
    /// of an attempt, and QUIC retransmits them ever more rarely (1 s, 2 s, 4 s, ...): without a
    /// bound, a device could wait for its attempt's idle timeout instead of simply trying again.
    /// 15 s by default: longer than a fleetlink server keeps an attempt in its handshake queue
    /// (`handshake_queue_ms`, 10 s) plus the up to 3 s by which QUIC's retransmission of the first
    /// packet reaches a restarted server, so the server never starts a handshake its client has
    /// already given up on (in a reconnect storm, a shorter bound wasted a third of the handshakes).
    pub connect_timeout: Duration,
    /// A shared client endpoint (UDP socket); `None` = one of its own.
    pub endpoint: Option<Endpoint>,
    /// TLS session resumption on reconnect: [`Resumption::Tickets`] by default (a reconnect
    /// skips the certificate checks); [`Resumption::ZeroRtt`] also sends the Hello in the first
    /// flight, at the cost of its forward secrecy (see [`Resumption`]).
    pub resumption: Resumption,
    /// How long the server may hold its acknowledgement of the device's packets (QUIC ACK
    /// frequency extension; at most 10 s, zero = QUIC's default of 25 ms). With the default
    /// ([`DEVICE_ACK_DELAY`], 250 ms) the server's ACK of a batch rides in the packet that acks
    /// the batch as stored, instead of a packet of its own: one packet fewer per message for the
    /// device's radio to receive. The price: a lost packet that no later packet reveals is resent
    /// up to this much later.
    pub ack_delay: Duration,
    /// Ack coalescing (protocol §5): the server may hold its acknowledgement that a batch is
    /// stored up to this long, so that one acknowledgement covers the batches stored meanwhile
    /// and one packet carries it ([`DEVICE_TELEMETRY_ACK_DELAY`], 2.5 s, by default; zero = every
    /// batch is acked as soon as it is stored, as is anything under 1 ms, since the protocol
    /// counts whole milliseconds; the server caps it at half its heartbeat interval).
    /// A device sending a message a second then receives a packet every third message instead
    /// of every message. What it costs: batches stay in the send buffer until acked, that much
    /// longer. The client asks for its acks at once when it needs them: [`DeviceClient::flush`],
    /// and a batch sealed while the buffer is half full.
    pub telemetry_ack_delay: Duration,
    /// With `telemetry_ack_delay`: the server acks at once when this many stored batches are
    /// unacked (3 by default; 1 = every batch at once, no coalescing). The client's QUIC ACK
    /// request (`ack_delay`) is stretched to match, so the server's QUIC ACK of the batches
    /// rides with their acknowledgement: the server may receive this many packets before it
    /// acknowledges them, and hold its ACK up to `ack_delay` + `telemetry_ack_delay`.
    pub telemetry_ack_batches: u32,
    /// What the device does when it receives a command, by name. Register handlers before
    /// connecting: commands queued while the device was offline arrive right after the Welcome.
    pub commands: CommandHandlers,
}

/// [`DeviceConfig::telemetry_ack_delay`]'s default: a device sending a message a second gets one
/// acknowledgement for three messages (with [`DEVICE_TELEMETRY_ACK_BATCHES`]).
pub const DEVICE_TELEMETRY_ACK_DELAY: Duration = Duration::from_millis(2_500);

/// [`DeviceConfig::telemetry_ack_batches`]'s default.
pub const DEVICE_TELEMETRY_ACK_BATCHES: u32 = 3;

impl DeviceConfig {
    /// Whether the server may hold acks (ack coalescing is asked for).
    fn coalesces_acks(&self) -> bool {
        coalesces_acks(self.telemetry_ack_delay, self.telemetry_ack_batches)
    }

    /// The device's QUIC transport: its resumption and the ACK timing it asks the server for
    /// ([`device_transport`]).
    pub fn transport(&self) -> ClientTransport {
        device_transport(
            self.resumption,
            self.ack_delay,
            self.telemetry_ack_delay,
            self.telemetry_ack_batches,
        )
    }
}

/// Whether these settings ask for ack coalescing. The Hello carries the delay in whole
/// milliseconds, so one under 1 ms is none: the server would not hold the acks, and the QUIC ACK
/// request must not be stretched for them.
fn coalesces_acks(telemetry_ack_delay: Duration, telemetry_ack_batches: u32) -> bool {
    telemetry_ack_delay.as_millis() > 0 && telemetry_ack_batches > 1
}

/// The QUIC transport of a device configured with these [`DeviceConfig`] fields: it asks the
/// server to hold its ACKs `ack_delay`. With ack coalescing (`telemetry_ack_delay` above zero
/// and `telemetry_ack_batches` above 1), the server's QUIC ACK of the batches waits for their
/// acknowledgement and rides in its packet: it may receive as many packets as batches before
/// it must ACK, and hold the ACK as long as the acknowledgement, plus the usual allowance.
pub fn device_transport(
    resumption: Resumption,
    ack_delay: Duration,
    telemetry_ack_delay: Duration,
    telemetry_ack_batches: u32,
) -> ClientTransport {
    let coalesces = coalesces_acks(telemetry_ack_delay, telemetry_ack_batches);
    ClientTransport {
        resumption,
        ack_delay: Some(if coalesces {
            ack_delay + telemetry_ack_delay
        } else {
            ack_delay
        }),
        ack_threshold: if coalesces { telemetry_ack_batches } else { 1 },
        ..Default::default()
    }
}

/// [`DeviceConfig::connect_timeout`]'s default: longer than the server's default handshake
/// queue wait plus the 3 s a late Initial can take (see `docs/protocol.md`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl DeviceConfig {
    /// Defaults for everything but where and who.
    pub fn new(server: ServerAddress, device_id: DeviceId, token: impl Into<String>) -> Self {
        Self {
            server,
            device_id,
            token: token.into(),
            max_buffered_points: 100_000,
            max_batch_points: 1_000,
            linger: Duration::from_millis(20),
            backoff: Backoff::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            endpoint: None,
            resumption: Resumption::default(),
            ack_delay: DEVICE_ACK_DELAY,
            telemetry_ack_delay: DEVICE_TELEMETRY_ACK_DELAY,
            telemetry_ack_batches: DEVICE_TELEMETRY_ACK_BATCHES,
            commands: CommandHandlers::default(),
        }
    }

    /// Registers the handler of command `name` (see [`CommandHandlers::on`]).
    pub fn on_command<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(crate::CommandCall) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = CommandOutput> + Send + 'static,
    {
        self.commands.on(name, handler);
        self
    }
}

/// The desired state of the device's twin, as the server last sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredState {
    /// Version of the desired document.
    pub version: u64,
    /// Desired fields whose value differs from the reported one (a JSON object; empty = in sync).
    pub delta: serde_json::Value,
    /// The whole desired document.
    pub desired: serde_json::Value,
}

/// Counters of a device client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Points handed to `send`.
    pub points_sent: u64,
    /// Points the server acked as durably stored.
    pub points_acked: u64,
    /// Highest batch sequence acked.
    pub acked_seq: u64,
    /// Successful connections (the first one included).
    pub connects: u64,
    /// Connections whose Hello the server accepted in 0-RTT (see [`Resumption::ZeroRtt`]).
    pub zero_rtt_connects: u64,
    /// Whether a session is established now.
    pub connected: bool,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// Points the server refused (a batch it closed the connection over, such as a metric that
    /// changed type); they are dropped after the reconnect so the device does not loop on them.
    pub points_rejected: u64,
    /// Commands whose handler ran.
    pub commands_handled: u64,
    /// Deliveries of a command already received, answered without running the handler again.
    pub command_redeliveries: u64,
}

type ReportReply = oneshot::Sender<Result<u64, ClientError>>;

enum Cmd {
    Points(Vec<Point>),
    Flush(oneshot::Sender<u64>),
    Close(oneshot::Sender<()>),
    Request(
        RequestKind,
        ReportReply,
        Option<oneshot::Sender<v1::DeviceCommandResult>>,
    ),
    Reconnect,
}

/// A control-stream request that the server answers with an ack.
#[derive(Debug, Clone)]
enum RequestKind {
    Report(String),
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Subscribe(String),
    Unsubscribe(String),
    Direct {
        to: String,
        payload: Vec<u8>,
        ttl_ms: u32,
    },
    DeviceCommand {
        to: String,
        name: String,
        args_json: String,
        timeout_ms: u32,
    },
}

impl RequestKind {
    fn frame(&self, request_id: u64) -> ClientControl {
        use client_control::Msg;
        let msg = match self.clone() {
            RequestKind::Report(patch_json) => Msg::TwinReport(v1::TwinReport {
                request_id,
                patch_json,
            }),
            RequestKind::Publish {
                topic,
                payload,
                retain,
            } => Msg::Publish(v1::Publish {
                request_id,
                topic,
                payload,
                retain,
            }),
            RequestKind::Subscribe(filter) => {
                Msg::Subscribe(v1::TopicSubscribe { request_id, filter })
            }
            RequestKind::Unsubscribe(filter) => {
                Msg::Unsubscribe(v1::TopicUnsubscribe { request_id, filter })
            }
            RequestKind::Direct {
                to,
                payload,
                ttl_ms,
            } => Msg::SendDirect(v1::SendDirect {
                request_id,
                to_device: to,
                payload,
                ttl_ms,
            }),
            RequestKind::DeviceCommand {
                to,
                name,
                args_json,
                timeout_ms,
            } => Msg::DeviceCommand(v1::DeviceCommand {
                request_id,
                to_device: to,
                name,
                args_json,
                timeout_ms,
            }),
        };
        ClientControl { msg: Some(msg) }
    }

    /// Whether sending it again after a reconnect is harmless (the server may have done it).
    fn idempotent(&self) -> bool {
        matches!(
            self,
            RequestKind::Report(_) | RequestKind::Subscribe(_) | RequestKind::Unsubscribe(_)
        )
    }
}

/// A request waiting for its ack.
struct Pending {
    kind: RequestKind,
    reply: Option<ReportReply>,
    result: Option<oneshot::Sender<v1::DeviceCommandResult>>,
    /// Written on a connection (which may have died before the server answered).
    written: bool,
}

/// Something the bridge delivered to this device.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A message published to a topic this device subscribed to.
    Topic {
        /// The topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
        /// The publishing device (`None` when an operator published it).
        from: Option<String>,
        /// Delivered from the retained store when subscribing.
        retained: bool,
        /// When it was published (µs since the epoch, server clock).
        published_us: i64,
    },
    /// A direct message from another device.
    Direct {
        /// Its id.
        id: u64,
        /// The sender.
        from: String,
        /// The payload.
        payload: Vec<u8>,
        /// When it was sent (µs since the epoch, server clock).
        sent_us: i64,
    },
    /// A direct message this device sent expired before its target took it.
    Expired {
        /// The message's id (as returned by [`DeviceClient::send_direct`]).
        id: u64,
        /// Its target.
        to: String,
    },
}

/// How a command this device ran on another device ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCommandOutcome {
    /// The command's id.
    pub id: u64,
    /// Its terminal state.
    pub state: crate::CommandState,
    /// The handler's result.
    pub result: Option<serde_json::Value>,
    /// What went wrong.
    pub error: Option<String>,
}

/// A device connected to a fleetlink server. Cheap to share by reference; dropping it closes it.
#[derive(Debug)]
pub struct DeviceClient {
    cmds: mpsc::Sender<Cmd>,
    room: Arc<Semaphore>,
    max_buffered: usize,
    stats: Arc<Mutex<DeviceStats>>,
    acked: watch::Receiver<u64>,
    settled: watch::Receiver<u64>,
    id: DeviceId,
    types: Arc<Mutex<MetricTypes>>,
    desired: watch::Receiver<Option<DesiredState>>,
    runner: Arc<CommandRunner>,
    incoming: tokio::sync::broadcast::Sender<Incoming>,
    /// Subscribed before the connection started, so the first reader misses nothing.
    first_incoming: Mutex<Option<tokio::sync::broadcast::Receiver<Incoming>>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Points(_) => "Points",
            Cmd::Flush(_) => "Flush",
            Cmd::Close(_) => "Close",
            Cmd::Request(..) => "Request",
            Cmd::Reconnect => "Reconnect",
        })
    }
}

impl DeviceClient {
    /// Connects and authenticates. Fails if this first attempt fails (wrong token, unknown device,
    /// unreachable server); once connected, the client reconnects by itself.
    pub async fn connect(config: DeviceConfig) -> Result<Self, ClientError> {
        if config.max_buffered_points == 0 || config.max_batch_points == 0 {
            return Err(ClientError::InvalidArgument(
                "max_buffered_points and max_batch_points must be above 0".into(),
            ));
        }
        let endpoint = match &config.endpoint {
            Some(e) => e.clone(),
            None => Endpoint::for_server(config.server.addr)?,
        };
        if config.connect_timeout.is_zero() {
            return Err(ClientError::InvalidArgument(
                "connect_timeout must be above 0".into(),
            ));
        }
        for (name, delay) in [
            ("ack_delay", config.ack_delay),
            ("telemetry_ack_delay", config.telemetry_ack_delay),
        ] {
            if delay > MAX_ACK_DELAY {
                return Err(ClientError::InvalidArgument(format!(
                    "{name} must be at most {} s, got {} s",
                    MAX_ACK_DELAY.as_secs(),
                    delay.as_secs_f64()
                )));
            }
        }
        if config.telemetry_ack_batches == 0 {
            return Err(ClientError::InvalidArgument(
                "telemetry_ack_batches must be at least 1 (1 = no ack coalescing)".into(),
            ));
        }
        let transport = config.transport();
        let quic = quic_config(&config.server, &transport)?;
        let session = connect_once(&endpoint, &config, &quic).await?;
        let last_stored = session.welcome.last_stored_seq;
        let (cmds_tx, cmds_rx) = mpsc::channel(64);
        let room = Arc::new(Semaphore::new(
            config.max_buffered_points.min(Semaphore::MAX_PERMITS),
        ));
        // Counted here, not by the background task: `connect` returns connected.
        let stats = Arc::new(Mutex::new(DeviceStats {
            acked_seq: last_stored,
            connects: 1,
            zero_rtt_connects: u64::from(session.zero_rtt),
            connected: true,
            ..Default::default()
        }));
        let (acked_tx, acked_rx) = watch::channel(last_stored);
        let (settled_tx, settled_rx) = watch::channel(0u64);
        let types = Arc::new(Mutex::new(MetricTypes::default()));
        let id = config.device_id.clone();
        let (desired_tx, desired_rx) = watch::channel(None);
        let runner = CommandRunner::new(config.commands.clone());
        let (incoming, first_incoming) = tokio::sync::broadcast::channel(INCOMING_BUFFER);
        let engine = Engine {
            desired: desired_tx,
            runner: runner.clone(),
            quic,
            requests: std::collections::BTreeMap::new(),
            next_request: 1,
            subscriptions: std::collections::BTreeSet::new(),
            device_commands: std::collections::HashMap::new(),
            incoming: incoming.clone(),
            config,
            endpoint,
            cmds: cmds_rx,
            room: room.clone(),
            stats: stats.clone(),
            acked: acked_tx,
            settled: settled_tx,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            unacked: VecDeque::new(),
            next_seq: last_stored + 1,
            ack_wanted: 0,
            max_batch_bytes: MAX_BATCH_BYTES,
            drop_refused_batch: false,
            types: types.clone(),
        };
        tokio::spawn(engine.run(session));
        Ok(Self {
            max_buffered: room.available_permits(),
            cmds: cmds_tx,
            room,
            stats,
            acked: acked_rx,
            settled: settled_rx,
            id,
            types,
            desired: desired_rx,
            runner,
            incoming,
            first_incoming: Mutex::new(Some(first_incoming)),
        })
    }

    async fn request(
        &self,
        kind: RequestKind,
        result: Option<oneshot::Sender<v1::DeviceCommandResult>>,
    ) -> Result<u64, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Request(kind, tx, result))
            .await
            .map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Publishes `payload` to `topic` (no wildcards); with `retain` the server keeps it for later
    /// subscribers (an empty retained payload clears the topic). Returns how many subscribers it
    /// was handed to. Fails with `PERMISSION_DENIED` if the policy forbids it.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<u64, ClientError> {
        self.request(
            RequestKind::Publish {
                topic: topic.to_owned(),
                payload: payload.into(),
                retain,
            },
            None,
        )
        .await
    }

    /// Subscribes to `filter` (`+` = one level, `#` = the rest); messages arrive on
    /// [`DeviceClient::incoming`]. The subscription is renewed after every reconnect.
    pub async fn subscribe(&self, filter: &str) -> Result<(), ClientError> {
        self.request(RequestKind::Subscribe(filter.to_owned()), None)
            .await
            .map(|_| ())
    }

    /// Ends a subscription.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), ClientError> {
        self.request(RequestKind::Unsubscribe(filter.to_owned()), None)
            .await
            .map(|_| ())
    }

    /// Sends a message to another device; it waits up to `ttl` for an offline target (`None` =
    /// the server's default), after which this device gets [`Incoming::Expired`]. Returns the
    /// message's id.
    pub async fn send_direct(
        &self,
        to: &str,
        payload: impl Into<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<u64, ClientError> {
        let ttl_ms = ttl.map_or(0, |t| {
            u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1)
        });
        self.request(
            RequestKind::Direct {
                to: to.to_owned(),
                payload: payload.into(),
                ttl_ms,
            },
            None,
        )
        .await
    }

    /// Runs command `name` on another device and waits for its end (at most `timeout`, which is
    /// also the command's deadline on the server).
    pub async fn command_device(
        &self,
        to: &str,
        name: &str,
        args: serde_json::Value,
        timeout: Duration,
    ) -> Result<DeviceCommandOutcome, ClientError> {
        let (tx, rx) = oneshot::channel();
        let timeout_ms = u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let id = self
            .request(
                RequestKind::DeviceCommand {
                    to: to.to_owned(),
                    name: name.to_owned(),
                    args_json: args.to_string(),
                    timeout_ms,
                },
                Some(tx),
            )
            .await?;
        // The server expires the command at the deadline and then sends its end; a little slack
        // covers the trip back.
        let r = match tokio::time::timeout(timeout + Duration::from_secs(5), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                return Err(ClientError::Connection(format!(
                    "the connection was lost before command {id} on {to} ended; its result is lost to this device"
                )));
            }
            Err(_) => return Err(ClientError::Timeout(timeout)),
        };
        let state = crate::operator::state_from_proto(r.state)?;
        Ok(DeviceCommandOutcome {
            id,
            state,
            result: (!r.result_json.is_empty())
                .then(|| serde_json::from_str(&r.result_json).ok())
                .flatten(),
            error: (!r.error.is_empty()).then_some(r.error),
        })
    }

    /// Topic messages, direct messages and expiry notices for this device. The first receiver
    /// gets everything since the connection started (direct messages that waited for the device
    /// arrive right after the Welcome); later ones get what arrives after they were made. A
    /// receiver that falls more than 1024 messages behind is told how many it missed.
    pub fn incoming(&self) -> tokio::sync::broadcast::Receiver<Incoming> {
        match self.first_incoming.lock().ok().and_then(|mut f| f.take()) {
            Some(first) => first,
            None => self.incoming.subscribe(),
        }
    }

    /// Merges `patch` (an RFC 7386 JSON merge patch: `null` deletes a field) into the reported
    /// document of this device's twin and returns its new version once the server stored it.
    /// While the device is offline the report waits and is sent after the reconnect.
    pub async fn report(&self, patch: serde_json::Value) -> Result<u64, ClientError> {
        let patch = fleetlink_core::twin::TwinPatch::from_json(patch)
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        self.request(RequestKind::Report(patch.into_json().to_string()), None)
            .await
    }

    /// The desired state as the server last sent it (`None` until the first Welcome's delta).
    /// The server sends it after every connect and on every change: watch it with
    /// [`watch::Receiver::changed`].
    pub fn desired(&self) -> watch::Receiver<Option<DesiredState>> {
        self.desired.clone()
    }

    /// Drops the current connection and reconnects at once (after a network change, say).
    /// Unacked telemetry, pending reports and commands carry over to the new connection.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        self.cmds
            .send(Cmd::Reconnect)
            .await
            .map_err(|_| self.closed())
    }

    /// This device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// Queues points for sending; waits while the buffer of unacknowledged points is full.
    pub async fn send(&self, points: Vec<Point>) -> Result<(), ClientError> {
        if points.is_empty() {
            return Ok(());
        }
        self.validate(&points)?;
        let n = self.permits(points.len())?;
        let permit = self.room.acquire_many(n).await.map_err(|_| self.closed())?;
        permit.forget(); // returned when the server acks these points
        self.count_sent(n);
        self.cmds
            .send(Cmd::Points(points))
            .await
            .map_err(|_| self.closed())
    }

    /// Like [`DeviceClient::send`], but fails at once if the buffer has no room.
    pub fn try_send(&self, points: Vec<Point>) -> Result<(), ClientError> {
        if points.is_empty() {
            return Ok(());
        }
        self.validate(&points)?;
        let n = self.permits(points.len())?;
        let permit = self.room.try_acquire_many(n).map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => self.closed(),
            tokio::sync::TryAcquireError::NoPermits => ClientError::InvalidArgument(format!(
                "the send buffer is full ({} points await acknowledgement); wait or use send()",
                self.max_buffered
            )),
        })?;
        permit.forget();
        self.count_sent(n);
        self.cmds
            .try_send(Cmd::Points(points))
            .map_err(|_| self.closed())
    }

    /// Refuses, before anything is buffered, what the server would refuse: non-finite numbers,
    /// positions out of range, over-long strings, and a metric that changes type in this client.
    fn validate(&self, points: &[Point]) -> Result<(), ClientError> {
        let invalid = |e: fleetlink_core::ValueError| ClientError::InvalidArgument(e.to_string());
        for (i, p) in points.iter().enumerate() {
            fleetlink_core::Value::from_proto(Some(p.value.to_proto()), i, p.metric.as_str())
                .map_err(invalid)?;
        }
        let mut types = self
            .types
            .lock()
            .map_err(|_| ClientError::Closed(Some("poisoned".into())))?;
        types.check_points(points).map_err(invalid)
    }

    fn permits(&self, n: usize) -> Result<u32, ClientError> {
        if n > self.max_buffered {
            return Err(ClientError::InvalidArgument(format!(
                "{n} points exceed the send buffer of {} points; send fewer at a time",
                self.max_buffered
            )));
        }
        Ok(n as u32)
    }

    fn count_sent(&self, n: u32) {
        if let Ok(mut st) = self.stats.lock() {
            st.points_sent += u64::from(n);
        }
    }

    fn closed(&self) -> ClientError {
        ClientError::Closed(self.stats.lock().ok().and_then(|s| s.last_error.clone()))
    }

    /// Sends whatever is buffered and waits until the server acked everything sent so far (or
    /// refused it: see [`DeviceStats::points_rejected`]).
    pub async fn flush(&self, timeout: Duration) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Flush(tx))
            .await
            .map_err(|_| self.closed())?;
        let target = rx.await.map_err(|_| self.closed())?;
        let mut acked = self.acked.clone();
        match tokio::time::timeout(timeout, acked.wait_for(|a| *a >= target)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.closed()),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// How many of the points handed to `send` are settled (acked as durable, or refused), in the
    /// order they were sent: the `n` first points sent are settled once this reaches `n`. For
    /// callers that track per-point latency without polling [`DeviceClient::stats`].
    pub fn settled_points(&self) -> watch::Receiver<u64> {
        self.settled.clone()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> DeviceStats {
        let mut stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        if let Ok(c) = self.runner.counters.lock() {
            stats.commands_handled = c.handled;
            stats.command_redeliveries = c.redeliveries;
        }
        stats
    }

    /// Closes the connection. Points not yet acked are discarded; call [`DeviceClient::flush`] first.
    pub async fn close(self) {
        self.disconnect().await;
    }

    /// Like [`DeviceClient::close`], for a client that is shared (behind an `Arc`): closes the
    /// connection and stops reconnecting; every later call fails with [`ClientError::Closed`].
    pub async fn disconnect(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn connect_once(
    endpoint: &Endpoint,
    config: &DeviceConfig,
    quic: &quinn::ClientConfig,
) -> Result<Session, ClientError> {
    let mut hello = hello(v1::Role::Device, config.device_id.as_str(), &config.token);
    if config.coalesces_acks() {
        hello.telemetry_ack_delay_ms =
            u32::try_from(config.telemetry_ack_delay.as_millis()).unwrap_or(u32::MAX);
        hello.telemetry_ack_batches = config.telemetry_ack_batches;
    }
    let attempt = open_session(endpoint, &config.server, quic, hello);
    match tokio::time::timeout(config.connect_timeout, attempt).await {
        Ok(r) => r,
        // Dropping the attempt closes its half-open connection.
        Err(_) => Err(ClientError::Timeout(config.connect_timeout)),
    }
}

/// Why a session ended.
enum SessionEnd {
    /// The user closed the client.
    Closed(Option<oneshot::Sender<()>>),
    /// The connection was lost; reconnect.
    Lost(ClientError),
}

enum Event {
    Ack(u64),
    ReportAck(v1::TwinReportAck),
    Delta(v1::TwinDelta),
    BridgeAck(v1::BridgeAck),
    DeviceCommandResult(v1::DeviceCommandResult),
    Incoming(Incoming),
    /// Any other frame from the server (a heartbeat): the server is alive.
    Heard,
    Lost(ClientError),
}

struct Engine {
    config: DeviceConfig,
    endpoint: Endpoint,
    /// Built once: every reconnect uses it.
    quic: quinn::ClientConfig,
    cmds: mpsc::Receiver<Cmd>,
    room: Arc<Semaphore>,
    stats: Arc<Mutex<DeviceStats>>,
    acked: watch::Sender<u64>,
    /// Points settled (acked or refused) so far, for [`DeviceClient::settled_points`].
    settled: watch::Sender<u64>,
    pending: Vec<Point>,
    pending_bytes: usize,
    pending_since: Option<Instant>,
    unacked: VecDeque<Frame>,
    next_seq: u64,
    /// Batches up to this seq are wanted acked at once (a flush; protocol §5's `ack_through`).
    ack_wanted: u64,
    max_batch_bytes: usize,
    /// The server refused the first batch it had not stored; drop it after the next Welcome.
    drop_refused_batch: bool,
    /// The metric types `send` checks against; the server's view wins after a refusal.
    types: Arc<Mutex<MetricTypes>>,
    desired: watch::Sender<Option<DesiredState>>,
    runner: Arc<CommandRunner>,
    /// Requests not yet acknowledged, by request id.
    requests: std::collections::BTreeMap<u64, Pending>,
    next_request: u64,
    /// Topic filters to subscribe again after a reconnect.
    subscriptions: std::collections::BTreeSet<String>,
    /// Device commands this device sent, waiting for their end, by request id.
    device_commands: std::collections::HashMap<u64, oneshot::Sender<v1::DeviceCommandResult>>,
    incoming: tokio::sync::broadcast::Sender<Incoming>,
}

impl Engine {
    async fn run(mut self, first: Session) {
        let mut counted_first = true;
        let mut session = Some(first);
        let mut attempt = 0u32;
        let done = loop {
            let s = match session.take() {
                Some(s) => s,
                None => match self.reconnect(&mut attempt).await {
                    Ok(s) => s,
                    Err(done) => break done,
                },
            };
            let started = Instant::now();
            if std::mem::take(&mut counted_first) {
                // the first session was counted by `connect`
            } else {
                let zero_rtt = u64::from(s.zero_rtt);
                self.update_stats(|st| {
                    st.connects += 1;
                    st.zero_rtt_connects += zero_rtt;
                    st.connected = true;
                });
            }
            let end = self.run_session(s).await;
            // A session that dies at once (a server refusing us, a twin device) keeps backing off.
            if started.elapsed() > Duration::from_secs(2) {
                attempt = 0;
            }
            match end {
                SessionEnd::Closed(done) => break done,
                SessionEnd::Lost(e) => {
                    if let ClientError::Server { code, .. } = &e
                        && refuses_batch(*code)
                    {
                        self.drop_refused_batch = true;
                    }
                    tracing::info!(device = %self.config.device_id, error = %e, "connection lost; reconnecting");
                    self.update_stats(|st| {
                        st.connected = false;
                        st.last_error = Some(e.to_string());
                    });
                }
            }
        };
        self.update_stats(|st| st.connected = false);
        self.room.close();
        // Only now does `disconnect` return: a `send` after it finds the buffer closed (answered
        // first, a send could slip into the command channel before the engine dropped it).
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn update_stats(&self, f: impl FnOnce(&mut DeviceStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Reconnects with backoff, buffering commands meanwhile. `Err` = stop (closed or permanently rejected).
    async fn reconnect(
        &mut self,
        attempt: &mut u32,
    ) -> Result<Session, Option<oneshot::Sender<()>>> {
        let mut min_delay = Duration::ZERO;
        loop {
            let jitter: f64 = rand::rng().random();
            let delay = self.config.backoff.delay(*attempt, jitter).max(min_delay);
            *attempt = attempt.saturating_add(1);
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    cmd = self.cmds.recv() => self.command_offline(cmd)?,
                }
            }
            // The attempt (up to `connect_timeout`) does not hold up the caller's commands: a
            // close ends it at once.
            let (endpoint, config, quic) = (
                self.endpoint.clone(),
                self.config.clone(),
                self.quic.clone(),
            );
            let attempt = connect_once(&endpoint, &config, &quic);
            tokio::pin!(attempt);
            let attempted = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    cmd = self.cmds.recv() => self.command_offline(cmd)?,
                }
            };
            match attempted {
                Ok(s) => return Ok(s),
                Err(ClientError::Rejected {
                    reason,
                    message,
                    retry_after_ms,
                }) => {
                    let permanent = matches!(
                        reason,
                        RejectReason::BadToken
                            | RejectReason::UnknownDevice
                            | RejectReason::UnsupportedVersion
                            | RejectReason::MalformedHello
                    );
                    let e = format!("rejected ({}): {message}", reason.as_str_name());
                    self.update_stats(|st| st.last_error = Some(e.clone()));
                    if permanent {
                        tracing::error!(device = %self.config.device_id, error = %e, "giving up");
                        return Err(None);
                    }
                    min_delay = Duration::from_millis(u64::from(retry_after_ms));
                }
                Err(e) => {
                    tracing::debug!(device = %self.config.device_id, error = %e, "reconnect failed");
                    self.update_stats(|st| st.last_error = Some(e.to_string()));
                    min_delay = Duration::ZERO;
                }
            }
        }
    }

    /// A command while no session runs: points are buffered, requests queued for the next
    /// session, a flush answered (a heartbeat asking for acks goes once connected). `Err` = stop,
    /// as [`Self::reconnect`] returns it.
    fn command_offline(&mut self, cmd: Option<Cmd>) -> Result<(), Option<oneshot::Sender<()>>> {
        match cmd {
            Some(Cmd::Points(p)) => self.add_points(p),
            Some(Cmd::Flush(tx)) => {
                let _ = tx.send(self.flush().0);
            }
            Some(Cmd::Request(kind, tx, result)) => {
                self.queue_request(kind, Some(tx), result);
            }
            Some(Cmd::Reconnect) => {}
            Some(Cmd::Close(tx)) => return Err(Some(tx)),
            None => return Err(None),
        }
        Ok(())
    }

    fn queue_request(
        &mut self,
        kind: RequestKind,
        reply: Option<ReportReply>,
        result: Option<oneshot::Sender<v1::DeviceCommandResult>>,
    ) -> u64 {
        match &kind {
            RequestKind::Subscribe(f) => {
                self.subscriptions.insert(f.clone());
            }
            RequestKind::Unsubscribe(f) => {
                self.subscriptions.remove(f);
            }
            _ => {}
        }
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(
            id,
            Pending {
                kind,
                reply,
                result,
                written: false,
            },
        );
        id
    }

    fn on_request_ack(&mut self, request_id: u64, outcome: Result<u64, v1::Error>) {
        let Some(pending) = self.requests.remove(&request_id) else {
            return;
        };
        let outcome = outcome.map_err(|e| ClientError::Server {
            code: v1::ErrorCode::try_from(e.code).unwrap_or(v1::ErrorCode::Unspecified),
            message: e.message,
        });
        if outcome.is_err()
            && let RequestKind::Subscribe(f) = &pending.kind
        {
            self.subscriptions.remove(f); // refused: do not renew it after reconnects
        }
        if outcome.is_ok()
            && let Some(result) = pending.result
        {
            self.device_commands.insert(request_id, result);
        }
        if let Some(reply) = pending.reply {
            let _ = reply.send(outcome);
        }
    }

    fn on_report_ack(&mut self, ack: v1::TwinReportAck) {
        let outcome = match ack.error {
            None => Ok(ack.reported_version),
            Some(e) => Err(e),
        };
        self.on_request_ack(ack.request_id, outcome);
    }

    fn on_bridge_ack(&mut self, ack: v1::BridgeAck) {
        let outcome = match ack.error {
            None => Ok(ack.id),
            Some(e) => Err(e),
        };
        self.on_request_ack(ack.request_id, outcome);
    }

    /// A new connection: requests the server may not have seen go again if that is harmless,
    /// the others fail; subscriptions are renewed. Returns the frames to write.
    fn requests_after_reconnect(&mut self) -> Vec<ClientControl> {
        let mut frames = Vec::new();
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            // Never written (queued while offline), or harmless to repeat: send it now.
            let send = self
                .requests
                .get(&id)
                .is_some_and(|p| !p.written || p.kind.idempotent());
            if send {
                if let Some(p) = self.requests.get_mut(&id) {
                    p.written = true;
                    frames.push(p.kind.frame(id));
                }
            } else if let Some(p) = self.requests.remove(&id)
                && let Some(reply) = p.reply
            {
                let _ = reply.send(Err(ClientError::Connection(
                    "the connection was lost before the server answered; it may or may not have been done".into(),
                )));
            }
        }
        // Results of device commands sent on the old connection will not come.
        self.device_commands.clear();
        let pending_subscribes: std::collections::BTreeSet<String> = self
            .requests
            .values()
            .filter_map(|p| match &p.kind {
                RequestKind::Subscribe(f) => Some(f.clone()),
                _ => None,
            })
            .collect();
        let renew: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|f| !pending_subscribes.contains(*f))
            .cloned()
            .collect();
        for filter in renew {
            let id = self.next_request;
            self.next_request += 1;
            let kind = RequestKind::Subscribe(filter);
            frames.push(kind.frame(id));
            self.requests.insert(
                id,
                Pending {
                    kind,
                    reply: None,
                    result: None,
                    written: true,
                },
            );
        }
        frames
    }

    fn on_delta(&mut self, delta: v1::TwinDelta) {
        let parse = |s: &str| serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
        self.desired.send_replace(Some(DesiredState {
            version: delta.desired_version,
            delta: parse(&delta.delta_json),
            desired: parse(&delta.desired_json),
        }));
    }

    fn add_points(&mut self, points: Vec<Point>) {
        if self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        for p in points {
            self.pending_bytes += p.to_proto().encoded_len() + 4;
            self.pending.push(p);
            if self.pending.len() >= self.config.max_batch_points
                || self.pending_bytes >= self.max_batch_bytes
            {
                self.seal(false);
            }
        }
    }

    /// Turns the pending points into one numbered, encoded batch; false if none were pending.
    /// With ack coalescing, the batch asks to be acked at once (`ack_now`, protocol §5) if
    /// `ack_now` or if the send buffer is half full with it.
    fn seal(&mut self, ack_now: bool) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let points = std::mem::take(&mut self.pending);
        let ack_now = self.config.coalesces_acks() && {
            let buffered = self.unacked.iter().map(|f| f.points).sum::<usize>() + points.len();
            ack_now || buffered.saturating_mul(2) >= self.config.max_buffered_points
        };
        let batch = v1::TelemetryBatch {
            ack_now,
            seq: self.next_seq,
            points: points.iter().map(Point::to_proto).collect(),
        };
        self.unacked.push_back(Frame {
            seq: self.next_seq,
            points: points.len(),
            bytes: fleetlink_proto::encoded_frame(&batch),
        });
        self.next_seq += 1;
        self.pending_bytes = 0;
        self.pending_since = None;
        true
    }

    /// A flush: seals the pending points into a batch that asks to be acked at once; with none
    /// pending, the server is asked (`Heartbeat.ack_through`) to ack every batch sent so far at
    /// once, if it may hold acks and some are missing. Returns the last batch's seq, and the
    /// heartbeat to write, if any.
    fn flush(&mut self) -> (u64, Option<v1::ClientControl>) {
        let sealed = self.seal(true);
        let last = self.next_seq - 1;
        if sealed || !self.config.coalesces_acks() || *self.acked.borrow() >= last {
            return (last, None);
        }
        self.ack_wanted = self.ack_wanted.max(last);
        (last, Some(crate::connect::ack_request(last)))
    }

    fn on_ack(&mut self, seq: u64) {
        let mut freed = 0usize;
        while self.unacked.front().is_some_and(|f| f.seq <= seq) {
            if let Some(f) = self.unacked.pop_front() {
                freed += f.points;
            }
        }
        self.room.add_permits(freed);
        // Counters first: a flush() woken by the watch must see them.
        self.update_stats(|st| {
            st.points_acked += freed as u64;
            st.acked_seq = st.acked_seq.max(seq);
        });
        self.acked.send_if_modified(|a| {
            let grew = seq > *a;
            *a = (*a).max(seq);
            grew
        });
        if freed > 0 {
            self.settled.send_modify(|n| *n += freed as u64);
        }
    }

    /// Everything before the refused batch is stored (the Welcome waits for it), so the refused
    /// one is the first kept batch: count it as rejected and forget it.
    fn drop_refused(&mut self) {
        let Some(f) = self.unacked.pop_front() else {
            return;
        };
        tracing::error!(device = %self.config.device_id, seq = f.seq, points = f.points, "the server refused this batch; dropping it");
        self.room.add_permits(f.points);
        self.update_stats(|st| st.points_rejected += f.points as u64);
        self.settled.send_modify(|n| *n += f.points as u64);
        if let Ok(mut types) = self.types.lock() {
            *types = MetricTypes::default(); // it learnt a type the server does not have
        }
        // flush() waits for every batch to be settled: acked or, like this one, rejected.
        self.acked.send_if_modified(|a| {
            let grew = f.seq > *a;
            *a = (*a).max(f.seq);
            grew
        });
    }

    async fn run_session(&mut self, s: Session) -> SessionEnd {
        let Session {
            conn,
            mut send,
            mut reader,
            welcome,
            zero_rtt: _,
        } = s;
        // Everything at or below the watermark is stored: forget it; resend the rest.
        self.on_ack(welcome.last_stored_seq);
        if std::mem::take(&mut self.drop_refused_batch) {
            self.drop_refused();
        }
        self.max_batch_bytes = MAX_BATCH_BYTES
            .min(welcome.max_frame_bytes as usize / 2)
            .max(1);
        if self.next_seq <= welcome.last_stored_seq {
            self.next_seq = welcome.last_stored_seq + 1;
        }
        let max_batch = (welcome.max_batch_points as usize).max(1);
        self.config.max_batch_points = self.config.max_batch_points.min(max_batch);
        let mut tele = match conn.open_uni().await {
            Ok(t) => t,
            Err(e) => return SessionEnd::Lost(e.into()),
        };
        if let Err(e) = write_frame(
            &mut tele,
            &StreamHeader {
                kind: StreamKind::Telemetry.into(),
            },
        )
        .await
        {
            return SessionEnd::Lost(e.into());
        }
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(async move {
            loop {
                let ev = match reader.read::<ServerControl>().await {
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::Ack(a)),
                    })) => Event::Ack(a.seq),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::TwinReportAck(a)),
                    })) => Event::ReportAck(a),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::TwinDelta(d)),
                    })) => Event::Delta(d),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::BridgeAck(a)),
                    })) => Event::BridgeAck(a),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::DeviceCommandResult(r)),
                    })) => Event::DeviceCommandResult(r),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::TopicMessage(m)),
                    })) => Event::Incoming(Incoming::Topic {
                        topic: m.topic,
                        payload: m.payload,
                        from: (!m.from_device.is_empty()).then_some(m.from_device),
                        retained: m.retained,
                        published_us: m.published_us,
                    }),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::DirectMessage(m)),
                    })) => Event::Incoming(Incoming::Direct {
                        id: m.message_id,
                        from: m.from_device,
                        payload: m.payload,
                        sent_us: m.sent_us,
                    }),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::MessageExpired(m)),
                    })) => Event::Incoming(Incoming::Expired {
                        id: m.message_id,
                        to: m.to_device,
                    }),
                    Ok(Some(ServerControl {
                        msg: Some(server_control::Msg::Error(e)),
                    })) => Event::Lost(ClientError::Server {
                        code: v1::ErrorCode::try_from(e.code).unwrap_or(v1::ErrorCode::Unspecified),
                        message: e.message,
                    }),
                    Ok(Some(_)) => Event::Heard, // heartbeats; future messages
                    Ok(None) => Event::Lost(ClientError::Connection(
                        "the server finished the control stream".into(),
                    )),
                    Err(e) => Event::Lost(e.into()),
                };
                let lost = matches!(ev, Event::Lost(_));
                if ev_tx.send(ev).is_err() || lost {
                    return;
                }
            }
        });
        // A heartbeat goes out only after an interval without a telemetry ack: an acked batch was
        // seen by the server (protocol §6), so a device streaming at least once per interval
        // sends no heartbeats at all. It asks for no answer: the server's QUIC ACK of it is all
        // that comes back (two packets; an answer would need an ACK of its own, three).
        let hb_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + hb_every, hb_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A server that vanished (killed, network gone) sends no close: declare it dead after the
        // heartbeat timeout without anything from it, a frame or a packet (the QUIC ACKs of the
        // heartbeats, which the server does not answer otherwise; counted at each heartbeat and
        // once more when the time is up).
        let silence = Duration::from_millis(u64::from(welcome.heartbeat_timeout_ms.max(200)));
        let mut last_heard = Instant::now();
        let mut packets_heard = conn.stats().udp_rx.datagrams;
        let mut sent = 0usize; // frames of `unacked` written on this connection
        // Reports and subscriptions of earlier connections go again (both are idempotent).
        for frame in self.requests_after_reconnect() {
            if let Err(e) = write_frame(&mut send, &frame).await {
                return SessionEnd::Lost(e.into());
            }
        }
        // A flush waiting since the last connection wants its acks at once.
        if self.ack_wanted > *self.acked.borrow() {
            let frame = crate::connect::ack_request(self.ack_wanted);
            if let Err(e) = write_frame(&mut send, &frame).await {
                return SessionEnd::Lost(e.into());
            }
        }
        let device = self.config.device_id.to_string();
        let end = loop {
            // Write every sealed batch not yet written on this connection.
            let mut write_error = None;
            while sent < self.unacked.len() {
                match tele.write_chunk(self.unacked[sent].bytes.clone()).await {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        write_error = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = write_error {
                break SessionEnd::Lost(self.close_reason(&conn, TransportError::from(e).into()));
            }
            let linger_at = self.pending_since.map(|t| t + self.config.linger);
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(Cmd::Points(p)) => self.add_points(p),
                    Some(Cmd::Flush(tx)) => {
                        let (last, ask) = self.flush();
                        let _ = tx.send(last);
                        if let Some(frame) = ask
                            && let Err(e) = write_frame(&mut send, &frame).await
                        {
                            break SessionEnd::Lost(e.into());
                        }
                    }
                    Some(Cmd::Request(kind, tx, result)) => {
                        let frame_kind = kind.clone();
                        let request_id = self.queue_request(kind, Some(tx), result);
                        if let Some(p) = self.requests.get_mut(&request_id) {
                            p.written = true;
                        }
                        if let Err(e) = write_frame(&mut send, &frame_kind.frame(request_id)).await {
                            break SessionEnd::Lost(e.into());
                        }
                    }
                    Some(Cmd::Reconnect) => {
                        conn.close(0u32.into(), b"device reconnecting");
                        break SessionEnd::Lost(ClientError::Connection("reconnect requested".into()));
                    }
                    Some(Cmd::Close(tx)) => break SessionEnd::Closed(Some(tx)),
                    None => break SessionEnd::Closed(None),
                },
                stream = conn.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        last_heard = Instant::now();
                        let runner = self.runner.clone();
                        let device = device.clone();
                        let max_frame = welcome.max_frame_bytes;
                        tokio::spawn(async move {
                            let mut reader = fleetlink_transport::FrameReader::new(recv, max_frame);
                            match reader.read::<StreamHeader>().await {
                                Ok(Some(h)) if h.kind == i32::from(StreamKind::Command) => {
                                    runner.serve(send, reader, device).await;
                                }
                                Ok(Some(h)) => tracing::warn!(%device, kind = h.kind, "ignoring a server stream of an unknown kind"),
                                Ok(None) => {}
                                Err(e) => tracing::warn!(%device, error = %e, "unreadable server stream header"),
                            }
                        });
                    }
                    Err(e) => break SessionEnd::Lost(self.close_reason(&conn, e.into())),
                },
                ev = ev_rx.recv() => match ev {
                    Some(Event::Heard) => last_heard = Instant::now(),
                    Some(Event::ReportAck(a)) => { last_heard = Instant::now(); self.on_report_ack(a); }
                    Some(Event::Delta(d)) => { last_heard = Instant::now(); self.on_delta(d); }
                    Some(Event::BridgeAck(a)) => { last_heard = Instant::now(); self.on_bridge_ack(a); }
                    Some(Event::DeviceCommandResult(r)) => {
                        last_heard = Instant::now();
                        if let Some(tx) = self.device_commands.remove(&r.request_id) {
                            let _ = tx.send(r);
                        }
                    }
                    Some(Event::Incoming(m)) => { last_heard = Instant::now(); let _ = self.incoming.send(m); }
                    Some(Event::Ack(seq)) => {
                        last_heard = Instant::now();
                        let before = self.unacked.len();
                        self.on_ack(seq);
                        let freed = before - self.unacked.len();
                        // a batch written on this connection reached the server: it counts as seen
                        if freed > 0 && sent > 0 {
                            heartbeat.reset();
                        }
                        sent = sent.saturating_sub(freed);
                    }
                    Some(Event::Lost(e)) => break SessionEnd::Lost(self.close_reason(&conn, e)),
                    None => break SessionEnd::Lost(ClientError::Connection("control stream reader stopped".into())),
                },
                _ = heartbeat.tick() => {
                    let packets = conn.stats().udp_rx.datagrams;
                    if packets != packets_heard {
                        packets_heard = packets;
                        last_heard = Instant::now();
                    }
                    if let Err(e) = write_frame(&mut send, &crate::connect::quiet_heartbeat()).await {
                        break SessionEnd::Lost(e.into());
                    }
                }
                _ = sleep_until_opt(linger_at) => { self.seal(false); }
                _ = tokio::time::sleep_until(last_heard + silence) => {
                    let packets = conn.stats().udp_rx.datagrams;
                    if packets != packets_heard {
                        packets_heard = packets;
                        last_heard = Instant::now();
                    } else {
                        let e = ClientError::Connection(format!("nothing from the server for {} ms", silence.as_millis()));
                        conn.close(0u32.into(), b"server silent");
                        break SessionEnd::Lost(e);
                    }
                }
                closed = conn.closed() => break SessionEnd::Lost(closed.into()),
            }
        };
        if !matches!(end, SessionEnd::Closed(_)) {
            // The connection is gone, but what the server sent before it went may not have been
            // handled yet (the loop can see the close first): acks free their batches now, not at
            // the next Welcome. A graceful shutdown sends a held ack right before its close.
            let drain = async {
                while let Some(ev) = ev_rx.recv().await {
                    match ev {
                        Event::Ack(seq) => self.on_ack(seq),
                        Event::Lost(_) => break,
                        _ => {}
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_AFTER_LOSS, drain).await;
        }
        reader_task.abort();
        if let SessionEnd::Closed(_) = &end {
            let _ = tele.finish();
            let _ = send.finish();
            conn.close(0u32.into(), b"device closing");
        }
        end
    }

    /// Prefers the connection's close reason (which carries the server's error code) when known.
    fn close_reason(&self, conn: &quinn::Connection, fallback: ClientError) -> ClientError {
        match conn.close_reason() {
            Some(reason) => reason.into(),
            None => fallback,
        }
    }
}

/// How long a session that lost its connection goes on handling what its control stream reader
/// had received (it ends at once on a closed connection; the bound is for a stream that stays).
const DRAIN_AFTER_LOSS: Duration = Duration::from_millis(250);

/// Errors with which the server refuses a batch's content; resending it would fail again.
fn refuses_batch(code: v1::ErrorCode) -> bool {
    use v1::ErrorCode as C;
    matches!(
        code,
        C::InvalidValue
            | C::MalformedFrame
            | C::FrameTooLarge
            | C::SequenceRegression
            | C::UnknownMessage
    )
}

/// Incoming bridge messages a slow reader of [`DeviceClient::incoming`] may fall behind by.
const INCOMING_BUFFER: usize = 1_024;

/// Largest encoded batch the SDK builds; well below the default 1 MiB frame limit.
const MAX_BATCH_BYTES: usize = 256 * 1024;

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coalescing_device_lets_the_server_hold_its_acks_for_the_batches() {
        let t = device_transport(
            Resumption::ZeroRtt,
            Duration::from_millis(250),
            Duration::from_millis(2_500),
            3,
        );
        assert_eq!(t.ack_delay, Some(Duration::from_millis(2_750)));
        assert_eq!(t.ack_threshold, 3);
        assert_eq!(t.resumption, Resumption::ZeroRtt);
    }

    #[test]
    fn without_coalescing_the_device_asks_only_for_its_ack_delay() {
        for (delay, batches) in [
            (Duration::ZERO, 3),
            (Duration::from_micros(400), 3), // the Hello would ask for 0 ms: no coalescing
            (Duration::from_millis(2_500), 1),
        ] {
            let t = device_transport(Resumption::Off, Duration::from_millis(250), delay, batches);
            assert_eq!(
                t.ack_delay,
                Some(Duration::from_millis(250)),
                "{delay:?} {batches}"
            );
            assert_eq!(t.ack_threshold, 1, "{delay:?} {batches}");
        }
    }
}
