//! Where fleetlink keeps devices, credentials and telemetry.
//!
//! Everything goes through the [`Store`] trait, so the actors never know which database sits
//! behind it. [`SqliteStore`] is the embedded default: SQLite in WAL mode under the data dir, one
//! writer thread that commits telemetry from every device in group commits, and a pool of reader
//! connections so queries never wait for ingest.

mod chunk;
mod sqlite;
mod tlog;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use fleetlink_core::command::{CommandId, CommandState};
use fleetlink_core::credentials::TokenHash;
use fleetlink_core::twin::TwinDoc;
use fleetlink_core::value::Batch;
use fleetlink_core::{DeviceId, MetricName, TimeUs, Value};

pub use chunk::ValueColumn;
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous, WriterHandle};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device to create exists already.
    #[error("device {0} already exists")]
    DeviceExists(DeviceId),
    /// The device is not provisioned.
    #[error("unknown device \"{0}\": provision it with `fleetlink device add {0}`")]
    UnknownDevice(DeviceId),
    /// The database refused an operation.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The stored data is not what this version of fleetlink wrote.
    #[error("corrupt or foreign data in the store: {0}")]
    Corrupt(String),
    /// The store is shut down (its writer has stopped).
    #[error("the store is closed")]
    Closed,

    /// Another store (another server process, or one of this process that is still stopping)
    /// has the database open.
    #[error("the database {0} is in use by another fleetlink server; stop it first")]
    InUse(std::path::PathBuf),
    /// A blocking storage task panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
    /// The group commit that carried this write failed; nothing of it was stored.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// No command has this id.
    #[error("unknown command {0}")]
    UnknownCommand(CommandId),
}

/// A write queued for the writer's next group commit. Writes are applied in the order they were
/// queued (the call, not the first poll, queues them); the future resolves once the write is
/// durable (or failed).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Told the outcome of a queued write once it is durable (or failed).
pub type OnDurable = Box<dyn FnOnce(Result<(), StoreError>) + Send + 'static>;

/// A named set of devices: static (listed members) or dynamic (a query, stored as its text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// Its name.
    pub name: String,
    /// Static groups: the members.
    pub members: Vec<DeviceId>,
    /// Dynamic groups: the query.
    pub query: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Unique id (0 before it is stored).
    pub id: u64,
    /// A name for people.
    pub name: String,
    /// The target query.
    pub query: String,
    /// The whole request, encoded by the server (opaque here).
    pub spec: Vec<u8>,
    /// "running", "completed", "aborted", "cancelled".
    pub state: String,
    /// When it was created.
    pub created_us: TimeUs,
    /// When it left "running" (0 = still running).
    pub finished_us: TimeUs,
    /// Why it was aborted or cancelled.
    pub reason: String,
}

/// One target of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTargetRecord {
    /// The device.
    pub device: DeviceId,
    /// "pending", "running", "succeeded", ... (see `fleetlink_core::job::TargetState`).
    pub state: String,
    /// The command run on it, if the job runs a command and it started.
    pub command_id: Option<u64>,
}

/// A retained topic message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRecord {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Who published it ("" = an operator).
    pub from_device: String,
    /// When.
    pub published_us: TimeUs,
}

/// A direct message waiting for its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRecord {
    /// Unique id (0 before it is stored).
    pub id: u64,
    /// Who it is for.
    pub to: DeviceId,
    /// Who sent it.
    pub from: DeviceId,
    /// The payload.
    pub payload: Vec<u8>,
    /// When it was sent.
    pub sent_us: TimeUs,
    /// When it expires undelivered.
    pub expires_us: TimeUs,
}

/// Which of a twin's two documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinSide {
    /// Written by the device.
    Reported,
    /// Written by operators.
    Desired,
}

/// Both documents of a device's twin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredTwin {
    /// What the device last reported.
    pub reported: TwinDoc,
    /// What operators want.
    pub desired: TwinDoc,
}

/// A command to queue.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// Whose.
    pub device: DeviceId,
    /// Handler name on the device.
    pub name: String,
    /// Arguments as JSON text.
    pub args_json: String,
    /// A second command with the same key for the same device returns the first one.
    pub idempotency_key: Option<String>,
    /// Runs beside other commands instead of one at a time.
    pub concurrent: bool,
    /// When it was queued.
    pub created_us: TimeUs,
    /// When it expires.
    pub deadline_us: TimeUs,
}

/// A command as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    /// Unique id (grows with time).
    pub id: CommandId,
    /// Whose.
    pub device: DeviceId,
    /// Handler name.
    pub name: String,
    /// Arguments as JSON text.
    pub args_json: String,
    /// The operator's idempotency key.
    pub idempotency_key: Option<String>,
    /// Runs beside other commands.
    pub concurrent: bool,
    /// When it was queued.
    pub created_us: TimeUs,
    /// When it expires.
    pub deadline_us: TimeUs,
    /// Current state.
    pub state: CommandState,
    /// Deliveries so far.
    pub attempts: u32,
    /// The handler's result (JSON text).
    pub result_json: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
    /// Every state change, oldest first.
    pub history: Vec<(CommandState, TimeUs)>,
}

/// A state change of a command, written with its result.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandUpdate {
    /// Which command.
    pub id: CommandId,
    /// The new state.
    pub state: CommandState,
    /// Every state so far with its time, `state` last. Written as given (it replaces the stored
    /// history), so an update may carry states that were never written on their own.
    pub history: Vec<(CommandState, TimeUs)>,
    /// Deliveries so far.
    pub attempts: u32,
    /// The handler's result (JSON text).
    pub result_json: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

/// Which commands to list.
#[derive(Debug, Clone)]
pub struct CommandFilter {
    /// Whose.
    pub device: DeviceId,
    /// Only this state.
    pub state: Option<CommandState>,
    /// Only ids below this one (paging).
    pub before_id: Option<CommandId>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// One online or offline event of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    /// Online (true) or offline.
    pub online: bool,
    /// When.
    pub at_us: TimeUs,
    /// Why it went offline ("closed", "timeout", ...); empty for online events.
    pub reason: String,
    /// The connection's remote address.
    pub remote_addr: String,
    /// The server's session id of the connection.
    pub session: u64,
}

/// A device to create.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its id.
    pub id: DeviceId,
    /// Hash of its token.
    pub token_hash: TokenHash,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// Attributes: a JSON object.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Creation time.
    pub created_us: TimeUs,
}

/// The latest value of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValue {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock.
    pub time_us: TimeUs,
    /// The value.
    pub value: Value,
}

/// A provisioned device as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    /// Its id.
    pub id: DeviceId,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// Attributes: a JSON object.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Creation time.
    pub created_us: TimeUs,
    /// Highest telemetry batch sequence stored.
    pub last_seq: u64,
    /// Points stored in all.
    pub point_count: u64,
    /// Latest value per metric, by metric name.
    pub last_values: Vec<MetricValue>,
}

/// Everything a device's actor starts from.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// The device.
    pub record: DeviceRecord,
    /// Its twin.
    pub twin: StoredTwin,
    /// Its queued and delivered commands, oldest first.
    pub open_commands: Vec<CommandRecord>,
    /// Direct messages waiting for it, oldest first.
    pub pending_direct: Vec<DirectRecord>,
    /// Its last presence event.
    pub last_presence: Option<PresenceRecord>,
}

/// A stored telemetry point.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoint {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock.
    pub time_us: TimeUs,
    /// Server clock when its batch arrived.
    pub received_us: TimeUs,
    /// Sequence number of its batch.
    pub seq: u64,
    /// The value.
    pub value: Value,
}

/// Stored points of one metric, column by column, in (time, seq) order: times and values (the
/// row form, [`StoredPoint`], also has arrival times and batch seqs).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricColumns {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock.
    pub time_us: Vec<TimeUs>,
    /// The values.
    pub values: ValueColumn,
}

impl MetricColumns {
    /// Points held.
    pub fn len(&self) -> usize {
        self.time_us.len()
    }

    /// No points.
    pub fn is_empty(&self) -> bool {
        self.time_us.is_empty()
    }
}

/// Which telemetry to read.
#[derive(Debug, Clone)]
pub struct TelemetryQuery {
    /// Whose.
    pub device: DeviceId,
    /// Only this metric (`None` = all).
    pub metric: Option<MetricName>,
    /// Inclusive lower bound on the device time.
    pub start_us: Option<TimeUs>,
    /// Exclusive upper bound on the device time.
    pub end_us: Option<TimeUs>,
    /// At most this many points.
    pub limit: Option<usize>,
    /// Downsample: one point per metric and bucket of this many µs, with `agg` of its values.
    pub every_us: Option<i64>,
    /// How to aggregate a bucket.
    pub agg: Aggregation,
}

/// How a downsampled bucket combines its points (numeric values only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// The mean.
    #[default]
    Mean,
    /// The smallest value.
    Min,
    /// The largest value.
    Max,
    /// The sum.
    Sum,
    /// The number of points.
    Count,
}

impl Aggregation {
    /// Parses "mean", "min", "max", "sum", "count" ("" = mean).
    pub fn parse(s: &str) -> Option<Aggregation> {
        Some(match s {
            "" | "mean" | "avg" => Aggregation::Mean,
            "min" => Aggregation::Min,
            "max" => Aggregation::Max,
            "sum" => Aggregation::Sum,
            "count" => Aggregation::Count,
            _ => return None,
        })
    }
}

/// Told when a batch handed to [`Store::append`] is durable, or could not be stored.
pub trait DurabilityListener: Send + Sync + std::fmt::Debug {
    /// Every batch of this device up to `seq` is durably stored.
    fn durable(&self, seq: u64);
    /// The batch `seq` could not be stored; it must be resent.
    fn failed(&self, seq: u64, error: &StoreError);
}

/// A validated batch on its way to storage.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    /// Whose.
    pub device: DeviceId,
    /// The points and their sequence number.
    pub batch: Batch,
    /// Server clock when it arrived.
    pub received_us: TimeUs,
    /// Who to tell when it is durable.
    pub listener: Arc<dyn DurabilityListener>,
}

/// Storage of devices, credentials and telemetry. Implementations must be safe to share between
/// threads; every method may be called concurrently.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a device. Fails with [`StoreError::DeviceExists`] if the id is taken.
    async fn provision_device(&self, device: NewDevice) -> Result<(), StoreError>;

    /// Creates many devices in one transaction (an import): all of them, or none if any id is
    /// taken ([`StoreError::DeviceExists`] names the first) or appears twice. Returns the new
    /// devices' state, in the order given, for their actors.
    async fn provision_devices(
        &self,
        devices: Vec<NewDevice>,
    ) -> Result<Vec<DeviceState>, StoreError>;

    /// The token hash of a device, `None` if it is not provisioned.
    async fn device_token_hash(&self, id: &DeviceId) -> Result<Option<TokenHash>, StoreError>;

    /// Adds an admin (operator) token.
    async fn add_admin_token(&self, hash: TokenHash, created_us: TimeUs) -> Result<(), StoreError>;

    /// Whether any admin token exists.
    async fn has_admin_token(&self) -> Result<bool, StoreError>;

    /// Whether `token` is a valid admin token.
    async fn verify_admin_token(&self, token: &str) -> Result<bool, StoreError>;

    /// One device, `None` if it is not provisioned.
    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// Devices in id order, after `after`, at most `limit`.
    async fn list_devices(
        &self,
        after: Option<DeviceId>,
        limit: Option<usize>,
    ) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Everything the actor of one device starts from; `None` if it is not provisioned.
    async fn device_state(&self, id: &DeviceId) -> Result<Option<DeviceState>, StoreError>;

    /// [`DeviceState`]s of devices in id order after `after`, at most `limit`, read in one go: a
    /// server starts every actor from these pages (one read per page, not five per device).
    async fn device_states(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceState>, StoreError>;

    /// Stored points of one device: grouped by metric (in the order each was first stored), then
    /// ordered by time, then arrival.
    async fn query_telemetry(&self, query: TelemetryQuery) -> Result<Vec<StoredPoint>, StoreError>;

    /// The raw points of [`Store::query_telemetry`] column by column, one entry per metric (in the
    /// same order; metrics with no point in range are left out). `every_us` and `agg` must be unset:
    /// downsampled results come from [`Store::query_telemetry`].
    async fn query_telemetry_columns(
        &self,
        query: TelemetryQuery,
    ) -> Result<Vec<MetricColumns>, StoreError>;

    /// Queues a batch for the next group commit. Returns once it is queued; waits while the queue is
    /// full (backpressure). Durability is reported to `batch.listener`. A batch whose sequence is at
    /// or below the stored one is not stored again but reported durable.
    async fn append(&self, batch: AppendBatch) -> Result<(), StoreError>;

    /// [`Store::append`] without waiting: queues the batch if the queue has room now and returns
    /// `Ok(None)`; hands the batch back (`Ok(Some(batch))`) if it is full, for `append` to wait
    /// for room. Nothing to allocate or poll in the common case. The default always hands it back.
    fn try_append(&self, batch: AppendBatch) -> Result<Option<AppendBatch>, StoreError> {
        Ok(Some(batch))
    }

    /// Points stored in all, over every device.
    async fn point_count(&self) -> Result<u64, StoreError>;

    /// Replaces a device's tags and attributes (queued write).
    fn update_device(
        &self,
        device: &DeviceId,
        tags: BTreeMap<String, String>,
        attributes: serde_json::Map<String, serde_json::Value>,
    ) -> StoreFuture<()>;

    /// Creates or replaces a group (queued write).
    fn put_group(&self, group: GroupRecord) -> StoreFuture<()>;

    /// Deletes a group; returns whether it existed (queued write).
    fn delete_group(&self, name: &str) -> StoreFuture<bool>;

    /// Every group, by name.
    async fn groups(&self) -> Result<Vec<GroupRecord>, StoreError>;

    /// Stores a new job and its targets (all "pending"); returns its id (queued write).
    fn insert_job(&self, job: JobRecord, targets: Vec<DeviceId>) -> StoreFuture<u64>;

    /// Records a job's state (queued write).
    fn update_job(
        &self,
        id: u64,
        state: String,
        finished_us: TimeUs,
        reason: String,
    ) -> StoreFuture<()>;

    /// Records one target's state (queued write).
    fn update_job_target(&self, job: u64, target: JobTargetRecord) -> StoreFuture<()>;

    /// One job and its targets.
    async fn job(&self, id: u64) -> Result<Option<(JobRecord, Vec<JobTargetRecord>)>, StoreError>;

    /// Jobs, newest first.
    async fn list_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError>;

    /// Ids of jobs still running (to resume after a restart).
    async fn running_jobs(&self) -> Result<Vec<u64>, StoreError>;

    /// Sets (or, with an empty payload, clears) a topic's retained message (queued write).
    fn put_retained(&self, message: RetainedRecord) -> StoreFuture<()>;

    /// Every retained message.
    async fn retained(&self) -> Result<Vec<RetainedRecord>, StoreError>;

    /// Stores a direct message for its target; returns its id (queued write).
    fn insert_direct(&self, message: DirectRecord) -> StoreFuture<u64>;

    /// Forgets a direct message (delivered or expired) (queued write).
    fn delete_direct(&self, id: u64) -> StoreFuture<()>;

    /// Direct messages waiting for a device, oldest first.
    async fn pending_direct(&self, to: &DeviceId) -> Result<Vec<DirectRecord>, StoreError>;

    /// Both twin documents of a device (empty documents if it never had any).
    async fn twin(&self, device: &DeviceId) -> Result<StoredTwin, StoreError>;

    /// Replaces one twin document of a device (queued write).
    fn save_twin(&self, device: &DeviceId, side: TwinSide, doc: &TwinDoc) -> StoreFuture<()>;

    /// Stores a new command in state queued (queued write; the SQLite store commits it at once on
    /// the calling thread when its writer is idle). If the device already has a command with the
    /// same idempotency key, stores nothing and returns that one; the flag says whether the
    /// returned command is new.
    fn insert_command(&self, command: NewCommand) -> StoreFuture<(CommandRecord, bool)>;

    /// Records a state change of a command (queued write).
    fn update_command(&self, update: CommandUpdate) -> StoreFuture<()>;

    /// [`Store::update_command`], telling `on_durable` the outcome instead of returning a future,
    /// on the thread that made the write durable, so that whoever `on_durable` wakes is the first
    /// thread woken: the SQLite store commits it at once on the calling thread when its writer is
    /// idle (`on_durable` is then called before this returns), and otherwise on its writer thread,
    /// right after the commit. The default awaits the write on a task of the current tokio
    /// runtime.
    fn update_command_then(&self, update: CommandUpdate, on_durable: OnDurable) {
        let write = self.update_command(update);
        tokio::spawn(async move { on_durable(write.await) });
    }

    /// One command.
    async fn command(&self, id: CommandId) -> Result<Option<CommandRecord>, StoreError>;

    /// The command of a device with this idempotency key, if any.
    async fn command_by_key(
        &self,
        device: &DeviceId,
        key: &str,
    ) -> Result<Option<CommandRecord>, StoreError>;

    /// Commands of a device, newest first.
    async fn list_commands(&self, filter: CommandFilter) -> Result<Vec<CommandRecord>, StoreError>;

    /// Commands of a device not yet in a terminal state, oldest first.
    async fn open_commands(&self, device: &DeviceId) -> Result<Vec<CommandRecord>, StoreError>;

    /// Devices with commands not yet in a terminal state.
    async fn devices_with_open_commands(&self) -> Result<Vec<DeviceId>, StoreError>;

    /// Appends to a device's connection history (queued write).
    fn record_presence(&self, device: &DeviceId, event: PresenceRecord) -> StoreFuture<()>;

    /// A device's connection history, newest first.
    async fn presence_history(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<PresenceRecord>, StoreError>;
}
