//! Simulated agents: each enrols with its own join token through the real
//! Enrolment service and keeps its own mutual-TLS connection with one
//! `Fleet.Session` stream, speaking the real protocol (Hello, DesiredAck, a
//! `Ready` status per received bundle, heartbeats). The TLS configurations, the
//! dialling, the key/CSR and the reconnect backoff come from the agent crate; what
//! a simulated agent skips is the cluster (it applies nothing) and the sled store.
//! Used by the benchmarks ([`session`]) and by the torture tests ([`torture_agent`]:
//! reconnects, an outbox of statuses and drift events, and a record of what the
//! hub acknowledged).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use flotilla_agent::{enroll, transport};
use flotilla_proto::v1::agent_message::Msg as AgentMsg;
use flotilla_proto::v1::enrolment_client::EnrolmentClient;
use flotilla_proto::v1::fleet_client::FleetClient;
use flotilla_proto::v1::hub_message::Msg as HubMsg;
use flotilla_proto::v1::{
    AgentMessage, BundleState, BundleStatus, DesiredAck, EnrollRequest, GetCaRequest, Heartbeat,
    Hello,
};
use flotilla_shared::token::{ca_hash, JoinToken};
use rustls::ClientConfig;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Uri;

/// What simulated agents tell the driver.
#[derive(Debug)]
pub enum Event {
    /// Agent `agent` acknowledged a Desired set whose bundles are at `revision`
    /// (the first bundle's; empty for an empty set).
    Acked {
        agent: usize,
        revision: String,
        at: Instant,
        /// Protobuf size of the Desired message (before any compression).
        desired_bytes: usize,
    },
    /// The agent's session ended with an error.
    Failed { agent: usize, error: String },
}

/// Fetches the hub's CA and checks it against the join token's pin, as the agent does.
pub async fn fetch_ca(hub: &Uri, token: &str) -> Result<String> {
    let token: JoinToken = token.parse().map_err(|e| anyhow!("join token: {e}"))?;
    let channel = transport::channel(hub, transport::insecure_config()?).await?;
    let ca_pem = EnrolmentClient::new(channel)
        .get_ca(GetCaRequest {})
        .await?
        .into_inner()
        .ca_pem;
    let der = transport::certs_from_pem(&ca_pem)?;
    if ca_hash(der[0].as_ref()) != token.ca_hash {
        bail!("the hub's CA does not match the token's pin");
    }
    Ok(ca_pem)
}

/// Enrols cluster `name` with `token` on its own connection; returns the mutual-TLS
/// configuration for its session.
pub async fn enrol(
    hub: &Uri,
    anonymous: Arc<ClientConfig>,
    ca_pem: &str,
    token: &str,
    name: &str,
) -> Result<Arc<ClientConfig>> {
    let token: JoinToken = token.parse().map_err(|e| anyhow!("join token: {e}"))?;
    let (key_pem, csr_pem) = enroll::key_and_csr(name)?;
    let channel = transport::channel(hub, anonymous).await?;
    let resp = EnrolmentClient::new(channel)
        .enroll(EnrollRequest {
            token: token.credential(),
            cluster_name: name.to_string(),
            labels: [("bench".to_string(), "true".to_string())].into(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow!("enrolling {name}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(transport::mutual_config(
        ca_pem,
        &resp.certificate_pem,
        &key_pem,
    )?)
}

/// Runs agent `agent`'s session until `stop` turns true or the stream fails.
/// With `gzip`, it accepts gzip-compressed messages (the real agent does not, yet).
pub async fn session(
    agent: usize,
    hub: Uri,
    tls: Arc<ClientConfig>,
    gzip: bool,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) {
    session_with(
        agent,
        hub,
        tls,
        gzip,
        events,
        stop,
        Arc::new(|_| BundleState::Ready),
    )
    .await
}

/// As [`session`], but redialling whenever the stream fails, with the real
/// agent's jittered backoff (`flotilla_agent::session::backoff`, reset after a
/// session that got its desired set), until `stop`: what a fleet does when its
/// hub restarts. Every desired set acknowledged is an [`Event::Acked`]; a
/// failed session is an [`Event::Failed`] (and a redial).
pub async fn session_reconnecting(
    agent: usize,
    hub: Uri,
    tls: Arc<ClientConfig>,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let verdict: Verdict = Arc::new(|_| BundleState::Ready);
    let mut attempt = 0u32;
    loop {
        let mut connected = false;
        let r = run(
            agent,
            &hub,
            tls.clone(),
            false,
            &[],
            &events,
            &mut stop,
            &verdict,
            &mut connected,
        )
        .await;
        match r {
            Ok(()) => return,
            Err(e) => {
                let _ = events.send(Event::Failed {
                    agent,
                    error: format!("{e:#}"),
                });
            }
        }
        if connected {
            attempt = 0;
        }
        let delay = flotilla_agent::session::backoff(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// What a simulated agent reports for a bundle at a revision.
pub type Verdict = Arc<dyn Fn(&str) -> BundleState + Send + Sync>;

/// As [`session`], reporting each received bundle in the state `verdict` gives
/// its revision (a "bad revision" whose Pods never become Ready, say).
pub async fn session_with(
    agent: usize,
    hub: Uri,
    tls: Arc<ClientConfig>,
    gzip: bool,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    verdict: Verdict,
) {
    let r = run(
        agent,
        &hub,
        tls,
        gzip,
        &[],
        &events,
        &mut stop,
        &verdict,
        &mut false,
    )
    .await;
    if let Err(e) = r {
        let _ = events.send(Event::Failed {
            agent,
            error: format!("{e:#}"),
        });
    }
}

/// As [`session`], advertising `features` in Hello (the chunks and deltas
/// that come are counted on the wire, not read).
pub async fn session_speaking(
    agent: usize,
    hub: Uri,
    tls: Arc<ClientConfig>,
    features: &[&str],
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let features: Vec<String> = features.iter().map(|f| f.to_string()).collect();
    let verdict: Verdict = Arc::new(|_| BundleState::Ready);
    let r = run(
        agent, &hub, tls, true, &features, &events, &mut stop, &verdict, &mut false,
    )
    .await;
    if let Err(e) = r {
        let _ = events.send(Event::Failed {
            agent,
            error: format!("{e:#}"),
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    agent: usize,
    hub: &Uri,
    tls: Arc<ClientConfig>,
    gzip: bool,
    features: &[String],
    events: &mpsc::UnboundedSender<Event>,
    stop: &mut watch::Receiver<bool>,
    verdict: &Verdict,
    connected: &mut bool,
) -> Result<()> {
    let channel = transport::channel(hub, tls).await?;
    let mut client = FleetClient::new(channel);
    if gzip {
        client = client.accept_compressed(CompressionEncoding::Gzip);
    }
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let send = |m: AgentMsg| {
        let tx = tx.clone();
        async move {
            tx.send(AgentMessage { msg: Some(m) })
                .await
                .map_err(|_| anyhow!("stream closed"))
        }
    };
    send(AgentMsg::Hello(Hello {
        agent_version: format!("bench-{}", env!("CARGO_PKG_VERSION")),
        kubernetes_version: "v1.34.0-sim".into(),
        held_hashes: vec![],
        api_versions: vec![],
        registry: false,
        features: features.to_vec(),
        held_seq: 0,
    }))
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("session: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut seq = 0u64;
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + flotilla_agent::session::HEARTBEAT,
        flotilla_agent::session::HEARTBEAT,
    );
    // Protobuf bytes of the chunks before the next set.
    let mut chunk_bytes = 0;
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    if let Some(HubMsg::ContentChunk(c)) = &m.msg {
                        chunk_bytes += prost::Message::encoded_len(c);
                    }
                    if let Some(HubMsg::Desired(d)) = m.msg.filter(|m| !matches!(m, HubMsg::Desired(d) if !d.complete)) {
                        *connected = true;
                        send(AgentMsg::Ack(DesiredAck { generation: d.generation })).await?;
                        let revision = d.bundles.first().map(|b| b.revision.clone()).unwrap_or_default();
                        let desired_bytes = prost::Message::encoded_len(&d) + std::mem::take(&mut chunk_bytes);
                        let _ = events.send(Event::Acked { agent, revision, at: Instant::now(), desired_bytes });
                        for b in d.bundles.iter().filter(|b| d.contents.iter().any(|c| c.content_hash == b.content_hash)) {
                            seq += 1;
                            send(AgentMsg::Status(BundleStatus {
                                bundle: b.name.clone(),
                                content_hash: b.content_hash.clone(),
                                revision: b.revision.clone(),
                                state: verdict(&b.revision) as i32,
                                message: String::new(),
                                seq,
                                observed_at_unix_ms: now_ms(),
                            })).await?;
                        }
                    }
                }
                Ok(None) => bail!("the hub closed the stream"),
                Err(s) => bail!("stream: {:?}: {}", s.code(), s.message()),
            },
            _ = heartbeat.tick() => send(AgentMsg::Heartbeat(Heartbeat {})).await?,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---- torture agents ------------------------------------------------------------

/// A status a torture agent made up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimStatus {
    pub bundle: String,
    pub content_hash: String,
    pub state: BundleState,
    pub message: String,
}

/// Everything one torture agent saw and did, for the test to check against the
/// hub's API.
#[derive(Debug, Default)]
pub struct Observed {
    /// When each dial (TCP, TLS, stream) was attempted, successful or not.
    pub attempts: Vec<Instant>,
    /// When each session was established: the stream opened and a Desired set came.
    pub sessions: Vec<Instant>,
    /// Every Desired acked: (when, revision of its first bundle, bundles).
    pub desired: Vec<(Instant, String, usize)>,
    /// Desired sets with fewer bundles than the one before (before, after): a
    /// real agent prunes what they leave out.
    pub shrunk: Vec<(usize, usize)>,
    /// The bundles of the last Desired set: name -> (content hash, revision).
    pub bundles: std::collections::BTreeMap<String, (String, String)>,
    /// Every status made, by seq.
    pub statuses: std::collections::BTreeMap<u64, SimStatus>,
    /// The highest seq the hub acknowledged.
    pub status_acked: u64,
    /// Every drift event made: id -> (object name, bundle).
    pub drift: std::collections::BTreeMap<u64, (String, String)>,
    pub drift_acked: std::collections::BTreeSet<u64>,
}

impl Observed {
    /// Nothing made is waiting for the hub's acknowledgement.
    pub fn drained(&self) -> bool {
        self.statuses
            .keys()
            .next_back()
            .is_none_or(|s| *s <= self.status_acked)
            && self.drift.len() == self.drift_acked.len()
    }

    /// The latest acknowledged status of each bundle.
    pub fn acked_statuses(&self) -> std::collections::BTreeMap<String, (u64, SimStatus)> {
        let mut out = std::collections::BTreeMap::new();
        for (seq, s) in self.statuses.range(..=self.status_acked) {
            out.insert(s.bundle.clone(), (*seq, s.clone()));
        }
        out
    }
}

/// What a torture agent makes up while connected.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Mean interval between made-up status changes.
    pub status_every: std::time::Duration,
    /// Drift events to send in all (the hub's history is bounded).
    pub drift_budget: usize,
}

/// Shared switches of a fleet of torture agents.
#[derive(Clone)]
pub struct Switches {
    /// Stops the agent.
    pub stop: watch::Receiver<bool>,
    /// While true, the agent makes up nothing new (so its outbox can drain).
    pub quiet: watch::Receiver<bool>,
}

/// A simulated agent that stays: it re-dials with the agent crate's backoff after
/// every disconnection, resends its unacknowledged statuses and drift events on
/// every new session (as the real agent does from its store), and records in `obs`
/// what it made and what the hub acknowledged.
pub async fn torture_agent(
    agent: usize,
    hub: Uri,
    tls: Arc<ClientConfig>,
    behaviour: Behaviour,
    obs: Arc<std::sync::Mutex<Observed>>,
    mut switches: Switches,
) {
    let mut attempt = 0u32;
    let mut seq = 0u64;
    let mut held: Vec<String> = Vec::new();
    loop {
        let stop = *switches.stop.borrow();
        if stop {
            return;
        }
        if let Ok(mut o) = obs.lock() {
            o.attempts.push(Instant::now());
        }
        let mut connected = false;
        let r = torture_session(
            agent,
            &hub,
            tls.clone(),
            &behaviour,
            &obs,
            &mut switches,
            &mut seq,
            &mut held,
            &mut connected,
        )
        .await;
        if let Ok(true) = r {
            return;
        }
        if connected {
            attempt = 0;
        }
        let delay = flotilla_agent::session::backoff(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut switches.stop) => return,
        }
    }
}

/// Completes once the switch is on (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn lock(obs: &std::sync::Mutex<Observed>) -> std::sync::MutexGuard<'_, Observed> {
    obs.lock().unwrap_or_else(|p| p.into_inner())
}

/// One session; `Ok(true)` when stopped.
#[allow(clippy::too_many_arguments)]
async fn torture_session(
    agent: usize,
    hub: &Uri,
    tls: Arc<ClientConfig>,
    behaviour: &Behaviour,
    obs: &Arc<std::sync::Mutex<Observed>>,
    switches: &mut Switches,
    seq: &mut u64,
    held: &mut Vec<String>,
    connected: &mut bool,
) -> Result<bool> {
    use flotilla_proto::v1::{DriftEvent, FieldDiff};
    let channel = transport::channel(hub, tls).await?;
    let mut client = FleetClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let send = |m: AgentMsg| {
        let tx = tx.clone();
        async move {
            tx.send(AgentMessage { msg: Some(m) })
                .await
                .map_err(|_| anyhow!("stream closed"))
        }
    };
    send(AgentMsg::Hello(Hello {
        agent_version: format!("torture-{}", env!("CARGO_PKG_VERSION")),
        kubernetes_version: "v1.34.0-sim".into(),
        held_hashes: held.clone(),
        api_versions: vec![],
        registry: false,
        features: vec![],
        held_seq: 0,
    }))
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("session: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    *connected = true;
    // The outbox: what the hub has not acknowledged goes again, in order.
    let (statuses, drift) = {
        let o = lock(obs);
        let statuses: Vec<(u64, SimStatus)> = o
            .statuses
            .range(o.status_acked + 1..)
            .map(|(s, v)| (*s, v.clone()))
            .collect();
        let drift: Vec<(u64, (String, String))> = o
            .drift
            .iter()
            .filter(|(id, _)| !o.drift_acked.contains(id))
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        (statuses, drift)
    };
    let status_msg = |seq: u64, s: &SimStatus| {
        AgentMsg::Status(BundleStatus {
            bundle: s.bundle.clone(),
            content_hash: s.content_hash.clone(),
            revision: String::new(),
            state: s.state as i32,
            message: s.message.clone(),
            seq,
            observed_at_unix_ms: now_ms(),
        })
    };
    let drift_msg = |id: u64, name: &str, bundle: &str| {
        AgentMsg::Drift(DriftEvent {
            id,
            bundle: bundle.to_string(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "sim".into(),
            name: name.to_string(),
            fields: vec![FieldDiff {
                path: "/data/value".into(),
                desired_json: "\"git\"".into(),
                live_json: format!("\"{name}\""),
            }],
            manager: "torture".into(),
            detected_at_unix_ms: now_ms(),
            corrected: true,
            deleted: false,
        })
    };
    for (s, st) in &statuses {
        send(status_msg(*s, st)).await?;
    }
    for (id, (name, bundle)) in &drift {
        send(drift_msg(*id, name, bundle)).await?;
    }
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + flotilla_agent::session::HEARTBEAT,
        flotilla_agent::session::HEARTBEAT,
    );
    let next_report = |every: std::time::Duration| {
        tokio::time::Instant::now() + every.mul_f64(0.5 + rand::random::<f64>())
    };
    let mut report_at = next_report(behaviour.status_every);
    let mut established = false;
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.msg {
                    // Like a real agent: an incomplete set is refused, not acked.
                    Some(HubMsg::Desired(d)) if !d.complete => {}
                    Some(HubMsg::Desired(d)) => {
                        send(AgentMsg::Ack(DesiredAck { generation: d.generation })).await?;
                        let now = Instant::now();
                        let mut fresh = Vec::new();
                        {
                            let mut o = lock(obs);
                            if !established {
                                o.sessions.push(now);
                                established = true;
                            }
                            let revision = d.bundles.first().map(|b| b.revision.clone()).unwrap_or_default();
                            o.desired.push((now, revision, d.bundles.len()));
                            if d.bundles.len() < o.bundles.len() {
                                let before = o.bundles.len();
                                o.shrunk.push((before, d.bundles.len()));
                            }
                            o.bundles = d.bundles.iter().map(|b| (b.name.clone(), (b.content_hash.clone(), b.revision.clone()))).collect();
                            // What it holds now: the contents the set refers to.
                            *held = d.bundles.iter().map(|b| b.content_hash.clone()).collect();
                            held.sort();
                            held.dedup();
                            // A first status for every bundle whose content changed.
                            for b in &d.bundles {
                                let last = o.statuses.values().rev().find(|s| s.bundle == b.name);
                                if last.is_none_or(|s| s.content_hash != b.content_hash) {
                                    *seq += 1;
                                    let st = SimStatus {
                                        bundle: b.name.clone(),
                                        content_hash: b.content_hash.clone(),
                                        state: BundleState::Ready,
                                        message: format!("sim-{agent} status {seq}"),
                                    };
                                    o.statuses.insert(*seq, st.clone());
                                    fresh.push((*seq, st));
                                }
                            }
                        }
                        for (s, st) in &fresh {
                            send(status_msg(*s, st)).await?;
                        }
                    }
                    Some(HubMsg::StatusAck(a)) => {
                        let mut o = lock(obs);
                        o.status_acked = o.status_acked.max(a.seq);
                    }
                    Some(HubMsg::DriftAck(a)) => {
                        lock(obs).drift_acked.insert(a.id);
                    }
                    // Never sent: this agent advertises no features (v1).
                    Some(HubMsg::ContentChunk(_)) => bail!("a chunk to a v1 agent"),
                    None => {}
                },
                Ok(None) => bail!("the hub closed the stream"),
                Err(s) => bail!("stream: {:?}: {}", s.code(), s.message()),
            },
            _ = tokio::time::sleep_until(report_at) => {
                report_at = next_report(behaviour.status_every);
                let quiet = *switches.quiet.borrow();
                if quiet {
                    continue;
                }
                let made = {
                    let mut o = lock(obs);
                    let bundles: Vec<(String, String)> = o.bundles.iter().map(|(n, (h, _))| (n.clone(), h.clone())).collect();
                    if bundles.is_empty() {
                        None
                    } else {
                        let (bundle, hash) = bundles[rand::random_range(0..bundles.len())].clone();
                        *seq += 1;
                        let state = if rand::random::<bool>() { BundleState::Ready } else { BundleState::NotReady };
                        let st = SimStatus { bundle: bundle.clone(), content_hash: hash, state, message: format!("sim-{agent} status {seq}") };
                        o.statuses.insert(*seq, st.clone());
                        // Now and then a drift event, within the budget.
                        let drift = (o.drift.len() < behaviour.drift_budget && rand::random::<f64>() < 0.3).then(|| {
                            let id = o.drift.len() as u64 + 1;
                            let name = format!("sim-{agent}-drift-{id}");
                            o.drift.insert(id, (name.clone(), bundle.clone()));
                            (id, name, bundle)
                        });
                        Some(((*seq, st), drift))
                    }
                };
                if let Some(((s, st), drift)) = made {
                    send(status_msg(s, &st)).await?;
                    if let Some((id, name, bundle)) = drift {
                        send(drift_msg(id, &name, &bundle)).await?;
                    }
                }
            }
            _ = heartbeat.tick() => send(AgentMsg::Heartbeat(Heartbeat {})).await?,
            _ = stopped(&mut switches.stop) => return Ok(true),
        }
    }
}
