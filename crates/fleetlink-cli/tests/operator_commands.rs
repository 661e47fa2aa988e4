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
    op.close();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || server.shutdown()),
    )
    .await
    .unwrap()
    .unwrap();
}
