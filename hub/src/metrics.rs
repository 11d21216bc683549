//! The hub's Prometheus metrics (`--metrics-listen ADDR`, `GET /metrics`), with
//! the prometheus-client crate. Names follow Fleet's and Argo CD's where they
//! have one. Series are bounded by the fleet (bundles × states, clusters,
//! sources); no label carries a commit, and per bundle × cluster series
//! (`flotilla_bundle_deployment_state`) are exported only when the operator opts
//! in (`--metrics-bundle-cluster-series`): at 10,000 clusters × 50 bundles they
//! are half a million series.
//!
//! Two kinds: counters and a histogram the hub updates as things happen
//! (connections, drift, commit-to-Ready), and gauges read from the fleet's
//! views at each scrape (what the fleet is now).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Contents remembered for commit-to-Ready; the oldest half go beyond this.
const SEEN_CAP: usize = 100_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleState {
    pub bundle: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleClusterState {
    pub bundle: String,
    pub cluster: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterInfo {
    pub cluster: String,
    pub agent_version: String,
    pub kubernetes_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Delivery {
    pub notification: String,
    /// `delivered`, `failed` (to be retried) or `dropped` (refused by the sink,
    /// or too old).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutPhase {
    pub bundle: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftKind {
    /// `detected` or `corrected`.
    pub kind: String,
}

/// Every metric the hub exports.
pub struct Metrics {
    registry: Registry,
    /// Serialises scrapes: the gauges are refilled from the views under it.
    scrape: Mutex<()>,
    bundle_deployments: Family<BundleState, Gauge>,
    /// Opt-in: one series per (bundle, cluster) with its state.
    bundle_cluster_series: AtomicBool,
    bundle_deployment_state: Family<BundleClusterState, Gauge>,
    clusters_connected: Gauge,
    clusters_total: Gauge,
    cluster_connected: Family<ClusterLabel, Gauge>,
    cluster_last_seen: Family<ClusterLabel, Gauge>,
    cluster_info: Family<ClusterInfo, Gauge>,
    source_failures: Family<SourceLabel, Gauge>,
    source_errors: Family<SourceLabel, Gauge>,
    source_last_success: Family<SourceLabel, Gauge>,
    pub source_fetch_duration: Family<SourceLabel, Histogram>,
    pub source_fetch_errors: Family<SourceLabel, Counter>,
    pub render_duration: Family<SourceLabel, Histogram>,
    pub render_errors: Family<SourceLabel, Counter>,
    pub agent_connections: Counter,
    pub agent_disconnects: Family<Reason, Counter>,
    pub drift_events: Family<DriftKind, Counter>,
    pub notification_deliveries: Family<Delivery, Counter>,
    pub notification_outbox: Gauge,
    rollout_phase: Family<RolloutPhase, Gauge>,
    commit_to_ready: Histogram,
    /// When the hub first held each content (ms), for commit-to-Ready.
    seen: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 15,
    ))
}

/// The label of a source's series.
pub fn source(name: &str) -> SourceLabel {
    SourceLabel {
        source: name.to_string(),
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flotilla");
        let m = Metrics {
            registry: Registry::default(),
            scrape: Mutex::new(()),
            bundle_deployments: Family::default(),
            bundle_cluster_series: AtomicBool::new(false),
            bundle_deployment_state: Family::default(),
            clusters_connected: Gauge::default(),
            clusters_total: Gauge::default(),
            cluster_connected: Family::default(),
            cluster_last_seen: Family::default(),
            cluster_info: Family::default(),
            source_failures: Family::default(),
            source_errors: Family::default(),
            source_last_success: Family::default(),
            // 10 ms … about 5.5 min, doubling.
            source_fetch_duration: Family::new_with_constructor(duration_histogram),
            source_fetch_errors: Family::default(),
            render_duration: Family::new_with_constructor(duration_histogram),
            render_errors: Family::default(),
            agent_connections: Counter::default(),
            agent_disconnects: Family::default(),
            drift_events: Family::default(),
            notification_deliveries: Family::default(),
            notification_outbox: Gauge::default(),
            rollout_phase: Family::default(),
            // 0.1 s … about 55 min, doubling.
            commit_to_ready: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.1, 2.0, 16),
            ),
            seen: Mutex::default(),
        };
        registry.register(
            "bundle_deployments",
            "Bundle deployments (bundle x cluster) by bundle and state",
            m.bundle_deployments.clone(),
        );
        registry.register(
            "bundle_deployment_state",
            "1 for each bundle x cluster with its state (opt-in: --metrics-bundle-cluster-series)",
            m.bundle_deployment_state.clone(),
        );
        registry.register(
            "clusters_connected",
            "Clusters whose agent has a session now",
            m.clusters_connected.clone(),
        );
        registry.register("clusters", "Enrolled clusters", m.clusters_total.clone());
        registry.register(
            "cluster_connected",
            "1 while the cluster's agent has a session",
            m.cluster_connected.clone(),
        );
        registry.register(
            "cluster_last_seen_timestamp_seconds",
            "When the cluster's agent was last heard from",
            m.cluster_last_seen.clone(),
        );
        registry.register(
            "cluster_info",
            "The cluster's agent and Kubernetes versions (always 1)",
            m.cluster_info.clone(),
        );
        registry.register(
            "source_consecutive_failures",
            "Failed fetches or renders of the source in a row",
            m.source_failures.clone(),
        );
        registry.register(
            "source_error",
            "1 while the source's last fetch or render failed",
            m.source_errors.clone(),
        );
        registry.register(
            "source_last_success_timestamp_seconds",
            "When the source was last fetched (and rendered) without error",
            m.source_last_success.clone(),
        );
        registry.register(
            "source_fetch_duration_seconds",
            "Git fetches of the source, by duration (unchanged commits included)",
            m.source_fetch_duration.clone(),
        );
        registry.register(
            "source_fetch_errors",
            "Git fetches of the source that failed",
            m.source_fetch_errors.clone(),
        );
        registry.register(
            "render_duration_seconds",
            "Renders of a new commit of the source (every bundle), by duration",
            m.render_duration.clone(),
        );
        registry.register(
            "render_errors",
            "Bundles of the source whose render failed, counted at each new commit",
            m.render_errors.clone(),
        );
        registry.register(
            "agent_connections",
            "Agent sessions opened",
            m.agent_connections.clone(),
        );
        registry.register(
            "agent_disconnects",
            "Agent sessions ended, by reason",
            m.agent_disconnects.clone(),
        );
        registry.register(
            "drift_events",
            "Drift events stored, by kind (detected; corrected: the agent re-applied)",
            m.drift_events.clone(),
        );
        registry.register(
            "notification_deliveries",
            "Notification delivery attempts, by notification and result (delivered; failed: retried; dropped)",
            m.notification_deliveries.clone(),
        );
        registry.register(
            "notification_outbox_messages",
            "Notification messages waiting for delivery",
            m.notification_outbox.clone(),
        );
        registry.register(
            "rollout_phase",
            "1 for each bundle's current rollout phase (Progressing, Paused, Halted, RolledBack, Completed, Superseded)",
            m.rollout_phase.clone(),
        );
        registry.register(
            "commit_to_ready_seconds",
            "From the hub holding a new content (its commit rendered) to a cluster reporting it Ready",
            m.commit_to_ready.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Exports (or stops exporting) one series per bundle × cluster.
    pub fn set_bundle_cluster_series(&self, on: bool) {
        self.bundle_cluster_series.store(on, Ordering::Relaxed);
    }

    /// The hub holds a content from now on (a commit was rendered).
    pub fn content_seen(&self, hash: &str, now_ms: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= SEEN_CAP && !seen.contains_key(hash) {
            let mut ages: Vec<u64> = seen.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            seen.retain(|_, t| *t > cut);
        }
        seen.entry(hash.to_string()).or_insert(now_ms);
    }

    /// A cluster reported `hash` Ready for the first time.
    pub fn ready(&self, hash: &str, now_ms: u64) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = seen.get(hash) {
            self.commit_to_ready
                .observe(now_ms.saturating_sub(*t) as f64 / 1000.0);
        }
    }

    /// The exposition text, with the gauges read from `fleet` now.
    pub fn scrape(&self, fleet: &crate::fleet::Fleet) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        // Every cluster's state of every bundle, computed once: the counts, and
        // the opt-in per bundle × cluster series.
        let rows = fleet.matrix_rows();
        let per_cluster = self.bundle_cluster_series.load(Ordering::Relaxed);
        let mut counts: HashMap<(&str, flotilla_shared::state::BundleState), i64> = HashMap::new();
        self.bundle_deployment_state.clear();
        for row in rows.iter() {
            for (bundle, state) in &row.states {
                *counts.entry((bundle.as_str(), *state)).or_default() += 1;
                if per_cluster {
                    self.bundle_deployment_state
                        .get_or_create(&BundleClusterState {
                            bundle: bundle.clone(),
                            cluster: row.cluster.clone(),
                            state: state.as_str().to_string(),
                        })
                        .set(1);
                }
            }
        }
        self.bundle_deployments.clear();
        for ((bundle, state), n) in counts {
            self.bundle_deployments
                .get_or_create(&BundleState {
                    bundle: bundle.to_string(),
                    state: state.as_str().to_string(),
                })
                .set(n);
        }
        self.cluster_connected.clear();
        self.cluster_last_seen.clear();
        self.cluster_info.clear();
        let clusters = fleet.cluster_heads();
        let mut connected = 0;
        for c in &clusters {
            let label = ClusterLabel {
                cluster: c.name.clone(),
            };
            connected += i64::from(c.connected);
            self.cluster_connected
                .get_or_create(&label)
                .set(i64::from(c.connected));
            if let Some(t) = c.last_seen_ms {
                self.cluster_last_seen
                    .get_or_create(&label)
                    .set((t / 1000) as i64);
            }
            self.cluster_info
                .get_or_create(&ClusterInfo {
                    cluster: c.name.clone(),
                    agent_version: c.agent_version.clone(),
                    kubernetes_version: c.kubernetes_version.clone(),
                })
                .set(1);
        }
        self.clusters_connected.set(connected);
        self.clusters_total.set(clusters.len() as i64);
        self.source_failures.clear();
        self.source_errors.clear();
        self.source_last_success.clear();
        for s in fleet.sources() {
            let label = source(&s.name);
            self.source_failures
                .get_or_create(&label)
                .set(i64::from(s.consecutive_failures));
            self.source_errors
                .get_or_create(&label)
                .set(i64::from(s.last_error.is_some()));
            if let Some(t) = s
                .last_fetched
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                self.source_last_success
                    .get_or_create(&label)
                    .set(t.as_secs() as i64);
            }
        }
        self.rollout_phase.clear();
        for (bundle, phase) in fleet.rollout_phases() {
            self.rollout_phase
                .get_or_create(&RolloutPhase { bundle, phase })
                .set(1);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_to_ready_counts_from_the_first_sighting() {
        let m = Metrics::new();
        m.content_seen("h", 1_000);
        m.content_seen("h", 5_000); // a later snapshot with the same content
        m.ready("h", 3_500);
        m.ready("unknown", 9_000); // never seen here (before a restart): not counted
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains("flotilla_commit_to_ready_seconds_count 1"),
            "{out}"
        );
        assert!(
            out.contains("flotilla_commit_to_ready_seconds_sum 2.5"),
            "{out}"
        );
    }

    #[test]
    fn the_memory_of_contents_is_bounded() {
        let m = Metrics::new();
        for i in 0..(SEEN_CAP as u64 + 10) {
            m.content_seen(&i.to_string(), i);
        }
        assert!(m.seen.lock().unwrap().len() <= SEEN_CAP);
    }
}
