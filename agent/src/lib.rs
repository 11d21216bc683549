//! The Flotilla agent: enrols once with a join token, then keeps a session with the
//! hub, stores its assignments in sled, and applies them to its cluster with
//! server-side apply, pruning what left Git. It keeps reconciling from its store
//! when the hub is unreachable.

pub mod apply;
pub mod clock;
pub mod enroll;
pub mod error;
pub mod health;
pub mod plan;
pub mod reconcile;
pub mod session;
pub mod store;
pub mod transport;
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
    /// `https://HOST:PORT` of the hub's agent endpoint.
    pub hub: String,
    /// The join token; needed only while the state directory holds no certificate.
    pub token: Option<String>,
    pub cluster_name: String,
    /// Seed labels sent at enrolment.
    pub labels: Labels,
    /// Kubeconfig file; without one, in-cluster configuration (or the usual inference).
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
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
/// identity from the state directory.
async fn identity(config: &Config, hub: &tonic::transport::Uri) -> Result<enroll::Identity> {
    if let Some(id) = enroll::load_identity(&config.state_dir)? {
        info!(state_dir = %config.state_dir.display(), "using the stored certificate");
        return Ok(id);
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
            other => return other,
        }
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    // kube's TLS and ours both use ring; install it once for anything that asks
    // for the process default. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let hub = transport::parse_hub(&config.hub)?;
    flotilla_shared::objects::validate_name(&config.cluster_name)
        .map_err(|e| Error::Config(e.to_string()))?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| Error::io(&config.state_dir, e))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);

    let id = tokio::select! {
        id = identity(&config, &hub) => id?,
        _ = &mut shutdown => return Ok(()),
    };
    let tls = transport::mutual_config(&id.ca_pem, &id.cert_pem, &id.key_pem)?;
    let kube = kube_client(config.kubeconfig.as_deref()).await?;
    let watch_kube = watch_client(config.kubeconfig.as_deref()).await?;
    let clock = clock::system();
    // Opening waits for sled's lock and reads its log: off the async threads.
    let state_dir = config.state_dir.clone();
    let now = clock.now_unix_ms();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&state_dir, now))
        .await
        .map_err(|e| Error::Writer(format!("opening the store: {e}")))??;
    let (writer, status_rx) = writer::Writer::spawn(store)?;

    let wake = Arc::new(Notify::new());
    let reconciler = reconcile::Reconciler::new(
        writer.clone(),
        apply::Cluster::new(kube.clone()).with_watch_client(watch_kube),
        clock,
    );
    let sessions = session::Sessions {
        hub,
        tls,
        cluster_name: config.cluster_name.clone(),
        writer: writer.clone(),
        kube,
        reconcile: wake.clone(),
        statuses: status_rx,
    };
    info!(cluster = %config.cluster_name, hub = %config.hub, "agent started");
    let r = tokio::spawn(reconciler.run(wake, stop_rx.clone()));
    let s = tokio::spawn(sessions.run(stop_rx));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = r.await;
        let _ = s.await;
        // Whatever was queued is durable before the process ends.
        let _ = writer.sync().await;
    })
    .await;
    Ok(())
}

/// Completes once the shutdown flag is raised (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
