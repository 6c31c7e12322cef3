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
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(BodyError::NotJson);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                BodyError::TooLarge
            } else {
                BodyError::Unreadable(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| BodyError::Malformed(e.to_string()))
    }
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
