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
    let worker = Worker::start(Settings {
        ctx: cfg.model.ctx,
        default_max_tokens: cfg.model.max_tokens,
        queue_limit: cfg.api.queue_limit,
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
    });
    let app = api::router(state.clone());
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
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!(grace = ?grace, "shutting down: finishing in-flight requests");
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
    drop(state);
    tracing::info!("primad stopped");
    Ok(())
}

async fn shutdown_signal() {
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
