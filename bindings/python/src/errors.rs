//! Every Rust error becomes a Python exception here, and only here. The exception classes live in
//! `fleetlink.errors` (Python), so they can subclass two built-ins (`NotFound` is also a
//! `KeyError`, `InvalidArgument` a `ValueError`, the timeouts `TimeoutError`).

use fleetlink_client::{ClientError, CommandState};
use fleetlink_core::DeviceId;
use fleetlink_proto::v1::ErrorCode;
use fleetlink_proto::v1::RejectReason;
use pyo3::prelude::*;

/// Builds `fleetlink.errors.<class>(message)`, with extra attributes.
fn raise(py: Python<'_>, class: &str, message: String, attrs: &[(&str, Py<PyAny>)]) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let module = py.import("fleetlink.errors")?;
        let exc = module.getattr(class)?.call1((message.clone(),))?;
        for (name, value) in attrs {
            exc.setattr(*name, value)?;
        }
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|e| e)
}

/// The Python exception for an SDK error.
pub(crate) fn to_py(py: Python<'_>, e: ClientError) -> PyErr {
    let message = e.to_string();
    match e {
        ClientError::Rejected { reason, .. } => {
            let class = match reason {
                RejectReason::UnknownDevice => "NotFound",
                RejectReason::BadToken => "AuthError",
                RejectReason::ServerBusy | RejectReason::ShuttingDown => "ConnectionLost",
                _ => "FleetlinkError",
            };
            raise(py, class, message, &[])
        }
        ClientError::Server { code, .. } => {
            let class = match code {
                ErrorCode::NotFound => "NotFound",
                ErrorCode::Conflict | ErrorCode::AlreadyExists => "Conflict",
                ErrorCode::PermissionDenied => "PermissionDenied",
                ErrorCode::Unauthenticated => "AuthError",
                ErrorCode::InvalidArgument
                | ErrorCode::InvalidValue
                | ErrorCode::LimitExceeded
                | ErrorCode::FrameTooLarge => "InvalidArgument",
                ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::Replaced => {
                    "ConnectionLost"
                }
                _ => "FleetlinkError",
            };
            raise(py, class, message, &[])
        }
        ClientError::Connection(_) | ClientError::Closed(_) => {
            raise(py, "ConnectionLost", message, &[])
        }
        ClientError::InvalidArgument(_) => raise(py, "InvalidArgument", message, &[]),
        ClientError::Timeout(_) => raise(py, "Timeout", message, &[]),
        ClientError::Command { id, state, error } => command_failed(py, id, state, &error),
        ClientError::Protocol(_) => raise(py, "FleetlinkError", message, &[]),
    }
}

/// `CommandFailed` for a command that ended without success.
pub(crate) fn command_failed(py: Python<'_>, id: u64, state: CommandState, error: &str) -> PyErr {
    let message = format!(
        "command {id} {}: {}",
        state.name(),
        if error.is_empty() {
            "no reason given"
        } else {
            error
        }
    );
    let attrs = [
        (
            "command_id",
            id.into_pyobject(py).map(|o| o.into_any().unbind()),
        ),
        (
            "state",
            state
                .name()
                .into_pyobject(py)
                .map(|o| o.into_any().unbind()),
        ),
        (
            "error",
            error.into_pyobject(py).map(|o| o.into_any().unbind()),
        ),
    ];
    let attrs: Vec<(&str, Py<PyAny>)> = attrs
        .into_iter()
        .filter_map(|(k, v)| v.ok().map(|v| (k, v)))
        .collect();
    raise(py, "CommandFailed", message, &attrs)
}

/// `InvalidArgument` with a message.
pub(crate) fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    raise(py, "InvalidArgument", message.into(), &[])
}

/// A device id from Python, or `InvalidArgument` saying why not.
pub(crate) fn device_id(py: Python<'_>, s: &str) -> PyResult<DeviceId> {
    DeviceId::new(s).map_err(|e| invalid(py, format!("device id {s:?}: {e}")))
}
