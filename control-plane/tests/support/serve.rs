//! Serves a `ControlState` on a free loopback port for an API test.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use weir_control_plane::ControlState;

/// Serves `state` until the returned sender is dropped; its address.
pub async fn spawn(state: ControlState) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(weir_control_plane::serve(
        listener,
        state,
        Arc::new(String::new),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}
