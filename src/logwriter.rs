//! Where log lines go: stderr, written in batches by a thread of its own. A request that logs
//! (the access line, an error) formats its line and appends it to a shared buffer under a short
//! lock: no system call, no allocation once the buffer has grown, no wake-up of another thread.
//! The writer thread swaps the buffer out every [`FLUSH_EVERY`] (sooner when it passes
//! [`FLUSH_AT`]) and writes it in one call. A line reaches stderr at most a few milliseconds after
//! it was logged; [`LogGuard`] writes what is left when it drops (at the end of `main`).
//!
//! If stderr stops taking lines (a full pipe nobody reads), the buffer stops growing at
//! [`MAX_PENDING`]: later lines are dropped, counted, and the count is written once stderr takes
//! lines again. Requests never wait on the log.
//!
//! Lines stay whole: the fmt layer hands each formatted event over in one `write_all`, which
//! [`BatchedStderr`] takes in one `write`, under the lock.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How often the writer thread writes what has been logged.
pub const FLUSH_EVERY: Duration = Duration::from_millis(5);

/// A buffer this large is written at once, without waiting for the next tick.
pub const FLUSH_AT: usize = 256 * 1024;

/// Most bytes waiting to be written; lines beyond are dropped (and counted).
pub const MAX_PENDING: usize = 16 * 1024 * 1024;

struct Shared {
    pending: Mutex<Vec<u8>>,
    /// Wakes the writer early (a full buffer, or the end).
    wake: Condvar,
    dropped: AtomicU64,
    closed: AtomicBool,
}

/// The writer that the fmt layer writes each line to (cheap to clone).
#[derive(Clone)]
pub struct BatchedStderr(Arc<Shared>);

/// Writes what is left when dropped, and stops the writer thread.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The writer, and the guard that flushes it at the end.
pub fn stderr() -> (BatchedStderr, LogGuard) {
    stderr_to(std::io::stderr())
}

/// As [`stderr`], to any sink (for tests).
pub fn stderr_to<W: Write + Send + 'static>(mut sink: W) -> (BatchedStderr, LogGuard) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Vec::with_capacity(64 * 1024)),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    });
    let worker = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("parley-log".to_owned())
        .spawn(move || {
            let mut out = Vec::with_capacity(64 * 1024);
            loop {
                let closed = {
                    let pending = worker.pending.lock().unwrap_or_else(|p| p.into_inner());
                    let (mut pending, _) = worker
                        .wake
                        .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                            p.len() < FLUSH_AT && !worker.closed.load(Ordering::Acquire)
                        })
                        .unwrap_or_else(|p| p.into_inner());
                    std::mem::swap(&mut *pending, &mut out);
                    worker.closed.load(Ordering::Acquire)
                };
                let dropped = worker.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    let _ = writeln!(out, "parley: {dropped} log lines dropped (stderr did not keep up)");
                }
                if !out.is_empty() {
                    let _ = sink.write_all(&out);
                    let _ = sink.flush();
                    out.clear();
                }
                if closed {
                    return;
                }
            }
        })
        .expect("start the log writer thread");
    (BatchedStderr(Arc::clone(&shared)), LogGuard { shared, thread: Some(thread) })
}

impl Write for BatchedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let shared = &self.0;
        let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() + buf.len() > MAX_PENDING {
            drop(pending);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(buf.len());
        }
        pending.extend_from_slice(buf);
        if pending.len() >= FLUSH_AT {
            shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = BatchedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_in_few_writes_and_the_guard_writes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) = stderr_to(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        // One write per line, as the fmt layer writes a formatted event.
                        w.write_all(format!("thread {t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 20_000, "every line, once");
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5_000).collect::<Vec<_>>(), "each thread's lines in order");
        }
        assert!(sink.1.load(Ordering::Relaxed) < 2_000, "written in batches, not a write per line");
    }

    #[test]
    fn a_line_is_written_within_a_few_ticks_without_the_guard() {
        let sink = Sink::default();
        let (mut writer, _guard) = stderr_to(sink.clone());
        writeln!(writer, "soon").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the line was written within 2 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"soon\n");
    }
}
