//! The in-memory fleet model: sources with their latest snapshot, groups, clusters,
//! sessions and statuses, written through to the store. Decisions (who gets what,
//! which state to show) come from `flotilla_shared::assign`; this module only keeps
//! the inputs and tells sessions when they changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_shared::assign::{self, Assignment, BundleInfo, CustomizationInfo};
use flotilla_shared::bundle::{RenderError, Rendered};
use flotilla_shared::capabilities::Profile;
use flotilla_shared::depends::Dependency;
use flotilla_shared::drift::DriftEvent;
use flotilla_shared::labels::Labels;
use flotilla_shared::objects::{ClusterGroupSpec, GitSourceSpec};
use flotilla_shared::rollout::RolloutStrategy;
use flotilla_shared::state::{BundleState, Reported};
use flotilla_shared::targeting::{ClusterInfo, GroupInfo};
use serde::Serialize;
use tokio::sync::watch;

use flotilla_shared::index::{Index, Outcome as IndexOutcome};

use crate::store::{
    ClusterRecord, GroupRecord, RolloutRecord, SnapshotBundle, SnapshotRecord, SourceRecord,
    StatusRecord, Store, StoreError,
};

mod rollouts;
pub use flotilla_shared::api::{
    BundleClusterView, BundleView, ClusterBundleView, ClusterView, GroupView, RolloutHistoryView,
    RolloutView, SourceView,
};

/// One bundle of a snapshot, rendered (or not): the default content, and the
/// content of each target customisation (its `good`/`render_error` are filled in
/// by the fleet).
#[derive(Debug, Clone)]
pub struct RenderedBundle {
    pub name: String,
    pub path: String,
    pub result: Result<Rendered, RenderError>,
    pub customizations: Vec<(CustomizationInfo, Result<Rendered, RenderError>)>,
    /// `dependsOn` of the bundle's `fleet.yaml`.
    pub depends_on: Vec<Dependency>,
    /// The labels `dependsOn` selectors match (see `depends::bundle_labels`).
    pub labels: Labels,
    /// `rolloutStrategy`: the bundle's revisions go out partition by partition.
    pub rollout: Option<RolloutStrategy>,
}

#[derive(Debug, Clone, PartialEq)]
struct BundleEntry {
    path: String,
    /// Last good content: (hash, commit).
    good: Option<(String, String)>,
    render_error: Option<String>,
    /// Per target customisation, with its own last good content.
    customizations: Vec<CustomizationInfo>,
    depends_on: Vec<Dependency>,
    labels: Labels,
    rollout: Option<RolloutStrategy>,
}

#[derive(Debug, Clone)]
struct SourceState {
    spec: GitSourceSpec,
    commit: Option<String>,
    last_fetched_ms: Option<u64>,
    last_error: Option<String>,
    /// Failed fetches since the last good one (the poller backs off by it).
    consecutive_failures: u32,
    bundles: BTreeMap<String, BundleEntry>,
    /// The hub knows what this source serves: its last snapshot was restored
    /// from the store, fetched since, or it never had one. Until every source
    /// is loaded no desired set is sent (it could leave out bundles Git has).
    loaded: bool,
}

impl SourceState {
    fn new(spec: GitSourceSpec, loaded: bool) -> SourceState {
        SourceState {
            spec,
            commit: None,
            last_fetched_ms: None,
            last_error: None,
            consecutive_failures: 0,
            bundles: BTreeMap::new(),
            loaded,
        }
    }

    fn snapshot_record(&self, source: &str) -> SnapshotRecord {
        SnapshotRecord {
            source: source.to_string(),
            commit: self.commit.clone(),
            fetched_ms: self.last_fetched_ms,
            bundles: self
                .bundles
                .iter()
                .map(|(name, b)| SnapshotBundle {
                    name: name.clone(),
                    path: b.path.clone(),
                    good: b.good.clone(),
                    render_error: b.render_error.clone(),
                    customizations: b.customizations.clone(),
                    depends_on: b.depends_on.clone(),
                    labels: b.labels.clone(),
                    rollout: b.rollout.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct ClusterState {
    record: ClusterRecord,
    /// Id of the live session, if any.
    session: Option<u64>,
}

#[derive(Default)]
struct State {
    sources: BTreeMap<String, SourceState>,
    groups: BTreeMap<String, GroupRecord>,
    clusters: BTreeMap<String, ClusterState>,
    statuses: BTreeMap<(String, String), StatusRecord>,
    /// Drift events in the history per (cluster, bundle), for the views.
    drift_counts: BTreeMap<(String, String), usize>,
    /// Rendered content by hash, shared by every bundle and cluster that uses it.
    contents: HashMap<String, Arc<Rendered>>,
    /// Each bundle's current rollout (bundles with a `rolloutStrategy`).
    rollouts: BTreeMap<String, RolloutRecord>,
    next_session: u64,
    version: u64,
    /// Clusters whose matrix row may have changed without `version` moving (a
    /// report, an acknowledgement, a disconnect): `Fleet::matrix_rows`
    /// recomputes these rows only, and clears the set.
    row_dirty: BTreeSet<String>,
    /// Each cluster's targeted assignments, recomputed only for the clusters
    /// a change concerns (`shared::index`). Kept in step with `sources`,
    /// `groups` and `clusters` by every change of them.
    index: Index,
    /// Each cluster's wake-up: its session waits on it alone, and it moves when
    /// the cluster's desired set may have changed, or its session was superseded
    /// or ended at the hub.
    wakes: HashMap<String, watch::Sender<u64>>,
    /// Clusters whose assignments were recomputed by the index since start.
    recomputed: u64,
}

/// What `apply` did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

impl Action {
    /// As kubectl says it (`created`), and as the API's `ApplyResponse` carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
        }
    }
}

/// Why a fleet operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} not found")]
    NotFound(String),
    /// The request makes no sense in the current state (e.g. resuming a rollout
    /// that is not paused); the message says why.
    #[error("{0}")]
    Refused(String),
}

/// Why the hub refuses a cluster's client certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "cluster {0} is not enrolled (deleted at the hub?); enrol it again with a new join token"
    )]
    NotEnrolled(String),
    #[error(
        "this certificate of cluster {0} is no longer accepted (revoked, or replaced by a \
         newer one); enrol it again with a new join token"
    )]
    OtherCertificate(String),
}

/// Where a session stands after a change of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Current,
    /// A newer session of the same cluster took over.
    Superseded,
    /// The cluster was deleted (perhaps enrolled again since, with another
    /// certificate).
    Gone,
}

/// The fleet: shared by the gateway, the API and the source pollers.
pub struct Fleet {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    changed: watch::Sender<u64>,
    /// Bumped when anything an operator sees changes (statuses, drift,
    /// connections, sources, rollouts) besides desired sets: the web UI's live
    /// updates. Agent sessions never wait on it.
    observed: watch::Sender<u64>,
    /// Serialises snapshot commits (store writes, flush, content collection)
    /// without holding the state lock while the store works.
    snapshots: Mutex<()>,
    /// The matrix rows (every cluster's state of every bundle), kept until the
    /// fleet changes: `(version, observed)` when they were computed. Every change
    /// a view shows moves one of the two (the web UI's live updates rely on the
    /// same), so pages of a quiet fleet read them instead of computing
    /// clusters × bundles states per request.
    rows: Mutex<Option<RowCache>>,
    /// Drift events refused since start: about bundles not assigned to the
    /// reporting cluster.
    drift_refused: std::sync::atomic::AtomicU64,
    /// What the hub exports to Prometheus.
    pub metrics: crate::metrics::Metrics,
    /// When this process loaded the fleet: no cluster is offline from before.
    loaded_ms: u64,
}

/// What became of a drift event an agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftOutcome {
    /// Stored under this hub id.
    Stored(u64),
    /// Stored before (a resend after a lost ack).
    Resend,
    /// About a bundle not assigned to the cluster: not stored.
    Refused,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl State {
    fn bump(&mut self, changed: &watch::Sender<u64>) {
        self.version += 1;
        changed.send_replace(self.version);
    }

    /// Wakes the sessions of these clusters.
    fn wake<'a>(&self, clusters: impl IntoIterator<Item = &'a String>) {
        for name in clusters {
            if let Some(w) = self.wakes.get(name) {
                w.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Wakes every session (a signing key rotated, the last source loaded).
    fn wake_all(&self) {
        self.wake(self.wakes.keys());
    }

    /// Wakes the sessions of the clusters a bundle is assigned to (its rollout moved).
    fn wake_holders(&self, bundle: &str) {
        for name in self.index.holders(bundle) {
            if let Some(w) = self.wakes.get(name) {
                w.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Wakes the clusters of the bundles whose rollouts these writes moved.
    fn wake_rollouts(&self, w: &rollouts::RolloutWrites) {
        for bundle in w.put.iter().map(|r| &r.rollout.bundle).chain(&w.delete) {
            self.wake_holders(bundle);
        }
    }

    /// Takes what the index reports: counts it, wakes the clusters it changed.
    fn indexed(&mut self, out: IndexOutcome) {
        self.recomputed += out.recomputed.len() as u64;
        self.wake(&out.changed);
    }

    /// The sources' bundles changed: the index follows.
    fn reindex_bundles(&mut self) {
        let bundles = self.bundles_info();
        let out = self.index.set_bundles(bundles);
        self.indexed(out);
    }

    /// A cluster's labels or profile changed, or it enrolled: the index follows.
    fn reindex_cluster(&mut self, name: &str) {
        let Some(c) = self.clusters.get(name) else {
            return;
        };
        let out = self.index.set_cluster(cluster_info(&c.record));
        self.wakes
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(0).0);
        self.indexed(out);
    }

    /// Whether every source is loaded (a desired set is complete).
    fn loaded(&self) -> bool {
        self.sources.values().all(|s| s.loaded)
    }

    fn groups_info(&self) -> Vec<GroupInfo> {
        self.groups
            .values()
            .map(|g| GroupInfo {
                name: g.name.clone(),
                selector: g.spec.selector.clone(),
                labels: g.labels.clone(),
            })
            .collect()
    }

    /// Every bundle, those whose name another source's bundle has refused
    /// (`assign::refuse_colliding_names`).
    fn bundles_info(&self) -> Vec<BundleInfo> {
        let mut all: Vec<BundleInfo> = self
            .sources
            .iter()
            .flat_map(|(source, s)| {
                s.bundles.iter().map(move |(name, b)| BundleInfo {
                    name: name.clone(),
                    source: source.clone(),
                    path: b.path.clone(),
                    good: b.good.clone(),
                    render_error: b.render_error.clone(),
                    targets: s.spec.targets.clone(),
                    customizations: b.customizations.clone(),
                    depends_on: b.depends_on.clone(),
                    labels: b.labels.clone(),
                })
            })
            .collect();
        assign::refuse_colliding_names(&mut all);
        all
    }

    /// What the gates on every cluster's assignments read, gathered once for a
    /// view over many clusters (not once per cluster).
    fn assign_inputs(&self) -> AssignInputs {
        let bundles = self.index.bundles().clone();
        AssignInputs {
            depends: bundles.iter().any(|b| !b.depends_on.is_empty()),
            bundles,
            only: None,
        }
    }

    /// The cluster's assignments from the index, those waiting for their
    /// dependencies or held back by a rollout marked.
    fn assignments(&self, cluster: &ClusterRecord) -> Vec<Assignment> {
        self.assignments_with(cluster, &self.assign_inputs())
    }

    /// [`State::assignments`] from inputs gathered beforehand.
    fn assignments_with(&self, cluster: &ClusterRecord, inputs: &AssignInputs) -> Vec<Assignment> {
        let mut out: Vec<Assignment> = self
            .index
            .targeted(&cluster.name)
            .map(|t| {
                t.iter()
                    .filter(|a| inputs.only.as_ref().is_none_or(|o| *o == a.bundle))
                    .map(|a| Assignment::clone(a))
                    .collect()
            })
            .unwrap_or_default();
        if inputs.depends {
            flotilla_shared::depends::gate(&mut out, &inputs.bundles, |b| {
                self.reported(&cluster.name, b)
            });
        }
        if !self.rollouts.is_empty() {
            assign::gate_rollouts(
                &mut out,
                &cluster.name,
                |b| self.rollout_gate(b),
                |b| self.held(cluster, b),
            );
        }
        out
    }

    /// What the agent holds of a bundle: the hash it acknowledged, and the revision
    /// it reported for that hash, if any.
    fn held(&self, cluster: &ClusterRecord, bundle: &str) -> Option<(String, String)> {
        let hash = cluster.acked.get(bundle)?;
        let revision = self
            .reported(&cluster.name, bundle)
            .filter(|r| &r.content_hash == hash)
            .map(|r| r.revision)
            .unwrap_or_default();
        Some((hash.clone(), revision))
    }

    fn reported(&self, cluster: &str, bundle: &str) -> Option<Reported> {
        self.statuses
            .get(&(cluster.to_string(), bundle.to_string()))
            .map(reported)
    }

    /// Every status a cluster reported, by bundle: one range of the map, for a
    /// view that looks up each of the cluster's bundles.
    fn cluster_statuses(&self, cluster: &str) -> BTreeMap<&str, &StatusRecord> {
        self.statuses
            .range((cluster.to_string(), String::new())..)
            .take_while(|((c, _), _)| c == cluster)
            .map(|((_, b), s)| (b.as_str(), s))
            .collect()
    }

    fn cluster_bundles(&self, c: &ClusterRecord, inputs: &AssignInputs) -> Vec<ClusterBundleView> {
        let statuses = self.cluster_statuses(&c.name);
        self.assignments_with(c, inputs)
            .iter()
            .map(|a| {
                let reported = statuses.get(a.bundle.as_str()).map(|s| reported(s));
                let (state, message) = assign::assignment_state(
                    a,
                    c.acked.get(&a.bundle).map(String::as_str),
                    reported.as_ref(),
                );
                ClusterBundleView {
                    bundle: a.bundle.clone(),
                    state,
                    applied_revision: reported.map(|r| r.revision),
                    message,
                }
            })
            .collect()
    }

    fn matrix_row(&self, c: &ClusterState, inputs: &AssignInputs) -> flotilla_shared::matrix::Row {
        flotilla_shared::matrix::Row {
            cluster: c.record.name.clone(),
            labels: c.record.labels.clone(),
            connected: c.session.is_some(),
            states: self
                .cluster_bundles(&c.record, inputs)
                .into_iter()
                .map(|b| (b.bundle, b.state))
                .collect(),
        }
    }

    fn cluster_view(
        &self,
        c: &ClusterState,
        with_bundles: bool,
        inputs: &AssignInputs,
    ) -> ClusterView {
        let bundles = self.cluster_bundles(&c.record, inputs);
        let counts = assign::count_states(bundles.iter().map(|b| b.state));
        ClusterView {
            name: c.record.name.clone(),
            labels: c.record.labels.clone(),
            connected: c.session.is_some(),
            last_seen: c.record.last_seen_ms.map(crate::rfc3339),
            agent_version: c.record.agent_version.clone(),
            kubernetes_version: c.record.kubernetes_version.clone(),
            bundle_counts: counts,
            drift_events: self
                .drift_counts
                .iter()
                .filter(|((cl, _), _)| *cl == c.record.name)
                .map(|(_, n)| n)
                .sum(),
            bundles: with_bundles.then_some(bundles),
        }
    }

    /// Statuses of bundles no source has any more (a removed source or bundle
    /// directory) or of clusters no longer enrolled; removed from memory, the keys
    /// returned for the store.
    fn prune_statuses(&mut self) -> Vec<(String, String)> {
        let bundles: BTreeSet<&String> = self
            .sources
            .values()
            .flat_map(|s| s.bundles.keys())
            .collect();
        let loading = self.sources.values().any(|s| !s.loaded);
        let gone: Vec<(String, String)> = self
            .statuses
            .keys()
            .filter(|(c, b)| !self.clusters.contains_key(c) || (!loading && !bundles.contains(b)))
            .cloned()
            .collect();
        for k in &gone {
            self.statuses.remove(k);
        }
        gone
    }

    /// Drops contents no bundle refers to; returns their hashes.
    fn gc_contents(&mut self) -> Vec<String> {
        let live: BTreeSet<String> = self
            .sources
            .values()
            .flat_map(|s| s.bundles.values())
            .flat_map(|b| {
                std::iter::once(&b.good)
                    .chain(b.customizations.iter().map(|c| &c.good))
                    .filter_map(|g| g.as_ref().map(|(h, _)| h.clone()))
            })
            .chain(
                self.rollouts
                    .values()
                    .flat_map(|r| r.hashes().map(str::to_string)),
            )
            .collect();
        let dead: Vec<String> = self
            .contents
            .keys()
            .filter(|h| !live.contains(*h))
            .cloned()
            .collect();
        for h in &dead {
            self.contents.remove(h);
        }
        dead
    }
}

/// An agent's reported API versions as stored: sorted, distinct.
fn profile_api_versions(api_versions: &[String]) -> Vec<String> {
    Profile::new("", api_versions.iter().map(String::as_str)).api_versions
}

/// What a cluster's agent reported of its capabilities.
fn profile(c: &ClusterRecord) -> Profile {
    Profile::new(
        &c.kubernetes_version,
        c.api_versions.iter().map(String::as_str),
    )
}

/// A cluster as matching sees it: its labels, plus its Kubernetes version and
/// API-version set (for the profile-pinned Helm renders, see
/// `shared::capabilities`).
/// The matrix rows: each cluster's, and all of them in name order, as of
/// `version` plus the dirty rows recomputed since.
struct RowCache {
    version: u64,
    by_cluster: BTreeMap<String, Arc<flotilla_shared::matrix::Row>>,
    all: Arc<Vec<Arc<flotilla_shared::matrix::Row>>>,
}

/// What an agent reported, as the state functions take it.
fn reported(s: &StatusRecord) -> Reported {
    Reported {
        content_hash: s.content_hash.clone(),
        revision: s.revision.clone(),
        state: s.state,
        message: s.message.clone(),
    }
}

/// See [`State::assign_inputs`].
struct AssignInputs {
    bundles: Arc<Vec<BundleInfo>>,
    /// Some bundle depends on another: `depends::gate` has work to do.
    depends: bool,
    /// Only this bundle's assignment is wanted (a view of one bundle where
    /// nothing depends on anything).
    only: Option<String>,
}

/// A cluster without its bundles; see [`Fleet::cluster_heads`].
#[derive(Debug, Clone)]
pub struct ClusterHead {
    pub name: String,
    pub connected: bool,
    pub last_seen_ms: Option<u64>,
    pub agent_version: String,
    pub kubernetes_version: String,
}

fn cluster_info(c: &ClusterRecord) -> ClusterInfo {
    let mut labels = c.labels.clone();
    labels.extend(profile(c).labels());
    ClusterInfo {
        name: c.name.clone(),
        labels,
    }
}

/// What an agent says of itself when its session starts.
#[derive(Debug, Clone, Copy)]
pub struct Hello<'a> {
    pub agent_version: &'a str,
    pub kubernetes_version: &'a str,
    pub api_versions: &'a [String],
}

/// A digest of a set's bundles, contents and revisions: two sets with the
/// same digest are the same set.
pub fn set_digest(set: &DesiredSet) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (bundle, hash, revision) in &set.bundles {
        for part in [bundle, hash, revision] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
    }
    hex::encode(h.finalize())
}

/// What a session sends: the complete set and the contents by hash.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSet {
    /// (bundle, content hash, revision), sorted by bundle.
    pub bundles: Vec<(String, String, String)>,
    /// Every source is loaded: the set leaves out nothing Git has. An
    /// incomplete set is never sent.
    pub complete: bool,
}

impl Fleet {
    /// Loads the fleet from the store.
    pub fn load(store: Arc<dyn Store>) -> Result<Arc<Fleet>, StoreError> {
        let mut state = State::default();
        let mut snapshots: HashMap<String, SnapshotRecord> = store
            .list_snapshots()?
            .into_iter()
            .map(|s| (s.source.clone(), s))
            .collect();
        for s in store.list_sources()? {
            let mut source = SourceState::new(s.spec, false);
            match snapshots.remove(&s.name) {
                Some(snap) => match restore(&*store, &snap, &mut state.contents) {
                    Ok(()) => {
                        source.commit = snap.commit;
                        source.last_fetched_ms = snap.fetched_ms;
                        source.bundles = snap
                            .bundles
                            .into_iter()
                            .map(|b| {
                                (
                                    b.name,
                                    BundleEntry {
                                        path: b.path,
                                        good: b.good,
                                        render_error: b.render_error,
                                        customizations: b.customizations,
                                        depends_on: b.depends_on,
                                        labels: b.labels,
                                        rollout: b.rollout,
                                    },
                                )
                            })
                            .collect();
                        source.loaded = true;
                        tracing::info!(
                            source = %s.name,
                            commit = source.commit.as_deref().unwrap_or("none"),
                            bundles = source.bundles.len(),
                            "snapshot restored"
                        );
                    }
                    Err(error) => tracing::error!(
                        source = %s.name,
                        %error,
                        "stored snapshot unreadable: holding every desired set until the source is fetched"
                    ),
                },
                None => tracing::warn!(
                    source = %s.name,
                    "no stored snapshot (a store from before snapshots were kept): \
                     holding every desired set until the source is fetched"
                ),
            }
            state.sources.insert(s.name.clone(), source);
        }
        // Rollouts, with the contents they move between (a rollback needs them).
        for r in store.list_rollouts()? {
            let mut got = Vec::new();
            let mut complete = true;
            for hash in r.hashes() {
                if state.contents.contains_key(hash) {
                    continue;
                }
                match store.get_content(hash)? {
                    Some(c) => got.push((hash.to_string(), Arc::new(c))),
                    None => complete = false,
                }
            }
            state.contents.extend(got);
            if !complete {
                tracing::error!(
                    bundle = %r.rollout.bundle,
                    "a content of the stored rollout is missing: its clusters keep what they hold"
                );
            }
            state.rollouts.insert(r.rollout.bundle.clone(), r);
        }
        // Snapshots of deleted sources, and contents nothing refers to.
        for gone in snapshots.keys() {
            store.delete_snapshot(gone)?;
        }
        for hash in store.content_hashes()? {
            if !state.contents.contains_key(&hash) {
                store.delete_content(&hash)?;
            }
        }
        for g in store.list_groups()? {
            state.groups.insert(g.name.clone(), g);
        }
        for c in store.list_clusters()? {
            state.clusters.insert(
                c.name.clone(),
                ClusterState {
                    record: c,
                    session: None,
                },
            );
        }
        // What is kept of a cluster no longer enrolled is what a `cluster delete`
        // interrupted by a stop left behind: finish it.
        let mut leftovers = BTreeSet::new();
        for s in store.list_statuses()? {
            if !state.clusters.contains_key(&s.cluster) {
                leftovers.insert(s.cluster);
                continue;
            }
            state
                .statuses
                .insert((s.cluster.clone(), s.bundle.clone()), s);
        }
        for d in store.list_drift()? {
            if !state.clusters.contains_key(&d.cluster) {
                leftovers.insert(d.cluster);
                continue;
            }
            *state
                .drift_counts
                .entry((d.cluster, d.event.bundle))
                .or_default() += 1;
        }
        for name in leftovers {
            tracing::info!(cluster = %name, "forgetting what a deleted cluster left behind");
            store.forget_cluster(&name)?;
        }
        state.index = Index::new(state.groups_info(), state.bundles_info());
        let names: Vec<String> = state.clusters.keys().cloned().collect();
        for name in names {
            state.reindex_cluster(&name);
        }
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Fleet {
            drift_refused: std::sync::atomic::AtomicU64::new(0),
            metrics: crate::metrics::Metrics::new(),
            state: Mutex::new(state),
            store,
            changed,
            observed: watch::channel(0).0,
            snapshots: Mutex::new(()),
            rows: Mutex::new(None),
            loaded_ms: crate::now_ms(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Wakes every session to look at its desired set again (after a signing-key
    /// rotation: the same set, signed anew).
    pub fn nudge(&self) {
        let mut st = self.lock();
        st.bump(&self.changed);
        st.wake_all();
    }

    /// A receiver that changes whenever anything that affects desired sets does
    /// (the web UI's live updates; sessions wait on `subscribe_cluster`).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A receiver that changes whenever the cluster's desired set may have
    /// changed, or its session was superseded or ended at the hub (then check
    /// `session_state`); it closes when the cluster is deleted. `None` for a
    /// cluster not enrolled.
    pub fn subscribe_cluster(&self, name: &str) -> Option<watch::Receiver<u64>> {
        self.lock().wakes.get(name).map(watch::Sender::subscribe)
    }

    /// How many clusters the index has recomputed since start (for tests and
    /// benchmarks: a change concerns only some clusters).
    pub fn index_recomputed(&self) -> u64 {
        self.lock().recomputed
    }

    /// Marks that something an operator sees changed (see `observed`).
    pub fn observe(&self) {
        self.observed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that changes whenever anything an operator sees does: desired
    /// sets (`subscribe`) are forwarded by the caller; this is the rest.
    pub fn subscribe_observed(&self) -> watch::Receiver<u64> {
        self.observed.subscribe()
    }

    // ---- sources and groups -------------------------------------------------

    /// The capability profiles (Kubernetes version, API-version set) the fleet's
    /// agents reported, distinct and sorted: Helm bundles render once per profile.
    pub fn render_profiles(&self) -> Vec<Profile> {
        let st = self.lock();
        let all: Vec<Profile> = st.clusters.values().map(|c| profile(&c.record)).collect();
        flotilla_shared::capabilities::profiles(&all)
    }

    pub fn source_specs(&self) -> Vec<(String, GitSourceSpec)> {
        self.lock()
            .sources
            .iter()
            .map(|(n, s)| (n.clone(), s.spec.clone()))
            .collect()
    }

    pub fn apply_source(&self, name: &str, spec: GitSourceSpec) -> Result<Action, FleetError> {
        let mut st = self.lock();
        let action = match st.sources.get(name) {
            Some(s) if s.spec == spec => return Ok(Action::Unchanged),
            Some(_) => Action::Configured,
            None => Action::Created,
        };
        self.store.put_source(&SourceRecord {
            name: name.to_string(),
            spec: spec.clone(),
        })?;
        match st.sources.get_mut(name) {
            Some(s) => s.spec = spec,
            None => {
                // New: nothing of it was ever served, so it is loaded (empty),
                // and stays so across a restart before its first fetch.
                let source = SourceState::new(spec, true);
                self.store.put_snapshot(&source.snapshot_record(name))?;
                st.sources.insert(name.to_string(), source);
            }
        }
        st.reindex_bundles();
        st.bump(&self.changed);
        Ok(action)
    }

    pub fn delete_source(&self, name: &str) -> Result<bool, FleetError> {
        let mut st = self.lock();
        if st.sources.remove(name).is_none() {
            return Ok(false);
        }
        self.store.delete_source(name)?;
        self.store.delete_snapshot(name)?;
        for hash in st.gc_contents() {
            self.store.delete_content(&hash)?;
        }
        for (cluster, bundle) in st.prune_statuses() {
            self.store.delete_status(&cluster, &bundle)?;
        }
        let was_loaded = st.loaded();
        st.reindex_bundles();
        if st.loaded() && !was_loaded {
            // The source that was not loaded is gone: every set is complete now.
            st.wake_all();
        }
        st.bump(&self.changed);
        Ok(true)
    }

    pub fn apply_group(
        &self,
        name: &str,
        labels: Labels,
        spec: ClusterGroupSpec,
    ) -> Result<Action, FleetError> {
        let mut st = self.lock();
        let rec = GroupRecord {
            name: name.to_string(),
            labels,
            spec,
        };
        let action = match st.groups.get(name) {
            Some(g) if *g == rec => return Ok(Action::Unchanged),
            Some(_) => Action::Configured,
            None => Action::Created,
        };
        self.store.put_group(&rec)?;
        st.groups.insert(name.to_string(), rec);
        let groups = st.groups_info();
        let out = st.index.set_groups(groups);
        st.indexed(out);
        st.bump(&self.changed);
        Ok(action)
    }

    /// Records a new snapshot of a source. Bundles that failed to render keep their
    /// last good content; bundles no longer in the tree go away (agents prune).
    /// The snapshot and its contents are stored and flushed before any session
    /// sees them, so a restarted hub serves what it served. Returns false if
    /// the source no longer exists. Blocking: call it off the async threads.
    pub fn set_snapshot(
        &self,
        source: &str,
        commit: &str,
        bundles: Vec<RenderedBundle>,
        now_ms: u64,
    ) -> Result<bool, FleetError> {
        // Hash the contents first, outside any lock (a large bundle takes a
        // while); then store them, without the state lock.
        let mut fresh: HashMap<String, Arc<Rendered>> = HashMap::new();
        let mut settled = Vec::with_capacity(bundles.len());
        let mut settle = |result: Result<Rendered, RenderError>| match result {
            Ok(rendered) => {
                let hash = rendered.content_hash();
                self.metrics.content_seen(&hash, now_ms);
                fresh
                    .entry(hash.clone())
                    .or_insert_with(|| Arc::new(rendered));
                Ok(hash)
            }
            Err(e) => Err(e.to_string()),
        };
        for b in bundles {
            let result = settle(b.result);
            let customizations: Vec<_> = b
                .customizations
                .into_iter()
                .map(|(info, r)| (info, settle(r)))
                .collect();
            settled.push((
                b.name,
                b.path,
                result,
                customizations,
                b.depends_on,
                b.labels,
                b.rollout,
            ));
        }
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        for (hash, content) in &fresh {
            self.store.put_content(hash, content)?;
        }
        // The next state of the source, from its current one.
        let next = {
            let st = self.lock();
            let Some(src) = st.sources.get(source) else {
                return Ok(false);
            };
            let keep = |r: Result<String, String>, previous: Option<(String, String)>| match r {
                Ok(hash) => (Some((hash, commit.to_string())), None),
                Err(e) => (previous, Some(e)),
            };
            let mut next = src.clone();
            next.bundles = settled
                .into_iter()
                .map(
                    |(name, path, result, customizations, depends_on, labels, rollout)| {
                        let previous = src.bundles.get(&name);
                        let (good, render_error) =
                            keep(result, previous.and_then(|e| e.good.clone()));
                        let customizations = customizations
                            .into_iter()
                            .map(|(info, r)| {
                                let previous_good = previous
                                    .and_then(|e| {
                                        e.customizations.iter().find(|c| c.name == info.name)
                                    })
                                    .and_then(|c| c.good.clone());
                                let (good, render_error) = keep(r, previous_good);
                                CustomizationInfo {
                                    good,
                                    render_error,
                                    ..info
                                }
                            })
                            .collect();
                        let entry = BundleEntry {
                            path,
                            good,
                            render_error,
                            customizations,
                            depends_on,
                            labels,
                            rollout,
                        };
                        (name, entry)
                    },
                )
                .collect();
            next.commit = Some(commit.to_string());
            next.last_fetched_ms = Some(now_ms);
            next.last_error = None;
            next.consecutive_failures = 0;
            next.loaded = true;
            next
        };
        self.store.put_snapshot(&next.snapshot_record(source))?;
        self.store.flush()?;
        let dead = {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(src) = st.sources.get_mut(source) else {
                return Ok(false);
            };
            let changed = src.bundles != next.bundles || !src.loaded;
            let was_unloaded = !src.loaded;
            // Fetch state may have moved meanwhile (set_fetched); the snapshot wins.
            *src = SourceState {
                spec: src.spec.clone(),
                ..next
            };
            let newly_complete = was_unloaded && st.loaded();
            for (hash, content) in fresh {
                st.contents.entry(hash).or_insert(content);
            }
            // A new revision of a rolling bundle is held back from its first
            // sight: its rollout starts here, durable before any session sees it.
            // (Sessions woken here look once the lock is released: at the
            // rollouts too.)
            if changed {
                st.reindex_bundles();
            }
            let rollouts = st.begin_rollouts(now_ms);
            self.write_rollouts(&rollouts)?;
            let dead = st.gc_contents();
            let statuses = st.prune_statuses();
            st.wake_rollouts(&rollouts);
            if newly_complete {
                // The sets held back until every source loaded can go now.
                st.wake_all();
            }
            if changed || !rollouts.put.is_empty() || !rollouts.delete.is_empty() {
                st.bump(&self.changed);
            }
            (dead, statuses)
        };
        let (dead, statuses) = dead;
        for hash in dead {
            self.store.delete_content(&hash)?;
        }
        for (cluster, bundle) in statuses {
            self.store.delete_status(&cluster, &bundle)?;
        }
        Ok(true)
    }

    /// The commit of the source's current snapshot.
    pub fn source_commit(&self, source: &str) -> Option<String> {
        self.lock()
            .sources
            .get(source)
            .and_then(|s| s.commit.clone())
    }

    /// Records a fetch that found nothing new.
    pub fn set_fetched(&self, source: &str, now_ms: u64) {
        if let Some(s) = self.lock().sources.get_mut(source) {
            s.last_fetched_ms = Some(now_ms);
            s.last_error = None;
            s.consecutive_failures = 0;
        }
        self.observe();
    }

    /// Records a failed fetch; the last good snapshot stays.
    pub fn set_source_error(&self, source: &str, error: String) {
        if let Some(s) = self.lock().sources.get_mut(source) {
            s.last_error = Some(error);
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        }
        self.observe();
    }

    // ---- clusters and sessions ----------------------------------------------

    pub fn cluster_exists(&self, name: &str) -> bool {
        self.lock().clusters.contains_key(name)
    }

    /// Registers a newly enrolled cluster; false if the name is taken.
    pub fn create_cluster(&self, record: ClusterRecord) -> Result<bool, FleetError> {
        let mut st = self.lock();
        if st.clusters.contains_key(&record.name) || !self.store.create_cluster(&record)? {
            return Ok(false);
        }
        self.store.flush()?;
        let name = record.name.clone();
        st.clusters.insert(
            record.name.clone(),
            ClusterState {
                record,
                session: None,
            },
        );
        st.reindex_cluster(&name);
        st.bump(&self.changed);
        Ok(true)
    }

    /// Deletes a cluster: its record goes first (so its certificate is refused
    /// from now on, also after a later enrolment under the same name, which
    /// pins another certificate), then its statuses and drift history; its live
    /// session is woken and ends. Returns false if there was no such cluster.
    pub fn delete_cluster(&self, name: &str) -> Result<bool, FleetError> {
        let mut st = self.lock();
        if st.clusters.remove(name).is_none() {
            return Ok(false);
        }
        st.statuses.retain(|(c, _), _| c != name);
        st.drift_counts.retain(|(c, _), _| c != name);
        // Under the lock: a drift event or status of this cluster is either
        // stored before (and removed here) or refused after.
        self.store.forget_cluster(name)?;
        let out = st.index.remove_cluster(name);
        st.indexed(out);
        // Its session sees the close and ends (the cluster is gone).
        st.wakes.remove(name);
        st.bump(&self.changed);
        Ok(true)
    }

    /// Judges the certificate (its fingerprint) a call of cluster `name`
    /// presents, pinning a renewed one on its first use.
    pub fn authorize(
        &self,
        name: &str,
        cert_sha256: &str,
    ) -> Result<Result<(), Refused>, FleetError> {
        let mut st = self.lock();
        Ok(self.authorize_locked(&mut st, name, cert_sha256))
    }

    fn authorize_locked(
        &self,
        st: &mut State,
        name: &str,
        cert_sha256: &str,
    ) -> Result<(), Refused> {
        use flotilla_shared::identity::{pin, standing, Standing};
        let Some(c) = st.clusters.get_mut(name) else {
            return Err(Refused::NotEnrolled(name.to_string()));
        };
        let pins = c.record.pins();
        let judged = standing(&pins, cert_sha256);
        match judged {
            Standing::Refused => return Err(Refused::OtherCertificate(name.to_string())),
            Standing::Current => return Ok(()),
            Standing::Renewed => {
                tracing::info!(cluster = %name, "renewed certificate in use; the old one is refused from now on")
            }
            Standing::Unpinned => {
                tracing::info!(cluster = %name, "certificate pinned (cluster enrolled before pinning)")
            }
        }
        let pinned = pin(&pins, cert_sha256, judged);
        c.record.cert_sha256 = pinned.current;
        c.record.next_cert_sha256 = pinned.next;
        if let Err(error) = self
            .store
            .put_cluster(&c.record)
            .and_then(|()| self.store.flush())
        {
            // Accepted anyway: the pin is re-made on the next call.
            tracing::warn!(cluster = %name, %error, "cannot persist the certificate pin");
        }
        Ok(())
    }

    /// Records a certificate issued by a renewal (the call presented
    /// `presented`, already authorised): accepted next to the current one until
    /// first used. A renewal whose answer was lost is simply renewed again.
    pub fn record_renewal(
        &self,
        name: &str,
        presented: &str,
        issued: &str,
    ) -> Result<Result<(), Refused>, FleetError> {
        let mut st = self.lock();
        if let Err(refused) = self.authorize_locked(&mut st, name, presented) {
            return Ok(Err(refused));
        }
        let Some(c) = st.clusters.get_mut(name) else {
            return Ok(Err(Refused::NotEnrolled(name.to_string())));
        };
        c.record.next_cert_sha256 = Some(issued.to_string());
        self.store.put_cluster(&c.record)?;
        self.store.flush()?;
        Ok(Ok(()))
    }

    /// Replaces a cluster's labels; targeting is re-evaluated at once.
    pub fn set_labels(&self, name: &str, labels: Labels) -> Result<ClusterView, FleetError> {
        let mut st = self.lock();
        let c = st
            .clusters
            .get_mut(name)
            .ok_or_else(|| FleetError::NotFound(format!("cluster {name}")))?;
        c.record.labels = labels;
        self.store.put_cluster(&c.record)?;
        st.reindex_cluster(name);
        st.bump(&self.changed);
        let c = &st.clusters[name];
        Ok(st.cluster_view(c, true, &st.assign_inputs()))
    }

    /// Starts a session for a cluster, superseding any previous one, if the
    /// certificate it presents (checked again: the cluster may have been deleted
    /// and enrolled anew since the call began) still stands. Returns the session id.
    pub fn connect(
        &self,
        name: &str,
        cert_sha256: &str,
        hello: &Hello<'_>,
        now_ms: u64,
    ) -> Result<Result<u64, Refused>, FleetError> {
        let mut st = self.lock();
        if let Err(refused) = self.authorize_locked(&mut st, name, cert_sha256) {
            return Ok(Err(refused));
        }
        st.next_session += 1;
        let id = st.next_session;
        let Some(c) = st.clusters.get_mut(name) else {
            return Ok(Err(Refused::NotEnrolled(name.to_string())));
        };
        let Hello {
            agent_version,
            kubernetes_version,
            api_versions,
        } = *hello;
        c.session = Some(id);
        c.record.agent_version = agent_version.to_string();
        c.record.kubernetes_version = kubernetes_version.to_string();
        c.record.api_versions = profile_api_versions(api_versions);
        c.record.last_seen_ms = Some(now_ms);
        self.store.put_cluster(&c.record)?;
        // A new profile may change what the cluster gets.
        st.reindex_cluster(name);
        // Wakes the superseded session (this cluster's only) so it ends.
        st.wake([&name.to_string()]);
        st.bump(&self.changed);
        Ok(Ok(id))
    }

    /// Whether session `session` of cluster `name`, opened with the certificate
    /// `cert_sha256`, is still the one to serve. A session outlives neither its
    /// cluster nor its certificate (a cluster enrolled again under the name pins
    /// another one).
    pub fn session_state(&self, name: &str, session: u64, cert_sha256: &str) -> SessionState {
        match self.lock().clusters.get(name) {
            None => SessionState::Gone,
            Some(c)
                if !flotilla_shared::identity::standing(&c.record.pins(), cert_sha256)
                    .accepted() =>
            {
                SessionState::Gone
            }
            Some(c) if c.session == Some(session) => SessionState::Current,
            Some(_) => SessionState::Superseded,
        }
    }

    /// Updates last-seen; persists it when `persist`.
    pub fn touch(&self, name: &str, now_ms: u64, persist: bool) -> Result<(), FleetError> {
        let mut st = self.lock();
        if let Some(c) = st.clusters.get_mut(name) {
            c.record.last_seen_ms = Some(now_ms);
            if persist {
                self.store.put_cluster(&c.record)?;
            }
        }
        Ok(())
    }

    /// The cluster's pinned certificates and file marks, for a status file.
    pub fn cluster_record(&self, name: &str) -> Option<ClusterRecord> {
        self.lock().clusters.get(name).map(|c| c.record.clone())
    }

    /// Notes what a status file brought in (only ever upwards) and when the
    /// agent wrote it (its last-seen, if later than the one known); persisted.
    pub fn record_file_marks(
        &self,
        name: &str,
        marks: crate::store::FileMarks,
        seen_ms: u64,
    ) -> Result<(), FleetError> {
        let mut st = self.lock();
        if let Some(c) = st.clusters.get_mut(name) {
            let m = &mut c.record.file_marks;
            m.status_seq = m.status_seq.max(marks.status_seq);
            m.drift_id = m.drift_id.max(marks.drift_id);
            if c.record.last_seen_ms.is_none_or(|t| t < seen_ms) {
                c.record.last_seen_ms = Some(seen_ms);
            }
            self.store.put_cluster(&c.record)?;
        }
        Ok(())
    }

    /// Ends a session (if it is still the current one) and persists last-seen.
    pub fn disconnect(&self, name: &str, session: u64, now_ms: u64) -> Result<(), FleetError> {
        let mut st = self.lock();
        if let Some(c) = st.clusters.get_mut(name) {
            if c.session == Some(session) {
                c.session = None;
                c.record.last_seen_ms = Some(now_ms);
                self.store.put_cluster(&c.record)?;
                st.row_dirty.insert(name.to_string());
            }
        }
        drop(st);
        self.observe();
        Ok(())
    }

    /// What the cluster must hold now.
    pub fn desired(&self, name: &str) -> Option<DesiredSet> {
        let st = self.lock();
        let c = st.clusters.get(name)?;
        Some(DesiredSet {
            bundles: assign::sendable(&st.assignments(&c.record), |b| st.held(&c.record, b)),
            complete: st.loaded(),
        })
    }

    pub fn content(&self, hash: &str) -> Option<Arc<Rendered>> {
        self.lock().contents.get(hash).cloned()
    }

    /// The signed set the cluster's agent last acknowledged over a session.
    pub fn resume_point(&self, name: &str) -> Option<crate::store::Resume> {
        self.lock()
            .clusters
            .get(name)
            .and_then(|c| c.record.resume.clone())
    }

    /// Records that the agent holds (flushed) exactly this set; `resume` when
    /// it came over a session, signed (see [`crate::store::Resume`]).
    pub fn record_ack(
        &self,
        name: &str,
        set: &DesiredSet,
        resume: Option<crate::store::Resume>,
    ) -> Result<(), FleetError> {
        let mut st = self.lock();
        if let Some(c) = st.clusters.get_mut(name) {
            c.record.acked = set
                .bundles
                .iter()
                .map(|(b, h, _)| (b.clone(), h.clone()))
                .collect();
            c.record.resume = resume;
            self.store.put_cluster(&c.record)?;
            st.row_dirty.insert(name.to_string());
        }
        drop(st);
        // What it acknowledged is shown (WaitApplied rather than Pending).
        self.observe();
        Ok(())
    }

    /// Stores an agent's status report (not yet flushed; see `Store::flush`).
    /// A report about a bundle not assigned to the reporting cluster is refused:
    /// an agent speaks only for what it was given.
    pub fn record_status(&self, status: StatusRecord) -> Result<bool, FleetError> {
        let mut st = self.lock();
        if !Self::assigned(&st, &status.cluster, &status.bundle) {
            return Ok(false);
        }
        self.store.put_status(&status)?;
        let ready =
            |s: &StatusRecord| (s.state == BundleState::Ready).then(|| s.content_hash.clone());
        let key = (status.cluster.clone(), status.bundle.clone());
        let cluster_name = status.cluster.clone();
        let readiness_changed = st.statuses.get(&key).map(ready) != Some(ready(&status));
        if readiness_changed && status.state == BundleState::Ready {
            self.metrics.ready(&status.content_hash, crate::now_ms());
        }
        st.statuses.insert(key, status);
        st.row_dirty.insert(cluster_name.clone());
        // Bundles that depend on this one may now be sent (or held back): this
        // cluster's session looks again. Nothing else is recomputed.
        let any_depends = || st.index.bundles().iter().any(|b| !b.depends_on.is_empty());
        if readiness_changed && any_depends() {
            st.wake([&cluster_name]);
        }
        drop(st);
        self.observe();
        Ok(true)
    }

    /// Whether `bundle` is assigned to `cluster` now: an agent speaks only for
    /// what it was given. While a source is not loaded, its bundles' assignments
    /// are unknown: a report is kept rather than lost (it was acknowledged).
    fn assigned(st: &State, cluster: &str, bundle: &str) -> bool {
        st.clusters.contains_key(cluster) && (!st.loaded() || st.index.is_targeted(cluster, bundle))
    }

    /// Drift events refused so far (bundles not assigned to their cluster).
    pub fn drift_refused(&self) -> u64 {
        self.drift_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a drift event from a cluster's agent (flushed before returning, so
    /// it may be acknowledged). An event about a bundle not assigned to the
    /// cluster is refused, not stored, and counted.
    /// A cluster deleted meanwhile has no bundle assigned: its event is refused.
    pub fn record_drift(
        &self,
        cluster: &str,
        event: &DriftEvent,
    ) -> Result<DriftOutcome, FleetError> {
        // Stored under the lock, so that `delete_cluster` (which holds it) either
        // removes the event or comes before it and the event is refused here.
        let added = {
            let st = self.lock();
            if !Self::assigned(&st, cluster, &event.bundle) {
                self.drift_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(DriftOutcome::Refused);
            }
            self.store.add_drift(cluster, event)?
        };
        self.store.flush()?;
        let mut st = self.lock();
        if added.id.is_some() && st.clusters.contains_key(cluster) {
            *st.drift_counts
                .entry((cluster.to_string(), event.bundle.clone()))
                .or_default() += 1;
        }
        for d in added.dropped {
            let key = (d.cluster, d.event.bundle);
            if let Some(n) = st.drift_counts.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.drift_counts.remove(&key);
                }
            }
        }
        if added.id.is_some() {
            let kind = |k: &str| crate::metrics::DriftKind {
                kind: k.to_string(),
            };
            self.metrics
                .drift_events
                .get_or_create(&kind("detected"))
                .inc();
            if event.corrected {
                self.metrics
                    .drift_events
                    .get_or_create(&kind("corrected"))
                    .inc();
            }
        }
        drop(st);
        self.observe();
        Ok(added.id.map_or(DriftOutcome::Resend, DriftOutcome::Stored))
    }

    // ---- views for the API --------------------------------------------------

    pub fn sources(&self) -> Vec<SourceView> {
        let st = self.lock();
        st.sources.iter().map(|(n, s)| source_view(n, s)).collect()
    }

    pub fn source(&self, name: &str) -> Option<SourceView> {
        let st = self.lock();
        st.sources.get(name).map(|s| source_view(name, s))
    }

    pub fn groups(&self) -> Vec<GroupView> {
        let st = self.lock();
        let infos = st.groups_info();
        st.groups
            .values()
            .zip(infos.iter())
            .map(|(g, info)| GroupView {
                name: g.name.clone(),
                labels: g.labels.clone(),
                selector: g.spec.selector.clone(),
                clusters: st
                    .clusters
                    .values()
                    .filter(|c| info.contains(&cluster_info(&c.record)))
                    .map(|c| c.record.name.clone())
                    .collect(),
            })
            .collect()
    }

    pub fn clusters(&self) -> Vec<ClusterView> {
        let st = self.lock();
        let inputs = st.assign_inputs();
        st.clusters
            .values()
            .map(|c| st.cluster_view(c, false, &inputs))
            .collect()
    }

    /// Every cluster without its bundles (no assignment is computed): what the
    /// metrics read per cluster.
    pub fn cluster_heads(&self) -> Vec<ClusterHead> {
        self.lock()
            .clusters
            .values()
            .map(|c| ClusterHead {
                name: c.record.name.clone(),
                connected: c.session.is_some(),
                last_seen_ms: c.record.last_seen_ms,
                agent_version: c.record.agent_version.clone(),
                kubernetes_version: c.record.kubernetes_version.clone(),
            })
            .collect()
    }

    pub fn cluster(&self, name: &str) -> Option<ClusterView> {
        let st = self.lock();
        st.clusters
            .get(name)
            .map(|c| st.cluster_view(c, true, &st.assign_inputs()))
    }

    /// What a cluster's agent holds of a bundle, as the hub knows it: the content
    /// hash it acknowledged (flushed to its store), the revision it reported for
    /// it, and that content from the hub's content store. `Err` says which of
    /// the three is missing.
    pub fn held_content(
        &self,
        cluster: &str,
        bundle: &str,
    ) -> Result<(String, String, Arc<Rendered>), String> {
        let st = self.lock();
        let c = st
            .clusters
            .get(cluster)
            .ok_or_else(|| format!("cluster {cluster} not found"))?;
        let (hash, revision) = st.held(&c.record, bundle).ok_or_else(|| {
            format!("cluster {cluster} holds no content of bundle {bundle}: none acknowledged")
        })?;
        let content = st.contents.get(&hash).cloned().ok_or_else(|| {
            format!(
                "the hub no longer holds content {hash}, which cluster {cluster} holds of bundle {bundle}"
            )
        })?;
        Ok((hash, revision, content))
    }

    pub fn cluster_labels(&self, name: &str) -> Option<Labels> {
        self.lock()
            .clusters
            .get(name)
            .map(|c| c.record.labels.clone())
    }

    fn bundle_views(&self, only: Option<&str>) -> Vec<BundleView> {
        let st = self.lock();
        let mut out = Vec::new();
        // Each cluster's assignments, with dependsOn applied (it needs all of
        // them). Where nothing depends on anything, the one bundle asked for is
        // all there is to compute (names colliding across sources were refused
        // when the inputs were gathered).
        let mut inputs = st.assign_inputs();
        if !inputs.depends {
            inputs.only = only.map(str::to_string);
        }
        #[allow(clippy::type_complexity)]
        let per_cluster: Vec<(
            &ClusterState,
            BTreeMap<String, Assignment>,
            BTreeMap<&str, &StatusRecord>,
        )> = st
            .clusters
            .values()
            .map(|c| {
                let assigned = st
                    .assignments_with(&c.record, &inputs)
                    .into_iter()
                    .filter(|a| only.is_none_or(|n| n == a.bundle))
                    .map(|a| (a.bundle.clone(), a))
                    .collect();
                (c, assigned, st.cluster_statuses(&c.record.name))
            })
            .collect();
        for info in st.index.bundles().iter() {
            if only.is_some_and(|n| n != info.name) {
                continue;
            }
            let mut clusters = Vec::new();
            for (c, assigned, statuses) in &per_cluster {
                let Some(a) = assigned.get(&info.name) else {
                    continue;
                };
                let reported = statuses.get(info.name.as_str()).map(|s| reported(s));
                let (state, message) = assign::assignment_state(
                    a,
                    c.record.acked.get(&info.name).map(String::as_str),
                    reported.as_ref(),
                );
                clusters.push(BundleClusterView {
                    cluster: c.record.name.clone(),
                    state,
                    applied_revision: reported.map(|r| r.revision),
                    message,
                    drift_events: st
                        .drift_counts
                        .get(&(c.record.name.clone(), info.name.clone()))
                        .copied()
                        .unwrap_or(0),
                });
            }
            let latest = st
                .sources
                .get(&info.source)
                .and_then(|s| s.commit.clone())
                .unwrap_or_default();
            out.push(BundleView {
                name: info.name.clone(),
                source: info.source.clone(),
                path: info.path.clone(),
                revision: info.good.as_ref().map(|(_, r)| r.clone()).unwrap_or(latest),
                content_hash: info.good.as_ref().map(|(h, _)| h.clone()),
                error: info.render_error.clone(),
                cluster_counts: assign::count_states(clusters.iter().map(|c| c.state)),
                drift_events: st
                    .drift_counts
                    .iter()
                    .filter(|((_, b), _)| *b == info.name)
                    .map(|(_, n)| n)
                    .sum(),
                clusters: only.is_some().then_some(clusters),
            });
        }
        out
    }

    /// Every cluster with the state of each bundle assigned to it: the web UI's
    /// matrix (`flotilla_shared::matrix` filters and pages it).
    /// Every cluster's row of the matrix: its labels, whether it is connected,
    /// and its state of each bundle assigned to it. Kept between calls and
    /// shared by the pages and the metrics: all rows are computed again when
    /// desired sets changed (`version`: a commit, labels, groups, a rollout
    /// step, a cluster enrolled or deleted), and only the rows of the clusters
    /// that reported, acknowledged or disconnected since otherwise.
    pub fn matrix_rows(&self) -> Arc<Vec<Arc<flotilla_shared::matrix::Row>>> {
        let mut cache = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = self.lock();
        let dirty = std::mem::take(&mut st.row_dirty);
        match cache.as_mut() {
            Some(c) if c.version == st.version => {
                if dirty.is_empty() {
                    return c.all.clone();
                }
                let inputs = st.assign_inputs();
                for name in &dirty {
                    match st.clusters.get(name) {
                        Some(cs) => {
                            c.by_cluster
                                .insert(name.clone(), Arc::new(st.matrix_row(cs, &inputs)));
                        }
                        None => {
                            c.by_cluster.remove(name);
                        }
                    }
                }
                c.all = Arc::new(c.by_cluster.values().cloned().collect());
                c.all.clone()
            }
            _ => {
                let inputs = st.assign_inputs();
                let by_cluster: BTreeMap<String, Arc<flotilla_shared::matrix::Row>> = st
                    .clusters
                    .iter()
                    .map(|(n, cs)| (n.clone(), Arc::new(st.matrix_row(cs, &inputs))))
                    .collect();
                let all = Arc::new(by_cluster.values().cloned().collect::<Vec<_>>());
                *cache = Some(RowCache {
                    version: st.version,
                    by_cluster,
                    all: all.clone(),
                });
                all
            }
        }
    }

    /// Each bundle's current rollout phase, for the metrics.
    pub fn rollout_phases(&self) -> Vec<(String, String)> {
        self.lock()
            .rollouts
            .values()
            .map(|r| (r.rollout.bundle.clone(), format!("{:?}", r.rollout.phase)))
            .collect()
    }

    /// The fleet as notifications see it at `now_ms` (drift is the caller's).
    pub fn notify_world(&self, now_ms: u64) -> flotilla_shared::notify::World {
        use flotilla_shared::notify::{
            BundleSeen, ClusterSeen, OnCluster, RolloutEnd, RolloutSeen, SourceSeen, World,
        };
        let st = self.lock();
        let clusters = st
            .clusters
            .values()
            .map(|c| ClusterSeen {
                name: c.record.name.clone(),
                labels: c.record.labels.clone(),
                offline_since_ms: c.session.is_none().then(|| {
                    c.record
                        .last_seen_ms
                        .unwrap_or(c.record.enrolled_at_ms)
                        .max(self.loaded_ms)
                }),
            })
            .collect();
        let inputs = st.assign_inputs();
        let infos = &inputs.bundles;
        let mut bundles: BTreeMap<String, BundleSeen> = infos
            .iter()
            .map(|info| {
                let mut variants: Vec<&str> = info
                    .good
                    .iter()
                    .map(|(h, _)| h.as_str())
                    .chain(
                        info.customizations
                            .iter()
                            .filter_map(|c| c.good.as_ref().map(|(h, _)| h.as_str())),
                    )
                    .collect();
                variants.sort_unstable();
                let identity = (!variants.is_empty()).then(|| {
                    use sha2::Digest;
                    hex::encode(&sha2::Sha256::digest(variants.join("\n").as_bytes())[..16])
                });
                let seen = BundleSeen {
                    name: info.name.clone(),
                    source: info.source.clone(),
                    labels: info.labels.clone(),
                    revision: info
                        .good
                        .as_ref()
                        .map(|(_, r)| r.clone())
                        .unwrap_or_default(),
                    content_hash: identity,
                    clusters: Vec::new(),
                };
                (info.name.clone(), seen)
            })
            .collect();
        for c in st.clusters.values() {
            let statuses = st.cluster_statuses(&c.record.name);
            for a in st.assignments_with(&c.record, &inputs) {
                let Some(b) = bundles.get_mut(&a.bundle) else {
                    continue;
                };
                let reported = statuses.get(a.bundle.as_str()).map(|s| reported(s));
                let (state, message) = assign::assignment_state(
                    &a,
                    c.record.acked.get(&a.bundle).map(String::as_str),
                    reported.as_ref(),
                );
                b.clusters.push(OnCluster {
                    cluster: c.record.name.clone(),
                    state,
                    content_hash: reported.map(|r| r.content_hash),
                    target_hash: a.content_hash.clone(),
                    message,
                });
            }
        }
        let sources = st
            .sources
            .iter()
            .map(|(name, s)| SourceSeen {
                name: name.clone(),
                error: s.last_error.clone(),
            })
            .collect();
        let rollouts = st
            .rollouts
            .values()
            .map(|r| RolloutSeen {
                bundle: r.rollout.bundle.clone(),
                revision: r.rollout.revision.clone(),
                end: match r.rollout.phase {
                    flotilla_shared::rollout::Phase::Halted => Some(RolloutEnd::Halted),
                    flotilla_shared::rollout::Phase::RolledBack => Some(RolloutEnd::RolledBack),
                    _ => None,
                },
                reason: r.rollout.reason.clone(),
            })
            .collect();
        World {
            now_ms,
            now: crate::rfc3339(now_ms),
            clusters,
            bundles: bundles.into_values().collect(),
            sources,
            rollouts,
            drift: Vec::new(),
            drift_last_id: 0,
        }
    }

    /// Every bundle without its clusters (no assignment is computed): what the
    /// overview lists; `cluster_counts` is empty.
    pub fn bundle_heads(&self) -> Vec<BundleView> {
        let st = self.lock();
        st.index
            .bundles()
            .iter()
            .map(|info| {
                let latest = st
                    .sources
                    .get(&info.source)
                    .and_then(|s| s.commit.clone())
                    .unwrap_or_default();
                BundleView {
                    name: info.name.clone(),
                    source: info.source.clone(),
                    path: info.path.clone(),
                    revision: info.good.as_ref().map(|(_, r)| r.clone()).unwrap_or(latest),
                    content_hash: info.good.as_ref().map(|(h, _)| h.clone()),
                    error: info.render_error.clone(),
                    cluster_counts: BTreeMap::new(),
                    drift_events: 0,
                    clusters: None,
                }
            })
            .collect()
    }

    pub fn bundles(&self) -> Vec<BundleView> {
        self.bundle_views(None)
    }

    pub fn bundle(&self, name: &str) -> Option<BundleView> {
        self.bundle_views(Some(name)).into_iter().next()
    }
}

fn source_view(name: &str, s: &SourceState) -> SourceView {
    SourceView {
        name: name.to_string(),
        // A source stored before credentials in URLs were refused shows none.
        repo: flotilla_shared::objects::redact_repo_url(&s.spec.repo),
        branch: s.spec.branch.clone(),
        tag: s.spec.tag.clone(),
        revision: s.spec.revision.clone(),
        paths: s.spec.paths.clone(),
        poll_interval: humantime::format_duration(s.spec.poll_interval()).to_string(),
        targets: s.spec.targets.clone(),
        commit: s.commit.clone(),
        last_fetched: s.last_fetched_ms.map(crate::rfc3339),
        last_error: s.last_error.clone(),
        consecutive_failures: s.consecutive_failures,
        bundles: s.bundles.keys().cloned().collect(),
    }
}

/// Reads a stored snapshot's contents into `contents`; an error if any is missing
/// or does not match its hash (the source is then not loaded).
fn restore(
    store: &dyn Store,
    snap: &SnapshotRecord,
    contents: &mut HashMap<String, Arc<Rendered>>,
) -> Result<(), StoreError> {
    let mut got = Vec::new();
    for hash in snap.hashes() {
        if contents.contains_key(hash) {
            continue;
        }
        match store.get_content(hash)? {
            Some(r) => got.push((hash.to_string(), Arc::new(r))),
            None => {
                return Err(StoreError::Corrupt {
                    key: hash.to_string(),
                    reason: "content of a stored snapshot is missing".into(),
                })
            }
        }
    }
    contents.extend(got);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn status(cluster: &str, bundle: &str) -> StatusRecord {
        StatusRecord {
            cluster: cluster.into(),
            bundle: bundle.into(),
            content_hash: "h".into(),
            revision: "r".into(),
            state: BundleState::Ready,
            message: String::new(),
            observed_at_ms: 1,
        }
    }

    fn drift(id: u64) -> DriftEvent {
        DriftEvent {
            id,
            bundle: "b".into(),
            object: flotilla_shared::bundle::ObjectRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: None,
                name: "c".into(),
            },
            fields: vec![],
            manager: String::new(),
            detected_at_unix_ms: 1,
            corrected: false,
            deleted: false,
        }
    }

    fn cluster(name: &str, pin: Option<&str>) -> ClusterRecord {
        ClusterRecord {
            name: name.into(),
            cert_sha256: pin.map(str::to_string),
            ..Default::default()
        }
    }

    use flotilla_shared::bundle::{BundleOptions, Manifest};

    fn rendered(data: &str) -> Rendered {
        Rendered {
            manifests: vec![Manifest {
                file: "cm.yaml".into(),
                object: serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "cm"}, "data": {"v": data}
                }),
            }],
            options: BundleOptions::default(),
        }
    }

    fn bundle(name: &str, result: Result<Rendered, RenderError>) -> RenderedBundle {
        RenderedBundle {
            name: name.into(),
            path: name.into(),
            result,
            customizations: vec![],
            depends_on: vec![],
            labels: Labels::new(),
            rollout: None,
        }
    }

    /// Opens the store, waiting (with a deadline) for sled's background flusher
    /// of a just-dropped handle to let go of the lock.
    fn reopen(dir: &std::path::Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn open(dir: &std::path::Path) -> Arc<Fleet> {
        Fleet::load(Arc::new(reopen(dir))).unwrap()
    }

    fn enrol(fleet: &Fleet, name: &str) {
        assert!(fleet
            .create_cluster(ClusterRecord {
                name: name.into(),
                ..Default::default()
            })
            .unwrap());
    }

    fn spec() -> GitSourceSpec {
        GitSourceSpec {
            repo: "https://example.invalid/r.git".into(),
            ..Default::default()
        }
    }

    /// Each session waits on its own cluster's receiver: a commit wakes the
    /// clusters it targets, a relabel or a connection the one cluster, and a
    /// deletion closes the deleted cluster's receiver only; the index
    /// recomputes only the clusters concerned.
    #[test]
    fn each_change_wakes_only_the_sessions_it_concerns() {
        use flotilla_shared::objects::Target;
        use flotilla_shared::selector::LabelSelector;
        let dir = tempfile::tempdir().unwrap();
        let fleet = open(dir.path());
        let labels = |s: &str| flotilla_shared::labels::parse_labels(s).unwrap();
        for (name, env) in [("a", "env=prod"), ("b", "env=prod"), ("c", "env=dev")] {
            enrol(&fleet, name);
            fleet.set_labels(name, labels(env)).unwrap();
        }
        let prod = Target {
            cluster_selector: Some(LabelSelector {
                match_labels: labels("env=prod"),
                ..LabelSelector::default()
            }),
            ..Target::default()
        };
        let mut apps = spec();
        apps.targets = vec![prod];
        fleet.apply_source("apps", apps).unwrap();
        let mut rx: BTreeMap<&str, watch::Receiver<u64>> = ["a", "b", "c"]
            .into_iter()
            .map(|n| (n, fleet.subscribe_cluster(n).unwrap()))
            .collect();
        let mut woken = || {
            rx.iter_mut()
                .filter_map(|(n, r)| {
                    let woke = r.has_changed().unwrap_or(true);
                    r.mark_unchanged();
                    woke.then_some(*n)
                })
                .collect::<Vec<_>>()
        };
        let recomputed = fleet.index_recomputed();
        let web = vec![bundle("web", Ok(rendered("1")))];
        assert!(fleet.set_snapshot("apps", "c1", web, 1).unwrap());
        assert_eq!(woken(), ["a", "b"], "a commit for prod clusters");
        assert_eq!(fleet.index_recomputed() - recomputed, 2);
        assert_eq!(fleet.desired("c").unwrap().bundles, vec![]);

        let recomputed = fleet.index_recomputed();
        fleet.set_labels("c", labels("env=prod")).unwrap();
        assert_eq!(woken(), ["c"], "a relabel");
        assert_eq!(fleet.index_recomputed() - recomputed, 1);
        assert_eq!(fleet.desired("c").unwrap().bundles.len(), 1);

        let hello = Hello {
            agent_version: "t",
            kubernetes_version: "v1.34.0",
            api_versions: &[],
        };
        fleet.connect("a", "cert-a", &hello, 2).unwrap().unwrap();
        assert_eq!(
            woken(),
            ["a"],
            "a connection wakes the session it supersedes"
        );
        let recomputed = fleet.index_recomputed();
        fleet.connect("a", "cert-a", &hello, 3).unwrap().unwrap();
        assert_eq!(woken(), ["a"]);
        assert_eq!(
            fleet.index_recomputed(),
            recomputed,
            "the same profile again recomputes nothing"
        );

        // A report: nothing depends on anything, nothing wakes or recomputes.
        let recomputed = fleet.index_recomputed();
        let hash = fleet.desired("b").unwrap().bundles[0].1.clone();
        let mut report = status("b", "web");
        report.content_hash = hash;
        assert!(fleet.record_status(report).unwrap());
        assert_eq!(woken(), Vec::<&str>::new(), "a status report");
        assert_eq!(fleet.index_recomputed(), recomputed);

        assert!(fleet.delete_cluster("b").unwrap());
        assert_eq!(woken(), ["b"], "a deletion closes only its receiver");
        assert!(rx["b"].has_changed().is_err());
        assert!(fleet.subscribe_cluster("b").is_none());
    }

    /// Deleting a cluster removes what is kept of it and nothing of the others;
    /// a delete cut short (record gone, statuses and drift left) is finished at
    /// the next load.
    #[test]
    fn a_deleted_cluster_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store: Arc<dyn Store> = Arc::new(reopen(&path));
            for c in ["a", "b", "ab"] {
                store.create_cluster(&cluster(c, Some("fp"))).unwrap();
                store.put_status(&status(c, "b")).unwrap();
                store.add_drift(c, &drift(1)).unwrap();
            }
            let fleet = Fleet::load(store.clone()).unwrap();
            assert!(fleet.delete_cluster("a").unwrap());
            assert!(!fleet.delete_cluster("a").unwrap());
            assert_eq!(
                fleet.authorize("a", "fp").unwrap(),
                Err(Refused::NotEnrolled("a".into()))
            );
            assert!(matches!(
                fleet.record_drift("a", &drift(2)).unwrap(),
                DriftOutcome::Refused
            ));
            let left: Vec<String> = store
                .list_statuses()
                .unwrap()
                .into_iter()
                .map(|s| s.cluster)
                .collect();
            assert_eq!(left, ["ab", "b"]);
            let left: Vec<String> = store
                .list_drift()
                .unwrap()
                .into_iter()
                .map(|d| d.cluster)
                .collect();
            assert_eq!(left, ["b", "ab"]);
            // A stop between removing the record and the rest.
            store.delete_cluster("b").unwrap();
            store.flush().unwrap();
        }
        let store: Arc<dyn Store> = Arc::new(reopen(&path));
        let fleet = Fleet::load(store.clone()).unwrap();
        assert_eq!(fleet.clusters().len(), 1);
        let left: Vec<String> = store
            .list_statuses()
            .unwrap()
            .into_iter()
            .map(|s| s.cluster)
            .collect();
        assert_eq!(left, ["ab"]);
        assert_eq!(store.list_drift().unwrap().len(), 1);
        // Enrolled again, the name starts its drift ids afresh.
        assert!(fleet.create_cluster(cluster("b", Some("fp2"))).unwrap());
        assert!(store.add_drift("b", &drift(1)).unwrap().id.is_some());
    }

    /// A cluster enrolled before pinning pins the first certificate it presents.
    #[test]
    fn an_unpinned_cluster_pins_its_first_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store: Arc<dyn Store> = Arc::new(reopen(&path));
            store.create_cluster(&cluster("old", None)).unwrap();
            let fleet = Fleet::load(store).unwrap();
            assert_eq!(fleet.authorize("old", "first").unwrap(), Ok(()));
            assert_eq!(
                fleet.authorize("old", "second").unwrap(),
                Err(Refused::OtherCertificate("old".into()))
            );
        }
        let store: Arc<dyn Store> = Arc::new(reopen(&path));
        let fleet = Fleet::load(store).unwrap();
        assert_eq!(
            fleet.authorize("old", "first").unwrap(),
            Ok(()),
            "persisted"
        );
        assert!(fleet.authorize("old", "second").unwrap().is_err());
    }

    /// A restarted hub serves exactly what it served, before any fetch, and a
    /// render failing after the restart keeps the last good content.
    #[test]
    fn a_restarted_fleet_serves_its_last_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let fleet = open(dir.path());
            fleet.apply_source("s", spec()).unwrap();
            enrol(&fleet, "c1");
            let bundles = vec![
                bundle("s-a", Ok(rendered("1"))),
                bundle("s-b", Ok(rendered("2"))),
            ];
            assert!(fleet.set_snapshot("s", "c0ffee", bundles, 5).unwrap());
            let d = fleet.desired("c1").unwrap();
            assert!(d.complete);
            assert_eq!(d.bundles.len(), 2);
            d
        };
        let fleet = open(dir.path());
        let after = fleet.desired("c1").unwrap();
        assert_eq!(after, before, "the same set, before any fetch");
        for (_, hash, _) in &after.bundles {
            assert_eq!(fleet.content(hash).unwrap().content_hash(), *hash);
        }
        assert_eq!(fleet.source_commit("s").as_deref(), Some("c0ffee"));
        // The renderer now fails for one bundle: it keeps its last good content.
        let failing = vec![
            bundle(
                "s-a",
                Err(RenderError {
                    file: "fleet.yaml".into(),
                    line: None,
                    object: None,
                    reason: "helm: broken".into(),
                }),
            ),
            bundle("s-b", Ok(rendered("2"))),
        ];
        assert!(fleet.set_snapshot("s", "bad", failing, 6).unwrap());
        let hashes = |d: DesiredSet| -> Vec<(String, String)> {
            d.bundles.into_iter().map(|(b, h, _)| (b, h)).collect()
        };
        let after = fleet.desired("c1").unwrap();
        assert_eq!(
            after.bundles[0], before.bundles[0],
            "s-a: last good, its commit"
        );
        assert_eq!(hashes(after.clone()), hashes(before.clone()));
        drop(fleet);
        let fleet = open(dir.path());
        assert_eq!(fleet.desired("c1").unwrap(), after);
        let view = fleet.source("s").unwrap();
        assert_eq!(view.commit.as_deref(), Some("bad"));
    }

    /// A source the store knows without a snapshot (a store from before
    /// snapshots, or a lost one) holds every desired set until it is fetched.
    #[test]
    fn an_unloaded_source_holds_every_desired_set() {
        let dir = tempfile::tempdir().unwrap();
        {
            let fleet = open(dir.path());
            fleet.apply_source("s", spec()).unwrap();
            fleet.apply_source("t", spec()).unwrap();
            enrol(&fleet, "c1");
            fleet
                .set_snapshot("s", "c1", vec![bundle("s-a", Ok(rendered("1")))], 1)
                .unwrap();
            fleet.store().delete_snapshot("s").unwrap();
            fleet.store().flush().unwrap();
        }
        let fleet = open(dir.path());
        assert!(!fleet.desired("c1").unwrap().complete);
        fleet
            .set_snapshot("s", "c2", vec![bundle("s-a", Ok(rendered("1")))], 2)
            .unwrap();
        let d = fleet.desired("c1").unwrap();
        assert!(
            d.complete,
            "a fetched source is loaded; a new, unfetched one is too"
        );
        assert_eq!(d.bundles.len(), 1);
    }

    /// A stored content that does not match its hash is not served: the source
    /// is not loaded, and nothing is sent until it is fetched again.
    #[test]
    fn a_corrupt_content_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let hash = {
            let fleet = open(dir.path());
            fleet.apply_source("s", spec()).unwrap();
            enrol(&fleet, "c1");
            fleet
                .set_snapshot("s", "c1", vec![bundle("s-a", Ok(rendered("1")))], 1)
                .unwrap();
            let hash = fleet.desired("c1").unwrap().bundles[0].1.clone();
            fleet.store().delete_content(&hash).unwrap();
            fleet
                .store()
                .put_content(&hash, &rendered("tampered"))
                .unwrap();
            fleet.store().flush().unwrap();
            hash
        };
        let fleet = open(dir.path());
        assert!(fleet.content(&hash).is_none());
        assert!(!fleet.desired("c1").unwrap().complete);
    }

    /// Statuses of a bundle that left Git, or of a removed source, go (in memory
    /// and in the store); others stay.
    #[test]
    fn statuses_of_removed_bundles_and_sources_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = open(dir.path());
        fleet.apply_source("s", spec()).unwrap();
        fleet.apply_source("t", spec()).unwrap();
        enrol(&fleet, "c1");
        let two = vec![
            bundle("s-a", Ok(rendered("1"))),
            bundle("s-b", Ok(rendered("2"))),
        ];
        fleet.set_snapshot("s", "c1", two, 1).unwrap();
        fleet
            .set_snapshot("t", "c1", vec![bundle("t-a", Ok(rendered("3")))], 1)
            .unwrap();
        for b in ["s-a", "s-b", "t-a"] {
            let status = StatusRecord {
                cluster: "c1".into(),
                bundle: b.into(),
                content_hash: "h".into(),
                revision: "c1".into(),
                state: BundleState::Ready,
                message: String::new(),
                observed_at_ms: 1,
            };
            assert!(fleet.record_status(status).unwrap());
        }
        let stored = |f: &Fleet| -> Vec<String> {
            f.store()
                .list_statuses()
                .unwrap()
                .into_iter()
                .map(|s| s.bundle)
                .collect()
        };
        assert_eq!(stored(&fleet), ["s-a", "s-b", "t-a"]);
        fleet
            .set_snapshot("s", "c2", vec![bundle("s-a", Ok(rendered("1")))], 2)
            .unwrap();
        assert_eq!(stored(&fleet), ["s-a", "t-a"]);
        fleet.delete_source("t").unwrap();
        assert_eq!(stored(&fleet), ["s-a"]);
        drop(fleet);
        let fleet = open(dir.path());
        assert_eq!(stored(&fleet), ["s-a"]);
    }

    /// Contents are deduplicated by hash and collected with the last snapshot
    /// that used them, in memory and in the store.
    #[test]
    fn contents_are_shared_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = open(dir.path());
        fleet.apply_source("s", spec()).unwrap();
        fleet.apply_source("t", spec()).unwrap();
        fleet
            .set_snapshot("s", "c1", vec![bundle("s-a", Ok(rendered("same")))], 1)
            .unwrap();
        fleet
            .set_snapshot("t", "c1", vec![bundle("t-a", Ok(rendered("same")))], 1)
            .unwrap();
        assert_eq!(fleet.store().content_hashes().unwrap().len(), 1);
        fleet
            .set_snapshot("s", "c2", vec![bundle("s-a", Ok(rendered("new")))], 2)
            .unwrap();
        assert_eq!(fleet.store().content_hashes().unwrap().len(), 2);
        fleet.delete_source("t").unwrap();
        assert_eq!(fleet.store().content_hashes().unwrap().len(), 1);
    }

    /// A rolling bundle over four clusters in two partitions: the first
    /// revision goes partition by partition; a second one that fails on the
    /// first partition rolls back there and never reaches the second; all of
    /// it survives a restart, and the history names both outcomes.
    #[test]
    fn a_rollout_goes_partition_by_partition_and_rolls_back() {
        use flotilla_shared::rollout::{OnFailure, PartitionSpec, RolloutStrategy};
        use flotilla_shared::selector::LabelSelector;
        let dir = tempfile::tempdir().unwrap();
        let fleet = open(dir.path());
        fleet.apply_source("s", spec()).unwrap();
        for (name, wave) in [("a1", "1"), ("a2", "1"), ("b1", "2"), ("b2", "2")] {
            enrol(&fleet, name);
            fleet
                .set_labels(
                    name,
                    flotilla_shared::labels::parse_labels(&format!("wave={wave}")).unwrap(),
                )
                .unwrap();
            let hello = Hello {
                agent_version: "t",
                kubernetes_version: "v1.34.0",
                api_versions: &[],
            };
            fleet
                .connect(name, &format!("cert-{name}"), &hello, 1)
                .unwrap()
                .unwrap();
        }
        let part = |name: &str, sel: &str| PartitionSpec {
            name: name.into(),
            max_unavailable: None,
            target: flotilla_shared::objects::Target::selector(LabelSelector::parse(sel).unwrap()),
        };
        let strategy = RolloutStrategy {
            partitions: vec![part("one", "wave=1"), part("two", "wave=2")],
            progress_deadline_ms: 60_000,
            on_failure: OnFailure::Rollback,
            ..Default::default()
        };
        let web = |data: &str| RenderedBundle {
            rollout: Some(strategy.clone()),
            ..bundle("s-web", Ok(rendered(data)))
        };
        let has = |fleet: &Fleet, c: &str| -> Option<String> {
            fleet
                .desired(c)
                .unwrap()
                .bundles
                .into_iter()
                .find(|(b, _, _)| b == "s-web")
                .map(|(_, h, _)| h)
        };
        // The agent acknowledges what it is sent and reports it `state`.
        let report = |fleet: &Fleet, c: &str, state: BundleState, at: i64| {
            let d = fleet.desired(c).unwrap();
            fleet.record_ack(c, &d, None).unwrap();
            let (_, hash, revision) = d
                .bundles
                .into_iter()
                .find(|(b, _, _)| b == "s-web")
                .unwrap();
            fleet
                .record_status(StatusRecord {
                    cluster: c.into(),
                    bundle: "s-web".into(),
                    content_hash: hash,
                    revision,
                    state,
                    message: String::new(),
                    observed_at_ms: at,
                })
                .unwrap();
        };
        let v1 = rendered("1").content_hash();
        let v2 = rendered("2").content_hash();
        fleet.set_snapshot("s", "rev1", vec![web("1")], 10).unwrap();
        assert_eq!(
            has(&fleet, "a1"),
            None,
            "nothing before the planner admits it"
        );
        fleet.step_rollouts(11).unwrap();
        assert_eq!(has(&fleet, "a1").as_deref(), Some(v1.as_str()));
        assert_eq!(has(&fleet, "b1"), None, "partition two has not started");
        let b1 = fleet.cluster("b1").unwrap().bundles.unwrap();
        assert_eq!(b1[0].state, BundleState::OutOfSync, "{b1:?}");
        report(&fleet, "a1", BundleState::Ready, 12);
        report(&fleet, "a2", BundleState::Ready, 12);
        fleet.step_rollouts(13).unwrap();
        fleet.step_rollouts(14).unwrap();
        assert_eq!(has(&fleet, "b1").as_deref(), Some(v1.as_str()));
        report(&fleet, "b1", BundleState::Ready, 15);
        report(&fleet, "b2", BundleState::Ready, 15);
        fleet.step_rollouts(16).unwrap();
        fleet.step_rollouts(17).unwrap();
        assert_eq!(fleet.rollout("s-web").unwrap().unwrap().phase, "Completed");

        // rev2 fails on partition one: it rolls back, partition two never sees it.
        fleet.set_snapshot("s", "rev2", vec![web("2")], 20).unwrap();
        assert_eq!(
            has(&fleet, "a1").as_deref(),
            Some(v1.as_str()),
            "held until admitted"
        );
        fleet.step_rollouts(21).unwrap();
        assert_eq!(has(&fleet, "a1").as_deref(), Some(v2.as_str()));
        assert_eq!(has(&fleet, "b1").as_deref(), Some(v1.as_str()));
        report(&fleet, "a1", BundleState::ErrApplied, 22);
        fleet.step_rollouts(23).unwrap();
        let view = fleet.rollout("s-web").unwrap().unwrap();
        assert_eq!(view.phase, "RolledBack", "{view:?}");
        for c in ["a1", "a2", "b1", "b2"] {
            assert_eq!(has(&fleet, c).as_deref(), Some(v1.as_str()), "{c}");
        }
        assert!(fleet.content(&v1).is_some() && fleet.content(&v2).is_some());

        drop(fleet);
        let fleet = open(dir.path());
        assert_eq!(
            fleet.desired("a1").unwrap().bundles[0].1,
            v1,
            "after a restart too"
        );
        assert!(fleet.content(&v1).is_some());
        let outcomes: Vec<(String, String)> = fleet
            .rollout_history("s-web")
            .unwrap()
            .into_iter()
            .map(|h| (h.revision, h.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("rev1".to_string(), "Completed".to_string()),
                ("rev2".to_string(), "RolledBack".to_string())
            ]
        );
    }

    /// Per bundle × cluster metric series are exported only when opted in; the
    /// bundle × state counts always are.
    #[test]
    fn bundle_cluster_series_are_opt_in() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = open(dir.path());
        fleet.apply_source("s", spec()).unwrap();
        enrol(&fleet, "c1");
        enrol(&fleet, "c2");
        fleet
            .set_snapshot("s", "c1", vec![bundle("s-a", Ok(rendered("1")))], 1)
            .unwrap();
        for c in ["c1", "c2"] {
            let (b, hash, revision) = fleet.desired(c).unwrap().bundles.remove(0);
            let state = if c == "c1" {
                BundleState::Ready
            } else {
                BundleState::ErrApplied
            };
            assert!(fleet
                .record_status(StatusRecord {
                    cluster: c.into(),
                    bundle: b,
                    content_hash: hash,
                    revision,
                    state,
                    message: "cm.yaml: refused".into(),
                    observed_at_ms: 1,
                })
                .unwrap());
        }
        let series = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with("flotilla_bundle_deployment_state{"))
                .map(str::to_string)
                .collect()
        };
        let text = fleet.metrics.scrape(&fleet);
        assert!(series(&text).is_empty(), "{text}");
        assert!(
            text.contains(r#"flotilla_bundle_deployments{bundle="s-a",state="Ready"} 1"#),
            "{text}"
        );
        fleet.metrics.set_bundle_cluster_series(true);
        let mut got = series(&fleet.metrics.scrape(&fleet));
        got.sort();
        assert_eq!(
            got,
            [
                r#"flotilla_bundle_deployment_state{bundle="s-a",cluster="c1",state="Ready"} 1"#,
                r#"flotilla_bundle_deployment_state{bundle="s-a",cluster="c2",state="ErrApplied"} 1"#,
            ]
        );
        fleet.metrics.set_bundle_cluster_series(false);
        assert!(series(&fleet.metrics.scrape(&fleet)).is_empty());
    }

    /// The matrix rows are kept while nothing changes, and follow every change a
    /// view shows: an acknowledgement, a report, a label, a new commit.
    #[test]
    fn matrix_rows_follow_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = open(dir.path());
        fleet.apply_source("s", spec()).unwrap();
        enrol(&fleet, "c1");
        fleet
            .set_snapshot("s", "c1", vec![bundle("s-a", Ok(rendered("1")))], 1)
            .unwrap();
        let state = |f: &Fleet| f.matrix_rows()[0].states["s-a"];
        assert_eq!(state(&fleet), BundleState::Pending);
        let kept = fleet.matrix_rows();
        assert!(
            Arc::ptr_eq(&kept, &fleet.matrix_rows()),
            "recomputed unchanged"
        );

        let desired = fleet.desired("c1").unwrap();
        fleet.record_ack("c1", &desired, None).unwrap();
        assert_eq!(state(&fleet), BundleState::WaitApplied);
        let (b, hash, revision) = desired.bundles[0].clone();
        let report = |state| StatusRecord {
            cluster: "c1".into(),
            bundle: b.clone(),
            content_hash: hash.clone(),
            revision: revision.clone(),
            state,
            message: String::new(),
            observed_at_ms: 1,
        };
        fleet.record_status(report(BundleState::Ready)).unwrap();
        assert_eq!(state(&fleet), BundleState::Ready);
        fleet.record_status(report(BundleState::NotReady)).unwrap();
        assert_eq!(state(&fleet), BundleState::NotReady);

        // Only the reporting cluster's row is computed again.
        enrol(&fleet, "c2");
        let before = fleet.matrix_rows();
        fleet.record_status(report(BundleState::Ready)).unwrap();
        let after = fleet.matrix_rows();
        assert_eq!(after[0].states["s-a"], BundleState::Ready);
        assert!(Arc::ptr_eq(&before[1], &after[1]), "c2 recomputed");
        assert!(!Arc::ptr_eq(&before[0], &after[0]));

        // A session opened, then ended.
        let hello = Hello {
            agent_version: "v",
            kubernetes_version: "v1.34.0",
            api_versions: &[],
        };
        let session = fleet.connect("c1", "fp", &hello, 5).unwrap().unwrap();
        assert!(fleet.matrix_rows()[0].connected);
        fleet.disconnect("c1", session, 6).unwrap();
        assert!(!fleet.matrix_rows()[0].connected);
        assert!(fleet.delete_cluster("c2").unwrap());
        assert_eq!(fleet.matrix_rows().len(), 1);

        fleet
            .set_labels("c1", [("env".to_string(), "prod".to_string())].into())
            .unwrap();
        assert_eq!(fleet.matrix_rows()[0].labels["env"], "prod");
        // A new commit: the acknowledged content is no longer the one assigned.
        fleet
            .set_snapshot("s", "c2", vec![bundle("s-a", Ok(rendered("2")))], 2)
            .unwrap();
        assert_eq!(state(&fleet), BundleState::Pending);
    }
}
