//! A real OCI registry on loopback: Debian's `docker-registry` (the CNCF
//! distribution server), in a temp dir, stopped by PID when dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::{free_port, wait_until, Proc};

/// Where Debian's package puts the server.
pub const BINARY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    pub port: u16,
    pub proc: Proc,
    pub root: PathBuf,
}

impl Registry {
    /// True when the package is installed (`make testenv` installs it).
    pub fn available() -> bool {
        Path::new(BINARY).exists()
    }

    /// Starts a registry storing under `dir`, without auth, on 127.0.0.1.
    pub fn start(dir: &Path) -> Result<Registry> {
        if !Self::available() {
            bail!("{BINARY} is missing: `make testenv` installs docker-registry");
        }
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let root = dir.join("storage");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                root.display()
            ),
        )?;
        let mut cmd = Command::new(BINARY);
        cmd.arg("serve").arg(&config);
        let proc = Proc::spawn("docker-registry", &mut cmd, &dir.join("registry.log"))?;
        wait_until("the registry listening", Duration::from_secs(30), || {
            Ok(TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(()))
        })?;
        Ok(Registry { port, proc, root })
    }

    /// `http://127.0.0.1:PORT/REPOSITORY`.
    pub fn url(&self, repository: &str) -> String {
        format!("http://127.0.0.1:{}/{repository}", self.port)
    }

    /// The blobs the registry stores (sha256 digests).
    pub fn blobs(&self) -> Vec<String> {
        let dir = self.root.join("docker/registry/v2/blobs/sha256");
        let mut out = Vec::new();
        for prefix in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            for blob in std::fs::read_dir(prefix.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(format!("sha256:{}", blob.file_name().to_string_lossy()));
            }
        }
        out
    }
}
