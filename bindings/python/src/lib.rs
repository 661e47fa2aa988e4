//! `fleetlink._fleetlink`: the native half of the `fleetlink` Python package. The public API is
//! written in Python (`python/fleetlink`) on top of these classes; everything blocking here
//! releases the GIL and can be interrupted with Ctrl-C.

mod arrow;
mod client;
mod device;
mod errors;
mod logging;
mod runtime;
mod server;
mod values;

use pyo3::prelude::*;

/// mimalloc, not glibc's malloc, for this module's own (Rust) allocations: a telemetry query
/// allocates and frees column vectors of megabytes, which glibc hands back to the kernel and
/// takes again, page fault by page fault (11% of the CPU of a 10M-row `Client.telemetry`).
/// Python's objects keep Python's allocator; Arrow buffers handed to pyarrow are freed through
/// their release callback, so by this allocator too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The native module.
#[pymodule]
fn _fleetlink(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<client::Subscription>()?;
    m.add_class::<device::Device>()?;
    m.add_class::<server::Server>()?;
    m.add_class::<arrow::ArrowStream>()?;
    m.add_function(wrap_pyfunction!(logging::init_logging, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
