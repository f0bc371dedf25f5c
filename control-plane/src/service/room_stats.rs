//! Like totals the nodes persist in batches (`POST /v1/room-stats/likes`):
//! check who calls (the cluster's node secret), turn the JSON into store
//! claims (any bad field refuses the whole batch, nothing written), apply
//! them in one transaction, answer where every room named stands.

use weir_protocol::stats::{LikesBatchAnswer, LikesBatchRequest, LikesRow};
use weir_protocol::{NodeId, RoomId};

use super::{ApiError, ControlState, RequestId, bearer_token, observe};
use crate::store::{LikesClaim, LikesMark, MAX_LIKES_BATCH};

impl ControlState {
    /// Checks the node secret of a node's call.
    pub(crate) fn authenticate_node(&self, bearer: Option<&str>) -> Result<(), ApiError> {
        let Some(secret) = &self.config.node_secret else {
            return Err(ApiError::PermissionDenied(
                "this control plane takes no node reports: start it with --node-secret \
                 (and give its nodes the same --node-secret)"
                    .into(),
            ));
        };
        let given = bearer_token(bearer).map_err(|_| {
            ApiError::Unauthenticated(
                "this call is for nodes: send `authorization: Bearer <node secret>`".into(),
            )
        })?;
        if !secret.matches(given) {
            return Err(ApiError::Unauthenticated(
                "the node secret is not this control plane's".into(),
            ));
        }
        Ok(())
    }

    /// Applies a node's batch of like claims and reads (see the module docs).
    pub async fn likes_batch(
        &self,
        rid: &RequestId,
        bearer: Option<&str>,
        req: LikesBatchRequest,
    ) -> Result<LikesBatchAnswer, ApiError> {
        observe("RoomLikes", rid, async {
            self.authenticate_node(bearer)?;
            let node = NodeId::parse(&req.node).map_err(|e| ApiError::invalid("node", e))?;
            if req.claims.len() + req.read.len() > 2 * MAX_LIKES_BATCH {
                return Err(ApiError::invalid(
                    "claims",
                    format!("a batch may name at most {MAX_LIKES_BATCH} rooms"),
                ));
            }
            let mut claims = Vec::with_capacity(req.claims.len());
            for (i, c) in req.claims.iter().enumerate() {
                let room = RoomId::parse(&c.room)
                    .map_err(|e| ApiError::invalid("claims", format!("claim {i}: room: {e}")))?;
                claims.push(LikesClaim {
                    room,
                    expect: c.expect.map(|m| LikesMark {
                        epoch: m.epoch,
                        through: m.through,
                    }),
                    to: LikesMark {
                        epoch: c.to.epoch,
                        through: c.to.through,
                    },
                    add: c.add,
                });
            }
            let read = req
                .read
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    RoomId::parse(r).map_err(|e| ApiError::invalid("read", format!("room {i}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let batch = self.require_store()?.apply_likes(&claims, &read).await?;
            let won = batch.applied.iter().filter(|a| **a).count();
            metrics::counter!("weir_room_likes_claims_total", "result" => "applied")
                .increment(won as u64);
            metrics::counter!("weir_room_likes_claims_total", "result" => "lost")
                .increment((batch.applied.len() - won) as u64);
            tracing::debug!(%node, claims = claims.len(), applied = won, reads = read.len(), "like totals batch");
            Ok(LikesBatchAnswer {
                applied: batch.applied,
                rows: batch
                    .rows
                    .into_iter()
                    .map(|(room, r)| LikesRow {
                        room: room.into(),
                        likes: r.likes,
                        epoch: r.epoch,
                        through: r.through,
                        updated_unix_ms: r.updated_ms,
                    })
                    .collect(),
            })
        })
        .await
    }
}
