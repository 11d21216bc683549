//! Health tracking: the latest health of every object the agent applied, kept
//! fresh by watches (one per kind and namespace in use, or per kind for
//! cluster-scoped kinds, restricted to objects with the bundle label), and each
//! applied bundle's state derived from it (`Ready` or `NotReady`). Every bundle
//! state is decided here, under one lock, and queued for the store's one writer
//! from under that lock, so apply outcomes and health changes are recorded in the
//! order they were decided, never raced.
//!
//! The same watches detect drift: every sighting of an applied object is compared
//! with what was applied (`flotilla_shared::drift`); a drift becomes an event in the
//! store (for the hub) and, in `correct` mode, a re-apply of the object; in `report`
//! mode the bundle is `Modified` until the object holds what was applied again.
//! A finished Job with `ttlSecondsAfterFinished` that Kubernetes deletes is not
//! drift (`drift::collectable`): the book returns it as collected, keeps its last
//! health for the bundle, and the tracker records it for the reconciler, which
//! does not create it again for the same content (`drift::apply_again`).
//!
//! [`Book`] decides (pure, no I/O); [`Tracker`] does: it locks the book, queues the
//! statuses and drift events the book asks for ([`crate::writer`]), re-applies
//! drifted objects, and starts or stops the watches it needs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use flotilla_shared::bundle::ObjectRef;
use flotilla_shared::drift::{self, DriftEvent, DriftMode, DriftPolicy, FieldDiff};
use flotilla_shared::health::{bundle_health, health, Health, HealthStatus};
use flotilla_shared::state::BundleState;
use flotilla_shared::BUNDLE_LABEL;
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::apply::apply_object;
use crate::clock::SharedClock;
use crate::events::{self, Events};
use crate::store::DesiredBundle;
use crate::writer::{Entry, Slot, Writer};

/// What one watch covers: a kind as the bundles wrote it, in one namespace (or the
/// whole cluster for cluster-scoped kinds).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
}

impl WatchKey {
    fn of(r: &ObjectRef) -> WatchKey {
        WatchKey {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
        }
    }

    fn object(&self, name: &str) -> ObjectRef {
        ObjectRef {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: name.to_string(),
        }
    }
}

/// One sighting of an object: who it is (uid, resourceVersion) and its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub uid: String,
    /// resourceVersion as a number when it is one (etcd's revisions are), to drop
    /// sightings older than the one held.
    pub version: Option<u64>,
    pub health: Health,
    /// Kubernetes will delete it as it asks (`drift::collectable`), and the health
    /// it finished with: its deletion next is not drift.
    pub collectable: Option<Health>,
}

impl Sighting {
    /// Reads what health needs from an object, and nothing else.
    pub fn of(obj: &Value) -> Sighting {
        let meta = &obj["metadata"];
        Sighting {
            uid: meta["uid"].as_str().unwrap_or_default().to_string(),
            version: meta["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok()),
            health: health(obj),
            collectable: drift::finished_health(obj),
        }
    }

    /// The object was deleted.
    pub fn gone(obj: &Value) -> Sighting {
        Sighting {
            health: Health::not_found(),
            ..Sighting::of(obj)
        }
    }

    /// Whether this sighting is older than `held` (same object, lower version).
    fn older_than(&self, held: &Sighting) -> bool {
        self.uid == held.uid
            && matches!((self.version, held.version), (Some(new), Some(old)) if new < old)
    }
}

/// What the agent applied for one object, to compare sightings with.
#[derive(Debug, Clone)]
pub struct Desire {
    /// The object as applied (namespace and label placed).
    pub body: Arc<Value>,
    /// Paths that differed right after the apply (server or webhook decisions).
    pub baseline: BTreeSet<String>,
    /// JSON pointers the bundle's policy ignores for this object.
    pub ignore: Vec<String>,
}

impl Desire {
    /// The desire for an object applied as `body`, returned by the server as `live`.
    pub fn new(
        object: &ObjectRef,
        body: Value,
        live: Option<&Value>,
        policy: &DriftPolicy,
    ) -> Desire {
        Desire {
            baseline: live.map(|l| drift::baseline(&body, l)).unwrap_or_default(),
            body: Arc::new(body),
            ignore: policy.ignored_for(object),
        }
    }
}

/// A drift the book found: what to record, and in `correct` mode what to re-apply.
#[derive(Debug, Clone)]
pub struct Finding {
    pub bundle: String,
    pub object: ObjectRef,
    pub fields: Vec<FieldDiff>,
    pub deleted: bool,
    pub mode: DriftMode,
    pub body: Arc<Value>,
}

impl Finding {
    /// The event to record (the store gives it its id).
    pub fn event(&self, corrected: bool, now_unix_ms: i64) -> DriftEvent {
        DriftEvent {
            id: 0,
            bundle: self.bundle.clone(),
            object: self.object.clone(),
            manager: drift::manager_of(&self.fields),
            fields: self.fields.clone(),
            detected_at_unix_ms: now_unix_ms,
            corrected,
            deleted: self.deleted,
        }
    }

    /// A short account for states and logs: `Deployment demo/web: /spec/replicas`.
    fn summary(&self) -> String {
        if self.deleted {
            return format!("{}: deleted", self.object);
        }
        let paths: Vec<&str> = self.fields.iter().map(|f| f.path.as_str()).collect();
        format!("{}: {}", self.object, paths.join(", "))
    }
}

/// An object Kubernetes deleted as it asked (a finished Job with a TTL): not drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collection {
    pub bundle: String,
    pub object: ObjectRef,
    /// `drift::applied_digest` of what was applied.
    pub digest: String,
    /// Its health when last seen.
    pub health: Health,
}

/// What a sighting changed: bundle states to report, drifts to act on, objects
/// collected by Kubernetes to remember.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reports: Vec<Report>,
    pub findings: Vec<Finding>,
    pub collected: Vec<Collection>,
}

/// A bundle whose health is tracked.
#[derive(Debug)]
struct Tracked {
    desired: DesiredBundle,
    /// In apply order, for messages.
    objects: Vec<ObjectRef>,
    policy: DriftPolicy,
    desires: HashMap<ObjectRef, Desire>,
    /// The drift last found per object (its summary), so one drift is one event
    /// however many sightings show it; cleared when the object is clean again. In
    /// `report` mode a non-empty map makes the bundle `Modified`.
    drifted: BTreeMap<ObjectRef, String>,
    /// Objects Kubernetes collected as they asked, with their last health, which
    /// stands for them (a completed Job stays done, a failed one failed).
    collected: HashMap<ObjectRef, Health>,
    /// False while its content is being (re)applied: the reconciler speaks for it.
    reporting: bool,
    /// The (state, message) last derived, to report only changes.
    last: Option<(BundleState, String)>,
}

/// A status the book wants recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub bundle: DesiredBundle,
    pub state: BundleState,
    pub message: String,
}

/// The pure part: objects' latest health, tracked bundles, and what changes.
#[derive(Debug, Default)]
pub struct Book {
    bundles: BTreeMap<String, Tracked>,
    seen: HashMap<ObjectRef, Sighting>,
    /// Watches that lost sight of the cluster (the API server has not answered
    /// them for a while), with why: their objects' health is unknown until they
    /// list again, so no bundle is shown healthy on a view that may be stale.
    blind: HashMap<WatchKey, String>,
}

impl Book {
    /// Stops reporting a bundle while it is reapplied (its watches stay).
    pub fn suspend(&mut self, bundle: &str) {
        if let Some(t) = self.bundles.get_mut(bundle) {
            t.reporting = false;
        }
    }

    /// Forgets a bundle (failed or removed) and the objects only it held.
    pub fn forget(&mut self, bundle: &str) {
        self.bundles.remove(bundle);
        self.gc();
    }

    /// A bundle was applied: its objects with the sightings the apply returned.
    /// Returns the bundle's state to report.
    pub fn applied(
        &mut self,
        bundle: &DesiredBundle,
        objects: Vec<(ObjectRef, Option<Sighting>)>,
    ) -> Option<Report> {
        self.applied_with(
            bundle,
            objects,
            DriftPolicy::default(),
            HashMap::new(),
            Vec::new(),
        )
    }

    /// [`Book::applied`], with the drift policy, what was applied per object, and
    /// the objects not applied because Kubernetes collected them for this content
    /// before (with their last health).
    pub fn applied_with(
        &mut self,
        bundle: &DesiredBundle,
        objects: Vec<(ObjectRef, Option<Sighting>)>,
        policy: DriftPolicy,
        desires: HashMap<ObjectRef, Desire>,
        collected: Vec<(ObjectRef, Health)>,
    ) -> Option<Report> {
        let mut refs: Vec<ObjectRef> = objects.iter().map(|(r, _)| r.clone()).collect();
        refs.extend(collected.iter().map(|(r, _)| r.clone()));
        self.bundles.insert(
            bundle.name.clone(),
            Tracked {
                desired: bundle.clone(),
                objects: refs,
                policy,
                desires,
                drifted: BTreeMap::new(),
                collected: collected.into_iter().collect(),
                reporting: true,
                last: None,
            },
        );
        for (r, s) in objects {
            if let Some(s) = s {
                self.sight(r, s);
            }
        }
        self.gc();
        self.derive(|name| name == bundle.name).into_iter().next()
    }

    /// A watch saw an object (or its deletion). Returns the bundle states that changed.
    pub fn observe(&mut self, object: ObjectRef, sighting: Sighting) -> Vec<Report> {
        self.observe_live(object, sighting, None).reports
    }

    /// A watch saw an object as `live` (`None`: deleted): its health, and its
    /// drift from what each holding bundle applied.
    pub fn observe_live(
        &mut self,
        object: ObjectRef,
        sighting: Sighting,
        live: Option<&Value>,
    ) -> Outcome {
        if !self.is_tracked(&object) {
            return Outcome::default();
        }
        let deleted = sighting.health.status == HealthStatus::NotFound;
        // Deleted after a sighting that said Kubernetes would delete it (or the
        // deletion's own last state says so): collected as asked, not drift.
        let held = self.seen.get(&object);
        let finished = match held {
            Some(h) if sighting.uid.is_empty() || h.uid == sighting.uid => sighting
                .collectable
                .clone()
                .or_else(|| h.collectable.clone()),
            _ => sighting.collectable.clone(),
        }
        .filter(|_| deleted);
        if !self.sight(object.clone(), sighting) {
            return Outcome::default();
        }
        let mut findings = Vec::new();
        let mut collections = Vec::new();
        for (name, t) in self.bundles.iter_mut() {
            if !t.reporting || !t.objects.contains(&object) {
                continue;
            }
            let Some(desire) = t.desires.get(&object) else {
                continue;
            };
            if let Some(health) = finished.clone() {
                collections.push(Collection {
                    bundle: name.clone(),
                    object: object.clone(),
                    digest: drift::applied_digest(&desire.body),
                    health: health.clone(),
                });
                t.desires.remove(&object);
                t.drifted.remove(&object);
                t.collected.insert(object.clone(), health);
                continue;
            }
            let fields = match (deleted, live) {
                (false, Some(l)) => {
                    drift::detect(&desire.body, l, &desire.ignore, &desire.baseline)
                }
                (false, None) => continue,
                (true, _) => vec![],
            };
            if !deleted && fields.is_empty() {
                t.drifted.remove(&object);
                continue;
            }
            let f = Finding {
                bundle: name.clone(),
                object: object.clone(),
                fields,
                deleted,
                mode: t.policy.mode,
                body: desire.body.clone(),
            };
            let summary = f.summary();
            if t.drifted.get(&object) != Some(&summary) {
                t.drifted.insert(object.clone(), summary);
                findings.push(f);
            }
        }
        let holders: BTreeSet<String> = self
            .bundles
            .iter()
            .filter(|(_, t)| t.objects.contains(&object))
            .map(|(n, _)| n.clone())
            .collect();
        Outcome {
            reports: self.derive(|name| holders.contains(name)),
            findings,
            collected: collections,
        }
    }

    /// A watch (re)listed its objects: the tracked objects under `key` it had
    /// seen before but not in this list are gone. Returns the bundle states that changed.
    pub fn relisted(&mut self, key: &WatchKey, names: &HashSet<String>) -> Outcome {
        let gone: Vec<ObjectRef> = self
            .seen
            .iter()
            .filter(|(r, s)| {
                WatchKey::of(r) == *key
                    && !names.contains(&r.name)
                    && s.health.status != HealthStatus::NotFound
            })
            .map(|(r, _)| r.clone())
            .collect();
        let mut out = Outcome::default();
        for r in gone {
            let uid = self.seen.get(&r).map(|s| s.uid.clone()).unwrap_or_default();
            let o = self.observe_live(
                r,
                Sighting {
                    uid,
                    version: None,
                    health: Health::not_found(),
                    collectable: None,
                },
                None,
            );
            out.reports.extend(o.reports);
            out.findings.extend(o.findings);
            out.collected.extend(o.collected);
        }
        out
    }

    /// A watch lost sight of its objects (`Some(why)`), or listed them again
    /// (`None`). Returns the bundle states that changed.
    pub fn blinded(&mut self, key: &WatchKey, why: Option<String>) -> Vec<Report> {
        let changed = match why {
            Some(why) => self.blind.insert(key.clone(), why.clone()) != Some(why),
            None => self.blind.remove(key).is_some(),
        };
        if !changed {
            return Vec::new();
        }
        let holders: BTreeSet<String> = self
            .bundles
            .iter()
            .filter(|(_, t)| t.objects.iter().any(|r| WatchKey::of(r) == *key))
            .map(|(n, _)| n.clone())
            .collect();
        self.derive(|name| holders.contains(name))
    }

    /// The watches the tracked bundles need.
    pub fn watch_keys(&self) -> BTreeSet<WatchKey> {
        self.bundles
            .values()
            .flat_map(|t| t.objects.iter().map(WatchKey::of))
            .collect()
    }

    /// A bundle's state as it would be derived now, for tests.
    #[cfg(test)]
    fn derive_for_test(&mut self, bundle: &str) -> (BundleState, String) {
        if let Some(t) = self.bundles.get_mut(bundle) {
            t.last = None;
        }
        self.derive(|n| n == bundle)
            .into_iter()
            .next()
            .map(|r| (r.state, r.message))
            .unwrap_or((BundleState::NotReady, "not tracked".into()))
    }

    /// Health as last seen, for tests and logs.
    pub fn health_of(&self, object: &ObjectRef) -> Option<&Health> {
        self.seen.get(object).map(|s| &s.health)
    }

    fn is_tracked(&self, object: &ObjectRef) -> bool {
        self.bundles.values().any(|t| t.objects.contains(object))
    }

    /// Records a sighting unless it is older than the one held; true if recorded.
    fn sight(&mut self, object: ObjectRef, s: Sighting) -> bool {
        if let Some(held) = self.seen.get(&object) {
            // A deletion of an older incarnation (same name, other uid) says
            // nothing about the object applied since.
            let stale_delete = s.health.status == HealthStatus::NotFound
                && !s.uid.is_empty()
                && !held.uid.is_empty()
                && s.uid != held.uid;
            if s.older_than(held) || stale_delete || *held == s {
                return false;
            }
        }
        self.seen.insert(object, s);
        true
    }

    /// Drops sightings of objects no bundle tracks (memory stays proportional to
    /// the inventories).
    fn gc(&mut self) {
        let tracked: HashSet<&ObjectRef> = self
            .bundles
            .values()
            .flat_map(|t| t.objects.iter())
            .collect();
        self.seen.retain(|r, _| tracked.contains(r));
        let keys: HashSet<WatchKey> = tracked.into_iter().map(WatchKey::of).collect();
        self.blind.retain(|k, _| keys.contains(k));
    }

    /// Derives the state of the reporting bundles `which` selects; returns those
    /// that changed.
    fn derive(&mut self, which: impl Fn(&str) -> bool) -> Vec<Report> {
        let waiting = Health {
            status: HealthStatus::Unknown,
            message: "not observed yet".into(),
        };
        let blind: HashMap<&WatchKey, Health> = self
            .blind
            .iter()
            .map(|(k, why)| {
                (
                    k,
                    Health {
                        status: HealthStatus::Unknown,
                        message: format!("health unknown: {why}"),
                    },
                )
            })
            .collect();
        let mut out = Vec::new();
        for (name, t) in self.bundles.iter_mut() {
            if !t.reporting || !which(name) {
                continue;
            }
            let (state, message) = if t.policy.mode == DriftMode::Report && !t.drifted.is_empty() {
                // Left as it is on purpose: the bundle says so until it changes back.
                let shown: Vec<&str> = t.drifted.values().take(3).map(String::as_str).collect();
                (
                    BundleState::Modified,
                    format!("modified: {}", shown.join("; ")),
                )
            } else {
                bundle_health(t.objects.iter().map(|r| {
                    let health = t
                        .collected
                        .get(r)
                        .or_else(|| blind.get(&WatchKey::of(r)))
                        .or_else(|| self.seen.get(r).map(|s| &s.health))
                        .unwrap_or(&waiting);
                    (r, health)
                }))
            };
            let now = Some((state, message.clone()));
            if t.last != now {
                t.last = now;
                out.push(Report {
                    bundle: t.desired.clone(),
                    state,
                    message,
                });
            }
        }
        out
    }
}

/// An object the reconciler applied: where to watch it, and the object as the API
/// server returned it (its freshest view).
pub struct AppliedObject {
    pub object: ObjectRef,
    pub resource: ApiResource,
    pub live: Option<Value>,
    /// The object as applied.
    pub desired: Value,
}

/// What a watch saw, as the book takes it.
#[derive(Debug, Clone)]
pub enum Seen {
    /// An object as it is now.
    Object { name: String, live: Value },
    /// An object deleted; `last` is how it was.
    Deleted { name: String, last: Value },
    /// A re-list finished with these names: the others tracked under the key are gone.
    Listed(HashSet<String>),
    /// The watch has failed for [`WATCH_LOST_AFTER`] (why), or (`None`) it
    /// listed its objects again.
    Blind(Option<String>),
}

/// A drift to correct by re-applying the object, off the book's lock.
struct Correction {
    finding: Finding,
    resource: ApiResource,
    detected_at_unix_ms: i64,
}

impl Correction {
    /// Re-applies the object; returns the event saying whether that worked. Its
    /// Kubernetes Event (`DriftCorrected`, or `ApplyFailed` with the API server's
    /// reason) is queued, not awaited.
    async fn make(self, client: &kube::Client, events: &Events) -> DriftEvent {
        let f = &self.finding;
        let corrected = match apply_object(client, &self.resource, &f.object, &f.body).await {
            Ok(uid) => {
                info!(bundle = %f.bundle, object = %f.object, "drift corrected");
                events.record(events::drift_corrected(
                    &f.bundle, &f.object, uid, f.deleted, &f.fields,
                ));
                true
            }
            Err(e) => {
                warn!(bundle = %f.bundle, object = %f.object, error = %e, "cannot correct drift");
                events.record(events::apply_failed(&f.bundle, None, &f.object, &e));
                false
            }
        };
        f.event(corrected, self.detected_at_unix_ms)
    }
}

struct Inner {
    book: Book,
    client: kube::Client,
    writer: Writer,
    clock: SharedClock,
    /// Records the `DriftCorrected` Events.
    events: Events,
    resources: HashMap<WatchKey, ApiResource>,
    watches: HashMap<WatchKey, JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, w) in self.watches.drain() {
            w.abort();
        }
    }
}

/// The statuses to record for the book's reports.
fn status_entries(reports: Vec<Report>, at_unix_ms: i64) -> Vec<Entry> {
    reports
        .into_iter()
        .map(|r| {
            info!(bundle = %r.bundle.name, state = %r.state, message = %r.message, "bundle health");
            Entry::Status {
                bundle: r.bundle,
                state: r.state,
                message: r.message,
                at_unix_ms,
            }
        })
        .collect()
}

impl Inner {
    /// What an outcome of the book asks for: records to queue now (statuses, and the
    /// events of drifts only reported), and the corrections to make.
    fn act(&self, outcome: Outcome, now: i64) -> (Vec<Entry>, Vec<Correction>) {
        let mut entries = status_entries(outcome.reports, now);
        let mut corrections = Vec::new();
        for f in outcome.findings {
            info!(bundle = %f.bundle, object = %f.object, deleted = f.deleted,
                fields = f.fields.len(), manager = %drift::manager_of(&f.fields),
                mode = ?f.mode, "drift detected");
            match (f.mode, self.resources.get(&WatchKey::of(&f.object))) {
                (DriftMode::Correct, Some(resource)) => corrections.push(Correction {
                    resource: resource.clone(),
                    finding: f,
                    detected_at_unix_ms: now,
                }),
                _ => entries.push(Entry::Drift(f.event(false, now))),
            }
        }
        for c in outcome.collected {
            info!(bundle = %c.bundle, object = %c.object, health = %c.health.message,
                "deleted by Kubernetes as it asked (finished, ttlSecondsAfterFinished): not drift");
            entries.push(Entry::Collected {
                bundle: c.bundle,
                collected: crate::store::Collected {
                    object: c.object,
                    digest: c.digest,
                    health: c.health,
                },
            });
        }
        (entries, corrections)
    }

    /// Starts the watches the book needs and stops the others.
    fn adjust_watches(&mut self, me: &Weak<Mutex<Inner>>) {
        let wanted = self.book.watch_keys();
        self.watches.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                debug!(kind = %key.kind, namespace = ?key.namespace, "stopping a health watch");
                task.abort();
            }
            keep
        });
        self.resources.retain(|key, _| wanted.contains(key));
        for key in wanted {
            if self.watches.contains_key(&key) {
                continue;
            }
            let Some(resource) = self.resources.get(&key) else {
                continue;
            };
            let api: Api<DynamicObject> = match &key.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
                None => Api::all_with(self.client.clone(), resource),
            };
            debug!(kind = %key.kind, namespace = ?key.namespace, "starting a health watch");
            let task = tokio::spawn(run_watch(me.clone(), self.writer.clone(), key.clone(), api));
            self.watches.insert(key, task);
        }
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

/// The I/O side: shared by the reconciler and the watch tasks. Every decision is
/// made under the book's lock and queued for the writer from under it, in a place
/// reserved before the lock was taken: what is recorded follows what was decided.
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Mutex<Inner>>,
    writer: Writer,
}

impl Tracker {
    pub fn new(writer: Writer, client: kube::Client, clock: SharedClock) -> Tracker {
        Tracker {
            inner: Arc::new(Mutex::new(Inner {
                book: Book::default(),
                client,
                writer: writer.clone(),
                clock,
                events: Events::disabled(),
                resources: HashMap::new(),
                watches: HashMap::new(),
            })),
            writer,
        }
    }

    /// Records Kubernetes Events for drift corrections through `events`.
    pub fn set_events(&self, events: Events) {
        lock(&self.inner).events = events;
    }

    /// A place in the writer's queue, or why not (only when shutting down).
    async fn slot(&self) -> Option<Slot<'_>> {
        match self.writer.reserve().await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot record");
                None
            }
        }
    }

    /// A bundle's content is about to be applied: `WaitApplied` for content the hub
    /// has not heard about from us, and no health reports until it is applied.
    pub async fn applying(&self, b: &DesiredBundle) {
        let Some(slot) = self.slot().await else {
            return;
        };
        let mut inner = lock(&self.inner);
        inner.book.suspend(&b.name);
        slot.record(vec![Entry::Applying {
            bundle: b.clone(),
            at_unix_ms: inner.clock.now_unix_ms(),
        }]);
    }

    /// Applying failed: `ErrApplied`, and its health is no longer followed.
    pub async fn failed(&self, b: &DesiredBundle, message: &str) {
        let Some(slot) = self.slot().await else {
            return;
        };
        let mut inner = lock(&self.inner);
        inner.book.forget(&b.name);
        slot.record(vec![Entry::Status {
            bundle: b.clone(),
            state: BundleState::ErrApplied,
            message: message.to_string(),
            at_unix_ms: inner.clock.now_unix_ms(),
        }]);
        inner.adjust_watches(&Arc::downgrade(&self.inner));
    }

    /// Applied: follow its objects' health and drift, and report its state.
    /// `collected`: objects not applied because Kubernetes collected them for this
    /// content before, with their last health.
    pub async fn applied(
        &self,
        b: &DesiredBundle,
        objects: Vec<AppliedObject>,
        policy: DriftPolicy,
        collected: Vec<(ObjectRef, Health)>,
    ) {
        let Some(slot) = self.slot().await else {
            return;
        };
        let mut inner = lock(&self.inner);
        let mut seen = Vec::with_capacity(objects.len());
        let mut desires = HashMap::with_capacity(objects.len());
        for o in objects {
            inner.resources.insert(WatchKey::of(&o.object), o.resource);
            desires.insert(
                o.object.clone(),
                Desire::new(&o.object, o.desired, o.live.as_ref(), &policy),
            );
            seen.push((o.object, o.live.as_ref().map(Sighting::of)));
        }
        let report = inner.book.applied_with(b, seen, policy, desires, collected);
        let now = inner.clock.now_unix_ms();
        slot.record(status_entries(report.into_iter().collect(), now));
        inner.adjust_watches(&Arc::downgrade(&self.inner));
    }

    /// The bundle was removed from the cluster.
    pub fn removed(&self, bundle: &str) {
        let mut inner = lock(&self.inner);
        inner.book.forget(bundle);
        inner.adjust_watches(&Arc::downgrade(&self.inner));
    }

    /// What a watch of `key` saw: as the watch tasks feed it (and tests do).
    pub async fn seen(&self, key: &WatchKey, seen: Seen) {
        sighted(&Arc::downgrade(&self.inner), &self.writer, key, seen).await;
    }

    /// The number of running watches.
    pub fn watch_count(&self) -> usize {
        lock(&self.inner).watches.len()
    }
}

/// Decides what a sighting changes under the book's lock and queues the records from
/// under it; then makes the corrections it asked for and records their events.
/// Returns false once the tracker or the writer is gone.
async fn sighted(
    tracker: &Weak<Mutex<Inner>>,
    writer: &Writer,
    key: &WatchKey,
    seen: Seen,
) -> bool {
    let Ok(slot) = writer.reserve().await else {
        return false;
    };
    let Some(inner) = tracker.upgrade() else {
        return false;
    };
    let (corrections, client, events) = {
        let mut g = lock(&inner);
        let outcome = match seen {
            Seen::Object { name, live } => {
                g.book
                    .observe_live(key.object(&name), Sighting::of(&live), Some(&live))
            }
            Seen::Deleted { name, last } => {
                g.book
                    .observe_live(key.object(&name), Sighting::gone(&last), None)
            }
            Seen::Listed(names) => g.book.relisted(key, &names),
            Seen::Blind(why) => Outcome {
                reports: g.book.blinded(key, why),
                ..Outcome::default()
            },
        };
        let now = g.clock.now_unix_ms();
        let (entries, corrections) = g.act(outcome, now);
        slot.record(entries);
        (corrections, g.client.clone(), g.events.clone())
    };
    drop(inner);
    // A correction's event says whether it worked: it is decided when the re-apply
    // returns, and recorded then.
    for c in corrections {
        let event = c.make(&client, &events).await;
        if writer.record(vec![Entry::Drift(event)]).await.is_err() {
            return false;
        }
    }
    true
}

/// A watch that has failed for this long without a success has lost sight of its
/// objects: their health becomes unknown (the bundle is not shown `Ready` on a
/// view that may be stale). Long enough that a watch's ordinary reconnect (a
/// timed-out watch, a 410 re-list) never counts; short next to an outage.
pub const WATCH_LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
/// Watch retries back off from this...
const WATCH_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(500);
/// ...doubling up to this (kube's default climbs to 30 s, so a watch lost in a
/// minute-long API-server outage took up to half a minute to resume after it):
/// one request per watch every few seconds is little for an API server that is
/// coming back, and health is known again within seconds of it.
const WATCH_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(8);
/// Errors this far apart start the backoff from its minimum again.
const WATCH_BACKOFF_RESET: std::time::Duration = std::time::Duration::from_secs(60);

/// The watches' retry delays: doubling from [`WATCH_BACKOFF_MIN`] to
/// [`WATCH_BACKOFF_MAX`], each drawn between half and all of it so the watches of
/// one agent do not retry in step.
struct WatchBackoff {
    next: std::time::Duration,
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let d = self.next;
        self.next = (d * 2).min(WATCH_BACKOFF_MAX);
        Some(d.mul_f64(0.5 + 0.5 * rand::random::<f64>()))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

fn watch_backoff() -> kube::runtime::utils::ResetTimerBackoff<WatchBackoff> {
    kube::runtime::utils::ResetTimerBackoff::new(
        WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        },
        WATCH_BACKOFF_RESET,
    )
}

/// Why a watch lost sight, as the bundle's message shows it (bounded: an API
/// server's error body can be long).
fn lost_reason(kind: &str, error: &watcher::Error) -> String {
    const MAX: usize = 200;
    let mut e = error.to_string();
    if e.len() > MAX {
        let mut cut = MAX;
        while !e.is_char_boundary(cut) {
            cut -= 1;
        }
        e.truncate(cut);
        e.push('…');
    }
    format!(
        "the watch of {kind} has failed for over {}s ({e})",
        WATCH_LOST_AFTER.as_secs()
    )
}

/// Follows one kind in one namespace until aborted (or the tracker is gone),
/// feeding what it sees to the book. Only objects with the bundle label are
/// listed; the watcher re-lists and backs off by itself after errors. A watch
/// failing for [`WATCH_LOST_AFTER`] tells the book it lost sight, and starts over
/// with a fresh list: the list's end is what proves it sees the cluster again (a
/// resumed watch may stay silent for hours).
async fn run_watch(
    tracker: Weak<Mutex<Inner>>,
    writer: Writer,
    key: WatchKey,
    api: Api<DynamicObject>,
) {
    let config = watcher::Config::default().labels(BUNDLE_LABEL);
    let start = || {
        watcher(api.clone(), config.clone())
            .backoff(watch_backoff())
            .boxed()
    };
    let mut events = start();
    let mut listing: Option<HashSet<String>> = None;
    // The first list may miss objects applied while it ran (they follow as
    // events), so only later re-lists, after a lost watch, can tell deletions.
    let mut first_list = true;
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut blind = false;
    while let Some(event) = events.next().await {
        let with_kind = |o: DynamicObject| -> (String, Value) {
            let name = o.metadata.name.clone().unwrap_or_default();
            let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
            // List items may come without their type; the rules need it.
            if v.is_object() {
                v["apiVersion"] = Value::String(key.api_version.clone());
                v["kind"] = Value::String(key.kind.clone());
            }
            (name, v)
        };
        if event.is_ok() {
            failing_since = None;
        }
        let seen = match event {
            Ok(Event::Apply(o)) | Ok(Event::InitApply(o)) => {
                let (name, live) = with_kind(o);
                if let Some(l) = listing.as_mut() {
                    l.insert(name.clone());
                }
                Seen::Object { name, live }
            }
            Ok(Event::Delete(o)) => {
                let (name, v) = with_kind(o);
                if v["metadata"]["labels"][BUNDLE_LABEL].is_null() {
                    // Not deleted: someone removed our label, so it left the watch.
                    Seen::Object { name, live: v }
                } else {
                    Seen::Deleted { name, last: v }
                }
            }
            Ok(Event::Init) => {
                listing = Some(HashSet::new());
                continue;
            }
            Ok(Event::InitDone) => {
                let names = listing.take().unwrap_or_default();
                if std::mem::replace(&mut first_list, false) && !blind {
                    continue;
                }
                if !sighted(&tracker, &writer, &key, Seen::Listed(names)).await {
                    return;
                }
                if std::mem::replace(&mut blind, false) {
                    info!(kind = %key.kind, namespace = ?key.namespace,
                        "health watch sees the cluster again");
                    Seen::Blind(None)
                } else {
                    continue;
                }
            }
            Err(e) => {
                warn!(kind = %key.kind, namespace = ?key.namespace, error = %e,
                    "health watch failed; retrying");
                let now = tokio::time::Instant::now();
                let since = *failing_since.get_or_insert(now);
                if blind || now.duration_since(since) < WATCH_LOST_AFTER {
                    continue;
                }
                blind = true;
                // Start over: the next list's end says the watch sees again.
                events = start();
                listing = None;
                warn!(kind = %key.kind, namespace = ?key.namespace,
                    "health watch lost sight of the cluster: health unknown until it lists again");
                Seen::Blind(Some(lost_reason(&key.kind, &e)))
            }
        };
        if !sighted(&tracker, &writer, &key, seen).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle(name: &str) -> DesiredBundle {
        DesiredBundle {
            name: name.into(),
            content_hash: "h".into(),
            revision: "r".into(),
        }
    }

    fn deploy(name: &str) -> ObjectRef {
        ObjectRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: Some("demo".into()),
            name: name.into(),
        }
    }

    fn seen(uid: &str, rv: u64, available: i64) -> Sighting {
        Sighting::of(&json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "uid": uid, "resourceVersion": rv.to_string(), "generation": 1},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": available, "availableReplicas": available,
                "conditions": [{"type": "Available", "status": "True"}]}
        }))
    }

    #[test]
    fn follows_health_and_reports_changes_only() {
        let mut book = Book::default();
        let b = bundle("web");
        let r = book
            .applied(&b, vec![(deploy("web"), Some(seen("u1", 10, 0)))])
            .unwrap();
        assert_eq!(r.state, BundleState::NotReady);
        assert_eq!(r.message, "Deployment demo/web: 0/2 replicas available");
        // Older news is dropped; the same news is not a change.
        assert!(book.observe(deploy("web"), seen("u1", 9, 2)).is_empty());
        assert!(book.observe(deploy("web"), seen("u1", 10, 0)).is_empty());
        let r = book.observe(deploy("web"), seen("u1", 11, 1));
        assert_eq!(r[0].message, "Deployment demo/web: 1/2 replicas available");
        let r = book.observe(deploy("web"), seen("u1", 12, 2));
        assert_eq!(
            (r[0].state, r[0].message.as_str()),
            (BundleState::Ready, "")
        );
        // Objects of no tracked bundle are ignored.
        assert!(book.observe(deploy("other"), seen("u9", 1, 0)).is_empty());
        assert_eq!(book.health_of(&deploy("other")), None);
        // It degrades later.
        let r = book.observe(deploy("web"), seen("u1", 20, 1));
        assert_eq!(r[0].state, BundleState::NotReady);
    }

    /// A watch that lost sight of the cluster makes its objects' health unknown:
    /// a Ready bundle is not shown Ready on a view that may be stale, and is again
    /// once the watch has listed.
    #[test]
    fn a_blind_watch_makes_health_unknown_until_it_sees_again() {
        let mut book = Book::default();
        let b = bundle("web");
        let r = book
            .applied(&b, vec![(deploy("web"), Some(seen("u1", 10, 2)))])
            .unwrap();
        assert_eq!(r.state, BundleState::Ready);
        let key = WatchKey::of(&deploy("web"));
        let r = book.blinded(&key, Some("the API server answers 500".into()));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].state, BundleState::NotReady);
        assert!(
            r[0].message
                .contains("health unknown: the API server answers 500"),
            "{}",
            r[0].message
        );
        // The same news again is not a change; sightings do not lift it.
        assert!(book
            .blinded(&key, Some("the API server answers 500".into()))
            .is_empty());
        assert!(book.observe(deploy("web"), seen("u1", 11, 2)).is_empty());
        // Another watch's loss says nothing of this bundle.
        let other = WatchKey {
            namespace: Some("elsewhere".into()),
            ..key.clone()
        };
        assert!(book.blinded(&other, Some("x".into())).is_empty());
        let r = book.blinded(&key, None);
        assert_eq!(
            (r[0].state, r[0].message.as_str()),
            (BundleState::Ready, "")
        );
        assert!(book.blinded(&key, None).is_empty());
    }

    #[test]
    fn deletions_and_relists() {
        let mut book = Book::default();
        let b = bundle("web");
        book.applied(&b, vec![(deploy("web"), Some(seen("u2", 30, 2)))]);
        // The deletion of an older incarnation does not count.
        let old = json!({"metadata": {"name": "web", "uid": "u1", "resourceVersion": "29"}});
        assert!(book.observe(deploy("web"), Sighting::gone(&old)).is_empty());
        let cur = json!({"metadata": {"name": "web", "uid": "u2", "resourceVersion": "31"}});
        let r = book.observe(deploy("web"), Sighting::gone(&cur));
        assert_eq!(r[0].message, "Deployment demo/web: not found");
        book.observe(deploy("web"), seen("u3", 40, 2));
        let key = WatchKey::of(&deploy("web"));
        let r = book.relisted(&key, &HashSet::new()).reports;
        assert_eq!(r[0].state, BundleState::NotReady);
        assert!(book.relisted(&key, &HashSet::new()).reports.is_empty());
    }

    #[test]
    fn suspended_bundles_stay_quiet_and_watches_follow_inventories() {
        let mut book = Book::default();
        book.applied(&bundle("a"), vec![(deploy("web"), Some(seen("u1", 1, 2)))]);
        let mut cm = deploy("settings");
        cm.api_version = "v1".into();
        cm.kind = "ConfigMap".into();
        cm.namespace = Some("other".into());
        book.applied(&bundle("b"), vec![(cm.clone(), None)]);
        assert_eq!(book.watch_keys().len(), 2);
        book.suspend("a");
        assert!(book.observe(deploy("web"), seen("u1", 2, 0)).is_empty());
        book.forget("a");
        assert_eq!(
            book.watch_keys().into_iter().collect::<Vec<_>>(),
            [WatchKey::of(&cm)]
        );
        assert_eq!(
            book.health_of(&deploy("web")),
            None,
            "forgotten objects are dropped"
        );
    }

    fn cm(data: &str, rv: u64, manager: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "demo", "uid": "u1",
                "resourceVersion": rv.to_string(),
                "managedFields": [{"manager": manager, "operation": "Update",
                    "time": "2026-01-01T00:00:00Z", "fieldsV1": {"f:data": {"f:mode": {}}}}]},
            "data": {"mode": data}
        })
    }

    fn cm_ref() -> ObjectRef {
        ObjectRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("demo".into()),
            name: "c".into(),
        }
    }

    fn with_policy(book: &mut Book, mode: DriftMode) {
        let policy = DriftPolicy {
            mode,
            ignore: vec![],
        };
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "demo"}, "data": {"mode": "blue"}});
        let applied = cm("blue", 1, "flotilla");
        let desires = HashMap::from([(
            cm_ref(),
            Desire::new(&cm_ref(), body, Some(&applied), &policy),
        )]);
        book.applied_with(
            &bundle("b"),
            vec![(cm_ref(), Some(Sighting::of(&applied)))],
            policy,
            desires,
            Vec::new(),
        );
    }

    #[test]
    fn report_mode_marks_the_bundle_modified_until_it_changes_back() {
        let mut book = Book::default();
        with_policy(&mut book, DriftMode::Report);
        let live = cm("green", 2, "kubectl-edit");
        let o = book.observe_live(cm_ref(), Sighting::of(&live), Some(&live));
        assert_eq!(o.findings.len(), 1);
        assert_eq!(o.findings[0].fields[0].path, "/data/mode");
        let e = o.findings[0].event(false, 7);
        assert_eq!(e.manager, "kubectl-edit");
        assert_eq!(o.reports[0].state, BundleState::Modified);
        assert_eq!(
            o.reports[0].message,
            "modified: ConfigMap demo/c: /data/mode"
        );
        // The same drift seen again (a later version): no second event.
        let again = cm("green", 3, "kubectl-edit");
        let o = book.observe_live(cm_ref(), Sighting::of(&again), Some(&again));
        assert!(o.findings.is_empty() && o.reports.is_empty());
        // Changed back: Ready, no event.
        let back = cm("blue", 4, "kubectl-edit");
        let o = book.observe_live(cm_ref(), Sighting::of(&back), Some(&back));
        assert!(o.findings.is_empty());
        assert_eq!(o.reports[0].state, BundleState::Ready);
        // Deleted: an event, Modified.
        let o = book.observe_live(cm_ref(), Sighting::gone(&back), None);
        assert!(o.findings[0].deleted);
        assert_eq!(o.reports[0].state, BundleState::Modified);
    }

    #[test]
    fn correct_mode_finds_each_change_once_and_never_while_applying() {
        let mut book = Book::default();
        with_policy(&mut book, DriftMode::Correct);
        let live = cm("green", 2, "kubectl-patch");
        let o = book.observe_live(cm_ref(), Sighting::of(&live), Some(&live));
        assert_eq!(o.findings[0].mode, DriftMode::Correct);
        assert!(
            o.reports.is_empty(),
            "correct mode does not mark the bundle"
        );
        // Corrected (clean again), then the same edit once more: a new event.
        let fixed = cm("blue", 3, "flotilla");
        assert!(book
            .observe_live(cm_ref(), Sighting::of(&fixed), Some(&fixed))
            .findings
            .is_empty());
        let live = cm("green", 4, "kubectl-patch");
        assert_eq!(
            book.observe_live(cm_ref(), Sighting::of(&live), Some(&live))
                .findings
                .len(),
            1
        );
        // Older news is not drift; nor is anything seen while the bundle is reapplied.
        let old = cm("red", 1, "kubectl-patch");
        assert!(book
            .observe_live(cm_ref(), Sighting::of(&old), Some(&old))
            .findings
            .is_empty());
        book.suspend("b");
        let live = cm("red", 9, "kubectl-patch");
        assert!(book
            .observe_live(cm_ref(), Sighting::of(&live), Some(&live))
            .findings
            .is_empty());
    }

    fn job_ref() -> ObjectRef {
        ObjectRef {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            namespace: Some("demo".into()),
            name: "migrate".into(),
        }
    }

    fn job(rv: u64, uid: &str, conditions: Value, ttl: bool) -> Value {
        let mut j = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "namespace": "demo", "uid": uid,
                "resourceVersion": rv.to_string(), "generation": 1},
            "spec": {"template": {"spec": {"restartPolicy": "Never"}}},
            "status": {"startTime": "2026-01-01T00:00:00Z", "active": 1,
                "conditions": conditions}});
        if ttl {
            j["spec"]["ttlSecondsAfterFinished"] = json!(0);
        }
        j
    }

    fn applied_job(book: &mut Book, ttl: bool) {
        let policy = DriftPolicy::default();
        let mut body = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "namespace": "demo"},
            "spec": {"template": {"spec": {"restartPolicy": "Never"}}}});
        if ttl {
            body["spec"]["ttlSecondsAfterFinished"] = json!(0);
        }
        let live = job(1, "j1", json!([]), ttl);
        let desires = HashMap::from([(
            job_ref(),
            Desire::new(&job_ref(), body, Some(&live), &policy),
        )]);
        book.applied_with(
            &bundle("b"),
            vec![(job_ref(), Some(Sighting::of(&live)))],
            policy,
            desires,
            Vec::new(),
        );
    }

    /// A finished Job with `ttlSecondsAfterFinished` that Kubernetes deletes was
    /// collected as it asked: no drift, no correction, the bundle keeps the Job's
    /// verdict; a Job deleted before it finished, or without a TTL, is drift.
    #[test]
    fn a_finished_job_deleted_by_its_ttl_is_collected_not_drift() {
        let done = json!([{"type": "Complete", "status": "True"}]);
        let mut book = Book::default();
        applied_job(&mut book, true);
        let finished = job(2, "j1", done.clone(), true);
        let o = book.observe_live(job_ref(), Sighting::of(&finished), Some(&finished));
        assert!(o.findings.is_empty());
        assert_eq!(o.reports[0].state, BundleState::Ready);
        // The TTL controller's foreground deletion: Terminating on the way out...
        let mut going = job(3, "j1", done.clone(), true);
        going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:05Z");
        let o = book.observe_live(job_ref(), Sighting::of(&going), Some(&going));
        assert!(o.findings.is_empty() && o.collected.is_empty());
        // ...then gone: collected, not drift, and the bundle stays Ready.
        let o = book.observe_live(job_ref(), Sighting::gone(&going), None);
        assert!(o.findings.is_empty(), "{:?}", o.findings);
        assert_eq!(o.collected.len(), 1);
        assert_eq!(o.collected[0].object, job_ref());
        assert_eq!(o.collected[0].health.status, HealthStatus::Current);
        assert!(o.reports.iter().all(|r| r.state == BundleState::Ready));
        let key = WatchKey::of(&job_ref());
        let o = book.relisted(&key, &HashSet::new());
        assert!(o.findings.is_empty() && o.collected.is_empty() && o.reports.is_empty());

        // The deletion seen alone (the finished sighting missed): its last state says it.
        let mut book = Book::default();
        applied_job(&mut book, true);
        let o = book.observe_live(job_ref(), Sighting::gone(&going), None);
        assert!(o.findings.is_empty() && o.collected.len() == 1);

        // A failed Job collected stays failed.
        let mut book = Book::default();
        applied_job(&mut book, true);
        let failed = job(
            2,
            "j1",
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]),
            true,
        );
        book.observe_live(job_ref(), Sighting::of(&failed), Some(&failed));
        let o = book.observe_live(job_ref(), Sighting::gone(&failed), None);
        assert!(o.findings.is_empty() && o.collected.len() == 1);
        let r = book.relisted(&key, &HashSet::new());
        assert!(r.reports.is_empty());
        assert_eq!(
            book.derive_for_test("b"),
            (
                BundleState::NotReady,
                "Job demo/migrate: failed: BackoffLimitExceeded".to_string()
            )
        );

        // Deleted while running: drift, corrected.
        let mut book = Book::default();
        applied_job(&mut book, true);
        let running = job(2, "j1", json!([]), true);
        let o = book.observe_live(job_ref(), Sighting::gone(&running), None);
        assert!(o.collected.is_empty());
        assert!(o.findings[0].deleted && o.findings[0].mode == DriftMode::Correct);

        // Finished without a TTL, then deleted (by someone): drift.
        let mut book = Book::default();
        applied_job(&mut book, false);
        let finished = job(2, "j1", done, false);
        book.observe_live(job_ref(), Sighting::of(&finished), Some(&finished));
        let o = book.observe_live(job_ref(), Sighting::gone(&finished), None);
        assert!(o.collected.is_empty());
        assert!(o.findings[0].deleted);
    }

    fn deploy_in(ns: &str) -> ObjectRef {
        ObjectRef {
            namespace: Some(ns.into()),
            ..deploy("web")
        }
    }

    fn deploy_json(ns: &str, rv: u64, available: i64) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": ns, "uid": format!("u-{ns}"),
                "resourceVersion": rv.to_string(), "generation": 1},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": available, "availableReplicas": available,
                "conditions": [{"type": "Available", "status": "True"}]}
        })
    }

    /// Two watches of one bundle (one kind, two namespaces) report at the same time,
    /// round after round, through a queue small enough to make them wait for each
    /// other. Each round ends with both objects available: the last record must say
    /// `Ready`. Recorded out of decision order, a stale `NotReady` would be last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_watches_of_one_bundle_record_in_decision_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 1).unwrap();
        let (writer, _recorded) = Writer::with_capacity(store.clone(), 1).unwrap();
        // Nothing listens there: the watches the tracker starts only retry.
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let clock = crate::clock::FixedClock::new(1_000);
        let tracker = Tracker::new(writer.clone(), client, clock);
        let resource = ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "apps",
            "v1",
            "Deployment",
        ));
        let b = bundle("pair");
        let applied = ["one", "two"]
            .into_iter()
            .map(|ns| AppliedObject {
                object: deploy_in(ns),
                resource: resource.clone(),
                live: Some(deploy_json(ns, 1, 2)),
                desired: json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "web", "namespace": ns}}),
            })
            .collect();
        tracker
            .applied(&b, applied, DriftPolicy::default(), Vec::new())
            .await;
        writer.sync().await.unwrap();
        assert_eq!(
            store.last_status("pair").unwrap().unwrap().state,
            BundleState::Ready
        );
        for round in 0..200u64 {
            let watches = ["one", "two"].map(|ns| {
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    let key = WatchKey::of(&deploy_in(ns));
                    for (rv, available) in [(2 * round + 2, 0), (2 * round + 3, 2)] {
                        let live = deploy_json(ns, rv, available);
                        let seen = Seen::Object {
                            name: "web".into(),
                            live,
                        };
                        tracker.seen(&key, seen).await;
                    }
                })
            });
            for w in watches {
                w.await.unwrap();
            }
            writer.sync().await.unwrap();
            let last = store.last_status("pair").unwrap().unwrap();
            assert_eq!(
                (last.state, last.message.as_str()),
                (BundleState::Ready, ""),
                "round {round}: both objects are available"
            );
        }
    }
}
