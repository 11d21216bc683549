//! Wire types between the hub and its agents (generated from `proto/flotilla.proto`
//! with protox, no system protoc) and their conversions to and from the domain
//! types of `flotilla-shared`. Nothing outside this crate builds domain values
//! from wire values by hand.

#![allow(clippy::derive_partial_eq_without_eq)]

pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

use flotilla_shared::bundle::{BundleOptions, Manifest, Rendered};
use flotilla_shared::state::BundleState;

/// A wire value that does not make a valid domain value.
#[derive(Debug, thiserror::Error)]
pub enum ConversionError {
    #[error("bundle state is unspecified")]
    UnspecifiedState,
    #[error("unknown bundle state {0}")]
    UnknownState(i32),
    #[error("manifest from {file} is not valid JSON: {reason}")]
    Manifest { file: String, reason: String },
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
            },
        })
    }
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
            },
        };
        let hash = rendered.content_hash();
        let wire = bundle_content(&hash, &rendered);
        let back = Rendered::try_from(&wire).unwrap();
        assert_eq!(back, rendered);
        assert_eq!(back.content_hash(), hash);
    }
}
