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

/// One certificate as PEM (base64 in lines of 64, as RFC 7468 writes it).
pub fn pem_of_cert(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The trust anchors for the hub: exactly the one fleet CA certificate. More than
/// one is refused, also from a state directory written before enrolment checked
/// it: the pin covered one certificate only, so any other is an intruder's.
fn roots(ca_pem: &str) -> Result<RootCertStore> {
    let certs = certs_from_pem(ca_pem)?;
    let [cert] = <[_; 1]>::try_from(certs).map_err(|certs: Vec<_>| {
        Error::Tls(format!(
            "the hub's CA must be exactly one certificate, found {}; re-enrol with a new join token",
            certs.len()
        ))
    })?;
    let mut roots = RootCertStore::empty();
    roots
        .add(cert)
        .map_err(|e| Error::Tls(format!("unusable CA certificate: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(name: &str) -> String {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem()
    }

    #[test]
    fn pem_of_cert_round_trips() {
        let pem = ca_pem("fleet CA");
        let der = certs_from_pem(&pem).unwrap().remove(0);
        let again = pem_of_cert(der.as_ref());
        assert_eq!(certs_from_pem(&again).unwrap(), vec![der]);
        assert!(again.lines().all(|l| l.len() <= 64));
    }

    /// A CA file holding a second certificate (written before enrolment checked
    /// for one) is not trusted at all.
    #[test]
    fn exactly_one_ca_certificate_is_trusted() {
        let one = ca_pem("fleet CA");
        assert!(anonymous_config(&one).is_ok());
        let two = format!("{one}{}", ca_pem("intruder"));
        let e = anonymous_config(&two).unwrap_err().to_string();
        assert!(e.contains("exactly one certificate, found 2"), "{e}");
    }
}
