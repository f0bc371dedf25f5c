//! The HTTP/JSON gateway for web pages: the same calls as the gRPC services,
//! with JSON bodies: assignments, carried rooms and tokens, and the
//! business calls a page needs (`/v1/users`, `/v1/rooms` `POST` and
//! `/v1/rooms/{id}[/live|/end]`, `/v1/follows`, `/v1/unfollow`), and the
//! wallet a play page needs: `GET /v1/wallet/{user}[/ledger]` and
//! `POST /v1/rooms/{id}/gifts` with the user's token in
//! `authorization: Bearer …`, `GET /v1/gifts` (the catalogue) and
//! `GET /v1/rooms/{id}/leaderboard`; and one call for nodes, with the
//! cluster's node secret in `authorization: Bearer …`:
//! `POST /v1/room-stats/likes`, a batch of like totals
//! (`weir_protocol::stats`). Grants are gRPC only. Every
//! error, including a body axum refuses (not JSON, wrong content type, too
//! big), is answered with
//! `{"error": "<message>", "code": "<kind>"}` and a 4xx/5xx status.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::cors::{Any, CorsLayer};

use super::{
    ApiError, BEARER_HEADER, ControlState, CreateRoom, ErrorKind, ListQuery, MintRequest,
    REQUEST_ID_HEADER, RequestId, SendGiftRequest,
};
use crate::scheduler::RoomSummary;
use crate::store::{
    Balance, CatalogueGift, Follow, LeaderboardEntry, LedgerEntry, Room, SentGift, User,
};

/// Largest JSON body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest body of a node's batch of like totals (up to
/// [`crate::store::MAX_LIKES_BATCH`] rooms).
pub const MAX_LIKES_BODY_BYTES: usize = 512 * 1024;

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
    /// The client's own stable id (see `AssignViewerRequest.viewer_id`).
    #[serde(default)]
    pub viewer_id: String,
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
            .assign_viewer(&rid, &b.room, &b.region, &b.viewer_id)
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

/// A stored room as JSON.
#[derive(Debug, Serialize)]
pub struct StoredRoomJson {
    pub id: String,
    pub owner: String,
    pub title: String,
    /// `scheduled`, `live` or `ended`.
    pub status: &'static str,
    pub scheduled_start_unix_ms: Option<u64>,
    pub started_unix_ms: Option<u64>,
    pub ended_unix_ms: Option<u64>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
}

impl From<Room> for StoredRoomJson {
    fn from(r: Room) -> Self {
        Self {
            id: r.id.into(),
            owner: r.owner.into(),
            title: r.title,
            status: r.status.as_str(),
            scheduled_start_unix_ms: r.scheduled_start_ms,
            started_unix_ms: r.started_ms,
            ended_unix_ms: r.ended_ms,
            created_unix_ms: r.created_ms,
            updated_unix_ms: r.updated_ms,
        }
    }
}

/// A user as JSON.
#[derive(Debug, Serialize)]
pub struct UserJson {
    pub id: String,
    pub name: String,
    pub created_unix_ms: u64,
}

impl From<User> for UserJson {
    fn from(u: User) -> Self {
        Self {
            id: u.id.into(),
            name: u.name,
            created_unix_ms: u.created_ms,
        }
    }
}

/// A follow as JSON.
#[derive(Debug, Serialize)]
pub struct FollowJson {
    pub follower: String,
    pub followee: String,
    pub created_unix_ms: u64,
}

impl From<Follow> for FollowJson {
    fn from(f: Follow) -> Self {
        Self {
            follower: f.follower.into(),
            followee: f.followee.into(),
            created_unix_ms: f.created_ms,
        }
    }
}

/// Body of `POST /v1/users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    #[serde(default)]
    pub id: String,
    pub name: String,
}

/// Body of `POST /v1/rooms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRoomBody {
    #[serde(default)]
    pub id: String,
    pub owner: String,
    pub title: String,
    #[serde(default)]
    pub scheduled_start_unix_ms: Option<i64>,
}

/// Body of `POST /v1/follows` and `POST /v1/unfollow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowBody {
    pub follower: String,
    pub followee: String,
}

/// Runs `call` on a parsed body, or answers the body's rejection.
async fn with_body<B, T, F, Fut>(headers: &HeaderMap, body: Body<B>, call: F) -> Response
where
    T: Serialize,
    F: FnOnce(RequestId, B) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let rid = request_id(headers);
    let result = match body {
        Ok(Json(b)) => call(rid.clone(), b).await.map_err(HttpError::from),
        Err(rejection) => Err(rejection.into()),
    };
    respond(&rid, result)
}

async fn create_user(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<CreateUserBody>,
) -> Response {
    with_body(&headers, body, |rid, b| async move {
        state
            .create_user(&rid, &b.id, &b.name)
            .await
            .map(UserJson::from)
    })
    .await
}

async fn get_user(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let rid = request_id(&headers);
    let result = state.get_user(&rid, &id).await.map(UserJson::from);
    respond(&rid, result.map_err(HttpError::from))
}

async fn create_room(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<CreateRoomBody>,
) -> Response {
    with_body(&headers, body, |rid, b| async move {
        let create = CreateRoom {
            id: b.id,
            owner: b.owner,
            title: b.title,
            scheduled_start_ms: b.scheduled_start_unix_ms,
        };
        state
            .create_room(&rid, create)
            .await
            .map(StoredRoomJson::from)
    })
    .await
}

async fn get_room(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let rid = request_id(&headers);
    let result = state.get_room(&rid, &id).await.map(StoredRoomJson::from);
    respond(&rid, result.map_err(HttpError::from))
}

async fn go_live(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let rid = request_id(&headers);
    let result = state.go_live(&rid, &id).await.map(StoredRoomJson::from);
    respond(&rid, result.map_err(HttpError::from))
}

async fn end_room(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let rid = request_id(&headers);
    let result = state.end_room(&rid, &id).await.map(StoredRoomJson::from);
    respond(&rid, result.map_err(HttpError::from))
}

async fn follow(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<FollowBody>,
) -> Response {
    with_body(&headers, body, |rid, b| async move {
        state
            .follow(&rid, &b.follower, &b.followee)
            .await
            .map(FollowJson::from)
    })
    .await
}

/// Body of `POST /v1/follows/among` (who of the candidates follow
/// `user`) and `POST /v1/follows/followed` (whom of them `user` follows).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowersAmongBody {
    /// The followee (among) or the follower (followed).
    pub user: String,
    /// At most 500 user ids.
    pub candidates: Vec<String>,
}

/// Answer of `POST /v1/follows/among` and `/v1/follows/followed`.
#[derive(Debug, Serialize)]
pub struct FollowersAmongJson {
    /// The candidates that matched, sorted.
    pub users: Vec<String>,
}

async fn followers_among(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<FollowersAmongBody>,
) -> Response {
    among(state, headers, body, false).await
}

async fn followed_among(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<FollowersAmongBody>,
) -> Response {
    among(state, headers, body, true).await
}

async fn among(
    state: Arc<ControlState>,
    headers: HeaderMap,
    body: Body<FollowersAmongBody>,
    followed: bool,
) -> Response {
    let bearer = bearer(&headers).map(str::to_owned);
    with_body(&headers, body, |rid, b| async move {
        state
            .follows_among(&rid, bearer.as_deref(), &b.user, &b.candidates, followed)
            .await
            .map(|users| FollowersAmongJson {
                users: users.into_iter().map(String::from).collect(),
            })
    })
    .await
}

async fn unfollow(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<FollowBody>,
) -> Response {
    with_body(&headers, body, |rid, b| async move {
        state
            .unfollow(&rid, &b.follower, &b.followee)
            .await
            .map(|()| serde_json::json!({}))
    })
    .await
}

impl From<QueryRejection> for HttpError {
    fn from(rejection: QueryRejection) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: ErrorKind::InvalidArgument,
            message: format!("invalid query string: {}", rejection.body_text()),
        }
    }
}

/// A balance as JSON.
#[derive(Debug, Serialize)]
pub struct BalanceJson {
    pub user: String,
    pub balance: i64,
    pub updated_unix_ms: u64,
}

impl From<Balance> for BalanceJson {
    fn from(b: Balance) -> Self {
        Self {
            user: b.user.into(),
            balance: b.balance,
            updated_unix_ms: b.updated_ms,
        }
    }
}

/// A ledger row as JSON.
#[derive(Debug, Serialize)]
pub struct LedgerEntryJson {
    pub transfer_id: String,
    pub amount: i64,
    /// `grant` or `gift`.
    pub kind: &'static str,
    pub counterparty: String,
    pub created_unix_ms: u64,
}

/// A page of a ledger as JSON.
#[derive(Debug, Serialize)]
pub struct LedgerPageJson {
    pub entries: Vec<LedgerEntryJson>,
    /// Pass it as `page_token` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

impl From<LedgerEntry> for LedgerEntryJson {
    fn from(e: LedgerEntry) -> Self {
        Self {
            transfer_id: e.transfer_id,
            amount: e.amount,
            kind: e.kind.as_str(),
            counterparty: e.counterparty,
            created_unix_ms: e.created_ms,
        }
    }
}

/// Answer of `GET /v1/gifts`.
#[derive(Debug, Serialize)]
pub struct CatalogueJson {
    /// Cheapest first.
    pub gifts: Vec<CatalogueGiftJson>,
}

/// One gift of the catalogue as JSON.
#[derive(Debug, Serialize)]
pub struct CatalogueGiftJson {
    pub id: String,
    pub name: String,
    pub price: i64,
}

impl From<CatalogueGift> for CatalogueGiftJson {
    fn from(g: CatalogueGift) -> Self {
        Self {
            id: g.id,
            name: g.name,
            price: g.price,
        }
    }
}

/// Body of `POST /v1/rooms/{id}/gifts` (the sender is the token's subject).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendGiftBody {
    pub gift: String,
    #[serde(default = "one")]
    pub count: u32,
    pub idempotency_key: String,
}

fn one() -> u32 {
    1
}

/// Answer of `POST /v1/rooms/{id}/gifts`.
#[derive(Debug, Serialize)]
pub struct SentGiftJson {
    pub id: String,
    pub room: String,
    pub from_user: String,
    pub to_user: String,
    pub gift: String,
    pub count: u32,
    pub amount: i64,
    pub created_unix_ms: u64,
    /// The sender's balance right after paying.
    pub balance_after: i64,
    /// True when the key had been used: the first send's answer, nothing charged.
    pub replayed: bool,
}

impl From<SentGift> for SentGiftJson {
    fn from(s: SentGift) -> Self {
        let g = s.gift;
        Self {
            id: g.id,
            room: g.room.into(),
            from_user: g.from.into(),
            to_user: g.to.into(),
            gift: g.gift,
            count: g.count,
            amount: g.amount,
            created_unix_ms: g.created_ms,
            balance_after: g.balance_after,
            replayed: s.replayed,
        }
    }
}

/// Answer of `GET /v1/rooms/{id}/leaderboard`.
#[derive(Debug, Serialize)]
pub struct LeaderboardJson {
    pub room: String,
    /// Biggest sender first.
    pub entries: Vec<LeaderboardEntryJson>,
}

/// One sender of a leaderboard as JSON.
#[derive(Debug, Serialize)]
pub struct LeaderboardEntryJson {
    pub user: String,
    pub amount: i64,
    pub gifts: u64,
}

impl From<LeaderboardEntry> for LeaderboardEntryJson {
    fn from(e: LeaderboardEntry) -> Self {
        Self {
            user: e.user.into(),
            amount: e.amount,
            gifts: e.gifts,
        }
    }
}

/// Query of `GET /v1/wallet/{user}/ledger`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    #[serde(default)]
    pub page_size: u32,
    #[serde(default)]
    pub page_token: String,
}

/// Query of `GET /v1/rooms/{id}/leaderboard`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderboardParams {
    #[serde(default)]
    pub limit: u32,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(BEARER_HEADER).and_then(|v| v.to_str().ok())
}

async fn get_balance(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    let rid = request_id(&headers);
    let result = state
        .get_balance(&rid, bearer(&headers), &user)
        .await
        .map(BalanceJson::from);
    respond(&rid, result.map_err(HttpError::from))
}

async fn list_ledger(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Response {
    let rid = request_id(&headers);
    let result = match params {
        Ok(Query(p)) => {
            let query = ListQuery {
                page_size: p.page_size,
                page_token: p.page_token,
            };
            state
                .list_ledger(&rid, bearer(&headers), &user, query)
                .await
                .map(|page| LedgerPageJson {
                    entries: page.items.into_iter().map(LedgerEntryJson::from).collect(),
                    next_page_token: page.next,
                })
                .map_err(HttpError::from)
        }
        Err(rejection) => Err(rejection.into()),
    };
    respond(&rid, result)
}

async fn gift_catalogue(State(state): State<Arc<ControlState>>, headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    let result = state.gift_catalogue(&rid).await.map(|gifts| CatalogueJson {
        gifts: gifts.into_iter().map(CatalogueGiftJson::from).collect(),
    });
    respond(&rid, result.map_err(HttpError::from))
}

async fn send_gift(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Body<SendGiftBody>,
) -> Response {
    let token = bearer(&headers).map(str::to_owned);
    with_body(&headers, body, |rid, b| async move {
        let req = SendGiftRequest {
            room,
            gift: b.gift,
            count: b.count,
            idempotency_key: b.idempotency_key,
        };
        state
            .send_gift(&rid, token.as_deref(), req)
            .await
            .map(SentGiftJson::from)
    })
    .await
}

async fn gift_leaderboard(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    params: Result<Query<LeaderboardParams>, QueryRejection>,
) -> Response {
    let rid = request_id(&headers);
    let result = match params {
        Ok(Query(p)) => state
            .gift_leaderboard(&rid, &room, p.limit)
            .await
            .map(|entries| LeaderboardJson {
                room,
                entries: entries
                    .into_iter()
                    .map(LeaderboardEntryJson::from)
                    .collect(),
            })
            .map_err(HttpError::from),
        Err(rejection) => Err(rejection.into()),
    };
    respond(&rid, result)
}

async fn likes_batch(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Body<weir_protocol::stats::LikesBatchRequest>,
) -> Response {
    let bearer = bearer(&headers).map(str::to_owned);
    let rid = request_id(&headers);
    let result = match body {
        Ok(Json(b)) => state
            .likes_batch(&rid, bearer.as_deref(), b)
            .await
            .map_err(HttpError::from),
        // A body of the wrong shape is as bad as any other bad field here:
        // 400, like the checks after parsing (not axum's 422).
        Err(rejection) => Err(match HttpError::from(rejection) {
            e if e.status == StatusCode::UNPROCESSABLE_ENTITY => HttpError {
                status: StatusCode::BAD_REQUEST,
                ..e
            },
            e => e,
        }),
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
        .route("/v1/rooms", get(list_rooms).post(create_room))
        .route("/v1/rooms/{id}", get(get_room))
        .route("/v1/rooms/{id}/live", post(go_live))
        .route("/v1/rooms/{id}/end", post(end_room))
        .route("/v1/users", post(create_user))
        .route("/v1/users/{id}", get(get_user))
        .route("/v1/follows", post(follow))
        .route("/v1/unfollow", post(unfollow))
        .route("/v1/follows/among", post(followers_among))
        .route("/v1/follows/followed", post(followed_among))
        .route("/v1/tokens", post(mint_token))
        .route("/v1/wallet/{user}", get(get_balance))
        .route("/v1/wallet/{user}/ledger", get(list_ledger))
        .route("/v1/gifts", get(gift_catalogue))
        .route("/v1/rooms/{id}/gifts", post(send_gift))
        .route("/v1/rooms/{id}/leaderboard", get(gift_leaderboard))
        // Nodes only (the node secret); bigger bodies: one batch a node.
        .route(
            weir_protocol::stats::LIKES_PATH,
            post(likes_batch).layer(DefaultBodyLimit::max(MAX_LIKES_BODY_BYTES)),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(cors)
        .with_state(state)
}
