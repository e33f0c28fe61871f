//! Loader for `paper-testbed.json` (shared/design/halda), which describes the
//! prima paper's four-device testbed in prima's own notation (b, b_i, b_o,
//! e_k, e_v, GiB figures, per-device c_cpu/c_gpu).
//!
//! [`PaperTestbed::from_json`] parses that file as is; [`PaperTestbed::into_cluster`]
//! converts it into this crate's types:
//!
//! * GiB figures become bytes (× 2³⁰, rounded to the nearest byte);
//! * `kv_bytes_per_token` = 2·(e_k + e_v) (f16 K and V of one layer);
//! * `metal: true` becomes a Metal GPU adapter with `vram_free_bytes` =
//!   `gpu_free_GiB` and `unified_memory: true`; `cuda: true` a CUDA adapter;
//! * `c_cpu_bytes` / `c_gpu_bytes` become a [`ComputeBufferOverride`];
//! * the device with `is_head: true` is moved to index 0 (it is already first
//!   in the shipped fixture);
//! * `options.master_priority`, `k` and `comm_ms_per_round` map to the
//!   [`Options`] fields of the same meaning.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{HaldaError, Result};
use crate::plan::Options;
use crate::profile::{
    ClusterFile, ComputeBuffer, ComputeBufferOverride, CpuProfile, DeviceProfile, DiskProfile,
    GpuBackend, GpuProfile, MemoryProfile, ModelProfile, Os,
};

const GIB: f64 = 1_073_741_824.0;

/// The fixture file, field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaperTestbed {
    /// Free-text comment.
    #[serde(rename = "_comment", default)]
    pub comment: String,
    /// Model statistics.
    pub model: TestbedModel,
    /// Context length.
    pub n_ctx: u32,
    /// Devices.
    pub devices: Vec<TestbedDevice>,
    /// Scheduler options.
    #[serde(default)]
    pub options: TestbedOptions,
}

/// Model part of the fixture (spec §4.1 notation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestbedModel {
    /// Model name.
    #[serde(default)]
    pub name: String,
    /// L
    #[serde(rename = "L")]
    pub l: u32,
    /// V
    #[serde(rename = "V")]
    pub v: u32,
    /// b, bytes per layer.
    pub b: u64,
    /// b_i, input-embedding bytes.
    pub b_i: u64,
    /// b_o, output bytes.
    pub b_o: u64,
    /// e_k = n_embd_k_gqa.
    pub e_k: u64,
    /// e_v = n_embd_v_gqa.
    pub e_v: u64,
    /// F_q per layer.
    pub flops_per_layer_by_type: BTreeMap<String, f64>,
    /// Output-layer FLOPs by type.
    #[serde(default)]
    pub flops_output_by_type: BTreeMap<String, f64>,
    /// Architecture dimensions (d = n_embd is used for activation size).
    #[serde(rename = "_dims", default)]
    pub dims: Option<BTreeMap<String, f64>>,
}

/// Device part of the fixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct TestbedDevice {
    /// Name.
    pub name: String,
    /// "linux", "macos", "windows" or "android".
    pub os: String,
    /// Has a Metal GPU.
    #[serde(default)]
    pub metal: bool,
    /// Has a CUDA GPU.
    #[serde(default)]
    pub cuda: bool,
    /// CPU GFLOPS by type.
    pub cpu_flops_by_type: BTreeMap<String, f64>,
    /// GPU GFLOPS by type.
    #[serde(default)]
    pub gpu_flops_by_type: BTreeMap<String, f64>,
    /// t^kv on CPU, ms.
    #[serde(default)]
    pub t_kv_cpu_ms: f64,
    /// t^kv on GPU, ms.
    #[serde(default)]
    pub t_kv_gpu_ms: f64,
    /// Sequential read, GB/s.
    pub disk_seq_GBps: f64,
    /// Random read, GB/s.
    pub disk_rnd_GBps: f64,
    /// Available RAM, GiB.
    pub ram_avail_GiB: f64,
    /// Available swap, GiB.
    #[serde(default)]
    pub swap_avail_GiB: f64,
    /// Free GPU memory, GiB.
    #[serde(default)]
    pub gpu_free_GiB: f64,
    /// c^cpu, bytes.
    #[serde(default)]
    pub c_cpu_bytes: u64,
    /// c^gpu, bytes.
    #[serde(default)]
    pub c_gpu_bytes: u64,
    /// Rank 0.
    #[serde(default)]
    pub is_head: bool,
}

/// Options part of the fixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestbedOptions {
    /// prima's `--master-priority`.
    #[serde(default = "default_priority")]
    pub master_priority: f64,
    /// Forced k.
    #[serde(default)]
    pub k: Option<u32>,
    /// Communication per round, ms.
    #[serde(default)]
    pub comm_ms_per_round: Option<f64>,
}

fn default_priority() -> f64 {
    1.01
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            master_priority: 1.01,
            k: None,
            comm_ms_per_round: None,
        }
    }
}

fn gib(x: f64) -> u64 {
    (x * GIB).round().max(0.0) as u64
}

impl PaperTestbed {
    /// Parses the fixture JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    /// Converts into a [`ClusterFile`] (model, n_ctx, devices with the head
    /// first, options).
    pub fn into_cluster(self) -> Result<ClusterFile> {
        let m = &self.model;
        let hidden = m
            .dims
            .as_ref()
            .and_then(|d| d.get("d"))
            .copied()
            .unwrap_or(0.0);
        let model = ModelProfile {
            name: m.name.clone(),
            n_layers: m.l,
            vocab_size: m.v,
            hidden_size: hidden.max(0.0) as u32,
            layer_bytes: m.b,
            input_bytes: m.b_i,
            output_bytes: m.b_o,
            kv_bytes_per_token: 2 * (m.e_k + m.e_v),
            layer_flops: m.flops_per_layer_by_type.clone(),
            output_flops: m.flops_output_by_type.clone(),
            compute_buffer: ComputeBuffer::default(),
        };
        let mut devices = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            let os = match d.os.to_ascii_lowercase().as_str() {
                "linux" => Os::Linux,
                "macos" | "darwin" => Os::Macos,
                "windows" => Os::Windows,
                "android" => Os::Android,
                other => {
                    return Err(HaldaError::InvalidDevice {
                        device: d.name.clone(),
                        field: "os".into(),
                        value: other.into(),
                        why: "must be linux, macos, windows or android",
                    })
                }
            };
            let backend = if d.metal {
                Some(GpuBackend::Metal)
            } else if d.cuda {
                Some(GpuBackend::Cuda)
            } else {
                None
            };
            let gpus = backend
                .map(|backend| GpuProfile {
                    name: String::new(),
                    backend,
                    vram_total_bytes: gib(d.gpu_free_GiB),
                    vram_free_bytes: gib(d.gpu_free_GiB),
                    flops: d.gpu_flops_by_type.clone(),
                    kv_copy_ms: d.t_kv_gpu_ms,
                    bandwidth_gbps: None,
                    reserved_bytes: 0,
                })
                .into_iter()
                .collect();
            devices.push(DeviceProfile {
                name: d.name.clone(),
                os,
                unified_memory: d.metal,
                cpu: CpuProfile {
                    flops: d.cpu_flops_by_type.clone(),
                    kv_copy_ms: d.t_kv_cpu_ms,
                    threads: None,
                },
                memory: MemoryProfile {
                    total_bytes: gib(d.ram_avail_GiB),
                    available_bytes: gib(d.ram_avail_GiB),
                    swap_available_bytes: gib(d.swap_avail_GiB),
                    bandwidth_gbps: None,
                },
                disk: DiskProfile {
                    seq_read_gbps: d.disk_seq_GBps,
                    rnd_read_gbps: d.disk_rnd_GBps,
                },
                gpus,
                compute_buffer_override: Some(ComputeBufferOverride {
                    cpu_bytes: d.c_cpu_bytes,
                    gpu_bytes: d.c_gpu_bytes,
                }),
                links: Vec::new(),
            });
        }
        if let Some(h) = self.devices.iter().position(|d| d.is_head) {
            let head = devices.remove(h);
            devices.insert(0, head);
        }
        let options = Options {
            master_priority: self.options.master_priority,
            k: self.options.k,
            comm_ms_per_round: self.options.comm_ms_per_round,
            ..Options::default()
        };
        Ok(ClusterFile {
            model,
            n_ctx: self.n_ctx,
            devices,
            options,
        })
    }
}
