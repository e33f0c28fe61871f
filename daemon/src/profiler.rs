//! The device profiler: what Halda needs to know about this device,
//! measured here with prima's own kernels (spec §3). Takes a few seconds.
//!
//! - CPU throughput per weight type present in the model: the largest
//!   matrix of each type timed as a mat-vec on the worker pool (GFLOPS).
//! - KV-copy time: one token's K and V rows of one layer into the f16 cache.
//! - Memory: total, and available by the OS rule (Linux: MemAvailable x 0.8)
//!   capped by the daemon's own cgroup limit (v1 or v2) and a config override.
//! - Memory read bandwidth (GB/s), on the worker pool.
//! - Disk: sequential and random 4 KiB reads of a scratch file, with the page
//!   cache evicted first (fadvise), so the disk is measured, not RAM.
//! - GPU (the adapter `[gpu]` opened, if any): throughput per weight type on
//!   the wgpu kernels, KV-copy time, and the memory it may fill; links:
//!   measured by the cluster.

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom, Write},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use prima_kernels::{gguf::Gguf, quant::GgmlType, tensor::Weight};

/// Largest buffer [`read_bandwidth_in`] sums: far larger than any CPU cache.
pub const BANDWIDTH_BUFFER: usize = 256 << 20;

/// Read bandwidth in bytes/s: the pool's threads sum a buffer much larger
/// than the caches, best of a few passes.
pub fn read_bandwidth() -> f64 {
    read_bandwidth_in(BANDWIDTH_BUFFER)
}

/// The buffer a device with `available` bytes of memory can spare for the
/// bandwidth probe: a quarter of it, between 64 MiB and
/// [`BANDWIDTH_BUFFER`]. A phone-class device (or a small memory cgroup)
/// would otherwise be pushed out of its resident weights, or killed.
pub fn bandwidth_buffer_for(available: u64) -> usize {
    ((available / 4) as usize).clamp(64 << 20, BANDWIDTH_BUFFER)
}

/// [`read_bandwidth`] over a buffer of `len` bytes.
pub fn read_bandwidth_in(len: usize) -> f64 {
    let len = len.max(1 << 20);
    let buf: Vec<u64> = (0..len / 8).map(|i| i as u64).collect();
    let pool = prima_kernels::cpu::pool();
    let chunks = pool.threads() * 4;
    let per = buf.len() / chunks;
    let mut best = 0f64;
    for _ in 0..5 {
        let sink = std::sync::atomic::AtomicU64::new(0);
        let t = Instant::now();
        pool.run(chunks, &|c| {
            let s: u64 = buf[c * per..(c + 1) * per]
                .iter()
                .fold(0u64, |a, &b| a.wrapping_add(b));
            sink.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        let rate = (per * chunks * 8) as f64 / t.elapsed().as_secs_f64();
        std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
        best = best.max(rate);
    }
    best
}

/// GFLOPS of a mat-vec per weight type present in `file`, each timed on the
/// largest 2-D tensor of that type for about `budget`.
pub fn cpu_flops(file: &Arc<Gguf>, budget: Duration) -> BTreeMap<String, f64> {
    let mut best: BTreeMap<&'static str, &prima_kernels::gguf::TensorInfo> = BTreeMap::new();
    for t in &file.tensors {
        if t.dims.len() == 2 && t.dims[1] > 1 {
            let e = best.entry(t.ty.name()).or_insert(t);
            if t.n_elements() > e.n_elements() {
                *e = t;
            }
        }
    }
    let mut out = BTreeMap::new();
    for t in best.into_values() {
        let ty: GgmlType = t.ty;
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let Ok(w) = Weight::new(file, t, [cols, rows]) else {
            continue;
        };
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let mut y = vec![0f32; rows];
        w.matmul(&x, 1, &mut y); // warm: pages in, caches
        let t0 = Instant::now();
        let mut n = 0u32;
        while t0.elapsed() < budget || n < 3 {
            w.matmul(&x, 1, &mut y);
            n += 1;
        }
        let secs = t0.elapsed().as_secs_f64() / n as f64;
        std::hint::black_box(&y);
        out.insert(
            crate::modelprof::type_key(ty),
            2.0 * (rows * cols) as f64 / secs / 1e9,
        );
    }
    // Attention and norms run in f32 on f16/f32 data.
    out.entry("f32".into()).or_insert_with(|| f32_flops(budget));
    let f32v = out["f32"];
    out.entry("f16".into()).or_insert(f32v);
    out
}

fn f32_flops(budget: Duration) -> f64 {
    let a: Vec<f32> = (0..1 << 16).map(|i| (i % 13) as f32 * 0.1).collect();
    let b = a.clone();
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut acc = 0f32;
    while t0.elapsed() < budget / 4 {
        // Eight independent sums, as the engine's f32 dot keeps them.
        let mut l = [0f32; 8];
        for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            for k in 0..8 {
                l[k] += x[k] * y[k];
            }
        }
        acc += l.iter().sum::<f32>();
        n += 1;
    }
    std::hint::black_box(acc);
    2.0 * (a.len() as u64 * n) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Milliseconds to write one token's K and V rows (`kv_dim` each) of one
/// layer into an f16 cache.
pub fn kv_copy_ms(kv_dim: usize) -> f64 {
    let src: Vec<f32> = (0..2 * kv_dim).map(|i| i as f32 * 1e-3).collect();
    let mut dst = vec![half::f16::ZERO; 2 * kv_dim];
    let reps = 20_000;
    let t = Instant::now();
    for _ in 0..reps {
        for (d, s) in dst.iter_mut().zip(&src) {
            *d = half::f16::from_f32(*s);
        }
        std::hint::black_box(&dst);
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// (total, available) RAM in bytes: Linux's MemAvailable x 0.8 (spec §2.4),
/// capped by the cgroup this process runs in.
pub fn memory() -> (u64, u64) {
    let mut sys = sysinfo::System::new().ok();
    let (total, avail) = match sys.as_mut() {
        Some(s) => {
            s.refresh_memory();
            (s.total_memory(), s.available_memory())
        }
        None => (0, 0),
    };
    let mut available = (avail as f64 * 0.8) as u64;
    if let Some(room) = cgroup_room() {
        available = available.min(room);
    }
    (total, available)
}

/// Bytes this process's memory cgroup still allows (limit - usage), v2 or v1.
pub fn cgroup_room() -> Option<u64> {
    let (limit, usage) = cgroup_memory()?;
    Some(limit.saturating_sub(usage))
}

/// This process's cgroup memory limit in bytes, if it has one.
pub fn cgroup_limit() -> Option<u64> {
    cgroup_memory().map(|(limit, _)| limit)
}

/// (limit, usage) of this process's memory cgroup (v1 or v2).
fn cgroup_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (limit, usage) = if ctrl.is_empty() {
            let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            (dir.join("memory.max"), dir.join("memory.current"))
        } else if ctrl.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            (
                dir.join("memory.limit_in_bytes"),
                dir.join("memory.usage_in_bytes"),
            )
        } else {
            continue;
        };
        let limit = std::fs::read_to_string(limit).ok()?;
        let limit: u64 = match limit.trim() {
            "max" => return None,
            v => v.parse().ok()?,
        };
        // v1 reports "no limit" as a huge number.
        if limit >= 1 << 60 {
            return None;
        }
        let usage: u64 = std::fs::read_to_string(usage)
            .ok()
            .and_then(|u| u.trim().parse().ok())
            .unwrap_or(0);
        return Some((limit, usage));
    }
    None
}

/// Sequential and random (4 KiB) read speed in GB/s of a scratch file in
/// `dir`, with its pages dropped from the cache first.
pub fn disk_speed(dir: &Path) -> Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(".prima-disk-probe-{}", std::process::id()));
    let size = 64usize << 20;
    let res = (|| -> Result<(f64, f64)> {
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let block: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
        for _ in 0..size >> 20 {
            f.write_all(&block)?;
        }
        f.sync_all()?;
        drop(f);
        let mut f = std::fs::File::open(&path)?;
        evict(&f);
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        while f.read(&mut buf)? > 0 {}
        let seq = size as f64 / t.elapsed().as_secs_f64() / 1e9;
        evict(&f);
        let mut page = [0u8; 4096];
        let pages = size / 4096;
        let t = Instant::now();
        let mut n = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while t.elapsed() < Duration::from_millis(300) && n < pages as u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.seek(SeekFrom::Start((x % pages as u64) * 4096))?;
            f.read_exact(&mut page)?;
            n += 1;
        }
        let rnd = (n * 4096) as f64 / t.elapsed().as_secs_f64() / 1e9;
        Ok((seq, rnd))
    })();
    let _ = std::fs::remove_file(&path);
    res
}

fn evict(f: &std::fs::File) {
    crate::memory::drop_cached(f, 0, 0);
}

fn os() -> halda::Os {
    match std::env::consts::OS {
        "macos" => halda::Os::Macos,
        "windows" => halda::Os::Windows,
        "android" => halda::Os::Android,
        _ => halda::Os::Linux,
    }
}

/// Profiles this device; `model` selects the weight types timed; `scratch`
/// is where the disk probe writes its file; `gpu` is measured too.
pub fn profile(
    name: &str,
    model: Option<&prima_kernels::Model>,
    scratch: &Path,
    gpu: &crate::gpu::Handle,
) -> Result<halda::DeviceProfile> {
    let budget = Duration::from_millis(150);
    let (flops, kv_dim) = match model {
        Some(m) => (
            cpu_flops(&m.file, budget),
            m.config.n_head_kv * m.config.head_dim,
        ),
        None => {
            let mut f = BTreeMap::new();
            f.insert("f32".to_string(), f32_flops(budget));
            (f, 512)
        }
    };
    let (total, available) = memory();
    let (seq, rnd) = disk_speed(scratch)?;
    Ok(halda::DeviceProfile {
        name: name.to_string(),
        os: os(),
        unified_memory: false,
        cpu: halda::CpuProfile {
            flops,
            kv_copy_ms: kv_copy_ms(kv_dim),
            threads: Some(prima_kernels::cpu::threads() as u32),
        },
        memory: halda::MemoryProfile {
            total_bytes: total,
            available_bytes: available,
            swap_available_bytes: 0,
            bandwidth_gbps: Some(read_bandwidth_in(bandwidth_buffer_for(available)) / 1e9),
        },
        disk: halda::DiskProfile {
            seq_read_gbps: seq.max(1e-3),
            rnd_read_gbps: rnd.max(1e-4),
        },
        gpus: gpu.profile(model, budget, available),
        compute_buffer_override: None,
        links: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandwidth_probe_fits_small_devices() {
        // A 583 MiB cgroup spares a quarter; a tiny one the 64 MiB floor; a
        // big machine no more than the full probe.
        assert_eq!(bandwidth_buffer_for(583 << 20), (583 << 20) / 4);
        assert_eq!(bandwidth_buffer_for(100 << 20), 64 << 20);
        assert_eq!(bandwidth_buffer_for(64 << 30), BANDWIDTH_BUFFER);
        let bw = read_bandwidth_in(64 << 20);
        assert!(bw > 1e8 && bw.is_finite(), "{bw}");
    }
}
