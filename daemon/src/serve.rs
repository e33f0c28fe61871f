//! `primad serve`: open the store, start the inference worker and the API,
//! tell systemd we are ready, and shut down gracefully on SIGTERM / ctrl-c.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use prima_config::Config;

use crate::{
    api::{self, AppState},
    ring::{ModelAd, Ring},
    store::Store,
    worker::{Settings, Worker},
};

/// Command-line overrides of the config file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub api_addr: Option<String>,
}

pub fn load_config(path: Option<&std::path::Path>, o: &Overrides) -> Result<Config> {
    let (mut cfg, from) = Config::load(path)?;
    match &from {
        Some(p) => tracing::info!(config = %p.display(), "config loaded"),
        None => tracing::info!("no config file; using the defaults"),
    }
    if let Some(d) = &o.state_dir {
        cfg.store.state_dir = d.display().to_string();
    }
    if let Some(a) = &o.api_addr {
        cfg.api.addr = a.clone();
    }
    cfg.validate().map_err(|m| anyhow!("{m}"))?;
    Ok(cfg)
}

pub fn run(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("primad-io")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> Result<()> {
    let addr: SocketAddr = cfg.api_addr().map_err(|m| anyhow!("{m}"))?;
    let state_dir = cfg.state_dir();
    let store = Arc::new(Store::open(&state_dir)?);
    let (key, fresh) = store.identity_for_home(&crate::store::home_fingerprint(&state_dir))?;
    if fresh {
        tracing::warn!(
            state_dir = %state_dir.display(),
            "this state dir was copied from another machine or place: this device takes a new identity \
             (it must be paired again) so that two devices never share one"
        );
    }
    let node_id = key.public().to_peer_id().to_string();
    let node_name = node_name(&cfg);
    if cfg.model.threads > 0 {
        prima_kernels::cpu::set_threads(cfg.model.threads).context("[model] threads")?;
    }
    let gpu = crate::gpu::Handle::open(&cfg.gpu);
    let spec = spec_settings(&cfg, &store)?;
    let ring = (cfg.cluster.enabled && cfg.ring.enabled).then(|| {
        Ring::start(
            node_id.clone(),
            crate::ring::Settings {
                model: cfg.model.default.clone(),
                timeout: Duration::from_millis(cfg.ring.timeout_ms),
                ubatch: cfg.ring.ubatch,
                max_ctx: cfg.model.ctx,
                prefetch: cfg.ring.prefetch,
                memory_budget: match cfg.ring.memory_budget_mb {
                    0 => crate::profiler::cgroup_limit(),
                    mb => Some(mb << 20),
                },
                gpu: gpu.clone(),
                draft: spec.as_ref().map(|s| s.draft.clone()),
            },
            Duration::from_millis(cfg.cluster.dead_ms),
        )
    });
    if let Some(r) = &ring {
        refresh_ring_ad(r, &store, &cfg.model.default);
    }
    let worker = Worker::start(Settings {
        ctx: cfg.model.ctx,
        default_max_tokens: cfg.model.max_tokens,
        queue_limit: cfg.api.queue_limit,
        ring: ring.clone().map(|r| (r, tokio::runtime::Handle::current())),
        spec,
    });
    let cluster = if cfg.cluster.enabled {
        if cfg.cluster.open_household {
            tracing::warn!(
                "[cluster] open_household is on: any prima device on this network may join \
                 this household and see its traffic"
            );
        }
        Some(
            crate::cluster::service::ClusterCtl::start(
                cfg.cluster.clone(),
                key.clone(),
                crate::cluster::net::Profile::local(&node_name),
                store.clone(),
                ring.clone().map(|r| {
                    (
                        r,
                        cfg.model.ctx.min(u32::MAX as usize) as u32,
                        cfg.ring.use_all_devices,
                    )
                }),
            )
            .await?,
        )
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another primad running? pass --api-addr to pick another port)")
    })?;
    let grace = Duration::from_secs(cfg.api.shutdown_grace_secs);
    let state = Arc::new(AppState {
        api_addr: listener.local_addr()?.to_string(),
        cfg,
        store: store.clone(),
        worker: worker.clone(),
        node_id: node_id.clone(),
        node_name: node_name.clone(),
        started: Instant::now(),
        cluster: cluster.clone(),
        ring: ring.clone(),
        gpu,
    });
    let app = api::router(state.clone());
    if let Some(r) = &ring {
        let (w, store, name) = (
            worker.clone(),
            store.clone(),
            state.cfg.model.default.clone(),
        );
        r.set_ask_handler(Arc::new(move |req| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let entry = store.model(&name).ok().flatten();
            let res = match entry {
                Some(e) => w.submit(e, req, tx.clone()),
                None => Err(crate::error::ApiError::bad_request(format!(
                    "model '{name}' is not registered on the head"
                ))),
            };
            if let Err(e) = res {
                let _ = tx.send(crate::worker::Event::Failed(e));
            }
            rx
        }));
        tokio::spawn(ring_upkeep(r.clone(), state.clone()));
    }
    match store
        .models()?
        .iter()
        .find(|m| m.name == state.cfg.model.default)
    {
        Some(m) if !m.path.is_file() => tracing::warn!(
            model = %m.name, path = %m.path.display(),
            "the default model's file is missing; requests for it will fail"
        ),
        Some(_) => {}
        None => tracing::warn!(
            model = %state.cfg.model.default,
            "the default model is not registered; add it with `primactl models pull {}` or `primactl models add PATH --name {}`",
            state.cfg.model.default, state.cfg.model.default
        ),
    }
    tracing::info!(
        node = %node_id, name = %node_name, api = %state.api_addr,
        state_dir = %state_dir.display(), "primad ready"
    );
    eprintln!("primad: listening on http://{}", state.api_addr);
    sd_notify("READY=1");

    let w = worker.clone();
    let leaving = ring.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!(grace = ?grace, "shutting down: finishing in-flight requests");
            // Out of the ring first: the household plans without this
            // device while it finishes, and what it heads moves on.
            if let Some(r) = leaving {
                r.leave();
            }
            sd_notify("STOPPING=1");
            // After the grace period, running and queued requests are cancelled.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::warn!("grace period over: cancelling what is still running");
                w.abort.store(true, Ordering::Relaxed);
            });
        })
        .await
        .context("serving the API")?;
    if let Some(c) = cluster {
        c.shutdown().await;
    }
    let w = worker.clone();
    tokio::task::spawn_blocking(move || w.stop()).await.ok();
    if let Some(r) = ring {
        tokio::task::spawn_blocking(move || r.stop()).await.ok();
    }
    drop(state);
    tracing::info!("primad stopped");
    Ok(())
}

/// Set by a service manager's stop request (Windows); ctrl-c and SIGTERM
/// work everywhere.
static SHUTDOWN: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Asks a running `serve` to shut down gracefully (as SIGTERM does).
pub fn request_shutdown() {
    SHUTDOWN.notify_one();
}

async fn shutdown_signal() {
    let requested = SHUTDOWN.notified();
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = requested => {},
    }
}

/// The configured node name, else the host name.
pub fn node_name(cfg: &Config) -> String {
    if cfg.node.name.is_empty() {
        hostname()
    } else {
        cfg.node.name.clone()
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    #[cfg(unix)]
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            return h.to_string();
        }
    }
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_else(|_| "prima-device".into())
}

/// systemd's readiness protocol: one datagram to $NOTIFY_SOCKET (a path, or
/// an abstract socket when it starts with '@'). A no-op elsewhere.
fn sd_notify(msg: &str) {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let path = path.to_string_lossy().into_owned();
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        };
        let res = addr.and_then(|a| {
            let sock = UnixDatagram::unbound()?;
            sock.send_to_addr(msg.as_bytes(), &a).map(|_| ())
        });
        if let Err(e) = res {
            tracing::warn!(error = %e, socket = %path, "systemd notification failed");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = msg;
}

/// `primad debug-hostile-gossip`: acts as this state dir's device (stopped
/// first) and sends bad gossip to `peer`; for the multi-host tests.
pub fn hostile_gossip(cfg: Config, peer: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let state_dir = cfg.state_dir();
        let store = Arc::new(Store::open(&state_dir)?);
        let (key, _) = store.identity_for_home(&crate::store::home_fingerprint(&state_dir))?;
        let name = node_name(&cfg);
        let n = crate::cluster::service::ClusterCtl::hostile_gossip(
            cfg.cluster.clone(),
            key,
            crate::cluster::net::Profile::local(&name),
            store,
            peer,
        )
        .await?;
        eprintln!("sent {n} hostile gossip messages to {peer}");
        Ok(())
    })
}

/// Advertises the default model to the ring when it is registered here (and
/// its file exists), with its layer count; clears it otherwise.
pub(crate) fn refresh_ring_ad(ring: &Ring, store: &Store, model: &str) {
    let entry = store
        .model(model)
        .ok()
        .flatten()
        .filter(|e| e.path.is_file());
    let current = ring.local_ad().model;
    match entry {
        Some(e) => {
            if current.as_ref().is_some_and(|m| m.sha256 == e.sha256) {
                return;
            }
            let gguf = match prima_kernels::gguf::Gguf::open(&e.path) {
                Ok(g) => g,
                Err(err) => {
                    tracing::warn!(model = %e.name, error = %err, "cannot offer the model to the ring");
                    return ring.set_model(None);
                }
            };
            match prima_kernels::model::config::Config::from_metadata(&gguf.metadata) {
                Ok(c) => {
                    ring.set_dim(c.n_embd);
                    if let Some(d) = &ring.settings.draft {
                        let ctx = ring.settings.max_ctx.min(c.ctx_train);
                        ring.set_draft_bytes(draft_bytes(d, &gguf, &c, ctx));
                    }
                    ring.set_model(Some((
                        ModelAd {
                            name: e.name.clone(),
                            sha256: e.sha256.clone(),
                            n_layer: c.n_layer as u32,
                        },
                        e.path.clone(),
                    )));
                    tracing::info!(model = %e.name, layers = c.n_layer, "offering the model to the ring");
                }
                Err(err) => {
                    tracing::warn!(model = %e.name, error = %err, "cannot offer the model to the ring");
                    ring.set_model(None);
                }
            }
        }
        None => {
            if current.is_some() {
                ring.set_model(None);
            }
        }
    }
}

/// Keeps the ring's advertisement current: the model (it may be added or
/// removed while running) and the measured profile (taken once when
/// `[ring] auto_profile` is on and none is cached).
async fn ring_upkeep(ring: Arc<Ring>, st: Arc<AppState>) {
    let mut profiled = false;
    loop {
        {
            let (r, s) = (ring.clone(), st.clone());
            let _ = tokio::task::spawn_blocking(move || {
                refresh_ring_ad(&r, &s.store, &s.cfg.model.default)
            })
            .await;
        }
        let cached = api::cached_profile(&st);
        if cached.is_none()
            && !profiled
            && st.cfg.ring.auto_profile
            && ring.local_ad().model.is_some()
        {
            profiled = true;
            if let Err(e) = api::measure_profile(&st, false).await {
                tracing::warn!(error = %e, "profiling this device failed");
            }
        }
        // The quick part refreshes continuously: memory available now.
        let p = api::cached_profile(&st).map(|mut p| {
            let (_, available) = crate::profiler::memory();
            p.memory.available_bytes = available;
            p
        });
        if ring.local_ad().device != p {
            ring.set_device_profile(p);
        }
        ring.probe_bandwidth().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `[speculative]`: the draft, with `draft_model` looked up among the
/// store's models first, then as a file.
fn spec_settings(cfg: &Config, store: &Store) -> Result<Option<crate::worker::SpecSettings>> {
    use crate::worker::{DraftSource, SpecSettings};
    let sp = &cfg.speculative;
    let draft = if sp.draft_layers > 0 {
        DraftSource::Layers(sp.draft_layers as usize)
    } else if !sp.draft_model.trim().is_empty() {
        let name = sp.draft_model.trim();
        match store.model(name)? {
            Some(e) => DraftSource::Model(e.path),
            None if std::path::Path::new(name).is_file() => DraftSource::Model(name.into()),
            None => anyhow::bail!(
                "[speculative] draft_model = \"{name}\" is neither a model this device holds \
                 (`primactl models`) nor a GGUF file"
            ),
        }
    } else {
        return Ok(None);
    };
    tracing::info!(
        ?draft,
        max_draft = sp.max_draft,
        p_min = sp.p_min,
        "speculative decoding on"
    );
    Ok(Some(SpecSettings {
        draft,
        params: prima_kernels::speculative::SpecParams {
            max_draft: sp.max_draft as usize,
            p_min: sp.p_min,
        },
    }))
}

/// What a draft costs its device beyond the model's own window: the
/// weights it reads (for a self-draft, its layers, which the head's window
/// may not hold) and its KV cache for a context of `ctx`.
fn draft_bytes(
    d: &crate::worker::DraftSource,
    target: &prima_kernels::gguf::Gguf,
    c: &prima_kernels::model::config::Config,
    ctx: usize,
) -> u64 {
    let kv = |c: &prima_kernels::model::config::Config, layers: usize| {
        (2 * layers * ctx * c.kv_dim() * 2) as u64
    };
    match d {
        crate::worker::DraftSource::Layers(n) => {
            let n = (*n).min(c.n_layer);
            let weights: u64 = target
                .tensors
                .iter()
                .filter(|t| prima_kernels::model::names::layer_of(&t.name).is_some_and(|i| i < n))
                .map(|t| t.size)
                .sum();
            weights + kv(c, n)
        }
        crate::worker::DraftSource::Model(p) => {
            let Ok(g) = prima_kernels::gguf::Gguf::open(p) else {
                return 0; // the worker reports it when it loads the draft
            };
            let Ok(dc) = prima_kernels::model::config::Config::from_metadata(&g.metadata) else {
                return 0;
            };
            let weights: u64 = g.tensors.iter().map(|t| t.size).sum();
            weights + kv(&dc, dc.n_layer)
        }
    }
}
