//! Simulated fleets. The models ([`Vehicle`], [`Machine`]) are pure: they advance by a time step
//! with a seeded random source and return points, so they are deterministic and testable; the
//! [`Fleet`] runner connects them to a server with the real SDK.

mod model;
mod runner;

pub use model::{Machine, Vehicle};
pub use runner::{Credentials, Fleet, FleetConfig, FleetStats, SimDevice};
