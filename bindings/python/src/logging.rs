//! Rust `tracing` events into Python `logging`: an event of target `fleetlink_server::session`
//! goes to the logger `fleetlink.server.session` with the matching level. Only events at or above
//! the level given to `init_logging` cross over (each costs a trip through the GIL).

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

struct PythonLogging;

#[derive(Default)]
struct Message {
    text: String,
    fields: Vec<String>,
}

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.text = format!("{value:?}");
        } else {
            self.fields.push(format!("{}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text = value.to_owned();
        } else {
            self.fields.push(format!("{}={value}", field.name()));
        }
    }
}

fn logger_name(target: &str) -> String {
    let target = target.replace("::", ".");
    let target = target.strip_prefix("fleetlink_").unwrap_or(&target);
    format!("fleetlink.{target}")
}

impl<S: tracing::Subscriber> Layer<S> for PythonLogging {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => 40,
            tracing::Level::WARN => 30,
            tracing::Level::INFO => 20,
            _ => 10,
        };
        let mut message = Message::default();
        event.record(&mut message);
        if !message.fields.is_empty() {
            message.text = format!("{} {}", message.text, message.fields.join(" "));
        }
        let name = logger_name(meta.target());
        Python::attach(|py| {
            let logged = py
                .import("logging")
                .and_then(|l| l.call_method1("getLogger", (name,)))
                .and_then(|logger| logger.call_method1("log", (level, message.text)));
            if let Err(e) = logged {
                e.print(py);
            }
        });
    }
}

/// Sends fleetlink's Rust log events at `level` ("error", "warn", "info", "debug") and above to
/// Python's `logging`. Called once by `import fleetlink`; later calls change nothing.
#[pyfunction]
#[pyo3(signature = (level="info"))]
pub fn init_logging(level: &str) -> PyResult<()> {
    let filter = tracing_subscriber::filter::LevelFilter::from_level(match level {
        "error" => tracing::Level::ERROR,
        "warn" | "warning" => tracing::Level::WARN,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "log level {other:?}: use error, warn, info or debug"
            )));
        }
    });
    // Another subscriber may be installed already (an embedding program): keep it.
    let _ = tracing_subscriber::registry()
        .with(PythonLogging.with_filter(filter))
        .try_init();
    Ok(())
}
