//! Torture: the agent's cluster API misbehaves under it. Through an HTTP-aware TLS
//! proxy (`faults::ApiProxy`) the API server answers 500, then 429, to everything
//! the agent asks, while the test (talking to the API server directly) makes the
//! workload's pod not Ready and changes a managed object; then the whole control
//! plane is killed with -9 and started again on its data dir. Each time: the agent
//! backs off (its request rate is measured), its watches resume (the change is
//! corrected), and nothing is shown Ready that is not.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use flotilla_tests::faults::{ApiFault, ApiProxy};
use flotilla_tests::torture::{
    app_value, drift_and_wait_corrected, full, scale, set_pod_ready, workload, PartReport,
};
use flotilla_tests::*;

const NS: &str = "torture-api";
const BUNDLE: &str = "api";

fn state(hub: &Hub, cluster: &str) -> Result<Option<(String, String)>> {
    hub.bundle_state(BUNDLE, cluster)
}

fn wait_state(hub: &Hub, cluster: &str, want: &str, deadline: Duration) -> Result<Duration> {
    let t = Instant::now();
    wait_until(&format!("{BUNDLE} {want}"), deadline, || {
        Ok(state(hub, cluster)?.filter(|(s, _)| s == want).map(|_| ()))
    })?;
    Ok(t.elapsed())
}

/// Watches the bundle for `for_` and returns every time it was shown Ready.
fn ready_sightings(hub: &Hub, cluster: &str, for_: Duration) -> Result<usize> {
    let t = Instant::now();
    let mut seen = 0;
    while t.elapsed() < for_ {
        if state(hub, cluster)?.is_some_and(|(s, _)| s == "Ready") {
            seen += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(seen)
}

#[test]
fn api_server_errors_and_restarts_under_the_agent() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let started = Instant::now();
    let mut report = PartReport::new("the cluster's API server");
    // Long enough for the agent to notice it lost sight (`WATCH_LOST_AFTER`, plus
    // its watch backoff) with some seconds of samples after that.
    let fault_for = Duration::from_secs(scale("APISERVER_FAULT_SECS", 30, 60));
    let blind_within = flotilla_agent::health::WATCH_LOST_AFTER + Duration::from_secs(12);
    let watch_for = Duration::from_secs(if full() { 40 } else { 5 });
    let dir = test_dir("torture-api")?;
    let mut cluster = TestCluster::start("torture-api", &dir.path().join("cluster"))?;
    let proxy = ApiProxy::start(&cluster, dir.path())?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), BUNDLE)?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(workload(NS, "v1").as_str()))]),
        "v1",
    )?;
    let name = "api-c1";
    let _agent = Agent::spawn(
        &hub.agent_url,
        Some(&hub.token()?),
        name,
        "",
        &proxy.kubeconfig,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", BUNDLE, "--repo", &repo.url, "--poll", "1s"])?;
    wait_state(&hub, name, "Ready", DEADLINE)?;

    for (code, label) in [
        (500u16, "500 Internal Server Error"),
        (429, "429 Too Many Requests"),
    ] {
        let t = Instant::now();
        proxy.set(ApiFault::Status(code));
        // Meanwhile, straight to the API server: the pod stops being Ready and a
        // managed object is changed.
        set_pod_ready(&cluster, NS, false)?;
        let marker = format!("during-{code}");
        cluster.kubectl(&[
            "patch",
            "configmap",
            "app",
            "-n",
            NS,
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"data":{{"value":"{marker}"}}}}"#),
        ])?;
        // The agent cannot see the pod meanwhile: how often is the stale Ready shown?
        // Once it has noticed, its health is unknown: never Ready.
        let (mut samples, mut stale, mut late_stale) = (0, 0, 0);
        let mut unknown_after = None;
        while t.elapsed() < fault_for {
            samples += 1;
            match state(&hub, name)? {
                Some((s, _)) if s == "Ready" => {
                    stale += 1;
                    if t.elapsed() > blind_within {
                        late_stale += 1;
                    }
                }
                Some((_, m)) if m.contains("health unknown") && unknown_after.is_none() => {
                    unknown_after = Some(t.elapsed())
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        report.figure(
            &format!("{label}: bundle shown Ready during the fault, pod not Ready (stale view)"),
            format!(
                "{stale} of {samples} samples, {late_stale} after {} s",
                blind_within.as_secs()
            ),
        );
        match unknown_after {
            Some(d) => report.figure(
                &format!("{label}: health shown unknown after"),
                format!("{:.1} s", d.as_secs_f64()),
            ),
            None => report.fail(format!(
                "{label}: the bundle's health was never shown unknown during the fault"
            )),
        }
        if late_stale > 0 {
            report.fail(format!(
                "{label}: the bundle was shown Ready {late_stale} time(s) more than {} s into the fault",
                blind_within.as_secs()
            ));
        }
        proxy.set(ApiFault::None);
        let healed = Instant::now();
        let (requests, faulted) = proxy.requests_between(t, healed);
        let rate = requests as f64 / healed.duration_since(t).as_secs_f64();
        report.figure(
            &format!("{label}: agent requests answered with it"),
            format!(
                "{faulted} in {:.0} s ({rate:.1}/s)",
                fault_for.as_secs_f64()
            ),
        );
        if rate > 20.0 {
            report.note(format!(
                "{label}: the agent kept asking at {rate:.1} requests/s: no backoff visible"
            ));
        }
        // Watches resume: the change is seen and undone, the pod's state is seen.
        match wait_until(
            &format!("{marker} corrected"),
            Duration::from_secs(120),
            || Ok((app_value(&cluster, NS)?.as_deref() == Some("v1")).then_some(())),
        ) {
            Ok(()) => report.figure(
                &format!("{label}: change made meanwhile corrected after"),
                format!("{:.1} s", healed.elapsed().as_secs_f64()),
            ),
            Err(e) => report.fail(format!(
                "{label}: a change made while the API server failed was never corrected: {e:#}"
            )),
        }
        match wait_state(&hub, name, "NotReady", Duration::from_secs(120)) {
            Ok(_) => report.figure(
                &format!("{label}: pod lost meanwhile shown NotReady after"),
                format!("{:.1} s", healed.elapsed().as_secs_f64()),
            ),
            Err(e) => report.fail(format!(
                "{label}: the pod made not Ready meanwhile is not shown: {e:#}"
            )),
        }
        let ready = ready_sightings(&hub, name, watch_for)?;
        if ready > 0 {
            report.fail(format!(
                "{label}: the bundle was shown Ready {ready} time(s) while its pod was not"
            ));
        }
        set_pod_ready(&cluster, NS, true)?;
        if let Err(e) = wait_state(&hub, name, "Ready", Duration::from_secs(120)) {
            report.fail(format!("{label}: Ready again after the pod: {e:#}"));
        }
    }

    // The whole control plane killed and started again on its data dir.
    let down = cluster.kill9_and_restart()?;
    report.figure(
        "control plane kill -9 to ready again",
        format!("{:.1} s", down.as_secs_f64()),
    );
    let t = Instant::now();
    match drift_and_wait_corrected(&cluster, NS, "after-restart", "v1") {
        Ok(d) => report.figure(
            "after the restart: a change corrected after (watches resumed)",
            format!("{:.1} s", (t.elapsed().max(d)).as_secs_f64()),
        ),
        Err(e) => report.fail(format!(
            "after the API server restarted the agent's watches did not resume: {e:#}"
        )),
    }
    set_pod_ready(&cluster, NS, false)?;
    match wait_state(&hub, name, "NotReady", Duration::from_secs(120)) {
        Ok(d) => report.figure(
            "after the restart: a pod lost shown NotReady after",
            format!("{:.1} s", d.as_secs_f64()),
        ),
        Err(e) => report.fail(format!(
            "after the API server restarted a lost pod is not shown: {e:#}"
        )),
    }
    set_pod_ready(&cluster, NS, true)?;
    if let Err(e) = wait_state(&hub, name, "Ready", Duration::from_secs(120)) {
        report.fail(format!("Ready again after the restart: {e:#}"));
    }
    report.note("the proxy terminates TLS with its own CA (in the agent's kubeconfig) and forwards with the cluster's admin client certificate; a fault also cuts open connections, so running watches meet it");
    if !full() {
        report.note("short run: `make torture` holds each fault 60 s");
    }
    drop(proxy);
    drop(cluster);
    report.finish("apiserver", started)
}
