//! The reconcile loop: independent of the hub connection, it applies the Desired set
//! held in the store (at start-up, everything, so an agent restarted while the hub
//! is down still converges), prunes what left it, retries failures periodically,
//! and hands the outcome to the health tracker, which records statuses for the
//! session to send.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::BundleContent;
use flotilla_shared::bundle::{to_prune, Rendered};
use prost::Message;
use tokio::sync::{watch, Notify};
use tracing::{error, info, info_span, warn, Instrument};

use crate::apply::Cluster;
use crate::health::{AppliedObject, Tracker};
use crate::plan::{self, Action};
use crate::store::{DesiredBundle, Store};

/// How often failed bundles are retried when nothing else wakes the loop, so
/// transient errors (API server restarting, webhook down) heal on their own.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch, for status timestamps.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The result of applying one bundle.
struct Applied {
    objects: Vec<AppliedObject>,
    pruned: usize,
    drift: flotilla_shared::drift::DriftPolicy,
}

pub struct Reconciler {
    store: Store,
    cluster: Cluster,
    /// (content hash, revision) last applied successfully, per bundle. Empty at
    /// start-up: everything is re-applied once.
    applied_ok: BTreeMap<String, (String, String)>,
    /// Follows the applied objects' health and records every bundle status.
    health: Tracker,
}

impl Reconciler {
    /// `statuses` carries the seq of the newest recorded status to the session.
    pub fn new(store: Store, cluster: Cluster, statuses: watch::Sender<u64>) -> Self {
        let health = Tracker::new(store.clone(), cluster.client(), statuses);
        Reconciler {
            store,
            cluster,
            applied_ok: BTreeMap::new(),
            health,
        }
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
        let desired = match self.store.desired() {
            Ok(d) => d.unwrap_or_default(),
            Err(e) => {
                error!(error = %e, "cannot read the desired state from the store");
                return;
            }
        };
        let with_inventory: BTreeSet<String> = match self.store.inventory_bundles() {
            Ok(b) => b.into_iter().collect(),
            Err(e) => {
                error!(error = %e, "cannot read inventories from the store");
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
        self.health.applying(b);
        match self.apply(b).await {
            Ok(done) => {
                info!(
                    objects = done.objects.len(),
                    pruned = done.pruned,
                    "bundle applied"
                );
                self.applied_ok
                    .insert(b.name.clone(), (b.content_hash.clone(), b.revision.clone()));
                self.health.applied(b, done.objects, done.drift);
            }
            Err(message) => {
                warn!(error = %message, "bundle not applied");
                self.health.failed(b, &message);
            }
        }
    }

    async fn apply(&mut self, b: &DesiredBundle) -> Result<Applied, String> {
        let name = b.name.as_str();
        let bytes = self
            .store
            .content(&b.content_hash)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("content {} not received from the hub yet", b.content_hash))?;
        let content = BundleContent::decode(bytes.as_slice())
            .map_err(|e| format!("stored content {} is unreadable: {e}", b.content_hash))?;
        let rendered = Rendered::try_from(&content).map_err(|e| e.to_string())?;
        if rendered.content_hash() != b.content_hash {
            warn!(
                expected = %b.content_hash,
                computed = %rendered.content_hash(),
                "content hash differs from the hub's"
            );
        }

        let mut inventory = match self.store.inventory(name).map_err(|e| e.to_string())? {
            Some(inv) => inv,
            None => self.rebuild_inventory(name, &rendered).await?,
        };

        if let Some(ns) = rendered.options.namespace_to_create() {
            self.cluster.ensure_namespace(ns).await?;
        }

        let mut applied = BTreeSet::new();
        let mut objects = Vec::with_capacity(rendered.manifests.len());
        let mut crd_applied = false;
        for m in &rendered.manifests {
            let written = m.object_ref();
            let kind = self
                .cluster
                .kind(&written.api_version, &written.kind, crd_applied)
                .await
                .map_err(|e| plan::object_error(&m.file, &written, &e))?;
            let (r, body) = plan::prepare(name, m, &rendered.options, kind.namespaced);
            // Recorded before it exists, so a crash right after still lets us prune it.
            if inventory.insert(r.clone()) {
                self.store
                    .set_inventory(name, &inventory)
                    .map_err(|e| e.to_string())?;
            }
            let mut live = self
                .cluster
                .apply(&kind, &r, &body)
                .await
                .map_err(|e| plan::object_error(&m.file, &r, &e))?;
            if r.kind == "CustomResourceDefinition" && r.group() == "apiextensions.k8s.io" {
                live = self
                    .cluster
                    .wait_crd(&r.name)
                    .await
                    .map_err(|e| plan::object_error(&m.file, &r, &e))?;
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

        let mut pruned = 0;
        for old in to_prune(&inventory, &applied) {
            if self.cluster.delete_owned(name, &old).await? {
                info!(object = %old, "pruned");
                pruned += 1;
            }
        }
        self.store
            .set_inventory(name, &applied)
            .map_err(|e| e.to_string())?;
        Ok(Applied {
            objects,
            pruned,
            drift: rendered.options.drift,
        })
    }

    /// Rebuilds a lost inventory from the objects labelled with the bundle, among
    /// the kinds of its content and every kind the agent ever applied.
    async fn rebuild_inventory(
        &mut self,
        name: &str,
        rendered: &Rendered,
    ) -> Result<BTreeSet<flotilla_shared::bundle::ObjectRef>, String> {
        let mut kinds = self.store.known_kinds().map_err(|e| e.to_string())?;
        kinds.extend(rendered.manifests.iter().map(|m| {
            let r = m.object_ref();
            (r.api_version, r.kind)
        }));
        let found = self.cluster.list_owned(name, &kinds).await?;
        if !found.is_empty() {
            info!(
                objects = found.len(),
                "rebuilt the inventory from the cluster"
            );
        }
        self.store
            .set_inventory(name, &found)
            .map_err(|e| e.to_string())?;
        Ok(found)
    }

    async fn remove(&mut self, name: &str) {
        // Stop following the bundle first: its watches would otherwise see the
        // deletions below as drift and put the objects back.
        self.health.removed(name);
        let inventory = match self.store.inventory(name) {
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
        if let Err(e) = self.store.remove_bundle(name) {
            error!(error = %e, "cannot forget the removed bundle");
            return;
        }
        self.applied_ok.remove(name);
        info!(deleted, "bundle removed");
    }
}
