//! Mosquitto over MQTT (rumqttc): started on a free port with persistence off; a message is
//! delivered when a subscriber of `bench/#` receives it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{oneshot, watch};

use crate::load::{Load, stamp_of, stamped_payload};
use crate::procs::{Proc, free_port};
use crate::stats::Meter;

/// Starts `mosquitto` pinned to `core`, listening on 127.0.0.1:<free port>.
pub fn start(dir: &Path, core: Option<usize>) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_dest none\nmax_inflight_messages 1000\nmax_queued_messages 1000000\n"
        ),
    )?;
    let program = which("mosquitto")?;
    let mut p = Proc::spawn(
        "mosquitto",
        core,
        &program,
        &["-c".into(), conf.display().to_string()],
    )?;
    p.wait_tcp(([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
    Ok((p, port))
}

/// A program on PATH or in /usr/sbin (where Debian puts the brokers).
pub fn which(name: &str) -> Result<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()]);
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} is not installed (apt-get install {name}); the harness needs it")
        })
}

/// What a subscriber does with each received payload.
type OnPublish = Box<dyn Fn(&[u8]) + Send>;

fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// One client: its handle and a task polling its event loop. `on_publish` sees received messages.
/// A publishing device (`counts_sent`) counts a message as sent when rumqttc writes it to the
/// socket, not when it is queued in the client: a message still queued when the run ends was
/// never offered to the broker, so it is not the broker's loss.
async fn client(
    port: u16,
    id: String,
    meter: &Meter,
    on_publish: Option<OnPublish>,
    counts_sent: bool,
) -> Result<AsyncClient> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let (connected_tx, connected_rx) = oneshot::channel();
    let meter = meter.clone();
    tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(c) = connected.take() {
                        let _ = c.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(f) = &on_publish {
                        f(&p.payload);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(_))) if counts_sent => meter.sent(1),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => break,
                // A lost broker ends the client: rumqttc would otherwise reconnect forever (it
                // does not notice its handles were dropped while it cannot connect), and ten
                // thousand such loops kept the load generator busy in the next scenarios.
                Err(_) => {
                    meter.error();
                    break;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), connected_rx)
        .await
        .context("MQTT connect timed out")?
        .context("MQTT connect failed")?;
    Ok(client)
}

/// The subscriber that counts deliveries: subscribed to `bench/#` before the load starts.
pub async fn subscriber(port: u16, level: u8, meter: &Meter) -> Result<AsyncClient> {
    let m = meter.clone();
    let probed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = probed.clone();
    let sub = client(
        port,
        "bench-subscriber".into(),
        meter,
        Some(Box::new(move |payload: &[u8]| match stamp_of(payload) {
            Some(t) => m.delivered_since(t),
            None => seen.store(true, std::sync::atomic::Ordering::Relaxed),
        })),
        false,
    )
    .await?;
    sub.subscribe("bench/#", qos(level)).await?;
    // The SUBACK is not surfaced here: unstamped probe messages confirm the subscription.
    let probe = client(port, "bench-probe".into(), meter, None, false).await?;
    for _ in 0..100 {
        probe
            .publish("bench/probe", QoS::AtLeastOnce, false, vec![0u8; 4])
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if probed.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = probe.disconnect().await;
            return Ok(sub);
        }
    }
    anyhow::bail!("the MQTT subscriber never received its probe message")
}

/// Connects the publishing devices.
pub async fn connect(port: u16, n: usize, meter: &Meter) -> Result<Vec<AsyncClient>> {
    let meter = meter.clone();
    crate::load::connect_ramp(n, move |i| {
        let meter = meter.clone();
        async move { client(port, format!("bench-{i:06}"), &meter, None, true).await }
    })
    .await
}

/// Publishes `load` at QoS `level` until `stop`.
pub async fn drive(
    clients: &[AsyncClient],
    level: u8,
    load: &Load,
    meter: &Meter,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        let meter = meter.clone();
        let mut stop = stop.clone();
        let load = load.clone();
        let topic: Arc<str> = format!("bench/{i}").into();
        tasks.spawn(async move {
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
                let payload = stamped_payload(load.message_bytes);
                // counted as sent by the event loop, once it is on the wire
                if c.publish(&*topic, qos(level), false, payload)
                    .await
                    .is_err()
                {
                    meter.error();
                    break;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
