//! The spine, end to end: a Git commit reaches real clusters through pulling
//! agents. Real control planes (kube-testcluster), a real hub, real agents, real
//! Git over `git daemon`, real mutual TLS.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use flotilla_tests::*;

fn files<'a>(list: &[(&'a str, Option<&'a str>)]) -> BTreeMap<&'a str, Option<&'a str>> {
    list.iter().cloned().collect()
}

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

fn config_map(ns: &str, name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n"
    )
}

/// The `value` of a ConfigMap, or None when it does not exist.
fn cm_value(c: &TestCluster, ns: &str, name: &str) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(ns), name)?
        .map(|cm| cm["data"]["value"].as_str().unwrap_or_default().to_string()))
}

fn wait_cm(c: &TestCluster, ns: &str, name: &str, want: Option<&str>) -> Result<()> {
    wait_until(
        &format!("configmap {ns}/{name} = {want:?} in {}", c.name),
        DEADLINE,
        || {
            let v = cm_value(c, ns, name)?;
            Ok((v.as_deref() == want).then_some(()))
        },
    )
}

/// Add, change and delete a manifest in Git: created, updated and pruned in every
/// targeted cluster and only there; relabelling clusters moves the bundle.
#[test]
fn commits_reach_targeted_clusters_and_follow_labels() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("spine")?;
    let ns = "e2e-spine";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "apps")?;
    repo.commit(
        &files(&[
            ("web/ns.yaml", Some(&namespace(ns))),
            ("web/config.yaml", Some(&config_map(ns, "web", "v1"))),
            ("README.md", Some("not a bundle file")),
        ]),
        "first",
    )?;
    let _east_agent = Agent::start(
        &hub,
        &hub.token()?,
        "spine-east",
        "env=prod",
        east,
        &dir.path().join("east"),
    )?;
    let _west_agent = Agent::start(
        &hub,
        &hub.token()?,
        "spine-west",
        "env=dev",
        west,
        &dir.path().join("west"),
    )?;
    hub.cli(&[
        "source", "add", "apps", "--repo", &repo.url, "--path", "web", "--target", "env=prod",
        "--poll", "1s",
    ])?;
    let bundle = "apps-web";

    // Created where the selector matches, and only there.
    hub.wait_bundle_state(bundle, "spine-east", "Ready")?;
    wait_cm(east, ns, "web", Some("v1"))?;
    let cm: serde_json::Value = serde_json::from_str(&east.kubectl(&[
        "get",
        "configmap",
        "web",
        "-n",
        ns,
        "-o",
        "json",
        "--show-managed-fields",
    ])?)?;
    assert_eq!(cm["metadata"]["labels"]["flotilla.io/bundle"], bundle);
    let managers: Vec<&str> = cm["metadata"]["managedFields"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["manager"].as_str()).collect())
        .unwrap_or_default();
    assert!(managers.contains(&"flotilla"), "managers: {managers:?}");
    assert!(
        west.get("namespace", None, ns)?.is_none(),
        "west must not get the bundle"
    );
    let clusters = hub.cli_json(&["cluster", "list"])?;
    let east_row = clusters
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "spine-east"))
        .ok_or_else(|| anyhow!("spine-east not listed: {clusters}"))?;
    assert_eq!(east_row["connected"], true);
    assert_eq!(east_row["labels"]["env"], "prod");
    assert!(
        east_row["kubernetesVersion"]
            .as_str()
            .unwrap_or_default()
            .starts_with("v1.34"),
        "{east_row}"
    );

    // Changed.
    let c2 = repo.commit(
        &files(&[("web/config.yaml", Some(&config_map(ns, "web", "v2")))]),
        "change",
    )?;
    wait_cm(east, ns, "web", Some("v2"))?;
    // Added.
    repo.commit(
        &files(&[("web/extra.yaml", Some(&config_map(ns, "extra", "x")))]),
        "add",
    )?;
    wait_cm(east, ns, "extra", Some("x"))?;
    // Deleted from Git: pruned.
    let c4 = repo.commit(&files(&[("web/extra.yaml", None)]), "remove")?;
    wait_cm(east, ns, "extra", None)?;
    wait_until("bundle revision follows the commit", DEADLINE, || {
        let b = hub.cli_json(&["bundle", "get", bundle])?;
        let applied = b["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["cluster"] == "spine-east"))
            .map(|c| {
                c["appliedRevision"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            });
        Ok((b["revision"] == c4.as_str() && applied.as_deref() == Some(c4.as_str())).then_some(()))
    })?;
    assert_ne!(c2, c4);
    assert_eq!(cm_value(east, ns, "web")?.as_deref(), Some("v2"));
    assert!(
        west.get("namespace", None, ns)?.is_none(),
        "west must still not have it"
    );

    // Relabel: the bundle moves from east to west.
    hub.cli(&["cluster", "label", "spine-west", "env=prod"])?;
    hub.cli(&["cluster", "label", "spine-east", "env-"])?;
    wait_cm(west, ns, "web", Some("v2"))?;
    hub.wait_bundle_state(bundle, "spine-west", "Ready")?;
    wait_until("namespace pruned from east", DEADLINE, || {
        Ok(east
            .get("namespace", None, ns)?
            .is_none_or(|n| !n["metadata"]["deletionTimestamp"].is_null())
            .then_some(()))
    })?;
    let b = hub.cli_json(&["bundle", "get", bundle])?;
    let on: Vec<&str> = b["clusters"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["cluster"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(on, ["spine-west"], "{b}");
    Ok(())
}

/// Invalid YAML in one bundle: that bundle is ErrApplied naming file and line;
/// other bundles and clusters are unaffected. An unreachable repository shows its
/// error on the source and is retried.
#[test]
fn bad_input_stays_in_its_bundle() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _west] = shared_clusters();
    let dir = test_dir("badinput")?;
    let ns = "e2e-bad";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "mixed")?;
    repo.commit(
        &files(&[
            ("good/ns.yaml", Some(&namespace(ns))),
            ("good/cm.yaml", Some(&config_map(ns, "good", "1"))),
            ("bad/cm.yaml", Some(&config_map(ns, "bad", "1"))),
        ]),
        "all good",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "bad-east",
        "",
        east,
        &dir.path().join("east"),
    )?;
    hub.cli(&[
        "source", "add", "mixed", "--repo", &repo.url, "--path", "good", "--path", "bad", "--poll",
        "1s",
    ])?;
    hub.cli(&[
        "source",
        "add",
        "nowhere",
        "--repo",
        "git://127.0.0.1:1/nothing",
        "--poll",
        "1s",
    ])?;
    hub.wait_bundle_state("mixed-good", "bad-east", "Ready")?;
    hub.wait_bundle_state("mixed-bad", "bad-east", "Ready")?;

    repo.commit(
        &files(&[
            (
                "bad/cm.yaml",
                Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n  labels: [oops\n"),
            ),
            ("good/cm.yaml", Some(&config_map(ns, "good", "2"))),
        ]),
        "break one bundle",
    )?;
    let msg = hub.wait_bundle_state("mixed-bad", "bad-east", "ErrApplied")?;
    assert!(
        msg.contains("cm.yaml:"),
        "message names the file and line: {msg}"
    );
    // The good bundle of the same commit still goes through; the bad one keeps its last good state.
    wait_cm(east, ns, "good", Some("2"))?;
    hub.wait_bundle_state("mixed-good", "bad-east", "Ready")?;
    assert_eq!(cm_value(east, ns, "bad")?.as_deref(), Some("1"));

    // The unreachable repository: an error on the source, and retried.
    let first = wait_until("source error shown", DEADLINE, || {
        let s = hub.cli_json(&["source", "get", "nowhere"])?;
        let err = s["lastError"].as_str().unwrap_or_default().to_string();
        Ok((!err.is_empty()).then_some(s))
    })?;
    let failures = |s: &serde_json::Value| s["consecutiveFailures"].as_u64().unwrap_or(0);
    wait_until("the fetch is retried", DEADLINE, || {
        let s = hub.cli_json(&["source", "get", "nowhere"])?;
        Ok((failures(&s) > failures(&first)).then_some(()))
    })?;
    let table = hub.cli(&["source", "list"])?;
    assert!(
        table.contains("nowhere") && table.contains("mixed"),
        "{table}"
    );
    Ok(())
}

/// Join tokens are single-use and expire; a refused agent is told why.
#[test]
fn tokens_are_single_use_and_expire() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("tokens")?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let token = hub.token()?;
    let mut first = Agent::start(&hub, &token, "tok-east", "", east, &dir.path().join("a"))?;
    wait_until("first agent connected", DEADLINE, || {
        let c = hub.cli_json(&["cluster", "get", "tok-east"]).ok();
        Ok(c.filter(|c| c["connected"] == true).map(|_| ()))
    })?;

    let mut reused = Agent::start(&hub, &token, "tok-west", "", west, &dir.path().join("b"))?;
    let log = wait_until("reused token refused", DEADLINE, || {
        Ok((!reused.proc.alive()).then(|| reused.proc.log_text()))
    })?;
    assert!(log.to_lowercase().contains("used"), "{log}");

    let short = hub.cli_json(&["token", "create", "--ttl", "1s"])?;
    let short_token = short["token"]
        .as_str()
        .ok_or_else(|| anyhow!("{short}"))?
        .to_string();
    let expires = humantime::parse_rfc3339_weak(short["expiresAt"].as_str().unwrap_or_default())?;
    // Wait for the expiry instant to pass (a deadline, not a fixed sleep).
    wait_until("token expired", Duration::from_secs(10), || {
        Ok((std::time::SystemTime::now() > expires).then_some(()))
    })?;
    let mut expired = Agent::start(
        &hub,
        &short_token,
        "tok-late",
        "",
        west,
        &dir.path().join("c"),
    )?;
    let log = wait_until("expired token refused", DEADLINE, || {
        Ok((!expired.proc.alive()).then(|| expired.proc.log_text()))
    })?;
    assert!(log.to_lowercase().contains("expired"), "{log}");
    let clusters = hub.cli(&["cluster", "list"])?;
    assert!(clusters.contains("tok-east"));
    assert!(
        !clusters.contains("tok-west") && !clusters.contains("tok-late"),
        "{clusters}"
    );

    // The enrolled agent needs no token any more.
    first.restart()?;
    wait_until("agent reconnects with its certificate", DEADLINE, || {
        let c = hub.cli_json(&["cluster", "get", "tok-east"])?;
        Ok((c["connected"] == true && first.proc.alive()).then_some(()))
    })?;
    Ok(())
}

/// The manifests in deploy/agent pass a server-side dry run on a real cluster.
#[test]
fn deploy_manifests_pass_server_dry_run() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent/agent.yaml");
    let file = file.to_string_lossy().to_string();
    // A dry run cannot create the namespace the other objects live in, so create it first.
    east.kubectl(&[
        "create",
        "namespace",
        "flotilla-system",
        "--dry-run=client",
        "-o",
        "yaml",
    ])
    .and_then(|y| east.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &y))?;
    let out = east.kubectl(&["apply", "--server-side", "--dry-run=server", "-f", &file])?;
    for kind in [
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "secret",
        "configmap",
        "persistentvolumeclaim",
        "deployment",
    ] {
        assert!(out.contains(kind), "{kind} missing from: {out}");
    }

    // The least-privilege variant: no cluster-admin role, a Role per allowed namespace.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent-namespaced");
    let built = east.kubectl(&["kustomize", &dir.to_string_lossy()])?;
    for ns in ["team-a", "team-b"] {
        east.kubectl(&["create", "namespace", ns, "--dry-run=client", "-o", "yaml"])
            .and_then(|y| east.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &y))?;
    }
    let out = east.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            "-",
        ],
        &built,
    )?;
    let out: serde_json::Value = serde_json::from_str(&out)?;
    let items = out["items"].as_array().cloned().unwrap_or_default();
    let has = |kind: &str, name: &str, ns: Option<&str>| {
        items.iter().any(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && ns.is_none_or(|ns| o["metadata"]["namespace"] == ns)
        })
    };
    assert!(
        !has("ClusterRole", "flotilla-agent", None),
        "cluster-admin left in: {built}"
    );
    assert!(
        !has("ClusterRoleBinding", "flotilla-agent", None),
        "{built}"
    );
    for ns in ["team-a", "team-b"] {
        assert!(
            has("Role", "flotilla-agent", Some(ns)),
            "no Role in {ns}: {built}"
        );
        assert!(has("RoleBinding", "flotilla-agent", Some(ns)), "{built}");
    }
    assert!(
        has("ClusterRole", "flotilla-agent-namespaces", None),
        "{built}"
    );
    // Events of cluster-scoped objects go to `default`: create and patch there.
    let events_role = items.iter().find(|o| {
        o["kind"] == "Role"
            && o["metadata"]["name"] == "flotilla-agent-events"
            && o["metadata"]["namespace"] == "default"
    });
    let rules = events_role
        .map(|r| r["rules"].to_string())
        .unwrap_or_default();
    assert!(
        rules.contains("events.k8s.io") && rules.contains("create") && rules.contains("patch"),
        "no events Role in default: {built}"
    );
    assert!(
        has("RoleBinding", "flotilla-agent-events", Some("default")),
        "{built}"
    );
    assert!(
        has("Deployment", "flotilla-agent", Some("flotilla-system")),
        "{built}"
    );
    Ok(())
}
