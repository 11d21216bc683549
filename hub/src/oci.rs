//! Pushing bundle contents to an OCI registry (`--oci-registry
//! http(s)://HOST[:PORT]/REPOSITORY`), by digest, with the distribution API's
//! monolithic blob upload. An agent configured with a registry (the same, or a
//! mirror of it) fetches them by digest, and the hub sends it only the signed
//! set: fan-out leaves the hub, and a site's mirror keeps serving while the
//! hub is away. Each blob is pushed once per hub process (a HEAD first: a
//! restarted hub pushes nothing the registry has).
//!
//! The registry holds rendered manifests: make it private, as the Git
//! repositories are.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// One push or check may take this long.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{1}")]
    Url(String, String),
    #[error("registry {url}: {reason}")]
    Http { url: String, reason: String },
}

/// A registry repository the hub pushes to.
pub struct Registry {
    /// `scheme://host[:port]`.
    base: String,
    repository: String,
    http: reqwest::Client,
    pushed: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({}/{})", self.base, self.repository)
    }
}

/// `sha256:<hex>` of a blob.
pub fn digest(blob: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(blob)))
}

impl Registry {
    pub fn new(url: &str) -> Result<Registry, OciError> {
        let (base, repository) = flotilla_shared::oci::parse_registry(url)
            .map_err(|e| OciError::Url(url.to_string(), e))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| OciError::Url(url.to_string(), e.to_string()))?;
        Ok(Registry {
            base,
            repository,
            http,
            pushed: Mutex::default(),
        })
    }

    fn err(&self, reason: impl std::fmt::Display) -> OciError {
        OciError::Http {
            url: format!("{}/{}", self.base, self.repository),
            reason: reason.to_string(),
        }
    }

    /// Makes sure the registry holds `blob`; returns its digest.
    pub async fn ensure(&self, blob: &[u8]) -> Result<String, OciError> {
        let digest = digest(blob);
        if self
            .pushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&digest)
        {
            return Ok(digest);
        }
        let blob_url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        let head = self
            .http
            .head(&blob_url)
            .send()
            .await
            .map_err(|e| self.err(e))?;
        if !head.status().is_success() {
            self.push(blob, &digest).await?;
        }
        self.pushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.clone());
        Ok(digest)
    }

    async fn push(&self, blob: &[u8], digest: &str) -> Result<(), OciError> {
        let start = format!("{}/v2/{}/blobs/uploads/", self.base, self.repository);
        let resp = self
            .http
            .post(&start)
            .send()
            .await
            .map_err(|e| self.err(e))?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            return Err(self.err(format!("starting an upload: {}", resp.status())));
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.err("the upload has no Location"))?;
        // Relative or absolute, as the spec allows.
        let mut url = reqwest::Url::parse(&self.base)
            .and_then(|b| b.join(location))
            .map_err(|e| self.err(e))?;
        url.query_pairs_mut().append_pair("digest", digest);
        let resp = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .await
            .map_err(|e| self.err(e))?;
        if resp.status() != reqwest::StatusCode::CREATED {
            return Err(self.err(format!("uploading {digest}: {}", resp.status())));
        }
        tracing::debug!(%digest, bytes = blob.len(), "content pushed to the registry");
        Ok(())
    }
}
