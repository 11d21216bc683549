//! The operator HTTP API's request and response types: one set of structs that
//! the hub serializes, its web UI renders and the CLI deserializes and prints.
//! JSON in camelCase. Pure data: building a view from the hub's state is the
//! hub's business (conversions at its edge), printing one the CLI's.
//!
//! A field added here reaches all three at once; a field renamed here fails to
//! compile in each, rather than silently blanking a column.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bundle::Rendered;
use crate::labels::Labels;
use crate::notify::{Event, SinkType};
use crate::objects::Target;
use crate::selector::LabelSelector;
use crate::state::BundleState;

// ---- errors and small answers ------------------------------------------------

/// Every refusal: `{"error": "..."}`, with a 4xx or 5xx status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What a `DELETE` answers: the name of what is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: String,
}

// ---- lists ---------------------------------------------------------------------

/// One page of a list (`GET /api/v1/{sources,groups,clusters,bundles,drift,secrets,notifications}`),
/// Kubernetes-style: `continue` is the opaque token that asks for the next page
/// (`?continue=TOKEN`), absent on the last one. See `crate::paginate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

// ---- sources, groups, clusters, bundles ----------------------------------------

/// A source as the API shows it (its repository URL never with credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    pub name: String,
    pub repo: String,
    pub branch: Option<String>,
    pub tag: Option<String>,
    pub revision: Option<String>,
    pub paths: Vec<String>,
    pub poll_interval: String,
    pub targets: Vec<Target>,
    pub commit: Option<String>,
    pub last_fetched: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub bundles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub name: String,
    pub labels: Labels,
    pub selector: LabelSelector,
    pub clusters: Vec<String>,
}

/// A bundle assigned to a cluster, in `GET /api/v1/clusters/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterBundleView {
    pub bundle: String,
    pub state: BundleState,
    pub applied_revision: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub labels: Labels,
    pub connected: bool,
    pub last_seen: Option<String>,
    pub agent_version: String,
    pub kubernetes_version: String,
    pub bundle_counts: BTreeMap<String, usize>,
    /// Drift events of this cluster in the hub's history.
    pub drift_events: usize,
    /// Only for one cluster (`GET /api/v1/clusters/{name}`), not in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundles: Option<Vec<ClusterBundleView>>,
}

/// A cluster a bundle is assigned to, in `GET /api/v1/bundles/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleClusterView {
    pub cluster: String,
    pub state: BundleState,
    pub applied_revision: Option<String>,
    pub message: String,
    /// Drift events of this bundle on this cluster in the hub's history.
    pub drift_events: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleView {
    pub name: String,
    pub source: String,
    pub path: String,
    pub revision: String,
    pub content_hash: Option<String>,
    pub error: Option<String>,
    pub cluster_counts: BTreeMap<String, usize>,
    /// Drift events of this bundle, all clusters, in the hub's history.
    pub drift_events: usize,
    /// Only for one bundle (`GET /api/v1/bundles/{name}`), not in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<Vec<BundleClusterView>>,
}

/// What a cluster holds of a bundle (`GET /api/v1/clusters/{name}/bundles/{bundle}`):
/// the content its agent acknowledged, Secret values hashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldContentView {
    pub cluster: String,
    pub bundle: String,
    pub content_hash: String,
    pub revision: String,
    pub content: Rendered,
}

/// `PATCH /api/v1/clusters/{name}/labels`: labels to set and keys to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelPatch {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

// ---- rollouts ------------------------------------------------------------------

/// A cluster of a rollout as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutClusterView {
    pub cluster: String,
    /// `OutOfSync` (not admitted yet), `Updating`, `Ready`, `Failed`, `Skipped`.
    pub progress: String,
    pub connected: bool,
    pub state: BundleState,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPartitionView {
    pub name: String,
    /// `Waiting`, `Rolling`, `Baking`, `Done`.
    pub phase: String,
    pub max_unavailable: usize,
    pub clusters: Vec<RolloutClusterView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutEventView {
    pub kind: String,
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub message: String,
    pub at: String,
}

/// A bundle's current rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    pub bundle: String,
    pub revision: String,
    pub previous: Option<String>,
    pub phase: String,
    pub reason: String,
    pub started: String,
    pub ended: Option<String>,
    pub max_unavailable: usize,
    pub max_unavailable_partitions: usize,
    pub max_failures: usize,
    pub partitions: Vec<RolloutPartitionView>,
    pub matched_several: BTreeMap<String, Vec<String>>,
    pub unmatched: Vec<String>,
    pub events: Vec<RolloutEventView>,
}

/// One rollout of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutHistoryView {
    pub revision: String,
    pub previous: Option<String>,
    pub started: String,
    pub ended: Option<String>,
    /// `Completed`, `RolledBack`, `Superseded`, or the phase of the running one.
    pub outcome: String,
    pub reason: String,
}

// ---- drift ---------------------------------------------------------------------

/// A drift event as the API shows it (Secret values already hashed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftView {
    pub id: u64,
    pub cluster: String,
    pub bundle: String,
    pub object: DriftObject,
    pub fields: Vec<DriftField>,
    pub manager: String,
    pub detected_at: String,
    pub corrected: bool,
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftObject {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftField {
    pub path: String,
    /// `null` when the field is absent.
    pub desired: serde_json::Value,
    /// `null` when the field is absent.
    pub live: serde_json::Value,
}

// ---- secrets, notifications, tokens, signing key --------------------------------

/// A secret as the API shows it: which fields are set, never their values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretView {
    pub name: String,
    /// `username`, `password`, `sshPrivateKey`, `knownHosts`, `webhookSecret`, `url`.
    pub fields: Vec<String>,
}

/// `PUT /api/v1/secrets/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretBody {
    pub username: Option<String>,
    pub password: Option<String>,
    pub ssh_private_key: Option<String>,
    pub known_hosts: Option<String>,
    pub webhook_secret: Option<String>,
    pub url: Option<String>,
}

/// A notification as the API shows it (a URL without its query; never secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationView {
    pub name: String,
    #[serde(rename = "type")]
    pub sink: SinkType,
    pub url: Option<String>,
    pub secret_ref: Option<String>,
    pub events: Vec<Event>,
    pub bundle_selector: Option<LabelSelector>,
    pub cluster_selector: Option<LabelSelector>,
    /// Messages waiting for delivery.
    pub queued: usize,
    /// Why the oldest waiting message's last attempt failed.
    pub last_error: Option<String>,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// How long the token lives (`1h`); the hub's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Binds the token to this cluster name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Binds the token to these labels (the agent's claims are ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub token: String,
    pub id: String,
    pub expires_at: String,
}

/// `GET /api/v1/signing-key`, and what `POST /api/v1/signing-key/rotate` answers
/// (with `previousKeyId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyView {
    pub key_id: String,
    /// Hex of the ed25519 public key.
    pub public_key: String,
    /// Rotations in the chain of endorsements.
    pub rotations: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_id: Option<String>,
}

// ---- apply and files -----------------------------------------------------------

/// What `POST /api/v1/apply` answers: what happened to each object, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub applied: Vec<AppliedObject>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedObject {
    /// `GitSource`, `ClusterGroup`, `Notification`.
    pub kind: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`, as kubectl says.
    pub action: String,
}

/// What `POST /api/v1/status-files` (`flotilla cluster import-status`) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    pub cluster: String,
    pub statuses: usize,
    /// Statuses this hub had imported already (a file imported twice).
    pub statuses_already: usize,
    pub drift_events: usize,
    pub drift_already: usize,
    /// Dropped as invalid, or about bundles not assigned to the cluster.
    pub refused: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The JSON is the API's contract: camelCase, `continue` and the optional
    /// parts left out when absent.
    #[test]
    fn views_keep_their_json() {
        let c = ClusterView {
            name: "east".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            connected: true,
            last_seen: None,
            agent_version: "0.1.0".into(),
            kubernetes_version: "v1.34.1".into(),
            bundle_counts: [("Ready".to_string(), 2)].into(),
            drift_events: 1,
            bundles: None,
        };
        let page = Page {
            items: vec![c.clone()],
            continue_token: None,
        };
        let v = serde_json::to_value(&page).unwrap();
        assert_eq!(
            v,
            json!({"items": [{"name": "east", "labels": {"env": "prod"}, "connected": true,
                "lastSeen": null, "agentVersion": "0.1.0", "kubernetesVersion": "v1.34.1",
                "bundleCounts": {"Ready": 2}, "driftEvents": 1}]})
        );
        let back: Page<ClusterView> = serde_json::from_value(v).unwrap();
        assert_eq!(back.items, [c]);
        let more = Page::<u8> {
            items: vec![],
            continue_token: Some("abc".into()),
        };
        assert_eq!(
            serde_json::to_value(&more).unwrap(),
            json!({"items": [], "continue": "abc"})
        );
        assert_eq!(
            serde_json::to_value(TokenRequest {
                ttl: Some("2h".into()),
                ..Default::default()
            })
            .unwrap(),
            json!({"ttl": "2h"})
        );
        let key = SigningKeyView {
            key_id: "k2".into(),
            public_key: "ab".into(),
            rotations: 1,
            previous_key_id: Some("k1".into()),
        };
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            r#"{"keyId":"k2","publicKey":"ab","rotations":1,"previousKeyId":"k1"}"#
        );
    }

    /// A view missing a field it must have is refused, not read as blank.
    #[test]
    fn a_missing_field_is_an_error() {
        let r = serde_json::from_value::<ClusterView>(json!({"name": "east"}));
        assert!(r.is_err());
    }
}
