//! The fleet's PKI: the CA, the hub's serving certificate and the admin token
//! (created on first start, reused after), signing agents' CSRs, and reading the
//! cluster identity out of a verified client certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long agent certificates live unless `--agent-cert-ttl` says otherwise.
pub use flotilla_shared::identity::DEFAULT_AGENT_CERT_TTL;
/// The CA and serving certificate live ten years; rotating them is a re-install.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating absorbs clock skew between hub and agents.
const BACKDATE: Duration = Duration::from_secs(300);
/// Length of the admin token: 40 alphanumerics is about 238 bits.
const ADMIN_TOKEN_LEN: usize = 40;
/// URI SAN prefix naming a cluster in its client certificate.
pub const CLUSTER_URI_PREFIX: &str = "flotilla://cluster/";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid certificate signing request: {0}")]
    Csr(rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The hub's key material, loaded from (or created in) the data directory.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    ca_issuer: Issuer<'static, KeyPair>,
    pub server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    admin_token: String,
    /// The key that signs desired sets (`DATA/signing/`).
    pub signer: crate::signer::Signer,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file atomically (temp file + rename) with the given mode.
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Seconds since the epoch of a wall-clock instant (certificates need wall time).
fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    // A positive DER integer.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Flotilla fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(now - BACKDATE);
    params.not_after = epoch + since_epoch(now + CA_VALIDITY);
    params.serial_number = Some(random_serial());
    params
}

/// Generates a random admin token.
pub fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl Pki {
    /// Loads the CA, serving certificate and admin token from `dir`, creating
    /// whatever is missing. The serving certificate names `advertise_host`,
    /// `localhost` and `127.0.0.1`.
    pub fn load_or_create(dir: &Path, advertise_host: &str) -> Result<Pki, PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca_cert_path = dir.join("ca.pem");
        let ca_key_path = dir.join("ca.key");
        let hub_cert_path = dir.join("hub.pem");
        let hub_key_path = dir.join("hub.key");
        let token_path = dir.join("admin-token");

        if !ca_cert_path.exists() || !ca_key_path.exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let cert = ca_params().self_signed(&key)?;
            write_private(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&ca_cert_path, cert.pem().as_bytes(), 0o600)?;
            // A new CA invalidates any serving certificate left behind.
            let _ = fs::remove_file(&hub_cert_path);
        }
        let ca_pem = read(&ca_cert_path)?;
        let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)?;
        let ca_issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let ca_der = pem_to_der(&ca_pem)?;

        // A serving certificate that does not name the advertised host (the flag
        // changed) is replaced; the CA, and so every agent's trust, stays.
        let names_host = read(&hub_cert_path)
            .ok()
            .and_then(|pem| pem_to_der(&pem).ok())
            .is_some_and(|der| cert_names_host(&der, advertise_host));
        if !names_host || !hub_key_path.exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut names = vec![advertise_host.to_string()];
            for n in ["localhost", "127.0.0.1"] {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
            let mut params = CertificateParams::new(names)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "flotilla-hub");
            params.distinguished_name = dn;
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let now = SystemTime::now();
            let epoch = rcgen::date_time_ymd(1970, 1, 1);
            params.not_before = epoch + since_epoch(now - BACKDATE);
            params.not_after = epoch + since_epoch(now + CA_VALIDITY);
            params.serial_number = Some(random_serial());
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &ca_issuer)?;
            write_private(&hub_key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&hub_cert_path, cert.pem().as_bytes(), 0o600)?;
        }
        let server_cert = pem_to_der(&read(&hub_cert_path)?)?;
        let server_key = KeyPair::from_pem(&read(&hub_key_path)?)?;

        if !token_path.exists() {
            write_private(&token_path, random_token(ADMIN_TOKEN_LEN).as_bytes(), 0o600)?;
        }
        let admin_token = read(&token_path)?.trim().to_string();
        if admin_token.len() < 16 {
            return Err(PkiError::Invalid(format!(
                "{}: admin token too short",
                token_path.display()
            )));
        }

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let signer = crate::signer::Signer::load_or_create(dir, now_ms)
            .map_err(|e| PkiError::Invalid(e.to_string()))?;
        Ok(Pki {
            signer,
            ca_pem,
            ca_der,
            ca_issuer,
            server_chain: vec![server_cert],
            server_key_der: server_key.serialize_der(),
            admin_token,
        })
    }

    /// The serving key, for rustls.
    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// SHA-256 of the CA certificate, as pinned in join tokens.
    pub fn ca_hash(&self) -> String {
        flotilla_shared::token::ca_hash(&self.ca_der)
    }

    /// Signs an agent's CSR for `cluster`, valid for `validity`. Only the CSR's
    /// public key is used: subject, SANs, usages and validity are the hub's
    /// choice.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        cluster: &str,
        validity: Duration,
    ) -> Result<Signed, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::Csr)?;
        let params = agent_params(cluster, validity)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.ca_issuer)?;
        Ok(Signed {
            pem: signed.pem(),
            sha256: flotilla_shared::identity::fingerprint(signed.der()),
        })
    }

    /// Checks a CSR parses and its signature holds, without signing it.
    pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
        CertificateSigningRequestParams::from_pem(csr_pem)
            .map(|_| ())
            .map_err(PkiError::Csr)
    }
}

/// An agent certificate just issued.
#[derive(Debug, Clone)]
pub struct Signed {
    pub pem: String,
    /// Its fingerprint, as the cluster's record pins it.
    pub sha256: String,
}

fn agent_params(cluster: &str, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cluster);
    params.distinguished_name = dn;
    let uri = format!("{CLUSTER_URI_PREFIX}{cluster}");
    params.subject_alt_names = vec![SanType::URI(
        uri.try_into().map_err(|e: rcgen::Error| PkiError::Csr(e))?,
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // Backdated by at most a tenth of the life: a certificate of seconds (tests)
    // must not be two thirds through it, and due for renewal, when issued.
    params.not_before = epoch + since_epoch(now - BACKDATE.min(validity / 10));
    params.not_after = epoch + since_epoch(now + validity);
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The first certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("invalid certificate PEM: {e}")))
}

/// Whether a certificate's SANs name `host` (as a DNS name or an IP address).
fn cert_names_host(der: &[u8], host: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let ip: Option<std::net::IpAddr> = host.parse().ok();
    san.value.general_names.iter().any(|n| match n {
        GeneralName::DNSName(d) => d.eq_ignore_ascii_case(host),
        GeneralName::IPAddress(bytes) => match (ip, bytes.len()) {
            (Some(std::net::IpAddr::V4(v4)), 4) => v4.octets() == **bytes,
            (Some(std::net::IpAddr::V6(v6)), 16) => v6.octets() == **bytes,
            _ => false,
        },
        _ => false,
    })
}

/// The cluster a (chain-verified) client certificate names: its CN, which must be
/// a valid cluster name and agree with the `flotilla://cluster/<name>` URI SAN.
pub fn cluster_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    flotilla_shared::objects::validate_name(cn).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let uri_ok = san.value.general_names.iter().any(|n| {
        matches!(n, x509_parser::extensions::GeneralName::URI(u)
            if u.strip_prefix(CLUSTER_URI_PREFIX) == Some(cn))
    });
    uri_ok.then(|| cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, cn: &str) -> String {
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn creates_then_reuses_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), "hub.example").unwrap();
        let b = Pki::load_or_create(dir.path(), "hub.example").unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.admin_token(), b.admin_token());
        assert_eq!(a.server_chain, b.server_chain);
        assert!(cert_names_host(&a.server_chain[0], "hub.example"));
        assert!(cert_names_host(&a.server_chain[0], "127.0.0.1"));
        let c = Pki::load_or_create(dir.path(), "10.0.0.7").unwrap();
        assert_eq!(a.ca_pem, c.ca_pem);
        assert!(cert_names_host(&c.server_chain[0], "10.0.0.7"));
        assert!(!cert_names_host(&c.server_chain[0], "hub.example"));
        assert!(a.admin_token().len() >= 32);
        let mode = fs::metadata(dir.path().join("admin-token"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let key = KeyPair::generate().unwrap();
        let signed = a
            .sign_csr(&csr(&key, "someone-else"), "edge-1", DEFAULT_AGENT_CERT_TTL)
            .unwrap();
        let der = pem_to_der(&signed.pem).unwrap();
        assert_eq!(signed.sha256, flotilla_shared::identity::fingerprint(&der));
        // The hub's choice of name wins over the CSR's subject.
        assert_eq!(cluster_from_cert(&der).as_deref(), Some("edge-1"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        // The serving certificate is no cluster identity.
        assert_eq!(cluster_from_cert(&a.server_chain[0]), None);
        assert!(a
            .sign_csr("not a csr", "x", DEFAULT_AGENT_CERT_TTL)
            .is_err());
    }
}
