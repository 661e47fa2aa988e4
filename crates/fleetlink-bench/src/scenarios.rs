//! The scenarios: each starts the system under test as its own pinned process, drives the same
//! load at it from this process, and measures the window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use fleetlink_client::Resumption;
use tokio::sync::watch;

use crate::load::Load;
use crate::procs::{CpuTicks, PacketsSent, Proc, cpu_seconds};
use crate::stats::{Meter, Run, Series};
use crate::{fleet, light, mqtt, nats, sink};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Fleetlink,
    /// fleetlink with a string that differs in every message (flood only): what the store's
    /// dictionary coding of repeated strings saves, read against `Fleetlink`.
    FleetlinkUnique,
    MqttQos0,
    MqttQos1,
    NatsCore,
    JetStream,
    QuinnSink,
    /// The quinn sink sending fleetlink's packets for a slow device (slow devices only): an ack
    /// per three messages, with fleetlink's ACK timing on both sides (`sink::Coalesce`).
    QuinnSinkCoalesced,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Fleetlink => "fleetlink",
            System::FleetlinkUnique => "fleetlink-unique-strings",
            System::MqttQos0 => "mosquitto-qos0",
            System::MqttQos1 => "mosquitto-qos1",
            System::NatsCore => "nats-core",
            System::JetStream => "nats-jetstream",
            System::QuinnSink => "quinn-sink",
            System::QuinnSinkCoalesced => "quinn-sink-coalesced",
        }
    }

    /// How a quinn sink acks.
    fn coalesce(self) -> sink::Coalesce {
        if self == System::QuinnSinkCoalesced {
            sink::Coalesce::FLEETLINK
        } else {
            sink::Coalesce::default()
        }
    }
}

/// How the harness runs.
#[derive(Debug)]
pub struct Ctx {
    pub quick: bool,
    pub runs: usize,
    pub exe: PathBuf,
    /// Core the servers are pinned to (`None` on a one-core machine).
    pub server_core: Option<usize>,
    pub dir: tempfile::TempDir,
    pub series: Vec<Series>,
    pub notes: Vec<String>,
    /// Scenarios that failed, with why.
    pub failures: Vec<String>,
    /// Overrides the device count of the flood, slow, commands and reconnect scenarios.
    pub devices: Option<usize>,
    /// Overrides the measured window of the flood and slow scenarios.
    pub window: Option<Duration>,
    /// Overrides the round trips per run of the commands scenario.
    pub commands: Option<usize>,
    /// Only these systems (by name); empty = all.
    pub systems: Vec<String>,
    next_dir: usize,
}

impl Ctx {
    pub fn new(quick: bool, runs: usize, server_core: Option<usize>) -> Result<Ctx> {
        Ok(Ctx {
            quick,
            runs,
            exe: std::env::current_exe()?,
            server_core,
            dir: tempfile::Builder::new()
                .prefix("fleetlink-bench")
                .tempdir()?,
            series: Vec::new(),
            notes: Vec::new(),
            failures: Vec::new(),
            devices: None,
            window: None,
            commands: None,
            systems: Vec::new(),
            next_dir: 0,
        })
    }

    fn fresh_dir(&mut self, what: &str) -> Result<PathBuf> {
        self.next_dir += 1;
        let d = self.dir.path().join(format!("{what}-{}", self.next_dir));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn wants(&self, system: System) -> bool {
        self.systems.is_empty() || self.systems.iter().any(|s| s == system.name())
    }

    /// The systems of `all` this run measures, in order.
    fn wanted(&self, all: &[System]) -> Vec<System> {
        all.iter().copied().filter(|&s| self.wants(s)).collect()
    }

    fn push(&mut self, scenario: &str, system: &str, runs: Vec<Run>) {
        self.series.push(Series {
            scenario: scenario.into(),
            system: system.into(),
            runs,
        });
    }
}

/// Where a started server listens.
enum Target {
    Fleet(fleet::Ready),
    Sink(sink::Ready),
    Tcp(u16),
}

fn start_fleetlink(
    ctx: &mut Ctx,
    devices: usize,
    data: Option<PathBuf>,
    listen: &str,
) -> Result<(Proc, fleet::Ready, PathBuf)> {
    let data = match data {
        Some(d) => d,
        None => ctx.fresh_dir("fleetlink")?,
    };
    let (p, ready) = spawn_fleetlink(&ctx.exe, ctx.server_core, &data, devices, listen)?;
    Ok((p, ready, data))
}

/// Starts fleetlink's server process on `data` and waits (blocking) for its READY line.
fn spawn_fleetlink(
    exe: &Path,
    core: Option<usize>,
    data: &Path,
    devices: usize,
    listen: &str,
) -> Result<(Proc, fleet::Ready)> {
    let mut p = Proc::spawn(
        "fleetlink",
        core,
        exe,
        &[
            "serve-fleetlink".into(),
            "--data".into(),
            data.display().to_string(),
            "--devices".into(),
            devices.to_string(),
            "--listen".into(),
            listen.into(),
        ],
    )?;
    // Provisioning is one durable registry write (an fsync) per device, ~3 ms here: 100k devices
    // outlasted a flat 300 s. Room for 10 ms a device on top.
    let ready_within = Duration::from_secs(300) + Duration::from_millis(10) * devices as u32;
    let line = p.ready_line("READY ", ready_within)?;
    Ok((p, serde_json::from_str(&line)?))
}

fn start(ctx: &mut Ctx, system: System, devices: usize) -> Result<(Proc, Target)> {
    match system {
        System::Fleetlink | System::FleetlinkUnique => {
            let (p, ready, _) = start_fleetlink(ctx, devices, None, "127.0.0.1:0")?;
            Ok((p, Target::Fleet(ready)))
        }
        System::QuinnSink | System::QuinnSinkCoalesced => {
            let coalesce = system.coalesce().0.to_string();
            let mut p = Proc::spawn(
                system.name(),
                ctx.server_core,
                &ctx.exe,
                &["serve-quinn-sink".into(), "--coalesce".into(), coalesce],
            )?;
            let line = p.ready_line("READY ", Duration::from_secs(30))?;
            Ok((p, Target::Sink(serde_json::from_str(&line)?)))
        }
        System::MqttQos0 | System::MqttQos1 => {
            let dir = ctx.fresh_dir("mosquitto")?;
            let (p, port) = mqtt::start(&dir, ctx.server_core)?;
            Ok((p, Target::Tcp(port)))
        }
        System::NatsCore | System::JetStream => {
            let dir = ctx.fresh_dir("nats")?;
            let (p, port) = nats::start(&dir, ctx.server_core)?;
            Ok((p, Target::Tcp(port)))
        }
    }
}

/// Connects the load's devices (and the subscriber of peers that need one), then drives the
/// load in a task until `stop`.
async fn start_load(
    system: System,
    target: &Target,
    load: &Load,
    meter: &Meter,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let (load, meter) = (load.clone(), meter.clone());
    Ok(match (system, target) {
        (System::Fleetlink | System::FleetlinkUnique, Target::Fleet(ready)) => {
            let load = Load {
                unique_strings: system == System::FleetlinkUnique,
                ..load
            };
            // Unacked points per device: like JetStream's 64 acked publishes in flight, a bounded
            // window, so the backlog (and so the latency) is what the server causes, not the buffer.
            let buffered = if load.rate.is_some() { 1_000 } else { 256 };
            let clients = fleet::connect(&ready.server()?, load.devices, buffered, None).await?;
            tokio::spawn(async move {
                let _ = fleet::drive(&clients, &load, &meter, stop).await;
                for c in clients {
                    c.disconnect().await;
                }
            })
        }
        (System::QuinnSink | System::QuinnSinkCoalesced, Target::Sink(ready)) => {
            let conns = sink::connect(ready, load.devices, None, system.coalesce()).await?;
            tokio::spawn(async move {
                let _ = sink::drive(&conns, &load, &meter, stop).await;
                for c in conns {
                    c.close(0u32.into(), b"done");
                }
            })
        }
        (System::MqttQos0 | System::MqttQos1, Target::Tcp(port)) => {
            let level = u8::from(system == System::MqttQos1);
            let (port, m) = (*port, meter.clone());
            let sub = crate::load::SideThread::start(move || async move {
                mqtt::subscriber(port, level, &m).await
            })
            .await?;
            let clients = mqtt::connect(port, load.devices, &meter).await?;
            tokio::spawn(async move {
                let _ = mqtt::drive(&clients, level, &load, &meter, stop).await;
                // QoS 1: the event loops finish their in-flight publishes before the drain ends
                let _sub = sub;
            })
        }
        (System::NatsCore | System::JetStream, Target::Tcp(port)) => {
            let js = system == System::JetStream;
            let sub = if js {
                nats::create_stream(*port).await?;
                None
            } else {
                let (port, m) = (*port, meter.clone());
                Some(
                    crate::load::SideThread::start(move || async move {
                        nats::subscriber(port, &m).await
                    })
                    .await?,
                )
            };
            let clients = nats::connect(*port, load.devices).await?;
            tokio::spawn(async move {
                let _ = nats::drive(&clients, js, &load, &meter, stop).await;
                drop(sub);
            })
        }
        _ => anyhow::bail!("no adapter for {}", system.name()),
    })
}

/// The prefix of a run's extra figures that split fleetlink's server CPU per message by thread
/// name (threads of one name summed).
pub const THREAD_US_PER_MSG: &str = "thread_us_per_msg:";

/// One run: connect, warm up, measure `window`, stop, drain, count losses.
async fn throughput_run(
    ctx: &mut Ctx,
    system: System,
    load: &Load,
    warmup: Duration,
    window: Duration,
) -> Result<Run> {
    let (proc, target) = start(ctx, system, load.devices)?;
    let meter = Meter::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = start_load(system, &target, load, &meter, stop_rx).await?;
    tokio::time::sleep(warmup).await;
    let me = std::process::id();
    let (d0, s0, c0, k0, n0, st0, t0) = (
        meter.delivered_total(),
        proc.cpu_seconds()?,
        cpu_seconds(me)?,
        meter.errors_total(),
        PacketsSent::now()?,
        CpuTicks::now()?,
        Instant::now(),
    );
    // fleetlink's server CPU by thread: IO, sessions and actors against the store's threads
    let fleetlink = matches!(system, System::Fleetlink | System::FleetlinkUnique);
    let threads0 = if fleetlink {
        proc.thread_cpu_seconds()?
    } else {
        Default::default()
    };
    meter.reset_latency();
    tokio::time::sleep(window).await;
    let threads1 = if fleetlink {
        proc.thread_cpu_seconds()?
    } else {
        Default::default()
    };
    let (d1, s1, c1, n1, st1, t1) = (
        meter.delivered_total(),
        proc.cpu_seconds()?,
        cpu_seconds(me)?,
        PacketsSent::now()?,
        CpuTicks::now()?,
        Instant::now(),
    );
    let packets = n1.since(n0);
    let rss = proc.rss_bytes()?;
    let (p50_us, p99_us, p999_us) = meter.percentiles();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(150), driver).await;
    // Subscriber-counted peers: wait until deliveries stop coming (or all have come).
    let mut last = meter.delivered_total();
    let drain_start = Instant::now();
    while last < meter.sent_total() && drain_start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = meter.delivered_total();
        if now == last {
            break;
        }
        last = now;
    }
    let sent = meter.sent_total();
    let delivered = d1 - d0;
    // QUIC is UDP; MQTT and NATS are TCP (segments, ACKs included).
    let own = match system {
        System::Fleetlink
        | System::FleetlinkUnique
        | System::QuinnSink
        | System::QuinnSinkCoalesced => packets.udp,
        _ => packets.tcp,
    };
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(
        "packets_per_msg".into(),
        own as f64 / delivered.max(1) as f64,
    );
    extra.insert("udp_dropped".into(), packets.udp_dropped as f64);
    extra.insert("steal_pct".into(), st1.steal_pct_since(st0));
    for (name, after) in threads1 {
        let spent = after - threads0.get(&name).copied().unwrap_or_default();
        extra.insert(
            format!("{THREAD_US_PER_MSG}{name}"),
            spent * 1e6 / delivered.max(1) as f64,
        );
    }
    Ok(Run {
        seconds: (t1 - t0).as_secs_f64(),
        sent,
        delivered,
        lost: sent.saturating_sub(meter.delivered_total()),
        errors: meter.errors_total() - k0,
        server_cpu_s: s1 - s0,
        client_cpu_s: c1 - c0,
        server_rss: rss,
        p50_us,
        p99_us,
        p999_us,
        extra,
    })
}

fn log_run(scenario: &str, system: System, i: usize, r: &Run) {
    tracing::info!(
        scenario,
        system = system.name(),
        run = i + 1,
        msgs_per_s = format!("{:.0}", r.msgs_per_s()),
        per_server_cpu_s = format!("{:.0}", r.msgs_per_server_cpu_s()),
        server_us_per_msg = format!("{:.2}", r.server_us_per_msg()),
        p50_us = r.p50_us,
        p99_us = r.p99_us,
        packets_per_msg = format!(
            "{:.2}",
            r.extra.get("packets_per_msg").copied().unwrap_or(f64::NAN)
        ),
        steal_pct = format!(
            "{:.1}",
            r.extra.get("steal_pct").copied().unwrap_or(f64::NAN)
        ),
        lost = r.lost,
        errors = r.errors,
        "run done"
    );
}

/// Scenario 1: flood ingest.
pub async fn flood(ctx: &mut Ctx) -> Result<()> {
    let (devices, warmup, window) = if ctx.quick {
        (20, Duration::from_millis(500), Duration::from_secs(2))
    } else {
        (1_000, Duration::from_secs(3), Duration::from_secs(20))
    };
    let devices = ctx.devices.unwrap_or(devices);
    let window = ctx.window.unwrap_or(window);
    let load = Load {
        devices,
        rate: None,
        message_bytes: 100,
        unique_strings: false,
    };
    let systems = [
        System::Fleetlink,
        System::FleetlinkUnique,
        System::MqttQos0,
        System::MqttQos1,
        System::NatsCore,
        System::JetStream,
        System::QuinnSink,
    ];
    throughput_runs(ctx, ("flood", "flood"), &systems, &load, warmup, window).await;
    Ok(())
}

/// The runs of a throughput scenario, alternating between the systems.
async fn throughput_runs(
    ctx: &mut Ctx,
    (scenario, label): (&str, &str),
    systems: &[System],
    load: &Load,
    warmup: Duration,
    window: Duration,
) {
    let systems = ctx.wanted(systems);
    let names: Vec<&str> = systems.iter().map(|s| s.name()).collect();
    let runs = alternating(ctx, &names, label, async |ctx, k, i| {
        let r = throughput_run(ctx, systems[k], load, warmup, window).await?;
        log_run(scenario, systems[k], i, &r);
        Ok(r)
    })
    .await;
    for (name, runs) in names.into_iter().zip(runs) {
        if !runs.is_empty() {
            ctx.push(scenario, name, runs);
        }
    }
}

/// `ctx.runs` runs of each of the systems `names`, alternating between them (run 1 of each,
/// then run 2 of each...), so that a noisy stretch of a shared machine (steal) falls on several
/// systems rather than on all of one system's runs. `one(ctx, k, i)` is run `i` of system `k`. A
/// system whose run fails is recorded in `ctx.failures` and drops out of later rounds; the runs
/// of the others are kept. Returns each system's runs, in the order of `names`.
async fn alternating(
    ctx: &mut Ctx,
    names: &[&str],
    label: &str,
    mut one: impl AsyncFnMut(&mut Ctx, usize, usize) -> Result<Run>,
) -> Vec<Vec<Run>> {
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); names.len()];
    let mut failed = vec![false; names.len()];
    for i in 0..ctx.runs {
        for (k, name) in names.iter().enumerate() {
            if failed[k] {
                continue;
            }
            match one(ctx, k, i).await {
                Ok(r) => runs[k].push(r),
                Err(e) => {
                    ctx.failures.push(format!("{label}, {name}: {e:#}"));
                    failed[k] = true;
                }
            }
        }
    }
    runs
}

/// Scenario 2: many slow devices at 1 message/s.
pub async fn slow(ctx: &mut Ctx) -> Result<()> {
    // The window is a whole number of the SDK's ack cycles: with acks coalesced by three
    // (`DEVICE_TELEMETRY_ACK_BATCHES`), a device at 1 msg/s receives one ack every 3 s, and a
    // window of 20 s counted 7 acks (21 messages) for most devices, as their cycles all began
    // with the connect ramp: 10,440 messages/s delivered for 10,000 sent. Any window of a whole
    // number of cycles counts each device's messages exactly.
    let (devices, warmup, window) = if ctx.quick {
        (200, Duration::from_secs(2), Duration::from_secs(3))
    } else {
        (10_000, Duration::from_secs(5), Duration::from_secs(21))
    };
    let devices = ctx.devices.unwrap_or(devices);
    let window = ctx.window.unwrap_or(window);
    let load = Load {
        devices,
        rate: Some(1.0),
        message_bytes: 100,
        unique_strings: false,
    };
    let systems = [
        System::Fleetlink,
        System::QuinnSink,
        System::QuinnSinkCoalesced,
        System::MqttQos0,
        System::MqttQos1,
    ];
    throughput_runs(
        ctx,
        ("slow", "slow devices"),
        &systems,
        &load,
        warmup,
        window,
    )
    .await;
    Ok(())
}

/// Scenario 3: idle connections held: RSS per connection, connect rate, idle CPU.
pub async fn idle(ctx: &mut Ctx, sizes: &[usize]) -> Result<()> {
    // The window outlasts the heartbeat timeout (30 s): a device the server fails to hear from
    // in time is closed, and counted as an error.
    let (settle, window) = if ctx.quick {
        (Duration::from_millis(500), Duration::from_secs(2))
    } else {
        (Duration::from_secs(5), Duration::from_secs(35))
    };
    // The per-device cost of fleetlink is measured against a server with no devices at all.
    let (empty, _, _) = start_fleetlink(ctx, 0, None, "127.0.0.1:0")?;
    let empty_rss = empty.rss_bytes()?;
    drop(empty);
    for (k, &n) in sizes.iter().enumerate() {
        let runs = if k == 0 { ctx.runs } else { 1 };
        for system in [System::Fleetlink, System::QuinnSink] {
            if !ctx.wants(system) {
                continue;
            }
            let mut out = Vec::new();
            for i in 0..runs {
                let r = match idle_run(ctx, system, n, empty_rss, settle, window).await {
                    Ok(r) => r,
                    Err(e) => {
                        ctx.failures
                            .push(format!("{n} idle connections, {}: {e:#}", system.name()));
                        break;
                    }
                };
                tracing::info!(
                    system = system.name(),
                    n,
                    run = i + 1,
                    extra = ?r.extra,
                    "idle run done"
                );
                out.push(r);
            }
            if !out.is_empty() {
                ctx.push(&format!("idle-{n}"), system.name(), out);
            }
        }
    }
    Ok(())
}

async fn idle_run(
    ctx: &mut Ctx,
    system: System,
    n: usize,
    empty_rss: u64,
    settle: Duration,
    window: Duration,
) -> Result<Run> {
    let (proc, target) = start(ctx, system, n)?;
    let base_rss = match system {
        System::Fleetlink => empty_rss,
        _ => proc.rss_bytes()?,
    };
    let started = Instant::now();
    // fleetlink's idle devices are light ones (the protocol without the SDK), or 100k would not
    // fit in the load generator's memory beside the server.
    let mut light = None;
    let holder: Box<dyn std::any::Any> = match &target {
        Target::Fleet(ready) => {
            light = Some(light::connect(&ready.server()?, n).await?);
            Box::new(())
        }
        // A client keep-alive as often as fleetlink's heartbeat (10 s), or idle clients would time out.
        Target::Sink(ready) => Box::new(sink::Closing(
            sink::connect(ready, n, Some(Duration::from_secs(10)), system.coalesce()).await?,
        )),
        Target::Tcp(_) => anyhow::bail!("no idle adapter for {}", system.name()),
    };
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let me = std::process::id();
    let (s0, c0, t0) = (proc.cpu_seconds()?, cpu_seconds(me)?, Instant::now());
    tokio::time::sleep(window).await;
    let (s1, c1, t1) = (proc.cpu_seconds()?, cpu_seconds(me)?, Instant::now());
    let rss = proc.rss_bytes()?;
    let seconds = (t1 - t0).as_secs_f64();
    let mut run = Run {
        seconds,
        server_cpu_s: s1 - s0,
        client_cpu_s: c1 - c0,
        server_rss: rss,
        ..Default::default()
    };
    run.extra.insert("connections".into(), n as f64);
    run.extra
        .insert("connect_per_s".into(), n as f64 / connect_s);
    run.extra.insert(
        "rss_per_conn_kb".into(),
        rss.saturating_sub(base_rss) as f64 / n as f64 / 1024.0,
    );
    run.extra
        .insert("idle_cpu_pct".into(), (s1 - s0) / seconds * 100.0);
    run.errors = light.as_ref().map_or(0, |l| l.lost());
    drop(light);
    drop(holder);
    Ok(run)
}

/// Scenario 4: command round trip with many devices connected.
pub async fn commands(ctx: &mut Ctx) -> Result<()> {
    let (devices, count) = if ctx.quick {
        (50, 50)
    } else {
        (10_000, 10_000)
    };
    let devices = ctx.devices.unwrap_or(devices);
    let count = ctx.commands.unwrap_or(count);
    let systems = ctx.wanted(&[System::Fleetlink, System::QuinnSink]);
    let names: Vec<&str> = systems.iter().map(|s| s.name()).collect();
    let runs = alternating(ctx, &names, "commands", async |ctx, k, i| {
        let r = command_run(ctx, systems[k], devices, count).await?;
        log_run("commands", systems[k], i, &r);
        Ok(r)
    })
    .await;
    for (name, runs) in names.into_iter().zip(runs) {
        if !runs.is_empty() {
            ctx.push("commands", name, runs);
        }
    }
    Ok(())
}

/// One run of scenario 4: `count` round trips, one at a time, with `devices` connected.
async fn command_run(ctx: &mut Ctx, system: System, devices: usize, count: usize) -> Result<Run> {
    let (proc, target) = start(ctx, system, devices)?;
    let meter = Meter::new();
    let me = std::process::id();
    let (s0, c0, t0, n0, st0);
    let holder: Box<dyn std::any::Any> = match &target {
        Target::Fleet(ready) => {
            let server = ready.server()?;
            let clients =
                fleet::connect(&server, devices, 1_000, Some(fleet::ping_handlers())).await?;
            (s0, c0, t0) = (proc.cpu_seconds()?, cpu_seconds(me)?, Instant::now());
            (n0, st0) = (PacketsSent::now()?, CpuTicks::now()?);
            fleet::command_round_trips(&server, &ready.admin_token, devices, count, &meter).await?;
            Box::new(clients)
        }
        Target::Sink(ready) => {
            // A QUIC keep-alive as often as fleetlink's devices send their heartbeat (10 s), as
            // in the idle scenario: both servers carry the connected fleet's idle traffic while
            // the commands run, and the packets per round trip count it on both sides.
            let conns = sink::connect(
                ready,
                devices + 1,
                Some(Duration::from_secs(10)),
                system.coalesce(),
            )
            .await?;
            sink::register(&conns[..devices]).await?;
            (s0, c0, t0) = (proc.cpu_seconds()?, cpu_seconds(me)?, Instant::now());
            (n0, st0) = (PacketsSent::now()?, CpuTicks::now()?);
            sink::request_round_trips(&conns[devices], devices, count, &meter).await?;
            Box::new(sink::Closing(conns))
        }
        Target::Tcp(_) => unreachable!("commands run on fleetlink and the sink"),
    };
    let seconds = t0.elapsed().as_secs_f64();
    // UDP datagrams on loopback both ways, heartbeats and keep-alives of the idle devices
    // included: the packets a round trip costs.
    let packets = PacketsSent::now()?.since(n0);
    let steal_pct = CpuTicks::now()?.steal_pct_since(st0);
    let (p50_us, p99_us, p999_us) = meter.percentiles();
    let r = Run {
        seconds,
        sent: meter.sent_total(),
        delivered: meter.delivered_total(),
        lost: meter.sent_total() - meter.delivered_total(),
        errors: meter.errors_total(),
        server_cpu_s: proc.cpu_seconds()? - s0,
        client_cpu_s: cpu_seconds(me)? - c0,
        server_rss: proc.rss_bytes()?,
        p50_us,
        p99_us,
        p999_us,
        extra: [
            ("devices".to_owned(), devices as f64),
            (
                "packets_per_msg".to_owned(),
                packets.udp as f64 / meter.delivered_total().max(1) as f64,
            ),
            ("udp_dropped".to_owned(), packets.udp_dropped as f64),
            ("steal_pct".to_owned(), steal_pct),
        ]
        .into(),
    };
    drop(holder);
    Ok(r)
}

/// Scenario 5: restart the server under a streaming fleet; time until all are back.
/// The reconnect storm's variants: how the devices' SDK resumes its TLS sessions.
pub const RECONNECT_VARIANTS: [(&str, Resumption); 3] = [
    ("fleetlink (full handshakes)", Resumption::Off),
    ("fleetlink (resumed, 1-RTT)", Resumption::Tickets),
    ("fleetlink (resumed, 0-RTT)", Resumption::ZeroRtt),
];

pub async fn reconnect(ctx: &mut Ctx) -> Result<()> {
    let devices = ctx.devices.unwrap_or(if ctx.quick { 50 } else { 10_000 });
    // --systems selects variants by a part of their name ("fleetlink", "0-RTT", "full").
    let variants: Vec<(&str, Resumption)> = RECONNECT_VARIANTS
        .into_iter()
        .filter(|(system, _)| {
            ctx.systems.is_empty() || ctx.systems.iter().any(|s| system.contains(s.as_str()))
        })
        .collect();
    let names: Vec<&str> = variants.iter().map(|v| v.0).collect();
    // The variants take turns, as the systems of the other scenarios do.
    let runs = alternating(ctx, &names, "reconnect storm", async |ctx, k, i| {
        let (system, resumption) = variants[k];
        let r = reconnect_run(ctx, devices, resumption).await?;
        tracing::info!(system, run = i + 1, extra = ?r.extra, "reconnect run done");
        Ok(r)
    })
    .await;
    for (name, runs) in names.into_iter().zip(runs) {
        if !runs.is_empty() {
            ctx.push("reconnect", name, runs);
        }
    }
    Ok(())
}

/// Messages per second per device while the server restarts under them.
pub const RECONNECT_RATE: f64 = 0.2;

async fn reconnect_run(ctx: &mut Ctx, devices: usize, resumption: Resumption) -> Result<Run> {
    let listen = format!("127.0.0.1:{}", crate::procs::free_udp_port()?);
    let (mut proc, ready, data) = start_fleetlink(ctx, devices, None, &listen)?;
    let server = ready.server()?;
    let me = std::process::id();
    let (connect_t0, connect_cpu0) = (Instant::now(), (proc.cpu_seconds()?, cpu_seconds(me)?));
    let clients = fleet::connect_resuming(&server, devices, 1_000, None, resumption).await?;
    tracing::info!(
        seconds = connect_t0.elapsed().as_secs_f64(),
        server_cpu_s = proc.cpu_seconds()? - connect_cpu0.0,
        client_cpu_s = cpu_seconds(me)? - connect_cpu0.1,
        "fleet connected"
    );
    let meter = Meter::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    // One message per device every 5 s: at 1 msg/s, 10k SDK devices alone kept the load
    // generator's one core busy, and its handshakes (the thing measured) starved behind them.
    let load = Load {
        devices,
        rate: Some(RECONNECT_RATE),
        message_bytes: 100,
        unique_strings: false,
    };
    let driving = {
        let clients = clients.clone();
        let meter = meter.clone();
        tokio::spawn(async move { fleet::drive(&clients, &load, &meter, stop_rx).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The stop and the restart wait on processes (seconds): they run off the load generator's
    // one thread, which every simulated device needs meanwhile. (Run on it, they froze all 10k
    // devices for the ~2-3 s of the stop: the old server's closes overflowed the devices' socket
    // buffers unread, so the devices kept their dead connections and probed them (~30k small
    // packets/s at the new server), and every device's reconnect attempt started in one burst
    // once the thread was free, 8.8k Initials in half a second, after which the load generator
    // took ~3.5 s to get to the new server's answers (a packet capture, session 27).)
    let t0 = Instant::now();
    let proc = tokio::task::spawn_blocking(move || -> Result<Proc> {
        proc.stop_gracefully(Duration::from_secs(60))?;
        Ok(proc)
    })
    .await??;
    drop(proc);
    let stopped_s = t0.elapsed().as_secs_f64();
    let acked_before: Vec<u64> = clients.iter().map(|c| c.stats().points_acked).collect();
    let (exe, core, restart_listen) = (ctx.exe.clone(), ctx.server_core, listen.clone());
    let (proc2, _) = tokio::task::spawn_blocking(move || {
        spawn_fleetlink(&exe, core, &data, devices, &restart_listen)
    })
    .await??;
    let ready_s = t0.elapsed().as_secs_f64();
    // CPU of both sides during the storm, to tell which one bounds it.
    let (server_cpu0, client_cpu0) = (proc2.cpu_seconds()?, cpu_seconds(me)?);
    let ticks0 = CpuTicks::now()?;
    // Measured by polling the clients' own state every 100 ms. Only the clients not back yet are
    // polled, once each per round: polling all 10k three times every 20 ms took ~45% of the load
    // generator's core (a profile: DeviceClient::stats cloning), and two lists polled apart still
    // took ~9% of it in a storm, which the handshakes needed.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut online_s = None;
    let mut last_log = Instant::now();
    // Clients seen back online (connected again after the restart), and the clients not yet
    // both back online and streaming (a point acked after the restart).
    let mut seen_online = vec![false; devices];
    let mut online = 0usize;
    let mut pending: Vec<usize> = (0..devices).collect();
    let streaming_s = loop {
        pending.retain(|&i| {
            let s = clients[i].stats();
            if !seen_online[i] && s.connected && s.connects >= 2 {
                seen_online[i] = true;
                online += 1;
            }
            !(seen_online[i] && s.points_acked > acked_before[i])
        });
        if online == devices && online_s.is_none() {
            online_s = Some(t0.elapsed().as_secs_f64());
        }
        if pending.is_empty() {
            break t0.elapsed().as_secs_f64();
        }
        let errors_of_the_disconnected = || {
            clients.iter().fold(
                std::collections::BTreeMap::<String, usize>::new(),
                |mut m, c| {
                    let s = c.stats();
                    if !s.connected {
                        *m.entry(s.last_error.unwrap_or_default()).or_default() += 1;
                    }
                    m
                },
            )
        };
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(
                seconds = t0.elapsed().as_secs(),
                online,
                streaming = devices - pending.len(),
                errors = ?errors_of_the_disconnected(),
                "reconnecting"
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "after 120 s only {} of {devices} devices were back and {} streaming; last errors of the others: {:?}",
                online,
                devices - pending.len(),
                errors_of_the_disconnected()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let server_cpu_s = proc2.cpu_seconds()? - server_cpu0;
    let client_cpu_s = cpu_seconds(me)? - client_cpu0;
    let steal_pct = CpuTicks::now()?.steal_pct_since(ticks0);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(60), driving).await;
    let mut run = Run {
        seconds: streaming_s,
        server_cpu_s,
        client_cpu_s,
        sent: meter.sent_total(),
        delivered: meter.delivered_total(),
        lost: meter.sent_total().saturating_sub(meter.delivered_total()),
        errors: meter.errors_total(),
        server_rss: proc2.rss_bytes()?,
        ..Default::default()
    };
    run.extra.insert("devices".into(), devices as f64);
    run.extra.insert("stop_s".into(), stopped_s);
    run.extra.insert("restart_ready_s".into(), ready_s);
    run.extra
        .insert("all_online_s".into(), online_s.unwrap_or(streaming_s));
    run.extra.insert("all_streaming_s".into(), streaming_s);
    // From the moment the new server listens: the storm itself.
    run.extra.insert(
        "online_after_ready_s".into(),
        online_s.unwrap_or(streaming_s) - ready_s,
    );
    run.extra
        .insert("streaming_after_ready_s".into(), streaming_s - ready_s);
    // Per device brought back, and the share of the storm each side was busy.
    let storm_s = (streaming_s - ready_s).max(1e-9);
    run.extra.insert(
        "server_cpu_ms_per_device".into(),
        server_cpu_s * 1e3 / devices as f64,
    );
    run.extra.insert(
        "client_cpu_ms_per_device".into(),
        client_cpu_s * 1e3 / devices as f64,
    );
    run.extra
        .insert("server_busy_pct".into(), server_cpu_s * 100.0 / storm_s);
    run.extra
        .insert("client_busy_pct".into(), client_cpu_s * 100.0 / storm_s);
    run.extra.insert("steal_pct".into(), steal_pct);
    let zero_rtt: u64 = clients.iter().map(|c| c.stats().zero_rtt_connects).sum();
    run.extra
        .insert("zero_rtt_connects".into(), zero_rtt as f64);
    drop(Arc::new(clients));
    Ok(run)
}
