//! A server that accepts connections and never answers, as a hung Git remote does:
//! plain TCP (a `git://` server that says nothing, or an `https://` one that never
//! answers the TLS handshake), or TLS that completes the handshake and then never
//! answers the HTTP request. It reads what the client sends and counts connections
//! accepted and closed by the client, so a test sees when an attempt was stopped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::AsyncReadExt;

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

/// The server; stops when dropped (its runtime is shut down, closing every
/// connection it holds).
pub struct HungServer {
    pub port: u16,
    /// With TLS: the PEM of the CA that signed its certificate.
    pub ca_file: Option<PathBuf>,
    counts: Arc<Counts>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HungServer {
    /// Accepts TCP connections and never writes a byte.
    pub fn tcp() -> Result<HungServer> {
        Self::start(None)
    }

    /// Completes TLS handshakes (certificate for 127.0.0.1 from a CA written to
    /// `dir/hung-ca.pem`), then never writes a byte.
    pub fn tls(dir: &Path) -> Result<HungServer> {
        let (ca_pem, config) = crate::githttp::tls_config()?;
        let ca_file = dir.join("hung-ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        let mut s = Self::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))?;
        s.ca_file = Some(ca_file);
        Ok(s)
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Result<HungServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(Counts::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime for the hung server")?;
        let shared = counts.clone();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        shared.accepted.fetch_add(1, Ordering::SeqCst);
                        let counts = shared.clone();
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 16 << 10];
                            match tls {
                                None => {
                                    let mut tcp = tcp;
                                    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                                }
                                Some(acceptor) => {
                                    if let Ok(mut s) = acceptor.accept(tcp).await {
                                        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                                    }
                                }
                            }
                            counts.closed.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = rx => {}
                }
            });
        });
        Ok(HungServer {
            port,
            ca_file: None,
            counts,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Connections the client closed so far.
    pub fn closed(&self) -> usize {
        self.counts.closed.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.accepted().saturating_sub(self.closed())
    }
}

impl Drop for HungServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
