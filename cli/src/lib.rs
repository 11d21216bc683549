//! The operator CLI `flotilla`: arguments, calls to the hub's HTTP API, and output as
//! tables (pure functions of the API's typed views, `flotilla_shared::api`), JSON or
//! YAML.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use flotilla_shared::api::{
    ApplyResponse, BundleView, ClusterBundleView, ClusterView, DriftObject, DriftView, ErrorBody,
    HeldContentView, Imported, LabelPatch, NotificationView, Page, RolloutHistoryView, RolloutView,
    SecretBody, SecretView, SigningKeyView, SourceView, TokenRequest, TokenResponse,
};
use flotilla_shared::labels::LabelEdit;
use flotilla_shared::objects::{parse_duration, validate_name, GitSourceSpec, Target, API_VERSION};
use flotilla_shared::selector::LabelSelector;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Default address of the hub's HTTP API, as `flotilla-hub` listens by default.
pub const DEFAULT_HUB: &str = "http://127.0.0.1:7080";
/// Where the hub keeps its data unless told otherwise (the README's example); on
/// the hub's own host the CLI trusts the CA found there.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/flotilla";

/// Long enough for a slow apply on a busy hub, short enough that a wedged hub does not
/// hang a script forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A hub on a reachable network answers a connect within seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Operate a Flotilla fleet through the hub's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version)]
pub struct Cli {
    /// URL of the hub's HTTP API.
    #[arg(long, global = true, env = "FLOTILLA_HUB", default_value = DEFAULT_HUB)]
    pub hub: String,
    /// API token (the hub writes an admin token to DATA_DIR/admin-token).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that verifies an https:// hub: the hub's `ca.pem`, or
    /// the CA of its --api-tls-cert. Only this CA is trusted then.
    #[arg(long, global = true, env = "FLOTILLA_CA", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The hub's data directory, when the hub runs on this host: without
    /// --ca-file, its `ca.pem` (if readable) is trusted besides the system's roots.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_DATA_DIR",
        value_name = "DIR",
        default_value = DEFAULT_DATA_DIR
    )]
    pub data_dir: std::path::PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join tokens for enrolling agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Git repositories the hub tracks.
    #[command(subcommand)]
    Source(SourceCommand),
    /// Create or update the declarative objects (GitSource, ClusterGroup) in a file.
    Apply {
        /// File to read, or `-` for standard input.
        #[arg(short = 'f', long = "filename", env = "FLOTILLA_APPLY_FILE")]
        file: String,
    },
    /// Credentials for private repositories (and webhook secrets), stored in the hub
    /// and referred to by name (`source add --secret`, `spec.secretRef`). Never shown.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Notifications (`kind: Notification`, created with `apply`): list them
    /// with their undelivered messages, or delete one.
    #[command(subcommand)]
    Notification(NotificationCommand),
    /// Enrolled clusters.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Bundles and their state on each cluster.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Drift events: managed objects changed or deleted behind Flotilla's back.
    #[command(subcommand)]
    Drift(DriftCommand),
    /// The key the hub signs every desired set with (agents pin it at enrolment).
    #[command(subcommand, name = "signing-key")]
    SigningKey(SigningKeyCommand),
    /// Offline: each object's health (Current, InProgress, Failed, Terminating,
    /// NotFound, Unknown) and reason, from manifests or `kubectl get -o yaml`.
    Health {
        /// File to read (several YAML documents, or a `kind: List`), or `-` for
        /// standard input.
        #[arg(short = 'f', long = "filename", env = "FLOTILLA_HEALTH_FILE")]
        file: String,
        #[command(flatten)]
        output: Output,
    },
    /// Offline (no hub): print the manifests a cluster with these labels would
    /// receive from the bundle in DIR, in apply order, as a multi-document YAML
    /// stream. Helm and Kustomize bundles need helm/kustomize (PATH, --helm,
    /// --kustomize). Cluster groups are not known offline: `clusterGroup` and
    /// `clusterGroupSelector` customisations never match.
    Render(RenderArgs),
    /// Staged, health-gated rollouts of bundles (docs/rollouts.md).
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Offline (no hub): the partitions a rollout of the bundle in DIR goes
    /// through over the clusters in FILE, in order, with their clusters and
    /// maxUnavailable after rounding; names the clusters several partitions
    /// match (each belongs to the first) and those none matches (they form the
    /// last partition, "unmatched").
    Plan {
        /// The bundle directory (the one holding flotilla.yaml/fleet.yaml).
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A YAML file of `Cluster` (metadata.name, metadata.labels) and
        /// `ClusterGroup` documents (apiVersion flotilla.io/v1alpha1), or `-`
        /// for standard input.
        #[arg(long, value_name = "FILE", env = "FLOTILLA_ROLLOUT_CLUSTERS")]
        clusters: String,
        #[command(flatten)]
        output: Output,
    },
    /// The bundle's current rollout: partitions, each cluster's progress, and why
    /// it waits, halted or rolled back.
    Status {
        /// Bundle name.
        bundle: String,
        #[command(flatten)]
        output: Output,
    },
    /// Stop admitting clusters to the bundle's rollout (those that have the
    /// revision keep it).
    Pause {
        /// Bundle name.
        bundle: String,
    },
    /// Continue a paused or halted rollout.
    Resume {
        /// Bundle name.
        bundle: String,
    },
    /// Return every cluster that got the rollout's revision to the last revision
    /// that completed a rollout.
    Rollback {
        /// Bundle name.
        bundle: String,
    },
    /// The bundle's rollouts: revision, start, end, outcome.
    History {
        /// Bundle name.
        bundle: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum DriftCommand {
    /// List drift events, oldest first.
    List {
        /// Only this cluster's events.
        #[arg(long, env = "FLOTILLA_DRIFT_CLUSTER")]
        cluster: Option<String>,
        /// Only this bundle's events.
        #[arg(long, env = "FLOTILLA_DRIFT_BUNDLE")]
        bundle: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Show one drift event with its field-level diff.
    Show {
        /// Event id (from `drift list`).
        id: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The bundle directory (the one holding flotilla.yaml/fleet.yaml, if any).
    #[arg(value_name = "DIR")]
    pub dir: std::path::PathBuf,
    /// A label of the cluster, `key=value` (repeat, or separate with commas).
    #[arg(
        short = 'l',
        long = "label",
        value_name = "KEY=VALUE",
        env = "FLOTILLA_RENDER_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// The cluster's name, for `clusterName` customisations.
    #[arg(
        long,
        value_name = "NAME",
        env = "FLOTILLA_RENDER_CLUSTER_NAME",
        default_value = "local"
    )]
    pub cluster_name: String,
    /// The cluster's Kubernetes version (Helm's `.Capabilities.KubeVersion`, e.g.
    /// v1.30.2); default: helm's own.
    #[arg(long, value_name = "VERSION", env = "FLOTILLA_RENDER_KUBE_VERSION")]
    pub kube_version: Option<String>,
    /// An API version the cluster serves (Helm's `.Capabilities.APIVersions`, e.g.
    /// `monitoring.coreos.com/v1` or `apps/v1/Deployment`); repeatable, or
    /// comma-separated in the environment. Used with --kube-version; default:
    /// helm's own set.
    #[arg(
        long = "api-versions",
        value_name = "API_VERSION",
        env = "FLOTILLA_RENDER_API_VERSIONS",
        value_delimiter = ',',
        requires = "kube_version"
    )]
    pub api_versions: Vec<String>,
    /// The bundle's name (Helm's default release name); default: DIR's name.
    #[arg(long, value_name = "NAME", env = "FLOTILLA_RENDER_BUNDLE_NAME")]
    pub bundle_name: Option<String>,
    /// The helm program (default: `helm` on PATH).
    #[arg(long, value_name = "PATH", env = "FLOTILLA_HELM")]
    pub helm: Option<std::path::PathBuf>,
    /// The kustomize program (default: `kustomize` on PATH).
    #[arg(long, value_name = "PATH", env = "FLOTILLA_KUSTOMIZE")]
    pub kustomize: Option<std::path::PathBuf>,
    /// URL prefix of a chart repository or OCI registry the bundle may fetch its
    /// chart from, as the hub's flag of that name (repeat, or separate with commas).
    #[arg(
        long,
        value_name = "URL-PREFIX",
        env = "FLOTILLA_HELM_REPO_ALLOW",
        value_delimiter = ','
    )]
    pub helm_repo_allow: Vec<String>,
    /// Instead of the objects, print what would change on this enrolled cluster
    /// (asks the hub): the objects the render gives compared with those of the
    /// content the cluster's agent acknowledged for the bundle named
    /// --bundle-name (`+` created, `-` pruned, `~` changed, with each field).
    /// Secret values are compared and shown as hashes.
    #[arg(long, value_name = "CLUSTER", env = "FLOTILLA_RENDER_DIFF_AGAINST")]
    pub diff_against: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new single-use join token, alone on stdout.
    Create {
        /// How long the token stays valid (e.g. 30m, 1h, 1d).
        #[arg(long, env = "FLOTILLA_TOKEN_TTL", default_value = "1h", value_parser = duration_arg)]
        ttl: String,
        /// Binds the token to this cluster name: an agent asking for another
        /// name is refused.
        #[arg(long, value_parser = name_arg)]
        cluster_name: Option<String>,
        /// Binds the token to these labels, k=v,k2=v2: the cluster gets them,
        /// whatever its agent claims. A token bound to a name only gives no
        /// labels (`flotilla cluster label` adds them later).
        #[arg(long, value_parser = labels_arg)]
        labels: Option<flotilla_shared::labels::Labels>,
        /// `table` prints the token alone; `json`/`yaml` add its id and expiry.
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum SourceCommand {
    /// Track a Git repository.
    Add(Box<SourceAdd>),
    /// List sources with their last fetched commit and last error.
    List(Output),
    /// Show one source.
    Get {
        /// Source name.
        name: String,
        #[command(flatten)]
        output: Output,
    },
    /// Stop tracking a source.
    Delete {
        /// Source name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct SourceAdd {
    /// Source name (lowercase letters, digits and '-').
    pub name: String,
    /// Repository URL.
    #[arg(long, env = "FLOTILLA_SOURCE_REPO")]
    pub repo: String,
    /// Branch to follow (default: main).
    #[arg(long, env = "FLOTILLA_SOURCE_BRANCH", group = "gitref")]
    pub branch: Option<String>,
    /// Tag to deploy.
    #[arg(long, env = "FLOTILLA_SOURCE_TAG", group = "gitref")]
    pub tag: Option<String>,
    /// Commit to deploy.
    #[arg(long, env = "FLOTILLA_SOURCE_REVISION", group = "gitref")]
    pub revision: Option<String>,
    /// Bundle directories (globs); repeat for several. Default: each directory with a
    /// flotilla.yaml or fleet.yaml, else the root.
    // No `env`: a repeated value has no unambiguous single-variable form.
    #[arg(long = "path", value_name = "GLOB")]
    pub paths: Vec<String>,
    /// Clusters to deploy to, as a label selector (`env=prod,tier!=edge`); repeat for
    /// several. Default: every cluster.
    // No `env`: selectors contain commas, so a list in one variable would be ambiguous.
    #[arg(long = "target", value_name = "SELECTOR", value_parser = selector_arg)]
    pub targets: Vec<LabelSelector>,
    /// How often to fetch (e.g. 15s, 1m).
    #[arg(long, env = "FLOTILLA_SOURCE_POLL", value_parser = duration_arg)]
    pub poll: Option<String>,
    /// Hub secret with the repository's credentials (`flotilla secret create`).
    #[arg(long, env = "FLOTILLA_SOURCE_SECRET", value_name = "NAME")]
    pub secret: Option<String>,
    /// Hub secret whose webhook secret alone authenticates this source's push
    /// hooks (`flotilla secret create NAME --webhook-secret-file F`).
    #[arg(long, env = "FLOTILLA_SOURCE_WEBHOOK_SECRET", value_name = "NAME")]
    pub webhook_secret: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NotificationCommand {
    /// List notifications: sink, events, messages waiting and the last failure.
    List(Output),
    /// Delete a notification and its undelivered messages.
    Delete {
        /// Notification name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create or replace a secret. HTTPS: `--username U --password-file F` (a
    /// token goes in the password file); SSH: `--ssh-key-file K --known-hosts-file H`.
    Create(SecretCreate),
    /// List secrets: names and which fields they hold, never the values.
    List(Output),
    /// Delete a secret.
    Delete {
        /// Secret name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct SecretCreate {
    /// Secret name (lowercase letters, digits and '-').
    pub name: String,
    /// User name for HTTPS (default `git`; forges take any name with a token).
    #[arg(long, env = "FLOTILLA_SECRET_USERNAME")]
    pub username: Option<String>,
    /// File holding the HTTPS password or token (`-`: standard input); one
    /// trailing newline is dropped.
    #[arg(long, env = "FLOTILLA_SECRET_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<String>,
    /// File holding the SSH private key (unencrypted, OpenSSH or PEM).
    #[arg(
        long,
        env = "FLOTILLA_SECRET_SSH_KEY_FILE",
        value_name = "FILE",
        requires = "known_hosts_file"
    )]
    pub ssh_key_file: Option<String>,
    /// known_hosts lines for the SSH server (host keys are always checked).
    #[arg(long, env = "FLOTILLA_SECRET_KNOWN_HOSTS_FILE", value_name = "FILE")]
    pub known_hosts_file: Option<String>,
    /// File holding the webhook secret of the sources using this secret.
    #[arg(long, env = "FLOTILLA_SECRET_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    pub webhook_secret_file: Option<String>,
    /// File holding a URL that is itself a credential: a Slack notification's
    /// incoming-webhook URL.
    #[arg(long, env = "FLOTILLA_SECRET_URL_FILE", value_name = "FILE")]
    pub url_file: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// List clusters: labels, connection, versions, bundle counts.
    List(Output),
    /// Show one cluster and its bundles.
    Get {
        /// Cluster name.
        name: String,
        #[command(flatten)]
        output: Output,
    },
    /// Set (`k=v`) or remove (`k-`) labels, as `kubectl label` does.
    Label {
        /// Cluster name.
        name: String,
        /// Edits: `key=value` sets, `key-` removes.
        #[arg(required = true, value_parser = clap::value_parser!(LabelEdit))]
        edits: Vec<LabelEdit>,
    },
    /// Delete a cluster: its certificate is refused from now on and its agent
    /// cut off; its statuses and drift history go. The objects the agent
    /// applied stay in that cluster.
    Delete {
        /// Cluster name.
        name: String,
    },
    /// Take an air-gapped agent's status file (`flotilla-agent export-status`)
    /// into the hub: its statuses and drift events, each exactly once however
    /// often the file is imported. The next `bundle export` acknowledges them.
    ImportStatus {
        /// The status file.
        file: String,
    },
    /// Answer an air-gapped agent's enrolment request file
    /// (`flotilla-agent enroll-request`) with a response file for
    /// `flotilla-agent enroll --response`. Spends the join token.
    Enroll {
        /// The request file.
        #[arg(long)]
        request: String,
        /// Where to write the response.
        #[arg(short = 'o', long = "out")]
        out: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SigningKeyCommand {
    /// Show the current key's id and public key.
    Show(Output),
    /// Replace the signing key by a new one that the current one endorses.
    /// Connected agents get their set signed anew and follow; agents away
    /// follow when their next set (or file) arrives, however many rotations
    /// later. The old private key is deleted.
    Rotate(Output),
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// List bundles with their revision and readiness.
    List(Output),
    /// Show one bundle and its state on each cluster.
    Get {
        /// Bundle name.
        name: String,
        #[command(flatten)]
        output: Output,
    },
    /// Write a cluster's desired state to a file for `flotilla-agent import`:
    /// the set signed by the hub and every content it names (gzip).
    Export {
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// Where to write the file.
        #[arg(short = 'o', long = "out")]
        out: String,
        /// A status file the agent wrote (`flotilla-agent export-status`): the
        /// contents it holds are left out.
        #[arg(long)]
        since: Option<String>,
    },
}

/// Output format of read commands.
#[derive(Debug, Args, Clone, Copy)]
pub struct Output {
    /// Output format.
    #[arg(short = 'o', long = "output", env = "FLOTILLA_OUTPUT", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

fn duration_arg(s: &str) -> Result<String, String> {
    parse_duration(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn name_arg(s: &str) -> Result<String, String> {
    validate_name(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn labels_arg(s: &str) -> Result<flotilla_shared::labels::Labels, String> {
    flotilla_shared::labels::parse_labels(s).map_err(|e| e.to_string())
}

fn selector_arg(s: &str) -> Result<LabelSelector, String> {
    LabelSelector::parse(s).map_err(|e| e.to_string())
}

/// Why a command failed; printed as `error: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the hub at {hub}: {reason} (is flotilla-hub running? set --hub or FLOTILLA_HUB)")]
    Unreachable { hub: String, reason: String },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("reading {file}: {reason}")]
    Input { file: String, reason: String },
    #[error("unexpected answer from the hub: {0}")]
    Response(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot render: {0}")]
    Render(String),
}

/// Parses `args` (program name first) and runs the command, writing results to
/// `stdout` and errors and hints to `stderr`. Returns the process exit code: 0 on
/// success, 1 on a failed command, 2 on bad arguments.
pub async fn run<I, T>(args: I, stdout: &mut dyn Write, stderr: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                write!(stderr, "{text}")
            } else {
                write!(stdout, "{text}")
            };
            return e.exit_code();
        }
    };
    match execute(cli, stdout, stderr).await {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(stderr, "error: {e}");
            1
        }
    }
}

async fn execute(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), CliError> {
    // Offline commands never touch the hub.
    if let Command::Health { file, output } = &cli.command {
        let (label, text) = read_input(file)?;
        let objects =
            flotilla_shared::health::objects_in_yaml(&text).map_err(|reason| CliError::Input {
                file: label,
                reason,
            })?;
        return print(out, output.output, &health_report(&objects), health_table);
    }
    if let Command::Rollout(RolloutCommand::Plan {
        dir,
        clusters,
        output,
    }) = &cli.command
    {
        let v = rollout_plan(dir, clusters)?;
        return print(out, output.output, &v, rollout_plan_table);
    }
    let trust = Trust::choose(cli.ca_file.as_deref(), &cli.data_dir);
    let api = Api::new(&cli.hub, cli.token.clone(), &trust)?;
    let now = SystemTime::now();
    match cli.command {
        Command::Render(args) => render(&args, &api, out, err).await?,
        Command::Token(TokenCommand::Create {
            ttl,
            cluster_name,
            labels,
            output,
        }) => {
            let body = TokenRequest {
                ttl: Some(ttl),
                cluster_name: cluster_name.clone(),
                labels: labels.clone(),
            };
            let v: TokenResponse = api
                .send("POST", "/api/v1/tokens", Some(Body::json(&body)?))
                .await?;
            if output.output != Format::Table {
                return print(out, output.output, &v, |_| String::new());
            }
            writeln!(out, "{}", v.token)?;
            let expires = cell(&v.expires_at);
            let name = cluster_name.as_deref().unwrap_or("NAME");
            let bound = match (&cluster_name, &labels) {
                (None, None) => String::new(),
                (_, Some(l)) => format!(
                    ", bound to {} with labels {{{}}}",
                    cluster_name.as_deref().unwrap_or("any name"),
                    l.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                (Some(n), None) => format!(", bound to {n} (no labels)"),
            };
            writeln!(
                err,
                "single-use join token{bound}, expires {expires}; enrol with: flotilla-agent --token <token> --cluster-name {name} ..."
            )?;
        }
        Command::Source(SourceCommand::Add(add)) => {
            let yaml = source_yaml(&add)?;
            let v = api.apply(&format!("source add {}", add.name), yaml).await?;
            out.write_all(applied_lines(&v).as_bytes())?;
        }
        Command::Source(SourceCommand::List(o)) => {
            let v: Vec<SourceView> = api.list("/api/v1/sources").await?;
            print(out, o.output, &v, |v| sources_table(v, now))?;
        }
        Command::Source(SourceCommand::Get { name, output }) => {
            let v: SourceView = api
                .send("GET", &format!("/api/v1/sources/{}", segment(&name)), None)
                .await?;
            print(out, output.output, &v, |v| source_details(v, now))?;
        }
        Command::Source(SourceCommand::Delete { name }) => {
            api.send_raw(
                "DELETE",
                &format!("/api/v1/sources/{}", segment(&name)),
                None,
            )
            .await?;
            writeln!(out, "gitsource/{name} deleted")?;
        }
        Command::Secret(SecretCommand::Create(c)) => {
            let body = Body::json(&secret_body(&c)?)?;
            api.send_raw(
                "PUT",
                &format!("/api/v1/secrets/{}", segment(&c.name)),
                Some(body),
            )
            .await?;
            writeln!(out, "secret/{} configured", c.name)?;
        }
        Command::Notification(NotificationCommand::List(o)) => {
            let v: Vec<NotificationView> = api.list("/api/v1/notifications").await?;
            print(out, o.output, &v, |v| notifications_table(v))?;
        }
        Command::Notification(NotificationCommand::Delete { name }) => {
            api.send_raw(
                "DELETE",
                &format!("/api/v1/notifications/{}", segment(&name)),
                None,
            )
            .await?;
            writeln!(out, "notification/{name} deleted")?;
        }
        Command::Secret(SecretCommand::List(o)) => {
            let v: Vec<SecretView> = api.list("/api/v1/secrets").await?;
            print(out, o.output, &v, |v| secrets_table(v))?;
        }
        Command::Secret(SecretCommand::Delete { name }) => {
            api.send_raw(
                "DELETE",
                &format!("/api/v1/secrets/{}", segment(&name)),
                None,
            )
            .await?;
            writeln!(out, "secret/{name} deleted")?;
        }
        Command::Apply { file } => {
            let (label, text) = read_input(&file)?;
            let v = api.apply(&label, text).await?;
            out.write_all(applied_lines(&v).as_bytes())?;
        }
        Command::Cluster(ClusterCommand::List(o)) => {
            let v: Vec<ClusterView> = api.list("/api/v1/clusters").await?;
            print(out, o.output, &v, |v| clusters_table(v, now))?;
        }
        Command::Cluster(ClusterCommand::Get { name, output }) => {
            let v: ClusterView = api
                .send("GET", &format!("/api/v1/clusters/{}", segment(&name)), None)
                .await?;
            print(out, output.output, &v, |v| cluster_details(v, now))?;
        }
        Command::Cluster(ClusterCommand::Label { name, edits }) => {
            let body = Body::json(&label_body(&edits))?;
            api.send_raw(
                "PATCH",
                &format!("/api/v1/clusters/{}/labels", segment(&name)),
                Some(body),
            )
            .await?;
            writeln!(out, "cluster/{name} labeled")?;
        }
        Command::Cluster(ClusterCommand::Delete { name }) => {
            api.send_raw(
                "DELETE",
                &format!("/api/v1/clusters/{}", segment(&name)),
                None,
            )
            .await?;
            writeln!(
                out,
                "cluster/{name} deleted (its certificate is refused from now on; \
                 what its agent applied stays in the cluster)"
            )?;
        }
        Command::Bundle(BundleCommand::List(o)) => {
            let v: Vec<BundleView> = api.list("/api/v1/bundles").await?;
            print(out, o.output, &v, |v| bundles_table(v))?;
        }
        Command::Bundle(BundleCommand::Export {
            cluster,
            out: file,
            since,
        }) => {
            let body = match &since {
                Some(f) => read_bytes(f)?,
                None => Vec::new(),
            };
            let bytes = api
                .send_raw(
                    "POST",
                    &format!("/api/v1/clusters/{}/export", segment(&cluster)),
                    Some(Body::Bytes(body)),
                )
                .await?;
            write_bytes(&file, &bytes)?;
            writeln!(
                out,
                "desired state of cluster/{cluster} written to {file} ({} bytes)",
                bytes.len()
            )?;
        }
        Command::Cluster(ClusterCommand::ImportStatus { file }) => {
            let body = read_bytes(&file)?;
            let v: Imported = api
                .send("POST", "/api/v1/status-files", Some(Body::Bytes(body)))
                .await
                .map_err(|e| refused_file(&file, e))?;
            writeln!(
                out,
                "cluster/{}: {} statuses and {} drift events imported ({} statuses and {} drift \
                 events were imported before; {} refused)",
                cell(&v.cluster),
                v.statuses,
                v.drift_events,
                v.statuses_already,
                v.drift_already,
                v.refused
            )?;
        }
        Command::Cluster(ClusterCommand::Enroll { request, out: file }) => {
            let body = read_bytes(&request)?;
            let bytes = api
                .send_raw("POST", "/api/v1/enrolment-files", Some(Body::Bytes(body)))
                .await
                .map_err(|e| refused_file(&request, e))?;
            write_bytes(&file, &bytes)?;
            writeln!(
                out,
                "enrolment response written to {file}: give it to `flotilla-agent enroll --response`"
            )?;
        }
        Command::SigningKey(SigningKeyCommand::Show(o)) => {
            let v: SigningKeyView = api.send("GET", "/api/v1/signing-key", None).await?;
            print(out, o.output, &v, signing_key_details)?;
        }
        Command::SigningKey(SigningKeyCommand::Rotate(o)) => {
            let v: SigningKeyView = api.send("POST", "/api/v1/signing-key/rotate", None).await?;
            print(out, o.output, &v, signing_key_details)?;
        }
        Command::Bundle(BundleCommand::Get { name, output }) => {
            let v: BundleView = api
                .send("GET", &format!("/api/v1/bundles/{}", segment(&name)), None)
                .await?;
            print(out, output.output, &v, bundle_details)?;
        }
        Command::Drift(DriftCommand::List {
            cluster,
            bundle,
            output,
        }) => {
            let mut query = Vec::new();
            if let Some(c) = cluster {
                query.push(format!("cluster={}", segment(&c)));
            }
            if let Some(b) = bundle {
                query.push(format!("bundle={}", segment(&b)));
            }
            let path = if query.is_empty() {
                "/api/v1/drift".to_string()
            } else {
                format!("/api/v1/drift?{}", query.join("&"))
            };
            let v: Vec<DriftView> = api.list(&path).await?;
            print(out, output.output, &v, |v| drift_table(v, now))?;
        }
        Command::Drift(DriftCommand::Show { id, output }) => {
            let v: DriftView = api
                .send("GET", &format!("/api/v1/drift/{}", segment(&id)), None)
                .await?;
            print(out, output.output, &v, drift_details)?;
        }
        Command::Rollout(RolloutCommand::Status { bundle, output }) => {
            let v: RolloutView = api
                .send(
                    "GET",
                    &format!("/api/v1/rollouts/{}", segment(&bundle)),
                    None,
                )
                .await?;
            print(out, output.output, &v, rollout_details)?;
        }
        Command::Rollout(RolloutCommand::History { bundle, output }) => {
            let v: Vec<RolloutHistoryView> = api
                .send(
                    "GET",
                    &format!("/api/v1/rollouts/{}/history", segment(&bundle)),
                    None,
                )
                .await?;
            print(out, output.output, &v, |v| rollout_history_table(v))?;
        }
        Command::Rollout(RolloutCommand::Pause { bundle }) => {
            rollout_action(&api, out, &bundle, "pause", "paused").await?;
        }
        Command::Rollout(RolloutCommand::Resume { bundle }) => {
            rollout_action(&api, out, &bundle, "resume", "resumed").await?;
        }
        Command::Rollout(RolloutCommand::Rollback { bundle }) => {
            rollout_action(&api, out, &bundle, "rollback", "rolled back").await?;
        }
        Command::Health { .. } | Command::Rollout(RolloutCommand::Plan { .. }) => {}
    }
    Ok(())
}

async fn rollout_action(
    api: &Api,
    out: &mut dyn Write,
    bundle: &str,
    action: &str,
    done: &str,
) -> Result<(), CliError> {
    let v: RolloutView = api
        .send(
            "POST",
            &format!("/api/v1/rollouts/{}/{action}", segment(bundle)),
            None,
        )
        .await?;
    writeln!(
        out,
        "rollout of bundle/{bundle} ({}) {done}: {}",
        short(&v.revision),
        cell(&v.phase)
    )?;
    Ok(())
}

/// `rollout status`: the rollout, then one row per cluster in partition order.
pub fn rollout_details(r: &RolloutView) -> String {
    let mut pairs = vec![
        ("Bundle", cell(&r.bundle)),
        ("Revision", cell(&r.revision)),
        ("Previous", opt(&r.previous)),
        ("Phase", cell(&r.phase)),
        ("Reason", cell(&r.reason)),
        ("Started", cell(&r.started)),
    ];
    if r.ended.is_some() {
        pairs.push(("Ended", opt(&r.ended)));
    }
    pairs.push(("Max unavailable", r.max_unavailable.to_string()));
    pairs.push(("Max failures", r.max_failures.to_string()));
    if !r.unmatched.is_empty() {
        let names: Vec<String> = r.unmatched.iter().map(|n| cell(n)).collect();
        pairs.push(("Matched by no partition", names.join(",")));
    }
    if !r.matched_several.is_empty() {
        let names: Vec<String> = r.matched_several.keys().cloned().collect();
        pairs.push(("Matched by several", names.join(",")));
    }
    let mut out = describe(&pairs);
    out.push('\n');
    let mut rows = Vec::new();
    for p in &r.partitions {
        for c in &p.clusters {
            rows.push(vec![
                cell(&p.name),
                cell(&p.phase),
                p.max_unavailable.to_string(),
                cell(&c.cluster),
                cell(&c.progress),
                if c.connected { "yes" } else { "no" }.to_string(),
                cell(c.state.as_str()),
                cell(&c.message),
            ]);
        }
    }
    out.push_str(&table(
        &[
            "PARTITION",
            "PHASE",
            "MAX-UNAVAILABLE",
            "CLUSTER",
            "PROGRESS",
            "CONNECTED",
            "STATE",
            "MESSAGE",
        ],
        &rows,
    ));
    let events: Vec<Vec<String>> = r
        .events
        .iter()
        .map(|e| vec![cell(&e.at), cell(&e.kind), cell(&e.message)])
        .collect();
    if !events.is_empty() {
        out.push('\n');
        out.push_str(&table(&["AT", "EVENT", "MESSAGE"], &events));
    }
    out
}

/// `rollout history`.
pub fn rollout_history_table(v: &[RolloutHistoryView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|r| {
            vec![
                short(&r.revision),
                cell(&r.started),
                opt(&r.ended),
                cell(&r.outcome),
                cell(&r.reason),
            ]
        })
        .collect();
    table(
        &["REVISION", "STARTED", "ENDED", "OUTCOME", "REASON"],
        &rows,
    )
}

/// `flotilla rollout plan`: the planner's partitions for a bundle directory and a
/// file of clusters, as JSON (`partitions`, `matchedSeveral`, `unmatched`).
fn rollout_plan(dir: &std::path::Path, clusters_file: &str) -> Result<Value, CliError> {
    use flotilla_shared::rollout;
    let files = flotilla_render::render::read_bundle_dir(dir).map_err(|e| CliError::Input {
        file: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let in_dir = |e: flotilla_shared::bundle::RenderError| {
        let mut file = dir.join(&e.file).display().to_string();
        if let Some(line) = e.line {
            file.push_str(&format!(":{line}"));
        }
        CliError::Input {
            file,
            reason: e.reason,
        }
    };
    let spec = flotilla_shared::fleetyaml::parse_spec(&files).map_err(in_dir)?;
    let strategy = spec.rollout().map_err(in_dir)?.unwrap_or_default();
    let (label, text) = read_input(clusters_file)?;
    let (clusters, groups) =
        rollout::parse_fleet_file(&label, &text).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(rollout_plan_json(&rollout::partition(
        &strategy, &clusters, &groups,
    )))
}

/// The JSON of a partition plan (what `rollout plan -o json` prints).
pub fn rollout_plan_json(plan: &flotilla_shared::rollout::PartitionPlan) -> Value {
    json!({
        "partitions": plan.partitions.iter().map(|p| json!({
            "name": p.name,
            "clusters": p.clusters,
            "maxUnavailable": p.max_unavailable,
            "maxOffline": p.max_offline,
        })).collect::<Vec<_>>(),
        "matchedSeveral": plan.matched_several,
        "unmatched": plan.unmatched,
        "maxUnavailable": plan.max_unavailable,
        "maxUnavailablePartitions": plan.max_unavailable_partitions,
        "maxFailures": plan.max_failures,
    })
}

/// `rollout plan`'s table: one row per partition, in order, then the clusters
/// several partitions or none matched.
pub fn rollout_plan_table(v: &Value) -> String {
    let parts = v["partitions"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let names: Vec<String> = rows_of(&p["clusters"]).iter().map(plain).collect();
            vec![
                (i + 1).to_string(),
                plain(&p["name"]),
                names.len().to_string(),
                plain(&p["maxUnavailable"]),
                plain(&p["maxOffline"]),
                if names.is_empty() {
                    "<none>".into()
                } else {
                    names.join(",")
                },
            ]
        })
        .collect();
    let mut s = table(
        &[
            "#",
            "PARTITION",
            "COUNT",
            "MAX-UNAVAILABLE",
            "MAX-OFFLINE",
            "CLUSTERS",
        ],
        &rows,
    );
    s.push_str(&format!(
        "bundle-wide: maxUnavailable {}, maxUnavailablePartitions {}, maxFailures {}\n",
        plain(&v["maxUnavailable"]),
        plain(&v["maxUnavailablePartitions"]),
        plain(&v["maxFailures"]),
    ));
    if let Some(several) = v["matchedSeveral"].as_object().filter(|m| !m.is_empty()) {
        s.push_str("matched by several partitions (each belongs to the first):\n");
        for (c, names) in several {
            let names: Vec<String> = rows_of(names).iter().map(plain).collect();
            s.push_str(&format!("  {c}: {}\n", names.join(", ")));
        }
    }
    let unmatched: Vec<String> = rows_of(&v["unmatched"]).iter().map(plain).collect();
    if !unmatched.is_empty() {
        s.push_str(&format!(
            "matched by no partition (they form the last partition, \"unmatched\"): {}\n",
            unmatched.join(", ")
        ));
    }
    s
}

/// `flotilla render`: the same rendering code as the hub, on a local directory.
async fn render(
    args: &RenderArgs,
    api: &Api,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CliError> {
    let mut labels = flotilla_shared::labels::Labels::new();
    for l in &args.labels {
        let parsed =
            flotilla_shared::labels::parse_labels(l).map_err(|e| CliError::Usage(e.to_string()))?;
        labels.extend(parsed);
    }
    let dir = std::path::absolute(&args.dir).unwrap_or_else(|_| args.dir.clone());
    let files = flotilla_render::render::read_bundle_dir(&dir).map_err(|e| CliError::Input {
        file: args.dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let bundle_name = args.bundle_name.clone().unwrap_or_else(|| {
        let base = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        flotilla_shared::bundle::bundle_name(&base, "")
    });
    let tools = flotilla_render::render::Tools::new(args.helm.clone(), args.kustomize.clone())
        .with_helm_repo_allow(args.helm_repo_allow.clone());
    let cluster = flotilla_shared::targeting::ClusterInfo {
        name: args.cluster_name.clone(),
        labels,
    };
    match flotilla_render::render::render_for_cluster(
        &tools,
        &bundle_name,
        &files,
        &cluster,
        &[],
        args.kube_version.as_deref(),
        &args.api_versions,
    )
    .await
    {
        Ok(Some(r)) => match &args.diff_against {
            None => {
                out.write_all(flotilla_render::render::to_yaml_stream(&bundle_name, &r).as_bytes())?
            }
            Some(cluster) => diff_against(api, cluster, &bundle_name, &r, out, err).await?,
        },
        Ok(None) => writeln!(err, "this cluster does not get the bundle (doNotDeploy)")?,
        Err(e) => return Err(CliError::Render(e.to_string())),
    }
    Ok(())
}

/// `flotilla render --diff-against CLUSTER`: the local render against the content
/// the cluster holds of the bundle, both as the agent applies them.
async fn diff_against(
    api: &Api,
    cluster: &str,
    bundle: &str,
    local: &flotilla_shared::bundle::Rendered,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CliError> {
    use flotilla_shared::applied;
    let v: HeldContentView = api
        .send(
            "GET",
            &format!(
                "/api/v1/clusters/{}/bundles/{}",
                segment(cluster),
                segment(bundle)
            ),
            None,
        )
        .await?;
    let held = &v.content;
    // One view of which kinds are namespaced for both sides.
    let mut scopes = applied::Scopes::from_objects(local.manifests.iter().map(|m| &m.object));
    scopes.add(held.manifests.iter().map(|m| &m.object));
    let changes = applied::diff(
        &applied::applied(bundle, held, &scopes),
        &applied::applied(bundle, local, &scopes),
    );
    let mut text = applied::diff_text(&changes);
    if held.options != local.options {
        text.push_str(&format!(
            "~ bundle options: {} -> {}\n",
            serde_json::to_string(&held.options).unwrap_or_default(),
            serde_json::to_string(&local.options).unwrap_or_default()
        ));
    }
    out.write_all(text.as_bytes())?;
    writeln!(
        err,
        "compared with content {} (revision {}) that cluster {cluster} holds of bundle {bundle}: {} change(s)",
        cell(&v.content_hash),
        cell(&v.revision),
        changes.len()
    )?;
    Ok(())
}

fn read_input(file: &str) -> Result<(String, String), CliError> {
    let input_err = |e: std::io::Error| CliError::Input {
        file: file.to_string(),
        reason: e.to_string(),
    };
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(input_err)?;
        Ok(("stdin".into(), text))
    } else {
        Ok((
            file.to_string(),
            std::fs::read_to_string(file).map_err(input_err)?,
        ))
    }
}

fn print<T: Serialize>(
    out: &mut dyn Write,
    format: Format,
    v: &T,
    table: impl Fn(&T) -> String,
) -> Result<(), CliError> {
    let text = match format {
        Format::Table => table(v),
        Format::Json => {
            let mut s =
                serde_json::to_string_pretty(v).map_err(|e| CliError::Response(e.to_string()))?;
            s.push('\n');
            s
        }
        Format::Yaml => {
            serde_saphyr::to_string(v).map_err(|e| CliError::Response(e.to_string()))?
        }
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Requests

enum Body {
    Json(Vec<u8>),
    Yaml(String),
    Bytes(Vec<u8>),
}

impl Body {
    fn json<T: Serialize>(v: &T) -> Result<Body, CliError> {
        serde_json::to_vec(v)
            .map(Body::Json)
            .map_err(|e| CliError::Usage(format!("request body: {e}")))
    }
}

/// The hub's refusal of a file the operator gave, naming the file.
fn refused_file(file: &str, e: CliError) -> CliError {
    match e {
        CliError::Api { status, message } if (400..500).contains(&status) => CliError::Api {
            status,
            message: format!("{file}: {message}"),
        },
        other => other,
    }
}

fn read_bytes(file: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(file).map_err(|e| CliError::Input {
        file: file.to_string(),
        reason: e.to_string(),
    })
}

/// Writes a file whole (a temp file renamed over it): a reader never sees half.
fn write_bytes(file: &str, bytes: &[u8]) -> Result<(), CliError> {
    let path = std::path::Path::new(file);
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| CliError::Input {
            file: file.to_string(),
            reason: e.to_string(),
        })
}

pub fn signing_key_details(v: &SigningKeyView) -> String {
    let mut pairs = vec![
        ("Key id", cell(&v.key_id)),
        ("Public key", cell(&v.public_key)),
        ("Rotations", v.rotations.to_string()),
    ];
    if v.previous_key_id.is_some() {
        pairs.push(("Previous key id", opt(&v.previous_key_id)));
    }
    describe(&pairs)
}

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Which certificates verify an https:// hub. Verification is never skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// `--ca-file`: this CA only.
    Only(std::path::PathBuf),
    /// The hub's CA from its data directory on this host, besides the system's roots.
    AlsoDataDirCa(std::path::PathBuf),
    /// The system's roots (an operator's certificate from a public CA).
    System,
}

impl Trust {
    pub fn choose(ca_file: Option<&std::path::Path>, data_dir: &std::path::Path) -> Trust {
        if let Some(f) = ca_file {
            return Trust::Only(f.to_path_buf());
        }
        let ca = data_dir.join("ca.pem");
        if std::fs::File::open(&ca).is_ok() {
            Trust::AlsoDataDirCa(ca)
        } else {
            Trust::System
        }
    }
}

/// Whether a URL's host is this machine's loopback (the only place plain HTTP
/// may carry the admin token).
fn is_loopback_url(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Api {
    fn new(hub: &str, token: Option<String>, trust: &Trust) -> Result<Self, CliError> {
        let base = hub.trim_end_matches('/').to_string();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| CliError::Usage(format!("--hub {base:?}: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback_url(&url) => {}
            "http" => {
                return Err(CliError::Usage(format!(
                    "--hub {base}: plain HTTP reaches a hub only on a loopback address \
                     (the admin token would cross the network in clear); use https://"
                )))
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "--hub must be an https:// URL (or http:// on loopback), not {base:?}"
                )))
            }
        }
        // reqwest builds a TLS config even for http:// hubs; it takes the process-wide
        // provider (ring: the tree has no other).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT);
        let read_ca = |path: &std::path::Path| -> Result<Vec<reqwest::Certificate>, CliError> {
            let input = |reason: String| CliError::Input {
                file: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| input(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| input(format!("not a PEM certificate: {e}")))?;
            if certs.is_empty() {
                return Err(input("no certificate in the file".into()));
            }
            Ok(certs)
        };
        builder = match trust {
            Trust::Only(path) => builder.tls_certs_only(read_ca(path)?),
            Trust::AlsoDataDirCa(path) => builder.tls_certs_merge(read_ca(path)?),
            Trust::System => builder,
        };
        let http = builder
            .build()
            .map_err(|e| CliError::Usage(format!("HTTP client: {e}")))?;
        Ok(Api { base, token, http })
    }

    async fn apply(&self, file: &str, yaml: String) -> Result<ApplyResponse, CliError> {
        self.send(
            "POST",
            &format!("/api/v1/apply?file={}", segment(file)),
            Some(Body::Yaml(yaml)),
        )
        .await
    }

    /// Sends one request; a 2xx answer read as the view `T`, or the hub's error. An
    /// answer missing a field the view needs is an error, never a blank column.
    async fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Body>,
    ) -> Result<T, CliError> {
        let bytes = self.send_raw(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Response(format!("{method} {}: {e}", path_only(path))))
    }

    /// Every item of a list, following the hub's pages (`continue`) to the last.
    async fn list<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, CliError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let url = match &token {
                None => path.to_string(),
                Some(t) => format!("{path}{sep}continue={}", segment(t)),
            };
            let page: Page<T> = self.send("GET", &url, None).await?;
            items.extend(page.items);
            match page.continue_token {
                None => return Ok(items),
                // A hub that answers a page with its own token would never end.
                Some(t) if token.as_ref() == Some(&t) => {
                    return Err(CliError::Response(format!(
                        "GET {}: the hub sent the same continue token twice",
                        path_only(path)
                    )))
                }
                Some(t) => token = Some(t),
            }
        }
    }

    /// Sends one request; a 2xx answer's bytes or the hub's error.
    async fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Body>,
    ) -> Result<Vec<u8>, CliError> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req = match body {
            Some(Body::Json(v)) => req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(v),
            Some(Body::Yaml(s)) => req
                .header(reqwest::header::CONTENT_TYPE, "application/yaml")
                .body(s),
            Some(Body::Bytes(b)) => req
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(b),
            None => req,
        };
        let resp = req.send().await.map_err(|e| CliError::Unreachable {
            hub: self.base.clone(),
            reason: reqwest_reason(&e),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| CliError::Unreachable {
            hub: self.base.clone(),
            reason: reqwest_reason(&e),
        })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let mut message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or_else(|_| {
                    let t = text.trim();
                    if t.is_empty() {
                        status.to_string()
                    } else {
                        format!("{status}: {t}")
                    }
                });
            if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
                message.push_str(" (no token given: set --token or FLOTILLA_TOKEN)");
            }
            return Err(CliError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes.to_vec())
    }
}

/// The innermost cause, which says what actually happened ("Connection refused").
fn reqwest_reason(e: &reqwest::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    if e.is_timeout() {
        format!("timed out ({cur})")
    } else if cur.to_string().contains("certificate") {
        format!(
            "{cur} (the hub's TLS certificate is not trusted: give its CA with --ca-file \
             or FLOTILLA_CA, e.g. the hub's DATA_DIR/ca.pem)"
        )
    } else {
        cur.to_string()
    }
}

/// A request's path without its query (which may name clusters and tokens).
fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// Percent-encodes one path segment or query value.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The GitSource object `source add` applies, validated as the hub would.
pub fn source_yaml(add: &SourceAdd) -> Result<String, CliError> {
    let spec = GitSourceSpec {
        repo: add.repo.clone(),
        branch: add.branch.clone(),
        tag: add.tag.clone(),
        revision: add.revision.clone(),
        paths: add.paths.clone(),
        poll_interval: add.poll.clone(),
        targets: add.targets.iter().cloned().map(Target::selector).collect(),
        secret_ref: add.secret.clone(),
        webhook_secret_ref: add.webhook_secret.clone(),
    };
    validate_name(&add.name).map_err(|e| CliError::Usage(e.to_string()))?;
    spec.validate(&add.name)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let obj = json!({
        "apiVersion": API_VERSION,
        "kind": "GitSource",
        "metadata": {"name": add.name},
        "spec": spec,
    });
    serde_saphyr::to_string(&obj).map_err(|e| CliError::Usage(e.to_string()))
}

/// The body of `PUT /secrets/{name}`, from the files named on the command line.
fn secret_body(c: &SecretCreate) -> Result<SecretBody, CliError> {
    validate_name(&c.name).map_err(|e| CliError::Usage(e.to_string()))?;
    let read = |f: &Option<String>| -> Result<Option<String>, CliError> {
        match f {
            None => Ok(None),
            Some(f) => {
                let (_, text) = read_input(f)?;
                Ok(Some(text.strip_suffix('\n').unwrap_or(&text).to_string()))
            }
        }
    };
    let password = read(&c.password_file)?;
    let key = read(&c.ssh_key_file)?;
    let hosts = read(&c.known_hosts_file)?;
    let webhook = read(&c.webhook_secret_file)?;
    let url = read(&c.url_file)?.map(|u| u.trim().to_string());
    if password.is_none() && key.is_none() && webhook.is_none() && url.is_none() {
        return Err(CliError::Usage(
            "give --password-file, --ssh-key-file (with --known-hosts-file), --webhook-secret-file or --url-file"
                .into(),
        ));
    }
    // The key file keeps its final newline: ssh wants it.
    let key = key.map(|k| format!("{k}\n"));
    Ok(SecretBody {
        username: c.username.clone(),
        password,
        ssh_private_key: key,
        known_hosts: hosts,
        webhook_secret: webhook,
        url,
    })
}

/// `secret list`: names and which fields are set.
pub fn secrets_table(v: &[SecretView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|s| vec![cell(&s.name), s.fields.join(",")])
        .collect();
    table(&["NAME", "FIELDS"], &rows)
}

/// `notification list`.
pub fn notifications_table(v: &[NotificationView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|n| {
            let events: Vec<String> = n.events.iter().map(name_of).collect();
            vec![
                cell(&n.name),
                cell(&name_of(&n.sink)),
                n.url.as_deref().unwrap_or("(secret)").to_string(),
                events.join(","),
                n.queued.to_string(),
                n.last_error.as_deref().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "TYPE", "URL", "EVENTS", "QUEUED", "LAST ERROR"],
        &rows,
    )
}

/// The body of `PATCH /clusters/{name}/labels`: the last edit of a key wins.
pub fn label_body(edits: &[LabelEdit]) -> LabelPatch {
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    for e in edits {
        match e {
            LabelEdit::Set(k, v) => {
                remove.retain(|r| r != k);
                set.insert(k.clone(), v.clone());
            }
            LabelEdit::Remove(k) => {
                set.remove(k);
                if !remove.contains(k) {
                    remove.push(k.clone());
                }
            }
        }
    }
    LabelPatch { set, remove }
}

// ---------------------------------------------------------------------------------
// Formatting: pure functions of the API's views.

const NONE: &str = "<none>";

/// `health -o json`: `{apiVersion, kind, namespace, name, status, message}` per
/// object, in input order.
pub fn health_report(objects: &[Value]) -> Value {
    let s = |v: &Value| v.as_str().map_or(Value::Null, |s| Value::String(s.into()));
    Value::Array(
        objects
            .iter()
            .map(|o| {
                let h = flotilla_shared::health::health(o);
                json!({
                    "apiVersion": s(&o["apiVersion"]),
                    "kind": s(&o["kind"]),
                    "namespace": s(&o["metadata"]["namespace"]),
                    "name": s(&o["metadata"]["name"]),
                    "status": h.status.as_str(),
                    "message": h.message,
                })
            })
            .collect(),
    )
}

/// The health table: KIND, NAMESPACE, NAME, STATUS, MESSAGE.
pub fn health_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = rows_of(v)
        .iter()
        .map(|o| {
            vec![
                plain(&o["kind"]),
                plain(&o["namespace"]),
                plain(&o["name"]),
                plain(&o["status"]),
                plain(&o["message"]),
            ]
        })
        .collect();
    table(&["KIND", "NAMESPACE", "NAME", "STATUS", "MESSAGE"], &rows)
}

/// Columns aligned as kubectl aligns them: padded to the widest cell plus three spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A JSON value as one table cell: strings bare, null as `<none>`, newlines flattened.
fn plain(v: &Value) -> String {
    let s = match v {
        Value::Null => return NONE.to_string(),
        Value::String(s) if s.is_empty() => return NONE.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A string as one table cell: `<none>` when empty, newlines flattened.
fn cell(s: &str) -> String {
    if s.is_empty() {
        return NONE.to_string();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An optional string as one table cell: `<none>` when absent or empty.
fn opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| NONE.to_string(), cell)
}

/// How an enum of the API is spelt in its JSON (`webhook`, `ErrApplied`).
fn name_of<T: Serialize>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => NONE.to_string(),
    }
}

/// A commit id shortened as git shows it.
fn short(s: &str) -> String {
    if s.len() > 7 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        s[..7].to_string()
    } else {
        cell(s)
    }
}

fn short_opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| NONE.to_string(), short)
}

fn rows_of(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// When a timestamp (RFC 3339 string or Unix milliseconds) lies before `now`, as
/// kubectl shows ages: `45s`, `12m`, `5h`, `3d`.
pub fn age(v: &Value, now: SystemTime) -> String {
    let then = match v {
        Value::String(s) => match humantime::parse_rfc3339_weak(s) {
            Ok(t) => t,
            Err(_) => return plain(v),
        },
        Value::Number(n) => match n.as_u64() {
            Some(ms) => UNIX_EPOCH + Duration::from_millis(ms),
            None => return plain(v),
        },
        _ => return plain(v),
    };
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The age of an optional RFC 3339 timestamp; `<none>` when absent.
fn age_of(t: &Option<String>, now: SystemTime) -> String {
    match t {
        Some(s) => age(&Value::String(s.clone()), now),
        None => NONE.to_string(),
    }
}

/// `k=v,k2=v2`, or `<none>`.
fn labels(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() {
        return NONE.to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `Ready=2,ErrApplied=1`, or `<none>`.
fn counts(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return NONE.to_string();
    }
    m.iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `ready/total` from per-state counts.
fn ready_of(m: &BTreeMap<String, usize>) -> String {
    let total: usize = m.values().sum();
    let ready = m.get("Ready").copied().unwrap_or(0);
    format!("{ready}/{total}")
}

/// How a source names what it follows: `branch main`, `tag v1`, `revision 1a2b3c4`.
fn git_ref(v: &SourceView) -> String {
    let s = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
    if let Some(r) = s(&v.revision) {
        format!("revision {}", short(&r))
    } else if let Some(t) = s(&v.tag) {
        format!("tag {t}")
    } else {
        format!("branch {}", s(&v.branch).as_deref().unwrap_or("main"))
    }
}

/// Targets, as `selector env=prod`, `group edge`, `cluster c1`, joined by `; `.
fn targets(list: &[Target]) -> String {
    if list.is_empty() {
        return "<all clusters>".into();
    }
    list.iter()
        .map(|t| {
            let mut parts = Vec::new();
            if let Some(n) = &t.cluster_name {
                parts.push(format!("cluster {n}"));
            }
            if let Some(s) = &t.cluster_selector {
                parts.push(format!("selector {s}"));
            }
            if let Some(g) = &t.cluster_group {
                parts.push(format!("group {g}"));
            }
            if let Some(s) = &t.cluster_group_selector {
                parts.push(format!("group selector {s}"));
            }
            if parts.is_empty() {
                "<all clusters>".into()
            } else {
                parts.join(" and ")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn strings(v: &[String]) -> String {
    let list: Vec<String> = v.iter().map(|s| cell(s)).collect();
    if list.is_empty() {
        NONE.into()
    } else {
        list.join(", ")
    }
}

/// `Key:  value` lines with the values aligned.
fn describe(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$}{v}\n", format!("{k}:")))
        .collect()
}

pub fn sources_table(v: &[SourceView], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|s| {
            vec![
                cell(&s.name),
                cell(&s.repo),
                git_ref(s),
                short_opt(&s.commit),
                age_of(&s.last_fetched, now),
                opt(&s.last_error),
            ]
        })
        .collect();
    table(
        &["NAME", "REPO", "REF", "COMMIT", "LAST FETCHED", "ERROR"],
        &rows,
    )
}

pub fn source_details(s: &SourceView, now: SystemTime) -> String {
    describe(&[
        ("Name", cell(&s.name)),
        ("Repo", cell(&s.repo)),
        ("Ref", git_ref(s)),
        ("Paths", strings(&s.paths)),
        ("Poll interval", cell(&s.poll_interval)),
        ("Targets", targets(&s.targets)),
        ("Commit", opt(&s.commit)),
        ("Last fetched", age_of(&s.last_fetched, now)),
        ("Last error", opt(&s.last_error)),
        ("Bundles", strings(&s.bundles)),
    ])
}

pub fn clusters_table(v: &[ClusterView], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|c| {
            vec![
                cell(&c.name),
                labels(&c.labels),
                c.connected.to_string(),
                age_of(&c.last_seen, now),
                cell(&c.agent_version),
                cell(&c.kubernetes_version),
                counts(&c.bundle_counts),
                c.drift_events.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "LABELS",
            "CONNECTED",
            "LAST SEEN",
            "AGENT",
            "KUBERNETES",
            "BUNDLES",
            "DRIFT",
        ],
        &rows,
    )
}

/// The state of each bundle of a cluster.
fn cluster_bundles_table(list: &[ClusterBundleView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                cell(&b.bundle),
                cell(b.state.as_str()),
                short_opt(&b.applied_revision),
                cell(&b.message),
            ]
        })
        .collect();
    table(&["BUNDLE", "STATE", "REVISION", "MESSAGE"], &rows)
}

pub fn cluster_details(c: &ClusterView, now: SystemTime) -> String {
    let mut out = describe(&[
        ("Name", cell(&c.name)),
        ("Labels", labels(&c.labels)),
        ("Connected", c.connected.to_string()),
        ("Last seen", age_of(&c.last_seen, now)),
        ("Agent", cell(&c.agent_version)),
        ("Kubernetes", cell(&c.kubernetes_version)),
        ("Bundles", counts(&c.bundle_counts)),
        ("Drift events", c.drift_events.to_string()),
    ]);
    out.push('\n');
    out.push_str(&cluster_bundles_table(
        c.bundles.as_deref().unwrap_or_default(),
    ));
    out
}

pub fn bundles_table(v: &[BundleView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|b| {
            vec![
                cell(&b.name),
                cell(&b.source),
                cell(&b.path),
                short(&b.revision),
                ready_of(&b.cluster_counts),
            ]
        })
        .collect();
    table(&["NAME", "SOURCE", "PATH", "REVISION", "READY"], &rows)
}

pub fn bundle_details(b: &BundleView) -> String {
    let mut pairs = vec![
        ("Name", cell(&b.name)),
        ("Source", cell(&b.source)),
        ("Path", cell(&b.path)),
        ("Revision", cell(&b.revision)),
        ("Drift events", b.drift_events.to_string()),
    ];
    if b.error.is_some() {
        pairs.push(("Error", opt(&b.error)));
    }
    let mut out = describe(&pairs);
    out.push('\n');
    let rows: Vec<Vec<String>> = b
        .clusters
        .iter()
        .flatten()
        .map(|c| {
            vec![
                cell(&c.cluster),
                cell(c.state.as_str()),
                short_opt(&c.applied_revision),
                c.drift_events.to_string(),
                cell(&c.message),
            ]
        })
        .collect();
    out.push_str(&table(
        &["CLUSTER", "STATE", "REVISION", "DRIFT", "MESSAGE"],
        &rows,
    ));
    out
}

/// `Deployment demo/web` (or `Namespace demo`).
fn object_of(o: &DriftObject) -> String {
    let kind = cell(&o.kind);
    let name = cell(&o.name);
    match o.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

/// What changed, in a few words: the paths, or `deleted`.
fn drift_summary(e: &DriftView) -> String {
    if e.deleted {
        return "(deleted)".into();
    }
    let paths: Vec<String> = e.fields.iter().map(|f| cell(&f.path)).collect();
    if paths.len() > 3 {
        format!("{} (+{})", paths[..3].join(","), paths.len() - 3)
    } else {
        paths.join(",")
    }
}

pub fn drift_table(v: &[DriftView], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                cell(&e.cluster),
                cell(&e.bundle),
                object_of(&e.object),
                drift_summary(e),
                cell(&e.manager),
                age(&Value::String(e.detected_at.clone()), now),
                e.corrected.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CLUSTER",
            "BUNDLE",
            "OBJECT",
            "FIELDS",
            "MANAGER",
            "AGE",
            "CORRECTED",
        ],
        &rows,
    )
}

pub fn drift_details(e: &DriftView) -> String {
    let mut out = describe(&[
        ("Id", e.id.to_string()),
        ("Cluster", cell(&e.cluster)),
        ("Bundle", cell(&e.bundle)),
        ("Object", object_of(&e.object)),
        ("API version", cell(&e.object.api_version)),
        ("Manager", cell(&e.manager)),
        ("Detected at", cell(&e.detected_at)),
        ("Corrected", e.corrected.to_string()),
        ("Deleted", e.deleted.to_string()),
    ]);
    out.push('\n');
    let rows: Vec<Vec<String>> = e
        .fields
        .iter()
        .map(|f| {
            let compact = |v: &Value| match v {
                Value::Null => "(absent)".to_string(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            vec![cell(&f.path), compact(&f.desired), compact(&f.live)]
        })
        .collect();
    out.push_str(&table(&["PATH", "DESIRED", "LIVE"], &rows));
    out
}

/// `gitsource/apps created`, one line per applied object, as kubectl prints.
pub fn applied_lines(v: &ApplyResponse) -> String {
    v.applied
        .iter()
        .map(|a| {
            format!(
                "{}/{} {}\n",
                cell(&a.kind).to_lowercase(),
                cell(&a.name),
                cell(&a.action)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view from the JSON the hub sends.
    fn view<T: DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn parses_the_contract_commands() {
        let cli = parse(&[
            "--hub",
            "http://h:1",
            "--token",
            "t",
            "cluster",
            "list",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.hub, "http://h:1");
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert!(matches!(
            cli.command,
            Command::Cluster(ClusterCommand::List(Output {
                output: Format::Json
            }))
        ));

        let cli = parse(&[
            "rollout",
            "plan",
            "apps/web",
            "--clusters",
            "c.yaml",
            "-o",
            "json",
        ])
        .unwrap();
        assert!(matches!(
            &cli.command,
            Command::Rollout(RolloutCommand::Plan { dir, clusters, output: Output { output: Format::Json } })
                if dir == std::path::Path::new("apps/web") && clusters == "c.yaml"
        ));
        assert!(
            parse(&["rollout", "plan", "apps/web"]).is_err(),
            "--clusters is required"
        );

        let cli = parse(&[
            "source",
            "add",
            "apps",
            "--repo",
            "https://g/x.git",
            "--tag",
            "v1",
            "--path",
            "apps/*",
            "--path",
            "infra",
            "--target",
            "env=prod,tier!=edge",
            "--target",
            "region in (eu,us)",
            "--poll",
            "30s",
        ])
        .unwrap();
        let Command::Source(SourceCommand::Add(add)) = cli.command else {
            panic!()
        };
        assert_eq!(add.tag.as_deref(), Some("v1"));
        assert_eq!(add.paths, ["apps/*", "infra"]);
        assert_eq!(add.targets.len(), 2);
        assert_eq!(add.targets[1].to_string(), "region in (eu,us)");

        let cli = parse(&["cluster", "label", "c1", "env=prod", "old-"]).unwrap();
        let Command::Cluster(ClusterCommand::Label { name, edits }) = cli.command else {
            panic!()
        };
        assert_eq!(name, "c1");
        assert_eq!(
            edits,
            [
                LabelEdit::Set("env".into(), "prod".into()),
                LabelEdit::Remove("old".into())
            ]
        );

        assert!(matches!(
            parse(&["apply", "-f", "-"]).unwrap().command,
            Command::Apply { file } if file == "-"
        ));
        assert!(matches!(
            parse(&["bundle", "get", "b", "-o", "yaml"])
                .unwrap()
                .command,
            Command::Bundle(BundleCommand::Get {
                output: Output {
                    output: Format::Yaml
                },
                ..
            })
        ));
        assert!(matches!(
            parse(&["token", "create"]).unwrap().command,
            Command::Token(TokenCommand::Create { ttl, .. }) if ttl == "1h"
        ));
    }

    #[test]
    fn rejects_bad_arguments() {
        for bad in [
            &[
                "source", "add", "a", "--repo", "r", "--branch", "b", "--tag", "t",
            ][..],
            &["source", "add", "a", "--repo", "r", "--target", "a b"],
            &["source", "add", "a", "--repo", "r", "--poll", "soon"],
            &["token", "create", "--ttl", "1x"],
            &["token", "create", "--cluster-name", "Bad_Name"],
            &["token", "create", "--labels", "nonsense"],
            &["cluster", "delete"],
            &["cluster", "label", "c1"],
            &["cluster", "label", "c1", "nonsense"],
            &["cluster", "list", "-o", "xml"],
            &["source", "add", "a"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn source_add_builds_a_gitsource() {
        let cli = parse(&[
            "source",
            "add",
            "apps",
            "--repo",
            "https://g/x.git",
            "--target",
            "env=prod",
        ])
        .unwrap();
        let Command::Source(SourceCommand::Add(add)) = cli.command else {
            panic!()
        };
        let yaml = source_yaml(&add).unwrap();
        let objs = flotilla_shared::objects::parse_objects("t", &yaml).unwrap();
        let flotilla_shared::objects::Object::GitSource { metadata, spec } = &objs[0] else {
            panic!()
        };
        assert_eq!(metadata.name, "apps");
        assert_eq!(spec.repo, "https://g/x.git");
        assert_eq!(
            spec.targets[0]
                .cluster_selector
                .as_ref()
                .unwrap()
                .to_string(),
            "env=prod"
        );

        let cli = parse(&["source", "add", "Bad_Name", "--repo", "r"]).unwrap();
        let Command::Source(SourceCommand::Add(add)) = cli.command else {
            panic!()
        };
        assert!(source_yaml(&add).is_err());
    }

    #[test]
    fn label_edits_become_set_and_remove() {
        let edits: Vec<LabelEdit> = ["env=dev", "tier-", "env=prod", "x-", "x=1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            serde_json::to_value(label_body(&edits)).unwrap(),
            json!({"set": {"env": "prod", "x": "1"}, "remove": ["tier"]})
        );
    }

    #[test]
    fn tables_align_like_kubectl() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["a".into(), "Ready".into()],
                vec!["longer-name".into(), "".into()],
            ],
        );
        assert_eq!(t, "NAME          STATE\na             Ready\nlonger-name\n");
    }

    #[test]
    fn cluster_list_table() {
        let v = json!([
            {"name": "east", "labels": {"env": "prod", "tier": "edge"}, "connected": true,
             "lastSeen": "1970-01-01T00:16:40Z", "agentVersion": "0.1.0",
             "kubernetesVersion": "v1.34.1", "bundleCounts": {"ErrApplied": 1, "Ready": 2},
             "driftEvents": 3},
            {"name": "west", "labels": {}, "connected": false, "lastSeen": null,
             "agentVersion": "", "kubernetesVersion": "", "bundleCounts": {},
             "driftEvents": 0},
        ]);
        let t = clusters_table(&view::<Vec<ClusterView>>(v), at(1000 + 7200));
        let want = "\
NAME   LABELS               CONNECTED   LAST SEEN   AGENT    KUBERNETES   BUNDLES                DRIFT
east   env=prod,tier=edge   true        2h          0.1.0    v1.34.1      ErrApplied=1,Ready=2   3
west   <none>               false       <none>      <none>   <none>       <none>                 0
";
        assert_eq!(t, want);
    }

    #[test]
    fn ages() {
        let now = at(100_000);
        assert_eq!(age(&json!(99_955_000u64), now), "45s");
        assert_eq!(
            age(&json!("1970-01-01T27:46:40Z"), now),
            "1970-01-01T27:46:40Z"
        );
        assert_eq!(age(&json!("1970-01-02T03:36:40Z"), now), "10m");
        assert_eq!(age(&json!("1970-01-01T00:00:00Z"), now), "27h");
        assert_eq!(age(&json!("1970-01-01T00:00:00Z"), at(5 * 86400)), "5d");
        assert_eq!(age(&Value::Null, now), "<none>");
        assert_eq!(age(&json!(200_000_000u64), now), "0s", "future: clock skew");
    }

    #[test]
    fn bundle_tables() {
        let list = json!([
            {"name": "apps-web", "source": "apps", "path": "web",
             "revision": "0123456789abcdef0123456789abcdef01234567", "contentHash": "x",
             "error": null, "clusterCounts": {"Ready": 2, "WaitApplied": 1}, "driftEvents": 0},
        ]);
        assert_eq!(
            bundles_table(&view::<Vec<BundleView>>(list)),
            "NAME       SOURCE   PATH   REVISION   READY\napps-web   apps     web    0123456    2/3\n"
        );
        let one = json!({"name": "apps-web", "source": "apps", "path": "web",
        "revision": "0123456789abcdef0123456789abcdef01234567", "driftEvents": 2,
        "clusterCounts": {}, "clusters": [
            {"cluster": "east", "state": "ErrApplied", "appliedRevision": "abcdef0123456789",
             "message": "web/d.yaml: Deployment default/web:\n field is immutable", "driftEvents": 0},
            {"cluster": "west", "state": "Modified", "appliedRevision": null, "message": "", "driftEvents": 2}
        ]});
        let want = "\
Name:         apps-web
Source:       apps
Path:         web
Revision:     0123456789abcdef0123456789abcdef01234567
Drift events: 2

CLUSTER   STATE        REVISION   DRIFT   MESSAGE
east      ErrApplied   abcdef0    0       web/d.yaml: Deployment default/web: field is immutable
west      Modified     <none>     2       <none>
";
        assert_eq!(bundle_details(&view(one)), want);
    }

    #[test]
    fn drift_tables() {
        let e = json!({"id": 4, "cluster": "east", "bundle": "apps-web",
            "object": {"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "demo", "name": "web"},
            "fields": [{"path": "/spec/replicas", "desired": 2, "live": 5},
                       {"path": "/metadata/labels/tier", "desired": "front", "live": null}],
            "manager": "kubectl-edit", "detectedAt": "1970-01-01T00:16:40Z",
            "corrected": true, "deleted": false});
        let gone = json!({"id": 5, "cluster": "east", "bundle": "apps-web",
            "object": {"apiVersion": "v1", "kind": "Namespace", "name": "demo"},
            "fields": [], "manager": "", "detectedAt": "1970-01-01T00:16:40Z",
            "corrected": false, "deleted": true});
        let want = "\
ID   CLUSTER   BUNDLE     OBJECT                FIELDS                                 MANAGER        AGE   CORRECTED
4    east      apps-web   Deployment demo/web   /spec/replicas,/metadata/labels/tier   kubectl-edit   60s   true
5    east      apps-web   Namespace demo        (deleted)                              <none>         60s   false
";
        assert_eq!(
            drift_table(&view::<Vec<DriftView>>(json!([e.clone(), gone])), at(1060)),
            want
        );
        let d = drift_details(&view(e));
        assert!(d.contains("Manager:     kubectl-edit\n"), "{d}");
        assert!(d.contains("/spec/replicas          2         5\n"), "{d}");
        assert!(
            d.contains("/metadata/labels/tier   front     (absent)\n"),
            "{d}"
        );
    }

    #[test]
    fn source_tables() {
        let v = json!([
            {"name": "apps", "repo": "https://g/apps.git", "branch": "main", "tag": null,
             "revision": null, "paths": [], "pollInterval": "15s", "targets": [],
             "commit": "89abcdef0123456789abcdef0123456789abcdef",
             "lastFetched": "1970-01-01T00:01:35Z", "lastError": null, "consecutiveFailures": 0,
             "bundles": ["apps"]},
            {"name": "infra", "repo": "git://h/infra", "branch": null, "tag": "v2",
             "revision": null, "paths": [], "pollInterval": "15s", "targets": [],
             "commit": null, "lastFetched": null,
             "lastError": "cannot reach repository git://h/infra: connection refused",
             "consecutiveFailures": 3, "bundles": []},
        ]);
        let want = "\
NAME    REPO                 REF           COMMIT    LAST FETCHED   ERROR
apps    https://g/apps.git   branch main   89abcde   5s             <none>
infra   git://h/infra        tag v2        <none>    <none>         cannot reach repository git://h/infra: connection refused
";
        assert_eq!(sources_table(&view::<Vec<SourceView>>(v), at(100)), want);

        let one = json!({"name": "apps", "repo": "r", "revision": "0123456789abcdef",
            "paths": ["apps/*"], "pollInterval": "15s",
            "targets": [{"clusterSelector": {"matchLabels": {"env": "prod"}}}, {"clusterGroup": "edge"}],
            "consecutiveFailures": 0, "bundles": ["apps-a", "apps-b"]});
        let d = source_details(&view(one), at(0));
        assert!(d.contains("Ref:           revision 0123456\n"), "{d}");
        assert!(
            d.contains("Targets:       selector env=prod; group edge\n"),
            "{d}"
        );
        assert!(d.contains("Bundles:       apps-a, apps-b\n"), "{d}");
    }

    #[test]
    fn applied_like_kubectl() {
        let v = json!({"applied": [
            {"kind": "GitSource", "name": "apps", "action": "created"},
            {"kind": "ClusterGroup", "name": "edge", "action": "unchanged"}]});
        assert_eq!(
            applied_lines(&view(v)),
            "gitsource/apps created\nclustergroup/edge unchanged\n"
        );
    }

    /// `health` reads `kubectl get -o yaml` output and needs no hub: the hub URL
    /// here points nowhere.
    #[tokio::test]
    async fn health_is_offline_and_keeps_input_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("objects.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: web, namespace: demo, generation: 1}\n  spec: {replicas: 3}\n  status: {observedGeneration: 1, replicas: 3, updatedReplicas: 3, availableReplicas: 1}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: settings, namespace: demo}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\nstatus: {phase: Active}\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let run_it = |extra: &[&str]| {
            let args: Vec<String> = [
                "flotilla",
                "--hub",
                "http://127.0.0.1:9",
                "health",
                "-f",
                path,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
            async move {
                let (mut out, mut err) = (Vec::new(), Vec::new());
                let code = run(args, &mut out, &mut err).await;
                (
                    code,
                    String::from_utf8(out).unwrap(),
                    String::from_utf8(err).unwrap(),
                )
            }
        };
        let (code, out, err) = run_it(&["-o", "json"]).await;
        assert_eq!((code, err.as_str()), (0, ""));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!([
                {"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "demo", "name": "web",
                 "status": "InProgress", "message": "1/3 replicas available"},
                {"apiVersion": "v1", "kind": "ConfigMap", "namespace": "demo", "name": "settings",
                 "status": "Current", "message": "no status to wait for"},
                {"apiVersion": "v1", "kind": "Namespace", "namespace": null, "name": "demo",
                 "status": "Current", "message": "active"},
            ])
        );
        let (code, out, _) = run_it(&[]).await;
        assert_eq!(code, 0);
        assert_eq!(
            out,
            "KIND         NAMESPACE   NAME       STATUS       MESSAGE\n\
             Deployment   demo        web        InProgress   1/3 replicas available\n\
             ConfigMap    demo        settings   Current      no status to wait for\n\
             Namespace    <none>      demo       Current      active\n"
        );
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = run(
            ["flotilla", "health", "-f", "/nonexistent/x.yaml"],
            &mut out,
            &mut err,
        )
        .await;
        assert_eq!(code, 1);
        assert!(String::from_utf8(err)
            .unwrap()
            .starts_with("error: reading /nonexistent/x.yaml"));
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("apps-web"), "apps-web");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}

/// The CLI against a stand-in hub on 127.0.0.1:0 that records each request.
#[cfg(test)]
mod http_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;

    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        uri: String,
        auth: Option<String>,
        body: String,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    async fn hub(
        axum::extract::State(log): axum::extract::State<Log>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: String,
    ) -> axum::response::Response {
        log.lock().unwrap().push(Seen {
            method: method.to_string(),
            uri: uri.to_string(),
            auth: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body,
        });
        let ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
        match (method.as_str(), uri.path()) {
            ("POST", "/api/v1/tokens") => ok(json!({"token": "flt1.abc.def.123", "id": "abc",
                "expiresAt": "2030-01-01T00:00:00Z"})),
            ("POST", "/api/v1/apply") => ok(json!({"applied": [
                {"kind": "GitSource", "name": "apps", "action": "created"}]})),
            // Two pages: the CLI follows `continue`.
            ("GET", "/api/v1/clusters") if uri.query().is_none() => ok(json!({"items": [
                {"name": "east", "labels": {"env": "prod"}, "connected": true, "lastSeen": null,
                 "agentVersion": "0.1.0", "kubernetesVersion": "v1.34.1",
                 "bundleCounts": {"Ready": 1}, "driftEvents": 0}],
                "continue": "ZWFzdA"})),
            ("GET", "/api/v1/clusters") if uri.query() == Some("continue=ZWFzdA") => {
                ok(json!({"items": [
                {"name": "west", "labels": {}, "connected": false, "lastSeen": null,
                 "agentVersion": "", "kubernetesVersion": "", "bundleCounts": {},
                 "driftEvents": 0}]}))
            }
            // A hub that never ends its list.
            ("GET", "/api/v1/bundles") => ok(json!({"items": [], "continue": "bG9vcA"})),
            ("PATCH", "/api/v1/clusters/east/labels") => ok(json!({"name": "east"})),
            // An older or newer hub's view, missing `publicKey`.
            ("GET", "/api/v1/signing-key") => ok(json!({"keyId": "k1", "rotations": 0})),
            ("DELETE", "/api/v1/clusters/east") => ok(json!({"deleted": "east"})),
            ("DELETE", "/api/v1/sources/apps") => StatusCode::NO_CONTENT.into_response(),
            ("PUT", "/api/v1/secrets/git-creds") => {
                ok(json!({"name": "git-creds", "fields": ["username", "password"]}))
            }
            _ => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": format!("{} not found", uri.path())})),
            )
                .into_response(),
        }
    }

    async fn start() -> (String, Log) {
        let log: Log = Arc::default();
        let app = axum::Router::new().fallback(hub).with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), log)
    }

    async fn cli(hub: &str, args: &[&str]) -> (i32, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let argv = ["flotilla", "--hub", hub, "--token", "s3cret"]
            .into_iter()
            .chain(args.iter().copied());
        let code = run(argv, &mut out, &mut err).await;
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn last(log: &Log) -> Seen {
        log.lock().unwrap().last().cloned().unwrap()
    }

    #[tokio::test]
    async fn sends_what_the_api_expects() {
        let (hub, log) = start().await;

        let (code, out, err) = cli(&hub, &["token", "create", "--ttl", "2h"]).await;
        assert_eq!((code, out.as_str()), (0, "flt1.abc.def.123\n"), "{err}");
        assert!(err.contains("2030-01-01"), "{err}");
        let seen = last(&log);
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("POST", "/api/v1/tokens")
        );
        assert_eq!(seen.auth.as_deref(), Some("Bearer s3cret"));
        assert_eq!(
            serde_json::from_str::<Value>(&seen.body).unwrap(),
            json!({"ttl": "2h"})
        );
        let (code, _, err) = cli(
            &hub,
            &[
                "token",
                "create",
                "--cluster-name",
                "edge-1",
                "--labels",
                "env=dev,tier=web",
            ],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("bound to edge-1"), "{err}");
        assert_eq!(
            serde_json::from_str::<Value>(&last(&log).body).unwrap(),
            json!({"ttl": "1h", "clusterName": "edge-1",
                   "labels": {"env": "dev", "tier": "web"}})
        );
        let (code, out, err) = cli(&hub, &["cluster", "delete", "east"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("cluster/east deleted"), "{out}");
        let seen = last(&log);
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("DELETE", "/api/v1/clusters/east")
        );

        let (code, out, err) = cli(
            &hub,
            &[
                "source",
                "add",
                "apps",
                "--repo",
                "https://g/apps.git",
                "--branch",
                "dev",
                "--path",
                "apps/*",
                "--target",
                "env=prod",
                "--poll",
                "30s",
            ],
        )
        .await;
        assert_eq!(
            (code, out.as_str()),
            (0, "gitsource/apps created\n"),
            "{err}"
        );
        let seen = last(&log);
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.uri, "/api/v1/apply?file=source%20add%20apps");
        let objs = flotilla_shared::objects::parse_objects("body", &seen.body).unwrap();
        let flotilla_shared::objects::Object::GitSource { spec, .. } = &objs[0] else {
            panic!()
        };
        assert_eq!(spec.branch.as_deref(), Some("dev"));
        assert_eq!(spec.paths, ["apps/*"]);
        assert_eq!(spec.poll_interval.as_deref(), Some("30s"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.yaml");
        std::fs::write(
            &file,
            "apiVersion: flotilla.io/v1alpha1\nkind: ClusterGroup\nmetadata: {name: edge}\n",
        )
        .unwrap();
        let (code, _, err) = cli(&hub, &["apply", "-f", file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{err}");
        let seen = last(&log);
        assert!(
            seen.uri.starts_with("/api/v1/apply?file=%2F"),
            "{}",
            seen.uri
        );
        assert!(seen.body.contains("kind: ClusterGroup"));

        let (code, out, err) = cli(&hub, &["cluster", "label", "east", "env=dev", "tier-"]).await;
        assert_eq!((code, out.as_str()), (0, "cluster/east labeled\n"), "{err}");
        let seen = last(&log);
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("PATCH", "/api/v1/clusters/east/labels")
        );
        assert_eq!(
            serde_json::from_str::<Value>(&seen.body).unwrap(),
            json!({"set": {"env": "dev"}, "remove": ["tier"]})
        );

        let (code, out, _) = cli(&hub, &["cluster", "list", "-o", "json"]).await;
        assert_eq!(code, 0);
        let listed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (&listed[0]["name"], &listed[1]["name"]),
            (&json!("east"), &json!("west")),
            "every page, as one list: {out}"
        );
        assert_eq!(last(&log).uri, "/api/v1/clusters?continue=ZWFzdA");
        assert!(out.contains("\n  {"), "pretty JSON: {out}");
        let (_, out, _) = cli(&hub, &["cluster", "list", "-o", "yaml"]).await;
        assert!(out.contains("name: east"), "{out}");
        let (_, out, _) = cli(&hub, &["cluster", "list"]).await;
        assert!(out.starts_with("NAME   LABELS"), "{out}");

        let (code, out, _) = cli(&hub, &["source", "delete", "apps"]).await;
        assert_eq!((code, out.as_str()), (0, "gitsource/apps deleted\n"));
        assert_eq!(last(&log).method, "DELETE");

        let pw = dir.path().join("pw");
        std::fs::write(&pw, "tok-s3cret\n").unwrap();
        let (code, out, err) = cli(
            &hub,
            &[
                "secret",
                "create",
                "git-creds",
                "--username",
                "bot",
                "--password-file",
                pw.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(
            (code, out.as_str()),
            (0, "secret/git-creds configured\n"),
            "{err}"
        );
        assert!(!err.contains("tok-s3cret"));
        let seen = last(&log);
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("PUT", "/api/v1/secrets/git-creds")
        );
        let body: Value = serde_json::from_str(&seen.body).unwrap();
        assert_eq!(
            (&body["username"], &body["password"]),
            (&json!("bot"), &json!("tok-s3cret")),
            "one trailing newline dropped"
        );
        let (code, _, err) = cli(&hub, &["secret", "create", "empty"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("--password-file"), "{err}");
        let (code, _, err) = cli(
            &hub,
            &[
                "source",
                "add",
                "priv",
                "--repo",
                "https://g/p.git",
                "--secret",
                "git-creds",
            ],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(last(&log).body.contains("secretRef: git-creds"));
    }

    /// The stand-in hub behind the hub's own TLS listener, with a fleet PKI made
    /// in `dir`; returns its https:// URL on 127.0.0.1.
    async fn start_tls(dir: &std::path::Path) -> String {
        let pki = flotilla_hub::pki::Pki::load_or_create(dir, "localhost").unwrap();
        let tls = flotilla_hub::listen::server_config(pki.server_chain.clone(), pki.server_key())
            .unwrap();
        let app = axum::Router::new().fallback(hub).with_state(Log::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener =
            flotilla_hub::listen::HttpListener::new(listener, Arc::new(tls), "test").unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("https://{addr}")
    }

    #[tokio::test]
    async fn verifies_the_hubs_certificate_and_keeps_the_token_off_plain_http() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let hub_a = start_tls(&a).await;
        let _hub_b = start_tls(&b).await;
        let ca = |d: &std::path::Path| d.join("ca.pem").to_string_lossy().into_owned();
        let run_with = |extra: Vec<String>| {
            let hub_a = hub_a.clone();
            async move {
                let mut out = Vec::new();
                let mut err = Vec::new();
                let argv: Vec<String> = ["flotilla", "--hub", &hub_a, "--token", "s3cret"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(extra)
                    .chain(["cluster", "list", "-o", "json"].map(String::from))
                    .collect();
                let code = run(argv, &mut out, &mut err).await;
                (code, String::from_utf8(err).unwrap())
            }
        };
        let (code, err) = run_with(vec!["--ca-file".into(), ca(&a)]).await;
        assert_eq!(code, 0, "{err}");
        // The CA found in the hub's data directory.
        let (code, err) = run_with(vec!["--data-dir".into(), a.to_string_lossy().into()]).await;
        assert_eq!(code, 0, "{err}");
        // Another fleet's CA, or only the system's roots: refused, with a hint.
        let (code, err) = run_with(vec!["--ca-file".into(), ca(&b)]).await;
        assert_eq!(code, 1);
        assert!(
            err.contains("certificate") && err.contains("--ca-file"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let (code, err) = run_with(vec!["--data-dir".into(), "/nonexistent".into()]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("certificate"), "{err}");
        let (code, err) = run_with(vec!["--ca-file".into(), "/nonexistent/ca.pem".into()]).await;
        assert_eq!(code, 1);
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");

        // Plain HTTP to anything but loopback never leaves the CLI.
        for hub in ["http://10.1.2.3:7080", "http://hub.example.com:7080"] {
            let (code, _, err) = cli(hub, &["cluster", "list"]).await;
            assert_eq!(code, 1);
            assert!(err.contains("use https://"), "{err}");
        }
        let (code, _, err) = cli("ftp://127.0.0.1:1", &["cluster", "list"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("https://"), "{err}");
        for ok in ["http://localhost:1", "http://[::1]:1", "http://127.0.0.2:1"] {
            let (_, _, err) = cli(ok, &["cluster", "list"]).await;
            assert!(err.contains("cannot reach the hub"), "{ok}: {err}");
        }
    }

    #[tokio::test]
    async fn errors_go_to_stderr_with_exit_1() {
        let (hub, _log) = start().await;
        let (code, out, err) = cli(&hub, &["bundle", "get", "nope"]).await;
        assert_eq!((code, out.as_str()), (1, ""));
        assert_eq!(err, "error: /api/v1/bundles/nope not found\n");

        // Nothing listens on port 1.
        let (code, _, err) = cli("http://127.0.0.1:1", &["cluster", "list"]).await;
        assert_eq!(code, 1);
        assert!(
            err.starts_with("error: cannot reach the hub at http://127.0.0.1:1"),
            "{err}"
        );
        assert!(!err.contains("s3cret"));

        let (code, _, err) = cli(&hub, &["cluster", "list", "-o", "xml"]).await;
        assert_eq!(code, 2, "{err}");

        // A list that never ends is an error, not a hang.
        let (code, _, err) = cli(&hub, &["bundle", "list"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("same continue token twice"), "{err}");

        // An answer missing a field the view needs is an error, not a blank column.
        let (code, _, err) = cli(&hub, &["cluster", "label", "east", "a=b"]).await;
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = cli(&hub, &["signing-key", "show"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("GET /api/v1/signing-key"), "{err}");
    }
}
