//! Bundles: which directories of a source are bundles, how a directory of plain
//! manifests becomes a list of objects (with file and line in every error), the
//! content hash that lets unchanged bundles go unsent, the order objects are
//! applied in, and what an agent must prune.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Names a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

impl ObjectRef {
    /// The API group (empty for the core group).
    pub fn group(&self) -> &str {
        self.api_version
            .split_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
    }
}

/// One object of a bundle, and the file it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub file: String,
    pub object: serde_json::Value,
}

impl Manifest {
    /// The object's identity as written (namespace not yet defaulted).
    pub fn object_ref(&self) -> ObjectRef {
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let meta = &self.object["metadata"];
        ObjectRef {
            api_version: s(&self.object["apiVersion"]),
            kind: s(&self.object["kind"]),
            namespace: meta["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(str::to_string),
            name: s(&meta["name"]),
        }
    }
}

/// How a bundle's namespaced objects are placed (Fleet's fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleOptions {
    /// For objects that name no namespace.
    pub default_namespace: Option<String>,
    /// Forces every namespaced object into this namespace.
    pub target_namespace: Option<String>,
    /// What the agent does when objects drift (left out of the hash when default).
    #[serde(default, skip_serializing_if = "crate::drift::DriftPolicy::is_default")]
    pub drift: crate::drift::DriftPolicy,
    /// Fleet's `takeOwnership`: the agent may take over objects that exist without
    /// this bundle's label (left out of the hash when false, the default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub take_ownership: bool,
}

impl BundleOptions {
    /// The namespace a namespaced object lands in.
    pub fn namespace_for(&self, written: Option<&str>) -> String {
        self.target_namespace
            .as_deref()
            .or(written)
            .or(self.default_namespace.as_deref())
            .unwrap_or("default")
            .to_string()
    }

    /// The namespace the agent creates if it does not exist (as Fleet does).
    pub fn namespace_to_create(&self) -> Option<&str> {
        self.target_namespace
            .as_deref()
            .or(self.default_namespace.as_deref())
            .filter(|ns| *ns != "default")
    }
}

/// The files that configure a bundle directory instead of being deployed.
pub const CONFIG_FILES: [&str; 2] = ["flotilla.yaml", "fleet.yaml"];

/// Why a bundle could not be rendered: file, line when known, object when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RenderError {
    pub file: String,
    pub line: Option<u64>,
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(obj) = &self.object {
            write!(f, ": {obj}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// The result of rendering one bundle for one cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rendered {
    pub manifests: Vec<Manifest>,
    pub options: BundleOptions,
}

impl Rendered {
    /// SHA-256 over the options and every object in order: equal content, equal hash,
    /// so the hub never re-sends a bundle a new commit did not change.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.options).unwrap_or_default());
        for m in &self.manifests {
            h.update(b"\0");
            h.update(m.file.as_bytes());
            h.update(b"\0");
            h.update(serde_json::to_vec(&m.object).unwrap_or_default());
        }
        hex::encode(h.finalize())
    }
}

/// The bundle name for directory `dir` of source `source`: `source` for the root,
/// else `source-dir-with-dashes`, lowercased to a DNS label. Names longer than 63
/// characters are cut and suffixed with a hash of the full name so they stay unique.
pub fn bundle_name(source: &str, dir: &str) -> String {
    let dir = dir.trim_matches('/');
    let raw = if dir.is_empty() || dir == "." {
        source.to_string()
    } else {
        format!("{source}-{dir}")
    };
    let mut name = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && name.ends_with('-') {
            continue;
        }
        name.push(c);
    }
    let name = name.trim_matches('-').to_string();
    if name.len() <= 63 {
        return name;
    }
    let suffix = &hex::encode(Sha256::digest(raw.as_bytes()))[..8];
    format!("{}-{suffix}", name[..54].trim_end_matches('-'))
}

/// A bundle directory of a source, as it appears in collision reports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BundleDir {
    pub source: String,
    /// "" for the source's root.
    pub dir: String,
}

impl fmt::Display for BundleDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.dir.is_empty() { "." } else { &self.dir };
        write!(f, "{dir} of source {}", self.source)
    }
}

/// The bundle names that more than one bundle directory derives (`a-b/c` and
/// `a/b-c`; `web_front` and `web-front`; source `a-b` dir `c` and source `a` dir
/// `b/c`), each with every directory that derives it, in order. [`bundle_name`]
/// folds case and punctuation, so distinct directories can meet: none of them
/// may then use the name — two bundles under one name would merge or replace
/// each other on the clusters.
pub fn name_collisions<'a>(
    dirs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, Vec<BundleDir>> {
    let mut by_name: BTreeMap<String, Vec<BundleDir>> = BTreeMap::new();
    for (source, dir) in dirs {
        let d = BundleDir {
            source: source.to_string(),
            dir: dir.to_string(),
        };
        let holders = by_name.entry(bundle_name(source, dir)).or_default();
        if !holders.contains(&d) {
            holders.push(d);
        }
    }
    by_name.retain(|_, holders| holders.len() > 1);
    for holders in by_name.values_mut() {
        holders.sort();
    }
    by_name
}

/// Why the directories in `holders` are all refused their bundle name `name`.
pub fn collision_reason(name: &str, holders: &[BundleDir]) -> String {
    let list: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
    format!(
        "bundle name {name:?} is derived from {}: names fold case and punctuation, so these directories would be one bundle; none of them is rendered under it until all but one are renamed",
        list.join(" and ")
    )
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, f)| f).unwrap_or(path)
}

/// Every directory that holds a file, and their ancestors ("" is the root).
fn all_dirs(files: &[String]) -> BTreeSet<String> {
    let mut dirs = BTreeSet::from([String::new()]);
    for f in files {
        let mut d = parent(f);
        while !d.is_empty() {
            dirs.insert(d.to_string());
            d = parent(d);
        }
    }
    dirs
}

/// Chooses the bundle directories of a tree, given every file path in it (relative,
/// `/`-separated) and the source's `paths` globs:
/// - with globs: every directory matching one of them (`.` or `/` means the root);
/// - without: each directory holding a flotilla.yaml or fleet.yaml, else the root.
pub fn bundle_dirs(files: &[String], paths: &[String]) -> Result<Vec<String>, globset::Error> {
    if paths.is_empty() {
        let mut dirs: BTreeSet<String> = files
            .iter()
            .filter(|f| CONFIG_FILES.contains(&file_name(f)))
            .map(|f| parent(f).to_string())
            .collect();
        if dirs.is_empty() {
            dirs.insert(String::new());
        }
        return Ok(dirs.into_iter().collect());
    }
    let mut builder = globset::GlobSetBuilder::new();
    let mut root = false;
    for p in paths {
        let p = p.trim_matches('/');
        if p.is_empty() || p == "." {
            root = true;
            continue;
        }
        builder.add(
            globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()?,
        );
    }
    let set = builder.build()?;
    Ok(all_dirs(files)
        .into_iter()
        .filter(|d| (d.is_empty() && root) || (!d.is_empty() && set.is_match(d)))
        .collect())
}

/// The files that belong to bundle `dir`: everything below it, except what lies
/// in a nested bundle directory. Paths are returned relative to `dir`.
pub fn bundle_files<'a>(
    files: &'a [String],
    dir: &str,
    all_bundles: &[String],
) -> Vec<(&'a str, String)> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let nested: Vec<String> = all_bundles
        .iter()
        .filter(|b| b.as_str() != dir && (dir.is_empty() || b.starts_with(&prefix)))
        .map(|b| format!("{b}/"))
        .collect();
    files
        .iter()
        .filter(|f| f.starts_with(&prefix))
        .filter(|f| !nested.iter().any(|n| f.starts_with(n.as_str())))
        .map(|f| (f.as_str(), f[prefix.len()..].to_string()))
        .collect()
}

/// Whether a file (relative to its bundle) is a manifest of a plain-YAML bundle.
pub fn is_manifest_file(rel: &str) -> bool {
    let name = file_name(rel);
    if CONFIG_FILES.contains(&name) || name.starts_with('.') {
        return false;
    }
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Renders a plain-manifest bundle: every `*.yaml`/`*.yml`/`*.json` file (relative
/// path → bytes), in path order, each document an object. Objects come out in
/// apply order. Lists (`kind: List`, `ConfigMapList`, ...) are expanded.
pub fn render_plain(files: &BTreeMap<String, Vec<u8>>) -> Result<Rendered, RenderError> {
    let spec = crate::fleetyaml::parse_spec(files)?;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let options = BundleOptions {
        default_namespace: non_empty(spec.default_namespace),
        target_namespace: non_empty(spec.namespace),
        take_ownership: spec.take_ownership,
        ..Default::default()
    };
    finish(parse_manifests(files)?, options)
}

/// The objects of every manifest file of a plain bundle, in path order, read as
/// `kubectl apply -f` reads them (see [`crate::documents`]), within the byte
/// budgets per file and per bundle.
pub fn parse_manifests(files: &BTreeMap<String, Vec<u8>>) -> Result<Vec<Manifest>, RenderError> {
    let manifest_files: Vec<(&String, &Vec<u8>)> =
        files.iter().filter(|(p, _)| is_manifest_file(p)).collect();
    for (path, bytes) in &manifest_files {
        crate::documents::check_file_size(path, bytes.len() as u64)?;
    }
    let total: u64 = manifest_files.iter().map(|(_, b)| b.len() as u64).sum();
    crate::documents::check_bundle_size(".", total)?;
    let mut manifests = Vec::new();
    for (path, bytes) in manifest_files {
        for object in crate::documents::objects(path, bytes)? {
            manifests.push(Manifest {
                file: path.clone(),
                object,
            });
        }
    }
    Ok(manifests)
}

/// The common end of every renderer: checks each object (apiVersion, kind, name),
/// refuses an object defined twice, and sorts into apply order.
pub fn finish(
    mut manifests: Vec<Manifest>,
    options: BundleOptions,
) -> Result<Rendered, RenderError> {
    for m in &manifests {
        check_object(&m.object).map_err(|(object, reason)| RenderError {
            file: m.file.clone(),
            line: None,
            object,
            reason,
        })?;
    }
    let mut seen = BTreeSet::new();
    for m in &manifests {
        let r = m.object_ref();
        let key = (
            r.group().to_string(),
            r.kind.clone(),
            r.namespace.clone(),
            r.name.clone(),
        );
        if !seen.insert(key) {
            return Err(RenderError {
                file: m.file.clone(),
                line: None,
                object: Some(r.to_string()),
                reason: "defined twice in the bundle".into(),
            });
        }
    }
    sort_for_apply(&mut manifests);
    Ok(Rendered { manifests, options })
}

fn check_object(obj: &serde_json::Value) -> Result<(), (Option<String>, String)> {
    if !obj.is_object() {
        return Err((
            None,
            "a document must be a mapping (a Kubernetes object)".into(),
        ));
    }
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let label = format!(
        "{} {}",
        if kind.is_empty() { "<no kind>" } else { kind },
        if name.is_empty() { "<no name>" } else { name }
    );
    if api_version.is_empty() {
        return Err((Some(label), "apiVersion is required".into()));
    }
    if kind.is_empty() {
        return Err((Some(label), "kind is required".into()));
    }
    if name.is_empty() {
        return Err((Some(label), "metadata.name is required".into()));
    }
    Ok(())
}

/// Where a kind goes in the apply order: what others depend on first (namespaces,
/// CRDs, then accounts, config and RBAC, then workloads), as Helm orders installs.
pub fn apply_rank(kind: &str) -> usize {
    const ORDER: [&str; 33] = [
        "Namespace",
        "NetworkPolicy",
        "ResourceQuota",
        "LimitRange",
        "PodSecurityPolicy",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Secret",
        "SecretList",
        "ConfigMap",
        "StorageClass",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleList",
        "ClusterRoleBinding",
        "ClusterRoleBindingList",
        "Role",
        "RoleList",
        "RoleBinding",
        "RoleBindingList",
        "Service",
        "DaemonSet",
        "Pod",
        "ReplicationController",
        "ReplicaSet",
        "Deployment",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "Job",
        "CronJob",
        "Ingress",
    ];
    // CRDs must exist before anything else could be one of their instances;
    // unknown kinds (custom resources) go last.
    match kind {
        "Namespace" => 0,
        "CustomResourceDefinition" => 1,
        _ => ORDER
            .iter()
            .position(|k| *k == kind)
            .map(|p| p + 2)
            .unwrap_or(ORDER.len() + 2),
    }
}

/// Sorts manifests into apply order, keeping file order within a kind.
pub fn sort_for_apply(manifests: &mut [Manifest]) {
    manifests.sort_by_key(|m| apply_rank(m.object["kind"].as_str().unwrap_or_default()));
}

/// What an agent must delete: objects it applied before for a bundle that the
/// bundle no longer contains, in reverse apply order (workloads before namespaces).
pub fn to_prune(previous: &BTreeSet<ObjectRef>, desired: &BTreeSet<ObjectRef>) -> Vec<ObjectRef> {
    let mut out: Vec<ObjectRef> = previous
        .iter()
        .filter(|old| {
            !desired.iter().any(|d| {
                d.group() == old.group()
                    && d.kind == old.kind
                    && d.namespace == old.namespace
                    && d.name == old.name
            })
        })
        .cloned()
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(apply_rank(&r.kind)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    fn paths(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn colliding_names_are_found_with_every_holder() {
        let c = name_collisions([
            ("apps", "a-b/c"),
            ("apps", "a/b-c"),
            ("apps", "web_front"),
            ("apps", "web-front"),
            ("apps", "web"),
            ("a-b", "c"),
            ("apps", ""),
        ]);
        assert_eq!(
            c.keys().collect::<Vec<_>>(),
            ["apps-a-b-c", "apps-web-front"]
        );
        let web = &c["apps-web-front"];
        assert_eq!(web.len(), 2);
        let reason = collision_reason("apps-web-front", web);
        assert!(reason.contains("web_front of source apps"), "{reason}");
        assert!(reason.contains("web-front of source apps"), "{reason}");
        // Across sources: source `a-b` dir `c` and source `a` dir `b/c`.
        let c = name_collisions([("a-b", "c"), ("a", "b/c"), ("a", "b")]);
        assert_eq!(c["a-b-c"].len(), 2);
        assert_eq!(c.len(), 1);
        // The same directory twice is not a collision.
        assert!(name_collisions([("s", "x"), ("s", "x")]).is_empty());
    }

    #[test]
    fn names() {
        assert_eq!(bundle_name("apps", ""), "apps");
        assert_eq!(bundle_name("apps", "apps/Web_Front"), "apps-apps-web-front");
        let long = bundle_name("apps", &"x/".repeat(60));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, bundle_name("apps", &"x/".repeat(61)));
    }

    #[test]
    fn discovers_bundle_dirs() {
        let tree = paths(&[
            "README.md",
            "apps/web/deploy.yaml",
            "apps/web/fleet.yaml",
            "apps/db/flotilla.yaml",
            "apps/db/sts.yaml",
            "infra/ns.yaml",
        ]);
        assert_eq!(
            bundle_dirs(&tree, &[]).unwrap(),
            paths(&["apps/db", "apps/web"])
        );
        assert_eq!(
            bundle_dirs(&tree, &paths(&["apps/*"])).unwrap(),
            paths(&["apps/db", "apps/web"])
        );
        assert_eq!(
            bundle_dirs(&tree, &paths(&["infra"])).unwrap(),
            paths(&["infra"])
        );
        assert_eq!(bundle_dirs(&tree, &paths(&["."])).unwrap(), paths(&[""]));
        assert_eq!(bundle_dirs(&paths(&["a.yaml"]), &[]).unwrap(), paths(&[""]));
    }

    #[test]
    fn nested_bundles_are_excluded() {
        let tree = paths(&["a.yaml", "sub/b.yaml", "sub/fleet.yaml", "other/c.yaml"]);
        let bundles = paths(&["", "sub"]);
        let root: Vec<String> = bundle_files(&tree, "", &bundles)
            .into_iter()
            .map(|(_, rel)| rel)
            .collect();
        assert_eq!(root, paths(&["a.yaml", "other/c.yaml"]));
        let sub: Vec<String> = bundle_files(&tree, "sub", &bundles)
            .into_iter()
            .map(|(_, rel)| rel)
            .collect();
        assert_eq!(sub, paths(&["b.yaml", "fleet.yaml"]));
    }

    #[test]
    fn renders_in_apply_order() {
        let r = render_plain(&files(&[
            ("a-deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: demo}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: demo}\n"),
            ("b-ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n"),
            ("c.json", r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"demo"}}]}"#),
            ("README.md", "not yaml: ["),
            ("fleet.yaml", "defaultNamespace: demo\nhelm: {releaseName: x}\n"),
        ]))
        .unwrap();
        let kinds: Vec<String> = r.manifests.iter().map(|m| m.object_ref().kind).collect();
        assert_eq!(kinds, ["Namespace", "ConfigMap", "Service", "Deployment"]);
        assert_eq!(r.options.default_namespace.as_deref(), Some("demo"));
    }

    #[test]
    fn render_errors_name_file_line_object() {
        let e = render_plain(&files(&[(
            "bad.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  labels: [unclosed\n",
        )]))
        .unwrap_err();
        assert_eq!(e.file, "bad.yaml");
        assert!(e.line.is_some(), "{e}");
        let e = render_plain(&files(&[(
            "m.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
        )]))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("m.yaml: ConfigMap <no name>: metadata.name"),
            "{e}"
        );
        let e = render_plain(&files(&[
            (
                "a.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            ),
            (
                "b.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            ),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
    }

    #[test]
    fn hash_follows_content() {
        let a = render_plain(&files(&[(
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {k: v}\n",
        )]))
        .unwrap();
        let b = render_plain(&files(&[(
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  k: v\n",
        )]))
        .unwrap();
        let c = render_plain(&files(&[(
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {k: w}\n",
        )]))
        .unwrap();
        assert_eq!(a.content_hash(), b.content_hash());
        assert_ne!(a.content_hash(), c.content_hash());
    }

    #[test]
    fn prune_set() {
        let r = |kind: &str, name: &str| ObjectRef {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: None,
            name: name.into(),
        };
        let prev = BTreeSet::from([
            r("Namespace", "n"),
            r("ConfigMap", "a"),
            r("ConfigMap", "b"),
        ]);
        let desired = BTreeSet::from([r("ConfigMap", "a")]);
        assert_eq!(
            to_prune(&prev, &desired),
            vec![r("ConfigMap", "b"), r("Namespace", "n")]
        );
    }

    #[test]
    fn namespaces() {
        let o = BundleOptions {
            default_namespace: Some("d".into()),
            target_namespace: None,
            ..Default::default()
        };
        assert_eq!(o.namespace_for(None), "d");
        assert_eq!(o.namespace_for(Some("x")), "x");
        let o = BundleOptions {
            default_namespace: None,
            target_namespace: Some("t".into()),
            ..Default::default()
        };
        assert_eq!(o.namespace_for(Some("x")), "t");
        assert_eq!(BundleOptions::default().namespace_for(None), "default");
    }
}
