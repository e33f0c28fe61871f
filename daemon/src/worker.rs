//! The inference worker: one OS thread that owns the loaded model and answers
//! queued requests one at a time (the forward pass itself runs on the
//! kernels' worker pool, so one request at a time already uses every core).
//!
//! Admission is a semaphore with `queue_limit + 1` permits (the running
//! request plus those waiting): a request that finds none left gets HTTP 429
//! at once instead of piling up. A request whose client has gone (its event
//! receiver dropped) is skipped if still queued and stops at the next token
//! if running.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Instant,
};

use axum::http::StatusCode;
use prima_kernels::{
    engine::{self, FinishReason, GenerateParams},
    model::ModelError,
    speculative::{Draft, ModelDraft, SelfDraft, Speculative},
    tokenizer::chat::Message,
    Model, Sampler, SamplerConfig, Tokenizer,
};
use tokio::sync::{mpsc::UnboundedSender, OwnedSemaphorePermit, Semaphore};

use crate::{
    error::ApiError,
    ring::{AskEvent, Ring, Route},
    store::ModelEntry,
};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Messages rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Text taken literally (BOS added as the model asks).
    Raw(String),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenRequest {
    pub prompt: Prompt,
    /// None: the configured default, capped by the context left.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub sampler: SamplerConfig,
    /// An answer another head began and lost: go on after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// Speculative decoding for this request; None: as configured
    /// (`[speculative]`). A request cannot turn it on where no draft is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<bool>,
}

/// What speculative decoding did for one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpecUsage {
    /// Tokens the draft proposed.
    pub drafted: usize,
    /// Proposals the model agreed with (tokens gained).
    pub accepted: usize,
    /// Passes of the model (trips round the ring), the prompt's included.
    pub passes: usize,
}

impl From<prima_kernels::speculative::SpecStats> for SpecUsage {
    fn from(s: prima_kernels::speculative::SpecStats) -> Self {
        Self {
            drafted: s.drafted,
            accepted: s.accepted,
            passes: s.target_passes,
        }
    }
}

/// The draft speculative decoding uses.
#[derive(Debug, Clone, PartialEq)]
pub enum DraftSource {
    /// The model's own first N layers and output head.
    Layers(usize),
    /// Another GGUF with the same vocabulary.
    Model(std::path::PathBuf),
}

#[derive(Debug, Clone)]
pub struct SpecSettings {
    pub draft: DraftSource,
    pub params: prima_kernels::speculative::SpecParams,
}

/// The part of an answer that already reached the client.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    /// Every token generated so far (some may still be held back as text).
    pub ids: Vec<u32>,
    /// Bytes of their text the client has.
    pub emitted: usize,
}

/// Most times one request moves to a new head after the ring failed under it.
/// Each move waits for a newer plan, so this bounds a run of faults, not a
/// spin: a device restarting and then losing its link within seconds (seen
/// in the churn test) costs three or four moves by itself.
const MAX_FAILOVERS: u32 = 6;

#[derive(Debug)]
pub enum Event {
    /// The prompt fits and generation began.
    Started {
        prompt_tokens: usize,
    },
    /// A piece of the answer and the tokens generated since the last piece.
    Text(String, Vec<u32>),
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Set when speculative decoding ran.
        speculative: Option<SpecUsage>,
    },
    Failed(ApiError),
}

struct Job {
    model: ModelEntry,
    req: GenRequest,
    events: UnboundedSender<Event>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
pub struct Stats {
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Requests the engine could not answer (5xx).
    pub failed: AtomicU64,
    /// Requests refused for what they asked (4xx), e.g. too long a prompt.
    pub invalid: AtomicU64,
    /// Requests turned away because the queue was full (429).
    pub rejected: AtomicU64,
    pub running: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Speculative decoding: tokens drafted and drafts accepted.
    pub spec_drafted: AtomicU64,
    pub spec_accepted: AtomicU64,
    /// Requests that moved to a new head after the ring failed under them.
    pub failovers: AtomicU64,
}

#[derive(Clone, Default, serde::Serialize)]
pub struct Loaded {
    pub name: String,
    pub arch: String,
    pub n_layers: usize,
    pub ctx: usize,
}

pub struct Settings {
    pub ctx: usize,
    pub default_max_tokens: usize,
    pub queue_limit: usize,
    /// The household's ring, when the cluster runs: requests for its model
    /// go through it once a plan is live.
    pub ring: Option<(Arc<Ring>, tokio::runtime::Handle)>,
    /// Speculative decoding where this device answers or heads the ring.
    pub spec: Option<SpecSettings>,
}

pub struct Worker {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    sem: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    pub loaded: Arc<Mutex<Option<Loaded>>>,
    /// Set at shutdown once the grace period is over: running requests stop.
    pub abort: Arc<AtomicBool>,
    pub queue_limit: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Worker {
    pub fn start(settings: Settings) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(Stats::default());
        let loaded = Arc::new(Mutex::new(None));
        let abort = Arc::new(AtomicBool::new(false));
        let queue_limit = settings.queue_limit;
        let thread = {
            let (stats, loaded, abort) = (stats.clone(), loaded.clone(), abort.clone());
            std::thread::Builder::new()
                .name("prima-infer".into())
                .spawn(move || run(rx, settings, &stats, &loaded, &abort))
                .expect("spawning the inference thread")
        };
        Arc::new(Self {
            jobs: Mutex::new(Some(tx)),
            sem: Arc::new(Semaphore::new(queue_limit + 1)),
            stats,
            loaded,
            abort,
            queue_limit,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a request; `Err` is the 429 (or 503 when shutting down).
    pub fn submit(
        &self,
        model: ModelEntry,
        req: GenRequest,
        events: UnboundedSender<Event>,
    ) -> Result<(), ApiError> {
        let permit = self.sem.clone().try_acquire_owned().map_err(|_| {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the request queue is full ({} waiting); try again shortly",
                    self.queue_limit
                ),
            )
            .code("queue_full")
        })?;
        let job = Job {
            model,
            req,
            events,
            _permit: permit,
        };
        let jobs = self.jobs.lock().expect("jobs lock");
        match jobs.as_ref().map(|tx| tx.send(job).is_ok()) {
            Some(true) => Ok(()),
            _ => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "primad is shutting down",
            )),
        }
    }

    /// Requests waiting (not counting the running one).
    pub fn queued(&self) -> usize {
        let in_use = self.queue_limit + 1 - self.sem.available_permits();
        in_use.saturating_sub(self.stats.running.load(Ordering::Relaxed) as usize)
    }

    /// Stops taking jobs, lets queued ones drain and waits for the thread.
    pub fn stop(&self) {
        self.jobs.lock().expect("jobs lock").take();
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

struct LoadedModel {
    entry: ModelEntry,
    model: Model,
    tok: Tokenizer,
    /// The draft model (`[speculative] draft_model`), mapped on first use.
    draft: Option<Model>,
}

fn run(
    rx: mpsc::Receiver<Job>,
    settings: Settings,
    stats: &Stats,
    loaded_info: &Mutex<Option<Loaded>>,
    abort: &AtomicBool,
) {
    let mut loaded: Option<LoadedModel> = None;
    loop {
        let job = match rx.recv_timeout(std::time::Duration::from_secs(1)) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A device that no longer heads the ring for its loaded
                // model gives back the tokenizer and the model's metadata
                // (about 20 MB), which Halda counts only on the head.
                let forwards = match (&loaded, &settings.ring) {
                    (Some(l), Some((ring, _))) => {
                        matches!(ring.route(&l.entry.sha256), Route::Forward(_))
                    }
                    _ => false,
                };
                if forwards {
                    loaded = None;
                    *loaded_info.lock().expect("status lock") = None;
                    crate::memory::release_free();
                    tracing::debug!("not the ring's head: the loaded model is dropped");
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if job.events.is_closed() {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if abort.load(Ordering::Relaxed) {
            let _ = job.events.send(Event::Failed(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "primad is shutting down",
            )));
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        stats.running.fetch_add(1, Ordering::Relaxed);
        let outcome = serve(&mut loaded, &job, &settings, stats, abort);
        // Counters are settled before the client hears the end, so a status
        // read after an answer already counts it.
        *loaded_info.lock().expect("status lock") = loaded.as_ref().map(|l| Loaded {
            name: l.entry.name.clone(),
            arch: l.model.config.arch.name().to_string(),
            n_layers: l.model.config.n_layer,
            ctx: settings.ctx.min(l.model.config.ctx_train),
        });
        match outcome {
            Ok(Some(done)) => {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                stats.running.fetch_sub(1, Ordering::Relaxed);
                let _ = job.events.send(done);
            }
            Ok(None) => {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                stats.running.fetch_sub(1, Ordering::Relaxed);
            }
            Err(e) => {
                if e.status.is_client_error() {
                    tracing::info!(error = %e, "request refused");
                    stats.invalid.fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::warn!(error = %e, "request failed");
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                stats.running.fetch_sub(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Failed(e));
            }
        }
    }
}

fn load(entry: &ModelEntry) -> Result<LoadedModel, ApiError> {
    let t = Instant::now();
    let model = Model::open(&entry.path).map_err(|e| {
        ApiError::internal(format!(
            "model '{}' ({}) cannot be loaded: {e}",
            entry.name,
            entry.path.display()
        ))
        .code("model_load_failed")
    })?;
    let tok = Tokenizer::from_metadata(&model.file.metadata).map_err(|e| {
        ApiError::internal(format!(
            "the tokenizer of model '{}' cannot be loaded: {e}",
            entry.name
        ))
        .code("model_load_failed")
    })?;
    tracing::info!(model = %entry.name, elapsed = ?t.elapsed(), "model loaded");
    Ok(LoadedModel {
        entry: entry.clone(),
        model,
        tok,
        draft: None,
    })
}

/// What the client of a job has been sent: enough for another head to
/// resume the answer.
#[derive(Default)]
struct Progress {
    started: bool,
    resume: Resume,
}

/// Runs one job; returns the final event to send, None when it was cancelled.
///
/// When the ring fails under the answer (its head died, or the ring could
/// not heal in time), the job waits for the coordinator's next plan and
/// resumes on its head from the tokens the client already has: the client
/// sees a pause, not an error.
fn serve(
    loaded: &mut Option<LoadedModel>,
    job: &Job,
    settings: &Settings,
    stats: &Stats,
    abort: &AtomicBool,
) -> Result<Option<Event>, ApiError> {
    let mut progress = Progress {
        started: false,
        resume: job.req.resume.clone().unwrap_or_default(),
    };
    let mut failovers = 0;
    loop {
        let route = match &settings.ring {
            Some((ring, _)) => ring.route(&job.model.sha256),
            None => Route::Local,
        };
        let epoch = match &route {
            Route::Head(p) | Route::Forward(p) => p.epoch,
            Route::Local => 0,
        };
        let out = match (&route, &settings.ring) {
            (Route::Forward(plan), Some((ring, handle))) => {
                forward(ring, handle, plan, job, stats, &mut progress)
            }
            _ => serve_here(loaded, job, settings, stats, abort, &route, &mut progress),
        };
        match (out, &settings.ring) {
            (Err(e), Some((ring, _)))
                if e.code == Some("ring_failed")
                    && failovers < MAX_FAILOVERS
                    && !job.events.is_closed()
                    && !abort.load(Ordering::Relaxed) =>
            {
                failovers += 1;
                let t = Instant::now();
                tracing::warn!(error = %e, epoch, tokens = progress.resume.ids.len(),
                    "the ring failed under the answer: waiting for the next plan to resume it");
                // A dead head is noticed after `dead_after`; if it was the
                // coordinator too, a new one is elected first.
                let wait = ring.dead_after * 3 + ring.settings.timeout;
                if ring.wait_for_plan_after(epoch, None, wait).is_none() {
                    return Err(e);
                }
                stats.failovers.fetch_add(1, Ordering::Relaxed);
                crate::events::record(
                    "failover",
                    format!(
                        "answer moves to the new plan's head with {} tokens kept ({})",
                        progress.resume.ids.len(),
                        e.message
                    ),
                    Some(t.elapsed()),
                );
            }
            (out, _) => return out,
        }
    }
}

/// Answers a job on this device: alone, or as the head of the ring.
fn serve_here(
    loaded: &mut Option<LoadedModel>,
    job: &Job,
    settings: &Settings,
    stats: &Stats,
    abort: &AtomicBool,
    route: &Route,
    progress: &mut Progress,
) -> Result<Option<Event>, ApiError> {
    let stale = loaded
        .as_ref()
        .is_none_or(|l| l.entry.path != job.model.path || l.entry.sha256 != job.model.sha256);
    if stale {
        *loaded = None; // unmap the old model before mapping the new one
        *loaded = Some(load(&job.model)?);
    }
    let spec = settings
        .spec
        .as_ref()
        .filter(|_| job.req.speculative != Some(false));
    if let (Some(sp), Some(lm)) = (spec, loaded.as_mut()) {
        if let (DraftSource::Model(p), None) = (&sp.draft, &lm.draft) {
            lm.draft = Some(load_draft(p, &lm.model)?);
        }
    }
    let lm = loaded.as_ref().expect("loaded above");
    let (model, tok) = (&lm.model, &lm.tok);
    let (text, parse_special) = match &job.req.prompt {
        Prompt::Chat(messages) => (
            tok.apply_chat_template(messages)
                .map_err(|e| ApiError::bad_request(format!("chat template: {e}")))?,
            true,
        ),
        Prompt::Raw(s) => (s.clone(), false),
    };
    let ids = tok
        .encode(&text, true, parse_special)
        .map_err(|e| ApiError::bad_request(format!("tokenizing the prompt: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    let ctx = settings.ctx.min(model.config.ctx_train);
    if ids.len() >= ctx {
        return Err(ApiError::bad_request(format!(
            "the prompt is {} tokens but the context of model '{}' is {ctx} tokens \
             (prompt and answer together); shorten the prompt",
            ids.len(),
            lm.entry.name
        ))
        .code("context_length_exceeded")
        .param("messages"));
    }
    let room = ctx - ids.len();
    let max_tokens = job
        .req
        .max_tokens
        .unwrap_or(settings.default_max_tokens)
        .min(room);
    let resume = &progress.resume;
    if let Some(&bad) = resume.ids.iter().find(|&&t| t as usize >= tok.n_vocab()) {
        return Err(ApiError::bad_request(format!(
            "the answer to resume holds token {bad}, outside the vocabulary of {}",
            tok.n_vocab()
        )));
    }
    if resume.ids.len() >= room {
        return Err(ApiError::bad_request(format!(
            "the answer to resume ({} tokens) leaves no room in the context",
            resume.ids.len()
        ))
        .code("context_length_exceeded"));
    }
    if !progress.started {
        if job
            .events
            .send(Event::Started {
                prompt_tokens: ids.len(),
            })
            .is_err()
        {
            return Ok(None);
        }
        progress.started = true;
    }
    let params = GenerateParams {
        max_tokens,
        stop: job.req.stop.clone(),
        ctx,
        resume: resume.ids.clone(),
        resume_emitted: resume.emitted,
    };
    let mut sampler = Sampler::new(job.req.sampler.clone());
    let mut cancelled = false;
    let kept = &mut progress.resume;
    let on_text = |piece: &str, new: &[u32]| {
        kept.ids.extend_from_slice(new);
        kept.emitted += piece.len();
        if abort.load(Ordering::Relaxed)
            || job
                .events
                .send(Event::Text(piece.into(), new.to_vec()))
                .is_err()
        {
            cancelled = true;
            return false;
        }
        true
    };
    let draft = match spec {
        Some(sp) => Some((draft_for(sp, lm, ctx)?, sp.params)),
        None => None,
    };
    let ring_err =
        |e: String| ApiError::new(StatusCode::BAD_GATEWAY, "server_error", e).code("ring_failed");
    let model_err = |e: String| ApiError::internal(format!("generation failed: {e}"));
    let mut spec_usage = None;
    let g = match (route, &settings.ring, draft) {
        (Route::Head(plan), Some((ring, _)), draft) => {
            ring.stats.head_requests.fetch_add(1, Ordering::Relaxed);
            // The session's caches on every device hold the prompt and the
            // answer, not the whole context: a device short of memory
            // streams fewer weights while the session lives.
            let mut session = ring.session(plan.clone(), (ids.len() + max_tokens).min(ctx));
            match draft {
                Some((d, sp)) => {
                    let mut s = Speculative::new(&mut session, d, sp);
                    s.set_end(ids.len() + max_tokens);
                    let g =
                        engine::generate_with(&mut s, tok, &ids, &params, &mut sampler, on_text)
                            .map_err(|e| ring_err(e.to_string()))?;
                    spec_usage = Some(SpecUsage::from(s.stats));
                    g
                }
                None => {
                    engine::generate_with(&mut session, tok, &ids, &params, &mut sampler, on_text)
                        .map_err(ring_err)?
                }
            }
        }
        (_, _, Some((d, sp))) => {
            let mut target = engine::Session::new(model, ctx);
            let mut s = Speculative::new(&mut target, d, sp);
            s.set_end(ids.len() + max_tokens);
            let g = engine::generate_with(&mut s, tok, &ids, &params, &mut sampler, on_text)
                .map_err(|e| model_err(e.to_string()))?;
            spec_usage = Some(SpecUsage::from(s.stats));
            g
        }
        _ => engine::generate(model, tok, &ids, &params, &mut sampler, on_text)
            .map_err(|e: ModelError| model_err(e.to_string()))?,
    };
    if let Some(u) = &spec_usage {
        stats
            .spec_drafted
            .fetch_add(u.drafted as u64, Ordering::Relaxed);
        stats
            .spec_accepted
            .fetch_add(u.accepted as u64, Ordering::Relaxed);
    }
    stats
        .prompt_tokens
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    stats
        .completion_tokens
        .fetch_add(g.ids.len() as u64, Ordering::Relaxed);
    if cancelled {
        tracing::info!(generated = g.ids.len(), "request cancelled");
        return Ok(None);
    }
    let finish = match g.finish {
        FinishReason::Eog | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    };
    tracing::info!(
        prompt_tokens = ids.len(),
        generated = g.ids.len(),
        decode_tok_s = format!(
            "{:.1}",
            g.ids.len() as f64 / g.decode_time.as_secs_f64().max(1e-9)
        ),
        spec = ?spec_usage,
        "request done"
    );
    Ok(Some(Event::Done {
        finish,
        prompt_tokens: ids.len(),
        completion_tokens: g.ids.len(),
        speculative: spec_usage,
    }))
}

/// Maps the draft model of `[speculative] draft_model`, which must share the
/// model's vocabulary.
fn load_draft(path: &std::path::Path, target: &Model) -> Result<Model, ApiError> {
    let d = Model::open(path).map_err(|e| {
        ApiError::internal(format!(
            "the speculative draft {} cannot be loaded: {e}",
            path.display()
        ))
        .code("model_load_failed")
    })?;
    ModelDraft::check(&d, target).map_err(|e| {
        ApiError::internal(format!(
            "the speculative draft {} ([speculative] draft_model) cannot be used: {e}",
            path.display()
        ))
        .code("model_load_failed")
    })?;
    Ok(d)
}

/// The draft for one answer with a context of `ctx`.
fn draft_for<'m>(
    sp: &SpecSettings,
    lm: &'m LoadedModel,
    ctx: usize,
) -> Result<Draft<'m>, ApiError> {
    Ok(match &sp.draft {
        DraftSource::Layers(n) => {
            Draft::Layers(SelfDraft::new(&lm.model, *n, ctx).map_err(|_| {
                ApiError::internal(format!(
                    "[speculative] draft_layers = {n}, but model '{}' has {} layers: the draft \
                     must be fewer",
                    lm.entry.name, lm.model.config.n_layer
                ))
            })?)
        }
        DraftSource::Model(_) => Draft::Model(Box::new(ModelDraft::new(
            lm.draft.as_ref().expect("loaded before the answer"),
            ctx,
        ))),
    })
}

/// Passes a job to the ring's head and relays its answer.
fn forward(
    ring: &Ring,
    handle: &tokio::runtime::Handle,
    plan: &crate::ring::plan::RingPlan,
    job: &Job,
    stats: &Stats,
    progress: &mut Progress,
) -> Result<Option<Event>, ApiError> {
    let head = &plan.devices[0].name;
    let mut req = job.req.clone();
    if !progress.resume.ids.is_empty() {
        req.resume = Some(progress.resume.clone());
    }
    let relay = |ev: AskEvent| match ev {
        AskEvent::Started { prompt_tokens } => {
            // A head that resumes the answer starts again; the client
            // heard the start once.
            if progress.started {
                return true;
            }
            progress.started = true;
            job.events.send(Event::Started { prompt_tokens }).is_ok()
        }
        AskEvent::Text { text, ids } => {
            progress.resume.ids.extend_from_slice(&ids);
            progress.resume.emitted += text.len();
            job.events.send(Event::Text(text, ids)).is_ok()
        }
        _ => true,
    };
    match ring.forward_blocking(handle, plan, &req, relay) {
        Ok(Some(AskEvent::Done {
            finish,
            prompt_tokens,
            completion_tokens,
            speculative,
        })) => {
            stats
                .prompt_tokens
                .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
            stats
                .completion_tokens
                .fetch_add(completion_tokens as u64, Ordering::Relaxed);
            tracing::info!(%head, prompt_tokens, completion_tokens, "request answered by the ring's head");
            Ok(Some(Event::Done {
                finish: if finish == "length" { "length" } else { "stop" },
                prompt_tokens,
                completion_tokens,
                speculative,
            }))
        }
        Ok(Some(AskEvent::Failed {
            status,
            message,
            code,
        })) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let kind = if status.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            };
            let e = ApiError::new(status, kind, message);
            // The head's ring failed: another head may resume the answer.
            match code.as_deref() {
                Some("ring_failed") => Err(e.code("ring_failed")),
                _ => Err(e),
            }
        }
        Ok(Some(_)) | Ok(None) => Ok(None),
        Err(e) => {
            Err(ApiError::new(StatusCode::BAD_GATEWAY, "server_error", e).code("ring_failed"))
        }
    }
}
