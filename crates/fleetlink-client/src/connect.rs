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
    let conn = connecting.await?;
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(
        &mut send,
        &ClientControl {
            msg: Some(client_control::Msg::Hello(hello)),
        },
    )
    .await?;
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

pub(crate) fn hello(role: v1::Role, device_id: &str, token: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        role: role.into(),
        device_id: device_id.to_owned(),
        token: token.to_owned(),
        client_name: concat!("fleetlink-rust/", env!("CARGO_PKG_VERSION")).to_owned(),
    }
}
