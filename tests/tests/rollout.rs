//! Staged rollouts on four real control planes in two partitions (`wave=1`:
//! c1, c2; `wave=2`: c3, c4): a good revision goes partition by partition and
//! waits out the bake time; a bad one (Pods that never become Ready) halts after
//! the first partition and the second never sees it; with `onFailure: rollback`
//! the first partition returns to the last completed revision and is Ready again;
//! pause and resume; an offline cluster is skipped and catches up; a hub
//! restarted during a rollout continues it where it was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flotilla_tests::*;
use serde_json::Value;

const WAVES: [(&str, &str); 4] = [("1", "a1"), ("1", "a2"), ("2", "b1"), ("2", "b2")];

fn fleet_yaml(ns: &str, bake: &str, deadline: &str, on_failure: &str, extra: &str) -> String {
    format!(
        "defaultNamespace: {ns}\nrolloutStrategy:\n  partitions:\n  - name: one\n    clusterSelector: {{matchLabels: {{wave: \"1\"}}}}\n  - name: two\n    clusterSelector: {{matchLabels: {{wave: \"2\"}}}}\n  bakeTime: {bake}\n  progressDeadline: {deadline}\n  onFailure: {on_failure}\n{extra}"
    )
}

/// A ConfigMap naming the version, and a Deployment whose Pods become Ready
/// (or, with `ready: false`, never do: the simulated kubelet reads the annotation).
fn app(version: &str, ready: bool) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: version\ndata:\n  version: {version}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n      annotations: {{sim.flotilla.io/ready: \"{ready}\", version: {version}}}\n    spec:\n      containers:\n      - name: web\n        image: registry.example/web:{version}\n"
    )
}

fn version_on(c: &TestCluster, ns: &str) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(ns), "version")?
        .and_then(|v| v["data"]["version"].as_str().map(str::to_string)))
}

fn status(hub: &Hub, bundle: &str) -> Result<Value> {
    hub.cli_json(&["rollout", "status", bundle])
}

fn wait_phase(hub: &Hub, bundle: &str, phase: &str, deadline: Duration) -> Result<Value> {
    wait_until(&format!("rollout of {bundle} {phase}"), deadline, || {
        let s = status(hub, bundle)?;
        if s["phase"] == phase {
            return Ok(Some(s));
        }
        bail!("phase {} ({})", s["phase"], s["reason"])
    })
}

/// Each cluster's progress in the rollout status.
fn progress(s: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in s["partitions"].as_array().into_iter().flatten() {
        for c in p["clusters"].as_array().into_iter().flatten() {
            out.insert(
                c["cluster"].as_str().unwrap_or_default().to_string(),
                c["progress"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    out
}

/// Polls every cluster until each shows `version`; returns when each first did.
fn first_seen(
    clusters: &[(&str, &TestCluster)],
    ns: &str,
    version: &str,
    deadline: Duration,
) -> Result<BTreeMap<String, Instant>> {
    let mut seen = BTreeMap::new();
    let start = Instant::now();
    while seen.len() < clusters.len() {
        for (name, c) in clusters {
            if !seen.contains_key(*name) && version_on(c, ns)?.as_deref() == Some(version) {
                seen.insert(name.to_string(), Instant::now());
            }
        }
        if start.elapsed() > deadline {
            bail!("only {:?} got {version} within {deadline:?}", seen.keys());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(seen)
}

/// The clusters by the names the tests give them (a1, a2: wave 1; b1, b2: wave 2).
fn named(clusters: &[TestCluster; 4]) -> Vec<(&'static str, &TestCluster)> {
    WAVES
        .iter()
        .zip(clusters.iter())
        .map(|((_, n), c)| (*n, c))
        .collect()
}

/// The outcomes of `rollout history`, oldest first, and the history itself.
fn outcomes(hub: &Hub, bundle: &str) -> Result<(Vec<String>, Value)> {
    let history = hub.cli_json(&["rollout", "history", bundle])?;
    let outcomes = history
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["outcome"].as_str().unwrap_or_default().to_string())
        .collect();
    Ok((outcomes, history))
}

fn start_agents(hub: &Hub, dir: &std::path::Path, prefix: &str) -> Result<Vec<Agent>> {
    let clusters = four_clusters();
    WAVES
        .iter()
        .zip(clusters.iter())
        .map(|((wave, name), c)| {
            Agent::start(
                hub,
                &hub.token()?,
                &format!("{prefix}-{name}"),
                &format!("wave={wave}"),
                c,
                &dir.join(format!("agent-{name}")),
            )
        })
        .collect()
}

#[test]
fn rollouts_go_by_partition_halt_roll_back_pause_and_resume() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let clusters = four_clusters();
    let dir = test_dir("rollout")?;
    let ns = "e2e-rollout";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "ro")?;
    let bake = Duration::from_secs(6);
    let halt = fleet_yaml(ns, "6s", "15s", "halt", "");
    let v1 = repo.commit(
        &BTreeMap::from([
            ("web/fleet.yaml", Some(halt.as_str())),
            ("web/app.yaml", Some(app("v1", true).as_str())),
        ]),
        "v1",
    )?;
    let _agents = start_agents(&hub, dir.path(), "ro")?;
    let named = named(clusters);
    let (first, second) = (&named[..2], &named[2..]);
    hub.cli(&[
        "source", "add", "ro", "--repo", &repo.url, "--poll", "1s", "--path", "web",
    ])?;

    // A good revision goes partition by partition, and waits out the bake time:
    // partition two starts no earlier than `bake` after partition one got it.
    let seen = first_seen(&named, ns, "v1", DEADLINE * 2)?;
    let one_last = seen["a1"].max(seen["a2"]);
    let two_first = seen["b1"].min(seen["b2"]);
    assert!(
        two_first >= one_last + bake,
        "partition two started {:?} after partition one (bake time {bake:?})",
        two_first.saturating_duration_since(one_last)
    );
    wait_phase(&hub, "ro-web", "Completed", DEADLINE)?;
    for (n, _) in &named {
        hub.wait_bundle_state("ro-web", &format!("ro-{n}"), "Ready")?;
    }

    // A bad revision halts after partition one; partition two never sees it.
    repo.commit(
        &BTreeMap::from([("web/app.yaml", Some(app("v2", false).as_str()))]),
        "v2 (never Ready)",
    )?;
    first_seen(first, ns, "v2", DEADLINE)?;
    let s = wait_phase(&hub, "ro-web", "Halted", DEADLINE)?;
    assert!(
        s["reason"].as_str().unwrap_or_default().contains("ro-a"),
        "the reason names the failed clusters: {s}"
    );
    let p = progress(&s);
    assert_eq!(p["ro-a1"], "Failed", "{s}");
    assert_eq!(p["ro-b1"], "OutOfSync", "{s}");
    for (n, c) in second {
        assert_eq!(
            version_on(c, ns)?.as_deref(),
            Some("v1"),
            "{n} never sees v2"
        );
        let (state, msg) = hub.bundle_state("ro-web", &format!("ro-{n}"))?.unwrap();
        assert_eq!(state, "OutOfSync", "{n}: {msg}");
    }
    // Halted stays halted: nothing more is admitted.
    std::thread::sleep(Duration::from_secs(3));
    for (n, c) in second {
        assert_eq!(version_on(c, ns)?.as_deref(), Some("v1"), "{n} still v1");
    }

    // With onFailure: rollback, the bad revision's first partition returns to
    // the last completed revision (v1) and is Ready again.
    let rollback = fleet_yaml(ns, "6s", "15s", "rollback", "");
    repo.commit(
        &BTreeMap::from([
            ("web/fleet.yaml", Some(rollback.as_str())),
            ("web/app.yaml", Some(app("v3", false).as_str())),
        ]),
        "v3 (never Ready), roll back",
    )?;
    first_seen(first, ns, "v3", DEADLINE)?;
    let s = wait_phase(&hub, "ro-web", "RolledBack", DEADLINE)?;
    assert_eq!(
        s["previous"].as_str(),
        Some(v1.as_str()),
        "back to the last completed: {s}"
    );
    first_seen(first, ns, "v1", DEADLINE)?;
    for (n, c) in &named {
        hub.wait_bundle_state("ro-web", &format!("ro-{n}"), "Ready")?;
        assert_eq!(version_on(c, ns)?.as_deref(), Some("v1"), "{n}");
    }

    // Pause and resume: a paused rollout admits nobody past the bake time.
    repo.commit(
        &BTreeMap::from([("web/app.yaml", Some(app("v4", true).as_str()))]),
        "v4",
    )?;
    first_seen(first, ns, "v4", DEADLINE)?;
    hub.cli(&["rollout", "pause", "ro-web"])?;
    wait_phase(&hub, "ro-web", "Paused", DEADLINE)?;
    std::thread::sleep(bake + Duration::from_secs(3));
    for (n, c) in second {
        assert_eq!(version_on(c, ns)?.as_deref(), Some("v1"), "{n}: paused");
    }
    hub.cli(&["rollout", "resume", "ro-web"])?;
    first_seen(second, ns, "v4", DEADLINE)?;
    wait_phase(&hub, "ro-web", "Completed", DEADLINE)?;

    let (outcomes, history) = outcomes(&hub, "ro-web")?;
    assert_eq!(
        outcomes,
        ["Completed", "Superseded", "RolledBack", "Completed"],
        "{history}"
    );
    Ok(())
}

#[test]
fn an_offline_cluster_is_skipped_and_a_restarted_hub_continues() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let clusters = four_clusters();
    let dir = test_dir("rollout-offline")?;
    let ns = "e2e-rollout-offline";
    let mut hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "rz")?;
    let yaml = fleet_yaml(ns, "8s", "10s", "halt", "  maxOffline: 1\n");
    repo.commit(
        &BTreeMap::from([
            ("web/fleet.yaml", Some(yaml.as_str())),
            ("web/app.yaml", Some(app("v1", true).as_str())),
        ]),
        "v1",
    )?;
    let mut agents = start_agents(&hub, dir.path(), "rz")?;
    let named = named(clusters);
    hub.cli(&[
        "source", "add", "rz", "--repo", &repo.url, "--poll", "1s", "--path", "web",
    ])?;
    first_seen(&named, ns, "v1", DEADLINE * 2)?;
    wait_phase(&hub, "rz-web", "Completed", DEADLINE)?;

    // a2 goes offline; v2 goes out. a2 holds its slot until the deadline, is
    // then skipped (within maxOffline), and partition two follows.
    agents[1].proc.stop();
    wait_until("rz-a2 offline", DEADLINE, || {
        let c = hub.cli_json(&["cluster", "get", "rz-a2"])?;
        Ok((c["connected"] == false).then_some(()))
    })?;
    repo.commit(
        &BTreeMap::from([("web/app.yaml", Some(app("v2", true).as_str()))]),
        "v2",
    )?;
    first_seen(&named[..1], ns, "v2", DEADLINE)?;
    let s = wait_until("rz-a2 skipped", DEADLINE, || {
        let s = status(&hub, "rz-web")?;
        Ok((progress(&s)["rz-a2"] == "Skipped").then_some(s))
    })?;
    assert_eq!(s["phase"], "Progressing", "offline is not failed: {s}");
    assert_eq!(version_on(named[1].1, ns)?.as_deref(), Some("v1"));

    // The hub restarts while partition one bakes: the rollout continues where
    // it was (a1 stays admitted and Ready, a2 skipped), then partition two.
    hub.restart()?;
    let s = status(&hub, "rz-web")?;
    let p = progress(&s);
    assert_eq!(p["rz-a2"], "Skipped", "kept across the restart: {s}");
    assert_ne!(p["rz-a1"], "OutOfSync", "a1 stays admitted: {s}");
    first_seen(&named[2..], ns, "v2", DEADLINE)?;
    wait_phase(&hub, "rz-web", "Completed", DEADLINE)?;
    assert_eq!(
        version_on(named[1].1, ns)?.as_deref(),
        Some("v1"),
        "still offline"
    );

    // a2 reconnects and catches up.
    agents[1].restart()?;
    first_seen(&named[1..2], ns, "v2", DEADLINE)?;
    hub.wait_bundle_state("rz-web", "rz-a2", "Ready")?;
    let (outcomes, history) = outcomes(&hub, "rz-web")?;
    assert_eq!(outcomes, ["Completed", "Completed"], "{history}");
    Ok(())
}
