//! The hub's half of the rollout machine. The planner (`flotilla_shared::rollout`)
//! decides; this module gathers what it decides on (the targeted clusters, what
//! each holds and reports, whether its agent is connected), keeps each bundle's
//! current rollout in memory and in the store, records finished rollouts and the
//! planner's events, and serves operators' commands and the views.
//!
//! A new revision of a bundle with a `rolloutStrategy` starts a rollout in the same
//! step that makes the revision known (`set_snapshot`), so no session ever sees the
//! revision before the rollout holds it back.

use std::collections::BTreeMap;

use flotilla_shared::api::{
    RolloutClusterView, RolloutEventView, RolloutHistoryView, RolloutPartitionView, RolloutView,
};
use flotilla_shared::assign::{BundleInfo, RolloutGate};
use flotilla_shared::rollout::{
    self as ro, Command, EventKind, Observed, Outcome, Phase, Rollout, RolloutEvent,
    RolloutStrategy,
};
use flotilla_shared::state::BundleState;
use flotilla_shared::targeting::{ClusterInfo, GroupInfo};

use super::{cluster_info, ClusterState, Fleet, FleetError, State};
use crate::store::RolloutRecord;

/// Events a rollout view shows (the newest).
const VIEW_EVENTS: usize = 20;

/// What one pass over the rollouts changed, for the store.
#[derive(Debug, Default)]
pub(super) struct RolloutWrites {
    pub put: Vec<RolloutRecord>,
    pub delete: Vec<String>,
    pub finished: Vec<Rollout>,
    pub events: Vec<RolloutEvent>,
}

impl RolloutWrites {
    fn is_empty(&self) -> bool {
        self.put.is_empty()
            && self.delete.is_empty()
            && self.finished.is_empty()
            && self.events.is_empty()
    }
}

fn phase_name(p: Phase) -> String {
    format!("{p:?}")
}

fn event_view(e: &RolloutEvent) -> RolloutEventView {
    RolloutEventView {
        kind: format!("{:?}", e.kind),
        revision: e.revision.clone(),
        partition: e.partition.clone(),
        cluster: e.cluster.clone(),
        message: e.message.clone(),
        at: crate::rfc3339(e.at_ms),
    }
}

fn history_view(r: &Rollout) -> RolloutHistoryView {
    RolloutHistoryView {
        revision: r.revision.clone(),
        previous: r.previous.clone(),
        started: crate::rfc3339(r.started_ms),
        ended: r.ended_ms.map(crate::rfc3339),
        outcome: phase_name(r.phase),
        reason: r.reason.clone(),
    }
}

/// A bundle's content per variant ("" = default) and the revision it came from.
fn variants(info: &BundleInfo) -> (BTreeMap<String, String>, String) {
    let mut out = BTreeMap::new();
    let mut revision = String::new();
    if let Some((h, r)) = &info.good {
        out.insert(String::new(), h.clone());
        revision = r.clone();
    }
    for c in &info.customizations {
        if let Some((h, r)) = &c.good {
            out.insert(c.name.clone(), h.clone());
            if revision.is_empty() {
                revision = r.clone();
            }
        }
    }
    (out, revision)
}

fn started_event(r: &Rollout, now_ms: u64) -> RolloutEvent {
    RolloutEvent {
        kind: EventKind::Started,
        bundle: r.bundle.clone(),
        revision: r.revision.clone(),
        partition: None,
        cluster: None,
        message: match &r.previous {
            Some(p) => format!("rollout of {} started (previous: {p})", r.revision),
            None => format!("rollout of {} started (no earlier revision)", r.revision),
        },
        at_ms: now_ms,
    }
}

impl State {
    pub(super) fn rollout_gate(&self, bundle: &str) -> Option<RolloutGate<'_>> {
        let r = self.rollouts.get(bundle)?;
        Some(RolloutGate {
            rollout: &r.rollout,
            target: &r.target,
            previous: &r.previous,
        })
    }

    /// The bundles that roll out (those with a `rolloutStrategy`), with their
    /// strategy; colliding names are refused (no content), so never roll out.
    fn rolling(&self) -> Vec<(BundleInfo, RolloutStrategy)> {
        // Most fleets roll nothing out: skip building every bundle's info each tick.
        let any = self
            .sources
            .values()
            .any(|s| s.bundles.values().any(|b| b.rollout.is_some()));
        if !any {
            return Vec::new();
        }
        self.index
            .bundles()
            .iter()
            .cloned()
            .filter_map(|info| {
                let entry = self.sources.get(&info.source)?.bundles.get(&info.name)?;
                let strategy = entry.rollout.clone()?;
                Some((info, strategy))
            })
            .collect()
    }

    /// The clusters a bundle targets, with the variant each gets.
    fn targeted<'a>(
        &'a self,
        info: &BundleInfo,
        groups: &[GroupInfo],
    ) -> Vec<(&'a ClusterState, ClusterInfo, String)> {
        self.clusters
            .values()
            .filter_map(|c| {
                let ci = cluster_info(&c.record);
                let a = info.assignment(&ci, groups)?;
                Some((c, ci, a.variant))
            })
            .collect()
    }

    /// The bundle's targeted clusters (with their variants) and its partitions over them.
    fn plan<'a>(
        &'a self,
        info: &BundleInfo,
        strategy: &RolloutStrategy,
        groups: &[GroupInfo],
    ) -> (
        Vec<(&'a ClusterState, ClusterInfo, String)>,
        ro::PartitionPlan,
    ) {
        let targeted = self.targeted(info, groups);
        let clusters: Vec<ClusterInfo> = targeted.iter().map(|(_, ci, _)| ci.clone()).collect();
        let plan = ro::partition(strategy, &clusters, groups);
        (targeted, plan)
    }

    fn observe(&self, rec: &RolloutRecord, c: &ClusterState, variant: &str) -> Observed {
        let target = rec.target.get(variant);
        let on_revision = target.is_some() && c.record.acked.get(&rec.rollout.bundle) == target;
        let state = self
            .reported(&c.record.name, &rec.rollout.bundle)
            .filter(|r| Some(&r.content_hash) == target)
            .map(|r| r.state);
        Observed {
            cluster: c.record.name.clone(),
            connected: c.session.is_some(),
            on_revision,
            state,
        }
    }

    /// Starts a rollout for every rolling bundle whose content changed (the
    /// running one, if any, is superseded), and forgets the rollouts of bundles
    /// that no longer roll out. Nothing is admitted here: that is `step`'s.
    pub(super) fn begin_rollouts(&mut self, now_ms: u64) -> RolloutWrites {
        if self.sources.values().any(|s| !s.loaded) {
            return RolloutWrites::default();
        }
        let rolling = self.rolling();
        self.begin_rollouts_of(&rolling, now_ms)
    }

    fn begin_rollouts_of(
        &mut self,
        rolling: &[(BundleInfo, RolloutStrategy)],
        now_ms: u64,
    ) -> RolloutWrites {
        let mut w = RolloutWrites::default();
        if rolling.is_empty() && self.rollouts.is_empty() {
            return w;
        }
        for (info, _) in rolling {
            let (current, revision) = variants(info);
            if current.is_empty() {
                continue;
            }
            let next = match self.rollouts.get(&info.name) {
                Some(r) if r.target == current => continue,
                Some(r) => {
                    let (previous, previous_revision) = if r.rollout.phase == Phase::Completed {
                        (r.target.clone(), Some(r.rollout.revision.clone()))
                    } else {
                        (r.previous.clone(), r.rollout.previous.clone())
                    };
                    if !r.rollout.phase.is_final() {
                        let s = ro::supersede(&r.rollout, &revision, now_ms);
                        w.events.extend(s.events);
                        w.finished.push(s.rollout);
                    }
                    RolloutRecord {
                        rollout: Rollout::start(&info.name, &revision, previous_revision, now_ms),
                        target: current,
                        previous,
                    }
                }
                None => RolloutRecord {
                    rollout: Rollout::start(&info.name, &revision, None, now_ms),
                    target: current,
                    previous: BTreeMap::new(),
                },
            };
            w.events.push(started_event(&next.rollout, now_ms));
            self.rollouts.insert(info.name.clone(), next.clone());
            w.put.push(next);
        }
        let keep: std::collections::BTreeSet<&String> =
            rolling.iter().map(|(i, _)| &i.name).collect();
        let gone: Vec<String> = self
            .rollouts
            .keys()
            .filter(|b| !keep.contains(b))
            .cloned()
            .collect();
        for b in gone {
            if let Some(r) = self.rollouts.remove(&b) {
                if !r.rollout.phase.is_final() {
                    // The strategy was removed (or the bundle): the revision goes
                    // everywhere, as without a strategy.
                    let mut done = r.rollout.clone();
                    done.phase = Phase::Superseded;
                    done.ended_ms = Some(now_ms);
                    done.reason = "the bundle no longer has a rolloutStrategy".into();
                    w.finished.push(done);
                }
            }
            w.delete.push(b);
        }
        w
    }

    /// One planner step for every rolling bundle.
    fn step_rollouts(&mut self, now_ms: u64) -> RolloutWrites {
        if self.sources.values().any(|s| !s.loaded) {
            return RolloutWrites::default();
        }
        let rolling = self.rolling();
        let mut w = self.begin_rollouts_of(&rolling, now_ms);
        if rolling.is_empty() {
            return w;
        }
        let groups = self.groups_info();
        for (info, strategy) in rolling {
            let Some(rec) = self.rollouts.get(&info.name) else {
                continue;
            };
            if rec.rollout.phase.is_final() {
                continue;
            }
            let (targeted, plan) = self.plan(&info, &strategy, &groups);
            let observed: Vec<Observed> = targeted
                .iter()
                .map(|(c, _, variant)| self.observe(rec, c, variant))
                .collect();
            let step = ro::step(&strategy, &plan, &observed, &rec.rollout, now_ms);
            w.events.extend(step.events);
            if step.rollout == rec.rollout {
                continue;
            }
            if step.rollout.phase.is_final() {
                w.finished.push(step.rollout.clone());
            }
            let mut next = rec.clone();
            next.rollout = step.rollout;
            self.rollouts.insert(info.name.clone(), next.clone());
            w.put.push(next);
        }
        w
    }

    fn rollout_view(&self, bundle: &str, events: &[RolloutEvent]) -> Option<RolloutView> {
        let rec = self.rollouts.get(bundle)?;
        let (info, strategy) = self.rolling().into_iter().find(|(i, _)| i.name == bundle)?;
        let groups = self.groups_info();
        let (targeted, plan) = self.plan(&info, &strategy, &groups);
        let by_name: BTreeMap<&str, &ClusterState> = targeted
            .iter()
            .map(|(c, ci, _)| (ci.name.as_str(), *c))
            .collect();
        let inputs = self.assign_inputs();
        let partitions = ro::status(&plan, &rec.rollout)
            .into_iter()
            .map(|p| RolloutPartitionView {
                name: p.name,
                phase: p.phase,
                max_unavailable: p.max_unavailable,
                clusters: p
                    .clusters
                    .into_iter()
                    .map(|(name, outcome)| {
                        let c = by_name.get(name.as_str());
                        let (state, message) = c
                            .and_then(|c| {
                                self.cluster_bundles(&c.record, &inputs)
                                    .into_iter()
                                    .find(|b| b.bundle == bundle)
                                    .map(|b| (b.state, b.message))
                            })
                            .unwrap_or((BundleState::Pending, String::new()));
                        RolloutClusterView {
                            progress: outcome
                                .map(|o: Outcome| format!("{o:?}"))
                                .unwrap_or_else(|| "OutOfSync".into()),
                            connected: c.is_some_and(|c| c.session.is_some()),
                            cluster: name,
                            state,
                            message,
                        }
                    })
                    .collect(),
            })
            .collect();
        let mut mine: Vec<RolloutEventView> = events
            .iter()
            .rev()
            .filter(|e| e.bundle == bundle)
            .take(VIEW_EVENTS)
            .map(event_view)
            .collect();
        mine.reverse();
        let r = &rec.rollout;
        Some(RolloutView {
            bundle: bundle.to_string(),
            revision: r.revision.clone(),
            previous: r.previous.clone(),
            phase: phase_name(r.phase),
            reason: r.reason.clone(),
            started: crate::rfc3339(r.started_ms),
            ended: r.ended_ms.map(crate::rfc3339),
            max_unavailable: plan.max_unavailable,
            max_unavailable_partitions: plan.max_unavailable_partitions,
            max_failures: plan.max_failures,
            partitions,
            matched_several: plan.matched_several,
            unmatched: plan.unmatched,
            events: mine,
        })
    }
}

impl Fleet {
    /// Writes what a pass over the rollouts changed and makes it durable before
    /// any session acts on it (the caller bumps after).
    pub(super) fn write_rollouts(&self, w: &RolloutWrites) -> Result<(), FleetError> {
        if w.is_empty() {
            return Ok(());
        }
        for r in &w.put {
            self.store.put_rollout(r)?;
        }
        for b in &w.delete {
            self.store.delete_rollout(b)?;
        }
        for r in &w.finished {
            self.store.add_rollout_history(r)?;
        }
        self.store.add_rollout_events(&w.events)?;
        for e in &w.events {
            tracing::info!(
                bundle = %e.bundle,
                revision = %e.revision,
                kind = ?e.kind,
                partition = e.partition.as_deref().unwrap_or(""),
                cluster = e.cluster.as_deref().unwrap_or(""),
                "rollout: {}",
                e.message
            );
        }
        self.store.flush()?;
        Ok(())
    }

    /// One step of every rollout: called by the hub's rollout loop. Returns the
    /// events raised. Decisions are durable before any session sees them.
    pub fn step_rollouts(&self, now_ms: u64) -> Result<Vec<RolloutEvent>, FleetError> {
        let mut st = self.lock();
        let w = st.step_rollouts(now_ms);
        if w.is_empty() {
            return Ok(Vec::new());
        }
        self.write_rollouts(&w)?;
        if !w.put.is_empty() || !w.delete.is_empty() {
            st.wake_rollouts(&w);
            st.bump(&self.changed);
        }
        Ok(w.events)
    }

    /// A bundle's current rollout, if it rolls out.
    pub fn rollout(&self, bundle: &str) -> Result<Option<RolloutView>, FleetError> {
        let events = self.store.rollout_events()?;
        Ok(self.lock().rollout_view(bundle, &events))
    }

    /// A bundle's rollouts, oldest first, the current one last.
    pub fn rollout_history(&self, bundle: &str) -> Result<Vec<RolloutHistoryView>, FleetError> {
        let mut out: Vec<RolloutHistoryView> = self
            .store
            .rollout_history(bundle)?
            .iter()
            .map(history_view)
            .collect();
        if let Some(r) = self.lock().rollouts.get(bundle) {
            if !r.rollout.phase.is_final() {
                out.push(history_view(&r.rollout));
            }
        }
        Ok(out)
    }

    /// An operator's command on a bundle's rollout.
    pub fn rollout_command(
        &self,
        bundle: &str,
        command: Command,
        now_ms: u64,
    ) -> Result<(), FleetError> {
        let mut st = self.lock();
        let rec = st
            .rollouts
            .get(bundle)
            .ok_or_else(|| FleetError::NotFound(format!("rollout of bundle {bundle}")))?;
        let step = ro::command(&rec.rollout, command, now_ms).map_err(FleetError::Refused)?;
        let mut next = rec.clone();
        next.rollout = step.rollout;
        let mut w = RolloutWrites {
            events: step.events,
            ..Default::default()
        };
        if next.rollout.phase.is_final() {
            w.finished.push(next.rollout.clone());
        }
        w.put.push(next.clone());
        st.rollouts.insert(bundle.to_string(), next);
        self.write_rollouts(&w)?;
        st.wake_holders(bundle);
        st.bump(&self.changed);
        Ok(())
    }
}
