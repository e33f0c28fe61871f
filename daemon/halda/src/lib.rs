//! # Halda: layer-to-device scheduling for pipelined-ring parallelism
//!
//! Given a model profile, device profiles, a context length and
//! [`Options`], [`plan()`] returns a [`Plan`]: the number of rounds k, each
//! device's layer window w_m and GPU layers n_m, the ring order, and the
//! predicted time per output token (TPOT) with its terms under two cost
//! models (see [`cost`]).
//!
//! Two modes:
//!
//! * [`Mode::Shipped`] reproduces prima.cpp's Halda (prima-spec §4.6–4.8):
//!   set iteration, per-k integer programs, calibration, rollback and device
//!   selection ([`shipped`]).
//! * [`Mode::Optimal`] (default) finds the global optimum of the chosen cost
//!   model with one mixed-integer program per k, modelling each device's disk
//!   overflow directly, selecting devices with binaries, crediting prefetch
//!   overlap for k ≥ 2 and charging measured communication along the best
//!   ring order ([`optimal`]).
//!
//! [`evaluate`], [`shipped_tpot`] and [`ring_tpot`] score any plan under
//! both models, so plans of either mode can be compared.
//!
//! ```
//! use halda::{evaluate, plan, ClusterFile, Mode, Options};
//!
//! let file = ClusterFile::from_json(r#"{
//!   "model": { "n_layers": 8, "vocab_size": 32000, "hidden_size": 4096,
//!              "layer_bytes": 400000000, "input_bytes": 260000000, "output_bytes": 260000000,
//!              "kv_bytes_per_token": 4096, "layer_flops": { "q4_k": 4.0e8 } },
//!   "n_ctx": 2048,
//!   "devices": [
//!     { "name": "head", "os": "linux",
//!       "cpu": { "flops": { "q4_k": 100.0 } },
//!       "memory": { "available_bytes": 8000000000 },
//!       "disk": { "seq_read_gbps": 2.0, "rnd_read_gbps": 0.5 } },
//!     { "name": "laptop", "os": "macos",
//!       "cpu": { "flops": { "q4_k": 80.0 } },
//!       "memory": { "available_bytes": 2000000000 },
//!       "disk": { "seq_read_gbps": 2.0, "rnd_read_gbps": 0.7 },
//!       "gpus": [ { "backend": "metal", "vram_free_bytes": 5000000000,
//!                   "flops": { "q4_k": 450.0 } } ] }
//!   ]
//! }"#)?;
//! let optimal = plan(&file.model, &file.devices, file.n_ctx, &Options::default())?;
//! let shipped = plan(&file.model, &file.devices, file.n_ctx,
//!                    &Options { mode: Mode::Shipped, ..Options::default() })?;
//! println!("{optimal}\n{shipped}");
//! assert_eq!(optimal.k * optimal.window_sum, 8);
//! assert!(optimal.tpot_ms <= shipped.ring_tpot_ms());
//! // Score the shipped plan under both models.
//! let e = evaluate(&file.model, &file.devices, file.n_ctx, &Options::default(), &shipped.assignment())?;
//! assert_eq!(e.shipped.total_ms, shipped.shipped.total_ms);
//! # Ok::<(), halda::HaldaError>(())
//! ```
//!
//! ## Modules
//!
//! * [`profile`] — input types and their JSON format ([`ClusterFile`] is what
//!   `primad plan --devices FILE.json` reads);
//! * [`testbed`] — loader for the paper-testbed fixture;
//! * [`cost`] — the shipped and ring cost models;
//! * [`ring`] — hop costs and ring order;
//! * [`shipped`], [`optimal`] — the two algorithms; [`mod@exhaustive`] — a
//!   brute-force reference for small instances;
//! * [`mod@plan`] — options and the plan type;
//! * [`error`] — [`HaldaError`].
//!
//! ## Where the spec is ambiguous, and what this crate does
//!
//! 1. **Compute buffers** c^cpu, c^gpu: the shipped code recomputes them from
//!    whether a window has CPU and GPU layers (§4.4, last line); the fixture
//!    gives constants. Both models here use constants per device (model
//!    estimate + GPU reserve, or the device's measured override).
//! 2. **Rollback** (§4.7 e) goes to the best solution of the previous
//!    iteration even when calibration did not adopt it; if there is none
//!    (first iteration), a [`HaldaError::Infeasible`] names the rows that fail
//!    instead of prima's assertion.
//! 3. **Ties between k** (§4.7 d): a k replaces the incumbent only if its
//!    objective is smaller by a relative 1e-9, so floating-point noise cannot
//!    make the shipped mode pick k > 1 where the model ties.
//! 4. **Shipped-model evaluation of arbitrary plans** uses honest sets:
//!    forced-M4 marks and the slow-disk rule are not applied, and an
//!    overflowing Windows device is charged like M3 (the spec has no case for
//!    it). For plans the shipped algorithm produces, this equals its own
//!    objective (without the master-priority tweak, which the README's
//!    12,625 ms also excludes).
//! 5. **T_head** in κ uses per-layer FLOPs as the shipped code does (§4.5);
//!    the ring model uses the output-layer FLOPs instead. It is a constant
//!    and does not move either optimum.
//! 6. **Init rounding** (§4.7 step 1): a negative remainder that would push
//!    the smallest device below one layer is taken from the largest windows.
//! 7. **Iteration bound**: the shipped loop stops after
//!    [`shipped::MAX_ITERATIONS`] iterations (prima has no bound).
//! 8. **Several GPUs**: only a device's first adapter is scheduled. Vulkan
//!    and other backends are modelled like CUDA (copied, resident layers).
//! 9. **Disk re-read volume** with k ≥ 2 follows the spec's overflow model
//!    (only bytes beyond the budget are re-read per token) in both models; a
//!    pure LRU page cache would re-read more.
//! 10. **Memory bandwidth** is carried in the profiles but charged by
//!     neither model, as in the shipped code (§4.2).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cost;
pub mod error;
pub mod exhaustive;
pub mod optimal;
pub mod plan;
pub mod profile;
pub mod ring;
pub mod shipped;
pub mod testbed;

#[cfg(test)]
pub(crate) mod test_support;

pub use cost::{
    evaluate, ring_tpot, shipped_tpot, Assignment, DeviceMemory, DeviceTerms, Evaluation,
    MemorySet, TpotBreakdown,
};
pub use error::{HaldaError, Result};
pub use exhaustive::exhaustive;
pub use plan::{DevicePlan, Mode, Objective, Options, Plan};
pub use profile::{
    ClusterFile, ComputeBuffer, ComputeBufferOverride, CpuProfile, DeviceProfile, DiskProfile,
    GpuBackend, GpuProfile, Link, MemoryProfile, ModelProfile, Os,
};
pub use testbed::PaperTestbed;

use cost::Ctx;

/// Plans the model onto the devices.
///
/// `devices[0]` is the head (holds the embedding and output layer, samples).
/// `n_ctx` sizes the KV cache (b' = b + kv_bytes_per_token·n_ctx).
///
/// Errors: invalid profiles or options, a forced k that does not divide L,
/// or no feasible plan (each with the numbers that explain it).
pub fn plan(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    n_ctx: u32,
    options: &Options,
) -> Result<Plan> {
    let ctx = Ctx::new(model, devices, n_ctx, options)?;
    match options.mode {
        Mode::Shipped => {
            let o = shipped::run(&ctx, options)?;
            plan::build_plan(
                &ctx,
                Mode::Shipped,
                options.objective,
                o.k,
                o.w,
                o.n,
                None,
                &o.forced,
                o.dropped,
                o.notes,
            )
        }
        Mode::Optimal => {
            let sctx = optimal::solving_ctx(&ctx, options.objective);
            let o = optimal::run(&sctx, options)?;
            // With the shipped objective the solver ignored communication;
            // still report the cheapest ring under the real links.
            let order = match options.objective {
                Objective::Ring => o.order,
                Objective::Shipped => {
                    let active: Vec<usize> = (0..o.w.len()).filter(|&i| o.w[i] > 0).collect();
                    ring::best_order(&ctx, &active).0
                }
            };
            plan::build_plan(
                &ctx,
                Mode::Optimal,
                options.objective,
                o.k,
                o.w,
                o.n,
                Some(order),
                &[],
                o.dropped,
                o.notes,
            )
        }
    }
}

/// Convenience: [`plan()`] on a parsed [`ClusterFile`] (its own options).
pub fn plan_cluster(file: &ClusterFile) -> Result<Plan> {
    plan(&file.model, &file.devices, file.n_ctx, &file.options)
}

#[cfg(test)]
mod tests {
    //! Hand-computed cases for both modes. All models use 1 GB layers and
    //! 1e9 FLOPs per layer, so a CPU layer at s GFLOPS costs 1000/s ms; the
    //! head's embedding row is 1000 bytes.
    use super::*;
    use crate::test_support::*;

    const GB: u64 = 1_000_000_000;

    fn windows(p: &Plan) -> (u32, Vec<u32>, Vec<u32>) {
        (
            p.k,
            p.devices.iter().map(|d| d.window).collect(),
            p.devices.iter().map(|d| d.gpu_layers).collect(),
        )
    }

    fn both(model: &ModelProfile, devs: &[DeviceProfile]) -> (Plan, Plan) {
        let opt = plan(model, devs, 0, &Options::default()).expect("optimal");
        let shp = plan(
            model,
            devs,
            0,
            &Options {
                mode: Mode::Shipped,
                ..Options::default()
            },
        )
        .expect("shipped");
        eprintln!("{opt}\n{shp}");
        (opt, shp)
    }

    #[test]
    fn single_device() {
        // α = 10 ms, 4 layers fit in 10 GB: TPOT = 40 ms + τ(row) = 1e3 B / 1 GB/s.
        let model = tiny_model(4, GB, 1e9);
        let devs = [cpu_device("solo", Os::Linux, 100.0, 10 * GB, 1.0)];
        let (opt, shp) = both(&model, &devs);
        assert_eq!(windows(&opt), (1, vec![4], vec![0]));
        assert!((opt.tpot_ms - 40.001).abs() < 1e-9, "{}", opt.tpot_ms);
        assert_eq!(windows(&shp), (1, vec![4], vec![0]));
        // Shipped κ adds T_head = one layer on the head's CPU, 10 ms.
        assert!((shp.tpot_ms - 50.001).abs() < 1e-9, "{}", shp.tpot_ms);
        assert_eq!(shp.devices[0].set, Some(MemorySet::M4));
    }

    #[test]
    fn two_equal_devices_split_evenly() {
        // 8 layers of 1 GB, each device has 4.5 GB: 4 + 4 fit, 5 + 3 would
        // overflow 0.5 GB (+500 ms). TPOT = 8·10 ms (+ row).
        let model = tiny_model(8, GB, 1e9);
        let devs = [
            cpu_device("a", Os::Linux, 100.0, 4_500_000_000, 1.0),
            cpu_device("b", Os::Linux, 100.0, 4_500_000_000, 1.0),
        ];
        let (opt, shp) = both(&model, &devs);
        assert_eq!(windows(&opt), (1, vec![4, 4], vec![0, 0]));
        assert!((opt.tpot_ms - 80.001).abs() < 1e-9);
        assert_eq!(windows(&shp), (1, vec![4, 4], vec![0, 0]));
        assert!((shp.tpot_ms - 90.001).abs() < 1e-9);
        assert_eq!(opt.ring, vec![1, 0]);
    }

    fn small_fast_worker(os: Os) -> (ModelProfile, Vec<DeviceProfile>) {
        // Head: 1 GFLOPS (α = 1000 ms), 10 GB. Worker: α = 1 ms but 2.5 GB.
        // Every layer beyond 2.5 GB on the worker costs 1 + 500 ms (2 GB/s),
        // cheaper than 1000 ms on the head: optimum w = [1, 7].
        let model = tiny_model(8, GB, 1e9);
        let devs = vec![
            cpu_device("slow-head", Os::Linux, 1.0, 10 * GB, 2.0),
            cpu_device("fast-small", os, 1000.0, 2_500_000_000, 2.0),
        ];
        (model, devs)
    }

    #[test]
    fn device_too_small_for_its_share_overflows_to_disk() {
        for (os, set) in [(Os::Linux, MemorySet::M3), (Os::Macos, MemorySet::M1)] {
            let (model, devs) = small_fast_worker(os);
            let (opt, shp) = both(&model, &devs);
            assert_eq!(windows(&opt), (1, vec![1, 7], vec![0, 0]));
            assert_eq!(opt.devices[1].set, Some(set));
            // 1000 + 7·1 + (7 − 2.5) GB / 2 GB/s + row 1000 B / 2 GB/s.
            let want = 1000.0 + 7.0 + 2250.0 + 0.0005;
            assert!((opt.tpot_ms - want).abs() < 1e-6, "{}", opt.tpot_ms);
            assert!((opt.devices[1].memory.disk_bytes_per_token - 4.5e9).abs() < 1.0);
            // The shipped model agrees on this plan's cost (+ T_head = 1000 ms).
            assert!(
                (opt.shipped.total_ms - (want + 1000.0)).abs() < 1e-6,
                "{}",
                opt.shipped.total_ms
            );
            // The shipped search never leaves M4 for the worker: w = [6, 2].
            assert_eq!(windows(&shp), (1, vec![6, 2], vec![0, 0]));
            assert!(
                (shp.tpot_ms - (6000.0 + 2.0 + 1000.0 + 0.0005)).abs() < 1e-6,
                "{}",
                shp.tpot_ms
            );
            assert!(opt.shipped.total_ms < shp.shipped.total_ms);
        }
    }

    #[test]
    fn gpu_layers_are_capped_by_vram() {
        // CPU α = 10 ms, GPU 1 ms; VRAM 3.5 GB with 0.5 GB reserved: 3 GPU
        // layers at k = 1 (k = 2 allows only 1 per window, k = 4 none).
        let model = tiny_model(8, GB, 1e9);
        let devs = [cuda_device(
            "gpu-box",
            100.0,
            1000.0,
            100 * GB,
            3_500_000_000,
            500_000_000,
            1.0,
        )];
        let (opt, shp) = both(&model, &devs);
        assert_eq!(windows(&opt), (1, vec![8], vec![3]));
        assert!(
            (opt.tpot_ms - (5.0 * 10.0 + 3.0 + 0.001)).abs() < 1e-9,
            "{}",
            opt.tpot_ms
        );
        let d = &opt.devices[0];
        assert!((d.memory.vram_used_bytes - 3.5e9).abs() < 1.0);
        assert!(d.memory.vram_used_bytes <= d.memory.vram_budget_bytes);
        assert_eq!(windows(&shp), (1, vec![8], vec![3]));
        // A forced k = 2 leaves room for one GPU layer per window.
        let p = plan(
            &model,
            &devs,
            0,
            &Options {
                k: Some(2),
                ..Options::default()
            },
        )
        .unwrap();
        assert_eq!(windows(&p), (2, vec![4], vec![1]));
        assert!(
            (p.tpot_ms - (2.0 * (3.0 * 10.0 + 1.0) + 0.001)).abs() < 1e-9,
            "{}",
            p.tpot_ms
        );
    }

    #[test]
    fn metal_head_within_its_working_set() {
        // Metal head: 6 GB working set, GPU 1 ms/layer: 4 layers fit
        // (4 GB + b_o + row) and run on the GPU: 4 ms.
        let model = tiny_model(4, GB, 1e9);
        let devs = [metal_device("mac", 100.0, 1000.0, 6 * GB, 1.0)];
        let (opt, _) = both(&model, &devs);
        assert_eq!(windows(&opt), (1, vec![4], vec![4]));
        assert_eq!(opt.devices[0].set, Some(MemorySet::M4));
        assert!((opt.tpot_ms - 4.001).abs() < 1e-9, "{}", opt.tpot_ms);
    }

    #[test]
    fn weak_device_is_dropped_with_a_reason() {
        // A 1-GFLOPS phone (1000 ms per layer) next to a 100-GFLOPS head.
        let model = tiny_model(8, GB, 1e9);
        let devs = [
            cpu_device("head", Os::Linux, 100.0, 10 * GB, 1.0),
            cpu_device("phone", Os::Android, 1.0, 10 * GB, 1.0),
        ];
        let (opt, shp) = both(&model, &devs);
        assert_eq!(windows(&opt), (1, vec![8, 0], vec![0, 0]));
        assert!((opt.tpot_ms - 80.001).abs() < 1e-9);
        let why = opt.devices[1].dropped.as_deref().expect("reason");
        assert!(
            why.contains("faster without it") && why.contains("1070.0 ms"),
            "{why}"
        );
        assert_eq!(opt.ring, vec![0]);
        // Shipped: first pass gives the phone w = 1, §4.8 drops it.
        assert_eq!(windows(&shp), (1, vec![8, 0], vec![0, 0]));
        assert!(shp.devices[1].dropped.as_deref().unwrap().contains("w = 1"));
    }

    #[test]
    fn prefetch_overlap_makes_k_greater_than_one_pay() {
        // Head: α = 500 ms, roomy. Worker: α = 1 ms, 2.2 GB, 1 GB/s disk.
        // k = 1: best is w = [6, 2] (worker fits), 3,002 ms.
        // k = 4: w = [1, 1]; the worker holds 4 layers, re-reads 1.8 GB per
        // token (450 ms per round) while the head computes its 500 ms window:
        // T_round = max(500 + 1, 1 + 450) = 501, TPOT = 2,004 ms.
        let model = tiny_model(8, GB, 1e9);
        let devs = [
            cpu_device("head", Os::Linux, 2.0, 10 * GB, 1.0),
            cpu_device("worker", Os::Linux, 1000.0, 2_200_000_000, 1.0),
        ];
        let no_prefetch = plan(
            &model,
            &devs,
            0,
            &Options {
                prefetch: false,
                ..Options::default()
            },
        )
        .unwrap();
        let with = plan(&model, &devs, 0, &Options::default()).unwrap();
        eprintln!("{no_prefetch}\n{with}");
        assert_eq!(windows(&no_prefetch), (1, vec![6, 2], vec![0, 0]));
        assert!(
            (no_prefetch.tpot_ms - 3002.001).abs() < 1e-6,
            "{}",
            no_prefetch.tpot_ms
        );
        assert_eq!(windows(&with), (4, vec![1, 1], vec![0, 0]));
        assert!((with.tpot_ms - 2004.001).abs() < 1e-6, "{}", with.tpot_ms);
        let r = with.ring_model.as_ref().unwrap();
        assert!(
            (r.overlap_credit_ms - 1800.0).abs() < 1e-6,
            "{}",
            r.overlap_credit_ms
        );
        assert!(with.devices[1].memory.pair_fits);
    }

    #[test]
    fn communication_picks_the_cheap_ring_order() {
        // Three equal devices; hops a->b and b->c... are cheap one way only.
        let model = tiny_model(6, GB, 1e9);
        let mut devs: Vec<DeviceProfile> = ["h", "x", "y"]
            .iter()
            .map(|n| cpu_device(n, Os::Linux, 100.0, 2_000_000_000, 1.0))
            .collect();
        let link = |peer: &str, rtt: f64| Link {
            peer: peer.into(),
            rtt_ms: rtt,
            bandwidth_mbit_s: 0.0,
        };
        // Cheap cycle h -> y -> x -> h (1 ms each way), the reverse costs 20 ms.
        devs[0].links = vec![link("y", 2.0), link("x", 40.0)];
        devs[2].links = vec![link("x", 2.0), link("h", 40.0)];
        devs[1].links = vec![link("h", 2.0), link("y", 40.0)];
        let p = plan(&model, &devs, 0, &Options::default()).unwrap();
        eprintln!("{p}");
        assert_eq!(p.ring, vec![2, 1, 0]);
        let r = p.ring_model.as_ref().unwrap();
        assert!((r.comm_ms - p.k as f64 * 3.0).abs() < 1e-9, "{}", r.comm_ms);
    }
}
