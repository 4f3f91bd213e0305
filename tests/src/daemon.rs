//! A daemon started by a test inside a namespace; stopped by its PID on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

pub struct Daemon {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `program args` in namespace `ns` (`ip netns exec` execs, so the PID we hold is
    /// the daemon's own), with stdout and stderr to `log`.
    pub fn spawn(
        ns: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Daemon> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        Daemon::start(cmd, args, env, log)
    }

    /// Starts `program args` in the host's own namespace (loopback services like the API
    /// server).
    pub fn spawn_host(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Daemon> {
        Daemon::start(Command::new(program), args, env, log)
    }

    fn start(
        mut cmd: Command,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Daemon> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // A process group of its own: a Ctrl-C at the terminal reaches the test or the
        // sandbox, which then stops its daemons in order, not every daemon at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Daemon {
            child,
            log,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and returns at once (SIGSTOP and SIGCONT: pause and resume it).
    pub fn signal(&mut self, signal: i32) {
        if self.is_running() {
            // SAFETY: kill on the PID of a child we have not reaped yet.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
    }

    /// Sends `signal` and waits up to `grace` for the exit; SIGKILL after that.
    pub fn stop_with(&mut self, signal: i32, grace: Duration) -> Option<ExitStatus> {
        if !self.is_running() {
            return self.exited;
        }
        // SAFETY: kill on the PID of a child we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        // A paused daemon would hold the signal until its grace ran out.
        if signal != libc::SIGKILL {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                return self.exited;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with(libc::SIGTERM, Duration::from_secs(5))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_until`] for an async condition: polls `cond` every 200 ms until it holds or
/// `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
