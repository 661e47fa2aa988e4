//! A simulated fleet against a real server: every device connects and its points are stored.

#![allow(clippy::unwrap_used)] // a panic is the test failing

use std::time::Duration;

use fleetlink_client::{OperatorClient, OperatorConfig, ServerAddress};
use fleetlink_server::{Server, ServerConfig};
use fleetlink_sim::{Credentials, Fleet, FleetConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_simulated_device_connects_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig::local(dir.path())).unwrap();
    let address =
        ServerAddress::local(server.local_addr(), server.ca_cert_path().unwrap()).unwrap();
    let token = server.created_admin_token().unwrap().to_owned();
    let op = OperatorClient::connect(OperatorConfig {
        server: address.clone(),
        token,
    })
    .await
    .unwrap();
    let mut creds = Credentials::default();
    // more devices than the connection window of 64, to exercise it
    let config = FleetConfig {
        vehicles: 80,
        machines: 70,
        rate_hz: 20.0,
        ..FleetConfig::default()
    };
    let progress = std::sync::Mutex::new(Vec::new());
    let fleet = Fleet::start(address, &op, &mut creds, config, |n, total| {
        progress.lock().unwrap().push((n, total))
    })
    .await
    .unwrap();
    assert_eq!(fleet.devices().len(), 150);
    assert_eq!(progress.lock().unwrap().last(), Some(&(150, 150)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fleet.devices().iter().any(|d| d.stats().points_acked == 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "some simulated devices stored nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.stop(Duration::from_secs(10)).await;
    let devices = op.list_devices(None, None).await.unwrap();
    assert_eq!(devices.len(), 150);
    let vehicle = devices
        .iter()
        .find(|d| d.id.as_str() == "sim-vehicle-0001")
        .unwrap();
    let metrics: Vec<&str> = vehicle
        .last_values
        .iter()
        .map(|(m, _, _)| m.as_str())
        .collect();
    assert_eq!(
        metrics,
        [
            "engine_temp_c",
            "fuel",
            "heading_deg",
            "odometer_km",
            "position",
            "speed_kmh"
        ]
    );
    assert!(devices.iter().all(|d| d.point_count > 0));
    // stopping the fleet disconnects it: the server sees every device go offline, reason "closed"
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let devices = op.list_devices(None, None).await.unwrap();
        if devices
            .iter()
            .all(|d| !d.presence.online && d.presence.offline_reason == "closed")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still online after stop: {devices:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
