//! Solve-time benchmark: 8 devices, an 80-layer model.
//!
//! Run with `cargo run --release --example bench`. Prints the solve time of
//! each mode on a fixed heterogeneous 8-device cluster (with and without
//! measured links), the distribution over 50 random 8-device clusters whose
//! memory roughly matches the model size, and the paper testbed.
//! `BENCH_SEED=N` times one random cluster under several option sets.

use std::collections::BTreeMap;
use std::time::Instant;

use halda::{
    plan, ComputeBuffer, CpuProfile, DeviceProfile, DiskProfile, GpuBackend, GpuProfile, Link,
    MemoryProfile, Mode, ModelProfile, Options, Os, PaperTestbed,
};

const GIB: u64 = 1 << 30;

fn model() -> ModelProfile {
    ModelProfile {
        name: "70B-like".into(),
        n_layers: 80,
        vocab_size: 128_256,
        hidden_size: 8192,
        layer_bytes: 518_796_083,
        input_bytes: 591_003_648,
        output_bytes: 861_913_088,
        kv_bytes_per_token: 4096,
        layer_flops: BTreeMap::from([
            ("q4_k".into(), 1.468e9),
            ("q6_k".into(), 0.243e9),
            ("f32".into(), 2.8e5),
        ]),
        output_flops: BTreeMap::from([("q6_k".into(), 2.1e9)]),
        compute_buffer: ComputeBuffer {
            cpu_bytes: 220_000_000,
            head_extra_cpu_bytes: 300_000_000,
            gpu_bytes: 260_000_000,
        },
    }
}

fn tput(s: f64) -> BTreeMap<String, f64> {
    BTreeMap::from([
        ("q4_k".into(), s),
        ("q6_k".into(), s * 0.9),
        ("f32".into(), s * 1.2),
    ])
}

fn device(i: usize, links: bool) -> DeviceProfile {
    // A deterministic mix: laptops, desktops with GPUs, Macs, phones.
    let kinds = [
        (
            "mac-m1",
            Os::Macos,
            80.0,
            2.4,
            0.72,
            Some((GpuBackend::Metal, 450.0, 5.3)),
        ),
        (
            "laptop-3070",
            Os::Linux,
            110.0,
            4.1,
            2.98,
            Some((GpuBackend::Cuda, 1600.0, 7.6)),
        ),
        (
            "desktop-2080ti",
            Os::Linux,
            150.0,
            9.7,
            3.17,
            Some((GpuBackend::Cuda, 1400.0, 10.6)),
        ),
        ("phone", Os::Linux, 20.0, 1.9, 1.37, None),
        ("nuc", Os::Linux, 60.0, 6.0, 1.5, None),
        (
            "gaming-3060",
            Os::Windows,
            200.0,
            5.0,
            5.0,
            Some((GpuBackend::Cuda, 1300.0, 6.0)),
        ),
        ("old-laptop", Os::Linux, 40.0, 3.0, 0.5, None),
        (
            "mac-m2",
            Os::Macos,
            120.0,
            6.0,
            1.2,
            Some((GpuBackend::Metal, 900.0, 10.0)),
        ),
    ];
    let (name, os, cpu, ram, disk, gpu) = kinds[i % kinds.len()];
    let gpus = gpu
        .map(|(backend, s, vram)| GpuProfile {
            name: String::new(),
            backend,
            vram_total_bytes: (vram * GIB as f64) as u64,
            vram_free_bytes: (vram * GIB as f64) as u64,
            flops: tput(s),
            kv_copy_ms: 0.01,
            bandwidth_gbps: None,
            reserved_bytes: if backend == GpuBackend::Metal {
                300 << 20
            } else {
                700 << 20
            },
        })
        .into_iter()
        .collect();
    let links = if links {
        (0..8)
            .filter(|&j| j != i)
            .map(|j| Link {
                peer: kinds[j].0.to_string(),
                rtt_ms: 2.0 + ((i * 7 + j * 3) % 11) as f64,
                bandwidth_mbit_s: 200.0 + ((i * 5 + j * 13) % 7) as f64 * 50.0,
            })
            .collect()
    } else {
        vec![]
    };
    DeviceProfile {
        name: name.into(),
        os,
        unified_memory: os == Os::Macos,
        cpu: CpuProfile {
            flops: tput(cpu),
            kv_copy_ms: 0.02,
            threads: None,
        },
        memory: MemoryProfile {
            total_bytes: (ram * 2.0 * GIB as f64) as u64,
            available_bytes: (ram * GIB as f64) as u64,
            swap_available_bytes: 0,
            bandwidth_gbps: None,
        },
        disk: DiskProfile {
            seq_read_gbps: disk,
            rnd_read_gbps: disk / 4.0,
        },
        gpus,
        compute_buffer_override: None,
        links,
    }
}

fn time<F: FnMut() -> String>(label: &str, runs: usize, mut f: F) {
    let mut best = f64::INFINITY;
    let mut sum = 0.0;
    let mut last = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        last = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        best = best.min(ms);
        sum += ms;
    }
    println!(
        "{label:<48} best {best:8.2} ms  mean {:8.2} ms  ({runs} runs)  {last}",
        sum / runs as f64
    );
}

#[allow(dead_code)] // the benchmark draws fewer kinds of numbers than the tests
#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

/// Eight random devices whose memory adds up to roughly the model size, so
/// that most devices are needed and several overflow.
fn random_cluster(seed: u64, links: bool) -> Vec<DeviceProfile> {
    let mut rng = Rng(seed);
    let names: Vec<String> = (0..8).map(|i| format!("dev{i}")).collect();
    (0..8)
        .map(|i| {
            let mut d = device(i, false);
            d.name = names[i].clone();
            let scale = rng.f(0.4, 1.6);
            d.memory.available_bytes = (d.memory.available_bytes as f64 * scale) as u64;
            for s in d.cpu.flops.values_mut() {
                *s *= rng.f(0.5, 2.0);
            }
            for g in &mut d.gpus {
                g.vram_free_bytes = (g.vram_free_bytes as f64 * rng.f(0.5, 1.2)) as u64;
            }
            d.disk.seq_read_gbps *= rng.f(0.3, 2.0);
            d.disk.rnd_read_gbps *= rng.f(0.3, 2.0);
            if links {
                d.links = (0..8)
                    .filter(|&j| j != i)
                    .map(|j| Link {
                        peer: names[j].clone(),
                        rtt_ms: rng.f(1.0, 20.0),
                        bandwidth_mbit_s: rng.f(50.0, 900.0),
                    })
                    .collect();
            }
            d
        })
        .collect()
}

fn random_sweep(m: &ModelProfile, links: bool) {
    let mut times = Vec::new();
    let mut ks = BTreeMap::new();
    for seed in 0..50 {
        let devs = random_cluster(seed, links);
        let t = Instant::now();
        let p = plan(m, &devs, 4096, &Options::default());
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if t.elapsed().as_secs_f64() > 0.05 {
            println!(
                "  slow: seed {seed} links {links} {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        if let Ok(p) = p {
            *ks.entry(p.k).or_insert(0) += 1;
        }
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "50 random 8-device clusters, L = 80, optimal, links = {links}: mean {mean:.2} ms, median {:.2} ms, p95 {:.2} ms, max {:.2} ms; chosen k: {ks:?}",
        times[times.len() / 2],
        times[times.len() * 95 / 100],
        times[times.len() - 1]
    );
}

fn main() {
    let m = model();
    if std::env::var("BENCH_SHOW").is_ok() {
        let devs: Vec<DeviceProfile> = (0..8).map(|i| device(i, true)).collect();
        for mode in [Mode::Optimal, Mode::Shipped] {
            match plan(
                &m,
                &devs,
                4096,
                &Options {
                    mode,
                    ..Options::default()
                },
            ) {
                Ok(p) => println!("{p}"),
                Err(e) => println!("{mode}: {e}"),
            }
        }
        return;
    }
    if let Ok(seed) = std::env::var("BENCH_SEED") {
        let devs = random_cluster(seed.parse().unwrap_or(0), false);
        for (label, o) in [
            ("default", Options::default()),
            (
                "no selection",
                Options {
                    device_selection: false,
                    ..Options::default()
                },
            ),
            (
                "no prefetch",
                Options {
                    prefetch: false,
                    ..Options::default()
                },
            ),
            (
                "shipped objective",
                Options {
                    objective: halda::Objective::Shipped,
                    ..Options::default()
                },
            ),
        ] {
            let t = Instant::now();
            let p = plan(&m, &devs, 4096, &o);
            println!(
                "seed {seed} {label}: {:?} in {:?}",
                p.map(|p| (p.k, p.tpot_ms)),
                t.elapsed()
            );
        }
        return;
    }
    for links in [false, true] {
        let devs: Vec<DeviceProfile> = (0..8).map(|i| device(i, links)).collect();
        for mode in [Mode::Optimal, Mode::Shipped] {
            let opts = Options {
                mode,
                ..Options::default()
            };
            let label = format!("8 devices, L = 80, {mode}, links = {links}");
            time(&label, 5, || match plan(&m, &devs, 4096, &opts) {
                Ok(p) => format!("k = {}, TPOT {:.1} ms", p.k, p.tpot_ms),
                Err(e) => format!("error: {e}"),
            });
        }
    }
    random_sweep(&m, false);
    random_sweep(&m, true);
    let text = include_str!("../tests/data/paper-testbed.json");
    let file = PaperTestbed::from_json(text)
        .and_then(|t| t.into_cluster())
        .expect("fixture");
    for mode in [Mode::Optimal, Mode::Shipped] {
        let opts = Options {
            mode,
            ..file.options.clone()
        };
        time(
            &format!("paper testbed (4 devices), {mode}"),
            5,
            || match plan(&file.model, &file.devices, file.n_ctx, &opts) {
                Ok(p) => format!("k = {}, TPOT {:.1} ms", p.k, p.tpot_ms),
                Err(e) => format!("error: {e}"),
            },
        );
    }
}
