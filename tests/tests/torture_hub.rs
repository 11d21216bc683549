//! Torture: the hub killed with -9 under a fleet of simulated agents (speaking the
//! real protocol over real mutual TLS, re-dialling with the agent crate's backoff),
//! some kills during a commit's fan-out. Measured: how fast every agent is back and
//! how the reconnects spread over time (a thundering herd shows as a peak). Checked:
//! every agent back within a bound; no status or drift event the hub acknowledged
//! lost or duplicated (compared with what the API shows after each restart); no
//! agent sent a Desired set that leaves out bundles Git still has. 100 agents and 2
//! kills in `make test`, 1,000 and 20 in `make torture`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use flotilla_tests::sim::{self, Behaviour, Observed, Switches};
use flotilla_tests::torture::{full, peak_rate, percentile, scale, HubApi, PartReport};
use flotilla_tests::*;
use tokio::sync::{watch, Semaphore};
use tonic::transport::Uri;

/// Hub log level: statuses are logged at debug, which a thousand agents make heavy.
const HUB_LOG: &str = "info";

fn cm(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: sim\ndata:\n  value: \"{value}\"\n")
}

fn files(r: usize) -> BTreeMap<&'static str, Option<String>> {
    BTreeMap::from([
        ("app/cm.yaml", Some(cm("app", &format!("r{r}")))),
        ("web/cm.yaml", Some(cm("web", &format!("r{r}")))),
    ])
}

fn commit(repo: &GitRepo, r: usize) -> Result<String> {
    let f = files(r);
    let refs: BTreeMap<&str, Option<&str>> = f.iter().map(|(k, v)| (*k, v.as_deref())).collect();
    repo.commit(&refs, &format!("r{r}"))
}

type Fleet = Vec<Arc<Mutex<Observed>>>;

fn lock(o: &Mutex<Observed>) -> std::sync::MutexGuard<'_, Observed> {
    o.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until `f` holds for every agent, polling; returns how many do at the end.
async fn wait_all(
    fleet: &Fleet,
    what: &str,
    deadline: Duration,
    f: impl Fn(&Observed) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let n = fleet.iter().filter(|o| f(&lock(o))).count();
        if n == fleet.len() {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{what}: {n} of {} after {deadline:?}", fleet.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the API shows against what the agents were acknowledged: (statuses lost,
/// drift events lost, drift events duplicated), with examples.
async fn audit(
    api: &HubApi,
    fleet: &Fleet,
    bundles: &[String],
) -> Result<(usize, usize, usize, Vec<String>)> {
    let mut shown = BTreeMap::new();
    for b in bundles {
        shown.insert(b.clone(), api.bundle_states(b).await?);
    }
    let drift = api.list("/api/v1/drift").await?;
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in &drift {
        let key = (
            e["cluster"].as_str().unwrap_or_default().to_string(),
            e["object"]["name"].as_str().unwrap_or_default().to_string(),
        );
        *counts.entry(key).or_default() += 1;
    }
    let (mut status_lost, mut drift_lost, mut drift_dup) = (0, 0, 0);
    let mut examples = Vec::new();
    for (i, o) in fleet.iter().enumerate() {
        let o = lock(o);
        let cluster = format!("sim-{i:05}");
        for (bundle, (seq, st)) in o.acked_statuses() {
            let current = o.bundles.get(&bundle).map(|(h, _)| h.as_str());
            if current != Some(st.content_hash.as_str()) {
                continue;
            }
            let got = shown.get(&bundle).and_then(|m| m.get(&cluster));
            if got.is_none_or(|(_, m)| *m != st.message) {
                status_lost += 1;
                if examples.len() < 5 {
                    examples.push(format!(
                        "{cluster}/{bundle}: acked status seq {seq} {:?} {:?}, the API shows {got:?}",
                        st.state, st.message
                    ));
                }
            }
        }
        for id in &o.drift_acked {
            let Some((name, _)) = o.drift.get(id) else {
                continue;
            };
            match counts
                .get(&(cluster.clone(), name.clone()))
                .copied()
                .unwrap_or(0)
            {
                0 => {
                    drift_lost += 1;
                    if examples.len() < 5 {
                        examples.push(format!(
                            "{cluster}: acked drift event {id} ({name}) not in the API"
                        ));
                    }
                }
                1 => {}
                n => {
                    drift_dup += n - 1;
                    if examples.len() < 5 {
                        examples.push(format!(
                            "{cluster}: drift event {id} ({name}) shown {n} times"
                        ));
                    }
                }
            }
        }
    }
    Ok((status_lost, drift_lost, drift_dup, examples))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_kill9_under_a_fleet() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let started = Instant::now();
    let n: usize = scale("HUB_AGENTS", 100, 1000);
    let kills: usize = scale("HUB_KILLS", 2, 20);
    let mut report = PartReport::new("hub kill -9");
    let dir = test_dir("torture-hub")?;
    let repo = GitRepo::new(dir.path(), "fleet")?;
    let mut r = 1;
    let mut head = commit(&repo, r)?;
    let mut hub = tokio::task::block_in_place(|| {
        Hub::start_logging(&dir.path().join("hub"), free_port(), free_port(), HUB_LOG)
    })?;
    let source = repo.url.clone();
    tokio::task::block_in_place(|| {
        hub.cli(&[
            "source", "add", "fleet", "--repo", &source, "--path", "app", "--path", "web",
            "--poll", "1s",
        ])
    })?;
    let bundles = vec!["fleet-app".to_string(), "fleet-web".to_string()];
    let api = HubApi::new(&hub);
    let tokens = api.tokens(n, 8).await?;
    let uri: Uri = hub.agent_url.parse()?;
    let ca_pem = sim::fetch_ca(&uri, &tokens[0]).await?;
    let anonymous = flotilla_agent::transport::anonymous_config(&ca_pem)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (quiet_tx, quiet_rx) = watch::channel(false);
    let behaviour = Behaviour {
        // A thousand agents at one status per ~10 s is ~100 status writes a second.
        status_every: Duration::from_millis(if full() { 10_000 } else { 2_000 }),
        // The hub keeps the last 10,000 drift events; stay well within.
        drift_budget: (8_000 / n).clamp(1, 20),
    };
    let fleet: Fleet = (0..n)
        .map(|_| Arc::new(Mutex::new(Observed::default())))
        .collect();
    let permits = Arc::new(Semaphore::new(16));
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for (i, token) in tokens.into_iter().enumerate() {
        let (uri, anonymous, ca_pem, permits, obs, behaviour) = (
            uri.clone(),
            anonymous.clone(),
            ca_pem.clone(),
            permits.clone(),
            fleet[i].clone(),
            behaviour.clone(),
        );
        let switches = Switches {
            stop: stop_rx.clone(),
            quiet: quiet_rx.clone(),
        };
        let fail_tx = fail_tx.clone();
        tokio::spawn(async move {
            let name = format!("sim-{i:05}");
            let tls = {
                let _p = permits.acquire().await;
                match sim::enrol(&uri, anonymous, &ca_pem, &token, &name).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = fail_tx.send(format!("{name}: {e:#}"));
                        return;
                    }
                }
            };
            sim::torture_agent(i, uri, tls, behaviour, obs, switches).await;
        });
    }
    let rev_of = |o: &Observed| o.desired.last().map(|(_, rev, k)| (rev.clone(), *k));
    let connect = wait_all(
        &fleet,
        "agents holding the first revision",
        Duration::from_secs(120 + n as u64 / 5),
        |o| rev_of(o) == Some((head.clone(), 2)),
    )
    .await;
    if let Ok(e) = fail_rx.try_recv() {
        bail!("enrolment failed: {e}");
    }
    connect?;
    let connected_in = started.elapsed();

    let mut reconnect_ms: Vec<f64> = Vec::new();
    let mut after_up_ms: Vec<f64> = Vec::new();
    let mut downtime_ms: Vec<f64> = Vec::new();
    let (mut peak_1s, mut peak_100ms, mut peak_attempts_1s) = (0usize, 0usize, 0usize);
    let (mut status_lost, mut drift_lost, mut drift_dup) = (0usize, 0usize, 0usize);
    let mut fanout_kills = 0;
    let mut fanout_partial: Vec<usize> = Vec::new();
    let mut rounds = 0;
    for k in 0..kills {
        // A random moment of ordinary traffic, or of a commit's fan-out.
        tokio::time::sleep(Duration::from_millis(1000 + rand::random_range(0..3000))).await;
        if k % 2 == 1 {
            r += 1;
            head = tokio::task::block_in_place(|| commit(&repo, r))?;
            // Kill once some (a random share) but not all agents have the commit.
            let share = rand::random_range(1..=n.div_ceil(2));
            let t = Instant::now();
            loop {
                let got = fleet
                    .iter()
                    .filter(|o| rev_of(&lock(o)).is_some_and(|(rev, _)| rev == head))
                    .count();
                if got >= share || t.elapsed() > Duration::from_secs(60) {
                    fanout_partial.push(got);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            fanout_kills += 1;
        }
        let killed = Instant::now();
        let down = tokio::task::block_in_place(|| hub.kill9_and_restart(HUB_LOG))?;
        let up = killed + down;
        downtime_ms.push(down.as_secs_f64() * 1000.0);
        let back = wait_all(&fleet, "agents back", Duration::from_secs(180), |o| {
            o.sessions.last().is_some_and(|t| *t > killed)
        })
        .await;
        if let Err(e) = back {
            report.fail(format!("kill {k}: not every agent came back: {e:#}"));
            break;
        }
        let conv = wait_all(
            &fleet,
            "agents at the head revision",
            Duration::from_secs(120),
            |o| rev_of(o) == Some((head.clone(), 2)),
        )
        .await;
        if let Err(e) = conv {
            report.fail(format!(
                "kill {k}: the fleet did not converge on {head}: {e:#}"
            ));
        }
        let mut sessions = Vec::new();
        let mut attempts = Vec::new();
        for o in &fleet {
            let o = lock(o);
            if let Some(t) = o.sessions.iter().find(|t| **t > killed) {
                sessions.push(*t);
                reconnect_ms.push(t.duration_since(killed).as_secs_f64() * 1000.0);
                after_up_ms.push(t.saturating_duration_since(up).as_secs_f64() * 1000.0);
            }
            attempts.extend(o.attempts.iter().filter(|t| **t > killed).copied());
        }
        peak_1s = peak_1s.max(peak_rate(&sessions, Duration::from_secs(1)));
        peak_100ms = peak_100ms.max(peak_rate(&sessions, Duration::from_millis(100)));
        peak_attempts_1s = peak_attempts_1s.max(peak_rate(&attempts, Duration::from_secs(1)));

        // Quiet, drained, then compare with what the API shows.
        quiet_tx.send_replace(true);
        if let Err(e) = wait_all(&fleet, "outboxes drained", Duration::from_secs(120), |o| {
            o.drained()
        })
        .await
        {
            report.fail(format!("kill {k}: {e:#}"));
        }
        let (sl, dl, dd, examples) = audit(&api, &fleet, &bundles).await?;
        quiet_tx.send_replace(false);
        status_lost += sl;
        drift_lost += dl;
        drift_dup += dd;
        if sl + dl + dd > 0 {
            report.fail(format!(
                "kill {k}: {sl} acknowledged statuses lost, {dl} drift events lost, {dd} duplicated; e.g. {}",
                examples.join("; ")
            ));
        }
        rounds += 1;
    }

    let shrunk: usize = fleet.iter().map(|o| lock(o).shrunk.len()).sum();
    let shrunk_agents = fleet.iter().filter(|o| !lock(o).shrunk.is_empty()).count();
    if shrunk > 0 {
        let example = fleet
            .iter()
            .enumerate()
            .find_map(|(i, o)| {
                lock(o)
                    .shrunk
                    .first()
                    .map(|s| format!("sim-{i:05}: {} -> {} bundles", s.0, s.1))
            })
            .unwrap_or_default();
        report.fail(format!(
            "{shrunk} Desired sets to {shrunk_agents} agents left out bundles Git still has \
             (a real agent prunes them), e.g. {example}; hub logs in {}",
            hub.dir.display()
        ));
    }
    let statuses: usize = fleet.iter().map(|o| lock(o).statuses.len()).sum();
    let drift: usize = fleet.iter().map(|o| lock(o).drift.len()).sum();
    reconnect_ms.sort_by(f64::total_cmp);
    after_up_ms.sort_by(f64::total_cmp);
    downtime_ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64]| {
        format!(
            "{:.1} s / {:.1} s / {:.1} s",
            percentile(v, 50.0) / 1000.0,
            percentile(v, 99.0) / 1000.0,
            v.last().copied().unwrap_or(0.0) / 1000.0
        )
    };
    report.figure("simulated agents", n);
    report.figure(
        "kills survived",
        format!("{rounds} of {kills} ({fanout_kills} during a commit's fan-out)"),
    );
    if !fanout_partial.is_empty() {
        report.figure(
            "agents holding the new commit when killed during fan-out",
            format!("{fanout_partial:?}"),
        );
    }
    report.figure(
        "first connection of the whole fleet (enrol + session)",
        format!("{:.1} s", connected_in.as_secs_f64()),
    );
    report.figure(
        "hub kill to listening again (p50 / p99 / max)",
        pct(&downtime_ms),
    );
    report.figure("kill to agent back (p50 / p99 / max)", pct(&reconnect_ms));
    report.figure(
        "hub listening to agent back (p50 / p99 / max)",
        pct(&after_up_ms),
    );
    report.figure("peak reconnects in any 1 s", peak_1s);
    report.figure("peak reconnects in any 100 ms", peak_100ms);
    report.figure("peak dial attempts in any 1 s", peak_attempts_1s);
    report.figure(
        "statuses made / drift events made",
        format!("{statuses} / {drift}"),
    );
    report.figure("acknowledged statuses lost", status_lost);
    report.figure("acknowledged drift events lost", drift_lost);
    report.figure("drift events duplicated", drift_dup);
    report.figure("Desired sets that left out bundles Git has", shrunk);
    report.note(format!(
        "backoff: the agent crate's `session::backoff` ({:?} doubling to {:?}, jitter 50-100 %, never below the minimum), as the simulated agents use it",
        flotilla_agent::session::BACKOFF_MIN,
        flotilla_agent::session::BACKOFF_MAX
    ));
    if !full() {
        report.note("short run: `make torture` runs 1,000 agents and 20 kills");
    }
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(hub);
    report
        .finish("hub-kill", started)
        .map_err(|e| anyhow!("{e:#}"))
}
