//! Criterion micro-benchmarks: protobuf encode/decode of a telemetry batch, and the ingest path
//! (SDK → QUIC → session → actor → store → durable ack) against a plain tokio channel round trip.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fleetlink_proto::v1;
use prost::Message as _;

fn batch(points: usize) -> v1::TelemetryBatch {
    v1::TelemetryBatch {
        ack_now: false,
        seq: 1,
        points: (0..points)
            .map(|i| v1::TelemetryPoint {
                metric: "payload".into(),
                time_us: 1_700_000_000_000_000 + i as i64,
                value: Some(v1::Value {
                    kind: Some(v1::value::Kind::StringValue("x".repeat(84))),
                }),
            })
            .collect(),
    }
}

fn protobuf(c: &mut Criterion) {
    let b = batch(1000);
    let bytes = b.encode_to_vec();
    let mut g = c.benchmark_group("protobuf");
    g.throughput(criterion::Throughput::Elements(1000));
    g.bench_function("encode_batch_1000", |bench| {
        bench.iter(|| std::hint::black_box(&b).encode_to_vec())
    });
    g.bench_function("decode_batch_1000", |bench| {
        bench.iter(|| v1::TelemetryBatch::decode(std::hint::black_box(&bytes[..])).unwrap())
    });
    g.finish();
}

fn ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = fleetlink_server::Server::start(fleetlink_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        io_threads: 1,
        arbiters: 1,
        ..Default::default()
    })
    .unwrap();
    let token = std::fs::read_to_string(server.admin_token_file()).unwrap();
    let addr =
        fleetlink_client::ServerAddress::local(server.local_addr(), server.ca_cert_path().unwrap())
            .unwrap();
    let device = rt.block_on(async {
        let op = fleetlink_client::OperatorClient::connect(fleetlink_client::OperatorConfig {
            server: addr.clone(),
            token: token.trim().to_owned(),
        })
        .await
        .unwrap();
        let id = fleetlink_client::DeviceId::new("micro-1").unwrap();
        let tok = op.provision_device(&id, Default::default()).await.unwrap();
        fleetlink_client::DeviceClient::connect(fleetlink_client::DeviceConfig::new(addr, id, tok))
            .await
            .unwrap()
    });
    let points = |n: usize| -> Vec<fleetlink_client::Point> {
        (0..n)
            .map(|_| fleetlink_client::Point {
                metric: fleetlink_client::MetricName::new("payload").unwrap(),
                time_us: fleetlink_server::now_us(),
                value: fleetlink_client::Value::String("x".repeat(84)),
            })
            .collect()
    };
    let mut g = c.benchmark_group("ingest_path");
    g.throughput(criterion::Throughput::Elements(100));
    g.bench_function("fleetlink_100_points_to_durable_ack", |bench| {
        bench.iter(|| {
            rt.block_on(async {
                device.send(points(100)).await.unwrap();
                device.flush(Duration::from_secs(10)).await.unwrap();
            })
        })
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(
        Vec<fleetlink_client::Point>,
        tokio::sync::oneshot::Sender<()>,
    )>(64);
    rt.spawn(async move {
        while let Some((p, done)) = rx.recv().await {
            std::hint::black_box(p);
            let _ = done.send(());
        }
    });
    g.bench_function("tokio_channel_100_points_round_trip", |bench| {
        bench.iter(|| {
            rt.block_on(async {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                tx.send((points(100), done_tx)).await.unwrap();
                done_rx.await.unwrap();
            })
        })
    });
    g.finish();
    drop(device);
    server.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = protobuf, ingest
}
criterion_main!(benches);
