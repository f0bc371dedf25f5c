//! `/debug/pprof/profile?seconds=N`: a CPU profile of the whole process
//! (every thread, shards included) as a flamegraph SVG, sampled with SIGPROF
//! by the pprof crate. One profile at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::Query;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

static RUNNING: AtomicBool = AtomicBool::new(false);

/// Longest profile one request may ask for.
const MAX_SECONDS: u64 = 60;

#[derive(Debug, Deserialize)]
pub(crate) struct ProfileQuery {
    seconds: Option<u64>,
}

pub(crate) async fn profile(Query(q): Query<ProfileQuery>) -> Response {
    let seconds = q.seconds.unwrap_or(10);
    if !(1..=MAX_SECONDS).contains(&seconds) {
        return (
            StatusCode::BAD_REQUEST,
            format!("seconds must be 1 to {MAX_SECONDS}\n"),
        )
            .into_response();
    }
    if RUNNING.swap(true, Ordering::AcqRel) {
        return (StatusCode::CONFLICT, "a profile is already running\n").into_response();
    }
    let result = tokio::task::spawn_blocking(move || record(Duration::from_secs(seconds))).await;
    RUNNING.store(false, Ordering::Release);
    match result {
        Ok(Ok(svg)) => {
            let mut res = svg.into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml"),
            );
            res
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("profiling failed: {e}\n"),
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "profiling failed\n").into_response(),
    }
}

fn record(d: Duration) -> Result<Vec<u8>, pprof::Error> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(250)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()?;
    std::thread::sleep(d);
    let report = guard.report().build()?;
    let mut svg = Vec::new();
    report.flamegraph(&mut svg)?;
    Ok(svg)
}
