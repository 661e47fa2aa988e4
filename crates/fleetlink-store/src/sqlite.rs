//! The embedded store: SQLite (bundled) in WAL mode. Schema in ARCHITECTURE.md ("Storage").

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fleetlink_core::credentials::TokenHash;
use fleetlink_core::{DeviceId, GeoPosition, MetricName, TimeUs, Value, ValueKind};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::chunk::{self, Columns, Row};
use crate::tlog;
use crate::{
    Aggregation, AppendBatch, CommandFilter, CommandRecord, CommandUpdate, DeviceRecord,
    DeviceState, DirectRecord, GroupRecord, JobRecord, JobTargetRecord, MetricColumns, MetricValue,
    NewCommand, NewDevice, OnDurable, PresenceRecord, RetainedRecord, Store, StoreError,
    StoreFuture, StoredPoint, StoredTwin, TelemetryQuery, TwinSide,
};
use fleetlink_core::command::{CommandId, CommandState};
use fleetlink_core::twin::TwinDoc;

/// The writer's maps, looked up per point: foldhash, not SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

const SCHEMA_VERSION: i64 = 6;

/// How much of the database file a reader connection maps into memory (SQLite's `mmap_size`):
/// a history query then reads its chunks' pages from the mapping instead of copying each one
/// out of the kernel's page cache with a `pread`. Address space only; the pages are the page
/// cache's, shared by every reader. The writer keeps plain reads.
const READER_MMAP_BYTES: i64 = 1 << 30;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS admin_tokens (
    id          INTEGER PRIMARY KEY,
    token_hash  BLOB NOT NULL UNIQUE,
    created_us  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  BLOB NOT NULL,
    tags        TEXT NOT NULL DEFAULT '{}',
    attributes  TEXT NOT NULL DEFAULT '{}',
    created_us  INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    point_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    id    INTEGER PRIMARY KEY,
    name  TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS telemetry_chunks (
    id        INTEGER PRIMARY KEY,
    device    INTEGER NOT NULL,
    metric    INTEGER NOT NULL,
    start_us  INTEGER NOT NULL,
    end_us    INTEGER NOT NULL,
    points    INTEGER NOT NULL,
    data      BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS telemetry_chunks_by_time
    ON telemetry_chunks (device, metric, start_us, end_us);
CREATE TABLE IF NOT EXISTS last_values (
    device   INTEGER NOT NULL,
    metric   INTEGER NOT NULL,
    time_us  INTEGER NOT NULL,
    kind     INTEGER NOT NULL,
    value    ANY,
    lat REAL, lon REAL, alt REAL, speed REAL, heading REAL, accuracy REAL,
    PRIMARY KEY (device, metric)
) WITHOUT ROWID, STRICT;
CREATE TABLE IF NOT EXISTS device_journal (
    id           INTEGER PRIMARY KEY,
    device       INTEGER NOT NULL,
    metric       INTEGER,
    last_seq     INTEGER NOT NULL,
    point_count  INTEGER NOT NULL,
    time_us      INTEGER,
    kind         INTEGER,
    value        ANY,
    lat REAL, lon REAL, alt REAL, speed REAL, heading REAL, accuracy REAL,
    points       INTEGER NOT NULL DEFAULT 0,
    data         BLOB
) STRICT;
CREATE TABLE IF NOT EXISTS telemetry_log_state (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    folded_generation  INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS twins (
    device            INTEGER PRIMARY KEY REFERENCES devices(id),
    reported          TEXT NOT NULL DEFAULT '{}',
    reported_meta     TEXT NOT NULL DEFAULT '{}',
    reported_version  INTEGER NOT NULL DEFAULT 0,
    desired           TEXT NOT NULL DEFAULT '{}',
    desired_meta      TEXT NOT NULL DEFAULT '{}',
    desired_version   INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS commands (
    id               INTEGER PRIMARY KEY,
    device           INTEGER NOT NULL REFERENCES devices(id),
    name             TEXT NOT NULL,
    args             TEXT NOT NULL,
    idempotency_key  TEXT,
    concurrent       INTEGER NOT NULL,
    created_us       INTEGER NOT NULL,
    deadline_us      INTEGER NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    result           TEXT,
    error            TEXT,
    history          TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS commands_idempotency ON commands (device, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device, id);
CREATE INDEX IF NOT EXISTS commands_open ON commands (device, id)
    WHERE state IN ('queued', 'delivered');
CREATE TABLE IF NOT EXISTS presence_events (
    id       INTEGER PRIMARY KEY,
    device   INTEGER NOT NULL REFERENCES devices(id),
    online   INTEGER NOT NULL,
    at_us    INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    remote   TEXT NOT NULL,
    session  INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS presence_by_device ON presence_events (device, id);
CREATE TABLE IF NOT EXISTS retained (
    topic         TEXT PRIMARY KEY,
    payload       BLOB NOT NULL,
    from_device   TEXT NOT NULL,
    published_us  INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS direct_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- ids are never reused: timers refer to them
    target      INTEGER NOT NULL REFERENCES devices(id),
    sender      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    sent_us     INTEGER NOT NULL,
    expires_us  INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS direct_by_target ON direct_messages (target, id);
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    query        TEXT NOT NULL,
    spec         BLOB NOT NULL,
    state        TEXT NOT NULL,
    created_us   INTEGER NOT NULL,
    finished_us  INTEGER NOT NULL DEFAULT 0,
    reason       TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE TABLE IF NOT EXISTS job_targets (
    job         INTEGER NOT NULL REFERENCES jobs(id),
    device      TEXT NOT NULL,
    state       TEXT NOT NULL,
    command_id  INTEGER,
    PRIMARY KEY (job, device)
) WITHOUT ROWID, STRICT;
CREATE TABLE IF NOT EXISTS groups (
    name     TEXT PRIMARY KEY,
    members  TEXT NOT NULL DEFAULT '[]',
    query    TEXT
) STRICT;
";

/// How hard SQLite works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// WAL with `synchronous=NORMAL`: every commit survives a process crash (SIGKILL); a power loss
    /// may roll back the last commits. The default.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is fsynced, and also survives a power loss. Slower.
    Full,
}

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Durability level.
    pub synchronous: Synchronous,
    /// Batches waiting for the writer before [`Store::append`] waits (backpressure).
    pub queue_batches: usize,
    /// The writer commits once this many points are gathered, or the queue is empty.
    pub max_commit_points: usize,
    /// Group commit: when the queue runs dry before `max_commit_points`, the writer waits this
    /// long once for more before committing. Every commit writes each page it touched to the WAL,
    /// so a fleet of slow devices costs far less CPU per point when a few milliseconds of their
    /// batches share one commit; zero commits at once.
    pub commit_delay: std::time::Duration,
    /// How often the writer folds device bookkeeping (each device's last seq, point count and
    /// last value per metric) from its journal into the `devices` and `last_values` tables. In
    /// between, each commit appends that bookkeeping to `device_journal` (sequential pages)
    /// instead of updating two random B-tree pages per device, and readers see it from memory;
    /// after a crash, opening the store folds what the journal holds. Zero folds after every
    /// commit.
    pub fold_interval: std::time::Duration,
    /// How long opening waits for another store of the same database to stop (see
    /// [`StoreError::InUse`]).
    pub lock_wait: std::time::Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Normal,
            queue_batches: 4096,
            max_commit_points: 50_000,
            commit_delay: std::time::Duration::from_millis(2),
            fold_interval: std::time::Duration::from_secs(5),
            lock_wait: std::time::Duration::from_secs(10),
        }
    }
}

/// The embedded SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    writer: WriterHandle,
}

/// Waits for a store's writer thread (see [`SqliteStore::writer_handle`]).
#[derive(Debug, Clone)]
pub struct WriterHandle(Arc<Mutex<Option<std::thread::JoinHandle<()>>>>);

impl WriterHandle {
    /// Waits until the writer committed everything queued and stopped (which happens once every
    /// clone of the store is dropped), at most `timeout`. Returns whether it stopped.
    pub fn join(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let finished = match self.0.lock() {
                Ok(guard) => guard
                    .as_ref()
                    .is_none_or(std::thread::JoinHandle::is_finished),
                Err(_) => true,
            };
            if finished {
                if let Ok(mut guard) = self.0.lock()
                    && let Some(thread) = guard.take()
                {
                    let _ = thread.join();
                }
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// The writer, shared by its thread and [`SqliteStore::commit_now`]. Declared before
    /// `writes`: dropped first, so that the thread, which stops when `writes` closes, holds the
    /// last reference and closes the connection before it lets go of the database lock.
    writer: Arc<Mutex<Writer>>,
    /// Jobs sent to the writer thread and not yet committed: a job committed on the caller's
    /// thread must not overtake them.
    queued: Arc<AtomicUsize>,
    writes: mpsc::UnboundedSender<WriterJob>,
    /// Room in the writer's queue for telemetry batches (backpressure for [`Store::append`]).
    append_room: Arc<Semaphore>,
    readers: Mutex<Vec<Connection>>,
    /// Bookkeeping committed to the journal, laid over the `devices` and `last_values` tables.
    overlay: SharedOverlay,
}

/// Each device's bookkeeping as of the writer's last commit, for the devices it wrote since the
/// store was opened: readers lay it over the `devices` and `last_values` rows, which lag behind
/// by up to [`SqliteOptions::fold_interval`]. Only committed state enters it, and every figure
/// only grows (the last value by time), so a reader may combine it with a table row of any age:
/// the greater figure and the later value win.
#[derive(Debug, Default)]
struct Overlay {
    devices: FastMap<i64, Bookkeeping>,
    /// Points of small groups (fewer than `TINY_POINTS` of one device and metric in a commit),
    /// which wait in the journal instead of becoming one-point chunks, by device and metric row
    /// id. Unlike the bookkeeping they leave the overlay when a fold turns them into chunks, so
    /// readers take them with [`snapshot_device`].
    points: FastMap<i64, OverlayPoints>,
    /// The points a running fold is turning into chunks, moved out of `points` (the writer adds
    /// none meanwhile): readers take them from here until the fold commits.
    folding: Arc<FastMap<i64, OverlayPoints>>,
}

/// One device's points in the overlay, by metric row id, each metric's in commit order.
type OverlayPoints = FastMap<i64, Vec<Row<Value>>>;

type SharedOverlay = Arc<Mutex<Overlay>>;

#[derive(Debug, Default, Clone)]
struct Bookkeeping {
    last_seq: u64,
    point_count: u64,
    /// metric row id → the latest point by device clock
    last_values: FastMap<i64, MetricValue>,
}

impl Overlay {
    /// Lays the bookkeeping of device `rowid` over `record` (read from the tables).
    fn apply(&self, rowid: i64, record: &mut DeviceRecord) {
        let Some(b) = self.devices.get(&rowid) else {
            return;
        };
        record.last_seq = record.last_seq.max(b.last_seq);
        record.point_count = record.point_count.max(b.point_count);
        for v in b.last_values.values() {
            match record.last_values.iter_mut().find(|r| r.metric == v.metric) {
                Some(r) if r.time_us > v.time_us => {}
                Some(r) => *r = v.clone(),
                None => record.last_values.push(v.clone()),
            }
        }
        record.last_values.sort_by(|a, b| a.metric.cmp(&b.metric));
    }
}

/// Finds `device` in a read transaction that the caller has begun on `conn` (its first read, which
/// fixes the snapshot), with the device's points in the overlay. Both happen under the overlay
/// lock, which a fold holds while it commits the chunks it made and drops their points from the
/// overlay: so the points returned are exactly those the snapshot's chunks lack.
fn snapshot_device(
    conn: &Connection,
    overlay: &SharedOverlay,
    device: &DeviceId,
) -> Result<(i64, OverlayPoints), StoreError> {
    let overlay = lock_overlay(overlay);
    let rowid = device_rowid(conn, device)?;
    let mut points = overlay.folding.get(&rowid).cloned().unwrap_or_default();
    for (metric, rows) in overlay.points.get(&rowid).into_iter().flatten() {
        points
            .entry(*metric)
            .or_default()
            .extend(rows.iter().cloned());
    }
    Ok((rowid, points))
}

fn lock_overlay(overlay: &SharedOverlay) -> std::sync::MutexGuard<'_, Overlay> {
    // Every change to the overlay is a whole assignment: a panic cannot leave it half-written.
    overlay
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs inside the writer's transaction (under a savepoint); returns what to do once the
/// transaction committed (`None`) or failed (`Some(error)`).
type ControlJob = Box<dyn FnOnce(&Connection) -> Finisher + Send>;
type Finisher = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// Calls its function once: with the outcome, or with [`StoreError::Closed`] if it is dropped
/// before (its job was never run: the writer stopped).
struct CalledOnce<T, D: FnOnce(Result<T, StoreError>)>(Option<D>, std::marker::PhantomData<fn(T)>);

impl<T, D: FnOnce(Result<T, StoreError>)> CalledOnce<T, D> {
    fn call(mut self, outcome: Result<T, StoreError>) {
        if let Some(done) = self.0.take() {
            done(outcome);
        }
    }
}

impl<T, D: FnOnce(Result<T, StoreError>)> Drop for CalledOnce<T, D> {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(StoreError::Closed));
        }
    }
}

enum WriterJob {
    Append(AppendBatch, OwnedSemaphorePermit),
    Control(ControlJob),
    /// From the checkpoint thread, its copy done: the writer thread finishes the checkpoint
    /// ([`Writer::checkpoint_if_due`]). Nothing to commit.
    Wake,
}

impl std::fmt::Debug for WriterJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterJob::Append(b, _) => f.debug_tuple("Append").field(&b.batch.seq).finish(),
            WriterJob::Control(_) => f.write_str("Control"),
            WriterJob::Wake => f.write_str("Wake"),
        }
    }
}

/// `f` as a job for the writer's next commit: run under its own savepoint, `done` called with
/// its outcome once the commit is durable (or failed).
fn control_job<T, F, D>(f: F, done: D) -> ControlJob
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    D: FnOnce(Result<T, StoreError>) + Send + 'static,
{
    let done = CalledOnce(Some(done), std::marker::PhantomData);
    Box::new(move |conn: &Connection| -> Finisher {
        let result = in_savepoint(conn, f);
        Box::new(move |commit_error: Option<&StoreError>| {
            done.call(match (commit_error, result) {
                (Some(e), _) => Err(StoreError::CommitFailed(e.to_string())),
                (None, r) => r,
            });
        })
    })
}

impl SqliteStore {
    /// Hands a batch to the writer thread with its room in the queue.
    fn queue_append(
        &self,
        batch: AppendBatch,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), StoreError> {
        self.queue(WriterJob::Append(batch, permit))
    }

    /// Hands a job to the writer thread.
    fn queue(&self, job: WriterJob) -> Result<(), StoreError> {
        self.inner.queued.fetch_add(1, Ordering::AcqRel);
        self.inner.writes.send(job).map_err(|_| {
            self.inner.queued.fetch_sub(1, Ordering::AcqRel);
            StoreError::Closed
        })
    }

    /// Opens (creating if needed) the database at `path` and starts its writer thread.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let lock = lock_database(&path, options.lock_wait)?;
        let mut conn = open_connection(&path, options.synchronous)?;
        migrate(&mut conn)?;
        fold_journal(&mut conn)?;
        let log_path = tlog::path_of(&path);
        let generation = replay_log(&mut conn, &log_path, options.synchronous)?;
        let log = tlog::TelemetryLog::create(
            &log_path,
            generation,
            options.synchronous == Synchronous::Full,
        )?;
        // The writer's page cache: 64 MiB (SQLite's default is 2 MiB), so that a commit touching
        // many devices reads their index and last-value pages from memory, not from the file.
        conn.pragma_update(None, "cache_size", -65_536)?;
        // No autocheckpoint: the hook takes its place (see WAL_CHECKPOINT_PAGES), and the writer
        // thread checkpoints. The WAL file is cut back to 128 MiB after a checkpoint.
        conn.wal_hook(Some(note_wal_frames));
        // every statement the writer runs stays prepared (the default keeps 16)
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "journal_size_limit", 128 * 1024 * 1024)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let max_points = options.max_commit_points.max(1);
        let delay = options.commit_delay;
        let overlay = SharedOverlay::default();
        let writer = Arc::new(Mutex::new(Writer::new(
            conn,
            overlay.clone(),
            options.fold_interval,
            log,
            options.synchronous,
        )));
        let queued = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (writer, queued, path) = (writer.clone(), queued.clone(), path.clone());
            let wake = CheckpointWake {
                writes: tx.downgrade(),
                queued: queued.clone(),
            };
            std::thread::Builder::new()
                .name("fleetlink-store-writer".into())
                .spawn(move || {
                    Writer::run(writer, &path, &queued, (rx, wake), max_points, delay);
                    drop(lock); // after the last fold, with the connection closed
                })
                .map_err(|e| StoreError::Task(format!("cannot start the writer thread: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                writer,
                queued,
                writes: tx,
                append_room: Arc::new(Semaphore::new(options.queue_batches.max(1))),
                readers: Mutex::new(Vec::new()),
                overlay,
            }),
            writer: WriterHandle(Arc::new(Mutex::new(Some(thread)))),
        })
    }

    /// A handle to wait for the writer thread: it ends once every clone of this store is dropped
    /// and every queued write is committed.
    pub fn writer_handle(&self) -> WriterHandle {
        self.writer.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on a reader connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner
                .readers
                .lock()
                .map_err(|_| StoreError::Task("reader pool poisoned".into()))?
                .pop();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let conn = open_connection(&inner.path, Synchronous::Normal)?;
                    conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
                    conn
                }
            };
            let result = f(&conn);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < 8
            {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Queues `f` for the writer's next group commit, where it runs under its own savepoint: an
    /// error of `f` undoes only its own changes. The future resolves once the commit is durable.
    fn control<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.control_future(f, false)
    }

    /// [`Self::control`] for a write that someone waits on, one at a time (a command's insert):
    /// committed at once on the calling thread when the writer is idle ([`Self::commit_now`]).
    fn urgent_control<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.control_future(f, true)
    }

    fn control_future<T, F>(&self, f: F, urgent: bool) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let done = move |outcome| {
            let _ = tx.send(outcome);
        };
        if urgent {
            self.urgent_control_then(f, done);
        } else {
            self.control_then(f, done);
        }
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    /// [`Self::control`], calling `done` with the outcome on the writer thread after the commit
    /// (at once with [`StoreError::Closed`] if the writer has stopped).
    fn control_then<T, F, D>(&self, f: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        // A writer that is gone drops the job, and with it `done`, which then says so.
        let _ = self.queue(WriterJob::Control(control_job(f, done)));
    }

    /// [`Self::control_then`] for a write that someone waits on; `done` may be called before
    /// this returns.
    fn urgent_control_then<T, F, D>(&self, f: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        if let Err(job) = self.commit_now(control_job(f, done)) {
            let _ = self.queue(WriterJob::Control(job));
        }
    }

    /// Commits `job` on the calling thread if the writer thread is idle: nothing queued for it
    /// and not committing. A queued write costs two thread wake-ups on its way (the writer's,
    /// then the waiting task's), ~40% of a command's round trip in the command benchmark (see
    /// ARCHITECTURE.md). Gives the job back otherwise, or when [`Writer::commit_now`] declines.
    fn commit_now(&self, job: ControlJob) -> Result<(), ControlJob> {
        let Ok(mut writer) = self.inner.writer.try_lock() else {
            return Err(job);
        };
        // A job counts in `queued` from before it is sent until the writer thread has committed
        // it (it counts its jobs off under the lock): with none counted, no write queued before
        // this one is left to commit, and this one cannot overtake it.
        if self.inner.queued.load(Ordering::Acquire) != 0 {
            return Err(job);
        }
        let (finish, error) = writer.commit_now(job)?;
        drop(writer);
        finish(error.as_ref());
        Ok(())
    }

    /// Runs `f` on a short-lived connection that writes registry data (devices, tokens). Telemetry
    /// goes through the writer thread; these rare writes wait on SQLite's busy timeout instead.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = open_connection(&path, Synchronous::Full)?;
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Takes the lock that one store per database holds until its writer stopped: an advisory `flock`
/// on `<database>.lock`. Two writers would each fold the journal's waiting points into chunks,
/// storing them twice. Waits up to `wait` for a store that is still stopping (its writer folds
/// once more before it lets go).
fn lock_database(path: &Path, wait: Duration) -> Result<std::fs::File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            StoreError::Task(format!(
                "cannot open {}: {e}",
                Path::new(&lock_path).display()
            ))
        })?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                // a lock has nothing to wait on with a timeout: poll, as SQLite's busy timeout does
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse(path.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Task(format!(
                    "cannot lock {}: {e}",
                    Path::new(&lock_path).display()
                )));
            }
        }
    }
}

fn open_connection(path: &Path, sync: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "cannot switch {} to WAL mode (got {mode})",
            path.display()
        )));
    }
    let sync = match sync {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, newer than this fleetlink ({SCHEMA_VERSION}); upgrade fleetlink"
        )));
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if version == 1 {
        // version 2 added device attributes; the new tables come from SCHEMA below
        tx.execute_batch("ALTER TABLE devices ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}'")?;
    }
    // Version 4 added `device_journal` (created by SCHEMA): the version number keeps an older
    // fleetlink, which would ignore the journal, from opening the database. Version 5 may hold
    // dictionary-coded string chunks (`chunk::DICT_STRINGS`), which an older fleetlink cannot
    // read: nothing to convert, the number keeps it out. Version 6 keeps small commits in the
    // telemetry log (`tlog`, state in `telemetry_log_state`), which an older fleetlink would not
    // replay.
    tx.execute_batch(SCHEMA)?;
    if (1..3).contains(&version) {
        // version 3 keeps telemetry in chunks instead of a row per point
        rows_to_chunks(&tx)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Folds what the device journal holds into `devices` and `last_values`: after a crash, the
/// bookkeeping of the commits since the writer's last fold.
fn fold_journal(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // The points of small groups, which were waiting for the fold to become chunks.
    let mut points = 0usize;
    {
        let mut stmt = tx.prepare(
            "SELECT device, metric, data FROM device_journal WHERE data IS NOT NULL
             ORDER BY device, metric, id",
        )?;
        let mut rows = stmt.query([])?;
        let mut pair: Option<(i64, i64)> = None;
        let mut columns = Columns::default();
        let mut flush = |pair: (i64, i64), columns: &mut Columns| -> Result<(), StoreError> {
            let stored = insert_columns(&tx, pair.0, pair.1, std::mem::take(columns))?;
            points += stored.iter().map(|(_, p)| p).sum::<usize>();
            Ok(())
        };
        while let Some(r) = rows.next()? {
            let this: (i64, i64) = (r.get(0)?, r.get(1)?);
            if let Some(p) = pair
                && p != this
            {
                flush(p, &mut columns)?;
            }
            pair = Some(this);
            let data = r.get_ref(2)?.as_blob().map_err(corrupt)?;
            chunk::decode_into(data, &mut columns, true)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        if let Some(p) = pair {
            flush(p, &mut columns)?;
        }
    }
    // In journal order, so that of two values with the same time the later one wins, as it
    // did when they were committed.
    let values = tx.execute(
        &format!(
            "INSERT INTO last_values (device, metric, time_us, kind, value, lat, lon, alt, speed, heading, accuracy)
             SELECT device, metric, time_us, kind, value, lat, lon, alt, speed, heading, accuracy
             FROM device_journal WHERE metric IS NOT NULL ORDER BY id {UPSERT_LAST_VALUE}"
        ),
        [],
    )?;
    let devices = tx.execute(
        "UPDATE devices SET last_seq = max(devices.last_seq, j.last_seq),
                            point_count = max(devices.point_count, j.point_count)
         FROM (SELECT device, max(last_seq) AS last_seq, max(point_count) AS point_count
               FROM device_journal GROUP BY device) AS j
         WHERE devices.id = j.device",
        [],
    )?;
    let rows = tx.execute("DELETE FROM device_journal", [])?;
    tx.commit()?;
    if rows > 0 {
        tracing::info!(
            rows,
            devices,
            values,
            points,
            "folded the device journal left by a crash"
        );
    }
    Ok(())
}

/// Runs `f` with the connection syncing each commit to the disk (`synchronous=FULL`), whatever
/// the store's level: for the commits after which the telemetry log is emptied, so that a power
/// loss cannot keep the emptied log and lose the commit.
fn fully_synced<T>(
    conn: &mut Connection,
    sync: Synchronous,
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if sync == Synchronous::Full {
        return f(conn);
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let result = f(conn);
    let restored = conn.pragma_update(None, "synchronous", "NORMAL");
    let value = result?;
    restored?;
    Ok(value)
}

/// Folds what a telemetry log left by a crash holds, unless a fold had already committed its
/// generation, into chunks, `devices` and `last_values`; returns the generation for the emptied
/// log.
fn replay_log(conn: &mut Connection, path: &Path, sync: Synchronous) -> Result<u64, StoreError> {
    let folded: i64 = conn
        .query_row(
            "SELECT folded_generation FROM telemetry_log_state WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let folded = folded as u64;
    let left = tlog::read(path)?;
    if left.torn_bytes > 0 {
        tracing::warn!(
            bytes = left.torn_bytes,
            log = %path.display(),
            "the telemetry log ends in a torn record (a write cut short by a power loss); it was never acknowledged and is dropped"
        );
    }
    if left.generation <= folded || left.records.is_empty() {
        return Ok(folded.max(left.generation) + 1);
    }
    let generation = left.generation;
    let (devices, points) = fully_synced(conn, sync, |conn| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // per device and metric, its points and (in log order, the later of equal times
        // winning, as in the commits) its latest value
        let mut groups: FastMap<(i64, i64), Vec<Row<Value>>> = FastMap::default();
        let mut last: FastMap<(i64, i64), (TimeUs, Value)> = FastMap::default();
        let mut books: FastMap<i64, (u64, u64)> = FastMap::default();
        for record in &left.records {
            let record = tlog::decode(record)?;
            for (device, seq, count) in record.devices {
                let b = books.entry(device).or_default();
                b.0 = b.0.max(seq);
                b.1 = b.1.max(count);
            }
            for (device, metric, rows) in record.groups {
                let key = (device, metric);
                for row in &rows {
                    if last.get(&key).is_none_or(|(t, _)| row.time_us >= *t) {
                        last.insert(key, (row.time_us, row.value.clone()));
                    }
                }
                groups.entry(key).or_default().extend(rows);
            }
        }
        let mut points = 0usize;
        for ((device, metric), mut rows) in groups {
            points += rows.len();
            rows.sort_by_key(Row::key);
            for part in rows.chunks(chunk::MAX_POINTS) {
                insert_chunk(&tx, device, metric, part)?;
            }
        }
        for (&(device, metric), (time_us, value)) in &last {
            store_last_value(&tx, device, metric, *time_us, value)?;
        }
        for (&device, &(seq, count)) in &books {
            store_device_books(&tx, device, seq, count)?;
        }
        mark_log_folded(&tx, generation)?;
        tx.commit()?;
        Ok((books.len(), points))
    })?;
    tracing::info!(
        records = left.records.len(),
        devices,
        points,
        generation,
        "replayed the telemetry log left by a crash"
    );
    Ok(generation + 1)
}

/// Raises a device's stored seq and point count to `seq` and `count` (never lowers them).
fn store_device_books(
    tx: &Connection,
    device: i64,
    seq: u64,
    count: u64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE devices SET last_seq = max(last_seq, ?2), point_count = max(point_count, ?3)
         WHERE id = ?1",
    )?
    .execute(params![device, seq as i64, count as i64])?;
    Ok(())
}

/// Stores a metric's latest value unless the stored one is newer by device clock.
fn store_last_value(
    tx: &Connection,
    device: i64,
    metric: i64,
    time_us: TimeUs,
    value: &Value,
) -> Result<(), StoreError> {
    let (kind, val, geo) = value_columns(value);
    tx.prepare_cached(INSERT_LAST_VALUE)?.execute(params![
        device, metric, time_us, kind, val, geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    ])?;
    Ok(())
}

/// Records in the fold's transaction that the telemetry log's `generation` is folded.
fn mark_log_folded(tx: &Connection, generation: u64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO telemetry_log_state (id, folded_generation) VALUES (1, ?1)
         ON CONFLICT(id) DO UPDATE SET folded_generation = excluded.folded_generation",
    )?
    .execute([generation as i64])?;
    Ok(())
}

/// The conflict clause of every write to `last_values`: a value replaces the stored one unless
/// it is older by device clock. A macro so that [`INSERT_LAST_VALUE`] is one literal, not a
/// string formatted for every value a fold stores.
macro_rules! upsert_last_value {
    () => {
        "ON CONFLICT(device, metric) DO UPDATE SET
    time_us = excluded.time_us, kind = excluded.kind, value = excluded.value,
    lat = excluded.lat, lon = excluded.lon, alt = excluded.alt, speed = excluded.speed,
    heading = excluded.heading, accuracy = excluded.accuracy
 WHERE excluded.time_us >= last_values.time_us"
    };
}
const UPSERT_LAST_VALUE: &str = upsert_last_value!();

/// One value into `last_values`, under [`UPSERT_LAST_VALUE`].
const INSERT_LAST_VALUE: &str = concat!(
    "INSERT INTO last_values (device, metric, time_us, kind, value, lat, lon, alt, speed, heading, accuracy)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ",
    upsert_last_value!()
);

/// Moves the points of a version 1 or 2 database (a row each in `telemetry`) into chunks.
fn rows_to_chunks(tx: &Connection) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(
        "SELECT device, metric, time_us, seq, idx, received_us, kind, value,
                lat, lon, alt, speed, heading, accuracy
         FROM telemetry ORDER BY device, metric, time_us, seq, idx",
    )?;
    let mut rows = stmt.query([])?;
    let mut pair: Option<(i64, i64)> = None;
    let mut pending: Vec<Row<Value>> = Vec::new();
    let mut moved = 0u64;
    while let Some(r) = rows.next()? {
        let this = (r.get(0)?, r.get(1)?);
        if pair.is_some_and(|p| p != this) || pending.len() == chunk::MAX_POINTS {
            let (device, metric) = pair.expect("set with the first row");
            insert_chunk(tx, device, metric, &pending)?;
            pending.clear();
        }
        pair = Some(this);
        pending.push(Row {
            time_us: r.get(2)?,
            seq: r.get::<_, i64>(3)? as u64,
            idx: r.get::<_, i64>(4)? as u32,
            received_us: r.get(5)?,
            value: read_value(r, 6)?,
        });
        moved += 1;
    }
    if let Some((device, metric)) = pair {
        insert_chunk(tx, device, metric, &pending)?;
    }
    drop(rows);
    drop(stmt);
    tx.execute_batch("DROP TABLE telemetry")?;
    tracing::info!(
        points = moved,
        "moved stored telemetry into chunks (schema version 3)"
    );
    Ok(())
}

/// Stores `rows` (one device and metric, in key order, at most `chunk::MAX_POINTS`) as one
/// chunk; returns its row id.
fn insert_chunk<V: std::borrow::Borrow<Value>>(
    conn: &Connection,
    device: i64,
    metric: i64,
    rows: &[Row<V>],
) -> Result<i64, StoreError> {
    let start = rows.iter().map(|r| r.time_us).min().unwrap_or_default();
    let end = rows.iter().map(|r| r.time_us).max().unwrap_or_default();
    insert_encoded(
        conn,
        device,
        metric,
        (start, end),
        rows.len(),
        &chunk::encode(rows),
    )
}

/// Stores decoded points of one device and metric (with arrival columns, in any order) as chunks
/// of at most `chunk::MAX_POINTS`; returns them as (row id, points).
fn insert_columns(
    conn: &Connection,
    device: i64,
    metric: i64,
    mut columns: Columns,
) -> Result<Vec<(i64, usize)>, StoreError> {
    columns.sort();
    let rows = columns.into_rows();
    rows.chunks(chunk::MAX_POINTS)
        .map(|part| Ok((insert_chunk(conn, device, metric, part)?, part.len())))
        .collect()
}

/// Stores an encoded chunk of `points` points spanning `span` (first and last time); returns its
/// row id.
fn insert_encoded(
    conn: &Connection,
    device: i64,
    metric: i64,
    span: (TimeUs, TimeUs),
    points: usize,
    data: &[u8],
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO telemetry_chunks (device, metric, start_us, end_us, points, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![device, metric, span.0, span.1, points as i64, data])?;
    Ok(conn.last_insert_rowid())
}

/// The raw points of one device and metric with `start_us <= time < end_us`, at most `limit`:
/// every column, or (`arrival` false) times and values only. `waiting`: the metric's points in
/// the overlay (see [`snapshot_device`]), merged in.
#[allow(clippy::too_many_arguments)]
fn metric_points(
    conn: &Connection,
    device: i64,
    metric: i64,
    start_us: TimeUs,
    end_us: TimeUs,
    limit: Option<usize>,
    arrival: bool,
    waiting: &[Row<Value>],
) -> Result<Columns, StoreError> {
    let waiting: Vec<Row<&Value>> = waiting
        .iter()
        .filter(|r| (start_us..end_us).contains(&r.time_us))
        .map(Row::borrowed)
        .collect();
    if !waiting.is_empty() && !arrival {
        // ordering them among the chunks' points takes seq and idx
        return metric_points(conn, device, metric, start_us, end_us, limit, true, &[])
            .and_then(|out| merge_waiting(out, waiting, limit));
    }
    if !arrival && limit.is_none() {
        // (no waiting points here: they took the arrival path above)
        if let Some(out) = points_in_time_order(conn, device, metric, start_us, end_us)? {
            return Ok(out);
        }
        return metric_points(conn, device, metric, start_us, end_us, limit, true, &[]);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT start_us, end_us, data FROM telemetry_chunks
         WHERE device = ?1 AND metric = ?2 AND start_us < ?4 AND end_us >= ?3
         ORDER BY start_us, id",
    )?;
    // The points of the matching chunks, to size the columns once (a long history grows them
    // to hundreds of MB: regrowing copies and faults every page again).
    let total: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(points), 0) FROM telemetry_chunks
             WHERE device = ?1 AND metric = ?2 AND start_us < ?4 AND end_us >= ?3",
        )?
        .query_row(params![device, metric, start_us, end_us], |r| r.get(0))?;
    let total = usize::try_from(total).unwrap_or(0);
    let total = limit.map_or(total, |l| total.min(l));
    let mut rows = stmt.query(params![device, metric, start_us, end_us])?;
    let mut out = Columns::default();
    out.reserve(total, arrival);
    let mut sorted = true;
    let mut latest = TimeUs::MIN; // no point gathered is later than this
    while let Some(r) = rows.next()? {
        let (first, last): (TimeUs, TimeUs) = (r.get(0)?, r.get(1)?);
        if limit.is_some_and(|l| out.len() >= l) && first > latest {
            break; // every later chunk starts after the points already gathered
        }
        let before = out.len();
        let data = r.get_ref(2)?.as_blob().map_err(corrupt)?;
        chunk::decode_into(data, &mut out, arrival)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if first < start_us || last >= end_us {
            let keep: Vec<bool> = (0..out.len())
                .map(|i| i < before || (start_us..end_us).contains(&out.time_us[i]))
                .collect();
            out.retain_by(&keep);
        }
        if before > 0 && out.len() > before {
            if !arrival && out.time_us[before] <= out.time_us[before - 1] {
                // chunks overlap: ordering them takes seq and idx
                drop(rows);
                return metric_points(conn, device, metric, start_us, end_us, limit, true, &[])
                    .and_then(|out| merge_waiting(out, waiting, limit));
            }
            if arrival && out.key(before) < out.key(before - 1) {
                sorted = false;
            }
        }
        latest = latest.max(last);
    }
    if !sorted {
        out.sort();
    }
    if let Some(limit) = limit {
        out.truncate(limit);
    }
    merge_waiting(out, waiting, limit)
}

/// The points of one device and metric with `start_us <= time < end_us`, times and values, in
/// time order; `None` when a point set aside (below) shares its time with another (their order is
/// the arrival order, which takes the arrival columns) or the two sets hold values differently.
///
/// Chunks may overlap in time: a fold writes the points that waited in the journal as chunks of
/// their own, spanning the times of the chunks stored meanwhile. Rather than sort everything (a
/// million points for a long history), the chunks holding the most points among those that do
/// not overlap each other are read in order as they are, the others aside, and the two merged.
fn points_in_time_order(
    conn: &Connection,
    device: i64,
    metric: i64,
    start_us: TimeUs,
    end_us: TimeUs,
) -> Result<Option<Columns>, StoreError> {
    let chunks: Vec<ChunkSpan> = conn
        .prepare_cached(
            "SELECT id, start_us, end_us, points FROM telemetry_chunks
             WHERE device = ?1 AND metric = ?2 AND start_us < ?4 AND end_us >= ?3
             ORDER BY start_us, id",
        )?
        .query_map(params![device, metric, start_us, end_us], |r| {
            Ok(ChunkSpan {
                id: r.get(0)?,
                first: r.get(1)?,
                last: r.get(2)?,
                points: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
            })
        })?
        .collect::<Result<_, _>>()?;
    let in_order = heaviest_disjoint(&chunks);
    let room = |main: bool| -> usize {
        chunks
            .iter()
            .zip(&in_order)
            .filter(|(_, m)| **m == main)
            .map(|(c, _)| c.points as usize)
            .sum()
    };
    let (mut out, mut aside) = (Columns::default(), Columns::default());
    out.reserve(room(true), false);
    aside.reserve(room(false), false);
    let mut data = conn.prepare_cached("SELECT data FROM telemetry_chunks WHERE id = ?1")?;
    for (c, &main) in chunks.iter().zip(&in_order) {
        let into = if main { &mut out } else { &mut aside };
        let before = into.len();
        let mut rows = data.query([c.id])?;
        let row = rows
            .next()?
            .ok_or_else(|| corrupt(format!("chunk {} vanished during a read", c.id)))?;
        let blob = row.get_ref(0)?.as_blob().map_err(corrupt)?;
        chunk::decode_into(blob, into, false).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if c.first < start_us || c.last >= end_us {
            let keep: Vec<bool> = (0..into.len())
                .map(|i| i < before || (start_us..end_us).contains(&into.time_us[i]))
                .collect();
            into.retain_by(&keep);
        }
    }
    if aside.len() == 0 {
        return Ok(Some(out));
    }
    Ok(out.merge_by_time(aside))
}

/// A chunk's place in time: its row id, first and last point times, and point count.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ChunkSpan {
    id: i64,
    first: TimeUs,
    last: TimeUs,
    points: u64,
}

/// Which of `chunks` to read in order as they are: the set with the most points among those whose
/// time ranges do not overlap (a chunk must start after the previous one's last point), by
/// weighted interval scheduling. The others are merged in.
fn heaviest_disjoint(chunks: &[ChunkSpan]) -> Vec<bool> {
    let k = chunks.len();
    let mut by_last: Vec<usize> = (0..k).collect();
    by_last.sort_by_key(|&i| chunks[i].last);
    let lasts: Vec<TimeUs> = by_last.iter().map(|&i| chunks[i].last).collect();
    // best[j]: the most points chunks by_last[..j] give; took[j]: whether that uses by_last[j - 1]
    // with, before it, the best of by_last[..before[j - 1]]
    let mut best = vec![0u64; k + 1];
    let mut took = vec![false; k + 1];
    let mut before = vec![0usize; k];
    for j in 0..k {
        let c = &chunks[by_last[j]];
        before[j] = lasts[..j].partition_point(|&last| last < c.first);
        let with = best[before[j]] + c.points;
        (best[j + 1], took[j + 1]) = if with > best[j] {
            (with, true)
        } else {
            (best[j], false)
        };
    }
    let mut chosen = vec![false; k];
    let mut j = k;
    while j > 0 {
        if took[j] {
            chosen[by_last[j - 1]] = true;
            j = before[j - 1];
        } else {
            j -= 1;
        }
    }
    chosen
}

/// Adds points waiting in the overlay to points read from chunks (with arrival columns, sorted,
/// at most `limit`).
fn merge_waiting(
    mut out: Columns,
    mut waiting: Vec<Row<&Value>>,
    limit: Option<usize>,
) -> Result<Columns, StoreError> {
    if waiting.is_empty() {
        return Ok(out);
    }
    waiting.sort_by_key(Row::key);
    chunk::decode_into(&chunk::encode(&waiting), &mut out, true)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    out.sort();
    if let Some(limit) = limit {
        out.truncate(limit);
    }
    Ok(out)
}

/// The metrics a device has points of, as (row id, name), in row id order.
fn device_metrics(
    conn: &Connection,
    device: i64,
    only: Option<&MetricName>,
    waiting: &OverlayPoints,
) -> Result<Vec<(i64, MetricName)>, StoreError> {
    if let Some(name) = only {
        return Ok(conn
            .prepare_cached("SELECT id FROM metrics WHERE name = ?1")?
            .query_row([name.as_str()], |r| r.get(0))
            .optional()?
            .map(|id| vec![(id, name.clone())])
            .unwrap_or_default()); // nobody ever sent this metric
    }
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.name FROM metrics m
         WHERE EXISTS (SELECT 1 FROM telemetry_chunks c WHERE c.device = ?1 AND c.metric = m.id)
         ORDER BY m.id",
    )?;
    let rows = stmt.query_map([device], |r| Ok((r.get(0)?, metric_name(r.get(1)?)?)))?;
    let mut out: Vec<(i64, MetricName)> = rows.collect::<Result<_, _>>()?;
    // metrics whose only points wait in the overlay
    for (&metric, points) in waiting {
        if points.is_empty() || out.iter().any(|(id, _)| *id == metric) {
            continue;
        }
        let name: String = conn
            .prepare_cached("SELECT name FROM metrics WHERE id = ?1")?
            .query_row([metric], |r| r.get(0))?;
        out.push((metric, metric_name(name)?));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// The raw points of a query, metric by metric (`arrival`: with `received_us`, `seq`, `idx`).
fn query_columns(
    conn: &Connection,
    device: i64,
    q: &TelemetryQuery,
    arrival: bool,
    waiting: &OverlayPoints,
) -> Result<Vec<(MetricName, Columns)>, StoreError> {
    let mut out = Vec::new();
    let mut left = q.limit;
    for (metric, name) in device_metrics(conn, device, q.metric.as_ref(), waiting)? {
        if left == Some(0) {
            break;
        }
        let points = metric_points(
            conn,
            device,
            metric,
            q.start_us.unwrap_or(TimeUs::MIN),
            q.end_us.unwrap_or(TimeUs::MAX),
            left,
            arrival,
            waiting.get(&metric).map_or(&[], Vec::as_slice),
        )?;
        if points.len() == 0 {
            continue;
        }
        left = left.map(|l| l - points.len());
        out.push((name, points));
    }
    Ok(out)
}

fn job_points(job: &WriterJob) -> usize {
    match job {
        WriterJob::Append(b, _) => b.batch.points.len(),
        WriterJob::Control(_) => 1,
        WriterJob::Wake => 0,
    }
}

/// Runs `f` under a savepoint: its changes are kept if it succeeds, undone if it fails.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.prepare_cached("SAVEPOINT control")?.execute([])?;
    match f(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE control")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO control; RELEASE control")?;
            Err(e)
        }
    }
}

/// Columns `kind, value, lat, lon, alt, speed, heading, accuracy` of a value.
type ValueColumns = (i64, rusqlite::types::Value, [Option<f64>; 6]);

fn value_columns(v: &Value) -> ValueColumns {
    use rusqlite::types::Value as Sql;
    let none = [None; 6];
    match v {
        Value::Double(x) => (ValueKind::Double.code(), Sql::Real(*x), none),
        Value::Int(x) => (ValueKind::Int.code(), Sql::Integer(*x), none),
        Value::Bool(x) => (ValueKind::Bool.code(), Sql::Integer(i64::from(*x)), none),
        Value::String(s) => (ValueKind::String.code(), Sql::Text(s.clone()), none),
        Value::Geo(g) => (
            ValueKind::Geo.code(),
            Sql::Null,
            [
                Some(g.lat),
                Some(g.lon),
                g.alt_m,
                g.speed_mps,
                g.heading_deg,
                g.accuracy_m,
            ],
        ),
    }
}

/// Reads a value from `kind` at column `at`, `value` at `at + 1`, then the six geo columns.
fn read_value(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Value> {
    let code: i64 = row.get(at)?;
    let corrupt = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Null, what.into())
    };
    let kind =
        ValueKind::from_code(code).ok_or_else(|| corrupt(format!("unknown value kind {code}")))?;
    let raw = row.get_ref(at + 1)?;
    Ok(match (kind, raw) {
        (ValueKind::Double, ValueRef::Real(x)) => Value::Double(x),
        (ValueKind::Double, ValueRef::Integer(x)) => Value::Double(x as f64),
        (ValueKind::Int, ValueRef::Integer(x)) => Value::Int(x),
        (ValueKind::Bool, ValueRef::Integer(x)) => Value::Bool(x != 0),
        (ValueKind::String, ValueRef::Text(t)) => {
            Value::String(String::from_utf8_lossy(t).into_owned())
        }
        (ValueKind::Geo, _) => {
            let g = |i: usize| row.get::<_, Option<f64>>(at + 2 + i);
            Value::Geo(GeoPosition {
                lat: g(0)?.unwrap_or_default(),
                lon: g(1)?.unwrap_or_default(),
                alt_m: g(2)?,
                speed_mps: g(3)?,
                heading_deg: g(4)?,
                accuracy_m: g(5)?,
            })
        }
        (kind, other) => {
            return Err(corrupt(format!(
                "a {kind} value stored as {:?}",
                other.data_type()
            )));
        }
    })
}

fn metric_name(s: String) -> rusqlite::Result<MetricName> {
    MetricName::new(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

fn device_id(s: String) -> rusqlite::Result<DeviceId> {
    DeviceId::new(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

fn load_last_values(conn: &Connection, device: i64) -> Result<Vec<MetricValue>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.name, l.time_us, l.kind, l.value, l.lat, l.lon, l.alt, l.speed, l.heading, l.accuracy
         FROM last_values l JOIN metrics m ON m.id = l.metric WHERE l.device = ?1 ORDER BY m.name",
    )?;
    let rows = stmt.query_map([device], |r| {
        Ok(MetricValue {
            metric: metric_name(r.get(0)?)?,
            time_us: r.get(1)?,
            value: read_value(r, 2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The devices matching `where_clause`, with `overlay` (the writer's bookkeeping not yet folded
/// into the tables) laid over their rows.
fn load_devices(
    conn: &Connection,
    overlay: Option<&SharedOverlay>,
    where_clause: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<(i64, DeviceRecord)>, StoreError> {
    let sql = format!(
        "SELECT id, name, tags, created_us, last_seq, point_count, attributes FROM devices {where_clause}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params, |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (rowid, name, tags, created_us, last_seq, point_count, attributes) = row?;
        let tags: BTreeMap<String, String> = serde_json::from_str(&tags)
            .map_err(|e| StoreError::Corrupt(format!("tags of {name}: {e}")))?;
        let attributes: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&attributes)
                .map_err(|e| StoreError::Corrupt(format!("attributes of {name}: {e}")))?;
        let mut record = DeviceRecord {
            id: device_id(name)?,
            tags,
            attributes,
            created_us,
            last_seq: last_seq as u64,
            point_count: point_count as u64,
            last_values: load_last_values(conn, rowid)?,
        };
        if let Some(overlay) = overlay {
            lock_overlay(overlay).apply(rowid, &mut record);
        }
        out.push((rowid, record));
    }
    Ok(out)
}

/// Everything a device actor starts from, read on one connection.
fn state_of(
    conn: &Connection,
    rowid: i64,
    record: DeviceRecord,
) -> Result<DeviceState, StoreError> {
    Ok(DeviceState {
        twin: twin_of(conn, rowid, &record.id)?,
        open_commands: open_commands_of(conn, rowid)?,
        pending_direct: pending_direct_of(conn, rowid, &record.id)?,
        last_presence: presence_of(conn, rowid, 1)?.pop(),
        record,
    })
}

fn twin_of(conn: &Connection, rowid: i64, device: &DeviceId) -> Result<StoredTwin, StoreError> {
    let row: Option<(String, String, i64, String, String, i64)> = conn
        .prepare_cached(
            "SELECT reported, reported_meta, reported_version, desired, desired_meta, desired_version
             FROM twins WHERE device = ?1",
        )?
        .query_row([rowid], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })
        .optional()?;
    let Some((rep, rep_meta, rep_v, des, des_meta, des_v)) = row else {
        return Ok(StoredTwin::default());
    };
    Ok(StoredTwin {
        reported: load_twin_doc(
            &rep,
            &rep_meta,
            rep_v,
            &format!("reported twin of {device}"),
        )?,
        desired: load_twin_doc(&des, &des_meta, des_v, &format!("desired twin of {device}"))?,
    })
}

fn open_commands_of(conn: &Connection, rowid: i64) -> Result<Vec<CommandRecord>, StoreError> {
    load_commands(
        conn,
        "WHERE c.device = ?1 AND c.state IN ('queued', 'delivered') ORDER BY c.id",
        &[&rowid],
    )
}

fn pending_direct_of(
    conn: &Connection,
    rowid: i64,
    to: &DeviceId,
) -> Result<Vec<DirectRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, sender, payload, sent_us, expires_us FROM direct_messages
         WHERE target = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([rowid], |r| {
        Ok(DirectRecord {
            id: r.get::<_, i64>(0)? as u64,
            to: to.clone(),
            from: device_id(r.get(1)?)?,
            payload: r.get(2)?,
            sent_us: r.get(3)?,
            expires_us: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn presence_of(
    conn: &Connection,
    rowid: i64,
    limit: usize,
) -> Result<Vec<PresenceRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT online, at_us, reason, remote, session FROM presence_events
         WHERE device = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![rowid, limit as i64], |r| {
        Ok(PresenceRecord {
            online: r.get(0)?,
            at_us: r.get(1)?,
            reason: r.get(2)?,
            remote_addr: r.get(3)?,
            session: r.get::<_, i64>(4)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn device_rowid(conn: &Connection, id: &DeviceId) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT id FROM devices WHERE name = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::UnknownDevice(id.clone()))
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse_json(text: &str, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(format!("{what}: {e}")))
}

fn load_twin_doc(doc: &str, meta: &str, version: i64, what: &str) -> Result<TwinDoc, StoreError> {
    TwinDoc::from_parts(
        &parse_json(doc, what)?,
        &parse_json(meta, what)?,
        version as u64,
    )
    .map_err(|e| corrupt(format!("{what}: {e}")))
}

const COMMAND_COLUMNS: &str = "c.id, d.name, c.name, c.args, c.idempotency_key, c.concurrent,
    c.created_us, c.deadline_us, c.state, c.attempts, c.result, c.error, c.history";

fn command_state(s: &str) -> Result<CommandState, StoreError> {
    CommandState::parse(s).ok_or_else(|| corrupt(format!("unknown command state {s:?}")))
}

fn history_json(history: &[(CommandState, TimeUs)]) -> String {
    let items: Vec<serde_json::Value> = history
        .iter()
        .map(|(s, t)| serde_json::json!([s.name(), t]))
        .collect();
    serde_json::Value::Array(items).to_string()
}

fn parse_history(text: &str) -> Result<Vec<(CommandState, TimeUs)>, StoreError> {
    let items: Vec<(String, TimeUs)> =
        serde_json::from_str(text).map_err(|e| corrupt(format!("command history: {e}")))?;
    items
        .into_iter()
        .map(|(s, t)| Ok((command_state(&s)?, t)))
        .collect()
}

/// Downsampled telemetry: per metric and bucket of `every` µs, the aggregate of the numeric values.
fn aggregate(
    conn: &Connection,
    device: i64,
    q: &TelemetryQuery,
    every: i64,
    waiting: &OverlayPoints,
) -> Result<Vec<StoredPoint>, StoreError> {
    let every = every.max(1);
    let mut out = Vec::new();
    let limit = q.limit.unwrap_or(usize::MAX);
    for (metric, name) in device_metrics(conn, device, q.metric.as_ref(), waiting)? {
        let points = metric_points(
            conn,
            device,
            metric,
            q.start_us.unwrap_or(TimeUs::MIN),
            q.end_us.unwrap_or(TimeUs::MAX),
            None,
            false,
            waiting.get(&metric).map_or(&[], Vec::as_slice),
        )?;
        // (bucket, count, sum, min, max) of the bucket being filled; points come in time order
        let mut current: Option<(TimeUs, u64, f64, f64, f64)> = None;
        let emit = |b: (TimeUs, u64, f64, f64, f64), out: &mut Vec<StoredPoint>| {
            let (bucket, n, sum, min, max) = b;
            let value = match q.agg {
                Aggregation::Mean => sum / n as f64,
                Aggregation::Min => min,
                Aggregation::Max => max,
                Aggregation::Sum => sum,
                Aggregation::Count => n as f64,
            };
            out.push(StoredPoint {
                metric: name.clone(),
                time_us: bucket,
                received_us: bucket,
                seq: 0,
                value: Value::Double(value),
            });
        };
        for i in 0..points.len() {
            let Some(x) = points.values.number(i) else {
                continue; // strings and positions have no aggregate
            };
            let t = points.time_us[i];
            let bucket = t - t.rem_euclid(every);
            match &mut current {
                Some(c) if c.0 == bucket => {
                    c.1 += 1;
                    c.2 += x;
                    c.3 = c.3.min(x);
                    c.4 = c.4.max(x);
                }
                _ => {
                    if let Some(done) = current.take() {
                        emit(done, &mut out);
                    }
                    current = Some((bucket, 1, x, x, x));
                }
            }
        }
        if let Some(done) = current {
            emit(done, &mut out);
        }
        if out.len() >= limit {
            out.truncate(limit);
            break;
        }
    }
    Ok(out)
}

fn load_jobs(
    conn: &Connection,
    tail: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<JobRecord>, StoreError> {
    let sql = format!(
        "SELECT id, name, query, spec, state, created_us, finished_us, reason FROM jobs {tail}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params, |r| {
        Ok(JobRecord {
            id: r.get::<_, i64>(0)? as u64,
            name: r.get(1)?,
            query: r.get(2)?,
            spec: r.get(3)?,
            state: r.get(4)?,
            created_us: r.get(5)?,
            finished_us: r.get(6)?,
            reason: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn load_commands(
    conn: &Connection,
    where_clause: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<CommandRecord>, StoreError> {
    let sql = format!(
        "SELECT {COMMAND_COLUMNS} FROM commands c JOIN devices d ON d.id = c.device {where_clause}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    type Row = (
        i64,
        String,
        String,
        String,
        Option<String>,
        bool,
        i64,
        i64,
        String,
        i64,
        Option<String>,
        Option<String>,
        String,
    );
    let rows = stmt.query_map(params, |r| {
        Ok::<Row, rusqlite::Error>((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
            r.get(10)?,
            r.get(11)?,
            r.get(12)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (
            id,
            device,
            name,
            args,
            key,
            concurrent,
            created,
            deadline,
            state,
            attempts,
            result,
            error,
            history,
        ) = row?;
        out.push(CommandRecord {
            id: id as CommandId,
            device: device_id(device)?,
            name,
            args_json: args,
            idempotency_key: key,
            concurrent,
            created_us: created,
            deadline_us: deadline,
            state: command_state(&state)?,
            attempts: attempts as u32,
            result_json: result,
            error,
            history: parse_history(&history)?,
        });
    }
    Ok(out)
}

#[async_trait]
impl Store for SqliteStore {
    async fn provision_device(&self, device: NewDevice) -> Result<(), StoreError> {
        self.provision_devices(vec![device]).await.map(drop)
    }

    async fn provision_devices(
        &self,
        devices: Vec<NewDevice>,
    ) -> Result<Vec<DeviceState>, StoreError> {
        let rows = devices
            .into_iter()
            .map(|d| {
                let tags = serde_json::to_string(&d.tags)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let attributes = serde_json::Value::Object(d.attributes).to_string();
                Ok((d.id, d.token_hash, tags, attributes, d.created_us))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut rowids = Vec::with_capacity(rows.len());
            {
                let mut insert = tx.prepare(
                    "INSERT INTO devices (name, token_hash, tags, attributes, created_us) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(name) DO NOTHING RETURNING id",
                )?;
                for (id, hash, tags, attributes, created_us) in &rows {
                    let rowid: Option<i64> = insert
                        .query_row(
                            params![id.as_str(), &hash.as_bytes()[..], tags, attributes, created_us],
                            |r| r.get(0),
                        )
                        .optional()?;
                    // none: taken before, or earlier in this list; the transaction rolls back
                    rowids.push(rowid.ok_or_else(|| StoreError::DeviceExists(id.clone()))?);
                }
            }
            let mut states = Vec::with_capacity(rows.len());
            for rowid in rowids {
                let (rowid, record) = load_devices(&tx, None, "WHERE id = ?1", &[&rowid])?
                    .pop()
                    .ok_or_else(|| StoreError::Corrupt(format!("device row {rowid} vanished")))?;
                states.push(state_of(&tx, rowid, record)?);
            }
            tx.commit()?;
            Ok(states)
        })
        .await
    }

    async fn device_token_hash(&self, id: &DeviceId) -> Result<Option<TokenHash>, StoreError> {
        let id = id.clone();
        self.read(move |conn| {
            let hash: Option<Vec<u8>> = conn
                .prepare_cached("SELECT token_hash FROM devices WHERE name = ?1")?
                .query_row([id.as_str()], |r| r.get(0))
                .optional()?;
            hash.map(|h| {
                TokenHash::from_slice(&h)
                    .ok_or_else(|| StoreError::Corrupt(format!("token hash of {id}")))
            })
            .transpose()
        })
        .await
    }

    async fn add_admin_token(&self, hash: TokenHash, created_us: TimeUs) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO admin_tokens (token_hash, created_us) VALUES (?1, ?2)",
                params![&hash.as_bytes()[..], created_us],
            )?;
            Ok(())
        })
        .await
    }

    async fn has_admin_token(&self) -> Result<bool, StoreError> {
        self.read(|conn| {
            Ok(
                conn.query_row("SELECT count(*) FROM admin_tokens", [], |r| {
                    r.get::<_, i64>(0)
                })? > 0,
            )
        })
        .await
    }

    async fn verify_admin_token(&self, token: &str) -> Result<bool, StoreError> {
        // Look the hash up (constant time in the token's content), then compare in constant time.
        let presented = TokenHash::of(token);
        let token = token.to_owned();
        self.read(move |conn| {
            let stored: Option<Vec<u8>> = conn
                .prepare_cached("SELECT token_hash FROM admin_tokens WHERE token_hash = ?1")?
                .query_row([&presented.as_bytes()[..]], |r| r.get(0))
                .optional()?;
            Ok(stored
                .and_then(|h| TokenHash::from_slice(&h))
                .is_some_and(|h| h.verify(&token)))
        })
        .await
    }

    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.clone();
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            Ok(
                load_devices(conn, Some(&overlay), "WHERE name = ?1", &[&id.as_str()])?
                    .pop()
                    .map(|(_, record)| record),
            )
        })
        .await
    }

    async fn list_devices(
        &self,
        after: Option<DeviceId>,
        limit: Option<usize>,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let after = after.map(|a| a.as_str().to_owned()).unwrap_or_default();
        let limit = limit.map_or(-1, |l| l as i64);
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            Ok(load_devices(
                conn,
                Some(&overlay),
                "WHERE name > ?1 ORDER BY name LIMIT ?2",
                &[&after, &limit],
            )?
            .into_iter()
            .map(|(_, record)| record)
            .collect())
        })
        .await
    }

    async fn device_state(&self, id: &DeviceId) -> Result<Option<DeviceState>, StoreError> {
        let id = id.clone();
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            load_devices(conn, Some(&overlay), "WHERE name = ?1", &[&id.as_str()])?
                .pop()
                .map(|(rowid, record)| state_of(conn, rowid, record))
                .transpose()
        })
        .await
    }

    async fn device_states(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceState>, StoreError> {
        let after = after.map(|a| a.as_str().to_owned()).unwrap_or_default();
        let limit = limit as i64;
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            load_devices(
                conn,
                Some(&overlay),
                "WHERE name > ?1 ORDER BY name LIMIT ?2",
                &[&after, &limit],
            )?
            .into_iter()
            .map(|(rowid, record)| state_of(conn, rowid, record))
            .collect()
        })
        .await
    }

    async fn query_telemetry(&self, q: TelemetryQuery) -> Result<Vec<StoredPoint>, StoreError> {
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?; // one snapshot for the whole query
            let (device, waiting) = snapshot_device(&tx, &overlay, &q.device)?;
            if let Some(every) = q.every_us {
                return aggregate(&tx, device, &q, every, &waiting);
            }
            let mut points = Vec::new();
            for (metric, c) in query_columns(&tx, device, &q, true, &waiting)? {
                points.extend((0..c.len()).map(|i| StoredPoint {
                    metric: metric.clone(),
                    time_us: c.time_us[i],
                    received_us: c.received_us[i],
                    seq: c.seq[i],
                    value: c.values.get(i),
                }));
            }
            Ok(points)
        })
        .await
    }

    async fn query_telemetry_columns(
        &self,
        q: TelemetryQuery,
    ) -> Result<Vec<MetricColumns>, StoreError> {
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?; // one snapshot for the whole query
            let (device, waiting) = snapshot_device(&tx, &overlay, &q.device)?;
            Ok(query_columns(&tx, device, &q, false, &waiting)?
                .into_iter()
                .map(|(metric, c)| MetricColumns {
                    metric,
                    time_us: c.time_us,
                    values: c.values,
                })
                .collect())
        })
        .await
    }

    async fn append(&self, batch: AppendBatch) -> Result<(), StoreError> {
        let permit = self
            .inner
            .append_room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        self.queue_append(batch, permit)
    }

    fn try_append(&self, batch: AppendBatch) -> Result<Option<AppendBatch>, StoreError> {
        use tokio::sync::TryAcquireError;
        let permit = match self.inner.append_room.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => return Ok(Some(batch)),
            Err(TryAcquireError::Closed) => return Err(StoreError::Closed),
        };
        self.queue_append(batch, permit).map(|()| None)
    }

    async fn point_count(&self) -> Result<u64, StoreError> {
        let overlay = self.inner.overlay.clone();
        self.read(move |conn| {
            let mut counts: FastMap<i64, u64> = FastMap::default();
            let mut stmt = conn.prepare_cached("SELECT id, point_count FROM devices")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                counts.insert(r.get(0)?, r.get::<_, i64>(1)? as u64);
            }
            for (rowid, b) in &lock_overlay(&overlay).devices {
                if let Some(c) = counts.get_mut(rowid) {
                    *c = (*c).max(b.point_count);
                }
            }
            Ok(counts.values().sum())
        })
        .await
    }

    fn update_device(
        &self,
        device: &DeviceId,
        tags: BTreeMap<String, String>,
        attributes: serde_json::Map<String, serde_json::Value>,
    ) -> StoreFuture<()> {
        let device = device.clone();
        self.control(move |conn| {
            let tags = serde_json::to_string(&tags).map_err(corrupt)?;
            let attributes = serde_json::Value::Object(attributes).to_string();
            let changed = conn
                .prepare_cached("UPDATE devices SET tags = ?2, attributes = ?3 WHERE name = ?1")?
                .execute(params![device.as_str(), tags, attributes])?;
            if changed == 0 {
                return Err(StoreError::UnknownDevice(device));
            }
            Ok(())
        })
    }

    fn put_group(&self, group: GroupRecord) -> StoreFuture<()> {
        self.control(move |conn| {
            let members: Vec<&str> = group.members.iter().map(DeviceId::as_str).collect();
            let members = serde_json::to_string(&members).map_err(corrupt)?;
            conn.prepare_cached(
                "INSERT INTO groups (name, members, query) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET members = excluded.members, query = excluded.query",
            )?
            .execute(params![group.name, members, group.query])?;
            Ok(())
        })
    }

    fn delete_group(&self, name: &str) -> StoreFuture<bool> {
        let name = name.to_owned();
        self.control(move |conn| {
            Ok(conn
                .prepare_cached("DELETE FROM groups WHERE name = ?1")?
                .execute([name])?
                > 0)
        })
    }

    async fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT name, members, query FROM groups ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, members, query) = row?;
                let members: Vec<String> = serde_json::from_str(&members)
                    .map_err(|e| corrupt(format!("members of group {name}: {e}")))?;
                out.push(GroupRecord {
                    members: members
                        .into_iter()
                        .map(device_id)
                        .collect::<Result<_, _>>()?,
                    name,
                    query,
                });
            }
            Ok(out)
        })
        .await
    }

    fn insert_job(&self, job: JobRecord, targets: Vec<DeviceId>) -> StoreFuture<u64> {
        self.control(move |conn| {
            conn.prepare_cached(
                "INSERT INTO jobs (name, query, spec, state, created_us, finished_us, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                job.name,
                job.query,
                job.spec,
                job.state,
                job.created_us,
                job.finished_us,
                job.reason
            ])?;
            let id = conn.last_insert_rowid();
            let mut insert = conn.prepare_cached(
                "INSERT INTO job_targets (job, device, state) VALUES (?1, ?2, 'pending')",
            )?;
            for t in &targets {
                insert.execute(params![id, t.as_str()])?;
            }
            Ok(id as u64)
        })
    }

    fn update_job(
        &self,
        id: u64,
        state: String,
        finished_us: TimeUs,
        reason: String,
    ) -> StoreFuture<()> {
        self.control(move |conn| {
            conn.prepare_cached(
                "UPDATE jobs SET state = ?2, finished_us = ?3, reason = ?4 WHERE id = ?1",
            )?
            .execute(params![id as i64, state, finished_us, reason])?;
            Ok(())
        })
    }

    fn update_job_target(&self, job: u64, t: JobTargetRecord) -> StoreFuture<()> {
        self.control(move |conn| {
            conn.prepare_cached(
                "UPDATE job_targets SET state = ?3, command_id = coalesce(?4, command_id)
                 WHERE job = ?1 AND device = ?2",
            )?
            .execute(params![
                job as i64,
                t.device.as_str(),
                t.state,
                t.command_id.map(|c| c as i64)
            ])?;
            Ok(())
        })
    }

    async fn job(&self, id: u64) -> Result<Option<(JobRecord, Vec<JobTargetRecord>)>, StoreError> {
        self.read(move |conn| {
            let Some(job) = load_jobs(conn, "WHERE id = ?1", &[&(id as i64)])?.pop() else {
                return Ok(None);
            };
            let mut stmt = conn.prepare_cached(
                "SELECT device, state, command_id FROM job_targets WHERE job = ?1 ORDER BY device",
            )?;
            let rows = stmt.query_map([id as i64], |r| {
                Ok(JobTargetRecord {
                    device: device_id(r.get(0)?)?,
                    state: r.get(1)?,
                    command_id: r.get::<_, Option<i64>>(2)?.map(|c| c as u64),
                })
            })?;
            Ok(Some((job, rows.collect::<Result<_, _>>()?)))
        })
        .await
    }

    async fn list_jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.read(move |conn| load_jobs(conn, "ORDER BY id DESC LIMIT ?1", &[&(limit as i64)]))
            .await
    }

    async fn running_jobs(&self) -> Result<Vec<u64>, StoreError> {
        self.read(|conn| {
            Ok(load_jobs(conn, "WHERE state = 'running' ORDER BY id", &[])?
                .into_iter()
                .map(|j| j.id)
                .collect())
        })
        .await
    }

    fn put_retained(&self, m: RetainedRecord) -> StoreFuture<()> {
        self.control(move |conn| {
            if m.payload.is_empty() {
                conn.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                    .execute([&m.topic])?;
            } else {
                conn.prepare_cached(
                    "INSERT INTO retained (topic, payload, from_device, published_us) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload,
                        from_device = excluded.from_device, published_us = excluded.published_us",
                )?
                .execute(params![m.topic, m.payload, m.from_device, m.published_us])?;
            }
            Ok(())
        })
    }

    async fn retained(&self) -> Result<Vec<RetainedRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT topic, payload, from_device, published_us FROM retained ORDER BY topic",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(RetainedRecord {
                    topic: r.get(0)?,
                    payload: r.get(1)?,
                    from_device: r.get(2)?,
                    published_us: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    fn insert_direct(&self, m: DirectRecord) -> StoreFuture<u64> {
        self.control(move |conn| {
            let target = device_rowid(conn, &m.to)?;
            conn.prepare_cached(
                "INSERT INTO direct_messages (target, sender, payload, sent_us, expires_us)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                target,
                m.from.as_str(),
                m.payload,
                m.sent_us,
                m.expires_us
            ])?;
            Ok(conn.last_insert_rowid() as u64)
        })
    }

    fn delete_direct(&self, id: u64) -> StoreFuture<()> {
        self.control(move |conn| {
            conn.prepare_cached("DELETE FROM direct_messages WHERE id = ?1")?
                .execute([id as i64])?;
            Ok(())
        })
    }

    async fn pending_direct(&self, to: &DeviceId) -> Result<Vec<DirectRecord>, StoreError> {
        let to = to.clone();
        self.read(move |conn| pending_direct_of(conn, device_rowid(conn, &to)?, &to))
            .await
    }

    async fn twin(&self, device: &DeviceId) -> Result<StoredTwin, StoreError> {
        let device = device.clone();
        self.read(move |conn| twin_of(conn, device_rowid(conn, &device)?, &device))
            .await
    }

    fn save_twin(&self, device: &DeviceId, side: TwinSide, doc: &TwinDoc) -> StoreFuture<()> {
        let device = device.clone();
        let text = doc.to_json().to_string();
        let meta = doc.metadata_json().to_string();
        let version = doc.version() as i64;
        self.control(move |conn| {
            let rowid = device_rowid(conn, &device)?;
            let sql = match side {
                TwinSide::Reported => {
                    "INSERT INTO twins (device, reported, reported_meta, reported_version) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(device) DO UPDATE SET reported = excluded.reported,
                        reported_meta = excluded.reported_meta, reported_version = excluded.reported_version"
                }
                TwinSide::Desired => {
                    "INSERT INTO twins (device, desired, desired_meta, desired_version) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(device) DO UPDATE SET desired = excluded.desired,
                        desired_meta = excluded.desired_meta, desired_version = excluded.desired_version"
                }
            };
            conn.prepare_cached(sql)?
                .execute(params![rowid, text, meta, version])?;
            Ok(())
        })
    }

    fn insert_command(&self, c: NewCommand) -> StoreFuture<(CommandRecord, bool)> {
        self.urgent_control(move |conn| {
            let rowid = device_rowid(conn, &c.device)?;
            if let Some(key) = &c.idempotency_key {
                let existing = load_commands(
                    conn,
                    "WHERE c.device = ?1 AND c.idempotency_key = ?2",
                    &[&rowid, key],
                )?;
                if let Some(first) = existing.into_iter().next() {
                    return Ok((first, false));
                }
            }
            let history = vec![(CommandState::Queued, c.created_us)];
            conn.prepare_cached(
                "INSERT INTO commands (device, name, args, idempotency_key, concurrent, created_us,
                                       deadline_us, state, attempts, history)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9)",
            )?
            .execute(params![
                rowid,
                c.name,
                c.args_json,
                c.idempotency_key,
                c.concurrent,
                c.created_us,
                c.deadline_us,
                CommandState::Queued.name(),
                history_json(&history)
            ])?;
            let id = conn.last_insert_rowid() as CommandId;
            Ok((
                CommandRecord {
                    id,
                    device: c.device,
                    name: c.name,
                    args_json: c.args_json,
                    idempotency_key: c.idempotency_key,
                    concurrent: c.concurrent,
                    created_us: c.created_us,
                    deadline_us: c.deadline_us,
                    state: CommandState::Queued,
                    attempts: 0,
                    result_json: None,
                    error: None,
                    history,
                },
                true,
            ))
        })
    }

    fn update_command(&self, u: CommandUpdate) -> StoreFuture<()> {
        self.control(move |conn| write_command_update(conn, &u))
    }

    fn update_command_then(&self, u: CommandUpdate, on_durable: OnDurable) {
        self.urgent_control_then(move |conn| write_command_update(conn, &u), on_durable);
    }

    async fn command(&self, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
        self.read(move |conn| Ok(load_commands(conn, "WHERE c.id = ?1", &[&(id as i64)])?.pop()))
            .await
    }

    async fn command_by_key(
        &self,
        device: &DeviceId,
        key: &str,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let device = device.clone();
        let key = key.to_owned();
        self.read(move |conn| {
            let rowid = device_rowid(conn, &device)?;
            Ok(load_commands(
                conn,
                "WHERE c.device = ?1 AND c.idempotency_key = ?2",
                &[&rowid, &key],
            )?
            .pop())
        })
        .await
    }

    async fn list_commands(&self, f: CommandFilter) -> Result<Vec<CommandRecord>, StoreError> {
        self.read(move |conn| {
            let rowid = device_rowid(conn, &f.device)?;
            let state = f.state.map(CommandState::name);
            let before = f.before_id.map_or(i64::MAX, |b| b as i64);
            load_commands(
                conn,
                "WHERE c.device = ?1 AND (?2 IS NULL OR c.state = ?2) AND c.id < ?3
                 ORDER BY c.id DESC LIMIT ?4",
                &[&rowid, &state, &before, &(f.limit as i64)],
            )
        })
        .await
    }

    async fn open_commands(&self, device: &DeviceId) -> Result<Vec<CommandRecord>, StoreError> {
        let device = device.clone();
        self.read(move |conn| open_commands_of(conn, device_rowid(conn, &device)?))
            .await
    }

    async fn devices_with_open_commands(&self) -> Result<Vec<DeviceId>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT d.name FROM commands c JOIN devices d ON d.id = c.device
                 WHERE c.state IN ('queued', 'delivered') ORDER BY d.name",
            )?;
            let rows = stmt.query_map([], |r| device_id(r.get(0)?))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    fn record_presence(&self, device: &DeviceId, e: PresenceRecord) -> StoreFuture<()> {
        let device = device.clone();
        self.control(move |conn| {
            let rowid = device_rowid(conn, &device)?;
            conn.prepare_cached(
                "INSERT INTO presence_events (device, online, at_us, reason, remote, session)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                rowid,
                e.online,
                e.at_us,
                e.reason,
                e.remote_addr,
                e.session as i64
            ])?;
            Ok(())
        })
    }

    async fn presence_history(
        &self,
        device: &DeviceId,
        limit: usize,
    ) -> Result<Vec<PresenceRecord>, StoreError> {
        let device = device.clone();
        self.read(move |conn| presence_of(conn, device_rowid(conn, &device)?, limit))
            .await
    }
}

/// The one thread that writes telemetry: gathers queued batches from every device and commits
/// them in one transaction (a group commit), then reports each device's durable sequence.
struct Writer {
    conn: Connection,
    /// device name → (row id, highest stored seq, points stored)
    devices: FastMap<DeviceId, (i64, u64, u64)>,
    metrics: FastMap<MetricName, i64>,
    compaction: Compaction,
    /// The bookkeeping readers see before it is folded into the tables.
    overlay: SharedOverlay,
    /// Devices with journal rows not yet folded.
    unfolded: FastSet<i64>,
    fold_interval: std::time::Duration,
    last_fold: std::time::Instant,
    /// Points waiting in the journal and the overlay.
    waiting_points: usize,
    /// Where commits of small batches go instead of SQLite.
    log: tlog::TelemetryLog,
    /// False after an append that may have left a torn record, until the next fold empties the
    /// log: commits go to SQLite meanwhile.
    log_usable: bool,
    sync: Synchronous,
    /// Pages in the WAL after the last commit (0 after a checkpoint, until the next commit).
    wal_frames: i32,
    /// The writer thread checkpoints once the WAL holds this many pages
    /// ([`WAL_CHECKPOINT_PAGES`]; tests lower it).
    checkpoint_pages: i32,
    /// True from the start of a checkpoint until the writer thread has finished it (see
    /// [`Writer::checkpoint_if_due`]): commits go on meanwhile, on every thread.
    checkpointing: bool,
    /// The checkpoint thread's copy, once done, for the writer thread to finish the checkpoint.
    copied: Option<CheckpointCopy>,
    /// Called by the checkpoint thread as it starts a checkpoint's copy, and by the writer
    /// thread once the checkpoint is done: tests hold a checkpoint there.
    #[cfg(test)]
    checkpoint_hook: Option<Arc<dyn Fn(CheckpointStep) + Send + Sync>>,
}

#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CheckpointStep {
    Copy,
    Done,
}

/// The writer thread checkpoints the WAL once it holds this many pages (64 MiB; SQLite's default
/// autocheckpoint is at 1000): a fleet of slow devices rewrites the same device, last-value and
/// index pages commit after commit, and a checkpoint copies each page once however often it was
/// rewritten since the last one (10% less server CPU per message in the slow-devices benchmark).
const WAL_CHECKPOINT_PAGES: i32 = 16_384;

/// Runs a passive checkpoint on `conn`: (pages in the WAL, pages of it in the database).
fn passive_checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// How long SQLite waits for another connection's write lock (registry writes use their own).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    /// Pages in the WAL after the last commit on this thread through the writer's connection:
    /// SQLite calls [`note_wal_frames`] on the committing thread, inside the commit.
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook, in place of SQLite's autocheckpoint (which checkpoints inside
/// the commit that finds the WAL long enough, on whichever thread made it).
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("devices", &self.devices.len())
            .field("unfolded", &self.unfolded.len())
            .field("waiting_points", &self.waiting_points)
            .finish_non_exhaustive()
    }
}

/// A fold comes early once this many points wait in the overlay (each costs ~100 bytes there).
const FOLD_POINTS: usize = 1 << 20;

/// Locks the writer, poisoned or not, as every use of it does.
fn lock_writer_mutex(writer: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
    writer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The first pass of a checkpoint, done by the checkpoint thread.
struct CheckpointCopy {
    /// Its outcome: (pages in the WAL, pages of it in the database); `None` without a
    /// connection of its own (the second pass then copies everything).
    done: Option<rusqlite::Result<(i64, i64)>>,
    took: Duration,
}

/// How the checkpoint thread wakes the writer thread once its copy is done: a [`WriterJob::Wake`]
/// through the writer's queue, counted in `queued` as every job is. A weak sender, so that the
/// writer thread still ends once every clone of the store is dropped.
#[derive(Clone)]
struct CheckpointWake {
    writes: mpsc::WeakUnboundedSender<WriterJob>,
    queued: Arc<AtomicUsize>,
}

impl CheckpointWake {
    fn wake(&self) {
        let Some(writes) = self.writes.upgrade() else {
            return; // the store is closing: the writer thread ends without the second pass
        };
        self.queued.fetch_add(1, Ordering::AcqRel);
        if writes.send(WriterJob::Wake).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Nice value of the checkpoint thread: CFS gives it ~10% of a core that other threads want
/// (weight 110 against 1024) and all of an idle one.
const CHECKPOINT_NICE: i32 = 10;

/// The checkpoint thread: copies the WAL into the database when asked (the first pass of
/// [`Writer::checkpoint_if_due`]), on a connection of its own. Dropping this ends the thread
/// after the copy in progress, if any.
struct Checkpointer {
    requests: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(
        writer: Arc<Mutex<Writer>>,
        path: PathBuf,
        sync: Synchronous,
        wake: CheckpointWake,
    ) -> std::io::Result<Self> {
        let (requests, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fleetlink-store-checkpoint".into())
            .spawn(move || {
                // Linux: the calling thread's nice value, not the whole process's
                if let Err(error) = rustix::process::setpriority_process(None, CHECKPOINT_NICE) {
                    tracing::debug!(%error, "cannot lower the checkpoint thread's priority");
                }
                let mut spare: Option<Connection> = None;
                while rx.recv().is_ok() {
                    #[cfg(test)]
                    {
                        let hook = lock_writer_mutex(&writer).checkpoint_hook.clone();
                        if let Some(hook) = hook {
                            hook(CheckpointStep::Copy);
                        }
                    }
                    let started = std::time::Instant::now();
                    if spare.is_none() {
                        match open_connection(&path, sync) {
                            Ok(conn) => spare = Some(conn),
                            // the pass under the lock copies it all then
                            Err(error) => {
                                tracing::warn!(%error, "cannot open the checkpoint's connection")
                            }
                        }
                    }
                    let done = spare.as_ref().map(passive_checkpoint);
                    lock_writer_mutex(&writer).copied = Some(CheckpointCopy {
                        done,
                        took: started.elapsed(),
                    });
                    wake.wake();
                }
            })?;
        Ok(Self {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Asks for a copy; an error if the thread is gone.
    fn copy(&self) -> std::io::Result<()> {
        self.requests
            .as_ref()
            .and_then(|r| r.send(()).ok())
            .ok_or_else(|| std::io::Error::other("the checkpoint thread has stopped"))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Writer {
    fn new(
        conn: Connection,
        overlay: SharedOverlay,
        fold_interval: std::time::Duration,
        log: tlog::TelemetryLog,
        sync: Synchronous,
    ) -> Self {
        Self {
            log,
            log_usable: true,
            sync,
            conn,
            devices: FastMap::default(),
            metrics: FastMap::default(),
            compaction: Compaction::default(),
            overlay,
            unfolded: FastSet::default(),
            fold_interval,
            last_fold: std::time::Instant::now(),
            waiting_points: 0,
            wal_frames: 0,
            checkpoint_pages: WAL_CHECKPOINT_PAGES,
            checkpointing: false,
            copied: None,
            #[cfg(test)]
            checkpoint_hook: None,
        }
    }

    /// Commits one control job on the calling thread, returning what to call with the outcome
    /// once the lock is let go; or gives the job back, for the writer thread to commit: when the
    /// store fsyncs every commit (an fsync must not block the caller's thread), when the WAL is
    /// due for a checkpoint (the writer thread checkpoints after committing it), and when another
    /// connection holds the write lock (no waiting here: the busy timeout is 0 for the attempt).
    /// Its statements are prepared once (`prepare_cached`), not parsed per commit.
    fn commit_now(
        &mut self,
        job: ControlJob,
    ) -> Result<(Finisher, Option<StoreError>), ControlJob> {
        if self.sync == Synchronous::Full || self.checkpoint_due() {
            return Err(job);
        }
        let conn = &self.conn;
        let began = conn
            .busy_timeout(Duration::ZERO)
            .and_then(|()| conn.prepare_cached("BEGIN IMMEDIATE")?.execute([]));
        if let Err(error) = conn.busy_timeout(BUSY_TIMEOUT) {
            tracing::error!(%error, "cannot restore the writer's busy timeout");
        }
        if began.is_err() {
            return Err(job); // busy: the writer thread waits for it instead
        }
        let finish = job(conn);
        let committed = conn
            .prepare_cached("COMMIT")
            .and_then(|mut c| c.execute([]));
        let error = match committed {
            Ok(_) => None,
            Err(error) => {
                tracing::error!(%error, "commit failed");
                if !conn.is_autocommit()
                    && let Err(error) = conn.execute_batch("ROLLBACK")
                {
                    tracing::error!(%error, "cannot roll back a failed commit");
                }
                Some(StoreError::from(error))
            }
        };
        self.note_wal();
        Ok((finish, error))
    }

    /// Takes note of the WAL's length after this thread's last commit through this connection.
    fn note_wal(&mut self) {
        let frames = WAL_FRAMES.replace(0);
        if frames > 0 {
            self.wal_frames = frames;
        }
    }

    /// Whether the WAL is long enough for a checkpoint that has not started yet.
    fn checkpoint_due(&self) -> bool {
        self.wal_frames >= self.checkpoint_pages && !self.checkpointing
    }

    /// Checkpoints the WAL once it is due, in two passes; the writer thread calls this after each
    /// commit, once the commit's waiters were answered:
    ///
    /// 1. The first copies the WAL into the database on the checkpoint thread
    ///    ([`Checkpointer`]), on a connection of its own and without the writer's lock: commits
    ///    go on meanwhile on every thread, the writer thread's included, appending to the WAL
    ///    (SQLite's checkpointer and writer locks are separate). This pass pays the fsyncs: of
    ///    the WAL, which commits under `synchronous=NORMAL` leave to the page cache (up to 64
    ///    MiB, synced with the writer's lock held before), and of the database. The checkpoint
    ///    thread runs at a lower priority (nice 10), so on a busy core the copy takes the time
    ///    that the server's other threads leave, rather than a share of theirs.
    /// 2. Once the copy is done, the checkpoint thread wakes the writer thread, which copies what
    ///    was committed during the first pass under the writer's lock, a few pages. With every
    ///    frame copied, the WAL starts over at the next commit; a checkpoint that never caught
    ///    up, as one alongside continuous commits never does, would leave it growing.
    ///
    /// Both passes are passive: readers and their snapshots are not waited for, so they may copy
    /// only part of the WAL; the next commit then finds it still long and the next checkpoint
    /// tries again, as SQLite's autocheckpoint does.
    fn checkpoint_if_due(
        writer: &Arc<Mutex<Self>>,
        checkpointer: &mut Option<Checkpointer>,
        wake: &CheckpointWake,
        path: &Path,
    ) {
        let mut this = lock_writer_mutex(writer);
        this.note_wal();
        if let Some(copy) = this.copied.take() {
            let locked = std::time::Instant::now();
            let last = passive_checkpoint(&this.conn);
            this.wal_frames = 0;
            this.checkpointing = false;
            #[cfg(test)]
            let hook = this.checkpoint_hook.clone();
            drop(this);
            match (copy.done, last) {
                (Some(Err(error)), _) | (_, Err(error)) => {
                    tracing::warn!(%error, "WAL checkpoint failed; it is tried again after the next commit")
                }
                (unlocked_done, Ok((log, done))) => tracing::debug!(
                    log,
                    unlocked_done = unlocked_done.and_then(Result::ok).map_or(0, |(_, c)| c),
                    done,
                    unlocked_ms = copy.took.as_secs_f64() * 1e3,
                    locked_ms = locked.elapsed().as_secs_f64() * 1e3,
                    "WAL checkpoint"
                ),
            }
            #[cfg(test)]
            if let Some(hook) = &hook {
                hook(CheckpointStep::Done);
            }
            return;
        }
        if !this.checkpoint_due() {
            return;
        }
        this.checkpointing = true;
        let sync = this.sync;
        drop(this);
        let started = match checkpointer {
            Some(c) => c.copy(),
            None => Checkpointer::start(writer.clone(), path.to_owned(), sync, wake.clone())
                .and_then(|c| {
                    let started = c.copy();
                    *checkpointer = Some(c);
                    started
                }),
        };
        if let Err(error) = started {
            // the pass under the lock copies it all then
            tracing::warn!(%error, "cannot start the checkpoint thread; the writer thread copies the WAL");
            let mut this = lock_writer_mutex(writer);
            this.copied = Some(CheckpointCopy {
                done: None,
                took: Duration::ZERO,
            });
            drop(this);
            Self::checkpoint_if_due(writer, checkpointer, wake, path);
        }
    }

    fn run(
        writer: Arc<Mutex<Self>>,
        path: &Path,
        queued: &AtomicUsize,
        (mut rx, wake): (mpsc::UnboundedReceiver<WriterJob>, CheckpointWake),
        max_points: usize,
        delay: std::time::Duration,
    ) {
        let lock = || lock_writer_mutex(&writer);
        let mut jobs: Vec<WriterJob> = Vec::new();
        // Jobs in the previous commit: more than one means several writers are active, and
        // waiting `delay` for them pays. A lone writer (one command at a time, a single device)
        // is committed at once instead of waiting for company that is not coming.
        let mut previous = 0usize;
        // the checkpoint thread, started at the first checkpoint
        let mut checkpointer: Option<Checkpointer> = None;
        while let Some(first) = rx.blocking_recv() {
            let mut points = job_points(&first);
            jobs.push(first);
            let mut waited = delay.is_zero() || previous <= 1;
            while points < max_points {
                match rx.try_recv() {
                    Ok(job) => {
                        points += job_points(&job);
                        jobs.push(job);
                    }
                    Err(mpsc::error::TryRecvError::Empty) if !waited => {
                        // group commit: give the other devices' batches a moment to join
                        std::thread::sleep(delay);
                        waited = true;
                    }
                    Err(_) => break,
                }
            }
            previous = jobs.len();
            let mut this = lock();
            // `jobs` keeps its capacity from commit to commit
            let mut appends: Vec<AppendBatch> = Vec::with_capacity(jobs.len());
            let mut controls: Vec<ControlJob> = Vec::new();
            for job in jobs.drain(..) {
                match job {
                    WriterJob::Append(b, _permit) => appends.push(b), // the permit frees queue room
                    WriterJob::Control(c) => controls.push(c),
                    WriterJob::Wake => {}
                }
            }
            let mut finishers = Vec::with_capacity(controls.len());
            let committed = if appends.is_empty() && controls.is_empty() {
                Ok(Vec::new()) // only a wake-up
            } else {
                this.commit(&appends, controls, &mut finishers)
            };
            this.note_wal();
            if committed.is_err() {
                // The cached watermarks may be ahead of what was rolled back, and the chunks
                // waiting for compaction may not exist.
                this.devices.clear();
                this.compaction = Compaction::default();
            }
            // Counted off under the lock: see `SqliteStore::commit_now`.
            queued.fetch_sub(previous, Ordering::AcqRel);
            drop(this);
            match committed {
                Ok(durable) => {
                    tracing::trace!(batches = appends.len(), points, "group commit");
                    for finish in finishers {
                        finish(None);
                    }
                    for (job, seq) in appends.iter().zip(durable) {
                        job.listener.durable(seq);
                    }
                }
                Err(error) => {
                    tracing::error!(%error, batches = appends.len(), "group commit failed; the devices will resend");
                    for finish in finishers {
                        finish(Some(&error));
                    }
                    for job in &appends {
                        job.listener.failed(job.batch.seq, &error);
                    }
                }
            }
            let mut this = lock();
            if this.last_fold.elapsed() >= this.fold_interval || this.waiting_points >= FOLD_POINTS
            {
                this.fold();
            }
            drop(this);
            Self::checkpoint_if_due(&writer, &mut checkpointer, &wake, path);
        }
        // a copy still running ends before the store is let go
        drop(checkpointer);
        lock().fold();
        tracing::debug!("store writer stopped");
    }

    /// Writes the bookkeeping of the devices with journal rows into `devices` and `last_values`
    /// and empties the journal. A failure is logged and the fold is tried again later: the
    /// journal keeps everything until a fold commits.
    fn fold(&mut self) {
        self.last_fold = std::time::Instant::now();
        if self.unfolded.is_empty() {
            return;
        }
        let (books, points) = {
            let mut overlay = lock_overlay(&self.overlay);
            let books: Vec<(i64, Bookkeeping)> = self
                .unfolded
                .iter()
                .filter_map(|d| overlay.devices.get(d).map(|b| (*d, b.clone())))
                .collect();
            overlay.folding = Arc::new(std::mem::take(&mut overlay.points));
            (books, overlay.folding.clone())
        };
        // The log's records are all in the overlay: this fold commits them, and marks its
        // generation folded so that a replay after a crash skips them.
        let log_generation = (!self.log.is_empty()).then(|| self.log.generation());
        // The fold is synced to disk before the log is emptied. With nothing in the log there is
        // nothing to empty: passing `Full` to `fully_synced` leaves the connection's level alone.
        let sync = if log_generation.is_some() {
            self.sync
        } else {
            Synchronous::Full
        };
        let compaction = &mut self.compaction;
        let overlay_lock = &self.overlay;
        let result = fully_synced(&mut self.conn, sync, |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // the waiting points become chunks: one per device and metric (a few if large)
            for (&dev, metrics) in points.iter() {
                for (&metric, rows) in metrics {
                    let mut rows: Vec<Row<&Value>> = rows.iter().map(Row::borrowed).collect();
                    rows.sort_by_key(Row::key);
                    for part in rows.chunks(chunk::MAX_POINTS) {
                        let id = insert_chunk(&tx, dev, metric, part)?;
                        compaction.stored(&tx, dev, metric, id, part.len())?;
                    }
                }
            }
            for (dev, b) in &books {
                store_device_books(&tx, *dev, b.last_seq, b.point_count)?;
                for (metric, v) in &b.last_values {
                    store_last_value(&tx, *dev, *metric, v.time_us, &v.value)?;
                }
            }
            tx.execute("DELETE FROM device_journal", [])?;
            if let Some(generation) = log_generation {
                mark_log_folded(&tx, generation)?;
            }
            // Readers find the folded points in the chunks from this commit on, and no longer
            // in the overlay: both change under the overlay lock (see `snapshot_device`).
            let mut overlay = lock_overlay(overlay_lock);
            tx.commit()?;
            overlay.folding = Arc::default();
            Ok(())
        });
        drop(points);
        if result.is_err() {
            // the points wait in the overlay for the next try
            let mut overlay = lock_overlay(&self.overlay);
            let folding = std::mem::take(&mut overlay.folding);
            let mut points = Arc::unwrap_or_clone(folding);
            for (dev, metrics) in std::mem::take(&mut overlay.points) {
                for (metric, rows) in metrics {
                    points
                        .entry(dev)
                        .or_default()
                        .entry(metric)
                        .or_default()
                        .extend(rows);
                }
            }
            overlay.points = points;
        }
        if result.is_ok()
            && let Some(generation) = log_generation
        {
            match self.log.reset(generation + 1) {
                Ok(()) => self.log_usable = true,
                Err(error) => {
                    // its records are marked folded, so a replay skips them; but an append
                    // after them would be skipped too: commits go to SQLite until a reset works
                    self.log_usable = false;
                    tracing::error!(%error, "cannot empty the telemetry log; small commits go to SQLite until it can be");
                }
            }
        }
        match result {
            Ok(()) => {
                tracing::debug!(
                    devices = books.len(),
                    points = self.waiting_points,
                    ms = self.last_fold.elapsed().as_secs_f64() * 1e3,
                    "folded the device journal"
                );
                self.unfolded.clear();
                self.waiting_points = 0;
            }
            Err(error) => {
                // the merges of the failed fold were rolled back with it
                self.compaction = Compaction::default();
                tracing::error!(%error, devices = books.len(), "cannot fold the device journal; trying again later");
            }
        }
    }

    /// Stores every batch above its device's watermark; returns, per job, the device's durable seq.
    ///
    /// A commit of small groups only (fewer than `TINY_POINTS` points of a device and metric),
    /// with no control writes, is one record appended to the telemetry log; any other goes to
    /// SQLite in one transaction.
    fn commit(
        &mut self,
        jobs: &[AppendBatch],
        controls: Vec<ControlJob>,
        finishers: &mut Vec<Finisher>,
    ) -> Result<Vec<u64>, StoreError> {
        // Row ids first: a device's is read, a new metric's is created (in its own statement:
        // an unused metric row is harmless if this commit fails).
        let mut device_ids = Vec::with_capacity(jobs.len());
        let mut metric_ids = Vec::with_capacity(jobs.iter().map(|j| j.batch.points.len()).sum());
        for job in jobs {
            device_ids.push(self.device_row(&job.device)?);
            for p in &job.batch.points {
                let metric = match self.metrics.get(&p.metric) {
                    Some(m) => *m,
                    None => {
                        let id: i64 = self
                            .conn
                            .prepare_cached(
                                "INSERT INTO metrics (name) VALUES (?1)
                                 ON CONFLICT(name) DO UPDATE SET name = excluded.name RETURNING id",
                            )?
                            .query_row([p.metric.as_str()], |r| r.get(0))?;
                        self.metrics.insert(p.metric.clone(), id);
                        id
                    }
                };
                metric_ids.push(metric);
            }
        }

        let mut durable = Vec::with_capacity(jobs.len());
        // (device, metric) → the latest point of this commit by device clock
        let mut last: FastMap<(i64, i64), (TimeUs, &Value, &MetricName)> = FastMap::default();
        // row id → (seq, points stored in all, id)
        let mut touched: FastMap<i64, (u64, u64, &DeviceId)> = FastMap::default();
        // Points by device and metric: each group becomes one chunk (or a few, if large).
        let mut groups: FastMap<(i64, i64), Vec<Row<&Value>>> = FastMap::default();
        let mut next_metric = 0; // the first point's in `metric_ids`
        for (job, &(dev, stored_seq, stored_count)) in jobs.iter().zip(&device_ids) {
            let metrics = &metric_ids[next_metric..next_metric + job.batch.points.len()];
            next_metric += metrics.len();
            let seq = job.batch.seq;
            let current = touched.get(&dev).map_or(stored_seq, |t| t.0);
            if seq <= current {
                durable.push(current); // a resend: stored already
                continue;
            }
            for ((idx, p), &metric) in job.batch.points.iter().enumerate().zip(metrics) {
                groups.entry((dev, metric)).or_default().push(Row {
                    time_us: p.time_us,
                    received_us: job.received_us,
                    seq,
                    idx: idx as u32,
                    value: &p.value,
                });
                let slot = last
                    .entry((dev, metric))
                    .or_insert((p.time_us, &p.value, &p.metric));
                if p.time_us >= slot.0 {
                    *slot = (p.time_us, &p.value, &p.metric);
                }
            }
            let t = touched
                .entry(dev)
                .or_insert((stored_seq, stored_count, &job.device));
            t.0 = seq;
            t.1 += job.batch.points.len() as u64;
            durable.push(seq);
        }
        for rows in groups.values_mut() {
            rows.sort_by_key(Row::key);
        }

        let small = groups.values().all(|rows| rows.len() < TINY_POINTS);
        if self.log_usable && controls.is_empty() && small {
            self.append_to_log(&touched, &groups)?;
        } else {
            self.commit_to_sqlite(&touched, &last, &groups, controls, finishers)?;
        }

        let mut overlay = lock_overlay(&self.overlay);
        for (&dev, &(seq, count, id)) in &touched {
            // cached by `device_row` above: updated in place, no key cloned
            if let Some(d) = self.devices.get_mut(id) {
                *d = (dev, seq, count);
            } else {
                self.devices.insert(id.clone(), (dev, seq, count));
            }
            let b = overlay.devices.entry(dev).or_default();
            b.last_seq = b.last_seq.max(seq);
            b.point_count = b.point_count.max(count);
            self.unfolded.insert(dev);
        }
        for ((dev, metric), rows) in groups {
            if rows.len() >= TINY_POINTS {
                continue; // stored as chunks
            }
            self.waiting_points += rows.len();
            overlay
                .points
                .entry(dev)
                .or_default()
                .entry(metric)
                .or_default()
                .extend(rows.iter().map(Row::owned));
        }
        for ((dev, metric), (time_us, value, name)) in last {
            let b = overlay.devices.entry(dev).or_default();
            match b.last_values.entry(metric) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let v = o.get_mut();
                    if time_us >= v.time_us {
                        v.time_us = time_us;
                        v.value = value.clone();
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(MetricValue {
                        metric: name.clone(),
                        time_us,
                        value: value.clone(),
                    });
                }
            }
        }
        Ok(durable)
    }

    /// A device's row id, highest stored seq and stored point count.
    fn device_row(&mut self, device: &DeviceId) -> Result<(i64, u64, u64), StoreError> {
        if let Some(d) = self.devices.get(device) {
            return Ok(*d);
        }
        let (rowid, seq, count): (i64, i64, i64) = self
            .conn
            .prepare_cached("SELECT id, last_seq, point_count FROM devices WHERE name = ?1")?
            .query_row([device.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
            .ok_or_else(|| StoreError::UnknownDevice(device.clone()))?;
        let (mut seq, mut count) = (seq as u64, count as u64);
        // the tables lag behind the journal and the log by up to one fold
        if let Some(b) = lock_overlay(&self.overlay).devices.get(&rowid) {
            seq = seq.max(b.last_seq);
            count = count.max(b.point_count);
        }
        let d = (rowid, seq, count);
        self.devices.insert(device.clone(), d);
        Ok(d)
    }

    /// Appends a commit of small groups to the telemetry log: one record.
    fn append_to_log(
        &mut self,
        touched: &FastMap<i64, (u64, u64, &DeviceId)>,
        groups: &FastMap<(i64, i64), Vec<Row<&Value>>>,
    ) -> Result<(), StoreError> {
        let mut record = tlog::RecordWriter::new(touched.len(), 64 * touched.len());
        for (&dev, &(seq, count, _)) in touched {
            record.device(dev, seq, count);
        }
        record.groups(groups.len());
        for (&(dev, metric), rows) in groups {
            record.group(dev, metric, rows);
        }
        match self.log.append(&record.finish()) {
            Ok(()) => Ok(()),
            Err(tlog::LogError::Failed(error)) => Err(error),
            Err(tlog::LogError::Broken(error)) => {
                tracing::error!(%error, "the telemetry log may end in a torn record; small commits go to SQLite until the next fold empties it");
                self.log_usable = false;
                Err(error)
            }
        }
    }

    /// Commits in SQLite: the control writes, the large groups as chunks, the small ones and the
    /// bookkeeping as journal rows.
    fn commit_to_sqlite(
        &mut self,
        touched: &FastMap<i64, (u64, u64, &DeviceId)>,
        last: &FastMap<(i64, i64), (TimeUs, &Value, &MetricName)>,
        groups: &FastMap<(i64, i64), Vec<Row<&Value>>>,
        controls: Vec<ControlJob>,
        finishers: &mut Vec<Finisher>,
    ) -> Result<(), StoreError> {
        // IMMEDIATE: take the write lock up front (waiting on the busy timeout). A deferred
        // transaction that reads first fails at once with SQLITE_BUSY when another connection
        // (a registry write) committed between its read and its first write.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Control writes (twins, commands, presence) first, in the order they were queued.
        for job in controls {
            finishers.push(job(&tx));
        }
        for (&(dev, metric), rows) in groups {
            if rows.len() < TINY_POINTS {
                continue; // waits in the journal for the next fold (a chunk now would be tiny)
            }
            for part in rows.chunks(chunk::MAX_POINTS) {
                let id = insert_chunk(&tx, dev, metric, part)?;
                self.compaction.stored(&tx, dev, metric, id, part.len())?;
            }
        }
        {
            // The bookkeeping goes to the journal: rows appended at its end, where updating
            // `devices` and `last_values` would rewrite a random page of each per device.
            let mut journal = tx.prepare_cached(
                "INSERT INTO device_journal (device, metric, last_seq, point_count, time_us, kind, value,
                                             lat, lon, alt, speed, heading, accuracy, points, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            for ((dev, metric), (time_us, value, _)) in last {
                let (seq, count, _) = touched[dev];
                let (kind, value, geo) = value_columns(value);
                let rows = groups
                    .get(&(*dev, *metric))
                    .filter(|rows| rows.len() < TINY_POINTS);
                let data = rows.map(|rows| chunk::encode(rows));
                journal.execute(params![
                    dev,
                    metric,
                    seq as i64,
                    count as i64,
                    time_us,
                    kind,
                    value,
                    geo[0],
                    geo[1],
                    geo[2],
                    geo[3],
                    geo[4],
                    geo[5],
                    rows.map_or(0, Vec::len) as i64,
                    data
                ])?;
            }
            let with_values: FastSet<i64> = last.keys().map(|(d, _)| *d).collect();
            for (dev, (seq, count, _)) in touched {
                if !with_values.contains(dev) {
                    // a batch without points still moves the device's seq
                    journal.execute(params![
                        dev,
                        None::<i64>,
                        *seq as i64,
                        *count as i64,
                        None::<i64>,
                        None::<i64>,
                        None::<i64>,
                        None::<f64>,
                        None::<f64>,
                        None::<f64>,
                        None::<f64>,
                        None::<f64>,
                        None::<f64>,
                        0i64,
                        None::<Vec<u8>>
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Chunks below this many points are tiny (a slow device's commit stores one point per chunk).
const TINY_POINTS: usize = 32;
/// Chunks below this many points are small; the small chunks of a device and metric are merged
/// once they hold this many points together.
const SMALL_POINTS: usize = 1_024;
/// This many tiny chunks in a row are merged into one (which bounds the chunks a slow device
/// leaves behind before its small chunks add up to `SMALL_POINTS`).
const MERGE_CHUNKS: usize = 128;

/// Merges the small chunks that devices sending a few points per commit leave behind.
///
/// Per device and metric the writer keeps the small chunks stored since the last large one, in the
/// order stored (for a device whose clock moves forward, also the order in time). Once they hold
/// `SMALL_POINTS` points together they become one chunk of `SMALL_POINTS` to `chunk::MAX_POINTS`
/// points; before that, a run of `MERGE_CHUNKS` tiny chunks in a row becomes one chunk. A device
/// sending 8 points or more per commit has each point rewritten once; a slow one, twice. Only runs
/// of consecutive chunks are merged, so merged chunks never interleave in time with chunks left
/// out (a reader would have to sort).
///
/// Which chunks are small is known only for chunks this writer stored: small chunks left by a
/// previous run stay as they are (readable, only slower to read).
#[derive(Debug, Default)]
struct Compaction {
    /// (device, metric) → its small chunks since its last large one, as (row id, points).
    small: FastMap<(i64, i64), Vec<(i64, usize)>>,
}

impl Compaction {
    /// Notes a chunk just stored; merges runs that are long enough.
    fn stored(
        &mut self,
        tx: &Connection,
        device: i64,
        metric: i64,
        id: i64,
        points: usize,
    ) -> Result<(), StoreError> {
        if points >= SMALL_POINTS {
            // the chunks before a large one stay as they are
            self.small.remove(&(device, metric));
            return Ok(());
        }
        let kept = self.small.entry((device, metric)).or_default();
        kept.push((id, points));
        let total: usize = kept.iter().map(|(_, p)| p).sum();
        if total >= SMALL_POINTS {
            let ids: Vec<i64> = kept.drain(..).map(|(id, _)| id).collect();
            kept.extend(merge(tx, device, metric, &ids)?);
        } else {
            let tiny = kept
                .iter()
                .rev()
                .take_while(|(_, p)| *p < TINY_POINTS)
                .count();
            if tiny >= MERGE_CHUNKS {
                let run = kept.split_off(kept.len() - tiny);
                let ids: Vec<i64> = run.iter().map(|(id, _)| *id).collect();
                kept.extend(merge(tx, device, metric, &ids)?);
            }
        }
        // only what follows the last large chunk is kept
        if let Some(last_large) = kept.iter().rposition(|(_, p)| *p >= SMALL_POINTS) {
            kept.drain(..=last_large);
        }
        if kept.is_empty() {
            self.small.remove(&(device, metric));
        }
        Ok(())
    }
}

/// Replaces chunks `ids` of one device and metric by as few chunks as hold their points;
/// returns the new chunks as (row id, points).
///
/// Chunks that follow one another in time and hold one kind of value are joined without
/// decoding their values ([`chunk::concat`]), the common case of a device sending in order;
/// others are decoded, sorted and encoded again.
fn merge(
    tx: &Connection,
    device: i64,
    metric: i64,
    ids: &[i64],
) -> Result<Vec<(i64, usize)>, StoreError> {
    let corrupt = |e: chunk::ChunkError| StoreError::Corrupt(e.to_string());
    let mut stored: Vec<(usize, Vec<u8>)> = Vec::with_capacity(ids.len());
    {
        let mut read = tx.prepare_cached(
            "SELECT points, data FROM telemetry_chunks WHERE id = ?1 AND device = ?2 AND metric = ?3",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM telemetry_chunks WHERE id = ?1")?;
        for id in ids {
            let found: Option<(i64, Vec<u8>)> = read
                .query_row(params![id, device, metric], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((points, data)) = found {
                stored.push((usize::try_from(points).unwrap_or(usize::MAX), data));
                delete.execute([id])?;
            }
        }
    }
    // Groups of whole chunks of at most MAX_POINTS points, joined as they are when they can be.
    let mut groups: Vec<Vec<&[u8]>> = Vec::new();
    let mut in_group = usize::MAX;
    for (points, data) in &stored {
        if in_group.saturating_add(*points) > chunk::MAX_POINTS {
            groups.push(Vec::new());
            in_group = 0;
        }
        in_group += points;
        groups.last_mut().expect("a group was started").push(data);
    }
    let mut joined = Vec::with_capacity(groups.len());
    for group in &groups {
        match chunk::concat(group).map_err(corrupt)? {
            Some(j) => joined.push(j),
            None => {
                joined.clear();
                break;
            }
        }
    }
    let mut out = Vec::new();
    if joined.len() == groups.len() {
        for j in joined {
            let span = (j.start_us, j.end_us);
            let id = insert_encoded(tx, device, metric, span, j.points, &j.data)?;
            out.push((id, j.points));
        }
    } else {
        let mut columns = Columns::default();
        for (_, data) in &stored {
            chunk::decode_into(data, &mut columns, true).map_err(corrupt)?;
        }
        out = insert_columns(tx, device, metric, columns)?;
    }
    let points: usize = out.iter().map(|(_, p)| p).sum();
    tracing::trace!(
        device,
        metric,
        chunks = ids.len(),
        points,
        "merged telemetry chunks"
    );
    Ok(out)
}

/// One command's new state (`Store::update_command`).
fn write_command_update(conn: &Connection, u: &CommandUpdate) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE commands SET state = ?2, attempts = ?3, result = ?4, error = ?5, history = ?6
             WHERE id = ?1",
        )?
        .execute(params![
            u.id as i64,
            u.state.name(),
            u.attempts,
            u.result_json,
            u.error,
            history_json(&u.history)
        ])?;
    if changed == 0 {
        return Err(StoreError::UnknownCommand(u.id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: i64, first: TimeUs, last: TimeUs, points: u64) -> ChunkSpan {
        ChunkSpan {
            id,
            first,
            last,
            points,
        }
    }

    #[test]
    fn the_heaviest_disjoint_chunks_are_read_in_order() {
        // a fold's chunk of late points spans three large chunks: they are kept, it goes aside
        let chunks = [
            span(1, 0, 99, 100),
            span(9, 5, 290, 12),
            span(2, 100, 199, 100),
            span(3, 200, 299, 100),
        ];
        assert_eq!(heaviest_disjoint(&chunks), [true, false, true, true]);
        // a wide chunk with more points than the ones it overlaps wins
        let chunks = [
            span(1, 0, 50, 10),
            span(2, 0, 299, 500),
            span(3, 60, 99, 10),
            span(4, 300, 310, 1),
        ];
        assert_eq!(heaviest_disjoint(&chunks), [false, true, false, true]);
        // touching is overlapping (a point at the same time in both)
        let chunks = [span(1, 0, 10, 5), span(2, 10, 20, 4)];
        assert_eq!(heaviest_disjoint(&chunks), [true, false]);
        assert!(heaviest_disjoint(&[]).is_empty());
    }

    /// A directory for a database, its path, and a runtime to run a store on.
    fn scratch() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::runtime::Runtime,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetlink.db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (dir, path, rt)
    }

    /// History queries read through a mapping of the file; the writer does not map it.
    #[test]
    fn reader_connections_map_the_database_file_and_the_writer_does_not() {
        let (_dir, path, rt) = scratch();
        let mapped = rt.block_on(async {
            let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
            let mmap_size = |c: &Connection| {
                c.query_row("PRAGMA mmap_size", [], |r| r.get::<_, i64>(0))
                    .map_err(StoreError::from)
            };
            let reader = store.read(mmap_size).await.unwrap();
            let writer = store.control(mmap_size).await.unwrap();
            (reader, writer)
        });
        assert_eq!(mapped, (READER_MMAP_BYTES, 0));
    }

    /// A provisioned device in a new store, and the store.
    async fn store_with_device(path: &Path) -> (SqliteStore, DeviceId) {
        let store = SqliteStore::open(path, SqliteOptions::default()).unwrap();
        let device = DeviceId::new("crane-1").unwrap();
        store
            .provision_device(crate::NewDevice {
                id: device.clone(),
                token_hash: fleetlink_core::credentials::Token::from_random_bytes([7; 32]).hash(),
                tags: BTreeMap::new(),
                attributes: serde_json::Map::new(),
                created_us: 1,
            })
            .await
            .unwrap();
        (store, device)
    }

    /// An urgent write that inserts a row, answered with the name of the thread that committed
    /// it and the WAL's length then.
    async fn urgent_insert(store: &SqliteStore, n: usize) -> (Option<String>, i32) {
        let (tx, rx) = oneshot::channel();
        let inner = store.inner.clone();
        store.urgent_control_then(
            move |c| {
                c.execute("INSERT INTO scratch (n) VALUES (?1)", [n as i64])?;
                Ok(())
            },
            move |done: Result<(), StoreError>| {
                done.unwrap();
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
            },
        );
        let thread = rx.await.unwrap();
        let frames = lock_writer(&inner).wal_frames;
        (thread, frames)
    }

    fn lock_writer(inner: &Inner) -> std::sync::MutexGuard<'_, Writer> {
        lock_writer_mutex(&inner.writer)
    }

    /// A command's insert on an idle store is committed on the calling thread: its future is
    /// ready as soon as it is returned, and so are the urgent writes after it. The writer
    /// connection's busy timeout, which a commit on the calling thread turns off for itself, is
    /// as it was afterwards.
    #[test]
    fn urgent_writes_on_an_idle_store_commit_on_the_calling_thread() {
        let (_dir, path, rt) = scratch();
        rt.block_on(async {
            let (store, device) = store_with_device(&path).await;
            let mut insert = store.insert_command(crate::NewCommand {
                device: device.clone(),
                name: "lift".into(),
                args_json: "{}".into(),
                idempotency_key: None,
                concurrent: true,
                created_us: 2,
                deadline_us: i64::MAX,
            });
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match std::future::Future::poll(insert.as_mut(), &mut cx) {
                std::task::Poll::Ready(inserted) => assert!(inserted.unwrap().1),
                std::task::Poll::Pending => panic!("the insert was not committed at once"),
            }
            store
                .control(|c| Ok(c.execute_batch("CREATE TABLE scratch (n INTEGER)")?))
                .await
                .unwrap();
            let here = std::thread::current().name().map(str::to_owned);
            for n in 0..100 {
                assert_eq!(urgent_insert(&store, n).await.0, here, "write {n}");
            }
            let busy = store
                .control(|c| Ok(c.query_row("PRAGMA busy_timeout", [], |r| r.get::<_, i64>(0))?))
                .await
                .unwrap();
            assert_eq!(busy, 10_000);
        });
    }

    /// Commits on the calling thread never checkpoint: once the WAL is long enough, the next
    /// urgent write goes to the writer thread, which commits it and has the checkpoint thread
    /// copy the WAL, at a lower priority. While it copies (held there by the test), urgent writes
    /// are still committed on the calling thread, and writes queued for the writer thread on
    /// that thread: neither waits for the copy. Once it is done the WAL starts over.
    #[test]
    fn the_writer_thread_checkpoints_a_long_wal_without_holding_the_writer() {
        let (_dir, path, rt) = scratch();
        rt.block_on(async {
            let (store, _) = store_with_device(&path).await;
            store
                .control(|c| Ok(c.execute_batch("CREATE TABLE scratch (n INTEGER)")?))
                .await
                .unwrap();
            let (steps_tx, steps) = std::sync::mpsc::channel::<CheckpointStep>();
            let (go, go_rx) = std::sync::mpsc::channel::<()>();
            let go_rx = Mutex::new(go_rx);
            // the thread that copies, and its nice value
            let copier = Arc::new(Mutex::new(None));
            {
                let copier = copier.clone();
                let mut writer = lock_writer(&store.inner);
                writer.checkpoint_pages = 8;
                writer.checkpoint_hook = Some(Arc::new(move |step| {
                    if step == CheckpointStep::Copy {
                        let thread = std::thread::current().name().map(str::to_owned);
                        let nice = rustix::process::getpriority_process(None).unwrap();
                        *copier.lock().unwrap() = Some((thread, nice));
                    }
                    let _ = steps_tx.send(step);
                    if step == CheckpointStep::Copy {
                        // held until the test lets it go (or gives up: the sender is dropped)
                        let _ = go_rx.lock().unwrap().recv();
                    }
                }));
            }
            let next_step = || steps.recv_timeout(Duration::from_secs(10)).unwrap();
            let here = std::thread::current().name().map(str::to_owned);
            let writer = Some("fleetlink-store-writer".to_owned());
            // on this thread, the WAL growing commit after commit, until it is due: that write
            // goes to the writer thread (the tables made at open may have left it due already)
            let mut writes = Vec::new();
            let due = loop {
                let write = urgent_insert(&store, writes.len()).await;
                if write.0 == writer {
                    break write.1;
                }
                assert_eq!(write.0, here, "{writes:?}");
                writes.push(write);
                assert!(writes.len() < 100, "the WAL never came due: {writes:?}");
            };
            assert!(due >= 8, "{due} {writes:?}");
            assert!(writes.windows(2).all(|w| w[1].1 > w[0].1), "{writes:?}");
            assert_eq!(next_step(), CheckpointStep::Copy);
            // the checkpoint is copying: urgent writes go on here, the WAL still growing
            let mut during = Vec::new();
            for n in 0..10 {
                let write = urgent_insert(&store, 1000 + n);
                let write = tokio::time::timeout(Duration::from_secs(10), write).await;
                during.push(write.expect("an urgent write waited for the checkpoint"));
            }
            assert!(during.iter().all(|w| w.0 == here), "{during:?}");
            assert!(during[9].1 > due, "{due} {during:?}");
            // and so does the writer thread with what is queued for it
            let queued = store.control(|c| {
                c.execute("INSERT INTO scratch (n) VALUES (3000)", [])?;
                Ok(std::thread::current().name().map(str::to_owned))
            });
            let queued = tokio::time::timeout(Duration::from_secs(10), queued)
                .await
                .expect("a write queued for the writer thread waited for the checkpoint's copy")
                .unwrap();
            assert_eq!(queued, writer);
            assert_eq!(
                *copier.lock().unwrap(),
                Some((
                    Some("fleetlink-store-checkpoint".to_owned()),
                    CHECKPOINT_NICE
                ))
            );
            go.send(()).unwrap();
            assert_eq!(next_step(), CheckpointStep::Done);
            // every frame was copied: the WAL starts over, and the writes stay here
            let after = urgent_insert(&store, 2000).await;
            assert_eq!(after.0, here);
            assert!(after.1 < 8, "the WAL did not start over: {after:?}");
        });
    }

    /// A table of chunks, each given as (seq, [(time, value)]) in time order.
    fn chunks_table(chunks: &[(u64, Vec<(TimeUs, Value)>)]) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE telemetry_chunks (id INTEGER PRIMARY KEY, device INTEGER NOT NULL,
             metric INTEGER NOT NULL, start_us INTEGER NOT NULL, end_us INTEGER NOT NULL,
             points INTEGER NOT NULL, data BLOB NOT NULL) STRICT;",
        )
        .unwrap();
        for (seq, points) in chunks {
            let rows: Vec<Row<Value>> = points
                .iter()
                .enumerate()
                .map(|(i, (t, v))| Row {
                    time_us: *t,
                    received_us: 0,
                    seq: *seq,
                    idx: i as u32,
                    value: v.clone(),
                })
                .collect();
            conn.execute(
                "INSERT INTO telemetry_chunks (device, metric, start_us, end_us, points, data)
                 VALUES (1, 1, ?1, ?2, ?3, ?4)",
                params![
                    rows[0].time_us,
                    rows[rows.len() - 1].time_us,
                    rows.len() as i64,
                    chunk::encode(&rows)
                ],
            )
            .unwrap();
        }
        conn
    }

    fn doubles(times: impl IntoIterator<Item = TimeUs>) -> Vec<(TimeUs, Value)> {
        times
            .into_iter()
            .map(|t| (t, Value::Double(t as f64)))
            .collect()
    }

    #[test]
    fn overlapping_chunks_read_in_time_order_without_the_arrival_columns() {
        // two large chunks, and a fold's chunk of late points spanning both
        let conn = chunks_table(&[
            (1, doubles((0..50).map(|i| i * 2))),
            (3, doubles([7, 99, 151])),
            (2, doubles((50..100).map(|i| i * 2))),
        ]);
        let out = points_in_time_order(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX)
            .unwrap()
            .expect("no two points share a time");
        let mut want: Vec<TimeUs> = (0..100).map(|i| i * 2).chain([7, 99, 151]).collect();
        want.sort_unstable();
        assert_eq!(out.time_us, want);
        let values: Vec<f64> = (0..out.len())
            .map(|i| out.values.number(i).unwrap())
            .collect();
        assert_eq!(values, want.iter().map(|&t| t as f64).collect::<Vec<_>>());
        assert!(out.seq.is_empty(), "arrival columns were decoded");
        // a range cuts both kinds of chunk; the late chunk keeps only its middle point
        let out = points_in_time_order(&conn, 1, 1, 90, 120).unwrap().unwrap();
        let want: Vec<TimeUs> = (90..120).filter(|t| t % 2 == 0 || *t == 99).collect();
        assert_eq!(out.time_us, want);
        // through the public path, with and without a limit, the same points in the same order
        let all = metric_points(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX, None, false, &[]).unwrap();
        let limited = metric_points(
            &conn,
            1,
            1,
            TimeUs::MIN,
            TimeUs::MAX,
            Some(1_000),
            false,
            &[],
        )
        .unwrap();
        assert_eq!(all.time_us, limited.time_us);
        assert_eq!(all.values, limited.values);
    }

    #[test]
    fn a_shared_time_or_another_kind_of_value_leaves_the_order_to_the_arrival_columns() {
        // a late point at the time of a point in order: which comes first is the arrival order
        let conn = chunks_table(&[(1, doubles([0, 2, 4, 6])), (2, doubles([1, 4]))]);
        assert_eq!(
            points_in_time_order(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX).unwrap(),
            None
        );
        let out = metric_points(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX, None, false, &[]).unwrap();
        assert_eq!(out.time_us, [0, 1, 2, 4, 4, 6]);
        assert_eq!(out.seq, [1, 2, 1, 1, 2, 1]);
        // ints among doubles
        let conn = chunks_table(&[(1, doubles([0, 2, 4, 6])), (2, vec![(3, Value::Int(3))])]);
        assert_eq!(
            points_in_time_order(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX).unwrap(),
            None
        );
        let out = metric_points(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX, None, false, &[]).unwrap();
        assert_eq!(out.time_us, [0, 2, 3, 4, 6]);
        assert_eq!(out.values.get(2), Value::Int(3));
        // equal times inside one chunk are stored in order already: no fallback for them
        let conn = chunks_table(&[(1, doubles([0, 2, 2, 6])), (2, doubles([1]))]);
        let out = points_in_time_order(&conn, 1, 1, TimeUs::MIN, TimeUs::MAX)
            .unwrap()
            .expect("the tie is inside a chunk read in order");
        assert_eq!(out.time_us, [0, 1, 2, 2, 6]);
    }

    fn columns(points: &[(TimeUs, f64)]) -> Columns {
        Columns {
            time_us: points.iter().map(|p| p.0).collect(),
            values: chunk::ValueColumn::Double(points.iter().map(|p| p.1).collect()),
            ..Columns::default()
        }
    }

    #[test]
    fn points_set_aside_merge_in_by_time_unless_two_share_a_time() {
        let main = columns(&[(10, 1.0), (20, 2.0), (30, 3.0)]);
        let aside = columns(&[(35, 3.5), (5, 0.5), (15, 1.5)]);
        let merged = main.clone().merge_by_time(aside).unwrap();
        assert_eq!(
            merged,
            columns(&[
                (5, 0.5),
                (10, 1.0),
                (15, 1.5),
                (20, 2.0),
                (30, 3.0),
                (35, 3.5)
            ])
        );
        assert_eq!(
            Columns::default().merge_by_time(columns(&[(2, 2.0), (1, 1.0)])),
            Some(columns(&[(1, 1.0), (2, 2.0)]))
        );
        // a tie with a point in order, or among those aside: the arrival order decides
        assert_eq!(main.clone().merge_by_time(columns(&[(20, 9.0)])), None);
        assert_eq!(
            main.clone().merge_by_time(columns(&[(25, 9.0), (25, 8.0)])),
            None
        );
        // held differently: not merged here
        let ints = Columns {
            time_us: vec![25],
            values: chunk::ValueColumn::Int(vec![7]),
            ..Columns::default()
        };
        assert_eq!(main.merge_by_time(ints), None);
    }
}
