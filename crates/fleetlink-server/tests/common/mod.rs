//! A real server on 127.0.0.1:0 with a temporary data dir, and clients for it.

#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)] // test helpers: a panic is the test failing

use std::collections::BTreeMap;
use std::time::Duration;

use fleetlink_client::{
    ClientError, DeviceClient, DeviceConfig, DeviceId, OperatorClient, OperatorConfig,
    ServerAddress,
};
use fleetlink_proto::v1::{self, ClientControl, ServerControl, client_control};
use fleetlink_server::{Server, ServerConfig};
use fleetlink_transport::{
    ClientTransport, FrameReader, client_config, client_endpoint, roots_from_pem, write_frame,
};

pub struct TestServer {
    pub server: Server,
    pub address: ServerAddress,
    pub admin_token: String,
    pub dir: tempfile::TempDir,
}

pub fn start(tune: impl FnOnce(&mut ServerConfig)) -> TestServer {
    start_trusting(None, tune)
}

/// A server whose clients trust `ca` (default: the server's development CA).
pub fn start_trusting(
    ca: Option<&std::path::Path>,
    tune: impl FnOnce(&mut ServerConfig),
) -> TestServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::local(dir.path());
    config.arbiters = 2;
    config.io_threads = 2;
    tune(&mut config);
    let server = Server::start(config).unwrap();
    let address =
        ServerAddress::local(server.local_addr(), ca.or(server.ca_cert_path()).unwrap()).unwrap();
    let admin_token = server.created_admin_token().unwrap().to_owned();
    TestServer {
        server,
        address,
        admin_token,
        dir,
    }
}

impl TestServer {
    pub async fn operator(&self) -> OperatorClient {
        OperatorClient::connect(OperatorConfig {
            server: self.address.clone(),
            token: self.admin_token.clone(),
        })
        .await
        .unwrap()
    }

    pub fn device_config(&self, id: &str, token: &str) -> DeviceConfig {
        DeviceConfig::new(self.address.clone(), DeviceId::new(id).unwrap(), token)
    }
}

/// Every stored point of `id` as (time, value), in time order.
pub async fn stored_points(
    op: &OperatorClient,
    id: &DeviceId,
) -> Vec<(i64, fleetlink_client::Value)> {
    op.query_telemetry(fleetlink_client::TelemetryQuery::all(id.clone()))
        .await
        .unwrap()
        .iter()
        .map(|p| (p.time_us, p.value.clone()))
        .collect()
}

pub async fn provision(op: &OperatorClient, id: &str) -> String {
    op.provision_device(&DeviceId::new(id).unwrap(), BTreeMap::new())
        .await
        .unwrap()
}

pub async fn connect_device(ts: &TestServer, op: &OperatorClient, id: &str) -> DeviceClient {
    let token = provision(op, id).await;
    DeviceClient::connect(ts.device_config(id, &token))
        .await
        .unwrap()
}

/// Waits until `check` holds, polling the server's view; fails after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A hand-written client that speaks the protocol frame by frame, to send what the SDK never would.
pub struct RawClient {
    pub conn: quinn::Connection,
    pub control: quinn::SendStream,
    pub reader: FrameReader,
    pub first: Option<ServerControl>,
    _endpoint: quinn::Endpoint,
}

pub async fn raw_connect(ts: &TestServer, hello: v1::Hello) -> RawClient {
    let endpoint = client_endpoint(ts.address.addr).unwrap();
    // QUIC keep-alives keep the connection open without any protocol heartbeat.
    let transport = ClientTransport {
        keep_alive: Some(Duration::from_millis(50)),
        idle_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let config = client_config(roots_from_pem(&ts.address.ca_pem).unwrap(), &transport).unwrap();
    let conn = endpoint
        .connect_with(config, ts.address.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut control, recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut control,
        &ClientControl {
            msg: Some(client_control::Msg::Hello(hello)),
        },
    )
    .await
    .unwrap();
    let mut reader = FrameReader::new(recv, 1 << 20);
    let first = reader.read::<ServerControl>().await.unwrap();
    RawClient {
        conn,
        control,
        reader,
        first,
        _endpoint: endpoint,
    }
}

pub fn device_hello(id: &str, token: &str) -> v1::Hello {
    v1::Hello {
        protocol_version: fleetlink_proto::PROTOCOL_VERSION,
        role: v1::Role::Device.into(),
        device_id: id.into(),
        token: token.into(),
        client_name: "raw-test".into(),
        ..Default::default()
    }
}

/// The error code and message the server closed `conn` with.
pub async fn close_code(conn: &quinn::Connection) -> (v1::ErrorCode, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the server did not close the connection")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            v1::ErrorCode::try_from(c.error_code.into_inner() as i32).unwrap(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed otherwise: {other}"),
    }
}

pub fn rejected(e: ClientError) -> (v1::RejectReason, String) {
    match e {
        ClientError::Rejected {
            reason, message, ..
        } => (reason, message),
        other => panic!("expected a rejection, got {other}"),
    }
}

/// A UDP relay between one client and the server: it counts the datagrams each way and drops
/// the next datagrams the server sends when told to, for packet counts and packet loss without
/// `tc netem` (which this kernel lacks). A client connects to `addr` instead of the server.
pub struct UdpRelay {
    pub addr: std::net::SocketAddr,
    counters: std::sync::Arc<RelayCounters>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct RelayCounters {
    to_server: std::sync::atomic::AtomicU64,
    to_client: std::sync::atomic::AtomicU64,
    drop_to_client: std::sync::atomic::AtomicU64,
    /// Only datagrams of at least this many bytes are dropped.
    drop_min_bytes: std::sync::atomic::AtomicUsize,
    dropped: std::sync::atomic::AtomicU64,
}

impl UdpRelay {
    pub async fn start(server: std::net::SocketAddr) -> UdpRelay {
        use std::sync::atomic::Ordering::SeqCst;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let counters = std::sync::Arc::new(RelayCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 65_536];
            loop {
                // (an error is an ICMP report of a datagram the server's port refused: while it
                // restarts)
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                if from == server {
                    let drop_it = n >= c.drop_min_bytes.load(SeqCst)
                        && c.drop_to_client
                            .fetch_update(SeqCst, SeqCst, |d| d.checked_sub(1))
                            .is_ok();
                    if drop_it {
                        c.dropped.fetch_add(1, SeqCst);
                    } else if let Some(client) = client {
                        c.to_client.fetch_add(1, SeqCst);
                        let _ = socket.send_to(&buf[..n], client).await;
                    }
                } else {
                    client = Some(from);
                    c.to_server.fetch_add(1, SeqCst);
                    let _ = socket.send_to(&buf[..n], server).await;
                }
            }
        });
        UdpRelay {
            addr,
            counters,
            task,
        }
    }

    /// Datagrams passed from the client to the server so far.
    pub fn to_server(&self) -> u64 {
        self.counters
            .to_server
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Datagrams passed from the server to the client so far.
    pub fn to_client(&self) -> u64 {
        self.counters
            .to_client
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops the next `n` datagrams of at least `min_bytes` that the server sends.
    pub fn drop_next_to_client(&self, n: u64, min_bytes: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        self.counters.drop_min_bytes.store(min_bytes, SeqCst);
        self.counters.drop_to_client.store(n, SeqCst);
    }

    /// Datagrams from the server dropped so far.
    pub fn dropped(&self) -> u64 {
        self.counters
            .dropped
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
