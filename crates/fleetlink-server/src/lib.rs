//! The fleetlink server as a library: a QUIC endpoint (quinn + rustls/ring), a session task per
//! connection on the tokio pool, and one [`actix`] actor per device spread over one arbiter per
//! core. The CLI, the tests and (later) the Python bindings embed it through [`Server::start`].

mod actor;
mod admission;
mod bridge;
mod command;
mod config;
mod direct;
mod facts;
mod fleet;
mod jobs;
mod operator;
mod outq;
mod registry;
mod session;
mod streams;
mod tls;
mod tls_sessions;
mod twin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fleetlink_core::TimeUs;
use fleetlink_store::{SqliteOptions, SqliteStore, Store, Synchronous};
use tokio::sync::{oneshot, watch};

pub use config::{CommandsConfig, PolicyConfig, PolicyRuleConfig, ServerConfig};
pub use tls_sessions::SESSIONS_FILE;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The certificate or key could not be loaded or created.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The data directory or database could not be opened.
    #[error("storage: {0}")]
    Store(#[from] fleetlink_store::StoreError),
    /// The socket could not be bound, or another IO failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The server thread stopped unexpectedly.
    #[error("the server thread stopped: {0}")]
    Thread(String),
}

/// The QUIC application error code for an [`ErrorCode`](fleetlink_proto::v1::ErrorCode).
pub(crate) fn close_code(code: fleetlink_proto::v1::ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code as u32)
}

/// How long the server waits for the FIN of a stream whose one frame it has read (a request, a
/// command's result) before it stops the stream.
const FIN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Lets go of the reading side of a stream whose one frame was read. The peer's FIN usually came
/// with that frame, and the stream then ends quietly; dropping it unread would send a
/// STOP_SENDING, a packet of its own (and the peer's ACK of it). A FIN may also trail its frame
/// in a packet of its own (a client that wrote the frame and finished the stream in two calls):
/// a task then waits for it, up to [`FIN_WAIT`], and stops the stream only if it does not come
/// (or more data does).
pub(crate) fn let_go(mut reader: fleetlink_transport::FrameReader) {
    if reader.finished() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(FIN_WAIT, reader.stream_mut().read_chunk(1, true)).await;
    });
}

/// Microseconds since the Unix epoch, from the system clock.
pub fn now_us() -> TimeUs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as TimeUs)
        .unwrap_or(0)
}

/// A running server. Dropping it shuts the server down.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    ca_cert: Option<PathBuf>,
    admin_token: Option<String>,
    data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Started {
    local_addr: SocketAddr,
    ca_cert: Option<PathBuf>,
    admin_token: Option<String>,
}

impl Server {
    /// Starts a server on its own threads and returns once it listens.
    pub fn start(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let io = |context: String| move |source| ServerError::Io { context, source };
        std::fs::create_dir_all(&config.data_dir).map_err(io(format!(
            "cannot create the data dir {}",
            config.data_dir.display()
        )))?;
        let data_dir = config.data_dir.clone();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<Started, ServerError>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fleetlink-server".into())
            .spawn(move || run(config, started_tx, stop_rx))
            .map_err(io("cannot start the server thread".into()))?;
        let started = match started_rx.recv() {
            Ok(r) => r?,
            Err(_) => {
                let _ = thread.join();
                return Err(ServerError::Thread("it stopped during start-up".into()));
            }
        };
        Ok(Server {
            local_addr: started.local_addr,
            ca_cert: started.ca_cert,
            admin_token: started.admin_token,
            data_dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The UDP address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The development CA clients must trust, if the server made its own certificate.
    pub fn ca_cert_path(&self) -> Option<&std::path::Path> {
        self.ca_cert.as_deref()
    }

    /// The admin token, if this start created it (the first start on a data dir).
    pub fn created_admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The file the first start wrote the admin token to.
    pub fn admin_token_file(&self) -> PathBuf {
        self.data_dir.join(ADMIN_TOKEN_FILE)
    }

    /// Stops accepting, closes every connection and waits for the server's threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Name of the file, in the data dir, that holds the admin token created on first start.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Name of the file, in the data dir, that holds the QUIC stateless-reset key (hex), created on
/// first start and kept, so that a restarted server resets the previous one's connections.
pub const RESET_KEY_FILE: &str = "quic-reset.key";

/// The stateless-reset key of `data_dir`, created (random, mode 0600) if there is none.
fn reset_key(
    data_dir: &std::path::Path,
) -> Result<[u8; fleetlink_transport::RESET_KEY_BYTES], ServerError> {
    use rand::RngCore as _;
    let path = data_dir.join(RESET_KEY_FILE);
    let io = |context: String| move |source| ServerError::Io { context, source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut key = [0u8; fleetlink_transport::RESET_KEY_BYTES];
            let text = text.trim();
            let valid = text.len() == key.len() * 2
                && key.iter_mut().enumerate().all(|(i, b)| {
                    text.get(2 * i..2 * i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .map(|v| *b = v)
                        .is_some()
                });
            if valid {
                Ok(key)
            } else {
                Err(ServerError::Config(format!(
                    "{}: expected {} hex digits (delete the file to make a new key)",
                    path.display(),
                    key.len() * 2
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; fleetlink_transport::RESET_KEY_BYTES];
            rand::rng().fill_bytes(&mut key);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            write_secret(&path, &format!("{hex}\n"))
                .map_err(io(format!("cannot write {}", path.display())))?;
            Ok(key)
        }
        Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
    }
}

fn run(
    config: ServerConfig,
    started: std::sync::mpsc::Sender<Result<Started, ServerError>>,
    stop: oneshot::Receiver<()>,
) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let io_threads = if config.io_threads == 0 {
        cores
    } else {
        config.io_threads
    };
    let single = config.runs_single_thread(cores);
    let system = actix::System::with_tokio_rt(move || {
        let mut builder = if single {
            // driven by this thread (the actix system's), which also runs every actor
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(io_threads);
            b
        };
        builder
            .thread_name("fleetlink-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build the tokio runtime: {e}"))
    });
    let sync = if config.synchronous == "full" {
        Synchronous::Full
    } else {
        Synchronous::Normal
    };
    let store = match SqliteStore::open(
        config.data_dir.join("fleetlink.db"),
        SqliteOptions {
            synchronous: sync,
            commit_delay: Duration::from_micros(config.group_commit_us),
            fold_interval: Duration::from_millis(config.fold_interval_ms),
            ..Default::default()
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            let _ = started.send(Err(e.into()));
            return;
        }
    };
    let writer = store.writer_handle();
    let arbiters = system.block_on(async move {
        match setup(config, cores, single, store).await {
            Err(e) => {
                let _ = started.send(Err(e));
                Vec::new()
            }
            Ok((endpoint, shared, arbiters, info, shutdown_tx)) => {
                let _ = started.send(Ok(info));
                serve(endpoint, shared, stop, shutdown_tx).await;
                for arbiter in &arbiters {
                    arbiter.stop();
                }
                arbiters
            }
        }
    });
    // The actors (and their store handles) go with their arbiters, the sessions with the runtime;
    // then the writer commits what is still queued and stops. Only then has the server stopped:
    // nothing of it writes to the data dir after `Server::shutdown` returns.
    for arbiter in arbiters {
        let _ = arbiter.join();
    }
    drop(system);
    if !writer.join(Duration::from_secs(30)) {
        tracing::error!("the store writer did not stop within 30 s of shutdown");
    }
}

type Setup = (
    quinn::Endpoint,
    Arc<session::Shared>,
    Vec<actix::Arbiter>,
    Started,
    watch::Sender<bool>,
);

/// `single`: IO, sessions and actors on this thread (decided once, in `run`, which built the
/// runtime for it).
async fn setup(
    config: ServerConfig,
    cores: usize,
    single: bool,
    store: SqliteStore,
) -> Result<Setup, ServerError> {
    let store: Arc<dyn Store> = Arc::new(store);

    let admin_token = if store.has_admin_token().await? {
        None
    } else {
        let token = operator::new_token();
        store.add_admin_token(token.hash(), now_us()).await?;
        let path = config.data_dir.join(ADMIN_TOKEN_FILE);
        write_secret(&path, &format!("{}\n", token.as_str())).map_err(|source| {
            ServerError::Io {
                context: format!("cannot write {}", path.display()),
                source,
            }
        })?;
        tracing::info!(file = %path.display(), "created the admin token");
        Some(token.as_str().to_owned())
    };

    let material = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => tls::load(cert, key)?,
        _ => tls::dev_certificate(&config.data_dir.join("tls"))?,
    };
    if let Some(ca) = &material.dev_ca {
        tracing::info!(ca = %ca.display(), "using a development certificate; clients must trust this CA file");
    }
    let idle = config.heartbeat_timeout() * 2;
    let tls_sessions = Arc::new(tls_sessions::SessionStore::open(
        &config.data_dir,
        config.tls_sessions,
    ));
    let server_config = tls::quinn_server_config(
        &material,
        tls_sessions.clone(),
        idle,
        Duration::from_millis(config.ack_delay_ms.into()),
    )?;
    let reset_key = reset_key(&config.data_dir)?;
    let endpoint = fleetlink_transport::server_endpoint_with_reset_key(
        server_config,
        config.listen,
        &reset_key,
    )
    .map_err(|source| ServerError::Io {
        context: format!("cannot listen on {}", config.listen),
        source,
    })?;
    let local_addr = endpoint.local_addr().map_err(|source| ServerError::Io {
        context: "cannot read the bound address".into(),
        source,
    })?;

    let n_arbiters = if config.arbiters == 0 {
        cores
    } else {
        config.arbiters
    };
    // Arbiters of their own, or (single thread) the system's, which runs on this thread with
    // the IO runtime.
    let (arbiters, handles): (Vec<actix::Arbiter>, _) = if single {
        (Vec::new(), vec![actix::Arbiter::current()])
    } else {
        let own: Vec<actix::Arbiter> = (0..n_arbiters).map(|_| actix::Arbiter::new()).collect();
        let handles = own.iter().map(actix::Arbiter::handle).collect();
        (own, handles)
    };
    let fleet = fleet::Fleet::new(config.event_buffer);
    fleet.bridge.set_policy(config.policy.build()?);
    fleet.bridge.load_retained(store.retained().await?);
    for group in store.groups().await? {
        match &group.query {
            Some(q) => match fleetlink_core::query::Query::parse(q) {
                Ok(q) => fleet.groups.set_dynamic(&group.name, q),
                Err(e) => {
                    tracing::error!(group = %group.name, error = %e, "stored group query does not parse; the group is empty")
                }
            },
            None => fleet
                .groups
                .set_static(&group.name, group.members.into_iter().collect()),
        }
    }
    let settings = actor::ActorSettings {
        fleet: fleet.clone(),
        heartbeat_timeout: config.heartbeat_timeout(),
        outbox_limits: config.outbox_limits(),
        delivery_write_delay: Duration::from_millis(config.commands.delivery_write_delay_ms),
        max_frame_bytes: config.max_frame_bytes,
        io: tokio::runtime::Handle::current(),
        durable_wakeups: actor::DurableWakeups::start(),
    };
    let registry = registry::DeviceRegistry::new(handles, store.clone(), settings);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (all_started_tx, all_started) = watch::channel(false);
    let shared = Arc::new(session::Shared {
        config,
        store,
        registry,
        fleet,
        next_session: AtomicU64::new(1),
        shutting_down: shutdown_rx,
        tls_sessions,
        all_started,
        all_started_tx,
        sessions: session::LiveSessions::default(),
    });
    if single {
        tracing::info!(%local_addr, "fleetlink server listening (IO and actors on one thread)");
    } else {
        tracing::info!(%local_addr, arbiters = n_arbiters, "fleetlink server listening");
    }
    Ok((
        endpoint,
        shared,
        arbiters,
        Started {
            local_addr,
            ca_cert: material.dev_ca,
            admin_token,
        },
        shutdown_tx,
    ))
}

async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<session::Shared>,
    mut stop: oneshot::Receiver<()>,
    shutdown: watch::Sender<bool>,
) {
    // Every device gets its actor now: queries run on the actors' live state, and command
    // deadlines pass even for devices that never come back.
    let waking = shared.clone();
    tokio::spawn(async move {
        match waking.registry.start_all().await {
            Ok(n) => tracing::info!(devices = n, "device actors started"),
            Err(error) => tracing::error!(%error, "cannot start every device actor"),
        }
        waking.all_started_tx.send_replace(true);
        jobs::resume_all(waking).await;
    });
    let c = &shared.config;
    let mut admission = admission::Admission::new(
        c.max_handshakes,
        c.handshake_queue,
        Duration::from_millis(u64::from(c.handshake_queue_ms)),
    );
    loop {
        let slots = admission.slots();
        let expiry = admission.deadline();
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    if let Some((incoming, permit)) = admission.arrive(incoming, std::time::Instant::now()) {
                        tokio::spawn(session::serve_connection(incoming, permit, shared.clone()));
                    }
                }
                None => break,
            },
            Ok(permit) = slots.acquire_owned(), if admission.waiting() => {
                if let Some(incoming) = admission.next(std::time::Instant::now()) {
                    tokio::spawn(session::serve_connection(incoming, permit, shared.clone()));
                }
            }
            _ = tokio::time::sleep_until(expiry.unwrap_or_else(std::time::Instant::now).into()), if expiry.is_some() => {
                admission.expire(std::time::Instant::now());
            }
            _ = &mut stop => break,
        }
    }
    // New connection attempts go unanswered from now on rather than refused: their clients keep
    // retransmitting, a server restarted on the same port answers them, and they keep the
    // session tickets that a refused attempt would have used up (rustls uses each ticket once).
    endpoint.set_server_config(None);
    admission.ignore_all();
    tracing::info!("shutting down");
    let _ = shutdown.send(true);
    let t = std::time::Instant::now();
    for actor in shared.registry.all() {
        let _ = actor.send(actor::Shutdown).await;
    }
    // The kicked sessions send what they hold (a held telemetry ack) and their error frame, and
    // end once their device has read it or closed; the endpoint then closes what is left.
    let drained = tokio::time::timeout(SHUTDOWN_SESSIONS_WAIT, shared.sessions.all_ended())
        .await
        .is_ok();
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        drained,
        "device actors stopped and their sessions ended; closing the endpoint"
    );
    endpoint.close(
        close_code(fleetlink_proto::v1::ErrorCode::ShuttingDown),
        b"server shutting down",
    );
    // Long enough to send every close; not the 3 × PTO that QUIC's closing state would last
    // (with `ack_delay_ms` that is over 4 s): a client that missed its close learns of it from
    // the next server's stateless reset (`RESET_KEY_FILE`), or from its idle timeout if none
    // comes.
    let _ = tokio::time::timeout(SHUTDOWN_CLOSE_WAIT, endpoint.wait_idle()).await;
    tracing::debug!(
        ms = t.elapsed().as_millis() as u64,
        "endpoint idle (every connection closed)"
    );
    // No handshake runs any more: the devices' sessions go to the next start.
    match shared.tls_sessions.save() {
        Ok(n) => tracing::info!(sessions = n, "TLS sessions saved for the next start"),
        Err(error) => {
            tracing::warn!(%error, "cannot save the TLS sessions; devices do full handshakes after the restart")
        }
    }
}

/// How long a graceful shutdown waits for the device sessions it kicked to end (each waits up to
/// 500 ms for its device to have its error frame).
const SHUTDOWN_SESSIONS_WAIT: Duration = Duration::from_secs(1);

/// How long a graceful shutdown waits for its connections to close.
const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Writes a file only its owner can read (tokens, private keys).
pub(crate) fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_key_is_created_once_kept_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = reset_key(dir.path()).unwrap();
        assert_ne!(first, [0; fleetlink_transport::RESET_KEY_BYTES]);
        assert_eq!(
            reset_key(dir.path()).unwrap(),
            first,
            "the same key on restart"
        );
        let path = dir.path().join(RESET_KEY_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            reset_key(other.path()).unwrap(),
            first,
            "a new key per data dir"
        );
    }

    #[test]
    fn a_damaged_reset_key_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESET_KEY_FILE);
        for bad in ["", "00ff", &"zz".repeat(32), &"0".repeat(66)] {
            std::fs::write(&path, bad).unwrap();
            let err = reset_key(dir.path()).unwrap_err().to_string();
            assert!(err.contains("expected 64 hex digits"), "{bad:?}: {err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
        }
    }
}
