//! The fleet index: each cluster's targeted assignments (which bundles it gets,
//! with which content), kept between changes and recomputed only for the
//! clusters a change concerns.
//!
//! What it holds is what [`assign::assignments`] computes from scratch; the
//! property test `index_equals_a_computation_from_scratch` holds it to that.
//! The gates that read agents' reports and rollouts (`depends::gate`,
//! `assign::gate_rollouts`) are applied by the caller on top: they change with
//! every report, and cost one pass over the cluster's own assignments.
//!
//! What each kind of change recomputes:
//! - a cluster enrolled, relabelled, or its profile (Kubernetes version, API
//!   versions) changed: that cluster;
//! - a group added, removed or changed: the clusters it contained before or
//!   contains now (targeting by group needs membership);
//! - bundles changed (a commit, a source's targets, a source added or deleted,
//!   a name collision between sources): the clusters that had one of the changed
//!   bundles, or that the changed bundles' targets match now, and for those only
//!   the changed bundles are assigned again. Matching the changed bundles'
//!   targets is evaluated for every cluster (a label selector on a map), which
//!   is far cheaper than assigning every bundle.
//!
//! Identical assignments (the same bundle, variant and content for many
//! clusters) are stored once and shared.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use crate::assign::{self, Assignment, BundleInfo};
use crate::targeting::{ClusterInfo, GroupInfo};

/// A cluster's targeted assignments, sorted by bundle name, one per name.
pub type Targeted = Arc<[Arc<Assignment>]>;

/// What a change did to the index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Clusters whose assignments were computed again (all of them, or those
    /// of the changed bundles).
    pub recomputed: BTreeSet<String>,
    /// Of those, the clusters whose assignments differ from before.
    pub changed: BTreeSet<String>,
}

impl Outcome {
    fn note(&mut self, cluster: &str, changed: bool) {
        self.recomputed.insert(cluster.to_string());
        if changed {
            self.changed.insert(cluster.to_string());
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: ClusterInfo,
    targeted: Targeted,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Index {
    groups: Arc<Vec<GroupInfo>>,
    bundles: Arc<Vec<BundleInfo>>,
    clusters: BTreeMap<String, Entry>,
    interned: HashSet<Arc<Assignment>>,
}

impl Index {
    /// An index of no cluster over these groups and bundles (bundles as
    /// `assign::assignments` takes them: colliding names already refused).
    pub fn new(groups: Vec<GroupInfo>, bundles: Vec<BundleInfo>) -> Index {
        Index {
            groups: Arc::new(groups),
            bundles: Arc::new(bundles),
            ..Index::default()
        }
    }

    pub fn groups(&self) -> &Arc<Vec<GroupInfo>> {
        &self.groups
    }

    pub fn bundles(&self) -> &Arc<Vec<BundleInfo>> {
        &self.bundles
    }

    /// The clusters indexed, by name.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.clusters.keys().map(String::as_str)
    }

    /// The cluster's targeted assignments; `None` for a cluster not indexed.
    pub fn targeted(&self, cluster: &str) -> Option<&Targeted> {
        self.clusters.get(cluster).map(|e| &e.targeted)
    }

    /// The cluster's targeted assignments, owned (for the gates to mark).
    pub fn assignments(&self, cluster: &str) -> Vec<Assignment> {
        self.targeted(cluster)
            .map(|t| t.iter().map(|a| Assignment::clone(a)).collect())
            .unwrap_or_default()
    }

    /// Whether `bundle` is assigned to `cluster`.
    pub fn is_targeted(&self, cluster: &str, bundle: &str) -> bool {
        self.targeted(cluster)
            .is_some_and(|t| position(t, bundle).is_ok())
    }

    /// The clusters `bundle` is assigned to.
    pub fn holders<'a>(&'a self, bundle: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.clusters
            .iter()
            .filter(move |(_, e)| position(&e.targeted, bundle).is_ok())
            .map(|(name, _)| name.as_str())
    }

    /// A cluster enrolled, or its labels or profile changed: it is recomputed
    /// (unless nothing of what matching sees changed).
    pub fn set_cluster(&mut self, info: ClusterInfo) -> Outcome {
        let mut out = Outcome::default();
        if self
            .clusters
            .get(&info.name)
            .is_some_and(|e| e.info == info)
        {
            return out;
        }
        let targeted = self.compute(&info);
        let name = info.name.clone();
        let previous = self.clusters.insert(name.clone(), Entry { info, targeted });
        let changed = previous.is_none_or(|p| p.targeted != self.clusters[&name].targeted);
        out.note(&name, changed);
        self.sweep();
        out
    }

    /// A cluster left the fleet.
    pub fn remove_cluster(&mut self, name: &str) -> Outcome {
        let mut out = Outcome::default();
        if self.clusters.remove(name).is_some() {
            out.changed.insert(name.to_string());
            self.sweep();
        }
        out
    }

    /// The groups are now `groups`: the members (before or after) of each group
    /// that was added, removed or changed are recomputed.
    pub fn set_groups(&mut self, groups: Vec<GroupInfo>) -> Outcome {
        let before: BTreeMap<&str, &GroupInfo> =
            self.groups.iter().map(|g| (g.name.as_str(), g)).collect();
        let after: BTreeMap<&str, &GroupInfo> =
            groups.iter().map(|g| (g.name.as_str(), g)).collect();
        let touched: Vec<&GroupInfo> = before
            .keys()
            .chain(after.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|n| before.get(*n) != after.get(*n))
            .flat_map(|n| before.get(n).into_iter().chain(after.get(n)).copied())
            .collect();
        let concerned: Vec<String> = self
            .clusters
            .iter()
            .filter(|(_, e)| touched.iter().any(|g| g.contains(&e.info)))
            .map(|(n, _)| n.clone())
            .collect();
        drop(touched);
        self.groups = Arc::new(groups);
        let mut out = Outcome::default();
        for name in concerned {
            let info = self.clusters[&name].info.clone();
            let targeted = self.compute(&info);
            let entry = self.clusters.get_mut(&name).expect("indexed");
            let changed = entry.targeted != targeted;
            entry.targeted = targeted;
            out.note(&name, changed);
        }
        self.sweep();
        out
    }

    /// The bundles are now `bundles` (colliding names refused): for the bundle
    /// names whose bundles changed, the clusters that had one or get one now
    /// are assigned those names again.
    pub fn set_bundles(&mut self, bundles: Vec<BundleInfo>) -> Outcome {
        let names = |all: &[BundleInfo]| {
            let mut by: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, b) in all.iter().enumerate() {
                by.entry(b.name.clone()).or_default().push(i);
            }
            by
        };
        let (before, after) = (names(&self.bundles), names(&bundles));
        let changed_names: Vec<String> = before
            .keys()
            .chain(after.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|n| named(&before, &self.bundles, n) != named(&after, &bundles, n))
            .cloned()
            .collect();
        self.bundles = Arc::new(bundles);
        let mut out = Outcome::default();
        if changed_names.is_empty() {
            return out;
        }
        let changed: BTreeSet<&str> = changed_names.iter().map(String::as_str).collect();
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            let entry = &self.clusters[&name];
            let had = entry
                .targeted
                .iter()
                .any(|a| changed.contains(a.bundle.as_str()));
            let fresh: Vec<Assignment> = changed_names
                .iter()
                .filter_map(|n| {
                    after
                        .get(n)
                        .into_iter()
                        .flatten()
                        .filter_map(|i| self.bundles[*i].assignment(&entry.info, &self.groups))
                        .min()
                })
                .collect();
            if !had && fresh.is_empty() {
                continue;
            }
            let mut next: Vec<Arc<Assignment>> = entry
                .targeted
                .iter()
                .filter(|a| !changed.contains(a.bundle.as_str()))
                .cloned()
                .collect();
            next.extend(fresh.into_iter().map(|a| self.intern(a)));
            next.sort_by(|a, b| a.bundle.cmp(&b.bundle));
            let next: Targeted = next.into();
            let entry = self.clusters.get_mut(&name).expect("indexed");
            let differs = entry.targeted != next;
            entry.targeted = next;
            out.note(&name, differs);
        }
        self.sweep();
        out
    }

    fn compute(&mut self, info: &ClusterInfo) -> Targeted {
        let computed = assign::assignments(info, &self.groups, &self.bundles);
        computed
            .into_iter()
            .map(|a| self.intern(a))
            .collect::<Vec<_>>()
            .into()
    }

    fn intern(&mut self, a: Assignment) -> Arc<Assignment> {
        if let Some(shared) = self.interned.get(&a) {
            return shared.clone();
        }
        let shared = Arc::new(a);
        self.interned.insert(shared.clone());
        shared
    }

    /// Forgets assignments no cluster holds any more.
    fn sweep(&mut self) {
        self.interned.retain(|a| Arc::strong_count(a) > 1);
    }
}

/// The bundles named `name`, by reference.
fn named<'a>(
    by: &BTreeMap<String, Vec<usize>>,
    all: &'a [BundleInfo],
    name: &str,
) -> Option<Vec<&'a BundleInfo>> {
    by.get(name).map(|ix| ix.iter().map(|i| &all[*i]).collect())
}

fn position(targeted: &[Arc<Assignment>], bundle: &str) -> Result<usize, usize> {
    targeted.binary_search_by(|a| a.bundle.as_str().cmp(bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::parse_labels;
    use crate::objects::Target;
    use crate::selector::LabelSelector;

    fn cluster(name: &str, labels: &str) -> ClusterInfo {
        ClusterInfo {
            name: name.into(),
            labels: parse_labels(labels).unwrap(),
        }
    }

    fn selector(s: &str) -> LabelSelector {
        LabelSelector {
            match_labels: parse_labels(s).unwrap(),
            ..LabelSelector::default()
        }
    }

    fn group(name: &str, sel: &str, labels: &str) -> GroupInfo {
        GroupInfo {
            name: name.into(),
            selector: selector(sel),
            labels: parse_labels(labels).unwrap(),
        }
    }

    fn bundle(name: &str, source: &str, targets: Vec<Target>, hash: &str) -> BundleInfo {
        BundleInfo {
            name: name.into(),
            source: source.into(),
            path: name.into(),
            good: Some((hash.into(), "c1".into())),
            render_error: None,
            targets,
            customizations: Vec::new(),
            depends_on: Vec::new(),
            labels: Default::default(),
        }
    }

    fn by_selector(s: &str) -> Target {
        Target {
            cluster_selector: Some(selector(s)),
            ..Target::default()
        }
    }

    fn by_group(g: &str) -> Target {
        Target {
            cluster_group: Some(g.into()),
            ..Target::default()
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Four clusters: two in `prod` (one in the `eu` group), two in `dev`.
    fn fleet() -> Index {
        let mut ix = Index::new(
            vec![group("eu", "region=eu", "tier=one")],
            vec![
                bundle("web", "apps", vec![by_selector("env=prod")], "h-web"),
                bundle("dev-tools", "apps", vec![by_selector("env=dev")], "h-dev"),
                bundle("eu-only", "regional", vec![by_group("eu")], "h-eu"),
            ],
        );
        for c in [
            cluster("p1", "env=prod,region=eu"),
            cluster("p2", "env=prod,region=us"),
            cluster("d1", "env=dev,region=us"),
            cluster("d2", "env=dev,region=ap"),
        ] {
            ix.set_cluster(c);
        }
        ix
    }

    fn names(ix: &Index, cluster: &str) -> Vec<String> {
        ix.targeted(cluster)
            .unwrap()
            .iter()
            .map(|a| a.bundle.clone())
            .collect()
    }

    #[test]
    fn each_kind_of_change_recomputes_exactly_the_clusters_it_concerns() {
        struct Case {
            what: &'static str,
            change: fn(&mut Index) -> Outcome,
            recomputed: &'static [&'static str],
            changed: &'static [&'static str],
        }
        let cases = [
            Case {
                what: "a commit to a bundle of prod clusters",
                change: |ix| {
                    let mut b = ix.bundles().to_vec();
                    b[0].good = Some(("h-web-2".into(), "c2".into()));
                    ix.set_bundles(b)
                },
                recomputed: &["p1", "p2"],
                changed: &["p1", "p2"],
            },
            Case {
                what: "a commit that changes nothing",
                change: |ix| {
                    let b = ix.bundles().to_vec();
                    ix.set_bundles(b)
                },
                recomputed: &[],
                changed: &[],
            },
            Case {
                what: "a source's targets move a bundle from dev to prod",
                change: |ix| {
                    let mut b = ix.bundles().to_vec();
                    b[1].targets = vec![by_selector("env=prod")];
                    ix.set_bundles(b)
                },
                recomputed: &["d1", "d2", "p1", "p2"],
                changed: &["d1", "d2", "p1", "p2"],
            },
            Case {
                what: "a new bundle for one cluster by name",
                change: |ix| {
                    let mut b = ix.bundles().to_vec();
                    let only = Target {
                        cluster_name: Some("d2".into()),
                        ..Target::default()
                    };
                    b.push(bundle("debug", "ops", vec![only], "h-dbg"));
                    ix.set_bundles(b)
                },
                recomputed: &["d2"],
                changed: &["d2"],
            },
            Case {
                what: "a bundle removed",
                change: |ix| {
                    let mut b = ix.bundles().to_vec();
                    b.remove(2);
                    ix.set_bundles(b)
                },
                recomputed: &["p1"],
                changed: &["p1"],
            },
            Case {
                what: "a cluster relabelled",
                change: |ix| ix.set_cluster(cluster("d1", "env=prod,region=us")),
                recomputed: &["d1"],
                changed: &["d1"],
            },
            Case {
                what: "a label no target reads",
                change: |ix| ix.set_cluster(cluster("d1", "env=dev,region=us,team=a")),
                recomputed: &["d1"],
                changed: &[],
            },
            Case {
                what: "the same labels again",
                change: |ix| ix.set_cluster(cluster("d1", "env=dev,region=us")),
                recomputed: &[],
                changed: &[],
            },
            Case {
                what: "a cluster enrolled",
                change: |ix| ix.set_cluster(cluster("p3", "env=prod,region=eu")),
                recomputed: &["p3"],
                changed: &["p3"],
            },
            Case {
                what: "a group's selector widened to another region",
                change: |ix| {
                    let mut g = ix.groups().to_vec();
                    g[0].selector.match_labels = parse_labels("env=prod").unwrap();
                    ix.set_groups(g)
                },
                // p1 was in it, p1 and p2 are now: only p2 gets eu-only.
                recomputed: &["p1", "p2"],
                changed: &["p2"],
            },
            Case {
                what: "a group added that no target names",
                change: |ix| {
                    let mut g = ix.groups().to_vec();
                    g.push(group("ap", "region=ap", ""));
                    ix.set_groups(g)
                },
                recomputed: &["d2"],
                changed: &[],
            },
            Case {
                what: "the group removed",
                change: |ix| ix.set_groups(Vec::new()),
                recomputed: &["p1"],
                changed: &["p1"],
            },
        ];
        for case in cases {
            let mut ix = fleet();
            let out = (case.change)(&mut ix);
            assert_eq!(out.recomputed, set(case.recomputed), "{}", case.what);
            assert_eq!(out.changed, set(case.changed), "{}", case.what);
            for c in ix.clusters.values() {
                let scratch = assign::assignments(&c.info, ix.groups(), ix.bundles());
                assert_eq!(ix.assignments(&c.info.name), scratch, "{}", case.what);
            }
        }
    }

    #[test]
    fn lookups_and_removal() {
        let mut ix = fleet();
        assert_eq!(names(&ix, "p1"), ["eu-only", "web"]);
        assert!(ix.is_targeted("p2", "web"));
        assert!(!ix.is_targeted("p2", "eu-only"));
        assert!(!ix.is_targeted("nobody", "web"));
        assert_eq!(ix.holders("web").collect::<Vec<_>>(), ["p1", "p2"]);
        assert_eq!(ix.remove_cluster("p2").changed, set(&["p2"]));
        assert_eq!(ix.holders("web").collect::<Vec<_>>(), ["p1"]);
        assert!(ix.remove_cluster("p2").changed.is_empty());
    }

    #[test]
    fn identical_assignments_are_stored_once() {
        let mut ix = fleet();
        for i in 0..100 {
            ix.set_cluster(cluster(&format!("x{i}"), "env=prod,region=us"));
        }
        let first = ix.targeted("x0").unwrap()[0].clone();
        let last = ix.targeted("x99").unwrap()[0].clone();
        assert!(Arc::ptr_eq(&first, &last));
        drop((first, last));
        // One per (bundle, content): web, dev-tools, eu-only.
        assert_eq!(ix.interned.len(), 3);
        let mut b = ix.bundles().to_vec();
        b[0].good = Some(("h-web-2".into(), "c2".into()));
        ix.set_bundles(b);
        assert_eq!(ix.interned.len(), 3, "the old content of web is forgotten");
    }
}
