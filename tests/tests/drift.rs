//! Drift, end to end: objects changed or deleted behind Flotilla's back (with the
//! real kubectl) are reported to the hub with the field-level diff and the field
//! manager, corrected in `correct` mode and left (bundle `Modified`) in `report`
//! mode; other managers' fields and ignored fields are not drift, and ordinary
//! objects raise no drift at all once applied and their status written.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use flotilla_tests::*;
use serde_json::Value;

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

fn configmap(ns: &str, name: &str, mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  mode: {mode}\n  size: \"3\"\n"
    )
}

/// A Deployment; `replicas: None` leaves them to others (an HPA, `kubectl scale`).
fn deployment(ns: &str, name: &str, replicas: Option<u32>) -> String {
    let replicas = replicas
        .map(|r| format!("  replicas: {r}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{replicas}  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: app\n        image: registry.example/{name}:1\n        resources: {{limits: {{cpu: 1000m, memory: 64Mi}}, requests: {{cpu: \"0.5\"}}}}\n        ports: [{{containerPort: 8080, name: http}}]\n"
    )
}

/// The hub's drift events of a bundle, oldest first.
fn events(hub: &Hub, bundle: &str) -> Result<Vec<Value>> {
    let v = hub.cli_json(&["drift", "list", "--bundle", bundle])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Waits for the `n`th drift event (1-based) of a bundle; returns it.
fn wait_event(hub: &Hub, bundle: &str, n: usize) -> Result<Value> {
    wait_until(&format!("drift event #{n} of {bundle}"), DEADLINE, || {
        let ev = events(hub, bundle)?;
        anyhow::ensure!(ev.len() <= n, "more events than expected: {ev:#?}");
        Ok(ev.get(n - 1).cloned())
    })
}

fn data_mode(cluster: &TestCluster, ns: &str, name: &str) -> Result<Option<String>> {
    Ok(cluster
        .get("configmap", Some(ns), name)?
        .and_then(|c| c["data"]["mode"].as_str().map(str::to_string)))
}

/// `correct` (the default): a patch and an edit of a managed field are reported
/// with the diff and the manager and undone; a deleted object is recreated;
/// `kubectl scale` of replicas the manifest leaves out, or that an ignore rule
/// covers, is not drift; of replicas the manifest sets, it is.
#[test]
fn correct_mode_reports_and_undoes_changes() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("drift-correct")?;
    let ns = "e2e-drift-correct";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "dcor")?;
    let flotilla_yaml = "diff:\n  comparePatches:\n  - {kind: Deployment, name: pinned, jsonPointers: [/spec/replicas]}\n";
    let cm = configmap(ns, "settings", "blue");
    let free = deployment(ns, "free", None);
    let pinned = deployment(ns, "pinned", Some(1));
    let fixed = deployment(ns, "fixed", Some(1));
    repo.commit(
        &BTreeMap::from([
            ("app/fleet.yaml", Some(flotilla_yaml)),
            ("app/ns.yaml", Some(namespace(ns).as_str())),
            ("app/cm.yaml", Some(cm.as_str())),
            ("app/free.yaml", Some(free.as_str())),
            ("app/pinned.yaml", Some(pinned.as_str())),
            ("app/fixed.yaml", Some(fixed.as_str())),
        ]),
        "app",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "drift-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "dcor", "--repo", &repo.url, "--poll", "1s"])?;
    let bundle = "dcor-app";
    hub.wait_bundle_state(bundle, "drift-east", "Ready")?;

    // Other managers' fields and ignored fields: not drift.
    east.kubectl(&["scale", "-n", ns, "deployment/free", "--replicas=3"])?;
    east.kubectl(&["scale", "-n", ns, "deployment/pinned", "--replicas=2"])?;

    // A patch of a managed field: reported, with the manager, and undone.
    let t = Instant::now();
    east.kubectl(&[
        "patch",
        "-n",
        ns,
        "configmap/settings",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"green"}}"#,
    ])?;
    let e = wait_event(&hub, bundle, 1)?;
    let to_hub = t.elapsed();
    assert_eq!(e["cluster"], "drift-east", "{e:#}");
    assert_eq!(e["object"]["kind"], "ConfigMap");
    assert_eq!(e["object"]["namespace"], ns);
    assert_eq!(e["object"]["name"], "settings");
    assert_eq!(e["manager"], "kubectl-patch", "{e:#}");
    assert_eq!(e["corrected"], true);
    assert_eq!(
        e["fields"],
        serde_json::json!([{"path": "/data/mode", "desired": "blue", "live": "green"}])
    );
    wait_until("settings corrected", DEADLINE, || {
        Ok((data_mode(east, ns, "settings")?.as_deref() == Some("blue")).then_some(()))
    })?;
    let corrected = t.elapsed();
    eprintln!("patch -> event at hub {to_hub:?}; -> corrected in the cluster {corrected:?}");

    // kubectl edit, the way a person does it.
    east.kubectl_edit(&["-n", ns, "configmap/settings"], "s/mode: blue/mode: red/")?;
    let e = wait_event(&hub, bundle, 2)?;
    assert_eq!(e["manager"], "kubectl-edit", "{e:#}");
    assert_eq!(e["fields"][0]["live"], "red", "{e:#}");
    wait_until("settings corrected again", DEADLINE, || {
        Ok((data_mode(east, ns, "settings")?.as_deref() == Some("blue")).then_some(()))
    })?;

    // Deleted: recreated.
    east.kubectl(&["delete", "-n", ns, "configmap/settings"])?;
    let e = wait_event(&hub, bundle, 3)?;
    assert_eq!(e["deleted"], true, "{e:#}");
    assert_eq!(e["corrected"], true, "{e:#}");
    wait_until("settings recreated", DEADLINE, || {
        Ok(data_mode(east, ns, "settings")?.map(|_| ()))
    })?;

    // The scales of earlier stayed: no drift was found in them, nothing undone.
    let all = events(&hub, bundle)?;
    assert_eq!(all.len(), 3, "only the three changes: {all:#?}");

    // kubectl scale of replicas the manifest sets is drift (through the scale
    // subresource, which leaves no manager entry: the manager is unknown).
    east.kubectl(&["scale", "-n", ns, "deployment/fixed", "--replicas=3"])?;
    let e = wait_event(&hub, bundle, 4)?;
    assert_eq!(
        e["fields"],
        serde_json::json!([{"path": "/spec/replicas", "desired": 1, "live": 3}]),
        "{e:#}"
    );
    assert_eq!(e["corrected"], true);
    let replicas = |n: &str| -> Result<Value> {
        Ok(east
            .get("deployment", Some(ns), n)?
            .map(|d| d["spec"]["replicas"].clone())
            .unwrap_or_default())
    };
    assert_eq!(replicas("free")?, 3);
    assert_eq!(replicas("pinned")?, 2);
    wait_until("fixed scaled back", DEADLINE, || {
        Ok((replicas("fixed")? == 1).then_some(()))
    })?;

    // The views count them; `drift show` gives the diff.
    let clusters = hub.cli_json(&["cluster", "list"])?;
    assert_eq!(clusters[0]["driftEvents"], 4, "{clusters:#}");
    let b = hub.cli_json(&["bundle", "get", bundle])?;
    assert_eq!(b["clusters"][0]["driftEvents"], 4, "{b:#}");
    let id = all[0]["id"].to_string();
    let shown = hub.cli(&["drift", "show", &id])?;
    assert!(shown.contains("kubectl-patch"), "{shown}");
    assert!(shown.contains("/data/mode"), "{shown}");
    Ok(())
}

/// `report`: the change is reported and left, the bundle `Modified` until the
/// cluster changes back; a deletion likewise, until Git changes the bundle.
#[test]
fn report_mode_leaves_changes_and_marks_the_bundle() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [_, west] = shared_clusters();
    let dir = test_dir("drift-report")?;
    let ns = "e2e-drift-report";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "drep")?;
    let cm = configmap(ns, "settings", "blue");
    repo.commit(
        &BTreeMap::from([
            ("app/flotilla.yaml", Some("drift: {mode: report}\n")),
            ("app/ns.yaml", Some(namespace(ns).as_str())),
            ("app/cm.yaml", Some(cm.as_str())),
        ]),
        "app",
    )?;
    let mut agent = Agent::start(
        &hub,
        &hub.token()?,
        "drift-west",
        "",
        west,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "drep", "--repo", &repo.url, "--poll", "1s"])?;
    let bundle = "drep-app";
    hub.wait_bundle_state(bundle, "drift-west", "Ready")?;

    west.kubectl(&[
        "patch",
        "-n",
        ns,
        "configmap/settings",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"green"}}"#,
    ])?;
    let e = wait_event(&hub, bundle, 1)?;
    assert_eq!(e["corrected"], false, "{e:#}");
    assert_eq!(e["manager"], "kubectl-patch");
    let msg = hub.wait_bundle_state(bundle, "drift-west", "Modified")?;
    assert!(
        msg.contains("ConfigMap e2e-drift-report/settings: /data/mode"),
        "{msg}"
    );
    assert_eq!(
        data_mode(west, ns, "settings")?.as_deref(),
        Some("green"),
        "left as is"
    );

    // Changed back by hand: Ready again, no new event.
    west.kubectl(&[
        "patch",
        "-n",
        ns,
        "configmap/settings",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"blue"}}"#,
    ])?;
    hub.wait_bundle_state(bundle, "drift-west", "Ready")?;

    // Deleted: reported, left deleted, Modified.
    west.kubectl(&["delete", "-n", ns, "configmap/settings"])?;
    let e = wait_event(&hub, bundle, 2)?;
    assert_eq!(e["deleted"], true, "{e:#}");
    assert_eq!(e["corrected"], false);
    hub.wait_bundle_state(bundle, "drift-west", "Modified")?;
    assert_eq!(data_mode(west, ns, "settings")?, None);

    // Offline: an event made while the hub is down waits in the agent's store.
    let mut hub = hub;
    hub.stop();
    // Made again by hand, with the bundle label (so it is ours) but other data.
    let pink = configmap(ns, "settings", "pink").replace(
        "  namespace: e2e-drift-report\n",
        "  namespace: e2e-drift-report\n  labels: {flotilla.io/bundle: drep-app}\n",
    );
    west.kubectl_stdin(&["create", "-f", "-"], &pink)?;
    // The agent sees it while the hub is down (its third drift).
    wait_until("the agent detects the drift offline", DEADLINE, || {
        Ok((agent.proc.log_text().matches("drift detected").count() >= 3).then_some(()))
    })?;
    hub.restart()?;
    let e = wait_event(&hub, bundle, 3)?;
    assert_eq!(e["fields"][0]["live"], "pink", "{e:#}");
    // Restarting the agent re-sends nothing already acknowledged (and re-applies
    // its bundles, as at every start).
    agent.restart()?;
    hub.wait_bundle_state(bundle, "drift-west", "Ready")?;

    // Git changes the bundle: applied again, Ready.
    let cm2 = configmap(ns, "settings", "yellow");
    repo.commit(
        &BTreeMap::from([("app/cm.yaml", Some(cm2.as_str()))]),
        "yellow",
    )?;
    wait_until("settings from Git", DEADLINE, || {
        Ok((data_mode(west, ns, "settings")?.as_deref() == Some("yellow")).then_some(()))
    })?;
    hub.wait_bundle_state(bundle, "drift-west", "Ready")?;
    let all = events(&hub, bundle)?;
    assert_eq!(all.len(), 3, "none lost, none duplicated: {all:#?}");
    Ok(())
}

/// Ordinary objects, applied and then worked on by their controllers, raise no
/// drift: defaults, quantities written another way, ports as strings, Secrets
/// written as stringData, Services, Ingresses, RBAC, a CRD and its resource
/// (`ratio: 1` for a `number`).
/// A Job asking to be deleted once finished (`ttlSecondsAfterFinished: 0`, as
/// ingress-nginx's admission Jobs do).
fn ttl_job(ns: &str, ttl: u32) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: once\n  namespace: {ns}\nspec:\n  ttlSecondsAfterFinished: {ttl}\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: once\n        image: registry.example/once:1\n"
    )
}

/// A finished Job with `ttlSecondsAfterFinished` that Kubernetes' TTL controller
/// deletes was collected as it asked: no drift event, not created again by drift
/// correction, nor by the agent's restart (the same content applied again), and
/// the bundle stays `Ready`. A changed Job is a new one: applied, run, collected
/// again, still without drift. A ConfigMap sentinel changed after each step shows
/// that the agent's watches saw everything before it (its event is the only one).
#[test]
fn jobs_collected_after_finishing_are_not_drift() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("drift-ttl")?;
    let ns = "e2e-drift-ttl";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "dttl")?;
    let cm = configmap(ns, "sentinel", "blue");
    let job = ttl_job(ns, 0);
    repo.commit(
        &BTreeMap::from([
            ("app/fleet.yaml", Some("{}\n")),
            ("app/ns.yaml", Some(namespace(ns).as_str())),
            ("app/cm.yaml", Some(cm.as_str())),
            ("app/job.yaml", Some(job.as_str())),
        ]),
        "app",
    )?;
    let mut agent = Agent::start(
        &hub,
        &hub.token()?,
        "drift-ttl",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "dttl", "--repo", &repo.url, "--poll", "1s"])?;
    let bundle = "dttl-app";
    // The Job runs (about a second), completes and is deleted at once.
    hub.wait_bundle_state(bundle, "drift-ttl", "Ready")?;
    let job_uid = |c: &TestCluster| -> Result<Option<String>> {
        Ok(c.get("job", Some(ns), "once")?.map(|j| {
            j["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }))
    };
    wait_until("the Job collected by the TTL controller", DEADLINE, || {
        Ok(job_uid(east)?.is_none().then_some(()))
    })?;
    let sentinel = |mode: &str| {
        east.kubectl(&[
            "patch",
            "-n",
            ns,
            "configmap/sentinel",
            "--type=merge",
            "-p",
            &format!(r#"{{"data":{{"mode":"{mode}"}}}}"#),
        ])
    };
    sentinel("green")?;
    let e = wait_event(&hub, bundle, 1)?;
    assert_eq!(e["object"]["name"], "sentinel", "the only event: {e:#}");
    assert_eq!(job_uid(east)?, None, "the collected Job is not put back");
    assert_eq!(
        hub.bundle_state(bundle, "drift-ttl")?
            .map(|(s, _)| s)
            .as_deref(),
        Some("Ready")
    );

    // Restarted, the agent applies its bundles again: the same Job content is
    // not created again.
    agent.restart()?;
    wait_until("the restarted agent applied the bundle", DEADLINE, || {
        Ok(agent
            .proc
            .log_text()
            .contains("not created again for the same content")
            .then_some(()))
    })?;
    sentinel("red")?;
    let e = wait_event(&hub, bundle, 2)?;
    assert_eq!(e["object"]["name"], "sentinel", "{e:#}");
    assert_eq!(job_uid(east)?, None, "not re-created by the restart");
    hub.wait_bundle_state(bundle, "drift-ttl", "Ready")?;

    // A changed Job is a new one: it runs, and stays five seconds once finished.
    let job = ttl_job(ns, 5);
    repo.commit(
        &BTreeMap::from([("app/job.yaml", Some(job.as_str()))]),
        "ttl 5",
    )?;
    wait_until("the changed Job created", DEADLINE, || {
        Ok(east
            .get("job", Some(ns), "once")?
            .filter(|j| j["spec"]["ttlSecondsAfterFinished"] == 5)
            .map(|_| ()))
    })?;
    wait_until("the changed Job collected", DEADLINE, || {
        Ok(job_uid(east)?.is_none().then_some(()))
    })?;
    sentinel("yellow")?;
    let e = wait_event(&hub, bundle, 3)?;
    assert_eq!(e["object"]["name"], "sentinel", "{e:#}");
    assert_eq!(job_uid(east)?, None);
    let all = events(&hub, bundle)?;
    assert!(
        all.iter().all(|e| e["object"]["name"] == "sentinel"),
        "false drift: {all:#?}"
    );
    Ok(())
}

#[test]
fn ordinary_objects_raise_no_false_drift() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("drift-none")?;
    let ns = "e2e-drift-none";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "dnone")?;
    let objects = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: app, namespace: {ns}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds, namespace: {ns}}}
stringData: {{user: admin}}
data: {{token: c2VjcmV0}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: sentinel, namespace: {ns}}}
data: {{mode: blue}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: metrics, port: 9090, targetPort: metrics, protocol: TCP}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: {ns}}}
spec:
  rules:
  - host: web.example
    http:
      paths:
      - path: /
        pathType: Prefix
        backend: {{service: {{name: web, port: {{number: 80}}}}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: reader, namespace: {ns}}}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: reader, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}}
subjects:
- {{kind: ServiceAccount, name: app, namespace: {ns}}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: widgets.drift.example.com}}
spec:
  group: drift.example.com
  names: {{kind: Widget, plural: widgets, singular: widget}}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {{type: integer}}
              ratio: {{type: number}}
              extra: {{type: string}}
---
apiVersion: drift.example.com/v1
kind: Widget
metadata: {{name: w, namespace: {ns}}}
spec: {{size: 2, ratio: 1}}
"#
    );
    let web = deployment(ns, "web", Some(2));
    let bare = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: bare, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: bare}}}}\n  template:\n    metadata: {{labels: {{app: bare}}}}\n    spec:\n      containers: [{{name: app, image: registry.example/bare:1, ports: [{{containerPort: 9090}}]}}]\n"
    );
    repo.commit(
        &BTreeMap::from([
            ("app/ns.yaml", Some(namespace(ns).as_str())),
            ("app/objects.yaml", Some(objects.as_str())),
            ("app/web.yaml", Some(web.as_str())),
            ("app/bare.yaml", Some(bare.as_str())),
        ]),
        "ordinary objects",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "drift-none",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "dnone", "--repo", &repo.url, "--poll", "1s",
    ])?;
    let bundle = "dnone";
    // Ready means the Deployments' controllers have written their status.
    hub.wait_bundle_state(bundle, "drift-none", "Ready")
        .map_err(|e| {
            anyhow!(
                "{e:#}: {:?} {:?}",
                hub.cli(&["bundle", "list"]),
                hub.cli(&["source", "get", "dnone"])
            )
        })?;

    // Another tool annotates every object: each gets a new version, which the
    // agent compares with what it applied (an unchanged object is never looked at
    // again, so this is what makes the comparison run on all of them).
    for obj in [
        "serviceaccount/app",
        "secret/creds",
        "service/web",
        "ingress/web",
        "role/reader",
        "rolebinding/reader",
        "widget/w",
        "deployment/web",
        "deployment/bare",
    ] {
        east.kubectl(&["annotate", "-n", ns, obj, "example.com/touched=yes"])?;
    }
    east.kubectl(&[
        "annotate",
        "customresourcedefinition/widgets.drift.example.com",
        "example.com/touched=yes",
    ])?;

    // A sentinel change: once its event is at the hub, everything the agent saw
    // before it has been compared too.
    east.kubectl(&[
        "patch",
        "-n",
        ns,
        "configmap/sentinel",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"green"}}"#,
    ])?;
    let e = wait_event(&hub, bundle, 1)?;
    assert_eq!(e["object"]["name"], "sentinel", "the only drift: {e:#}");
    // A second pass after everything settled (replica sets, pods, endpoints).
    east.kubectl(&[
        "patch",
        "-n",
        ns,
        "configmap/sentinel",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"red"}}"#,
    ])?;
    let e = wait_event(&hub, bundle, 2)?;
    assert_eq!(e["object"]["name"], "sentinel", "the only drift: {e:#}");
    Ok(())
}

/// GET on the hub's API over a plain TCP connection (fast enough to poll every
/// few milliseconds, unlike spawning the CLI).
fn api_get(hub: &Hub, path: &str) -> Result<Value> {
    use std::io::{Read, Write};
    let addr = hub.api.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        hub.admin_token
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| anyhow!("no body"))?;
    Ok(serde_json::from_str(body)?)
}

/// Log lines' timestamps for a message, in order (ANSI colours stripped).
fn log_times(log: &str, message: &str) -> Vec<std::time::SystemTime> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let mut plain = String::new();
            let mut esc = false;
            for c in l.chars() {
                match (esc, c) {
                    (false, '\u{1b}') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => plain.push(c),
                }
            }
            let ts = plain.split_whitespace().next()?.to_string();
            humantime::parse_rfc3339_weak(ts.trim_end_matches('Z')).ok()
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Benchmark (run by hand: `cargo test -p flotilla-tests --test drift -- --ignored`):
/// 100 `kubectl patch`es of a managed field in `correct` mode; edit → event at the
/// hub (polled every 2 ms), and detection → correction applied (agent log).
#[test]
#[ignore]
fn drift_latency_benchmark() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("drift-bench")?;
    let ns = "e2e-drift-bench";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "dbench")?;
    let cm = configmap(ns, "settings", "blue");
    repo.commit(
        &BTreeMap::from([
            ("app/fleet.yaml", Some("{}\n")),
            ("app/ns.yaml", Some(namespace(ns).as_str())),
            ("app/cm.yaml", Some(cm.as_str())),
        ]),
        "app",
    )?;
    let agent = Agent::start(
        &hub,
        &hub.token()?,
        "drift-bench",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "dbench", "--repo", &repo.url, "--poll", "1s",
    ])?;
    hub.wait_bundle_state("dbench-app", "drift-bench", "Ready")?;
    const EDITS: usize = 100;
    let (mut from_start, mut from_exit) = (Vec::new(), Vec::new());
    for i in 1..=EDITS {
        let patch = format!(r#"{{"data":{{"mode":"edit-{i}"}}}}"#);
        let t0 = Instant::now();
        east.kubectl(&[
            "patch",
            "-n",
            ns,
            "configmap/settings",
            "--type=merge",
            "-p",
            &patch,
        ])?;
        let t1 = Instant::now();
        // A tight loop of our own: wait_until's poll interval would dominate.
        loop {
            let v = api_get(&hub, "/api/v1/drift?bundle=dbench-app&limit=5000")?;
            if v["items"].as_array().map_or(0, Vec::len) >= i {
                break;
            }
            anyhow::ensure!(t0.elapsed() < DEADLINE, "event {i} never arrived");
            std::thread::sleep(Duration::from_millis(2));
        }
        from_start.push(t0.elapsed());
        from_exit.push(t1.elapsed());
        // Wait for the correction before the next edit, so each edit is one drift.
        wait_until("corrected", DEADLINE, || {
            Ok((data_mode(east, ns, "settings")?.as_deref() == Some("blue")).then_some(()))
        })?;
    }
    let log = agent.proc.log_text();
    let detected = log_times(&log, "drift detected");
    let corrected = log_times(&log, "drift corrected");
    let mut correction: Vec<Duration> = detected
        .iter()
        .zip(&corrected)
        .filter_map(|(d, c)| c.duration_since(*d).ok())
        .collect();
    for v in [&mut from_start, &mut from_exit, &mut correction] {
        v.sort();
    }
    anyhow::ensure!(
        correction.len() == EDITS,
        "{} corrections logged",
        correction.len()
    );
    eprintln!(
        "BENCH drift edits={EDITS}\n\
         edit (kubectl start) -> event at hub: median {:?} p99 {:?}\n\
         edit (kubectl exit)  -> event at hub: median {:?} p99 {:?}\n\
         detected -> corrected (agent):       median {:?} p99 {:?}",
        percentile(&from_start, 0.5),
        percentile(&from_start, 0.99),
        percentile(&from_exit, 0.5),
        percentile(&from_exit, 0.99),
        percentile(&correction, 0.5),
        percentile(&correction, 0.99),
    );
    Ok(())
}
