//! The HTTP server under the router: the accept loop and each connection's life.
//!
//! Every connection speaks HTTP/1.1, or HTTP/2 without TLS when it opens with the HTTP/2 preface
//! (as `axum::serve` did), with `TCP_NODELAY` on and the client's address in each request's
//! extensions as `ConnectInfo<SocketAddr>` (rate limits key on it when authentication is off).
//!
//! No client can hold the service by connecting and doing little:
//! - **Head timeout.** A request's head (request line and headers) must arrive within
//!   `header_read_timeout` of its first byte, and a new connection that sends nothing is closed
//!   `header_read_timeout` after it opened: a slowloris sending a header byte a second is cut off.
//! - **Idle timeout.** A kept-alive connection with no request in flight is closed once it has
//!   waited `idle_timeout` for the next one. A request is in flight from its head to the last byte
//!   of its answer, so a turn streaming over SSE, however long and however quiet between events,
//!   is never idle.
//! - **Connection cap.** Past `max_connections` open connections, a new one gets a 503
//!   `too_many_connections` problem (with `Retry-After`) and is closed, without its request being
//!   read. The process's open-files limit is raised to fit the cap when it is lower.
//!
//! hyper's own header-read timeout is off: it starts again at each keep-alive wait, so it would
//! close idle connections at the head timeout instead of the idle timeout. A watchdog per
//! connection does both, from what it sees: bytes read from the socket, and requests begun and
//! answered (their answer's body dropped).
//!
//! Shutdown: once `signal` resolves the loop stops accepting, asks every connection to close
//! gracefully (an HTTP/1 connection after its request in flight, an HTTP/2 one with `GOAWAY`),
//! and returns when all have closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::AppError;

/// How the server treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// Longest a request's head may take from its first byte (and a silent new connection from
    /// its opening).
    pub header_read_timeout: Duration,
    /// Longest a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Most open connections; 0 is unlimited.
    pub max_connections: usize,
}

/// Open files kept for everything but client connections: the store's pool, connections to the
/// model and to HTTP tools, refused connections being closed, files.
pub const RESERVED_FILES: usize = 1024;

/// Most header fields hyper parses in an HTTP/1 head before it answers a bare 431 itself; above
/// the limit parley checks and answers as problem+json (`crate::http::middleware`).
pub const HYPER_MAX_HEADERS: usize = 256;

/// Largest HTTP/2 header list hyper accepts (its default is 16 KiB), above parley's own limit.
const HYPER_MAX_HEADER_LIST: u32 = 128 * 1024;

/// How long a connection closed for idleness may take to finish closing before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Most refused connections being answered and closed at once; past it, one is closed at once.
const MAX_LINGERING: usize = 256;

/// How long a refused connection is given to take its answer, and how much of its request is
/// read (and discarded) meanwhile, so that closing it does not reset it before the answer arrives.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// How often, at most, refusals past the cap are logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` until `signal` resolves, then closes every connection gracefully
/// and returns once all are closed.
pub async fn run(
    listener: TcpListener,
    router: Router,
    settings: ServerSettings,
    signal: impl Future<Output = ()> + Send,
) {
    let cap = connection_cap(settings.max_connections);
    let shared = Arc::new(Shared {
        builder: builder(),
        settings,
        stop: CancellationToken::new(),
        refusals: Refusals::new(),
    });
    let connections = TaskTracker::new();
    tokio::pin!(signal);
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        if cap.is_some_and(|cap| connections.len() >= cap) {
            shared.refusals.refuse(tcp, addr);
            continue;
        }
        // Without TCP_NODELAY, Nagle's algorithm holds each small SSE event until the client ACKs
        // the previous one (a delayed ACK: tens of milliseconds per delta).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        connections.spawn(serve_connection(tcp, addr, router.clone(), Arc::clone(&shared)));
    }
    drop(listener);
    shared.stop.cancel();
    connections.close();
    connections.wait().await;
}

/// The cap in force: `max` (none for 0), lowered to what the open-files limit allows after
/// trying to raise it.
fn connection_cap(max: usize) -> Option<usize> {
    if max == 0 {
        return None;
    }
    let wanted = max.saturating_add(RESERVED_FILES);
    match crate::runtime::raise_open_files_limit(wanted as u64) {
        Ok(limit) if limit >= wanted as u64 => Some(max),
        Ok(limit) => {
            let cap = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(RESERVED_FILES).max(1);
            tracing::warn!(
                open_files_limit = limit,
                max_connections = max,
                accepted = cap,
                "the open-files limit is too low for PARLEY_MAX_CONNECTIONS (it needs {RESERVED_FILES} more \
                 for stores and upstreams): accepting fewer connections; raise `ulimit -n`"
            );
            Some(cap)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-files limit");
            Some(max)
        }
    }
}

/// HTTP/1.1 and HTTP/2 (prior knowledge), as `axum::serve` serves them, with parley's limits.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog times heads (and the keep-alive waits hyper does not time apart from them).
    builder.http1().header_read_timeout(None).max_headers(HYPER_MAX_HEADERS);
    builder.http2().max_header_list_size(HYPER_MAX_HEADER_LIST);
    builder
}

/// An accept that failed: a connection reset before it was accepted is skipped; anything else
/// (out of file descriptors, most likely) is logged and the loop pauses a second, as
/// `axum::serve` does, rather than spin.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %error, "could not accept a connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What every connection task shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    settings: ServerSettings,
    /// Cancelled when the server stops: each connection closes gracefully.
    stop: CancellationToken,
    refusals: Refusals,
}

/// Serves one connection until it closes, the watchdog closes it, or the server stops.
async fn serve_connection(tcp: TcpStream, addr: SocketAddr, router: Router, shared: Arc<Shared>) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { tcp, activity: Arc::clone(&activity) });
    let service = ConnService { router, addr, activity: Arc::clone(&activity) };
    let conn = shared.builder.serve_connection(io, service);
    tokio::pin!(conn);
    let (mut stopping, mut idle_closing) = (false, false);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(client.addr = %addr, error = %e, "connection ended with an error");
                }
                return;
            }
            () = shared.stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            expiry = activity.expiry(&shared.settings), if !idle_closing => match expiry {
                Expiry::Head => {
                    tracing::debug!(client.addr = %addr, "no complete request head in time: closing the connection");
                    return;
                }
                Expiry::Idle => {
                    tracing::debug!(client.addr = %addr, "connection idle: closing it");
                    idle_closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            },
            () = tokio::time::sleep(CLOSE_GRACE), if idle_closing => return,
        }
    }
}

/// Why the watchdog closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A request head did not arrive in time (or a new connection sent nothing).
    Head,
    /// A kept-alive connection waited too long for its next request.
    Idle,
}

/// What a connection is doing, as its watchdog sees it. Times are milliseconds since it opened.
struct Activity {
    opened: Instant,
    /// Requests begun and not yet answered to their last byte.
    in_flight: AtomicUsize,
    /// Whether any request began (a silent new connection is timed as a head, not as idle).
    served: AtomicBool,
    /// When the last request was answered (0: the opening).
    idle_since: AtomicU64,
    /// One more than when the first byte arrived with no request in flight; 0 when none has.
    head_since: AtomicU64,
    /// Woken when the deadline may have moved earlier.
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived: with no request in flight, they start the next request's head.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) == 0 {
            self.head_since.store(self.now_ms() + 1, Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// A request's head arrived; it is in flight until the returned guard drops.
    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        self.served.store(true, Ordering::Release);
        InFlight(Arc::clone(self))
    }

    fn end_request(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Release);
        self.head_since.store(0, Ordering::Release);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.changed.notify_one();
        }
    }

    /// When the connection expires and why; `None` while a request is in flight.
    fn deadline(&self, settings: &ServerSettings) -> Option<(u64, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let head_since = self.head_since.load(Ordering::Acquire);
        if head_since > 0 {
            return Some((
                (head_since - 1).saturating_add(millis(settings.header_read_timeout)),
                Expiry::Head,
            ));
        }
        let idle_since = self.idle_since.load(Ordering::Acquire);
        if self.served.load(Ordering::Acquire) {
            Some((idle_since.saturating_add(millis(settings.idle_timeout)), Expiry::Idle))
        } else {
            Some((idle_since.saturating_add(millis(settings.header_read_timeout)), Expiry::Head))
        }
    }

    /// Resolves when the connection expires.
    async fn expiry(&self, settings: &ServerSettings) -> Expiry {
        loop {
            match self.deadline(settings) {
                None => self.changed.notified().await,
                Some((at, why)) => {
                    let now = self.now_ms();
                    if now >= at {
                        return why;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                        () = self.changed.notified() => {}
                    }
                }
            }
        }
    }
}

/// A request in flight; dropping it (with the answer's body, or the unanswered request) ends it.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// The socket, telling the watchdog when bytes arrive.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The router as one connection's hyper service: adds the client's address to each request and
/// counts the request in flight until its answer's body is dropped.
#[derive(Clone)]
struct ConnService {
    router: Router,
    addr: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin_request();
        request.extensions_mut().insert(ConnectInfo(self.addr));
        let answer = self.router.clone().oneshot(request.map(Body::new));
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _in_flight = &in_flight;
                    frame
                }))
            }))
        })
    }
}

/// Connections refused past the cap.
struct Refusals {
    /// The whole answer: a 503 problem, `Retry-After: 1`, `Connection: close`.
    answer: Bytes,
    lingering: Arc<Semaphore>,
    started: Instant,
    /// Milliseconds since `started` of the last logged refusal, plus one; 0 before the first.
    last_logged: AtomicU64,
}

impl Refusals {
    fn new() -> Self {
        let problem = AppError::TooManyConnections.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\ncontent-length: {}\r\nretry-after: 1\r\n\
             connection: close\r\n\r\n",
            crate::error::PROBLEM_JSON,
            body.len()
        );
        let mut answer = head.into_bytes();
        answer.extend_from_slice(&body);
        Refusals {
            answer: Bytes::from(answer),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            started: Instant::now(),
            last_logged: AtomicU64::new(0),
        }
    }

    /// Answers 503 and closes, in a task of its own; when too many are being closed already, closes
    /// at once.
    fn refuse(&self, tcp: TcpStream, addr: SocketAddr) {
        self.log(addr);
        if let Ok(permit) = Arc::clone(&self.lingering).try_acquire_owned() {
            tokio::spawn(answer_and_close(tcp, self.answer.clone(), permit));
        }
    }

    fn log(&self, addr: SocketAddr) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_logged.load(Ordering::Relaxed);
        let every = u64::try_from(REFUSAL_LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= every;
        if due && self.last_logged.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(client.addr = %addr, "refusing connections: PARLEY_MAX_CONNECTIONS are open (logged once a minute)");
        } else {
            tracing::debug!(client.addr = %addr, "connection refused: PARLEY_MAX_CONNECTIONS are open");
        }
    }
}

/// Writes the refusal, ends the sending side, and reads (discarding) a bounded amount of what the
/// client sent for a bounded time, so that its answer is not lost to a reset.
async fn answer_and_close(mut tcp: TcpStream, answer: Bytes, _permit: OwnedSemaphorePermit) {
    let answered = async {
        tcp.write_all(&answer).await?;
        tcp.shutdown().await
    };
    if !matches!(tokio::time::timeout(LINGER, answered).await, Ok(Ok(()))) {
        return;
    }
    let drain = async {
        let (mut buffer, mut read) = ([0u8; 4096], 0);
        while read < LINGER_BYTES {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ServerSettings {
        ServerSettings {
            header_read_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(7),
            max_connections: 0,
        }
    }

    #[test]
    fn a_silent_new_connection_is_timed_as_a_head() {
        let activity = Activity::new();
        assert_eq!(activity.deadline(&settings()), Some((3_000, Expiry::Head)));
    }

    #[test]
    fn a_request_in_flight_has_no_deadline_and_its_end_starts_the_idle_time() {
        let activity = Arc::new(Activity::new());
        let request = activity.begin_request();
        activity.on_read(); // its body, say
        assert_eq!(activity.deadline(&settings()), None);
        drop(request);
        let (at, why) = activity.deadline(&settings()).unwrap();
        assert_eq!(why, Expiry::Idle);
        assert!((7_000..8_000).contains(&at), "{at}");
    }

    #[test]
    fn bytes_after_an_idle_wait_start_a_head_deadline() {
        let activity = Arc::new(Activity::new());
        drop(activity.begin_request());
        activity.on_read();
        let (at, why) = activity.deadline(&settings()).unwrap();
        assert_eq!(why, Expiry::Head);
        assert!((3_000..4_000).contains(&at), "{at}");
        let _request = activity.begin_request();
        assert_eq!(activity.deadline(&settings()), None, "the head arrived");
    }

    #[test]
    fn the_refusal_is_a_complete_problem_answer() {
        let answer = Refusals::new().answer;
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("content-type: application/problem+json") && head.contains("retry-after: 1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["code"], "too_many_connections");
    }
}
