//! The HTTP listener (`http.listen`): `/metrics`, `/healthz`, `/readyz`, `/api/v1/status`,
//! and the authenticated `POST /api/v1/force-sync` and `POST /api/v1/validate`.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{Metrics, Trigger, CONTENT_TYPE},
    status::StatusRegistry,
    supervisor::Control,
};

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
        .with_state(state)
}

/// Binds the listener (errors are returned so start-up can report them) and serves until
/// `cancel` fires.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, "http listening");
    tokio::spawn(async move {
        let server = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { cancel.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(bound)
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

async fn force_sync(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    submit(&s, &headers, &body, |namespaces| Control::ForceSync {
        namespaces,
        trigger: Trigger::Http,
    })
    .await
}

async fn validate(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    submit(&s, &headers, &body, |namespaces| Control::Validate {
        namespaces,
    })
    .await
}

/// `POST /api/v1/confirm {"namespaces": [...]}`: an operator confirms the deletions of
/// namespaces the mass-delete guard paused (DESIGN §2.10). Each must be named (404 unknown, 409
/// not paused by the guard); nothing is confirmed unless all are.
async fn confirm(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
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
