//! A minimal HTTP/1.1 keep-alive client for the benchmark's hot loop: one connection, one request at a time,
//! `POST` with a JSON body, answers with a `Content-Length` (what the coordinator sends). A general client
//! (reqwest) costs the load generator about as much CPU per transfer as a participant's whole share of the
//! target, and the benchmark counts the load generator's CPU, so the loop that measures stays this small.
//! Everything else in the tools (setup, checks, stats) keeps using reqwest.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer's head may be at most this long; the coordinator's are a few hundred bytes.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// An answer's body may be at most this long: a batch of 8,190 transfers is answered in about 1.3 MiB.
const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
    #[error("timeout")]
    Timeout,
    #[error("the server closed the connection")]
    Closed,
    #[error("unreadable answer: {0}")]
    Malformed(&'static str),
}

/// One keep-alive connection to `host:port`, reopened after any failure.
pub struct Http1Client {
    addr: String,
    path: String,
    timeout: Duration,
    conn: Option<TcpStream>,
    /// `authorization: Bearer ...` line, when the server asks for a token.
    auth: Option<String>,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Http1Client {
    /// `url` is `http://host:port/path`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, Http1Error> {
        let rest = url.strip_prefix("http://").ok_or(Http1Error::Malformed("only http:// URLs"))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        Ok(Http1Client {
            addr: addr.to_owned(),
            path: path.to_owned(),
            timeout,
            conn: None,
            auth: None,
            request: Vec::with_capacity(512),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_bearer(mut self, token: &str) -> Self {
        self.auth = Some(format!("authorization: Bearer {token}\r\n"));
        self
    }

    /// Posts `body` (JSON) and returns the status and the answer's body. A failure drops the connection, so the
    /// next call starts on a fresh one.
    pub async fn post_json(&mut self, body: &[u8]) -> Result<(u16, &[u8]), Http1Error> {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(Ok((status, head_len, len))) => Ok((status, &self.buf[head_len..head_len + len])),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(Http1Error::Timeout)
            }
        }
    }

    /// One request and its answer: the status, the head's length and the body's length in `buf`.
    async fn exchange(&mut self, body: &[u8]) -> Result<(u16, usize, usize), Http1Error> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(&self.addr).await.map_err(Http1Error::Connect)?;
            stream.set_nodelay(true)?;
            self.conn = Some(stream);
        }
        self.request.clear();
        self.request.extend_from_slice(b"POST ");
        self.request.extend_from_slice(self.path.as_bytes());
        self.request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        self.request.extend_from_slice(self.addr.as_bytes());
        self.request.extend_from_slice(b"\r\n");
        if let Some(auth) = &self.auth {
            self.request.extend_from_slice(auth.as_bytes());
        }
        self.request.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
        self.request.extend_from_slice(body.len().to_string().as_bytes());
        self.request.extend_from_slice(b"\r\n\r\n");
        self.request.extend_from_slice(body);
        let conn = self.conn.as_mut().ok_or(Http1Error::Closed)?;
        conn.write_all(&self.request).await?;

        self.buf.clear();
        let head_len = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > HEAD_BYTES_MAX {
                return Err(Http1Error::Malformed("head too long"));
            }
            read_more(conn, &mut self.buf).await?;
        };
        let (status, content_length) = parse_head(&self.buf[..head_len])?;
        if content_length > BODY_BYTES_MAX {
            return Err(Http1Error::Malformed("body too long"));
        }
        while self.buf.len() < head_len + content_length {
            read_more(conn, &mut self.buf).await?;
        }
        if self.buf.len() > head_len + content_length {
            return Err(Http1Error::Malformed("bytes after the answer"));
        }
        Ok((status, head_len, content_length))
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Http1Error> {
    buf.reserve(4096);
    if conn.read_buf(buf).await? == 0 {
        return Err(Http1Error::Closed);
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status code and `Content-Length` of an answer's head.
fn parse_head(head: &[u8]) -> Result<(u16, usize), Http1Error> {
    let text = std::str::from_utf8(head).map_err(|_| Http1Error::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().ok_or(Http1Error::Malformed("no status line"))?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or(Http1Error::Malformed("bad status line"))?;
    let mut content_length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Http1Error::Malformed("chunked answers are not supported"));
            }
        }
    }
    Ok((status, content_length.ok_or(Http1Error::Malformed("no content-length"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_or_refused() {
        let head = b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-type: application/json\r\nContent-Length: 42\r\n\r\n";
        assert_eq!(parse_head(head).expect("valid head"), (422, 42));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no length");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"SPDY 200\r\ncontent-length: 1\r\n\r\n").is_err());
    }

    #[test]
    fn urls_split_into_address_and_path() {
        let c = Http1Client::new("http://127.0.0.1:8080/transfers", Duration::from_secs(1)).expect("valid url");
        assert_eq!((c.addr.as_str(), c.path.as_str()), ("127.0.0.1:8080", "/transfers"));
        assert!(Http1Client::new("https://x/", Duration::from_secs(1)).is_err());
    }
}
