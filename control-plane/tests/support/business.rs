//! The business test suite of the store: every case is a function over a
//! database URL, run on SQLite and on a real PostgreSQL by
//! `store_business.rs`. A case starts from an empty database and checks what
//! the API promises: validation, typed errors, nothing half written.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use weir_control_plane::store::{
    Backend, NewRoom, PageRequest, RoomFilter, RoomStatus, Store, StoreError, UserId, unix_ms,
};
use weir_protocol::RoomId;

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

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn rid(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

fn page(after: &str, limit: u32) -> PageRequest {
    PageRequest {
        after: after.to_owned(),
        limit,
    }
}

fn new_room(id: &str, owner: &str) -> NewRoom {
    NewRoom {
        id: rid(id),
        owner: uid(owner),
        title: format!("Room {id}"),
        scheduled_start_ms: None,
    }
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

/// Users: created with a given or a generated id, read back, listed in
/// pages; duplicates, bad names and unknown ids refused.
pub async fn users(url: &str) {
    let s = open(url).await;
    let alice = s
        .create_user(Some(uid("alice")), "  Alice  ")
        .await
        .unwrap();
    assert_eq!((alice.id.as_str(), alice.name.as_str()), ("alice", "Alice"));
    assert!(alice.created_ms > 0);
    assert_eq!(s.user(&uid("alice")).await.unwrap(), alice);
    let anon = s.create_user(None, "Zoë 🎥").await.unwrap();
    assert!(anon.id.as_str().starts_with("u-"));
    assert_eq!(s.user(&anon.id).await.unwrap().name, "Zoë 🎥");

    match s.create_user(Some(uid("alice")), "Another").await {
        Err(StoreError::AlreadyExists { what: "user", id }) => assert_eq!(id, "alice"),
        other => panic!("{other:?}"),
    }
    // The failed create left the first one as it was.
    assert_eq!(s.user(&uid("alice")).await.unwrap().name, "Alice");
    assert_invalid(s.create_user(Some(uid("bob")), "   ").await, "name");
    assert_invalid(s.create_user(Some(uid("bob")), "a\nb").await, "name");
    assert_invalid(
        s.create_user(Some(uid("bob")), &"n".repeat(65)).await,
        "name",
    );
    assert_not_found(s.user(&uid("bob")).await, "user", "bob");

    for i in 0..5 {
        s.create_user(Some(uid(&format!("p{i}"))), "P")
            .await
            .unwrap();
    }
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let p = s.list_users(&page(&after, 3)).await.unwrap();
        assert!(p.items.len() <= 3);
        all.extend(p.items.into_iter().map(|u| u.id.to_string()));
        match p.next {
            Some(next) => after = next,
            None => break,
        }
    }
    let mut want = vec!["alice".to_owned(), anon.id.to_string()];
    want.extend((0..5).map(|i| format!("p{i}")));
    want.sort();
    assert_eq!(all, want);
    assert_invalid(s.list_users(&page("", 501)).await, "page_size");
    s.close().await;
}

/// Rooms through their life: scheduled, live, ended; titles; every refusal.
pub async fn room_lifecycle(url: &str) {
    let s = open(url).await;
    s.create_user(Some(uid("streamer")), "Streamer")
        .await
        .unwrap();
    let start = unix_ms() + 3_600_000;
    let room = s
        .create_room(NewRoom {
            scheduled_start_ms: Some(start),
            title: " Launch party ".into(),
            ..new_room("launch", "streamer")
        })
        .await
        .unwrap();
    assert_eq!(room.status, RoomStatus::Scheduled);
    assert_eq!(room.title, "Launch party");
    assert_eq!(room.scheduled_start_ms, Some(start));
    assert_eq!((room.started_ms, room.ended_ms), (None, None));
    assert_eq!(s.room(&rid("launch")).await.unwrap(), room);

    // Refusals, each leaving nothing behind.
    assert_not_found(
        s.create_room(new_room("orphan", "nobody")).await,
        "user",
        "nobody",
    );
    assert_not_found(s.room(&rid("orphan")).await, "room", "orphan");
    match s.create_room(new_room("launch", "streamer")).await {
        Err(StoreError::AlreadyExists { what: "room", id }) => assert_eq!(id, "launch"),
        other => panic!("{other:?}"),
    }
    assert_invalid(
        s.create_room(NewRoom {
            title: "".into(),
            ..new_room("x", "streamer")
        })
        .await,
        "title",
    );
    assert_invalid(
        s.create_room(NewRoom {
            scheduled_start_ms: Some(unix_ms() - 3_600_000),
            ..new_room("x", "streamer")
        })
        .await,
        "scheduled_start",
    );
    assert_not_found(s.room(&rid("x")).await, "room", "x");

    let live = s.go_live(&rid("launch")).await.unwrap();
    assert_eq!(live.status, RoomStatus::Live);
    let started = live.started_ms.unwrap();
    assert!(started >= room.created_ms);
    // Going live again changes nothing.
    assert_eq!(s.go_live(&rid("launch")).await.unwrap(), live);

    let retitled = s
        .set_room_title(&rid("launch"), "We are live")
        .await
        .unwrap();
    assert_eq!(retitled.title, "We are live");
    assert_eq!(retitled.status, RoomStatus::Live);
    assert_invalid(s.set_room_title(&rid("launch"), "\u{0}").await, "title");
    assert_eq!(s.room(&rid("launch")).await.unwrap().title, "We are live");

    let ended = s.end_room(&rid("launch")).await.unwrap();
    assert_eq!(ended.status, RoomStatus::Ended);
    assert_eq!(ended.started_ms, Some(started));
    assert!(ended.ended_ms.is_some());
    assert_eq!(s.end_room(&rid("launch")).await.unwrap(), ended);
    assert!(matches!(
        s.go_live(&rid("launch")).await,
        Err(StoreError::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.set_room_title(&rid("launch"), "again").await,
        Err(StoreError::FailedPrecondition(_))
    ));
    assert_eq!(s.room(&rid("launch")).await.unwrap(), ended);

    // A scheduled room may end without going live.
    s.create_room(new_room("cancelled", "streamer"))
        .await
        .unwrap();
    let c = s.end_room(&rid("cancelled")).await.unwrap();
    assert_eq!((c.status, c.started_ms), (RoomStatus::Ended, None));

    for op in 0..3 {
        let r = match op {
            0 => s.go_live(&rid("ghost")).await,
            1 => s.end_room(&rid("ghost")).await,
            _ => s.set_room_title(&rid("ghost"), "t").await,
        };
        assert_not_found(r, "room", "ghost");
    }
    s.close().await;
}

/// Listing rooms by owner and status, in pages.
pub async fn room_lists(url: &str) {
    let s = open(url).await;
    for u in ["ann", "ben"] {
        s.create_user(Some(uid(u)), u).await.unwrap();
    }
    for i in 0..7 {
        let owner = if i % 2 == 0 { "ann" } else { "ben" };
        s.create_room(new_room(&format!("r{i}"), owner))
            .await
            .unwrap();
    }
    s.go_live(&rid("r0")).await.unwrap();
    s.go_live(&rid("r1")).await.unwrap();
    s.end_room(&rid("r2")).await.unwrap();

    let ids = |rooms: &[weir_control_plane::store::Room]| -> Vec<String> {
        rooms.iter().map(|r| r.id.to_string()).collect()
    };
    let all = s
        .list_rooms(&RoomFilter::default(), &page("", 0))
        .await
        .unwrap();
    assert_eq!(ids(&all.items), ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]);
    assert_eq!(all.next, None);
    let anns = RoomFilter {
        owner: Some(uid("ann")),
        ..RoomFilter::default()
    };
    let p1 = s.list_rooms(&anns, &page("", 2)).await.unwrap();
    assert_eq!(ids(&p1.items), ["r0", "r2"]);
    let p2 = s
        .list_rooms(&anns, &page(p1.next.as_deref().unwrap(), 2))
        .await
        .unwrap();
    assert_eq!(ids(&p2.items), ["r4", "r6"]);
    // Exactly full: the next page is empty and ends the list.
    if let Some(next) = p2.next {
        let p3 = s.list_rooms(&anns, &page(&next, 2)).await.unwrap();
        assert!(p3.items.is_empty() && p3.next.is_none());
    }
    let live = RoomFilter {
        status: Some(RoomStatus::Live),
        ..RoomFilter::default()
    };
    assert_eq!(
        ids(&s.list_rooms(&live, &page("", 0)).await.unwrap().items),
        ["r0", "r1"]
    );
    let bens_scheduled = RoomFilter {
        owner: Some(uid("ben")),
        status: Some(RoomStatus::Scheduled),
    };
    assert_eq!(
        ids(&s
            .list_rooms(&bens_scheduled, &page("", 0))
            .await
            .unwrap()
            .items),
        ["r3", "r5"]
    );
    assert_invalid(
        s.list_rooms(&RoomFilter::default(), &page("", 10_000))
            .await,
        "page_size",
    );
    s.close().await;
}

/// Follows: once per pair, never oneself, only between existing users;
/// both directions listed in pages; unfollow.
pub async fn follows(url: &str) {
    let s = open(url).await;
    for u in ["star", "f1", "f2", "f3"] {
        s.create_user(Some(uid(u)), u).await.unwrap();
    }
    for f in ["f3", "f1", "f2"] {
        let follow = s.follow(&uid(f), &uid("star")).await.unwrap();
        assert_eq!(follow.followee.as_str(), "star");
    }
    s.follow(&uid("f1"), &uid("f2")).await.unwrap();
    match s.follow(&uid("f1"), &uid("star")).await {
        Err(StoreError::AlreadyExists { what: "follow", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_invalid(s.follow(&uid("f1"), &uid("f1")).await, "followee");
    assert_not_found(s.follow(&uid("ghost"), &uid("star")).await, "user", "ghost");
    assert_not_found(s.follow(&uid("f1"), &uid("ghost")).await, "user", "ghost");

    let followers = |p: weir_control_plane::store::Page<weir_control_plane::store::Follow>| {
        p.items
            .iter()
            .map(|f| f.follower.to_string())
            .collect::<Vec<_>>()
    };
    let p1 = s.followers(&uid("star"), &page("", 2)).await.unwrap();
    let next = p1.next.clone().unwrap();
    assert_eq!(followers(p1), ["f1", "f2"]);
    let p2 = s.followers(&uid("star"), &page(&next, 2)).await.unwrap();
    assert_eq!(p2.next, None);
    assert_eq!(followers(p2), ["f3"]);
    let following = s.following(&uid("f1"), &page("", 0)).await.unwrap();
    let names: Vec<&str> = following
        .items
        .iter()
        .map(|f| f.followee.as_str())
        .collect();
    assert_eq!(names, ["f2", "star"]);
    // Known user, nobody: an empty page. Unknown user: NOT_FOUND.
    assert!(
        s.followers(&uid("f3"), &page("", 0))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_not_found(
        s.followers(&uid("ghost"), &page("", 0)).await,
        "user",
        "ghost",
    );
    assert_not_found(
        s.following(&uid("ghost"), &page("", 0)).await,
        "user",
        "ghost",
    );

    s.unfollow(&uid("f2"), &uid("star")).await.unwrap();
    assert_not_found(
        s.unfollow(&uid("f2"), &uid("star")).await,
        "follow",
        "f2->star",
    );
    assert_eq!(
        followers(s.followers(&uid("star"), &page("", 0)).await.unwrap()),
        ["f1", "f3"]
    );
    s.close().await;
}

/// Racing writers: of N identical creates or follows exactly one wins and
/// the others get ALREADY_EXISTS; racing go-live and end leave a room in
/// one consistent state.
pub async fn racing_writes(url: &str) {
    let s = open(url).await;
    s.create_user(Some(uid("a")), "A").await.unwrap();
    s.create_user(Some(uid("b")), "B").await.unwrap();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    s.create_room(new_room("contested", "a")).await.map(drop)
                } else {
                    s.follow(&uid("a"), &uid("b")).await.map(drop)
                }
            })
        })
        .collect();
    let mut won = [0, 0];
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(()) => won[i % 2] += 1,
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won, [1, 1]);

    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    s.go_live(&rid("contested")).await
                } else {
                    s.end_room(&rid("contested")).await
                }
            })
        })
        .collect();
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) | Err(StoreError::FailedPrecondition(_)) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let room = s.room(&rid("contested")).await.unwrap();
    assert_eq!(room.status, RoomStatus::Ended);
    assert!(room.ended_ms.is_some());
    s.close().await;
}

/// A second process (or a restart) opens the same database: the migrations
/// are not applied twice and the data is there.
pub async fn reopen_keeps_data(url: &str) {
    let first = open(url).await;
    first.create_user(Some(uid("keeper")), "K").await.unwrap();
    let second = open(url).await;
    assert_eq!(second.user(&uid("keeper")).await.unwrap().name, "K");
    second.ping().await.unwrap();
    first.close().await;
    second.close().await;
    let third = open(url).await;
    assert_eq!(third.user(&uid("keeper")).await.unwrap().name, "K");
    third.close().await;
}
