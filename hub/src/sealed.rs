//! Secrets at rest: the hub's key file (`DATA_DIR/secrets.key`) and the sealing
//! of secret records with ChaCha20-Poly1305 (ring). A sealed value names the key
//! that sealed it, so a key can be rotated: a new key is added and seals from
//! then on, every record is sealed again, and the old key is dropped.
//!
//! The key file is text, one key a line: `<id> <base64 of 32 bytes>`; the last
//! line seals, every line opens. Lines starting with `#` are comments.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::Rng as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use serde::{Deserialize, Serialize};

/// Bytes of a key id (8 hex digits): enough to tell a handful of keys apart.
const KEY_ID_LEN: usize = 4;
/// Bound into every seal next to the record's name, so a sealed value cannot be
/// moved to another record or read as something else.
const AAD_PREFIX: &[u8] = b"flotilla secret v1\0";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    KeyFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0}: no key in the file")]
    NoKey(PathBuf),
    #[error("sealed with key {0}, which the key file no longer holds")]
    UnknownKey(String),
    #[error("cannot open the sealed value (wrong key, or the record was altered)")]
    Open,
    #[error("invalid sealed value: {0}")]
    Format(String),
}

/// A sealed value as stored: the key id, a random nonce and the ciphertext with
/// its tag (both base64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key: String,
    pub nonce: String,
    pub data: String,
}

struct Key {
    id: String,
    raw: [u8; 32],
    aead: LessSafeKey,
}

/// The hub's keys: every one opens, the last one seals. `Debug` shows key ids only.
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| &k.id))
            .finish()
    }
}

fn new_key() -> Key {
    let mut raw = [0u8; 32];
    rand::rng().fill(&mut raw);
    let id = hex::encode(rand::rng().random::<[u8; KEY_ID_LEN]>());
    key(id, raw)
}

fn key(id: String, raw: [u8; 32]) -> Key {
    // 32 bytes is exactly ChaCha20-Poly1305's key length: this cannot fail.
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, &raw).unwrap_or_else(|_| unreachable!());
    Key {
        id,
        raw,
        aead: LessSafeKey::new(unbound),
    }
}

fn aad(name: &str) -> Vec<u8> {
    [AAD_PREFIX, name.as_bytes()].concat()
}

impl Keyring {
    /// A ring with one new key, not saved (tests).
    pub fn generate() -> Keyring {
        Keyring {
            keys: vec![new_key()],
        }
    }

    /// Reads the key file, or creates it (0600) with one new key.
    pub fn load_or_create(path: &Path) -> Result<Keyring, SealError> {
        if path.exists() {
            return Keyring::load(path);
        }
        let ring = Keyring::generate();
        ring.save(path)?;
        Ok(ring)
    }

    pub fn load(path: &Path) -> Result<Keyring, SealError> {
        let text = std::fs::read_to_string(path).map_err(|source| SealError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut keys: Vec<Key> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| SealError::KeyFile {
                path: path.to_path_buf(),
                line: i + 1,
                reason: reason.to_string(),
            };
            let (id, b64) = line
                .split_once(' ')
                .ok_or_else(|| bad("expected \"<id> <base64 key>\""))?;
            let raw: [u8; 32] = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("the key is not 32 bytes of base64"))?;
            if keys.iter().any(|k| k.id == id) {
                return Err(bad("duplicate key id"));
            }
            keys.push(key(id.to_string(), raw));
        }
        if keys.is_empty() {
            return Err(SealError::NoKey(path.to_path_buf()));
        }
        Ok(Keyring { keys })
    }

    /// Writes the key file atomically, 0600.
    pub fn save(&self, path: &Path) -> Result<(), SealError> {
        let mut text = String::from(
            "# Flotilla's secrets key: one key a line, \"<id> <base64>\"; the last one seals.\n\
             # Keep it with the store (a backup of one is useless without the other), 0600.\n",
        );
        for k in &self.keys {
            let _ = writeln!(
                text,
                "{} {}",
                k.id,
                base64::engine::general_purpose::STANDARD.encode(k.raw)
            );
        }
        crate::pki::write_private(path, text.as_bytes(), 0o600).map_err(|e| match e {
            crate::pki::PkiError::Io { path, source } => SealError::Io { path, source },
            other => SealError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(other.to_string()),
            },
        })
    }

    /// The id of the key that seals.
    pub fn current(&self) -> &str {
        // A ring is never empty: `load` refuses an empty file, the rest add keys.
        self.keys.last().map(|k| k.id.as_str()).unwrap_or_default()
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    /// Adds a new key, which seals from now on; the others still open.
    pub fn add_key(&mut self) -> &str {
        self.keys.push(new_key());
        self.current()
    }

    /// Drops every key but the current one.
    pub fn retire_old_keys(&mut self) {
        let n = self.keys.len();
        self.keys.drain(..n.saturating_sub(1));
    }

    /// Seals `plain` for the record `name` with the current key.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Sealed {
        let Some(k) = self.keys.last() else {
            unreachable!("a keyring always holds a key")
        };
        let nonce: [u8; NONCE_LEN] = rand::rng().random();
        let mut data = plain.to_vec();
        // Random 96-bit nonces: safe for far more seals than a hub makes (a
        // collision is likely only after about 2^48 under one key).
        k.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(name)),
                &mut data,
            )
            .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 seals any length a hub stores"));
        let b64 = base64::engine::general_purpose::STANDARD;
        Sealed {
            key: k.id.clone(),
            nonce: b64.encode(nonce),
            data: b64.encode(data),
        }
    }

    /// Opens what [`Keyring::seal`] sealed for `name`.
    pub fn open(&self, name: &str, sealed: &Sealed) -> Result<Vec<u8>, SealError> {
        let k = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key)
            .ok_or_else(|| SealError::UnknownKey(sealed.key.clone()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce: [u8; NONCE_LEN] = b64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| SealError::Format("bad nonce".into()))?;
        let mut data = b64
            .decode(&sealed.data)
            .map_err(|e| SealError::Format(e.to_string()))?;
        let plain = k
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(name)),
                &mut data,
            )
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

/// Where the key file lives in a data directory.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets.key")
}

/// `flotilla-hub rotate-secrets-key`: with the hub stopped, adds a new key (saved
/// first, next to the old ones), seals every secret again with it, then drops the
/// old keys. Interrupted, it leaves every secret readable (both keys are in the
/// file) and can simply be run again. Returns the new key id and the number of
/// secrets sealed again.
pub fn rotate(data_dir: &Path) -> anyhow::Result<(String, usize)> {
    use anyhow::Context as _;
    let path = key_path(data_dir);
    let mut ring = Keyring::load(&path).context("reading the secrets key")?;
    // The store first: it is locked while a hub runs, and nothing must change then.
    let store = crate::store::SledStore::open(&data_dir.join("store"))
        .context("opening the store (is the hub still running? stop it first)")?;
    let new = ring.add_key().to_string();
    ring.save(&path).context("saving the new key")?;
    let ring = std::sync::Arc::new(ring);
    let store = store
        .with_keyring(ring.clone())
        .context("reading the secrets")?;
    let n = store
        .reseal_secrets()
        .context("sealing the secrets again")?;
    crate::store::Store::flush(&store).context("flushing the store")?;
    drop(store);
    let mut ring = std::sync::Arc::try_unwrap(ring)
        .map_err(|_| anyhow::anyhow!("the keyring is still in use"))?;
    ring.retire_old_keys();
    ring.save(&path).context("dropping the old keys")?;
    Ok((new, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_the_name() {
        let ring = Keyring::generate();
        let s = ring.seal("git-creds", b"pa55word");
        assert_eq!(s.key, ring.current());
        assert!(!s.data.contains("pa55word"));
        assert_eq!(ring.open("git-creds", &s).unwrap(), b"pa55word");
        assert!(matches!(ring.open("other", &s), Err(SealError::Open)));
        let mut tampered = s.clone();
        tampered.data.replace_range(0..2, "AA");
        assert!(ring.open("git-creds", &tampered).is_err());
        let other = Keyring::generate();
        assert!(matches!(
            other.open("git-creds", &s),
            Err(SealError::UnknownKey(_))
        ));
        // Two seals of one value differ (fresh nonces).
        assert_ne!(ring.seal("git-creds", b"x"), ring.seal("git-creds", b"x"));
    }

    #[test]
    fn key_file_round_trip_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let ring = Keyring::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let sealed = ring.seal("a", b"v1");
        let mut again = Keyring::load_or_create(&path).unwrap();
        assert_eq!(again.ids(), ring.ids());
        assert_eq!(again.open("a", &sealed).unwrap(), b"v1");
        let old = again.current().to_string();
        let new = again.add_key().to_string();
        assert_ne!(old, new);
        assert_eq!(again.seal("a", b"v2").key, new);
        assert_eq!(
            again.open("a", &sealed).unwrap(),
            b"v1",
            "old keys still open"
        );
        again.retire_old_keys();
        assert_eq!(again.ids(), [new]);
        assert!(matches!(
            again.open("a", &sealed),
            Err(SealError::UnknownKey(_))
        ));
        std::fs::write(&path, "# only a comment\n").unwrap();
        assert!(matches!(Keyring::load(&path), Err(SealError::NoKey(_))));
        std::fs::write(&path, "k1 c2hvcnQ=\n").unwrap();
        let err = Keyring::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("32 bytes"), "{err}");
    }
}
