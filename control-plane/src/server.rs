//! The control plane's one listener: gRPC (HTTP/2, prior knowledge) and the
//! HTTP/1.1 or HTTP/2 JSON gateway share a port, told apart by path. Also the
//! operational endpoints: `/healthz`, `/readyz`, `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use weir_protocol::pb::cdns_server::CdnsServer;
use weir_protocol::pb::config_server::ConfigServer;
use weir_protocol::pb::follows_server::FollowsServer;
use weir_protocol::pb::nodes_server::NodesServer;
use weir_protocol::pb::rollout_server::RolloutServer;
use weir_protocol::pb::rooms_server::RoomsServer;
use weir_protocol::pb::scheduler_server::SchedulerServer;
use weir_protocol::pb::tokens_server::TokensServer;
use weir_protocol::pb::users_server::UsersServer;
use weir_protocol::pb::wallet_server::WalletServer;

use crate::service::grpc::{BusinessApi, SchedulerApi, TokensApi, WalletApi};
use crate::service::http::{self as gateway, HttpError};
use crate::service::{ControlState, ErrorKind};

/// Renders the process's metrics in the Prometheus text format. The root
/// binary owns the recorder; this crate only serves what it renders.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Every route of the control plane's port.
pub async fn router(state: Arc<ControlState>, render_metrics: RenderMetrics) -> Router {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SchedulerServer<SchedulerApi>>().await;
    health.set_serving::<TokensServer<TokensApi>>().await;
    health.set_serving::<UsersServer<BusinessApi>>().await;
    health.set_serving::<RoomsServer<BusinessApi>>().await;
    health.set_serving::<FollowsServer<BusinessApi>>().await;
    health.set_serving::<ConfigServer<BusinessApi>>().await;
    health.set_serving::<NodesServer<BusinessApi>>().await;
    health.set_serving::<WalletServer<WalletApi>>().await;
    health.set_serving::<RolloutServer<BusinessApi>>().await;
    health.set_serving::<CdnsServer<BusinessApi>>().await;

    let business = BusinessApi::new(Arc::clone(&state));
    let mut grpc =
        tonic::service::Routes::new(SchedulerServer::new(SchedulerApi::new(Arc::clone(&state))))
            .add_service(TokensServer::new(TokensApi::new(Arc::clone(&state))))
            .add_service(UsersServer::new(business.clone()))
            .add_service(RoomsServer::new(business.clone()))
            .add_service(FollowsServer::new(business.clone()))
            .add_service(ConfigServer::new(business.clone()))
            .add_service(RolloutServer::new(business.clone()))
            .add_service(CdnsServer::new(business.clone()))
            .add_service(NodesServer::new(business))
            .add_service(WalletServer::new(WalletApi::new(Arc::clone(&state))))
            .add_service(health_service);
    // Reflection lets generic clients (`buf curl`, grpcurl) discover the API.
    match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(weir_protocol::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(reflection) => grpc = grpc.add_service(reflection),
        Err(e) => tracing::warn!(error = %e, "gRPC reflection is unavailable"),
    }
    let grpc = grpc
        .into_axum_router()
        .layer(axum::middleware::from_fn(grpc_deadline));

    let ops = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::clone(&state))
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(render_metrics),
        );

    grpc.merge(gateway::routes(state))
        .merge(ops)
        // Replaces tonic's fallback, which answers everything as gRPC.
        .fallback(not_found)
}

/// Serves the control plane on `listener` until `shutdown` completes, then
/// lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ControlState,
    render_metrics: RenderMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_shared(listener, Arc::new(state), render_metrics, shutdown).await
}

/// [`serve`] for a state shared with other tasks (the singleton workers).
pub async fn serve_shared(
    listener: tokio::net::TcpListener,
    state: Arc<ControlState>,
    render_metrics: RenderMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, state, render_metrics, Router::new(), shutdown).await
}

/// [`serve_shared`] with `extra` routes beside the control plane's own
/// (what belongs to the whole process, such as the CPU profiler).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<ControlState>,
    render_metrics: RenderMetrics,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // The config watch runs while the server does.
    let background = state.spawn_background();
    let app = router(state, render_metrics).await.merge(extra);
    tracing::info!(%addr, "control plane serving gRPC and HTTP");
    // Without TCP_NODELAY a gRPC answer written in several frames can wait
    // for the client's delayed ACK: 40 ms stalls on loopback.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("control plane server on {addr} failed: {e}"));
    background.abort();
    served
}

/// Most a client may ask for in `grpc-timeout` (longer asks are capped).
pub const MAX_DEADLINE: Duration = Duration::from_secs(300);

/// A gRPC client's deadline (`grpc-timeout: 250m`): the call, with every
/// coordinator, store and bus call it makes, is dropped when it passes and
/// the client gets `DEADLINE_EXCEEDED`. A dropped store transaction rolls
/// back, so nothing is half written. A malformed header is ignored (the
/// gRPC spec lets servers do so), and deadlines are capped at
/// [`MAX_DEADLINE`].
async fn grpc_deadline(request: Request, next: axum::middleware::Next) -> Response {
    let deadline = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|d| d.min(MAX_DEADLINE));
    let Some(deadline) = deadline else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_owned();
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("weir_grpc_deadline_exceeded_total").increment(1);
            tracing::info!(%path, ?deadline, "gRPC call passed its deadline");
            let status = tonic::Status::deadline_exceeded(format!(
                "the call did not finish within its deadline of {deadline:?}"
            ));
            let (parts, ()) = status.into_http::<()>().into_parts();
            Response::from_parts(parts, axum::body::Body::empty())
        }
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

async fn readyz(State(state): State<Arc<ControlState>>) -> Response {
    match state.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn metrics(State(render): State<RenderMetrics>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        let status =
            tonic::Status::unimplemented(format!("no gRPC method at {}", request.uri().path()));
        let (parts, ()) = status.into_http::<()>().into_parts();
        return Response::from_parts(parts, axum::body::Body::empty());
    }
    HttpError {
        status: StatusCode::NOT_FOUND,
        kind: ErrorKind::NotFound,
        message: format!(
            "no such path: {} {}",
            request.method(),
            request.uri().path()
        ),
    }
    .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn call(timeout: Option<&str>, handler_ms: u64) -> Response {
        let app = Router::new()
            .route(
                "/weir.v1.Slow/Call",
                axum::routing::post(move || async move {
                    tokio::time::sleep(Duration::from_millis(handler_ms)).await;
                    "done"
                }),
            )
            .layer(axum::middleware::from_fn(grpc_deadline));
        let mut request =
            Request::post("/weir.v1.Slow/Call").header(header::CONTENT_TYPE, "application/grpc");
        if let Some(t) = timeout {
            request = request.header("grpc-timeout", t);
        }
        app.oneshot(request.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_dropped_with_deadline_exceeded() {
        let late = call(Some("50m"), 5_000).await;
        assert_eq!(
            late.headers().get("grpc-status").unwrap(),
            &(tonic::Code::DeadlineExceeded as i32).to_string()
        );
        for (timeout, ms) in [(Some("5S"), 10), (None, 10), (Some("garbage"), 10)] {
            let on_time = call(timeout, ms).await;
            assert_eq!(on_time.status(), StatusCode::OK);
            assert!(
                on_time.headers().get("grpc-status").is_none(),
                "{timeout:?}"
            );
        }
    }

    #[test]
    fn grpc_timeouts_parse_per_the_spec() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S", "1 S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
