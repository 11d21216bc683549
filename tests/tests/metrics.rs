//! A real Prometheus scrapes a hub with two agents: PromQL returns the
//! connected clusters, a bundle's states, and the commit-to-Ready histogram
//! after a commit.

use std::collections::BTreeMap;

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
    let prom = Prometheus::start(
        &dir.path().join("prometheus"),
        &[
            format!("127.0.0.1:{metrics_port}"),
            format!("127.0.0.1:{agent_metrics_port}"),
        ],
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
    for a in &mut agents {
        a.proc.stop();
    }
    Ok(())
}
