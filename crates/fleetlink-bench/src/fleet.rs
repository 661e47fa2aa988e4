//! fleetlink under test: the server as a child process (provisioned with the bench devices),
//! and the load through the real SDK ([`DeviceClient`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use fleetlink_client::{
    DeviceClient, DeviceConfig, DeviceId, Endpoint, Point, Resumption, ServerAddress, Value,
};
use fleetlink_core::credentials::Token;
use fleetlink_server::{Server, ServerConfig};
use fleetlink_store::{NewDevice, SqliteOptions, SqliteStore, Store as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use crate::load::{Load, connect_ramp, endpoints_for};
use crate::stats::Meter;

/// The id of bench device `i`.
pub fn device_id(i: usize) -> DeviceId {
    DeviceId::new(format!("bench-{i:06}")).unwrap_or_else(|e| panic!("bench device id: {e}"))
}

/// The token of bench device `i`: derived from `i`, so the load generator needs no token file.
/// Bench data dirs are throwaway; never use this scheme for a real fleet.
pub fn token(i: usize) -> Token {
    let mut bytes = [0x5a; Token::BYTES];
    bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Token::from_random_bytes(bytes)
}

/// What `serve-fleetlink` prints when it listens (`READY <json>`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    pub admin_token: String,
}

impl Ready {
    pub fn server(&self) -> Result<ServerAddress> {
        Ok(ServerAddress::local(self.addr, &self.ca_file)?)
    }
}

/// The `serve-fleetlink` child: provisions devices `0..devices` (if not yet), serves on `listen`
/// until stdin closes. It is pinned to one core, so the server's default puts IO, sessions and
/// actors on one thread; `FLEETLINK_BENCH_SINGLE_THREAD=false` gives them one IO thread and one
/// arbiter instead (`true` forces one thread even unpinned).
pub fn serve(data: &Path, devices: usize, listen: SocketAddr) -> Result<()> {
    provision(data, devices)?;
    // Environment overrides, for experiments (the reconnect storm, group commits, ACK delay).
    fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
    let single_thread = match std::env::var("FLEETLINK_BENCH_SINGLE_THREAD") {
        Ok(v) => Some(
            v.parse::<bool>()
                .with_context(|| format!("FLEETLINK_BENCH_SINGLE_THREAD={v}: true or false"))?,
        ),
        Err(_) => None,
    };
    let defaults = ServerConfig::default();
    let server = Server::start(ServerConfig {
        listen,
        data_dir: data.to_path_buf(),
        io_threads: 1,
        arbiters: 1,
        single_thread,
        max_handshakes: env_or("FLEETLINK_BENCH_MAX_HANDSHAKES", defaults.max_handshakes),
        handshake_queue_ms: env_or(
            "FLEETLINK_BENCH_HANDSHAKE_QUEUE_MS",
            defaults.handshake_queue_ms,
        ),
        group_commit_us: env_or("FLEETLINK_BENCH_GROUP_COMMIT_US", defaults.group_commit_us),
        fold_interval_ms: env_or(
            "FLEETLINK_BENCH_FOLD_INTERVAL_MS",
            defaults.fold_interval_ms,
        ),
        ack_delay_ms: env_or("FLEETLINK_BENCH_ACK_DELAY_MS", defaults.ack_delay_ms),
        ..defaults
    })?;
    let admin_token = std::fs::read_to_string(server.admin_token_file())
        .context("reading the admin token")?
        .trim()
        .to_owned();
    let ready = Ready {
        addr: server.local_addr(),
        ca_file: server
            .ca_cert_path()
            .context("the bench server uses its development CA")?
            .to_path_buf(),
        admin_token,
    };
    #[allow(clippy::print_stdout)]
    {
        println!("READY {}", serde_json::to_string(&ready)?);
    }
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    server.shutdown();
    Ok(())
}

fn provision(data: &Path, devices: usize) -> Result<()> {
    if devices == 0 {
        return Ok(());
    }
    std::fs::create_dir_all(data)?;
    let store = SqliteStore::open(data.join("fleetlink.db"), SqliteOptions::default())?;
    let writer = store.writer_handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        if store
            .device_token_hash(&device_id(devices - 1))
            .await?
            .is_some()
        {
            return anyhow::Ok(()); // provisioned by an earlier start
        }
        let now = fleetlink_server::now_us();
        // One transaction per thousand devices (a device per transaction took over 300 s for
        // 100k: each is a synchronous=FULL commit).
        let mut i = 0;
        while i < devices {
            let end = (i + fleetlink_client::MAX_PROVISION_BATCH).min(devices);
            let new = |i| NewDevice {
                id: device_id(i),
                token_hash: token(i).hash(),
                tags: [("bench".to_owned(), "yes".to_owned())].into(),
                attributes: serde_json::Map::new(),
                created_us: now,
            };
            match store.provision_devices((i..end).map(new).collect()).await {
                Ok(_) => {}
                // part of this batch exists (an interrupted earlier run): the rest one by one
                Err(fleetlink_store::StoreError::DeviceExists(_)) => {
                    for i in i..end {
                        match store.provision_device(new(i)).await {
                            Ok(()) | Err(fleetlink_store::StoreError::DeviceExists(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
            i = end;
        }
        Ok(())
    })?;
    drop(store);
    writer.join(Duration::from_secs(60));
    Ok(())
}

/// The ~100-byte message every system carries: here one point with an 84-byte string value.
pub fn point(payload: &str) -> Point {
    Point {
        metric: fleetlink_client::MetricName::new("payload")
            .unwrap_or_else(|e| panic!("metric name: {e}")),
        time_us: fleetlink_server::now_us(),
        value: Value::String(payload.to_owned()),
    }
}

/// Connects devices `0..n` through a few shared endpoints, ramping the handshakes.
pub async fn connect(
    server: &ServerAddress,
    n: usize,
    max_buffered_points: usize,
    commands: Option<fleetlink_client::CommandHandlers>,
) -> Result<Vec<Arc<DeviceClient>>> {
    connect_resuming(
        server,
        n,
        max_buffered_points,
        commands,
        Resumption::default(),
    )
    .await
}

/// [`connect`] with a choice of TLS session resumption for the devices' reconnects.
pub async fn connect_resuming(
    server: &ServerAddress,
    n: usize,
    max_buffered_points: usize,
    commands: Option<fleetlink_client::CommandHandlers>,
    resumption: Resumption,
) -> Result<Vec<Arc<DeviceClient>>> {
    let endpoints: Vec<Endpoint> = endpoints_for(n)
        .map(|_| Endpoint::for_server(server.addr))
        .collect::<Result<_, _>>()?;
    let server = server.clone();
    connect_ramp(n, move |i| {
        let mut config = DeviceConfig::new(server.clone(), device_id(i), token(i).as_str());
        config.endpoint = Some(endpoints[i % endpoints.len()].clone());
        config.max_buffered_points = max_buffered_points;
        config.resumption = resumption;
        // An environment override for experiments with the reconnect storm (as the server's
        // FLEETLINK_BENCH_MAX_HANDSHAKES and FLEETLINK_BENCH_HANDSHAKE_QUEUE_MS in `serve`).
        if let Some(ms) = std::env::var("FLEETLINK_BENCH_CONNECT_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.connect_timeout = Duration::from_millis(ms);
        }
        // and for A/B runs of the ACK delay a device asks of the server
        if let Some(ms) = std::env::var("FLEETLINK_BENCH_DEVICE_ACK_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.ack_delay = Duration::from_millis(ms);
        }
        // and of ack coalescing (1 = every batch acked at once)
        if let Some(n) = std::env::var("FLEETLINK_BENCH_TELEMETRY_ACK_BATCHES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.telemetry_ack_batches = n;
        }
        if let Some(c) = &commands {
            config.commands = c.clone();
        }
        async move {
            DeviceClient::connect(config)
                .await
                .map(Arc::new)
                .with_context(|| format!("connecting bench device {i}"))
        }
    })
    .await
}

/// Drives `load` through connected clients until `stop`, then flushes; every point is timed
/// from the call to `send` until the server acked it as durable.
pub async fn drive(
    clients: &[Arc<DeviceClient>],
    load: &Load,
    meter: &Meter,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let payload = crate::load::payload_text(load.message_bytes);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        let meter = meter.clone();
        let mut stop = stop.clone();
        let payload = payload.clone();
        let load = load.clone();
        tasks.spawn(async move {
            let times: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
            let (done_tx, done_rx) = watch::channel(None);
            let watcher = tokio::spawn(watch_acks(
                client.settled_points(),
                done_rx,
                times.clone(),
                meter.clone(),
            ));
            let mut ticker = load.ticker(i, start);
            let mut sent = 0u64;
            loop {
                if *stop.borrow() {
                    break;
                }
                if let Some(t) = ticker.as_mut() {
                    tokio::select! {
                        _ = t.tick() => {}
                        _ = stop.changed() => break,
                    }
                }
                if let Ok(mut q) = times.lock() {
                    q.push_back(Instant::now());
                }
                let p = if load.unique_strings {
                    // same length, a different string each time: device and count in hex
                    let mut text = format!("{i:08x}{sent:016x}");
                    text.push_str(&payload[text.len().min(payload.len())..]);
                    point(&text)
                } else {
                    point(&payload)
                };
                match client.send(vec![p]).await {
                    Ok(()) => {
                        meter.sent(1);
                        sent += 1;
                    }
                    Err(_) => {
                        meter.error();
                        break;
                    }
                }
            }
            if client.flush(Duration::from_secs(120)).await.is_err() {
                meter.error();
            }
            // The watcher counts every settled point before it stops.
            let _ = done_tx.send(Some(sent));
            if tokio::time::timeout(Duration::from_secs(10), watcher)
                .await
                .is_err()
            {
                meter.error();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn watch_acks(
    mut settled: watch::Receiver<u64>,
    mut done: watch::Receiver<Option<u64>>,
    times: Arc<Mutex<VecDeque<Instant>>>,
    meter: Meter,
) {
    let mut seen = 0u64;
    loop {
        let now = *settled.borrow_and_update();
        if let Ok(mut q) = times.lock() {
            while seen < now {
                match q.pop_front() {
                    Some(t) => meter.delivered_since(t),
                    None => meter.delivered(1),
                }
                seen += 1;
            }
        }
        if done.borrow_and_update().is_some_and(|sent| seen >= sent) {
            return;
        }
        tokio::select! {
            r = settled.changed() => if r.is_err() { return },
            r = done.changed() => if r.is_err() { return },
        }
    }
}

/// Commands through an operator to devices answering `ping`, one at a time (`run_command`: one
/// request, answered with the result); returns the round-trip meter (operator send → device
/// handler → durable result → operator).
pub async fn command_round_trips(
    server: &ServerAddress,
    admin_token: &str,
    devices: usize,
    count: usize,
    meter: &Meter,
) -> Result<()> {
    let op = fleetlink_client::OperatorClient::connect(fleetlink_client::OperatorConfig {
        server: server.clone(),
        token: admin_token.to_owned(),
    })
    .await?;
    let limit = Semaphore::new(1);
    let start = Instant::now();
    for k in 0..count {
        let _one = limit.acquire().await?;
        let device = device_id((k * 7919) % devices);
        let t = Instant::now();
        meter.sent(1);
        let mut req = fleetlink_client::CommandRequest::new(device, "ping");
        req.args = serde_json::json!({ "k": k });
        match op.run_command(req, Duration::from_secs(10)).await {
            Ok(_) => meter.delivered_since(t),
            Err(_) => meter.error(),
        }
        // The tail's timing: when slow round trips happen tells what they coincide with.
        let took = t.elapsed();
        if took >= Duration::from_millis(5) {
            tracing::debug!(
                k,
                at_ms = (t - start).as_millis() as u64,
                took_us = took.as_micros() as u64,
                "slow command round trip"
            );
        }
    }
    Ok(())
}

/// Handlers that answer `ping` with its arguments.
pub fn ping_handlers() -> fleetlink_client::CommandHandlers {
    let mut h = fleetlink_client::CommandHandlers::default();
    h.on("ping", |call: fleetlink_client::CommandCall| async move {
        Ok(call.args)
    });
    h
}
