//! Wallets and gifts: a balance per user, a double-entry ledger, a gift
//! catalogue, paid gifts with the sender's idempotency keys, and the outbox
//! the relay publishes gift events from (see [`crate::outbox`]).
//!
//! Money moves only in transfers, each one transaction that writes one
//! ledger row per account it touches, rows summing to zero, and changes the
//! balances by the same amounts: so the ledger always sums to zero and every
//! balance equals the sum of its account's ledger rows ([`Store::wallet_audit`]
//! checks both). Grants come from the system account [`MINT_ACCOUNT`], the
//! only account that may go negative.
//!
//! A gift is one transaction: the gift row (whose `(sender, key)` is unique),
//! the outbox row, the conditional debit `balance = balance - amount WHERE
//! balance >= amount` (a row lock on PostgreSQL, the database lock on
//! SQLite: concurrent gifts can never take a balance below zero, and a
//! `CHECK` backs it up), the credit to the room's owner and the two ledger
//! rows. The two balance updates run in account-id order so two opposite
//! gifts cannot deadlock on PostgreSQL; as little as possible follows them,
//! since every gift in a room waits for its owner's row. A retry with the same key answers the first gift
//! and charges nothing; when two retries race, the one whose insert loses on
//! the unique key reads and answers the winner's gift.

use sqlx::error::ErrorKind as DbErrorKind;
use weir_protocol::RoomId;
use weir_protocol::bus::{EventBody, RoomEvent};

use super::{
    MAX_ID_LEN, Page, PageRequest, RoomStatus, Store, StoreError, UserId, db_error_kind,
    from_db_ms, page, to_db_ms, unix_ms, validate_id,
};

/// The system account grants are paid from; it may go negative (its
/// balance is minus everything ever granted).
pub const MINT_ACCOUNT: &str = "system:mint";
/// Most items of one gift send (`count`).
pub const MAX_GIFT_COUNT: u32 = 9_999;
/// Largest single grant, in the wallet's smallest unit.
pub const MAX_GRANT: i64 = 1_000_000_000_000;
/// Most a user's balance may hold; a credit beyond it is refused, so sums
/// stay far from overflowing a `BIGINT`.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Most entries one leaderboard call returns.
pub const MAX_LEADERBOARD: u32 = 100;
/// Entries a leaderboard returns when none is asked for.
pub const DEFAULT_LEADERBOARD: u32 = 10;

/// What a transfer was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferKind {
    /// An operator's grant (deposit) from the mint.
    Grant,
    /// A gift from a viewer to a room's owner.
    Gift,
}

impl TransferKind {
    /// As stored and as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Gift => "gift",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "grant" => Ok(Self::Grant),
            "gift" => Ok(Self::Gift),
            other => Err(StoreError::Internal(format!(
                "stored transfer kind {other:?} is unknown"
            ))),
        }
    }
}

/// A user's balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// Whose.
    pub user: UserId,
    /// In the wallet's smallest unit; 0 for a user who never had any.
    pub balance: i64,
    /// Last change, Unix ms (0: never changed).
    pub updated_ms: u64,
}

/// One gift of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CatalogueGift {
    /// Its id (what `SendGift` names).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Price of one, in the wallet's smallest unit.
    pub price: i64,
}

/// An operator's grant to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The transfer id.
    pub id: String,
    /// Who received it.
    pub user: UserId,
    /// How much.
    pub amount: i64,
    /// The key the grant was made with.
    pub idempotency_key: String,
    /// The user's balance right after it.
    pub balance_after: i64,
    /// Unix ms.
    pub created_ms: u64,
}

/// A grant and whether it was made by this call or by an earlier one with
/// the same key (then nothing was credited this time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOutcome {
    pub grant: Grant,
    /// True when the key had been used: the first grant's answer.
    pub replayed: bool,
}

/// A gift to send, as the API validated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGift {
    /// The room; its owner receives the gift.
    pub room: RoomId,
    /// Who pays (from the caller's token, never from the request body).
    pub from: UserId,
    /// The catalogue gift id.
    pub gift: String,
    /// How many, 1 to [`MAX_GIFT_COUNT`].
    pub count: u32,
    /// The sender's key for this send: a retry with it charges nothing more.
    pub idempotency_key: String,
}

/// A paid gift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gift {
    /// Its id: the transfer id, and the room bus message id of its event.
    pub id: String,
    pub room: RoomId,
    pub from: UserId,
    /// The room's owner when it was sent.
    pub to: UserId,
    /// The catalogue gift id.
    pub gift: String,
    pub count: u32,
    /// Total charged: price times count.
    pub amount: i64,
    pub idempotency_key: String,
    /// The sender's balance right after paying.
    pub balance_after: i64,
    /// Unix ms.
    pub created_ms: u64,
}

impl Gift {
    /// The event the outbox relay publishes to the room bus.
    pub fn event(&self) -> RoomEvent {
        RoomEvent {
            at_ms: self.created_ms,
            body: EventBody::Gift {
                gift_id: self.id.clone(),
                from_user: self.from.to_string(),
                to_user: self.to.to_string(),
                gift: self.gift.clone(),
                count: self.count,
                amount: self.amount,
            },
        }
    }
}

/// A gift and whether this call paid it or an earlier one with the same key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentGift {
    pub gift: Gift,
    /// True when the key had been used: the first send's answer, nothing charged.
    pub replayed: bool,
}

/// One row of an account's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The transfer (a grant or gift id); its rows sum to zero.
    pub transfer_id: String,
    /// The account (a user id, or [`MINT_ACCOUNT`]).
    pub account: String,
    /// Positive: money in; negative: money out.
    pub amount: i64,
    pub kind: TransferKind,
    /// The other account of the transfer.
    pub counterparty: String,
    /// Unix ms.
    pub created_ms: u64,
}

/// One sender on a room's gift leaderboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderboardEntry {
    pub user: UserId,
    /// Everything they paid in gifts in the room.
    pub amount: i64,
    /// How many gift items they sent there.
    pub gifts: u64,
}

/// A gift event waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// The outbox row's id.
    pub id: String,
    /// The gift's id: the bus message id.
    pub gift_id: String,
    pub room: RoomId,
    /// The event to publish.
    pub event: RoomEvent,
    /// Unix ms.
    pub created_ms: u64,
    /// Publishes tried so far.
    pub attempts: u64,
}

/// The wallet's invariants as the database sees them now (all zero on a
/// healthy store, apart from the counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalletAudit {
    /// Sum of every ledger row: always 0.
    pub ledger_sum: i64,
    /// Sum of every balance, the mint's included: always 0.
    pub balance_sum: i64,
    /// Accounts whose balance is not the sum of their ledger rows: always 0.
    pub mismatched_accounts: u64,
    /// User accounts below zero: always 0.
    pub negative_users: u64,
    /// Ledger rows.
    pub ledger_rows: u64,
    /// Gift rows.
    pub gifts: u64,
    /// Outbox rows, published or not.
    pub outbox_rows: u64,
    /// Outbox rows not yet published.
    pub outbox_pending: u64,
    /// Gifts without exactly one outbox row: always 0.
    pub gifts_without_one_outbox_row: u64,
}

#[derive(sqlx::FromRow)]
struct GiftRow {
    id: String,
    room: String,
    from_user: String,
    to_user: String,
    gift: String,
    quantity: i64,
    amount: i64,
    idempotency_key: String,
    balance_after: i64,
    created_ms: i64,
}

/// `SELECT … FROM gifts` with every column of [`GiftRow`], then `$tail`.
macro_rules! select_gift {
    ($tail:literal) => {
        concat!(
            "SELECT id, room, from_user, to_user, gift, quantity, amount, ",
            "idempotency_key, balance_after, created_ms FROM gifts ",
            $tail
        )
    };
}

impl TryFrom<GiftRow> for Gift {
    type Error = StoreError;
    fn try_from(r: GiftRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Internal(format!("stored gift {:?}: {what}: {e}", r.id))
        };
        Ok(Self {
            room: RoomId::parse(&r.room).map_err(|e| corrupt("room", &e))?,
            from: UserId::parse(&r.from_user).map_err(|e| corrupt("from", &e))?,
            to: UserId::parse(&r.to_user).map_err(|e| corrupt("to", &e))?,
            count: u32::try_from(r.quantity).map_err(|e| corrupt("count", &e))?,
            id: r.id,
            gift: r.gift,
            amount: r.amount,
            idempotency_key: r.idempotency_key,
            balance_after: r.balance_after,
            created_ms: from_db_ms(r.created_ms),
        })
    }
}

#[derive(sqlx::FromRow)]
struct GrantRow {
    id: String,
    user_id: String,
    amount: i64,
    idempotency_key: String,
    balance_after: i64,
    created_ms: i64,
}

impl TryFrom<GrantRow> for Grant {
    type Error = StoreError;
    fn try_from(r: GrantRow) -> Result<Self, StoreError> {
        Ok(Self {
            user: UserId::parse(&r.user_id)
                .map_err(|e| StoreError::Internal(format!("stored grant {:?}: {e}", r.id)))?,
            id: r.id,
            amount: r.amount,
            idempotency_key: r.idempotency_key,
            balance_after: r.balance_after,
            created_ms: from_db_ms(r.created_ms),
        })
    }
}

#[derive(sqlx::FromRow)]
struct LedgerRow {
    transfer_id: String,
    account: String,
    amount: i64,
    kind: String,
    counterparty: String,
    created_ms: i64,
}

impl TryFrom<LedgerRow> for LedgerEntry {
    type Error = StoreError;
    fn try_from(r: LedgerRow) -> Result<Self, StoreError> {
        Ok(Self {
            kind: TransferKind::parse(&r.kind)?,
            transfer_id: r.transfer_id,
            account: r.account,
            amount: r.amount,
            counterparty: r.counterparty,
            created_ms: from_db_ms(r.created_ms),
        })
    }
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: String,
    gift_id: String,
    room: String,
    payload: String,
    created_ms: i64,
    attempts: i64,
}

impl TryFrom<OutboxRow> for OutboxEntry {
    type Error = StoreError;
    fn try_from(r: OutboxRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Internal(format!("stored outbox row {:?}: {what}: {e}", r.id))
        };
        Ok(Self {
            room: RoomId::parse(&r.room).map_err(|e| corrupt("room", &e))?,
            event: RoomEvent::decode(r.payload.as_bytes()).map_err(|e| corrupt("payload", &e))?,
            id: r.id,
            gift_id: r.gift_id,
            created_ms: from_db_ms(r.created_ms),
            attempts: u64::try_from(r.attempts).unwrap_or(0),
        })
    }
}

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] visible ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::invalid("idempotency_key", reason);
    if key.is_empty() {
        return Err(bad(
            "is empty; send a fresh random key per gift and reuse it only to retry".into(),
        ));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(bad(format!(
            "is longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes"
        )));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "may contain only visible ASCII characters (no spaces)".into()
        ));
    }
    Ok(())
}

/// Checks a catalogue gift id (the grammar of user ids).
pub fn validate_gift_id(gift: &str) -> Result<(), StoreError> {
    validate_id("gift", gift)
}

/// Checks a gift count: 1 to [`MAX_GIFT_COUNT`].
pub fn validate_gift_count(count: u32) -> Result<(), StoreError> {
    if !(1..=MAX_GIFT_COUNT).contains(&count) {
        return Err(StoreError::invalid(
            "count",
            format!("{count} is not between 1 and {MAX_GIFT_COUNT}"),
        ));
    }
    Ok(())
}

fn new_transfer_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn balance_limit() -> StoreError {
    StoreError::FailedPrecondition(format!(
        "the receiving balance would exceed the most an account may hold ({MAX_BALANCE})"
    ))
}

/// A ledger page cursor: `{created_ms}:{transfer_id}` of the last entry.
fn ledger_cursor(e: &LedgerEntry) -> String {
    format!("{}:{}", e.created_ms, e.transfer_id)
}

fn parse_ledger_cursor(after: &str) -> Result<(i64, String), StoreError> {
    if after.is_empty() {
        return Ok((i64::MAX, String::new()));
    }
    let (ms, id) = after
        .split_once(':')
        .ok_or_else(|| StoreError::invalid("page_token", "is not a ledger page token"))?;
    let ms = ms
        .parse::<i64>()
        .map_err(|_| StoreError::invalid("page_token", "is not a ledger page token"))?;
    Ok((ms, id.to_owned()))
}

impl Store {
    /// The gift catalogue, cheapest first.
    pub async fn gift_catalogue(&self) -> Result<Vec<CatalogueGift>, StoreError> {
        Ok(sqlx::query_as::<_, CatalogueGift>(
            "SELECT id, name, price FROM gift_catalogue ORDER BY price, id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// `user`'s balance (0 when they never had any). NOT_FOUND for an unknown user.
    pub async fn balance(&self, user: &UserId) -> Result<Balance, StoreError> {
        self.user(user).await?;
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT balance, updated_ms FROM accounts WHERE id = $1")
                .bind(user.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let (balance, updated_ms) = row.unwrap_or((0, 0));
        Ok(Balance {
            user: user.clone(),
            balance,
            updated_ms: from_db_ms(updated_ms),
        })
    }

    /// Grants `amount` to `user` from the mint (an operator's deposit). A
    /// retry with the same `key` credits nothing more and answers the first
    /// grant; the same key with another user or amount is refused.
    pub async fn grant(
        &self,
        user: &UserId,
        amount: i64,
        key: &str,
    ) -> Result<GrantOutcome, StoreError> {
        if !(1..=MAX_GRANT).contains(&amount) {
            return Err(StoreError::invalid(
                "amount",
                format!("{amount} is not between 1 and {MAX_GRANT}"),
            ));
        }
        validate_idempotency_key(key)?;
        if let Some(first) = self.grant_by_key(key).await? {
            return replayed_grant(first, user, amount);
        }
        self.user(user).await?;
        let id = new_transfer_id("t");
        let now = to_db_ms(unix_ms());
        let mut tx = self.pool.begin().await?;
        // The grant row first: it claims the key (and, on SQLite, takes the
        // write lock before anything is read).
        let inserted = sqlx::query(
            "INSERT INTO grants (id, user_id, amount, idempotency_key, balance_after, created_ms) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(id.as_str())
        .bind(user.as_str())
        .bind(amount)
        .bind(key)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            drop(tx);
            return match db_error_kind(&e) {
                Some(DbErrorKind::UniqueViolation) => match self.grant_by_key(key).await? {
                    Some(first) => replayed_grant(first, user, amount),
                    None => Err(e.into()),
                },
                Some(DbErrorKind::ForeignKeyViolation) => Err(StoreError::NotFound {
                    what: "user",
                    id: user.to_string(),
                }),
                _ => Err(e.into()),
            };
        }
        // The mint first, then the user: the same lock order in every grant.
        sqlx::query("UPDATE accounts SET balance = balance - $1, updated_ms = $2 WHERE id = $3")
            .bind(amount)
            .bind(now)
            .bind(MINT_ACCOUNT)
            .execute(&mut *tx)
            .await?;
        let balance_after = credit(&mut tx, user.as_str(), amount, now)
            .await?
            .ok_or_else(balance_limit)?;
        insert_legs(
            &mut tx,
            &id,
            TransferKind::Grant,
            MINT_ACCOUNT,
            user.as_str(),
            amount,
            now,
        )
        .await?;
        sqlx::query("UPDATE grants SET balance_after = $1 WHERE id = $2")
            .bind(balance_after)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(GrantOutcome {
            grant: Grant {
                id,
                user: user.clone(),
                amount,
                idempotency_key: key.to_owned(),
                balance_after,
                created_ms: from_db_ms(now),
            },
            replayed: false,
        })
    }

    async fn grant_by_key(&self, key: &str) -> Result<Option<Grant>, StoreError> {
        sqlx::query_as::<_, GrantRow>(
            "SELECT id, user_id, amount, idempotency_key, balance_after, created_ms \
             FROM grants WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        .map(Grant::try_from)
        .transpose()
    }

    /// Sends a gift (see the module docs): pays it and queues its event in
    /// one transaction. A retry with the same key answers the first send and
    /// charges nothing; the same key for another room, gift or count is
    /// refused. Insufficient funds is [`StoreError::InsufficientFunds`] and
    /// writes nothing.
    pub async fn send_gift(&self, new: &NewGift) -> Result<SentGift, StoreError> {
        validate_gift_id(&new.gift)?;
        validate_gift_count(new.count)?;
        validate_idempotency_key(&new.idempotency_key)?;
        if let Some(first) = self.gift_by_key(&new.from, &new.idempotency_key).await? {
            return replayed_gift(first, new);
        }
        let id = new_transfer_id("g");
        let now = to_db_ms(unix_ms());
        let mut tx = self.pool.begin().await?;
        // The gift row first: it claims the key and checks the room and the
        // gift (a refusal is explained after the rollback, off the path of
        // paid gifts), and it is a write, so on SQLite the transaction holds
        // the write lock before it reads.
        let inserted: Result<Option<(String, i64)>, sqlx::Error> = sqlx::query_as(
            "INSERT INTO gifts (id, room, from_user, to_user, gift, quantity, amount, \
             idempotency_key, balance_after, created_ms) \
             SELECT $1, r.id, $3, r.owner, c.id, $5, c.price * $5, $6, 0, $7 \
             FROM rooms r, gift_catalogue c \
             WHERE r.id = $2 AND r.status <> 'ended' AND r.owner <> $3 AND c.id = $4 \
             RETURNING to_user, amount",
        )
        .bind(id.as_str())
        .bind(new.room.as_str())
        .bind(new.from.as_str())
        .bind(new.gift.as_str())
        .bind(i64::from(new.count))
        .bind(new.idempotency_key.as_str())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await;
        let (to, amount) = match inserted {
            Ok(Some(row)) => row,
            Ok(None) => {
                // Unknown or ended room, the sender's own room, or no such gift.
                drop(tx);
                return Err(self.gift_refusal(new).await?.unwrap_or_else(|| {
                    StoreError::Internal("the gift could not be written".into())
                }));
            }
            Err(e) => {
                drop(tx);
                if db_error_kind(&e) == Some(DbErrorKind::UniqueViolation) {
                    // A concurrent send with the same key won (PostgreSQL
                    // waited for it to commit; SQLite ran it first).
                    if let Some(first) = self.gift_by_key(&new.from, &new.idempotency_key).await? {
                        return replayed_gift(first, new);
                    }
                }
                return Err(e.into());
            }
        };
        let mut gift = Gift {
            id,
            room: new.room.clone(),
            from: new.from.clone(),
            to: UserId::parse(&to)
                .map_err(|e| StoreError::Internal(format!("stored room owner {to:?}: {e}")))?,
            gift: new.gift.clone(),
            count: new.count,
            amount,
            idempotency_key: new.idempotency_key.clone(),
            balance_after: 0,
            created_ms: from_db_ms(now),
        };
        // The outbox row before the balances: it needs neither, and every
        // statement after the first balance update is time the room owner's
        // row stays locked, which every gift in the room waits for.
        let payload = String::from_utf8(gift.event().encode())
            .map_err(|e| StoreError::Internal(format!("gift event is not UTF-8: {e}")))?;
        sqlx::query(
            "INSERT INTO outbox (id, gift_id, room, payload, created_ms, published_ms, attempts) \
             VALUES ($1, $2, $3, $4, $5, NULL, 0)",
        )
        .bind(new_transfer_id("o"))
        .bind(gift.id.as_str())
        .bind(gift.room.as_str())
        .bind(payload)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let from = new.from.as_str();
        // Both balances in account-id order: two opposite gifts take the row
        // locks in the same order and cannot deadlock.
        let balance_after = if from < to.as_str() {
            let after = debit(&mut tx, from, amount, now).await?;
            if after.is_some() {
                credit(&mut tx, &to, amount, now)
                    .await?
                    .ok_or_else(balance_limit)?;
            }
            after
        } else {
            credit(&mut tx, &to, amount, now)
                .await?
                .ok_or_else(balance_limit)?;
            debit(&mut tx, from, amount, now).await?
        };
        let Some(balance_after) = balance_after else {
            drop(tx);
            let balance = self.account_balance(from).await?;
            return Err(StoreError::InsufficientFunds {
                user: from.to_owned(),
                balance,
                needed: amount,
            });
        };
        // The ledger rows after the credit: they reference both accounts,
        // and the credit opens the owner's when it is their first gift.
        insert_legs(
            &mut tx,
            &gift.id,
            TransferKind::Gift,
            from,
            &to,
            amount,
            now,
        )
        .await?;
        sqlx::query("UPDATE gifts SET balance_after = $1 WHERE id = $2")
            .bind(balance_after)
            .bind(gift.id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        gift.balance_after = balance_after;
        Ok(SentGift {
            gift,
            replayed: false,
        })
    }

    /// Why `new` cannot be sent now, if there is a reason: the room is
    /// unknown or ended, the sender owns it, or the gift is unknown.
    async fn gift_refusal(&self, new: &NewGift) -> Result<Option<StoreError>, StoreError> {
        let room = match self.find_room(&new.room).await? {
            None => {
                return Ok(Some(StoreError::NotFound {
                    what: "room",
                    id: new.room.to_string(),
                }));
            }
            Some(room) => room,
        };
        if room.status == RoomStatus::Ended {
            return Ok(Some(StoreError::FailedPrecondition(format!(
                "room {} has ended; it takes no more gifts",
                room.id
            ))));
        }
        if room.owner == new.from {
            return Ok(Some(StoreError::invalid(
                "room",
                format!("{} is your own room; gifts go to someone else's", room.id),
            )));
        }
        let known: Option<(String,)> =
            sqlx::query_as("SELECT id FROM gift_catalogue WHERE id = $1")
                .bind(new.gift.as_str())
                .fetch_optional(&self.pool)
                .await?;
        if known.is_none() {
            return Ok(Some(StoreError::NotFound {
                what: "gift",
                id: new.gift.clone(),
            }));
        }
        Ok(None)
    }

    async fn gift_by_key(&self, from: &UserId, key: &str) -> Result<Option<Gift>, StoreError> {
        sqlx::query_as::<_, GiftRow>(select_gift!(
            "WHERE from_user = $1 AND idempotency_key = $2"
        ))
        .bind(from.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        .map(Gift::try_from)
        .transpose()
    }

    /// The gift `id`.
    pub async fn gift(&self, id: &str) -> Result<Gift, StoreError> {
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(StoreError::invalid("gift id", "is empty or too long"));
        }
        sqlx::query_as::<_, GiftRow>(select_gift!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(Gift::try_from)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound {
                what: "gift",
                id: id.to_owned(),
            })
    }

    async fn account_balance(&self, account: &str) -> Result<i64, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT balance FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map_or(0, |(b,)| b))
    }

    /// `user`'s ledger rows, newest first. NOT_FOUND for an unknown user.
    pub async fn ledger(
        &self,
        user: &UserId,
        req: &PageRequest,
    ) -> Result<Page<LedgerEntry>, StoreError> {
        let limit = req.limit()?;
        let (before_ms, before_id) = parse_ledger_cursor(req.after()?)?;
        let rows = sqlx::query_as::<_, LedgerRow>(
            "SELECT transfer_id, account, amount, kind, counterparty, created_ms FROM ledger \
             WHERE account = $1 AND (created_ms < $2 OR (created_ms = $2 AND transfer_id < $3)) \
             ORDER BY created_ms DESC, transfer_id DESC LIMIT $4",
        )
        .bind(user.as_str())
        .bind(before_ms)
        .bind(before_id)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            self.user(user).await?;
        }
        let entries = rows
            .into_iter()
            .map(LedgerEntry::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(entries, limit, ledger_cursor))
    }

    /// The room's top senders by amount paid (ties by user id), at most
    /// `limit` (0: [`DEFAULT_LEADERBOARD`]). NOT_FOUND for an unknown room.
    pub async fn gift_leaderboard(
        &self,
        room: &RoomId,
        limit: u32,
    ) -> Result<Vec<LeaderboardEntry>, StoreError> {
        let limit = match limit {
            0 => DEFAULT_LEADERBOARD,
            n if n > MAX_LEADERBOARD => {
                return Err(StoreError::invalid(
                    "limit",
                    format!("{n} is more than the most allowed, {MAX_LEADERBOARD}"),
                ));
            }
            n => n,
        };
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT from_user, CAST(SUM(amount) AS BIGINT) AS total, \
             CAST(SUM(quantity) AS BIGINT) AS items \
             FROM gifts WHERE room = $1 GROUP BY from_user \
             ORDER BY total DESC, from_user LIMIT $2",
        )
        .bind(room.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            self.room(room).await?;
        }
        rows.into_iter()
            .map(|(user, amount, items)| {
                Ok(LeaderboardEntry {
                    user: UserId::parse(&user).map_err(|e| {
                        StoreError::Internal(format!("stored gift sender {user:?}: {e}"))
                    })?,
                    amount,
                    gifts: u64::try_from(items).unwrap_or(0),
                })
            })
            .collect()
    }

    /// The oldest `limit` outbox rows not yet published, oldest first.
    pub async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        sqlx::query_as::<_, OutboxRow>(
            "SELECT id, gift_id, room, payload, created_ms, attempts FROM outbox \
             WHERE published_ms IS NULL ORDER BY created_ms, id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(OutboxEntry::try_from)
        .collect()
    }

    /// How many outbox rows wait to be published.
    pub async fn outbox_pending_count(&self) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox WHERE published_ms IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Marks an outbox row published (the broker acknowledged it); false
    /// when it already was (another relay got there first).
    pub async fn mark_outbox_published(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET published_ms = $1, attempts = attempts + 1, last_error = NULL \
             WHERE id = $2 AND published_ms IS NULL",
        )
        .bind(to_db_ms(unix_ms()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks the outbox rows `ids` published in one statement (the relay's
    /// batch: one commit for many events, instead of one each); returns how
    /// many were still pending (the others another relay had marked).
    pub async fn mark_outbox_published_all(&self, ids: &[String]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        // Only placeholders are formatted into the text; the ids are bound.
        let list = (0..ids.len())
            .map(|i| format!("${}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE outbox SET published_ms = $1, attempts = attempts + 1, last_error = NULL \
             WHERE published_ms IS NULL AND id IN ({list})"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(to_db_ms(unix_ms()));
        for id in ids {
            query = query.bind(id.as_str());
        }
        Ok(query.execute(&self.pool).await?.rows_affected())
    }

    /// Records a failed publish of an outbox row (it stays pending).
    pub async fn record_outbox_failure(&self, id: &str, error: &str) -> Result<(), StoreError> {
        let error: String = error.chars().take(500).collect();
        sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $1 WHERE id = $2")
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Reads the wallet's invariants (see [`WalletAudit`]).
    pub async fn wallet_audit(&self) -> Result<WalletAudit, StoreError> {
        let count = |sql: &'static str| async move {
            let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&self.pool).await?;
            Ok::<i64, StoreError>(n)
        };
        let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(WalletAudit {
            ledger_sum: count("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger")
                .await?,
            balance_sum: count("SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT) FROM accounts")
                .await?,
            mismatched_accounts: unsigned(
                count(
                    "SELECT COUNT(*) FROM accounts a WHERE a.balance <> \
                     (SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger l \
                      WHERE l.account = a.id)",
                )
                .await?,
            ),
            negative_users: unsigned(
                count("SELECT COUNT(*) FROM accounts WHERE kind = 'user' AND balance < 0").await?,
            ),
            ledger_rows: unsigned(count("SELECT COUNT(*) FROM ledger").await?),
            gifts: unsigned(count("SELECT COUNT(*) FROM gifts").await?),
            outbox_rows: unsigned(count("SELECT COUNT(*) FROM outbox").await?),
            outbox_pending: unsigned(
                count("SELECT COUNT(*) FROM outbox WHERE published_ms IS NULL").await?,
            ),
            gifts_without_one_outbox_row: unsigned(
                count(
                    "SELECT COUNT(*) FROM gifts g WHERE \
                     (SELECT COUNT(*) FROM outbox o WHERE o.gift_id = g.id) <> 1",
                )
                .await?,
            ),
        })
    }
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// Takes `amount` from a user account that holds at least that much;
/// `None` (nothing changed) when it does not, or has no account.
async fn debit(
    tx: &mut Tx<'_>,
    account: &str,
    amount: i64,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "UPDATE accounts SET balance = balance - $1, updated_ms = $2 \
         WHERE id = $3 AND kind = 'user' AND balance >= $1 RETURNING balance",
    )
    .bind(amount)
    .bind(now)
    .bind(account)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(b,)| b))
}

/// Adds `amount` to a user account, opening it when needed; `None`
/// (nothing changed) when the balance would pass [`MAX_BALANCE`].
async fn credit(
    tx: &mut Tx<'_>,
    account: &str,
    amount: i64,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO accounts (id, kind, balance, created_ms, updated_ms) \
         VALUES ($1, 'user', $2, $3, $3) \
         ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + excluded.balance, \
         updated_ms = excluded.updated_ms \
         WHERE accounts.balance <= $4 - excluded.balance \
         RETURNING balance",
    )
    .bind(account)
    .bind(amount)
    .bind(now)
    .bind(MAX_BALANCE)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(b,)| b))
}

/// The two ledger rows of a transfer of `amount` from `from` to `to`.
async fn insert_legs(
    tx: &mut Tx<'_>,
    transfer: &str,
    kind: TransferKind,
    from: &str,
    to: &str,
    amount: i64,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO ledger (transfer_id, account, amount, kind, counterparty, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6), ($1, $5, $7, $4, $2, $6)",
    )
    .bind(transfer)
    .bind(from)
    .bind(-amount)
    .bind(kind.as_str())
    .bind(to)
    .bind(now)
    .bind(amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn replayed_grant(first: Grant, user: &UserId, amount: i64) -> Result<GrantOutcome, StoreError> {
    if &first.user != user || first.amount != amount {
        return Err(StoreError::FailedPrecondition(format!(
            "idempotency key {:?} was already used for a grant of {} to {}; use a new key for a new grant",
            first.idempotency_key, first.amount, first.user
        )));
    }
    Ok(GrantOutcome {
        grant: first,
        replayed: true,
    })
}

fn replayed_gift(first: Gift, new: &NewGift) -> Result<SentGift, StoreError> {
    if first.room != new.room || first.gift != new.gift || first.count != new.count {
        return Err(StoreError::FailedPrecondition(format!(
            "idempotency key {:?} was already used for {} x {} in room {}; use a new key for a new gift",
            first.idempotency_key, first.count, first.gift, first.room
        )));
    }
    Ok(SentGift {
        gift: first,
        replayed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(validate_idempotency_key("k-1:2/3").is_ok());
        for bad in ["", "a b", "é", "a\u{7}"] {
            assert!(validate_idempotency_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY_LEN)).is_ok());
        assert!(validate_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn counts_are_bounded() {
        assert!(validate_gift_count(0).is_err());
        assert!(validate_gift_count(1).is_ok());
        assert!(validate_gift_count(MAX_GIFT_COUNT).is_ok());
        assert!(validate_gift_count(MAX_GIFT_COUNT + 1).is_err());
    }

    #[test]
    fn ledger_cursors_round_trip() {
        let e = LedgerEntry {
            transfer_id: "g-abc".into(),
            account: "u".into(),
            amount: 1,
            kind: TransferKind::Gift,
            counterparty: "v".into(),
            created_ms: 42,
        };
        assert_eq!(
            parse_ledger_cursor(&ledger_cursor(&e)).ok(),
            Some((42, "g-abc".to_owned()))
        );
        assert_eq!(
            parse_ledger_cursor("").ok(),
            Some((i64::MAX, String::new()))
        );
        assert!(parse_ledger_cursor("nope").is_err());
        assert!(parse_ledger_cursor("x:y").is_err());
    }
}
