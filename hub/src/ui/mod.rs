//! The web UI, on the API listener: server-rendered HTML (`pages`), one small
//! script and one stylesheet embedded in the binary (no CDN: it works
//! air-gapped), and server-sent events that tell the page to fetch its live part
//! again.
//!
//! Sign-in is with the admin token, exchanged for a session: a random id in an
//! `HttpOnly; SameSite=Strict` cookie (`Secure` over TLS), held in memory (a hub
//! restart signs everyone out) and expiring after [`SESSION_TTL`]. Every action
//! (rollout pause, resume, rollback; logout) is a POST that must carry the
//! session's CSRF token and, when the browser sends one, a same-origin `Origin`.
//! Pages are computed on the hub, paginated and filtered there: the browser
//! never receives the fleet.

pub mod pages;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use flotilla_shared::matrix;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::listen::Peer;
use crate::Hub;
use pages::Page;

/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once; beyond, the oldest is dropped.
const MAX_SESSIONS: usize = 1024;
/// The session cookie's name.
pub const COOKIE: &str = "flotilla_session";
/// Live updates are coalesced over this: a burst of statuses is one refresh.
const LIVE_COALESCE: Duration = Duration::from_millis(250);
/// The header the script sends to get only a page's live part.
const FRAGMENT_HEADER: &str = "x-flotilla-fragment";

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Every browser's page answer carries these: only our own script and style
/// run, the page is never framed, no Referer leaves the hub (`same-origin`:
/// with `no-referrer` a browser sends `Origin: null` on our own forms).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Debug, Clone)]
struct UiSession {
    csrf: String,
    expires_ms: u64,
}

/// The UI's sessions and its stop signal (server-sent event streams end with
/// the hub, so a graceful shutdown never waits on an open browser).
#[derive(Debug)]
pub struct Ui {
    /// By the SHA-256 of the session id: the ids themselves are not kept.
    sessions: Mutex<HashMap<[u8; 32], UiSession>>,
    stop: watch::Sender<bool>,
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            sessions: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
        }
    }
}

fn random_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn key(sid: &str) -> [u8; 32] {
    Sha256::digest(sid.as_bytes()).into()
}

impl Ui {
    /// Ends every live-update stream (the hub is stopping).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], UiSession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session: its id (for the cookie) and CSRF token.
    fn create(&self, now_ms: u64) -> (String, String) {
        let (sid, csrf) = (random_hex(), random_hex());
        let mut s = self.lock();
        s.retain(|_, v| v.expires_ms > now_ms);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, v)| v.expires_ms).map(|(k, _)| *k) {
                s.remove(&oldest);
            }
        }
        s.insert(
            key(&sid),
            UiSession {
                csrf: csrf.clone(),
                expires_ms: now_ms + SESSION_TTL.as_millis() as u64,
            },
        );
        (sid, csrf)
    }

    /// The CSRF token of a live session.
    fn csrf(&self, sid: &str, now_ms: u64) -> Option<String> {
        let s = self.lock();
        s.get(&key(sid))
            .filter(|v| v.expires_ms > now_ms)
            .map(|v| v.csrf.clone())
    }

    fn remove(&self, sid: &str) {
        self.lock().remove(&key(sid));
    }
}

/// The session id the browser presents.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The signed-in session's CSRF token, or `None`.
fn signed_in(hub: &Hub, headers: &HeaderMap) -> Option<(String, String)> {
    let sid = session_id(headers)?;
    let csrf = hub.ui.csrf(&sid, crate::now_ms())?;
    Some((sid, csrf))
}

/// A POST from a page of ours: same origin (when the browser says), and the
/// session's CSRF token.
fn check_action(
    hub: &Hub,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<String, (StatusCode, &'static str)> {
    let Some((sid, want)) = signed_in(hub, headers) else {
        return Err((StatusCode::UNAUTHORIZED, "not signed in"));
    };
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let same = origin
            .split_once("://")
            .is_some_and(|(_, rest)| !host.is_empty() && rest == host);
        if !same {
            return Err((StatusCode::FORBIDDEN, "cross-origin request refused"));
        }
    }
    if !crate::constant_time_eq(csrf.as_bytes(), want.as_bytes()) {
        return Err((
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong; reload the page",
        ));
    }
    Ok(sid)
}

fn with_headers(mut r: Response, no_store: bool) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if no_store {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn refuse(status: StatusCode, why: &str) -> Response {
    let doc = pages::document(&pages::message("Refused", why), None);
    with_headers((status, Html(doc)).into_response(), true)
}

/// A page for a signed-in browser: the whole document, or only its live part
/// when the script asks.
fn render(headers: &HeaderMap, csrf: &str, page: &Page) -> Response {
    let body = if headers.contains_key(FRAGMENT_HEADER) {
        page.live.clone()
    } else {
        pages::document(page, Some(csrf))
    };
    with_headers(Html(body).into_response(), true)
}

/// Where a signed-out browser goes: the login page, back here afterwards. The
/// script's fragment requests and the event stream get a 401 instead.
fn to_login(headers: &HeaderMap, path: &str) -> Response {
    if headers.contains_key(FRAGMENT_HEADER) {
        return refuse(StatusCode::UNAUTHORIZED, "not signed in");
    }
    with_headers(
        Redirect::to(&format!("/login?next={}", pages::enc(path))).into_response(),
        true,
    )
}

macro_rules! signed_in_or_login {
    ($hub:expr, $headers:expr, $path:expr) => {
        match signed_in(&$hub, &$headers) {
            Some((_, csrf)) => csrf,
            None => return to_login(&$headers, $path),
        }
    };
}

pub fn router(hub: Hub) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/matrix", get(matrix_page))
        .route("/clusters/{name}", get(cluster_page))
        .route("/bundles/{name}", get(bundle_page))
        .route("/bundles/{name}/{action}", post(rollout_action))
        .route("/drift", get(drift_list))
        .route("/drift/{id}", get(drift_page))
        .route("/sources/{name}", get(source_page))
        .route("/ui/events", get(events))
        .route(
            "/ui/app.js",
            get(|| async { asset(APP_JS, "text/javascript") }),
        )
        .route("/ui/app.css", get(|| async { asset(APP_CSS, "text/css") }))
        .with_state(hub)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = with_headers(body.into_response(), false);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Runs a view computation off the async threads (it takes the fleet lock).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("view task")
}

/// The overview's data and page, computed from the fleet (a function of the
/// hub, for the bench).
pub fn overview_page(hub: &Hub) -> Page {
    let fleet = &hub.fleet;
    let rows = fleet.matrix_rows();
    // Counted without an allocation per cell: by bundle name borrowed from the
    // rows, then by state.
    let mut cells: std::collections::BTreeMap<
        &str,
        std::collections::BTreeMap<flotilla_shared::state::BundleState, usize>,
    > = Default::default();
    let mut states = std::collections::BTreeMap::new();
    let connected = rows.iter().filter(|r| r.connected).count();
    for r in rows.iter() {
        for (b, s) in &r.states {
            *cells.entry(b.as_str()).or_default().entry(*s).or_insert(0) += 1;
            *states.entry(*s).or_insert(0) += 1;
        }
    }
    let per_bundle: std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>> =
        cells
            .into_iter()
            .map(|(b, by)| {
                let by = by
                    .into_iter()
                    .map(|(s, n)| (s.as_str().to_string(), n))
                    .collect();
                (b.to_string(), by)
            })
            .collect();
    let bundles = fleet.bundle_heads();
    let rollouts: Vec<_> = bundles
        .iter()
        .filter_map(|b| fleet.rollout(&b.name).ok().flatten())
        .collect();
    let sources = fleet.sources();
    let empty: std::collections::BTreeMap<String, usize> = Default::default();
    pages::overview(&pages::Overview {
        clusters: rows.len(),
        connected,
        states,
        bundles: bundles
            .iter()
            .map(|b| {
                (
                    b,
                    per_bundle
                        .get(&b.name)
                        .cloned()
                        .unwrap_or_else(|| empty.clone()),
                )
            })
            .collect(),
        sources: &sources,
        rollouts: &rollouts,
    })
}

async fn overview(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    let csrf = signed_in_or_login!(hub, headers, "/");
    let h = hub.clone();
    let page = blocking(move || overview_page(&h)).await;
    render(&headers, &csrf, &page)
}

#[derive(Debug, Default, Deserialize)]
pub struct MatrixParams {
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub bundle: String,
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub per: String,
    #[serde(default)]
    pub page: String,
}

/// The matrix page for these parameters (a function of the hub, for the bench).
/// A bad selector or state is said on the page, and the filter is left out.
pub fn matrix_view(hub: &Hub, q: &MatrixParams) -> Page {
    let mut error = None;
    let selector = match q.selector.trim() {
        "" => None,
        s => match flotilla_shared::selector::LabelSelector::parse(s) {
            Ok(sel) => Some(sel),
            Err(e) => {
                error = Some(format!("label selector {s:?}: {e}"));
                None
            }
        },
    };
    let state = match q.state.trim() {
        "" => None,
        s => {
            let parsed = matrix::parse_state(s);
            if parsed.is_none() {
                error = Some(format!("unknown state {s:?}"));
            }
            parsed
        }
    };
    let query = matrix::Query {
        cluster: Some(q.cluster.trim().to_string()).filter(|s| !s.is_empty()),
        bundle: Some(q.bundle.trim().to_string()).filter(|s| !s.is_empty()),
        selector,
        state,
        page: q.page.parse().unwrap_or(1),
        per_page: q.per.parse().unwrap_or(0),
    };
    let p = matrix::page(&hub.fleet.matrix_rows(), &query);
    let form = pages::MatrixForm {
        cluster: q.cluster.clone(),
        bundle: q.bundle.clone(),
        selector: q.selector.clone(),
        state: q.state.clone(),
        per: q.per.clone(),
    };
    pages::matrix(&p, &form, error.as_deref())
}

async fn matrix_page(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Query(q): Query<MatrixParams>,
) -> Response {
    let csrf = signed_in_or_login!(hub, headers, "/matrix");
    let h = hub.clone();
    let page = blocking(move || matrix_view(&h, &q)).await;
    render(&headers, &csrf, &page)
}

fn not_found(headers: &HeaderMap, csrf: &str, what: String) -> Response {
    let mut r = render(headers, csrf, &pages::message("Not found", &what));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

async fn cluster_page(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let csrf = signed_in_or_login!(hub, headers, &format!("/clusters/{}", pages::enc(&name)));
    let fleet = hub.fleet.clone();
    let n = name.clone();
    match blocking(move || fleet.cluster(&n)).await {
        Some(c) => render(&headers, &csrf, &pages::cluster(&c)),
        None => not_found(&headers, &csrf, format!("cluster {name} not found")),
    }
}

#[derive(Debug, Default, Deserialize)]
struct PageParam {
    #[serde(default)]
    page: String,
}

async fn bundle_page(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<PageParam>,
) -> Response {
    let csrf = signed_in_or_login!(hub, headers, &format!("/bundles/{}", pages::enc(&name)));
    let fleet = hub.fleet.clone();
    let n = name.clone();
    let (bundle, rollout) =
        blocking(move || (fleet.bundle(&n), fleet.rollout(&n).ok().flatten())).await;
    match bundle {
        Some(b) => render(
            &headers,
            &csrf,
            &pages::bundle(&b, rollout.as_ref(), q.page.parse().unwrap_or(1), &csrf),
        ),
        None => not_found(&headers, &csrf, format!("bundle {name} not found")),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn rollout_action(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err((status, why)) = check_action(&hub, &headers, &form.csrf) {
        return refuse(status, why);
    }
    use flotilla_shared::rollout::Command;
    let command = match action.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "rollback" => Command::Rollback,
        _ => return refuse(StatusCode::NOT_FOUND, "no such action"),
    };
    let fleet = hub.fleet.clone();
    let n = name.clone();
    let done = blocking(move || fleet.rollout_command(&n, command, crate::now_ms())).await;
    match done {
        Ok(()) => {
            tracing::info!(bundle = %name, ?command, "rollout command (web UI)");
            with_headers(
                Redirect::to(&format!("/bundles/{}", pages::enc(&name))).into_response(),
                true,
            )
        }
        Err(e) => refuse(StatusCode::CONFLICT, &e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
struct DriftParams {
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    bundle: String,
    #[serde(default)]
    page: String,
}

async fn drift_list(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Query(q): Query<DriftParams>,
) -> Response {
    let csrf = signed_in_or_login!(hub, headers, "/drift");
    let store = hub.fleet.store().clone();
    let loaded = blocking(move || {
        Ok::<_, crate::store::StoreError>((store.list_drift()?, store.drift_dropped()?))
    })
    .await;
    let (records, dropped) = match loaded {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "web UI: reading drift events");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    let (cluster, bundle) = (q.cluster.trim(), q.bundle.trim());
    let mut views: Vec<crate::api::DriftView> = records
        .into_iter()
        .filter(|r| {
            (cluster.is_empty() || r.cluster == cluster)
                && (bundle.is_empty() || r.event.bundle == bundle)
        })
        .map(crate::api::drift_view)
        .collect();
    views.reverse();
    let page = pages::drift_list(
        &views,
        cluster,
        bundle,
        q.page.parse().unwrap_or(1),
        dropped,
    );
    render(&headers, &csrf, &page)
}

async fn drift_page(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let csrf = signed_in_or_login!(hub, headers, &format!("/drift/{}", pages::enc(&id)));
    let Ok(n) = id.parse::<u64>() else {
        return not_found(&headers, &csrf, format!("drift event {id} not found"));
    };
    let store = hub.fleet.store().clone();
    match blocking(move || store.get_drift(n)).await {
        Ok(Some(r)) => render(&headers, &csrf, &pages::drift(&crate::api::drift_view(r))),
        Ok(None) => not_found(&headers, &csrf, format!("drift event {id} not found")),
        Err(e) => {
            tracing::error!(error = %e, "web UI: reading a drift event");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

async fn source_page(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let csrf = signed_in_or_login!(hub, headers, &format!("/sources/{}", pages::enc(&name)));
    let fleet = hub.fleet.clone();
    let n = name.clone();
    let (source, bundles) = blocking(move || (fleet.source(&n), fleet.bundles())).await;
    match source {
        Some(s) => {
            let mine: Vec<_> = bundles.iter().filter(|b| b.source == s.name).collect();
            render(&headers, &csrf, &pages::source(&s, &mine))
        }
        None => not_found(&headers, &csrf, format!("source {name} not found")),
    }
}

#[derive(Debug, Default, Deserialize)]
struct LoginParams {
    #[serde(default)]
    next: String,
}

/// Only a path of ours: never another origin (`//host`, `/\host`, a scheme).
fn local_path(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(|c| c.is_control() || c == '\\');
    if ok {
        next
    } else {
        "/"
    }
}

async fn login_page(Query(q): Query<LoginParams>) -> Response {
    let doc = pages::document(&pages::login(None, local_path(&q.next)), None);
    with_headers(Html(doc).into_response(), true)
}

#[derive(Debug, Default, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = local_path(&form.next).to_string();
    if !crate::constant_time_eq(
        form.token.trim().as_bytes(),
        hub.pki.admin_token().as_bytes(),
    ) {
        tracing::warn!(peer = %peer.0, "web UI: login refused (wrong admin token)");
        let doc = pages::document(
            &pages::login(Some("That is not the admin token."), &next),
            None,
        );
        return with_headers((StatusCode::UNAUTHORIZED, Html(doc)).into_response(), true);
    }
    let (sid, _) = hub.ui.create(crate::now_ms());
    tracing::info!(peer = %peer.0, "web UI: signed in");
    let secure = if peer.1 { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    let mut r = with_headers(Redirect::to(&next).into_response(), true);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(
    State(hub): State<Hub>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let sid = match check_action(&hub, &headers, &form.csrf) {
        Ok(sid) => sid,
        Err((status, why)) => return refuse(status, why),
    };
    hub.ui.remove(&sid);
    let mut r = with_headers(Redirect::to("/login").into_response(), true);
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("flotilla_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// Server-sent events: `change` whenever something a page shows may have
/// changed (coalesced), until the session ends or the hub stops.
async fn events(State(hub): State<Hub>, headers: HeaderMap) -> Response {
    let Some((sid, _)) = signed_in(&hub, &headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "not signed in");
    };
    struct Watch {
        hub: Hub,
        sid: String,
        desired: watch::Receiver<u64>,
        observed: watch::Receiver<u64>,
        stop: watch::Receiver<bool>,
        first: bool,
    }
    let w = Watch {
        desired: hub.fleet.subscribe(),
        observed: hub.fleet.subscribe_observed(),
        stop: hub.ui.stop.subscribe(),
        hub: hub.clone(),
        sid,
        first: true,
    };
    let stream = futures::stream::unfold(w, |mut w| async move {
        if w.first {
            w.first = false;
            return Some((
                Ok::<_, Infallible>(Event::default().event("hello").data("live")),
                w,
            ));
        }
        if *w.stop.borrow() {
            return None;
        }
        tokio::select! {
            r = w.desired.changed() => { r.ok()?; }
            r = w.observed.changed() => { r.ok()?; }
            _ = w.stop.changed() => return None,
        }
        tokio::time::sleep(LIVE_COALESCE).await;
        w.desired.borrow_and_update();
        w.observed.borrow_and_update();
        // A session that ended (logout, expiry) gets no more events.
        w.hub.ui.csrf(&w.sid, crate::now_ms())?;
        Some((Ok(Event::default().event("change").data("1")), w))
    });
    with_headers(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_kept_by_hash() {
        let ui = Ui::default();
        let (sid, csrf) = ui.create(1_000);
        assert_eq!(ui.csrf(&sid, 2_000).as_deref(), Some(csrf.as_str()));
        assert!(ui
            .csrf(&sid, 1_000 + SESSION_TTL.as_millis() as u64)
            .is_none());
        assert!(!ui.lock().keys().any(|k| hex::encode(k) == sid));
        ui.remove(&sid);
        assert!(ui.csrf(&sid, 2_000).is_none());
    }

    #[test]
    fn sessions_are_bounded() {
        let ui = Ui::default();
        let first = ui.create(1).0;
        for i in 0..MAX_SESSIONS + 10 {
            ui.create(2 + i as u64);
        }
        assert!(ui.lock().len() <= MAX_SESSIONS);
        assert!(ui.csrf(&first, 3).is_none());
    }

    #[test]
    fn only_well_formed_cookies_are_read() {
        let mut h = HeaderMap::new();
        let sid = "a".repeat(64);
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("x=1; {COOKIE}={sid}; y=2")).unwrap(),
        );
        assert_eq!(session_id(&h).as_deref(), Some(sid.as_str()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}=../../etc")).unwrap(),
        );
        assert_eq!(session_id(&h), None);
    }

    #[test]
    fn login_redirects_stay_on_the_hub() {
        assert_eq!(local_path("/matrix?page=2"), "/matrix?page=2");
        for evil in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil.example",
            "javascript:alert(1)",
            "",
            "/x\r\nSet-Cookie: a=b",
        ] {
            assert_eq!(local_path(evil), "/", "{evil:?}");
        }
    }
}
