//! Kubernetes Events, end to end: the agent records an `ApplyFailed` Warning for
//! an object the API server refuses (in the object's namespace, or `default` for a
//! cluster-scoped one), once however often the apply is retried, and a
//! `DriftCorrected` Event for an object it puts back after someone changed or
//! deleted it, naming paths and the manager: for a Secret, never a value.

use std::collections::BTreeMap;

use anyhow::Result;
use flotilla_tests::*;
use serde_json::Value;

const NS: &str = "e2e-events";
const BROKEN_NS: &str = "e2e-events-broken";
const CLUSTER: &str = "events-east";

/// Values of the Secret, before and after someone edits it: none may reach an Event.
const SECRET_BEFORE: &str = "hunter2-original-e2e";
const SECRET_AFTER: &str = "swordfish-edited-e2e";

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every Event of the cluster (core/v1 view, as `kubectl get events` shows them).
fn all_events(cluster: &TestCluster) -> Result<(String, Vec<Value>)> {
    let text = cluster.kubectl(&["get", "events", "-A", "-o", "json"])?;
    let v: Value = serde_json::from_str(&text)?;
    Ok((text, v["items"].as_array().cloned().unwrap_or_default()))
}

/// The Events with `reason` regarding (kind, namespace, name).
fn events_of(
    events: &[Value],
    reason: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Vec<Value> {
    events
        .iter()
        .filter(|e| {
            let o = &e["involvedObject"];
            e["reason"] == reason
                && o["kind"] == kind
                && o["name"] == name
                && o["namespace"].as_str() == namespace
        })
        .cloned()
        .collect()
}

/// Waits for an Event with `reason` regarding the object whose message contains `has`.
fn wait_event(
    cluster: &TestCluster,
    reason: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    has: &str,
) -> Result<Value> {
    let what = format!("a {reason} event for {kind} {namespace:?}/{name} saying {has:?}");
    wait_until(&what, DEADLINE, || {
        let (_, all) = all_events(cluster)?;
        let found = events_of(&all, reason, kind, namespace, name);
        Ok(found
            .into_iter()
            .find(|e| e["message"].as_str().is_some_and(|m| m.contains(has))))
    })
}

#[test]
fn apply_failures_and_drift_corrections_are_kubernetes_events() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("events")?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "ev")?;
    let good = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {NS}}}\n\
         data: {{mode: blue}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: creds, namespace: {NS}}}\n\
         data: {{password: {}}}\n",
        b64(SECRET_BEFORE)
    );
    // A label value Kubernetes refuses: the API server's validation says why.
    let broken = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {BROKEN_NS}}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n  namespace: {BROKEN_NS}\n  \
         labels: {{tier: \"not a valid value!\"}}\ndata: {{a: b}}\n"
    );
    // A cluster-scoped object refused: its Event goes to `default`.
    let badns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: e2e-events-refused\n  \
                 labels: {tier: \"also not valid!\"}\n";
    repo.commit(
        &BTreeMap::from([
            ("good/objects.yaml", Some(good.as_str())),
            ("broken/objects.yaml", Some(broken.as_str())),
            ("badns/ns.yaml", Some(badns)),
        ]),
        "three bundles",
    )?;
    let agent = Agent::start(
        &hub,
        &hub.token()?,
        CLUSTER,
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "ev", "--repo", &repo.url, "--path", "good", "--path", "broken", "--path",
        "badns", "--poll", "1s",
    ])?;
    hub.wait_bundle_state("ev-good", CLUSTER, "Ready")?;
    hub.wait_bundle_state("ev-broken", CLUSTER, "ErrApplied")?;
    hub.wait_bundle_state("ev-badns", CLUSTER, "ErrApplied")?;

    // The refused ConfigMap: a Warning in its namespace naming bundle, object, reason.
    let e = wait_event(
        east,
        "ApplyFailed",
        "ConfigMap",
        Some(BROKEN_NS),
        "bad",
        "Invalid value",
    )?;
    assert_eq!(e["type"], "Warning", "{e:#}");
    assert_eq!(e["metadata"]["namespace"], BROKEN_NS, "{e:#}");
    assert_eq!(e["involvedObject"]["apiVersion"], "v1", "{e:#}");
    assert_eq!(e["reportingComponent"], "flotilla-agent", "{e:#}");
    assert_eq!(e["reportingInstance"], CLUSTER, "{e:#}");
    let m = e["message"].as_str().unwrap_or_default();
    assert!(m.contains("bundle ev-broken"), "{m}");
    assert!(m.contains(&format!("ConfigMap {BROKEN_NS}/bad")), "{m}");
    assert!(m.contains("metadata.labels"), "{m}");

    // The refused Namespace: cluster-scoped, so its Event is in `default`.
    let e = wait_event(
        east,
        "ApplyFailed",
        "Namespace",
        None,
        "e2e-events-refused",
        "bundle ev-badns",
    )?;
    assert_eq!(e["metadata"]["namespace"], "default", "{e:#}");
    assert_eq!(e["type"], "Warning", "{e:#}");

    // Someone edits a managed field: put back, and a DriftCorrected Event says
    // which path and who.
    east.kubectl_edit(&["-n", NS, "configmap/settings"], "s/mode: blue/mode: red/")?;
    let e = wait_event(
        east,
        "DriftCorrected",
        "ConfigMap",
        Some(NS),
        "settings",
        "/data/mode",
    )?;
    assert_eq!(e["type"], "Normal", "{e:#}");
    let m = e["message"].as_str().unwrap_or_default();
    assert!(m.contains("bundle ev-good"), "{m}");
    assert!(m.contains("changed by kubectl-edit"), "{m}");
    assert!(!m.contains("red"), "no value in the message: {m}");
    // It regards the object as it is (kubectl describe finds it by uid).
    let live = east
        .get("configmap", Some(NS), "settings")?
        .unwrap_or_default();
    assert_eq!(e["involvedObject"]["uid"], live["metadata"]["uid"], "{e:#}");
    assert_eq!(live["data"]["mode"], "blue", "corrected: {live:#}");

    // Deleted: created again, and said so.
    east.kubectl(&["delete", "-n", NS, "configmap/settings"])?;
    wait_event(
        east,
        "DriftCorrected",
        "ConfigMap",
        Some(NS),
        "settings",
        "was deleted",
    )?;

    // The abuse case: a Secret edited behind Flotilla's back. The Event names the
    // path and the manager; neither value, plain or base64, is in any Event.
    east.kubectl(&[
        "patch",
        "-n",
        NS,
        "secret/creds",
        "--type=merge",
        "-p",
        &format!(r#"{{"data":{{"password":"{}"}}}}"#, b64(SECRET_AFTER)),
    ])?;
    let e = wait_event(
        east,
        "DriftCorrected",
        "Secret",
        Some(NS),
        "creds",
        "/data/password",
    )?;
    let m = e["message"].as_str().unwrap_or_default();
    assert!(m.contains("changed by kubectl-patch"), "{m}");
    wait_until("the Secret put back", DEADLINE, || {
        let s = east.get("secret", Some(NS), "creds")?.unwrap_or_default();
        Ok((s["data"]["password"] == b64(SECRET_BEFORE).as_str()).then_some(()))
    })?;
    let (text, all) = all_events(east)?;
    for value in [
        SECRET_BEFORE.to_string(),
        SECRET_AFTER.to_string(),
        b64(SECRET_BEFORE),
        b64(SECRET_AFTER),
    ] {
        assert!(
            !text.contains(&value),
            "a Secret value in the Events: {value}"
        );
    }

    // A failing apply retried is one Event, not one per retry: wait until the
    // broken bundle has been retried (every 30 s, and on every new desired set),
    // then count.
    wait_until("the broken bundle retried", DEADLINE, || {
        let retries = agent
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("bundle not applied") && l.contains("ev-broken"))
            .count();
        Ok((retries >= 2).then_some(()))
    })?;
    let (_, all_after) = all_events(east)?;
    let failed = events_of(
        &all_after,
        "ApplyFailed",
        "ConfigMap",
        Some(BROKEN_NS),
        "bad",
    );
    assert_eq!(
        failed.len(),
        1,
        "one Event for a retried failure: {failed:#?}"
    );
    let corrected = events_of(&all, "DriftCorrected", "Secret", Some(NS), "creds");
    assert_eq!(corrected.len(), 1, "{corrected:#?}");
    Ok(())
}
