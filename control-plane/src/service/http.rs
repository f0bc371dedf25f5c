//! The HTTP/JSON gateway for web pages: the same calls as the gRPC services,
//! with JSON bodies. Every error, including a body axum refuses (not JSON,
//! wrong content type, too big), is answered with
//! `{"error": "<message>", "code": "<kind>"}` and a 4xx/5xx status.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::cors::{Any, CorsLayer};

use super::{ApiError, ControlState, ErrorKind, MintRequest, REQUEST_ID_HEADER, RequestId};
use crate::scheduler::RoomSummary;

/// Largest JSON body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Body of `POST /v1/assign-publisher`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignPublisherBody {
    pub room: String,
}

/// Body of `POST /v1/assign-viewer`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignViewerBody {
    pub room: String,
    #[serde(default)]
    pub region: String,
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintTokenBody {
    pub room: String,
    pub mode: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub ttl_seconds: u64,
}

/// One room in `GET /v1/rooms`.
#[derive(Debug, Serialize)]
pub struct RoomJson {
    pub room: String,
    /// `null` when the room has no origin.
    pub origin_node: Option<String>,
    pub live: bool,
    pub subscribers: u32,
}

/// Answer of `GET /v1/rooms`.
#[derive(Debug, Serialize)]
pub struct RoomsJson {
    pub rooms: Vec<RoomJson>,
}

impl From<RoomSummary> for RoomJson {
    fn from(r: RoomSummary) -> Self {
        Self {
            room: r.room.into(),
            origin_node: r.origin_node.map(String::from),
            live: r.live,
            subscribers: r.subscribers,
        }
    }
}

/// An error as the gateway answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
    code: &'a str,
}

impl From<ApiError> for HttpError {
    fn from(err: ApiError) -> Self {
        let kind = err.kind();
        Self {
            status: kind.http_status(),
            kind,
            message: err.to_string(),
        }
    }
}

impl From<JsonRejection> for HttpError {
    fn from(rejection: JsonRejection) -> Self {
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "request body must be JSON with the header `content-type: application/json`"
                    .to_owned()
            }
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                format!("request body is larger than {MAX_BODY_BYTES} bytes")
            }
            _ => format!("invalid request body: {}", rejection.body_text()),
        };
        let status = rejection.status();
        // axum answers unparsable JSON with 400 and JSON of the wrong shape
        // with 422; both are an invalid argument here.
        Self {
            status: if status.is_client_error() {
                status
            } else {
                StatusCode::BAD_REQUEST
            },
            kind: ErrorKind::InvalidArgument,
            message,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ErrorJson {
            error: &self.message,
            code: self.kind.as_str(),
        };
        (self.status, Json(body)).into_response()
    }
}

fn request_id(headers: &HeaderMap) -> RequestId {
    RequestId::from_client(headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()))
}

/// A JSON answer (or error) with the request id header.
fn respond<T: Serialize>(rid: &RequestId, result: Result<T, HttpError>) -> Response {
    let mut response = match result {
        Ok(body) => Json(body).into_response(),
        Err(err) => err.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(rid.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

type Body<T> = Result<Json<T>, JsonRejection>;

async fn assign_publisher(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<AssignPublisherBody>,
) -> Response {
    let rid = request_id(&headers);
    let result = match body {
        Ok(Json(b)) => state
            .assign_publisher(&rid, &b.room)
            .await
            .map_err(HttpError::from),
        Err(rejection) => Err(rejection.into()),
    };
    respond(&rid, result)
}

async fn assign_viewer(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<AssignViewerBody>,
) -> Response {
    let rid = request_id(&headers);
    let result = match body {
        Ok(Json(b)) => state
            .assign_viewer(&rid, &b.room, &b.region)
            .await
            .map_err(HttpError::from),
        Err(rejection) => Err(rejection.into()),
    };
    respond(&rid, result)
}

async fn list_rooms(State(state): State<Arc<ControlState>>, headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    let result = state.list_rooms(&rid).await.map(|rooms| RoomsJson {
        rooms: rooms.into_iter().map(RoomJson::from).collect(),
    });
    respond(&rid, result.map_err(HttpError::from))
}

async fn mint_token(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<MintTokenBody>,
) -> Response {
    let rid = request_id(&headers);
    let result = match body {
        Ok(Json(b)) => {
            let req = MintRequest {
                room: b.room,
                mode: b.mode,
                subject: b.subject,
                ttl_seconds: b.ttl_seconds,
            };
            state.mint_token(&rid, req).await.map_err(HttpError::from)
        }
        Err(rejection) => Err(rejection.into()),
    };
    respond(&rid, result)
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> HttpError {
    HttpError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: ErrorKind::InvalidArgument,
        message: format!("method {method} is not allowed on {}", uri.path()),
    }
}

/// The `/v1/…` JSON routes, with their body limit and CORS.
pub fn routes(state: Arc<ControlState>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static(REQUEST_ID_HEADER),
        ])
        .expose_headers([HeaderName::from_static(REQUEST_ID_HEADER)]);
    Router::new()
        .route("/v1/assign-publisher", post(assign_publisher))
        .route("/v1/assign-viewer", post(assign_viewer))
        .route("/v1/rooms", get(list_rooms))
        .route("/v1/tokens", post(mint_token))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(cors)
        .with_state(state)
}
