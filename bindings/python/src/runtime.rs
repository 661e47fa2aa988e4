//! One tokio runtime for every client and device of the process, and the blocking bridge to it:
//! the calling thread releases the GIL while it waits, and wakes every 50 ms to let Python run
//! its signal handlers, so Ctrl-C interrupts any wait.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The shared runtime (two worker threads; the server embedded by `Server` has its own).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleetlink-py")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the fleetlink runtime: {e}"))
    })
}

/// Runs `fut` on the runtime and waits for it without holding the GIL. A pending Python signal
/// (Ctrl-C) cancels the future and raises.
pub(crate) fn wait<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let rx = std::sync::Mutex::new(rx); // Sync, so the GIL-free closure may borrow it
    let task = runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    loop {
        let next = py.detach(|| match rx.lock() {
            Ok(rx) => rx.recv_timeout(Duration::from_millis(50)),
            Err(_) => Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
        });
        match next {
            Ok(value) => return Ok(value),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    task.abort();
                    return Err(e);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "the fleetlink runtime dropped a task (a bug; please report it)",
                ));
            }
        }
    }
}
