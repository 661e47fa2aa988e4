//! TLS for the QUIC endpoint: a configured certificate, or a development CA created on first start.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ServerError;

/// Where the certificate came from.
#[derive(Debug, Clone)]
pub(crate) struct TlsMaterial {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    /// The development CA file clients must trust, if the server made its own certificate.
    pub dev_ca: Option<PathBuf>,
}

fn tls_err(what: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(what.to_string())
}

pub(crate) fn load(cert: &Path, key: &Path) -> Result<TlsMaterial, ServerError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            tls_err(format!(
                "cannot read certificates from {}: {e}",
                cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_err(format!(
            "{} holds no PEM certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_err(format!(
            "cannot read a private key from {}: {e}",
            key.display()
        ))
    })?;
    Ok(TlsMaterial {
        certs,
        key: Arc::new(key),
        dev_ca: None,
    })
}

/// Loads the development certificate from `dir`, creating the CA and/or the server certificate
/// when missing. The server certificate is valid for `localhost`, `127.0.0.1` and `::1`.
pub(crate) fn dev_certificate(dir: &Path) -> Result<TlsMaterial, ServerError> {
    let ca_pem = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let server_pem = dir.join("server.pem");
    let server_key = dir.join("server.key");
    if !(server_pem.exists() && server_key.exists() && ca_pem.exists()) {
        fs::create_dir_all(dir)
            .map_err(|e| tls_err(format!("cannot create {}: {e}", dir.display())))?;
        let ca_keypair = if ca_pem.exists() && ca_key.exists() {
            let key_pem = fs::read_to_string(&ca_key).map_err(tls_err)?;
            KeyPair::from_pem(&key_pem).map_err(tls_err)?
        } else {
            let key = KeyPair::generate().map_err(tls_err)?;
            let cert = ca_params()?.self_signed(&key).map_err(tls_err)?;
            write_private(&ca_key, &key.serialize_pem())?;
            fs::write(&ca_pem, cert.pem()).map_err(tls_err)?;
            key
        };
        // The issuer is the CA's name and key; the CA certificate's parameters are fixed below.
        let issuer = Issuer::new(ca_params()?, ca_keypair);
        let key = KeyPair::generate().map_err(tls_err)?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .map_err(tls_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetlink server");
        let cert = params.signed_by(&key, &issuer).map_err(tls_err)?;
        write_private(&server_key, &key.serialize_pem())?;
        fs::write(&server_pem, cert.pem()).map_err(tls_err)?;
    }
    let mut material = load(&server_pem, &server_key)?;
    material.dev_ca = Some(ca_pem);
    Ok(material)
}

fn ca_params() -> Result<CertificateParams, ServerError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "fleetlink development CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn write_private(path: &Path, contents: &str) -> Result<(), ServerError> {
    crate::write_secret(path, contents)
        .map_err(|e| tls_err(format!("cannot write {}: {e}", path.display())))
}

/// The quinn server configuration: TLS 1.3 with the ring provider, our ALPN, transport limits.
/// Streams a device may open at once: its control stream ...
pub(crate) const DEVICE_BIDI_STREAMS: u32 = 1;
/// ... and its telemetry stream (one more, so a device that reopens it need not wait).
pub(crate) const DEVICE_UNI_STREAMS: u32 = 2;
/// Request streams an authenticated operator may have open at once.
pub(crate) const OPERATOR_BIDI_STREAMS: u32 = 64;

/// TLS 1.3 with [`fleetlink_transport::crypto_provider`], our certificate and ALPN. The server
/// picks the suite by its own order (AES-128-GCM first, see that function), whatever a client
/// prefers: the handshakes of a reconnect storm are the server's CPU, not the clients'.
fn rustls_server_config(material: &TlsMaterial) -> Result<rustls::ServerConfig, ServerError> {
    let mut tls =
        rustls::ServerConfig::builder_with_provider(fleetlink_transport::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_single_cert(material.certs.clone(), material.key.clone_key())
            .map_err(tls_err)?;
    tls.alpn_protocols = vec![fleetlink_proto::ALPN.to_vec()];
    tls.ignore_client_order = true;
    Ok(tls)
}

pub(crate) fn quinn_server_config(
    material: &TlsMaterial,
    sessions: Arc<crate::tls_sessions::SessionStore>,
    idle_timeout: std::time::Duration,
    ack_delay: std::time::Duration,
) -> Result<quinn::ServerConfig, ServerError> {
    let mut tls = rustls_server_config(material)?;
    // Stateful sessions that outlive a graceful restart (see `tls_sessions`), and 0-RTT for the
    // devices that ask for it (QUIC allows only 0 or u32::MAX here). Each session resumes once,
    // so a replayed 0-RTT flight finds none; and a session reads nothing before its handshake has
    // completed (quinn's `Incoming` resolves only then), so replayed data never reaches us.
    tls.session_storage = sessions;
    tls.max_early_data_size = u32::MAX;
    // One ticket per connection: a device reconnects with it and gets the next one. (rustls'
    // default of two doubles the store for a spare that only a failed attempt would use.)
    tls.send_tls13_tickets = 1;
    let mut crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_err)?;
    // A connection drops its TLS state once the handshake is done (our quinn-proto's change 8):
    // a few KB per idle device. The server exports no keying material and asks for no client
    // certificate, the two things that would need it.
    crypto.release_tls_after_handshake(true);
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout.try_into().map_err(tls_err)?))
        // Until the Hello says who it is, a connection may open only its control stream and a
        // telemetry stream: quinn keeps state for every stream a peer may open, and most
        // connections are idle devices. Operators get OPERATOR_BIDI_STREAMS once authenticated.
        .max_concurrent_bidi_streams(DEVICE_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(DEVICE_UNI_STREAMS.into());
    if !ack_delay.is_zero() {
        // Ask the client to hold its ACKs this long (see `ServerConfig::ack_delay_ms`).
        transport.ack_frequency_config(Some(fleetlink_transport::ack_frequency(ack_delay, 1)));
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring::cipher_suite;

    /// Runs a TLS handshake between `client` and `server` in memory.
    fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        panic!("the handshake did not finish in 10 round trips");
    }

    /// The server picks AES-128-GCM/SHA-256 even for a client that prefers AES-256-GCM/SHA-384
    /// (ring's default order): the cheaper suite on the server's CPU.
    #[test]
    fn the_server_picks_aes_128_gcm_whatever_the_client_prefers() {
        let dir = tempfile::tempdir().unwrap();
        let material = dev_certificate(dir.path()).unwrap();
        let server_config = Arc::new(rustls_server_config(&material).unwrap());
        let roots =
            fleetlink_transport::roots_from_pem(&fs::read(dir.path().join("ca.pem")).unwrap())
                .unwrap();
        let provider = rustls::crypto::ring::default_provider();
        assert_eq!(
            provider.cipher_suites[0].suite(),
            cipher_suite::TLS13_AES_256_GCM_SHA384.suite(),
            "this test needs a client that prefers AES-256"
        );
        let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.alpn_protocols = vec![fleetlink_proto::ALPN.to_vec()];
        let mut client =
            rustls::ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap())
                .unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        handshake(&mut client, &mut server);
        let suite = |c: Option<rustls::SupportedCipherSuite>| c.map(|s| s.suite());
        assert_eq!(
            suite(server.negotiated_cipher_suite()),
            Some(cipher_suite::TLS13_AES_128_GCM_SHA256.suite())
        );
        assert_eq!(
            suite(client.negotiated_cipher_suite()),
            suite(server.negotiated_cipher_suite())
        );
    }
}
