//! `ftp://` upstreams behind the HTTP client: an in-process gateway that
//! answers an HTTP/1.1 request for an `ftp://` URL by speaking FTP to the
//! server (suppaftp, passive mode, `TYPE I`).
//!
//! The fill engine works on hyper responses (`Response<Incoming>`), and its
//! revalidation and resume logic on HTTP headers, so the seam is the
//! connection: [`FtpConnector`] hands the hyper client one end of an
//! in-memory pipe whose other end is served by [`answer`]. FTP's facts
//! become HTTP's: `SIZE` is `Content-Length`, `MDTM` is `Last-Modified`
//! (so the RFC 9111 rules, `If-Modified-Since` and `If-Range` work
//! unchanged), `REST` serves a `Range: bytes=N-`, a directory is a small
//! HTML index, and FTP failures are HTTP statuses (550 → 404, a refused
//! login → 502).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use suppaftp::tokio::{AsyncNoTlsStream, ImplAsyncFtpStream};
use suppaftp::types::FileType;
use suppaftp::{FtpError, Status};
use tokio::io::{AsyncReadExt as _, DuplexStream};

use crate::body::html_escape;
use crate::ours::OwnSockets;

use crate::body::BoxError;

/// The FTP control connection, without TLS.
type Ftp = ImplAsyncFtpStream<AsyncNoTlsStream>;

/// A gateway response body.
type GatewayBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// The default FTP port, written into keys and replica paths (`host:21/`).
pub const FTP_PORT: u16 = 21;

/// How much of a file one body frame carries.
const CHUNK: usize = 64 * 1024;

/// The connector of the `ftp://` client: every connection is a pipe to a
/// gateway task, which holds its own FTP session per request.
#[derive(Clone, Debug)]
pub struct FtpConnector {
    /// Cistern's own sockets, which neither the control nor the data
    /// connection may reach.
    pub own: Arc<OwnSockets>,
    /// The connect timeout, for the control and the data connections.
    pub connect_timeout: Duration,
}

impl tower_service::Service<Uri> for FtpConnector {
    type Response = GatewayIo;
    type Error = BoxError;
    type Future = std::future::Ready<Result<GatewayIo, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (client, server) = tokio::io::duplex(CHUNK * 2);
        let this = self.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let this = this.clone();
                async move { Ok::<_, Infallible>(answer(req, &this).await) }
            });
            // A gateway connection ends when the client drops it; nothing
            // to report beyond what the client side sees.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        std::future::ready(Ok(GatewayIo(TokioIo::new(client))))
    }
}

/// The client's end of a gateway pipe. It says "proxied" so that hyper
/// sends the absolute `ftp://` URL, which the gateway needs whole.
#[derive(Debug)]
pub struct GatewayIo(TokioIo<DuplexStream>);

impl Connection for GatewayIo {
    fn connected(&self) -> Connected {
        Connected::new().proxy(true)
    }
}

impl hyper::rt::Read for GatewayIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for GatewayIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Why an FTP request got no file: each becomes one HTTP status.
#[derive(Debug, thiserror::Error)]
enum GatewayError {
    /// The request is not a GET or HEAD of an `ftp://` URL.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The connection guard or the name lookup refused the host.
    #[error("{0}")]
    Resolve(#[from] crate::ours::ResolveError),
    /// No control connection could be made.
    #[error("cannot connect to the FTP server {target}: {source}")]
    Connect {
        /// `host:port` as in the URL.
        target: String,
        /// What the connection attempt said.
        source: FtpError,
    },
    /// The server refused the login (the reply, never the password).
    #[error("the FTP server {target} refused the login of {user:?}: {reply}")]
    Login {
        /// `host:port` as in the URL.
        target: String,
        /// The user name tried.
        user: String,
        /// The server's reply.
        reply: String,
    },
    /// The server has no such file or directory (550).
    #[error("no such file on the FTP server: {0}")]
    NotFound(String),
    /// Any other failure of the FTP conversation.
    #[error("FTP error on {path}: {source}")]
    Protocol {
        /// The path asked for.
        path: String,
        /// The failure.
        source: FtpError,
    },
}

impl GatewayError {
    fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::NOT_IMPLEMENTED,
            GatewayError::Resolve(crate::ours::ResolveError::SelfTarget(_)) => {
                StatusCode::FORBIDDEN
            }
            GatewayError::Resolve(crate::ours::ResolveError::TimedOut { .. }) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Answers one gateway request; every failure is a plain-text status.
async fn answer(req: Request<Incoming>, conn: &FtpConnector) -> Response<GatewayBody> {
    match serve(&req, conn).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::info!(target: "cistern::fetch", url = %req.uri(), "ftp: {e}");
            let mut resp = Response::new(full(format!("{e}\n")));
            *resp.status_mut() = e.status();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
    }
}

fn full(text: impl Into<Bytes>) -> GatewayBody {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// User and password from `Authorization: Basic` (the URL's credentials,
/// moved there by [`crate::credentials`]), else the anonymous login.
fn login_of(req: &Request<Incoming>) -> (String, String) {
    let basic = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    match basic.as_deref().and_then(|b| b.split_once(':')) {
        Some((user, password)) => (user.to_owned(), password.to_owned()),
        None => ("anonymous".to_owned(), "cistern@".to_owned()),
    }
}

/// The decoded path of an `ftp://` URL (`%xx` escapes undone).
fn ftp_path(uri: &Uri) -> String {
    let raw = uri.path().as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    let path = String::from_utf8_lossy(&out).into_owned();
    if path.is_empty() {
        "/".to_owned()
    } else {
        path
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Opens the control connection (guarded like every upstream connection,
/// the data connections too), logs in and switches to binary.
async fn open(
    conn: &FtpConnector,
    host: &str,
    port: u16,
    user: &str,
    password: &str,
) -> Result<Ftp, GatewayError> {
    let target = format!("{host}:{port}");
    let addrs = conn.own.resolve(host, port, conn.connect_timeout).await?;
    let mut last = None;
    let mut ftp = None;
    for addr in addrs {
        match Ftp::connect_timeout(addr, conn.connect_timeout).await {
            Ok(f) => {
                ftp = Some(f);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(ftp) = ftp else {
        return Err(GatewayError::Connect {
            target,
            source: last.unwrap_or(FtpError::BadResponse),
        });
    };
    let own = conn.own.clone();
    let timeout = conn.connect_timeout;
    let mut ftp = ftp.passive_stream_builder(move |addr: SocketAddr| {
        let own = own.clone();
        Box::pin(async move {
            if let Some(ours) = own.reached_by(addr) {
                return Err(FtpError::ConnectionError(std::io::Error::other(format!(
                    "the FTP server's data address {addr} is Cistern's own {} listener",
                    ours.kind
                ))));
            }
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(r) => r.map_err(FtpError::ConnectionError),
                Err(_) => Err(FtpError::ConnectionError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "data connection timed out",
                ))),
            }
        })
    });
    // The data connection goes to the control connection's peer, whatever
    // address the PASV reply names: a server cannot send Cistern elsewhere.
    ftp.set_passive_nat_workaround(true);
    if let Err(e) = ftp.login(user, password).await {
        let reply = match &e {
            FtpError::UnexpectedResponse(r) => r.to_string(),
            other => other.to_string(),
        };
        return Err(GatewayError::Login {
            target,
            user: user.to_owned(),
            reply: reply.trim().to_owned(),
        });
    }
    ftp.transfer_type(FileType::Binary)
        .await
        .map_err(|source| GatewayError::Protocol {
            path: "/".to_owned(),
            source,
        })?;
    Ok(ftp)
}

/// Whether `e` is the server's "no such file" (550).
fn unavailable(e: &FtpError) -> bool {
    matches!(e, FtpError::UnexpectedResponse(r) if r.status == Status::FileUnavailable)
}

async fn serve(
    req: &Request<Incoming>,
    conn: &FtpConnector,
) -> Result<Response<GatewayBody>, GatewayError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Err(GatewayError::BadRequest(
                "only GET and HEAD of ftp:// URLs are served",
            ));
        }
    };
    let uri = req.uri();
    let host = uri
        .host()
        .ok_or(GatewayError::BadRequest("the ftp:// URL has no host"))?;
    let port = uri.port_u16().unwrap_or(FTP_PORT);
    let (user, password) = login_of(req);
    let path = ftp_path(uri);
    let mut ftp = open(conn, host, port, &user, &password).await?;
    let protocol = |path: &str| {
        let path = path.to_owned();
        move |source| GatewayError::Protocol { path, source }
    };

    if path.ends_with('/') {
        let resp = directory(&mut ftp, &path, head).await;
        let _ = ftp.quit().await;
        return resp;
    }
    let size = match ftp.size(&path).await {
        Ok(size) => size as u64,
        Err(e) if unavailable(&e) => {
            // Not a file: a directory named without its slash is sent to
            // its slashed URL, so the index's relative links resolve.
            let is_dir = ftp.cwd(&path).await.is_ok();
            let _ = ftp.quit().await;
            if !is_dir {
                return Err(GatewayError::NotFound(path));
            }
            let mut resp = Response::new(full(""));
            *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
            let location = format!("{}/", uri.path());
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return Ok(resp);
        }
        Err(e) => return Err(protocol(&path)(e)),
    };
    // MDTM is optional (RFC 3659): without it the file has no validator.
    let modified = ftp.mdtm(&path).await.ok().map(|t| {
        let secs = t.and_utc().timestamp().max(0) as u64;
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    });
    let last_modified = modified.map(httpdate::fmt_http_date);

    if let (Some(modified), Some(since)) = (modified, header_date(req, header::IF_MODIFIED_SINCE))
        && modified <= since
    {
        let _ = ftp.quit().await;
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        set_validator(&mut resp, last_modified.as_deref());
        return Ok(resp);
    }

    // `Range: bytes=N-` with an `If-Range` naming this very version (what
    // the fill engine sends to resume a partial) is served with REST.
    let from = resume_from(req, last_modified.as_deref()).filter(|n| *n > 0 && *n < size);
    let mut resp = Response::new(full(""));
    if let Some(from) = from {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let range = format!("bytes {from}-{}/{size}", size - 1);
        if let Ok(v) = HeaderValue::from_str(&range) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    let length = size - from.unwrap_or(0);
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    set_validator(&mut resp, last_modified.as_deref());
    if head {
        let _ = ftp.quit().await;
        return Ok(resp);
    }
    if let Some(from) = from {
        ftp.resume_transfer(from as usize)
            .await
            .map_err(protocol(&path))?;
    }
    let transfer = match ftp.retr_as_stream(&path).await {
        Ok(t) => t,
        Err(e) if unavailable(&e) => return Err(GatewayError::NotFound(path)),
        Err(e) => return Err(protocol(&path)(e)),
    };
    *resp.body_mut() = stream_body(ftp, transfer, length);
    Ok(resp)
}

/// The file's bytes as a body: read in chunks by a task that ends the
/// transfer and the session when the last byte is out. A transfer cut
/// short is a body error, which the fill engine resumes (with REST).
fn stream_body(
    mut ftp: Ftp,
    mut transfer: suppaftp::tokio::TransferStream<AsyncNoTlsStream>,
    length: u64,
) -> GatewayBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut left = length;
        // One buffer, split off as each chunk goes: no allocation per
        // chunk once it has grown.
        let mut buf = bytes::BytesMut::with_capacity(CHUNK);
        while left > 0 {
            buf.reserve(CHUNK);
            match transfer.read_buf(&mut buf).await {
                Ok(0) => {
                    // The bytes before the cut must reach the fill (they
                    // are what it resumes from). The gateway's HTTP server
                    // drops a response's unflushed bytes when its body
                    // fails, so the failure waits until the chunks are
                    // taken and the server has had a turn to flush them.
                    let drained = tokio::time::timeout(Duration::from_secs(5), async {
                        while tx.capacity() < tx.max_capacity() {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    });
                    let _ = drained.await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("the FTP transfer ended {left} bytes short"),
                        )))
                        .await;
                    return;
                }
                Ok(n) => {
                    left = left.saturating_sub(n as u64);
                    let chunk = buf.split().freeze();
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        // The reader went away: the transfer is dropped.
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let _ = transfer.finish().await;
        let _ = ftp.quit().await;
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    StreamBody::new(frames).boxed_unsync()
}

fn set_validator(resp: &mut Response<GatewayBody>, last_modified: Option<&str>) {
    if let Some(v) = last_modified.and_then(|v| HeaderValue::from_str(v).ok()) {
        resp.headers_mut().insert(header::LAST_MODIFIED, v);
    }
}

fn header_date(req: &Request<Incoming>, name: header::HeaderName) -> Option<SystemTime> {
    let text = req.headers().get(name)?.to_str().ok()?;
    httpdate::parse_http_date(text).ok()
}

/// The `N` of `Range: bytes=N-` when `If-Range` is absent or names the
/// file's current `Last-Modified`; any other range is answered whole.
fn resume_from(req: &Request<Incoming>, last_modified: Option<&str>) -> Option<u64> {
    let range = req.headers().get(header::RANGE)?.to_str().ok()?;
    let from = range.strip_prefix("bytes=")?.strip_suffix('-')?;
    let from = from.trim().parse::<u64>().ok()?;
    match req.headers().get(header::IF_RANGE) {
        None => Some(from),
        Some(v) => (Some(v.to_str().ok()?) == last_modified).then_some(from),
    }
}

/// A directory (`path` ends in `/`) as a small HTML index of its entries.
async fn directory(
    ftp: &mut Ftp,
    path: &str,
    head: bool,
) -> Result<Response<GatewayBody>, GatewayError> {
    match ftp.cwd(path).await {
        Ok(()) => {}
        Err(e) if unavailable(&e) => return Err(GatewayError::NotFound(path.to_owned())),
        Err(source) => {
            return Err(GatewayError::Protocol {
                path: path.to_owned(),
                source,
            });
        }
    }
    // MLSD says which entries are directories; NLST is the fallback of
    // servers without it (RFC 3659 is optional).
    let entries: Vec<(String, bool)> = match ftp.mlsd(None).await {
        Ok(lines) => lines.iter().filter_map(|l| mlsd_entry(l)).collect(),
        Err(_) => ftp
            .nlst(None)
            .await
            .map_err(|source| GatewayError::Protocol {
                path: path.to_owned(),
                source,
            })?
            .into_iter()
            .map(|n| (n.rsplit('/').next().unwrap_or(&n).to_owned(), false))
            .collect(),
    };
    let html = index_html(path, entries);
    let mut resp = Response::new(full(if head { String::new() } else { html.clone() }));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(html.len()));
    Ok(resp)
}

/// One MLSD line (`type=file;size=3; name`): the name and whether it is a
/// directory; the current and parent directory entries are left out.
fn mlsd_entry(line: &str) -> Option<(String, bool)> {
    let (facts, name) = line.split_once(' ')?;
    let kind = facts
        .split(';')
        .find_map(|f| {
            f.split_once('=')
                .filter(|(k, _)| k.eq_ignore_ascii_case("type"))
        })
        .map(|(_, v)| v.to_ascii_lowercase())?;
    match kind.as_str() {
        "cdir" | "pdir" => None,
        "dir" => Some((name.to_owned(), true)),
        _ => Some((name.to_owned(), false)),
    }
}

/// The HTML index: names sorted, directories with a trailing slash, every
/// name escaped for HTML and percent-encoded in its link.
fn index_html(path: &str, mut entries: Vec<(String, bool)>) -> String {
    entries.sort();
    let title = html_escape(path);
    let mut out = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}</title></head>\n<body><h1>Index of {title}</h1>\n<ul>\n"
    );
    if path != "/" {
        out.push_str("<li><a href=\"../\">../</a></li>\n");
    }
    for (name, dir) in &entries {
        let slash = if *dir { "/" } else { "" };
        out.push_str(&format!(
            "<li><a href=\"{}{slash}\">{}{slash}</a></li>\n",
            html_escape(&href_encode(name)),
            html_escape(name)
        ));
    }
    out.push_str("</ul></body></html>\n");
    out
}

/// A name as one relative path segment: everything but unreserved
/// characters percent-encoded, so `#`, `?`, `:` and spaces stay in the name.
fn href_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_escapes_names() {
        let html = index_html(
            "/pub/",
            vec![
                ("a<b>&\"c\".txt".to_owned(), false),
                ("sub dir".to_owned(), true),
            ],
        );
        assert!(html.contains("href=\"a%3Cb%3E%26%22c%22.txt\""), "{html}");
        assert!(
            html.contains(">a&lt;b&gt;&amp;&quot;c&quot;.txt<"),
            "{html}"
        );
        assert!(html.contains("href=\"sub%20dir/\">sub dir/<"), "{html}");
        assert!(!html.contains("<b>"));
    }

    #[test]
    fn mlsd_lines() {
        assert_eq!(
            mlsd_entry("type=file;size=3;modify=20240101000000; a.bin"),
            Some(("a.bin".to_owned(), false))
        );
        assert_eq!(
            mlsd_entry("type=dir;modify=1; with space"),
            Some(("with space".to_owned(), true))
        );
        assert_eq!(mlsd_entry("type=cdir; ."), None);
    }
}
