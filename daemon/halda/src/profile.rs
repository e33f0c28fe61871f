//! Input types: what the profiler measures (prima-spec §3) split, as §8
//! recommends, into a **model** profile (computed once from the GGUF) and a
//! **device** profile per machine (gossiped by each daemon).
//!
//! # JSON format
//!
//! All types are `serde` (de)serialisable with exactly the field names below;
//! unknown fields are rejected so that typos do not pass silently. Units are
//! part of the field documentation and, where it helps, of the field name:
//!
//! * sizes are **bytes** (`u64`), never GiB, so that rounding is explicit;
//! * throughput is **GFLOPS** (1e9 FLOP/s), keyed by the ggml weight-type name
//!   in lower case (`"q4_k"`, `"q6_k"`, `"f16"`, `"f32"`, `"q8_0"`, ...); the keys
//!   of a device's table must cover every key of the model's `layer_flops`;
//! * disk speed is **GB/s** (1e9 bytes/s);
//! * times are **milliseconds**;
//! * link bandwidth is **Mbit/s** (1e6 bit/s).
//!
//! A `primad plan --devices FILE.json` file is a [`ClusterFile`]:
//!
//! ```json
//! {
//!   "model": { "name": "tiny", "n_layers": 32, "vocab_size": 32000, "hidden_size": 4096,
//!              "layer_bytes": 100000000, "input_bytes": 131072000, "output_bytes": 131072000,
//!              "kv_bytes_per_token": 4096,
//!              "layer_flops": { "q4_k": 4.0e8, "f32": 1.0e5 },
//!              "output_flops": { "q6_k": 2.6e8 },
//!              "compute_buffer": { "cpu_bytes": 200000000, "head_extra_cpu_bytes": 300000000,
//!                                  "gpu_bytes": 250000000 } },
//!   "n_ctx": 4096,
//!   "devices": [
//!     { "name": "head", "os": "linux",
//!       "cpu": { "flops": { "q4_k": 100.0, "q6_k": 90.0, "f32": 120.0 }, "kv_copy_ms": 0.02 },
//!       "memory": { "total_bytes": 17179869184, "available_bytes": 8589934592 },
//!       "disk": { "seq_read_gbps": 3.0, "rnd_read_gbps": 0.5 },
//!       "gpus": [ { "name": "RTX 3070", "backend": "cuda", "vram_total_bytes": 8589934592,
//!                   "vram_free_bytes": 8000000000, "flops": { "q4_k": 1600.0, "f32": 2400.0 },
//!                   "kv_copy_ms": 0.01, "reserved_bytes": 734003200 } ],
//!       "links": [ { "peer": "laptop", "rtt_ms": 4.0, "bandwidth_mbit_s": 300.0 } ] }
//!   ]
//! }
//! ```
//!
//! The device at index 0 is the **head** (rank 0 in prima): it holds the input
//! embedding and the output layer and samples the tokens (spec §1.2, §4.4 h_m).
//!
//! The prima paper testbed fixture uses prima's own field names; it is loaded
//! through [`crate::testbed`], which converts it into these types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{HaldaError, Result};

/// Per-layer or per-output-layer FLOPs keyed by ggml weight type (F_q in
/// spec §4.1), or device throughput in GFLOPS keyed the same way.
pub type ByWeightType = BTreeMap<String, f64>;

/// What Halda needs to know about the model (spec §4.1 "Model"), measured once
/// on the coordinator from the GGUF file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    /// Display name (free text).
    #[serde(default)]
    pub name: String,
    /// L: number of transformer layers (blocks). Must be >= 1.
    pub n_layers: u32,
    /// V: vocabulary size. The head keeps one input-embedding row per token
    /// resident, `input_bytes / vocab_size` bytes (spec §4.4 h_m). Must be >= 1.
    pub vocab_size: u32,
    /// n_embd, the hidden width. A decode step sends `4 * hidden_size` bytes of
    /// f32 activations per hop (spec §1.6); used by the communication term.
    /// 0 means "unknown": then only the links' RTT counts.
    #[serde(default)]
    pub hidden_size: u32,
    /// b: average weight bytes of one layer.
    pub layer_bytes: u64,
    /// b_i: bytes of the input embedding (`token_embd`).
    pub input_bytes: u64,
    /// b_o: bytes of the output norm plus the LM head.
    pub output_bytes: u64,
    /// KV-cache bytes per token **per layer**: 2·(e_k + e_v) for an f16 cache
    /// (spec §4.1). Multiplied by n_ctx it gives the per-layer KV size that
    /// makes b' = b + kv_bytes_per_token·n_ctx.
    pub kv_bytes_per_token: u64,
    /// F_q: decode FLOPs of one layer for one token, split by the weight type
    /// that carries them (spec §3 "model statistics").
    pub layer_flops: ByWeightType,
    /// Decode FLOPs of the output layer for one token, by weight type. Used by
    /// the ring model's head constant (the shipped model uses per-layer FLOPs
    /// there, spec §4.5). May be empty.
    #[serde(default)]
    pub output_flops: ByWeightType,
    /// Compute-buffer estimate (spec §3, `llama_model_compute_buf_size`).
    /// Devices may override it with measured values.
    #[serde(default)]
    pub compute_buffer: ComputeBuffer,
}

/// Estimated activation/compute buffers, in bytes (c^cpu, c^gpu of spec §4.1).
/// Treated as constants for a device (the shipped code recomputes them from
/// whether the window has CPU/GPU layers; see the crate docs on ambiguities).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeBuffer {
    /// Host-side compute buffer of a worker, bytes.
    #[serde(default)]
    pub cpu_bytes: u64,
    /// Extra host-side bytes on the head (logits, output subgraph), bytes.
    #[serde(default)]
    pub head_extra_cpu_bytes: u64,
    /// GPU compute buffer, bytes (a GPU's `reserved_bytes` is added to it).
    #[serde(default)]
    pub gpu_bytes: u64,
}

/// Operating system as the profiler reports it (spec §3 "OS"). It selects the
/// memory case of spec §4.4 and the disk speed used (§4.1 s^disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    /// Linux: page cache drops only the overflow; sequential disk speed.
    Linux,
    /// macOS: random-read disk speed; with a Metal GPU, case M2.
    Macos,
    /// Windows: the shipped model has no "insufficient" case for it.
    Windows,
    /// Android/Termux: swap counts towards the budget (spec §2.4, §4.3).
    Android,
}

/// GPU API of an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackend {
    /// NVIDIA CUDA: layers are copied into VRAM and stay resident.
    Cuda,
    /// Apple Metal: on macOS the weights stay in the mapped file (zero copy)
    /// and the budget is the Metal working set (spec §2.1, case M2).
    Metal,
    /// Vulkan / wgpu: modelled like CUDA (spec §8 "GPU model under wgpu").
    Vulkan,
    /// Anything else: modelled like CUDA.
    Other,
}

/// Everything the profiler measures on one device (spec §3, §8 "Profile
/// split").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Unique device name (hostname); links refer to peers by this name.
    pub name: String,
    /// Operating system.
    pub os: Os,
    /// True on unified-memory machines (Apple silicon, integrated GPUs): GPU
    /// buffers come out of system RAM. For a non-Metal UMA GPU the ring model
    /// also charges GPU-resident bytes to the RAM budget (spec §8).
    #[serde(default)]
    pub unified_memory: bool,
    /// CPU measurements.
    pub cpu: CpuProfile,
    /// RAM measurements.
    pub memory: MemoryProfile,
    /// Disk measurements.
    pub disk: DiskProfile,
    /// GPU adapters. Only the **first** one is scheduled (prima uses one GPU
    /// per device); more are listed for information.
    #[serde(default)]
    pub gpus: Vec<GpuProfile>,
    /// Measured compute buffers replacing the model's estimate, if present.
    #[serde(default)]
    pub compute_buffer_override: Option<ComputeBufferOverride>,
    /// Measured network links to other devices, by peer name.
    #[serde(default)]
    pub links: Vec<Link>,
}

/// CPU throughput and KV-copy cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuProfile {
    /// s^cpu_q: GFLOPS of an f32-activation mat-mul per weight type.
    pub flops: ByWeightType,
    /// t^kv_cpu: milliseconds to copy one token's K and V rows of one layer.
    #[serde(default)]
    pub kv_copy_ms: f64,
    /// Number of threads used for the benchmark (informational).
    #[serde(default)]
    pub threads: Option<u32>,
}

/// RAM figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryProfile {
    /// Physical RAM, bytes (informational).
    #[serde(default)]
    pub total_bytes: u64,
    /// d_m: available RAM in bytes, as the profiler computes it (Linux:
    /// MemAvailable·0.8, macOS page arithmetic, cgroup limits; spec §2.4).
    pub available_bytes: u64,
    /// d^swap_m: swappable bytes counted as extra budget on Android only.
    #[serde(default)]
    pub swap_available_bytes: u64,
    /// Measured RAM read bandwidth, GB/s. Recorded but not charged by either
    /// cost model (the shipped code comments the term out, spec §4.2).
    #[serde(default)]
    pub bandwidth_gbps: Option<f64>,
}

/// Disk read speeds (spec §3 "Disk read speed", from fio).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProfile {
    /// Sequential read speed, GB/s (used on Linux). Must be > 0.
    pub seq_read_gbps: f64,
    /// Random (page-sized) read speed, GB/s (used on macOS, Windows and
    /// Android, spec §4.1). Must be > 0.
    pub rnd_read_gbps: f64,
}

/// One GPU adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    /// Adapter name.
    #[serde(default)]
    pub name: String,
    /// API.
    pub backend: GpuBackend,
    /// Total VRAM (or Metal recommended working set), bytes (informational).
    #[serde(default)]
    pub vram_total_bytes: u64,
    /// g_m: free VRAM, bytes; for Metal the free working set
    /// (`recommendedMaxWorkingSetSize − currentAllocatedSize`), which is the
    /// whole device's budget on macOS with Metal (spec §4.3).
    pub vram_free_bytes: u64,
    /// s^gpu_q: GFLOPS per weight type; must cover the model's types.
    pub flops: ByWeightType,
    /// t^kv_gpu: milliseconds to copy one token's K and V rows of one layer.
    #[serde(default)]
    pub kv_copy_ms: f64,
    /// Measured VRAM bandwidth, GB/s (informational, not charged).
    #[serde(default)]
    pub bandwidth_gbps: Option<f64>,
    /// Bytes reserved by the driver/context (prima adds 700 MiB for CUDA,
    /// 300 MiB for Metal); added to the model's GPU compute buffer unless the
    /// device overrides the compute buffers.
    #[serde(default)]
    pub reserved_bytes: u64,
}

/// Measured compute buffers for one device, replacing the model estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeBufferOverride {
    /// c^cpu_m in bytes (including the head's extra, if this is the head).
    pub cpu_bytes: u64,
    /// c^gpu_m in bytes (including driver reserve). Ignored without a GPU.
    #[serde(default)]
    pub gpu_bytes: u64,
}

/// A measured network path from this device to `peer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Name of the peer device.
    pub peer: String,
    /// Round-trip time, milliseconds (a hop costs rtt/2 of latency).
    pub rtt_ms: f64,
    /// Bulk bandwidth towards the peer, Mbit/s. 0 means unknown (only the
    /// latency counts).
    #[serde(default)]
    pub bandwidth_mbit_s: f64,
}

/// The file read by `primad plan --devices FILE.json`: a model, a context
/// length and the devices (head first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The model profile.
    pub model: ModelProfile,
    /// Context length n_ctx in tokens (sizes the KV cache).
    pub n_ctx: u32,
    /// Devices; index 0 is the head.
    pub devices: Vec<DeviceProfile>,
    /// Scheduler options; defaults if absent.
    #[serde(default)]
    pub options: crate::plan::Options,
}

impl ClusterFile {
    /// Parses a cluster file from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }
}

impl DeviceProfile {
    /// The scheduled GPU (the first adapter), if any.
    pub fn gpu(&self) -> Option<&GpuProfile> {
        self.gpus.first()
    }

    /// True when the device runs macOS with a Metal GPU: prima's case M2,
    /// where the Metal working set is the budget for everything.
    pub fn is_metal_shared(&self) -> bool {
        self.os == Os::Macos && self.gpu().is_some_and(|g| g.backend == GpuBackend::Metal)
    }

    /// s^disk_m in GB/s: sequential on Linux, random otherwise (spec §4.1).
    pub fn disk_speed_gbps(&self) -> f64 {
        if self.os == Os::Linux {
            self.disk.seq_read_gbps
        } else {
            self.disk.rnd_read_gbps
        }
    }
}

fn finite_nonneg(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

fn finite_pos(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Checks a model profile for values the cost models cannot use.
pub fn validate_model(m: &ModelProfile) -> Result<()> {
    let bad = |field: &str, value: String, why: &'static str| HaldaError::InvalidModel {
        field: field.to_string(),
        value,
        why,
    };
    if m.n_layers == 0 {
        return Err(bad("n_layers", "0".into(), "must be at least 1"));
    }
    if m.vocab_size == 0 {
        return Err(bad("vocab_size", "0".into(), "must be at least 1"));
    }
    if m.layer_bytes == 0 {
        return Err(bad("layer_bytes", "0".into(), "must be at least 1"));
    }
    if m.layer_flops.is_empty() {
        return Err(bad(
            "layer_flops",
            "{}".into(),
            "must list at least one weight type",
        ));
    }
    for (q, f) in m.layer_flops.iter().chain(m.output_flops.iter()) {
        if !finite_nonneg(*f) {
            return Err(bad(
                &format!("flops[{q}]"),
                f.to_string(),
                "must be finite and >= 0",
            ));
        }
    }
    Ok(())
}

/// Checks one device against the model (throughput coverage, positive speeds).
pub fn validate_device(d: &DeviceProfile, model: &ModelProfile) -> Result<()> {
    let bad = |field: &str, value: f64, why: &'static str| HaldaError::InvalidDevice {
        device: d.name.clone(),
        field: field.to_string(),
        value: value.to_string(),
        why,
    };
    if !finite_pos(d.disk.seq_read_gbps) {
        return Err(bad(
            "disk.seq_read_gbps",
            d.disk.seq_read_gbps,
            "must be finite and > 0",
        ));
    }
    if !finite_pos(d.disk.rnd_read_gbps) {
        return Err(bad(
            "disk.rnd_read_gbps",
            d.disk.rnd_read_gbps,
            "must be finite and > 0",
        ));
    }
    if !finite_nonneg(d.cpu.kv_copy_ms) {
        return Err(bad(
            "cpu.kv_copy_ms",
            d.cpu.kv_copy_ms,
            "must be finite and >= 0",
        ));
    }
    for (q, f) in &model.layer_flops {
        if *f == 0.0 {
            continue;
        }
        match d.cpu.flops.get(q) {
            Some(s) if finite_pos(*s) => {}
            Some(s) => {
                return Err(bad(
                    &format!("cpu.flops[{q}]"),
                    *s,
                    "must be finite and > 0",
                ))
            }
            None => {
                return Err(HaldaError::MissingThroughput {
                    device: d.name.clone(),
                    unit: "CPU",
                    weight_type: q.clone(),
                    flops: *f,
                })
            }
        }
    }
    if let Some(g) = d.gpu() {
        if !finite_nonneg(g.kv_copy_ms) {
            return Err(bad(
                "gpus[0].kv_copy_ms",
                g.kv_copy_ms,
                "must be finite and >= 0",
            ));
        }
        for (q, f) in &model.layer_flops {
            if *f == 0.0 {
                continue;
            }
            match g.flops.get(q) {
                Some(s) if finite_pos(*s) => {}
                Some(s) => {
                    return Err(bad(
                        &format!("gpus[0].flops[{q}]"),
                        *s,
                        "must be finite and > 0",
                    ))
                }
                None => {
                    return Err(HaldaError::MissingThroughput {
                        device: d.name.clone(),
                        unit: "GPU",
                        weight_type: q.clone(),
                        flops: *f,
                    })
                }
            }
        }
    }
    for (q, f) in &model.output_flops {
        if *f > 0.0 && !d.cpu.flops.get(q).is_some_and(|s| finite_pos(*s)) {
            return Err(HaldaError::MissingThroughput {
                device: d.name.clone(),
                unit: "CPU",
                weight_type: q.clone(),
                flops: *f,
            });
        }
    }
    for l in &d.links {
        if !finite_nonneg(l.rtt_ms) {
            return Err(bad(
                &format!("links[{}].rtt_ms", l.peer),
                l.rtt_ms,
                "must be finite and >= 0",
            ));
        }
        if !finite_nonneg(l.bandwidth_mbit_s) {
            return Err(bad(
                &format!("links[{}].bandwidth_mbit_s", l.peer),
                l.bandwidth_mbit_s,
                "must be finite and >= 0",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_example_in_docs_parses() {
        let text = r#"{
          "model": { "name": "tiny", "n_layers": 32, "vocab_size": 32000, "hidden_size": 4096,
                     "layer_bytes": 100000000, "input_bytes": 131072000, "output_bytes": 131072000,
                     "kv_bytes_per_token": 4096,
                     "layer_flops": { "q4_k": 4.0e8, "f32": 1.0e5 },
                     "output_flops": { "q6_k": 2.6e8 },
                     "compute_buffer": { "cpu_bytes": 200000000, "head_extra_cpu_bytes": 300000000,
                                         "gpu_bytes": 250000000 } },
          "n_ctx": 4096,
          "devices": [
            { "name": "head", "os": "linux",
              "cpu": { "flops": { "q4_k": 100.0, "f32": 120.0, "q6_k": 90.0 }, "kv_copy_ms": 0.02 },
              "memory": { "total_bytes": 17179869184, "available_bytes": 8589934592 },
              "disk": { "seq_read_gbps": 3.0, "rnd_read_gbps": 0.5 },
              "gpus": [ { "name": "RTX 3070", "backend": "cuda", "vram_total_bytes": 8589934592,
                          "vram_free_bytes": 8000000000, "flops": { "q4_k": 1600.0, "f32": 2400.0 },
                          "kv_copy_ms": 0.01, "reserved_bytes": 734003200 } ],
              "links": [ { "peer": "laptop", "rtt_ms": 4.0, "bandwidth_mbit_s": 300.0 } ] }
          ]
        }"#;
        let f = ClusterFile::from_json(text).expect("parses");
        assert_eq!(f.devices.len(), 1);
        validate_model(&f.model).unwrap();
        validate_device(&f.devices[0], &f.model).unwrap();
        // Round trip.
        let again = ClusterFile::from_json(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = serde_json::from_str::<DiskProfile>(
            r#"{"seq_read_gbps":1.0,"rnd_read_gbps":1.0,"typo":3}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"));
    }
}
