//! `fleetlink`: run a server, a demo fleet or a simulator, provision devices, look at the fleet.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a CLI talks to a person

mod fleet_ops;
mod ops;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// mimalloc, not glibc's malloc: the server's IO thread allocates the points its store writer
/// frees, and glibc's arenas spent ~15% of a flood's server CPU on that (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetlink_client::{
    DeviceId, MetricName, OperatorClient, OperatorConfig, ServerAddress, TelemetryQuery, Value,
    now_us,
};
use fleetlink_server::{ADMIN_TOKEN_FILE, Server, ServerConfig};
use fleetlink_sim::{Credentials, Fleet, FleetConfig};

#[derive(Parser, Debug)]
#[command(
    name = "fleetlink",
    version,
    about = "fleetlink: an M2M fleet platform over QUIC"
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default "info").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a fleet server.
    Serve {
        /// UDP address to listen on [default: 0.0.0.0:7447, or the config file's].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory [default: ./fleetlink-data, or the config file's].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TOML configuration file (see ServerConfig in ARCHITECTURE.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a server and a simulated fleet in one process, with a live summary.
    Demo {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Data directory [default: a temporary directory, removed at exit].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Stop after this long (e.g. "30s"); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Attach a simulated fleet to a running server.
    Sim {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        /// File keeping the simulated devices' tokens between runs.
        #[arg(long, default_value = "fleetlink-sim-devices.json")]
        credentials: PathBuf,
        /// Stop after this long (e.g. "1m"); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Manage devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// List devices with presence and last values.
    Devices {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Read a device's stored telemetry.
    Telemetry {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device.
        device: String,
        /// Only this metric.
        #[arg(long)]
        metric: Option<String>,
        /// Only points since then: a duration ago ("15m", "2h") or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// At most this many points.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Read or change a device's twin.
    Twin {
        #[command(subcommand)]
        command: ops::TwinCommand,
    },
    /// Send, wait for, inspect, list and cancel commands.
    #[command(name = "command")]
    Cmd {
        #[command(subcommand)]
        command: ops::CommandCommand,
    },
    /// Devices matching a query, e.g. 'tag.region == "north" and online and metric.fuel < 0.2'
    /// (grammar: docs/queries.md).
    Query {
        #[command(flatten)]
        conn: ConnArgs,
        /// The query.
        query: String,
        /// At most this many devices.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow a live stream: telemetry, presence, twin, commands, jobs, or a standing query.
    Watch {
        #[command(flatten)]
        conn: ConnArgs,
        /// Which stream.
        #[arg(value_enum)]
        stream: fleet_ops::StreamKind,
        /// Only devices matching this query (the standing query itself for `query`).
        #[arg(long, default_value = "")]
        query: String,
        /// Telemetry: only these metrics (repeatable).
        #[arg(long = "metric")]
        metrics: Vec<String>,
        /// Jobs: only this job (0 = all).
        #[arg(long, default_value_t = 0)]
        job: u64,
        /// pretty (one line per event) or json (JSON lines).
        #[arg(long, value_enum, default_value_t = fleet_ops::Format::Pretty)]
        format: fleet_ops::Format,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Publish a message to a topic (as an operator).
    Publish {
        #[command(flatten)]
        conn: ConnArgs,
        /// The topic.
        topic: String,
        /// The payload (UTF-8 text).
        payload: String,
        /// Keep it as the topic's retained message.
        #[arg(long)]
        retain: bool,
    },
    /// Manage groups.
    Group {
        #[command(subcommand)]
        command: fleet_ops::GroupCommand,
    },
    /// Check or reload the bridge policy.
    Policy {
        #[command(subcommand)]
        command: fleet_ops::PolicyCommand,
    },
    /// Apply a command or a desired-state change to many devices.
    Job {
        #[command(subcommand)]
        command: fleet_ops::JobCommand,
    },
    /// A device's connection history (online/offline events with reasons), newest first.
    Presence {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device.
        device: String,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Provision a device and print its token (shown once).
    Add {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device id.
        name: String,
        /// A tag, as key=value (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Attributes, a JSON object.
        #[arg(long)]
        attributes: Option<String>,
    },
    /// Create many devices from a file of JSON lines, `{"id": "...", "tags": {...},
    /// "attributes": {...}}` (tags and attributes optional), 1000 per server transaction.
    /// Prints `{"id": "...", "token": "..."}` per device as JSON lines (the tokens are shown
    /// once), each batch as soon as it is created.
    Import {
        #[command(flatten)]
        conn: ConnArgs,
        /// The file, or `-` for standard input.
        file: PathBuf,
    },
    /// Change a device's tags and attributes.
    Update {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device id.
        name: String,
        /// Set a tag, as key=value (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Remove a tag (repeatable).
        #[arg(long = "untag")]
        untag: Vec<String>,
        /// A JSON merge patch for the attributes (null deletes a field).
        #[arg(long)]
        attributes: Option<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ConnArgs {
    /// Server address.
    #[arg(long, env = "FLEETLINK_SERVER", default_value = "127.0.0.1:7447")]
    server: SocketAddr,
    /// CA certificate (PEM) to trust [default: DATA_DIR/tls/ca.pem].
    #[arg(long, env = "FLEETLINK_CA")]
    ca: Option<PathBuf>,
    /// Admin token [default: the contents of DATA_DIR/admin.token].
    #[arg(long, env = "FLEETLINK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Name in the server's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Data directory of a local server, to find its CA and admin token.
    #[arg(long, env = "FLEETLINK_DATA_DIR", default_value = "fleetlink-data")]
    data_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct FleetArgs {
    /// Simulated vehicles.
    #[arg(long, default_value_t = 100)]
    vehicles: usize,
    /// Simulated stationary machines.
    #[arg(long, default_value_t = 100)]
    machines: usize,
    /// Readings per device per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
}

impl FleetArgs {
    fn config(&self) -> FleetConfig {
        FleetConfig {
            vehicles: self.vehicles,
            machines: self.machines,
            rate_hz: self.rate,
            ..FleetConfig::default()
        }
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("tag {s:?} is not key=value"))
}

impl ConnArgs {
    fn address(&self) -> Result<ServerAddress> {
        let ca = self
            .ca
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tls").join("ca.pem"));
        let ca_pem = std::fs::read(&ca).with_context(|| {
            format!(
                "cannot read the CA certificate {}; pass --ca or --data-dir",
                ca.display()
            )
        })?;
        Ok(ServerAddress {
            addr: self.server,
            server_name: self.server_name.clone(),
            ca_pem,
        })
    }

    fn token(&self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let path = self.data_dir.join(ADMIN_TOKEN_FILE);
        let t = std::fs::read_to_string(&path)
            .with_context(|| format!("no admin token: pass --token, set FLEETLINK_TOKEN, or point --data-dir at the server's data dir ({} not readable)", path.display()))?;
        Ok(t.trim().to_owned())
    }

    pub(crate) async fn operator(&self) -> Result<OperatorClient> {
        let config = OperatorConfig {
            server: self.address()?,
            token: self.token()?,
        };
        OperatorClient::connect(config)
            .await
            .with_context(|| format!("cannot connect to {}", self.server))
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            listen,
            data_dir,
            config,
        } => serve(listen, data_dir, config).await,
        Command::Demo {
            fleet,
            data_dir,
            duration,
        } => demo(fleet, data_dir, duration).await,
        Command::Sim {
            conn,
            fleet,
            credentials,
            duration,
        } => sim(conn, fleet, credentials, duration).await,
        Command::Device {
            command:
                DeviceCommand::Add {
                    conn,
                    name,
                    tags,
                    attributes,
                },
        } => {
            let id = DeviceId::new(name)?;
            let attributes = match attributes {
                Some(a) => {
                    match serde_json::from_str(&a).context("--attributes is not valid JSON")? {
                        serde_json::Value::Object(m) => m,
                        _ => anyhow::bail!("--attributes must be a JSON object"),
                    }
                }
                None => serde_json::Map::new(),
            };
            let op = conn.operator().await?;
            let token = op
                .provision_device_with(&id, tags.into_iter().collect(), attributes)
                .await?;
            eprintln!("device {id} provisioned; its token (shown once):");
            println!("{token}");
            Ok(())
        }
        Command::Device {
            command: DeviceCommand::Import { conn, file },
        } => {
            let specs = read_device_specs(&file)?;
            let op = conn.operator().await?;
            let mut done = 0;
            for batch in specs.chunks(fleetlink_client::MAX_PROVISION_BATCH) {
                let tokens = op.provision_devices(batch.to_vec()).await.with_context(|| {
                    format!(
                        "importing devices {}..{} (the {done} before them were created and printed)",
                        done + 1,
                        done + batch.len()
                    )
                })?;
                let mut out = std::io::stdout().lock();
                for (id, token) in tokens {
                    serde_json::to_writer(
                        &mut out,
                        &serde_json::json!({"id": id.as_str(), "token": token}),
                    )?;
                    writeln!(out)?;
                }
                out.flush()?;
                done += batch.len();
            }
            eprintln!("{done} devices provisioned");
            Ok(())
        }
        Command::Device {
            command:
                DeviceCommand::Update {
                    conn,
                    name,
                    tags,
                    untag,
                    attributes,
                },
        } => {
            let id = DeviceId::new(name)?;
            let patch = attributes
                .map(|a| serde_json::from_str(&a).context("--attributes is not valid JSON"))
                .transpose()?;
            let op = conn.operator().await?;
            let d = op
                .update_device(&id, tags.into_iter().collect(), untag, patch)
                .await?;
            let tags: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{}: tags {} attributes {}",
                d.id,
                tags.join(","),
                d.attributes
            );
            Ok(())
        }
        Command::Devices { conn } => devices(conn).await,
        Command::Telemetry {
            conn,
            device,
            metric,
            since,
            limit,
        } => telemetry(conn, device, metric, since, limit).await,
        Command::Twin { command } => ops::twin(command).await,
        Command::Cmd { command } => ops::command(command).await,
        Command::Presence {
            conn,
            device,
            limit,
        } => ops::presence(conn, device, limit).await,
        Command::Query {
            conn,
            query,
            limit,
            json,
        } => fleet_ops::query(conn, query, limit, json).await,
        Command::Watch {
            conn,
            stream,
            query,
            metrics,
            job,
            format,
            count,
        } => fleet_ops::watch(conn, stream, query, metrics, job, format, count).await,
        Command::Publish {
            conn,
            topic,
            payload,
            retain,
        } => fleet_ops::publish(conn, topic, payload, retain).await,
        Command::Group { command } => fleet_ops::group(command).await,
        Command::Policy { command } => fleet_ops::policy(command).await,
        Command::Job { command } => fleet_ops::job(command).await,
    }
}

fn start_server(config: ServerConfig) -> Result<Server> {
    let server = Server::start(config).context("starting the server")?;
    println!("listening on {}", server.local_addr());
    if let Some(ca) = server.ca_cert_path() {
        println!("development CA (clients must trust it): {}", ca.display());
    }
    if let Some(token) = server.created_admin_token() {
        println!(
            "admin token (also in {}): {token}",
            server.admin_token_file().display()
        );
    }
    Ok(server)
}

async fn serve(
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    file: Option<PathBuf>,
) -> Result<()> {
    let mut config = match &file {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    let server = start_server(config)?;
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("shutting down");
    tokio::task::spawn_blocking(move || server.shutdown()).await?;
    Ok(())
}

async fn demo(
    fleet: FleetArgs,
    data_dir: Option<PathBuf>,
    duration: Option<Duration>,
) -> Result<()> {
    let tmp;
    let dir = match data_dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let server = start_server(ServerConfig::local(&dir))?;
    let address =
        ServerAddress::local(server.local_addr(), server.ca_cert_path().context("no CA")?)?;
    let token = std::fs::read_to_string(server.admin_token_file())?
        .trim()
        .to_owned();
    let op = OperatorClient::connect(OperatorConfig {
        server: address.clone(),
        token,
    })
    .await?;
    let creds_path = dir.join("sim-devices.json");
    let mut creds = Credentials::load(&creds_path)?;
    let fleet = start_fleet(address, &op, &mut creds, fleet.config()).await?;
    creds.save(&creds_path)?;
    live_summary(&fleet, duration).await?;
    fleet.stop(Duration::from_secs(10)).await;
    let stored: u64 = count_stored(&op).await?;
    println!(
        "stopped; {stored} points stored in {}",
        dir.join("fleetlink.db").display()
    );
    op.close();
    tokio::task::spawn_blocking(move || server.shutdown()).await?;
    Ok(())
}

async fn start_fleet(
    address: ServerAddress,
    op: &OperatorClient,
    creds: &mut Credentials,
    config: FleetConfig,
) -> Result<Fleet> {
    let total = (config.vehicles + config.machines) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "connecting {bar:40} {pos}/{len} devices ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let fleet = Fleet::start(address, op, creds, config, |n, _| {
        bar.set_position(n as u64)
    })
    .await;
    bar.finish_and_clear();
    let fleet = fleet.context("starting the simulated fleet")?;
    println!("{} simulated devices connected", fleet.devices().len());
    Ok(fleet)
}

async fn count_stored(op: &OperatorClient) -> Result<u64> {
    Ok(op
        .list_devices(None, None)
        .await?
        .iter()
        .map(|d| d.point_count)
        .sum::<u64>())
}

/// Prints one line per second: devices online, points/s acked, points stored.
async fn live_summary(fleet: &Fleet, duration: Option<Duration>) -> Result<()> {
    let started = Instant::now();
    let mut last_acked = fleet.points_acked();
    let mut last_t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        // The simulator's own view: listing a large fleet from the server every second would
        // measure the listing, not the fleet.
        let online = fleet.online();
        let acked = fleet.points_acked();
        let rate = (acked - last_acked) as f64 / last_t.elapsed().as_secs_f64();
        (last_acked, last_t) = (acked, Instant::now());
        println!(
            "[{:>4}s] devices online: {online:>6}   points/s: {rate:>9.0}   points stored: {acked:>10}",
            started.elapsed().as_secs()
        );
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    Ok(())
}

async fn sim(
    conn: ConnArgs,
    fleet: FleetArgs,
    credentials: PathBuf,
    duration: Option<Duration>,
) -> Result<()> {
    let op = conn.operator().await?;
    let mut creds = Credentials::load(&credentials)
        .with_context(|| format!("reading {}", credentials.display()))?;
    let started = start_fleet(conn.address()?, &op, &mut creds, fleet.config()).await;
    creds
        .save(&credentials)
        .with_context(|| format!("writing {}", credentials.display()))?;
    let fleet = started?;
    live_summary(&fleet, duration).await?;
    fleet.stop(Duration::from_secs(10)).await;
    Ok(())
}

pub(crate) fn format_value(v: &Value) -> String {
    match v {
        Value::Double(x) => format!("{x:.3}"),
        Value::Int(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Geo(g) => format!("({:.5},{:.5})", g.lat, g.lon),
    }
}

pub(crate) fn format_time(us: i64) -> String {
    if us <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_micros(us as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

async fn devices(conn: ConnArgs) -> Result<()> {
    let op = conn.operator().await?;
    let list = op.list_devices(None, None).await?;
    println!(
        "{:<24} {:<8} {:<26} {:<22} LAST VALUES",
        "DEVICE", "STATUS", "LAST SEEN", "REMOTE"
    );
    for d in &list {
        let status = if d.presence.online {
            "online".to_owned()
        } else if d.presence.offline_reason.is_empty() {
            "offline".to_owned()
        } else {
            format!("off:{}", d.presence.offline_reason)
        };
        let values: Vec<String> = d
            .last_values
            .iter()
            .map(|(m, _, v)| format!("{m}={}", format_value(v)))
            .collect();
        println!(
            "{:<24} {:<8} {:<26} {:<22} {}",
            d.id,
            status,
            format_time(d.presence.last_seen_us),
            d.presence.remote_addr,
            values.join(" ")
        );
    }
    eprintln!(
        "{} devices, {} online",
        list.len(),
        list.iter().filter(|d| d.presence.online).count()
    );
    Ok(())
}

fn parse_since(s: &str) -> Result<i64> {
    if let Ok(d) = humantime::parse_duration(s.trim_start_matches('-')) {
        return Ok(now_us() - d.as_micros() as i64);
    }
    let t = humantime::parse_rfc3339_weak(s)
        .with_context(|| format!("--since {s:?}: give a duration (\"15m\") or an RFC 3339 time"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64)
}

async fn telemetry(
    conn: ConnArgs,
    device: String,
    metric: Option<String>,
    since: Option<String>,
    limit: u32,
) -> Result<()> {
    let op = conn.operator().await?;
    let query = TelemetryQuery {
        device: DeviceId::new(device)?,
        metric: metric.map(MetricName::new).transpose()?,
        start_us: since.as_deref().map(parse_since).transpose()?,
        end_us: None,
        limit: Some(limit),
        every: None,
        agg: None,
    };
    let points = op.query_telemetry(query).await?;
    println!("{:<26} {:<20} VALUE", "TIME", "METRIC");
    for p in &points {
        println!(
            "{:<26} {:<20} {}",
            format_time(p.time_us),
            p.metric,
            format_value(&p.value)
        );
    }
    if points.is_empty() {
        eprintln!("no points");
    }
    Ok(())
}

/// The devices of a `fleetlink device import` file (JSON lines), checked before any is created.
fn read_device_specs(file: &Path) -> anyhow::Result<Vec<fleetlink_client::NewDeviceSpec>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut specs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", file.display(), i + 1);
        let serde_json::Value::Object(mut l) = serde_json::from_str(line).with_context(at)? else {
            anyhow::bail!("{}: not a JSON object", at());
        };
        let id = match l.remove("id") {
            Some(serde_json::Value::String(id)) => DeviceId::new(id).with_context(at)?,
            _ => anyhow::bail!("{}: \"id\" must be a string", at()),
        };
        let tags = match l.remove("tags") {
            None => Default::default(),
            Some(serde_json::Value::Object(t)) => t
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(v) => Ok((k, v)),
                    _ => anyhow::bail!("{}: tag {k:?} must be a string", at()),
                })
                .collect::<anyhow::Result<_>>()?,
            Some(_) => anyhow::bail!("{}: \"tags\" must be an object of strings", at()),
        };
        let attributes = match l.remove("attributes") {
            None => serde_json::Map::new(),
            Some(serde_json::Value::Object(a)) => a,
            Some(_) => anyhow::bail!("{}: \"attributes\" must be an object", at()),
        };
        if let Some(k) = l.keys().next() {
            anyhow::bail!("{}: unknown field {k:?} (id, tags, attributes)", at());
        }
        specs.push(fleetlink_client::NewDeviceSpec {
            id,
            tags,
            attributes,
        });
    }
    anyhow::ensure!(!specs.is_empty(), "{} holds no devices", file.display());
    Ok(specs)
}
