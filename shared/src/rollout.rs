//! Staged, health-gated rollouts of one bundle across the clusters it targets.
//!
//! Fleet's `rolloutStrategy` is read unchanged and keeps Fleet's meaning
//! (partitions by name / selector / group, `maxUnavailable`,
//! `maxUnavailablePartitions`, `autoPartitionSize`), with two deliberate
//! differences: a cluster matched by several partitions belongs to the first, and
//! clusters matched by none form a last partition (Fleet never deploys them).
//! Flotilla adds `bakeTime`, `progressDeadline`, `onFailure: halt|rollback`,
//! `maxOffline` and `maxFailures`.
//!
//! Everything here is pure: the hub hands [`step`] the rollout as it stands, what
//! it observes of each targeted cluster, and the time; `step` returns the next
//! rollout and the events it raised. The hub stores the rollout and sends each
//! cluster what [`Rollout::decision`] says.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::objects::Target;
use crate::state::BundleState;
use crate::targeting::{ClusterInfo, GroupInfo};

/// An int or a percentage (`3`, `"25%"`), as Fleet's `intstr` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Limit {
    Count(i64),
    Percent(i64),
}

/// What to do when failures exceed the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnFailure {
    /// Stop: no further cluster gets the revision; those that have it keep it.
    #[default]
    Halt,
    /// Stop, and return every cluster that got the revision to the last revision
    /// that completed a rollout.
    Rollback,
}

/// One entry of `partitions`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PartitionSpec {
    pub name: String,
    pub max_unavailable: Option<Limit>,
    /// `clusterName`, `clusterSelector`, `clusterGroup`, `clusterGroupSelector`:
    /// every field set must hold (as a target).
    pub target: Target,
}

/// A bundle's `rolloutStrategy`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RolloutStrategy {
    pub max_unavailable: Option<Limit>,
    pub max_unavailable_partitions: Option<Limit>,
    pub auto_partition_size: Option<Limit>,
    pub partitions: Vec<PartitionSpec>,
    /// A partition is done when its clusters have been Ready on the revision this long.
    pub bake_time_ms: u64,
    /// A cluster admitted this long ago and not Ready counts as failed (offline: skipped).
    pub progress_deadline_ms: u64,
    pub on_failure: OnFailure,
    /// Offline clusters a partition may skip (of the partition's clusters).
    pub max_offline: Option<Limit>,
    /// Failed clusters tolerated before the rollout stops (of all targeted clusters).
    pub max_failures: Option<Limit>,
}

/// One partition after membership and rounding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub name: String,
    /// Cluster names, in name order.
    pub clusters: Vec<String>,
    pub max_unavailable: usize,
    pub max_offline: usize,
}

/// The partitions of a rollout over a set of clusters, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PartitionPlan {
    pub partitions: Vec<Partition>,
    /// Bundle-wide `maxUnavailable` after rounding (over all targeted clusters).
    pub max_unavailable: usize,
    pub max_unavailable_partitions: usize,
    pub max_failures: usize,
    /// Clusters matched by several explicit partitions, with their names (the
    /// cluster belongs to the first).
    pub matched_several: BTreeMap<String, Vec<String>>,
    /// Clusters matched by no explicit partition (they form the last partition).
    pub unmatched: Vec<String>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Progressing,
    /// By an operator: no new cluster is admitted until resumed.
    Paused,
    /// Failures exceeded the budget (or an operator's rollback had nothing to
    /// return to): no new cluster is admitted.
    Halted,
    /// Every admitted cluster returns to `previous`.
    RolledBack,
    /// Every partition is done: every targeted cluster gets the revision.
    Completed,
    /// A newer revision took over before this one completed.
    Superseded,
}

impl Phase {
    /// The rollout is over: it only remains in the history.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::RolledBack | Phase::Completed | Phase::Superseded
        )
    }
}

/// How an admitted cluster fares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Sent the revision, not yet Ready on it.
    Updating,
    /// Ready on the revision (since `ready_since_ms`).
    Ready,
    /// Apply failed, or connected and not Ready by the deadline.
    Failed,
    /// Offline past the deadline: skipped (within `maxOffline`); it catches up
    /// when it reconnects.
    Skipped,
}

/// One admitted cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterProgress {
    pub admitted_ms: u64,
    pub ready_since_ms: Option<u64>,
    pub outcome: Outcome,
}

/// One rollout of one revision of a bundle; the hub persists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub bundle: String,
    /// The revision (commit) being rolled out.
    pub revision: String,
    /// The last revision that completed a rollout: what a rollback returns to.
    pub previous: Option<String>,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub phase: Phase,
    /// Why it waits, halted or rolled back, for people.
    pub reason: String,
    /// Admitted clusters (those sent the revision).
    pub clusters: BTreeMap<String, ClusterProgress>,
    /// Partitions done, by name, with the time they were.
    pub partitions_done: BTreeMap<String, u64>,
}

/// What the hub observes of one targeted cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub cluster: String,
    /// The agent has a live session (heartbeats): offline is not failed.
    pub connected: bool,
    /// The agent acknowledged the rollout's revision (its variant's content).
    pub on_revision: bool,
    /// Its reported state on the rollout's revision (`None` until it reported on it).
    pub state: Option<BundleState>,
}

/// What a cluster is sent of the bundle while a rollout runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The rollout's revision.
    Revision,
    /// What it holds now (held back, `OutOfSync`); with nothing held, the
    /// previous revision if there is one, else nothing.
    Hold,
    /// The previous revision (a rollback).
    Previous,
}

/// What an event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Started,
    PartitionStarted,
    PartitionDone,
    ClusterFailed,
    ClusterSkipped,
    Paused,
    Resumed,
    Halted,
    RolledBack,
    Completed,
    Superseded,
}

/// A decision of the planner worth telling people (and, later, notifying).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    pub kind: EventKind,
    pub bundle: String,
    pub revision: String,
    pub partition: Option<String>,
    pub cluster: Option<String>,
    pub message: String,
    pub at_ms: u64,
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Pause,
    Resume,
    Rollback,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub rollout: Rollout,
    pub events: Vec<RolloutEvent>,
}

/// A partition's progress, for `rollout status` and the views.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub name: String,
    pub max_unavailable: usize,
    /// `Waiting`, `Rolling`, `Baking`, `Done`.
    pub phase: String,
    /// (cluster, outcome; `None` while not admitted).
    pub clusters: Vec<(String, Option<Outcome>)>,
}

impl Rollout {
    /// A new rollout of `revision`, nothing admitted yet.
    pub fn start(bundle: &str, revision: &str, previous: Option<String>, now_ms: u64) -> Rollout {
        Rollout {
            bundle: bundle.to_string(),
            revision: revision.to_string(),
            previous,
            started_ms: now_ms,
            ended_ms: None,
            phase: Phase::Progressing,
            reason: String::new(),
            clusters: BTreeMap::new(),
            partitions_done: BTreeMap::new(),
        }
    }

    /// What `cluster` is sent of the bundle now.
    pub fn decision(&self, cluster: &str) -> Decision {
        match self.phase {
            Phase::Completed | Phase::Superseded => Decision::Revision,
            Phase::RolledBack => Decision::Previous,
            Phase::Progressing | Phase::Paused | Phase::Halted => {
                if self.clusters.contains_key(cluster) {
                    Decision::Revision
                } else {
                    Decision::Hold
                }
            }
        }
    }
}

/// Fleet's `limit`: the count a `maxUnavailable`-like value allows out of `count`.
pub fn limit(count: usize, value: Option<&Limit>) -> usize {
    let _ = (count, value);
    todo!("planner helper")
}

/// Reads `rolloutStrategy` (Fleet's fields, Flotilla's additions) from a
/// `fleet.yaml`/`flotilla.yaml`; the error names the field and the reason.
pub fn parse_strategy(value: &serde_json::Value) -> Result<RolloutStrategy, String> {
    let _ = value;
    todo!("planner helper")
}

/// The partitions of a rollout over `clusters` (any order; taken in name order).
pub fn partition(
    strategy: &RolloutStrategy,
    clusters: &[ClusterInfo],
    groups: &[GroupInfo],
) -> PartitionPlan {
    let _ = (strategy, clusters, groups);
    todo!("planner helper")
}

/// One step of the rollout machine: admits clusters, marks outcomes, finishes
/// partitions, halts, rolls back or completes. Pure: same inputs (in any order),
/// same answer.
pub fn step(
    strategy: &RolloutStrategy,
    plan: &PartitionPlan,
    observed: &[Observed],
    rollout: &Rollout,
    now_ms: u64,
) -> Step {
    let _ = (strategy, plan, observed, rollout, now_ms);
    todo!("planner helper")
}

/// An operator's command on a rollout; refused (with why) where it makes no sense
/// (resume of a rollout that is not paused or halted, rollback with no previous
/// revision, anything on a finished rollout).
pub fn command(rollout: &Rollout, command: Command, now_ms: u64) -> Result<Step, String> {
    let _ = (rollout, command, now_ms);
    todo!("planner helper")
}

/// A newer revision takes over: the rollout is recorded as superseded.
pub fn supersede(rollout: &Rollout, by_revision: &str, now_ms: u64) -> Step {
    let _ = (rollout, by_revision, now_ms);
    todo!("planner helper")
}

/// Each partition's progress.
pub fn status(plan: &PartitionPlan, rollout: &Rollout) -> Vec<PartitionStatus> {
    let _ = (plan, rollout);
    todo!("planner helper")
}
