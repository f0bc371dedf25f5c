//! Follows: a user follows another (a streamer); each pair at most once.

use sqlx::error::ErrorKind as DbErrorKind;

use super::{
    MAX_PAGE_SIZE, Page, PageRequest, Store, StoreError, UserId, changed, db_error_kind,
    from_db_ms, page, to_db_ms, unix_ms,
};

/// One user following another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    /// Who follows.
    pub follower: UserId,
    /// Whom.
    pub followee: UserId,
    /// Since when, Unix ms.
    pub created_ms: u64,
}

#[derive(sqlx::FromRow)]
struct FollowRow {
    follower: String,
    followee: String,
    created_ms: i64,
}

impl TryFrom<FollowRow> for Follow {
    type Error = StoreError;
    fn try_from(r: FollowRow) -> Result<Self, StoreError> {
        let parse = |s: &str| {
            UserId::parse(s).map_err(|e| StoreError::Internal(format!("stored follow {s:?}: {e}")))
        };
        Ok(Self {
            follower: parse(&r.follower)?,
            followee: parse(&r.followee)?,
            created_ms: from_db_ms(r.created_ms),
        })
    }
}

impl Store {
    /// `follower` follows `followee`. Both must exist; following oneself is
    /// refused; following twice is ALREADY_EXISTS.
    pub async fn follow(&self, follower: &UserId, followee: &UserId) -> Result<Follow, StoreError> {
        if follower == followee {
            return Err(StoreError::invalid(
                "followee",
                "a user cannot follow themselves",
            ));
        }
        let follow = Follow {
            follower: follower.clone(),
            followee: followee.clone(),
            created_ms: unix_ms(),
        };
        let inserted =
            sqlx::query("INSERT INTO follows (follower, followee, created_ms) VALUES ($1, $2, $3)")
                .bind(follower.as_str())
                .bind(followee.as_str())
                .bind(to_db_ms(follow.created_ms))
                .execute(&self.pool)
                .await;
        match inserted {
            Ok(_) => Ok(follow),
            Err(e) => match db_error_kind(&e) {
                Some(DbErrorKind::UniqueViolation) => Err(StoreError::AlreadyExists {
                    what: "follow",
                    id: format!("{follower}->{followee}"),
                }),
                // Say which of the two is missing (users are never deleted,
                // so the answer cannot change in between).
                Some(DbErrorKind::ForeignKeyViolation) => {
                    let missing = if self.find_user(follower).await?.is_none() {
                        follower
                    } else {
                        followee
                    };
                    Err(StoreError::NotFound {
                        what: "user",
                        id: missing.to_string(),
                    })
                }
                _ => Err(e.into()),
            },
        }
    }

    /// `follower` stops following `followee`; NOT_FOUND when it did not.
    pub async fn unfollow(&self, follower: &UserId, followee: &UserId) -> Result<(), StoreError> {
        let result = sqlx::query("DELETE FROM follows WHERE follower = $1 AND followee = $2")
            .bind(follower.as_str())
            .bind(followee.as_str())
            .execute(&self.pool)
            .await?;
        if changed(&result) {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                what: "follow",
                id: format!("{follower}->{followee}"),
            })
        }
    }

    /// Who follows `user`, in follower id order. NOT_FOUND for an unknown user.
    pub async fn followers(
        &self,
        user: &UserId,
        req: &PageRequest,
    ) -> Result<Page<Follow>, StoreError> {
        let limit = req.limit()?;
        let rows = sqlx::query_as::<_, FollowRow>(
            "SELECT follower, followee, created_ms FROM follows \
             WHERE followee = $1 AND follower > $2 ORDER BY follower LIMIT $3",
        )
        .bind(user.as_str())
        .bind(req.after()?)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        self.follow_page(user, rows, limit, |f| f.follower.to_string())
            .await
    }

    /// Which of `candidates` follow `user` (at most [`MAX_PAGE_SIZE`]
    /// candidates a call; unknown ids simply do not follow), sorted.
    pub async fn followers_among(
        &self,
        user: &UserId,
        candidates: &[UserId],
    ) -> Result<Vec<UserId>, StoreError> {
        self.among(
            "SELECT follower FROM follows WHERE followee = $1 AND follower IN",
            "ORDER BY follower",
            user,
            candidates,
        )
        .await
    }

    /// `{select} ($2, $3, …) {order}` over the candidates.
    async fn among(
        &self,
        select: &str,
        order: &str,
        user: &UserId,
        candidates: &[UserId],
    ) -> Result<Vec<UserId>, StoreError> {
        if candidates.len() > MAX_PAGE_SIZE as usize {
            return Err(StoreError::invalid(
                "candidates",
                format!("at most {MAX_PAGE_SIZE} a call, not {}", candidates.len()),
            ));
        }
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (0..candidates.len())
            .map(|i| format!("${}", i + 2))
            .collect();
        let sql = format!("{select} ({}) {order}", placeholders.join(", "));
        let mut query =
            sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(sql)).bind(user.as_str());
        for c in candidates {
            query = query.bind(c.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|(u,)| {
                UserId::parse(&u)
                    .map_err(|e| StoreError::Internal(format!("stored user id {u:?}: {e}")))
            })
            .collect()
    }

    /// Which of `candidates` `user` follows (at most [`MAX_PAGE_SIZE`]
    /// candidates a call), sorted.
    pub async fn followees_among(
        &self,
        user: &UserId,
        candidates: &[UserId],
    ) -> Result<Vec<UserId>, StoreError> {
        self.among(
            "SELECT followee FROM follows WHERE follower = $1 AND followee IN",
            "ORDER BY followee",
            user,
            candidates,
        )
        .await
    }

    /// Whom `user` follows, in followee id order. NOT_FOUND for an unknown user.
    pub async fn following(
        &self,
        user: &UserId,
        req: &PageRequest,
    ) -> Result<Page<Follow>, StoreError> {
        let limit = req.limit()?;
        let rows = sqlx::query_as::<_, FollowRow>(
            "SELECT follower, followee, created_ms FROM follows \
             WHERE follower = $1 AND followee > $2 ORDER BY followee LIMIT $3",
        )
        .bind(user.as_str())
        .bind(req.after()?)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        self.follow_page(user, rows, limit, |f| f.followee.to_string())
            .await
    }

    async fn follow_page(
        &self,
        user: &UserId,
        rows: Vec<FollowRow>,
        limit: i64,
        key: impl Fn(&Follow) -> String,
    ) -> Result<Page<Follow>, StoreError> {
        // An empty list for an unknown user would hide a typo: say so.
        if rows.is_empty() {
            self.user(user).await?;
        }
        let follows = rows
            .into_iter()
            .map(Follow::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(follows, limit, key))
    }
}
