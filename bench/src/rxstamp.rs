//! A TCP stream that notes when its bytes reached the socket: the kernel's receive timestamp
//! (`SO_TIMESTAMPNS`, `CLOCK_REALTIME`) of the last bytes each read returned.
//!
//! Figure 5a uses it to tell parley's cost from the load process's: the instant the client's
//! `read` returns includes the time the client thread waited for a CPU after the bytes arrived (on
//! 2 cores shared with a database, up to a scheduler slice), which is the load generator's delay,
//! not parley's. On loopback the kernel stamps a segment as parley's write hands it to the
//! receiving side, so "model yielded → stamped" is exactly parley's path: the agent loop, the
//! event channel, SSE encoding, hyper and the write system call.

use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

#[cfg(target_os = "linux")]
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The last receive timestamp of a stream, in nanoseconds since the Unix epoch (0: none yet).
pub type LastRx = Arc<AtomicU64>;

/// A [`TcpStream`] whose reads record the kernel's receive timestamp in a [`LastRx`].
pub struct StampedStream {
    inner: TcpStream,
    last_rx: LastRx,
}

impl StampedStream {
    /// Turns receive timestamps on for `inner`; its reads then record them in `last_rx`.
    #[cfg(target_os = "linux")]
    pub fn new(inner: TcpStream, last_rx: LastRx) -> io::Result<Self> {
        let on: libc::c_int = 1;
        // SAFETY: the option value is a c_int that lives across the call; the size is its own.
        let rc = unsafe {
            libc::setsockopt(
                inner.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(StampedStream { inner, last_rx })
    }

    /// Receive timestamps need Linux's `SO_TIMESTAMPNS`.
    #[cfg(not(target_os = "linux"))]
    pub fn new(_: TcpStream, _: LastRx) -> io::Result<Self> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "receive timestamps need Linux (SO_TIMESTAMPNS)"))
    }
}

/// Turns the kernel's receive timestamps on and waits until they are given, which the kernel does
/// a moment after the first socket asks (it enables them from a work queue): until then segments
/// arrive unstamped. The returned pair keeps them on; hold it while measuring.
#[cfg(target_os = "linux")]
pub async fn keep_stamping(timeout: std::time::Duration) -> io::Result<(StampedStream, TcpStream)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let client = TcpStream::connect(listener.local_addr()?).await?;
    let (mut server, _) = listener.accept().await?;
    let last_rx = LastRx::default();
    let mut stamped = StampedStream::new(client, Arc::clone(&last_rx))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 1];
    loop {
        server.write_all(b".").await?;
        stamped.read_exact(&mut buf).await?;
        if last_rx.load(Ordering::Acquire) != 0 {
            return Ok((stamped, server));
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other("the kernel gives no receive timestamps (SO_TIMESTAMPNS)"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Receive timestamps need Linux's `SO_TIMESTAMPNS`.
#[cfg(not(target_os = "linux"))]
pub async fn keep_stamping(_: std::time::Duration) -> io::Result<(StampedStream, TcpStream)> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "receive timestamps need Linux (SO_TIMESTAMPNS)"))
}

#[cfg(target_os = "linux")]
/// One `recvmsg` into `buf`: the bytes read and the receive timestamp, if the kernel gave one.
fn recv_stamped(fd: libc::c_int, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    // Room for one cmsghdr with a timespec, aligned as the kernel writes it.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data, valid when zeroed; the fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: `msg` describes `buf` and `control`, both alive and writable for the call.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

impl AsyncRead for StampedStream {
    #[cfg(not(target_os = "linux"))]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }

    #[cfg(target_os = "linux")]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            std::task::ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match this.inner.try_io(Interest::READABLE, || recv_stamped(fd, unfilled)) {
                Ok((n, stamp)) => {
                    // A read without a stamp clears it: an older stamp must not pass for these bytes'.
                    this.last_rx.store(stamp.unwrap_or(0), Ordering::Release);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for StampedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn now_ns() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
    }

    #[tokio::test]
    async fn reads_record_when_the_bytes_reached_the_socket_not_when_they_were_read() {
        let _on = keep_stamping(std::time::Duration::from_secs(5)).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let last_rx = LastRx::default();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut stamped = StampedStream::new(client, Arc::clone(&last_rx)).unwrap();

        let before = now_ns();
        server.write_all(b"hello").await.unwrap();
        let after = now_ns();
        // Read well after the bytes arrived: the stamp is their arrival, not this read.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut buf = [0u8; 16];
        let n = stamped.read(&mut buf).await.unwrap();
        let read_at = now_ns();

        assert_eq!(&buf[..n], b"hello");
        let rx = last_rx.load(Ordering::Acquire);
        assert!(rx >= before && rx <= after, "stamp {rx} outside the write [{before}, {after}]");
        assert!(read_at - rx >= 50_000_000, "the stamp is the arrival, 50 ms before the read");
    }

    #[tokio::test]
    async fn a_read_without_a_stamp_clears_the_last_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        // A stamp left from earlier bytes; a read that gets none must not keep it.
        let last_rx = LastRx::new(AtomicU64::new(42));
        let mut stamped = StampedStream { inner: client, last_rx: Arc::clone(&last_rx) };
        server.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        stamped.read_exact(&mut buf).await.unwrap();
        assert_ne!(last_rx.load(Ordering::Acquire), 42, "the stale stamp was kept");
    }
}
