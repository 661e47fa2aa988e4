//! The server end to end: real QUIC on 127.0.0.1, real SQLite in a temporary directory.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

mod common;

use std::time::Duration;

use common::*;
use fleetlink_client::{
    ColumnValues, DeviceClient, DeviceConfig, DeviceId, Endpoint, MetricName, Point,
    TelemetryQuery, Value,
};
use fleetlink_proto::v1::{
    self, ErrorCode, RejectReason, StreamHeader, StreamKind, server_control,
};
use fleetlink_transport::write_frame;

fn point(metric: &str, time_us: i64, value: Value) -> Point {
    Point {
        metric: MetricName::new(metric).unwrap(),
        time_us,
        value,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_every_point_is_stored_exactly_once() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let endpoint = Endpoint::for_server(ts.address.addr).unwrap();
    const DEVICES: usize = 200;
    const POINTS: i64 = 60;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = format!("dev-{i:03}");
        let token = provision(&op, &id).await;
        let mut config = ts.device_config(&id, &token);
        config.endpoint = Some(endpoint.clone());
        config.max_batch_points = 7; // many batches per device
        devices.push(DeviceClient::connect(config).await.unwrap());
    }
    let tasks: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(d, dev)| {
            tokio::spawn(async move {
                for chunk in 0..(POINTS / 6) {
                    let points = (0..6)
                        .map(|k| {
                            let t = chunk * 6 + k;
                            point("reading", 1_000 + t, Value::Int(d as i64 * 1_000_000 + t))
                        })
                        .collect();
                    dev.send(points).await.unwrap();
                }
                dev.flush(Duration::from_secs(30)).await.unwrap();
                dev
            })
        })
        .collect();
    let mut devices = Vec::new();
    for t in tasks {
        devices.push(t.await.unwrap());
    }

    for (d, dev) in devices.iter().enumerate() {
        assert_eq!(dev.stats().points_acked, POINTS as u64);
        let got = stored_points(&op, dev.id()).await;
        let want: Vec<(i64, Value)> = (0..POINTS)
            .map(|t| (1_000 + t, Value::Int(d as i64 * 1_000_000 + t)))
            .collect();
        assert_eq!(got, want, "device {}", dev.id());
    }
    let listed = op.list_devices(None, None).await.unwrap();
    assert_eq!(listed.len(), DEVICES);
    assert!(
        listed
            .iter()
            .all(|d| d.presence.online && d.last_values.len() == 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_goes_offline_on_disconnect_and_on_heartbeat_timeout() {
    let ts = start(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 600;
    });
    let op = ts.operator().await;
    let a = connect_device(&ts, &op, "truck-a").await;
    a.send(vec![point("fuel", 1, Value::Double(0.5))])
        .await
        .unwrap();
    a.flush(Duration::from_secs(10)).await.unwrap();
    let id_a = DeviceId::new("truck-a").unwrap();
    let info = op.device(&id_a).await.unwrap();
    assert!(info.presence.online);
    assert!(info.presence.remote_addr.starts_with("127.0.0.1:"));
    assert_eq!(
        info.last_values,
        vec![(MetricName::new("fuel").unwrap(), 1, Value::Double(0.5))]
    );

    a.close().await;
    eventually(
        Duration::from_secs(10),
        "truck-a offline after close",
        || async {
            let p = op.device(&id_a).await.unwrap().presence;
            !p.online && p.offline_reason == "closed"
        },
    )
    .await;

    // A device that authenticates, then never sends a heartbeat (QUIC keep-alives keep the link up).
    let token = provision(&op, "silent").await;
    let raw = raw_connect(&ts, device_hello("silent", &token)).await;
    assert!(matches!(
        raw.first,
        Some(v1::ServerControl {
            msg: Some(server_control::Msg::Welcome(_))
        })
    ));
    let id_s = DeviceId::new("silent").unwrap();
    assert!(op.device(&id_s).await.unwrap().presence.online);
    let (code, message) = close_code(&raw.conn).await;
    assert_eq!(code, ErrorCode::HeartbeatTimeout, "{message}");
    let p = op.device(&id_s).await.unwrap().presence;
    assert!(!p.online);
    assert_eq!(p.offline_reason, "timeout");

    // The actor checks heartbeats only while its device is online; the check stopped when
    // "silent" went offline and must start again when it comes back.
    let again = raw_connect(&ts, device_hello("silent", &token)).await;
    assert!(matches!(
        again.first,
        Some(v1::ServerControl {
            msg: Some(server_control::Msg::Welcome(_))
        })
    ));
    assert!(op.device(&id_s).await.unwrap().presence.online);
    let (code, message) = close_code(&again.conn).await;
    assert_eq!(code, ErrorCode::HeartbeatTimeout, "{message}");
    assert!(!op.device(&id_s).await.unwrap().presence.online);
}

/// `disconnect` returns only once the client is closed: a send right after it fails with
/// `Closed` rather than slipping into the closing engine's queue (it sometimes did: the engine
/// answered the disconnect before it closed its send buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_right_after_disconnect_is_refused_as_closed() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    for i in 0..30 {
        let device = connect_device(&ts, &op, &format!("truck-{i}")).await;
        device
            .send(vec![point("fuel", 1, Value::Double(0.5))])
            .await
            .unwrap();
        device.disconnect().await;
        let sent = device
            .send(vec![point("fuel", 2, Value::Double(0.25))])
            .await;
        assert!(
            matches!(sent, Err(fleetlink_client::ClientError::Closed(_))),
            "send after disconnect (device {i}): {sent:?}"
        );
        let tried = device.try_send(vec![point("fuel", 3, Value::Double(0.125))]);
        assert!(
            matches!(tried, Err(fleetlink_client::ClientError::Closed(_))),
            "try_send after disconnect (device {i}): {tried:?}"
        );
    }
}

/// An idle operator session outlives the server's QUIC idle timeout (twice its heartbeat timeout)
/// whatever that is: the SDK sends heartbeats at the Welcome's interval. It used to send QUIC
/// keep-alives every 5 s, and a server with a heartbeat timeout under 2.5 s closed the idle
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_operator_session_stays_open_past_the_idle_timeout() {
    let ts = start(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 250; // the server's QUIC idle timeout is twice this: 500 ms
    });
    let op = ts.operator().await;
    let idle = Duration::from_millis(2 * 250);
    if let Ok(error) = tokio::time::timeout(4 * idle, op.closed()).await {
        panic!("the idle operator session ended: {error}");
    }
    assert!(op.list_devices(None, None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_unknown_device_and_wrong_version_are_rejected_each_with_its_reason() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    provision(&op, "gate-1").await;

    let err = DeviceClient::connect(ts.device_config("gate-1", "not-the-token"))
        .await
        .unwrap_err();
    let (reason, message) = rejected(err);
    assert_eq!(reason, RejectReason::BadToken);
    assert!(
        message.contains("wrong token for device \"gate-1\""),
        "{message}"
    );

    let err = DeviceClient::connect(ts.device_config("gate-9", "whatever"))
        .await
        .unwrap_err();
    let (reason, message) = rejected(err);
    assert_eq!(reason, RejectReason::UnknownDevice);
    assert!(message.contains("fleetlink device add gate-9"), "{message}");

    let mut hello = device_hello("gate-1", "whatever");
    hello.protocol_version = 99;
    let raw = raw_connect(&ts, hello).await;
    match raw.first.and_then(|f| f.msg) {
        Some(server_control::Msg::Reject(r)) => {
            assert_eq!(r.reason(), RejectReason::UnsupportedVersion);
            assert_eq!(r.supported_versions, vec![1]);
            assert!(r.message.contains("protocol version 99"), "{}", r.message);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }

    let err = fleetlink_client::OperatorClient::connect(fleetlink_client::OperatorConfig {
        server: ts.address.clone(),
        token: "guess".into(),
    })
    .await
    .unwrap_err();
    assert_eq!(rejected(err).0, RejectReason::BadToken);
}

/// Opens a telemetry stream on a raw connection and writes `bytes` on it.
async fn raw_telemetry(raw: &common::RawClient, bytes: &[u8]) -> quinn::SendStream {
    let mut s = raw.conn.open_uni().await.unwrap();
    write_frame(
        &mut s,
        &StreamHeader {
            kind: StreamKind::Telemetry.into(),
        },
    )
    .await
    .unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

fn batch_frame(seq: u64, points: Vec<Point>) -> Vec<u8> {
    let b = v1::TelemetryBatch {
        ack_now: false,
        seq,
        points: points.iter().map(Point::to_proto).collect(),
    };
    fleetlink_proto::encoded_frame(&b).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_the_offending_connection() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let good = connect_device(&ts, &op, "good").await;
    good.send(vec![point("t", 1, Value::Double(1.0))])
        .await
        .unwrap();
    good.flush(Duration::from_secs(10)).await.unwrap();

    let mut cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        (
            "garbage",
            vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
            ErrorCode::MalformedFrame,
            "malformed TelemetryBatch",
        ),
        (
            "oversize",
            (2u32 << 20).to_be_bytes().to_vec(),
            ErrorCode::FrameTooLarge,
            "exceeds the maximum",
        ),
        (
            "nan",
            batch_frame(1, vec![point("t", 1, Value::Double(f64::NAN))]),
            ErrorCode::InvalidValue,
            "not a finite number",
        ),
    ];
    let mut typed = batch_frame(1, vec![point("t", 1, Value::Double(1.0))]);
    typed.extend(batch_frame(
        2,
        vec![point("t", 2, Value::String("hot".into()))],
    ));
    // read (and handed to the actor) before the session closes, and refused with it
    typed.extend(batch_frame(3, vec![point("t", 3, Value::Double(3.0))]));
    cases.push((
        "wrongtype",
        typed,
        ErrorCode::InvalidValue,
        "metric t holds double values, got string",
    ));
    let mut backwards = batch_frame(5, vec![point("t", 1, Value::Double(1.0))]);
    backwards.extend(batch_frame(4, vec![point("t", 2, Value::Double(2.0))]));
    backwards.extend(batch_frame(6, vec![point("t", 3, Value::Double(3.0))]));
    cases.push((
        "backwards",
        backwards,
        ErrorCode::SequenceRegression,
        "not above the previous batch 5",
    ));

    for (name, bytes, want_code, want_message) in cases {
        let token = provision(&op, name).await;
        let raw = raw_connect(&ts, device_hello(name, &token)).await;
        let _stream = raw_telemetry(&raw, &bytes).await;
        let (code, message) = close_code(&raw.conn).await;
        assert_eq!(code, want_code, "{name}: {message}");
        assert!(message.contains(want_message), "{name}: {message}");
        // the good device keeps streaming, and everything it sends is stored
        good.send(vec![point(
            "t",
            100 + name.len() as i64,
            Value::Double(2.0),
        )])
        .await
        .unwrap();
        good.flush(Duration::from_secs(10)).await.unwrap();
    }
    assert!(good.stats().connected);
    assert_eq!(good.stats().connects, 1);
    let stored = op
        .query_telemetry(TelemetryQuery::all(DeviceId::new("good").unwrap()))
        .await
        .unwrap();
    assert_eq!(stored.len(), 6);
    // The first, valid batch of "wrongtype" and "backwards" was stored before their second was
    // refused; nothing after the refused one was, though it was on the stream behind it.
    for name in ["wrongtype", "backwards"] {
        let stored = stored_points(&op, &DeviceId::new(name).unwrap()).await;
        assert_eq!(stored.len(), 1, "{name}: {stored:?}");
        assert_eq!(stored[0].0, 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_resends_only_what_was_not_stored() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "resender").await;
    // batches 1 and 2 by hand, then a new connection (like a device that restarted)
    let raw = raw_connect(&ts, device_hello("resender", &token)).await;
    let mut bytes = batch_frame(1, vec![point("x", 1, Value::Int(1))]);
    bytes.extend(batch_frame(2, vec![point("x", 2, Value::Int(2))]));
    let mut s = raw_telemetry(&raw, &bytes).await;
    s.finish().unwrap();
    let mut raw = raw;
    // wait for the cumulative ack of batch 2
    loop {
        match raw
            .reader
            .read::<v1::ServerControl>()
            .await
            .unwrap()
            .and_then(|f| f.msg)
        {
            Some(server_control::Msg::Ack(a)) if a.seq >= 2 => break,
            Some(_) => continue,
            None => panic!("control stream ended before the ack"),
        }
    }
    let sdk = DeviceClient::connect(DeviceConfig::new(
        ts.address.clone(),
        DeviceId::new("resender").unwrap(),
        token,
    ))
    .await
    .unwrap();
    assert_eq!(
        sdk.stats().acked_seq,
        2,
        "the Welcome announces the stored watermark"
    );
    sdk.send(vec![point("x", 3, Value::Int(3))]).await.unwrap();
    sdk.flush(Duration::from_secs(10)).await.unwrap();
    assert_eq!(sdk.stats().acked_seq, 3);
    let stored = op
        .query_telemetry(TelemetryQuery::all(DeviceId::new("resender").unwrap()))
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|p| p.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // the older raw connection was replaced by the SDK's
    let (code, _) = close_code(&raw.conn).await;
    assert_eq!(code, ErrorCode::Replaced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_refuses_bad_points_and_drops_a_batch_the_server_refused() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "typed").await;
    let first = DeviceClient::connect(ts.device_config("typed", &token))
        .await
        .unwrap();
    first
        .send(vec![point("level", 1, Value::Double(0.5))])
        .await
        .unwrap();
    first.flush(Duration::from_secs(10)).await.unwrap();
    // caught in the SDK, before anything is buffered
    let e = first
        .send(vec![point("level", 2, Value::String("high".into()))])
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("metric level holds double values, got string"),
        "{e}"
    );
    let e = first
        .send(vec![point("temp", 2, Value::Double(f64::INFINITY))])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a finite number"), "{e}");
    first.close().await;

    // A restarted device does not know the stored types: the server refuses the batch, the SDK
    // drops it (counted), reconnects and goes on instead of resending it forever.
    let second = DeviceClient::connect(ts.device_config("typed", &token))
        .await
        .unwrap();
    second
        .send(vec![point("level", 3, Value::String("high".into()))])
        .await
        .unwrap();
    second.flush(Duration::from_secs(10)).await.unwrap();
    second
        .send(vec![point("level", 4, Value::Double(0.7))])
        .await
        .unwrap();
    second.flush(Duration::from_secs(10)).await.unwrap();
    let stats = second.stats();
    assert_eq!(stats.points_rejected, 1);
    assert_eq!(stats.connects, 2);
    assert!(stats.last_error.unwrap().contains("INVALID_VALUE"));
    let stored = op
        .query_telemetry(TelemetryQuery::all(DeviceId::new("typed").unwrap()))
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|p| p.value.clone()).collect::<Vec<_>>(),
        vec![Value::Double(0.5), Value::Double(0.7)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_pages_carry_the_points_of_the_row_form() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let dev = connect_device(&ts, &op, "logger").await;
    // 70,000 doubles: three column pages; ints, bools and strings alongside
    for b in 0..70i64 {
        let mut points: Vec<Point> = (0..1_000)
            .map(|k| {
                let t = 1_700_000_000_000_000 + (b * 1_000 + k) * 1_000;
                point("volts", t, Value::Double((b * 1_000 + k) as f64 / 4.0))
            })
            .collect();
        let t = 1_700_000_000_000_000 + b;
        points.push(point("count", t, Value::Int(-b)));
        points.push(point("open", t, Value::Bool(b % 3 == 0)));
        points.push(point("state", t, Value::String(format!("s{b}"))));
        dev.send(points).await.unwrap();
    }
    dev.flush(Duration::from_secs(30)).await.unwrap();
    let all = TelemetryQuery::all(DeviceId::new("logger").unwrap());
    let rows = op.query_telemetry(all.clone()).await.unwrap();
    assert_eq!(rows.len(), 70_210);
    let pages = op.query_telemetry_columns(all.clone()).await.unwrap();
    let volts_pages = pages
        .iter()
        .filter(|p| p.metric.as_str() == "volts")
        .count();
    assert_eq!(volts_pages, 3, "32768 points per page");
    assert!(
        pages
            .iter()
            .any(|p| matches!(p.values, ColumnValues::Int(_)))
    );
    assert!(
        pages
            .iter()
            .any(|p| matches!(p.values, ColumnValues::Bool(_)))
    );
    assert!(
        pages
            .iter()
            .any(|p| matches!(p.values, ColumnValues::Other(_)))
    );
    let flat: Vec<(String, i64, Value)> = pages
        .iter()
        .flat_map(|p| {
            let values: Vec<Value> = match &p.values {
                ColumnValues::Double(v) => v.iter().map(|&x| Value::Double(x)).collect(),
                ColumnValues::Int(v) => v.iter().map(|&x| Value::Int(x)).collect(),
                ColumnValues::Bool(v) => v.iter().map(|&x| Value::Bool(x)).collect(),
                ColumnValues::Other(v) => v.clone(),
            };
            p.time_us
                .iter()
                .zip(values)
                .map(|(t, v)| (p.metric.as_str().to_owned(), *t, v))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: Vec<(String, i64, Value)> = rows
        .iter()
        .map(|p| (p.metric.as_str().to_owned(), p.time_us, p.value.clone()))
        .collect();
    assert!(
        flat == expected,
        "the column form differs from the row form"
    );

    // a range and a limit apply to columns as to rows
    let some = TelemetryQuery {
        metric: Some(MetricName::new("volts").unwrap()),
        start_us: Some(1_700_000_000_000_000 + 5_000),
        limit: Some(10),
        ..all.clone()
    };
    let pages = op.query_telemetry_columns(some.clone()).await.unwrap();
    let rows = op.query_telemetry(some).await.unwrap();
    assert_eq!(pages.len(), 1);
    assert_eq!(
        pages[0].time_us,
        rows.iter().map(|p| p.time_us).collect::<Vec<_>>()
    );
    assert_eq!(pages[0].time_us.len(), 10);
    // nothing in range: no pages
    let none = TelemetryQuery {
        start_us: Some(1),
        end_us: Some(2),
        ..all.clone()
    };
    assert!(op.query_telemetry_columns(none).await.unwrap().is_empty());
    // downsampling has no column form
    let e = op
        .query_telemetry_columns(TelemetryQuery {
            every: Some(Duration::from_secs(1)),
            ..all
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("columns are for raw points"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_control_message_closes_only_that_connection() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "odd").await;
    let mut raw = raw_connect(&ts, device_hello("odd", &token)).await;
    // a ClientControl whose oneof is empty: what an unknown (newer) message looks like to this server
    write_frame(&mut raw.control, &v1::ClientControl { msg: None })
        .await
        .unwrap();
    let (code, message) = close_code(&raw.conn).await;
    assert_eq!(code, ErrorCode::UnknownMessage, "{message}");
    // the server still serves everyone else
    let other = connect_device(&ts, &op, "other").await;
    other
        .send(vec![point("t", 1, Value::Int(1))])
        .await
        .unwrap();
    other.flush(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_certificate_is_used_instead_of_a_development_one() {
    // A first server makes a CA and a certificate; a second one is configured with them.
    let issuer = start(|_| {});
    let tls = issuer.dir.path().join("tls");
    let ts = start_trusting(Some(&tls.join("ca.pem")), |c| {
        c.cert = Some(tls.join("server.pem"));
        c.key = Some(tls.join("server.key"));
    });
    assert!(
        ts.server.ca_cert_path().is_none(),
        "no development CA when a certificate is configured"
    );
    assert!(!ts.dir.path().join("tls").exists());
    let op = ts.operator().await; // trusts the first server's CA
    provision(&op, "cert-ok").await;
    assert_eq!(op.list_devices(None, None).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_points_counts_every_acked_point_in_send_order() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "settler").await;
    let mut config =
        DeviceConfig::new(ts.address.clone(), DeviceId::new("settler").unwrap(), token);
    config.max_batch_points = 7; // several batches, acked one by one
    let sdk = DeviceClient::connect(config).await.unwrap();
    let mut settled = sdk.settled_points();
    assert_eq!(*settled.borrow_and_update(), 0);
    for i in 0..50 {
        sdk.send(vec![point("x", i, Value::Int(i))]).await.unwrap();
    }
    sdk.flush(Duration::from_secs(10)).await.unwrap();
    // flush returns once the last batch is acked; the count follows in the same step
    let n = *settled
        .wait_for(|n| *n >= 50)
        .await
        .expect("the client is alive");
    assert_eq!(n, 50, "exactly the points sent, never more");
    assert_eq!(sdk.stats().points_acked, 50);
}

/// Polls `f` once: its output if it is ready without waiting.
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// quinn keeps state for every stream a peer may open and most connections are idle devices, so
/// a device may open its control stream and two telemetry streams; an operator gets 64 request
/// streams once its Hello is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_may_open_their_own_streams_operators_many() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "tag-1").await;
    let device = raw_connect(&ts, device_hello("tag-1", &token)).await;
    assert!(matches!(
        device.first.as_ref().and_then(|f| f.msg.as_ref()),
        Some(server_control::Msg::Welcome(_))
    ));
    assert!(
        ready_now(device.conn.open_bi()).is_none(),
        "a device has no second bidirectional stream"
    );
    let _telemetry = ready_now(device.conn.open_uni()).unwrap().unwrap();
    let _reopened = ready_now(device.conn.open_uni()).unwrap().unwrap();
    assert!(ready_now(device.conn.open_uni()).is_none());

    let operator = raw_connect(
        &ts,
        v1::Hello {
            role: v1::Role::Operator.into(),
            device_id: String::new(),
            ..device_hello("", &ts.admin_token)
        },
    )
    .await;
    assert!(matches!(
        operator.first.as_ref().and_then(|f| f.msg.as_ref()),
        Some(server_control::Msg::Welcome(_))
    ));
    let mut open = Vec::new();
    for _ in 1..64 {
        let stream = tokio::time::timeout(Duration::from_secs(10), operator.conn.open_bi())
            .await
            .expect("the operator's stream limit was not raised")
            .unwrap();
        open.push(stream);
    }
    assert!(ready_now(operator.conn.open_bi()).is_none());
}

/// A server that does not answer (down, or restarting) costs a connect attempt its
/// `connect_timeout`, not QUIC's idle timeout: the SDK then tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_attempt_to_a_silent_server_ends_at_connect_timeout() {
    let ts = start(|_| {});
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = ts.device_config("nobody", "token");
    config.server.addr = silent.local_addr().unwrap();
    config.connect_timeout = Duration::from_millis(300);
    let attempt = tokio::time::timeout(Duration::from_secs(10), DeviceClient::connect(config))
        .await
        .expect("the attempt outlived its connect_timeout");
    match attempt {
        Err(fleetlink_client::ClientError::Timeout(t)) => {
            assert_eq!(t, Duration::from_millis(300));
        }
        Err(other) => panic!("expected a timeout, got {other}"),
        Ok(_) => panic!("connected to a socket that never answers"),
    }
}

/// The SDK's default `connect_timeout` outlasts the server's default handshake queue wait, plus
/// the 3 s by which an attempt begun while the server was down reaches it (QUIC retransmits the
/// Initial after 1 s and 3 s), plus a second for the handshake. A client that gives up sooner leaves
/// the server handshakes to start for nobody: in session 23's 10k-device storm (5 s against 4 s),
/// 3.5k handshakes were started for clients that had gone and 900 finished for them.
#[test]
fn the_sdk_waits_longer_for_an_attempt_than_the_server_queues_it() {
    let ts = start(|_| {});
    let device = ts.device_config("any", "token");
    let server = fleetlink_server::ServerConfig::default();
    let queued = Duration::from_millis(u64::from(server.handshake_queue_ms));
    assert!(
        device.connect_timeout >= queued + Duration::from_secs(4),
        "connect_timeout {:?} against handshake_queue_ms {queued:?}",
        device.connect_timeout
    );
}

/// A client whose handshake holds one of the server's handshake slots and never finishes: a
/// relay passes its packets to the server and drops every answer. Returns once the server has
/// answered it (so it holds the slot); the handshake then lasts until `handshake_timeout_ms`, or
/// until the returned task (the relay) is aborted and the server's idle timeout passes.
async fn stall_one_handshake(ts: &TestServer) -> Stalled {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = ts.address.addr;
    let (answered_tx, answered) = tokio::sync::oneshot::channel();
    let relaying = tokio::spawn(async move {
        let mut answered_tx = Some(answered_tx);
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = relay.recv_from(&mut buf).await.unwrap();
            if from != server {
                relay.send_to(&buf[..n], server).await.unwrap();
            } else if let Some(tx) = answered_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    let stalled = fleetlink_transport::client_endpoint(relay_addr).unwrap();
    let config = fleetlink_transport::client_config(
        fleetlink_transport::roots_from_pem(&ts.address.ca_pem).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let attempt = stalled
        .connect_with(config, relay_addr, "localhost")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), answered)
        .await
        .expect("the server never answered the stalled handshake")
        .unwrap();
    Stalled {
        relaying,
        _attempt: attempt,
        _endpoint: stalled,
    }
}

/// A stalled handshake: dropping the attempt would close it (and free its slot).
struct Stalled {
    relaying: tokio::task::JoinHandle<()>,
    _attempt: quinn::Connecting,
    _endpoint: quinn::Endpoint,
}

/// Beyond `max_handshakes` handshakes in progress, an attempt waits in the handshake queue and
/// starts as soon as a slot frees (here when the stalled handshake times out), rather than being
/// refused and sent into its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_beyond_max_handshakes_waits_for_a_slot() {
    let ts = start(|c| {
        c.max_handshakes = 1;
        c.handshake_timeout_ms = 1_000;
    });
    let op = ts.operator().await;
    let token = provision(&op, "probe-1").await;
    op.close();
    let _stalled = stall_one_handshake(&ts).await;
    let mut device = ts.device_config("probe-1", &token);
    device.connect_timeout = Duration::from_secs(8);
    let client = DeviceClient::connect(device)
        .await
        .expect("the queued attempt was not served once the slot freed");
    client.close().await;
}

/// An attempt that waited `handshake_queue_ms` for a slot is refused (QUIC CONNECTION_REFUSED)
/// then and there, so its client retries after its backoff instead of running into its connect
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_waited_handshake_queue_ms_is_refused() {
    let ts = start(|c| {
        c.max_handshakes = 1;
        c.handshake_timeout_ms = 30_000;
        c.handshake_queue_ms = 200;
    });
    let op = ts.operator().await;
    let token = provision(&op, "probe-1").await;
    op.close();
    let _stalled = stall_one_handshake(&ts).await;
    let mut device = ts.device_config("probe-1", &token);
    device.connect_timeout = Duration::from_secs(20);
    match DeviceClient::connect(device).await {
        Err(e) => assert!(
            e.to_string().contains("refused to accept a new connection"),
            "expected a refusal, got {e}"
        ),
        Ok(_) => panic!("connected while the only handshake slot was taken"),
    }
}

/// With no handshake queue, an attempt beyond `max_handshakes` handshakes in progress is refused
/// at once (no cryptography); a slot frees when its handshake ends, here by timing out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_queue_attempts_beyond_max_handshakes_are_refused() {
    let ts = start(|c| {
        c.max_handshakes = 1;
        c.handshake_queue = 0;
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 500; // the server's QUIC idle timeout is twice this
    });
    let op = ts.operator().await;
    let token = provision(&op, "probe-1").await;
    op.close();
    let stalled = stall_one_handshake(&ts).await;
    let mut device = ts.device_config("probe-1", &token);
    device.connect_timeout = Duration::from_secs(2);
    match DeviceClient::connect(device.clone()).await {
        Err(e) => assert!(
            e.to_string().contains("refused to accept a new connection"),
            "expected a refusal, got {e}"
        ),
        Ok(_) => panic!("connected while the only handshake slot was taken"),
    }
    // once the relay stops, the stalled handshake times out and frees its slot
    stalled.relaying.abort();
    eventually(
        Duration::from_secs(10),
        "a connection once the slot is free",
        || async {
            match DeviceClient::connect(device.clone()).await {
                Ok(client) => {
                    client.close().await;
                    true
                }
                Err(_) => false,
            }
        },
    )
    .await;
}

/// A device reconnecting to a restarted server resumes its TLS session from the previous server
/// (a graceful shutdown saves the sessions in the data dir) and, when it asks for it, says Hello
/// in 0-RTT; when the sessions are lost the server turns 0-RTT down and the SDK says Hello again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_the_sessions_of_the_previous_one() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "truck-1").await;
    op.close();
    let mut config = ts.device_config("truck-1", &token);
    config.resumption = fleetlink_client::Resumption::ZeroRtt;
    config.backoff.initial = Duration::from_millis(20);
    config.backoff.max = Duration::from_millis(200);
    let device = DeviceClient::connect(config).await.unwrap();
    assert_eq!(device.stats().zero_rtt_connects, 0, "no ticket yet");

    let TestServer { server, dir, .. } = ts;
    let addr = server.local_addr();
    let restart = |dir: &tempfile::TempDir| {
        let mut c = fleetlink_server::ServerConfig::local(dir.path());
        c.listen = addr;
        c.arbiters = 2;
        c.io_threads = 2;
        fleetlink_server::Server::start(c).unwrap()
    };
    server.shutdown();
    let server = restart(&dir);
    eventually(Duration::from_secs(20), "a reconnect", || async {
        device.stats().connects >= 2
    })
    .await;
    let s = device.stats();
    assert_eq!(s.zero_rtt_connects, s.connects - 1, "{s:?}");

    // sessions lost (as in a crash): 0-RTT is turned down, the Hello goes again in 1-RTT
    server.shutdown();
    std::fs::remove_file(dir.path().join(fleetlink_server::SESSIONS_FILE)).unwrap();
    let _server = restart(&dir);
    let before = device.stats();
    eventually(Duration::from_secs(20), "a reconnect", || async {
        let s = device.stats();
        s.connects > before.connects && s.connected
    })
    .await;
    assert_eq!(device.stats().zero_rtt_connects, before.zero_rtt_connects);
    device
        .send(vec![point("speed", 1, Value::Double(1.0))])
        .await
        .unwrap();
    device.flush(Duration::from_secs(10)).await.unwrap();
    device.close().await;
}

/// An operator's raw `OperatorRequest`, for requests the SDK refuses to send; the answer's frames.
async fn raw_operator_request(
    ts: &TestServer,
    request: v1::operator_request::Request,
) -> Vec<v1::OperatorResponse> {
    let operator = raw_connect(
        ts,
        v1::Hello {
            role: v1::Role::Operator.into(),
            device_id: String::new(),
            ..device_hello("", &ts.admin_token)
        },
    )
    .await;
    let (mut send, recv) = operator.conn.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &v1::OperatorRequest {
            request: Some(request),
        },
    )
    .await
    .unwrap();
    send.finish().unwrap();
    let mut reader = fleetlink_transport::FrameReader::new(recv, 1 << 24);
    let mut out = Vec::new();
    while let Some(r) = reader.read::<v1::OperatorResponse>().await.unwrap() {
        out.push(r);
    }
    out
}

fn error_of(frames: &[v1::OperatorResponse]) -> (ErrorCode, String) {
    match frames {
        [
            v1::OperatorResponse {
                response: Some(v1::operator_response::Response::Error(e)),
            },
        ] => (ErrorCode::try_from(e.code).unwrap(), e.message.clone()),
        other => panic!("expected one error frame, got {other:?}"),
    }
}

/// A fleet import: every device of a request is created in one transaction, with a token that
/// connects and an actor that queries see; a request with any bad device creates none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_devices_creates_every_device_of_a_request_or_none() {
    use fleetlink_client::{ClientError, NewDeviceSpec};
    let ts = start(|_| {});
    let op = ts.operator().await;
    provision(&op, "taken").await;
    let spec = |id: &str| {
        let mut s = NewDeviceSpec::new(DeviceId::new(id).unwrap());
        s.tags.insert("batch".into(), "one".into());
        s
    };

    let err = op
        .provision_devices(vec![spec("imp-1"), spec("taken"), spec("imp-2")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Server { code: ErrorCode::AlreadyExists, message } if message.contains("taken")),
        "{err}"
    );
    let mut bad = spec("imp-2");
    bad.attributes.insert("a".repeat(300), serde_json::json!(1));
    let err = op
        .provision_devices(vec![spec("imp-1"), bad])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Server { code: ErrorCode::InvalidArgument, message } if message.starts_with("device 1: attributes")),
        "{err}"
    );
    let err = op
        .provision_devices(vec![spec("imp-1"), spec("imp-1")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Server { code: ErrorCode::InvalidArgument, message } if message == "device 1: imp-1 is given twice"),
        "{err}"
    );
    let (devices, _) = op
        .query_devices(r#"tag.batch == "one""#, None, 0)
        .await
        .unwrap();
    assert!(devices.is_empty(), "a refused import created {devices:?}");

    let ids = ["imp-3", "imp-1", "imp-2"];
    let created = op
        .provision_devices(ids.iter().map(|id| spec(id)).collect())
        .await
        .unwrap();
    assert_eq!(
        created
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ids
    );
    let (devices, _) = op
        .query_devices(r#"tag.batch == "one""#, None, 0)
        .await
        .unwrap();
    assert_eq!(
        devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["imp-1", "imp-2", "imp-3"]
    );
    for (id, token) in &created {
        let device = DeviceClient::connect(ts.device_config(id.as_str(), token))
            .await
            .unwrap();
        device.close().await;
    }

    // The SDK refuses empty and oversized requests; so does the server.
    let err = op.provision_devices(Vec::new()).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    let too_many = v1::ProvisionDevices {
        devices: (0..=fleetlink_proto::MAX_PROVISION_BATCH)
            .map(|i| v1::ProvisionDevice {
                device_id: format!("many-{i}"),
                ..Default::default()
            })
            .collect(),
    };
    let (code, message) = error_of(
        &raw_operator_request(
            &ts,
            v1::operator_request::Request::ProvisionDevices(too_many),
        )
        .await,
    );
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert_eq!(
        message,
        "provision_devices takes 1 to 1000 devices, not 1001"
    );
    let (code, _) = error_of(
        &raw_operator_request(
            &ts,
            v1::operator_request::Request::ProvisionDevices(Default::default()),
        )
        .await,
    );
    assert_eq!(code, ErrorCode::InvalidArgument);
}

/// `fold_interval_ms` reaches the store. At 0 every commit is folded, so the `devices` table
/// counts the acked points at once; at 5 minutes they wait in the telemetry log (the table still
/// says 0), and queries return them all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fold_interval_ms_decides_when_acked_points_reach_the_device_table() {
    for (interval_ms, folded) in [(0, true), (300_000, false)] {
        let ts = start(|c| c.fold_interval_ms = interval_ms);
        let op = ts.operator().await;
        let dev = connect_device(&ts, &op, "folder").await;
        for i in 0..3 {
            dev.send(vec![point("x", i, Value::Int(i))]).await.unwrap();
        }
        dev.flush(Duration::from_secs(10)).await.unwrap();
        let id = DeviceId::new("folder").unwrap();
        assert_eq!(stored_points(&op, &id).await.len(), 3, "{interval_ms} ms");
        let db = rusqlite::Connection::open(ts.dir.path().join("fleetlink.db")).unwrap();
        let counted = || {
            db.query_row(
                "SELECT point_count FROM devices WHERE name = 'folder'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
        };
        if folded {
            // the ack goes out when the commit is durable; the fold follows it
            eventually(
                Duration::from_secs(10),
                "the fold of the acked points",
                || {
                    let n = counted();
                    async move { n == 3 }
                },
            )
            .await;
        } else {
            assert_eq!(counted(), 0, "folded within {interval_ms} ms");
        }
    }
}
