//! `OperatorClient`: list devices, read telemetry, provision devices.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetlink_core::command::CommandState;
use fleetlink_core::{DeviceId, MetricName, Value};
use fleetlink_proto::v1::{
    self, ErrorCode, OperatorRequest, OperatorResponse, operator_request, operator_response,
};
use fleetlink_transport::{ClientTransport, FrameReader, write_frame};

use crate::connect::{Endpoint, hello, open_session, quic_config};
use crate::{ClientError, ServerAddress};

/// How an operator connects.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The server.
    pub server: ServerAddress,
    /// An admin token.
    pub token: String,
}

/// Presence of a device as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceInfo {
    /// Connected now.
    pub online: bool,
    /// Since when the current state holds (µs since the epoch; 0 = not seen since the server started).
    pub since_us: i64,
    /// Last frame from the device (µs since the epoch; 0 = never).
    pub last_seen_us: i64,
    /// Address of the current or last connection.
    pub remote_addr: String,
    /// Why it is offline ("closed", "timeout", "error", "server_shutdown"), empty if online or unknown.
    pub offline_reason: String,
}

/// A device with its presence and last values.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Its id.
    pub id: DeviceId,
    /// Presence.
    pub presence: PresenceInfo,
    /// Latest value per metric: (metric, device time µs, value), by metric name.
    pub last_values: Vec<(MetricName, i64, Value)>,
    /// Highest telemetry batch stored.
    pub last_stored_seq: u64,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Attributes (a JSON object).
    pub attributes: serde_json::Value,
    /// Groups it belongs to (static and dynamic).
    pub groups: Vec<String>,
    /// When it was provisioned (µs since the epoch).
    pub created_us: i64,
    /// Points durably stored.
    pub point_count: u64,
}

/// A stored point.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoint {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock, µs since the epoch.
    pub time_us: i64,
    /// Server clock when the batch arrived.
    pub received_us: i64,
    /// The batch it came in.
    pub seq: u64,
    /// The value.
    pub value: Value,
}

/// Stored points of one metric, column by column: one page of
/// [`OperatorClient::query_telemetry_columns`].
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryColumns {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock, µs since the epoch, one per point.
    pub time_us: Vec<i64>,
    /// The values, one per point.
    pub values: ColumnValues,
}

/// The values of a [`TelemetryColumns`] page: packed when the metric holds numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValues {
    /// Doubles.
    Double(Vec<f64>),
    /// Integers.
    Int(Vec<i64>),
    /// Booleans.
    Bool(Vec<bool>),
    /// Strings, positions, or a mix of types.
    Other(Vec<Value>),
}

/// Which telemetry to read.
#[derive(Debug, Clone)]
pub struct TelemetryQuery {
    /// Whose.
    pub device: DeviceId,
    /// Only this metric.
    pub metric: Option<MetricName>,
    /// Inclusive lower bound, µs since the epoch.
    pub start_us: Option<i64>,
    /// Exclusive upper bound, µs since the epoch.
    pub end_us: Option<i64>,
    /// At most this many points.
    pub limit: Option<u32>,
    /// Downsample on the server: one point per metric and bucket of this length.
    pub every: Option<Duration>,
    /// How a bucket is aggregated: "mean" (default), "min", "max", "sum", "count".
    pub agg: Option<String>,
}

impl TelemetryQuery {
    /// Every point of `device`.
    pub fn all(device: DeviceId) -> Self {
        Self {
            device,
            metric: None,
            start_us: None,
            end_us: None,
            limit: None,
            every: None,
            agg: None,
        }
    }
}

/// A device's twin as the server holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// What the device reported (a JSON object).
    pub reported: serde_json::Value,
    /// Version of the reported document.
    pub reported_version: u64,
    /// What operators want (a JSON object).
    pub desired: serde_json::Value,
    /// Version of the desired document: pass it to [`OperatorClient::set_desired`] to update
    /// only if nobody changed it meanwhile.
    pub desired_version: u64,
    /// Desired fields whose value differs from the reported one.
    pub delta: serde_json::Value,
    /// When each reported field last changed (µs), in the shape of the document.
    pub reported_metadata: serde_json::Value,
    /// When each desired field last changed (µs), in the shape of the document.
    pub desired_metadata: serde_json::Value,
}

/// A command to send.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    /// Whose.
    pub device: DeviceId,
    /// Handler name on the device.
    pub name: String,
    /// Arguments.
    pub args: serde_json::Value,
    /// Expires this long after it is queued (`None` = the server's default).
    pub timeout: Option<Duration>,
    /// Sending again with the same key returns the first command instead of a second one.
    pub idempotency_key: Option<String>,
    /// Runs beside other commands instead of one at a time in order.
    pub concurrent: bool,
}

impl CommandRequest {
    /// A command with no arguments and the server's default deadline.
    pub fn new(device: DeviceId, name: impl Into<String>) -> Self {
        Self {
            device,
            name: name.into(),
            args: serde_json::Value::Null,
            timeout: None,
            idempotency_key: None,
            concurrent: false,
        }
    }

    /// With these arguments.
    pub fn args(mut self, args: serde_json::Value) -> Self {
        self.args = args;
        self
    }

    /// Expiring this long after it is queued.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// With an idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Run beside other commands.
    pub fn concurrent(mut self) -> Self {
        self.concurrent = true;
        self
    }
}

/// A command as the server holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandInfo {
    /// Unique id.
    pub id: u64,
    /// Whose.
    pub device: DeviceId,
    /// Handler name.
    pub name: String,
    /// Arguments.
    pub args: serde_json::Value,
    /// Where it stands.
    pub state: CommandState,
    /// When it was queued (µs since the epoch).
    pub created_us: i64,
    /// When it expires (µs since the epoch).
    pub deadline_us: i64,
    /// The operator's idempotency key.
    pub idempotency_key: Option<String>,
    /// Runs beside other commands.
    pub concurrent: bool,
    /// The handler's result (or failure details).
    pub result: Option<serde_json::Value>,
    /// What went wrong.
    pub error: Option<String>,
    /// Every state change, oldest first.
    pub history: Vec<(CommandState, i64)>,
    /// Deliveries so far.
    pub attempts: u32,
}

impl CommandInfo {
    /// The command as a JSON object (for tools that print or hand it on).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "device": self.device.as_str(),
            "name": self.name,
            "args": self.args,
            "state": self.state.name(),
            "created_us": self.created_us,
            "deadline_us": self.deadline_us,
            "idempotency_key": self.idempotency_key,
            "concurrent": self.concurrent,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "history": self
                .history
                .iter()
                .map(|(s, t)| serde_json::json!([s.name(), t]))
                .collect::<Vec<_>>(),
        })
    }
}

/// One entry of a device's connection history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    /// Went online (true) or offline.
    pub online: bool,
    /// When (µs since the epoch).
    pub at_us: i64,
    /// Why it went offline: "closed", "timeout", "kicked", "error", "server_shutdown".
    pub reason: String,
    /// Remote address of the connection.
    pub remote_addr: String,
    /// Server session id of the connection.
    pub session: u64,
}

/// What a job does to each target.
#[derive(Debug, Clone, PartialEq)]
pub enum JobAction {
    /// Run a command (each expires `timeout` after it is queued; `None` = server default).
    Command {
        /// Handler name.
        name: String,
        /// Arguments.
        args: serde_json::Value,
        /// Deadline of each command.
        timeout: Option<Duration>,
    },
    /// Merge this patch into each target's desired twin.
    Desired(serde_json::Value),
}

/// A job to create.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// A name for people.
    pub name: String,
    /// Devices matching this query when the job starts are its targets.
    pub query: String,
    /// What to do to each.
    pub action: JobAction,
    /// Targets unfinished at once (0 = 10).
    pub max_in_flight: u32,
    /// Targets started per minute (0 = no limit).
    pub max_per_minute: u32,
    /// Abort when failed / finished is above this (0 = never) ...
    pub abort_failure_ratio: f64,
    /// ... once at least this many targets finished.
    pub abort_min_finished: u32,
}

impl JobSpec {
    /// A job with default rate (10 at once, no per-minute limit) and no abort rule.
    pub fn new(name: impl Into<String>, query: impl Into<String>, action: JobAction) -> Self {
        Self {
            name: name.into(),
            query: query.into(),
            action,
            max_in_flight: 0,
            max_per_minute: 0,
            abort_failure_ratio: 0.0,
            abort_min_finished: 0,
        }
    }
}

/// A job's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its target query.
    pub query: String,
    /// "running", "completed", "aborted", "cancelled".
    pub state: String,
    /// When it was created (µs since the epoch).
    pub created_us: i64,
    /// When it stopped running (0 = still running).
    pub finished_us: i64,
    /// How many targets it has.
    pub targets: u32,
    /// Targets per state ("pending", "running", "succeeded", "failed", "expired", "rejected",
    /// "cancelled", "skipped").
    pub counts: BTreeMap<String, u32>,
    /// Why it was aborted or cancelled.
    pub reason: String,
}

impl JobInfo {
    /// The job as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "query": self.query, "state": self.state,
            "created_us": self.created_us, "finished_us": self.finished_us,
            "targets": self.targets, "counts": self.counts, "reason": self.reason,
        })
    }

    /// The count of one target state (0 if absent).
    pub fn count(&self, state: &str) -> u32 {
        self.counts.get(state).copied().unwrap_or(0)
    }
}

/// Converts the wire form of a job (as in job events).
pub fn job_info(j: v1::JobInfo) -> JobInfo {
    let state = v1::JobState::try_from(j.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default();
    JobInfo {
        id: j.job_id,
        name: j.name,
        query: j.query,
        state,
        created_us: j.created_us,
        finished_us: j.finished_us,
        targets: j.targets,
        counts: j.counts.into_iter().collect(),
        reason: j.reason,
    }
}

/// A group of devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// Static: the members. Dynamic: the devices matching now.
    pub members: Vec<String>,
    /// Dynamic groups: the query.
    pub query: Option<String>,
}

/// Which live stream to open.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// Telemetry of devices matching `query` (empty = all), only `metrics` (empty = all).
    Telemetry {
        /// Which devices.
        query: String,
        /// Which metrics.
        metrics: Vec<String>,
    },
    /// Online/offline events.
    Presence {
        /// Which devices (empty = all).
        query: String,
    },
    /// Twin changes.
    Twin {
        /// Which devices (empty = all).
        query: String,
    },
    /// Command state changes.
    Commands {
        /// Which devices (empty = all).
        query: String,
    },
    /// Job progress (`job_id` 0 = every job).
    Jobs {
        /// Which job.
        job_id: u64,
    },
    /// A standing query: the initial set, then devices entering and leaving it.
    Query {
        /// The query.
        query: String,
    },
}

/// One event of a live stream.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetEvent {
    /// The stream is set up; for standing queries, how many `Match` events with `initial` follow.
    Subscribed {
        /// Devices matching when it started.
        initial_matches: u32,
    },
    /// This reader was too slow: `dropped` events were skipped.
    Overflow {
        /// How many.
        dropped: u64,
    },
    /// Points a device sent.
    Telemetry {
        /// Whose.
        device: String,
        /// The points.
        points: Vec<fleetlink_core::Point>,
    },
    /// A device went online or offline.
    Presence {
        /// Whose.
        device: String,
        /// What happened.
        event: PresenceEvent,
    },
    /// A twin document changed.
    Twin {
        /// Whose.
        device: String,
        /// "reported" or "desired".
        side: String,
        /// Its version now.
        version: u64,
        /// The document now.
        doc: serde_json::Value,
        /// The delta now.
        delta: serde_json::Value,
    },
    /// A command changed state.
    Command(CommandInfo),
    /// A job made progress.
    Job(JobInfo),
    /// A device started (`matches`) or stopped matching a standing query.
    Match {
        /// Which device.
        device: String,
        /// Matches now.
        matches: bool,
        /// Part of the initial set.
        initial: bool,
    },
}

/// A live stream; dropping it ends the subscription.
#[derive(Debug)]
pub struct EventStream {
    _send: quinn::SendStream,
    reader: FrameReader,
    pushed_back: Option<FleetEvent>,
}

impl EventStream {
    /// The next event; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<FleetEvent>, ClientError> {
        if let Some(e) = self.pushed_back.take() {
            return Ok(Some(e));
        }
        loop {
            let Some(OperatorResponse { response }) =
                self.reader.read::<OperatorResponse>().await?
            else {
                return Ok(None);
            };
            match response {
                Some(operator_response::Response::Event(e)) => {
                    if let Some(event) = fleet_event(e)? {
                        return Ok(Some(event));
                    }
                }
                Some(operator_response::Response::Error(e)) => {
                    return Err(ClientError::Server {
                        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                        message: e.message,
                    });
                }
                Some(other) => return Err(unexpected(&other)),
                None => return Err(ClientError::Protocol("an empty OperatorResponse".into())),
            }
        }
    }

    /// Like [`EventStream::next`], failing with [`ClientError::Timeout`] after `timeout`.
    pub async fn next_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<FleetEvent>, ClientError> {
        tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }
}

fn fleet_event(e: v1::Event) -> Result<Option<FleetEvent>, ClientError> {
    use v1::event::Event as E;
    Ok(Some(match e.event {
        None => return Ok(None), // a newer kind of event: skip it
        Some(E::Subscribed(s)) => FleetEvent::Subscribed {
            initial_matches: s.initial_matches,
        },
        Some(E::Overflow(o)) => FleetEvent::Overflow { dropped: o.dropped },
        Some(E::Telemetry(t)) => FleetEvent::Telemetry {
            device: t.device_id,
            points: t
                .points
                .into_iter()
                .map(|p| {
                    Ok(fleetlink_core::Point {
                        metric: metric(p.metric)?,
                        time_us: p.time_us,
                        value: value(p.value)?,
                    })
                })
                .collect::<Result<_, ClientError>>()?,
        },
        Some(E::Presence(p)) => {
            let e = p.event.unwrap_or_default();
            FleetEvent::Presence {
                device: p.device_id,
                event: PresenceEvent {
                    online: e.online,
                    at_us: e.at_us,
                    reason: e.reason,
                    remote_addr: e.remote_addr,
                    session: e.session_id,
                },
            }
        }
        Some(E::Twin(t)) => FleetEvent::Twin {
            device: t.device_id,
            side: t.side,
            version: t.version,
            doc: json(&t.doc_json, "twin document")?,
            delta: json(&t.delta_json, "twin delta")?,
        },
        Some(E::Command(c)) => FleetEvent::Command(command_info(c)?),
        Some(E::Job(j)) => FleetEvent::Job(job_info(j)),
        Some(E::Match(m)) => FleetEvent::Match {
            device: m.device_id,
            matches: m.matches,
            initial: m.initial,
        },
    }))
}

/// A device to create with [`OperatorClient::provision_devices`].
#[derive(Debug, Clone)]
pub struct NewDeviceSpec {
    /// Its id.
    pub id: DeviceId,
    /// Free key/value tags.
    pub tags: BTreeMap<String, String>,
    /// Attributes, a JSON object (empty = none).
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

impl NewDeviceSpec {
    /// A device with no tags or attributes.
    pub fn new(id: DeviceId) -> Self {
        Self {
            id,
            tags: BTreeMap::new(),
            attributes: serde_json::Map::new(),
        }
    }
}

/// The longest wait one `WaitCommand` (or `SendCommand.wait_ms`) may ask the server for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// An operator session.
#[derive(Debug)]
pub struct OperatorClient {
    conn: quinn::Connection,
    /// The server's frame size limit, from its Welcome.
    max_frame_bytes: u32,
    /// The task that keeps the connection from going idle, and owns the control stream: stopped
    /// when this is dropped, which finishes the control stream and so ends the session.
    heartbeats: tokio::task::AbortHandle,
    _endpoint: Endpoint,
}

impl Drop for OperatorClient {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

/// Sends a heartbeat on the operator's control stream every `every`, asking for no answer (the
/// server's QUIC ACK of it is all that comes back), until the stream fails.
///
/// Operators are not subject to the heartbeat timeout, but the server's QUIC idle timeout is
/// twice its `heartbeat_timeout_ms` (protocol §6): a connection with nothing to say for that long
/// is closed. A QUIC keep-alive would have to be chosen before the Welcome tells the timeout; the
/// Welcome's `heartbeat_interval_ms`, below the timeout, fits whatever the server is configured
/// with.
async fn keep_alive(mut control: quinn::SendStream, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if write_frame(&mut control, &crate::connect::quiet_heartbeat())
            .await
            .is_err()
        {
            return; // the connection is gone: requests on it fail with its error
        }
    }
}

impl OperatorClient {
    /// Connects and authenticates with an admin token.
    pub async fn connect(config: OperatorConfig) -> Result<Self, ClientError> {
        let endpoint = Endpoint::for_server(config.server.addr)?;
        let session = open_session(
            &endpoint,
            &config.server,
            &quic_config(&config.server, &ClientTransport::default())?,
            hello(v1::Role::Operator, "", &config.token),
        )
        .await?;
        let every = Duration::from_millis(u64::from(session.welcome.heartbeat_interval_ms.max(10)));
        let heartbeats = tokio::spawn(keep_alive(session.send, every)).abort_handle();
        Ok(Self {
            conn: session.conn,
            max_frame_bytes: session.welcome.max_frame_bytes,
            heartbeats,
            _endpoint: endpoint,
        })
    }

    async fn request(
        &self,
        request: operator_request::Request,
    ) -> Result<Vec<operator_response::Response>, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &OperatorRequest {
                request: Some(request),
            },
        )
        .await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, u32::MAX >> 4);
        let mut out = Vec::new();
        while let Some(OperatorResponse { response }) = reader.read::<OperatorResponse>().await? {
            match response {
                Some(operator_response::Response::Error(e)) => {
                    return Err(ClientError::Server {
                        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                        message: e.message,
                    });
                }
                Some(r) => out.push(r),
                None => return Err(ClientError::Protocol("an empty OperatorResponse".into())),
            }
        }
        Ok(out)
    }

    /// Devices in id order, with presence and last values. `after` and `limit` page through them.
    pub async fn list_devices(
        &self,
        after: Option<&DeviceId>,
        limit: Option<u32>,
    ) -> Result<Vec<DeviceInfo>, ClientError> {
        let req = v1::ListDevices {
            after: after.map(|a| a.to_string()).unwrap_or_default(),
            limit: limit.unwrap_or(0),
        };
        let mut out = Vec::new();
        for r in self
            .request(operator_request::Request::ListDevices(req))
            .await?
        {
            match r {
                operator_response::Response::Devices(page) => {
                    for d in page.devices {
                        out.push(device_info(d)?);
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// One device.
    pub async fn device(&self, id: &DeviceId) -> Result<DeviceInfo, ClientError> {
        let req = v1::GetDevice {
            device_id: id.to_string(),
        };
        match self
            .request(operator_request::Request::GetDevice(req))
            .await?
            .pop()
        {
            Some(operator_response::Response::Device(d)) => device_info(d),
            Some(other) => Err(unexpected(&other)),
            None => Err(ClientError::Protocol("no response to GetDevice".into())),
        }
    }

    /// Stored points: grouped by metric (in the order the server first stored each), then by time.
    pub async fn query_telemetry(
        &self,
        q: TelemetryQuery,
    ) -> Result<Vec<StoredPoint>, ClientError> {
        let req = query_request(q, false);
        let mut out = Vec::new();
        for r in self
            .request(operator_request::Request::QueryTelemetry(req))
            .await?
        {
            match r {
                operator_response::Response::Telemetry(page) => {
                    for p in page.points {
                        out.push(StoredPoint {
                            metric: metric(p.metric)?,
                            time_us: p.time_us,
                            received_us: p.received_us,
                            seq: p.seq,
                            value: value(p.value)?,
                        });
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// The raw points of `q` column by column, in pages of up to tens of thousands of points of
    /// one metric each (in the order of [`OperatorClient::query_telemetry`]): the fast way to read
    /// long histories. `q.every` must be unset.
    pub async fn query_telemetry_columns(
        &self,
        q: TelemetryQuery,
    ) -> Result<Vec<TelemetryColumns>, ClientError> {
        use fleetlink_proto::columns;
        use v1::telemetry_columns::Values;

        let req = query_request(q, true);
        let protocol = |e: columns::ColumnError| ClientError::Protocol(e.to_string());
        let mut out = Vec::new();
        for r in self
            .request(operator_request::Request::QueryTelemetry(req))
            .await?
        {
            let page = match r {
                operator_response::Response::TelemetryColumns(page) => page,
                other => return Err(unexpected(&other)),
            };
            let n = page.count as usize;
            if n == 0 {
                continue;
            }
            let values = match page.values {
                Some(Values::Doubles(b)) => {
                    ColumnValues::Double(columns::decode_doubles(&b, n).map_err(protocol)?)
                }
                Some(Values::Ints(b)) => {
                    ColumnValues::Int(columns::decode_ints(&b, n).map_err(protocol)?)
                }
                Some(Values::Bools(b)) => {
                    ColumnValues::Bool(columns::decode_bools(&b, n).map_err(protocol)?)
                }
                Some(Values::Other(list)) => {
                    if list.values.len() != n {
                        return Err(ClientError::Protocol(format!(
                            "TelemetryColumns.other: {} values for {n} points",
                            list.values.len()
                        )));
                    }
                    ColumnValues::Other(
                        list.values
                            .into_iter()
                            .map(|v| value(Some(v)))
                            .collect::<Result<_, _>>()?,
                    )
                }
                None => {
                    return Err(ClientError::Protocol(
                        "TelemetryColumns without values".into(),
                    ));
                }
            };
            out.push(TelemetryColumns {
                metric: metric(page.metric)?,
                time_us: columns::decode_times(&page.time_us, n).map_err(protocol)?,
                values,
            });
        }
        Ok(out)
    }

    /// Creates a device; returns its token (shown once: the server keeps only a hash).
    pub async fn provision_device(
        &self,
        id: &DeviceId,
        tags: BTreeMap<String, String>,
    ) -> Result<String, ClientError> {
        self.provision_device_with(id, tags, serde_json::Map::new())
            .await
    }

    /// Creates a device with tags and attributes (a JSON object); returns its token.
    pub async fn provision_device_with(
        &self,
        id: &DeviceId,
        tags: BTreeMap<String, String>,
        attributes: serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ClientError> {
        let req = v1::ProvisionDevice {
            device_id: id.to_string(),
            tags: tags.into_iter().collect(),
            attributes_json: serde_json::Value::Object(attributes).to_string(),
        };
        match self
            .request(operator_request::Request::ProvisionDevice(req))
            .await?
            .pop()
        {
            Some(operator_response::Response::Provisioned(p)) => Ok(p.token),
            Some(other) => Err(unexpected(&other)),
            None => Err(ClientError::Protocol(
                "no response to ProvisionDevice".into(),
            )),
        }
    }

    /// Creates up to [`fleetlink_proto::MAX_PROVISION_BATCH`] devices in one server transaction
    /// (all of them or, on any error, none); returns each device's token, in the order given.
    /// Import a larger fleet in several calls, keeping each call's tokens before the next.
    pub async fn provision_devices(
        &self,
        devices: Vec<NewDeviceSpec>,
    ) -> Result<Vec<(DeviceId, String)>, ClientError> {
        let n = devices.len();
        if n == 0 || n > fleetlink_proto::MAX_PROVISION_BATCH {
            return Err(ClientError::InvalidArgument(format!(
                "provision_devices takes 1 to {} devices, not {n}",
                fleetlink_proto::MAX_PROVISION_BATCH
            )));
        }
        let req = v1::ProvisionDevices {
            devices: devices
                .into_iter()
                .map(|d| v1::ProvisionDevice {
                    device_id: d.id.to_string(),
                    tags: d.tags.into_iter().collect(),
                    attributes_json: serde_json::Value::Object(d.attributes).to_string(),
                })
                .collect(),
        };
        let len = prost::Message::encoded_len(&req);
        if len > self.max_frame_bytes as usize {
            return Err(ClientError::InvalidArgument(format!(
                "these {n} devices take {len} bytes, more than the server's frame limit of {}: \
                 provision fewer at a time",
                self.max_frame_bytes
            )));
        }
        match self
            .single(operator_request::Request::ProvisionDevices(req))
            .await?
        {
            operator_response::Response::ProvisionedDevices(p) if p.devices.len() == n => p
                .devices
                .into_iter()
                .map(|p| {
                    let id = DeviceId::new(p.device_id)
                        .map_err(|e| ClientError::Protocol(format!("provisioned device: {e}")))?;
                    Ok((id, p.token))
                })
                .collect(),
            operator_response::Response::ProvisionedDevices(p) => Err(ClientError::Protocol(
                format!("{} tokens for {n} devices", p.devices.len()),
            )),
            other => Err(unexpected(&other)),
        }
    }

    async fn single(
        &self,
        request: operator_request::Request,
    ) -> Result<operator_response::Response, ClientError> {
        self.request(request)
            .await?
            .pop()
            .ok_or_else(|| ClientError::Protocol("an empty answer".into()))
    }

    async fn twin_request(&self, request: operator_request::Request) -> Result<Twin, ClientError> {
        match self.single(request).await? {
            operator_response::Response::Twin(t) => twin(t),
            other => Err(unexpected(&other)),
        }
    }

    async fn command_request(
        &self,
        request: operator_request::Request,
    ) -> Result<CommandInfo, ClientError> {
        match self.single(request).await? {
            operator_response::Response::Command(c) => command_info(c),
            other => Err(unexpected(&other)),
        }
    }

    /// A device's twin (online or not).
    pub async fn twin(&self, device: &DeviceId) -> Result<Twin, ClientError> {
        self.twin_request(operator_request::Request::GetTwin(v1::GetTwin {
            device_id: device.to_string(),
        }))
        .await
    }

    /// Merges `patch` (RFC 7386 JSON merge patch: `null` deletes a field) into the desired
    /// document. With `expected_version`, fails with [`ErrorCode::Conflict`] if the desired
    /// document is at another version.
    pub async fn set_desired(
        &self,
        device: &DeviceId,
        patch: serde_json::Value,
        expected_version: Option<u64>,
    ) -> Result<Twin, ClientError> {
        self.twin_request(operator_request::Request::UpdateDesired(
            v1::UpdateDesired {
                device_id: device.to_string(),
                patch_json: patch.to_string(),
                expected_version,
            },
        ))
        .await
    }

    /// Queues a command; returns once it is durably stored (state queued, or delivered already).
    pub async fn send_command(&self, request: CommandRequest) -> Result<CommandInfo, ClientError> {
        self.submit_command(request, 0).await
    }

    /// `SendCommand`, answered once stored (`wait_ms` 0) or once finished (at most `wait_ms`).
    async fn submit_command(
        &self,
        request: CommandRequest,
        wait_ms: u32,
    ) -> Result<CommandInfo, ClientError> {
        let deadline_us = match request.timeout {
            None => 0,
            Some(t) => {
                crate::now_us().saturating_add(i64::try_from(t.as_micros()).unwrap_or(i64::MAX))
            }
        };
        self.command_request(operator_request::Request::SendCommand(v1::SendCommand {
            device_id: request.device.to_string(),
            name: request.name,
            args_json: request.args.to_string(),
            deadline_us,
            idempotency_key: request.idempotency_key.unwrap_or_default(),
            concurrent: request.concurrent,
            wait_ms,
        }))
        .await
    }

    /// One command.
    pub async fn command(&self, id: u64) -> Result<CommandInfo, ClientError> {
        self.command_request(operator_request::Request::GetCommand(v1::GetCommand {
            command_id: id,
        }))
        .await
    }

    /// Commands of a device, newest first: only those in `state` if given, only ids below
    /// `before` (paging), at most `limit` (0 = 100).
    pub async fn list_commands(
        &self,
        device: &DeviceId,
        state: Option<CommandState>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CommandInfo>, ClientError> {
        let req = v1::ListCommands {
            device_id: device.to_string(),
            state: state
                .map_or(v1::CommandState::Unspecified, state_to_proto)
                .into(),
            before_id: before.unwrap_or(0),
            limit,
        };
        match self
            .single(operator_request::Request::ListCommands(req))
            .await?
        {
            operator_response::Response::Commands(page) => {
                page.commands.into_iter().map(command_info).collect()
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Cancels an unfinished command; fails with [`ErrorCode::Conflict`] if it finished already.
    pub async fn cancel_command(&self, id: u64) -> Result<CommandInfo, ClientError> {
        self.command_request(operator_request::Request::CancelCommand(
            v1::CancelCommand { command_id: id },
        ))
        .await
    }

    /// Waits until the command finishes or `timeout` passes (at most 10 minutes), and returns
    /// it either way: check [`CommandState::is_terminal`].
    pub async fn wait_command(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<CommandInfo, ClientError> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        self.command_request(operator_request::Request::WaitCommand(v1::WaitCommand {
            command_id: id,
            timeout_ms,
        }))
        .await
    }

    /// Sends a command and waits until it finishes or `timeout` passes, and returns it either
    /// way (check [`CommandState::is_terminal`]): [`Self::send_command`] then
    /// [`Self::wait_command`] in one request (a `SendCommand` with `wait_ms`) when `timeout` is
    /// at most 10 minutes, with `WaitCommand`s after that for longer ones.
    pub async fn send_command_and_wait(
        &self,
        request: CommandRequest,
        timeout: Duration,
    ) -> Result<CommandInfo, ClientError> {
        let started = std::time::Instant::now();
        let first = timeout.min(MAX_WAIT);
        let mut info = self
            .submit_command(
                request,
                u32::try_from(first.as_millis()).unwrap_or(u32::MAX),
            )
            .await?;
        while !info.state.is_terminal() {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            info = self.wait_command(info.id, left.min(MAX_WAIT)).await?;
        }
        Ok(info)
    }

    /// Sends a command and waits for its result: the handler's JSON result if it succeeded,
    /// [`ClientError::Command`] if it failed, was rejected, expired or was cancelled, and
    /// [`ClientError::Timeout`] if it is still running after `timeout`.
    pub async fn run_command(
        &self,
        request: CommandRequest,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let done = self.send_command_and_wait(request, timeout).await?;
        match done.state {
            CommandState::Succeeded => Ok(done.result.unwrap_or(serde_json::Value::Null)),
            s if s.is_terminal() => Err(ClientError::Command {
                id: done.id,
                state: s,
                error: done.error.unwrap_or_default(),
            }),
            _ => Err(ClientError::Timeout(timeout)),
        }
    }

    /// A device's connection history, newest first (at most `limit`; 0 = 100).
    pub async fn presence_history(
        &self,
        device: &DeviceId,
        limit: u32,
    ) -> Result<Vec<PresenceEvent>, ClientError> {
        let req = v1::PresenceHistory {
            device_id: device.to_string(),
            limit,
        };
        match self
            .single(operator_request::Request::PresenceHistory(req))
            .await?
        {
            operator_response::Response::PresenceHistory(page) => Ok(page
                .events
                .into_iter()
                .map(|e| PresenceEvent {
                    online: e.online,
                    at_us: e.at_us,
                    reason: e.reason,
                    remote_addr: e.remote_addr,
                    session: e.session_id,
                })
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    /// Changes a device's tags (set, then remove) and merges `attributes_patch` (RFC 7386)
    /// into its attributes. Returns the device.
    pub async fn update_device(
        &self,
        id: &DeviceId,
        set_tags: BTreeMap<String, String>,
        remove_tags: Vec<String>,
        attributes_patch: Option<serde_json::Value>,
    ) -> Result<DeviceInfo, ClientError> {
        let req = v1::UpdateDevice {
            device_id: id.to_string(),
            set_tags: set_tags.into_iter().collect(),
            remove_tags,
            attributes_patch_json: attributes_patch.map(|p| p.to_string()).unwrap_or_default(),
        };
        match self
            .single(operator_request::Request::UpdateDevice(req))
            .await?
        {
            operator_response::Response::Device(d) => device_info(d),
            other => Err(unexpected(&other)),
        }
    }

    /// Devices matching `query` (see docs/queries.md) in id order, evaluated on the devices'
    /// live state: one page of at most `limit` (0 = 1000) after `after`. Returns the page and the
    /// cursor for the next one (`None` = last page).
    pub async fn query_devices(
        &self,
        query: &str,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<(Vec<DeviceInfo>, Option<DeviceId>), ClientError> {
        let req = v1::QueryDevices {
            query: query.to_owned(),
            after: after.map(|a| a.to_string()).unwrap_or_default(),
            limit,
        };
        let mut out = Vec::new();
        let mut next = None;
        for r in self
            .request(operator_request::Request::QueryDevices(req))
            .await?
        {
            match r {
                operator_response::Response::Devices(page) => {
                    for d in page.devices {
                        out.push(device_info(d)?);
                    }
                    if !page.next_after.is_empty() {
                        next = Some(
                            DeviceId::new(page.next_after)
                                .map_err(|e| ClientError::Protocol(e.to_string()))?,
                        );
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
        Ok((out, next))
    }

    /// Creates or replaces a static group (`members`) or a dynamic one (`query`). Returns every group.
    pub async fn put_group(
        &self,
        name: &str,
        members: Vec<DeviceId>,
        query: Option<&str>,
    ) -> Result<Vec<Group>, ClientError> {
        let req = v1::PutGroup {
            name: name.to_owned(),
            members: members.iter().map(ToString::to_string).collect(),
            query: query.unwrap_or_default().to_owned(),
        };
        self.groups_request(operator_request::Request::PutGroup(req))
            .await
    }

    /// Deletes a group.
    pub async fn delete_group(&self, name: &str) -> Result<(), ClientError> {
        let req = v1::DeleteGroup {
            name: name.to_owned(),
        };
        match self
            .single(operator_request::Request::DeleteGroup(req))
            .await?
        {
            operator_response::Response::Done(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Every group with its members (for dynamic groups: the devices matching now).
    pub async fn groups(&self) -> Result<Vec<Group>, ClientError> {
        self.groups_request(operator_request::Request::ListGroups(v1::ListGroups {}))
            .await
    }

    async fn groups_request(
        &self,
        request: operator_request::Request,
    ) -> Result<Vec<Group>, ClientError> {
        match self.single(request).await? {
            operator_response::Response::Groups(list) => Ok(list
                .groups
                .into_iter()
                .map(|g| Group {
                    name: g.name,
                    members: g.members,
                    query: (!g.query.is_empty()).then_some(g.query),
                })
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    /// Publishes to a topic as an operator (no policy check). Returns how many subscribers got it.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> Result<String, ClientError> {
        let req = v1::OperatorPublish {
            topic: topic.to_owned(),
            payload: payload.into(),
            retain,
        };
        match self.single(operator_request::Request::Publish(req)).await? {
            operator_response::Response::Done(d) => Ok(d.message),
            other => Err(unexpected(&other)),
        }
    }

    /// Would the policy let `from` do `action` ("publish", "subscribe", "message", "command") to
    /// `target` (a topic, a filter or a device id)? Returns the decision and the reason.
    pub async fn check_policy(
        &self,
        from: &DeviceId,
        action: &str,
        target: &str,
    ) -> Result<(bool, String), ClientError> {
        let req = v1::CheckPolicy {
            from_device: from.to_string(),
            action: action.to_owned(),
            target: target.to_owned(),
        };
        match self
            .single(operator_request::Request::CheckPolicy(req))
            .await?
        {
            operator_response::Response::PolicyDecision(d) => Ok((d.allowed, d.reason)),
            other => Err(unexpected(&other)),
        }
    }

    /// Makes the server reread its policy from its config file.
    pub async fn reload_policy(&self) -> Result<String, ClientError> {
        match self
            .single(operator_request::Request::ReloadPolicy(v1::ReloadPolicy {}))
            .await?
        {
            operator_response::Response::Done(d) => Ok(d.message),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a job and starts it; returns its first progress.
    pub async fn create_job(&self, spec: JobSpec) -> Result<JobInfo, ClientError> {
        let action = match spec.action {
            JobAction::Command {
                name,
                args,
                timeout,
            } => v1::create_job::Action::Command(v1::JobCommand {
                name,
                args_json: args.to_string(),
                timeout_ms: timeout.map_or(0, |t| {
                    u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1)
                }),
            }),
            JobAction::Desired(patch) => {
                v1::create_job::Action::DesiredPatchJson(patch.to_string())
            }
        };
        let req = v1::CreateJob {
            name: spec.name,
            query: spec.query,
            action: Some(action),
            max_in_flight: spec.max_in_flight,
            max_per_minute: spec.max_per_minute,
            abort_failure_ratio: spec.abort_failure_ratio,
            abort_min_finished: spec.abort_min_finished,
        };
        self.job_request(operator_request::Request::CreateJob(req))
            .await
    }

    /// A job's progress.
    pub async fn job(&self, id: u64) -> Result<JobInfo, ClientError> {
        self.job_request(operator_request::Request::GetJob(v1::GetJob { job_id: id }))
            .await
    }

    /// Cancels a running job (targets not started are skipped, running commands cancelled).
    pub async fn cancel_job(&self, id: u64) -> Result<JobInfo, ClientError> {
        self.job_request(operator_request::Request::CancelJob(v1::CancelJob {
            job_id: id,
        }))
        .await
    }

    /// Jobs, newest first (at most `limit`; 0 = 100).
    pub async fn jobs(&self, limit: u32) -> Result<Vec<JobInfo>, ClientError> {
        match self
            .single(operator_request::Request::ListJobs(v1::ListJobs { limit }))
            .await?
        {
            operator_response::Response::Jobs(list) => {
                Ok(list.jobs.into_iter().map(job_info).collect())
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn job_request(
        &self,
        request: operator_request::Request,
    ) -> Result<JobInfo, ClientError> {
        match self.single(request).await? {
            operator_response::Response::Job(j) => Ok(job_info(j)),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens a live stream. Read it with [`EventStream::next`]; drop it to stop.
    pub async fn subscribe(&self, subscription: Subscription) -> Result<EventStream, ClientError> {
        use v1::subscribe::Stream;
        let stream = match subscription {
            Subscription::Telemetry { query, metrics } => {
                Stream::Telemetry(v1::TelemetryStream { query, metrics })
            }
            Subscription::Presence { query } => Stream::Presence(v1::QueryScope { query }),
            Subscription::Twin { query } => Stream::Twin(v1::QueryScope { query }),
            Subscription::Commands { query } => Stream::Commands(v1::QueryScope { query }),
            Subscription::Jobs { job_id } => Stream::Jobs(v1::JobScope { job_id }),
            Subscription::Query { query } => Stream::Query(v1::QueryScope { query }),
        };
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &OperatorRequest {
                request: Some(operator_request::Request::Subscribe(v1::Subscribe {
                    stream: Some(stream),
                })),
            },
        )
        .await?;
        let mut events = EventStream {
            _send: send,
            reader: FrameReader::new(recv, u32::MAX >> 4),
            pushed_back: None,
        };
        // The first event says the subscription is set up (or the request was refused).
        match events.next().await? {
            Some(first @ FleetEvent::Subscribed { .. }) => {
                events.pushed_back = Some(first);
                Ok(events)
            }
            Some(other) => Err(ClientError::Protocol(format!(
                "expected Subscribed first, got {other:?}"
            ))),
            None => Err(ClientError::Protocol(
                "the server ended the subscription at once".into(),
            )),
        }
    }

    /// Waits until the session ends, and says why: closed by either side, timed out, lost.
    pub async fn closed(&self) -> ClientError {
        self.conn.closed().await.into()
    }

    /// Closes the session.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"operator closing");
    }
}

/// The QueryTelemetry request for `q`, answered in rows or (`columns`) in column pages.
fn query_request(q: TelemetryQuery, columns: bool) -> v1::QueryTelemetry {
    v1::QueryTelemetry {
        device_id: q.device.to_string(),
        metric: q.metric.map(|m| m.to_string()).unwrap_or_default(),
        start_us: q.start_us.unwrap_or(0),
        end_us: q.end_us.unwrap_or(0),
        limit: q.limit.unwrap_or(0),
        every_us: q.every.map_or(0, |e| {
            i64::try_from(e.as_micros()).unwrap_or(i64::MAX).max(1)
        }),
        agg: q.agg.unwrap_or_default(),
        columns,
    }
}

fn unexpected(r: &operator_response::Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

fn metric(s: String) -> Result<MetricName, ClientError> {
    MetricName::new(s).map_err(|e| ClientError::Protocol(e.to_string()))
}

fn value(v: Option<v1::Value>) -> Result<Value, ClientError> {
    Value::from_proto(v, 0, "").map_err(|e| ClientError::Protocol(e.to_string()))
}

fn json(text: &str, what: &str) -> Result<serde_json::Value, ClientError> {
    if text.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(text)
        .map_err(|e| ClientError::Protocol(format!("{what} is not valid JSON: {e}")))
}

fn twin(t: v1::Twin) -> Result<Twin, ClientError> {
    Ok(Twin {
        reported: json(&t.reported_json, "the reported twin")?,
        reported_version: t.reported_version,
        desired: json(&t.desired_json, "the desired twin")?,
        desired_version: t.desired_version,
        delta: json(&t.delta_json, "the twin delta")?,
        reported_metadata: json(&t.reported_metadata_json, "twin metadata")?,
        desired_metadata: json(&t.desired_metadata_json, "twin metadata")?,
    })
}

fn state_to_proto(s: CommandState) -> v1::CommandState {
    match s {
        CommandState::Queued => v1::CommandState::Queued,
        CommandState::Delivered => v1::CommandState::Delivered,
        CommandState::Succeeded => v1::CommandState::Succeeded,
        CommandState::Failed => v1::CommandState::Failed,
        CommandState::Expired => v1::CommandState::Expired,
        CommandState::Rejected => v1::CommandState::Rejected,
        CommandState::Cancelled => v1::CommandState::Cancelled,
    }
}

pub(crate) fn state_from_proto(s: i32) -> Result<CommandState, ClientError> {
    Ok(match v1::CommandState::try_from(s) {
        Ok(v1::CommandState::Queued) => CommandState::Queued,
        Ok(v1::CommandState::Delivered) => CommandState::Delivered,
        Ok(v1::CommandState::Succeeded) => CommandState::Succeeded,
        Ok(v1::CommandState::Failed) => CommandState::Failed,
        Ok(v1::CommandState::Expired) => CommandState::Expired,
        Ok(v1::CommandState::Rejected) => CommandState::Rejected,
        Ok(v1::CommandState::Cancelled) => CommandState::Cancelled,
        _ => return Err(ClientError::Protocol(format!("unknown command state {s}"))),
    })
}

fn command_info(c: v1::CommandInfo) -> Result<CommandInfo, ClientError> {
    Ok(CommandInfo {
        id: c.command_id,
        device: DeviceId::new(c.device_id).map_err(|e| ClientError::Protocol(e.to_string()))?,
        args: json(&c.args_json, "command arguments")?,
        name: c.name,
        state: state_from_proto(c.state)?,
        created_us: c.created_us,
        deadline_us: c.deadline_us,
        idempotency_key: (!c.idempotency_key.is_empty()).then_some(c.idempotency_key),
        concurrent: c.concurrent,
        result: if c.result_json.is_empty() {
            None
        } else {
            Some(json(&c.result_json, "the command result")?)
        },
        error: (!c.error.is_empty()).then_some(c.error),
        history: c
            .history
            .into_iter()
            .map(|h| Ok((state_from_proto(h.state)?, h.at_us)))
            .collect::<Result<_, ClientError>>()?,
        attempts: c.attempts,
    })
}

fn device_info(d: v1::DeviceInfo) -> Result<DeviceInfo, ClientError> {
    let p = d.presence.unwrap_or_default();
    Ok(DeviceInfo {
        id: DeviceId::new(d.device_id).map_err(|e| ClientError::Protocol(e.to_string()))?,
        presence: PresenceInfo {
            online: p.online,
            since_us: p.since_us,
            last_seen_us: p.last_seen_us,
            remote_addr: p.remote_addr,
            offline_reason: p.offline_reason,
        },
        last_values: d
            .last_values
            .into_iter()
            .map(|v| Ok((metric(v.metric)?, v.time_us, value(v.value)?)))
            .collect::<Result<_, ClientError>>()?,
        last_stored_seq: d.last_stored_seq,
        attributes: json(&d.attributes_json, "device attributes")?,
        groups: d.groups,
        tags: d.tags.into_iter().collect(),
        created_us: d.created_us,
        point_count: d.point_count,
    })
}
