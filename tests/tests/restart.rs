//! A restarted hub takes nothing away: with Git unreachable, or with a renderer
//! failing on the first commit it sees, it serves the snapshot it served before
//! (restored from its store), and every object stays, with the same UID.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flotilla_tests::*;

/// How long the cluster is watched after the restarted hub's first desired set
/// was acknowledged: an old hub sent an empty set and the agent pruned at once.
const WATCH: Duration = Duration::from_secs(15);

fn uid(c: &TestCluster, ns: &str, name: &str) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(ns), name)?.map(|v| {
        v["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }))
}

/// Watches for `WATCH` that the object is still there, the same object.
fn stays(c: &TestCluster, ns: &str, name: &str, want_uid: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < WATCH {
        match uid(c, ns, name)? {
            Some(u) if u == want_uid => {}
            Some(u) => bail!("{ns}/{name} was replaced: uid {want_uid} -> {u}"),
            None => bail!("{ns}/{name} was deleted after the hub restarted"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn desired_received(agent: &Agent) -> usize {
    agent
        .proc
        .log_text()
        .matches("desired state received")
        .count()
}

/// Waits until the agent has acknowledged one more desired set than `before`
/// (the restarted hub's first), or the restarted hub resumed its session from
/// the set it holds (then the hub sends none).
fn wait_new_set(hub: &Hub, agent: &Agent, before: usize) -> Result<()> {
    wait_until(
        "the agent took the restarted hub's desired set, or was resumed",
        DEADLINE,
        || {
            let resumed = hub.proc.log_text().lines().any(|l| {
                l.contains("resuming from it") && l.contains(&format!("cluster={}", agent.name))
            });
            Ok((resumed || desired_received(agent) > before).then_some(()))
        },
    )
}

fn wait_connected(hub: &Hub, cluster: &str) -> Result<()> {
    wait_until(&format!("{cluster} connected"), DEADLINE, || {
        let c = hub.cli_json(&["cluster", "get", cluster])?;
        Ok((c["connected"] == true).then_some(()))
    })
}

#[test]
fn hub_restarted_with_git_down_keeps_every_object() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("restart-git")?;
    let ns = "e2e-restart-git";
    let mut hub = Hub::start(&dir.path().join("hub"))?;
    let mut repo = GitRepo::new(dir.path(), "rg")?;
    let manifest = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: {ns}\ndata:\n  value: one\n"
    );
    let commit = repo.commit(
        &BTreeMap::from([("app.yaml", Some(manifest.as_str()))]),
        "one",
    )?;
    let agent = Agent::start(
        &hub,
        &hub.token()?,
        "rg-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "rg", "--repo", &repo.url, "--poll", "1s"])?;
    hub.wait_bundle_state("rg", "rg-east", "Ready")?;
    let before = uid(east, ns, "app")?.expect("applied");

    hub.stop();
    repo.stop_serving();
    let sets = desired_received(&agent);
    hub.restart()?;
    wait_connected(&hub, "rg-east")?;
    wait_new_set(&hub, &agent, sets)?;
    // The source says why it cannot fetch; the bundle keeps its last revision.
    let source = wait_until("the fetch error shown", DEADLINE, || {
        let s = hub.cli_json(&["source", "get", "rg"])?;
        Ok((!s["lastError"].as_str().unwrap_or_default().is_empty()).then_some(s))
    })?;
    assert_eq!(source["commit"].as_str(), Some(commit.as_str()), "{source}");
    stays(east, ns, "app", &before)?;
    let bundle = hub.cli_json(&["bundle", "get", "rg"])?;
    assert_eq!(
        bundle["revision"].as_str(),
        Some(commit.as_str()),
        "{bundle}"
    );
    assert_eq!(
        hub.bundle_state("rg", "rg-east")?.map(|s| s.0).as_deref(),
        Some("Ready")
    );
    Ok(())
}

#[test]
fn hub_restarted_onto_a_broken_chart_keeps_the_last_good_release() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [_, west] = shared_clusters();
    let dir = test_dir("restart-helm")?;
    let ns = "e2e-restart-helm";
    let mut hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "rh")?;
    let fleet =
        format!("defaultNamespace: {ns}\nhelm:\n  releaseName: happ\n  values: {{size: small}}\n");
    let chart = "apiVersion: v2\nname: happ\nversion: 0.1.0\n";
    let template = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  size: {{ .Values.size | quote }}\n";
    let ns_file = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
    let good = repo.commit(
        &BTreeMap::from([
            ("fleet.yaml", Some(fleet.as_str())),
            ("Chart.yaml", Some(chart)),
            ("templates/cm.yaml", Some(template)),
            ("templates/ns.yaml", Some(ns_file.as_str())),
        ]),
        "good chart",
    )?;
    let agent = Agent::start(
        &hub,
        &hub.token()?,
        "rh-west",
        "",
        west,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "rh", "--repo", &repo.url, "--poll", "1s"])?;
    hub.wait_bundle_state("rh", "rh-west", "Ready")?;
    let before = uid(west, ns, "happ")?.expect("applied");

    // While the hub is down the chart breaks: the restarted hub's first render fails.
    hub.stop();
    repo.commit(
        &BTreeMap::from([(
            "templates/cm.yaml",
            Some("{{ required \"size is required\" .Values.missing }}\n"),
        )]),
        "broken chart",
    )?;
    let sets = desired_received(&agent);
    hub.restart()?;
    wait_connected(&hub, "rh-west")?;
    wait_new_set(&hub, &agent, sets)?;
    let msg = hub.wait_bundle_state("rh", "rh-west", "ErrApplied")?;
    assert!(msg.contains("size is required"), "{msg}");
    stays(west, ns, "happ", &before)?;
    let bundle = hub.cli_json(&["bundle", "get", "rh"])?;
    assert_eq!(bundle["revision"].as_str(), Some(good.as_str()), "{bundle}");
    Ok(())
}
