//! The agent library's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the agent's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store: {0}")]
    Store(#[from] sled::Error),
    #[error("state store holds an unreadable record under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("state store: {0}")]
    Writer(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot reach the hub at {hub}: {reason}")]
    Connect { hub: String, reason: String },
    #[error("{0}")]
    Enrolment(String),
    #[error("hub: {0}")]
    Hub(String),
    /// The hub refused this cluster's certificate (deleted, revoked, replaced).
    #[error("the hub refused this cluster's certificate: {0}")]
    Refused(String),
    #[error("Kubernetes: {0}")]
    Kube(String),
    #[error("desired state refused: {0}")]
    Untrusted(#[from] flotilla_shared::signing::Refusal),
    #[error("{0}")]
    Transfer(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
