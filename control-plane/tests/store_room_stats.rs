//! Like totals persisted in batches (`store::room_stats`), run on both
//! stores: SQLite (a file in a temp dir) and a real PostgreSQL (Debian's
//! PostgreSQL 15, started per test on a free loopback port; the test fails,
//! never skips, when it is not installed). What is checked: a claim is a
//! compare-and-set, so writers racing over one range of the bus count it
//! once; rebases keep the likes; a bad batch writes nothing.
#![allow(clippy::unwrap_used)]

#[path = "support/postgres.rs"]
mod pg;

use std::time::Duration;

use weir_control_plane::store::{
    LikesClaim, LikesMark, MAX_COUNTER, MAX_LIKES_BATCH, Store, StoreError,
};
use weir_protocol::RoomId;

/// Generates one test per case for a backend; `$make` builds a fresh
/// `(guard, url)` pair, the guard kept alive for the test's length.
macro_rules! stats_tests {
    ($backend:ident, $make:expr) => {
        mod $backend {
            stats_tests!(@cases $make, [claims_move_rows_forward, racing_writers_count_each_range_once, bad_batches_write_nothing]);
        }
    };
    (@cases $make:expr, [$($case:ident),*]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (_guard, url) = $make;
                crate::$case(&url).await;
            }
        )*
    };
}

/// A SQLite file in a fresh temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sqlite() -> (TempDir, String) {
    let dir =
        std::env::temp_dir().join(format!("weir-stats-test-{}", uuid::Uuid::new_v4().simple()));
    let url = weir_control_plane::store::sqlite_url(&dir.join("weir.db"));
    (TempDir(dir), url)
}

fn postgres_backend() -> (pg::Postgres, String) {
    let pg = pg::Postgres::start();
    let url = pg.url();
    (pg, url)
}

stats_tests!(sqlite, crate::sqlite());
stats_tests!(postgres, crate::postgres_backend());

async fn open(url: &str) -> Store {
    Store::connect(url, Duration::from_secs(10)).await.unwrap()
}

fn rid(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

fn mark(epoch: u64, through: u64) -> LikesMark {
    LikesMark { epoch, through }
}

fn claim(room: &str, expect: Option<(u64, u64)>, to: (u64, u64), add: u64) -> LikesClaim {
    LikesClaim {
        room: rid(room),
        expect: expect.map(|(e, t)| mark(e, t)),
        to: mark(to.0, to.1),
        add,
    }
}

/// `(likes, epoch, through)` of a room's row.
async fn row(s: &Store, room: &str) -> Option<(u64, u64, u64)> {
    s.room_likes(&[rid(room)])
        .await
        .unwrap()
        .get(&rid(room))
        .map(|r| (r.likes, r.epoch, r.through))
}

async fn claims_move_rows_forward(url: &str) {
    let s = open(url).await;
    assert_eq!(row(&s, "r").await, None);
    // Created by the first claim; a second create loses and says so.
    let b = s
        .apply_likes(&[claim("r", None, (7, 10), 5)], &[rid("other")])
        .await
        .unwrap();
    assert_eq!(b.applied, [true]);
    assert_eq!(b.rows.len(), 1, "rooms without a row are absent");
    assert_eq!(b.rows[&rid("r")].likes, 5);
    let b = s
        .apply_likes(&[claim("r", None, (7, 12), 100)], &[])
        .await
        .unwrap();
    assert_eq!(b.applied, [false]);
    assert_eq!(row(&s, "r").await, Some((5, 7, 10)));
    // Forward from where it stands; a stale expectation changes nothing.
    let b = s
        .apply_likes(
            &[
                claim("r", Some((7, 10)), (7, 20), 3),
                claim("s", None, (7, 4), 1),
            ],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(b.applied, [true, true]);
    assert_eq!((b.rows[&rid("r")].likes, b.rows[&rid("s")].likes), (8, 1));
    let b = s
        .apply_likes(&[claim("r", Some((7, 10)), (7, 30), 50)], &[])
        .await
        .unwrap();
    assert_eq!(b.applied, [false]);
    assert_eq!(
        row(&s, "r").await,
        Some((8, 7, 20)),
        "the loser reads where it stands"
    );
    // A rebase: past offsets retention dropped, then to a new epoch; the
    // likes stay.
    let b = s
        .apply_likes(&[claim("r", Some((7, 20)), (7, 90), 0)], &[])
        .await
        .unwrap();
    assert_eq!(b.applied, [true]);
    let b = s
        .apply_likes(&[claim("r", Some((7, 90)), (9, 3), 2)], &[])
        .await
        .unwrap();
    assert_eq!(b.applied, [true]);
    assert_eq!(row(&s, "r").await, Some((10, 9, 3)));
    // The total never passes what a JavaScript number holds exactly.
    s.apply_likes(&[claim("big", None, (1, 1), MAX_COUNTER - 1)], &[])
        .await
        .unwrap();
    let b = s
        .apply_likes(&[claim("big", Some((1, 1)), (1, 2), 2)], &[])
        .await
        .unwrap();
    assert_eq!(b.applied, [false]);
    assert_eq!(row(&s, "big").await, Some((MAX_COUNTER - 1, 1, 1)));
    // Reopening keeps the rows (the migration ran once).
    s.close().await;
    let s = open(url).await;
    assert_eq!(row(&s, "r").await, Some((10, 9, 3)));
    s.close().await;
}

/// Several nodes carry one room and see the same likes events: each node
/// claims the range it holds from where it last read the row. Every range
/// is added exactly once, whoever wins it.
async fn racing_writers_count_each_range_once(url: &str) {
    let s = open(url).await;
    // The bus: a likes event of `offset` likes at every offset 1..=60.
    let likes_in = |from: u64, to: u64| -> u64 { (from + 1..=to).sum() };
    s.apply_likes(&[claim("hot", None, (3, 0), 0)], &[])
        .await
        .unwrap();
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut won = 0u64;
                // Each writer sees the bus up to `seen`, a little further
                // each round, at its own pace.
                let mut seen = 0;
                while seen < 60 {
                    seen = (seen + 3 + w).min(60);
                    let now = s.room_likes(&[rid("hot")]).await.unwrap()[&rid("hot")];
                    if now.through >= seen {
                        continue;
                    }
                    let c = claim(
                        "hot",
                        Some((3, now.through)),
                        (3, seen),
                        likes_in(now.through, seen),
                    );
                    match s.apply_likes(&[c], &[]).await {
                        Ok(b) if b.applied[0] => won += 1,
                        Ok(_) => {}
                        // SQLite may refuse a writer that waited too long
                        // for the lock: it wrote nothing, like a loss.
                        Err(StoreError::Unavailable(_)) => {}
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                won
            })
        })
        .collect();
    let mut wins = 0;
    for w in writers {
        wins += w.await.unwrap();
    }
    assert!(wins >= 1);
    let (likes, _, through) = row(&s, "hot").await.unwrap();
    assert_eq!(through, 60, "someone counted up to the end");
    assert_eq!(likes, likes_in(0, 60), "every like once, none twice");
    s.close().await;
}

async fn bad_batches_write_nothing(url: &str) {
    let s = open(url).await;
    s.apply_likes(&[claim("r", None, (1, 5), 2)], &[])
        .await
        .unwrap();
    let bad: Vec<(Vec<LikesClaim>, Vec<RoomId>, &str)> = vec![
        (
            vec![
                claim("ok", None, (1, 1), 1),
                claim("r", Some((1, 5)), (1, 5), 1),
            ],
            vec![],
            "moves forward",
        ),
        (
            vec![claim("ok", None, (1, 1), 1), claim("ok", None, (1, 2), 1)],
            vec![],
            "claimed twice",
        ),
        (
            vec![claim("ok", None, (1, 1), MAX_COUNTER + 1)],
            vec![],
            "largest allowed",
        ),
        (
            vec![claim("ok", None, (1, 1), 1)],
            (0..MAX_LIKES_BATCH)
                .map(|i| rid(&format!("x{i}")))
                .collect(),
            "at most",
        ),
    ];
    for (claims, read, why) in bad {
        match s.apply_likes(&claims, &read).await {
            Err(StoreError::Invalid { reason, .. }) => {
                assert!(reason.contains(why), "{reason} should say {why}")
            }
            other => panic!("{why}: {other:?}"),
        }
    }
    assert_eq!(row(&s, "ok").await, None, "nothing half written");
    assert_eq!(row(&s, "r").await, Some((2, 1, 5)));
    s.close().await;
}
