//! Private Redis and PostgreSQL servers that a test may stop and restart (outage tests) or freeze
//! and thaw (stall tests), and the parley binary as a child process (restart and pause tests).
//! Each lives in a temporary folder on a free port, so stopping it never disturbs the shared
//! servers other tests use.
#![allow(dead_code, reason = "each test uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::helpers::unique_name(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for_port(port: u16, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if open == up {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("port {port} did not become {}", if up { "open" } else { "closed" });
}

/// Sends a signal (`STOP`, `CONT`, …) to these processes; a process already gone is skipped.
fn signal(pids: &[u32], name: &str) {
    if pids.is_empty() {
        return;
    }
    let mut kill = Command::new("kill");
    kill.arg(format!("-{name}")).args(pids.iter().map(u32::to_string));
    let _ = kill.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// The processes whose parent is `parent`, read from `/proc/*/stat`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid …`: the command name may hold spaces and parentheses.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after_name.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// A private `redis-server` with an append-only file, so its data survives a restart.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Whether it is frozen (SIGSTOP), to thaw it before it is killed.
    frozen: AtomicBool,
}

impl PrivateRedis {
    /// Starts one (needs `redis-server` on the PATH; `scripts/test` installs it).
    pub fn start() -> Self {
        let mut redis = PrivateRedis {
            port: free_port(),
            dir: temp_dir("redis"),
            child: None,
            frozen: AtomicBool::new(false),
        };
        redis.up();
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again after [`PrivateRedis::kill`].
    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        wait_for_port(self.port, true);
    }

    /// Freezes the server (SIGSTOP): its connections stay open and take requests, but nothing
    /// answers them until [`PrivateRedis::thaw`] (a stalled store, not a dead one).
    pub fn freeze(&self) {
        let pid = self.child.as_ref().map(Child::id).expect("redis-server running");
        signal(&[pid], "STOP");
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Lets a frozen server run again (SIGCONT): it then serves what it was sent meanwhile.
    pub fn thaw(&self) {
        if let Some(child) = &self.child
            && self.frozen.swap(false, Ordering::SeqCst)
        {
            signal(&[child.id()], "CONT");
        }
    }

    /// Kills the server at once (like a crash).
    pub fn kill(&mut self) {
        self.thaw();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for_port(self.port, false);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL cluster (initdb into a temporary folder), run as the `postgres` user
/// when the tests run as root.
pub struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// The processes [`PrivatePostgres::freeze`] stopped, to thaw.
    frozen: Mutex<Vec<u32>>,
}

fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (scripts/test installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn as_postgres(program: &Path) -> Command {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let output = command.stdout(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(output.status.success(), "{what} failed: {}", String::from_utf8_lossy(&output.stderr));
}

impl PrivatePostgres {
    /// Creates and starts a cluster with trust authentication.
    pub fn start() -> Self {
        let dir = temp_dir("pg");
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        if root {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(&dir);
            run(chown, "chown");
        }
        let bin = postgres_bin();
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb.args(["-U", "postgres", "--auth=trust", "--no-sync", "-D"]).arg(dir.join("data"));
        run(initdb, "initdb");
        let pg = PrivatePostgres { port: free_port(), dir, bin, frozen: Mutex::new(Vec::new()) };
        pg.up();
        pg
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again).
    pub fn up(&self) {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.display());
        let mut ctl = as_postgres(&self.bin.join("pg_ctl"));
        ctl.args(["-w", "-D"])
            .arg(self.dir.join("data"))
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("log"));
        ctl.arg("start");
        run(ctl, "pg_ctl start");
        wait_for_port(self.port, true);
    }

    /// The postmaster's pid (the first line of `postmaster.pid`).
    fn postmaster(&self) -> u32 {
        let file = self.dir.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        text.lines().next().and_then(|l| l.trim().parse().ok()).expect("a pid in postmaster.pid")
    }

    /// Freezes the server (SIGSTOP to the postmaster, then to each of its children: every
    /// backend and auxiliary process, which run in sessions of their own): open connections and
    /// new ones are accepted by the kernel, but nothing answers until [`PrivatePostgres::thaw`].
    pub fn freeze(&self) {
        let postmaster = self.postmaster();
        // The postmaster first, so it forks no new backend that would escape.
        signal(&[postmaster], "STOP");
        let mut pids = vec![postmaster];
        pids.extend(children_of(postmaster));
        signal(&pids[1..], "STOP");
        self.frozen.lock().unwrap_or_else(|e| e.into_inner()).extend(pids);
    }

    /// Lets a frozen server run again (SIGCONT to every process [`PrivatePostgres::freeze`]
    /// stopped).
    pub fn thaw(&self) {
        let pids = std::mem::take(&mut *self.frozen.lock().unwrap_or_else(|e| e.into_inner()));
        signal(&pids, "CONT");
    }

    /// Stops the server at once (immediate mode: like a crash; committed data survives).
    pub fn kill(&self) {
        self.thaw();
        let mut ctl = as_postgres(&self.bin.join("pg_ctl"));
        ctl.args(["-w", "-D"]).arg(self.dir.join("data")).args(["-m", "immediate", "stop"]);
        run(ctl, "pg_ctl stop");
        wait_for_port(self.port, false);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A frozen postmaster would not act on pg_ctl's signal.
        self.thaw();
        let mut ctl = as_postgres(&self.bin.join("pg_ctl"));
        ctl.args(["-D"]).arg(self.dir.join("data")).args(["-m", "immediate", "stop"]);
        let _ = ctl.stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis or PostgreSQL server, for a test that runs on either; killed on drop, frozen
/// or not.
pub enum PrivateStore {
    Redis(PrivateRedis),
    Postgres(PrivatePostgres),
}

impl PrivateStore {
    /// parley's environment to use it: `PARLEY_STORE` and the server's URL.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            PrivateStore::Redis(redis) => vec![("PARLEY_STORE", "redis".into()), ("REDIS_URL", redis.url())],
            PrivateStore::Postgres(pg) => {
                vec![("PARLEY_STORE", "postgres".into()), ("DATABASE_URL", pg.url())]
            }
        }
    }

    /// Freezes the server (SIGSTOP).
    pub fn freeze(&self) {
        match self {
            PrivateStore::Redis(redis) => redis.freeze(),
            PrivateStore::Postgres(pg) => pg.freeze(),
        }
    }

    /// Lets it run again (SIGCONT).
    pub fn thaw(&self) {
        match self {
            PrivateStore::Redis(redis) => redis.thaw(),
            PrivateStore::Postgres(pg) => pg.thaw(),
        }
    }

    /// Stops the server at once, like a crash (what was written survives).
    pub fn kill(&mut self) {
        match self {
            PrivateStore::Redis(redis) => redis.kill(),
            PrivateStore::Postgres(pg) => pg.kill(),
        }
    }

    /// Starts the server again after [`PrivateStore::kill`].
    pub fn up(&mut self) {
        match self {
            PrivateStore::Redis(redis) => redis.up(),
            PrivateStore::Postgres(pg) => pg.up(),
        }
    }
}

/// The parley binary running as a child process.
pub struct ParleyProcess {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    child: Child,
    /// Where its stderr goes ([`ParleyProcess::start_logged`]): removed on drop, kept (and named)
    /// when the test failed.
    log: Option<PathBuf>,
}

impl ParleyProcess {
    /// Starts `parley` with these environment variables and waits until it answers `/healthz`.
    pub async fn start(env: &[(&str, String)]) -> Self {
        Self::spawn(env, None).await
    }

    /// Starts `parley` as [`ParleyProcess::start`] does, with its log (`PARLEY_LOG` from `env`,
    /// `warn` by default) in a temporary file that a failing test leaves behind.
    pub async fn start_logged(env: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", crate::helpers::unique_name("parley")));
        Self::spawn(env, Some(log)).await
    }

    async fn spawn(env: &[(&str, String)], log: Option<PathBuf>) -> Self {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_parley"));
        // The memory store unless `env` says otherwise: no run leaves a `parley.db` behind.
        command
            .env("PARLEY_ADDR", format!("127.0.0.1:{port}"))
            .env("PARLEY_LOG", "warn")
            .env("PARLEY_STORE", "memory");
        for (key, value) in env {
            command.env(key, value);
        }
        let stderr = match &log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create the log file")),
            None => Stdio::null(),
        };
        let child = command.stdout(Stdio::null()).stderr(stderr).spawn().expect("start parley");
        let process = ParleyProcess { base: format!("http://127.0.0.1:{port}"), child, log };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(format!("{}/healthz", process.base)).send().await.is_ok() {
                return process;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("parley did not start on port {port}");
    }

    /// What the process has logged so far ([`ParleyProcess::start_logged`]).
    pub fn log_text(&self) -> String {
        let path = self.log.as_ref().expect("started with start_logged");
        std::fs::read_to_string(path).expect("read the log file")
    }

    /// Pauses the process (SIGSTOP), as a long stall would: its sockets stay open, nothing runs.
    pub fn pause(&self) {
        signal(&[self.child.id()], "STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        signal(&[self.child.id()], "CONT");
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Sends SIGTERM, waits for the process to exit cleanly, and returns its whole log
    /// ([`ParleyProcess::start_logged`]).
    pub fn terminate_and_read_log(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let exited = self.child.wait().map(|s| s.success()).unwrap_or(false);
        let log = self.log_text();
        assert!(exited, "parley exits cleanly on SIGTERM; its log:\n{log}");
        log
    }

    /// Kills the process at once.
    pub fn kill(self) {
        // Drop does it.
    }
}

impl Drop for ParleyProcess {
    fn drop(&mut self) {
        // Also when a test fails midway: no parley outlives its test. SIGKILL ends a paused
        // process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(log) = &self.log {
            if std::thread::panicking() {
                eprintln!("parley's log: {}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}
