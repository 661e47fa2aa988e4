//! docs/benchmarks.md and the JSON file: figures, ratios, targets, machine, commands.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::ceilings::Ceilings;
use crate::stats::{Series, Spread};

/// A criterion micro-benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct Micro {
    pub name: String,
    /// Mean time per iteration, ns.
    pub mean_ns: f64,
}

/// Everything one `cargo xtask bench` run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub generated: String,
    pub quick: bool,
    pub command: String,
    pub machine: Machine,
    pub ceilings: Ceilings,
    pub series: Vec<Series>,
    pub micro: Vec<Micro>,
    pub notes: Vec<String>,
    /// Scenarios that failed, with why.
    pub failures: Vec<String>,
    /// Scenario 6: the Python bindings' telemetry read, when run with `--python`.
    pub python: Vec<PythonBench>,
    /// Scenarios still to run (the report is rewritten after each one).
    pub pending: Vec<String>,
}

/// One row count of bindings/python/bench/telemetry_bench.py.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PythonBench {
    pub rows: u64,
    pub ingest_s: f64,
    /// `Client.telemetry` into a pyarrow Table, per run (s).
    pub telemetry_s: Vec<f64>,
    /// `pandas.read_sql` of the same rows from a row-per-point SQLite table, per run (s).
    pub read_sql_s: Vec<f64>,
}

pub fn read_python(path: &Path) -> Result<PythonBench> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub pinning: String,
    pub mosquitto: String,
    pub nats_server: String,
}

impl Machine {
    pub fn describe(pinning: String, cores: usize) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores,
            memory_gib: mem_kb / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            pinning,
            mosquitto: version_of("mosquitto", &["-h"], "mosquitto version"),
            nats_server: version_of("nats-server", &["--version"], "nats-server"),
        }
    }
}

fn version_of(program: &str, args: &[&str], prefix: &str) -> String {
    let Ok(path) = crate::mqtt::which(program) else {
        return "not installed".into();
    };
    let Ok(out) = std::process::Command::new(path).args(args).output() else {
        return "unknown".into();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or("unknown")
        .trim()
        .to_owned()
}

/// Criterion's estimates under `dir` (target/criterion), by benchmark id.
pub fn read_criterion(dir: &Path) -> Vec<Micro> {
    let mut out = Vec::new();
    visit(dir, dir, &mut out);
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn visit(root: &Path, dir: &Path, out: &mut Vec<Micro>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") {
                let est = p.join("estimates.json");
                if let Ok(text) = std::fs::read_to_string(&est)
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                    && let Some(mean) = v["mean"]["point_estimate"].as_f64()
                    && let Ok(rel) = dir.strip_prefix(root)
                {
                    out.push(Micro {
                        name: rel.display().to_string(),
                        mean_ns: mean,
                    });
                }
            } else if p.file_name().is_none_or(|n| n != "report") {
                visit(root, &p, out);
            }
        }
    }
}

fn spread(s: Spread, digits: usize) -> String {
    if s.min == s.max {
        format!("{:.*}", digits, s.median)
    } else {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        )
    }
}

/// A figure only some runs measure (packets, counted since the harness could): "–" where not.
fn measured(s: &Series, key: &str, digits: usize) -> String {
    if s.runs.iter().any(|r| r.extra.contains_key(key)) {
        spread(s.extra(key), digits)
    } else {
        "–".into()
    }
}

impl Report {
    fn find(&self, scenario: &str, system: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.scenario == scenario && s.system == system)
    }

    fn median(
        &self,
        scenario: &str,
        system: &str,
        f: impl Fn(&crate::stats::Run) -> f64,
    ) -> Option<f64> {
        self.find(scenario, system).map(|s| s.spread(f).median)
    }

    /// What the QUIC floor (the coalescing sink: fleetlink's packets, no work of its own) says of
    /// fleetlink's and Mosquitto QoS 0's cost per message in `scenario`, if all three ran.
    fn quic_floor(&self, scenario: &str) -> Option<String> {
        let us = |sys| self.median(scenario, sys, |r| r.server_us_per_msg());
        let packets = |sys: &str| {
            self.find(scenario, sys)
                .map(|s| s.extra("packets_per_msg").median)
        };
        let (floor, f, m) = (
            us("quinn-sink-coalesced")?,
            us("fleetlink")?,
            us("mosquitto-qos0")?,
        );
        Some(format!(
            "QUIC's floor: quinn-sink-coalesced sends fleetlink's packets ({:.2} per message against \
             fleetlink's {:.2}) and does nothing else, at {floor:.1} µs per message, {:.2}× \
             Mosquitto QoS 0's {m:.1} µs. fleetlink's {f:.1} µs is {:.2}× that floor: its \
             sessions, protobuf, actors and durable store add {:.1} µs per message.",
            packets("quinn-sink-coalesced")?,
            packets("fleetlink")?,
            floor / m,
            f / floor,
            f - floor,
        ))
    }

    /// (target, measured, met) rows.
    pub fn targets(&self) -> Vec<(String, String, bool)> {
        let mut t = Vec::new();
        let per_cpu = |sys| self.median("flood", sys, |r| r.msgs_per_server_cpu_s());
        if let (Some(f), Some(q0), Some(q1), Some(js)) = (
            per_cpu("fleetlink"),
            per_cpu("mosquitto-qos0"),
            per_cpu("mosquitto-qos1"),
            per_cpu("nats-jetstream"),
        ) {
            t.push((
                "Flood: msgs per server CPU-s ≥ 3× Mosquitto QoS 0".into(),
                format!("{:.2}× ({f:.0} vs {q0:.0})", f / q0),
                f >= 3.0 * q0,
            ));
            t.push((
                "Flood: msgs per server CPU-s ≥ 10× Mosquitto QoS 1".into(),
                format!("{:.2}× ({f:.0} vs {q1:.0})", f / q1),
                f >= 10.0 * q1,
            ));
            t.push((
                "Flood: ahead of JetStream acked publishes (msgs per server CPU-s)".into(),
                format!("{:.2}× ({f:.0} vs {js:.0})", f / js),
                f > js,
            ));
        }
        let us = |sys| self.median("slow", sys, |r| r.server_us_per_msg());
        if let (Some(f), Some(q)) = (us("fleetlink"), us("quinn-sink")) {
            t.push((
                "Slow devices: server CPU per msg ≤ 1.25× raw quinn".into(),
                format!("{:.2}× ({f:.1} µs vs {q:.1} µs)", f / q),
                f <= 1.25 * q,
            ));
            if let Some(m) = us("mosquitto-qos0") {
                t.push((
                    "Slow devices (goal): server CPU per msg ≤ Mosquitto QoS 0".into(),
                    format!("{:.2}× ({f:.1} µs vs {m:.1} µs)", f / m),
                    f <= m,
                ));
            }
        }
        let idle: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| s.scenario.starts_with("idle-"))
            .collect();
        for s in idle.iter().filter(|s| s.system == "fleetlink") {
            let f = s.extra("rss_per_conn_kb").median;
            // Sessions that ended during the window no longer hold their memory: such a run's
            // RSS per device is too low, and it cannot meet a memory target.
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            let caveat = if errors > 0 {
                format!(" (invalid: {errors} sessions ended during the window)")
            } else {
                String::new()
            };
            if let Some(q) = self.find(&s.scenario, "quinn-sink") {
                let q = q.extra("rss_per_conn_kb").median;
                t.push((
                    format!(
                        "{}: RSS per idle device ≤ raw quinn per connection",
                        s.scenario
                    ),
                    format!("{f:.1} KB vs {q:.1} KB{caveat}"),
                    f <= q && errors == 0,
                ));
            }
            t.push((
                format!("{} (goal): RSS per idle device ≤ 24 KB", s.scenario),
                format!("{f:.1} KB{caveat}"),
                f <= 24.0 && errors == 0,
            ));
        }
        if let Some(s) = self.find("idle-100000", "fleetlink") {
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            t.push((
                "100k connected devices on one server without errors".into(),
                format!("{errors} errors"),
                errors == 0,
            ));
        }
        let p99 = |sys| self.median("commands", sys, |r| r.p99_us as f64);
        if let (Some(f), Some(q)) = (p99("fleetlink"), p99("quinn-sink")) {
            t.push((
                "Command round trip p99 ≤ 2× raw quinn request/response p99".into(),
                format!("{:.2}× ({f:.0} µs vs {q:.0} µs)", f / q),
                f <= 2.0 * q,
            ));
        }
        if let Some(p) = self.python.iter().find(|p| p.rows >= 10_000_000) {
            let v = Spread::of(p.telemetry_s.clone()).median;
            t.push((
                format!(
                    "{} telemetry rows into a pyarrow Table within 0.5 s",
                    p.rows
                ),
                format!("{v:.2} s"),
                v <= 0.5,
            ));
        }
        for (system, _) in crate::scenarios::RECONNECT_VARIANTS {
            if let Some(s) = self.find("reconnect", system) {
                let v = s.extra("streaming_after_ready_s").median;
                let all = s.extra("all_streaming_s").median;
                let n = s.extra("devices").median;
                t.push((
                    format!(
                        "{n:.0} devices back online and streaming within 10 s of a restart: {system}"
                    ),
                    format!("{v:.2} s after the new server listens ({all:.2} s after the stop request)"),
                    v <= 10.0,
                ));
            }
        }
        t
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Generated by `{}` on {}{}. Do not edit by hand: run it again.\n",
            self.command,
            self.generated,
            if self.quick {
                " — a **quick** smoke run: tiny loads, figures not comparable"
            } else {
                ""
            }
        );
        if !self.pending.is_empty() {
            let _ = writeln!(
                md,
                "**Partial report**: the run is still going (or was stopped) before {}.\n",
                self.pending.join(", ")
            );
        }
        let m = &self.machine;
        let _ = writeln!(md, "## Machine\n");
        let _ = writeln!(
            md,
            "- CPU: {} ({} cores), {:.1} GiB, Linux {}",
            m.cpu, m.cores, m.memory_gib, m.kernel
        );
        let _ = writeln!(md, "- Pinning: {}", m.pinning);
        let _ = writeln!(md, "- Peers: {}; {}", m.mosquitto, m.nats_server);
        let _ = writeln!(
            md,
            "- Same-run ceilings: UDP loopback {:.0} datagrams/s (100 bytes, receiver on the server core); AES-128-GCM {:.2} GB/s on one core (1200-byte packets)\n",
            self.ceilings.udp_loopback_pps,
            self.ceilings.aes_gcm_bytes_per_s / 1e9
        );
        let _ = writeln!(md, "## Targets\n");
        let _ = writeln!(md, "| Target | Measured (medians) | Met |\n|---|---|---|");
        for (target, measured, met) in self.targets() {
            let _ = writeln!(
                md,
                "| {target} | {measured} | {} |",
                if met { "yes" } else { "**no**" }
            );
        }
        let _ = writeln!(md);
        let _ = writeln!(md, "## Method\n");
        let _ = writeln!(md, "{}\n", METHOD);
        self.throughput_table(
            &mut md,
            "flood",
            "1. Flood ingest (~100-byte messages, as fast as the clients can)",
        );
        self.throughput_table(&mut md, "slow", "2. Many slow devices (1 message/s each)");
        self.idle_table(&mut md);
        self.throughput_table(
            &mut md,
            "commands",
            "4. Command round trip (many devices connected; one request at a time)",
        );
        self.reconnect_table(&mut md);
        if !self.python.is_empty() {
            let _ = writeln!(md, "## 6. Python: telemetry into pyarrow\n");
            let _ = writeln!(
                md,
                "`Client.telemetry` (Arrow built in Rust, handed over through the C stream interface) against `pandas.read_sql` of the same rows from a row-per-point SQLite table (fleetlink stores chunks, so the peer table is written from the first result); release build of the bindings; median (min–max) of the runs, which alternate between the two, each read starting with the previous results released (`bindings/python/bench/telemetry_bench.py`).\n"
            );
            let _ = writeln!(
                md,
                "| Rows | Client.telemetry s | rows/s | pandas.read_sql s | Ratio |\n|---|---|---|---|---|"
            );
            for p in &self.python {
                let a = Spread::of(p.telemetry_s.clone());
                let b = Spread::of(p.read_sql_s.clone());
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {} | {:.2}× faster |",
                    p.rows,
                    spread(a, 2),
                    p.rows as f64 / a.median,
                    spread(b, 2),
                    b.median / a.median
                );
            }
            let _ = writeln!(md);
        }
        if !self.micro.is_empty() {
            let _ = writeln!(
                md,
                "## 7. Micro-benchmarks (criterion, mean per iteration)\n"
            );
            let _ = writeln!(md, "| Benchmark | Mean |\n|---|---|");
            for b in &self.micro {
                let _ = writeln!(md, "| {} | {} |", b.name, human_ns(b.mean_ns));
            }
            let _ = writeln!(md);
        }
        if !self.failures.is_empty() {
            let _ = writeln!(md, "## Failed scenarios\n");
            for f in &self.failures {
                let _ = writeln!(md, "- {f}");
            }
            let _ = writeln!(md);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "## Notes\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    fn throughput_table(&self, md: &mut String, scenario: &str, title: &str) {
        let rows: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| s.scenario == scenario)
            .collect();
        if rows.is_empty() {
            return;
        }
        let runs = rows[0].runs.len();
        let devices = rows[0]
            .runs
            .first()
            .and_then(|r| r.extra.get("devices"))
            .copied();
        let _ = writeln!(md, "## {title}\n");
        // a commands run sends its round trips one at a time (`--commands`): say how many
        let round_trips = match rows[0].runs.first() {
            Some(r) if scenario == "commands" => format!(", {} round trips per run", r.sent),
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "Median (min–max) of {runs} run(s){}{round_trips}.\n",
            devices
                .map(|d| format!(", {d:.0} devices"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            md,
            "| System | Delivered msg/s | Msgs per server CPU-s | Server µs/msg | Server CPU-s | Client CPU-s | p50 µs | p99 µs | p99.9 µs | Server RSS MiB | Packets/msg | UDP drops | Steal % | Lost | Errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in rows {
            let lost: u64 = s.runs.iter().map(|r| r.lost).sum();
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.system,
                spread(s.spread(|r| r.msgs_per_s()), 0),
                spread(s.spread(|r| r.msgs_per_server_cpu_s()), 0),
                spread(s.spread(|r| r.server_us_per_msg()), 1),
                spread(s.spread(|r| r.server_cpu_s), 2),
                spread(s.spread(|r| r.client_cpu_s), 2),
                spread(s.spread(|r| r.p50_us as f64), 0),
                spread(s.spread(|r| r.p99_us as f64), 0),
                spread(s.spread(|r| r.p999_us as f64), 0),
                spread(s.spread(|r| r.server_rss as f64 / 1048576.0), 1),
                measured(s, "packets_per_msg", 2),
                measured(s, "udp_dropped", 0),
                measured(s, "steal_pct", 1),
                lost,
                errors
            );
        }
        let _ = writeln!(md);
        if let Some(floor) = self.quic_floor(scenario) {
            let _ = writeln!(md, "{floor}\n");
        }
        for s in self.series.iter().filter(|s| s.scenario == scenario) {
            if let Some(split) = thread_split(s) {
                let _ = writeln!(
                    md,
                    "{}'s server CPU by thread, µs per message (medians): {split}.\n",
                    s.system
                );
            }
        }
    }

    fn idle_table(&self, md: &mut String) {
        let rows: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| s.scenario.starts_with("idle-"))
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(md, "## 3. Idle connections held\n");
        let _ = writeln!(
            md,
            "RSS per connection = (server RSS with every client connected − RSS of an empty server) / connections; fleetlink's includes the device's session and actor. Idle CPU is the server's over the window (35 s, longer than the 30 s heartbeat timeout), as % of one core. fleetlink's idle devices are light clients of the device protocol (`crates/fleetlink-bench/src/light.rs`: QUIC, Hello, a heartbeat every 10 s, as the SDK sends when idle) because a full SDK client costs the load generator ~150 KB; the quinn sink's clients send a QUIC keep-alive as often. Errors = devices whose session ended while connected (for fleetlink; a heartbeat timeout would show here).\n"
        );
        let _ = writeln!(
            md,
            "| Connections | System | Runs | RSS per connection KB | Connect rate /s | Idle server CPU % | Server RSS MiB | Errors |\n|---|---|---|---|---|---|---|---|"
        );
        for s in rows {
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                s.scenario.trim_start_matches("idle-"),
                s.system,
                s.runs.len(),
                spread(s.extra("rss_per_conn_kb"), 1),
                spread(s.extra("connect_per_s"), 0),
                spread(s.extra("idle_cpu_pct"), 2),
                spread(s.spread(|r| r.server_rss as f64 / 1048576.0), 1),
                errors
            );
        }
        let _ = writeln!(md);
    }

    fn reconnect_table(&self, md: &mut String) {
        let rows: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| s.scenario == "reconnect")
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(md, "## 5. Reconnect storm\n");
        // The defaults the bench runs with (FLEETLINK_BENCH_* overrides aside).
        let server = fleetlink_server::ServerConfig::default();
        let _ = writeln!(
            md,
            "The server is stopped gracefully under a fleet streaming {} message/s per device and started again on the same port and data. Seconds from the stop request, except the last two columns, which count from the moment the new server listens. The SDK retries with its default backoff (100 ms doubling to 30 s, jittered) and {} s connect timeout; the server runs `max_handshakes` ({}) handshakes at once and queues further attempts (up to {}, for at most {} s). CPU columns: each process's CPU from the moment the new server listens until every device streams, per device and as a share of that time (100% = one core busy). Variants: the SDK's `Resumption::Off` (every reconnect a full TLS handshake), `Tickets` (the default: resumed from a session the previous server saved in its data dir at shutdown) and `ZeroRtt` (resumed, Hello in 0-RTT). Streaming = a point acked after the restart. The load generator (one core) does every device's client handshake. Steal % = the hypervisor's steal over the storm (see Method). Variants take turns run by run.\n",
            crate::scenarios::RECONNECT_RATE,
            fleetlink_client::DEFAULT_CONNECT_TIMEOUT.as_secs_f64(),
            server.max_handshakes,
            server.handshake_queue,
            f64::from(server.handshake_queue_ms) / 1e3,
        );
        let _ = writeln!(
            md,
            "| System | Devices | Old server stopped s | New server ready s | All online s | All streaming s | Online after ready s | Streaming after ready s | 0-RTT connects | Server CPU ms/device | Server busy % | Load generator CPU ms/device | Load generator busy % | Steal % | Lost | Errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in rows {
            let lost: u64 = s.runs.iter().map(|r| r.lost).sum();
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.system,
                spread(s.extra("devices"), 0),
                spread(s.extra("stop_s"), 2),
                spread(s.extra("restart_ready_s"), 2),
                spread(s.extra("all_online_s"), 2),
                spread(s.extra("all_streaming_s"), 2),
                spread(s.extra("online_after_ready_s"), 2),
                spread(s.extra("streaming_after_ready_s"), 2),
                spread(s.extra("zero_rtt_connects"), 0),
                spread(s.extra("server_cpu_ms_per_device"), 3),
                spread(s.extra("server_busy_pct"), 0),
                spread(s.extra("client_cpu_ms_per_device"), 3),
                spread(s.extra("client_busy_pct"), 0),
                measured(s, "steal_pct", 1),
                lost,
                errors
            );
        }
        let _ = writeln!(md);
    }

    /// The smoke test's verdict: every scenario ran, moved messages, and no client saw an error.
    pub fn check(&self) -> Result<()> {
        let mut problems: Vec<String> = self
            .failures
            .iter()
            .map(|f| format!("scenario failed: {f}"))
            .collect();
        for s in &self.series {
            let errors: u64 = s.runs.iter().map(|r| r.errors).sum();
            if errors > 0 {
                problems.push(format!(
                    "{} / {}: {errors} client errors",
                    s.scenario, s.system
                ));
            }
            let moved = s.scenario.starts_with("idle-") || s.runs.iter().any(|r| r.delivered > 0);
            if !moved {
                problems.push(format!("{} / {}: nothing delivered", s.scenario, s.system));
            }
            // The durable systems lose nothing, whatever the load.
            let durable = matches!(
                s.system.as_str(),
                "fleetlink"
                    | "fleetlink-unique-strings"
                    | "nats-jetstream"
                    | "quinn-sink"
                    | "quinn-sink-coalesced"
            ) || s.scenario == "reconnect";
            let lost: u64 = s.runs.iter().map(|r| r.lost).sum();
            if durable && lost > 0 {
                problems.push(format!(
                    "{} / {}: {lost} messages lost",
                    s.scenario, s.system
                ));
            }
        }
        if self.series.is_empty() {
            problems.push("no scenario ran".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("benchmark check failed:\n  {}", problems.join("\n  "))
        }
    }

    pub fn write(&self, md: &Path, json: &Path) -> Result<()> {
        if let Some(d) = md.parent() {
            std::fs::create_dir_all(d)?;
        }
        if let Some(d) = json.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(md, self.markdown())?;
        std::fs::write(json, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

/// A series' server CPU per message by thread, largest first, as "`name` 12.3, ..."; threads
/// under 0.05 µs left out. `None` if the runs did not measure it.
fn thread_split(s: &Series) -> Option<String> {
    let prefix = crate::scenarios::THREAD_US_PER_MSG;
    let names: std::collections::BTreeSet<&str> = s
        .runs
        .iter()
        .flat_map(|r| r.extra.keys())
        .filter_map(|k| k.strip_prefix(prefix))
        .collect();
    let mut split: Vec<(&str, f64)> = names
        .into_iter()
        .map(|name| {
            let key = format!("{prefix}{name}");
            (
                name,
                s.spread(|r| r.extra.get(&key).copied().unwrap_or(0.0))
                    .median,
            )
        })
        .filter(|&(_, us)| us >= 0.05)
        .collect();
    if split.is_empty() {
        return None;
    }
    split.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = split
        .iter()
        .map(|(name, us)| format!("`{name}` {us:.1}"))
        .collect();
    Some(parts.join(", "))
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

const METHOD: &str = "- One load generator (`crates/fleetlink-bench`, one tokio thread) drives the same simulated devices, ~100-byte messages and rates at every system; each server runs as its own process. fleetlink, pinned to one core, runs IO, sessions and actors on one thread (the server's default when it may use one core; its store writer and readers have their own threads), on embedded SQLite with `synchronous=normal` (WAL).
- **fleetlink**: the real device SDK over QUIC; a message is one telemetry point (an 84-character string value, the same in every message); delivered = acked as durably stored, latency from `send` to that ack. The devices run with the SDK's defaults, ack coalescing included (docs/protocol.md §5: the server may hold an ack up to 2.5 s or 3 batches, so one packet acks three messages of a slow device): a slow device's latency is mostly that hold, not the server's work. The store dictionary-codes chunks of strings (`crates/fleetlink-store/src/chunk.rs`), so this repeated value is written once per chunk of up to 2048 points, not once per point: the flood's figure is that of repeating string telemetry (states, modes, fault codes). **fleetlink-unique-strings** (flood only) is the same load with a string that differs in every message (device and count in hex at its start, same length), which the store writes point by point: the cost of string telemetry that does not repeat.
- **mosquitto-qos0 / qos1**: rumqttc clients, persistence off; delivered = received by a subscriber of `bench/#`, latency from publish to that delivery.
- **nats-core**: async-nats, delivered = received by a subscriber of `bench.>`. **nats-jetstream**: file-stored stream, acked publishes (64 in flight per client), delivered = acked.
- **quinn-sink**: the same QUIC/TLS stack with no actors, protobuf or storage; it acks the count of 100-byte messages read after each chunk. For commands it relays a request to the device's connection and the answer back, the topology of a fleetlink command; its connected devices send a QUIC keep-alive every 10 s, as often as fleetlink's devices send their heartbeat. **quinn-sink-coalesced** (slow devices only): the same sink sending the packets fleetlink sends for a slow device: it acks every third message (fleetlink's ack coalescing, `DEVICE_TELEMETRY_ACK_BATCHES`), and both sides ask the other to hold its QUIC ACKs as fleetlink's do (the device 2.75 s or 3 packets, the server 1.5 s), so the ACKs ride in the acks and the next messages. What it costs per message is what QUIC and UDP alone cost at fleetlink's packets per message: the floor under fleetlink's figure.
- Server CPU = utime+stime of the server process from /proc over the measured window (after a warm-up); client CPU the same for the load generator. Losses are counted after a drain: sent − delivered.
- Packets/msg (flood, slow devices, commands) = packets sent on loopback by clients and server together over the window, from /proc/net/snmp (UDP datagrams for QUIC, TCP segments with their ACKs for MQTT and NATS), per delivered message (per round trip for commands, the idle devices' heartbeats and keep-alives included). UDP drops = datagrams the kernel dropped for a full socket receive buffer over the window (`RcvbufErrors`, all sockets): a sign that a receiver was saturated.
- Steal % (flood, slow devices, commands, reconnect storm) = CPU time the hypervisor gave to other guests over the window, from /proc/stat, as a share of all the machine's CPU time over it: this machine is a shared virtual machine, and a run with steal in it is slower for reasons outside the systems under test. In those scenarios runs alternate between the systems (run 1 of each, then run 2 of each...), so a noisy stretch falls on several systems rather than on all of one system's runs.";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Run, Series};

    fn idle_series(system: &str, rss_kb: f64, errors: u64) -> Series {
        let mut run = Run {
            errors,
            ..Default::default()
        };
        run.extra.insert("rss_per_conn_kb".into(), rss_kb);
        Series {
            scenario: "idle-50000".into(),
            system: system.into(),
            runs: vec![run],
        }
    }

    fn report(series: Vec<Series>) -> Report {
        Report {
            generated: String::new(),
            quick: false,
            command: String::new(),
            machine: Machine {
                cpu: String::new(),
                cores: 2,
                memory_gib: 0.0,
                kernel: String::new(),
                pinning: String::new(),
                mosquitto: String::new(),
                nats_server: String::new(),
            },
            ceilings: Ceilings::default(),
            series,
            micro: Vec::new(),
            notes: Vec::new(),
            failures: Vec::new(),
            python: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn idle_target(r: &Report) -> (String, bool) {
        r.targets()
            .into_iter()
            .find(|(name, _, _)| {
                name == "idle-50000: RSS per idle device ≤ raw quinn per connection"
            })
            .map(|(_, measured, met)| (measured, met))
            .expect("the idle memory target")
    }

    /// Regression: a 50k idle run in which 30k sessions ended reported its (too low) RSS per
    /// device as meeting the target.
    #[test]
    fn an_idle_run_whose_sessions_ended_does_not_meet_the_memory_target() {
        let (measured, met) = idle_target(&report(vec![
            idle_series("fleetlink", 34.5, 30_251),
            idle_series("quinn-sink", 36.8, 0),
        ]));
        assert!(!met);
        assert!(
            measured.contains("invalid: 30251 sessions ended"),
            "{measured}"
        );

        let (measured, met) = idle_target(&report(vec![
            idle_series("fleetlink", 34.5, 0),
            idle_series("quinn-sink", 36.8, 0),
        ]));
        assert!(met);
        assert_eq!(measured, "34.5 KB vs 36.8 KB");
    }

    /// Packets per message are shown where they were counted, "–" where not (a run recorded
    /// before they were counted), never as a measured 0.
    #[test]
    fn packets_per_message_and_steal_show_only_where_counted() {
        let run = |packets: Option<f64>| {
            let mut r = Run {
                seconds: 1.0,
                delivered: 100,
                ..Default::default()
            };
            if let Some(p) = packets {
                r.extra.insert("packets_per_msg".into(), p);
                r.extra.insert("udp_dropped".into(), 7.0);
                r.extra.insert("steal_pct".into(), 12.34);
            }
            r
        };
        let series = |scenario: &str, packets| Series {
            scenario: scenario.into(),
            system: "fleetlink".into(),
            runs: vec![run(packets)],
        };
        let mut md = String::new();
        let r = report(vec![series("slow", Some(3.25)), series("commands", None)]);
        r.throughput_table(&mut md, "slow", "slow");
        r.throughput_table(&mut md, "commands", "commands");
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| fleetlink"))
            .collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(
            rows[0].ends_with("| 3.25 | 7 | 12.3 | 0 | 0 |"),
            "{}",
            rows[0]
        );
        assert!(rows[1].ends_with("| – | – | – | 0 | 0 |"), "{}", rows[1]);
        // every row has as many cells as the header
        let cells = |l: &str| l.matches('|').count();
        let header = md.lines().find(|l| l.starts_with("| System")).unwrap();
        assert!(rows.iter().all(|r| cells(r) == cells(header)), "{md}");
    }

    #[test]
    fn the_quic_floor_is_told_against_fleetlink_and_mosquitto() {
        let series = |system: &str, cpu_s: f64, packets: f64| {
            let mut run = Run {
                seconds: 1.0,
                delivered: 1_000_000,
                server_cpu_s: cpu_s,
                ..Default::default()
            };
            run.extra.insert("packets_per_msg".into(), packets);
            Series {
                scenario: "slow".into(),
                system: system.into(),
                runs: vec![run],
            }
        };
        let floor = |r: &Report| {
            let mut md = String::new();
            r.throughput_table(&mut md, "slow", "slow");
            md.lines()
                .find(|l| l.starts_with("QUIC's floor"))
                .map(str::to_owned)
        };
        let all = report(vec![
            series("fleetlink", 22.0, 1.35),
            series("quinn-sink-coalesced", 12.0, 1.33),
            series("mosquitto-qos0", 10.0, 3.2),
        ]);
        assert_eq!(
            floor(&all).as_deref(),
            Some(
                "QUIC's floor: quinn-sink-coalesced sends fleetlink's packets (1.33 per message \
                 against fleetlink's 1.35) and does nothing else, at 12.0 µs per message, 1.20× \
                 Mosquitto QoS 0's 10.0 µs. fleetlink's 22.0 µs is 1.83× that floor: its \
                 sessions, protobuf, actors and durable store add 10.0 µs per message."
            )
        );
        let without = report(vec![
            series("fleetlink", 22.0, 1.35),
            series("mosquitto-qos0", 10.0, 3.2),
        ]);
        assert_eq!(floor(&without), None);
    }

    #[test]
    fn the_server_cpu_by_thread_is_told_as_medians_largest_first() {
        let prefix = crate::scenarios::THREAD_US_PER_MSG;
        let run = |serve: f64, store: f64| {
            let mut r = Run {
                seconds: 1.0,
                delivered: 100,
                ..Default::default()
            };
            r.extra.insert(format!("{prefix}fleetlink-serve"), serve);
            r.extra.insert(format!("{prefix}fleetlink-store"), store);
            r.extra.insert(format!("{prefix}fleetlink-read"), 0.01);
            r
        };
        let with = Series {
            scenario: "slow".into(),
            system: "fleetlink".into(),
            runs: vec![run(18.0, 5.0), run(16.0, 7.0), run(17.0, 6.0)],
        };
        let without = Series {
            scenario: "slow".into(),
            system: "mosquitto-qos0".into(),
            runs: vec![Run::default()],
        };
        let mut md = String::new();
        report(vec![with, without]).throughput_table(&mut md, "slow", "slow");
        let lines: Vec<&str> = md.lines().filter(|l| l.contains("by thread")).collect();
        assert_eq!(
            lines,
            [
                "fleetlink's server CPU by thread, µs per message (medians): `fleetlink-serve` 17.0, `fleetlink-store` 6.0."
            ],
            "{md}"
        );
    }
}
