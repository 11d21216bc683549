//! The domain's error type.

/// Everything that can be wrong with input the domain is handed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("invalid label selector {selector:?}: {reason}")]
    Selector { selector: String, reason: String },
    #[error("invalid label {label:?}: {reason}")]
    Label { label: String, reason: String },
    #[error("invalid join token: {0}")]
    Token(String),
    /// The CA a hub served does not satisfy the join token's pin.
    #[error("refusing the hub's CA: {0}")]
    CaPin(String),
    #[error("{file}: document {document}: {reason}")]
    Object {
        file: String,
        document: usize,
        reason: String,
    },
    #[error("invalid name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("invalid duration {value:?}: {reason}")]
    Duration { value: String, reason: String },
    /// `url` has any credentials removed.
    #[error("invalid repository URL {url:?}: {reason}")]
    RepoUrl { url: String, reason: String },
}
