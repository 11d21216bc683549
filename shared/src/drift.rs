//! Drift: whether a live object still holds what Flotilla applied, field by field,
//! and who changed it (from `metadata.managedFields`); the per-bundle drift policy
//! (`drift:` in `flotilla.yaml`, Fleet's `diff.comparePatches`) and its ignore rules.
//!
//! The comparison walks only the paths of the desired object (what the agent
//! applied), so defaulted fields and fields only other managers set (an HPA's
//! `replicas`, an injected sidecar) never count. A path counts as drifted when its
//! live value differs from the desired one (with Kubernetes normalisation:
//! quantities, numbers written as strings, int vs float) and did not already
//! differ in the object the apply returned (the *baseline*: what the API server or
//! a mutating webhook decided then is not drift). Ownership in `managedFields`
//! names the manager that made the change; it does not decide whether there is
//! one: writes through the `scale` subresource (`kubectl scale`) change
//! `spec.replicas` without leaving a manager entry, so `flotilla` still owns it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::bundle::ObjectRef;
use crate::FIELD_MANAGER;

/// What the agent does about drift.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftMode {
    /// Re-apply at once and record the correction (the default).
    #[default]
    Correct,
    /// Leave the change and mark the bundle `Modified` until it goes away.
    Report,
}

/// Fields of some objects that never count as drift.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IgnoreRule {
    /// Empty matches any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// JSON pointers (RFC 6901) into the object; a pointer covers everything below it.
    #[serde(default)]
    pub json_pointers: Vec<String>,
}

impl IgnoreRule {
    fn matches(&self, o: &ObjectRef) -> bool {
        let m = |want: &str, got: &str| want.is_empty() || want == got;
        m(&self.api_version, &o.api_version)
            && m(&self.kind, &o.kind)
            && m(&self.name, &o.name)
            && m(&self.namespace, o.namespace.as_deref().unwrap_or_default())
    }
}

/// A bundle's drift policy, as the agent receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftPolicy {
    #[serde(default)]
    pub mode: DriftMode,
    #[serde(default)]
    pub ignore: Vec<IgnoreRule>,
}

impl DriftPolicy {
    /// The default policy (correct, ignore nothing); left out of content hashes so
    /// bundles without a policy keep the hashes they had.
    pub fn is_default(&self) -> bool {
        *self == DriftPolicy::default()
    }

    /// The pointers ignored for one object.
    pub fn ignored_for(&self, o: &ObjectRef) -> Vec<String> {
        self.ignore
            .iter()
            .filter(|r| r.matches(o))
            .flat_map(|r| r.json_pointers.iter().cloned())
            .collect()
    }
}

/// `drift:` as written in `flotilla.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftConfig {
    #[serde(default)]
    pub mode: Option<DriftMode>,
    #[serde(default)]
    pub ignore: Vec<IgnoreRule>,
}

/// One of Fleet's `diff.comparePatches`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ComparePatch {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    operations: Vec<PatchOp>,
    #[serde(default)]
    json_pointers: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct PatchOp {
    #[serde(default)]
    op: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DiffSection {
    #[serde(default)]
    compare_patches: Vec<ComparePatch>,
}

/// The policy of a bundle from its `drift:` section and Fleet's `diff:` section:
/// `comparePatches` become ignore rules (their `jsonPointers`, and the paths of
/// their `remove` operations, which Fleet uses the same way).
pub fn policy(drift: Option<&DriftConfig>, diff: Option<&Value>) -> Result<DriftPolicy, String> {
    let mut p = DriftPolicy {
        mode: drift.and_then(|d| d.mode).unwrap_or_default(),
        ignore: drift.map(|d| d.ignore.clone()).unwrap_or_default(),
    };
    if let Some(diff) = diff.filter(|d| !d.is_null()) {
        let section: DiffSection =
            serde_json::from_value(diff.clone()).map_err(|e| format!("diff: {e}"))?;
        for c in section.compare_patches {
            let mut pointers = c.json_pointers;
            for op in c.operations {
                if op.op == "remove" && !op.path.is_empty() {
                    pointers.push(op.path);
                }
            }
            p.ignore.push(IgnoreRule {
                api_version: c.api_version,
                kind: c.kind,
                name: c.name,
                namespace: c.namespace,
                json_pointers: pointers,
            });
        }
    }
    for r in &p.ignore {
        for ptr in &r.json_pointers {
            if !ptr.starts_with('/') {
                return Err(format!(
                    "ignore rule for {} {}: {ptr:?} is not a JSON pointer (it must start with /)",
                    r.kind, r.name
                ));
            }
        }
    }
    Ok(p)
}

/// One drifted field: where (a JSON pointer into the desired object), what
/// Flotilla applied, what the cluster holds (`null` when absent), and the field
/// manager that owns it now ("" when no one does: it was removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldDiff {
    pub path: String,
    pub desired: Value,
    pub live: Value,
    #[serde(default)]
    pub manager: String,
}

/// One drift of one object, as the agent records it and the hub keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftEvent {
    /// Unique per agent and increasing.
    pub id: u64,
    pub bundle: String,
    pub object: ObjectRef,
    /// Empty when the object was deleted.
    pub fields: Vec<FieldDiff>,
    pub manager: String,
    pub detected_at_unix_ms: i64,
    pub corrected: bool,
    pub deleted: bool,
}

/// A manager's view of one node of the object: it owns the whole subtree, some
/// fields below (a `fieldsV1` set), or nothing here.
#[derive(Clone, Copy)]
enum Owned<'a> {
    All,
    Set(&'a Map<String, Value>),
    Nothing,
}

impl<'a> Owned<'a> {
    fn owns(&self) -> bool {
        !matches!(self, Owned::Nothing)
    }

    fn from_node(v: Option<&'a Value>) -> Owned<'a> {
        match v.and_then(Value::as_object) {
            None => Owned::Nothing,
            Some(m) if m.is_empty() => Owned::All,
            Some(m) => Owned::Set(m),
        }
    }

    fn field(&self, key: &str) -> Owned<'a> {
        match self {
            Owned::All => Owned::All,
            Owned::Nothing => Owned::Nothing,
            Owned::Set(m) => Owned::from_node(m.get(&format!("f:{key}"))),
        }
    }

    /// The node of a list item: by key fields (`k:{...}`), by value (`v:...`) or
    /// by index (`i:N`).
    fn item(&self, live_item: &Value, index: usize) -> Owned<'a> {
        let m = match self {
            Owned::Set(m) => *m,
            other => return *other,
        };
        for (k, node) in m.iter() {
            if let Some(key) = k.strip_prefix("k:") {
                let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(key) else {
                    continue;
                };
                if fields
                    .iter()
                    .all(|(f, v)| live_item.get(f).is_some_and(|l| same(v, l)))
                {
                    return Owned::from_node(Some(node));
                }
            } else if let Some(v) = k.strip_prefix("v:") {
                if serde_json::from_str::<Value>(v).is_ok_and(|v| same(&v, live_item)) {
                    return Owned::from_node(Some(node));
                }
            }
        }
        Owned::from_node(m.get(&format!("i:{index}")))
    }
}

/// A manager entry of `metadata.managedFields`.
struct Manager<'a> {
    name: &'a str,
    time: &'a str,
    is_flotilla_apply: bool,
}

fn managers(live: &Value) -> (Vec<Manager<'_>>, Vec<Owned<'_>>) {
    let mut ms = Vec::new();
    let mut nodes = Vec::new();
    for e in live["metadata"]["managedFields"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if e["subresource"].as_str().is_some_and(|s| !s.is_empty()) {
            // Status and scale subresource writes (controllers) never touch what we apply
            // through the main resource, except scale, which shows as its own manager.
            if e["subresource"] != "scale" {
                continue;
            }
        }
        let name = e["manager"].as_str().unwrap_or_default();
        ms.push(Manager {
            name,
            time: e["time"].as_str().unwrap_or_default(),
            is_flotilla_apply: name == FIELD_MANAGER && e["operation"] == "Apply",
        });
        nodes.push(Owned::from_node(e.get("fieldsV1")));
    }
    (ms, nodes)
}

/// Escapes a key for a JSON pointer segment.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Whether `pointer` is `path` or above it.
fn covers(pointer: &str, path: &str) -> bool {
    let pointer = pointer.trim_end_matches('/');
    path == pointer || (path.starts_with(pointer) && path[pointer.len()..].starts_with('/'))
}

struct Walk<'a> {
    managers: Vec<Manager<'a>>,
    ignore: &'a [String],
    out: Vec<FieldDiff>,
}

impl<'a> Walk<'a> {
    /// Records a difference at `path` unless it is ignored or Flotilla alone owns it.
    fn differ(&mut self, path: &str, desired: &Value, live: Option<&Value>, owners: &[Owned<'a>]) {
        if self.ignore.iter().any(|p| covers(p, path)) {
            return;
        }
        let others: Vec<&Manager> = owners
            .iter()
            .zip(&self.managers)
            .filter(|(o, m)| o.owns() && !m.is_flotilla_apply)
            .map(|(_, m)| m)
            .collect();
        // A removed field is owned by no one: name whoever wrote the object last.
        let manager = others
            .iter()
            .copied()
            .max_by_key(|m| m.time)
            .or_else(|| {
                self.managers
                    .iter()
                    .filter(|m| m.name != FIELD_MANAGER)
                    .max_by_key(|m| m.time)
            })
            .map(|m| m.name.to_string())
            .unwrap_or_default();
        self.out.push(FieldDiff {
            path: path.to_string(),
            desired: desired.clone(),
            live: live.cloned().unwrap_or(Value::Null),
            manager,
        });
    }

    fn walk(&mut self, path: &str, desired: &Value, live: Option<&Value>, owners: &[Owned<'a>]) {
        match (desired, live) {
            (Value::Null, _) => {}
            (Value::Object(d), _) if d.is_empty() => {}
            (Value::Array(d), _) if d.is_empty() => {}
            (Value::Object(d), Some(Value::Object(l))) => {
                for (k, dv) in d {
                    let sub: Vec<Owned> = owners.iter().map(|o| o.field(k)).collect();
                    self.walk(&format!("{path}/{}", escape(k)), dv, l.get(k), &sub);
                }
            }
            (Value::Array(d), Some(Value::Array(l))) if d.iter().all(Value::is_object) => {
                let named = d.iter().all(|i| i["name"].is_string());
                for (i, dv) in d.iter().enumerate() {
                    let found = if named {
                        l.iter()
                            .enumerate()
                            .find(|(_, lv)| lv["name"] == dv["name"])
                    } else {
                        l.get(i).map(|lv| (i, lv))
                    };
                    let p = format!("{path}/{i}");
                    match found {
                        Some((li, lv)) => {
                            let sub: Vec<Owned> = owners.iter().map(|o| o.item(lv, li)).collect();
                            self.walk(&p, dv, Some(lv), &sub);
                        }
                        None => {
                            let sub: Vec<Owned> = owners.iter().map(|_| Owned::Nothing).collect();
                            self.differ(&p, dv, None, &sub);
                        }
                    }
                }
            }
            (d, Some(l)) if same(d, l) => {}
            (d, l) => self.differ(path, d, l, owners),
        }
    }
}

/// The drifted fields of one object: `desired` is what the agent applied (after
/// namespace and label placement), `live` the object as the API server returns it
/// (with `metadata.managedFields`), `ignore` JSON pointers that never count.
/// Only `metadata.labels`, `metadata.annotations` and everything outside
/// `metadata` and `status` are compared.
pub fn diff(desired: &Value, live: &Value, ignore: &[String]) -> Vec<FieldDiff> {
    let (managers, roots) = managers(live);
    let mut w = Walk {
        managers,
        ignore,
        out: Vec::new(),
    };
    let Some(d) = desired.as_object() else {
        return vec![];
    };
    for (k, dv) in d {
        if matches!(k.as_str(), "apiVersion" | "kind" | "status") {
            continue;
        }
        let owners: Vec<Owned> = roots.iter().map(|o| o.field(k)).collect();
        if k == "metadata" {
            for m in ["labels", "annotations"] {
                let sub: Vec<Owned> = owners.iter().map(|o| o.field(m)).collect();
                let lm = live["metadata"].get(m);
                // An absent map is an empty one.
                let empty = Value::Object(Map::new());
                let lm = lm.filter(|v| !v.is_null()).or(Some(&empty));
                w.walk(&format!("/metadata/{m}"), &dv[m], lm, &sub);
            }
            continue;
        }
        w.walk(&format!("/{}", escape(k)), dv, live.get(k), &owners);
    }
    w.out
}

/// The paths that differ right after an apply, as the API server returned the
/// object: what the server (or a mutating webhook) decided there is not drift,
/// then or later. Ownership is not consulted: any difference counts.
pub fn baseline(desired: &Value, applied: &Value) -> BTreeSet<String> {
    let mut stripped = applied.clone();
    if let Some(m) = stripped["metadata"].as_object_mut() {
        m.remove("managedFields");
    }
    diff(desired, &stripped, &[])
        .into_iter()
        .map(|f| f.path)
        .collect()
}

/// The drift of an object: its differences outside `ignore` and the `baseline`.
/// Empty when the object holds what was applied. A Secret's values are redacted
/// (see [`redact`]).
pub fn detect(
    desired: &Value,
    live: &Value,
    ignore: &[String],
    baseline: &BTreeSet<String>,
) -> Vec<FieldDiff> {
    let mut fields: Vec<FieldDiff> = diff(desired, live, ignore)
        .into_iter()
        .filter(|f| !baseline.iter().any(|b| covers(b, &f.path)))
        .collect();
    let kind = |k: &str| desired[k].as_str().unwrap_or_default().to_string();
    redact(&kind("apiVersion"), &kind("kind"), &mut fields);
    fields
}

/// Whether Kubernetes will delete `live` of its own accord, as it asks: a Job
/// (`batch`) with `spec.ttlSecondsAfterFinished` set that has finished (its
/// `Complete` or `Failed` condition is `True`, which is what the TTL-after-finished
/// controller waits for). Its deletion after such a sighting is the collection it
/// asked for, not drift: the agent records no event and does not put it back.
/// A Job deleted before it finished, or without a TTL, is drift as any object.
pub fn collectable(live: &Value) -> bool {
    let api = live["apiVersion"].as_str().unwrap_or_default();
    if live["kind"] != "Job" || api.split('/').next() != Some("batch") {
        return false;
    }
    if !live["spec"]["ttlSecondsAfterFinished"].is_number() {
        return false;
    }
    live["status"]["conditions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .any(|c| matches!(c["type"].as_str(), Some("Complete" | "Failed")) && c["status"] == "True")
}

/// The health a [`collectable`] object finished with (`None` when it is not
/// collectable): the Job's own verdict (completed, or failed and why), not the
/// `Terminating` its deletion shows on the way out. It stands for the Job once
/// Kubernetes deleted it.
pub fn finished_health(live: &Value) -> Option<crate::health::Health> {
    if !collectable(live) {
        return None;
    }
    let mut done = live.clone();
    if let Some(m) = done["metadata"].as_object_mut() {
        m.remove("deletionTimestamp");
    }
    Some(crate::health::health(&done))
}

/// What the agent remembers of an object Kubernetes collected: a digest of what it
/// had applied (the object after namespace and label placement).
pub fn applied_digest(desired: &Value) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        serde_json::to_vec(desired).unwrap_or_default(),
    ))
}

/// Whether an apply creates an object again that Kubernetes collected (see
/// [`collectable`]) after it was applied as `collected` (its [`applied_digest`]):
/// only when what is applied now differs. The same content (an agent restart, a
/// new revision of the bundle that leaves the Job as it was) would run the Job
/// again only to have it deleted again, which neither `kubectl apply` of an
/// unchanged file after the Job was collected nor a GitOps tool's idea of
/// "in sync" asks for; a changed Job is a new Job, and runs.
pub fn apply_again(collected: Option<&str>, desired: &Value) -> bool {
    collected != Some(applied_digest(desired).as_str())
}

/// Whether objects of this kind hold values that never leave the cluster in a
/// drift report: core Secrets.
pub fn is_secret(api_version: &str, kind: &str) -> bool {
    api_version == "v1" && kind == "Secret"
}

/// The prefix of a redacted value.
pub const REDACTED_PREFIX: &str = "redacted:sha256:";

/// A value as a Secret's drift shows it: a hash naming it, never the value (`null`,
/// absent, stays `null`). Hashes tell values apart (drifted, corrected, drifted
/// to the same value again) without saying what they are; short, guessable
/// values can still be guessed from them by trying, as from any plain hash.
pub fn redacted(v: &Value) -> Value {
    use sha2::{Digest, Sha256};
    if v.is_null() {
        return Value::Null;
    }
    let digest = hex::encode(Sha256::digest(v.to_string().as_bytes()));
    Value::String(format!("{REDACTED_PREFIX}{}", &digest[..16]))
}

/// Redacts the drifted fields of a Secret: every path is kept, every value (in
/// `data`, `stringData` and anywhere else in it: an annotation may carry the whole
/// Secret) is replaced by [`redacted`]. Other kinds are left as they are. The
/// agent redacts before recording an event, the hub again before storing one.
pub fn redact(api_version: &str, kind: &str, fields: &mut [FieldDiff]) {
    if !is_secret(api_version, kind) {
        return;
    }
    for f in fields {
        for v in [&mut f.desired, &mut f.live] {
            if !v.as_str().is_some_and(|s| s.starts_with(REDACTED_PREFIX)) {
                *v = redacted(v);
            }
        }
    }
}

/// The manager to name for a set of drifted fields: the one most fields name.
pub fn manager_of(fields: &[FieldDiff]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for f in fields.iter().filter(|f| !f.manager.is_empty()) {
        match counts.iter_mut().find(|(m, _)| *m == f.manager) {
            Some((_, n)) => *n += 1,
            None => counts.push((&f.manager, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(m, _)| m.to_string())
        .unwrap_or_default()
}

/// Scalars equal as Kubernetes compares them after decoding: numbers by value
/// (`1` == `1.0`, `"80"` == `80`), quantities by value (`1000m` == `1`,
/// `1Gi` == `1073741824`).
pub fn same(a: &Value, b: &Value) -> bool {
    if a == b {
        return true;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s)) => {
            quantity(s).is_some_and(|q| Some(q) == n.as_f64())
        }
        (Value::String(x), Value::String(y)) => match (quantity(x), quantity(y)) {
            (Some(p), Some(q)) => (p - q).abs() <= f64::EPSILON * p.abs().max(q.abs()) * 4.0,
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => false,
    }
}

/// A Kubernetes quantity's value (`500m`, `1.5Gi`, `2e3`, `42`).
pub fn quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    const SUFFIXES: [(&str, f64); 14] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .or_else(|| s.strip_suffix('E').map(|n| (n, 1e18)))
        .unwrap_or((s, 1.0));
    if num.is_empty()
        || !num
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '+' | '-' | 'e' | 'E'))
        || !num
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    num.parse::<f64>().ok().map(|n| n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities() {
        assert_eq!(quantity("1000m"), Some(1.0));
        assert_eq!(quantity("1"), Some(1.0));
        assert_eq!(quantity("1Gi"), Some(1_073_741_824.0));
        assert_eq!(quantity("web"), None);
        assert_eq!(quantity("e5"), None);
        assert!(same(&json!("1000m"), &json!("1")));
        assert!(same(&json!("0.5"), &json!("500m")));
        assert!(same(&json!("80"), &json!(80)));
        assert!(same(&json!(1), &json!(1.0)));
        assert!(!same(&json!("web"), &json!("db")));
        assert!(!same(&json!(true), &json!("true")));
    }

    #[test]
    fn policy_from_flotilla_and_fleet_yaml() {
        let drift: DriftConfig = serde_json::from_value(json!({
            "mode": "report",
            "ignore": [{"kind": "Deployment", "name": "web", "jsonPointers": ["/spec/replicas"]}]
        }))
        .unwrap();
        let diff = json!({"comparePatches": [{
            "apiVersion": "v1", "kind": "Service", "name": "svc", "namespace": "demo",
            "operations": [{"op": "remove", "path": "/spec/clusterIP"}, {"op": "add", "path": "/x"}],
            "jsonPointers": ["/spec/ports"]
        }]});
        let p = policy(Some(&drift), Some(&diff)).unwrap();
        assert_eq!(p.mode, DriftMode::Report);
        assert_eq!(p.ignore.len(), 2);
        let svc = ObjectRef {
            api_version: "v1".into(),
            kind: "Service".into(),
            namespace: Some("demo".into()),
            name: "svc".into(),
        };
        assert_eq!(p.ignored_for(&svc), ["/spec/ports", "/spec/clusterIP"]);
        let other = ObjectRef {
            namespace: Some("prod".into()),
            ..svc
        };
        assert!(p.ignored_for(&other).is_empty());
        assert!(policy(None, None).unwrap().is_default());
        assert!(policy(
            None,
            Some(&json!({"comparePatches": [{"jsonPointers": ["spec"]}]}))
        )
        .is_err());
    }

    #[test]
    fn secret_drift_shows_paths_and_hashes_never_values() {
        let desired = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db", "namespace": "demo",
                "annotations": {"note": "hunter2-in-an-annotation"}},
            "type": "Opaque",
            "data": {"password": "aHVudGVyMg=="},
            "stringData": {"token": "s3cr3t-token"}});
        let live = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db", "namespace": "demo",
                "annotations": {"note": "changed-secret-note"}},
            "type": "Opaque",
            "data": {"password": "Y29ycmVjdC1ob3JzZQ==", "token": "czNjcjN0LXRva2Vu"}});
        let fields = detect(&desired, &live, &[], &BTreeSet::new());
        let paths: BTreeSet<&str> = fields.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            BTreeSet::from([
                "/metadata/annotations/note",
                "/data/password",
                "/stringData"
            ])
        );
        let at = |p: &str| fields.iter().find(|f| f.path == p).unwrap();
        let text = serde_json::to_string(&fields).unwrap();
        for secret in [
            "aHVudGVyMg==",
            "Y29ycmVjdC1ob3JzZQ==",
            "s3cr3t-token",
            "hunter2",
            "changed-secret-note",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        let f = at("/data/password");
        assert!(f.desired.as_str().unwrap().starts_with(REDACTED_PREFIX));
        assert_ne!(f.desired, f.live, "different values, different hashes");
        assert_eq!(f.desired, redacted(&json!("aHVudGVyMg==")), "stable");
        assert_eq!(at("/stringData").live, Value::Null, "absent stays null");

        // Redacting again (the hub, after the agent) changes nothing.
        let mut again = fields.clone();
        redact("v1", "Secret", &mut again);
        assert_eq!(again, fields);
        // Other kinds keep their values.
        let mut cm = vec![FieldDiff {
            path: "/data/mode".into(),
            desired: json!("blue"),
            live: json!("green"),
            manager: String::new(),
        }];
        redact("v1", "ConfigMap", &mut cm);
        assert_eq!(cm[0].desired, json!("blue"));
    }

    fn job(ttl: Option<i64>, conditions: Value) -> Value {
        let mut j = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "namespace": "demo"},
            "spec": {"template": {"spec": {"restartPolicy": "Never"}}},
            "status": {"conditions": conditions}});
        if let Some(ttl) = ttl {
            j["spec"]["ttlSecondsAfterFinished"] = json!(ttl);
        }
        j
    }

    #[test]
    fn finished_jobs_with_a_ttl_are_collected_not_drifted() {
        let done = json!([{"type": "SuccessCriteriaMet", "status": "True"},
            {"type": "Complete", "status": "True"}]);
        let failed = json!([{"type": "FailureTarget", "status": "True"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]);
        assert!(collectable(&job(Some(0), done.clone())));
        assert!(collectable(&job(Some(3600), failed.clone())));
        // Not finished (yet): the TTL controller waits for Complete or Failed.
        assert!(!collectable(&job(Some(0), json!([]))));
        assert!(!collectable(&job(
            Some(0),
            json!([{"type": "SuccessCriteriaMet", "status": "True"}])
        )));
        assert!(!collectable(&job(
            Some(0),
            json!([{"type": "Complete", "status": "False"}])
        )));
        assert!(!collectable(&job(Some(0), Value::Null)));
        // No TTL: Kubernetes keeps it; its deletion is someone's, and drift.
        assert!(!collectable(&job(None, done.clone())));
        let mut odd = job(Some(0), done.clone());
        odd["spec"]["ttlSecondsAfterFinished"] = json!("0");
        assert!(!collectable(&odd), "a TTL that is not a number is none");
        // Other kinds never are, whatever they carry.
        let mut other = job(Some(0), done.clone());
        other["apiVersion"] = json!("example.com/v1");
        assert!(!collectable(&other));
        let mut pod = job(Some(0), done);
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        assert!(!collectable(&pod));
    }

    #[test]
    fn a_collected_job_keeps_the_health_it_finished_with() {
        use crate::health::HealthStatus;
        let mut done = job(Some(0), json!([{"type": "Complete", "status": "True"}]));
        done["status"]["succeeded"] = json!(1);
        // On its way out (foreground deletion): still the Job's own verdict.
        done["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let h = finished_health(&done).unwrap();
        assert_eq!(h.status, HealthStatus::Current, "{h:?}");
        let failed = job(
            Some(0),
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
        );
        let h = finished_health(&failed).unwrap();
        assert_eq!(h.status, HealthStatus::Failed);
        assert!(h.message.contains("BackoffLimitExceeded"), "{h:?}");
        assert_eq!(finished_health(&job(Some(0), json!([]))), None);
    }

    #[test]
    fn a_collected_job_is_applied_again_only_when_it_changed() {
        let applied = job(Some(0), Value::Null);
        let digest = applied_digest(&applied);
        assert!(apply_again(None, &applied), "never collected: applied");
        assert!(!apply_again(Some(&digest), &applied), "same content: not");
        let mut changed = applied.clone();
        changed["spec"]["template"]["spec"]["restartPolicy"] = json!("OnFailure");
        assert!(apply_again(Some(&digest), &changed), "a new Job: applied");
    }

    #[test]
    fn pointers_cover_paths_below_them() {
        assert!(covers("/spec/replicas", "/spec/replicas"));
        assert!(covers("/spec", "/spec/replicas"));
        assert!(!covers("/spec/rep", "/spec/replicas"));
        assert!(covers(
            "/spec/template/spec/containers/0/",
            "/spec/template/spec/containers/0/image"
        ));
    }
}
