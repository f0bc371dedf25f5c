//! `POST /rooms/{room}/qoe`: what viewers experienced, reported by the play
//! page every few seconds (the node sees what it sends, not whether the
//! picture froze or the sound drifted from it). With a play token for the
//! room, JSON:
//!
//! ```json
//! {"protocol": "webrtc", "played_ms": 5000, "stalls": 1, "stall_ms": 420,
//!  "ttff_ms": 380, "av_sync_ms": -35}
//! ```
//!
//! `played_ms`, `stalls` and `stall_ms` cover the time since the page's
//! last report; `ttff_ms` comes once per playback; `av_sync_ms` is how far
//! video plays behind audio (negative: ahead), as the browser's jitter
//! buffers say. Each becomes a Prometheus series (`weir_viewer_*`): the
//! stall rate is `rate(weir_viewer_stall_ms_total) /
//! rate(weir_viewer_played_ms_total)`. Out-of-range values are refused with
//! a reason and count for nothing.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use weir_protocol::Mode;

use crate::http::{ApiError, AppState, authorize, parse_room};

/// Longest span one report may cover.
const MAX_SPAN_MS: u64 = 120_000;
/// Largest A/V offset taken as a measurement rather than garbage.
const MAX_AV_SYNC_MS: f64 = 10_000.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QoeReport {
    protocol: String,
    played_ms: u64,
    #[serde(default)]
    stalls: u32,
    #[serde(default)]
    stall_ms: u64,
    ttff_ms: Option<u64>,
    av_sync_ms: Option<f64>,
}

impl QoeReport {
    /// The protocol label, or why the report is refused.
    fn check(&self) -> Result<&'static str, String> {
        let protocol = match self.protocol.as_str() {
            "webrtc" => "webrtc",
            "hls" => "hls",
            other => return Err(format!("protocol must be webrtc or hls, not {other:?}")),
        };
        if self.played_ms > MAX_SPAN_MS {
            return Err(format!("played_ms may be at most {MAX_SPAN_MS} per report"));
        }
        if self.stall_ms > MAX_SPAN_MS {
            return Err(format!("stall_ms may be at most {MAX_SPAN_MS} per report"));
        }
        if self.stalls > 1000 {
            return Err("stalls may be at most 1000 per report".into());
        }
        if self.stalls == 0 && self.stall_ms > 0 {
            return Err("stall_ms without stalls".into());
        }
        if self.ttff_ms.is_some_and(|t| t > MAX_SPAN_MS) {
            return Err(format!("ttff_ms may be at most {MAX_SPAN_MS}"));
        }
        if self
            .av_sync_ms
            .is_some_and(|a| !a.is_finite() || a.abs() > MAX_AV_SYNC_MS)
        {
            return Err(format!("av_sync_ms must be within ±{MAX_AV_SYNC_MS}"));
        }
        Ok(protocol)
    }
}

pub(crate) async fn report(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Json<QoeReport>, JsonRejection>,
) -> Result<Response, ApiError> {
    let room = parse_room(&room)?;
    authorize(&state, &headers, &room, Mode::Play)?;
    let Json(r) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad QoE report: {}", e.body_text()),
        )
    })?;
    let protocol = r
        .check()
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, format!("bad QoE report: {why}")))?;
    metrics::counter!("weir_viewer_reports_total", "protocol" => protocol).increment(1);
    metrics::counter!("weir_viewer_played_ms_total", "protocol" => protocol).increment(r.played_ms);
    metrics::counter!("weir_viewer_stalls_total", "protocol" => protocol)
        .increment(u64::from(r.stalls));
    metrics::counter!("weir_viewer_stall_ms_total", "protocol" => protocol).increment(r.stall_ms);
    if let Some(t) = r.ttff_ms {
        metrics::histogram!("weir_viewer_ttff_seconds", "protocol" => protocol)
            .record(t as f64 / 1000.0);
    }
    if let Some(a) = r.av_sync_ms {
        metrics::histogram!("weir_viewer_av_offset_seconds", "protocol" => protocol)
            .record(a.abs() / 1000.0);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
