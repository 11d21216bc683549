//! `flotilla-agent`: parses its flags and runs the agent until ctrl-c or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The Flotilla agent: dials out to the hub and applies this cluster's bundles.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The hub's agent endpoint, e.g. https://hub.example.com:7443.
    #[arg(long, env = "FLOTILLA_AGENT_HUB")]
    hub: String,
    /// Join token from `flotilla token create`; needed only for the first start.
    #[arg(long, env = "FLOTILLA_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This cluster's name in the fleet (a DNS label).
    #[arg(long, env = "FLOTILLA_AGENT_CLUSTER_NAME")]
    cluster_name: String,
    /// Labels to seed at enrolment, k=v,k2=v2 (later changes: `flotilla cluster label`);
    /// a join token bound to labels (`token create --labels`) replaces them.
    #[arg(long, env = "FLOTILLA_AGENT_LABELS", default_value = "")]
    labels: String,
    /// Kubeconfig of the cluster to manage; without it, the in-cluster service account.
    #[arg(long, env = "FLOTILLA_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Directory for the agent's certificate and state.
    #[arg(long, env = "FLOTILLA_AGENT_STATE_DIR")]
    state_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Colours only on a terminal: logs go to files and journals too.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let shutdown = shutdown_signal()?;
    let labels = if args.labels.trim().is_empty() {
        Default::default()
    } else {
        flotilla_shared::labels::parse_labels(&args.labels).context("--labels")?
    };
    let config = flotilla_agent::Config {
        hub: args.hub,
        token: args.token.filter(|t| !t.trim().is_empty()),
        cluster_name: args.cluster_name,
        labels,
        kubeconfig: args.kubeconfig,
        state_dir: std::path::absolute(&args.state_dir).context("--state-dir")?,
    };
    flotilla_agent::run(config, shutdown).await?;
    Ok(())
}

/// Completes on ctrl-c or SIGTERM. The handlers are registered now, not on first
/// poll, so a signal arriving during start-up is not fatal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
