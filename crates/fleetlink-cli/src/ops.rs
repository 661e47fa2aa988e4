//! Operator subcommands for twins, commands and presence history.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use fleetlink_client::{CommandInfo, CommandRequest, CommandState, DeviceId};
use serde_json::json;

use crate::{ConnArgs, format_time};

#[derive(Subcommand, Debug)]
pub(crate) enum TwinCommand {
    /// Print a device's twin: reported, desired, delta and versions (JSON).
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device.
        device: String,
        /// Include the per-field last-updated times.
        #[arg(long)]
        metadata: bool,
    },
    /// Merge a JSON patch into the desired document (null deletes a field).
    Set {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device.
        device: String,
        /// A JSON object, e.g. '{"mode":"eco","limits":{"speed":80}}'.
        patch: String,
        /// Fail with a conflict unless the desired document is at this version.
        #[arg(long)]
        expect_version: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CommandCommand {
    /// Queue a command; with --wait, also wait for its result.
    Send {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device.
        device: String,
        /// The command's name (the device's handler).
        name: String,
        /// Arguments as JSON.
        #[arg(long)]
        args: Option<String>,
        /// Expire it this long after queuing ("30s", "2h"); default: the server's.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Sending again with the same key returns the first command.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Run beside other commands instead of one at a time in order.
        #[arg(long)]
        concurrent: bool,
        /// Wait this long for the result ("10s").
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Wait for a command to finish; fails if it does not succeed.
    Wait {
        #[command(flatten)]
        conn: ConnArgs,
        /// The command id.
        id: u64,
        /// How long to wait ("10s", at most "10m").
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        timeout: Duration,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Print one command with its history.
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        /// The command id.
        id: u64,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// List a device's commands, newest first.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// The device.
        device: String,
        /// Only commands in this state (queued, delivered, succeeded, failed, expired, rejected, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel an unfinished command.
    Cancel {
        #[command(flatten)]
        conn: ConnArgs,
        /// The command id.
        id: u64,
    },
}

pub(crate) async fn twin(command: TwinCommand) -> Result<()> {
    match command {
        TwinCommand::Get {
            conn,
            device,
            metadata,
        } => {
            let op = conn.operator().await?;
            let t = op.twin(&DeviceId::new(device)?).await?;
            let mut out = json!({
                "reported": t.reported,
                "reported_version": t.reported_version,
                "desired": t.desired,
                "desired_version": t.desired_version,
                "delta": t.delta,
            });
            if metadata {
                out["reported_metadata"] = t.reported_metadata;
                out["desired_metadata"] = t.desired_metadata;
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        TwinCommand::Set {
            conn,
            device,
            patch,
            expect_version,
        } => {
            let patch: serde_json::Value =
                serde_json::from_str(&patch).context("the patch is not valid JSON")?;
            let op = conn.operator().await?;
            let t = op
                .set_desired(&DeviceId::new(device)?, patch, expect_version)
                .await?;
            eprintln!("desired version {}", t.desired_version);
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"desired": t.desired, "delta": t.delta}))?
            );
        }
    }
    Ok(())
}

fn command_json(c: &CommandInfo) -> serde_json::Value {
    c.to_json()
}

fn print_command(c: &CommandInfo, as_json: bool) {
    if as_json {
        println!("{}", command_json(c));
        return;
    }
    println!("command {} on {}: {} {}", c.id, c.device, c.name, c.args);
    println!("  state     {} (attempts: {})", c.state.name(), c.attempts);
    for (s, t) in &c.history {
        println!("  {:<9} {}", s.name(), format_time(*t));
    }
    println!("  deadline  {}", format_time(c.deadline_us));
    if let Some(r) = &c.result {
        println!("  result    {r}");
    }
    if let Some(e) = &c.error {
        println!("  error     {e}");
    }
}

/// Fails (exit status 1) unless the command succeeded.
fn require_success(c: &CommandInfo) -> Result<()> {
    match c.state {
        CommandState::Succeeded => Ok(()),
        s if s.is_terminal() => bail!(
            "command {} {}: {}",
            c.id,
            s.name(),
            c.error.as_deref().unwrap_or("")
        ),
        s => bail!("command {} is still {} after the wait", c.id, s.name()),
    }
}

pub(crate) async fn command(command: CommandCommand) -> Result<()> {
    match command {
        CommandCommand::Send {
            conn,
            device,
            name,
            args,
            timeout,
            idempotency_key,
            concurrent,
            wait,
            json,
        } => {
            let args = match args {
                Some(a) => serde_json::from_str(&a).context("--args is not valid JSON")?,
                None => serde_json::Value::Null,
            };
            let mut req = CommandRequest::new(DeviceId::new(device)?, name).args(args);
            req.timeout = timeout;
            req.idempotency_key = idempotency_key;
            req.concurrent = concurrent;
            let op = conn.operator().await?;
            let Some(wait) = wait else {
                print_command(&op.send_command(req).await?, json);
                return Ok(());
            };
            let done = op.send_command_and_wait(req, wait).await?;
            print_command(&done, json);
            require_success(&done)
        }
        CommandCommand::Wait {
            conn,
            id,
            timeout,
            json,
        } => {
            let op = conn.operator().await?;
            let done = op.wait_command(id, timeout).await?;
            print_command(&done, json);
            require_success(&done)
        }
        CommandCommand::Get { conn, id, json } => {
            let op = conn.operator().await?;
            print_command(&op.command(id).await?, json);
            Ok(())
        }
        CommandCommand::List {
            conn,
            device,
            state,
            limit,
            json,
        } => {
            let state = state
                .map(|s| {
                    CommandState::parse(&s).with_context(|| {
                        format!("unknown state {s:?}: use queued, delivered, succeeded, failed, expired, rejected or cancelled")
                    })
                })
                .transpose()?;
            let op = conn.operator().await?;
            let list = op
                .list_commands(&DeviceId::new(device)?, state, None, limit)
                .await?;
            list_table(&list, json);
            Ok(())
        }
        CommandCommand::Cancel { conn, id } => {
            let op = conn.operator().await?;
            let c = op.cancel_command(id).await?;
            print_command(&c, false);
            Ok(())
        }
    }
}

fn list_table(list: &[CommandInfo], as_json: bool) {
    if as_json {
        for c in list {
            println!("{}", command_json(c));
        }
        return;
    }
    println!(
        "{:>8} {:<20} {:<10} {:<26} RESULT",
        "ID", "NAME", "STATE", "CREATED"
    );
    for c in list {
        let outcome = match (&c.result, &c.error) {
            (_, Some(e)) => e.clone(),
            (Some(r), None) => r.to_string(),
            (None, None) => String::new(),
        };
        println!(
            "{:>8} {:<20} {:<10} {:<26} {}",
            c.id,
            c.name,
            c.state.name(),
            format_time(c.created_us),
            outcome
        );
    }
    if list.is_empty() {
        eprintln!("no commands");
    }
}

pub(crate) async fn presence(conn: ConnArgs, device: String, limit: u32) -> Result<()> {
    let op = conn.operator().await?;
    let events = op.presence_history(&DeviceId::new(device)?, limit).await?;
    println!(
        "{:<26} {:<8} {:<16} {:>8} REMOTE",
        "TIME", "EVENT", "REASON", "SESSION"
    );
    for e in &events {
        println!(
            "{:<26} {:<8} {:<16} {:>8} {}",
            format_time(e.at_us),
            if e.online { "online" } else { "offline" },
            e.reason,
            e.session,
            e.remote_addr
        );
    }
    if events.is_empty() {
        eprintln!("no connections recorded");
    }
    Ok(())
}
