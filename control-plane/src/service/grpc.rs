//! The gRPC services: thin translations between protobuf messages and the
//! calls of [`ControlState`]. Errors become `tonic::Status` through
//! `From<ApiError>`; every reply, good or bad, carries the request id.

use std::sync::Arc;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use weir_protocol::pb;

use super::{
    ApiError, Assignment, ControlState, Endpoint, EndpointKind, IssuedToken, MintRequest,
    REQUEST_ID_HEADER, RequestId,
};
use crate::scheduler::RoomSummary;

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
        let result = self.state.assign_viewer(&rid, &req.room, &req.region).await;
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
            node_id: e.node_id.into(),
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
