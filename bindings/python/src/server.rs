//! `fleetlink.Server`: a complete fleetlink server inside the Python process (its own threads),
//! for notebooks and tests.

use std::path::PathBuf;

use fleetlink_server::ServerConfig;
use pyo3::prelude::*;

use crate::errors::invalid;

/// An embedded server.
#[pyclass(module = "fleetlink._fleetlink")]
#[derive(Debug)]
pub struct Server {
    server: Option<fleetlink_server::Server>,
    url: String,
    admin_token: String,
    ca_cert: String,
    data_dir: String,
}

#[pymethods]
impl Server {
    /// Starts a server on `listen` with its data in `data_dir` (created if needed).
    #[new]
    #[pyo3(signature = (data_dir, listen="127.0.0.1:0"))]
    fn new(py: Python<'_>, data_dir: PathBuf, listen: &str) -> PyResult<Server> {
        let mut config = ServerConfig::local(&data_dir);
        config.listen = listen
            .parse()
            .map_err(|e| invalid(py, format!("listen {listen:?}: {e}; use host:port")))?;
        let server = py
            .detach(|| fleetlink_server::Server::start(config))
            .map_err(|e| invalid(py, format!("cannot start the server: {e}")))?;
        let admin_token = match server.created_admin_token() {
            Some(t) => t.to_owned(),
            None => std::fs::read_to_string(server.admin_token_file())
                .map(|t| t.trim().to_owned())
                .map_err(|e| invalid(py, format!("cannot read the admin token: {e}")))?,
        };
        let ca_cert = server
            .ca_cert_path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(Server {
            url: format!("fleetlink://{}", server.local_addr()),
            admin_token,
            ca_cert,
            data_dir: data_dir.display().to_string(),
            server: Some(server),
        })
    }

    /// `fleetlink://host:port`.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// The admin token for `fleetlink.connect`.
    #[getter]
    fn admin_token(&self) -> String {
        self.admin_token.clone()
    }

    /// Path of the development CA certificate clients must trust.
    #[getter]
    fn ca_cert(&self) -> String {
        self.ca_cert.clone()
    }

    /// The data directory.
    #[getter]
    fn data_dir(&self) -> String {
        self.data_dir.clone()
    }

    /// Whether it still runs.
    #[getter]
    fn running(&self) -> bool {
        self.server.is_some()
    }

    /// Stops the server and waits until everything it queued is written.
    fn shutdown(&mut self, py: Python<'_>) {
        if let Some(server) = self.server.take() {
            py.detach(move || server.shutdown());
        }
    }
}
