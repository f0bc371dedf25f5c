//! Like totals of rooms, persisted in batches by the nodes (issue 8: hot
//! room state stays off the SQL write path; nodes aggregate it in memory and
//! publish it on the bus, and write it here every few seconds).
//!
//! A row says "`likes` likes counted from the room's bus events through
//! offset `through` of epoch `epoch`". Every node carrying a room sees the
//! same events in the same order, so a node that holds every likes event
//! in `(through, N]` adds their sum with a compare-and-set on
//! `(epoch, through)` and moves `through` to `N`: of several nodes racing
//! over the same range exactly one wins, and the others re-read. A claim may
//! also move the row to another epoch or past offsets no node holds any
//! more (a rebase, keeping the likes); which claims to make is the node's
//! business (`weir_data_plane::bus`), this module only makes each one atomic.
//!
//! A batch is one transaction: its claims (in room order, so two batches
//! never wait on each other's row locks in opposite orders on PostgreSQL),
//! then a read of every room it names.

use std::collections::{BTreeMap, BTreeSet};

use weir_protocol::RoomId;

use super::{Store, StoreError, from_db_ms, to_db_ms, unix_ms};

/// Most rooms one batch may name (claims and reads together).
pub const MAX_LIKES_BATCH: usize = 1000;
/// Largest offset, epoch or like count accepted: 2^53 - 1, so JavaScript
/// clients hold them exactly (the bus keeps offsets and epochs below it).
pub const MAX_COUNTER: u64 = (1 << 53) - 1;

/// What the store holds for a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LikesRow {
    /// Likes counted.
    pub likes: u64,
    /// The bus epoch `through` belongs to.
    pub epoch: u64,
    /// Every likes event up to and including this offset is in `likes`.
    pub through: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
}

/// Where a room's row stands, as a claim expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LikesMark {
    pub epoch: u64,
    pub through: u64,
}

/// One compare-and-set of a room's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikesClaim {
    pub room: RoomId,
    /// The row as the node last read it; `None`: the room has no row yet
    /// (the claim creates it, unless another node did first).
    pub expect: Option<LikesMark>,
    /// Where the row is to stand after the claim.
    pub to: LikesMark,
    /// Likes to add (the sum of the likes events in the range moved over).
    pub add: u64,
}

/// What a batch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LikesBatch {
    /// Per claim, in the order given: whether it was applied.
    pub applied: Vec<bool>,
    /// The rows of every room named (claims and reads), after the claims;
    /// rooms without a row are absent.
    pub rows: BTreeMap<RoomId, LikesRow>,
}

fn check_counter(field: &'static str, v: u64) -> Result<i64, StoreError> {
    if v > MAX_COUNTER {
        return Err(StoreError::invalid(
            field,
            format!("{v} is above the largest allowed, {MAX_COUNTER}"),
        ));
    }
    i64::try_from(v).map_err(|_| StoreError::invalid(field, "out of range"))
}

/// Checks a batch before any of it is written: a bad claim refuses the
/// whole batch.
pub fn validate_likes_batch(claims: &[LikesClaim], read: &[RoomId]) -> Result<(), StoreError> {
    let mut claimed = BTreeSet::new();
    for (i, c) in claims.iter().enumerate() {
        if !claimed.insert(&c.room) {
            return Err(StoreError::invalid(
                "claims",
                format!("room {} is claimed twice in one batch", c.room),
            ));
        }
        check_counter("claims.to.epoch", c.to.epoch)?;
        check_counter("claims.to.through", c.to.through)?;
        check_counter("claims.add", c.add)?;
        if c.to.epoch == 0 {
            return Err(StoreError::invalid(
                "claims.to.epoch",
                format!("claim {i} (room {}): an epoch is never 0", c.room),
            ));
        }
        if let Some(e) = c.expect {
            check_counter("claims.expect.epoch", e.epoch)?;
            check_counter("claims.expect.through", e.through)?;
            if e.epoch == c.to.epoch && c.to.through <= e.through {
                return Err(StoreError::invalid(
                    "claims.to.through",
                    format!(
                        "claim {i} (room {}): within one epoch a claim moves forward, \
                         {} is not past {}",
                        c.room, c.to.through, e.through
                    ),
                ));
            }
        }
    }
    let named: BTreeSet<&RoomId> = claims.iter().map(|c| &c.room).chain(read).collect();
    if named.len() > MAX_LIKES_BATCH {
        return Err(StoreError::invalid(
            "rooms",
            format!(
                "a batch may name at most {MAX_LIKES_BATCH} rooms, this one names {}",
                named.len()
            ),
        ));
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Row {
    room: String,
    likes: i64,
    epoch: i64,
    through_offset: i64,
    updated_ms: i64,
}

impl Store {
    /// Applies `claims` (each a compare-and-set, see the module docs) and
    /// reads the rows of every room named, in one transaction. Invalid
    /// input refuses the whole batch before anything is written.
    pub async fn apply_likes(
        &self,
        claims: &[LikesClaim],
        read: &[RoomId],
    ) -> Result<LikesBatch, StoreError> {
        validate_likes_batch(claims, read)?;
        let now = to_db_ms(unix_ms());
        let mut order: Vec<usize> = (0..claims.len()).collect();
        order.sort_by(|a, b| claims[*a].room.cmp(&claims[*b].room));
        let mut applied = vec![false; claims.len()];
        let mut tx = self.pool.begin().await?;
        for i in order {
            let c = &claims[i];
            let add = check_counter("claims.add", c.add)?;
            let epoch = check_counter("claims.to.epoch", c.to.epoch)?;
            let through = check_counter("claims.to.through", c.to.through)?;
            let done =
                match c.expect {
                    None => sqlx::query(
                        "INSERT INTO room_stats (room, likes, epoch, through_offset, updated_ms) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room) DO NOTHING",
                    )
                    .bind(c.room.as_str())
                    .bind(add)
                    .bind(epoch)
                    .bind(through)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?,
                    Some(e) => {
                        // `likes <= MAX - add` keeps the total exact in a
                        // JavaScript number; a claim that would pass it loses.
                        sqlx::query(
                            "UPDATE room_stats SET likes = likes + $1, epoch = $2, \
                         through_offset = $3, updated_ms = $4 \
                         WHERE room = $5 AND epoch = $6 AND through_offset = $7 \
                         AND likes <= $8",
                        )
                        .bind(add)
                        .bind(epoch)
                        .bind(through)
                        .bind(now)
                        .bind(c.room.as_str())
                        .bind(check_counter("claims.expect.epoch", e.epoch)?)
                        .bind(check_counter("claims.expect.through", e.through)?)
                        .bind(to_db_ms(MAX_COUNTER - c.add))
                        .execute(&mut *tx)
                        .await?
                    }
                };
            applied[i] = done.rows_affected() == 1;
        }
        let named: Vec<&RoomId> = claims
            .iter()
            .map(|c| &c.room)
            .chain(read)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut rows = BTreeMap::new();
        for chunk in named.chunks(500) {
            if chunk.is_empty() {
                continue;
            }
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT room, likes, epoch, through_offset, updated_ms FROM room_stats \
                 WHERE room IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(sql));
            for room in chunk {
                query = query.bind(room.as_str());
            }
            for r in query.fetch_all(&mut *tx).await? {
                let room = RoomId::parse(&r.room)
                    .map_err(|e| StoreError::Internal(format!("stored room {:?}: {e}", r.room)))?;
                rows.insert(
                    room,
                    LikesRow {
                        likes: from_db_ms(r.likes),
                        epoch: from_db_ms(r.epoch),
                        through: from_db_ms(r.through_offset),
                        updated_ms: from_db_ms(r.updated_ms),
                    },
                );
            }
        }
        tx.commit().await?;
        Ok(LikesBatch { applied, rows })
    }

    /// The stored like totals of `rooms` (at most [`MAX_LIKES_BATCH`]).
    pub async fn room_likes(
        &self,
        rooms: &[RoomId],
    ) -> Result<BTreeMap<RoomId, LikesRow>, StoreError> {
        Ok(self.apply_likes(&[], rooms).await?.rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    fn claim(r: &str, expect: Option<(u64, u64)>, to: (u64, u64), add: u64) -> LikesClaim {
        LikesClaim {
            room: room(r),
            expect: expect.map(|(epoch, through)| LikesMark { epoch, through }),
            to: LikesMark {
                epoch: to.0,
                through: to.1,
            },
            add,
        }
    }

    #[test]
    fn batches_are_checked_before_anything_is_written() {
        assert!(validate_likes_batch(&[claim("a", Some((1, 5)), (1, 9), 3)], &[]).is_ok());
        assert!(validate_likes_batch(&[claim("a", Some((1, 5)), (2, 0), 0)], &[]).is_ok());
        let bad = [
            (
                vec![claim("a", None, (1, 2), 1), claim("a", None, (1, 3), 1)],
                "claimed twice",
            ),
            (vec![claim("a", Some((1, 5)), (1, 5), 0)], "moves forward"),
            (vec![claim("a", Some((1, 5)), (1, 4), 0)], "moves forward"),
            (vec![claim("a", None, (0, 4), 0)], "never 0"),
            (vec![claim("a", None, (1, 4), 1 << 53)], "largest allowed"),
            (vec![claim("a", None, (1, u64::MAX), 0)], "largest allowed"),
        ];
        for (claims, why) in bad {
            let err = validate_likes_batch(&claims, &[]).unwrap_err().to_string();
            assert!(err.contains(why), "{err} should say {why}");
        }
        let many: Vec<RoomId> = (0..=MAX_LIKES_BATCH)
            .map(|i| room(&format!("r{i}")))
            .collect();
        assert!(validate_likes_batch(&[], &many[..MAX_LIKES_BATCH]).is_ok());
        assert!(
            validate_likes_batch(&[], &many)
                .unwrap_err()
                .to_string()
                .contains("at most 1000 rooms")
        );
    }
}
