//! The Flotilla agent: enrols once with a join token, then keeps a session with the
//! hub, stores its assignments in sled, and applies them to its cluster with
//! server-side apply, pruning what left Git. It keeps reconciling from its store
//! when the hub is unreachable.

pub mod apply;
pub mod clock;
pub mod control;
pub mod enroll;
pub mod error;
pub mod events;
pub mod files;
pub mod health;
pub mod metrics;
pub mod oci;
pub mod plan;
pub mod reconcile;
pub mod session;
pub mod store;
pub mod transport;
pub mod trust;
pub mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_shared::labels::Labels;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

pub use error::{Error, Result};

/// How long shutting down waits for the loops to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the agent is told at start.
#[derive(Clone)]
pub struct Config {
    /// `https://HOST:PORT` of the hub's agent endpoint; `None`: no network to
    /// the hub at all, desired state arrives by file (`flotilla-agent import`).
    pub hub: Option<String>,
    /// The join token; needed only while the state directory holds no certificate.
    pub token: Option<String>,
    pub cluster_name: String,
    /// Seed labels sent at enrolment.
    pub labels: Labels,
    /// Kubeconfig file; without one, in-cluster configuration (or the usual inference).
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// `http(s)://HOST[:PORT]/REPOSITORY`: contents are fetched from there by
    /// digest, and the hub sends only the signed set.
    pub oci_registry: Option<String>,
    /// Serves Prometheus' `GET /metrics` on this address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Advertise no protocol features in Hello (`--protocol-v1-only`, hidden).
    pub protocol_v1_only: bool,
}

impl std::fmt::Debug for Config {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("hub", &self.hub)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cluster_name", &self.cluster_name)
            .field("labels", &self.labels)
            .field("kubeconfig", &self.kubeconfig)
            .field("state_dir", &self.state_dir)
            .field("oci_registry", &self.oci_registry)
            .finish()
    }
}

/// A Kubernetes client from the kubeconfig, or in-cluster configuration.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    kube::Client::try_from(kube_config(kubeconfig).await?).map_err(|e| Error::Kube(e.to_string()))
}

/// The client the health watches use: the same cluster, without the client's own
/// retries of 429/503/504 (up to 15, honouring Retry-After), so that a failing API
/// server reaches the watch at once; the watch backs off by itself and notices
/// when it has lost sight of the cluster (`health::WATCH_LOST_AFTER`).
pub async fn watch_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let mut config = kube_config(kubeconfig).await?;
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| Error::Kube(e.to_string()))
}

async fn kube_config(kubeconfig: Option<&std::path::Path>) -> Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Kube(format!("no cluster configuration: {e}")))?,
    })
}

/// Enrols on first start (retrying while the hub is unreachable), or reads the
/// identity from the state directory. A stored certificate that expired (the
/// hub was away past its renewal) is replaced by enrolling again when a token
/// is given; the store, and so what the agent applied, stays.
async fn identity(
    config: &Config,
    hub: &tonic::transport::Uri,
    clock: &clock::SharedClock,
) -> Result<(enroll::Identity, bool)> {
    if let Some(id) = enroll::load_identity(&config.state_dir)? {
        let expired = enroll::validity(&id.cert_pem)
            .map(|(_, not_after)| not_after <= clock.now_unix_ms())
            .unwrap_or(false);
        if !expired || config.token.is_none() {
            if expired {
                warn!(
                    "the stored certificate has expired: the hub will refuse it; \
                    enrol again with --token (after `flotilla cluster delete` of this cluster)"
                );
            }
            info!(state_dir = %config.state_dir.display(), "using the stored certificate");
            return Ok((id, false));
        }
        warn!("the stored certificate has expired: enrolling again with the given token");
    }
    let token = config.token.as_deref().ok_or_else(|| {
        Error::Config(format!(
            "{} holds no certificate: --token is needed for the first start",
            config.state_dir.display()
        ))
    })?;
    let mut attempt = 0;
    loop {
        match enroll::enroll(
            hub,
            token,
            &config.cluster_name,
            &config.labels,
            &config.state_dir,
        )
        .await
        {
            Err(Error::Connect { hub, reason }) => {
                let delay = session::backoff(attempt, rand::random::<f64>());
                attempt += 1;
                warn!(%hub, error = %reason, retry_in_ms = delay.as_millis() as u64,
                    "cannot reach the hub to enrol; retrying");
                tokio::time::sleep(delay).await;
            }
            other => return other.map(|id| (id, true)),
        }
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    // kube's TLS and ours both use ring; install it once for anything that asks
    // for the process default. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let hub = config
        .hub
        .as_deref()
        .map(transport::parse_hub)
        .transpose()?;
    flotilla_shared::objects::validate_name(&config.cluster_name)
        .map_err(|e| Error::Config(e.to_string()))?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| Error::io(&config.state_dir, e))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);

    let clock = clock::system();
    let identity = match &hub {
        Some(hub) => Some(tokio::select! {
            id = identity(&config, hub, &clock) => id?,
            _ = &mut shutdown => return Ok(()),
        }),
        None => None,
    };
    let kube = kube_client(config.kubeconfig.as_deref()).await?;
    let watch_kube = watch_client(config.kubeconfig.as_deref()).await?;
    // Opening waits for sled's lock and reads its log: off the async threads.
    let state_dir = config.state_dir.clone();
    let now = clock.now_unix_ms();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&state_dir, now))
        .await
        .map_err(|e| Error::Writer(format!("opening the store: {e}")))??;
    let (writer, status_rx) = writer::Writer::spawn(store)?;

    let wake = Arc::new(Notify::new());
    let trust = Arc::new(trust::Trust::load(&config.state_dir, &config.cluster_name)?);
    let metrics = Arc::new(metrics::Metrics::new());
    let events = events::Events::spawn(
        kube.clone(),
        events::Reporter::agent(&config.cluster_name),
        clock.clone(),
        Some(metrics.clone()),
        stop_rx.clone(),
    );
    let reconciler = reconcile::Reconciler::new(
        writer.clone(),
        apply::Cluster::new(kube.clone()).with_watch_client(watch_kube),
        clock.clone(),
    )
    .with_metrics(metrics.clone())
    .with_events(events);
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("--metrics-listen {addr}: {e}")))?;
        tokio::spawn(metrics::serve(listener, metrics, stop_rx.clone()));
    }
    let control = control::Control {
        writer: writer.clone(),
        trust: trust.clone(),
        wake: wake.clone(),
        state_dir: config.state_dir.clone(),
        clock: clock.clone(),
        kube: kube.clone(),
    };
    let c = tokio::spawn(control.serve(control::bind(&config.state_dir)?, stop_rx.clone()));
    let r = tokio::spawn(reconciler.run(wake.clone(), stop_rx.clone()));
    let s = match (hub, identity) {
        (Some(hub), Some((id, enrolled))) => {
            let tls = transport::mutual_config(&id.ca_pem, &id.cert_pem, &id.key_pem)?;
            let sessions = session::Sessions {
                hub,
                tls,
                cluster_name: config.cluster_name.clone(),
                writer: writer.clone(),
                kube,
                reconcile: wake.clone(),
                trust,
                registry: config
                    .oci_registry
                    .as_deref()
                    .map(oci::Registry::new)
                    .transpose()?,
                statuses: status_rx,
                renewal: Some(session::Renewal::new(
                    id.clone(),
                    config.state_dir.clone(),
                    clock.clone(),
                )),
                resend_statuses: enrolled,
                features: if config.protocol_v1_only {
                    Vec::new()
                } else {
                    flotilla_proto::features::ALL
                        .iter()
                        .map(|f| f.to_string())
                        .collect()
                },
            };
            info!(cluster = %config.cluster_name, hub = ?config.hub, "agent started");
            Some(tokio::spawn(sessions.run(stop_rx)))
        }
        _ => {
            info!(cluster = %config.cluster_name, state_dir = %config.state_dir.display(),
                "agent started without a hub: desired state arrives by file \
                 (flotilla-agent import), statuses leave by file (flotilla-agent export-status)");
            None
        }
    };

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = r.await;
        if let Some(s) = s {
            let _ = s.await;
        }
        let _ = c.await;
        // Whatever was queued is durable before the process ends.
        let _ = writer.sync().await;
    })
    .await;
    Ok(())
}

/// The cluster a state directory's certificate names.
pub fn cluster_of(state_dir: &std::path::Path) -> Result<String> {
    let id = enroll::load_identity(state_dir)?.ok_or_else(|| {
        Error::Config(format!(
            "{} holds no certificate: enrol the agent first (flotilla-agent enroll-request, \
             then enroll --response)",
            state_dir.display()
        ))
    })?;
    let der = transport::certs_from_pem(&id.cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())
        .map_err(|e| Error::Tls(format!("unreadable certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn.ok_or_else(|| Error::Tls("the certificate names no cluster".into()))
}

/// Runs `f` on the agent of `state_dir`: through its control socket when one
/// runs, else on the store opened here (no agent holds it).
async fn with_agent<T>(
    state_dir: &std::path::Path,
    request: control::Request,
    payload: &[u8],
    direct: impl AsyncFnOnce(&writer::Writer, &trust::Trust) -> Result<T>,
    from_answer: impl FnOnce(String, Vec<u8>) -> T,
) -> Result<T> {
    if let Some((message, bytes)) = control::call(state_dir, &request, payload).await? {
        return Ok(from_answer(message, bytes));
    }
    let cluster = cluster_of(state_dir)?;
    let dir = state_dir.to_path_buf();
    let now = clock::system().now_unix_ms();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir, now))
        .await
        .map_err(|e| Error::Writer(format!("opening the store: {e}")))??;
    let (writer, _) = writer::Writer::spawn(store)?;
    let trust = trust::Trust::load(state_dir, &cluster)?;
    let out = direct(&writer, &trust).await?;
    writer.sync().await?;
    Ok(out)
}

/// `flotilla-agent import`: verifies and stores a desired-state file; the
/// running agent applies it at once, or the next one to start.
pub async fn import_file(
    state_dir: &std::path::Path,
    bytes: &[u8],
    allow_downgrade: bool,
) -> Result<String> {
    with_agent(
        state_dir,
        control::Request::Import { allow_downgrade },
        bytes,
        async |w: &writer::Writer, t: &trust::Trust| {
            let m = files::import(w, t, bytes, allow_downgrade).await?;
            Ok(format!(
                "{m}; no agent runs here: the next to start applies it"
            ))
        },
        |message, _| message,
    )
    .await
}

/// `flotilla-agent export-status`: the signed status report.
pub async fn export_status_file(state_dir: &std::path::Path) -> Result<Vec<u8>> {
    with_agent(
        state_dir,
        control::Request::ExportStatus,
        &[],
        async |w: &writer::Writer, t: &trust::Trust| {
            let now = clock::system().now_unix_ms();
            files::export_status(w, state_dir, &t.cluster, now, String::new()).await
        },
        |_, bytes| bytes,
    )
    .await
}

/// Completes once the shutdown flag is raised (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
