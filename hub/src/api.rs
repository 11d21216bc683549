//! The operator HTTP API (JSON in camelCase, every route behind the admin bearer
//! token; TLS and plain-on-loopback as `listen` decides). Requests and answers are
//! the typed views of `flotilla_shared::api`, built here from the fleet's state.
//! Errors are `{"error": "..."}` with 400/401/404/409/500. Lists are paginated
//! (`?limit=N&continue=TOKEN`, `flotilla_shared::paginate`): `{"items": [...],
//! "continue": "..."}`. The Git push webhook is `hooks`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use flotilla_shared::api::{
    AppliedObject, ApplyResponse, BundleView, ClusterView, Deleted, ErrorBody, GroupView,
    HeldContentView, LabelPatch, NotificationView, Page, SecretBody, SecretView, SigningKeyView,
    SourceView, TokenRequest, TokenResponse,
};
pub use flotilla_shared::api::{DriftField, DriftObject, DriftView};
use flotilla_shared::labels::{apply_edits, LabelEdit};
use flotilla_shared::objects::{parse_duration, parse_objects, Object};
use flotilla_shared::paginate::{self, PageKey, PageRequest};
use serde::Deserialize;

use crate::Hub;

/// Join tokens live an hour unless asked otherwise: long enough to start an agent
/// by hand, short enough that a leaked one soon stops mattering.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// An API error: a status and a message for `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(m: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }
    fn not_found(m: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, m.into())
    }
    fn conflict(m: impl Into<String>) -> Self {
        ApiError(StatusCode::CONFLICT, m.into())
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "API internal error");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `?limit=N&continue=TOKEN`, as every list takes it.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

/// A query string the extractor refused (a malformed or repeated parameter) as
/// the API's JSON error.
fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query: {}", e.body_text()))
}

/// The page of a list a checked query asks for.
fn page_of<T, K: PageKey>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    req: &PageRequest<K>,
) -> ApiResult<Page<T>> {
    Ok(Json(paginate::page(items, key, req)))
}

/// A list query checked before any work is done for it.
fn page_request<K: PageKey>(
    limit: Option<&str>,
    token: Option<&str>,
) -> Result<PageRequest<K>, ApiError> {
    PageRequest::parse(limit, token).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn list_request<K: PageKey>(
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<PageRequest<K>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    page_request(q.limit.as_deref(), q.continue_token.as_deref())
}

/// The API's routes, all behind the admin token. Git push webhooks are not
/// served here but on their own listener (`hooks`, `--webhook-listen`); a hook
/// sent here gets a 404 that says so, without the token.
pub fn router(hub: Hub) -> Router {
    let hooks_elsewhere = Router::new().route(
        "/hooks/{*rest}",
        axum::routing::any(|| async {
            ApiError::not_found(
                "webhooks are served on the hub's webhook listener (flotilla-hub --webhook-listen ADDR), not on the API",
            )
        }),
    );
    admin_router(hub.clone())
        .merge(hooks_elsewhere)
        .merge(crate::ui::router(hub))
}

fn admin_router(hub: Hub) -> Router {
    Router::new()
        .route("/api/v1/secrets", get(list_secrets))
        .route(
            "/api/v1/secrets/{name}",
            axum::routing::put(put_secret).delete(delete_secret),
        )
        .route("/api/v1/tokens", post(create_token))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/sources", get(list_sources))
        .route(
            "/api/v1/sources/{name}",
            get(get_source).delete(delete_source),
        )
        .route("/api/v1/groups", get(list_groups))
        .route("/api/v1/notifications", get(list_notifications))
        .route(
            "/api/v1/notifications/{name}",
            axum::routing::delete(delete_notification),
        )
        .route("/api/v1/clusters", get(list_clusters))
        .route(
            "/api/v1/clusters/{name}",
            get(get_cluster).delete(delete_cluster),
        )
        .route("/api/v1/clusters/{name}/labels", patch(patch_labels))
        .route(
            "/api/v1/clusters/{name}/bundles/{bundle}",
            get(get_cluster_bundle),
        )
        .route("/api/v1/bundles", get(list_bundles))
        .route("/api/v1/bundles/{name}", get(get_bundle))
        .route("/api/v1/rollouts/{name}", get(get_rollout))
        .route("/api/v1/rollouts/{name}/history", get(get_rollout_history))
        .route("/api/v1/rollouts/{name}/pause", post(pause_rollout))
        .route("/api/v1/rollouts/{name}/resume", post(resume_rollout))
        .route("/api/v1/rollouts/{name}/rollback", post(rollback_rollout))
        .route("/api/v1/drift", get(list_drift))
        .route("/api/v1/drift/{id}", get(get_drift))
        .merge(
            // Files travel whole: a status file of many drift events, a request
            // with a `--since` report.
            Router::new()
                .route("/api/v1/clusters/{name}/export", post(export_cluster))
                .route("/api/v1/status-files", post(import_status))
                .route("/api/v1/enrolment-files", post(enrol_by_file))
                .layer(axum::extract::DefaultBodyLimit::max(MAX_FILE_BODY)),
        )
        .route("/api/v1/signing-key/rotate", post(rotate_signing_key))
        .route("/api/v1/signing-key", get(get_signing_key))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(hub.clone(), require_admin))
        .with_state(hub)
}

/// A secret as the API shows it: which fields are set, never their values.
fn secret_view(s: &crate::store::SecretRecord) -> SecretView {
    let mut fields = Vec::new();
    for (name, set) in [
        ("username", s.username.is_some()),
        ("password", s.password.is_some()),
        ("sshPrivateKey", s.ssh_private_key.is_some()),
        ("knownHosts", s.known_hosts.is_some()),
        ("webhookSecret", s.webhook_secret.is_some()),
        ("url", s.url.is_some()),
    ] {
        if set {
            fields.push(name.to_string());
        }
    }
    SecretView {
        name: s.name.clone(),
        fields,
    }
}

async fn list_secrets(
    State(hub): State<Hub>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Page<SecretView>> {
    let req = list_request(q)?;
    let list = hub
        .fleet
        .store()
        .list_secrets()
        .map_err(ApiError::internal)?;
    page_of(list.iter().map(secret_view), |s| s.name.clone(), &req)
}

async fn put_secret(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<SecretView> {
    flotilla_shared::objects::validate_name(&name)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let b: SecretBody = json_body(&body)?;
    if let Some(url) = &b.url {
        // Not shown back: the error does not repeat it.
        flotilla_shared::notify::validate_url(url)
            .map_err(|reason| ApiError::bad_request(format!("secret {name}: url: {reason}")))?;
    }
    if b.ssh_private_key.is_some() && b.known_hosts.as_deref().is_none_or(|h| h.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "an SSH key needs knownHosts (host keys are always checked)",
        ));
    }
    let record = crate::store::SecretRecord {
        name: name.clone(),
        username: b.username,
        password: b.password,
        ssh_private_key: b.ssh_private_key,
        known_hosts: b.known_hosts,
        webhook_secret: b.webhook_secret,
        url: b.url,
    };
    hub.fleet
        .store()
        .put_secret(&record)
        .map_err(ApiError::internal)?;
    tracing::info!(secret = %name, "secret stored");
    hub.pollers.wake_using_secret(&name);
    Ok(Json(secret_view(&record)))
}

async fn delete_secret(State(hub): State<Hub>, Path(name): Path<String>) -> ApiResult<Deleted> {
    if !hub
        .fleet
        .store()
        .delete_secret(&name)
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::not_found(format!("secret {name} not found")));
    }
    tracing::info!(secret = %name, "secret deleted");
    Ok(Json(Deleted { deleted: name }))
}

async fn require_admin(State(hub): State<Hub>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if crate::constant_time_eq(t.as_bytes(), hub.pki.admin_token().as_bytes()) => {
            next.run(req).await
        }
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            "a valid admin token is required (Authorization: Bearer ...)".into(),
        )
        .into_response(),
    }
}

fn json_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

async fn create_token(State(hub): State<Hub>, body: Bytes) -> ApiResult<TokenResponse> {
    let req: TokenRequest = json_body(&body)?;
    let ttl = match req.ttl.as_deref() {
        Some(t) => parse_duration(t).map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => DEFAULT_TOKEN_TTL.min(hub.max_token_ttl),
    };
    flotilla_shared::identity::check_token_ttl(ttl, hub.max_token_ttl)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(name) = &req.cluster_name {
        flotilla_shared::objects::validate_name(name)
            .map_err(|e| ApiError::bad_request(format!("clusterName: {e}")))?;
    }
    for (k, v) in req.labels.iter().flatten() {
        flotilla_shared::labels::validate_key(k)
            .and_then(|_| flotilla_shared::labels::validate_value(v))
            .map_err(|e| ApiError::bad_request(format!("labels: {e}")))?;
    }
    let binding = flotilla_shared::identity::Binding {
        cluster_name: req.cluster_name,
        labels: req.labels,
    };
    let bound = binding.is_bound();
    let (token, expires_ms) = hub.create_token(ttl, binding).map_err(ApiError::internal)?;
    tracing::info!(token_id = %token.id, bound, "join token created");
    Ok(Json(TokenResponse {
        id: token.id.clone(),
        token: token.to_string(),
        expires_at: crate::rfc3339(expires_ms),
    }))
}

#[derive(Debug, Deserialize)]
struct ApplyQuery {
    file: Option<String>,
}

async fn apply(
    State(hub): State<Hub>,
    Query(q): Query<ApplyQuery>,
    body: Bytes,
) -> ApiResult<ApplyResponse> {
    let file = q.file.unwrap_or_else(|| "<request>".into());
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request(format!("{file}: not UTF-8")))?;
    // Every document is checked before anything is applied.
    let objects = parse_objects(&file, text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut applied = Vec::new();
    for obj in objects {
        let kind = obj.kind();
        let name = obj.name().to_string();
        let action = match obj {
            Object::GitSource { spec, .. } => {
                let action = hub
                    .fleet
                    .apply_source(&name, spec.clone())
                    .map_err(ApiError::internal)?;
                hub.pollers.sync(&name, &spec);
                action
            }
            Object::ClusterGroup { metadata, spec } => hub
                .fleet
                .apply_group(&name, metadata.labels, spec)
                .map_err(ApiError::internal)?,
            Object::Notification { metadata, spec } => hub
                .notifier
                .apply(&hub.fleet, &name, metadata.labels, spec)
                .map_err(ApiError::internal)?,
        };
        tracing::info!(kind, name = %name, ?action, "applied");
        applied.push(AppliedObject {
            kind: kind.to_string(),
            name,
            action: action.as_str().to_string(),
        });
    }
    Ok(Json(ApplyResponse { applied }))
}

async fn list_notifications(
    State(hub): State<Hub>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Page<NotificationView>> {
    let req = list_request(q)?;
    let views = hub.notifier.views().map_err(ApiError::internal)?;
    page_of(views, |n| n.name.clone(), &req)
}

async fn delete_notification(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<Deleted> {
    if hub.notifier.delete(&name).map_err(ApiError::internal)? {
        tracing::info!(notification = %name, "notification deleted");
        Ok(Json(Deleted { deleted: name }))
    } else {
        Err(ApiError::not_found(format!(
            "notification {name} not found"
        )))
    }
}

async fn list_sources(
    State(hub): State<Hub>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Page<SourceView>> {
    let req = list_request(q)?;
    page_of(hub.fleet.sources(), |s| s.name.clone(), &req)
}

async fn get_source(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::SourceView> {
    hub.fleet
        .source(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("source {name} not found")))
}

async fn delete_source(State(hub): State<Hub>, Path(name): Path<String>) -> ApiResult<Deleted> {
    hub.pollers.stop(&name);
    if !hub.fleet.delete_source(&name).map_err(ApiError::internal)? {
        return Err(ApiError::not_found(format!("source {name} not found")));
    }
    tracing::info!(source = %name, "source deleted");
    Ok(Json(Deleted { deleted: name }))
}

async fn list_groups(
    State(hub): State<Hub>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Page<GroupView>> {
    let req = list_request(q)?;
    page_of(hub.fleet.groups(), |g| g.name.clone(), &req)
}

async fn list_clusters(
    State(hub): State<Hub>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Page<ClusterView>> {
    let req = list_request(q)?;
    page_of(hub.fleet.clusters(), |c| c.name.clone(), &req)
}

async fn get_cluster(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::ClusterView> {
    hub.fleet
        .cluster(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("cluster {name} not found")))
}

/// What a cluster holds of a bundle: the content its agent acknowledged (and
/// applies), from the hub's content store, Secret values hashed. `flotilla render
/// --diff-against` compares a local render with it.
async fn get_cluster_bundle(
    State(hub): State<Hub>,
    Path((name, bundle)): Path<(String, String)>,
) -> ApiResult<HeldContentView> {
    let (hash, revision, content) = hub
        .fleet
        .held_content(&name, &bundle)
        .map_err(ApiError::not_found)?;
    let mut content = (*content).clone();
    for m in &mut content.manifests {
        flotilla_shared::applied::redact_secret(&mut m.object);
    }
    Ok(Json(HeldContentView {
        cluster: name,
        bundle,
        content_hash: hash,
        revision,
        content,
    }))
}

/// Deletes a cluster: its certificate is refused from now on, its live session
/// closes, its statuses and drift history go. What its agent applied stays in
/// that cluster (the agent, cut off, keeps it and stops nothing).
async fn delete_cluster(State(hub): State<Hub>, Path(name): Path<String>) -> ApiResult<Deleted> {
    let fleet = hub.fleet.clone();
    let n = name.clone();
    let deleted = tokio::task::spawn_blocking(move || fleet.delete_cluster(&n))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    if !deleted {
        return Err(ApiError::not_found(format!("cluster {name} not found")));
    }
    tracing::info!(cluster = %name, "cluster deleted; its certificate is refused from now on");
    Ok(Json(Deleted { deleted: name }))
}

/// The largest file the API takes (a status file, an enrolment request, a
/// `--since` report).
const MAX_FILE_BODY: usize = 256 << 20;

fn transfer_error(e: crate::transfer::TransferError) -> ApiError {
    use crate::transfer::TransferError as T;
    match e {
        T::NotFound(m) => ApiError::not_found(m),
        T::Refused(m) => ApiError(StatusCode::FORBIDDEN, m),
        T::Invalid(m) => ApiError::bad_request(m),
        T::Unavailable(m) => ApiError(StatusCode::SERVICE_UNAVAILABLE, m),
        T::Internal(m) => ApiError::internal(m),
    }
}

fn file_response(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

/// `flotilla bundle export`: the body is empty, or a status file (`--since`).
async fn export_cluster(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let since = (!body.is_empty()).then_some(body);
    let file = tokio::task::spawn_blocking(move || {
        crate::transfer::export(&hub.fleet, &hub.pki, &name, since.as_deref())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(transfer_error)?;
    Ok(file_response(file))
}

/// `flotilla cluster import-status`.
async fn import_status(
    State(hub): State<Hub>,
    body: Bytes,
) -> ApiResult<crate::transfer::Imported> {
    let fleet = hub.fleet.clone();
    tokio::task::spawn_blocking(move || crate::transfer::import_status(&fleet, &body))
        .await
        .map_err(ApiError::internal)?
        .map(Json)
        .map_err(transfer_error)
}

/// `flotilla cluster enroll --request`.
async fn enrol_by_file(State(hub): State<Hub>, body: Bytes) -> Result<Response, ApiError> {
    crate::transfer::enrol(&hub.fleet, &hub.pki, hub.agent_cert_ttl, &body)
        .await
        .map(file_response)
        .map_err(transfer_error)
}

fn signing_key_view(hub: &Hub) -> SigningKeyView {
    SigningKeyView {
        key_id: hub.pki.signer.key_id(),
        public_key: hex::encode(hub.pki.signer.public_key()),
        rotations: hub.pki.signer.rotations(),
        previous_key_id: None,
    }
}

async fn get_signing_key(State(hub): State<Hub>) -> ApiResult<SigningKeyView> {
    Ok(Json(signing_key_view(&hub)))
}

/// `flotilla signing-key rotate`: agents follow the endorsement in the next set.
async fn rotate_signing_key(State(hub): State<Hub>) -> ApiResult<SigningKeyView> {
    let h = hub.clone();
    let (old, new) = tokio::task::spawn_blocking(move || h.pki.signer.rotate())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    // Every session sends its set again, signed by the new key.
    hub.fleet.nudge();
    Ok(Json(SigningKeyView {
        key_id: new,
        previous_key_id: Some(old),
        ..signing_key_view(&hub)
    }))
}

async fn patch_labels(
    State(hub): State<Hub>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<crate::fleet::ClusterView> {
    let patch: LabelPatch = json_body(&body)?;
    let mut edits = Vec::new();
    for (k, v) in patch.set {
        edits.push(
            format!("{k}={v}")
                .parse::<LabelEdit>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
    }
    for k in patch.remove {
        edits.push(
            format!("{k}-")
                .parse::<LabelEdit>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
    }
    let current = hub
        .fleet
        .cluster_labels(&name)
        .ok_or_else(|| ApiError::not_found(format!("cluster {name} not found")))?;
    let view = hub
        .fleet
        .set_labels(&name, apply_edits(&current, &edits))
        .map_err(|e| match e {
            crate::fleet::FleetError::NotFound(m) => ApiError::not_found(format!("{m} not found")),
            other => ApiError::internal(other),
        })?;
    tracing::info!(cluster = %name, "labels changed");
    Ok(Json(view))
}

async fn list_bundles(
    State(hub): State<Hub>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Page<BundleView>> {
    let req = list_request(q)?;
    page_of(hub.fleet.bundles(), |b| b.name.clone(), &req)
}

async fn get_bundle(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::BundleView> {
    hub.fleet
        .bundle(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("bundle {name} not found")))
}

fn fleet_error(e: crate::fleet::FleetError) -> ApiError {
    match e {
        crate::fleet::FleetError::NotFound(m) => ApiError::not_found(format!("{m} not found")),
        crate::fleet::FleetError::Refused(m) => ApiError::conflict(m),
        other => ApiError::internal(other),
    }
}

async fn get_rollout(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::RolloutView> {
    hub.fleet
        .rollout(&name)
        .map_err(fleet_error)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "bundle {name} has no rollout (no such bundle, or no rolloutStrategy)"
            ))
        })
}

async fn get_rollout_history(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<Vec<crate::fleet::RolloutHistoryView>> {
    hub.fleet
        .rollout_history(&name)
        .map(Json)
        .map_err(fleet_error)
}

async fn rollout_command(
    hub: Hub,
    name: String,
    command: flotilla_shared::rollout::Command,
) -> ApiResult<crate::fleet::RolloutView> {
    let fleet = hub.fleet.clone();
    let bundle = name.clone();
    tokio::task::spawn_blocking(move || fleet.rollout_command(&bundle, command, crate::now_ms()))
        .await
        .map_err(ApiError::internal)?
        .map_err(fleet_error)?;
    tracing::info!(bundle = %name, ?command, "rollout command");
    get_rollout(State(hub), Path(name)).await
}

async fn pause_rollout(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::RolloutView> {
    rollout_command(hub, name, flotilla_shared::rollout::Command::Pause).await
}

async fn resume_rollout(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::RolloutView> {
    rollout_command(hub, name, flotilla_shared::rollout::Command::Resume).await
}

async fn rollback_rollout(
    State(hub): State<Hub>,
    Path(name): Path<String>,
) -> ApiResult<crate::fleet::RolloutView> {
    rollout_command(hub, name, flotilla_shared::rollout::Command::Rollback).await
}

/// A stored drift event as the API shows it.
pub fn drift_view(r: crate::store::DriftRecord) -> DriftView {
    let e = r.event;
    DriftView {
        id: r.id,
        cluster: r.cluster,
        bundle: e.bundle,
        object: DriftObject {
            api_version: e.object.api_version,
            kind: e.object.kind,
            namespace: e.object.namespace,
            name: e.object.name,
        },
        fields: e
            .fields
            .into_iter()
            .map(|f| DriftField {
                path: f.path,
                desired: f.desired,
                live: f.live,
            })
            .collect(),
        manager: e.manager,
        detected_at: crate::rfc3339(u64::try_from(e.detected_at_unix_ms).unwrap_or(0)),
        corrected: e.corrected,
        deleted: e.deleted,
    }
}

/// Header telling how many events were dropped from the bounded history.
pub const DRIFT_DROPPED_HEADER: &str = "x-flotilla-drift-dropped";

#[derive(Debug, Deserialize)]
struct DriftQuery {
    cluster: Option<String>,
    bundle: Option<String>,
    limit: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

/// Drift events oldest first (by id), a page at a time; the header counts the
/// events dropped from the bounded history.
async fn list_drift(
    State(hub): State<Hub>,
    q: Result<Query<DriftQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let req = page_request::<u64>(q.limit.as_deref(), q.continue_token.as_deref())?;
    let store = hub.fleet.store().clone();
    let (records, dropped) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((store.list_drift()?, store.drift_dropped()?))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let want =
        |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w.is_empty() || w == got);
    let views = records
        .into_iter()
        .filter(|r| want(&q.cluster, &r.cluster) && want(&q.bundle, &r.event.bundle))
        .filter(|r| req.after.is_none_or(|a| r.id > a))
        .map(drift_view);
    let page = page_of(views, |d| d.id, &req)?;
    Ok(([(DRIFT_DROPPED_HEADER, dropped.to_string())], page).into_response())
}

async fn get_drift(State(hub): State<Hub>, Path(id): Path<String>) -> ApiResult<DriftView> {
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("drift event id {id:?} is not a number")))?;
    let store = hub.fleet.store().clone();
    tokio::task::spawn_blocking(move || store.get_drift(n))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?
        .map(|r| Json(drift_view(r)))
        .ok_or_else(|| ApiError::not_found(format!("drift event {id} not found")))
}
