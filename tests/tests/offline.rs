//! Offline operation and crash safety: an agent keeps its cluster converged from
//! its own store while the hub is down, and nothing it acknowledged is lost to a
//! kill -9.

use std::collections::BTreeMap;

use anyhow::Result;
use flotilla_tests::*;

fn cm(ns: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n"
    )
}

fn value(c: &TestCluster, ns: &str) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(ns), "app")?
        .map(|v| v["data"]["value"].as_str().unwrap_or_default().to_string()))
}

fn wait_value(c: &TestCluster, ns: &str, want: Option<&str>) -> Result<()> {
    wait_until(&format!("configmap {ns}/app = {want:?}"), DEADLINE, || {
        Ok((value(c, ns)?.as_deref() == want).then_some(()))
    })
}

/// The agent is restarted while the hub is down and re-applies its last desired
/// state from its store; when the hub returns, it resumes without re-downloading.
#[test]
fn agent_restart_without_hub_keeps_cluster_converged() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("offline")?;
    let ns = "e2e-offline";
    let mut hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "off")?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm(ns, "one").as_str()))]),
        "one",
    )?;
    let mut agent = Agent::start(
        &hub,
        &hub.token()?,
        "off-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "off", "--repo", &repo.url, "--poll", "1s"])?;
    hub.wait_bundle_state("off", "off-east", "Ready")?;
    wait_value(east, ns, Some("one"))?;

    hub.stop();
    // Someone deletes the object while the hub is away; the restarted agent puts it back
    // from its own store.
    east.kubectl(&["delete", "configmap", "app", "-n", ns])?;
    agent.restart()?;
    wait_value(east, ns, Some("one"))?;

    // The hub returns: the agent reconnects, and the hub sends no content it holds;
    // the agent holds the very set it acknowledged, so the session resumes from it.
    hub.restart()?;
    wait_until("agent reconnected", DEADLINE, || {
        let c = hub.cli_json(&["cluster", "get", "off-east"])?;
        Ok((c["connected"] == true).then_some(()))
    })?;
    hub.wait_bundle_state("off", "off-east", "Ready")?;
    let log = agent.proc.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("desired state received") && !l.contains("new_contents=0")),
        "the reconnected agent must not be sent content it holds:\n{log}"
    );
    wait_until("the hub to resume the session", DEADLINE, || {
        Ok(hub
            .proc
            .log_text()
            .contains("the agent holds this very set: resuming from it")
            .then_some(()))
    })?;
    Ok(())
}

/// kill -9 after the agent acknowledged a new revision but before it could apply
/// it: after restart (hub still down) it applies that revision from its store.
#[test]
fn kill_between_receive_and_apply_loses_nothing() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [_, west] = shared_clusters();
    let dir = test_dir("crash")?;
    let ns = "e2e-crash";
    let mut hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "crash")?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm(ns, "before").as_str()))]),
        "before",
    )?;
    // The agent reaches its API server through a proxy we can cut.
    let proxy = FaultProxy::start(kube_port(&west.kubeconfig)?)?;
    let kubeconfig = kubeconfig_via(&west.kubeconfig, proxy.port, &dir.path().join("kubeconfig"))?;
    let state = dir.path().join("agent");
    let token = hub.token()?;
    let mut agent = Agent::spawn(
        &hub.agent_url,
        Some(&token),
        "crash-west",
        "",
        &kubeconfig,
        &state,
    )?;
    hub.cli(&[
        "source", "add", "crash", "--repo", &repo.url, "--poll", "1s",
    ])?;
    hub.wait_bundle_state("crash", "crash-west", "Ready")?;
    wait_value(west, ns, Some("before"))?;

    // Cut the agent off its cluster, push a change, and wait until the agent has
    // acknowledged it: WaitApplied (stored, not applied), or ErrApplied once its
    // apply attempt against the unreachable API server has failed.
    proxy.block();
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm(ns, "after").as_str()))]),
        "after",
    )?;
    wait_until("new revision acknowledged", DEADLINE, || {
        Ok(hub
            .bundle_state("crash", "crash-west")?
            .filter(|(s, _)| s == "WaitApplied" || s == "ErrApplied")
            .map(|_| ()))
    })?;
    agent.proc.kill9();
    assert_eq!(
        value(west, ns)?.as_deref(),
        Some("before"),
        "nothing was applied yet"
    );

    // Hub gone, cluster back: the restarted agent applies what it had acknowledged.
    hub.stop();
    proxy.unblock();
    agent = Agent::spawn(&hub.agent_url, None, "crash-west", "", &kubeconfig, &state)?;
    wait_value(west, ns, Some("after"))?;
    assert!(agent.proc.alive());
    Ok(())
}
