//! The reconciler against a real API server (kube-testcluster): apply with the
//! bundle label, update, prune, removal, CRD + custom resource in one bundle, error
//! messages, and rebuilding a lost inventory from labels.
//!
//! Runs when `FLOTILLA_TESTENV_BIN` names the directory holding kube-testcluster
//! (or `FLOTILLA_TEST_KUBECONFIG` names a running cluster); skipped with a note
//! otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_agent::apply::Cluster;
use flotilla_agent::reconcile::Reconciler;
use flotilla_agent::store::{DesiredBundle, DesiredSet, Store};
use flotilla_shared::bundle::{render_plain, Rendered};
use flotilla_shared::state::BundleState;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use prost::Message;
use tokio::sync::watch;

/// Port for the control plane this test starts (the agent's range is 16500-16599).
const PORT: u16 = 16531;

struct TestCluster {
    kubeconfig: PathBuf,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn cluster() -> Option<(TestCluster, kube::Client)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tc = if let Ok(kc) = std::env::var("FLOTILLA_TEST_KUBECONFIG") {
        TestCluster {
            kubeconfig: kc.into(),
            child: None,
            _dir: None,
        }
    } else if let Ok(bin) = std::env::var("FLOTILLA_TESTENV_BIN") {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(PathBuf::from(bin).join("kube-testcluster"))
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--port")
            .arg(PORT.to_string())
            .arg("--log-file")
            .arg(dir.path().join("log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kube-testcluster");
        TestCluster {
            kubeconfig: dir.path().join("kubeconfig"),
            child: Some(child),
            _dir: Some(dir),
        }
    } else {
        eprintln!("note: FLOTILLA_TESTENV_BIN unset; skipping the cluster test");
        return None;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if tc.kubeconfig.exists() {
            if let Ok(client) = flotilla_agent::kube_client(Some(&tc.kubeconfig)).await {
                if client.apiserver_version().await.is_ok() {
                    let ns: Api<Namespace> = Api::all(client.clone());
                    if ns.get_opt("default").await.ok().flatten().is_some() {
                        return Some((tc, client));
                    }
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "test cluster not ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Namespaces get a per-run suffix so the test can run again on the same cluster.
fn ns(base: &str) -> String {
    static SUFFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sfx = SUFFIX.get_or_init(|| format!("{:06x}", rand::random::<u32>() & 0xff_ffff));
    base.replacen("agt-", &format!("agt{sfx}-"), 1)
}

fn rendered(files: &[(&str, &str)]) -> Rendered {
    let files: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(p, c)| (p.to_string(), c.replace("agt-", &ns("agt-")).into_bytes()))
        .collect();
    render_plain(&files).unwrap()
}

/// Stores a Desired set made of (bundle name, rendered) pairs.
fn set_desired(store: &Store, generation: u64, bundles: &[(&str, &Rendered)]) {
    let mut set = DesiredSet {
        generation,
        bundles: vec![],
    };
    let mut contents = vec![];
    for (name, r) in bundles {
        let hash = r.content_hash();
        set.bundles.push(DesiredBundle {
            name: name.to_string(),
            content_hash: hash.clone(),
            revision: format!("rev{generation}"),
        });
        contents.push((
            hash.clone(),
            flotilla_proto::bundle_content(&hash, r).encode_to_vec(),
        ));
    }
    store.save_desired(&set, &contents).unwrap();
}

fn state_of(store: &Store, bundle: &str) -> (BundleState, String) {
    let s = store.last_status(bundle).unwrap().expect("a status");
    (s.state, s.message)
}

async fn cm(client: &kube::Client, ns: &str, name: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

/// One control plane for every scenario: starting one costs seconds and memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_real_cluster() {
    let Some((_tc, client)) = cluster().await else {
        return;
    };
    applies_updates_prunes_and_removes(&client).await;
    crd_and_custom_resource_in_one_bundle(&client).await;
    lost_inventory_is_rebuilt_from_labels(&client).await;
}

async fn applies_updates_prunes_and_removes(client: &kube::Client) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1).unwrap();
    let (tx, _rx) = watch::channel(0);
    let mut rec = Reconciler::new(store.clone(), Cluster::new(client.clone()), tx);

    // Apply: a namespace and two config maps, one placed by defaultNamespace.
    let v1 = rendered(&[
        ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-a}\n"),
        ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one, namespace: agt-a}\ndata: {k: v1}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: two}\ndata: {k: x}\n"),
        ("fleet.yaml", "defaultNamespace: agt-a-default\n"),
    ]);
    set_desired(&store, 1, &[("web", &v1)]);
    rec.pass().await;
    assert_eq!(state_of(&store, "web"), (BundleState::Ready, String::new()));
    let one = cm(client, &ns("agt-a"), "one").await.expect("one applied");
    assert_eq!(
        one.metadata.labels.unwrap()["flotilla.io/bundle"],
        "web",
        "bundle label"
    );
    assert!(one
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .any(|f| f.manager.as_deref() == Some("flotilla")));
    assert!(
        cm(client, &ns("agt-a-default"), "two").await.is_some(),
        "defaultNamespace created and used"
    );

    // Change: one updated, two pruned.
    let v2 = rendered(&[
        ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-a}\n"),
        ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one, namespace: agt-a}\ndata: {k: v2}\n"),
        ("fleet.yaml", "defaultNamespace: agt-a-default\n"),
    ]);
    set_desired(&store, 2, &[("web", &v2)]);
    rec.pass().await;
    assert_eq!(state_of(&store, "web").0, BundleState::Ready);
    let one = cm(client, &ns("agt-a"), "one").await.unwrap();
    assert_eq!(one.data.unwrap()["k"], "v2");
    assert!(
        cm(client, &ns("agt-a-default"), "two").await.is_none(),
        "two pruned"
    );

    // An invalid object fails its bundle with file, object and reason, and leaves
    // the other bundle alone.
    let bad = rendered(&[(
        "bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Bad_Name, namespace: agt-a}\n",
    )]);
    set_desired(&store, 3, &[("web", &v2), ("bad", &bad)]);
    rec.pass().await;
    let (st, msg) = state_of(&store, "bad");
    assert_eq!(st, BundleState::ErrApplied);
    assert!(
        msg.starts_with(&format!("bad.yaml: ConfigMap {}/Bad_Name: ", ns("agt-a"))),
        "{msg}"
    );
    assert_eq!(state_of(&store, "web").0, BundleState::Ready);

    // Removal: everything the bundle owns is deleted and its state dropped.
    set_desired(&store, 4, &[]);
    rec.pass().await;
    assert!(
        cm(client, &ns("agt-a"), "one").await.is_none(),
        "one deleted"
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let gone_or_going = namespaces
        .get_opt(&ns("agt-a"))
        .await
        .unwrap()
        .is_none_or(|n| n.metadata.deletion_timestamp.is_some());
    assert!(gone_or_going, "the bundle's Namespace object is deleted");
    assert!(store.last_status("web").unwrap().is_none());
    assert!(store.inventory("web").unwrap().is_none());
}

async fn crd_and_custom_resource_in_one_bundle(client: &kube::Client) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1).unwrap();
    let (tx, _rx) = watch::channel(0);
    let mut rec = Reconciler::new(store.clone(), Cluster::new(client.clone()), tx);
    let crd = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.agent.flotilla.io}
spec:
  group: agent.flotilla.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;
    // File names chosen so that path order would put the widget first.
    let r = rendered(&[
        ("a-widget.yaml", "apiVersion: agent.flotilla.io/v1\nkind: Widget\nmetadata: {name: w1, namespace: agt-crd}\nspec: {size: 3}\n"),
        ("b-crd.yaml", crd),
        ("c-ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-crd}\n"),
    ]);
    set_desired(&store, 1, &[("widgets", &r)]);
    rec.pass().await;
    assert_eq!(
        state_of(&store, "widgets"),
        (BundleState::Ready, String::new())
    );
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("agent.flotilla.io", "v1", "Widget"));
    let w: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns("agt-crd"), &ar);
    let w1 = w.get("w1").await.unwrap();
    assert_eq!(w1.data["spec"]["size"], 3);
    assert_eq!(w1.metadata.labels.unwrap()["flotilla.io/bundle"], "widgets");
}

async fn lost_inventory_is_rebuilt_from_labels(client: &kube::Client) {
    let both = rendered(&[
        ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-inv}\n"),
        ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: keep, namespace: agt-inv}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: drop, namespace: agt-inv}\n"),
    ]);
    {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1).unwrap();
        let (tx, _rx) = watch::channel(0);
        let mut rec = Reconciler::new(store.clone(), Cluster::new(client.clone()), tx);
        set_desired(&store, 1, &[("inv", &both)]);
        rec.pass().await;
        assert_eq!(state_of(&store, "inv").0, BundleState::Ready);
    }
    assert!(cm(client, &ns("agt-inv"), "drop").await.is_some());
    // A fresh store (sled lost): the new content lacks `drop`, which is found by
    // its label and pruned.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1).unwrap();
    let (tx, _rx) = watch::channel(0);
    let mut rec = Reconciler::new(store.clone(), Cluster::new(client.clone()), tx);
    let keep = rendered(&[
        (
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-inv}\n",
        ),
        (
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: keep, namespace: agt-inv}\n",
        ),
    ]);
    set_desired(&store, 1, &[("inv", &keep)]);
    rec.pass().await;
    assert_eq!(state_of(&store, "inv").0, BundleState::Ready);
    assert!(cm(client, &ns("agt-inv"), "keep").await.is_some());
    assert!(
        cm(client, &ns("agt-inv"), "drop").await.is_none(),
        "drop pruned via rebuilt inventory"
    );
}
