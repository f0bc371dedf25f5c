//! Wallets and gifts: validate the request, find out who calls, call the
//! store, wake the outbox relay after a gift.
//!
//! Who the caller is comes from their token, never from a request field:
//! `authorization: Bearer w1.…`, a token this control plane's
//! [`crate::TokenIssuer`] signed (any node can check it; here the issuer's
//! own verifier does), not expired, whose subject is the user. For
//! `SendGift` it must be a `play` or `chat` token of the gift's room (the
//! token a viewer of that room holds); for the caller's balance and ledger
//! any of their tokens will do. `Grant` is an operator call, refused unless
//! [`crate::ControlConfig::allow_grants`]; the catalogue and leaderboards
//! are public.

use std::time::{SystemTime, UNIX_EPOCH};

use weir_protocol::{Mode, TokenClaims};

use super::business::user_id;
use super::{ApiError, ControlState, ListQuery, RequestId, observe, parse_room};
use crate::store::{
    Balance, CatalogueGift, GrantOutcome, LeaderboardEntry, LedgerEntry, NewGift, Page,
    PageRequest, SentGift, UserId, validate_gift_count, validate_gift_id, validate_idempotency_key,
};

/// Header and gRPC metadata key of the caller's token.
pub const BEARER_HEADER: &str = "authorization";

/// A gift to send, as it arrives (the sender is the token's subject).
#[derive(Debug, Clone, Default)]
pub struct SendGiftRequest {
    pub room: String,
    /// A catalogue gift id.
    pub gift: String,
    pub count: u32,
    pub idempotency_key: String,
}

/// The token of an `authorization` value `Bearer <token>` (the scheme in
/// any case); UNAUTHENTICATED when there is none.
pub fn bearer_token(value: Option<&str>) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::Unauthenticated(
            "this call needs the user's token: send `authorization: Bearer w1.…`".into(),
        )
    };
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(missing)?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::Unauthenticated(
            "the authorization value must be `Bearer <token>`".into(),
        )),
    }
}

impl ControlState {
    /// The claims of the caller's token (see the module docs).
    fn authenticate(&self, bearer: Option<&str>) -> Result<TokenClaims, ApiError> {
        let token = bearer_token(bearer)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.tokens
            .verifier()
            .verify(token, now)
            .map_err(|e| ApiError::Unauthenticated(format!("{e}")))
    }

    /// The user a token speaks for.
    fn token_user(claims: &TokenClaims) -> Result<UserId, ApiError> {
        UserId::parse(&claims.sub).map_err(|_| {
            ApiError::PermissionDenied(format!(
                "the token's subject {:?} is not a user id, so it has no wallet",
                claims.sub
            ))
        })
    }

    /// The caller, who must be `asked` when that is not empty.
    fn wallet_owner(&self, bearer: Option<&str>, asked: &str) -> Result<UserId, ApiError> {
        let claims = self.authenticate(bearer)?;
        if !asked.is_empty() {
            let asked = user_id("user", asked)?;
            if asked.as_str() != claims.sub {
                return Err(ApiError::PermissionDenied(format!(
                    "the token is {:?}'s, not {asked}'s; a wallet is read with its owner's token",
                    claims.sub
                )));
            }
        }
        Self::token_user(&claims)
    }

    /// The caller's balance (`user` empty: the token's subject).
    pub async fn get_balance(
        &self,
        rid: &RequestId,
        bearer: Option<&str>,
        user: &str,
    ) -> Result<Balance, ApiError> {
        observe("GetBalance", rid, async {
            let user = self.wallet_owner(bearer, user)?;
            Ok(self.require_store()?.balance(&user).await?)
        })
        .await
    }

    /// The caller's ledger rows, newest first.
    pub async fn list_ledger(
        &self,
        rid: &RequestId,
        bearer: Option<&str>,
        user: &str,
        query: ListQuery,
    ) -> Result<Page<LedgerEntry>, ApiError> {
        observe("ListLedger", rid, async {
            let user = self.wallet_owner(bearer, user)?;
            Ok(self
                .require_store()?
                .ledger(&user, &PageRequest::from(query))
                .await?)
        })
        .await
    }

    /// Operator: credits `user` with `amount` from the mint, once per key.
    pub async fn grant(
        &self,
        rid: &RequestId,
        user: &str,
        amount: i64,
        key: &str,
    ) -> Result<GrantOutcome, ApiError> {
        observe("Grant", rid, async {
            if !self.config.allow_grants {
                return Err(ApiError::GrantsDisabled);
            }
            let user = user_id("user", user)?;
            let outcome = self.require_store()?.grant(&user, amount, key).await?;
            if !outcome.replayed {
                tracing::info!(user = %user, amount, grant = %outcome.grant.id, "granted");
            }
            Ok(outcome)
        })
        .await
    }

    /// The gift catalogue, cheapest first.
    pub async fn gift_catalogue(&self, rid: &RequestId) -> Result<Vec<CatalogueGift>, ApiError> {
        observe("ListGiftCatalogue", rid, async {
            Ok(self.require_store()?.gift_catalogue().await?)
        })
        .await
    }

    /// Pays a gift from the token's subject to the room's owner and wakes
    /// the outbox relay.
    pub async fn send_gift(
        &self,
        rid: &RequestId,
        bearer: Option<&str>,
        req: SendGiftRequest,
    ) -> Result<SentGift, ApiError> {
        observe("SendGift", rid, async {
            let claims = self.authenticate(bearer)?;
            let room = parse_room(&req.room)?;
            // The store names the fields as the API does.
            validate_gift_id(&req.gift)?;
            validate_gift_count(req.count)?;
            validate_idempotency_key(&req.idempotency_key)?;
            if claims.room != room {
                return Err(ApiError::PermissionDenied(format!(
                    "the token is for room {}, not {room}",
                    claims.room
                )));
            }
            if !matches!(claims.mode, Mode::Play | Mode::Chat) {
                return Err(ApiError::PermissionDenied(format!(
                    "a {} token cannot send gifts; use the room's play or chat token",
                    claims.mode.as_str()
                )));
            }
            let from = Self::token_user(&claims)?;
            let sent = self
                .require_store()?
                .send_gift(&NewGift {
                    room,
                    from,
                    gift: req.gift,
                    count: req.count,
                    idempotency_key: req.idempotency_key,
                })
                .await?;
            let g = &sent.gift;
            if sent.replayed {
                tracing::info!(gift_id = %g.id, from = %g.from, "gift retried: first answer, nothing charged");
            } else {
                self.outbox_wake.notify_one();
                metrics::counter!("weir_gifts_total").increment(1);
                metrics::counter!("weir_gift_amount_total")
                    .increment(u64::try_from(g.amount).unwrap_or(0));
                tracing::info!(gift_id = %g.id, from = %g.from, to = %g.to, gift = %g.gift, count = g.count, amount = g.amount, "gift paid");
            }
            Ok(sent)
        })
        .await
    }

    /// The room's top senders by amount (`limit` 0: the default).
    pub async fn gift_leaderboard(
        &self,
        rid: &RequestId,
        room: &str,
        limit: u32,
    ) -> Result<Vec<LeaderboardEntry>, ApiError> {
        observe("GiftLeaderboard", rid, async {
            let room = parse_room(room)?;
            Ok(self.require_store()?.gift_leaderboard(&room, limit).await?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values_are_parsed() {
        assert_eq!(bearer_token(Some("Bearer w1.a.b")).ok(), Some("w1.a.b"));
        assert_eq!(bearer_token(Some("bearer  w1.a.b ")).ok(), Some("w1.a.b"));
        for bad in [
            None,
            Some(""),
            Some("w1.a.b"),
            Some("Basic abc"),
            Some("Bearer "),
        ] {
            assert!(
                matches!(bearer_token(bad), Err(ApiError::Unauthenticated(_))),
                "{bad:?}"
            );
        }
    }
}
