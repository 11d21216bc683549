//! The agent's Kubernetes Events against a real API server (kube-testcluster): a
//! note becomes an events.k8s.io/v1 Event in the object's namespace (`default` for
//! a cluster-scoped object); repeats within the quiet time write nothing, and after
//! it are counted on the same Event (`series`); an Event deleted meanwhile is
//! recorded anew; a refused Event is counted and the next one is recorded.
//!
//! Runs when `FLOTILLA_TESTENV_BIN` names the directory holding kube-testcluster
//! (or `FLOTILLA_TEST_KUBECONFIG` names a running cluster); skipped with a note
//! otherwise.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cluster, ns, DEADLINE, NOW_MS};
use flotilla_agent::clock::FixedClock;
use flotilla_agent::events::{self, Events, Reporter, QUIET_MS};
use flotilla_agent::metrics::Metrics;
use flotilla_shared::bundle::ObjectRef;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// Port for the control plane this test starts (the agent's range is 16500-16599).
const PORT: u16 = 16533;

/// The Events in `namespace` regarding an object called `name`.
async fn events_of(client: &kube::Client, namespace: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Waits until `f` holds of the Events regarding `name` in `namespace`.
async fn wait_events(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    what: &str,
    f: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let found = events_of(client, namespace, name).await;
        if f(&found) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {found:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_count(metric: &prometheus_client::metrics::counter::Counter, n: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metric.get() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            metric.get()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_recorded_counted_and_never_fatal() {
    let Some((_tc, client)) = cluster(PORT).await else {
        return;
    };
    let namespace = ns("agt-events");
    let mut n = Namespace::default();
    n.metadata.name = Some(namespace.clone());
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &n)
        .await
        .unwrap();

    let clock = FixedClock::new(NOW_MS);
    let metrics = Arc::new(Metrics::new());
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let recorder = Events::spawn(
        client.clone(),
        Reporter::agent("unit-cluster"),
        clock.clone(),
        Some(metrics.clone()),
        stop_rx,
    );
    let object = ObjectRef {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        namespace: Some(namespace.clone()),
        name: "bad".into(),
    };
    let note = || events::apply_failed("b", Some("cm.yaml"), &object, "it is invalid");

    // A first occurrence: an Event, at once.
    recorder.record(note());
    let found = wait_events(&client, &namespace, "bad", "the first Event", |e| {
        e.len() == 1
    })
    .await;
    let e = &found[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.reason.as_deref(), Some("ApplyFailed"));
    assert_eq!(e.reporting_controller.as_deref(), Some("flotilla-agent"));
    assert_eq!(e.reporting_instance.as_deref(), Some("unit-cluster"));
    let expected =
        format!("bundle b: cannot apply ConfigMap {namespace}/bad (cm.yaml): it is invalid");
    assert_eq!(e.note.as_deref(), Some(expected.as_str()));
    assert!(e.series.is_none());

    // Retried within the quiet time: nothing written.
    for _ in 0..10 {
        clock.advance(1_000);
        recorder.record(note());
    }
    // Past it: counted on the same Event.
    clock.advance(QUIET_MS);
    recorder.record(note());
    let found = wait_events(&client, &namespace, "bad", "a series of 12", |e| {
        e.len() == 1 && e[0].series.as_ref().is_some_and(|s| s.count == 12)
    })
    .await;
    assert_eq!(found.len(), 1, "one Event for every repeat");
    wait_count(&metrics.events, 2, "a create and one patch").await;
    assert_eq!(metrics.events.get(), 2, "a create and one patch, no more");

    // The Event expired (deleted here): the next repeat records a new one.
    let name = found[0].metadata.name.clone().unwrap();
    Api::<Event>::namespaced(client.clone(), &namespace)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    clock.advance(QUIET_MS);
    recorder.record(note());
    let found = wait_events(&client, &namespace, "bad", "a new Event", |e| {
        e.len() == 1 && e[0].metadata.name.as_deref() != Some(name.as_str())
    })
    .await;
    assert!(found[0].series.is_none(), "{found:#?}");

    // A refused Event (its namespace does not exist) is counted; the next one
    // is recorded all the same.
    let nowhere = ObjectRef {
        namespace: Some(ns("agt-no-such-namespace")),
        ..object.clone()
    };
    recorder.record(events::apply_failed("b", None, &nowhere, "x"));
    wait_count(&metrics.event_errors, 1, "the refusal counted").await;

    // A cluster-scoped object: its Event goes to `default`.
    let cluster_scoped = ObjectRef {
        api_version: "rbac.authorization.k8s.io/v1".into(),
        kind: "ClusterRole".into(),
        namespace: None,
        name: format!("{namespace}:Reader"),
    };
    recorder.record(events::drift_corrected(
        "b",
        &cluster_scoped,
        None,
        true,
        &[],
    ));
    let found = wait_events(
        &client,
        "default",
        &cluster_scoped.name,
        "in default",
        |e| !e.is_empty(),
    )
    .await;
    assert_eq!(found[0].type_.as_deref(), Some("Normal"));
    assert_eq!(found[0].reason.as_deref(), Some("DriftCorrected"));
    assert!(found[0].regarding.as_ref().unwrap().namespace.is_none());
    assert_eq!(metrics.event_errors.get(), 1);
}
