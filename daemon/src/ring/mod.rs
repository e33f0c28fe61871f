//! Pipelined-ring inference across the household's devices.
//!
//! * [`plan`]: the coordinator's plan and the layer-to-device mapping;
//! * [`wire`]: frames on `/prima/ring/1` streams;
//! * [`exec`]: the executor thread that runs this device's windows;
//! * this module: the [`Ring`] that ties them to libp2p (one outgoing
//!   stream per successor, incoming streams only from plan members), the
//!   head's [`RingSession`] (an [`Evaluator`] the generation loop drives),
//!   and `/prima/ask/1`, which carries a request from any device to the
//!   head and the streamed answer back.

pub mod exec;
pub mod plan;
pub mod planner;
pub mod wire;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex, OnceLock, RwLock,
    },
    time::{Duration, Instant},
};

use futures_util::{
    io::{AsyncReadExt, AsyncWriteExt},
    StreamExt,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use prima_kernels::{engine::Evaluator, speculative::Target};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedReceiver;

use self::{
    exec::{Input, Logits, Outgoing},
    plan::RingPlan,
    wire::{Frame, Header, KvOp},
};
use crate::worker::{Event, GenRequest};

pub const RING_PROTOCOL: StreamProtocol = StreamProtocol::new("/prima/ring/1");
pub const ASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/prima/ask/1");
/// Most tokens in one activation frame (a prefill micro-batch).
pub const MAX_UBATCH: usize = 512;
/// Largest `/prima/ask/1` message.
const MAX_ASK_BYTES: usize = 1 << 20;
/// Link bandwidth probes: the prober sends this many bytes, the peer acks.
pub const BW_PROTOCOL: StreamProtocol = StreamProtocol::new("/prima/bw/1");
const BW_PROBE_BYTES: usize = 1 << 20;
/// A bandwidth measurement is redone after this long.
const BW_MAX_AGE: Duration = Duration::from_secs(600);

/// A model this device can serve in a ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAd {
    pub name: String,
    pub sha256: String,
    pub n_layer: u32,
}

/// What a device says about itself for the ring, in every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingAd {
    /// The household's model, if this device holds it.
    #[serde(default)]
    pub model: Option<ModelAd>,
    /// The plan epoch this device has loaded and is ready to run (0: none).
    #[serde(default)]
    pub ready: u64,
    /// The layout of that plan ([`RingPlan::layout_id`]).
    #[serde(default)]
    pub ready_layout: u64,
    /// Measured profile for Halda (`primactl profile`), if any.
    #[serde(default)]
    pub device: Option<halda::DeviceProfile>,
    /// The coordinator's plan (only the coordinator sends one).
    #[serde(default)]
    pub plan: Option<RingPlan>,
    /// Measured round-trip times to other devices (name, ms), over the
    /// libp2p connection (ping).
    #[serde(default)]
    pub links: Vec<(String, f64)>,
    /// Bytes this device lets the ring use (`[ring] memory_budget_mb` or
    /// its cgroup's limit): Halda plans within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
    /// Links from this device that broke so far: the head retries a
    /// session at once when a device on its ring reports a new one.
    #[serde(default)]
    pub link_breaks: u64,
    /// Measured throughput to other devices (name, Mbit/s) over the libp2p
    /// connection: Halda's per-hop transfer time.
    #[serde(default)]
    pub bandwidth: Vec<(String, f64)>,
    /// Memory the speculative draft takes here when this device heads the
    /// ring (`[speculative]`): Halda plans the head's window without it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub draft_bytes: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What this device last heard from a peer.
#[derive(Debug, Clone)]
pub struct PeerAd {
    pub name: String,
    pub ad: RingAd,
    pub heard: Instant,
}

/// A plan set by hand: `k` and the windows by device name, head first,
/// and optionally how many of each window's layers run on its GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub k: u32,
    pub windows: Vec<(String, u32)>,
    /// Per device in `windows`, its GPU layers (n_m); missing: none.
    #[serde(default)]
    pub gpu_layers: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum AskEvent {
    Started {
        prompt_tokens: usize,
    },
    Text {
        text: String,
        /// Tokens generated since the previous piece (to resume elsewhere).
        #[serde(default)]
        ids: Vec<u32>,
    },
    Done {
        finish: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speculative: Option<crate::worker::SpecUsage>,
    },
    Failed {
        status: u16,
        message: String,
        #[serde(default)]
        code: Option<String>,
    },
}

/// Settings of the ring runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The model the household serves (`[model] default`).
    pub model: String,
    /// How long the head waits for a batch to come back round the ring.
    pub timeout: Duration,
    /// Prefill micro-batch size.
    pub ubatch: usize,
    pub max_ctx: usize,
    pub prefetch: bool,
    /// Bytes this device may use for weights and caches; None: unlimited.
    pub memory_budget: Option<u64>,
    /// The GPU for the plan's GPU layers (n_m), if any.
    pub gpu: crate::gpu::Handle,
    /// The speculative draft this device runs when it heads the ring.
    pub draft: Option<crate::worker::DraftSource>,
}

type AskHandler = dyn Fn(GenRequest) -> UnboundedReceiver<Event> + Send + Sync;

/// The ring runtime of one device.
pub struct Ring {
    pub me: String,
    pub settings: Settings,
    exec: Mutex<mpsc::Sender<Input>>,
    exec_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The adopted plan.
    plan: RwLock<Option<RingPlan>>,
    /// What this device advertises.
    local: RwLock<RingAd>,
    /// What the other devices advertise, by peer id.
    pub peers: RwLock<HashMap<String, PeerAd>>,
    /// The pinned plan (on the coordinator).
    pub pin: RwLock<Option<Pin>>,
    /// The coordinator this device's election view names (set by the
    /// network loop).
    pub elected: RwLock<String>,
    /// The model file of the plan being prepared.
    model_path: RwLock<Option<PathBuf>>,
    /// The model file as mapped for `resident()` (status calls), kept so a
    /// status call does not parse the GGUF header each time.
    status_map: Mutex<Option<(PathBuf, Arc<prima_kernels::gguf::Gguf>)>>,
    control: RwLock<Option<libp2p_stream::Control>>,
    next_req: AtomicU64,
    max_payload: AtomicUsize,
    ask: OnceLock<Arc<AskHandler>>,
    /// Liveness horizon for peers' readiness (the cluster's dead_ms).
    pub dead_after: Duration,
    pub stats: RingStats,
    /// When the current plan was adopted, and the newest epoch seen live
    /// (for the event log's plan-to-live time).
    adopted: Mutex<(u64, Instant)>,
    live_epoch: AtomicU64,
    /// Set by [`Ring::leave`].
    leaving: AtomicBool,
    /// Devices this one cannot reach directly now (a failed ping or
    /// delivery) though they may be alive: frames to them go through
    /// another plan member. Cleared when the link answers again.
    broken: RwLock<HashMap<String, Instant>>,
    /// Links that broke so far (sessions watch it to retry at once).
    link_breaks: AtomicU64,
    /// The sender task's queue, for frames relayed through this device.
    relay_out: tokio::sync::mpsc::UnboundedSender<Outgoing>,
    /// Measured bandwidth to other devices: peer id -> (name, Mbit/s, when).
    bandwidth: RwLock<HashMap<String, (String, f64, Instant)>>,
}

#[derive(Default, Serialize)]
pub struct RingStats {
    /// Requests this device answered as the head, through the ring.
    pub head_requests: AtomicU64,
    /// Requests this device passed to the head.
    pub forwarded: AtomicU64,
    /// Tokens that travelled the ring (batches started at the head).
    pub batches: AtomicU64,
}

impl Ring {
    /// Starts the executor thread and the sender task (on the current
    /// tokio runtime).
    pub fn start(me: String, settings: Settings, dead_after: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel();
        let budget = settings.memory_budget;
        let es = exec::Settings {
            max_ctx: settings.max_ctx,
            prefetch: settings.prefetch,
            memory_budget: settings.memory_budget,
            gpu: settings.gpu.clone(),
        };
        let thread = {
            let out = out_tx.clone();
            std::thread::Builder::new()
                .name("prima-ring".into())
                .spawn(move || exec::run(rx, out, es))
                .expect("spawning the ring thread")
        };
        let ring = Arc::new(Self {
            me,
            settings,
            exec: Mutex::new(tx),
            exec_thread: Mutex::new(Some(thread)),
            plan: RwLock::new(None),
            local: RwLock::new(RingAd {
                memory_budget: budget,
                ..RingAd::default()
            }),
            peers: RwLock::new(HashMap::new()),
            pin: RwLock::new(None),
            elected: RwLock::new(String::new()),
            model_path: RwLock::new(None),
            status_map: Mutex::new(None),
            control: RwLock::new(None),
            next_req: AtomicU64::new(rand::random::<u32>() as u64),
            max_payload: AtomicUsize::new(0),
            ask: OnceLock::new(),
            dead_after,
            stats: RingStats::default(),
            adopted: Mutex::new((0, Instant::now())),
            live_epoch: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            broken: RwLock::new(HashMap::new()),
            link_breaks: AtomicU64::new(0),
            relay_out: out_tx.clone(),
            bandwidth: RwLock::new(HashMap::new()),
        });
        tokio::spawn(sender(ring.clone(), out_rx));
        ring
    }

    fn to_exec(&self, i: Input) {
        let _ = self.exec.lock().expect("exec").send(i);
    }

    /// Stops the executor thread.
    pub fn stop(&self) {
        self.to_exec(Input::Stop);
        if let Some(t) = self.exec_thread.lock().expect("thread").take() {
            let _ = t.join();
        }
    }

    /// Sets what answers `/prima/ask/1` on this device (the local worker).
    pub fn set_ask_handler(&self, h: Arc<AskHandler>) {
        let _ = self.ask.set(h);
    }

    /// The model this device offers to the ring, and where its file is.
    pub fn set_model(&self, ad: Option<(ModelAd, PathBuf)>) {
        if self.leaving.load(Ordering::Relaxed) {
            return;
        }
        let (ad, path) = match ad {
            Some((a, p)) => (Some(a), Some(p)),
            None => (None, None),
        };
        self.local.write().expect("local").model = ad;
        *self.model_path.write().expect("path") = path;
    }

    /// The fraction of this device's window bytes now in memory (mincore),
    /// per window, when it is in a plan.
    pub fn resident(&self) -> Option<Vec<f64>> {
        let plan = self.plan()?;
        let rank = plan.rank_of(&self.me)?;
        let path = self.model_file()?;
        let file = {
            let mut cache = self.status_map.lock().expect("status map");
            match &*cache {
                Some((p, f)) if *p == path => f.clone(),
                _ => {
                    let f = Arc::new(prima_kernels::gguf::Gguf::open(&path).ok()?);
                    *cache = Some((path, f.clone()));
                    f
                }
            }
        };
        Some(
            plan.windows(rank)
                .into_iter()
                .map(|w| {
                    let spans: Vec<(u64, u64)> = file
                        .tensors
                        .iter()
                        .filter(|t| {
                            prima_kernels::model::names::layer_of(&t.name)
                                .is_some_and(|l| w.contains(&l))
                        })
                        .map(|t| (t.offset, t.size))
                        .collect();
                    resident_fraction(file.bytes(), &spans)
                })
                .collect(),
        )
    }

    /// The model file this device offers.
    pub fn model_file(&self) -> Option<PathBuf> {
        self.model_path.read().expect("path").clone()
    }

    /// What the draft costs this device as head (see [`RingAd::draft_bytes`]).
    pub fn set_draft_bytes(&self, b: u64) {
        self.local.write().expect("local ad").draft_bytes = b;
    }

    pub fn set_device_profile(&self, p: Option<halda::DeviceProfile>) {
        self.local.write().expect("local").device = p;
    }

    /// This device's advertisement (the plan is added by the coordinator).
    pub fn local_ad(&self) -> RingAd {
        self.local.read().expect("local").clone()
    }

    pub fn plan(&self) -> Option<RingPlan> {
        self.plan.read().expect("plan").clone()
    }

    /// Installs a new stream control after the network loop (re)starts and
    /// accepts ring and ask streams on it.
    pub fn attach(self: &Arc<Self>, mut control: libp2p_stream::Control) {
        match control.accept(RING_PROTOCOL) {
            Ok(incoming) => {
                tokio::spawn(accept_ring(self.clone(), incoming));
            }
            Err(e) => tracing::error!(error = %e, "ring protocol"),
        }
        match control.accept(BW_PROTOCOL) {
            Ok(incoming) => {
                tokio::spawn(accept_bw(incoming));
            }
            Err(e) => tracing::error!(error = %e, "bandwidth protocol"),
        }
        match control.accept(ASK_PROTOCOL) {
            Ok(incoming) => {
                tokio::spawn(accept_ask(self.clone(), incoming));
            }
            Err(e) => tracing::error!(error = %e, "ask protocol"),
        }
        *self.control.write().expect("control") = Some(control);
    }

    /// Adopts `plan` (a newer epoch): this device loads its windows and
    /// then advertises itself ready for that epoch.
    pub fn adopt(self: &Arc<Self>, plan: RingPlan) {
        if let Err(e) = plan.validate() {
            tracing::warn!(epoch = plan.epoch, error = %e, "ignoring an invalid plan");
            return;
        }
        // A newer epoch wins. At an equal epoch (two devices coordinated at
        // once while the election settled) the plan of the device now
        // elected wins over one from anybody else.
        let elected = self.elected.read().expect("elected").clone();
        let take = match self.plan() {
            None => true,
            Some(p) if plan.epoch > p.epoch => true,
            Some(p) => {
                plan.epoch == p.epoch
                    && plan.coordinator == elected
                    && p.coordinator != elected
                    && plan != p
            }
        };
        if !take {
            return;
        }
        let rank = plan.rank_of(&self.me);
        let path = {
            let local = self.local.read().expect("local");
            match (&local.model, rank) {
                (Some(m), Some(_)) if m.sha256 == plan.sha256 => {
                    self.model_path.read().expect("path").clone()
                }
                _ => None,
            }
        };
        tracing::info!(
            epoch = plan.epoch, rank = ?rank, k = plan.k,
            windows = ?plan.devices.iter().map(|d| (d.name.as_str(), d.window)).collect::<Vec<_>>(),
            pinned = plan.pinned, "ring plan adopted"
        );
        *self.plan.write().expect("plan") = Some(plan.clone());
        *self.adopted.lock().expect("adopted") = (plan.epoch, Instant::now());
        let epoch = plan.epoch;
        let me = self.clone();
        self.to_exec(Input::Prepare {
            plan,
            rank,
            path,
            done: Box::new(move |r| match r {
                Ok(()) => {
                    if let Some(p) = me.plan().filter(|p| p.epoch == epoch) {
                        let mut l = me.local.write().expect("local");
                        l.ready = epoch;
                        l.ready_layout = p.layout_id();
                    }
                }
                Err(e) => tracing::error!(epoch, error = %e, "cannot take part in the ring plan"),
            }),
        });
    }

    /// Leaves the ring gracefully (the daemon is shutting down): this
    /// device stops offering the model, so the coordinator plans without
    /// it while it finishes what runs; answers it heads move to the new
    /// head with the tokens already sent (worker failover).
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.local.write().expect("local").model = None;
        crate::events::record("leave", "this device is leaving the ring", None);
    }

    /// The direct link to `id` failed (a ping or a delivery).
    pub fn mark_broken(&self, id: &str) {
        let Some(plan) = self.plan() else { return };
        let Some(name) = plan.name_of(id) else { return };
        match self.broken.write().expect("broken").entry(id.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Instant::now());
            }
        }
        let n = self.link_breaks.fetch_add(1, Ordering::Relaxed) + 1;
        self.local.write().expect("local").link_breaks = n;
        let via = self
            .relay_for(id)
            .and_then(|v| plan.name_of(&v).map(str::to_string));
        tracing::warn!(device = %name, via = ?via, "the link to a ring device broke: relaying");
        crate::events::record(
            "link",
            match via {
                Some(v) => format!("link to {name} broke: relaying through {v}"),
                None => format!("link to {name} broke and no device can relay"),
            },
            None,
        );
    }

    /// The direct link to `id` works (a ping answered).
    pub fn mark_ok(&self, id: &str) {
        // Called on every ping and heartbeat tick: a read lock unless the
        // link was marked broken.
        if !self.is_broken(id) {
            return;
        }
        let since = self.broken.write().expect("broken").remove(id);
        if let Some(since) = since {
            let name = self
                .plan()
                .and_then(|p| p.name_of(id).map(str::to_string))
                .unwrap_or_else(|| id.to_string());
            tracing::info!(device = %name, "the link to a ring device is back");
            crate::events::record(
                "link",
                format!("link to {name} is back"),
                Some(since.elapsed()),
            );
        }
    }

    fn is_broken(&self, id: &str) -> bool {
        self.broken.read().expect("broken").contains_key(id)
    }

    /// Link breaks seen by this device and reported by the others.
    pub fn link_breaks(&self) -> u64 {
        let others: u64 = self
            .peers
            .read()
            .expect("peers")
            .values()
            .map(|p| p.ad.link_breaks)
            .sum();
        self.link_breaks.load(Ordering::Relaxed) + others
    }

    /// A plan member that can pass frames on to `to`: not this device, not
    /// `to`, not one this device cannot reach either.
    fn relay_for(&self, to: &str) -> Option<String> {
        let plan = self.plan()?;
        plan.devices
            .iter()
            .map(|d| &d.id)
            .find(|id| **id != self.me && *id != to && !self.is_broken(id))
            .cloned()
    }

    /// Measures the bandwidth to one device that holds the model and has no
    /// fresh measurement (one per call, so probes do not overlap).
    pub async fn probe_bandwidth(&self) {
        let due = {
            let bw = self.bandwidth.read().expect("bandwidth");
            let peers = self.peers.read().expect("peers");
            peers
                .iter()
                .filter(|(_, p)| p.ad.model.is_some() && p.heard.elapsed() < self.dead_after)
                .find(|(id, _)| bw.get(*id).is_none_or(|(_, _, t)| t.elapsed() > BW_MAX_AGE))
                .map(|(id, p)| (id.clone(), p.name.clone()))
        };
        let Some((id, name)) = due else { return };
        let Ok(peer) = id.parse::<PeerId>() else {
            return;
        };
        let Some(mut control) = self.control.read().expect("control").clone() else {
            return;
        };
        let probe = async {
            let mut s = control
                .open_stream(peer, BW_PROTOCOL)
                .await
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let chunk = vec![0u8; 64 << 10];
            s.write_all(&(BW_PROBE_BYTES as u32).to_le_bytes())
                .await
                .map_err(|e| e.to_string())?;
            for _ in 0..BW_PROBE_BYTES / chunk.len() {
                s.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            s.flush().await.map_err(|e| e.to_string())?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(t.elapsed())
        };
        // A failed probe is retried at the next call, after the others.
        let took = match tokio::time::timeout(Duration::from_secs(10), probe).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::debug!(device = %name, error = %e, "bandwidth probe failed");
                return;
            }
            Err(_) => {
                tracing::debug!(device = %name, "bandwidth probe timed out");
                return;
            }
        };
        let mbit = BW_PROBE_BYTES as f64 * 8.0 / 1e6 / took.as_secs_f64().max(1e-6);
        tracing::info!(device = %name, mbit_s = format!("{mbit:.0}"), "measured the link bandwidth");
        let mut bw = self.bandwidth.write().expect("bandwidth");
        bw.insert(id, (name, mbit, Instant::now()));
        let mut list: Vec<(String, f64)> = bw.values().map(|(n, m, _)| (n.clone(), *m)).collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        self.local.write().expect("local").bandwidth = list;
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    /// Notes the model's width once known, for the frame size limit.
    pub fn set_dim(&self, dim: usize) {
        self.max_payload
            .store(dim * MAX_UBATCH * 4, Ordering::Relaxed);
    }

    /// Whether `id` has loaded the windows of `layout` and was heard from
    /// lately (an epoch that only renumbers a plan needs no new readiness).
    fn is_ready(&self, id: &str, layout: u64) -> bool {
        if id == self.me {
            return self.local.read().expect("local").ready_layout == layout;
        }
        self.peers
            .read()
            .expect("peers")
            .get(id)
            .is_some_and(|p| p.ad.ready_layout == layout && p.heard.elapsed() < self.dead_after)
    }

    /// Readiness of each device of the plan, by rank.
    pub fn readiness(&self) -> Vec<bool> {
        match self.plan() {
            Some(p) => p
                .devices
                .iter()
                .map(|d| self.is_ready(&d.id, p.layout_id()))
                .collect(),
            None => vec![],
        }
    }

    /// The plan, if every device of it is ready.
    pub fn live_plan(&self) -> Option<RingPlan> {
        let p = self.plan()?;
        let live = p
            .devices
            .iter()
            .all(|d| self.is_ready(&d.id, p.layout_id()));
        if !live {
            return None;
        }
        if self.live_epoch.fetch_max(p.epoch, Ordering::Relaxed) < p.epoch {
            let (epoch, at) = *self.adopted.lock().expect("adopted");
            let took = (epoch == p.epoch).then(|| at.elapsed());
            crate::events::record(
                "live",
                format!(
                    "plan epoch {} live on {} device(s)",
                    p.epoch,
                    p.devices.len()
                ),
                took,
            );
        }
        Some(p)
    }

    /// A live plan newer than `epoch` (for the model `sha256`, if given),
    /// live now or within `wait`.
    pub fn wait_for_plan_after(
        &self,
        epoch: u64,
        sha256: Option<&str>,
        wait: Duration,
    ) -> Option<RingPlan> {
        let t = Instant::now();
        loop {
            if let Some(p) = self.live_plan() {
                if p.epoch > epoch && sha256.is_none_or(|s| p.sha256 == s) {
                    return Some(p);
                }
            }
            if t.elapsed() >= wait {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where a request for the model with `sha256` should run.
    pub fn route(&self, sha256: &str) -> Route {
        match self.live_plan() {
            Some(p) if p.sha256 == sha256 => {
                if p.devices[0].id == self.me {
                    Route::Head(p)
                } else {
                    Route::Forward(p)
                }
            }
            _ => Route::Local,
        }
    }

    /// A session on the ring, driven from the head.
    pub fn session(&self, plan: RingPlan, ctx: usize) -> RingSession<'_> {
        let (tx, rx) = mpsc::channel();
        RingSession {
            ring: self,
            req: self.next_req.fetch_add(1, Ordering::Relaxed),
            pos: 0,
            ctx,
            plan,
            history: Vec::new(),
            prompt_end: 0,
            replays: 0,
            failed_at: None,
            seen_breaks: self.link_breaks(),
            retried: false,
            tx,
            rx,
        }
    }

    /// Sends `req` to the head of `plan` and relays its events to `events`;
    /// blocks the calling (worker) thread. Returns the final event.
    pub fn forward_blocking(
        &self,
        handle: &tokio::runtime::Handle,
        plan: &RingPlan,
        req: &GenRequest,
        mut relay: impl FnMut(AskEvent) -> bool,
    ) -> Result<Option<AskEvent>, String> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let head = plan.devices[0].clone();
        let peer: PeerId = head
            .id
            .parse()
            .map_err(|e| format!("bad head id {}: {e}", head.id))?;
        let mut control = self
            .control
            .read()
            .expect("control")
            .clone()
            .ok_or("the cluster is not running")?;
        let timeout = self.settings.timeout;
        handle.block_on(async move {
            let mut s = tokio::time::timeout(timeout, control.open_stream(peer, ASK_PROTOCOL))
                .await
                .map_err(|_| format!("the head '{}' did not answer within {timeout:?}", head.name))?
                .map_err(|e| format!("cannot reach the head '{}': {e}", head.name))?;
            let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
            write_msg(&mut s, &body)
                .await
                .map_err(|e| format!("sending to the head '{}': {e}", head.name))?;
            loop {
                // Each event (a token) must come within the deadline.
                let msg = tokio::time::timeout(timeout, read_msg(&mut s))
                    .await
                    .map_err(|_| format!("the head '{}' went silent for {timeout:?}", head.name))?
                    .map_err(|e| format!("from the head '{}': {e}", head.name))?;
                let Some(msg) = msg else {
                    return Err(format!("the head '{}' closed the answer early", head.name));
                };
                let ev: AskEvent = serde_json::from_slice(&msg)
                    .map_err(|e| format!("bad answer from the head: {e}"))?;
                if matches!(ev, AskEvent::Done { .. } | AskEvent::Failed { .. }) {
                    return Ok(Some(ev));
                }
                if !relay(ev) {
                    return Ok(None); // our client left; dropping the stream tells the head
                }
            }
        })
    }
}

pub enum Route {
    /// No live ring for this model: answer on this device alone.
    Local,
    /// This device is the head of a live ring.
    Head(RingPlan),
    /// Another device is the head.
    Forward(RingPlan),
}

/// One sequence evaluated on the ring, driven by the head's generation
/// loop. Dropping it frees the session's caches on every device.
///
/// When the coordinator replans while a session runs (a device came or
/// went, a profile changed), the devices load other windows and the
/// session's KV caches are gone. The session then replays: it evaluates the
/// tokens it has seen so far on the new plan, under a new id, and goes on;
/// the caller sees the same logits, only later.
pub struct RingSession<'r> {
    ring: &'r Ring,
    req: u64,
    pos: usize,
    ctx: usize,
    plan: RingPlan,
    /// Tokens evaluated so far (what a replay feeds again).
    history: Vec<u32>,
    /// Where the first batch (the prompt) ended: later tokens are computed
    /// as decoded ones, also when a replay feeds them again in one batch.
    prompt_end: usize,
    replays: u32,
    /// When the current failure was first seen (cleared once a replay
    /// answers): the stall the event log reports.
    failed_at: Option<Instant>,
    /// Broken links known when the last attempt began.
    seen_breaks: u64,
    /// Whether the session already retried its plan as it was after a
    /// lost answer (cleared by the next success).
    retried: bool,
    tx: mpsc::Sender<Logits>,
    rx: mpsc::Receiver<Logits>,
}

/// Most replays of one session before giving up.
const MAX_REPLAYS: u32 = 5;

/// A session's attempt ended because a link on the ring broke.
const LINK_BROKE: &str = "a link on the ring broke";

/// How long an attempt still waits for its answer after a link on the ring
/// was reported broken (frames already sent on a live connection arrive;
/// a sender that fails to send relays the frame itself).
const LINK_GRACE: Duration = Duration::from_millis(1000);

impl RingSession<'_> {
    /// A newer live plan than this session's, if one is live now or
    /// becomes live within `wait`.
    fn newer_plan(&self, wait: Duration) -> Option<RingPlan> {
        self.ring
            .wait_for_plan_after(self.plan.epoch, Some(&self.plan.sha256), wait)
    }

    /// Moves the session onto `plan`: a new id, position 0.
    fn rebase(&mut self, plan: RingPlan) -> Result<(), String> {
        if plan.devices[0].id != self.ring.me {
            return Err(format!(
                "the ring was replanned mid-answer and '{}' is its head now; ask again",
                plan.devices[0].name
            ));
        }
        self.ring.to_exec(Input::Kv {
            req: self.req,
            op: KvOp::Drop,
        });
        tracing::info!(
            from = self.plan.epoch,
            to = plan.epoch,
            tokens = self.history.len(),
            "ring replanned mid-answer: replaying the session on the new plan"
        );
        self.req = self.ring.next_req.fetch_add(1, Ordering::Relaxed);
        self.pos = 0;
        self.plan = plan;
        self.replays += 1;
        Ok(())
    }

    /// Evaluates `tokens` at the current position, once, with the logits
    /// of the last `rows`.
    fn try_eval(&mut self, tokens: &[u32], rows: usize) -> Result<Vec<f32>, String> {
        let sizes = micro_batches(tokens.len(), self.max_rows(), rows);
        let n = sizes.len();
        let start = self.pos;
        let mut at = 0;
        for (i, len) in sizes.into_iter().enumerate() {
            self.ring.to_exec(Input::Submit {
                batch: exec::Batch {
                    req: self.req,
                    layout: self.plan.layout_id(),
                    pos: self.pos,
                    ctx: self.ctx,
                    rows: if i + 1 == n { rows } else { 0 },
                    decoded_from: self.prompt_end,
                },
                tokens: tokens[at..at + len].to_vec(),
                reply: self.tx.clone(),
            });
            at += len;
            self.pos += len;
        }
        // Until the answer comes, the caches hold nothing reliable past
        // `start` (a failed batch leaves the position there).
        let restore = |s: &mut Self| s.pos = start;
        self.ring
            .stats
            .batches
            .fetch_add(n as u64, Ordering::Relaxed);
        let wait = self.ring.settings.timeout * n as u32;
        let deadline = Instant::now() + wait;
        self.seen_breaks = self.ring.link_breaks();
        // A newer plan with other windows (the coordinator planned around
        // a device that died or froze) ends the wait early: what is on the
        // way will not come back.
        let mut broke_at: Option<Instant> = None;
        let got = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok((req, r)) if req == self.req => break Ok(r),
                Ok(_) => continue, // an answer for an abandoned attempt
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                    if self.ring.live_plan().is_some_and(|p| {
                        p.epoch > self.plan.epoch
                            && p.sha256 == self.plan.sha256
                            && !p.same_layout(&self.plan)
                    }) {
                        break Ok(Err(exec::REPLANNED.to_string()));
                    }
                    // A link broke: what went that way may be lost, and
                    // the next attempt goes round it. A device stalled in
                    // memory reclaim looks the same for a moment while its
                    // connections are fine, so the answer gets a short
                    // grace to come back first.
                    if self.ring.link_breaks() > self.seen_breaks
                        && broke_at.get_or_insert_with(Instant::now).elapsed() >= LINK_GRACE
                    {
                        break Ok(Err(LINK_BROKE.to_string()));
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match got {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(e)) => {
                restore(self);
                Err(e)
            }
            Err(_) => {
                restore(self);
                let path: Vec<&str> = self
                    .plan
                    .devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .chain([self.plan.devices[0].name.as_str()])
                    .collect();
                Err(format!(
                    "no answer from the ring within {:.1} s (plan epoch {}: {}); a device or a \
                     link on the way is not responding",
                    wait.as_secs_f64(),
                    self.plan.epoch,
                    path.join(" -> ")
                ))
            }
        }
    }
}

/// Sizes of the micro-batches (at most `ub` tokens each) that carry `len`
/// tokens, the last one holding at least the `rows` tokens whose logits are
/// wanted (the head computes logits only for its last micro-batch), and no
/// micro-batch of one token where `ub` allows more: attention sums a lone
/// token in another order than a batch (as llama.cpp does), and Q4_K
/// groups a prompt's tokens in fours from its start, so a lone tail takes
/// four more tokens, keeping the cut on a multiple of four (with `ub` a
/// multiple of four). A prompt split this way gives exactly the logits of
/// the whole prompt in one batch.
fn micro_batches(len: usize, ub: usize, rows: usize) -> Vec<usize> {
    let n = len.div_ceil(ub).max(1);
    let mut sizes = vec![ub; n];
    sizes[n - 1] = len - (n - 1) * ub;
    let need = if rows <= 1 && sizes[n - 1] == 1 && ub >= 5 {
        5
    } else {
        rows.max(2.min(ub))
    };
    if sizes[n - 1] < need && n > 1 {
        let d = need - sizes[n - 1];
        sizes[n - 1] = need;
        sizes[n - 2] -= d;
    }
    sizes
}

impl Evaluator for RingSession<'_> {
    type Error = String;

    fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        self.eval_rows(tokens, 1)
    }

    fn pos(&self) -> usize {
        self.history.len()
    }

    fn ctx(&self) -> usize {
        self.ctx
    }
}

/// Speculative drafts are verified on the ring in one trip: the head gets
/// the logits of every drafted position, and a rejected tail is rolled back
/// on every device with a `Truncate` message that travels the ring ahead
/// of the session's next batch.
impl Target for RingSession<'_> {
    type Error = String;

    fn eval_rows(&mut self, tokens: &[u32], rows: usize) -> Result<Vec<f32>, String> {
        if rows == 0 || rows > tokens.len() || rows > self.max_rows() {
            return Err(format!(
                "logits for {rows} of {} tokens (at most {} per batch)",
                tokens.len(),
                self.max_rows()
            ));
        }
        if self.history.len() + tokens.len() > self.ctx {
            return Err(format!(
                "{} tokens at position {} do not fit a context of {}",
                tokens.len(),
                self.history.len(),
                self.ctx
            ));
        }
        // A newer plan with other windows: move before sending anything.
        if let Some(p) = self.ring.live_plan() {
            if p.epoch > self.plan.epoch && !p.same_layout(&self.plan) {
                self.rebase(p)?;
            }
        }
        if self.history.is_empty() {
            self.prompt_end = tokens.len();
        }
        loop {
            let mut feed = self.history[self.pos..].to_vec();
            feed.extend_from_slice(tokens);
            match self.try_eval(&feed, rows) {
                Ok(l) => {
                    self.history.extend_from_slice(tokens);
                    self.retried = false;
                    if let Some(t) = self.failed_at.take() {
                        crate::events::record(
                            "resume",
                            format!(
                                "answer resumed at token {} on plan epoch {}",
                                self.history.len(),
                                self.plan.epoch
                            ),
                            Some(t.elapsed()),
                        );
                    }
                    return Ok(l);
                }
                Err(e) => {
                    let since = *self.failed_at.get_or_insert_with(Instant::now);
                    if e != exec::REPLANNED {
                        crate::events::record("fail", e.clone(), None);
                    }
                    if self.replays >= MAX_REPLAYS {
                        return Err(e);
                    }
                    // Replanned (or a device went away and the coordinator
                    // is replanning): wait for the new plan and replay.
                    // A device that stopped answering is declared dead
                    // after `dead_after`; the coordinator (elected anew if
                    // it was the one lost) then plans without it, pinned
                    // or not.
                    // A link broke during the attempt: retry at once (the
                    // frames now go round it). Other failures first wait
                    // for the coordinator's next plan.
                    let wait = if e == exec::REPLANNED {
                        self.ring.settings.timeout
                    } else if e == LINK_BROKE {
                        Duration::ZERO
                    } else {
                        self.ring.dead_after * 2 + Duration::from_secs(2)
                    };
                    // A broken link is relayed around on the same plan; an
                    // answer lost with no plan change and no known cause
                    // gets one more try on the same plan too.
                    let next = self.newer_plan(wait).or_else(|| {
                        let broke = e == LINK_BROKE || self.ring.link_breaks() > self.seen_breaks;
                        let again = broke || !self.retried;
                        self.retried = true;
                        again.then(|| self.plan.clone())
                    });
                    match next {
                        Some(p) => {
                            crate::events::record(
                                "replay",
                                format!(
                                    "replaying {} tokens on plan epoch {} (was {})",
                                    self.history.len(),
                                    p.epoch,
                                    self.plan.epoch
                                ),
                                Some(since.elapsed()),
                            );
                            self.rebase(p)?
                        }
                        None => return Err(e),
                    }
                }
            }
        }
    }

    fn rewind(&mut self, pos: usize) {
        if pos >= self.history.len() {
            return;
        }
        self.history.truncate(pos);
        if self.pos > pos {
            self.pos = pos;
            self.ring.to_exec(Input::Kv {
                req: self.req,
                op: KvOp::Truncate { from: pos as u32 },
            });
        }
    }

    fn ctx(&self) -> usize {
        self.ctx
    }

    /// The micro-batch size: the last micro-batch holds every row.
    fn max_rows(&self) -> usize {
        self.ring.settings.ubatch.clamp(1, MAX_UBATCH)
    }
}

impl Drop for RingSession<'_> {
    fn drop(&mut self) {
        self.ring.to_exec(Input::Kv {
            req: self.req,
            op: KvOp::Drop,
        });
    }
}

/// Writes frames to successors: one stream per peer, reopened on failure.
/// A frame that cannot be delivered fails its session at once (the head
/// hears why) instead of waiting for the deadline.
async fn sender(ring: Arc<Ring>, mut rx: UnboundedReceiver<Outgoing>) {
    let mut streams: HashMap<PeerId, Stream> = HashMap::new();
    // Test aid: a one-way delay per hop, to emulate slow links (benchmarks).
    let delay = std::env::var("PRIMA_DEBUG_HOP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3))
        .unwrap_or_default();
    if delay.is_zero() {
        // No timer on the normal path: tokio's timers round up to the next
        // millisecond, which would add up to 1 ms per hop.
        while let Some(o) = rx.recv().await {
            deliver(&ring, &mut streams, o).await;
        }
        return;
    }
    let mut pending: std::collections::VecDeque<(tokio::time::Instant, Outgoing)> =
        Default::default();
    loop {
        let due = pending.front().map(|(t, _)| *t);
        tokio::select! {
            m = rx.recv() => match m {
                Some(o) => pending.push_back((tokio::time::Instant::now() + delay, o)),
                None => break,
            },
            _ = async {
                match due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((_, o)) = pending.pop_front() {
                    deliver(&ring, &mut streams, o).await;
                }
            }
        }
    }
}

/// Writes `frame` on the stream to `peer`, opening it if needed; one retry
/// on a fresh stream.
async fn send_direct(
    ring: &Arc<Ring>,
    streams: &mut HashMap<PeerId, Stream>,
    peer: PeerId,
    frame: &Frame,
) -> Result<(), String> {
    let timeout = ring.settings.timeout;
    let mut result = Err(String::new());
    for _attempt in 0..2 {
        if let std::collections::hash_map::Entry::Vacant(e) = streams.entry(peer) {
            let control = ring.control.read().expect("control").clone();
            let Some(mut control) = control else {
                return Err("the cluster is not running".into());
            };
            match tokio::time::timeout(timeout, control.open_stream(peer, RING_PROTOCOL)).await {
                Ok(Ok(s)) => {
                    e.insert(s);
                }
                Ok(Err(err)) => {
                    result = Err(err.to_string());
                    continue;
                }
                Err(_) => {
                    result = Err(format!("no stream within {timeout:?}"));
                    continue;
                }
            }
        }
        let s = streams.get_mut(&peer).expect("opened above");
        match tokio::time::timeout(timeout, wire::write_frame(s, frame)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => result = Err(e.to_string()),
            Err(_) => result = Err(format!("write blocked for {timeout:?}")),
        }
        streams.remove(&peer);
    }
    result
}

/// Delivers one frame: straight to its device, or through another plan
/// member when the direct link is broken (or breaks now). A frame that
/// cannot be delivered fails its session at the head.
async fn deliver(ring: &Arc<Ring>, streams: &mut HashMap<PeerId, Stream>, o: Outgoing) {
    let Ok(peer) = o.to.parse::<PeerId>() else {
        return;
    };
    // A frame this device relays for another goes straight on (one relay
    // at most).
    let relaying = matches!(o.frame.header, Header::Relay { .. });
    let via = |ring: &Arc<Ring>| {
        ring.relay_for(&o.to)
            .and_then(|v| v.parse::<PeerId>().ok())
            .map(|v| {
                (
                    v,
                    Frame {
                        header: Header::Relay {
                            from: ring.me.clone(),
                            to: o.to.clone(),
                            inner: Box::new(o.frame.header.clone()),
                        },
                        payload: o.frame.payload.clone(),
                    },
                )
            })
    };
    if !relaying && ring.is_broken(&o.to) {
        if let Some((v, f)) = via(ring) {
            if send_direct(ring, streams, v, &f).await.is_ok() {
                return;
            }
        }
    }
    let mut result = send_direct(ring, streams, peer, &o.frame).await;
    if result.is_err() && !relaying {
        ring.mark_broken(&o.to);
        if let Some((v, f)) = via(ring) {
            if send_direct(ring, streams, v, &f).await.is_ok() {
                result = Ok(());
            }
        }
    }
    if let Err(e) = result {
        let name = ring
            .plan()
            .and_then(|p| p.name_of(&o.to).map(str::to_string))
            .unwrap_or_else(|| o.to.clone());
        tracing::warn!(device = %name, error = %e, "ring frame not delivered");
        let header = match o.frame.header {
            Header::Relay { inner, .. } => *inner,
            h => h,
        };
        if let Header::Act { layout, req, .. } | Header::Kv { layout, req, .. } = header {
            ring.to_exec(Input::Frame {
                from: ring.me.clone(),
                frame: Frame::control(Header::Fail {
                    layout,
                    req,
                    msg: format!("device '{name}' cannot be reached: {e}"),
                }),
            });
        }
    }
}

/// Takes ring streams from plan members only; reads their frames into the
/// executor.
async fn accept_ring(ring: Arc<Ring>, mut incoming: libp2p_stream::IncomingStreams) {
    while let Some((peer, stream)) = incoming.next().await {
        let id = peer.to_string();
        if ring.plan().is_none_or(|p| p.rank_of(&id).is_none()) {
            tracing::warn!(%peer, "refused a ring stream from a device outside the plan");
            drop(stream);
            continue;
        }
        tokio::spawn(read_ring(ring.clone(), id, stream));
    }
}

async fn read_ring(ring: Arc<Ring>, from: String, mut stream: Stream) {
    loop {
        let limit = ring.max_payload.load(Ordering::Relaxed);
        match wire::read_frame(&mut stream, limit).await {
            Ok(Some(Frame {
                header:
                    Header::Relay {
                        from: origin,
                        to,
                        inner,
                    },
                payload,
            })) => {
                let members = ring
                    .plan()
                    .is_some_and(|p| p.rank_of(&to).is_some() && p.rank_of(&origin).is_some());
                if to == ring.me {
                    // Relayed to us: as if `origin` had sent it.
                    ring.to_exec(Input::Frame {
                        from: origin,
                        frame: Frame {
                            header: *inner,
                            payload,
                        },
                    });
                } else if origin == from && members {
                    // Pass it on for a member whose link to `to` broke.
                    let _ = ring.relay_out.send(Outgoing {
                        to: to.clone(),
                        frame: Frame {
                            header: Header::Relay {
                                from: origin,
                                to,
                                inner,
                            },
                            payload,
                        },
                    });
                } else {
                    tracing::warn!(peer = %from, "dropped a relayed frame not from its sender or not for the plan");
                }
            }
            Ok(Some(frame)) => ring.to_exec(Input::Frame {
                from: from.clone(),
                frame,
            }),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "closing a ring stream");
                break;
            }
        }
    }
}

async fn write_msg<W: futures_util::io::AsyncWrite + Unpin>(
    w: &mut W,
    body: &[u8],
) -> std::io::Result<()> {
    w.write_all(&(body.len() as u32).to_le_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

async fn read_msg<R: futures_util::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_ASK_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {n} bytes (limit {MAX_ASK_BYTES})"),
        ));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Answers bandwidth probes: reads the announced bytes (bounded), acks.
async fn accept_bw(mut incoming: libp2p_stream::IncomingStreams) {
    while let Some((peer, mut s)) = incoming.next().await {
        tokio::spawn(async move {
            let serve = async {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).await?;
                let n = u32::from_le_bytes(len) as usize;
                if n > 4 * BW_PROBE_BYTES {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("probe of {n} bytes (limit {})", 4 * BW_PROBE_BYTES),
                    ));
                }
                let mut buf = vec![0u8; 64 << 10];
                let mut left = n;
                while left > 0 {
                    let k = left.min(buf.len());
                    s.read_exact(&mut buf[..k]).await?;
                    left -= k;
                }
                s.write_all(&[1]).await?;
                s.close().await
            };
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), serve).await {
                tracing::debug!(%peer, error = %e, "bandwidth probe refused");
            }
        });
    }
}

/// Answers requests other devices pass to this head.
async fn accept_ask(ring: Arc<Ring>, mut incoming: libp2p_stream::IncomingStreams) {
    while let Some((peer, stream)) = incoming.next().await {
        let Some(handler) = ring.ask.get().cloned() else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = serve_ask(handler, stream).await {
                tracing::warn!(%peer, error = %e, "a forwarded request failed");
            }
        });
    }
}

async fn serve_ask(handler: Arc<AskHandler>, mut s: Stream) -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let body = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s))
        .await
        .map_err(|_| bad("no request within 10 s".into()))??
        .ok_or_else(|| bad("empty request".into()))?;
    let req: GenRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad request: {e}")))?;
    let mut events = handler(req);
    while let Some(ev) = events.recv().await {
        let (msg, last) = match ev {
            Event::Started { prompt_tokens } => (AskEvent::Started { prompt_tokens }, false),
            Event::Text(text, ids) => (AskEvent::Text { text, ids }, false),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                speculative,
            } => (
                AskEvent::Done {
                    finish: finish.to_string(),
                    prompt_tokens,
                    completion_tokens,
                    speculative,
                },
                true,
            ),
            Event::Failed(e) => (
                AskEvent::Failed {
                    status: e.status.as_u16(),
                    message: e.message,
                    code: e.code.map(str::to_string),
                },
                true,
            ),
        };
        // A write error means the asking device went away: dropping
        // `events` cancels the generation.
        write_msg(&mut s, &serde_json::to_vec(&msg).expect("events serialise")).await?;
        if last {
            break;
        }
    }
    s.close().await
}

/// Fraction of the pages under `spans` (offset, length) of `map` that are
/// in memory. `map` must be the start of a memory mapping (page-aligned).
fn resident_fraction(map: &[u8], spans: &[(u64, u64)]) -> f64 {
    #[cfg(unix)]
    {
        let page = 4096usize;
        let (mut total, mut resident) = (0usize, 0usize);
        for &(off, len) in spans {
            let start = off as usize / page * page;
            let end = ((off + len) as usize).min(map.len());
            if start >= end {
                continue;
            }
            let pages = (end - start).div_ceil(page);
            let mut vec = vec![0u8; pages];
            // SAFETY: [start, end) lies inside `map`, a live mapping whose
            // base is page-aligned, so `start` is page-aligned; `vec` has one
            // byte per page of the range, as mincore requires.
            let rc = unsafe {
                libc::mincore(
                    map.as_ptr().add(start) as *mut libc::c_void,
                    end - start,
                    vec.as_mut_ptr() as *mut _,
                )
            };
            if rc == 0 {
                total += pages;
                resident += vec.iter().filter(|&&b| b & 1 == 1).count();
            }
        }
        if total == 0 {
            0.0
        } else {
            resident as f64 / total as f64
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (map, spans);
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::micro_batches;

    #[test]
    fn the_last_micro_batch_holds_every_row_whose_logits_are_wanted() {
        assert_eq!(micro_batches(5, 64, 1), vec![5]);
        assert_eq!(micro_batches(130, 64, 1), vec![64, 64, 2]);
        // Nine rows to verify, two left over: the cut moves back.
        assert_eq!(micro_batches(130, 64, 9), vec![64, 57, 9]);
        assert_eq!(micro_batches(64, 64, 9), vec![64]);
        assert_eq!(micro_batches(72, 64, 9), vec![63, 9]);
        // No lone token at the end of a prompt.
        assert_eq!(micro_batches(129, 64, 1), vec![64, 60, 5]);
        assert_eq!(micro_batches(9, 4, 1), vec![4, 3, 2]);
        assert_eq!(micro_batches(1, 64, 1), vec![1]);
        for (len, ub, rows) in [(1, 1, 1), (3, 1, 1), (200, 7, 7), (33, 32, 32), (9, 4, 3)] {
            let s = micro_batches(len, ub, rows);
            assert_eq!(s.iter().sum::<usize>(), len);
            assert!(s.iter().all(|&n| (1..=ub).contains(&n)), "{s:?}");
            assert!(*s.last().unwrap() >= rows, "{s:?}");
            if rows == 1 && ub > 1 && len > 1 {
                assert!(s.iter().all(|&n| n >= 2), "{s:?}");
            }
        }
    }
}
