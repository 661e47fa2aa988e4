//! The embedded store against a real SQLite file in a temporary directory.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fleetlink_core::credentials::Token;
use fleetlink_core::value::Batch;
use fleetlink_core::{DeviceId, GeoPosition, MetricName, Point, Value};
use fleetlink_store::{
    AppendBatch, DurabilityListener, NewDevice, SqliteOptions, SqliteStore, Store, StoreError,
    TelemetryQuery,
};
use tokio::sync::watch;

#[derive(Debug)]
struct Watch(watch::Sender<u64>, Mutex<Vec<u64>>);

impl DurabilityListener for Watch {
    fn durable(&self, seq: u64) {
        self.0.send_modify(|d| *d = (*d).max(seq));
    }
    fn failed(&self, seq: u64, _error: &StoreError) {
        self.1.lock().unwrap().push(seq);
    }
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn point(metric: &str, t: i64, value: Value) -> Point {
    Point {
        metric: MetricName::new(metric).unwrap(),
        time_us: t,
        value,
    }
}

async fn provision(store: &SqliteStore, name: &str) -> Token {
    let token = Token::from_random_bytes([name.len() as u8; 32]);
    store
        .provision_device(NewDevice {
            id: id(name),
            token_hash: token.hash(),
            tags: BTreeMap::from([("region".into(), "north".into())]),
            attributes: serde_json::Map::new(),
            created_us: 1,
        })
        .await
        .unwrap();
    token
}

async fn append(
    store: &SqliteStore,
    listener: &Arc<Watch>,
    device: &str,
    seq: u64,
    points: Vec<Point>,
) {
    store
        .append(AppendBatch {
            device: id(device),
            batch: Batch { seq, points },
            received_us: 1_000,
            listener: listener.clone(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn telemetry_is_stored_once_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let token = provision(&store, "truck-1").await;
    assert!(
        store
            .device_token_hash(&id("truck-1"))
            .await
            .unwrap()
            .unwrap()
            .verify(token.as_str())
    );
    assert!(matches!(
        store
            .provision_device(NewDevice {
                id: id("truck-1"),
                token_hash: token.hash(),
                tags: BTreeMap::new(),
                attributes: serde_json::Map::new(),
                created_us: 2
            })
            .await,
        Err(StoreError::DeviceExists(_))
    ));

    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    let geo = GeoPosition {
        lat: 52.5,
        lon: 13.4,
        alt_m: None,
        speed_mps: Some(12.0),
        heading_deg: Some(90.0),
        accuracy_m: Some(3.0),
    };
    append(
        &store,
        &listener,
        "truck-1",
        1,
        vec![
            point("fuel", 10, Value::Double(0.9)),
            point("pos", 10, Value::Geo(geo)),
        ],
    )
    .await;
    append(
        &store,
        &listener,
        "truck-1",
        2,
        vec![
            point("fuel", 20, Value::Double(0.8)),
            point("door", 20, Value::Bool(true)),
        ],
    )
    .await;
    // a resend of batch 2 is not stored twice
    append(
        &store,
        &listener,
        "truck-1",
        2,
        vec![
            point("fuel", 20, Value::Double(0.8)),
            point("door", 20, Value::Bool(true)),
        ],
    )
    .await;
    append(
        &store,
        &listener,
        "truck-1",
        3,
        vec![
            point("note", 30, Value::String("ok".into())),
            point("odo", 30, Value::Int(-5)),
        ],
    )
    .await;
    rx.wait_for(|d| *d >= 3).await.unwrap();
    assert!(listener.1.lock().unwrap().is_empty());
    drop(store);

    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let all = store
        .query_telemetry(TelemetryQuery {
            device: id("truck-1"),
            metric: None,
            start_us: None,
            end_us: None,
            limit: None,
            every_us: None,
            agg: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(store.point_count().await.unwrap(), 6);
    let fuel = store
        .query_telemetry(TelemetryQuery {
            device: id("truck-1"),
            metric: Some(MetricName::new("fuel").unwrap()),
            start_us: Some(15),
            end_us: None,
            limit: None,
            every_us: None,
            agg: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(fuel.len(), 1);
    assert_eq!(fuel[0].value, Value::Double(0.8));
    assert_eq!(fuel[0].seq, 2);

    let dev = store.device(&id("truck-1")).await.unwrap().unwrap();
    assert_eq!(dev.last_seq, 3);
    assert_eq!(dev.tags.get("region").map(String::as_str), Some("north"));
    let last: BTreeMap<_, _> = dev
        .last_values
        .iter()
        .map(|v| (v.metric.as_str().to_owned(), v.value.clone()))
        .collect();
    assert_eq!(last["fuel"], Value::Double(0.8));
    assert_eq!(last["pos"], Value::Geo(geo));
    assert_eq!(last["note"], Value::String("ok".into()));
    assert_eq!(last["odo"], Value::Int(-5));
    assert_eq!(last["door"], Value::Bool(true));

    // after a reopen the watermark still refuses old batches
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    append(
        &store,
        &listener,
        "truck-1",
        3,
        vec![point("fuel", 99, Value::Double(0.1))],
    )
    .await;
    rx.wait_for(|d| *d >= 3).await.unwrap();
    assert_eq!(store.point_count().await.unwrap(), 6);
}

#[tokio::test]
async fn admin_tokens_verify_and_unknown_devices_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("fleet.db"), SqliteOptions::default()).unwrap();
    assert!(!store.has_admin_token().await.unwrap());
    let admin = Token::from_random_bytes([3; 32]);
    store.add_admin_token(admin.hash(), 0).await.unwrap();
    assert!(store.has_admin_token().await.unwrap());
    assert!(store.verify_admin_token(admin.as_str()).await.unwrap());
    assert!(!store.verify_admin_token("guess").await.unwrap());
    let err = store
        .query_telemetry(TelemetryQuery {
            device: id("ghost"),
            metric: None,
            start_us: None,
            end_us: None,
            limit: None,
            every_us: None,
            agg: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown device \"ghost\": provision it with `fleetlink device add ghost`"
    );
    provision(&store, "a").await;
    provision(&store, "b").await;
    provision(&store, "c").await;
    let page = store.list_devices(Some(id("a")), Some(1)).await.unwrap();
    assert_eq!(
        page.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
}

#[tokio::test]
async fn a_device_import_creates_every_device_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("fleet.db"), SqliteOptions::default()).unwrap();
    provision(&store, "taken").await;
    let new = |name: &str, byte: u8| NewDevice {
        id: id(name),
        token_hash: Token::from_random_bytes([byte; 32]).hash(),
        tags: BTreeMap::from([("site".into(), name.into())]),
        attributes: serde_json::json!({"n": byte}).as_object().unwrap().clone(),
        created_us: 7,
    };
    // one id taken: nothing is created
    let err = store
        .provision_devices(vec![new("d1", 1), new("taken", 2), new("d3", 3)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::DeviceExists(d) if d.as_str() == "taken"),
        "{err}"
    );
    // one id twice: nothing is created
    let err = store
        .provision_devices(vec![new("d1", 1), new("d1", 2)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::DeviceExists(d) if d.as_str() == "d1"),
        "{err}"
    );
    for name in ["d1", "d3"] {
        assert!(store.device_token_hash(&id(name)).await.unwrap().is_none());
    }
    // all new: every device, in order, with its state for the actor
    let states = store
        .provision_devices(vec![new("d3", 3), new("d1", 1), new("d2", 2)])
        .await
        .unwrap();
    assert_eq!(
        states
            .iter()
            .map(|s| s.record.id.as_str())
            .collect::<Vec<_>>(),
        ["d3", "d1", "d2"]
    );
    for (state, byte) in states.iter().zip([3u8, 1, 2]) {
        assert_eq!(state.record.created_us, 7);
        assert_eq!(state.record.tags["site"], state.record.id.as_str());
        assert_eq!(state.record.attributes["n"], byte);
        assert_eq!(state.record.last_seq, 0);
        assert_eq!(state.record.point_count, 0);
        assert!(state.open_commands.is_empty());
        assert_eq!(
            store.device_token_hash(&state.record.id).await.unwrap(),
            Some(Token::from_random_bytes([byte; 32]).hash())
        );
    }
    let all = store.list_devices(None, None).await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d1", "d2", "d3", "taken"]
    );
}

/// Queued writes that read before they write (a device lookup, then an insert) used to fail at
/// once with "database is locked" when a registry write committed in between: the writer's
/// transaction must take the write lock up front and wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_and_registry_writes_do_not_lock_each_other_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("fleet.db"), SqliteOptions::default()).unwrap();
    provision(&store, "anchor").await;
    let registry = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store
                    .provision_device(NewDevice {
                        id: id(&format!("dev-{i}")),
                        token_hash: Token::from_random_bytes([7; 32]).hash(),
                        tags: BTreeMap::new(),
                        attributes: serde_json::Map::new(),
                        created_us: i,
                    })
                    .await
                    .unwrap();
            }
        })
    };
    let mut writes = Vec::new();
    for i in 0..400 {
        writes.push(store.record_presence(
            &id("anchor"),
            fleetlink_store::PresenceRecord {
                online: i % 2 == 0,
                at_us: i,
                reason: String::new(),
                remote_addr: String::new(),
                session: i as u64,
            },
        ));
        if i % 20 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for w in writes {
        w.await.unwrap();
    }
    registry.await.unwrap();
    assert_eq!(
        store
            .presence_history(&id("anchor"), 1000)
            .await
            .unwrap()
            .len(),
        400
    );
    assert_eq!(store.list_devices(None, None).await.unwrap().len(), 201);
}

#[tokio::test]
async fn downsampling_aggregates_numeric_points_per_metric_and_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("fleet.db"), SqliteOptions::default()).unwrap();
    provision(&store, "pump-1").await;
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    // 0..30 s in 1 s steps: flow = t, on = t is even, label is a string (left out)
    let mut points = Vec::new();
    for t in 0..30i64 {
        points.push(point("flow", t * 1_000_000, Value::Double(t as f64)));
        points.push(point("on", t * 1_000_000, Value::Bool(t % 2 == 0)));
        points.push(point("label", t * 1_000_000, Value::String("x".into())));
    }
    append(&store, &listener, "pump-1", 1, points).await;
    rx.wait_for(|d| *d >= 1).await.unwrap();
    let query = |metric: &str, agg| TelemetryQuery {
        device: id("pump-1"),
        metric: Some(MetricName::new(metric).unwrap()),
        start_us: None,
        end_us: None,
        limit: None,
        every_us: Some(10_000_000),
        agg,
    };
    let series = |points: Vec<fleetlink_store::StoredPoint>| -> Vec<(i64, f64)> {
        points
            .into_iter()
            .map(|p| match p.value {
                Value::Double(v) => (p.time_us, v),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    use fleetlink_store::Aggregation;
    let mean = store
        .query_telemetry(query("flow", Aggregation::Mean))
        .await
        .unwrap();
    assert_eq!(
        series(mean),
        vec![(0, 4.5), (10_000_000, 14.5), (20_000_000, 24.5)]
    );
    let max = store
        .query_telemetry(query("flow", Aggregation::Max))
        .await
        .unwrap();
    assert_eq!(
        series(max),
        vec![(0, 9.0), (10_000_000, 19.0), (20_000_000, 29.0)]
    );
    let on = store
        .query_telemetry(query("on", Aggregation::Sum))
        .await
        .unwrap();
    assert_eq!(
        series(on),
        vec![(0, 5.0), (10_000_000, 5.0), (20_000_000, 5.0)]
    );
    let count = store
        .query_telemetry(query("flow", Aggregation::Count))
        .await
        .unwrap();
    assert_eq!(
        series(count),
        vec![(0, 10.0), (10_000_000, 10.0), (20_000_000, 10.0)]
    );
    assert!(
        store
            .query_telemetry(query("label", Aggregation::Mean))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(Aggregation::parse("median"), None);
}

/// The pages a server starts its actors from hold each device's twin, open commands, waiting
/// direct messages and last presence event, the same as the one-device reads.
#[tokio::test]
async fn device_states_come_in_pages_with_everything_an_actor_needs() {
    use fleetlink_core::twin::{TwinDoc, TwinPatch};
    use fleetlink_store::{DirectRecord, NewCommand, PresenceRecord, TwinSide};

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("fleet.db"), SqliteOptions::default()).unwrap();
    for name in ["crane-c", "crane-a", "crane-b"] {
        provision(&store, name).await;
    }
    let mut desired = TwinDoc::new();
    desired
        .apply(&TwinPatch::parse(r#"{"boom": 12}"#).unwrap(), 5)
        .unwrap();
    store
        .save_twin(&id("crane-b"), TwinSide::Desired, &desired)
        .await
        .unwrap();
    let (command, _) = store
        .insert_command(NewCommand {
            device: id("crane-c"),
            name: "lift".into(),
            args_json: "{}".into(),
            idempotency_key: None,
            concurrent: false,
            created_us: 6,
            deadline_us: i64::MAX,
        })
        .await
        .unwrap();
    let online = PresenceRecord {
        online: true,
        at_us: 7,
        reason: String::new(),
        remote_addr: "127.0.0.1:9".into(),
        session: 3,
    };
    store
        .record_presence(&id("crane-a"), online.clone())
        .await
        .unwrap();
    let direct = store
        .insert_direct(DirectRecord {
            id: 0,
            to: id("crane-a"),
            from: id("crane-b"),
            payload: b"hook".to_vec(),
            sent_us: 8,
            expires_us: i64::MAX,
        })
        .await
        .unwrap();

    let first = store.device_states(None, 2).await.unwrap();
    let names: Vec<_> = first.iter().map(|s| s.record.id.as_str()).collect();
    assert_eq!(names, ["crane-a", "crane-b"]);
    assert_eq!(first[0].last_presence.as_ref(), Some(&online));
    assert_eq!(first[0].pending_direct.len(), 1);
    assert_eq!(first[0].pending_direct[0].id, direct);
    assert_eq!(first[0].pending_direct[0].payload, b"hook");
    assert_eq!(first[1].twin.desired, desired);
    assert!(first[1].open_commands.is_empty() && first[1].last_presence.is_none());
    let rest = store.device_states(Some(id("crane-b")), 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].open_commands, vec![command]);
    assert!(
        store
            .device_states(Some(id("crane-c")), 2)
            .await
            .unwrap()
            .is_empty()
    );

    let one = store.device_state(&id("crane-a")).await.unwrap().unwrap();
    assert_eq!(one.last_presence, Some(online));
    assert_eq!(one.twin, store.twin(&id("crane-a")).await.unwrap());
    assert!(store.device_state(&id("nobody")).await.unwrap().is_none());
}

/// The group-commit wait is for writers with company: one write at a time (a command, a single
/// device) is committed at once, however long `commit_delay` is.
#[tokio::test]
async fn a_lone_write_does_not_wait_for_the_group_commit_delay() {
    use fleetlink_store::PresenceRecord;

    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        commit_delay: std::time::Duration::from_secs(5),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path().join("fleet.db"), options).unwrap();
    provision(&store, "buoy-1").await;
    let started = std::time::Instant::now();
    for at_us in 1..=3 {
        let event = PresenceRecord {
            online: at_us % 2 == 1,
            at_us,
            reason: String::new(),
            remote_addr: String::new(),
            session: 1,
        };
        store.record_presence(&id("buoy-1"), event).await.unwrap();
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "three lone writes took {:?}",
        started.elapsed()
    );
    assert_eq!(
        store
            .presence_history(&id("buoy-1"), 10)
            .await
            .unwrap()
            .len(),
        3
    );
}

fn all_of(device: &str) -> TelemetryQuery {
    TelemetryQuery {
        device: id(device),
        metric: None,
        start_us: None,
        end_us: None,
        limit: None,
        every_us: None,
        agg: Default::default(),
    }
}

/// (metric, time, seq) of each point read back, in the order read.
fn keys(points: &[fleetlink_store::StoredPoint]) -> Vec<(String, i64, u64)> {
    points
        .iter()
        .map(|p| (p.metric.as_str().to_owned(), p.time_us, p.seq))
        .collect()
}

#[tokio::test]
async fn late_points_of_a_slow_device_read_back_in_time_order_from_merged_chunks() {
    // a fold after every commit: each commit leaves one-point chunks, which compaction merges
    late_points_read_back_in_time_order(std::time::Duration::ZERO).await;
}

#[tokio::test]
async fn late_points_waiting_in_the_journal_read_back_in_time_order_among_chunks() {
    // no fold until the store closes: the points wait in the overlay, except those of the few
    // commits that hold several batches... which are small too; readers merge them in
    late_points_read_back_in_time_order(std::time::Duration::from_secs(3600)).await;
}

async fn late_points_read_back_in_time_order(fold_interval: std::time::Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let options = SqliteOptions {
        fold_interval,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&path, options).unwrap();
    provision(&store, "meter-1").await;
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    // 1200 batches of one point each, times shuffled (late history mixed in), every tenth one
    // at the same time as another point; plus a second metric every 100th batch.
    let mut expected = Vec::new();
    for seq in 1..=1200u64 {
        let t = ((seq * 7919) % 1200) as i64 / if seq % 10 == 0 { 2 } else { 1 };
        let mut points = vec![point("kwh", t, Value::Int(seq as i64))];
        expected.push(("kwh".to_owned(), t, seq));
        if seq % 100 == 0 {
            points.push(point("volts", -t, Value::Double(seq as f64)));
            expected.push(("volts".to_owned(), -t, seq));
        }
        append(&store, &listener, "meter-1", seq, points).await;
        if seq % 300 != 0 {
            // a commit per batch (a slow device), except for a few batches that commit together
            rx.wait_for(|d| *d >= seq).await.unwrap();
        }
    }
    rx.wait_for(|d| *d >= 1200).await.unwrap();
    expected.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));

    let all = store.query_telemetry(all_of("meter-1")).await.unwrap();
    assert_eq!(keys(&all), expected);
    assert!(all.iter().all(|p| match (p.metric.as_str(), &p.value) {
        ("kwh", Value::Int(v)) => *v as u64 == p.seq,
        ("volts", Value::Double(v)) => *v as u64 == p.seq,
        _ => false,
    }));
    let columns = store
        .query_telemetry_columns(all_of("meter-1"))
        .await
        .unwrap();
    assert_eq!(columns.len(), 2);
    assert!(matches!(
        columns[0].values,
        fleetlink_store::ValueColumn::Int(_)
    ));
    let flat: Vec<_> = columns
        .iter()
        .flat_map(|c| {
            (0..c.len()).map(|i| (c.metric.as_str().to_owned(), c.time_us[i], c.values.get(i)))
        })
        .collect();
    let rows: Vec<_> = all
        .iter()
        .map(|p| (p.metric.as_str().to_owned(), p.time_us, p.value.clone()))
        .collect();
    assert_eq!(flat, rows);

    // a time range and a limit cut the same sorted sequence
    let ranged = store
        .query_telemetry(TelemetryQuery {
            metric: Some(MetricName::new("kwh").unwrap()),
            start_us: Some(300),
            end_us: Some(310),
            ..all_of("meter-1")
        })
        .await
        .unwrap();
    let want: Vec<_> = expected
        .iter()
        .filter(|k| k.0 == "kwh" && (300..310).contains(&k.1))
        .cloned()
        .collect();
    assert_eq!(keys(&ranged), want);
    assert!(!want.is_empty());
    let limited = store
        .query_telemetry(TelemetryQuery {
            limit: Some(25),
            ..all_of("meter-1")
        })
        .await
        .unwrap();
    assert_eq!(keys(&limited), expected[..25].to_vec());

    // the small chunks were merged: far fewer chunks than commits
    let writer = store.writer_handle();
    drop(store);
    assert!(writer.join(std::time::Duration::from_secs(30)));
    if !fold_interval.is_zero() {
        // one fold made one chunk per metric; they read back the same
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let all = store.query_telemetry(all_of("meter-1")).await.unwrap();
        assert_eq!(keys(&all), expected);
        return;
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (chunks, largest): (i64, i64) = conn
        .query_row(
            "SELECT count(*), max(points) FROM telemetry_chunks",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // kwh: one chunk of 1024, then a tail of merged 128-point chunks and fewer than 128 one-point
    // chunks; volts: 12 one-point chunks
    assert!(chunks <= 80, "{chunks} chunks for 1212 points");
    assert!(largest >= 1_000, "largest chunk {largest} points");
}

/// A database written by a newer fleetlink (a schema this one does not know, such as chunks it
/// cannot decode) is refused with a clear error rather than opened and misread.
#[tokio::test]
async fn a_database_from_a_newer_fleetlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let writer = store.writer_handle();
    drop(store);
    assert!(writer.join(std::time::Duration::from_secs(10)));
    let current: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", current + 1)
        .unwrap();
    let e = SqliteStore::open(&path, SqliteOptions::default()).unwrap_err();
    let message = e.to_string();
    assert!(
        message.contains(&format!("schema version {}", current + 1))
            && message.contains("upgrade fleetlink"),
        "{message}"
    );
}

#[tokio::test]
async fn a_version_2_database_keeps_its_telemetry_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    provision(&store, "old-1").await;
    let writer = store.writer_handle();
    drop(store);
    assert!(
        writer.join(std::time::Duration::from_secs(10)),
        "the writer stopped"
    );
    {
        // what fleetlink before schema version 3 wrote: a row per point
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE telemetry (
                device INTEGER NOT NULL, metric INTEGER NOT NULL, time_us INTEGER NOT NULL,
                seq INTEGER NOT NULL, idx INTEGER NOT NULL, received_us INTEGER NOT NULL,
                kind INTEGER NOT NULL, value ANY,
                lat REAL, lon REAL, alt REAL, speed REAL, heading REAL, accuracy REAL,
                PRIMARY KEY (device, metric, time_us, seq, idx)
             ) WITHOUT ROWID, STRICT;
             INSERT INTO metrics (id, name) VALUES (7, 'temp'), (8, 'pos');
             PRAGMA user_version = 2;",
        )
        .unwrap();
        let device: i64 = conn
            .query_row("SELECT id FROM devices WHERE name = 'old-1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        for i in 0..5000i64 {
            conn.execute(
                "INSERT INTO telemetry (device, metric, time_us, seq, idx, received_us, kind, value)
                 VALUES (?1, 7, ?2, ?3, 0, 99, 1, ?4)",
                rusqlite::params![device, i * 10, i + 1, i as f64 / 2.0],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO telemetry (device, metric, time_us, seq, idx, received_us, kind, value, lat, lon, speed)
             VALUES (?1, 8, 5, 1, 1, 99, 5, NULL, 52.5, 13.4, 3.0)",
            [device],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let all = store.query_telemetry(all_of("old-1")).await.unwrap();
    assert_eq!(all.len(), 5001);
    assert!(all[..5000].iter().enumerate().all(|(i, p)| {
        p.metric.as_str() == "temp"
            && p.time_us == i as i64 * 10
            && p.seq == i as u64 + 1
            && p.received_us == 99
            && p.value == Value::Double(i as f64 / 2.0)
    }));
    assert_eq!(
        all[5000].value,
        Value::Geo(GeoPosition {
            lat: 52.5,
            lon: 13.4,
            alt_m: None,
            speed_mps: Some(3.0),
            heading_deg: None,
            accuracy_m: None,
        })
    );
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 6);
    let old: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'telemetry'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0, "the row table is gone");
}

/// Sends `batches` batches of `metric` to a store that folds after every commit, one commit per
/// batch: most batches hold one point (folded into one-point chunks, which compaction merges),
/// every 50th holds 40 (a chunk at once, arriving while 17 one-point chunks wait for their
/// merge). Points are 1 ms apart, valued by `value(time)`. Returns what was sent, as (time,
/// value), after closing the store so that the file can be read.
async fn send_mostly_single_points(
    path: &std::path::Path,
    device: &str,
    metric: &str,
    batches: u64,
    value: impl Fn(i64) -> Value,
) -> Vec<(i64, Value)> {
    let options = SqliteOptions {
        fold_interval: std::time::Duration::ZERO,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(path, options).unwrap();
    provision(&store, device).await;
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    let mut t = 0i64;
    let mut sent = Vec::new();
    for seq in 1..=batches {
        let n = if seq % 50 == 0 { 40 } else { 1 };
        let points: Vec<Point> = (0..n)
            .map(|_| {
                t += 1_000;
                point(metric, t, value(t))
            })
            .collect();
        sent.extend(points.iter().map(|p| (p.time_us, p.value.clone())));
        append(&store, &listener, device, seq, points).await;
        rx.wait_for(|d| *d >= seq).await.unwrap();
    }
    let all = store.query_telemetry(all_of(device)).await.unwrap();
    let read: Vec<(i64, Value)> = all.iter().map(|p| (p.time_us, p.value.clone())).collect();
    assert_eq!(read, sent, "every point reads back, in time order");
    let writer = store.writer_handle();
    drop(store);
    assert!(writer.join(std::time::Duration::from_secs(30)));
    sent
}

#[tokio::test]
async fn merged_chunks_of_a_device_whose_clock_moves_forward_do_not_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let sent =
        send_mostly_single_points(&path, "gauge-1", "level", 3000, |t| Value::Double(t as f64))
            .await;
    assert_eq!(sent.len(), 3000 + 60 * 39);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn
        .prepare("SELECT start_us, end_us, points FROM telemetry_chunks ORDER BY start_us")
        .unwrap();
    let chunks: Vec<(i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for w in chunks.windows(2) {
        assert!(
            w[1].0 > w[0].1,
            "chunk {:?} overlaps chunk {:?}",
            w[1],
            w[0]
        );
    }
    // five chunks of 1024+ points, then a tail of at most 8 merged and 128 tiny chunks
    assert!(chunks.len() < 5 + 8 + 128, "{} chunks", chunks.len());
    assert!(chunks.iter().filter(|c| c.2 >= 1_024).count() >= 4);
}

/// String telemetry that repeats (a state) is dictionary-coded in its chunks, through commits,
/// folds and compaction merges alike: every point reads back, and the blobs hold each distinct
/// string about once per chunk rather than once per point.
#[tokio::test]
async fn repeated_strings_read_back_whole_and_are_stored_about_once_per_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let running = format!("running: {}", "x".repeat(76));
    let sent = send_mostly_single_points(&path, "press-1", "state", 1_500, |t| {
        Value::String(if t % 7_000 == 0 {
            "stopped".to_owned()
        } else {
            running.clone()
        })
    })
    .await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (chunks, bytes): (i64, i64) = conn
        .query_row(
            "SELECT count(*), sum(length(data)) FROM telemetry_chunks",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // as plain strings the values alone would take 86 bytes a point
    let points = sent.len() as i64;
    assert!(
        bytes < points * 12 + chunks * (86 + 8),
        "{bytes} bytes in {chunks} chunks for {points} points"
    );
}

/// `update_command_then` tells its callback once the write is durable: a read made from inside
/// the callback already sees the new state; an unknown command is an error. With the writer idle
/// the write is committed on the calling thread, and the callback called before the call
/// returns; while another connection holds the write lock, the call does not wait for it: the
/// write goes to the writer thread, which tells the callback once it could commit.
#[tokio::test]
async fn update_command_then_answers_from_the_writer_once_durable() {
    use fleetlink_core::command::CommandState;
    use fleetlink_store::{CommandUpdate, NewCommand};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    provision(&store, "valve-1").await;
    let (command, _) = store
        .insert_command(NewCommand {
            device: id("valve-1"),
            name: "open".into(),
            args_json: "{}".into(),
            idempotency_key: None,
            concurrent: false,
            created_us: 1,
            deadline_us: i64::MAX,
        })
        .await
        .unwrap();
    let update = |id| CommandUpdate {
        id,
        state: CommandState::Succeeded,
        history: vec![(CommandState::Queued, 1), (CommandState::Succeeded, 2)],
        attempts: 1,
        result_json: Some("true".into()),
        error: None,
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let reader = path.clone();
    store.update_command_then(
        update(command.id),
        Box::new(move |written| {
            // Another connection, on this thread: what it reads is committed.
            let conn = rusqlite::Connection::open(&reader).unwrap();
            let state: String = conn
                .query_row(
                    "SELECT state FROM commands WHERE id = ?1",
                    [command.id as i64],
                    |r| r.get(0),
                )
                .unwrap();
            let thread = std::thread::current().name().map(str::to_owned);
            let _ = tx.send((written, state, thread));
        }),
    );
    let (written, state, thread) = rx.try_recv().expect("committed on the calling thread");
    written.unwrap();
    assert_eq!(state, "succeeded");
    assert_eq!(thread, std::thread::current().name().map(str::to_owned));

    // A registry write (another connection) holds the write lock: the call returns without
    // waiting for it, and the writer thread commits once it is let go.
    let registry = rusqlite::Connection::open(&path).unwrap();
    registry.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    store.update_command_then(
        update(command.id),
        Box::new(move |written| {
            let thread = std::thread::current().name().map(str::to_owned);
            let _ = tx.send((written, thread));
        }),
    );
    assert!(matches!(
        rx.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Empty)
    ));
    registry.execute_batch("COMMIT").unwrap();
    let (written, thread) = rx.await.unwrap();
    written.unwrap();
    assert_eq!(thread.as_deref(), Some("fleetlink-store-writer"));

    let (tx, rx) = tokio::sync::oneshot::channel();
    store.update_command_then(
        update(command.id + 100),
        Box::new(move |written| {
            let _ = tx.send(written);
        }),
    );
    match rx.await.unwrap() {
        Err(StoreError::UnknownCommand(unknown)) => assert_eq!(unknown, command.id + 100),
        other => panic!("expected an unknown command, got {other:?}"),
    }
}

/// A device's seq, point count and last value per metric, as the store reports them.
async fn bookkeeping(
    store: &SqliteStore,
    device: &str,
) -> (u64, u64, BTreeMap<String, (i64, Value)>) {
    let d = store.device(&id(device)).await.unwrap().unwrap();
    let last = d
        .last_values
        .into_iter()
        .map(|v| (v.metric.as_str().to_owned(), (v.time_us, v.value)))
        .collect();
    (d.last_seq, d.point_count, last)
}

/// What the `devices` table and the journal hold for `device`, read from the file directly.
fn on_disk(path: &std::path::Path, device: &str) -> (i64, i64, i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let (seq, count) = conn
        .query_row(
            "SELECT last_seq, point_count FROM devices WHERE name = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let journal = conn
        .query_row("SELECT count(*) FROM device_journal", [], |r| r.get(0))
        .unwrap();
    (seq, count, journal)
}

/// Options under which the writer folds only when it stops (or a million points wait).
fn no_timed_folds() -> SqliteOptions {
    SqliteOptions {
        fold_interval: std::time::Duration::from_secs(3600),
        ..SqliteOptions::default()
    }
}

/// The bytes of the telemetry log of the database at `path`.
fn log_bytes(path: &std::path::Path) -> Vec<u8> {
    let mut log = path.as_os_str().to_owned();
    log.push("-tlog");
    std::fs::read(log).unwrap()
}

/// Copies the database at `from` as it is on disk (the file, its WAL and its telemetry log) to
/// `to`: what a crash leaves.
fn copy_as_crashed(from: &std::path::Path, to: &std::path::Path) {
    for suffix in ["", "-wal", "-tlog"] {
        let (mut a, mut b) = (from.as_os_str().to_owned(), to.as_os_str().to_owned());
        a.push(suffix);
        b.push(suffix);
        std::fs::copy(a, b).unwrap();
    }
}

/// Between folds, a commit of small batches is a record appended to the telemetry log, and any
/// other commit appends the device bookkeeping to a journal table, instead of updating the
/// `devices` and `last_values` tables. Readers see both at once, and a crash before the fold loses
/// none of it: opening the store replays the log and folds the journal, and the seq watermark
/// still refuses resends.
#[tokio::test]
async fn device_bookkeeping_in_the_journal_survives_a_crash_before_the_fold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let options = no_timed_folds();
    let store = SqliteStore::open(&path, options.clone()).unwrap();
    provision(&store, "truck-1").await;
    provision(&store, "buoy-22").await;
    let (tx, mut rx) = watch::channel(0);
    let truck = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    append(
        &store,
        &truck,
        "truck-1",
        1,
        vec![
            point("fuel", 10, Value::Double(0.9)),
            point("speed", 10, Value::Int(50)),
        ],
    )
    .await;
    rx.wait_for(|d| *d >= 1).await.unwrap();
    // a late point does not replace the last value
    append(
        &store,
        &truck,
        "truck-1",
        2,
        vec![
            point("fuel", 20, Value::Double(0.8)),
            point("fuel", 5, Value::Double(0.95)),
        ],
    )
    .await;
    rx.wait_for(|d| *d >= 2).await.unwrap();
    append(&store, &truck, "truck-1", 3, vec![]).await; // no points, but the seq moves
    rx.wait_for(|d| *d >= 3).await.unwrap();
    let after_small = log_bytes(&path).len();
    let (tx, mut rx) = watch::channel(0);
    let buoy = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    // 40 points of one metric: a group large enough for a chunk, so this commit goes to SQLite
    let mut points = vec![point("door", 1, Value::Bool(true))];
    points.extend((0..40).map(|t| point("depth", t, Value::Int(100 + t))));
    append(&store, &buoy, "buoy-22", 7, points).await;
    rx.wait_for(|d| *d >= 7).await.unwrap();
    assert_eq!(
        log_bytes(&path).len(),
        after_small,
        "a commit with a large group is not logged"
    );
    assert!(after_small > 16, "the small commits are in the log");

    let truck_expected = (
        3,
        4,
        BTreeMap::from([
            ("fuel".to_owned(), (20, Value::Double(0.8))),
            ("speed".to_owned(), (10, Value::Int(50))),
        ]),
    );
    let buoy_expected = (
        7,
        41,
        BTreeMap::from([
            ("door".to_owned(), (1, Value::Bool(true))),
            ("depth".to_owned(), (39, Value::Int(139))),
        ]),
    );
    assert_eq!(bookkeeping(&store, "truck-1").await, truck_expected);
    assert_eq!(bookkeeping(&store, "buoy-22").await, buoy_expected);
    assert_eq!(store.point_count().await.unwrap(), 45);

    // A crash: the files as they are on disk while the store runs.
    let crashed = tempfile::tempdir().unwrap();
    let crashed_path = crashed.path().join("fleet.db");
    copy_as_crashed(&path, &crashed_path);
    let (seq, count, journal) = on_disk(&crashed_path, "truck-1");
    assert_eq!((seq, count), (0, 0), "the tables wait for the fold");
    assert_eq!(
        journal, 2,
        "one row per device and metric of the SQLite commit"
    );
    let chunks: i64 = rusqlite::Connection::open(&crashed_path)
        .unwrap()
        .query_row("SELECT count(*) FROM telemetry_chunks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        chunks, 1,
        "only the large group is a chunk: small ones wait in the log and the journal"
    );

    // A graceful close folds.
    let writer = store.writer_handle();
    drop(store);
    assert!(writer.join(std::time::Duration::from_secs(30)));
    assert_eq!(on_disk(&path, "truck-1"), (3, 4, 0));

    // Opening the crashed copy replays its log and folds its journal.
    let store = SqliteStore::open(&crashed_path, options).unwrap();
    assert_eq!(on_disk(&crashed_path, "truck-1"), (3, 4, 0));
    assert_eq!(
        log_bytes(&crashed_path).len(),
        16,
        "the replayed log is emptied"
    );
    assert_eq!(bookkeeping(&store, "truck-1").await, truck_expected);
    assert_eq!(bookkeeping(&store, "buoy-22").await, buoy_expected);
    assert_eq!(store.point_count().await.unwrap(), 45);
    // the watermark came back with it: a resend is not stored again
    let (tx, mut rx) = watch::channel(0);
    let again = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    append(
        &store,
        &again,
        "truck-1",
        2,
        vec![point("fuel", 20, Value::Double(0.8))],
    )
    .await;
    rx.wait_for(|d| *d >= 3).await.unwrap();
    assert_eq!(store.point_count().await.unwrap(), 45);
    let truck = store.query_telemetry(all_of("truck-1")).await.unwrap();
    let fuel: Vec<(i64, Value)> = truck
        .iter()
        .filter(|p| p.metric.as_str() == "fuel")
        .map(|p| (p.time_us, p.value.clone()))
        .collect();
    assert_eq!(
        fuel,
        vec![
            (5, Value::Double(0.95)),
            (10, Value::Double(0.9)),
            (20, Value::Double(0.8))
        ]
    );
    assert_eq!(truck.len(), 4);
    let buoy = store.query_telemetry(all_of("buoy-22")).await.unwrap();
    assert_eq!(buoy.len(), 41);
}

/// A fold marks the telemetry log's generation as folded in its own transaction, then empties the
/// log. A crash between the two leaves a log whose records are stored already: opening the store
/// must not store them twice. A record torn by a power loss is dropped, and the ones before it
/// are kept.
#[tokio::test]
async fn a_telemetry_log_already_folded_is_not_replayed_and_a_torn_record_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let options = no_timed_folds();
    let store = SqliteStore::open(&path, options.clone()).unwrap();
    provision(&store, "pump-1").await;
    let (tx, mut rx) = watch::channel(0);
    let pump = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    // each commit is a record in the log
    for seq in 1..=3 {
        append(
            &store,
            &pump,
            "pump-1",
            seq,
            vec![point("rpm", seq as i64, Value::Int(1000 + seq as i64))],
        )
        .await;
        rx.wait_for(|d| *d >= seq).await.unwrap();
    }
    let unfolded = log_bytes(&path);
    assert!(unfolded.len() > 16);
    let crashed = tempfile::tempdir().unwrap();
    let torn_path = crashed.path().join("fleet.db");
    copy_as_crashed(&path, &torn_path);

    // A graceful close folds and empties the log; putting the log back as it was before is
    // a crash between the fold's commit and the emptying.
    let writer = store.writer_handle();
    drop(store);
    assert!(writer.join(std::time::Duration::from_secs(30)));
    assert_eq!(log_bytes(&path).len(), 16);
    let mut log = path.as_os_str().to_owned();
    log.push("-tlog");
    std::fs::write(&log, &unfolded).unwrap();
    let store = SqliteStore::open(&path, options.clone()).unwrap();
    assert_eq!(store.point_count().await.unwrap(), 3);
    assert_eq!(
        store.query_telemetry(all_of("pump-1")).await.unwrap().len(),
        3,
        "no point stored twice"
    );
    drop(store);

    // A power loss that cut the last record short: the points before it come back.
    let mut torn_log = torn_path.as_os_str().to_owned();
    torn_log.push("-tlog");
    std::fs::write(&torn_log, &unfolded[..unfolded.len() - 3]).unwrap();
    let store = SqliteStore::open(&torn_path, options).unwrap();
    let (seq, count, _) = bookkeeping(&store, "pump-1").await;
    let times: Vec<i64> = store
        .query_telemetry(all_of("pump-1"))
        .await
        .unwrap()
        .iter()
        .map(|p| p.time_us)
        .collect();
    assert_eq!((seq, count, times), (2, 2, vec![1, 2]));
}

/// One store per database: a second one is refused while the first runs (its writer would fold
/// the same journal), and opens once the first has stopped.
#[tokio::test]
async fn a_database_is_open_in_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let first = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    provision(&first, "pump-1").await;
    let at_once = SqliteOptions {
        lock_wait: std::time::Duration::ZERO,
        ..SqliteOptions::default()
    };
    match SqliteStore::open(&path, at_once.clone()) {
        Err(StoreError::InUse(p)) => assert_eq!(p, path),
        other => panic!("expected InUse, got {other:?}"),
    }
    // a store that is stopping is waited for
    let writer = first.writer_handle();
    drop(first);
    let second = tokio::task::spawn_blocking({
        let path = path.clone();
        move || SqliteStore::open(&path, SqliteOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        writer.join(std::time::Duration::ZERO),
        "the first writer had stopped"
    );
    assert!(second.device(&id("pump-1")).await.unwrap().is_some());
}

/// Points of small batches wait in the journal until a fold; a query merges them with the chunks
/// of large batches, in (time, seq, position) order, within ranges and limits, in every form —
/// and reads the same once they are folded into chunks.
#[tokio::test]
async fn waiting_points_and_chunks_read_back_as_one_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let waiting = SqliteOptions {
        fold_interval: std::time::Duration::from_secs(3600),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&path, waiting).unwrap();
    provision(&store, "probe-1").await;
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    // 40 points: a chunk at once
    let big = (0..40).map(|t| point("temp", t, Value::Int(t))).collect();
    append(&store, &listener, "probe-1", 1, big).await;
    rx.wait_for(|d| *d >= 1).await.unwrap();
    // small batches: they wait; one point is late, at the time of a chunk point
    append(
        &store,
        &listener,
        "probe-1",
        2,
        vec![
            point("temp", 100, Value::Int(100)),
            point("temp", 5, Value::Int(-5)),
            point("hum", 7, Value::Double(0.5)),
        ],
    )
    .await;
    rx.wait_for(|d| *d >= 2).await.unwrap();
    append(
        &store,
        &listener,
        "probe-1",
        3,
        vec![point("temp", 50, Value::Int(50))],
    )
    .await;
    rx.wait_for(|d| *d >= 3).await.unwrap();

    let mut temp: Vec<(String, i64, u64)> = (0..40).map(|t| ("temp".into(), t, 1)).collect();
    temp.insert(6, ("temp".into(), 5, 2)); // after (5, seq 1)
    temp.push(("temp".into(), 50, 3));
    temp.push(("temp".into(), 100, 2));
    let mut expected = vec![("hum".to_owned(), 7, 2)];
    expected.extend(temp.iter().cloned());
    // metrics come in row-id order: temp was seen first
    expected.rotate_left(1);

    let check = |store: SqliteStore| {
        let expected = expected.clone();
        let temp = temp.clone();
        async move {
            let all = store.query_telemetry(all_of("probe-1")).await.unwrap();
            assert_eq!(keys(&all), expected);
            assert_eq!(all[6].value, Value::Int(-5));
            let limited = store
                .query_telemetry(TelemetryQuery {
                    limit: Some(8),
                    ..all_of("probe-1")
                })
                .await
                .unwrap();
            assert_eq!(keys(&limited), expected[..8].to_vec());
            let ranged = store
                .query_telemetry(TelemetryQuery {
                    metric: Some(MetricName::new("temp").unwrap()),
                    start_us: Some(38),
                    end_us: Some(101),
                    ..all_of("probe-1")
                })
                .await
                .unwrap();
            let want: Vec<_> = temp.iter().filter(|k| k.1 >= 38).cloned().collect();
            assert_eq!(keys(&ranged), want);
            let columns = store
                .query_telemetry_columns(all_of("probe-1"))
                .await
                .unwrap();
            let times: Vec<Vec<i64>> = columns.iter().map(|c| c.time_us.clone()).collect();
            assert_eq!(
                times,
                vec![temp.iter().map(|k| k.1).collect::<Vec<_>>(), vec![7]]
            );
            let counts = store
                .query_telemetry(TelemetryQuery {
                    metric: Some(MetricName::new("temp").unwrap()),
                    every_us: Some(50),
                    agg: fleetlink_store::Aggregation::Count,
                    ..all_of("probe-1")
                })
                .await
                .unwrap();
            let counts: Vec<(i64, Value)> =
                counts.into_iter().map(|p| (p.time_us, p.value)).collect();
            assert_eq!(
                counts,
                vec![
                    (0, Value::Double(41.0)),
                    (50, Value::Double(1.0)),
                    (100, Value::Double(1.0))
                ]
            );
            assert_eq!(store.point_count().await.unwrap(), 44);
            store
        }
    };
    let store = check(store).await;
    let writer = store.writer_handle();
    drop(store);
    assert!(writer.join(std::time::Duration::from_secs(30)));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (chunks, journal): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM telemetry_chunks), (SELECT count(*) FROM device_journal)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (chunks, journal),
        (3, 0),
        "the 40-point chunk and one per metric from the fold"
    );
    drop(conn);
    check(SqliteStore::open(&path, SqliteOptions::default()).unwrap()).await;
}

/// A device that sends most points in large batches (chunks at once) and some in small ones
/// (they wait in the journal; the fold writes them as a chunk spanning the large chunks' times):
/// the column query reads them back in time order, the same as the row query.
#[tokio::test]
async fn folded_points_spanning_other_chunks_read_back_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let options = SqliteOptions {
        fold_interval: std::time::Duration::from_secs(3600),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&path, options).unwrap();
    provision(&store, "truck-1").await;
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    let mut expected = Vec::new();
    let mut seq = 0;
    for k in 0..20i64 {
        // 100 points at even times: a chunk at once
        seq += 1;
        let big: Vec<Point> = (0..100)
            .map(|i| {
                point(
                    "speed",
                    k * 1_000 + 2 * i,
                    Value::Double((k * 1_000 + 2 * i) as f64),
                )
            })
            .collect();
        expected.extend(big.iter().map(|p| p.time_us));
        append(&store, &listener, "truck-1", seq, big).await;
        rx.wait_for(|d| *d >= seq).await.unwrap();
        // two points at odd times inside that chunk's span: they wait
        seq += 1;
        let small = vec![
            point(
                "speed",
                k * 1_000 + 11,
                Value::Double((k * 1_000 + 11) as f64),
            ),
            point(
                "speed",
                k * 1_000 + 151,
                Value::Double((k * 1_000 + 151) as f64),
            ),
        ];
        expected.extend(small.iter().map(|p| p.time_us));
        append(&store, &listener, "truck-1", seq, small).await;
        rx.wait_for(|d| *d >= seq).await.unwrap();
    }
    expected.sort_unstable();
    let writer = store.writer_handle();
    drop(store); // the fold writes the waiting points as chunks
    assert!(writer.join(std::time::Duration::from_secs(30)));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let overlapping: i64 = conn
        .query_row(
            "SELECT count(*) FROM telemetry_chunks a JOIN telemetry_chunks b
             ON a.id < b.id AND a.start_us <= b.end_us AND b.start_us <= a.end_us",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        overlapping > 0,
        "the test needs chunks that overlap in time"
    );
    drop(conn);

    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let columns = store
        .query_telemetry_columns(all_of("truck-1"))
        .await
        .unwrap();
    assert_eq!(columns.len(), 1);
    assert_eq!(columns[0].time_us, expected);
    let values: Vec<f64> = (0..columns[0].len())
        .map(|i| columns[0].values.number(i).unwrap())
        .collect();
    let want: Vec<f64> = expected.iter().map(|&t| t as f64).collect();
    assert_eq!(values, want);
    let rows = store.query_telemetry(all_of("truck-1")).await.unwrap();
    assert_eq!(rows.iter().map(|p| p.time_us).collect::<Vec<_>>(), expected);
    // a range cuts through chunks of both kinds
    let ranged = store
        .query_telemetry_columns(TelemetryQuery {
            start_us: Some(5_010),
            end_us: Some(7_152),
            ..all_of("truck-1")
        })
        .await
        .unwrap();
    let want: Vec<i64> = expected
        .iter()
        .copied()
        .filter(|t| (5_010..7_152).contains(t))
        .collect();
    assert_eq!(ranged[0].time_us, want);
}

/// `try_append` queues a batch while the queue has room and hands it back once it is full (here:
/// the writer is held up by another connection's write lock); `append` then waits for room, and
/// every batch is stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_append_hands_a_batch_back_when_the_queue_is_full_and_append_stores_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let options = SqliteOptions {
        queue_batches: 1,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&path, options).unwrap();
    provision(&store, "pump-1").await;
    let (tx, mut rx) = watch::channel(0);
    let listener = Arc::new(Watch(tx, Mutex::new(Vec::new())));
    let batch = |seq: u64| AppendBatch {
        device: id("pump-1"),
        batch: Batch {
            seq,
            points: vec![point("rpm", seq as i64, Value::Int(seq as i64))],
        },
        received_us: 1_000,
        listener: listener.clone(),
    };

    // Another connection holds the write lock: the writer takes one batch and waits for it.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut seq = 0;
    let handed_back = loop {
        seq += 1;
        assert!(seq <= 100, "the queue of one batch never filled");
        if let Some(b) = store.try_append(batch(seq)).unwrap() {
            break b;
        }
    };
    assert!(seq > 1, "the first batch found the empty queue full");
    assert_eq!(handed_back.batch.seq, seq);
    blocker.execute_batch("COMMIT").unwrap();

    store.append(handed_back).await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        rx.wait_for(|d| *d == seq),
    )
    .await
    .expect("the batches were not stored")
    .unwrap();
    assert!(listener.1.lock().unwrap().is_empty());
    let stored = store.query_telemetry(all_of("pump-1")).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=seq).collect::<Vec<_>>());
}
