//! Just enough of the NATS client protocol to drive nats-server's own
//! WebSocket listener as the side-by-side peer of `weir loadtest events`
//! (`--target nats-ws`): the client writes `CONNECT`, `SUB`, `PUB`, `PING`
//! and `PONG`; the server's bytes (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`,
//! `+OK`, `-ERR`) arrive in WebSocket messages that need not line up with
//! protocol messages, so [`Reader`] buffers and cuts them. No I/O here.

/// The first thing a client sends: no `+OK` per command, no pedantic
/// checks, and its own messages echoed back (as Weir sends a chatter the
/// room's events, its own included).
pub const CONNECT: &str =
    "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":true}\r\n";

/// `SUB subject sid`.
pub fn sub(subject: &str, sid: u64) -> String {
    format!("SUB {subject} {sid}\r\n")
}

/// `PUB subject n` and the payload.
pub fn publish(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    out
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Info,
    /// A message on a subscription (headers, if any, are dropped).
    Msg {
        sid: u64,
        payload: Vec<u8>,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR 'reason'` (the server closes after most of them).
    Err(String),
}

/// Server bytes in, [`Op`]s out.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    pos: usize,
}

/// Longest control line accepted (`INFO` is the longest; a few KiB).
const MAX_LINE: usize = 64 * 1024;
/// Largest payload accepted (nats-server's default max_payload is 1 MiB).
const MAX_PAYLOAD: usize = 8 * 1024 * 1024;

impl Reader {
    /// Appends bytes from one WebSocket message.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed, or
    /// why the stream is not the NATS protocol.
    pub fn next_op(&mut self) -> Result<Option<Op>, String> {
        let rest = &self.buf[self.pos..];
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            if rest.len() > MAX_LINE {
                return Err(format!("a control line longer than {MAX_LINE} bytes"));
            }
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&rest[..eol]).map_err(|_| "a control line that is not UTF-8")?;
        let (verb, args) = line.split_once([' ', '\t']).unwrap_or((line, ""));
        let after_line = self.pos + eol + 2;
        let op = match verb.to_ascii_uppercase().as_str() {
            "MSG" | "HMSG" => {
                let headers = verb.eq_ignore_ascii_case("HMSG");
                let fields: Vec<&str> = args.split_whitespace().collect();
                // MSG subject sid [reply] size; HMSG subject sid [reply] hdr_size total_size
                let fixed = if headers { 4 } else { 3 };
                if fields.len() != fixed && fields.len() != fixed + 1 {
                    return Err(format!("bad {verb} line: {line:?}"));
                }
                let number = |s: &str| {
                    s.parse::<usize>()
                        .map_err(|_| format!("bad number {s:?} in {line:?}"))
                };
                let sid = fields[1]
                    .parse::<u64>()
                    .map_err(|_| format!("bad sid in {line:?}"))?;
                let total = number(fields[fields.len() - 1])?;
                let header_len = if headers {
                    number(fields[fields.len() - 2])?
                } else {
                    0
                };
                if total > MAX_PAYLOAD || header_len > total {
                    return Err(format!("bad sizes in {line:?}"));
                }
                let end = after_line + total;
                if self.buf.len() < end + 2 {
                    return Ok(None);
                }
                if &self.buf[end..end + 2] != b"\r\n" {
                    return Err(format!("payload of {line:?} not followed by CRLF"));
                }
                let payload = self.buf[after_line + header_len..end].to_vec();
                self.pos = end + 2;
                return Ok(Some(Op::Msg { sid, payload }));
            }
            "PING" => Op::Ping,
            "PONG" => Op::Pong,
            "+OK" => Op::Ok,
            "-ERR" => Op::Err(args.trim().trim_matches('\'').to_owned()),
            "INFO" => Op::Info,
            _ => return Err(format!("unknown server message {line:?}")),
        };
        self.pos = after_line;
        Ok(Some(op))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cuts_messages_split_and_joined_across_websocket_frames() {
        let mut r = Reader::default();
        r.push(b"INFO {\"server_id\":\"x\"}\r\nPI");
        assert_eq!(r.next_op().unwrap(), Some(Op::Info));
        assert_eq!(r.next_op().unwrap(), None);
        r.push(b"NG\r\nMSG a.b 7 5\r\nhel");
        assert_eq!(r.next_op().unwrap(), Some(Op::Ping));
        assert_eq!(r.next_op().unwrap(), None);
        r.push(
            b"lo\r\nMSG a.b 7 reply.x 2\r\nhi\r\n+OK\r\nHMSG s 2 12 14\r\nNATS/1.0\r\n\r\nok\r\n",
        );
        assert_eq!(
            r.next_op().unwrap(),
            Some(Op::Msg {
                sid: 7,
                payload: b"hello".to_vec()
            })
        );
        assert_eq!(
            r.next_op().unwrap(),
            Some(Op::Msg {
                sid: 7,
                payload: b"hi".to_vec()
            })
        );
        assert_eq!(r.next_op().unwrap(), Some(Op::Ok));
        assert_eq!(
            r.next_op().unwrap(),
            Some(Op::Msg {
                sid: 2,
                payload: b"ok".to_vec()
            })
        );
        assert_eq!(r.next_op().unwrap(), None);
        r.push(b"-ERR 'Slow Consumer'\r\n");
        assert_eq!(r.next_op().unwrap(), Some(Op::Err("Slow Consumer".into())));
    }

    #[test]
    fn refuses_what_is_not_nats() {
        let mut r = Reader::default();
        r.push(b"HTTP/1.1 200 OK\r\n");
        assert!(r.next_op().is_err());
        let mut r = Reader::default();
        r.push(b"MSG a 1 x\r\n");
        assert!(r.next_op().is_err());
        let mut r = Reader::default();
        r.push(b"MSG a 1 2\r\nhiXX");
        assert!(r.next_op().is_err());
    }

    #[test]
    fn client_commands() {
        assert_eq!(sub("r.1", 3), "SUB r.1 3\r\n");
        assert_eq!(publish("r.1", b"abc"), b"PUB r.1 3\r\nabc\r\n");
        assert!(CONNECT.starts_with("CONNECT {") && CONNECT.ends_with("}\r\n"));
    }
}
