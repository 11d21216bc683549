//! The render sandbox: how the hub runs `helm` and `kustomize` on repository
//! content, which whoever can push to a repository writes, while the hub holds the
//! fleet CA key and every credential. What the tools are given is checked first
//! (`flotilla_shared::sandbox`, `flotilla_shared::kustomization`); here each tool
//! runs with an environment of its own — none of the hub's variables, a fresh
//! `HOME`, XDG and Helm directories in the render's temporary directory, no Git
//! system or global config, proxy variables naming a loopback port nothing
//! listens on — and, where the kernel allows unprivileged user namespaces, in a
//! network namespace of its own with no interface up, so any network attempt
//! fails at once. A Helm render of a chart from an allowed repository
//! (`--helm-repo-allow`) needs the network: it runs outside the network
//! namespace, with the allowed hosts exempt from the dead proxy.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The `PATH` the tools get: the system's directories only (helm and kustomize are
/// run by absolute path; nothing they might start should come from elsewhere).
const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What protects the hub while a render tool runs, decided once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protections {
    /// Renders run in their own user and network namespaces (no interface up).
    pub network_namespace: bool,
    /// The loopback port the proxy variables name: bound by the hub, never
    /// listened on, so a connection to it is refused at once.
    pub dead_proxy_port: u16,
}

/// The network a render may use.
#[derive(Debug, Clone, Copy)]
pub enum Network<'a> {
    /// None at all (every render of the bundle's own files).
    None,
    /// Only these hosts (a chart from an allowed repository); the rest goes to the
    /// dead proxy.
    Hosts(&'a [String]),
}

/// Holds the dead proxy port for the life of the process: bound, not listening.
static DEAD_PORT: OnceLock<Option<tokio::net::TcpSocket>> = OnceLock::new();
static PROTECTIONS: OnceLock<Protections> = OnceLock::new();

fn dead_port() -> u16 {
    let socket = DEAD_PORT.get_or_init(|| {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        s.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .ok()?;
        Some(s)
    });
    socket
        .as_ref()
        .and_then(|s| s.local_addr().ok())
        .map(|a| a.port())
        // The discard port: closed on any machine that does not run inetd.
        .unwrap_or(9)
}

/// The protections in force, probed on first use: whether a child can enter new
/// user and network namespaces (unprivileged user namespaces may be disabled by
/// the kernel, a container runtime or a seccomp profile).
pub fn protections() -> Protections {
    *PROTECTIONS.get_or_init(|| Protections {
        network_namespace: probe_network_namespace(),
        dead_proxy_port: dead_port(),
    })
}

fn probe_network_namespace() -> bool {
    for program in ["/bin/true", "/usr/bin/true"] {
        let mut cmd = std::process::Command::new(program);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        enter_empty_network(&mut cmd);
        match cmd.spawn() {
            Ok(mut child) => return child.wait().is_ok_and(|s| s.success()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Makes `cmd` enter a new user namespace (no privilege on the host: unmapped
/// ids, so it acts as the hub's user) and a new network namespace (only a
/// loopback interface, down) between fork and exec.
#[allow(unsafe_code)]
fn enter_empty_network(cmd: &mut std::process::Command) {
    use rustix::thread::UnshareFlags;
    use std::os::unix::process::CommandExt;
    // SAFETY (reviewed exception to the crate's `deny(unsafe_code)`): the hook runs
    // in the forked child before exec, where only async-signal-safe work is
    // allowed. It makes one raw system call (rustix's linux_raw `unshare`), which
    // allocates nothing, takes no lock and touches no memory shared with the
    // parent. The child is single-threaded, as CLONE_NEWUSER requires, and
    // CLONE_FILES is not used, so no descriptor table is split (the condition of
    // `unshare_unsafe`).
    unsafe {
        cmd.pre_exec(|| {
            rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER | UnshareFlags::NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}

/// Logs, once, which protections renders run under.
pub fn log_protections(helm_repo_allow: &[String]) {
    let p = protections();
    tracing::info!(
        network_namespace = p.network_namespace,
        dead_proxy_port = p.dead_proxy_port,
        helm_repo_allow = ?helm_repo_allow,
        "render sandbox: repository content is checked before rendering; helm and kustomize run with a clean environment{}",
        if p.network_namespace {
            " in a network namespace of their own (charts from allowed repositories excepted)"
        } else {
            "; no network namespace (the kernel refuses unprivileged user namespaces): only the checks and the dead proxy stop network access"
        }
    );
}

/// The program to run: a bare name is looked up in the hub's `PATH` (the child
/// gets a minimal one).
pub fn resolve(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| program.to_path_buf())
}

/// The host of `host[:port]`, as `NO_PROXY` matches it.
fn host_only(host_port: &str) -> &str {
    match host_port.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    }
}

/// The environment of a render tool whose temporary directory is `tmp`.
pub fn environment(tmp: &Path, network: Network) -> std::io::Result<Vec<(String, OsString)>> {
    let home = tmp.join("home");
    let helm = tmp.join("helm");
    let tmpdir = tmp.join("tmp");
    for d in [&home, &helm, &tmpdir] {
        std::fs::create_dir_all(d)?;
    }
    let p = |p: PathBuf| p.into_os_string();
    let proxy = format!("http://127.0.0.1:{}", protections().dead_proxy_port);
    let no_proxy = match network {
        Network::None => String::new(),
        Network::Hosts(prefixes) => prefixes
            .iter()
            .filter_map(|u| flotilla_shared::sandbox::url_host(u))
            .map(host_only)
            .collect::<Vec<_>>()
            .join(","),
    };
    let mut env: Vec<(String, OsString)> = vec![
        ("PATH".into(), CHILD_PATH.into()),
        ("HOME".into(), p(home.clone())),
        ("TMPDIR".into(), p(tmpdir)),
        ("XDG_CONFIG_HOME".into(), p(home.join(".config"))),
        ("XDG_CACHE_HOME".into(), p(home.join(".cache"))),
        ("XDG_DATA_HOME".into(), p(home.join(".local/share"))),
        ("HELM_CACHE_HOME".into(), p(helm.join("cache"))),
        ("HELM_CONFIG_HOME".into(), p(helm.join("config"))),
        ("HELM_DATA_HOME".into(), p(helm.join("data"))),
        ("HELM_PLUGINS".into(), p(helm.join("plugins"))),
        ("HELM_REGISTRY_CONFIG".into(), p(helm.join("registry.json"))),
        (
            "HELM_REPOSITORY_CONFIG".into(),
            p(helm.join("repositories.yaml")),
        ),
        ("HELM_REPOSITORY_CACHE".into(), p(helm.join("repository"))),
        ("HELM_NO_PLUGINS".into(), "1".into()),
        ("KUBECONFIG".into(), p(home.join("no-kubeconfig"))),
        (
            "KUSTOMIZE_PLUGIN_HOME".into(),
            p(home.join("kustomize-plugins")),
        ),
        ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
    ];
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        env.push((k.into(), proxy.clone().into()));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.push((k.into(), no_proxy.clone().into()));
    }
    Ok(env)
}

/// Puts `cmd` in the sandbox: the environment of [`environment`] and nothing
/// else, and for `Network::None` the empty network namespace where available.
pub fn confine(
    cmd: &mut tokio::process::Command,
    tmp: &Path,
    network: Network,
) -> std::io::Result<()> {
    cmd.env_clear();
    cmd.envs(environment(tmp, network)?);
    if matches!(network, Network::None) && protections().network_namespace {
        enter_empty_network(cmd.as_std_mut());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_holds_nothing_of_the_hubs() {
        let tmp = tempfile::tempdir().unwrap();
        let env = environment(tmp.path(), Network::None).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("PATH").unwrap(), CHILD_PATH);
        assert!(Path::new(&get("HOME").unwrap()).starts_with(tmp.path()));
        assert!(Path::new(&get("HELM_PLUGINS").unwrap()).starts_with(tmp.path()));
        assert_eq!(get("NO_PROXY").unwrap(), "");
        let proxy = get("HTTPS_PROXY").unwrap();
        assert!(proxy.to_string_lossy().starts_with("http://127.0.0.1:"));
        // Nothing listens on the dead proxy port.
        let port = protections().dead_proxy_port;
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        let allow = vec!["https://charts.example.com:8443/stable".to_string()];
        let env = environment(tmp.path(), Network::Hosts(&allow)).unwrap();
        let no = env.iter().find(|(n, _)| n == "NO_PROXY").unwrap();
        assert_eq!(no.1, "charts.example.com");
    }

    #[tokio::test]
    async fn the_tools_get_none_of_the_hubs_environment() {
        let env = Path::new("/usr/bin/env");
        if !env.exists() {
            eprintln!("skipping: no /usr/bin/env");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut cmd = tokio::process::Command::new(env);
        confine(&mut cmd, tmp.path(), Network::None).unwrap();
        let out = cmd.output().await.unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let mine = environment(tmp.path(), Network::None).unwrap();
        for line in text.lines() {
            let name = line.split('=').next().unwrap();
            assert!(
                mine.iter().any(|(n, _)| n == name),
                "{name} reached the tool from the hub's environment"
            );
        }
        // The hub's own variables (cargo sets these for tests) are not there.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        assert!(!text.contains("CARGO_PKG_NAME"));
    }

    #[tokio::test]
    async fn without_the_network_nothing_connects() {
        // bash's /dev/tcp makes a plain connect(2), as a tool would.
        let bash = Path::new("/bin/bash");
        if !bash.exists() {
            eprintln!("skipping: no /bin/bash");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let tmp = tempfile::tempdir().unwrap();
        let connect = |network: Network| {
            let mut cmd = tokio::process::Command::new(bash);
            cmd.arg("-c")
                .arg(format!("echo hi > /dev/tcp/127.0.0.1/{port}"))
                .stderr(std::process::Stdio::null());
            confine(&mut cmd, tmp.path(), network).unwrap();
            cmd.status()
        };
        let accepted = || listener.accept().is_ok();
        if protections().network_namespace {
            assert!(!connect(Network::None).await.unwrap().success());
            assert!(
                !accepted(),
                "a sandboxed render reached the host's loopback"
            );
        } else {
            eprintln!("no network namespace here: only the control half runs");
        }
        // The control: outside the namespace the same connection is made.
        assert!(connect(Network::Hosts(&[])).await.unwrap().success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !accepted() {
            assert!(
                std::time::Instant::now() < deadline,
                "the control never connected"
            );
            tokio::task::yield_now().await;
        }
    }
}
