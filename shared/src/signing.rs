//! Signed desired state: what the hub signs for a cluster, and the agent's
//! checks before it stores or applies anything (no I/O).
//!
//! The hub signs the exact bytes of a [`SignedSet`] (JSON) with ed25519, under a
//! domain prefix so that no other signature of the same key can pass for one. The
//! agent checks, in order, and refuses with the first that fails:
//! 1. the key: pinned, or reached from the pin through endorsements (a rotation);
//! 2. the signature over the bytes, before they are parsed;
//! 3. the set names this cluster;
//! 4. its seq is newer than the set held (no replay, no downgrade), unless an
//!    operator allows a downgrade; the same seq must carry the same bytes;
//! 5. every content it brings hashes to the digest the set names
//!    ([`check_content`]).

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Signed before every desired set's bytes.
pub const SET_DOMAIN: &[u8] = b"flotilla-desired-v1\0";
/// Signed before an endorsed public key.
pub const ENDORSE_DOMAIN: &[u8] = b"flotilla-key-endorsement-v1\0";
/// Longest payload the agent will verify (a set names bundles, not contents).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// One bundle of a signed set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetBundle {
    pub name: String,
    /// `Rendered::content_hash` of its content.
    pub content_hash: String,
    pub revision: String,
}

/// What a file carries back to the agent: the hub has stored its statuses up to
/// `status_seq` and its drift events up to `drift_id`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acks {
    pub status_seq: u64,
    pub drift_id: u64,
}

/// A cluster's desired set, as the hub signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSet {
    /// Format version: 1.
    pub v: u32,
    pub cluster: String,
    /// Grows with every set the hub signs, across restarts.
    pub seq: u64,
    /// Computed from a complete view of every source (see `Desired.complete`).
    pub complete: bool,
    pub bundles: Vec<SetBundle>,
    pub issued_at_unix_ms: i64,
    /// The key that signed it ([`key_id`]).
    pub key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acks: Option<Acks>,
}

impl SignedSet {
    /// The exact bytes signed.
    pub fn payload(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A hub key endorsing the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsement {
    pub public_key: Vec<u8>,
    pub endorsed_by: String,
    pub signature: Vec<u8>,
}

/// A signed set as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    pub key_id: String,
    pub public_key: Vec<u8>,
    pub chain: Vec<Endorsement>,
}

/// What the agent holds: the seq of its set and a digest of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub seq: u64,
    pub payload_sha256: String,
}

/// Why a set was refused. Each says which check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the set carries no signature: this agent pins the hub's signing key {pinned} and accepts only signed sets")]
    Unsigned { pinned: String },
    #[error("signed by key {key_id}, which this agent does not pin (it pins {pinned}) and no endorsement from the pinned key leads to")]
    UnknownKey { key_id: String, pinned: String },
    #[error("the signature does not verify with key {key_id}: the set was altered or not signed by the hub")]
    BadSignature { key_id: String },
    #[error("the endorsement of key {key_id} by {endorsed_by} does not verify")]
    BadEndorsement { key_id: String, endorsed_by: String },
    #[error("the signed set is unreadable: {0}")]
    Malformed(String),
    #[error("the set is for cluster {set_for:?}, not this cluster ({this:?})")]
    OtherCluster { set_for: String, this: String },
    #[error("the set's seq {seq} is older than the one held ({held}): a replay or a downgrade (an operator may allow a downgrade with --allow-downgrade)")]
    Older { seq: u64, held: u64 },
    #[error("the set's seq {seq} is the one held, with different content: refused (the hub never signs two sets with one seq)")]
    Equivocation { seq: u64 },
    #[error("the set was not computed from a complete view of the sources: pruning by it could remove what Git still has")]
    Incomplete,
    #[error("the content for bundle {bundle} hashes to {actual}, not {expected} as the signed set says: it was altered")]
    ContentMismatch {
        bundle: String,
        expected: String,
        actual: String,
    },
    #[error("the content {hash} is named by no bundle of the signed set")]
    UnexpectedContent { hash: String },
}

/// `hex(SHA-256(public_key))[..16]`.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// SHA-256 of a payload, hex.
pub fn payload_sha256(payload: &[u8]) -> String {
    hex::encode(Sha256::digest(payload))
}

fn domain(prefix: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(prefix.len() + bytes.len());
    m.extend_from_slice(prefix);
    m.extend_from_slice(bytes);
    m
}

/// A hub signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish()
    }
}

impl SigningKey {
    /// A new key, as PKCS#8 (what the hub keeps on disk).
    pub fn generate_pkcs8() -> Result<Vec<u8>, String> {
        Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| "cannot generate an ed25519 key".to_string())
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .map_err(|e| format!("not an ed25519 PKCS#8 key: {e}"))?;
        let id = key_id(pair.public_key().as_ref());
        Ok(SigningKey { pair, id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs a set (its `key_id` is set to this key's).
    pub fn sign(&self, mut set: SignedSet, chain: &[Endorsement]) -> Envelope {
        set.key_id = self.id.clone();
        let payload = set.payload();
        let signature = self
            .pair
            .sign(&domain(SET_DOMAIN, &payload))
            .as_ref()
            .to_vec();
        Envelope {
            payload,
            signature,
            key_id: self.id.clone(),
            public_key: self.public_key(),
            chain: chain.to_vec(),
        }
    }

    /// Endorses `next` as the key after this one.
    pub fn endorse(&self, next: &[u8]) -> Endorsement {
        Endorsement {
            public_key: next.to_vec(),
            endorsed_by: self.id.clone(),
            signature: self
                .pair
                .sign(&domain(ENDORSE_DOMAIN, next))
                .as_ref()
                .to_vec(),
        }
    }
}

fn verifies(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

/// A set that passed every check but the contents'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub set: SignedSet,
    pub held: Held,
    /// The envelope's key differs from the pin and an endorsement chain from the
    /// pin leads to it: the agent pins this one from now on.
    pub new_pin: Option<Vec<u8>>,
    /// The set is the one held (same seq, same bytes): nothing to store.
    pub same: bool,
}

/// The key `key_id` is reached from `pinned` through `chain`: each step a valid
/// endorsement by the key before. Returns that key.
fn follow(pinned: &[u8], chain: &[Endorsement], key_id_wanted: &str) -> Result<Vec<u8>, Refusal> {
    let mut current = pinned.to_vec();
    // Each endorsement is used at most once: a loop cannot spin.
    for _ in 0..=chain.len() {
        let id = key_id(&current);
        if id == key_id_wanted {
            return Ok(current);
        }
        let Some(next) = chain.iter().find(|e| e.endorsed_by == id) else {
            break;
        };
        if !verifies(
            &current,
            &domain(ENDORSE_DOMAIN, &next.public_key),
            &next.signature,
        ) {
            return Err(Refusal::BadEndorsement {
                key_id: key_id(&next.public_key),
                endorsed_by: id,
            });
        }
        current = next.public_key.clone();
    }
    Err(Refusal::UnknownKey {
        key_id: key_id_wanted.to_string(),
        pinned: key_id(pinned),
    })
}

/// Checks an envelope for `cluster`, whose agent pins `pinned` and holds `held`.
pub fn verify(
    envelope: &Envelope,
    pinned: &[u8],
    cluster: &str,
    held: Option<&Held>,
    allow_downgrade: bool,
) -> Result<Verified, Refusal> {
    if envelope.signature.is_empty() && envelope.payload.is_empty() {
        return Err(Refusal::Unsigned {
            pinned: key_id(pinned),
        });
    }
    // 1. The key. The id the envelope names is only a hint; what counts is the
    // key the chain reaches, and the signature below is checked with it.
    let key = follow(pinned, &envelope.chain, &envelope.key_id)?;
    // 2. The signature, over the exact bytes, before they are parsed.
    if envelope.payload.len() > MAX_PAYLOAD
        || !verifies(
            &key,
            &domain(SET_DOMAIN, &envelope.payload),
            &envelope.signature,
        )
    {
        return Err(Refusal::BadSignature {
            key_id: key_id(&key),
        });
    }
    let set: SignedSet =
        serde_json::from_slice(&envelope.payload).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if set.v != 1 {
        return Err(Refusal::Malformed(format!(
            "format version {} (this agent reads 1)",
            set.v
        )));
    }
    if set.key_id != key_id(&key) {
        return Err(Refusal::Malformed(format!(
            "the set names key {} but was signed by {}",
            set.key_id,
            key_id(&key)
        )));
    }
    // 3. This cluster's.
    if set.cluster != cluster {
        return Err(Refusal::OtherCluster {
            set_for: set.cluster,
            this: cluster.to_string(),
        });
    }
    // 4. Newer than what is held.
    let digest = payload_sha256(&envelope.payload);
    let mut same = false;
    if let Some(h) = held {
        if set.seq == h.seq {
            if h.payload_sha256 != digest {
                return Err(Refusal::Equivocation { seq: set.seq });
            }
            same = true;
        } else if set.seq < h.seq && !allow_downgrade {
            return Err(Refusal::Older {
                seq: set.seq,
                held: h.seq,
            });
        }
    }
    if !set.complete {
        return Err(Refusal::Incomplete);
    }
    let new_pin = (key != pinned).then_some(key);
    Ok(Verified {
        held: Held {
            seq: set.seq,
            payload_sha256: digest,
        },
        set,
        new_pin,
        same,
    })
}

/// Checks one content the set came with: `actual` is the digest the agent
/// computed from it, `claimed` the one it travelled under.
pub fn check_content(set: &SignedSet, claimed: &str, actual: &str) -> Result<(), Refusal> {
    let named: Vec<&SetBundle> = set
        .bundles
        .iter()
        .filter(|b| b.content_hash == claimed)
        .collect();
    let Some(first) = named.first() else {
        return Err(Refusal::UnexpectedContent {
            hash: claimed.to_string(),
        });
    };
    if claimed != actual {
        return Err(Refusal::ContentMismatch {
            bundle: first.name.clone(),
            expected: claimed.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Signed by the agent before its status report's bytes.
pub const STATUS_DOMAIN: &[u8] = b"flotilla-status-v1\0";
/// MACed before an enrolment request file's bytes.
pub const ENROLL_REQUEST_DOMAIN: &[u8] = b"flotilla-enroll-request-v1\0";
/// MACed before an enrolment response file's bytes.
pub const ENROLL_RESPONSE_DOMAIN: &[u8] = b"flotilla-enroll-response-v1\0";

/// What the agent signs for a status report.
pub fn status_message(report: &[u8]) -> Vec<u8> {
    domain(STATUS_DOMAIN, report)
}

/// The MAC of an enrolment file: HMAC-SHA256 keyed by the token secret's hash
/// (`token::hash_secret`), which the hub keeps and the agent can compute.
pub fn enrol_mac(secret_hash: &str, domain_prefix: &[u8], bytes: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret_hash.as_bytes());
    ring::hmac::sign(&key, &domain(domain_prefix, bytes))
        .as_ref()
        .to_vec()
}

/// Checks an enrolment file's MAC in constant time.
pub fn enrol_mac_ok(secret_hash: &str, domain_prefix: &[u8], bytes: &[u8], mac: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret_hash.as_bytes());
    ring::hmac::verify(&key, &domain(domain_prefix, bytes), mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    fn set(cluster: &str, seq: u64) -> SignedSet {
        SignedSet {
            v: 1,
            cluster: cluster.into(),
            seq,
            complete: true,
            bundles: vec![SetBundle {
                name: "web".into(),
                content_hash: "aa".into(),
                revision: "r1".into(),
            }],
            issued_at_unix_ms: 1,
            key_id: String::new(),
            acks: None,
        }
    }

    #[test]
    fn a_signed_set_verifies_and_names_what_it_holds() {
        let k = key();
        let env = k.sign(set("edge-1", 5), &[]);
        let v = verify(&env, &k.public_key(), "edge-1", None, false).unwrap();
        assert_eq!(v.set.seq, 5);
        assert_eq!(v.set.key_id, k.id());
        assert_eq!(v.held.seq, 5);
        assert!(v.new_pin.is_none() && !v.same);
        // The same set again is accepted, as already held.
        let again = verify(&env, &k.public_key(), "edge-1", Some(&v.held), false).unwrap();
        assert!(again.same);
    }

    #[test]
    fn a_tampered_set_is_refused_as_such() {
        let k = key();
        let mut env = k.sign(set("edge-1", 5), &[]);
        let text = String::from_utf8(env.payload.clone()).unwrap();
        env.payload = text.replace("\"r1\"", "\"r2\"").into_bytes();
        let e = verify(&env, &k.public_key(), "edge-1", None, false).unwrap_err();
        assert!(matches!(e, Refusal::BadSignature { .. }), "{e}");
        assert!(e.to_string().contains("altered"), "{e}");
        // A signature of something else, too.
        let mut env = k.sign(set("edge-1", 5), &[]);
        env.signature = k.sign(set("edge-1", 6), &[]).signature;
        assert!(matches!(
            verify(&env, &k.public_key(), "edge-1", None, false),
            Err(Refusal::BadSignature { .. })
        ));
    }

    #[test]
    fn a_set_for_another_cluster_is_refused() {
        let k = key();
        let env = k.sign(set("edge-2", 5), &[]);
        let e = verify(&env, &k.public_key(), "edge-1", None, false).unwrap_err();
        assert_eq!(
            e,
            Refusal::OtherCluster {
                set_for: "edge-2".into(),
                this: "edge-1".into()
            }
        );
        assert!(e.to_string().contains("edge-2"), "{e}");
    }

    #[test]
    fn an_older_seq_is_refused_unless_a_downgrade_is_allowed() {
        let k = key();
        let held = verify(
            &k.sign(set("edge-1", 9), &[]),
            &k.public_key(),
            "edge-1",
            None,
            false,
        )
        .unwrap()
        .held;
        let old = k.sign(set("edge-1", 8), &[]);
        let e = verify(&old, &k.public_key(), "edge-1", Some(&held), false).unwrap_err();
        assert_eq!(e, Refusal::Older { seq: 8, held: 9 });
        assert!(e.to_string().contains("--allow-downgrade"), "{e}");
        let v = verify(&old, &k.public_key(), "edge-1", Some(&held), true).unwrap();
        assert_eq!(v.held.seq, 8);
        // One seq, two different sets: refused even with a downgrade allowed.
        let mut other = set("edge-1", 9);
        other.bundles.clear();
        let e = verify(
            &k.sign(other, &[]),
            &k.public_key(),
            "edge-1",
            Some(&held),
            true,
        )
        .unwrap_err();
        assert_eq!(e, Refusal::Equivocation { seq: 9 });
    }

    #[test]
    fn a_key_the_agent_does_not_pin_is_refused() {
        let (hub, stranger) = (key(), key());
        let env = stranger.sign(set("edge-1", 5), &[]);
        let e = verify(&env, &hub.public_key(), "edge-1", None, false).unwrap_err();
        assert!(matches!(e, Refusal::UnknownKey { .. }), "{e}");
        assert!(e.to_string().contains(stranger.id()), "{e}");
        // Claiming the pinned key's id with the stranger's signature fails the signature.
        let mut forged = env.clone();
        forged.key_id = hub.id().into();
        assert!(matches!(
            verify(&forged, &hub.public_key(), "edge-1", None, false),
            Err(Refusal::BadSignature { .. })
        ));
        // A stranger's key endorsed by the stranger leads nowhere.
        let mut self_endorsed = env;
        self_endorsed.chain = vec![stranger.endorse(&stranger.public_key())];
        assert!(matches!(
            verify(&self_endorsed, &hub.public_key(), "edge-1", None, false),
            Err(Refusal::UnknownKey { .. })
        ));
        // Unsigned.
        let unsigned = Envelope {
            payload: vec![],
            signature: vec![],
            key_id: String::new(),
            public_key: vec![],
            chain: vec![],
        };
        assert!(matches!(
            verify(&unsigned, &hub.public_key(), "edge-1", None, false),
            Err(Refusal::Unsigned { .. })
        ));
    }

    #[test]
    fn a_rotation_is_followed_through_its_endorsements() {
        let (k0, k1, k2) = (key(), key(), key());
        let chain = vec![k0.endorse(&k1.public_key()), k1.endorse(&k2.public_key())];
        let env = k2.sign(set("edge-1", 5), &chain);
        let v = verify(&env, &k0.public_key(), "edge-1", None, false).unwrap();
        assert_eq!(v.new_pin, Some(k2.public_key()));
        // From the middle of the chain, too.
        let v = verify(&env, &k1.public_key(), "edge-1", None, false).unwrap();
        assert_eq!(v.new_pin, Some(k2.public_key()));
        // A forged endorsement (k1's key "endorsed" by k0 with k1's signature).
        let mut bad = chain.clone();
        bad[0].signature = k1.endorse(&k1.public_key()).signature;
        let env = k2.sign(set("edge-1", 5), &bad);
        let e = verify(&env, &k0.public_key(), "edge-1", None, false).unwrap_err();
        assert!(matches!(e, Refusal::BadEndorsement { .. }), "{e}");
        // Once moved to k2, a set by k0 (retired) is not reached any more.
        let old = k0.sign(set("edge-1", 6), &[]);
        assert!(matches!(
            verify(&old, &k2.public_key(), "edge-1", None, false),
            Err(Refusal::UnknownKey { .. })
        ));
    }

    #[test]
    fn contents_must_hash_to_what_the_set_names() {
        let s = set("edge-1", 1);
        assert!(check_content(&s, "aa", "aa").is_ok());
        let e = check_content(&s, "aa", "bb").unwrap_err();
        assert!(matches!(e, Refusal::ContentMismatch { ref bundle, .. } if bundle == "web"));
        assert!(e.to_string().contains("web"), "{e}");
        assert!(matches!(
            check_content(&s, "cc", "cc"),
            Err(Refusal::UnexpectedContent { .. })
        ));
    }

    #[test]
    fn an_incomplete_set_is_refused() {
        let k = key();
        let mut s = set("edge-1", 1);
        s.complete = false;
        assert_eq!(
            verify(&k.sign(s, &[]), &k.public_key(), "edge-1", None, false),
            Err(Refusal::Incomplete)
        );
    }

    #[test]
    fn enrolment_macs_bind_the_bytes_the_key_and_the_direction() {
        let mac = enrol_mac("h1", ENROLL_REQUEST_DOMAIN, b"req");
        assert!(enrol_mac_ok("h1", ENROLL_REQUEST_DOMAIN, b"req", &mac));
        assert!(!enrol_mac_ok("h1", ENROLL_REQUEST_DOMAIN, b"reQ", &mac));
        assert!(!enrol_mac_ok("h2", ENROLL_REQUEST_DOMAIN, b"req", &mac));
        // A request's MAC does not pass for a response's.
        assert!(!enrol_mac_ok("h1", ENROLL_RESPONSE_DOMAIN, b"req", &mac));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any change to any byte of payload or signature is refused, and never
        /// read as a set.
        #[test]
        fn any_flipped_byte_is_refused(at in any::<prop::sample::Index>(), bit in 0u8..8, sig in any::<bool>()) {
            let k = key();
            let mut env = k.sign(set("edge-1", 3), &[]);
            let target = if sig { &mut env.signature } else { &mut env.payload };
            let i = at.index(target.len());
            target[i] ^= 1 << bit;
            let r = verify(&env, &k.public_key(), "edge-1", None, false);
            prop_assert!(matches!(r, Err(Refusal::BadSignature { .. })), "{:?}", r);
        }

        /// Of two sets, the agent accepts the newer after the older, never the
        /// older after the newer.
        #[test]
        fn seqs_only_move_forward(a in 1u64..1_000_000, b in 1u64..1_000_000) {
            let k = key();
            let first = verify(&k.sign(set("c", a), &[]), &k.public_key(), "c", None, false).unwrap();
            let mut second = set("c", b);
            second.issued_at_unix_ms = 2;
            let r = verify(&k.sign(second, &[]), &k.public_key(), "c", Some(&first.held), false);
            match b.cmp(&a) {
                std::cmp::Ordering::Greater => prop_assert!(r.is_ok()),
                std::cmp::Ordering::Less => prop_assert!(matches!(r, Err(Refusal::Older { .. })), "older accepted"),
                std::cmp::Ordering::Equal => prop_assert!(matches!(r, Err(Refusal::Equivocation { .. })), "same seq accepted"),
            }
        }
    }
}
