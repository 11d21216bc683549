//! Enrolment against an in-process hub over real TLS, honest and hostile: the agent
//! trusts exactly the one CA certificate its join token pins. A hub (or whoever
//! answers in its place) serving the pinned CA and a second certificate of its own
//! beside it gets no CSR, and nothing is written to the state directory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use flotilla_agent::enroll::{enroll, load_identity, CA_FILE};
use flotilla_agent::transport;
use flotilla_proto::v1::enrolment_server::{Enrolment, EnrolmentServer};
use flotilla_proto::v1::{EnrollRequest, EnrollResponse, GetCaRequest, GetCaResponse};
use flotilla_shared::labels::Labels;
use flotilla_shared::token::{ca_hash, JoinToken};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    IsCa, KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// A CA of its own, as the hub and an attacker each have.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// An Enrolment service that serves `served_ca` for `GetCa`, presents a serving
/// certificate of `issuer`, and signs every CSR it gets with it.
struct Hub {
    served_ca: String,
    issuer: Arc<CertifiedIssuer<'static, KeyPair>>,
    csrs: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Enrolment for Hub {
    async fn get_ca(&self, _: Request<GetCaRequest>) -> Result<Response<GetCaResponse>, Status> {
        Ok(Response::new(GetCaResponse {
            ca_pem: self.served_ca.clone(),
        }))
    }

    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.csrs.fetch_add(1, Ordering::SeqCst);
        let csr = CertificateSigningRequestParams::from_pem(&req.into_inner().csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(EnrollResponse {
            certificate_pem: cert.pem(),
            ca_pem: self.served_ca.clone(),
            signing_public_key: vec![],
        }))
    }
}

/// Serves `hub` over TLS 1.3 on 127.0.0.1:0; returns the port and a stop switch.
async fn serve(hub: Hub) -> (u16, watch::Sender<bool>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "hub");
    let cert = p.signed_by(&key, &hub.issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, mut stopped) = watch::channel(false);
    // tonic serves `Connected` streams; a duplex pipe is one, so each TLS
    // connection is bridged onto one.
    let incoming = futures::stream::unfold((listener, acceptor), |(l, a)| async move {
        loop {
            let (tcp, _) = l.accept().await.ok()?;
            let Ok(mut tls) = a.accept(tcp).await else {
                continue;
            };
            let (mut near, far) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut near).await;
            });
            return Some((Ok::<_, std::io::Error>(far), (l, a)));
        }
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EnrolmentServer::new(hub))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
    });
    (port, stop)
}

fn token(pinned: &CertifiedIssuer<'static, KeyPair>) -> String {
    JoinToken {
        id: "abcd1234".into(),
        secret: "0123456789abcdefghijklmnopqrstuv".into(),
        ca_hash: ca_hash(pinned.der()),
    }
    .to_string()
}

async fn enroll_at(port: u16, token: &str, dir: &std::path::Path) -> Result<(), String> {
    let hub = transport::parse_hub(&format!("https://localhost:{port}")).unwrap();
    enroll(&hub, token, "edge-1", &Labels::new(), dir)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_hub_is_trusted_with_its_one_pinned_ca() {
    let hub_ca = Arc::new(ca("fleet CA"));
    let csrs = Arc::new(AtomicUsize::new(0));
    let (port, stop) = serve(Hub {
        served_ca: hub_ca.pem(),
        issuer: hub_ca.clone(),
        csrs: csrs.clone(),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    enroll_at(port, &token(&hub_ca), dir.path()).await.unwrap();
    assert_eq!(csrs.load(Ordering::SeqCst), 1);
    // What was saved is exactly the pinned certificate.
    let saved = std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap();
    let certs = transport::certs_from_pem(&saved).unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].as_ref(), hub_ca.der().as_ref());
    let id = load_identity(dir.path()).unwrap().expect("enrolled");
    transport::mutual_config(&id.ca_pem, &id.cert_pem, &id.key_pem).expect("usable identity");
    stop.send_replace(true);
}

/// An attacker between agent and hub knows the fleet CA (it is public: any
/// `GetCa` returns it) but not its key. It answers `GetCa` with the pinned CA
/// first and its own CA second, and serves a certificate of its own CA: an agent
/// that checks only the first certificate but trusts them all sends it the CSR
/// and takes its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_certificate_beside_the_pinned_ca_is_refused() {
    let hub_ca = ca("fleet CA");
    let attacker = Arc::new(ca("not the fleet CA"));
    for served in [
        format!("{}{}", hub_ca.pem(), attacker.pem()),
        format!("{}{}", attacker.pem(), hub_ca.pem()),
    ] {
        let csrs = Arc::new(AtomicUsize::new(0));
        let (port, stop) = serve(Hub {
            served_ca: served,
            issuer: attacker.clone(),
            csrs: csrs.clone(),
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let err = enroll_at(port, &token(&hub_ca), dir.path())
            .await
            .expect_err("enrolment must be refused");
        assert!(
            err.contains("served 2 certificates") && err.contains("exactly one"),
            "the error says why: {err}"
        );
        assert_eq!(
            csrs.load(Ordering::SeqCst),
            0,
            "no CSR reaches the attacker"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing is saved"
        );
        stop.send_replace(true);
    }
}
