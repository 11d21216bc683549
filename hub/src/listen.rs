//! The HTTP listeners (the admin API, the webhook): TLS with the hub's serving
//! certificate or the operator's, and plain HTTP only between loopback addresses.
//! The first byte of a connection tells which one the client speaks (a TLS record
//! starts with 0x16, an HTTP request with a method's letter); a plain request that
//! is not allowed gets a plain-text 400 telling to use `https://`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// The first byte of every TLS connection: the record type of the ClientHello
/// (handshake, RFC 8446 §5.1).
pub const TLS_HANDSHAKE: u8 = 0x16;
/// A client that neither speaks nor finishes its handshake within this is stuck
/// or hostile; its connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being sniffed or shaken hands with at once. Beyond, new ones wait
/// in the kernel's backlog: a flood of idle connections costs a bounded amount.
const MAX_HANDSHAKES: usize = 256;
/// Accepted connections waiting for the HTTP server to pick them up.
const QUEUE: usize = 64;
/// How much of a refused plain request is read before answering, so the answer
/// is not lost to a TCP reset over unread data.
const REFUSAL_READ_LIMIT: usize = 16 * 1024;

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Tls,
    Plain,
    /// Plain HTTP where only TLS is served.
    Refuse,
}

/// How to serve a connection from its first byte, the listener's address and
/// the peer's. TLS always; plain HTTP only when the listener is bound to a
/// loopback address *and* the peer is on loopback (a packet forged to 127.0.0.1
/// from a neighbour, as `route_localnet` allows, still shows its own source).
pub fn admit(first_byte: u8, listener: IpAddr, peer: IpAddr) -> Admit {
    if first_byte == TLS_HANDSHAKE {
        Admit::Tls
    } else if is_loopback(listener) && is_loopback(peer) {
        Admit::Plain
    } else {
        Admit::Refuse
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        IpAddr::V4(v4) => v4.is_loopback(),
    }
}

/// The TLS configuration of an HTTP listener: TLS 1.2 and 1.3 (browsers and
/// curl), ring, HTTP/1.1, no client certificates (the admin token authenticates).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Reads an operator's certificate chain and private key (PEM files).
pub fn load_cert_and_key(
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use anyhow::Context as _;
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: invalid certificate PEM", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in the file", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: no readable private key", key.display()))?;
    Ok((chain, key))
}

/// A plain or TLS connection, as the HTTP server reads it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The peer of a connection, for handlers (`ConnectInfo<Peer>`), and whether
/// it speaks TLS (the web UI's cookie is `Secure` then).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr, pub bool);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener>) -> Peer {
        Peer(*stream.remote_addr(), matches!(stream.io(), Conn::Tls(_)))
    }
}

/// A listener for `axum::serve`: an accept loop in its own task sniffs and shakes
/// hands with each connection concurrently (one slow client never holds up the
/// others) and queues the ready ones.
pub struct HttpListener {
    ready: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
    accept: JoinHandle<()>,
}

impl HttpListener {
    /// `what` names the listener in logs (`api`, `webhook`).
    pub fn new(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        what: &'static str,
    ) -> io::Result<HttpListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(QUEUE);
        let accept = tokio::spawn(accept_loop(listener, local, tls, tx, what));
        Ok(HttpListener {
            ready,
            local,
            accept,
        })
    }
}

impl Drop for HttpListener {
    fn drop(&mut self) {
        // Frees the port; connections being sniffed end as their queue closes.
        self.accept.abort();
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop is gone (it only ends when aborted): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    local: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    ready: mpsc::Sender<(Conn, SocketAddr)>,
    what: &'static str,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, or a connection reset before accept:
                // wait a little rather than spin.
                tracing::debug!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                admit_conn(tcp, local, peer, &acceptor),
            )
            .await
            {
                Ok(Ok(Some(conn))) => conn,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(listener = what, peer = %peer, error = %e, "connection dropped");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = what, peer = %peer, "handshake timed out");
                    return;
                }
            };
            let _ = ready.send((conn, peer)).await;
        });
    }
}

/// Sniffs, then shakes hands or refuses. `None`: nothing to serve.
async fn admit_conn(
    tcp: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> io::Result<Option<Conn>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    match admit(first[0], local.ip(), peer.ip()) {
        Admit::Tls => Ok(Some(Conn::Tls(Box::new(acceptor.accept(tcp).await?)))),
        Admit::Plain => Ok(Some(Conn::Plain(tcp))),
        Admit::Refuse => {
            tracing::info!(peer = %peer, listener = %local, "plain HTTP refused: TLS only on this address");
            refuse_plain(tcp, local).await?;
            Ok(None)
        }
    }
}

/// Answers a plain HTTP request on a TLS-only address with a 400 that says what
/// to do, as a human (curl) or the CLI would read it.
async fn refuse_plain(mut tcp: TcpStream, local: SocketAddr) -> io::Result<()> {
    let mut seen = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while seen.len() < REFUSAL_READ_LIMIT && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let body = format!(
        "this address serves HTTPS only: use https://{local}/ \
         (plain HTTP is accepted on loopback addresses only)\n"
    );
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(answer.as_bytes()).await?;
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_between_loopback_addresses() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert_eq!(admit(b'G', lo, lo), Admit::Plain);
        assert_eq!(admit(b'P', lo6, lo6), Admit::Plain);
        assert_eq!(admit(b'P', mapped, lo), Admit::Plain);
        assert_eq!(admit(b'G', lan, lan), Admit::Refuse);
        assert_eq!(
            admit(b'G', any, lo),
            Admit::Refuse,
            "a wildcard bind is not loopback"
        );
        assert_eq!(
            admit(b'G', lo, lan),
            Admit::Refuse,
            "a neighbour's packet forged to 127.0.0.1"
        );
        for (l, p) in [(lo, lo), (lan, lan), (any, lan)] {
            assert_eq!(admit(TLS_HANDSHAKE, l, p), Admit::Tls);
        }
    }
}
