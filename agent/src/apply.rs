//! Talking to the cluster: server-side apply under the field manager `flotilla`,
//! kind discovery, waiting for CRDs, deleting what we own, and finding our objects
//! by their bundle label when the inventory is lost.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use flotilla_shared::bundle::ObjectRef;
use flotilla_shared::{BUNDLE_LABEL, FIELD_MANAGER};

use crate::plan::Found;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, ApiCapabilities, ApiResource, Scope};
use kube::Client;
use tracing::{debug, info};

/// How long a new CRD may take to become Established before objects of its kinds
/// are attempted anyway (the API server usually needs well under a second).
const CRD_DEADLINE: Duration = Duration::from_secs(30);
/// Polling interval while waiting for a CRD.
const CRD_POLL: Duration = Duration::from_millis(200);
/// After a CRD was applied its kinds may take a moment to appear in discovery.
const DISCOVERY_GRACE: Duration = Duration::from_secs(10);

/// Why a cluster call failed, in the API server's words when it gave any.
pub fn reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => crate::transport::error_chain(other),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

/// An object as JSON with its apiVersion and kind, which responses may omit.
fn typed_value(obj: DynamicObject, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    if v.is_object() {
        v["apiVersion"] = serde_json::Value::String(api_version.to_string());
        v["kind"] = serde_json::Value::String(kind.to_string());
    }
    v
}

fn gvk_of(api_version: &str, kind: &str) -> GroupVersionKind {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// Server-side applies one object outside a reconcile pass (a drift correction):
/// same field manager, forced, as [`Cluster::apply`]. Returns the object's uid.
pub async fn apply_object(
    client: &Client,
    resource: &ApiResource,
    object: &ObjectRef,
    body: &serde_json::Value,
) -> Result<Option<String>, String> {
    let api: Api<DynamicObject> = match &object.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&object.name, &params, &Patch::Apply(body))
        .await
        .map(|live| live.metadata.uid)
        .map_err(|e| reason(&e))
}

/// The API versions the cluster serves, as Helm's `.Capabilities.APIVersions`
/// checks them (`apps/v1`, `apps/v1/Deployment`, `v1`, `v1/Pod`; sorted, distinct):
/// one discovery run, aggregated (two requests) where the server offers it, else
/// the classic walk of every group.
pub async fn api_versions(client: &Client) -> Result<Vec<String>, String> {
    let found = match discovery::Discovery::new(client.clone())
        .run_aggregated()
        .await
    {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %reason(&e), "no aggregated discovery; walking the groups");
            discovery::Discovery::new(client.clone())
                .run()
                .await
                .map_err(|e| reason(&e))?
        }
    };
    let mut gvks: Vec<(String, String, String)> = Vec::new();
    for g in found.groups() {
        for v in g.versions() {
            gvks.push((g.name().to_string(), v.to_string(), String::new()));
            for (r, _) in g.versioned_resources(v) {
                gvks.push((r.group, r.version, r.kind));
            }
        }
    }
    Ok(flotilla_shared::capabilities::api_version_strings(
        gvks.iter()
            .map(|(g, v, k)| (g.as_str(), v.as_str(), k.as_str())),
    ))
}

/// A resolved kind: how to reach it and whether it is namespaced.
#[derive(Clone)]
pub struct Kind {
    pub resource: ApiResource,
    pub namespaced: bool,
}

/// The cluster side of the agent. Caches kind discovery; kinds not found are not
/// cached, so a CRD applied later is picked up.
pub struct Cluster {
    client: Client,
    /// For the health watches (see `crate::watch_client`); by default `client`.
    watch_client: Client,
    kinds: HashMap<(String, String), Kind>,
}

impl Cluster {
    pub fn new(client: Client) -> Self {
        Cluster {
            watch_client: client.clone(),
            client,
            kinds: HashMap::new(),
        }
    }

    /// Watches use this client instead (one without the client's own retries).
    pub fn with_watch_client(mut self, client: Client) -> Self {
        self.watch_client = client;
        self
    }

    pub fn watch_client(&self) -> Client {
        self.watch_client.clone()
    }

    /// The API server's version, e.g. `v1.34.1`.
    pub async fn version(&self) -> Result<String, String> {
        self.client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .map_err(|e| reason(&e))
    }

    /// Resolves a kind; with `grace`, keeps trying for a while (a CRD was just made).
    pub async fn kind(
        &mut self,
        api_version: &str,
        kind: &str,
        grace: bool,
    ) -> Result<Kind, String> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(k) = self.kinds.get(&key) {
            return Ok(k.clone());
        }
        let gvk = gvk_of(api_version, kind);
        let deadline = tokio::time::Instant::now() + DISCOVERY_GRACE;
        let (resource, caps): (ApiResource, ApiCapabilities) = loop {
            match discovery::pinned_kind(&self.client, &gvk).await {
                Ok(found) => break found,
                Err(e) if grace && tokio::time::Instant::now() < deadline => {
                    debug!(error = %e, %api_version, %kind, "kind not served yet; retrying");
                    tokio::time::sleep(CRD_POLL).await;
                }
                Err(e) => {
                    return Err(format!(
                        "the cluster does not serve kind {kind} in {api_version}: {}",
                        reason(&e)
                    ))
                }
            }
        };
        let k = Kind {
            resource,
            namespaced: caps.scope == Scope::Namespaced,
        };
        self.kinds.insert(key, k.clone());
        Ok(k)
    }

    fn api(&self, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        match (kind.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &kind.resource),
            _ => Api::all_with(self.client.clone(), &kind.resource),
        }
    }

    /// Creates a namespace unless it exists (as Fleet does for a bundle's namespace).
    /// It is not labelled or recorded: removing the bundle leaves it in place.
    pub async fn ensure_namespace(&self, name: &str) -> Result<(), String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get_opt(name).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => return Err(format!("Namespace {name}: {}", reason(&e))),
        }
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.to_string());
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {
                info!(namespace = %name, "created the bundle's namespace");
                Ok(())
            }
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(format!("Namespace {name}: {}", reason(&e))),
        }
    }

    /// The client, for watches.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Server-side applies one prepared object, forcing ownership of conflicting
    /// fields. Returns the object as the API server stored it.
    pub async fn apply(
        &self,
        kind: &Kind,
        object: &ObjectRef,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let live = self
            .api(kind, object.namespace.as_deref())
            .patch(&object.name, &params, &Patch::Apply(body))
            .await
            .map_err(|e| reason(&e))?;
        Ok(typed_value(live, &object.api_version, &object.kind))
    }

    /// The objects of `kind` in `namespace` (all of a cluster-scoped kind), by name,
    /// with their bundle label and field managers: what an apply would meet. One
    /// metadata-only list per kind and namespace, not a read per object.
    pub async fn found(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
    ) -> Result<HashMap<String, Found>, String> {
        let list = self
            .api(kind, namespace)
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| reason(&e))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|item| {
                let meta = item.metadata;
                let mut managers: Vec<String> = Vec::new();
                for m in meta.managed_fields.iter().flatten() {
                    if let Some(name) = &m.manager {
                        if !managers.contains(name) {
                            managers.push(name.clone());
                        }
                    }
                }
                let bundle = meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(BUNDLE_LABEL))
                    .cloned();
                Some((meta.name?, Found { bundle, managers }))
            })
            .collect())
    }

    /// Waits until a CRD is Established; returns it as last read.
    pub async fn wait_crd(&self, name: &str) -> Result<serde_json::Value, String> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + CRD_DEADLINE;
        loop {
            let crd = api.get_opt(name).await.map_err(|e| reason(&e))?;
            let established = crd
                .as_ref()
                .and_then(|crd| crd.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if let (true, Some(crd)) = (established, crd) {
                return Ok(serde_json::to_value(crd).unwrap_or_default());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("not Established after {}s", CRD_DEADLINE.as_secs()));
            }
            tokio::time::sleep(CRD_POLL).await;
        }
    }

    /// Deletes an object if it still carries our label for `bundle`; gone is fine.
    pub async fn delete_owned(&mut self, bundle: &str, object: &ObjectRef) -> Result<bool, String> {
        let kind = match self.kind(&object.api_version, &object.kind, false).await {
            Ok(k) => k,
            // The kind itself is gone (its CRD was deleted): so are its objects.
            Err(_) => return Ok(false),
        };
        let api = self.api(&kind, object.namespace.as_deref());
        let live = match api.get_opt(&object.name).await {
            Ok(Some(live)) => live,
            Ok(None) => return Ok(false),
            Err(e) => return Err(format!("{object}: {}", reason(&e))),
        };
        let owned = live
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(BUNDLE_LABEL))
            .is_some_and(|b| b == bundle);
        if !owned {
            info!(%object, "not pruning: no longer labelled as part of this bundle");
            return Ok(false);
        }
        match api.delete(&object.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(format!("{object}: {}", reason(&e))),
        }
    }

    /// Finds the objects labelled as belonging to `bundle`, among the given kinds
    /// (apiVersion, kind). Kinds the cluster does not serve are skipped. A kind
    /// the agent may not list cluster-wide (RBAC limited to an allow-list of
    /// namespaces, `deploy/agent-namespaced`) is listed in each of `namespaces`
    /// instead; where it may not list at all, it cannot have applied either.
    pub async fn list_owned(
        &mut self,
        bundle: &str,
        kinds: &BTreeSet<(String, String)>,
        namespaces: &BTreeSet<String>,
    ) -> Result<BTreeSet<ObjectRef>, String> {
        let selector = format!("{BUNDLE_LABEL}={bundle}");
        let params = ListParams::default().labels(&selector);
        let mut out = BTreeSet::new();
        for (api_version, kind_name) in kinds {
            let Ok(kind) = self.kind(api_version, kind_name, false).await else {
                continue;
            };
            let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &kind.resource);
            let items = match all.list_metadata(&params).await {
                Ok(list) => list.items,
                Err(e) if is_forbidden(&e) && kind.namespaced => {
                    debug!(kind = %kind_name, "not allowed to list cluster-wide; listing per namespace");
                    let mut items = Vec::new();
                    for ns in namespaces {
                        match self.api(&kind, Some(ns)).list_metadata(&params).await {
                            Ok(list) => items.extend(list.items),
                            Err(e) if is_forbidden(&e) => {}
                            Err(e) => {
                                return Err(format!("listing {kind_name} in {ns}: {}", reason(&e)))
                            }
                        }
                    }
                    items
                }
                Err(e) if is_forbidden(&e) => continue,
                Err(e) => return Err(format!("listing {kind_name}: {}", reason(&e))),
            };
            for item in items {
                let Some(name) = item.metadata.name else {
                    continue;
                };
                out.insert(ObjectRef {
                    api_version: api_version.clone(),
                    kind: kind_name.clone(),
                    namespace: if kind.namespaced {
                        item.metadata.namespace
                    } else {
                        None
                    },
                    name,
                });
            }
        }
        Ok(out)
    }
}
