//! The HTTP listener (`http.listen`): `/metrics`, `/healthz`, `/readyz`, `/api/v1/status`,
//! and the authenticated `POST /api/v1/force-sync` and `POST /api/v1/validate`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    metrics::{Metrics, Trigger, CONTENT_TYPE},
    status::StatusRegistry,
    supervisor::Control,
};

/// A connection must deliver a request's complete headers within this time, counted from the
/// moment it is ready for a request: a half-sent request is closed after it, and so is a
/// keep-alive connection that stays idle between requests (this is the idle limit).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A request (its body included) must be answered within this time, else 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body: a list of namespaces is a few KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most connections served at once, whatever the file-descriptor limit.
pub const MAX_CONNECTIONS: usize = 512;

/// How long open connections get to finish when the listener stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection cap for a process allowed `nofile` open files: [`MAX_CONNECTIONS`], or a
/// quarter of the limit when that is smaller, so the HTTP listener can never take the file
/// descriptors the driver needs to reach MongoDB.
pub fn connection_cap(nofile: u64) -> usize {
    usize::try_from(nofile / 4)
        .unwrap_or(usize::MAX)
        .clamp(8, MAX_CONNECTIONS)
}

/// `/healthz` fails when the supervisor loop has not moved for this long.
pub const HEALTHZ_STALL: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub status: Arc<StatusRegistry>,
    pub control: mpsc::Sender<Control>,
    /// Bearer token for mutating endpoints; `None` = they answer 403.
    pub token: Option<String>,
    pub heartbeat: Arc<AtomicU64>,
    pub max_lag_seconds: f64,
    last_beat: Arc<Mutex<(u64, Instant)>>,
}

impl HttpState {
    pub fn new(
        metrics: Metrics,
        status: Arc<StatusRegistry>,
        control: mpsc::Sender<Control>,
        token: Option<String>,
        heartbeat: Arc<AtomicU64>,
        max_lag_seconds: f64,
    ) -> HttpState {
        HttpState {
            metrics,
            status,
            control,
            token,
            heartbeat,
            max_lag_seconds,
            last_beat: Arc::new(Mutex::new((0, Instant::now()))),
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// A refused request: answered as `{"error": message}` with `status`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, &self.message)
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/force-sync", post(force_sync))
        .route("/api/v1/validate", post(validate))
        .route("/api/v1/confirm", post(confirm))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(bounded_and_json))
        .with_state(state)
}

/// Every request gets [`REQUEST_TIMEOUT`], and every error answer is JSON `{"error": ...}`,
/// including the ones axum produces itself (413 for a body over [`MAX_BODY_BYTES`], ...).
async fn bounded_and_json(request: Request, next: Next) -> Response {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the request was not completed in time",
            )
        }
    };
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("the request body is larger than {MAX_BODY_BYTES} bytes")
        }
        other => other
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase(),
    };
    error(status, &message)
}

/// Binds the listener (errors are returned so start-up can report them) and serves until
/// `cancel` fires, at most `max_connections` connections at a time (see [`connection_cap`]);
/// further clients wait in the kernel's accept queue until a slot frees, which
/// [`HEADER_READ_TIMEOUT`] bounds.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    cancel: CancellationToken,
    max_connections: usize,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, max_connections, "http listening");
    tokio::spawn(accept_loop(
        listener,
        router(state),
        cancel,
        max_connections,
    ));
    Ok(bound)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: CancellationToken,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    let mut last_warning: Option<Instant> = None;
    loop {
        let slot = tokio::select! {
            _ = cancel.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; warn at most every 10 s.
                    if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "http: cannot accept a connection");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, connections.wait()).await;
}

async fn metrics(State(s): State<HttpState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.render()).into_response()
}

async fn healthz(State(s): State<HttpState>) -> Response {
    let beat = s.heartbeat.load(Ordering::Relaxed);
    let mut last = s.last_beat.lock();
    if beat != last.0 {
        *last = (beat, Instant::now());
    }
    if last.1.elapsed() > HEALTHZ_STALL {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervisor loop is not making progress",
        );
    }
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let reasons = s.status.not_ready_reasons(s.max_lag_seconds);
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

async fn status(State(s): State<HttpState>) -> Response {
    Json(s.status.to_json(env!("CARGO_PKG_VERSION"))).into_response()
}

/// Checks `Authorization: Bearer <token>`; constant-time comparison.
fn authorize(s: &HttpState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &s.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "mutating endpoints are disabled: set http.token or http.token_file",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let equal = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !equal {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ));
    }
    Ok(())
}

/// `{"namespaces": ["db.coll", ...]}` (optional; empty body = all namespaces).
fn parse_namespaces(body: &Bytes) -> Result<Vec<String>, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| *k != "namespaces") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown field {k:?}"),
        ));
    }
    match obj.get("namespaces") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| match i.as_str() {
                Some(ns) if ns.contains('.') => Ok(ns.to_string()),
                _ => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "namespaces must be strings of the form \"db.collection\"",
                )),
            })
            .collect(),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "namespaces must be an array",
        )),
    }
}

/// 409 naming the active instance when this one is a standby (DESIGN §2.12): a mutating
/// request must go where the namespaces are synced. Under `ha.partitions`, 409 naming the
/// owner of every requested namespace this instance does not sync; a request for all
/// namespaces applies to the partitions held here.
fn refuse_elsewhere(s: &HttpState, body: &Bytes) -> Option<Response> {
    let ha = s.status.ha()?;
    if let Some(partitions) = &ha.partitions {
        let namespaces = parse_namespaces(body).unwrap_or_default();
        let elsewhere: serde_json::Map<String, serde_json::Value> = namespaces
            .iter()
            .filter_map(|ns| {
                let (partition, owner) = partitions.elsewhere(ns)?;
                Some((
                    ns.clone(),
                    json!({
                        "partition": partition,
                        "instance": owner.map(|o| o.instance.clone()),
                        "address": owner.and_then(|o| o.address.clone()),
                    }),
                ))
            })
            .collect();
        if elsewhere.is_empty() && !(namespaces.is_empty() && partitions.held.is_empty()) {
            return None;
        }
        return Some(
            (
                StatusCode::CONFLICT,
                Json(json!({
                    "error": "these namespaces are synced by another instance (their partition is held there); send the request to it",
                    "owners": elsewhere,
                    "held_here": partitions.held.keys().collect::<Vec<_>>(),
                })),
            )
                .into_response(),
        );
    }
    if ha.role != "standby" {
        return None;
    }
    Some(
        (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "this instance is a standby; send the request to the active instance",
                "active_instance": ha.active_instance,
                "active_address": ha.active_address,
            })),
        )
            .into_response(),
    )
}

async fn force_sync(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refuse_elsewhere(&s, &body) {
        return refused;
    }
    submit(&s, &headers, &body, |namespaces| Control::ForceSync {
        namespaces,
        trigger: Trigger::Http,
    })
    .await
}

async fn validate(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refuse_elsewhere(&s, &body) {
        return refused;
    }
    submit(&s, &headers, &body, |namespaces| Control::Validate {
        namespaces,
    })
    .await
}

/// `POST /api/v1/confirm {"namespaces": [...]}`: an operator confirms the deletions of
/// namespaces the mass-delete guard paused (DESIGN §2.10). Each must be named (404 unknown, 409
/// not paused by the guard); nothing is confirmed unless all are.
async fn confirm(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refuse_elsewhere(&s, &body) {
        return refused;
    }
    if let Err(e) = authorize(&s, &headers) {
        return e.into_response();
    }
    let namespaces = match parse_namespaces(&body) {
        Ok(n) if n.is_empty() => {
            return error(
                StatusCode::BAD_REQUEST,
                "name the namespaces to confirm: {\"namespaces\": [\"db.collection\"]}",
            )
        }
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    for ns in &namespaces {
        match s.status.get(ns) {
            None => return error(StatusCode::NOT_FOUND, &format!("unknown namespace {ns:?}")),
            Some(st) if st.parked_reason.as_deref() != Some(crate::guard::PARK_REASON) => {
                return error(
                    StatusCode::CONFLICT,
                    &format!("{ns} is not paused by the mass-delete guard"),
                )
            }
            Some(_) => {}
        }
    }
    if s.control
        .send(Control::Confirm {
            namespaces: namespaces.clone(),
        })
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"accepted": true, "namespaces": namespaces})),
    )
        .into_response()
}

/// The shared path of the mutating endpoints: authorize, parse `{"namespaces": [...]}`, hand
/// the request to the supervisor and answer 202 (the work runs in the background).
async fn submit(
    s: &HttpState,
    headers: &HeaderMap,
    body: &Bytes,
    request: impl FnOnce(Vec<String>) -> Control,
) -> Response {
    if let Err(e) = authorize(s, headers) {
        return e.into_response();
    }
    let namespaces = match parse_namespaces(body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let known: BTreeSet<String> = s.status.namespaces().into_iter().collect();
    let unknown: Vec<&str> = namespaces
        .iter()
        .filter(|ns| !known.contains(*ns))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "not synced by this daemon (no such source namespace, or not discovered yet): {}",
                unknown.join(", ")
            ),
        );
    }
    // A namespace parked for a rename collision has no worker: accepting would do nothing.
    let colliding: Vec<&str> = namespaces
        .iter()
        .filter(|ns| {
            s.status.get(ns).is_some_and(|st| {
                st.parked_reason.as_deref() == Some(crate::supervisor::RENAME_COLLISION)
            })
        })
        .map(String::as_str)
        .collect();
    if !colliding.is_empty() {
        return error(
            StatusCode::CONFLICT,
            &format!(
                "parked with reason rename_collision (sync.rename maps several source namespaces onto one destination namespace): {}; fix sync.rename and reload (SIGHUP), nothing is synced meanwhile",
                colliding.join(", ")
            ),
        );
    }
    if s.control.send(request(namespaces.clone())).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"accepted": true, "namespaces": namespaces})),
    )
        .into_response()
}
