//! Fetching bundle contents by digest from an OCI registry (`--oci-registry`),
//! the hub's or a site's mirror of it. What is fetched is checked twice: its
//! SHA-256 against the digest asked for, then (in `trust`) its content digest
//! against the one the signed set names. The registry is trusted for nothing.

use std::time::Duration;

use flotilla_proto::v1;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One blob may take this long.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest blob fetched.
pub const MAX_BLOB: usize = 256 << 20;

/// A registry repository the agent fetches contents from.
#[derive(Clone)]
pub struct Registry {
    base: String,
    repository: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({}/{})", self.base, self.repository)
    }
}

impl Registry {
    pub fn new(url: &str) -> Result<Registry> {
        let (base, repository) =
            flotilla_shared::oci::parse_registry(url).map_err(Error::Config)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| Error::Config(format!("--oci-registry: {e}")))?;
        Ok(Registry {
            base,
            repository,
            http,
        })
    }

    /// The content stored under `digest`, checked against it.
    pub async fn fetch(&self, digest: &str) -> Result<v1::BundleContent> {
        let fail = |reason: String| {
            Error::Transfer(format!(
                "registry {}/{}: blob {digest}: {reason}",
                self.base, self.repository
            ))
        };
        if !flotilla_shared::oci::is_sha256_digest(digest) {
            return Err(fail("not a sha256 digest".into()));
        }
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        let mut resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(crate::transport::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(fail(resp.status().to_string()));
        }
        let mut blob = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fail(crate::transport::error_chain(&e)))?
        {
            if blob.len() + chunk.len() > MAX_BLOB {
                return Err(fail(format!("over {MAX_BLOB} bytes")));
            }
            blob.extend_from_slice(&chunk);
        }
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
        if got != digest {
            return Err(fail(format!("the registry served {got}")));
        }
        v1::BundleContent::decode(blob.as_slice()).map_err(|e| fail(format!("not a content: {e}")))
    }
}
