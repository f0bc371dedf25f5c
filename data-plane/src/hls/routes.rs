//! HTTP handlers of HLS and snapshots: `/hls/{room}/master.m3u8`,
//! `/hls/{room}/{rendition}/index.m3u8`, its init and media segments, and
//! `/rooms/{room}/snapshot.jpg`. Public (CDNs pull them), CORS for any
//! origin (the node's CORS layer), cache headers fit for a CDN: playlists
//! for a second, segments for a day (their names are unique per packaging
//! run, so they never change), refusals for a second.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::FileKind;
use crate::http::AppState;

const PLAYLIST: &str = "application/vnd.apple.mpegurl";

fn not_found(message: String) -> Response {
    let mut res = (StatusCode::NOT_FOUND, format!("{message}\n")).into_response();
    // CDNs may cache the refusal, but only briefly: the room may go live.
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=1"));
    res
}

fn bad_room(room: &str) -> Option<Response> {
    weir_protocol::RoomId::parse(room)
        .err()
        .map(|e| (StatusCode::BAD_REQUEST, format!("bad room in URL: {e}\n")).into_response())
}

fn with(mut res: Response, content_type: &'static str, cache: &'static str) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

fn hls_off() -> Response {
    not_found("HLS is switched off on this node".into())
}

/// `GET /hls/{room}/master.m3u8`.
pub(crate) async fn master(State(state): State<AppState>, Path(room): Path<String>) -> Response {
    if let Some(r) = bad_room(&room) {
        return r;
    }
    let Some(hls) = state.media.hls() else {
        return hls_off();
    };
    match hls.master(&room) {
        Some(text) => with(text.into_response(), PLAYLIST, "max-age=1"),
        None => not_found(format!(
            "room {room} has no HLS here: it is not published over SRT on this node, or its first segment is not written yet"
        )),
    }
}

/// `GET /hls/{room}/{rendition}/{file}`: `index.m3u8`, an init segment
/// (`….mp4`) or a media segment (`….m4s`).
pub(crate) async fn file(
    State(state): State<AppState>,
    Path((room, rendition, file)): Path<(String, String, String)>,
) -> Response {
    if let Some(r) = bad_room(&room) {
        return r;
    }
    let Some(hls) = state.media.hls() else {
        return hls_off();
    };
    if file == "index.m3u8" {
        return match hls.media_playlist(&room, &rendition) {
            Some((text, ended)) => with(
                text.into_response(),
                PLAYLIST,
                if ended { "max-age=10" } else { "max-age=1" },
            ),
            None => not_found(format!(
                "room {room} has no HLS rendition {rendition:?} (yet): see /hls/{room}/master.m3u8"
            )),
        };
    }
    let Some((path, kind)) = hls.file(&room, &rendition, &file) else {
        return not_found(format!(
            "no {file:?} in rendition {rendition:?} of room {room}: not one of its segments, or expired"
        ));
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => with(
            bytes.into_response(),
            match kind {
                FileKind::Init => "video/mp4",
                FileKind::Segment => "video/iso.segment",
            },
            "public, max-age=86400, immutable",
        ),
        // Deleted between the lookup and the read: it just expired.
        Err(_) => not_found(format!("{file:?} expired")),
    }
}

/// `GET /rooms/{room}/snapshot.jpg`.
pub(crate) async fn snapshot(State(state): State<AppState>, Path(room): Path<String>) -> Response {
    let id = match weir_protocol::RoomId::parse(&room) {
        Ok(id) => id,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad room in URL: {e}\n")).into_response();
        }
    };
    let Some(snap) = state.media.snapshots().get(&id) else {
        return not_found(format!(
            "no snapshot of room {room} yet: snapshots are taken of rooms published over SRT on this node, from their first keyframe on"
        ));
    };
    let mut res = with(snap.jpeg.into_response(), "image/jpeg", "public, max-age=2");
    if let Ok(v) = HeaderValue::from_str(&crate::hls::playlist::rfc3339(snap.taken)) {
        res.headers_mut().insert("x-snapshot-taken", v);
    }
    res
}

/// `OPTIONS` on HLS and snapshot paths (CORS preflights).
pub(crate) async fn options() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, OPTIONS"),
    );
    res
}
