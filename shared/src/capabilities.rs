//! The target cluster's Kubernetes version as Helm's `.Capabilities.KubeVersion`:
//! Helm bundles render once per Kubernetes version in the fleet, and a cluster
//! gets the render for its version. Expressed with the existing variant machinery:
//! each Helm variant gets a version-pinned twin whose target also requires the
//! cluster label [`KUBE_VERSION_LABEL`], which the hub sets from what the agent
//! reported.

use crate::labels::validate_value;
use crate::objects::Target;
use crate::selector::LabelSelector;

/// Label the hub gives every cluster (for matching only; it is not stored or shown
/// with the cluster's own labels) with the Kubernetes version its agent reported.
pub const KUBE_VERSION_LABEL: &str = "flotilla.io/kubernetes-version";

/// The label value for a version (`v1.34.4`; `+` and other characters labels do
/// not allow become `_`), or `None` for an empty or unusable one.
pub fn label_value(version: &str) -> Option<String> {
    let v: String = version
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let v = v
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    (!v.is_empty() && validate_value(&v).is_ok()).then_some(v)
}

/// `target`, narrowed to clusters of Kubernetes `version`. `None` when the version
/// cannot be a label value.
pub fn versioned_target(target: &Target, version: &str) -> Option<Target> {
    let value = label_value(version)?;
    let mut t = target.clone();
    let mut sel = t
        .cluster_selector
        .take()
        .unwrap_or_else(LabelSelector::everything);
    sel.match_labels
        .insert(KUBE_VERSION_LABEL.to_string(), value);
    t.cluster_selector = Some(sel);
    Some(t)
}

/// The Kubernetes versions to render for: distinct, usable, sorted.
pub fn versions<'a>(reported: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = reported
        .into_iter()
        .map(str::trim)
        .filter(|v| label_value(v).is_some())
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Labels;

    #[test]
    fn label_values() {
        assert_eq!(label_value("v1.34.4").as_deref(), Some("v1.34.4"));
        assert_eq!(label_value("v1.30.2+k3s1").as_deref(), Some("v1.30.2_k3s1"));
        assert_eq!(label_value(""), None);
        assert_eq!(label_value("+"), None);
        assert_eq!(
            versions(["v1.2.3", "", "v1.2.3", "v1.0.0"]),
            ["v1.0.0", "v1.2.3"]
        );
    }

    #[test]
    fn versioned_targets_add_the_version_to_the_selector() {
        let labels = |v: &str| -> Labels {
            [
                ("env".to_string(), "prod".to_string()),
                (KUBE_VERSION_LABEL.to_string(), v.to_string()),
            ]
            .into()
        };
        let t = versioned_target(
            &Target::selector(LabelSelector::parse("env=prod").unwrap()),
            "v1.29.0",
        )
        .unwrap();
        let sel = t.cluster_selector.unwrap();
        assert!(sel.matches(&labels("v1.29.0")));
        assert!(!sel.matches(&labels("v1.30.0")));
        // The default variant's twin: any cluster of that version.
        let t = versioned_target(&Target::default(), "v1.29.0").unwrap();
        assert!(t.cluster_selector.unwrap().matches(&labels("v1.29.0")));
    }
}
