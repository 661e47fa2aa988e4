//! Where fleetlink keeps devices, credentials and telemetry.
//!
//! Everything goes through the [`Store`] trait, so the actors never know which database sits
//! behind it. [`SqliteStore`] is the embedded default: SQLite in WAL mode under the data dir, one
//! writer thread that commits telemetry from every device in group commits, and a pool of reader
//! connections so queries never wait for ingest.

mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use fleetlink_core::credentials::TokenHash;
use fleetlink_core::value::Batch;
use fleetlink_core::{DeviceId, MetricName, TimeUs, Value};

pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};

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
    /// A blocking storage task panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
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
    /// Creation time.
    pub created_us: TimeUs,
    /// Highest telemetry batch sequence stored.
    pub last_seq: u64,
    /// Points stored in all.
    pub point_count: u64,
    /// Latest value per metric, by metric name.
    pub last_values: Vec<MetricValue>,
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

    /// Stored points of one device: grouped by metric (in the order each was first stored), then
    /// ordered by time, then arrival.
    async fn query_telemetry(&self, query: TelemetryQuery) -> Result<Vec<StoredPoint>, StoreError>;

    /// Queues a batch for the next group commit. Returns once it is queued; waits while the queue is
    /// full (backpressure). Durability is reported to `batch.listener`. A batch whose sequence is at
    /// or below the stored one is not stored again but reported durable.
    async fn append(&self, batch: AppendBatch) -> Result<(), StoreError>;

    /// Points stored in all, over every device.
    async fn point_count(&self) -> Result<u64, StoreError>;
}
