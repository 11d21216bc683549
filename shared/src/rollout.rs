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
//!
//! The rules (docs/rollouts.md has them for users):
//! - [`parse_strategy`] refuses unknown fields, negative values, fractions and
//!   percentages over 100 (refused, not clamped), naming the field. Defaults:
//!   `maxUnavailable` 100%, `maxUnavailablePartitions` 0, `autoPartitionSize`
//!   25%, `bakeTime` 0, `progressDeadline` 10m, `onFailure: halt`, `maxOffline`
//!   100% (offline clusters never block unless bounded), `maxFailures` 0.
//! - [`limit`] is Fleet's rounding. [`partition`]: explicit partitions in list
//!   order (one with no selector field matches nothing, as in Fleet; unnamed ones
//!   are `#N`), the first match wins, the unmatched form a last partition
//!   [`UNMATCHED`]; without partitions, one partition [`ALL`] below
//!   [`AUTO_PARTITION_FROM`] clusters, else chunks of `autoPartitionSize`.
//! - [`step`]: only clusters the rollout admitted count against
//!   `maxUnavailable`, and only while *updating* (admitted, not Ready, not failed,
//!   not skipped): tolerated failures (within `maxFailures`) and skipped clusters
//!   hold no slot and do not keep a partition from being done. A cluster Ready
//!   that stops being Ready is updating again (its bake restarts); a failed one
//!   stays failed until an operator resumes a halted rollout.

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

/// A bundle's `rolloutStrategy`, validated. `Default` is what an empty
/// `rolloutStrategy` means (every field at its default; `progressDeadline` 10m).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl Default for RolloutStrategy {
    fn default() -> Self {
        RolloutStrategy {
            max_unavailable: None,
            max_unavailable_partitions: None,
            auto_partition_size: None,
            partitions: Vec::new(),
            bake_time_ms: 0,
            progress_deadline_ms: DEFAULT_PROGRESS_DEADLINE_MS,
            on_failure: OnFailure::Halt,
            max_offline: None,
            max_failures: None,
        }
    }
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
///
/// As Fleet: no clusters allow 1; no value means 100%; a count is taken as is (0
/// stays 0); a percentage is floor(count × p / 100), at least 1 (so `"0%"` is 1).
pub fn limit(count: usize, value: Option<&Limit>) -> usize {
    if count == 0 {
        return 1;
    }
    match value.copied().unwrap_or(Limit::Percent(100)) {
        Limit::Count(n) => usize::try_from(n).unwrap_or(0),
        Limit::Percent(p) if p <= 0 => 1,
        Limit::Percent(p) => {
            let p = usize::try_from(p).unwrap_or(usize::MAX);
            (count.saturating_mul(p) / 100).max(1)
        }
    }
}

/// Fields of `rolloutStrategy`, Fleet's first.
const STRATEGY_FIELDS: [&str; 10] = [
    "maxUnavailable",
    "maxUnavailablePartitions",
    "autoPartitionSize",
    "partitions",
    "maxNew",
    "bakeTime",
    "progressDeadline",
    "onFailure",
    "maxOffline",
    "maxFailures",
];
const PARTITION_FIELDS: [&str; 6] = [
    "name",
    "maxUnavailable",
    "clusterName",
    "clusterSelector",
    "clusterGroup",
    "clusterGroupSelector",
];
/// The name of the last partition, of the clusters no explicit partition matches.
pub const UNMATCHED: &str = "unmatched";
/// The one partition below [`AUTO_PARTITION_FROM`] clusters, or when
/// `autoPartitionSize` is 0 or less (Fleet's name).
pub const ALL: &str = "All";
/// Fleet cuts clusters into `autoPartitionSize` chunks only from this many on.
pub const AUTO_PARTITION_FROM: usize = 200;
/// `progressDeadline` when not given.
pub const DEFAULT_PROGRESS_DEADLINE_MS: u64 = 10 * 60 * 1000;

fn check_fields(
    obj: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
    at: &str,
) -> Result<(), String> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            return Err(format!(
                "{at}unknown field {k:?} (known: {})",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// An int or a percentage string, as Fleet's `intstr`; a string of digits is the
/// int it spells (as Fleet reads it). Negative values, fractions, garbage and
/// percentages over 100 are refused.
fn parse_limit(field: &str, v: &serde_json::Value) -> Result<Option<Limit>, String> {
    use serde_json::Value;
    let bad = |why: &str| format!("{field}: {v} {why}");
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_i64() {
            Some(i) if i < 0 => Err(bad("must not be negative")),
            Some(i) => Ok(Some(Limit::Count(i))),
            None => Err(bad("must be a whole number or a percentage like \"25%\"")),
        },
        Value::String(s) => {
            let t = s.trim();
            let (digits, percent) = match t.strip_suffix('%') {
                Some(d) => (d.trim(), true),
                None => (t, false),
            };
            if digits.starts_with('-') {
                return Err(bad("must not be negative"));
            }
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad(
                    "is not a whole number or a whole percentage (like 3 or \"25%\")",
                ));
            }
            let n: i64 = digits.parse().map_err(|_| bad("is too large"))?;
            if percent {
                if n > 100 {
                    return Err(bad("is over 100%"));
                }
                Ok(Some(Limit::Percent(n)))
            } else {
                Ok(Some(Limit::Count(n)))
            }
        }
        _ => Err(bad("must be a whole number or a percentage like \"25%\"")),
    }
}

fn parse_duration_field(field: &str, v: &serde_json::Value) -> Result<Option<u64>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => crate::objects::parse_duration(s)
            .map(|d| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            .map_err(|e| format!("{field}: {e}")),
        other => Err(format!(
            "{field}: {other} must be a duration like \"90s\" or \"5m\""
        )),
    }
}

fn parse_partition(i: usize, v: &serde_json::Value) -> Result<PartitionSpec, String> {
    let at = format!("partitions[{i}]: ");
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{at}must be a mapping (name, clusterSelector, ...)"))?;
    check_fields(obj, &PARTITION_FIELDS, &at)?;
    let string = |k: &str| -> Result<Option<String>, String> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("{at}{k}: {other} must be a string")),
        }
    };
    let selector = |k: &str| -> Result<Option<crate::selector::LabelSelector>, String> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(s) => {
                let sel: crate::selector::LabelSelector =
                    serde_json::from_value(s.clone()).map_err(|e| format!("{at}{k}: {e}"))?;
                sel.validate().map_err(|e| format!("{at}{k}: {e}"))?;
                Ok(Some(sel))
            }
        }
    };
    let name = string("name")?.unwrap_or_else(|| format!("#{i}"));
    let max_unavailable = match obj.get("maxUnavailable") {
        Some(v) => parse_limit(&format!("{at}maxUnavailable"), v)?,
        None => None,
    };
    Ok(PartitionSpec {
        name,
        max_unavailable,
        target: Target {
            name: None,
            cluster_name: string("clusterName")?,
            cluster_selector: selector("clusterSelector")?,
            cluster_group: string("clusterGroup")?,
            cluster_group_selector: selector("clusterGroupSelector")?,
        },
    })
}

/// Reads `rolloutStrategy` (Fleet's fields, Flotilla's additions) from a
/// `fleet.yaml`/`flotilla.yaml`; the error names the field and the reason.
///
/// An unknown field is an error (a misspelt `maxUnavailable` must not roll out
/// to every cluster at once). Fleet's `maxNew` is accepted and has no effect.
/// `null` is the default strategy.
pub fn parse_strategy(value: &serde_json::Value) -> Result<RolloutStrategy, String> {
    if value.is_null() {
        return Ok(RolloutStrategy::default());
    }
    let obj = value
        .as_object()
        .ok_or_else(|| format!("must be a mapping, not {value}"))?;
    check_fields(obj, &STRATEGY_FIELDS, "")?;
    let null = serde_json::Value::Null;
    let get = |k: &str| obj.get(k).unwrap_or(&null);
    if !matches!(
        get("maxNew"),
        serde_json::Value::Null | serde_json::Value::Number(_)
    ) {
        return Err(format!("maxNew: {} must be a number", get("maxNew")));
    }
    let mut partitions = Vec::new();
    match get("partitions") {
        serde_json::Value::Null => {}
        serde_json::Value::Array(list) => {
            for (i, p) in list.iter().enumerate() {
                let spec = parse_partition(i, p)?;
                if spec.name == UNMATCHED {
                    return Err(format!(
                        "partitions[{i}]: the name {UNMATCHED:?} is reserved for the clusters no partition matches"
                    ));
                }
                if partitions
                    .iter()
                    .any(|q: &PartitionSpec| q.name == spec.name)
                {
                    return Err(format!(
                        "partitions[{i}]: the name {:?} is used twice",
                        spec.name
                    ));
                }
                partitions.push(spec);
            }
        }
        other => return Err(format!("partitions: {other} must be a list")),
    }
    let on_failure = match get("onFailure") {
        serde_json::Value::Null => OnFailure::Halt,
        serde_json::Value::String(s) if s == "halt" => OnFailure::Halt,
        serde_json::Value::String(s) if s == "rollback" => OnFailure::Rollback,
        other => return Err(format!("onFailure: {other} must be halt or rollback")),
    };
    let progress_deadline_ms = parse_duration_field("progressDeadline", get("progressDeadline"))?
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_MS);
    if progress_deadline_ms == 0 {
        return Err("progressDeadline: must be longer than 0s".into());
    }
    Ok(RolloutStrategy {
        max_unavailable: parse_limit("maxUnavailable", get("maxUnavailable"))?,
        max_unavailable_partitions: parse_limit(
            "maxUnavailablePartitions",
            get("maxUnavailablePartitions"),
        )?,
        auto_partition_size: parse_limit("autoPartitionSize", get("autoPartitionSize"))?,
        partitions,
        bake_time_ms: parse_duration_field("bakeTime", get("bakeTime"))?.unwrap_or(0),
        progress_deadline_ms,
        on_failure,
        max_offline: parse_limit("maxOffline", get("maxOffline"))?,
        max_failures: parse_limit("maxFailures", get("maxFailures"))?,
    })
}

/// A partition with no selector field matches no cluster (as in Fleet).
fn partition_matches(spec: &PartitionSpec, cluster: &ClusterInfo, groups: &[GroupInfo]) -> bool {
    let t = &spec.target;
    let any = t.cluster_name.is_some()
        || t.cluster_selector.is_some()
        || t.cluster_group.is_some()
        || t.cluster_group_selector.is_some();
    any && crate::targeting::target_matches(t, cluster, groups)
}

/// The partitions of a rollout over `clusters` (any order; taken in name order).
pub fn partition(
    strategy: &RolloutStrategy,
    clusters: &[ClusterInfo],
    groups: &[GroupInfo],
) -> PartitionPlan {
    let mut sorted: Vec<&ClusterInfo> = clusters.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.labels.cmp(&b.labels)));
    sorted.dedup_by(|a, b| a.name == b.name);
    let total = sorted.len();
    let max_offline = strategy.max_offline.as_ref();
    let make = |name: String, members: Vec<String>, mu: Option<&Limit>| Partition {
        max_unavailable: limit(members.len(), mu.or(strategy.max_unavailable.as_ref())),
        max_offline: limit(members.len(), max_offline),
        name,
        clusters: members,
    };
    let mut plan = PartitionPlan::default();
    if strategy.partitions.is_empty() {
        let names: Vec<String> = sorted.iter().map(|c| c.name.clone()).collect();
        let disabled = matches!(strategy.auto_partition_size, Some(Limit::Count(n)) if n <= 0);
        if disabled || total < AUTO_PARTITION_FROM {
            plan.partitions.push(make(ALL.into(), names, None));
        } else {
            let size = limit(
                total,
                Some(&strategy.auto_partition_size.unwrap_or(Limit::Percent(25))),
            )
            .max(1);
            for (i, chunk) in names.chunks(size).enumerate() {
                let from = i * size;
                let name = format!("Partition {} - {}", from, from + chunk.len());
                plan.partitions.push(make(name, chunk.to_vec(), None));
            }
        }
    } else {
        let mut members: Vec<Vec<String>> = vec![Vec::new(); strategy.partitions.len()];
        for c in &sorted {
            let matching: Vec<usize> = strategy
                .partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| partition_matches(p, c, groups))
                .map(|(i, _)| i)
                .collect();
            match matching.first() {
                None => plan.unmatched.push(c.name.clone()),
                Some(&first) => {
                    members[first].push(c.name.clone());
                    if matching.len() > 1 {
                        plan.matched_several.insert(
                            c.name.clone(),
                            matching
                                .iter()
                                .map(|&i| strategy.partitions[i].name.clone())
                                .collect(),
                        );
                    }
                }
            }
        }
        for (spec, m) in strategy.partitions.iter().zip(members) {
            plan.partitions
                .push(make(spec.name.clone(), m, spec.max_unavailable.as_ref()));
        }
        if !plan.unmatched.is_empty() {
            plan.partitions
                .push(make(UNMATCHED.into(), plan.unmatched.clone(), None));
        }
    }
    plan.max_unavailable = limit(total, strategy.max_unavailable.as_ref());
    plan.max_unavailable_partitions = limit(
        plan.partitions.len(),
        Some(
            &strategy
                .max_unavailable_partitions
                .unwrap_or(Limit::Count(0)),
        ),
    );
    plan.max_failures = match &strategy.max_failures {
        None => 0,
        Some(v) => limit(total, Some(v)),
    };
    plan
}

/// `HH:MM:SS` (UTC) of a time in ms since the epoch, for reasons people read.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// `90s`, `5m`, `1h30m` for a duration in ms.
fn span(ms: u64) -> String {
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, sec) = (s / 3600, (s / 60) % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

fn list(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// What is seen of a cluster no report came for: offline, nothing on the revision.
fn unseen(cluster: &str) -> Observed {
    Observed {
        cluster: cluster.to_string(),
        connected: false,
        on_revision: false,
        state: None,
    }
}

fn is_ready(o: &Observed) -> bool {
    o.on_revision && o.state == Some(BundleState::Ready)
}

/// Why an admitted cluster counts as failed, from what is seen of it now.
fn failure_reason(o: &Observed, deadline_ms: u64) -> String {
    if o.state == Some(BundleState::ErrApplied) {
        "apply failed (ErrApplied)".into()
    } else {
        let state = o
            .state
            .map(|s| s.to_string())
            .unwrap_or_else(|| "no report on the revision".into());
        format!(
            "not Ready within progressDeadline {} ({state})",
            span(deadline_ms)
        )
    }
}

struct Ctx<'a> {
    rollout: &'a Rollout,
    events: Vec<RolloutEvent>,
    now: u64,
}

impl Ctx<'_> {
    fn event(
        &mut self,
        kind: EventKind,
        partition: Option<&str>,
        cluster: Option<&str>,
        message: String,
    ) {
        self.events.push(RolloutEvent {
            kind,
            bundle: self.rollout.bundle.clone(),
            revision: self.rollout.revision.clone(),
            partition: partition.map(str::to_string),
            cluster: cluster.map(str::to_string),
            message,
            at_ms: self.now,
        });
    }
}

/// A partition's clusters in name order (the plan's, sorted if it was not).
fn members(p: &Partition) -> std::borrow::Cow<'_, [String]> {
    if p.clusters.windows(2).all(|w| w[0] <= w[1]) {
        std::borrow::Cow::Borrowed(&p.clusters[..])
    } else {
        let mut v = p.clusters.clone();
        v.sort();
        v.dedup();
        std::borrow::Cow::Owned(v)
    }
}

/// One step of the rollout machine: admits clusters, marks outcomes, finishes
/// partitions, halts, rolls back or completes. Pure: same inputs (in any order),
/// same answer.
///
/// In order: the outcome of every admitted cluster is brought up to date (in
/// every phase that is not final); failures beyond `max_failures` halt or roll
/// back (Progressing and Paused); then, Progressing only, partitions are walked
/// in order: done ones are recorded, the next starts when at most
/// `max_unavailable_partitions` started ones are not done, and clusters are
/// admitted in name order while fewer than the partition's (and the bundle's)
/// `max_unavailable` are updating. When every partition is done the rollout is
/// Completed.
pub fn step(
    strategy: &RolloutStrategy,
    plan: &PartitionPlan,
    observed: &[Observed],
    rollout: &Rollout,
    now_ms: u64,
) -> Step {
    if rollout.phase.is_final() {
        return Step {
            rollout: rollout.clone(),
            events: Vec::new(),
        };
    }
    // One observation per cluster, the same whatever the input order.
    let mut seen: BTreeMap<&str, &Observed> = BTreeMap::new();
    for o in observed {
        seen.entry(o.cluster.as_str())
            .and_modify(|cur| {
                let key = |x: &Observed| (x.connected, x.on_revision, x.state);
                if key(o) < key(cur) {
                    *cur = o;
                }
            })
            .or_insert(o);
    }
    let parts: Vec<(&Partition, std::borrow::Cow<'_, [String]>)> =
        plan.partitions.iter().map(|p| (p, members(p))).collect();
    let mut r = rollout.clone();
    let mut cx = Ctx {
        rollout,
        events: Vec::new(),
        now: now_ms,
    };
    let had_started = !r.clusters.is_empty() || !r.partitions_done.is_empty();
    let deadline = strategy.progress_deadline_ms;
    let mut waiting_offline: Vec<(String, String)> = Vec::new();

    // 1. Outcomes of admitted clusters.
    let mut newly_failed: BTreeMap<String, String> = BTreeMap::new();
    for (p, names) in &parts {
        let mut skipped = names
            .iter()
            .filter(|n| {
                r.clusters
                    .get(*n)
                    .is_some_and(|c| c.outcome == Outcome::Skipped)
            })
            .count();
        for name in names.iter() {
            let Some(cp) = r.clusters.get_mut(name) else {
                continue;
            };
            let unseen_one;
            let o = match seen.get(name.as_str()) {
                Some(o) => *o,
                None => {
                    unseen_one = unseen(name);
                    &unseen_one
                }
            };
            if is_ready(o) {
                if cp.outcome != Outcome::Failed {
                    cp.outcome = Outcome::Ready;
                    cp.ready_since_ms.get_or_insert(now_ms);
                }
                continue;
            }
            cp.ready_since_ms = None;
            match cp.outcome {
                Outcome::Failed | Outcome::Skipped => continue,
                Outcome::Ready => cp.outcome = Outcome::Updating,
                Outcome::Updating => {}
            }
            let past = now_ms >= cp.admitted_ms.saturating_add(deadline);
            if o.state == Some(BundleState::ErrApplied) || (past && o.connected) {
                cp.outcome = Outcome::Failed;
                let why = failure_reason(o, deadline);
                cx.event(
                    EventKind::ClusterFailed,
                    Some(&p.name),
                    Some(name),
                    format!("{name}: {why}"),
                );
                newly_failed.insert(name.clone(), why);
            } else if past {
                if skipped < p.max_offline {
                    skipped += 1;
                    cp.outcome = Outcome::Skipped;
                    cx.event(
                        EventKind::ClusterSkipped,
                        Some(&p.name),
                        Some(name),
                        format!(
                            "{name}: offline past progressDeadline {}; skipped, it catches up when it reconnects",
                            span(deadline)
                        ),
                    );
                } else {
                    waiting_offline.push((
                        name.clone(),
                        format!(
                            "offline past progressDeadline {}; partition {} may skip {} (maxOffline)",
                            span(deadline),
                            p.name,
                            p.max_offline
                        ),
                    ));
                }
            }
        }
    }

    // 2. Failures beyond the budget.
    let in_plan = |n: &str| {
        parts
            .iter()
            .any(|(_, names)| names.binary_search_by(|x| x.as_str().cmp(n)).is_ok())
    };
    let failed: Vec<&str> = r
        .clusters
        .iter()
        .filter(|(n, c)| c.outcome == Outcome::Failed && in_plan(n))
        .map(|(n, _)| n.as_str())
        .collect();
    if failed.len() > plan.max_failures && matches!(r.phase, Phase::Progressing | Phase::Paused) {
        let whys: Vec<String> = failed
            .iter()
            .map(|n| {
                let why = newly_failed
                    .get(*n)
                    .cloned()
                    .unwrap_or_else(|| match seen.get(n) {
                        Some(o) => failure_reason(o, deadline),
                        None => failure_reason(&unseen(n), deadline),
                    });
                format!("{n}: {why}")
            })
            .collect();
        let shown: Vec<&str> = whys.iter().map(String::as_str).collect();
        let what = format!(
            "{} failed (maxFailures {}): {}",
            failed.len(),
            plan.max_failures,
            list(&shown)
        );
        match (&strategy.on_failure, &r.previous) {
            (OnFailure::Rollback, Some(prev)) => {
                r.phase = Phase::RolledBack;
                r.ended_ms = Some(now_ms);
                r.reason = format!("rolled back to {prev}: {what}");
                let msg = r.reason.clone();
                cx.event(EventKind::RolledBack, None, None, msg);
            }
            (OnFailure::Rollback, None) => {
                r.phase = Phase::Halted;
                r.reason = format!(
                    "halted: {what}; nothing to roll back to: no revision completed a rollout"
                );
                let msg = r.reason.clone();
                cx.event(EventKind::Halted, None, None, msg);
            }
            (OnFailure::Halt, _) => {
                r.phase = Phase::Halted;
                r.reason = format!("halted: {what}");
                let msg = r.reason.clone();
                cx.event(EventKind::Halted, None, None, msg);
            }
        }
        return Step {
            rollout: r,
            events: cx.events,
        };
    }

    // 3. Partitions, in order.
    let progressing = r.phase == Phase::Progressing;
    let unavailable = |r: &Rollout, names: &[String]| -> usize {
        names
            .iter()
            .filter(|n| {
                r.clusters
                    .get(*n)
                    .is_some_and(|c| c.outcome == Outcome::Updating)
            })
            .count()
    };
    let mut bundle_unavailable: usize = parts.iter().map(|(_, names)| unavailable(&r, names)).sum();
    let mut in_flight = 0usize;
    let mut reason: Option<String> = None;
    let bake = strategy.bake_time_ms;
    for (p, names) in &parts {
        if r.partitions_done.contains_key(&p.name) {
            continue;
        }
        let started = names.iter().any(|n| r.clusters.contains_key(n));
        if !started && (!progressing || in_flight > plan.max_unavailable_partitions) {
            break;
        }
        if progressing {
            let mut part_unavailable = unavailable(&r, names);
            let mut first = !started;
            for name in names.iter() {
                if part_unavailable >= p.max_unavailable
                    || bundle_unavailable >= plan.max_unavailable
                {
                    break;
                }
                if r.clusters.contains_key(name) {
                    continue;
                }
                if first {
                    first = false;
                    cx.event(
                        EventKind::PartitionStarted,
                        Some(&p.name),
                        None,
                        format!(
                            "partition {}: started ({} clusters, maxUnavailable {})",
                            p.name,
                            names.len(),
                            p.max_unavailable
                        ),
                    );
                }
                let ready = seen.get(name.as_str()).is_some_and(|o| is_ready(o));
                r.clusters.insert(
                    name.clone(),
                    ClusterProgress {
                        admitted_ms: now_ms,
                        ready_since_ms: ready.then_some(now_ms),
                        outcome: if ready {
                            Outcome::Ready
                        } else {
                            Outcome::Updating
                        },
                    },
                );
                if !ready {
                    part_unavailable += 1;
                    bundle_unavailable += 1;
                }
            }
        }
        // Done?
        let mut ready = 0usize;
        let mut baking_until = 0u64;
        let mut done = true;
        let mut updating: Vec<&str> = Vec::new();
        let mut not_admitted = 0usize;
        for name in names.iter() {
            match r.clusters.get(name) {
                None => {
                    done = false;
                    not_admitted += 1;
                }
                Some(c) => match c.outcome {
                    Outcome::Ready => {
                        ready += 1;
                        let until = c.ready_since_ms.unwrap_or(now_ms).saturating_add(bake);
                        if until > now_ms {
                            done = false;
                            baking_until = baking_until.max(until);
                        }
                    }
                    Outcome::Skipped | Outcome::Failed => {}
                    Outcome::Updating => {
                        done = false;
                        updating.push(name);
                    }
                },
            }
        }
        if done {
            r.partitions_done.insert(p.name.clone(), now_ms);
            cx.event(
                EventKind::PartitionDone,
                Some(&p.name),
                None,
                format!(
                    "partition {}: done ({} of {} Ready)",
                    p.name,
                    ready,
                    names.len()
                ),
            );
            continue;
        }
        in_flight += 1;
        if reason.is_none() {
            let of = format!("{ready} of {} Ready", names.len());
            reason = Some(
                if let Some((n, why)) = waiting_offline
                    .iter()
                    .find(|(n, _)| names.binary_search(n).is_ok())
                {
                    format!("partition {}: waiting for {n} ({why}; {of})", p.name)
                } else if !updating.is_empty() {
                    let offline: Vec<&str> = updating
                        .iter()
                        .copied()
                        .filter(|n| !seen.get(n).is_some_and(|o| o.connected))
                        .collect();
                    let mut s = format!("partition {}: waiting for {}", p.name, list(&updating));
                    if !offline.is_empty() {
                        s.push_str(&format!(" (offline: {})", list(&offline)));
                    }
                    s.push_str(&format!(" ({of})"));
                    s
                } else if baking_until > 0 && not_admitted == 0 {
                    format!(
                        "partition {}: baking until {} ({of})",
                        p.name,
                        clock(baking_until)
                    )
                } else if p.max_unavailable == 0 || plan.max_unavailable == 0 {
                    format!(
                        "partition {}: maxUnavailable is 0, no cluster may update",
                        p.name
                    )
                } else {
                    format!("partition {}: {of}", p.name)
                },
            );
        }
    }
    if !had_started && (!r.clusters.is_empty() || !r.partitions_done.is_empty()) {
        // Nothing was admitted before, so no cluster event precedes: Started comes first.
        let msg = format!("rollout of {} started", r.revision);
        cx.event(EventKind::Started, None, None, msg);
        let started = cx.events.pop().expect("just pushed");
        cx.events.insert(0, started);
    }
    let all_done = parts
        .iter()
        .all(|(p, _)| r.partitions_done.contains_key(&p.name));
    if progressing {
        if all_done {
            r.phase = Phase::Completed;
            r.ended_ms = Some(now_ms);
            r.reason = format!(
                "completed: every partition is done ({} clusters)",
                parts.iter().map(|(_, n)| n.len()).sum::<usize>()
            );
            let msg = format!("rollout of {} completed", r.revision);
            cx.event(EventKind::Completed, None, None, msg);
        } else if let Some(why) = reason {
            r.reason = why;
        }
    }
    Step {
        rollout: r,
        events: cx.events,
    }
}

/// An operator's command on a rollout; refused (with why) where it makes no sense
/// (resume of a rollout that is not paused or halted, rollback with no previous
/// revision, anything on a finished rollout).
pub fn command(rollout: &Rollout, command: Command, now_ms: u64) -> Result<Step, String> {
    let what = format!("the rollout of {} ({})", rollout.revision, rollout.bundle);
    if rollout.phase.is_final() {
        return Err(format!(
            "{what} is over ({:?}); nothing to {}",
            rollout.phase,
            match command {
                Command::Pause => "pause",
                Command::Resume => "resume",
                Command::Rollback => "roll back",
            }
        ));
    }
    let mut r = rollout.clone();
    let mut cx = Ctx {
        rollout,
        events: Vec::new(),
        now: now_ms,
    };
    match (command, rollout.phase) {
        (Command::Pause, Phase::Progressing) => {
            r.phase = Phase::Paused;
            r.reason = "paused by operator".into();
            cx.event(
                EventKind::Paused,
                None,
                None,
                format!("{what} paused by operator"),
            );
        }
        (Command::Pause, Phase::Paused) => return Err(format!("{what} is already paused")),
        (Command::Pause, _) => {
            return Err(format!(
                "{what} is halted ({}); resume or roll back instead",
                rollout.reason
            ))
        }
        (Command::Resume, Phase::Paused) => {
            r.phase = Phase::Progressing;
            r.reason = "resumed by operator".into();
            cx.event(
                EventKind::Resumed,
                None,
                None,
                format!("{what} resumed by operator"),
            );
        }
        (Command::Resume, Phase::Halted) => {
            let mut again = Vec::new();
            for (name, c) in r.clusters.iter_mut() {
                if c.outcome == Outcome::Failed {
                    c.outcome = Outcome::Updating;
                    c.admitted_ms = now_ms;
                    c.ready_since_ms = None;
                    again.push(name.as_str());
                }
            }
            let mut msg = format!("{what} resumed by operator");
            if !again.is_empty() {
                msg.push_str(&format!("; failed clusters start again: {}", list(&again)));
            }
            r.phase = Phase::Progressing;
            r.reason = "resumed by operator".into();
            cx.event(EventKind::Resumed, None, None, msg);
        }
        (Command::Resume, _) => {
            return Err(format!("{what} is not paused or halted; nothing to resume"))
        }
        (Command::Rollback, _) => match &rollout.previous {
            None => {
                return Err(format!(
                    "{what}: nothing to roll back to: no revision completed a rollout"
                ))
            }
            Some(prev) => {
                r.phase = Phase::RolledBack;
                r.ended_ms = Some(now_ms);
                r.reason = format!("rolled back to {prev} by operator");
                cx.event(
                    EventKind::RolledBack,
                    None,
                    None,
                    format!("{what} rolled back to {prev} by operator"),
                );
            }
        },
    }
    Ok(Step {
        rollout: r,
        events: cx.events,
    })
}

/// A newer revision takes over: the rollout is recorded as superseded. A
/// finished rollout stays as it is (no event).
pub fn supersede(rollout: &Rollout, by_revision: &str, now_ms: u64) -> Step {
    if rollout.phase.is_final() {
        return Step {
            rollout: rollout.clone(),
            events: Vec::new(),
        };
    }
    let mut r = rollout.clone();
    r.phase = Phase::Superseded;
    r.ended_ms = Some(now_ms);
    r.reason = format!("superseded by {by_revision}");
    let mut cx = Ctx {
        rollout,
        events: Vec::new(),
        now: now_ms,
    };
    cx.event(
        EventKind::Superseded,
        None,
        None,
        format!(
            "rollout of {} superseded by {by_revision}; it starts from the first partition",
            rollout.revision
        ),
    );
    Step {
        rollout: r,
        events: cx.events,
    }
}

/// Each partition's progress: `Done` once recorded done, `Waiting` before any
/// of its clusters is admitted, `Baking` when every cluster is admitted and
/// none is still updating, else `Rolling`.
pub fn status(plan: &PartitionPlan, rollout: &Rollout) -> Vec<PartitionStatus> {
    plan.partitions
        .iter()
        .map(|p| {
            let names = members(p);
            let clusters: Vec<(String, Option<Outcome>)> = names
                .iter()
                .map(|n| (n.clone(), rollout.clusters.get(n).map(|c| c.outcome)))
                .collect();
            let phase = if rollout.partitions_done.contains_key(&p.name) {
                "Done"
            } else if clusters.iter().all(|(_, o)| o.is_none()) {
                "Waiting"
            } else if clusters
                .iter()
                .all(|(_, o)| o.is_some() && *o != Some(Outcome::Updating))
            {
                "Baking"
            } else {
                "Rolling"
            };
            PartitionStatus {
                name: p.name.clone(),
                max_unavailable: p.max_unavailable,
                phase: phase.into(),
                clusters,
            }
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FleetDoc {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<crate::objects::Metadata>,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    status: serde_json::Value,
}

/// Reads a file of `Cluster` (name and labels) and `ClusterGroup` documents
/// (apiVersion `flotilla.io/v1alpha1`), as `flotilla rollout plan --clusters`
/// takes them. A `Cluster`'s `spec` and `status` are ignored. Errors name the
/// file, the document (1-based) and the reason.
pub fn parse_fleet_file(
    file: &str,
    text: &str,
) -> Result<(Vec<ClusterInfo>, Vec<GroupInfo>), crate::Error> {
    use crate::objects::{validate_name, ClusterGroupSpec, API_VERSION};
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| crate::Error::Object {
            file: file.to_string(),
            document: 0,
            reason: format!("invalid YAML: {e}"),
        })?;
    let (mut clusters, mut groups) = (Vec::<ClusterInfo>::new(), Vec::<GroupInfo>::new());
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let err = |reason: String| crate::Error::Object {
            file: file.to_string(),
            document: i + 1,
            reason,
        };
        let d: FleetDoc = serde_json::from_value(doc).map_err(|e| err(e.to_string()))?;
        match d.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(err(format!(
                    "apiVersion must be {API_VERSION}, not {other:?}"
                )))
            }
            None => return Err(err(format!("apiVersion must be {API_VERSION}"))),
        }
        let meta = d
            .metadata
            .ok_or_else(|| err("metadata.name is required".into()))?;
        validate_name(&meta.name).map_err(|e| err(e.to_string()))?;
        for (k, v) in &meta.labels {
            crate::labels::validate_key(k)
                .and_then(|_| crate::labels::validate_value(v))
                .map_err(|e| err(format!("metadata.labels: {e}")))?;
        }
        match d.kind.as_deref() {
            Some("Cluster") => {
                if clusters.iter().any(|c| c.name == meta.name) {
                    return Err(err(format!("Cluster {} is given twice", meta.name)));
                }
                clusters.push(ClusterInfo {
                    name: meta.name,
                    labels: meta.labels,
                });
            }
            Some("ClusterGroup") => {
                if !d.status.is_null() {
                    return Err(err(format!(
                        "ClusterGroup {}: unknown field `status`",
                        meta.name
                    )));
                }
                let spec = if d.spec.is_null() {
                    serde_json::json!({})
                } else {
                    d.spec
                };
                let spec: ClusterGroupSpec = serde_json::from_value(spec)
                    .map_err(|e| err(format!("ClusterGroup {}: spec: {e}", meta.name)))?;
                spec.selector
                    .validate()
                    .map_err(|e| err(format!("ClusterGroup {}: {e}", meta.name)))?;
                if groups.iter().any(|g| g.name == meta.name) {
                    return Err(err(format!("ClusterGroup {} is given twice", meta.name)));
                }
                groups.push(GroupInfo {
                    name: meta.name,
                    selector: spec.selector,
                    labels: meta.labels,
                });
            }
            Some(other) => {
                return Err(err(format!(
                    "kind must be Cluster or ClusterGroup, not {other:?}"
                )))
            }
            None => return Err(err("kind must be Cluster or ClusterGroup".into())),
        }
    }
    Ok((clusters, groups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::parse_labels;
    use crate::selector::LabelSelector;
    use serde_json::json;

    const S: u64 = 1000;
    const MIN: u64 = 60 * S;

    fn strat(v: serde_json::Value) -> RolloutStrategy {
        parse_strategy(&v).unwrap()
    }

    fn cluster(name: &str, labels: &str) -> ClusterInfo {
        ClusterInfo {
            name: name.into(),
            labels: parse_labels(labels).unwrap(),
        }
    }

    fn named(names: &[&str]) -> Vec<ClusterInfo> {
        names.iter().map(|n| cluster(n, "")).collect()
    }

    fn many(n: usize) -> Vec<ClusterInfo> {
        (0..n).map(|i| cluster(&format!("c{i:05}"), "")).collect()
    }

    fn seen(
        name: &str,
        connected: bool,
        on_revision: bool,
        state: Option<BundleState>,
    ) -> Observed {
        Observed {
            cluster: name.into(),
            connected,
            on_revision,
            state,
        }
    }

    fn ready(name: &str) -> Observed {
        seen(name, true, true, Some(BundleState::Ready))
    }

    fn busy(name: &str) -> Observed {
        seen(name, true, true, Some(BundleState::NotReady))
    }

    fn offline(name: &str) -> Observed {
        seen(name, false, false, None)
    }

    fn admitted(r: &Rollout) -> Vec<&str> {
        r.clusters.keys().map(String::as_str).collect()
    }

    fn kinds(s: &Step) -> Vec<EventKind> {
        s.events.iter().map(|e| e.kind).collect()
    }

    fn part_names(plan: &PartitionPlan) -> Vec<(&str, Vec<&str>)> {
        plan.partitions
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.clusters.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn limit_rounds_as_fleet() {
        use Limit::{Count, Percent};
        // (count, value, Fleet's answer): int(count × p) / 100, at least 1;
        // ints as is; no clusters → 1; no value → 100%.
        let table: &[(usize, Option<Limit>, usize)] = &[
            (0, None, 1),
            (0, Some(Count(0)), 1),
            (0, Some(Percent(50)), 1),
            (7, None, 7),
            (1, None, 1),
            (10, Some(Percent(25)), 2),
            (3, Some(Percent(50)), 1),
            (4, Some(Percent(50)), 2),
            (1, Some(Percent(10)), 1),
            (9, Some(Percent(10)), 1),
            (10, Some(Percent(10)), 1),
            (19, Some(Percent(10)), 1),
            (20, Some(Percent(10)), 2),
            (199, Some(Percent(33)), 65),
            (200, Some(Percent(25)), 50),
            (1000, Some(Percent(25)), 250),
            (1001, Some(Percent(25)), 250),
            (5, Some(Percent(0)), 1),
            (5, Some(Percent(100)), 5),
            (5, Some(Count(0)), 0),
            (5, Some(Count(2)), 2),
            (5, Some(Count(10)), 10),
        ];
        for (count, value, want) in table {
            assert_eq!(
                limit(*count, value.as_ref()),
                *want,
                "limit({count}, {value:?})"
            );
        }
    }

    #[test]
    fn parses_fleets_fields_and_flotillas() {
        let s = strat(json!({
            "maxUnavailable": "10%",
            "maxUnavailablePartitions": 1,
            "autoPartitionSize": "5",
            "maxNew": 50,
            "partitions": [
                {"name": "canary", "maxUnavailable": 1, "clusterSelector": {"matchLabels": {"env": "canary"}}},
                {"clusterGroup": "edge", "clusterGroupSelector": {"matchLabels": {"k": "v"}}, "clusterName": ""},
            ],
            "bakeTime": "90s",
            "progressDeadline": "5m",
            "onFailure": "rollback",
            "maxOffline": "20%",
            "maxFailures": 2,
        }));
        assert_eq!(s.max_unavailable, Some(Limit::Percent(10)));
        assert_eq!(s.max_unavailable_partitions, Some(Limit::Count(1)));
        assert_eq!(s.auto_partition_size, Some(Limit::Count(5)));
        assert_eq!(s.bake_time_ms, 90 * S);
        assert_eq!(s.progress_deadline_ms, 5 * MIN);
        assert_eq!(s.on_failure, OnFailure::Rollback);
        assert_eq!(s.max_offline, Some(Limit::Percent(20)));
        assert_eq!(s.max_failures, Some(Limit::Count(2)));
        assert_eq!(s.partitions.len(), 2);
        assert_eq!(s.partitions[0].name, "canary");
        assert_eq!(s.partitions[0].max_unavailable, Some(Limit::Count(1)));
        assert_eq!(
            s.partitions[0].target.cluster_selector,
            Some(LabelSelector::parse("env=canary").unwrap())
        );
        // an unnamed partition is named by its index; an empty string is unset
        assert_eq!(s.partitions[1].name, "#1");
        assert_eq!(
            s.partitions[1].target.cluster_group.as_deref(),
            Some("edge")
        );
        assert_eq!(s.partitions[1].target.cluster_name, None);
    }

    #[test]
    fn defaults() {
        for v in [json!(null), json!({})] {
            let s = strat(v);
            assert_eq!(s, RolloutStrategy::default());
            assert_eq!(s.progress_deadline_ms, 10 * MIN);
            assert_eq!(s.bake_time_ms, 0);
            assert_eq!(s.on_failure, OnFailure::Halt);
        }
        let plan = partition(&RolloutStrategy::default(), &many(10), &[]);
        assert_eq!(plan.partitions.len(), 1);
        assert_eq!(plan.partitions[0].name, "All");
        assert_eq!(
            plan.partitions[0].max_unavailable, 10,
            "maxUnavailable 100%"
        );
        assert_eq!(plan.partitions[0].max_offline, 10, "maxOffline 100%");
        assert_eq!(plan.max_unavailable, 10);
        assert_eq!(plan.max_unavailable_partitions, 0);
        assert_eq!(plan.max_failures, 0);
    }

    #[test]
    fn refuses_what_would_roll_out_wrongly() {
        let cases = [
            (
                json!({"maxUnavailabe": 1}),
                "unknown field \"maxUnavailabe\"",
            ),
            (
                json!({"maxUnavailable": "abc"}),
                "maxUnavailable: \"abc\" is not a whole number",
            ),
            (
                json!({"maxUnavailable": "-5%"}),
                "maxUnavailable: \"-5%\" must not be negative",
            ),
            (
                json!({"maxUnavailable": -1}),
                "maxUnavailable: -1 must not be negative",
            ),
            (
                json!({"maxUnavailable": "150%"}),
                "maxUnavailable: \"150%\" is over 100%",
            ),
            (
                json!({"maxUnavailable": "12.5%"}),
                "maxUnavailable: \"12.5%\" is not a whole",
            ),
            (
                json!({"maxUnavailable": 2.5}),
                "maxUnavailable: 2.5 must be a whole number",
            ),
            (
                json!({"maxUnavailable": true}),
                "maxUnavailable: true must be",
            ),
            (
                json!({"maxUnavailable": "%"}),
                "maxUnavailable: \"%\" is not",
            ),
            (json!({"maxFailures": "x"}), "maxFailures: \"x\""),
            (
                json!({"maxOffline": "101%"}),
                "maxOffline: \"101%\" is over 100%",
            ),
            (
                json!({"autoPartitionSize": "a%"}),
                "autoPartitionSize: \"a%\"",
            ),
            (
                json!({"maxUnavailablePartitions": "-1"}),
                "maxUnavailablePartitions: \"-1\" must not",
            ),
            (
                json!({"onFailure": "stop"}),
                "onFailure: \"stop\" must be halt or rollback",
            ),
            (
                json!({"bakeTime": "5 minutes"}),
                "bakeTime: invalid duration",
            ),
            (json!({"bakeTime": 300}), "bakeTime: 300 must be a duration"),
            (
                json!({"progressDeadline": "0s"}),
                "progressDeadline: must be longer than 0s",
            ),
            (json!({"maxNew": "x"}), "maxNew: \"x\" must be a number"),
            (
                json!({"partitions": {"name": "a"}}),
                "partitions: {\"name\":\"a\"} must be a list",
            ),
            (
                json!({"partitions": ["a"]}),
                "partitions[0]: must be a mapping",
            ),
            (
                json!({"partitions": [{"name": "a", "clusterSelecter": {}}]}),
                "partitions[0]: unknown field \"clusterSelecter\"",
            ),
            (
                json!({"partitions": [{"name": "a"}, {"name": "a"}]}),
                "partitions[1]: the name \"a\" is used twice",
            ),
            (
                json!({"partitions": [{"name": "unmatched"}]}),
                "partitions[0]: the name \"unmatched\" is reserved",
            ),
            (
                json!({"partitions": [{"name": "a", "maxUnavailable": "x"}]}),
                "partitions[0]: maxUnavailable: \"x\"",
            ),
            (
                json!({"partitions": [{"name": "a", "clusterName": 3}]}),
                "partitions[0]: clusterName: 3 must be a string",
            ),
            (
                json!({"partitions": [{"name": "a", "clusterSelector": {"matchLabels": {"bad key!": "v"}}}]}),
                "partitions[0]: clusterSelector: invalid label selector",
            ),
            (
                json!({"partitions": [{"name": "a", "clusterSelector": {"matchLabel": {}}}]}),
                "partitions[0]: clusterSelector: unknown field",
            ),
            (json!("all"), "must be a mapping"),
        ];
        for (v, want) in cases {
            let e = parse_strategy(&v).unwrap_err();
            assert!(e.contains(want), "{v}: {e:?} should contain {want:?}");
        }
    }

    #[test]
    fn explicit_partitions_first_match_wins_and_none_go_last() {
        let s = strat(json!({"partitions": [
            {"name": "canary", "clusterSelector": {"matchLabels": {"canary": "true"}}},
            {"name": "eu", "clusterSelector": {"matchLabels": {"region": "eu"}}, "maxUnavailable": "50%"},
            {"name": "edge", "clusterGroup": "edge"},
            {"name": "nothing"},
        ]}));
        let groups = vec![GroupInfo {
            name: "edge".into(),
            selector: LabelSelector::parse("tier=edge").unwrap(),
            labels: Default::default(),
        }];
        let cs = vec![
            cluster("us-2", "region=us"),
            cluster("eu-1", "region=eu,canary=true"),
            cluster("eu-2", "region=eu"),
            cluster("eu-3", "region=eu,tier=edge"),
            cluster("us-1", "region=us"),
            cluster("edge-1", "tier=edge"),
        ];
        let plan = partition(&s, &cs, &groups);
        assert_eq!(
            part_names(&plan),
            [
                ("canary", vec!["eu-1"]),
                ("eu", vec!["eu-2", "eu-3"]),
                ("edge", vec!["edge-1"]),
                ("nothing", vec![]),
                ("unmatched", vec!["us-1", "us-2"]),
            ]
        );
        assert_eq!(
            plan.matched_several,
            BTreeMap::from([
                (
                    "eu-1".to_string(),
                    vec!["canary".to_string(), "eu".to_string()]
                ),
                (
                    "eu-3".to_string(),
                    vec!["eu".to_string(), "edge".to_string()]
                ),
            ])
        );
        assert_eq!(plan.unmatched, ["us-1", "us-2"]);
        // the partition's own maxUnavailable wins; the others take the strategy's
        assert_eq!(plan.partitions[1].max_unavailable, 1, "50% of 2");
        assert_eq!(plan.partitions[4].max_unavailable, 2, "100% of 2");
        assert_eq!(plan.max_unavailable, 6);
        // every cluster is in exactly one partition
        let mut all: Vec<&String> = plan.partitions.iter().flat_map(|p| &p.clusters).collect();
        all.sort();
        assert_eq!(all.len(), cs.len());
        all.dedup();
        assert_eq!(all.len(), cs.len());
        // no unmatched partition when every cluster matched
        let plan = partition(&s, &cs[1..4], &groups);
        assert!(plan.unmatched.is_empty());
        assert_eq!(plan.partitions.last().unwrap().name, "nothing");
    }

    #[test]
    fn a_partition_without_selector_matches_nothing() {
        let s = strat(json!({"partitions": [{"name": "empty", "maxUnavailable": 1}]}));
        let plan = partition(&s, &named(&["a", "b"]), &[]);
        assert_eq!(
            part_names(&plan),
            [("empty", vec![]), ("unmatched", vec!["a", "b"])]
        );
        // an empty selector, by contrast, matches everything (as Kubernetes)
        let s = strat(json!({"partitions": [{"name": "all", "clusterSelector": {}}]}));
        let plan = partition(&s, &named(&["a", "b"]), &[]);
        assert_eq!(part_names(&plan), [("all", vec!["a", "b"])]);
    }

    #[test]
    fn auto_partitions_from_200_clusters() {
        let sizes = |s: &RolloutStrategy, n: usize| -> Vec<usize> {
            partition(s, &many(n), &[])
                .partitions
                .iter()
                .map(|p| p.clusters.len())
                .collect()
        };
        let d = RolloutStrategy::default();
        assert_eq!(sizes(&d, 0), [0]);
        assert_eq!(sizes(&d, 199), [199]);
        assert_eq!(sizes(&d, 200), [50, 50, 50, 50]);
        assert_eq!(sizes(&d, 1000), [250, 250, 250, 250]);
        assert_eq!(sizes(&d, 1001), [250, 250, 250, 250, 1]);
        let plan = partition(&d, &many(1000), &[]);
        assert_eq!(plan.partitions[0].name, "Partition 0 - 250");
        assert_eq!(plan.partitions[3].name, "Partition 750 - 1000");
        assert_eq!(
            plan.partitions[1].clusters[0], "c00250",
            "consecutive, in name order"
        );
        assert_eq!(sizes(&strat(json!({"autoPartitionSize": 0})), 1000), [1000]);
        assert_eq!(
            sizes(&strat(json!({"autoPartitionSize": -0})), 1000),
            [1000]
        );
        assert_eq!(
            sizes(&strat(json!({"autoPartitionSize": 300})), 1000),
            [300, 300, 300, 100]
        );
        assert_eq!(
            sizes(&strat(json!({"autoPartitionSize": "10%"})), 1000),
            [100; 10]
        );
        // "0%" is 1 (a percentage is at least 1)
        assert_eq!(
            sizes(&strat(json!({"autoPartitionSize": "0%"})), 200).len(),
            200
        );
    }

    #[test]
    fn plan_wide_limits() {
        let s = strat(
            json!({"maxUnavailable": "10%", "maxUnavailablePartitions": "50%",
            "autoPartitionSize": "25%", "maxFailures": "1%", "maxOffline": 3}),
        );
        let plan = partition(&s, &many(1000), &[]);
        assert_eq!(plan.max_unavailable, 100);
        assert_eq!(plan.max_unavailable_partitions, 2, "50% of 4 partitions");
        assert_eq!(plan.max_failures, 10);
        assert!(plan
            .partitions
            .iter()
            .all(|p| p.max_unavailable == 25 && p.max_offline == 3));
        let plan = partition(&strat(json!({"maxFailures": 0})), &many(10), &[]);
        assert_eq!(plan.max_failures, 0);
        let plan = partition(&strat(json!({"maxFailures": "0%"})), &many(10), &[]);
        assert_eq!(plan.max_failures, 1, "a percentage is at least 1");
    }

    #[test]
    fn partition_ignores_input_order_and_duplicates() {
        let s = strat(
            json!({"partitions": [{"name": "a", "clusterSelector": {"matchLabels": {"x": "1"}}}]}),
        );
        let cs = vec![cluster("b", "x=1"), cluster("a", ""), cluster("c", "x=1")];
        let mut rev = cs.clone();
        rev.reverse();
        rev.push(cluster("c", "x=1"));
        assert_eq!(partition(&s, &cs, &[]), partition(&s, &rev, &[]));
    }

    /// One partition "All" of `names`, with the strategy's limits.
    fn plan_of(s: &RolloutStrategy, names: &[&str]) -> PartitionPlan {
        partition(s, &named(names), &[])
    }

    #[test]
    fn admits_in_name_order_within_max_unavailable() {
        let s = strat(json!({"maxUnavailable": 2}));
        let plan = plan_of(&s, &["d", "b", "a", "c"]);
        let r = Rollout::start("web", "c2", Some("c1".into()), 0);
        let obs: Vec<Observed> = ["a", "b", "c", "d"].iter().map(|n| offline(n)).collect();
        let st = step(&s, &plan, &obs, &r, 0);
        assert_eq!(admitted(&st.rollout), ["a", "b"]);
        assert_eq!(
            kinds(&st),
            [EventKind::Started, EventKind::PartitionStarted]
        );
        assert_eq!(st.rollout.decision("a"), Decision::Revision);
        assert_eq!(st.rollout.decision("c"), Decision::Hold);
        assert!(
            st.rollout.reason.contains("waiting for a, b"),
            "{}",
            st.rollout.reason
        );
        // nothing changed: nothing new, no events
        let again = step(&s, &plan, &obs, &st.rollout, S);
        assert_eq!(again.rollout.clusters, st.rollout.clusters);
        assert!(again.events.is_empty());
        // a becomes Ready: c takes its slot
        let obs2 = vec![ready("a"), busy("b"), offline("c"), offline("d")];
        let st2 = step(&s, &plan, &obs2, &again.rollout, 2 * S);
        assert_eq!(admitted(&st2.rollout), ["a", "b", "c"]);
        assert_eq!(st2.rollout.clusters["a"].outcome, Outcome::Ready);
        assert_eq!(st2.rollout.clusters["a"].ready_since_ms, Some(2 * S));
        assert_eq!(st2.rollout.clusters["c"].admitted_ms, 2 * S);
    }

    #[test]
    fn an_unchanged_cluster_is_admitted_ready_and_holds_no_slot() {
        let s = strat(json!({"maxUnavailable": 1}));
        let plan = plan_of(&s, &["a", "b", "c"]);
        let r = Rollout::start("web", "c2", None, 0);
        let st = step(&s, &plan, &[ready("a"), ready("b"), ready("c")], &r, 0);
        assert_eq!(st.rollout.phase, Phase::Completed);
        assert_eq!(st.rollout.ended_ms, Some(0));
        assert_eq!(
            kinds(&st),
            [
                EventKind::Started,
                EventKind::PartitionStarted,
                EventKind::PartitionDone,
                EventKind::Completed
            ]
        );
        // a final rollout does not move
        let after = step(&s, &plan, &[], &st.rollout, 5 * S);
        assert_eq!(after.rollout, st.rollout);
        assert!(after.events.is_empty());
    }

    #[test]
    fn nothing_targeted_completes() {
        let s = RolloutStrategy::default();
        let plan = plan_of(&s, &[]);
        let st = step(&s, &plan, &[], &Rollout::start("web", "c2", None, 0), 7);
        assert_eq!(st.rollout.phase, Phase::Completed);
    }

    fn two_partitions(extra: serde_json::Value) -> (RolloutStrategy, PartitionPlan) {
        let mut v = json!({"partitions": [
            {"name": "canary", "clusterSelector": {"matchLabels": {"p": "1"}}},
            {"name": "rest", "clusterSelector": {"matchLabels": {"p": "2"}}},
        ]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let s = strat(v);
        let cs = vec![
            cluster("a1", "p=1"),
            cluster("a2", "p=1"),
            cluster("b1", "p=2"),
            cluster("b2", "p=2"),
        ];
        let plan = partition(&s, &cs, &[]);
        (s, plan)
    }

    #[test]
    fn partitions_go_one_after_another_and_bake() {
        let (s, plan) = two_partitions(json!({"bakeTime": "60s"}));
        let r = Rollout::start("web", "c2", Some("c1".into()), 0);
        let all_busy = vec![busy("a1"), busy("a2"), offline("b1"), offline("b2")];
        let st = step(&s, &plan, &all_busy, &r, 0);
        assert_eq!(admitted(&st.rollout), ["a1", "a2"], "rest waits for canary");
        let canary_ready = vec![ready("a1"), ready("a2"), offline("b1"), offline("b2")];
        let st = step(&s, &plan, &canary_ready, &st.rollout, 10 * S);
        assert_eq!(admitted(&st.rollout), ["a1", "a2"]);
        assert_eq!(
            st.rollout.reason,
            "partition canary: baking until 00:01:10 (2 of 2 Ready)"
        );
        assert_eq!(status(&plan, &st.rollout)[0].phase, "Baking");
        assert_eq!(status(&plan, &st.rollout)[1].phase, "Waiting");
        // one ms before the bake time is up: not done
        let st = step(&s, &plan, &canary_ready, &st.rollout, 70 * S - 1);
        assert!(st.rollout.partitions_done.is_empty());
        assert_eq!(admitted(&st.rollout), ["a1", "a2"]);
        assert!(st.events.is_empty());
        // at the bake time: done, and the next partition starts
        let st = step(&s, &plan, &canary_ready, &st.rollout, 70 * S);
        assert_eq!(st.rollout.partitions_done.get("canary"), Some(&(70 * S)));
        assert_eq!(admitted(&st.rollout), ["a1", "a2", "b1", "b2"]);
        assert_eq!(
            kinds(&st),
            [EventKind::PartitionDone, EventKind::PartitionStarted]
        );
        assert_eq!(st.events[0].partition.as_deref(), Some("canary"));
        assert_eq!(st.events[0].bundle, "web");
        assert_eq!(st.events[0].revision, "c2");
        assert_eq!(st.events[0].at_ms, 70 * S);
        let statuses = status(&plan, &st.rollout);
        assert_eq!(statuses[0].phase, "Done");
        assert_eq!(statuses[1].phase, "Rolling");
        assert_eq!(
            statuses[1].clusters[0],
            ("b1".to_string(), Some(Outcome::Updating))
        );
        let all_ready: Vec<Observed> = ["a1", "a2", "b1", "b2"].iter().map(|n| ready(n)).collect();
        let st = step(&s, &plan, &all_ready, &st.rollout, 80 * S);
        assert_eq!(st.rollout.phase, Phase::Progressing);
        let st = step(&s, &plan, &all_ready, &st.rollout, 140 * S);
        assert_eq!(st.rollout.phase, Phase::Completed);
        assert_eq!(kinds(&st), [EventKind::PartitionDone, EventKind::Completed]);
    }

    #[test]
    fn max_unavailable_partitions_lets_several_run() {
        let (s, plan) = two_partitions(json!({"maxUnavailablePartitions": 1}));
        let r = Rollout::start("web", "c2", None, 0);
        let obs = vec![busy("a1"), busy("a2"), busy("b1"), busy("b2")];
        let st = step(&s, &plan, &obs, &r, 0);
        assert_eq!(admitted(&st.rollout), ["a1", "a2", "b1", "b2"]);
    }

    #[test]
    fn readiness_lost_resets_the_bake() {
        let s = strat(json!({"bakeTime": "60s"}));
        let plan = plan_of(&s, &["a"]);
        let r = Rollout::start("web", "c2", None, 0);
        let st = step(&s, &plan, &[ready("a")], &r, 0);
        assert_eq!(st.rollout.clusters["a"].ready_since_ms, Some(0));
        let st = step(&s, &plan, &[busy("a")], &st.rollout, 30 * S);
        assert_eq!(st.rollout.clusters["a"].outcome, Outcome::Updating);
        assert_eq!(st.rollout.clusters["a"].ready_since_ms, None);
        let st = step(&s, &plan, &[ready("a")], &st.rollout, 40 * S);
        let st = step(&s, &plan, &[ready("a")], &st.rollout, 60 * S);
        assert!(
            st.rollout.partitions_done.is_empty(),
            "baking again since 40s"
        );
        let st = step(&s, &plan, &[ready("a")], &st.rollout, 100 * S);
        assert_eq!(st.rollout.phase, Phase::Completed);
    }

    #[test]
    fn past_the_deadline_connected_fails_offline_is_skipped() {
        let s = strat(json!({"progressDeadline": "5m", "maxFailures": 5}));
        let plan = plan_of(&s, &["on", "off"]);
        let r = Rollout::start("web", "c2", None, 0);
        let obs = vec![busy("on"), offline("off")];
        let st = step(&s, &plan, &obs, &r, 0);
        let st = step(&s, &plan, &obs, &st.rollout, 5 * MIN - 1);
        assert!(st
            .rollout
            .clusters
            .values()
            .all(|c| c.outcome == Outcome::Updating));
        let st = step(&s, &plan, &obs, &st.rollout, 5 * MIN);
        assert_eq!(st.rollout.clusters["on"].outcome, Outcome::Failed);
        assert_eq!(st.rollout.clusters["off"].outcome, Outcome::Skipped);
        let ev: Vec<(EventKind, Option<&str>)> = st
            .events
            .iter()
            .map(|e| (e.kind, e.cluster.as_deref()))
            .collect();
        assert_eq!(
            ev,
            [
                (EventKind::ClusterSkipped, Some("off")),
                (EventKind::ClusterFailed, Some("on")),
                (EventKind::PartitionDone, None),
                (EventKind::Completed, None),
            ]
        );
        assert!(st.events[1]
            .message
            .contains("not Ready within progressDeadline 5m (NotReady)"));
    }

    #[test]
    fn apply_errors_fail_at_once_and_halt() {
        let s = strat(json!({"maxUnavailable": 1}));
        let plan = plan_of(&s, &["a", "b"]);
        let r = Rollout::start("web", "c2", Some("c1".into()), 0);
        let st = step(&s, &plan, &[busy("a"), busy("b")], &r, 0);
        let broken = seen("a", true, true, Some(BundleState::ErrApplied));
        let st = step(&s, &plan, &[broken.clone(), busy("b")], &st.rollout, S);
        assert_eq!(st.rollout.phase, Phase::Halted);
        assert_eq!(st.rollout.clusters["a"].outcome, Outcome::Failed);
        assert_eq!(kinds(&st), [EventKind::ClusterFailed, EventKind::Halted]);
        assert_eq!(
            st.rollout.reason,
            "halted: 1 failed (maxFailures 0): a: apply failed (ErrApplied)"
        );
        assert_eq!(st.rollout.ended_ms, None, "halted is not over");
        // halted: no admission, ever, whatever happens
        let st2 = step(&s, &plan, &[ready("a"), ready("b")], &st.rollout, 100 * MIN);
        assert_eq!(admitted(&st2.rollout), ["a"]);
        assert_eq!(st2.rollout.phase, Phase::Halted);
        assert_eq!(st2.rollout.reason, st.rollout.reason);
        assert_eq!(
            st2.rollout.clusters["a"].outcome,
            Outcome::Failed,
            "failed stays failed"
        );
        assert_eq!(st2.rollout.decision("b"), Decision::Hold);
        assert!(st2.events.is_empty());
    }

    #[test]
    fn max_failures_tolerates_and_failures_hold_no_slot() {
        let s = strat(json!({"maxUnavailable": 1, "maxFailures": 1}));
        let plan = plan_of(&s, &["a", "b"]);
        let r = Rollout::start("web", "c2", None, 0);
        let st = step(&s, &plan, &[busy("a"), busy("b")], &r, 0);
        let broken = seen("a", true, true, Some(BundleState::ErrApplied));
        let st = step(&s, &plan, &[broken.clone(), busy("b")], &st.rollout, S);
        assert_eq!(st.rollout.phase, Phase::Progressing);
        assert_eq!(admitted(&st.rollout), ["a", "b"]);
        let st = step(&s, &plan, &[broken.clone(), ready("b")], &st.rollout, 2 * S);
        assert_eq!(
            st.rollout.phase,
            Phase::Completed,
            "a tolerated failure does not block"
        );
        // a second failure is one too many
        let plan3 = plan_of(&s, &["a", "b", "c"]);
        let r = Rollout::start("web", "c2", None, 0);
        let mut cur = r;
        for t in 0..3 {
            let bad: Vec<Observed> = ["a", "b", "c"]
                .iter()
                .map(|n| seen(n, true, true, Some(BundleState::ErrApplied)))
                .collect();
            cur = step(&s, &plan3, &bad, &cur, t * S).rollout;
        }
        assert_eq!(cur.phase, Phase::Halted);
        assert!(
            cur.reason
                .contains("2 failed (maxFailures 1): a: apply failed"),
            "{}",
            cur.reason
        );
        assert_eq!(admitted(&cur), ["a", "b"], "c never got it");
    }

    #[test]
    fn max_offline_exceeded_keeps_waiting() {
        let s = strat(json!({"maxOffline": 1, "progressDeadline": "1m"}));
        let plan = plan_of(&s, &["a", "b", "c"]);
        let obs = vec![offline("a"), offline("b"), ready("c")];
        let st = step(&s, &plan, &obs, &Rollout::start("web", "c2", None, 0), 0);
        let st = step(&s, &plan, &obs, &st.rollout, MIN);
        assert_eq!(st.rollout.clusters["a"].outcome, Outcome::Skipped);
        assert_eq!(st.rollout.clusters["b"].outcome, Outcome::Updating);
        assert_eq!(st.rollout.phase, Phase::Progressing);
        assert!(
            st.rollout.reason.starts_with(
                "partition All: waiting for b (offline past progressDeadline 1m; partition All may skip 1 (maxOffline)"
            ),
            "{}",
            st.rollout.reason
        );
        // still waiting later, no new events
        let st = step(&s, &plan, &obs, &st.rollout, 10 * MIN);
        assert!(st.events.is_empty());
        assert_eq!(st.rollout.phase, Phase::Progressing);
        // b comes back and is Ready: done; a (skipped) catches up when it reconnects
        let st = step(
            &s,
            &plan,
            &[offline("a"), ready("b"), ready("c")],
            &st.rollout,
            11 * MIN,
        );
        assert_eq!(st.rollout.phase, Phase::Completed);
        assert_eq!(st.rollout.decision("a"), Decision::Revision);
    }

    #[test]
    fn a_skipped_cluster_that_reconnects_becomes_ready() {
        let s = strat(json!({"progressDeadline": "1m", "partitions": [
            {"name": "one", "clusterName": "a"}, {"name": "two", "clusterName": "b"}]}));
        let plan = partition(&s, &named(&["a", "b"]), &[]);
        let st = step(
            &s,
            &plan,
            &[offline("a")],
            &Rollout::start("w", "c2", None, 0),
            0,
        );
        let st = step(&s, &plan, &[offline("a")], &st.rollout, MIN);
        assert_eq!(st.rollout.clusters["a"].outcome, Outcome::Skipped);
        assert_eq!(
            admitted(&st.rollout),
            ["a", "b"],
            "the next partition goes on"
        );
        assert_eq!(
            st.rollout.decision("a"),
            Decision::Revision,
            "it gets the revision when back"
        );
        let st = step(&s, &plan, &[ready("a"), busy("b")], &st.rollout, 2 * MIN);
        assert_eq!(st.rollout.clusters["a"].outcome, Outcome::Ready);
    }

    #[test]
    fn rollback_on_failure_needs_a_previous_revision() {
        let s = strat(json!({"onFailure": "rollback"}));
        let plan = plan_of(&s, &["a", "b"]);
        let bad = seen("a", true, true, Some(BundleState::ErrApplied));
        let st = step(
            &s,
            &plan,
            &[busy("a"), busy("b")],
            &Rollout::start("w", "c2", Some("c1".into()), 0),
            0,
        );
        let st = step(&s, &plan, &[bad.clone(), busy("b")], &st.rollout, S);
        assert_eq!(st.rollout.phase, Phase::RolledBack);
        assert_eq!(st.rollout.ended_ms, Some(S));
        assert_eq!(
            kinds(&st),
            [EventKind::ClusterFailed, EventKind::RolledBack]
        );
        assert!(st.rollout.reason.starts_with("rolled back to c1: 1 failed"));
        assert_eq!(st.rollout.decision("a"), Decision::Previous);
        assert_eq!(st.rollout.decision("b"), Decision::Previous);
        // no previous revision: halted instead, and says why
        let st = step(
            &s,
            &plan,
            &[busy("a"), busy("b")],
            &Rollout::start("w", "c2", None, 0),
            0,
        );
        let st = step(&s, &plan, &[bad, busy("b")], &st.rollout, S);
        assert_eq!(st.rollout.phase, Phase::Halted);
        assert!(st
            .rollout
            .reason
            .ends_with("nothing to roll back to: no revision completed a rollout"));
        assert_eq!(kinds(&st), [EventKind::ClusterFailed, EventKind::Halted]);
    }

    #[test]
    fn paused_admits_nothing_but_follows_outcomes() {
        let s = strat(json!({"maxUnavailable": 1, "progressDeadline": "1m"}));
        let plan = plan_of(&s, &["a", "b"]);
        let st = step(
            &s,
            &plan,
            &[busy("a"), busy("b")],
            &Rollout::start("w", "c2", None, 0),
            0,
        );
        let p = command(&st.rollout, Command::Pause, S).unwrap();
        assert_eq!(p.rollout.phase, Phase::Paused);
        assert_eq!(p.rollout.reason, "paused by operator");
        assert_eq!(kinds(&p), [EventKind::Paused]);
        let st = step(&s, &plan, &[ready("a"), busy("b")], &p.rollout, 2 * S);
        assert_eq!(st.rollout.clusters["a"].outcome, Outcome::Ready);
        assert_eq!(admitted(&st.rollout), ["a"], "paused: b waits");
        assert_eq!(st.rollout.reason, "paused by operator");
        assert!(command(&st.rollout, Command::Pause, 3 * S)
            .unwrap_err()
            .contains("already paused"));
        let res = command(&st.rollout, Command::Resume, 3 * S).unwrap();
        assert_eq!(res.rollout.phase, Phase::Progressing);
        assert_eq!(kinds(&res), [EventKind::Resumed]);
        let st = step(&s, &plan, &[ready("a"), busy("b")], &res.rollout, 4 * S);
        assert_eq!(admitted(&st.rollout), ["a", "b"]);
        assert!(command(&st.rollout, Command::Resume, 5 * S)
            .unwrap_err()
            .contains("not paused or halted"));
    }

    #[test]
    fn resume_after_halt_gives_failed_clusters_a_fresh_start() {
        let s = strat(json!({"progressDeadline": "1m"}));
        let plan = plan_of(&s, &["a"]);
        let st = step(
            &s,
            &plan,
            &[busy("a")],
            &Rollout::start("w", "c2", None, 0),
            0,
        );
        let st = step(&s, &plan, &[busy("a")], &st.rollout, MIN);
        assert_eq!(st.rollout.phase, Phase::Halted);
        assert!(command(&st.rollout, Command::Pause, MIN)
            .unwrap_err()
            .contains("halted"));
        let res = command(&st.rollout, Command::Resume, 2 * MIN).unwrap();
        assert_eq!(res.rollout.phase, Phase::Progressing);
        assert_eq!(
            res.rollout.clusters["a"],
            ClusterProgress {
                admitted_ms: 2 * MIN,
                ready_since_ms: None,
                outcome: Outcome::Updating
            }
        );
        assert!(res.events[0]
            .message
            .contains("failed clusters start again: a"));
        let st = step(&s, &plan, &[busy("a")], &res.rollout, 3 * MIN - 1);
        assert_eq!(st.rollout.phase, Phase::Progressing, "a fresh deadline");
        let st = step(&s, &plan, &[ready("a")], &st.rollout, 3 * MIN);
        assert_eq!(st.rollout.phase, Phase::Completed);
    }

    #[test]
    fn rollback_command() {
        let r = Rollout::start("w", "c2", Some("c1".into()), 0);
        let st = command(&r, Command::Rollback, 5).unwrap();
        assert_eq!(st.rollout.phase, Phase::RolledBack);
        assert_eq!(st.rollout.ended_ms, Some(5));
        assert_eq!(kinds(&st), [EventKind::RolledBack]);
        let e = command(&Rollout::start("w", "c2", None, 0), Command::Rollback, 5).unwrap_err();
        assert!(e.contains("nothing to roll back to"), "{e}");
        for c in [Command::Pause, Command::Resume, Command::Rollback] {
            let e = command(&st.rollout, c, 6).unwrap_err();
            assert!(e.contains("is over (RolledBack)"), "{e}");
        }
        let mut halted = r.clone();
        halted.phase = Phase::Halted;
        assert_eq!(
            command(&halted, Command::Rollback, 7)
                .unwrap()
                .rollout
                .phase,
            Phase::RolledBack
        );
    }

    #[test]
    fn supersede_records_the_newer_revision() {
        let r = Rollout::start("w", "c2", Some("c1".into()), 0);
        let st = supersede(&r, "c3", 9);
        assert_eq!(st.rollout.phase, Phase::Superseded);
        assert_eq!(st.rollout.ended_ms, Some(9));
        assert_eq!(kinds(&st), [EventKind::Superseded]);
        assert!(st.events[0].message.contains("superseded by c3"));
        assert_eq!(st.rollout.decision("x"), Decision::Revision);
        let again = supersede(&st.rollout, "c4", 10);
        assert_eq!(again.rollout, st.rollout);
        assert!(again.events.is_empty());
    }

    #[test]
    fn zero_max_unavailable_says_why_it_waits() {
        let s = strat(json!({"maxUnavailable": 0}));
        let plan = plan_of(&s, &["a"]);
        let st = step(
            &s,
            &plan,
            &[busy("a")],
            &Rollout::start("w", "c2", None, 0),
            0,
        );
        assert!(st.rollout.clusters.is_empty());
        assert_eq!(
            st.rollout.reason,
            "partition All: maxUnavailable is 0, no cluster may update"
        );
    }

    // -----------------------------------------------------------------------
    // A tiny fake fleet, and properties over it.

    use proptest::prelude::*;

    /// How a fake cluster behaves once it has the revision.
    #[derive(Debug, Clone, Copy)]
    enum Fake {
        /// Ready this many steps after it was admitted.
        Good(u64),
        /// Connected, never Ready.
        Stuck,
        /// Apply fails.
        Broken,
        /// Never connected.
        Offline,
    }

    fn fake() -> impl Strategy<Value = Fake> {
        prop_oneof![
            6 => (0u64..4).prop_map(Fake::Good),
            1 => Just(Fake::Stuck),
            1 => Just(Fake::Broken),
            1 => Just(Fake::Offline),
        ]
    }

    fn limit_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(json!(null)),
            (0i64..6).prop_map(|n| json!(n)),
            (0i64..=100).prop_map(|p| json!(format!("{p}%"))),
        ]
    }

    fn strategy_json() -> impl Strategy<Value = serde_json::Value> {
        (
            limit_value(),
            limit_value(),
            prop_oneof![Just(json!(null)), (0i64..3).prop_map(|n| json!(n))],
            limit_value(),
            prop_oneof![Just("halt"), Just("rollback")],
            0u64..4,
            1u64..6,
            0usize..4,
        )
            .prop_map(|(mu, mo, mf, mup, on, bake, deadline, parts)| {
                let mut v = json!({
                    "maxUnavailable": mu, "maxOffline": mo, "maxFailures": mf,
                    "maxUnavailablePartitions": mup, "onFailure": on,
                    "bakeTime": format!("{bake}s"), "progressDeadline": format!("{deadline}s"),
                });
                if parts > 0 {
                    let list: Vec<serde_json::Value> = (0..parts)
                        .map(|i| json!({"name": format!("p{i}"), "clusterSelector": {"matchLabels": {"p": i.to_string()}}}))
                        .collect();
                    v["partitions"] = json!(list);
                }
                v
            })
    }

    fn fleet(behaviours: &[(Fake, u8)]) -> Vec<ClusterInfo> {
        behaviours
            .iter()
            .enumerate()
            .map(|(i, (_, p))| cluster(&format!("k{i:02}"), &format!("p={}", p % 5)))
            .collect()
    }

    /// What the hub would observe of each cluster at `now`.
    fn observe(r: &Rollout, cs: &[ClusterInfo], bs: &[(Fake, u8)], now: u64) -> Vec<Observed> {
        cs.iter()
            .zip(bs)
            .map(|(c, (b, _))| {
                let Some(p) = r.clusters.get(&c.name) else {
                    return seen(&c.name, !matches!(b, Fake::Offline), false, None);
                };
                match b {
                    Fake::Offline => offline(&c.name),
                    Fake::Stuck => busy(&c.name),
                    Fake::Broken => seen(&c.name, true, true, Some(BundleState::ErrApplied)),
                    Fake::Good(k) if now >= p.admitted_ms + k * S => ready(&c.name),
                    Fake::Good(_) => seen(&c.name, true, false, None),
                }
            })
            .collect()
    }

    fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
        let mut x = seed | 1;
        let mut keyed: Vec<(u64, T)> = v
            .iter()
            .map(|t| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x, t.clone())
            })
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, t)| t).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Never more than maxUnavailable clusters of a partition (nor of the
        /// bundle) updating at once; with no failure tolerated, failed ones count
        /// too. Partitions start in order, at most maxUnavailablePartitions + 1 in
        /// progress, each started once. Once halted, nothing more is admitted. A
        /// rollback returns every admitted cluster to `previous`. A fleet that
        /// turns Ready in time completes.
        #[test]
        fn the_machine_keeps_its_limits(
            v in strategy_json(),
            bs in proptest::collection::vec((fake(), any::<u8>()), 0..30),
        ) {
            let s = parse_strategy(&v).unwrap();
            let cs = fleet(&bs);
            let plan = partition(&s, &cs, &[]);
            let mut r = Rollout::start("web", "c2", Some("c1".into()), 0);
            let mut started_events = std::collections::BTreeSet::new();
            let mut halted_with: Option<Vec<String>> = None;
            let can_move = plan.max_unavailable > 0 && plan.partitions.iter().all(|p| p.max_unavailable > 0);
            for t in 0..200u64 {
                let now = t * S;
                let obs = observe(&r, &cs, &bs, now);
                let st = step(&s, &plan, &obs, &r, now);
                r = st.rollout;
                for p in &plan.partitions {
                    let n = |o: Outcome| p.clusters.iter().filter(|c| r.clusters.get(*c).is_some_and(|x| x.outcome == o)).count();
                    prop_assert!(n(Outcome::Updating) <= p.max_unavailable, "{}: {} updating > {}", p.name, n(Outcome::Updating), p.max_unavailable);
                    if plan.max_failures == 0 {
                        prop_assert!(n(Outcome::Updating) + n(Outcome::Failed) <= p.max_unavailable);
                    }
                }
                let updating = r.clusters.values().filter(|c| c.outcome == Outcome::Updating).count();
                prop_assert!(updating <= plan.max_unavailable);
                match r.phase {
                    Phase::Halted => {
                        let now_admitted: Vec<String> = r.clusters.keys().cloned().collect();
                        if let Some(before) = &halted_with {
                            prop_assert_eq!(before, &now_admitted, "admitted while halted");
                        }
                        halted_with = Some(now_admitted);
                    }
                    Phase::RolledBack => {
                        prop_assert_eq!(r.previous.as_deref(), Some("c1"));
                        for c in r.clusters.keys() {
                            prop_assert_eq!(r.decision(c), Decision::Previous);
                        }
                    }
                    _ => {}
                }
                if r.phase.is_final() {
                    break;
                }
                // a partition gets clusters only while at most maxUnavailablePartitions
                // earlier ones are not done (0: only after every earlier one is done)
                for (j, p) in plan.partitions.iter().enumerate() {
                    if p.clusters.iter().any(|c| r.clusters.contains_key(c)) {
                        let open = plan.partitions[..j].iter().filter(|q| !r.partitions_done.contains_key(&q.name)).count();
                        prop_assert!(open <= plan.max_unavailable_partitions, "{} started with {open} earlier partitions not done", p.name);
                    }
                }
                let in_flight = plan.partitions.iter().filter(|p| {
                    !r.partitions_done.contains_key(&p.name) && p.clusters.iter().any(|c| r.clusters.contains_key(c))
                }).count();
                prop_assert!(in_flight <= plan.max_unavailable_partitions + 1);
                for e in st.events.iter().filter(|e| e.kind == EventKind::PartitionStarted) {
                    prop_assert!(started_events.insert(e.partition.clone()), "partition started twice: {:?}", e.partition);
                }
            }
            // Clusters that all turn Ready before the deadline: it always completes.
            let in_time = |b: &Fake| matches!(b, Fake::Good(k) if k * S < s.progress_deadline_ms);
            if can_move && bs.iter().all(|(b, _)| in_time(b)) {
                prop_assert_eq!(r.phase, Phase::Completed);
            }
        }

        /// The planner's answer is the same whatever order clusters and
        /// observations come in.
        #[test]
        fn order_does_not_matter(
            v in strategy_json(),
            bs in proptest::collection::vec((fake(), any::<u8>()), 0..25),
            seed in any::<u64>(),
        ) {
            let s = parse_strategy(&v).unwrap();
            let cs = fleet(&bs);
            let plan = partition(&s, &cs, &[]);
            let plan2 = partition(&s, &shuffled(&cs, seed), &[]);
            prop_assert_eq!(&plan, &plan2);
            let mut shuffled_plan = plan.clone();
            for p in &mut shuffled_plan.partitions {
                p.clusters = shuffled(&p.clusters, seed ^ 7);
            }
            let mut r = Rollout::start("web", "c2", Some("c1".into()), 0);
            for t in 0..60u64 {
                let now = t * S;
                let mut obs = observe(&r, &cs, &bs, now);
                // a cluster reported twice, differently: the answer still does not depend on order
                let dups: Vec<Observed> = obs.iter().step_by(3).map(|o| offline(&o.cluster)).collect();
                obs.extend(dups);
                let a = step(&s, &plan, &obs, &r, now);
                let b = step(&s, &shuffled_plan, &shuffled(&obs, seed.wrapping_add(t)), &r, now);
                prop_assert_eq!(&a, &b);
                r = a.rollout;
                if r.phase.is_final() {
                    break;
                }
            }
        }

        /// A rollback always returns to the last revision that completed a
        /// rollout: c1 completes, c2 starts from it, and c2's failure rolls back to c1.
        #[test]
        fn a_rollback_targets_the_last_completed_revision(
            bs in proptest::collection::vec((fake(), any::<u8>()), 1..20),
        ) {
            let s = strat(json!({"onFailure": "rollback", "progressDeadline": "3s", "maxOffline": "100%"}));
            let cs = fleet(&bs);
            let plan = partition(&s, &cs, &[]);
            let good: Vec<(Fake, u8)> = bs.iter().map(|(_, p)| (Fake::Good(1), *p)).collect();
            let mut last_completed: Option<String> = Some("c0".into());
            for (rev, fleet_state) in [("c1", &good), ("c2", &bs)] {
                let mut r = Rollout::start("web", rev, last_completed.clone(), 0);
                for t in 0..100u64 {
                    let obs = observe(&r, &cs, fleet_state, t * S);
                    r = step(&s, &plan, &obs, &r, t * S).rollout;
                    if r.phase.is_final() { break; }
                }
                match r.phase {
                    Phase::Completed => last_completed = Some(rev.to_string()),
                    Phase::RolledBack => {
                        prop_assert_eq!(rev, "c2");
                        prop_assert_eq!(r.previous.as_deref(), Some("c1"));
                        for c in r.clusters.keys() {
                            prop_assert_eq!(r.decision(c), Decision::Previous);
                        }
                    }
                    other => prop_assert!(false, "{rev} ended {other:?}"),
                }
            }
            let any_failing = bs.iter().any(|(b, _)| matches!(b, Fake::Stuck | Fake::Broken));
            prop_assert_eq!(last_completed.as_deref() == Some("c1"), any_failing);
        }
    }

    #[test]
    fn reads_clusters_and_groups() {
        let text = "apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {name: eu-1, labels: {region: eu}}\n---\napiVersion: flotilla.io/v1alpha1\nkind: ClusterGroup\nmetadata: {name: edge, labels: {k: v}}\nspec: {selector: {matchLabels: {tier: edge}}}\n---\n";
        let (cs, gs) = parse_fleet_file("c.yaml", text).unwrap();
        assert_eq!(cs, vec![cluster("eu-1", "region=eu")]);
        assert_eq!(gs.len(), 1);
        assert_eq!(gs[0].selector, LabelSelector::parse("tier=edge").unwrap());
        let doc = |body: &str| {
            format!("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {{name: ok}}\n---\n{body}")
        };
        for (body, want) in [
            ("kind: Cluster\nmetadata: {name: a}\n", "c.yaml: document 2: apiVersion must be"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: Clustr\nmetadata: {name: a}\n", "document 2: kind must be Cluster or ClusterGroup"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\n", "document 2: metadata.name is required"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {name: Bad_Name}\n", "document 2: invalid name"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {name: ok}\n", "document 2: Cluster ok is given twice"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {name: a, labels: {\"bad key\": v}}\n", "document 2: metadata.labels: invalid label"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {name: a, lables: {}}\n", "document 2: unknown field"),
            ("apiVersion: flotilla.io/v1alpha1\nkind: ClusterGroup\nmetadata: {name: g}\nspec: {selectr: {}}\n", "document 2: ClusterGroup g: spec: unknown field"),
            ("[unclosed", "c.yaml: document 0: invalid YAML"),
        ] {
            let e = parse_fleet_file("c.yaml", &doc(body)).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: {e}");
        }
    }
}
