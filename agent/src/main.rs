//! `flotilla-agent`: parses its flags and runs the agent until ctrl-c or SIGTERM,
//! or runs one of the file commands of an air-gapped cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The Flotilla agent: dials out to the hub and applies this cluster's bundles.
/// Without --hub, it takes desired state by file only (`import`).
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The hub's agent endpoint, e.g. https://hub.example.com:7443. Without it
    /// the agent never dials out: desired state arrives by `flotilla-agent import`.
    #[arg(long, env = "FLOTILLA_AGENT_HUB")]
    hub: Option<String>,
    /// Join token from `flotilla token create`; needed only for the first start.
    #[arg(long, env = "FLOTILLA_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This cluster's name in the fleet (a DNS label).
    #[arg(long, env = "FLOTILLA_AGENT_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Labels to seed at enrolment, k=v,k2=v2 (later changes: `flotilla cluster label`);
    /// a join token bound to labels (`token create --labels`) replaces them.
    #[arg(long, env = "FLOTILLA_AGENT_LABELS", default_value = "")]
    labels: String,
    /// Kubeconfig of the cluster to manage; without it, the in-cluster service account.
    #[arg(long, env = "FLOTILLA_AGENT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Directory for the agent's certificate and state.
    #[arg(long, env = "FLOTILLA_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// An OCI registry repository, http(s)://HOST[:PORT]/REPOSITORY (the hub's
    /// --oci-registry, or a mirror of it): contents are fetched from it by
    /// digest, and the hub sends only the signed set.
    #[arg(long, env = "FLOTILLA_AGENT_OCI_REGISTRY")]
    oci_registry: Option<String>,
    /// Serve Prometheus' GET /metrics (plain HTTP) on this address.
    #[arg(long, env = "FLOTILLA_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Speak protocol v1 only: advertise no features in Hello, so the hub
    /// sends contents inline, as to a v1 agent (for tests of mixed versions).
    #[arg(long, hide = true)]
    protocol_v1_only: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Write an enrolment request file for a cluster with no network to the hub;
    /// the hub answers it with `flotilla cluster enroll --request FILE -o FILE`.
    EnrollRequest {
        #[arg(long, env = "FLOTILLA_AGENT_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, env = "FLOTILLA_AGENT_CLUSTER_NAME")]
        cluster_name: String,
        #[arg(long, env = "FLOTILLA_AGENT_LABELS", default_value = "")]
        labels: String,
        #[arg(long, env = "FLOTILLA_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        /// Where to write the request.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
    /// Take the hub's enrolment response file.
    Enroll {
        #[arg(long)]
        response: PathBuf,
        #[arg(long, env = "FLOTILLA_AGENT_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Verify a desired-state file (`flotilla bundle export`) and apply it, as
    /// if it had come over the network.
    Import {
        file: PathBuf,
        #[arg(long, env = "FLOTILLA_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        /// Accept a set older than the one held (an operator's rollback by file).
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Write the statuses and drift events the hub has not acknowledged, signed,
    /// for `flotilla cluster import-status`.
    ExportStatus {
        #[arg(long, env = "FLOTILLA_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
}

fn labels(text: &str) -> anyhow::Result<flotilla_shared::labels::Labels> {
    Ok(if text.trim().is_empty() {
        Default::default()
    } else {
        flotilla_shared::labels::parse_labels(text).context("--labels")?
    })
}

/// Writes a file whole: a temp file renamed over it.
fn write_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| path.display().to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Colours only on a terminal: logs go to files and journals too.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match args.command {
        Some(Command::EnrollRequest {
            token,
            cluster_name,
            labels: l,
            state_dir,
            out,
        }) => {
            flotilla_shared::objects::validate_name(&cluster_name).context("--cluster-name")?;
            let bytes = flotilla_agent::files::enroll_request(
                &state_dir,
                &token,
                &cluster_name,
                &labels(&l)?,
            )?;
            write_file(&out, &bytes)?;
            println!(
                "enrolment request for cluster {cluster_name} written to {}: answer it with \
                 `flotilla cluster enroll --request FILE -o RESPONSE`",
                out.display()
            );
        }
        Some(Command::Enroll {
            response,
            state_dir,
        }) => {
            let bytes = std::fs::read(&response).with_context(|| response.display().to_string())?;
            let cluster = flotilla_agent::files::enroll_response(&state_dir, &bytes)
                .with_context(|| response.display().to_string())?;
            println!("cluster {cluster} enrolled; its hub's signing key is pinned");
        }
        Some(Command::Import {
            file,
            state_dir,
            allow_downgrade,
        }) => {
            let bytes = std::fs::read(&file).with_context(|| file.display().to_string())?;
            let message = flotilla_agent::import_file(&state_dir, &bytes, allow_downgrade)
                .await
                .with_context(|| file.display().to_string())?;
            println!("{message}");
        }
        Some(Command::ExportStatus { state_dir, out }) => {
            let bytes = flotilla_agent::export_status_file(&state_dir).await?;
            write_file(&out, &bytes)?;
            println!(
                "status report written to {} ({} bytes)",
                out.display(),
                bytes.len()
            );
        }
        None => run(args.run).await?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let cluster_name = args
        .cluster_name
        .context("--cluster-name (or FLOTILLA_AGENT_CLUSTER_NAME) is required")?;
    let state_dir = args
        .state_dir
        .context("--state-dir (or FLOTILLA_AGENT_STATE_DIR) is required")?;
    let config = flotilla_agent::Config {
        hub: args.hub.filter(|h| !h.trim().is_empty()),
        token: args.token.filter(|t| !t.trim().is_empty()),
        cluster_name,
        labels: labels(&args.labels)?,
        kubeconfig: args.kubeconfig,
        state_dir: std::path::absolute(&state_dir).context("--state-dir")?,
        oci_registry: args.oci_registry.filter(|r| !r.trim().is_empty()),
        metrics_listen: args.metrics_listen,
        protocol_v1_only: args.protocol_v1_only,
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
