//! The web UI's pages as HTML, from the API's views. Pure: a page is a function
//! of what it shows, so escaping and what is hidden are unit-tested here. Every
//! text that came from a cluster, a repository or an operator goes through
//! [`esc`]; every path segment or query value through [`enc`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use flotilla_shared::api::{BundleView, ClusterView, DriftView, RolloutView, SourceView};
use flotilla_shared::matrix;
use flotilla_shared::state::BundleState;

/// A page: its title, the part that never changes while it is open (forms),
/// and the part live updates replace.
pub struct Page {
    pub title: String,
    pub head: String,
    pub live: String,
}

/// HTML text and attribute escaping.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encoding of a path segment or query value (RFC 3986 unreserved kept).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn state_name(s: BundleState) -> String {
    format!("{s:?}")
}

/// A state as a badge: the colour is a class, the word is always there (colour
/// is never the only cue).
fn badge(s: BundleState) -> String {
    let n = state_name(s);
    format!(r#"<span class="st st-{n}">{n}</span>"#)
}

/// A short commit id.
fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

fn counts_list(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "<span class=\"muted\">none</span>".into();
    }
    counts
        .iter()
        .map(|(s, n)| format!(r#"<span class="st st-{}">{} {n}</span>"#, esc(s), esc(s)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the overview shows.
pub struct Overview<'a> {
    pub clusters: usize,
    pub connected: usize,
    /// Deployments by state, fleet-wide.
    pub states: BTreeMap<BundleState, usize>,
    /// Bundles with their deployments by state.
    pub bundles: Vec<(&'a BundleView, BTreeMap<String, usize>)>,
    pub sources: &'a [SourceView],
    pub rollouts: &'a [RolloutView],
}

pub fn overview(o: &Overview<'_>) -> Page {
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<section aria-labelledby="h-fleet"><h2 id="h-fleet">Fleet</h2>
<ul class="tiles">
<li><span class="big" data-testid="clusters-online">{}</span> clusters online</li>
<li><span class="big" data-testid="clusters-offline">{}</span> offline</li>
<li><span class="big">{}</span> bundles</li>
<li><span class="big">{}</span> sources</li>
</ul>
<p>Deployments: {}</p></section>"#,
        o.connected,
        o.clusters - o.connected.min(o.clusters),
        o.bundles.len(),
        o.sources.len(),
        counts_list(&o.states.iter().map(|(s, n)| (state_name(*s), *n)).collect()),
    );
    h.push_str(r#"<section aria-labelledby="h-rollouts"><h2 id="h-rollouts">Rollouts</h2>"#);
    let running: Vec<&RolloutView> = o
        .rollouts
        .iter()
        .filter(|r| !matches!(r.phase.as_str(), "Completed" | "RolledBack" | "Superseded"))
        .collect();
    if running.is_empty() {
        h.push_str("<p class=\"muted\">No rollout is running.</p>");
    } else {
        h.push_str("<table><thead><tr><th scope=\"col\">Bundle</th><th scope=\"col\">Revision</th><th scope=\"col\">Phase</th><th scope=\"col\">Partitions done</th></tr></thead><tbody>");
        for r in running {
            let done = r.partitions.iter().filter(|p| p.phase == "Done").count();
            let _ = write!(
                h,
                r#"<tr><td><a href="/bundles/{}">{}</a></td><td><code>{}</code></td><td class="phase-{}">{}</td><td>{done} / {}</td></tr>"#,
                enc(&r.bundle),
                esc(&r.bundle),
                esc(short(&r.revision)),
                esc(&r.phase),
                esc(&r.phase),
                r.partitions.len()
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");
    h.push_str(r#"<section aria-labelledby="h-bundles"><h2 id="h-bundles">Bundles</h2>"#);
    h.push_str("<table><thead><tr><th scope=\"col\">Bundle</th><th scope=\"col\">Source</th><th scope=\"col\">Revision</th><th scope=\"col\">Clusters by state</th></tr></thead><tbody>");
    for (b, counts) in &o.bundles {
        let error = b
            .error
            .as_deref()
            .map(|e| format!(r#"<div class="error">{}</div>"#, esc(e)))
            .unwrap_or_default();
        let _ = write!(
            h,
            r#"<tr><td><a href="/bundles/{}">{}</a>{error}</td><td><a href="/sources/{}">{}</a></td><td><code>{}</code></td><td>{}</td></tr>"#,
            enc(&b.name),
            esc(&b.name),
            enc(&b.source),
            esc(&b.source),
            esc(short(&b.revision)),
            counts_list(counts)
        );
    }
    h.push_str("</tbody></table></section>");
    h.push_str(r#"<section aria-labelledby="h-sources"><h2 id="h-sources">Sources</h2>"#);
    h.push_str("<table><thead><tr><th scope=\"col\">Source</th><th scope=\"col\">Repository</th><th scope=\"col\">Commit</th><th scope=\"col\">Last fetched</th><th scope=\"col\">Error</th></tr></thead><tbody>");
    for s in o.sources {
        let _ = write!(
            h,
            r#"<tr><td><a href="/sources/{}">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td><td class="error">{}</td></tr>"#,
            enc(&s.name),
            esc(&s.name),
            esc(&s.repo),
            esc(s.commit.as_deref().map(short).unwrap_or("")),
            esc(s.last_fetched.as_deref().unwrap_or("never")),
            esc(s.last_error.as_deref().unwrap_or(""))
        );
    }
    h.push_str("</tbody></table></section>");
    Page {
        title: "Overview".into(),
        head: String::new(),
        live: h,
    }
}

/// The matrix's filter form values, as typed.
#[derive(Debug, Default, Clone)]
pub struct MatrixForm {
    pub cluster: String,
    pub bundle: String,
    pub selector: String,
    pub state: String,
    pub per: String,
}

impl MatrixForm {
    fn query(&self, page: usize) -> String {
        let mut q = format!("?page={page}");
        for (k, v) in [
            ("cluster", &self.cluster),
            ("bundle", &self.bundle),
            ("selector", &self.selector),
            ("state", &self.state),
            ("per", &self.per),
        ] {
            if !v.is_empty() {
                let _ = write!(q, "&{k}={}", enc(v));
            }
        }
        q
    }
}

pub fn matrix(p: &matrix::Page, form: &MatrixForm, error: Option<&str>) -> Page {
    let mut head = String::new();
    let options: String = std::iter::once(String::new())
        .chain(BundleState::ALL.iter().map(|s| state_name(*s)))
        .map(|s| {
            let sel = if s == form.state { " selected" } else { "" };
            let label = if s.is_empty() { "any" } else { &s };
            format!(
                r#"<option value="{}"{sel}>{}</option>"#,
                esc(&s),
                esc(label)
            )
        })
        .collect();
    let _ = write!(
        head,
        r#"<form class="filters" method="get" action="/matrix" role="search">
<label>Cluster name <input name="cluster" value="{}"></label>
<label>Labels <input name="selector" placeholder="env=prod,tier!=edge" value="{}"></label>
<label>Bundle name <input name="bundle" value="{}"></label>
<label>State <select name="state">{options}</select></label>
<button type="submit">Filter</button></form>"#,
        esc(&form.cluster),
        esc(&form.selector),
        esc(&form.bundle),
    );
    if let Some(e) = error {
        let _ = write!(head, r#"<p class="error" role="alert">{}</p>"#, esc(e));
    }
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<p data-testid="matrix-summary">{} of {} clusters ({} online); deployments: {}</p>"#,
        p.matched,
        p.total,
        p.connected,
        counts_list(&p.counts.iter().map(|(s, n)| (state_name(*s), *n)).collect())
    );
    h.push_str(
        r#"<div class="scroll"><table class="matrix"><thead><tr><th scope="col">Cluster</th>"#,
    );
    for b in &p.bundles {
        let _ = write!(
            h,
            r#"<th scope="col"><a href="/bundles/{}">{}</a></th>"#,
            enc(b),
            esc(b)
        );
    }
    h.push_str("</tr></thead><tbody>");
    for r in &p.rows {
        let dot = if r.connected {
            r#"<span class="on" title="connected">online</span>"#
        } else {
            r#"<span class="off" title="not connected">offline</span>"#
        };
        let _ = write!(
            h,
            r#"<tr><th scope="row"><a href="/clusters/{}">{}</a> {dot}</th>"#,
            enc(&r.cluster),
            esc(&r.cluster)
        );
        for b in &p.bundles {
            match r.states.get(b) {
                Some(s) => {
                    let _ = write!(h, "<td>{}</td>", badge(*s));
                }
                None => h.push_str(r#"<td class="muted">–</td>"#),
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table></div>");
    let _ = write!(
        h,
        r#"<nav class="pages" aria-label="Pages"><span>Page {} of {}</span>"#,
        p.page, p.pages
    );
    if p.page > 1 {
        let _ = write!(
            h,
            r#" <a rel="prev" href="/matrix{}">Previous</a>"#,
            esc(&form.query(p.page - 1))
        );
    }
    if p.page < p.pages {
        let _ = write!(
            h,
            r#" <a rel="next" href="/matrix{}">Next</a>"#,
            esc(&form.query(p.page + 1))
        );
    }
    h.push_str("</nav>");
    Page {
        title: "Matrix".into(),
        head,
        live: h,
    }
}

pub fn cluster(c: &ClusterView) -> Page {
    let mut h = String::new();
    let labels: String = c
        .labels
        .iter()
        .map(|(k, v)| format!("<li><code>{}={}</code></li>", esc(k), esc(v)))
        .collect();
    let _ = write!(
        h,
        r#"<dl class="facts">
<dt>Connected</dt><dd data-testid="connected">{}</dd>
<dt>Last seen</dt><dd>{}</dd>
<dt>Agent</dt><dd>{}</dd>
<dt>Kubernetes</dt><dd>{}</dd>
<dt>Labels</dt><dd><ul class="labels">{labels}</ul></dd>
<dt>Drift events</dt><dd><a href="/drift?cluster={}">{}</a></dd>
</dl>"#,
        if c.connected { "yes" } else { "no" },
        esc(c.last_seen.as_deref().unwrap_or("never")),
        esc(&c.agent_version),
        esc(&c.kubernetes_version),
        enc(&c.name),
        c.drift_events
    );
    h.push_str("<h2>Bundles</h2><table><thead><tr><th scope=\"col\">Bundle</th><th scope=\"col\">State</th><th scope=\"col\">Applied revision</th><th scope=\"col\">Message</th></tr></thead><tbody>");
    for b in c.bundles.iter().flatten() {
        let _ = write!(
            h,
            r#"<tr><td><a href="/bundles/{}">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"#,
            enc(&b.bundle),
            esc(&b.bundle),
            badge(b.state),
            esc(b.applied_revision.as_deref().map(short).unwrap_or("")),
            esc(&b.message)
        );
    }
    h.push_str("</tbody></table>");
    Page {
        title: format!("Cluster {}", c.name),
        head: String::new(),
        live: h,
    }
}

/// Rows of a bundle page's cluster table per page.
pub const BUNDLE_CLUSTERS_PER_PAGE: usize = 100;

pub fn bundle(b: &BundleView, rollout: Option<&RolloutView>, page: usize, csrf: &str) -> Page {
    let mut h = String::new();
    let error = b
        .error
        .as_deref()
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    let _ = write!(
        h,
        r#"<dl class="facts">
<dt>Source</dt><dd><a href="/sources/{}">{}</a> <code>{}</code></dd>
<dt>Revision</dt><dd><code>{}</code></dd>
<dt>Clusters by state</dt><dd>{}</dd>
<dt>Drift events</dt><dd><a href="/drift?bundle={}">{}</a></dd>
</dl>{error}"#,
        enc(&b.source),
        esc(&b.source),
        esc(&b.path),
        esc(&b.revision),
        counts_list(&b.cluster_counts),
        enc(&b.name),
        b.drift_events
    );
    if let Some(r) = rollout {
        let _ = write!(
            h,
            r#"<section aria-labelledby="h-rollout"><h2 id="h-rollout">Rollout</h2>
<p>Revision <code>{}</code> (from <code>{}</code>): <strong data-testid="rollout-phase">{}</strong> {}</p>"#,
            esc(short(&r.revision)),
            esc(r.previous.as_deref().map(short).unwrap_or("none")),
            esc(&r.phase),
            esc(&r.reason)
        );
        let final_phase = matches!(r.phase.as_str(), "Completed" | "RolledBack" | "Superseded");
        if !final_phase {
            h.push_str(r#"<div class="actions">"#);
            for (action, label, show) in [
                ("pause", "Pause", r.phase != "Paused"),
                (
                    "resume",
                    "Resume",
                    r.phase == "Paused" || r.phase == "Halted",
                ),
                ("rollback", "Roll back", true),
            ] {
                if show {
                    let _ = write!(
                        h,
                        r#"<form method="post" action="/bundles/{}/{action}"><input type="hidden" name="csrf" value="{}"><button type="submit" data-testid="rollout-{action}">{label}</button></form>"#,
                        enc(&b.name),
                        esc(csrf)
                    );
                }
            }
            h.push_str("</div>");
        }
        h.push_str("<ol class=\"partitions\">");
        for p in &r.partitions {
            let done = p
                .clusters
                .iter()
                .filter(|c| c.progress == "Ready" || c.progress == "Skipped")
                .count();
            let _ = write!(
                h,
                r#"<li><strong>{}</strong>: {} ({done} of {} clusters done)<progress max="{}" value="{done}"></progress></li>"#,
                esc(&p.name),
                esc(&p.phase),
                p.clusters.len(),
                p.clusters.len().max(1)
            );
        }
        h.push_str("</ol><h3>Events</h3><ul class=\"events\">");
        for e in &r.events {
            let _ = write!(
                h,
                "<li><time>{}</time> {} {}</li>",
                esc(&e.at),
                esc(&e.kind),
                esc(&e.message)
            );
        }
        h.push_str("</ul></section>");
    }
    let clusters = b.clusters.as_deref().unwrap_or_default();
    let pages = clusters.len().div_ceil(BUNDLE_CLUSTERS_PER_PAGE).max(1);
    let page = page.clamp(1, pages);
    h.push_str("<h2>Clusters</h2><table><thead><tr><th scope=\"col\">Cluster</th><th scope=\"col\">State</th><th scope=\"col\">Applied revision</th><th scope=\"col\">Message</th></tr></thead><tbody>");
    for c in clusters
        .iter()
        .skip((page - 1) * BUNDLE_CLUSTERS_PER_PAGE)
        .take(BUNDLE_CLUSTERS_PER_PAGE)
    {
        let _ = write!(
            h,
            r#"<tr><td><a href="/clusters/{}">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"#,
            enc(&c.cluster),
            esc(&c.cluster),
            badge(c.state),
            esc(c.applied_revision.as_deref().map(short).unwrap_or("")),
            esc(&c.message)
        );
    }
    h.push_str("</tbody></table>");
    pager(
        &mut h,
        &format!("/bundles/{}", enc(&b.name)),
        page,
        pages,
        "",
    );
    Page {
        title: format!("Bundle {}", b.name),
        head: String::new(),
        live: h,
    }
}

fn pager(h: &mut String, base: &str, page: usize, pages: usize, query: &str) {
    if pages <= 1 {
        return;
    }
    let _ = write!(
        h,
        r#"<nav class="pages" aria-label="Pages"><span>Page {page} of {pages}</span>"#
    );
    if page > 1 {
        let _ = write!(
            h,
            r#" <a rel="prev" href="{base}?page={}{}">Previous</a>"#,
            page - 1,
            esc(query)
        );
    }
    if page < pages {
        let _ = write!(
            h,
            r#" <a rel="next" href="{base}?page={}{}">Next</a>"#,
            page + 1,
            esc(query)
        );
    }
    h.push_str("</nav>");
}

/// Drift events per page of the drift list.
pub const DRIFT_PER_PAGE: usize = 50;

fn object_name(d: &DriftView) -> String {
    match &d.object.namespace {
        Some(ns) => format!("{}/{}/{}", d.object.kind, ns, d.object.name),
        None => format!("{}/{}", d.object.kind, d.object.name),
    }
}

/// The newest first; `events` is already filtered.
pub fn drift_list(
    events: &[DriftView],
    cluster: &str,
    bundle: &str,
    page: usize,
    dropped: u64,
) -> Page {
    let mut head = String::new();
    let _ = write!(
        head,
        r#"<form class="filters" method="get" action="/drift" role="search">
<label>Cluster <input name="cluster" value="{}"></label>
<label>Bundle <input name="bundle" value="{}"></label>
<button type="submit">Filter</button></form>"#,
        esc(cluster),
        esc(bundle)
    );
    let pages = events.len().div_ceil(DRIFT_PER_PAGE).max(1);
    let page = page.clamp(1, pages);
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<p>{} drift events{}</p>"#,
        events.len(),
        if dropped > 0 {
            format!(" ({dropped} older ones dropped from the bounded history)")
        } else {
            String::new()
        }
    );
    h.push_str("<table data-testid=\"drift-list\"><thead><tr><th scope=\"col\">Event</th><th scope=\"col\">Detected</th><th scope=\"col\">Cluster</th><th scope=\"col\">Bundle</th><th scope=\"col\">Object</th><th scope=\"col\">Changed by</th><th scope=\"col\">Corrected</th></tr></thead><tbody>");
    for d in events
        .iter()
        .skip((page - 1) * DRIFT_PER_PAGE)
        .take(DRIFT_PER_PAGE)
    {
        let _ = write!(
            h,
            r#"<tr><td><a href="/drift/{}">#{}</a></td><td><time>{}</time></td><td><a href="/clusters/{}">{}</a></td><td><a href="/bundles/{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            d.id,
            d.id,
            esc(&d.detected_at),
            enc(&d.cluster),
            esc(&d.cluster),
            enc(&d.bundle),
            esc(&d.bundle),
            esc(&object_name(d)),
            esc(&d.manager),
            if d.deleted {
                "deleted; recreated"
            } else if d.corrected {
                "yes"
            } else {
                "no"
            }
        );
    }
    h.push_str("</tbody></table>");
    let q = format!("&cluster={}&bundle={}", enc(cluster), enc(bundle));
    pager(&mut h, "/drift", page, pages, &q);
    Page {
        title: "Drift".into(),
        head,
        live: h,
    }
}

/// Whether a field of this object holds a Secret's value: shown as hidden, even
/// when the agent already redacted it to a digest.
fn secret_value(d: &DriftView, path: &str) -> bool {
    d.object.kind == "Secret"
        && d.object.api_version == "v1"
        && ["data", "stringData"].iter().any(|f| {
            let p = path.trim_start_matches(['/', '.']);
            p == *f || p.starts_with(&format!("{f}.")) || p.starts_with(&format!("{f}/"))
        })
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "(absent)".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn drift(d: &DriftView) -> Page {
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<dl class="facts">
<dt>Cluster</dt><dd><a href="/clusters/{}">{}</a></dd>
<dt>Bundle</dt><dd><a href="/bundles/{}">{}</a></dd>
<dt>Object</dt><dd><code>{}</code> ({})</dd>
<dt>Changed by</dt><dd data-testid="drift-manager">{}</dd>
<dt>Detected</dt><dd><time>{}</time></dd>
<dt>Corrected</dt><dd data-testid="drift-corrected">{}</dd>
</dl>"#,
        enc(&d.cluster),
        esc(&d.cluster),
        enc(&d.bundle),
        esc(&d.bundle),
        esc(&object_name(d)),
        esc(&d.object.api_version),
        esc(&d.manager),
        esc(&d.detected_at),
        if d.deleted {
            "the object was deleted and created again"
        } else if d.corrected {
            "yes, the desired state was applied again"
        } else {
            "no"
        }
    );
    h.push_str("<h2>Fields</h2><table class=\"diff\" data-testid=\"drift-diff\"><thead><tr><th scope=\"col\">Field</th><th scope=\"col\">Desired (Git)</th><th scope=\"col\">Live (cluster)</th></tr></thead><tbody>");
    for f in &d.fields {
        let (desired, live) = if secret_value(d, &f.path) {
            let hidden = r#"<span class="muted">(Secret value hidden)</span>"#.to_string();
            (hidden.clone(), hidden)
        } else {
            (
                format!("<del>{}</del>", esc(&json_text(&f.desired))),
                format!("<ins>{}</ins>", esc(&json_text(&f.live))),
            )
        };
        let _ = write!(
            h,
            "<tr><th scope=\"row\"><code>{}</code></th><td>{desired}</td><td>{live}</td></tr>",
            esc(&f.path)
        );
    }
    h.push_str("</tbody></table>");
    Page {
        title: format!("Drift #{}", d.id),
        head: String::new(),
        live: h,
    }
}

pub fn source(s: &SourceView, bundles: &[&BundleView]) -> Page {
    let mut h = String::new();
    let reference = s
        .branch
        .as_deref()
        .map(|b| format!("branch {b}"))
        .or_else(|| s.tag.as_deref().map(|t| format!("tag {t}")))
        .or_else(|| s.revision.as_deref().map(|r| format!("revision {r}")))
        .unwrap_or_else(|| "default branch".into());
    let _ = write!(
        h,
        r#"<dl class="facts">
<dt>Repository</dt><dd><code>{}</code></dd>
<dt>Tracks</dt><dd>{}</dd>
<dt>Paths</dt><dd>{}</dd>
<dt>Polled every</dt><dd>{}</dd>
<dt>Commit</dt><dd><code data-testid="source-commit">{}</code></dd>
<dt>Last fetched</dt><dd>{}</dd>
<dt>Last error</dt><dd class="error">{}</dd>
<dt>Failures in a row</dt><dd>{}</dd>
</dl>"#,
        esc(&s.repo),
        esc(&reference),
        esc(&s.paths.join(", ")),
        esc(&s.poll_interval),
        esc(s.commit.as_deref().unwrap_or("not fetched yet")),
        esc(s.last_fetched.as_deref().unwrap_or("never")),
        esc(s.last_error.as_deref().unwrap_or("none")),
        s.consecutive_failures
    );
    h.push_str("<h2>Bundles</h2><table><thead><tr><th scope=\"col\">Bundle</th><th scope=\"col\">Path</th><th scope=\"col\">Revision</th><th scope=\"col\">Clusters by state</th></tr></thead><tbody>");
    for b in bundles {
        let error = b
            .error
            .as_deref()
            .map(|e| format!(r#"<div class="error">{}</div>"#, esc(e)))
            .unwrap_or_default();
        let _ = write!(
            h,
            r#"<tr><td><a href="/bundles/{}">{}</a>{error}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>"#,
            enc(&b.name),
            esc(&b.name),
            esc(&b.path),
            esc(short(&b.revision)),
            counts_list(&b.cluster_counts)
        );
    }
    h.push_str("</tbody></table>");
    Page {
        title: format!("Source {}", s.name),
        head: String::new(),
        live: h,
    }
}

/// A whole document: navigation, the page, and the script that keeps the live
/// part current. `csrf` is the session's (the logout form); `None` when logged out.
pub fn document(page: &Page, csrf: Option<&str>) -> String {
    let nav = match csrf {
        Some(csrf) => format!(
            r#"<nav aria-label="Main"><a href="/">Overview</a> <a href="/matrix">Matrix</a> <a href="/drift">Drift</a>
<span id="live-status" role="status" aria-live="polite">connecting…</span>
<form method="post" action="/logout" class="logout"><input type="hidden" name="csrf" value="{}"><button type="submit">Log out</button></form></nav>"#,
            esc(csrf)
        ),
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · Flotilla</title><link rel="stylesheet" href="/ui/app.css"><script src="/ui/app.js" defer></script></head>
<body><header><a class="brand" href="/">Flotilla</a>{nav}</header>
<main><h1>{}</h1>{}<div id="live" data-live="{}">{}</div></main></body></html>"#,
        esc(&page.title),
        esc(&page.title),
        page.head,
        if csrf.is_some() { "on" } else { "off" },
        page.live
    )
}

pub fn login(error: Option<&str>, next: &str) -> Page {
    let mut head = String::new();
    if let Some(e) = error {
        let _ = write!(head, r#"<p class="error" role="alert">{}</p>"#, esc(e));
    }
    let _ = write!(
        head,
        r#"<form method="post" action="/login" class="login">
<label>Admin token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<input type="hidden" name="next" value="{}">
<button type="submit">Log in</button></form>
<p class="muted">The admin token is in the hub's data directory, <code>admin-token</code>.</p>"#,
        esc(next)
    );
    Page {
        title: "Log in".into(),
        head,
        live: String::new(),
    }
}

pub fn message(title: &str, text: &str) -> Page {
    Page {
        title: title.into(),
        head: format!(r#"<p role="alert">{}</p>"#, esc(text)),
        live: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::api::{DriftField, DriftObject};

    fn drift_view(kind: &str, path: &str) -> DriftView {
        DriftView {
            id: 7,
            cluster: "edge-<1>".into(),
            bundle: "web".into(),
            object: DriftObject {
                api_version: "v1".into(),
                kind: kind.into(),
                namespace: Some("default".into()),
                name: "app".into(),
            },
            fields: vec![DriftField {
                path: path.into(),
                desired: serde_json::json!("c2VjcmV0"),
                live: serde_json::json!("<script>alert(1)</script>"),
            }],
            manager: "kubectl-edit".into(),
            detected_at: "2026-12-02T10:00:00Z".into(),
            corrected: true,
            deleted: false,
        }
    }

    #[test]
    fn text_and_attributes_are_escaped() {
        assert_eq!(
            esc(r#"<a href="x" onclick='y'>&"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;"
        );
        assert_eq!(enc("a b/c?d&e=f"), "a%20b%2Fc%3Fd%26e%3Df");
        let page = drift(&drift_view("ConfigMap", "/data/key"));
        assert!(!page.live.contains("<script>"), "{}", page.live);
        assert!(page.live.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.live.contains("/clusters/edge-%3C1%3E"));
        assert!(page.live.contains("edge-&lt;1&gt;"));
    }

    #[test]
    fn secret_values_are_never_shown() {
        for path in [
            "/data/password",
            "data.password",
            "/stringData/token",
            "/data",
        ] {
            let page = drift(&drift_view("Secret", path));
            assert!(!page.live.contains("c2VjcmV0"), "{path}: {}", page.live);
            assert!(!page.live.contains("alert(1)"), "{path}: {}", page.live);
            assert!(page.live.contains("Secret value hidden"), "{path}");
        }
        // A Secret's metadata is shown; a ConfigMap's data is shown.
        let page = drift(&drift_view("Secret", "/metadata/labels/app"));
        assert!(page.live.contains("c2VjcmV0"));
        let page = drift(&drift_view("ConfigMap", "/data/password"));
        assert!(page.live.contains("c2VjcmV0"));
    }

    #[test]
    fn matrix_pages_link_with_the_filters_encoded() {
        let rows: Vec<matrix::Row> = (0..120)
            .map(|i| matrix::Row {
                cluster: format!("c{i:03}"),
                labels: Default::default(),
                connected: i % 2 == 0,
                states: [("web".to_string(), BundleState::Ready)].into(),
            })
            .collect();
        let q = matrix::Query {
            page: 2,
            per_page: 50,
            ..Default::default()
        };
        let p = matrix::page(&rows, &q);
        let form = MatrixForm {
            selector: "env in (a,b)&x=\"".into(),
            ..Default::default()
        };
        let page = matrix(&p, &form, None);
        assert!(page.live.contains("Page 2 of 3"));
        assert!(
            page.live
                .contains(r#"href="/matrix?page=1&amp;selector=env%20in%20%28a%2Cb%29%26x%3D%22""#),
            "{}",
            page.live
        );
        assert!(page.live.contains(r#"href="/matrix?page=3"#));
        assert_eq!(page.live.matches("<tr><th scope=\"row\">").count(), 50);
        assert!(page.head.contains("value=\"env in (a,b)&amp;x=&quot;\""));
    }

    #[test]
    fn the_logged_out_document_has_no_live_updates_or_logout() {
        let doc = document(&login(Some("<b>bad</b>"), "/x\"><script>"), None);
        assert!(doc.contains(r#"data-live="off""#));
        assert!(!doc.contains("/logout"));
        assert!(!doc.contains("<b>bad</b>"));
        assert!(!doc.contains("\"><script>"));
    }
}
