//! One access-log line per request, written when the response body ends
//! (or is abandoned), so the line tells the bytes really sent.

use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};

use super::{CacheOutcome, Metrics};
use crate::body::{BoxError, ProxyBody};
use crate::credentials::Redacted;

/// The fields of one access-log line.
#[derive(Debug)]
pub struct AccessRecord {
    /// Client address.
    pub client: SocketAddr,
    /// Request method.
    pub method: Method,
    /// Request URL as received, without any userinfo.
    pub url: http::Uri,
    /// Response status.
    pub status: StatusCode,
    /// Cache outcome.
    pub outcome: CacheOutcome,
    /// When the request arrived.
    pub started: Instant,
    /// Request and response headers, when `-v` asked for them (logged
    /// with secrets redacted).
    pub headers: Option<(HeaderMap, HeaderMap)>,
    /// The body length announced in `Content-Length`: a server stops
    /// polling a body once that many bytes went out, so reaching it means
    /// the transfer completed.
    pub expected: Option<u64>,
}

/// Wraps a response body; logs the record when the body is done or dropped.
pub struct LoggedBody {
    inner: ProxyBody,
    metrics: Arc<Metrics>,
    bytes: u64,
    failed: bool,
    record: Option<AccessRecord>,
}

impl LoggedBody {
    /// Wraps `inner` so that `record` is logged at its end; body bytes are
    /// counted in `metrics` as they go. Not boxed again: `inner` already is,
    /// and the server takes this type as it is.
    pub fn wrap(inner: ProxyBody, record: AccessRecord, metrics: Arc<Metrics>) -> LoggedBody {
        LoggedBody {
            inner,
            metrics,
            bytes: 0,
            failed: false,
            record: Some(record),
        }
    }

    /// The connection is about to send this body's bytes itself: drops
    /// the body it wraps now, and with it what that holds (a reader's place
    /// among a fill's readers, which the admin counts), keeping the record.
    pub fn release_inner(&mut self) {
        self.inner = crate::body::empty();
    }

    /// The connection wrote this body's bytes itself (the fast lane's
    /// `sendfile`) rather than polling it: counts the `bytes` sent and logs
    /// the line as done, failed (the file was short) or aborted (the client
    /// went away).
    pub fn sent_elsewhere(mut self, bytes: u64, complete: bool, failed: bool) {
        self.bytes = bytes;
        self.metrics.client_bytes(bytes);
        self.failed = failed;
        self.emit(complete);
    }

    fn emit(&mut self, complete: bool) {
        let Some(r) = self.record.take() else { return };
        if !tracing::enabled!(target: "cistern::access", tracing::Level::INFO) {
            return;
        }
        let elapsed = r.started.elapsed();
        let end = if self.failed {
            "failed"
        } else if complete {
            "done"
        } else {
            "aborted"
        };
        // Written field by field, as bytes: `format!` machinery (padding,
        // `Display` of the address and the float) cost more than the rest
        // of a hit, and `String::push` encodes each `char`. Into a buffer
        // this thread keeps, so a line allocates nothing.
        LINE.with(|cell| {
            // Borrowed already only if a line were written while writing
            // one; then a buffer of its own.
            let mut kept = cell.try_borrow_mut().ok();
            let mut own = Vec::new();
            let line = kept.as_deref_mut().unwrap_or(&mut own);
            line.clear();
            self.push_line(line, &r, elapsed, end);
            writer::send(line);
            // A line with `-v`'s headers can be large; keep no more.
            line.shrink_to(4096);
        });
    }

    /// Appends the access line of `r` to `line`.
    fn push_line(&self, line: &mut Vec<u8>, r: &AccessRecord, elapsed: Duration, end: &str) {
        push_timestamp(line, SystemTime::now());
        line.extend_from_slice(b"  INFO cistern::access: ");
        push_addr(line, r.client);
        line.push(b' ');
        line.extend_from_slice(r.method.as_str().as_bytes());
        line.push(b' ');
        crate::request::push_uri_bytes(line, &r.url);
        line.push(b' ');
        let mut num = itoa::Buffer::new();
        line.extend_from_slice(num.format(r.status.as_u16()).as_bytes());
        line.push(b' ');
        line.extend_from_slice(num.format(self.bytes).as_bytes());
        line.push(b' ');
        line.extend_from_slice(r.outcome.as_str().as_bytes());
        line.push(b' ');
        push_millis(line, elapsed);
        line.extend_from_slice(b"ms ");
        line.extend_from_slice(end.as_bytes());
        if let Some((req, resp)) = &r.headers {
            let _ = write!(
                line,
                " request={:?} response={:?}",
                Redacted(req),
                Redacted(resp)
            );
        }
        line.push(b'\n');
    }
}

/// Appends `addr` as `Display` writes it.
fn push_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            let mut num = itoa::Buffer::new();
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(num.format(octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(num.format(v4.port()).as_bytes());
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Appends `d` in milliseconds with one decimal, rounded to the nearest.
fn push_millis(out: &mut Vec<u8>, d: std::time::Duration) {
    let tenths = (d.as_nanos() + 50_000) / 100_000;
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(num.format(tenths / 10).as_bytes());
    out.push(b'.');
    out.push(b'0' + (tenths % 10) as u8);
}

/// `n` as two digits (`n < 100`).
fn two(n: u64) -> [u8; 2] {
    [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]
}

/// The length of `YYYY-MM-DDTHH:MM:SS`.
const SECONDS_LEN: usize = 19;

thread_local! {
    /// This thread's line being written: its capacity is kept from one
    /// request to the next.
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The last second a line of this thread was stamped in, and its
    /// text: lines come many a second, the calendar changes once.
    static LAST_SECOND: std::cell::Cell<(u64, [u8; SECONDS_LEN])> =
        const { std::cell::Cell::new((u64::MAX, [0; SECONDS_LEN])) };
}

/// Appends an RFC 3339 UTC timestamp with microseconds, like the rest of
/// the log.
fn push_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (cached, text) = LAST_SECOND.get();
    if cached == secs {
        out.extend_from_slice(&text);
    } else {
        let from = out.len();
        push_seconds(out, secs);
        if let Ok(text) = <[u8; SECONDS_LEN]>::try_from(&out[from..]) {
            LAST_SECOND.set((secs, text));
        }
    }
    let micros = u64::from(d.subsec_micros());
    out.push(b'.');
    out.extend_from_slice(&two(micros / 10_000));
    out.extend_from_slice(&two(micros / 100 % 100));
    out.extend_from_slice(&two(micros % 100));
    out.push(b'Z');
}

/// Appends `YYYY-MM-DDTHH:MM:SS` of `secs` after 1970-01-01 UTC.
fn push_seconds(out: &mut Vec<u8>, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if (0..10_000).contains(&year) {
        let year = year as u64;
        out.extend_from_slice(&two(year / 100));
        out.extend_from_slice(&two(year % 100));
    } else {
        let _ = write!(out, "{year:04}");
    }
    out.push(b'-');
    out.extend_from_slice(&two(month as u64));
    out.push(b'-');
    out.extend_from_slice(&two(day as u64));
    out.push(b'T');
    out.extend_from_slice(&two(rem / 3600));
    out.push(b':');
    out.extend_from_slice(&two(rem % 3600 / 60));
    out.push(b':');
    out.extend_from_slice(&two(rem % 60));
}

/// Access lines (and `tracing`'s, through [`LogLines`]) go to standard
/// error through one writer thread: request threads never wait on the
/// write, and lines that arrive together are written with one system
/// call. A line is appended to one shared buffer under a short lock, not
/// sent as its own allocation: a line allocated on a request thread and
/// freed on the writer's cost more than the rest of writing it.
mod writer {
    use std::io::Write;
    use std::sync::mpsc::{SyncSender, sync_channel};
    use std::sync::{Condvar, Mutex, MutexGuard, Once, PoisonError};

    /// Bytes waiting beyond this are dropped, line by line (and counted in
    /// the next batch): a stalled log must not stall the proxy or grow
    /// without bound.
    const MAX_PENDING: usize = 8 * 1024 * 1024;
    /// A batch buffer larger than this after a burst is given back.
    const KEEP_CAPACITY: usize = 1024 * 1024;
    /// The longest [`flush`] waits for the writer.
    const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    /// What the request threads left for the writer.
    struct Pending {
        /// Whole lines, in the order they were logged.
        bytes: Vec<u8>,
        /// Lines dropped since the last batch.
        dropped: u64,
        /// Callers of [`flush`] waiting for the next write.
        flushes: Vec<SyncSender<()>>,
        /// The writer waits on [`WAKE`] for the first line.
        idle: bool,
    }

    static PENDING: Mutex<Pending> = Mutex::new(Pending {
        bytes: Vec::new(),
        dropped: 0,
        flushes: Vec::new(),
        idle: false,
    });
    static WAKE: Condvar = Condvar::new();
    static STARTED: Once = Once::new();

    fn pending() -> MutexGuard<'static, Pending> {
        STARTED.call_once(|| {
            std::thread::Builder::new()
                .name("cistern-log".into())
                .spawn(run)
                .expect("spawn the log writer");
        });
        // A panic while holding the lock leaves whole lines behind it.
        PENDING.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one line.
    pub fn send(line: &[u8]) {
        let wake = {
            let mut p = pending();
            if p.bytes.len() + line.len() > MAX_PENDING {
                p.dropped += 1;
                return;
            }
            p.bytes.extend_from_slice(line);
            std::mem::take(&mut p.idle)
        };
        if wake {
            WAKE.notify_one();
        }
    }

    /// Waits until every line queued so far is written, for at most
    /// [`FLUSH_WAIT`]: standard error stuck on a full pipe must not keep
    /// the process from exiting.
    pub fn flush() {
        let (tx, rx) = sync_channel(1);
        let wake = {
            let mut p = pending();
            p.flushes.push(tx);
            std::mem::take(&mut p.idle)
        };
        if wake {
            WAKE.notify_one();
        }
        let _ = rx.recv_timeout(FLUSH_WAIT);
    }

    fn run() {
        // Two buffers trade places: the request threads fill one while
        // this thread writes the other.
        let mut batch = Vec::with_capacity(64 * 1024);
        loop {
            let (dropped, flushes) = {
                let mut p = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
                while p.bytes.is_empty() && p.flushes.is_empty() && p.dropped == 0 {
                    p.idle = true;
                    p = WAKE.wait(p).unwrap_or_else(PoisonError::into_inner);
                }
                p.idle = false;
                std::mem::swap(&mut p.bytes, &mut batch);
                (
                    std::mem::take(&mut p.dropped),
                    std::mem::take(&mut p.flushes),
                )
            };
            if dropped > 0 {
                batch.extend_from_slice(
                    format!("cistern: {dropped} log lines dropped (log writer too slow)\n")
                        .as_bytes(),
                );
            }
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&batch);
            let _ = err.flush();
            drop(err);
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch = Vec::with_capacity(64 * 1024);
            }
            let flushed = !flushes.is_empty();
            for done in flushes {
                let _ = done.send(());
            }
            // Waking this thread for every line would cost a context switch
            // per request under load; letting lines gather for a moment
            // makes each write carry many of them.
            if !flushed {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Waits until every line logged so far is written (shutdown), for a few
/// seconds at most.
pub fn flush() {
    writer::flush();
}

/// The writer of the process's log for `tracing`: its events go through
/// the access log's buffer and writer thread, so a standard error stuck
/// on a full pipe (a log collector that stopped reading) stalls no
/// request thread; beyond the buffer's bound, lines are dropped and
/// counted, as access lines are. The two kinds keep their order.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogLines;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = EventText;

    fn make_writer(&'a self) -> EventText {
        EventText(Vec::new())
    }
}

/// One event's text, queued whole once the formatter is done with it.
#[derive(Debug)]
pub struct EventText(Vec<u8>);

impl std::io::Write for EventText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventText {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            writer::send(&self.0);
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    this.metrics.client_bytes(d.len() as u64);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                tracing::warn!(target: "cistern::access", "response body failed: {e}");
                this.emit(false);
            }
            Poll::Ready(None) => this.emit(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // A body with a known length is not polled past its last byte.
        let complete = self.inner.is_end_stream()
            || self.record.as_ref().and_then(|r| r.expected) == Some(self.bytes);
        self.emit(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc_3339_utc() {
        let stamp = |micros: u64| {
            let mut s = Vec::new();
            push_timestamp(&mut s, UNIX_EPOCH + Duration::from_micros(micros));
            String::from_utf8(s).unwrap()
        };
        // The same second again (from this thread's last one), the next
        // one, back, and years outside four digits.
        for (micros, text) in [
            (1_795_779_371_123_456, "2026-11-27T11:36:11.123456Z"),
            (1_795_779_371_999_999, "2026-11-27T11:36:11.999999Z"),
            (1_795_779_372_000_001, "2026-11-27T11:36:12.000001Z"),
            (1_795_779_371_000_000, "2026-11-27T11:36:11.000000Z"),
            (951_782_400_000_000, "2000-02-29T00:00:00.000000Z"),
            (253_402_300_800_000_000, "10000-01-01T00:00:00.000000Z"),
            (253_402_300_800_000_007, "10000-01-01T00:00:00.000007Z"),
            (951_782_400_000_010, "2000-02-29T00:00:00.000010Z"),
        ] {
            assert_eq!(stamp(micros), text);
        }
    }

    #[test]
    fn fields_are_written_as_display_writes_them() {
        for addr in [
            "127.0.0.1:38108",
            "10.200.3.255:1",
            "[::1]:8080",
            "[fe80::1%2]:80",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut s = Vec::new();
            push_addr(&mut s, addr);
            assert_eq!(s, addr.to_string().as_bytes());
        }
        for (nanos, text) in [
            (0, "0.0"),
            (149_999, "0.1"),
            (150_000, "0.2"),
            (16_234_000, "16.2"),
            (1_999_950_000, "2000.0"),
        ] {
            let mut s = Vec::new();
            push_millis(&mut s, Duration::from_nanos(nanos));
            assert_eq!(s, text.as_bytes());
        }
    }
}
