//! Component tests: the real hub (gRPC gateway and HTTP API) on 127.0.0.1:0, real
//! tonic clients doing real mTLS over tokio-rustls, real HTTP requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_hub::{Config, Hub};
use flotilla_proto::v1;
use flotilla_proto::v1::enrolment_client::EnrolmentClient;
use flotilla_proto::v1::fleet_client::FleetClient;
use flotilla_shared::token::JoinToken;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

struct TestHub {
    hub: Hub,
    agent_addr: SocketAddr,
    api: String,
    ca_pem: String,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_hub() -> TestHub {
    start_hub_with(|_| {}).await
}

async fn start_hub_with(configure: impl FnOnce(&mut Config)) -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.poll_git = false;
    configure(&mut config);
    let hub = Hub::open(&config).unwrap();
    let agent = flotilla_hub::bind_agent_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = agent.local_addr().unwrap();
    let api_addr = api.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let ca_pem = hub.pki.ca_pem.clone();
    tokio::spawn(hub.clone().serve(agent, api, async move {
        let _ = stopped.await;
    }));
    TestHub {
        hub,
        agent_addr,
        api: format!("http://{api_addr}"),
        ca_pem,
        _stop: stop,
        _dir: dir,
    }
}

impl TestHub {
    fn admin(&self) -> String {
        format!("Bearer {}", self.hub.pki.admin_token())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.api))
            .header("authorization", self.admin());
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn token(&self, ttl: &str) -> JoinToken {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/tokens",
                Some(json!({ "ttl": ttl }).to_string()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().parse().unwrap()
    }

    /// A gRPC channel over TLS trusting the fleet CA, with an optional client cert.
    async fn channel(
        &self,
        client: Option<(&str, &KeyPair)>,
    ) -> Result<Channel, tonic::transport::Error> {
        channel_to(self.agent_addr, &self.ca_pem, client).await
    }
}

async fn channel_to(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &KeyPair)>,
) -> Result<Channel, tonic::transport::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(flotilla_hub::pki::pem_to_der(ca_pem).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key)) => builder
            .with_client_auth_cert(
                vec![flotilla_hub::pki::pem_to_der(cert_pem).unwrap()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

fn csr(key: &KeyPair) -> String {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

async fn enroll(
    th: &TestHub,
    token: &JoinToken,
    name: &str,
    labels: &[(&str, &str)],
    key: &KeyPair,
) -> Result<v1::EnrollResponse, tonic::Status> {
    let mut client = EnrolmentClient::new(th.channel(None).await.unwrap());
    client
        .enroll(v1::EnrollRequest {
            token: token.credential(),
            cluster_name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            csr_pem: csr(key),
        })
        .await
        .map(|r| r.into_inner())
}

async fn enroll_with_csr(
    th: &TestHub,
    token: &JoinToken,
    name: &str,
    csr_pem: &str,
) -> Result<v1::EnrollResponse, tonic::Status> {
    let mut client = EnrolmentClient::new(th.channel(None).await.unwrap());
    client
        .enroll(v1::EnrollRequest {
            token: token.credential(),
            cluster_name: name.into(),
            labels: Default::default(),
            csr_pem: csr_pem.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A caller without a valid token learns nothing of the rest of its request
/// and costs no CSR work: a wrong, spent or expired token with a bad name and a
/// large garbage CSR is refused as a token (the old hub parsed the CSR first
/// and answered InvalidArgument).
#[tokio::test]
async fn a_bad_token_is_refused_before_anything_else() {
    let th = start_hub().await;
    let real = th.token("1h").await;
    let forged = JoinToken {
        secret: "0".repeat(flotilla_shared::token::SECRET_LEN),
        ..real.clone()
    };
    let garbage = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        "A".repeat(2 << 20)
    );
    for name in ["edge-1", "Bad_Name"] {
        let err = enroll_with_csr(&th, &forged, name, &garbage)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
        assert!(err.message().contains("unknown join token"), "{err}");
    }
    let key = KeyPair::generate().unwrap();
    enroll(&th, &real, "edge-1", &[], &key).await.unwrap();
    let err = enroll_with_csr(&th, &real, "Bad_Name", &garbage)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("already used"), "{err}");
}

async fn token_bound(th: &TestHub, body: Value) -> (u16, Value) {
    th.call(
        reqwest::Method::POST,
        "/api/v1/tokens",
        Some(body.to_string()),
    )
    .await
}

/// The holder of a token minted for one cluster can neither enrol another name
/// nor choose its labels (and so its bundles): the token's binding wins.
#[tokio::test]
async fn a_bound_token_decides_the_name_and_the_labels() {
    let th = start_hub().await;
    let (status, body) = token_bound(
        &th,
        json!({"ttl": "1h", "clusterName": "edge-1", "labels": {"env": "dev"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token: JoinToken = body["token"].as_str().unwrap().parse().unwrap();
    let key = KeyPair::generate().unwrap();

    // Another name: refused, naming the bound one, and the token is not spent.
    let err = enroll(&th, &token, "prod-eu-1", &[("env", "prod")], &key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("\"edge-1\""), "{err}");
    // The bound name, claiming prod: enrolled, with the token's labels only.
    let cert = enroll(
        &th,
        &token,
        "edge-1",
        &[("env", "prod"), ("tier", "db")],
        &key,
    )
    .await
    .unwrap()
    .certificate_pem;
    let der = flotilla_hub::pki::pem_to_der(&cert).unwrap();
    assert_eq!(
        flotilla_hub::pki::cluster_from_cert(&der).as_deref(),
        Some("edge-1")
    );
    let (_, c) = th
        .call(reqwest::Method::GET, "/api/v1/clusters/edge-1", None)
        .await;
    assert_eq!(c["labels"], json!({"env": "dev"}), "{c}");

    // So a bundle for prod does not reach it.
    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: prod}\nspec:\n  repo: https://git.example.com/apps.git\n  targets:\n  - clusterSelector: {matchLabels: {env: prod}}\n";
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=s.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let files: BTreeMap<String, Vec<u8>> = [(
        "cm.yaml".to_string(),
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: prod-only}\n".to_vec(),
    )]
    .into_iter()
    .collect();
    assert!(th
        .hub
        .inject_snapshot(
            "prod",
            flotilla_hub::git::Snapshot {
                commit: "p1".into(),
                files,
            },
        )
        .await
        .unwrap());
    let channel = th.channel(Some((&cert, &key))).await.unwrap();
    let (_tx, rx) = session_request(hello(vec![]));
    let mut inbound = FleetClient::new(channel)
        .session(rx)
        .await
        .unwrap()
        .into_inner();
    let v1::hub_message::Msg::Desired(desired) = next_msg(&mut inbound).await else {
        panic!("expected Desired")
    };
    assert!(desired.bundles.is_empty(), "{desired:?}");

    // A token bound to labels only: any name, the token's labels.
    let (_, body) = token_bound(&th, json!({"labels": {"env": "qa"}})).await;
    let token: JoinToken = body["token"].as_str().unwrap().parse().unwrap();
    enroll(&th, &token, "qa-1", &[("env", "prod")], &key)
        .await
        .unwrap();
    let (_, c) = th
        .call(reqwest::Method::GET, "/api/v1/clusters/qa-1", None)
        .await;
    assert_eq!(c["labels"], json!({"env": "qa"}), "{c}");

    // Bad bindings are refused when the token is made.
    for bad in [
        json!({"clusterName": "Bad_Name"}),
        json!({"labels": {"env": "a b"}}),
    ] {
        let (status, body) = token_bound(&th, bad).await;
        assert_eq!(status, 400, "{body}");
    }
}

/// A token's life is capped by the hub (7 days unless --max-token-ttl says
/// otherwise); a longer request is refused naming the cap.
#[tokio::test]
async fn token_lifetimes_are_capped() {
    let th = start_hub().await;
    for (ttl, ok) in [
        ("7d", true),
        ("8d", false),
        ("100000d", false),
        ("0s", false),
    ] {
        let (status, body) = token_bound(&th, json!({ "ttl": ttl })).await;
        assert_eq!(status == 200, ok, "{ttl}: {body}");
        if ttl == "8d" {
            assert!(body["error"].as_str().unwrap().contains("(7d;"), "{body}");
        }
    }
    let th = start_hub_with(|c| c.max_token_ttl = Duration::from_secs(3600)).await;
    let (status, body) = token_bound(&th, json!({ "ttl": "2h" })).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("(1h;"), "{body}");
    let (status, body) = token_bound(&th, json!({})).await;
    assert_eq!(status, 200, "the default ttl (1h) fits: {body}");
}

#[tokio::test]
async fn enrolment_checks_tokens_and_names() {
    let th = start_hub().await;

    // The API refuses calls without the admin token.
    let resp = reqwest::get(format!("{}/api/v1/clusters", th.api))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].is_string());

    // GetCa is open, and its hash is what the token pins.
    let token = th.token("1h").await;
    let mut client = EnrolmentClient::new(th.channel(None).await.unwrap());
    let ca = client
        .get_ca(v1::GetCaRequest {})
        .await
        .unwrap()
        .into_inner()
        .ca_pem;
    let der = flotilla_hub::pki::pem_to_der(&ca).unwrap();
    assert_eq!(flotilla_shared::token::ca_hash(&der), token.ca_hash);

    let key = KeyPair::generate().unwrap();
    let resp = enroll(&th, &token, "edge-1", &[("env", "dev")], &key)
        .await
        .unwrap();
    let der = flotilla_hub::pki::pem_to_der(&resp.certificate_pem).unwrap();
    assert_eq!(
        flotilla_hub::pki::cluster_from_cert(&der).as_deref(),
        Some("edge-1")
    );
    assert_eq!(resp.ca_pem, th.ca_pem);

    // A token works once.
    let err = enroll(&th, &token, "edge-2", &[], &key).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // An expired token does not work at all.
    let expired = th.token("1ms").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = enroll(&th, &expired, "edge-3", &[], &key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("expired"), "{err}");

    // A name is enrolled once.
    let fresh = th.token("1h").await;
    let err = enroll(&th, &fresh, "edge-1", &[], &key).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");

    // Bad input is refused before a token is spent.
    let fresh = th.token("1h").await;
    let err = enroll(&th, &fresh, "Bad_Name", &[], &key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = enroll_with_csr(&th, &fresh, "edge-4", "not a CSR")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(enroll(&th, &fresh, "edge-4", &[], &key).await.is_ok());

    let (status, clusters) = th
        .call(reqwest::Method::GET, "/api/v1/clusters", None)
        .await;
    assert_eq!(status, 200);
    let clusters = &clusters["items"];
    let names: Vec<&str> = clusters
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["edge-1", "edge-4"]);
    assert_eq!(clusters[0]["labels"]["env"], "dev");
    assert_eq!(clusters[0]["connected"], false);
}

fn session_request(
    first: v1::AgentMessage,
) -> (
    mpsc::Sender<v1::AgentMessage>,
    ReceiverStream<v1::AgentMessage>,
) {
    let (tx, rx) = mpsc::channel(16);
    tx.try_send(first).unwrap();
    (tx, ReceiverStream::new(rx))
}

fn hello(held: Vec<String>) -> v1::AgentMessage {
    v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
            agent_version: "test-agent".into(),
            kubernetes_version: "v1.34.0".into(),
            held_hashes: held,
            api_versions: vec!["apps/v1".into(), "apps/v1/Deployment".into()],
            registry: false,
            features: vec![],
            held_seq: 0,
        })),
    }
}

#[tokio::test]
async fn fleet_requires_a_fleet_certificate() {
    let th = start_hub().await;

    // No client certificate: TLS succeeds (enrolment needs that), Fleet refuses.
    let mut client = FleetClient::new(th.channel(None).await.unwrap());
    let (_tx, rx) = session_request(hello(vec![]));
    let err = client.session(rx).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // A certificate from another CA fails the handshake.
    let other_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = ca_params.self_signed(&other_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, other_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge-1");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "flotilla://cluster/edge-1".try_into().unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = params.signed_by(&key, &issuer).unwrap();
    let _ = other_ca;
    let result = match th.channel(Some((&forged.pem(), &key))).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => {
            let (_tx, rx) = session_request(hello(vec![]));
            FleetClient::new(channel)
                .session(rx)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    assert!(result.is_err(), "a foreign certificate was accepted");
}

async fn next_msg(stream: &mut tonic::Streaming<v1::HubMessage>) -> v1::hub_message::Msg {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no message from the hub within 5 s")
        .unwrap()
        .unwrap()
        .msg
        .unwrap()
}

async fn wait_for<F: Fn(&Value) -> bool>(th: &TestHub, path: &str, pred: F) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = th.call(reqwest::Method::GET, path, None).await;
        if status == 200 && pred(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {path}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn session_delivers_desired_set_and_records_status() {
    let th = start_hub().await;
    let token = th.token("1h").await;
    let key = KeyPair::generate().unwrap();
    let cert = enroll(&th, &token, "edge-1", &[("env", "prod")], &key)
        .await
        .unwrap()
        .certificate_pem;

    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec:\n  repo: https://git.example.com/apps.git\n  paths: [\"apps/*\"]\n  targets:\n  - clusterSelector: {matchLabels: {env: prod}}\n";
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=apps.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"][0]["action"], "created");
    let (_, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=apps.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(body["applied"][0]["action"], "unchanged");
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=bad.yaml",
            Some("apiVersion: flotilla.io/v1alpha1\nkind: Nope\nmetadata: {name: x}\n".into()),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("bad.yaml"),
        "{body}"
    );

    let files: BTreeMap<String, Vec<u8>> = [(
        "apps/web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: demo}\ndata: {k: v}\n",
    )]
    .into_iter()
    .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
    .collect();
    assert!(th
        .hub
        .inject_snapshot(
            "apps",
            flotilla_hub::git::Snapshot {
                commit: "c0ffee".into(),
                files,
            },
        )
        .await
        .unwrap());

    let channel = th.channel(Some((&cert, &key))).await.unwrap();
    let mut client = FleetClient::new(channel);
    let (tx, rx) = session_request(hello(vec![]));
    let mut inbound = client.session(rx).await.unwrap().into_inner();

    let v1::hub_message::Msg::Desired(desired) = next_msg(&mut inbound).await else {
        panic!("expected Desired")
    };
    assert_eq!(desired.bundles.len(), 1);
    let bundle = &desired.bundles[0];
    assert_eq!(bundle.name, "apps-apps-web");
    assert_eq!(bundle.revision, "c0ffee");
    assert_eq!(desired.contents.len(), 1);
    let rendered = flotilla_shared::bundle::Rendered::try_from(&desired.contents[0]).unwrap();
    assert_eq!(rendered.content_hash(), bundle.content_hash);

    let b = wait_for(&th, "/api/v1/bundles/apps-apps-web", |b| {
        b["clusters"][0]["state"] == "Pending"
    })
    .await;
    assert_eq!(b["source"], "apps");
    assert_eq!(b["path"], "apps/web");

    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Ack(v1::DesiredAck {
            generation: desired.generation,
        })),
    })
    .await
    .unwrap();
    wait_for(&th, "/api/v1/bundles/apps-apps-web", |b| {
        b["clusters"][0]["state"] == "WaitApplied"
    })
    .await;

    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Status(v1::BundleStatus {
            bundle: bundle.name.clone(),
            content_hash: bundle.content_hash.clone(),
            revision: bundle.revision.clone(),
            state: v1::BundleState::Ready as i32,
            message: String::new(),
            seq: 1,
            observed_at_unix_ms: 1,
        })),
    })
    .await
    .unwrap();
    let v1::hub_message::Msg::StatusAck(ack) = next_msg(&mut inbound).await else {
        panic!("expected StatusAck")
    };
    assert_eq!(ack.seq, 1);

    let (_, b) = th
        .call(reqwest::Method::GET, "/api/v1/bundles/apps-apps-web", None)
        .await;
    assert_eq!(b["clusters"][0]["cluster"], "edge-1");
    assert_eq!(b["clusters"][0]["state"], "Ready");
    assert_eq!(b["clusters"][0]["appliedRevision"], "c0ffee");
    let (_, c) = th
        .call(reqwest::Method::GET, "/api/v1/clusters/edge-1", None)
        .await;
    assert_eq!(c["connected"], true);
    assert_eq!(c["agentVersion"], "test-agent");
    assert_eq!(c["kubernetesVersion"], "v1.34.0");
    assert_eq!(c["bundleCounts"]["Ready"], 1);
    assert_eq!(c["bundles"][0]["state"], "Ready");
    let (_, s) = th
        .call(reqwest::Method::GET, "/api/v1/sources/apps", None)
        .await;
    assert_eq!(s["commit"], "c0ffee");
    assert_eq!(s["bundles"][0], "apps-apps-web");

    // Relabelling moves the bundle away at once.
    let (status, c) = th
        .call(
            reqwest::Method::PATCH,
            "/api/v1/clusters/edge-1/labels",
            Some(json!({"set": {"env": "dev"}}).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["labels"]["env"], "dev");
    let v1::hub_message::Msg::Desired(after) = next_msg(&mut inbound).await else {
        panic!("expected Desired")
    };
    assert!(after.bundles.is_empty());
    assert!(after.generation > desired.generation);

    // Back again: the agent dropped the content with the empty set (it keeps only
    // what its current set refers to), so the content is sent again.
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Ack(v1::DesiredAck {
            generation: after.generation,
        })),
    })
    .await
    .unwrap();
    th.call(
        reqwest::Method::PATCH,
        "/api/v1/clusters/edge-1/labels",
        Some(json!({"set": {"env": "prod"}}).to_string()),
    )
    .await;
    let v1::hub_message::Msg::Desired(back) = next_msg(&mut inbound).await else {
        panic!("expected Desired")
    };
    assert_eq!(back.bundles.len(), 1);
    assert_eq!(back.contents.len(), 1);

    // A second session of the same cluster replaces the first.
    let channel = th.channel(Some((&cert, &key))).await.unwrap();
    let (_tx2, rx2) = session_request(hello(vec![bundle.content_hash.clone()]));
    let mut second = FleetClient::new(channel)
        .session(rx2)
        .await
        .unwrap()
        .into_inner();
    let v1::hub_message::Msg::Desired(d2) = next_msg(&mut second).await else {
        panic!("expected Desired")
    };
    assert!(d2.contents.is_empty());
    let ended = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("the first session did not end");
    assert!(ended.is_err() || ended.unwrap().is_none());

    // Deleting the source empties the desired set.
    let (status, _) = th
        .call(reqwest::Method::DELETE, "/api/v1/sources/apps", None)
        .await;
    assert_eq!(status, 200);
    let v1::hub_message::Msg::Desired(gone) = next_msg(&mut second).await else {
        panic!("expected Desired")
    };
    assert!(gone.bundles.is_empty());
    let (status, _) = th
        .call(reqwest::Method::GET, "/api/v1/sources/apps", None)
        .await;
    assert_eq!(status, 404);
}

/// Cluster A's certificate reads only A's assignments, and cannot report for a
/// bundle that is not A's (the stream is bound to the certificate's identity).
#[tokio::test]
async fn a_cluster_sees_and_reports_only_its_own_bundles() {
    let th = start_hub().await;
    let key_a = KeyPair::generate().unwrap();
    let cert_a = enroll(
        &th,
        &th.token("1h").await,
        "site-a",
        &[("env", "prod")],
        &key_a,
    )
    .await
    .unwrap()
    .certificate_pem;
    let key_b = KeyPair::generate().unwrap();
    enroll(
        &th,
        &th.token("1h").await,
        "site-b",
        &[("env", "dev")],
        &key_b,
    )
    .await
    .unwrap();
    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: devonly}\nspec:\n  repo: https://git.example.com/apps.git\n  targets:\n  - clusterSelector: {matchLabels: {env: dev}}\n";
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=s.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let files: BTreeMap<String, Vec<u8>> = [(
        "cm.yaml".to_string(),
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: secret-of-b}\n".to_vec(),
    )]
    .into_iter()
    .collect();
    assert!(th
        .hub
        .inject_snapshot(
            "devonly",
            flotilla_hub::git::Snapshot {
                commit: "b0b".into(),
                files,
            },
        )
        .await
        .unwrap());

    // A connects with its own certificate: its desired set is empty, and no content
    // of B's bundle reaches it.
    let channel = th.channel(Some((&cert_a, &key_a))).await.unwrap();
    let mut client = FleetClient::new(channel);
    let (tx, rx) = session_request(hello(vec![]));
    let mut inbound = client.session(rx).await.unwrap().into_inner();
    let v1::hub_message::Msg::Desired(desired) = next_msg(&mut inbound).await else {
        panic!("expected Desired")
    };
    assert!(desired.bundles.is_empty(), "{desired:?}");
    assert!(desired.contents.is_empty(), "{desired:?}");

    // A claims B's bundle is Ready (even with the right content hash): acknowledged,
    // so A's queue drains, but not recorded.
    let (_, b) = th
        .call(reqwest::Method::GET, "/api/v1/bundles/devonly", None)
        .await;
    let hash = b["contentHash"].as_str().unwrap().to_string();
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Status(v1::BundleStatus {
            bundle: "devonly".into(),
            content_hash: hash,
            revision: "b0b".into(),
            state: v1::BundleState::Ready as i32,
            message: String::new(),
            seq: 7,
            observed_at_unix_ms: 1,
        })),
    })
    .await
    .unwrap();
    let v1::hub_message::Msg::StatusAck(ack) = next_msg(&mut inbound).await else {
        panic!("expected StatusAck")
    };
    assert_eq!(ack.seq, 7);
    let (_, b) = th
        .call(reqwest::Method::GET, "/api/v1/bundles/devonly", None)
        .await;
    let clusters = b["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 1, "{b}");
    assert_eq!(clusters[0]["cluster"], "site-b");
    assert_eq!(
        clusters[0]["state"], "Pending",
        "A's report must not count: {b}"
    );
    let (_, a) = th
        .call(reqwest::Method::GET, "/api/v1/clusters/site-a", None)
        .await;
    assert!(a["bundles"].as_array().is_none_or(|v| v.is_empty()), "{a}");

    // Had the claim been recorded, A would show Ready as soon as it is assigned the
    // bundle; it must show Pending (sent, not yet acknowledged) instead.
    let (status, _) = th
        .call(
            reqwest::Method::PATCH,
            "/api/v1/clusters/site-a/labels",
            Some(json!({"set": {"env": "dev"}}).to_string()),
        )
        .await;
    assert_eq!(status, 200);
    let b = wait_for(&th, "/api/v1/bundles/devonly", |b| {
        b["clusters"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    let a_state = b["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "site-a")
        .map(|c| c["state"].clone());
    assert_eq!(a_state, Some(json!("Pending")), "{b}");
}

/// Applies a one-ConfigMap source for `env=prod` and returns its bundle name.
async fn prod_bundle(th: &TestHub) -> String {
    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec:\n  repo: https://git.example.com/apps.git\n  targets:\n  - clusterSelector: {matchLabels: {env: prod}}\n";
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=s.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let files: BTreeMap<String, Vec<u8>> = [(
        "cm.yaml".to_string(),
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: demo}\n".to_vec(),
    )]
    .into_iter()
    .collect();
    assert!(th
        .hub
        .inject_snapshot(
            "apps",
            flotilla_hub::git::Snapshot {
                commit: "c1".into(),
                files,
            },
        )
        .await
        .unwrap());
    "apps".into()
}

/// Opens a session with `cert`; returns its sender and inbound stream, or the
/// refusal.
async fn open_session(
    th: &TestHub,
    cert: &str,
    key: &KeyPair,
) -> Result<
    (
        mpsc::Sender<v1::AgentMessage>,
        tonic::Streaming<v1::HubMessage>,
    ),
    tonic::Status,
> {
    let channel = th.channel(Some((cert, key))).await.unwrap();
    let (tx, rx) = session_request(hello(vec![]));
    let inbound = FleetClient::new(channel).session(rx).await?.into_inner();
    Ok((tx, inbound))
}

/// Waits for the end of a stream the hub closes; returns its status.
async fn closed_with(
    stream: &mut tonic::Streaming<v1::HubMessage>,
    within: Duration,
) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("the stream was not closed within {within:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => return status,
        }
    }
}

/// `DELETE /api/v1/clusters/NAME` revokes the cluster: its live stream closes
/// within a second with PermissionDenied, it leaves every view with its statuses
/// and drift history, and its certificate is refused on every call, also after
/// the name is enrolled again (with a new certificate, which works).
#[tokio::test]
async fn a_deleted_cluster_is_cut_off_and_its_certificate_refused() {
    let th = start_hub().await;
    let bundle = prod_bundle(&th).await;
    let key = KeyPair::generate().unwrap();
    let cert = enroll(
        &th,
        &th.token("1h").await,
        "edge-1",
        &[("env", "prod")],
        &key,
    )
    .await
    .unwrap()
    .certificate_pem;
    let other_key = KeyPair::generate().unwrap();
    enroll(
        &th,
        &th.token("1h").await,
        "edge-2",
        &[("env", "prod")],
        &other_key,
    )
    .await
    .unwrap();

    let (tx, mut inbound) = open_session(&th, &cert, &key).await.unwrap();
    let v1::hub_message::Msg::Desired(desired) = next_msg(&mut inbound).await else {
        panic!("expected Desired")
    };
    let b = &desired.bundles[0];
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Ack(v1::DesiredAck {
            generation: desired.generation,
        })),
    })
    .await
    .unwrap();
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Status(v1::BundleStatus {
            bundle: b.name.clone(),
            content_hash: b.content_hash.clone(),
            revision: b.revision.clone(),
            state: v1::BundleState::Ready as i32,
            message: String::new(),
            seq: 1,
            observed_at_unix_ms: 1,
        })),
    })
    .await
    .unwrap();
    assert!(matches!(
        next_msg(&mut inbound).await,
        v1::hub_message::Msg::StatusAck(_)
    ));
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Drift(v1::DriftEvent {
            id: 5,
            bundle: b.name.clone(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "demo".into(),
            name: "web".into(),
            manager: "kubectl-edit".into(),
            detected_at_unix_ms: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    assert!(matches!(
        next_msg(&mut inbound).await,
        v1::hub_message::Msg::DriftAck(_)
    ));
    let (_, drift) = th.call(reqwest::Method::GET, "/api/v1/drift", None).await;
    assert_eq!(drift["items"].as_array().unwrap().len(), 1, "{drift}");

    let (status, body) = th
        .call(reqwest::Method::DELETE, "/api/v1/clusters/edge-1", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let started = std::time::Instant::now();
    let status = closed_with(&mut inbound, Duration::from_secs(1)).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Gone from every view, with its statuses and drift history.
    let (status, _) = th
        .call(reqwest::Method::GET, "/api/v1/clusters/edge-1", None)
        .await;
    assert_eq!(status, 404);
    let (_, clusters) = th
        .call(reqwest::Method::GET, "/api/v1/clusters", None)
        .await;
    assert_eq!(clusters["items"].as_array().unwrap().len(), 1, "{clusters}");
    let (_, bv) = th
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/bundles/{bundle}"),
            None,
        )
        .await;
    let on: Vec<&str> = bv["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cluster"].as_str().unwrap())
        .collect();
    assert_eq!(on, ["edge-2"], "{bv}");
    assert_eq!(bv["driftEvents"], 0, "{bv}");
    let (_, drift) = th.call(reqwest::Method::GET, "/api/v1/drift", None).await;
    assert_eq!(drift, json!({"items": []}));
    let (status, _) = th
        .call(reqwest::Method::DELETE, "/api/v1/clusters/edge-1", None)
        .await;
    assert_eq!(status, 404, "deleted once");

    // The old certificate: refused on a new call.
    let err = open_session(&th, &cert, &key).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let fresh_key = KeyPair::generate().unwrap();
    let err = renew(&th, &cert, &key, &fresh_key).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // Enrolled again under the same name: the new certificate works, the old
    // one stays refused.
    let new_key = KeyPair::generate().unwrap();
    let new_cert = enroll(
        &th,
        &th.token("1h").await,
        "edge-1",
        &[("env", "prod")],
        &new_key,
    )
    .await
    .unwrap()
    .certificate_pem;
    let err = open_session(&th, &cert, &key).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = renew(&th, &cert, &key, &fresh_key).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let (_tx, mut fresh) = open_session(&th, &new_cert, &new_key).await.unwrap();
    assert!(matches!(
        next_msg(&mut fresh).await,
        v1::hub_message::Msg::Desired(_)
    ));
    let (_, c) = th
        .call(reqwest::Method::GET, "/api/v1/clusters/edge-1", None)
        .await;
    assert_eq!(
        c["bundles"][0]["state"], "Pending",
        "no status survives: {c}"
    );
}

/// Calls Renew with `cert`, for a CSR of `new_key`; returns the new certificate.
async fn renew(
    th: &TestHub,
    cert: &str,
    key: &KeyPair,
    new_key: &KeyPair,
) -> Result<String, tonic::Status> {
    let channel = th.channel(Some((cert, key))).await.unwrap();
    FleetClient::new(channel)
        .renew(v1::RenewRequest {
            csr_pem: csr(new_key),
        })
        .await
        .map(|r| r.into_inner().certificate_pem)
}

/// A certificate signed by the fleet CA for a cluster's name but not the one
/// the hub issued to it (a copy made with the CA key, a leftover) is refused.
#[tokio::test]
async fn only_the_issued_certificate_speaks_for_a_cluster() {
    let th = start_hub().await;
    let key = KeyPair::generate().unwrap();
    let cert = enroll(&th, &th.token("1h").await, "edge-1", &[], &key)
        .await
        .unwrap()
        .certificate_pem;
    let twin_key = KeyPair::generate().unwrap();
    let twin = th
        .hub
        .pki
        .sign_csr(&csr(&twin_key), "edge-1", Duration::from_secs(3600))
        .unwrap()
        .pem;
    let err = open_session(&th, &twin, &twin_key).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(open_session(&th, &cert, &key).await.is_ok());
}

/// Renew trades a CSR for a new certificate over the current one; both stand
/// until the new one is used, then only the new one. Certificates live as long
/// as the hub says (--agent-cert-ttl).
#[tokio::test]
async fn renewal_replaces_the_certificate_on_first_use() {
    let ttl = Duration::from_secs(20);
    let th = start_hub_with(|c| c.agent_cert_ttl = ttl).await;
    let key = KeyPair::generate().unwrap();
    let cert = enroll(&th, &th.token("1h").await, "edge-1", &[], &key)
        .await
        .unwrap()
        .certificate_pem;
    let life = |pem: &str| {
        let der = flotilla_hub::pki::pem_to_der(pem).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        let v = c.validity();
        (v.not_after.timestamp() - v.not_before.timestamp()) as u64
    };
    assert!((20..=23).contains(&life(&cert)), "{}", life(&cert));

    // Without a certificate: refused.
    let err = FleetClient::new(th.channel(None).await.unwrap())
        .renew(v1::RenewRequest { csr_pem: csr(&key) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let new_key = KeyPair::generate().unwrap();
    // An answer lost: renewing again is fine, the last one issued counts.
    let lost = renew(&th, &cert, &key, &new_key).await.unwrap();
    let renewed = renew(&th, &cert, &key, &new_key).await.unwrap();
    assert_ne!(lost, renewed);
    let der = flotilla_hub::pki::pem_to_der(&renewed).unwrap();
    assert_eq!(
        flotilla_hub::pki::cluster_from_cert(&der).as_deref(),
        Some("edge-1")
    );
    assert!(
        open_session(&th, &lost, &new_key).await.is_err(),
        "superseded before use"
    );
    // The old one still works until the new one is used...
    assert!(open_session(&th, &cert, &key).await.is_ok());
    let (_tx, mut s) = open_session(&th, &renewed, &new_key).await.unwrap();
    assert!(matches!(
        next_msg(&mut s).await,
        v1::hub_message::Msg::Desired(_)
    ));
    // ...and not after.
    let err = open_session(&th, &cert, &key).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(renew(&th, &cert, &key, &new_key).await.is_err());
    // A bad CSR over a good certificate is refused as such.
    let channel = th.channel(Some((&renewed, &new_key))).await.unwrap();
    let err = FleetClient::new(channel)
        .renew(v1::RenewRequest {
            csr_pem: "nonsense".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

/// An agent that takes desired sets and never acknowledges them does not make
/// the hub keep them forever: past 16 unacknowledged sets its stream is closed
/// with RESOURCE_EXHAUSTED (it may reconnect and get the current set).
#[tokio::test]
async fn an_agent_that_never_acknowledges_is_disconnected() {
    let th = start_hub().await;
    let token = th.token("1h").await;
    let key = KeyPair::generate().unwrap();
    let cert = enroll(&th, &token, "mute-1", &[], &key)
        .await
        .unwrap()
        .certificate_pem;
    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec:\n  repo: https://git.example.com/apps.git\n";
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=apps.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let channel = th.channel(Some((&cert, &key))).await.unwrap();
    let mut client = FleetClient::new(channel);
    let (_tx, rx) = session_request(hello(vec![]));
    let mut inbound = client.session(rx).await.unwrap().into_inner();
    let mut received = 0;
    let ended = loop {
        received += 1;
        assert!(
            received < 40,
            "the hub kept sending to an agent that never acks"
        );
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web, namespace: demo}}\ndata: {{n: \"{received}\"}}\n"
        );
        let files = BTreeMap::from([("cm.yaml".to_string(), cm.into_bytes())]);
        th.hub
            .inject_snapshot(
                "apps",
                flotilla_hub::git::Snapshot {
                    commit: format!("c{received}"),
                    files,
                },
            )
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Err(status)) => break status,
            other => panic!("unexpected: {other:?}"),
        }
    };
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted, "{ended:?}");
    assert!(received > 16, "closed after {received} sets");
}

/// A source `name` whose one bundle (named `name` too) goes to clusters with
/// `env=ENV`, committed at once.
async fn bundle_for_env(th: &TestHub, name: &str, env: &str) {
    let source = format!("apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {{name: {name}}}\nspec:\n  repo: https://git.example.com/{name}.git\n  targets:\n  - clusterSelector: {{matchLabels: {{env: {env}}}}}\n");
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=s.yaml",
            Some(source),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let files: BTreeMap<String, Vec<u8>> = [(
        "cm.yaml".to_string(),
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\n").into_bytes(),
    )]
    .into_iter()
    .collect();
    let snapshot = flotilla_hub::git::Snapshot {
        commit: "c0ffee".into(),
        files,
    };
    assert!(th.hub.inject_snapshot(name, snapshot).await.unwrap());
}

/// An enrolled cluster's open session: what it sends, what it receives.
struct AgentSession {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::HubMessage>,
}

impl AgentSession {
    async fn open(th: &TestHub, name: &str, env: &str) -> AgentSession {
        let key = KeyPair::generate().unwrap();
        let cert = enroll(th, &th.token("1h").await, name, &[("env", env)], &key)
            .await
            .unwrap()
            .certificate_pem;
        let channel = th.channel(Some((&cert, &key))).await.unwrap();
        let (tx, rx) = session_request(hello(vec![]));
        let mut inbound = FleetClient::new(channel)
            .session(rx)
            .await
            .unwrap()
            .into_inner();
        let v1::hub_message::Msg::Desired(_) = next_msg(&mut inbound).await else {
            panic!("expected Desired first")
        };
        AgentSession { tx, inbound }
    }

    /// Sends a drift event and waits for its ack.
    async fn drift(&mut self, event: v1::DriftEvent) {
        let id = event.id;
        self.tx
            .send(v1::AgentMessage {
                msg: Some(v1::agent_message::Msg::Drift(event)),
            })
            .await
            .unwrap();
        loop {
            match next_msg(&mut self.inbound).await {
                v1::hub_message::Msg::DriftAck(ack) => {
                    assert_eq!(ack.id, id, "acks come in order");
                    return;
                }
                _ => continue,
            }
        }
    }
}

fn drift_of(id: u64, bundle: &str, kind: &str, fields: Vec<v1::FieldDiff>) -> v1::DriftEvent {
    v1::DriftEvent {
        id,
        bundle: bundle.into(),
        api_version: "v1".into(),
        kind: kind.into(),
        namespace: "demo".into(),
        name: format!("obj-{id}"),
        fields,
        manager: "kubectl-edit".into(),
        detected_at_unix_ms: 1_000,
        corrected: false,
        deleted: false,
    }
}

async fn drift_list(th: &TestHub, query: &str) -> Vec<Value> {
    let (status, body) = th
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/drift?{query}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// Agents speak only for themselves, and only so much: cluster A reports drift of
/// a bundle that is B's alone (acknowledged, never stored), sends drift values of
/// a megabyte (cut with a marker, not refused), reports a Secret's values (stored
/// as hashes), then floods the history; B's own events survive the flood.
#[tokio::test]
async fn drift_reports_are_bounded_and_only_for_the_clusters_bundles() {
    let th = start_hub_with(|c| {
        c.drift_caps = flotilla_hub::store::DriftCaps {
            total: 100,
            per_cluster: 40,
        }
    })
    .await;
    bundle_for_env(&th, "aonly", "a").await;
    bundle_for_env(&th, "bonly", "b").await;
    let mut a = AgentSession::open(&th, "site-a", "a").await;
    let mut b = AgentSession::open(&th, "site-b", "b").await;

    // B's own history.
    for id in 1..=5 {
        b.drift(drift_of(id, "bonly", "ConfigMap", vec![])).await;
    }
    assert_eq!(drift_list(&th, "cluster=site-b").await.len(), 5);

    // A speaks for B's bundle: acknowledged, so A's outbox drains, but not stored.
    a.drift(drift_of(1, "bonly", "ConfigMap", vec![])).await;
    assert!(
        drift_list(&th, "cluster=site-a").await.is_empty(),
        "a drift event for a bundle not assigned to A was stored"
    );

    // Oversized values are cut with a marker, the event kept.
    let huge = "x".repeat(1 << 20);
    a.drift(drift_of(
        2,
        "aonly",
        "ConfigMap",
        vec![v1::FieldDiff {
            path: format!("/data/{huge}"),
            desired_json: json!(huge).to_string(),
            live_json: json!({ "k": huge }).to_string(),
        }],
    ))
    .await;
    // A Secret's values are stored as hashes, whatever the agent sent.
    a.drift(drift_of(
        3,
        "aonly",
        "Secret",
        vec![
            v1::FieldDiff {
                path: "/data/password".into(),
                desired_json: json!("aHVudGVyMg==").to_string(),
                live_json: json!("cGxhaW4tdGV4dA==").to_string(),
            },
            v1::FieldDiff {
                path: "/stringData/token".into(),
                desired_json: json!("t0ken-in-the-clear").to_string(),
                live_json: "null".into(),
            },
        ],
    ))
    .await;
    let events = drift_list(&th, "cluster=site-a").await;
    assert_eq!(events.len(), 2, "{events:?}");
    let text = serde_json::to_string(&events[0]).unwrap();
    assert!(
        text.len() < 32 * 1024,
        "a 3 MiB event is stored as {} bytes",
        text.len()
    );
    assert!(text.contains("…[truncated "), "{text}");
    let secret = serde_json::to_string(&events[1]).unwrap();
    for value in ["aHVudGVyMg==", "cGxhaW4tdGV4dA==", "t0ken-in-the-clear"] {
        assert!(!secret.contains(value), "{value} stored: {secret}");
    }
    assert!(secret.contains("/data/password") && secret.contains("redacted:sha256:"));

    // A floods: far more than the fleet-wide bound. Only A's oldest go.
    for id in 4..=203 {
        a.drift(drift_of(id, "aonly", "ConfigMap", vec![])).await;
    }
    let b_events = drift_list(&th, "cluster=site-b").await;
    assert_eq!(b_events.len(), 5, "A's flood pushed out B's history");
    let a_events = drift_list(&th, "cluster=site-a").await;
    assert_eq!(a_events.len(), 40, "A keeps its share");
    assert_eq!(
        a_events.last().unwrap()["object"]["name"],
        "obj-203",
        "and its newest events"
    );
}

/// Every gRPC method, from the service definitions in the proto file.
fn grpc_methods() -> Vec<(String, String)> {
    let proto = include_str!("../../proto/proto/flotilla.proto");
    let mut service = String::new();
    let mut out = Vec::new();
    for line in proto.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.trim_end_matches('{').trim().to_string();
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let name = rest.split('(').next().unwrap().trim().to_string();
            out.push((service.clone(), name));
        }
    }
    out
}

/// Every (method, path) of the admin API, from the router's source: a new
/// `.route(...)` is in the matrix without anyone adding it.
fn http_routes() -> Vec<(reqwest::Method, String)> {
    let api = include_str!("../src/api.rs");
    let admin = &api[api.find("fn admin_router").unwrap()..];
    let admin = &admin[..admin.find(".fallback(").unwrap()];
    let mut out = Vec::new();
    for chunk in admin.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).unwrap();
        let path = path
            .replace("{name}", "x")
            .replace("{id}", "1")
            .replace("{*rest}", "x");
        for (word, method) in [
            ("get(", reqwest::Method::GET),
            ("post(", reqwest::Method::POST),
            ("put(", reqwest::Method::PUT),
            ("delete(", reqwest::Method::DELETE),
            ("patch(", reqwest::Method::PATCH),
        ] {
            if chunk.contains(word) {
                out.push((method, path.clone()));
            }
        }
    }
    out
}

/// Any message: an empty body decodes as the default of every proto3 message.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// Calls `/flotilla.v1.SERVICE/METHOD` with an empty message on `channel`
/// (a channel error counts as refused by TLS).
async fn call_raw(
    channel: Result<Channel, tonic::transport::Error>,
    service: &str,
    method: &str,
    bearer: Option<&str>,
) -> Result<(), String> {
    let channel = channel.map_err(|e| format!("TLS: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("TLS: {e}"))?;
    let mut req = tonic::Request::new(Empty {});
    if let Some(b) = bearer {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    let path = format!("/flotilla.v1.{service}/{method}")
        .parse::<tonic::codegen::http::uri::PathAndQuery>()
        .unwrap();
    let codec: tonic_prost::ProstCodec<Empty, Empty> = tonic_prost::ProstCodec::default();
    match grpc.unary(req, path, codec).await {
        Ok(_) => Ok(()),
        // A broken handshake can also surface on the first call.
        Err(s) if s.code() == Code::Unknown || s.code() == Code::Unavailable => {
            Err(format!("TLS: {s}"))
        }
        Err(s) => Err(format!("{:?}", s.code())),
    }
}

/// The authorisation matrix: every gRPC method and every API route against
/// every kind of caller that is not entitled, generated from the proto's
/// service definitions and the router, so a new method or route cannot be
/// left out. Only `GetCa` (the public CA certificate, checked by the agent
/// against its token's pin) is open; `Enroll` needs a join token; everything
/// else needs the certificate the hub issued to a cluster that still exists.
#[tokio::test]
async fn authorisation_matrix() {
    let th = start_hub().await;
    // A hub that issues certificates for 3 s, for an expired one.
    let short = start_hub_with(|c| c.agent_cert_ttl = Duration::from_secs(3)).await;
    // A revoked cluster: enrolled, then deleted.
    let revoked_key = KeyPair::generate().unwrap();
    let revoked = enroll(&th, &th.token("1h").await, "gone-1", &[], &revoked_key)
        .await
        .unwrap()
        .certificate_pem;
    let (status, body) = th
        .call(reqwest::Method::DELETE, "/api/v1/clusters/gone-1", None)
        .await;
    assert_eq!(status, 200, "{body}");
    // An expired certificate: issued for 3 s.
    let expired_key = KeyPair::generate().unwrap();
    let expired = enroll(
        &short,
        &short.token("1h").await,
        "late-1",
        &[],
        &expired_key,
    )
    .await
    .unwrap()
    .certificate_pem;
    // A certificate from a CA the hub does not know.
    let foreign_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, KeyPair::generate().unwrap());
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "flotilla://cluster/late-1".try_into().unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let foreign = params.signed_by(&foreign_key, &issuer).unwrap().pem();
    let not_after = {
        let der = flotilla_hub::pki::pem_to_der(&expired).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.validity().not_after.timestamp()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64)
        <= not_after
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let join_token = th.token("1h").await.credential();

    let methods = grpc_methods();
    assert!(methods.len() >= 4, "{methods:?}");
    let mut failures = Vec::new();
    for (service, method) in &methods {
        let public = service == "Enrolment" && method == "GetCa";
        let token_only = service == "Enrolment" && method == "Enroll";
        let needs_cert = !public && !token_only;
        let cells: Vec<(&str, Result<(), String>, &str)> = vec![
            (
                "no credential",
                call_raw(th.channel(None).await, service, method, None).await,
                if public { "ok" } else { "Unauthenticated" },
            ),
            (
                "wrong token",
                call_raw(th.channel(None).await, service, method, Some("nope")).await,
                if public { "ok" } else { "Unauthenticated" },
            ),
            (
                "a join token as bearer",
                call_raw(th.channel(None).await, service, method, Some(&join_token)).await,
                if public { "ok" } else { "Unauthenticated" },
            ),
            (
                "foreign CA",
                call_raw(
                    th.channel(Some((&foreign, &foreign_key))).await,
                    service,
                    method,
                    None,
                )
                .await,
                "TLS",
            ),
            (
                "revoked cluster",
                call_raw(
                    th.channel(Some((&revoked, &revoked_key))).await,
                    service,
                    method,
                    None,
                )
                .await,
                if public {
                    "ok"
                } else if needs_cert {
                    "PermissionDenied"
                } else {
                    "Unauthenticated"
                },
            ),
            (
                "expired certificate",
                call_raw(
                    short.channel(Some((&expired, &expired_key))).await,
                    service,
                    method,
                    None,
                )
                .await,
                // Within the grace an expired certificate may renew itself (here
                // it reaches the CSR check with an empty one), and nothing else.
                if public {
                    "ok"
                } else if service == "Fleet" && method == "Renew" {
                    "InvalidArgument"
                } else {
                    "Unauthenticated"
                },
            ),
        ];
        for (who, got, want) in cells {
            let got_s = match &got {
                Ok(()) => "ok".to_string(),
                Err(e) if e.starts_with("TLS") => "TLS".to_string(),
                Err(e) => e.clone(),
            };
            if got_s != want {
                failures.push(format!(
                    "{service}/{method} × {who}: want {want}, got {got:?}"
                ));
            }
        }
    }

    let routes = http_routes();
    assert!(routes.len() >= 15, "{routes:?}");
    for (method, path) in &routes {
        for (who, auth) in [
            ("no credential", None),
            ("wrong token", Some("Bearer nope".to_string())),
            ("a join token", Some(format!("Bearer {join_token}"))),
            ("admin token in the query", None),
        ] {
            let url = if who == "admin token in the query" {
                format!("{}{path}?token={}", th.api, th.hub.pki.admin_token())
            } else {
                format!("{}{path}", th.api)
            };
            let mut req = reqwest::Client::new().request(method.clone(), url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let status = req.send().await.unwrap().status().as_u16();
            if status != 401 {
                failures.push(format!("{method} {path} × {who}: want 401, got {status}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cell(s) of the matrix are wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Enrolment is rate-limited per peer address, before the token is looked at:
/// a peer guessing tokens gets RESOURCE_EXHAUSTED after its burst, and no
/// further attempt of it reaches the store.
#[tokio::test]
async fn enrolment_is_rate_limited_per_peer() {
    let th = start_hub_with(|c| {
        c.enroll_limit = flotilla_hub::gateway::EnrollLimit {
            burst: 3,
            per_second: 1,
            loopback: true,
        }
    })
    .await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let mut client = EnrolmentClient::new(th.channel(None).await.unwrap());
        let err = client
            .enroll(v1::EnrollRequest {
                token: "flt_guess.guess".into(),
                cluster_name: "x".into(),
                labels: Default::default(),
                csr_pem: String::new(),
            })
            .await
            .unwrap_err();
        codes.push(err.code());
    }
    assert_eq!(&codes[..3], &[Code::Unauthenticated; 3], "{codes:?}");
    assert!(
        codes[3..].iter().all(|c| *c == Code::ResourceExhausted),
        "{codes:?}"
    );
}

/// An agent whose session stays open but that sends nothing, not even a
/// heartbeat, is cut off after the silence limit, and shows offline (a rollout
/// then skips it rather than failing it); one that keeps sending heartbeats is
/// not.
#[tokio::test]
async fn a_silent_agent_is_disconnected_and_shows_offline() {
    let th = start_hub_with(|c| c.agent_silence = Duration::from_secs(2)).await;
    let mut sessions = Vec::new();
    let opened = tokio::time::Instant::now();
    for name in ["mute", "talker"] {
        let key = KeyPair::generate().unwrap();
        let cert = enroll(&th, &th.token("1h").await, name, &[], &key)
            .await
            .unwrap()
            .certificate_pem;
        let channel = th.channel(Some((&cert, &key))).await.unwrap();
        let (tx, rx) = session_request(hello(vec![]));
        let inbound = FleetClient::new(channel)
            .session(rx)
            .await
            .unwrap()
            .into_inner();
        sessions.push((tx, inbound));
    }
    let (talker_tx, mut talker) = sessions.pop().unwrap();
    let (_mute_tx, mut mute) = sessions.pop().unwrap();
    let beats = tokio::spawn(async move {
        loop {
            let beat = v1::AgentMessage {
                msg: Some(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {})),
            };
            if talker_tx.send(beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match mute.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the silent session was never ended");
    let status = ended.expect_err("ended with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    assert!(status.message().contains("heartbeat"), "{status}");
    assert!(
        opened.elapsed() >= Duration::from_secs(2),
        "not before the limit"
    );
    wait_for(&th, "/api/v1/clusters/mute", |c| c["connected"] == false).await;
    // The talker outlived the mute one by more than the limit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = wait_for(&th, "/api/v1/clusters/talker", |_| true).await;
    assert_eq!(c["connected"], true, "{c}");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), talker.message())
            .await
            .map_or(true, |m| m.is_ok()),
        "the talking session is still open"
    );
    beats.abort();
}

/// The rollout routes, tried as an operator with a typo or a crafted name
/// would: a bundle that does not roll out, one that does not exist, a name that
/// walks out of its path segment, and commands that make no sense now are each
/// refused with a status and a reason, never a 500 or a change.
#[tokio::test]
async fn rollout_routes_refuse_what_makes_no_sense() {
    let th = start_hub().await;
    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: r}\nspec:\n  repo: https://git.example.com/r.git\n  paths: [web, plain]\n";
    let (status, body) = th
        .call(reqwest::Method::POST, "/api/v1/apply", Some(source.into()))
        .await;
    assert_eq!(status, 200, "{body}");
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: v}\n";
    let files: BTreeMap<String, Vec<u8>> = [
        ("web/fleet.yaml", "rolloutStrategy: {bakeTime: 1h}\n"),
        ("web/cm.yaml", cm),
        ("plain/cm.yaml", cm),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
    .collect();
    assert!(th
        .hub
        .inject_snapshot(
            "r",
            flotilla_hub::git::Snapshot {
                commit: "c1".into(),
                files,
            },
        )
        .await
        .unwrap());
    let (status, r) = th
        .call(reqwest::Method::GET, "/api/v1/rollouts/r-web", None)
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["revision"], "c1");
    assert_eq!(r["previous"], Value::Null, "its first rollout");

    for (method, path, want, says) in [
        (
            reqwest::Method::GET,
            "/api/v1/rollouts/r-plain",
            404,
            "no rolloutStrategy",
        ),
        (reqwest::Method::GET, "/api/v1/rollouts/nope", 404, "nope"),
        (
            reqwest::Method::POST,
            "/api/v1/rollouts/nope/pause",
            404,
            "nope",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/rollouts/..%2F..%2Fsecrets",
            404,
            "no rollout",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/rollouts/r-web/resume",
            409,
            "resume",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/rollouts/r-web/rollback",
            409,
            "roll back",
        ),
    ] {
        let (status, body) = th.call(method.clone(), path, None).await;
        assert_eq!(status, want, "{method} {path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{method} {path}: {error}");
    }
    // Refused commands changed nothing; a pause then a second pause: one refused.
    let (status, _) = th
        .call(reqwest::Method::POST, "/api/v1/rollouts/r-web/pause", None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = th
        .call(reqwest::Method::POST, "/api/v1/rollouts/r-web/pause", None)
        .await;
    assert_eq!(status, 409, "{body}");
    let (_, history) = th
        .call(reqwest::Method::GET, "/api/v1/rollouts/r-web/history", None)
        .await;
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    assert_eq!(history[0]["outcome"], "Paused", "{history}");
}

/// Every list endpoint pages Kubernetes-style (`?limit=N&continue=TOKEN`): 7
/// clusters at 3 a page are 3 + 3 + 1, in name order, none twice; bad limits and
/// tokens are a 400 with the reason, never a panic or a silent first page.
#[tokio::test]
async fn list_endpoints_are_paginated() {
    let th = start_hub().await;
    let key = KeyPair::generate().unwrap();
    let names = ["c-5", "c-2", "c-7", "c-1", "c-4", "c-6", "c-3"];
    for name in names {
        let token = th.token("1h").await;
        enroll(&th, &token, name, &[], &key).await.unwrap();
    }

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut path = "/api/v1/clusters?limit=3".to_string();
    loop {
        let (status, page) = th.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        sizes.push(items.len());
        seen.extend(
            items
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string()),
        );
        match page["continue"].as_str() {
            Some(t) => path = format!("/api/v1/clusters?limit=3&continue={t}"),
            None => {
                assert!(page.get("continue").is_none(), "omitted on the last page");
                break;
            }
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(seen, ["c-1", "c-2", "c-3", "c-4", "c-5", "c-6", "c-7"]);

    // A page is stable under inserts: a cluster enrolled before the token's key
    // neither shifts nor repeats the next page.
    let (_, first) = th
        .call(reqwest::Method::GET, "/api/v1/clusters?limit=3", None)
        .await;
    let token = first["continue"].as_str().unwrap().to_string();
    let fresh = th.token("1h").await;
    enroll(&th, &fresh, "a-0", &[], &key).await.unwrap();
    let (_, next) = th
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/clusters?limit=3&continue={token}"),
            None,
        )
        .await;
    let next: Vec<&str> = next["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(next, ["c-4", "c-5", "c-6"]);

    // No limit: the default (500), one page. A huge limit is cut, not refused.
    for q in ["", "?limit=99999999999999999999999"] {
        let (status, page) = th
            .call(reqwest::Method::GET, &format!("/api/v1/clusters{q}"), None)
            .await;
        assert_eq!(status, 200, "{q}: {page}");
        assert_eq!(page["items"].as_array().unwrap().len(), 8, "{q}");
        assert!(page.get("continue").is_none(), "{q}");
    }

    // A token past the end: an empty last page.
    let (status, page) = th
        .call(reqwest::Method::GET, "/api/v1/clusters?continue=enp6", None)
        .await;
    assert_eq!((status, page), (200, json!({"items": []})));

    // Abuse, on every list: each a 400 with a JSON error saying what is wrong.
    let long = "A".repeat(10_000);
    let abuse = [
        ("limit=0", "limit must be"),
        ("limit=-1", "limit must be"),
        ("limit=ten", "limit must be"),
        ("limit=", "limit must be"),
        ("limit=1&limit=2", "invalid query"),
        ("continue=!!!", "continue token"),
        ("continue=%FF%FE", "continue token"),
        ("continue=_w", "continue token"),
        ("continue=YQo", "continue token"),
        (&format!("continue={long}"), "continue token"),
    ];
    for list in [
        "sources",
        "groups",
        "clusters",
        "bundles",
        "drift",
        "secrets",
        "notifications",
    ] {
        let (status, page) = th
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/{list}?limit=1"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{list}: {page}");
        assert!(page["items"].is_array(), "{list}: {page}");
        for (q, says) in &abuse {
            let (status, body) = th
                .call(reqwest::Method::GET, &format!("/api/v1/{list}?{q}"), None)
                .await;
            assert_eq!(status, 400, "{list}?{}: {body}", &q[..q.len().min(40)]);
            let error = body["error"].as_str().unwrap_or_default();
            assert!(error.contains(says), "{list}: {error}");
            assert!(error.len() < 300, "the input is not echoed whole: {error}");
        }
    }
    // Drift ids are numbers: a name is not a drift token.
    let (status, body) = th
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/drift?continue={token}"),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

/// More silent connections than there are handshake slots (a slowloris, or a
/// fleet whose TCP connects came before its TLS) hold no slot: an agent that
/// speaks is served at once, not after the silent ones time out (10 s).
#[tokio::test]
async fn silent_connections_do_not_block_agents_that_speak() {
    let th = start_hub().await;
    let token = th.token("1h").await;
    let mut silent = Vec::new();
    for _ in 0..flotilla_hub::gateway::MAX_HANDSHAKES + 44 {
        silent.push(tokio::net::TcpStream::connect(th.agent_addr).await.unwrap());
    }
    let key = KeyPair::generate().unwrap();
    let enrolled = tokio::time::timeout(
        Duration::from_secs(5),
        enroll(&th, &token, "edge-1", &[], &key),
    )
    .await
    .expect("served before the silent connections time out");
    enrolled.unwrap();
    drop(silent);
}

async fn next_msg_within(
    stream: &mut tonic::Streaming<v1::HubMessage>,
    within: Duration,
) -> v1::hub_message::Msg {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("no message from the hub in time")
        .unwrap()
        .unwrap()
        .msg
        .unwrap()
}

/// Protocol v2: to an agent that advertises "chunked-contents" the contents go
/// as chunks of at most 1 MiB before the set that names them, none inline, and
/// reassemble into what the signed set names; a v1 agent's set with a content
/// too large to go inline is held (its session kept, the reason its bundle's
/// status), and with `--protocol-v1-only` the hub ignores the feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contents_go_in_chunks_to_agents_that_speak_it() {
    use flotilla_proto::chunks::{Assembler, MAX_CHUNK_BYTES};
    for v1_only in [false, true] {
        let th = start_hub_with(|c| c.protocol_v1_only = v1_only).await;
        let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec:\n  repo: https://git.example.com/apps.git\n  paths: [\"apps/*\"]\n  targets:\n  - clusterSelector: {matchLabels: {env: prod}}\n";
        let (status, body) = th
            .call(
                reqwest::Method::POST,
                "/api/v1/apply?file=apps.yaml",
                Some(source.into()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        // 20 ConfigMaps of 1 MB (over the 16 MiB a content may take inline), and a small one.
        let mut files: BTreeMap<String, Vec<u8>> = (0..20)
            .map(|i| {
                let blob: String = (0..1_000_000u32)
                    .map(|j| char::from(b'a' + ((j * 7 + i) % 26) as u8))
                    .collect();
                (
                    format!("apps/big/cm-{i:02}.yaml"),
                    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big-{i}, namespace: demo}}\ndata: {{blob: {blob}}}\n").into_bytes(),
                )
            })
            .collect();
        files.insert(
            "apps/small/cm.yaml".into(),
            b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: small, namespace: demo}\n".to_vec(),
        );
        assert!(th
            .hub
            .inject_snapshot(
                "apps",
                flotilla_hub::git::Snapshot {
                    commit: "c1".into(),
                    files,
                },
            )
            .await
            .unwrap());

        // An agent that speaks it.
        let token = th.token("1h").await;
        let key = KeyPair::generate().unwrap();
        let cert = enroll(&th, &token, "edge-2", &[("env", "prod")], &key)
            .await
            .unwrap()
            .certificate_pem;
        let mut hello2 = hello(vec![]);
        if let Some(v1::agent_message::Msg::Hello(h)) = &mut hello2.msg {
            // An oversized and an unknown name are cut or ignored; the
            // known one still counts.
            h.features = vec![
                "x".repeat(100_000),
                "some-future-feature".into(),
                "chunked-contents".into(),
            ];
        }
        let channel = th.channel(Some((&cert, &key))).await.unwrap();
        let (tx2, rx) = session_request(hello2);
        let mut inbound = FleetClient::new(channel)
            .session(rx)
            .await
            .unwrap()
            .into_inner();
        if !v1_only {
            // While the chunks wait for this agent to read them (it reads
            // nothing yet), the session still reads what the agent sends.
            let (_, small) = th
                .call(
                    reqwest::Method::GET,
                    "/api/v1/bundles/apps-apps-small",
                    None,
                )
                .await;
            let hash = small["contentHash"].as_str().unwrap().to_string();
            tokio::time::sleep(Duration::from_millis(500)).await;
            tx2.send(v1::AgentMessage {
                msg: Some(v1::agent_message::Msg::Status(v1::BundleStatus {
                    bundle: "apps-apps-small".into(),
                    content_hash: hash,
                    revision: "c1".into(),
                    state: v1::BundleState::NotReady as i32,
                    message: "probe during the transfer".into(),
                    seq: 1,
                    observed_at_unix_ms: 1,
                })),
            })
            .await
            .unwrap();
            wait_for(&th, "/api/v1/bundles/apps-apps-small", |b| {
                b["clusters"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["cluster"] == "edge-2" && c["message"] == "probe during the transfer"
                    })
                })
            })
            .await;
        }
        if v1_only {
            // As a v1 hub: the big content cannot go inline, so the set is held
            // for this agent too, and no chunk comes.
            let body = wait_for(&th, "/api/v1/bundles/apps-apps-big", |b| {
                b["clusters"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["cluster"] == "edge-2" && c["state"] == "ErrApplied")
                })
            })
            .await;
            assert!(body.to_string().contains("chunked-contents"), "{body}");
            assert!(
                tokio::time::timeout(Duration::from_millis(500), inbound.message())
                    .await
                    .is_err(),
                "a v1 hub sent something"
            );
            continue;
        }
        let mut assembler = Assembler::default();
        let mut chunks = 0;
        let desired = loop {
            match next_msg_within(&mut inbound, Duration::from_secs(60)).await {
                v1::hub_message::Msg::ContentChunk(c) => {
                    assert!(c.data.len() <= MAX_CHUNK_BYTES);
                    chunks += 1;
                    assembler.chunk(c).unwrap();
                }
                v1::hub_message::Msg::Desired(d) if d.bundles.len() == 2 => break d,
                v1::hub_message::Msg::Desired(_) => {}
                // The probe's ack may come between chunks.
                v1::hub_message::Msg::StatusAck(a) => assert_eq!(a.seq, 1),
                other => panic!("unexpected {other:?}"),
            }
        };
        let contents = assembler.finish(&desired.chunked).unwrap();
        assert!(chunks > 16, "{chunks} chunks");
        assert!(desired.contents.is_empty(), "nothing inline");
        assert_eq!(desired.chunked.len(), 2);
        assert_eq!(contents.len(), 2);
        for c in &contents {
            assert_eq!(
                flotilla_proto::content_digest(c).unwrap(),
                c.content_hash,
                "reassembled as rendered"
            );
            assert!(desired
                .bundles
                .iter()
                .any(|b| b.content_hash == c.content_hash));
        }
        drop(inbound);

        // A v1 agent: the set is held, the session kept, the reason its bundle's status.
        let token = th.token("1h").await;
        let key = KeyPair::generate().unwrap();
        let cert = enroll(&th, &token, "edge-1", &[("env", "prod")], &key)
            .await
            .unwrap()
            .certificate_pem;
        let channel = th.channel(Some((&cert, &key))).await.unwrap();
        let (tx1, rx) = session_request(hello(vec![]));
        let mut inbound = FleetClient::new(channel)
            .session(rx)
            .await
            .unwrap()
            .into_inner();
        let body = wait_for(&th, "/api/v1/bundles/apps-apps-big", |b| {
            b["clusters"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["cluster"] == "edge-1" && c["state"] == "ErrApplied")
            })
        })
        .await;
        let row = body["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["cluster"] == "edge-1"))
            .unwrap();
        let message = row["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("chunked-contents") && message.contains("inline"),
            "{message}"
        );
        tx1.send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {})),
        })
        .await
        .unwrap();
        // Nothing came, nor an error: the session is open.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), inbound.message())
                .await
                .is_err(),
            "the hub sent a v1 agent something, or ended its session"
        );
    }
}

/// "object-deltas": after a one-object change the agent is sent that object
/// and runs to copy from the content it holds, which rebuild exactly the
/// content the signed set names; a later session whose agent holds the set it
/// acknowledged resumes from it (no set is sent again), and one that holds an
/// older seq is sent the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_carry_only_the_changed_objects_and_a_held_set_resumes() {
    use flotilla_proto::chunks::{Assembled, Assembler};
    use prost::Message;
    let th = start_hub().await;
    let source = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec:\n  repo: https://git.example.com/apps.git\n  paths: [\"apps/*\"]\n  targets:\n  - clusterSelector: {matchLabels: {env: prod}}\n";
    let (status, body) = th
        .call(
            reqwest::Method::POST,
            "/api/v1/apply?file=apps.yaml",
            Some(source.into()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let files = |changed: &str| -> BTreeMap<String, Vec<u8>> {
        (0..50)
            .map(|i| {
                let v = if i == 25 { changed } else { "same" };
                (
                    format!("apps/web/cm-{i:02}.yaml"),
                    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, namespace: demo}}\ndata: {{v: {v}, pad: {}}}\n", "p".repeat(400)).into_bytes(),
                )
            })
            .collect()
    };
    let snapshot = |commit: &str, changed: &str| flotilla_hub::git::Snapshot {
        commit: commit.into(),
        files: files(changed),
    };
    assert!(th
        .hub
        .inject_snapshot("apps", snapshot("c1", "one"))
        .await
        .unwrap());
    let token = th.token("1h").await;
    let key = KeyPair::generate().unwrap();
    let cert = enroll(&th, &token, "edge-d", &[("env", "prod")], &key)
        .await
        .unwrap()
        .certificate_pem;
    let with = |held: Vec<String>, held_seq: u64| {
        let mut m = hello(held);
        if let Some(v1::agent_message::Msg::Hello(h)) = &mut m.msg {
            h.features = vec!["chunked-contents".into(), "object-deltas".into()];
            h.held_seq = held_seq;
        }
        m
    };
    // Reads one set and what came in chunks before it.
    async fn next_set(
        inbound: &mut tonic::Streaming<v1::HubMessage>,
    ) -> (v1::Desired, Vec<Assembled>) {
        let mut assembler = Assembler::default();
        loop {
            match next_msg_within(inbound, Duration::from_secs(30)).await {
                v1::hub_message::Msg::ContentChunk(c) => {
                    assembler.chunk(c).unwrap();
                }
                v1::hub_message::Msg::Desired(d) => {
                    let got = assembler.finish_all(&d.chunked).unwrap();
                    return (d, got);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let channel = th.channel(Some((&cert, &key))).await.unwrap();
    let (tx, rx) = session_request(with(vec![], 0));
    let mut inbound = FleetClient::new(channel.clone())
        .session(rx)
        .await
        .unwrap()
        .into_inner();
    // Holding nothing: the content comes whole.
    let (d1, got) = next_set(&mut inbound).await;
    let Some(Assembled::Whole(c1)) = got.into_iter().next() else {
        panic!("the first content is not whole");
    };
    assert_eq!(c1.manifests.len(), 50);
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Ack(v1::DesiredAck {
            generation: d1.generation,
        })),
    })
    .await
    .unwrap();
    // One object changes.
    assert!(th
        .hub
        .inject_snapshot("apps", snapshot("c2", "two"))
        .await
        .unwrap());
    let (d2, got) = next_set(&mut inbound).await;
    let Some(Assembled::Delta(delta)) = got.into_iter().next() else {
        panic!("the change did not come as a delta");
    };
    let encoded = delta.encoded_len();
    let objects: std::collections::HashMap<flotilla_proto::delta::Digest, v1::Manifest> = c1
        .manifests
        .iter()
        .map(|m| (flotilla_proto::delta::object_digest(m), m.clone()))
        .collect();
    let list: Vec<_> = c1
        .manifests
        .iter()
        .map(flotilla_proto::delta::object_digest)
        .collect();
    let c1_hash = c1.content_hash.clone();
    let c2 = flotilla_proto::delta::resolve(
        delta,
        |h| (h == c1_hash).then(|| list.clone()),
        |d| objects.get(d).cloned(),
    )
    .expect("the delta rebuilds the content");
    assert_eq!(d2.bundles[0].content_hash, c2.content_hash);
    let changed = c2.manifests[25].encoded_len();
    assert!(
        encoded < changed + 300,
        "a delta of {encoded} bytes for one object of {changed}"
    );
    tx.send(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Ack(v1::DesiredAck {
            generation: d2.generation,
        })),
    })
    .await
    .unwrap();
    wait_for(&th, "/api/v1/bundles/apps-apps-web", |b| {
        b["clusters"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["cluster"] == "edge-d" && c["state"] == "WaitApplied")
        })
    })
    .await;
    drop((tx, inbound));

    // The agent holds d2, acknowledged: a new session resumes from it. A
    // status sent at once is acknowledged first, with no set before it.
    let status = |seq: u64| v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Status(v1::BundleStatus {
            bundle: "apps-apps-web".into(),
            content_hash: c2.content_hash.clone(),
            revision: "c2".into(),
            state: v1::BundleState::Ready as i32,
            message: String::new(),
            seq,
            observed_at_unix_ms: 1,
        })),
    };
    let held = vec![c2.content_hash.clone()];
    let resumed = |held_seq: u64, seq: u64| {
        let (held, status, channel) = (held.clone(), status(seq), channel.clone());
        async move {
            let (tx, rx) = session_request(with(held, held_seq));
            tx.send(status).await.unwrap();
            let mut inbound = FleetClient::new(channel)
                .session(rx)
                .await
                .unwrap()
                .into_inner();
            let first = next_msg_within(&mut inbound, Duration::from_secs(30)).await;
            drop(tx);
            first
        }
    };
    match resumed(d2.generation, 1).await {
        v1::hub_message::Msg::StatusAck(a) => assert_eq!(a.seq, 1),
        other => panic!("a set was sent to an agent that holds it: {other:?}"),
    }
    // An agent that says it holds an older set is sent the set.
    match resumed(d1.generation, 2).await {
        v1::hub_message::Msg::Desired(d) => assert!(d.generation > d2.generation),
        other => panic!("expected the set, got {other:?}"),
    }
}
