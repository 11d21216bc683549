//! The running agent's control socket, `DIR/control.sock` (0600): how
//! `flotilla-agent import` and `export-status` reach an agent that holds the
//! store. One request per connection: a JSON line (`{"op": ...}`), then the
//! payload to end of stream; the answer is a JSON line (`{"ok", "message"}`),
//! then the payload.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::clock::SharedClock;
use crate::error::{Error, Result};
use crate::trust::Trust;
use crate::writer::Writer;

pub const SOCKET: &str = "control.sock";
/// The largest payload taken (a desired-state file).
const MAX_PAYLOAD: u64 = 1 << 30;
/// The longest request or answer line.
const MAX_LINE: u64 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Import {
        #[serde(default)]
        allow_downgrade: bool,
    },
    ExportStatus,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    message: String,
}

/// What the socket's handler needs of the running agent.
pub struct Control {
    pub writer: Writer,
    pub trust: Arc<Trust>,
    pub wake: Arc<Notify>,
    pub state_dir: PathBuf,
    pub clock: SharedClock,
    pub kube: kube::Client,
}

/// Binds the socket (replacing one a dead agent left: the store's lock says
/// this process is the only agent of the directory) with mode 0600 before it
/// is reachable under its name.
pub fn bind(state_dir: &Path) -> Result<UnixListener> {
    let path = state_dir.join(SOCKET);
    let tmp = state_dir.join(format!(".{SOCKET}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| Error::io(&tmp, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(listener)
}

impl Control {
    pub async fn serve(self, listener: UnixListener, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let this = this.clone();
                        tokio::spawn(async move {
                            if let Err(e) = this.handle(stream).await {
                                warn!(error = %e, "control request failed");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                _ = crate::stopped(&mut shutdown) => break,
            }
        }
        let _ = std::fs::remove_file(this.state_dir.join(SOCKET));
    }

    async fn handle(&self, stream: UnixStream) -> Result<()> {
        let (read, mut write) = stream.into_split();
        let (line, payload) = read_message(read)
            .await
            .map_err(|e| Error::Transfer(e.to_string()))?;
        let request: std::result::Result<Request, _> = serde_json::from_str(line.trim());
        let result = match request {
            Err(e) => Err(Error::Transfer(format!("bad control request: {e}"))),
            Ok(_) if payload.len() as u64 > MAX_PAYLOAD => Err(Error::Transfer(format!(
                "the payload is over {MAX_PAYLOAD} bytes"
            ))),
            Ok(Request::Import { allow_downgrade }) => {
                match crate::files::import(&self.writer, &self.trust, &payload, allow_downgrade)
                    .await
                {
                    Ok(message) => {
                        info!(%message, "desired state imported from a file");
                        self.wake.notify_one();
                        Ok((message, Vec::new()))
                    }
                    Err(e) => {
                        warn!(error = %e, "desired-state file refused");
                        Err(e)
                    }
                }
            }
            Ok(Request::ExportStatus) => {
                let version = self
                    .kube
                    .apiserver_version()
                    .await
                    .map(|v| v.git_version)
                    .unwrap_or_default();
                crate::files::export_status(
                    &self.writer,
                    &self.state_dir,
                    &self.trust.cluster,
                    self.clock.now_unix_ms(),
                    version,
                )
                .await
                .map(|bytes| (format!("{} bytes", bytes.len()), bytes))
            }
        };
        let (answer, bytes) = match result {
            Ok((message, bytes)) => (Answer { ok: true, message }, bytes),
            Err(e) => (
                Answer {
                    ok: false,
                    message: e.to_string(),
                },
                Vec::new(),
            ),
        };
        let mut out = serde_json::to_vec(&answer).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&bytes);
        write
            .write_all(&out)
            .await
            .map_err(|e| Error::Transfer(e.to_string()))?;
        let _ = write.shutdown().await;
        Ok(())
    }
}

/// Reads one message: a line (at most [`MAX_LINE`]), then the payload to end
/// of stream (one byte over [`MAX_PAYLOAD`] at most, so that an oversized one
/// is told from one at the limit).
async fn read_message(read: tokio::net::unix::OwnedReadHalf) -> std::io::Result<(String, Vec<u8>)> {
    let mut read = BufReader::new(read);
    let mut line = String::new();
    (&mut read).take(MAX_LINE).read_line(&mut line).await?;
    let mut payload = Vec::new();
    (&mut read)
        .take(MAX_PAYLOAD + 1)
        .read_to_end(&mut payload)
        .await?;
    Ok((line, payload))
}

/// Sends a request to the agent running in `state_dir`; `None` when none runs.
/// An agent's refusal is an error with its message.
pub async fn call(
    state_dir: &Path,
    request: &Request,
    payload: &[u8],
) -> Result<Option<(String, Vec<u8>)>> {
    let path = state_dir.join(SOCKET);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(request).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(payload);
    write
        .write_all(&out)
        .await
        .map_err(|e| Error::io(&path, e))?;
    write.shutdown().await.map_err(|e| Error::io(&path, e))?;
    let (line, bytes) = read_message(read).await.map_err(|e| Error::io(&path, e))?;
    let answer: Answer = serde_json::from_str(line.trim())
        .map_err(|e| Error::Transfer(format!("the agent's answer is unreadable: {e}")))?;
    if !answer.ok {
        return Err(Error::Transfer(answer.message));
    }
    Ok(Some((answer.message, bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever a local process writes to the socket gets an answer, never a
    /// crash, and a desired-state file that is not one is refused by name.
    #[tokio::test]
    async fn hostile_requests_are_answered_not_obeyed() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 1).unwrap();
        let (writer, _) = Writer::spawn(store).unwrap();
        let kube = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
            .unwrap();
        let control = Control {
            writer: writer.clone(),
            trust: Arc::new(Trust::load(dir.path(), "edge-1").unwrap()),
            wake: Arc::new(Notify::new()),
            state_dir: dir.path().to_path_buf(),
            clock: crate::clock::system(),
            kube,
        };
        let listener = bind(dir.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(SOCKET))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the socket is the agent user's alone");
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(control.serve(listener, stop_rx));

        let e = call(
            dir.path(),
            &Request::Import {
                allow_downgrade: false,
            },
            b"not a file",
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("not a Flotilla transfer file"),
            "{e}"
        );
        // A raw garbage line.
        let mut s = UnixStream::connect(dir.path().join(SOCKET)).await.unwrap();
        s.write_all(b"{\"op\":\"rm -rf\"}\njunk").await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.contains("\"ok\":false") && answer.contains("bad control request"),
            "{answer}"
        );
        // An export with no certificate says what to do.
        let e = call(dir.path(), &Request::ExportStatus, b"")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("enrol the agent first"), "{e}");
        // The store is untouched.
        assert!(writer.read(|s| s.desired()).await.unwrap().is_none());
    }
}
