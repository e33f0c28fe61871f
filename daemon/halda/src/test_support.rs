//! Small builders for hand-computed unit tests.

use std::collections::BTreeMap;

use crate::profile::*;

/// A model with `layers` layers of `layer_bytes` bytes and `flops` q4_k FLOPs
/// each; the embedding row is 1000 bytes, the output layer 1000 bytes, no KV.
pub(crate) fn tiny_model(layers: u32, layer_bytes: u64, flops: f64) -> ModelProfile {
    ModelProfile {
        name: "tiny".into(),
        n_layers: layers,
        vocab_size: 1000,
        hidden_size: 0,
        layer_bytes,
        input_bytes: 1_000_000,
        output_bytes: 1000,
        kv_bytes_per_token: 0,
        layer_flops: BTreeMap::from([("q4_k".to_string(), flops)]),
        output_flops: BTreeMap::new(),
        compute_buffer: ComputeBuffer::default(),
    }
}

fn flops(g: f64) -> ByWeightType {
    BTreeMap::from([("q4_k".to_string(), g)])
}

/// A CPU-only device; both disk speeds equal `disk_gbps`.
pub(crate) fn cpu_device(
    name: &str,
    os: Os,
    gflops: f64,
    ram: u64,
    disk_gbps: f64,
) -> DeviceProfile {
    DeviceProfile {
        name: name.into(),
        os,
        unified_memory: false,
        cpu: CpuProfile {
            flops: flops(gflops),
            kv_copy_ms: 0.0,
            threads: None,
        },
        memory: MemoryProfile {
            total_bytes: ram,
            available_bytes: ram,
            swap_available_bytes: 0,
            bandwidth_gbps: None,
        },
        disk: DiskProfile {
            seq_read_gbps: disk_gbps,
            rnd_read_gbps: disk_gbps,
        },
        gpus: vec![],
        compute_buffer_override: None,
        links: vec![],
    }
}

/// A Linux device with a CUDA GPU.
pub(crate) fn cuda_device(
    name: &str,
    cpu: f64,
    gpu: f64,
    ram: u64,
    vram: u64,
    c_gpu: u64,
    disk: f64,
) -> DeviceProfile {
    let mut d = cpu_device(name, Os::Linux, cpu, ram, disk);
    d.gpus.push(GpuProfile {
        name: "gpu".into(),
        backend: GpuBackend::Cuda,
        vram_total_bytes: vram,
        vram_free_bytes: vram,
        flops: flops(gpu),
        kv_copy_ms: 0.0,
        bandwidth_gbps: None,
        reserved_bytes: c_gpu,
    });
    d
}

/// A macOS device with Metal; the working set `vram` is its whole budget.
pub(crate) fn metal_device(name: &str, cpu: f64, gpu: f64, vram: u64, disk: f64) -> DeviceProfile {
    let mut d = cpu_device(name, Os::Macos, cpu, vram, disk);
    d.unified_memory = true;
    d.gpus.push(GpuProfile {
        name: "metal".into(),
        backend: GpuBackend::Metal,
        vram_total_bytes: vram,
        vram_free_bytes: vram,
        flops: flops(gpu),
        kv_copy_ms: 0.0,
        bandwidth_gbps: None,
        reserved_bytes: 0,
    });
    d
}
