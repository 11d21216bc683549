//! The agent's trust in its hub's desired sets: the signing key it pins
//! (`DIR/hub-signing.pub`, hex), and taking a set, from the network or a file,
//! only once it verifies. Verification is `flotilla_shared::signing`'s; this
//! module feeds it the pin and what the store holds, checks every content
//! against its digest, and stores the set (and only then moves the pin along a
//! rotation).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flotilla_proto::v1;
use flotilla_shared::signing::{self, Acks, Envelope, Refusal};
use prost::Message;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::store::{DesiredBundle, DesiredSet};
use crate::writer::Writer;

/// The pinned signing key, hex, in the state directory.
pub const PIN_FILE: &str = "hub-signing.pub";

/// Where a set came from: a file must be signed and whole; a network set from a
/// hub that has never signed (the agent was enrolled before signing) is taken as
/// before, and the first signed one pins its key (it came over TLS verified
/// against the pinned CA, as the key would at enrolment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Network,
    File { allow_downgrade: bool },
}

/// The pin, loaded once and moved along rotations.
pub struct Trust {
    dir: PathBuf,
    pub cluster: String,
    pin: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("cluster", &self.cluster)
            .field("pin", &self.pinned().map(|k| signing::key_id(&k)))
            .finish()
    }
}

/// Reads the pinned key from `dir`, if any.
pub fn load_pin(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = dir.join(PIN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .map(Some)
            .map_err(|e| Error::Config(format!("{}: not a hex key: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Pins `key` (32 bytes of ed25519 public key).
pub fn save_pin(dir: &Path, key: &[u8]) -> Result<()> {
    if key.len() != 32 {
        return Err(Error::Enrolment(format!(
            "the hub's signing key is {} bytes, not 32",
            key.len()
        )));
    }
    crate::enroll::write_atomic(dir, PIN_FILE, hex::encode(key).as_bytes(), 0o644)
}

/// What taking a set did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub seq: u64,
    pub bundles: usize,
    pub new_contents: usize,
    /// It was the set already held: nothing changed.
    pub same: bool,
    /// Bundles whose content neither came with the set nor was held.
    pub missing: Vec<String>,
}

impl Trust {
    pub fn load(dir: &Path, cluster: &str) -> Result<Trust> {
        Ok(Trust {
            dir: dir.to_path_buf(),
            cluster: cluster.to_string(),
            pin: Mutex::new(load_pin(dir)?),
        })
    }

    /// The pinned key; read again from disk while there is none (an agent
    /// running without a hub may be enrolled by file meanwhile).
    pub fn pinned(&self) -> Option<Vec<u8>> {
        let mut pin = self.pin.lock().unwrap_or_else(|e| e.into_inner());
        if pin.is_none() {
            *pin = load_pin(&self.dir).ok().flatten();
        }
        pin.clone()
    }

    fn set_pin(&self, key: &[u8]) -> Result<()> {
        save_pin(&self.dir, key)?;
        *self.pin.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.to_vec());
        Ok(())
    }

    /// Verifies `signed` with `contents`, stores them durably, and returns what it
    /// took. Nothing is stored unless every check passes.
    pub async fn take(
        &self,
        writer: &Writer,
        signed: Option<&v1::SignedDesired>,
        contents: &[v1::BundleContent],
        via: Via,
        legacy: Option<&v1::Desired>,
    ) -> Result<(Taken, Option<Acks>)> {
        let held = writer
            .read(|s| Ok(s.desired()?.and_then(|d| d.signed)))
            .await?;
        let mut pin = self.pinned();
        let envelope = match (signed, &pin, via) {
            (Some(s), _, _) => Envelope::from(s),
            (None, Some(p), _) => {
                return Err(Refusal::Unsigned {
                    pinned: signing::key_id(p),
                }
                .into())
            }
            (None, None, Via::Network) => {
                let Some(d) = legacy else {
                    return Err(Error::Config("no desired set".into()));
                };
                // A hub that does not sign, and an agent that never pinned a key.
                let (set, contents) = crate::session::desired_set(d);
                return self
                    .store(writer, set, contents, d.contents.len(), false, None)
                    .await;
            }
            (None, None, Via::File { .. }) => {
                return Err(Error::Config(format!(
                    "{} holds no pinned signing key: enrol this agent (by file or over the \
                     network) before importing desired state",
                    self.dir.display()
                )))
            }
        };
        if pin.is_none() {
            // First signed set over the verified session: pin its key.
            warn!(key_id = %signing::key_id(&envelope.public_key),
                "no signing key pinned (enrolled before the hub signed): pinning the key \
                 the hub's verified TLS session presents");
            pin = Some(envelope.public_key.clone());
        }
        let pinned = pin.unwrap_or_default();
        let allow_downgrade = matches!(
            via,
            Via::File {
                allow_downgrade: true
            }
        );
        let verified = signing::verify(
            &envelope,
            &pinned,
            &self.cluster,
            held.as_ref(),
            allow_downgrade,
        )?;
        // Every content that came along hashes to what the signed set names.
        let mut kept = Vec::new();
        for c in contents {
            let actual =
                flotilla_proto::content_digest(c).unwrap_or_else(|e| format!("unreadable ({e})"));
            signing::check_content(&verified.set, &c.content_hash, &actual)?;
            kept.push((c.content_hash.clone(), c.encode_to_vec()));
        }
        let new_pin = verified
            .new_pin
            .clone()
            .or_else(|| (self.pinned().is_none()).then(|| pinned.clone()));
        if verified.same {
            if let Some(k) = new_pin {
                self.set_pin(&k)?;
            }
            return Ok((
                Taken {
                    seq: verified.set.seq,
                    bundles: verified.set.bundles.len(),
                    new_contents: 0,
                    same: true,
                    missing: vec![],
                },
                verified.set.acks,
            ));
        }
        let set = DesiredSet {
            generation: verified.set.seq,
            bundles: verified
                .set
                .bundles
                .iter()
                .map(|b| DesiredBundle {
                    name: b.name.clone(),
                    content_hash: b.content_hash.clone(),
                    revision: b.revision.clone(),
                })
                .collect(),
            signed: Some(verified.held.clone()),
        };
        let strict = matches!(via, Via::File { .. });
        let n = kept.len();
        let (taken, _) = self
            .store(writer, set, kept, n, strict, new_pin.as_deref())
            .await?;
        if verified.new_pin.is_some() {
            info!(key_id = %verified.set.key_id, "the hub rotated its signing key: following it");
        }
        Ok((taken, verified.set.acks))
    }

    async fn store(
        &self,
        writer: &Writer,
        set: DesiredSet,
        contents: Vec<(String, Vec<u8>)>,
        new_contents: usize,
        strict: bool,
        new_pin: Option<&[u8]>,
    ) -> Result<(Taken, Option<Acks>)> {
        let brought: std::collections::BTreeSet<String> =
            contents.iter().map(|(h, _)| h.clone()).collect();
        let wanted = set.bundles.clone();
        let missing: Vec<String> = writer
            .read(move |s| {
                let mut missing = Vec::new();
                for b in wanted {
                    if !brought.contains(&b.content_hash) && s.content(&b.content_hash)?.is_none() {
                        missing.push(b.name);
                    }
                }
                Ok(missing)
            })
            .await?;
        if strict && !missing.is_empty() {
            return Err(Error::Transfer(format!(
                "the file lacks the content of bundles {} and this agent does not hold it: \
                 export again without --since, or with a status file this agent wrote since",
                missing.join(", ")
            )));
        }
        let seq = set.generation;
        let bundles = set.bundles.len();
        writer.save_desired(set, contents).await?;
        if let Some(k) = new_pin {
            self.set_pin(k)?;
        }
        Ok((
            Taken {
                seq,
                bundles,
                new_contents,
                same: false,
                missing,
            },
            None,
        ))
    }
}
