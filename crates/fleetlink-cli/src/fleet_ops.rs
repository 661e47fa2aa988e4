//! Operator subcommands for the fleet: queries, groups, live streams, the bridge, the policy and
//! jobs.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use fleetlink_client::{
    DeviceId, DeviceInfo, FleetEvent, JobAction, JobInfo, JobSpec, Subscription,
};
use serde_json::json;

use crate::{ConnArgs, format_time, format_value};

#[derive(Subcommand, Debug)]
pub(crate) enum GroupCommand {
    /// Create or replace a group: static (--member ...) or dynamic (--query).
    Put {
        #[command(flatten)]
        conn: ConnArgs,
        /// The group's name.
        name: String,
        /// A member (repeatable).
        #[arg(long = "member")]
        members: Vec<String>,
        /// A query: the group is whoever matches it.
        #[arg(long, conflicts_with = "members")]
        query: Option<String>,
    },
    /// Delete a group.
    Delete {
        #[command(flatten)]
        conn: ConnArgs,
        /// The group's name.
        name: String,
    },
    /// List groups and their members.
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Would the policy let FROM do ACTION to TO? (publish/subscribe: TO is a topic/filter;
    /// message/command: TO is a device).
    Check {
        #[command(flatten)]
        conn: ConnArgs,
        /// The sending device.
        from: String,
        /// publish, subscribe, message or command.
        action: String,
        /// A topic, a filter or a device id.
        to: String,
    },
    /// Make the server reread the policy from its config file.
    Reload {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum JobCommand {
    /// Start a job over every device matching QUERY: a command (--command) or a desired-state
    /// change (--desired).
    Create {
        #[command(flatten)]
        conn: ConnArgs,
        /// Which devices, e.g. 'tag.region == "north"'.
        query: String,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// The command to run on each device.
        #[arg(long, conflicts_with = "desired")]
        command: Option<String>,
        /// The command's arguments (JSON).
        #[arg(long)]
        args: Option<String>,
        /// Each command expires this long after it is queued ("5m").
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// A JSON merge patch for each device's desired twin.
        #[arg(long)]
        desired: Option<String>,
        /// Devices in progress at once.
        #[arg(long, default_value_t = 10)]
        max_in_flight: u32,
        /// Devices started per minute (0 = no limit).
        #[arg(long, default_value_t = 0)]
        max_per_minute: u32,
        /// Abort when failed/finished rises above this ratio (0 = never)...
        #[arg(long, default_value_t = 0.0)]
        abort_ratio: f64,
        /// ...once at least this many devices finished.
        #[arg(long, default_value_t = 10)]
        abort_min: u32,
    },
    /// Show a job's progress.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
        /// The job id.
        id: u64,
        /// Keep printing progress until the job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a running job.
    Cancel {
        #[command(flatten)]
        conn: ConnArgs,
        /// The job id.
        id: u64,
    },
    /// List jobs, newest first.
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum StreamKind {
    Telemetry,
    Presence,
    Twin,
    Commands,
    Jobs,
    /// A standing query: the initial set, then devices entering and leaving it.
    Query,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Format {
    Pretty,
    Json,
}

pub(crate) async fn query(conn: ConnArgs, query: String, limit: u32, json_out: bool) -> Result<()> {
    let op = conn.operator().await?;
    let mut after: Option<DeviceId> = None;
    let mut total = 0usize;
    loop {
        let (page, next) = op
            .query_devices(&query, after.as_ref(), limit.min(1000))
            .await?;
        for d in &page {
            print_device(d, json_out);
        }
        total += page.len();
        match next {
            Some(n) if (total as u32) < limit => after = Some(n),
            _ => break,
        }
    }
    eprintln!("{total} devices match");
    Ok(())
}

fn print_device(d: &DeviceInfo, json_out: bool) {
    if json_out {
        let values: serde_json::Map<String, serde_json::Value> = d
            .last_values
            .iter()
            .map(|(m, _, v)| (m.to_string(), json!(format_value(v))))
            .collect();
        println!(
            "{}",
            json!({"id": d.id.as_str(), "online": d.presence.online, "tags": d.tags,
                   "attributes": d.attributes, "groups": d.groups, "last_values": values})
        );
        return;
    }
    let tags: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{:<24} {:<8} {:<30} {}",
        d.id,
        if d.presence.online {
            "online"
        } else {
            "offline"
        },
        tags.join(","),
        d.groups.join(",")
    );
}

pub(crate) async fn group(command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Put {
            conn,
            name,
            members,
            query,
        } => {
            let members = members
                .into_iter()
                .map(DeviceId::new)
                .collect::<Result<Vec<_>, _>>()?;
            let op = conn.operator().await?;
            op.put_group(&name, members, query.as_deref()).await?;
            eprintln!("group {name} saved");
            Ok(())
        }
        GroupCommand::Delete { conn, name } => {
            conn.operator().await?.delete_group(&name).await?;
            eprintln!("group {name} deleted");
            Ok(())
        }
        GroupCommand::List { conn } => {
            let groups = conn.operator().await?.groups().await?;
            for g in &groups {
                let kind = g
                    .query
                    .as_deref()
                    .map_or("static".to_owned(), |q| format!("query: {q}"));
                println!("{:<20} {:<40} {}", g.name, kind, g.members.join(","));
            }
            if groups.is_empty() {
                eprintln!("no groups");
            }
            Ok(())
        }
    }
}

pub(crate) async fn policy(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Check {
            conn,
            from,
            action,
            to,
        } => {
            let op = conn.operator().await?;
            let (allowed, reason) = op.check_policy(&DeviceId::new(from)?, &action, &to).await?;
            println!("{} ({reason})", if allowed { "allowed" } else { "denied" });
            if !allowed {
                std::process::exit(1);
            }
            Ok(())
        }
        PolicyCommand::Reload { conn } => {
            println!("{}", conn.operator().await?.reload_policy().await?);
            Ok(())
        }
    }
}

pub(crate) async fn publish(
    conn: ConnArgs,
    topic: String,
    payload: String,
    retain: bool,
) -> Result<()> {
    let told = conn
        .operator()
        .await?
        .publish(&topic, payload.into_bytes(), retain)
        .await?;
    eprintln!("{told}");
    Ok(())
}

fn print_job(j: &JobInfo) {
    let counts: Vec<String> = j
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    println!(
        "job {} {:<10} targets={} {} {}",
        j.id,
        j.state,
        j.targets,
        counts.join(" "),
        if j.reason.is_empty() {
            String::new()
        } else {
            format!("({})", j.reason)
        }
    );
}

pub(crate) async fn job(command: JobCommand) -> Result<()> {
    match command {
        JobCommand::Create {
            conn,
            query,
            name,
            command,
            args,
            timeout,
            desired,
            max_in_flight,
            max_per_minute,
            abort_ratio,
            abort_min,
        } => {
            let action = match (command, desired) {
                (Some(name), None) => JobAction::Command {
                    name,
                    args: match args {
                        Some(a) => serde_json::from_str(&a).context("--args is not valid JSON")?,
                        None => serde_json::Value::Null,
                    },
                    timeout,
                },
                (None, Some(patch)) => JobAction::Desired(
                    serde_json::from_str(&patch).context("--desired is not valid JSON")?,
                ),
                _ => bail!("give --command NAME or --desired PATCH"),
            };
            let mut spec = JobSpec::new(name, query, action);
            spec.max_in_flight = max_in_flight;
            spec.max_per_minute = max_per_minute;
            spec.abort_failure_ratio = abort_ratio;
            spec.abort_min_finished = abort_min;
            let j = conn.operator().await?.create_job(spec).await?;
            print_job(&j);
            Ok(())
        }
        JobCommand::Status { conn, id, follow } => {
            let op = conn.operator().await?;
            if !follow {
                print_job(&op.job(id).await?);
                return Ok(());
            }
            let mut events = op.subscribe(Subscription::Jobs { job_id: id }).await?;
            let current = op.job(id).await?;
            print_job(&current);
            if current.state != "running" {
                return Ok(());
            }
            while let Some(e) = events.next().await? {
                if let FleetEvent::Job(j) = e {
                    print_job(&j);
                    if j.state != "running" {
                        break;
                    }
                }
            }
            Ok(())
        }
        JobCommand::Cancel { conn, id } => {
            print_job(&conn.operator().await?.cancel_job(id).await?);
            Ok(())
        }
        JobCommand::List { conn } => {
            for j in conn.operator().await?.jobs(0).await? {
                print_job(&j);
            }
            Ok(())
        }
    }
}

pub(crate) async fn watch(
    conn: ConnArgs,
    kind: StreamKind,
    query: String,
    metrics: Vec<String>,
    job: u64,
    format: Format,
    count: Option<usize>,
) -> Result<()> {
    let subscription = match kind {
        StreamKind::Telemetry => Subscription::Telemetry { query, metrics },
        StreamKind::Presence => Subscription::Presence { query },
        StreamKind::Twin => Subscription::Twin { query },
        StreamKind::Commands => Subscription::Commands { query },
        StreamKind::Jobs => Subscription::Jobs { job_id: job },
        StreamKind::Query => Subscription::Query { query },
    };
    let op = conn.operator().await?;
    let mut events = op.subscribe(subscription).await?;
    let mut printed = 0usize;
    while let Some(e) = events.next().await? {
        if matches!(e, FleetEvent::Subscribed { .. }) && format == Format::Pretty {
            eprintln!("watching; Ctrl-C to stop");
        }
        match format {
            Format::Json => println!("{}", event_json(&e)),
            Format::Pretty => println!("{}", event_line(&e)),
        }
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            break;
        }
    }
    Ok(())
}

fn event_json(e: &FleetEvent) -> serde_json::Value {
    match e {
        FleetEvent::Subscribed { initial_matches } => {
            json!({"event": "subscribed", "initial_matches": initial_matches})
        }
        FleetEvent::Overflow { dropped } => json!({"event": "overflow", "dropped": dropped}),
        FleetEvent::Telemetry { device, points } => json!({"event": "telemetry", "device": device,
            "points": points.iter().map(|p| json!({"metric": p.metric.as_str(), "time_us": p.time_us, "value": format_value(&p.value)})).collect::<Vec<_>>()}),
        FleetEvent::Presence { device, event } => {
            json!({"event": "presence", "device": device, "online": event.online, "reason": event.reason, "at_us": event.at_us})
        }
        FleetEvent::Twin {
            device,
            side,
            version,
            doc,
            delta,
        } => {
            json!({"event": "twin", "device": device, "side": side, "version": version, "doc": doc, "delta": delta})
        }
        FleetEvent::Command(c) => {
            json!({"event": "command", "id": c.id, "device": c.device.as_str(), "name": c.name, "state": c.state.name(), "result": c.result, "error": c.error})
        }
        FleetEvent::Job(j) => {
            json!({"event": "job", "id": j.id, "state": j.state, "counts": j.counts, "reason": j.reason})
        }
        FleetEvent::Match {
            device,
            matches,
            initial,
        } => {
            json!({"event": if *matches { "enter" } else { "leave" }, "device": device, "initial": initial})
        }
    }
}

fn event_line(e: &FleetEvent) -> String {
    let now = format_time(fleetlink_client::now_us());
    match e {
        FleetEvent::Subscribed { initial_matches } => {
            format!("{now} subscribed ({initial_matches} match now)")
        }
        FleetEvent::Overflow { dropped } => {
            format!("{now} OVERFLOW: {dropped} events skipped (reading too slowly)")
        }
        FleetEvent::Telemetry { device, points } => {
            let p: Vec<String> = points
                .iter()
                .map(|p| format!("{}={}", p.metric, format_value(&p.value)))
                .collect();
            format!("{now} {device:<20} {}", p.join(" "))
        }
        FleetEvent::Presence { device, event } => format!(
            "{} {device:<20} {}{}",
            format_time(event.at_us),
            if event.online { "online" } else { "offline" },
            if event.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", event.reason)
            }
        ),
        FleetEvent::Twin {
            device,
            side,
            version,
            delta,
            ..
        } => format!("{now} {device:<20} {side} v{version} delta {delta}"),
        FleetEvent::Command(c) => format!(
            "{now} {:<20} command {} {} {}",
            c.device,
            c.id,
            c.name,
            c.state.name()
        ),
        FleetEvent::Job(j) => format!("{now} job {} {} {:?}", j.id, j.state, j.counts),
        FleetEvent::Match {
            device,
            matches,
            initial,
        } => format!(
            "{now} {device:<20} {}{}",
            if *matches { "enter" } else { "leave" },
            if *initial { " (initial)" } else { "" }
        ),
    }
}
