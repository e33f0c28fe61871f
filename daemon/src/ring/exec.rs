//! The ring executor: one OS thread per device that runs this device's
//! layer windows on the batches that reach it, in arrival order.
//!
//! Everything a device does for the ring goes through here: preparing a
//! plan (map the GGUF, load only its windows, warm up), running a window on
//! an activation frame and passing the result on, applying KV-cache
//! commands, and on the head embedding new batches, closing each round and
//! producing logits. Because frames are taken in order, a device works on
//! micro-batch i+1 while its successor works on i: prefill is pipelined
//! across the ring without any extra machinery.
//!
//! After a window has run and its output is on its way, the device asks the
//! kernel to read its next window ahead (spec §2.3), so the disk works while
//! the other devices compute.

use std::{
    collections::HashMap,
    ops::Range,
    path::PathBuf,
    sync::{mpsc, Arc},
    time::Instant,
};

use prima_kernels::{
    gguf::Gguf,
    model::{Hidden, KvCache},
    Model,
};

use super::{
    plan::RingPlan,
    wire::{Frame, Header, KvOp},
};

/// What the head's driver gets back for a batch: the session id and the
/// logits of the rows it asked for, row after row (sessions replayed under
/// a new id share the channel, so stale answers are told apart).
pub type Logits = (u64, Result<Vec<f32>, String>);

pub enum Input {
    /// Load this device's windows of `plan` from `path`; `done` hears the
    /// outcome.
    Prepare {
        plan: RingPlan,
        rank: Option<usize>,
        path: Option<PathBuf>,
        done: Box<dyn FnOnce(Result<(), String>) + Send>,
    },
    /// A frame from `from` (a peer id).
    Frame {
        from: String,
        frame: Frame,
    },
    /// Head: start a batch of a session (on the layout `batch.layout`).
    Submit {
        batch: Batch,
        tokens: Vec<u32>,
        reply: mpsc::Sender<Logits>,
    },
    /// Head: a cache command for a session (applied here, then sent round).
    Kv {
        req: u64,
        op: KvOp,
    },
    Stop,
}

/// Where a batch belongs: its session, the plan layout the session runs
/// on, its first position, the session's context, for how many of its
/// last tokens the head wants logits (0: none), and where the session's
/// decoded tokens begin (`prima_kernels::Hidden::decoded_from`).
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    pub req: u64,
    pub layout: u64,
    pub pos: usize,
    pub ctx: usize,
    pub rows: usize,
    pub decoded_from: usize,
}

/// Why a session's batch was refused: the devices now run another layout.
pub const REPLANNED: &str = "the ring was replanned";

/// A frame to send to the device with peer id `to`.
pub struct Outgoing {
    pub to: String,
    pub frame: Frame,
}

struct Prepared {
    plan: RingPlan,
    /// `plan.layout_id()`: sessions on this layout run here, whatever epoch
    /// they began under.
    layout: u64,
    rank: usize,
    file: Arc<Gguf>,
    /// One model view per round, holding that round's window.
    windows: Vec<Model>,
    ranges: Vec<Range<usize>>,
    /// Per round, the window's last n_m layers uploaded to the GPU.
    gpu: Vec<Option<crate::gpu::Layers>>,
    /// Per session, per round: the CPU cache, and the GPU layers' cache.
    sessions: HashMap<u64, Vec<(KvCache, Option<crate::gpu::Kv>)>>,
    /// Head: who waits for the logits of each session.
    replies: HashMap<u64, mpsc::Sender<Logits>>,
    /// Layers that do not fit the memory budget and are read per use.
    streaming: Option<Arc<Streaming>>,
}

/// The weight matrices a device cannot keep resident: each is read ahead
/// while the one before it computes (explicit WillNeed) and dropped right
/// after use, so the resident ones are never evicted by the kernel's LRU and
/// nothing is read twice. Which ones stream follows the caches the live
/// sessions hold: a short answer's cache leaves room for more weights.
pub struct Streaming {
    file: Arc<Gguf>,
    /// For dropping streamed pages from the page cache.
    fd: std::fs::File,
    /// Every weight matrix of this device's windows, (offset, length), in
    /// the order the forward pass uses them.
    mats: Vec<(u64, u64)>,
    /// Bytes for weights and caches: the budget less the process, its
    /// slack and the output matrix.
    room: u64,
    /// Cache bytes per context position, over all of this device's layers.
    kv_per_pos: u64,
    set: std::sync::Mutex<StreamSet>,
}

#[derive(Default)]
struct StreamSet {
    /// Streamed matrices in the order they are used.
    order: Vec<(u64, u64)>,
    /// Offset -> index in `order`.
    index: HashMap<u64, usize>,
}

/// Matrices read ahead of the one in use. One keeps the disk busy (each
/// read-ahead is a whole matrix, megabytes); each more costs a matrix of
/// resident weights. Measured on the bigger-than-memory benchmark: 210 ms
/// per token with one, 230 ms with two.
const LOOKAHEAD: usize = 1;

impl Streaming {
    /// Re-decides what streams for caches of `positions` context positions
    /// in all (the sum over live sessions); returns the bytes streamed per
    /// token.
    fn reserve(&self, positions: usize) -> u64 {
        let need = bytes_to_stream(&self.mats, self.room, positions as u64 * self.kv_per_pos);
        let order: Vec<(u64, u64)> = choose_streamed(&self.mats, need)
            .into_iter()
            .map(|i| self.mats[i])
            .collect();
        let bytes = order.iter().map(|m| m.1).sum();
        let index = order
            .iter()
            .enumerate()
            .map(|(i, (a, _))| (*a, i))
            .collect();
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if set.order != order {
            tracing::debug!(
                positions,
                streamed_matrices = order.len(),
                streamed_mb_per_token = bytes >> 20,
                "streamed weights follow the caches"
            );
        }
        *set = StreamSet { order, index };
        bytes
    }

    fn prefetch(&self, set: &StreamSet, i: usize) {
        if set.order.is_empty() {
            return;
        }
        let (a, len) = set.order[i % set.order.len()];
        self.file.prefetch(a, len);
    }

    /// Reads the first matrices ahead.
    fn start(&self) {
        let set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..LOOKAHEAD.min(set.order.len()) {
            self.prefetch(&set, i);
        }
    }

    /// After a matrix was used: drop its pages if it streams, and read the
    /// one LOOKAHEAD places on.
    fn after(&self, w: &prima_kernels::tensor::Weight) {
        let (a, len) = w.span();
        let set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&i) = set.index.get(&a) else {
            return; // resident
        };
        self.file.release(a, len);
        // (macOS has no fadvise; releasing the mapping above is what it gets.)
        crate::memory::drop_cached(&self.fd, a, len);
        self.prefetch(&set, i + LOOKAHEAD);
    }
}

/// The weight matrices of `layer`, (offset, length), in the order the
/// forward pass uses them.
fn layer_matrices(file: &Gguf, layer: usize) -> Vec<(u64, u64)> {
    use prima_kernels::model::names;
    [
        names::ATTN_Q,
        names::ATTN_K,
        names::ATTN_V,
        names::ATTN_OUT,
        names::FFN_GATE,
        names::FFN_UP,
        names::FFN_DOWN,
    ]
    .iter()
    .filter_map(|n| file.tensor(&names::layer(layer, n)))
    .map(|t| (t.offset, t.size))
    .collect()
}

/// What a request may allocate beyond the process as measured at plan time
/// (activations, the prefill's per-thread scratch, network buffers).
const SLACK: u64 = 16 << 20;

/// Decides whether this device's windows fit `budget` bytes (weights plus
/// caches) with a session of `max_ctx` positions; if not, which weight
/// matrices stream (re-decided as sessions come and go).
fn plan_streaming(
    file: &Arc<Gguf>,
    path: &std::path::Path,
    ranges: &[Range<usize>],
    head: bool,
    kv_per_pos: u64,
    max_ctx: usize,
    budget: u64,
) -> Result<Option<Arc<Streaming>>, String> {
    // The process itself as it stands (runtime, network, buffers, its own
    // binary's pages), plus slack for what a request allocates.
    crate::memory::release_free(); // what the previous plan freed
    let overhead = crate::memory::overhead_excluding(path).unwrap_or(96 << 20);
    let mats: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|r| r.clone())
        .flat_map(|l| layer_matrices(file, l))
        .collect();
    let total: u64 = mats.iter().map(|m| m.1).sum();
    // The head reads the output matrix every token: it stays resident.
    let out = if head {
        file.tensor("output.weight")
            .or_else(|| file.tensor("token_embd.weight"))
            .map(|t| t.size)
            .unwrap_or(0)
    } else {
        0
    };
    let room = budget.saturating_sub(overhead + SLACK + out);
    if bytes_to_stream(&mats, room, max_ctx as u64 * kv_per_pos) == 0 {
        return Ok(None);
    }
    let fd = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let st = Streaming {
        file: file.clone(),
        fd,
        mats,
        room,
        kv_per_pos,
        set: Default::default(),
    };
    let at_most = st.reserve(max_ctx);
    let idle = st.reserve(0);
    tracing::info!(
        budget_mb = budget >> 20,
        overhead_mb = overhead >> 20,
        weights_mb = total >> 20,
        streamed_mb_per_token_idle = idle >> 20,
        streamed_mb_per_token_full_context = at_most >> 20,
        "the windows do not fit in memory: streaming the rest"
    );
    Ok(Some(Arc::new(st)))
}

/// How many bytes of `mats` must stream when `room` bytes hold the
/// resident weights, `kv` bytes of caches, and (when anything streams) the
/// matrix in use with those read ahead of it.
fn bytes_to_stream(mats: &[(u64, u64)], room: u64, kv: u64) -> u64 {
    let total: u64 = mats.iter().map(|m| m.1).sum();
    if total + kv <= room {
        return 0;
    }
    let biggest = mats.iter().map(|x| x.1).max().unwrap_or(0);
    let keep = room.saturating_sub(kv + (LOOKAHEAD as u64 + 1) * biggest);
    total - keep.min(total)
}

/// Picks at least `need` bytes of `mats` (in run order) to stream, from the
/// end of the order: one contiguous stretch of the file, which this disk
/// reads faster than the same bytes spread along the window (210 vs 290 ms
/// per token measured on the bigger-than-memory benchmark). Returns indices
/// in run order.
fn choose_streamed(mats: &[(u64, u64)], need: u64) -> Vec<usize> {
    let mut taken = 0u64;
    let mut first = mats.len();
    while taken < need && first > 0 {
        first -= 1;
        taken += mats[first].1;
    }
    (first..mats.len()).collect()
}

pub struct Settings {
    /// Largest context a session may ask for.
    pub max_ctx: usize,
    /// Advise the kernel to read the next window after each one.
    pub prefetch: bool,
    /// Memory this device may use for weights and caches (a cgroup limit,
    /// or set in config); None: no limit, every window stays resident.
    pub memory_budget: Option<u64>,
    /// Where the plan's GPU layers run.
    pub gpu: crate::gpu::Handle,
}

/// Runs until `Input::Stop` or the input channel closes.
pub fn run(
    rx: mpsc::Receiver<Input>,
    out: tokio::sync::mpsc::UnboundedSender<Outgoing>,
    settings: Settings,
) {
    let mut state: Option<Prepared> = None;
    while let Ok(input) = rx.recv() {
        match input {
            Input::Stop => break,
            Input::Prepare {
                plan,
                rank,
                path,
                done,
            } => {
                // Reuse the loaded windows when only the epoch moved.
                if let (Some(p), Some(r)) = (&mut state, rank) {
                    if p.plan.same_layout(&plan) && p.rank == r {
                        p.plan = plan;
                        done(Ok(()));
                        continue;
                    }
                }
                // Sessions waiting here cannot go on with these windows.
                if let Some(p) = &mut state {
                    for (req, r) in p.replies.drain() {
                        let _ = r.send((req, Err(REPLANNED.into())));
                    }
                }
                state = None; // unmap the old windows first
                match (rank, path) {
                    (Some(rank), Some(path)) => match prepare(plan, rank, path, &settings) {
                        Ok(p) => {
                            state = Some(p);
                            done(Ok(()));
                        }
                        Err(e) => done(Err(e)),
                    },
                    (None, _) => done(Ok(())), // not in this plan
                    (Some(_), None) => done(Err("the plan's model is not here".into())),
                }
            }
            Input::Frame { from, frame } => match &mut state {
                Some(p) => p.on_frame(&from, frame, &out, &settings),
                None => tracing::debug!(peer = %from, "ring frame before any plan; dropped"),
            },
            Input::Submit {
                batch,
                tokens,
                reply,
            } => match &mut state {
                Some(p) if p.rank == 0 && p.current(batch.layout) => {
                    p.replies.insert(batch.req, reply);
                    p.submit(batch, &tokens, &out, &settings);
                }
                _ => {
                    let _ = reply.send((batch.req, Err(REPLANNED.into())));
                }
            },
            Input::Kv { req, op } => {
                if let Some(p) = &mut state {
                    p.kv(req, op, &out);
                }
            }
        }
    }
}

fn prepare(
    plan: RingPlan,
    rank: usize,
    path: PathBuf,
    settings: &Settings,
) -> Result<Prepared, String> {
    let t = Instant::now();
    let file = Arc::new(Gguf::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?);
    let ranges = plan.windows(rank);
    let mut windows = Vec::with_capacity(ranges.len());
    for r in &ranges {
        windows.push(
            Model::load(file.clone(), r.clone())
                .map_err(|e| format!("loading layers {r:?}: {e}"))?,
        );
    }
    let n_layer = windows
        .first()
        .map(|m| m.config.n_layer)
        .unwrap_or_default();
    if n_layer != plan.n_layer as usize {
        return Err(format!(
            "the model here has {n_layer} layers, the plan says {}",
            plan.n_layer
        ));
    }
    let streaming = match settings.memory_budget {
        Some(budget) => {
            let c = &windows[0].config;
            let n: usize = ranges.iter().map(|r| r.len()).sum();
            // f16 keys and values, per position, over this device's layers.
            let kv_per_pos = (n * c.kv_dim() * 2 * 2) as u64;
            plan_streaming(
                &file,
                &path,
                &ranges,
                rank == 0,
                kv_per_pos,
                settings.max_ctx,
                budget,
            )?
        }
        None => None,
    };
    if let Some(st) = &streaming {
        for w in windows.iter_mut() {
            let st = st.clone();
            w.set_after_weight(Arc::new(move |w| st.after(w)));
        }
        st.start();
    }
    // The last n_m layers of each window on the GPU (Halda's placement); a
    // window whose upload fails runs on the CPU.
    let n_m = plan.devices[rank].gpu_layers as usize;
    let gpu = windows
        .iter()
        .zip(&ranges)
        .map(|(m, r)| {
            if n_m == 0 {
                return None;
            }
            let on_gpu = r.end - n_m.min(r.len())..r.end;
            match crate::gpu::upload(&settings.gpu, m, on_gpu.clone()) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(layers = ?on_gpu, error = %e, "GPU upload failed; these layers run on the CPU");
                    None
                }
            }
        })
        .collect();
    let p = Prepared {
        layout: plan.layout_id(),
        plan,
        rank,
        file,
        windows,
        ranges,
        gpu,
        sessions: HashMap::new(),
        replies: HashMap::new(),
        streaming,
    };
    // Warm up: one token through every window touches its weights and the
    // kernels' buffers, so the first real token is not the slow one.
    let mut p = p;
    for r in 0..p.windows.len() {
        let c = &p.windows[r].config;
        let mut kv = (KvCache::new(c, p.ranges[r].clone(), 1), None);
        let mut h = Hidden {
            data: vec![0.0; c.n_embd],
            n_tokens: 1,
            dim: c.n_embd,
            decoded_from: 0,
        };
        p.run_layers(r, &mut h, &mut kv, 0)
            .map_err(|e| format!("warm-up of layers {:?}: {e}", p.ranges[r]))?;
    }
    let on_gpu: Vec<usize> = p
        .gpu
        .iter()
        .map(|g| g.as_ref().map_or(0, |g| g.layers().len()))
        .collect();
    tracing::info!(
        epoch = p.plan.epoch, rank, windows = ?p.ranges, gpu_layers = ?on_gpu, elapsed = ?t.elapsed(),
        "ring windows loaded"
    );
    Ok(p)
}

impl Prepared {
    /// The streamed weights follow the caches the live sessions hold.
    fn sessions_changed(&self) {
        if let Some(st) = &self.streaming {
            let positions = self
                .sessions
                .values()
                .filter_map(|c| c.first())
                .map(|c| c.0.ctx())
                .sum();
            st.reserve(positions);
        }
    }

    /// Runs window `r` (streamed matrices are dropped by the model's hook),
    /// its GPU layers on the GPU with the session's GPU cache (made here,
    /// for the CPU cache's context, on the session's first batch).
    fn run_layers(
        &mut self,
        r: usize,
        h: &mut Hidden,
        kv: &mut (KvCache, Option<crate::gpu::Kv>),
        pos: usize,
    ) -> Result<(), String> {
        let range = self.ranges[r].clone();
        let gpu = match &mut self.gpu[r] {
            Some(l) => {
                if kv.1.is_none() {
                    kv.1 = Some(crate::gpu::new_kv(l, kv.0.ctx())?);
                }
                kv.1.as_mut().map(|k| (l, k))
            }
            None => None,
        };
        crate::gpu::forward(&self.windows[r], gpu, range, h, &mut kv.0, pos)
    }

    fn dim(&self) -> usize {
        self.windows[0].config.n_embd
    }

    fn send(&self, rank: usize, frame: Frame, out: &tokio::sync::mpsc::UnboundedSender<Outgoing>) {
        let _ = out.send(Outgoing {
            to: self.plan.devices[rank].id.clone(),
            frame,
        });
    }

    /// Reports a failed session to the head (straight there, not round the
    /// ring, which may be what broke).
    fn fail(&mut self, req: u64, msg: String, out: &tokio::sync::mpsc::UnboundedSender<Outgoing>) {
        let layout = self.layout;
        self.fail_layout(req, layout, msg, out)
    }

    fn fail_layout(
        &mut self,
        req: u64,
        layout: u64,
        msg: String,
        out: &tokio::sync::mpsc::UnboundedSender<Outgoing>,
    ) {
        tracing::warn!(req, error = %msg, "ring batch failed");
        if self.sessions.remove(&req).is_some() {
            self.sessions_changed();
        }
        if self.rank == 0 {
            if let Some(r) = self.replies.remove(&req) {
                let _ = r.send((req, Err(msg)));
            }
        } else {
            self.send(0, Frame::control(Header::Fail { layout, req, msg }), out);
        }
    }

    /// Whether a session on `layout` runs on these windows.
    fn current(&self, layout: u64) -> bool {
        layout == self.layout
    }

    fn submit(
        &mut self,
        b: Batch,
        tokens: &[u32],
        out: &tokio::sync::mpsc::UnboundedSender<Outgoing>,
        s: &Settings,
    ) {
        let h = match self.windows[0].embed(tokens) {
            Ok(h) => Hidden {
                decoded_from: b.decoded_from,
                ..h
            },
            Err(e) => return self.fail(b.req, e.to_string(), out),
        };
        let (rank, round) = self.plan.first_stage();
        self.route(b, rank, round, h, out, s);
    }

    /// Runs or sends the batch for stage (rank, round).
    fn route(
        &mut self,
        b: Batch,
        mut rank: usize,
        mut round: u32,
        mut h: Hidden,
        out: &tokio::sync::mpsc::UnboundedSender<Outgoing>,
        s: &Settings,
    ) {
        loop {
            if rank != self.rank {
                let header = Header::Act {
                    layout: b.layout,
                    req: b.req,
                    round,
                    pos: b.pos as u32,
                    n_tokens: h.n_tokens as u32,
                    ctx: b.ctx as u32,
                    rows: b.rows as u32,
                    decoded_from: b.decoded_from.min(u32::MAX as usize) as u32,
                };
                self.send(rank, Frame::act(header, &h.data), out);
                // The other devices' windows come before this one's next:
                // the compute threads need not wait hot for it.
                prima_kernels::cpu::pool().rest();
                if s.prefetch {
                    self.prefetch_after(round);
                }
                return;
            }
            if let Err(e) = self.run_window(b.req, round, b.pos, b.ctx, &mut h) {
                return self.fail(b.req, e, out);
            }
            match self.plan.next_stage(rank, round) {
                Some((r, k)) => {
                    rank = r;
                    round = k;
                }
                None => {
                    // The head finished the last layer: close the ring.
                    if b.rows > 0 {
                        let rows: Vec<usize> =
                            (h.n_tokens.saturating_sub(b.rows)..h.n_tokens).collect();
                        let logits = self.windows[0].head(&h, &rows);
                        if let Some(r) = self.replies.get(&b.req) {
                            let _ = r.send((b.req, Ok(logits)));
                        }
                    }
                    if s.prefetch {
                        self.prefetch_after(round);
                    }
                    return;
                }
            }
        }
    }

    fn run_window(
        &mut self,
        req: u64,
        round: u32,
        pos: usize,
        ctx: usize,
        h: &mut Hidden,
    ) -> Result<(), String> {
        let n_windows = self.windows.len();
        if !self.sessions.contains_key(&req) {
            if pos != 0 {
                return Err(format!(
                    "session {req} is unknown here and its batch starts at position {pos}"
                ));
            }
            let caches = self
                .windows
                .iter()
                .zip(&self.ranges)
                .map(|(m, r)| (KvCache::new(&m.config, r.clone(), ctx), None))
                .collect();
            self.sessions.insert(req, caches);
            self.sessions_changed();
        }
        let caches = self.sessions.get_mut(&req).expect("inserted above");
        let r = round as usize;
        if r >= n_windows {
            return Err(format!("round {round} of a plan with k = {n_windows}"));
        }
        let mut kv = std::mem::replace(&mut caches[r], (KvCache::empty(), None));
        let res = self.run_layers(r, h, &mut kv, pos);
        if let Some(c) = self.sessions.get_mut(&req) {
            c[r] = kv;
        }
        res.map_err(|e| format!("layers {:?}: {e}", self.ranges[r]))
    }

    /// Advises the kernel to read the window after `round` (the next round's,
    /// or the first one's for the next token).
    fn prefetch_after(&self, round: u32) {
        if self.windows.len() < 2 || self.streaming.is_some() {
            return; // one window stays resident between tokens anyway
        }
        let next = (round as usize + 1) % self.windows.len();
        prefetch_layers(&self.file, self.ranges[next].clone());
    }

    fn on_frame(
        &mut self,
        from: &str,
        frame: Frame,
        out: &tokio::sync::mpsc::UnboundedSender<Outgoing>,
        s: &Settings,
    ) {
        let layout = frame.header.layout();
        let req = frame.header.req();
        if !self.current(layout) {
            tracing::debug!(peer = %from, layout, mine = self.layout, "frame of another plan layout");
            if matches!(frame.header, Header::Act { .. }) {
                // The head hears it at once and replays on the new plan.
                self.fail_layout(req, layout, REPLANNED.into(), out);
            }
            return;
        }
        let prev = &self.plan.devices[self.plan.prev(self.rank)].id;
        if let Err(e) = frame.check(self.dim()) {
            return self.fail(req, format!("bad frame from {from}: {e}"), out);
        }
        match frame.header {
            Header::Fail { msg, .. } => {
                if self.rank == 0 {
                    self.fail(req, msg, out);
                }
            }
            // Unwrapped by the reader; never here.
            Header::Relay { .. } => {
                tracing::warn!(peer = %from, "a relay frame reached the executor; dropped")
            }
            _ if from != prev => {
                tracing::warn!(peer = %from, "ring frame from a device that is not my predecessor; dropped");
            }
            Header::Kv { op, .. } => self.kv(req, op, out),
            Header::Act {
                round,
                pos,
                n_tokens,
                ctx,
                rows,
                decoded_from,
                ..
            } => {
                let ctx = ctx as usize;
                let end = pos as usize + n_tokens as usize;
                if ctx > s.max_ctx || end > ctx || round >= self.plan.k {
                    return self.fail(
                        req,
                        format!(
                            "batch out of bounds: positions {pos}..{end}, context {ctx} \
                             (limit {}), round {round} of {}",
                            s.max_ctx, self.plan.k
                        ),
                        out,
                    );
                }
                let h = Hidden {
                    data: frame.floats(),
                    n_tokens: n_tokens as usize,
                    dim: self.dim(),
                    decoded_from: decoded_from as usize,
                };
                let b = Batch {
                    req,
                    layout,
                    pos: pos as usize,
                    ctx,
                    rows: rows as usize,
                    decoded_from: decoded_from as usize,
                };
                // This frame is for my window of `round`: run it here.
                self.route(b, self.rank, round, h, out, s);
            }
        }
    }

    fn kv(&mut self, req: u64, op: KvOp, out: &tokio::sync::mpsc::UnboundedSender<Outgoing>) {
        match op {
            KvOp::Drop => {
                if self.sessions.remove(&req).is_some() {
                    self.sessions_changed();
                }
                crate::memory::release_free();
                if self.rank == 0 {
                    self.replies.remove(&req);
                }
            }
            // A rejected speculative tail: positions from `from` on are
            // overwritten by the session's next batch (which starts there)
            // and attention never reads past its own position, so the
            // rollback costs nothing here; the message keeps every device
            // told, in order with the session's batches.
            KvOp::Truncate { from } => {
                tracing::trace!(req, from, "session rolled back");
            }
        }
        let next = self.plan.next(self.rank);
        if next != 0 {
            let layout = self.layout;
            self.send(next, Frame::control(Header::Kv { layout, req, op }), out);
        }
    }
}

/// WillNeed over the tensors of `layers`, page-aligned and merged.
fn prefetch_layers(file: &Gguf, layers: Range<usize>) {
    let mut spans: Vec<(u64, u64)> = file
        .tensors
        .iter()
        .filter(|t| {
            prima_kernels::model::names::layer_of(&t.name).is_some_and(|l| layers.contains(&l))
        })
        .map(|t| (t.offset, t.offset + t.size))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(m) if a <= m.1 + 4096 => m.1 = m.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    for (a, b) in merged {
        file.prefetch(a, b - a);
    }
}

#[cfg(test)]
mod streaming_tests {
    use super::{bytes_to_stream, choose_streamed, LOOKAHEAD};

    /// A window of `layers` layers shaped like the synthetic 3B model:
    /// q, k, v, o, gate, up, down.
    fn window(layers: usize) -> Vec<(u64, u64)> {
        let sizes = [5u64, 2, 2, 5, 14, 14, 14];
        let mut off = 0;
        let mut v = Vec::new();
        for _ in 0..layers {
            for s in sizes {
                v.push((off, s));
                off += s;
            }
        }
        v
    }

    #[test]
    fn streams_the_tail_of_the_window_and_no_more_than_needed() {
        let mats = window(11);
        let total: u64 = mats.iter().map(|m| m.1).sum();
        for need in [1, 14, 30, 100, 170, 400, total - 1, total] {
            let s = choose_streamed(&mats, need);
            let bytes: u64 = s.iter().map(|&i| mats[i].1).sum();
            assert!(bytes >= need, "need {need}, streams {bytes}");
            // Less than one matrix beyond what is needed.
            assert!(bytes < need + 14, "need {need}, streams {bytes}");
            // One contiguous stretch ending with the window.
            assert_eq!(*s.last().unwrap(), mats.len() - 1);
            assert!(s.windows(2).all(|w| w[0] + 1 == w[1]), "{s:?}");
        }
        assert!(choose_streamed(&mats, 0).is_empty());
    }

    #[test]
    fn streamed_bytes_follow_the_caches() {
        let mats = window(11);
        let total: u64 = mats.iter().map(|m| m.1).sum(); // 616
                                                         // Everything fits with the cache: nothing streams, no read-ahead room.
        assert_eq!(bytes_to_stream(&mats, total + 20, 20), 0);
        // 1 byte short: the shortfall plus room for the matrix in use and
        // the one read ahead (14 each).
        let lookahead = (LOOKAHEAD as u64 + 1) * 14;
        assert_eq!(bytes_to_stream(&mats, total + 19, 20), 1 + lookahead);
        // A longer context streams that much more; an idle device streams
        // the least.
        let room = total - 50;
        let idle = bytes_to_stream(&mats, room, 0);
        let busy = bytes_to_stream(&mats, room, 40);
        assert_eq!(idle, 50 + lookahead);
        assert_eq!(busy, idle + 40);
        // No room at all: every matrix streams.
        assert_eq!(bytes_to_stream(&mats, 0, 40), total);
    }
}
