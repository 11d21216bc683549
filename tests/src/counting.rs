//! A TCP proxy on loopback that counts the bytes it carries each way, to measure
//! what the hub sends an agent on the wire (TLS records, HTTP/2 frames and all).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The proxy's port and its counters; the accept task ends with the runtime.
pub struct CountingProxy {
    pub port: u16,
    /// Bytes from the upstream (the hub) to clients.
    pub down: Arc<AtomicU64>,
    /// Bytes from clients to the upstream.
    pub up: Arc<AtomicU64>,
}

impl CountingProxy {
    /// Proxies 127.0.0.1:<new port> to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> Result<CountingProxy> {
        let (port, listener) = crate::bind_free()?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let down = Arc::new(AtomicU64::new(0));
        let up = Arc::new(AtomicU64::new(0));
        let (d, u) = (down.clone(), up.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(sr, cw, d.clone()));
                tokio::spawn(pump(cr, sw, u.clone()));
            }
        });
        Ok(CountingProxy { port, down, up })
    }

    /// (down, up) byte counts so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.down.load(Ordering::SeqCst),
            self.up.load(Ordering::SeqCst),
        )
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
