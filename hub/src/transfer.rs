//! Desired state, statuses and enrolments by file, for clusters with no network
//! path to the hub (`flotilla bundle export`, `flotilla cluster import-status`,
//! `flotilla cluster enroll --request`). A file is hostile input until verified:
//! a status file must be signed by the cluster's pinned certificate, an
//! enrolment request MACed with its join token; nothing in either is looked at
//! before that check passes.

use std::collections::HashSet;
use std::sync::Arc;

use flotilla_proto::transfer::{self, FileError};
use flotilla_proto::v1::{self, transfer_file::Body};
use flotilla_shared::signing::{self, Acks};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::fleet::{DriftOutcome, Fleet};
use crate::pki::Pki;
use crate::store::FileMarks;

/// Why a file was refused, or an export impossible.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    NotFound(String),
    /// The file is not what it claims (signature, MAC, pin, cluster).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn read_file(bytes: &[u8]) -> Result<Body, TransferError> {
    transfer::decode(bytes).map_err(|e: FileError| TransferError::Invalid(e.to_string()))
}

fn wrong_kind(found: &Body, wanted: &'static str) -> TransferError {
    TransferError::Invalid(transfer::wrong_kind(found, wanted).to_string())
}

/// A verified status report.
struct Report {
    report: v1::StatusReport,
}

/// Checks a status file: its certificate is the one the hub pins for the
/// cluster it names, and its key signed the report's exact bytes. The report
/// is read only then, and must be that cluster's.
fn verify_status(fleet: &Fleet, file: &v1::StatusFile) -> Result<Report, TransferError> {
    let unreadable = |e: String| {
        TransferError::Refused(format!("the status file's certificate is unreadable: {e}"))
    };
    let der =
        crate::pki::pem_to_der(&file.certificate_pem).map_err(|e| unreadable(e.to_string()))?;
    let cluster = crate::pki::cluster_from_cert(der.as_ref())
        .ok_or_else(|| unreadable("it names no cluster".into()))?;
    let record = fleet.cluster_record(&cluster).ok_or_else(|| {
        TransferError::NotFound(format!("cluster {cluster:?} is not enrolled at this hub"))
    })?;
    let sha = hex::encode(Sha256::digest(der.as_ref()));
    let pins = record.pins();
    if pins.current.as_deref() != Some(sha.as_str()) && pins.next.as_deref() != Some(sha.as_str()) {
        return Err(TransferError::Refused(format!(
            "the status file is signed with a certificate that is not the one this hub pins \
             for cluster {cluster}"
        )));
    }
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| unreadable(e.to_string()))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(&signing::status_message(&file.report), &file.signature)
        .map_err(|_| {
            TransferError::Refused(format!(
                "the status file's signature does not verify with cluster {cluster}'s \
                 certificate: it was altered"
            ))
        })?;
    let report = v1::StatusReport::decode(file.report.as_slice())
        .map_err(|e| TransferError::Invalid(format!("the status report is corrupt: {e}")))?;
    if report.cluster != cluster {
        return Err(TransferError::Refused(format!(
            "the status report names cluster {:?}, but is signed by cluster {cluster}",
            report.cluster
        )));
    }
    Ok(Report { report })
}

pub use flotilla_shared::api::Imported;

/// Takes a status file into the fleet, exactly once: statuses at or below the
/// seq imported before, and drift events already stored, add nothing.
pub fn import_status(fleet: &Arc<Fleet>, bytes: &[u8]) -> Result<Imported, TransferError> {
    let file = match read_file(bytes)? {
        Body::Status(f) => f,
        other => {
            return Err(wrong_kind(
                &other,
                "a status report (flotilla-agent export-status)",
            ))
        }
    };
    let Report { report } = verify_status(fleet, &file)?;
    let cluster = report.cluster.clone();
    let marks = fleet
        .cluster_record(&cluster)
        .map(|r| r.file_marks)
        .unwrap_or_default();
    let mut out = Imported {
        cluster: cluster.clone(),
        ..Default::default()
    };
    let mut new_marks = marks;
    let internal = |e: crate::fleet::FleetError| TransferError::Internal(e.to_string());
    let mut statuses = report.statuses.clone();
    statuses.sort_by_key(|s| s.seq);
    for s in statuses {
        let seq = s.seq;
        if seq <= marks.status_seq {
            out.statuses_already += 1;
            continue;
        }
        new_marks.status_seq = new_marks.status_seq.max(seq);
        match crate::gateway::status_record(&cluster, s) {
            Ok(rec) => {
                if fleet.record_status(rec).map_err(internal)? {
                    out.statuses += 1;
                } else {
                    out.refused += 1;
                }
            }
            Err(reason) => {
                tracing::warn!(%cluster, seq, %reason, "invalid status in a status file dropped");
                out.refused += 1;
            }
        }
    }
    for d in &report.drift {
        new_marks.drift_id = new_marks.drift_id.max(d.id);
        match crate::gateway::drift_event(d) {
            Ok(event) => match fleet.record_drift(&cluster, &event).map_err(internal)? {
                DriftOutcome::Stored(_) => out.drift_events += 1,
                DriftOutcome::Resend => out.drift_already += 1,
                DriftOutcome::Refused => out.refused += 1,
            },
            Err(reason) => {
                tracing::warn!(%cluster, id = d.id, %reason, "invalid drift event in a status file dropped");
                out.refused += 1;
            }
        }
    }
    // What the agent holds counts as acknowledged, as a session's DesiredAck
    // would (dependsOn holds, diffs against the cluster).
    if report.desired_seq > 0 {
        let mut bundles: Vec<(String, String, String)> = report
            .desired
            .iter()
            .take(flotilla_shared::caps::HELD_HASHES)
            .filter(|b| flotilla_shared::objects::validate_name(&b.name).is_ok())
            .map(|b| {
                let mut hash = b.content_hash.clone();
                flotilla_shared::caps::cut(&mut hash, flotilla_shared::caps::SHORT);
                (b.name.clone(), hash, String::new())
            })
            .collect();
        bundles.sort();
        let set = crate::fleet::DesiredSet {
            bundles,
            complete: true,
        };
        fleet.record_ack(&cluster, &set, None).map_err(internal)?;
    }
    let seen = u64::try_from(report.exported_at_unix_ms)
        .unwrap_or(0)
        .min(crate::now_ms());
    fleet
        .record_file_marks(&cluster, new_marks, seen)
        .map_err(internal)?;
    fleet
        .store()
        .flush()
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    tracing::info!(%cluster, statuses = out.statuses, already = out.statuses_already,
        drift = out.drift_events, drift_already = out.drift_already, "status file imported");
    Ok(out)
}

/// The cluster's desired state as a file: the signed set, with the acks of what
/// status files brought in, and every content it names, except those the
/// `since` status file says the agent holds.
pub fn export(
    fleet: &Fleet,
    pki: &Pki,
    cluster: &str,
    since: Option<&[u8]>,
) -> Result<Vec<u8>, TransferError> {
    let record = fleet.cluster_record(cluster).ok_or_else(|| {
        TransferError::NotFound(format!("cluster {cluster:?} is not enrolled at this hub"))
    })?;
    let desired = fleet
        .desired(cluster)
        .ok_or_else(|| TransferError::NotFound(format!("cluster {cluster:?} is not enrolled")))?;
    if !desired.complete {
        return Err(TransferError::Unavailable(
            "not every source is loaded yet: an export now could leave out bundles Git has; \
             try again in a moment"
                .into(),
        ));
    }
    let held: HashSet<String> = match since {
        None => HashSet::new(),
        Some(bytes) => {
            let file = match read_file(bytes)? {
                Body::Status(f) => f,
                other => {
                    return Err(wrong_kind(
                        &other,
                        "a status report (flotilla-agent export-status) for --since",
                    ))
                }
            };
            let Report { report } = verify_status(fleet, &file)?;
            if report.cluster != cluster {
                return Err(TransferError::Invalid(format!(
                    "--since: the status file is cluster {}'s, not {cluster}'s",
                    report.cluster
                )));
            }
            report.held_hashes.into_iter().collect()
        }
    };
    let mut contents = Vec::new();
    let mut seen = HashSet::new();
    for (bundle, hash, _) in &desired.bundles {
        if held.contains(hash) || !seen.insert(hash.clone()) {
            continue;
        }
        let rendered = fleet.content(hash).ok_or_else(|| {
            TransferError::Unavailable(format!(
                "the content of bundle {bundle} is not rendered yet; try again in a moment"
            ))
        })?;
        contents.push(flotilla_proto::bundle_content(hash, &rendered));
    }
    let FileMarks {
        status_seq,
        drift_id,
    } = record.file_marks;
    let (seq, envelope) = pki
        .signer
        .sign_desired(
            cluster,
            &desired.bundles,
            Some(Acks {
                status_seq,
                drift_id,
            }),
            crate::now_ms(),
        )
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    tracing::info!(%cluster, seq, bundles = desired.bundles.len(), contents = contents.len(),
        left_out = desired.bundles.len().saturating_sub(contents.len()), "desired state exported");
    Ok(transfer::encode(Body::Desired(v1::DesiredFile {
        cluster: cluster.to_string(),
        signed: Some((&envelope).into()),
        contents,
    })))
}

/// Answers an enrolment request file: the MAC proves the request was made with
/// the token (whose secret never left the agent); the answer is MACed with it.
pub async fn enrol(
    fleet: &Arc<Fleet>,
    pki: &Pki,
    cert_ttl: std::time::Duration,
    bytes: &[u8],
) -> Result<Vec<u8>, TransferError> {
    let file = match read_file(bytes)? {
        Body::EnrollRequest(f) => f,
        other => {
            return Err(wrong_kind(
                &other,
                "an enrolment request (flotilla-agent enroll-request)",
            ))
        }
    };
    let request = v1::EnrollRequest::decode(file.request.as_slice())
        .map_err(|e| TransferError::Invalid(format!("the enrolment request is corrupt: {e}")))?;
    let id = request.token.clone();
    let store = fleet.store().clone();
    let lookup = id.clone();
    let token = tokio::task::spawn_blocking(move || store.token(&lookup))
        .await
        .map_err(|e| TransferError::Internal(e.to_string()))?
        .map_err(|e| TransferError::Internal(e.to_string()))?;
    // Unknown token and wrong MAC read alike: the file proves nothing either way.
    let Some(token) = token.filter(|t| {
        signing::enrol_mac_ok(
            &t.secret_hash,
            signing::ENROLL_REQUEST_DOMAIN,
            &file.request,
            &file.mac,
        )
    }) else {
        return Err(TransferError::Refused(format!(
            "the enrolment request does not verify with join token {id:?}: it was altered, or \
             made with a token this hub did not issue"
        )));
    };
    let response = crate::gateway::enrol(
        fleet,
        pki,
        cert_ttl,
        &id,
        token.secret_hash.clone(),
        request.cluster_name,
        request.labels,
        &request.csr_pem,
    )
    .await
    .map_err(|s| match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            TransferError::Refused(format!("enrolment refused: {}", s.message()))
        }
        tonic::Code::AlreadyExists => TransferError::Invalid(s.message().to_string()),
        tonic::Code::InvalidArgument => {
            TransferError::Invalid(format!("enrolment refused: {}", s.message()))
        }
        _ => TransferError::Internal(s.message().to_string()),
    })?;
    let response = response.encode_to_vec();
    let mac = signing::enrol_mac(
        &token.secret_hash,
        signing::ENROLL_RESPONSE_DOMAIN,
        &response,
    );
    Ok(transfer::encode(Body::EnrollResponse(
        v1::EnrollResponseFile { response, mac },
    )))
}
