//! The two cost models: the **shipped** one (prima-spec §4.2–4.5, exactly as
//! prima.cpp's Halda scores a plan) and primad's **ring** model (the same
//! per-layer compute and memory physics, plus prefetch overlap and a
//! communication term).
//!
//! # Notation (spec §4.1–4.2)
//!
//! * b' = b + kv_bytes_per_token·n_ctx, the memory cost of one layer;
//! * h_m = [m is head]·(b_i/V + b_o), the head's resident extras;
//! * α_m = Σ_q F_q / s^cpu_{m,q} + t^kv_cpu, ms per CPU layer;
//! * β_m = Σ_q F_q / s^gpu_{m,q} − Σ_q F_q / s^cpu_{m,q} + t^kv_gpu − t^kv_cpu,
//!   the change when one window layer moves to the GPU (0 without a GPU);
//! * τ_m(x) = x / (s^disk_m·1e9)·1000 ms, the time to read x bytes.
//!
//! A plan is (k, w_m, n_m): every device runs k windows of w_m layers per
//! token, n_m of them on its GPU, and Σ_m w_m = W = L/k.
//!
//! # Shipped model (spec §4.4, §4.5)
//!
//! Each device is classified into M1..M4 (§4.4) and charged
//! k·(a_m·w_m + b_m·n_m) plus the constant κ. Read per device this is
//! compute k·(α_m·w_m + β_m·n_m) plus disk time: τ of the **overflow**
//! k(w−n)b' + h + c^cpu − d on Linux (M3) and for macOS without Metal (M1),
//! and τ of **all** k·w·b mapped bytes (plus the head's b_o) on macOS with
//! Metal once the working set is exceeded (M2). M4 devices pay no disk time
//! except the head's embedding-row read τ(b_i/V). κ also adds T_head (the
//! head's CPU time for one *layer*, as the shipped code does).
//!
//! [`shipped_tpot`] evaluates any plan this way with an *honest*
//! classification: the calibration's forced-M4 marks and the "disk slower than
//! 0.1 GB/s is M4" shortcut are not applied (the shipped ILP keeps such devices
//! within memory anyway, so its own plans score identically), and an
//! overflowing Windows device is charged like M3 instead of nothing.
//!
//! # Ring model (primad's)
//!
//! Per round, device m computes for t_m = α_m·w_m + β_m·n_m and must read
//! ℓ_m = τ_m(O_m)/k from disk, where O_m is the same per-token disk volume as
//! in the shipped model (overflow, or everything for Metal over budget). Loading the **next** window while the
//! other devices compute is possible when the device has room for it: when
//! two windows fit next to the resident rest ("pair fit",
//! 2·(w−n)·b' + h + c^cpu ≤ d, spec §2.2) and k ≥ 2 (with k = 1 the next
//! window is the current one, the prefetch–release conflict). The steady-state
//! round time of the ring is then
//!
//! ```text
//! T_round = max( Σ_m t_m + Σ_{m not pair-fit} ℓ_m + C,   max_{m pair-fit} (t_m + ℓ_m) )
//! TPOT    = k · T_round + T_out + τ_0(b_i/V)
//! ```
//!
//! where C is the ring's communication time per round (Σ over hops of
//! rtt/2 + 4·n_embd bytes / bandwidth), T_out is the head's output-layer
//! compute and τ_0(b_i/V) the read of the sampled token's embedding row,
//! which cannot be prefetched. A pair-fit device's load runs in parallel with everybody else's
//! work and only becomes visible when it is longer than the rest of the round.
//! Resident **anonymous** memory (KV cache of CPU layers, compute buffers,
//! GPU copies on unified memory) is a hard limit: it cannot be re-read from
//! the model file. VRAM is a hard limit in both models:
//! k·n_m·b' ≤ g_m − c^gpu_m (§4.6 VRAM row).

use serde::{Deserialize, Serialize};

use crate::error::{HaldaError, Result};
use crate::plan::Options;
use crate::profile::{
    validate_device, validate_model, ByWeightType, DeviceProfile, ModelProfile, Os,
};

/// Memory case of a device (spec §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemorySet {
    /// macOS without Metal, memory insufficient: overflow re-read (random reads).
    M1,
    /// macOS with Metal, working set exceeded: all mapped layer bytes re-read.
    M2,
    /// Linux/Android, memory insufficient: overflow re-read (sequential reads).
    M3,
    /// Memory sufficient (or forced there by calibration / a slow disk).
    M4,
}

impl std::fmt::Display for MemorySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            MemorySet::M1 => "M1",
            MemorySet::M2 => "M2",
            MemorySet::M3 => "M3",
            MemorySet::M4 => "M4",
        };
        f.write_str(s)
    }
}

/// Derived per-device constants (everything in bytes and milliseconds).
#[derive(Debug, Clone)]
pub(crate) struct Dev {
    pub name: String,
    pub os: Os,
    pub is_head: bool,
    /// macOS + Metal: the Metal working set is the budget (case M2).
    pub metal_shared: bool,
    pub has_gpu: bool,
    /// Unified-memory GPU that is not the Metal zero-copy case: GPU buffers
    /// also count against RAM (ring model only).
    pub uma_gpu: bool,
    pub alpha: f64,
    pub beta: f64,
    /// s^disk in GB/s.
    pub disk_gbps: f64,
    pub ram_avail: f64,
    pub swap: f64,
    pub vram_free: f64,
    pub c_cpu: f64,
    pub c_gpu: f64,
    /// h_m: b_i/V + b_o on the head, 0 elsewhere.
    pub h: f64,
}

impl Dev {
    /// τ_m(bytes) in ms.
    pub fn tau(&self, bytes: f64) -> f64 {
        bytes / (self.disk_gbps * 1e6)
    }

    /// RAM budget of the ring model and of the shipped M3/M4 rows: d_m, plus
    /// swap on Android (spec §4.3).
    pub fn ram_budget(&self) -> f64 {
        if self.os == Os::Android {
            self.ram_avail + self.swap
        } else {
            self.ram_avail
        }
    }

    /// D_m of spec §4.3 (used by the §4.4 conditions).
    pub fn shipped_budget(&self) -> f64 {
        if self.metal_shared {
            self.vram_free + 1e-4
        } else {
            self.ram_budget()
        }
    }
}

/// Everything the models need, derived once from the profiles.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub layers: u32,
    /// b
    pub b: f64,
    /// b'
    pub bp: f64,
    /// KV bytes of one layer at n_ctx.
    pub kv_layer: f64,
    /// b_i / V
    pub emb_row: f64,
    /// b_o
    pub b_o: f64,
    pub devs: Vec<Dev>,
    /// Σ_q F_q / s^cpu_{0,q}: the shipped κ's T_head (per-layer FLOPs).
    pub t_head_layer_ms: f64,
    /// Output-layer FLOPs on the head's CPU: the ring model's constant.
    pub t_out_ms: f64,
    /// hop_ms[i][j]: one decode hop from device i to device j.
    pub hop_ms: Vec<Vec<f64>>,
    pub comm_override: Option<f64>,
    pub keep_out_metal: bool,
    pub prefetch: bool,
    /// Enforce the anonymous-memory limit (ring model); the shipped model
    /// lets everything overflow to disk.
    pub anon_limit: bool,
}

fn time_for(flops: &ByWeightType, gflops: &ByWeightType) -> f64 {
    flops
        .iter()
        .filter(|(_, f)| **f > 0.0)
        .map(|(q, f)| f / (gflops.get(q).copied().unwrap_or(f64::INFINITY) * 1e6))
        .sum()
}

impl Ctx {
    /// Validates the inputs and derives the per-device coefficients (§4.2).
    pub fn new(
        model: &ModelProfile,
        devices: &[DeviceProfile],
        n_ctx: u32,
        opts: &Options,
    ) -> Result<Ctx> {
        validate_model(model)?;
        if devices.is_empty() {
            return Err(HaldaError::NoDevices);
        }
        for (i, d) in devices.iter().enumerate() {
            validate_device(d, model)?;
            if let Some(j) = devices[..i].iter().position(|e| e.name == d.name) {
                return Err(HaldaError::DuplicateDevice {
                    name: d.name.clone(),
                    first: j,
                    second: i,
                });
            }
        }
        opts.validate()?;
        let kv_layer = model.kv_bytes_per_token as f64 * n_ctx as f64;
        let b = model.layer_bytes as f64;
        let bp = b + kv_layer;
        let emb_row = model.input_bytes as f64 / model.vocab_size as f64;
        let b_o = model.output_bytes as f64;
        let devs = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let is_head = i == 0;
                let cpu_t = time_for(&model.layer_flops, &d.cpu.flops);
                let alpha = cpu_t + d.cpu.kv_copy_ms;
                let gpu = d.gpu();
                let beta = gpu
                    .map(|g| {
                        time_for(&model.layer_flops, &g.flops) - cpu_t + g.kv_copy_ms
                            - d.cpu.kv_copy_ms
                    })
                    .unwrap_or(0.0);
                let (c_cpu, c_gpu) = match &d.compute_buffer_override {
                    Some(o) => (
                        o.cpu_bytes as f64,
                        if gpu.is_some() {
                            o.gpu_bytes as f64
                        } else {
                            0.0
                        },
                    ),
                    None => (
                        (model.compute_buffer.cpu_bytes
                            + if is_head {
                                model.compute_buffer.head_extra_cpu_bytes
                            } else {
                                0
                            }) as f64,
                        gpu.map(|g| (model.compute_buffer.gpu_bytes + g.reserved_bytes) as f64)
                            .unwrap_or(0.0),
                    ),
                };
                let metal_shared = d.is_metal_shared();
                Dev {
                    name: d.name.clone(),
                    os: d.os,
                    is_head,
                    metal_shared,
                    has_gpu: gpu.is_some(),
                    uma_gpu: d.unified_memory && gpu.is_some() && !metal_shared,
                    alpha,
                    beta,
                    disk_gbps: d.disk_speed_gbps(),
                    ram_avail: d.memory.available_bytes as f64,
                    swap: d.memory.swap_available_bytes as f64,
                    vram_free: gpu.map(|g| g.vram_free_bytes as f64).unwrap_or(0.0),
                    c_cpu,
                    c_gpu,
                    h: if is_head { emb_row + b_o } else { 0.0 },
                }
            })
            .collect::<Vec<_>>();
        let head = &devices[0];
        let t_head_layer_ms = time_for(&model.layer_flops, &head.cpu.flops);
        let t_out_ms = time_for(&model.output_flops, &head.cpu.flops);
        let act_bytes = 4.0 * model.hidden_size as f64;
        let hop_ms = crate::ring::hop_matrix(devices, act_bytes, opts.default_hop_ms);
        Ok(Ctx {
            layers: model.n_layers,
            b,
            bp,
            kv_layer,
            emb_row,
            b_o,
            devs,
            t_head_layer_ms,
            t_out_ms,
            hop_ms,
            comm_override: opts.comm_ms_per_round,
            keep_out_metal: opts.keep_output_in_metal,
            prefetch: opts.prefetch,
            anon_limit: true,
        })
    }

    /// Bytes of VRAM available to GPU layers: g − c^gpu − [Metal head ∧
    /// keep-out] b_o, floored at 0 (the §4.6 VRAM row's right-hand side).
    pub fn vram_cap(&self, m: usize) -> f64 {
        let d = &self.devs[m];
        if !d.has_gpu {
            return 0.0;
        }
        let out = if d.is_head && d.metal_shared && self.keep_out_metal {
            self.b_o
        } else {
            0.0
        };
        (d.vram_free - d.c_gpu - out).max(0.0)
    }

    /// Largest n_m the VRAM row allows for this k.
    pub fn max_gpu_layers(&self, m: usize, k: u32) -> u32 {
        let cap = self.vram_cap(m);
        let per = k as f64 * self.bp;
        let n = (cap / per + 1e-9).floor();
        if n.is_finite() && n > 0.0 {
            n.min(u32::MAX as f64) as u32
        } else {
            0
        }
    }

    /// The ring model's per-token constant: the head's output layer on its
    /// CPU plus reading the sampled token's embedding row, τ_0(b_i/V), which
    /// cannot be prefetched (the token is not known before it is sampled).
    pub fn ring_constant_ms(&self) -> f64 {
        self.t_out_ms + self.devs[0].tau(self.emb_row)
    }

    /// Communication time of one round along `order` (active devices).
    pub fn comm_ms(&self, order: &[usize]) -> f64 {
        if order.len() < 2 {
            return 0.0;
        }
        if let Some(c) = self.comm_override {
            return c;
        }
        (0..order.len())
            .map(|i| self.hop_ms[order[i]][order[(i + 1) % order.len()]])
            .sum()
    }
}

// ---------------------------------------------------------------------------
// Shipped model
// ---------------------------------------------------------------------------

/// §4.4 classification. `literal` applies rule 1 (forced or slow disk → M4)
/// and leaves Windows in M4, as the shipped algorithm does; the honest
/// evaluation passes `literal = false`.
pub(crate) fn classify(
    ctx: &Ctx,
    m: usize,
    k: u32,
    w: u32,
    n: u32,
    forced: bool,
    literal: bool,
) -> MemorySet {
    let d = &ctx.devs[m];
    if literal && (forced || d.disk_gbps < 0.1) {
        return MemorySet::M4;
    }
    let l = (k * w) as f64;
    let lg = (k * n) as f64;
    let bcio = d.h + d.c_cpu;
    let budget = d.shipped_budget();
    let cond1 = l * ctx.bp + bcio > budget;
    let cond2 = l * ctx.bp + bcio + d.c_gpu > budget;
    let cond3 = (l - lg) * ctx.bp + bcio > budget;
    match d.os {
        Os::Macos if !d.metal_shared && cond1 => MemorySet::M1,
        Os::Macos if d.metal_shared && cond2 => MemorySet::M2,
        Os::Linux | Os::Android if cond3 => MemorySet::M3,
        Os::Windows if !literal && cond3 => MemorySet::M3,
        _ => MemorySet::M4,
    }
}

/// Per-window-layer and per-GPU-layer coefficients (a_m, b_m) of §4.5 and the
/// device's share of κ, for a given set. Returns (a, b, kappa_m) where
/// kappa_m includes the head's T_head, τ(b_i/V) and [not M4]·τ(b_o).
pub(crate) fn shipped_coeffs(ctx: &Ctx, m: usize, set: MemorySet) -> (f64, f64, f64) {
    let d = &ctx.devs[m];
    let tb = d.tau(ctx.b);
    let tbp = d.tau(ctx.bp);
    let beta = if d.has_gpu { d.beta } else { 0.0 };
    let (a, bc) = match set {
        MemorySet::M1 => (d.alpha + tbp, 0.0),
        MemorySet::M2 => (d.alpha + tb, beta),
        MemorySet::M3 => (d.alpha + tbp, if d.has_gpu { beta - tbp } else { 0.0 }),
        MemorySet::M4 => (d.alpha, beta),
    };
    let mut kappa = 0.0;
    if matches!(set, MemorySet::M1 | MemorySet::M3) {
        kappa += d.tau(d.c_cpu - d.ram_budget());
    }
    if d.is_head {
        kappa += ctx.t_head_layer_ms + d.tau(ctx.emb_row);
        if set != MemorySet::M4 {
            kappa += d.tau(ctx.b_o);
        }
    }
    (a, bc, kappa)
}

/// Itemised predicted TPOT of a plan under one cost model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TpotBreakdown {
    /// Predicted time per output token, ms.
    pub total_ms: f64,
    /// Σ_m k·(α_m w_m + β_m n_m): layer compute, ms per token.
    pub compute_ms: f64,
    /// Disk reading per token summed over devices, ms (before overlap).
    pub disk_ms: f64,
    /// Disk time hidden behind other devices' work (ring model only), ms.
    pub overlap_credit_ms: f64,
    /// k·C: network hops per token, ms (ring model only).
    pub comm_ms: f64,
    /// Plan-independent head terms, ms: the shipped κ's T_head, or the ring
    /// model's output-layer compute.
    pub constant_ms: f64,
    /// Per device (same indices as the input), terms per token.
    pub devices: Vec<DeviceTerms>,
}

/// One device's part of a [`TpotBreakdown`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceTerms {
    /// k·(α w + β n), ms per token.
    pub compute_ms: f64,
    /// Disk time charged to the device, ms per token (shipped: including the
    /// negative κ part of the overflow formula).
    pub disk_ms: f64,
    /// Disk time left on the critical path after overlap, ms per token.
    pub exposed_disk_ms: f64,
    /// (compute + exposed disk) / total: the device's share of the TPOT.
    pub share: f64,
}

/// A plan to evaluate: k, per-device window and GPU layers, ring order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Number of rounds k; must satisfy k·Σw = L.
    pub k: u32,
    /// w_m per device (0 = device not used). The head (index 0) needs w ≥ 1.
    pub windows: Vec<u32>,
    /// n_m per device, 0 ≤ n_m ≤ w_m.
    pub gpu_layers: Vec<u32>,
    /// Ring order of the active devices, head last. `None`: index order
    /// 1, 2, …, M−1, 0 as prima ranks them (§1.2).
    #[serde(default)]
    pub ring: Option<Vec<usize>>,
}

/// A plan scored under both models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Shipped model (§4.5) with honest classification.
    pub shipped: TpotBreakdown,
    /// Shipped set of each device (None for unused devices).
    pub sets: Vec<Option<MemorySet>>,
    /// Ring model.
    pub ring: TpotBreakdown,
    /// Per-device memory use under the ring model.
    pub memory: Vec<DeviceMemory>,
}

/// Memory use of a device under a plan (ring model's accounting).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// Bytes the device would keep resident if it could (mapped CPU layers,
    /// KV, compute buffers, head extras).
    pub ram_demand_bytes: f64,
    /// RAM budget (d_m, + swap on Android; the Metal working set on macOS
    /// with Metal), bytes.
    pub ram_budget_bytes: f64,
    /// Anonymous (non-reclaimable) part of the demand, bytes: must fit.
    pub ram_anonymous_bytes: f64,
    /// Bytes re-read from disk every token (overflow, or all mapped bytes in
    /// the Metal case; at least the embedding row on the head).
    pub disk_bytes_per_token: f64,
    /// VRAM used: k·n·b' + c^gpu, bytes (0 when the device runs no GPU layer).
    pub vram_used_bytes: f64,
    /// VRAM budget g_m, bytes.
    pub vram_budget_bytes: f64,
    /// Whether two windows fit (prefetch of the next one possible).
    pub pair_fits: bool,
}

fn check_shape(ctx: &Ctx, a: &Assignment) -> Result<Vec<usize>> {
    let m = ctx.devs.len();
    if a.windows.len() != m || a.gpu_layers.len() != m {
        return Err(HaldaError::InvalidPlan(format!(
            "{} windows and {} GPU-layer counts for {} devices",
            a.windows.len(),
            a.gpu_layers.len(),
            m
        )));
    }
    if a.k == 0 {
        return Err(HaldaError::InvalidPlan("k = 0".into()));
    }
    let sum: u64 = a.windows.iter().map(|&w| w as u64).sum();
    if sum * a.k as u64 != ctx.layers as u64 {
        return Err(HaldaError::InvalidPlan(format!(
            "k·Σw = {}·{} = {} but the model has L = {} layers",
            a.k,
            sum,
            sum * a.k as u64,
            ctx.layers
        )));
    }
    if a.windows[0] == 0 {
        return Err(HaldaError::InvalidPlan(
            "the head (device 0) has no layers".into(),
        ));
    }
    for i in 0..m {
        if a.gpu_layers[i] > a.windows[i] {
            return Err(HaldaError::InvalidPlan(format!(
                "device {:?}: n = {} GPU layers exceed its window w = {}",
                ctx.devs[i].name, a.gpu_layers[i], a.windows[i]
            )));
        }
        if !ctx.devs[i].has_gpu && a.gpu_layers[i] > 0 {
            return Err(HaldaError::InvalidPlan(format!(
                "device {:?} has no GPU but n = {}",
                ctx.devs[i].name, a.gpu_layers[i]
            )));
        }
        let maxn = ctx.max_gpu_layers(i, a.k);
        if a.gpu_layers[i] > maxn {
            return Err(HaldaError::InvalidPlan(format!(
                "device {:?}: k·n·b' = {:.0} bytes of GPU layers exceed the VRAM left for layers, {:.0} bytes (g = {:.0}, c_gpu = {:.0})",
                ctx.devs[i].name,
                a.k as f64 * a.gpu_layers[i] as f64 * ctx.bp,
                ctx.vram_cap(i),
                ctx.devs[i].vram_free,
                ctx.devs[i].c_gpu
            )));
        }
    }
    let active: Vec<usize> = (0..m).filter(|&i| a.windows[i] > 0).collect();
    let order = match &a.ring {
        None => crate::ring::default_order(&active),
        Some(r) => {
            let mut sorted = r.clone();
            sorted.sort_unstable();
            if sorted != active || r.last() != Some(&0) {
                return Err(HaldaError::InvalidPlan(format!(
                    "ring {r:?} must list each active device {active:?} once with the head (0) last"
                )));
            }
            r.clone()
        }
    };
    Ok(order)
}

/// Shipped cost of one device: (compute, disk, constant) per token.
pub(crate) fn shipped_device(
    ctx: &Ctx,
    m: usize,
    k: u32,
    w: u32,
    n: u32,
) -> (MemorySet, f64, f64, f64) {
    let set = classify(ctx, m, k, w, n, false, false);
    let (a, bc, kappa) = shipped_coeffs(ctx, m, set);
    let d = &ctx.devs[m];
    let beta = if d.has_gpu && set != MemorySet::M1 {
        d.beta
    } else {
        0.0
    };
    let kf = k as f64;
    let compute = kf * (d.alpha * w as f64 + beta * n as f64);
    let total = kf * (a * w as f64 + bc * n as f64) + kappa;
    let constant = if d.is_head { ctx.t_head_layer_ms } else { 0.0 };
    (set, compute, total - compute - constant, constant)
}

/// Shipped-model TPOT (spec §4.5) of a valid plan, ms, with breakdown.
pub(crate) fn shipped_eval(
    ctx: &Ctx,
    k: u32,
    w: &[u32],
    n: &[u32],
) -> (TpotBreakdown, Vec<Option<MemorySet>>) {
    let mut bd = TpotBreakdown::default();
    let mut sets = Vec::with_capacity(w.len());
    for m in 0..w.len() {
        if w[m] == 0 {
            sets.push(None);
            bd.devices.push(DeviceTerms::default());
            continue;
        }
        let (set, c, dk, k0) = shipped_device(ctx, m, k, w[m], n[m]);
        sets.push(Some(set));
        bd.compute_ms += c;
        bd.disk_ms += dk;
        bd.constant_ms += k0;
        bd.devices.push(DeviceTerms {
            compute_ms: c,
            disk_ms: dk,
            exposed_disk_ms: dk,
            share: 0.0,
        });
    }
    bd.total_ms = bd.compute_ms + bd.disk_ms + bd.constant_ms;
    for t in &mut bd.devices {
        t.share = if bd.total_ms > 0.0 {
            (t.compute_ms + t.exposed_disk_ms) / bd.total_ms
        } else {
            0.0
        };
    }
    (bd, sets)
}

// ---------------------------------------------------------------------------
// Ring model
// ---------------------------------------------------------------------------

/// One device's round in the ring model.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DevRound {
    /// Compute per round, ms.
    pub t: f64,
    /// Disk load per round, ms (τ(O)/k).
    pub load: f64,
    /// Prefetch of the next window can overlap others' work.
    pub overlap: bool,
    pub mem: MemFigures,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemFigures {
    pub demand: f64,
    pub budget: f64,
    pub anon: f64,
    pub disk_bytes: f64,
    pub vram_used: f64,
    pub vram_budget: f64,
    pub pair_fits: bool,
}

/// Ring-model round of device m, computed even when it breaks the anonymous
/// memory limit (second value false then).
fn ring_device_raw(ctx: &Ctx, m: usize, k: u32, w: u32, n: u32) -> (DevRound, bool) {
    let d = &ctx.devs[m];
    if w == 0 {
        let mem = MemFigures {
            budget: if d.metal_shared {
                d.vram_free
            } else {
                d.ram_budget()
            },
            vram_budget: d.vram_free,
            ..Default::default()
        };
        return (
            DevRound {
                mem,
                ..Default::default()
            },
            true,
        );
    }
    let (kf, wf, nf) = (k as f64, w as f64, n as f64);
    let t = d.alpha * wf + if d.has_gpu { d.beta * nf } else { 0.0 };
    // A device that runs no GPU layer allocates no GPU buffers.
    let vram_used = if d.has_gpu && n > 0 {
        kf * nf * ctx.bp + d.c_gpu
    } else {
        0.0
    };
    let mut mem = MemFigures {
        vram_used,
        vram_budget: d.vram_free,
        ..Default::default()
    };
    if d.metal_shared {
        mem.budget = d.vram_free;
        mem.demand = kf * wf * ctx.bp + d.h + d.c_cpu + d.c_gpu;
        mem.anon = kf * wf * ctx.kv_layer + d.c_cpu + d.c_gpu;
        let over = mem.demand > mem.budget;
        mem.disk_bytes = if over { kf * wf * ctx.b + d.h } else { 0.0 };
        mem.pair_fits = 2.0 * wf * ctx.bp + d.h + d.c_cpu + d.c_gpu <= mem.budget;
    } else {
        let gpu_ram = if d.uma_gpu {
            kf * nf * ctx.bp + d.c_gpu
        } else {
            0.0
        };
        mem.budget = d.ram_budget();
        mem.demand = kf * (wf - nf) * ctx.bp + d.h + d.c_cpu + gpu_ram;
        mem.anon = kf * (wf - nf) * ctx.kv_layer + d.c_cpu + gpu_ram;
        mem.disk_bytes = (mem.demand - mem.budget).max(0.0);
        mem.pair_fits = 2.0 * (wf - nf) * ctx.bp + d.h + d.c_cpu + gpu_ram <= mem.budget;
    }
    let ok = !ctx.anon_limit || mem.anon <= mem.budget;
    (
        DevRound {
            t,
            load: d.tau(mem.disk_bytes) / kf,
            overlap: ctx.prefetch && k >= 2 && mem.pair_fits,
            mem,
        },
        ok,
    )
}

/// Ring-model round of device m, or why the plan is impossible for it.
pub(crate) fn ring_device(
    ctx: &Ctx,
    m: usize,
    k: u32,
    w: u32,
    n: u32,
) -> std::result::Result<DevRound, String> {
    let (r, ok) = ring_device_raw(ctx, m, k, w, n);
    if ok {
        Ok(r)
    } else {
        Err(format!(
            "device {:?}: anonymous memory (KV cache of its CPU layers and compute buffers) of {:.0} bytes exceeds its budget of {:.0} bytes",
            ctx.devs[m].name, r.mem.anon, r.mem.budget
        ))
    }
}

/// Memory figures of device m under a plan, whether or not it is feasible.
pub(crate) fn ring_device_memory(ctx: &Ctx, m: usize, k: u32, w: u32, n: u32) -> DeviceMemory {
    mem_report(&ring_device_raw(ctx, m, k, w, n).0.mem)
}

fn mem_report(m: &MemFigures) -> DeviceMemory {
    DeviceMemory {
        ram_demand_bytes: m.demand,
        ram_budget_bytes: m.budget,
        ram_anonymous_bytes: m.anon,
        disk_bytes_per_token: m.disk_bytes,
        vram_used_bytes: m.vram_used,
        vram_budget_bytes: m.vram_budget,
        pair_fits: m.pair_fits,
    }
}

/// Ring-model TPOT only (no allocation): used by exhaustive searches.
pub(crate) fn ring_total(ctx: &Ctx, k: u32, w: &[u32], n: &[u32], order: &[usize]) -> Option<f64> {
    let mut sum = ctx.comm_ms(order);
    let mut cyc: f64 = 0.0;
    for m in 0..w.len() {
        if w[m] == 0 {
            continue;
        }
        let r = ring_device(ctx, m, k, w[m], n[m]).ok()?;
        if r.overlap {
            sum += r.t;
            cyc = cyc.max(r.t + r.load);
        } else {
            sum += r.t + r.load;
        }
    }
    Some(k as f64 * sum.max(cyc) + ctx.ring_constant_ms())
}

/// Ring-model TPOT with breakdown and memory figures.
pub(crate) fn ring_eval(
    ctx: &Ctx,
    k: u32,
    w: &[u32],
    n: &[u32],
    order: &[usize],
) -> std::result::Result<(TpotBreakdown, Vec<DeviceMemory>), String> {
    let kf = k as f64;
    let comm = ctx.comm_ms(order);
    let mut rounds = Vec::with_capacity(w.len());
    for m in 0..w.len() {
        rounds.push(ring_device(ctx, m, k, w[m], n[m])?);
    }
    let mut sum = comm;
    let mut cyc = 0.0;
    let mut binding = None;
    for (m, r) in rounds.iter().enumerate() {
        if w[m] == 0 {
            continue;
        }
        if r.overlap {
            sum += r.t;
            if r.t + r.load > cyc {
                cyc = r.t + r.load;
                binding = Some(m);
            }
        } else {
            sum += r.t + r.load;
        }
    }
    let round = sum.max(cyc);
    let mut bd = TpotBreakdown {
        total_ms: kf * round + ctx.ring_constant_ms(),
        comm_ms: kf * comm,
        constant_ms: ctx.ring_constant_ms(),
        ..Default::default()
    };
    let mut mems = Vec::with_capacity(w.len());
    for (m, r) in rounds.iter().enumerate() {
        let mut exposed = if r.overlap { 0.0 } else { kf * r.load };
        if cyc > sum && binding == Some(m) {
            exposed = kf * (cyc - sum);
        }
        let terms = DeviceTerms {
            compute_ms: kf * r.t,
            disk_ms: kf * r.load,
            exposed_disk_ms: exposed,
            share: 0.0,
        };
        bd.compute_ms += terms.compute_ms;
        bd.disk_ms += terms.disk_ms;
        bd.overlap_credit_ms += terms.disk_ms - exposed;
        bd.devices.push(terms);
        mems.push(mem_report(&r.mem));
    }
    for t in &mut bd.devices {
        t.share = (t.compute_ms + t.exposed_disk_ms) / bd.total_ms;
    }
    Ok((bd, mems))
}

/// Evaluates a plan under both models. The ring model needs the plan to keep
/// anonymous memory within budget; both need VRAM within budget.
pub(crate) fn evaluate_ctx(ctx: &Ctx, a: &Assignment) -> Result<(Evaluation, Vec<usize>)> {
    let order = check_shape(ctx, a)?;
    let (shipped, sets) = shipped_eval(ctx, a.k, &a.windows, &a.gpu_layers);
    let (ring, memory) =
        ring_eval(ctx, a.k, &a.windows, &a.gpu_layers, &order).map_err(HaldaError::InvalidPlan)?;
    Ok((
        Evaluation {
            shipped,
            sets,
            ring,
            memory,
        },
        order,
    ))
}

/// Scores any plan under both cost models (spec §4.5 and the ring model).
///
/// `options` supplies the ring model's switches (prefetch credit, default hop
/// time, comm override, keep-output-on-GPU); its mode is ignored.
pub fn evaluate(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    n_ctx: u32,
    options: &Options,
    plan: &Assignment,
) -> Result<Evaluation> {
    let ctx = Ctx::new(model, devices, n_ctx, options)?;
    Ok(evaluate_ctx(&ctx, plan)?.0)
}

/// Predicted TPOT of `plan` under the shipped cost model (spec §4.5), ms.
pub fn shipped_tpot(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    n_ctx: u32,
    options: &Options,
    plan: &Assignment,
) -> Result<TpotBreakdown> {
    Ok(evaluate(model, devices, n_ctx, options, plan)?.shipped)
}

/// Predicted TPOT of `plan` under the ring model (overlap credit and
/// communication), ms.
pub fn ring_tpot(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    n_ctx: u32,
    options: &Options,
    plan: &Assignment,
) -> Result<TpotBreakdown> {
    Ok(evaluate(model, devices, n_ctx, options, plan)?.ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[test]
    fn single_linux_device_hand_computed() {
        // One device, 4 layers of 1 GB, 10 GB RAM, no GPU: k = 1 (W = 4 ≥ 2).
        // α = 1e9 FLOPs / 100 GFLOPS = 10 ms (+0 t_kv). TPOT = 4·10 = 40 ms
        // plus the embedding row 1000 B / 1 GB/s = 0.001 ms.
        let model = tiny_model(4, 1_000_000_000, 1e9);
        let dev = cpu_device("a", Os::Linux, 100.0, 10_000_000_000, 1.0);
        let opts = Options::default();
        let plan = Assignment {
            k: 1,
            windows: vec![4],
            gpu_layers: vec![0],
            ring: None,
        };
        let e = evaluate(&model, &[dev], 0, &opts, &plan).unwrap();
        assert!(
            (e.shipped.total_ms - (40.0 + 0.001 + 10.0)).abs() < 1e-9,
            "{:?}",
            e.shipped
        );
        assert_eq!(e.sets, vec![Some(MemorySet::M4)]);
        assert!(
            (e.ring.total_ms - (40.0 + 0.001)).abs() < 1e-9,
            "{:?}",
            e.ring
        );
    }

    #[test]
    fn overflow_charges_the_disk() {
        // 4 layers of 1 GB on a device with 2.5 GB: overflow 1.5 GB at 1 GB/s
        // = 1500 ms per token in both models (k = 1, no overlap).
        let model = tiny_model(4, 1_000_000_000, 1e9);
        let dev = cpu_device("a", Os::Linux, 100.0, 2_500_000_000, 1.0);
        let plan = Assignment {
            k: 1,
            windows: vec![4],
            gpu_layers: vec![0],
            ring: None,
        };
        let e = evaluate(&model, &[dev], 0, &Options::default(), &plan).unwrap();
        assert_eq!(e.sets, vec![Some(MemorySet::M3)]);
        let want = 40.0 + 1500.0;
        assert!(
            (e.shipped.total_ms - (want + 10.0)).abs() < 0.01,
            "{:?}",
            e.shipped
        );
        assert!((e.ring.total_ms - want).abs() < 0.01, "{:?}", e.ring);
        // Overflow includes the head's resident extras h = b_i/V + b_o.
        assert!((e.memory[0].disk_bytes_per_token - (1.5e9 + 2000.0)).abs() < 1.0);
    }

    #[test]
    fn metal_over_budget_rereads_everything() {
        let model = tiny_model(4, 1_000_000_000, 1e9);
        let mut dev = metal_device("mac", 100.0, 1000.0, 3_000_000_000, 1.0);
        dev.disk.rnd_read_gbps = 1.0;
        // 4 layers > 3 GB working set: all 4 GB re-read (+ head's b_o = 1000 B).
        let plan = Assignment {
            k: 1,
            windows: vec![4],
            gpu_layers: vec![2],
            ring: None,
        };
        let e = evaluate(&model, &[dev], 0, &Options::default(), &plan).unwrap();
        assert_eq!(e.sets, vec![Some(MemorySet::M2)]);
        let disk = 4000.0 + 0.001 + 0.001;
        let compute = 2.0 * 10.0 + 2.0 * 1.0;
        // Ring constant: the embedding row read, 0.001 ms.
        assert!(
            (e.ring.total_ms - (compute + disk + 0.001)).abs() < 1e-6,
            "{:?}",
            e.ring
        );
        assert!(
            (e.shipped.total_ms - (compute + disk + 10.0)).abs() < 1e-6,
            "{:?}",
            e.shipped
        );
    }

    #[test]
    fn invalid_plans_are_errors() {
        let model = tiny_model(4, 1_000_000_000, 1e9);
        let dev = cpu_device("a", Os::Linux, 100.0, 10_000_000_000, 1.0);
        let o = Options::default();
        let bad_sum = Assignment {
            k: 1,
            windows: vec![3],
            gpu_layers: vec![0],
            ring: None,
        };
        let e = evaluate(&model, std::slice::from_ref(&dev), 0, &o, &bad_sum).unwrap_err();
        assert!(e.to_string().contains("L = 4"), "{e}");
        let no_gpu = Assignment {
            k: 1,
            windows: vec![4],
            gpu_layers: vec![1],
            ring: None,
        };
        assert!(evaluate(&model, &[dev], 0, &o, &no_gpu).is_err());
    }
}
