//! Several "hosts" on one machine: network namespaces joined by a bridge
//! that lives in a namespace of its own (see shared/design/test-hosts.md).
//! Every name carries a per-run tag, so parallel or leaked runs never clash,
//! and dropping the [`Hosts`] deletes every namespace it made, also when the
//! test panics. Addresses (10.77.0.0/24) exist only inside these namespaces.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

pub struct Hosts {
    tag: String,
    n: usize,
    made: Vec<String>,
}

fn ip(args: &[&str]) -> Result<Output> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 is needed for the multi-host tests)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(o)
}

/// Whether this process may create network namespaces (root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Hosts {
    /// Creates `n` hosts, `h0..h{n-1}`, with addresses 10.77.0.1.. on one bridge.
    pub fn create(n: usize) -> Result<Self> {
        if !is_root() {
            bail!("the multi-host tests create network namespaces and must run as root");
        }
        let tag = format!(
            "p{}{:04x}",
            std::process::id() % 100_000,
            rand_u16() ^ (n as u16)
        );
        let mut h = Self {
            tag,
            n,
            made: vec![],
        };
        let br = h.bridge();
        ip(&["netns", "add", &br])?;
        h.made.push(br.clone());
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = h.ns(i);
            ip(&["netns", "add", &ns])?;
            h.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let peer = format!("vb{i}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
                &br,
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", h.addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up", "multicast", "on"])?;
            ip(&["-n", &br, "link", "set", &peer, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &peer, "up"])?;
        }
        Ok(h)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.tag)
    }

    /// Host `i`'s address on the bridge.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// `program` to be run inside host `i`.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Breaks (or mends) the link between hosts `i` and `j` alone: host
    /// `i` drops every packet from or to `j` (iptables in its namespace);
    /// both still reach the others.
    pub fn block(&self, i: usize, j: usize, blocked: bool) -> Result<()> {
        let op = if blocked { "-A" } else { "-D" };
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let o = Command::new("ip")
                .args(["netns", "exec", &self.ns(i), "iptables", op, chain, dir])
                .arg(self.addr(j))
                .args(["-j", "DROP"])
                .output()?;
            anyhow::ensure!(
                o.status.success(),
                "iptables in {}: {}",
                self.ns(i),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// Limits what host `i` sends to `mbit` Mbit/s (tbf on its interface).
    pub fn shape(&self, i: usize, mbit: u32) -> Result<()> {
        ip(&[
            "netns",
            "exec",
            &self.ns(i),
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            "32kb",
            "latency",
            "100ms",
        ])
        .map(|_| ())
    }

    /// Cuts host `i` off (its end of the veth down) or reconnects it.
    pub fn set_link(&self, i: usize, up: bool) -> Result<()> {
        ip(&[
            "-n",
            &self.ns(i),
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            // Killing what still runs inside first makes the delete clean.
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: kill(2) on a pid inside our own namespace.
                            unsafe {
                                libc::kill(pid, libc::SIGKILL);
                            }
                        }
                    }
                });
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: could not delete namespace {ns}: {e}");
            }
        }
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ (t >> 16)) as u16
}

/// A `primad` running inside one of the [`Hosts`], its API on the host's
/// own loopback (reached with `curl` run inside the namespace).
pub struct NsDaemon {
    pub host: usize,
    ns: String,
    child: Option<std::process::Child>,
    pub dir: tempfile::TempDir,
}

impl NsDaemon {
    /// Starts `primad` in host `i` with `config` as its config file.
    pub fn start(hosts: &Hosts, i: usize, config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("prima-ns-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("primad.toml"), config).expect("config");
        let mut d = Self {
            host: i,
            ns: hosts.ns(i),
            child: None,
            dir,
        };
        d.spawn(hosts);
        d
    }

    pub fn spawn(&mut self, hosts: &Hosts) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("primad.log"))
            .expect("log");
        let child = hosts
            .command(self.host, crate::bin("primad"))
            .arg("--config")
            .arg(self.dir.path().join("primad.toml"))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(["--api-addr", "127.0.0.1:7340"])
            .env("RUST_LOG", "info,sled=warn,libp2p=warn,mdns_sd=warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning primad in a namespace");
        self.child = Some(child);
    }

    /// The daemon's /api/status, or None while it does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-fs", "--max-time", "1"])
            .arg("http://127.0.0.1:7340/api/status")
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// POSTs JSON to the daemon's API from inside its host; the status and
    /// the JSON answer.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "--max-time", "300"])
            .args([
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: application/json",
            ])
            .args(["-d", &body.to_string()])
            .arg(format!("http://127.0.0.1:7340{path}"))
            .output()
            .expect("running curl");
        let out = String::from_utf8_lossy(&o.stdout);
        let (json, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Runs `primactl` inside this daemon's host.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(crate::bin("primactl"))
            .args(args)
            .env_remove("PRIMA_API")
            .output()
            .expect("running primactl")
    }

    /// The daemon's process id (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the daemon.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the daemon to exit (and
    /// kills it after). True if it exited by itself.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> bool {
        self.signal("TERM");
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let t = std::time::Instant::now();
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            if t.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("primad.log")).unwrap_or_default()
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- primad log of host {} ---\n{}", self.host, self.log());
        }
    }
}
