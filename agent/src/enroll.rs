//! Enrolment: the first start trades the join token for a client certificate. The
//! hub's CA is fetched over unverified TLS and accepted only if it matches the
//! hash pinned in the token and is the only certificate served; the CSR then goes
//! over TLS verified against it.
//! Renewal: before two thirds of its life, the certificate is traded (over
//! mutual TLS with it) for one of a fresh key, saved so that a crash never
//! leaves a key beside another key's certificate.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use flotilla_proto::v1::enrolment_client::EnrolmentClient;
use flotilla_proto::v1::fleet_client::FleetClient;
use flotilla_proto::v1::{EnrollRequest, GetCaRequest, RenewRequest};
use flotilla_shared::labels::Labels;
use flotilla_shared::token::{ca_hash, pinned_ca, JoinToken};
use tonic::transport::Uri;
use tracing::info;

use crate::error::{Error, Result};
use crate::transport;

/// File names in the state directory. The certificate is written last, so its
/// presence means the other two are complete.
pub const CA_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "client.key";
pub const CERT_FILE: &str = "client.pem";
/// A renewed key and certificate before they replace the current ones: the
/// certificate is written last, so its presence means both are complete.
pub const NEXT_KEY_FILE: &str = "client.key.next";
pub const NEXT_CERT_FILE: &str = "client.pem.next";

/// What the agent needs to talk to the hub: the fleet CA and its own certificate.
#[derive(Clone)]
pub struct Identity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// Reads the identity from the state directory; `None` when not enrolled yet.
/// A renewal interrupted while its files were moved in place is finished first.
pub fn load_identity(dir: &Path) -> Result<Option<Identity>> {
    finish_renewal(dir)?;
    let cert_path = dir.join(CERT_FILE);
    if !cert_path.exists() {
        return Ok(None);
    }
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| Error::io(p, e))
    };
    Ok(Some(Identity {
        ca_pem: read(CA_FILE)?,
        cert_pem: read(CERT_FILE)?,
        key_pem: read(KEY_FILE)?,
    }))
}

/// Writes a file atomically and durably: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<()> {
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Moves a complete renewed pair in place (key, then certificate), or drops an
/// incomplete one (a key without its certificate: the hub is asked again).
fn finish_renewal(dir: &Path) -> Result<()> {
    let (next_key, next_cert) = (dir.join(NEXT_KEY_FILE), dir.join(NEXT_CERT_FILE));
    if next_cert.exists() {
        if next_key.exists() {
            let key = dir.join(KEY_FILE);
            std::fs::rename(&next_key, &key).map_err(|e| Error::io(&key, e))?;
        }
        let cert = dir.join(CERT_FILE);
        std::fs::rename(&next_cert, &cert).map_err(|e| Error::io(&cert, e))?;
    } else if next_key.exists() {
        std::fs::remove_file(&next_key).map_err(|e| Error::io(&next_key, e))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Saves a renewed key and certificate in place of the current ones: each is
/// written (temp file, fsync, rename, mode 0600) beside the current, then
/// both are moved in; a crash at any point leaves either pair whole.
pub fn save_renewed(dir: &Path, key_pem: &str, cert_pem: &str) -> Result<()> {
    write_atomic(dir, NEXT_KEY_FILE, key_pem.as_bytes(), 0o600)?;
    write_atomic(dir, NEXT_CERT_FILE, cert_pem.as_bytes(), 0o600)?;
    finish_renewal(dir)
}

/// A certificate's validity, ms since the epoch: (not before, not after).
pub fn validity(cert_pem: &str) -> Result<(i64, i64)> {
    let der = transport::certs_from_pem(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())
        .map_err(|e| Error::Tls(format!("unreadable certificate: {e}")))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp().saturating_mul(1000),
        v.not_after.timestamp().saturating_mul(1000),
    ))
}

/// Trades the current certificate for one of a fresh key, over mutual TLS
/// with the current one, and saves it in `dir`; the next dial uses it.
pub async fn renew(
    hub: &Uri,
    current: &Identity,
    cluster_name: &str,
    dir: &Path,
) -> Result<Identity> {
    let tls = transport::mutual_config(&current.ca_pem, &current.cert_pem, &current.key_pem)?;
    let channel = transport::channel(hub, tls).await?;
    let (key_pem, csr_pem) = key_and_csr(cluster_name)?;
    let resp = FleetClient::new(channel)
        .renew(RenewRequest { csr_pem })
        .await
        .map_err(|s| {
            let text = format!("renewal: {:?}: {}", s.code(), s.message());
            match s.code() {
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                    Error::Refused(text)
                }
                _ => Error::Hub(text),
            }
        })?
        .into_inner();
    // A certificate that does not go with the key is never saved.
    transport::mutual_config(&current.ca_pem, &resp.certificate_pem, &key_pem)?;
    save_renewed(dir, &key_pem, &resp.certificate_pem)?;
    info!(cluster = %cluster_name, "certificate renewed");
    Ok(Identity {
        ca_pem: current.ca_pem.clone(),
        cert_pem: resp.certificate_pem,
        key_pem,
    })
}

/// A fresh ECDSA P-256 key and a CSR naming the cluster; returns (key PEM, CSR PEM).
pub fn key_and_csr(cluster_name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Enrolment(format!("cannot generate a key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| Error::Enrolment(format!("CSR: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cluster_name);
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| Error::Enrolment(format!("CSR: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

/// Turns a refusal from the hub into a message saying what is wrong.
fn refusal(cluster_name: &str, status: &tonic::Status) -> Error {
    use tonic::Code;
    let msg = status.message();
    Error::Enrolment(match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => format!("token refused: {msg}"),
        Code::AlreadyExists => {
            format!("cluster {cluster_name:?} is already enrolled at the hub: {msg}")
        }
        Code::InvalidArgument => format!("enrolment refused: {msg}"),
        Code::Unavailable => format!("hub unavailable: {msg}"),
        code => format!("enrolment failed ({code:?}): {msg}"),
    })
}

/// Enrols with the hub and stores the identity in `dir`.
pub async fn enroll(
    hub: &Uri,
    token: &str,
    cluster_name: &str,
    labels: &Labels,
    dir: &Path,
) -> Result<Identity> {
    let token: JoinToken = token
        .parse()
        .map_err(|e: flotilla_shared::Error| Error::Config(e.to_string()))?;

    // 1. The CA, over TLS we cannot verify yet; pinned by the token.
    let channel = transport::channel(hub, transport::insecure_config()?).await?;
    let ca_pem = EnrolmentClient::new(channel)
        .get_ca(GetCaRequest {})
        .await
        .map_err(|s| refusal(cluster_name, &s))?
        .into_inner()
        .ca_pem;
    // Exactly one certificate, the pinned one: only it is saved and trusted,
    // re-encoded from its DER, so nothing else the hub sent comes along.
    let served = transport::certs_from_pem(&ca_pem)?;
    let ders: Vec<&[u8]> = served.iter().map(|c| c.as_ref()).collect();
    let ca_der = pinned_ca(&ders, &token.ca_hash).map_err(|e| Error::Enrolment(e.to_string()))?;
    let got = ca_hash(ca_der);
    let ca_pem = transport::pem_of_cert(ca_der);
    info!(ca_hash = %got, "hub CA matches the token's pin");

    // 2. The CSR, over TLS verified against that CA.
    let (key_pem, csr_pem) = key_and_csr(cluster_name)?;
    let channel = transport::channel(hub, transport::anonymous_config(&ca_pem)?).await?;
    let resp = EnrolmentClient::new(channel)
        .enroll(EnrollRequest {
            token: token.credential(),
            cluster_name: cluster_name.to_string(),
            labels: labels.clone().into_iter().collect(),
            csr_pem,
        })
        .await
        .map_err(|s| refusal(cluster_name, &s))?
        .into_inner();
    transport::certs_from_pem(&resp.certificate_pem)
        .map_err(|e| Error::Enrolment(format!("the hub returned an unusable certificate: {e}")))?;
    // The configuration is checked once here so a bad certificate fails now.
    transport::mutual_config(&ca_pem, &resp.certificate_pem, &key_pem)?;

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_atomic(dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
    write_atomic(dir, CA_FILE, ca_pem.as_bytes(), 0o644)?;
    // The signing key came over TLS verified against the pinned CA: pinned too
    // (before the certificate, which marks the enrolment done). A hub that does
    // not sign sends none.
    if !resp.signing_public_key.is_empty() {
        crate::trust::save_pin(dir, &resp.signing_public_key)?;
    }
    write_atomic(dir, CERT_FILE, resp.certificate_pem.as_bytes(), 0o600)?;
    info!(cluster = %cluster_name, "enrolled with the hub");
    Ok(Identity {
        ca_pem,
        cert_pem: resp.certificate_pem,
        key_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_names_the_cluster() {
        let (key, csr) = key_and_csr("edge-1").unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(csr.contains("CERTIFICATE REQUEST"));
        let params = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let cn = params
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
            .cloned();
        assert_eq!(cn, Some(rcgen::DnValue::Utf8String("edge-1".into())));
    }

    #[test]
    fn atomic_write_sets_mode_and_identity_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(load_identity(dir.path()).unwrap().is_none());
        write_atomic(dir.path(), KEY_FILE, b"k", 0o600).unwrap();
        write_atomic(dir.path(), CA_FILE, b"ca", 0o644).unwrap();
        write_atomic(dir.path(), CERT_FILE, b"c", 0o644).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let id = load_identity(dir.path()).unwrap().unwrap();
        assert_eq!(id.key_pem, "k");
        assert_eq!(format!("{id:?}"), "Identity { .. }");
    }

    #[test]
    fn a_renewal_cut_short_leaves_one_whole_pair() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_atomic(d, KEY_FILE, b"k1", 0o600).unwrap();
        write_atomic(d, CA_FILE, b"ca", 0o644).unwrap();
        write_atomic(d, CERT_FILE, b"c1", 0o600).unwrap();
        // Stopped after the new key was written, before its certificate: the old pair.
        write_atomic(d, NEXT_KEY_FILE, b"k2", 0o600).unwrap();
        let id = load_identity(d).unwrap().unwrap();
        assert_eq!((id.key_pem.as_str(), id.cert_pem.as_str()), ("k1", "c1"));
        assert!(!d.join(NEXT_KEY_FILE).exists());
        // Stopped after the key was moved in, before the certificate: the new pair.
        write_atomic(d, NEXT_CERT_FILE, b"c2", 0o600).unwrap();
        write_atomic(d, KEY_FILE, b"k2", 0o600).unwrap();
        let id = load_identity(d).unwrap().unwrap();
        assert_eq!((id.key_pem.as_str(), id.cert_pem.as_str()), ("k2", "c2"));
        // A whole renewal.
        save_renewed(d, "k3", "c3").unwrap();
        let id = load_identity(d).unwrap().unwrap();
        assert_eq!((id.key_pem.as_str(), id.cert_pem.as_str()), ("k3", "c3"));
        for f in [KEY_FILE, CERT_FILE] {
            let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert!(!d.join(NEXT_KEY_FILE).exists() && !d.join(NEXT_CERT_FILE).exists());
    }
}
