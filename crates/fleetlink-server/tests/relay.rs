//! Through a UDP relay that counts and drops datagrams: the ACK delay the server asks of its
//! clients (`ServerConfig::ack_delay_ms`): fewer packets per message, and a lost packet is still
//! retransmitted; and a restarted server resetting the connections of a device that missed the
//! previous server's close.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use fleetlink_client::{
    CommandRequest, DeviceClient, DeviceId, MetricName, OperatorClient, Point, Value,
};
use fleetlink_server::{Server, ServerConfig};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);
/// Messages the device sends, one every [`INTERVAL`].
const MESSAGES: u64 = 10;
/// Longer than QUIC's default ACK delay (25 ms), shorter than ours.
const INTERVAL: Duration = Duration::from_millis(200);

/// Datagrams a device sends per message when it sends one message every [`INTERVAL`] and waits
/// for each to be acked, with the server asking for `ack_delay_ms`.
async fn device_datagrams_per_message(ack_delay_ms: u32) -> f64 {
    let ts = start(|c| c.ack_delay_ms = ack_delay_ms);
    let op = ts.operator().await;
    let token = provision(&op, "meter-1").await;
    let relay = UdpRelay::start(ts.address.addr).await;
    let mut config = ts.device_config("meter-1", &token);
    config.server.addr = relay.addr;
    let dev = DeviceClient::connect(config).await.unwrap();
    let send = |i: u64| {
        let dev = &dev;
        async move {
            dev.send(vec![meter_point(i)]).await.unwrap();
            dev.flush(WAIT).await.unwrap();
        }
    };
    // the handshake's packets and path-MTU probes are over once a first message is acked
    send(0).await;
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.tick().await;
    let before = relay.to_server();
    for i in 1..=MESSAGES {
        ticker.tick().await;
        send(i).await;
    }
    let sent = relay.to_server() - before;
    dev.close().await;
    sent as f64 / MESSAGES as f64
}

/// With the default ACK delay, a device that sends a message every 200 ms acknowledges the
/// server's reply (the durable ack) in its next message: one datagram per message. Without it
/// (QUIC's 25 ms), every message costs the device a second datagram, an ACK of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_acknowledges_the_servers_reply_in_its_next_message() {
    let default = ServerConfig::default().ack_delay_ms;
    assert!(u128::from(default) > INTERVAL.as_millis() * 2);
    let with = device_datagrams_per_message(default).await;
    let without = device_datagrams_per_message(0).await;
    assert!(
        with <= 1.2,
        "{with} datagrams per message with ack_delay_ms = {default}"
    );
    assert!(
        without >= 1.8,
        "{without} datagrams per message with ack_delay_ms = 0"
    );
}

/// A command whose packet is lost on the way to the device is retransmitted (the server's loss
/// timer allows for the ACK delay it asked for) and runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_lost_on_the_way_to_a_device_is_retransmitted_and_runs_once() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "valve-1").await;
    let relay = UdpRelay::start(ts.address.addr).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut config = ts.device_config("valve-1", &token).on_command("open", {
        let runs = runs.clone();
        move |call| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"opened": call.args["percent"]}))
            }
        }
    });
    config.server.addr = relay.addr;
    let dev = DeviceClient::connect(config).await.unwrap();
    // The command's datagram is the first of the server's to carry ~1 KB of arguments (the
    // handshake and the path-MTU probes, 1,200 bytes and up, are over once the device is
    // connected and has had a message acked).
    dev.send(vec![Point {
        metric: MetricName::new("pressure").unwrap(),
        time_us: 1,
        value: Value::Double(2.5),
    }])
    .await
    .unwrap();
    dev.flush(WAIT).await.unwrap();
    let padding = "x".repeat(900);
    relay.drop_next_to_client(1, 900);
    let result = op
        .run_command(
            CommandRequest::new(DeviceId::new("valve-1").unwrap(), "open")
                .args(json!({"percent": 40, "note": padding})),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(result, json!({"opened": 40}));
    assert_eq!(relay.dropped(), 1, "the command's datagram was dropped");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    dev.close().await;
}

/// A device that missed the server's close (every datagram from the server lost while it
/// stopped) still holds its old connection. Its next message reaches the restarted server, which
/// knows the previous server's stateless-reset key (kept in the data dir) and resets that
/// connection at once: the SDK reconnects and delivers the message well before QUIC's idle
/// timeout (60 s) would have ended the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_missed_the_close_is_reset_by_the_restarted_server() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "pump-9").await;
    let relay = UdpRelay::start(ts.address.addr).await;
    let mut config = ts.device_config("pump-9", &token);
    config.server.addr = relay.addr;
    let dev = DeviceClient::connect(config).await.unwrap();
    let point = |i: i64| Point {
        metric: MetricName::new("rpm").unwrap(),
        time_us: i,
        value: Value::Double(i as f64),
    };
    dev.send(vec![point(1)]).await.unwrap();
    dev.flush(WAIT).await.unwrap();
    op.close();

    relay.drop_next_to_client(u64::MAX, 0); // the device hears nothing of the stop
    let (dir, addr) = (ts.dir, ts.server.local_addr());
    let server = ts.server;
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    let restarted = {
        let mut config = ServerConfig::local(dir.path());
        config.listen = addr;
        tokio::task::spawn_blocking(move || Server::start(config).unwrap())
            .await
            .unwrap()
    };
    let dropped = relay.dropped();
    assert!(dropped > 0, "the server's close was sent, and dropped");
    relay.drop_next_to_client(0, 0);
    assert_eq!(dev.stats().connects, 1, "the device does not know yet");

    dev.send(vec![point(2)]).await.unwrap();
    dev.flush(WAIT).await.unwrap();
    assert_eq!(dev.stats().connects, 2, "reconnected after the reset");
    dev.close().await;
    restarted.shutdown();
}

/// An idle device's heartbeat asks for no answer (protocol §6): the server's QUIC ACK is all that
/// comes back, one datagram each way per heartbeat (an answer would need an ACK of its own, a
/// second datagram from the device). The device stays connected on those ACKs alone over several
/// heartbeat timeouts, and the server counts the heartbeats as seen; once nothing comes back from
/// the server at all, the device gives up on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_device_heartbeats_in_two_datagrams_and_notices_a_silent_server() {
    // QUIC's default ACK delay (25 ms) both ways, shorter than the heartbeat interval: each
    // heartbeat and each answer would be acknowledged in a datagram of its own
    let ts = start(|c| {
        c.ack_delay_ms = 0;
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 500;
    });
    let op = ts.operator().await;
    let token = provision(&op, "beacon-1").await;
    op.close();
    let relay = UdpRelay::start(ts.address.addr).await;
    let mut config = ts.device_config("beacon-1", &token);
    config.server.addr = relay.addr;
    config.ack_delay = Duration::ZERO;
    // (ack coalescing would stretch the QUIC ACK delay the device asks for)
    config.telemetry_ack_batches = 1;
    let dev = DeviceClient::connect(config).await.unwrap();
    // the handshake's packets and path-MTU probes are over once a first message is acked
    dev.send(vec![Point {
        metric: MetricName::new("rssi").unwrap(),
        time_us: 1,
        value: Value::Double(-70.0),
    }])
    .await
    .unwrap();
    dev.flush(WAIT).await.unwrap();
    let (up, down) = (relay.to_server(), relay.to_client());
    // three heartbeat timeouts of heartbeats, and nothing else
    eventually(WAIT, "30 datagrams from the idle device", || async {
        relay.to_server() - up >= 30
    })
    .await;
    let (up, down) = (relay.to_server() - up, relay.to_client() - down);
    assert!(
        down as f64 >= 0.8 * up as f64,
        "{down} datagrams from the server for {up} from the device"
    );
    let stats = dev.stats();
    assert!(stats.connected && stats.connects == 1, "{stats:?}");
    // (a fresh operator: the first one's connection idled out, the server's QUIC idle timeout
    // being twice the heartbeat timeout, 1 s, and the SDK operator's keep-alive every 5 s)
    let info = ts.operator().await;
    let info = info
        .device(&DeviceId::new("beacon-1").unwrap())
        .await
        .unwrap();
    assert!(info.presence.online, "{:?}", info.presence);

    relay.drop_next_to_client(u64::MAX, 0);
    eventually(WAIT, "the device giving up on a silent server", || async {
        !dev.stats().connected
    })
    .await;
    let error = dev.stats().last_error.unwrap_or_default();
    assert!(error.contains("nothing from the server"), "{error}");
}

fn meter_point(i: u64) -> Point {
    Point {
        metric: MetricName::new("flow").unwrap(),
        time_us: 1_000 + i as i64,
        value: Value::Double(i as f64),
    }
}

/// Datagrams the server sends per message to a device sending a message every [`INTERVAL`]
/// without waiting for it, with ack coalescing `batches` (1 = none) and a long delay; and the
/// points the server stored once the device flushed.
async fn server_datagrams_per_message(batches: u32) -> (f64, usize) {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "meter-1").await;
    let relay = UdpRelay::start(ts.address.addr).await;
    let mut config = ts.device_config("meter-1", &token);
    config.server.addr = relay.addr;
    config.telemetry_ack_delay = Duration::from_secs(4);
    config.telemetry_ack_batches = batches;
    let dev = DeviceClient::connect(config).await.unwrap();
    // the handshake's packets and path-MTU probes are over once a first message is acked
    dev.send(vec![meter_point(0)]).await.unwrap();
    dev.flush(WAIT).await.unwrap();
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.tick().await;
    let before = relay.to_client();
    for i in 1..=MESSAGES {
        ticker.tick().await;
        dev.send(vec![meter_point(i)]).await.unwrap();
    }
    // one interval for the last message to be sealed, sent and stored
    ticker.tick().await;
    let sent = relay.to_client() - before;
    dev.flush(WAIT).await.unwrap();
    let stored = stored_points(&op, &DeviceId::new("meter-1").unwrap()).await;
    dev.close().await;
    (sent as f64 / MESSAGES as f64, stored.len())
}

/// Ack coalescing: a device that lets the server hold its acks up to 3 batches gets one packet
/// for three messages (the ack, carrying the QUIC ACK of the three); acking every batch, one
/// packet per message. Every point is stored either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_one_ack_for_three_messages() {
    let (coalesced, stored) = server_datagrams_per_message(3).await;
    assert_eq!(stored, MESSAGES as usize + 1);
    let (every, stored) = server_datagrams_per_message(1).await;
    assert_eq!(stored, MESSAGES as usize + 1);
    assert!(
        coalesced <= 0.5,
        "{coalesced} server datagrams per message with acks coalesced by 3"
    );
    assert!(
        every >= 0.9,
        "{every} server datagrams per message with every batch acked"
    );
}

/// A provisioned device, connected, that lets the server hold its acks as long as it may (the
/// server caps a 10 s delay at half its heartbeat interval, 5 s) with no batch bound.
async fn holding_device(
    ts: &TestServer,
    op: &OperatorClient,
    name: &str,
) -> (DeviceId, DeviceClient) {
    let token = provision(op, name).await;
    let mut config = ts.device_config(name, &token);
    config.telemetry_ack_delay = Duration::from_secs(10);
    config.telemetry_ack_batches = 1_000;
    let dev = DeviceClient::connect(config).await.unwrap();
    (DeviceId::new(name).unwrap(), dev)
}

/// Ack coalescing with a long delay and no batch bound: the first ack of a session is not held;
/// later ones are, and go at once when the device flushes (a batch sealed by the flush asks for
/// it; with nothing left to seal, a heartbeat does), when the server sends the device anything
/// else, or at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_ack_goes_at_a_flush_with_another_frame_or_at_its_deadline() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let (id, dev) = holding_device(&ts, &op, "meter-2").await;
    let acked = |n: u64| {
        let mut settled = dev.settled_points();
        async move {
            tokio::time::timeout(Duration::from_secs(2), settled.wait_for(|s| *s >= n))
                .await
                .is_ok()
        }
    };
    let stored = |n: usize| {
        let (op, id) = (&op, &id);
        move || async move { stored_points(op, id).await.len() >= n }
    };

    // The session's first ack goes at once.
    dev.send(vec![meter_point(1)]).await.unwrap();
    assert!(acked(1).await, "the session's first ack was held");

    // A flush seals the point into a batch that asks to be acked at once.
    dev.send(vec![meter_point(2)]).await.unwrap();
    dev.flush(Duration::from_secs(2)).await.unwrap();

    // Sealed by the linger, sent, stored: its ack is held...
    dev.send(vec![meter_point(3)]).await.unwrap();
    eventually(WAIT, "the third point stored", stored(3)).await;
    assert_eq!(dev.stats().points_acked, 2, "the third ack is held");
    // ...until a flush with nothing left to seal asks for it.
    dev.flush(Duration::from_secs(2)).await.unwrap();
    assert_eq!(dev.stats().points_acked, 3);

    // A held ack rides in front of any other frame: here the answer to a twin report.
    dev.send(vec![meter_point(4)]).await.unwrap();
    eventually(WAIT, "the fourth point stored", stored(4)).await;
    assert_eq!(dev.stats().points_acked, 3, "the fourth ack is held");
    dev.report(json!({"firmware": "1.2"})).await.unwrap();
    assert!(
        acked(4).await,
        "the fourth point was not acked with the report's answer"
    );

    // Otherwise it goes at its deadline, the server's cap of 5 s after the batch was stored.
    let sent = tokio::time::Instant::now();
    dev.send(vec![meter_point(5)]).await.unwrap();
    eventually(WAIT, "the fifth point stored", stored(5)).await;
    let mut settled = dev.settled_points();
    tokio::time::timeout(WAIT, settled.wait_for(|s| *s >= 5))
        .await
        .expect("the held ack never came")
        .unwrap();
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "acked {waited:?} after the send, before the held ack's deadline"
    );

    dev.close().await;
}

/// A graceful shutdown delivers a held ack: the device learns that its last batch is stored
/// before the server goes, not at the next server's Welcome (the server used to close every
/// connection before the kicked sessions' writers ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_sends_the_held_ack() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let (id, dev) = holding_device(&ts, &op, "meter-4").await;
    // the session's first ack is not held
    dev.send(vec![meter_point(1)]).await.unwrap();
    dev.flush(WAIT).await.unwrap();
    dev.send(vec![meter_point(2)]).await.unwrap();
    eventually(WAIT, "the second point stored", || {
        let (op, id) = (&op, &id);
        async move { stored_points(op, id).await.len() >= 2 }
    })
    .await;
    assert_eq!(dev.stats().points_acked, 1, "the second ack is held");
    drop(op);

    let TestServer {
        server, dir: _dir, ..
    } = ts;
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    // The server is gone: the ack can only be one it sent before it went.
    let mut settled = dev.settled_points();
    let acked = tokio::time::timeout(Duration::from_secs(2), settled.wait_for(|s| *s >= 2)).await;
    assert!(
        acked.is_ok(),
        "the held ack was not sent before the server stopped: {:?}",
        dev.stats()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    // The device is trying to reconnect to a server that does not answer: a close ends the
    // attempt rather than waiting out its 15 s connect timeout.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), dev.close())
            .await
            .is_ok(),
        "close waited for the reconnect attempt"
    );
}

/// Ack coalescing never makes a sender wait for a held ack: a batch sealed while the send buffer
/// is half full asks to be acked at once. With a 4-point buffer, a 10 s delay and no batch bound,
/// 40 points sent one at a time go through in well under one delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_a_half_full_buffer_gets_its_acks_at_once() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "meter-3").await;
    let mut config = ts.device_config("meter-3", &token);
    config.max_buffered_points = 4;
    config.telemetry_ack_delay = Duration::from_secs(10);
    config.telemetry_ack_batches = 1_000;
    let dev = DeviceClient::connect(config).await.unwrap();
    let sends = async {
        for i in 1..=40 {
            dev.send(vec![meter_point(i)]).await.unwrap();
        }
        dev.flush(WAIT).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(4), sends)
        .await
        .expect("the sender waited for held acks");
    let stored = stored_points(&op, &DeviceId::new("meter-3").unwrap()).await;
    assert_eq!(stored.len(), 40);
    dev.close().await;
}
