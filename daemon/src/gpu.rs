//! This device's GPU, as the daemon uses it: opened once at start from
//! `[gpu]`, profiled for Halda (throughput per weight type), and given the
//! last `n_m` layers of each ring window. Built without the `gpu` feature, or
//! on a machine without a usable adapter, every call says so and the ring
//! runs on the CPU.

use std::sync::Arc;

use serde_json::{json, Value};

/// The opened GPU, or why there is none.
#[derive(Clone, Default)]
pub struct Handle {
    #[cfg(feature = "gpu")]
    gpu: Option<Arc<prima_kernels::gpu::Gpu>>,
    /// Why no GPU is used (empty when one is).
    pub why_not: String,
    /// `[gpu] memory_mb` in bytes, 0 if unset.
    memory_override: u64,
    /// Every adapter the machine offered when it was opened.
    adapters: Value,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gpu::Handle({})", self.summary())
    }
}

impl Handle {
    /// No GPU, for `why`.
    pub fn none(why: &str) -> Self {
        Self {
            why_not: why.to_string(),
            ..Self::default()
        }
    }

    /// Opens the adapter `[gpu]` asks for; never fails (the reason for no
    /// GPU is kept and logged).
    pub fn open(cfg: &prima_config::Gpu) -> Self {
        if !cfg.enabled {
            return Self::none("[gpu] enabled = false");
        }
        #[cfg(feature = "gpu")]
        {
            let opts = prima_kernels::gpu::GpuOptions {
                adapter: (!cfg.adapter.is_empty()).then(|| cfg.adapter.clone()),
                allow_software: cfg.allow_software,
            };
            let reports = match probe() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "probing the GPU drivers failed: the ring runs on the CPU");
                    return Self::none(&format!("probing the GPU drivers failed: {e}"));
                }
            };
            let adapters = json!(reports);
            // Nothing usable: the drivers are never loaded into the daemon.
            if let Err(e) = prima_kernels::gpu::choose(&reports, &opts) {
                tracing::info!(reason = %e, "no GPU: the ring runs on the CPU");
                return Self {
                    adapters,
                    ..Self::none(&e.to_string())
                };
            }
            match prima_kernels::gpu::Gpu::open(&opts) {
                Ok(g) => Self {
                    gpu: Some(g),
                    why_not: String::new(),
                    memory_override: cfg.memory_mb << 20,
                    adapters,
                },
                Err(e) => {
                    tracing::info!(reason = %e, "no GPU: the ring runs on the CPU");
                    Self {
                        adapters,
                        ..Self::none(&e.to_string())
                    }
                }
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            Self::none("primad was built without the gpu feature")
        }
    }

    pub fn is_some(&self) -> bool {
        #[cfg(feature = "gpu")]
        {
            self.gpu.is_some()
        }
        #[cfg(not(feature = "gpu"))]
        {
            false
        }
    }

    /// "name (kind, backend)" or why none.
    pub fn summary(&self) -> String {
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            let r = &g.report;
            return format!("{} ({:?}, {})", r.name, r.kind, r.backend).to_lowercase();
        }
        format!("none: {}", self.why_not)
    }

    /// For `/api/status` and `primactl profile`: the one in use (or why
    /// none) and every adapter the machine offered.
    pub fn status(&self) -> Value {
        #[cfg(feature = "gpu")]
        let using = self.gpu.as_ref().map(|g| json!(g.report));
        #[cfg(not(feature = "gpu"))]
        let using: Option<Value> = None;
        let adapters = if self.adapters.is_null() {
            json!([])
        } else {
            self.adapters.clone()
        };
        json!({ "using": using, "why_not": self.why_not, "adapters": adapters })
    }

    /// Halda's view of the GPU: throughput per weight type of `model`
    /// (each timed on that type's largest matrix for about `budget`), the
    /// KV copy time, and the memory it may fill (`available`: what the ring
    /// may use of RAM, which integrated and software adapters share).
    pub fn profile(
        &self,
        model: Option<&prima_kernels::Model>,
        budget: std::time::Duration,
        available: u64,
    ) -> Vec<halda::GpuProfile> {
        #[cfg(feature = "gpu")]
        if let (Some(g), Some(m)) = (&self.gpu, model) {
            return match measure(g, m, budget) {
                Ok((flops, kv_copy_ms)) => {
                    use prima_kernels::gpu::AdapterKind;
                    let memory = match (self.memory_override, g.report.kind) {
                        (0, AdapterKind::Discrete | AdapterKind::Other) => DISCRETE_GUESS,
                        (0, _) => available,
                        (m, _) => m,
                    };
                    vec![halda::GpuProfile {
                        name: g.report.name.clone(),
                        backend: match g.report.backend.as_str() {
                            "vulkan" => halda::GpuBackend::Vulkan,
                            "metal" => halda::GpuBackend::Metal,
                            _ => halda::GpuBackend::Other,
                        },
                        vram_total_bytes: memory,
                        vram_free_bytes: memory,
                        flops,
                        kv_copy_ms,
                        bandwidth_gbps: None,
                        reserved_bytes: 0,
                    }]
                }
                Err(e) => {
                    tracing::warn!(error = %e, "measuring the GPU failed; planning without it");
                    vec![]
                }
            };
        }
        let _ = (model, budget, available);
        vec![]
    }
}

/// A discrete GPU's memory when `[gpu] memory_mb` is unset: wgpu cannot
/// read it, and planning for more than is there fails the upload (the
/// window then runs on the CPU), so assume a modest card.
#[cfg(feature = "gpu")]
const DISCRETE_GUESS: u64 = 2 << 30;

/// GFLOPS per weight type present in `m`, and ms per token-layer KV copy.
#[cfg(feature = "gpu")]
fn measure(
    g: &Arc<prima_kernels::gpu::Gpu>,
    m: &prima_kernels::Model,
    budget: std::time::Duration,
) -> Result<(std::collections::BTreeMap<String, f64>, f64), prima_kernels::gpu::GpuError> {
    use prima_kernels::{gpu, tensor::Weight};
    let mut largest: std::collections::BTreeMap<&'static str, &prima_kernels::gguf::TensorInfo> =
        Default::default();
    for t in &m.file.tensors {
        if t.dims.len() == 2 && t.dims[1] > 1 && gpu::supports(t.ty) {
            let e = largest.entry(t.ty.name()).or_insert(t);
            if t.n_elements() > e.n_elements() {
                *e = t;
            }
        }
    }
    let mut flops = std::collections::BTreeMap::new();
    for t in largest.into_values() {
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let Ok(w) = Weight::new(&m.file, t, [cols, rows]) else {
            continue;
        };
        flops.insert(
            crate::modelprof::type_key(t.ty),
            gpu::matvec_gflops(g, &w, budget)?,
        );
    }
    // Attention and norms: f32 work on the GPU.
    let f32v = flops
        .get("f32")
        .copied()
        .unwrap_or_else(|| flops.values().copied().fold(f64::NAN, f64::max));
    if f32v.is_finite() {
        flops.entry("f32".into()).or_insert(f32v);
        flops.entry("f16".into()).or_insert(f32v);
    }
    let kv_copy_ms = gpu::kv_store_ms(g, m.config.kv_dim())?;
    Ok((flops, kv_copy_ms))
}

/// A window's GPU layers and a session's GPU cache, or stand-ins that
/// cannot be made when the feature is off.
#[cfg(feature = "gpu")]
pub use prima_kernels::gpu::{GpuKv as Kv, GpuLayers as Layers};

#[cfg(not(feature = "gpu"))]
pub enum Layers {}
#[cfg(not(feature = "gpu"))]
pub enum Kv {}

/// Uploads `layers` of `model` to the GPU.
pub fn upload(
    h: &Handle,
    model: &prima_kernels::Model,
    layers: std::ops::Range<usize>,
) -> Result<Layers, String> {
    #[cfg(feature = "gpu")]
    {
        let g = h.gpu.as_ref().ok_or_else(|| h.why_not.clone())?;
        Layers::upload(g, model, layers).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (model, layers);
        Err(h.why_not.clone())
    }
}

/// A session cache of `ctx` positions for `l`'s layers.
pub fn new_kv(l: &Layers, ctx: usize) -> Result<Kv, String> {
    #[cfg(feature = "gpu")]
    {
        l.new_kv(ctx).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "gpu"))]
    match *l {}
}

/// Runs `range` of `model`: `gpu`'s layers there, the rest on the CPU.
pub fn forward(
    model: &prima_kernels::Model,
    gpu: Option<(&mut Layers, &mut Kv)>,
    range: std::ops::Range<usize>,
    h: &mut prima_kernels::Hidden,
    kv: &mut prima_kernels::KvCache,
    pos: usize,
) -> Result<(), String> {
    #[cfg(feature = "gpu")]
    {
        prima_kernels::gpu::forward_placed(model, gpu, range, h, kv, pos).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "gpu"))]
    {
        if let Some((l, _)) = gpu {
            match *l {}
        }
        model
            .forward_layers(range, h, kv, pos)
            .map_err(|e| e.to_string())
    }
}

/// The hidden `primad` subcommand that lists the adapters as JSON.
pub const PROBE_COMMAND: &str = "gpu-probe";

/// The machine's GPU adapters, enumerated by a child `primad gpu-probe`.
///
/// Enumerating loads every installed Vulkan, Metal or DX12 driver into the
/// process: Mesa's software driver alone cost the daemon about 12 MB of
/// anonymous memory and 40 MB of mapped libraries, which a device with no
/// usable GPU (the low-memory devices the ring streams weights on) should
/// not pay. In a child the drivers come and go with it, and a driver that
/// crashes or hangs while enumerating takes the child down, not the daemon.
#[cfg(feature = "gpu")]
fn probe() -> Result<Vec<prima_kernels::gpu::AdapterReport>, String> {
    use std::{
        process::{Command, Stdio},
        time::{Duration, Instant},
    };
    let exe = std::env::current_exe().map_err(|e| format!("finding primad: {e}"))?;
    let mut child = Command::new(exe)
        .arg(PROBE_COMMAND)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting `primad {PROBE_COMMAND}`: {e}"))?;
    let t = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the drivers did not answer within 20 s".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let mut out = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = std::io::Read::read_to_end(&mut s, &mut out);
    }
    if !status.success() {
        return Err(format!("`primad {PROBE_COMMAND}` ended with {status}"));
    }
    serde_json::from_slice(&out).map_err(|e| format!("`primad {PROBE_COMMAND}` said: {e}"))
}
