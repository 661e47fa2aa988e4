//! Light idle devices: the device protocol spoken directly (QUIC, control stream, Hello, then a
//! heartbeat every `Welcome.heartbeat_interval_ms`), with none of the SDK's buffers, command
//! runner or per-client TLS configuration. A full SDK client costs the load generator ~150 KB,
//! so 100k of them do not fit beside the server on this machine; these cost what their QUIC
//! connection costs, the same as the raw quinn sink's idle clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use fleetlink_client::ServerAddress;
use fleetlink_proto::v1::{self, ClientControl, ServerControl, client_control, server_control};
use fleetlink_proto::{HANDSHAKE_MAX_FRAME_BYTES, PROTOCOL_VERSION};
use fleetlink_transport::{FrameReader, client_config, roots_from_pem, write_frame};

use crate::fleet::{device_id, token};
use crate::load::{connect_ramp, endpoints_for};

/// Connected light devices; they heartbeat until dropped.
pub struct LightFleet {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lost: Arc<AtomicU64>,
}

impl LightFleet {
    /// Devices whose session ended (closed by the server, heartbeat timeout, connection lost).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for LightFleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Connects bench devices `0..n` (provisioned by `serve-fleetlink`) over several endpoints, at
/// most [`crate::load::CONNECT_CONCURRENCY`] handshakes at a time.
pub async fn connect(server: &ServerAddress, n: usize) -> Result<LightFleet> {
    // the SDK's device transport, for a device sending no telemetry
    let transport = fleetlink_client::device_transport(
        fleetlink_client::Resumption::default(),
        fleetlink_client::DEVICE_ACK_DELAY,
        Duration::ZERO,
        1,
    );
    let config = client_config(roots_from_pem(&server.ca_pem)?, &transport)?;
    let endpoints: Vec<quinn::Endpoint> = endpoints_for(n)
        .map(|_| {
            let mut e = fleetlink_transport::client_endpoint(server.addr)?;
            e.set_default_client_config(config.clone());
            anyhow::Ok(e)
        })
        .collect::<Result<_>>()?;
    let (addr, name) = (server.addr, server.server_name.clone());
    let lost = Arc::new(AtomicU64::new(0));
    let counter = lost.clone();
    let tasks = connect_ramp(n, move |i| {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let name = name.clone();
        let lost = counter.clone();
        async move {
            let conn = endpoint.connect(addr, &name)?.await?;
            let (mut send, recv) = conn.open_bi().await?;
            let hello = v1::Hello {
                protocol_version: PROTOCOL_VERSION,
                role: v1::Role::Device.into(),
                device_id: device_id(i).to_string(),
                token: token(i).as_str().to_owned(),
                client_name: "fleetlink-bench light device".into(),
                early_command_fin: false, // it runs no commands
                ..Default::default()      // and sends no telemetry
            };
            let hello = ClientControl {
                msg: Some(client_control::Msg::Hello(hello)),
            };
            write_frame(&mut send, &hello).await?;
            let mut reader = FrameReader::new(recv, HANDSHAKE_MAX_FRAME_BYTES);
            match reader.read::<ServerControl>().await?.and_then(|f| f.msg) {
                Some(server_control::Msg::Welcome(w)) => {
                    reader.set_max_frame_bytes(w.max_frame_bytes);
                    let every = Duration::from_millis(u64::from(w.heartbeat_interval_ms));
                    // Heartbeats start with the session, not once the whole fleet is connected:
                    // 50k devices take ~45 s to connect, longer than the heartbeat timeout, and
                    // the first ones were timed out while they waited (30k "errors" at 50k).
                    Ok(tokio::spawn(async move {
                        heartbeat(send, reader, every).await;
                        lost.fetch_add(1, Ordering::Relaxed);
                        drop(conn);
                    }))
                }
                other => bail!("light device {i}: expected a Welcome, got {other:?}"),
            }
        }
    })
    .await?;
    Ok(LightFleet { tasks, lost })
}

/// Sends a heartbeat every `every` and reads (and drops) what the server sends, until the
/// session ends.
async fn heartbeat(mut send: quinn::SendStream, mut reader: FrameReader, every: Duration) {
    let beat = ClientControl {
        msg: Some(client_control::Msg::Heartbeat(v1::Heartbeat {
            time_us: 0,
            no_answer: true, // as the SDK's
            ack_through: 0,
        })),
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if write_frame(&mut send, &beat).await.is_err() {
                    return;
                }
            }
            // FrameReader::read is cancel safe: a partial frame stays in its decoder.
            frame = reader.read::<ServerControl>() => match frame {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
        }
    }
}
