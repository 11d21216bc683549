//! Desired state, statuses and enrolment by file, for a cluster with no network
//! path to its hub:
//! - `import`: a desired-state file (`flotilla bundle export`) is verified like a
//!   set from the network (signature, pin, cluster, seq, every content's
//!   digest), stored, and applied; the acknowledgements it carries retire the
//!   statuses and drift events the hub has imported;
//! - `export_status`: the statuses and drift events the hub has not
//!   acknowledged, signed with the agent's client key;
//! - `enroll_request` / `enroll_response`: enrolment, MACed with the join token
//!   (its secret never leaves the agent).
//!
//! A running agent does these through its control socket ([`crate::control`]);
//! with none running, the commands open the store themselves.

use std::path::Path;

use flotilla_proto::transfer;
use flotilla_proto::v1::{self, transfer_file::Body};
use flotilla_shared::labels::Labels;
use flotilla_shared::signing;
use flotilla_shared::token::{ca_hash, hash_secret, pinned_ca, JoinToken};
use prost::Message;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::enroll::{self, write_atomic, CA_FILE, CERT_FILE, KEY_FILE};
use crate::error::{Error, Result};
use crate::trust::{Trust, Via};
use crate::writer::Writer;

/// The key of an enrolment by file, until the response arrives.
pub const PENDING_KEY_FILE: &str = "enroll.key";
/// What the response is checked with: the token's id, its secret's hash, the CA pin.
pub const PENDING_FILE: &str = "enroll.json";

fn wrong_kind(found: &Body, wanted: &'static str) -> Error {
    Error::Transfer(transfer::wrong_kind(found, wanted).to_string())
}

fn read(bytes: &[u8]) -> Result<Body> {
    transfer::decode(bytes).map_err(|e| Error::Transfer(e.to_string()))
}

/// Imports a desired-state file; returns a line saying what it did.
pub async fn import(
    writer: &Writer,
    trust: &Trust,
    bytes: &[u8],
    allow_downgrade: bool,
) -> Result<String> {
    let file = match read(bytes)? {
        Body::Desired(f) => f,
        other => {
            return Err(wrong_kind(
                &other,
                "a desired state (flotilla bundle export)",
            ))
        }
    };
    let (taken, acks) = trust
        .take(
            writer,
            file.signed.as_ref(),
            &file.contents,
            Via::File { allow_downgrade },
            None,
        )
        .await?;
    // What the hub imported from earlier status files is retired here.
    let mut retired = 0;
    if let Some(a) = acks {
        writer.ack(a.status_seq).await?;
        let pending = writer.read(|s| s.pending_drift()).await?;
        for e in pending.iter().filter(|e| e.id <= a.drift_id) {
            writer.ack_drift(e.id).await?;
            retired += 1;
        }
    }
    writer.sync().await?;
    Ok(if taken.same {
        format!(
            "desired set {} is the one held: nothing changed ({retired} drift events acknowledged)",
            taken.seq
        )
    } else {
        format!(
            "imported desired set {}: {} bundles, {} contents from the file ({retired} drift \
             events acknowledged by the hub)",
            taken.seq, taken.bundles, taken.new_contents
        )
    })
}

/// The agent's signed status report: what the hub has not acknowledged.
pub async fn export_status(
    writer: &Writer,
    state_dir: &Path,
    cluster: &str,
    now_unix_ms: i64,
    kubernetes_version: String,
) -> Result<Vec<u8>> {
    let id = enroll::load_identity(state_dir)?.ok_or_else(|| {
        Error::Config(format!(
            "{} holds no certificate: enrol the agent first (flotilla-agent enroll-request)",
            state_dir.display()
        ))
    })?;
    let (statuses, drift, held_hashes, desired) = writer
        .read(|s| {
            let statuses = s.statuses_after(s.acked_seq()?)?;
            let drift = s.pending_drift()?;
            let held = s.held_hashes()?;
            let desired = s.desired()?.unwrap_or_default();
            Ok((statuses, drift, held, desired))
        })
        .await?;
    let desired_seq = desired.signed.as_ref().map_or(0, |h| h.seq);
    let report = v1::StatusReport {
        cluster: cluster.to_string(),
        exported_at_unix_ms: now_unix_ms,
        statuses: statuses
            .iter()
            .map(crate::session::status_message)
            .collect(),
        drift: drift.iter().map(Into::into).collect(),
        held_hashes,
        desired_seq,
        desired: desired
            .bundles
            .iter()
            .map(|b| v1::BundleRef {
                name: b.name.clone(),
                content_hash: b.content_hash.clone(),
                revision: b.revision.clone(),
                blob_digest: String::new(),
            })
            .collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kubernetes_version,
    }
    .encode_to_vec();
    let signature = sign_with_client_key(&id.key_pem, &signing::status_message(&report))?;
    Ok(transfer::encode(Body::Status(v1::StatusFile {
        report,
        signature,
        certificate_pem: id.cert_pem,
    })))
}

fn sign_with_client_key(key_pem: &str, message: &[u8]) -> Result<Vec<u8>> {
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("the client key is unreadable: {e}")))?;
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .map_err(|e| Error::Tls(format!("the client key is not ECDSA P-256: {e}")))?;
    pair.sign(&rng, message)
        .map(|s| s.as_ref().to_vec())
        .map_err(|_| Error::Tls("signing the status report failed".into()))
}

/// Kept between `enroll-request` and `enroll --response`.
#[derive(Serialize, Deserialize)]
struct Pending {
    cluster: String,
    token_id: String,
    secret_hash: String,
    ca_hash: String,
}

/// Writes an enrolment request for `cluster` with `token`; keeps its key and
/// the token's hash in the state directory for the response.
pub fn enroll_request(
    state_dir: &Path,
    token: &str,
    cluster: &str,
    labels: &Labels,
) -> Result<Vec<u8>> {
    let token: JoinToken = token
        .parse()
        .map_err(|e: flotilla_shared::Error| Error::Config(e.to_string()))?;
    if state_dir.join(CERT_FILE).exists() {
        return Err(Error::Config(format!(
            "{} is enrolled already (it holds {CERT_FILE})",
            state_dir.display()
        )));
    }
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io(state_dir, e))?;
    let (key_pem, csr_pem) = enroll::key_and_csr(cluster)?;
    let request = v1::EnrollRequest {
        // The id alone: the MAC proves the secret.
        token: token.id.clone(),
        cluster_name: cluster.to_string(),
        labels: labels.clone().into_iter().collect(),
        csr_pem,
    }
    .encode_to_vec();
    let secret_hash = hash_secret(&token.secret);
    let mac = signing::enrol_mac(&secret_hash, signing::ENROLL_REQUEST_DOMAIN, &request);
    let pending = Pending {
        cluster: cluster.to_string(),
        token_id: token.id,
        secret_hash,
        ca_hash: token.ca_hash,
    };
    write_atomic(state_dir, PENDING_KEY_FILE, key_pem.as_bytes(), 0o600)?;
    let json = serde_json::to_vec(&pending).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(state_dir, PENDING_FILE, &json, 0o600)?;
    Ok(transfer::encode(Body::EnrollRequest(
        v1::EnrollRequestFile { request, mac },
    )))
}

/// Takes the hub's enrolment response: checks its MAC with the token, the CA
/// against the token's pin, the certificate against the pending key, then
/// saves the identity and pins the signing key. Returns the cluster name.
pub fn enroll_response(state_dir: &Path, bytes: &[u8]) -> Result<String> {
    let pending_path = state_dir.join(PENDING_FILE);
    let pending: Pending = match std::fs::read(&pending_path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::Config(format!("{}: {e}", pending_path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Config(format!(
                "{} holds no pending enrolment: run `flotilla-agent enroll-request` first",
                state_dir.display()
            )))
        }
        Err(e) => return Err(Error::io(pending_path, e)),
    };
    let key_path = state_dir.join(PENDING_KEY_FILE);
    let key_pem = std::fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, e))?;
    let file = match read(bytes)? {
        Body::EnrollResponse(f) => f,
        other => {
            return Err(wrong_kind(
                &other,
                "an enrolment response (flotilla cluster enroll)",
            ))
        }
    };
    if !signing::enrol_mac_ok(
        &pending.secret_hash,
        signing::ENROLL_RESPONSE_DOMAIN,
        &file.response,
        &file.mac,
    ) {
        return Err(Error::Enrolment(format!(
            "the enrolment response does not verify with join token {}: it was altered, or is \
             not the answer to this agent's request",
            pending.token_id
        )));
    }
    let resp = v1::EnrollResponse::decode(file.response.as_slice())
        .map_err(|e| Error::Enrolment(format!("the enrolment response is corrupt: {e}")))?;
    let served = crate::transport::certs_from_pem(&resp.ca_pem)?;
    let ders: Vec<&[u8]> = served.iter().map(|c| c.as_ref()).collect();
    let ca_der = pinned_ca(&ders, &pending.ca_hash).map_err(|e| Error::Enrolment(e.to_string()))?;
    let ca_pem = crate::transport::pem_of_cert(ca_der);
    tracing::info!(ca_hash = %ca_hash(ca_der), "hub CA matches the token's pin");
    // The certificate goes with the pending key, or nothing is saved.
    crate::transport::mutual_config(&ca_pem, &resp.certificate_pem, &key_pem)?;
    if resp.signing_public_key.is_empty() {
        return Err(Error::Enrolment(
            "the hub's response carries no signing key: this hub cannot serve an air-gapped agent"
                .into(),
        ));
    }
    crate::trust::save_pin(state_dir, &resp.signing_public_key)?;
    write_atomic(state_dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
    write_atomic(state_dir, CA_FILE, ca_pem.as_bytes(), 0o644)?;
    write_atomic(state_dir, CERT_FILE, resp.certificate_pem.as_bytes(), 0o600)?;
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(&pending_path);
    tracing::info!(cluster = %pending.cluster,
        signing_key = %signing::key_id(&resp.signing_public_key), "enrolled by file");
    Ok(pending.cluster)
}
