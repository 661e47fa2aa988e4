//! Operator sessions: one bidirectional stream per request, answered from the actors' live state
//! and the store.

use std::sync::Arc;

use fleetlink_core::credentials::Token;
use fleetlink_core::presence::{PresenceState, SessionId};
use fleetlink_core::{DeviceId, MetricName};
use fleetlink_proto::MAX_PROVISION_BATCH;
use fleetlink_proto::v1::{
    self, ClientControl, ErrorCode, OperatorRequest, OperatorResponse, client_control,
    operator_request, operator_response,
};
use fleetlink_store::{DeviceRecord, NewDevice, StoreError, TelemetryQuery};
use fleetlink_transport::{FrameReader, write_frame};
use rand::RngCore as _;

use crate::actor::{GetSnapshot, Snapshot};
use crate::command::{CancelCommand, CommandError, OpenCommand, SubmitCommand, WatchCommand};
use crate::now_us;
use crate::session::{Control, Shared, close_with_error, welcome};
use crate::twin::{GetTwin, TwinRequestError, UpdateDesired};
use fleetlink_core::command::CommandState;
use fleetlink_core::twin::TwinPatch;
use fleetlink_store::{CommandFilter, CommandRecord, NewCommand};

/// Points per TelemetryPage frame (well under the frame size limit).
const POINTS_PER_PAGE: usize = 2_000;
/// Points of numbers per TelemetryColumns frame: at most ~600 KB (8 bytes of value and up to 10
/// of time each), under the 1 MiB default frame limit.
const COLUMN_POINTS_PER_PAGE: usize = 32_768;
/// Devices per DevicePage frame.
const DEVICES_PER_PAGE: usize = 200;

pub(crate) async fn operator_session(
    conn: quinn::Connection,
    control: Control,
    shared: Arc<Shared>,
    session: SessionId,
) {
    let Control {
        mut send,
        mut reader,
    } = control;
    // Connections start with a device's stream limits; an operator's requests each take a stream.
    conn.set_max_concurrent_bi_streams(crate::tls::OPERATOR_BIDI_STREAMS.into());
    if write_frame(&mut send, &welcome(&shared, session, 0))
        .await
        .is_err()
    {
        return;
    }
    reader.set_max_frame_bytes(shared.config.max_frame_bytes);
    tracing::info!("operator connected");
    let control_loop = async {
        loop {
            match reader.read::<ClientControl>().await {
                Ok(Some(ClientControl {
                    msg: Some(client_control::Msg::Heartbeat(h)),
                })) => {
                    if let Some(answer) = crate::session::answer_heartbeat(&h)
                        && write_frame(&mut send, &answer).await.is_err()
                    {
                        return None;
                    }
                }
                Ok(Some(_)) => {
                    return Some((
                        ErrorCode::ProtocolViolation,
                        "operators send only heartbeats on the control stream",
                    ));
                }
                Ok(None) | Err(_) => return None,
            }
        }
    };
    let requests = async {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let shared = shared.clone();
            tokio::spawn(async move { serve_request(shared, send, recv).await });
        }
    };
    let err = tokio::select! {
        e = control_loop => e,
        () = requests => None,
    };
    if let Some((code, message)) = err {
        close_with_error(&conn, &mut send, code, message).await;
    }
    tracing::info!("operator disconnected");
}

/// A request that failed; answered with a single `OperatorResponse.error`.
#[derive(Debug)]
struct RequestError {
    code: ErrorCode,
    message: String,
}

impl RequestError {
    fn into_response(self) -> OperatorResponse {
        let e = v1::Error {
            code: self.code.into(),
            message: self.message,
        };
        OperatorResponse {
            response: Some(operator_response::Response::Error(e)),
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> RequestError {
    RequestError {
        code,
        message: message.into(),
    }
}

fn store_error(e: StoreError) -> RequestError {
    match e {
        StoreError::UnknownDevice(_) | StoreError::UnknownCommand(_) => {
            error(ErrorCode::NotFound, e.to_string())
        }
        StoreError::DeviceExists(_) => error(ErrorCode::AlreadyExists, e.to_string()),
        other => error(ErrorCode::Unavailable, other.to_string()),
    }
}

async fn serve_request(shared: Arc<Shared>, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let mut reader = FrameReader::new(recv, shared.config.max_frame_bytes);
    let read = reader.read::<OperatorRequest>().await;
    if read.is_ok() {
        // A request comes with its FIN (the SDK's does): end the stream's reading side without
        // the STOP_SENDING that dropping it unread would add to the answer.
        crate::let_go(reader);
    }
    let responses = match read {
        Ok(Some(OperatorRequest {
            request: Some(operator_request::Request::Subscribe(sub)),
        })) => {
            return crate::streams::serve(shared, sub, send).await;
        }
        Ok(Some(OperatorRequest { request: Some(req) })) => handle(&shared, req).await,
        Ok(Some(OperatorRequest { request: None })) => {
            vec![
                error(
                    ErrorCode::UnknownMessage,
                    "an OperatorRequest with no known request",
                )
                .into_response(),
            ]
        }
        Ok(None) => vec![
            error(
                ErrorCode::ProtocolViolation,
                "the request stream ended early",
            )
            .into_response(),
        ],
        Err(e) => vec![error(ErrorCode::MalformedFrame, e.to_string()).into_response()],
    };
    for r in &responses {
        if write_frame(&mut send, r).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

fn device_id(s: &str) -> Result<DeviceId, RequestError> {
    DeviceId::new(s).map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))
}

async fn handle(shared: &Arc<Shared>, req: operator_request::Request) -> Vec<OperatorResponse> {
    use operator_request::Request;
    let result = match req {
        Request::ListDevices(r) => list_devices(shared, r).await,
        Request::GetDevice(r) => get_device(shared, r).await,
        Request::QueryTelemetry(r) => query_telemetry(shared, r).await,
        Request::ProvisionDevice(r) => provision(shared, r).await,
        Request::ProvisionDevices(r) => provision_many(shared, r).await,
        Request::GetTwin(r) => get_twin(shared, r).await,
        Request::UpdateDesired(r) => update_desired(shared, r).await,
        Request::SendCommand(r) => send_command(shared, r).await,
        Request::GetCommand(r) => get_command(shared, r).await,
        Request::ListCommands(r) => list_commands(shared, r).await,
        Request::CancelCommand(r) => cancel_command(shared, r).await,
        Request::WaitCommand(r) => wait_command(shared, r).await,
        Request::PresenceHistory(r) => presence_history(shared, r).await,
        Request::UpdateDevice(r) => update_device(shared, r).await,
        Request::QueryDevices(r) => query_devices(shared, r).await,
        Request::PutGroup(r) => put_group(shared, r).await,
        Request::DeleteGroup(r) => delete_group(shared, r).await,
        Request::ListGroups(_) => list_groups(shared).await,
        Request::Subscribe(_) => Err(error(
            ErrorCode::Internal,
            "subscriptions are served on their own stream",
        )),
        Request::CheckPolicy(r) => check_policy(shared, r).await,
        Request::ReloadPolicy(_) => reload_policy(shared).await,
        Request::Publish(r) => operator_publish(shared, r).await,
        Request::CreateJob(r) => job_answer(crate::jobs::create(shared.clone(), r).await),
        Request::GetJob(r) => job_answer(crate::jobs::get(shared, r.job_id).await),
        Request::CancelJob(r) => job_answer(crate::jobs::cancel(shared, r.job_id).await),
        Request::ListJobs(r) => {
            let limit = if r.limit == 0 { 100 } else { r.limit as usize };
            match crate::jobs::list(shared, limit).await {
                Ok(jobs) => respond(operator_response::Response::Jobs(v1::JobList { jobs })),
                Err(e) => Err(error(e.code, e.message)),
            }
        }
    };
    result.unwrap_or_else(|e| vec![e.into_response()])
}

/// Asks the device's actor (if it runs) for its live state, without waiting for the answer yet.
fn request_snapshot(
    shared: &Shared,
    id: &DeviceId,
) -> Option<tokio::task::JoinHandle<Option<Snapshot>>> {
    let actor = shared.registry.get(id)?;
    Some(tokio::spawn(
        async move { actor.send(GetSnapshot).await.ok() },
    ))
}

async fn device_info(
    record: DeviceRecord,
    snapshot: Option<tokio::task::JoinHandle<Option<Snapshot>>>,
) -> v1::DeviceInfo {
    let snapshot = match snapshot {
        Some(pending) => pending.await.ok().flatten(),
        None => None,
    };
    let (tags, attributes, groups) = match &snapshot {
        Some(s) => (s.tags.clone(), s.attributes.clone(), s.groups.clone()),
        None => (record.tags.clone(), record.attributes.clone(), Vec::new()),
    };
    let (presence, last_values, last_seq) = match snapshot {
        Some(s) => {
            let p = &s.presence;
            let presence = v1::Presence {
                online: p.is_online(),
                since_us: p.since().unwrap_or(0),
                last_seen_us: p.last_seen().unwrap_or(0),
                remote_addr: p.remote_addr().unwrap_or_default().to_owned(),
                offline_reason: match p.state() {
                    PresenceState::Offline { reason, .. } => reason.name().to_owned(),
                    _ => String::new(),
                },
            };
            (presence, s.last_values, s.durable_seq.max(record.last_seq))
        }
        None => (v1::Presence::default(), record.last_values, record.last_seq),
    };
    v1::DeviceInfo {
        device_id: record.id.to_string(),
        presence: Some(presence),
        last_values: last_values
            .into_iter()
            .map(|v| v1::MetricValue {
                metric: v.metric.to_string(),
                time_us: v.time_us,
                value: Some(v.value.to_proto()),
            })
            .collect(),
        last_stored_seq: last_seq,
        tags: tags.into_iter().collect(),
        created_us: record.created_us,
        point_count: record.point_count,
        attributes_json: serde_json::Value::Object(attributes).to_string(),
        groups,
    }
}

async fn list_devices(
    shared: &Shared,
    r: v1::ListDevices,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let after = if r.after.is_empty() {
        None
    } else {
        Some(device_id(&r.after)?)
    };
    let limit = if r.limit == 0 {
        None
    } else {
        Some(r.limit as usize)
    };
    let records = shared
        .store
        .list_devices(after, limit)
        .await
        .map_err(store_error)?;
    // Ask every actor at once: a busy device delays the answer by its own wait, not the sum.
    let pending: Vec<_> = records
        .iter()
        .map(|r| request_snapshot(shared, &r.id))
        .collect();
    let mut infos = Vec::with_capacity(records.len());
    for (record, snapshot) in records.into_iter().zip(pending) {
        infos.push(device_info(record, snapshot).await);
    }
    let mut pages: Vec<OperatorResponse> = infos
        .chunks(DEVICES_PER_PAGE)
        .map(|c| OperatorResponse {
            response: Some(operator_response::Response::Devices(v1::DevicePage {
                devices: c.to_vec(),
                next_after: String::new(),
            })),
        })
        .collect();
    if pages.is_empty() {
        pages.push(OperatorResponse {
            response: Some(operator_response::Response::Devices(
                v1::DevicePage::default(),
            )),
        });
    }
    Ok(pages)
}

async fn get_device(
    shared: &Shared,
    r: v1::GetDevice,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let id = device_id(&r.device_id)?;
    let record = shared
        .store
        .device(&id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| store_error(StoreError::UnknownDevice(id)))?;
    Ok(vec![OperatorResponse {
        response: Some(operator_response::Response::Device(
            device_info(record.clone(), request_snapshot(shared, &record.id)).await,
        )),
    }])
}

async fn query_telemetry(
    shared: &Shared,
    r: v1::QueryTelemetry,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let device = device_id(&r.device_id)?;
    let metric = if r.metric.is_empty() {
        None
    } else {
        Some(
            MetricName::new(r.metric)
                .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))?,
        )
    };
    let query = TelemetryQuery {
        device: device.clone(),
        metric,
        start_us: (r.start_us != 0).then_some(r.start_us),
        end_us: (r.end_us != 0).then_some(r.end_us),
        limit: (r.limit != 0).then_some(r.limit as usize),
        every_us: (r.every_us > 0).then_some(r.every_us),
        agg: fleetlink_store::Aggregation::parse(&r.agg).ok_or_else(|| {
            error(
                ErrorCode::InvalidArgument,
                format!(
                    "unknown aggregation {:?}; use mean, min, max, sum or count",
                    r.agg
                ),
            )
        })?,
    };
    if r.columns {
        if query.every_us.is_some() {
            return Err(error(
                ErrorCode::InvalidArgument,
                "columns are for raw points; ask for downsampled points (every_us) without columns",
            ));
        }
        let metrics = shared
            .store
            .query_telemetry_columns(query)
            .await
            .map_err(store_error)?;
        return Ok(column_pages(&device, &metrics));
    }
    let points = shared
        .store
        .query_telemetry(query)
        .await
        .map_err(store_error)?;
    let page = |chunk: &[fleetlink_store::StoredPoint]| OperatorResponse {
        response: Some(operator_response::Response::Telemetry(v1::TelemetryPage {
            device_id: device.to_string(),
            points: chunk
                .iter()
                .map(|p| v1::StoredPoint {
                    metric: p.metric.to_string(),
                    time_us: p.time_us,
                    received_us: p.received_us,
                    value: Some(p.value.to_proto()),
                    seq: p.seq,
                })
                .collect(),
        })),
    };
    let mut pages: Vec<_> = points.chunks(POINTS_PER_PAGE).map(page).collect();
    if pages.is_empty() {
        pages.push(page(&[]));
    }
    Ok(pages)
}

/// TelemetryColumns frames for the points of each metric, in order.
fn column_pages(
    device: &DeviceId,
    metrics: &[fleetlink_store::MetricColumns],
) -> Vec<OperatorResponse> {
    use fleetlink_proto::columns;
    use fleetlink_store::ValueColumn;
    use v1::telemetry_columns::Values;

    let mut pages = Vec::new();
    for m in metrics {
        let per_page = match m.values {
            ValueColumn::Other(_) => POINTS_PER_PAGE,
            _ => COLUMN_POINTS_PER_PAGE,
        };
        let mut from = 0;
        while from < m.len() {
            let to = (from + per_page).min(m.len());
            let values = match &m.values {
                ValueColumn::Double(v) => {
                    Values::Doubles(columns::encode_doubles(&v[from..to]).into())
                }
                ValueColumn::Int(v) => Values::Ints(columns::encode_ints(&v[from..to]).into()),
                ValueColumn::Bool(v) => Values::Bools(columns::encode_bools(&v[from..to]).into()),
                ValueColumn::Other(v) => Values::Other(v1::ValueList {
                    values: v[from..to].iter().map(|v| v.to_proto()).collect(),
                }),
            };
            pages.push(OperatorResponse {
                response: Some(operator_response::Response::TelemetryColumns(
                    v1::TelemetryColumns {
                        device_id: device.to_string(),
                        metric: m.metric.to_string(),
                        count: (to - from) as u32,
                        time_us: columns::encode_times(&m.time_us[from..to]).into(),
                        values: Some(values),
                    },
                )),
            });
            from = to;
        }
    }
    if pages.is_empty() {
        // an empty answer is one page of no points
        pages.push(OperatorResponse {
            response: Some(operator_response::Response::TelemetryColumns(
                v1::TelemetryColumns {
                    device_id: device.to_string(),
                    values: Some(Values::Doubles(Default::default())),
                    ..Default::default()
                },
            )),
        });
    }
    pages
}

/// A checked `ProvisionDevice`, with its fresh token.
fn new_device(r: v1::ProvisionDevice, created_us: i64) -> Result<(NewDevice, Token), RequestError> {
    let id = device_id(&r.device_id)?;
    let token = new_token();
    let attributes = if r.attributes_json.trim().is_empty() {
        serde_json::Map::new()
    } else {
        match serde_json::from_str(&r.attributes_json) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) | Err(_) => {
                return Err(error(
                    ErrorCode::InvalidArgument,
                    "attributes must be a JSON object",
                ));
            }
        }
    };
    // Attributes follow the rules of twin documents (keys, depth, size), so queries reach them.
    TwinPatch::from_json(serde_json::Value::Object(attributes.clone()))
        .map_err(|e| error(ErrorCode::InvalidArgument, format!("attributes: {e}")))?;
    check_tags(r.tags.iter())?;
    let device = NewDevice {
        id,
        token_hash: token.hash(),
        tags: r.tags.into_iter().collect(),
        attributes,
        created_us,
    };
    Ok((device, token))
}

async fn provision(
    shared: &Shared,
    r: v1::ProvisionDevice,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let (device, token) = new_device(r, now_us())?;
    let id = device.id.clone();
    shared
        .store
        .provision_device(device)
        .await
        .map_err(store_error)?;
    tracing::info!(device = %id, "device provisioned");
    shared
        .registry
        .get_or_start(&id)
        .await
        .map_err(store_error)?;
    Ok(vec![OperatorResponse {
        response: Some(operator_response::Response::Provisioned(v1::Provisioned {
            device_id: id.to_string(),
            token: token.as_str().to_owned(),
        })),
    }])
}

/// A fleet import: up to [`MAX_PROVISION_BATCH`] devices in one store transaction, all or none.
async fn provision_many(
    shared: &Shared,
    r: v1::ProvisionDevices,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let n = r.devices.len();
    if n == 0 || n > MAX_PROVISION_BATCH {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!("provision_devices takes 1 to {MAX_PROVISION_BATCH} devices, not {n}"),
        ));
    }
    let now = now_us();
    let mut devices = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::with_capacity(n);
    for (i, d) in r.devices.into_iter().enumerate() {
        let (device, token) = new_device(d, now).map_err(|mut e| {
            e.message = format!("device {i}: {}", e.message);
            e
        })?;
        if !seen.insert(device.id.clone()) {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!("device {i}: {} is given twice", device.id),
            ));
        }
        devices.push(device);
        tokens.push(token);
    }
    let states = shared
        .store
        .provision_devices(devices)
        .await
        .map_err(store_error)?;
    let mut provisioned = Vec::with_capacity(n);
    for (state, token) in states.into_iter().zip(tokens) {
        let id = state.record.id.clone();
        shared.registry.start(state).map_err(store_error)?;
        provisioned.push(v1::Provisioned {
            device_id: id.to_string(),
            token: token.as_str().to_owned(),
        });
    }
    tracing::info!(devices = n, "devices provisioned");
    Ok(vec![OperatorResponse {
        response: Some(operator_response::Response::ProvisionedDevices(
            v1::ProvisionedDevices {
                devices: provisioned,
            },
        )),
    }])
}

/// A fresh random token from the operating system's generator.
pub(crate) fn new_token() -> Token {
    let mut bytes = [0u8; Token::BYTES];
    rand::rng().fill_bytes(&mut bytes); // ThreadRng: a CSPRNG seeded from the OS
    Token::from_random_bytes(bytes)
}

fn respond(response: operator_response::Response) -> Result<Vec<OperatorResponse>, RequestError> {
    Ok(vec![OperatorResponse {
        response: Some(response),
    }])
}

fn mailbox_error(e: actix::MailboxError) -> RequestError {
    error(
        ErrorCode::Unavailable,
        format!("device actor unavailable: {e}"),
    )
}

/// The actor of a provisioned device, started if needed (twins and commands of offline devices
/// are served by their actor too).
async fn actor_of(
    shared: &Shared,
    device: &str,
) -> Result<(DeviceId, actix::Addr<crate::actor::DeviceActor>), RequestError> {
    let id = device_id(device)?;
    let actor = owner_of(shared, &id).await?;
    Ok((id, actor))
}

/// The actor of a provisioned device (started if needed).
async fn owner_of(
    shared: &Shared,
    device: &DeviceId,
) -> Result<actix::Addr<crate::actor::DeviceActor>, RequestError> {
    shared
        .registry
        .get_or_start(device)
        .await
        .map_err(store_error)
}

fn twin_error(e: TwinRequestError) -> RequestError {
    error(crate::session::twin_error_code(&e), e.to_string())
}

async fn get_twin(shared: &Shared, r: v1::GetTwin) -> Result<Vec<OperatorResponse>, RequestError> {
    let (id, actor) = actor_of(shared, &r.device_id).await?;
    let view = actor.send(GetTwin).await.map_err(mailbox_error)?;
    respond(operator_response::Response::Twin(
        view.to_proto(id.as_str()),
    ))
}

async fn update_desired(
    shared: &Shared,
    r: v1::UpdateDesired,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let patch = TwinPatch::parse(&r.patch_json)
        .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))?;
    let (id, actor) = actor_of(shared, &r.device_id).await?;
    let view = actor
        .send(UpdateDesired {
            patch,
            expected_version: r.expected_version,
        })
        .await
        .map_err(mailbox_error)?
        .map_err(twin_error)?;
    respond(operator_response::Response::Twin(
        view.to_proto(id.as_str()),
    ))
}

pub(crate) fn command_error_code(e: &CommandError) -> ErrorCode {
    match e {
        CommandError::Limit(_) => ErrorCode::LimitExceeded,
        CommandError::Store(StoreError::UnknownCommand(_) | StoreError::UnknownDevice(_)) => {
            ErrorCode::NotFound
        }
        CommandError::Store(_) => ErrorCode::Unavailable,
        CommandError::Finished { .. } => ErrorCode::Conflict,
    }
}

fn command_error(e: CommandError) -> RequestError {
    error(command_error_code(&e), e.to_string())
}

/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 256;

async fn send_command(
    shared: &Shared,
    r: v1::SendCommand,
) -> Result<Vec<OperatorResponse>, RequestError> {
    crate::command::check_command_name(&r.name)
        .map_err(|m| error(ErrorCode::InvalidArgument, m))?;
    check_wait_ms("wait_ms", r.wait_ms)?;
    if r.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!("the idempotency key is longer than {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    let args_json = if r.args_json.trim().is_empty() {
        "null".to_owned()
    } else {
        let args: serde_json::Value = serde_json::from_str(&r.args_json).map_err(|e| {
            error(
                ErrorCode::InvalidArgument,
                format!("command arguments are not valid JSON: {e}"),
            )
        })?;
        args.to_string()
    };
    let (id, actor) = actor_of(shared, &r.device_id).await?;
    let now = now_us();
    let default_timeout = i64::try_from(shared.config.commands.default_timeout_s)
        .unwrap_or(i64::MAX / 2_000_000)
        .saturating_mul(1_000_000);
    let deadline_us = if r.deadline_us == 0 {
        now.saturating_add(default_timeout)
    } else {
        r.deadline_us
    };
    let new = NewCommand {
        device: id,
        name: r.name,
        args_json,
        idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
        concurrent: r.concurrent,
        created_us: now,
        deadline_us,
    };
    let submitted = actor
        .send(SubmitCommand {
            new,
            watch: r.wait_ms > 0,
        })
        .await
        .map_err(mailbox_error)?
        .map_err(command_error)?;
    let record = match submitted.done {
        Some(done) => finished_within(shared, submitted.record.id, done, r.wait_ms).await?,
        None => submitted.record,
    };
    respond(operator_response::Response::Command(command_info(&record)))
}

/// The final state of a watched command, or after `wait_ms` (or when the actor stopped) its
/// state in the store.
async fn finished_within(
    shared: &Shared,
    id: u64,
    done: tokio::sync::oneshot::Receiver<CommandRecord>,
    wait_ms: u32,
) -> Result<CommandRecord, RequestError> {
    let timeout = std::time::Duration::from_millis(u64::from(wait_ms));
    match tokio::time::timeout(timeout, done).await {
        Ok(Ok(record)) => Ok(record),
        _ => stored_command(shared, id).await,
    }
}

/// Longest wait a WaitCommand or SendCommand may ask for.
const MAX_WAIT_MS: u32 = 600_000;

fn check_wait_ms(field: &str, ms: u32) -> Result<(), RequestError> {
    if ms > MAX_WAIT_MS {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!("{field} {ms} is above the maximum of {MAX_WAIT_MS}; wait again instead"),
        ));
    }
    Ok(())
}

async fn stored_command(shared: &Shared, id: u64) -> Result<CommandRecord, RequestError> {
    shared
        .store
        .command(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| store_error(StoreError::UnknownCommand(id)))
}

async fn get_command(
    shared: &Shared,
    r: v1::GetCommand,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let stored = stored_command(shared, r.command_id).await?;
    if stored.state.is_terminal() {
        return respond(operator_response::Response::Command(command_info(&stored)));
    }
    // An unfinished command's owner holds its newest state; the store may be a commit behind.
    let actor = owner_of(shared, &stored.device).await?;
    let live = actor
        .send(OpenCommand(r.command_id))
        .await
        .map_err(mailbox_error)?;
    respond(operator_response::Response::Command(command_info(
        live.as_ref().unwrap_or(&stored),
    )))
}

/// Commands per CommandPage when none is asked for.
const DEFAULT_COMMAND_PAGE: usize = 100;
/// Most commands per CommandPage (one frame); page with before_id for more.
const MAX_COMMAND_PAGE: usize = 1_000;

async fn list_commands(
    shared: &Shared,
    r: v1::ListCommands,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let device = device_id(&r.device_id)?;
    let state = match v1::CommandState::try_from(r.state) {
        Ok(v1::CommandState::Unspecified) => None,
        Ok(s) => Some(command_state_from_proto(s)),
        Err(_) => {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!("unknown command state {}", r.state),
            ));
        }
    };
    let records = shared
        .store
        .list_commands(CommandFilter {
            device,
            state,
            before_id: (r.before_id != 0).then_some(r.before_id),
            limit: if r.limit == 0 {
                DEFAULT_COMMAND_PAGE
            } else {
                (r.limit as usize).min(MAX_COMMAND_PAGE)
            },
        })
        .await
        .map_err(store_error)?;
    respond(operator_response::Response::Commands(v1::CommandPage {
        commands: records.iter().map(command_info).collect(),
    }))
}

async fn cancel_command(
    shared: &Shared,
    r: v1::CancelCommand,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let record = stored_command(shared, r.command_id).await?;
    let actor = owner_of(shared, &record.device).await?;
    let record = actor
        .send(CancelCommand(r.command_id))
        .await
        .map_err(mailbox_error)?
        .map_err(command_error)?;
    respond(operator_response::Response::Command(command_info(&record)))
}

async fn wait_command(
    shared: &Shared,
    r: v1::WaitCommand,
) -> Result<Vec<OperatorResponse>, RequestError> {
    check_wait_ms("timeout_ms", r.timeout_ms)?;
    let record = stored_command(shared, r.command_id).await?;
    if record.state.is_terminal() {
        return respond(operator_response::Response::Command(command_info(&record)));
    }
    let actor = owner_of(shared, &record.device).await?;
    let watch = actor
        .send(WatchCommand(r.command_id))
        .await
        .map_err(mailbox_error)?;
    let record = match watch {
        // Timed out, or the actor stopped: answered with what is stored.
        Some(done) => finished_within(shared, r.command_id, done, r.timeout_ms).await?,
        // Finished between the two reads: the store has its final state now.
        None => stored_command(shared, r.command_id).await?,
    };
    respond(operator_response::Response::Command(command_info(&record)))
}

async fn presence_history(
    shared: &Shared,
    r: v1::PresenceHistory,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let device = device_id(&r.device_id)?;
    let limit = if r.limit == 0 { 100 } else { r.limit as usize };
    let events = shared
        .store
        .presence_history(&device, limit)
        .await
        .map_err(store_error)?;
    respond(operator_response::Response::PresenceHistory(
        v1::PresencePage {
            device_id: device.to_string(),
            events: events.iter().map(presence_event).collect(),
        },
    ))
}

pub(crate) fn presence_event(e: &fleetlink_store::PresenceRecord) -> v1::PresenceEvent {
    v1::PresenceEvent {
        online: e.online,
        at_us: e.at_us,
        reason: e.reason.clone(),
        remote_addr: e.remote_addr.clone(),
        session_id: e.session,
    }
}

pub(crate) fn command_state_to_proto(s: CommandState) -> v1::CommandState {
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

fn command_state_from_proto(s: v1::CommandState) -> CommandState {
    match s {
        v1::CommandState::Unspecified | v1::CommandState::Queued => CommandState::Queued,
        v1::CommandState::Delivered => CommandState::Delivered,
        v1::CommandState::Succeeded => CommandState::Succeeded,
        v1::CommandState::Failed => CommandState::Failed,
        v1::CommandState::Expired => CommandState::Expired,
        v1::CommandState::Rejected => CommandState::Rejected,
        v1::CommandState::Cancelled => CommandState::Cancelled,
    }
}

pub(crate) fn command_info(r: &CommandRecord) -> v1::CommandInfo {
    v1::CommandInfo {
        command_id: r.id,
        device_id: r.device.to_string(),
        name: r.name.clone(),
        args_json: r.args_json.clone(),
        state: command_state_to_proto(r.state).into(),
        created_us: r.created_us,
        deadline_us: r.deadline_us,
        idempotency_key: r.idempotency_key.clone().unwrap_or_default(),
        concurrent: r.concurrent,
        result_json: r.result_json.clone().unwrap_or_default(),
        error: r.error.clone().unwrap_or_default(),
        history: r
            .history
            .iter()
            .map(|(s, at)| v1::CommandTransition {
                state: command_state_to_proto(*s).into(),
                at_us: *at,
            })
            .collect(),
        attempts: r.attempts,
    }
}

async fn update_device(
    shared: &Shared,
    r: v1::UpdateDevice,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let attributes_patch = if r.attributes_patch_json.trim().is_empty() {
        None
    } else {
        Some(
            TwinPatch::parse(&r.attributes_patch_json)
                .map_err(|e| error(ErrorCode::InvalidArgument, format!("attributes: {e}")))?,
        )
    };
    check_tags(r.set_tags.iter())?;
    let (id, actor) = actor_of(shared, &r.device_id).await?;
    actor
        .send(crate::facts::UpdateMeta {
            set_tags: r.set_tags.into_iter().collect(),
            remove_tags: r.remove_tags,
            attributes_patch,
        })
        .await
        .map_err(mailbox_error)?
        .map_err(store_error)?;
    get_device(
        shared,
        v1::GetDevice {
            device_id: id.to_string(),
        },
    )
    .await
}

fn parse_query(q: &str) -> Result<fleetlink_core::query::Query, RequestError> {
    fleetlink_core::query::Query::parse(q)
        .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))
}

/// Devices per QueryDevices answer when none is asked for.
const DEFAULT_QUERY_PAGE: usize = 1_000;
/// Most devices per QueryDevices answer.
const MAX_QUERY_PAGE: usize = 10_000;

async fn query_devices(
    shared: &Shared,
    r: v1::QueryDevices,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let query = if r.query.trim().is_empty() {
        fleetlink_core::query::Query::all()
    } else {
        parse_query(&r.query)?
    };
    let after = if r.after.is_empty() {
        None
    } else {
        Some(device_id(&r.after)?)
    };
    let limit = if r.limit == 0 {
        DEFAULT_QUERY_PAGE
    } else {
        (r.limit as usize).min(MAX_QUERY_PAGE)
    };
    shared.actors_ready().await;
    // Every actor evaluates the query on its own state, all at once.
    let mut asks = tokio::task::JoinSet::new();
    for (id, actor) in shared.registry.all_by_id() {
        if after.as_ref().is_some_and(|a| &id <= a) {
            continue;
        }
        let q = query.clone();
        asks.spawn(async move { (id, actor.send(crate::facts::Evaluate(q)).await) });
    }
    let mut matched = Vec::new();
    while let Some(answer) = asks.join_next().await {
        if let Ok((id, Ok(Some(snapshot)))) = answer {
            matched.push((id, snapshot));
        }
    }
    matched.sort_by(|a, b| a.0.cmp(&b.0));
    let more = matched.len() > limit;
    matched.truncate(limit);
    let next_after = if more {
        matched.last().map(|m| m.0.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    let mut infos = Vec::with_capacity(matched.len());
    for (id, snapshot) in matched {
        let Some(record) = shared.store.device(&id).await.map_err(store_error)? else {
            continue;
        };
        let snapshot = tokio::spawn(async move { Some(snapshot) });
        infos.push(device_info(record, Some(snapshot)).await);
    }
    let mut pages: Vec<OperatorResponse> = infos
        .chunks(DEVICES_PER_PAGE)
        .map(|c| v1::DevicePage {
            devices: c.to_vec(),
            next_after: String::new(),
        })
        .map(|p| OperatorResponse {
            response: Some(operator_response::Response::Devices(p)),
        })
        .collect();
    if pages.is_empty() {
        pages.push(OperatorResponse {
            response: Some(operator_response::Response::Devices(
                v1::DevicePage::default(),
            )),
        });
    }
    if let Some(OperatorResponse {
        response: Some(operator_response::Response::Devices(last)),
    }) = pages.last_mut()
    {
        last.next_after = next_after;
    }
    Ok(pages)
}

/// Longest group name accepted.
const MAX_GROUP_NAME: usize = 128;

async fn put_group(
    shared: &Shared,
    r: v1::PutGroup,
) -> Result<Vec<OperatorResponse>, RequestError> {
    // A group name is one topic level (`group/<name>/...` in the default policy) and a query string.
    let valid_name = !r.name.is_empty()
        && r.name.len() <= MAX_GROUP_NAME
        && r.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if !valid_name {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!(
                "group name {:?} must be 1 to {MAX_GROUP_NAME} characters from [A-Za-z0-9_.:-]",
                r.name
            ),
        ));
    }
    let dynamic = !r.query.trim().is_empty();
    if dynamic && !r.members.is_empty() {
        return Err(error(
            ErrorCode::InvalidArgument,
            "a group has either members (static) or a query (dynamic), not both",
        ));
    }
    let members: Vec<DeviceId> = r
        .members
        .iter()
        .map(|m| device_id(m))
        .collect::<Result<_, _>>()?;
    for m in &members {
        if shared.store.device(m).await.map_err(store_error)?.is_none() {
            return Err(store_error(StoreError::UnknownDevice(m.clone())));
        }
    }
    let query = if dynamic {
        Some(parse_query(&r.query)?)
    } else {
        None
    };
    shared
        .store
        .put_group(fleetlink_store::GroupRecord {
            name: r.name.clone(),
            members: members.clone(),
            query: query.as_ref().map(|_| r.query.clone()),
        })
        .await
        .map_err(store_error)?;
    match query {
        Some(q) => shared.fleet.groups.set_dynamic(&r.name, q),
        None => shared
            .fleet
            .groups
            .set_static(&r.name, members.into_iter().collect()),
    }
    tracing::info!(group = %r.name, dynamic, "group saved");
    groups_changed(shared);
    list_groups(shared).await
}

async fn delete_group(
    shared: &Shared,
    r: v1::DeleteGroup,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let existed = shared
        .store
        .delete_group(&r.name)
        .await
        .map_err(store_error)?;
    if !existed {
        return Err(error(
            ErrorCode::NotFound,
            format!("no group named {:?}", r.name),
        ));
    }
    shared.fleet.groups.remove(&r.name);
    groups_changed(shared);
    respond(operator_response::Response::Done(v1::Done {
        message: format!("group {:?} deleted", r.name),
    }))
}

/// Every actor re-evaluates its standing queries that read groups.
fn groups_changed(shared: &Shared) {
    let what = fleetlink_core::query::Reads {
        groups: true,
        ..Default::default()
    };
    for actor in shared.registry.all() {
        actor.do_send(crate::facts::FactsChanged(what));
    }
}

async fn list_groups(shared: &Shared) -> Result<Vec<OperatorResponse>, RequestError> {
    shared.actors_ready().await;
    let records = shared.store.groups().await.map_err(store_error)?;
    // Members of dynamic groups are whoever matches now; ask every actor once.
    let mut asks = tokio::task::JoinSet::new();
    for (id, actor) in shared.registry.all_by_id() {
        asks.spawn(async move { (id, actor.send(GetSnapshot).await) });
    }
    let mut in_groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    while let Some(answer) = asks.join_next().await {
        if let Ok((id, Ok(snapshot))) = answer {
            for g in snapshot.groups {
                in_groups.entry(g).or_default().push(id.to_string());
            }
        }
    }
    let groups = records
        .into_iter()
        .map(|g| {
            let members = match &g.query {
                Some(_) => {
                    let mut m = in_groups.remove(&g.name).unwrap_or_default();
                    m.sort();
                    m
                }
                None => g.members.iter().map(ToString::to_string).collect(),
            };
            v1::Group {
                name: g.name,
                members,
                query: g.query.unwrap_or_default(),
            }
        })
        .collect();
    respond(operator_response::Response::Groups(v1::GroupList {
        groups,
    }))
}

async fn check_policy(
    shared: &Shared,
    r: v1::CheckPolicy,
) -> Result<Vec<OperatorResponse>, RequestError> {
    use fleetlink_core::policy::{Action, Target};
    let action = Action::parse(&r.action).ok_or_else(|| {
        error(
            ErrorCode::InvalidArgument,
            format!(
                "unknown action {:?}; use publish, subscribe, message or command",
                r.action
            ),
        )
    })?;
    let (_, from) = actor_of(shared, &r.from_device).await?;
    let me = from
        .send(crate::facts::GetFacts)
        .await
        .map_err(mailbox_error)?;
    let policy = shared.fleet.bridge.policy();
    let decision = match action {
        Action::Publish => {
            let t = fleetlink_core::topic::Topic::new(r.target.clone())
                .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))?;
            policy.decide(action, &me, &me.groups, Target::Topic(&t))
        }
        Action::Subscribe => {
            let f = fleetlink_core::topic::TopicFilter::new(r.target.clone())
                .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))?;
            policy.decide(action, &me, &me.groups, Target::Filter(&f))
        }
        Action::Message | Action::Command => {
            let (_, to) = actor_of(shared, &r.target).await?;
            let them = to
                .send(crate::facts::GetFacts)
                .await
                .map_err(mailbox_error)?;
            policy.decide(action, &me, &me.groups, Target::Device(&them, &them.groups))
        }
    };
    respond(operator_response::Response::PolicyDecision(
        v1::PolicyDecision {
            allowed: decision.allowed,
            reason: decision.reason,
        },
    ))
}

async fn reload_policy(shared: &Shared) -> Result<Vec<OperatorResponse>, RequestError> {
    let Some(path) = &shared.config.config_file else {
        return Err(error(
            ErrorCode::InvalidArgument,
            "the server was not started with --config: there is no file to reload the policy from",
        ));
    };
    let config = crate::ServerConfig::from_file(path)
        .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))?;
    let policy = config
        .policy
        .build()
        .map_err(|e| error(ErrorCode::InvalidArgument, e.to_string()))?;
    let rules = policy.len();
    shared.fleet.bridge.set_policy(policy);
    tracing::info!(file = %path.display(), rules, "policy reloaded");
    respond(operator_response::Response::Done(v1::Done {
        message: format!(
            "policy reloaded from {}: {rules} rules, default {:?}",
            path.display(),
            config.policy.default
        ),
    }))
}

async fn operator_publish(
    shared: &Shared,
    r: v1::OperatorPublish,
) -> Result<Vec<OperatorResponse>, RequestError> {
    let delivered = crate::bridge::publish(shared, None, &r.topic, r.payload, r.retain)
        .await
        .map_err(|e| error(e.code, e.message))?;
    respond(operator_response::Response::Done(v1::Done {
        message: format!("delivered to {delivered} subscribers"),
    }))
}

fn job_answer(
    r: Result<v1::JobInfo, crate::jobs::JobRequestError>,
) -> Result<Vec<OperatorResponse>, RequestError> {
    match r {
        Ok(info) => respond(operator_response::Response::Job(info)),
        Err(e) => Err(error(e.code, e.message)),
    }
}

/// Longest tag key and value accepted.
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 1024;

fn check_tags<'a>(
    tags: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<(), RequestError> {
    for (k, v) in tags {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_TAG_KEY
            && !k
                .chars()
                .any(|c| c.is_control() || c == '.' || c.is_whitespace());
        if !key_ok {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "tag key {k:?} must be 1 to {MAX_TAG_KEY} bytes without dots, spaces or control characters"
                ),
            ));
        }
        if v.len() > MAX_TAG_VALUE || v.chars().any(char::is_control) {
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "the value of tag {k:?} must be at most {MAX_TAG_VALUE} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}
