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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A "registry" that answers every request with `body`.
    async fn serving(body: Vec<u8>) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        port
    }

    /// A registry (or a mirror) serving other bytes under a digest is caught,
    /// and a digest that is not one never becomes a request path.
    #[tokio::test]
    async fn a_registry_is_trusted_for_nothing() {
        let real = v1::BundleContent {
            content_hash: "h".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&real)));
        let port = serving(b"something else".to_vec()).await;
        let r = Registry::new(&format!("http://127.0.0.1:{port}/f/c")).unwrap();
        let e = r.fetch(&digest).await.unwrap_err();
        assert!(e.to_string().contains("the registry served sha256:"), "{e}");
        let e = r.fetch("sha256:../../v2/_catalog").await.unwrap_err();
        assert!(e.to_string().contains("not a sha256 digest"), "{e}");
        // The right bytes are taken.
        let port = serving(real).await;
        let r = Registry::new(&format!("http://127.0.0.1:{port}/f/c")).unwrap();
        assert_eq!(r.fetch(&digest).await.unwrap().content_hash, "h");
    }
}
