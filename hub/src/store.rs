//! The hub's persistent state behind a narrow, typed `Store` trait (so a networked
//! store could follow), and its embedded implementation on sled.

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_shared::bundle::Rendered;
use flotilla_shared::drift::DriftEvent;
use flotilla_shared::labels::Labels;
use flotilla_shared::objects::{ClusterGroupSpec, GitSourceSpec};
use flotilla_shared::state::BundleState;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt record {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store: {0}")]
    Encode(String),
    #[error("store: secret {name}: {source}")]
    Sealed {
        name: String,
        #[source]
        source: crate::sealed::SealError,
    },
    #[error("store: secrets need the hub's secrets key (SledStore::with_keyring)")]
    NoKeyring,
}

/// A join token, as the hub keeps it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub secret_hash: String,
    pub expires_at_ms: u64,
    pub used: bool,
    /// The only cluster name this token enrols (`token create --cluster-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// The labels its cluster gets, whatever the agent claims (`--labels`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
}

impl TokenRecord {
    /// What the token binds of the identity it enrols.
    pub fn binding(&self) -> flotilla_shared::identity::Binding {
        flotilla_shared::identity::Binding {
            cluster_name: self.cluster_name.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Whether `secret_hash` opens this token now.
    fn judge(&self, secret_hash: &str, now_ms: u64) -> Result<(), TokenRefusal> {
        if !crate::constant_time_eq(self.secret_hash.as_bytes(), secret_hash.as_bytes()) {
            return Err(TokenRefusal::Unknown);
        }
        if self.used {
            return Err(TokenRefusal::Used);
        }
        if self.expires_at_ms <= now_ms {
            return Err(TokenRefusal::Expired);
        }
        Ok(())
    }
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("join token already used")]
    Used,
    #[error("join token expired")]
    Expired,
}

/// Credentials kept by the hub for private repositories (and a webhook secret),
/// referred to by name from sources. Sealed at rest with the hub's secrets key
/// (`sealed`); the API shows only which fields are set, and `Debug` shows none.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretRecord {
    pub name: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub ssh_private_key: Option<String>,
    #[serde(default)]
    pub known_hosts: Option<String>,
    /// Authenticates push webhooks for the sources that use this secret, and
    /// signs the messages of webhook notifications that name it.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// A Slack notification's URL (the URL is the credential).
    #[serde(default)]
    pub url: Option<String>,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub name: String,
    pub spec: GitSourceSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub spec: ClusterGroupSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterRecord {
    pub name: String,
    pub labels: Labels,
    #[serde(default)]
    pub agent_version: String,
    #[serde(default)]
    pub kubernetes_version: String,
    /// The API versions its agent last reported (Helm's `.Capabilities.APIVersions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_versions: Vec<String>,
    #[serde(default)]
    pub enrolled_at_ms: u64,
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// Per bundle, the content hash the agent last acknowledged holding.
    #[serde(default)]
    pub acked: BTreeMap<String, String>,
    /// SHA-256 (hex) of the one client certificate the hub accepts for this
    /// cluster; `None` for a cluster enrolled before certificates were pinned
    /// (its next certificate seen is pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// The certificate issued by a renewal, accepted too until the agent first
    /// uses it (then it replaces `cert_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cert_sha256: Option<String>,
    /// What status files brought in (`flotilla cluster import-status`): the
    /// highest status seq and drift id imported. A file imported again adds
    /// nothing, and the next export acknowledges them to the agent.
    #[serde(default, skip_serializing_if = "FileMarks::is_empty")]
    pub file_marks: FileMarks,
    /// The signed set the agent last acknowledged over a session: a session
    /// whose agent says it holds that seq, while the cluster's set is the same,
    /// resumes from it (nothing is sent again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// See [`ClusterRecord::resume`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resume {
    pub seq: u64,
    /// The key that signed it.
    pub key_id: String,
    /// [`crate::fleet::set_digest`] of the set.
    pub set_digest: String,
}

/// See [`ClusterRecord::file_marks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMarks {
    pub status_seq: u64,
    pub drift_id: u64,
}

impl FileMarks {
    pub fn is_empty(&self) -> bool {
        *self == FileMarks::default()
    }
}

impl ClusterRecord {
    /// The certificates the hub accepts for this cluster.
    pub fn pins(&self) -> flotilla_shared::identity::CertPins {
        flotilla_shared::identity::CertPins {
            current: self.cert_sha256.clone(),
            next: self.next_cert_sha256.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub cluster: String,
    pub bundle: String,
    pub content_hash: String,
    pub revision: String,
    pub state: BundleState,
    pub message: String,
    pub observed_at_ms: i64,
}

/// The last snapshot of a source the hub served: its commit and, per bundle, the
/// hashes of its last good contents (kept in the content tree, by hash). A
/// restarted hub serves exactly this until a new fetch succeeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub source: String,
    /// `None` for a source created since the last start and not fetched yet:
    /// nothing of it was ever served, so it is loaded, empty.
    pub commit: Option<String>,
    #[serde(default)]
    pub fetched_ms: Option<u64>,
    #[serde(default)]
    pub bundles: Vec<SnapshotBundle>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBundle {
    pub name: String,
    pub path: String,
    /// Last good content: (hash, commit).
    pub good: Option<(String, String)>,
    pub render_error: Option<String>,
    #[serde(default)]
    pub customizations: Vec<flotilla_shared::assign::CustomizationInfo>,
    #[serde(default)]
    pub depends_on: Vec<flotilla_shared::depends::Dependency>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub rollout: Option<flotilla_shared::rollout::RolloutStrategy>,
}

impl SnapshotRecord {
    /// Every content hash the snapshot refers to.
    pub fn hashes(&self) -> impl Iterator<Item = &str> {
        self.bundles.iter().flat_map(|b| {
            std::iter::once(&b.good)
                .chain(b.customizations.iter().map(|c| &c.good))
                .filter_map(|g| g.as_ref().map(|(h, _)| h.as_str()))
        })
    }
}

/// A bundle's current rollout (the latest, whatever its phase) and the contents
/// it moves clusters between, per variant of the bundle ("" for the default, else
/// the target customisation's name). A completed record's `target` is what the
/// next rollout returns to on a rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub rollout: flotilla_shared::rollout::Rollout,
    /// The rollout's revision: content hash per variant.
    pub target: BTreeMap<String, String>,
    /// The last revision that completed a rollout: content hash per variant.
    #[serde(default)]
    pub previous: BTreeMap<String, String>,
}

impl RolloutRecord {
    pub fn hashes(&self) -> impl Iterator<Item = &str> {
        self.target
            .values()
            .chain(self.previous.values())
            .map(String::as_str)
    }
}

/// Finished rollouts kept per bundle in the history (the oldest are dropped).
pub const MAX_ROLLOUT_HISTORY: usize = 100;
/// Rollout events kept fleet-wide (the oldest are dropped).
pub const MAX_ROLLOUT_EVENTS: usize = 10_000;

/// The fleet's drift history is bounded: beyond this many events the oldest are
/// dropped (and counted), so a cluster fighting a controller cannot fill the disk.
pub const MAX_DRIFT_EVENTS: usize = 10_000;
/// Each cluster's share of the history is bounded too: beyond this many of its
/// events, its own oldest are dropped, so one flooding cluster pushes out only its
/// own history, never another's (ten clusters fill the fleet-wide bound).
pub const MAX_DRIFT_EVENTS_PER_CLUSTER: usize = 1_000;

/// The bounds of the drift history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftCaps {
    /// Events kept, all clusters together.
    pub total: usize,
    /// Events kept per cluster.
    pub per_cluster: usize,
}

impl Default for DriftCaps {
    fn default() -> Self {
        DriftCaps {
            total: MAX_DRIFT_EVENTS,
            per_cluster: MAX_DRIFT_EVENTS_PER_CLUSTER,
        }
    }
}

/// A drift event as the hub keeps it: the agent's event, its cluster, and the
/// hub's own id (the API's), in arrival order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftRecord {
    pub id: u64,
    pub cluster: String,
    pub event: DriftEvent,
}

/// What storing a drift event did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DriftAdded {
    /// The hub's id; `None` when this (cluster, agent event id) was stored before.
    pub id: Option<u64>,
    /// Events dropped to keep the history bounded.
    pub dropped: Vec<DriftRecord>,
}

/// Everything the hub persists. Methods are small and typed; each is atomic.
pub trait Store: Send + Sync + 'static {
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// The token record, used or not (an enrolment file's MAC is keyed by its hash).
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// The token if it exists, `secret_hash` opens it, and it is unused and
    /// unexpired; spends nothing (see `consume_token`).
    fn check_token(
        &self,
        id: &str,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError>;
    /// Marks a token used if it exists, matches, is unused and unexpired, atomically
    /// (two concurrent enrolments with one token: exactly one wins).
    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<Result<(), TokenRefusal>, StoreError>;

    fn list_sources(&self) -> Result<Vec<SourceRecord>, StoreError>;
    fn put_source(&self, source: &SourceRecord) -> Result<(), StoreError>;
    fn delete_source(&self, name: &str) -> Result<bool, StoreError>;

    fn list_groups(&self) -> Result<Vec<GroupRecord>, StoreError>;
    fn put_group(&self, group: &GroupRecord) -> Result<(), StoreError>;

    fn list_clusters(&self) -> Result<Vec<ClusterRecord>, StoreError>;
    /// Inserts a cluster unless one of that name exists; false if it did.
    fn create_cluster(&self, cluster: &ClusterRecord) -> Result<bool, StoreError>;
    fn put_cluster(&self, cluster: &ClusterRecord) -> Result<(), StoreError>;
    fn delete_cluster(&self, name: &str) -> Result<(), StoreError>;
    /// Removes a cluster and everything kept about it: its record (so its
    /// certificate is refused), its statuses and its drift history. Durable
    /// when it returns.
    fn forget_cluster(&self, name: &str) -> Result<(), StoreError>;

    fn list_statuses(&self) -> Result<Vec<StatusRecord>, StoreError>;
    fn put_status(&self, status: &StatusRecord) -> Result<(), StoreError>;
    fn delete_status(&self, cluster: &str, bundle: &str) -> Result<(), StoreError>;

    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    fn get_secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError>;
    /// Creates or replaces a secret; durable when it returns.
    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError>;
    fn delete_secret(&self, name: &str) -> Result<bool, StoreError>;
    /// Stores a drift event from `cluster` once: an agent's ids increase, so an id
    /// not above the highest stored for that cluster is a resend and is skipped.
    fn add_drift(&self, cluster: &str, event: &DriftEvent) -> Result<DriftAdded, StoreError>;
    /// The drift history, oldest first.
    fn list_drift(&self) -> Result<Vec<DriftRecord>, StoreError>;
    fn get_drift(&self, id: u64) -> Result<Option<DriftRecord>, StoreError>;
    /// How many events were dropped from the history so far.
    fn drift_dropped(&self) -> Result<u64, StoreError>;

    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError>;
    fn put_snapshot(&self, snapshot: &SnapshotRecord) -> Result<(), StoreError>;
    fn delete_snapshot(&self, source: &str) -> Result<(), StoreError>;

    /// Rendered contents by hash (content-addressed: a hash is written once).
    fn content_hashes(&self) -> Result<Vec<String>, StoreError>;
    fn get_content(&self, hash: &str) -> Result<Option<Rendered>, StoreError>;
    fn put_content(&self, hash: &str, content: &Rendered) -> Result<(), StoreError>;
    fn delete_content(&self, hash: &str) -> Result<(), StoreError>;

    /// Each bundle's current rollout.
    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;
    fn put_rollout(&self, rollout: &RolloutRecord) -> Result<(), StoreError>;
    fn delete_rollout(&self, bundle: &str) -> Result<(), StoreError>;
    /// Records a finished rollout (or replaces the record of the same start);
    /// at most `MAX_ROLLOUT_HISTORY` are kept per bundle.
    fn add_rollout_history(
        &self,
        rollout: &flotilla_shared::rollout::Rollout,
    ) -> Result<(), StoreError>;
    /// A bundle's finished rollouts, oldest first.
    fn rollout_history(
        &self,
        bundle: &str,
    ) -> Result<Vec<flotilla_shared::rollout::Rollout>, StoreError>;
    /// Appends planner events (at most `MAX_ROLLOUT_EVENTS` are kept).
    fn add_rollout_events(
        &self,
        events: &[flotilla_shared::rollout::RolloutEvent],
    ) -> Result<(), StoreError>;
    /// The kept events, oldest first.
    fn rollout_events(&self) -> Result<Vec<flotilla_shared::rollout::RolloutEvent>, StoreError>;

    /// Drift records with an id above `after`, oldest first, at most `limit`.
    fn drift_after(&self, after: u64, limit: usize) -> Result<Vec<DriftRecord>, StoreError>;
    /// The highest drift id given so far.
    fn drift_last_id(&self) -> Result<u64, StoreError>;

    fn list_notifications(&self) -> Result<Vec<NotificationRecord>, StoreError>;
    fn put_notification(&self, n: &NotificationRecord) -> Result<(), StoreError>;
    /// Deletes a notification with its memory and its undelivered messages.
    fn delete_notification(&self, name: &str) -> Result<bool, StoreError>;
    /// What a notification has said so far.
    fn notify_memory(
        &self,
        name: &str,
    ) -> Result<Option<flotilla_shared::notify::Memory>, StoreError>;
    /// Writes a notification's new memory and queues its messages, atomically:
    /// a crash leaves both or neither. Returns the queued entries.
    fn commit_notify(
        &self,
        name: &str,
        memory: &flotilla_shared::notify::Memory,
        messages: Vec<flotilla_shared::notify::Message>,
        now_ms: u64,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Every undelivered message, oldest first.
    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Records an attempt (or replaces the entry).
    fn put_outbox(&self, entry: &OutboxEntry) -> Result<(), StoreError>;
    fn remove_outbox(&self, id: u64) -> Result<(), StoreError>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// A `Notification` as applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub spec: flotilla_shared::notify::NotificationSpec,
}

/// A message waiting in the outbox until its sink takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEntry {
    /// Outbox order.
    pub id: u64,
    pub notification: String,
    pub message: flotilla_shared::notify::Message,
    pub created_ms: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub next_attempt_ms: u64,
    /// Why the last attempt failed (status or connection error; never the URL).
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The embedded store: one sled database, a tree per kind, JSON values.
pub struct SledStore {
    db: sled::Db,
    tokens: sled::Tree,
    sources: sled::Tree,
    groups: sled::Tree,
    clusters: sled::Tree,
    statuses: sled::Tree,
    secrets: sled::Tree,
    snapshots: sled::Tree,
    contents: sled::Tree,
    /// Drift records by hub id (big-endian).
    drift: sled::Tree,
    /// Per cluster, the highest agent event id stored; plus the id counter and
    /// the dropped count under reserved keys.
    drift_meta: sled::Tree,
    /// Hub ids of each cluster's records, oldest first: `cluster \0 id` (big-endian).
    drift_by_cluster: sled::Tree,
    /// Current rollout per bundle.
    rollouts: sled::Tree,
    /// Finished rollouts: `bundle \0 started_ms` (big-endian).
    rollout_history: sled::Tree,
    /// Planner events by sequence number (big-endian); the next under a reserved key.
    rollout_events: sled::Tree,
    notifications: sled::Tree,
    /// Notification memories (`m\0name`), the outbox (`o\0id`, big-endian) and
    /// its id counter, in one tree so that a batch writes them atomically.
    notify: sled::Tree,
    drift_caps: DriftCaps,
    /// Serialises add_drift (dedupe check, id allocation, trimming).
    drift_lock: std::sync::Mutex<()>,
    /// Seals and opens secret records; without it secrets cannot be stored.
    keyring: Option<std::sync::Arc<crate::sealed::Keyring>>,
}

/// A secret record as sled holds it: its name in clear, the rest sealed (the
/// name is bound into the seal). Records from before sealing hold a plain
/// `SecretRecord`; `with_keyring` seals them.
#[derive(Serialize, Deserialize)]
struct StoredSecret {
    name: String,
    sealed: crate::sealed::Sealed,
}

const DRIFT_NEXT_ID: &[u8] = b"\0next-id";
const DRIFT_DROPPED: &[u8] = b"\0dropped";

/// The key of a record in `drift_by_cluster` (cluster names hold no NUL).
fn cluster_drift_key(cluster: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(cluster.len() + 9);
    k.extend_from_slice(cluster.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn cluster_drift_prefix(cluster: &str) -> Vec<u8> {
    let mut k = cluster.as_bytes().to_vec();
    k.push(0);
    k
}

fn u64_at(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(key)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        Self::open_with_drift_caps(path, DriftCaps::default())
    }

    /// Opens with another fleet-wide bound on the drift history (tests).
    pub fn open_with_drift_cap(path: &Path, drift_cap: usize) -> Result<SledStore, StoreError> {
        Self::open_with_drift_caps(
            path,
            DriftCaps {
                total: drift_cap,
                ..DriftCaps::default()
            },
        )
    }

    /// Opens with these bounds on the drift history. The per-cluster index is
    /// rebuilt when it does not match the history (a store from before it).
    pub fn open_with_drift_caps(path: &Path, caps: DriftCaps) -> Result<SledStore, StoreError> {
        let db = sled::open(path)?;
        let store = SledStore {
            tokens: db.open_tree("tokens")?,
            sources: db.open_tree("sources")?,
            groups: db.open_tree("groups")?,
            clusters: db.open_tree("clusters")?,
            statuses: db.open_tree("statuses")?,
            secrets: db.open_tree("secrets")?,
            snapshots: db.open_tree("snapshots")?,
            contents: db.open_tree("contents")?,
            drift: db.open_tree("drift")?,
            drift_meta: db.open_tree("drift_meta")?,
            drift_by_cluster: db.open_tree("drift_by_cluster")?,
            rollouts: db.open_tree("rollouts")?,
            rollout_history: db.open_tree("rollout_history")?,
            rollout_events: db.open_tree("rollout_events")?,
            notifications: db.open_tree("notifications")?,
            notify: db.open_tree("notify")?,
            drift_caps: DriftCaps {
                total: caps.total.max(1),
                per_cluster: caps.per_cluster.max(1),
            },
            drift_lock: std::sync::Mutex::new(()),
            keyring: None,
            db,
        };
        if store.drift_by_cluster.len() != store.drift.len() {
            store.drift_by_cluster.clear()?;
            for kv in store.drift.iter() {
                let (k, v) = kv?;
                let rec: DriftRecord = decode(&k, &v)?;
                store
                    .drift_by_cluster
                    .insert(cluster_drift_key(&rec.cluster, rec.id), Vec::<u8>::new())?;
            }
        }
        Ok(store)
    }

    /// Drops the oldest records of `cluster` while it holds more than its share.
    fn trim_cluster(
        &self,
        cluster: &str,
        dropped: &mut Vec<DriftRecord>,
    ) -> Result<(), StoreError> {
        let prefix = cluster_drift_prefix(cluster);
        let held = self.drift_by_cluster.scan_prefix(&prefix).count();
        let over = held.saturating_sub(self.drift_caps.per_cluster);
        let oldest = self
            .drift_by_cluster
            .scan_prefix(&prefix)
            .keys()
            .take(over)
            .collect::<Result<Vec<_>, _>>()?;
        for k in oldest {
            self.drift_by_cluster.remove(&k)?;
            let id = &k[prefix.len()..];
            if let Some(v) = self.drift.remove(id)? {
                dropped.push(decode(id, &v)?);
            }
        }
        Ok(())
    }

    /// Gives the store the hub's secrets key, and seals the secrets written in
    /// clear by a hub from before sealing. Secrets the keyring cannot open (a
    /// lost key file) are reported in the log and left as they are: `secret
    /// create` replaces them, `secret delete` removes them.
    pub fn with_keyring(
        mut self,
        keyring: std::sync::Arc<crate::sealed::Keyring>,
    ) -> Result<SledStore, StoreError> {
        self.keyring = Some(keyring);
        let mut sealed_now = 0;
        for kv in self.secrets.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            if is_sealed(&v) {
                if let Err(e) = self.open_secret(&k, &v) {
                    tracing::error!(secret = %name, error = %e, "a stored secret cannot be read");
                }
                continue;
            }
            let plain = decode_secret(&k, &v)?;
            self.secrets.insert(&k, self.seal_secret(&plain)?)?;
            sealed_now += 1;
        }
        if sealed_now > 0 {
            self.secrets.flush()?;
            tracing::info!(
                secrets = sealed_now,
                "secrets stored in clear by an older hub are now sealed"
            );
        }
        Ok(self)
    }

    /// Seals every secret again with the keyring's current key (key rotation).
    /// Returns how many there are.
    pub fn reseal_secrets(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.secrets.iter() {
            let (k, v) = kv?;
            let record = self.open_secret(&k, &v)?;
            self.secrets.insert(&k, self.seal_secret(&record)?)?;
            n += 1;
        }
        self.secrets.flush()?;
        Ok(n)
    }

    fn keyring(&self) -> Result<&crate::sealed::Keyring, StoreError> {
        self.keyring.as_deref().ok_or(StoreError::NoKeyring)
    }

    fn seal_secret(&self, secret: &SecretRecord) -> Result<Vec<u8>, StoreError> {
        let plain = encode(secret)?;
        let sealed = self.keyring()?.seal(&secret.name, &plain);
        encode(&StoredSecret {
            name: secret.name.clone(),
            sealed,
        })
    }

    fn open_secret(&self, key: &[u8], value: &[u8]) -> Result<SecretRecord, StoreError> {
        if !is_sealed(value) {
            return decode_secret(key, value);
        }
        let stored: StoredSecret = decode(key, value)?;
        let sealed_err = |source| StoreError::Sealed {
            name: stored.name.clone(),
            source,
        };
        let plain = self
            .keyring()?
            .open(&stored.name, &stored.sealed)
            .map_err(sealed_err)?;
        let record = decode_secret(key, &plain)?;
        if record.name.as_bytes() != key {
            return Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "a secret stored under another name".into(),
            });
        }
        Ok(record)
    }
}

/// Decodes a secret record without echoing any of it: serde's messages may
/// quote the value they stumbled on.
fn decode_secret(key: &[u8], bytes: &[u8]) -> Result<SecretRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "not a secret record".into(),
    })
}

/// Whether a stored secret is sealed (else it was written in clear by an older hub).
fn is_sealed(value: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .is_some_and(|v| v.get("sealed").is_some())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode(e.to_string()))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn list<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
        .collect()
}

const OUTBOX_NEXT_ID: &[u8] = b"c\0next";

fn memory_key(name: &str) -> Vec<u8> {
    [b"m\0".as_slice(), name.as_bytes()].concat()
}

fn outbox_key(id: u64) -> Vec<u8> {
    [b"o\0".as_slice(), &id.to_be_bytes()].concat()
}

fn status_key(cluster: &str, bundle: &str) -> Vec<u8> {
    format!("{cluster}\0{bundle}").into_bytes()
}

impl Store for SledStore {
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(token.id.as_bytes(), encode(token)?)?;
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(id.as_bytes())?
            .map(|v| decode(id.as_bytes(), &v))
            .transpose()
    }

    fn check_token(
        &self,
        id: &str,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let Some(v) = self.tokens.get(id.as_bytes())? else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let rec: TokenRecord = decode(id.as_bytes(), &v)?;
        Ok(rec.judge(secret_hash, now_ms).map(|()| rec))
    }

    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        loop {
            let Some(old) = self.tokens.get(id.as_bytes())? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            let mut rec: TokenRecord = decode(id.as_bytes(), &old)?;
            if let Err(refusal) = rec.judge(secret_hash, now_ms) {
                return Ok(Err(refusal));
            }
            rec.used = true;
            let swapped =
                self.tokens
                    .compare_and_swap(id.as_bytes(), Some(old), Some(encode(&rec)?))?;
            if swapped.is_ok() {
                self.tokens.flush()?;
                return Ok(Ok(()));
            }
            // Someone changed the record meanwhile: look again.
        }
    }

    fn list_sources(&self) -> Result<Vec<SourceRecord>, StoreError> {
        list(&self.sources)
    }

    /// Secrets that cannot be opened (see `with_keyring`) are left out, and logged.
    fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.secrets.iter() {
            let (k, v) = kv?;
            match self.open_secret(&k, &v) {
                Ok(r) => out.push(r),
                Err(e @ StoreError::Sealed { .. }) => {
                    tracing::warn!(error = %e, "secret left out: it cannot be opened");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn get_secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        match self.secrets.get(name.as_bytes())? {
            Some(v) => Ok(Some(self.open_secret(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        self.secrets
            .insert(secret.name.as_bytes(), self.seal_secret(secret)?)?;
        self.secrets.flush()?;
        Ok(())
    }

    fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let gone = self.secrets.remove(name.as_bytes())?.is_some();
        self.secrets.flush()?;
        Ok(gone)
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        list(&self.snapshots)
    }

    fn put_snapshot(&self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        self.snapshots
            .insert(snapshot.source.as_bytes(), encode(snapshot)?)?;
        Ok(())
    }

    fn delete_snapshot(&self, source: &str) -> Result<(), StoreError> {
        self.snapshots.remove(source.as_bytes())?;
        Ok(())
    }

    fn content_hashes(&self) -> Result<Vec<String>, StoreError> {
        self.contents
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    fn get_content(&self, hash: &str) -> Result<Option<Rendered>, StoreError> {
        match self.contents.get(hash.as_bytes())? {
            None => Ok(None),
            Some(v) => {
                let r: Rendered = decode(hash.as_bytes(), &v)?;
                // Content-addressed: what comes back must be what was hashed.
                if r.content_hash() != hash {
                    return Err(StoreError::Corrupt {
                        key: hash.to_string(),
                        reason: "content does not match its hash".into(),
                    });
                }
                Ok(Some(r))
            }
        }
    }

    fn put_content(&self, hash: &str, content: &Rendered) -> Result<(), StoreError> {
        if !self.contents.contains_key(hash.as_bytes())? {
            self.contents.insert(hash.as_bytes(), encode(content)?)?;
        }
        Ok(())
    }

    fn delete_content(&self, hash: &str) -> Result<(), StoreError> {
        self.contents.remove(hash.as_bytes())?;
        Ok(())
    }

    fn put_source(&self, source: &SourceRecord) -> Result<(), StoreError> {
        self.sources
            .insert(source.name.as_bytes(), encode(source)?)?;
        Ok(())
    }

    fn delete_source(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.sources.remove(name.as_bytes())?.is_some())
    }

    fn list_groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        list(&self.groups)
    }

    fn put_group(&self, group: &GroupRecord) -> Result<(), StoreError> {
        self.groups.insert(group.name.as_bytes(), encode(group)?)?;
        Ok(())
    }

    fn list_clusters(&self) -> Result<Vec<ClusterRecord>, StoreError> {
        list(&self.clusters)
    }

    fn create_cluster(&self, cluster: &ClusterRecord) -> Result<bool, StoreError> {
        let swapped = self.clusters.compare_and_swap(
            cluster.name.as_bytes(),
            None as Option<&[u8]>,
            Some(encode(cluster)?),
        )?;
        Ok(swapped.is_ok())
    }

    fn put_cluster(&self, cluster: &ClusterRecord) -> Result<(), StoreError> {
        self.clusters
            .insert(cluster.name.as_bytes(), encode(cluster)?)?;
        Ok(())
    }

    fn delete_cluster(&self, name: &str) -> Result<(), StoreError> {
        self.clusters.remove(name.as_bytes())?;
        Ok(())
    }

    fn forget_cluster(&self, name: &str) -> Result<(), StoreError> {
        // The record first: from then on the certificate is refused, whatever
        // happens to the rest (a hub stopped midway finishes at start, see
        // `Fleet::load`).
        self.clusters.remove(name.as_bytes())?;
        self.clusters.flush()?;
        for k in self.statuses.scan_prefix(status_key(name, "")) {
            self.statuses.remove(k?.0)?;
        }
        {
            let _one = self.drift_lock.lock().unwrap_or_else(|e| e.into_inner());
            for kv in self.drift.iter() {
                let (k, v) = kv?;
                let rec: DriftRecord = decode(&k, &v)?;
                if rec.cluster == name {
                    self.drift.remove(k)?;
                    self.drift_by_cluster
                        .remove(cluster_drift_key(name, rec.id))?;
                }
            }
            // A cluster enrolled again under this name starts its ids afresh.
            self.drift_meta.remove(name.as_bytes())?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn list_statuses(&self) -> Result<Vec<StatusRecord>, StoreError> {
        list(&self.statuses)
    }

    fn put_status(&self, status: &StatusRecord) -> Result<(), StoreError> {
        self.statuses
            .insert(status_key(&status.cluster, &status.bundle), encode(status)?)?;
        Ok(())
    }

    fn delete_status(&self, cluster: &str, bundle: &str) -> Result<(), StoreError> {
        self.statuses.remove(status_key(cluster, bundle))?;
        Ok(())
    }

    fn add_drift(&self, cluster: &str, event: &DriftEvent) -> Result<DriftAdded, StoreError> {
        let _one = self.drift_lock.lock().unwrap_or_else(|e| e.into_inner());
        if u64_at(&self.drift_meta, cluster.as_bytes())? >= event.id {
            return Ok(DriftAdded::default());
        }
        let id = u64_at(&self.drift_meta, DRIFT_NEXT_ID)? + 1;
        let rec = DriftRecord {
            id,
            cluster: cluster.to_string(),
            event: event.clone(),
        };
        self.drift.insert(id.to_be_bytes(), encode(&rec)?)?;
        self.drift_meta.insert(DRIFT_NEXT_ID, &id.to_be_bytes())?;
        self.drift_meta
            .insert(cluster.as_bytes(), &event.id.to_be_bytes())?;
        self.drift_by_cluster
            .insert(cluster_drift_key(cluster, id), Vec::<u8>::new())?;
        let mut dropped = Vec::new();
        self.trim_cluster(cluster, &mut dropped)?;
        while self.drift.len() > self.drift_caps.total {
            let Some((k, v)) = self.drift.pop_min()? else {
                break;
            };
            let rec: DriftRecord = decode(&k, &v)?;
            self.drift_by_cluster
                .remove(cluster_drift_key(&rec.cluster, rec.id))?;
            dropped.push(rec);
        }
        if !dropped.is_empty() {
            let n = u64_at(&self.drift_meta, DRIFT_DROPPED)? + dropped.len() as u64;
            self.drift_meta.insert(DRIFT_DROPPED, &n.to_be_bytes())?;
        }
        Ok(DriftAdded {
            id: Some(id),
            dropped,
        })
    }

    fn list_drift(&self) -> Result<Vec<DriftRecord>, StoreError> {
        list(&self.drift)
    }

    fn get_drift(&self, id: u64) -> Result<Option<DriftRecord>, StoreError> {
        let key = id.to_be_bytes();
        self.drift.get(key)?.map(|v| decode(&key, &v)).transpose()
    }

    fn drift_dropped(&self) -> Result<u64, StoreError> {
        u64_at(&self.drift_meta, DRIFT_DROPPED)
    }

    fn list_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        list(&self.rollouts)
    }

    fn put_rollout(&self, rollout: &RolloutRecord) -> Result<(), StoreError> {
        self.rollouts
            .insert(rollout.rollout.bundle.as_bytes(), encode(rollout)?)?;
        Ok(())
    }

    fn delete_rollout(&self, bundle: &str) -> Result<(), StoreError> {
        self.rollouts.remove(bundle.as_bytes())?;
        Ok(())
    }

    fn add_rollout_history(
        &self,
        rollout: &flotilla_shared::rollout::Rollout,
    ) -> Result<(), StoreError> {
        let prefix = history_prefix(&rollout.bundle);
        let mut key = prefix.clone();
        key.extend_from_slice(&rollout.started_ms.to_be_bytes());
        self.rollout_history.insert(key, encode(rollout)?)?;
        let kept = self.rollout_history.scan_prefix(&prefix).count();
        for old in self
            .rollout_history
            .scan_prefix(&prefix)
            .keys()
            .take(kept.saturating_sub(MAX_ROLLOUT_HISTORY))
        {
            self.rollout_history.remove(old?)?;
        }
        Ok(())
    }

    fn rollout_history(
        &self,
        bundle: &str,
    ) -> Result<Vec<flotilla_shared::rollout::Rollout>, StoreError> {
        self.rollout_history
            .scan_prefix(history_prefix(bundle))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn add_rollout_events(
        &self,
        events: &[flotilla_shared::rollout::RolloutEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let _one = self.drift_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = u64_at(&self.rollout_events, EVENTS_NEXT_ID)?;
        for e in events {
            self.rollout_events.insert(next.to_be_bytes(), encode(e)?)?;
            next += 1;
        }
        self.rollout_events
            .insert(EVENTS_NEXT_ID, &next.to_be_bytes())?;
        let over = (self.rollout_events.len() - 1).saturating_sub(MAX_ROLLOUT_EVENTS);
        for old in self
            .rollout_events
            .iter()
            .keys()
            .filter(|k| k.as_ref().map_or(true, |k| k.len() == 8))
            .take(over)
        {
            self.rollout_events.remove(old?)?;
        }
        Ok(())
    }

    fn rollout_events(&self) -> Result<Vec<flotilla_shared::rollout::RolloutEvent>, StoreError> {
        self.rollout_events
            .iter()
            .filter(|kv| kv.as_ref().map_or(true, |(k, _)| k.len() == 8))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn drift_after(&self, after: u64, limit: usize) -> Result<Vec<DriftRecord>, StoreError> {
        let from = after.saturating_add(1).to_be_bytes();
        self.drift
            .range(from..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn drift_last_id(&self) -> Result<u64, StoreError> {
        u64_at(&self.drift_meta, DRIFT_NEXT_ID)
    }

    fn list_notifications(&self) -> Result<Vec<NotificationRecord>, StoreError> {
        list(&self.notifications)
    }

    fn put_notification(&self, n: &NotificationRecord) -> Result<(), StoreError> {
        self.notifications.insert(n.name.as_bytes(), encode(n)?)?;
        Ok(())
    }

    fn delete_notification(&self, name: &str) -> Result<bool, StoreError> {
        let existed = self.notifications.remove(name.as_bytes())?.is_some();
        let mut batch = sled::Batch::default();
        batch.remove(memory_key(name));
        for entry in self.outbox()? {
            if entry.notification == name {
                batch.remove(outbox_key(entry.id));
            }
        }
        self.notify.apply_batch(batch)?;
        Ok(existed)
    }

    fn notify_memory(
        &self,
        name: &str,
    ) -> Result<Option<flotilla_shared::notify::Memory>, StoreError> {
        let key = memory_key(name);
        self.notify.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    fn commit_notify(
        &self,
        name: &str,
        memory: &flotilla_shared::notify::Memory,
        messages: Vec<flotilla_shared::notify::Message>,
        now_ms: u64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        // One writer allocates ids at a time.
        let _one = self.drift_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = u64_at(&self.notify, OUTBOX_NEXT_ID)?;
        let mut batch = sled::Batch::default();
        batch.insert(memory_key(name), encode(memory)?);
        let mut entries = Vec::with_capacity(messages.len());
        for message in messages {
            next += 1;
            let entry = OutboxEntry {
                id: next,
                notification: name.to_string(),
                message,
                created_ms: now_ms,
                attempts: 0,
                next_attempt_ms: now_ms,
                last_error: None,
            };
            batch.insert(outbox_key(next), encode(&entry)?);
            entries.push(entry);
        }
        batch.insert(OUTBOX_NEXT_ID, &next.to_be_bytes());
        self.notify.apply_batch(batch)?;
        Ok(entries)
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.notify
            .scan_prefix(b"o\0")
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn put_outbox(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.notify.insert(outbox_key(entry.id), encode(entry)?)?;
        Ok(())
    }

    fn remove_outbox(&self, id: u64) -> Result<(), StoreError> {
        self.notify.remove(outbox_key(id))?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

const EVENTS_NEXT_ID: &[u8] = b"\0next-event-id";

/// The key prefix of a bundle's rollout history (bundle names hold no NUL).
fn history_prefix(bundle: &str) -> Vec<u8> {
    let mut k = bundle.as_bytes().to_vec();
    k.push(0);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let rec = TokenRecord {
            id: "abcd1234".into(),
            secret_hash: "h".into(),
            expires_at_ms: 1000,
            used: false,
            cluster_name: Some("edge-1".into()),
            labels: None,
        };
        store.put_token(&rec).unwrap();
        assert_eq!(
            store.consume_token("abcd1234", "wrong", 10).unwrap(),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            store.consume_token("abcd1234", "h", 1000).unwrap(),
            Err(TokenRefusal::Expired)
        );
        // Checking spends nothing.
        assert_eq!(
            store.check_token("abcd1234", "h", 10).unwrap(),
            Ok(rec.clone())
        );
        assert_eq!(
            store.check_token("abcd1234", "wrong", 10).unwrap(),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(store.consume_token("abcd1234", "h", 10).unwrap(), Ok(()));
        assert_eq!(
            store.check_token("abcd1234", "h", 10).unwrap(),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            store.consume_token("abcd1234", "h", 10).unwrap(),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            store.consume_token("nope", "h", 10).unwrap(),
            Err(TokenRefusal::Unknown)
        );
    }

    fn event(id: u64) -> DriftEvent {
        DriftEvent {
            id,
            bundle: "b".into(),
            object: flotilla_shared::bundle::ObjectRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: Some("demo".into()),
                name: "c".into(),
            },
            fields: vec![],
            manager: "kubectl-edit".into(),
            detected_at_unix_ms: 1,
            corrected: false,
            deleted: false,
        }
    }

    #[test]
    fn drift_is_deduplicated_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = SledStore::open_with_drift_cap(&path, 3).unwrap();
            assert_eq!(store.add_drift("a", &event(10)).unwrap().id, Some(1));
            assert_eq!(
                store.add_drift("a", &event(10)).unwrap().id,
                None,
                "a resend"
            );
            assert_eq!(
                store.add_drift("b", &event(10)).unwrap().id,
                Some(2),
                "per cluster"
            );
            assert_eq!(store.add_drift("a", &event(11)).unwrap().id, Some(3));
            let added = store.add_drift("a", &event(12)).unwrap();
            assert_eq!(added.id, Some(4));
            assert_eq!(added.dropped.len(), 1);
            assert_eq!(added.dropped[0].id, 1, "oldest first");
        }
        let store = SledStore::open_with_drift_cap(&path, 3).unwrap();
        assert_eq!(store.drift_dropped().unwrap(), 1);
        let ids: Vec<u64> = store.list_drift().unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, [2, 3, 4]);
        assert_eq!(store.get_drift(3).unwrap().unwrap().event.id, 11);
        assert_eq!(store.get_drift(1).unwrap(), None);
        assert_eq!(
            store.add_drift("a", &event(11)).unwrap().id,
            None,
            "survives reopen"
        );
    }

    /// One cluster floods the history: it pushes out only its own oldest events,
    /// never another cluster's, and the bounds hold after a reopen.
    #[test]
    fn a_flooding_cluster_pushes_out_only_its_own_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let caps = DriftCaps {
            total: 50,
            per_cluster: 10,
        };
        {
            let store = SledStore::open_with_drift_caps(&path, caps).unwrap();
            for id in 1..=5 {
                store.add_drift("b", &event(id)).unwrap();
            }
            let mut dropped = 0;
            for id in 1..=1_000 {
                dropped += store.add_drift("a", &event(id)).unwrap().dropped.len();
            }
            assert_eq!(dropped, 990);
            let of = |c: &str| {
                store
                    .list_drift()
                    .unwrap()
                    .into_iter()
                    .filter(|r| r.cluster == c)
                    .map(|r| r.event.id)
                    .collect::<Vec<_>>()
            };
            assert_eq!(of("b"), [1, 2, 3, 4, 5], "b's history survives a's flood");
            assert_eq!(
                of("a"),
                (991..=1_000).collect::<Vec<_>>(),
                "a keeps its newest"
            );
            assert_eq!(store.drift_dropped().unwrap(), 990);
        }
        // The fleet-wide bound still holds over many clusters, oldest first.
        let store = SledStore::open_with_drift_caps(&path, caps).unwrap();
        for c in 0..10 {
            for id in 1..=10 {
                store.add_drift(&format!("c{c}"), &event(id)).unwrap();
            }
        }
        let all = store.list_drift().unwrap();
        assert_eq!(all.len(), 50);
        assert!(all.iter().all(|r| r.cluster.starts_with('c')));
        assert_eq!(
            store.drift_by_cluster.len(),
            50,
            "index follows the history"
        );
    }

    /// A store written before the per-cluster index gets it at open.
    #[test]
    fn the_per_cluster_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = SledStore::open(&path).unwrap();
            for id in 1..=3 {
                store.add_drift("a", &event(id)).unwrap();
            }
            store.drift_by_cluster.clear().unwrap();
            store.flush().unwrap();
        }
        let caps = DriftCaps {
            total: 100,
            per_cluster: 2,
        };
        let store = SledStore::open_with_drift_caps(&path, caps).unwrap();
        assert_eq!(store.drift_by_cluster.len(), 3);
        let added = store.add_drift("a", &event(4)).unwrap();
        let gone: Vec<u64> = added.dropped.iter().map(|r| r.event.id).collect();
        assert_eq!(gone, [1, 2]);
    }

    #[test]
    fn clusters_are_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let c = ClusterRecord {
            name: "a".into(),
            ..Default::default()
        };
        assert!(store.create_cluster(&c).unwrap());
        assert!(!store.create_cluster(&c).unwrap());
        assert_eq!(store.list_clusters().unwrap(), vec![c]);
    }

    #[test]
    fn the_outbox_keeps_messages_with_their_memory_across_a_reopen() {
        use flotilla_shared::notify::{Memory, Message};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let message = |key: &str| Message {
            key: key.into(),
            events: vec![],
            title: key.into(),
            lines: vec![],
            body: serde_json::json!({}),
        };
        let memory = Memory {
            seq: 2,
            ..Memory::default()
        };
        {
            let store = SledStore::open(&path).unwrap();
            let queued = store
                .commit_notify("n", &memory, vec![message("k1"), message("k2")], 5)
                .unwrap();
            assert_eq!(queued.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
            store
                .commit_notify("other", &Memory::default(), vec![message("k3")], 6)
                .unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(&path).unwrap();
        assert_eq!(store.notify_memory("n").unwrap(), Some(memory));
        let keys: Vec<String> = store
            .outbox()
            .unwrap()
            .into_iter()
            .map(|e| e.message.key)
            .collect();
        assert_eq!(keys, ["k1", "k2", "k3"], "in order");
        // Ids keep growing after a reopen.
        let more = store
            .commit_notify("n", &Memory::default(), vec![message("k4")], 7)
            .unwrap();
        assert_eq!(more[0].id, 4);
        store.remove_outbox(1).unwrap();
        // Deleting a notification takes its memory and its messages, not others'.
        store.delete_notification("n").unwrap();
        assert_eq!(store.notify_memory("n").unwrap(), None);
        let left: Vec<String> = store
            .outbox()
            .unwrap()
            .into_iter()
            .map(|e| e.message.key)
            .collect();
        assert_eq!(left, ["k3"]);
    }
}
