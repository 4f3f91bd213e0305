//! Network namespaces and veth links owned by a test: removed on drop, also on panic.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;

use anyhow::{bail, Context};

/// Runs `ip` with `args`; an error carries the command and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// The MTU of device `dev` in this namespace.
    pub fn link_mtu(&self, dev: &str) -> anyhow::Result<u32> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -j output")?;
        v.get(0)
            .and_then(|l| l.get("mtu"))
            .and_then(serde_json::Value::as_u64)
            .and_then(|m| u32::try_from(m).ok())
            .with_context(|| format!("no MTU for {dev} in {}", self.name))
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live there.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn_in(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// Starts `f` on a thread that has entered this namespace and returns at once (for a
    /// long-running client or server); [`Netns::enter`] waits for it.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<anyhow::Result<T>> {
        let path = format!("/var/run/netns/{}", self.name);
        thread::spawn(move || -> anyhow::Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: a valid namespace fd; setns only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A veth pair from namespace `a` (end `<name>a`) to `b` (end `<name>b`). Deleting a
/// namespace deletes its end, and with it the pair, so the namespaces' drop cleans up.
pub fn veth(a: &Netns, b: &Netns, name: &str) -> anyhow::Result<(String, String)> {
    let (ea, eb) = (format!("{name}a"), format!("{name}b"));
    ip(&[
        "link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns", &b.name,
    ])?;
    a.ip(&["link", "set", &ea, "up"])?;
    b.ip(&["link", "set", &eb, "up"])?;
    Ok((ea, eb))
}
