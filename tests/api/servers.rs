//! Private Redis and PostgreSQL servers that a test may stop and restart (outage tests), and the
//! parley binary as a child process (restart tests). Each lives in a temporary folder on a free
//! port, so stopping it never disturbs the shared servers other tests use.
#![allow(dead_code, reason = "each test uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A private `redis-server` with an append-only file, so its data survives a restart.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one (needs `redis-server` on the PATH; `scripts/test` installs it).
    pub fn start() -> Self {
        let mut redis = PrivateRedis { port: free_port(), dir: temp_dir("redis"), child: None };
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

    /// Kills the server at once (like a crash).
    pub fn kill(&mut self) {
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
        let pg = PrivatePostgres { port: free_port(), dir, bin };
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

    /// Stops the server at once (immediate mode: like a crash; committed data survives).
    pub fn kill(&self) {
        let mut ctl = as_postgres(&self.bin.join("pg_ctl"));
        ctl.args(["-w", "-D"]).arg(self.dir.join("data")).args(["-m", "immediate", "stop"]);
        run(ctl, "pg_ctl stop");
        wait_for_port(self.port, false);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut ctl = as_postgres(&self.bin.join("pg_ctl"));
        ctl.args(["-D"]).arg(self.dir.join("data")).args(["-m", "immediate", "stop"]);
        let _ = ctl.stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The parley binary running as a child process.
pub struct ParleyProcess {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    child: Child,
}

impl ParleyProcess {
    /// Starts `parley` with these environment variables and waits until it answers `/healthz`.
    pub async fn start(env: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_parley"));
        command.env("PARLEY_ADDR", format!("127.0.0.1:{port}")).env("PARLEY_LOG", "warn");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start parley");
        let process = ParleyProcess { base: format!("http://127.0.0.1:{port}"), child };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(format!("{}/healthz", process.base)).send().await.is_ok() {
                return process;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("parley did not start on port {port}");
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Kills the process at once.
    pub fn kill(self) {
        // Drop does it.
    }
}

impl Drop for ParleyProcess {
    fn drop(&mut self) {
        // Also when a test fails midway: no parley outlives its test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
