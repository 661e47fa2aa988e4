//! The device-to-device bridge, the policy, fleet queries, standing queries and live streams, end
//! to end against a real server.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use fleetlink_client::{
    ClientError, CommandFailure, CommandState, DeviceClient, DeviceId, Endpoint, FleetEvent,
    Incoming, MetricName, OperatorClient, Point, Subscription, Value,
};
use fleetlink_proto::v1::ErrorCode;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn denied(e: ClientError) -> String {
    match e {
        ClientError::Server {
            code: ErrorCode::PermissionDenied,
            message,
        } => message,
        other => panic!("expected PERMISSION_DENIED, got {other}"),
    }
}

/// The next incoming bridge message, within the test's patience.
async fn next_incoming(rx: &mut tokio::sync::broadcast::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no bridge message arrived")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_fan_out_to_a_hundred_subscribers_with_wildcards() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let endpoint = Endpoint::for_server(ts.address.addr).unwrap();
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..101 {
        let name = format!("yard-{i:03}");
        tokens.push(provision(&op, &name).await);
        ids.push(id(&name));
    }
    op.put_group("yard", ids.clone(), None).await.unwrap();
    // Filters that match group/yard/gate/1/status, and some that do not.
    let filters = [
        "group/yard/gate/1/status",
        "group/yard/+/1/status",
        "group/yard/#",
        "group/yard/gate/+/status",
        "group/yard/+/+/+",
        "group/yard/gate/2/status", // no
        "group/yard/other/#",       // no
    ];
    let mut subscribers = Vec::new();
    for (i, token) in tokens.iter().enumerate().skip(1) {
        let mut config = ts.device_config(ids[i].as_str(), token);
        config.endpoint = Some(endpoint.clone());
        let dev = DeviceClient::connect(config).await.unwrap();
        let filter = filters[i % filters.len()];
        let rx = dev.incoming();
        dev.subscribe(filter).await.unwrap();
        subscribers.push((
            dev,
            rx,
            !filter.ends_with("2/status") && !filter.contains("other"),
        ));
    }
    let publisher = DeviceClient::connect(ts.device_config("yard-000", &tokens[0]))
        .await
        .unwrap();
    let expected = subscribers.iter().filter(|s| s.2).count() as u64;
    let delivered = publisher
        .publish("group/yard/gate/1/status", b"open".to_vec(), false)
        .await
        .unwrap();
    assert_eq!(delivered, expected);
    // A second, retained publish; everybody who matched gets both, in order.
    publisher
        .publish("group/yard/gate/1/status", b"closed".to_vec(), true)
        .await
        .unwrap();
    for (dev, rx, matches) in &mut subscribers {
        if !*matches {
            assert!(
                rx.try_recv().is_err(),
                "{} got a message it did not subscribe to",
                dev.id()
            );
            continue;
        }
        for want in [&b"open"[..], &b"closed"[..]] {
            match next_incoming(rx).await {
                Incoming::Topic {
                    topic,
                    payload,
                    from,
                    retained,
                    ..
                } => {
                    assert_eq!(topic, "group/yard/gate/1/status");
                    assert_eq!(payload, want);
                    assert_eq!(from.as_deref(), Some("yard-000"));
                    assert!(!retained);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // A late subscriber gets the retained message at once, marked as retained.
    let (late, mut late_rx, _) = subscribers.pop().unwrap();
    late.unsubscribe(filters[100 % filters.len()])
        .await
        .unwrap();
    late.subscribe("group/yard/gate/+/status").await.unwrap();
    match next_incoming(&mut late_rx).await {
        Incoming::Topic {
            payload, retained, ..
        } => {
            assert_eq!(payload, b"closed");
            assert!(retained);
        }
        other => panic!("unexpected {other:?}"),
    }
    // An operator may publish anywhere.
    let told = op
        .publish("group/yard/gate/1/status", b"op".to_vec(), false)
        .await
        .unwrap();
    assert!(told.contains("delivered to"), "{told}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_and_a_device_to_device_command() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let truck_token = provision(&op, "truck-1").await;
    let gate_token = provision(&op, "gate-1").await;
    provision(&op, "gate-2").await;
    op.put_group(
        "yard",
        vec![id("truck-1"), id("gate-1"), id("gate-2")],
        None,
    )
    .await
    .unwrap();
    let truck = DeviceClient::connect(ts.device_config("truck-1", &truck_token))
        .await
        .unwrap();
    let mut truck_rx = truck.incoming();

    // gate-1 is offline: the message waits for it
    let sent = truck
        .send_direct(
            "gate-1",
            b"arriving in 2 min".to_vec(),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let gate_config =
        ts.device_config("gate-1", &gate_token)
            .on_command("open", |call| async move {
                if call.args["lane"] == json!(9) {
                    return Err(CommandFailure::failed("no lane 9"));
                }
                Ok(json!({"opened": call.args["lane"]}))
            });
    let gate = DeviceClient::connect(gate_config).await.unwrap();
    let mut gate_rx = gate.incoming();
    match next_incoming(&mut gate_rx).await {
        Incoming::Direct {
            id, from, payload, ..
        } => {
            assert_eq!(id, sent);
            assert_eq!(from, "truck-1");
            assert_eq!(payload, b"arriving in 2 min");
        }
        other => panic!("unexpected {other:?}"),
    }
    // online: delivered at once, both ways
    gate.send_direct("truck-1", b"welcome".to_vec(), None)
        .await
        .unwrap();
    assert!(
        matches!(next_incoming(&mut truck_rx).await, Incoming::Direct { payload, .. } if payload == b"welcome")
    );

    // the truck asks the gate to open, through the command machinery
    let outcome = truck
        .command_device("gate-1", "open", json!({"lane": 2}), WAIT)
        .await
        .unwrap();
    assert_eq!(outcome.state, CommandState::Succeeded);
    assert_eq!(outcome.result, Some(json!({"opened": 2})));
    let stored = op.command(outcome.id).await.unwrap();
    assert_eq!(stored.device, id("gate-1"));
    assert_eq!(stored.state, CommandState::Succeeded);
    let failed = truck
        .command_device("gate-1", "open", json!({"lane": 9}), WAIT)
        .await
        .unwrap();
    assert_eq!(failed.state, CommandState::Failed);
    assert_eq!(failed.error.as_deref(), Some("no lane 9"));
    // gate-2 never connects: the command expires and the truck learns it
    let expired = truck
        .command_device("gate-2", "open", json!({}), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(expired.state, CommandState::Expired);

    // a message to gate-2 (offline) expires; the truck is told
    let lost = truck
        .send_direct(
            "gate-2",
            b"hello?".to_vec(),
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    match next_incoming(&mut truck_rx).await {
        Incoming::Expired { id, to } => {
            assert_eq!(id, lost);
            assert_eq!(to, "gate-2");
        }
        other => panic!("unexpected {other:?}"),
    }
    // unknown targets are refused with NOT_FOUND
    match truck.send_direct("ghost", b"x".to_vec(), None).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_denies_each_action_kind_and_reloads_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("fleetlink.toml");
    std::fs::write(&config_file, "[policy]\ndefault = \"same-group\"\n").unwrap();
    let ts = start(|c| {
        *c = fleetlink_server::ServerConfig::from_file(&config_file).unwrap();
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.data_dir = dir.path().join("data");
        c.arbiters = 2;
        c.io_threads = 2;
    });
    let op = ts.operator().await;
    let truck_token = op
        .provision_device(&id("truck-1"), tags(&[("role", "truck")]))
        .await
        .unwrap();
    op.provision_device(&id("gate-9"), tags(&[("role", "gate")]))
        .await
        .unwrap();
    op.put_group("north", vec![id("truck-1")], None)
        .await
        .unwrap();
    op.put_group("south", vec![id("gate-9")], None)
        .await
        .unwrap();
    let truck = DeviceClient::connect(ts.device_config("truck-1", &truck_token))
        .await
        .unwrap();

    let m = denied(
        truck
            .publish("group/south/x", b"hi".to_vec(), false)
            .await
            .unwrap_err(),
    );
    assert!(
        m.contains("truck-1 may not publish to group/south/x"),
        "{m}"
    );
    let m = denied(truck.subscribe("group/+/x").await.unwrap_err());
    assert!(m.contains("may not subscribe to group/+/x"), "{m}");
    let m = denied(
        truck
            .send_direct("gate-9", b"hi".to_vec(), None)
            .await
            .unwrap_err(),
    );
    assert!(m.contains("no group has both the sender and gate-9"), "{m}");
    let m = denied(
        truck
            .command_device("gate-9", "open", json!({}), WAIT)
            .await
            .unwrap_err(),
    );
    assert!(m.contains("may not run a command on gate-9"), "{m}");
    // within its own group everything goes
    truck
        .publish("group/north/x", b"hi".to_vec(), false)
        .await
        .unwrap();
    truck.subscribe("group/north/#").await.unwrap();
    let (allowed, reason) = op
        .check_policy(&id("truck-1"), "command", "gate-9")
        .await
        .unwrap();
    assert!(!allowed);
    assert!(reason.starts_with("default same-group"), "{reason}");

    // a rule lets trucks command gates; reloading applies it without a restart
    std::fs::write(
        &config_file,
        r#"
[policy]
default = "same-group"

[[policy.rules]]
effect = "allow"
actions = ["command", "message"]
from = 'tag.role == "truck"'
to = 'tag.role == "gate"'
"#,
    )
    .unwrap();
    let told = op.reload_policy().await.unwrap();
    assert!(told.contains("1 rules"), "{told}");
    let (allowed, reason) = op
        .check_policy(&id("truck-1"), "command", "gate-9")
        .await
        .unwrap();
    assert!(allowed, "{reason}");
    assert!(
        reason.starts_with("rule 1: allow command, message"),
        "{reason}"
    );
    truck
        .send_direct("gate-9", b"now allowed".to_vec(), None)
        .await
        .unwrap();
    let (allowed, _) = op
        .check_policy(&id("gate-9"), "command", "truck-1")
        .await
        .unwrap();
    assert!(!allowed, "the rule is one-way");

    // a broken file is refused and the old policy stays
    std::fs::write(&config_file, "[policy]\ndefault = \"maybe\"\n").unwrap();
    match op.reload_policy().await {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::InvalidArgument);
            assert!(message.contains("unknown policy default"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        op.check_policy(&id("truck-1"), "message", "gate-9")
            .await
            .unwrap()
            .0
    );
}

fn point(metric: &str, value: Value) -> Point {
    Point {
        metric: MetricName::new(metric).unwrap(),
        time_us: fleetlink_client::now_us(),
        value,
    }
}

/// A hand-built fleet: (id, region, fuel if online, reported mode).
async fn build_fleet(ts: &TestServer, op: &OperatorClient) -> Vec<DeviceClient> {
    let fleet = [
        ("truck-1", "north", Some(0.1), "eco"),
        ("truck-2", "north", Some(0.5), "sport"),
        ("truck-3", "north", None, "eco"),
        ("truck-4", "south", Some(0.05), "eco"),
        ("truck-5", "south", None, "sport"),
    ];
    let mut online = Vec::new();
    for (name, region, fuel, mode) in fleet {
        let token = op
            .provision_device_with(
                &id(name),
                tags(&[("region", region)]),
                serde_json::from_value(
                    json!({"model": {"year": if name == "truck-2" { 2024 } else { 2019 }}}),
                )
                .unwrap(),
            )
            .await
            .unwrap();
        let dev = DeviceClient::connect(ts.device_config(name, &token))
            .await
            .unwrap();
        dev.report(json!({"mode": mode})).await.unwrap();
        match fuel {
            Some(f) => {
                dev.send(vec![point("fuel", Value::Double(f))])
                    .await
                    .unwrap();
                dev.flush(WAIT).await.unwrap();
                online.push(dev);
            }
            None => dev.close().await,
        }
    }
    online
}

async fn ids_of(op: &OperatorClient, query: &str) -> Vec<String> {
    let (page, next) = op.query_devices(query, None, 0).await.unwrap();
    assert!(next.is_none());
    page.into_iter().map(|d| d.id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_queries_on_a_hand_built_fleet() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let _online = build_fleet(&ts, &op).await;
    eventually(WAIT, "three devices online", || async {
        ids_of(&op, "online").await.len() == 3
    })
    .await;
    assert_eq!(
        ids_of(
            &op,
            r#"tag.region == "north" and online and metric.fuel < 0.2"#
        )
        .await,
        vec!["truck-1"]
    );
    assert_eq!(
        ids_of(&op, "metric.fuel < 0.2").await,
        vec!["truck-1", "truck-4"]
    );
    assert_eq!(ids_of(&op, "offline").await, vec!["truck-3", "truck-5"]);
    assert_eq!(
        ids_of(
            &op,
            r#"reported.mode == "sport" or attr.model.year >= 2024"#
        )
        .await,
        vec!["truck-2", "truck-5"]
    );
    assert_eq!(
        ids_of(&op, r#"id ~ "truck-?" and not (metric.fuel exists)"#).await,
        vec!["truck-3", "truck-5"]
    );
    // groups: static and dynamic
    op.put_group("low-fuel", vec![], Some("metric.fuel < 0.2"))
        .await
        .unwrap();
    op.put_group("pair", vec![id("truck-3"), id("truck-5")], None)
        .await
        .unwrap();
    assert_eq!(
        ids_of(&op, r#"group == "low-fuel" or group == "pair""#).await,
        vec!["truck-1", "truck-3", "truck-4", "truck-5"]
    );
    let groups = op.groups().await.unwrap();
    let low = groups.iter().find(|g| g.name == "low-fuel").unwrap();
    assert_eq!(low.members, vec!["truck-1", "truck-4"]);
    // tags change through the operator, and queries see it at once
    op.update_device(&id("truck-4"), tags(&[("region", "north")]), vec![], None)
        .await
        .unwrap();
    assert_eq!(
        ids_of(&op, r#"tag.region == "north" and metric.fuel < 0.2"#).await,
        vec!["truck-1", "truck-4"]
    );
    // pagination
    let (first, next) = op.query_devices("true", None, 2).await.unwrap();
    assert_eq!(
        first.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        vec!["truck-1", "truck-2"]
    );
    let next = next.unwrap();
    let (second, _) = op.query_devices("true", Some(&next), 2).await.unwrap();
    assert_eq!(second[0].id.as_str(), "truck-3");
    // bad names are refused with what is allowed
    for (what, result) in [
        (
            "group name",
            op.put_group("a/b", vec![], Some("online"))
                .await
                .map(|_| ()),
        ),
        (
            "attribute key",
            op.provision_device_with(
                &id("truck-9"),
                BTreeMap::new(),
                serde_json::from_value(json!({"a.b": 1})).unwrap(),
            )
            .await
            .map(|_| ()),
        ),
        (
            "tag key",
            op.provision_device(&id("truck-9"), tags(&[("has space", "x")]))
                .await
                .map(|_| ()),
        ),
    ] {
        match result {
            Err(ClientError::Server { code, .. }) => {
                assert_eq!(code, ErrorCode::InvalidArgument, "{what}")
            }
            other => panic!("{what}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    // a precise parse error
    match op.query_devices(r#"tag.region = "north""#, None, 0).await {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::InvalidArgument);
            assert!(
                message.starts_with("query error at column 12: expected"),
                "{message}"
            );
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

async fn next_event(stream: &mut fleetlink_client::EventStream) -> FleetEvent {
    stream
        .next_within(WAIT)
        .await
        .unwrap()
        .expect("the stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_query_reports_the_initial_set_then_enter_and_leave() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let online = build_fleet(&ts, &op).await;
    eventually(WAIT, "three devices online", || async {
        ids_of(&op, "online").await.len() == 3
    })
    .await;
    let mut stream = op
        .subscribe(Subscription::Query {
            query: r#"tag.region == "north" and online"#.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream).await,
        FleetEvent::Subscribed { initial_matches: 2 }
    );
    let mut initial = BTreeSet::new();
    for _ in 0..2 {
        match next_event(&mut stream).await {
            FleetEvent::Match {
                device,
                matches: true,
                initial: true,
            } => {
                initial.insert(device);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        initial,
        BTreeSet::from(["truck-1".to_owned(), "truck-2".to_owned()])
    );
    // truck-4 moves north: enters; truck-1 disconnects: leaves
    op.update_device(&id("truck-4"), tags(&[("region", "north")]), vec![], None)
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream).await,
        FleetEvent::Match {
            device: "truck-4".into(),
            matches: true,
            initial: false
        }
    );
    let mut online = online;
    let at = online
        .iter()
        .position(|d| d.id().as_str() == "truck-1")
        .unwrap();
    online.remove(at).close().await;
    assert_eq!(
        next_event(&mut stream).await,
        FleetEvent::Match {
            device: "truck-1".into(),
            matches: false,
            initial: false
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_of_presence_twin_commands_and_telemetry() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = op
        .provision_device(&id("crane-1"), tags(&[("site", "a")]))
        .await
        .unwrap();
    op.provision_device(&id("crane-2"), tags(&[("site", "b")]))
        .await
        .unwrap();
    let scope = r#"tag.site == "a""#.to_owned();
    let mut presence = op
        .subscribe(Subscription::Presence {
            query: scope.clone(),
        })
        .await
        .unwrap();
    let mut twin = op
        .subscribe(Subscription::Twin {
            query: String::new(),
        })
        .await
        .unwrap();
    let mut commands = op
        .subscribe(Subscription::Commands {
            query: scope.clone(),
        })
        .await
        .unwrap();
    let mut telemetry = op
        .subscribe(Subscription::Telemetry {
            query: scope,
            metrics: vec!["load".into()],
        })
        .await
        .unwrap();
    for s in [&mut presence, &mut twin, &mut commands, &mut telemetry] {
        assert!(matches!(next_event(s).await, FleetEvent::Subscribed { .. }));
    }
    let config = ts
        .device_config("crane-1", &token)
        .on_command("lift", |_| async { Ok(json!("up")) });
    let crane = DeviceClient::connect(config).await.unwrap();
    match next_event(&mut presence).await {
        FleetEvent::Presence { device, event } => {
            assert_eq!(device, "crane-1");
            assert!(event.online);
        }
        other => panic!("unexpected {other:?}"),
    }
    op.set_desired(&id("crane-1"), json!({"speed": 2}), None)
        .await
        .unwrap();
    match next_event(&mut twin).await {
        FleetEvent::Twin {
            device,
            side,
            version,
            delta,
            ..
        } => {
            assert_eq!(
                (device.as_str(), side.as_str(), version),
                ("crane-1", "desired", 1)
            );
            assert_eq!(delta, json!({"speed": 2}));
        }
        other => panic!("unexpected {other:?}"),
    }
    op.run_command(
        fleetlink_client::CommandRequest::new(id("crane-1"), "lift"),
        WAIT,
    )
    .await
    .unwrap();
    let mut states = Vec::new();
    while states.last() != Some(&CommandState::Succeeded) {
        match next_event(&mut commands).await {
            FleetEvent::Command(c) => states.push(c.state),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        states,
        vec![
            CommandState::Queued,
            CommandState::Delivered,
            CommandState::Succeeded
        ]
    );
    crane
        .send(vec![
            point("load", Value::Double(1.5)),
            point("temp", Value::Double(30.0)),
        ])
        .await
        .unwrap();
    crane.flush(WAIT).await.unwrap();
    match next_event(&mut telemetry).await {
        FleetEvent::Telemetry { device, points } => {
            assert_eq!(device, "crane-1");
            assert_eq!(points.len(), 1, "only the metrics asked for");
            assert_eq!(points[0].metric.as_str(), "load");
        }
        other => panic!("unexpected {other:?}"),
    }
    crane.close().await;
    match next_event(&mut presence).await {
        FleetEvent::Presence { event, .. } => {
            assert!(!event.online);
            assert_eq!(event.reason, "closed");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_an_overflow_signal_while_devices_keep_streaming() {
    let ts = start(|c| c.event_buffer = 16);
    let op = ts.operator().await;
    let mut devices = Vec::new();
    for i in 0..4 {
        let dev = connect_device(&ts, &op, &format!("pump-{i}")).await;
        devices.push(dev);
    }
    // Subscribe, then do not read: the stream's flow-control window fills, the bus moves on.
    let mut slow = op
        .subscribe(Subscription::Telemetry {
            query: String::new(),
            metrics: vec![],
        })
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut slow).await,
        FleetEvent::Subscribed { .. }
    ));
    let payload = "x".repeat(2_000);
    for round in 0..200 {
        for dev in &devices {
            dev.send(vec![point(
                "blob",
                Value::String(format!("{round}-{payload}")),
            )])
            .await
            .unwrap();
        }
        for dev in &devices {
            dev.flush(WAIT).await.unwrap(); // the devices are never held up by the subscriber
        }
    }
    for dev in &devices {
        assert_eq!(dev.stats().points_acked, 200);
    }
    let mut dropped = 0;
    let mut seen = 0;
    while dropped == 0 {
        match next_event(&mut slow).await {
            FleetEvent::Overflow { dropped: d } => dropped = d,
            FleetEvent::Telemetry { .. } => seen += 1,
            other => panic!("unexpected {other:?}"),
        }
        assert!(seen < 800, "no overflow signal before every event was read");
    }
    assert!(dropped > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_provisioned_later_joins_a_standing_query() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    op.provision_device(&id("van-1"), tags(&[("region", "north")]))
        .await
        .unwrap();
    let mut stream = op
        .subscribe(Subscription::Query {
            query: r#"tag.region == "north""#.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream).await,
        FleetEvent::Subscribed { initial_matches: 1 }
    );
    assert!(matches!(
        next_event(&mut stream).await,
        FleetEvent::Match { initial: true, .. }
    ));
    // nothing the query reads changes for the new device after it appears: it must enter anyway
    op.provision_device(&id("van-2"), tags(&[("region", "north")]))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut stream).await,
        FleetEvent::Match {
            device: "van-2".into(),
            matches: true,
            initial: false
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacing_connection_does_not_inherit_subscriptions() {
    use fleetlink_proto::v1::{self, ClientControl, client_control, server_control};
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "cam-1").await;
    op.put_group("g", vec![id("cam-1")], None).await.unwrap();
    let mut first = raw_connect(&ts, device_hello("cam-1", &token)).await;
    let subscribe = ClientControl {
        msg: Some(client_control::Msg::Subscribe(v1::TopicSubscribe {
            request_id: 1,
            filter: "group/g/#".into(),
        })),
    };
    fleetlink_transport::write_frame(&mut first.control, &subscribe)
        .await
        .unwrap();
    loop {
        match first
            .reader
            .read::<v1::ServerControl>()
            .await
            .unwrap()
            .and_then(|f| f.msg)
        {
            Some(server_control::Msg::BridgeAck(a)) => {
                assert!(a.error.is_none());
                break;
            }
            Some(_) => continue,
            None => panic!("no ack"),
        }
    }
    // the same device connects again: the first connection is replaced, its subscription ends
    let second = raw_connect(&ts, device_hello("cam-1", &token)).await;
    assert_eq!(close_code(&first.conn).await.0, ErrorCode::Replaced);
    let told = op
        .publish("group/g/frame", b"x".to_vec(), false)
        .await
        .unwrap();
    assert_eq!(told, "delivered to 0 subscribers");
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_its_receivers_frame_limit_is_refused() {
    let ts = start(|c| c.max_frame_bytes = 16_384);
    let op = ts.operator().await;
    let a = connect_device(&ts, &op, "big-a").await;
    let b = connect_device(&ts, &op, "big-b").await;
    op.put_group("g", vec![id("big-a"), id("big-b")], None)
        .await
        .unwrap();
    b.subscribe("group/g/#").await.unwrap();
    let e = a
        .publish("group/g/blob", vec![7u8; 16_350], false)
        .await
        .unwrap_err();
    match e {
        ClientError::Server { code, message } => {
            assert_eq!(code, ErrorCode::FrameTooLarge);
            assert!(message.contains("max_frame_bytes"), "{message}");
        }
        other => panic!("expected FRAME_TOO_LARGE, got {other}"),
    }
    // the subscriber never saw an oversized frame: still on its first connection
    assert_eq!(
        a.publish("group/g/small", b"ok".to_vec(), false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(b.stats().connects, 1);
    // device commands need a valid name
    match a.command_device("big-b", "", json!(null), WAIT).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::InvalidArgument),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_made_while_offline_is_sent_after_the_reconnect() {
    let ts = start(|c| {
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 1_000;
    });
    let op = ts.operator().await;
    let token = provision(&op, "tram-1").await;
    provision(&op, "tram-2").await;
    op.put_group("line", vec![id("tram-1"), id("tram-2")], None)
        .await
        .unwrap();
    let mut config = ts.device_config("tram-1", &token);
    config.backoff = fleetlink_core::backoff::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
        ..Default::default()
    };
    let tram = DeviceClient::connect(config).await.unwrap();
    let dir = ts.dir;
    let addr = ts.server.local_addr();
    op.close();
    tokio::task::spawn_blocking(move || ts.server.shutdown())
        .await
        .unwrap();
    eventually(WAIT, "the device noticed", || async {
        !tram.stats().connected
    })
    .await;
    // offline now: the message waits in the SDK, then goes out on the next connection
    let sending = tram.send_direct("tram-2", b"late".to_vec(), None);
    let mut config = fleetlink_server::ServerConfig::local(dir.path());
    config.listen = addr;
    let server = fleetlink_server::Server::start(config).unwrap();
    let id = tokio::time::timeout(WAIT, sending).await.unwrap().unwrap();
    assert!(id > 0);
    drop(server);
}
