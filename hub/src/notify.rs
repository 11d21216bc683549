//! Notifications, the doing half (`flotilla_shared::notify` decides):
//!
//! - the **decide loop** looks at the fleet when an operator-visible change is
//!   observed (and every `TICK`, for grace periods), asks each notification what
//!   it has to say, and writes its new memory and its messages to the outbox in
//!   one atomic batch, flushed before anything is sent;
//! - the **delivery loop** sends each notification's oldest undelivered message,
//!   one at a time per notification, and removes it only once the sink answered
//!   2xx. A failure is retried with exponential backoff (`backoff`) until the
//!   message is `MAX_AGE` old; a 4xx other than 408/429 drops it.
//!
//! Delivery is at least once: a hub killed between the sink's answer and the
//! removal sends the message again after its restart, with the same
//! `Idempotency-Key`. A restart never makes a new message for an old transition,
//! since the memory was written with the messages.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_shared::labels::Labels;
use flotilla_shared::notify::{self, DriftSeen, NotificationSpec, SinkType};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::fleet::{Action, Fleet};
use crate::store::{NotificationRecord, OutboxEntry, Store, StoreError};

/// The decide loop looks at least this often (grace periods end without news).
pub const TICK: Duration = Duration::from_secs(2);
/// Coalesces bursts of changes into one look.
const COALESCE: Duration = Duration::from_millis(250);
/// A message not delivered after this long is dropped (and counted).
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// One attempt's deadline.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries in flight at once (each to a different notification).
const MAX_IN_FLIGHT: usize = 16;
/// Drift events read per look.
const DRIFT_BATCH: usize = 10_000;
/// Header carrying a webhook's HMAC-SHA256 of the body, `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-flotilla-signature-256";

/// The wait after `attempts` failed attempts: 1 s doubling, at most 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

pub use flotilla_shared::api::NotificationView;

/// What the sink answered.
enum Sent {
    Delivered,
    Retry(String),
    Drop(String),
}

pub struct Notifier {
    store: Arc<dyn Store>,
    specs: Mutex<BTreeMap<String, NotificationRecord>>,
    deliver: Notify,
    client: reqwest::Client,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Notifier {
    pub fn load(store: Arc<dyn Store>) -> anyhow::Result<Arc<Notifier>> {
        let specs = store
            .list_notifications()?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let client = reqwest::Client::builder()
            // A redirect would carry the signature elsewhere: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("flotilla-hub/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Notifier {
            store,
            specs: Mutex::new(specs),
            deliver: Notify::new(),
            client,
        }))
    }

    fn specs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NotificationRecord>> {
        self.specs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `kind: Notification` through `apply`. A new notification takes its first
    /// look (its baseline) before this returns, so that every change after the
    /// apply is news to it, however busy the decide loop is.
    pub fn apply(
        &self,
        fleet: &Fleet,
        name: &str,
        labels: Labels,
        spec: NotificationSpec,
    ) -> Result<Action, StoreError> {
        let record = NotificationRecord {
            name: name.to_string(),
            labels,
            spec,
        };
        let mut specs = self.specs();
        let action = match specs.get(name) {
            None => Action::Created,
            Some(r) if *r == record => return Ok(Action::Unchanged),
            Some(_) => Action::Configured,
        };
        self.store.put_notification(&record)?;
        self.store.flush()?;
        specs.insert(name.to_string(), record);
        drop(specs);
        if self.decide_once(fleet, crate::now_ms())? {
            self.deliver.notify_one();
        }
        Ok(action)
    }

    /// Deletes a notification and what it had not delivered yet.
    pub fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let mut specs = self.specs();
        let existed = self.store.delete_notification(name)?;
        self.store.flush()?;
        specs.remove(name);
        Ok(existed)
    }

    pub fn views(&self) -> Result<Vec<NotificationView>, StoreError> {
        let outbox = self.store.outbox()?;
        Ok(self
            .specs()
            .values()
            .map(|r| {
                let mine: Vec<&OutboxEntry> =
                    outbox.iter().filter(|e| e.notification == r.name).collect();
                NotificationView {
                    name: r.name.clone(),
                    sink: r.spec.sink,
                    url: r.spec.url.as_deref().map(notify::shown_url),
                    secret_ref: r.spec.secret_ref.clone(),
                    events: r.spec.events.clone(),
                    bundle_selector: r.spec.bundle_selector.clone(),
                    cluster_selector: r.spec.cluster_selector.clone(),
                    queued: mine.len(),
                    last_error: mine.first().and_then(|e| e.last_error.clone()),
                }
            })
            .collect())
    }

    /// Runs both loops until `stop`.
    pub async fn run(self: Arc<Self>, fleet: Arc<Fleet>, stop: watch::Receiver<bool>) {
        let decide = tokio::spawn(self.clone().decide_loop(fleet.clone(), stop.clone()));
        let deliver = tokio::spawn(self.deliver_loop(fleet, stop));
        let _ = tokio::join!(decide, deliver);
    }

    async fn decide_loop(self: Arc<Self>, fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
        let mut observed = fleet.subscribe_observed();
        loop {
            let this = self.clone();
            let f = fleet.clone();
            match tokio::task::spawn_blocking(move || this.decide_once(&f, crate::now_ms())).await {
                Ok(Ok(true)) => self.deliver.notify_one(),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::error!(%error, "notifications: deciding failed"),
                Err(error) => tracing::error!(%error, "notifications: deciding panicked"),
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = observed.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(COALESCE) => {}
            }
        }
    }

    /// One look at the fleet for every notification. Returns whether messages
    /// were queued (flushed).
    pub fn decide_once(&self, fleet: &Fleet, now_ms: u64) -> Result<bool, StoreError> {
        let specs: Vec<NotificationRecord> = self.specs().values().cloned().collect();
        if specs.is_empty() {
            return Ok(false);
        }
        let mut memories = Vec::with_capacity(specs.len());
        for r in &specs {
            memories.push(self.store.notify_memory(&r.name)?);
        }
        let mut world = fleet.notify_world(now_ms);
        world.drift_last_id = self.store.drift_last_id()?;
        let after = memories
            .iter()
            .map(|m| m.as_ref().map_or(world.drift_last_id, |m| m.drift_after))
            .min()
            .unwrap_or(world.drift_last_id);
        if after < world.drift_last_id {
            world.drift = self
                .store
                .drift_after(after, DRIFT_BATCH)?
                .into_iter()
                .map(|d| DriftSeen {
                    id: d.id,
                    object: format!(
                        "{} {}{}",
                        d.event.object.kind,
                        d.event
                            .object
                            .namespace
                            .as_deref()
                            .map(|n| format!("{n}/"))
                            .unwrap_or_default(),
                        d.event.object.name
                    ),
                    fields: d.event.fields.iter().map(|f| f.path.clone()).collect(),
                    manager: d.event.manager.clone(),
                    corrected: d.event.corrected,
                    bundle: d.event.bundle,
                    cluster: d.cluster,
                })
                .collect();
            // Beyond one batch, the rest waits for the next look.
            if let Some(last) = world.drift.last() {
                world.drift_last_id = world.drift_last_id.min(last.id);
            }
        }
        let mut queued = false;
        for (r, memory) in specs.iter().zip(memories) {
            let (next, messages) = notify::decide(&r.name, &r.spec, memory.as_ref(), &world);
            if memory.as_ref() == Some(&next) && messages.is_empty() {
                continue;
            }
            // The spec may have been deleted meanwhile: its memory must not come back.
            let guard = self.specs();
            if !guard.contains_key(&r.name) {
                continue;
            }
            if !messages.is_empty() {
                queued = true;
                for m in &messages {
                    tracing::info!(
                        notification = %r.name,
                        key = %m.key,
                        events = ?m.events,
                        title = %m.title,
                        "notification queued"
                    );
                }
            }
            self.store.commit_notify(&r.name, &next, messages, now_ms)?;
            drop(guard);
        }
        self.store.flush()?;
        Ok(queued)
    }

    async fn deliver_loop(self: Arc<Self>, fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let busy: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        loop {
            let mut wait = TICK * 5;
            match self.store.outbox() {
                Ok(outbox) => {
                    fleet.metrics.notification_outbox.set(outbox.len() as i64);
                    let now = crate::now_ms();
                    let mut heads = BTreeSet::new();
                    for entry in outbox {
                        // Each notification's oldest message, in order.
                        if !heads.insert(entry.notification.clone()) {
                            continue;
                        }
                        if entry.next_attempt_ms > now {
                            wait = wait.min(Duration::from_millis(entry.next_attempt_ms - now));
                            continue;
                        }
                        if in_flight.len() >= MAX_IN_FLIGHT {
                            break;
                        }
                        let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
                        if !b.insert(entry.notification.clone()) {
                            continue;
                        }
                        drop(b);
                        let (this, fleet, busy) = (self.clone(), fleet.clone(), busy.clone());
                        in_flight.spawn(async move {
                            let name = entry.notification.clone();
                            this.deliver_one(&fleet, entry).await;
                            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                            this.deliver.notify_one();
                        });
                    }
                }
                Err(error) => tracing::error!(%error, "notifications: reading the outbox failed"),
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {
                    in_flight.abort_all();
                    return;
                }
                _ = self.deliver.notified() => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn deliver_one(&self, fleet: &Fleet, mut entry: OutboxEntry) {
        let record = self.specs().get(&entry.notification).cloned();
        let Some(record) = record else {
            // Deleted: its messages go with it.
            let _ = self.store.remove_outbox(entry.id);
            return;
        };
        let sent = self.send(&record, &entry).await;
        let count = |result: &str| {
            fleet
                .metrics
                .notification_deliveries
                .get_or_create(&crate::metrics::Delivery {
                    notification: record.name.clone(),
                    result: result.to_string(),
                })
                .inc();
        };
        let now = crate::now_ms();
        let outcome = match sent {
            Sent::Delivered => {
                count("delivered");
                tracing::info!(notification = %record.name, key = %entry.message.key, attempts = entry.attempts + 1, "notification delivered");
                self.store.remove_outbox(entry.id)
            }
            Sent::Drop(reason) => {
                count("dropped");
                tracing::warn!(notification = %record.name, key = %entry.message.key, %reason, "notification dropped");
                self.store.remove_outbox(entry.id)
            }
            Sent::Retry(reason) => {
                count("failed");
                entry.attempts += 1;
                let too_old = now.saturating_sub(entry.created_ms) >= MAX_AGE.as_millis() as u64;
                if too_old {
                    count("dropped");
                    tracing::warn!(notification = %record.name, key = %entry.message.key, %reason, attempts = entry.attempts, "notification dropped: undelivered for too long");
                    self.store.remove_outbox(entry.id)
                } else {
                    let wait = backoff(entry.attempts);
                    tracing::warn!(notification = %record.name, key = %entry.message.key, %reason, attempts = entry.attempts, retry_in = ?wait, "notification delivery failed");
                    entry.next_attempt_ms = now + wait.as_millis() as u64;
                    entry.last_error = Some(reason);
                    self.store.put_outbox(&entry)
                }
            }
        };
        if let Err(error) = outcome.and_then(|()| self.store.flush()) {
            tracing::error!(%error, "notifications: updating the outbox failed");
        }
    }

    /// One attempt. Errors never name the URL (a Slack URL is a credential).
    async fn send(&self, record: &NotificationRecord, entry: &OutboxEntry) -> Sent {
        let spec = &record.spec;
        let secret = match &spec.secret_ref {
            None => None,
            Some(name) => match self.store.get_secret(name) {
                Ok(Some(s)) => Some(s),
                Ok(None) => return Sent::Retry(format!("secret {name} not found")),
                Err(error) => return Sent::Retry(format!("secret {name}: {error}")),
            },
        };
        let url = match (spec.sink, &spec.url) {
            (_, Some(url)) => url.clone(),
            (SinkType::Slack, None) => match secret.as_ref().and_then(|s| s.url.clone()) {
                Some(url) => url,
                None => {
                    return Sent::Retry(format!(
                        "secret {} holds no url",
                        spec.secret_ref.as_deref().unwrap_or_default()
                    ))
                }
            },
            (SinkType::Webhook, None) => return Sent::Drop("no url".into()),
        };
        let body = match spec.sink {
            SinkType::Webhook => serde_json::to_vec(&entry.message.body),
            SinkType::Slack => {
                serde_json::to_vec(&notify::slack_body(&record.name, &entry.message))
            }
        }
        .unwrap_or_default();
        let events = entry
            .message
            .events
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut req = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", &entry.message.key)
            .header("x-flotilla-event", events)
            .header(
                "x-flotilla-delivery-attempt",
                (entry.attempts + 1).to_string(),
            );
        if spec.sink == SinkType::Webhook {
            if let Some(key) = secret.as_ref().and_then(|s| s.webhook_secret.as_deref()) {
                req = req.header(SIGNATURE_HEADER, signature(key.as_bytes(), &body));
            }
        }
        match req.body(body).send().await {
            Ok(resp) => {
                let status = resp.status();
                if status.is_success() {
                    Sent::Delivered
                } else if status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                {
                    Sent::Retry(format!("the sink answered {status}"))
                } else if status.is_redirection() {
                    Sent::Drop(format!(
                        "the sink answered {status}: redirects are not followed"
                    ))
                } else {
                    Sent::Drop(format!("the sink answered {status}"))
                }
            }
            Err(error) => Sent::Retry(error.without_url().to_string()),
        }
    }
}

/// `sha256=<hex of HMAC-SHA256(key, body)>`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
