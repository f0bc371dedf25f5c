//! The wallet test suite (`support/wallet.rs`), run on both stores: SQLite
//! (a file in a temp dir, the embedded default) and a real PostgreSQL
//! (Debian's PostgreSQL 15, started per test on a free loopback port; the
//! test fails, never skips, when it is not installed).
#![allow(clippy::unwrap_used)]

#[path = "support/postgres.rs"]
mod pg;
#[path = "support/wallet.rs"]
mod wallet;

/// Generates one test per case for a backend; `$make` builds a fresh
/// `(guard, url)` pair, the guard kept alive for the test's length.
macro_rules! wallet_tests {
    ($backend:ident, $make:expr) => {
        mod $backend {
            wallet_tests!(@cases $make, [grants, send_and_retry, concurrent_retries, insufficient_funds, concurrent_gifts, bad_input]);
        }
    };
    (@cases $make:expr, [$($case:ident),*]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (_guard, url) = $make;
                crate::wallet::$case(&url).await;
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
    let dir = std::env::temp_dir().join(format!(
        "weir-wallet-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let url = weir_control_plane::store::sqlite_url(&dir.join("weir.db"));
    (TempDir(dir), url)
}

fn postgres_backend() -> (pg::Postgres, String) {
    let pg = pg::Postgres::start();
    let url = pg.url();
    (pg, url)
}

wallet_tests!(sqlite, crate::sqlite());
wallet_tests!(postgres, crate::postgres_backend());
