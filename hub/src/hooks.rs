//! The Git push webhook, `POST /hooks/git`, on its own listener
//! (`--webhook-listen`) and outside the admin token: a rate limit per peer, the
//! signature checked against the secrets of the sources the push is for, replays
//! (same delivery id, or same signed body) dropped, and only the sources that
//! accept the secret the hook was signed with woken. Webhooks only wake pollers;
//! they never carry content.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use flotilla_shared::objects::GitSourceSpec;
use flotilla_shared::webhook::{self, HookError, HookKey};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::Hub;

/// Webhook bodies are small JSON documents; GitHub caps them at 25 MB, a push of
/// a few commits is a few KiB. Larger bodies are refused while being read.
pub const HOOK_BODY_LIMIT: usize = 1 << 20;
/// Hooks one peer may send at once: a forge delivers one hook per push and
/// repository, so even a burst of pushes to many repositories fits.
pub const RATE_BURST: u32 = 30;
/// Hooks per second a peer may send once its burst is spent: well above what
/// forges send, well below what makes the hub hash megabytes all day.
pub const RATE_PER_SECOND: u32 = 5;
/// Peers tracked at most (a few dozen bytes each). A flood from more addresses
/// than this forgets idle peers first.
const MAX_PEERS: usize = 10_000;
/// How long a delivery is remembered: forges retry failed deliveries within
/// minutes, and a replay after this only costs one fetch.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(3600);
/// Deliveries remembered at most (two 32-byte digests each, a few MiB in all).
const MAX_DELIVERIES: usize = 50_000;

/// A token bucket per peer address (IPv6 per /64: one host has a whole prefix).
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    peers: HashMap<IpAddr, (f64, Instant)>,
    max_peers: usize,
}

impl RateLimiter {
    pub fn new(burst: u32, per_second: u32) -> RateLimiter {
        RateLimiter {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            peers: HashMap::new(),
            max_peers: MAX_PEERS,
        }
    }

    /// Takes one token of `peer`'s bucket; false when it is empty.
    pub fn allow(&mut self, peer: IpAddr, now: Instant) -> bool {
        let peer = peer_key(peer);
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            self.forget_idle(now);
        }
        let (burst, rate) = (self.burst, self.per_second);
        let (tokens, at) = self.peers.entry(peer).or_insert((burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops peers whose bucket is full again (they would start full anyway);
    /// if every peer is busy, the half seen longest ago.
    fn forget_idle(&mut self, now: Instant) {
        let (burst, rate) = (self.burst, self.per_second);
        self.peers.retain(|_, (tokens, at)| {
            *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
        });
        if self.peers.len() >= self.max_peers {
            let mut seen: Vec<Instant> = self.peers.values().map(|(_, at)| *at).collect();
            seen.sort();
            let cut = seen[seen.len() / 2];
            self.peers.retain(|_, (_, at)| *at > cut);
        }
    }
}

fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

/// Deliveries seen lately, as digests, oldest first; bounded in time and count.
pub struct Replays {
    window: Duration,
    max: usize,
    order: VecDeque<(Instant, [u8; 32])>,
    seen: HashSet<[u8; 32]>,
}

impl Replays {
    pub fn new(window: Duration, max: usize) -> Replays {
        Replays {
            window,
            max: max.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// Records a delivery by its digests; true if one of them was seen within
    /// the window (a replay).
    pub fn seen_before(&mut self, digests: &[[u8; 32]], now: Instant) -> bool {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.window)
        {
            self.forget_oldest();
        }
        let replay = digests.iter().any(|d| self.seen.contains(d));
        for d in digests {
            if self.seen.insert(*d) {
                self.order.push_back((now, *d));
            }
        }
        while self.order.len() > self.max {
            self.forget_oldest();
        }
        replay
    }

    fn forget_oldest(&mut self) {
        if let Some((_, d)) = self.order.pop_front() {
            self.seen.remove(&d);
        }
    }
}

/// What the webhook route remembers between deliveries.
pub struct HookGuard {
    limiter: Mutex<RateLimiter>,
    replays: Mutex<Replays>,
}

impl Default for HookGuard {
    fn default() -> HookGuard {
        HookGuard {
            limiter: Mutex::new(RateLimiter::new(RATE_BURST, RATE_PER_SECOND)),
            replays: Mutex::new(Replays::new(REPLAY_WINDOW, MAX_DELIVERIES)),
        }
    }
}

impl HookGuard {
    fn allow(&self, peer: IpAddr) -> bool {
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(peer, Instant::now())
    }

    fn replayed(&self, digests: &[[u8; 32]]) -> bool {
        self.replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen_before(digests, Instant::now())
    }
}

/// The digests a delivery is remembered by, per secret that signed it: its
/// delivery id (unsigned, so only trusted next to the secret) and its body.
fn delivery_digests(signed_with: &[HookKey], delivery: Option<&str>, body: &[u8]) -> Vec<[u8; 32]> {
    let body_hash = Sha256::digest(body);
    let mut out = Vec::new();
    for key in signed_with {
        let key = match key {
            HookKey::Hub => "hub".to_string(),
            HookKey::Secret(n) => format!("secret:{n}"),
        };
        if let Some(id) = delivery {
            out.push(Sha256::digest(format!("id\0{key}\0{id}")).into());
        }
        let mut h = Sha256::new();
        h.update(format!("body\0{key}\0"));
        h.update(body_hash);
        out.push(h.finalize().into());
    }
    out
}

/// The webhook listener's routes: `POST /hooks/git`, and 404 for the rest.
pub fn router(hub: Hub) -> Router {
    Router::new()
        .route("/hooks/git", post(git_hook))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such route (this listener serves POST /hooks/git only)"})),
            )
        })
        .with_state(hub)
}

/// A refused hook: its status and message, answered as `{"error": ...}`.
struct Refusal(StatusCode, String);

fn answer(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// Each source with the key it accepts, and the secret bytes of every key.
type Keys = (
    Vec<(String, GitSourceSpec, HookKey)>,
    BTreeMap<HookKey, String>,
);

fn source_keys(hub: &Hub) -> Result<Keys, crate::store::StoreError> {
    let store = hub.fleet.store();
    let mut secrets: BTreeMap<String, Option<String>> = BTreeMap::new();
    let specs = hub.fleet.source_specs();
    for (_, spec) in &specs {
        for name in [&spec.webhook_secret_ref, &spec.secret_ref]
            .into_iter()
            .flatten()
        {
            if !secrets.contains_key(name) {
                let hook = store.get_secret(name)?.and_then(|s| s.webhook_secret);
                secrets.insert(name.clone(), hook.filter(|h| !h.is_empty()));
            }
        }
    }
    let sources = specs
        .into_iter()
        .map(|(name, spec)| {
            let key = webhook::source_key(&spec, |n| matches!(secrets.get(n), Some(Some(_))));
            (name, spec, key)
        })
        .collect();
    let mut bytes: BTreeMap<HookKey, String> = secrets
        .into_iter()
        .filter_map(|(n, s)| Some((HookKey::Secret(n), s?)))
        .collect();
    if let Some(k) = &hub.webhook_secret {
        bytes.insert(HookKey::Hub, k.to_string());
    }
    Ok((sources, bytes))
}

/// `POST /hooks/git`: a GitHub or GitLab push event.
async fn git_hook(State(hub): State<Hub>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<crate::listen::Peer>>()
        .map(|c| c.0 .0.ip());
    if let Some(ip) = peer {
        if !hub.hooks.allow(ip) {
            tracing::warn!(peer = %ip, "webhook rate limit reached");
            return answer(
                StatusCode::TOO_MANY_REQUESTS,
                "too many webhook deliveries from this address; retry later",
            )
            .into_response();
        }
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, HOOK_BODY_LIMIT).await else {
        return answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "webhook body too large (or cut)",
        )
        .into_response();
    };
    match handle(&hub, &parts.headers, &body) {
        Ok(v) => Json(v).into_response(),
        Err(r) => r.into_response(),
    }
}

fn handle(hub: &Hub, headers: &HeaderMap, body: &Bytes) -> Result<serde_json::Value, Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = header("x-github-event")
        .or_else(|| header("x-gitlab-event"))
        .unwrap_or_default();
    let provider = if header("x-github-event").is_some() {
        webhook::Provider::GitHub
    } else if header("x-gitlab-event").is_some() {
        webhook::Provider::GitLab
    } else {
        return Err(answer(
            StatusCode::BAD_REQUEST,
            HookError::UnknownProvider.to_string(),
        ));
    };
    let (sources, key_bytes) = source_keys(hub).map_err(|e| {
        tracing::error!(error = %e, "webhook: reading the sources' secrets");
        answer(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?;
    let push = webhook::parse_push(provider, event, body);
    // The secrets worth trying: those of the sources on the pushed repository
    // (any ref: a forge sends every push), and the hub's. For anything that is
    // not a push, any secret a source accepts.
    let mut candidates: Vec<HookKey> = sources
        .iter()
        .filter(|(_, spec, _)| push.as_ref().map_or(true, |p| webhook::same_repo(p, spec)))
        .map(|(_, _, k)| k.clone())
        .chain([HookKey::Hub])
        .collect();
    candidates.sort();
    candidates.dedup();
    candidates.retain(|k| key_bytes.contains_key(k));
    let secrets: Vec<&[u8]> = candidates
        .iter()
        .filter_map(|k| key_bytes.get(k).map(|s| s.as_bytes()))
        .collect();
    let (_, matched) = webhook::verify(header, body, &secrets).map_err(|e| {
        tracing::warn!(error = %e, event, "webhook refused");
        answer(StatusCode::UNAUTHORIZED, e.to_string())
    })?;
    let signed_with: Vec<HookKey> = candidates
        .into_iter()
        .zip(matched)
        .filter_map(|(k, m)| m.then_some(k))
        .collect();
    let push = match push {
        Ok(p) => p,
        // Pings and other events are fine; there is nothing to do.
        Err(HookError::NotPush(e)) => return Ok(json!({ "ignored": e, "triggered": [] })),
        Err(e) => return Err(answer(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let delivery = webhook::delivery_id(provider, header);
    if hub
        .hooks
        .replayed(&delivery_digests(&signed_with, delivery, body))
    {
        tracing::info!(delivery = ?delivery, "webhook delivery seen before: ignored");
        return Ok(json!({ "duplicate": true, "triggered": [] }));
    }
    let matching = webhook::to_wake(&push, &sources, &signed_with);
    let triggered = hub.pollers.wake(&matching);
    tracing::info!(git_ref = %push.git_ref, repos = ?push.repos, delivery = ?delivery, ?triggered, "push webhook");
    Ok(json!({ "triggered": triggered }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_per_peer_refills_over_time() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(3, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| rl.allow(a, t0)));
        assert!(!rl.allow(a, t0), "burst spent");
        assert!(rl.allow(b, t0), "another peer has its own bucket");
        assert!(
            rl.allow(a, t0 + Duration::from_millis(1000)),
            "one refilled"
        );
        assert!(!rl.allow(a, t0 + Duration::from_millis(1100)));
        // One IPv6 host is its /64.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert!((0..3).all(|_| rl.allow(v6a, t0)));
        assert!(!rl.allow(v6b, t0));
    }

    #[test]
    fn the_peer_table_is_bounded() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(2, 1);
        rl.max_peers = 4;
        for i in 0..100u8 {
            rl.allow(
                IpAddr::from([10, 0, 0, i]),
                t0 + Duration::from_millis(u64::from(i)),
            );
            assert!(rl.peers.len() <= 4);
        }
    }

    #[test]
    fn replays_are_seen_within_the_window_and_memory_is_bounded() {
        let t0 = Instant::now();
        let mut r = Replays::new(Duration::from_secs(60), 3);
        assert!(!r.seen_before(&[[1; 32], [2; 32]], t0));
        assert!(r.seen_before(&[[2; 32]], t0 + Duration::from_secs(1)));
        assert!(!r.seen_before(&[[3; 32]], t0 + Duration::from_secs(2)));
        assert!(
            !r.seen_before(&[[1; 32]], t0 + Duration::from_secs(61)),
            "forgotten after the window"
        );
        for i in 10..20u8 {
            r.seen_before(&[[i; 32]], t0 + Duration::from_secs(62));
            assert!(r.order.len() <= 3 && r.seen.len() <= 3);
        }
    }

    #[test]
    fn a_delivery_id_counts_only_with_its_secret() {
        let a = [HookKey::Secret("a".into())];
        let b = [HookKey::Secret("b".into())];
        let da = delivery_digests(&a, Some("d-1"), b"{}");
        let db = delivery_digests(&b, Some("d-1"), b"{}");
        assert!(da.iter().all(|d| !db.contains(d)));
        let other_body = delivery_digests(&a, Some("d-2"), b"{\"x\":1}");
        assert!(other_body.iter().all(|d| !da.contains(d)));
        let same_body = delivery_digests(&a, Some("d-3"), b"{}");
        assert!(
            same_body.iter().any(|d| da.contains(d)),
            "a replay under a new id"
        );
    }
}
