//! Jobs end to end: rollout limits, the abort rule, cancellation, desired-state jobs and resuming
//! after a restart, against a real server with real devices.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use fleetlink_client::{
    CommandFailure, DeviceClient, DeviceId, Endpoint, FleetEvent, JobAction, JobInfo, JobSpec,
    OperatorClient, Subscription,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn job_where(
    op: &OperatorClient,
    id: u64,
    what: &str,
    check: impl Fn(&JobInfo) -> bool,
) -> JobInfo {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let j = op.job(id).await.unwrap();
        if check(&j) {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_200_devices_aborts_when_too_many_fail() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let endpoint = Endpoint::for_server(ts.address.addr).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut devices = Vec::new();
    for i in 0..200 {
        let name = format!("meter-{i:03}");
        let token = op
            .provision_device(
                &DeviceId::new(&name).unwrap(),
                [("fw".to_owned(), "1".to_owned())].into(),
            )
            .await
            .unwrap();
        let mut config = ts.device_config(&name, &token);
        config.endpoint = Some(endpoint.clone());
        let runs = runs.clone();
        // Every second device fails the update: a 50% failure ratio.
        let config = config.on_command("update", move |_| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if i % 2 == 0 {
                    Err(CommandFailure::failed("flash write failed"))
                } else {
                    Ok(json!("ok"))
                }
            }
        });
        devices.push(DeviceClient::connect(config).await.unwrap());
    }
    let mut progress = op
        .subscribe(Subscription::Jobs { job_id: 0 })
        .await
        .unwrap();
    let mut spec = JobSpec::new(
        "firmware 2",
        r#"tag.fw == "1""#,
        JobAction::Command {
            name: "update".into(),
            args: json!({"to": 2}),
            timeout: None,
        },
    );
    spec.max_in_flight = 10;
    spec.abort_failure_ratio = 0.3;
    spec.abort_min_finished = 20;
    let created = op.create_job(spec).await.unwrap();
    assert_eq!(created.targets, 200);
    let done = job_where(&op, created.id, "the job to stop", |j| {
        j.state != "running" && j.count("running") == 0
    })
    .await;
    assert_eq!(done.state, "aborted");
    assert!(
        done.reason.contains("above the 30% threshold"),
        "{}",
        done.reason
    );
    let finished = done.count("succeeded") + done.count("failed") + done.count("cancelled");
    assert!(done.count("failed") >= 7, "{done:?}");
    assert!(done.count("skipped") >= 150, "it stopped early: {done:?}");
    assert_eq!(finished + done.count("skipped"), 200, "{done:?}");
    assert_eq!(done.count("pending"), 0);
    // handlers ran only for the targets that started (never more than the finished ones)
    assert!(runs.load(Ordering::SeqCst) as u32 <= finished);
    assert!(done.finished_us >= done.created_us);
    // the progress stream saw the job running, then aborted
    let mut saw_running = false;
    loop {
        match progress.next_within(WAIT).await.unwrap().unwrap() {
            FleetEvent::Job(j) if j.state == "running" => saw_running = true,
            FleetEvent::Job(j) if j.state == "aborted" => break,
            FleetEvent::Job(_) | FleetEvent::Subscribed { .. } | FleetEvent::Overflow { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_running);
    let (code, _) = match op.cancel_job(created.id).await.unwrap_err() {
        fleetlink_client::ClientError::Server { code, message } => (code, message),
        other => panic!("{other}"),
    };
    assert_eq!(code, fleetlink_proto::v1::ErrorCode::Conflict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_and_a_cancelled_job_skips_the_rest() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let mut devices = Vec::new();
    for i in 0..8 {
        let name = format!("lamp-{i}");
        let token = provision(&op, &name).await;
        devices.push(
            DeviceClient::connect(ts.device_config(&name, &token))
                .await
                .unwrap(),
        );
    }
    let mut spec = JobSpec::new(
        "dim",
        r#"id ~ "lamp-*""#,
        JobAction::Desired(json!({"level": 30})),
    );
    spec.max_per_minute = 5;
    let job = op.create_job(spec).await.unwrap();
    // Five start at once, then the 60 s window holds the other three.
    let j = job_where(&op, job.id, "five done", |j| j.count("succeeded") == 5).await;
    assert_eq!(j.count("pending"), 3);
    let mut changed = 0;
    for d in &devices {
        if op.twin(d.id()).await.unwrap().desired == json!({"level": 30}) {
            changed += 1;
        }
    }
    assert_eq!(changed, 5);
    let cancelled = op.cancel_job(job.id).await.unwrap();
    assert_eq!(cancelled.state, "cancelled");
    let j = job_where(&op, job.id, "the cancel stored", |j| j.state == "cancelled").await;
    assert_eq!((j.count("succeeded"), j.count("skipped")), (5, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_bounds_concurrent_targets() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut devices = Vec::new();
    for i in 0..12 {
        let name = format!("valve-{i:02}");
        let token = provision(&op, &name).await;
        let (now, peak) = (now.clone(), peak.clone());
        let config = ts
            .device_config(&name, &token)
            .on_command("cycle", move |_| {
                let (now, peak) = (now.clone(), peak.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await; // a slow actuator
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(json!(null))
                }
            });
        devices.push(DeviceClient::connect(config).await.unwrap());
    }
    let mut spec = JobSpec::new(
        "cycle",
        "true",
        JobAction::Command {
            name: "cycle".into(),
            args: json!(null),
            timeout: None,
        },
    );
    spec.max_in_flight = 3;
    let job = op.create_job(spec).await.unwrap();
    let j = job_where(&op, job.id, "completion", |j| j.state == "completed").await;
    assert_eq!(j.count("succeeded"), 12);
    let peak = peak.load(Ordering::SeqCst);
    assert!((1..=3).contains(&peak), "peak concurrency {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_resumes_after_a_server_restart() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let mut tokens = Vec::new();
    for i in 0..3 {
        tokens.push(provision(&op, &format!("sign-{i}")).await);
    }
    // The devices are offline: the job's commands wait in their outboxes.
    let job = op
        .create_job(JobSpec::new(
            "greet",
            r#"id ~ "sign-*""#,
            JobAction::Command {
                name: "show".into(),
                args: json!("hello"),
                timeout: None,
            },
        ))
        .await
        .unwrap();
    // Stop the server at once, while the runner may still be queuing the commands: a shutdown
    // must not count as the targets failing (it did: the job ended "completed" with 0 succeeded).
    assert_eq!(job.targets, 3);
    let dir = ts.dir;
    let addr = ts.server.local_addr();
    op.close();
    ts.server.shutdown();
    let mut config = fleetlink_server::ServerConfig::local(dir.path());
    config.listen = addr;
    let server = fleetlink_server::Server::start(config).unwrap();
    let address =
        fleetlink_client::ServerAddress::local(addr, &dir.path().join("tls/ca.pem")).unwrap();
    let token = std::fs::read_to_string(server.admin_token_file()).unwrap();
    let op = OperatorClient::connect(fleetlink_client::OperatorConfig {
        server: address.clone(),
        token: token.trim().to_owned(),
    })
    .await
    .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut devices = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let runs = runs.clone();
        let config = fleetlink_client::DeviceConfig::new(
            address.clone(),
            DeviceId::new(format!("sign-{i}")).unwrap(),
            token.clone(),
        )
        .on_command("show", move |call| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(call.args)
            }
        });
        devices.push(DeviceClient::connect(config).await.unwrap());
    }
    let j = job_where(&op, job.id, "completion after the restart", |j| {
        j.state == "completed"
    })
    .await;
    assert_eq!(j.count("succeeded"), 3);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "each device ran the command once"
    );
    drop(server);
}
