//! Child processes: parley itself and the floor server, each started on a free loopback port,
//! waited for, measured (resident memory from /proc) and stopped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;
use tokio::process::{Child, Command};

use crate::client::Client;

/// A server running as a child process.
pub struct Server {
    /// What it is, for messages.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

/// A free port on 127.0.0.1 (bound, then released for the child to take).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Server {
    /// Starts `program args` with `env`, logging to `log`, and waits until `ready_path` answers 200.
    pub async fn start(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        ready_path: &str,
    ) -> anyhow::Result<Server> {
        let addr = free_addr()?;
        let log_file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PARLEY_ADDR", addr.to_string())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let mut server = Server { name: name.to_owned(), addr, child };
        server.wait_ready(ready_path, log).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, path: &str, log: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status} at start-up; see {}", self.name, log.display());
            }
            let mut client = Client::new(self.addr);
            if let Ok((status, _)) = client.call(Method::GET, path, None).await
                && status.is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} did not become ready within 60 s; see {}", self.name, log.display())
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Resident memory of the child, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        rss_of(&format!("/proc/{}/status", self.pid()))
    }

    /// Stops the child: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// VmRSS of a `/proc/…/status` file, in bytes.
pub fn rss_of(status_path: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(status_path).with_context(|| format!("read {status_path}"))?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kb * 1024)
}

/// This process's resident memory, in bytes.
pub fn own_rss() -> anyhow::Result<u64> {
    rss_of("/proc/self/status")
}

/// Where logs of child processes go.
pub fn log_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("target").join("bench-logs");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
