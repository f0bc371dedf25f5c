//! One business test suite (`support/business.rs`), run on both stores:
//! SQLite (a file in a temp dir, the embedded default) and a real PostgreSQL
//! (Debian's PostgreSQL 15, started per test on a free loopback port; the
//! test fails, never skips, when it is not installed).
#![allow(clippy::unwrap_used)]

#[path = "support/business.rs"]
mod business;
#[path = "support/postgres.rs"]
mod pg;

/// Generates one test per case for a backend; `$make` builds a fresh
/// `(guard, url)` pair, the guard kept alive for the test's length.
macro_rules! business_tests {
    ($backend:ident, $make:expr) => {
        mod $backend {
            business_tests!(@cases $make, [users, room_lifecycle, room_lists, follows, racing_writes, reopen_keeps_data]);
        }
    };
    (@cases $make:expr, [$($case:ident),*]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_guard, url) = $make;
                crate::business::$case(&url).await;
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
        std::env::temp_dir().join(format!("weir-store-test-{}", uuid::Uuid::new_v4().simple()));
    // A space in the path: URLs are encoded properly.
    let file = dir.join("data dir").join("weir.db");
    let url = weir_control_plane::store::sqlite_url(&file);
    (TempDir(dir), url)
}

fn postgres_backend() -> (pg::Postgres, String) {
    let pg = pg::Postgres::start();
    let url = pg.url();
    (pg, url)
}

business_tests!(sqlite, crate::sqlite());
business_tests!(postgres, crate::postgres_backend());
