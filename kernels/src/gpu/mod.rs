//! The wgpu compute backend: the layers of a ring window on a GPU through
//! Vulkan, Metal or DX12, with one code path.
//!
//! - [`Gpu`]: an adapter's device and queue, opened once, with the compiled
//!   kernels cached by (op, weight type) and every wgpu error caught and
//!   returned (wgpu's default is to panic).
//! - [`adapters`]: what this machine offers, best first (discrete, then
//!   integrated, then virtual, then software).
//! - [`GpuLayers`](window::GpuLayers): a window's weights uploaded (in chunks
//!   under the binding limit), its KV cache on the device, and the forward pass
//!   over its layers; [`forward_placed`](window::forward_placed) runs a window
//!   with some layers on the CPU and the rest on the GPU.
//!
//! Kernels are WGSL, one file per op under `shaders/`, and read ggml's quant
//! blocks as they lie in the GGUF file: the weight type's `deq` function
//! (`shaders/quant/`) is spliced into the op that needs one.

pub mod window;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

pub use window::{forward_placed, kv_store_ms, matvec_gflops, GpuKv, GpuLayers};

use crate::quant::GgmlType;

/// Errors of the GPU backend. None of them is fatal to the process: the
/// caller falls back to the CPU path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    #[error("could not open the GPU device {adapter:?}: {reason}")]
    Device { adapter: String, reason: String },
    #[error("the GPU reported an error: {0}")]
    Wgpu(String),
    #[error("the GPU backend has no kernel for {ty} weights (tensor {tensor:?})")]
    Unsupported { tensor: String, ty: GgmlType },
    #[error("{what} needs {need} bytes in one GPU buffer; this adapter allows {limit}")]
    TooLarge { what: String, need: u64, limit: u64 },
    #[error("reading back from the GPU failed: {0}")]
    Map(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// What kind of device an adapter drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    Discrete,
    Integrated,
    Virtual,
    /// A CPU rasteriser such as Mesa's llvmpipe (lavapipe): correct, and
    /// slower than the CPU kernels; never counted as a GPU unless forced.
    Software,
    Other,
}

impl AdapterKind {
    /// Preference order: lower is better.
    fn rank(self) -> u8 {
        match self {
            AdapterKind::Discrete => 0,
            AdapterKind::Integrated => 1,
            AdapterKind::Virtual => 2,
            AdapterKind::Other => 3,
            AdapterKind::Software => 4,
        }
    }
}

/// One adapter as reported to users and the scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterReport {
    pub name: String,
    pub kind: AdapterKind,
    /// `vulkan`, `metal` or `dx12`.
    pub backend: String,
    pub driver: String,
    /// Largest single storage binding, bytes.
    pub max_binding: u64,
}

/// How to choose an adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Use the first adapter whose name contains this (case-insensitive).
    pub adapter: Option<String>,
    /// Accept a software adapter (tests; a machine with nothing better).
    pub allow_software: bool,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    wgpu::Instance::new(desc)
}

fn report(a: &wgpu::Adapter) -> AdapterReport {
    let info = a.get_info();
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => AdapterKind::Discrete,
        wgpu::DeviceType::IntegratedGpu => AdapterKind::Integrated,
        wgpu::DeviceType::VirtualGpu => AdapterKind::Virtual,
        wgpu::DeviceType::Cpu => AdapterKind::Software,
        wgpu::DeviceType::Other => AdapterKind::Other,
    };
    AdapterReport {
        name: info.name,
        kind,
        backend: format!("{:?}", info.backend).to_lowercase(),
        driver: [info.driver, info.driver_info]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        max_binding: a.limits().max_storage_buffer_binding_size,
    }
}

fn sorted_adapters() -> Vec<(wgpu::Adapter, AdapterReport)> {
    let inst = instance();
    let mut all: Vec<(wgpu::Adapter, AdapterReport)> =
        pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
            .into_iter()
            .map(|a| {
                let r = report(&a);
                (a, r)
            })
            .collect();
    all.sort_by_key(|(_, r)| r.kind.rank());
    all
}

/// The compute adapters of this machine, best first. Empty where there is
/// no Vulkan/Metal/DX12 driver (never an error).
pub fn adapters() -> Vec<AdapterReport> {
    sorted_adapters().into_iter().map(|(_, r)| r).collect()
}

/// Which of `reports` (best first, as [`adapters`] lists them) [`Gpu::open`]
/// takes under `opts`, or why none: lets a caller that enumerated the
/// adapters elsewhere (in a child process) decide before loading a driver.
pub fn choose(reports: &[AdapterReport], opts: &GpuOptions) -> Result<usize, GpuError> {
    if reports.is_empty() {
        return Err(GpuError::NoAdapter(
            "no Vulkan, Metal or DX12 adapter on this machine (on Linux: is a Vulkan \
             driver such as mesa-vulkan-drivers installed?)"
                .into(),
        ));
    }
    let names = reports
        .iter()
        .map(|r| format!("{} ({:?})", r.name, r.kind))
        .collect::<Vec<_>>()
        .join(", ");
    reports
        .iter()
        .position(|r| {
            let named = match &opts.adapter {
                Some(n) => r.name.to_lowercase().contains(&n.to_lowercase()),
                None => true,
            };
            named && (r.kind != AdapterKind::Software || opts.allow_software)
        })
        .ok_or_else(|| {
            GpuError::NoAdapter(match &opts.adapter {
                Some(n) => format!("none named like {n:?} among: {names}"),
                None => format!(
                    "only software adapters ({names}); they are slower than the CPU \
                     kernels and are used only when allowed"
                ),
            })
        })
}

/// The binding layout of a kernel: its storage buffers in order (read-only
/// or read-write), then one uniform block of parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    ActQuant,
    Matvec,
    GetRows,
    RmsNorm,
    Rope,
    KvStore,
    Attention,
    FfnAct,
    Add,
    Copy,
}

const COMMON: &str = include_str!("shaders/common.wgsl");
const HALF: &str = include_str!("shaders/half.wgsl");
const EXPF: &str = include_str!("shaders/expf.wgsl");
const NOMIN: &str = include_str!("shaders/quant/nomin.wgsl");
const KSCALE: &str = include_str!("shaders/quant/kscale.wgsl");

impl Op {
    /// Storage bindings: `true` where the kernel writes.
    fn storage(self) -> &'static [bool] {
        match self {
            Op::Matvec => &[false, false, false, true],
            Op::GetRows => &[false, false, true],
            Op::ActQuant => &[false, true, true],
            Op::RmsNorm | Op::Rope | Op::FfnAct | Op::Add | Op::Copy => &[true, false],
            Op::KvStore => &[false, false, true, true],
            Op::Attention => &[false, false, false, true],
        }
    }

    fn entry(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Copy => "copy",
            _ => "main",
        }
    }

    fn needs_weights(self) -> bool {
        matches!(self, Op::Matvec | Op::GetRows)
    }

    fn source(self, ty: Option<GgmlType>) -> Result<String, GgmlType> {
        let body = match self {
            Op::ActQuant => include_str!("shaders/act_quant.wgsl"),
            Op::Matvec => include_str!("shaders/matvec.wgsl"),
            Op::GetRows => include_str!("shaders/get_rows.wgsl"),
            Op::RmsNorm => include_str!("shaders/rms_norm.wgsl"),
            Op::Rope => include_str!("shaders/rope.wgsl"),
            Op::KvStore => include_str!("shaders/kv_store.wgsl"),
            Op::Attention => include_str!("shaders/attention.wgsl"),
            Op::FfnAct => include_str!("shaders/ffn_act.wgsl"),
            Op::Add | Op::Copy => include_str!("shaders/add.wgsl"),
        };
        let mut src = String::new();
        if let Some(ty) = ty.filter(|_| self.needs_weights()) {
            src.push_str(COMMON);
            src.push_str(quant_source(ty).ok_or(ty)?);
            if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                src.push_str(NOMIN);
            }
        }
        if matches!(self, Op::Attention | Op::FfnAct) {
            src.push_str(HALF);
            src.push_str(EXPF);
        }
        src.push_str(body);
        Ok(src)
    }
}

/// The WGSL `deq(block_byte, j)` of a weight type, if the GPU backend has one.
fn quant_source(ty: GgmlType) -> Option<&'static str> {
    // K-quants with packed 6-bit scales share their unpacking.
    static Q4K: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static Q5K: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Some(match ty {
        GgmlType::F32 => include_str!("shaders/quant/f32.wgsl"),
        GgmlType::F16 => include_str!("shaders/quant/f16.wgsl"),
        GgmlType::BF16 => include_str!("shaders/quant/bf16.wgsl"),
        GgmlType::Q4_0 => include_str!("shaders/quant/q4_0.wgsl"),
        GgmlType::Q4_1 => include_str!("shaders/quant/q4_1.wgsl"),
        GgmlType::Q5_0 => include_str!("shaders/quant/q5_0.wgsl"),
        GgmlType::Q5_1 => include_str!("shaders/quant/q5_1.wgsl"),
        GgmlType::Q8_0 => include_str!("shaders/quant/q8_0.wgsl"),
        GgmlType::Q2_K => include_str!("shaders/quant/q2_k.wgsl"),
        GgmlType::Q3_K => include_str!("shaders/quant/q3_k.wgsl"),
        GgmlType::Q4_K => {
            Q4K.get_or_init(|| [KSCALE, include_str!("shaders/quant/q4_k.wgsl")].concat())
        }
        GgmlType::Q5_K => {
            Q5K.get_or_init(|| [KSCALE, include_str!("shaders/quant/q5_k.wgsl")].concat())
        }
        GgmlType::Q6_K => include_str!("shaders/quant/q6_k.wgsl"),
        GgmlType::Q8_1 | GgmlType::Q8_K => return None,
    })
}

/// Whether the GPU backend can run matrices of this type.
pub fn supports(ty: GgmlType) -> bool {
    quant_source(ty).is_some()
}

pub(crate) struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// A compiled kernel: the op, specialised for a weight type where it reads one.
type KernelKey = (Op, Option<GgmlType>);

/// One recorded dispatch: kernel, storage buffers, workgroup counts and the
/// offset of its parameters.
struct Dispatch {
    kernel: Arc<Kernel>,
    bufs: Vec<wgpu::Buffer>,
    groups: [u32; 3],
    offset: u32,
}

/// Bytes of one dispatch's parameters (16 words); each sits at a multiple of
/// the adapter's uniform offset alignment in one buffer per batch.
const PARAM_BYTES: u64 = 64;

/// An opened GPU: device, queue and compiled kernels.
pub struct Gpu {
    pub report: AdapterReport,
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    kernels: Mutex<HashMap<KernelKey, Arc<Kernel>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} {:?})", self.report.name, self.report.kind)
    }
}

impl Gpu {
    /// Opens the best adapter `opts` allows.
    pub fn open(opts: &GpuOptions) -> Result<Arc<Self>, GpuError> {
        let all = sorted_adapters();
        let reports: Vec<AdapterReport> = all.iter().map(|(_, r)| r.clone()).collect();
        let i = choose(&reports, opts)?;
        let (adapter, report) = all.into_iter().nth(i).expect("chosen among them");
        Self::from_adapter(adapter, report)
    }

    fn from_adapter(adapter: wgpu::Adapter, report: AdapterReport) -> Result<Arc<Self>, GpuError> {
        let mut limits = wgpu::Limits::default();
        let have = adapter.limits();
        // The largest bindings and buffers the adapter allows: weight chunks
        // are cut to fit them.
        limits.max_storage_buffer_binding_size = have.max_storage_buffer_binding_size;
        limits.max_buffer_size = have.max_buffer_size;
        limits.max_storage_buffers_per_shader_stage = have
            .max_storage_buffers_per_shader_stage
            .max(limits.max_storage_buffers_per_shader_stage);
        let desc = wgpu::DeviceDescriptor {
            label: Some("prima"),
            required_limits: limits,
            ..Default::default()
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(|e| GpuError::Device {
                adapter: report.name.clone(),
                reason: e.to_string(),
            })?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::warn!(error = %e, "GPU error");
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let limits = device.limits();
        tracing::info!(adapter = %report.name, kind = ?report.kind, backend = %report.backend, "GPU opened");
        Ok(Arc::new(Self {
            report,
            device,
            queue,
            limits,
            kernels: Mutex::default(),
            errors,
        }))
    }

    /// Largest storage buffer one kernel may bind, bytes.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Waits for everything submitted so far.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Map(e.to_string()))?;
        self.check()
    }

    /// Fails with the first error wgpu reported since the last check.
    fn check(&self) -> Result<(), GpuError> {
        let mut v = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if v.is_empty() {
            return Ok(());
        }
        let first = v.remove(0);
        v.clear();
        Err(GpuError::Wgpu(first))
    }

    pub(crate) fn kernel(&self, op: Op, ty: Option<GgmlType>) -> Result<Arc<Kernel>, GpuError> {
        let key = (op, ty.filter(|_| op.needs_weights()));
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(&key) {
            return Ok(k.clone());
        }
        let src = op.source(key.1).map_err(|ty| GpuError::Unsupported {
            tensor: String::new(),
            ty,
        })?;
        let label = format!("{op:?}/{:?}", key.1);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let mut entries: Vec<wgpu::BindGroupLayoutEntry> = op
            .storage()
            .iter()
            .enumerate()
            .map(|(i, &write)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: !write },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: entries.len() as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: wgpu::BufferSize::new(PARAM_BYTES),
            },
            count: None,
        });
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&label),
                entries: &entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&label),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(op.entry()),
                compilation_options: Default::default(),
                cache: None,
            });
        self.check()?;
        let k = Arc::new(Kernel { pipeline, layout });
        cache.insert(key, k.clone());
        Ok(k)
    }

    /// A storage buffer of `bytes` (rounded up to whole words).
    pub(crate) fn buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        let size = bytes.max(4).div_ceil(4) * 4;
        if size > self.max_binding() {
            return Err(GpuError::TooLarge {
                what: label.to_string(),
                need: size,
                limit: self.max_binding(),
            });
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer holding `data` (padded to whole words).
    pub(crate) fn upload(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        let buf = self.buffer(label, data.len() as u64)?;
        let whole = data.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(&buf, 0, &data[..whole]);
        }
        if whole < data.len() {
            let mut tail = [0u8; 4];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.queue.write_buffer(&buf, whole as u64, &tail);
        }
        Ok(buf)
    }

    pub(crate) fn write(&self, buf: &wgpu::Buffer, data: &[f32]) {
        if !data.is_empty() {
            self.queue.write_buffer(buf, 0, bytemuck::cast_slice(data));
        }
    }

    /// Copies `n` floats out of `buf` (waiting for the queue).
    pub(crate) fn read(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>, GpuError> {
        let bytes = (n * 4) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Map(e.to_string()))?;
        self.check()?;
        rx.recv()
            .map_err(|e| GpuError::Map(e.to_string()))?
            .map_err(|e| GpuError::Map(e.to_string()))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| GpuError::Map(e.to_string()))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        Ok(out)
    }
}

/// Dispatches recorded for one submission: each with its kernel, buffers,
/// workgroup counts and parameters.
pub(crate) struct Batch<'g> {
    gpu: &'g Gpu,
    params: Vec<u8>,
    stride: usize,
    ops: Vec<Dispatch>,
}

impl<'g> Batch<'g> {
    pub(crate) fn new(gpu: &'g Gpu) -> Self {
        let stride =
            (gpu.limits.min_uniform_buffer_offset_alignment as usize).max(PARAM_BYTES as usize);
        Self {
            gpu,
            params: Vec::new(),
            stride,
            ops: Vec::new(),
        }
    }

    /// Records `op` (specialised for weight type `ty`) over `bufs` with
    /// parameters `words` (u32s, f32s as bits).
    pub(crate) fn push(
        &mut self,
        op: Op,
        ty: Option<GgmlType>,
        bufs: &[&wgpu::Buffer],
        words: &[u32],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        debug_assert_eq!(bufs.len(), op.storage().len(), "{op:?} bindings");
        debug_assert!(words.len() <= 16);
        if groups.contains(&0) {
            return Ok(());
        }
        let kernel = self.gpu.kernel(op, ty)?;
        let offset = self.params.len();
        self.params.resize(offset + self.stride, 0);
        for (i, w) in words.iter().enumerate() {
            self.params[offset + 4 * i..offset + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        self.ops.push(Dispatch {
            kernel,
            bufs: bufs.iter().map(|b| (*b).clone()).collect(),
            groups,
            offset: offset as u32,
        });
        Ok(())
    }

    /// Submits everything recorded, in order.
    pub(crate) fn submit(self) -> Result<(), GpuError> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let g = self.gpu;
        let params = g.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: self.params.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        g.queue.write_buffer(&params, 0, &self.params);
        let groups: Vec<wgpu::BindGroup> = self
            .ops
            .iter()
            .map(
                |Dispatch {
                     kernel: k, bufs, ..
                 }| {
                    let mut entries: Vec<wgpu::BindGroupEntry> = bufs
                        .iter()
                        .enumerate()
                        .map(|(i, b)| wgpu::BindGroupEntry {
                            binding: i as u32,
                            resource: b.as_entire_binding(),
                        })
                        .collect();
                    entries.push(wgpu::BindGroupEntry {
                        binding: bufs.len() as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: 0,
                            size: wgpu::BufferSize::new(PARAM_BYTES),
                        }),
                    });
                    g.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &k.layout,
                        entries: &entries,
                    })
                },
            )
            .collect();
        let mut enc = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            for (d, bg) in self.ops.iter().zip(&groups) {
                pass.set_pipeline(&d.kernel.pipeline);
                pass.set_bind_group(0, bg, &[d.offset]);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
        }
        g.queue.submit([enc.finish()]);
        g.check()
    }
}

/// Workgroup counts covering `n` items in groups of 64, as (x, y) with x
/// under the 65535 limit; kernels rebuild the index as `x + y * grid_x`.
pub(crate) fn grid(n: usize, per_group: usize) -> (u32, u32) {
    let groups = n.div_ceil(per_group).max(1) as u64;
    let x = groups.min(65_535);
    (x as u32, groups.div_ceil(x) as u32)
}
