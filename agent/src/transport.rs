//! TLS to the hub: rustls client configurations (ring only, TLS 1.3, ALPN h2) and a
//! tonic `Channel` dialled through our own connector, since tonic is built without
//! TLS support of its own.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{Error, Result};

/// How long dialling the hub (TCP and TLS) may take before a session attempt fails.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))
}

fn finish(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Parses every certificate of a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("invalid certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls("no certificate in PEM".into()));
    }
    Ok(certs)
}

fn roots(ca_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Client configuration for talking to the hub before its CA is known: accepts any
/// server certificate (the CA it serves is checked against the token's pin
/// afterwards) but still verifies the handshake signature.
pub fn insecure_config() -> Result<Arc<ClientConfig>> {
    let verifier = Arc::new(AnyServerCert(provider()));
    Ok(finish(
        builder()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    ))
}

/// Client configuration trusting only the fleet CA, without a client certificate
/// (for `Enroll`).
pub fn anonymous_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    Ok(finish(
        builder()?
            .with_root_certificates(roots(ca_pem)?)
            .with_no_client_auth(),
    ))
}

/// Client configuration trusting only the fleet CA and presenting the agent's
/// certificate (for the `Fleet` service).
pub fn mutual_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ClientConfig>> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("invalid client key: {e}")))?;
    finish_result(
        builder()?
            .with_root_certificates(roots(ca_pem)?)
            .with_client_auth_cert(certs_from_pem(cert_pem)?, key),
    )
}

fn finish_result(r: Result<ClientConfig, rustls::Error>) -> Result<Arc<ClientConfig>> {
    r.map(finish)
        .map_err(|e| Error::Tls(format!("client certificate: {e}")))
}

/// The host part of the hub URL, as the name the server certificate must carry.
pub fn server_name(hub: &Uri) -> Result<ServerName<'static>> {
    let host = hub
        .host()
        .ok_or_else(|| Error::Config(format!("hub URL {hub} has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::Config(format!("hub URL host {host:?}: {e}")))
}

/// Parses and checks the `--hub` URL (`https://HOST:PORT`).
pub fn parse_hub(hub: &str) -> Result<Uri> {
    let uri: Uri = hub
        .parse()
        .map_err(|e| Error::Config(format!("hub URL {hub:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::Config(format!(
            "hub URL {hub:?} must start with https://"
        )));
    }
    server_name(&uri)?;
    Ok(uri)
}

/// A gRPC channel to the hub over TLS with `config`. Connects eagerly, so an
/// unreachable hub or a failed handshake shows here.
pub async fn channel(hub: &Uri, config: Arc<ClientConfig>) -> Result<Channel> {
    let name = server_name(hub)?;
    let host = hub.host().unwrap_or_default().to_string();
    let port = hub.port_u16().unwrap_or(443);
    let connector = TlsConnector::from(config);
    let dial = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let host = host.clone();
        async move {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from(hub.clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(dial)
        .await
        .map_err(|e| Error::Connect {
            hub: hub.to_string(),
            reason: error_chain(&e),
        })
}

/// An error and its sources, joined: tonic's transport errors say little on top.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

/// Accepts any server certificate, but checks the handshake signatures so the
/// peer at least holds the key of the certificate it showed.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
