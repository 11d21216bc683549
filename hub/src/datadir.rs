//! The data directory's permissions: only the hub's user may read it. It holds
//! the CA key, the serving key, the admin token, the secrets key, the store and
//! the Git caches of private repositories, so it is 0700 and its files 0600.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What the hub creates: files 0600, directories 0700 (files that were
/// executable, as Git hooks in a cache may be, keep only the owner's bit).
const UMASK: u32 = 0o077;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct DataDirError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Makes everything this process creates from now on private to its user
/// (process-wide: threads share it). `flotilla-hub` calls it first thing.
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(
        UMASK as rustix::fs::RawMode,
    ));
}

/// Creates `dir` (0700) or tightens an existing one: the directory and every
/// directory below it become 0700 at most, every file loses its group and other
/// bits. Symbolic links are left alone (their target is not the hub's to change).
pub fn secure(dir: &Path) -> Result<(), DataDirError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataDirError { path, source }
    };
    fs::create_dir_all(dir).map_err(err(dir))?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        tighten(&d, 0o700).map_err(err(&d))?;
        for entry in fs::read_dir(&d).map_err(err(&d))? {
            let entry = entry.map_err(err(&d))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(err(&path))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                tighten(&path, 0o700).map_err(err(&path))?;
            }
        }
    }
    Ok(())
}

/// Clears the bits outside `keep`, if any are set.
fn tighten(path: &Path, keep: u32) -> io::Result<()> {
    let mode = fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o777 & !keep != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & keep))?;
    }
    Ok(())
}

/// Files and directories under `dir` that someone other than the owner may
/// read, write or enter (for tests and a start-up check).
pub fn exposed(dir: &Path) -> io::Result<Vec<(PathBuf, u32)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let meta = fs::symlink_metadata(&d)?;
        if meta.permissions().mode() & 0o077 != 0 {
            out.push((d.clone(), meta.permissions().mode() & 0o777));
        }
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let mode = entry.metadata()?.permissions().mode();
                if mode & 0o077 != 0 {
                    out.push((entry.path(), mode & 0o777));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_data_dir_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        fs::create_dir_all(dir.join("git/apps/objects")).unwrap();
        fs::write(dir.join("admin-token"), "t").unwrap();
        fs::write(dir.join("git/apps/objects/pack"), "p").unwrap();
        fs::write(dir.join("git/apps/hook"), "#!/bin/sh").unwrap();
        for (p, m) in [
            ("", 0o755),
            ("admin-token", 0o644),
            ("git/apps/objects", 0o777),
            ("git/apps/objects/pack", 0o666),
            ("git/apps/hook", 0o775),
        ] {
            fs::set_permissions(dir.join(p), fs::Permissions::from_mode(m)).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();
        assert!(exposed(&dir).unwrap().len() >= 5);
        secure(&dir).unwrap();
        assert_eq!(exposed(&dir).unwrap(), vec![]);
        let mode = |p: &str| fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("admin-token"), 0o600);
        assert_eq!(
            mode("git/apps/hook"),
            0o700,
            "the owner's execute bit stays"
        );
        assert_eq!(
            fs::metadata("/etc/passwd").unwrap().permissions().mode() & 0o044,
            0o044,
            "a link's target is not touched"
        );
        // A missing directory is created private.
        let fresh = root.path().join("fresh/data");
        secure(&fresh).unwrap();
        assert_eq!(
            fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
