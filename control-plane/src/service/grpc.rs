//! The gRPC services (`weir.v1.Scheduler`, `Tokens`, `Users`, `Rooms`,
//! `Follows`, `Config`, `Nodes`, `Wallet`, `Rollout`, `Cdns`): thin translations between protobuf messages and the
//! calls of [`ControlState`]. Errors become `tonic::Status` through
//! `From<ApiError>`; every reply, good or bad, carries the request id.

use std::sync::Arc;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use weir_protocol::pb;

use super::{
    ApiError, Assignment, BEARER_HEADER, CdnView, ConfigEntryView, ConfigUpdate, ControlState,
    CreateRoom, Endpoint, EndpointKind, IssuedToken, ListQuery, MintRequest, NodeView,
    REQUEST_ID_HEADER, RequestId, RolloutView, SendGiftRequest,
};
use crate::scheduler::RoomSummary;
use crate::store::{
    Balance, CatalogueGift, Follow, GrantOutcome, LeaderboardEntry, LedgerEntry, Room, RoomStatus,
    SentGift, User,
};

/// `weir.v1.Scheduler` over [`ControlState`].
#[derive(Debug, Clone)]
pub struct SchedulerApi {
    state: Arc<ControlState>,
}

impl SchedulerApi {
    /// The service for `state`.
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

/// `weir.v1.Tokens` over [`ControlState`].
#[derive(Debug, Clone)]
pub struct TokensApi {
    state: Arc<ControlState>,
}

impl TokensApi {
    /// The service for `state`.
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

fn request_id(metadata: &MetadataMap) -> RequestId {
    RequestId::from_client(
        metadata
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Wraps a result into a reply that carries the request id.
fn reply<T>(rid: &RequestId, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    let value = MetadataValue::try_from(rid.as_str()).ok();
    match result {
        Ok(body) => {
            let mut response = Response::new(body);
            if let Some(v) = value {
                response.metadata_mut().insert(REQUEST_ID_HEADER, v);
            }
            Ok(response)
        }
        Err(err) => {
            let mut status = Status::from(err);
            if let Some(v) = value {
                status.metadata_mut().insert(REQUEST_ID_HEADER, v);
            }
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for SchedulerApi {
    async fn assign_publisher(
        &self,
        request: Request<pb::AssignPublisherRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self.state.assign_publisher(&rid, &req.room).await;
        reply(&rid, result.map(pb::Assignment::from))
    }

    async fn assign_viewer(
        &self,
        request: Request<pb::AssignViewerRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self
            .state
            .assign_viewer(&rid, &req.room, &req.region, &req.viewer_id)
            .await;
        reply(&rid, result.map(pb::Assignment::from))
    }

    async fn list_rooms(
        &self,
        request: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsResponse>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.list_rooms(&rid).await;
        reply(
            &rid,
            result.map(|rooms| pb::ListRoomsResponse {
                rooms: rooms.into_iter().map(pb::RoomSummary::from).collect(),
            }),
        )
    }
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for TokensApi {
    async fn mint_token(
        &self,
        request: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let req = MintRequest {
            room: req.room,
            mode: req.mode,
            subject: req.subject,
            ttl_seconds: u64::from(req.ttl_seconds),
        };
        let result = self.state.mint_token(&rid, req).await;
        reply(&rid, result.map(pb::MintTokenResponse::from))
    }
}

fn unix_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

impl From<EndpointKind> for pb::EndpointKind {
    fn from(kind: EndpointKind) -> Self {
        match kind {
            EndpointKind::Whip => Self::Whip,
            EndpointKind::Whep => Self::Whep,
            EndpointKind::Hls => Self::Hls,
        }
    }
}

impl From<Endpoint> for pb::Endpoint {
    fn from(e: Endpoint) -> Self {
        Self {
            kind: pb::EndpointKind::from(e.kind).into(),
            url: e.url,
            node_id: e.node_id.map(String::from).unwrap_or_default(),
            cdn: e.cdn.unwrap_or_default(),
        }
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> Self {
        Self {
            room: a.room.into(),
            endpoints: a.endpoints.into_iter().map(pb::Endpoint::from).collect(),
            token: a.token,
            token_expires_unix: unix_i64(a.token_expires_unix),
            degraded: a.degraded,
        }
    }
}

impl From<RoomSummary> for pb::RoomSummary {
    fn from(r: RoomSummary) -> Self {
        Self {
            room: r.room.into(),
            origin_node: r.origin_node.map(String::from).unwrap_or_default(),
            live: r.live,
            subscribers: r.subscribers,
        }
    }
}

impl From<IssuedToken> for pb::MintTokenResponse {
    fn from(t: IssuedToken) -> Self {
        Self {
            token: t.token,
            expires_unix: unix_i64(t.expires_unix),
        }
    }
}

/// The business and operator services (`weir.v1.Users`, `Rooms`,
/// `Follows`, `Config`, `Nodes`) over [`ControlState`].
#[derive(Debug, Clone)]
pub struct BusinessApi {
    state: Arc<ControlState>,
}

impl BusinessApi {
    /// The services for `state`.
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl From<RoomStatus> for pb::RoomStatus {
    fn from(s: RoomStatus) -> Self {
        match s {
            RoomStatus::Scheduled => Self::Scheduled,
            RoomStatus::Live => Self::Live,
            RoomStatus::Ended => Self::Ended,
        }
    }
}

fn room_status(value: i32) -> Result<Option<RoomStatus>, ApiError> {
    match pb::RoomStatus::try_from(value) {
        Ok(pb::RoomStatus::Unspecified) => Ok(None),
        Ok(pb::RoomStatus::Scheduled) => Ok(Some(RoomStatus::Scheduled)),
        Ok(pb::RoomStatus::Live) => Ok(Some(RoomStatus::Live)),
        Ok(pb::RoomStatus::Ended) => Ok(Some(RoomStatus::Ended)),
        Err(_) => Err(ApiError::invalid(
            "status",
            format!("{value} is not a room status"),
        )),
    }
}

impl From<User> for pb::User {
    fn from(u: User) -> Self {
        Self {
            id: u.id.into(),
            name: u.name,
            created_unix_ms: ms_i64(u.created_ms),
        }
    }
}

impl From<Room> for pb::Room {
    fn from(r: Room) -> Self {
        Self {
            id: r.id.into(),
            owner: r.owner.into(),
            title: r.title,
            status: pb::RoomStatus::from(r.status).into(),
            scheduled_start_unix_ms: r.scheduled_start_ms.map(ms_i64),
            started_unix_ms: r.started_ms.map(ms_i64),
            ended_unix_ms: r.ended_ms.map(ms_i64),
            created_unix_ms: ms_i64(r.created_ms),
            updated_unix_ms: ms_i64(r.updated_ms),
        }
    }
}

impl From<Follow> for pb::FollowEdge {
    fn from(f: Follow) -> Self {
        Self {
            follower: f.follower.into(),
            followee: f.followee.into(),
            created_unix_ms: ms_i64(f.created_ms),
        }
    }
}

impl From<ConfigEntryView> for pb::ConfigEntry {
    fn from(e: ConfigEntryView) -> Self {
        Self {
            key: e.key,
            value: e.value,
            version: e.version,
            updated_unix_ms: ms_i64(e.updated_ms),
            updated_by: e.updated_by,
            default_value: e.default_value,
            description: e.description,
        }
    }
}

fn config_state((entries, revision): (Vec<ConfigEntryView>, u64)) -> pb::ConfigState {
    pb::ConfigState {
        entries: entries.into_iter().map(pb::ConfigEntry::from).collect(),
        revision,
    }
}

impl From<NodeView> for pb::NodeStatus {
    fn from(n: NodeView) -> Self {
        let info = n.info.as_ref();
        Self {
            id: n.id.into(),
            region: info.map(|i| i.region.clone()).unwrap_or_default(),
            zone: info.map(|i| i.zone.clone()).unwrap_or_default(),
            http_url: info.map(|i| i.http_url.clone()).unwrap_or_default(),
            version: info.map(|i| i.version.clone()).unwrap_or_default(),
            capacity: info.map_or(0, |i| i.capacity),
            sessions: info.map_or(0, |i| i.load.sessions),
            egress_bps: info.map_or(0, |i| i.load.egress_bps),
            rooms: info.map_or(0, |i| u32::try_from(i.load.rooms.len()).unwrap_or(u32::MAX)),
            reported_unix_ms: info.map_or(0, |i| ms_i64(i.load.reported_at_ms)),
            alive: n.alive,
            schedulable: n.schedulable,
            cordoned: n.flags.cordoned,
            draining: n.flags.draining,
            self_draining: info.is_some_and(|i| i.draining),
            flags_updated_unix_ms: ms_i64(n.flags.updated_ms),
        }
    }
}

fn next_token(next: Option<String>) -> String {
    next.unwrap_or_default()
}

#[tonic::async_trait]
impl pb::users_server::Users for BusinessApi {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self.state.create_user(&rid, &req.id, &req.name).await;
        reply(&rid, result.map(pb::User::from))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.get_user(&rid, &request.into_inner().id).await;
        reply(&rid, result.map(pb::User::from))
    }
}

#[tonic::async_trait]
impl pb::rooms_server::Rooms for BusinessApi {
    async fn create_room(
        &self,
        request: Request<pb::CreateRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let create = CreateRoom {
            id: req.id,
            owner: req.owner,
            title: req.title,
            scheduled_start_ms: req.scheduled_start_unix_ms,
        };
        let result = self.state.create_room(&rid, create).await;
        reply(&rid, result.map(pb::Room::from))
    }

    async fn get_room(
        &self,
        request: Request<pb::GetRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.get_room(&rid, &request.into_inner().id).await;
        reply(&rid, result.map(pb::Room::from))
    }

    async fn list_rooms(
        &self,
        request: Request<pb::RoomQuery>,
    ) -> Result<Response<pb::RoomPage>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = match room_status(req.status) {
            Ok(status) => {
                let query = ListQuery {
                    page_size: req.page_size,
                    page_token: req.page_token,
                };
                self.state
                    .list_stored_rooms(&rid, &req.owner, status, query)
                    .await
            }
            Err(e) => Err(e),
        };
        reply(
            &rid,
            result.map(|page| pb::RoomPage {
                rooms: page.items.into_iter().map(pb::Room::from).collect(),
                next_page_token: next_token(page.next),
            }),
        )
    }

    async fn go_live(
        &self,
        request: Request<pb::GetRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.go_live(&rid, &request.into_inner().id).await;
        reply(&rid, result.map(pb::Room::from))
    }

    async fn end_room(
        &self,
        request: Request<pb::GetRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.end_room(&rid, &request.into_inner().id).await;
        reply(&rid, result.map(pb::Room::from))
    }

    async fn set_room_title(
        &self,
        request: Request<pb::SetRoomTitleRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self.state.set_room_title(&rid, &req.id, &req.title).await;
        reply(&rid, result.map(pb::Room::from))
    }
}

#[tonic::async_trait]
impl pb::follows_server::Follows for BusinessApi {
    async fn follow(
        &self,
        request: Request<pb::FollowRequest>,
    ) -> Result<Response<pb::FollowEdge>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self.state.follow(&rid, &req.follower, &req.followee).await;
        reply(&rid, result.map(pb::FollowEdge::from))
    }

    async fn unfollow(
        &self,
        request: Request<pb::FollowRequest>,
    ) -> Result<Response<pb::UnfollowResponse>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self
            .state
            .unfollow(&rid, &req.follower, &req.followee)
            .await;
        reply(&rid, result.map(|()| pb::UnfollowResponse {}))
    }

    async fn list_followers(
        &self,
        request: Request<pb::FollowQuery>,
    ) -> Result<Response<pb::FollowPage>, Status> {
        self.follows(request, true).await
    }

    async fn list_following(
        &self,
        request: Request<pb::FollowQuery>,
    ) -> Result<Response<pb::FollowPage>, Status> {
        self.follows(request, false).await
    }
}

impl BusinessApi {
    async fn follows(
        &self,
        request: Request<pb::FollowQuery>,
        followers: bool,
    ) -> Result<Response<pb::FollowPage>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let query = ListQuery {
            page_size: req.page_size,
            page_token: req.page_token,
        };
        let result = self
            .state
            .list_follows(&rid, &req.user, followers, query)
            .await;
        reply(
            &rid,
            result.map(|page| pb::FollowPage {
                follows: page.items.into_iter().map(pb::FollowEdge::from).collect(),
                next_page_token: next_token(page.next),
            }),
        )
    }
}

#[tonic::async_trait]
impl pb::config_server::Config for BusinessApi {
    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        let rid = request_id(request.metadata());
        let result = self
            .state
            .get_config(&rid, &request.into_inner().keys)
            .await;
        reply(&rid, result.map(config_state))
    }

    async fn set_config(
        &self,
        request: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::ConfigState>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let changes = req
            .changes
            .into_iter()
            .map(|c| ConfigUpdate {
                key: c.key,
                value: c.value,
                expected_version: c.expected_version,
            })
            .collect();
        let result = self.state.set_config(&rid, changes, &req.updated_by).await;
        reply(&rid, result.map(config_state))
    }

    async fn config_history(
        &self,
        request: Request<pb::ConfigHistoryRequest>,
    ) -> Result<Response<pb::ConfigHistoryResponse>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self.state.config_history(&rid, &req.key, req.limit).await;
        reply(
            &rid,
            result.map(|entries| pb::ConfigHistoryResponse {
                entries: entries.into_iter().map(pb::ConfigEntry::from).collect(),
            }),
        )
    }
}

#[tonic::async_trait]
impl pb::nodes_server::Nodes for BusinessApi {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.list_nodes(&rid).await;
        reply(
            &rid,
            result.map(|nodes| pb::ListNodesResponse {
                nodes: nodes.into_iter().map(pb::NodeStatus::from).collect(),
            }),
        )
    }

    async fn cordon_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.cordon_node(&rid, &request.into_inner().id).await;
        reply(&rid, result.map(pb::NodeStatus::from))
    }

    async fn drain_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.drain_node(&rid, &request.into_inner().id).await;
        reply(&rid, result.map(pb::NodeStatus::from))
    }

    async fn uncordon_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let rid = request_id(request.metadata());
        let result = self
            .state
            .uncordon_node(&rid, &request.into_inner().id)
            .await;
        reply(&rid, result.map(pb::NodeStatus::from))
    }
}

/// `weir.v1.Wallet` over [`ControlState`]. The caller's token comes from
/// the `authorization` metadata (see the wallet calls of [`ControlState`]).
#[derive(Debug, Clone)]
pub struct WalletApi {
    state: Arc<ControlState>,
}

impl WalletApi {
    /// The service for `state`.
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }
}

/// The raw `authorization` value of a call, if any.
fn bearer(metadata: &MetadataMap) -> Option<String> {
    metadata
        .get(BEARER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl From<Balance> for pb::WalletBalance {
    fn from(b: Balance) -> Self {
        Self {
            user: b.user.into(),
            balance: b.balance,
            updated_unix_ms: ms_i64(b.updated_ms),
        }
    }
}

impl From<GrantOutcome> for pb::GrantResponse {
    fn from(o: GrantOutcome) -> Self {
        let g = o.grant;
        Self {
            id: g.id,
            user: g.user.into(),
            amount: g.amount,
            balance_after: g.balance_after,
            created_unix_ms: ms_i64(g.created_ms),
            replayed: o.replayed,
        }
    }
}

impl From<LedgerEntry> for pb::LedgerEntry {
    fn from(e: LedgerEntry) -> Self {
        Self {
            transfer_id: e.transfer_id,
            amount: e.amount,
            kind: e.kind.as_str().to_owned(),
            counterparty: e.counterparty,
            created_unix_ms: ms_i64(e.created_ms),
        }
    }
}

impl From<CatalogueGift> for pb::CatalogueGift {
    fn from(g: CatalogueGift) -> Self {
        Self {
            id: g.id,
            name: g.name,
            price: g.price,
        }
    }
}

impl From<SentGift> for pb::SendGiftResponse {
    fn from(s: SentGift) -> Self {
        let g = s.gift;
        Self {
            balance_after: g.balance_after,
            replayed: s.replayed,
            gift: Some(pb::SentGift {
                id: g.id,
                room: g.room.into(),
                from_user: g.from.into(),
                to_user: g.to.into(),
                gift: g.gift,
                count: g.count,
                amount: g.amount,
                created_unix_ms: ms_i64(g.created_ms),
            }),
        }
    }
}

impl From<LeaderboardEntry> for pb::LeaderboardEntry {
    fn from(e: LeaderboardEntry) -> Self {
        Self {
            user: e.user.into(),
            amount: e.amount,
            gifts: e.gifts,
        }
    }
}

#[tonic::async_trait]
impl pb::wallet_server::Wallet for WalletApi {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::WalletBalance>, Status> {
        let rid = request_id(request.metadata());
        let token = bearer(request.metadata());
        let req = request.into_inner();
        let result = self
            .state
            .get_balance(&rid, token.as_deref(), &req.user)
            .await;
        reply(&rid, result.map(pb::WalletBalance::from))
    }

    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantResponse>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self
            .state
            .grant(&rid, &req.user, req.amount, &req.idempotency_key)
            .await;
        reply(&rid, result.map(pb::GrantResponse::from))
    }

    async fn list_ledger(
        &self,
        request: Request<pb::LedgerQuery>,
    ) -> Result<Response<pb::LedgerPage>, Status> {
        let rid = request_id(request.metadata());
        let token = bearer(request.metadata());
        let req = request.into_inner();
        let query = ListQuery {
            page_size: req.page_size,
            page_token: req.page_token,
        };
        let result = self
            .state
            .list_ledger(&rid, token.as_deref(), &req.user, query)
            .await;
        reply(
            &rid,
            result.map(|page| pb::LedgerPage {
                entries: page.items.into_iter().map(pb::LedgerEntry::from).collect(),
                next_page_token: next_token(page.next),
            }),
        )
    }

    async fn list_gift_catalogue(
        &self,
        request: Request<pb::ListGiftCatalogueRequest>,
    ) -> Result<Response<pb::GiftCatalogue>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.gift_catalogue(&rid).await;
        reply(
            &rid,
            result.map(|gifts| pb::GiftCatalogue {
                gifts: gifts.into_iter().map(pb::CatalogueGift::from).collect(),
            }),
        )
    }

    async fn send_gift(
        &self,
        request: Request<pb::SendGiftRequest>,
    ) -> Result<Response<pb::SendGiftResponse>, Status> {
        let rid = request_id(request.metadata());
        let token = bearer(request.metadata());
        let req = request.into_inner();
        let req = SendGiftRequest {
            room: req.room,
            gift: req.gift,
            count: req.count,
            idempotency_key: req.idempotency_key,
        };
        let result = self.state.send_gift(&rid, token.as_deref(), req).await;
        reply(&rid, result.map(pb::SendGiftResponse::from))
    }

    async fn gift_leaderboard(
        &self,
        request: Request<pb::GiftLeaderboardRequest>,
    ) -> Result<Response<pb::GiftLeaderboardResponse>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let result = self
            .state
            .gift_leaderboard(&rid, &req.room, req.limit)
            .await;
        reply(
            &rid,
            result.map(|entries| pb::GiftLeaderboardResponse {
                entries: entries
                    .into_iter()
                    .map(pb::LeaderboardEntry::from)
                    .collect(),
            }),
        )
    }
}

impl From<RolloutView> for pb::RolloutState {
    fn from(r: RolloutView) -> Self {
        Self {
            weights: r
                .weights
                .into_iter()
                .map(|(version, weight)| pb::VersionWeight { version, weight })
                .collect(),
            version: r.version,
            updated_unix_ms: ms_i64(r.updated_ms),
            updated_by: r.updated_by,
            versions: r
                .versions
                .into_iter()
                .map(|v| pb::VersionStatus {
                    version: v.version,
                    weight: v.weight,
                    nodes: v.nodes,
                    schedulable_nodes: v.schedulable_nodes,
                    share: v.share,
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl pb::rollout_server::Rollout for BusinessApi {
    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutState>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.get_rollout(&rid).await;
        reply(&rid, result.map(pb::RolloutState::from))
    }

    async fn set_rollout(
        &self,
        request: Request<pb::SetRolloutRequest>,
    ) -> Result<Response<pb::RolloutState>, Status> {
        let rid = request_id(request.metadata());
        let req = request.into_inner();
        let weights = req
            .weights
            .into_iter()
            .map(|w| (w.version, w.weight))
            .collect();
        let result = self
            .state
            .set_rollout(&rid, weights, &req.updated_by, req.expected_version)
            .await;
        reply(&rid, result.map(pb::RolloutState::from))
    }
}

impl From<CdnView> for pb::CdnStatus {
    fn from(c: CdnView) -> Self {
        let health = c.health.unwrap_or_default();
        let known = health.probed_ms > 0 || health.changed_ms > 0;
        Self {
            name: c.config.name,
            url: c.config.url,
            weight: c.config.weight,
            probe: c.config.probe,
            state: if known {
                health.state.as_str().to_owned()
            } else {
                "unknown".to_owned()
            },
            consecutive_failures: health.consecutive_failures,
            changed_unix_ms: ms_i64(health.changed_ms),
            probed_unix_ms: ms_i64(health.probed_ms),
            last_error: health.last_error,
        }
    }
}

#[tonic::async_trait]
impl pb::cdns_server::Cdns for BusinessApi {
    async fn list_cdns(
        &self,
        request: Request<pb::ListCdnsRequest>,
    ) -> Result<Response<pb::ListCdnsResponse>, Status> {
        let rid = request_id(request.metadata());
        let result = self.state.list_cdns(&rid).await;
        reply(
            &rid,
            result.map(|cdns| pb::ListCdnsResponse {
                cdns: cdns.into_iter().map(pb::CdnStatus::from).collect(),
            }),
        )
    }
}
