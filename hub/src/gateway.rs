//! The agent gateway: our own TLS 1.3 accept loop (client certificates optional at
//! the TLS layer, verified against the fleet CA when presented), the Enrolment
//! service, and the Fleet service's per-cluster sessions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flotilla_proto::v1;
use flotilla_proto::v1::enrolment_server::{Enrolment, EnrolmentServer};
use flotilla_proto::v1::fleet_server::{Fleet as FleetRpc, FleetServer};
use flotilla_shared::caps;
use flotilla_shared::labels::{validate_key, validate_value};
use flotilla_shared::objects::validate_name;
use flotilla_shared::token::{hash_secret, JoinToken};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::fleet::{DesiredSet, DriftOutcome, Fleet, SessionState};
use crate::pki::{cluster_from_cert, Pki};
use crate::store::{ClusterRecord, StatusRecord, TokenRefusal};

/// A TLS handshake that takes longer is a stuck or hostile peer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at most (each costs CPU): connections that have
/// sent their first bytes wait their turn in the hub, not in the kernel.
pub const MAX_HANDSHAKES: usize = 256;
/// Connections accepted and not yet through TLS, at most: beyond, new ones
/// wait in the kernel's backlog. Each costs a file descriptor and a parked
/// task, so a burst of a whole fleet reconnecting at once (a hub restart) is
/// taken off the kernel's accept queue, which would otherwise overflow and
/// make clients retry their SYNs for seconds; and a flood of idle connections
/// costs a bounded amount, and never holds a handshake slot (a connection
/// takes one only once its ClientHello has arrived).
pub const MAX_PENDING: usize = 16_384;
/// How long a connection that has spoken may wait for a handshake slot.
const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(30);
/// Large fleets send large Desired sets; 64 MiB leaves headroom over the default 4.
const MAX_MESSAGE: usize = flotilla_proto::MAX_MESSAGE_BYTES;
/// Last-seen is persisted at least this often while a session lives.
const PERSIST_LAST_SEEN: Duration = Duration::from_secs(30);
/// An agent must say Hello this soon after opening its stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbound messages buffered per session before the session waits for the agent.
const SESSION_BUFFER: usize = 16;
/// Desired sets sent and not acknowledged, at most: an agent that stops
/// acknowledging is disconnected (it reconnects and gets the current set).
const MAX_UNACKED: usize = 16;
/// How long the oldest unacknowledged set may wait for its ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// What the gateway knows about the peer of a connection; handlers read it from
/// the request extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The cluster named by a verified client certificate.
    pub cluster: Option<String>,
    /// That certificate's fingerprint (SHA-256 of its DER, hex).
    pub cert_sha256: Option<String>,
    /// The certificate has expired (within [`EXPIRED_GRACE`]): it may only renew.
    pub expired: bool,
}

/// How long after its expiry an agent certificate may still be used to renew it
/// (and for nothing else): an agent whose hub was away longer than its
/// certificate lived renews it when the hub returns.
pub const EXPIRED_GRACE: Duration = Duration::from_secs(30 * 86400);

impl PeerInfo {
    /// The cluster and certificate fingerprint of a call, or Unauthenticated.
    /// An expired certificate is refused here: only `Renew` takes it.
    fn identity<T>(request: &Request<T>) -> Result<(String, String), Status> {
        let (id, expired) = Self::identity_for_renewal(request)?;
        if expired {
            return Err(Status::unauthenticated(
                "the client certificate has expired: renew it (Fleet.Renew)",
            ));
        }
        Ok(id)
    }

    /// Like `identity`, but an expired certificate (within the grace) is taken.
    fn identity_for_renewal<T>(request: &Request<T>) -> Result<((String, String), bool), Status> {
        let p = request.extensions().get::<PeerInfo>();
        p.and_then(|p| p.cluster.clone().zip(p.cert_sha256.clone()))
            .map(|id| (id, p.is_some_and(|p| p.expired)))
            .ok_or_else(|| Status::unauthenticated("a fleet client certificate is required"))
    }
}

/// Verifies client certificates against the fleet CA like webpki, except that
/// a certificate expired less than [`EXPIRED_GRACE`] ago is verified as of its
/// last valid second (chain, signature, usage: everything but the clock). The
/// handlers then let it only renew (`PeerInfo::expired`).
#[derive(Debug)]
struct GraceVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

/// The certificate's notAfter, seconds since the epoch.
fn not_after(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

impl rustls::server::danger::ClientCertVerifier for GraceVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        use rustls::CertificateError;
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) if not_after(end_entity).is_some_and(|na| {
                let now = now.as_secs() as i64;
                na < now && now - na <= EXPIRED_GRACE.as_secs() as i64
            }) =>
            {
                let last_valid = not_after(end_entity).unwrap_or(0).max(0) as u64;
                self.inner.verify_client_cert(
                    end_entity,
                    intermediates,
                    rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(last_valid)),
                )
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS connection that carries its verified peer identity.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The TLS server configuration: TLS 1.3 only, ALPN h2, ring, client certificates
/// optional but verified against the fleet CA when presented.
pub fn server_config(pki: &Pki) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone())?;
    let verifier = Arc::new(GraceVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()?,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections until shutdown, handshakes each in its own task, and
/// yields the established ones.
pub fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                r = listener.accept() => r,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor, handshakes) = (tx.clone(), acceptor.clone(), handshakes.clone());
            tokio::spawn(async move {
                // Silent connections wait here, without a handshake slot,
                // until their first byte (the ClientHello's) has arrived.
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await,
                    Ok(Ok(1))
                ) {
                    tracing::debug!(%remote, "the client sent nothing: connection dropped");
                    return;
                }
                let Ok(Ok(slot)) =
                    tokio::time::timeout(HANDSHAKE_QUEUE_WAIT, handshakes.acquire_owned()).await
                else {
                    tracing::debug!(%remote, "no handshake slot in time: connection dropped");
                    return;
                };
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(slot);
                drop(permit);
                match handshake {
                    Ok(Ok(io)) => {
                        let leaf = io.get_ref().1.peer_certificates().and_then(|c| c.first());
                        let cluster = leaf.and_then(|c| cluster_from_cert(c));
                        let now = (crate::now_ms() / 1000) as i64;
                        let info = PeerInfo {
                            remote_addr: Some(remote),
                            cert_sha256: cluster
                                .as_ref()
                                .and(leaf)
                                .map(|c| flotilla_shared::identity::fingerprint(c)),
                            expired: leaf.and_then(not_after).is_some_and(|na| na < now),
                            cluster,
                        };
                        let _ = tx.send(Ok(TlsConn { io, info })).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, %remote, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// What the gateway is configured with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long the agent certificates it issues live (`--agent-cert-ttl`).
    pub agent_cert_ttl: Duration,
    /// Enrolment attempts per peer address: a burst, then so many a second.
    pub enroll_limit: EnrollLimit,
    /// A session whose agent sends nothing (not even a heartbeat) this long is
    /// ended: the cluster shows offline, as a rollout must know (`--agent-silence`).
    pub agent_silence: Duration,
    /// Act on the features agents advertise in Hello (protocol v2). Off
    /// (`--protocol-v1-only`), the hub sends every agent what a v1 hub sends it:
    /// contents inline in Desired.
    pub features: bool,
}

/// The default of [`Settings::agent_silence`]: two and a half heartbeats.
pub const DEFAULT_AGENT_SILENCE: Duration = Duration::from_secs(75);

/// How often one peer address may try to enrol (`--enroll-burst`,
/// `--enroll-per-second`). Loopback peers are on the hub's own host and are not
/// limited unless `loopback` is set (simulated fleets enrol thousands from there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollLimit {
    pub burst: u32,
    pub per_second: u32,
    pub loopback: bool,
}

impl Default for EnrollLimit {
    fn default() -> Self {
        EnrollLimit {
            burst: 20,
            per_second: 2,
            loopback: false,
        }
    }
}

/// Serves Enrolment and Fleet on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    pki: Arc<Pki>,
    fleet: Arc<Fleet>,
    settings: Settings,
    registry: Option<Arc<crate::oci::Registry>>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&pki)?));
    let incoming = accept_loop(listener, acceptor, shutdown.clone());
    let enrolment = EnrolmentService {
        pki: pki.clone(),
        fleet: fleet.clone(),
        settings,
        limiter: std::sync::Mutex::new(crate::hooks::RateLimiter::new(
            settings.enroll_limit.burst,
            settings.enroll_limit.per_second,
        )),
    };
    let sessions = FleetService {
        fleet,
        pki,
        registry,
        settings,
        shutdown: shutdown.clone(),
        encodings: Arc::default(),
        lists: Arc::default(),
    };
    let mut stop = shutdown;
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(EnrolmentServer::new(enrolment))
        .add_service(
            FleetServer::new(sessions)
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// Trades join tokens for client certificates.
pub struct EnrolmentService {
    pki: Arc<Pki>,
    fleet: Arc<Fleet>,
    settings: Settings,
    /// Enrolment attempts per peer address.
    limiter: std::sync::Mutex<crate::hooks::RateLimiter>,
}

impl EnrolmentService {
    /// Takes one attempt from the peer's budget; RESOURCE_EXHAUSTED when spent.
    fn admit_peer<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(peer) = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        if peer.is_loopback() && !self.settings.enroll_limit.loopback {
            return Ok(());
        }
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(peer, tokio::time::Instant::now());
        if allowed {
            Ok(())
        } else {
            tracing::warn!(%peer, "enrolment attempts over the limit");
            Err(Status::resource_exhausted(
                "too many enrolment attempts from this address; retry later",
            ))
        }
    }
}

/// Refuses a call whose certificate no longer stands.
fn refused(cluster: &str, refusal: &crate::fleet::Refused) -> Status {
    tracing::info!(%cluster, reason = %refusal, "client certificate refused");
    Status::permission_denied(refusal.to_string())
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error")
}

#[tonic::async_trait]
impl Enrolment for EnrolmentService {
    async fn get_ca(
        &self,
        _request: Request<v1::GetCaRequest>,
    ) -> Result<Response<v1::GetCaResponse>, Status> {
        Ok(Response::new(v1::GetCaResponse {
            ca_pem: self.pki.ca_pem.clone(),
        }))
    }

    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        // Before anything else, even the token: a flood costs a bucket lookup.
        self.admit_peer(&request)?;
        let r = request.into_inner();
        // The token first, before any work on what the caller sent: a caller
        // without a valid token costs a hash and a lookup, never a CSR parse.
        let (id, secret) = JoinToken::split_credential(&r.token)
            .map_err(|_| Status::unauthenticated("malformed join token"))?;
        enrol(
            &self.fleet,
            &self.pki,
            self.settings.agent_cert_ttl,
            id,
            hash_secret(secret),
            r.cluster_name,
            r.labels,
            &r.csr_pem,
        )
        .await
        .map(Response::new)
    }
}

/// Enrols a cluster with the join token `id`, whose secret hashes to
/// `secret_hash`: the token is checked, then what it binds wins over what the
/// agent asked, then the token is spent, then the CSR signed. The network's
/// `Enroll` and the file's `flotilla cluster enroll` both come here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn enrol(
    fleet: &Arc<Fleet>,
    pki: &Pki,
    cert_ttl: Duration,
    id: &str,
    secret_hash: String,
    cluster_name: String,
    labels: std::collections::HashMap<String, String>,
    csr_pem: &str,
) -> Result<v1::EnrollResponse, Status> {
    let store = fleet.store().clone();
    let id = id.to_string();
    let (lookup_id, lookup_hash) = (id.clone(), secret_hash.clone());
    let checked = tokio::task::spawn_blocking(move || {
        store.check_token(&lookup_id, &lookup_hash, crate::now_ms())
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let token = match checked {
        Ok(token) => token,
        Err(refusal) => {
            tracing::info!(token_id = %id, reason = %refusal, "enrolment refused");
            return Err(Status::unauthenticated(refusal.to_string()));
        }
    };
    // What the token binds wins over what the agent claims.
    let asked: flotilla_shared::labels::Labels = labels.into_iter().collect();
    let admitted = flotilla_shared::identity::admit(&token.binding(), &cluster_name, &asked)
        .map_err(|refusal| {
            tracing::info!(token_id = %id, asked = %cluster_name, reason = %refusal, "enrolment refused");
            Status::permission_denied(refusal.to_string())
        })?;
    let name = admitted.name.clone();
    validate_name(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
    for (k, v) in &admitted.labels {
        validate_key(k)
            .and_then(|_| validate_value(v))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    if admitted.labels_replaced {
        tracing::info!(cluster = %name, "labels claimed by the agent replaced by the join token's");
    }
    if fleet.cluster_exists(&name) {
        return Err(Status::already_exists(format!(
            "cluster {name} is already enrolled"
        )));
    }
    Pki::check_csr(csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;

    // The token is spent before anything is signed, atomically: of two
    // enrolments racing with one token, exactly one proceeds.
    let store = fleet.store().clone();
    let consumed = tokio::task::spawn_blocking(move || {
        store.consume_token(&id, &secret_hash, crate::now_ms())
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    match consumed {
        Ok(()) => {}
        Err(refusal @ (TokenRefusal::Unknown | TokenRefusal::Used | TokenRefusal::Expired)) => {
            tracing::info!(cluster = %name, reason = %refusal, "enrolment refused");
            return Err(Status::unauthenticated(refusal.to_string()));
        }
    }

    let signed = pki.sign_csr(csr_pem, &name, cert_ttl).map_err(internal)?;
    let record = ClusterRecord {
        name: name.clone(),
        labels: admitted.labels,
        enrolled_at_ms: crate::now_ms(),
        // Only this certificate speaks for the cluster from now on.
        cert_sha256: Some(signed.sha256),
        ..Default::default()
    };
    if !fleet.create_cluster(record).map_err(internal)? {
        return Err(Status::already_exists(format!(
            "cluster {name} is already enrolled"
        )));
    }
    tracing::info!(cluster = %name, bound = token.binding().is_bound(), "cluster enrolled");
    Ok(v1::EnrollResponse {
        certificate_pem: signed.pem,
        ca_pem: pki.ca_pem.clone(),
        signing_public_key: pki.signer.public_key(),
    })
}

/// Serves one long-lived session per cluster, and certificate renewals.
pub struct FleetService {
    fleet: Arc<Fleet>,
    pki: Arc<Pki>,
    registry: Option<Arc<crate::oci::Registry>>,
    settings: Settings,
    shutdown: watch::Receiver<bool>,
    encodings: Arc<Encodings>,
    lists: Arc<ObjectLists>,
}

/// Contents (and deltas) encoded for sending in chunks, shared by the sessions
/// sending them: a content taken by many agents at once is encoded once, by
/// the first session that needs it while the others wait for it, and freed
/// when the last chunk of it has gone out (only weak references are kept here).
#[derive(Default)]
struct Encodings {
    live: std::sync::Mutex<HashMap<String, std::sync::Weak<Encoded>>>,
}

type Encoded = tokio::sync::OnceCell<Vec<u8>>;

/// Lends an encoded content to `Bytes`: its chunks are slices of it.
struct Lent(Arc<Encoded>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.0.get().map_or(&[], Vec::as_slice)
    }
}

impl Encodings {
    /// The encoded content `hash` (the bytes of its `BundleContent`).
    async fn get(
        &self,
        hash: &str,
        rendered: Arc<flotilla_shared::bundle::Rendered>,
    ) -> Result<prost::bytes::Bytes, tokio::task::JoinError> {
        let h = hash.to_string();
        self.get_with(hash, move || {
            flotilla_proto::chunks::encode_content(&h, &rendered)
        })
        .await
    }

    /// The bytes `encode` makes under `key`, made once while anyone holds them.
    async fn get_with(
        &self,
        key: &str,
        encode: impl FnOnce() -> Vec<u8> + Send + 'static,
    ) -> Result<prost::bytes::Bytes, tokio::task::JoinError> {
        let cell = {
            let mut map = self.live.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(key).and_then(std::sync::Weak::upgrade) {
                Some(c) => c,
                None => {
                    map.retain(|_, w| w.strong_count() > 0);
                    let c = Arc::new(Encoded::new());
                    map.insert(key.to_string(), Arc::downgrade(&c));
                    c
                }
            }
        };
        // Tens of MiB of JSON: off the async threads.
        cell.get_or_try_init(|| tokio::task::spawn_blocking(encode))
            .await?;
        Ok(prost::bytes::Bytes::from_owner(Lent(cell)))
    }
}

/// The object digests of contents, for deltas ("object-deltas"): kept past the
/// contents themselves (a commit drops the content its agents still hold, and
/// the next delta is made against it), oldest dropped first beyond
/// [`MAX_LISTED_OBJECTS`] digests in all.
#[derive(Default)]
struct ObjectLists {
    inner: std::sync::Mutex<Lists>,
}

#[derive(Default)]
struct Lists {
    map: HashMap<String, Arc<[flotilla_proto::delta::Digest]>>,
    order: std::collections::VecDeque<String>,
    total: usize,
}

/// 2 Mi digests: 64 MiB at most.
const MAX_LISTED_OBJECTS: usize = 1 << 21;

impl ObjectLists {
    fn get(&self, hash: &str) -> Option<Arc<[flotilla_proto::delta::Digest]>> {
        let lists = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        lists.map.get(hash).cloned()
    }

    /// The digests of `rendered`'s objects (content `hash`), listed once.
    async fn get_or_list(
        &self,
        hash: &str,
        rendered: Arc<flotilla_shared::bundle::Rendered>,
    ) -> Result<Arc<[flotilla_proto::delta::Digest]>, tokio::task::JoinError> {
        if let Some(l) = self.get(hash) {
            return Ok(l);
        }
        let list: Arc<[flotilla_proto::delta::Digest]> = if rendered.manifests.len() > 256 {
            tokio::task::spawn_blocking(move || flotilla_proto::delta::object_list(&rendered))
                .await?
                .into()
        } else {
            flotilla_proto::delta::object_list(&rendered).into()
        };
        let mut lists = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lists.map.get(hash) {
            return Ok(l.clone());
        }
        lists.total += list.len();
        lists.map.insert(hash.to_string(), list.clone());
        lists.order.push_back(hash.to_string());
        while lists.total > MAX_LISTED_OBJECTS && lists.order.len() > 1 {
            if let Some(old) = lists.order.pop_front() {
                if let Some(l) = lists.map.remove(&old) {
                    lists.total -= l.len();
                }
            }
        }
        Ok(list)
    }
}

#[tonic::async_trait]
impl FleetRpc for FleetService {
    type SessionStream = ReceiverStream<Result<v1::HubMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (cluster, cert_sha256) = PeerInfo::identity(&request)?;
        if let Err(refusal) = self
            .fleet
            .authorize(&cluster, &cert_sha256)
            .map_err(internal)?
        {
            return Err(refused(&cluster, &refusal));
        }
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = Session {
            fleet: self.fleet.clone(),
            pki: self.pki.clone(),
            registry: self.registry.clone(),
            cluster: cluster.clone(),
            cert_sha256,
            inbound: request.into_inner(),
            tx,
            shutdown: self.shutdown.clone(),
            silence: self.settings.agent_silence,
            features: self.settings.features,
            encodings: self.encodings.clone(),
            lists: self.lists.clone(),
        };
        let span = tracing::info_span!("session", cluster = %cluster);
        tokio::spawn(session.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew(
        &self,
        request: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::RenewResponse>, Status> {
        // An expired certificate (within the grace) may renew, and do nothing else.
        let ((cluster, presented), expired) = PeerInfo::identity_for_renewal(&request)?;
        if expired {
            tracing::info!(%cluster, "renewing an expired certificate");
        }
        // Authorised before the CSR is looked at.
        if let Err(refusal) = self
            .fleet
            .authorize(&cluster, &presented)
            .map_err(internal)?
        {
            return Err(refused(&cluster, &refusal));
        }
        let csr_pem = request.into_inner().csr_pem;
        Pki::check_csr(&csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let signed = self
            .pki
            .sign_csr(&csr_pem, &cluster, self.settings.agent_cert_ttl)
            .map_err(internal)?;
        if let Err(refusal) = self
            .fleet
            .record_renewal(&cluster, &presented, &signed.sha256)
            .map_err(internal)?
        {
            return Err(refused(&cluster, &refusal));
        }
        tracing::info!(%cluster, "certificate renewed");
        Ok(Response::new(v1::RenewResponse {
            certificate_pem: signed.pem,
        }))
    }
}

struct Session {
    fleet: Arc<Fleet>,
    /// Its signer signs every set sent.
    pki: Arc<Pki>,
    /// Where contents go for agents that fetch them (`--oci-registry`).
    registry: Option<Arc<crate::oci::Registry>>,
    cluster: String,
    /// The certificate the session was opened with.
    cert_sha256: String,
    inbound: Streaming<v1::AgentMessage>,
    tx: mpsc::Sender<Result<v1::HubMessage, Status>>,
    shutdown: watch::Receiver<bool>,
    /// See [`Settings::agent_silence`].
    silence: Duration,
    /// See [`Settings::features`].
    features: bool,
    encodings: Arc<Encodings>,
    lists: Arc<ObjectLists>,
}

/// The task feeding a set's chunks, then the set, to the session's stream;
/// aborted with the session.
struct Feeder(tokio::task::JoinHandle<()>);

impl Feeder {
    /// Waits until the chunks and the set are queued (or the stream is gone).
    async fn finish(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Per-session bookkeeping of what was sent and what the agent holds.
struct Sent {
    /// The chunks and set still being queued, if any.
    feeding: Option<Feeder>,
    /// Content hashes the agent holds, or will once it has read what was sent
    /// (from Hello, then the contents of the last set sent).
    held: HashSet<String>,
    last: Option<DesiredSet>,
    /// The key that signed the last set sent: after a rotation, the set is sent
    /// again under the new key.
    key_id: String,
    /// The agent fetches contents from its OCI registry (Hello).
    registry: bool,
    /// The agent takes contents in chunks (Hello's "chunked-contents", acted on
    /// unless the hub runs `--protocol-v1-only`).
    chunked: bool,
    /// The agent takes contents as deltas of objects (Hello's "object-deltas",
    /// with "chunked-contents").
    deltas: bool,
    /// The seq of the signed set the agent holds (Hello), until the first set
    /// is sent or resumed.
    resume: Option<u64>,
    /// Contents too large to go inline to this v1 agent (each alone).
    too_large: HashSet<String>,
    /// Contents of held sets whose bundles' status says why, since the last set sent.
    reported: HashSet<String>,
    generation: u64,
    /// Sent, not yet acknowledged, by generation.
    pending: BTreeMap<u64, DesiredSet>,
    /// When each pending set was sent.
    sent_at: BTreeMap<u64, tokio::time::Instant>,
}

enum End {
    Closed,
    Error(Status),
}

impl Session {
    async fn run(mut self) {
        let mut hello = match tokio::time::timeout(HELLO_TIMEOUT, self.inbound.message()).await {
            Ok(Ok(Some(v1::AgentMessage {
                msg: Some(v1::agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                let _ = self
                    .tx
                    .send(Err(Status::invalid_argument(
                        "the first message must be Hello",
                    )))
                    .await;
                return;
            }
            Ok(Err(status)) => {
                tracing::debug!(%status, "stream failed before Hello");
                return;
            }
            Err(_) => {
                let _ = self
                    .tx
                    .send(Err(Status::deadline_exceeded("no Hello")))
                    .await;
                return;
            }
        };
        // What the hub keeps of a Hello is capped like everything an agent sends.
        caps::cut(&mut hello.agent_version, caps::SHORT);
        caps::cut(&mut hello.kubernetes_version, caps::SHORT);
        caps::cap_list(&mut hello.api_versions, caps::API_VERSIONS, caps::SHORT);
        caps::cap_list(&mut hello.held_hashes, caps::HELD_HASHES, caps::SHORT);
        caps::cap_list(&mut hello.features, caps::API_VERSIONS, caps::SHORT);
        // Feature negotiation: the hub acts on the features it knows, ignores
        // the rest, and answers with what it sends (see flotilla.proto, Hello).
        let speaks = |feature: &str| self.features && hello.features.iter().any(|f| f == feature);
        let chunked = speaks(flotilla_proto::features::CHUNKED_CONTENTS);
        let deltas = chunked && speaks(flotilla_proto::features::OBJECT_DELTAS);
        let said = crate::fleet::Hello {
            agent_version: &hello.agent_version,
            kubernetes_version: &hello.kubernetes_version,
            api_versions: &hello.api_versions,
        };
        let id = match self
            .fleet
            .connect(&self.cluster, &self.cert_sha256, &said, crate::now_ms())
        {
            Ok(Ok(id)) => id,
            Ok(Err(refusal)) => {
                let _ = self.tx.send(Err(refused(&self.cluster, &refusal))).await;
                return;
            }
            Err(e) => {
                let _ = self.tx.send(Err(internal(e))).await;
                return;
            }
        };
        tracing::info!(
            agent_version = %hello.agent_version,
            kubernetes_version = %hello.kubernetes_version,
            api_versions = hello.api_versions.len(),
            held = hello.held_hashes.len(),
            features = ?hello.features,
            chunked_contents = chunked,
            object_deltas = deltas,
            "agent connected"
        );
        if deltas {
            // The objects of what it holds, listed while the hub has them: a
            // commit drops an old content, and the next delta is made against it.
            for hash in &hello.held_hashes {
                if self.lists.get(hash).is_none() {
                    if let Some(rendered) = self.fleet.content(hash) {
                        if let Err(e) = self.lists.get_or_list(hash, rendered).await {
                            tracing::warn!(error = %e, "cannot list a content's objects");
                        }
                    }
                }
            }
        }
        let mut sent = Sent {
            held: hello.held_hashes.into_iter().collect(),
            last: None,
            key_id: String::new(),
            registry: hello.registry,
            chunked,
            deltas,
            resume: (hello.held_seq > 0).then_some(hello.held_seq),
            too_large: HashSet::new(),
            reported: HashSet::new(),
            generation: 0,
            pending: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            feeding: None,
        };
        self.fleet.metrics.agent_connections.inc();
        let end = self.serve(id, &mut sent).await;
        let reason = match &end {
            End::Closed => "closed".to_string(),
            End::Error(status) => format!("{:?}", status.code()).to_lowercase(),
        };
        self.fleet
            .metrics
            .agent_disconnects
            .get_or_create(&crate::metrics::Reason { reason })
            .inc();
        if let End::Error(status) = end {
            let _ = self.tx.send(Err(status)).await;
        }
        if let Err(error) = self.fleet.disconnect(&self.cluster, id, crate::now_ms()) {
            tracing::warn!(%error, "cannot persist last-seen");
        }
        tracing::info!("agent disconnected");
    }

    async fn serve(&mut self, id: u64, sent: &mut Sent) -> End {
        // This cluster's own wake-up: a change elsewhere in the fleet does not
        // wake this session.
        let Some(mut changes) = self.fleet.subscribe_cluster(&self.cluster) else {
            return End::Error(Status::permission_denied(format!(
                "cluster {} was deleted at the hub or its certificate revoked",
                self.cluster
            )));
        };
        changes.mark_unchanged();
        if let Err(end) = self.send_desired(sent).await {
            return end;
        }
        let mut persist = tokio::time::interval(PERSIST_LAST_SEEN);
        persist.tick().await;
        let mut shutdown = self.shutdown.clone();
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                msg = self.inbound.message() => match msg {
                    Ok(Some(m)) => {
                        heard = tokio::time::Instant::now();
                        if let Err(e) = self.fleet.touch(&self.cluster, crate::now_ms(), false) {
                            return End::Error(internal(e));
                        }
                        if let Err(end) = self.handle(m, sent).await {
                            return end;
                        }
                    }
                    Ok(None) => return End::Closed,
                    Err(status) => {
                        tracing::debug!(%status, "stream ended");
                        return End::Closed;
                    }
                },
                changed = changes.changed() => {
                    let closed = changed.is_err();
                    match self.fleet.session_state(&self.cluster, id, &self.cert_sha256) {
                        // Closed while still enrolled: another sender replaced
                        // this cluster's (it was deleted and enrolled again).
                        SessionState::Current if closed => {
                            return End::Error(Status::aborted("the cluster was enrolled again"));
                        }
                        SessionState::Current => {}
                        SessionState::Superseded => {
                            tracing::info!("superseded by a newer session");
                            return End::Error(Status::aborted("superseded by a newer session of this cluster"));
                        }
                        SessionState::Gone => {
                            tracing::info!("cluster deleted or its certificate revoked: session closed");
                            return End::Error(Status::permission_denied(format!(
                                "cluster {} was deleted at the hub or its certificate revoked",
                                self.cluster
                            )));
                        }
                    }
                    if let Err(end) = self.send_desired(sent).await {
                        return end;
                    }
                }
                _ = persist.tick() => {
                    if let Err(error) = self.fleet.touch(&self.cluster, crate::now_ms(), true) {
                        tracing::warn!(%error, "cannot persist last-seen");
                    }
                    if sent.sent_at.values().next().is_some_and(|t| t.elapsed() > ACK_TIMEOUT) {
                        tracing::warn!("a desired set was not acknowledged in time: disconnecting");
                        return End::Error(Status::deadline_exceeded(
                            "desired set not acknowledged in time",
                        ));
                    }
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    return End::Error(Status::unavailable("hub shutting down"));
                }
                _ = tokio::time::sleep_until(heard + self.silence) => {
                    tracing::warn!(silence = ?self.silence, "the agent sent nothing, not even a heartbeat: disconnecting");
                    return End::Error(Status::deadline_exceeded(format!(
                        "no message from the agent for {:?} (heartbeats stopped)",
                        self.silence
                    )));
                }
                _ = self.tx.closed() => return End::Closed,
            }
        }
    }

    async fn send(&self, msg: v1::hub_message::Msg) -> Result<(), End> {
        self.tx
            .send(Ok(v1::HubMessage { msg: Some(msg) }))
            .await
            .map_err(|_| End::Closed)
    }

    /// Sends the cluster's desired set if it differs from the last one sent, with
    /// the contents the agent does not hold.
    async fn send_desired(&self, sent: &mut Sent) -> Result<(), End> {
        let Some(desired) = self.fleet.desired(&self.cluster) else {
            return Err(End::Error(Status::permission_denied(
                "cluster is no longer enrolled",
            )));
        };
        if sent.last.as_ref() == Some(&desired) && sent.key_id == self.pki.signer.key_id() {
            return Ok(());
        }
        if !desired.complete {
            // A source is not loaded yet: the set could leave out bundles Git
            // has, and the agent would prune them. Hold it; a change wakes us.
            tracing::debug!("holding the desired set until every source is loaded");
            return Ok(());
        }
        if let Some(held_seq) = sent.resume.take() {
            // The agent holds, stored and acknowledged, the very set it would be
            // sent (same seq, key, bundles, contents, revisions): the session
            // resumes from it, and nothing is signed or sent.
            let resumes = self.fleet.resume_point(&self.cluster).is_some_and(|r| {
                r.seq == held_seq
                    && r.key_id == self.pki.signer.key_id()
                    && r.set_digest == crate::fleet::set_digest(&desired)
            }) && desired
                .bundles
                .iter()
                .all(|(_, h, _)| sent.held.contains(h));
            if resumes {
                tracing::info!(
                    seq = held_seq,
                    "the agent holds this very set: resuming from it"
                );
                sent.generation = held_seq;
                sent.key_id = self.pki.signer.key_id();
                sent.held = desired.bundles.iter().map(|(_, h, _)| h.clone()).collect();
                sent.last = Some(desired);
                return Ok(());
            }
        }
        // What the agent holds once it has stored this set: it keeps exactly the
        // contents the set refers to (dropping the rest), and the stream is ordered.
        let mut will_hold = HashSet::new();
        let mut needed = Vec::new();
        for (bundle, hash, _) in &desired.bundles {
            if will_hold.contains(hash) {
                continue;
            }
            if sent.held.contains(hash) {
                will_hold.insert(hash.clone());
                continue;
            }
            match self.fleet.content(hash) {
                Some(rendered) => {
                    needed.push((hash.clone(), rendered));
                    will_hold.insert(hash.clone());
                }
                None => {
                    // Never send a set the agent cannot apply whole.
                    tracing::warn!(%bundle, %hash, "content missing: holding the desired set");
                    return Ok(());
                }
            }
        }
        // How each content travels: by the agent's OCI registry (pushed there
        // once per hub; one that fails is bypassed), else in chunks to an agent
        // that speaks "chunked-contents", else inline in the Desired (v1).
        let mut blobs: HashMap<String, String> = HashMap::new();
        let mut rest = Vec::new();
        if let (Some(registry), true) = (&self.registry, sent.registry) {
            for (hash, rendered) in needed {
                let encoded = self
                    .encodings
                    .get(&hash, rendered.clone())
                    .await
                    .map_err(|e| End::Error(internal(e)))?;
                match registry.ensure(&encoded).await {
                    Ok(digest) => {
                        blobs.insert(hash, digest);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot push a content to the registry: sending it to the agent");
                        rest.push((hash, rendered));
                    }
                }
            }
        } else {
            rest = needed;
        }
        let mut chunked = Vec::new();
        let mut contents = Vec::new();
        if sent.chunked {
            for (hash, rendered) in rest {
                if sent.deltas {
                    let delta = self
                        .delta(&hash, &rendered, sent, &desired)
                        .await
                        .map_err(|e| End::Error(internal(e)))?;
                    if let Some(encoded) = delta {
                        chunked.push((hash, encoded, true));
                        continue;
                    }
                }
                let encoded = self
                    .encodings
                    .get(&hash, rendered)
                    .await
                    .map_err(|e| End::Error(internal(e)))?;
                chunked.push((hash, encoded, false));
            }
        } else {
            for (hash, rendered) in rest {
                if sent.too_large.contains(&hash) {
                    // Known, reported: not encoded again on every fleet change.
                    return Ok(());
                }
                // Measured before it is built: a content too large is never copied.
                let len = flotilla_proto::content_len(&hash, &rendered);
                if len > flotilla_proto::MAX_INLINE_BYTES {
                    let reason = format!(
                        "the bundle's content is {len} bytes, over the {} bytes one content may \
                         take inline in a desired set, and the agent does not speak \
                         \"{}\" (protocol v2): upgrade the agent, or split the bundle",
                        flotilla_proto::MAX_INLINE_BYTES,
                        flotilla_proto::features::CHUNKED_CONTENTS,
                    );
                    sent.too_large.insert(hash.clone());
                    return self.hold_too_large(sent, &desired, &[hash], reason).await;
                }
                contents.push(flotilla_proto::bundle_content(&hash, &rendered));
            }
        }
        // Generations are the signed sets' seqs: they only grow, across sessions
        // and hub restarts too, and the agent refuses one older than it holds.
        let (seq, envelope) = self
            .pki
            .signer
            .sign_desired(&self.cluster, &desired.bundles, None, crate::now_ms())
            .map_err(|e| End::Error(internal(e)))?;
        let msg = v1::Desired {
            generation: seq,
            bundles: desired
                .bundles
                .iter()
                .map(|(name, hash, revision)| v1::BundleRef {
                    name: name.clone(),
                    content_hash: hash.clone(),
                    revision: revision.clone(),
                    blob_digest: blobs.get(hash).cloned().unwrap_or_default(),
                })
                .collect(),
            contents,
            complete: true,
            signed: Some((&envelope).into()),
            chunked: chunked.iter().map(|(h, _, _)| h.clone()).collect(),
        };
        let len = prost::Message::encoded_len(&msg);
        if len > MAX_MESSAGE {
            // Only inline contents make a set this large; tonic would refuse to
            // send it and the session would break on every reconnect.
            let hashes: Vec<String> = msg
                .contents
                .iter()
                .map(|c| c.content_hash.clone())
                .collect();
            let reason = format!(
                "the desired set with its contents is {len} bytes, over the {MAX_MESSAGE} bytes \
                 of one message, and the agent does not speak \"{}\" (protocol v2): upgrade \
                 the agent, or split the bundles",
                flotilla_proto::features::CHUNKED_CONTENTS,
            );
            return self.hold_too_large(sent, &desired, &hashes, reason).await;
        }
        sent.generation = seq;
        sent.key_id = envelope.key_id.clone();
        sent.held = will_hold;
        sent.reported.clear();
        tracing::info!(
            generation = sent.generation,
            bundles = msg.bundles.len(),
            contents = msg.contents.len(),
            chunked = msg.chunked.len(),
            chunked_bytes = chunked.iter().map(|(_, b, _)| b.len()).sum::<usize>(),
            deltas = chunked.iter().filter(|(_, _, d)| *d).count(),
            from_registry = blobs.len(),
            "sending desired set"
        );
        if sent.pending.len() >= MAX_UNACKED {
            tracing::warn!(
                unacked = sent.pending.len(),
                "the agent does not acknowledge: disconnecting"
            );
            return Err(End::Error(Status::resource_exhausted(format!(
                "{} desired sets not acknowledged",
                sent.pending.len()
            ))));
        }
        sent.pending.insert(sent.generation, desired.clone());
        sent.sent_at
            .insert(sent.generation, tokio::time::Instant::now());
        sent.last = Some(desired);
        // Sets go out in order: the previous one's chunks and set first.
        if let Some(previous) = sent.feeding.take() {
            previous.finish().await;
        }
        if chunked.is_empty() {
            return self.send(v1::hub_message::Msg::Desired(msg)).await;
        }
        // The chunks first, each content whole and in order: the stream is
        // ordered, so the agent has them when the set that names them arrives.
        // Each chunk is a slice of the one encoded buffer, and the session's
        // channel bounds how many wait to be written. Fed by a task of their
        // own, so that the session reads the agent's messages (heartbeats,
        // statuses) meanwhile: on a slow link the transfer may take minutes.
        let tx = self.tx.clone();
        sent.feeding = Some(Feeder(tokio::spawn(
            async move {
                let out = |msg| v1::HubMessage { msg: Some(msg) };
                for (hash, encoded, delta) in chunked {
                    for chunk in flotilla_proto::chunks::split_as(&hash, encoded, delta) {
                        let msg = out(v1::hub_message::Msg::ContentChunk(chunk));
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(out(v1::hub_message::Msg::Desired(msg)))).await;
            }
            .in_current_span(),
        )));
        Ok(())
    }

    /// Content `hash` as a delta against the contents the agent holds, encoded
    /// (shared by the sessions whose agents hold the same), or `None` to send
    /// it whole: the hub knows the objects of none of them, the agent holds
    /// none of its objects, or it lacks most of them.
    async fn delta(
        &self,
        hash: &str,
        rendered: &Arc<flotilla_shared::bundle::Rendered>,
        sent: &Sent,
        desired: &DesiredSet,
    ) -> Result<Option<prost::bytes::Bytes>, tokio::task::JoinError> {
        let objects = self.lists.get_or_list(hash, rendered.clone()).await?;
        // The bundles' previous contents first: runs are copied from them.
        let bundles: HashSet<&str> = desired
            .bundles
            .iter()
            .filter(|(_, h, _)| h == hash)
            .map(|(b, _, _)| b.as_str())
            .collect();
        let previous: HashSet<&str> = sent
            .last
            .iter()
            .flat_map(|l| l.bundles.iter())
            .filter(|(b, _, _)| bundles.contains(b.as_str()))
            .map(|(_, h, _)| h.as_str())
            .collect();
        let mut bases: Vec<(String, Arc<[flotilla_proto::delta::Digest]>)> = sent
            .held
            .iter()
            .filter_map(|h| self.lists.get(h).map(|l| (h.clone(), l)))
            .collect();
        if bases.is_empty() {
            return Ok(None);
        }
        bases.sort_by(|(a, _), (b, _)| {
            (!previous.contains(a.as_str()), a).cmp(&(!previous.contains(b.as_str()), b))
        });
        let key = std::iter::once(format!("delta {hash} from"))
            .chain(bases.iter().map(|(h, _)| h.clone()))
            .collect::<Vec<_>>()
            .join(" ");
        let (h, rendered) = (hash.to_string(), rendered.clone());
        let encoded = self
            .encodings
            .get_with(&key, move || {
                let refs: Vec<flotilla_proto::delta::Base<'_>> = bases
                    .iter()
                    .map(|(hash, objects)| flotilla_proto::delta::Base { hash, objects })
                    .collect();
                let Some(delta) = flotilla_proto::delta::diff(&h, &rendered, &objects, &refs)
                else {
                    return Vec::new();
                };
                let inline = delta
                    .ops
                    .iter()
                    .filter(|o| matches!(o.op, Some(v1::delta_op::Op::Object(_))))
                    .count();
                // Mostly new: whole, encoded once for every agent.
                if inline * 2 > objects.len() {
                    return Vec::new();
                }
                prost::Message::encode_to_vec(&delta)
            })
            .await?;
        Ok((!encoded.is_empty()).then_some(encoded))
    }

    /// Holds a set a v1 agent cannot take in one message: the session goes on
    /// (a set sent anyway would break it, on every reconnect), the reason is
    /// logged and, once per content, recorded as the status of its bundles.
    async fn hold_too_large(
        &self,
        sent: &mut Sent,
        desired: &DesiredSet,
        hashes: &[String],
        reason: String,
    ) -> Result<(), End> {
        let fresh: Vec<&String> = hashes
            .iter()
            .filter(|h| !sent.reported.contains(*h))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        tracing::warn!(%reason, "holding the desired set: too large for a v1 agent");
        let records: Vec<StatusRecord> = desired
            .bundles
            .iter()
            .filter(|(_, h, _)| fresh.contains(&h))
            .map(|(bundle, hash, revision)| StatusRecord {
                cluster: self.cluster.clone(),
                bundle: bundle.clone(),
                content_hash: hash.clone(),
                revision: revision.clone(),
                state: flotilla_shared::state::BundleState::ErrApplied,
                message: reason.clone(),
                observed_at_ms: crate::now_ms() as i64,
            })
            .collect();
        sent.reported.extend(fresh.into_iter().cloned());
        let fleet = self.fleet.clone();
        tokio::task::spawn_blocking(move || {
            for r in records {
                fleet.record_status(r)?;
            }
            fleet.store().flush()?;
            Ok::<_, crate::fleet::FleetError>(())
        })
        .await
        .map_err(|e| End::Error(internal(e)))?
        .map_err(|e| End::Error(internal(e)))
    }

    async fn handle(&self, m: v1::AgentMessage, sent: &mut Sent) -> Result<(), End> {
        use v1::agent_message::Msg;
        match m.msg {
            Some(Msg::Hello(_)) => Err(End::Error(Status::invalid_argument(
                "Hello is only valid as the first message",
            ))),
            Some(Msg::Heartbeat(_)) | None => Ok(()),
            Some(Msg::Ack(ack)) => {
                let Some(set) = sent.pending.get(&ack.generation).cloned() else {
                    tracing::debug!(generation = ack.generation, "ack for an unknown generation");
                    return Ok(());
                };
                // An ack covers its generation; older ones are superseded.
                sent.pending.retain(|g, _| *g > ack.generation);
                sent.sent_at.retain(|g, _| *g > ack.generation);
                tracing::debug!(generation = ack.generation, "desired set acknowledged");
                let (fleet, cluster) = (self.fleet.clone(), self.cluster.clone());
                let resume = crate::store::Resume {
                    seq: ack.generation,
                    key_id: sent.key_id.clone(),
                    set_digest: crate::fleet::set_digest(&set),
                };
                tokio::task::spawn_blocking(move || fleet.record_ack(&cluster, &set, Some(resume)))
                    .await
                    .map_err(|e| End::Error(internal(e)))?
                    .map_err(|e| End::Error(internal(e)))
            }
            Some(Msg::Status(s)) => {
                let seq = s.seq;
                match status_record(&self.cluster, s) {
                    Ok(rec) => {
                        tracing::debug!(bundle = %rec.bundle, state = %rec.state, seq, "status");
                        let bundle = rec.bundle.clone();
                        // Store work (and the flush before the ack) off the async threads.
                        let fleet = self.fleet.clone();
                        let kept = tokio::task::spawn_blocking(move || {
                            let kept = fleet.record_status(rec)?;
                            fleet.store().flush()?;
                            Ok::<_, crate::fleet::FleetError>(kept)
                        })
                        .await
                        .map_err(|e| End::Error(internal(e)))?
                        .map_err(|e| End::Error(internal(e)))?;
                        if !kept {
                            tracing::warn!(%bundle, seq, "status for a bundle not assigned to this cluster dropped");
                        }
                    }
                    // Acknowledged anyway: resending it would not make it valid.
                    Err(reason) => tracing::warn!(seq, %reason, "invalid status dropped"),
                }
                self.send(v1::hub_message::Msg::StatusAck(v1::StatusAck { seq }))
                    .await
            }
            Some(Msg::Drift(d)) => {
                let agent_id = d.id;
                match drift_event(&d) {
                    Ok(event) => {
                        let fleet = self.fleet.clone();
                        let cluster = self.cluster.clone();
                        let (bundle, object) = (event.bundle.clone(), event.object.to_string());
                        // Stored and flushed before the ack: an acked event is never lost.
                        let outcome = tokio::task::spawn_blocking(move || {
                            fleet.record_drift(&cluster, &event)
                        })
                        .await
                        .map_err(|e| End::Error(internal(e)))?
                        .map_err(|e| End::Error(internal(e)))?;
                        match outcome {
                            DriftOutcome::Stored(id) => tracing::info!(id, agent_id, %bundle,
                                %object, manager = %d.manager, corrected = d.corrected,
                                deleted = d.deleted, "drift"),
                            DriftOutcome::Resend => {
                                tracing::debug!(agent_id, "drift event already stored")
                            }
                            // Acknowledged, so the agent's outbox moves on; not stored.
                            DriftOutcome::Refused => tracing::debug!(agent_id, %bundle,
                                refused = self.fleet.drift_refused(),
                                "drift event for a bundle not assigned to this cluster refused"),
                        }
                    }
                    // Acknowledged anyway: resending it would not make it valid.
                    Err(reason) => tracing::warn!(agent_id, %reason, "invalid drift event dropped"),
                }
                self.send(v1::hub_message::Msg::DriftAck(v1::DriftAck {
                    id: agent_id,
                }))
                .await
            }
        }
    }
}

/// Checks an agent's drift event and turns it into the domain's.
pub(crate) fn drift_event(
    d: &v1::DriftEvent,
) -> Result<flotilla_shared::drift::DriftEvent, String> {
    validate_name(&d.bundle).map_err(|e| e.to_string())?;
    if d.kind.is_empty() || d.name.is_empty() || d.api_version.is_empty() {
        return Err("a drift event must name its object".into());
    }
    let mut event = flotilla_shared::drift::DriftEvent::try_from(d).map_err(|e| e.to_string())?;
    // A Secret's values never reach the store, whatever the agent sent.
    flotilla_shared::drift::redact(
        &event.object.api_version,
        &event.object.kind,
        &mut event.fields,
    );
    if caps::cap_drift(&mut event) {
        tracing::debug!(agent_id = d.id, "drift event cut to the caps");
    }
    Ok(event)
}

/// Checks an agent's status report and turns it into a record for its cluster.
pub(crate) fn status_record(cluster: &str, s: v1::BundleStatus) -> Result<StatusRecord, String> {
    validate_name(&s.bundle).map_err(|e| e.to_string())?;
    let state = flotilla_proto::status_state(&s).map_err(|e| e.to_string())?;
    let mut s = s;
    caps::cut(&mut s.content_hash, caps::SHORT);
    caps::cut(&mut s.revision, caps::SHORT);
    caps::cut(&mut s.message, caps::MESSAGE);
    Ok(StatusRecord {
        cluster: cluster.to_string(),
        bundle: s.bundle,
        content_hash: s.content_hash,
        revision: s.revision,
        state,
        message: s.message,
        observed_at_ms: s.observed_at_unix_ms,
    })
}

#[cfg(test)]
#[path = "gateway_fuzz.rs"]
mod fuzz;
