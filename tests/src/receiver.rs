//! A real HTTP receiver for notifications on loopback: it records every request
//! (path, headers, body) and answers as the test says: 200 by default, a given
//! status for the next N requests, or no answer at all (a hub killed while it
//! waits is "mid-delivery").

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::Result;
use serde_json::Value;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Lowercase names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// What it was answered (`None`: held, never answered).
    pub answered: Option<u16>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    Hold,
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    plan: VecDeque<Answer>,
    released: bool,
}

pub struct Receiver {
    pub port: u16,
    inner: Arc<(Mutex<Inner>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start() -> Result<Receiver> {
        let (port, listener) = crate::bind_free()?;
        let inner: Arc<(Mutex<Inner>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (inner, stop) = (inner.clone(), stop.clone());
            move || serve(listener, inner, stop)
        });
        Ok(Receiver {
            port,
            inner,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The next `n` requests are answered `status`.
    pub fn answer_next(&self, n: usize, status: u16) {
        let mut i = self.lock();
        for _ in 0..n {
            i.plan.push_back(Answer::Status(status));
        }
    }

    /// The next request is recorded and never answered, until [`Receiver::release`].
    pub fn hold_next(&self) {
        let mut i = self.lock();
        i.released = false;
        i.plan.push_back(Answer::Hold);
    }

    /// Lets held requests go (their connections are closed unanswered).
    pub fn release(&self) {
        self.lock().released = true;
        self.inner.1.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, inner: Arc<(Mutex<Inner>, Condvar)>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let inner = inner.clone();
        std::thread::spawn(move || {
            let _ = handle(conn, &inner);
        });
    }
}

fn handle(mut conn: TcpStream, inner: &(Mutex<Inner>, Condvar)) -> Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let (lock, cv) = inner;
    let mut i = lock.lock().unwrap_or_else(|p| p.into_inner());
    let answer = i.plan.pop_front().unwrap_or(Answer::Status(200));
    let answered = match answer {
        Answer::Status(s) => Some(s),
        Answer::Hold => None,
    };
    i.received.push(Received {
        path,
        headers,
        body,
        answered,
    });
    match answer {
        Answer::Hold => {
            while !i.released {
                i = cv.wait(i).unwrap_or_else(|p| p.into_inner());
            }
            Ok(())
        }
        Answer::Status(s) => {
            drop(i);
            let text = format!(
                "HTTP/1.1 {s} X\r\ncontent-length: 2\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nok"
            );
            conn.write_all(text.as_bytes())?;
            Ok(())
        }
    }
}
