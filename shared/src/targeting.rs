//! Which clusters get which bundles: targets on sources (and, later, bundles)
//! matched against cluster labels and cluster groups.

use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::objects::Target;
use crate::selector::LabelSelector;

/// What targeting needs to know of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub labels: Labels,
}

/// What targeting needs to know of a cluster group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub selector: LabelSelector,
    pub labels: Labels,
}

impl GroupInfo {
    pub fn contains(&self, cluster: &ClusterInfo) -> bool {
        self.selector.matches(&cluster.labels)
    }
}

/// One target: every field it sets must hold (as in Fleet).
pub fn target_matches(target: &Target, cluster: &ClusterInfo, groups: &[GroupInfo]) -> bool {
    if let Some(name) = &target.cluster_name {
        if name != &cluster.name {
            return false;
        }
    }
    if let Some(sel) = &target.cluster_selector {
        if !sel.matches(&cluster.labels) {
            return false;
        }
    }
    if let Some(group) = &target.cluster_group {
        let member = groups
            .iter()
            .any(|g| &g.name == group && g.contains(cluster));
        if !member {
            return false;
        }
    }
    if let Some(sel) = &target.cluster_group_selector {
        let member = groups
            .iter()
            .any(|g| sel.matches(&g.labels) && g.contains(cluster));
        if !member {
            return false;
        }
    }
    true
}

/// A list of targets matches when any one does. No targets at all means every
/// cluster (documented: unlike Fleet, which then picks its `default` group, Flotilla
/// has no local cluster to fall back to).
pub fn targets_match(targets: &[Target], cluster: &ClusterInfo, groups: &[GroupInfo]) -> bool {
    targets.is_empty() || targets.iter().any(|t| target_matches(t, cluster, groups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::parse_labels;

    fn cluster(name: &str, labels: &str) -> ClusterInfo {
        ClusterInfo {
            name: name.into(),
            labels: parse_labels(labels).unwrap(),
        }
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap()
    }

    #[test]
    fn selectors_groups_and_names() {
        let groups = vec![GroupInfo {
            name: "edge".into(),
            selector: sel("tier=edge"),
            labels: parse_labels("kind=site").unwrap(),
        }];
        let a = cluster("a", "env=prod,tier=edge");
        let b = cluster("b", "env=dev");
        let by_sel = Target::selector(sel("env=prod"));
        assert!(target_matches(&by_sel, &a, &groups));
        assert!(!target_matches(&by_sel, &b, &groups));
        let by_group = Target {
            cluster_group: Some("edge".into()),
            ..Default::default()
        };
        assert!(target_matches(&by_group, &a, &groups));
        assert!(!target_matches(&by_group, &b, &groups));
        let by_group_sel = Target {
            cluster_group_selector: Some(sel("kind=site")),
            ..Default::default()
        };
        assert!(target_matches(&by_group_sel, &a, &groups));
        assert!(!target_matches(&by_group_sel, &b, &groups));
        let by_name = Target {
            cluster_name: Some("b".into()),
            ..Default::default()
        };
        assert!(target_matches(&by_name, &b, &groups));
        assert!(!target_matches(&by_name, &a, &groups));
        // fields within one target are ANDed
        let both = Target {
            cluster_name: Some("a".into()),
            cluster_selector: Some(sel("env=dev")),
            ..Default::default()
        };
        assert!(!target_matches(&both, &a, &groups));
        // a list is ORed; empty means everyone
        assert!(targets_match(
            &[by_name.clone(), by_sel.clone()],
            &a,
            &groups
        ));
        assert!(targets_match(&[], &b, &groups));
    }
}
