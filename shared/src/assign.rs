//! Which bundles each cluster must run: the bundles of every source whose targets
//! match the cluster, and the state the hub shows for each (cluster, bundle) pair.

use std::collections::BTreeMap;

use crate::objects::Target;
use crate::state::{effective_state, BundleState, Reported};
use crate::targeting::{target_matches, targets_match, ClusterInfo, GroupInfo};

/// What assignment needs to know of one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    pub name: String,
    pub source: String,
    /// The bundle's directory in the source ("" for the root).
    pub path: String,
    /// The last content that rendered, if any: (content hash, commit it came from).
    pub good: Option<(String, String)>,
    /// The render error of the latest commit, if it failed.
    pub render_error: Option<String>,
    /// The targets of the bundle's source.
    pub targets: Vec<Target>,
    /// The bundle's target customisations, in order; `good` and `render_error`
    /// above are the default's, for clusters that match none.
    pub customizations: Vec<CustomizationInfo>,
    /// `dependsOn`: bundles that must be `Ready` on a cluster before this one is sent.
    pub depends_on: Vec<crate::depends::Dependency>,
    /// The labels `dependsOn` selectors of other bundles match.
    pub labels: crate::labels::Labels,
}

/// One target customisation of a bundle and how it rendered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CustomizationInfo {
    pub name: String,
    pub target: Target,
    /// Matching clusters do not get the bundle (Fleet's `doNotDeploy`).
    pub do_not_deploy: bool,
    pub good: Option<(String, String)>,
    pub render_error: Option<String>,
}

/// The content a cluster gets of a bundle: its own customisation's, or the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick<'a> {
    /// The customisation that matched, if any.
    pub customization: Option<&'a str>,
    pub good: Option<&'a (String, String)>,
    pub render_error: Option<&'a str>,
}

impl BundleInfo {
    /// Which variant of the bundle a targeted cluster gets: the first customisation
    /// whose target matches (one that names no cluster, selector or group matches
    /// nothing), else the default. `None` when that customisation says
    /// `doNotDeploy`.
    pub fn pick(&self, cluster: &ClusterInfo, groups: &[GroupInfo]) -> Option<Pick<'_>> {
        let matched = self.customizations.iter().find(|c| {
            let t = &c.target;
            let any = t.cluster_name.is_some()
                || t.cluster_selector.is_some()
                || t.cluster_group.is_some()
                || t.cluster_group_selector.is_some();
            any && target_matches(t, cluster, groups)
        });
        match matched {
            Some(c) if c.do_not_deploy => None,
            Some(c) => Some(Pick {
                customization: Some(&c.name),
                good: c.good.as_ref(),
                render_error: c.render_error.as_deref(),
            }),
            None => Some(Pick {
                customization: None,
                good: self.good.as_ref(),
                render_error: self.render_error.as_deref(),
            }),
        }
    }

    /// The assignment of this bundle to a cluster, if the cluster is targeted and
    /// not excluded by `doNotDeploy`.
    pub fn assignment(&self, cluster: &ClusterInfo, groups: &[GroupInfo]) -> Option<Assignment> {
        if !targets_match(&self.targets, cluster, groups) {
            return None;
        }
        let p = self.pick(cluster, groups)?;
        Some(Assignment {
            bundle: self.name.clone(),
            content_hash: p.good.map(|(h, _)| h.clone()),
            revision: p.good.map(|(_, r)| r.clone()).unwrap_or_default(),
            render_error: p.render_error.map(str::to_string),
            waiting_for: Vec::new(),
            variant: p.customization.unwrap_or_default().to_string(),
            held_back: None,
        })
    }
}

/// One bundle a cluster must run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Assignment {
    pub bundle: String,
    /// `None` when the bundle never rendered: nothing can be sent yet.
    pub content_hash: Option<String>,
    pub revision: String,
    pub render_error: Option<String>,
    /// Dependencies not `Ready` on the cluster (filled in by
    /// [`crate::depends::gate`]): while any remain, the content is held back.
    pub waiting_for: Vec<String>,
    /// Which variant of the bundle the cluster gets: "" for the default, else
    /// the target customisation's name.
    pub variant: String,
    /// Held back by a rollout (filled in by [`gate_rollouts`]): why. The agent
    /// keeps what it holds.
    pub held_back: Option<String>,
}

/// A bundle's rollout, as assignment needs it: the rollout and the contents it
/// moves between, per variant.
#[derive(Debug, Clone, Copy)]
pub struct RolloutGate<'a> {
    pub rollout: &'a crate::rollout::Rollout,
    /// The rollout's revision: content hash per variant.
    pub target: &'a BTreeMap<String, String>,
    /// The last revision that completed a rollout: content hash per variant.
    pub previous: &'a BTreeMap<String, String>,
}

/// Applies each bundle's rollout to a cluster's assignments: an admitted
/// cluster gets the rollout's revision, one not yet admitted keeps what it
/// holds (`held_back`: it shows `OutOfSync`; with nothing held it gets the
/// previous revision if there is one), and a rolled-back rollout sends the
/// previous revision. A bundle without a rollout is left as it is.
pub fn gate_rollouts<'a>(
    assignments: &mut [Assignment],
    cluster: &str,
    gate: impl Fn(&str) -> Option<RolloutGate<'a>>,
    held: impl Fn(&str) -> Option<(String, String)>,
) {
    use crate::rollout::{Decision, Phase};
    for a in assignments.iter_mut() {
        let Some(g) = gate(&a.bundle) else { continue };
        let previous = || {
            g.previous
                .get(&a.variant)
                .map(|h| (h.clone(), g.rollout.previous.clone().unwrap_or_default()))
        };
        match g.rollout.decision(cluster) {
            Decision::Revision => {
                if let Some(h) = g.target.get(&a.variant) {
                    a.content_hash = Some(h.clone());
                    a.revision = g.rollout.revision.clone();
                }
            }
            Decision::Previous => match previous() {
                Some((h, r)) => {
                    a.content_hash = Some(h);
                    a.revision = r;
                }
                // No earlier content of this variant: it keeps what it runs.
                None => {
                    a.content_hash = None;
                    a.held_back = Some(format!(
                        "rolled back from {}: no earlier revision of this variant, kept as it runs",
                        short(&g.rollout.revision)
                    ));
                }
            },
            Decision::Hold => {
                let why = match g.rollout.phase {
                    Phase::Paused => "the rollout is paused".to_string(),
                    Phase::Halted => format!("the rollout halted: {}", g.rollout.reason),
                    _ if g.rollout.reason.is_empty() => "its partition has not started".into(),
                    _ => g.rollout.reason.clone(),
                };
                a.held_back = Some(format!(
                    "held back by the rollout of {}: {why}",
                    short(&g.rollout.revision)
                ));
                if held(&a.bundle).is_some() {
                    // `sendable` keeps what the agent holds.
                    a.content_hash = None;
                } else if let Some((h, r)) = previous() {
                    a.content_hash = Some(h);
                    a.revision = r;
                } else {
                    a.content_hash = None;
                }
            }
        }
    }
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

/// Refuses every bundle whose name another source's bundle also has (see
/// `bundle::name_collisions`): each loses its content (nothing is sent under the
/// shared name, so nothing merges) and shows why, naming all holders. Collisions
/// within one source are refused when the source renders.
pub fn refuse_colliding_names(bundles: &mut [BundleInfo]) {
    let collisions = crate::bundle::name_collisions(
        bundles.iter().map(|b| (b.source.as_str(), b.path.as_str())),
    );
    // Only names held by more than one source matter here.
    for b in bundles.iter_mut() {
        let Some(holders) = collisions.get(&b.name) else {
            continue;
        };
        if !holders.iter().any(|h| h.source != b.source) {
            continue;
        }
        let reason = crate::bundle::collision_reason(&b.name, holders);
        b.good = None;
        b.render_error = Some(reason.clone());
        for c in &mut b.customizations {
            c.good = None;
            c.render_error = Some(reason.clone());
        }
    }
}

/// The bundles a cluster must run, sorted by name, one assignment per name.
/// Bundles that never rendered are included (the hub shows them as
/// `ErrApplied`) but carry no content hash.
pub fn assignments(
    cluster: &ClusterInfo,
    groups: &[GroupInfo],
    bundles: &[BundleInfo],
) -> Vec<Assignment> {
    let mut out: Vec<Assignment> = bundles
        .iter()
        .filter_map(|b| b.assignment(cluster, groups))
        .collect();
    out.sort();
    // Colliding names were refused (no content) by `refuse_colliding_names`.
    out.dedup_by(|a, b| a.bundle == b.bundle);
    out
}

/// What can be sent to the agent: assigned bundles that have content, as
/// (name, content hash, revision). A bundle waiting for its dependencies is not
/// sent, or, if the agent already holds some content of it (`held`: the hash and
/// revision it last acknowledged), stays at that content: waiting never removes
/// what runs. So does a bundle whose variant for this cluster has no good content
/// (it never rendered: a new customisation or Kubernetes-version twin whose first
/// render failed): the agent keeps what it runs until the variant renders.
pub fn sendable(
    assignments: &[Assignment],
    held: impl Fn(&str) -> Option<(String, String)>,
) -> Vec<(String, String, String)> {
    assignments
        .iter()
        .filter_map(|a| {
            let keep = || held(&a.bundle).map(|(h, r)| (a.bundle.clone(), h, r));
            if !a.waiting_for.is_empty() {
                return keep();
            }
            match &a.content_hash {
                Some(h) => Some((a.bundle.clone(), h.clone(), a.revision.clone())),
                None => keep(),
            }
        })
        .collect()
}

/// The state the hub shows for one assignment, given the hash the agent last
/// acknowledged for that bundle and its last report.
pub fn assignment_state(
    a: &Assignment,
    acked_hash: Option<&str>,
    reported: Option<&Reported>,
) -> (BundleState, String) {
    if let Some(why) = &a.held_back {
        return (BundleState::OutOfSync, why.clone());
    }
    let hash = a.content_hash.as_deref().unwrap_or_default();
    let acknowledged = !hash.is_empty() && acked_hash == Some(hash);
    if !a.waiting_for.is_empty() && !acknowledged && a.render_error.is_none() {
        return (
            BundleState::Pending,
            format!("waiting for {}", a.waiting_for.join(", ")),
        );
    }
    effective_state(hash, a.render_error.as_deref(), acknowledged, reported)
}

/// Counts states by name, as shown in `bundleCounts` / `clusterCounts`.
pub fn count_states(states: impl IntoIterator<Item = BundleState>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in states {
        *out.entry(s.as_str().to_string()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::parse_labels;
    use crate::selector::LabelSelector;

    fn cluster(name: &str, labels: &str) -> ClusterInfo {
        ClusterInfo {
            name: name.into(),
            labels: parse_labels(labels).unwrap(),
        }
    }

    fn bundle(name: &str, targets: Vec<Target>) -> BundleInfo {
        BundleInfo {
            name: name.into(),
            source: "src".into(),
            path: String::new(),
            good: Some((format!("hash-{name}"), "c1".into())),
            render_error: None,
            targets,
            customizations: vec![],
            depends_on: vec![],
            labels: Default::default(),
        }
    }

    fn sel(s: &str) -> Target {
        Target::selector(LabelSelector::parse(s).unwrap())
    }

    #[test]
    fn assigns_by_targets_and_groups() {
        let groups = vec![GroupInfo {
            name: "edge".into(),
            selector: LabelSelector::parse("tier=edge").unwrap(),
            labels: Default::default(),
        }];
        let bundles = vec![
            bundle("prod", vec![sel("env=prod")]),
            bundle("all", vec![]),
            bundle(
                "edge",
                vec![Target {
                    cluster_group: Some("edge".into()),
                    ..Default::default()
                }],
            ),
        ];
        let names = |c: &ClusterInfo| -> Vec<String> {
            assignments(c, &groups, &bundles)
                .into_iter()
                .map(|a| a.bundle)
                .collect()
        };
        assert_eq!(names(&cluster("a", "env=prod")), ["all", "prod"]);
        assert_eq!(names(&cluster("b", "env=dev,tier=edge")), ["all", "edge"]);
        assert_eq!(
            names(&cluster("c", "env=prod,tier=edge")),
            ["all", "edge", "prod"]
        );
        assert_eq!(names(&cluster("d", "")), ["all"]);
    }

    #[test]
    fn render_failures_keep_last_good_content() {
        let mut failed = bundle("bad", vec![]);
        failed.render_error = Some("a.yaml:3: invalid YAML".into());
        let mut never = bundle("never", vec![]);
        never.good = None;
        never.render_error = Some("b.yaml: kind is required".into());
        let a = assignments(&cluster("x", ""), &[], &[failed, never]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].content_hash.as_deref(), Some("hash-bad"));
        assert_eq!(a[0].revision, "c1");
        assert_eq!(a[1].content_hash, None);
        let send = sendable(&a, |_| None);
        assert_eq!(send, [("bad".into(), "hash-bad".into(), "c1".into())]);
        let (state, msg) = assignment_state(&a[0], Some("hash-bad"), None);
        assert_eq!(state, BundleState::ErrApplied);
        assert!(msg.contains("a.yaml:3"));
    }

    #[test]
    fn names_shared_across_sources_are_refused_for_all() {
        let mut a = bundle("a-b-c", vec![]);
        a.source = "a-b".into();
        a.path = "c".into();
        let mut b = bundle("a-b-c", vec![]);
        b.source = "a".into();
        b.path = "b/c".into();
        let other = bundle("other", vec![]);
        let mut all = vec![a, b, other];
        refuse_colliding_names(&mut all);
        for x in &all[..2] {
            assert_eq!(x.good, None);
            let e = x.render_error.as_deref().unwrap();
            assert!(
                e.contains("c of source a-b") && e.contains("b/c of source a"),
                "{e}"
            );
        }
        assert!(all[2].good.is_some() && all[2].render_error.is_none());
        let got = assignments(&cluster("x", ""), &[], &all);
        assert_eq!(got.len(), 2, "one assignment per name: {got:?}");
        let (state, msg) = assignment_state(&got[0], None, None);
        assert_eq!(state, BundleState::ErrApplied);
        assert!(msg.contains("a-b-c"));
        assert_eq!(sendable(&got, |_| None).len(), 1);
    }

    #[test]
    fn states_follow_ack_and_reports() {
        let a = &assignments(&cluster("x", ""), &[], &[bundle("b", vec![])])[0];
        assert_eq!(assignment_state(a, None, None).0, BundleState::Pending);
        assert_eq!(
            assignment_state(a, Some("old"), None).0,
            BundleState::Pending
        );
        assert_eq!(
            assignment_state(a, Some("hash-b"), None).0,
            BundleState::WaitApplied
        );
        let r = Reported {
            content_hash: "hash-b".into(),
            revision: "c1".into(),
            state: BundleState::Ready,
            message: String::new(),
        };
        assert_eq!(
            assignment_state(a, Some("hash-b"), Some(&r)).0,
            BundleState::Ready
        );
        let counts = count_states([BundleState::Ready, BundleState::Ready, BundleState::Pending]);
        assert_eq!(counts.get("Ready"), Some(&2));
        assert_eq!(counts.get("Pending"), Some(&1));
    }

    #[test]
    fn customisations_pick_content_per_cluster() {
        let custom = |name: &str, target: Target, dnd: bool| CustomizationInfo {
            name: name.into(),
            target,
            do_not_deploy: dnd,
            good: Some((format!("hash-{name}"), "c1".into())),
            render_error: None,
        };
        let mut b = bundle("web", vec![]);
        b.customizations = vec![
            custom("prod", sel("env=prod"), false),
            custom("prod-eu", sel("env=prod,region=eu"), false),
            custom("off", sel("env=off"), true),
            custom("empty", Target::default(), false),
        ];
        let hash = |b: &BundleInfo, labels: &str| {
            assignments(&cluster("x", labels), &[], std::slice::from_ref(b))
                .first()
                .map(|a| a.content_hash.clone().unwrap_or_default())
        };
        // First match wins; no match is the default; an empty target matches nothing.
        assert_eq!(hash(&b, "env=prod,region=eu").as_deref(), Some("hash-prod"));
        assert_eq!(hash(&b, "env=dev").as_deref(), Some("hash-web"));
        assert_eq!(hash(&b, "env=off"), None);
        let by_name = CustomizationInfo {
            target: Target {
                cluster_name: Some("x".into()),
                ..Default::default()
            },
            ..custom("named", Target::default(), false)
        };
        b.customizations.insert(0, by_name);
        assert_eq!(hash(&b, "env=prod").as_deref(), Some("hash-named"));
    }

    #[test]
    fn a_variant_that_never_rendered_keeps_what_the_agent_holds() {
        let failed = Assignment {
            bundle: "web".into(),
            content_hash: None,
            revision: String::new(),
            render_error: Some("helm: size is required".into()),
            waiting_for: vec![],
            variant: String::new(),
            held_back: None,
        };
        let held = |b: &str| (b == "web").then(|| ("h-old".to_string(), "c-old".to_string()));
        assert_eq!(
            sendable(std::slice::from_ref(&failed), held),
            vec![("web".to_string(), "h-old".to_string(), "c-old".to_string())],
            "a failing render must not prune what runs"
        );
        // Nothing held (a new bundle that fails): nothing to send.
        assert!(sendable(&[failed], |_| None).is_empty());
    }
}
