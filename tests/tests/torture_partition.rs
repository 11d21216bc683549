//! Torture: the link between an agent and its hub cut through a fault proxy the
//! test controls (`faults::Link`). A long partition (reset; 20 s in `make test`, 10
//! minutes in `make torture`) during which the agent keeps correcting drift; a
//! link flapping every few seconds (20 s / 2 minutes) with commits and drift on
//! the way; and a half-open link (packets dropped, no reset) that the agent must
//! notice by itself. After each: the outbox (statuses and drift events) is
//! delivered exactly once and the bundle shows the truth.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_tests::faults::{Link, LinkMode};
use flotilla_tests::torture::{
    connected, drift_and_wait_corrected, drift_markers, exactly_once, full, percentile, scale,
    set_pod_ready, workload, PartReport,
};
use flotilla_tests::*;

/// One control plane for this test binary (each test has its own namespace).
fn cluster() -> &'static TestCluster {
    static C: OnceLock<TestCluster> = OnceLock::new();
    C.get_or_init(|| {
        // Named like the shared clusters' dirs, so the next test binary removes it.
        let dir =
            std::env::temp_dir().join(format!("flotilla-e2e-{}-partition", std::process::id()));
        TestCluster::start("partition", &dir).expect("start the partition cluster")
    })
}

/// A hub, a repository with the workload, and an agent that reaches the hub only
/// through a [`Link`].
struct Setup {
    _dir: tempfile::TempDir,
    hub: Hub,
    repo: GitRepo,
    link: Link,
    agent: Agent,
    name: String,
    ns: String,
    bundle: String,
    #[allow(dead_code)]
    state: PathBuf,
}

fn setup(tag: &str) -> Result<Setup> {
    let c = cluster();
    let dir = test_dir(&format!("torture-{tag}"))?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), tag)?;
    let ns = format!("torture-{tag}");
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(workload(&ns, "v1").as_str()))]),
        "v1",
    )?;
    let link = Link::start(hub.agent_port())?;
    let name = format!("{tag}-c1");
    let state = dir.path().join("agent");
    let agent = Agent::spawn(
        &format!("https://127.0.0.1:{}", link.port),
        Some(&hub.token()?),
        &name,
        "",
        &c.kubeconfig,
        &state,
    )?;
    hub.cli(&["source", "add", tag, "--repo", &repo.url, "--poll", "1s"])?;
    hub.wait_bundle_state(tag, &name, "Ready")?;
    Ok(Setup {
        _dir: dir,
        hub,
        repo,
        link,
        agent,
        name,
        ns,
        bundle: tag.to_string(),
        state,
    })
}

impl Setup {
    fn wait_connected(&self, want: bool, deadline: Duration) -> Result<Duration> {
        let t = Instant::now();
        wait_until(
            &format!("{} connected = {want}", self.name),
            deadline,
            || Ok((connected(&self.hub, &self.name)? == want).then_some(())),
        )?;
        Ok(t.elapsed())
    }

    fn wait_state(&self, state: &str, deadline: Duration) -> Result<String> {
        wait_until(
            &format!("{} {state} on {}", self.bundle, self.name),
            deadline,
            || {
                Ok(self
                    .hub
                    .bundle_state(&self.bundle, &self.name)?
                    .filter(|(s, _)| s == state)
                    .map(|(_, m)| m))
            },
        )
    }
}

fn secs(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "{:.1} s / {:.1} s / {:.1} s",
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(0.0)
    )
}

/// Cut off (reset) for a long time: the agent keeps correcting drift from its own
/// store; a pod stops being Ready meanwhile. After the partition heals, every
/// drift event reaches the hub exactly once and the bundle shows NotReady.
#[test]
fn long_partition_keeps_correcting_and_delivers_exactly_once() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let started = Instant::now();
    let mut report = PartReport::new("partition: long offline");
    let offline = Duration::from_secs(scale("OFFLINE_SECS", 20, 600));
    let s = setup("offline")?;
    let c = cluster();

    s.link.set(LinkMode::Reset);
    let noticed = s.wait_connected(false, DEADLINE)?;
    let cut = Instant::now();
    set_pod_ready(c, &s.ns, false)?;
    let mut markers = Vec::new();
    let mut corrections = Vec::new();
    let mut i = 0;
    let every = Duration::from_secs(if full() { 20 } else { 4 });
    while cut.elapsed() < offline {
        i += 1;
        let marker = format!("offline-{i}");
        let took = drift_and_wait_corrected(c, &s.ns, &marker, "v1")
            .with_context(|| format!("while cut off, drift {marker} was not corrected"))?;
        corrections.push(took.as_secs_f64());
        markers.push(marker);
        let next = cut + every * i;
        while Instant::now() < next && cut.elapsed() < offline {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let offline_for = cut.elapsed();
    s.link.set(LinkMode::Pass);
    let healed = Instant::now();
    let back = s.wait_connected(true, Duration::from_secs(120))?;
    let msg = s.wait_state("NotReady", DEADLINE);
    let msg = match msg {
        Ok(m) => m,
        Err(e) => {
            report.fail(format!(
                "after the partition the hub does not show the pod's loss of readiness: {e:#}"
            ));
            String::new()
        }
    };
    // Every event the agent recorded while cut off arrives, once.
    let (lost, dup) = wait_until("drift events delivered", DEADLINE, || {
        let shown = drift_markers(&s.hub, &s.name)?;
        let (lost, dup) = exactly_once(&shown, &markers);
        Ok((lost == 0).then_some((lost, dup)))
    })
    .unwrap_or_else(|_| {
        let shown = drift_markers(&s.hub, &s.name).unwrap_or_default();
        exactly_once(&shown, &markers)
    });
    let delivered = healed.elapsed();
    if lost + dup > 0 {
        report.fail(format!(
            "drift events made offline: {lost} lost, {dup} duplicated (of {})",
            markers.len()
        ));
    }
    set_pod_ready(c, &s.ns, true)?;
    if let Err(e) = s.wait_state("Ready", DEADLINE) {
        report.fail(format!("Ready again: {e:#}"));
    }
    report.figure("offline for", format!("{:.0} s", offline_for.as_secs_f64()));
    report.figure(
        "hub noticed the cut",
        format!("{:.1} s", noticed.as_secs_f64()),
    );
    report.figure("drift corrected while cut off (count)", markers.len());
    report.figure(
        "drift correction while cut off (p50 / p99 / max)",
        secs(&corrections),
    );
    report.figure(
        "reconnected after healing",
        format!("{:.1} s", back.as_secs_f64()),
    );
    report.figure(
        "outbox delivered after healing",
        format!("{:.1} s", delivered.as_secs_f64()),
    );
    report.figure("drift events lost / duplicated", format!("{lost} / {dup}"));
    report.figure("status after healing", format!("NotReady: {msg}"));
    if !full() {
        report.note("short run: `make torture` stays offline 10 minutes");
    }
    drop(s);
    report.finish("partitions-offline", started)
}

/// The link flaps (reset, then back) every 1-5 s; drift is corrected and a commit
/// lands meanwhile. Afterwards the bundle is Ready at the new commit and every
/// drift event arrived exactly once.
#[test]
fn flapping_link_converges_and_delivers_exactly_once() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let started = Instant::now();
    let mut report = PartReport::new("partition: flapping link");
    let flapping = Duration::from_secs(scale("FLAP_SECS", 20, 120));
    let s = setup("flap")?;
    let c = cluster();
    let sessions_before = s.hub.proc.log_text().matches("agent connected").count();

    s.link.flap(Duration::from_secs(1), Duration::from_secs(5));
    let t = Instant::now();
    let mut markers = Vec::new();
    let mut i = 0;
    let mut head = None;
    let mut value = "v1".to_string();
    while t.elapsed() < flapping {
        i += 1;
        if head.is_none() && t.elapsed() > flapping / 2 {
            value = "v2".into();
            head = Some(s.repo.commit(
                &BTreeMap::from([("app.yaml", Some(workload(&s.ns, &value).as_str()))]),
                "v2",
            )?);
        }
        let marker = format!("flap-{i}");
        // Corrected to whatever the agent holds: v1, or v2 once it got it.
        c.kubectl(&[
            "patch",
            "configmap",
            "app",
            "-n",
            &s.ns,
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"data":{{"value":"{marker}"}}}}"#),
        ])?;
        wait_until(&format!("drift {marker} corrected"), DEADLINE, || {
            let v = flotilla_tests::torture::app_value(c, &s.ns)?;
            Ok((v.as_deref() == Some("v1") || v.as_deref() == Some("v2")).then_some(()))
        })?;
        markers.push(marker);
        std::thread::sleep(Duration::from_millis(1000 + rand::random_range(0..2000)));
    }
    s.link.stop_flapping();
    let resets = s.link.resets();
    let healed = Instant::now();
    let head = head.unwrap_or_default();
    let converged = wait_until("Ready at the new commit", Duration::from_secs(120), || {
        let v = s.hub.cli_json(&["bundle", "get", &s.bundle])?;
        let ok = v["clusters"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["cluster"] == s.name.as_str()
                    && c["state"] == "Ready"
                    && c["appliedRevision"] == head.as_str()
            })
        });
        Ok(ok.then_some(()))
    });
    if let Err(e) = &converged {
        report.fail(format!("after flapping: {e:#}"));
    }
    let converge_s = healed.elapsed().as_secs_f64();
    let (lost, dup) = wait_until("drift events delivered", DEADLINE, || {
        let (lost, dup) = exactly_once(&drift_markers(&s.hub, &s.name)?, &markers);
        Ok((lost == 0).then_some((lost, dup)))
    })
    .unwrap_or_else(|_| {
        exactly_once(
            &drift_markers(&s.hub, &s.name).unwrap_or_default(),
            &markers,
        )
    });
    if lost + dup > 0 {
        report.fail(format!(
            "drift events made while flapping: {lost} lost, {dup} duplicated (of {})",
            markers.len()
        ));
    }
    let sessions = s.hub.proc.log_text().matches("agent connected").count() - sessions_before;
    report.figure("flapping for", format!("{:.0} s", flapping.as_secs_f64()));
    report.figure("connections reset by the link", resets);
    report.figure("sessions the hub accepted meanwhile", sessions);
    report.figure(
        "drift events made / lost / duplicated",
        format!("{} / {lost} / {dup}", markers.len()),
    );
    report.figure(
        "healed to Ready at the new commit",
        format!("{converge_s:.1} s"),
    );
    let _ = value;
    if !full() {
        report.note("short run: `make torture` flaps for 2 minutes");
    }
    drop(s);
    report.finish("partitions-flapping", started)
}

/// A half-open link: from one moment on, nothing passes in either direction, and
/// nobody is told (no reset, no FIN). The agent must notice by itself (HTTP/2
/// keepalive) and dial again; a drift event recorded meanwhile reaches the hub
/// exactly once after the link works again.
#[test]
fn half_open_link_is_detected_by_keepalive() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let started = Instant::now();
    let mut report = PartReport::new("partition: half-open link");
    /// The bound the agent must meet: longer than any sane keepalive.
    const BOUND: Duration = Duration::from_secs(120);
    let s = setup("halfopen")?;
    let c = cluster();

    s.link.set(LinkMode::Blackhole);
    let dark = Instant::now();
    // Drift while the link is dark: the agent corrects it and sends the event into
    // the dead stream.
    drift_and_wait_corrected(c, &s.ns, "halfopen-1", "v1")?;
    let markers = vec!["halfopen-1".to_string()];
    // The agent noticed once it dials again.
    let redial = wait_until(
        "the agent dials again",
        BOUND + Duration::from_secs(30),
        || Ok(s.link.accepted_since(dark).first().copied()),
    );
    let agent_detect = match redial {
        Ok(t) => {
            let d = t.duration_since(dark);
            if d > BOUND {
                report.fail(format!(
                    "the agent noticed the dead link only after {:.0} s (bound {} s)",
                    d.as_secs_f64(),
                    BOUND.as_secs()
                ));
            }
            Some(d)
        }
        Err(_) => {
            report.fail(format!(
                "the agent did not notice a half-open link within {} s (no new dial); \
                 agent log {}",
                BOUND.as_secs() + 30,
                s.agent.proc.log.display()
            ));
            None
        }
    };
    let hub_detect = s
        .wait_connected(false, Duration::from_secs(150))
        .map(|_| dark.elapsed())
        .ok();
    if hub_detect.is_none() {
        report.fail("the hub still shows the agent connected 150 s into a half-open link");
    }
    s.link.set(LinkMode::Pass);
    let healed = Instant::now();
    let back = s.wait_connected(true, Duration::from_secs(120));
    if let Err(e) = &back {
        report.fail(format!("not reconnected after the link came back: {e:#}"));
    }
    let back = healed.elapsed();
    let (lost, dup) = wait_until("drift event delivered", DEADLINE, || {
        let (lost, dup) = exactly_once(&drift_markers(&s.hub, &s.name)?, &markers);
        Ok((lost == 0).then_some((lost, dup)))
    })
    .unwrap_or_else(|_| {
        exactly_once(
            &drift_markers(&s.hub, &s.name).unwrap_or_default(),
            &markers,
        )
    });
    if lost + dup > 0 {
        report.fail(format!(
            "the drift event sent into the dead link: {lost} lost, {dup} duplicated"
        ));
    }
    let show = |d: Option<Duration>| {
        d.map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    };
    report.figure(
        "agent noticed the dead link (first new dial)",
        show(agent_detect),
    );
    report.figure("hub dropped the dead session", show(hub_detect));
    report.figure(
        "reconnected after the link came back",
        format!("{:.1} s", back.as_secs_f64()),
    );
    report.figure(
        "drift event sent into the dead link: lost / duplicated",
        format!("{lost} / {dup}"),
    );
    report.note(format!(
        "bound for noticing: {} s; the agent's channel has HTTP/2 keepalive pings every 20 s (agent/src/transport.rs), the hub's server every 30 s with a 20 s timeout (hub/src/gateway.rs)",
        BOUND.as_secs()
    ));
    drop(s);
    report.finish("partitions-halfopen", started)
}
