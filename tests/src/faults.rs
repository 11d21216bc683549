//! Faults the torture tests inject, all through components they control: a TCP
//! link that resets, blackholes (drops everything without a reset, sockets kept
//! open) or flaps; an HTTP-aware TLS proxy in front of a cluster's API server that
//! answers 429 or 500 on demand; and killing and restarting a test cluster on its
//! data dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{kube_port, testenv_dir, wait_until, Proc, TestCluster};

/// What a [`Link`] does with its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forwards both ways.
    Pass,
    /// Resets every open connection and every new one (a refused or cut route).
    Reset,
    /// Forwards nothing and says nothing: open connections and new ones are kept
    /// open, what arrives is discarded (a half-open link, a dead NAT entry). A
    /// connection that went dark stays dark when the mode changes back, as a
    /// middlebox that lost a flow's state never brings it back.
    Blackhole,
}

struct LinkState {
    mode: watch::Sender<LinkMode>,
    /// When each connection was accepted.
    accepted: Mutex<Vec<Instant>>,
    /// Connections reset by the link.
    resets: AtomicU64,
}

/// A TCP proxy on loopback whose link the test controls. Stops when dropped.
pub struct Link {
    pub port: u16,
    state: Arc<LinkState>,
    flapping: Arc<AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Link {
    /// Proxies 127.0.0.1:<new port> to 127.0.0.1:`upstream`, forwarding at first.
    pub fn start(upstream: u16) -> Result<Link> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("runtime for the fault link")?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let (mode, _) = watch::channel(LinkMode::Pass);
        let state = Arc::new(LinkState {
            mode,
            accepted: Mutex::new(Vec::new()),
            resets: AtomicU64::new(0),
        });
        let st = state.clone();
        rt.spawn(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if let Ok(mut a) = st.accepted.lock() {
                    a.push(Instant::now());
                }
                tokio::spawn(link_conn(client, upstream, st.clone()));
            }
        });
        Ok(Link {
            port,
            state,
            flapping: Arc::new(AtomicBool::new(false)),
            rt: Some(rt),
        })
    }

    pub fn set(&self, mode: LinkMode) {
        self.state.mode.send_replace(mode);
    }

    pub fn mode(&self) -> LinkMode {
        *self.state.mode.borrow()
    }

    /// Connections accepted at or after `since` (a peer that noticed a dead link
    /// and dialled again shows here).
    pub fn accepted_since(&self, since: Instant) -> Vec<Instant> {
        self.state
            .accepted
            .lock()
            .map(|a| a.iter().copied().filter(|t| *t >= since).collect())
            .unwrap_or_default()
    }

    pub fn resets(&self) -> u64 {
        self.state.resets.load(Ordering::Relaxed)
    }

    /// Alternates `Reset` and `Pass` at random intervals in `[min, max)` until
    /// [`Link::stop_flapping`] (ends on `Pass`). Returns at once.
    pub fn flap(&self, min: Duration, max: Duration) {
        self.flapping.store(true, Ordering::SeqCst);
        let (flapping, state) = (self.flapping.clone(), self.state.clone());
        if let Some(rt) = &self.rt {
            rt.spawn(async move {
                let mut cut = false;
                while flapping.load(Ordering::SeqCst) {
                    cut = !cut;
                    state
                        .mode
                        .send_replace(if cut { LinkMode::Reset } else { LinkMode::Pass });
                    let span = max.saturating_sub(min).as_secs_f64();
                    let d = min + Duration::from_secs_f64(span * rand::random::<f64>());
                    tokio::time::sleep(d).await;
                }
                state.mode.send_replace(LinkMode::Pass);
            });
        }
    }

    pub fn stop_flapping(&self) {
        self.flapping.store(false, Ordering::SeqCst);
        self.set(LinkMode::Pass);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.flapping.store(false, Ordering::SeqCst);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Closes with RST instead of FIN: what a peer sees when a route is refused.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Reads and discards until the peer closes: nothing reaches the other side and
/// nothing comes back, yet the socket stays open.
async fn discard(mut s: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn link_conn(mut client: TcpStream, upstream: u16, st: Arc<LinkState>) {
    let mut mode = st.mode.subscribe();
    let now = *mode.borrow_and_update();
    match now {
        LinkMode::Reset => {
            st.resets.fetch_add(1, Ordering::Relaxed);
            return reset(client);
        }
        LinkMode::Blackhole => return discard(client).await,
        LinkMode::Pass => {}
    }
    let _ = client.set_nodelay(true);
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        st.resets.fetch_add(1, Ordering::Relaxed);
        return reset(client);
    };
    let _ = server.set_nodelay(true);
    let changed = async {
        loop {
            if mode.changed().await.is_err() {
                return LinkMode::Reset;
            }
            let m = *mode.borrow_and_update();
            if m != LinkMode::Pass {
                return m;
            }
        }
    };
    let fault = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => None,
        m = changed => Some(m),
    };
    match fault {
        None => {}
        Some(LinkMode::Blackhole) => {
            tokio::join!(discard(client), discard(server));
        }
        Some(_) => {
            st.resets.fetch_add(1, Ordering::Relaxed);
            reset(client);
            reset(server);
        }
    }
}

// ---- the API server's HTTP proxy ---------------------------------------------

/// What the [`ApiProxy`] answers instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFault {
    /// Forwards every request.
    None,
    /// Answers every request with this status (429 with `Retry-After: 1`), as an
    /// overloaded or failing API server does.
    Status(u16),
}

struct ApiState {
    fault: watch::Sender<ApiFault>,
    /// Bumped to cut every open connection (watches included).
    generation: watch::Sender<u64>,
    /// Arrival time and whether it was answered with a fault, per request.
    requests: Mutex<Vec<(Instant, bool)>>,
    upstream_port: u16,
    upstream_tls: Arc<rustls::ClientConfig>,
}

/// An HTTPS proxy between an agent and its API server that understands HTTP: it
/// terminates TLS with its own certificate (a throwaway CA, which the kubeconfig it
/// writes trusts), forwards each request over mutual TLS with the cluster's admin
/// certificate, and answers with an injected status while told to. Stops when
/// dropped.
pub struct ApiProxy {
    pub port: u16,
    /// A kubeconfig for the agent: the proxy as server, its CA trusted.
    pub kubeconfig: PathBuf,
    state: Arc<ApiState>,
    rt: Option<tokio::runtime::Runtime>,
}

fn kubeconfig_field(text: &str, field: &str) -> Result<Vec<u8>> {
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{field}: ")))
        .ok_or_else(|| anyhow!("no {field} in the kubeconfig"))?;
    Ok(base64::engine::general_purpose::STANDARD.decode(value.trim())?)
}

impl ApiProxy {
    /// A proxy in front of `cluster`'s API server; writes the agent's kubeconfig to
    /// `dir/kubeconfig-proxy`.
    pub fn start(cluster: &TestCluster, dir: &Path) -> Result<ApiProxy> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let text = std::fs::read_to_string(&cluster.kubeconfig)?;
        let ca = kubeconfig_field(&text, "certificate-authority-data")?;
        let cert = kubeconfig_field(&text, "client-certificate-data")?;
        let key = kubeconfig_field(&text, "client-key-data")?;
        let upstream_tls = upstream_config(&ca, &cert, &key)?;
        let (proxy_ca_pem, server_config) = proxy_tls()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let kubeconfig = dir.join("kubeconfig-proxy");
        let b64 = base64::engine::general_purpose::STANDARD.encode(proxy_ca_pem.as_bytes());
        let rewritten: Vec<String> = text
            .lines()
            .map(|l| {
                let indent = &l[..l.len() - l.trim_start().len()];
                if l.trim().starts_with("certificate-authority-data: ") {
                    format!("{indent}certificate-authority-data: {b64}")
                } else if l.trim().starts_with("server: ") {
                    format!("{indent}server: https://127.0.0.1:{port}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&kubeconfig, rewritten.join("\n") + "\n")?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("runtime for the API proxy")?;
        let state = Arc::new(ApiState {
            fault: watch::channel(ApiFault::None).0,
            generation: watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
            upstream_port: kube_port(&cluster.kubeconfig)?,
            upstream_tls,
        });
        let st = state.clone();
        rt.spawn(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_api_conn(tls, st).await;
                    }
                });
            }
        });
        Ok(ApiProxy {
            port,
            kubeconfig,
            state,
            rt: Some(rt),
        })
    }

    /// Sets what the proxy answers; a fault also cuts every open connection, so
    /// running watches meet it when they reconnect.
    pub fn set(&self, fault: ApiFault) {
        self.state.fault.send_replace(fault);
        if fault != ApiFault::None {
            self.cut();
        }
    }

    /// Closes every open connection (watches included).
    pub fn cut(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// (requests, of which answered with a fault) that arrived in `[from, to)`.
    pub fn requests_between(&self, from: Instant, to: Instant) -> (usize, usize) {
        self.state
            .requests
            .lock()
            .map(|r| {
                let w: Vec<_> = r.iter().filter(|(t, _)| *t >= from && *t < to).collect();
                (w.len(), w.iter().filter(|(_, f)| *f).count())
            })
            .unwrap_or_default()
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn injected(code: u16) -> hyper::Response<ProxyBody> {
    let reason = match code {
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("injected by the torture proxy ({code})"),
        "reason": reason, "code": code,
    })
    .to_string();
    let mut r = hyper::Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if code == 429 {
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
    }
    r
}

async fn upstream_sender(
    st: &ApiState,
) -> Result<hyper::client::conn::http1::SendRequest<hyper::body::Incoming>> {
    let tcp = TcpStream::connect(("127.0.0.1", st.upstream_port)).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let tls = tokio_rustls::TlsConnector::from(st.upstream_tls.clone())
        .connect(name, tcp)
        .await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn serve_api_conn(tls: tokio_rustls::server::TlsStream<TcpStream>, st: Arc<ApiState>) {
    let mut generation = st.generation.subscribe();
    generation.mark_unchanged();
    // One upstream connection per downstream one, made on the first forwarded
    // request: HTTP/1.1 carries one request at a time on each.
    let upstream = Arc::new(tokio::sync::Mutex::new(None));
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (st, upstream) = (st.clone(), upstream.clone());
        async move {
            let fault = *st.fault.borrow();
            if let Ok(mut r) = st.requests.lock() {
                r.push((Instant::now(), fault != ApiFault::None));
            }
            if let ApiFault::Status(code) = fault {
                return Ok::<_, hyper::Error>(injected(code));
            }
            let mut guard = upstream.lock().await;
            if guard.is_none() {
                match upstream_sender(&st).await {
                    Ok(s) => *guard = Some(s),
                    Err(_) => return Ok(injected(502)),
                }
            }
            let Some(sender) = guard.as_mut() else {
                return Ok(injected(502));
            };
            match sender.send_request(req).await {
                Ok(resp) => Ok(resp.map(|b| b.boxed())),
                Err(_) => {
                    *guard = None;
                    Ok(injected(502))
                }
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
    tokio::select! {
        _ = conn => {}
        _ = generation.changed() => {}
    }
}

fn upstream_config(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A throwaway CA and a serving certificate for 127.0.0.1 signed by it.
fn proxy_tls() -> Result<(String, rustls::ServerConfig)> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "flotilla torture API proxy CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    // HTTP/1.1 only: one request at a time per connection, easy to answer in place.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), config))
}

// ---- killing and restarting a control plane ------------------------------------

impl TestCluster {
    /// kill -9 the whole control plane (etcd, API server, controllers in one
    /// process), then start it again on the same port and data dir and wait until
    /// it is ready. Returns how long it was unreachable.
    pub fn kill9_and_restart(&mut self) -> Result<Duration> {
        let port = kube_port(&self.kubeconfig)?;
        let down = Instant::now();
        self.proc.kill9();
        self.respawn(port)?;
        Ok(down.elapsed())
    }

    /// Starts the control plane again after a kill (same port, same data dir).
    fn respawn(&mut self, port: u16) -> Result<()> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let log = self.dir.join(format!("cluster-{stamp}.log"));
        let spawn = |name: &str, dir: &Path| {
            Proc::spawn(
                &format!("kube-testcluster {name}"),
                Command::new(testenv_dir().join("kube-testcluster"))
                    .arg("--data-dir")
                    .arg(dir)
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--name")
                    .arg(name)
                    .arg("--stop-on-stdin-eof"),
                &log,
            )
        };
        self.proc = spawn(&self.name, &self.dir)?;
        let kubeconfig = self.kubeconfig.clone();
        let mut tries = 1;
        // The data dir's lock and the port are released with the killed process;
        // a start racing the kernel's cleanup exits at once, and is tried again.
        wait_until(
            &format!("cluster {} ready again", self.name),
            Duration::from_secs(120),
            || {
                if !self.proc.alive() {
                    if tries >= 20 {
                        bail!("kube-testcluster exits at start: {}", self.proc.log_text());
                    }
                    tries += 1;
                    self.proc = spawn(&self.name, &self.dir)?;
                    return Ok(None);
                }
                let out = Command::new(testenv_dir().join("kubectl"))
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["get", "--raw", "/readyz"])
                    .stdin(std::process::Stdio::null())
                    .output()?;
                Ok(
                    (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"))
                        .then_some(()),
                )
            },
        )?;
        Ok(())
    }
}
