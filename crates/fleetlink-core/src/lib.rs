//! fleetlink's domain rules as pure functions and plain structs: no tokio, no sockets, no clock.
//! Time is always passed in (microseconds since the Unix epoch), so every rule here is
//! deterministic and property-tested.

pub mod backoff;
pub mod command;
pub mod credentials;
pub mod id;
pub mod job;
pub mod policy;
pub mod presence;
pub mod query;
pub mod seq;
pub mod topic;
pub mod twin;
pub mod value;

pub use id::{DeviceId, IdError, MetricName};
pub use value::{GeoPosition, Point, Value, ValueError, ValueKind};

/// Microseconds since the Unix epoch, the one time unit of fleetlink.
pub type TimeUs = i64;
