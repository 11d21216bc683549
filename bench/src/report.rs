//! Results of each benchmark part (JSON files) and BENCHMARKS.md: generated
//! blocks between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers are
//! replaced on every report, so the hand-written analysis around them stays.
//! The figure of hub memory against agents is an SVG drawn here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::procstat;
use crate::stats::{summary, Summary};

/// Per-agent latency from a commit to the agents' acknowledgement of it, one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitLatency {
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One run of the hub-capacity part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubRun {
    pub agents: usize,
    /// Issuing the join tokens through the API.
    pub tokens_s: f64,
    /// From cold until every agent has enrolled, connected and acked its first Desired.
    pub connect_s: f64,
    /// The hub's RSS with its source rendered and no agent.
    pub baseline_rss_kib: u64,
    /// At steady state with every agent connected.
    pub rss_kib: u64,
    pub rss_after_commit_kib: u64,
    pub fds: usize,
    /// Steady-state CPU, percent of one core.
    pub cpu_pct: f64,
    pub commit: CommitLatency,
}

/// One run of the commit-to-fleet-by-webhook part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetRun {
    pub agents: usize,
    /// What told the hub about the commit (`webhook`).
    pub trigger: String,
    /// From cold until every agent acked its first Desired.
    pub connect_s: f64,
    /// From the commit until `POST /hooks/git` answered.
    pub hook_ms: f64,
    /// From the commit (the hook posted right after it) to each agent's ack.
    pub commit: CommitLatency,
}

/// One run of the large-bundle part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LargeRun {
    pub objects: usize,
    pub object_bytes: usize,
    /// The bundle's manifest files, bytes of YAML.
    pub yaml_bytes: usize,
    /// From `source add` to the bundle rendered at the hub, s.
    pub render_s: Option<f64>,
    /// The hub refused the bundle (the error it shows).
    pub refused: Option<String>,
    /// From the agent's start to the bundle `Ready` at the hub, s.
    pub ready_s: Option<f64>,
    /// From the agent receiving its desired set to the bundle applied, s.
    pub apply_s: Option<f64>,
    /// Peak resident memory (VmHWM), KiB.
    pub hub_peak_kib: u64,
    pub agent_peak_kib: u64,
}

/// The large-bundle table.
pub fn large_table(runs: &[LargeRun]) -> String {
    let mut s = String::from(
        "| objects | YAML, MB | runs | rendered after, s | agent start to Ready, s | of which applying, s | hub peak, MiB | agent peak, MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut by: BTreeMap<(usize, usize), Vec<&LargeRun>> = BTreeMap::new();
    for r in runs {
        by.entry((r.objects, r.object_bytes)).or_default().push(r);
    }
    for ((n, _), rs) in by {
        if let Some(why) = rs.iter().find_map(|r| r.refused.as_deref()) {
            let _ = writeln!(
                s,
                "| {n} | {:.1} | {} | refused: {} | – | – | {} | – |",
                rs[0].yaml_bytes as f64 / 1e6,
                rs.len(),
                why.replace('|', "/"),
                of(&rs, |r| r.hub_peak_kib as f64 / 1024.0).show(0),
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {n} | {:.1} | {} | {} | {} | {} | {} | {} |",
            rs[0].yaml_bytes as f64 / 1e6,
            rs.len(),
            of(&rs, |r| r.render_s.unwrap_or_default()).show(1),
            of(&rs, |r| r.ready_s.unwrap_or_default()).show(1),
            of(&rs, |r| r.apply_s.unwrap_or_default()).show(1),
            of(&rs, |r| r.hub_peak_kib as f64 / 1024.0).show(0),
            of(&rs, |r| r.agent_peak_kib as f64 / 1024.0).show(0),
        );
    }
    s
}

/// One run of the mass-reconnect part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconnectRun {
    pub agents: usize,
    /// From the `kill -9` until the restarted hub accepted connections again.
    pub restart_s: f64,
    /// From the `kill -9` to each agent's ack of a desired set from the new hub.
    pub back: CommitLatency,
    /// Sessions that failed meanwhile (the hub down, or a redial refused).
    pub failed_sessions: usize,
    /// Connections the kernel dropped with a listen queue full, machine-wide,
    /// during the run (`TcpExt: ListenOverflows`).
    pub listen_overflows: u64,
    /// The hub's RSS once every agent was back, KiB.
    pub rss_kib: u64,
}

/// The mass-reconnect table.
pub fn reconnect_table(runs: &[ReconnectRun]) -> String {
    let mut s = String::from(
        "| agents | runs | hub listening again, s | median agent back, s | p99 agent back, s | last agent back, s | failed redials | listen-queue overflows | hub RSS after, MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut counts: BTreeMap<usize, Vec<&ReconnectRun>> = BTreeMap::new();
    for r in runs {
        counts.entry(r.agents).or_default().push(r);
    }
    for (n, rs) in counts {
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            of(&rs, |r| r.restart_s).show(2),
            of(&rs, |r| r.back.median_ms / 1000.0).show(2),
            of(&rs, |r| r.back.p99_ms / 1000.0).show(2),
            of(&rs, |r| r.back.max_ms / 1000.0).show(2),
            of(&rs, |r| r.failed_sessions as f64).show(0),
            of(&rs, |r| r.listen_overflows as f64).show(0),
            of(&rs, |r| r.rss_kib as f64 / 1024.0).show(1),
        );
    }
    s
}

/// One run of the bytes-on-the-wire part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRun {
    pub objects: usize,
    pub gzip: bool,
    /// "object-deltas" for an agent that speaks it (its contents come in
    /// chunks, whole or as deltas); empty for the v1 agent, inline.
    #[serde(default)]
    pub features: String,
    /// Size of the changed object's YAML file.
    pub object_yaml_bytes: usize,
    /// Protobuf size of the first Desired (whole bundle) and of the one after
    /// the change, with the chunks before it.
    pub initial_desired_bytes: usize,
    pub initial_wire_bytes: u64,
    pub change_desired_bytes: usize,
    /// What the hub sent the agent on the wire for the change (TLS, HTTP/2 and all).
    pub change_wire_bytes: u64,
}

/// One run of the agent part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRun {
    /// Objects applied, namespaces included.
    pub objects: usize,
    pub bundles: usize,
    /// From the agent receiving its Desired set to its last bundle applied.
    pub agent_apply_s: f64,
    /// `kubectl apply --server-side -R -f` of the same files, in other namespaces.
    pub kubectl_apply_s: f64,
    pub agent_rss_kib: u64,
    pub agent_cpu_pct: f64,
}

/// One run of the Git part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GitRun {
    pub bundles: usize,
    pub files: usize,
    /// From adding the source to every bundle rendered.
    pub cold_s: f64,
    /// From a commit touching one bundle to that bundle at the new revision
    /// (includes waiting for the next 1 s poll).
    pub incremental_s: f64,
    pub clone_s: f64,
    pub fetch_s: f64,
}

/// One run of the planner part: `rollout::step` over a whole simulated rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannerRun {
    pub clusters: usize,
    pub partitions: usize,
    /// Steps the rollout took from start to Completed.
    pub steps: usize,
    /// Calls timed: every step of the rollout, then repeats of a mid-rollout step.
    pub calls: usize,
    pub completed: bool,
    pub step_median_us: f64,
    pub step_p99_us: f64,
    pub step_max_us: f64,
    /// One `rollout::partition` of the clusters.
    pub partition_ms: f64,
}

/// One run of the UI part: page and scrape times at fleet scale, in process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UiRun {
    pub clusters: usize,
    pub bundles: usize,
    /// Statuses recorded (clusters × bundles).
    pub statuses: usize,
    /// Timed requests per page.
    pub repeat: usize,
    /// Building the fleet: clusters created, connected, statuses recorded.
    pub setup_s: f64,
    pub overview_median_ms: f64,
    pub overview_p99_ms: f64,
    pub overview_kib: f64,
    pub matrix_median_ms: f64,
    pub matrix_p99_ms: f64,
    pub matrix_kib: f64,
    /// The first matrix page after one status report (that cluster's row computed anew).
    #[serde(default)]
    pub matrix_after_change_median_ms: f64,
    #[serde(default)]
    pub matrix_after_change_p99_ms: f64,
    pub matrix_filtered_median_ms: f64,
    pub matrix_filtered_p99_ms: f64,
    pub cluster_median_ms: f64,
    pub bundle_median_ms: f64,
    pub bundle_kib: f64,
    pub metrics_median_ms: f64,
    pub metrics_p99_ms: f64,
    pub metrics_kib: f64,
    pub metrics_series: usize,
}

/// A row of the UI table: the page, and its median, p99 and size in a run.
type UiRow = (
    &'static str,
    fn(&UiRun) -> f64,
    fn(&UiRun) -> f64,
    fn(&UiRun) -> f64,
);

/// The UI table: one row per page, medians of the runs' medians and p99s.
pub fn ui_table(runs: &[UiRun]) -> String {
    let mut groups: BTreeMap<(usize, usize), Vec<&UiRun>> = BTreeMap::new();
    for r in runs {
        groups.entry((r.clusters, r.bundles)).or_default().push(r);
    }
    let mut s = String::from("| clusters × bundles | runs | page | median, ms | p99, ms | size, KiB |\n|---|---:|---|---:|---:|---:|\n");
    for ((c, b), rs) in &groups {
        let rows: [UiRow; 7] = [
            (
                "overview `/`",
                |r| r.overview_median_ms,
                |r| r.overview_p99_ms,
                |r| r.overview_kib,
            ),
            (
                "matrix `/matrix` (page 1 of 50 rows)",
                |r| r.matrix_median_ms,
                |r| r.matrix_p99_ms,
                |r| r.matrix_kib,
            ),
            (
                "matrix, first request after a status report (its row computed anew)",
                |r| r.matrix_after_change_median_ms,
                |r| r.matrix_after_change_p99_ms,
                |_| f64::NAN,
            ),
            (
                "matrix filtered (selector + state, page 2)",
                |r| r.matrix_filtered_median_ms,
                |r| r.matrix_filtered_p99_ms,
                |_| f64::NAN,
            ),
            (
                "cluster page",
                |r| r.cluster_median_ms,
                |_| f64::NAN,
                |_| f64::NAN,
            ),
            (
                "bundle page",
                |r| r.bundle_median_ms,
                |_| f64::NAN,
                |r| r.bundle_kib,
            ),
            (
                "`/metrics` scrape",
                |r| r.metrics_median_ms,
                |r| r.metrics_p99_ms,
                |r| r.metrics_kib,
            ),
        ];
        for (page, median, p99, kib) in rows {
            let _ = writeln!(
                s,
                "| {c} × {b} | {} | {page} | {} | {} | {} |",
                rs.len(),
                of(rs, median).show(1),
                of(rs, p99).show(1),
                of(rs, kib).show(0),
            );
        }
        let _ = writeln!(
            s,
            "\n`/metrics` at {c} clusters: {} series. Building the fleet (clusters created and connected, {} statuses recorded): {} s.",
            of(rs, |r| r.metrics_series as f64).show(0),
            rs[0].statuses,
            of(rs, |r| r.setup_s).show(1),
        );
    }
    s
}

/// The planner table.
pub fn planner_table(runs: &[PlannerRun]) -> String {
    let mut groups: BTreeMap<usize, Vec<&PlannerRun>> = BTreeMap::new();
    for r in runs {
        groups.entry(r.clusters).or_default().push(r);
    }
    let mut s = String::from("| clusters (partitions) | runs | steps to complete | step(), median µs | step(), p99 µs | step(), max µs | partition(), ms |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for rs in groups.values() {
        let r = rs[0];
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {} | {} | {} |",
            r.clusters,
            r.partitions,
            rs.len(),
            of(rs, |r| r.steps as f64).show(0),
            of(rs, |r| r.step_median_us).show(0),
            of(rs, |r| r.step_p99_us).show(0),
            of(rs, |r| r.step_max_us).show(0),
            of(rs, |r| r.partition_ms).show(2),
        );
    }
    s
}

/// The agent table.
pub fn agent_table(runs: &[AgentRun]) -> String {
    let mut groups: BTreeMap<usize, Vec<&AgentRun>> = BTreeMap::new();
    for r in runs {
        groups.entry(r.objects).or_default().push(r);
    }
    let mut s = String::from("| objects (bundles) | runs | agent first apply, s | kubectl apply --server-side, s | agent ÷ kubectl | idle agent RSS, MiB | idle agent CPU, % of a core |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for rs in groups.values() {
        let r = rs[0];
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {} | {} | {} |",
            r.objects,
            r.bundles,
            rs.len(),
            of(rs, |r| r.agent_apply_s).show(2),
            of(rs, |r| r.kubectl_apply_s).show(2),
            of(rs, |r| r.agent_apply_s / r.kubectl_apply_s).show(2),
            of(rs, |r| r.agent_rss_kib as f64 / 1024.0).show(1),
            of(rs, |r| r.agent_cpu_pct).show(2),
        );
    }
    s
}

/// The Git table.
pub fn git_table(runs: &[GitRun]) -> String {
    let rs: Vec<&GitRun> = runs.iter().collect();
    let mut s = String::from("| bundle directories (files) | runs | hub cold: fetch + render all, s | hub after a one-bundle commit, s (incl. 0–1 s poll wait) | git clone, s | git fetch of that commit, s |\n|---:|---:|---:|---:|---:|---:|\n");
    if let Some(r) = rs.first() {
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {} | {} |",
            r.bundles,
            r.files,
            rs.len(),
            of(&rs, |r| r.cold_s).show(2),
            of(&rs, |r| r.incremental_s).show(2),
            of(&rs, |r| r.clone_s).show(2),
            of(&rs, |r| r.fetch_s).show(2),
        );
    }
    s
}

pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn save<T: Serialize>(path: &Path, runs: &[T]) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(runs)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn by_agents(runs: &[HubRun]) -> BTreeMap<usize, Vec<&HubRun>> {
    let mut m: BTreeMap<usize, Vec<&HubRun>> = BTreeMap::new();
    for r in runs {
        m.entry(r.agents).or_default().push(r);
    }
    m
}

fn of<T>(runs: &[&T], f: impl Fn(&T) -> f64) -> Summary {
    summary(&runs.iter().map(|r| f(r)).collect::<Vec<_>>())
}

/// The hub-capacity table.
pub fn hub_table(runs: &[HubRun]) -> String {
    let mut s = String::from(
        "| agents | runs | hub RSS, MiB | per agent, KiB (RSS − RSS with no agent) ÷ N | CPU at steady state, % of a core | open fds | enrol + connect from cold, s | agents/s | issuing N tokens (API), s |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, rs) in by_agents(runs) {
        let nf = n as f64;
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            of(&rs, |r| r.rss_kib as f64 / 1024.0).show(1),
            of(&rs, |r| (r.rss_kib as f64 - r.baseline_rss_kib as f64) / nf).show(1),
            of(&rs, |r| r.cpu_pct).show(1),
            of(&rs, |r| r.fds as f64).show(0),
            of(&rs, |r| r.connect_s).show(2),
            of(&rs, |r| nf / r.connect_s).show(0),
            of(&rs, |r| r.tokens_s).show(2),
        );
    }
    s
}

/// The commit-to-fleet table.
pub fn commit_table(runs: &[HubRun]) -> String {
    let mut s = String::from(
        "| agents | runs | median per agent, ms | p99 per agent, ms | last agent, ms | hub RSS after the commit, MiB |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, rs) in by_agents(runs) {
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} |",
            rs.len(),
            of(&rs, |r| r.commit.median_ms).show(0),
            of(&rs, |r| r.commit.p99_ms).show(0),
            of(&rs, |r| r.commit.max_ms).show(0),
            of(&rs, |r| r.rss_after_commit_kib as f64 / 1024.0).show(1),
        );
    }
    s
}

/// The commit-to-fleet-by-webhook table.
pub fn fleet_table(runs: &[FleetRun]) -> String {
    let mut s = String::from(
        "| agents | trigger | runs | median per agent, ms | p99 per agent, ms | last agent, ms | hook answered, ms |\n|---:|---|---:|---:|---:|---:|---:|\n",
    );
    let mut counts: BTreeMap<usize, Vec<&FleetRun>> = BTreeMap::new();
    for r in runs {
        counts.entry(r.agents).or_default().push(r);
    }
    for (n, rs) in counts {
        let _ = writeln!(
            s,
            "| {n} | {} | {} | {} | {} | {} | {} |",
            rs[0].trigger,
            rs.len(),
            of(&rs, |r| r.commit.median_ms).show(0),
            of(&rs, |r| r.commit.p99_ms).show(0),
            of(&rs, |r| r.commit.max_ms).show(0),
            of(&rs, |r| r.hook_ms).show(0),
        );
    }
    s
}

/// The bytes-on-the-wire table.
pub fn wire_table(runs: &[WireRun]) -> String {
    let mut s = String::from(
        "| objects | agent | runs | changed object (YAML), bytes | messages for the change (protobuf), bytes | on the wire for the change, bytes | first Desired (protobuf), bytes | on the wire for the first Desired, bytes |\n|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut groups: BTreeMap<(usize, &str, bool), Vec<&WireRun>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((r.objects, r.features.as_str(), r.gzip))
            .or_default()
            .push(r);
    }
    for ((objects, features, gzip), rs) in groups {
        let _ = writeln!(
            s,
            "| {objects} | {} | {} | {} | {} | {} | {} | {} |",
            match (features, gzip) {
                ("object-deltas", _) => "protocol v2, object-deltas (gzip)",
                (_, true) => "protocol v1, contents inline, gzip",
                (_, false) => "protocol v1, contents inline, no gzip",
            },
            rs.len(),
            of(&rs, |r| r.object_yaml_bytes as f64).show(0),
            of(&rs, |r| r.change_desired_bytes as f64).show(0),
            of(&rs, |r| r.change_wire_bytes as f64).show(0),
            of(&rs, |r| r.initial_desired_bytes as f64).show(0),
            of(&rs, |r| r.initial_wire_bytes as f64).show(0),
        );
    }
    s
}

/// An SVG plot of hub RSS against agents: medians with min–max bars, and the
/// lines of the goal (70 KiB per agent) and of the bare-connection floor (33 KiB),
/// both over the hub's RSS with no agent.
pub fn memory_svg(runs: &[HubRun]) -> String {
    let groups = by_agents(runs);
    let (w, h, left, right, top, bottom) = (640.0, 400.0, 70.0, 20.0, 30.0, 50.0);
    let max_n = groups.keys().copied().max().unwrap_or(1).max(1) as f64;
    let base = groups
        .values()
        .flat_map(|rs| rs.iter().map(|r| r.baseline_rss_kib as f64 / 1024.0))
        .fold(f64::NAN, f64::min);
    let base = if base.is_nan() { 0.0 } else { base };
    let goal = |n: f64| base + n * 70.0 / 1024.0;
    let floor = |n: f64| base + n * 33.0 / 1024.0;
    let max_y = groups
        .values()
        .flat_map(|rs| rs.iter().map(|r| r.rss_kib as f64 / 1024.0))
        .fold(goal(max_n), f64::max)
        * 1.1;
    let x = |n: f64| left + (w - left - right) * n / max_n;
    let y = |mib: f64| h - bottom - (h - top - bottom) * mib / max_y;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Hub memory (RSS) against connected agents</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">agents (N)</text>\n\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">hub RSS, MiB</text>\n",
        w / 2.0,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
    );
    for i in 0..=5 {
        let v = max_y * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{:.1}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"black\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            left - 4.0,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    for &n in groups.keys() {
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{}\" x2=\"{:.1}\" y2=\"{}\" stroke=\"black\"/><text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
            x(n as f64),
            h - bottom,
            x(n as f64),
            h - bottom + 4.0,
            x(n as f64),
            h - bottom + 18.0
        );
    }
    for (f, colour, label) in [
        (
            &goal as &dyn Fn(f64) -> f64,
            "#2a7",
            "goal: 70 KiB per agent",
        ),
        (
            &floor,
            "#999",
            "bare mTLS connection floor: 33 KiB per agent",
        ),
    ] {
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\" text-anchor=\"end\">{label}</text>",
            x(0.0),
            y(f(0.0)),
            x(max_n),
            y(f(max_n)),
            x(max_n) - 4.0,
            y(f(max_n)) - 6.0,
        );
    }
    let mut points = Vec::new();
    for (&n, rs) in &groups {
        let m = of(rs, |r| r.rss_kib as f64 / 1024.0);
        let px = x(n as f64);
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#c33\"/><circle cx=\"{px:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#c33\"/>",
            y(m.min),
            y(m.max),
            y(m.median)
        );
        points.push(format!("{px:.1},{:.1}", y(m.median)));
    }
    let _ = writeln!(
        s,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#c33\"/>\n<text x=\"{}\" y=\"{}\" fill=\"#c33\">measured: median of runs, bar = min–max</text>\n</svg>",
        points.join(" "),
        left + 10.0,
        top + 14.0
    );
    s
}

const TEMPLATE: &str = "# Benchmarks\n\n<!-- bench:machine -->\n<!-- /bench:machine -->\n\n## Hub capacity\n\n<!-- bench:hub -->\n<!-- /bench:hub -->\n\n## Commit to fleet\n\n<!-- bench:commit -->\n<!-- /bench:commit -->\n\n## Bytes on the wire\n\n<!-- bench:wire -->\n<!-- /bench:wire -->\n\n## Rollout planner\n\n<!-- bench:planner -->\n<!-- /bench:planner -->\n\n## Web UI\n\n<!-- bench:ui -->\n<!-- /bench:ui -->\n";

/// Replaces the block `name` in `doc` (appending it when missing).
fn replace_block(doc: &str, name: &str, body: &str) -> String {
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    match (doc.find(&open), doc.find(&close)) {
        (Some(a), Some(b)) if b > a => format!("{}{open}\n{}{}", &doc[..a], body, &doc[b..]),
        _ => format!("{doc}\n{open}\n{body}{close}\n"),
    }
}

/// Replaces one block of the report at `out`.
pub fn write_block(out: &Path, name: &str, body: &str) -> Result<()> {
    let doc = std::fs::read_to_string(out).unwrap_or_else(|_| TEMPLATE.to_string());
    std::fs::write(out, replace_block(&doc, name, body))
        .with_context(|| format!("writing {}", out.display()))
}

/// Writes the report from the results in `results`.
pub fn write(results: &Path, out: &Path, figure: &Path) -> Result<()> {
    let mut doc = std::fs::read_to_string(out).unwrap_or_else(|_| TEMPLATE.to_string());
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    doc = replace_block(
        &doc,
        "machine",
        &format!("Generated {date} on: {}.\n", procstat::machine()),
    );
    if let Ok(runs) = load::<HubRun>(&results.join("hub.json")) {
        doc = replace_block(&doc, "hub", &hub_table(&runs));
        doc = replace_block(&doc, "commit", &commit_table(&runs));
        if let Some(dir) = figure.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(figure, memory_svg(&runs))?;
    }
    if let Ok(runs) = load::<FleetRun>(&results.join("fleet.json")) {
        doc = replace_block(&doc, "commit-webhook", &fleet_table(&runs));
    }
    if let Ok(runs) = load::<LargeRun>(&results.join("large.json")) {
        doc = replace_block(&doc, "large", &large_table(&runs));
    }
    if let Ok(runs) = load::<ReconnectRun>(&results.join("reconnect.json")) {
        doc = replace_block(&doc, "reconnect", &reconnect_table(&runs));
    }
    if let Ok(runs) = load::<WireRun>(&results.join("wire.json")) {
        doc = replace_block(&doc, "wire", &wire_table(&runs));
    }
    if let Ok(runs) = load::<AgentRun>(&results.join("agent.json")) {
        doc = replace_block(&doc, "agent", &agent_table(&runs));
    }
    if let Ok(runs) = load::<GitRun>(&results.join("git.json")) {
        doc = replace_block(&doc, "git", &git_table(&runs));
    }
    if let Ok(runs) = load::<UiRun>(&results.join("ui.json")) {
        doc = replace_block(&doc, "ui", &ui_table(&runs));
    }
    if let Ok(runs) = load::<PlannerRun>(&results.join("planner.json")) {
        doc = replace_block(&doc, "planner", &planner_table(&runs));
    }
    std::fs::write(out, doc).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_replaced_in_place() {
        let doc = "a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n";
        assert_eq!(
            replace_block(doc, "x", "new\n"),
            "a\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\nb\n"
        );
        assert!(
            replace_block("a\n", "y", "z\n").ends_with("<!-- bench:y -->\nz\n<!-- /bench:y -->\n")
        );
    }

    #[test]
    fn figure_has_a_point_per_count() {
        let run = |agents, rss_kib| HubRun {
            agents,
            tokens_s: 1.0,
            connect_s: 1.0,
            baseline_rss_kib: 10_000,
            rss_kib,
            rss_after_commit_kib: rss_kib,
            fds: 10,
            cpu_pct: 1.0,
            commit: CommitLatency {
                median_ms: 1.0,
                p99_ms: 1.0,
                max_ms: 1.0,
            },
        };
        let svg = memory_svg(&[run(100, 20_000), run(1000, 80_000), run(1000, 90_000)]);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(hub_table(&[run(100, 20_000)]).contains("| 100 | 1 |"));
    }

    #[test]
    fn planner_rows_per_count() {
        let run = |clusters, us| PlannerRun {
            clusters,
            partitions: 10,
            steps: 110,
            calls: 310,
            completed: true,
            step_median_us: us,
            step_p99_us: us,
            step_max_us: us,
            partition_ms: 1.0,
        };
        let t = planner_table(&[run(1000, 100.0), run(1000, 300.0), run(10000, 900.0)]);
        assert!(
            t.contains("| 1000 (10) | 2 | 110 (110–110) | 200 (100–300) |"),
            "{t}"
        );
        assert!(t.contains("| 10000 (10) | 1 |"), "{t}");
    }
}
