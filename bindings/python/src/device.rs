//! The native device behind `fleetlink.Device`: the Rust SDK's `DeviceClient` (buffering, acks,
//! reconnects, the result cache that runs each command handler once), with Python callables as
//! command handlers and desired-state callbacks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlink_client::{
    CommandCall, CommandFailure, DeviceClient, DeviceConfig, Incoming, MetricName, Point,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::client::server_address;
use crate::errors::{device_id, invalid, to_py};
use crate::runtime::{runtime, wait};
use crate::values::{from_json, point_value, to_json};

type Handlers = Arc<Mutex<HashMap<String, Py<PyAny>>>>;

/// A device connected to a fleetlink server.
#[pyclass(module = "fleetlink._fleetlink", frozen)]
#[derive(Debug)]
pub struct Device {
    client: Arc<DeviceClient>,
    handlers: Handlers,
    incoming: Arc<tokio::sync::Mutex<tokio::sync::broadcast::Receiver<Incoming>>>,
    desired_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn err(e: fleetlink_client::ClientError) -> PyErr {
    Python::attach(|py| to_py(py, e))
}

/// Runs the Python handler of a command on a blocking thread (it holds the GIL while it runs).
async fn run_handler(handlers: Handlers, call: CommandCall) -> fleetlink_client::CommandOutput {
    let name = call.name.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        Python::attach(|py| -> Result<serde_json::Value, CommandFailure> {
            let handler = handlers
                .lock()
                .ok()
                .and_then(|h| h.get(&call.name).map(|f| f.clone_ref(py)));
            let Some(handler) = handler else {
                return Err(CommandFailure::Rejected(format!(
                    "this device has no handler for command {:?}",
                    call.name
                )));
            };
            let args =
                from_json(py, &call.args).map_err(|e| CommandFailure::failed(e.to_string()))?;
            let result = handler.call1(py, (args,)).map_err(|e| {
                // A handler that raises fails the command with the exception's text.
                let text = e
                    .value(py)
                    .str()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| "the handler raised".into());
                let kind = e
                    .get_type(py)
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                CommandFailure::failed(format!("{kind}: {text}"))
            })?;
            to_json(py, result.bind(py)).map_err(|e| {
                CommandFailure::failed(format!("the handler's result is not JSON: {e}"))
            })
        })
    })
    .await;
    match outcome {
        Ok(r) => r,
        Err(e) => Err(CommandFailure::failed(format!(
            "the handler of {name:?} did not finish: {e}"
        ))),
    }
}

#[pymethods]
impl Device {
    /// Connects and authenticates; commands are dispatched to the handlers registered with
    /// `on_command` (also those registered after connecting).
    #[staticmethod]
    #[pyo3(signature = (url, device_id, token, ca_pem, server_name="localhost", commands=None, timeout_s=10.0, ack_coalescing=true, telemetry_ack_delay_s=None, telemetry_ack_batches=None))]
    #[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of Device.connect
    fn connect(
        py: Python<'_>,
        url: &str,
        device_id: &str,
        token: &str,
        ca_pem: Vec<u8>,
        server_name: &str,
        commands: Option<HashMap<String, Py<PyAny>>>,
        timeout_s: f64,
        ack_coalescing: bool,
        telemetry_ack_delay_s: Option<f64>,
        telemetry_ack_batches: Option<i64>,
    ) -> PyResult<Device> {
        let timeout = crate::client::secs(py, timeout_s, "timeout")?;
        let server = server_address(py, url, ca_pem, server_name)?;
        let id = crate::errors::device_id(py, device_id)?;
        // Handlers given here are in place before the first command can arrive (commands queued
        // while the device was offline come right after the Welcome).
        let handlers: Handlers = Arc::new(Mutex::new(commands.unwrap_or_default()));
        let mut config = DeviceConfig::new(server, id, token);
        if !ack_coalescing {
            if telemetry_ack_delay_s.is_some() || telemetry_ack_batches.is_some() {
                return Err(invalid(
                    py,
                    "ack_coalescing=False turns ack coalescing off: give it no \
                     telemetry_ack_delay or telemetry_ack_batches",
                ));
            }
            config.telemetry_ack_batches = 1; // every batch acked as soon as it is stored
        }
        if let Some(delay) = telemetry_ack_delay_s {
            // (over 10 s: the SDK's connect says so)
            config.telemetry_ack_delay = crate::client::secs(py, delay, "telemetry_ack_delay")?;
        }
        if let Some(batches) = telemetry_ack_batches {
            config.telemetry_ack_batches = u32::try_from(batches)
                .ok()
                .filter(|&b| b >= 1)
                .ok_or_else(|| {
                    invalid(
                        py,
                        format!(
                            "telemetry_ack_batches must be at least 1 (1 = no ack coalescing), \
                             got {batches}"
                        ),
                    )
                })?;
        }
        let table = handlers.clone();
        config
            .commands
            .fallback(move |call| run_handler(table.clone(), call));
        let client = wait(py, async move {
            tokio::time::timeout(timeout, DeviceClient::connect(config))
                .await
                .map_err(|_| fleetlink_client::ClientError::Timeout(timeout))?
        })?
        .map_err(err)?;
        let incoming = client.incoming();
        Ok(Device {
            client: Arc::new(client),
            handlers,
            incoming: Arc::new(tokio::sync::Mutex::new(incoming)),
            desired_task: Mutex::new(None),
        })
    }

    /// Queues points: `metrics` maps metric names to values, all stamped `ts_us` (µs since the
    /// epoch). Waits while the send buffer is full.
    #[pyo3(signature = (metrics, ts_us, timeout_s=None))]
    fn send(
        &self,
        py: Python<'_>,
        metrics: &Bound<'_, PyDict>,
        ts_us: i64,
        timeout_s: Option<f64>,
    ) -> PyResult<()> {
        let timeout = timeout_s
            .map(|t| crate::client::secs(py, t, "timeout"))
            .transpose()?;
        let mut points = Vec::with_capacity(metrics.len());
        for (k, v) in metrics.iter() {
            let name: String = k
                .extract()
                .map_err(|_| invalid(py, "metric names must be str"))?;
            let metric = MetricName::new(name.clone())
                .map_err(|e| invalid(py, format!("metric {name:?}: {e}")))?;
            points.push(Point {
                metric,
                time_us: ts_us,
                value: point_value(py, &name, &v)?,
            });
        }
        let client = self.client.clone();
        wait(py, async move {
            match timeout {
                // the buffer stays full while the server is unreachable
                Some(t) => tokio::time::timeout(t, client.send(points))
                    .await
                    .map_err(|_| fleetlink_client::ClientError::Timeout(t))?,
                None => client.send(points).await,
            }
        })?
        .map_err(err)
    }

    /// Waits until the server acknowledged everything sent.
    fn flush(&self, py: Python<'_>, timeout_s: f64) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(timeout_s)
            .map_err(|_| invalid(py, "timeout must be >= 0 seconds"))?;
        let client = self.client.clone();
        wait(py, async move { client.flush(timeout).await })?.map_err(err)
    }

    /// Merges a JSON patch into the reported twin; returns its version.
    fn report(&self, py: Python<'_>, patch_json: &str) -> PyResult<u64> {
        let patch: serde_json::Value = serde_json::from_str(patch_json)
            .map_err(|e| invalid(py, format!("patch is not JSON: {e}")))?;
        let client = self.client.clone();
        wait(py, async move { client.report(patch).await })?.map_err(err)
    }

    /// Calls `callback(state)` with the desired state now and after every change; `state` is a
    /// dict with version, delta and desired. Replaces an earlier callback.
    fn on_desired(&self, callback: Py<PyAny>) -> PyResult<()> {
        let mut rx = self.client.desired();
        let task = runtime().spawn(async move {
            loop {
                let state = rx.borrow_and_update().clone();
                if let Some(state) = state {
                    let cb = Python::attach(|py| callback.clone_ref(py));
                    let _ = tokio::task::spawn_blocking(move || {
                        Python::attach(|py| {
                            let arg = serde_json::json!({
                                "version": state.version, "delta": state.delta, "desired": state.desired,
                            });
                            let called = from_json(py, &arg).and_then(|a| cb.call1(py, (a,)));
                            if let Err(e) = called {
                                e.print(py); // a failing callback must not stop the device
                            }
                        });
                    })
                    .await;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        if let Ok(mut old) = self.desired_task.lock()
            && let Some(old) = old.replace(task)
        {
            old.abort();
        }
        Ok(())
    }

    /// Registers (or replaces) the handler of a command: `handler(args) -> result` (JSON-like).
    fn on_command(&self, name: String, handler: Py<PyAny>) -> PyResult<()> {
        if let Ok(mut h) = self.handlers.lock() {
            h.insert(name, handler);
        }
        Ok(())
    }

    /// Publishes to a topic; returns how many subscribers got it.
    #[pyo3(signature = (topic, payload, retain=false))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> PyResult<u64> {
        let client = self.client.clone();
        let topic = topic.to_owned();
        wait(
            py,
            async move { client.publish(&topic, payload, retain).await },
        )?
        .map_err(err)
    }

    /// Subscribes to a topic filter; messages arrive through `next_message`.
    fn subscribe(&self, py: Python<'_>, filter: &str) -> PyResult<()> {
        let client = self.client.clone();
        let filter = filter.to_owned();
        wait(py, async move { client.subscribe(&filter).await })?.map_err(err)
    }

    /// Sends a direct message to another device; returns its id.
    #[pyo3(signature = (to, payload, ttl_s=None))]
    fn send_direct(
        &self,
        py: Python<'_>,
        to: &str,
        payload: Vec<u8>,
        ttl_s: Option<f64>,
    ) -> PyResult<u64> {
        let _ = device_id(py, to)?;
        let ttl = ttl_s
            .map(|t| {
                Duration::try_from_secs_f64(t).map_err(|_| invalid(py, "ttl must be >= 0 seconds"))
            })
            .transpose()?;
        let client = self.client.clone();
        let to = to.to_owned();
        wait(
            py,
            async move { client.send_direct(&to, payload, ttl).await },
        )?
        .map_err(err)
    }

    /// The next bridge message (a dict with "kind": "topic", "direct" or "expired"), or None
    /// after `timeout_s` seconds.
    #[pyo3(signature = (timeout_s=None))]
    fn next_message(&self, py: Python<'_>, timeout_s: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        let incoming = self.incoming.clone();
        let timeout = timeout_s
            .map(|t| {
                Duration::try_from_secs_f64(t).map_err(|_| {
                    invalid(
                        py,
                        format!("timeout must be a number of seconds >= 0, got {t}"),
                    )
                })
            })
            .transpose()?;
        let got = wait(py, async move {
            let mut rx = incoming.lock().await;
            loop {
                let next = match timeout {
                    Some(t) => match tokio::time::timeout(t, rx.recv()).await {
                        Ok(r) => r,
                        Err(_) => return None,
                    },
                    None => rx.recv().await,
                };
                match next {
                    Ok(m) => return Some(m),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })?;
        let Some(m) = got else { return Ok(None) };
        let d = PyDict::new(py);
        match m {
            Incoming::Topic {
                topic,
                payload,
                from,
                retained,
                published_us,
            } => {
                d.set_item("kind", "topic")?;
                d.set_item("topic", topic)?;
                d.set_item("payload", pyo3::types::PyBytes::new(py, &payload))?;
                d.set_item("from", from)?;
                d.set_item("retained", retained)?;
                d.set_item("time_us", published_us)?;
            }
            Incoming::Direct {
                id,
                from,
                payload,
                sent_us,
            } => {
                d.set_item("kind", "direct")?;
                d.set_item("id", id)?;
                d.set_item("from", from)?;
                d.set_item("payload", pyo3::types::PyBytes::new(py, &payload))?;
                d.set_item("time_us", sent_us)?;
            }
            Incoming::Expired { id, to } => {
                d.set_item("kind", "expired")?;
                d.set_item("id", id)?;
                d.set_item("to", to)?;
            }
        }
        Ok(Some(d.into_any().unbind()))
    }

    /// Counters: points sent/acked/rejected, highest acked batch, connects (and those whose Hello
    /// went in 0-RTT), commands handled, redeliveries.
    fn stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let s = self.client.stats();
        let d = PyDict::new(py);
        d.set_item("points_sent", s.points_sent)?;
        d.set_item("points_acked", s.points_acked)?;
        d.set_item("points_rejected", s.points_rejected)?;
        d.set_item("acked_seq", s.acked_seq)?;
        d.set_item("connects", s.connects)?;
        d.set_item("zero_rtt_connects", s.zero_rtt_connects)?;
        d.set_item("connected", s.connected)?;
        d.set_item("last_error", s.last_error)?;
        d.set_item("commands_handled", s.commands_handled)?;
        d.set_item("command_redeliveries", s.command_redeliveries)?;
        Ok(d.into_any().unbind())
    }

    /// The device's id.
    #[getter]
    fn id(&self) -> String {
        self.client.id().to_string()
    }

    /// Closes the connection (unacked points are dropped: flush first).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Ok(mut t) = self.desired_task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
        let client = self.client.clone();
        wait(py, async move { client.disconnect().await })
    }
}
