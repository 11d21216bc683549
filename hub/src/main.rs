//! `flotilla-hub`: parses flags, sets up tracing, binds the listeners and runs the
//! hub; `flotilla-hub rotate-secrets-key` rotates the key that seals secrets.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The Flotilla hub: Git sources, rendering, targeting, fleet status, agent gateway.
#[derive(Debug, Parser)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    /// Directory for the CA, serving certificate, admin token, secrets key, store
    /// and Git caches (made 0700; its files 0600).
    #[arg(long, env = "FLOTILLA_DATA_DIR", required = true)]
    data_dir: Option<PathBuf>,
    /// Address agents connect to (gRPC over TLS 1.3).
    #[arg(long, env = "FLOTILLA_AGENT_LISTEN", default_value = "127.0.0.1:7443")]
    agent_listen: SocketAddr,
    /// Address of the HTTP API: TLS, and plain HTTP too when it is a loopback
    /// address (for clients on loopback).
    #[arg(long, env = "FLOTILLA_API_LISTEN", default_value = "127.0.0.1:7080")]
    api_listen: SocketAddr,
    /// Address of the Git push webhook listener (`POST /hooks/git` only; TLS, and
    /// plain HTTP on loopback). Without it, no webhook is served.
    #[arg(long, env = "FLOTILLA_WEBHOOK_LISTEN", value_name = "ADDR")]
    webhook_listen: Option<SocketAddr>,
    /// Address of a plain-HTTP listener serving Prometheus' `GET /metrics` (only
    /// that). Without it, no metrics are served. Bind it where only the scraper
    /// reaches: the metrics name clusters, bundles and sources.
    #[arg(long, env = "FLOTILLA_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Also export `flotilla_bundle_deployment_state{bundle,cluster,state}`, one
    /// series per bundle × cluster (off by default: clusters × bundles series).
    #[arg(long, env = "FLOTILLA_METRICS_BUNDLE_CLUSTER_SERIES")]
    metrics_bundle_cluster_series: bool,
    /// Host name agents use to reach the hub; put in the serving certificate.
    #[arg(long, env = "FLOTILLA_ADVERTISE_HOST", default_value = "localhost")]
    advertise_host: String,
    /// Certificate chain (PEM) the API and webhook listeners present instead of
    /// the hub's serving certificate; with --api-tls-key.
    #[arg(
        long,
        env = "FLOTILLA_API_TLS_CERT",
        value_name = "PATH",
        requires = "api_tls_key"
    )]
    api_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --api-tls-cert.
    #[arg(
        long,
        env = "FLOTILLA_API_TLS_KEY",
        value_name = "PATH",
        requires = "api_tls_cert"
    )]
    api_tls_key: Option<PathBuf>,
    /// The helm program, for Helm bundles (default: `helm` on PATH).
    #[arg(long, env = "FLOTILLA_HELM", value_name = "PATH")]
    helm: Option<PathBuf>,
    /// The kustomize program, for Kustomize bundles (default: `kustomize` on PATH).
    #[arg(long, env = "FLOTILLA_KUSTOMIZE", value_name = "PATH")]
    kustomize: Option<PathBuf>,
    /// URL prefix of a chart repository or OCI registry Helm bundles may fetch
    /// charts from (`https://charts.example.com/`, `oci://registry.example.com/team/`);
    /// repeat for several, or separate with commas. Charts from anywhere else are
    /// refused: repository content does not choose where the hub connects.
    #[arg(
        long,
        env = "FLOTILLA_HELM_REPO_ALLOW",
        value_name = "URL-PREFIX",
        value_delimiter = ','
    )]
    helm_repo_allow: Vec<String>,
    /// File holding the secret Git push webhooks are signed with (GitHub's
    /// `X-Hub-Signature-256`, GitLab's `X-Gitlab-Token`), for the sources without
    /// a webhook secret of their own (`webhookSecretRef`).
    #[arg(long, env = "FLOTILLA_WEBHOOK_SECRET_FILE", value_name = "PATH")]
    webhook_secret_file: Option<PathBuf>,
    /// Deadline of one Git fetch (connect, negotiate, receive, read the tree):
    /// `90s`, `5m`. A fetch still running then is stopped, reported in the source's
    /// lastError, and retried with backoff.
    #[arg(long, env = "FLOTILLA_GIT_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    git_timeout: std::time::Duration,
    /// Largest total size of the files read from one commit of a source (those of
    /// its bundle directories): bytes, or with KiB, MiB, GiB.
    #[arg(long, env = "FLOTILLA_GIT_MAX_SNAPSHOT_SIZE", default_value = "256MiB", value_parser = flotilla_hub::git::parse_size)]
    git_max_snapshot_size: u64,
    /// Largest file read from a source.
    #[arg(long, env = "FLOTILLA_GIT_MAX_FILE_SIZE", default_value = "32MiB", value_parser = flotilla_hub::git::parse_size)]
    git_max_file_size: u64,
    /// Most files read from one commit of a source.
    #[arg(long, env = "FLOTILLA_GIT_MAX_FILES", default_value_t = flotilla_hub::git::DEFAULT_MAX_FILES)]
    git_max_files: usize,
    /// The longest a join token may live (`flotilla token create --ttl`); a
    /// longer request is refused.
    #[arg(long, env = "FLOTILLA_MAX_TOKEN_TTL", default_value = "7d", value_parser = parse_duration)]
    max_token_ttl: std::time::Duration,
    /// How long the client certificates issued to agents live; agents renew
    /// theirs after two thirds of it.
    #[arg(long, env = "FLOTILLA_AGENT_CERT_TTL", default_value = "30d", value_parser = parse_duration)]
    agent_cert_ttl: std::time::Duration,
    /// A session whose agent sends nothing, not even a heartbeat (every 30 s),
    /// this long is ended: the cluster shows offline (rollouts skip it, they do
    /// not fail it).
    #[arg(long, env = "FLOTILLA_AGENT_SILENCE", default_value = "75s", value_parser = parse_duration)]
    agent_silence: std::time::Duration,
    /// An OCI registry repository, http(s)://HOST[:PORT]/REPOSITORY: the hub
    /// pushes each bundle content there by digest, and agents started with
    /// --oci-registry fetch them from it (or a mirror): the hub then sends them
    /// only the signed set. The registry holds rendered manifests: keep it private.
    #[arg(long, env = "FLOTILLA_OCI_REGISTRY")]
    oci_registry: Option<String>,
    /// Speak protocol v1 only: ignore the features agents advertise and send
    /// every agent its contents inline, as a v1 hub does (for tests of mixed
    /// versions).
    #[arg(long, hide = true)]
    protocol_v1_only: bool,
    /// Drift events the hub keeps, all clusters together; the oldest go first.
    #[arg(long, env = "FLOTILLA_DRIFT_HISTORY", default_value_t = flotilla_hub::store::MAX_DRIFT_EVENTS)]
    drift_history: usize,
    /// Drift events the hub keeps per cluster: a cluster beyond it drops its own
    /// oldest, never another cluster's.
    #[arg(long, env = "FLOTILLA_DRIFT_HISTORY_PER_CLUSTER", default_value_t = flotilla_hub::store::MAX_DRIFT_EVENTS_PER_CLUSTER)]
    drift_history_per_cluster: usize,
    /// Enrolment attempts one peer address may make at once (its bucket holds
    /// this many); loopback peers are not limited.
    #[arg(long, env = "FLOTILLA_ENROLL_BURST", default_value_t = 20)]
    enroll_burst: u32,
    /// Enrolment attempts per second one peer address gets back.
    #[arg(long, env = "FLOTILLA_ENROLL_PER_SECOND", default_value_t = 2)]
    enroll_per_second: u32,
    #[command(subcommand)]
    command: Option<HubCommand>,
}

#[derive(Debug, Subcommand)]
enum HubCommand {
    /// With the hub stopped: adds a new secrets key, seals every stored secret
    /// again with it, then drops the old keys. Safe to run again if interrupted.
    RotateSecretsKey {
        /// The hub's data directory.
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// The program fetch helpers run: this very binary. `/proc/self/exe` names the
/// running image even after an upgrade replaced (or deleted) the file, so hub and
/// helper always speak the same protocol.
fn own_program() -> anyhow::Result<PathBuf> {
    let proc_exe = PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe);
    }
    std::env::current_exe().context("locating the hub's own program")
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    flotilla_shared::objects::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    // Everything the hub and its fetch helpers write (keys, token, store, Git
    // caches) is their user's alone.
    flotilla_hub::datadir::restrict_umask();
    // `flotilla-hub __git-fetch`: the child process each Git fetch runs in.
    if let Some(code) = flotilla_hub::git::child::helper_if_requested() {
        std::process::exit(code);
    }
    hub_main()
}

#[tokio::main]
async fn hub_main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.git_timeout.is_zero(),
        "--git-timeout must be longer than zero"
    );
    anyhow::ensure!(
        !args.max_token_ttl.is_zero(),
        "--max-token-ttl must be longer than zero"
    );
    anyhow::ensure!(
        args.agent_cert_ttl >= std::time::Duration::from_secs(10),
        "--agent-cert-ttl must be at least 10s (agents renew after two thirds of it)"
    );
    anyhow::ensure!(
        args.agent_silence >= std::time::Duration::from_secs(35),
        "--agent-silence must be at least 35s (agents send a heartbeat every 30s)"
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours only on a terminal: logs go to files and journals too.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(HubCommand::RotateSecretsKey { data_dir }) = &args.command {
        let (key, n) = flotilla_hub::sealed::rotate(data_dir)?;
        println!("secrets key rotated: {n} secrets sealed with key {key}; old keys removed");
        return Ok(());
    }
    let data_dir = args.data_dir.context("--data-dir is required")?;
    let agent = flotilla_hub::bind_agent_listener(args.agent_listen)
        .with_context(|| format!("binding {}", args.agent_listen))?;
    let api = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding {}", args.api_listen))?;
    let webhook = match args.webhook_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --webhook-listen {addr}"))?,
        ),
        None => None,
    };
    let webhook_secret = match &args.webhook_secret_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --webhook-secret-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let config = flotilla_hub::Config {
        data_dir: std::path::absolute(&data_dir).context("--data-dir")?,
        advertise_host: args.advertise_host,
        poll_git: true,
        tools: flotilla_hub::render::Tools::new(args.helm, args.kustomize)
            .with_helm_repo_allow(args.helm_repo_allow),
        webhook_secret,
        api_tls: args
            .api_tls_cert
            .zip(args.api_tls_key)
            .map(|(cert, key)| flotilla_hub::ApiTls { cert, key }),
        git_timeout: args.git_timeout,
        git_limits: flotilla_hub::git::Limits {
            max_snapshot_bytes: args.git_max_snapshot_size,
            max_file_bytes: args.git_max_file_size,
            max_files: args.git_max_files,
        },
        git_fetcher: flotilla_hub::git::FetcherMode::Child(own_program()?),
        max_token_ttl: args.max_token_ttl,
        agent_cert_ttl: args.agent_cert_ttl,
        agent_silence: args.agent_silence,
        oci_registry: args.oci_registry.filter(|r| !r.trim().is_empty()),
        metrics_bundle_cluster_series: args.metrics_bundle_cluster_series,
        protocol_v1_only: args.protocol_v1_only,
        drift_caps: flotilla_hub::store::DriftCaps {
            total: args.drift_history,
            per_cluster: args.drift_history_per_cluster,
        },
        enroll_limit: flotilla_hub::gateway::EnrollLimit {
            burst: args.enroll_burst.max(1),
            per_second: args.enroll_per_second,
            loopback: false,
        },
    };
    let metrics = match args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-listen {addr}"))?,
        ),
        None => None,
    };
    let listeners = flotilla_hub::Listeners {
        agent,
        api,
        webhook,
        metrics,
    };
    flotilla_hub::run(config, listeners, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_limits_flags() {
        let a = Args::try_parse_from(["flotilla-hub", "--data-dir", "d"]).unwrap();
        assert_eq!(a.git_timeout, flotilla_hub::git::DEFAULT_FETCH_TIMEOUT);
        assert_eq!(
            (a.max_token_ttl, a.agent_cert_ttl),
            (
                flotilla_shared::identity::DEFAULT_MAX_TOKEN_TTL,
                flotilla_shared::identity::DEFAULT_AGENT_CERT_TTL
            )
        );
        let b = Args::try_parse_from([
            "flotilla-hub",
            "--data-dir",
            "d",
            "--max-token-ttl",
            "1h",
            "--agent-cert-ttl",
            "20s",
        ])
        .unwrap();
        assert_eq!(
            (b.max_token_ttl, b.agent_cert_ttl),
            (
                std::time::Duration::from_secs(3600),
                std::time::Duration::from_secs(20)
            )
        );
        assert_eq!(
            (
                a.git_max_snapshot_size,
                a.git_max_file_size,
                a.git_max_files
            ),
            (
                flotilla_hub::git::DEFAULT_MAX_SNAPSHOT_BYTES,
                flotilla_hub::git::DEFAULT_MAX_FILE_BYTES,
                flotilla_hub::git::DEFAULT_MAX_FILES
            )
        );
        let a = Args::try_parse_from([
            "flotilla-hub",
            "--data-dir",
            "d",
            "--git-timeout",
            "90s",
            "--git-max-snapshot-size",
            "1GiB",
            "--git-max-file-size",
            "512KiB",
            "--git-max-files",
            "20",
        ])
        .unwrap();
        assert_eq!(a.git_timeout, std::time::Duration::from_secs(90));
        assert_eq!(
            (
                a.git_max_snapshot_size,
                a.git_max_file_size,
                a.git_max_files
            ),
            (1 << 30, 512 << 10, 20)
        );
        for bad in [["--git-timeout", "soon"], ["--git-max-file-size", "3TB"]] {
            assert!(
                Args::try_parse_from(["flotilla-hub", "--data-dir", "d", bad[0], bad[1]]).is_err()
            );
        }
    }
}
