//! The fleet index against a computation from scratch: for random fleets
//! (clusters with labels, groups, sources' bundles with targets and target
//! customisations, colliding names) and random sequences of changes (commits,
//! relabels, enrolments and deletions, group edits, bundles added and removed),
//! every cluster's indexed assignments equal `assign::assignments` over the
//! same inputs, after every change; and a change reports as changed exactly
//! the clusters whose assignments moved.

use std::collections::BTreeMap;

use flotilla_shared::assign::{self, BundleInfo, CustomizationInfo};
use flotilla_shared::index::Index;
use flotilla_shared::labels::Labels;
use flotilla_shared::objects::Target;
use flotilla_shared::selector::LabelSelector;
use flotilla_shared::targeting::{ClusterInfo, GroupInfo};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("FLOTILLA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

const KEYS: [&str; 3] = ["env", "region", "tier"];
const VALUES: [&str; 3] = ["a", "b", "c"];

fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(str::to_string),
        prop::sample::select(&VALUES[..]).prop_map(str::to_string),
        0..3,
    )
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    labels().prop_map(|match_labels| LabelSelector {
        match_labels,
        ..LabelSelector::default()
    })
}

fn target() -> impl Strategy<Value = Target> {
    (
        prop::option::of(0..6usize),
        prop::option::of(selector()),
        prop::option::of(0..3usize),
        prop::option::of(selector()),
    )
        .prop_map(|(name, sel, group, group_sel)| Target {
            name: None,
            cluster_name: name.map(|i| format!("c{i}")),
            cluster_selector: sel,
            cluster_group: group.map(|i| format!("g{i}")),
            cluster_group_selector: group_sel,
        })
}

fn good() -> impl Strategy<Value = Option<(String, String)>> {
    prop::option::of((0..4u8, 0..3u8).prop_map(|(h, c)| (format!("h{h}"), format!("c{c}"))))
}

fn customization() -> impl Strategy<Value = CustomizationInfo> {
    (0..3u8, target(), any::<bool>(), good()).prop_map(|(n, target, dnd, good)| CustomizationInfo {
        name: format!("v{n}"),
        target,
        do_not_deploy: dnd,
        good,
        render_error: None,
    })
}

/// A bundle; names are few, so that sources collide.
fn bundle() -> impl Strategy<Value = BundleInfo> {
    (
        0..5u8,
        0..2u8,
        prop::collection::vec(target(), 0..3),
        good(),
        prop::collection::vec(customization(), 0..2),
    )
        .prop_map(|(n, source, targets, good, customizations)| BundleInfo {
            name: format!("b{n}"),
            source: format!("s{source}"),
            path: format!("b{n}"),
            render_error: good.is_none().then(|| "failed".to_string()),
            good,
            targets,
            customizations,
            depends_on: Vec::new(),
            labels: Labels::new(),
        })
}

fn bundles() -> impl Strategy<Value = Vec<BundleInfo>> {
    prop::collection::vec(bundle(), 0..6).prop_map(|mut all| {
        // As the hub builds them: one bundle per (source, path), collisions
        // between sources refused.
        all.sort_by(|a, b| (&a.source, &a.path).cmp(&(&b.source, &b.path)));
        all.dedup_by(|a, b| a.source == b.source && a.path == b.path);
        assign::refuse_colliding_names(&mut all);
        all
    })
}

fn groups() -> impl Strategy<Value = Vec<GroupInfo>> {
    prop::collection::btree_map(0..3usize, (selector(), labels()), 0..3).prop_map(|m| {
        m.into_iter()
            .map(|(i, (selector, labels))| GroupInfo {
                name: format!("g{i}"),
                selector,
                labels,
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Change {
    Cluster(usize, Labels),
    Delete(usize),
    Groups(Vec<GroupInfo>),
    Bundles(Vec<BundleInfo>),
    /// A commit: every bundle of one source moves to a new commit.
    Commit(u8, u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0..6usize, labels()).prop_map(|(i, l)| Change::Cluster(i, l)),
        (0..6usize).prop_map(Change::Delete),
        groups().prop_map(Change::Groups),
        bundles().prop_map(Change::Bundles),
        (0..2u8, 0..4u8).prop_map(|(s, h)| Change::Commit(s, h)),
    ]
}

fn check(ix: &Index, clusters: &BTreeMap<String, ClusterInfo>) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        ix.clusters().collect::<Vec<_>>(),
        clusters.keys().map(String::as_str).collect::<Vec<_>>()
    );
    for (name, info) in clusters {
        let scratch = assign::assignments(info, ix.groups(), ix.bundles());
        prop_assert_eq!(ix.assignments(name), scratch, "cluster {}", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn index_equals_a_computation_from_scratch(
        initial in prop::collection::vec(labels(), 0..6),
        groups in groups(),
        bundles in bundles(),
        changes in prop::collection::vec(change(), 0..12),
    ) {
        let mut ix = Index::new(groups, bundles);
        let mut clusters: BTreeMap<String, ClusterInfo> = BTreeMap::new();
        for (i, labels) in initial.into_iter().enumerate() {
            let info = ClusterInfo { name: format!("c{i}"), labels };
            clusters.insert(info.name.clone(), info.clone());
            ix.set_cluster(info);
        }
        check(&ix, &clusters)?;
        for change in changes {
            let before: BTreeMap<String, Vec<assign::Assignment>> =
                clusters.keys().map(|c| (c.clone(), ix.assignments(c))).collect();
            let out = match change {
                Change::Cluster(i, labels) => {
                    let info = ClusterInfo { name: format!("c{i}"), labels };
                    clusters.insert(info.name.clone(), info.clone());
                    ix.set_cluster(info)
                }
                Change::Delete(i) => {
                    clusters.remove(&format!("c{i}"));
                    ix.remove_cluster(&format!("c{i}"))
                }
                Change::Groups(g) => ix.set_groups(g),
                Change::Bundles(b) => ix.set_bundles(b),
                Change::Commit(source, hash) => {
                    let mut b = ix.bundles().to_vec();
                    for x in b.iter_mut().filter(|x| x.source == format!("s{source}")) {
                        if x.good.is_some() {
                            x.good = Some((format!("h{hash}"), "next".to_string()));
                        }
                    }
                    ix.set_bundles(b)
                }
            };
            check(&ix, &clusters)?;
            prop_assert!(out.changed.iter().all(|c| out.recomputed.contains(c)
                || !clusters.contains_key(c)));
            for (name, was) in &before {
                let now = clusters.get(name).map(|_| ix.assignments(name));
                let moved = now.as_ref() != Some(was);
                prop_assert_eq!(
                    out.changed.contains(name),
                    moved,
                    "cluster {} changed: {}", name, moved
                );
            }
        }
    }
}
