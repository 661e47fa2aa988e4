//! The server process is killed with SIGKILL mid-stream and restarted on the same data dir: the
//! devices reconnect by themselves, and the stored points equal the sent points, with no gap and
//! no duplicate, and so do the devices' point counts.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use fleetlink_client::{
    DeviceClient, DeviceConfig, DeviceId, MetricName, OperatorClient, OperatorConfig, Point,
    ServerAddress, TelemetryQuery, Value,
};
use fleetlink_core::backoff::Backoff;

/// Starts `fleetlink serve` and returns it with the address it listens on.
fn serve(data_dir: &Path, listen: &str) -> (Child, SocketAddr) {
    // Short heartbeats, so the devices notice the dead server quickly.
    let config = data_dir.join("test.toml");
    std::fs::write(
        &config,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1000\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetlink"))
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.parse().unwrap();
        }
    };
    // keep draining stdout so the server never blocks on a full pipe
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_points_survive_sigkill_and_devices_reconnect_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = serve(dir.path(), "127.0.0.1:0");
    let address = ServerAddress::local(addr, &dir.path().join("tls/ca.pem")).unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let op = OperatorClient::connect(OperatorConfig {
        server: address.clone(),
        token: token.clone(),
    })
    .await
    .unwrap();

    const DEVICES: usize = 5;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = DeviceId::new(format!("kill-{i}")).unwrap();
        let device_token = op.provision_device(&id, Default::default()).await.unwrap();
        let mut config = DeviceConfig::new(address.clone(), id, device_token);
        config.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        };
        config.max_batch_points = 10;
        devices.push(Arc::new(DeviceClient::connect(config).await.unwrap()));
    }
    op.close();

    // Every device streams points numbered 0, 1, 2, ... until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for dev in &devices {
        let (dev, stop) = (dev.clone(), stop.clone());
        let sent = Arc::new(AtomicI64::new(0));
        let counter = sent.clone();
        senders.push((
            tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let points = (n..n + 5)
                        .map(|k| Point {
                            metric: MetricName::new("n").unwrap(),
                            time_us: k,
                            value: Value::Int(k),
                        })
                        .collect();
                    dev.send(points).await.unwrap();
                    n += 5;
                    counter.store(n, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await; // pacing: a steady stream, not a burst
                }
                n
            }),
            sent,
        ));
    }
    let acked =
        |devices: &[Arc<DeviceClient>]| devices.iter().map(|d| d.stats().points_acked).sum::<u64>();
    wait_until(
        Duration::from_secs(30),
        "points acked before the kill",
        || acked(&devices) >= 500,
    )
    .await;

    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    let acked_at_kill = acked(&devices);
    let (mut server, _) = serve(dir.path(), &addr.to_string());

    // The devices find the new server by themselves and keep streaming.
    wait_until(Duration::from_secs(30), "every device reconnected", || {
        devices
            .iter()
            .all(|d| d.stats().connects >= 2 && d.stats().connected)
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "more points acked after the restart",
        || acked(&devices) >= acked_at_kill + 500,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut sent_counts = Vec::new();
    for (task, _) in senders {
        sent_counts.push(task.await.unwrap());
    }
    for d in &devices {
        d.flush(Duration::from_secs(30)).await.unwrap();
    }

    let op = OperatorClient::connect(OperatorConfig {
        server: address,
        token,
    })
    .await
    .unwrap();
    for (dev, sent) in devices.iter().zip(sent_counts) {
        let stored = op
            .query_telemetry(TelemetryQuery::all(dev.id().clone()))
            .await
            .unwrap();
        let got: Vec<i64> = stored.iter().map(|p| p.time_us).collect();
        let want: Vec<i64> = (0..sent).collect();
        assert_eq!(
            got.len(),
            want.len(),
            "device {}: stored {} of {} points",
            dev.id(),
            got.len(),
            sent
        );
        assert_eq!(got, want, "device {}: gap or duplicate", dev.id());
        assert!(stored.iter().all(|p| p.value == Value::Int(p.time_us)));
        // the device bookkeeping, in the store's journal at the kill, came back with the points
        let info = op.device(dev.id()).await.unwrap();
        assert_eq!(info.point_count, sent as u64, "device {}", dev.id());
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

async fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
