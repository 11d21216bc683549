//! Git's smart HTTP protocol over HTTPS on loopback behind basic auth: a small axum
//! server that runs the real `git http-backend` as a CGI program for each request,
//! as Apache or nginx + fcgiwrap would, with a certificate from a throwaway CA
//! (written to `ca.pem`; clients trust it through `SSL_CERT_FILE`). For
//! private-repository tests. (HTTPS, because gix refuses to send credentials over
//! plain HTTP.)

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use tokio::io::AsyncWriteExt;

struct Shared {
    root: PathBuf,
    /// `user:password`, as basic auth carries it.
    expected: String,
    /// Requests refused for want of the right credentials.
    refused: AtomicUsize,
    /// Requests served by git.
    served: AtomicUsize,
}

/// The server; stops when dropped (its runtime is shut down).
pub struct GitHttp {
    pub port: u16,
    /// PEM of the CA that signed the server's certificate.
    pub ca_file: PathBuf,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GitHttp {
    /// Serves every repository under `root` (`http://127.0.0.1:PORT/<name>`) to
    /// clients presenting `user`/`password`.
    pub fn start(root: &Path, user: &str, password: &str) -> Result<GitHttp> {
        let (ca_pem, config) = tls_config()?;
        let ca_file = root.join("git-http-ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            expected: format!("{user}:{password}"),
            refused: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime for the git HTTP server")?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(inner) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let listener = TlsListener { inner, acceptor };
                let app = axum::Router::new().fallback(cgi).with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Ok(GitHttp {
            port,
            ca_file,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self, repo: &str) -> String {
        format!("https://127.0.0.1:{}/{repo}", self.port)
    }

    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.shared.served.load(Ordering::SeqCst)
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(status: StatusCode, headers: &[(&str, &str)], body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(*k), HeaderValue::try_from(*v)) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .is_some_and(|d| d == expected.as_bytes())
}

async fn cgi(State(s): State<Arc<Shared>>, req: Request) -> Response {
    if !authorized(req.headers(), &s.expected) {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return respond(
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", "Basic realm=\"git\"")],
            "authentication required\n",
        );
    }
    let (parts, body) = req.into_parts();
    let Ok(body): Result<Bytes, _> = axum::body::to_bytes(body, 256 << 20).await else {
        return respond(StatusCode::BAD_REQUEST, &[], "bad body\n");
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &s.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", "e2e")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, &[], "cannot run git\n");
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let Ok(out) = child.wait_with_output().await else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, &[], "git failed\n");
    };
    s.served.fetch_add(1, Ordering::SeqCst);
    // CGI output: headers, a blank line, the body.
    let raw = out.stdout;
    let (head_end, sep) = match find(&raw, b"\r\n\r\n") {
        Some(i) => (i, 4),
        None => match find(&raw, b"\n\n") {
            Some(i) => (i, 2),
            None => return respond(StatusCode::BAD_GATEWAY, &[], "bad CGI output\n"),
        },
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut status = StatusCode::OK;
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("status") {
            status = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
        } else {
            headers.push((k.to_string(), v.to_string()));
        }
    }
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    respond(status, &h, raw[head_end + sep..].to_vec())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A throwaway CA and a certificate for 127.0.0.1/localhost signed by it.
pub(crate) fn tls_config() -> Result<(String, rustls::ServerConfig)> {
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
        .push(rcgen::DnType::CommonName, "flotilla test git CA");
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
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), config))
}

/// TLS over a TCP listener, for `axum::serve`; failed handshakes are skipped.
struct TlsListener {
    inner: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.inner.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
