//! What the agent applies for a bundle: each rendered object with its namespace
//! placed (or removed, for a cluster-scoped kind) and Flotilla's bundle label
//! added. The agent prepares every object with [`prepare`] before its server-side
//! apply; `flotilla render` prints the same, and `flotilla render --diff-against`
//! compares two such sets ([`diff`]), Secret values hashed ([`redact_secret`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::bundle::{BundleOptions, Manifest, ObjectRef, Rendered};
use crate::BUNDLE_LABEL;

/// Prepares a manifest for server-side apply: places a namespaced object with the
/// bundle's options, strips the namespace from a cluster-scoped one, and labels
/// the object with its bundle. Returns the final identity and the object.
pub fn prepare(
    bundle: &str,
    manifest: &Manifest,
    options: &BundleOptions,
    namespaced: bool,
) -> (ObjectRef, Value) {
    let mut obj = manifest.object.clone();
    let mut r = manifest.object_ref();
    if !obj["metadata"].is_object() {
        obj["metadata"] = serde_json::json!({});
    }
    let meta = &mut obj["metadata"];
    if namespaced {
        let ns = options.namespace_for(r.namespace.as_deref());
        meta["namespace"] = Value::String(ns.clone());
        r.namespace = Some(ns);
    } else {
        if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        r.namespace = None;
    }
    if !meta["labels"].is_object() {
        meta["labels"] = serde_json::json!({});
    }
    meta["labels"][BUNDLE_LABEL] = Value::String(bundle.to_string());
    (r, obj)
}

/// The kinds of Kubernetes 1.34 that are cluster-scoped, by (group, kind).
const CLUSTER_SCOPED: [(&str, &str); 33] = [
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("", "ComponentStatus"),
    (
        "admissionregistration.k8s.io",
        "MutatingWebhookConfiguration",
    ),
    (
        "admissionregistration.k8s.io",
        "ValidatingWebhookConfiguration",
    ),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
    (
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicyBinding",
    ),
    ("admissionregistration.k8s.io", "MutatingAdmissionPolicy"),
    (
        "admissionregistration.k8s.io",
        "MutatingAdmissionPolicyBinding",
    ),
    ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ("apiregistration.k8s.io", "APIService"),
    ("certificates.k8s.io", "CertificateSigningRequest"),
    ("certificates.k8s.io", "ClusterTrustBundle"),
    ("flowcontrol.apiserver.k8s.io", "FlowSchema"),
    ("flowcontrol.apiserver.k8s.io", "PriorityLevelConfiguration"),
    ("networking.k8s.io", "IngressClass"),
    ("networking.k8s.io", "IPAddress"),
    ("networking.k8s.io", "ServiceCIDR"),
    ("node.k8s.io", "RuntimeClass"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    ("resource.k8s.io", "DeviceClass"),
    ("resource.k8s.io", "ResourceSlice"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("storage.k8s.io", "CSIDriver"),
    ("storage.k8s.io", "CSINode"),
    ("storage.k8s.io", "StorageClass"),
    ("storage.k8s.io", "VolumeAttachment"),
    ("storage.k8s.io", "VolumeAttributesClass"),
    ("storagemigration.k8s.io", "StorageVersionMigration"),
    ("authentication.k8s.io", "SelfSubjectReview"),
    ("authorization.k8s.io", "SelfSubjectRulesReview"),
];

/// Which kinds are namespaced, as known without a cluster: Kubernetes' own kinds,
/// and the kinds of the CustomResourceDefinitions given. A custom kind defined
/// nowhere given is taken as namespaced (as most are); the agent asks the
/// cluster's discovery instead.
#[derive(Debug, Clone, Default)]
pub struct Scopes {
    /// (group, kind) → namespaced, from CRDs.
    custom: BTreeMap<(String, String), bool>,
}

impl Scopes {
    /// Kubernetes' kinds and the CRDs among `objects`.
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Value>) -> Scopes {
        let mut s = Scopes::default();
        s.add(objects);
        s
    }

    /// Adds the CRDs among `objects`.
    pub fn add<'a>(&mut self, objects: impl IntoIterator<Item = &'a Value>) {
        for o in objects {
            if o["kind"] != "CustomResourceDefinition"
                || !o["apiVersion"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("apiextensions.k8s.io/"))
            {
                continue;
            }
            let spec = &o["spec"];
            if let (Some(group), Some(kind)) =
                (spec["group"].as_str(), spec["names"]["kind"].as_str())
            {
                self.custom.insert(
                    (group.to_string(), kind.to_string()),
                    spec["scope"] != "Cluster",
                );
            }
        }
    }

    /// Whether objects of `kind` in `api_version` are namespaced.
    pub fn namespaced(&self, api_version: &str, kind: &str) -> bool {
        let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
        if let Some(n) = self.custom.get(&(group.to_string(), kind.to_string())) {
            return *n;
        }
        !CLUSTER_SCOPED.contains(&(group, kind))
    }
}

/// One object as the agent applies it, and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub file: String,
    pub object_ref: ObjectRef,
    pub object: Value,
}

/// Every object of a rendered bundle as the agent applies it, in apply order.
pub fn applied(bundle: &str, rendered: &Rendered, scopes: &Scopes) -> Vec<Applied> {
    rendered
        .manifests
        .iter()
        .map(|m| {
            let r = m.object_ref();
            let (object_ref, object) = prepare(
                bundle,
                m,
                &rendered.options,
                scopes.namespaced(&r.api_version, &r.kind),
            );
            Applied {
                file: m.file.clone(),
                object_ref,
                object,
            }
        })
        .collect()
}

/// A Secret's values replaced by hashes (`data`, `stringData`, and the
/// last-applied annotation, which may carry them all): equal values, equal
/// hashes, so a diff still tells whether a value changed. Other kinds unchanged.
pub fn redact_secret(object: &mut Value) {
    let api_version = object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    if !crate::drift::is_secret(&api_version, &kind) {
        return;
    }
    for field in ["data", "stringData"] {
        if let Some(m) = object.get_mut(field).and_then(Value::as_object_mut) {
            for v in m.values_mut() {
                *v = redacted_once(v);
            }
        }
    }
    if let Some(a) = object["metadata"]
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        for v in a.values_mut() {
            *v = redacted_once(v);
        }
    }
}

/// A value hashed, unless it already is (the hub sends Secrets hashed).
fn redacted_once(v: &Value) -> Value {
    if v.as_str()
        .is_some_and(|s| s.starts_with(crate::drift::REDACTED_PREFIX))
    {
        return v.clone();
    }
    crate::drift::redacted(v)
}

/// What differs for one object between two sets of applied objects.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Only in the new set: it would be created.
    Added(ObjectRef),
    /// Only in the old set: it would be pruned.
    Removed(ObjectRef),
    /// In both, with these paths (JSON pointers) differing: (path, old, new);
    /// `null` stands for absent.
    Changed(ObjectRef, Vec<(String, Value, Value)>),
}

fn key(r: &ObjectRef) -> (String, String, Option<String>, String) {
    (
        r.group().to_string(),
        r.kind.clone(),
        r.namespace.clone(),
        r.name.clone(),
    )
}

fn leaves(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(
                    &format!("{prefix}/{}", k.replace('~', "~0").replace('/', "~1")),
                    v,
                    out,
                );
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                leaves(&format!("{prefix}/{i}"), v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// The changes from `old` to `new`, objects matched by group, kind, namespace and
/// name, in the order of `new` then the removed ones; Secrets compared and shown
/// with their values hashed.
pub fn diff(old: &[Applied], new: &[Applied]) -> Vec<Change> {
    let redacted = |a: &Applied| {
        let mut o = a.object.clone();
        redact_secret(&mut o);
        o
    };
    let olds: BTreeMap<_, &Applied> = old.iter().map(|a| (key(&a.object_ref), a)).collect();
    let news: BTreeSet<_> = new.iter().map(|a| key(&a.object_ref)).collect();
    let mut out = Vec::new();
    for n in new {
        match olds.get(&key(&n.object_ref)) {
            None => out.push(Change::Added(n.object_ref.clone())),
            Some(o) => {
                let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
                leaves("", &redacted(o), &mut a);
                leaves("", &redacted(n), &mut b);
                let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                let fields: Vec<(String, Value, Value)> = paths
                    .into_iter()
                    .filter_map(|p| {
                        let (x, y) = (
                            a.get(p).cloned().unwrap_or(Value::Null),
                            b.get(p).cloned().unwrap_or(Value::Null),
                        );
                        (x != y).then(|| (p.clone(), x, y))
                    })
                    .collect();
                if !fields.is_empty() {
                    out.push(Change::Changed(n.object_ref.clone(), fields));
                }
            }
        }
    }
    for o in old {
        if !news.contains(&key(&o.object_ref)) {
            out.push(Change::Removed(o.object_ref.clone()));
        }
    }
    out
}

/// The changes as text: `+ kind ns/name` (created), `- kind ns/name` (pruned),
/// `~ kind ns/name` then one `  path: old -> new` line per field.
pub fn diff_text(changes: &[Change]) -> String {
    let mut out = String::new();
    let show = |v: &Value| match v {
        Value::Null => "(absent)".to_string(),
        other => {
            let s = other.to_string();
            if s.len() > 200 {
                let mut end = 200;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}…[{} bytes]", &s[..end], s.len())
            } else {
                s
            }
        }
    };
    for c in changes {
        match c {
            Change::Added(r) => out.push_str(&format!("+ {r}\n")),
            Change::Removed(r) => out.push_str(&format!("- {r}\n")),
            Change::Changed(r, fields) => {
                out.push_str(&format!("~ {r}\n"));
                for (p, a, b) in fields {
                    out.push_str(&format!("    {p}: {} -> {}\n", show(a), show(b)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(obj: Value) -> Manifest {
        Manifest {
            file: "deploy.yaml".into(),
            object: obj,
        }
    }

    #[test]
    fn prepares_namespaced_objects() {
        let m = manifest(json!({"apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":"web","labels":{"app":"web"}}}));
        let opts = BundleOptions {
            default_namespace: Some("demo".into()),
            ..Default::default()
        };
        let (r, obj) = prepare("apps-web", &m, &opts, true);
        assert_eq!(r.namespace.as_deref(), Some("demo"));
        assert_eq!(obj["metadata"]["namespace"], "demo");
        assert_eq!(obj["metadata"]["labels"]["app"], "web");
        assert_eq!(obj["metadata"]["labels"][BUNDLE_LABEL], "apps-web");
        assert_eq!(r.to_string(), "Deployment demo/web");
    }

    #[test]
    fn prepares_cluster_scoped_objects() {
        let m = manifest(json!({"apiVersion":"v1","kind":"Namespace",
            "metadata":{"name":"demo","namespace":"oops","labels":null}}));
        let opts = BundleOptions {
            target_namespace: Some("forced".into()),
            ..Default::default()
        };
        let (r, obj) = prepare("b", &m, &opts, false);
        assert_eq!(r.namespace, None);
        assert!(obj["metadata"].get("namespace").is_none());
        assert_eq!(obj["metadata"]["labels"][BUNDLE_LABEL], "b");
    }

    #[test]
    fn scopes_know_kubernetes_kinds_and_the_given_crds() {
        let crd = json!({"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition",
            "metadata":{"name":"clusterissuers.cert-manager.io"},
            "spec":{"group":"cert-manager.io","scope":"Cluster","names":{"kind":"ClusterIssuer"}}});
        let s = Scopes::from_objects([&crd]);
        assert!(!s.namespaced("cert-manager.io/v1", "ClusterIssuer"));
        assert!(s.namespaced("cert-manager.io/v1", "Issuer"));
        assert!(!s.namespaced("rbac.authorization.k8s.io/v1", "ClusterRole"));
        assert!(!s.namespaced("v1", "Namespace"));
        assert!(s.namespaced("v1", "ConfigMap"));
        assert!(!s.namespaced("networking.k8s.io/v1", "IngressClass"));
    }

    #[test]
    fn diffs_name_objects_and_paths_and_hide_secret_values() {
        let a = |kind: &str, name: &str, data: Value| {
            let m = manifest(
                json!({"apiVersion":"v1","kind":kind,"metadata":{"name":name},"data":data}),
            );
            let (object_ref, object) = prepare("b", &m, &BundleOptions::default(), true);
            Applied {
                file: "f".into(),
                object_ref,
                object,
            }
        };
        let old = vec![
            a("ConfigMap", "same", json!({"k":"v"})),
            a("ConfigMap", "gone", json!({})),
            a("Secret", "s", json!({"password":"aHVudGVyMg=="})),
            a("ConfigMap", "c", json!({"k":"v"})),
        ];
        let new = vec![
            a("ConfigMap", "same", json!({"k":"v"})),
            a("ConfigMap", "new", json!({})),
            a("Secret", "s", json!({"password":"c2VjcmV0"})),
            a("ConfigMap", "c", json!({"k":"w"})),
        ];
        let text = diff_text(&diff(&old, &new));
        assert!(text.contains("+ ConfigMap default/new\n"), "{text}");
        assert!(text.contains("- ConfigMap default/gone\n"), "{text}");
        assert!(
            text.contains("~ ConfigMap default/c\n    /data/k: \"v\" -> \"w\"\n"),
            "{text}"
        );
        assert!(
            text.contains("~ Secret default/s\n    /data/password: \"redacted:sha256:"),
            "{text}"
        );
        assert!(
            !text.contains("aHVudGVy") && !text.contains("c2VjcmV0"),
            "{text}"
        );
        assert!(!text.contains("same"), "{text}");
        assert!(diff(&new, &new).is_empty());
    }
}
