//! The real `wg` from wireguard-tools, and its machine-readable `dump` output.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::netns::Netns;

/// A key pair in `wg`'s base64 form.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

fn wg_stdin(args: &[&str], input: &str) -> anyhow::Result<String> {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wg")?;
    child
        .stdin
        .take()
        .context("wg stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "wg {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl KeyPair {
    pub fn generate() -> anyhow::Result<KeyPair> {
        let private = wg_stdin(&["genkey"], "")?;
        let public = wg_stdin(&["pubkey"], &private)?;
        Ok(KeyPair { private, public })
    }
}

pub fn genpsk() -> anyhow::Result<String> {
    wg_stdin(&["genpsk"], "")
}

/// `wg args…` inside `ns`.
pub fn wg(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    ns.exec("wg", args)
}

/// `wg args…` inside `ns`, returning whether it succeeded and its stderr (for error cases).
pub fn wg_status(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "wg"])
        .args(args)
        .output();
    match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// One peer line of `wg show IFACE dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDump {
    pub public_key: String,
    pub preshared_key: String,
    pub endpoint: String,
    pub allowed_ips: String,
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub private_key: String,
    pub public_key: String,
    pub listen_port: String,
    pub fwmark: String,
    pub peers: Vec<PeerDump>,
}

impl Dump {
    pub fn peer(&self, public_key: &str) -> Option<&PeerDump> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

pub fn parse_dump(text: &str) -> anyhow::Result<Dump> {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().context("empty dump")?.split('\t').collect();
    if head.len() != 4 {
        bail!("interface line has {} fields: {head:?}", head.len());
    }
    let mut peers = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 8 {
            bail!("peer line has {} fields: {f:?}", f.len());
        }
        peers.push(PeerDump {
            public_key: f[0].into(),
            preshared_key: f[1].into(),
            endpoint: f[2].into(),
            allowed_ips: f[3].into(),
            latest_handshake: f[4].parse()?,
            rx_bytes: f[5].parse()?,
            tx_bytes: f[6].parse()?,
            persistent_keepalive: f[7].into(),
        });
    }
    Ok(Dump {
        private_key: head[0].into(),
        public_key: head[1].into(),
        listen_port: head[2].into(),
        fwmark: head[3].into(),
        peers,
    })
}

pub fn dump(ns: &Netns, iface: &str) -> anyhow::Result<Dump> {
    parse_dump(&wg(ns, &["show", iface, "dump"])?)
}
