//! Commands, kept by the device's actor: a durable outbox (the store writes a command before it is
//! answered), delivery on a server-opened bidirectional stream per command, results, expiry and
//! cancellation. The state machine and the dispatch order live in `fleetlink_core::command`.
//!
//! Every command reaches a terminal state: a result ends it, its deadline expires it (a timer per
//! actor, and actors with unfinished commands are started when the server starts), an operator
//! may cancel it. A lost connection leaves it `delivered` and it is written again on the next
//! connection; the SDK answers a redelivery from its cache without running the handler again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::dev::SendError;
use actix::prelude::*;
use fleetlink_core::command::{CommandEvent, CommandId, CommandState, OutboxError, transition};
use fleetlink_core::presence::SessionId;
use fleetlink_proto::COMMAND_CANCELLED_CODE;
use fleetlink_proto::v1::{self, CommandOutcome, StreamHeader, StreamKind};
use fleetlink_store::{CommandRecord, CommandUpdate, NewCommand, StoreError};
use fleetlink_transport::{FrameReader, write_frame};
use tokio::sync::oneshot;

use crate::actor::DeviceActor;
use crate::now_us;

/// Longest command name accepted.
const MAX_COMMAND_NAME: usize = 128;

/// Checks a command's name: 1 to 128 bytes, no control characters.
pub(crate) fn check_command_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_COMMAND_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "command name {name:?} must be 1 to {MAX_COMMAND_NAME} bytes without control characters"
        ));
    }
    Ok(())
}

/// Why a command request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    /// Over a configured limit.
    #[error(transparent)]
    Limit(#[from] OutboxError),
    /// The store could not write it.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The command has finished already.
    #[error("command {id} is {} already", state.name())]
    Finished { id: CommandId, state: CommandState },
}

impl DeviceActor {
    /// Writes every command the outbox lets go now to the device, if it is reachable.
    pub(crate) fn dispatch_commands(&mut self, ctx: &mut Context<Self>) {
        let Some(link) = &self.link else { return };
        let conn = link.conn.clone();
        let session = link.session;
        let early_fin = link.early_command_fin;
        let now = now_us();
        for id in self.outbox.dispatch(now) {
            let Some(record) = self.open.get_mut(&id) else {
                continue;
            };
            let Ok(state) = transition(record.state, CommandEvent::Deliver) else {
                continue;
            };
            record.state = state;
            record.attempts += 1;
            if record.history.last().map(|h| h.0) != Some(state) {
                record.history.push((state, now));
            }
            let request = v1::CommandRequest {
                command_id: id,
                name: record.name.clone(),
                args_json: record.args_json.clone(),
                deadline_us: record.deadline_us,
                attempt: record.attempts,
            };
            let attempt = record.attempts;
            let record = record.clone();
            self.command_changed(&record);
            // Written only if the command is still running a moment later (most finish sooner
            // and are then written once, with their whole history, one commit fewer; a stop
            // writes the ones still waiting): see `CommandsConfig::delivery_write_delay_ms`.
            ctx.run_later(self.settings.delivery_write_delay, move |actor, _| {
                if let Some(r) = actor.open.get(&id)
                    && r.attempts == attempt
                {
                    actor.persist(update_of(r));
                }
            });
            let (cancel_tx, cancel_rx) = oneshot::channel();
            self.in_flight.insert(id, cancel_tx);
            tracing::debug!(device = %self.id, command = id, attempt = request.attempt, "delivering command");
            let addr = ctx.address();
            let max_frame = self.settings.max_frame_bytes;
            let conn = conn.clone();
            self.settings.io.spawn(async move {
                let delivery = deliver(conn, request, cancel_rx, max_frame, early_fin).await;
                let delivered = Delivered {
                    id,
                    session,
                    delivery,
                };
                // Not waiting for the handler (its answer would wake this thread for nothing),
                // unless the mailbox is full.
                if let Err(SendError::Full(delivered)) = addr.try_send(delivered) {
                    let _ = addr.send(delivered).await;
                }
            });
        }
    }

    /// Tells command subscribers about a state change.
    fn command_changed(&self, record: &CommandRecord) {
        crate::fleet::publish(&self.settings.fleet.bus.commands, Some(&self.id), || {
            v1::event::Event::Command(crate::operator::command_info(record))
        });
    }

    /// Queues a state change for the store; failures are logged (the command is then redelivered
    /// or expired after a restart, never lost).
    pub(crate) fn persist(&self, update: CommandUpdate) {
        let write = self.store.update_command(update);
        let device = self.id.clone();
        actix::spawn(async move {
            if let Err(error) = write.await {
                tracing::error!(%device, %error, "cannot store a command state change");
            }
        });
    }

    /// Moves an unfinished command on. A terminal state takes it out of the outbox; its waiters
    /// are answered once the state is durable.
    fn advance(
        &mut self,
        id: CommandId,
        event: CommandEvent,
        result_json: Option<String>,
        error: Option<String>,
        ctx: &mut Context<Self>,
    ) -> Result<CommandRecord, CommandError> {
        let now = now_us();
        let Some(record) = self.open.get_mut(&id) else {
            return Err(CommandError::Finished {
                id,
                state: CommandState::Succeeded,
            });
        };
        let state = transition(record.state, event).map_err(|_| CommandError::Finished {
            id,
            state: record.state,
        })?;
        record.state = state;
        record.result_json = result_json;
        record.error = error;
        record.history.push((state, now));
        let update = update_of(record);
        let record = record.clone();
        tracing::info!(device = %self.id, command = id, state = state.name(), "command state changed");
        self.command_changed(&record);
        if !state.is_terminal() {
            self.persist(update);
            return Ok(record);
        }
        self.open.remove(&id);
        self.outbox.remove(id);
        if let Some(cancel) = self.in_flight.remove(&id) {
            let _ = cancel.send(());
        }
        // Its waiters are answered by the store's writer the moment the final state is durable:
        // no hop back through this actor's thread (one thread wake-up less per command).
        self.settling.retain(|_, s| !s.is_settled());
        let settling = Settling::new(self.waiters.remove(&id).unwrap_or_default());
        self.settling.insert(id, settling.clone());
        let settled = record.clone();
        let device = self.id.clone();
        self.store.update_command_then(
            update,
            Box::new(move |written| {
                if let Err(error) = written {
                    tracing::error!(%device, %error, command = id, "cannot store a command's final state");
                }
                settling.settle(&settled);
            }),
        );
        self.dispatch_commands(ctx); // the next serial command may go now
        self.schedule_expiry(ctx);
        Ok(record)
    }

    /// Arms a timer for the earliest deadline in the outbox.
    pub(crate) fn schedule_expiry(&mut self, ctx: &mut Context<Self>) {
        let Some(next) = self.outbox.next_deadline() else {
            if let Some((_, handle)) = self.expiry.take() {
                ctx.cancel_future(handle);
            }
            return;
        };
        if self.expiry.as_ref().is_some_and(|(at, _)| *at <= next) {
            return;
        }
        if let Some((_, handle)) = self.expiry.take() {
            ctx.cancel_future(handle);
        }
        let wait = Duration::from_micros(u64::try_from(next - now_us()).unwrap_or(0));
        let handle = ctx.run_later(wait, |actor, ctx| {
            actor.expiry = None;
            actor.expire_due(ctx);
        });
        self.expiry = Some((next, handle));
    }

    fn expire_due(&mut self, ctx: &mut Context<Self>) {
        for id in self.outbox.take_expired(now_us()) {
            let error = Some("the deadline passed before the device answered".to_owned());
            let _ = self.advance(id, CommandEvent::Expire, None, error, ctx);
        }
        self.schedule_expiry(ctx);
    }
}

/// Those waiting for a command whose final state is being written. Whoever learns that the
/// write is durable (the store's writer thread) answers them; a waiter that comes later finds it
/// settled and reads the store instead.
#[derive(Debug, Clone)]
pub(crate) struct Settling(Arc<Mutex<Option<Vec<oneshot::Sender<CommandRecord>>>>>);

impl Settling {
    fn new(waiters: Vec<oneshot::Sender<CommandRecord>>) -> Self {
        Self(Arc::new(Mutex::new(Some(waiters))))
    }

    /// Adds a waiter; gives it back once settled (the store then has the final state).
    pub(crate) fn join(
        &self,
        waiter: oneshot::Sender<CommandRecord>,
    ) -> Result<(), oneshot::Sender<CommandRecord>> {
        match self.0.lock().as_deref_mut() {
            Ok(Some(waiters)) => {
                waiters.push(waiter);
                Ok(())
            }
            _ => Err(waiter),
        }
    }

    fn settle(&self, record: &CommandRecord) {
        let waiters = self.0.lock().ok().and_then(|mut w| w.take());
        for waiter in waiters.unwrap_or_default() {
            let _ = waiter.send(record.clone());
        }
    }

    fn is_settled(&self) -> bool {
        self.0.lock().map_or(true, |w| w.is_none())
    }
}

pub(crate) fn update_of(record: &CommandRecord) -> CommandUpdate {
    CommandUpdate {
        id: record.id,
        state: record.state,
        history: record.history.clone(),
        attempts: record.attempts,
        result_json: record.result_json.clone(),
        error: record.error.clone(),
    }
}

/// How one delivery attempt ended.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// The device answered.
    Answered(v1::CommandResult),
    /// The device answered with something that is not a valid result.
    Invalid(String),
    /// The stream or connection was lost before an answer: deliver again on the next connection.
    Lost(String),
    /// The actor cancelled it (expired, cancelled).
    Cancelled,
}

/// Opens the command's stream, writes the request and reads the answer. A cancel resets the
/// stream both ways with [`COMMAND_CANCELLED_CODE`], which the device sees as a cancellation.
/// With `early_fin` (the device's Hello allowed it) the request goes with the FIN of our side:
/// the device's ACK of a FIN sent after its result would cost a packet per command.
async fn deliver(
    conn: quinn::Connection,
    request: v1::CommandRequest,
    cancel: oneshot::Receiver<()>,
    max_frame_bytes: u32,
    early_fin: bool,
) -> Delivery {
    let id = request.command_id;
    // Only a sent signal cancels; a dropped sender (the actor let go of the link) does not: the
    // stream then ends with its connection.
    let cancel = async move {
        if cancel.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(cancel);
    let (mut send, recv) = tokio::select! {
        opened = conn.open_bi() => match opened {
            Ok(s) => s,
            Err(e) => return Delivery::Lost(e.to_string()),
        },
        _ = &mut cancel => return Delivery::Cancelled,
    };
    let mut reader = FrameReader::new(recv, max_frame_bytes);
    let exchange = async {
        let header = StreamHeader {
            kind: StreamKind::Command.into(),
        };
        write_frame(&mut send, &header).await?;
        write_frame(&mut send, &request).await?;
        if early_fin {
            let _ = send.finish();
        }
        reader.read::<v1::CommandResult>().await
    };
    let answer = tokio::select! {
        a = exchange => a,
        _ = &mut cancel => {
            let code = quinn::VarInt::from_u32(COMMAND_CANCELLED_CODE);
            let _ = send.reset(code);
            let _ = reader.stream_mut().stop(code);
            return Delivery::Cancelled;
        }
    };
    if matches!(answer, Ok(Some(_))) {
        // The SDK's FIN comes with its result: reading on to it spares the STOP_SENDING that
        // dropping the stream unread would send, a packet of its own (and the device's ACK of it).
        crate::let_go(reader);
    }
    let delivery = match answer {
        Ok(Some(result)) if result.command_id == id => Delivery::Answered(result),
        Ok(Some(result)) => Delivery::Invalid(format!(
            "a CommandResult for command {} on the stream of command {id}",
            result.command_id
        )),
        Ok(None) => Delivery::Lost("the device finished the stream without a result".into()),
        Err(fleetlink_transport::TransportError::Frame(e)) => {
            Delivery::Invalid(format!("the result is not a valid CommandResult: {e}"))
        }
        Err(e) => Delivery::Lost(e.to_string()),
    };
    let _ = send.finish();
    delivery
}

/// A delivery attempt ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Delivered {
    id: CommandId,
    session: SessionId,
    delivery: Delivery,
}

impl Handler<Delivered> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: Delivered, ctx: &mut Self::Context) {
        let current = self.link.as_ref().is_some_and(|l| l.session == msg.session);
        if current {
            self.in_flight.remove(&msg.id);
        }
        let (event, result, error) = match msg.delivery {
            Delivery::Cancelled => return,
            Delivery::Lost(why) => {
                tracing::debug!(device = %self.id, command = msg.id, why, "command stream lost; it goes again on the next connection");
                return;
            }
            Delivery::Invalid(why) => {
                tracing::warn!(device = %self.id, command = msg.id, why, "invalid command result");
                (
                    CommandEvent::Fail,
                    None,
                    Some(format!("the device sent an invalid result: {why}")),
                )
            }
            Delivery::Answered(r) => {
                let outcome =
                    CommandOutcome::try_from(r.outcome).unwrap_or(CommandOutcome::Unspecified);
                let result = (!r.result_json.is_empty()).then_some(r.result_json);
                let error = (!r.error.is_empty()).then_some(r.error);
                match outcome {
                    CommandOutcome::Succeeded => (CommandEvent::Succeed, result, None),
                    CommandOutcome::Failed => (CommandEvent::Fail, result, error),
                    CommandOutcome::Rejected => (CommandEvent::Reject, None, error),
                    CommandOutcome::Unspecified => (
                        CommandEvent::Fail,
                        None,
                        Some("the device answered with COMMAND_OUTCOME_UNSPECIFIED".into()),
                    ),
                }
            }
        };
        if let Some(json) = &result
            && serde_json::from_str::<serde_json::Value>(json).is_err()
        {
            let error = Some(format!("the device's result is not valid JSON: {json:?}"));
            let _ = self.advance(msg.id, CommandEvent::Fail, None, error, ctx);
            return;
        }
        if let Err(e) = self.advance(msg.id, event, result, error, ctx) {
            tracing::debug!(device = %self.id, command = msg.id, error = %e, "late command result ignored");
        }
    }
}

/// An operator, a device (bridge) or a job queues a command; with `watch`, the answer also
/// carries a receiver for the command's final state, so that sending and waiting take one
/// message to the actor and no read of the store.
#[derive(Message)]
#[rtype(result = "Result<Submitted, CommandError>")]
pub(crate) struct SubmitCommand {
    pub new: NewCommand,
    pub watch: bool,
}

/// A queued command (or the one its idempotency key already made).
#[derive(Debug)]
pub(crate) struct Submitted {
    /// Its state when the answer left the actor.
    pub record: CommandRecord,
    /// With `SubmitCommand::watch`: its final state, once durable. `None` when it had finished
    /// already (`record` is then final) or the actor stopped.
    pub done: Option<oneshot::Receiver<CommandRecord>>,
}

impl DeviceActor {
    /// The answer to a `SubmitCommand` for `record`, watching it if asked to and unfinished.
    fn submitted(&mut self, record: CommandRecord, watch: bool) -> Submitted {
        let record = self.open.get(&record.id).cloned().unwrap_or(record);
        let done = (watch && !record.state.is_terminal())
            .then(|| self.watch_final(record.id))
            .flatten();
        Submitted { record, done }
    }

    /// A receiver for the final state of a command that is unfinished or still being written;
    /// `None` once it is settled or unknown here (the store then has its final state).
    fn watch_final(&mut self, id: CommandId) -> Option<oneshot::Receiver<CommandRecord>> {
        let (tx, rx) = oneshot::channel();
        if self.open.contains_key(&id) {
            self.waiters.entry(id).or_default().push(tx);
        } else {
            self.settling.get(&id)?.join(tx).ok()?;
        }
        Some(rx)
    }
}

impl Handler<SubmitCommand> for DeviceActor {
    type Result = ResponseActFuture<Self, Result<Submitted, CommandError>>;

    fn handle(&mut self, msg: SubmitCommand, _: &mut Self::Context) -> Self::Result {
        let SubmitCommand { new, watch } = msg;
        // The same key again: the command it made, unfinished (here) or finished (in the store).
        if let Some(key) = &new.idempotency_key
            && let Some(same) = self
                .open
                .values()
                .find(|r| r.idempotency_key.as_deref() == Some(key.as_str()))
        {
            let same = same.clone();
            return Box::pin(fut::ready(Ok(self.submitted(same, watch))));
        }
        let limits = self.settings.outbox_limits;
        let pending = self.outbox.len() + self.submitting;
        let refused = if pending >= limits.max_pending {
            Some(OutboxError::Full {
                pending,
                max: limits.max_pending,
            })
        } else {
            self.outbox
                .admit(new.deadline_us, new.created_us, &limits)
                .err()
        };
        if let Some(refused) = refused {
            let Some(key) = new.idempotency_key.clone() else {
                return Box::pin(fut::ready(Err(refused.into())));
            };
            // A retry of a finished command is answered with it, whatever the limits say now.
            let store = self.store.clone();
            let device = new.device.clone();
            return Box::pin(
                async move {
                    match store.command_by_key(&device, &key).await? {
                        Some(same) => Ok(same),
                        None => Err(refused.into()),
                    }
                }
                .into_actor(self)
                .map(
                    move |found: Result<CommandRecord, CommandError>, actor, _| {
                        Ok(actor.submitted(found?, watch))
                    },
                ),
            );
        }
        self.submitting += 1;
        let insert = self.store.insert_command(new);
        Box::pin(insert.into_actor(self).map(move |inserted, actor, ctx| {
            actor.submitting -= 1;
            let (record, created) = inserted?;
            if created {
                tracing::info!(device = %actor.id, command = record.id, name = %record.name, "command queued");
                actor
                    .outbox
                    .push(record.id, record.concurrent, record.deadline_us);
                actor.open.insert(record.id, record.clone());
                actor.command_changed(&record);
                // The delivery runs on the IO runtime: its result comes back as a message,
                // after this handler has registered the watch below.
                actor.dispatch_commands(ctx);
                actor.schedule_expiry(ctx);
            }
            Ok(actor.submitted(record, watch))
        }))
    }
}

/// An operator cancels a command of this device.
#[derive(Message)]
#[rtype(result = "Result<CommandRecord, CommandError>")]
pub(crate) struct CancelCommand(pub CommandId);

impl Handler<CancelCommand> for DeviceActor {
    type Result = ResponseFuture<Result<CommandRecord, CommandError>>;

    fn handle(
        &mut self,
        CancelCommand(id): CancelCommand,
        ctx: &mut Self::Context,
    ) -> Self::Result {
        if !self.open.contains_key(&id) {
            let store = self.store.clone();
            return Box::pin(async move {
                let record = store
                    .command(id)
                    .await?
                    .ok_or(StoreError::UnknownCommand(id))?;
                Err(CommandError::Finished {
                    id,
                    state: record.state,
                })
            });
        }
        let error = Some("cancelled by an operator".to_owned());
        let record = self.advance(id, CommandEvent::Cancel, None, error, ctx);
        let (tx, rx) = oneshot::channel();
        if let Some(settling) = self.settling.get(&id) {
            let _ = settling.join(tx); // settled already: `record` is durable
        }
        Box::pin(async move {
            let record = record?;
            Ok(rx.await.unwrap_or(record))
        })
    }
}

/// The actor's live record of an unfinished command: its state can be a commit ahead of the store
/// (a device may already be running a command whose `delivered` is still being written).
#[derive(Message)]
#[rtype(result = "Option<CommandRecord>")]
pub(crate) struct OpenCommand(pub CommandId);

impl Handler<OpenCommand> for DeviceActor {
    type Result = Option<CommandRecord>;

    fn handle(&mut self, OpenCommand(id): OpenCommand, _: &mut Self::Context) -> Self::Result {
        self.open.get(&id).cloned()
    }
}

/// An operator waits for a command to finish. `Err` = it is not unfinished here (read the store).
#[derive(Message)]
#[rtype(result = "Option<oneshot::Receiver<CommandRecord>>")]
pub(crate) struct WatchCommand(pub CommandId);

impl Handler<WatchCommand> for DeviceActor {
    type Result = Option<oneshot::Receiver<CommandRecord>>;

    fn handle(&mut self, WatchCommand(id): WatchCommand, _: &mut Self::Context) -> Self::Result {
        self.watch_final(id)
    }
}
