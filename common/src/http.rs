//! HTTP pieces both servers share: the JSON error shape, a JSON body extractor whose rejections use that shape
//! (413 too large, 415 not JSON, 400 malformed), and JSON answers for unknown routes and methods.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
}

/// `{"error":{"code":...,"message":...}}` with `status`.
pub fn error_response(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: ErrorDetail { code, message: message.into() } })).into_response()
}

/// Why a request body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body must be JSON (Content-Type: application/json)")]
    NotJson,
    #[error("request body is larger than the limit")]
    TooLarge,
    #[error("could not read the request body: {0}")]
    Unreadable(String),
    #[error("malformed request: {0}")]
    Malformed(String),
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let status = match self {
            BodyError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Unreadable(_) | BodyError::Malformed(_) => StatusCode::BAD_REQUEST,
        };
        let code = match self {
            BodyError::NotJson => "unsupported_media_type",
            BodyError::TooLarge => "payload_too_large",
            BodyError::Unreadable(_) | BodyError::Malformed(_) => "invalid_request",
        };
        error_response(status, code, self.to_string())
    }
}

/// A JSON request body. Unlike axum's `Json`, every rejection comes back in our error shape.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = BodyError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(BodyError::NotJson);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                BodyError::TooLarge
            } else {
                BodyError::Unreadable(rejection.body_text())
            }
        })?;
        from_json_object(&bytes).map(JsonBody).map_err(BodyError::Malformed)
    }
}

/// A JSON object parsed into `T`, or what is wrong with it in the API's words. Every body of these APIs is an
/// object: anything else is refused here, a list included, which serde would otherwise take as the struct's
/// fields in order (`["alice","bob",5,null,null,null,null]` as a transfer).
pub fn from_json_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let found = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "a list",
        Some(b'"') => "a string",
        Some(b'-' | b'0'..=b'9') => "a number",
        Some(b't' | b'f') => "true or false",
        Some(b'n') => "null",
        // An object, nothing, or not JSON at all: serde says what is wrong.
        _ => return serde_json::from_slice(bytes).map_err(|e| json_error_message(&e)),
    };
    Err(format!("expected a JSON object, not {found}"))
}

/// True if the request says its body is JSON: `application/json` or `application/<something>+json`.
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(';').next()).is_some_and(
        |mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        },
    )
}

/// What is wrong with a JSON body, in the API's words: serde's messages name the server's own types ("expected
/// struct TransferRequest with 7 elements") and use its jargon (sequence, map, usize), which mean nothing to a
/// client.
pub fn json_error_message(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let text = error.to_string();
    // serde_json ends its messages with " at line L column C"; the position is said below where it helps.
    let text = text.rsplit_once(" at line ").map_or(text.as_str(), |(message, _)| message);
    let at = format!("line {}, column {}", error.line(), error.column());
    match error.classify() {
        Category::Io => "the body could not be read".to_owned(),
        Category::Eof if error.line() == 1 && error.column() == 0 => "the body is empty: send a JSON object".to_owned(),
        Category::Eof => format!("the JSON ends too soon ({at})"),
        Category::Syntax => format!("not valid JSON: {text} ({at})"),
        Category::Data => plain_words(text),
    }
}

/// serde's description of a type mismatch, with the server's type names and serde's jargon replaced.
fn plain_words(text: &str) -> String {
    // A list given where an object is expected: serde would take it as the struct's fields in order.
    if text.starts_with("invalid length ") && text.contains("expected struct ") {
        return "expected a JSON object, not a list".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("expected ") {
        let (before, after) = rest.split_at(start + "expected ".len());
        out.push_str(before);
        let (expected, tail) = expected_in_plain_words(after);
        out.push_str(expected);
        rest = tail;
    }
    out.push_str(rest);
    // What was found: "invalid type: sequence, ..." and "invalid type: map, ...".
    out.replacen("invalid type: sequence,", "invalid type: list,", 1).replacen(
        "invalid type: map,",
        "invalid type: object,",
        1,
    )
}

/// What follows "expected " in a serde message: the type in plain words (empty to keep serde's own), and the
/// text after it.
fn expected_in_plain_words(text: &str) -> (&'static str, &str) {
    let skip_name = |text: &str| text.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_').len();
    for (serde_words, plain) in [("a sequence", "a list"), ("a map", "a JSON object")] {
        if let Some(rest) = text.strip_prefix(serde_words) {
            return (plain, rest);
        }
    }
    for (kind, plain) in [("struct ", "a JSON object"), ("enum ", "one of the accepted values")] {
        if let Some(named) = text.strip_prefix(kind) {
            // The type's name, then "with 7 elements" when serde counts a struct's fields.
            let mut rest = &named[named.len() - skip_name(named)..];
            if let Some(count) = rest.strip_prefix(" with ") {
                let after_count = &count[count.len() - skip_name(count)..];
                if let Some(after) =
                    after_count.strip_prefix(" elements").or_else(|| after_count.strip_prefix(" element"))
                {
                    rest = after;
                }
            }
            return (plain, rest);
        }
    }
    let rest = &text[text.len() - skip_name(text)..];
    let plain = match &text[..text.len() - rest.len()] {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        _ => return ("", text),
    };
    (plain, rest)
}

pub async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub async fn method_not_allowed() -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not accept that method")
}

/// Resolves on SIGTERM or Ctrl-C: the servers then stop accepting and finish the requests in flight.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested: finishing requests in flight");
}

/// Milliseconds since the Unix epoch; the protocol machines take time as an argument.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A listener that holds at most `max` connections open at once. Past that it stops accepting, so further
/// clients wait in the kernel's backlog instead of costing this process memory.
pub struct LimitedListener {
    inner: tokio::net::TcpListener,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl LimitedListener {
    pub fn new(inner: tokio::net::TcpListener, max: usize) -> Self {
        LimitedListener { inner, slots: std::sync::Arc::new(tokio::sync::Semaphore::new(max.max(1))) }
    }
}

/// A connection that gives its slot back when it closes.
pub struct LimitedStream {
    inner: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = match self.slots.clone().acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => std::future::pending().await, // the semaphore is never closed
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (LimitedStream { inner: stream, _slot: slot }, addr);
                }
                // Out of file descriptors and the like: wait rather than spin.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for LimitedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Middleware: a request (body included) that takes longer than the limit gets 408. A transfer cut off this
/// way keeps running in its own task; its outcome can be read or retried with the same id.
pub async fn time_limit(
    axum::extract::State(limit): axum::extract::State<std::time::Duration>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => error_response(StatusCode::REQUEST_TIMEOUT, "request_timeout", "the request took too long"),
    }
}

/// Middleware for internal routes: without the cluster secret, 401 before anything else happens.
pub async fn require_cluster_token(
    axum::extract::State(token): axum::extract::State<Option<crate::auth::ClusterToken>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &token {
        let presented = req.headers().get(crate::wire::HEADER_CLUSTER_TOKEN).map(|v| v.as_bytes()).unwrap_or(b"");
        if !token.matches(presented) {
            return error_response(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong cluster token");
        }
    }
    next.run(req).await
}

/// The cluster id an internal request carries, if it carries a well-formed one.
pub fn cluster_id_of(headers: &axum::http::HeaderMap) -> Option<uuid::Uuid> {
    headers
        .get(crate::wire::HEADER_CLUSTER_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct TransferRequest {
        from: Option<String>,
        amount: Option<i64>,
        limit: Option<usize>,
        legs: Option<Vec<LegRequest>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct LegRequest {
        from: String,
    }

    fn message(body: &str) -> String {
        from_json_object::<TransferRequest>(body.as_bytes()).expect_err("an invalid body")
    }

    #[test]
    fn json_errors_are_told_in_the_apis_words_without_the_servers_type_names() {
        let cases = [
            ("[]", "expected a JSON object, not a list"),
            ("[1, 2]", "expected a JSON object, not a list"),
            (" 5", "expected a JSON object, not a number"),
            ("null", "expected a JSON object, not null"),
            (r#"{"legs": [5]}"#, "invalid type: integer `5`, expected a JSON object"),
            (r#"{"legs": [[]]}"#, "expected a JSON object, not a list"),
            (r#"{"legs": {}}"#, "invalid type: object, expected a list"),
            (r#"{"from": []}"#, "invalid type: list, expected a string"),
            (r#"{"limit": "x"}"#, "invalid type: string \"x\", expected a whole number, 0 or more"),
            (r#"{"amount": 1.5}"#, "invalid type: floating point `1.5`, expected a whole number"),
            (r#"{"memo": 1}"#, "unknown field `memo`, expected one of `from`, `amount`, `limit`, `legs`"),
            ("", "the body is empty: send a JSON object"),
            (r#"{"from":"#, "the JSON ends too soon (line 1, column 8)"),
            (r#"{"from" 1}"#, "not valid JSON: expected `:` (line 1, column 9)"),
        ];
        for (body, expected) in cases {
            assert_eq!(message(body), expected, "{body}");
        }
    }
}
