//! Kubernetes Events the agent records in its cluster, as Flux's controllers do:
//! `ApplyFailed` (Warning) when an object of a bundle is not applied (the API
//! server refused it, or does not serve its kind), `DriftCorrected` (Normal) when
//! the agent put back an object someone else changed or deleted. They regard the
//! object (which may not exist yet); the Event lives in its namespace, or in
//! `default` for a cluster-scoped object, as kubectl records them.
//!
//! What to record and when is decided here, purely: [`apply_failed`] and
//! [`drift_corrected`] make a [`Note`] (a drift's note names field paths and the
//! managers, never a value: a Secret's data never reaches an Event); [`Dedupe`]
//! decides whether a note becomes a new Event, a repeat counted on the Event
//! already recorded (its `series`), or nothing yet; [`event`] builds the
//! `events.k8s.io/v1` object. [`Events`] is the thin I/O: a handle whose
//! [`Events::record`] never waits (a bounded queue; a full queue drops the note,
//! counted) and one task writing what the dedupe lets through, each call under a
//! timeout. A refused or timed-out write is logged and counted; nothing else
//! happens, and no reconcile waits for it.
//!
//! Why not `kube::runtime::events::Recorder` (kube 5): it keys its cache on the
//! object, reason and action but not the note, so a second, different message
//! about the same object (another failure, other drifted fields) only bumps the
//! series of the first Event, which keeps showing the first message; it writes to
//! the API server on every repeat (one patch per retry of a failing apply); and its
//! cache is bounded only by time. Here a note is the same note only with the same
//! object, reason and message; a repeat is written at most every [`QUIET_MS`]; and
//! the cache holds at most [`CAPACITY`] notes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_shared::bundle::ObjectRef;
use flotilla_shared::drift::FieldDiff;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::clock::SharedClock;
use crate::metrics::Metrics;

/// The reporting component, `reportingController` (`source.component` in core/v1).
pub const COMPONENT: &str = "flotilla-agent";
/// An object of a bundle was not applied.
pub const APPLY_FAILED: &str = "ApplyFailed";
/// An object changed or deleted by someone else was put back.
pub const DRIFT_CORRECTED: &str = "DriftCorrected";
/// Where the Events of cluster-scoped objects go, as kubectl puts them.
pub const CLUSTER_SCOPED_NAMESPACE: &str = "default";
/// The API server refuses a longer note (events.k8s.io/v1: 1 kB).
pub const NOTE_MAX: usize = 1024;
/// A note seen again within this long of its last write is only counted; after it,
/// the count is written on the Event (its `series`).
pub const QUIET_MS: i64 = 5 * 60 * 1000;
/// A note not seen for this long is forgotten: its next occurrence is a new Event.
pub const FORGET_MS: i64 = 15 * 60 * 1000;
/// At most this many notes are remembered; the least recently seen goes first.
pub const CAPACITY: usize = 1024;
/// Notes waiting for the writing task; more are dropped (counted).
const QUEUE: usize = 256;
/// One write to the API server may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Drifted paths named in a note; the rest are counted.
const PATHS_SHOWN: usize = 20;

/// The Event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    Normal,
    Warning,
}

impl Type {
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Normal => "Normal",
            Type::Warning => "Warning",
        }
    }
}

/// An Event to record: what it regards, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub regarding: ObjectRef,
    /// The object's uid when known (kubectl describe matches Events on it); not
    /// part of what makes two notes the same.
    pub uid: Option<String>,
    pub type_: Type,
    pub reason: &'static str,
    pub action: &'static str,
    /// At most [`NOTE_MAX`] bytes.
    pub message: String,
}

impl Note {
    fn key(&self) -> Key {
        Key {
            regarding: self.regarding.clone(),
            reason: self.reason,
            message: self.message.clone(),
        }
    }
}

fn capped(mut message: String) -> String {
    flotilla_shared::caps::cut(&mut message, NOTE_MAX);
    message
}

/// An object of `bundle` was not applied: the API server's `reason` (or why the
/// agent could not try), and the file it came from when known.
pub fn apply_failed(bundle: &str, file: Option<&str>, object: &ObjectRef, reason: &str) -> Note {
    let from = file.map(|f| format!(" ({f})")).unwrap_or_default();
    Note {
        regarding: object.clone(),
        uid: None,
        type_: Type::Warning,
        reason: APPLY_FAILED,
        action: "Apply",
        message: capped(format!(
            "bundle {bundle}: cannot apply {object}{from}: {reason}"
        )),
    }
}

/// The agent put back an object of `bundle` that someone else changed (`fields`)
/// or deleted. Names the paths and the managers that changed them; never a value.
pub fn drift_corrected(
    bundle: &str,
    object: &ObjectRef,
    uid: Option<String>,
    deleted: bool,
    fields: &[FieldDiff],
) -> Note {
    let message = if deleted {
        format!("bundle {bundle}: {object} was deleted by someone else; created it again")
    } else {
        let mut paths: Vec<&str> = fields
            .iter()
            .take(PATHS_SHOWN)
            .map(|f| f.path.as_str())
            .collect();
        let more = format!("and {} more", fields.len().saturating_sub(PATHS_SHOWN));
        if fields.len() > PATHS_SHOWN {
            paths.push(&more);
        }
        let mut managers: Vec<&str> = Vec::new();
        for f in fields.iter().filter(|f| !f.manager.is_empty()) {
            if !managers.contains(&f.manager.as_str()) {
                managers.push(&f.manager);
            }
        }
        let by = if managers.is_empty() {
            "an unknown manager".to_string()
        } else {
            managers.join(", ")
        };
        format!(
            "bundle {bundle}: put back {object}: {} changed by {by}",
            paths.join(", ")
        )
    };
    Note {
        regarding: object.clone(),
        uid,
        type_: Type::Normal,
        reason: DRIFT_CORRECTED,
        action: "CorrectDrift",
        message: capped(message),
    }
}

/// The namespace an Event about `object` lives in.
pub fn namespace_of(object: &ObjectRef) -> &str {
    object
        .namespace
        .as_deref()
        .unwrap_or(CLUSTER_SCOPED_NAMESPACE)
}

/// The start of an Event's name from the object's name (`generateName`: the
/// server appends a random suffix): a valid prefix whatever the object is called.
pub fn name_prefix(object_name: &str) -> String {
    let s: String = object_name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(200)
        .collect();
    let s = s.trim_matches('-');
    let s = if s.is_empty() { COMPONENT } else { s };
    format!("{s}-")
}

/// Who records: the component and this agent's cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

impl Reporter {
    /// `flotilla-agent`, in cluster `cluster` (the reporting instance).
    pub fn agent(cluster: &str) -> Reporter {
        let mut instance = cluster.to_string();
        // The API server's limit on reportingInstance.
        instance.truncate(128);
        Reporter {
            controller: COMPONENT.to_string(),
            instance,
        }
    }
}

fn micro_time(unix_ms: i64) -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::from_millisecond(unix_ms).unwrap_or_default())
}

/// The events.k8s.io/v1 Event for a new note, at `now_unix_ms`.
pub fn event(note: &Note, reporter: &Reporter, now_unix_ms: i64) -> K8sEvent {
    let r = &note.regarding;
    K8sEvent {
        metadata: ObjectMeta {
            namespace: Some(namespace_of(r).to_string()),
            generate_name: Some(name_prefix(&r.name)),
            ..Default::default()
        },
        event_time: Some(micro_time(now_unix_ms)),
        type_: Some(note.type_.as_str().to_string()),
        reason: Some(note.reason.to_string()),
        action: Some(note.action.to_string()),
        note: Some(note.message.clone()),
        regarding: Some(ObjectReference {
            api_version: Some(r.api_version.clone()),
            kind: Some(r.kind.clone()),
            namespace: r.namespace.clone(),
            name: Some(r.name.clone()),
            uid: note.uid.clone(),
            ..Default::default()
        }),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        ..Default::default()
    }
}

/// The merge patch that counts `count` occurrences of an Event, the last at `now`.
pub fn series_patch(count: i32, now_unix_ms: i64) -> serde_json::Value {
    serde_json::json!({
        "series": EventSeries {
            count,
            last_observed_time: micro_time(now_unix_ms),
        }
    })
}

/// What makes two notes the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    regarding: ObjectRef,
    reason: &'static str,
    message: String,
}

/// What to do with a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Record a new Event.
    Create,
    /// Count it on the Event recorded before: `count` occurrences so far.
    Repeat {
        namespace: String,
        name: String,
        count: i32,
    },
    /// Seen within [`QUIET_MS`] of the last write: counted, written later.
    Quiet,
}

#[derive(Debug)]
struct Seen {
    /// The Event recorded for it, once one was.
    event: Option<String>,
    /// Occurrences counted on that Event.
    count: i32,
    written_ms: i64,
    seen_ms: i64,
}

/// Which notes become Events (pure): remembers at most `capacity` notes.
#[derive(Debug)]
pub struct Dedupe {
    seen: HashMap<Key, Seen>,
    capacity: usize,
}

impl Default for Dedupe {
    fn default() -> Self {
        Dedupe::new(CAPACITY)
    }
}

impl Dedupe {
    pub fn new(capacity: usize) -> Dedupe {
        Dedupe {
            seen: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The number of notes remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// A note occurred at `now`: what to write.
    pub fn decide(&mut self, note: &Note, now_unix_ms: i64) -> Decision {
        self.seen.retain(|_, s| now_unix_ms - s.seen_ms < FORGET_MS);
        let key = note.key();
        if let Some(s) = self.seen.get_mut(&key) {
            s.seen_ms = now_unix_ms;
            s.count = s.count.saturating_add(1);
            if now_unix_ms - s.written_ms < QUIET_MS {
                return Decision::Quiet;
            }
            s.written_ms = now_unix_ms;
            return match &s.event {
                Some(name) => Decision::Repeat {
                    namespace: namespace_of(&note.regarding).to_string(),
                    name: name.clone(),
                    count: s.count,
                },
                // Its Event was never recorded (refused): try again, a first one.
                None => {
                    s.count = 1;
                    Decision::Create
                }
            };
        }
        if self.seen.len() >= self.capacity {
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(_, s)| s.seen_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.seen.remove(&k);
            }
        }
        self.seen.insert(
            key,
            Seen {
                event: None,
                count: 1,
                written_ms: now_unix_ms,
                seen_ms: now_unix_ms,
            },
        );
        Decision::Create
    }

    /// The note's Event was created as `name` (a first occurrence).
    pub fn created(&mut self, note: &Note, name: String) {
        if let Some(s) = self.seen.get_mut(&note.key()) {
            s.event = Some(name);
            s.count = 1;
        }
    }
}

/// Why a write did not happen.
enum Failure {
    /// The Event to count on is gone (expired): record a new one.
    Gone,
    Other(String),
}

async fn call<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(kube::Error::Api(s))) if s.is_not_found() => Err(Failure::Gone),
        Ok(Err(e)) => Err(Failure::Other(crate::apply::reason(&e))),
        Err(_) => Err(Failure::Other(format!(
            "no answer within {}s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// Records notes as Events. Cheap to clone; [`Events::disabled`] records nothing.
#[derive(Clone)]
pub struct Events {
    /// The writing task's queue (notes with the time they occurred), and the clock.
    tx: Option<(mpsc::Sender<(Note, i64)>, SharedClock)>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("enabled", &self.tx.is_some())
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Records nothing (tests, tools).
    pub fn disabled() -> Events {
        Events {
            tx: None,
            metrics: None,
        }
    }

    /// Starts the task that records Events with `client` until `shutdown`.
    pub fn spawn(
        client: kube::Client,
        reporter: Reporter,
        clock: SharedClock,
        metrics: Option<Arc<Metrics>>,
        shutdown: watch::Receiver<bool>,
    ) -> Events {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(
            rx,
            client,
            reporter,
            metrics.clone(),
            shutdown,
        ));
        Events {
            tx: Some((tx, clock)),
            metrics,
        }
    }

    /// Queues a note, stamped now; never waits. A full queue drops it (counted).
    pub fn record(&self, note: Note) {
        let Some((tx, clock)) = &self.tx else {
            return;
        };
        if let Err(e) = tx.try_send((note, clock.now_unix_ms())) {
            debug!(reason = %e, "event not recorded: the queue is full or closed");
            if let Some(m) = &self.metrics {
                m.event_errors.inc();
            }
        }
    }
}

/// The writing task: one note at a time, as the dedupe decides.
async fn write_events(
    mut rx: mpsc::Receiver<(Note, i64)>,
    client: kube::Client,
    reporter: Reporter,
    metrics: Option<Arc<Metrics>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut dedupe = Dedupe::default();
    let mut failing = false;
    loop {
        let (note, now) = tokio::select! {
            n = rx.recv() => match n {
                Some(n) => n,
                None => return,
            },
            _ = crate::stopped(&mut shutdown) => return,
        };
        let api: Api<K8sEvent> = Api::namespaced(client.clone(), namespace_of(&note.regarding));
        let create = async {
            let made =
                call(api.create(&PostParams::default(), &event(&note, &reporter, now))).await?;
            Ok::<_, Failure>(made.metadata.name.unwrap_or_default())
        };
        let done = match dedupe.decide(&note, now) {
            Decision::Quiet => {
                debug!(object = %note.regarding, reason = note.reason, "event repeated; counted");
                continue;
            }
            Decision::Create => create.await.map(|name| dedupe.created(&note, name)),
            Decision::Repeat { name, count, .. } => {
                let patch = series_patch(count, now);
                match call(api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))).await {
                    Ok(_) => Ok(()),
                    Err(Failure::Gone) => create.await.map(|name| dedupe.created(&note, name)),
                    Err(e) => Err(e),
                }
            }
        };
        match done {
            Ok(()) => {
                debug!(object = %note.regarding, reason = note.reason, "event recorded");
                failing = false;
                if let Some(m) = &metrics {
                    m.events.inc();
                }
            }
            Err(e) => {
                let why = match e {
                    Failure::Gone => "not found".to_string(),
                    Failure::Other(why) => why,
                };
                // The first failure of a run is a warning; the ones after it are
                // noise (RBAC without events, an API server away).
                if failing {
                    debug!(object = %note.regarding, reason = note.reason, error = %why, "cannot record an event");
                } else {
                    warn!(object = %note.regarding, reason = note.reason, error = %why, "cannot record an event");
                }
                failing = true;
                if let Some(m) = &metrics {
                    m.event_errors.inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(kind: &str, ns: Option<&str>, name: &str) -> ObjectRef {
        ObjectRef {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: ns.map(str::to_string),
            name: name.into(),
        }
    }

    fn field(
        path: &str,
        desired: serde_json::Value,
        live: serde_json::Value,
        by: &str,
    ) -> FieldDiff {
        FieldDiff {
            path: path.into(),
            desired,
            live,
            manager: by.into(),
        }
    }

    #[test]
    fn an_apply_failure_names_the_bundle_the_object_and_the_reason() {
        let o = obj("ConfigMap", Some("team-a"), "bad");
        let n = apply_failed(
            "apps-web",
            Some("web/cm.yaml"),
            &o,
            "ConfigMap \"bad\" is invalid: metadata.labels: Invalid value",
        );
        assert_eq!(n.type_, Type::Warning);
        assert_eq!(n.reason, "ApplyFailed");
        assert_eq!(n.regarding, o);
        assert_eq!(
            n.message,
            "bundle apps-web: cannot apply ConfigMap team-a/bad (web/cm.yaml): \
             ConfigMap \"bad\" is invalid: metadata.labels: Invalid value"
        );
    }

    #[test]
    fn a_long_reason_is_cut_to_what_the_api_server_takes() {
        let n = apply_failed("b", None, &obj("ConfigMap", None, "x"), &"é".repeat(5000));
        assert!(n.message.len() <= NOTE_MAX, "{}", n.message.len());
        assert!(n.message.contains("…[truncated"), "{}", n.message);
    }

    #[test]
    fn a_drift_correction_names_paths_and_managers() {
        let o = obj("ConfigMap", Some("demo"), "settings");
        let fields = vec![
            field("/data/mode", json!("blue"), json!("green"), "kubectl-edit"),
            field("/data/size", json!("3"), json!("4"), "kubectl-edit"),
            field("/metadata/labels/x", json!("a"), json!("b"), "other"),
        ];
        let n = drift_corrected("demo-app", &o, Some("u-1".into()), false, &fields);
        assert_eq!(n.type_, Type::Normal);
        assert_eq!(n.reason, "DriftCorrected");
        assert_eq!(n.uid.as_deref(), Some("u-1"));
        assert_eq!(
            n.message,
            "bundle demo-app: put back ConfigMap demo/settings: /data/mode, /data/size, \
             /metadata/labels/x changed by kubectl-edit, other"
        );
        let gone = drift_corrected("demo-app", &o, None, true, &[]);
        assert_eq!(
            gone.message,
            "bundle demo-app: ConfigMap demo/settings was deleted by someone else; created it again"
        );
        let unknown = drift_corrected("b", &o, None, false, &[field("/a", json!(1), json!(2), "")]);
        assert!(
            unknown
                .message
                .ends_with("/a changed by an unknown manager"),
            "{}",
            unknown.message
        );
    }

    #[test]
    fn a_secret_drift_note_carries_no_value() {
        let o = obj("Secret", Some("demo"), "creds");
        let fields = vec![
            field(
                "/data/password",
                json!("aHVudGVyMg=="),
                json!("c3dvcmRmaXNo"),
                "kubectl-edit",
            ),
            field(
                "/stringData/token",
                json!("hunter2"),
                json!("swordfish"),
                "kubectl-edit",
            ),
        ];
        let n = drift_corrected("b", &o, None, false, &fields);
        for value in ["aHVudGVyMg==", "c3dvcmRmaXNo", "hunter2", "swordfish"] {
            assert!(!n.message.contains(value), "{value} in {}", n.message);
            let e = serde_json::to_string(&event(&n, &Reporter::agent("c"), 0)).unwrap();
            assert!(!e.contains(value), "{value} in {e}");
        }
        assert!(
            n.message.contains("/data/password, /stringData/token"),
            "{}",
            n.message
        );
    }

    #[test]
    fn many_paths_are_counted_not_listed() {
        let fields: Vec<FieldDiff> = (0..30)
            .map(|i| field(&format!("/data/k{i}"), json!(1), json!(2), "m"))
            .collect();
        let n = drift_corrected("b", &obj("ConfigMap", Some("n"), "c"), None, false, &fields);
        assert!(
            n.message.contains("/data/k19, and 10 more changed by m"),
            "{}",
            n.message
        );
        assert!(!n.message.contains("/data/k20"), "{}", n.message);
    }

    #[test]
    fn events_of_cluster_scoped_objects_go_to_default() {
        let r = Reporter::agent("prod-eu-1");
        let cluster = apply_failed("b", None, &obj("Namespace", None, "team-x"), "forbidden");
        let e = event(&cluster, &r, 1_700_000_000_123);
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(e.regarding.as_ref().unwrap().namespace, None);
        let ns = apply_failed("b", None, &obj("ConfigMap", Some("team-a"), "x"), "no");
        let e = event(&ns, &r, 1_700_000_000_123);
        assert_eq!(e.metadata.namespace.as_deref(), Some("team-a"));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["reportingController"], "flotilla-agent");
        assert_eq!(v["reportingInstance"], "prod-eu-1");
        assert_eq!(v["type"], "Warning");
        assert_eq!(v["reason"], "ApplyFailed");
        assert_eq!(v["action"], "Apply");
        assert_eq!(v["regarding"]["kind"], "ConfigMap");
        assert_eq!(v["regarding"]["apiVersion"], "v1");
        assert_eq!(v["regarding"]["name"], "x");
        assert_eq!(v["metadata"]["generateName"], "x-");
        assert_eq!(v["eventTime"], "2023-11-14T22:13:20.123000Z");
        assert!(v.get("series").is_none(), "{v}");
        assert_eq!(
            series_patch(3, 1_700_000_000_123),
            json!({"series": {"count": 3, "lastObservedTime": "2023-11-14T22:13:20.123000Z"}})
        );
    }

    #[test]
    fn event_names_are_dns_subdomains_whatever_the_object_is_called() {
        assert_eq!(name_prefix("web"), "web-");
        assert_eq!(name_prefix("my.app.v2"), "my-app-v2-");
        assert_eq!(name_prefix("system:Controller_X"), "system-controller-x-");
        assert_eq!(name_prefix("--"), "flotilla-agent-");
        assert_eq!(name_prefix(&"a".repeat(300)).len(), 201);
    }

    #[test]
    fn a_repeated_note_is_counted_on_one_event_and_written_at_most_every_few_minutes() {
        let mut d = Dedupe::default();
        let n = apply_failed("b", None, &obj("ConfigMap", Some("ns"), "x"), "invalid");
        let t0 = 1_000_000;
        assert_eq!(d.decide(&n, t0), Decision::Create);
        d.created(&n, "x.abcde".into());
        // Retried every 5 s for almost five minutes: nothing written.
        let mut t = t0;
        for _ in 0..59 {
            t += 5_000;
            assert_eq!(d.decide(&n, t), Decision::Quiet);
        }
        t += 5_000;
        assert_eq!(
            d.decide(&n, t),
            Decision::Repeat {
                namespace: "ns".into(),
                name: "x.abcde".into(),
                count: 61
            }
        );
        assert_eq!(d.decide(&n, t + 5_000), Decision::Quiet);
        // Another message about the same object is another Event at once.
        let other = apply_failed("b", None, &obj("ConfigMap", Some("ns"), "x"), "forbidden");
        assert_eq!(d.decide(&other, t + 6_000), Decision::Create);
        // So is the same message about another object.
        let elsewhere = apply_failed("b", None, &obj("ConfigMap", Some("ns2"), "x"), "invalid");
        assert_eq!(d.decide(&elsewhere, t + 7_000), Decision::Create);
    }

    #[test]
    fn a_note_gone_quiet_is_forgotten_and_starts_a_new_event() {
        let mut d = Dedupe::default();
        let n = drift_corrected("b", &obj("ConfigMap", Some("ns"), "x"), None, true, &[]);
        assert_eq!(d.decide(&n, 0), Decision::Create);
        d.created(&n, "x.1".into());
        assert_eq!(d.decide(&n, FORGET_MS), Decision::Create);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn a_refused_event_is_tried_again_after_the_quiet_time_not_before() {
        let mut d = Dedupe::default();
        let n = apply_failed("b", None, &obj("ConfigMap", Some("ns"), "x"), "invalid");
        assert_eq!(d.decide(&n, 0), Decision::Create);
        // The create failed: no `created`.
        assert_eq!(d.decide(&n, 1_000), Decision::Quiet);
        assert_eq!(d.decide(&n, QUIET_MS), Decision::Create);
    }

    #[test]
    fn the_cache_is_bounded_and_drops_the_least_recently_seen() {
        let mut d = Dedupe::new(3);
        let note = |i: usize| {
            apply_failed(
                "b",
                None,
                &obj("ConfigMap", Some("ns"), &format!("c{i}")),
                "r",
            )
        };
        for i in 0..3 {
            assert_eq!(d.decide(&note(i), i as i64), Decision::Create);
        }
        // c0 seen again: c1 is now the least recently seen.
        assert_eq!(d.decide(&note(0), 10), Decision::Quiet);
        assert_eq!(d.decide(&note(3), 11), Decision::Create);
        assert_eq!(d.len(), 3);
        assert_eq!(d.decide(&note(0), 12), Decision::Quiet);
        assert_eq!(d.decide(&note(2), 13), Decision::Quiet);
        assert_eq!(d.decide(&note(1), 14), Decision::Create, "c1 was dropped");
        let mut big = Dedupe::default();
        for i in 0..5 * CAPACITY {
            big.decide(&note(i), i as i64);
        }
        assert_eq!(big.len(), CAPACITY);
    }
}
