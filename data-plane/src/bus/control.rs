//! The node's calls to the control plane's JSON gateway (follow checks,
//! like-total batches): one HTTP/1 client, the node secret as a Bearer
//! token when the cluster has one, one timeout over the whole call.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use weir_protocol::stats::NodeSecret;

pub(crate) struct ControlClient {
    /// The control plane's base URL.
    url: String,
    secret: Option<NodeSecret>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ControlClient {
    /// Calls the control plane at `control_url` (`http://…`), each call
    /// bounded by `timeout`.
    pub(crate) fn new(control_url: &str, secret: Option<NodeSecret>, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            url: control_url.trim_end_matches('/').to_owned(),
            secret,
            timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// POSTs `body` as JSON to `path`; the answer's JSON, or why not.
    pub(crate) async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, String> {
        let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let mut request = http::Request::post(format!("{}{path}", self.url))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            request = request.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", secret.expose()),
            );
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            serde_json::from_slice(&bytes).map_err(|e| format!("bad answer: {e}"))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }
}
