//! The wallet test suite of the store: every case is a function over a
//! database URL, run on SQLite and on a real PostgreSQL by
//! `store_wallet.rs`. A case starts from an empty database and checks what
//! the wallet promises: the ledger sums to zero, balances never go below
//! zero, a key charges once, refusals write nothing.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use weir_control_plane::store::{
    Backend, MAX_GIFT_COUNT, MINT_ACCOUNT, NewGift, NewRoom, PageRequest, SentGift, Store,
    StoreError, TransferKind, UserId, WalletAudit,
};
use weir_protocol::RoomId;
use weir_protocol::bus::EventBody;

pub async fn open(url: &str) -> Store {
    let store = Store::connect(url, Duration::from_secs(10)).await.unwrap();
    let want = if url.starts_with("postgres") {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    assert_eq!(store.backend(), want);
    store
}

pub fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

pub fn rid(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

pub fn gift(room: &str, from: &str, gift: &str, count: u32, key: &str) -> NewGift {
    NewGift {
        room: rid(room),
        from: uid(from),
        gift: gift.to_owned(),
        count,
        idempotency_key: key.to_owned(),
    }
}

/// Users `streamer` (owning room `stage`), `fan` and `other`.
pub async fn setup(s: &Store) {
    for u in ["streamer", "fan", "other"] {
        s.create_user(Some(uid(u)), u).await.unwrap();
    }
    s.create_room(NewRoom {
        id: rid("stage"),
        owner: uid("streamer"),
        title: "Stage".into(),
        scheduled_start_ms: None,
    })
    .await
    .unwrap();
}

/// The invariants every state of the wallet keeps.
pub async fn assert_healthy(s: &Store) -> WalletAudit {
    let a = s.wallet_audit().await.unwrap();
    assert_eq!(a.ledger_sum, 0, "{a:?}");
    assert_eq!(a.balance_sum, 0, "{a:?}");
    assert_eq!(a.mismatched_accounts, 0, "{a:?}");
    assert_eq!(a.negative_users, 0, "{a:?}");
    assert_eq!(a.gifts_without_one_outbox_row, 0, "{a:?}");
    assert_eq!(a.outbox_rows, a.gifts, "{a:?}");
    a
}

async fn balance(s: &Store, user: &str) -> i64 {
    s.balance(&uid(user)).await.unwrap().balance
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, StoreError>, want: &str) {
    match r {
        Err(StoreError::Invalid { field, .. }) => assert_eq!(field, want),
        other => panic!("expected invalid {want}, got {other:?}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str, id: &str) {
    match r {
        Err(StoreError::NotFound { what: w, id: i }) => assert_eq!((w, i.as_str()), (what, id)),
        other => panic!("expected {what} {id} not found, got {other:?}"),
    }
}

/// Grants: credited from the mint, once per key; refusals write nothing.
pub async fn grants(url: &str) {
    let s = open(url).await;
    setup(&s).await;
    assert_eq!(balance(&s, "fan").await, 0);
    let first = s.grant(&uid("fan"), 500, "deposit-1").await.unwrap();
    assert!(!first.replayed);
    assert_eq!((first.grant.amount, first.grant.balance_after), (500, 500));
    // A retry answers the first grant and credits nothing.
    let again = s.grant(&uid("fan"), 500, "deposit-1").await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.grant, first.grant);
    let second = s.grant(&uid("fan"), 250, "deposit-2").await.unwrap();
    assert_eq!(second.grant.balance_after, 750);
    assert_eq!(balance(&s, "fan").await, 750);
    let before = assert_healthy(&s).await;
    assert_eq!(before.ledger_rows, 4);

    // The same key for another grant, bad amounts, keys and users: refused.
    assert!(matches!(
        s.grant(&uid("other"), 500, "deposit-1").await,
        Err(StoreError::FailedPrecondition(m)) if m.contains("deposit-1")
    ));
    assert!(matches!(
        s.grant(&uid("fan"), 501, "deposit-1").await,
        Err(StoreError::FailedPrecondition(_))
    ));
    assert_invalid(s.grant(&uid("fan"), 0, "k").await, "amount");
    assert_invalid(s.grant(&uid("fan"), -5, "k").await, "amount");
    assert_invalid(
        s.grant(&uid("fan"), weir_control_plane::store::MAX_GRANT + 1, "k")
            .await,
        "amount",
    );
    assert_invalid(s.grant(&uid("fan"), 5, "").await, "idempotency_key");
    assert_invalid(s.grant(&uid("fan"), 5, "a b").await, "idempotency_key");
    assert_not_found(s.grant(&uid("ghost"), 5, "k").await, "user", "ghost");
    assert_not_found(s.balance(&uid("ghost")).await, "user", "ghost");
    assert_eq!(assert_healthy(&s).await, before);
    assert_eq!(balance(&s, "fan").await, 750);

    // The ledger: newest first, in pages; the mint's legs mirror the user's.
    let p1 = s
        .ledger(
            &uid("fan"),
            &PageRequest {
                after: String::new(),
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(p1.items.len(), 1);
    let p2 = s
        .ledger(
            &uid("fan"),
            &PageRequest {
                after: p1.next.clone().unwrap(),
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(p2.items.len(), 1);
    assert_eq!(p2.next, None);
    let mut ids = vec![
        p1.items[0].transfer_id.clone(),
        p2.items[0].transfer_id.clone(),
    ];
    ids.sort();
    let mut want = vec![first.grant.id.clone(), second.grant.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    for e in p1.items.iter().chain(&p2.items) {
        assert_eq!(e.kind, TransferKind::Grant);
        assert_eq!(e.counterparty, MINT_ACCOUNT);
        assert!(e.amount > 0);
    }
    assert!(
        s.ledger(&uid("other"), &PageRequest::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_not_found(
        s.ledger(&uid("ghost"), &PageRequest::default()).await,
        "user",
        "ghost",
    );
    assert_invalid(
        s.ledger(
            &uid("fan"),
            &PageRequest {
                after: "garbage".into(),
                limit: 0,
            },
        )
        .await,
        "page_token",
    );
    s.close().await;
}

/// A gift: debit, credit, two ledger rows, the gift row and one outbox row
/// carrying its event; a retry with its key answers the same and charges
/// nothing; the same key for another gift is refused.
pub async fn send_and_retry(url: &str) {
    let s = open(url).await;
    setup(&s).await;
    s.grant(&uid("fan"), 100, "g").await.unwrap();
    let catalogue = s.gift_catalogue().await.unwrap();
    assert!(catalogue.len() >= 3);
    assert!(catalogue.windows(2).all(|w| w[0].price <= w[1].price));
    let rose = catalogue.iter().find(|g| g.id == "rose").unwrap();
    assert_eq!(rose.price, 10);

    let sent = s
        .send_gift(&gift("stage", "fan", "rose", 3, "tap-1"))
        .await
        .unwrap();
    assert!(!sent.replayed);
    let g = &sent.gift;
    assert!(g.id.starts_with("g-"));
    assert_eq!(
        (g.to.as_str(), g.amount, g.count, g.balance_after),
        ("streamer", 30, 3, 70)
    );
    assert_eq!(balance(&s, "fan").await, 70);
    assert_eq!(balance(&s, "streamer").await, 30);
    assert_eq!(s.gift(&g.id).await.unwrap(), *g);

    for _ in 0..3 {
        let again = s
            .send_gift(&gift("stage", "fan", "rose", 3, "tap-1"))
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(again.gift, *g);
    }
    assert_eq!(balance(&s, "fan").await, 70);
    assert_eq!(balance(&s, "streamer").await, 30);
    let before = assert_healthy(&s).await;
    assert_eq!((before.gifts, before.outbox_pending), (1, 1));
    // The same key for another gift: refused, nothing written.
    for other in [
        gift("stage", "fan", "rose", 4, "tap-1"),
        gift("stage", "fan", "heart", 3, "tap-1"),
    ] {
        assert!(matches!(
            s.send_gift(&other).await,
            Err(StoreError::FailedPrecondition(m)) if m.contains("tap-1")
        ));
    }
    // Keys are per sender: another sender may use the same one.
    s.grant(&uid("other"), 10, "g2").await.unwrap();
    let theirs = s
        .send_gift(&gift("stage", "other", "heart", 2, "tap-1"))
        .await
        .unwrap();
    assert!(!theirs.replayed);
    assert_ne!(theirs.gift.id, g.id);

    // Ledger rows of the gift, one per account, summing to zero.
    let fan = s
        .ledger(&uid("fan"), &PageRequest::default())
        .await
        .unwrap();
    let leg = fan.items.iter().find(|e| e.transfer_id == g.id).unwrap();
    assert_eq!(
        (leg.amount, leg.kind, leg.counterparty.as_str()),
        (-30, TransferKind::Gift, "streamer")
    );
    let owner = s
        .ledger(&uid("streamer"), &PageRequest::default())
        .await
        .unwrap();
    let leg = owner.items.iter().find(|e| e.transfer_id == g.id).unwrap();
    assert_eq!((leg.amount, leg.counterparty.as_str()), (30, "fan"));

    // The outbox holds both events, oldest first, with what viewers see.
    let pending = s.pending_outbox(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    let first = pending.iter().find(|o| o.gift_id == g.id).unwrap();
    assert_eq!(first.room, rid("stage"));
    assert_eq!(first.attempts, 0);
    assert_eq!(first.event, g.event());
    match &first.event.body {
        EventBody::Gift {
            gift_id,
            from_user,
            to_user,
            gift,
            count,
            amount,
        } => {
            assert_eq!(
                (
                    gift_id.as_str(),
                    from_user.as_str(),
                    to_user.as_str(),
                    gift.as_str(),
                    *count,
                    *amount
                ),
                (g.id.as_str(), "fan", "streamer", "rose", 3, 30)
            );
        }
        other => panic!("{other:?}"),
    }
    s.record_outbox_failure(&first.id, "bus down")
        .await
        .unwrap();
    assert_eq!(s.outbox_pending_count().await.unwrap(), 2);
    assert!(s.mark_outbox_published(&first.id).await.unwrap());
    assert!(!s.mark_outbox_published(&first.id).await.unwrap());
    assert_eq!(s.outbox_pending_count().await.unwrap(), 1);
    let left = s.pending_outbox(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].gift_id, theirs.gift.id);
    // The relay's batch mark: only rows still pending count.
    assert_eq!(s.mark_outbox_published_all(&[]).await.unwrap(), 0);
    let batch = [first.id.clone(), left[0].id.clone()];
    assert_eq!(s.mark_outbox_published_all(&batch).await.unwrap(), 1);
    assert_eq!(s.outbox_pending_count().await.unwrap(), 0);
    assert_eq!(s.mark_outbox_published_all(&batch).await.unwrap(), 0);

    // The leaderboard: by amount, then user id.
    let board = s.gift_leaderboard(&rid("stage"), 0).await.unwrap();
    let board: Vec<_> = board
        .iter()
        .map(|e| (e.user.as_str(), e.amount, e.gifts))
        .collect();
    assert_eq!(board, [("fan", 30, 3), ("other", 2, 2)]);
    assert_eq!(s.gift_leaderboard(&rid("stage"), 1).await.unwrap().len(), 1);
    assert_invalid(s.gift_leaderboard(&rid("stage"), 101).await, "limit");
    assert_not_found(
        s.gift_leaderboard(&rid("nowhere"), 0).await,
        "room",
        "nowhere",
    );
    assert_healthy(&s).await;
    s.close().await;
}

/// 20 concurrent sends with one key: one gift, charged once, every caller
/// gets its answer.
pub async fn concurrent_retries(url: &str) {
    let s = open(url).await;
    setup(&s).await;
    s.grant(&uid("fan"), 1_000, "g").await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.send_gift(&gift("stage", "fan", "cake", 2, "one-key"))
                    .await
            })
        })
        .collect();
    let mut answers: Vec<SentGift> = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    let first = &answers[0].gift;
    assert!(answers.iter().all(|a| a.gift == *first));
    assert_eq!(first.balance_after, 800);
    assert_eq!(balance(&s, "fan").await, 800);
    assert_eq!(balance(&s, "streamer").await, 200);
    let audit = assert_healthy(&s).await;
    assert_eq!((audit.gifts, audit.outbox_rows), (1, 1));
    s.close().await;
}

/// Insufficient funds: a clear error, and nothing written.
pub async fn insufficient_funds(url: &str) {
    let s = open(url).await;
    setup(&s).await;
    // No account at all yet.
    match s.send_gift(&gift("stage", "fan", "heart", 1, "k0")).await {
        Err(StoreError::InsufficientFunds {
            user,
            balance,
            needed,
        }) => assert_eq!((user.as_str(), balance, needed), ("fan", 0, 1)),
        other => panic!("{other:?}"),
    }
    s.grant(&uid("fan"), 25, "g").await.unwrap();
    let before = assert_healthy(&s).await;
    let err = s
        .send_gift(&gift("stage", "fan", "rose", 3, "k1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InsufficientFunds {
                balance: 25,
                needed: 30,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("insufficient funds"), "{err}");
    assert_eq!(assert_healthy(&s).await, before);
    assert_eq!(balance(&s, "fan").await, 25);
    assert_eq!(balance(&s, "streamer").await, 0);
    // The refused key is free: once funded, the same key pays.
    s.grant(&uid("fan"), 5, "g2").await.unwrap();
    let sent = s
        .send_gift(&gift("stage", "fan", "rose", 3, "k1"))
        .await
        .unwrap();
    assert_eq!(sent.gift.balance_after, 0);
    assert_healthy(&s).await;
    s.close().await;
}

/// 50 concurrent gifts from one account funded for 17 of them: exactly 17
/// succeed, the rest are refused for funds, the balance ends at zero, never
/// below; and opposite gifts between two streamers running at once do not
/// deadlock.
pub async fn concurrent_gifts(url: &str) {
    let s = open(url).await;
    setup(&s).await;
    s.grant(&uid("fan"), 170, "g").await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.send_gift(&gift("stage", "fan", "rose", 1, &format!("tap-{i}")))
                    .await
            })
        })
        .collect();
    let (mut ok, mut broke) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(sent) => {
                assert!(!sent.replayed);
                assert!(sent.gift.balance_after >= 0);
                ok.push(sent.gift);
            }
            Err(StoreError::InsufficientFunds { .. }) => broke += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok.len(), broke), (17, 33));
    let mut after: Vec<i64> = ok.iter().map(|g| g.balance_after).collect();
    after.sort_unstable();
    assert_eq!(after, (0..17).map(|i| i * 10).collect::<Vec<_>>());
    assert_eq!(balance(&s, "fan").await, 0);
    assert_eq!(balance(&s, "streamer").await, 170);
    let audit = assert_healthy(&s).await;
    assert_eq!((audit.gifts, audit.outbox_pending), (17, 17));
    let pending = s.pending_outbox(100).await.unwrap();
    let mut gifts: Vec<&str> = pending.iter().map(|o| o.gift_id.as_str()).collect();
    gifts.sort_unstable();
    let mut want: Vec<&str> = ok.iter().map(|g| g.id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(gifts, want);

    // Two streamers gifting each other at once, many times.
    s.create_room(NewRoom {
        id: rid("other-stage"),
        owner: uid("other"),
        title: "Other".into(),
        scheduled_start_ms: None,
    })
    .await
    .unwrap();
    s.grant(&uid("other"), 1_000, "g-other").await.unwrap();
    s.grant(&uid("streamer"), 830, "g-streamer").await.unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let g = if i % 2 == 0 {
                    gift("stage", "other", "heart", 1, &format!("x{i}"))
                } else {
                    gift("other-stage", "streamer", "heart", 1, &format!("y{i}"))
                };
                s.send_gift(&g).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(balance(&s, "other").await, 1_000);
    assert_eq!(balance(&s, "streamer").await, 1_000);
    let audit = assert_healthy(&s).await;
    assert_eq!(audit.gifts, 57);
    s.close().await;
}

/// Every kind of bad input gets its own error and writes nothing.
pub async fn bad_input(url: &str) {
    let s = open(url).await;
    setup(&s).await;
    s.create_room(NewRoom {
        id: rid("over"),
        owner: uid("streamer"),
        title: "Over".into(),
        scheduled_start_ms: None,
    })
    .await
    .unwrap();
    s.end_room(&rid("over")).await.unwrap();
    s.grant(&uid("fan"), 1_000_000, "g").await.unwrap();
    s.grant(&uid("streamer"), 100, "g2").await.unwrap();
    let before = assert_healthy(&s).await;
    let long_key = "k".repeat(129);
    let cases: Vec<(NewGift, &str)> = vec![
        (
            gift("stage", "fan", "rose", 1, ""),
            "invalid idempotency_key",
        ),
        (
            gift("stage", "fan", "rose", 1, &long_key),
            "invalid idempotency_key",
        ),
        (
            gift("stage", "fan", "rose", 1, "white space"),
            "invalid idempotency_key",
        ),
        (gift("stage", "fan", "rose", 0, "k"), "invalid count"),
        (
            gift("stage", "fan", "rose", MAX_GIFT_COUNT + 1, "k"),
            "invalid count",
        ),
        (gift("stage", "fan", "", 1, "k"), "invalid gift"),
        (gift("stage", "fan", "no/such", 1, "k"), "invalid gift"),
        (
            gift("stage", "fan", "unicorn", 1, "k"),
            "gift \"unicorn\" not found",
        ),
        (
            gift("nowhere", "fan", "rose", 1, "k"),
            "room \"nowhere\" not found",
        ),
        (gift("over", "fan", "rose", 1, "k"), "has ended"),
        (gift("stage", "streamer", "rose", 1, "k"), "your own room"),
    ];
    for (g, want) in cases {
        let err = s.send_gift(&g).await.unwrap_err();
        assert!(
            err.to_string().contains(want),
            "{g:?}: got {err}, want {want:?}"
        );
        match (&err, want) {
            (StoreError::Invalid { .. }, w) if w.starts_with("invalid") || w == "your own room" => {
            }
            (StoreError::NotFound { .. }, w) if w.contains("not found") => {}
            (StoreError::FailedPrecondition(_), "has ended") => {}
            other => panic!("wrong error class: {other:?}"),
        }
    }
    assert_eq!(assert_healthy(&s).await, before);
    assert_eq!(balance(&s, "fan").await, 1_000_000);
    // The biggest allowed send is fine, once paid for.
    assert!(matches!(
        s.send_gift(&gift("stage", "fan", "rocket", MAX_GIFT_COUNT, "big"))
            .await,
        Err(StoreError::InsufficientFunds { .. })
    ));
    s.grant(&uid("fan"), 9_000_000, "g3").await.unwrap();
    let big = s
        .send_gift(&gift("stage", "fan", "rocket", MAX_GIFT_COUNT, "big"))
        .await
        .unwrap();
    assert_eq!(big.gift.amount, 1000 * i64::from(MAX_GIFT_COUNT));
    assert_healthy(&s).await;
    s.close().await;
}
