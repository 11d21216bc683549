//! Object health with kstatus's meaning (`Current`, `InProgress`, `Failed`,
//! `Terminating`, `NotFound`, `Unknown`): built-in rules for the workload and core
//! kinds, a generic rule (observed generation, standard conditions) for everything
//! else, and how a bundle's state follows the health of its objects.
//!
//! The rules follow sigs.k8s.io/cli-utils `pkg/kstatus/status` (`core.go`,
//! `generic.go`) check by check; the code is our own. Where Flotilla differs on
//! purpose (a running Job, a failed Pod, ...: a state that gates a rollout) the
//! difference is in docs/concepts.md's table and has a case in the corpus
//! `tests/health/`. Messages give the reason only ("1/3 replicas available");
//! callers that list several objects put the object's name in front.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bundle::ObjectRef;
use crate::state::BundleState;

/// How many objects not `Current` a bundle's message names before "and N more":
/// enough to point at the culprit, short enough for a table cell.
pub const MESSAGE_OBJECTS: usize = 3;

/// kstatus's statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HealthStatus {
    /// The object is what its spec asks for.
    Current,
    /// Being reconciled; expected to become `Current`.
    InProgress,
    /// Reconciling it failed and will not fix itself.
    Failed,
    /// Being deleted.
    Terminating,
    /// Not in the cluster.
    NotFound,
    /// Its state cannot be told.
    Unknown,
}

impl HealthStatus {
    pub const ALL: [HealthStatus; 6] = [
        HealthStatus::Current,
        HealthStatus::InProgress,
        HealthStatus::Failed,
        HealthStatus::Terminating,
        HealthStatus::NotFound,
        HealthStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Current => "Current",
            HealthStatus::InProgress => "InProgress",
            HealthStatus::Failed => "Failed",
            HealthStatus::Terminating => "Terminating",
            HealthStatus::NotFound => "NotFound",
            HealthStatus::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HealthStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        HealthStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown health status {s:?}"))
    }
}

/// An object's health and the reason for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub message: String,
}

impl Health {
    fn new(status: HealthStatus, message: impl Into<String>) -> Health {
        Health {
            status,
            message: message.into(),
        }
    }

    fn current(message: impl Into<String>) -> Health {
        Health::new(HealthStatus::Current, message)
    }

    fn progressing(message: impl Into<String>) -> Health {
        Health::new(HealthStatus::InProgress, message)
    }

    fn failed(message: impl Into<String>) -> Health {
        Health::new(HealthStatus::Failed, message)
    }

    /// An object that is not in the cluster.
    pub fn not_found() -> Health {
        Health::new(HealthStatus::NotFound, "not found")
    }
}

// ---------------------------------------------------------------------------------
// Reading objects

fn int(v: &Value) -> Option<i64> {
    v.as_i64()
}

/// An integer field that Kubernetes defaults to 0 when absent.
fn count(v: &Value) -> i64 {
    int(v).unwrap_or(0)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// The status (`True`, `False`, `Unknown`) of a condition, if present.
fn condition_is<'a>(obj: &'a Value, kind: &str) -> Option<&'a str> {
    condition(obj, kind).map(|c| text(&c["status"]))
}

/// A condition as one phrase: `reason: message`, either alone, or `fallback`.
fn why(c: Option<&Value>, fallback: &str) -> String {
    let Some(c) = c else {
        return fallback.to_string();
    };
    let reason = text(&c["reason"]).trim();
    let message = text(&c["message"]).split_whitespace().collect::<Vec<_>>();
    let message = message.join(" ");
    match (reason.is_empty(), message.is_empty()) {
        (true, true) => fallback.to_string(),
        (false, true) => reason.to_string(),
        (true, false) => message,
        (false, false) => format!("{reason}: {message}"),
    }
}

fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map(|(g, _)| g).unwrap_or("")
}

// ---------------------------------------------------------------------------------
// Rules

/// The health of one object as the API server returned it.
pub fn health(obj: &Value) -> Health {
    if obj.is_null() {
        return Health::not_found();
    }
    let kind = text(&obj["kind"]);
    if !obj.is_object() || kind.is_empty() {
        return Health::new(HealthStatus::Unknown, "not a Kubernetes object");
    }
    if let Some(h) = generic_preamble(obj) {
        return h;
    }
    match (group_of(text(&obj["apiVersion"])), kind) {
        ("apps", "Deployment") => deployment(obj),
        ("apps", "StatefulSet") => stateful_set(obj),
        ("apps", "DaemonSet") => daemon_set(obj),
        ("apps", "ReplicaSet") => replica_set(obj),
        ("", "Pod") => pod(obj),
        ("batch", "Job") => job(obj),
        ("batch", "CronJob") => cron_job(obj),
        ("", "Service") => service(obj),
        ("", "PersistentVolumeClaim") => pvc(obj),
        ("", "Namespace") => namespace(obj),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => crd(obj),
        ("apiregistration.k8s.io", "APIService") => api_service(obj),
        _ => generic(obj),
    }
}

/// What holds for every kind: deletion, a spec change the controller has not seen
/// yet, and the `Reconciling`/`Stalled` conditions (kstatus's abnormal-true ones).
fn generic_preamble(obj: &Value) -> Option<Health> {
    let meta = &obj["metadata"];
    if !text(&meta["deletionTimestamp"]).is_empty() {
        let finalizers: Vec<&str> = meta["finalizers"]
            .as_array()
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let message = if finalizers.is_empty() {
            "being deleted".to_string()
        } else {
            format!("being deleted, waiting for {}", finalizers.join(", "))
        };
        return Some(Health::new(HealthStatus::Terminating, message));
    }
    if let (Some(generation), Some(observed)) = (
        int(&meta["generation"]),
        int(&obj["status"]["observedGeneration"]),
    ) {
        if observed != generation {
            return Some(Health::progressing(format!(
                "generation {generation} not yet observed (controller at {observed})"
            )));
        }
    }
    if condition_is(obj, "Stalled") == Some("True") {
        return Some(Health::failed(format!(
            "stalled: {}",
            why(condition(obj, "Stalled"), "no reason given")
        )));
    }
    if condition_is(obj, "Reconciling") == Some("True") {
        return Some(Health::progressing(format!(
            "reconciling: {}",
            why(condition(obj, "Reconciling"), "no reason given")
        )));
    }
    None
}

/// A workload controller that has not written `observedGeneration` has not looked
/// at the object yet.
fn unobserved(obj: &Value) -> Option<Health> {
    if int(&obj["status"]["observedGeneration"]).is_none() {
        Some(Health::progressing("waiting for the controller"))
    } else {
        None
    }
}

fn desired_replicas(obj: &Value) -> i64 {
    int(&obj["spec"]["replicas"]).unwrap_or(1)
}

/// kstatus's "no progress deadline": the controller then sets no `Progressing`
/// condition.
const NO_PROGRESS_DEADLINE: i64 = i32::MAX as i64;

fn deployment(obj: &Value) -> Health {
    let progressing = condition(obj, "Progressing");
    if progressing.is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded") {
        return Health::failed(format!(
            "progress deadline exceeded: {}",
            why(progressing, "no progress")
        ));
    }
    if let Some(h) = unobserved(obj) {
        return h;
    }
    let s = &obj["status"];
    let want = desired_replicas(obj);
    let (total, updated, ready, available) = (
        count(&s["replicas"]),
        count(&s["updatedReplicas"]),
        count(&s["readyReplicas"]),
        count(&s["availableReplicas"]),
    );
    if updated < want {
        return Health::progressing(format!("{updated}/{want} replicas updated"));
    }
    if total > updated {
        return Health::progressing(format!(
            "{} old replicas pending termination",
            total.saturating_sub(updated)
        ));
    }
    if available < want {
        return Health::progressing(format!("{available}/{want} replicas available"));
    }
    if ready < want {
        return Health::progressing(format!("{ready}/{want} replicas ready"));
    }
    // As kstatus: with a progress deadline the rollout is done only once the
    // controller says so (`Progressing=True`, `NewReplicaSetAvailable`), and the
    // Deployment must say it is `Available`.
    let deadline = int(&obj["spec"]["progressDeadlineSeconds"]).unwrap_or(NO_PROGRESS_DEADLINE);
    let rolled_out = progressing
        .is_some_and(|c| c["status"] == "True" && c["reason"] == "NewReplicaSetAvailable");
    if deadline != NO_PROGRESS_DEADLINE && !rolled_out {
        return Health::progressing(format!(
            "rollout not complete: {}",
            why(progressing, "no Progressing condition yet")
        ));
    }
    if condition_is(obj, "Available") != Some("True") {
        return Health::progressing(format!(
            "not available: {}",
            why(condition(obj, "Available"), "no Available condition yet")
        ));
    }
    Health::current(format!("{available}/{want} replicas available"))
}

fn stateful_set(obj: &Value) -> Health {
    if let Some(h) = unobserved(obj) {
        return h;
    }
    let s = &obj["status"];
    let want = desired_replicas(obj);
    let total = count(&s["replicas"]);
    let ready = count(&s["readyReplicas"]);
    let updated = count(&s["updatedReplicas"]);
    let current = count(&s["currentReplicas"]);
    if ready < want {
        return Health::progressing(format!("{ready}/{want} replicas ready"));
    }
    if total < want {
        return Health::progressing(format!("{total}/{want} replicas created"));
    }
    if total > want {
        return Health::progressing(format!(
            "{} extra replicas pending termination",
            total.saturating_sub(want)
        ));
    }
    let strategy = &obj["spec"]["updateStrategy"];
    // OnDelete: the user replaces pods; no revision is waited for (readiness is, above).
    if strategy["type"] == "OnDelete" {
        return Health::current(format!("{ready}/{want} replicas ready (OnDelete)"));
    }
    // A partition (the API server writes 0 when none is given): only the pods at
    // and above it must be updated, as kstatus.
    if let Some(partition) = int(&strategy["rollingUpdate"]["partition"]) {
        let target = want.saturating_sub(partition);
        if updated < target {
            return Health::progressing(format!("{updated}/{target} replicas updated"));
        }
        return Health::current(format!("{ready}/{want} replicas ready"));
    }
    if current < want {
        return Health::progressing(format!("{current}/{want} replicas current"));
    }
    if text(&s["currentRevision"]) != text(&s["updateRevision"]) {
        return Health::progressing(format!(
            "revision {} not yet current ({updated}/{want} replicas updated)",
            text(&s["updateRevision"])
        ));
    }
    Health::current(format!("{ready}/{want} replicas ready"))
}

fn daemon_set(obj: &Value) -> Health {
    // As kstatus: a DaemonSet's controller always writes these, so their absence
    // means it has not acted on the object yet.
    if int(&obj["metadata"]["generation"]).is_none() {
        return Health::progressing("no metadata.generation yet");
    }
    if let Some(h) = unobserved(obj) {
        return h;
    }
    let s = &obj["status"];
    let Some(want) = int(&s["desiredNumberScheduled"]) else {
        return Health::progressing("the number of pods to schedule is not yet known");
    };
    let scheduled = count(&s["currentNumberScheduled"]);
    let updated = count(&s["updatedNumberScheduled"]);
    let available = count(&s["numberAvailable"]);
    let ready = count(&s["numberReady"]);
    if scheduled < want {
        return Health::progressing(format!("{scheduled}/{want} pods scheduled"));
    }
    if updated < want {
        return Health::progressing(format!("{updated}/{want} pods updated"));
    }
    if available < want {
        return Health::progressing(format!("{available}/{want} pods available"));
    }
    if ready < want {
        return Health::progressing(format!("{ready}/{want} pods ready"));
    }
    Health::current(format!("{available}/{want} pods available"))
}

fn replica_set(obj: &Value) -> Health {
    if let Some(h) = unobserved(obj) {
        return h;
    }
    if condition_is(obj, "ReplicaFailure") == Some("True") {
        return Health::progressing(format!(
            "replica failure: {}",
            why(condition(obj, "ReplicaFailure"), "no reason given")
        ));
    }
    let s = &obj["status"];
    let want = desired_replicas(obj);
    let total = count(&s["replicas"]);
    let labelled = count(&s["fullyLabeledReplicas"]);
    let available = count(&s["availableReplicas"]);
    let ready = count(&s["readyReplicas"]);
    if labelled < want {
        return Health::progressing(format!("{labelled}/{want} replicas fully labelled"));
    }
    if available < want {
        return Health::progressing(format!("{available}/{want} replicas available"));
    }
    if ready < want {
        return Health::progressing(format!("{ready}/{want} replicas ready"));
    }
    if total > want {
        return Health::progressing(format!(
            "{} extra replicas pending termination",
            total.saturating_sub(want)
        ));
    }
    Health::current(format!("{available}/{want} replicas available"))
}

/// Container waiting reasons that do not heal without a change to the object.
/// (`CreateContainerConfigError` is not one: it heals when the missing ConfigMap
/// or Secret appears, as kstatus has it.)
const STUCK_REASONS: [&str; 3] = ["CrashLoopBackOff", "InvalidImageName", "ErrImageNeverPull"];

fn pod(obj: &Value) -> Health {
    let s = &obj["status"];
    match text(&s["phase"]) {
        "Succeeded" => return Health::current("completed"),
        "Failed" => {
            let reason = [text(&s["reason"]), text(&s["message"])]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            return Health::failed(if reason.is_empty() {
                "failed".to_string()
            } else {
                format!("failed: {reason}")
            });
        }
        // The node stopped reporting (kstatus cannot tell either).
        "Unknown" => {
            return Health::new(
                HealthStatus::Unknown,
                format!(
                    "phase Unknown: {}",
                    match text(&s["reason"]) {
                        "" => "its node does not report",
                        r => r,
                    }
                ),
            )
        }
        _ => {}
    }
    let containers = ["initContainerStatuses", "containerStatuses"]
        .into_iter()
        .filter_map(|f| s[f].as_array())
        .flatten();
    let mut waiting = None;
    for c in containers {
        let reason = text(&c["state"]["waiting"]["reason"]);
        if reason.is_empty() {
            continue;
        }
        let line = format!("container {}: {reason}", text(&c["name"]));
        if STUCK_REASONS.contains(&reason) {
            return Health::failed(line);
        }
        waiting.get_or_insert(line);
    }
    if condition_is(obj, "Ready") == Some("True") {
        return Health::current("running and ready");
    }
    let scheduled = condition(obj, "PodScheduled");
    if scheduled.is_some_and(|c| c["status"] == "False") {
        // The scheduler found no node (kstatus: Failed once the pod is 15 s old).
        if scheduled.is_some_and(|c| c["reason"] == "Unschedulable") {
            let message = scheduled.map(|c| text(&c["message"])).unwrap_or_default();
            let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
            return Health::failed(if message.is_empty() {
                "unschedulable".to_string()
            } else {
                format!("unschedulable: {message}")
            });
        }
        return Health::progressing(format!("not scheduled: {}", why(scheduled, "pending")));
    }
    if let Some(line) = waiting {
        return Health::progressing(line);
    }
    match text(&s["phase"]) {
        "Running" => Health::progressing(format!(
            "running, not ready: {}",
            why(condition(obj, "Ready"), "containers not ready")
        )),
        "" => Health::progressing("pending"),
        phase => Health::progressing(format!("phase {phase}")),
    }
}

fn job(obj: &Value) -> Health {
    let s = &obj["status"];
    if condition_is(obj, "Failed") == Some("True") {
        return Health::failed(format!(
            "failed: {}",
            why(condition(obj, "Failed"), "no reason given")
        ));
    }
    let completions = int(&obj["spec"]["completions"]).unwrap_or(1);
    let succeeded = count(&s["succeeded"]);
    if condition_is(obj, "Complete") == Some("True") {
        return Health::current(format!("completed: {succeeded}/{completions} succeeded"));
    }
    // As kstatus: suspended only while the spec still asks for it (a resumed Job
    // whose condition the controller has not cleared yet is not).
    if condition_is(obj, "Suspended") == Some("True") && obj["spec"]["suspend"] == true {
        return Health::current("suspended");
    }
    if s["startTime"].is_null() {
        return Health::progressing("not started");
    }
    // kstatus calls a started Job `Current`; Flotilla waits for it to finish, so
    // that a rollout gated on the bundle does not pass a migration that may fail.
    let failed = count(&s["failed"]);
    let active = count(&s["active"]);
    let mut message = format!("running: {succeeded}/{completions} succeeded, {active} active");
    if failed > 0 {
        message.push_str(&format!(", {failed} failed"));
    }
    Health::progressing(message)
}

fn cron_job(obj: &Value) -> Health {
    let schedule = text(&obj["spec"]["schedule"]);
    if obj["spec"]["suspend"] == true {
        return Health::current(format!("suspended (schedule {schedule})"));
    }
    Health::current(format!("schedule {schedule}"))
}

fn service(obj: &Value) -> Health {
    let kind = match text(&obj["spec"]["type"]) {
        "" => "ClusterIP",
        t => t,
    };
    if kind != "LoadBalancer" {
        return Health::current(kind);
    }
    // As kstatus: a LoadBalancer needs its cluster IP, not an external address
    // (a cluster without a load-balancer controller never gives one).
    if text(&obj["spec"]["clusterIP"]).is_empty() {
        return Health::progressing("waiting for a cluster IP");
    }
    let addresses: Vec<&str> = obj["status"]["loadBalancer"]["ingress"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|i| {
                    i["ip"]
                        .as_str()
                        .or_else(|| i["hostname"].as_str())
                        .unwrap_or("?")
                })
                .collect()
        })
        .unwrap_or_default();
    if addresses.is_empty() {
        Health::current("LoadBalancer, no external address yet")
    } else {
        Health::current(format!("load balancer at {}", addresses.join(", ")))
    }
}

/// kstatus has `Lost` `InProgress`; Flotilla `Failed`: the volume never comes back.
fn pvc(obj: &Value) -> Health {
    match text(&obj["status"]["phase"]) {
        "Bound" => Health::current(format!("bound to {}", text(&obj["spec"]["volumeName"]))),
        "Lost" => Health::failed("its volume is lost"),
        "" => Health::progressing("pending"),
        phase => Health::progressing(format!("phase {phase}")),
    }
}

fn namespace(obj: &Value) -> Health {
    match text(&obj["status"]["phase"]) {
        "Terminating" => Health::new(HealthStatus::Terminating, "being deleted"),
        _ => Health::current("active"),
    }
}

fn crd(obj: &Value) -> Health {
    if condition_is(obj, "NamesAccepted") == Some("False") {
        return Health::failed(format!(
            "names not accepted: {}",
            why(condition(obj, "NamesAccepted"), "no reason given")
        ));
    }
    let established = condition(obj, "Established");
    match established.map(|c| (text(&c["status"]), text(&c["reason"]))) {
        Some(("True", _)) => Health::current("established"),
        // As kstatus: only `Installing` is on its way.
        Some(("False", reason)) if reason != "Installing" => Health::failed(format!(
            "not established: {}",
            why(established, "no reason given")
        )),
        _ => Health::progressing("not yet established"),
    }
}

/// kstatus has no APIService rule (it would be `Current`); an unavailable aggregated
/// API breaks discovery for the whole cluster, so Flotilla waits for `Available`.
fn api_service(obj: &Value) -> Health {
    match condition_is(obj, "Available") {
        Some("True") => Health::current("available"),
        Some(_) => Health::progressing(format!(
            "not available: {}",
            why(condition(obj, "Available"), "no reason given")
        )),
        None => Health::progressing("availability not yet checked"),
    }
}

/// Any other kind: the `Ready` condition decides when present (`False` or
/// `Unknown`: in progress; other values are ignored, as kstatus does); an object
/// without it (or without a status at all, as a ConfigMap) is current.
fn generic(obj: &Value) -> Health {
    let c = condition(obj, "Ready");
    match c.map(|c| text(&c["status"])) {
        Some("True") => Health::current(why_true(c, "Ready")),
        Some("False" | "Unknown") => {
            Health::progressing(format!("not ready: {}", why(c, "no reason given")))
        }
        _ if obj["status"].is_null() => Health::current("no status to wait for"),
        _ => Health::current("current"),
    }
}

/// A true condition's message, else its name in lowercase ("ready").
fn why_true(c: Option<&Value>, kind: &str) -> String {
    let message = c.map(|c| text(&c["message"]).trim()).unwrap_or_default();
    if message.is_empty() {
        kind.to_lowercase()
    } else {
        message.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

// ---------------------------------------------------------------------------------
// Bundles

/// A bundle's state from its objects' health (in apply order): `Ready` when every
/// object is `Current`, else `NotReady`, naming the first few objects that are not
/// (failures first) with their reasons: "Deployment demo/web: 1/3 replicas
/// available; Job demo/migrate: failed: BackoffLimitExceeded".
pub fn bundle_health<'a>(
    objects: impl IntoIterator<Item = (&'a ObjectRef, &'a Health)>,
) -> (BundleState, String) {
    let mut bad: Vec<(&ObjectRef, &Health)> = objects
        .into_iter()
        .filter(|(_, h)| h.status != HealthStatus::Current)
        .collect();
    if bad.is_empty() {
        return (BundleState::Ready, String::new());
    }
    // Stable: objects of the same severity keep their apply order.
    bad.sort_by_key(|(_, h)| h.status != HealthStatus::Failed);
    let mut parts: Vec<String> = bad
        .iter()
        .take(MESSAGE_OBJECTS)
        .map(|(r, h)| {
            if h.message.is_empty() {
                format!("{r}: {}", h.status)
            } else {
                format!("{r}: {}", h.message)
            }
        })
        .collect();
    if bad.len() > MESSAGE_OBJECTS {
        parts.push(format!("and {} more", bad.len() - MESSAGE_OBJECTS));
    }
    (BundleState::NotReady, parts.join("; "))
}

/// The objects in a YAML stream, as `kubectl get -o yaml` or a manifest file gives
/// them: several documents (or JSON objects), each an object or a list (`kind:
/// List`, `PodList`, ...) whose items are expanded. Empty documents are skipped.
pub fn objects_in_yaml(yaml: &str) -> Result<Vec<Value>, String> {
    crate::documents::objects("", yaml.as_bytes()).map_err(|e| match e.line {
        Some(line) => format!("{} (line {line})", e.reason),
        None => e.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(kind: &str, name: &str) -> ObjectRef {
        ObjectRef {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            namespace: Some("demo".into()),
            name: name.into(),
        }
    }

    #[test]
    fn names_round_trip() {
        for s in HealthStatus::ALL {
            assert_eq!(s.to_string().parse::<HealthStatus>().unwrap(), s);
        }
    }

    #[test]
    fn bundle_ready_only_when_all_current() {
        let ok = Health::current("fine");
        let (a, b) = (r("Deployment", "a"), r("Deployment", "b"));
        assert_eq!(
            bundle_health([(&a, &ok), (&b, &ok)]),
            (BundleState::Ready, String::new())
        );
        assert_eq!(bundle_health([]), (BundleState::Ready, String::new()));
        let slow = Health::progressing("1/3 replicas available");
        let broken = Health::failed("failed: BackoffLimitExceeded");
        let job = ObjectRef {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            namespace: Some("demo".into()),
            name: "migrate".into(),
        };
        assert_eq!(
            bundle_health([(&a, &slow), (&b, &ok), (&job, &broken)]),
            (
                BundleState::NotReady,
                "Job demo/migrate: failed: BackoffLimitExceeded; Deployment demo/a: 1/3 replicas available".into()
            )
        );
    }

    #[test]
    fn bundle_message_is_bounded() {
        let refs: Vec<ObjectRef> = (0..5).map(|i| r("Deployment", &format!("d{i}"))).collect();
        let h = Health::progressing("");
        let (st, msg) = bundle_health(refs.iter().map(|r| (r, &h)));
        assert_eq!(st, BundleState::NotReady);
        assert_eq!(
            msg,
            "Deployment demo/d0: InProgress; Deployment demo/d1: InProgress; Deployment demo/d2: InProgress; and 2 more"
        );
    }

    #[test]
    fn not_objects() {
        assert_eq!(health(&Value::Null).status, HealthStatus::NotFound);
        assert_eq!(health(&json!("x")).status, HealthStatus::Unknown);
        assert_eq!(
            health(&json!({"apiVersion": "v1"})).status,
            HealthStatus::Unknown
        );
    }

    /// Abuse: `flotilla health -f` reads whatever a user gives it. Extreme counts,
    /// fields of the wrong type and empty objects of every built-in kind give a
    /// health, never a panic (debug builds check integer overflow).
    #[test]
    fn extreme_and_mistyped_fields_never_panic() {
        let kinds = [
            ("apps/v1", "Deployment"),
            ("apps/v1", "StatefulSet"),
            ("apps/v1", "DaemonSet"),
            ("apps/v1", "ReplicaSet"),
            ("v1", "Pod"),
            ("batch/v1", "Job"),
            ("v1", "Service"),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
            ("example.com/v1", "Widget"),
        ];
        for (api_version, kind) in kinds {
            for n in [i64::MIN, -1, i64::MAX] {
                let obj = json!({
                    "apiVersion": api_version, "kind": kind,
                    "metadata": {"name": "x", "generation": 1},
                    "spec": {"replicas": n, "updateStrategy": {"rollingUpdate": {"partition": -n.saturating_add(1)}},
                        "completions": n, "progressDeadlineSeconds": n},
                    "status": {"observedGeneration": 1, "replicas": -n.saturating_add(1), "updatedReplicas": n,
                        "readyReplicas": n, "availableReplicas": n, "currentReplicas": n,
                        "desiredNumberScheduled": n, "succeeded": n, "startTime": "t"}
                });
                health(&obj);
            }
            let mistyped = json!({
                "apiVersion": api_version, "kind": kind,
                "metadata": {"name": 7, "deletionTimestamp": 5, "generation": "1"},
                "spec": {"replicas": "3", "type": 1, "clusterIP": []},
                "status": {"conditions": "Ready", "phase": 3, "containerStatuses": [1, null],
                    "loadBalancer": {"ingress": [1]}}
            });
            health(&mistyped);
            health(&json!({"apiVersion": api_version, "kind": kind}));
        }
    }

    #[test]
    fn yaml_streams_and_lists() {
        let objs = objects_in_yaml(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n---\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: c}\n",
        )
        .unwrap();
        let names: Vec<&str> = objs
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(objects_in_yaml("a: [")
            .unwrap_err()
            .starts_with("invalid YAML"));
    }
}
