//! The node's HTTP surface: WHIP and WHEP (RFC 9725), the publish and play
//! pages, metrics and health. Every refusal is a 4xx with a plain-text
//! message saying what was wrong; nothing a client sends can take the node
//! down.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use weir_protocol::{Mode, RoomId, SessionId, TokenError, TokenVerifier};
use weir_sfu::SfuError;

use crate::agent::{Agent, ClaimError};
use crate::shard::ShardHandle;

/// Largest SDP offer accepted. Real offers are a few KiB.
pub const MAX_SDP_BYTES: usize = 64 * 1024;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const SDP: &str = "application/sdp";
const SDPFRAG: &str = "application/trickle-ice-sdpfrag";

/// Renders the Prometheus exposition of the process.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub(crate) struct AppState {
    pub shard: ShardHandle,
    pub verifier: Arc<TokenVerifier>,
    pub agent: Arc<Agent>,
    pub render_metrics: RenderMetrics,
    /// `window.WEIR_CONFIG` for the pages.
    pub page_config: Arc<str>,
    /// HLS, transcoder and snapshots.
    pub media: crate::transcode::MediaHub,
    /// The room events WebSocket.
    pub events: crate::bus::ws::EventsState,
    /// The media relay between nodes, when the node runs one.
    pub relay: Option<Arc<crate::relay::Relay>>,
}

/// A refusal: status and a message for the client.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, format!("{}\n", self.message)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<SfuError> for ApiError {
    fn from(e: SfuError) -> Self {
        let status = match e {
            SfuError::RoomBusy(_) => StatusCode::CONFLICT,
            SfuError::UnknownSession => StatusCode::NOT_FOUND,
            SfuError::IceRestartUnsupported => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.to_string())
    }
}

fn unavailable() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down")
}

/// New sessions are refused while an operator drains the node.
fn refuse_if_draining(state: &AppState) -> Result<(), ApiError> {
    if *state.agent.draining().borrow() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining: ask the control plane for another",
        ));
    }
    Ok(())
}

pub(crate) fn router(state: AppState) -> Router {
    let trace = TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
        let request_id = req
            .headers()
            .get(&REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info_span!(
            "http",
            method = %req.method(),
            path = %req.uri().path(),
            request_id = %request_id,
            room = tracing::field::Empty,
            session = tracing::field::Empty,
        )
    });

    Router::new()
        .route(
            "/whip/{room}",
            post(whip_post)
                .options(options_collection)
                .fallback(not_allowed_collection),
        )
        .route(
            "/whep/{room}",
            post(whep_post)
                .options(options_collection)
                .fallback(not_allowed_collection),
        )
        .route(
            "/whip/{room}/{session}",
            axum::routing::delete(session_delete)
                .patch(session_patch)
                .options(options_session)
                .fallback(not_allowed_session),
        )
        .route(
            "/whep/{room}/{session}",
            axum::routing::delete(session_delete)
                .patch(session_patch)
                .options(options_session)
                .fallback(not_allowed_session),
        )
        .route(
            "/hls/{room}/master.m3u8",
            get(crate::hls::routes::master).options(crate::hls::routes::options),
        )
        .route(
            "/hls/{room}/{rendition}/{file}",
            get(crate::hls::routes::file).options(crate::hls::routes::options),
        )
        .route(
            "/rooms/{room}/snapshot.jpg",
            get(crate::hls::routes::snapshot).options(crate::hls::routes::options),
        )
        .merge(
            Router::new()
                .route("/rooms/{room}/events", get(crate::bus::ws::events))
                .with_state(state.events.clone()),
        )
        .route("/publish/{room}", get(crate::pages::publish))
        .route("/play/{room}", get(crate::pages::play))
        .route("/rooms/{room}/qoe", post(crate::qoe::report))
        .route("/assets/{file}", get(crate::pages::asset))
        .route("/", get(crate::pages::index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_SDP_BYTES))
        .layer(axum::middleware::from_fn(cors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(trace)
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// CORS for browsers on other origins (players embedded elsewhere). Done
/// here rather than with a generic layer so that a plain `OPTIONS` still
/// reaches the WHIP/WHEP handlers, which answer it with `Accept-Post`.
async fn cors(req: Request<axum::body::Body>, next: axum::middleware::Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("location, etag, link, accept-patch, accept-post, x-request-id"),
    );
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PATCH, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, if-match, x-request-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    res
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn parse_room(room: &str) -> Result<RoomId, ApiError> {
    RoomId::parse(room)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad room in URL: {e}")))
}

/// Checks the Bearer token for `mode` in `room`; returns its subject.
pub(crate) fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    room: &RoomId,
    mode: Mode,
) -> Result<String, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "missing Authorization: Bearer <token> (a {} token for this room)",
                mode.as_str()
            ),
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Authorization must be 'Bearer <token>'",
            )
        })?;
    match state.verifier.authorize(token, room, mode, unix_now()) {
        Ok(claims) => Ok(claims.sub),
        Err(e @ (TokenError::WrongRoom { .. } | TokenError::WrongMode { .. })) => {
            Err(ApiError::new(StatusCode::FORBIDDEN, e.to_string()))
        }
        Err(e) => Err(ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())),
    }
}

fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

fn body_text(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    want: &str,
) -> Result<String, ApiError> {
    if !content_type_is(headers, want) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be {want}"),
        ));
    }
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, format!("body is larger than {MAX_SDP_BYTES} bytes"))
        } else {
            ApiError::new(status, format!("cannot read body: {e}"))
        }
    })?;
    String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "body is not UTF-8"))
}

async fn whip_post(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let room = parse_room(&room)?;
    tracing::Span::current().record("room", room.as_str());
    let owner = authorize(&state, &headers, &room, Mode::Publish)?;
    let offer = body_text(&headers, body, SDP)?;
    state.agent.claim_room(&room).await.map_err(|e| match e {
        ClaimError::ElsewhereLive { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
    })?;
    let accepted = state
        .shard
        .publish(room.clone(), owner, offer)
        .await
        .map_err(|_| unavailable())??;
    if let Some(old) = &accepted.replaced {
        tracing::info!(%room, replaced = %old, "publisher reconnected and took over its session");
    }
    if state.media.hls().is_some() || state.media.snapshots_on() {
        // HLS, its ladder and snapshots of this publisher, like SRT's.
        let media = state.media.open(&room, None);
        match crate::transcode::whip::spawn(room.clone(), media) {
            Ok(tap) => state
                .shard
                .media_tap(room.clone(), accepted.session.clone(), tap),
            Err(e) => tracing::error!(%room, error = %e, "no HLS for this publisher: no thread"),
        }
    }
    Ok(created(
        "whip",
        &room,
        &accepted.session,
        accepted.answer_sdp,
    ))
}

/// What a WHEP `POST` may add to its URL.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WhepQuery {
    /// The highest video layer wanted: a simulcast rid, or a rendition of
    /// the room's ladder (`360p`). Where the room has no such layer, the
    /// viewer gets what its bandwidth allows.
    layer: Option<String>,
}

async fn whep_post(
    State(state): State<AppState>,
    Path(room): Path<String>,
    query: Result<Query<WhepQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let room = parse_room(&room)?;
    tracing::Span::current().record("room", room.as_str());
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad query: {e} (known: layer)"),
        )
    })?;
    if let Some(layer) = &query.layer
        && (layer.is_empty()
            || layer.len() > 8
            || !layer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad layer {layer:?}: 1 to 8 letters, digits, '-' or '_' (e.g. 360p)"),
        ));
    }
    let viewer = authorize(&state, &headers, &room, Mode::Play)?;
    // Viewers go elsewhere; a publisher is still taken (an encoder such as
    // OBS has one fixed URL and must be able to reconnect to its origin).
    refuse_if_draining(&state)?;
    let offer = body_text(&headers, body, SDP)?;
    let accepted = state
        .shard
        .play(room.clone(), viewer, offer)
        .await
        .map_err(|_| unavailable())??;
    // A room published on another node is pulled from it; the answer does
    // not wait for that (the viewer gets media once it flows).
    if let Some(relay) = &state.relay {
        let relay = relay.clone();
        let room = room.clone();
        tokio::spawn(async move { relay.ensure_pull(&room).await });
    }
    if query.layer.is_some() {
        state
            .shard
            .set_max_layer(room.clone(), accepted.session.clone(), query.layer)
            .await
            .map_err(|_| unavailable())??;
    }
    Ok(created(
        "whep",
        &room,
        &accepted.session,
        accepted.answer_sdp,
    ))
}

fn created(kind: &str, room: &RoomId, session: &SessionId, answer: String) -> Response {
    tracing::Span::current().record("session", session.as_str());
    tracing::info!(%room, %session, kind, "session created");
    let location = format!("/{kind}/{room}/{session}");
    let mut res = (StatusCode::CREATED, answer).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP));
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{session}\"")) {
        h.insert(header::ETAG, v);
    }
    h.insert("accept-patch", HeaderValue::from_static(SDPFRAG));
    res
}

/// `/whip/{room}/{session}` or `/whep/...`: which mode its token must have.
fn session_mode(uri_path: &str) -> Mode {
    if uri_path.starts_with("/whip/") {
        Mode::Publish
    } else {
        Mode::Play
    }
}

fn parse_session(room: &str, session: &str) -> Result<(RoomId, SessionId), ApiError> {
    let room = parse_room(room)?;
    let session = SessionId::parse(session)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, format!("no such session: {e}")))?;
    tracing::Span::current().record("room", room.as_str());
    tracing::Span::current().record("session", session.as_str());
    Ok((room, session))
}

/// A viewer this node moved away (drain) learns so from its session URL:
/// `410 Gone`, so that it asks the control plane for another node at once.
fn refuse_if_moved(state: &AppState, session: &SessionId) -> Result<(), ApiError> {
    if state.shard.was_moved(session) {
        return Err(ApiError::new(
            StatusCode::GONE,
            "this viewer was moved: the node is draining; ask the control plane for another",
        ));
    }
    Ok(())
}

async fn session_delete(
    State(state): State<AppState>,
    Path((room, session)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (room, session) = parse_session(&room, &session)?;
    authorize(&state, &headers, &room, session_mode(uri.path()))?;
    refuse_if_moved(&state, &session)?;
    let role = state
        .shard
        .close(room.clone(), session.clone())
        .await
        .map_err(|_| unavailable())??;
    tracing::info!(%room, %session, role = role.as_str(), "session deleted by client");
    Ok(StatusCode::OK.into_response())
}

async fn session_patch(
    State(state): State<AppState>,
    Path((room, session)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (room, session) = parse_session(&room, &session)?;
    authorize(&state, &headers, &room, session_mode(uri.path()))?;
    refuse_if_moved(&state, &session)?;
    let frag = body_text(&headers, body, SDPFRAG)?;
    state
        .shard
        .trickle(room, session, frag)
        .await
        .map_err(|_| unavailable())??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn options_collection() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
    h.insert("accept-post", HeaderValue::from_static(SDP));
    res
}

async fn options_session() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(
        header::ALLOW,
        HeaderValue::from_static("PATCH, DELETE, OPTIONS"),
    );
    h.insert("accept-patch", HeaderValue::from_static(SDPFRAG));
    res
}

fn not_allowed(allow: &'static str, method: &Method) -> Response {
    let mut res = (
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here; allowed: {allow}\n"),
    )
        .into_response();
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

async fn not_allowed_collection(method: Method) -> Response {
    not_allowed("POST, OPTIONS", &method)
}

async fn not_allowed_session(method: Method) -> Response {
    not_allowed("PATCH, DELETE, OPTIONS", &method)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = (state.render_metrics)();
    let mut res = body.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// Ready while the shard loop is alive (its stats are fresh) and the node
/// is not being drained (load balancers then stop sending new clients).
async fn readyz(State(state): State<AppState>) -> Response {
    if *state.agent.draining().borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let fresh = state
        .shard
        .stats()
        .updated
        .is_some_and(|t| t.elapsed() < Duration::from_secs(3));
    if fresh {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "media shard not running\n").into_response()
    }
}
