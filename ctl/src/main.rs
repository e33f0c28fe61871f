//! `primactl`: the command line for prima. It talks to a running `primad`
//! over its HTTP API (the same one OpenAI clients use).

use std::{
    io::{BufRead, BufReader, IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

const DEFAULT_API: &str = "http://127.0.0.1:7340";

#[derive(Parser)]
#[command(
    name = "primactl",
    version,
    about = "Ask questions and manage the prima daemon (primad) of this household",
    long_about = "Ask questions and manage the prima daemon (primad).\n\n\
        primactl talks to primad's API: the local one by default \
        (http://127.0.0.1:7340), another with --api URL or PRIMA_API. \
        Start the daemon with `primad` (or as a system service).\n\n\
        Examples:\n  \
        primactl ask \"Why is the sky blue?\"\n  \
        primactl models pull smollm2-135m\n  \
        primactl status"
)]
struct Cli {
    /// The daemon's API address.
    #[arg(long, global = true, env = "PRIMA_API", default_value = DEFAULT_API)]
    api: String,
    /// API token, when the daemon requires one.
    #[arg(long, global = true, env = "PRIMA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ask one question; the answer streams as it is generated.
    Ask(AskArgs),
    /// Talk back and forth; the conversation is kept until you leave (/exit).
    Chat(ChatArgs),
    /// Show this device: node, model, plan and load.
    Status {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
        /// Also show ring traffic and how much of this device's layer
        /// windows is in memory now.
        #[arg(long, short)]
        verbose: bool,
    },
    /// List, add, remove or download models.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Work with primad configuration files.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Measure time to first token and decode speed through the API.
    Bench(BenchArgs),
    /// Show this device's measured profile (what Halda plans with).
    Profile {
        /// Measure again instead of showing the cached profile.
        #[arg(long)]
        refresh: bool,
        /// Print the JSON (its "profile" is a `primad plan --devices` record).
        #[arg(long)]
        json: bool,
    },
    /// Show a pairing code for adding a device to this household.
    Pair {
        /// Print the code and return instead of waiting for the device.
        #[arg(long)]
        no_wait: bool,
    },
    /// Join the household of a device that shows a pairing code.
    Join {
        /// The code shown by `primactl pair` on a member, e.g. 123-456-789.
        code: String,
        /// The member's address (IP or IP:PORT) when mDNS cannot find it.
        #[arg(long)]
        addr: Option<String>,
    },
    /// List the household's devices, or remove one.
    Devices {
        #[command(subcommand)]
        cmd: Option<DevicesCmd>,
    },
    /// Show the ring plan (which device runs which layers), or pin one by hand.
    ///
    /// The coordinator plans with Halda whenever devices come or go or a
    /// profile changes; the plan is live once every device has loaded its
    /// layers. `plan set` pins a plan (on the coordinator), `plan clear`
    /// hands planning back to Halda.
    Plan {
        #[command(subcommand)]
        cmd: Option<PlanCmd>,
        /// Print the JSON.
        #[arg(long)]
        json: bool,
        /// Also say why devices hold no layers.
        #[arg(long)]
        explain: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Args, Clone)]
struct GenOpts {
    /// Model to use (default: the daemon's default model).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Most tokens to generate (default: the daemon's [model] max_tokens).
    #[arg(long, short = 'n')]
    max_tokens: Option<u64>,
    /// Sampling temperature; 0 is greedy and deterministic (default: the daemon's).
    #[arg(long, short = 't')]
    temperature: Option<f32>,
    /// Random seed, for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable, up to 4).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct AskArgs {
    /// The question; read from standard input when absent.
    prompt: Vec<String>,
    /// Send the text as is, without the model's chat template (completion).
    #[arg(long)]
    raw: bool,
    /// A system message to put before the question.
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// Print the whole response as JSON (not streamed).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gen: GenOpts,
}

#[derive(Args)]
struct ChatArgs {
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    gen: GenOpts,
}

#[derive(Subcommand)]
enum PlanCmd {
    /// Pin a plan: `primactl plan set --k 2 desk=3 laptop=7 phone=5` gives
    /// each device a window of that many layers per round, head first (the
    /// windows times k must add up to the model's layers). `laptop=7:4`
    /// runs the last 4 layers of each of laptop's windows on its GPU.
    Set {
        /// Rounds per token.
        #[arg(long, default_value_t = 1)]
        k: u32,
        /// DEVICE=WINDOW or DEVICE=WINDOW:GPU_LAYERS, head first.
        #[arg(required = true)]
        windows: Vec<String>,
    },
    /// Forget the pinned plan; Halda plans again.
    Clear,
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// List registered models.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Register a GGUF file on the daemon's machine (verified and hashed).
    Add {
        /// Path to the .gguf file (as the daemon sees it).
        path: PathBuf,
        /// Name to register it under (default: the catalog name if the file is
        /// a catalog model, else the file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Unregister a model (the file is left alone).
    Remove { name: String },
    /// Download a model of the built-in catalog and register it.
    Pull {
        /// smollm2-135m or gemma3-270m.
        name: String,
    },
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// List the household's devices (the default).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a device from the household (by name or id); it can no
    /// longer connect until paired again.
    Remove { name: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Check a primad.toml: syntax, unknown keys, values. Needs no daemon.
    Validate { file: PathBuf },
    /// Print the shipped default primad.toml, with comments.
    Default,
}

#[derive(Args)]
struct BenchArgs {
    /// Requests to send, one after another; the median is reported.
    #[arg(long, default_value_t = 5)]
    requests: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: u64,
    /// The question asked.
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    prompt: String,
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Compare speculative decoding with plain decoding: the same requests
    /// once without the daemon's draft and once with it, reporting the
    /// draft's acceptance rate and the speed-up (needs `[speculative]` set
    /// on the device that answers).
    #[arg(long)]
    speculative: bool,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("primactl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let api = Api::new(&cli.api, cli.token.clone())?;
    match cli.command {
        Command::Ask(a) => ask(&api, a),
        Command::Chat(a) => chat(&api, a),
        Command::Status { json, verbose } => status(&api, json, verbose),
        Command::Models(m) => models(&api, m),
        Command::Config(ConfigCmd::Validate { file }) => {
            let cfg = prima_config::Config::from_file(&file)?;
            println!(
                "{}: ok (api {}, default model {}, state dir {})",
                file.display(),
                cfg.api.addr,
                cfg.model.default,
                cfg.state_dir().display()
            );
            Ok(())
        }
        Command::Config(ConfigCmd::Default) => {
            print!("{}", prima_config::SHIPPED);
            Ok(())
        }
        Command::Bench(b) => bench(&api, b),
        Command::Pair { no_wait } => pair(&api, no_wait),
        Command::Profile { refresh, json } => {
            let v = api.get(if refresh {
                "/api/profile?refresh=true"
            } else {
                "/api/profile"
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let p = &v["profile"];
            println!(
                "device     {} ({}), measured in {:.1} s",
                s(&p["name"]),
                s(&p["os"]),
                v["took_s"].as_f64().unwrap_or(0.0)
            );
            for (ty, g) in p["cpu"]["flops"].as_object().into_iter().flatten() {
                println!(
                    "cpu        {ty:<6} {:8.1} GFLOPS",
                    g.as_f64().unwrap_or(0.0)
                );
            }
            let m = &p["memory"];
            println!(
                "memory     {} total, {} available for models, read {:.1} GB/s",
                human_bytes(m["total_bytes"].as_u64().unwrap_or(0)),
                human_bytes(m["available_bytes"].as_u64().unwrap_or(0)),
                m["bandwidth_gbps"].as_f64().unwrap_or(0.0)
            );
            println!(
                "disk       {:.2} GB/s sequential, {:.3} GB/s random 4 KiB",
                p["disk"]["seq_read_gbps"].as_f64().unwrap_or(0.0),
                p["disk"]["rnd_read_gbps"].as_f64().unwrap_or(0.0)
            );
            print_gpu(&v["gpu"], &p["gpus"]);
            Ok(())
        }
        Command::Join { code, addr } => {
            let mut body = json!({ "code": code });
            if let Some(a) = addr {
                body["addr"] = json!(a);
            }
            let v: Value = api.post("/api/join", &body)?.json()?;
            let names: Vec<String> = v["roster"]["members"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, m)| s(&m["name"]))
                .collect();
            println!("joined the household: {}", names.join(", "));
            Ok(())
        }
        Command::Devices { cmd } => match cmd.unwrap_or(DevicesCmd::List { json: false }) {
            DevicesCmd::List { json } => {
                let v = api.get("/api/status")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v["cluster"])?);
                } else {
                    print_cluster(&v["cluster"]);
                }
                Ok(())
            }
            DevicesCmd::Remove { name } => {
                api.delete(&format!("/api/devices/{}", path_segment(&name)))?;
                println!("removed {name} from the household");
                Ok(())
            }
        },
        Command::Plan { cmd, json, explain } => match cmd {
            None => {
                let v = api.get("/api/plan")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print_plan(&v, explain);
                }
                Ok(())
            }
            Some(PlanCmd::Set { k, windows }) => {
                let mut list = Vec::new();
                let mut gpu = Vec::new();
                for w in &windows {
                    let (name, n) = w
                        .rsplit_once('=')
                        .ok_or_else(|| anyhow!("'{w}' is not DEVICE=WINDOW"))?;
                    let (n, g) = n.split_once(':').unwrap_or((n, "0"));
                    let n: u32 = n
                        .parse()
                        .map_err(|_| anyhow!("'{w}': the window must be a number of layers"))?;
                    let g: u32 = g.parse().map_err(|_| {
                        anyhow!("'{w}': the GPU layers (after ':') must be a number")
                    })?;
                    list.push(json!([name, n]));
                    gpu.push(g);
                }
                api.post(
                    "/api/plan",
                    &json!({ "k": k, "windows": list, "gpu_layers": gpu }),
                )?;
                println!("plan pinned; devices are loading their layers (see `primactl plan`)");
                Ok(())
            }
            Some(PlanCmd::Clear) => {
                api.delete("/api/plan")?;
                println!("pin cleared; Halda plans again");
                Ok(())
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "primactl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Api {
    fn new(base: &str, token: Option<String>) -> Result<Self> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(None::<Duration>)
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Sends and turns connection failures and API errors into clear messages.
    fn send(&self, rb: reqwest::blocking::RequestBuilder) -> Result<reqwest::blocking::Response> {
        let resp = rb.send().map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                anyhow!(
                    "no primad is answering at {} ({}).\n  Start one with `primad` (or \
                     `systemctl start primad`), or point --api / PRIMA_API at a running one.",
                    self.base,
                    root_cause(&e)
                )
            } else {
                anyhow!("talking to primad at {}: {}", self.base, root_cause(&e))
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(String::from))
            .unwrap_or(body);
        bail!("{msg} (HTTP {})", status.as_u16())
    }

    fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .send(self.request(reqwest::Method::GET, path))?
            .json()?)
    }

    fn delete(&self, path: &str) -> Result<reqwest::blocking::Response> {
        self.send(self.request(reqwest::Method::DELETE, path))
    }

    fn post(&self, path: &str, body: &Value) -> Result<reqwest::blocking::Response> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
    }
}

/// Percent-encodes a name for use as one URL path segment.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Reads server-sent events, calling `f` with each `data:` payload until
/// `[DONE]` or the end of the stream.
fn for_each_event(
    resp: reqwest::blocking::Response,
    mut f: impl FnMut(Value) -> Result<()>,
) -> Result<()> {
    let reader = BufReader::new(resp);
    for line in reader.lines() {
        let line = line.context("reading the answer stream")?;
        let Some(payload) = line.strip_prefix("data:") else {
            continue;
        };
        let payload = payload.trim_start();
        if payload == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(payload)
            .with_context(|| format!("the daemon sent a malformed event: {payload}"))?;
        if let Some(msg) = v["error"]["message"].as_str() {
            bail!("{msg}");
        }
        f(v)?;
    }
    Ok(())
}

fn gen_body(g: &GenOpts) -> Value {
    let mut b = json!({});
    if let Some(m) = &g.model {
        b["model"] = json!(m);
    }
    if let Some(n) = g.max_tokens {
        b["max_tokens"] = json!(n);
    }
    if let Some(t) = g.temperature {
        b["temperature"] = json!(t);
    }
    if let Some(s) = g.seed {
        b["seed"] = json!(s);
    }
    if !g.stop.is_empty() {
        b["stop"] = json!(g.stop);
    }
    b
}

/// Streams a chat or completion answer to stdout; returns the text.
fn stream_answer(api: &Api, path: &str, mut body: Value) -> Result<String> {
    body["stream"] = json!(true);
    let resp = api.post(path, &body)?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    for_each_event(resp, |v| {
        let piece = v["choices"][0]["delta"]["content"]
            .as_str()
            .or_else(|| v["choices"][0]["text"].as_str())
            .unwrap_or("");
        if !piece.is_empty() {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            text.push_str(piece);
        }
        Ok(())
    })?;
    if !text.ends_with('\n') {
        writeln!(out)?;
    }
    Ok(text)
}

fn ask(api: &Api, a: AskArgs) -> Result<()> {
    let prompt = if a.prompt.is_empty() {
        if std::io::stdin().is_terminal() {
            bail!("give the question as an argument, e.g. primactl ask \"Why is the sky blue?\"");
        }
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        a.prompt.join(" ")
    };
    let mut body = gen_body(&a.gen);
    let path = if a.raw {
        body["prompt"] = json!(prompt);
        "/v1/completions"
    } else {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.push(json!({"role": "user", "content": prompt}));
        body["messages"] = json!(msgs);
        "/v1/chat/completions"
    };
    if a.json {
        let v: Value = api.post(path, &body)?.json()?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    stream_answer(api, path, body)?;
    Ok(())
}

fn chat(api: &Api, a: ChatArgs) -> Result<()> {
    let mut history = vec![];
    if let Some(s) = &a.system {
        history.push(json!({"role": "system", "content": s}));
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with primad at {}. /reset forgets, /exit (or ctrl-d) leaves.",
            api.base
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m["role"] == "system");
                eprintln!("(conversation forgotten)");
                continue;
            }
            "/help" => {
                eprintln!("/reset forgets the conversation, /exit leaves");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": line}));
        let mut body = gen_body(&a.gen);
        body["messages"] = json!(history);
        match stream_answer(api, "/v1/chat/completions", body) {
            Ok(answer) => history.push(json!({"role": "assistant", "content": answer})),
            Err(e) => {
                history.pop();
                eprintln!("primactl: error: {e:#}");
            }
        }
    }
    Ok(())
}

fn status(api: &Api, json: bool, verbose: bool) -> Result<()> {
    let v = api.get("/api/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let n = &v["node"];
    println!(
        "node    {} ({})  primad {}, up {}",
        s(&n["name"]),
        s(&n["id"]),
        s(&n["version"]),
        human_secs(n["uptime_s"].as_u64().unwrap_or(0))
    );
    println!("api     http://{}", s(&n["api_addr"]));
    let m = &v["model"];
    let loaded = match m["loaded"].as_object() {
        Some(l) => format!(
            "loaded {} ({}, {} layers, context {})",
            s(&l["name"]),
            s(&l["arch"]),
            l["n_layers"],
            l["ctx"]
        ),
        None => "none loaded yet".into(),
    };
    println!(
        "model   default {}; {} registered; {loaded}",
        s(&m["default"]),
        m["registered"]
    );
    match v["plan"]["devices"].as_array() {
        Some(devs) => {
            println!(
                "plan    epoch {}, k = {}, {}",
                v["plan"]["epoch"],
                v["plan"]["k"],
                if v["plan"]["live"] == json!(false) {
                    "loading"
                } else {
                    "live"
                }
            );
            for d in devs {
                let layers: Vec<String> = d["layers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| format!("{}..{}", r[0], r[1]))
                    .collect();
                println!("        {:<20} layers {}", s(&d["node"]), layers.join(", "));
            }
        }
        None => println!("plan    none yet (made when a model is first used)"),
    }
    if verbose && !v["ring"].is_null() {
        let r = &v["ring"];
        println!(
            "ring    {} answered as head, {} passed to the head, {} batches sent round",
            r["head_requests"], r["forwarded"], r["batches"]
        );
        if let Some(res) = r["resident"].as_array() {
            let parts: Vec<String> = res
                .iter()
                .enumerate()
                .map(|(i, f)| format!("window {i}: {:.0}%", f.as_f64().unwrap_or(0.0) * 100.0))
                .collect();
            println!("        resident in memory: {}", parts.join(", "));
        }
        if let Some(bw) = r["bandwidth_mbit_s"].as_array().filter(|b| !b.is_empty()) {
            let parts: Vec<String> = bw
                .iter()
                .map(|l| format!("{} {:.0} Mbit/s", s(&l[0]), l[1].as_f64().unwrap_or(0.0)))
                .collect();
            println!("        measured links: {}", parts.join(", "));
        }
    }
    print_cluster(&v["cluster"]);
    let l = &v["load"];
    println!(
        "load    running {}, queued {}/{}; completed {}, cancelled {}, failed {}, invalid {}, rejected {}",
        l["running"],
        l["queued"],
        l["queue_limit"],
        l["completed"],
        l["cancelled"],
        l["failed"],
        l["invalid"],
        l["rejected"]
    );
    print_events(&v["events"], if verbose { usize::MAX } else { 8 });
    Ok(())
}

/// The household's recent events (joins, failures, plans, resumed
/// answers), newest last, with how long each took.
fn print_events(events: &Value, n: usize) {
    let Some(list) = events.as_array().filter(|l| !l.is_empty()) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    println!(
        "events  (last {} of {}; --verbose shows all)",
        n.min(list.len()),
        list.len()
    );
    for e in list.iter().skip(list.len().saturating_sub(n)) {
        let ago = now.saturating_sub(e["at_ms"].as_u64().unwrap_or(0)) / 1000;
        let took = e["took_ms"]
            .as_u64()
            .map(|t| format!(" ({t} ms)"))
            .unwrap_or_default();
        println!(
            "        {:>6} ago  {:<8} {}{took}",
            human_secs(ago),
            s(&e["kind"]),
            s(&e["text"])
        );
    }
}

fn pair(api: &Api, no_wait: bool) -> Result<()> {
    let before = api.get("/api/status")?["cluster"]["roster"]["members"]
        .as_object()
        .map(|m| m.len())
        .unwrap_or(0);
    let v: Value = api.post("/api/pair", &json!({}))?.json()?;
    let code = s(&v["code"]);
    println!("Pairing code: {code}  (valid {} s)", v["expires_in_s"]);
    println!("On the new device, run:  primactl join {code}");
    if no_wait {
        return Ok(());
    }
    let spin = ProgressBar::new_spinner();
    spin.set_message("waiting for the device to join (ctrl-c to stop waiting)");
    let until = Instant::now() + Duration::from_secs(v["expires_in_s"].as_u64().unwrap_or(120));
    while Instant::now() < until {
        spin.tick();
        std::thread::sleep(Duration::from_millis(250));
        let st = api.get("/api/status")?;
        let c = &st["cluster"];
        let members = c["roster"]["members"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        if members.len() > before {
            spin.finish_and_clear();
            let names: Vec<String> = members.values().map(|m| s(&m["name"])).collect();
            println!("paired: the household is now {}", names.join(", "));
            return Ok(());
        }
        if c["pairing"] == false {
            spin.finish_and_clear();
            bail!("pairing closed without a new device (expired or too many wrong codes)");
        }
    }
    spin.finish_and_clear();
    bail!("the code expired; run `primactl pair` again")
}

fn print_cluster(c: &Value) {
    if c.is_null() || c["enabled"] == false {
        println!("cluster off ([cluster] enabled = false)");
        return;
    }
    println!(
        "cluster household {}{}, epoch {}, coordinator term {}",
        s(&c["household"]),
        if c["open_household"] == true {
            " (open: anyone on the LAN may join)"
        } else {
            ""
        },
        c["epoch"],
        c["term"]
    );
    println!(
        "        {:<16} {:<12} {:<22} {:>8}  {:<8} ID",
        "NAME", "ROLE", "ADDRESS", "RTT", "STATE"
    );
    for d in c["devices"].as_array().into_iter().flatten() {
        let rtt = d["rtt_ms"]
            .as_f64()
            .map(|r| format!("{r:.1} ms"))
            .unwrap_or_else(|| "-".into());
        let name = if d["this_device"] == true {
            format!("{} (this)", s(&d["name"]))
        } else {
            s(&d["name"])
        };
        println!(
            "        {:<16} {:<12} {:<22} {:>8}  {:<8} {}",
            name,
            s(&d["role"]),
            d["addr"].as_str().unwrap_or("-"),
            rtt,
            s(&d["state"]),
            s(&d["id"])
        );
    }
    for n in c["nearby_unpaired"].as_array().into_iter().flatten() {
        let addrs: Vec<String> = n["addrs"].as_array().into_iter().flatten().map(s).collect();
        println!(
            "        unpaired device nearby at {} (pair it with `primactl pair`)",
            addrs.join(", ")
        );
    }
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(String::from)
        .unwrap_or_else(|| v.to_string())
}

fn human_secs(t: u64) -> String {
    match t {
        0..60 => format!("{t} s"),
        60..3600 => format!("{} min", t / 60),
        _ => format!("{} h {} min", t / 3600, t % 3600 / 60),
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn models(api: &Api, cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::List { json } => {
            let v = api.get("/api/models")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let list = v["models"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no models registered; try `primactl models pull smollm2-135m`");
                return Ok(());
            }
            println!(
                "{:<24} {:<8} {:>10}  {:<12}  PATH",
                "NAME", "ARCH", "SIZE", "SHA256"
            );
            for m in list {
                let mut flags = String::new();
                if m["default"] == true {
                    flags.push_str("  (default)");
                }
                if m["present"] == false {
                    flags.push_str("  (file missing!)");
                }
                println!(
                    "{:<24} {:<8} {:>10}  {:<12}  {}{flags}",
                    s(&m["name"]),
                    s(&m["arch"]),
                    human_bytes(m["size"].as_u64().unwrap_or(0)),
                    &s(&m["sha256"])[..12.min(s(&m["sha256"]).len())],
                    s(&m["path"]),
                );
            }
            Ok(())
        }
        ModelsCmd::Add { path, name } => {
            let abs = std::fs::canonicalize(&path)
                .with_context(|| format!("cannot find {}", path.display()))?;
            let mut body = json!({"path": abs});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let resp = api.post("/api/models", &body)?;
            let m = follow_progress(resp)?;
            println!(
                "added {} ({}, {}, sha256 {}) from {}",
                s(&m["name"]),
                s(&m["arch"]),
                human_bytes(m["size"].as_u64().unwrap_or(0)),
                s(&m["sha256"]).get(..12).unwrap_or("?"),
                s(&m["path"])
            );
            Ok(())
        }
        ModelsCmd::Remove { name } => {
            api.delete(&format!("/api/models/{}", path_segment(&name)))?;
            println!("removed {name} (its file was left in place)");
            Ok(())
        }
        ModelsCmd::Pull { name } => {
            let resp = api.post("/api/models/pull", &json!({ "name": name }))?;
            let m = follow_progress(resp)?;
            println!("pulled {} to {}", s(&m["name"]), s(&m["path"]));
            Ok(())
        }
    }
}

/// Shows the daemon's progress events as a bar; returns the final model.
fn follow_progress(resp: reqwest::blocking::Response) -> Result<Value> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:<32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let mut stage = String::new();
    let mut result = None;
    let res = for_each_event(resp, |v| {
        match v["event"].as_str() {
            Some("progress") => {
                let st = s(&v["stage"]);
                if st != stage {
                    bar.reset();
                    bar.set_message(st.clone());
                    stage = st;
                }
                bar.set_length(v["total"].as_u64().unwrap_or(0));
                bar.set_position(v["done"].as_u64().unwrap_or(0));
            }
            Some("done") => result = Some(v["model"].clone()),
            Some("error") => bail!("{}", s(&v["message"])),
            _ => {}
        }
        Ok(())
    });
    bar.finish_and_clear();
    res?;
    result.ok_or_else(|| anyhow!("the daemon ended the operation without a result"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Speculation's counts: tokens drafted, drafts accepted, model passes.
type SpecCounts = (u64, u64, u64);

/// What one series of bench requests measured.
struct BenchRun {
    ttft_ms: f64,
    decode_tok_s: f64,
    tokens: u64,
    /// Summed over the requests.
    spec: Option<SpecCounts>,
}

/// One bench request: time to first token (ms), decode speed (tokens/s,
/// if more than one token), tokens, and what speculation did.
fn bench_request(
    api: &Api,
    b: &BenchArgs,
    speculative: Option<bool>,
) -> Result<(f64, Option<f64>, u64, Option<SpecCounts>)> {
    let mut body = json!({
        "messages": [{"role": "user", "content": b.prompt}],
        "max_tokens": b.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(m) = &b.model {
        body["model"] = json!(m);
    }
    if let Some(on) = speculative {
        body["speculative"] = json!(on);
    }
    let t0 = Instant::now();
    let resp = api.post("/v1/chat/completions", &body)?;
    let mut first = None;
    let mut completion = 0u64;
    let mut spec = None;
    for_each_event(resp, |v| {
        let piece = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !piece.is_empty() && first.is_none() {
            first = Some(t0.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            completion = n;
        }
        let sp = &v["usage"]["speculative"];
        if sp.is_object() {
            let n = |k: &str| sp[k].as_u64().unwrap_or(0);
            spec = Some((n("drafted"), n("accepted"), n("passes")));
        }
        Ok(())
    })?;
    let total = t0.elapsed();
    let first = first.unwrap_or(total);
    let decode =
        (completion > 1).then(|| (completion - 1) as f64 / (total - first).as_secs_f64().max(1e-9));
    Ok((first.as_secs_f64() * 1e3, decode, completion, spec))
}

/// `--requests` rounds; in each, one request per mode (alternating, so the
/// modes share the machine's slow and fast moments).
fn bench_series(api: &Api, b: &BenchArgs, modes: &[Option<bool>]) -> Result<Vec<BenchRun>> {
    #[derive(Clone, Default)]
    struct Acc {
        ttft: Vec<f64>,
        decode: Vec<f64>,
        tokens: u64,
        spec: Option<SpecCounts>,
    }
    let mut acc = vec![Acc::default(); modes.len()];
    for i in 0..b.requests {
        for (m, a) in modes.iter().zip(acc.iter_mut()) {
            let (ttft, decode, completion, spec) = bench_request(api, b, *m)?;
            a.ttft.push(ttft);
            a.decode.extend(decode);
            a.tokens = completion;
            if let Some((d, k, p)) = spec {
                let t = a.spec.get_or_insert((0, 0, 0));
                t.0 += d;
                t.1 += k;
                t.2 += p;
            }
            if !b.json {
                eprintln!(
                    "request {}/{}{}: first token {ttft:.0} ms, {completion} tokens{}",
                    i + 1,
                    b.requests,
                    match m {
                        Some(true) => " (speculative)",
                        Some(false) => " (plain)",
                        None => "",
                    },
                    decode.map_or(String::new(), |d| format!(", {d:.1} tokens/s")),
                );
            }
        }
    }
    Ok(acc
        .into_iter()
        .map(|a| BenchRun {
            ttft_ms: median(a.ttft),
            decode_tok_s: median(a.decode),
            tokens: a.tokens,
            spec: a.spec,
        })
        .collect())
}

fn bench(api: &Api, b: BenchArgs) -> Result<()> {
    if b.requests == 0 {
        bail!("--requests must be at least 1");
    }
    if !b.speculative {
        let r = bench_series(api, &b, &[None])?.remove(0);
        if b.json {
            println!(
                "{}",
                json!({"requests": b.requests, "ttft_ms_median": r.ttft_ms,
                       "decode_tok_s_median": r.decode_tok_s, "tokens": r.tokens})
            );
        } else {
            println!(
                "time to first token {:.0} ms (median), decode {:.1} tokens/s (median)",
                r.ttft_ms, r.decode_tok_s
            );
        }
        return Ok(());
    }
    let mut runs = bench_series(api, &b, &[Some(false), Some(true)])?.into_iter();
    let (plain, spec) = (runs.next().expect("two"), runs.next().expect("two"));
    let Some((drafted, accepted, passes)) = spec.spec else {
        bail!(
            "the daemon did not decode speculatively: set a draft in its [speculative] section \
             (draft_layers or draft_model) and restart it"
        );
    };
    let acceptance = accepted as f64 / (drafted.max(1)) as f64;
    let speedup = spec.decode_tok_s / plain.decode_tok_s.max(1e-9);
    if b.json {
        println!(
            "{}",
            json!({"requests": b.requests, "tokens": spec.tokens,
                   "plain": {"ttft_ms_median": plain.ttft_ms, "decode_tok_s_median": plain.decode_tok_s},
                   "speculative": {"ttft_ms_median": spec.ttft_ms, "decode_tok_s_median": spec.decode_tok_s,
                                   "drafted": drafted, "accepted": accepted, "passes": passes,
                                   "acceptance": acceptance},
                   "speedup": speedup})
        );
    } else {
        println!(
            "plain        first token {:.0} ms, decode {:.1} tokens/s (medians)",
            plain.ttft_ms, plain.decode_tok_s
        );
        println!(
            "speculative  first token {:.0} ms, decode {:.1} tokens/s (medians)",
            spec.ttft_ms, spec.decode_tok_s
        );
        println!(
            "draft        {:.0}% of {drafted} proposals accepted; {passes} passes of the model \
             for {} requests; speed-up {speedup:.2}x",
            100.0 * acceptance,
            b.requests
        );
    }
    Ok(())
}

/// `primactl plan`: one row per device in ring order.
/// The adapters this device offers, the one it uses (or why none), and
/// what the profiler measured on it.
fn print_gpu(gpu: &Value, measured: &Value) {
    let adapters = gpu["adapters"].as_array().cloned().unwrap_or_default();
    if adapters.is_empty() {
        println!("gpu        no adapter (no Vulkan, Metal or DX12 driver)");
    }
    for a in &adapters {
        let used = gpu["using"]["name"] == a["name"];
        println!(
            "adapter    {} ({}, {}{}){}",
            s(&a["name"]),
            s(&a["kind"]),
            s(&a["backend"]),
            match a["driver"].as_str() {
                Some(d) if !d.is_empty() => format!(", {d}"),
                _ => String::new(),
            },
            if used { "  <- in use" } else { "" }
        );
    }
    if gpu["using"].is_null() {
        if let Some(w) = gpu["why_not"].as_str().filter(|w| !w.is_empty()) {
            println!("gpu        not used: {w}");
        }
    }
    for g in measured.as_array().into_iter().flatten() {
        for (ty, f) in g["flops"].as_object().into_iter().flatten() {
            println!(
                "gpu        {ty:<6} {:8.1} GFLOPS",
                f.as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "gpu        {} for layers, kv copy {:.4} ms",
            human_bytes(g["vram_free_bytes"].as_u64().unwrap_or(0)),
            g["kv_copy_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

fn print_plan(v: &Value, explain: bool) {
    let p = &v["plan"];
    if p.is_null() {
        if v["ring_enabled"] == json!(false) {
            println!("the ring is off on this device ([ring] enabled = false)");
        } else {
            println!(
                "no plan yet: the coordinator ({}) plans once it holds the model \
                 (`primactl models pull`)",
                v["coordinator"].as_str().unwrap_or("not elected yet")
            );
        }
        return;
    }
    println!(
        "plan epoch {} for {} ({} layers): k = {} round{}, {}{}",
        p["epoch"],
        s(&p["model"]),
        p["n_layer"],
        p["k"],
        if p["k"] == json!(1) { "" } else { "s" },
        if p["live"] == json!(true) {
            "live"
        } else {
            "loading"
        },
        if p["pinned"] == json!(true) {
            ", pinned by hand"
        } else {
            ", made by Halda"
        },
    );
    if let Some(t) = p["tpot_ms"].as_f64() {
        println!("predicted {t:.1} ms per token");
    }
    println!(
        "{:<4} {:<20} {:>6} {:>4} {:<22} {:>4} {:>19} {:>10} {:>6} {:>5}",
        "rank",
        "device",
        "window",
        "gpu",
        "layers",
        "set",
        "memory / budget",
        "disk/token",
        "share",
        "ready"
    );
    let mb = |v: &Value| v.as_u64().map(|b| format!("{:.0} MB", b as f64 / 1e6));
    for d in p["devices"].as_array().into_iter().flatten() {
        let layers: Vec<String> = d["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{}-{}", r[0], r[1].as_u64().unwrap_or(1).saturating_sub(1)))
            .collect();
        let mut name = s(&d["node"]);
        if d["head"] == json!(true) {
            name.push_str(" (head)");
        }
        let memory = match (mb(&d["ram_bytes"]), mb(&d["ram_budget_bytes"])) {
            (Some(a), Some(b)) => format!("{a} / {b}"),
            _ => "-".into(),
        };
        println!(
            "{:<4} {:<20} {:>6} {:>4} {:<22} {:>4} {:>19} {:>10} {:>6} {:>5}",
            d["rank"].to_string(),
            name,
            d["window"].to_string(),
            d["gpu_layers"].to_string(),
            layers.join(","),
            d["set"].as_str().unwrap_or("-"),
            memory,
            mb(&d["disk_bytes_per_token"]).unwrap_or_else(|| "-".into()),
            d["share"]
                .as_f64()
                .map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_else(|| "-".into()),
            if d["ready"] == json!(true) {
                "yes"
            } else {
                "no"
            },
        );
    }
    let dropped = p["dropped"].as_array().cloned().unwrap_or_default();
    if explain {
        if dropped.is_empty() {
            println!("every device that holds the model has layers");
        }
        for d in &dropped {
            println!("left out: {}: {}", s(&d["name"]), s(&d["why"]));
        }
    } else if !dropped.is_empty() {
        println!(
            "{} device(s) left out; `primactl plan --explain` says why",
            dropped.len()
        );
    }
}
