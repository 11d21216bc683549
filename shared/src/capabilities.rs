//! The target cluster's Kubernetes version and API versions as Helm's
//! `.Capabilities.KubeVersion` and `.Capabilities.APIVersions`: Helm bundles render
//! once per capability profile (version, API-version set) in the fleet, and a
//! cluster gets the render for its own profile. Expressed with the existing variant
//! machinery: each Helm variant gets a profile-pinned twin whose target also
//! requires the cluster labels [`KUBE_VERSION_LABEL`] and [`API_VERSIONS_LABEL`],
//! which the hub sets from what the agent reported.

use sha2::{Digest, Sha256};

use crate::labels::{validate_value, Labels};
use crate::objects::Target;
use crate::selector::LabelSelector;

/// Label the hub gives every cluster (for matching only; it is not stored or shown
/// with the cluster's own labels) with the Kubernetes version its agent reported.
pub const KUBE_VERSION_LABEL: &str = "flotilla.io/kubernetes-version";

/// Label the hub gives every cluster that reported a Kubernetes version (for
/// matching only, like [`KUBE_VERSION_LABEL`]): a hash of its API-version set,
/// see [`api_set_hash`].
pub const API_VERSIONS_LABEL: &str = "flotilla.io/api-versions";

/// What Helm is told about a target cluster: its Kubernetes version
/// (`--kube-version`) and the API versions it serves (`--api-versions`, each a
/// `group/version` or `group/version/Kind`, core as `v1`, `v1/Pod`; sorted,
/// distinct).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Profile {
    pub kube_version: String,
    pub api_versions: Vec<String>,
}

impl Profile {
    /// A profile from what an agent reported: the API versions trimmed, sorted and
    /// made distinct.
    pub fn new<'a>(kube_version: &str, api_versions: impl IntoIterator<Item = &'a str>) -> Profile {
        let mut a: Vec<String> = api_versions
            .into_iter()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        a.sort();
        a.dedup();
        Profile {
            kube_version: kube_version.trim().to_string(),
            api_versions: a,
        }
    }

    /// The labels that pin a cluster to this profile's renders; empty when the
    /// version is unusable (such a cluster gets helm's defaults).
    pub fn labels(&self) -> Labels {
        let mut l = Labels::new();
        if let Some(v) = label_value(&self.kube_version) {
            l.insert(KUBE_VERSION_LABEL.to_string(), v);
            l.insert(
                API_VERSIONS_LABEL.to_string(),
                api_set_hash(&self.api_versions),
            );
        }
        l
    }

    /// A short name for the twin renders: `v1.34.4/<api hash>`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.kube_version, api_set_hash(&self.api_versions))
    }
}

/// A label-safe hash of a (sorted, distinct) API-version set: 16 hex digits of
/// its SHA-256.
pub fn api_set_hash(api_versions: &[String]) -> String {
    let mut h = Sha256::new();
    for a in api_versions {
        h.update(a.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// The API-version strings Helm's `.Capabilities.APIVersions.Has` checks, from
/// discovery's (group, version, kind) triples: `group/version` and
/// `group/version/Kind` (the core group as `v1` and `v1/Kind`); sorted, distinct.
pub fn api_version_strings<'a>(
    gvks: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (group, version, kind) in gvks {
        if version.is_empty() {
            continue;
        }
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        if !kind.is_empty() {
            out.push(format!("{gv}/{kind}"));
        }
        out.push(gv);
    }
    out.sort();
    out.dedup();
    out
}

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

/// `target`, narrowed to clusters of `profile` (its Kubernetes version and
/// API-version set). `None` when the version cannot be a label value.
pub fn versioned_target(target: &Target, profile: &Profile) -> Option<Target> {
    let labels = profile.labels();
    if labels.is_empty() {
        return None;
    }
    let mut t = target.clone();
    let mut sel = t
        .cluster_selector
        .take()
        .unwrap_or_else(LabelSelector::everything);
    sel.match_labels.extend(labels);
    t.cluster_selector = Some(sel);
    Some(t)
}

/// The profiles to render for: distinct, with a usable version, sorted.
pub fn profiles<'a>(reported: impl IntoIterator<Item = &'a Profile>) -> Vec<Profile> {
    let mut v: Vec<Profile> = reported
        .into_iter()
        .filter(|p| label_value(&p.kube_version).is_some())
        .cloned()
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values() {
        assert_eq!(label_value("v1.34.4").as_deref(), Some("v1.34.4"));
        assert_eq!(label_value("v1.30.2+k3s1").as_deref(), Some("v1.30.2_k3s1"));
        assert_eq!(label_value(""), None);
        assert_eq!(label_value("+"), None);
        let p = |v: &str| Profile::new(v, []);
        assert_eq!(
            profiles(&[p("v1.2.3"), p(""), p("v1.2.3"), p("v1.0.0")]),
            [p("v1.0.0"), p("v1.2.3")]
        );
        // The API set is part of the profile.
        let a = Profile::new("v1.2.3", ["apps/v1", " ", "apps/v1"]);
        assert_eq!(a.api_versions, ["apps/v1"]);
        assert_eq!(profiles(&[a.clone(), p("v1.2.3")]), [p("v1.2.3"), a]);
    }

    #[test]
    fn versioned_targets_add_the_version_to_the_selector() {
        let labels = |p: &Profile| -> Labels {
            let mut l = p.labels();
            l.insert("env".to_string(), "prod".to_string());
            l
        };
        let v129 = Profile::new("v1.29.0", []);
        let v129m = Profile::new("v1.29.0", ["monitoring.coreos.com/v1"]);
        let t = versioned_target(
            &Target::selector(LabelSelector::parse("env=prod").unwrap()),
            &v129,
        )
        .unwrap();
        let sel = t.cluster_selector.unwrap();
        assert!(sel.matches(&labels(&v129)));
        assert!(!sel.matches(&labels(&Profile::new("v1.30.0", []))));
        assert!(!sel.matches(&labels(&v129m)));
        // The default variant's twin: any cluster of that profile.
        let t = versioned_target(&Target::default(), &v129m).unwrap();
        assert!(t.cluster_selector.unwrap().matches(&labels(&v129m)));
        assert!(versioned_target(&Target::default(), &Profile::new("", [])).is_none());
    }

    #[test]
    fn api_version_strings_as_helm_checks_them() {
        assert_eq!(
            api_version_strings([
                ("apps", "v1", "Deployment"),
                ("", "v1", "Pod"),
                ("apps", "v1", "StatefulSet"),
                ("x.io", "", "Bad"),
            ]),
            [
                "apps/v1",
                "apps/v1/Deployment",
                "apps/v1/StatefulSet",
                "v1",
                "v1/Pod"
            ]
        );
        let h = api_set_hash(&["apps/v1".to_string()]);
        assert_eq!(h.len(), 16);
        assert!(validate_value(&h).is_ok());
        assert_ne!(h, api_set_hash(&[]));
    }
}
