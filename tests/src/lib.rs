//! The test harness for prima's multi-process tests: start real `primad`
//! processes (each with its own state dir and loopback port), drive them with
//! `primactl` and raw HTTP, kill and restart them, and always clean up, also
//! when a test panics (every handle kills its process on drop).

use std::{
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod household;
pub mod netns;

/// The optimised binaries under test (`cargo build --release --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first (`cargo build --release --workspace --bins`; scripts/test does)",
        p.display()
    );
    p
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// A real model from the download cache; fails with how to fetch it.
pub fn model(file: &str) -> PathBuf {
    let p = prima_kernels::models_dir()
        .expect("no models dir (set PRIMA_MODELS or HOME)")
        .join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models first (scripts/test does)",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// Runs a command to completion, panicking with its output when it fails
/// to start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// `primad generate` on this machine alone: the reference answers.
pub fn generate(model: &Path, prompt: &str, max_tokens: usize, chat: bool) -> String {
    generate_with(model, prompt, max_tokens, chat, &[])
}

/// [`generate`] with more `primad generate` arguments (e.g. `--gpu 4`).
pub fn generate_with(
    model: &Path,
    prompt: &str,
    max_tokens: usize,
    chat: bool,
    extra: &[&str],
) -> String {
    let mut c = Command::new(bin("primad"));
    c.args(["generate", "--temperature", "0", "-n"])
        .arg(max_tokens.to_string())
        .arg("-m")
        .arg(model)
        .arg("-p")
        .arg(prompt);
    if chat {
        c.arg("--chat");
    }
    c.args(extra);
    ok(&mut c)
}

/// A running `primad`.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    http: reqwest::blocking::Client,
}

impl Daemon {
    /// Starts a daemon with a fresh state dir and `extra` appended to its
    /// config file (TOML).
    pub fn start(extra: &str) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("prima-test-")
            .tempdir()
            .expect("tempdir");
        let state_dir = tmp.path().join("state");
        let config = tmp.path().join("primad.toml");
        // Daemons in the machine's own namespace keep to loopback: no cluster
        // (no mDNS on the real network) unless a test asks for one.
        let text = if extra.contains("[cluster]") {
            extra.to_string()
        } else {
            format!("{extra}\n[cluster]\nenabled = false\n")
        };
        std::fs::write(&config, text).expect("writing config");
        let mut d = Self {
            child: None,
            port: free_port(),
            url: String::new(),
            state_dir,
            config,
            log: tmp.path().join("primad.log"),
            _tmp: Some(tmp),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("http client"),
        };
        d.url = format!("http://127.0.0.1:{}", d.port);
        d.spawn(env);
        d
    }

    /// (Re)starts the process on the same state dir, config and port.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(bin("primad"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--api-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "info,sled=warn")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawning primad"));
        self.wait_ready(Duration::from_secs(30));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let t = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("primad exited during start ({st}):\n{}", self.log());
            }
            if self
                .http
                .get(format!("{}/health", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(
                t.elapsed() < timeout,
                "primad not ready after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `primactl` pointed at this daemon.
    pub fn ctl(&self) -> Command {
        let mut c = Command::new(bin("primactl"));
        c.env("PRIMA_API", &self.url).env_remove("PRIMA_TOKEN");
        c
    }

    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    pub fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().expect("json")
    }

    /// POSTs JSON; returns status and body (JSON, or the text as a string).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn status(&self) -> Value {
        self.get("/api/status")
    }

    /// Registers a model through primactl.
    pub fn add_model(&self, path: &Path, name: Option<&str>) {
        let mut c = self.ctl();
        c.args(["models", "add"]).arg(path);
        if let Some(n) = name {
            c.args(["--name", n]);
        }
        ok(&mut c);
    }

    /// Peak resident memory of the process so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited 0.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if t.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `f` on the status until it holds or `timeout` passes.
    pub fn wait_status(&self, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                t.elapsed() < timeout,
                "condition not met in {timeout:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- primad log ({}) ---\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/status")) {
        let _ = f.read_to_string(&mut s);
    }
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Content of an OpenAI SSE answer: the concatenated deltas (chat) or texts,
/// the finish reason, and whether `[DONE]` closed it.
pub fn read_sse(body: &str) -> (String, Option<String>, bool, Vec<Value>) {
    let mut text = String::new();
    let mut finish = None;
    let mut done = false;
    let mut events = vec![];
    for line in body.lines() {
        let Some(p) = line.strip_prefix("data: ") else {
            continue;
        };
        if p == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(p).unwrap_or_else(|e| panic!("bad event {p}: {e}"));
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        events.push(v);
    }
    (text, finish, done, events)
}

/// A Python with the official `openai` client, in a venv cached outside the
/// repository (created on first use by scripts/py-venv).
pub fn openai_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = ok(Command::new(root.join("scripts/py-venv")).current_dir(&root));
    PathBuf::from(
        out.lines()
            .last()
            .expect("py-venv prints the python path")
            .trim(),
    )
}
