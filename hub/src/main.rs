//! `flotilla-hub`: parses flags, sets up tracing, binds the listeners and runs the hub.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// The Flotilla hub: Git sources, rendering, targeting, fleet status, agent gateway.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory for the CA, serving certificate, admin token, store and Git caches.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: PathBuf,
    /// Address agents connect to (gRPC over TLS 1.3).
    #[arg(long, env = "FLOTILLA_AGENT_LISTEN", default_value = "127.0.0.1:7443")]
    agent_listen: SocketAddr,
    /// Address of the HTTP API.
    #[arg(long, env = "FLOTILLA_API_LISTEN", default_value = "127.0.0.1:7080")]
    api_listen: SocketAddr,
    /// Host name agents use to reach the hub; put in the serving certificate.
    #[arg(long, env = "FLOTILLA_ADVERTISE_HOST", default_value = "localhost")]
    advertise_host: String,
    /// The helm program, for Helm bundles (default: `helm` on PATH).
    #[arg(long, env = "FLOTILLA_HELM", value_name = "PATH")]
    helm: Option<PathBuf>,
    /// The kustomize program, for Kustomize bundles (default: `kustomize` on PATH).
    #[arg(long, env = "FLOTILLA_KUSTOMIZE", value_name = "PATH")]
    kustomize: Option<PathBuf>,
    /// File holding the secret Git push webhooks (`POST /hooks/git`) are signed
    /// with (GitHub's `X-Hub-Signature-256`, GitLab's `X-Gitlab-Token`). Without it,
    /// only sources whose secret has a `webhookSecret` accept hooks.
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours only on a terminal: logs go to files and journals too.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let agent = flotilla_hub::bind_agent_listener(args.agent_listen)
        .with_context(|| format!("binding {}", args.agent_listen))?;
    let api = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding {}", args.api_listen))?;
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
        data_dir: std::path::absolute(&args.data_dir).context("--data-dir")?,
        advertise_host: args.advertise_host,
        poll_git: true,
        tools: flotilla_hub::render::Tools::new(args.helm, args.kustomize),
        webhook_secret,
        git_timeout: args.git_timeout,
        git_limits: flotilla_hub::git::Limits {
            max_snapshot_bytes: args.git_max_snapshot_size,
            max_file_bytes: args.git_max_file_size,
            max_files: args.git_max_files,
        },
        git_fetcher: flotilla_hub::git::FetcherMode::Child(own_program()?),
    };
    flotilla_hub::run(config, agent, api, shutdown_signal()).await
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
