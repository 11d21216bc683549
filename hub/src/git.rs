//! Fetching a Git source into a snapshot of its files (stub: the gix implementation
//! lands separately with exactly this interface).

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_shared::objects::GitRef;

/// Every blob of the tree at `commit`, by path relative to the repository root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("fetching {url}: Git support is not built into this hub yet")]
    Unsupported { url: String },
}

/// Fetches `git_ref` of `url` into `cache_dir` and reads the tree at that commit.
pub fn fetch_snapshot(url: &str, git_ref: &GitRef, cache_dir: &Path) -> Result<Snapshot, GitError> {
    let _ = (git_ref, cache_dir);
    Err(GitError::Unsupported {
        url: url.to_string(),
    })
}
