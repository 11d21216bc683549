//! `flotilla-bench`: runs one benchmark part and writes its results as JSON, or
//! turns the results into BENCHMARKS.md. Parts: `hub` (capacity and
//! commit-to-fleet latency with simulated agents, polling), `fleet` (commit to
//! fleet by push webhook), `wire` (bytes the hub sends for a one-line change),
//! `agent`, `git`, `planner` (the rollout planner's time per step), `ui` (the
//! web UI's pages and `/metrics` at fleet scale), `report`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use flotilla_bench::cluster;
use flotilla_bench::hubproc::BenchHub;
use flotilla_bench::proxy::CountingProxy;
use flotilla_bench::report::{
    AgentRun, CommitLatency, FleetRun, GitRun, HubRun, LargeRun, ReconnectRun, WireRun,
};
use flotilla_bench::sim::{self, Event};
use flotilla_bench::{procstat, report, stats};
use flotilla_tests::GitRepo;
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::transport::Uri;

/// Flotilla's benchmarks. Each part writes `RESULTS/<part>.json`; `report` turns
/// them into BENCHMARKS.md. Numbers are measured, never enforced.
#[derive(Debug, Parser)]
struct Args {
    /// Directory for the results (JSON, one file per part).
    #[arg(long, env = "FLOTILLA_BENCH_RESULTS", default_value = "bench/results")]
    results: PathBuf,
    #[command(subcommand)]
    part: Part,
}

#[derive(Debug, Subcommand)]
enum Part {
    /// Hub capacity (memory, CPU, fds, time to enrol and connect) and commit-to-fleet
    /// latency, with N simulated agents.
    Hub {
        /// Agent counts, comma-separated.
        #[arg(
            long,
            env = "FLOTILLA_BENCH_AGENTS",
            value_delimiter = ',',
            default_value = "100,1000,5000,10000"
        )]
        agents: Vec<usize>,
        /// Repetitions per count.
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
        /// Enrolments in flight at once.
        #[arg(long, env = "FLOTILLA_BENCH_CONCURRENCY", default_value_t = 64)]
        concurrency: usize,
        /// Seconds over which steady-state CPU is measured.
        #[arg(long, env = "FLOTILLA_BENCH_CPU_WINDOW", default_value_t = 15)]
        cpu_window: u64,
    },
    /// Commit to fleet by webhook: a source polled hourly, a commit, a signed GitHub
    /// push hook right after it; time until every simulated agent acked the commit.
    Fleet {
        /// Agent counts, comma-separated.
        #[arg(
            long,
            env = "FLOTILLA_BENCH_AGENTS",
            value_delimiter = ',',
            default_value = "1000,10000"
        )]
        agents: Vec<usize>,
        /// Repetitions per count (a fresh hub and fleet each).
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
        /// Enrolments in flight at once.
        #[arg(long, env = "FLOTILLA_BENCH_CONCURRENCY", default_value_t = 64)]
        concurrency: usize,
    },
    /// Mass reconnect: N simulated agents connected (each redialling with the
    /// agent's jittered backoff), the hub killed (`kill -9`) and started again
    /// on the same data and ports; time until every agent has its desired set
    /// from the new hub, and the kernel's listen-queue overflows meanwhile.
    Reconnect {
        /// Agent counts, comma-separated.
        #[arg(
            long,
            env = "FLOTILLA_BENCH_AGENTS",
            value_delimiter = ',',
            default_value = "10000"
        )]
        agents: Vec<usize>,
        /// Repetitions per count (a fresh hub and fleet each).
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
        /// Enrolments in flight at once.
        #[arg(long, env = "FLOTILLA_BENCH_CONCURRENCY", default_value_t = 64)]
        concurrency: usize,
    },
    /// Bytes the hub sends one agent for a one-line change in a bundle of many objects.
    Wire {
        /// Objects in the bundle.
        #[arg(long, env = "FLOTILLA_BENCH_OBJECTS", default_value_t = 500)]
        objects: usize,
        /// Repetitions per variant.
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
    },
    /// A real agent on a real test cluster: first apply of BUNDLES × OBJECTS objects
    /// against `kubectl apply --server-side`, then the idle agent's RSS and CPU.
    Agent {
        /// Bundles.
        #[arg(long, env = "FLOTILLA_BENCH_BUNDLES", default_value_t = 10)]
        bundles: usize,
        /// Objects per bundle.
        #[arg(long, env = "FLOTILLA_BENCH_PER_BUNDLE", default_value_t = 100)]
        per_bundle: usize,
        /// Repetitions.
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
    },
    /// One large bundle (OBJECTS ConfigMaps of BYTES each, 5,000 × 10,000 by
    /// default: about 50 MiB) from a Git commit to Ready on a real test cluster,
    /// with the hub's and the agent's peak memory.
    Large {
        /// ConfigMaps in the bundle.
        #[arg(long, env = "FLOTILLA_BENCH_OBJECTS", default_value_t = 5_000)]
        objects: usize,
        /// Bytes of data per ConfigMap.
        #[arg(long, env = "FLOTILLA_BENCH_OBJECT_BYTES", default_value_t = 10_000)]
        bytes: usize,
        /// Repetitions (a fresh cluster, hub and agent each).
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
    },
    /// Git: fetch and render of a repository with many bundle directories, cold and
    /// after a one-bundle commit, against `git clone` and `git fetch`.
    Git {
        /// Bundle directories.
        #[arg(long, env = "FLOTILLA_BENCH_BUNDLES", default_value_t = 200)]
        bundles: usize,
        /// Repetitions.
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
    },
    /// Two builds side by side: writes the `compare` block of the report from the
    /// results of the same parts run for a base and a new build.
    Compare {
        /// Results of the base build.
        #[arg(long)]
        base: PathBuf,
        /// Results of the new build.
        #[arg(long)]
        new: PathBuf,
        /// What the base build is (e.g. its commit).
        #[arg(long)]
        base_label: String,
        /// What the new build is.
        #[arg(long)]
        new_label: String,
        /// The Markdown file to write.
        #[arg(long, env = "FLOTILLA_BENCH_REPORT", default_value = "BENCHMARKS.md")]
        out: PathBuf,
    },
    /// The rollout planner: `rollout::step` time per call over a whole simulated
    /// rollout in 10 partitions, at each cluster count.
    Planner {
        /// Cluster counts, comma-separated.
        #[arg(
            long,
            env = "FLOTILLA_BENCH_CLUSTERS",
            value_delimiter = ',',
            default_value = "1000,10000"
        )]
        clusters: Vec<usize>,
        /// Repetitions per count.
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
        /// Extra timed calls of one mid-rollout step, per run.
        #[arg(long, env = "FLOTILLA_BENCH_REPEAT", default_value_t = 200)]
        repeat: usize,
    },
    /// The web UI's server time (overview, matrix, cluster and bundle pages) and
    /// `/metrics`' size and scrape time, at CLUSTERS × BUNDLES, in process.
    Ui {
        /// Simulated clusters.
        #[arg(long, env = "FLOTILLA_BENCH_UI_CLUSTERS", default_value_t = 10_000)]
        clusters: usize,
        /// Bundles, each on every cluster.
        #[arg(long, env = "FLOTILLA_BENCH_UI_BUNDLES", default_value_t = 50)]
        bundles: usize,
        /// Repetitions (a fresh hub and fleet each).
        #[arg(long, env = "FLOTILLA_BENCH_RUNS", default_value_t = 3)]
        runs: usize,
        /// Timed requests per page and run.
        #[arg(long, env = "FLOTILLA_BENCH_REPEAT", default_value_t = 30)]
        repeat: usize,
    },
    /// Writes BENCHMARKS.md and the figures from the results.
    Report {
        /// The Markdown file to write.
        #[arg(long, env = "FLOTILLA_BENCH_REPORT", default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// The SVG of hub memory against agents.
        #[arg(
            long,
            env = "FLOTILLA_BENCH_FIGURE",
            default_value = "docs/bench/hub-memory.svg"
        )]
        figure: PathBuf,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    // reqwest (for the hub API) and the agents' TLS use ring; never aws-lc-rs.
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(&args.results)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.part {
        Part::Hub {
            agents,
            runs,
            concurrency,
            cpu_window,
        } => {
            let path = args.results.join("hub.json");
            let mut all: Vec<HubRun> = report::load(&path).unwrap_or_default();
            for &n in &agents {
                // Fresh numbers for this count replace old ones.
                all.retain(|r| r.agents != n);
                for run in 1..=runs {
                    eprintln!("hub: {n} agents, run {run}/{runs}");
                    let r =
                        rt.block_on(hub_run(n, concurrency, Duration::from_secs(cpu_window)))?;
                    eprintln!("  {r:?}");
                    all.push(r);
                    report::save(&path, &all)?;
                }
            }
        }
        Part::Fleet {
            agents,
            runs,
            concurrency,
        } => {
            let path = args.results.join("fleet.json");
            let mut all: Vec<FleetRun> = report::load(&path).unwrap_or_default();
            for &n in &agents {
                all.retain(|r| r.agents != n);
                for run in 1..=runs {
                    eprintln!("fleet: {n} agents by webhook, run {run}/{runs}");
                    let r = rt.block_on(fleet_run(n, concurrency))?;
                    eprintln!("  {r:?}");
                    all.push(r);
                    report::save(&path, &all)?;
                }
            }
        }
        Part::Reconnect {
            agents,
            runs,
            concurrency,
        } => {
            let path = args.results.join("reconnect.json");
            let mut all: Vec<ReconnectRun> = report::load(&path).unwrap_or_default();
            for &n in &agents {
                all.retain(|r| r.agents != n);
                for run in 1..=runs {
                    eprintln!("reconnect: {n} agents after a hub kill -9, run {run}/{runs}");
                    let r = rt.block_on(reconnect_run(n, concurrency))?;
                    eprintln!("  {r:?}");
                    all.push(r);
                    report::save(&path, &all)?;
                }
            }
        }
        Part::Wire { objects, runs } => {
            let path = args.results.join("wire.json");
            let mut all = Vec::new();
            // Side by side in one run: the v1 agent without and with gzip,
            // and one that speaks "object-deltas".
            for (gzip, deltas) in [(false, false), (true, false), (true, true)] {
                for run in 1..=runs {
                    eprintln!(
                        "wire: {objects} objects, gzip {gzip}, deltas {deltas}, run {run}/{runs}"
                    );
                    let r = rt.block_on(wire_run(objects, gzip, deltas))?;
                    eprintln!("  {r:?}");
                    all.push(r);
                    report::save(&path, &all)?;
                }
            }
        }
        Part::Agent {
            bundles,
            per_bundle,
            runs,
        } => {
            let path = args.results.join("agent.json");
            let mut all: Vec<AgentRun> = report::load(&path).unwrap_or_default();
            all.retain(|r| r.objects != bundles * (per_bundle + 1));
            for run in 1..=runs {
                eprintln!("agent: {bundles} bundles x {per_bundle} objects, run {run}/{runs}");
                // A fresh cluster per run: objects and pods of earlier runs would
                // slow the API server down run after run.
                let root = tempfile::Builder::new()
                    .prefix("flotilla-bench-agent-")
                    .tempdir()?;
                let cluster =
                    flotilla_tests::TestCluster::start("bench", &root.path().join("cluster"))?;
                let r = rt.block_on(agent_run(&cluster, run, bundles, per_bundle))?;
                drop(cluster);
                eprintln!("  {r:?}");
                all.push(r);
                report::save(&path, &all)?;
            }
        }
        Part::Large {
            objects,
            bytes,
            runs,
        } => {
            let path = args.results.join("large.json");
            let mut all: Vec<LargeRun> = report::load(&path).unwrap_or_default();
            all.retain(|r| (r.objects, r.object_bytes) != (objects, bytes));
            for run in 1..=runs {
                eprintln!("large: {objects} ConfigMaps of {bytes} bytes, run {run}/{runs}");
                let root = tempfile::Builder::new()
                    .prefix("flotilla-bench-large-")
                    .tempdir()?;
                let cluster =
                    flotilla_tests::TestCluster::start("bench", &root.path().join("cluster"))?;
                let r = rt.block_on(large_run(&cluster, run, objects, bytes))?;
                drop(cluster);
                eprintln!("  {r:?}");
                all.push(r);
                report::save(&path, &all)?;
            }
        }
        Part::Git { bundles, runs } => {
            let path = args.results.join("git.json");
            let mut all = Vec::new();
            for run in 1..=runs {
                eprintln!("git: {bundles} bundle directories, run {run}/{runs}");
                let r = rt.block_on(git_run(bundles))?;
                eprintln!("  {r:?}");
                all.push(r);
                report::save(&path, &all)?;
            }
        }
        Part::Planner {
            clusters,
            runs,
            repeat,
        } => {
            let path = args.results.join("planner.json");
            let mut all: Vec<report::PlannerRun> = report::load(&path).unwrap_or_default();
            for &n in &clusters {
                all.retain(|r| r.clusters != n);
                for run in 1..=runs {
                    eprintln!("planner: {n} clusters, run {run}/{runs}");
                    let r = flotilla_bench::planner::run(n, repeat);
                    eprintln!("  {r:?}");
                    if !r.completed {
                        bail!("planner: the simulated rollout of {n} clusters did not complete");
                    }
                    all.push(r);
                    report::save(&path, &all)?;
                }
            }
        }
        Part::Ui {
            clusters,
            bundles,
            runs,
            repeat,
        } => {
            let path = args.results.join("ui.json");
            let mut all: Vec<report::UiRun> = report::load(&path).unwrap_or_default();
            all.retain(|r| (r.clusters, r.bundles) != (clusters, bundles));
            for run in 1..=runs {
                eprintln!("ui: {clusters} clusters × {bundles} bundles, run {run}/{runs}");
                let r = rt.block_on(flotilla_bench::ui::run(clusters, bundles, repeat))?;
                eprintln!("  {r:?}");
                all.push(r);
                report::save(&path, &all)?;
            }
        }
        Part::Report { out, figure } => report::write(&args.results, &out, &figure)?,
        Part::Compare {
            base,
            new,
            base_label,
            new_label,
            out,
        } => {
            let rows = flotilla_bench::compare::rows(&base, &new);
            if rows.is_empty() {
                bail!(
                    "no part has results in both {} and {}",
                    base.display(),
                    new.display()
                );
            }
            let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let body = format!(
                "Generated {date} on: {}. Both builds ran in this session, part by part \
                 alternating (base, new, base, new, ...), on an otherwise idle machine.\n\n{}",
                procstat::machine(),
                flotilla_bench::compare::table(&base_label, &new_label, &rows)
            );
            report::write_block(&out, "compare", &body)?;
        }
    }
    Ok(())
}

fn config_map(name: &str, value: &str, pad: usize) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  labels:\n    app: bench\ndata:\n  value: \"{value}\"\n"
    );
    for i in 0..pad {
        s.push_str(&format!(
            "  key{i}: \"some configuration value number {i} of {name}\"\n"
        ));
    }
    s
}

/// Collects agents' events until `n` distinct agents acked `revision`; returns each
/// agent's ack time. Fails on the first session failure or after `deadline`.
async fn wait_acks(
    events: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    revision: &str,
    deadline: Duration,
) -> Result<(BTreeMap<usize, Instant>, usize)> {
    let mut acked = BTreeMap::new();
    let mut bytes = 0;
    let end = tokio::time::Instant::now() + deadline;
    while acked.len() < n {
        match tokio::time::timeout_at(end, events.recv()).await {
            Ok(Some(Event::Acked {
                agent,
                revision: r,
                at,
                desired_bytes,
            })) => {
                if r == revision {
                    acked.entry(agent).or_insert(at);
                    bytes = desired_bytes;
                }
            }
            Ok(Some(Event::Failed { agent, error })) => bail!("agent {agent}: {error}"),
            Ok(None) => bail!("event channel closed"),
            Err(_) => bail!(
                "{} of {n} agents acked {revision} within {deadline:?}",
                acked.len()
            ),
        }
    }
    Ok((acked, bytes))
}

/// Starts one simulated agent per token against `hub` (`concurrency` enrolments in
/// flight) and waits until every one has acked `revision`. Returns the agents'
/// events, the switch that stops them, and the seconds from cold to all acked.
async fn connect_fleet(
    hub: &BenchHub,
    tokens: Vec<String>,
    concurrency: usize,
    revision: &str,
) -> Result<(mpsc::UnboundedReceiver<Event>, watch::Sender<bool>, f64)> {
    connect_fleet_with(hub, tokens, concurrency, revision, false).await
}

/// [`connect_fleet`]; with `reconnecting`, each agent redials after a failed
/// session, as the real agent does.
async fn connect_fleet_with(
    hub: &BenchHub,
    tokens: Vec<String>,
    concurrency: usize,
    revision: &str,
    reconnecting: bool,
) -> Result<(mpsc::UnboundedReceiver<Event>, watch::Sender<bool>, f64)> {
    let n = tokens.len();
    let uri: Uri = hub.agent_url.parse()?;
    let ca_pem = sim::fetch_ca(&uri, &tokens[0]).await?;
    let anonymous = flotilla_agent::transport::anonymous_config(&ca_pem)?;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(concurrency));

    // From cold: every agent enrols with its token, then opens its session.
    let t = Instant::now();
    for (i, token) in tokens.into_iter().enumerate() {
        let (uri, anonymous, ca_pem, ev_tx, stop_rx, permits) = (
            uri.clone(),
            anonymous.clone(),
            ca_pem.clone(),
            ev_tx.clone(),
            stop_rx.clone(),
            permits.clone(),
        );
        tokio::spawn(async move {
            let name = format!("sim-{i:05}");
            let tls = {
                let _permit = permits.acquire().await;
                match sim::enrol(&uri, anonymous, &ca_pem, &token, &name).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = ev_tx.send(Event::Failed {
                            agent: i,
                            error: format!("{e:#}"),
                        });
                        return;
                    }
                }
            };
            if reconnecting {
                sim::session_reconnecting(i, uri, tls, ev_tx, stop_rx).await;
            } else {
                sim::session(i, uri, tls, false, ev_tx, stop_rx).await;
            }
        });
    }
    let deadline = Duration::from_secs(60 + n as u64 / 20);
    wait_acks(&mut ev_rx, n, revision, deadline).await?;
    Ok((ev_rx, stop_tx, t.elapsed().as_secs_f64()))
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in /proc/net/netstat), machine-wide.
fn listen_overflows() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no TcpExt in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .map(|(_, v)| v.parse::<u64>())
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("no ListenOverflows in /proc/net/netstat"))
}

/// Mass reconnect: N agents connected, the hub killed and started again on
/// the same data and ports, until every agent acked a desired set of the new hub.
async fn reconnect_run(n: usize, concurrency: usize) -> Result<ReconnectRun> {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-reconnect-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "fleet")?;
    let r1 = repo.commit(
        &[("app/cm.yaml", Some(config_map("bench", "v1", 4).as_str()))].into(),
        "first",
    )?;
    let mut hub = BenchHub::start(&dir.path().join("hub")).await?;
    hub.add_source("fleet", &repo.url, &["app"], "1h").await?;
    hub.wait_bundles(1, Some(&r1), Duration::from_secs(60))
        .await?;
    let tokens = hub.tokens(n, 8).await?;
    let (mut ev_rx, stop_tx, _) = connect_fleet_with(&hub, tokens, concurrency, &r1, true).await?;
    // Statuses of the first delivery settle; then nothing is in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while ev_rx.try_recv().is_ok() {}

    let overflows = listen_overflows()?;
    let t = Instant::now();
    hub.restart().await?;
    let restart_s = t.elapsed().as_secs_f64();
    // Every agent acks the set the restarted hub sends it; failed redials (the
    // hub down, or not yet accepting) are counted, not fatal.
    let mut acked: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut failed = 0usize;
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked.len() < n {
        match tokio::time::timeout_at(end, ev_rx.recv()).await {
            Ok(Some(Event::Acked { agent, at, .. })) => {
                acked.entry(agent).or_insert(at);
            }
            Ok(Some(Event::Failed { .. })) => failed += 1,
            Ok(None) => bail!("event channel closed"),
            Err(_) => bail!(
                "{} of {n} agents were back within 120 s of the restart",
                acked.len()
            ),
        }
    }
    let back = latency(&acked, t);
    let listen_overflows = listen_overflows()?.saturating_sub(overflows);
    let rss_kib = procstat::rss_kib(hub.pid())?;
    hub.proc.kill9();
    let _ = stop_tx.send(true);
    drop(ev_rx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(ReconnectRun {
        agents: n,
        restart_s,
        back,
        failed_sessions: failed,
        listen_overflows,
        rss_kib,
    })
}

/// Per-agent latency from `t` to each agent's ack.
fn latency(acks: &BTreeMap<usize, Instant>, t: Instant) -> CommitLatency {
    let mut lat: Vec<f64> = acks
        .values()
        .map(|at| at.saturating_duration_since(t).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    CommitLatency {
        median_ms: stats::percentile(&lat, 50.0),
        p99_ms: stats::percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
    }
}

/// Commit to fleet by webhook: a source polled hourly, N agents connected, a
/// commit, then a signed GitHub push hook posted right after it.
async fn fleet_run(n: usize, concurrency: usize) -> Result<FleetRun> {
    const SECRET: &str = "bench-hook-secret";
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-fleet-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "fleet")?;
    let r1 = repo.commit(
        &[("app/cm.yaml", Some(config_map("bench", "v1", 4).as_str()))].into(),
        "first",
    )?;
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n"))?;
    let secret_arg = secret_file.to_string_lossy().into_owned();
    let hub = BenchHub::start_with(
        &dir.path().join("hub"),
        &["--webhook-secret-file", &secret_arg],
    )
    .await?;
    // Added sources are fetched at once; after that only every hour, or on a hook.
    hub.add_source("fleet", &repo.url, &["app"], "1h").await?;
    hub.wait_bundles(1, Some(&r1), Duration::from_secs(60))
        .await?;
    let tokens = hub.tokens(n, 8).await?;
    let (mut ev_rx, stop_tx, connect_s) = connect_fleet(&hub, tokens, concurrency, &r1).await?;
    // Let the statuses of the first delivery settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let r2 = repo.commit(
        &[("app/cm.yaml", Some(config_map("bench", "v2", 4).as_str()))].into(),
        "second",
    )?;
    let t = Instant::now();
    let triggered = hub
        .github_push(SECRET, &repo.url, "refs/heads/main")
        .await?;
    let hook_ms = t.elapsed().as_secs_f64() * 1000.0;
    if triggered != ["fleet"] {
        bail!("the hook woke {triggered:?}, not the source");
    }
    let (acks, _) = wait_acks(&mut ev_rx, n, &r2, Duration::from_secs(300)).await?;
    let commit = latency(&acks, t);

    let mut hub = hub;
    hub.proc.kill9();
    let _ = stop_tx.send(true);
    drop(ev_rx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(FleetRun {
        agents: n,
        trigger: "webhook".into(),
        connect_s,
        hook_ms,
        commit,
    })
}

async fn hub_run(n: usize, concurrency: usize, cpu_window: Duration) -> Result<HubRun> {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-hub-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "fleet")?;
    let r1 = repo.commit(
        &[("app/cm.yaml", Some(config_map("bench", "v1", 4).as_str()))].into(),
        "first",
    )?;
    let hub = BenchHub::start(&dir.path().join("hub")).await?;
    hub.add_source("fleet", &repo.url, &["app"], "1s").await?;
    hub.wait_bundles(1, Some(&r1), Duration::from_secs(60))
        .await?;
    let pid = hub.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_rss_kib = procstat::rss_kib(pid)?;

    let t = Instant::now();
    let tokens = hub.tokens(n, 8).await?;
    let tokens_s = t.elapsed().as_secs_f64();

    let (mut ev_rx, stop_tx, connect_s) = connect_fleet(&hub, tokens, concurrency, &r1).await?;

    // Steady state: all connected, heartbeats flowing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu0 = procstat::cpu_seconds(pid)?;
    let w = Instant::now();
    tokio::time::sleep(cpu_window).await;
    let cpu_pct = 100.0 * (procstat::cpu_seconds(pid)? - cpu0) / w.elapsed().as_secs_f64();
    let rss_kib = procstat::rss_kib(pid)?;
    let fds = procstat::fd_count(pid)?;

    // A commit touching the one bundle every agent runs, found by a 1 s poll.
    let r2 = repo.commit(
        &[("app/cm.yaml", Some(config_map("bench", "v2", 4).as_str()))].into(),
        "second",
    )?;
    let t = Instant::now();
    let (acks, _) = wait_acks(&mut ev_rx, n, &r2, Duration::from_secs(300)).await?;
    let commit = latency(&acks, t);
    let rss_after_commit_kib = procstat::rss_kib(pid)?;

    let mut hub = hub;
    if std::env::var_os("FLOTILLA_BENCH_HUB_WRAPPER").is_some() {
        // A profiler wants the process to end on its own.
        hub.proc.stop();
    } else {
        hub.proc.kill9();
    }
    let _ = stop_tx.send(true);
    drop(ev_rx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(HubRun {
        agents: n,
        tokens_s,
        connect_s,
        baseline_rss_kib,
        rss_kib,
        rss_after_commit_kib,
        fds,
        cpu_pct,
        commit,
    })
}

async fn wire_run(objects: usize, gzip: bool, deltas: bool) -> Result<WireRun> {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-wire-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "big")?;
    let files: Vec<(String, String)> = (0..objects)
        .map(|i| {
            (
                format!("big/cm-{i:04}.yaml"),
                config_map(&format!("cm-{i:04}"), "v1", 8),
            )
        })
        .collect();
    let r1 = repo.commit(
        &files
            .iter()
            .map(|(p, c)| (p.as_str(), Some(c.as_str())))
            .collect(),
        "first",
    )?;
    let object_yaml_bytes = files[objects / 2].1.len();
    let hub = BenchHub::start(&dir.path().join("hub")).await?;
    hub.add_source("wire", &repo.url, &["big"], "1s").await?;
    hub.wait_bundles(1, Some(&r1), Duration::from_secs(60))
        .await?;
    let tokens = hub.tokens(1, 1).await?;
    let proxy = CountingProxy::start(hub.agent_port).await?;
    let uri: Uri = format!("https://127.0.0.1:{}", proxy.port).parse()?;
    let ca_pem = sim::fetch_ca(&uri, &tokens[0]).await?;
    let tls = sim::enrol(
        &uri,
        flotilla_agent::transport::anonymous_config(&ca_pem)?,
        &ca_pem,
        &tokens[0],
        "wire-1",
    )
    .await?;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (d_before_session, _) = proxy.counts();
    if deltas {
        tokio::spawn(sim::session_speaking(
            0,
            uri,
            tls,
            flotilla_proto::features::ALL,
            ev_tx,
            stop_rx,
        ));
    } else {
        tokio::spawn(sim::session(0, uri, tls, gzip, ev_tx, stop_rx));
    }
    let (_, initial_desired_bytes) = wait_acks(&mut ev_rx, 1, &r1, Duration::from_secs(60)).await?;
    // Let the status and its ack pass before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (d0, _) = proxy.counts();
    let changed = files[objects / 2]
        .1
        .replace("value: \"v1\"", "value: \"v2\"");
    let r2 = repo.commit(
        &[(files[objects / 2].0.as_str(), Some(changed.as_str()))].into(),
        "one line",
    )?;
    let (_, change_desired_bytes) = wait_acks(&mut ev_rx, 1, &r2, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (d1, _) = proxy.counts();
    let _ = stop_tx.send(true);
    let mut hub = hub;
    hub.proc.kill9();
    Ok(WireRun {
        objects,
        gzip,
        features: if deltas {
            flotilla_proto::features::OBJECT_DELTAS.into()
        } else {
            String::new()
        },
        object_yaml_bytes,
        initial_desired_bytes,
        initial_wire_bytes: d0 - d_before_session,
        change_desired_bytes,
        change_wire_bytes: d1 - d0,
    })
}

/// One large bundle from a commit to Ready on `kube`: the hub renders it (or
/// refuses it: a build with a cap below its size), a release agent applies it.
async fn large_run(
    kube: &flotilla_tests::TestCluster,
    run: usize,
    objects: usize,
    bytes: usize,
) -> Result<LargeRun> {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-large-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "apps")?;
    let ns = format!("bench-large-{run}");
    let files = flotilla_tests::big::bundle("big", &ns, objects, bytes, 100);
    let yaml_bytes: usize = files.values().map(String::len).sum();
    let r1 = repo.commit(
        &files
            .iter()
            .map(|(p, t)| (p.as_str(), Some(t.as_str())))
            .collect(),
        "a large bundle",
    )?;
    let hub = BenchHub::start(&dir.path().join("hub")).await?;
    let t = Instant::now();
    hub.add_source("apps", &repo.url, &["big"], "1h").await?;
    // Rendered, or refused with the reason.
    let (rendered, refused) = loop {
        let bundles = hub.bundles().await?;
        let b = bundles.first().cloned().unwrap_or_default();
        if let Some(e) = b["error"].as_str() {
            break (None, Some(e.to_string()));
        }
        if b["revision"].as_str() == Some(r1.as_str()) && b["contentHash"].is_string() {
            break (Some(t.elapsed().as_secs_f64()), None);
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the hub neither rendered nor refused the bundle in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = LargeRun {
        objects,
        object_bytes: bytes,
        yaml_bytes,
        render_s: rendered,
        refused,
        ready_s: None,
        apply_s: None,
        hub_peak_kib: 0,
        agent_peak_kib: 0,
    };
    let mut hub = hub;
    if out.refused.is_some() {
        out.hub_peak_kib = procstat::peak_kib(hub.pid())?;
        hub.proc.kill9();
        return Ok(out);
    }
    let token = hub.tokens(1, 1).await?.remove(0);
    let state = dir.path().join("agent");
    std::fs::create_dir_all(&state)?;
    let agent_bin = flotilla_bench::hubproc::bin_dir().join("flotilla-agent");
    let t = Instant::now();
    let mut agent = flotilla_tests::Proc::spawn(
        "flotilla-agent",
        std::process::Command::new(&agent_bin)
            .arg("--hub")
            .arg(&hub.agent_url)
            .arg("--token")
            .arg(&token)
            .arg("--cluster-name")
            .arg(format!("bench-{run}"))
            .arg("--kubeconfig")
            .arg(&kube.kubeconfig)
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info"),
        &dir.path().join("agent.log"),
    )?;
    let name = format!("bench-{run}");
    let deadline = Duration::from_secs(1200);
    loop {
        let v = hub.cluster(&name).await.unwrap_or_default();
        let ready = v["bundles"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["state"] == "Ready"));
        if ready {
            break;
        }
        if t.elapsed() > deadline {
            bail!("not Ready within {deadline:?}: {}", agent.log_text());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out.ready_s = Some(t.elapsed().as_secs_f64());
    let log = agent.log_text();
    let received = cluster::log_times(&log, "desired state received");
    let applied = cluster::log_times(&log, "bundle applied");
    if let (Some(first), Some(last)) = (received.first(), applied.iter().max()) {
        out.apply_s = Some(
            last.duration_since(*first)
                .unwrap_or_default()
                .as_secs_f64(),
        );
    }
    out.hub_peak_kib = procstat::peak_kib(hub.pid())?;
    out.agent_peak_kib = procstat::peak_kib(agent.pid())?;
    agent.stop();
    hub.proc.kill9();
    Ok(out)
}

async fn agent_run(
    kube: &flotilla_tests::TestCluster,
    run: usize,
    bundles: usize,
    per_bundle: usize,
) -> Result<AgentRun> {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-agent-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "apps")?;
    // The same objects for the agent and for kubectl, in namespaces of their own.
    let tree = |prefix: &str| -> Vec<(String, String)> {
        (0..bundles)
            .flat_map(|b| {
                let ns = format!("{prefix}{run}-{b}");
                let mut files = vec![(
                    format!("b{b}/0-ns.yaml"),
                    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
                )];
                files.extend(
                    cluster::bundle_files(&ns, per_bundle)
                        .into_iter()
                        .map(|(p, t)| (format!("b{b}/{p}"), t)),
                );
                files
            })
            .collect()
    };
    let agent_files = tree("bench-a");
    let r1 = repo.commit(
        &agent_files
            .iter()
            .map(|(p, t)| (p.as_str(), Some(t.as_str())))
            .collect(),
        "objects",
    )?;
    let hub = BenchHub::start(&dir.path().join("hub")).await?;
    let paths: Vec<String> = (0..bundles).map(|b| format!("b{b}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    hub.add_source("apps", &repo.url, &paths, "1s").await?;
    hub.wait_bundles(bundles, Some(&r1), Duration::from_secs(60))
        .await?;
    let token = hub.tokens(1, 1).await?.remove(0);
    let state = dir.path().join("agent");
    std::fs::create_dir_all(&state)?;
    // A tracer may wrap the agent (`FLOTILLA_BENCH_AGENT_WRAPPER="strace -f -c -o FILE"`);
    // the readings of such a run are the wrapper's.
    let wrapper = std::env::var("FLOTILLA_BENCH_AGENT_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let agent_bin = flotilla_bench::hubproc::bin_dir().join("flotilla-agent");
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(&agent_bin);
            c
        }
        None => std::process::Command::new(&agent_bin),
    };
    let mut agent = flotilla_tests::Proc::spawn(
        "flotilla-agent",
        cmd.arg("--hub")
            .arg(&hub.agent_url)
            .arg("--token")
            .arg(&token)
            .arg("--cluster-name")
            .arg(format!("bench-{run}"))
            .arg("--kubeconfig")
            .arg(&kube.kubeconfig)
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info"),
        &dir.path().join("agent.log"),
    )?;
    let start = Instant::now();
    let log = loop {
        let log = agent.log_text();
        if cluster::log_times(&log, "bundle applied").len() >= bundles {
            break log;
        }
        if log.contains("bundle not applied") || start.elapsed() > Duration::from_secs(600) {
            bail!("agent did not apply every bundle: {log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let received = cluster::log_times(&log, "desired state received");
    let applied = cluster::log_times(&log, "bundle applied");
    let (Some(first), Some(last)) = (received.first(), applied.iter().max()) else {
        bail!("no timestamps in the agent log: {log}");
    };
    let agent_apply_s = last
        .duration_since(*first)
        .unwrap_or_default()
        .as_secs_f64();

    // Idle: everything applied, watches open.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pid = agent.pid();
    let cpu0 = procstat::cpu_seconds(pid)?;
    let w = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let agent_cpu_pct = 100.0 * (procstat::cpu_seconds(pid)? - cpu0) / w.elapsed().as_secs_f64();
    let agent_rss_kib = procstat::rss_kib(pid)?;
    agent.stop();

    let kdir = dir.path().join("kubectl");
    cluster::write_files(&kdir, &tree("bench-k"))?;
    let kubectl_apply_s = cluster::timed(
        std::process::Command::new(flotilla_tests::testenv_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kube.kubeconfig)
            .args(["apply", "--server-side", "-R", "-f"])
            .arg(&kdir),
    )?
    .as_secs_f64();
    let mut hub = hub;
    hub.proc.kill9();
    Ok(AgentRun {
        objects: bundles * (per_bundle + 1),
        bundles,
        agent_apply_s,
        kubectl_apply_s,
        agent_rss_kib,
        agent_cpu_pct,
    })
}

async fn git_run(bundles: usize) -> Result<GitRun> {
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-git-")
        .tempdir()?;
    let repo = GitRepo::new(dir.path(), "many")?;
    let files = cluster::many_bundles(bundles, 5, "v1");
    let r1 = repo.commit(
        &files
            .iter()
            .map(|(p, t)| (p.as_str(), Some(t.as_str())))
            .collect(),
        "many bundles",
    )?;
    let clone_s = cluster::timed(
        std::process::Command::new("git")
            .args(["clone", "-q", &repo.url])
            .arg(dir.path().join("clone")),
    )?
    .as_secs_f64();
    let hub = BenchHub::start(&dir.path().join("hub")).await?;
    let t = Instant::now();
    hub.add_source("many", &repo.url, &["apps/*"], "1s").await?;
    hub.wait_bundles(bundles, Some(&r1), Duration::from_secs(120))
        .await?;
    let cold_s = t.elapsed().as_secs_f64();

    let changed = files["apps/b000/cm-0.yaml"].replace("v1", "v2");
    let r2 = repo.commit(
        &[("apps/b000/cm-0.yaml", Some(changed.as_str()))].into(),
        "one bundle",
    )?;
    let t = Instant::now();
    hub.wait_bundles(1, Some(&r2), Duration::from_secs(120))
        .await?;
    let incremental_s = t.elapsed().as_secs_f64();
    let fetch_s = cluster::timed(
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir.path().join("clone"))
            .args(["fetch", "-q"]),
    )?
    .as_secs_f64();
    let mut hub = hub;
    hub.proc.kill9();
    Ok(GitRun {
        bundles,
        files: files.len(),
        cold_s,
        incremental_s,
        clone_s,
        fetch_s,
    })
}
