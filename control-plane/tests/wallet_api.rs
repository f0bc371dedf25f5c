//! The Wallet service over a real port (on a SQLite store): the sender is
//! the subject of a token the control plane signed, sent as
//! `authorization: Bearer …`; every refusal has its status (UNAUTHENTICATED,
//! PERMISSION_DENIED, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) and
//! writes nothing; retries charge once. Also the JSON routes a play page uses.
#![allow(clippy::unwrap_used)]

#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tonic::Code;
use tonic::metadata::MetadataValue;
use weir_control_plane::store::Store;
use weir_control_plane::{ControlConfig, ControlState, LocalCoordinator, TokenIssuer};
use weir_protocol::pb;
use weir_protocol::pb::rooms_client::RoomsClient;
use weir_protocol::pb::users_client::UsersClient;
use weir_protocol::pb::wallet_client::WalletClient;
use weir_protocol::{Mode, RoomId, TokenSigner};

struct Server {
    addr: SocketAddr,
    /// Signs with the control plane's key.
    tokens: TokenIssuer,
    store: Store,
    _stop: oneshot::Sender<()>,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn token(&self, room: &str, mode: Mode, user: &str) -> String {
        self.tokens
            .mint(&RoomId::parse(room).unwrap(), mode, user, None)
            .unwrap()
            .token
    }
}

async fn start(allow_grants: bool) -> Server {
    let dir =
        std::env::temp_dir().join(format!("weir-wallet-api-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::connect(
        &weir_control_plane::store::sqlite_url(&dir.join("weir.db")),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let signer = TokenSigner::generate();
    let tokens = TokenIssuer::new(TokenSigner::from_base64(&signer.to_base64()).unwrap());
    let state = ControlState::new(
        Arc::new(LocalCoordinator::new()),
        TokenIssuer::new(signer),
        ControlConfig {
            allow_grants,
            ..ControlConfig::default()
        },
    )
    .unwrap()
    .with_store(store.clone());
    let (addr, stop) = serve::spawn(state).await;
    Server {
        addr,
        tokens,
        store,
        _stop: stop,
        dir,
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, contains: &str) {
    let status = r.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(contains),
        "{:?} does not contain {contains:?}",
        status.message()
    );
}

fn send(room: &str, gift: &str, count: u32, key: &str) -> pb::SendGiftRequest {
    pb::SendGiftRequest {
        room: room.into(),
        gift: gift.into(),
        count,
        idempotency_key: key.into(),
    }
}

/// Users `streamer` (owning room `stage`) and `fan`.
async fn setup(s: &Server) {
    let channel = s.channel().await;
    let mut users = UsersClient::new(channel.clone());
    for id in ["streamer", "fan"] {
        users
            .create_user(pb::CreateUserRequest {
                id: id.into(),
                name: id.into(),
            })
            .await
            .unwrap();
    }
    RoomsClient::new(channel)
        .create_room(pb::CreateRoomRequest {
            id: "stage".into(),
            owner: "streamer".into(),
            title: "Stage".into(),
            scheduled_start_unix_ms: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn gifts_over_grpc() {
    let s = start(true).await;
    setup(&s).await;
    let mut wallet = WalletClient::new(s.channel().await);
    let catalogue = wallet
        .list_gift_catalogue(pb::ListGiftCatalogueRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        catalogue
            .gifts
            .iter()
            .any(|g| g.id == "rose" && g.price == 10)
    );

    let granted = wallet
        .grant(pb::GrantRequest {
            user: "fan".into(),
            amount: 100,
            idempotency_key: "dep-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((granted.balance_after, granted.replayed), (100, false));
    let again = wallet
        .grant(pb::GrantRequest {
            user: "fan".into(),
            amount: 100,
            idempotency_key: "dep-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.id, again.replayed), (granted.id, true));

    let fan = s.token("stage", Mode::Play, "fan");
    let sent = wallet
        .send_gift(with_token(send("stage", "rose", 2, "tap-1"), &fan))
        .await
        .unwrap();
    assert!(sent.metadata().get("x-request-id").is_some());
    let sent = sent.into_inner();
    let gift = sent.gift.clone().unwrap();
    assert_eq!(
        (
            gift.from_user.as_str(),
            gift.to_user.as_str(),
            gift.amount,
            sent.balance_after,
            sent.replayed
        ),
        ("fan", "streamer", 20, 80, false)
    );
    // A retry (the same key) answers the same and charges nothing; a chat
    // token of the room works as well as a play token.
    let chat = s.token("stage", Mode::Chat, "fan");
    let retry = wallet
        .send_gift(with_token(send("stage", "rose", 2, "tap-1"), &chat))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((retry.gift, retry.balance_after), (Some(gift.clone()), 80));
    assert!(retry.replayed);

    let balance = wallet
        .get_balance(with_token(
            pb::GetBalanceRequest {
                user: String::new(),
            },
            &fan,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((balance.user.as_str(), balance.balance), ("fan", 80));
    let streamer = s.token("stage", Mode::Publish, "streamer");
    let theirs = wallet
        .get_balance(with_token(
            pb::GetBalanceRequest {
                user: "streamer".into(),
            },
            &streamer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.balance, 20);
    // Someone else's wallet is not readable with your token, nor any without one.
    assert_status(
        wallet
            .get_balance(with_token(
                pb::GetBalanceRequest {
                    user: "streamer".into(),
                },
                &fan,
            ))
            .await,
        Code::PermissionDenied,
        "streamer",
    );
    assert_status(
        wallet
            .get_balance(pb::GetBalanceRequest { user: "fan".into() })
            .await,
        Code::Unauthenticated,
        "Bearer",
    );

    let ledger = wallet
        .list_ledger(with_token(
            pb::LedgerQuery {
                user: String::new(),
                page_size: 10,
                page_token: String::new(),
            },
            &fan,
        ))
        .await
        .unwrap()
        .into_inner();
    let amounts: Vec<(i64, &str)> = ledger
        .entries
        .iter()
        .map(|e| (e.amount, e.kind.as_str()))
        .collect();
    assert_eq!(amounts, [(-20, "gift"), (100, "grant")]);
    assert_eq!(ledger.entries[0].transfer_id, gift.id);

    let board = wallet
        .gift_leaderboard(pb::GiftLeaderboardRequest {
            room: "stage".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(board.entries.len(), 1);
    assert_eq!(
        (
            board.entries[0].user.as_str(),
            board.entries[0].amount,
            board.entries[0].gifts
        ),
        ("fan", 20, 2)
    );
    let audit = s.store.wallet_audit().await.unwrap();
    assert_eq!(
        (audit.ledger_sum, audit.gifts, audit.outbox_pending),
        (0, 1, 1)
    );
}

#[tokio::test]
async fn refusals_have_their_status_and_write_nothing() {
    let s = start(true).await;
    setup(&s).await;
    let mut wallet = WalletClient::new(s.channel().await);
    wallet
        .grant(pb::GrantRequest {
            user: "fan".into(),
            amount: 15,
            idempotency_key: "dep".into(),
        })
        .await
        .unwrap();
    let before = s.store.wallet_audit().await.unwrap();
    let good = send("stage", "rose", 1, "k");

    // No token, not a bearer value, garbage, another key's token, expired.
    assert_status(
        wallet.send_gift(good.clone()).await,
        Code::Unauthenticated,
        "Bearer",
    );
    let mut basic = tonic::Request::new(good.clone());
    basic
        .metadata_mut()
        .insert("authorization", MetadataValue::from_static("Basic Zm9v"));
    assert_status(
        wallet.send_gift(basic).await,
        Code::Unauthenticated,
        "Bearer",
    );
    assert_status(
        wallet
            .send_gift(with_token(good.clone(), "w1.garbage"))
            .await,
        Code::Unauthenticated,
        "token",
    );
    let stranger = TokenIssuer::new(TokenSigner::generate())
        .mint(&RoomId::parse("stage").unwrap(), Mode::Play, "fan", None)
        .unwrap()
        .token;
    assert_status(
        wallet.send_gift(with_token(good.clone(), &stranger)).await,
        Code::Unauthenticated,
        "signature",
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = s
        .tokens
        .mint_at(
            &RoomId::parse("stage").unwrap(),
            Mode::Play,
            "fan",
            Some(Duration::from_secs(60)),
            now - 3600,
        )
        .unwrap()
        .token;
    assert_status(
        wallet.send_gift(with_token(good.clone(), &expired)).await,
        Code::Unauthenticated,
        "expired",
    );

    let fan = s.token("stage", Mode::Play, "fan");
    // Bad arguments.
    for (req, field) in [
        (send("no room", "rose", 1, "k"), "room"),
        (send("stage", "rose", 0, "k"), "count"),
        (send("stage", "rose", 10_000, "k"), "count"),
        (send("stage", "", 1, "k"), "gift"),
        (send("stage", "rose", 1, ""), "idempotency_key"),
        (
            send("stage", "rose", 1, &"k".repeat(129)),
            "idempotency_key",
        ),
    ] {
        assert_status(
            wallet.send_gift(with_token(req, &fan)).await,
            Code::InvalidArgument,
            &format!("invalid {field}"),
        );
    }
    // The token must be a viewer's token of this very room.
    assert_status(
        wallet
            .send_gift(with_token(
                good.clone(),
                &s.token("elsewhere", Mode::Play, "fan"),
            ))
            .await,
        Code::PermissionDenied,
        "elsewhere",
    );
    assert_status(
        wallet
            .send_gift(with_token(
                good.clone(),
                &s.token("stage", Mode::Publish, "fan"),
            ))
            .await,
        Code::PermissionDenied,
        "publish",
    );
    // Unknown room and gift; the owner gifting in their own room; too poor.
    assert_status(
        wallet
            .send_gift(with_token(
                send("nowhere", "rose", 1, "k"),
                &s.token("nowhere", Mode::Play, "fan"),
            ))
            .await,
        Code::NotFound,
        "room \"nowhere\"",
    );
    assert_status(
        wallet
            .send_gift(with_token(send("stage", "unicorn", 1, "k"), &fan))
            .await,
        Code::NotFound,
        "gift \"unicorn\"",
    );
    assert_status(
        wallet
            .send_gift(with_token(
                good.clone(),
                &s.token("stage", Mode::Play, "streamer"),
            ))
            .await,
        Code::InvalidArgument,
        "your own room",
    );
    assert_status(
        wallet
            .send_gift(with_token(send("stage", "rose", 2, "k"), &fan))
            .await,
        Code::FailedPrecondition,
        "insufficient funds: fan has 15 and this costs 20",
    );
    assert_eq!(s.store.wallet_audit().await.unwrap(), before);

    // Grants: bad arguments, unknown users; and refused where not allowed.
    for (req, code) in [
        (("fan", 0, "k"), Code::InvalidArgument),
        (("fan", 5, ""), Code::InvalidArgument),
        (("bad id", 5, "k"), Code::InvalidArgument),
        (("ghost", 5, "k"), Code::NotFound),
    ] {
        let r = wallet
            .grant(pb::GrantRequest {
                user: req.0.into(),
                amount: req.1,
                idempotency_key: req.2.into(),
            })
            .await;
        assert_eq!(r.unwrap_err().code(), code, "{req:?}");
    }
    assert_eq!(s.store.wallet_audit().await.unwrap(), before);
    let closed = start(false).await;
    let mut closed_wallet = WalletClient::new(closed.channel().await);
    assert_status(
        closed_wallet
            .grant(pb::GrantRequest {
                user: "fan".into(),
                amount: 5,
                idempotency_key: "k".into(),
            })
            .await,
        Code::PermissionDenied,
        "--allow-grants",
    );
}

/// A raw HTTP/1.1 request on a fresh connection: status and JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn the_json_gateway_serves_the_wallet() {
    let s = start(true).await;
    setup(&s).await;
    s.store
        .grant(
            &weir_control_plane::store::UserId::parse("fan").unwrap(),
            50,
            "dep",
        )
        .await
        .unwrap();
    let fan = s.token("stage", Mode::Play, "fan");

    let (status, catalogue) = http(s.addr, "GET", "/v1/gifts", None, "").await;
    assert_eq!(status, 200, "{catalogue}");
    assert_eq!(catalogue["gifts"][0]["id"], "heart");

    let (status, wallet) = http(s.addr, "GET", "/v1/wallet/fan", Some(&fan), "").await;
    assert_eq!(
        (status, wallet["balance"].as_i64()),
        (200, Some(50)),
        "{wallet}"
    );
    let (status, err) = http(s.addr, "GET", "/v1/wallet/fan", None, "").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("unauthenticated")),
        "{err}"
    );

    let body = r#"{"gift":"rose","count":3,"idempotency_key":"web-1"}"#;
    let (status, sent) = http(s.addr, "POST", "/v1/rooms/stage/gifts", Some(&fan), body).await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(
        (
            sent["amount"].as_i64(),
            sent["balance_after"].as_i64(),
            sent["replayed"].as_bool(),
            sent["to_user"].as_str()
        ),
        (Some(30), Some(20), Some(false), Some("streamer"))
    );
    let (status, again) = http(s.addr, "POST", "/v1/rooms/stage/gifts", Some(&fan), body).await;
    assert_eq!(
        (status, again["id"].clone(), again["replayed"].as_bool()),
        (200, sent["id"].clone(), Some(true))
    );
    let (status, err) = http(s.addr, "POST", "/v1/rooms/stage/gifts", None, body).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("unauthenticated")),
        "{err}"
    );
    let (status, err) = http(
        s.addr,
        "POST",
        "/v1/rooms/stage/gifts",
        Some(&fan),
        r#"{"gift":"rose","count":3,"idempotency_key":"web-2"}"#,
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("failed_precondition")),
        "{err}"
    );
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("insufficient funds"),
        "{err}"
    );
    let (status, err) = http(
        s.addr,
        "POST",
        "/v1/rooms/stage/gifts",
        Some(&fan),
        r#"{"gift":"rose","from":"streamer","idempotency_key":"web-3"}"#,
    )
    .await;
    assert_eq!(
        status, 422,
        "an unknown field (like a forged sender) is refused: {err}"
    );

    let (status, ledger) = http(
        s.addr,
        "GET",
        "/v1/wallet/fan/ledger?page_size=1",
        Some(&fan),
        "",
    )
    .await;
    assert_eq!(status, 200, "{ledger}");
    assert_eq!(ledger["entries"][0]["amount"].as_i64(), Some(-30));
    assert!(ledger["next_page_token"].is_string(), "{ledger}");
    let (status, err) = http(
        s.addr,
        "GET",
        "/v1/wallet/fan/ledger?page_size=x",
        Some(&fan),
        "",
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument")),
        "{err}"
    );

    let (status, board) = http(
        s.addr,
        "GET",
        "/v1/rooms/stage/leaderboard?limit=5",
        None,
        "",
    )
    .await;
    assert_eq!(status, 200, "{board}");
    assert_eq!(board["entries"][0]["user"], "fan");
    assert_eq!(board["entries"][0]["amount"].as_i64(), Some(30));
    let (status, err) = http(s.addr, "GET", "/v1/rooms/ghost/leaderboard", None, "").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
}

#[tokio::test]
async fn weir_ctl_grants_and_reads_the_catalogue_and_leaderboards() {
    use weir_control_plane::ctl::{self, CtlArgs, CtlCommand, WalletCommand};
    let s = start(true).await;
    setup(&s).await;
    let run = |command: WalletCommand, json: bool| {
        ctl::execute(CtlArgs {
            control: format!("http://{}", s.addr),
            json,
            command: CtlCommand::Wallet { command },
        })
    };
    let grant = || WalletCommand::Grant {
        user: "fan".into(),
        amount: 40,
        key: Some("ops-1".into()),
    };
    let first = run(grant(), false).await;
    assert_eq!(first.code, ctl::EXIT_OK, "{first:?}");
    assert!(
        first.stdout.starts_with("granted 40 to fan: balance 40"),
        "{first:?}"
    );
    let again = run(grant(), true).await;
    let v: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(
        (v["balance_after"].as_i64(), v["replayed"].as_bool()),
        (Some(40), Some(true))
    );
    let bad = run(
        WalletCommand::Grant {
            user: "ghost".into(),
            amount: 5,
            key: None,
        },
        false,
    )
    .await;
    assert_eq!(bad.code, ctl::EXIT_USAGE, "{bad:?}");

    let gifts = run(WalletCommand::Gifts, false).await;
    assert!(gifts.stdout.starts_with("GIFT"), "{gifts:?}");
    assert!(gifts.stdout.contains("rose    Rose    10"), "{gifts:?}");

    let fan = s.token("stage", Mode::Play, "fan");
    let mut wallet = WalletClient::new(s.channel().await);
    wallet
        .send_gift(with_token(send("stage", "rose", 4, "t"), &fan))
        .await
        .unwrap();
    let board = run(
        WalletCommand::Leaderboard {
            room: "stage".into(),
            limit: 10,
        },
        true,
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(board.stdout.trim()).unwrap();
    assert_eq!(
        (
            v["user"].as_str(),
            v["amount"].as_i64(),
            v["gifts"].as_u64()
        ),
        (Some("fan"), Some(40), Some(4))
    );
    let empty = run(
        WalletCommand::Leaderboard {
            room: "nowhere".into(),
            limit: 10,
        },
        false,
    )
    .await;
    assert_eq!(empty.code, ctl::EXIT_USAGE, "{empty:?}");

    let closed = start(false).await;
    let denied = ctl::execute(CtlArgs {
        control: format!("http://{}", closed.addr),
        json: false,
        command: CtlCommand::Wallet { command: grant() },
    })
    .await;
    assert_eq!(denied.code, ctl::EXIT_NOPERM, "{denied:?}");
    assert!(denied.stderr.contains("--allow-grants"), "{denied:?}");
}
