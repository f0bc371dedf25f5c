//! The business store: users, rooms, follows, wallets and gifts (with the
//! gift outbox) and rooms' like totals (written in batches by the nodes), in
//! SQL through sqlx's `AnyPool`, so the same code and the same migrations
//! run on SQLite (a file under `--data-dir`, the embedded default) and on
//! PostgreSQL (clusters, `weir control --database postgres://…`).
//!
//! Portability rules kept by every query here: `$N` placeholders (SQLite
//! accepts them too), times as Unix milliseconds in `BIGINT`, ids as `TEXT`,
//! no database-specific functions, runtime `query`/`query_as` with
//! `FromRow` rows (no `query!` macros, so no database at build time).
//!
//! Every write is validated before it reaches SQL and runs in one statement
//! or one transaction, so nothing is ever half written. Writes go first in a
//! transaction (then reads), which keeps SQLite from failing a read lock's
//! upgrade under concurrent writers. Failures are [`StoreError`]s, which the
//! API maps to gRPC codes in `service/error.rs`.

mod follows;
mod room_stats;
mod rooms;
mod users;
mod wallet;

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyQueryResult};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};
use weir_protocol::RoomId;

pub use follows::Follow;
pub use room_stats::{
    LikesBatch, LikesClaim, LikesMark, LikesRow, MAX_COUNTER, MAX_LIKES_BATCH, validate_likes_batch,
};
pub use rooms::{NewRoom, Room, RoomFilter, RoomStatus};
pub use users::User;
pub use wallet::{
    Balance, CatalogueGift, DEFAULT_LEADERBOARD, Gift, Grant, GrantOutcome, LeaderboardEntry,
    LedgerEntry, MAX_BALANCE, MAX_GIFT_COUNT, MAX_GRANT, MAX_IDEMPOTENCY_KEY_LEN, MAX_LEADERBOARD,
    MINT_ACCOUNT, NewGift, OutboxEntry, SentGift, TransferKind, WalletAudit, validate_gift_count,
    validate_gift_id, validate_idempotency_key,
};

/// Name of the SQLite file under the data dir.
pub const SQLITE_FILE: &str = "weir.db";
/// Most items one list call returns.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Items a list call returns when it asks for none in particular.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Longest user id, room title or user name, in characters.
pub const MAX_ID_LEN: usize = 64;
/// Longest room title, in characters.
pub const MAX_TITLE_LEN: usize = 200;
/// Longest user name, in characters.
pub const MAX_NAME_LEN: usize = 64;

/// The migrations, in order; each one's text is fixed once released (sqlx
/// checks a checksum of every applied migration).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "rooms users follows",
        include_str!("migrations/0001_rooms_users_follows.sql"),
    ),
    (
        2,
        "wallet gifts outbox",
        include_str!("migrations/0002_wallet_gifts.sql"),
    ),
    (
        3,
        "room stats",
        include_str!("migrations/0003_room_stats.sql"),
    ),
];

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The backend's name, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A field of the request is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as the API names it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The thing named does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// What kind of thing (`user`, `room`, `follow`).
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The thing to create exists already.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// What kind of thing.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The thing is not in a state that allows the change (an ended room).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The sender's balance does not cover the payment; nothing was written.
    #[error("insufficient funds: {user} has {balance} and this costs {needed}")]
    InsufficientFunds {
        /// Who would pay.
        user: String,
        /// Their balance when the payment was refused.
        balance: i64,
        /// What it would cost.
        needed: i64,
    },
    /// The database cannot be reached now; retrying may help.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database URL is not usable.
    #[error("database URL: {0}")]
    BadUrl(String),
    /// Anything else the database said; the message says what.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// An invalid-field error.
    pub fn invalid(field: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            field,
            reason: reason.to_string(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
                Self::Unavailable(e.to_string())
            }
            E::Configuration(_) => Self::BadUrl(e.to_string()),
            _ => Self::Internal(e.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => Self::from(inner),
            other => Self::Internal(format!("migration: {other}")),
        }
    }
}

/// The database error kind of a failed statement, if it is one.
fn db_error_kind(e: &sqlx::Error) -> Option<sqlx::error::ErrorKind> {
    match e {
        sqlx::Error::Database(db) => Some(db.kind()),
        _ => None,
    }
}

/// A user's id: 1 to 64 ASCII letters, digits, `-`, `_` or `.` (the same
/// grammar as room ids). It is the subject of the user's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    /// Parses and validates a user id.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        validate_id("user id", s)?;
        Ok(Self(s.to_owned()))
    }

    /// A new random id, `u-` and 16 hex digits.
    pub fn generate() -> Self {
        Self(format!("u-{}", random_hex()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        validate_id("user id", &s)?;
        Ok(Self(s))
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for UserId {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Self::parse(s)
    }
}

fn validate_id(kind: &'static str, s: &str) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::Invalid {
        field: kind,
        reason,
    };
    if s.is_empty() {
        return Err(bad(format!("{kind} is empty")));
    }
    if s.len() > MAX_ID_LEN {
        return Err(bad(format!("{kind} is longer than {MAX_ID_LEN} bytes")));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(format!(
            "{kind} may contain only ASCII letters, digits, '-', '_' and '.', found {c:?}"
        )));
    }
    if s == "." || s == ".." {
        return Err(bad(format!("{kind} may not be {s:?}")));
    }
    Ok(())
}

/// Checks free text (a title, a name): trimmed, 1 to `max` characters, no
/// control characters. Returns it trimmed.
fn validate_text(field: &'static str, s: &str, max: usize) -> Result<String, StoreError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(StoreError::invalid(field, "is empty"));
    }
    if s.chars().count() > max {
        return Err(StoreError::invalid(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(StoreError::invalid(field, "contains control characters"));
    }
    Ok(s.to_owned())
}

fn random_hex() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    hex[..16].to_owned()
}

/// A page of a list, with the cursor of the next page (`None` at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in id order.
    pub items: Vec<T>,
    /// Pass it as `after` to get the next page.
    pub next: Option<String>,
}

/// Where a list starts and how long it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Items after this id (the `next` of the previous page); empty: from the start.
    pub after: String,
    /// Most items; 0 means [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`].
    pub limit: u32,
}

impl PageRequest {
    /// The limit to use, checked.
    fn limit(&self) -> Result<i64, StoreError> {
        match self.limit {
            0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
            n if n > MAX_PAGE_SIZE => Err(StoreError::invalid(
                "page_size",
                format!("{n} is more than the most allowed, {MAX_PAGE_SIZE}"),
            )),
            n => Ok(i64::from(n)),
        }
    }

    fn after(&self) -> Result<&str, StoreError> {
        if self.after.len() > 2 * MAX_ID_LEN + 1 {
            return Err(StoreError::invalid("page_token", "is too long"));
        }
        Ok(&self.after)
    }
}

/// Cuts `rows` (read with `limit + 1`) to a page whose cursor is `key` of its last item.
fn page<T>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(key)
    } else {
        None
    };
    Page { items: rows, next }
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn to_db_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn from_db_ms(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

/// The database URL a process uses: `flag` (from `--database` /
/// `WEIR_DATABASE`) when given, else the SQLite file under `data_dir`.
pub fn database_url(flag: Option<&str>, data_dir: &Path) -> Result<String, StoreError> {
    match flag.map(str::trim).filter(|s| !s.is_empty()) {
        Some(url) => {
            backend_of(url)?;
            Ok(url.to_owned())
        }
        None => Ok(sqlite_url(&data_dir.join(SQLITE_FILE))),
    }
}

/// `sqlite://PATH?mode=rwc` for a file (created when missing), the path made
/// absolute and percent-encoded.
pub fn sqlite_url(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut encoded = String::new();
    for b in absolute.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("sqlite://{encoded}?mode=rwc")
}

fn backend_of(url: &str) -> Result<Backend, StoreError> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        _ => Err(StoreError::BadUrl(format!(
            "{:?}: expected postgres://USER:PASSWORD@HOST:PORT/DB or sqlite://PATH",
            redact_url(url)
        ))),
    }
}

/// The URL with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Cow::Borrowed(url);
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            Cow::Owned(format!("{scheme}://{user}:***@{host}{tail}"))
        }
        _ => Cow::Borrowed(url),
    }
}

/// The business store (see the module docs). Cheap to clone: clones share the pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects to `url` (`sqlite://…` or `postgres://…`), waiting at most
    /// `timeout` for the first connection, and brings the schema up to date.
    /// Several processes may do this at once (PostgreSQL migrations take a lock).
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let backend = backend_of(url)?;
        sqlx::any::install_default_drivers();
        if backend == Backend::Sqlite
            && let Some(path) = url
                .strip_prefix("sqlite://")
                .and_then(|rest| rest.split('?').next())
                .filter(|p| !p.is_empty() && !p.starts_with(':'))
        {
            // The folder of the file must exist; SQLite creates only the file.
            let path = Path::new(path);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let decoded = percent_decode(dir);
                std::fs::create_dir_all(&decoded).map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", decoded.display()))
                })?;
            }
        }
        let max = match backend {
            // One writer at a time anyway; a few readers beside it.
            Backend::Sqlite => 4,
            Backend::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(timeout)
            .connect(url)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Unavailable(m) | StoreError::Internal(m) => {
                    StoreError::Unavailable(format!("cannot connect to {}: {m}", redact_url(url)))
                }
                other => other,
            })?;
        let store = Self { pool, backend };
        store.migrate().await?;
        tracing::info!(backend = backend.as_str(), url = %redact_url(url), "store ready");
        Ok(store)
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations not applied yet.
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
            .run(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool's connections.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn percent_decode(path: &Path) -> std::path::PathBuf {
    let s = path.to_string_lossy();
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::path::PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// Whether a statement changed exactly the rows it should have.
fn changed(result: &AnyQueryResult) -> bool {
    result.rows_affected() > 0
}

/// A room id from the API (empty: a new random one).
pub fn room_id_or_new(s: &str) -> Result<RoomId, StoreError> {
    if s.is_empty() {
        return RoomId::parse(&format!("r-{}", random_hex()))
            .map_err(|e| StoreError::Internal(e.to_string()));
    }
    RoomId::parse(s).map_err(|e| StoreError::invalid("room", e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_chosen_and_checked() {
        let dir = Path::new("/var/lib/weir data");
        assert_eq!(
            database_url(None, dir).unwrap(),
            "sqlite:///var/lib/weir%20data/weir.db?mode=rwc"
        );
        assert_eq!(
            database_url(Some("postgres://u:p@h/db"), dir).unwrap(),
            "postgres://u:p@h/db"
        );
        assert_eq!(
            database_url(Some("  "), dir).unwrap(),
            database_url(None, dir).unwrap()
        );
        let err = database_url(Some("mysql://u:secret@h/db"), dir).unwrap_err();
        assert!(matches!(err, StoreError::BadUrl(_)));
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://weir:s3cret@db:5432/weir?sslmode=disable"),
            "postgres://weir:***@db:5432/weir?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://db/weir"), "postgres://db/weir");
        assert_eq!(redact_url("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[test]
    fn user_ids_are_validated() {
        assert!(UserId::parse("alice_1.x-y").is_ok());
        for bad in ["", "a b", "a/b", ".", "..", "é"] {
            assert!(
                matches!(
                    UserId::parse(bad),
                    Err(StoreError::Invalid {
                        field: "user id",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        assert!(UserId::parse(&"x".repeat(65)).is_err());
        assert!(UserId::parse(UserId::generate().as_str()).is_ok());
    }

    #[test]
    fn text_is_trimmed_and_bounded() {
        assert_eq!(validate_text("title", "  hi ", 10).unwrap(), "hi");
        assert!(validate_text("title", "   ", 10).is_err());
        assert!(validate_text("title", "a\u{7}b", 10).is_err());
        assert!(validate_text("title", &"é".repeat(10), 10).is_ok());
        assert!(validate_text("title", &"é".repeat(11), 10).is_err());
    }

    #[test]
    fn percent_decoding_undoes_the_url() {
        assert_eq!(
            percent_decode(Path::new("/a%20b/c%25")),
            Path::new("/a b/c%")
        );
    }
}
