//! Health, end to end: a bundle is Ready only when its objects are healthy, and
//! follows them as the cluster changes (watches, not polling). The simulated nodes
//! of kube-testcluster honour `sim.flotilla.io/ready` and `exit-code` annotations.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context, Result};
use flotilla_tests::*;

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

/// A Deployment whose pods carry `annotations` (YAML flow map, e.g. `{}`).
fn deployment(ns: &str, name: &str, replicas: u32, annotations: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n      annotations: {annotations}\n    spec:\n      containers:\n      - name: app\n        image: registry.example/{name}:1\n"
    )
}

/// A Job whose pod exits with `exit_code`, never retried.
fn job(ns: &str, name: &str, exit_code: u32) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  backoffLimit: 0\n  template:\n    metadata:\n      annotations: {{sim.flotilla.io/exit-code: \"{exit_code}\"}}\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: migrate\n        image: registry.example/migrate:1\n"
    )
}

/// Waits until `bundle` on `cluster` is in `state` with a message satisfying `ok`;
/// returns the message.
fn wait_state(
    hub: &Hub,
    bundle: &str,
    cluster: &str,
    state: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<String> {
    wait_until(
        &format!("bundle {bundle} {state} on {cluster}"),
        DEADLINE,
        || match hub.bundle_state(bundle, cluster)? {
            Some((s, m)) if s == state && ok(&m) => Ok(Some(m)),
            Some((s, m)) => Err(anyhow!("state is {s}: {m}")),
            None => Ok(None),
        },
    )
}

/// `flotilla health -f - -o json` on `input` (offline: no hub is named).
fn health_json(input: &str) -> Result<serde_json::Value> {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("flotilla"))
        .args(["health", "-f", "-", "-o", "json"])
        .env("FLOTILLA_HUB", "http://127.0.0.1:9")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "flotilla health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A Deployment becomes Ready (bundle Ready); one whose pods never get Ready keeps
/// its bundle NotReady, named in the message; a Ready one that loses its pods'
/// readiness later turns its bundle NotReady within seconds; fixed in Git, Ready.
#[test]
fn bundle_state_follows_deployment_health() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("health-deploy")?;
    let ns = "e2e-health-deploy";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "hdep")?;
    let never = r#"{sim.flotilla.io/ready: "false"}"#;
    let web = deployment(ns, "web", 2, "{}");
    let stuck = deployment(ns, "stuck", 1, never);
    repo.commit(
        &BTreeMap::from([
            ("web/ns.yaml", Some(namespace(ns).as_str())),
            ("web/web.yaml", Some(web.as_str())),
            ("stuck/stuck.yaml", Some(stuck.as_str())),
        ]),
        "two deployments",
    )?;
    let agent = Agent::start(
        &hub,
        &hub.token()?,
        "health-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "hdep", "--repo", &repo.url, "--path", "web", "--path", "stuck", "--poll",
        "1s",
    ])?;

    // Applied first, Ready once the pods are.
    hub.wait_bundle_state("hdep-web", "health-east", "Ready")?;
    let msg = wait_state(&hub, "hdep-stuck", "health-east", "NotReady", |m| {
        m.contains("0/1 replicas available")
    })?;
    assert_eq!(
        msg,
        format!("Deployment {ns}/stuck: 0/1 replicas available"),
        "names the object and the reason"
    );

    // The offline command agrees with the agent, on what kubectl prints.
    let listed = east.kubectl(&["get", "deployments", "-n", ns, "-o", "yaml"])?;
    let report = health_json(&listed)?;
    let by_name = |n: &str| {
        report
            .as_array()
            .and_then(|a| a.iter().find(|o| o["name"] == n))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(by_name("web")["status"], "Current", "{report}");
    assert_eq!(by_name("stuck")["status"], "InProgress", "{report}");
    assert_eq!(by_name("stuck")["message"], "0/1 replicas available");

    // Later, one of web's pods stops being Ready: the watch notices, no re-apply.
    let pods = east.kubectl(&["get", "pods", "-n", ns, "-l", "app=web", "-o", "name"])?;
    let pod = pods.lines().next().context("web has pods")?.to_string();
    east.kubectl(&[
        "annotate",
        "-n",
        ns,
        &pod,
        "sim.flotilla.io/ready=false",
        "--overwrite",
    ])?;
    let started = std::time::Instant::now();
    let msg = wait_state(&hub, "hdep-web", "health-east", "NotReady", |_| true)?;
    assert_eq!(msg, format!("Deployment {ns}/web: 1/2 replicas available"));
    eprintln!(
        "pod readiness lost -> bundle NotReady at the hub: {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "noticed within seconds, took {:?}",
        started.elapsed()
    );
    east.kubectl(&[
        "annotate",
        "-n",
        ns,
        &pod,
        "sim.flotilla.io/ready=true",
        "--overwrite",
    ])?;
    hub.wait_bundle_state("hdep-web", "health-east", "Ready")?;

    // Fixed in Git: the stuck Deployment's pods become Ready.
    let fixed = deployment(ns, "stuck", 1, "{}");
    repo.commit(
        &BTreeMap::from([("stuck/stuck.yaml", Some(fixed.as_str()))]),
        "fix stuck",
    )?;
    // It may pass through WaitApplied and NotReady on the way.
    hub.wait_bundle_state("hdep-stuck", "health-east", "Ready")?;

    // Watches and health records keep the agent small.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.proc.pid()))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    eprintln!("agent RSS with health watches: {} MiB", rss_kib / 1024);
    assert!(rss_kib < 100 * 1024, "agent RSS {rss_kib} KiB");
    Ok(())
}

/// A Job that fails makes its bundle NotReady with the failure in the message;
/// replaced in Git by one that succeeds, the bundle is Ready.
#[test]
fn failed_job_then_fixed_in_git() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("health-job")?;
    let ns = "e2e-health-job";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "hjob")?;
    let failing = job(ns, "migrate", 1);
    repo.commit(
        &BTreeMap::from([
            ("ns.yaml", Some(namespace(ns).as_str())),
            ("job.yaml", Some(failing.as_str())),
        ]),
        "a failing job",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "health-job",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "hjob", "--repo", &repo.url, "--poll", "1s"])?;
    let msg = wait_until("hjob NotReady with a failed Job", DEADLINE, || {
        Ok(hub
            .bundle_state("hjob", "health-job")?
            .filter(|(s, m)| s == "NotReady" && m.contains("failed"))
            .map(|(_, m)| m))
    })?;
    assert!(
        msg.starts_with(&format!("Job {ns}/migrate: failed: ")),
        "names the Job and why: {msg}"
    );

    // A Job's template cannot change; the fix is a new Job (the old one is pruned).
    let good = job(ns, "migrate-v2", 0);
    repo.commit(
        &BTreeMap::from([("job.yaml", Some(good.as_str()))]),
        "fixed job",
    )?;
    hub.wait_bundle_state("hjob", "health-job", "Ready")?;
    wait_until("the failed Job pruned", DEADLINE, || {
        Ok(east
            .get("job", Some(ns), "migrate")?
            .is_none()
            .then_some(()))
    })?;
    Ok(())
}

/// kstatus's rules on a real cluster's objects: a LoadBalancer Service (the test
/// cluster has no load-balancer controller, so it never gets an external address),
/// a StatefulSet (the API server writes `partition: 0`) and a DaemonSet on the
/// simulated nodes make their bundle Ready; a Pod no node fits makes its bundle
/// NotReady with `unschedulable` and the scheduler's reason, and the offline
/// command agrees.
#[test]
fn kstatus_rules_on_real_objects() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("health-kstatus")?;
    let ns = "e2e-health-kstatus";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "hks")?;
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: edge\n  namespace: {ns}\nspec:\n  type: LoadBalancer\n  selector: {{app: db}}\n  ports:\n  - {{port: 443}}\n"
    );
    let sts = format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db\n  namespace: {ns}\nspec:\n  replicas: 2\n  serviceName: edge\n  selector:\n    matchLabels: {{app: db}}\n  template:\n    metadata:\n      labels: {{app: db}}\n    spec:\n      containers:\n      - name: db\n        image: registry.example/db:1\n"
    );
    let ds = format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: node-agent\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels: {{app: node-agent}}\n  template:\n    metadata:\n      labels: {{app: node-agent}}\n    spec:\n      containers:\n      - name: agent\n        image: registry.example/node-agent:1\n"
    );
    let homeless = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: homeless\n  namespace: {ns}\nspec:\n  nodeSelector: {{flotilla.io/no-such-node: \"true\"}}\n  containers:\n  - name: app\n    image: registry.example/app:1\n"
    );
    repo.commit(
        &BTreeMap::from([
            ("ready/ns.yaml", Some(namespace(ns).as_str())),
            ("ready/service.yaml", Some(service.as_str())),
            ("ready/sts.yaml", Some(sts.as_str())),
            ("ready/ds.yaml", Some(ds.as_str())),
            ("stuck/pod.yaml", Some(homeless.as_str())),
        ]),
        "kstatus objects",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "health-kstatus",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "hks", "--repo", &repo.url, "--path", "ready", "--path", "stuck",
        "--poll", "1s",
    ])?;
    hub.wait_bundle_state("hks-ready", "health-kstatus", "Ready")?;
    let msg = wait_state(&hub, "hks-stuck", "health-kstatus", "NotReady", |m| {
        m.contains("unschedulable")
    })?;
    assert!(
        msg.starts_with(&format!("Pod {ns}/homeless: unschedulable: 0/")),
        "names the Pod and the scheduler's reason: {msg}"
    );

    // What kubectl prints gets the same health offline.
    let listed = east.kubectl(&[
        "get",
        "services,statefulsets,daemonsets,pods",
        "-n",
        ns,
        "-o",
        "yaml",
    ])?;
    let report = health_json(&listed)?;
    let of = |kind: &str, name: &str| {
        report
            .as_array()
            .and_then(|a| a.iter().find(|o| o["kind"] == kind && o["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(of("Service", "edge")["status"], "Current", "{report}");
    assert_eq!(
        of("Service", "edge")["message"],
        "LoadBalancer, no external address yet"
    );
    assert_eq!(of("StatefulSet", "db")["status"], "Current", "{report}");
    assert_eq!(
        of("DaemonSet", "node-agent")["status"],
        "Current",
        "{report}"
    );
    assert_eq!(of("Pod", "homeless")["status"], "Failed", "{report}");
    Ok(())
}
