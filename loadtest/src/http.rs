//! A minimal HTTP/1.1 client for WHEP and the control plane's JSON gateway:
//! one request per connection, plain `http://` only. Enough for a load
//! generator, and no TLS stack to build.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Splits `http://host:port/path` into (authority, path).
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("only http:// URLs are supported, got {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("no host in {url}");
    }
    Ok((authority.to_owned(), path.to_owned()))
}

/// Sends one request and reads the whole response.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, request_inner(method, url, headers, body))
        .await
        .with_context(|| format!("{method} {url} timed out after {timeout:?}"))?
}

async fn request_inner(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<Response> {
    let (authority, path) = split_url(url)?;
    let mut stream = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response has no header end")?;
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size_hex = std::str::from_utf8(&data[..line_end])?
            .split(';')
            .next()
            .unwrap_or("0");
        let size = usize::from_str_radix(size_hex.trim(), 16).context("bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r =
            parse(b"HTTP/1.1 201 Created\r\nLocation: /whep/r/1\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.header("location"), Some("/whep/r/1"));
        assert_eq!(r.body, b"ok");
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abc");
        assert!(parse(b"garbage").is_err());
        assert!(split_url("https://x/").is_err());
        assert_eq!(
            split_url("http://a:1/b/c").unwrap(),
            ("a:1".into(), "/b/c".into())
        );
    }
}

/// A WHIP or WHEP session on a node: the offer/answer exchange and the
/// `DELETE` that ends it.
#[derive(Debug)]
pub struct WebRtcSession {
    /// The session URL (`Location`, made absolute), when the node gave one.
    url: Option<String>,
    auth: String,
}

impl WebRtcSession {
    /// POSTs `offer_sdp` to `endpoint` (`what` names it in errors: "WHIP" or
    /// "WHEP"); returns the session and the answer SDP.
    pub async fn open(
        what: &str,
        endpoint: &str,
        token: &str,
        offer_sdp: &str,
    ) -> anyhow::Result<(Self, String)> {
        let auth = format!("Bearer {token}");
        let res = request(
            "POST",
            endpoint,
            &[
                ("Content-Type", "application/sdp"),
                ("Authorization", &auth),
            ],
            offer_sdp.as_bytes(),
            Duration::from_secs(10),
        )
        .await?;
        if res.status != 201 {
            bail!("{what} answered {}: {}", res.status, res.text().trim());
        }
        let url = match (res.header("location"), split_url(endpoint)) {
            (Some(loc), Ok((authority, _))) => Some(format!("http://{authority}{loc}")),
            _ => None,
        };
        Ok((Self { url, auth }, res.text()))
    }

    /// Leaves politely; the node would notice the silence anyway.
    pub async fn close(self) {
        if let Some(url) = self.url {
            let _ = request(
                "DELETE",
                &url,
                &[("Authorization", &self.auth)],
                b"",
                Duration::from_secs(5),
            )
            .await;
        }
    }
}
