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
use flotilla_shared::state::{BundleState, Reported};
use flotilla_shared::targeting::{ClusterInfo, GroupInfo};
use serde::Serialize;
use tokio::sync::watch;

use crate::store::{ClusterRecord, GroupRecord, SourceRecord, StatusRecord, Store, StoreError};

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
}

#[derive(Debug, Clone)]
struct BundleEntry {
    path: String,
    /// Last good content: (hash, commit).
    good: Option<(String, String)>,
    render_error: Option<String>,
    /// Per target customisation, with its own last good content.
    customizations: Vec<CustomizationInfo>,
    depends_on: Vec<Dependency>,
    labels: Labels,
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
    next_session: u64,
    version: u64,
}

/// What `apply` did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

/// Why a fleet operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} not found")]
    NotFound(String),
}

/// The fleet: shared by the gateway, the API and the source pollers.
pub struct Fleet {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    changed: watch::Sender<u64>,
    /// Drift events refused since start: about bundles not assigned to the
    /// reporting cluster.
    drift_refused: std::sync::atomic::AtomicU64,
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

    fn bundles_info(&self) -> Vec<BundleInfo> {
        self.sources
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
            .collect()
    }

    /// The cluster's assignments, those waiting for their dependencies marked.
    fn assignments(&self, cluster: &ClusterRecord) -> Vec<Assignment> {
        let bundles = self.bundles_info();
        let mut out = assign::assignments(&cluster_info(cluster), &self.groups_info(), &bundles);
        flotilla_shared::depends::gate(&mut out, &bundles, |b| self.reported(&cluster.name, b));
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
            .map(|s| Reported {
                content_hash: s.content_hash.clone(),
                revision: s.revision.clone(),
                state: s.state,
                message: s.message.clone(),
            })
    }

    fn cluster_bundles(&self, c: &ClusterRecord) -> Vec<ClusterBundleView> {
        self.assignments(c)
            .iter()
            .map(|a| {
                let reported = self.reported(&c.name, &a.bundle);
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

    fn cluster_view(&self, c: &ClusterState, with_bundles: bool) -> ClusterView {
        let bundles = self.cluster_bundles(&c.record);
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

    fn gc_contents(&mut self) {
        let live: BTreeSet<String> = self
            .sources
            .values()
            .flat_map(|s| s.bundles.values())
            .flat_map(|b| {
                std::iter::once(&b.good)
                    .chain(b.customizations.iter().map(|c| &c.good))
                    .filter_map(|g| g.as_ref().map(|(h, _)| h.clone()))
            })
            .collect();
        self.contents.retain(|h, _| live.contains(h));
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
fn cluster_info(c: &ClusterRecord) -> ClusterInfo {
    let mut labels = c.labels.clone();
    labels.extend(profile(c).labels());
    ClusterInfo {
        name: c.name.clone(),
        labels,
    }
}

/// A source as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    pub name: String,
    pub repo: String,
    pub branch: Option<String>,
    pub tag: Option<String>,
    pub revision: Option<String>,
    pub paths: Vec<String>,
    pub poll_interval: String,
    pub targets: Vec<flotilla_shared::objects::Target>,
    pub commit: Option<String>,
    pub last_fetched: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub bundles: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub name: String,
    pub labels: Labels,
    pub selector: flotilla_shared::selector::LabelSelector,
    pub clusters: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterBundleView {
    pub bundle: String,
    pub state: BundleState,
    pub applied_revision: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundles: Option<Vec<ClusterBundleView>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleClusterView {
    pub cluster: String,
    pub state: BundleState,
    pub applied_revision: Option<String>,
    pub message: String,
    /// Drift events of this bundle on this cluster in the hub's history.
    pub drift_events: usize,
}

#[derive(Debug, Clone, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusters: Option<Vec<BundleClusterView>>,
}

/// What a session sends: the complete set and the contents by hash.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSet {
    /// (bundle, content hash, revision), sorted by bundle.
    pub bundles: Vec<(String, String, String)>,
}

impl Fleet {
    /// Loads the fleet from the store.
    pub fn load(store: Arc<dyn Store>) -> Result<Arc<Fleet>, StoreError> {
        let mut state = State::default();
        for s in store.list_sources()? {
            state.sources.insert(
                s.name.clone(),
                SourceState {
                    spec: s.spec,
                    commit: None,
                    last_fetched_ms: None,
                    last_error: None,
                    consecutive_failures: 0,
                    bundles: BTreeMap::new(),
                },
            );
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
        for s in store.list_statuses()? {
            state
                .statuses
                .insert((s.cluster.clone(), s.bundle.clone()), s);
        }
        for d in store.list_drift()? {
            *state
                .drift_counts
                .entry((d.cluster, d.event.bundle))
                .or_default() += 1;
        }
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Fleet {
            drift_refused: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(state),
            store,
            changed,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// A receiver that changes whenever anything that affects desired sets does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
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
                st.sources.insert(
                    name.to_string(),
                    SourceState {
                        spec,
                        commit: None,
                        last_fetched_ms: None,
                        last_error: None,
                        consecutive_failures: 0,
                        bundles: BTreeMap::new(),
                    },
                );
            }
        }
        st.bump(&self.changed);
        Ok(action)
    }

    pub fn delete_source(&self, name: &str) -> Result<bool, FleetError> {
        let mut st = self.lock();
        if st.sources.remove(name).is_none() {
            return Ok(false);
        }
        self.store.delete_source(name)?;
        st.gc_contents();
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
        st.bump(&self.changed);
        Ok(action)
    }

    /// Records a new snapshot of a source. Bundles that failed to render keep their
    /// last good content; bundles no longer in the tree go away (agents prune).
    /// Returns false if the source no longer exists.
    pub fn set_snapshot(
        &self,
        source: &str,
        commit: &str,
        bundles: Vec<RenderedBundle>,
        now_ms: u64,
    ) -> bool {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(src) = st.sources.get_mut(source) else {
            return false;
        };
        let mut next = BTreeMap::new();
        for b in bundles {
            let previous = src.bundles.get(&b.name);
            let contents = &mut st.contents;
            // A failed render keeps the last good content of the same variant.
            let mut settle =
                |result: Result<Rendered, RenderError>, previous_good: Option<(String, String)>| {
                    match result {
                        Ok(rendered) => {
                            let hash = rendered.content_hash();
                            contents
                                .entry(hash.clone())
                                .or_insert_with(|| Arc::new(rendered));
                            (Some((hash, commit.to_string())), None)
                        }
                        Err(e) => (previous_good, Some(e.to_string())),
                    }
                };
            let (good, render_error) = settle(b.result, previous.and_then(|e| e.good.clone()));
            let customizations = b
                .customizations
                .into_iter()
                .map(|(info, result)| {
                    let previous_good = previous
                        .and_then(|e| e.customizations.iter().find(|c| c.name == info.name))
                        .and_then(|c| c.good.clone());
                    let (good, render_error) = settle(result, previous_good);
                    CustomizationInfo {
                        good,
                        render_error,
                        ..info
                    }
                })
                .collect();
            let entry = BundleEntry {
                path: b.path,
                good,
                render_error,
                customizations,
                depends_on: b.depends_on,
                labels: b.labels,
            };
            next.insert(b.name, entry);
        }
        src.bundles = next;
        src.commit = Some(commit.to_string());
        src.last_fetched_ms = Some(now_ms);
        src.last_error = None;
        src.consecutive_failures = 0;
        st.gc_contents();
        st.bump(&self.changed);
        true
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
    }

    /// Records a failed fetch; the last good snapshot stays.
    pub fn set_source_error(&self, source: &str, error: String) {
        if let Some(s) = self.lock().sources.get_mut(source) {
            s.last_error = Some(error);
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        }
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
        st.clusters.insert(
            record.name.clone(),
            ClusterState {
                record,
                session: None,
            },
        );
        st.bump(&self.changed);
        Ok(true)
    }

    /// Forgets a cluster (used to undo an enrolment that failed after registering).
    pub fn remove_cluster(&self, name: &str) -> Result<(), FleetError> {
        let mut st = self.lock();
        st.clusters.remove(name);
        self.store.delete_cluster(name)?;
        Ok(())
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
        st.bump(&self.changed);
        let c = &st.clusters[name];
        Ok(st.cluster_view(c, true))
    }

    /// Starts a session for a cluster, superseding any previous one. Returns the
    /// session id, or None if the cluster is unknown.
    pub fn connect(
        &self,
        name: &str,
        agent_version: &str,
        kubernetes_version: &str,
        api_versions: &[String],
        now_ms: u64,
    ) -> Result<Option<u64>, FleetError> {
        let mut st = self.lock();
        st.next_session += 1;
        let id = st.next_session;
        let Some(c) = st.clusters.get_mut(name) else {
            return Ok(None);
        };
        c.session = Some(id);
        c.record.agent_version = agent_version.to_string();
        c.record.kubernetes_version = kubernetes_version.to_string();
        c.record.api_versions = profile_api_versions(api_versions);
        c.record.last_seen_ms = Some(now_ms);
        self.store.put_cluster(&c.record)?;
        // Wakes the superseded session so it ends.
        st.bump(&self.changed);
        Ok(Some(id))
    }

    pub fn is_current(&self, name: &str, session: u64) -> bool {
        self.lock()
            .clusters
            .get(name)
            .is_some_and(|c| c.session == Some(session))
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

    /// Ends a session (if it is still the current one) and persists last-seen.
    pub fn disconnect(&self, name: &str, session: u64, now_ms: u64) -> Result<(), FleetError> {
        let mut st = self.lock();
        if let Some(c) = st.clusters.get_mut(name) {
            if c.session == Some(session) {
                c.session = None;
                c.record.last_seen_ms = Some(now_ms);
                self.store.put_cluster(&c.record)?;
            }
        }
        Ok(())
    }

    /// What the cluster must hold now.
    pub fn desired(&self, name: &str) -> Option<DesiredSet> {
        let st = self.lock();
        let c = st.clusters.get(name)?;
        Some(DesiredSet {
            bundles: assign::sendable(&st.assignments(&c.record), |b| st.held(&c.record, b)),
        })
    }

    pub fn content(&self, hash: &str) -> Option<Arc<Rendered>> {
        self.lock().contents.get(hash).cloned()
    }

    /// Records that the agent holds (flushed) exactly this set.
    pub fn record_ack(&self, name: &str, set: &DesiredSet) -> Result<(), FleetError> {
        let mut st = self.lock();
        if let Some(c) = st.clusters.get_mut(name) {
            c.record.acked = set
                .bundles
                .iter()
                .map(|(b, h, _)| (b.clone(), h.clone()))
                .collect();
            self.store.put_cluster(&c.record)?;
        }
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
        let readiness_changed = st.statuses.get(&key).map(ready) != Some(ready(&status));
        st.statuses.insert(key, status);
        // Bundles that depend on this one may now be sent (or held back). Only
        // then: a bump makes every session recompute its desired set.
        let any_depends = || {
            st.sources
                .values()
                .any(|s| s.bundles.values().any(|b| !b.depends_on.is_empty()))
        };
        if readiness_changed && any_depends() {
            st.bump(&self.changed);
        }
        Ok(true)
    }

    /// Whether `bundle` is assigned to `cluster` now: an agent speaks only for
    /// what it was given.
    fn assigned(st: &State, cluster: &str, bundle: &str) -> bool {
        st.clusters
            .get(cluster)
            .is_some_and(|c| st.assignments(&c.record).iter().any(|a| a.bundle == bundle))
    }

    /// Drift events refused so far (bundles not assigned to their cluster).
    pub fn drift_refused(&self) -> u64 {
        self.drift_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a drift event from a cluster's agent (flushed before returning, so
    /// it may be acknowledged). An event about a bundle not assigned to the
    /// cluster is refused, not stored, and counted.
    pub fn record_drift(
        &self,
        cluster: &str,
        event: &DriftEvent,
    ) -> Result<DriftOutcome, FleetError> {
        if !Self::assigned(&self.lock(), cluster, &event.bundle) {
            self.drift_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(DriftOutcome::Refused);
        }
        let added = self.store.add_drift(cluster, event)?;
        self.store.flush()?;
        let mut st = self.lock();
        if added.id.is_some() {
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
        st.clusters
            .values()
            .map(|c| st.cluster_view(c, false))
            .collect()
    }

    pub fn cluster(&self, name: &str) -> Option<ClusterView> {
        let st = self.lock();
        st.clusters.get(name).map(|c| st.cluster_view(c, true))
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
        // Each cluster's assignments, with dependsOn applied (it needs all of them).
        let per_cluster: Vec<(&ClusterState, Vec<Assignment>)> = st
            .clusters
            .values()
            .map(|c| (c, st.assignments(&c.record)))
            .collect();
        for info in st.bundles_info() {
            if only.is_some_and(|n| n != info.name) {
                continue;
            }
            let mut clusters = Vec::new();
            for (c, assigned) in &per_cluster {
                let Some(a) = assigned.iter().find(|a| a.bundle == info.name) else {
                    continue;
                };
                let reported = st.reported(&c.record.name, &info.name);
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
