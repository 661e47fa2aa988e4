//! Server configuration, from a TOML file or built in code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ServerError;

/// Everything the server can be told. Every field has a default; a TOML file sets any subset.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory for the database, the development CA and the admin token.
    pub data_dir: PathBuf,
    /// TLS certificate chain (PEM). Unset: a development CA and certificate are created in `data_dir/tls`.
    pub cert: Option<PathBuf>,
    /// TLS private key (PEM), with `cert`.
    pub key: Option<PathBuf>,
    /// Devices send a heartbeat at least this often (milliseconds), announced in the Welcome.
    pub heartbeat_interval_ms: u32,
    /// A device that sends nothing for this long (milliseconds) goes offline and is disconnected.
    pub heartbeat_timeout_ms: u32,
    /// Largest frame accepted, in bytes.
    pub max_frame_bytes: u32,
    /// Most points in one telemetry batch.
    pub max_batch_points: u32,
    /// Arbiters (threads) hosting device actors; 0 = one per core.
    pub arbiters: usize,
    /// Tokio worker threads for QUIC IO; 0 = one per core.
    pub io_threads: usize,
    /// Run QUIC IO, the sessions and every device actor on one thread (a current-thread tokio
    /// runtime driven by the actix system thread), so that handing a batch from a session to its
    /// actor and the ack back costs no thread wake-up; `arbiters` and `io_threads` are then
    /// unused. The store's writer and readers keep their own threads. Unset (the default): on
    /// when the server may use one core only (its CPU affinity or cgroup quota, as
    /// [`std::thread::available_parallelism`] reads them) and neither `arbiters` nor
    /// `io_threads` asks for more than one thread; threads of their own would then only take
    /// turns on that core, and every hand-off would cost a wake-up and a context switch (on one
    /// pinned core, 6k devices at 1 message/s: 108 µs of server CPU per message with threads of
    /// their own, 93 µs on one; ARCHITECTURE.md). `true` or `false` decides regardless of the
    /// cores.
    pub single_thread: Option<bool>,
    /// `normal` (survives a process crash) or `full` (also survives power loss, slower).
    pub synchronous: String,
    /// Group commit: how long (µs) the store writer waits for more batches when its queue runs
    /// dry, so the batches of many slow devices share one commit. 0 = commit at once.
    pub group_commit_us: u64,
    /// How often (ms) the store folds the points and bookkeeping waiting in its telemetry log and
    /// journal into chunks and tables (see ARCHITECTURE.md). A fold costs per device and metric
    /// that waits, not per point, so a longer interval makes bigger chunks and costs less per
    /// point; the log then holds more to replay after a crash, and each fold stalls acks for about
    /// as long as before, less often. 0 = fold after every commit.
    pub fold_interval_ms: u64,
    /// Time a client has to complete its handshake (milliseconds).
    pub handshake_timeout_ms: u32,
    /// QUIC handshakes in progress at once; further connection attempts wait in the handshake
    /// queue. Without a bound, a reconnect storm runs more handshakes at once than the server can
    /// finish before the clients give up on them, and every abandoned one was wasted work. A slot
    /// is held for about one round trip plus both ends' processing, so the handshakes a server can
    /// finish per second are at most `max_handshakes` / that time: 64 suits links of up to ~50 ms
    /// round trip at ~1,000 handshakes/s; raise it for fleets on slower links (see ARCHITECTURE.md).
    pub max_handshakes: usize,
    /// Connection attempts that may wait for one of the `max_handshakes` slots, oldest first;
    /// an attempt beyond them is refused at once (QUIC `CONNECTION_REFUSED`, which costs no
    /// cryptography) and the client retries after its backoff. 0 = refuse at once.
    pub handshake_queue: usize,
    /// Longest wait in the handshake queue (milliseconds); an attempt that waited longer is
    /// refused rather than started, as its client is about to give up on it. Keep it below the
    /// clients' connect timeout minus ~3 s: an attempt begun while the server was down reaches a
    /// restarted server with a retransmitted Initial, up to 3 s late (the Rust SDK's
    /// `connect_timeout` is 15 s).
    pub handshake_queue_ms: u32,
    /// How long (milliseconds) a client may hold its acknowledgement of the server's packets, asked
    /// of every connection with QUIC's ACK frequency extension. A device that sends a message
    /// every second or so then carries the acknowledgement of the server's reply (the durable
    /// ack of its telemetry) in its next message instead of a packet of its own: two packets per
    /// message instead of three, so fewer for the server to process and for the device's radio to
    /// send. Cost: a server packet that is lost is retransmitted up to this much later (the
    /// server's loss timer must allow for the delay); a burst still gets an acknowledgement every
    /// second packet. 0 = ask nothing (QUIC's default of 25 ms). See ARCHITECTURE.md.
    pub ack_delay_ms: u32,
    /// TLS sessions kept for resumption (one per connection; the oldest go first). A graceful
    /// shutdown saves them for the next start, so a fleet reconnecting to a restarted server
    /// resumes (and may use 0-RTT). 0 = every connection does a full handshake.
    pub tls_sessions: usize,
    /// The command outbox (`[commands]` in the TOML file).
    pub commands: CommandsConfig,
    /// Events an operator live stream may fall behind by before it gets an overflow signal.
    pub event_buffer: usize,
    /// Who may do what on the device-to-device bridge (`[policy]`; reloadable).
    pub policy: PolicyConfig,
    /// The file this configuration was read from (for reloading the policy).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

/// The bridge policy as written in the TOML file (see `fleetlink_core::policy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// `same-group` (devices talk within their own groups), `allow` or `deny`.
    pub default: String,
    /// Checked in order; the first that matches decides.
    pub rules: Vec<PolicyRuleConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default: "same-group".into(),
            rules: Vec::new(),
        }
    }
}

/// One `[[policy.rules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRuleConfig {
    /// `allow` or `deny`.
    pub effect: String,
    /// `publish`, `subscribe`, `message`, `command`; none = all.
    #[serde(default)]
    pub actions: Vec<String>,
    /// A query over the sending device.
    #[serde(default)]
    pub from: Option<String>,
    /// A query over the target device (message, command).
    #[serde(default)]
    pub to: Option<String>,
    /// Topic filters (publish, subscribe).
    #[serde(default)]
    pub topics: Vec<String>,
}

impl PolicyConfig {
    /// The policy these settings describe.
    pub fn build(&self) -> Result<fleetlink_core::policy::Policy, ServerError> {
        let rules: Vec<fleetlink_core::policy::RuleSpec> = self
            .rules
            .iter()
            .map(|r| fleetlink_core::policy::RuleSpec {
                effect: r.effect.clone(),
                actions: r.actions.clone(),
                from: r.from.clone(),
                to: r.to.clone(),
                topics: r.topics.clone(),
            })
            .collect();
        fleetlink_core::policy::Policy::new(&rules, &self.default)
            .map_err(|e| ServerError::Config(format!("[policy]: {e}")))
    }
}

/// Limits of the command outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Deadline of a command sent without one (seconds from now).
    pub default_timeout_s: u64,
    /// Latest deadline an operator may ask for (seconds from now).
    pub max_deadline_s: u64,
    /// Unfinished (queued or delivered) commands a device may have; more are refused.
    pub max_pending_per_device: usize,
    /// A delivery is written to the store only if the command is still running this long after
    /// it went out (milliseconds); a command that finishes sooner is written once, when it
    /// finishes, with its whole history. 0 = write every delivery at once.
    pub delivery_write_delay_ms: u64,
}

/// Upper bound of [`ServerConfig::ack_delay_ms`]: a lost server packet waits this long at most.
const MAX_ACK_DELAY_MS: u32 = fleetlink_transport::MAX_ACK_DELAY.as_millis() as u32;
const MAX_FOLD_INTERVAL_MS: u64 = 300_000;

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            default_timeout_s: 3_600,
            max_deadline_s: 7 * 24 * 3_600,
            max_pending_per_device: 1_000,
            delivery_write_delay_ms: 50,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7447)),
            data_dir: PathBuf::from("fleetlink-data"),
            cert: None,
            key: None,
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 30_000,
            max_frame_bytes: fleetlink_proto::DEFAULT_MAX_FRAME_BYTES,
            max_batch_points: 10_000,
            arbiters: 0,
            io_threads: 0,
            single_thread: None,
            synchronous: "normal".into(),
            group_commit_us: 2_000,
            fold_interval_ms: 15_000,
            handshake_timeout_ms: 10_000,
            max_handshakes: 64,
            handshake_queue: 16_384,
            handshake_queue_ms: 10_000,
            ack_delay_ms: 1_500,
            tls_sessions: 262_144,
            commands: CommandsConfig::default(),
            event_buffer: 4096,
            policy: PolicyConfig::default(),
            config_file: None,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut config: ServerConfig = toml::from_str(&text)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        config.config_file = Some(path.to_path_buf());
        Ok(config)
    }

    /// A configuration for tests and embedding: 127.0.0.1 on a free port, the given data dir.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        if self.cert.is_some() != self.key.is_some() {
            return bad(
                "set both `cert` and `key`, or neither (for a development certificate)".into(),
            );
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_timeout_ms <= self.heartbeat_interval_ms
        {
            return bad(format!(
                "heartbeat_timeout_ms ({}) must be above heartbeat_interval_ms ({}), which must be above 0",
                self.heartbeat_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        if self.max_frame_bytes < fleetlink_proto::HANDSHAKE_MAX_FRAME_BYTES {
            return bad(format!(
                "max_frame_bytes must be at least {}",
                fleetlink_proto::HANDSHAKE_MAX_FRAME_BYTES
            ));
        }
        if self.max_batch_points == 0 {
            return bad("max_batch_points must be above 0".into());
        }
        if self.max_handshakes == 0 {
            return bad("max_handshakes must be above 0".into());
        }
        if self.ack_delay_ms > MAX_ACK_DELAY_MS {
            return bad(format!(
                "ack_delay_ms = {}: at most {MAX_ACK_DELAY_MS}; a little above the devices' message interval is enough",
                self.ack_delay_ms
            ));
        }
        if self.group_commit_us > 1_000_000 {
            return Err(ServerError::Config(format!(
                "group_commit_us = {}: at most 1000000 (1 s); a few thousand is plenty",
                self.group_commit_us
            )));
        }
        if self.fold_interval_ms > MAX_FOLD_INTERVAL_MS {
            return bad(format!(
                "fold_interval_ms = {}: at most {MAX_FOLD_INTERVAL_MS} (5 min); the telemetry log replays what waits after a crash",
                self.fold_interval_ms
            ));
        }
        if !matches!(self.synchronous.as_str(), "normal" | "full") {
            return bad(format!(
                "synchronous = {:?}: use \"normal\" or \"full\"",
                self.synchronous
            ));
        }
        self.policy.build()?;
        if self.event_buffer < 16 {
            return bad(format!(
                "event_buffer ({}) must be at least 16",
                self.event_buffer
            ));
        }
        let c = &self.commands;
        if c.default_timeout_s == 0
            || c.max_deadline_s < c.default_timeout_s
            || c.max_pending_per_device == 0
        {
            return bad(format!(
                "[commands]: default_timeout_s ({}) must be above 0 and at most max_deadline_s ({}); max_pending_per_device ({}) must be above 0",
                c.default_timeout_s, c.max_deadline_s, c.max_pending_per_device
            ));
        }
        Ok(())
    }

    pub(crate) fn outbox_limits(&self) -> fleetlink_core::command::OutboxLimits {
        fleetlink_core::command::OutboxLimits {
            max_pending: self.commands.max_pending_per_device,
            max_deadline_us: (self.commands.max_deadline_s as i64).saturating_mul(1_000_000),
        }
    }

    /// Whether IO, sessions and actors share one thread on a machine that lets the server use
    /// `cores` cores (see `single_thread`).
    pub fn runs_single_thread(&self, cores: usize) -> bool {
        self.single_thread
            .unwrap_or(cores == 1 && self.arbiters <= 1 && self.io_threads <= 1)
    }

    pub(crate) fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.heartbeat_timeout_ms))
    }
}

#[cfg(test)]
mod group_commit_tests {
    use super::*;

    #[test]
    fn one_thread_on_one_core_unless_told() {
        let auto = ServerConfig::default();
        assert_eq!(auto.single_thread, None);
        assert!(auto.runs_single_thread(1));
        assert!(!auto.runs_single_thread(2));
        let threads_asked = ServerConfig {
            io_threads: 2,
            ..ServerConfig::default()
        };
        assert!(!threads_asked.runs_single_thread(1));
        let arbiters_asked = ServerConfig {
            arbiters: 2,
            ..ServerConfig::default()
        };
        assert!(!arbiters_asked.runs_single_thread(1));
        let one_each = ServerConfig {
            arbiters: 1,
            io_threads: 1,
            ..ServerConfig::default()
        };
        assert!(one_each.runs_single_thread(1));
        assert!(!one_each.runs_single_thread(4));
        let on: ServerConfig = toml::from_str("single_thread = true").expect("parses");
        assert!(on.runs_single_thread(8));
        let off: ServerConfig = toml::from_str("single_thread = false").expect("parses");
        assert!(!off.runs_single_thread(1));
    }

    #[test]
    fn ack_delay_is_read_from_toml_and_refused_above_ten_seconds() {
        assert_eq!(ServerConfig::default().ack_delay_ms, 1_500);
        let off: ServerConfig = toml::from_str("ack_delay_ms = 0").expect("parses");
        assert_eq!(off.ack_delay_ms, 0);
        assert!(off.validate().is_ok());
        let long: ServerConfig = toml::from_str("ack_delay_ms = 10001").expect("parses");
        match long.validate() {
            Err(ServerError::Config(m)) => {
                assert!(m.contains("ack_delay_ms = 10001: at most 10000"), "{m}")
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn group_commit_defaults_to_two_ms_and_refuses_more_than_a_second() {
        let config = ServerConfig::default();
        assert_eq!(config.group_commit_us, 2_000);
        assert!(config.validate().is_ok());
        let slow = ServerConfig {
            group_commit_us: 1_000_001,
            ..Default::default()
        };
        let err = slow.validate().expect_err("refused").to_string();
        assert!(err.contains("group_commit_us"), "{err}");
        let parsed: ServerConfig = toml::from_str("group_commit_us = 0").expect("parses");
        assert_eq!(parsed.group_commit_us, 0);
    }

    #[test]
    fn fold_interval_defaults_to_fifteen_seconds_and_refuses_more_than_five_minutes() {
        assert_eq!(ServerConfig::default().fold_interval_ms, 15_000);
        let every_commit: ServerConfig = toml::from_str("fold_interval_ms = 0").expect("parses");
        assert_eq!(every_commit.fold_interval_ms, 0);
        assert!(every_commit.validate().is_ok());
        let long: ServerConfig = toml::from_str("fold_interval_ms = 300001").expect("parses");
        match long.validate() {
            Err(ServerError::Config(m)) => {
                assert!(
                    m.contains("fold_interval_ms = 300001: at most 300000"),
                    "{m}"
                )
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
