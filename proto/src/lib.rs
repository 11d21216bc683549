//! Wire types between the hub and its agents (generated from `proto/flotilla.proto`
//! with protox, no system protoc) and their conversions to and from the domain
//! types of `flotilla-shared`. Nothing outside this crate builds domain values
//! from wire values by hand.

#![allow(clippy::derive_partial_eq_without_eq)]

pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

pub mod codec;

use flotilla_shared::bundle::{BundleOptions, Manifest, ObjectRef, Rendered};
use flotilla_shared::drift::{DriftEvent, DriftMode, DriftPolicy, FieldDiff, IgnoreRule};
use flotilla_shared::signing::{Endorsement, Envelope};
use flotilla_shared::state::BundleState;

pub mod chunks;
pub mod delta;
pub mod transfer;

/// The protocol features an agent may advertise in `Hello.features`
/// (feature negotiation; see `proto/flotilla.proto`).
pub mod features {
    /// The hub may send contents as `ContentChunk`s before the `Desired` that
    /// lists them in `chunked` ([`crate::chunks`]).
    pub const CHUNKED_CONTENTS: &str = "chunked-contents";

    /// With [`CHUNKED_CONTENTS`]: a content may come as a `ContentDelta` of
    /// the objects the agent lacks ([`crate::delta`]).
    pub const OBJECT_DELTAS: &str = "object-deltas";

    /// Every feature this build speaks.
    pub const ALL: &[&str] = &[CHUNKED_CONTENTS, OBJECT_DELTAS];
}

/// A wire value that does not make a valid domain value.
#[derive(Debug, thiserror::Error)]
pub enum ConversionError {
    #[error("bundle state is unspecified")]
    UnspecifiedState,
    #[error("unknown bundle state {0}")]
    UnknownState(i32),
    #[error("manifest from {file} is not valid JSON: {reason}")]
    Manifest { file: String, reason: String },
    #[error("unknown drift mode {0}")]
    UnknownDriftMode(i32),
    #[error("drift event {id}: field {path}: not valid JSON: {reason}")]
    DriftField {
        id: u64,
        path: String,
        reason: String,
    },
}

impl From<&DriftPolicy> for v1::DriftPolicy {
    fn from(p: &DriftPolicy) -> Self {
        let mode = match p.mode {
            DriftMode::Correct => v1::drift_policy::Mode::Correct,
            DriftMode::Report => v1::drift_policy::Mode::Report,
        };
        v1::DriftPolicy {
            mode: mode as i32,
            ignore: p
                .ignore
                .iter()
                .map(|r| v1::IgnoreRule {
                    api_version: r.api_version.clone(),
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    json_pointers: r.json_pointers.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&v1::DriftPolicy> for DriftPolicy {
    type Error = ConversionError;

    fn try_from(p: &v1::DriftPolicy) -> Result<Self, ConversionError> {
        let mode = match v1::drift_policy::Mode::try_from(p.mode) {
            Ok(v1::drift_policy::Mode::Correct) => DriftMode::Correct,
            Ok(v1::drift_policy::Mode::Report) => DriftMode::Report,
            Err(_) => return Err(ConversionError::UnknownDriftMode(p.mode)),
        };
        Ok(DriftPolicy {
            mode,
            ignore: p
                .ignore
                .iter()
                .map(|r| IgnoreRule {
                    api_version: r.api_version.clone(),
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    json_pointers: r.json_pointers.clone(),
                })
                .collect(),
        })
    }
}

impl From<&DriftEvent> for v1::DriftEvent {
    fn from(e: &DriftEvent) -> Self {
        v1::DriftEvent {
            id: e.id,
            bundle: e.bundle.clone(),
            api_version: e.object.api_version.clone(),
            kind: e.object.kind.clone(),
            namespace: e.object.namespace.clone().unwrap_or_default(),
            name: e.object.name.clone(),
            fields: e
                .fields
                .iter()
                .map(|f| v1::FieldDiff {
                    path: f.path.clone(),
                    desired_json: f.desired.to_string(),
                    live_json: f.live.to_string(),
                })
                .collect(),
            manager: e.manager.clone(),
            detected_at_unix_ms: e.detected_at_unix_ms,
            corrected: e.corrected,
            deleted: e.deleted,
        }
    }
}

impl TryFrom<&v1::DriftEvent> for DriftEvent {
    type Error = ConversionError;

    fn try_from(e: &v1::DriftEvent) -> Result<Self, ConversionError> {
        let json = |path: &str, s: &str| {
            serde_json::from_str(s).map_err(|err| ConversionError::DriftField {
                id: e.id,
                path: path.to_string(),
                reason: err.to_string(),
            })
        };
        let fields = e
            .fields
            .iter()
            .map(|f| {
                Ok(FieldDiff {
                    path: f.path.clone(),
                    desired: json(&f.path, &f.desired_json)?,
                    live: json(&f.path, &f.live_json)?,
                    manager: String::new(),
                })
            })
            .collect::<Result<_, ConversionError>>()?;
        Ok(DriftEvent {
            id: e.id,
            bundle: e.bundle.clone(),
            object: ObjectRef {
                api_version: e.api_version.clone(),
                kind: e.kind.clone(),
                namespace: (!e.namespace.is_empty()).then(|| e.namespace.clone()),
                name: e.name.clone(),
            },
            fields,
            manager: e.manager.clone(),
            detected_at_unix_ms: e.detected_at_unix_ms,
            corrected: e.corrected,
            deleted: e.deleted,
        })
    }
}

impl From<BundleState> for v1::BundleState {
    fn from(s: BundleState) -> Self {
        match s {
            BundleState::Ready => v1::BundleState::Ready,
            BundleState::NotReady => v1::BundleState::NotReady,
            BundleState::WaitApplied => v1::BundleState::WaitApplied,
            BundleState::ErrApplied => v1::BundleState::ErrApplied,
            BundleState::OutOfSync => v1::BundleState::OutOfSync,
            BundleState::Pending => v1::BundleState::Pending,
            BundleState::Modified => v1::BundleState::Modified,
        }
    }
}

impl TryFrom<v1::BundleState> for BundleState {
    type Error = ConversionError;

    fn try_from(s: v1::BundleState) -> Result<Self, ConversionError> {
        Ok(match s {
            v1::BundleState::Unspecified => return Err(ConversionError::UnspecifiedState),
            v1::BundleState::Ready => BundleState::Ready,
            v1::BundleState::NotReady => BundleState::NotReady,
            v1::BundleState::WaitApplied => BundleState::WaitApplied,
            v1::BundleState::ErrApplied => BundleState::ErrApplied,
            v1::BundleState::OutOfSync => BundleState::OutOfSync,
            v1::BundleState::Pending => BundleState::Pending,
            v1::BundleState::Modified => BundleState::Modified,
        })
    }
}

/// Reads the state of a status message, rejecting unknown numbers.
pub fn status_state(status: &v1::BundleStatus) -> Result<BundleState, ConversionError> {
    v1::BundleState::try_from(status.state)
        .map_err(|_| ConversionError::UnknownState(status.state))?
        .try_into()
}

/// A rendered bundle as sent to agents.
/// The largest gRPC message the hub and the agent exchange, both ways: both
/// sides set it, so a set the hub may send is one the agent may read (tonic's
/// own default for reading is 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The largest content of one bundle the hub renders: what an agent that speaks
/// "chunked-contents" buffers at most ([`chunks::MAX_CONTENT_BYTES`], 1 GiB);
/// in practice the manifest budget (`flotilla_shared::documents::MAX_BUNDLE_BYTES`,
/// 64 MiB) binds first. Larger contents are refused at render time, with the
/// reason, as the bundle's error.
pub const MAX_BUNDLE_BYTES: usize = chunks::MAX_CONTENT_BYTES as usize;

/// The largest content the hub sends inline in a `Desired`, to a v1 agent: a
/// quarter of a message, leaving room for the rest of the set. A set that needs
/// a larger one (or whose message would exceed [`MAX_MESSAGE_BYTES`]) is held at
/// the hub, with a warning, until the agent speaks "chunked-contents" or the
/// content shrinks.
pub const MAX_INLINE_BYTES: usize = MAX_MESSAGE_BYTES / 4;

/// Why a bundle's content cannot be sent, if it is over `max` bytes on the wire.
pub fn oversized(content_hash: &str, rendered: &Rendered, max: usize) -> Option<String> {
    let len = content_len(content_hash, rendered);
    (len > max).then(|| {
        format!(
            "the bundle's content is {len} bytes, over the {max} bytes one bundle may take in \
             the hub-agent protocol: split it into several bundles"
        )
    })
}

/// The encoded length of `bundle_content(content_hash, rendered)`, measured one
/// manifest at a time: no copy of the whole content is made.
pub fn content_len(content_hash: &str, rendered: &Rendered) -> usize {
    let head = bundle_content(
        content_hash,
        &Rendered {
            manifests: Vec::new(),
            options: rendered.options.clone(),
        },
    );
    let manifests: usize = rendered
        .manifests
        .iter()
        .map(|m| {
            let wire = v1::Manifest {
                file: m.file.clone(),
                json: m.object.to_string(),
            };
            prost::encoding::message::encoded_len(2, &wire)
        })
        .sum();
    prost::Message::encoded_len(&head) + manifests
}

pub fn bundle_content(content_hash: &str, rendered: &Rendered) -> v1::BundleContent {
    v1::BundleContent {
        content_hash: content_hash.to_string(),
        manifests: rendered
            .manifests
            .iter()
            .map(|m| v1::Manifest {
                file: m.file.clone(),
                json: m.object.to_string(),
            })
            .collect(),
        default_namespace: rendered
            .options
            .default_namespace
            .clone()
            .unwrap_or_default(),
        target_namespace: rendered
            .options
            .target_namespace
            .clone()
            .unwrap_or_default(),
        drift: (!rendered.options.drift.is_default()).then(|| (&rendered.options.drift).into()),
        take_ownership: rendered.options.take_ownership,
    }
}

impl TryFrom<&v1::BundleContent> for Rendered {
    type Error = ConversionError;

    fn try_from(c: &v1::BundleContent) -> Result<Self, ConversionError> {
        let manifests = c
            .manifests
            .iter()
            .map(|m| {
                serde_json::from_str(&m.json)
                    .map(|object| Manifest {
                        file: m.file.clone(),
                        object,
                    })
                    .map_err(|e| ConversionError::Manifest {
                        file: m.file.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Rendered {
            manifests,
            options: BundleOptions {
                default_namespace: opt(&c.default_namespace),
                target_namespace: opt(&c.target_namespace),
                drift: c
                    .drift
                    .as_ref()
                    .map(DriftPolicy::try_from)
                    .transpose()?
                    .unwrap_or_default(),
                take_ownership: c.take_ownership,
            },
        })
    }
}

impl From<&Envelope> for v1::SignedDesired {
    fn from(e: &Envelope) -> Self {
        v1::SignedDesired {
            payload: e.payload.clone(),
            signature: e.signature.clone(),
            key_id: e.key_id.clone(),
            public_key: e.public_key.clone(),
            chain: e
                .chain
                .iter()
                .map(|c| v1::KeyEndorsement {
                    public_key: c.public_key.clone(),
                    endorsed_by: c.endorsed_by.clone(),
                    signature: c.signature.clone(),
                })
                .collect(),
        }
    }
}

impl From<&v1::SignedDesired> for Envelope {
    fn from(s: &v1::SignedDesired) -> Self {
        Envelope {
            payload: s.payload.clone(),
            signature: s.signature.clone(),
            key_id: s.key_id.clone(),
            public_key: s.public_key.clone(),
            chain: s
                .chain
                .iter()
                .map(|c| Endorsement {
                    public_key: c.public_key.clone(),
                    endorsed_by: c.endorsed_by.clone(),
                    signature: c.signature.clone(),
                })
                .collect(),
        }
    }
}

/// The digest a content really has: its manifests and options hashed as the hub
/// hashed them when it rendered them. Unreadable content has none.
pub fn content_digest(c: &v1::BundleContent) -> Result<String, ConversionError> {
    Rendered::try_from(c).map(|r| r.content_hash())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in BundleState::ALL {
            let w: v1::BundleState = s.into();
            assert_eq!(BundleState::try_from(w).unwrap(), s);
        }
        assert!(BundleState::try_from(v1::BundleState::Unspecified).is_err());
    }

    #[test]
    fn content_round_trips_and_keeps_hash() {
        let rendered = Rendered {
            manifests: vec![Manifest {
                file: "a.yaml".into(),
                object: serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}),
            }],
            options: BundleOptions {
                default_namespace: Some("d".into()),
                target_namespace: None,
                ..Default::default()
            },
        };
        let hash = rendered.content_hash();
        let wire = bundle_content(&hash, &rendered);
        let back = Rendered::try_from(&wire).unwrap();
        assert_eq!(back, rendered);
        assert_eq!(back.content_hash(), hash);
        assert!(wire.drift.is_none(), "the default policy is not sent");

        // A drift policy travels and changes the hash.
        let mut with_policy = rendered.clone();
        with_policy.options.drift = DriftPolicy {
            mode: DriftMode::Report,
            ignore: vec![IgnoreRule {
                kind: "Deployment".into(),
                json_pointers: vec!["/spec/replicas".into()],
                ..Default::default()
            }],
        };
        let h2 = with_policy.content_hash();
        assert_ne!(h2, hash);
        let back = Rendered::try_from(&bundle_content(&h2, &with_policy)).unwrap();
        assert_eq!(back, with_policy);

        // So does takeOwnership; without it the hash is the one it was.
        let mut adopting = rendered.clone();
        adopting.options.take_ownership = true;
        let h3 = adopting.content_hash();
        assert_ne!(h3, hash);
        let wire = bundle_content(&h3, &adopting);
        assert!(wire.take_ownership);
        assert_eq!(Rendered::try_from(&wire).unwrap(), adopting);
    }

    #[test]
    fn drift_events_round_trip() {
        let e = DriftEvent {
            id: 7,
            bundle: "b".into(),
            object: ObjectRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: Some("demo".into()),
                name: "c".into(),
            },
            fields: vec![FieldDiff {
                path: "/data/mode".into(),
                desired: serde_json::json!("blue"),
                live: serde_json::Value::Null,
                manager: String::new(),
            }],
            manager: "kubectl-patch".into(),
            detected_at_unix_ms: 5,
            corrected: true,
            deleted: false,
        };
        let w = v1::DriftEvent::from(&e);
        assert_eq!(DriftEvent::try_from(&w).unwrap(), e);
        let mut bad = w.clone();
        bad.fields[0].live_json = "{".into();
        assert!(DriftEvent::try_from(&bad).is_err());
    }
}
