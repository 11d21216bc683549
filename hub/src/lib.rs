//! The Flotilla hub: tracks Git sources, renders bundles, decides which clusters
//! get which bundle, serves agents over mutually-authenticated gRPC and operators
//! over an HTTP API.
//!
//! `run` is the whole server; it takes its listeners and a shutdown future so tests
//! (and `main.rs`) choose the addresses. Each listener exposes only what it must:
//! agents (gRPC, mutual TLS) on one, the admin API (TLS; plain HTTP on loopback
//! only) on another, Git push webhooks on a third, only when asked for.

pub mod api;
pub mod datadir;
pub mod fleet;
pub mod gateway;
pub mod git;
pub mod hooks;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod oci;
pub mod pki;
pub mod render;
pub mod sealed;
pub mod signer;
pub mod sources;
pub mod store;
pub mod transfer;
pub mod ui;

/// How the render tools run (`flotilla_render::sandbox`), at the hub's old path.
pub use flotilla_render::sandbox;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use flotilla_shared::token::{hash_secret, JoinToken, ID_LEN, SECRET_LEN};
use rand::Rng;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::fleet::Fleet;
use crate::pki::Pki;
use crate::sources::Pollers;
use crate::store::{SledStore, Store, TokenRecord};

/// Listen backlog of the agent port: a hub restart makes every agent reconnect at
/// once, and the default 128 overflows under such bursts.
pub const AGENT_BACKLOG: u32 = 4096;
/// How long shutdown waits for connections to drain before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the hub library needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds the CA, the serving certificate, the admin token, the store and Git caches.
    pub data_dir: PathBuf,
    /// Host name agents dial; goes into the serving certificate.
    pub advertise_host: String,
    /// Poll Git sources. Off in tests that inject snapshots with `Hub::inject_snapshot`.
    pub poll_git: bool,
    /// helm and kustomize, for Helm and Kustomize bundles.
    pub tools: render::Tools,
    /// The hub-wide secret push webhooks are signed with (`POST /hooks/git`),
    /// for the sources without one of their own (`webhookSecretRef`).
    pub webhook_secret: Option<String>,
    /// The operator's certificate chain and key (PEM files) for the API and
    /// webhook listeners; default: the hub's serving certificate.
    pub api_tls: Option<ApiTls>,
    /// Deadline of one Git fetch (`--git-timeout`).
    pub git_timeout: Duration,
    /// What one Git fetch may read (`--git-max-snapshot-size`, `--git-max-file-size`,
    /// `--git-max-files`).
    pub git_limits: git::Limits,
    /// Where Git fetches run: the hub binary runs them in a child process it can
    /// kill (`FetcherMode::Child` with its own path); the default, `InProcess`, is
    /// for tests that run the hub as a library (see `git::child`).
    pub git_fetcher: git::FetcherMode,
    /// The longest a join token may be asked to live (`--max-token-ttl`).
    pub max_token_ttl: Duration,
    /// How long agent certificates live (`--agent-cert-ttl`); agents renew
    /// theirs after two thirds of it.
    pub agent_cert_ttl: Duration,
    /// The bounds of the drift history, fleet-wide and per cluster
    /// (`--drift-history`, `--drift-history-per-cluster`).
    pub drift_caps: store::DriftCaps,
    /// Enrolment attempts per peer address (`--enroll-burst`, `--enroll-per-second`).
    pub enroll_limit: gateway::EnrollLimit,
    /// See [`gateway::Settings::agent_silence`].
    pub agent_silence: Duration,
    /// `http(s)://HOST[:PORT]/REPOSITORY`: contents are pushed there for agents
    /// that fetch them from a registry (`oci`).
    pub oci_registry: Option<String>,
    /// Export one metric series per bundle × cluster (opt-in; see `metrics`).
    pub metrics_bundle_cluster_series: bool,
    /// Speak protocol v1 only: ignore the features agents advertise (see
    /// [`gateway::Settings::features`]; `--protocol-v1-only`, hidden, for tests
    /// of mixed versions).
    pub protocol_v1_only: bool,
}

/// An operator's certificate for the HTTP listeners.
#[derive(Debug, Clone)]
pub struct ApiTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The hub's listeners. The webhook listener is optional: without it, no
/// webhook is served anywhere.
pub struct Listeners {
    pub agent: TcpListener,
    pub api: TcpListener,
    pub webhook: Option<TcpListener>,
    /// Prometheus' `GET /metrics`, plain HTTP (`--metrics-listen`).
    pub metrics: Option<TcpListener>,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            advertise_host: "localhost".into(),
            poll_git: true,
            tools: render::Tools::default(),
            webhook_secret: None,
            api_tls: None,
            git_timeout: git::DEFAULT_FETCH_TIMEOUT,
            git_limits: git::Limits::default(),
            git_fetcher: git::FetcherMode::InProcess,
            max_token_ttl: flotilla_shared::identity::DEFAULT_MAX_TOKEN_TTL,
            agent_cert_ttl: flotilla_shared::identity::DEFAULT_AGENT_CERT_TTL,
            drift_caps: store::DriftCaps::default(),
            enroll_limit: gateway::EnrollLimit::default(),
            agent_silence: gateway::DEFAULT_AGENT_SILENCE,
            oci_registry: None,
            metrics_bundle_cluster_series: false,
            protocol_v1_only: false,
        }
    }
}

/// The running hub's shared parts. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    pub fleet: Arc<Fleet>,
    pub pki: Arc<Pki>,
    pub pollers: Arc<Pollers>,
    pub tools: Arc<render::Tools>,
    /// See [`Config::webhook_secret`].
    pub webhook_secret: Option<Arc<str>>,
    /// Rate limits and replay memory of the webhook route.
    pub hooks: Arc<hooks::HookGuard>,
    /// TLS of the API and webhook listeners.
    pub http_tls: Arc<rustls::ServerConfig>,
    /// See [`Config::max_token_ttl`].
    pub max_token_ttl: Duration,
    /// See [`Config::agent_cert_ttl`].
    pub agent_cert_ttl: Duration,
    /// See [`Config::enroll_limit`].
    pub enroll_limit: gateway::EnrollLimit,
    /// See [`Config::agent_silence`].
    pub agent_silence: Duration,
    /// See [`Config::oci_registry`].
    pub registry: Option<Arc<oci::Registry>>,
    /// See [`Config::protocol_v1_only`].
    pub protocol_v1_only: bool,
    /// The web UI's sessions.
    pub ui: Arc<ui::Ui>,
    /// Notifications: specs, decisions, the outbox's delivery.
    pub notifier: Arc<notify::Notifier>,
}

impl Hub {
    /// Opens (or initialises) the data directory: permissions, PKI, admin
    /// token, secrets key, store.
    pub fn open(config: &Config) -> anyhow::Result<Hub> {
        // Git over HTTPS (gix's reqwest client) takes the process-wide provider:
        // ring, the tree's only one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        datadir::secure(&config.data_dir).context("securing the data directory")?;
        let pki = Pki::load_or_create(&config.data_dir, &config.advertise_host)
            .context("loading the hub's PKI")?;
        let keyring = sealed::Keyring::load_or_create(&sealed::key_path(&config.data_dir))
            .context("loading the secrets key")?;
        let store: Arc<dyn Store> = Arc::new(
            SledStore::open_with_drift_caps(&config.data_dir.join("store"), config.drift_caps)
                .context("opening the store")?
                .with_keyring(Arc::new(keyring))
                .context("opening the store's secrets")?,
        );
        let http_tls = match &config.api_tls {
            Some(t) => {
                let (chain, key) = listen::load_cert_and_key(&t.cert, &t.key)?;
                listen::server_config(chain, key).with_context(|| {
                    format!(
                        "--api-tls-cert {} / --api-tls-key {}",
                        t.cert.display(),
                        t.key.display()
                    )
                })?
            }
            None => listen::server_config(pki.server_chain.clone(), pki.server_key())
                .context("TLS for the API with the serving certificate")?,
        };
        let notifier =
            notify::Notifier::load(store.clone()).context("loading the notifications")?;
        let fleet = Fleet::load(store).context("loading the fleet from the store")?;
        fleet
            .metrics
            .set_bundle_cluster_series(config.metrics_bundle_cluster_series);
        let tools = Arc::new(config.tools.clone());
        let fetcher = Arc::new(git::Fetcher::new(
            config.git_fetcher.clone(),
            config.git_timeout,
            config.git_limits,
        ));
        let pollers = Arc::new(Pollers::new(
            fleet.clone(),
            tools.clone(),
            fetcher,
            config.data_dir.join("git"),
            config.poll_git,
        ));
        Ok(Hub {
            fleet,
            pki: Arc::new(pki),
            pollers,
            tools,
            webhook_secret: config
                .webhook_secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(Arc::from),
            hooks: Arc::default(),
            http_tls: Arc::new(http_tls),
            max_token_ttl: config.max_token_ttl,
            agent_cert_ttl: config.agent_cert_ttl,
            enroll_limit: config.enroll_limit,
            agent_silence: config.agent_silence,
            protocol_v1_only: config.protocol_v1_only,
            registry: config
                .oci_registry
                .as_deref()
                .map(oci::Registry::new)
                .transpose()?
                .map(Arc::new),
            ui: Arc::default(),
            notifier,
        })
    }

    /// Creates a join token valid for `ttl` that enrols what `binding` says;
    /// only the secret's hash is stored. Returns the token and its expiry (ms
    /// since the epoch). The caller checks `ttl` against the hub's cap.
    pub fn create_token(
        &self,
        ttl: Duration,
        binding: flotilla_shared::identity::Binding,
    ) -> anyhow::Result<(JoinToken, u64)> {
        let token = JoinToken {
            id: random_lower_alnum(ID_LEN),
            secret: random_lower_alnum(SECRET_LEN),
            ca_hash: self.pki.ca_hash(),
        };
        let expires_at_ms = now_ms().saturating_add(ttl.as_millis() as u64);
        self.fleet.store().put_token(&TokenRecord {
            id: token.id.clone(),
            secret_hash: hash_secret(&token.secret),
            expires_at_ms,
            used: false,
            cluster_name: binding.cluster_name,
            labels: binding.labels,
        })?;
        self.fleet.store().flush()?;
        Ok((token, expires_at_ms))
    }

    /// Test hook: hands a source a snapshot as if its poller had fetched it.
    /// Returns false if the source does not exist.
    pub async fn inject_snapshot(
        &self,
        source: &str,
        snapshot: git::Snapshot,
    ) -> anyhow::Result<bool> {
        let Some((_, spec)) = self
            .fleet
            .source_specs()
            .into_iter()
            .find(|(n, _)| n == source)
        else {
            return Ok(false);
        };
        let bundles = sources::render_snapshot(
            &self.tools,
            &render::RenderCache::default(),
            &mut render::RenderCache::default(),
            source,
            &spec,
            &snapshot.files,
            &self.fleet.render_profiles(),
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
        let fleet = self.fleet.clone();
        let source = source.to_string();
        Ok(tokio::task::spawn_blocking(move || {
            fleet.set_snapshot(&source, &snapshot.commit, bundles, now_ms())
        })
        .await??)
    }

    /// Serves agents on `agent_listener` and the API on `api_listener` until
    /// `shutdown` completes; no webhook listener.
    pub async fn serve(
        self,
        agent_listener: TcpListener,
        api_listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.serve_listeners(
            Listeners {
                agent: agent_listener,
                api: api_listener,
                webhook: None,
                metrics: None,
            },
            shutdown,
        )
        .await
    }

    /// Serves every listener until `shutdown` completes.
    pub async fn serve_listeners(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let self_fleet = self.fleet.clone();
        let notifier = self.notifier.clone();
        for (name, spec) in self.fleet.source_specs() {
            self.pollers.sync(&name, &spec);
        }
        tracing::info!(
            agents = ?listeners.agent.local_addr().ok(),
            api = ?listeners.api.local_addr().ok(),
            webhook = ?listeners.webhook.as_ref().and_then(|l| l.local_addr().ok()),
            "hub serving"
        );
        let gateway = tokio::spawn(gateway::serve(
            listeners.agent,
            self.pki.clone(),
            self.fleet.clone(),
            gateway::Settings {
                agent_cert_ttl: self.agent_cert_ttl,
                enroll_limit: self.enroll_limit,
                agent_silence: self.agent_silence,
                features: !self.protocol_v1_only,
            },
            self.registry.clone(),
            stop_rx.clone(),
        ));
        let api_listener = listen::HttpListener::new(listeners.api, self.http_tls.clone(), "api")
            .context("API listener")?;
        let hook_listener = listeners
            .webhook
            .map(|l| listen::HttpListener::new(l, self.http_tls.clone(), "webhook"))
            .transpose()
            .context("webhook listener")?;
        let (mut api_stop, mut hook_stop) = (stop_rx.clone(), stop_rx.clone());
        {
            // The UI's event streams end first, or the graceful shutdown would
            // wait on every open browser.
            let (ui, mut stop) = (self.ui.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let _ = stop.wait_for(|s| *s).await;
                ui.stop();
            });
        }
        let api_app =
            api::router(self.clone()).into_make_service_with_connect_info::<listen::Peer>();
        let hook_app =
            hooks::router(self.clone()).into_make_service_with_connect_info::<listen::Peer>();
        let api = tokio::spawn(async move {
            let api = axum::serve(api_listener, api_app).with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            });
            let hooks = async move {
                match hook_listener {
                    Some(l) => {
                        axum::serve(l, hook_app)
                            .with_graceful_shutdown(async move {
                                let _ = hook_stop.wait_for(|s| *s).await;
                            })
                            .await
                    }
                    None => Ok(()),
                }
            };
            tokio::try_join!(api.into_future(), hooks).map(|_| self)
        });
        if let Some(l) = listeners.metrics {
            let fleet = self_fleet.clone();
            let mut stop = stop_rx.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let fleet = fleet.clone();
                    async move {
                        let text =
                            tokio::task::spawn_blocking(move || fleet.metrics.scrape(&fleet))
                                .await
                                .unwrap_or_default();
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        )
                    }
                }),
            );
            tokio::spawn(async move {
                let served = axum::serve(l, app).with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
                if let Err(error) = served.await {
                    tracing::warn!(%error, "the metrics listener stopped");
                }
            });
        }
        let rollouts = tokio::spawn(rollout_loop(self_fleet.clone(), stop_rx.clone()));
        let notifications = tokio::spawn(notifier.run(self_fleet.clone(), stop_rx.clone()));
        let (mut gateway, mut api) = (gateway, api);
        tokio::select! {
            _ = shutdown => {}
            // Either server stopping on its own is an error: report it at once.
            r = &mut gateway => {
                stop_tx.send_replace(true);
                r.context("gateway task")?.context("agent gateway")?;
                anyhow::bail!("the agent gateway stopped unexpectedly");
            }
            r = &mut api => {
                stop_tx.send_replace(true);
                r.context("API task")?.context("API server")?;
                anyhow::bail!("the API server stopped unexpectedly");
            }
        }
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
        let _ = rollouts.await;
        let _ = notifications.await;
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let g = gateway.await;
            let a = api.await;
            (g, a)
        })
        .await;
        match drained {
            Ok((g, a)) => {
                g.context("gateway task")?.context("agent gateway")?;
                let hub = a.context("API task")?.context("API server")?;
                hub.pollers.stop_all();
                hub.fleet.store().flush()?;
            }
            Err(_) => {
                // What agents were told is acknowledged must be on disk anyway.
                tracing::warn!("connections did not drain in time");
                self_fleet.store().flush()?;
            }
        }
        Ok(())
    }
}

/// The whole hub: opens the data directory and serves until `shutdown`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let hub = Hub::open(&config)?;
    sandbox::log_protections(&config.tools.helm_repo_allow);
    hub.serve_listeners(listeners, shutdown).await
}

/// How often the rollout planner steps.
pub const ROLLOUT_TICK: Duration = Duration::from_secs(1);

/// Steps every bundle's rollout each `ROLLOUT_TICK` (the planner decides; the
/// fleet applies), until `stop`. A failed step (the store) is logged and tried
/// again at the next tick.
async fn rollout_loop(fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ROLLOUT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let f = fleet.clone();
        match tokio::task::spawn_blocking(move || f.step_rollouts(now_ms())).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "rollout step failed"),
            Err(error) => tracing::error!(%error, "rollout step panicked"),
        }
    }
}

/// Binds the agent port with a deep backlog (see `AGENT_BACKLOG`).
pub fn bind_agent_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(AGENT_BACKLOG)
}

/// Wall-clock milliseconds since the epoch, read at the edges (token expiry,
/// last-seen), never inside decisions.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, seconds) of a time in ms since the epoch.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Compares secrets without leaking where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_lower_alnum(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        let t = random_lower_alnum(SECRET_LEN);
        assert_eq!(t.len(), SECRET_LEN);
        assert!(
            JoinToken::split_credential(&format!("{}.{t}", random_lower_alnum(ID_LEN))).is_ok()
        );
    }
}
