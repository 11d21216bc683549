//! A real Prometheus scrapes a hub with two agents: PromQL returns the
//! connected clusters, a bundle's states, and the commit-to-Ready histogram
//! after a commit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use flotilla_tests::prometheus::{http_get, Prometheus};
use flotilla_tests::*;

const NS: &str = "e2e-metrics";

fn cm(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: {NS}\ndata:\n  value: \"{value}\"\n"
    )
}

#[test]
fn prometheus_scrapes_the_hub() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("metrics")?;
    let metrics_port = free_port();
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
        &[],
    )?;
    let agent_metrics_port = free_port();
    let monitoring = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    let prom = Prometheus::start_with_rules(
        &dir.path().join("prometheus"),
        &[
            format!("127.0.0.1:{metrics_port}"),
            format!("127.0.0.1:{agent_metrics_port}"),
        ],
        &[monitoring.join("flotilla-alerts.yaml")],
    )?;
    let repo = GitRepo::new(dir.path(), "metr")?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm("one").as_str()))]),
        "one",
    )?;
    let mut agents = vec![
        Agent::spawn_with(
            &hub.agent_url,
            Some(&hub.token()?),
            "metr-east",
            "",
            &east.kubeconfig,
            &dir.path().join("a1"),
            &[
                "--metrics-listen",
                &format!("127.0.0.1:{agent_metrics_port}"),
            ],
        )?,
        Agent::start(
            &hub,
            &hub.token()?,
            "metr-west",
            "",
            west,
            &dir.path().join("a2"),
        )?,
    ];
    hub.cli(&["source", "add", "metr", "--repo", &repo.url, "--poll", "1s"])?;
    hub.wait_bundle_state("metr", "metr-east", "Ready")?;
    hub.wait_bundle_state("metr", "metr-west", "Ready")?;

    // The exposition itself is what Prometheus parses.
    let (status, text) = http_get(metrics_port, "/metrics")?;
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE flotilla_clusters_connected gauge"),
        "{text}"
    );
    assert!(!text.contains(&repo.url), "no source URL in the metrics");

    wait_until("PromQL: two clusters connected", DEADLINE, || {
        Ok((prom.value("flotilla_clusters_connected")? == Some(2.0)).then_some(()))
    })?;
    wait_until("PromQL: the bundle Ready on two clusters", DEADLINE, || {
        Ok(
            (prom.value(r#"flotilla_bundle_deployments{bundle="metr",state="Ready"}"#)?
                == Some(2.0))
            .then_some(()),
        )
    })?;
    let info = prom.query("flotilla_cluster_info")?;
    assert_eq!(info.len(), 2, "{info:?}");
    assert!(
        info.iter().all(|s| s["metric"]["kubernetes_version"]
            .as_str()
            .is_some_and(|v| v.starts_with('v'))),
        "{info:?}"
    );

    // A commit: each cluster's Ready lands in the histogram.
    let before = prom
        .value("flotilla_commit_to_ready_seconds_count")?
        .unwrap_or(0.0);
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm("two").as_str()))]),
        "two",
    )?;
    wait_until(
        "PromQL: commit-to-Ready observed twice more",
        DEADLINE,
        || {
            let n = prom
                .value("flotilla_commit_to_ready_seconds_count")?
                .unwrap_or(0.0);
            Ok((n >= before + 2.0).then_some(()))
        },
    )?;
    let p99 = prom.value(
        "histogram_quantile(0.99, sum(rate(flotilla_commit_to_ready_seconds_bucket[1m])) by (le))",
    )?;
    assert!(p99.is_some_and(|v| v > 0.0 && v < 120.0), "p99 {p99:?}");

    // The source's fetches and renders: timed, none failed, a last success.
    wait_until("PromQL: fetches and renders timed", DEADLINE, || {
        let fetches = prom
            .value(r#"flotilla_source_fetch_duration_seconds_count{source="metr"}"#)?
            .unwrap_or(0.0);
        let renders = prom
            .value(r#"flotilla_render_duration_seconds_count{source="metr"}"#)?
            .unwrap_or(0.0);
        Ok((fetches >= 2.0 && renders >= 2.0).then_some(()))
    })?;
    assert_eq!(
        prom.value(r#"flotilla_source_fetch_errors_total{source="metr"}"#)?
            .unwrap_or(0.0),
        0.0
    );
    let last =
        prom.value(r#"time() - flotilla_source_last_success_timestamp_seconds{source="metr"}"#)?;
    assert!(
        last.is_some_and(|age| (0.0..120.0).contains(&age)),
        "age {last:?}"
    );

    // The agent's own: its applies and how long they took.
    wait_until("PromQL: the agent's applies", DEADLINE, || {
        let applies = prom.value("flotilla_agent_applies_total")?.unwrap_or(0.0);
        let timed = prom
            .value("flotilla_agent_apply_duration_seconds_count")?
            .unwrap_or(0.0);
        Ok((applies >= 2.0 && timed >= 2.0).then_some(()))
    })?;
    assert_eq!(prom.value("flotilla_agent_apply_errors_total")?, Some(0.0));
    let (status, _) = http_get(agent_metrics_port, "/other")?;
    assert_eq!(status, 404, "the agent's listener serves /metrics only");

    // An agent goes: one fewer connected, and its disconnect is counted.
    agents[1].proc.stop();
    wait_until("PromQL: one cluster connected", DEADLINE, || {
        Ok((prom.value("flotilla_clusters_connected")? == Some(1.0)).then_some(()))
    })?;
    wait_until("PromQL: a disconnect counted", DEADLINE, || {
        Ok((prom
            .value("sum(flotilla_agent_disconnects_total)")?
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(()))
    })?;

    // The example alert rules: each evaluates, and the offline cluster's alert
    // is pending (it fires after its `for:`).
    let rules = wait_until(
        "every alert rule evaluated, the offline one pending",
        DEADLINE,
        || {
            let rules = prom.rules()?;
            let bad: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if !bad.is_empty() {
                anyhow::bail!("rules not ok: {bad:?}");
            }
            let offline = rules.iter().find(|r| r["name"] == "FlotillaClusterOffline");
            Ok(offline
                .is_some_and(|r| r["state"] == "pending")
                .then_some(rules))
        },
    )?;
    assert!(rules.len() >= 10, "{rules:#?}");
    let offline = rules
        .iter()
        .find(|r| r["name"] == "FlotillaClusterOffline")
        .unwrap();
    assert_eq!(
        offline["alerts"][0]["labels"]["cluster"], "metr-west",
        "{offline:#}"
    );

    // The dashboard: every query is valid PromQL here, and every metric it
    // names is one the hub or the agent exports.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        monitoring.join("flotilla-dashboard.json"),
    )?)?;
    // What the binaries register (families without a series yet, such as
    // rollout phases here, are not in the exposition), with the suffixes of
    // their samples.
    let mut exported = BTreeSet::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, prefix) in [
        ("hub/src/metrics.rs", "flotilla_"),
        ("agent/src/metrics.rs", "flotilla_agent_"),
    ] {
        let source = std::fs::read_to_string(root.join(file))?;
        for part in source.split("register(").skip(1) {
            let name = part.split('"').nth(1).unwrap_or_default();
            for suffix in ["", "_total", "_bucket", "_count", "_sum"] {
                exported.insert(format!("{prefix}{name}{suffix}"));
            }
        }
    }
    // And they are exported under those names.
    let (_, text) = http_get(metrics_port, "/metrics")?;
    for name in [
        "flotilla_clusters_connected",
        "flotilla_source_fetch_duration_seconds_count",
    ] {
        assert!(exported.contains(name) && text.contains(name), "{name}");
    }
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    for expr in &exprs {
        prom.query(expr)?;
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("flotilla_") {
                assert!(
                    exported.contains(word),
                    "{word} (in {expr}) is not exported"
                );
            }
        }
    }
    for a in &mut agents {
        a.proc.stop();
    }
    Ok(())
}
