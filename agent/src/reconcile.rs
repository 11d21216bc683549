//! The reconcile loop: independent of the hub connection, it applies the Desired set
//! held in the store (at start-up, everything, so an agent restarted while the hub
//! is down still converges), prunes what left it, retries failures periodically,
//! and hands the outcome to the health tracker, which decides the statuses the
//! store's writer records for the session to send.
//!
//! The crash guarantee of an apply: the inventory on disk is always a superset of the
//! bundle's objects that exist in the cluster with its label, so an object created
//! before a crash is pruned or re-owned after it, never orphaned. Objects are added
//! to the inventory before they are applied, in one flushed batch per group of
//! objects whose kinds are served (one group, or two when the bundle brings CRDs and
//! their custom resources); the inventory shrinks only after the objects that left
//! were deleted, to exactly what was applied. A lost inventory is rebuilt from the
//! cluster's bundle labels.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::BundleContent;
use flotilla_shared::bundle::{to_prune, ObjectRef, Rendered};
use prost::Message;
use tokio::sync::{watch, Notify};
use tracing::{error, info, info_span, warn, Instrument};

use crate::apply::Cluster;
use crate::clock::SharedClock;
use crate::events::{self, Events};
use crate::health::{AppliedObject, Tracker};
use crate::plan::{self, Action};
use crate::store::DesiredBundle;
use crate::writer::Writer;

/// How often failed bundles are retried when nothing else wakes the loop, so
/// transient errors (API server restarting, webhook down) heal on their own.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// The result of applying one bundle.
struct Applied {
    objects: Vec<AppliedObject>,
    /// Objects not applied: Kubernetes collected them for this content before.
    collected: Vec<(ObjectRef, flotilla_shared::health::Health)>,
    pruned: usize,
    drift: flotilla_shared::drift::DriftPolicy,
}

pub struct Reconciler {
    writer: Writer,
    cluster: Cluster,
    /// (content hash, revision) last applied successfully, per bundle. Empty at
    /// start-up: everything is re-applied once.
    applied_ok: BTreeMap<String, (String, String)>,
    /// Follows the applied objects' health and decides every bundle status.
    health: Tracker,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Records an `ApplyFailed` Event for an object not applied.
    events: Events,
}

/// An object of `bundle` not applied: its Event (queued, never awaited) and the
/// bundle's error naming it.
fn object_failed(
    events: &Events,
    bundle: &str,
    file: &str,
    object: &ObjectRef,
    reason: &str,
) -> String {
    events.record(events::apply_failed(bundle, Some(file), object, reason));
    plan::object_error(file, object, reason)
}

impl Reconciler {
    /// Reads and writes the store through `writer`, stamps statuses with `clock`.
    pub fn new(writer: Writer, cluster: Cluster, clock: SharedClock) -> Self {
        let health = Tracker::new(writer.clone(), cluster.watch_client(), clock);
        Reconciler {
            writer,
            cluster,
            applied_ok: BTreeMap::new(),
            health,
            metrics: None,
            events: Events::disabled(),
        }
    }

    /// Records Kubernetes Events (apply failures here, drift corrections in the
    /// health tracker) through `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.health.set_events(events.clone());
        self.events = events;
        self
    }

    /// Counts applies and their duration in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The health tracker (for tests and diagnostics).
    pub fn health(&self) -> &Tracker {
        &self.health
    }

    /// Runs passes until shut down: one at once, then one on every wake-up (a new
    /// Desired set) or every [`RETRY_INTERVAL`].
    pub async fn run(mut self, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.pass() => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
        }
    }

    /// One reconcile pass over the whole Desired set.
    pub async fn pass(&mut self) {
        let read = self
            .writer
            .read(|s| Ok((s.desired()?.unwrap_or_default(), s.inventory_bundles()?)))
            .await;
        let (desired, with_inventory) = match read {
            Ok((d, inv)) => (d, inv.into_iter().collect::<BTreeSet<String>>()),
            Err(e) => {
                error!(error = %e, "cannot read the desired state from the store");
                return;
            }
        };
        self.applied_ok
            .retain(|name, _| desired.bundles.iter().any(|b| &b.name == name));
        for action in plan::decide(&desired.bundles, &self.applied_ok, &with_inventory) {
            match action {
                Action::Remove(name) => {
                    let span = info_span!("remove", bundle = %name);
                    self.remove(&name).instrument(span).await;
                }
                Action::Apply(b) => {
                    let span = info_span!("reconcile", bundle = %b.name, revision = %b.revision);
                    self.reconcile(&b).instrument(span).await;
                }
            }
        }
    }

    async fn reconcile(&mut self, b: &DesiredBundle) {
        self.health.applying(b).await;
        let started = std::time::Instant::now();
        let result = self.apply(b).await;
        if let Some(m) = &self.metrics {
            m.applied(started.elapsed().as_secs_f64(), result.is_ok());
        }
        match result {
            Ok(done) => {
                info!(
                    objects = done.objects.len(),
                    pruned = done.pruned,
                    "bundle applied"
                );
                self.applied_ok
                    .insert(b.name.clone(), (b.content_hash.clone(), b.revision.clone()));
                self.health
                    .applied(b, done.objects, done.drift, done.collected)
                    .await;
            }
            Err(message) => {
                warn!(error = %message, "bundle not applied");
                self.health.failed(b, &message).await;
            }
        }
    }

    async fn apply(&mut self, b: &DesiredBundle) -> Result<Applied, String> {
        let name = b.name.as_str();
        let (hash, bundle) = (b.content_hash.clone(), b.name.clone());
        let (bytes, held, was_collected) = self
            .writer
            .read(move |s| {
                Ok((
                    s.content(&hash)?,
                    s.inventory(&bundle)?,
                    s.collected(&bundle)?,
                ))
            })
            .await
            .map_err(|e| e.to_string())?;
        let bytes = bytes
            .ok_or_else(|| format!("content {} not received from the hub yet", b.content_hash))?;
        let content = BundleContent::decode(bytes.as_slice())
            .map_err(|e| format!("stored content {} is unreadable: {e}", b.content_hash))?;
        let rendered = Rendered::try_from(&content).map_err(|e| e.to_string())?;
        plan::check_content_hash(&b.content_hash, &rendered.content_hash())?;

        // Whether the store holds an inventory for the bundle (a rebuilt one is
        // written with the first intent).
        let mut recorded = held.is_some();
        let mut inventory = match held {
            Some(inv) => inv,
            None => self.rebuild_inventory(name, &rendered).await?,
        };

        // The bundle's namespace is created unless the bundle brings it: then its
        // own Namespace object creates it, labelled, and no unlabelled one stands
        // in its way.
        if let Some(ns) = rendered.options.namespace_to_create() {
            let brings_it = rendered.manifests.iter().any(|m| {
                let r = m.object_ref();
                r.api_version == "v1" && r.kind == "Namespace" && r.name == ns
            });
            if !brings_it {
                self.cluster.ensure_namespace(ns).await?;
            }
        }

        let mut applied = BTreeSet::new();
        let mut objects = Vec::with_capacity(rendered.manifests.len());
        // Jobs Kubernetes deleted as they asked once finished are not created again
        // for the same content (`drift::apply_again`); they stay in the inventory.
        let mut collected = Vec::new();
        let mut crd_applied = false;
        let mut next = 0;
        while next < rendered.manifests.len() {
            // A group: the objects from `next` on whose kinds are served now. A kind
            // not served yet may be one a CRD of this group brings.
            let mut group = Vec::new();
            for m in &rendered.manifests[next..] {
                let written = m.object_ref();
                let grace = group.is_empty() && crd_applied;
                match self
                    .cluster
                    .kind(&written.api_version, &written.kind, grace)
                    .await
                {
                    Ok(kind) => {
                        let (r, body) = plan::prepare(name, m, &rendered.options, kind.namespaced);
                        group.push((m, kind, r, body));
                    }
                    Err(e) if group.is_empty() => {
                        return Err(object_failed(&self.events, name, &m.file, &written, &e))
                    }
                    Err(_) => break,
                }
            }
            next += group.len();
            group.retain(|(_, _, r, body)| {
                let c = was_collected.iter().find(|c| &c.object == r);
                if flotilla_shared::drift::apply_again(c.map(|c| c.digest.as_str()), body) {
                    return true;
                }
                if let Some(c) = c {
                    info!(object = %r, "deleted by Kubernetes once finished, as it asked; not created again for the same content");
                    applied.insert(r.clone());
                    collected.push((r.clone(), c.health.clone()));
                }
                false
            });
            // What exists under these identities without the bundle's label is not
            // taken over (unless the bundle says takeOwnership), and not recorded:
            // checked before the intent, so it never enters the inventory either.
            let key = |kind: &crate::apply::Kind, r: &ObjectRef| {
                let res = &kind.resource;
                let ns = r.namespace.clone();
                (
                    res.group.clone(),
                    res.version.clone(),
                    res.plural.clone(),
                    ns,
                )
            };
            let mut found = BTreeMap::new();
            for (_, kind, r, _) in &group {
                if rendered.options.take_ownership || found.contains_key(&key(kind, r)) {
                    continue;
                }
                let objects = self
                    .cluster
                    .found(kind, r.namespace.as_deref())
                    .await
                    .map_err(|e| format!("listing {} to check ownership: {e}", r.kind))?;
                found.insert(key(kind, r), objects);
            }
            let meets: Vec<(&str, &ObjectRef, Option<&plan::Found>)> = group
                .iter()
                .map(|(m, kind, r, _)| {
                    let f = found.get(&key(kind, r)).and_then(|o| o.get(&r.name));
                    (m.file.as_str(), r, f)
                })
                .collect();
            plan::refuse_adoption(name, rendered.options.take_ownership, &meets)?;
            // Recorded before they exist, in one flush for the group, so a crash
            // during the apply still lets them be pruned.
            let refs: BTreeSet<ObjectRef> = group.iter().map(|(_, _, r, _)| r.clone()).collect();
            if let Some(intent) = plan::intent(&inventory, recorded, &refs) {
                self.writer
                    .intend(name, intent)
                    .await
                    .map_err(|e| e.to_string())?;
                inventory.extend(refs);
                recorded = true;
            }
            for (m, kind, r, body) in group {
                let mut live = self
                    .cluster
                    .apply(&kind, &r, &body)
                    .await
                    .map_err(|e| object_failed(&self.events, name, &m.file, &r, &e))?;
                if r.kind == "CustomResourceDefinition" && r.group() == "apiextensions.k8s.io" {
                    live = self
                        .cluster
                        .wait_crd(&r.name)
                        .await
                        .map_err(|e| object_failed(&self.events, name, &m.file, &r, &e))?;
                    crd_applied = true;
                }
                applied.insert(r.clone());
                objects.push(AppliedObject {
                    object: r,
                    resource: kind.resource.clone(),
                    live: Some(live),
                    desired: body,
                });
            }
        }

        let mut pruned = 0;
        for old in to_prune(&inventory, &applied) {
            if self.cluster.delete_owned(name, &old).await? {
                info!(object = %old, "pruned");
                pruned += 1;
            }
        }
        // Only now, with what left the bundle deleted, may the inventory shrink.
        if inventory != applied || !recorded {
            self.writer
                .set_inventory(name, applied)
                .await
                .map_err(|e| e.to_string())?;
        }
        // What was applied again, or left the bundle, is no longer remembered.
        if collected.len() != was_collected.len() {
            let keep = collected.iter().map(|(r, _)| r.clone()).collect();
            self.writer
                .record(vec![crate::writer::Entry::KeepCollected {
                    bundle: name.to_string(),
                    keep,
                }])
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(Applied {
            objects,
            collected,
            pruned,
            drift: rendered.options.drift,
        })
    }

    /// Rebuilds a lost inventory from the objects labelled with the bundle, among
    /// the kinds of its content and every kind the agent ever applied.
    /// It is written to the store with the first intent of the apply.
    async fn rebuild_inventory(
        &mut self,
        name: &str,
        rendered: &Rendered,
    ) -> Result<BTreeSet<ObjectRef>, String> {
        let mut kinds = self
            .writer
            .read(|s| s.known_kinds())
            .await
            .map_err(|e| e.to_string())?;
        kinds.extend(rendered.manifests.iter().map(|m| {
            let r = m.object_ref();
            (r.api_version, r.kind)
        }));
        // Where its objects may be, should the agent be allowed to list only there.
        let namespaces = rendered
            .manifests
            .iter()
            .map(|m| {
                rendered
                    .options
                    .namespace_for(m.object_ref().namespace.as_deref())
            })
            .collect();
        let found = self.cluster.list_owned(name, &kinds, &namespaces).await?;
        if !found.is_empty() {
            info!(
                objects = found.len(),
                "rebuilt the inventory from the cluster"
            );
        }
        Ok(found)
    }

    async fn remove(&mut self, name: &str) {
        // Stop following the bundle first: its watches would otherwise see the
        // deletions below as drift and put the objects back.
        self.health.removed(name);
        let bundle = name.to_string();
        let inventory = match self.writer.read(move |s| s.inventory(&bundle)).await {
            Ok(Some(inv)) => inv,
            Ok(None) => BTreeSet::new(),
            Err(e) => {
                error!(error = %e, "unreadable inventory; forgetting the bundle");
                BTreeSet::new()
            }
        };
        let mut deleted = 0;
        for obj in to_prune(&inventory, &BTreeSet::new()) {
            match self.cluster.delete_owned(name, &obj).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "cannot delete an object of a removed bundle; will retry");
                    return;
                }
            }
        }
        if let Err(e) = self.writer.remove_bundle(name).await {
            error!(error = %e, "cannot forget the removed bundle");
            return;
        }
        self.applied_ok.remove(name);
        info!(deleted, "bundle removed");
    }
}
