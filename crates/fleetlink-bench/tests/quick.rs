//! The quick benchmark run (`cargo xtask bench --quick`) as a test, so the harness cannot rot:
//! every scenario against every peer on tiny loads, failing on a client error, a scenario that
//! delivered nothing or a durable system that lost a message.

use std::process::Command;

#[test]
fn the_quick_benchmark_runs_every_scenario_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let md = dir.path().join("benchmarks.md");
    let json = dir.path().join("benchmarks.json");
    let status = Command::new(env!("CARGO_BIN_EXE_fleetlink-bench"))
        .args(["run", "--quick", "--check", "--md"])
        .arg(&md)
        .arg("--json")
        .arg(&json)
        .status()
        .expect("starting fleetlink-bench");
    assert!(status.success(), "the quick benchmark failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json report"))
            .expect("valid json");
    let series = report["series"].as_array().expect("series");
    for scenario in ["flood", "slow", "idle-100", "commands", "reconnect"] {
        assert!(
            series.iter().any(|s| s["scenario"] == scenario),
            "scenario {scenario} missing from the report"
        );
    }
    let text = std::fs::read_to_string(&md).expect("markdown report");
    assert!(text.contains("## Targets"), "{text}");
}
