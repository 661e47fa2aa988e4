//! The SDK seen from a scripted server: a QUIC endpoint that speaks the device protocol of
//! docs/protocol.md (Welcome, acks), records every heartbeat the device sends and counts the
//! server's own datagrams, which the real server does not expose. When the SDK sends heartbeats,
//! and what the ACK delay a device asks of the server (`DeviceConfig::ack_delay`) saves.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

use std::sync::Arc;
use std::time::Duration;

use fleetlink_client::{
    DEVICE_ACK_DELAY, DeviceClient, DeviceConfig, DeviceId, MetricName, Point, ServerAddress, Value,
};
use fleetlink_proto::v1::{
    self, ClientControl, ServerControl, StreamHeader, TelemetryBatch, client_control,
    server_control,
};
use fleetlink_transport::{FrameReader, write_frame};
use tokio::sync::mpsc;
use tokio::time::Instant;

const INTERVAL: Duration = Duration::from_millis(300);

/// A server endpoint with a fresh self-signed certificate for `localhost`.
fn scripted_endpoint() -> (quinn::Endpoint, ServerAddress) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let mut tls =
        rustls::ServerConfig::builder_with_provider(fleetlink_transport::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
    tls.alpn_protocols = vec![fleetlink_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint =
        fleetlink_transport::server_endpoint(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let address = ServerAddress {
        addr: endpoint.local_addr().unwrap(),
        server_name: "localhost".into(),
        ca_pem: cert.cert.pem().into_bytes(),
    };
    (endpoint, address)
}

/// Serves one device connection: Welcome, then an ack for every batch, `store_time` after the
/// batch arrived (as a store would take to make it durable). Sends the connection to `accepted`
/// and the time of every heartbeat the device sends to `heartbeats`.
async fn serve_one(
    endpoint: quinn::Endpoint,
    store_time: Duration,
    accepted: mpsc::UnboundedSender<quinn::Connection>,
    heartbeats: mpsc::UnboundedSender<Instant>,
) {
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let _ = accepted.send(conn.clone());
    let (mut send, recv) = conn.accept_bi().await.unwrap();
    let mut control = FrameReader::new(recv, 1 << 20);
    let hello = control.read::<ClientControl>().await.unwrap().unwrap();
    assert!(matches!(
        hello.msg,
        Some(client_control::Msg::Hello(v1::Hello { .. }))
    ));
    let welcome = v1::Welcome {
        protocol_version: 1,
        session_id: "1".into(),
        heartbeat_interval_ms: INTERVAL.as_millis() as u32,
        heartbeat_timeout_ms: 10_000,
        max_frame_bytes: 1 << 20,
        max_batch_points: 1_000,
        last_stored_seq: 0,
        server_time_us: 0,
    };
    let frame = |msg| ServerControl { msg: Some(msg) };
    write_frame(&mut send, &frame(server_control::Msg::Welcome(welcome)))
        .await
        .unwrap();
    // Acks go through the control stream's one writer.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        while let Some(seq) = ack_rx.recv().await {
            let ack = frame(server_control::Msg::Ack(v1::TelemetryAck { seq }));
            if write_frame(&mut send, &ack).await.is_err() {
                return;
            }
        }
    });
    let telemetry = conn.clone();
    tokio::spawn(async move {
        let Ok(stream) = telemetry.accept_uni().await else {
            return;
        };
        let mut stream = FrameReader::new(stream, 1 << 20);
        let header = stream.read::<StreamHeader>().await.unwrap().unwrap();
        assert_eq!(header.kind, i32::from(v1::StreamKind::Telemetry));
        while let Ok(Some(batch)) = stream.read::<TelemetryBatch>().await {
            tokio::time::sleep(store_time).await;
            let _ = ack_tx.send(batch.seq);
        }
    });
    while let Ok(Some(m)) = control.read::<ClientControl>().await {
        if let Some(client_control::Msg::Heartbeat(_)) = m.msg {
            let _ = heartbeats.send(Instant::now());
        }
    }
}

fn point(k: i64) -> Point {
    Point {
        metric: MetricName::new("speed").unwrap(),
        time_us: 1_700_000_000_000_000 + k,
        value: Value::Double(k as f64),
    }
}

/// An acked batch is "seen" by the server (protocol §6): while telemetry is acked more often than
/// the heartbeat interval, the device sends no heartbeat; once it goes quiet, heartbeats resume.
#[tokio::test]
async fn a_device_streaming_telemetry_sends_no_heartbeats_until_it_goes_quiet() {
    let (endpoint, address) = scripted_endpoint();
    let (hb_tx, mut hb_rx) = mpsc::unbounded_channel();
    let (conn_tx, _conn_rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(serve_one(endpoint, Duration::ZERO, conn_tx, hb_tx));
    let mut config = DeviceConfig::new(address, DeviceId::new("truck-1").unwrap(), "token");
    config.linger = Duration::from_millis(5);
    let device = DeviceClient::connect(config).await.unwrap();

    // Six heartbeat intervals of telemetry, a batch every quarter interval, each one acked.
    let streaming = Instant::now();
    let mut k = 0;
    while streaming.elapsed() < INTERVAL * 6 {
        device.send(vec![point(k)]).await.unwrap();
        device.flush(Duration::from_secs(5)).await.unwrap();
        k += 1;
        tokio::time::sleep(INTERVAL / 4).await;
    }
    let quiet = Instant::now();
    assert!(
        hb_rx.try_recv().is_err(),
        "a heartbeat while {k} batches were acked within every interval"
    );

    // Quiet: the next heartbeat is due one interval after the last ack.
    let heartbeat = tokio::time::timeout(Duration::from_secs(5), hb_rx.recv())
        .await
        .expect("no heartbeat after the device went quiet")
        .unwrap();
    assert!(
        heartbeat.duration_since(quiet) <= INTERVAL * 2,
        "first heartbeat {:?} after the last batch",
        heartbeat.duration_since(quiet)
    );
    device.close().await;
    let _ = server.await;
}

/// Longer than QUIC's default ACK delay (25 ms), shorter than a device's default request.
const SLOW_STORE: Duration = Duration::from_millis(60);
/// Messages a device sends, one every [`MESSAGE_INTERVAL`].
const MESSAGES: u64 = 10;
const MESSAGE_INTERVAL: Duration = Duration::from_millis(200);

/// Datagrams per message the server sends to a device that asks for `ack_delay` and sends a
/// message every [`MESSAGE_INTERVAL`], each acked as stored [`SLOW_STORE`] after it arrived.
///
/// Tail-loss probes are left out of the count: the server sends one when the device's ACK of the
/// stored-ack is later than the server's probe timeout (a few ms above the device's own 25 ms ACK
/// delay), which happens when the test machine starves the device of CPU, not because of how the
/// server acknowledges. The peer supports ACK frequency, so each such probe carries an
/// IMMEDIATE_ACK frame, as does each path-MTU probe, which the path counts on its own.
async fn server_datagrams_per_message(ack_delay: Duration) -> f64 {
    let (endpoint, address) = scripted_endpoint();
    let (hb_tx, _hb_rx) = mpsc::unbounded_channel();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(serve_one(endpoint, SLOW_STORE, conn_tx, hb_tx));
    let mut config = DeviceConfig::new(address, DeviceId::new("truck-1").unwrap(), "token");
    config.ack_delay = ack_delay;
    // the QUIC ACK delay alone: ack coalescing would stretch it (see the next test)
    config.telemetry_ack_batches = 1;
    let device = DeviceClient::connect(config).await.unwrap();
    let conn = conn_rx.recv().await.unwrap();
    let send = |k: i64| {
        let device = &device;
        async move {
            device.send(vec![point(k)]).await.unwrap();
            device.flush(Duration::from_secs(5)).await.unwrap();
        }
    };
    // the handshake's packets and path-MTU probes are over once a first message is acked
    send(0).await;
    let mut ticker = tokio::time::interval(MESSAGE_INTERVAL);
    ticker.tick().await;
    let before = conn.stats();
    for k in 1..=MESSAGES as i64 {
        ticker.tick().await;
        send(k).await;
    }
    let after = conn.stats();
    device.close().await;
    let _ = server.await;
    let sent = after.udp_tx.datagrams - before.udp_tx.datagrams;
    let immediate_acks = after.frame_tx.immediate_ack - before.frame_tx.immediate_ack;
    let mtu_probes = after.path.sent_plpmtud_probes - before.path.sent_plpmtud_probes;
    let loss_probes = immediate_acks.saturating_sub(mtu_probes);
    (sent - loss_probes) as f64 / MESSAGES as f64
}

/// A server that takes longer than QUIC's default ACK delay to ack a batch as stored: a device
/// asking for its default ACK delay gets the ACK of its packet in the stored-ack's packet, one
/// datagram per message; a device asking for nothing gets an ACK-only datagram first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_acknowledges_a_message_in_its_stored_ack() {
    assert!(DEVICE_ACK_DELAY > SLOW_STORE * 2);
    let with = server_datagrams_per_message(DEVICE_ACK_DELAY).await;
    let without = server_datagrams_per_message(Duration::ZERO).await;
    assert!(
        with <= 1.2,
        "{with} server datagrams per message to a device asking for {DEVICE_ACK_DELAY:?}"
    );
    assert!(
        without >= 1.8,
        "{without} server datagrams per message to a device asking for nothing"
    );
}

/// The ACK delay a device may ask for is bounded: a longer one would hold off the resending of a
/// lost message for as long.
#[tokio::test]
async fn an_ack_delay_above_ten_seconds_is_refused() {
    let (_endpoint, address) = scripted_endpoint();
    let mut config = DeviceConfig::new(address, DeviceId::new("truck-1").unwrap(), "token");
    config.ack_delay = Duration::from_secs(11);
    let err = DeviceClient::connect(config).await.unwrap_err();
    assert!(err.to_string().contains("ack_delay"), "{err}");
}
