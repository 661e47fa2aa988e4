//! `fleetlink-bench`: the harness behind `cargo xtask bench`. See docs/benchmarks.md.

mod ceilings;
mod fleet;
mod light;
mod load;
mod mqtt;
mod nats;
mod procs;
mod report;
mod scenarios;
mod sink;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

/// The allocator of `fleetlink serve` (crates/fleetlink-cli), for the server processes this
/// binary runs; the load generator and the quinn sink use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "fleetlink's benchmark harness (run it through `cargo xtask bench`)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the scenarios and writes the report.
    Run(RunArgs),
    /// (internal) a fleetlink server for the harness: provisions bench devices, serves until stdin closes.
    ServeFleetlink {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 0)]
        devices: usize,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// (internal) the raw quinn sink, until stdin closes.
    ServeQuinnSink {
        #[arg(long, default_value_t = 100)]
        message_bytes: usize,
        /// Ack every N messages with fleetlink's ACK timing (0 = after every chunk read).
        #[arg(long, default_value_t = 0)]
        coalesce: u32,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A short smoke run with tiny loads (the test suite runs it so the harness cannot rot).
    #[arg(long)]
    quick: bool,
    /// Runs per system and scenario (medians are reported); default 3, 1 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Scenarios to run (default: all).
    #[arg(long, value_delimiter = ',', default_values_t = ["flood".to_string(), "slow".into(), "idle".into(), "commands".into(), "reconnect".into()])]
    only: Vec<String>,
    /// Connection counts of the idle scenario (the first gets every run, the others one).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 50_000, 100_000])]
    idle_sizes: Vec<usize>,
    /// Device count of the flood, slow, commands and reconnect scenarios (default: the issue's).
    #[arg(long)]
    devices: Option<usize>,
    /// Round trips per run of the commands scenario (default 10000, 50 with --quick).
    #[arg(long)]
    commands: Option<usize>,
    /// Measured window of the flood and slow scenarios, seconds (default 20 and 21).
    #[arg(long)]
    window: Option<f64>,
    /// Systems to run (default: every one the scenario compares).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    md: PathBuf,
    /// JSON report.
    #[arg(long, default_value = "docs/benchmarks.json")]
    json: PathBuf,
    /// Criterion's output directory, to fold the micro-benchmarks into the report.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// Results of bindings/python/bench/telemetry_bench.py --json (scenario 6), one per row count.
    #[arg(long)]
    python_json: Vec<PathBuf>,
    /// Fail unless every scenario delivered messages without client errors (the smoke test).
    #[arg(long)]
    check: bool,
    /// The command line to print in the report.
    #[arg(long, default_value = "cargo xtask bench")]
    command_line: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let quiet = !matches!(cli.command, Cmd::Run(_));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETLINK_BENCH_LOG").unwrap_or_else(
                |_| {
                    if quiet {
                        "warn".into()
                    } else {
                        "info,fleetlink_client=warn,fleetlink_server=warn,quinn=warn,rumqttc=warn,async_nats=warn".into()
                    }
                },
            ),
        )
        .init();
    match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::ServeFleetlink {
            data,
            devices,
            listen,
        } => fleet::serve(&data, devices, listen),
        Cmd::ServeQuinnSink {
            message_bytes,
            coalesce,
        } => sink::serve(message_bytes, sink::Coalesce(coalesce)),
    }
}

fn run(args: RunArgs) -> Result<()> {
    let cores = procs::cores(); // before pinning, which narrows what this process sees
    let (server_core, pinning) = if cores >= 2 {
        procs::pin_current_thread(0)?;
        (
            Some(1),
            "load generator on core 0, each server process on core 1 (taskset)".to_owned(),
        )
    } else {
        (None, "one core: nothing pinned".to_owned())
    };
    let nofile = procs::raise_nofile(1 << 20);
    tracing::info!(nofile, "open-file limit");
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let mut ctx = scenarios::Ctx::new(args.quick, runs, server_core)?;
    ctx.devices = args.devices;
    ctx.window = args.window.map(Duration::from_secs_f64);
    ctx.commands = args.commands;
    ctx.systems = args.systems.clone();
    let started = std::time::Instant::now();
    let ceilings = ceilings::measure(
        if args.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        },
        server_core,
    )?;
    tracing::info!(?ceilings, "machine ceilings");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let idle_sizes = if args.quick {
        vec![100]
    } else {
        args.idle_sizes.clone()
    };
    let micro = args
        .criterion
        .as_deref()
        .map(report::read_criterion)
        .unwrap_or_default();
    let python = args
        .python_json
        .iter()
        .map(|p| report::read_python(p))
        .collect::<Result<Vec<_>>>()?;
    let machine = report::Machine::describe(pinning, cores);
    // The report is rewritten after every scenario, so a long run that is stopped (or a scenario
    // that hangs) still leaves the figures measured so far.
    let report_now = |ctx: &scenarios::Ctx, pending: &[String]| report::Report {
        generated: humantime_now(),
        quick: args.quick,
        command: args.command_line.clone(),
        machine: machine.clone(),
        ceilings,
        series: ctx.series.clone(),
        micro: micro.clone(),
        notes: ctx.notes.clone(),
        failures: ctx.failures.clone(),
        python: python.clone(),
        pending: pending.to_vec(),
    };
    rt.block_on(async {
        for (i, scenario) in args.only.iter().enumerate() {
            tracing::info!(scenario, "starting");
            let result = match scenario.as_str() {
                "flood" => scenarios::flood(&mut ctx).await,
                "slow" => scenarios::slow(&mut ctx).await,
                "idle" => scenarios::idle(&mut ctx, &idle_sizes).await,
                "commands" => scenarios::commands(&mut ctx).await,
                "reconnect" => scenarios::reconnect(&mut ctx).await,
                other => anyhow::bail!("unknown scenario {other:?}"),
            };
            // A failed scenario is reported (and fails --check); the others still run.
            if let Err(e) = result {
                tracing::error!(scenario, error = format!("{e:#}"), "scenario failed");
                ctx.failures.push(format!("{scenario}: {e:#}"));
            }
            report_now(&ctx, &args.only[i + 1..]).write(&args.md, &args.json)?;
        }
        anyhow::Ok(())
    })?;
    let report = report_now(&ctx, &[]);
    report.write(&args.md, &args.json)?;
    if args.check {
        report.check()?;
    }
    tracing::info!(
        seconds = started.elapsed().as_secs(),
        md = %args.md.display(),
        "report written"
    );
    Ok(())
}

/// The date in UTC, from `date` (the harness has no calendar dependency).
fn humantime_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
