//! The `fleetlink` binary's operator commands (twin, command, presence) against a real server and
//! a real device.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is the test failing

use std::process::Output;
use std::time::Duration;

use fleetlink_client::{
    CommandFailure, DeviceClient, DeviceConfig, DeviceId, OperatorClient, OperatorConfig,
    ServerAddress,
};
use fleetlink_server::{Server, ServerConfig};
use serde_json::{Value, json};

/// Runs `fleetlink ARGS --server ADDR --data-dir DIR` off the async runtime.
async fn cli(server: &Server, dir: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fleetlink"));
    cmd.args(args)
        .arg("--server")
        .arg(server.local_addr().to_string())
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn");
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// A server on 127.0.0.1:0 in a temporary data dir, its address and an operator of it.
async fn start() -> (tempfile::TempDir, Server, ServerAddress, OperatorClient) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig::local(dir.path())).unwrap();
    let address =
        ServerAddress::local(server.local_addr(), server.ca_cert_path().unwrap()).unwrap();
    let op = OperatorClient::connect(OperatorConfig {
        server: address.clone(),
        token: server.created_admin_token().unwrap().to_owned(),
    })
    .await
    .unwrap();
    (dir, server, address, op)
}

/// Closes the operator and shuts the server down.
async fn stop(server: Server, op: OperatorClient) {
    op.close();
    shutdown(server).await;
}

/// Shuts the server down, off the async runtime, within 10 s.
async fn shutdown(server: Server) {
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || server.shutdown()),
    )
    .await
    .unwrap()
    .unwrap();
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "fleetlink failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_command_and_presence_from_the_command_line() {
    let (dir, server, address, op) = start().await;
    let out = cli(&server, dir.path(), &["device", "add", "gate-7"]).await;
    let token = stdout(&out).trim().to_owned();

    // twin set / get while the device is offline
    let out = cli(
        &server,
        dir.path(),
        &["twin", "set", "gate-7", r#"{"open":false,"light":"red"}"#],
    )
    .await;
    let set: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(set["delta"], json!({"open": false, "light": "red"}));
    let out = cli(
        &server,
        dir.path(),
        &[
            "twin",
            "set",
            "gate-7",
            r#"{"open":true}"#,
            "--expect-version",
            "7",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected version 7"));

    let config = DeviceConfig::new(address, DeviceId::new("gate-7").unwrap(), token)
        .on_command("open", |call| async move {
            Ok(json!({"opened_for": call.args["truck"]}))
        })
        .on_command("jam", |_| async {
            Err(CommandFailure::failed("gate motor jammed"))
        });
    let device = DeviceClient::connect(config).await.unwrap();
    device
        .report(json!({"open": false, "light": "red"}))
        .await
        .unwrap();
    let out = cli(&server, dir.path(), &["twin", "get", "gate-7"]).await;
    let twin: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(twin["reported"], json!({"open": false, "light": "red"}));
    assert_eq!(twin["delta"], json!({}));
    assert_eq!(twin["desired_version"], json!(1));

    // command send --wait succeeds with the result; a failing command exits non-zero
    let out = cli(
        &server,
        dir.path(),
        &[
            "command",
            "send",
            "gate-7",
            "open",
            "--args",
            r#"{"truck":"t-1"}"#,
            "--wait",
            "10s",
            "--json",
        ],
    )
    .await;
    let done: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(done["state"], json!("succeeded"));
    assert_eq!(done["result"], json!({"opened_for": "t-1"}));
    let id = done["id"].as_u64().unwrap();
    let out = cli(
        &server,
        dir.path(),
        &["command", "send", "gate-7", "jam", "--wait", "10s"],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gate motor jammed"));

    let out = cli(
        &server,
        dir.path(),
        &["command", "get", &id.to_string(), "--json"],
    )
    .await;
    let got: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(got["history"].as_array().unwrap().len(), 3);
    let out = cli(
        &server,
        dir.path(),
        &["command", "list", "gate-7", "--state", "failed", "--json"],
    )
    .await;
    let listed: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["error"], json!("gate motor jammed"));

    // cancel a command queued for a device that is gone
    device.close().await;
    let out = cli(
        &server,
        dir.path(),
        &["command", "send", "gate-7", "open", "--json"],
    )
    .await;
    let queued: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let queued_id = queued["id"].as_u64().unwrap().to_string();
    let out = cli(&server, dir.path(), &["command", "cancel", &queued_id]).await;
    assert!(stdout(&out).contains("cancelled"));
    let out = cli(
        &server,
        dir.path(),
        &["command", "wait", &queued_id, "--timeout", "1s"],
    )
    .await;
    assert!(
        !out.status.success(),
        "a cancelled command is not a success"
    );

    // the offline event is written when the server notices the close
    let gate = DeviceId::new("gate-7").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while op.presence_history(&gate, 1).await.unwrap()[0].online {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device never went offline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = cli(&server, dir.path(), &["presence", "gate-7"]).await;
    let text = stdout(&out);
    assert!(text.contains("online"), "{text}");
    assert!(text.contains("closed"), "{text}");
    stop(server, op).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_group_policy_publish_watch_and_job_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig::local(dir.path())).unwrap();
    let address =
        ServerAddress::local(server.local_addr(), server.ca_cert_path().unwrap()).unwrap();
    let d = dir.path();
    let mut devices = Vec::new();
    for (name, region) in [("bus-1", "north"), ("bus-2", "south")] {
        let out = cli(
            &server,
            d,
            &[
                "device",
                "add",
                name,
                "--tag",
                &format!("region={region}"),
                "--attributes",
                r#"{"seats":40}"#,
            ],
        )
        .await;
        let token = stdout(&out).trim().to_owned();
        let config = DeviceConfig::new(address.clone(), DeviceId::new(name).unwrap(), token)
            .on_command("ping", |_| async { Ok(json!("pong")) });
        devices.push(DeviceClient::connect(config).await.unwrap());
    }
    // query, JSON lines
    let out = cli(
        &server,
        d,
        &[
            "query",
            r#"tag.region == "north" and attr.seats >= 40 and online"#,
            "--json",
        ],
    )
    .await;
    let rows: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], json!("bus-1"));
    let out = cli(&server, d, &["query", "tag.region = 1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("query error at column 12"));

    // device update, groups
    stdout(
        &cli(
            &server,
            d,
            &[
                "device",
                "update",
                "bus-2",
                "--tag",
                "region=north",
                "--attributes",
                r#"{"seats":null}"#,
            ],
        )
        .await,
    );
    stdout(
        &cli(
            &server,
            d,
            &[
                "group", "put", "fleet", "--member", "bus-1", "--member", "bus-2",
            ],
        )
        .await,
    );
    stdout(
        &cli(
            &server,
            d,
            &["group", "put", "seated", "--query", "attr.seats exists"],
        )
        .await,
    );
    let text = stdout(&cli(&server, d, &["group", "list"]).await);
    assert!(
        text.lines()
            .any(|l| l.starts_with("fleet") && l.ends_with("bus-1,bus-2")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("seated") && l.ends_with("bus-1")),
        "{text}"
    );

    // policy check: same group → allowed (exit 0); a topic outside the groups → denied (exit 1)
    let out = cli(
        &server,
        d,
        &["policy", "check", "bus-1", "message", "bus-2"],
    )
    .await;
    assert!(stdout(&out).starts_with("allowed"));
    let out = cli(
        &server,
        d,
        &["policy", "check", "bus-1", "publish", "depot/news"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("denied"));

    // publish reaches a subscribed device
    devices[1].subscribe("group/fleet/#").await.unwrap();
    let mut rx = devices[1].incoming();
    let out = cli(
        &server,
        d,
        &["publish", "group/fleet/notice", "depot closes at 6"],
    )
    .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("delivered to 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(got, fleetlink_client::Incoming::Topic { payload, .. } if payload == b"depot closes at 6")
    );

    // watch a standing query (initial set) as JSON lines, then stop after 3 events
    let out = cli(
        &server,
        d,
        &[
            "watch",
            "query",
            "--query",
            r#"group == "fleet""#,
            "--format",
            "json",
            "--count",
            "3",
        ],
    )
    .await;
    let events: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], json!("subscribed"));
    assert_eq!(events[0]["initial_matches"], json!(2));
    assert_eq!(events[1]["event"], json!("enter"));

    // a job over the group, followed to its end
    let out = cli(
        &server,
        d,
        &[
            "job",
            "create",
            r#"group == "fleet""#,
            "--command",
            "ping",
            "--max-in-flight",
            "1",
        ],
    )
    .await;
    let line = stdout(&out);
    let id = line.split_whitespace().nth(1).unwrap().to_owned();
    let out = cli(&server, d, &["job", "status", &id, "--follow"]).await;
    let text = stdout(&out);
    assert!(text.lines().last().unwrap().contains("completed"), "{text}");
    assert!(text.contains("succeeded=2"), "{text}");
    let out = cli(&server, d, &["job", "cancel", &id]).await;
    assert!(!out.status.success(), "a finished job cannot be cancelled");
    for dev in devices {
        dev.close().await;
    }
    shutdown(server).await;
}

/// Runs `fleetlink device import FILE`, which must fail; its standard error.
async fn import_fails(server: &Server, dir: &std::path::Path, file: &std::path::Path) -> String {
    let out = cli(server, dir, &["device", "import", file.to_str().unwrap()]).await;
    assert!(!out.status.success(), "the import succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `fleetlink device import`: a JSON-lines file in, a token per device out (JSON lines); a file
/// with a bad line creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_import_from_a_json_lines_file() {
    let (dir, server, address, op) = start().await;

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"pump-1\"}\n{\"id\": \"pump-2\", \"tag\": {}}\n",
    )
    .unwrap();
    let err = import_fails(&server, dir.path(), &bad).await;
    assert!(
        err.contains("bad.jsonl line 2: unknown field \"tag\""),
        "{err}"
    );
    assert!(op.list_devices(None, None).await.unwrap().is_empty());

    // 1203 devices: two server transactions
    let good = dir.path().join("fleet.jsonl");
    let mut lines = String::from(
        "\n{\"id\": \"pump-0\", \"tags\": {\"site\": \"north\"}, \"attributes\": {\"kw\": 7}}\n",
    );
    for i in 1..1203 {
        lines.push_str(&format!("{{\"id\": \"pump-{i}\"}}\n"));
    }
    std::fs::write(&good, lines).unwrap();
    let out = cli(
        &server,
        dir.path(),
        &["device", "import", good.to_str().unwrap()],
    )
    .await;
    let created: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(created.len(), 1203);
    assert_eq!(created[0]["id"], "pump-0");
    assert_eq!(created[1202]["id"], "pump-1202");
    let pump0 = op.device(&DeviceId::new("pump-0").unwrap()).await.unwrap();
    assert_eq!(pump0.tags["site"], "north");
    assert_eq!(pump0.attributes["kw"], 7);
    let last = &created[1202];
    let device = DeviceClient::connect(DeviceConfig::new(
        address.clone(),
        DeviceId::new(last["id"].as_str().unwrap()).unwrap(),
        last["token"].as_str().unwrap(),
    ))
    .await
    .unwrap();
    device.close().await;
    assert_eq!(op.list_devices(None, None).await.unwrap().len(), 1203);

    // the same file again: the first batch's ids are taken, nothing more is created
    let err = import_fails(&server, dir.path(), &good).await;
    assert!(err.contains("importing devices 1..1000"), "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(op.list_devices(None, None).await.unwrap().len(), 1203);
    stop(server, op).await;
}
