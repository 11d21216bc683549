//! A rollout at scale: 1,000 simulated agents (real enrolment, real mutual TLS,
//! the real session protocol; they apply nothing and report each bundle in the
//! state the test gives its revision) in 10 partitions (`autoPartitionSize:
//! 10%`). A good revision goes partition by partition: no agent of partition k
//! acknowledges it before every agent of partition k-1 has. A bad revision
//! (reported ErrApplied) stops after partition one and, with `onFailure:
//! rollback`, partition one returns to the good revision: no agent beyond it
//! ever acknowledges the bad one, and every agent ends on the good one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flotilla_proto::v1::BundleState;
use flotilla_tests::sim::{self, Event};
use flotilla_tests::torture::{scale, HubApi};
use flotilla_tests::*;
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::transport::Uri;

const FLEET_YAML: &str = "defaultNamespace: sim\nrolloutStrategy:\n  autoPartitionSize: 10%\n  progressDeadline: 60s\n  onFailure: rollback\n";

fn cm(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  value: \"{value}\"\n"
    )
}

/// Per agent, each revision it acknowledged with when it first did.
type Acks = Arc<Mutex<Vec<BTreeMap<String, Instant>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Each agent's latest acknowledged revision.
type Latest = Arc<Mutex<Vec<String>>>;

async fn wait_all(latest: &Latest, what: &str, revision: &str, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let behind = lock(latest).iter().filter(|r| *r != revision).count();
        if behind == 0 {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{what}: {behind} agents not on {revision} after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clusters_in_ten_partitions_progress_halt_and_roll_back() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let n: usize = scale("ROLLOUT_AGENTS", 1000, 1000);
    let per_partition = n / 10;
    let dir = test_dir("rollout-scale")?;
    let repo = GitRepo::new(dir.path(), "fleet")?;
    let good = repo.commit(
        &BTreeMap::from([
            ("app/fleet.yaml", Some(FLEET_YAML)),
            ("app/cm.yaml", Some(cm("good").as_str())),
        ]),
        "good",
    )?;
    let hub = tokio::task::block_in_place(|| {
        Hub::start_logging(&dir.path().join("hub"), free_port(), free_port(), "info")
    })?;
    let api = HubApi::new(&hub);
    let tokens = api.tokens(n, 8).await?;
    let uri: Uri = hub.agent_url.parse()?;
    let ca_pem = sim::fetch_ca(&uri, &tokens[0]).await?;
    let anonymous = flotilla_agent::transport::anonymous_config(&ca_pem)?;
    let bad: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
    let verdict: sim::Verdict = {
        let bad = bad.clone();
        Arc::new(move |rev: &str| {
            if *lock(&bad) == rev {
                BundleState::ErrApplied
            } else {
                BundleState::Ready
            }
        })
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    let permits = Arc::new(Semaphore::new(16));
    for (i, token) in tokens.into_iter().enumerate() {
        let (uri, anonymous, ca_pem, permits, events, stop, verdict) = (
            uri.clone(),
            anonymous.clone(),
            ca_pem.clone(),
            permits.clone(),
            events_tx.clone(),
            stop_rx.clone(),
            verdict.clone(),
        );
        tokio::spawn(async move {
            let name = format!("sim-{i:04}");
            let tls = {
                let _p = permits.acquire().await;
                match sim::enrol(&uri, anonymous, &ca_pem, &token, &name).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = events.send(Event::Failed {
                            agent: i,
                            error: format!("enrolling: {e:#}"),
                        });
                        return;
                    }
                }
            };
            sim::session_with(i, uri, tls, false, events, stop, verdict).await;
        });
    }
    drop(events_tx);
    let acks: Acks = Arc::new(Mutex::new(vec![BTreeMap::new(); n]));
    let latest: Latest = Arc::new(Mutex::new(vec![String::new(); n]));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let collector = {
        let (acks, latest, failures) = (acks.clone(), latest.clone(), failures.clone());
        tokio::spawn(async move {
            while let Some(e) = events_rx.recv().await {
                match e {
                    Event::Acked {
                        agent,
                        revision,
                        at,
                        ..
                    } => {
                        lock(&acks)[agent].entry(revision.clone()).or_insert(at);
                        lock(&latest)[agent] = revision;
                    }
                    Event::Failed { agent, error } => {
                        lock(&failures).push(format!("sim-{agent:04}: {error}"))
                    }
                }
            }
        })
    };
    // Every agent enrolled and connected (it acknowledged its first, empty, set)
    // before the source exists: partitions are cut over the fleet as it is.
    let start = Instant::now();
    while lock(&acks).iter().any(|a| !a.contains_key("")) {
        if start.elapsed() > Duration::from_secs(300) {
            bail!("not every agent connected: {:?}", lock(&failures).first());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::block_in_place(|| {
        hub.cli(&[
            "source", "add", "fleet", "--repo", &repo.url, "--path", "app", "--poll", "1s",
        ])
    })?;

    // The good revision, partition by partition.
    wait_all(&latest, "first rollout", &good, Duration::from_secs(300)).await?;
    if let Some(f) = lock(&failures).first() {
        bail!("an agent failed: {f}");
    }
    {
        let acks = lock(&acks);
        for k in 1..10 {
            let prev_last = (0..per_partition)
                .map(|j| acks[(k - 1) * per_partition + j][&good])
                .max()
                .unwrap();
            let first = (0..per_partition)
                .map(|j| acks[k * per_partition + j][&good])
                .min()
                .unwrap();
            assert!(
                first >= prev_last,
                "an agent of partition {k} got the revision before partition {} had it all",
                k - 1
            );
        }
    }
    let status = tokio::task::block_in_place(|| {
        wait_until(
            "the first rollout completed",
            Duration::from_secs(120),
            || {
                let s = hub.cli_json(&["rollout", "status", "fleet-app"])?;
                Ok((s["phase"] == "Completed").then_some(s))
            },
        )
    })?;
    assert_eq!(status["partitions"].as_array().map(Vec::len), Some(10));

    // A bad revision: partition one fails, halts the rollout and rolls back.
    let started = Instant::now();
    let bad_rev = {
        // The verdict must know the revision before any agent reports on it:
        // commit, then publish the id before the hub's next poll could see it
        // (the poll is 1 s; a report on the unknown id would say Ready, which
        // only delays the failure to the deadline).
        let r = repo.commit(
            &BTreeMap::from([("app/cm.yaml", Some(cm("bad").as_str()))]),
            "bad",
        )?;
        *lock(&bad) = r.clone();
        r
    };
    let rolled_back = tokio::task::block_in_place(|| {
        wait_until("the rollout rolled back", Duration::from_secs(120), || {
            let s = hub.cli_json(&["rollout", "status", "fleet-app"])?;
            Ok((s["phase"] == "RolledBack").then_some(s))
        })
    })?;
    wait_all(
        &latest,
        "after the rollback",
        &good,
        Duration::from_secs(120),
    )
    .await?;
    let took = started.elapsed();
    {
        let acks = lock(&acks);
        let got_bad: Vec<usize> = (0..n).filter(|i| acks[*i].contains_key(&bad_rev)).collect();
        assert!(!got_bad.is_empty(), "partition one got the bad revision");
        assert!(
            got_bad.iter().all(|i| *i < per_partition),
            "only partition one ever acknowledged the bad revision, not {:?}",
            got_bad
                .iter()
                .filter(|i| **i >= per_partition)
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(rolled_back["previous"].as_str(), Some(good.as_str()));
    eprintln!(
        "rollout at {n} agents: bad revision detected, halted and rolled back on partition one in {took:?}"
    );
    stop_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), collector).await;
    Ok(())
}
