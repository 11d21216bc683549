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
            // Only a session verified against the pinned CA may bring the first
            // key; a file is checked against a pin or not taken at all.
            (_, None, Via::File { .. }) => {
                return Err(Error::Config(format!(
                    "{} holds no pinned signing key: enrol this agent (by file or over the \
                     network) before importing desired state",
                    self.dir.display()
                )))
            }
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
                // The contents are those passed (the set's, moved out of it).
                let (set, _) = crate::session::desired_set(d);
                let encoded = contents
                    .iter()
                    .map(|c| (c.content_hash.clone(), c.encode_to_vec()))
                    .collect();
                return self
                    .store(writer, set, encoded, contents.len(), false, None)
                    .await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::bundle::{BundleOptions, Manifest, Rendered};
    use flotilla_shared::signing::{SetBundle, SignedSet, SigningKey};

    fn content(value: &str) -> v1::BundleContent {
        let r = Rendered {
            manifests: vec![Manifest {
                file: "cm.yaml".into(),
                object: serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "a", "namespace": "ns"}, "data": {"v": value}}),
            }],
            options: BundleOptions::default(),
        };
        flotilla_proto::bundle_content(&r.content_hash(), &r)
    }

    fn signed(
        key: &SigningKey,
        cluster: &str,
        seq: u64,
        c: &v1::BundleContent,
    ) -> v1::SignedDesired {
        let env = key.sign(
            SignedSet {
                v: 1,
                cluster: cluster.into(),
                seq,
                complete: true,
                bundles: vec![SetBundle {
                    name: "web".into(),
                    content_hash: c.content_hash.clone(),
                    revision: format!("r{seq}"),
                }],
                issued_at_unix_ms: 0,
                key_id: String::new(),
                acks: None,
            },
            &[],
        );
        (&env).into()
    }

    struct Setup {
        _dir: tempfile::TempDir,
        writer: Writer,
        trust: Trust,
        key: SigningKey,
    }

    fn setup(pin: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        if pin {
            save_pin(dir.path(), &key.public_key()).unwrap();
        }
        let store = crate::store::Store::open(dir.path(), 1).unwrap();
        let (writer, _) = Writer::spawn(store).unwrap();
        let trust = Trust::load(dir.path(), "edge-1").unwrap();
        Setup {
            _dir: dir,
            writer,
            trust,
            key,
        }
    }

    async fn stored(w: &Writer) -> Option<DesiredSet> {
        w.read(|s| s.desired()).await.unwrap()
    }

    #[tokio::test]
    async fn a_verified_set_is_stored_and_a_tampered_one_is_not() {
        let s = setup(true);
        let c = content("one");
        let set = signed(&s.key, "edge-1", 5, &c);
        let (taken, _) = s
            .trust
            .take(
                &s.writer,
                Some(&set),
                std::slice::from_ref(&c),
                Via::Network,
                None,
            )
            .await
            .unwrap();
        assert_eq!((taken.seq, taken.bundles, taken.same), (5, 1, false));
        assert_eq!(stored(&s.writer).await.unwrap().generation, 5);

        // Content altered under its digest: refused, nothing stored.
        let c2 = content("two");
        let set2 = signed(&s.key, "edge-1", 6, &c2);
        let mut evil = c2.clone();
        evil.manifests[0].json = evil.manifests[0].json.replace("two", "evil");
        let e = s
            .trust
            .take(&s.writer, Some(&set2), &[evil], Via::Network, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("it was altered"), "{e}");
        assert_eq!(stored(&s.writer).await.unwrap().generation, 5);

        // Unsigned, while a key is pinned: refused.
        let legacy = v1::Desired {
            generation: 7,
            complete: true,
            ..Default::default()
        };
        let e = s
            .trust
            .take(&s.writer, None, &[], Via::Network, Some(&legacy))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no signature"), "{e}");
        // Older: refused.
        let e = s
            .trust
            .take(
                &s.writer,
                Some(&signed(&s.key, "edge-1", 4, &c)),
                &[],
                Via::Network,
                None,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("older"), "{e}");
        assert_eq!(stored(&s.writer).await.unwrap().generation, 5);
    }

    #[tokio::test]
    async fn a_file_must_bring_or_find_every_content() {
        let s = setup(true);
        let c = content("one");
        let set = signed(&s.key, "edge-1", 5, &c);
        let e = s
            .trust
            .take(
                &s.writer,
                Some(&set),
                &[],
                Via::File {
                    allow_downgrade: false,
                },
                None,
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("lacks the content of bundles web"),
            "{e}"
        );
        assert!(stored(&s.writer).await.is_none());
    }

    #[tokio::test]
    async fn an_agent_that_never_pinned_pins_the_first_key_over_the_network_only() {
        let s = setup(false);
        let c = content("one");
        let set = signed(&s.key, "edge-1", 5, &c);
        // By file: refused, there is nothing to check it with.
        let e = s
            .trust
            .take(
                &s.writer,
                Some(&set),
                std::slice::from_ref(&c),
                Via::File {
                    allow_downgrade: false,
                },
                None,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no pinned signing key"), "{e}");
        // Over the verified session: pinned.
        s.trust
            .take(
                &s.writer,
                Some(&set),
                std::slice::from_ref(&c),
                Via::Network,
                None,
            )
            .await
            .unwrap();
        assert_eq!(s.trust.pinned(), Some(s.key.public_key()));
        // From then on, another key is refused.
        let stranger = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let e = s
            .trust
            .take(
                &s.writer,
                Some(&signed(&stranger, "edge-1", 9, &c)),
                &[],
                Via::Network,
                None,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not pin"), "{e}");
    }
}
