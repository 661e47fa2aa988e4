//! The native operator client behind `fleetlink.Client`. Every method blocks without the GIL;
//! results are plain Python objects (dicts, lists) or Arrow streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetlink_client::{
    ClientError, CommandInfo, CommandRequest, CommandState, DeviceInfo, EventStream, FleetEvent,
    JobAction, JobInfo, JobSpec, MetricName, NewDeviceSpec, OperatorClient, OperatorConfig,
    ServerAddress, Subscription as Stream, TelemetryQuery,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::json;

use crate::arrow::{ArrowStream, TelemetryBuilder};
use crate::errors::{device_id, invalid, to_py};
use crate::runtime::wait;
use crate::values::{from_json, value_to_py};

/// Telemetry queries (one per device and metric) that `Client.telemetry` keeps in flight.
const QUERIES_IN_FLIGHT: usize = 4;

/// Aborts its task when dropped: the caller gave up (an error, or Ctrl-C in Python).
#[derive(Debug)]
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a server is: `fleetlink://host:port` or `host:port`, and the CA to trust.
pub(crate) fn server_address(
    py: Python<'_>,
    url: &str,
    ca_pem: Vec<u8>,
    server_name: &str,
) -> PyResult<ServerAddress> {
    let hostport = url.strip_prefix("fleetlink://").unwrap_or(url);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .map_err(|e| {
            invalid(
                py,
                format!("server url {url:?}: {e}; use fleetlink://host:port"),
            )
        })?
        .next()
        .ok_or_else(|| invalid(py, format!("server url {url:?} resolves to no address")))?;
    Ok(ServerAddress {
        addr,
        server_name: server_name.to_owned(),
        ca_pem,
    })
}

fn err(e: ClientError) -> PyErr {
    Python::attach(|py| to_py(py, e))
}

/// A connected operator.
#[pyclass(module = "fleetlink._fleetlink", frozen)]
#[derive(Debug)]
pub struct Client {
    op: Arc<OperatorClient>,
}

pub(crate) fn command_json(c: &CommandInfo) -> serde_json::Value {
    c.to_json()
}

fn job_json(j: &JobInfo) -> serde_json::Value {
    j.to_json()
}

fn twin_json(t: &fleetlink_client::Twin) -> serde_json::Value {
    json!({
        "reported": t.reported, "desired": t.desired, "delta": t.delta,
        "reported_version": t.reported_version, "desired_version": t.desired_version,
        "reported_metadata": t.reported_metadata, "desired_metadata": t.desired_metadata,
    })
}

fn device_dict(py: Python<'_>, d: &DeviceInfo) -> PyResult<Py<PyAny>> {
    let out = PyDict::new(py);
    out.set_item("id", d.id.as_str())?;
    out.set_item("tags", d.tags.clone())?;
    out.set_item("attributes", from_json(py, &d.attributes)?)?;
    out.set_item("groups", d.groups.clone())?;
    out.set_item("online", d.presence.online)?;
    let us = |t: i64| (t > 0).then_some(t);
    out.set_item("last_seen_us", us(d.presence.last_seen_us))?;
    out.set_item("since_us", us(d.presence.since_us))?;
    out.set_item(
        "offline_reason",
        (!d.presence.offline_reason.is_empty()).then_some(d.presence.offline_reason.clone()),
    )?;
    out.set_item("remote_addr", d.presence.remote_addr.clone())?;
    let last = PyDict::new(py);
    for (m, _, v) in &d.last_values {
        last.set_item(m.as_str(), value_to_py(py, v)?)?;
    }
    out.set_item("last_values", last)?;
    out.set_item("point_count", d.point_count)?;
    out.set_item("created_us", d.created_us)?;
    Ok(out.into_any().unbind())
}

pub(crate) fn secs(py: Python<'_>, s: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        invalid(
            py,
            format!("{what} must be a number of seconds >= 0, got {s}"),
        )
    })
}

#[pymethods]
impl Client {
    /// Connects and authenticates with an admin token.
    #[staticmethod]
    #[pyo3(signature = (url, token, ca_pem, server_name="localhost", timeout_s=10.0))]
    fn connect(
        py: Python<'_>,
        url: &str,
        token: &str,
        ca_pem: Vec<u8>,
        server_name: &str,
        timeout_s: f64,
    ) -> PyResult<Client> {
        let server = server_address(py, url, ca_pem, server_name)?;
        let token = token.to_owned();
        let timeout = secs(py, timeout_s, "timeout")?;
        let op = wait(py, async move {
            tokio::time::timeout(
                timeout,
                OperatorClient::connect(OperatorConfig { server, token }),
            )
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
        })?
        .map_err(err)?;
        Ok(Client { op: Arc::new(op) })
    }

    /// Devices (all, or those matching `query`), as dicts.
    #[pyo3(signature = (query=None))]
    fn devices(&self, py: Python<'_>, query: Option<String>) -> PyResult<Vec<Py<PyAny>>> {
        let op = self.op.clone();
        let list = wait(py, async move {
            match query {
                None => op.list_devices(None, None).await,
                Some(q) => {
                    let mut all = Vec::new();
                    let mut after = None;
                    loop {
                        let (page, next) = op.query_devices(&q, after.as_ref(), 0).await?;
                        all.extend(page);
                        match next {
                            Some(n) => after = Some(n),
                            None => return Ok(all),
                        }
                    }
                }
            }
        })?
        .map_err(err)?;
        list.iter().map(|d| device_dict(py, d)).collect()
    }

    /// Stored telemetry as an Arrow stream (see `arrow::telemetry_schema`).
    ///
    /// Each device and metric is one query; raw points come as column pages
    /// (`OperatorClient::query_telemetry_columns`) and become record batches without per-row work.
    #[pyo3(signature = (devices=None, metrics=None, start_us=None, end_us=None, every_us=None, agg=None))]
    #[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of Client.telemetry
    fn telemetry(
        &self,
        py: Python<'_>,
        devices: Option<Vec<String>>,
        metrics: Option<Vec<String>>,
        start_us: Option<i64>,
        end_us: Option<i64>,
        every_us: Option<i64>,
        agg: Option<String>,
    ) -> PyResult<ArrowStream> {
        let devices = match devices {
            Some(d) => d
                .iter()
                .map(|s| device_id(py, s))
                .collect::<PyResult<Vec<_>>>()?,
            None => {
                let op = self.op.clone();
                wait(py, async move { op.list_devices(None, None).await })?
                    .map_err(err)?
                    .into_iter()
                    .map(|d| d.id)
                    .collect()
            }
        };
        let metrics: Vec<Option<MetricName>> = match metrics {
            None => vec![None],
            Some(m) => m
                .into_iter()
                .map(|m| {
                    MetricName::new(m.clone())
                        .map(Some)
                        .map_err(|e| invalid(py, format!("metric {m:?}: {e}")))
                })
                .collect::<PyResult<_>>()?,
        };
        if every_us.is_some_and(|e| e <= 0) {
            return Err(invalid(py, "every must be a positive duration"));
        }
        let op = self.op.clone();
        let built = wait(py, async move {
            let mut builder = TelemetryBuilder::new();
            let protocol = |e: arrow_schema::ArrowError| ClientError::Protocol(e.to_string());
            if let Some(every) = every_us {
                // downsampled: a point per bucket, few enough for the row form
                for device in &devices {
                    for metric in &metrics {
                        let q = TelemetryQuery {
                            device: device.clone(),
                            metric: metric.clone(),
                            start_us,
                            end_us,
                            limit: None,
                            every: Some(Duration::from_micros(every.unsigned_abs())),
                            agg: agg.clone(),
                        };
                        for p in op.query_telemetry(q).await? {
                            builder.push(device.as_str(), &p).map_err(protocol)?;
                        }
                    }
                }
                return builder.finish().map_err(protocol);
            }
            // Raw points: column pages, several queries in flight (the server reads and encodes
            // one while this side decodes another).
            let in_flight = Arc::new(tokio::sync::Semaphore::new(QUERIES_IN_FLIGHT));
            let mut queries = Vec::with_capacity(devices.len() * metrics.len());
            for device in &devices {
                for metric in &metrics {
                    let q = TelemetryQuery {
                        device: device.clone(),
                        metric: metric.clone(),
                        start_us,
                        end_us,
                        limit: None,
                        every: None,
                        agg: None,
                    };
                    let op = op.clone();
                    let in_flight = in_flight.clone();
                    let task = tokio::spawn(async move {
                        let _permit = in_flight.acquire_owned().await;
                        op.query_telemetry_columns(q).await
                    });
                    queries.push((device.clone(), AbortOnDrop(task)));
                }
            }
            for (device, mut task) in queries {
                let pages = (&mut task.0)
                    .await
                    .map_err(|e| ClientError::Protocol(format!("telemetry query task: {e}")))??;
                for page in pages {
                    builder
                        .push_columns(device.as_str(), page)
                        .map_err(protocol)?;
                }
            }
            builder.finish().map_err(protocol)
        })?
        .map_err(err)?;
        Ok(built)
    }

    /// The twin of a device: reported, desired, delta and versions.
    fn twin(&self, py: Python<'_>, device: &str) -> PyResult<Py<PyAny>> {
        let id = device_id(py, device)?;
        let op = self.op.clone();
        let t = wait(py, async move { op.twin(&id).await })?.map_err(err)?;
        from_json(py, &twin_json(&t))
    }

    /// Merges `patch_json` into the desired document; `version` = optimistic concurrency.
    #[pyo3(signature = (device, patch_json, version=None))]
    fn set_desired(
        &self,
        py: Python<'_>,
        device: &str,
        patch_json: &str,
        version: Option<u64>,
    ) -> PyResult<Py<PyAny>> {
        let id = device_id(py, device)?;
        let patch: serde_json::Value = serde_json::from_str(patch_json)
            .map_err(|e| invalid(py, format!("patch is not JSON: {e}")))?;
        let op = self.op.clone();
        let t = wait(py, async move { op.set_desired(&id, patch, version).await })?.map_err(err)?;
        from_json(py, &twin_json(&t))
    }

    /// Queues a command; returns it as a dict: once stored, or with `wait_s` once it finished or
    /// `wait_s` passed (one request for waits up to 10 minutes).
    #[pyo3(signature = (device, name, args_json, deadline_s=None, idempotency_key=None, concurrent=false, wait_s=None))]
    #[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of Client.send_command
    fn send_command(
        &self,
        py: Python<'_>,
        device: &str,
        name: &str,
        args_json: &str,
        deadline_s: Option<f64>,
        idempotency_key: Option<String>,
        concurrent: bool,
        wait_s: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let id = device_id(py, device)?;
        let args: serde_json::Value = serde_json::from_str(args_json)
            .map_err(|e| invalid(py, format!("args are not JSON: {e}")))?;
        let mut req = CommandRequest::new(id, name).args(args);
        if let Some(d) = deadline_s {
            req.timeout = Some(secs(py, d, "deadline")?);
        }
        req.idempotency_key = idempotency_key;
        req.concurrent = concurrent;
        let wait_for = wait_s.map(|w| secs(py, w, "timeout")).transpose()?;
        let op = self.op.clone();
        let c = wait(py, async move {
            match wait_for {
                None => op.send_command(req).await,
                Some(t) => op.send_command_and_wait(req, t).await,
            }
        })?
        .map_err(err)?;
        from_json(py, &command_json(&c))
    }

    /// One command as a dict.
    fn get_command(&self, py: Python<'_>, id: u64) -> PyResult<Py<PyAny>> {
        let op = self.op.clone();
        let c = wait(py, async move { op.command(id).await })?.map_err(err)?;
        from_json(py, &command_json(&c))
    }

    /// Waits up to `timeout_s` for a command to finish; returns it either way.
    fn wait_command(&self, py: Python<'_>, id: u64, timeout_s: f64) -> PyResult<Py<PyAny>> {
        let timeout = secs(py, timeout_s, "timeout")?;
        let op = self.op.clone();
        // Long waits are cut into server-side waits of at most 10 minutes.
        let c = wait(py, async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let c = op
                    .wait_command(id, left.min(Duration::from_secs(600)))
                    .await?;
                if c.state.is_terminal() || left <= Duration::from_secs(600) {
                    return Ok::<_, ClientError>(c);
                }
            }
        })?
        .map_err(err)?;
        from_json(py, &command_json(&c))
    }

    /// Cancels an unfinished command.
    fn cancel_command(&self, py: Python<'_>, id: u64) -> PyResult<Py<PyAny>> {
        let op = self.op.clone();
        let c = wait(py, async move { op.cancel_command(id).await })?.map_err(err)?;
        from_json(py, &command_json(&c))
    }

    /// Commands of a device, newest first.
    #[pyo3(signature = (device, state=None, limit=100))]
    fn list_commands(
        &self,
        py: Python<'_>,
        device: &str,
        state: Option<&str>,
        limit: u32,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let id = device_id(py, device)?;
        let state = state
            .map(|s| {
                CommandState::parse(s).ok_or_else(|| {
                    invalid(py, format!("unknown command state {s:?}; use queued, delivered, succeeded, failed, expired, rejected or cancelled"))
                })
            })
            .transpose()?;
        let op = self.op.clone();
        let list = wait(py, async move {
            op.list_commands(&id, state, None, limit).await
        })?
        .map_err(err)?;
        list.iter()
            .map(|c| from_json(py, &command_json(c)))
            .collect()
    }

    /// Creates a device; returns its token.
    #[pyo3(signature = (device_id, tags, attributes_json))]
    fn provision(
        &self,
        py: Python<'_>,
        device_id: &str,
        tags: BTreeMap<String, String>,
        attributes_json: &str,
    ) -> PyResult<String> {
        let id = crate::errors::device_id(py, device_id)?;
        let attributes = match serde_json::from_str(attributes_json) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(invalid(py, "attributes must be a dict")),
        };
        let op = self.op.clone();
        wait(py, async move {
            op.provision_device_with(&id, tags, attributes).await
        })?
        .map_err(err)
    }

    /// Creates up to 1000 devices in one server transaction, all or none; returns their tokens
    /// in order. Each device is (id, tags, attributes as a JSON object).
    fn provision_many(
        &self,
        py: Python<'_>,
        devices: Vec<(String, BTreeMap<String, String>, String)>,
    ) -> PyResult<Vec<String>> {
        let mut specs = Vec::with_capacity(devices.len());
        for (id, tags, attributes_json) in devices {
            let id = crate::errors::device_id(py, &id)?;
            let attributes = match serde_json::from_str(&attributes_json) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(invalid(py, format!("attributes of {id} must be a dict"))),
            };
            specs.push(NewDeviceSpec {
                id,
                tags,
                attributes,
            });
        }
        let op = self.op.clone();
        let provisioned =
            wait(py, async move { op.provision_devices(specs).await })?.map_err(err)?;
        Ok(provisioned.into_iter().map(|(_, token)| token).collect())
    }

    /// Opens a live stream.
    #[pyo3(signature = (stream, query="", metrics=Vec::new(), job_id=0))]
    fn subscribe(
        &self,
        py: Python<'_>,
        stream: &str,
        query: &str,
        metrics: Vec<String>,
        job_id: u64,
    ) -> PyResult<Subscription> {
        let query = query.to_owned();
        let what = match stream {
            "telemetry" => Stream::Telemetry { query, metrics },
            "presence" => Stream::Presence { query },
            "twin" => Stream::Twin { query },
            "commands" => Stream::Commands { query },
            "jobs" => Stream::Jobs { job_id },
            "query" => Stream::Query { query },
            other => {
                return Err(invalid(
                    py,
                    format!(
                        "unknown stream {other:?}; use telemetry, presence, twin, commands, jobs or query"
                    ),
                ));
            }
        };
        let op = self.op.clone();
        let events = wait(py, async move { op.subscribe(what).await })?.map_err(err)?;
        Ok(Subscription {
            events: Arc::new(tokio::sync::Mutex::new(Some(events))),
            closed: tokio::sync::watch::channel(false).0,
        })
    }

    /// Publishes to a topic as an operator.
    #[pyo3(signature = (topic, payload, retain=false))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> PyResult<String> {
        let op = self.op.clone();
        let topic = topic.to_owned();
        wait(py, async move { op.publish(&topic, payload, retain).await })?.map_err(err)
    }

    /// Creates a job; returns its progress.
    #[pyo3(signature = (query, name, command=None, args_json="null", timeout_s=None, desired_json=None, max_in_flight=0, max_per_minute=0, abort_failure_ratio=0.0, abort_min_finished=0))]
    #[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of Client.create_job
    fn create_job(
        &self,
        py: Python<'_>,
        query: &str,
        name: &str,
        command: Option<String>,
        args_json: &str,
        timeout_s: Option<f64>,
        desired_json: Option<&str>,
        max_in_flight: u32,
        max_per_minute: u32,
        abort_failure_ratio: f64,
        abort_min_finished: u32,
    ) -> PyResult<Py<PyAny>> {
        let action = match (command, desired_json) {
            (Some(name), None) => JobAction::Command {
                name,
                args: serde_json::from_str(args_json)
                    .map_err(|e| invalid(py, format!("args are not JSON: {e}")))?,
                timeout: timeout_s.map(|t| secs(py, t, "timeout")).transpose()?,
            },
            (None, Some(patch)) => JobAction::Desired(
                serde_json::from_str(patch)
                    .map_err(|e| invalid(py, format!("desired patch is not JSON: {e}")))?,
            ),
            _ => return Err(invalid(py, "give a command or a desired patch, not both")),
        };
        let mut spec = JobSpec::new(name, query, action);
        spec.max_in_flight = max_in_flight;
        spec.max_per_minute = max_per_minute;
        spec.abort_failure_ratio = abort_failure_ratio;
        spec.abort_min_finished = abort_min_finished;
        let op = self.op.clone();
        let j = wait(py, async move { op.create_job(spec).await })?.map_err(err)?;
        from_json(py, &job_json(&j))
    }

    /// A job's progress.
    fn job(&self, py: Python<'_>, id: u64) -> PyResult<Py<PyAny>> {
        let op = self.op.clone();
        let j = wait(py, async move { op.job(id).await })?.map_err(err)?;
        from_json(py, &job_json(&j))
    }

    /// Cancels a running job.
    fn cancel_job(&self, py: Python<'_>, id: u64) -> PyResult<Py<PyAny>> {
        let op = self.op.clone();
        let j = wait(py, async move { op.cancel_job(id).await })?.map_err(err)?;
        from_json(py, &job_json(&j))
    }

    /// Jobs, newest first.
    fn jobs(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let op = self.op.clone();
        let list = wait(py, async move { op.jobs(0).await })?.map_err(err)?;
        list.iter().map(|j| from_json(py, &job_json(j))).collect()
    }

    /// Creates or replaces a group (static with members, or dynamic with a query).
    #[pyo3(signature = (name, members=Vec::new(), query=None))]
    fn put_group(
        &self,
        py: Python<'_>,
        name: &str,
        members: Vec<String>,
        query: Option<String>,
    ) -> PyResult<()> {
        let members = members
            .iter()
            .map(|m| device_id(py, m))
            .collect::<PyResult<Vec<_>>>()?;
        let op = self.op.clone();
        let name = name.to_owned();
        wait(py, async move {
            op.put_group(&name, members, query.as_deref()).await
        })?
        .map_err(err)?;
        Ok(())
    }

    /// Closes the connection.
    fn close(&self) {
        self.op.close();
    }
}

/// A live stream; `next(timeout)` returns the next event as a dict, or None at its end.
#[pyclass(module = "fleetlink._fleetlink", frozen)]
#[derive(Debug)]
pub struct Subscription {
    events: Arc<tokio::sync::Mutex<Option<EventStream>>>,
    /// Set by `close`: a `next` waiting in another thread returns None at once.
    closed: tokio::sync::watch::Sender<bool>,
}

fn event_json(e: FleetEvent) -> serde_json::Value {
    match e {
        FleetEvent::Subscribed { initial_matches } => {
            json!({"event": "subscribed", "initial_matches": initial_matches})
        }
        FleetEvent::Overflow { dropped } => json!({"event": "overflow", "dropped": dropped}),
        FleetEvent::Telemetry { device, points } => json!({
            "event": "telemetry", "device": device,
            "points": points.iter().map(|p| json!({
                "metric": p.metric.as_str(), "time_us": p.time_us,
                "value": match &p.value {
                    fleetlink_client::Value::Double(x) => json!(x),
                    fleetlink_client::Value::Int(x) => json!(x),
                    fleetlink_client::Value::Bool(x) => json!(x),
                    fleetlink_client::Value::String(s) => json!(s),
                    fleetlink_client::Value::Geo(g) => json!({"lat": g.lat, "lon": g.lon}),
                },
            })).collect::<Vec<_>>(),
        }),
        FleetEvent::Presence { device, event } => json!({
            "event": "presence", "device": device, "online": event.online,
            "reason": event.reason, "at_us": event.at_us,
        }),
        FleetEvent::Twin {
            device,
            side,
            version,
            doc,
            delta,
        } => json!({
            "event": "twin", "device": device, "side": side, "version": version,
            "doc": doc, "delta": delta,
        }),
        FleetEvent::Command(c) => {
            let mut v = command_json(&c);
            v["event"] = json!("command");
            v
        }
        FleetEvent::Job(j) => {
            let mut v = job_json(&j);
            v["event"] = json!("job");
            v
        }
        FleetEvent::Match {
            device,
            matches,
            initial,
        } => json!({
            "event": if matches { "enter" } else { "leave" }, "device": device, "initial": initial,
        }),
    }
}

#[pymethods]
impl Subscription {
    /// The next event (a dict with an "event" key), None when the stream ended; raises
    /// `fleetlink.errors.Timeout` after `timeout_s` seconds without one.
    #[pyo3(signature = (timeout_s=None))]
    fn next(&self, py: Python<'_>, timeout_s: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        let timeout = timeout_s.map(|t| secs(py, t, "timeout")).transpose()?;
        let events = self.events.clone();
        let mut closed = self.closed.subscribe();
        let next = wait(py, async move {
            let read = async {
                let mut guard = events.lock().await;
                let Some(stream) = guard.as_mut() else {
                    return Ok(None);
                };
                match timeout {
                    Some(t) => stream.next_within(t).await,
                    None => stream.next().await,
                }
            };
            tokio::select! {
                r = read => r,
                _ = closed.wait_for(|c| *c) => Ok(None),
            }
        })?
        .map_err(err)?;
        next.map(|e| from_json(py, &event_json(e))).transpose()
    }

    /// Ends the stream.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.closed.send_replace(true); // wakes a `next` blocked in another thread
        let events = self.events.clone();
        wait(py, async move {
            events.lock().await.take();
        })
    }
}
