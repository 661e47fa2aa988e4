//! Jobs: a command or a desired-state change applied to every device matching a query, at the
//! rate the job allows, stopped when too many targets fail. One task per running job drives it
//! with the rules of `fleetlink_core::job::Rollout`; every change of a target or of the job is
//! written to the store, so a restarted server resumes running jobs where they were. Commands of
//! a job carry the idempotency key `job-<id>-<device>`, so resuming never runs one twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleetlink_core::DeviceId;
use fleetlink_core::command::CommandState;
use fleetlink_core::job::{JobState, Rollout, RolloutLimits, TargetState};
use fleetlink_core::query::Query;
use fleetlink_core::twin::TwinPatch;
use fleetlink_proto::v1::{self, ErrorCode, create_job};
use fleetlink_store::{JobRecord, JobTargetRecord, NewCommand};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::facts::Evaluate;
use crate::now_us;
use crate::session::Shared;

/// A request about jobs that failed.
#[derive(Debug)]
pub(crate) struct JobRequestError {
    pub code: ErrorCode,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> JobRequestError {
    JobRequestError {
        code: ErrorCode::InvalidArgument,
        message: message.into(),
    }
}

fn unavailable(e: impl std::fmt::Display) -> JobRequestError {
    JobRequestError {
        code: ErrorCode::Unavailable,
        message: e.to_string(),
    }
}

/// The running jobs' control channels.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    running: Mutex<HashMap<u64, mpsc::UnboundedSender<oneshot::Sender<Option<v1::JobInfo>>>>>,
}

/// What a job does to each target.
#[derive(Debug, Clone)]
enum JobAction {
    Command {
        name: String,
        args_json: String,
        timeout_us: i64,
    },
    Desired(TwinPatch),
}

fn limits_of(spec: &v1::CreateJob) -> RolloutLimits {
    RolloutLimits {
        max_in_flight: if spec.max_in_flight == 0 {
            10
        } else {
            spec.max_in_flight as usize
        },
        max_per_minute: (spec.max_per_minute != 0).then_some(spec.max_per_minute),
        abort_failure_ratio: (spec.abort_failure_ratio != 0.0).then_some(spec.abort_failure_ratio),
        abort_min_finished: spec.abort_min_finished,
    }
}

fn action_of(shared: &Shared, spec: &v1::CreateJob) -> Result<JobAction, JobRequestError> {
    match &spec.action {
        Some(create_job::Action::Command(c)) => {
            crate::command::check_command_name(&c.name).map_err(invalid)?;
            let args_json = if c.args_json.trim().is_empty() {
                "null".to_owned()
            } else {
                serde_json::from_str::<serde_json::Value>(&c.args_json)
                    .map_err(|e| invalid(format!("command arguments are not valid JSON: {e}")))?
                    .to_string()
            };
            let timeout_us = if c.timeout_ms == 0 {
                i64::try_from(shared.config.commands.default_timeout_s).unwrap_or(3_600) * 1_000_000
            } else {
                i64::from(c.timeout_ms) * 1_000
            };
            let max_us = i64::try_from(shared.config.commands.max_deadline_s)
                .unwrap_or(i64::MAX / 2_000_000)
                * 1_000_000;
            if timeout_us > max_us {
                return Err(invalid(format!(
                    "the job's command timeout ({} s) is above commands.max_deadline_s ({} s)",
                    timeout_us / 1_000_000,
                    shared.config.commands.max_deadline_s
                )));
            }
            Ok(JobAction::Command {
                name: c.name.clone(),
                args_json,
                timeout_us,
            })
        }
        Some(create_job::Action::DesiredPatchJson(p)) => TwinPatch::parse(p)
            .map(JobAction::Desired)
            .map_err(|e| invalid(format!("desired patch: {e}"))),
        None => Err(invalid(
            "a job needs an action: a command or a desired patch",
        )),
    }
}

/// Every device matching `query` now, in id order, asked of the actors.
pub(crate) async fn matching_devices(shared: &Shared, query: &Query) -> Vec<DeviceId> {
    shared.actors_ready().await;
    let mut asks = JoinSet::new();
    for (id, actor) in shared.registry.all_by_id() {
        let q = query.clone();
        asks.spawn(async move { (id, actor.send(Evaluate(q)).await) });
    }
    let mut matched = Vec::new();
    while let Some(answer) = asks.join_next().await {
        if let Ok((id, Ok(Some(_)))) = answer {
            matched.push(id);
        }
    }
    matched.sort();
    matched
}

/// Creates a job and starts running it.
pub(crate) async fn create(
    shared: Arc<Shared>,
    spec: v1::CreateJob,
) -> Result<v1::JobInfo, JobRequestError> {
    let query = if spec.query.trim().is_empty() {
        return Err(invalid(
            "a job needs a query (use \"true\" for every device)",
        ));
    } else {
        Query::parse(&spec.query).map_err(|e| invalid(e.to_string()))?
    };
    let action = action_of(&shared, &spec)?;
    let limits = limits_of(&spec);
    limits.validate().map_err(|e| invalid(e.to_string()))?;
    let targets = matching_devices(&shared, &query).await;
    let record = JobRecord {
        id: 0,
        name: spec.name.clone(),
        query: spec.query.clone(),
        spec: spec.encode_to_vec(),
        state: JobState::Running.name().to_owned(),
        created_us: now_us(),
        finished_us: 0,
        reason: String::new(),
    };
    let id = shared
        .store
        .insert_job(record.clone(), targets.clone())
        .await
        .map_err(unavailable)?;
    let record = JobRecord { id, ..record };
    let rollout = Rollout::new(targets.iter().map(ToString::to_string).collect(), limits);
    tracing::info!(job = id, targets = targets.len(), query = %spec.query, "job created");
    let info = info_of(&record, &spec, &rollout);
    spawn_runner(shared, record, spec, action, rollout, HashMap::new());
    Ok(info)
}

/// Resumes every job that was running when the server stopped.
pub(crate) async fn resume_all(shared: Arc<Shared>) {
    let ids = match shared.store.running_jobs().await {
        Ok(ids) => ids,
        Err(error) => {
            tracing::error!(%error, "cannot list running jobs");
            return;
        }
    };
    for id in ids {
        if let Err(e) = resume(shared.clone(), id).await {
            tracing::error!(job = id, error = %e.message, "cannot resume a job");
        }
    }
}

async fn resume(shared: Arc<Shared>, id: u64) -> Result<(), JobRequestError> {
    let Some((record, targets)) = shared.store.job(id).await.map_err(unavailable)? else {
        return Ok(());
    };
    let spec = v1::CreateJob::decode(record.spec.as_slice())
        .map_err(|e| unavailable(format!("stored job spec: {e}")))?;
    let action = action_of(&shared, &spec)?;
    let mut commands = HashMap::new();
    let states = targets
        .into_iter()
        .map(|t| {
            if let Some(c) = t.command_id {
                commands.insert(t.device.to_string(), c);
            }
            let state = TargetState::parse(&t.state).unwrap_or(TargetState::Pending);
            (t.device.to_string(), state)
        })
        .collect();
    let rollout = Rollout::restore(states, limits_of(&spec), JobState::Running, now_us());
    tracing::info!(job = id, "resuming job");
    spawn_runner(shared, record, spec, action, rollout, commands);
    Ok(())
}

fn info_of(record: &JobRecord, spec: &v1::CreateJob, rollout: &Rollout) -> v1::JobInfo {
    v1::JobInfo {
        job_id: record.id,
        name: record.name.clone(),
        query: record.query.clone(),
        state: job_state_to_proto(rollout.state()).into(),
        created_us: record.created_us,
        finished_us: record.finished_us,
        targets: u32::try_from(rollout.len()).unwrap_or(u32::MAX),
        counts: rollout
            .counts()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        reason: record.reason.clone(),
        spec: Some(spec.clone()),
    }
}

fn job_state_to_proto(s: JobState) -> v1::JobState {
    match s {
        JobState::Running => v1::JobState::Running,
        JobState::Completed => v1::JobState::Completed,
        JobState::Aborted => v1::JobState::Aborted,
        JobState::Cancelled => v1::JobState::Cancelled,
    }
}

fn outcome_of(state: CommandState) -> TargetState {
    match state {
        CommandState::Succeeded => TargetState::Succeeded,
        CommandState::Failed => TargetState::Failed,
        CommandState::Expired => TargetState::Expired,
        CommandState::Rejected => TargetState::Rejected,
        CommandState::Cancelled => TargetState::Cancelled,
        // not terminal: the watcher only reports terminal states
        CommandState::Queued | CommandState::Delivered => TargetState::Failed,
    }
}

struct Runner {
    shared: Arc<Shared>,
    record: JobRecord,
    spec: v1::CreateJob,
    action: JobAction,
    rollout: Rollout,
    /// Command id per running target (command jobs).
    commands: HashMap<String, u64>,
    events: mpsc::UnboundedSender<(String, TargetState)>,
}

fn spawn_runner(
    shared: Arc<Shared>,
    record: JobRecord,
    spec: v1::CreateJob,
    action: JobAction,
    rollout: Rollout,
    commands: HashMap<String, u64>,
) {
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    if let Ok(mut running) = shared.fleet.jobs.running.lock() {
        running.insert(record.id, control_tx);
    }
    let (events, events_rx) = mpsc::unbounded_channel();
    let runner = Runner {
        shared,
        record,
        spec,
        action,
        rollout,
        commands,
        events,
    };
    tokio::spawn(runner.run(events_rx, control_rx));
}

impl Runner {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<(String, TargetState)>,
        mut control: mpsc::UnboundedReceiver<oneshot::Sender<Option<v1::JobInfo>>>,
    ) {
        // Targets that were running when the server stopped: watch (or start again) each.
        let running: Vec<String> = self
            .rollout_targets(TargetState::Running)
            .into_iter()
            .collect();
        for target in running {
            match self.commands.get(&target).copied() {
                Some(command) => self.watch(target, command),
                None => self.launch(target).await,
            }
        }
        loop {
            if self.rollout.state() == JobState::Running {
                for target in self.rollout.start(now_us()) {
                    self.save_target(&target, TargetState::Running, None);
                    self.launch(target).await;
                }
            }
            self.progress();
            let running = self.rollout.counts().get("running").copied().unwrap_or(0);
            if self.rollout.state() != JobState::Running && running == 0 {
                break;
            }
            let wake = self.rollout.next_start_at(now_us());
            let mut shutting_down = self.shared.shutting_down.clone();
            tokio::select! {
                // The server is stopping: leave the job as stored; the next start resumes it.
                () = async { let _ = shutting_down.wait_for(|s| *s).await; } => return,
                Some((target, outcome)) = events.recv() => self.finished(&target, outcome).await,
                Some(reply) = control.recv() => {
                    if self.rollout.state() != JobState::Running {
                        let _ = reply.send(None); // aborted, still settling: not cancellable
                        continue;
                    }
                    let running = self.rollout.cancel();
                    if !running.is_empty() || self.rollout.state() == JobState::Cancelled {
                        self.record.reason = "cancelled by an operator".into();
                    }
                    tracing::info!(job = self.record.id, "job cancelled");
                    self.cancel_targets(running).await;
                    self.save_job().await;
                    let _ = reply.send(Some(info_of(&self.record, &self.spec, &self.rollout)));
                }
                _ = sleep_until_us(wake) => {}
            }
        }
        if self.record.state != self.rollout.state().name() {
            self.save_job().await;
        }
        if let Ok(mut running) = self.shared.fleet.jobs.running.lock() {
            running.remove(&self.record.id);
        }
        tracing::info!(
            job = self.record.id,
            state = self.rollout.state().name(),
            "job finished"
        );
    }

    fn rollout_targets(&self, state: TargetState) -> Vec<String> {
        // Rollout keeps target order; ask it per target.
        let mut out = Vec::new();
        for name in self.all_targets() {
            if self.rollout.target_state(&name) == Some(state) {
                out.push(name);
            }
        }
        out
    }

    fn all_targets(&self) -> Vec<String> {
        self.rollout.targets().map(ToOwned::to_owned).collect()
    }

    /// Starts the job's action on one target.
    async fn launch(&mut self, target: String) {
        let events = self.events.clone();
        let Ok(device) = DeviceId::new(target.clone()) else {
            let _ = events.send((target, TargetState::Failed));
            return;
        };
        let actor = match self.shared.registry.get_or_start(&device).await {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(job = self.record.id, %device, %error, "job target unavailable");
                let _ = events.send((target, TargetState::Failed));
                return;
            }
        };
        match self.action.clone() {
            JobAction::Desired(patch) => {
                let updated = actor
                    .send(crate::twin::UpdateDesired {
                        patch,
                        expected_version: None,
                    })
                    .await;
                if *self.shared.shutting_down.borrow() {
                    return;
                }
                let outcome = match updated {
                    Ok(Ok(_)) => TargetState::Succeeded,
                    _ => TargetState::Failed,
                };
                let _ = events.send((target, outcome));
            }
            JobAction::Command {
                name,
                args_json,
                timeout_us,
            } => {
                let now = now_us();
                let new = NewCommand {
                    device: device.clone(),
                    name,
                    args_json,
                    idempotency_key: Some(format!("job-{}-{device}", self.record.id)),
                    concurrent: false,
                    created_us: now,
                    deadline_us: now + timeout_us,
                };
                let submitted = actor
                    .send(crate::command::SubmitCommand { new, watch: false })
                    .await;
                if *self.shared.shutting_down.borrow() {
                    return; // not a failure of the target: the next start resumes it
                }
                match submitted {
                    Ok(Ok(crate::command::Submitted { record, .. })) => {
                        self.commands.insert(target.clone(), record.id);
                        self.save_target(&target, TargetState::Running, Some(record.id));
                        self.watch(target, record.id);
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(job = self.record.id, %device, %error, "job command refused");
                        let _ = events.send((target, TargetState::Rejected));
                    }
                    Err(_) => {
                        let _ = events.send((target, TargetState::Failed));
                    }
                }
            }
        }
    }

    /// Reports the end of a target's command to the runner.
    fn watch(&self, target: String, command: u64) {
        let shared = self.shared.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let record = match shared.store.command(command).await {
                Ok(Some(r)) => r,
                _ => {
                    let _ = events.send((target, TargetState::Failed));
                    return;
                }
            };
            let state = if record.state.is_terminal() {
                record.state
            } else {
                let done = match shared.registry.get_or_start(&record.device).await {
                    Ok(actor) => match actor.send(crate::command::WatchCommand(command)).await {
                        Ok(Some(rx)) => rx.await.ok(),
                        _ => None,
                    },
                    Err(_) => None,
                };
                match done {
                    Some(d) => d.state,
                    None => match shared.store.command(command).await {
                        Ok(Some(r)) => r.state,
                        _ => CommandState::Failed,
                    },
                }
            };
            if *shared.shutting_down.borrow() {
                return; // a watch cut short by the shutdown says nothing about the command
            }
            let _ = events.send((target, outcome_of(state)));
        });
    }

    async fn finished(&mut self, target: &str, outcome: TargetState) {
        let to_cancel = match self.rollout.finish(target, outcome) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(job = self.record.id, error = %e, "ignored a target outcome");
                return;
            }
        };
        self.save_target(target, outcome, None);
        if self.rollout.state() == JobState::Aborted && self.record.reason.is_empty() {
            self.record.reason = self.rollout.abort_reason().unwrap_or_default();
            tracing::warn!(job = self.record.id, reason = %self.record.reason, "job aborted");
            for pending in self.rollout_targets(TargetState::Skipped) {
                self.save_target(&pending, TargetState::Skipped, None);
            }
        }
        self.cancel_targets(to_cancel).await;
        if self.rollout.state() != JobState::Running {
            self.save_job().await;
        }
    }

    async fn cancel_targets(&mut self, targets: Vec<String>) {
        for pending in self.rollout_targets(TargetState::Skipped) {
            self.save_target(&pending, TargetState::Skipped, None);
        }
        for target in targets {
            let Some(command) = self.commands.get(&target).copied() else {
                continue;
            };
            let Ok(device) = DeviceId::new(target.clone()) else {
                continue;
            };
            if let Ok(actor) = self.shared.registry.get_or_start(&device).await {
                // Its watcher reports the end (cancelled, or what it reached first).
                let _ = actor.send(crate::command::CancelCommand(command)).await;
            }
        }
    }

    fn save_target(&self, target: &str, state: TargetState, command_id: Option<u64>) {
        let Ok(device) = DeviceId::new(target) else {
            return;
        };
        let write = self.shared.store.update_job_target(
            self.record.id,
            JobTargetRecord {
                device,
                state: state.name().to_owned(),
                command_id,
            },
        );
        tokio::spawn(async move {
            if let Err(error) = write.await {
                tracing::error!(%error, "cannot store a job target's state");
            }
        });
    }

    /// Stores the job's state and waits until it is durable, so that whoever hears of the change
    /// (a job stream, a CancelJob answer) reads the same state back with GetJob.
    async fn save_job(&mut self) {
        if self.rollout.state() != JobState::Running && self.record.finished_us == 0 {
            self.record.finished_us = now_us();
        }
        self.record.state = self.rollout.state().name().to_owned();
        let write = self.shared.store.update_job(
            self.record.id,
            self.record.state.clone(),
            self.record.finished_us,
            self.record.reason.clone(),
        );
        if let Err(error) = write.await {
            tracing::error!(%error, "cannot store a job's state");
        }
    }

    /// Tells job subscribers where the job stands.
    fn progress(&self) {
        let info = info_of(&self.record, &self.spec, &self.rollout);
        crate::fleet::publish(&self.shared.fleet.bus.jobs, None, || {
            v1::event::Event::Job(info)
        });
    }
}

async fn sleep_until_us(at: Option<i64>) {
    match at {
        Some(at) => {
            let wait = u64::try_from(at - now_us()).unwrap_or(0);
            tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
        }
        None => std::future::pending().await,
    }
}

/// Cancels a running job; answers where it stands.
pub(crate) async fn cancel(shared: &Shared, id: u64) -> Result<v1::JobInfo, JobRequestError> {
    let control = shared
        .fleet
        .jobs
        .running
        .lock()
        .ok()
        .and_then(|r| r.get(&id).cloned());
    if let Some(control) = control {
        let (tx, rx) = oneshot::channel();
        if control.send(tx).is_ok()
            && let Ok(Some(info)) = rx.await
        {
            return Ok(info);
        }
    }
    let info = get(shared, id).await?;
    Err(JobRequestError {
        code: ErrorCode::Conflict,
        message: format!(
            "job {id} is {} already",
            v1::JobState::try_from(info.state)
                .map(|s| s
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_lowercase())
                .unwrap_or_default()
        ),
    })
}

/// A job as stored, with counts per target state.
pub(crate) async fn get(shared: &Shared, id: u64) -> Result<v1::JobInfo, JobRequestError> {
    let Some((record, targets)) = shared.store.job(id).await.map_err(unavailable)? else {
        return Err(JobRequestError {
            code: ErrorCode::NotFound,
            message: format!("no job {id}"),
        });
    };
    Ok(stored_info(&record, &targets))
}

fn stored_info(record: &JobRecord, targets: &[JobTargetRecord]) -> v1::JobInfo {
    let spec = v1::CreateJob::decode(record.spec.as_slice()).ok();
    let mut counts: std::collections::BTreeMap<String, u32> = TargetState::ALL
        .iter()
        .map(|s| (s.name().to_owned(), 0))
        .collect();
    for t in targets {
        *counts.entry(t.state.clone()).or_default() += 1;
    }
    let state = match JobState::parse(&record.state) {
        Some(s) => job_state_to_proto(s),
        None => v1::JobState::Unspecified,
    };
    v1::JobInfo {
        job_id: record.id,
        name: record.name.clone(),
        query: record.query.clone(),
        state: state.into(),
        created_us: record.created_us,
        finished_us: record.finished_us,
        targets: u32::try_from(targets.len()).unwrap_or(u32::MAX),
        counts: counts.into_iter().collect(),
        reason: record.reason.clone(),
        spec,
    }
}

/// Jobs, newest first.
pub(crate) async fn list(
    shared: &Shared,
    limit: usize,
) -> Result<Vec<v1::JobInfo>, JobRequestError> {
    let records = shared.store.list_jobs(limit).await.map_err(unavailable)?;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(get(shared, r.id).await?);
    }
    Ok(out)
}
