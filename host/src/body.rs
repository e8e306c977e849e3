//! The body type every response Cistern sends, and the small bodies it
//! makes itself (empty, in-memory, plain-text messages). A leaf: the
//! serve, fetch, pipeline and observability modules all speak it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

/// The error type of streamed bodies, upstream and downstream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response Cistern sends.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A client request's body: hyper's stream, or none at all for a request
/// the HTTP/1.1 fast lane read itself (it takes only requests without a
/// body, see `server::lane`).
pub enum ClientBody {
    /// The body as hyper reads it from the connection.
    Wire(Incoming),
    /// No body.
    None,
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Wire(body) => Pin::new(body).poll_frame(cx),
            ClientBody::None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Wire(body) => body.is_end_stream(),
            ClientBody::None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Wire(body) => body.size_hint(),
            ClientBody::None => SizeHint::with_exact(0),
        }
    }
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body held in memory (small generated pages, error messages).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text response with a status.
pub fn text(status: StatusCode, message: impl Into<String>) -> Response<ProxyBody> {
    let mut body = message.into();
    body.push('\n');
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Escapes text for HTML element content and quoted attribute values:
/// the pages Cistern writes itself (admin, mirror lists, FTP listings).
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
