//! The transport layer shared by the server and the SDK: length-prefixed protobuf frames on quinn
//! streams, and the TLS/QUIC client configuration. Nothing here knows what a device is.

use std::sync::Arc;
use std::time::Duration;

use fleetlink_proto::{FrameDecoder, FrameError, encoded_frame};
use prost::Message;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A failure below the fleetlink protocol.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A frame could not be decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading a stream failed.
    #[error("reading a stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a stream failed.
    #[error("writing a stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Establishing a connection failed.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The TLS configuration is unusable.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Reads frames from a receive stream, never buffering more than one maximum-size frame.
#[derive(Debug)]
pub struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    /// A reader that refuses frames above `max_frame_bytes`.
    pub fn new(stream: quinn::RecvStream, max_frame_bytes: u32) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(max_frame_bytes),
        }
    }

    /// Changes the frame size limit.
    pub fn set_max_frame_bytes(&mut self, max: u32) {
        self.decoder.set_max_frame_bytes(max);
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn read<M: Message + Default>(&mut self) -> Result<Option<M>, TransportError> {
        loop {
            if let Some(m) = self.decoder.next_message::<M>()? {
                return Ok(Some(m));
            }
            match self.stream.read_chunk(64 * 1024, true).await? {
                Some(chunk) => self.decoder.extend(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Lets go of the stream, and tells whether the peer had finished it with nothing left to
    /// read. Only then does it end quietly; otherwise the peer is asked to stop sending
    /// (STOP_SENDING code 0, what dropping a quinn `RecvStream` does). Closing a stream whose FIN
    /// came with its last frame this way spares a packet: dropping it unread sends a STOP_SENDING,
    /// which is ack-eliciting and goes out on its own right after the frame was read.
    pub fn close(mut self) -> bool {
        self.finished()
    }

    /// Whether the peer has finished the stream with nothing left to read: one poll, never a
    /// wait (a FIN that has not arrived yet counts as not finished).
    pub fn finished(&mut self) -> bool {
        use std::future::Future as _;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let ended = std::pin::pin!(self.stream.read_chunk(1, true)).poll(&mut cx);
        matches!(ended, std::task::Poll::Ready(Ok(None))) && self.decoder.finish().is_ok()
    }

    /// The underlying stream (to stop it).
    pub fn stream_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }
}

/// Writes one frame holding `msg`.
pub async fn write_frame<M: Message>(
    stream: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), TransportError> {
    stream.write_chunk(encoded_frame(msg)).await?;
    Ok(())
}

/// Client-side QUIC settings.
#[derive(Debug, Clone)]
pub struct ClientTransport {
    /// Send QUIC PINGs this often to keep an otherwise idle connection open (operators); devices
    /// rely on their protocol heartbeats instead.
    pub keep_alive: Option<Duration>,
    /// Close the connection after this much silence from the server.
    pub idle_timeout: Duration,
    /// Whether reconnects resume the TLS session.
    pub resumption: Resumption,
    /// Ask the server to hold its acknowledgements of our packets up to this long (see
    /// [`ack_frequency`]); `None` = QUIC's default (25 ms).
    pub ack_delay: Option<Duration>,
    /// With `ack_delay`: how many ack-eliciting packets the server may receive before it must
    /// acknowledge them at once (QUIC's default, 1, acknowledges every second packet).
    pub ack_threshold: u32,
}

impl Default for ClientTransport {
    fn default() -> Self {
        Self {
            keep_alive: None,
            idle_timeout: Duration::from_secs(60),
            resumption: Resumption::default(),
            ack_delay: None,
            ack_threshold: 1,
        }
    }
}

impl ClientTransport {
    /// The ACK frequency request of `ack_delay` (capped at [`MAX_ACK_DELAY`]) and
    /// `ack_threshold`; `None` without one.
    pub fn ack_frequency(&self) -> Option<quinn::AckFrequencyConfig> {
        let delay = self.ack_delay.filter(|d| !d.is_zero())?;
        Some(ack_frequency(delay.min(MAX_ACK_DELAY), self.ack_threshold))
    }
}

/// The longest either side of a fleetlink connection may ask its peer to hold an ACK.
pub const MAX_ACK_DELAY: Duration = Duration::from_secs(10);

/// How long a device asks the server to hold its ACKs by default: longer than the server usually
/// takes to store a batch and ack it (tens of milliseconds under load), so the ACK of a device's
/// packet rides in that reply instead of a packet of its own; short enough that a lost message
/// nothing else follows is resent within a quarter of a second or so (the device's probe timeout
/// includes it).
pub const DEVICE_ACK_DELAY: Duration = Duration::from_millis(250);

/// The QUIC ACK frequency extension's request (an `ACK_FREQUENCY` frame, sent right after the
/// handshake if the peer advertises `min_ack_delay`, as quinn does): the peer may hold its ACKs up
/// to `delay`. It still acknowledges at once once more than `threshold` ack-eliciting packets
/// are unacknowledged (QUIC's default threshold, 1: every second packet), so bulk transfers keep
/// their pace, and any packet out of order (reordering threshold 1), so a loss followed by
/// another packet is repaired without waiting.
/// `max_ack_delay_above_rtt` is our quinn-proto patch: upstream caps the delay at the round trip
/// or 25 ms (crates/quinn-proto/FLEETLINK-PATCH.md). Our own probe timeout then includes `delay`:
/// a lost packet that no later packet reveals is resent up to that much later.
pub fn ack_frequency(delay: Duration, threshold: u32) -> quinn::AckFrequencyConfig {
    let mut config = quinn::AckFrequencyConfig::default();
    config
        .ack_eliciting_threshold(threshold.into())
        .max_ack_delay(Some(delay))
        .max_ack_delay_above_rtt(true)
        .reordering_threshold(1u32.into());
    config
}

/// TLS 1.3 session resumption when a client connects again to a server it connected to before
/// (the server's sessions outlive its graceful restarts: docs/protocol.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resumption {
    /// Every connection does a full handshake (certificate signature and chain verification).
    Off,
    /// A reconnect resumes the session from the server's last ticket: no certificate signature
    /// or verification, still an ECDHE exchange, so the traffic stays forward secret.
    #[default]
    Tickets,
    /// As `Tickets`, and the first flight already carries the Hello (0-RTT): the session is
    /// ready one round trip sooner. 0-RTT data is encrypted with a key derived from the ticket
    /// alone, so the Hello (and its token) is not forward secret: whoever records it and later
    /// steals that session from the server can read it. Replays are harmless: each session
    /// resumes once, and the server reads nothing before the handshake has completed.
    ZeroRtt,
}

/// Root certificates from a PEM file's contents (the server's CA).
pub fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| TransportError::Tls(format!("invalid CA certificate PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TransportError::Tls(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TransportError::Tls(
            "the CA file holds no PEM certificate".into(),
        ));
    }
    Ok(roots)
}

/// The TLS provider of both ends: ring, with TLS 1.3's AES-128-GCM/SHA-256 suite first.
///
/// ring's default puts AES-256-GCM/SHA-384 first. Its SHA-384 has no hardware path on x86-64
/// (SHA-256 uses the SHA extensions), and in a reconnect storm that hash alone took 4% of the
/// server's CPU (the key schedule, the Finished messages, each resumption's binder). AES-128-GCM
/// is the suite QUIC protects every Initial packet with anyway, and TLS 1.3's mandatory one.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A quinn client configuration: TLS 1.3 with [`crypto_provider`], trusting `roots`, fleetlink's ALPN.
pub fn client_config(
    roots: rustls::RootCertStore,
    transport: &ClientTransport,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![fleetlink_proto::ALPN.to_vec()];
    match transport.resumption {
        Resumption::Off => tls.resumption = rustls::client::Resumption::disabled(),
        Resumption::Tickets => {} // rustls keeps the last tickets of 256 servers in memory
        Resumption::ZeroRtt => tls.enable_early_data = true,
    }
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(transport.keep_alive);
    t.max_idle_timeout(Some(
        transport
            .idle_timeout
            .try_into()
            .map_err(|_| TransportError::Tls("idle timeout too large".into()))?,
    ));
    t.ack_frequency_config(transport.ack_frequency());
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// Socket buffers of every fleetlink UDP socket (the kernel caps them at `net.core.rmem_max` and
/// `wmem_max`). A server accepting a storm of reconnecting devices, or a simulator whose devices
/// share one socket, receives handshake packets in bursts; the kernel's default (~200 KB)
/// dropped some, and every dropped Initial costs its handshake a retransmission timeout.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER_BYTES`] buffers.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // [::] accepts IPv4 too, as quinn's own sockets do
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer than asked for is not an error.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A quinn server endpoint on `addr`, with [`udp_socket`]'s buffers.
pub fn server_endpoint(
    config: quinn::ServerConfig,
    addr: std::net::SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Bytes of a stateless-reset key (see [`server_endpoint_with_reset_key`]).
pub const RESET_KEY_BYTES: usize = 32;

/// A quinn server endpoint like [`server_endpoint`], whose connection IDs and stateless-reset
/// tokens derive from `reset_key` instead of keys drawn for this endpoint alone: the connection
/// IDs carry a keyed checksum, and a connection ID's reset token is its HMAC-SHA256. A server
/// restarted with the same key (kept secret, in its data dir) recognises packets of the previous
/// server's connections as its own and answers each with a stateless reset (RFC 9000 §10.3),
/// which ends the connection at once on the client: a client that missed the previous server's
/// close then reconnects on its next packet instead of after the idle timeout. Resets are not
/// rate-limited beyond one per 50 µs (a reset is always smaller than the packet that prompted
/// it, so it cannot amplify).
pub fn server_endpoint_with_reset_key(
    config: quinn::ServerConfig,
    addr: std::net::SocketAddr,
    reset_key: &[u8; RESET_KEY_BYTES],
) -> std::io::Result<quinn::Endpoint> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    // quinn drops a short-header packet whose connection ID fails its generator's checksum
    // before it would reset it, so the checksum's key must outlive the server too
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(
        &ring::hmac::sign(&key, b"fleetlink connection id checksum").as_ref()[..8],
    );
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // quinn's default (one reset per 20 ms) would take minutes over 10k stale connections
    endpoint_config.min_reset_interval(std::time::Duration::from_micros(50));
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        udp_socket(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A client endpoint on an ephemeral local port, of the address family of `server`, with
/// [`udp_socket`]'s buffers.
pub fn client_endpoint(server: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: std::net::SocketAddr = if server.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .map_err(std::io::Error::other)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}
