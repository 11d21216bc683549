//! The reconciler against a real API server (kube-testcluster): apply with the
//! bundle label, update, prune, removal, CRD + custom resource in one bundle, error
//! messages, rebuilding a lost inventory from labels, the flushes of a large apply,
//! and statuses recorded in decision order while two watches of a bundle race.
//!
//! Runs when `FLOTILLA_TESTENV_BIN` names the directory holding kube-testcluster
//! (or `FLOTILLA_TEST_KUBECONFIG` names a running cluster); skipped with a note
//! otherwise.

mod common;

use std::time::Duration;

use common::{cluster, config_maps, desired, ns, rendered, TestAgent, NOW_MS};
use flotilla_agent::clock::Clock;
use flotilla_shared::state::BundleState;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use prost::Message;

/// Port for the control plane this test starts (the agent's range is 16500-16599).
const PORT: u16 = 16531;

async fn cm(client: &kube::Client, ns: &str, name: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

/// One control plane for every scenario: starting one costs seconds and memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_real_cluster() {
    let Some((_tc, client)) = cluster(PORT).await else {
        return;
    };
    applies_updates_prunes_and_removes(&client).await;
    crd_and_custom_resource_in_one_bundle(&client).await;
    lost_inventory_is_rebuilt_from_labels(&client).await;
    a_thousand_objects_flush_a_few_times(&client).await;
    two_watches_of_one_bundle_record_in_decision_order(&client).await;
    content_not_matching_its_hash_applies_nothing(&client).await;
    existing_objects_are_not_taken_over_or_pruned(&client).await;
    secret_drift_records_paths_and_hashes_only(&client).await;
}

async fn applies_updates_prunes_and_removes(client: &kube::Client) {
    let mut agent = TestAgent::new(client);

    // Apply: a namespace and two config maps, one placed by defaultNamespace.
    let v1 = rendered(&[
        ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-a}\n"),
        ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one, namespace: agt-a}\ndata: {k: v1}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: two}\ndata: {k: x}\n"),
        ("fleet.yaml", "defaultNamespace: agt-a-default\n"),
    ]);
    agent.set_desired(1, &[("web", &v1)]).await;
    agent.rec.pass().await;
    assert_eq!(
        agent.state_of("web").await,
        (BundleState::Ready, String::new())
    );
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
    agent.set_desired(2, &[("web", &v2)]).await;
    agent.rec.pass().await;
    assert_eq!(agent.state_of("web").await.0, BundleState::Ready);
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
    agent.set_desired(3, &[("web", &v2), ("bad", &bad)]).await;
    agent.rec.pass().await;
    let (st, msg) = agent.state_of("bad").await;
    assert_eq!(st, BundleState::ErrApplied);
    assert!(
        msg.starts_with(&format!("bad.yaml: ConfigMap {}/Bad_Name: ", ns("agt-a"))),
        "{msg}"
    );
    assert_eq!(agent.state_of("web").await.0, BundleState::Ready);

    // Removal: everything the bundle owns is deleted and its state dropped.
    agent.set_desired(4, &[]).await;
    agent.rec.pass().await;
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
    agent.writer.sync().await.unwrap();
    assert!(agent.store.last_status("web").unwrap().is_none());
    assert!(agent.store.inventory("web").unwrap().is_none());
}

async fn crd_and_custom_resource_in_one_bundle(client: &kube::Client) {
    let mut agent = TestAgent::new(client);
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
    agent.set_desired(1, &[("widgets", &r)]).await;
    agent.rec.pass().await;
    assert_eq!(
        agent.state_of("widgets").await,
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
        let mut agent = TestAgent::new(client);
        agent.set_desired(1, &[("inv", &both)]).await;
        agent.rec.pass().await;
        assert_eq!(agent.state_of("inv").await.0, BundleState::Ready);
    }
    assert!(cm(client, &ns("agt-inv"), "drop").await.is_some());
    // A fresh store (sled lost): the new content lacks `drop`, which is found by
    // its label and pruned.
    let mut agent = TestAgent::new(client);
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
    agent.set_desired(1, &[("inv", &keep)]).await;
    agent.rec.pass().await;
    assert_eq!(agent.state_of("inv").await.0, BundleState::Ready);
    assert!(cm(client, &ns("agt-inv"), "keep").await.is_some());
    assert!(
        cm(client, &ns("agt-inv"), "drop").await.is_none(),
        "drop pruned via rebuilt inventory"
    );
}

/// Most flushes one bundle's apply may cost, whatever its size: the `WaitApplied`
/// status, the intent (objects recorded before they exist), the inventory confirmed
/// after pruning, and the outcome. Per bundle, never per object.
const FLUSHES_PER_APPLY: u64 = 4;

/// A 1,000-object apply, a change that prunes half of it, and its removal each flush
/// the store a bounded number of times; statuses carry the injected clock's time.
async fn a_thousand_objects_flush_a_few_times(client: &kube::Client) {
    let mut agent = TestAgent::new(client);
    let ns_yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-many}\n";
    let count = |client: kube::Client| async move {
        Api::<ConfigMap>::namespaced(client, &ns("agt-many"))
            .list_metadata(&ListParams::default().labels("flotilla.io/bundle=many"))
            .await
            .unwrap()
            .items
            .len()
    };
    let flushes_of = |agent: &TestAgent, before: u64| agent.store.flushes() - before;

    let many = rendered(&[
        ("ns.yaml", ns_yaml),
        ("cms.yaml", &config_maps("agt-many", "cm", 0, 999)),
    ]);
    assert_eq!(many.manifests.len(), 1_000);
    agent.set_desired(1, &[("many", &many)]).await;
    agent.writer.sync().await.unwrap();
    let before = agent.store.flushes();
    agent.rec.pass().await;
    agent.writer.sync().await.unwrap();
    let first = flushes_of(&agent, before);
    let st = agent.store.last_status("many").unwrap().expect("a status");
    assert_eq!(st.state, BundleState::Ready, "{}", st.message);
    assert_eq!(
        st.observed_at_unix_ms, NOW_MS,
        "stamped by the injected clock"
    );
    assert_eq!(count(client.clone()).await, 999);
    eprintln!("flushes for the first apply of 1,000 objects: {first}");
    assert!(
        first <= FLUSHES_PER_APPLY,
        "a 1,000-object apply flushed {first} times"
    );

    // 500 leave, 11 arrive, 499 stay.
    agent.clock.advance(1_000);
    let changed = rendered(&[
        ("ns.yaml", ns_yaml),
        ("cms.yaml", &config_maps("agt-many", "cm", 500, 510)),
    ]);
    agent.set_desired(2, &[("many", &changed)]).await;
    agent.writer.sync().await.unwrap();
    let before = agent.store.flushes();
    agent.rec.pass().await;
    agent.writer.sync().await.unwrap();
    let second = flushes_of(&agent, before);
    let st = agent.store.last_status("many").unwrap().expect("a status");
    assert_eq!(st.state, BundleState::Ready, "{}", st.message);
    assert_eq!(st.observed_at_unix_ms, agent.clock.now_unix_ms());
    assert_eq!(count(client.clone()).await, 510, "500 pruned");
    eprintln!("flushes for a change pruning 500 of them: {second}");
    assert!(
        second <= FLUSHES_PER_APPLY,
        "the change flushed {second} times"
    );

    agent.set_desired(3, &[]).await;
    agent.writer.sync().await.unwrap();
    let before = agent.store.flushes();
    agent.rec.pass().await;
    agent.writer.sync().await.unwrap();
    let removal = flushes_of(&agent, before);
    assert_eq!(count(client.clone()).await, 0, "removed");
    assert!(removal <= 1, "the removal flushed {removal} times");
}

/// Rounds of the stress test below.
const ROUNDS: usize = 15;

/// One bundle, one kind in two namespaces (two watches): both objects turn not ready
/// and ready again at the same moment, round after round. The recorded state must end
/// each round at `Ready`: were two decisions recorded out of order, a stale
/// `NotReady` would be the last word (nothing later changes the book's mind).
async fn two_watches_of_one_bundle_record_in_decision_order(client: &kube::Client) {
    let mut agent = TestAgent::new(client);
    let crd = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.agent.flotilla.io}
spec:
  group: agent.flotilla.io
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, listKind: GadgetList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;
    let pair = rendered(&[
        ("crd.yaml", crd),
        ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-o1}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: agt-o2}\n"),
        ("gadgets.yaml", "apiVersion: agent.flotilla.io/v1\nkind: Gadget\nmetadata: {name: g, namespace: agt-o1}\nspec: {}\n---\napiVersion: agent.flotilla.io/v1\nkind: Gadget\nmetadata: {name: g, namespace: agt-o2}\nspec: {}\n"),
    ]);
    agent.set_desired(1, &[("pair", &pair)]).await;
    agent.rec.pass().await;
    agent.wait_state("pair", (BundleState::Ready, "")).await;
    assert!(
        agent.rec.health().watch_count() >= 4,
        "a watch per namespace"
    );

    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("agent.flotilla.io", "v1", "Gadget"));
    let apis: Vec<Api<DynamicObject>> = ["agt-o1", "agt-o2"]
        .iter()
        .map(|n| Api::namespaced_with(client.clone(), &ns(n), &ar))
        .collect();
    let set = |api: &Api<DynamicObject>, ready: bool, round: usize| {
        let api = api.clone();
        async move {
            let status = if ready { "True" } else { "False" };
            let body = serde_json::json!({"status": {"conditions": [{"type": "Ready",
                "status": status, "reason": "Test", "message": format!("round {round}")}]}});
            api.patch_status("g", &PatchParams::default(), &Patch::Merge(&body))
                .await
                .unwrap();
        }
    };
    let mut seq = agent.store.last_status("pair").unwrap().unwrap().seq;
    for round in 0..ROUNDS {
        tokio::join!(set(&apis[0], false, round), set(&apis[1], false, round));
        tokio::join!(set(&apis[0], true, round), set(&apis[1], true, round));
        let deadline = tokio::time::Instant::now() + common::DEADLINE;
        loop {
            agent.writer.sync().await.unwrap();
            let last = agent.store.last_status("pair").unwrap().unwrap();
            assert!(last.seq >= seq, "seq never goes back");
            if last.seq > seq && last.state == BundleState::Ready {
                seq = last.seq;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the last record is {last:?}, though both gadgets are ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Content held under a hash it does not hash to (a tampered or corrupted store, a
/// hub bug) fails its bundle, naming the mismatch, and nothing of it is applied:
/// not its objects, not its namespace.
async fn content_not_matching_its_hash_applies_nothing(client: &kube::Client) {
    let mut agent = TestAgent::new(client);
    let honest = rendered(&[
        (
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: honest}\n",
        ),
        ("fleet.yaml", "defaultNamespace: agt-hash\n"),
    ]);
    let smuggled = rendered(&[
        ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: honest}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: smuggled}\n"),
        ("fleet.yaml", "defaultNamespace: agt-hash\n"),
    ]);
    let (set, _) = desired(1, &[("hash", &honest)]);
    let declared = set.bundles[0].content_hash.clone();
    let contents = vec![(
        declared.clone(),
        flotilla_proto::bundle_content(&declared, &smuggled).encode_to_vec(),
    )];
    agent.writer.save_desired(set, contents).await.unwrap();
    agent.rec.pass().await;
    let (state, message) = agent.state_of("hash").await;
    assert_eq!(state, BundleState::ErrApplied, "{message}");
    assert!(
        message.contains("hash mismatch") && message.contains(&declared),
        "{message}"
    );
    for name in ["honest", "smuggled"] {
        assert!(
            cm(client, &ns("agt-hash"), name).await.is_none(),
            "{name} applied"
        );
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(
        namespaces.get_opt(&ns("agt-hash")).await.unwrap().is_none(),
        "not even the namespace is created"
    );
}

/// An object someone else made (here a ConfigMap in kube-system, created by
/// `kubectl create`) is not taken over by a bundle that names it: the bundle fails
/// naming the object and its field managers, the object is left exactly as it was,
/// and when the bundle later drops it, it is not deleted. With `takeOwnership:
/// true` the bundle adopts it.
async fn existing_objects_are_not_taken_over_or_pruned(client: &kube::Client) {
    let mut agent = TestAgent::new(client);
    let victim = ns("agt-victim");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let mut theirs = ConfigMap::default();
    theirs.metadata.name = Some(victim.clone());
    theirs.data = Some([("owner".to_string(), "ops".to_string())].into());
    let create = PostParams {
        field_manager: Some("kubectl-create".into()),
        ..Default::default()
    };
    let before = api.create(&create, &theirs).await.unwrap();

    let claim = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {victim}, namespace: kube-system}}\ndata: {{owner: flotilla}}\n"
    );
    let mine = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mine, namespace: agt-own}\n";
    let ns_yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-own}\n";
    let grab = rendered(&[
        ("claim.yaml", &claim),
        ("mine.yaml", mine),
        ("ns.yaml", ns_yaml),
    ]);
    agent.set_desired(1, &[("grab", &grab)]).await;
    agent.rec.pass().await;
    let (state, message) = agent.state_of("grab").await;
    assert_eq!(state, BundleState::ErrApplied, "{message}");
    assert!(
        message.starts_with(&format!(
            "claim.yaml: ConfigMap kube-system/{victim}: already exists"
        )),
        "{message}"
    );
    assert!(
        message.contains("kubectl-create"),
        "names the field manager: {message}"
    );
    assert!(message.contains("takeOwnership"), "{message}");
    let untouched = |now: ConfigMap| {
        assert_eq!(
            now.metadata.resource_version, before.metadata.resource_version,
            "the object is untouched"
        );
        assert_eq!(now.data, before.data);
        assert!(!now
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("flotilla.io/bundle"));
    };
    untouched(api.get(&victim).await.unwrap());
    agent.writer.sync().await.unwrap();
    let inventory = agent.store.inventory("grab").unwrap().unwrap_or_default();
    assert!(
        inventory.iter().all(|o| o.name != victim),
        "never recorded as the bundle's: {inventory:?}"
    );

    // The bundle drops the object: it applies, and the object stays.
    let dropped = rendered(&[("mine.yaml", mine), ("ns.yaml", ns_yaml)]);
    agent.set_desired(2, &[("grab", &dropped)]).await;
    agent.rec.pass().await;
    assert_eq!(agent.state_of("grab").await.0, BundleState::Ready);
    untouched(api.get(&victim).await.unwrap());
    // And the bundle goes.
    agent.set_desired(3, &[]).await;
    agent.rec.pass().await;
    untouched(api.get(&victim).await.unwrap());

    // With takeOwnership the bundle adopts it.
    let adopt = rendered(&[
        ("claim.yaml", &claim),
        ("fleet.yaml", "takeOwnership: true\n"),
    ]);
    assert!(adopt.options.take_ownership);
    agent.set_desired(4, &[("adopt", &adopt)]).await;
    agent.rec.pass().await;
    let (state, message) = agent.state_of("adopt").await;
    assert_eq!(state, BundleState::Ready, "{message}");
    let now = api.get(&victim).await.unwrap();
    assert_eq!(now.data.unwrap()["owner"], "flotilla");
    assert_eq!(now.metadata.labels.unwrap()["flotilla.io/bundle"], "adopt");
    // Adopted, it is the bundle's: removing the bundle deletes it.
    agent.set_desired(5, &[]).await;
    agent.rec.pass().await;
    assert!(api.get_opt(&victim).await.unwrap().is_none());
}

/// A Secret changed behind Flotilla's back: the drift event the agent records (and
/// would send) names the changed paths, never the values, old or new.
async fn secret_drift_records_paths_and_hashes_only(client: &kube::Client) {
    let mut agent = TestAgent::new(client);
    let secret = rendered(&[
        ("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: agt-sec}\n"),
        ("secret.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: agt-sec}\ndata: {password: aHVudGVyMg==}\n"),
        ("fleet.yaml", "drift: {mode: report}\n"),
    ]);
    agent.set_desired(1, &[("sec", &secret)]).await;
    agent.rec.pass().await;
    agent.wait_state("sec", (BundleState::Ready, "")).await;
    let api: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &ns("agt-sec"));
    let patch = serde_json::json!({"data": {"password": "Y29ycmVjdC1ob3JzZQ=="}});
    api.patch("db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let events = loop {
        agent.writer.sync().await.unwrap();
        let events = agent.store.pending_drift().unwrap();
        if events.iter().any(|e| e.bundle == "sec") {
            break events;
        }
        assert!(tokio::time::Instant::now() < deadline, "no drift recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let event = events.iter().find(|e| e.bundle == "sec").unwrap();
    assert_eq!(event.fields.len(), 1, "{event:?}");
    assert_eq!(event.fields[0].path, "/data/password");
    let text = serde_json::to_string(event).unwrap();
    for value in [
        "aHVudGVyMg==",
        "Y29ycmVjdC1ob3JzZQ==",
        "hunter2",
        "correct-horse",
    ] {
        assert!(!text.contains(value), "{value} in the drift event: {text}");
    }
    assert!(text.contains("redacted:sha256:"), "{text}");
    let wire = flotilla_proto::v1::DriftEvent::from(event);
    assert!(!format!("{wire:?}").contains("aHVudGVyMg=="));
    agent.set_desired(2, &[]).await;
    agent.rec.pass().await;
}
