//! The agent's durable state in sled (`DIR/state.sled`): the last Desired set, bundle
//! contents by hash (each as its options and the digests of its objects, and each
//! object stored once by digest, whatever the number of contents that have it), the inventory of objects applied per bundle (for pruning),
//! statuses with their sequence numbers, drift events, and the Jobs Kubernetes
//! collected after they finished (not created again for the same content). Writes
//! here are not durable until [`Store::flush`]: the agent's one writer
//! ([`crate::writer`]) runs them in batches and flushes each batch once before
//! anything relies on it (an ack to the hub, a status about to be sent, an object
//! about to be applied). Every call here blocks on disk:
//! the agent makes them only on the writer's thread.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flotilla_shared::bundle::ObjectRef;
use flotilla_shared::drift::DriftEvent;
use flotilla_shared::health::Health;
use flotilla_shared::state::BundleState;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::error::{Error, Result};

/// Directory of the sled database inside the state directory.
pub const DB_DIR: &str = "state.sled";

const DESIRED_KEY: &[u8] = b"desired";
const SEQ_KEY: &[u8] = b"seq";
const ACKED_KEY: &[u8] = b"acked_seq";
const KINDS_KEY: &[u8] = b"kinds";
const DRIFT_ID_KEY: &[u8] = b"drift_id";

/// Drift events kept while the hub is unreachable; beyond this the oldest go (a
/// cluster fighting a controller must not fill the disk).
pub const MAX_PENDING_DRIFT: usize = 10_000;

/// One bundle of the Desired set, as the hub named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredBundle {
    pub name: String,
    pub content_hash: String,
    pub revision: String,
}

/// The last complete Desired set received from the hub.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredSet {
    pub generation: u64,
    pub bundles: Vec<DesiredBundle>,
    /// The signed set it came as (its seq and digest); `None` from a hub that
    /// does not sign. A set older than this one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<flotilla_shared::signing::Held>,
}

/// An object of a bundle that Kubernetes deleted as it asked (a finished Job with
/// `ttlSecondsAfterFinished`, see `flotilla_shared::drift::collectable`): not
/// created again for the same content, and shown with its last health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    pub object: ObjectRef,
    /// `flotilla_shared::drift::applied_digest` of what was applied.
    pub digest: String,
    /// Its health when last seen (completed, or failed and why).
    pub health: Health,
}

/// A status the agent produced for one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub bundle: String,
    pub content_hash: String,
    pub revision: String,
    pub state: BundleState,
    pub message: String,
    pub seq: u64,
    pub observed_at_unix_ms: i64,
}

/// The agent's sled database, behind a small API.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    /// Contents stored whole (encoded BundleContent): a store of an agent
    /// before objects were stored once, moved to `split` when opened, and bytes
    /// that are no BundleContent.
    contents: sled::Tree,
    /// Contents by hash: [`split_record`] (options and object digests).
    split: sled::Tree,
    /// Objects (encoded Manifest) by digest (32 bytes), once each.
    objects: sled::Tree,
    inventory: sled::Tree,
    statuses: sled::Tree,
    /// Drift events not yet acknowledged by the hub, by id (big-endian).
    drift: sled::Tree,
    /// Objects Kubernetes collected as they asked, per bundle ([`Collected`]).
    collected: sled::Tree,
    /// Flushes made through this store (each one is sled's fsync of its log), for tests
    /// and diagnostics: a bundle's apply must cost a few, not one per object.
    flushes: Arc<AtomicU64>,
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn corrupt(key: &str) -> Error {
    Error::Corrupt {
        key: key.to_string(),
        reason: "not a content record".into(),
    }
}

/// A content record: the encoded BundleContent without its manifests (a u32
/// length first), then the 32-byte digest of each object, in order.
fn split_record(record: &[u8]) -> Option<(&[u8], Vec<flotilla_proto::delta::Digest>)> {
    let len = u32::from_be_bytes(record.get(..4)?.try_into().ok()?) as usize;
    let head = record.get(4..4 + len)?;
    let rest = record.get(4 + len..)?;
    if rest.len() % 32 != 0 {
        return None;
    }
    let digests = rest
        .chunks_exact(32)
        .map(|c| <[u8; 32]>::try_from(c).unwrap_or_default())
        .collect();
    Some((head, digests))
}

fn u64_of(bytes: Option<sled::IVec>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// How long to wait for sled's file lock: a store dropped in this process releases
/// it once its last handle is gone, which can take a moment.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// sled 0.34 reports a held lock only as an `Other` I/O error with this text.
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens sled without its timer-driven background flush (an fsync every half second,
/// busy or idle): durability comes from [`Store::flush`], which the writer calls once
/// per batch that needs it, so the only fsyncs are those counted by [`Store::flushes`].
fn open_db(path: &Path) -> std::result::Result<sled::Db, sled::Error> {
    sled::Config::new().path(path).flush_every_ms(None).open()
}

/// Opens sled, waiting up to [`LOCK_WAIT`] while its lock is held.
fn open_unlocked(path: &Path) -> std::result::Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_db(path) {
            Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `state_dir`. A database that fails to open is
    /// moved aside and replaced by an empty one: everything in it can be rebuilt
    /// from the hub and from the labels on the cluster's objects.
    ///
    /// `now_unix_ms` seeds the status sequence of a fresh store, so sequence numbers
    /// keep increasing even when an old store was lost.
    pub fn open(state_dir: &Path, now_unix_ms: i64) -> Result<Store> {
        let path = state_dir.join(DB_DIR);
        let db = match open_unlocked(&path) {
            Ok(db) => db,
            Err(e) if is_locked(&e) => {
                // Another process (or a store dropped a moment ago, whose background
                // flusher still holds the lock) uses this directory: not corruption.
                return Err(e.into());
            }
            Err(e) => {
                let aside = PathBuf::from(format!("{}.corrupt-{now_unix_ms}", path.display()));
                error!(error = %e, path = %path.display(), moved_to = %aside.display(),
                    "state store cannot be opened; moving it aside and starting empty");
                std::fs::rename(&path, &aside).map_err(|e| Error::io(&path, e))?;
                open_db(&path)?
            }
        };
        let store = Store {
            meta: db.open_tree("meta")?,
            contents: db.open_tree("contents")?,
            split: db.open_tree("content_objects")?,
            objects: db.open_tree("objects")?,
            inventory: db.open_tree("inventory")?,
            statuses: db.open_tree("statuses")?,
            drift: db.open_tree("drift")?,
            collected: db.open_tree("collected")?,
            flushes: Arc::new(AtomicU64::new(0)),
            db,
        };
        let seed = u64::try_from(now_unix_ms).unwrap_or(0).saturating_mul(1000);
        let mut seeded = false;
        if store.meta.get(SEQ_KEY)?.is_none() {
            store.meta.insert(SEQ_KEY, &seed.to_be_bytes())?;
            store.meta.insert(ACKED_KEY, &seed.to_be_bytes())?;
            seeded = true;
        }
        // Seeded from the clock like seq: the hub drops ids it has seen from this
        // cluster, so a lost store must not start again from 1.
        if store.meta.get(DRIFT_ID_KEY)?.is_none() {
            store.meta.insert(DRIFT_ID_KEY, &seed.to_be_bytes())?;
            seeded = true;
        }
        // Contents of an older agent, stored whole: each object once from now on.
        let mut moved = false;
        for entry in store.contents.iter() {
            let (key, bytes) = entry?;
            if store.put_split(&String::from_utf8_lossy(&key), &bytes)? {
                store.contents.remove(key)?;
                moved = true;
            }
        }
        if seeded || moved {
            store.flush()?;
        }
        Ok(store)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.db.flush()?;
        Ok(())
    }

    /// How many flushes this store (and its clones) made since it was opened.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// The last Desired set, if any was ever received.
    pub fn desired(&self) -> Result<Option<DesiredSet>> {
        self.meta
            .get(DESIRED_KEY)?
            .map(|b| decode(DESIRED_KEY, &b))
            .transpose()
    }

    /// Stores a Desired set and the new contents (hash, encoded BundleContent) and
    /// drops contents no bundle refers to any more. Once flushed, the Desired set may
    /// be acknowledged.
    pub fn save_desired(&self, set: &DesiredSet, contents: &[(String, Vec<u8>)]) -> Result<()> {
        let wanted: BTreeSet<&str> = set
            .bundles
            .iter()
            .map(|b| b.content_hash.as_str())
            .collect();
        for (hash, bytes) in contents {
            if wanted.contains(hash.as_str())
                && !self.split.contains_key(hash.as_bytes())?
                && !self.put_split(hash, bytes)?
            {
                self.contents.insert(hash.as_bytes(), bytes.as_slice())?;
            }
        }
        self.meta.insert(DESIRED_KEY, encode(set))?;
        let mut dropped = false;
        for tree in [&self.contents, &self.split] {
            for key in tree.iter().keys() {
                let key = key?;
                if !wanted.contains(String::from_utf8_lossy(&key).as_ref()) {
                    tree.remove(key)?;
                    dropped = true;
                }
            }
        }
        if dropped {
            // Objects no content held refers to.
            let mut live = std::collections::HashSet::new();
            for record in self.split.iter().values() {
                let record = record?;
                let (_, digests) =
                    split_record(&record).ok_or_else(|| corrupt("content_objects"))?;
                live.extend(digests.iter().copied());
            }
            for key in self.objects.iter().keys() {
                let key = key?;
                if !<[u8; 32]>::try_from(key.as_ref()).is_ok_and(|d| live.contains(&d)) {
                    self.objects.remove(key)?;
                }
            }
        }
        Ok(())
    }

    /// Stores an encoded BundleContent as its options and objects (each object
    /// once); false, storing nothing, if the bytes are no BundleContent.
    fn put_split(&self, hash: &str, bytes: &[u8]) -> Result<bool> {
        use prost::Message;
        let Ok(mut content) = flotilla_proto::v1::BundleContent::decode(bytes) else {
            return Ok(false);
        };
        let manifests = std::mem::take(&mut content.manifests);
        let head = content.encode_to_vec();
        let mut record = Vec::with_capacity(4 + head.len() + 32 * manifests.len());
        record.extend_from_slice(&(head.len() as u32).to_be_bytes());
        record.extend_from_slice(&head);
        for m in &manifests {
            let digest = flotilla_proto::delta::object_digest(m);
            if !self.objects.contains_key(digest)? {
                self.objects.insert(digest, m.encode_to_vec())?;
            }
            record.extend_from_slice(&digest);
        }
        self.split.insert(hash.as_bytes(), record)?;
        Ok(true)
    }

    /// The encoded BundleContent for a hash.
    pub fn content(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        use prost::Message;
        let Some(record) = self.split.get(hash.as_bytes())? else {
            return Ok(self.contents.get(hash.as_bytes())?.map(|b| b.to_vec()));
        };
        let (head, digests) = split_record(&record).ok_or_else(|| corrupt(hash))?;
        let mut content =
            flotilla_proto::v1::BundleContent::decode(head).map_err(|_| corrupt(hash))?;
        content.manifests.reserve_exact(digests.len());
        for d in digests {
            let m = self.object(&d)?.ok_or_else(|| Error::Corrupt {
                key: hash.to_string(),
                reason: format!("object {} is missing", hex::encode(d)),
            })?;
            content.manifests.push(m);
        }
        Ok(Some(content.encode_to_vec()))
    }

    /// The digests of a content's objects, in order; `None` if it is not held
    /// as objects.
    pub fn object_list(&self, hash: &str) -> Result<Option<Vec<flotilla_proto::delta::Digest>>> {
        let Some(record) = self.split.get(hash.as_bytes())? else {
            return Ok(None);
        };
        let (_, digests) = split_record(&record).ok_or_else(|| corrupt(hash))?;
        Ok(Some(digests))
    }

    /// An object by digest.
    pub fn object(
        &self,
        digest: &flotilla_proto::delta::Digest,
    ) -> Result<Option<flotilla_proto::v1::Manifest>> {
        use prost::Message;
        self.objects
            .get(digest)?
            .map(|b| {
                flotilla_proto::v1::Manifest::decode(b.as_ref())
                    .map_err(|_| corrupt(&hex::encode(digest)))
            })
            .transpose()
    }

    /// How many objects are stored (each once).
    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    /// The content hashes held, for Hello.
    pub fn held_hashes(&self) -> Result<Vec<String>> {
        let mut held: Vec<String> = self
            .split
            .iter()
            .keys()
            .chain(self.contents.iter().keys())
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect::<Result<_>>()?;
        held.sort();
        held.dedup();
        Ok(held)
    }

    /// The objects applied for a bundle; `None` when the store has no record of it.
    pub fn inventory(&self, bundle: &str) -> Result<Option<BTreeSet<ObjectRef>>> {
        self.inventory
            .get(bundle.as_bytes())?
            .map(|b| decode(bundle.as_bytes(), &b))
            .transpose()
    }

    /// Records the objects of a bundle (and their kinds, for rebuilding inventories
    /// from the cluster later). Returns whether anything changed (nothing to flush).
    pub fn set_inventory(&self, bundle: &str, objects: &BTreeSet<ObjectRef>) -> Result<bool> {
        let kinds_changed = self.add_kinds(objects)?;
        let held = self.inventory(bundle)?;
        if held.as_ref() == Some(objects) {
            return Ok(kinds_changed);
        }
        self.inventory.insert(bundle.as_bytes(), encode(objects))?;
        Ok(true)
    }

    /// Adds objects to a bundle's inventory before they are applied (the inventory
    /// stays a superset of what exists; see [`crate::reconcile`]). Returns whether
    /// anything was new.
    pub fn intend(&self, bundle: &str, objects: &BTreeSet<ObjectRef>) -> Result<bool> {
        let mut held = self.inventory(bundle)?;
        let recorded = held.is_some();
        let inventory = held.get_or_insert_with(BTreeSet::new);
        let before = inventory.len();
        inventory.extend(objects.iter().cloned());
        let grew = inventory.len() != before || !recorded;
        if grew {
            self.inventory
                .insert(bundle.as_bytes(), encode(inventory))?;
        }
        Ok(self.add_kinds(objects)? || grew)
    }

    /// Remembers the kinds of `objects` among every kind ever applied.
    fn add_kinds(&self, objects: &BTreeSet<ObjectRef>) -> Result<bool> {
        let mut kinds = self.known_kinds()?;
        let before = kinds.len();
        kinds.extend(
            objects
                .iter()
                .map(|o| (o.api_version.clone(), o.kind.clone())),
        );
        if kinds.len() == before {
            return Ok(false);
        }
        self.meta.insert(KINDS_KEY, encode(&kinds))?;
        Ok(true)
    }

    /// Bundles with an inventory: those that may have objects in the cluster.
    pub fn inventory_bundles(&self) -> Result<Vec<String>> {
        self.inventory
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    /// Every (apiVersion, kind) the agent ever applied.
    pub fn known_kinds(&self) -> Result<BTreeSet<(String, String)>> {
        Ok(self
            .meta
            .get(KINDS_KEY)?
            .map(|b| decode(KINDS_KEY, &b))
            .transpose()?
            .unwrap_or_default())
    }

    /// The objects of a bundle Kubernetes collected, in no particular order.
    pub fn collected(&self, bundle: &str) -> Result<Vec<Collected>> {
        Ok(self
            .collected
            .get(bundle.as_bytes())?
            .map(|b| decode(bundle.as_bytes(), &b))
            .transpose()?
            .unwrap_or_default())
    }

    /// Remembers that Kubernetes collected an object of a bundle (replacing what
    /// was remembered of it).
    pub fn add_collected(&self, bundle: &str, c: Collected) -> Result<()> {
        let mut held = self.collected(bundle)?;
        held.retain(|h| h.object != c.object);
        held.push(c);
        self.collected.insert(bundle.as_bytes(), encode(&held))?;
        Ok(())
    }

    /// Forgets the collected objects of a bundle that an apply created again or
    /// that left it: only those in `keep` stay. Returns whether anything changed.
    pub fn keep_collected(&self, bundle: &str, keep: &BTreeSet<ObjectRef>) -> Result<bool> {
        let held = self.collected(bundle)?;
        let kept: Vec<Collected> = held
            .iter()
            .filter(|c| keep.contains(&c.object))
            .cloned()
            .collect();
        if kept.len() == held.len() {
            return Ok(false);
        }
        if kept.is_empty() {
            self.collected.remove(bundle.as_bytes())?;
        } else {
            self.collected.insert(bundle.as_bytes(), encode(&kept))?;
        }
        Ok(true)
    }

    /// Forgets a bundle that was removed and pruned: its inventory and status.
    pub fn remove_bundle(&self, bundle: &str) -> Result<()> {
        self.collected.remove(bundle.as_bytes())?;
        self.inventory.remove(bundle.as_bytes())?;
        self.statuses.remove(bundle.as_bytes())?;
        Ok(())
    }

    /// Records a new status with the next sequence number; it may be sent once flushed.
    pub fn record_status(
        &self,
        bundle: &str,
        content_hash: &str,
        revision: &str,
        state: BundleState,
        message: &str,
        observed_at_unix_ms: i64,
    ) -> Result<Status> {
        let seq = u64_of(self.meta.get(SEQ_KEY)?) + 1;
        self.meta.insert(SEQ_KEY, &seq.to_be_bytes())?;
        let status = Status {
            bundle: bundle.to_string(),
            content_hash: content_hash.to_string(),
            revision: revision.to_string(),
            state,
            message: message.to_string(),
            seq,
            observed_at_unix_ms,
        };
        self.statuses.insert(bundle.as_bytes(), encode(&status))?;
        Ok(status)
    }

    /// The latest status of a bundle.
    pub fn last_status(&self, bundle: &str) -> Result<Option<Status>> {
        self.statuses
            .get(bundle.as_bytes())?
            .map(|b| decode(bundle.as_bytes(), &b))
            .transpose()
    }

    /// The latest status of every bundle with a seq above `after`, oldest first.
    pub fn statuses_after(&self, after: u64) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for item in self.statuses.iter() {
            let (k, v) = item?;
            let s: Status = match decode(&k, &v) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "dropping an unreadable status");
                    self.statuses.remove(k)?;
                    continue;
                }
            };
            if s.seq > after {
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.seq);
        Ok(out)
    }

    /// Records a drift event under the next id; it may be sent once flushed. Drops the
    /// oldest pending events beyond [`MAX_PENDING_DRIFT`]. Ids follow the order of
    /// calls, which only the writer makes.
    pub fn record_drift(&self, mut event: DriftEvent) -> Result<DriftEvent> {
        let id = u64_of(self.meta.get(DRIFT_ID_KEY)?) + 1;
        self.meta.insert(DRIFT_ID_KEY, &id.to_be_bytes())?;
        event.id = id;
        self.drift.insert(id.to_be_bytes(), encode(&event))?;
        while self.drift.len() > MAX_PENDING_DRIFT {
            if let Some((k, _)) = self.drift.pop_min()? {
                warn!(
                    id = u64_of(Some(k)),
                    "dropping the oldest unsent drift event"
                );
            }
        }
        Ok(event)
    }

    /// Drift events not acknowledged by the hub, oldest first.
    pub fn pending_drift(&self) -> Result<Vec<DriftEvent>> {
        let mut out = Vec::new();
        for item in self.drift.iter() {
            let (k, v) = item?;
            match decode(&k, &v) {
                Ok(e) => out.push(e),
                Err(e) => {
                    warn!(error = %e, "dropping an unreadable drift event");
                    self.drift.remove(k)?;
                }
            }
        }
        Ok(out)
    }

    /// The hub stored drift event `id`: forget it.
    pub fn ack_drift(&self, id: u64) -> Result<()> {
        self.drift.remove(id.to_be_bytes())?;
        Ok(())
    }

    /// The highest seq the hub acknowledged.
    pub fn acked_seq(&self) -> Result<u64> {
        Ok(u64_of(self.meta.get(ACKED_KEY)?))
    }

    /// Notes the hub's acknowledgement of every status up to `seq`.
    pub fn ack(&self, seq: u64) -> Result<()> {
        self.meta.fetch_and_update(ACKED_KEY, |old| {
            let old = u64_of(old.map(sled::IVec::from));
            Some(old.max(seq).to_be_bytes().to_vec())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &str, name: &str) -> ObjectRef {
        ObjectRef {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: Some("ns".into()),
            name: name.into(),
        }
    }

    fn set(gen: u64, bundles: &[(&str, &str)]) -> DesiredSet {
        DesiredSet {
            generation: gen,
            bundles: bundles
                .iter()
                .map(|(n, h)| DesiredBundle {
                    name: n.to_string(),
                    content_hash: h.to_string(),
                    revision: "r1".into(),
                })
                .collect(),
            signed: None,
        }
    }

    #[test]
    fn desired_contents_and_gc_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 1).unwrap();
            assert_eq!(s.desired().unwrap(), None);
            s.save_desired(
                &set(1, &[("a", "h1"), ("b", "h2")]),
                &[
                    ("h1".into(), b"one".to_vec()),
                    ("h2".into(), b"two".to_vec()),
                ],
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 2).unwrap();
        assert_eq!(s.desired().unwrap().unwrap().generation, 1);
        assert_eq!(s.held_hashes().unwrap(), ["h1", "h2"]);
        s.save_desired(
            &set(2, &[("a", "h3")]),
            &[
                ("h3".into(), b"three".to_vec()),
                ("zz".into(), b"x".to_vec()),
            ],
        )
        .unwrap();
        assert_eq!(s.held_hashes().unwrap(), ["h3"]);
        assert_eq!(s.content("h3").unwrap().unwrap(), b"three");
        assert_eq!(s.content("h1").unwrap(), None);
    }

    fn content(hash: &str, values: &[&str]) -> (String, Vec<u8>) {
        use prost::Message;
        let c = flotilla_proto::v1::BundleContent {
            content_hash: hash.into(),
            manifests: values
                .iter()
                .map(|v| flotilla_proto::v1::Manifest {
                    file: "f.yaml".into(),
                    json: format!(r#"{{"kind":"ConfigMap","data":{{"v":"{v}"}}}}"#),
                })
                .collect(),
            default_namespace: "d".into(),
            ..Default::default()
        };
        (hash.to_string(), c.encode_to_vec())
    }

    #[test]
    fn each_object_is_kept_once_whatever_refers_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1).unwrap();
        // Two bundles and two revisions sharing objects: 4 distinct objects.
        let a1 = content("a1", &["x", "y", "z"]);
        let b1 = content("b1", &["x", "y"]);
        s.save_desired(
            &set(1, &[("a", "a1"), ("b", "b1")]),
            &[a1.clone(), b1.clone()],
        )
        .unwrap();
        assert_eq!(s.object_count(), 3);
        let a2 = content("a2", &["x", "y", "w"]);
        s.save_desired(
            &set(2, &[("a", "a2"), ("b", "b1")]),
            std::slice::from_ref(&a2),
        )
        .unwrap();
        assert_eq!(s.object_count(), 3, "z went with a1, w came with a2");
        // Each content reads back exactly as it came.
        assert_eq!(s.content("a2").unwrap().unwrap(), a2.1);
        assert_eq!(s.content("b1").unwrap().unwrap(), b1.1);
        assert_eq!(s.content("a1").unwrap(), None);
        assert_eq!(s.object_list("a2").unwrap().unwrap().len(), 3);
        s.save_desired(&set(3, &[]), &[]).unwrap();
        assert_eq!(s.object_count(), 0);
        assert!(s.held_hashes().unwrap().is_empty());
    }

    #[test]
    fn contents_an_older_agent_stored_whole_are_kept_as_objects() {
        let dir = tempfile::tempdir().unwrap();
        let a1 = content("a1", &["x", "y"]);
        {
            let s = Store::open(dir.path(), 1).unwrap();
            // As the agent before objects were stored once wrote it.
            s.contents.insert(b"a1", a1.1.as_slice()).unwrap();
            s.meta
                .insert(DESIRED_KEY, encode(&set(1, &[("a", "a1")])))
                .unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 2).unwrap();
        assert_eq!(s.contents.len(), 0);
        assert_eq!(s.object_count(), 2);
        assert_eq!(s.held_hashes().unwrap(), ["a1"]);
        assert_eq!(s.content("a1").unwrap().unwrap(), a1.1);
    }

    #[test]
    fn inventory_and_kinds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 1).unwrap();
            assert_eq!(s.inventory("a").unwrap(), None);
            assert!(s
                .set_inventory("a", &BTreeSet::from([obj("ConfigMap", "x")]))
                .unwrap());
            assert!(
                !s.set_inventory("a", &BTreeSet::from([obj("ConfigMap", "x")]))
                    .unwrap(),
                "the same inventory again changes nothing"
            );
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 1).unwrap();
        assert_eq!(s.inventory_bundles().unwrap(), ["a"]);
        assert_eq!(
            s.known_kinds().unwrap(),
            BTreeSet::from([("v1".to_string(), "ConfigMap".to_string())])
        );
        s.remove_bundle("a").unwrap();
        assert_eq!(s.inventory("a").unwrap(), None);
        assert_eq!(s.known_kinds().unwrap().len(), 1);
    }

    #[test]
    fn collected_objects_survive_reopen_until_applied_again_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let done = Health {
            status: flotilla_shared::health::HealthStatus::Current,
            message: "completed: 1/1 succeeded".into(),
        };
        let c = |name: &str, digest: &str| Collected {
            object: obj("Job", name),
            digest: digest.into(),
            health: done.clone(),
        };
        {
            let s = Store::open(dir.path(), 1).unwrap();
            assert!(s.collected("a").unwrap().is_empty());
            s.add_collected("a", c("create", "d1")).unwrap();
            s.add_collected("a", c("patch", "d2")).unwrap();
            s.add_collected("a", c("create", "d3")).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 1).unwrap();
        let mut held = s.collected("a").unwrap();
        held.sort_by(|x, y| x.object.cmp(&y.object));
        assert_eq!(
            held,
            [c("create", "d3"), c("patch", "d2")],
            "one per object"
        );
        assert!(!s
            .keep_collected(
                "a",
                &BTreeSet::from([obj("Job", "create"), obj("Job", "patch")])
            )
            .unwrap());
        assert!(s
            .keep_collected("a", &BTreeSet::from([obj("Job", "patch")]))
            .unwrap());
        assert_eq!(s.collected("a").unwrap(), [c("patch", "d2")]);
        s.remove_bundle("a").unwrap();
        assert!(s.collected("a").unwrap().is_empty());
    }

    #[test]
    fn intents_only_grow_the_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1).unwrap();
        assert!(s.intend("a", &BTreeSet::new()).unwrap(), "a first record");
        assert_eq!(s.inventory("a").unwrap(), Some(BTreeSet::new()));
        let x = obj("ConfigMap", "x");
        let y = obj("Secret", "y");
        assert!(s.intend("a", &BTreeSet::from([x.clone()])).unwrap());
        assert!(!s.intend("a", &BTreeSet::from([x.clone()])).unwrap());
        assert!(s.intend("a", &BTreeSet::from([y.clone()])).unwrap());
        assert_eq!(
            s.inventory("a").unwrap(),
            Some(BTreeSet::from([x.clone(), y]))
        );
        assert_eq!(s.known_kinds().unwrap().len(), 2);
        // Confirming what was applied shrinks it.
        assert!(s.set_inventory("a", &BTreeSet::from([x.clone()])).unwrap());
        assert_eq!(s.inventory("a").unwrap(), Some(BTreeSet::from([x])));
        let before = s.flushes();
        s.flush().unwrap();
        assert_eq!(s.flushes(), before + 1, "flushes are counted");
    }

    #[test]
    fn a_store_in_use_is_refused_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path(), 1).unwrap();
        held.record_status("a", "h", "r", BundleState::Ready, "", 1)
            .unwrap();
        held.flush().unwrap();
        assert!(Store::open(dir.path(), 2).is_err(), "the lock is held");
        let entries: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, [DB_DIR], "nothing moved aside");
        drop(held);
        let again = Store::open(dir.path(), 3).unwrap();
        assert!(again.last_status("a").unwrap().is_some(), "state kept");
    }

    #[test]
    fn statuses_seq_and_acks() {
        let dir = tempfile::tempdir().unwrap();
        let (first, acked);
        {
            let s = Store::open(dir.path(), 5).unwrap();
            acked = s.acked_seq().unwrap();
            first = s
                .record_status("a", "h", "r", BundleState::WaitApplied, "", 10)
                .unwrap();
            assert!(first.seq > acked);
            s.record_status("b", "h", "r", BundleState::Ready, "", 11)
                .unwrap();
            s.record_status("a", "h", "r", BundleState::Ready, "", 12)
                .unwrap();
            let pending = s.statuses_after(acked).unwrap();
            assert_eq!(pending.len(), 2, "latest per bundle");
            assert_eq!(pending[0].bundle, "b");
            assert_eq!(pending[1].state, BundleState::Ready);
            s.ack(first.seq + 1).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 99).unwrap();
        assert_eq!(s.acked_seq().unwrap(), first.seq + 1);
        let pending = s.statuses_after(s.acked_seq().unwrap()).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].bundle, "a");
        let next = s
            .record_status("c", "h", "r", BundleState::Ready, "", 13)
            .unwrap();
        assert_eq!(next.seq, first.seq + 3, "seq continues after reopen");
        s.ack(1).unwrap();
        assert_eq!(s.acked_seq().unwrap(), first.seq + 1, "acks never go back");
    }

    fn event(name: &str) -> DriftEvent {
        DriftEvent {
            id: 0,
            bundle: "b".into(),
            object: obj("ConfigMap", name),
            fields: vec![],
            manager: "kubectl-edit".into(),
            detected_at_unix_ms: 1,
            corrected: true,
            deleted: false,
        }
    }

    #[test]
    fn drift_events_wait_for_acks_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b);
        {
            let s = Store::open(dir.path(), 4).unwrap();
            a = s.record_drift(event("x")).unwrap();
            b = s.record_drift(event("y")).unwrap();
            assert_eq!(a.id, 4001);
            assert_eq!(b.id, 4002);
            s.ack_drift(a.id).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path(), 9).unwrap();
        assert_eq!(s.pending_drift().unwrap(), std::slice::from_ref(&b));
        let c = s.record_drift(event("z")).unwrap();
        assert_eq!(c.id, b.id + 1, "ids continue after reopen");
        s.ack_drift(b.id).unwrap();
        s.ack_drift(c.id).unwrap();
        assert!(s.pending_drift().unwrap().is_empty());
    }

    #[test]
    fn fresh_store_seeds_seq_from_clock() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 7).unwrap();
        let st = s
            .record_status("a", "h", "r", BundleState::Ready, "", 0)
            .unwrap();
        assert_eq!(st.seq, 7001);
    }

    #[test]
    fn unopenable_store_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        // A plain file where the database directory should be makes sled fail.
        std::fs::write(dir.path().join(DB_DIR), b"garbage").unwrap();
        let s = Store::open(dir.path(), 3).unwrap();
        assert_eq!(s.desired().unwrap(), None);
        assert!(dir.path().join(format!("{DB_DIR}.corrupt-3")).exists());
    }
}
