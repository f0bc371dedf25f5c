//! `/debug/pprof/profile?seconds=N`: a CPU profile of the whole process
//! (every thread, shards included) as a flamegraph SVG, sampled with SIGPROF
//! by the pprof crate. One profile at a time. Served by the node and by the
//! control plane (the binary hands them [`routes`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

/// The profiler's route, for a server of this process.
pub fn routes() -> Router {
    Router::new().route("/debug/pprof/profile", get(profile))
}

static RUNNING: AtomicBool = AtomicBool::new(false);

/// Longest profile one request may ask for.
const MAX_SECONDS: u64 = 60;

#[derive(Debug, Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

async fn profile(Query(q): Query<ProfileQuery>) -> Response {
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
    if report.data.is_empty() {
        // An idle process gets no samples (they count CPU time): say so
        // in the SVG asked for rather than with an empty body.
        return Ok(br#"<svg xmlns="http://www.w3.org/2000/svg" width="600" height="40"><text x="10" y="25">no CPU samples: the process was idle while profiled</text></svg>"#.to_vec());
    }
    let mut svg = Vec::new();
    report.flamegraph(&mut svg)?;
    Ok(svg)
}
