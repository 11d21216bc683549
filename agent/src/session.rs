//! The session with the hub: one long-lived `Fleet.Session` stream at a time,
//! re-dialled with exponential backoff. It stores each Desired set durably before
//! acknowledging it, wakes the reconciler, and sends the statuses and drift events
//! the store's writer recorded (re-sending those the hub has not acknowledged after a
//! reconnect). Every store call goes through the writer: none blocks this task.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::agent_message::Msg as AgentMsg;
use flotilla_proto::v1::fleet_client::FleetClient;
use flotilla_proto::v1::hub_message::Msg as HubMsg;
use flotilla_proto::v1::{
    AgentMessage, BundleStatus, ContentChunk, Desired, DesiredAck, Heartbeat, Hello,
};
use prost::Message;
use rustls::ClientConfig;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Uri;
use tracing::{info, info_span, warn, Instrument};

use crate::clock::SharedClock;
use crate::enroll::Identity;
use crate::error::{Error, Result};
use crate::store::{DesiredBundle, DesiredSet};
use crate::transport;
use crate::writer::Writer;

/// Heartbeats keep the hub's last-seen fresh; 30 s is the protocol's interval.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// First reconnect delay: quick enough for a hub restart, slow enough not to spin.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Reconnect delays stop growing here, so a hub back from an outage sees its
/// agents within half a minute.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long asking the API server for its version may delay Hello.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the API discovery at session start may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// Outgoing messages queued before the sender waits for the stream.
const OUTBOX: usize = 64;

/// No reconnect comes sooner than this, so a hub that refuses at once is not
/// hammered by its whole fleet in a tight loop.
pub const BACKOFF_FLOOR: Duration = Duration::from_millis(100);

/// The delay before reconnect attempt `attempt` (0-based): a window doubling from
/// [`BACKOFF_MIN`] up to [`BACKOFF_MAX`], and a point drawn uniformly inside it
/// by `jitter` in [0, 1) ("full jitter"). Agents cut off together (a hub
/// restart) spread their returns over the whole window instead of all arriving
/// at its end: with a window's lower half only, every first retry was clamped
/// back to exactly one second (1,000 agents redialled within one second).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let window = BACKOFF_MIN
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_MAX);
    BACKOFF_FLOOR
        + window
            .saturating_sub(BACKOFF_FLOOR)
            .mul_f64(jitter.clamp(0.0, 1.0))
}

/// The delay before redialling a hub that refused this cluster's certificate
/// (the cluster was deleted or its certificate revoked): the longest backoff,
/// jittered over its upper half. Dialling faster changes nothing until an
/// operator acts; meanwhile the agent keeps applying what its store holds.
pub fn refused_backoff(jitter: f64) -> Duration {
    BACKOFF_MAX / 2 + (BACKOFF_MAX / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Converts a Desired message into what the store keeps.
pub fn desired_set(d: &Desired) -> (DesiredSet, Vec<(String, Vec<u8>)>) {
    let set = DesiredSet {
        generation: d.generation,
        bundles: d
            .bundles
            .iter()
            .map(|b| DesiredBundle {
                name: b.name.clone(),
                content_hash: b.content_hash.clone(),
                revision: b.revision.clone(),
            })
            .collect(),
        signed: None,
    };
    let contents = d
        .contents
        .iter()
        .map(|c| (c.content_hash.clone(), c.encode_to_vec()))
        .collect();
    (set, contents)
}

/// Everything a session needs.
pub struct Sessions {
    pub hub: Uri,
    pub tls: Arc<ClientConfig>,
    pub cluster_name: String,
    /// The store, through its one writer.
    pub writer: Writer,
    pub kube: kube::Client,
    /// Woken after a Desired set is stored.
    pub reconcile: Arc<Notify>,
    /// The pinned signing key: every set is verified with it before it is stored.
    pub trust: Arc<crate::trust::Trust>,
    /// Contents come from this OCI registry when the hub leaves them out.
    pub registry: Option<crate::oci::Registry>,
    /// The seq of the newest durable status, from the writer (it also changes when
    /// a drift event became durable).
    pub statuses: watch::Receiver<u64>,
    /// Renews the certificate before it expires; `None`: never.
    pub renewal: Option<Renewal>,
    /// The agent has just enrolled (again): the hub knows none of the statuses
    /// in the store, even those an earlier enrolment acknowledged, so the
    /// latest of every bundle is sent again, until the hub acknowledges them.
    pub resend_statuses: bool,
    /// The protocol features advertised in Hello (`flotilla_proto::features`;
    /// none with `--protocol-v1-only`).
    pub features: Vec<String>,
}

/// What renewing the agent's certificate needs.
pub struct Renewal {
    /// The identity in use (`tls` is made from it).
    pub identity: Identity,
    /// Where the renewed key and certificate are saved.
    pub state_dir: std::path::PathBuf,
    pub clock: SharedClock,
    /// No renewal is tried before this (ms since the epoch), after a failed one.
    retry_at_ms: i64,
}

impl Renewal {
    pub fn new(identity: Identity, state_dir: std::path::PathBuf, clock: SharedClock) -> Renewal {
        Renewal {
            identity,
            state_dir,
            clock,
            retry_at_ms: 0,
        }
    }

    /// How long until the certificate is due for renewal (zero: now).
    fn due_in(&self) -> Duration {
        let now = self.clock.now_unix_ms();
        let at = match crate::enroll::validity(&self.identity.cert_pem) {
            Ok((not_before, not_after)) => {
                flotilla_shared::identity::renew_at(not_before, not_after)
            }
            // An unreadable certificate is replaced as soon as the hub allows.
            Err(_) => now,
        };
        Duration::from_millis(u64::try_from(at.max(self.retry_at_ms) - now).unwrap_or(0))
    }

    /// After a failed renewal: wait a twentieth of the certificate's life
    /// (between 1 s and 5 min) before the next try.
    fn failed(&mut self) {
        let life = crate::enroll::validity(&self.identity.cert_pem)
            .map(|(nb, na)| na - nb)
            .unwrap_or(0);
        let wait = (life / 20).clamp(1_000, 300_000);
        self.retry_at_ms = self.clock.now_unix_ms() + wait;
    }
}

enum Ended {
    Shutdown,
    Closed,
    /// The certificate was renewed: dial again at once with the new one.
    Renewed,
}

impl Sessions {
    /// Keeps a session open until shut down.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt = 0u32;
        loop {
            let span = info_span!("session", cluster = %self.cluster_name);
            let mut connected = false;
            let ended = self
                .session(&mut shutdown, &mut connected)
                .instrument(span.clone())
                .await;
            let _enter = span.enter();
            let mut refused = false;
            match ended {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Renewed) => {
                    info!("certificate renewed: reconnecting with it");
                    attempt = 0;
                    continue;
                }
                Ok(Ended::Closed) => info!("session closed by the hub"),
                Err(e @ Error::Refused(_)) => {
                    refused = true;
                    warn!(error = %e, "the hub refused this cluster: nothing is removed from the \
                        cluster, the agent keeps applying what its store holds; enrol it again \
                        (new join token, a state directory without client.pem) to resume");
                }
                Err(e) => warn!(error = %e, "session disconnected"),
            }
            if connected {
                attempt = 0;
            }
            let delay = if refused {
                refused_backoff(rand::random::<f64>())
            } else {
                backoff(attempt, rand::random::<f64>())
            };
            attempt = attempt.saturating_add(1);
            info!(
                retry_in_ms = delay.as_millis() as u64,
                "reconnecting to the hub"
            );
            drop(_enter);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::stopped(&mut shutdown) => return,
            }
        }
    }

    /// Renews the certificate if it is due; on success the next dial uses the
    /// new one. A failure is logged and retried later: the current certificate
    /// still works until it expires.
    async fn renew_if_due(&mut self) -> bool {
        let Some(r) = self.renewal.as_mut() else {
            return false;
        };
        if !r.due_in().is_zero() {
            return false;
        }
        match crate::enroll::renew(&self.hub, &r.identity, &self.cluster_name, &r.state_dir).await {
            Ok(id) => match transport::mutual_config(&id.ca_pem, &id.cert_pem, &id.key_pem) {
                Ok(tls) => {
                    self.tls = tls;
                    r.identity = id;
                    true
                }
                Err(e) => {
                    warn!(error = %e, "the renewed certificate is unusable");
                    r.failed();
                    false
                }
            },
            Err(e) => {
                warn!(error = %e, "certificate renewal failed; the current one is kept");
                r.failed();
                false
            }
        }
    }

    /// When the certificate is next due for renewal (never without renewal).
    fn renewal_due(&self) -> Duration {
        self.renewal
            .as_ref()
            .map_or(Duration::from_secs(86400 * 365), Renewal::due_in)
    }

    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        connected: &mut bool,
    ) -> Result<Ended> {
        // A certificate due (or overdue) is renewed before dialling with it.
        self.renew_if_due().await;
        let channel = transport::channel(&self.hub, self.tls.clone()).await?;
        // The hub gzips what it sends when the agent accepts it: a bundle's content
        // is sent whole on every change, and manifests compress well.
        let mut client = FleetClient::new(channel)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(flotilla_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(flotilla_proto::MAX_MESSAGE_BYTES);
        let kubernetes_version =
            match tokio::time::timeout(VERSION_TIMEOUT, self.kube.apiserver_version()).await {
                Ok(Ok(v)) => v.git_version,
                Ok(Err(e)) => {
                    warn!(error = %crate::apply::reason(&e), "cannot read the Kubernetes version");
                    String::new()
                }
                Err(_) => {
                    warn!("the API server did not say its version in time");
                    String::new()
                }
            };
        // What Helm sees as `.Capabilities.APIVersions` for this cluster: one
        // discovery run per session (a CRD installed since shows up on reconnect).
        let api_versions =
            match tokio::time::timeout(DISCOVERY_TIMEOUT, crate::apply::api_versions(&self.kube))
                .await
            {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot discover the served API versions");
                    Vec::new()
                }
                Err(_) => {
                    warn!("API discovery did not finish in time");
                    Vec::new()
                }
            };
        let served = api_versions.len();
        let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOX);
        let held_hashes = self.writer.read(|s| s.held_hashes()).await?;
        // The signed set it holds: a hub that knows it acknowledged resumes from it.
        let held_seq = self
            .writer
            .read(|s| s.desired())
            .await?
            .and_then(|d| d.signed)
            .map_or(0, |h| h.seq);
        let held = held_hashes.len();
        send(
            &tx,
            AgentMsg::Hello(Hello {
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                kubernetes_version: kubernetes_version.clone(),
                held_hashes,
                api_versions,
                registry: self.registry.is_some(),
                features: self.features.clone(),
                held_seq,
            }),
        )
        .await?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| hub_error(&s))?
            .into_inner();
        *connected = true;
        info!(%kubernetes_version, api_versions = served, held, "session connected");

        // Statuses the hub has not acknowledged are sent again.
        // Marked first: a status recorded while these are sent wakes the loop.
        self.statuses.mark_unchanged();
        let mut sent_upto = if self.resend_statuses {
            0
        } else {
            self.writer.read(|s| s.acked_seq()).await?
        };
        self.send_statuses(&tx, &mut sent_upto).await?;
        // Once the hub acknowledges the last of them, all were stored (in order).
        let resent_upto = self.resend_statuses.then_some(sent_upto);
        // Drift events the hub has not acknowledged, likewise.
        let mut drift_upto = 0;
        self.send_drift(&tx, &mut drift_upto).await?;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let renewal = tokio::time::sleep(self.renewal_due());
        tokio::pin!(renewal);
        // Chunked contents of the next set ("chunked-contents"), bounded.
        let mut chunks = flotilla_proto::chunks::Assembler::default();
        loop {
            tokio::select! {
                _ = &mut renewal => {
                    if self.renew_if_due().await {
                        return Ok(Ended::Renewed);
                    }
                    renewal.as_mut().reset(tokio::time::Instant::now() + self.renewal_due());
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => match m.msg {
                        Some(HubMsg::Desired(mut d)) => {
                            if let Some(deltas) = take_chunked(&mut chunks, &mut d) {
                                match self.resolve(deltas).await? {
                                    Ok(contents) => {
                                        d.contents.extend(contents);
                                        self.on_desired(&tx, d).await?;
                                    }
                                    Err(e) => {
                                        // Not stored, not acknowledged. The next
                                        // session asks for whole contents: a store
                                        // that lost an object must not loop.
                                        warn!(generation = d.generation, error = %e,
                                            "refusing a desired set: a delta of it cannot be \
                                            rebuilt; reconnecting without \"object-deltas\"");
                                        self.features.retain(|f| f != flotilla_proto::features::OBJECT_DELTAS);
                                        return Err(Error::Hub(format!("a content delta refused: {e}")));
                                    }
                                }
                            }
                        }
                        Some(HubMsg::ContentChunk(c)) => on_chunk(&mut chunks, c),
                        Some(HubMsg::StatusAck(a)) => {
                            self.writer.ack(a.seq).await?;
                            if resent_upto.is_some_and(|upto| a.seq >= upto) {
                                self.resend_statuses = false;
                            }
                        }
                        Some(HubMsg::DriftAck(a)) => self.writer.ack_drift(a.id).await?,
                        None => warn!("empty message from the hub"),
                    },
                    Ok(None) => return Ok(Ended::Closed),
                    Err(s) => return Err(hub_error(&s)),
                },
                changed = self.statuses.changed() => {
                    if changed.is_err() {
                        // The reconciler is gone: we are shutting down.
                        return Ok(Ended::Shutdown);
                    }
                    self.send_statuses(&tx, &mut sent_upto).await?;
                    self.send_drift(&tx, &mut drift_upto).await?;
                }
                _ = heartbeat.tick() => send(&tx, AgentMsg::Heartbeat(Heartbeat {})).await?,
                _ = crate::stopped(shutdown) => return Ok(Ended::Shutdown),
            }
        }
    }

    /// Rebuilds contents that came as deltas from the objects in the store
    /// (`Err` inside: a delta that cannot be rebuilt, with the reason).
    async fn resolve(
        &self,
        deltas: Vec<flotilla_proto::v1::ContentDelta>,
    ) -> Result<
        std::result::Result<
            Vec<flotilla_proto::v1::BundleContent>,
            flotilla_proto::delta::DeltaError,
        >,
    > {
        if deltas.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        self.writer
            .read(move |s| {
                let mut out = Vec::with_capacity(deltas.len());
                for delta in deltas {
                    let mut failed = None;
                    let r = flotilla_proto::delta::resolve(
                        delta,
                        |h| {
                            s.object_list(h)
                                .map_err(|e| failed = Some(e))
                                .ok()
                                .flatten()
                        },
                        |d| s.object(d).ok().flatten(),
                    );
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    match r {
                        Ok(c) => out.push(c),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                info!(rebuilt = out.len(), "contents rebuilt from deltas");
                Ok(Ok(out))
            })
            .await
    }

    async fn on_desired(&self, tx: &mpsc::Sender<AgentMessage>, mut d: Desired) -> Result<()> {
        if !d.complete {
            // Pruning by an incomplete set would remove what Git still has:
            // keep the stored set, and do not acknowledge this one.
            warn!(
                generation = d.generation,
                bundles = d.bundles.len(),
                "refusing a desired set the hub did not mark complete"
            );
            return Ok(());
        }
        // Moved out of the set, not copied: a content may be tens of MiB.
        let contents = match self.fetch_contents(&mut d).await {
            Ok(c) => c,
            Err(e) => {
                // Not acknowledged: the hub times the set out, and it comes again.
                warn!(generation = d.generation, error = %e, "cannot fetch contents from the registry");
                return Ok(());
            }
        };
        let taken = self
            .trust
            .take(
                &self.writer,
                d.signed.as_ref(),
                &contents,
                crate::trust::Via::Network,
                Some(&d),
            )
            .await;
        let taken = match taken {
            Ok((taken, _)) => taken,
            Err(e @ Error::Untrusted(_)) => {
                // Not stored, not acknowledged: the hub times the set out and
                // the session is dialled again; the cluster keeps what it runs.
                warn!(generation = d.generation, error = %e, "refusing a desired set");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if !taken.missing.is_empty() {
            warn!(bundles = ?taken.missing, "the hub sent no content for some bundles");
        }
        // Only now, with the set on disk, may the hub count it as held.
        send(
            tx,
            AgentMsg::Ack(DesiredAck {
                generation: d.generation,
            }),
        )
        .await?;
        info!(
            generation = d.generation,
            bundles = taken.bundles,
            new_contents = taken.new_contents,
            signed = d.signed.is_some(),
            "desired state received"
        );
        if !taken.same {
            self.reconcile.notify_one();
        }
        Ok(())
    }

    /// The set's contents: those it brought, and those the hub left in the
    /// registry that the store does not hold, fetched by digest.
    async fn fetch_contents(
        &self,
        d: &mut Desired,
    ) -> Result<Vec<flotilla_proto::v1::BundleContent>> {
        let mut contents = std::mem::take(&mut d.contents);
        let Some(registry) = &self.registry else {
            return Ok(contents);
        };
        let mut seen: std::collections::HashSet<String> =
            contents.iter().map(|c| c.content_hash.clone()).collect();
        let mut fetched = 0;
        for b in &d.bundles {
            if b.blob_digest.is_empty() || !seen.insert(b.content_hash.clone()) {
                continue;
            }
            let hash = b.content_hash.clone();
            if self.writer.read(move |s| s.content(&hash)).await?.is_some() {
                continue;
            }
            let mut c = registry.fetch(&b.blob_digest).await?;
            // Checked against the signed digest in `trust`, under this name.
            c.content_hash = b.content_hash.clone();
            contents.push(c);
            fetched += 1;
        }
        if fetched > 0 {
            info!(fetched, "contents fetched from the registry");
        }
        Ok(contents)
    }

    async fn send_drift(&self, tx: &mpsc::Sender<AgentMessage>, sent_upto: &mut u64) -> Result<()> {
        for e in self.writer.read(|s| s.pending_drift()).await? {
            if e.id <= *sent_upto {
                continue;
            }
            send(tx, AgentMsg::Drift((&e).into())).await?;
            *sent_upto = e.id;
        }
        Ok(())
    }

    async fn send_statuses(
        &self,
        tx: &mpsc::Sender<AgentMessage>,
        sent_upto: &mut u64,
    ) -> Result<()> {
        let after = *sent_upto;
        for s in self.writer.read(move |s| s.statuses_after(after)).await? {
            send(tx, AgentMsg::Status(status_message(&s))).await?;
            *sent_upto = (*sent_upto).max(s.seq);
        }
        Ok(())
    }
}

/// Takes a chunk of a content; one refused is logged here, and refuses the set
/// that names it when it comes ([`take_chunked`]).
fn on_chunk(chunks: &mut flotilla_proto::chunks::Assembler, c: ContentChunk) {
    let (hash, offset, len) = (c.content_hash.clone(), c.offset, c.data.len());
    // The last chunk of a content decodes and hashes all of it (tens of MiB):
    // other tasks move to another worker meanwhile.
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let taken = if multi_thread {
        tokio::task::block_in_place(|| chunks.chunk(c))
    } else {
        chunks.chunk(c)
    };
    match taken {
        Ok(Some(hash)) => tracing::debug!(%hash, "chunked content received whole"),
        Ok(None) => tracing::trace!(%hash, offset, len, "content chunk"),
        Err(e) => warn!(error = %e, "refusing a content chunk: the desired set that names it \
            will be refused"),
    }
}

/// Moves the contents that came in chunks for `d` into it, as if they had come
/// inline (each is checked against the signed digest like those), and returns
/// those that came as deltas, to rebuild. `None`, with the reason logged, when
/// one of them did not arrive whole and sound: the set is then refused, stored
/// nowhere and not acknowledged (the hub times it out and the session is
/// dialled again), and the cluster keeps what it runs.
pub fn take_chunked(
    chunks: &mut flotilla_proto::chunks::Assembler,
    d: &mut Desired,
) -> Option<Vec<flotilla_proto::v1::ContentDelta>> {
    use flotilla_proto::chunks::Assembled;
    match chunks.finish_all(&d.chunked) {
        Ok(assembled) => {
            if !assembled.is_empty() {
                info!(
                    generation = d.generation,
                    chunked = assembled.len(),
                    "contents received in chunks"
                );
            }
            let mut deltas = Vec::new();
            for a in assembled {
                match a {
                    Assembled::Whole(c) => d.contents.push(c),
                    Assembled::Delta(delta) => deltas.push(delta),
                }
            }
            Some(deltas)
        }
        Err(e) => {
            warn!(generation = d.generation, error = %e, "refusing a desired set: a content it names did not arrive whole");
            None
        }
    }
}

/// A stored status as the hub reads it (over the session or in a status file).
pub fn status_message(s: &crate::store::Status) -> BundleStatus {
    let state: flotilla_proto::v1::BundleState = s.state.into();
    BundleStatus {
        bundle: s.bundle.clone(),
        content_hash: s.content_hash.clone(),
        revision: s.revision.clone(),
        state: state as i32,
        message: s.message.clone(),
        seq: s.seq,
        observed_at_unix_ms: s.observed_at_unix_ms,
    }
}

async fn send(tx: &mpsc::Sender<AgentMessage>, msg: AgentMsg) -> Result<()> {
    tx.send(AgentMessage { msg: Some(msg) })
        .await
        .map_err(|_| Error::Hub("the stream to the hub closed".into()))
}

fn hub_error(s: &tonic::Status) -> Error {
    let text = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Error::Refused(text),
        _ => Error::Hub(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::{BundleContent, BundleRef};

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0, 0.0), BACKOFF_FLOOR, "never below the floor");
        assert_eq!(backoff(0, 1.0), BACKOFF_MIN);
        assert_eq!(backoff(2, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(10, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 0.0), BACKOFF_FLOOR);
        assert!(backoff(u32::MAX, 0.999) <= BACKOFF_MAX);
    }

    #[test]
    fn a_refused_agent_waits_long() {
        assert_eq!(refused_backoff(0.0), BACKOFF_MAX / 2);
        assert_eq!(refused_backoff(1.0), BACKOFF_MAX);
        assert_eq!(refused_backoff(7.0), BACKOFF_MAX);
        let refused = hub_error(&tonic::Status::permission_denied("cluster was deleted"));
        assert!(matches!(refused, Error::Refused(ref m) if m.contains("PermissionDenied")));
        assert!(matches!(
            hub_error(&tonic::Status::unavailable("x")),
            Error::Hub(_)
        ));
    }

    /// A fleet cut off at once returns spread over the window, not in one instant:
    /// 1,000 evenly drawn jitters put about a tenth of the agents in each tenth of
    /// the first window.
    #[test]
    fn backoff_spreads_a_fleet_over_the_window() {
        let mut buckets = [0usize; 10];
        for i in 0..1000 {
            let d = backoff(0, i as f64 / 1000.0);
            assert!(d >= BACKOFF_FLOOR && d <= BACKOFF_MIN);
            let span = (BACKOFF_MIN - BACKOFF_FLOOR).as_secs_f64();
            let b = ((d - BACKOFF_FLOOR).as_secs_f64() / span * 10.0) as usize;
            buckets[b.min(9)] += 1;
        }
        assert!(buckets.iter().all(|n| *n <= 110), "{buckets:?}");
    }

    #[test]
    fn desired_converts() {
        let d = Desired {
            generation: 4,
            complete: true,
            signed: None,
            chunked: vec![],
            bundles: vec![BundleRef {
                name: "a".into(),
                content_hash: "h".into(),
                revision: "c".into(),
                blob_digest: String::new(),
            }],
            contents: vec![BundleContent {
                content_hash: "h".into(),
                ..Default::default()
            }],
        };
        let (set, contents) = desired_set(&d);
        assert_eq!(set.generation, 4);
        assert_eq!(set.bundles[0].revision, "c");
        assert_eq!(contents[0].0, "h");
        assert_eq!(
            BundleContent::decode(contents[0].1.as_slice())
                .unwrap()
                .content_hash,
            "h"
        );
    }
}
