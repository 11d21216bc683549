//! The hub's rendering: the render crate (`flotilla_render::render`, shared with
//! the offline `flotilla render`) plus what only the hub needs — the protocol's cap
//! on one bundle's content, applied to every variant, and the cache that spares a
//! new commit the renders of unchanged bundles.

use std::collections::{BTreeMap, HashMap};

use flotilla_shared::bundle::{RenderError, Rendered};
use flotilla_shared::capabilities;
use sha2::{Digest, Sha256};

use flotilla_render::render::tool_error;
pub use flotilla_render::render::{
    applied_yaml_stream, read_bundle_dir, render_for_cluster, render_plan, to_yaml_stream,
    BundleRender, Tools, MAX_OUTPUT, RENDER_TIMEOUT,
};

/// Renders every variant of a bundle (its files, bundle-relative), as
/// `flotilla_render::render::render_bundle`, each variant's content checked
/// against the protocol's cap (`sendable`).
pub async fn render_bundle(
    tools: &Tools,
    bundle_name: &str,
    files: &BTreeMap<String, Vec<u8>>,
    profiles: &[capabilities::Profile],
) -> BundleRender {
    flotilla_render::render::render_bundle(tools, bundle_name, files, profiles)
        .await
        .and_then(|r| sendable(r, flotilla_proto::MAX_BUNDLE_BYTES))
}

/// A rendered content the protocol can carry (to an agent that takes chunks, up
/// to its cap: `flotilla_proto::MAX_BUNDLE_BYTES`), or the bundle's error saying
/// why not. What a v1 agent cannot take inline is held per session instead
/// (`gateway`), for the agents that can take it.
pub fn sendable(rendered: Rendered, max_bytes: usize) -> Result<Rendered, RenderError> {
    // Sized with a stand-in of the hash's length: the fleet hashes it later, once.
    const HASH_SIZED: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    match flotilla_proto::oversized(HASH_SIZED, &rendered, max_bytes) {
        None => Ok(rendered),
        Some(reason) => Err(tool_error(".", reason)),
    }
}

/// Renders of the last snapshot, by bundle name and content: a new commit
/// re-renders only the bundles whose files changed.
#[derive(Debug, Default)]
pub struct RenderCache {
    entries: HashMap<String, BundleRender>,
    /// Bundles rendered into this cache rather than reused from the previous one.
    fresh: usize,
}

impl RenderCache {
    fn key(
        bundle_name: &str,
        files: &BTreeMap<String, Vec<u8>>,
        profiles: &[capabilities::Profile],
    ) -> String {
        let mut h = Sha256::new();
        h.update(bundle_name.as_bytes());
        for p in profiles {
            h.update(b"\0v");
            h.update(p.kube_version.as_bytes());
            for a in &p.api_versions {
                h.update(b"\0a");
                h.update(a.as_bytes());
            }
        }
        for (p, b) in files {
            h.update(b"\0");
            h.update(p.as_bytes());
            h.update(b"\0");
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        hex::encode(h.finalize())
    }

    /// How many bundles were rendered (not reused) into this cache.
    pub fn fresh_renders(&self) -> usize {
        self.fresh
    }

    /// Renders a bundle, or reuses the render of identical input from `previous`;
    /// the result is kept in `self` for the next snapshot.
    pub async fn render(
        &mut self,
        previous: &RenderCache,
        tools: &Tools,
        bundle_name: &str,
        files: &BTreeMap<String, Vec<u8>>,
        profiles: &[capabilities::Profile],
    ) -> BundleRender {
        let key = Self::key(bundle_name, files, profiles);
        // Failures are not reused: a chart repository may be back next time.
        let r = match previous.entries.get(&key) {
            Some(r) if r.all_ok() => r.clone(),
            _ => {
                self.fresh += 1;
                render_bundle(tools, bundle_name, files, profiles).await
            }
        };
        self.entries.insert(key, r.clone());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_bundle_over_the_protocol_limit_is_its_error() {
        let big = flotilla_shared::bundle::Rendered {
            manifests: vec![flotilla_shared::bundle::Manifest {
                file: "cm.yaml".into(),
                object: serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
                    "data": {"blob": "x".repeat(10_000)}
                }),
            }],
            options: Default::default(),
        };
        assert!(sendable(big.clone(), 100_000).is_ok());
        let err = sendable(big, 5_000).unwrap_err().to_string();
        assert!(err.contains("over the 5000 bytes"), "{err}");
    }
}
