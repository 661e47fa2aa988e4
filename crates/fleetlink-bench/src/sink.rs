//! The raw quinn sink: the same QUIC and TLS as fleetlink, with no actors, no protobuf and no
//! storage, to show what our own layers cost. Default transport configuration.
//!
//! Coalescing ([`Coalesce`], `serve-quinn-sink --coalesce N`) makes it send the packets fleetlink
//! sends for a slow device: an ack per `N` messages, the QUIC ACKs held to ride in it on both
//! sides (fleetlink's transport settings), so that its cost per message is what QUIC alone costs
//! at fleetlink's packets per message: the floor under fleetlink's figure.
//!
//! A client opens bidirectional streams whose first byte says what they are:
//! - [`TELEMETRY`]: fixed-size messages; after each chunk read the sink writes back the count of
//!   whole messages received so far on that stream (8 bytes, little endian): the "ack".
//! - [`REGISTER`] + u32 index: this connection is device `index` (for requests).
//! - [`REQUEST`] + u32 index + payload: relayed to device `index` on a new stream; the device's
//!   answer is relayed back. The same topology as a fleetlink command, without the fleetlink.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

pub const TELEMETRY: u8 = 1;
pub const REGISTER: u8 = 2;
pub const REQUEST: u8 = 3;

/// What the sink prints when it listens (`READY <json>`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub addr: std::net::SocketAddr,
    pub ca_pem: String,
}

/// Acks coalesced as fleetlink coalesces them for a slow device (0 = ack after every chunk read,
/// with QUIC's default ACK timing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Coalesce(pub u32);

impl Coalesce {
    /// As fleetlink's device SDK by default ([`fleetlink_client::DEVICE_TELEMETRY_ACK_BATCHES`]).
    pub const FLEETLINK: Coalesce = Coalesce(fleetlink_client::DEVICE_TELEMETRY_ACK_BATCHES);

    fn on(self) -> bool {
        self.0 > 0
    }

    /// The server's side: it asks clients to hold their ACKs as fleetlink's server does
    /// (`ServerConfig::ack_delay_ms`).
    fn server_transport(self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        if self.on() {
            let delay = Duration::from_millis(
                fleetlink_server::ServerConfig::default()
                    .ack_delay_ms
                    .into(),
            );
            t.ack_frequency_config(Some(fleetlink_transport::ack_frequency(delay, 1)));
        }
        t
    }

    /// A device's side: it asks the sink to hold its ACKs as fleetlink's SDK does when it
    /// coalesces acks this way, with its default delays ([`fleetlink_client::device_transport`]).
    fn client_transport(self, t: &mut quinn::TransportConfig) {
        if self.on() {
            let device = fleetlink_client::device_transport(
                fleetlink_client::Resumption::default(),
                fleetlink_client::DEVICE_ACK_DELAY,
                fleetlink_client::DEVICE_TELEMETRY_ACK_DELAY,
                self.0,
            );
            t.ack_frequency_config(device.ack_frequency());
        }
    }

    /// Whether the count of `read` messages is due, `acked` having been sent.
    fn due(self, read: u64, acked: u64) -> bool {
        if self.on() {
            read / u64::from(self.0) > acked / u64::from(self.0)
        } else {
            true
        }
    }
}

/// Runs the sink until its stdin closes.
pub fn serve(message_bytes: usize, coalesce: Coalesce) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let cert_der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let mut config = quinn::ServerConfig::with_single_cert(vec![cert_der], key)?;
        config.transport_config(Arc::new(coalesce.server_transport()));
        // default transport config unless coalescing; fleetlink's socket buffers (see `connect`)
        let endpoint = fleetlink_transport::server_endpoint(config, "127.0.0.1:0".parse()?)?;
        let ready = Ready {
            addr: endpoint.local_addr()?,
            ca_pem: cert.cert.pem(),
        };
        #[allow(clippy::print_stdout)]
        {
            println!("READY {}", serde_json::to_string(&ready)?);
        }
        let devices: Devices = Arc::default();
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        });
        tokio::select! {
            _ = accept_loop(endpoint, devices, message_bytes, coalesce) => {}
            _ = stdin_closed => {}
        }
        Ok(())
    })
}

type Devices = Arc<Mutex<HashMap<u32, quinn::Connection>>>;

async fn accept_loop(
    endpoint: quinn::Endpoint,
    devices: Devices,
    message_bytes: usize,
    coalesce: Coalesce,
) {
    while let Some(incoming) = endpoint.accept().await {
        let devices = devices.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(stream(
                    conn.clone(),
                    send,
                    recv,
                    devices.clone(),
                    message_bytes,
                    coalesce,
                ));
            }
        });
    }
}

async fn stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    devices: Devices,
    message_bytes: usize,
    coalesce: Coalesce,
) -> Result<()> {
    let mut kind = [0u8; 1];
    recv.read_exact(&mut kind).await?;
    match kind[0] {
        TELEMETRY => {
            let (mut bytes, mut acked) = (0u64, 0u64);
            while let Some(chunk) = recv.read_chunk(64 * 1024, true).await? {
                bytes += chunk.bytes.len() as u64;
                let count = bytes / message_bytes as u64;
                if coalesce.due(count, acked) {
                    send.write_all(&count.to_le_bytes()).await?;
                    acked = count;
                }
            }
            let count = bytes / message_bytes as u64;
            if count > acked {
                send.write_all(&count.to_le_bytes()).await?; // the rest, at the end
            }
            send.finish()?;
        }
        REGISTER => {
            let mut index = [0u8; 4];
            recv.read_exact(&mut index).await?;
            if let Ok(mut d) = devices.lock() {
                d.insert(u32::from_le_bytes(index), conn);
            }
            send.write_all(&[1]).await?; // registered
            send.finish()?;
        }
        REQUEST => {
            let mut index = [0u8; 4];
            recv.read_exact(&mut index).await?;
            let payload = recv.read_to_end(64 * 1024).await?;
            let device = devices
                .lock()
                .ok()
                .and_then(|d| d.get(&u32::from_le_bytes(index)).cloned())
                .context("unknown device")?;
            let (mut dsend, mut drecv) = device.open_bi().await?;
            dsend.write_all(&payload).await?;
            dsend.finish()?;
            let answer = drecv.read_to_end(64 * 1024).await?;
            send.write_all(&answer).await?;
            send.finish()?;
        }
        _ => {}
    }
    Ok(())
}

/// A client configuration trusting the sink's certificate; `keep_alive` keeps idle clients open.
pub fn client_config(
    ca_pem: &str,
    keep_alive: Option<Duration>,
    coalesce: Coalesce,
) -> Result<quinn::ClientConfig> {
    let roots = fleetlink_transport::roots_from_pem(ca_pem.as_bytes())?;
    let mut config = quinn::ClientConfig::with_root_certificates(Arc::new(roots))?;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(keep_alive);
    coalesce.client_transport(&mut t);
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// A device's side of [`REQUEST`]: answers every stream the sink opens with what it read.
pub async fn answer_requests(conn: quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            if let Ok(data) = recv.read_to_end(64 * 1024).await {
                let _ = send.write_all(&data).await;
                let _ = send.finish();
            }
        });
    }
}

/// Connects `n` clients to the sink (through a few shared endpoints), ramping the handshakes.
pub async fn connect(
    ready: &Ready,
    n: usize,
    keep_alive: Option<Duration>,
    coalesce: Coalesce,
) -> Result<Vec<quinn::Connection>> {
    let config = client_config(&ready.ca_pem, keep_alive, coalesce)?;
    // The same socket buffers as fleetlink's (fleetlink_transport::udp_socket): a comparison of
    // QUIC stacks, not of kernel defaults.
    let endpoints: Vec<quinn::Endpoint> = crate::load::endpoints_for(n)
        .map(|_| {
            let mut e = fleetlink_transport::client_endpoint(ready.addr)?;
            e.set_default_client_config(config.clone());
            anyhow::Ok(e)
        })
        .collect::<Result<_>>()?;
    let addr = ready.addr;
    crate::load::connect_ramp(n, move |i| {
        let ep = endpoints[i % endpoints.len()].clone();
        async move { Ok(ep.connect(addr, "localhost")?.await?) }
    })
    .await
}

/// Connections that are closed when dropped. The tasks answering relayed requests hold clones of
/// the devices' connections, so dropping ours would leave them open: with keep-alives they would
/// go on sending to a sink that is gone, into the next run's packet count.
pub struct Closing(pub Vec<quinn::Connection>);

impl Drop for Closing {
    fn drop(&mut self) {
        for conn in &self.0 {
            conn.close(0u32.into(), b"run over");
        }
    }
}

/// Sends `load` on one telemetry stream per connection until `stop`; a message is delivered
/// when the sink's count covers it.
pub async fn drive(
    conns: &[quinn::Connection],
    load: &crate::load::Load,
    meter: &crate::stats::Meter,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    use std::collections::VecDeque;
    let start = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, conn) in conns.iter().enumerate() {
        let conn = conn.clone();
        let meter = meter.clone();
        let mut stop = stop.clone();
        let load = load.clone();
        tasks.spawn(async move {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                meter.error();
                return;
            };
            let times: Arc<Mutex<VecDeque<std::time::Instant>>> = Arc::default();
            let acks = {
                let times = times.clone();
                let meter = meter.clone();
                tokio::spawn(async move {
                    let mut seen = 0u64;
                    let mut buf = [0u8; 8];
                    while recv.read_exact(&mut buf).await.is_ok() {
                        let count = u64::from_le_bytes(buf);
                        if let Ok(mut q) = times.lock() {
                            while seen < count {
                                match q.pop_front() {
                                    Some(t) => meter.delivered_since(t),
                                    None => meter.delivered(1),
                                }
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            };
            let msg = vec![b'x'; load.message_bytes];
            if send.write_all(&[TELEMETRY]).await.is_err() {
                meter.error();
                return;
            }
            let mut ticker = load.ticker(i, start);
            let mut sent = 0u64;
            loop {
                if *stop.borrow() {
                    break;
                }
                if let Some(t) = ticker.as_mut() {
                    tokio::select! {
                        _ = t.tick() => {}
                        _ = stop.changed() => break,
                    }
                }
                if let Ok(mut q) = times.lock() {
                    q.push_back(std::time::Instant::now());
                }
                if send.write_all(&msg).await.is_err() {
                    meter.error();
                    break;
                }
                meter.sent(1);
                sent += 1;
            }
            let _ = send.finish();
            // The sink acks what it read; wait for the last count (bounded by the drain).
            let waited = tokio::time::timeout(std::time::Duration::from_secs(30), acks).await;
            if !matches!(waited, Ok(Ok(n)) if n >= sent) {
                meter.error();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Registers `conns[i]` as device `i` and answers the sink's requests on it.
pub async fn register(conns: &[quinn::Connection]) -> Result<()> {
    for (i, conn) in conns.iter().enumerate() {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[REGISTER]).await?;
        send.write_all(&(i as u32).to_le_bytes()).await?;
        send.finish()?;
        recv.read_to_end(8).await?;
        tokio::spawn(answer_requests(conn.clone()));
    }
    Ok(())
}

/// Requests relayed by the sink to devices, one at a time, timed from open to answer.
pub async fn request_round_trips(
    requester: &quinn::Connection,
    devices: usize,
    count: usize,
    meter: &crate::stats::Meter,
) -> Result<()> {
    for k in 0..count {
        let device = ((k * 7919) % devices) as u32;
        let t = std::time::Instant::now();
        meter.sent(1);
        let body = format!("{{\"k\":{k}}}");
        let result = async {
            let (mut send, mut recv) = requester.open_bi().await?;
            send.write_all(&[REQUEST]).await?;
            send.write_all(&device.to_le_bytes()).await?;
            send.write_all(body.as_bytes()).await?;
            send.finish()?;
            anyhow::Ok(recv.read_to_end(64 * 1024).await?)
        }
        .await;
        match result {
            Ok(answer) if answer == body.as_bytes() => meter.delivered_since(t),
            _ => meter.error(),
        }
    }
    Ok(())
}
