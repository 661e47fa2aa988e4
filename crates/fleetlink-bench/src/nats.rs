//! NATS (async-nats): core publish with a subscriber of `bench.>` counting deliveries, and
//! JetStream with file storage, where a message is delivered when its publish ack arrives.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::sync::watch;

use crate::load::{Load, stamp_of, stamped_payload};
use crate::procs::{Proc, free_port};
use crate::stats::Meter;

/// Acked publishes a JetStream device keeps in flight.
const JS_WINDOW: usize = 64;

/// Starts `nats-server` pinned to `core` on a free port, JetStream storing under `dir`.
pub fn start(dir: &Path, core: Option<usize>) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let store = dir.join("jetstream");
    std::fs::create_dir_all(&store)?;
    let program = crate::mqtt::which("nats-server")?;
    let mut p = Proc::spawn(
        "nats-server",
        core,
        &program,
        &[
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            store.display().to_string(),
        ],
    )?;
    p.wait_tcp(([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
    Ok((p, port))
}

fn url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}")
}

/// Connects `n` clients, one connection each (like devices).
pub async fn connect(port: u16, n: usize) -> Result<Vec<async_nats::Client>> {
    crate::load::connect_ramp(n, move |_| async move {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(30))
            .connect(url(port))
            .await
            .context("connecting to nats-server")
    })
    .await
}

/// A subscriber of `bench.>` counting what it receives; returns once the server has it.
pub async fn subscriber(port: u16, meter: &Meter) -> Result<tokio::task::JoinHandle<()>> {
    let client = async_nats::connect(url(port)).await?;
    let mut sub = client.subscribe("bench.>").await?;
    client.flush().await?; // the SUB is on the server once the flush's PONG is back
    let meter = meter.clone();
    Ok(tokio::spawn(async move {
        let _client = client;
        while let Some(msg) = sub.next().await {
            match stamp_of(&msg.payload) {
                Some(t) => meter.delivered_since(t),
                None => meter.delivered(1),
            }
        }
    }))
}

/// Creates the file-stored stream `BENCH` over `bench.>`.
pub async fn create_stream(port: u16) -> Result<()> {
    let client = async_nats::connect(url(port)).await?;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the JetStream stream")?;
    Ok(())
}

/// Publishes `load` until `stop`: core publishes, or JetStream publishes with their acks awaited.
pub async fn drive(
    clients: &[async_nats::Client],
    jetstream: bool,
    load: &Load,
    meter: &Meter,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        let meter = meter.clone();
        let mut stop = stop.clone();
        let load = load.clone();
        let subject = format!("bench.{i}");
        tasks.spawn(async move {
            let js = jetstream.then(|| async_nats::jetstream::new(c.clone()));
            let mut inflight = FuturesUnordered::new();
            let mut ticker = load.ticker(i, start);
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
                let payload: bytes::Bytes = stamped_payload(load.message_bytes).into();
                match &js {
                    None => match c.publish(subject.clone(), payload).await {
                        Ok(()) => meter.sent(1),
                        Err(_) => meter.error(),
                    },
                    Some(js) => {
                        while inflight.len() >= JS_WINDOW {
                            settle(inflight.next().await, &meter);
                        }
                        let t = Instant::now();
                        match js.publish(subject.clone(), payload).await {
                            Ok(ack) => {
                                meter.sent(1);
                                inflight.push(async move { (t, ack.await) });
                            }
                            Err(_) => meter.error(),
                        }
                        // collect acks that are already in without waiting
                        while let Some(Some(done)) =
                            futures_util::FutureExt::now_or_never(inflight.next())
                        {
                            settle(Some(done), &meter);
                        }
                    }
                }
            }
            while let Some(done) = inflight.next().await {
                settle(Some(done), &meter);
            }
            let _ = c.flush().await;
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

type Acked = (
    Instant,
    Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >,
);

fn settle(done: Option<Acked>, meter: &Meter) {
    match done {
        Some((t, Ok(_))) => meter.delivered_since(t),
        Some((_, Err(_))) => meter.error(),
        None => {}
    }
}
