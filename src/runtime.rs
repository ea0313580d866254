//! The process parley serves in: its memory (transparent huge pages off, `PARLEY_DISABLE_THP`), its
//! Tokio runtime, with the worker threads optionally pinned one per CPU (`PARLEY_PIN_WORKERS`), and
//! its limit of open files (raised to fit `PARLEY_MAX_CONNECTIONS`).
//!
//! Why no transparent huge pages: the allocator asks for them, so the first write to each new
//! 2 MiB of heap stops the writing thread while the kernel zeroes the whole page (and, in a VM
//! whose memory the host backs lazily, while the host backs it: 4.6 ms per 2 MiB measured on this
//! project's machines). A memory store grows its heap with every turn, so these stops were the
//! largest part of the benchmark's p99 (bench/README.md: 4–5 ms with them, 2.2–3.4 ms without).
//! With 4 KiB pages the same work comes in steps too small to show in the tail. This is Redis's
//! `disable-thp` for the same reason, and done the same way (`prctl(PR_SET_THP_DISABLE)`).
//!
//! Why pin: on a machine whose CPUs parley may all use (a VM or an exclusive cpuset) and that it
//! shares with other busy processes, the kernel sometimes stacks two of parley's busy workers on
//! one CPU. They then take turns at the scheduler's tick (4 ms at `CONFIG_HZ=250`), and every
//! request queued on the worker that waits, waits a tick: the benchmark's p99 (bench/README.md)
//! went from about 5 ms to about 2.5 ms with the workers pinned, at no cost in throughput. When the
//! CPU set is shared with other tenants under a CPU quota (most Kubernetes pods without the static
//! CPU manager), leave it off: a pinned worker cannot move away from a CPU another process keeps
//! busy.
//!
//! How: with pinning on, the runtime runs one worker per CPU of the process's affinity mask, and
//! each worker pins itself to the next CPU of that mask the first time it parks (Tokio calls the
//! park hook on worker threads only, never on `spawn_blocking` threads, which keep the whole mask).

use std::io;

/// Turns transparent huge pages off for this process (every thread, from now on). Linux only;
/// elsewhere there is nothing to turn off.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether transparent huge pages are off for this process (always true off Linux).
pub fn transparent_huge_pages_disabled() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_THP_DISABLE takes plain integers and touches no memory of ours.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }
    #[cfg(not(target_os = "linux"))]
    true
}

/// Raises this process's soft limit of open files (`RLIMIT_NOFILE`) to `wanted` when it is lower,
/// as far as the hard limit allows (as Redis does for `maxclients`); never lowers it. Returns the
/// soft limit in force afterwards. Linux only; elsewhere the limit is left alone and reported as
/// unbounded.
pub fn raise_open_files_limit(wanted: u64) -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur >= wanted {
            return Ok(limit.rlim_cur);
        }
        let raised = libc::rlimit { rlim_cur: wanted.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one rlimit struct, which `raised` is.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(raised.rlim_cur)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = wanted;
        Ok(u64::MAX)
    }
}

/// Builds the multi-thread runtime; `pin_workers` pins one worker to each CPU this process may use.
pub fn build(pin_workers: bool) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if pin_workers {
        pin(&mut builder)?;
    }
    builder.build()
}

#[cfg(target_os = "linux")]
fn pin(builder: &mut tokio::runtime::Builder) -> io::Result<()> {
    use std::cell::Cell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    thread_local! {
        static PINNED: Cell<bool> = const { Cell::new(false) };
    }
    let cpus: Arc<[usize]> = affinity::allowed_cpus()?.into();
    if cpus.is_empty() {
        return Err(io::Error::other("PARLEY_PIN_WORKERS: this process may run on no CPU"));
    }
    let next = Arc::new(AtomicUsize::new(0));
    builder.worker_threads(cpus.len());
    builder.on_thread_park(move || {
        if PINNED.get() {
            return;
        }
        PINNED.set(true);
        let cpu = cpus[next.fetch_add(1, Ordering::Relaxed) % cpus.len()];
        match affinity::pin_current_thread(cpu) {
            Ok(()) => tracing::debug!(cpu, "worker thread pinned"),
            Err(e) => tracing::warn!(cpu, error = %e, "could not pin a worker thread; it runs unpinned"),
        }
    });
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn pin(_: &mut tokio::runtime::Builder) -> io::Result<()> {
    Err(io::Error::other("PARLEY_PIN_WORKERS=true is supported on Linux only"))
}

/// The CPU affinity of threads (Linux `sched_getaffinity` / `sched_setaffinity`).
#[cfg(target_os = "linux")]
pub mod affinity {
    use std::io;

    /// The CPUs the calling thread may run on, in increasing order.
    pub fn allowed_cpus() -> io::Result<Vec<usize>> {
        // SAFETY: `cpu_set_t` is plain data, valid when zeroed; the kernel writes at most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the pointer and size describe `set`.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `CPU_ISSET` reads `set` at an index below `CPU_SETSIZE`.
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
    }

    /// Restricts the calling thread to one CPU.
    pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::other(format!("CPU {cpu} is beyond the affinity mask")));
        }
        // SAFETY: as in `allowed_cpus`; `CPU_SET` writes `set` at an index checked above.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: pid 0 is the calling thread; the pointer and size describe `set`.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    type Masks = BTreeMap<String, Vec<usize>>;

    /// Runs tasks on the workers until `done` holds of what was seen (or 200 rounds); returns each
    /// worker thread's CPU mask.
    fn worker_masks(rt: &tokio::runtime::Runtime, workers: usize, done: impl Fn(&Masks) -> bool) -> Masks {
        rt.block_on(async {
            let mut seen = BTreeMap::new();
            for _ in 0..200 {
                // Let the workers park (which pins them), then sample the threads tasks run on.
                tokio::time::sleep(Duration::from_millis(1)).await;
                let tasks: Vec<_> = (0..workers * 4)
                    .map(|_| {
                        tokio::spawn(async {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            (format!("{:?}", std::thread::current().id()), affinity::allowed_cpus().unwrap())
                        })
                    })
                    .collect();
                for task in tasks {
                    let (thread, mask) = task.await.unwrap();
                    seen.insert(thread, mask);
                }
                if done(&seen) {
                    break;
                }
            }
            seen
        })
    }

    #[test]
    fn pinned_workers_each_run_on_their_own_cpu_and_blocking_threads_stay_free() {
        let cpus = affinity::allowed_cpus().unwrap();
        let rt = build(true).unwrap();
        let all_pinned = |m: &Masks| m.len() >= cpus.len() && m.values().all(|m| m.len() == 1);
        let masks = worker_masks(&rt, cpus.len(), all_pinned);
        assert_eq!(masks.len(), cpus.len(), "one worker per CPU: {masks:?}");
        let mut pinned: Vec<usize> = masks.values().map(|m| m[0]).collect();
        assert!(masks.values().all(|m| m.len() == 1), "every worker pinned to one CPU: {masks:?}");
        pinned.sort_unstable();
        assert_eq!(pinned, cpus, "each CPU has its own worker");
        let blocking = rt.block_on(rt.spawn_blocking(affinity::allowed_cpus)).unwrap().unwrap();
        assert_eq!(blocking, cpus, "spawn_blocking threads keep the whole mask");
    }

    #[test]
    fn the_open_files_limit_is_raised_never_lowered() {
        let now = raise_open_files_limit(0).unwrap();
        assert!(now > 0);
        assert_eq!(raise_open_files_limit(now / 2).unwrap(), now, "never lowered");
        assert!(raise_open_files_limit(now + 1).unwrap() >= now);
    }

    #[test]
    fn transparent_huge_pages_can_be_turned_off() {
        // prctl(PR_SET_THP_DISABLE) is per process; turning it off in the test process is harmless.
        disable_transparent_huge_pages().unwrap();
        assert!(transparent_huge_pages_disabled());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.lines().any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])), "{status}");
    }

    #[test]
    fn unpinned_workers_keep_the_whole_mask() {
        let cpus = affinity::allowed_cpus().unwrap();
        let rt = build(false).unwrap();
        let masks = worker_masks(&rt, 2, |m| m.len() >= 2);
        assert!(masks.values().all(|m| *m == cpus), "{masks:?}");
    }
}
