//! The HTTP/1.1 fast lane of the plaintext listeners.
//!
//! hyper writes a body only from buffers it is given, so a hit on a large
//! replica would cost a positioned read into user memory and a copy back
//! into the socket for every chunk. The lane reads plaintext HTTP/1.x
//! request heads itself; a `GET` or `HEAD` without a body goes through the
//! same pipeline as any request (`Proxy::handle`), and the lane writes the
//! answer: the head, then a complete replica's bytes straight from the
//! page cache with `sendfile(2)` (see [`FileSlice`]), or any other body
//! frame by frame as hyper would frame it.
//!
//! Anything else (HTTP/2's preface, a request with a body, an upgrade,
//! `Expect`, a head that does not parse or is too large) is handed to
//! hyper together with the bytes already read, and hyper keeps the
//! connection from then on, so every rule hyper enforces still applies to
//! what the lane does not take.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Connection, Phase, reached};
use crate::body::ClientBody;
use crate::gate::ConnPermit;
use crate::observe::accesslog::LoggedBody;
use crate::pipeline::ConnInfo;
use crate::serve::{self, FileSlice, FillSlice};

/// The most bytes of one request head the lane reads before it leaves the
/// request to hyper (whose own limits then answer it).
const MAX_HEAD: usize = 16 * 1024;
/// The most header fields the lane parses; more go to hyper.
const MAX_HEADERS: usize = 64;
/// Bytes handed to one `sendfile` call.
const SENDFILE_STEP: usize = 4 * 1024 * 1024;

/// How the lane left a connection.
pub(super) enum Left {
    /// Closed: the client is gone, a timeout passed, the listener drains,
    /// or the response could not be written whole.
    Closed,
    /// The rest of the connection is hyper's, starting with these bytes.
    ToHyper {
        /// What was read and not consumed.
        read: Bytes,
        /// Whether the lane already answered a request on it.
        served: bool,
    },
}

/// A request head as the lane takes it. Lives on the stack for one parse;
/// boxing the request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// A request the lane serves; `usize` is the head's length in bytes.
    Ours(Request<ClientBody>, usize, KeepAlive),
    /// More bytes are needed.
    Partial,
    /// Not for the lane: hyper decides.
    Theirs,
}

/// What the client asked of the connection after this request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeepAlive {
    Yes,
    No,
}

impl Connection {
    /// Serves requests on `stream` while they are the lane's to serve.
    pub(super) async fn lane(&mut self, stream: &TcpStream, info: ConnInfo) -> Left {
        let config = self.proxy.snapshot().config.clone();
        let (idle, send) = (config.timeouts.idle, config.timeouts.send);
        drop(config);
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = Vec::with_capacity(1024);
        let mut scratch = vec![0u8; 4096];
        let mut served = false;
        // One timer and one wait for the drain for the whole connection,
        // not one of each per request: a timer pushed later is not moved
        // in the wheel, and the wait stays registered with the phase, so
        // waiting for the next request registers nothing.
        let mut idle_timer =
            std::pin::pin!(tokio::time::sleep_until(Instant::from_std(self.first_by)));
        let mut phase = self.phase.clone();
        let mut drained = std::pin::pin!(reached(&mut phase, Phase::Draining));
        loop {
            let (req, used, keep) = loop {
                match parse(&buf) {
                    Head::Ours(req, used, keep) => break (req, used, keep),
                    Head::Theirs => return to_hyper(buf, served),
                    Head::Partial if buf.len() >= MAX_HEAD => return to_hyper(buf, served),
                    Head::Partial => {}
                }
                tokio::select! {
                    biased;
                    _ = &mut idle_timer => {
                        if !served {
                            self.proxy.connections().closed_silent();
                        }
                        tracing::debug!(target: "cistern::server", client = %self.client, "no whole request head within the idle timeout; closing");
                        return Left::Closed;
                    }
                    _ = &mut drained => return Left::Closed,
                    r = read_some(stream, &mut buf, &mut scratch) => match r {
                        Ok(0) if buf.is_empty() => return Left::Closed,
                        // A head cut short: hyper says what it says of those.
                        Ok(0) => return to_hyper(buf, served),
                        Ok(_) => {}
                        Err(_) => return Left::Closed,
                    },
                }
            };
            buf.advance(used);
            served = true;
            let method = req.method().clone();
            let version = req.version();
            // Pinned where it is built: the pipeline's future is large,
            // and `select!` would otherwise move it (a `memcpy` of all of
            // it) into its own state.
            let handled = std::pin::pin!(self.proxy.handle(req, info));
            // `biased`, the work first: the phase is looked at only while
            // the work waits, so a prompt answer costs no random draw and
            // no waiter registered on the phase.
            let resp = tokio::select! {
                biased;
                resp = handled => resp,
                _ = reached(&mut self.phase, Phase::Closed) => return Left::Closed,
            };
            let written = std::pin::pin!(write_response(
                &mut out,
                resp,
                &method,
                version,
                keep,
                Writer {
                    stream,
                    send,
                    permit: &self.permit,
                },
            ));
            let again = tokio::select! {
                biased;
                r = written => r,
                _ = reached(&mut self.phase, Phase::Closed) => return Left::Closed,
            };
            match again {
                Ok(KeepAlive::Yes) => {}
                Ok(KeepAlive::No) | Err(_) => return Left::Closed,
            }
            if *self.phase.borrow() >= Phase::Draining {
                return Left::Closed;
            }
            idle_timer.as_mut().reset(Instant::now() + idle);
        }
    }
}

fn to_hyper(buf: BytesMut, served: bool) -> Left {
    Left::ToHyper {
        read: buf.freeze(),
        served,
    }
}

/// Reads what the socket has into `buf`.
///
/// A read that returns less than the room it was given emptied the
/// socket's receive queue, so the readiness it used is cleared then and
/// there, as nginx does: the next wait goes straight to the reactor
/// instead of first paying a `recv` that can only say `EAGAIN`. Bytes
/// that arrive after the read are a new readiness event, which clearing
/// the one the read used never hides.
///
/// Bytes are received into `scratch` and copied (a request head is
/// small): reading into `buf`'s spare room would take `unsafe`, and
/// zeroing that room first a memset per read.
async fn read_some(
    stream: &TcpStream,
    buf: &mut BytesMut,
    scratch: &mut [u8],
) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        let mut got = None;
        let tried = stream.try_io(Interest::READABLE, || {
            let n = loop {
                match rustix::net::recv(stream, &mut *scratch, rustix::net::RecvFlags::empty()) {
                    Ok((_, n)) => break n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(io::Error::from(e)),
                }
            };
            got = Some(n);
            if n > 0 && n < scratch.len() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if let Some(n) = got {
            buf.extend_from_slice(&scratch[..n]);
            return Ok(n);
        }
        match tried {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
            Ok(()) => return Ok(0),
        }
    }
}

/// Parses one request head from the start of `buf`.
fn parse(buf: &BytesMut) -> Head {
    if buf.is_empty() {
        return Head::Partial;
    }
    // Left uninitialised: httparse writes the fields it finds, and
    // zeroing all 64 first cost more than parsing a short head.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let used = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Theirs,
    };
    let method = match parsed.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Head::Theirs,
    };
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Head::Theirs,
    };
    let Some(target) = parsed.path else {
        return Head::Theirs;
    };
    // Origin form or absolute form; CONNECT's authority form and `*` are
    // not GET targets.
    if !(target.starts_with('/') || target.contains("://")) {
        return Head::Theirs;
    }
    // One copy of the head for everything the request keeps of it: its
    // target and header values are slices of that copy, not one
    // allocation each, and not slices of the connection's read buffer,
    // which whatever outlives the request (a fill keeping its headers)
    // would otherwise hold on to.
    let copy = Bytes::copy_from_slice(&buf[..used]);
    let Ok(uri) = Uri::from_maybe_shared(within(&copy, buf, target.as_bytes())) else {
        return Head::Theirs;
    };
    let mut req = Request::new(ClientBody::None);
    *req.method_mut() = method;
    *req.version_mut() = version;
    *req.uri_mut() = uri;
    let mut close = false;
    let mut keep_alive = false;
    let headers = req.headers_mut();
    headers.reserve(parsed.headers.len());
    for field in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Head::Theirs;
        };
        // A body, or a connection that turns into something else, is
        // hyper's to frame.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Head::Theirs;
        }
        let Ok(value) = HeaderValue::from_maybe_shared(within(&copy, buf, field.value)) else {
            return Head::Theirs;
        };
        if name == header::CONNECTION {
            for token in field.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.append(name, value);
    }
    let keep = match version {
        Version::HTTP_10 if keep_alive && !close => KeepAlive::Yes,
        Version::HTTP_10 => KeepAlive::No,
        _ if close => KeepAlive::No,
        _ => KeepAlive::Yes,
    };
    Head::Ours(req, used, keep)
}

/// The bytes of `copy` where `part` is in `original`, of which `copy` is
/// a copy of the start.
fn within(copy: &Bytes, original: &[u8], part: &[u8]) -> Bytes {
    let at = (part.as_ptr() as usize).wrapping_sub(original.as_ptr() as usize);
    copy.slice(at..at + part.len())
}

/// How the body of an answer is framed on the wire.
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked (HTTP/1.1, length unknown).
    Chunked,
    /// Until the connection closes (HTTP/1.0, length unknown).
    Close,
}

/// Writes `resp` as hyper's HTTP/1 server would; says whether the
/// connection may carry another request.
#[allow(clippy::too_many_arguments)]
async fn write_response(
    out: &mut Vec<u8>,
    resp: http::Response<LoggedBody>,
    method: &Method,
    version: Version,
    keep: KeepAlive,
    writer: Writer<'_>,
) -> io::Result<KeepAlive> {
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    let mut keep = keep;
    if let Some(v) = parts.headers.get(header::CONNECTION)
        && v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    {
        keep = KeepAlive::No;
    }
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut add_length = None;
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = announced {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        add_length = Some(n);
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        keep = KeepAlive::No;
        Framing::Close
    };

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        // A length or chunking from elsewhere is replaced by ours.
        if name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH
                && matches!(framing, Framing::Chunked | Framing::Close))
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = add_length {
        // Without `write!`: its formatting machinery cost more than the
        // rest of the head.
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(framing, Framing::Chunked) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if keep == KeepAlive::No && !parts.headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");

    // Taken out at once: its receiver is a place among a fill's readers,
    // which must not count this reader twice while the body streams.
    let fill = parts.extensions.remove::<FillSlice>().filter(|fill| {
        matches!(framing, Framing::Length(n) if fill.end - fill.start == n)
            && *method == Method::GET
    });
    match framing {
        Framing::None => {
            writer.write_all(&mut [IoSlice::new(out)]).await?;
            drop(body);
            Ok(keep)
        }
        Framing::Length(n) => {
            if let Some(slice) = parts.extensions.get::<FileSlice>()
                && slice.end - slice.start == n
                && *method == Method::GET
            {
                writer.write_head_more(out).await?;
                let sent = writer.send_file(slice).await;
                return sent_elsewhere(body, sent, keep);
            }
            if let Some(fill) = fill {
                // The slice's receiver is this reader's place among the
                // fill's readers; the body's own would count it twice.
                body.release_inner();
                writer.write_head_more(out).await?;
                let sent = writer.send_fill(fill).await;
                return sent_elsewhere(body, sent, keep);
            }
            let mut head = Some(&out[..]);
            let mut sent = 0u64;
            while let Some(data) = next_data(&mut body).await? {
                sent += data.len() as u64;
                if sent > n {
                    return Err(io::Error::other("body longer than its Content-Length"));
                }
                match head.take() {
                    Some(h) => {
                        writer
                            .write_all(&mut [IoSlice::new(h), IoSlice::new(&data)])
                            .await?
                    }
                    None => writer.write_all(&mut [IoSlice::new(&data)]).await?,
                }
            }
            if let Some(h) = head {
                writer.write_all(&mut [IoSlice::new(h)]).await?;
            }
            if sent < n {
                return Err(io::Error::other("body shorter than its Content-Length"));
            }
            Ok(keep)
        }
        Framing::Chunked | Framing::Close => {
            let chunked = matches!(framing, Framing::Chunked);
            let mut head = Some(&out[..]);
            let mut size = [0u8; 18];
            while let Some(data) = next_data(&mut body).await? {
                let prefix: &[u8] = if chunked {
                    chunk_size(&mut size, data.len())
                } else {
                    &[]
                };
                let suffix: &[u8] = if chunked { b"\r\n" } else { &[] };
                let h = head.take().unwrap_or(&[]);
                writer
                    .write_all(&mut [
                        IoSlice::new(h),
                        IoSlice::new(prefix),
                        IoSlice::new(&data),
                        IoSlice::new(suffix),
                    ])
                    .await?;
            }
            let last: &[u8] = if chunked { b"0\r\n\r\n" } else { &[] };
            let h = head.take().unwrap_or(&[]);
            writer
                .write_all(&mut [IoSlice::new(h), IoSlice::new(last)])
                .await?;
            Ok(keep)
        }
    }
}

/// Logs a body the lane sent with `sendfile` (ending with `Ok` only once
/// every byte went) and says what becomes of the connection.
fn sent_elsewhere(
    body: LoggedBody,
    (sent, result): (u64, Result<(), SendFileError>),
    keep: KeepAlive,
) -> io::Result<KeepAlive> {
    let failed = matches!(result, Err(SendFileError::Short | SendFileError::Fill(_)));
    body.sent_elsewhere(sent, result.is_ok(), failed);
    match result {
        Ok(()) => Ok(keep),
        Err(SendFileError::Short) => Err(io::Error::other("the file ended before its length")),
        Err(SendFileError::Fill(why)) => Err(io::Error::other(why)),
        Err(SendFileError::Io(e)) => Err(e),
    }
}

/// The body's next non-empty data frame. Trailers are dropped, as hyper
/// drops them for a client that did not send `TE: trailers`.
async fn next_data(body: &mut LoggedBody) -> io::Result<Option<Bytes>> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(io::Error::other)?.into_data()
            && !data.is_empty()
        {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// `len` in hex followed by CRLF, in `buf`.
fn chunk_size(buf: &mut [u8; 18], len: usize) -> &[u8] {
    use std::io::Write as _;
    let mut cursor = io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{len:x}\r\n");
    let n = cursor.position() as usize;
    &buf[..n]
}

/// How long a `sendfile` step waits on the blocking pool for a full
/// socket to take more before it leaves the wait to the reactor: a client
/// that drains as fast as it is fed is served by one thread hop per
/// [`SENDFILE_STEP`], not one per socket-full; a slower one holds no
/// thread while it makes room.
const SENDFILE_LINGER: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 0,
    tv_nsec: 2_000_000,
};

/// The longest a `sendfile` step keeps its blocking-pool thread: a client
/// that takes a little at a time, but never enough to let the step finish,
/// must not hold a thread that hits need for opening their files.
const SENDFILE_STEP_TIME: std::time::Duration = std::time::Duration::from_millis(20);

/// How one [`send_step`] ended.
enum StepEnd {
    /// All the bytes asked for went.
    Done,
    /// The socket stayed full for [`SENDFILE_LINGER`], or was full when
    /// the step had had its [`SENDFILE_STEP_TIME`].
    Full,
    /// The file ended first.
    Short,
}

/// Runs on the blocking pool: `sendfile`s up to `want` bytes of `file`
/// from `at`, waiting (at most [`SENDFILE_LINGER`] each time, and for
/// [`SENDFILE_STEP_TIME`] in all) for room when the socket is full. Says
/// how many bytes went, and why it stopped.
fn send_step(
    socket: &OwnedFd,
    file: &File,
    at: u64,
    want: usize,
) -> (u64, Result<StepEnd, rustix::io::Errno>) {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut offset = at;
    let mut sent = 0usize;
    let started = std::time::Instant::now();
    while sent < want {
        match rustix::fs::sendfile(socket, file, Some(&mut offset), want - sent) {
            Ok(0) => return (sent as u64, Ok(StepEnd::Short)),
            Ok(n) => sent += n,
            Err(rustix::io::Errno::AGAIN) => {
                if started.elapsed() >= SENDFILE_STEP_TIME {
                    return (sent as u64, Ok(StepEnd::Full));
                }
                let mut fds = [PollFd::new(socket, PollFlags::OUT)];
                match poll(&mut fds, Some(&SENDFILE_LINGER)) {
                    Ok(0) => return (sent as u64, Ok(StepEnd::Full)),
                    // Room, or an error `sendfile` will report.
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return (sent as u64, Err(e)),
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return (sent as u64, Err(e)),
        }
    }
    (sent as u64, Ok(StepEnd::Done))
}

/// The socket's duplicate that `sendfile` writes to.
type SendSocket = AsyncFd<Arc<OwnedFd>>;

/// Why a `sendfile` transfer stopped early.
enum SendFileError {
    /// The file ended before its metadata's length: changed behind
    /// Cistern's back (or a fill ended short of its announced length).
    Short,
    /// The fill being followed failed.
    Fill(String),
    /// The client went away, or took nothing for the send timeout.
    Io(io::Error),
}

/// Writes on the socket, closing (with `TimedOut`) a connection whose
/// client takes nothing for the send timeout, like `SendDeadline` does for
/// hyper's writes.
struct Writer<'a> {
    stream: &'a TcpStream,
    send: Duration,
    /// The connection's place under the caps, where a stall is counted.
    permit: &'a ConnPermit,
}

impl Writer<'_> {
    /// Waits until the socket has room, for at most the send timeout.
    async fn room(&self) -> io::Result<()> {
        match tokio::time::timeout(self.send, self.stream.writable()).await {
            Ok(r) => r,
            Err(_) => Err(self.stalled()),
        }
    }

    /// Counts a client that took nothing for the send timeout, and says so.
    fn stalled(&self) -> io::Error {
        self.permit.closed_stalled();
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no data for {:?} (timeouts {{ send }})",
                self.send
            ),
        )
    }

    async fn write_all(&self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.stream.try_write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.room().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes a head that the body's first bytes follow at once: with
    /// `MSG_MORE`, so both leave in one segment where they fit.
    async fn write_head_more(&self, mut head: &[u8]) -> io::Result<()> {
        while !head.is_empty() {
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::net::send(self.stream, head, rustix::net::SendFlags::MORE)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(n) => head = &head[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.room().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A duplicate of the socket's descriptor for `sendfile` on the
    /// blocking pool (a connection dropped while a call runs never leaves
    /// it writing to a reused number), registered with the reactor on its
    /// own so its readiness can be cleared race-free (see
    /// [`Writer::send_range`]).
    fn socket(&self) -> io::Result<SendSocket> {
        let fd = Arc::new(self.stream.as_fd().try_clone_to_owned()?);
        // Deprecated because an arbitrary `AsRawFd` may close or swap its
        // descriptor under the registration; an `Arc<OwnedFd>` can do
        // neither, and the replacement (`register_with_interest`) is
        // `unsafe`, which this crate forbids.
        #[allow(deprecated)]
        AsyncFd::with_interest(fd, Interest::WRITABLE)
    }

    /// Sends a complete replica's `slice` from the page cache.
    async fn send_file(&self, slice: &FileSlice) -> (u64, Result<(), SendFileError>) {
        match self.socket() {
            Ok(socket) => {
                self.send_range(&socket, &slice.file, slice.start, slice.end)
                    .await
            }
            Err(e) => (0, Err(SendFileError::Io(e))),
        }
    }

    /// Sends a fill's `slice` as the fill writes it, under the rule its
    /// body follows ([`serve::readable`]): the last byte waits for the
    /// commit, and a fill that fails fails the transfer.
    async fn send_fill(&self, slice: FillSlice) -> (u64, Result<(), SendFileError>) {
        let socket = match self.socket() {
            Ok(socket) => socket,
            Err(e) => return (0, Err(SendFileError::Io(e))),
        };
        let mut progress = slice.progress;
        let mut at = slice.start;
        loop {
            let step = serve::readable(&progress.borrow_and_update());
            let (available, complete) = match step {
                Ok(step) => step,
                Err(why) => return (at - slice.start, Err(SendFileError::Fill(why))),
            };
            let limit = available.min(slice.end);
            if at < limit {
                let (n, sent) = self.send_range(&socket, &slice.file, at, limit).await;
                at += n;
                if let Err(e) = sent {
                    return (at - slice.start, Err(e));
                }
                continue;
            }
            if at >= slice.end {
                return (at - slice.start, Ok(()));
            }
            if complete {
                return (at - slice.start, Err(SendFileError::Short));
            }
            if progress.changed().await.is_err() {
                return (
                    at - slice.start,
                    Err(SendFileError::Fill("fill vanished".into())),
                );
            }
        }
    }

    /// Sends `file`'s bytes `from..to`; says how many went. Each
    /// `sendfile` call runs on the blocking pool, since a page not in the
    /// cache means a disk read.
    ///
    /// The readiness a call's `EAGAIN` clears is the one seen *before* the
    /// call: room the client made while the call ran on another thread
    /// marks the socket ready again, and that mark survives. Clearing after
    /// the fact (the socket's own `try_io`) dropped exactly those wake-ups,
    /// and a client that had drained everything meanwhile sent no more, so
    /// large hits sat idle between ACKs (4 × 256 MiB: 278 MB/s with the
    /// server 4 % busy).
    async fn send_range(
        &self,
        socket: &SendSocket,
        file: &Arc<File>,
        from: u64,
        to: u64,
    ) -> (u64, Result<(), SendFileError>) {
        let mut at = from;
        while at < to {
            let mut ready = match tokio::time::timeout(self.send, socket.writable()).await {
                Ok(Ok(ready)) => ready,
                Ok(Err(e)) => return (at - from, Err(SendFileError::Io(e))),
                Err(_) => return (at - from, Err(SendFileError::Io(self.stalled()))),
            };
            let want = ((to - at) as usize).min(SENDFILE_STEP);
            let (file, fd) = (file.clone(), Arc::clone(socket.get_ref()));
            let step = tokio::task::spawn_blocking(move || send_step(&fd, &file, at, want)).await;
            match step {
                Ok((n, end)) => {
                    at += n;
                    match end {
                        Ok(StepEnd::Done) => {}
                        Ok(StepEnd::Full) => ready.clear_ready(),
                        Ok(StepEnd::Short) => return (at - from, Err(SendFileError::Short)),
                        Err(e) => return (at - from, Err(SendFileError::Io(e.into()))),
                    }
                }
                Err(e) => return (at - from, Err(SendFileError::Io(io::Error::other(e)))),
            }
        }
        (at - from, Ok(()))
    }
}

/// Appends the current time as an HTTP date (RFC 9110 §5.6.7), formatted
/// once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// A connection's I/O that first yields bytes already read from it: what
/// the lane read before it handed the connection to hyper.
pub(super) struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    /// `io`, with `read` in front of what it reads next.
    pub(super) fn new(read: Bytes, io: I) -> Rewind<I> {
        Rewind { read, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse(&BytesMut::from(text.as_bytes()))
    }

    #[test]
    fn plain_gets_and_heads_are_the_lanes() {
        match head("GET /a/b?c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nGET") {
            Head::Ours(req, used, keep) => {
                assert_eq!(req.uri(), "/a/b?c");
                assert_eq!(req.headers()["host"], "x");
                assert_eq!(used, 45);
                assert!(keep == KeepAlive::Yes);
            }
            _ => panic!("a plain GET is the lane's"),
        }
        match head("HEAD http://h/x HTTP/1.0\r\n\r\n") {
            Head::Ours(req, _, keep) => {
                assert_eq!(req.method(), Method::HEAD);
                assert_eq!(req.version(), Version::HTTP_10);
                assert!(keep == KeepAlive::No);
            }
            _ => panic!("an absolute-form HEAD is the lane's"),
        }
        match head("GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n") {
            Head::Ours(_, _, keep) => assert!(keep == KeepAlive::No),
            _ => panic!(),
        }
    }

    #[test]
    fn bodies_upgrades_and_oddities_are_hypers() {
        for text in [
            "POST / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(matches!(head(text), Head::Theirs), "{text:?}");
        }
        assert!(matches!(head("GET / HTTP/1.1\r\nHost"), Head::Partial));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert!(matches!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Head::Theirs
        ));
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size(&mut b, 255), b"ff\r\n");
        assert_eq!(chunk_size(&mut b, 1), b"1\r\n");
    }
}
