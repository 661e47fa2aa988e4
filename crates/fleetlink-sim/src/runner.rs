//! Connects simulated devices to a server with the real SDK and drives them at a fixed rate.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetlink_client::{
    ClientError, DeviceClient, DeviceConfig, DeviceId, Endpoint, OperatorClient, ServerAddress,
    now_us,
};
use fleetlink_core::backoff::Backoff;
use rand::SeedableRng;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::{Machine, Vehicle};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Vehicles (`sim-vehicle-0001`, ...).
    pub vehicles: usize,
    /// Stationary machines (`sim-machine-0001`, ...).
    pub machines: usize,
    /// Readings per device per second.
    pub rate_hz: f64,
    /// Random seed of the models.
    pub seed: u64,
    /// Depot of the vehicles (lat, lon).
    pub depot: (f64, f64),
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            vehicles: 10,
            machines: 10,
            rate_hz: 1.0,
            seed: 1,
            depot: (52.52, 13.405),
        }
    }
}

/// Device tokens of a simulated fleet, kept in a JSON file so that `fleetlink sim` can run again
/// against the same server (a token is shown only once, at provisioning).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    tokens: BTreeMap<String, String>,
}

impl Credentials {
    /// Reads `path`; an absent file is an empty set.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let tokens = serde_json::from_str(&text).map_err(std::io::Error::other)?;
                Ok(Self { tokens })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&self.tokens).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimDevice {
    /// Its id.
    pub id: DeviceId,
    /// Vehicle or machine.
    pub vehicle: bool,
}

/// Counters of a running fleet.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Points handed to the SDK.
    pub points_sent: AtomicU64,
    /// Devices connected (first connection done).
    pub connected: AtomicU64,
}

/// A running simulated fleet.
#[derive(Debug)]
pub struct Fleet {
    devices: Vec<Arc<DeviceClient>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Live counters.
    pub stats: Arc<FleetStats>,
}

fn id(s: String) -> DeviceId {
    DeviceId::new(s).unwrap_or_else(|e| unreachable!("generated device id: {e}"))
}

impl FleetConfig {
    /// The devices of this fleet.
    pub fn devices(&self) -> Vec<SimDevice> {
        let v = (1..=self.vehicles).map(|i| SimDevice {
            id: id(format!("sim-vehicle-{i:04}")),
            vehicle: true,
        });
        let m = (1..=self.machines).map(|i| SimDevice {
            id: id(format!("sim-machine-{i:04}")),
            vehicle: false,
        });
        v.chain(m).collect()
    }
}

impl Fleet {
    /// Provisions the devices that `credentials` has no token for, connects every device (calling
    /// `progress(connected, total)` as they come up), and starts sending.
    pub async fn start(
        server: ServerAddress,
        operator: &OperatorClient,
        credentials: &mut Credentials,
        config: FleetConfig,
        progress: impl Fn(usize, usize),
    ) -> Result<Fleet, ClientError> {
        let devices = config.devices();
        for d in &devices {
            if !credentials.tokens.contains_key(d.id.as_str()) {
                let mut tags = BTreeMap::new();
                tags.insert(
                    "kind".to_owned(),
                    if d.vehicle { "vehicle" } else { "machine" }.to_owned(),
                );
                tags.insert("simulated".to_owned(), "true".to_owned());
                let token = operator.provision_device(&d.id, tags).await?;
                credentials.tokens.insert(d.id.to_string(), token);
            }
        }
        // A few client sockets shared by all devices, as a gateway would.
        let endpoints: Vec<Endpoint> = (0..devices.len().div_ceil(2_000).max(1))
            .map(|_| Endpoint::for_server(server.addr))
            .collect::<Result<_, _>>()?;
        let stats = Arc::new(FleetStats::default());
        let total = devices.len();
        let mut connecting = JoinSet::new();
        let mut connected = Vec::with_capacity(total);
        for (i, d) in devices.iter().enumerate() {
            let token = credentials
                .tokens
                .get(d.id.as_str())
                .cloned()
                .unwrap_or_default();
            let mut dc = DeviceConfig::new(server.clone(), d.id.clone(), token);
            dc.endpoint = Some(endpoints[i % endpoints.len()].clone());
            dc.backoff = Backoff {
                initial: Duration::from_millis(200),
                ..Backoff::default()
            };
            let vehicle = d.vehicle;
            connecting.spawn(async move { (vehicle, i, DeviceClient::connect(dc).await) });
            // Bound the connection rate so a large fleet does not stampede the server.
            if connecting.len() >= 64
                && let Some(res) = connecting.join_next().await
            {
                connected.push(Self::collect(res, &stats, total, &progress)?);
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut fleet = Fleet {
            devices: Vec::new(),
            stop,
            tasks: JoinSet::new(),
            stats,
        };
        while let Some(res) = connecting.join_next().await {
            connected.push(Self::collect(res, &fleet.stats, total, &progress)?);
        }
        for (vehicle, i, client) in connected {
            let client = Arc::new(client);
            fleet.devices.push(client.clone());
            fleet.tasks.spawn(drive(
                client,
                vehicle,
                config.clone(),
                i as u64,
                stop_rx.clone(),
                fleet.stats.clone(),
            ));
        }
        Ok(fleet)
    }

    fn collect(
        res: Result<(bool, usize, Result<DeviceClient, ClientError>), tokio::task::JoinError>,
        stats: &FleetStats,
        total: usize,
        progress: &impl Fn(usize, usize),
    ) -> Result<(bool, usize, DeviceClient), ClientError> {
        let (vehicle, i, client) = res.map_err(|e| ClientError::Connection(e.to_string()))?;
        let client = client?;
        let n = stats.connected.fetch_add(1, Ordering::Relaxed) + 1;
        progress(n as usize, total);
        Ok((vehicle, i, client))
    }

    /// The device clients.
    pub fn devices(&self) -> &[Arc<DeviceClient>] {
        &self.devices
    }

    /// Points the server acked as durable, over all devices.
    pub fn points_acked(&self) -> u64 {
        self.devices.iter().map(|d| d.stats().points_acked).sum()
    }

    /// Devices with an established session now.
    pub fn online(&self) -> usize {
        self.devices.iter().filter(|d| d.stats().connected).count()
    }

    /// Stops sending, flushes every device (up to `timeout`) and disconnects it, so the server
    /// sees the devices go offline at once.
    pub async fn stop(mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        for d in std::mem::take(&mut self.devices) {
            let _ = d.flush(timeout).await;
            if let Ok(d) = Arc::try_unwrap(d) {
                d.close().await;
            }
        }
    }
}

async fn drive(
    client: Arc<DeviceClient>,
    vehicle: bool,
    config: FleetConfig,
    index: u64,
    mut stop: watch::Receiver<bool>,
    stats: Arc<FleetStats>,
) {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003).wrapping_add(index));
    let dt = Duration::from_secs_f64(1.0 / config.rate_hz.max(0.001));
    let mut vehicle_model = vehicle.then(|| Vehicle::new(config.depot, 8_000.0, &mut rng));
    let mut machine_model = (!vehicle).then(|| Machine::new(&mut rng));
    // Spread the devices over the period so their sends do not come in lockstep.
    let offset = dt.mul_f64((index % 1000) as f64 / 1000.0);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, dt);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = now_us();
        let points = match (&mut vehicle_model, &mut machine_model) {
            (Some(v), _) => v.step(dt.as_secs_f64(), now, &mut rng),
            (_, Some(m)) => m.step(dt.as_secs_f64(), now, &mut rng),
            _ => return,
        };
        let n = points.len() as u64;
        if client.send(points).await.is_err() {
            return;
        }
        stats.points_sent.fetch_add(n, Ordering::Relaxed);
    }
}
