//! Notifications: what an operator asks for (`kind: Notification`), and the pure
//! decision of which messages a change of the fleet calls for.
//!
//! - Messages are sent on transitions only: each notification keeps a `Memory`
//!   of what it already said, and `decide` compares the fleet with it.
//! - A bundle's new revision gives **one digest** with each cluster's outcome,
//!   once every cluster it targets has one (Ready, ErrApplied, NotReady past the
//!   grace period, or offline past the grace period); a later change of an
//!   outcome within the same revision gives a follow-up digest of the changes.
//! - A notification applied to a running fleet starts from what is true then:
//!   its first decision records the present and sends nothing.
//!
//! The hub persists the new memory and the messages together (its outbox), so a
//! restart neither repeats nor loses one; each message carries an idempotency key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::labels::Labels;
use crate::objects::{parse_duration, validate_name};
use crate::selector::LabelSelector;
use crate::state::BundleState;
use crate::Error;

/// How long a cluster stays NotReady, or offline, before it counts, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);
/// Clusters listed in one message (the counts always cover all of them).
pub const MAX_LISTED: usize = 1000;
/// Drift events listed in one message.
pub const MAX_DRIFT_LISTED: usize = 100;
/// Characters kept of a message an agent or a tool wrote.
pub const MAX_TEXT: usize = 500;

/// Where messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkType {
    /// A JSON POST, signed with HMAC-SHA256 when the notification has a secret.
    Webhook,
    /// A Slack-compatible incoming webhook (`{"text": ...}`).
    Slack,
}

/// What a notification can be about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Event {
    ErrApplied,
    NotReady,
    Drift,
    RolloutHalted,
    RolledBack,
    ClusterOffline,
    SourceError,
    RevisionReady,
}

impl Event {
    pub const ALL: [Event; 8] = [
        Event::ErrApplied,
        Event::NotReady,
        Event::Drift,
        Event::RolloutHalted,
        Event::RolledBack,
        Event::ClusterOffline,
        Event::SourceError,
        Event::RevisionReady,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::ErrApplied => "ErrApplied",
            Event::NotReady => "NotReady",
            Event::Drift => "Drift",
            Event::RolloutHalted => "RolloutHalted",
            Event::RolledBack => "RolledBack",
            Event::ClusterOffline => "ClusterOffline",
            Event::SourceError => "SourceError",
            Event::RevisionReady => "RevisionReady",
        }
    }
}

/// `spec` of a `Notification`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotificationSpec {
    #[serde(rename = "type")]
    pub sink: SinkType,
    /// Where to POST. A Slack notification may keep it in its secret instead
    /// (the secret's `url`), since a Slack URL is itself the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A hub secret: its `webhookSecret` signs a webhook's body; its `url` is a
    /// Slack notification's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    pub events: Vec<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<LabelSelector>,
    /// How long a bundle stays NotReady before it counts (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_grace: Option<String>,
    /// How long a cluster stays offline before it counts (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_grace: Option<String>,
}

impl NotificationSpec {
    /// Checks what an operator could have got wrong, naming the notification.
    pub fn validate(&self, name: &str) -> Result<(), Error> {
        validate_name(name)?;
        let bad = |reason: String| Error::Name {
            name: name.to_string(),
            reason,
        };
        if self.events.is_empty() {
            return Err(bad(format!(
                "spec.events is required: some of {}",
                Event::ALL.map(Event::as_str).join(", ")
            )));
        }
        match (&self.url, self.sink) {
            (Some(url), _) => validate_url(url).map_err(|r| bad(format!("spec.url: {r}")))?,
            (None, SinkType::Webhook) => return Err(bad("spec.url is required".into())),
            (None, SinkType::Slack) if self.secret_ref.is_none() => return Err(bad(
                "a slack notification needs spec.url or spec.secretRef (a secret with --url-file)"
                    .into(),
            )),
            (None, SinkType::Slack) => {}
        }
        if let Some(r) = &self.secret_ref {
            validate_name(r).map_err(|e| bad(format!("spec.secretRef: {e}")))?;
        }
        for s in [&self.bundle_selector, &self.cluster_selector]
            .into_iter()
            .flatten()
        {
            s.validate().map_err(|e| bad(e.to_string()))?;
        }
        for d in [&self.not_ready_grace, &self.offline_grace]
            .into_iter()
            .flatten()
        {
            parse_duration(d).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }

    fn grace(value: &Option<String>) -> u64 {
        let d = value
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(DEFAULT_GRACE);
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn not_ready_grace_ms(&self) -> u64 {
        Self::grace(&self.not_ready_grace)
    }

    pub fn offline_grace_ms(&self) -> u64 {
        Self::grace(&self.offline_grace)
    }

    fn wants(&self, e: Event) -> bool {
        self.events.contains(&e)
    }

    fn bundle_matches(&self, labels: &Labels) -> bool {
        self.bundle_selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
    }

    fn cluster_matches(&self, labels: &Labels) -> bool {
        self.cluster_selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
    }
}

/// An `http://` or `https://` URL with a host, no credentials and no spaces:
/// URLs are shown (without their query) and must not carry secrets there.
pub fn validate_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.is_empty() {
        return Err("has no host".into());
    }
    if authority.contains('@') {
        return Err(
            "must not carry credentials: put a Slack URL in the secret (--url-file)".into(),
        );
    }
    Ok(())
}

/// A URL as the API shows it: scheme, host and path, without query or fragment.
pub fn shown_url(url: &str) -> String {
    url[..url.find(['?', '#']).unwrap_or(url.len())].to_string()
}

// ---- what the hub sees ------------------------------------------------------

/// The fleet as the notifier sees it at `now_ms`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct World {
    pub now_ms: u64,
    /// `now_ms` as RFC 3339, for the messages.
    pub now: String,
    pub clusters: Vec<ClusterSeen>,
    pub bundles: Vec<BundleSeen>,
    pub sources: Vec<SourceSeen>,
    pub rollouts: Vec<RolloutSeen>,
    /// Drift events after the lowest cursor of the notifications, oldest first.
    pub drift: Vec<DriftSeen>,
    /// The highest drift id the hub has stored.
    pub drift_last_id: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSeen {
    pub name: String,
    pub labels: Labels,
    /// `None` while connected.
    pub offline_since_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BundleSeen {
    pub name: String,
    pub source: String,
    pub labels: Labels,
    /// The commit of its current content.
    pub revision: String,
    /// Identifies its current contents (every variant's); `None` before it
    /// ever rendered. A new value starts a new digest.
    pub content_hash: Option<String>,
    /// The clusters it is assigned to.
    pub clusters: Vec<OnCluster>,
}

/// A bundle on one cluster, as the hub shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnCluster {
    pub cluster: String,
    pub state: BundleState,
    /// The content the agent last reported on.
    pub content_hash: Option<String>,
    /// The content the cluster is to hold (its variant's).
    pub target_hash: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceSeen {
    pub name: String,
    pub error: Option<String>,
}

/// Rollout phases worth a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutEnd {
    Halted,
    RolledBack,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSeen {
    pub bundle: String,
    pub revision: String,
    /// `None` while progressing, paused, completed or superseded.
    pub end: Option<RolloutEnd>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DriftSeen {
    pub id: u64,
    pub cluster: String,
    pub bundle: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// Changed field paths (never values).
    pub fields: Vec<String>,
    pub manager: String,
    pub corrected: bool,
}

// ---- what a notification remembers -----------------------------------------

/// One cluster's outcome in a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ready,
    ErrApplied,
    NotReady,
    Offline,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ready => "Ready",
            Outcome::ErrApplied => "ErrApplied",
            Outcome::NotReady => "NotReady",
            Outcome::Offline => "Offline",
        }
    }
}

/// The last digest of a bundle: for which content, and what it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Digested {
    pub content_hash: String,
    pub revision: String,
    pub outcomes: BTreeMap<String, Outcome>,
}

/// What a notification has said so far (persisted with its messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// When it first looked (part of every key, so a notification deleted and
    /// created again never reuses one).
    pub since_ms: u64,
    /// Messages made so far.
    pub seq: u64,
    /// Per bundle.
    #[serde(default)]
    pub digests: BTreeMap<String, Digested>,
    /// `bundle/cluster` → when it was first seen NotReady on its current content.
    #[serde(default)]
    pub not_ready_since: BTreeMap<String, u64>,
    /// Clusters already announced offline.
    #[serde(default)]
    pub offline: BTreeSet<String>,
    /// Sources already announced failing.
    #[serde(default)]
    pub source_errors: BTreeSet<String>,
    /// Per bundle, the rollout end already announced (`revision/phase`).
    #[serde(default)]
    pub rollouts: BTreeMap<String, String>,
    /// Drift events up to this id are done.
    #[serde(default)]
    pub drift_after: u64,
}

/// One message to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The idempotency key: the same for every attempt, across restarts.
    pub key: String,
    pub events: Vec<Event>,
    /// One line, for chat sinks.
    pub title: String,
    /// Lines after the title, for chat sinks.
    pub lines: Vec<String>,
    /// A webhook's JSON body.
    pub body: Value,
}

struct Out<'a> {
    name: &'a str,
    memory: Memory,
    now: &'a str,
    messages: Vec<Message>,
}

impl Out<'_> {
    fn push(&mut self, events: Vec<Event>, title: String, lines: Vec<String>, mut body: Value) {
        self.memory.seq += 1;
        let key = message_key(self.name, self.memory.since_ms, self.memory.seq);
        if let Value::Object(m) = &mut body {
            m.insert("id".into(), json!(key));
            m.insert("notification".into(), json!(self.name));
            m.insert(
                "events".into(),
                json!(events.iter().map(|e| e.as_str()).collect::<Vec<_>>()),
            );
            m.insert("at".into(), json!(self.now));
        }
        self.messages.push(Message {
            key,
            events,
            title,
            lines,
            body,
        });
    }
}

/// The idempotency key of a notification's `seq`-th message.
pub fn message_key(name: &str, since_ms: u64, seq: u64) -> String {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(since_ms.to_be_bytes());
    h.update(seq.to_be_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Text an agent, a tool or the API server wrote, cut to `MAX_TEXT` characters.
fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_TEXT {
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX_TEXT).collect();
    out.push('…');
    out
}

/// What the notification `name` says about `world`, given what it said before
/// (`None`: it never looked). Returns its new memory and the messages, in order.
pub fn decide(
    name: &str,
    spec: &NotificationSpec,
    memory: Option<&Memory>,
    world: &World,
) -> (Memory, Vec<Message>) {
    let Some(memory) = memory else {
        // First look: the present is the baseline.
        let mut out = Out {
            name,
            memory: Memory {
                since_ms: world.now_ms,
                drift_after: world.drift_last_id,
                ..Memory::default()
            },
            now: &world.now,
            messages: Vec::new(),
        };
        observe(spec, world, &mut out);
        let mut m = out.memory;
        m.seq = 0;
        return (m, Vec::new());
    };
    let mut out = Out {
        name,
        memory: memory.clone(),
        now: &world.now,
        messages: Vec::new(),
    };
    observe(spec, world, &mut out);
    (out.memory, out.messages)
}

fn observe(spec: &NotificationSpec, world: &World, out: &mut Out<'_>) {
    let clusters: BTreeMap<&str, &ClusterSeen> = world
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    digests(spec, world, &clusters, out);
    offline(spec, world, out);
    source_errors(spec, world, out);
    rollouts(spec, world, out);
    drift(spec, world, &clusters, out);
}

fn offline_past(c: &ClusterSeen, grace_ms: u64, now_ms: u64) -> bool {
    c.offline_since_ms
        .is_some_and(|since| now_ms.saturating_sub(since) >= grace_ms)
}

fn digests(
    spec: &NotificationSpec,
    world: &World,
    clusters: &BTreeMap<&str, &ClusterSeen>,
    out: &mut Out<'_>,
) {
    let grace = spec.not_ready_grace_ms();
    let offline_grace = spec.offline_grace_ms();
    let mut live_bundles = BTreeSet::new();
    let mut not_ready_now = BTreeMap::new();
    for b in &world.bundles {
        if !spec.bundle_matches(&b.labels) {
            continue;
        }
        let Some(hash) = &b.content_hash else {
            continue;
        };
        live_bundles.insert(b.name.clone());
        // Each targeted cluster's outcome on this content (None: none yet).
        let mut outcomes: Vec<(&OnCluster, Option<Outcome>)> = Vec::new();
        for on in &b.clusters {
            let Some(c) = clusters.get(on.cluster.as_str()) else {
                continue;
            };
            if !spec.cluster_matches(&c.labels) {
                continue;
            }
            let current = on.content_hash.is_some() && on.content_hash == on.target_hash;
            let outcome = if offline_past(c, offline_grace, world.now_ms) {
                Some(Outcome::Offline)
            } else if !current {
                None
            } else {
                match on.state {
                    BundleState::Ready => Some(Outcome::Ready),
                    BundleState::ErrApplied => Some(Outcome::ErrApplied),
                    BundleState::NotReady => {
                        let key = format!("{}/{}", b.name, on.cluster);
                        let since = out
                            .memory
                            .not_ready_since
                            .get(&key)
                            .copied()
                            .unwrap_or(world.now_ms);
                        not_ready_now.insert(key, since);
                        (world.now_ms.saturating_sub(since) >= grace).then_some(Outcome::NotReady)
                    }
                    _ => None,
                }
            };
            outcomes.push((on, outcome));
        }
        if outcomes.is_empty() {
            continue;
        }
        let all_ready = outcomes.iter().all(|(_, o)| *o == Some(Outcome::Ready));
        let previous = out
            .memory
            .digests
            .get(&b.name)
            .filter(|d| d.content_hash == *hash)
            .cloned();
        match previous {
            None => {
                if outcomes.iter().any(|(_, o)| o.is_none()) {
                    continue; // not settled yet
                }
                let listed: Vec<(&OnCluster, Outcome)> = outcomes
                    .iter()
                    .map(|(on, o)| (*on, o.unwrap_or(Outcome::Ready)))
                    .collect();
                let recorded = listed
                    .iter()
                    .map(|(on, o)| (on.cluster.clone(), *o))
                    .collect();
                out.memory.digests.insert(
                    b.name.clone(),
                    Digested {
                        content_hash: hash.clone(),
                        revision: b.revision.clone(),
                        outcomes: recorded,
                    },
                );
                let events = digest_events(&listed, all_ready);
                send_digest(spec, b, &listed, &listed, events, false, out);
            }
            Some(mut d) => {
                let was_all_ready = d.outcomes.values().all(|o| *o == Outcome::Ready);
                let changed: Vec<(&OnCluster, Outcome)> = outcomes
                    .iter()
                    .filter_map(|(on, o)| {
                        let o = (*o)?;
                        (d.outcomes.get(&on.cluster) != Some(&o)).then_some((*on, o))
                    })
                    .collect();
                if changed.is_empty() {
                    continue;
                }
                for (on, o) in &changed {
                    d.outcomes.insert(on.cluster.clone(), *o);
                }
                // Clusters no longer targeted leave the record.
                let targeted: BTreeSet<&str> =
                    outcomes.iter().map(|(on, _)| on.cluster.as_str()).collect();
                d.outcomes.retain(|c, _| targeted.contains(c.as_str()));
                let all: Vec<(&OnCluster, Outcome)> = outcomes
                    .iter()
                    .filter_map(|(on, _)| d.outcomes.get(&on.cluster).map(|o| (*on, *o)))
                    .collect();
                out.memory.digests.insert(b.name.clone(), d);
                let events = digest_events(&changed, all_ready && !was_all_ready);
                send_digest(spec, b, &changed, &all, events, true, out);
            }
        }
    }
    out.memory.digests.retain(|b, _| live_bundles.contains(b));
    out.memory.not_ready_since = not_ready_now;
}

fn digest_events(listed: &[(&OnCluster, Outcome)], revision_ready: bool) -> Vec<Event> {
    let mut events = Vec::new();
    if listed.iter().any(|(_, o)| *o == Outcome::ErrApplied) {
        events.push(Event::ErrApplied);
    }
    if listed.iter().any(|(_, o)| *o == Outcome::NotReady) {
        events.push(Event::NotReady);
    }
    if revision_ready {
        events.push(Event::RevisionReady);
    }
    events
}

/// A digest lists `listed` (every cluster, or the changes of a follow-up) and
/// counts `all`. Sent only if it carries an event the notification wants.
fn send_digest(
    spec: &NotificationSpec,
    b: &BundleSeen,
    listed: &[(&OnCluster, Outcome)],
    all: &[(&OnCluster, Outcome)],
    events: Vec<Event>,
    update: bool,
    out: &mut Out<'_>,
) {
    let events: Vec<Event> = events.into_iter().filter(|e| spec.wants(*e)).collect();
    if events.is_empty() {
        return;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, o) in all {
        *counts.entry(o.as_str()).or_default() += 1;
    }
    let short = &b.revision[..b.revision.len().min(12)];
    let summary = counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let title = if update {
        format!(
            "bundle {} at {short}: changed on {} cluster(s) ({summary})",
            b.name,
            listed.len()
        )
    } else {
        format!(
            "bundle {} at {short} on {} cluster(s): {summary}",
            b.name,
            all.len()
        )
    };
    let shown = &listed[..listed.len().min(MAX_LISTED)];
    let lines = shown
        .iter()
        .filter(|(_, o)| *o != Outcome::Ready)
        .take(20)
        .map(|(on, o)| {
            if on.message.is_empty() {
                format!("{}: {}", on.cluster, o.as_str())
            } else {
                format!("{}: {}: {}", on.cluster, o.as_str(), clip(&on.message))
            }
        })
        .collect();
    let clusters: Vec<Value> = shown
        .iter()
        .map(|(on, o)| {
            json!({
                "cluster": on.cluster,
                "outcome": o.as_str(),
                "message": clip(&on.message),
            })
        })
        .collect();
    let body = json!({
        "kind": "BundleDigest",
        "update": update,
        "bundle": b.name,
        "source": b.source,
        "revision": b.revision,
        "contentHash": b.content_hash,
        "counts": counts,
        "clusters": clusters,
        "clustersOmitted": listed.len() - shown.len(),
    });
    out.push(events, title, lines, body);
}

fn offline(spec: &NotificationSpec, world: &World, out: &mut Out<'_>) {
    let grace = spec.offline_grace_ms();
    let mut newly = Vec::new();
    let mut still = BTreeSet::new();
    for c in &world.clusters {
        if !spec.cluster_matches(&c.labels) || !offline_past(c, grace, world.now_ms) {
            continue;
        }
        still.insert(c.name.clone());
        if !out.memory.offline.contains(&c.name) {
            newly.push(c);
        }
    }
    out.memory.offline = still;
    if newly.is_empty() || !spec.wants(Event::ClusterOffline) {
        return;
    }
    let names: Vec<&str> = newly.iter().map(|c| c.name.as_str()).collect();
    let title = format!(
        "{} cluster(s) offline for more than {}: {}",
        names.len(),
        humanize_ms(grace),
        names
            .iter()
            .take(20)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    );
    let body = json!({
        "kind": "ClusterOffline",
        "clusters": newly.iter().take(MAX_LISTED).map(|c| json!({
            "cluster": c.name,
            "offlineSinceUnixMs": c.offline_since_ms,
        })).collect::<Vec<_>>(),
        "clustersOmitted": newly.len().saturating_sub(MAX_LISTED),
    });
    out.push(vec![Event::ClusterOffline], title, Vec::new(), body);
}

fn humanize_ms(ms: u64) -> String {
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

fn source_errors(spec: &NotificationSpec, world: &World, out: &mut Out<'_>) {
    let mut failing = BTreeSet::new();
    for s in &world.sources {
        let Some(error) = &s.error else { continue };
        failing.insert(s.name.clone());
        if out.memory.source_errors.contains(&s.name) || !spec.wants(Event::SourceError) {
            continue;
        }
        // With a bundle selector, only sources with a bundle it selects.
        if spec.bundle_selector.is_some()
            && !world
                .bundles
                .iter()
                .any(|b| b.source == s.name && spec.bundle_matches(&b.labels))
        {
            continue;
        }
        let title = format!("source {} fails: {}", s.name, clip(error));
        let body = json!({"kind": "SourceError", "source": s.name, "error": clip(error)});
        out.push(vec![Event::SourceError], title, Vec::new(), body);
    }
    out.memory.source_errors = failing;
}

fn rollouts(spec: &NotificationSpec, world: &World, out: &mut Out<'_>) {
    let mut ended = BTreeMap::new();
    for r in &world.rollouts {
        let Some(end) = r.end else { continue };
        let (event, phase) = match end {
            RolloutEnd::Halted => (Event::RolloutHalted, "Halted"),
            RolloutEnd::RolledBack => (Event::RolledBack, "RolledBack"),
        };
        let key = format!("{}/{phase}", r.revision);
        let labels = world
            .bundles
            .iter()
            .find(|b| b.name == r.bundle)
            .map(|b| b.labels.clone())
            .unwrap_or_default();
        let said = out.memory.rollouts.get(&r.bundle) == Some(&key);
        ended.insert(r.bundle.clone(), key);
        if said || !spec.wants(event) || !spec.bundle_matches(&labels) {
            continue;
        }
        let short = &r.revision[..r.revision.len().min(12)];
        let title = format!(
            "rollout of {} at {short}: {phase}: {}",
            r.bundle,
            clip(&r.reason)
        );
        let body = json!({
            "kind": "Rollout",
            "bundle": r.bundle,
            "revision": r.revision,
            "phase": phase,
            "reason": clip(&r.reason),
        });
        out.push(vec![event], title, Vec::new(), body);
    }
    out.memory.rollouts = ended;
}

fn drift(
    spec: &NotificationSpec,
    world: &World,
    clusters: &BTreeMap<&str, &ClusterSeen>,
    out: &mut Out<'_>,
) {
    let after = out.memory.drift_after;
    out.memory.drift_after = after.max(world.drift_last_id);
    if !spec.wants(Event::Drift) {
        return;
    }
    let labels: BTreeMap<&str, &Labels> = world
        .bundles
        .iter()
        .map(|b| (b.name.as_str(), &b.labels))
        .collect();
    let empty = Labels::new();
    let mut by_bundle: BTreeMap<&str, Vec<&DriftSeen>> = BTreeMap::new();
    for d in world.drift.iter().filter(|d| d.id > after) {
        let bundle_labels = labels.get(d.bundle.as_str()).copied().unwrap_or(&empty);
        let cluster_labels = clusters
            .get(d.cluster.as_str())
            .map_or(&empty, |c| &c.labels);
        if spec.bundle_matches(bundle_labels) && spec.cluster_matches(cluster_labels) {
            by_bundle.entry(&d.bundle).or_default().push(d);
        }
    }
    for (bundle, events) in by_bundle {
        let shown = &events[..events.len().min(MAX_DRIFT_LISTED)];
        let cluster_count = events
            .iter()
            .map(|d| &d.cluster)
            .collect::<BTreeSet<_>>()
            .len();
        let title = format!(
            "drift in bundle {bundle}: {} change(s) on {cluster_count} cluster(s)",
            events.len()
        );
        let lines = shown
            .iter()
            .take(20)
            .map(|d| {
                format!(
                    "{}: {} changed by {} ({}){}",
                    d.cluster,
                    d.object,
                    if d.manager.is_empty() {
                        "unknown"
                    } else {
                        &d.manager
                    },
                    d.fields.join(", "),
                    if d.corrected { ", corrected" } else { "" }
                )
            })
            .map(|l| clip(&l))
            .collect();
        let body = json!({
            "kind": "Drift",
            "bundle": bundle,
            "drift": shown.iter().map(|d| json!({
                "id": d.id,
                "cluster": d.cluster,
                "object": d.object,
                "fields": d.fields,
                "manager": d.manager,
                "corrected": d.corrected,
            })).collect::<Vec<_>>(),
            "driftOmitted": events.len() - shown.len(),
        });
        out.push(vec![Event::Drift], title, lines, body);
    }
}

/// Escapes text for Slack's message format (`&`, `<`, `>`), so text from a
/// repository, an agent or an API server cannot mention `@channel` or make links.
pub fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Slack-compatible body for a message.
pub fn slack_body(notification: &str, m: &Message) -> Value {
    let mut text = format!("[flotilla/{notification}] {}", slack_escape(&m.title));
    for l in &m.lines {
        text.push('\n');
        text.push_str(&slack_escape(l));
    }
    json!({ "text": text })
}

#[cfg(test)]
mod tests;
