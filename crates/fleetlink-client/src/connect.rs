//! Opening a session: QUIC connect, control stream, Hello, then Welcome or Reject.

use std::sync::Arc;

use fleetlink_proto::v1::{
    self, ClientControl, Hello, ServerControl, client_control, server_control,
};
use fleetlink_proto::{HANDSHAKE_MAX_FRAME_BYTES, PROTOCOL_VERSION};
use fleetlink_transport::{
    ClientTransport, FrameReader, client_config, client_endpoint, roots_from_pem, write_frame,
};

use crate::{ClientError, ServerAddress};

/// A QUIC client endpoint (one UDP socket) that many clients can share, so a simulator with
/// thousands of devices does not need thousands of sockets.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: Arc<quinn::Endpoint>,
}

impl Endpoint {
    /// A new endpoint on an ephemeral port, able to reach `server`.
    pub fn for_server(server: std::net::SocketAddr) -> Result<Self, ClientError> {
        let ep = client_endpoint(server)
            .map_err(|e| ClientError::Connection(format!("cannot open a UDP socket: {e}")))?;
        Ok(Self {
            inner: Arc::new(ep),
        })
    }

    pub(crate) fn quinn(&self) -> &quinn::Endpoint {
        &self.inner
    }
}

/// An established session.
pub(crate) struct Session {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub reader: FrameReader,
    pub welcome: v1::Welcome,
    /// The Hello went in 0-RTT and the server accepted it.
    pub zero_rtt: bool,
}

/// The QUIC and TLS configuration of connections to `server`. A client builds it once and
/// reuses it for every reconnect (parsing the CA and building a TLS config per attempt costs
/// a storm of reconnecting devices CPU).
pub(crate) fn quic_config(
    server: &ServerAddress,
    transport: &ClientTransport,
) -> Result<quinn::ClientConfig, ClientError> {
    Ok(client_config(roots_from_pem(&server.ca_pem)?, transport)?)
}

pub(crate) async fn open_session(
    endpoint: &Endpoint,
    server: &ServerAddress,
    config: &quinn::ClientConfig,
    hello: Hello,
) -> Result<Session, ClientError> {
    let connecting = endpoint
        .quinn()
        .connect_with(config.clone(), server.addr, &server.server_name)
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    // 0-RTT is possible when the configuration asks for it (`Resumption::ZeroRtt`) and the
    // server gave us a ticket on an earlier connection.
    match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            let (send, recv) = send_hello(&conn, &hello).await?;
            let accepted = accepted.await;
            tracing::debug!(accepted, "Hello sent in 0-RTT");
            if accepted {
                return welcome(conn, send, recv, true).await;
            }
            // The server turned 0-RTT down (it lost its sessions in a crash, say) and quinn dropped what
            // was sent in it: the handshake is done now, so say Hello again in 1-RTT.
            let (send, recv) = send_hello(&conn, &hello).await?;
            welcome(conn, send, recv, false).await
        }
        Err(connecting) => {
            tracing::debug!("no 0-RTT");
            let conn = connecting.await?;
            let (send, recv) = send_hello(&conn, &hello).await?;
            welcome(conn, send, recv, false).await
        }
    }
}

async fn send_hello(
    conn: &quinn::Connection,
    hello: &Hello,
) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(
        &mut send,
        &ClientControl {
            msg: Some(client_control::Msg::Hello(hello.clone())),
        },
    )
    .await?;
    Ok((send, recv))
}

/// Reads the server's answer to the Hello.
async fn welcome(
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    zero_rtt: bool,
) -> Result<Session, ClientError> {
    let mut reader = FrameReader::new(recv, HANDSHAKE_MAX_FRAME_BYTES);
    let first = match reader.read::<ServerControl>().await {
        Ok(f) => f,
        Err(e) => return Err(e.into()),
    };
    match first.and_then(|f| f.msg) {
        Some(server_control::Msg::Welcome(welcome)) => {
            reader.set_max_frame_bytes(welcome.max_frame_bytes);
            Ok(Session {
                conn,
                send,
                reader,
                welcome,
                zero_rtt,
            })
        }
        Some(server_control::Msg::Reject(r)) => {
            conn.close(0u32.into(), b"rejected");
            Err(ClientError::Rejected {
                reason: v1::RejectReason::try_from(r.reason)
                    .unwrap_or(v1::RejectReason::Unspecified),
                message: r.message,
                retry_after_ms: r.retry_after_ms,
            })
        }
        Some(other) => Err(ClientError::Protocol(format!(
            "expected a Welcome or Reject, got {other:?}"
        ))),
        None => Err(ClientError::Protocol(
            "the server closed the control stream without a Welcome".into(),
        )),
    }
}

/// A heartbeat for the control stream that asks for no answer: the server's QUIC ACK of it is
/// all that comes back (protocol §6). Devices and operators send the same.
pub(crate) fn quiet_heartbeat() -> v1::ClientControl {
    v1::ClientControl {
        msg: Some(v1::client_control::Msg::Heartbeat(v1::Heartbeat {
            time_us: crate::now_us(),
            no_answer: true,
            ack_through: 0,
        })),
    }
}

/// A device's heartbeat asking the server to ack every batch up to `seq` as soon as it is
/// stored, without holding the ack (ack coalescing, protocol §5); the server answers it.
pub(crate) fn ack_request(seq: u64) -> v1::ClientControl {
    v1::ClientControl {
        msg: Some(v1::client_control::Msg::Heartbeat(v1::Heartbeat {
            time_us: crate::now_us(),
            no_answer: false,
            ack_through: seq,
        })),
    }
}

pub(crate) fn hello(role: v1::Role, device_id: &str, token: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        role: role.into(),
        device_id: device_id.to_owned(),
        token: token.to_owned(),
        client_name: concat!("fleetlink-rust/", env!("CARGO_PKG_VERSION")).to_owned(),
        // the command runner reads past the server's FIN and watches for STOP_SENDING
        early_command_fin: role == v1::Role::Device,
        ..Default::default()
    }
}
