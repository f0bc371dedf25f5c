//! Rooms: an id (what streamers publish to), an owner, a title, a status
//! (`scheduled` → `live` → `ended`, or `scheduled` → `ended`), an optional
//! scheduled start, and when it went live and ended.

use std::str::FromStr;

use sqlx::error::ErrorKind as DbErrorKind;
use weir_protocol::RoomId;

use super::{
    MAX_TITLE_LEN, Page, PageRequest, Store, StoreError, UserId, changed, db_error_kind,
    from_db_ms, page, to_db_ms, unix_ms, validate_text,
};

/// How far in the past a scheduled start may lie (clock skew of clients).
pub const START_PAST_SLACK_MS: u64 = 5 * 60 * 1000;
/// How far ahead a start may be scheduled.
pub const START_MAX_AHEAD_MS: u64 = 366 * 24 * 60 * 60 * 1000;

/// Where a room is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomStatus {
    /// Created, not live yet (with or without a start time).
    Scheduled,
    /// Its streamer went live.
    Live,
    /// Over; it cannot go live again.
    Ended,
}

impl RoomStatus {
    /// The status as stored and as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Live => "live",
            Self::Ended => "ended",
        }
    }
}

impl FromStr for RoomStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "scheduled" => Ok(Self::Scheduled),
            "live" => Ok(Self::Live),
            "ended" => Ok(Self::Ended),
            other => Err(StoreError::invalid(
                "status",
                format!("{other:?} is not one of scheduled, live, ended"),
            )),
        }
    }
}

impl std::fmt::Display for RoomStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// The id.
    pub id: RoomId,
    /// Who streams it (the subject of its publish tokens).
    pub owner: UserId,
    /// Title shown to viewers.
    pub title: String,
    /// Where it is in its life.
    pub status: RoomStatus,
    /// When the owner plans to go live, Unix ms.
    pub scheduled_start_ms: Option<u64>,
    /// When it went live, Unix ms.
    pub started_ms: Option<u64>,
    /// When it ended, Unix ms.
    pub ended_ms: Option<u64>,
    /// Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
}

/// A room to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoom {
    /// Its id.
    pub id: RoomId,
    /// Its owner; must exist.
    pub owner: UserId,
    /// Its title.
    pub title: String,
    /// Planned start, Unix ms; not more than a few minutes in the past.
    pub scheduled_start_ms: Option<u64>,
}

/// Which rooms a list returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomFilter {
    /// Only rooms of this owner.
    pub owner: Option<UserId>,
    /// Only rooms in this status.
    pub status: Option<RoomStatus>,
}

#[derive(sqlx::FromRow)]
struct RoomRow {
    id: String,
    owner: String,
    title: String,
    status: String,
    scheduled_start_ms: Option<i64>,
    started_ms: Option<i64>,
    ended_ms: Option<i64>,
    created_ms: i64,
    updated_ms: i64,
}

impl TryFrom<RoomRow> for Room {
    type Error = StoreError;
    fn try_from(r: RoomRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Internal(format!("stored room {:?}: {what}: {e}", r.id))
        };
        Ok(Self {
            id: RoomId::parse(&r.id).map_err(|e| corrupt("id", &e))?,
            owner: UserId::parse(&r.owner).map_err(|e| corrupt("owner", &e))?,
            status: RoomStatus::from_str(&r.status).map_err(|e| corrupt("status", &e))?,
            title: r.title,
            scheduled_start_ms: r.scheduled_start_ms.map(from_db_ms),
            started_ms: r.started_ms.map(from_db_ms),
            ended_ms: r.ended_ms.map(from_db_ms),
            created_ms: from_db_ms(r.created_ms),
            updated_ms: from_db_ms(r.updated_ms),
        })
    }
}

fn not_found(id: &RoomId) -> StoreError {
    StoreError::NotFound {
        what: "room",
        id: id.to_string(),
    }
}

/// Checks a scheduled start against `now`.
fn validate_start(start: Option<u64>, now: u64) -> Result<(), StoreError> {
    let Some(start) = start else { return Ok(()) };
    if start.saturating_add(START_PAST_SLACK_MS) < now {
        return Err(StoreError::invalid(
            "scheduled_start",
            format!("{start} (Unix ms) is in the past"),
        ));
    }
    if start > now.saturating_add(START_MAX_AHEAD_MS) {
        return Err(StoreError::invalid(
            "scheduled_start",
            format!("{start} (Unix ms) is more than 366 days ahead"),
        ));
    }
    if i64::try_from(start).is_err() {
        return Err(StoreError::invalid("scheduled_start", "out of range"));
    }
    Ok(())
}

impl Store {
    /// Creates a room in status `scheduled`.
    pub async fn create_room(&self, new: NewRoom) -> Result<Room, StoreError> {
        let now = unix_ms();
        let title = validate_text("title", &new.title, MAX_TITLE_LEN)?;
        validate_start(new.scheduled_start_ms, now)?;
        let room = Room {
            id: new.id,
            owner: new.owner,
            title,
            status: RoomStatus::Scheduled,
            scheduled_start_ms: new.scheduled_start_ms,
            started_ms: None,
            ended_ms: None,
            created_ms: now,
            updated_ms: now,
        };
        let inserted = sqlx::query(
            "INSERT INTO rooms (id, owner, title, status, scheduled_start_ms, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(room.id.as_str())
        .bind(room.owner.as_str())
        .bind(room.title.as_str())
        .bind(room.status.as_str())
        .bind(room.scheduled_start_ms.map(to_db_ms))
        .bind(to_db_ms(now))
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(room),
            Err(e) => Err(match db_error_kind(&e) {
                Some(DbErrorKind::UniqueViolation) => StoreError::AlreadyExists {
                    what: "room",
                    id: room.id.to_string(),
                },
                Some(DbErrorKind::ForeignKeyViolation) => StoreError::NotFound {
                    what: "user",
                    id: room.owner.to_string(),
                },
                _ => e.into(),
            }),
        }
    }

    /// The room `id`.
    pub async fn room(&self, id: &RoomId) -> Result<Room, StoreError> {
        self.find_room(id).await?.ok_or_else(|| not_found(id))
    }

    /// The room `id`, if there is one.
    pub async fn find_room(&self, id: &RoomId) -> Result<Option<Room>, StoreError> {
        sqlx::query_as::<_, RoomRow>(
            "SELECT id, owner, title, status, scheduled_start_ms, started_ms, ended_ms, created_ms, updated_ms \
             FROM rooms WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .map(Room::try_from)
        .transpose()
    }

    /// Rooms in id order, filtered.
    pub async fn list_rooms(
        &self,
        filter: &RoomFilter,
        req: &PageRequest,
    ) -> Result<Page<Room>, StoreError> {
        let limit = req.limit()?;
        // Empty strings stand for "any": the same statement on every backend.
        let rows = sqlx::query_as::<_, RoomRow>(
            "SELECT id, owner, title, status, scheduled_start_ms, started_ms, ended_ms, created_ms, updated_ms \
             FROM rooms WHERE id > $1 AND ($2 = '' OR owner = $2) AND ($3 = '' OR status = $3) \
             ORDER BY id LIMIT $4",
        )
        .bind(req.after()?)
        .bind(filter.owner.as_ref().map_or("", UserId::as_str))
        .bind(filter.status.map_or("", RoomStatus::as_str))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let rooms = rows
            .into_iter()
            .map(Room::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rooms, limit, |r| r.id.to_string()))
    }

    /// Marks the room live (from `scheduled`; a live room stays as it is).
    /// An ended room cannot go live again.
    pub async fn go_live(&self, id: &RoomId) -> Result<Room, StoreError> {
        let now = to_db_ms(unix_ms());
        self.transition(
            id,
            sqlx::query(
                "UPDATE rooms SET status = 'live', started_ms = $2, updated_ms = $2 \
                 WHERE id = $1 AND status = 'scheduled'",
            )
            .bind(id.as_str())
            .bind(now),
            |room| match room.status {
                RoomStatus::Live => Ok(()),
                _ => Err(StoreError::FailedPrecondition(format!(
                    "room {} has ended; create a new room to go live again",
                    room.id
                ))),
            },
        )
        .await
    }

    /// Ends the room (from `scheduled` or `live`; an ended room stays as it is).
    pub async fn end_room(&self, id: &RoomId) -> Result<Room, StoreError> {
        let now = to_db_ms(unix_ms());
        self.transition(
            id,
            sqlx::query(
                "UPDATE rooms SET status = 'ended', ended_ms = $2, updated_ms = $2 \
                 WHERE id = $1 AND status <> 'ended'",
            )
            .bind(id.as_str())
            .bind(now),
            |_| Ok(()),
        )
        .await
    }

    /// Changes the title of a room that has not ended.
    pub async fn set_room_title(&self, id: &RoomId, title: &str) -> Result<Room, StoreError> {
        let title = validate_text("title", title, MAX_TITLE_LEN)?;
        let now = to_db_ms(unix_ms());
        self.transition(
            id,
            sqlx::query(
                "UPDATE rooms SET title = $2, updated_ms = $3 WHERE id = $1 AND status <> 'ended'",
            )
            .bind(id.as_str())
            .bind(title)
            .bind(now),
            |room| {
                Err(StoreError::FailedPrecondition(format!(
                    "room {} has ended; its title can no longer change",
                    room.id
                )))
            },
        )
        .await
    }

    /// Runs `update` (guarded by the statuses it may change) and reads the
    /// room back in the same transaction. When it changed nothing, the room
    /// is either missing (NOT_FOUND) or in a status `unchanged` judges.
    async fn transition<'q>(
        &self,
        id: &RoomId,
        update: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        unchanged: impl FnOnce(&Room) -> Result<(), StoreError>,
    ) -> Result<Room, StoreError> {
        let mut tx = self.pool.begin().await?;
        let result = update.execute(&mut *tx).await?;
        let room = sqlx::query_as::<_, RoomRow>(
            "SELECT id, owner, title, status, scheduled_start_ms, started_ms, ended_ms, created_ms, updated_ms \
             FROM rooms WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .map(Room::try_from)
        .transpose()?
        .ok_or_else(|| not_found(id))?;
        if !changed(&result) {
            unchanged(&room)?;
        }
        tx.commit().await?;
        Ok(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_bounded() {
        let now = 1_000_000_000_000;
        assert!(validate_start(None, now).is_ok());
        assert!(validate_start(Some(now), now).is_ok());
        assert!(validate_start(Some(now - START_PAST_SLACK_MS), now).is_ok());
        assert!(validate_start(Some(now - START_PAST_SLACK_MS - 1), now).is_err());
        assert!(validate_start(Some(now + START_MAX_AHEAD_MS), now).is_ok());
        assert!(validate_start(Some(now + START_MAX_AHEAD_MS + 1), now).is_err());
    }

    #[test]
    fn statuses_round_trip() {
        for s in [RoomStatus::Scheduled, RoomStatus::Live, RoomStatus::Ended] {
            assert_eq!(s.as_str().parse::<RoomStatus>(), Ok(s));
        }
        assert!(matches!(
            "paused".parse::<RoomStatus>(),
            Err(StoreError::Invalid {
                field: "status",
                ..
            })
        ));
    }
}
