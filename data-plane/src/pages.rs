//! The publish and play pages: plain HTML/JS compiled into the binary, no
//! build step. The room comes from the page's own URL; the control-plane
//! URL comes from `/assets/config.js`.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use crate::http::AppState;

const PUBLISH_HTML: &str = include_str!("../assets/publish.html");
const PLAY_HTML: &str = include_str!("../assets/play.html");

/// Static assets by file name, with their content type.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "weir.css",
        "text/css; charset=utf-8",
        include_str!("../assets/weir.css"),
    ),
    (
        "weir.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/weir.js"),
    ),
    (
        "room.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/room.js"),
    ),
    (
        "publish.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/publish.js"),
    ),
    (
        "play.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/play.js"),
    ),
    // hls.js 1.7.4 (light build), Apache-2.0, vendored as published on npm
    // (see assets/VENDORED.md); the play page loads it only for HLS.
    (
        "hls.light.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/hls.light.min.js"),
    ),
    (
        "hls.js.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("../assets/hls.js.LICENSE"),
    ),
];

/// The page, or a 400 when the room in the URL is not a valid room id.
fn page(room: &str, html: &'static str) -> Response {
    match weir_protocol::RoomId::parse(room) {
        Ok(_) => Html(html).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("bad room in URL: {e}\n")).into_response(),
    }
}

pub(crate) async fn publish(Path(room): Path<String>) -> Response {
    page(&room, PUBLISH_HTML)
}

pub(crate) async fn play(Path(room): Path<String>) -> Response {
    page(&room, PLAY_HTML)
}

pub(crate) async fn asset(State(state): State<AppState>, Path(file): Path<String>) -> Response {
    let (content_type, body): (&str, String) = if file == "config.js" {
        (
            "text/javascript; charset=utf-8",
            state.page_config.to_string(),
        )
    } else if let Some((_, ct, body)) = ASSETS.iter().find(|(name, _, _)| *name == file) {
        (ct, (*body).to_owned())
    } else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let mut res = body.into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

pub(crate) async fn index() -> Html<&'static str> {
    Html(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Weir</title>
<link rel="stylesheet" href="/assets/weir.css"></head><body><main class="wrap">
<h1>Weir</h1><p>Pick a room name, then publish your camera or play the room.</p>
<form onsubmit="event.preventDefault()"><input id="room" value="demo" pattern="[A-Za-z0-9._-]{1,64}">
<button onclick="location.href='/publish/'+encodeURIComponent(room.value)">Publish</button>
<button onclick="location.href='/play/'+encodeURIComponent(room.value)">Play</button></form>
<p><a href="/metrics">metrics</a></p></main></body></html>"#,
    )
}
