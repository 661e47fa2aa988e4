//! Twins, commands and presence history end to end: real QUIC on 127.0.0.1, real SQLite in a
//! temporary directory, server restarts on the same data dir.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use fleetlink_client::{
    ClientError, CommandFailure, CommandInfo, CommandRequest, CommandState, DesiredState,
    DeviceClient, DeviceConfig, DeviceId, OperatorClient,
};
use fleetlink_proto::v1::{
    CommandResult, ErrorCode, OperatorRequest, OperatorResponse, StreamHeader, StreamKind,
    operator_request, operator_response,
};
use fleetlink_server::{Server, ServerConfig};
use serde_json::json;
use tokio::sync::{Notify, watch};

const WAIT: Duration = Duration::from_secs(10);

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

/// A server, an operator, and one provisioned device: its token and id.
async fn with_device(name: &str) -> (TestServer, OperatorClient, String, DeviceId) {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, name).await;
    (ts, op, token, id(name))
}

/// Waits until the device's desired state satisfies `check`.
async fn desired_where(
    rx: &mut watch::Receiver<Option<DesiredState>>,
    check: impl Fn(&DesiredState) -> bool,
) -> DesiredState {
    let state = tokio::time::timeout(WAIT, rx.wait_for(|d| d.as_ref().is_some_and(&check)))
        .await
        .expect("the desired state never arrived")
        .unwrap();
    state.clone().unwrap()
}

async fn state_of(op: &OperatorClient, command: u64) -> CommandState {
    op.command(command).await.unwrap().state
}

async fn wait_state(op: &OperatorClient, command: u64, want: CommandState) {
    eventually(
        WAIT,
        &format!("command {command} {}", want.name()),
        || async { state_of(op, command).await == want },
    )
    .await;
}

fn server_error(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Server { code, message } => (code, message),
        other => panic!("expected a server error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_round_trip_and_delta_on_reconnect() {
    let (ts, op, token, truck) = with_device("truck-1").await;

    let dev = DeviceClient::connect(ts.device_config("truck-1", &token))
        .await
        .unwrap();
    let mut desired = dev.desired();
    let first = desired_where(&mut desired, |_| true).await;
    assert_eq!(first.delta, json!({}), "a new twin is in sync");

    let twin = op
        .set_desired(
            &truck,
            json!({"mode": "eco", "limits": {"speed": 80, "rpm": 3000}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(twin.desired_version, 1);
    let got = desired_where(&mut desired, |d| d.version == 1).await;
    assert_eq!(
        got.delta,
        json!({"mode": "eco", "limits": {"speed": 80, "rpm": 3000}})
    );

    let version = dev
        .report(json!({"mode": "eco", "limits": {"speed": 80}, "fw": "1.2"}))
        .await
        .unwrap();
    assert_eq!(version, 1);
    let twin = op.twin(&truck).await.unwrap();
    assert_eq!(
        twin.reported,
        json!({"mode": "eco", "limits": {"speed": 80}, "fw": "1.2"})
    );
    assert_eq!(twin.delta, json!({"limits": {"rpm": 3000}}));
    assert!(twin.reported_metadata["limits"]["speed"].as_i64().unwrap() > 0);
    // null deletes a reported field
    assert_eq!(dev.report(json!({"fw": null})).await.unwrap(), 2);

    // offline: the operator still reads and writes the twin; the device gets the delta on connect
    dev.close().await;
    let twin = op
        .set_desired(&truck, json!({"fan": true}), Some(1))
        .await
        .unwrap();
    assert_eq!(twin.desired_version, 2);
    assert_eq!(
        twin.reported,
        json!({"mode": "eco", "limits": {"speed": 80}})
    );
    let dev = DeviceClient::connect(ts.device_config("truck-1", &token))
        .await
        .unwrap();
    let mut desired = dev.desired();
    let got = desired_where(&mut desired, |_| true).await;
    assert_eq!(got.version, 2);
    assert_eq!(got.delta, json!({"limits": {"rpm": 3000}, "fan": true}));

    // and the twin survives a restart
    let dir = ts.dir;
    let addr = ts.server.local_addr();
    dev.close().await;
    eventually(WAIT, "the offline event", || async {
        !op.presence_history(&truck, 1).await.unwrap()[0].online
    })
    .await;
    op.close();
    ts.server.shutdown();
    let restarted = restart(&dir, addr);
    let op = operator_for(&restarted, &dir).await;
    let twin = op.twin(&truck).await.unwrap();
    assert_eq!(twin.desired_version, 2);
    assert_eq!(twin.reported_version, 2);
    // presence is restored from the stored history: offline since the close, last seen then
    let info = op.device(&truck).await.unwrap();
    assert!(!info.presence.online);
    assert_eq!(info.presence.offline_reason, "closed");
    assert!(info.presence.last_seen_us > 0 && info.presence.since_us > 0);
    assert_eq!(twin.delta, json!({"limits": {"rpm": 3000}, "fan": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_desired_version_is_a_conflict_naming_both_versions() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    provision(&op, "gate-1").await;
    let gate = id("gate-1");
    op.set_desired(&gate, json!({"open": false}), Some(0))
        .await
        .unwrap();
    op.set_desired(&gate, json!({"open": true}), Some(1))
        .await
        .unwrap();
    let (code, message) = server_error(
        op.set_desired(&gate, json!({"open": false}), Some(1))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::Conflict);
    assert!(message.contains("expected version 1"), "{message}");
    assert!(message.contains("current version is 2"), "{message}");
    assert_eq!(op.twin(&gate).await.unwrap().desired, json!({"open": true}));

    // bad patches are refused with the reason
    let (code, message) = server_error(
        op.set_desired(&gate, json!([1, 2]), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("JSON object"), "{message}");
    let (code, _) = server_error(op.twin(&id("nobody")).await.unwrap_err());
    assert_eq!(code, ErrorCode::NotFound);
}

fn echo_device(config: DeviceConfig, runs: Arc<AtomicUsize>) -> DeviceConfig {
    config
        .on_command("echo", move |call| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"echo": call.args}))
            }
        })
        .on_command("fail", |_| async {
            Err(CommandFailure::Failed {
                error: "motor jammed".into(),
                details: Some(json!({"amps": 12})),
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_offline_device_is_delivered_when_it_connects() {
    let (ts, op, token, pump) = with_device("pump-1").await;

    let sent = op
        .send_command(CommandRequest::new(pump.clone(), "echo").args(json!({"n": 7})))
        .await
        .unwrap();
    assert_eq!(sent.state, CommandState::Queued);
    let failing = op
        .send_command(CommandRequest::new(pump.clone(), "fail"))
        .await
        .unwrap();
    let unknown = op
        .send_command(CommandRequest::new(pump.clone(), "self-destruct"))
        .await
        .unwrap();
    let still = op
        .wait_command(sent.id, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(still.state, CommandState::Queued, "nobody to deliver it to");

    let runs = Arc::new(AtomicUsize::new(0));
    let dev = DeviceClient::connect(echo_device(
        ts.device_config("pump-1", &token),
        runs.clone(),
    ))
    .await
    .unwrap();
    let done = op.wait_command(sent.id, WAIT).await.unwrap();
    assert_succeeded_first_time(&done, json!({"echo": {"n": 7}}));
    assert_eq!(done.attempts, 1);

    let failed = op.wait_command(failing.id, WAIT).await.unwrap();
    assert_eq!(failed.state, CommandState::Failed);
    assert_eq!(failed.error.as_deref(), Some("motor jammed"));
    assert_eq!(failed.result, Some(json!({"amps": 12})));
    let rejected = op.wait_command(unknown.id, WAIT).await.unwrap();
    assert_eq!(rejected.state, CommandState::Rejected);
    assert!(rejected.error.unwrap().contains("no handler"));

    // run_command: the result, or a typed error
    let result = op
        .run_command(
            CommandRequest::new(pump.clone(), "echo").args(json!("hi")),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(result, json!({"echo": "hi"}));
    match op
        .run_command(CommandRequest::new(pump.clone(), "fail"), WAIT)
        .await
    {
        Err(ClientError::Command { state, error, .. }) => {
            assert_eq!(state, CommandState::Failed);
            assert_eq!(error, "motor jammed");
        }
        other => panic!("expected a failed command, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // listing, newest first, by state
    let all = op.list_commands(&pump, None, None, 0).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let failed = op
        .list_commands(&pump, Some(CommandState::Failed), None, 0)
        .await
        .unwrap();
    assert_eq!(failed.len(), 2);
    let page = op
        .list_commands(&pump, None, Some(all[1].id), 2)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![all[2].id, all[3].id]
    );
    dev.close().await;
}

/// `done` succeeded with `result` on its first delivery: queued, delivered, succeeded.
fn assert_succeeded_first_time(done: &CommandInfo, result: serde_json::Value) {
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.result, Some(result));
    assert_eq!(
        states(done),
        vec![
            CommandState::Queued,
            CommandState::Delivered,
            CommandState::Succeeded
        ]
    );
}

/// What the store holds of a command (not the actor's live state).
async fn stored_command(op: &OperatorClient, device: &DeviceId, id: u64) -> CommandInfo {
    op.list_commands(device, None, None, 0)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.id == id)
        .expect("the command is in the store")
}

fn states(c: &CommandInfo) -> Vec<CommandState> {
    c.history.iter().map(|h| h.0).collect()
}

/// A command answered at once is written once, when it finishes, and its stored history still
/// holds the delivery; one still running after the delivery write delay (50 ms) is stored as
/// delivered while it runs, so a restart would find it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_every_delivery_of_a_command() {
    let (ts, op, token, gate) = with_device("gate-1").await;
    let (release, released) = watch::channel(false);
    let config = echo_device(
        ts.device_config("gate-1", &token),
        Arc::new(AtomicUsize::new(0)),
    )
    .on_command("hold", move |_| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            Ok(json!("released"))
        }
    });
    let dev = DeviceClient::connect(config).await.unwrap();
    let quick = op
        .send_command(CommandRequest::new(gate.clone(), "echo").args(json!(1)))
        .await
        .unwrap();
    assert_eq!(
        op.wait_command(quick.id, WAIT).await.unwrap().state,
        CommandState::Succeeded
    );
    let stored = stored_command(&op, &gate, quick.id).await;
    assert_eq!(
        states(&stored),
        vec![
            CommandState::Queued,
            CommandState::Delivered,
            CommandState::Succeeded
        ]
    );
    assert_eq!(stored.attempts, 1);

    let held = op
        .send_command(CommandRequest::new(gate.clone(), "hold"))
        .await
        .unwrap();
    eventually(WAIT, "the running command stored as delivered", || async {
        stored_command(&op, &gate, held.id).await.state == CommandState::Delivered
    })
    .await;
    let stored = stored_command(&op, &gate, held.id).await;
    assert_eq!(
        states(&stored),
        vec![CommandState::Queued, CommandState::Delivered]
    );
    assert_eq!(stored.attempts, 1);
    release.send_replace(true);
    assert_eq!(
        op.wait_command(held.id, WAIT).await.unwrap().result,
        Some(json!("released"))
    );
    assert_eq!(
        states(&stored_command(&op, &gate, held.id).await),
        vec![
            CommandState::Queued,
            CommandState::Delivered,
            CommandState::Succeeded
        ]
    );
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_expires_while_its_device_is_offline() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "lamp-1").await;
    let sent = op
        .send_command(CommandRequest::new(id("lamp-1"), "echo").timeout(Duration::from_millis(300)))
        .await
        .unwrap();
    let done = op.wait_command(sent.id, WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Expired);
    assert!(done.error.unwrap().contains("deadline"));

    // connecting later does not run it
    let runs = Arc::new(AtomicUsize::new(0));
    let dev = DeviceClient::connect(echo_device(
        ts.device_config("lamp-1", &token),
        runs.clone(),
    ))
    .await
    .unwrap();
    let probe = op
        .run_command(CommandRequest::new(id("lamp-1"), "echo"), WAIT)
        .await
        .unwrap();
    assert_eq!(probe, json!({"echo": null}));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the probe ran");
    dev.close().await;
}

/// Counts, on drop, the handler runs that were stopped before they finished.
struct StopWatch(Arc<AtomicUsize>, bool);

impl Drop for StopWatch {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A handler that counts its runs and finishes only when released.
fn blocking_device(
    config: DeviceConfig,
    runs: Arc<AtomicUsize>,
    release: Arc<Notify>,
) -> DeviceConfig {
    stoppable_device(config, runs, release, Arc::new(AtomicUsize::new(0)))
}

/// Like `blocking_device`, also counting the runs stopped before they finished.
fn stoppable_device(
    config: DeviceConfig,
    runs: Arc<AtomicUsize>,
    release: Arc<Notify>,
    stopped: Arc<AtomicUsize>,
) -> DeviceConfig {
    config.on_command("slow", move |call| {
        let runs = runs.clone();
        let release = release.clone();
        let stopped = stopped.clone();
        async move {
            let mut watch = StopWatch(stopped, false);
            runs.fetch_add(1, Ordering::SeqCst);
            release.notified().await;
            watch.1 = true;
            Ok(json!({"done": call.id}))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_runs_once_despite_a_redelivery() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "crane-1").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let dev = DeviceClient::connect(blocking_device(
        ts.device_config("crane-1", &token),
        runs.clone(),
        release.clone(),
    ))
    .await
    .unwrap();
    let sent = op
        .send_command(CommandRequest::new(id("crane-1"), "slow"))
        .await
        .unwrap();
    wait_state(&op, sent.id, CommandState::Delivered).await;
    // the connection drops while the handler runs: the server delivers the command again
    dev.reconnect().await.unwrap();
    eventually(WAIT, "a second delivery", || async {
        op.command(sent.id).await.unwrap().attempts >= 2
    })
    .await;
    eventually(WAIT, "the SDK saw the redelivery", || async {
        dev.stats().command_redeliveries >= 1
    })
    .await;
    release.notify_one();
    let done = op.wait_command(sent.id, WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.result, Some(json!({"done": sent.id})));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(dev.stats().commands_handled, 1);
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_commands_run_in_order_concurrent_ones_beside_them() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "arm-1").await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let release = Arc::new(Notify::new());
    let (o, r) = (order.clone(), release.clone());
    let config = ts
        .device_config("arm-1", &token)
        .on_command("step", move |call| {
            let order = o.clone();
            let release = r.clone();
            async move {
                let n = call.args["n"].as_i64().unwrap();
                order.lock().unwrap().push(n);
                if n == 0 {
                    release.notified().await; // the first step blocks the serial queue
                }
                Ok(json!(n))
            }
        })
        .on_command("ping", |_| async { Ok(json!("pong")) });
    let arm = id("arm-1");
    let mut ids = Vec::new();
    for n in 0..4 {
        let c = op
            .send_command(CommandRequest::new(arm.clone(), "step").args(json!({"n": n})))
            .await
            .unwrap();
        ids.push(c.id);
    }
    let dev = DeviceClient::connect(config).await.unwrap();
    wait_state(&op, ids[0], CommandState::Delivered).await;
    // a concurrent command overtakes the blocked serial queue
    let pong = op
        .run_command(CommandRequest::new(arm.clone(), "ping").concurrent(), WAIT)
        .await
        .unwrap();
    assert_eq!(pong, json!("pong"));
    assert_eq!(state_of(&op, ids[1]).await, CommandState::Queued);
    release.notify_one();
    for c in &ids {
        assert_eq!(
            op.wait_command(*c, WAIT).await.unwrap().state,
            CommandState::Succeeded
        );
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    dev.close().await;
}

/// A client may finish its request stream in a packet of its own, after the request (here only
/// once it has the answer): the server waits for the FIN and lets the stream end quietly instead
/// of stopping it (a STOP_SENDING); it used to stop any stream whose FIN was not in yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stream_finished_after_its_answer_is_not_stopped() {
    let ts = start(|_| {});
    let (operator, mut send, recv) = raw_operator_request(
        &ts,
        operator_request::Request::ListDevices(fleetlink_proto::v1::ListDevices::default()),
    )
    .await;
    let mut reader = fleetlink_transport::FrameReader::new(recv, 1 << 20);
    let answer = reader.read::<OperatorResponse>().await.unwrap().unwrap();
    assert!(answer.response.is_some(), "{answer:?}");
    assert!(reader.read::<OperatorResponse>().await.unwrap().is_none());
    send.finish().unwrap();
    // the server acknowledges the FIN, and never asked us to stop sending
    let stopped = tokio::time::timeout(WAIT, send.stopped())
        .await
        .expect("the server never acknowledged the FIN")
        .unwrap();
    assert_eq!(stopped, None);
    assert_eq!(operator.conn.stats().frame_rx.stop_sending, 0);
}

/// An operator session of raw frames (no SDK), and one request written on a new stream of it,
/// not finished: the session, the request stream and its answers.
async fn raw_operator_request(
    ts: &TestServer,
    request: operator_request::Request,
) -> (RawClient, quinn::SendStream, quinn::RecvStream) {
    let operator = raw_connect(
        ts,
        fleetlink_proto::v1::Hello {
            role: fleetlink_proto::v1::Role::Operator.into(),
            device_id: String::new(),
            ..device_hello("", &ts.admin_token)
        },
    )
    .await;
    let (mut send, recv) = operator.conn.open_bi().await.unwrap();
    let request = OperatorRequest {
        request: Some(request),
    };
    fleetlink_transport::write_frame(&mut send, &request)
        .await
        .unwrap();
    (operator, send, recv)
}

/// `SendCommand` with `wait_ms` on a raw operator stream: one request, one answer.
async fn raw_send_command(
    ts: &TestServer,
    r: fleetlink_proto::v1::SendCommand,
) -> OperatorResponse {
    let (operator, mut send, recv) =
        raw_operator_request(ts, operator_request::Request::SendCommand(r)).await;
    send.finish().unwrap();
    let mut reader = fleetlink_transport::FrameReader::new(recv, 1 << 20);
    let answer = reader.read::<OperatorResponse>().await.unwrap().unwrap();
    assert!(reader.read::<OperatorResponse>().await.unwrap().is_none());
    // The request came with its FIN: the server read on to it instead of stopping our side
    // (a STOP_SENDING would have come in the answer's packet).
    assert_eq!(operator.conn.stats().frame_rx.stop_sending, 0);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_wait_answers_with_the_final_state_in_one_request() {
    let (ts, op, token, pump) = with_device("pump-1").await;

    // Offline: answered after the wait with the state it is in.
    let queued = op
        .send_command_and_wait(queued_again(&pump), Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(queued.state, CommandState::Queued);

    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let config = blocking_device(
        ts.device_config("pump-1", &token),
        runs.clone(),
        release.clone(),
    );
    let dev = DeviceClient::connect(echo_device(config, Arc::new(AtomicUsize::new(0))))
        .await
        .unwrap();
    // The queued one runs now and holds the serial line: a concurrent echo goes beside it and
    // is answered finished, with its result and whole history, by the one request.
    let echo = CommandRequest::new(pump.clone(), "echo")
        .args(json!({"n": 1}))
        .concurrent();
    let done = op.send_command_and_wait(echo, WAIT).await.unwrap();
    assert_succeeded_first_time(&done, json!({"echo": {"n": 1}}));
    // Still running when the wait ends: answered `delivered`, not an error.
    let running = op
        .send_command_and_wait(queued_again(&pump), Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(
        running.id, queued.id,
        "the idempotency key names the first command"
    );
    assert_eq!(running.state, CommandState::Delivered);
    // Released while a second request with the same key waits: that one gets the final state.
    let waiting = op.send_command_and_wait(queued_again(&pump), WAIT);
    let (finished, ()) = tokio::join!(waiting, async {
        eventually(WAIT, "the handler ran", || async {
            runs.load(Ordering::SeqCst) == 1
        })
        .await;
        release.notify_one();
    });
    let finished = finished.unwrap();
    assert_eq!(finished.id, queued.id);
    assert_eq!(finished.state, CommandState::Succeeded);
    assert_eq!(finished.result, Some(json!({"done": queued.id})));
    // Finished already: answered at once with the stored record.
    let again = op
        .send_command_and_wait(queued_again(&pump), WAIT)
        .await
        .unwrap();
    assert_eq!(
        (again.id, again.state),
        (queued.id, CommandState::Succeeded)
    );

    // On the wire: one SendCommand with wait_ms, one answer holding the final state.
    let answer = raw_send_command(
        &ts,
        fleetlink_proto::v1::SendCommand {
            device_id: "pump-1".into(),
            name: "echo".into(),
            args_json: "2".into(),
            concurrent: true,
            wait_ms: 10_000,
            ..Default::default()
        },
    )
    .await;
    match answer.response {
        Some(operator_response::Response::Command(c)) => {
            assert_eq!(c.state(), fleetlink_proto::v1::CommandState::Succeeded);
            assert_eq!(c.result_json, r#"{"echo":2}"#);
        }
        other => panic!("expected a CommandInfo, got {other:?}"),
    }
    let too_long = raw_send_command(
        &ts,
        fleetlink_proto::v1::SendCommand {
            device_id: "pump-1".into(),
            name: "echo".into(),
            wait_ms: 600_001,
            ..Default::default()
        },
    )
    .await;
    match too_long.response {
        Some(operator_response::Response::Error(e)) => {
            assert_eq!(e.code(), ErrorCode::InvalidArgument);
            assert_eq!(
                e.message,
                "wait_ms 600001 is above the maximum of 600000; wait again instead"
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    dev.close().await;
}

/// A raw device's next command stream: the header, then the request.
async fn next_command(
    dev: &RawClient,
) -> (
    quinn::SendStream,
    fleetlink_transport::FrameReader,
    fleetlink_proto::v1::CommandRequest,
) {
    let (send, recv) = tokio::time::timeout(WAIT, dev.conn.accept_bi())
        .await
        .expect("no command stream")
        .unwrap();
    let mut reader = fleetlink_transport::FrameReader::new(recv, 1 << 20);
    let header = reader.read::<StreamHeader>().await.unwrap().unwrap();
    assert_eq!(header.kind(), StreamKind::Command);
    let request = reader
        .read::<fleetlink_proto::v1::CommandRequest>()
        .await
        .unwrap()
        .unwrap();
    (send, reader, request)
}

async fn answer(send: &mut quinn::SendStream, request: &fleetlink_proto::v1::CommandRequest) {
    let result = fleetlink_proto::v1::CommandResult {
        command_id: request.command_id,
        outcome: fleetlink_proto::v1::CommandOutcome::Succeeded.into(),
        result_json: r#""ok""#.into(),
        error: String::new(),
    };
    fleetlink_transport::write_frame(send, &result)
        .await
        .unwrap();
    send.finish().unwrap();
}

/// A device whose Hello sets `early_command_fin` gets each command stream's server side finished
/// with the request, and a cancel as STOP_SENDING (code 1) on its side; one that does not (the
/// version 1 baseline) sees the FIN only after its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_finishes_a_command_stream_early_only_for_devices_that_asked() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    for (name, early) in [("early-1", true), ("late-1", false)] {
        let token = provision(&op, name).await;
        let dev = raw_connect(
            &ts,
            fleetlink_proto::v1::Hello {
                early_command_fin: early,
                ..device_hello(name, &token)
            },
        )
        .await;
        let req = CommandRequest::new(id(name), "ping").concurrent();
        let run = op.send_command_and_wait(req, WAIT);
        let device = async {
            let (mut send, mut reader, request) = next_command(&dev).await;
            if early {
                let end = reader.read::<CommandResult>().await.unwrap();
                assert!(end.is_none(), "{name}: the request came without its FIN");
            } else {
                let more = tokio::time::timeout(
                    Duration::from_millis(200),
                    reader.read::<CommandResult>(),
                )
                .await;
                assert!(
                    more.is_err(),
                    "{name}: the server's side ended before the result: {more:?}"
                );
            }
            answer(&mut send, &request).await;
            if !early {
                let end = tokio::time::timeout(WAIT, reader.read::<CommandResult>())
                    .await
                    .expect("no FIN after the result")
                    .unwrap();
                assert!(end.is_none());
            }
            // The result came with the device's FIN: the server reads on to it rather than
            // stopping the device's side (a STOP_SENDING is a packet of its own, and the
            // device's ACK of it another). Our side ends when the server acks the FIN.
            let stopped = tokio::time::timeout(WAIT, send.stopped())
                .await
                .expect("the server never acknowledged the result")
                .unwrap();
            assert_eq!(
                stopped, None,
                "{name}: the server stopped the device's side"
            );
        };
        let (done, ()) = tokio::join!(run, device);
        let done = done.unwrap();
        assert_eq!(done.state, CommandState::Succeeded, "{name}");
        assert_eq!(done.result, Some(json!("ok")));

        // A cancel while the device runs it: STOP_SENDING with code 1 on the device's side,
        // whether or not the server's side had ended.
        let sent = op
            .send_command(CommandRequest::new(id(name), "ping"))
            .await
            .unwrap();
        let (send, _reader, request) = next_command(&dev).await;
        assert_eq!(request.command_id, sent.id);
        let cancelled = op.cancel_command(sent.id).await.unwrap();
        assert_eq!(cancelled.state, CommandState::Cancelled);
        let code = tokio::time::timeout(WAIT, send.stopped())
            .await
            .expect("the device's side was never stopped")
            .unwrap();
        assert_eq!(
            code.map(|c| c.into_inner()),
            Some(u64::from(fleetlink_proto::COMMAND_CANCELLED_CODE)),
            "{name}"
        );
    }
}

/// The first `slow` command of `send_and_wait_answers_with_the_final_state_in_one_request`, sent
/// again by its idempotency key.
fn queued_again(device: &DeviceId) -> CommandRequest {
    let mut req = CommandRequest::new(device.clone(), "slow");
    req.idempotency_key = Some("slow-1".into());
    req
}

/// The device can be running a command before its `delivered` state is committed; reading the
/// command then gives the owner's live state, not the store's older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_command_reads_as_delivered_before_the_store_commits_it() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let token = provision(&op, "pump-1").await;
    let command = op
        .send_command(CommandRequest::new(id("pump-1"), "prime"))
        .await
        .unwrap();
    // Another connection holds SQLite's write lock: the store cannot commit `delivered` (its
    // writer waits on the busy timeout) while the device runs the command.
    let db = rusqlite::Connection::open(ts.dir.path().join("fleetlink.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (s, r) = (started.clone(), release.clone());
    let config = ts
        .device_config("pump-1", &token)
        .on_command("prime", move |_| {
            let started = s.clone();
            let release = r.clone();
            async move {
                started.notify_one();
                release.notified().await;
                Ok(json!("primed"))
            }
        });
    let dev = DeviceClient::connect(config).await.unwrap();
    tokio::time::timeout(WAIT, started.notified())
        .await
        .expect("the device never ran the command");
    assert_eq!(state_of(&op, command.id).await, CommandState::Delivered);
    db.execute_batch("ROLLBACK").unwrap();
    release.notify_one();
    let done = op.wait_command(command.id, WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(state_of(&op, command.id).await, CommandState::Succeeded);
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_idempotency_keys_and_limits() {
    let ts = start(|c| {
        c.commands.max_pending_per_device = 3;
        c.commands.max_deadline_s = 60;
        c.commands.default_timeout_s = 30;
    });
    let op = ts.operator().await;
    let token = provision(&op, "door-1").await;
    let door = id("door-1");
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let stopped = Arc::new(AtomicUsize::new(0));
    let dev = DeviceClient::connect(stoppable_device(
        ts.device_config("door-1", &token),
        runs.clone(),
        release.clone(),
        stopped.clone(),
    ))
    .await
    .unwrap();

    // the same idempotency key returns the same command
    let a = op
        .send_command(CommandRequest::new(door.clone(), "slow").idempotency_key("k-1"))
        .await
        .unwrap();
    let b = op
        .send_command(CommandRequest::new(door.clone(), "slow").idempotency_key("k-1"))
        .await
        .unwrap();
    assert_eq!(a.id, b.id);

    // cancel a delivered command; its handler is told through the reset stream
    wait_state(&op, a.id, CommandState::Delivered).await;
    let cancelled = op.cancel_command(a.id).await.unwrap();
    assert_eq!(cancelled.state, CommandState::Cancelled);
    assert_eq!(state_of(&op, a.id).await, CommandState::Cancelled);
    eventually(WAIT, "the device stopped the cancelled handler", || async {
        stopped.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (code, message) = server_error(op.cancel_command(a.id).await.unwrap_err());
    assert_eq!(code, ErrorCode::Conflict);
    assert!(message.contains("cancelled already"), "{message}");
    let (code, _) = server_error(op.cancel_command(999_999).await.unwrap_err());
    assert_eq!(code, ErrorCode::NotFound);

    // limits: three unfinished commands at most, deadlines at most 60 s away
    let (code, message) = server_error(
        op.send_command(
            CommandRequest::new(door.clone(), "slow").timeout(Duration::from_secs(120)),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("max_deadline_s"), "{message}");
    for _ in 0..3 {
        op.send_command(CommandRequest::new(door.clone(), "slow"))
            .await
            .unwrap();
    }
    let (code, message) = server_error(
        op.send_command(CommandRequest::new(door.clone(), "slow"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("max_pending_per_device"), "{message}");
    // a retry with the key of the finished (cancelled) command still gets that command
    let again = op
        .send_command(CommandRequest::new(door.clone(), "slow").idempotency_key("k-1"))
        .await
        .unwrap();
    assert_eq!((again.id, again.state), (a.id, CommandState::Cancelled));
    let (code, _) = server_error(
        op.send_command(CommandRequest::new(id("ghost"), "slow"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::NotFound);
    dev.close().await;
}

fn restart(dir: &tempfile::TempDir, addr: std::net::SocketAddr) -> Server {
    let mut config = ServerConfig::local(dir.path());
    config.listen = addr;
    config.arbiters = 2;
    config.io_threads = 2;
    Server::start(config).unwrap()
}

async fn operator_for(server: &Server, dir: &tempfile::TempDir) -> OperatorClient {
    let token = std::fs::read_to_string(server.admin_token_file()).unwrap();
    let address =
        fleetlink_client::ServerAddress::local(server.local_addr(), &dir.path().join("tls/ca.pem"))
            .unwrap();
    OperatorClient::connect(fleetlink_client::OperatorConfig {
        server: address,
        token: token.trim().to_owned(),
    })
    .await
    .unwrap()
}

/// A delivery still waiting for its write (`delivery_write_delay_ms`) when the server stops is
/// written by the stop: the next start finds the command delivered, its attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_writes_the_deliveries_still_waiting_for_their_write() {
    let ts = start(|c| c.commands.delivery_write_delay_ms = 600_000);
    let op = ts.operator().await;
    let token = provision(&op, "valve-1").await;
    let valve = id("valve-1");
    let dev = DeviceClient::connect(blocking_device(
        ts.device_config("valve-1", &token),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Notify::new()),
    ))
    .await
    .unwrap();
    let sent = op
        .send_command(CommandRequest::new(valve.clone(), "slow"))
        .await
        .unwrap();
    wait_state(&op, sent.id, CommandState::Delivered).await;
    assert_eq!(
        stored_command(&op, &valve, sent.id).await.state,
        CommandState::Queued,
        "the delivery waits for its write"
    );
    dev.close().await;
    let dir = ts.dir;
    let addr = ts.server.local_addr();
    op.close();
    ts.server.shutdown();
    let restarted = restart(&dir, addr);
    let op = operator_for(&restarted, &dir).await;
    let stored = stored_command(&op, &valve, sent.id).await;
    assert_eq!(
        states(&stored),
        vec![CommandState::Queued, CommandState::Delivered]
    );
    assert_eq!(stored.attempts, 1);
    op.close();
    restarted.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reaches_a_terminal_state_across_a_server_restart() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let offline_token = provision(&op, "offline").await;
    let busy_token = provision(&op, "busy").await;
    provision(&op, "gone").await;

    // busy: delivered, its handler still running when the server stops
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let busy = DeviceClient::connect(blocking_device(
        ts.device_config("busy", &busy_token),
        runs.clone(),
        release.clone(),
    ))
    .await
    .unwrap();
    let delivered = op
        .send_command(CommandRequest::new(id("busy"), "slow"))
        .await
        .unwrap();
    wait_state(&op, delivered.id, CommandState::Delivered).await;
    // queued behind it on the same device
    let queued_behind = op
        .send_command(CommandRequest::new(id("busy"), "slow"))
        .await
        .unwrap();
    // offline: queued, delivered after the restart when the device connects
    let queued = op
        .send_command(CommandRequest::new(id("offline"), "echo"))
        .await
        .unwrap();
    // gone: queued for a device that never comes back; it expires, server down or not
    let expiring = op
        .send_command(CommandRequest::new(id("gone"), "echo").timeout(Duration::from_millis(1500)))
        .await
        .unwrap();
    assert_eq!(state_of(&op, queued_behind.id).await, CommandState::Queued);

    let dir = ts.dir;
    let addr = ts.server.local_addr();
    op.close();
    ts.server.shutdown();
    let restarted = restart(&dir, addr);
    let op = operator_for(&restarted, &dir).await;

    // the busy device reconnects by itself; the redelivery waits for the running handler
    eventually(WAIT, "the redelivery", || async {
        op.command(delivered.id).await.unwrap().attempts >= 2
    })
    .await;
    release.notify_one();
    let done = op.wait_command(delivered.id, WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    release.notify_one();
    assert_eq!(
        op.wait_command(queued_behind.id, WAIT).await.unwrap().state,
        CommandState::Succeeded
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each handler ran once");

    let address =
        fleetlink_client::ServerAddress::local(addr, &dir.path().join("tls/ca.pem")).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let offline = DeviceClient::connect(echo_device(
        DeviceConfig::new(address, id("offline"), offline_token),
        runs,
    ))
    .await
    .unwrap();
    assert_eq!(
        op.wait_command(queued.id, WAIT).await.unwrap().state,
        CommandState::Succeeded
    );
    assert_eq!(
        op.wait_command(expiring.id, WAIT).await.unwrap().state,
        CommandState::Expired
    );
    busy.close().await;
    offline.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_history_records_why_each_connection_ended() {
    let (ts, op, token, van) = with_device("van-1").await;
    let first = DeviceClient::connect(ts.device_config("van-1", &token))
        .await
        .unwrap();
    first.close().await;
    eventually(WAIT, "the offline event", || async {
        op.presence_history(&van, 0).await.unwrap().len() == 2
    })
    .await;
    // a second connection of the same device replaces (kicks) the first
    let a = raw_connect(&ts, device_hello("van-1", &token)).await;
    let b = raw_connect(&ts, device_hello("van-1", &token)).await;
    assert_eq!(close_code(&a.conn).await.0, ErrorCode::Replaced);
    eventually(WAIT, "the kicked event", || async {
        op.presence_history(&van, 0)
            .await
            .unwrap()
            .iter()
            .any(|e| e.reason == "kicked")
    })
    .await;
    let history = op.presence_history(&van, 0).await.unwrap();
    let summary: Vec<(bool, &str)> = history
        .iter()
        .rev()
        .take(5)
        .map(|e| (e.online, e.reason.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (true, ""),
            (false, "closed"),
            (true, ""),
            (false, "kicked"),
            (true, "")
        ]
    );
    assert!(
        history.windows(2).all(|w| w[0].at_us >= w[1].at_us),
        "newest first"
    );
    assert!(
        history
            .iter()
            .all(|e| e.remote_addr.starts_with("127.0.0.1") || !e.online)
    );
    assert!(history[0].online, "the newest connection is online");
    let limited = op.presence_history(&van, 1).await.unwrap();
    assert_eq!(limited.len(), 1);
    b.conn.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_cannot_overshoot_the_pending_limit() {
    let ts = start(|c| c.commands.max_pending_per_device = 3);
    let op = ts.operator().await;
    provision(&op, "shelf-1").await;
    let sends = (0..8).map(|_| op.send_command(CommandRequest::new(id("shelf-1"), "scan")));
    let results = futures_join(sends).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(accepted, 3, "{results:?}");
    for r in results.into_iter().filter_map(Result::err) {
        assert_eq!(server_error(r).0, ErrorCode::LimitExceeded);
    }
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// `Server::shutdown` returns only once everything the server queued is written: a restarted
/// server (or anyone reading the data dir) sees the last writes, and no late write of the old
/// server lands on top of the new one's (a job restart test caught a stale target state that way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_after_the_last_queued_write() {
    let ts = start(|_| {});
    let op = ts.operator().await;
    let endpoint = fleetlink_client::Endpoint::for_server(ts.address.addr).unwrap();
    let mut devices = Vec::new();
    for i in 0..30 {
        let name = format!("rig-{i:02}");
        let token = provision(&op, &name).await;
        let mut config = ts.device_config(&name, &token);
        config.endpoint = Some(endpoint.clone());
        devices.push(DeviceClient::connect(config).await.unwrap());
    }
    let dir = ts.dir;
    op.close();
    // the shutdown queues an offline event per device
    tokio::task::spawn_blocking(move || ts.server.shutdown())
        .await
        .unwrap();
    let store = fleetlink_store::SqliteStore::open(
        dir.path().join("fleetlink.db"),
        fleetlink_store::SqliteOptions::default(),
    )
    .unwrap();
    use fleetlink_store::Store as _;
    for i in 0..30 {
        let last = store
            .presence_history(&id(&format!("rig-{i:02}")), 1)
            .await
            .unwrap();
        assert_eq!(
            (last[0].online, last[0].reason.as_str()),
            (false, "server_shutdown"),
            "rig-{i:02}"
        );
    }
    drop(devices);
}

/// `single_thread`: IO, sessions and every actor on the actix system's thread. Telemetry is
/// stored and acked, commands go both ways, the server stops cleanly, and a restarted one (also
/// single-threaded) reads what the first stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_thread_server_stores_telemetry_runs_commands_and_restarts() {
    use fleetlink_client::{MetricName, Point, Value};

    let ts = start(|c| c.single_thread = Some(true));
    let op = ts.operator().await;
    let token = provision(&op, "mixer-1").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let dev = DeviceClient::connect(echo_device(
        ts.device_config("mixer-1", &token),
        runs.clone(),
    ))
    .await
    .unwrap();
    let points: Vec<Point> = (0..50)
        .map(|t| Point {
            metric: MetricName::new("rpm").unwrap(),
            time_us: 1_000 + t,
            value: Value::Int(t * 10),
        })
        .collect();
    for chunk in points.chunks(10) {
        dev.send(chunk.to_vec()).await.unwrap();
    }
    dev.flush(WAIT).await.unwrap();
    assert_eq!(dev.stats().points_acked, 50);
    let result = op
        .run_command(
            CommandRequest::new(id("mixer-1"), "echo").args(json!({"speed": 3})),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(result, json!({"echo": {"speed": 3}}));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    dev.close().await;
    op.close();

    let TestServer { server, dir, .. } = ts;
    server.shutdown();
    let mut config = ServerConfig::local(dir.path());
    config.single_thread = Some(true);
    let again = Server::start(config).unwrap();
    let address =
        fleetlink_client::ServerAddress::local(again.local_addr(), again.ca_cert_path().unwrap())
            .unwrap();
    let admin = std::fs::read_to_string(dir.path().join(fleetlink_server::ADMIN_TOKEN_FILE))
        .unwrap()
        .trim()
        .to_owned();
    let op = OperatorClient::connect(fleetlink_client::OperatorConfig {
        server: address,
        token: admin,
    })
    .await
    .unwrap();
    let got = stored_points(&op, &id("mixer-1")).await;
    let want: Vec<(i64, Value)> = points
        .iter()
        .map(|p| (p.time_us, p.value.clone()))
        .collect();
    assert_eq!(got, want);
    op.close();
    again.shutdown();
}
