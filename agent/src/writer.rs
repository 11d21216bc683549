//! The one writer of the agent's store. Every store call (statuses, drift events, the
//! Desired set, inventories, acks, and the reads of the session and the reconciler)
//! goes through one bounded channel to one thread, which runs the calls in arrival
//! order against sled, off the async threads, and flushes each batch once. A caller
//! waiting on a write (an ack to the hub, objects about to be applied) hears back only
//! after that flush; the session hears of new statuses and drift events (the
//! `recorded` watch) only then too, and its reads see only what is durable.
//!
//! Producers send a decision with what it decided ([`Entry`]) from under the lock they
//! decided under (a [`Slot`] reserved beforehand), so records follow the order of
//! decisions: the status sequence and drift ids are monotonic and in decision order.

use std::collections::BTreeSet;

use flotilla_shared::bundle::ObjectRef;
use flotilla_shared::drift::DriftEvent;
use flotilla_shared::state::BundleState;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, warn};

use crate::error::{Error, Result};
use crate::plan;
use crate::store::{DesiredBundle, DesiredSet, Status, Store};

/// Commands queued before producers wait: room for a burst of health changes across
/// many bundles, small enough that a stalled disk holds the watches back instead of
/// growing memory.
pub const QUEUE: usize = 256;

/// Commands run between two flushes at most, so a long queue still hears back early.
const MAX_BATCH: usize = 256;

/// A decision to record, with everything it decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A bundle's content is about to be applied: `WaitApplied`, unless the hub has
    /// heard of this content from us already (re-applies do not flap the state).
    Applying {
        bundle: DesiredBundle,
        at_unix_ms: i64,
    },
    /// A bundle's state; recorded if it differs from the last one.
    Status {
        bundle: DesiredBundle,
        state: BundleState,
        message: String,
        at_unix_ms: i64,
    },
    /// A drift event; the store gives it its id.
    Drift(DriftEvent),
    /// Kubernetes collected an object of a bundle as it asked (not drift).
    Collected {
        bundle: String,
        collected: crate::store::Collected,
    },
    /// Only these objects of a bundle stay remembered as collected (the others
    /// were applied again or left the bundle).
    KeepCollected {
        bundle: String,
        keep: BTreeSet<ObjectRef>,
    },
}

type Done = oneshot::Sender<Result<()>>;
/// A read; given no store when the writes before it could not be made durable.
type ReadFn = Box<dyn FnOnce(Option<&Store>) + Send>;

enum Command {
    Record(Vec<Entry>),
    SaveDesired {
        set: DesiredSet,
        contents: Vec<(String, Vec<u8>)>,
        done: Done,
    },
    Intend {
        bundle: String,
        objects: BTreeSet<ObjectRef>,
        done: Done,
    },
    SetInventory {
        bundle: String,
        objects: BTreeSet<ObjectRef>,
        done: Done,
    },
    RemoveBundle {
        bundle: String,
        done: Done,
    },
    Ack(u64),
    AckDrift(u64),
    Read(ReadFn),
    /// Holds the writer until told to go on (tests only: to see what waits for what).
    #[cfg(test)]
    Gate(std::sync::mpsc::Receiver<()>),
}

/// A handle on the writer; clones share it. The thread stops once every handle is gone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
}

/// A place reserved in the writer's queue: reserve it before taking the lock you decide
/// under, fill it before letting go of that lock.
pub struct Slot<'a>(mpsc::Permit<'a, Command>);

impl Slot<'_> {
    /// Queues what was decided (nothing, if nothing was).
    pub fn record(self, entries: Vec<Entry>) {
        if !entries.is_empty() {
            self.0.send(Command::Record(entries));
        }
    }
}

fn gone() -> Error {
    Error::Writer("the store's writer has stopped".into())
}

impl Writer {
    /// Starts the writer on its own thread. The receiver carries the seq of the newest
    /// durable status, and changes also when a drift event became durable.
    pub fn spawn(store: Store) -> Result<(Writer, watch::Receiver<u64>)> {
        Self::with_capacity(store, QUEUE)
    }

    /// [`Writer::spawn`] with a queue of `capacity` commands.
    pub fn with_capacity(store: Store, capacity: usize) -> Result<(Writer, watch::Receiver<u64>)> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (recorded_tx, recorded_rx) = watch::channel(0u64);
        std::thread::Builder::new()
            .name("flotilla-store".into())
            .spawn(move || run(store, rx, recorded_tx))
            .map_err(|e| Error::Writer(format!("cannot start the store's writer: {e}")))?;
        Ok((Writer { tx }, recorded_rx))
    }

    async fn call(&self, command: impl FnOnce(Done) -> Command) -> Result<()> {
        let (done, answer) = oneshot::channel();
        self.tx.send(command(done)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// A place in the queue, for a decision about to be made.
    pub async fn reserve(&self) -> Result<Slot<'_>> {
        self.tx.reserve().await.map(Slot).map_err(|_| gone())
    }

    /// Queues decisions (in the order of the calls); they are announced once durable.
    pub async fn record(&self, entries: Vec<Entry>) -> Result<()> {
        self.reserve().await?.record(entries);
        Ok(())
    }

    /// Stores a Desired set and its new contents; returns once durable (it may be
    /// acknowledged then).
    pub async fn save_desired(
        &self,
        set: DesiredSet,
        contents: Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        self.call(|done| Command::SaveDesired {
            set,
            contents,
            done,
        })
        .await
    }

    /// Adds objects to a bundle's inventory; returns once durable (they may be applied then).
    pub async fn intend(&self, bundle: &str, objects: BTreeSet<ObjectRef>) -> Result<()> {
        self.call(|done| Command::Intend {
            bundle: bundle.to_string(),
            objects,
            done,
        })
        .await
    }

    /// Replaces a bundle's inventory with what it holds now; returns once durable.
    pub async fn set_inventory(&self, bundle: &str, objects: BTreeSet<ObjectRef>) -> Result<()> {
        self.call(|done| Command::SetInventory {
            bundle: bundle.to_string(),
            objects,
            done,
        })
        .await
    }

    /// Forgets a removed bundle (inventory and status); returns once durable.
    pub async fn remove_bundle(&self, bundle: &str) -> Result<()> {
        self.call(|done| Command::RemoveBundle {
            bundle: bundle.to_string(),
            done,
        })
        .await
    }

    /// The hub acknowledged statuses up to `seq`. Not flushed on its own: a lost ack
    /// only makes the session send those statuses again, and the hub drops repeats.
    pub async fn ack(&self, seq: u64) -> Result<()> {
        self.tx.send(Command::Ack(seq)).await.map_err(|_| gone())
    }

    /// The hub stored drift event `id`; not flushed on its own, like [`Writer::ack`].
    pub async fn ack_drift(&self, id: u64) -> Result<()> {
        self.tx
            .send(Command::AckDrift(id))
            .await
            .map_err(|_| gone())
    }

    /// Runs `f` on the writer's thread after everything queued before it, and after
    /// those writes are durable: it sees nothing that a crash could take back.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: ReadFn = Box::new(move |s: Option<&Store>| {
            let _ = tx.send(match s {
                Some(s) => f(s),
                None => Err(Error::Writer(
                    "the writes before this read are not durable: flush failed".into(),
                )),
            });
        });
        self.tx.send(Command::Read(job)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Returns once everything queued before is durable (and announced).
    pub async fn sync(&self) -> Result<()> {
        self.read(|_| Ok(())).await
    }

    /// Queues a stop: the writer holds there until the returned sender sends.
    #[cfg(test)]
    async fn gate(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(Command::Gate(rx)).await.ok();
        tx
    }

    /// Holds an idle writer: returns once it waits at the gate, its queue empty.
    #[cfg(test)]
    async fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let go = self.gate().await;
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while self.tx.capacity() < self.tx.max_capacity() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writer takes the gate");
        go
    }
}

/// The writer's thread: batches of commands, each batch flushed once.
fn run(store: Store, mut rx: mpsc::Receiver<Command>, recorded: watch::Sender<u64>) {
    let mut batch = Batch::default();
    while let Some(first) = rx.blocking_recv() {
        batch.run(&store, first, &recorded);
        for _ in 1..MAX_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            batch.run(&store, next, &recorded);
        }
        batch.commit(&store, &recorded);
    }
    // Every handle is gone: acks may still wait for a flush.
    if let Err(e) = store.flush() {
        warn!(error = %e, "cannot flush the state store on shutdown");
    }
}

/// What a batch did that must wait for its flush.
#[derive(Default)]
struct Batch {
    /// Writes someone relies on since the last successful flush.
    dirty: bool,
    /// Callers to answer after the flush, with what their command returned.
    waiting: Vec<(Done, Result<()>)>,
    /// A status or drift event was recorded: tell the session after the flush.
    announce: bool,
    /// The seq of the newest status recorded.
    seq: Option<u64>,
}

impl Batch {
    fn run(&mut self, store: &Store, command: Command, recorded: &watch::Sender<u64>) {
        match command {
            Command::Record(entries) => {
                for e in entries {
                    self.record(store, e);
                }
            }
            Command::SaveDesired {
                set,
                contents,
                done,
            } => {
                let r = store.save_desired(&set, &contents).map(|()| true);
                self.wrote(done, r);
            }
            Command::Intend {
                bundle,
                objects,
                done,
            } => self.wrote(done, store.intend(&bundle, &objects)),
            Command::SetInventory {
                bundle,
                objects,
                done,
            } => self.wrote(done, store.set_inventory(&bundle, &objects)),
            Command::RemoveBundle { bundle, done } => {
                let r = store.remove_bundle(&bundle).map(|()| true);
                self.wrote(done, r);
            }
            Command::Ack(seq) => {
                if let Err(e) = store.ack(seq) {
                    warn!(error = %e, seq, "cannot note a status acknowledgement");
                }
            }
            Command::AckDrift(id) => {
                if let Err(e) = store.ack_drift(id) {
                    warn!(error = %e, id, "cannot note a drift acknowledgement");
                }
            }
            Command::Read(f) => {
                if self.dirty {
                    self.commit(store, recorded);
                }
                f((!self.dirty).then_some(store));
            }
            #[cfg(test)]
            Command::Gate(go) => {
                let _ = go.recv();
            }
        }
    }

    /// Notes a write's result; `Ok(true)`: something changed that must be flushed.
    fn wrote(&mut self, done: Done, r: Result<bool>) {
        if matches!(r, Ok(true)) {
            self.dirty = true;
        }
        self.waiting.push((done, r.map(|_| ())));
    }

    fn record(&mut self, store: &Store, entry: Entry) {
        match entry {
            Entry::Applying { bundle, at_unix_ms } => {
                let last = last_status(store, &bundle.name);
                if plan::announce_wait(last.as_ref(), &bundle.content_hash, &bundle.revision) {
                    self.status(store, &bundle, BundleState::WaitApplied, "", at_unix_ms);
                }
            }
            Entry::Status {
                bundle,
                state,
                message,
                at_unix_ms,
            } => {
                let last = last_status(store, &bundle.name);
                if plan::worth_reporting(
                    last.as_ref(),
                    &bundle.content_hash,
                    &bundle.revision,
                    state,
                    &message,
                ) {
                    self.status(store, &bundle, state, &message, at_unix_ms);
                }
            }
            Entry::Drift(event) => match store.record_drift(event) {
                Ok(_) => {
                    self.dirty = true;
                    self.announce = true;
                }
                Err(e) => error!(error = %e, "cannot record a drift event"),
            },
            Entry::Collected { bundle, collected } => {
                match store.add_collected(&bundle, collected) {
                    Ok(()) => self.dirty = true,
                    Err(e) => error!(error = %e, "cannot record a collected object"),
                }
            }
            Entry::KeepCollected { bundle, keep } => match store.keep_collected(&bundle, &keep) {
                Ok(changed) => self.dirty |= changed,
                Err(e) => error!(error = %e, "cannot forget collected objects"),
            },
        }
    }

    fn status(
        &mut self,
        store: &Store,
        b: &DesiredBundle,
        state: BundleState,
        message: &str,
        at_unix_ms: i64,
    ) {
        match store.record_status(
            &b.name,
            &b.content_hash,
            &b.revision,
            state,
            message,
            at_unix_ms,
        ) {
            Ok(s) => {
                self.dirty = true;
                self.announce = true;
                self.seq = Some(s.seq);
            }
            Err(e) => error!(bundle = %b.name, error = %e, "cannot record a status"),
        }
    }

    /// Flushes (once, if anything needs it), then answers the callers and tells the
    /// session. A failed flush fails its callers; its records stay pending and are
    /// announced after the next flush that works.
    fn commit(&mut self, store: &Store, recorded: &watch::Sender<u64>) {
        if self.dirty {
            if let Err(e) = store.flush() {
                error!(error = %e, "cannot flush the state store");
                for (done, _) in self.waiting.drain(..) {
                    let _ = done.send(Err(Error::Writer(format!("flush failed: {e}"))));
                }
                return;
            }
            self.dirty = false;
        }
        for (done, r) in self.waiting.drain(..) {
            let _ = done.send(r);
        }
        if std::mem::take(&mut self.announce) {
            let seq = self.seq.take().unwrap_or_else(|| *recorded.borrow());
            recorded.send_replace(seq);
        }
    }
}

fn last_status(store: &Store, bundle: &str) -> Option<Status> {
    store.last_status(bundle).unwrap_or_else(|e| {
        warn!(%bundle, error = %e, "unreadable last status");
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::FutureExt;

    use crate::clock::{Clock, FixedClock};

    /// Waits for a condition that must come true soon.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn bundle(name: &str, hash: &str) -> DesiredBundle {
        DesiredBundle {
            name: name.into(),
            content_hash: hash.into(),
            revision: "r1".into(),
        }
    }

    fn status(name: &str, state: BundleState, message: &str, at: i64) -> Entry {
        Entry::Status {
            bundle: bundle(name, "h"),
            state,
            message: message.into(),
            at_unix_ms: at,
        }
    }

    fn drift(name: &str, at: i64) -> Entry {
        Entry::Drift(DriftEvent {
            id: 0,
            bundle: "b".into(),
            object: ObjectRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: Some("ns".into()),
                name: name.into(),
            },
            fields: vec![],
            manager: "kubectl-edit".into(),
            detected_at_unix_ms: at,
            corrected: false,
            deleted: false,
        })
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1).unwrap();
        (dir, store)
    }

    /// Producers on several threads decide under one lock (a counter stands for the
    /// book) and send from under it: statuses and drift ids follow the decisions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn records_follow_the_order_of_decisions() {
        let (_dir, store) = open();
        let (writer, _recorded) = Writer::with_capacity(store.clone(), 4).unwrap();
        let clock = FixedClock::new(1_000);
        let decisions = Arc::new(Mutex::new(0i64));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (writer, decisions, clock) = (writer.clone(), decisions.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let slot = writer.reserve().await.unwrap();
                    {
                        let mut n = decisions.lock().unwrap();
                        *n += 1;
                        clock.advance(1);
                        slot.record(vec![
                            status(&format!("b{n:04}"), BundleState::Ready, "", *n),
                            drift(&format!("o{n:04}"), clock.now_unix_ms()),
                        ]);
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        writer.sync().await.unwrap();
        let statuses = store.statuses_after(0).unwrap();
        assert_eq!(statuses.len(), 400);
        let by_seq: Vec<i64> = statuses.iter().map(|s| s.observed_at_unix_ms).collect();
        assert!(
            by_seq.windows(2).all(|w| w[0] < w[1]),
            "statuses in decision order"
        );
        let events = store.pending_drift().unwrap();
        assert_eq!(events.len(), 400);
        assert!(
            events
                .windows(2)
                .all(|w| w[0].id < w[1].id && w[0].detected_at_unix_ms < w[1].detected_at_unix_ms),
            "drift ids in decision order"
        );
    }

    #[tokio::test]
    async fn a_full_queue_makes_producers_wait() {
        let (_dir, store) = open();
        let (writer, _recorded) = Writer::with_capacity(store.clone(), 2).unwrap();
        let go = writer.hold().await;
        writer
            .record(vec![status("a", BundleState::Ready, "", 1)])
            .await
            .unwrap();
        writer
            .record(vec![status("b", BundleState::Ready, "", 2)])
            .await
            .unwrap();
        assert!(
            writer.reserve().now_or_never().is_none(),
            "the third producer waits while the writer is held"
        );
        go.send(()).unwrap();
        let third = tokio::time::timeout(DEADLINE, writer.reserve())
            .await
            .expect("room again once the writer drains")
            .unwrap();
        third.record(vec![status("c", BundleState::Ready, "", 3)]);
        writer.sync().await.unwrap();
        assert_eq!(store.statuses_after(0).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn nothing_is_announced_or_answered_before_its_flush() {
        let (_dir, store) = open();
        let (writer, mut recorded) = Writer::spawn(store.clone()).unwrap();
        let first = writer.hold().await;
        writer
            .record(vec![status("a", BundleState::Ready, "", 1)])
            .await
            .unwrap();
        let save = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .save_desired(
                        DesiredSet {
                            generation: 3,
                            bundles: vec![bundle("a", "h")],
                            signed: None,
                        },
                        vec![("h".into(), b"content".to_vec())],
                    )
                    .await
            }
        });
        // The save is queued behind the record; a second gate holds the batch after both.
        tokio::time::timeout(DEADLINE, async {
            while writer.tx.capacity() > QUEUE - 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the save is queued");
        let second = writer.gate().await;
        let flushes = store.flushes();
        first.send(()).unwrap();
        // The batch ran up to the second gate: written, not flushed.
        tokio::time::timeout(DEADLINE, async {
            while store.desired().unwrap().is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the batch runs");
        assert_eq!(store.flushes(), flushes, "not flushed yet");
        assert!(
            !recorded.has_changed().unwrap(),
            "not announced before the flush"
        );
        assert!(!save.is_finished(), "not answered before the flush");
        second.send(()).unwrap();
        tokio::time::timeout(DEADLINE, recorded.changed())
            .await
            .expect("announced after the flush")
            .unwrap();
        tokio::time::timeout(DEADLINE, save)
            .await
            .expect("answered after the flush")
            .unwrap()
            .unwrap();
        assert_eq!(store.flushes(), flushes + 1, "one flush for the batch");
        let seq = *recorded.borrow();
        assert_eq!(store.last_status("a").unwrap().unwrap().seq, seq);
    }

    #[tokio::test]
    async fn the_writer_decides_what_is_worth_recording() {
        let (_dir, store) = open();
        let (writer, _recorded) = Writer::spawn(store.clone()).unwrap();
        let clock = FixedClock::new(5_000);
        let applying = Entry::Applying {
            bundle: bundle("a", "h"),
            at_unix_ms: clock.now_unix_ms(),
        };
        writer.record(vec![applying.clone()]).await.unwrap();
        writer.sync().await.unwrap();
        let wait = store.last_status("a").unwrap().unwrap();
        assert_eq!(
            (wait.state, wait.observed_at_unix_ms),
            (BundleState::WaitApplied, 5_000)
        );
        clock.advance(10);
        // Applying the same content again announces nothing; the same state twice is
        // recorded once.
        writer.record(vec![applying]).await.unwrap();
        let ready = status("a", BundleState::Ready, "", clock.now_unix_ms());
        writer.record(vec![ready.clone(), ready]).await.unwrap();
        writer.sync().await.unwrap();
        let last = store.last_status("a").unwrap().unwrap();
        assert_eq!(last.seq, wait.seq + 1);
        assert_eq!(
            (last.state, last.observed_at_unix_ms),
            (BundleState::Ready, 5_010)
        );
    }

    #[tokio::test]
    async fn a_batch_flushes_once() {
        let (_dir, store) = open();
        let (writer, _recorded) = Writer::spawn(store.clone()).unwrap();
        let go = writer.hold().await;
        for i in 0..100 {
            writer
                .record(vec![status(&format!("b{i}"), BundleState::Ready, "", i)])
                .await
                .unwrap();
        }
        let before = store.flushes();
        go.send(()).unwrap();
        writer.sync().await.unwrap();
        assert_eq!(store.flushes(), before + 1);
        assert_eq!(store.statuses_after(0).unwrap().len(), 100);
        // Reads and acks alone flush nothing.
        writer.ack(5).await.unwrap();
        writer.sync().await.unwrap();
        assert_eq!(store.flushes(), before + 1);
    }
}
