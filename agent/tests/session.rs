//! The session against an in-process fake hub over real mutual TLS: Hello carries
//! the held hashes, a Desired set is on disk before its ack arrives, statuses are
//! sent and their acks recorded, and shutdown stops the session.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flotilla_agent::session::Sessions;
use flotilla_agent::store::{DesiredBundle, Store};
use flotilla_agent::transport;
use flotilla_agent::writer::{Entry, Writer};
use flotilla_proto::v1::agent_message::Msg as AgentMsg;
use flotilla_proto::v1::fleet_server::{Fleet, FleetServer};
use flotilla_proto::v1::hub_message::Msg as HubMsg;
use flotilla_proto::v1::{AgentMessage, BundleContent, BundleRef, Desired, HubMessage, StatusAck};
use flotilla_shared::state::BundleState;
use futures::Stream;
use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

/// A TLS stream tonic can serve (it implements `Connected` only with its own TLS).
struct Tls(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}
impl AsyncRead for Tls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}
impl AsyncWrite for Tls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct FakeHub {
    events: mpsc::UnboundedSender<AgentMessage>,
    /// Sent in order after Hello.
    messages: Vec<HubMsg>,
}

type HubStream = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Fleet for FakeHub {
    type SessionStream = HubStream;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<HubStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let events = self.events.clone();
        let messages = self.messages.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let replies = match &m.msg {
                    Some(AgentMsg::Hello(_)) => messages.clone(),
                    Some(AgentMsg::Status(s)) => vec![HubMsg::StatusAck(StatusAck { seq: s.seq })],
                    _ => vec![],
                };
                let _ = events.send(m);
                for r in replies {
                    if tx.send(Ok(HubMessage { msg: Some(r) })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(
        &self,
        _req: Request<flotilla_proto::v1::RenewRequest>,
    ) -> Result<Response<flotilla_proto::v1::RenewResponse>, Status> {
        Err(Status::unimplemented("the fake hub renews nothing"))
    }
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |sans: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf(vec!["localhost".into()], "hub"),
        client: leaf(vec![], "c1"),
    }
}

async fn serve(pki: &Pki, hub: FakeHub) -> (u16, watch::Sender<bool>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in transport::certs_from_pem(&pki.ca_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            transport::certs_from_pem(&pki.server.0).unwrap(),
            PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let incoming = futures::stream::unfold((listener, acceptor), |(l, a)| async move {
        loop {
            let (tcp, _) = l.accept().await.ok()?;
            if let Ok(tls) = a.accept(tcp).await {
                return Some((Ok::<_, std::io::Error>(Tls(tls)), (l, a)));
            }
        }
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(FleetServer::new(hub))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
    });
    (port, stop_tx)
}

async fn next(events: &mut mpsc::UnboundedReceiver<AgentMessage>) -> AgentMsg {
    tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("a message from the agent in time")
        .expect("events open")
        .msg
        .expect("a message")
}

/// A fake hub that sends `desired` in order after Hello, and a real agent
/// session against it over mutual TLS; its store and writer are the test's.
struct Run {
    events: mpsc::UnboundedReceiver<AgentMessage>,
    store: Store,
    writer: Writer,
    wake: Arc<Notify>,
    shut: watch::Sender<bool>,
    agent: tokio::task::JoinHandle<()>,
    stop_hub: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn run_against(desired: Vec<Desired>) -> Run {
    run_against_messages(desired.into_iter().map(HubMsg::Desired).collect()).await
}

/// An agent that speaks every feature, against a hub that sends `messages`.
async fn run_against_messages(messages: Vec<HubMsg>) -> Run {
    let pki = pki();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (port, stop_hub) = serve(
        &pki,
        FakeHub {
            events: events_tx,
            messages,
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1).unwrap();
    // The Kubernetes version is best effort; an unreachable API server is fine here.
    let kube =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let (writer, status_rx) = Writer::spawn(store.clone()).unwrap();
    let wake = Arc::new(Notify::new());
    let sessions = Sessions {
        hub: transport::parse_hub(&format!("https://localhost:{port}")).unwrap(),
        tls: transport::mutual_config(&pki.ca_pem, &pki.client.0, &pki.client.1).unwrap(),
        cluster_name: "c1".into(),
        writer: writer.clone(),
        kube,
        reconcile: wake.clone(),
        trust: Arc::new(flotilla_agent::trust::Trust::load(dir.path(), "c1").unwrap()),
        registry: None,
        statuses: status_rx,
        renewal: None,
        resend_statuses: false,
        features: flotilla_proto::features::ALL
            .iter()
            .map(|f| f.to_string())
            .collect(),
    };
    let (shut, shut_rx) = watch::channel(false);
    let agent = tokio::spawn(sessions.run(shut_rx));
    Run {
        events,
        store,
        writer,
        wake,
        shut,
        agent,
        stop_hub,
        _dir: dir,
    }
}

impl Run {
    /// Stops the session (it must end on shutdown), then the fake hub.
    async fn stop(self) {
        let _ = self.shut.send(true);
        tokio::time::timeout(Duration::from_secs(5), self.agent)
            .await
            .expect("the session stops on shutdown")
            .unwrap();
        self.stop_hub.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_stores_before_ack_and_sends_statuses() {
    let content = BundleContent {
        content_hash: "h1".into(),
        ..Default::default()
    };
    let desired = Desired {
        generation: 7,
        complete: true,
        signed: None,
        chunked: vec![],
        bundles: vec![BundleRef {
            name: "web".into(),
            content_hash: "h1".into(),
            revision: "c1".into(),
            blob_digest: String::new(),
        }],
        contents: vec![content],
    };
    let mut run = run_against(vec![desired]).await;

    let AgentMsg::Hello(hello) = next(&mut run.events).await else {
        panic!("Hello first")
    };
    assert!(hello.held_hashes.is_empty());
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    let AgentMsg::Ack(ack) = next(&mut run.events).await else {
        panic!("then the ack")
    };
    assert_eq!(ack.generation, 7);
    let stored = run.store.desired().unwrap().expect("stored before the ack");
    assert_eq!(stored.generation, 7);
    assert_eq!(run.store.held_hashes().unwrap(), ["h1"]);
    tokio::time::timeout(Duration::from_secs(5), run.wake.notified())
        .await
        .expect("the reconciler is woken");

    // A status recorded through the writer is sent once durable, and its ack recorded.
    run.writer
        .record(vec![Entry::Status {
            bundle: DesiredBundle {
                name: "web".into(),
                content_hash: "h1".into(),
                revision: "c1".into(),
            },
            state: BundleState::Ready,
            message: String::new(),
            at_unix_ms: 42,
        }])
        .await
        .unwrap();
    run.writer.sync().await.unwrap();
    let st = run.store.last_status("web").unwrap().expect("recorded");
    assert_eq!(st.observed_at_unix_ms, 42);
    let AgentMsg::Status(s) = next(&mut run.events).await else {
        panic!("a status")
    };
    assert_eq!((s.bundle.as_str(), s.seq), ("web", st.seq));
    assert_eq!(s.state, flotilla_proto::v1::BundleState::Ready as i32);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while run.store.acked_seq().unwrap() < st.seq {
        assert!(tokio::time::Instant::now() < deadline, "ack recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    run.stop().await;
}

/// A set the hub did not mark complete (an older or buggy hub, or one that has
/// not loaded its sources) is neither stored nor acknowledged: the agent keeps
/// what it holds and prunes nothing. Old agents stored and acked it, and pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_desired_set_is_refused() {
    let bundle = |hash: &str| BundleRef {
        name: "web".into(),
        content_hash: hash.into(),
        revision: "c1".into(),
        blob_digest: String::new(),
    };
    let content = BundleContent {
        content_hash: "h1".into(),
        ..Default::default()
    };
    let empty_incomplete = Desired {
        generation: 7,
        complete: false,
        signed: None,
        chunked: vec![],
        bundles: vec![],
        contents: vec![],
    };
    let complete = Desired {
        generation: 8,
        complete: true,
        signed: None,
        chunked: vec![],
        bundles: vec![bundle("h1")],
        contents: vec![content],
    };
    let mut run = run_against(vec![empty_incomplete, complete]).await;
    let AgentMsg::Hello(_) = next(&mut run.events).await else {
        panic!("Hello first")
    };
    // The stream is ordered: had the agent taken generation 7, its ack would come first.
    let AgentMsg::Ack(ack) = next(&mut run.events).await else {
        panic!("an ack")
    };
    assert_eq!(ack.generation, 8, "the incomplete set was acknowledged");
    let stored = run
        .store
        .desired()
        .unwrap()
        .expect("the complete set is stored");
    assert_eq!(stored.generation, 8);
    run.stop().await;
}

/// The agent reads a desired set as large as the hub may send
/// (`MAX_MESSAGE_BYTES`): a set over tonic's 4 MiB default used to break the
/// session on every reconnect, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_set_over_four_mib_is_read() {
    let blob = "x".repeat(5 * 1024 * 1024);
    let content = BundleContent {
        content_hash: "big".into(),
        manifests: vec![flotilla_proto::v1::Manifest {
            file: "cm.yaml".into(),
            json: format!(
                r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"b":"{blob}"}}}}"#
            ),
        }],
        ..Default::default()
    };
    let desired = Desired {
        generation: 3,
        complete: true,
        signed: None,
        chunked: vec![],
        bundles: vec![BundleRef {
            name: "big".into(),
            content_hash: "big".into(),
            revision: "c1".into(),
            blob_digest: String::new(),
        }],
        contents: vec![content],
    };
    let mut run = run_against(vec![desired]).await;
    let AgentMsg::Hello(_) = next(&mut run.events).await else {
        panic!("Hello first")
    };
    let AgentMsg::Ack(ack) = next(&mut run.events).await else {
        panic!("an ack of the large set")
    };
    assert_eq!(ack.generation, 3);
    assert_eq!(run.store.held_hashes().unwrap(), ["big"]);
    run.stop().await;
}

/// Chunked contents that do not arrive whole and sound refuse the set that
/// names them (neither stored nor acknowledged, the session goes on), and a
/// sound one after them is taken: a wrong hash, a gap, a total over the cap, a
/// set naming a content never sent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsound_chunked_contents_refuse_their_set() {
    use flotilla_proto::chunks::{encode_content, split, MAX_CONTENT_BYTES};
    use flotilla_proto::v1::ContentChunk;
    use flotilla_shared::bundle::{Manifest, Rendered};
    let rendered = |name: &str| Rendered {
        manifests: (0..3)
            .map(|i| Manifest {
                file: format!("cm-{i}.yaml"),
                object: serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("{name}-{i}")},
                    "data": {"blob": "y".repeat(700_000)}
                }),
            })
            .collect(),
        options: Default::default(),
    };
    let chunks = |hash: &str, r: &Rendered| -> Vec<HubMsg> {
        split(hash, encode_content(hash, r).into())
            .map(HubMsg::ContentChunk)
            .collect()
    };
    let set = |generation: u64, hash: &str| {
        HubMsg::Desired(Desired {
            generation,
            complete: true,
            chunked: vec![hash.to_string()],
            bundles: vec![BundleRef {
                name: "web".into(),
                content_hash: hash.into(),
                revision: format!("c{generation}"),
                blob_digest: String::new(),
            }],
            ..Default::default()
        })
    };
    let mut messages = Vec::new();
    // Named for a content it is not.
    let (a, b) = (rendered("a"), rendered("b"));
    let named_a = a.content_hash();
    messages.extend(chunks(&named_a, &b));
    messages.push(set(5, &named_a));
    // A gap: the second chunk left out.
    let c = rendered("c");
    let hc = c.content_hash();
    let mut cs = chunks(&hc, &c);
    assert!(cs.len() >= 3);
    cs.remove(1);
    messages.extend(cs);
    messages.push(set(6, &hc));
    // A total over the cap.
    let hd = "d".repeat(64);
    messages.push(HubMsg::ContentChunk(ContentChunk {
        content_hash: hd.clone(),
        offset: 0,
        total_len: MAX_CONTENT_BYTES + 1,
        data: vec![0u8; 1024].into(),
        delta: false,
    }));
    messages.push(set(7, &hd));
    // Never sent whole: the last chunk missing.
    let e = rendered("e");
    let he = e.content_hash();
    let mut es = chunks(&he, &e);
    es.pop();
    messages.extend(es);
    messages.push(set(8, &he));
    // Sound.
    let f = rendered("f");
    let hf = f.content_hash();
    messages.extend(chunks(&hf, &f));
    messages.push(set(9, &hf));

    let mut run = run_against_messages(messages).await;
    let AgentMsg::Hello(hello) = next(&mut run.events).await else {
        panic!("Hello first")
    };
    assert_eq!(hello.features, flotilla_proto::features::ALL);
    // The stream is ordered: had the agent taken any earlier set, its ack would come first.
    let AgentMsg::Ack(ack) = next(&mut run.events).await else {
        panic!("an ack")
    };
    assert_eq!(ack.generation, 9, "an unsound set was acknowledged");
    let stored = run
        .store
        .desired()
        .unwrap()
        .expect("the sound set is stored");
    assert_eq!(stored.generation, 9);
    assert_eq!(run.store.held_hashes().unwrap(), std::slice::from_ref(&hf));
    let held = run.store.content(&hf).unwrap().expect("its content");
    let held = BundleContent::decode(held.as_slice()).unwrap();
    assert_eq!(flotilla_proto::content_digest(&held).unwrap(), hf);
    run.stop().await;
}

/// "object-deltas": a content that comes as a delta is rebuilt from the objects
/// the store holds, stored (each object once) and acknowledged; a delta that
/// cannot be rebuilt (it copies from a content the agent does not hold) refuses
/// its set, and the next session no longer asks for deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_are_rebuilt_from_the_store_and_one_that_cannot_be_ends_deltas() {
    use flotilla_proto::chunks::{encode_content, split_as};
    use flotilla_proto::delta::{diff, object_list, Base};
    use flotilla_shared::bundle::{Manifest, Rendered};
    let rendered = |values: &[&str]| Rendered {
        manifests: values
            .iter()
            .enumerate()
            .map(|(i, v)| Manifest {
                file: format!("cm-{i}.yaml"),
                object: serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("cm-{i}")},
                    "data": {"v": v}
                }),
            })
            .collect(),
        options: Default::default(),
    };
    let set = |generation: u64, hash: &str| {
        HubMsg::Desired(Desired {
            generation,
            complete: true,
            chunked: vec![hash.to_string()],
            bundles: vec![BundleRef {
                name: "web".into(),
                content_hash: hash.into(),
                revision: format!("c{generation}"),
                blob_digest: String::new(),
            }],
            ..Default::default()
        })
    };
    let (a, b) = (rendered(&["x", "y", "z"]), rendered(&["x", "y", "w"]));
    let (ha, hb) = (a.content_hash(), b.content_hash());
    let a_list = object_list(&a);
    let delta = diff(
        &hb,
        &b,
        &object_list(&b),
        &[Base {
            hash: &ha,
            objects: &a_list,
        }],
    )
    .expect("b shares objects with a");
    let mut messages: Vec<HubMsg> = split_as(&ha, encode_content(&ha, &a).into(), false)
        .map(HubMsg::ContentChunk)
        .collect();
    messages.push(set(1, &ha));
    messages.extend(split_as(&hb, delta.encode_to_vec().into(), true).map(HubMsg::ContentChunk));
    messages.push(set(2, &hb));
    // A delta against a content the agent never held.
    let c = rendered(&["x", "q", "r"]);
    let hc = c.content_hash();
    let mut bad = delta.clone();
    bad.content_hash = hc.clone();
    bad.bases = vec!["f".repeat(64)];
    messages.extend(split_as(&hc, bad.encode_to_vec().into(), true).map(HubMsg::ContentChunk));
    messages.push(set(3, &hc));

    let mut run = run_against_messages(messages).await;
    let AgentMsg::Hello(hello) = next(&mut run.events).await else {
        panic!("Hello first")
    };
    assert!(hello
        .features
        .iter()
        .any(|f| f == flotilla_proto::features::OBJECT_DELTAS));
    for generation in [1, 2] {
        let AgentMsg::Ack(ack) = next(&mut run.events).await else {
            panic!("an ack")
        };
        assert_eq!(ack.generation, generation);
    }
    let held = run
        .store
        .content(&hb)
        .unwrap()
        .expect("the rebuilt content");
    assert_eq!(
        BundleContent::decode(held.as_slice()).unwrap(),
        flotilla_proto::bundle_content(&hb, &b)
    );
    assert_eq!(run.store.object_count(), 3, "z went with a, w came with b");
    // The bad delta is refused (no ack) and ends the session; the next one asks
    // for whole contents.
    let hello = loop {
        match next(&mut run.events).await {
            AgentMsg::Hello(h) => break h,
            AgentMsg::Ack(a) => assert_ne!(a.generation, 3, "the bad delta's set was taken"),
            _ => {}
        }
    };
    assert_eq!(hello.features, [flotilla_proto::features::CHUNKED_CONTENTS]);
    assert_eq!(run.store.desired().unwrap().unwrap().generation, 2);
    run.stop().await;
}
