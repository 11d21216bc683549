//! The hub's signing key for desired sets, in `DATA/signing/`:
//! - `key.pk8`: the current ed25519 key (PKCS#8, 0600);
//! - `chain.json`: every rotation so far, each new public key endorsed by the
//!   key before it (public; agents that pin an older key follow it);
//! - `seq`: a reservation of set sequence numbers, so that seqs only grow across
//!   restarts and crashes.
//!
//! Rotating writes the new key beside the current one (`key.pk8.next`), appends
//! its endorsement to the chain, then renames it over the current key: a crash at
//! any point leaves either the old key (the endorsement not yet written: the next
//! key is dropped) or the new one with its endorsement. The old private key is
//! gone after a rotation; nothing signs with it again.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use base64::Engine;
use flotilla_shared::signing::{Acks, Endorsement, Envelope, SetBundle, SignedSet, SigningKey};
use serde::{Deserialize, Serialize};

use crate::pki::write_private;

/// Seqs reserved at once: one fsync per this many sets signed.
const RESERVE: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> SignerError {
    SignerError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[derive(Serialize, Deserialize)]
struct ChainEntry {
    public_key: String,
    endorsed_by: String,
    signature: String,
}

struct Keys {
    key: SigningKey,
    chain: Vec<Endorsement>,
}

struct Seq {
    last: u64,
    /// Reserved on disk: no seq above it was handed out.
    reserved: u64,
}

/// Signs desired sets for the gateway and for exports.
pub struct Signer {
    dir: PathBuf,
    keys: RwLock<Keys>,
    seq: Mutex<Seq>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("dir", &self.dir).finish()
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn read_chain(path: &Path) -> Result<Vec<Endorsement>, SignerError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let entries: Vec<ChainEntry> = serde_json::from_slice(&text).map_err(|e| file_err(path, e))?;
    entries
        .into_iter()
        .map(|e| {
            Ok(Endorsement {
                public_key: B64.decode(&e.public_key).map_err(|x| file_err(path, x))?,
                endorsed_by: e.endorsed_by,
                signature: B64.decode(&e.signature).map_err(|x| file_err(path, x))?,
            })
        })
        .collect()
}

fn write_chain(path: &Path, chain: &[Endorsement]) -> Result<(), SignerError> {
    let entries: Vec<ChainEntry> = chain
        .iter()
        .map(|e| ChainEntry {
            public_key: B64.encode(&e.public_key),
            endorsed_by: e.endorsed_by.clone(),
            signature: B64.encode(&e.signature),
        })
        .collect();
    let text = serde_json::to_vec_pretty(&entries).map_err(|e| file_err(path, e))?;
    write_private(path, &text, 0o600).map_err(|e| file_err(path, e))
}

fn read_key(path: &Path) -> Result<SigningKey, SignerError> {
    let der = std::fs::read(path).map_err(|e| file_err(path, e))?;
    SigningKey::from_pkcs8(&der).map_err(|e| file_err(path, e))
}

impl Signer {
    /// Opens the signing directory under `data_dir`, creating a key on first use,
    /// and finishing (or undoing) a rotation a crash interrupted.
    pub fn load_or_create(data_dir: &Path, now_ms: u64) -> Result<Signer, SignerError> {
        let dir = data_dir.join("signing");
        std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
        let (key_path, next_path, chain_path) = (
            dir.join("key.pk8"),
            dir.join("key.pk8.next"),
            dir.join("chain.json"),
        );
        let chain = read_chain(&chain_path)?;
        if next_path.exists() {
            let next = read_key(&next_path);
            let endorsed = next
                .as_ref()
                .is_ok_and(|k| chain.last().is_some_and(|e| e.public_key == k.public_key()));
            if endorsed {
                std::fs::rename(&next_path, &key_path).map_err(|e| file_err(&key_path, e))?;
                tracing::info!("finished a signing-key rotation a restart interrupted");
            } else {
                std::fs::remove_file(&next_path).map_err(|e| file_err(&next_path, e))?;
                tracing::warn!("dropped a signing key whose rotation never completed");
            }
        }
        if !key_path.exists() {
            let der = SigningKey::generate_pkcs8().map_err(|e| file_err(&key_path, e))?;
            write_private(&key_path, &der, 0o600).map_err(|e| file_err(&key_path, e))?;
        }
        let key = read_key(&key_path)?;
        let seq_path = dir.join("seq");
        let reserved = match std::fs::read_to_string(&seq_path) {
            Ok(t) => t
                .trim()
                .parse::<u64>()
                .map_err(|e| file_err(&seq_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(file_err(&seq_path, e)),
        };
        let signer = Signer {
            dir,
            keys: RwLock::new(Keys { key, chain }),
            // Everything up to the reservation may have been handed out.
            seq: Mutex::new(Seq {
                last: reserved.max(now_ms),
                reserved: 0,
            }),
        };
        Ok(signer)
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current public key (what agents pin at enrolment).
    pub fn public_key(&self) -> Vec<u8> {
        self.keys().key.public_key()
    }

    pub fn key_id(&self) -> String {
        self.keys().key.id().to_string()
    }

    /// How many rotations the chain records.
    pub fn rotations(&self) -> usize {
        self.keys().chain.len()
    }

    /// The next set sequence number: above every one handed out before, across
    /// restarts, and never behind the clock (ms since the epoch), so that a hub
    /// restored from an old backup still signs newer sets than it did.
    pub fn next_seq(&self, now_ms: u64) -> Result<u64, SignerError> {
        let mut s = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let next = (s.last + 1).max(now_ms);
        if next > s.reserved {
            let upto = next + RESERVE;
            let path = self.dir.join("seq");
            write_private(&path, upto.to_string().as_bytes(), 0o600)
                .map_err(|e| file_err(&path, e))?;
            s.reserved = upto;
        }
        s.last = next;
        Ok(next)
    }

    /// Signs a set with the current key.
    pub fn sign(&self, set: SignedSet) -> Envelope {
        let keys = self.keys();
        keys.key.sign(set, &keys.chain)
    }

    /// Signs `cluster`'s desired set (bundle, content hash, revision) under the
    /// next seq, with the acknowledgements a file carries back. Returns the seq.
    pub fn sign_desired(
        &self,
        cluster: &str,
        bundles: &[(String, String, String)],
        acks: Option<Acks>,
        now_ms: u64,
    ) -> Result<(u64, Envelope), SignerError> {
        let seq = self.next_seq(now_ms)?;
        let envelope = self.sign(SignedSet {
            v: 1,
            cluster: cluster.to_string(),
            seq,
            complete: true,
            bundles: bundles
                .iter()
                .map(|(name, content_hash, revision)| SetBundle {
                    name: name.clone(),
                    content_hash: content_hash.clone(),
                    revision: revision.clone(),
                })
                .collect(),
            issued_at_unix_ms: now_ms as i64,
            key_id: String::new(),
            acks,
        });
        Ok((seq, envelope))
    }

    /// Replaces the signing key by a new one that the current one endorses.
    /// Returns (old id, new id).
    pub fn rotate(&self) -> Result<(String, String), SignerError> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let (key_path, next_path, chain_path) = (
            self.dir.join("key.pk8"),
            self.dir.join("key.pk8.next"),
            self.dir.join("chain.json"),
        );
        let der = SigningKey::generate_pkcs8().map_err(|e| file_err(&next_path, e))?;
        let next = SigningKey::from_pkcs8(&der).map_err(|e| file_err(&next_path, e))?;
        write_private(&next_path, &der, 0o600).map_err(|e| file_err(&next_path, e))?;
        let mut chain = keys.chain.clone();
        chain.push(keys.key.endorse(&next.public_key()));
        write_chain(&chain_path, &chain)?;
        std::fs::rename(&next_path, &key_path).map_err(|e| file_err(&key_path, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let old = keys.key.id().to_string();
        let new = next.id().to_string();
        *keys = Keys { key: next, chain };
        tracing::info!(old_key = %old, new_key = %new, "signing key rotated");
        Ok((old, new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::signing::verify;

    fn set(seq: u64) -> SignedSet {
        SignedSet {
            v: 1,
            cluster: "c".into(),
            seq,
            complete: true,
            bundles: vec![SetBundle {
                name: "b".into(),
                content_hash: "h".into(),
                revision: "r".into(),
            }],
            issued_at_unix_ms: 0,
            key_id: String::new(),
            acks: None,
        }
    }

    #[test]
    fn the_key_persists_and_seqs_grow_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(dir.path(), 1_000).unwrap();
        let pin = s.public_key();
        let a = s.next_seq(1_000).unwrap();
        let b = s.next_seq(1_000).unwrap();
        assert!(b > a && a >= 1_000);
        drop(s);
        // Restarted with a clock gone backwards: still above.
        let s = Signer::load_or_create(dir.path(), 10).unwrap();
        assert_eq!(s.public_key(), pin);
        assert!(s.next_seq(10).unwrap() > b);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("signing/key.pk8"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the private key is the hub's alone");
    }

    #[test]
    fn a_rotation_is_followed_by_agents_pinning_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(dir.path(), 0).unwrap();
        let pin = s.public_key();
        s.rotate().unwrap();
        s.rotate().unwrap();
        assert_eq!(s.rotations(), 2);
        let v = verify(&s.sign(set(5)), &pin, "c", None, false).unwrap();
        assert_eq!(v.new_pin, Some(s.public_key()));
        // The rotation survives a restart.
        let id = s.key_id();
        drop(s);
        let s = Signer::load_or_create(dir.path(), 0).unwrap();
        assert_eq!(s.key_id(), id);
        assert!(verify(&s.sign(set(6)), &pin, "c", None, false).is_ok());
    }

    #[test]
    fn an_interrupted_rotation_is_finished_or_undone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(dir.path(), 0).unwrap();
        let before = s.key_id();
        drop(s);
        // A next key without its endorsement: dropped.
        let next = dir.path().join("signing/key.pk8.next");
        std::fs::write(&next, SigningKey::generate_pkcs8().unwrap()).unwrap();
        let s = Signer::load_or_create(dir.path(), 0).unwrap();
        assert_eq!(s.key_id(), before);
        assert!(!next.exists());
    }
}
