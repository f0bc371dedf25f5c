//! Users: an id (the subject of their tokens), a display name, a creation time.

use super::{
    MAX_NAME_LEN, Page, PageRequest, Store, StoreError, UserId, db_error_kind, from_db_ms, page,
    to_db_ms, unix_ms, validate_text,
};

/// A user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The id.
    pub id: UserId,
    /// Display name.
    pub name: String,
    /// Unix milliseconds.
    pub created_ms: u64,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    name: String,
    created_ms: i64,
}

impl TryFrom<UserRow> for User {
    type Error = StoreError;
    fn try_from(r: UserRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: UserId::parse(&r.id)
                .map_err(|e| StoreError::Internal(format!("stored user id {:?}: {e}", r.id)))?,
            name: r.name,
            created_ms: from_db_ms(r.created_ms),
        })
    }
}

const SELECT_USER: &str = "SELECT id, name, created_ms FROM users WHERE id = $1";

impl Store {
    /// Creates a user; `id` `None` gets a new random id.
    pub async fn create_user(&self, id: Option<UserId>, name: &str) -> Result<User, StoreError> {
        let name = validate_text("name", name, MAX_NAME_LEN)?;
        let user = User {
            id: id.unwrap_or_else(UserId::generate),
            name,
            created_ms: unix_ms(),
        };
        let inserted = sqlx::query("INSERT INTO users (id, name, created_ms) VALUES ($1, $2, $3)")
            .bind(user.id.as_str())
            .bind(user.name.as_str())
            .bind(to_db_ms(user.created_ms))
            .execute(&self.pool)
            .await;
        match inserted {
            Ok(_) => Ok(user),
            Err(e) if db_error_kind(&e) == Some(sqlx::error::ErrorKind::UniqueViolation) => {
                Err(StoreError::AlreadyExists {
                    what: "user",
                    id: user.id.into(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The user `id`.
    pub async fn user(&self, id: &UserId) -> Result<User, StoreError> {
        self.find_user(id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "user",
                id: id.to_string(),
            })
    }

    /// The user `id`, if there is one.
    pub async fn find_user(&self, id: &UserId) -> Result<Option<User>, StoreError> {
        sqlx::query_as::<_, UserRow>(SELECT_USER)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(User::try_from)
            .transpose()
    }

    /// Users in id order.
    pub async fn list_users(&self, req: &PageRequest) -> Result<Page<User>, StoreError> {
        let limit = req.limit()?;
        let rows = sqlx::query_as::<_, UserRow>(
            "SELECT id, name, created_ms FROM users WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(req.after()?)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let users = rows
            .into_iter()
            .map(User::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(users, limit, |u| u.id.to_string()))
    }
}
