//! The HTTP API: OpenAI-compatible `/v1/*` and prima's own `/api/*`.

use std::{
    collections::VecDeque,
    convert::Infallible,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{delete, get, post},
    Json, Router,
};
use futures_util::{stream, Stream};
use prima_config::Config;
use prima_kernels::{tokenizer::chat::Message, SamplerConfig};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::{
    catalog,
    error::ApiError,
    store::{self, ModelEntry, Store},
    worker::{Event, GenRequest, Prompt, Worker},
};

pub struct AppState {
    pub cfg: Config,
    pub store: Arc<Store>,
    pub worker: Arc<Worker>,
    pub node_id: String,
    pub node_name: String,
    pub api_addr: String,
    pub started: Instant,
    pub cluster: Option<Arc<crate::cluster::service::ClusterCtl>>,
    pub ring: Option<Arc<crate::ring::Ring>>,
    pub gpu: crate::gpu::Handle,
}

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.api.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/api/status", get(status))
        .route("/api/models", get(api_models).post(api_add_model))
        .route("/api/models/pull", post(api_pull_model))
        .route("/api/models/{name}", delete(api_remove_model))
        .route("/api/profile", get(api_profile))
        .route("/api/pair", post(api_pair))
        .route("/api/join", post(api_join))
        .route("/api/devices", get(api_devices))
        .route(
            "/api/plan",
            get(api_plan).post(api_pin_plan).delete(api_unpin_plan),
        )
        .route("/api/devices/{name}", delete(api_remove_device))
        .route("/health", get(|| async { "ok\n" }))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint; see /v1/chat/completions, /v1/completions, /v1/models, /api/status",
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Bearer-token check when a token is configured (always, when the API is
/// reachable from other machines). `/health` stays open: it says nothing.
async fn auth(State(st): St, req: Request, next: Next) -> Response {
    let token = &st.cfg.api.token;
    if token.is_empty() || req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API token (send `Authorization: Bearer TOKEN`)",
        )
        .code("invalid_api_key")
        .into_response();
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a JSON body with errors that name the field and position.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than [api] max_body_bytes allows",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request(format!("invalid request: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid request: `{path}`: {inner}"))
        }
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The body of both completion endpoints (one struct rather than a
/// flattened pair, so that type errors name their field).
#[derive(Deserialize)]
struct Common {
    /// Chat: the conversation.
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    /// Completions: the text to continue.
    #[serde(default)]
    prompt: Option<PromptSpec>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<StopSpec>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    /// prima's own: speculative decoding for this request (default: as the
    /// daemon is configured).
    #[serde(default)]
    speculative: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

fn in_range(v: Option<f32>, lo: f32, hi: f32, name: &'static str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::bad_request(format!(
            "`{name}` must be between {lo} and {hi}, got {x}"
        ))
        .param(name)),
        _ => Ok(()),
    }
}

struct Prepared {
    model: ModelEntry,
    req: GenRequest,
    stream: bool,
    include_usage: bool,
}

impl AppState {
    fn resolve_model(&self, name: Option<&str>) -> Result<ModelEntry, ApiError> {
        let want = match name {
            None | Some("") | Some("default") => self.cfg.model.default.as_str(),
            Some(n) => n,
        };
        if let Some(m) = self.store.model(want)? {
            return Ok(m);
        }
        let known: Vec<String> = self.store.models()?.into_iter().map(|m| m.name).collect();
        let hint = if known.is_empty() {
            "no model is registered yet; add one with `primactl models add PATH` or \
             `primactl models pull NAME`"
                .to_string()
        } else {
            format!("registered: {}", known.join(", "))
        };
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model '{want}' does not exist ({hint})"),
        )
        .code("model_not_found")
        .param("model"))
    }

    fn prepare(&self, c: Common, prompt: Prompt) -> Result<Prepared, ApiError> {
        if c.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported").param("n"));
        }
        in_range(c.temperature, 0.0, 2.0, "temperature")?;
        in_range(c.top_p, 0.0, 1.0, "top_p")?;
        in_range(c.min_p, 0.0, 1.0, "min_p")?;
        in_range(c.presence_penalty, -2.0, 2.0, "presence_penalty")?;
        in_range(c.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
        in_range(c.repeat_penalty, 0.0, 10.0, "repeat_penalty")?;
        let max_tokens = c.max_completion_tokens.or(c.max_tokens);
        if max_tokens == Some(0) {
            return Err(
                ApiError::bad_request("`max_tokens` must be at least 1").param("max_tokens")
            );
        }
        let stop = match c.stop {
            None => vec![],
            Some(StopSpec::One(s)) => vec![s],
            Some(StopSpec::Many(v)) => v,
        };
        if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::bad_request(
                "`stop` takes up to 4 non-empty strings of at most 256 bytes",
            )
            .param("stop"));
        }
        let model = self.resolve_model(c.model.as_deref())?;
        let d = &self.cfg.sampling;
        let sampler = SamplerConfig {
            temperature: c.temperature.unwrap_or(d.temperature),
            top_p: c.top_p.unwrap_or(d.top_p),
            top_k: c.top_k.map(|k| k as usize).unwrap_or(d.top_k),
            min_p: c.min_p.unwrap_or(d.min_p),
            presence_penalty: c.presence_penalty.unwrap_or(0.0),
            frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
            repeat_penalty: c.repeat_penalty.unwrap_or(1.0),
            seed: c.seed.unwrap_or_else(rand::random),
            ..SamplerConfig::default()
        };
        Ok(Prepared {
            model,
            req: GenRequest {
                prompt,
                max_tokens: max_tokens.map(|n| n.min(1 << 20) as usize),
                stop,
                sampler,
                resume: None,
                speculative: c.speculative,
            },
            stream: c.stream.unwrap_or(false),
            include_usage: c.stream_options.unwrap_or_default().include_usage,
        })
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let mut r: Common = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let msgs = match r.messages.take() {
        Some(m) if !m.is_empty() => m,
        _ => {
            return ApiError::bad_request("`messages` must hold at least one message")
                .param("messages")
                .into_response()
        }
    };
    let mut messages = Vec::with_capacity(msgs.len());
    for m in msgs {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return ApiError::bad_request(format!(
                "unknown message role '{}' (system, user, assistant)",
                m.role
            ))
            .param("messages")
            .into_response();
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return ApiError::bad_request(format!(
                            "message content of type '{}' is not supported (text only)",
                            p.kind
                        ))
                        .param("messages")
                        .into_response();
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        messages.push(Message::new(role, content));
    }
    run_request(st, r, Prompt::Chat(messages), Kind::Chat).await
}

async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let mut r: Common = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match r.prompt.take() {
        None => {
            return ApiError::bad_request("`prompt` is required")
                .param("prompt")
                .into_response()
        }
        Some(PromptSpec::One(s)) => s,
        Some(PromptSpec::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(PromptSpec::Many(_)) => {
            return ApiError::bad_request("only a single prompt string is supported")
                .param("prompt")
                .into_response()
        }
    };
    run_request(st, r, Prompt::Raw(prompt), Kind::Text).await
}

async fn run_request(st: Arc<AppState>, c: Common, prompt: Prompt, kind: Kind) -> Response {
    let p = match st.prepare(c, prompt) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = unbounded_channel();
    let model_name = p.model.name.clone();
    if let Err(e) = st.worker.submit(p.model, p.req, tx) {
        return e.into_response();
    }
    // The first event says whether the prompt was accepted, so errors such as
    // an over-long prompt are a proper 4xx even for streaming requests.
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return e.into_response(),
        _ => return ApiError::internal("the inference worker stopped").into_response(),
    };
    let meta = Meta {
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now_secs(),
        model: model_name,
        kind,
    };
    if p.stream {
        let s = sse_stream(rx, meta, prompt_tokens, p.include_usage);
        return Sse::new(s).keep_alive(KeepAlive::default()).into_response();
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t, _)) => text.push_str(&t),
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                speculative,
            }) => {
                let usage = usage(prompt_tokens, completion_tokens, speculative);
                let choice = match kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                    Kind::Text => json!({
                        "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                    }),
                };
                return Json(json!({
                    "id": meta.id,
                    "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": meta.created,
                    "model": meta.model,
                    "system_fingerprint": fingerprint(),
                    "choices": [choice],
                    "usage": usage,
                }))
                .into_response();
            }
            Some(Event::Failed(e)) => return e.into_response(),
            Some(Event::Started { .. }) => {}
            None => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the request was cancelled (primad is shutting down)",
                )
                .into_response()
            }
        }
    }
}

fn fingerprint() -> String {
    concat!("prima-", env!("CARGO_PKG_VERSION")).to_string()
}

/// OpenAI's usage object; with speculative decoding, prima adds what the
/// draft did (clients that do not know the field ignore it).
fn usage(prompt: usize, completion: usize, spec: Option<crate::worker::SpecUsage>) -> Value {
    let mut u = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    });
    if let Some(s) = spec {
        u["speculative"] = json!(s);
    }
    u
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, delta_or_text: Value, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0, "delta": delta_or_text, "logprobs": null, "finish_reason": finish,
            }),
            Kind::Text => json!({
                "index": 0, "text": delta_or_text, "logprobs": null, "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint(),
            "choices": [choice],
        })
    }

    fn text(&self, t: &str) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(json!({"content": t}), None),
            Kind::Text => self.chunk(json!(t), None),
        }
    }
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    include_usage: bool,
    pending: VecDeque<SseEvent>,
    done: bool,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// OpenAI's chunk stream: a role chunk (chat), content chunks, a final chunk
/// with `finish_reason`, optionally a usage chunk, then `[DONE]`. Dropping it
/// (the client went away) drops the receiver, which cancels the generation.
fn sse_stream(
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    _prompt_tokens: usize,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut pending = VecDeque::new();
    if meta.kind == Kind::Chat {
        pending.push_back(data(
            &meta.chunk(json!({"role": "assistant", "content": ""}), None),
        ));
    }
    let state = StreamState {
        rx,
        meta,
        include_usage,
        pending,
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Text(t, _)) => s.pending.push_back(data(&s.meta.text(&t))),
                Some(Event::Started { .. }) => {}
                Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    speculative,
                }) => {
                    let last = match s.meta.kind {
                        Kind::Chat => s.meta.chunk(json!({}), Some(finish)),
                        Kind::Text => s.meta.chunk(json!(""), Some(finish)),
                    };
                    s.pending.push_back(data(&last));
                    if s.include_usage {
                        let mut u = s.meta.chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens, speculative);
                        s.pending.push_back(data(&u));
                    }
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                Some(Event::Failed(e)) => {
                    s.pending.push_back(data(&e.body()));
                    s.done = true;
                }
                None => {
                    s.pending.push_back(data(
                        &ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "server_error",
                            "the request was cancelled (primad is shutting down)",
                        )
                        .body(),
                    ));
                    s.done = true;
                }
            }
        }
    })
}

fn model_object(m: &ModelEntry) -> Value {
    json!({
        "id": m.name,
        "object": "model",
        "created": m.added,
        "owned_by": "prima",
    })
}

async fn list_models(State(st): St) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = st.store.models()?.iter().map(model_object).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn get_model(State(st): St, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let m = st.resolve_model(Some(&id))?;
    Ok(Json(model_object(&m)))
}

async fn status(State(st): St) -> Result<Json<Value>, ApiError> {
    let w = &st.worker;
    let s = &w.stats;
    let loaded = w.loaded.lock().expect("status lock").clone();
    let ring_plan = st
        .cluster
        .as_ref()
        .and_then(|c| c.status.read().expect("cluster status").plan.clone());
    let plan = match ring_plan {
        Some(p) => Some(plan_json(&p)),
        None => loaded.as_ref().map(|l| {
            json!({
                "epoch": 0,
                "model": l.name,
                "live": true,
                "k": 1,
                "devices": [{"node": st.node_name, "id": st.node_id, "layers": [[0, l.n_layers]]}],
            })
        }),
    };
    Ok(Json(json!({
        "node": {
            "id": st.node_id,
            "name": st.node_name,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": st.started.elapsed().as_secs(),
            "api_addr": st.api_addr,
            "state_dir": st.store.dir(),
            "pid": std::process::id(),
        },
        "model": {
            "default": st.cfg.model.default,
            "loaded": loaded,
            "registered": st.store.models()?.len(),
        },
        "plan": plan,
        "ring": st.ring.as_ref().map(|r| json!({
            "head_requests": r.stats.head_requests.load(Ordering::Relaxed),
            "forwarded": r.stats.forwarded.load(Ordering::Relaxed),
            "batches": r.stats.batches.load(Ordering::Relaxed),
            "resident": r.resident(),
            "bandwidth_mbit_s": r.local_ad().bandwidth,
        })),
        "cluster": st.cluster.as_ref().map(|c| c.status.read().expect("cluster status").clone()),
        "gpu": st.gpu.status(),
        "load": {
            "running": s.running.load(Ordering::Relaxed),
            "queued": w.queued(),
            "queue_limit": w.queue_limit,
            "completed": s.completed.load(Ordering::Relaxed),
            "cancelled": s.cancelled.load(Ordering::Relaxed),
            "failed": s.failed.load(Ordering::Relaxed),
            "invalid": s.invalid.load(Ordering::Relaxed),
            "rejected": s.rejected.load(Ordering::Relaxed),
            "prompt_tokens": s.prompt_tokens.load(Ordering::Relaxed),
            "completion_tokens": s.completion_tokens.load(Ordering::Relaxed),
            "failovers": s.failovers.load(Ordering::Relaxed),
            // Speculative decoding on this device (as the one answering or
            // heading the ring): drafts proposed and accepted.
            "spec_drafted": s.spec_drafted.load(Ordering::Relaxed),
            "spec_accepted": s.spec_accepted.load(Ordering::Relaxed),
        },
        "events": crate::events::recent(64),
    })))
}

async fn api_models(State(st): St) -> Result<Json<Value>, ApiError> {
    let models = st.store.models()?;
    let list: Vec<Value> = models
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).expect("json");
            v["present"] = json!(m.path.is_file());
            v["default"] = json!(m.name == st.cfg.model.default);
            v
        })
        .collect();
    Ok(Json(json!({ "models": list })))
}

async fn api_remove_model(
    State(st): St,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if st.store.remove_model(&name)? {
        tracing::info!(model = %name, "model removed from the registry");
        if let Some(r) = &st.ring {
            crate::serve::refresh_ring_ad(r, &st.store, &st.cfg.model.default);
        }
        Ok(Json(json!({ "removed": name })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no model named '{name}' is registered"),
        )
        .code("model_not_found"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRequest {
    path: PathBuf,
    #[serde(default)]
    name: Option<String>,
}

type ProgressTx = tokio::sync::mpsc::UnboundedSender<Value>;

/// Long admin operations answer with a stream of JSON events:
/// `{"event":"progress",...}`, then `{"event":"done",...}` or
/// `{"event":"error","message":..}`.
fn progress_response(rx: UnboundedReceiver<Value>) -> Response {
    let s = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|v| (Ok::<_, Infallible>(data(&v)), rx))
    });
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

async fn api_add_model(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r: AddRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !r.path.is_absolute() {
        return ApiError::bad_request(format!(
            "the path must be absolute (the daemon does not share your working directory): {}",
            r.path.display()
        ))
        .param("path")
        .into_response();
    }
    if let Some(n) = &r.name {
        if !store::valid_model_name(n) {
            return ApiError::bad_request(format!(
                "'{n}' is not a valid model name (1-64 of a-z 0-9 . _ -, starting with a letter or digit)"
            ))
            .param("name")
            .into_response();
        }
    }
    let meta = match std::fs::metadata(&r.path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => {
            return ApiError::bad_request(format!("{} is not a file", r.path.display()))
                .into_response()
        }
        Err(e) => {
            return ApiError::bad_request(format!("cannot read {}: {e}", r.path.display()))
                .param("path")
                .into_response()
        }
    };
    // Verify it is a model we can run before spending time hashing it.
    let path = r.path.clone();
    let arch = match tokio::task::spawn_blocking(move || verify_gguf(&path)).await {
        Ok(Ok(arch)) => arch,
        Ok(Err(e)) => {
            return ApiError::bad_request(format!(
                "{} is not a usable model: {e}",
                r.path.display()
            ))
            .code("invalid_model")
            .into_response()
        }
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let (tx, rx) = unbounded_channel();
    let size = meta.len();
    tokio::task::spawn_blocking(move || {
        let res = add_model(&st, r.path, r.name, arch, size, &tx);
        send_result(&tx, res);
    });
    progress_response(rx)
}

fn send_result(tx: &ProgressTx, res: anyhow::Result<ModelEntry>) {
    let _ = match res {
        Ok(entry) => tx.send(json!({"event": "done", "model": entry})),
        Err(e) => tx.send(json!({"event": "error", "message": format!("{e:#}")})),
    };
}

fn verify_gguf(path: &std::path::Path) -> anyhow::Result<String> {
    let model = prima_kernels::Model::open(path)?;
    prima_kernels::Tokenizer::from_metadata(&model.file.metadata)?;
    Ok(model.config.arch.name().to_string())
}

fn add_model(
    st: &AppState,
    path: PathBuf,
    name: Option<String>,
    arch: String,
    size: u64,
    tx: &ProgressTx,
) -> anyhow::Result<ModelEntry> {
    let sha256 = catalog::hash_file(
        &path,
        |done, total| {
            let _ = tx.send(
                json!({"event": "progress", "stage": "hashing", "done": done, "total": total}),
            );
        },
        || !tx.is_closed(),
    )?;
    let name = name.unwrap_or_else(|| match catalog::by_sha256(&sha256) {
        Some(c) => c.name.to_string(),
        None => store::name_from_path(&path),
    });
    if let Some(old) = st.store.model(&name)? {
        if old.sha256 != sha256 {
            anyhow::bail!(
                "a different model is already registered as '{name}' ({}); pick another name with --name or remove it first",
                old.path.display()
            );
        }
    }
    let entry = ModelEntry {
        name,
        path,
        sha256,
        size,
        arch,
        added: now_secs(),
    };
    st.store.put_model(&entry)?;
    tracing::info!(model = %entry.name, path = %entry.path.display(), "model registered");
    if let Some(r) = &st.ring {
        crate::serve::refresh_ring_ad(r, &st.store, &st.cfg.model.default);
    }
    Ok(entry)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullRequest {
    name: String,
}

async fn api_pull_model(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r: PullRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(model) = catalog::find(&r.name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "'{}' is not in the built-in catalog (known: {})",
                r.name,
                catalog::names()
            ),
        )
        .code("model_not_found")
        .into_response();
    };
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        let res = pull(&st, model, &tx).await;
        send_result(&tx, res);
    });
    progress_response(rx)
}

async fn pull(
    st: &Arc<AppState>,
    model: &'static catalog::CatalogModel,
    tx: &ProgressTx,
) -> anyhow::Result<ModelEntry> {
    let dest = st.cfg.models_dir();
    let mut dirs = vec![dest.clone()];
    dirs.extend(prima_kernels::models_dir());
    let _ = tx.send(json!({"event": "progress", "stage": "looking for a local copy", "done": 0, "total": model.size}));
    let local = tokio::task::spawn_blocking(move || catalog::find_local(model, &dirs)).await?;
    let path = match local {
        Some(p) => p,
        None => {
            let tx2 = tx.clone();
            let tx3 = tx.clone();
            catalog::fetch(
                model,
                &st.cfg.catalog.index_url,
                &dest,
                move |p| {
                    let _ = tx2.send(json!({"event": "progress", "stage": p.stage, "done": p.done, "total": p.total}));
                },
                move || !tx3.is_closed(),
            )
            .await?
        }
    };
    let arch = {
        let p = path.clone();
        tokio::task::spawn_blocking(move || verify_gguf(&p)).await??
    };
    if let Some(old) = st.store.model(model.name)? {
        if old.sha256 != model.sha256 {
            anyhow::bail!(
                "a different model is already registered as '{}' ({}); remove it first",
                model.name,
                old.path.display()
            );
        }
    }
    let entry = ModelEntry {
        name: model.name.to_string(),
        path,
        sha256: model.sha256.to_string(),
        size: model.size,
        arch,
        added: now_secs(),
    };
    st.store.put_model(&entry)?;
    tracing::info!(model = %entry.name, path = %entry.path.display(), "model pulled and registered");
    Ok(entry)
}

fn cluster_of(st: &AppState) -> Result<&Arc<crate::cluster::service::ClusterCtl>, ApiError> {
    st.cluster.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "the cluster is off on this device ([cluster] enabled = false)",
        )
    })
}

fn cluster_error(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        format!("{e:#}"),
    )
}

async fn api_pair(State(st): St) -> Result<Json<Value>, ApiError> {
    let c = cluster_of(&st)?;
    let (code, secs) = c.pair().await.map_err(cluster_error)?;
    Ok(Json(json!({"code": code, "expires_in_s": secs})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    code: String,
    #[serde(default)]
    addr: Option<String>,
}

async fn api_join(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r: JoinBody = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let c = match cluster_of(&st) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match c.join(&r.code, r.addr.as_deref()).await {
        Ok(roster) => Json(json!({"joined": true, "roster": roster})).into_response(),
        Err(e) => cluster_error(e).into_response(),
    }
}

async fn api_devices(State(st): St) -> Result<Json<Value>, ApiError> {
    let c = cluster_of(&st)?;
    let s = c.status.read().expect("cluster status").clone();
    Ok(Json(json!({"roster": s.roster, "devices": s.devices})))
}

async fn api_remove_device(
    State(st): St,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = cluster_of(&st)?;
    let r = c.remove(&name).await.map_err(cluster_error)?;
    Ok(Json(json!({"removed": name, "roster": r})))
}

#[derive(Deserialize, Default)]
struct ProfileQuery {
    #[serde(default)]
    refresh: bool,
}

/// What a cached profile is valid for: the same cores, memory, threads,
/// primad version and default model.
fn profile_fingerprint(st: &AppState) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let ram = crate::profiler::memory().0 >> 20;
    format!(
        "{cores}c/{ram}MiB/{}t/primad-{}/{}/gpu {}",
        prima_kernels::cpu::threads(),
        env!("CARGO_PKG_VERSION"),
        st.cfg.model.default,
        st.gpu.summary()
    )
}

/// The cached measured profile, if it is still valid for this device.
pub(crate) fn cached_profile(st: &AppState) -> Option<halda::DeviceProfile> {
    let c = st.store.profile().ok()??;
    if c["fingerprint"] != profile_fingerprint(st).as_str() {
        return None;
    }
    serde_json::from_value(c["profile"].clone()).ok()
}

/// This device's profile for Halda: cached in the store, measured again when
/// the hardware/software fingerprint changes or on `?refresh=true`.
async fn api_profile(
    State(st): St,
    axum::extract::Query(q): axum::extract::Query<ProfileQuery>,
) -> Result<Json<Value>, ApiError> {
    measure_profile(&st, q.refresh).await.map(Json)
}

/// Measures (or returns the cached) profile record.
pub(crate) async fn measure_profile(st: &Arc<AppState>, refresh: bool) -> Result<Value, ApiError> {
    // One measurement at a time (they share a scratch file and the CPU).
    static PROFILING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = PROFILING.lock().await;
    let fp = profile_fingerprint(st);
    if !refresh {
        if let Some(c) = st.store.profile()? {
            if c["fingerprint"] == fp.as_str() {
                return Ok(c);
            }
        }
    }
    let st2 = st.clone();
    let v = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let model = match st2.store.model(&st2.cfg.model.default)? {
            Some(m) if m.path.is_file() => Some(prima_kernels::Model::open(&m.path)?),
            _ => None,
        };
        let t = Instant::now();
        let p =
            crate::profiler::profile(&st2.node_name, model.as_ref(), st2.store.dir(), &st2.gpu)?;
        Ok(json!({
            "fingerprint": fp,
            "measured_at": now_secs(),
            "took_s": t.elapsed().as_secs_f64(),
            "profile": p,
            "gpu": st2.gpu.status(),
        }))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("profiling failed: {e:#}")))?;
    st.store.set_profile(&v)?;
    Ok(v)
}

/// A ring plan as the API shows it: per device its layers and readiness.
fn plan_json(p: &crate::cluster::net::PlanStatus) -> Value {
    let plan = &p.plan;
    let devices: Vec<Value> = plan
        .devices
        .iter()
        .enumerate()
        .map(|(rank, d)| {
            let layers: Vec<[usize; 2]> = plan
                .windows(rank)
                .iter()
                .map(|r| [r.start, r.end])
                .collect();
            json!({
                "rank": rank,
                "node": d.name,
                "id": d.id,
                "head": rank == 0,
                "window": d.window,
                "gpu_layers": d.gpu_layers,
                "layers": layers,
                "ready": p.ready.get(rank).copied().unwrap_or(false),
                "share": d.share,
                "set": d.set,
                "ram_bytes": d.ram_bytes,
                "ram_budget_bytes": d.ram_budget_bytes,
                "anon_bytes": d.anon_bytes,
                "disk_bytes_per_token": d.disk_bytes_per_token,
            })
        })
        .collect();
    json!({
        "epoch": plan.epoch,
        "model": plan.model,
        "n_layer": plan.n_layer,
        "k": plan.k,
        "live": p.live,
        "pinned": plan.pinned,
        "tpot_ms": plan.tpot_ms,
        "my_rank": p.my_rank,
        "coordinator": plan.coordinator,
        "devices": devices,
        "dropped": plan.dropped,
    })
}

async fn api_plan(State(st): St) -> Result<Json<Value>, ApiError> {
    let c = cluster_of(&st)?;
    let s = c.status.read().expect("cluster status").clone();
    let coordinator = s.coordinator.as_ref().map(|id| {
        s.devices
            .iter()
            .find(|d| &d.id == id)
            .map(|d| d.name.clone())
            .unwrap_or_else(|| id.clone())
    });
    Ok(Json(json!({
        "plan": s.plan.as_ref().map(plan_json),
        "coordinator": coordinator,
        "ring_enabled": st.ring.is_some(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    k: u32,
    /// `[[device, window], ...]`, head first.
    windows: Vec<(String, u32)>,
    /// Per device, how many of its window's layers run on its GPU.
    #[serde(default)]
    gpu_layers: Vec<u32>,
}

async fn api_pin_plan(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let b: PinBody = match parse_body(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let c = match cluster_of(&st) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let pin = crate::ring::Pin {
        k: b.k,
        windows: b.windows,
        gpu_layers: b.gpu_layers,
    };
    match c.pin(Some(pin)).await {
        Ok(()) => Json(json!({"pinned": true})).into_response(),
        Err(e) => ApiError::bad_request(format!("{e:#}"))
            .code("plan_refused")
            .into_response(),
    }
}

async fn api_unpin_plan(State(st): St) -> Result<Json<Value>, ApiError> {
    let c = cluster_of(&st)?;
    c.pin(None)
        .await
        .map_err(|e| ApiError::bad_request(format!("{e:#}")).code("plan_refused"))?;
    Ok(Json(json!({"pinned": false})))
}
