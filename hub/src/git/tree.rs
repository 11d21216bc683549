//! Reading the tree of a fetched commit: every entry's name is listed, the bundle
//! directories are chosen from the names alone, and only their files are read,
//! after their sizes (from the object headers) passed the limits.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_shared::bundle::{bundle_dirs, bundle_files};
use gix::bstr::ByteSlice;
use gix::objs::tree::EntryKind;

use super::{chain, format_size, scrub, GitError, Limits, MAX_TREE_ENTRIES};

/// Longest path taken from a tree: Linux's PATH_MAX, beyond which no renderer could
/// write the file; it also bounds what a deep chain of nested trees costs.
const MAX_PATH_BYTES: usize = 4096;

/// The files of the bundle directories of `tree` (the commit `commit`), chosen by
/// `paths` as [`bundle_dirs`] does, within `limits`.
pub(super) fn read(
    repo: &gix::Repository,
    tree: &gix::Tree<'_>,
    commit: &str,
    paths: &[String],
    limits: &Limits,
    url: &str,
    shown: &str,
) -> Result<BTreeMap<String, Vec<u8>>, GitError> {
    let limit = |reason: String| GitError::Limit {
        url: shown.to_string(),
        commit: commit.to_string(),
        reason,
    };
    let read_err = |what: &str, e: &dyn std::error::Error| GitError::Read {
        url: shown.to_string(),
        what: format!("{what} at {commit}"),
        reason: scrub(&chain(e), url, shown),
    };
    let listed = list(repo, tree, &limit, &read_err)?;
    let names: Vec<String> = listed.keys().cloned().collect();
    let dirs = bundle_dirs(&names, paths).map_err(|e| GitError::BadPaths {
        url: shown.to_string(),
        reason: e.to_string(),
    })?;
    let chosen: BTreeSet<&str> = dirs
        .iter()
        .flat_map(|d| bundle_files(&names, d, &dirs))
        .map(|(full, _)| full)
        .collect();
    if let Some(path) = chosen.iter().nth(limits.max_files) {
        return Err(limit(format!(
            "more than {} files in the source's bundle directories (the limit, \
             flotilla-hub --git-max-files); {path} is one too many",
            limits.max_files
        )));
    }
    let mut total = 0u64;
    for path in &chosen {
        let size = repo
            .find_header(listed[*path])
            .map_err(|e| read_err(path, &e))?
            .size();
        if size > limits.max_file_bytes {
            return Err(limit(format!(
                "file {path} is {}, over the limit of {} per file (flotilla-hub --git-max-file-size)",
                format_size(size),
                format_size(limits.max_file_bytes)
            )));
        }
        total = total.saturating_add(size);
        if total > limits.max_snapshot_bytes {
            return Err(limit(format!(
                "the files of the source's bundle directories are over the limit of {} per \
                 snapshot (flotilla-hub --git-max-snapshot-size), reached at {path}",
                format_size(limits.max_snapshot_bytes)
            )));
        }
    }
    let mut files = BTreeMap::new();
    for path in chosen {
        let blob = repo
            .find_blob(listed[path])
            .map_err(|e| read_err(path, &e))?
            .detach();
        files.insert(path.to_string(), blob.data);
    }
    Ok(files)
}

/// Every regular and executable file of the tree, by path. Directories are walked;
/// submodules and symlinks are not content we deploy; names a checkout could not
/// hold (empty, `.`, `..`, `.git`, with a `/`) are skipped.
fn list(
    repo: &gix::Repository,
    root: &gix::Tree<'_>,
    limit: &dyn Fn(String) -> GitError,
    read_err: &dyn Fn(&str, &dyn std::error::Error) -> GitError,
) -> Result<BTreeMap<String, gix::ObjectId>, GitError> {
    let mut out = BTreeMap::new();
    let mut entries = 0usize;
    let mut pending: Vec<(String, gix::ObjectId)> = vec![(String::new(), root.id)];
    while let Some((dir, id)) = pending.pop() {
        let what = if dir.is_empty() {
            "the root tree"
        } else {
            &dir
        };
        let tree = repo.find_tree(id).map_err(|e| read_err(what, &e))?;
        let decoded = tree.decode().map_err(|e| read_err(what, &e))?;
        for entry in decoded.entries {
            entries += 1;
            if entries > MAX_TREE_ENTRIES {
                return Err(limit(format!(
                    "its tree has more than {MAX_TREE_ENTRIES} entries"
                )));
            }
            let name = entry.filename.to_str_lossy();
            if name.is_empty()
                || name == "."
                || name == ".."
                || name == ".git"
                || name.contains('/')
            {
                continue;
            }
            let path = if dir.is_empty() {
                name.into_owned()
            } else {
                format!("{dir}/{name}")
            };
            if path.len() > MAX_PATH_BYTES {
                return Err(limit(format!(
                    "a path is longer than {MAX_PATH_BYTES} bytes ({}...)",
                    path.chars().take(80).collect::<String>()
                )));
            }
            match entry.mode.kind() {
                EntryKind::Tree => pending.push((path, entry.oid.to_owned())),
                EntryKind::Blob | EntryKind::BlobExecutable => {
                    out.insert(path, entry.oid.to_owned());
                }
                EntryKind::Commit | EntryKind::Link => {}
            }
        }
    }
    Ok(out)
}
