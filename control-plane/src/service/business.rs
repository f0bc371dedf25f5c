//! Users, rooms and follows: validate the request into domain types, call
//! the store, count and log the call. Field names in errors are the API's.

use weir_protocol::RoomId;

use super::{ApiError, ControlState, RequestId, observe};
use crate::store::{
    Follow, NewRoom, Page, PageRequest, Room, RoomFilter, RoomStatus, StoreError, User, UserId,
    room_id_or_new,
};

/// A room to create, as it arrives.
#[derive(Debug, Clone, Default)]
pub struct CreateRoom {
    /// Empty: a new random id.
    pub id: String,
    /// The owner's user id.
    pub owner: String,
    /// The title.
    pub title: String,
    /// Planned start, Unix ms.
    pub scheduled_start_ms: Option<i64>,
}

/// A page of a list, as it arrives.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// 0: the default size.
    pub page_size: u32,
    /// Empty: the first page.
    pub page_token: String,
}

impl From<ListQuery> for PageRequest {
    fn from(q: ListQuery) -> Self {
        Self {
            after: q.page_token,
            limit: q.page_size,
        }
    }
}

/// A user id from the field `field` of a request.
pub(super) fn user_id(field: &'static str, s: &str) -> Result<UserId, ApiError> {
    UserId::parse(s).map_err(|e| match e {
        StoreError::Invalid { reason, .. } => ApiError::invalid(field, reason),
        other => ApiError::Store(other),
    })
}

/// A room id from the field `field` of a request, recorded on the span.
fn room_id(field: &'static str, s: &str) -> Result<RoomId, ApiError> {
    let room = RoomId::parse(s).map_err(|e| ApiError::invalid(field, e))?;
    tracing::Span::current().record("room", room.as_str());
    Ok(room)
}

impl ControlState {
    /// Creates a user (`id` empty: a new random id).
    pub async fn create_user(
        &self,
        rid: &RequestId,
        id: &str,
        name: &str,
    ) -> Result<User, ApiError> {
        observe("CreateUser", rid, async {
            let id = match id {
                "" => None,
                s => Some(user_id("id", s)?),
            };
            Ok(self.require_store()?.create_user(id, name).await?)
        })
        .await
    }

    /// The user `id`.
    pub async fn get_user(&self, rid: &RequestId, id: &str) -> Result<User, ApiError> {
        observe("GetUser", rid, async {
            let id = user_id("id", id)?;
            Ok(self.require_store()?.user(&id).await?)
        })
        .await
    }

    /// Creates a room in status `scheduled`.
    pub async fn create_room(&self, rid: &RequestId, req: CreateRoom) -> Result<Room, ApiError> {
        observe("CreateRoom", rid, async {
            let id = room_id_or_new(&req.id).map_err(|e| match e {
                StoreError::Invalid { reason, .. } => ApiError::invalid("id", reason),
                other => ApiError::Store(other),
            })?;
            tracing::Span::current().record("room", id.as_str());
            let owner = user_id("owner", &req.owner)?;
            let scheduled_start_ms = req
                .scheduled_start_ms
                .map(|ms| {
                    u64::try_from(ms)
                        .map_err(|_| ApiError::invalid("scheduled_start_unix_ms", "is negative"))
                })
                .transpose()?;
            Ok(self
                .require_store()?
                .create_room(NewRoom {
                    id,
                    owner,
                    title: req.title,
                    scheduled_start_ms,
                })
                .await?)
        })
        .await
    }

    /// The stored room `id`.
    pub async fn get_room(&self, rid: &RequestId, id: &str) -> Result<Room, ApiError> {
        observe("GetRoom", rid, async {
            let id = room_id("id", id)?;
            Ok(self.require_store()?.room(&id).await?)
        })
        .await
    }

    /// Stored rooms, filtered by owner (empty: any) and status (`None`: any).
    pub async fn list_stored_rooms(
        &self,
        rid: &RequestId,
        owner: &str,
        status: Option<RoomStatus>,
        query: ListQuery,
    ) -> Result<Page<Room>, ApiError> {
        observe("ListStoredRooms", rid, async {
            let owner = match owner {
                "" => None,
                s => Some(user_id("owner", s)?),
            };
            let filter = RoomFilter { owner, status };
            Ok(self
                .require_store()?
                .list_rooms(&filter, &PageRequest::from(query))
                .await?)
        })
        .await
    }

    /// Marks the room live.
    pub async fn go_live(&self, rid: &RequestId, id: &str) -> Result<Room, ApiError> {
        observe("GoLive", rid, async {
            let id = room_id("id", id)?;
            Ok(self.require_store()?.go_live(&id).await?)
        })
        .await
    }

    /// Ends the room.
    pub async fn end_room(&self, rid: &RequestId, id: &str) -> Result<Room, ApiError> {
        observe("EndRoom", rid, async {
            let id = room_id("id", id)?;
            Ok(self.require_store()?.end_room(&id).await?)
        })
        .await
    }

    /// Changes a room's title.
    pub async fn set_room_title(
        &self,
        rid: &RequestId,
        id: &str,
        title: &str,
    ) -> Result<Room, ApiError> {
        observe("SetRoomTitle", rid, async {
            let id = room_id("id", id)?;
            Ok(self.require_store()?.set_room_title(&id, title).await?)
        })
        .await
    }

    /// Which of `candidates` follow `user` (`followed: false`: what a node
    /// asks once per go-live notice about the users connected to it), or
    /// which of them `user` follows (`followed: true`: friends in a room).
    pub async fn follows_among(
        &self,
        rid: &RequestId,
        bearer: Option<&str>,
        user: &str,
        candidates: &[String],
        followed: bool,
    ) -> Result<Vec<UserId>, ApiError> {
        observe("FollowsAmong", rid, async {
            // A node's question about anyone's follows: with a node secret
            // only nodes may ask (the follow graph is not public).
            if self.config.node_secret.is_some() {
                self.authenticate_node(bearer)?;
            }
            let user = user_id("user", user)?;
            let candidates = candidates
                .iter()
                .map(|c| user_id("candidates", c))
                .collect::<Result<Vec<_>, _>>()?;
            let store = self.require_store()?;
            Ok(if followed {
                store.followees_among(&user, &candidates).await?
            } else {
                store.followers_among(&user, &candidates).await?
            })
        })
        .await
    }

    /// `follower` follows `followee`.
    pub async fn follow(
        &self,
        rid: &RequestId,
        follower: &str,
        followee: &str,
    ) -> Result<Follow, ApiError> {
        observe("Follow", rid, async {
            let follower = user_id("follower", follower)?;
            let followee = user_id("followee", followee)?;
            Ok(self.require_store()?.follow(&follower, &followee).await?)
        })
        .await
    }

    /// `follower` stops following `followee`.
    pub async fn unfollow(
        &self,
        rid: &RequestId,
        follower: &str,
        followee: &str,
    ) -> Result<(), ApiError> {
        observe("Unfollow", rid, async {
            let follower = user_id("follower", follower)?;
            let followee = user_id("followee", followee)?;
            Ok(self.require_store()?.unfollow(&follower, &followee).await?)
        })
        .await
    }

    /// Who follows `user` (`followers`), or whom `user` follows.
    pub async fn list_follows(
        &self,
        rid: &RequestId,
        user: &str,
        followers: bool,
        query: ListQuery,
    ) -> Result<Page<Follow>, ApiError> {
        let method = if followers {
            "ListFollowers"
        } else {
            "ListFollowing"
        };
        observe(method, rid, async {
            let user = user_id("user", user)?;
            let store = self.require_store()?;
            let page = PageRequest::from(query);
            Ok(if followers {
                store.followers(&user, &page).await?
            } else {
                store.following(&user, &page).await?
            })
        })
        .await
    }
}
