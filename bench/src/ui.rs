//! The web UI's and `/metrics`' server time at fleet scale: an in-process hub
//! (the real `flotilla_hub::Hub`, its sled store, its axum routes) holding
//! CLUSTERS simulated clusters × BUNDLES bundles with statuses recorded as agents
//! report them, timed over HTTP on loopback. Each figure is the time from the
//! request sent to the last byte of the page read, so it includes the loopback
//! round trip; the client is reqwest with keep-alive.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_hub::fleet::Hello;
use flotilla_hub::store::{ClusterRecord, StatusRecord};
use flotilla_hub::{Config, Hub, Listeners};
use flotilla_shared::labels::Labels;
use flotilla_shared::state::BundleState;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::report::UiRun;
use crate::stats;

/// The regions the clusters are spread over (a label the matrix filters on).
const REGIONS: [&str; 5] = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];

/// One cluster's labels: a region, an environment, and a tier.
fn labels(i: usize) -> Labels {
    let mut l = BTreeMap::new();
    l.insert("region".to_string(), REGIONS[i % REGIONS.len()].to_string());
    l.insert(
        "env".to_string(),
        if i.is_multiple_of(10) {
            "staging"
        } else {
            "prod"
        }
        .to_string(),
    );
    l.insert("tier".to_string(), format!("t{}", i % 3));
    l.into_iter().collect()
}

/// The repository: BUNDLES directories, each a fleet.yaml targeting every
/// cluster and one ConfigMap.
fn files(bundles: usize) -> BTreeMap<String, Vec<u8>> {
    let mut f = BTreeMap::new();
    for b in 0..bundles {
        f.insert(
            format!("b{b:03}/fleet.yaml"),
            format!("name: b{b:03}\n").into_bytes(),
        );
        f.insert(
            format!("b{b:03}/cm.yaml"),
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: b{b:03}, namespace: default}}\ndata: {{k: v}}\n")
                .into_bytes(),
        );
    }
    f
}

/// A bundle's state on cluster `i`: mostly Ready, with a few of each other state
/// so that every filter and colour has members.
fn state(i: usize, b: usize) -> BundleState {
    match (i * 31 + b * 7) % 100 {
        0..=2 => BundleState::NotReady,
        3 => BundleState::ErrApplied,
        4 => BundleState::Modified,
        5 => BundleState::WaitApplied,
        _ => BundleState::Ready,
    }
}

struct Timed {
    median_ms: f64,
    p99_ms: f64,
    bytes: usize,
}

async fn time_get(client: &reqwest::Client, url: &str, repeat: usize) -> Result<Timed> {
    let mut ms = Vec::with_capacity(repeat);
    let mut bytes = 0;
    for _ in 0..repeat {
        let t = Instant::now();
        let r = client.get(url).send().await?;
        let status = r.status();
        let body = r.bytes().await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !status.is_success() {
            bail!("GET {url}: {status}");
        }
        bytes = body.len();
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timed {
        median_ms: stats::percentile(&ms, 50.0),
        p99_ms: stats::percentile(&ms, 99.0),
        bytes,
    })
}

/// One run: builds the fleet, serves it, times each page `repeat` times.
pub async fn run(clusters: usize, bundles: usize, repeat: usize) -> Result<UiRun> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::new(dir.path());
    config.poll_git = false;
    let hub = Hub::open(&config).context("opening the hub")?;
    let setup = Instant::now();
    let source: flotilla_shared::objects::GitSourceSpec =
        serde_json::from_value(serde_json::json!({"repo": "https://git.invalid/fleet.git"}))?;
    hub.fleet.apply_source("fleet", source)?;
    if !hub
        .inject_snapshot(
            "fleet",
            flotilla_hub::git::Snapshot {
                commit: "0".repeat(40),
                files: files(bundles),
            },
        )
        .await?
    {
        bail!("the source was not applied");
    }
    let fleet = hub.fleet.clone();
    let (statuses, bundle_names) =
        tokio::task::spawn_blocking(move || -> Result<(usize, Vec<String>)> {
            let now = flotilla_hub::now_ms();
            let mut statuses = 0;
            let mut names = Vec::new();
            for i in 0..clusters {
                let name = format!("c{i:05}");
                let cert = format!("{i:064x}");
                fleet.create_cluster(ClusterRecord {
                    name: name.clone(),
                    labels: labels(i),
                    enrolled_at_ms: now,
                    cert_sha256: Some(cert.clone()),
                    ..Default::default()
                })?;
                // Nine in ten are connected.
                if i % 10 != 3 {
                    let hello = Hello {
                        agent_version: "0.2.0",
                        kubernetes_version: "v1.34.4",
                        api_versions: &[],
                    };
                    if let Err(refused) = fleet.connect(&name, &cert, &hello, now)? {
                        bail!("{name}: {refused:?}");
                    }
                }
                let desired = fleet
                    .desired(&name)
                    .with_context(|| format!("{name} has no desired set"))?;
                // The agent stored the set and acknowledged it, then reports.
                fleet.record_ack(&name, &desired, None)?;
                if names.is_empty() {
                    names = desired.bundles.iter().map(|b| b.0.clone()).collect();
                }
                for (b, (bundle, hash, revision)) in desired.bundles.iter().enumerate() {
                    let state = state(i, b);
                    let recorded = fleet.record_status(StatusRecord {
                        cluster: name.clone(),
                        bundle: bundle.clone(),
                        content_hash: hash.clone(),
                        revision: revision.clone(),
                        state,
                        message: if state == BundleState::Ready {
                            String::new()
                        } else {
                            format!("cm.yaml: ConfigMap default/{bundle}: simulated {state:?}")
                        },
                        observed_at_ms: now as i64,
                    })?;
                    if !recorded {
                        bail!("{name}/{bundle}: status refused");
                    }
                    statuses += 1;
                }
            }
            fleet.store().flush()?;
            Ok((statuses, names))
        })
        .await??;
    if statuses != clusters * bundles {
        bail!(
            "{statuses} statuses recorded, expected {}",
            clusters * bundles
        );
    }
    let setup_s = setup.elapsed().as_secs_f64();

    let api = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    let agent = TcpListener::bind("127.0.0.1:0").await?;
    let (api_addr, metrics_addr) = (api.local_addr()?, metrics.local_addr()?);
    let token = hub.pki.admin_token().to_string();
    let fleet = hub.fleet.clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let served = tokio::spawn(hub.serve_listeners(
        Listeners {
            agent,
            api,
            webhook: None,
            metrics: Some(metrics),
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;
    let base = format!("http://{api_addr}");
    let login = client
        .post(format!("{base}/login"))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(format!("token={token}&next=%2F"))
        .send()
        .await?;
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
        .with_context(|| format!("login: {} without a session cookie", login.status()))?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::COOKIE, cookie.parse()?);
    let ui = reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;

    // One untimed request each warms the connection and the caches.
    let pages = [
        ("overview", format!("{base}/")),
        ("matrix", format!("{base}/matrix")),
        (
            "matrix_filtered",
            format!("{base}/matrix?selector=region%3Dus-east%2Cenv%3Dprod&state=NotReady&page=2"),
        ),
        ("cluster", format!("{base}/clusters/c{:05}", clusters / 2)),
        (
            "bundle",
            format!(
                "{base}/bundles/{}",
                bundle_names.get(bundles / 2).context("no bundles")?
            ),
        ),
    ];
    let mut timed = BTreeMap::new();
    for (name, url) in &pages {
        time_get(&ui, url, 1).await?;
        timed.insert(*name, time_get(&ui, url, repeat).await?);
    }
    // The first matrix page after a change (one status report): that cluster's
    // row is computed again, the others are kept.
    let mut after_change = Vec::with_capacity(repeat);
    for k in 0..repeat {
        let name = format!("c{:05}", (k * 7919) % clusters);
        let f = fleet.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let desired = f.desired(&name).context("no desired set")?;
            let (bundle, hash, revision) = desired.bundles[0].clone();
            let state = if k % 2 == 0 {
                BundleState::NotReady
            } else {
                BundleState::Ready
            };
            f.record_status(StatusRecord {
                cluster: name,
                bundle,
                content_hash: hash,
                revision,
                state,
                message: String::new(),
                observed_at_ms: flotilla_hub::now_ms() as i64,
            })?;
            Ok(())
        })
        .await??;
        after_change.push(time_get(&ui, &format!("{base}/matrix"), 1).await?.median_ms);
    }
    after_change.sort_by(f64::total_cmp);
    let metrics_url = format!("http://{metrics_addr}/metrics");
    time_get(&client, &metrics_url, 1).await?;
    let scrape = time_get(&client, &metrics_url, repeat).await?;
    let text = client.get(&metrics_url).send().await?.text().await?;
    let series = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
    let t = |n: &str| &timed[n];
    Ok(UiRun {
        clusters,
        bundles,
        statuses,
        repeat,
        setup_s,
        overview_median_ms: t("overview").median_ms,
        overview_p99_ms: t("overview").p99_ms,
        overview_kib: t("overview").bytes as f64 / 1024.0,
        matrix_median_ms: t("matrix").median_ms,
        matrix_p99_ms: t("matrix").p99_ms,
        matrix_kib: t("matrix").bytes as f64 / 1024.0,
        matrix_after_change_median_ms: stats::percentile(&after_change, 50.0),
        matrix_after_change_p99_ms: stats::percentile(&after_change, 99.0),
        matrix_filtered_median_ms: t("matrix_filtered").median_ms,
        matrix_filtered_p99_ms: t("matrix_filtered").p99_ms,
        cluster_median_ms: t("cluster").median_ms,
        bundle_median_ms: t("bundle").median_ms,
        bundle_kib: t("bundle").bytes as f64 / 1024.0,
        metrics_median_ms: scrape.median_ms,
        metrics_p99_ms: scrape.p99_ms,
        metrics_kib: scrape.bytes as f64 / 1024.0,
        metrics_series: series,
    })
}
