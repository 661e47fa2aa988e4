//! Command handlers of a device, and the cache that makes each handler run once per command.
//!
//! The server delivers a command at least once: after a lost connection or a server restart it
//! writes the same command (same id) again. The SDK remembers the last [`RESULT_CACHE`] command
//! ids: a redelivery of a command that is still running waits for that run, and a redelivery of
//! a finished one is answered with the stored result. The handler runs once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use fleetlink_proto::COMMAND_CANCELLED_CODE;
use fleetlink_proto::v1::{self, CommandOutcome};
use fleetlink_transport::{FrameReader, TransportError, write_frame};
use tokio::sync::watch;

/// Command ids (and results) remembered for answering redeliveries.
pub const RESULT_CACHE: usize = 4_096;

/// A command as the handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandCall {
    /// Unique per server; the same on a redelivery.
    pub id: u64,
    /// The handler's name.
    pub name: String,
    /// The arguments (`null` when none were given).
    pub args: serde_json::Value,
    /// When the server gives up on it (µs since the epoch, server clock).
    pub deadline_us: i64,
}

/// Why a handler did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandFailure {
    /// The handler ran and failed: the command ends `failed` with this error (and optional details).
    Failed {
        /// What went wrong.
        error: String,
        /// Anything the operator should see besides the message.
        details: Option<serde_json::Value>,
    },
    /// The device will not run it (bad arguments, not now): the command ends `rejected`.
    Rejected(String),
}

impl CommandFailure {
    /// A failure with a message.
    pub fn failed(error: impl Into<String>) -> Self {
        CommandFailure::Failed {
            error: error.into(),
            details: None,
        }
    }
}

/// What a handler returns: a JSON result, or why it did not succeed.
pub type CommandOutput = Result<serde_json::Value, CommandFailure>;

type BoxedHandler =
    Arc<dyn Fn(CommandCall) -> Pin<Box<dyn Future<Output = CommandOutput> + Send>> + Send + Sync>;

/// The command handlers of a device, by command name.
#[derive(Clone, Default)]
pub struct CommandHandlers {
    handlers: HashMap<String, BoxedHandler>,
    /// Runs commands no named handler takes (for handler tables that change after connecting,
    /// such as the Python SDK's).
    fallback: Option<BoxedHandler>,
}

impl std::fmt::Debug for CommandHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("CommandHandlers")
            .field("names", &names)
            .finish()
    }
}

impl CommandHandlers {
    /// Registers (or replaces) the handler of `name`.
    pub fn on<F, Fut>(&mut self, name: impl Into<String>, handler: F)
    where
        F: Fn(CommandCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CommandOutput> + Send + 'static,
    {
        let handler: BoxedHandler = Arc::new(move |call| Box::pin(handler(call)));
        self.handlers.insert(name.into(), handler);
    }

    /// Registers the handler of every command without a handler of its own. It sees the name in
    /// [`CommandCall::name`] and may answer [`CommandFailure::Rejected`].
    pub fn fallback<F, Fut>(&mut self, handler: F)
    where
        F: Fn(CommandCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CommandOutput> + Send + 'static,
    {
        self.fallback = Some(Arc::new(move |call| Box::pin(handler(call))));
    }

    fn get(&self, name: &str) -> Option<BoxedHandler> {
        self.handlers
            .get(name)
            .cloned()
            .or_else(|| self.fallback.clone())
    }
}

/// Results of recent commands, by id; `None` while the handler runs.
#[derive(Debug, Default)]
pub(crate) struct ResultCache {
    entries: HashMap<u64, Entry>,
    order: VecDeque<u64>,
}

#[derive(Debug)]
struct Entry {
    result: watch::Receiver<Option<v1::CommandResult>>,
    /// The running handler, to stop it when the server cancels the command.
    run: Option<tokio::task::AbortHandle>,
}

/// Counters of the command side of a device.
#[derive(Debug, Default)]
pub(crate) struct CommandCounters {
    pub handled: u64,
    pub redeliveries: u64,
}

#[derive(Debug)]
pub(crate) struct CommandRunner {
    pub handlers: CommandHandlers,
    pub cache: Mutex<ResultCache>,
    pub counters: Mutex<CommandCounters>,
}

impl CommandRunner {
    pub(crate) fn new(handlers: CommandHandlers) -> Arc<Self> {
        Arc::new(Self {
            handlers,
            cache: Mutex::new(ResultCache::default()),
            counters: Mutex::new(CommandCounters::default()),
        })
    }

    /// The result of `request`: from the cache, from the run already going, or from a new run
    /// of its handler.
    fn start(&self, request: &v1::CommandRequest) -> watch::Receiver<Option<v1::CommandResult>> {
        let Ok(mut cache) = self.cache.lock() else {
            let (_, rx) = watch::channel(Some(rejected(
                request.command_id,
                "device SDK state poisoned",
            )));
            return rx;
        };
        if let Some(entry) = cache.entries.get(&request.command_id) {
            if let Ok(mut c) = self.counters.lock() {
                c.redeliveries += 1;
            }
            return entry.result.clone();
        }
        let (tx, rx) = watch::channel(None);
        cache.entries.insert(
            request.command_id,
            Entry {
                result: rx.clone(),
                run: None,
            },
        );
        cache.order.push_back(request.command_id);
        while cache.order.len() > RESULT_CACHE {
            if let Some(old) = cache.order.pop_front() {
                cache.entries.remove(&old);
            }
        }
        drop(cache);
        let id = request.command_id;
        let Some(handler) = self.handlers.get(&request.name) else {
            let _ = tx.send(Some(rejected(
                id,
                &format!("this device has no handler for command {:?}", request.name),
            )));
            return rx;
        };
        let args = if request.args_json.is_empty() {
            Ok(serde_json::Value::Null)
        } else {
            serde_json::from_str(&request.args_json)
        };
        let args = match args {
            Ok(a) => a,
            Err(e) => {
                let _ = tx.send(Some(rejected(
                    id,
                    &format!("arguments are not valid JSON: {e}"),
                )));
                return rx;
            }
        };
        if let Ok(mut c) = self.counters.lock() {
            c.handled += 1;
        }
        let call = CommandCall {
            id,
            name: request.name.clone(),
            args,
            deadline_us: request.deadline_us,
        };
        // Its own task: a lost connection does not stop the handler, so the redelivery on the
        // next connection gets its result.
        let run = tokio::spawn(async move {
            let output = handler(call).await;
            let _ = tx.send(Some(result_frame(id, output)));
        });
        if let Ok(mut cache) = self.cache.lock()
            && let Some(entry) = cache.entries.get_mut(&id)
        {
            entry.run = Some(run.abort_handle());
        }
        rx
    }

    /// The server cancelled (or expired) the command: stop its handler.
    fn cancel(&self, id: u64) {
        if let Ok(cache) = self.cache.lock()
            && let Some(run) = cache.entries.get(&id).and_then(|e| e.run.as_ref())
        {
            run.abort();
        }
    }

    /// Serves one server-opened command stream (after its StreamHeader).
    pub(crate) async fn serve(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut reader: FrameReader,
        device: String,
    ) {
        let request = match reader.read::<v1::CommandRequest>().await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%device, error = %e, "unreadable command request");
                return;
            }
        };
        let id = request.command_id;
        tracing::debug!(%device, command = id, name = %request.name, attempt = request.attempt, "command received");
        let mut result = self.start(&request);
        let stopped = send.stopped();
        let cancelled = async {
            // A cancel (or expiry) is the cancel code on either side: the server resets its
            // side and stops ours. Its side may end with a FIN right after the request (§10.2),
            // which says nothing; any other end is a lost connection (the command will be
            // delivered again, so its handler keeps running).
            let read_side = async {
                loop {
                    match reader.read::<v1::CommandResult>().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => std::future::pending::<()>().await,
                        Err(TransportError::Read(quinn::ReadError::Reset(code))) => {
                            return code.into_inner() == u64::from(COMMAND_CANCELLED_CODE);
                        }
                        Err(_) => return false,
                    }
                }
            };
            let stop_side = async {
                matches!(stopped.await, Ok(Some(code)) if code.into_inner() == u64::from(COMMAND_CANCELLED_CODE))
            };
            tokio::select! {
                c = read_side => c,
                c = stop_side => c,
            }
        };
        let answer = tokio::select! {
            r = result.wait_for(Option::is_some) => match r {
                Ok(r) => r.clone(),
                // The run ended without a result: its handler panicked or was stopped.
                Err(_) => Some(v1::CommandResult {
                    command_id: id,
                    outcome: CommandOutcome::Failed.into(),
                    result_json: String::new(),
                    error: "the handler stopped before it returned a result (it panicked or was cancelled)".into(),
                }),
            },
            cancelled = cancelled => {
                if cancelled {
                    tracing::info!(%device, command = id, "command cancelled or expired by the server; stopping its handler");
                    self.cancel(id);
                }
                return;
            }
        };
        let Some(answer) = answer else { return };
        match write_frame(&mut send, &answer).await {
            Ok(()) => {
                let _ = send.finish();
                let _ = send.stopped().await;
            }
            Err(TransportError::Write(e)) => {
                tracing::debug!(%device, command = id, error = %e, "command result not delivered; the server will redeliver");
            }
            Err(e) => {
                tracing::debug!(%device, command = id, error = %e, "command result not delivered")
            }
        }
    }
}

fn rejected(id: u64, why: &str) -> v1::CommandResult {
    v1::CommandResult {
        command_id: id,
        outcome: CommandOutcome::Rejected.into(),
        result_json: String::new(),
        error: why.to_owned(),
    }
}

fn result_frame(id: u64, output: CommandOutput) -> v1::CommandResult {
    match output {
        Ok(value) => v1::CommandResult {
            command_id: id,
            outcome: CommandOutcome::Succeeded.into(),
            result_json: value.to_string(),
            error: String::new(),
        },
        Err(CommandFailure::Failed { error, details }) => v1::CommandResult {
            command_id: id,
            outcome: CommandOutcome::Failed.into(),
            result_json: details.map(|d| d.to_string()).unwrap_or_default(),
            error,
        },
        Err(CommandFailure::Rejected(why)) => rejected(id, &why),
    }
}
