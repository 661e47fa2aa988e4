//! The fleetlink Rust SDK.
//!
//! - [`DeviceClient`]: a machine. Connects with its id, token and the server's CA, sends telemetry
//!   in batches, keeps every unacknowledged point in a bounded buffer, reconnects by itself with
//!   exponential backoff and jitter, and resends what the server did not store.
//! - [`OperatorClient`]: a person or a tool. Lists devices with presence and last values, reads
//!   telemetry, provisions devices.

mod command;
mod connect;
mod device;
mod operator;

use std::net::SocketAddr;

pub use command::{CommandCall, CommandFailure, CommandHandlers, CommandOutput};
pub use connect::Endpoint;
pub use device::{
    DEFAULT_CONNECT_TIMEOUT, DEVICE_TELEMETRY_ACK_BATCHES, DEVICE_TELEMETRY_ACK_DELAY,
    DesiredState, DeviceClient, DeviceCommandOutcome, DeviceConfig, DeviceStats, Incoming,
    device_transport,
};
pub use fleetlink_core::command::CommandState;
pub use fleetlink_core::{DeviceId, GeoPosition, MetricName, Point, Value};
pub use fleetlink_proto::MAX_PROVISION_BATCH;
pub use fleetlink_proto::v1::{ErrorCode, RejectReason};
pub use fleetlink_transport::{DEVICE_ACK_DELAY, MAX_ACK_DELAY, Resumption};
pub use operator::{
    ColumnValues, CommandInfo, CommandRequest, DeviceInfo, EventStream, FleetEvent, Group,
    JobAction, JobInfo, JobSpec, NewDeviceSpec, OperatorClient, OperatorConfig, PresenceEvent,
    PresenceInfo, StoredPoint, Subscription, TelemetryColumns, TelemetryQuery, Twin,
};

/// Where the server is and how to trust it.
#[derive(Debug, Clone)]
pub struct ServerAddress {
    /// UDP address of the server.
    pub addr: SocketAddr,
    /// Name in the server's certificate (`localhost` for the development certificate).
    pub server_name: String,
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: Vec<u8>,
}

impl ServerAddress {
    /// A server whose certificate was made for `localhost` by its development CA (read from `ca_file`).
    pub fn local(addr: SocketAddr, ca_file: &std::path::Path) -> Result<Self, ClientError> {
        let ca_pem = std::fs::read(ca_file).map_err(|e| {
            ClientError::InvalidArgument(format!(
                "cannot read the CA file {}: {e}",
                ca_file.display()
            ))
        })?;
        Ok(Self {
            addr,
            server_name: "localhost".into(),
            ca_pem,
        })
    }
}

/// What went wrong in the SDK.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server refused the Hello.
    #[error("rejected by the server ({}): {message}", reason.as_str_name())]
    Rejected {
        /// Why.
        reason: RejectReason,
        /// The server's explanation.
        message: String,
        /// Wait this long before retrying (0 = do not retry unchanged).
        retry_after_ms: u32,
    },
    /// The connection could not be made or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// The server closed the connection or refused a request with an error.
    #[error("server error ({}): {message}", code.as_str_name())]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server sent something this SDK does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A command did not succeed.
    #[error("command {id} {}: {error}", state.name())]
    Command {
        /// Its id.
        id: u64,
        /// The terminal state it reached (failed, rejected, expired, cancelled).
        state: CommandState,
        /// Why.
        error: String,
    },
    /// The client was closed, or stopped after a permanent rejection.
    #[error("the client is closed{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed(Option<String>),
}

impl From<fleetlink_transport::TransportError> for ClientError {
    fn from(e: fleetlink_transport::TransportError) -> Self {
        use fleetlink_transport::TransportError as T;
        match e {
            T::Connection(c) => connection_error(c),
            T::Read(quinn::ReadError::ConnectionLost(c)) => connection_error(c),
            T::Write(quinn::WriteError::ConnectionLost(c)) => connection_error(c),
            other => ClientError::Connection(other.to_string()),
        }
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        connection_error(e)
    }
}

/// Turns the server's close frame (code = [`ErrorCode`], reason = message) into a typed error.
fn connection_error(e: quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner())
                .ok()
                .and_then(|c| ErrorCode::try_from(c as i32).ok())
                .unwrap_or(ErrorCode::Unspecified);
            ClientError::Server {
                code,
                message: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        other => ClientError::Connection(other.to_string()),
    }
}

/// Microseconds since the Unix epoch, from the system clock.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
