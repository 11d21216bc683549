//! Torture: the agent killed with -9 at random moments of applying and pruning a
//! 200-object bundle (between receive and ack, mid-apply, mid-prune, right after
//! the apply while the inventory and statuses are written, and again during the
//! re-apply after a restart). After every restart the cluster must converge: no
//! object of the bundle missing, none orphaned (every object with Flotilla's bundle
//! label belongs to the current revision), the store opened cleanly and still
//! holding what the agent acknowledged. 3 kills in `make test`, 100 in
//! `make torture`; figures in RELIABILITY.md.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flotilla_tests::torture::{full, percentile, scale, LogTail, PartReport};
use flotilla_tests::*;

const NS: &str = "torture-kill";
const BUNDLE: &str = "kill";
/// Objects in the bundle; each revision moves half of them (apply 100 new, update
/// 100, prune 100).
const OBJECTS: usize = 200;

/// The bundle at revision `r`: a namespace and 200 ConfigMaps whose names slide by
/// 100 from one revision to the next, each holding the revision.
fn bundle(r: usize) -> (String, BTreeSet<String>) {
    let start = if r % 2 == 1 { 0 } else { OBJECTS / 2 };
    let mut names = BTreeSet::new();
    let mut y = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n");
    for i in start..start + OBJECTS {
        let name = format!("cm-{i:03}");
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {NS}\ndata:\n  value: \"r{r}\"\n"
        ));
        names.insert(name);
    }
    (y, names)
}

/// What the cluster holds with Flotilla's bundle label: (namespace/name, bundle
/// label, data.value) of every ConfigMap.
fn labelled(c: &TestCluster) -> Result<Vec<(String, String, String)>> {
    let out = c.kubectl(&[
        "get",
        "configmaps",
        "-A",
        "-l",
        flotilla_shared::BUNDLE_LABEL,
        "-o",
        "json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            let m = &o["metadata"];
            (
                format!(
                    "{}/{}",
                    m["namespace"].as_str().unwrap_or_default(),
                    m["name"].as_str().unwrap_or_default()
                ),
                m["labels"][flotilla_shared::BUNDLE_LABEL]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                o["data"]["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// (missing, orphaned, stale) against revision `r`: objects of the revision not
/// in the cluster, labelled objects not in the revision, objects of the revision
/// holding another revision's data.
fn audit(c: &TestCluster, r: usize, want: &BTreeSet<String>) -> Result<(usize, usize, usize)> {
    let have = labelled(c)?;
    let want_keys: BTreeSet<String> = want.iter().map(|n| format!("{NS}/{n}")).collect();
    let have_keys: BTreeSet<String> = have.iter().map(|(k, _, _)| k.clone()).collect();
    let missing = want_keys.difference(&have_keys).count();
    let orphaned = have
        .iter()
        .filter(|(k, b, _)| !want_keys.contains(k) || b != BUNDLE)
        .count();
    let stale = have
        .iter()
        .filter(|(k, _, v)| want_keys.contains(k) && *v != format!("r{r}"))
        .count();
    Ok((missing, orphaned, stale))
}

/// The revision the hub shows the agent has applied, and its state.
fn hub_view(hub: &Hub, cluster: &str) -> Result<Option<(String, String)>> {
    let v = hub.cli_json(&["bundle", "get", BUNDLE])?;
    Ok(v["clusters"].as_array().and_then(|cs| {
        cs.iter().find(|c| c["cluster"] == cluster).map(|c| {
            (
                c["state"].as_str().unwrap_or_default().to_string(),
                c["appliedRevision"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
    }))
}

/// Where a kill is aimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Aim {
    /// Within ~10 ms of the hub sending the set: receiving, storing, acknowledging.
    Ack,
    /// While objects are being applied.
    Apply,
    /// While objects that left the bundle are being deleted.
    Prune,
    /// Right after the last object: inventory, statuses, flushes.
    Flush,
}

const AIMS: [Aim; 4] = [Aim::Ack, Aim::Apply, Aim::Prune, Aim::Flush];

/// Where a kill landed, from what the agent had logged when it died.
fn landed(log: &str) -> &'static str {
    if !log.contains("desired state received") {
        "before the ack"
    } else if log.contains("bundle applied") {
        "after the apply (inventory/status writes)"
    } else if log.contains("pruned") {
        "mid-prune"
    } else {
        "mid-apply"
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn random_upto(d: Duration) -> Duration {
    d.mul_f64(rand::random::<f64>())
}

struct Run<'a> {
    hub: &'a Hub,
    cluster: &'a TestCluster,
    name: &'a str,
    state: std::path::PathBuf,
    agent: Agent,
    report: PartReport,
    /// Store problems seen on restart (each one a failure).
    store_problems: usize,
    restarts: usize,
}

impl Run<'_> {
    /// kill -9 and start again from the state dir; checks that the store opened
    /// cleanly and still holds what was acknowledged.
    fn kill_and_restart(&mut self, pre_kill_log: &str) -> Result<()> {
        self.agent.proc.kill9();
        self.restarts += 1;
        let acked_before = pre_kill_log.contains("desired state received");
        let mut hub_log = LogTail::from_end(&self.hub.proc.log);
        self.agent = Agent::spawn(
            &self.hub.agent_url,
            None,
            self.name,
            "",
            &self.cluster.kubeconfig,
            &self.state,
        )?;
        let mut log = LogTail::from_start(&self.agent.proc.log);
        // The session's first Desired tells whether the store kept the content;
        // or the hub resumes the session from the set the store holds (it sends
        // none: the store kept the set, seq and contents).
        let started = Instant::now();
        let first = loop {
            log.poll();
            hub_log.poll();
            let resumed = hub_log.text.lines().any(|l| {
                l.contains("resuming from it") && l.contains(&format!("cluster={}", self.name))
            });
            if log.text.contains("desired state received") || resumed {
                break Ok(resumed);
            }
            if started.elapsed() > DEADLINE {
                break Err(anyhow::anyhow!(
                    "the restarted agent was neither sent a set nor resumed in {DEADLINE:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let text = log.text.clone();
        if text.contains("cannot be opened") || text.contains("corrupt") {
            self.store_problems += 1;
            self.report.fail(format!(
                "restart {}: the agent's store did not open cleanly: {}",
                self.restarts,
                text.lines()
                    .find(|l| l.contains("cannot be opened") || l.contains("corrupt"))
                    .unwrap_or_default()
            ));
        }
        let resumed = first?;
        if acked_before && !resumed {
            let received = text
                .lines()
                .find(|l| l.contains("desired state received"))
                .unwrap_or_default();
            if !received.contains("new_contents=0") {
                self.store_problems += 1;
                self.report.fail(format!(
                    "restart {}: the agent had stored and acknowledged the set before the kill, \
                     but its store no longer held the content (the hub had to send it again): {received}",
                    self.restarts
                ));
            }
        }
        Ok(())
    }

    /// Waits until the hub shows the revision Ready and the cluster holds exactly
    /// it; returns how long that took, or the audit at the deadline.
    fn converge(
        &mut self,
        r: usize,
        commit: &str,
        want: &BTreeSet<String>,
    ) -> Result<std::result::Result<Duration, String>> {
        let t = Instant::now();
        let deadline = Duration::from_secs(180);
        let done = wait_until(&format!("revision r{r} converged"), deadline, || {
            let Some((state, rev)) = hub_view(self.hub, self.name)? else {
                return Ok(None);
            };
            if state != "Ready" || rev != commit {
                bail!("hub shows {state} at {rev}");
            }
            let (missing, orphaned, stale) = audit(self.cluster, r, want)?;
            if missing + orphaned + stale > 0 {
                bail!("{missing} missing, {orphaned} orphaned, {stale} stale");
            }
            Ok(Some(()))
        });
        Ok(match done {
            Ok(()) => Ok(t.elapsed()),
            Err(e) => Err(format!("{e:#}")),
        })
    }
}

#[test]
fn agent_kill9_while_applying_and_pruning() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let started = Instant::now();
    let kills: usize = scale("AGENT_KILLS", 3, 100);
    let dir = test_dir("torture-agent")?;
    let cluster = TestCluster::start("torture", &dir.path().join("cluster"))?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "kill")?;
    let name = "kill-c1";
    let state = dir.path().join("agent");
    let mut r = 1;
    let (y, mut want) = bundle(r);
    let mut commit = repo.commit(&BTreeMap::from([("app.yaml", Some(y.as_str()))]), "r1")?;
    let agent = Agent::start(&hub, &hub.token()?, name, "", &cluster, &state)?;
    hub.cli(&["source", "add", "kill", "--repo", &repo.url, "--poll", "1s"])?;
    let mut run = Run {
        hub: &hub,
        cluster: &cluster,
        name,
        state: state.clone(),
        agent,
        report: PartReport::new("agent kill -9"),
        store_problems: 0,
        restarts: 0,
    };
    if let Err(e) = run.converge(r, &commit, &want)? {
        bail!("the first revision never converged: {e}");
    }

    // One revision without a kill, to time an apply and a prune of this bundle.
    r += 1;
    let (y, w) = bundle(r);
    want = w;
    let mut log = LogTail::from_end(&run.agent.proc.log);
    commit = repo.commit(&BTreeMap::from([("app.yaml", Some(y.as_str()))]), "r2")?;
    log.wait_for("desired state received", DEADLINE)?;
    let t0 = Instant::now();
    log.wait_for("pruned", DEADLINE)?;
    let apply_time = t0.elapsed();
    let t1 = Instant::now();
    log.wait_for("bundle applied", DEADLINE)?;
    let prune_time = t1.elapsed();
    if let Err(e) = run.converge(r, &commit, &want)? {
        bail!("revision 2 never converged: {e}");
    }

    let mut landed_at: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut aimed_at: BTreeMap<String, usize> = BTreeMap::new();
    let mut converge_ms: Vec<f64> = Vec::new();
    let (mut lost, mut orphaned_total, mut double_kills) = (0usize, 0usize, 0usize);
    for i in 0..kills {
        r += 1;
        let (y, w) = bundle(r);
        want = w;
        let aim = AIMS[i % AIMS.len()];
        *aimed_at.entry(format!("{aim:?}")).or_default() += 1;
        let mut agent_log = LogTail::from_end(&run.agent.proc.log);
        let mut hub_log = LogTail::from_end(&hub.proc.log);
        commit = repo.commit(
            &BTreeMap::from([("app.yaml", Some(y.as_str()))]),
            &format!("r{r}"),
        )?;
        // Strike at a random moment of the aimed phase.
        let struck = match aim {
            Aim::Ack => hub_log
                .wait_for("sending desired set", DEADLINE)
                .map(|_| std::thread::sleep(random_upto(Duration::from_millis(10)))),
            Aim::Apply => agent_log
                .wait_for("desired state received", DEADLINE)
                .map(|_| std::thread::sleep(random_upto(apply_time))),
            Aim::Prune => agent_log
                .wait_for("pruned", DEADLINE)
                .map(|_| std::thread::sleep(random_upto(prune_time))),
            Aim::Flush => agent_log
                .wait_for("bundle applied", DEADLINE)
                .map(|_| std::thread::sleep(random_upto(Duration::from_millis(50)))),
        };
        if let Err(e) = struck {
            run.report.note(format!(
                "kill {i}: the aimed moment ({aim:?}) was not seen ({e:#}); killed anyway"
            ));
        }
        run.agent.proc.kill9();
        agent_log.poll();
        let pre = agent_log.text.clone();
        *landed_at.entry(landed(&pre)).or_default() += 1;
        run.kill_and_restart(&pre)?;
        // Every fifth time, again during the re-apply that follows a restart.
        if i % 5 == 4 {
            double_kills += 1;
            std::thread::sleep(random_upto(apply_time));
            let mut tail = LogTail::from_start(&run.agent.proc.log);
            tail.poll();
            let pre = tail.text.clone();
            run.kill_and_restart(&pre)?;
        }
        match run.converge(r, &commit, &want)? {
            Ok(d) => converge_ms.push(d.as_secs_f64() * 1000.0),
            Err(e) => {
                let (missing, orphaned, stale) = audit(&cluster, r, &want)?;
                lost += missing;
                orphaned_total += orphaned;
                run.report.fail(format!(
                    "kill {i} (aimed at {aim:?}, landed {}): not converged after 180 s: {e}; \
                     {missing} missing, {orphaned} orphaned, {stale} stale; agent log {}",
                    landed(&pre),
                    run.agent.proc.log.display()
                ));
                break;
            }
        }
    }
    converge_ms.sort_by(f64::total_cmp);
    let Run {
        mut report,
        store_problems,
        restarts,
        ..
    } = run;
    report.figure("bundle", format!("1 namespace + {OBJECTS} ConfigMaps; each revision applies {OBJECTS} (100 new) and prunes 100"));
    report.figure(
        "kills",
        format!("{kills} (+{double_kills} during the re-apply after a restart)"),
    );
    report.figure("restarts survived", restarts);
    report.figure(
        "kills aimed at",
        aimed_at
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.figure(
        "kills landed (from the agent's last log lines)",
        landed_at
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.figure("objects lost", lost);
    report.figure("objects orphaned", orphaned_total);
    report.figure(
        "store problems (not opened cleanly, acknowledged state lost)",
        store_problems,
    );
    report.figure(
        "restart to converged (p50 / p99 / max)",
        format!(
            "{:.1} s / {:.1} s / {:.1} s",
            percentile(&converge_ms, 50.0) / 1000.0,
            percentile(&converge_ms, 99.0) / 1000.0,
            converge_ms.last().copied().unwrap_or(0.0) / 1000.0
        ),
    );
    report.figure(
        "undisturbed apply / prune of one revision",
        format!("{} / {}", ms(apply_time), ms(prune_time)),
    );
    if !full() {
        report.note("short run: `make torture` kills 100 times");
    }
    drop(cluster);
    report.finish("agent-kill", started)
}
