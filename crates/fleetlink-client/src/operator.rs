//! `OperatorClient`: list devices, read telemetry, provision devices.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetlink_core::{DeviceId, MetricName, Value};
use fleetlink_proto::v1::{
    self, ErrorCode, OperatorRequest, OperatorResponse, operator_request, operator_response,
};
use fleetlink_transport::{ClientTransport, FrameReader, write_frame};

use crate::connect::{Endpoint, hello, open_session};
use crate::{ClientError, ServerAddress};

/// How an operator connects.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The server.
    pub server: ServerAddress,
    /// An admin token.
    pub token: String,
}

/// Presence of a device as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceInfo {
    /// Connected now.
    pub online: bool,
    /// Since when the current state holds (µs since the epoch; 0 = not seen since the server started).
    pub since_us: i64,
    /// Last frame from the device (µs since the epoch; 0 = never).
    pub last_seen_us: i64,
    /// Address of the current or last connection.
    pub remote_addr: String,
    /// Why it is offline ("closed", "timeout", "error", "server_shutdown"), empty if online or unknown.
    pub offline_reason: String,
}

/// A device with its presence and last values.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Its id.
    pub id: DeviceId,
    /// Presence.
    pub presence: PresenceInfo,
    /// Latest value per metric: (metric, device time µs, value), by metric name.
    pub last_values: Vec<(MetricName, i64, Value)>,
    /// Highest telemetry batch stored.
    pub last_stored_seq: u64,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// When it was provisioned (µs since the epoch).
    pub created_us: i64,
    /// Points durably stored.
    pub point_count: u64,
}

/// A stored point.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoint {
    /// Which metric.
    pub metric: MetricName,
    /// Device clock, µs since the epoch.
    pub time_us: i64,
    /// Server clock when the batch arrived.
    pub received_us: i64,
    /// The batch it came in.
    pub seq: u64,
    /// The value.
    pub value: Value,
}

/// Which telemetry to read.
#[derive(Debug, Clone)]
pub struct TelemetryQuery {
    /// Whose.
    pub device: DeviceId,
    /// Only this metric.
    pub metric: Option<MetricName>,
    /// Inclusive lower bound, µs since the epoch.
    pub start_us: Option<i64>,
    /// Exclusive upper bound, µs since the epoch.
    pub end_us: Option<i64>,
    /// At most this many points.
    pub limit: Option<u32>,
}

impl TelemetryQuery {
    /// Every point of `device`.
    pub fn all(device: DeviceId) -> Self {
        Self {
            device,
            metric: None,
            start_us: None,
            end_us: None,
            limit: None,
        }
    }
}

/// An operator session.
#[derive(Debug)]
pub struct OperatorClient {
    conn: quinn::Connection,
    _control: quinn::SendStream,
    _endpoint: Endpoint,
}

impl OperatorClient {
    /// Connects and authenticates with an admin token.
    pub async fn connect(config: OperatorConfig) -> Result<Self, ClientError> {
        let endpoint = Endpoint::for_server(config.server.addr)?;
        let transport = ClientTransport {
            keep_alive: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let session = open_session(
            &endpoint,
            &config.server,
            &transport,
            hello(v1::Role::Operator, "", &config.token),
        )
        .await?;
        Ok(Self {
            conn: session.conn,
            _control: session.send,
            _endpoint: endpoint,
        })
    }

    async fn request(
        &self,
        request: operator_request::Request,
    ) -> Result<Vec<operator_response::Response>, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &OperatorRequest {
                request: Some(request),
            },
        )
        .await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, u32::MAX >> 4);
        let mut out = Vec::new();
        while let Some(OperatorResponse { response }) = reader.read::<OperatorResponse>().await? {
            match response {
                Some(operator_response::Response::Error(e)) => {
                    return Err(ClientError::Server {
                        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                        message: e.message,
                    });
                }
                Some(r) => out.push(r),
                None => return Err(ClientError::Protocol("an empty OperatorResponse".into())),
            }
        }
        Ok(out)
    }

    /// Devices in id order, with presence and last values. `after` and `limit` page through them.
    pub async fn list_devices(
        &self,
        after: Option<&DeviceId>,
        limit: Option<u32>,
    ) -> Result<Vec<DeviceInfo>, ClientError> {
        let req = v1::ListDevices {
            after: after.map(|a| a.to_string()).unwrap_or_default(),
            limit: limit.unwrap_or(0),
        };
        let mut out = Vec::new();
        for r in self
            .request(operator_request::Request::ListDevices(req))
            .await?
        {
            match r {
                operator_response::Response::Devices(page) => {
                    for d in page.devices {
                        out.push(device_info(d)?);
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// One device.
    pub async fn device(&self, id: &DeviceId) -> Result<DeviceInfo, ClientError> {
        let req = v1::GetDevice {
            device_id: id.to_string(),
        };
        match self
            .request(operator_request::Request::GetDevice(req))
            .await?
            .pop()
        {
            Some(operator_response::Response::Device(d)) => device_info(d),
            Some(other) => Err(unexpected(&other)),
            None => Err(ClientError::Protocol("no response to GetDevice".into())),
        }
    }

    /// Stored points: grouped by metric (in the order the server first stored each), then by time.
    pub async fn query_telemetry(
        &self,
        q: TelemetryQuery,
    ) -> Result<Vec<StoredPoint>, ClientError> {
        let req = v1::QueryTelemetry {
            device_id: q.device.to_string(),
            metric: q.metric.map(|m| m.to_string()).unwrap_or_default(),
            start_us: q.start_us.unwrap_or(0),
            end_us: q.end_us.unwrap_or(0),
            limit: q.limit.unwrap_or(0),
        };
        let mut out = Vec::new();
        for r in self
            .request(operator_request::Request::QueryTelemetry(req))
            .await?
        {
            match r {
                operator_response::Response::Telemetry(page) => {
                    for p in page.points {
                        out.push(StoredPoint {
                            metric: metric(p.metric)?,
                            time_us: p.time_us,
                            received_us: p.received_us,
                            seq: p.seq,
                            value: value(p.value)?,
                        });
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// Creates a device; returns its token (shown once: the server keeps only a hash).
    pub async fn provision_device(
        &self,
        id: &DeviceId,
        tags: BTreeMap<String, String>,
    ) -> Result<String, ClientError> {
        let req = v1::ProvisionDevice {
            device_id: id.to_string(),
            tags: tags.into_iter().collect(),
        };
        match self
            .request(operator_request::Request::ProvisionDevice(req))
            .await?
            .pop()
        {
            Some(operator_response::Response::Provisioned(p)) => Ok(p.token),
            Some(other) => Err(unexpected(&other)),
            None => Err(ClientError::Protocol(
                "no response to ProvisionDevice".into(),
            )),
        }
    }

    /// Closes the session.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"operator closing");
    }
}

fn unexpected(r: &operator_response::Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

fn metric(s: String) -> Result<MetricName, ClientError> {
    MetricName::new(s).map_err(|e| ClientError::Protocol(e.to_string()))
}

fn value(v: Option<v1::Value>) -> Result<Value, ClientError> {
    Value::from_proto(v, 0, "").map_err(|e| ClientError::Protocol(e.to_string()))
}

fn device_info(d: v1::DeviceInfo) -> Result<DeviceInfo, ClientError> {
    let p = d.presence.unwrap_or_default();
    Ok(DeviceInfo {
        id: DeviceId::new(d.device_id).map_err(|e| ClientError::Protocol(e.to_string()))?,
        presence: PresenceInfo {
            online: p.online,
            since_us: p.since_us,
            last_seen_us: p.last_seen_us,
            remote_addr: p.remote_addr,
            offline_reason: p.offline_reason,
        },
        last_values: d
            .last_values
            .into_iter()
            .map(|v| Ok((metric(v.metric)?, v.time_us, value(v.value)?)))
            .collect::<Result<_, ClientError>>()?,
        last_stored_seq: d.last_stored_seq,
        tags: d.tags.into_iter().collect(),
        created_us: d.created_us,
        point_count: d.point_count,
    })
}
