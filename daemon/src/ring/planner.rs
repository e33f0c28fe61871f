//! The coordinator's side: turn the live devices that hold the household's
//! model into a [`RingPlan`], with Halda or from a pin.

use std::path::Path;

use super::{
    plan::{Dropped, PlanDevice, RingPlan},
    ModelAd, Pin,
};

/// A device that could join the ring.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    /// Measured profile, if the device has one.
    pub device: Option<halda::DeviceProfile>,
    pub cores: u32,
    pub ram_mb: u64,
    /// Round-trip times to other candidates, by name (ms).
    pub links: Vec<(String, f64)>,
    /// The memory the device lets the ring use, if limited.
    pub memory_budget: Option<u64>,
    /// Measured throughput to other candidates, by name (Mbit/s).
    pub bandwidth: Vec<(String, f64)>,
    /// Memory its speculative draft takes if it heads the ring.
    pub draft_bytes: u64,
}

pub struct Request<'a> {
    pub model: &'a ModelAd,
    pub path: &'a Path,
    /// Index 0 is the coordinator (the head unless another device is
    /// clearly faster at it).
    pub candidates: &'a [Candidate],
    pub pin: Option<&'a Pin>,
    pub epoch: u64,
    pub coordinator: &'a str,
    pub n_ctx: u32,
    pub use_all_devices: bool,
    /// The plan the household runs now, if the coordinator may keep it:
    /// a new plan replaces it only when predicted clearly faster.
    pub current: Option<&'a RingPlan>,
}

/// Least predicted gain (fraction of the token time) worth switching a
/// running plan for: a switch costs every device a reload and running
/// answers a replay.
pub const SWITCH_GAIN: f64 = 0.05;

/// What the coordinator should do.
#[derive(Debug)]
pub enum Planned {
    /// Adopt this plan.
    New(RingPlan),
    /// Keep the current plan: the best new one is not clearly faster.
    Keep { current_ms: f64, new_ms: f64 },
}

/// An estimate for a device that has not measured itself yet: modest
/// per-core throughput, half its RAM, a slow disk. Halda replans when the
/// measured profile arrives.
fn estimate(c: &Candidate, model: &halda::ModelProfile) -> halda::DeviceProfile {
    let gflops = 4.0 * c.cores.max(1) as f64;
    let flops = model
        .layer_flops
        .keys()
        .chain(model.output_flops.keys())
        .map(|k| (k.clone(), gflops))
        .collect();
    halda::DeviceProfile {
        name: c.name.clone(),
        os: halda::Os::Linux,
        unified_memory: false,
        cpu: halda::CpuProfile {
            flops,
            kv_copy_ms: 0.001,
            threads: Some(c.cores),
        },
        memory: halda::MemoryProfile {
            total_bytes: c.ram_mb << 20,
            available_bytes: (c.ram_mb << 20) / 2,
            swap_available_bytes: 0,
            bandwidth_gbps: None,
        },
        disk: halda::DiskProfile {
            seq_read_gbps: 1.0,
            rnd_read_gbps: 0.2,
        },
        gpus: vec![],
        compute_buffer_override: None,
        links: vec![],
    }
}

/// Builds the plan.
pub fn make_plan(r: &Request) -> Result<Planned, String> {
    if r.candidates.is_empty() {
        return Err("no device holds the model".into());
    }
    let base = RingPlan {
        epoch: r.epoch,
        coordinator: r.coordinator.to_string(),
        model: r.model.name.clone(),
        sha256: r.model.sha256.clone(),
        n_layer: r.model.n_layer,
        k: 1,
        devices: vec![],
        tpot_ms: None,
        pinned: false,
        dropped: vec![],
    };
    if let Some(pin) = r.pin {
        let mut pinned = Vec::new();
        for (i, (name, w)) in pin.windows.iter().enumerate() {
            let c = r
                .candidates
                .iter()
                .find(|c| &c.name == name || &c.id == name)
                .ok_or_else(|| {
                    format!("the pinned device '{name}' is not live or does not hold the model")
                })?;
            let mut d = PlanDevice::new(c.id.clone(), c.name.clone(), *w);
            d.gpu_layers = pin.gpu_layers.get(i).copied().unwrap_or(0);
            pinned.push(d);
        }
        let dropped = r
            .candidates
            .iter()
            .filter(|c| !pinned.iter().any(|d| d.id == c.id))
            .map(|c| Dropped {
                name: c.name.clone(),
                why: "not in the pinned plan".into(),
            })
            .collect();
        let p = RingPlan {
            k: pin.k,
            devices: pinned,
            pinned: true,
            dropped,
            ..base
        };
        p.validate()?;
        // Halda's accounting of the pinned windows, as for its own plans.
        let mut p = p;
        // (A model that cannot be read here still runs a pinned plan.)
        if let Ok((mp, devices, opts)) = halda_inputs(r) {
            if let Some((e, ranks)) = evaluate_plan(r, &p, &mp, &devices, &opts) {
                for (d, &i) in p.devices.iter_mut().zip(&ranks) {
                    fill_memory(d, &e.memory[i]);
                }
            }
        }
        return Ok(Planned::New(p));
    }
    let (mp, devices, opts) = halda_inputs(r)?;
    // Any device may head the ring (it tokenizes, samples and holds the
    // output layer): Halda plans with each one as its head (device 0) and
    // the fastest plan wins. The coordinator keeps the head unless another
    // device is predicted more than 2% faster, so noise does not move it.
    let n = devices.len();
    let mut best: Option<(f64, Vec<usize>, halda::Plan)> = None;
    let mut last_err = None;
    for h in 0..n {
        let perm: Vec<usize> = std::iter::once(h)
            .chain((0..n).filter(|&i| i != h))
            .collect();
        let mut devs: Vec<halda::DeviceProfile> =
            perm.iter().map(|&i| devices[i].clone()).collect();
        // The head runs the speculative draft beside its window.
        let m = &mut devs[0].memory;
        m.available_bytes = m
            .available_bytes
            .saturating_sub(r.candidates[h].draft_bytes);
        match halda::plan(&mp, &devs, r.n_ctx, &opts) {
            Ok(hp) if hp.devices[0].window > 0 => {
                let score = hp.tpot_ms * if h == 0 { 0.98 } else { 1.0 };
                if best.as_ref().is_none_or(|(b, _, _)| score < *b) {
                    best = Some((score, perm, hp));
                }
            }
            Ok(_) => {}
            Err(e) => last_err = Some(e.to_string()),
        }
    }
    let Some((_, perm, hp)) = best else {
        return Err(last_err.unwrap_or_else(|| "Halda found no plan".into()));
    };
    if let Some(current_ms) = r.current.and_then(|c| predict(r, c, &mp, &devices, &opts)) {
        let new_ms = hp.ring_tpot_ms();
        let same_set = hp.devices.iter().zip(&perm).all(|(d, &i)| {
            (d.window > 0)
                == r.current
                    .is_some_and(|c| c.rank_of(&r.candidates[i].id).is_some())
        });
        // With `use_all_devices` a newcomer is used whatever the gain.
        if (same_set || !r.use_all_devices) && new_ms > current_ms * (1.0 - SWITCH_GAIN) {
            return Ok(Planned::Keep { current_ms, new_ms });
        }
    }
    // Halda's ring lists the active devices with the head last; ranks put
    // the head first. Indices go back from Halda's order to candidates'.
    let mut order: Vec<usize> = vec![0];
    order.extend(hp.ring.iter().copied().filter(|&i| i != 0));
    let devices_out = order
        .iter()
        .map(|&i| {
            let d = &hp.devices[i];
            let c = &r.candidates[perm[i]];
            let mut p = PlanDevice::new(c.id.clone(), c.name.clone(), d.window);
            p.gpu_layers = d.gpu_layers;
            p.share = Some(d.time_share);
            p.set = d.set.map(|s| s.to_string());
            fill_memory(&mut p, &d.memory);
            p
        })
        .collect();
    let dropped = hp
        .devices
        .iter()
        .zip(perm.iter().map(|&i| &r.candidates[i]))
        .filter(|(d, _)| d.window == 0)
        .map(|(d, c)| Dropped {
            name: c.name.clone(),
            why: d
                .dropped
                .clone()
                .unwrap_or_else(|| "Halda gave it no layers".into()),
        })
        .collect();
    let p = RingPlan {
        k: hp.k,
        devices: devices_out,
        tpot_ms: Some(hp.tpot_ms),
        dropped,
        ..base
    };
    p.validate()?;
    Ok(Planned::New(p))
}

/// Halda's view of the request: the model profile read from the GGUF, the
/// candidates as device profiles (names made unique, budgets applied,
/// links), and the options.
fn halda_inputs(
    r: &Request,
) -> Result<
    (
        halda::ModelProfile,
        Vec<halda::DeviceProfile>,
        halda::Options,
    ),
    String,
> {
    let gguf = prima_kernels::gguf::Gguf::open(r.path)
        .map_err(|e| format!("reading {}: {e}", r.path.display()))?;
    let cfg = prima_kernels::model::config::Config::from_metadata(&gguf.metadata)
        .map_err(|e| e.to_string())?;
    let mp = crate::modelprof::model_profile(&gguf, &cfg, &r.model.name, r.n_ctx);
    // Halda refers to devices by name: make names unique.
    let mut names: Vec<String> = Vec::new();
    let mut devices = Vec::new();
    for c in r.candidates {
        let mut n = c.name.clone();
        if n.is_empty() || names.contains(&n) {
            n = format!("{}-{}", c.name, &c.id[c.id.len().saturating_sub(6)..]);
        }
        names.push(n.clone());
        let mut d = c.device.clone().unwrap_or_else(|| estimate(c, &mp));
        d.name = n;
        if let Some(b) = c.memory_budget {
            d.memory.available_bytes = d.memory.available_bytes.min(b);
            d.memory.swap_available_bytes = 0;
        }
        devices.push(d);
    }
    for (d, c) in devices.iter_mut().zip(r.candidates) {
        d.links = c
            .links
            .iter()
            .filter_map(|(peer, rtt)| {
                let i = r.candidates.iter().position(|o| &o.name == peer)?;
                let bandwidth_mbit_s = c
                    .bandwidth
                    .iter()
                    .find(|(n, _)| n == peer)
                    .map(|(_, b)| *b)
                    .filter(|b| b.is_finite() && *b > 0.0)
                    .unwrap_or(0.0);
                Some(halda::Link {
                    peer: names[i].clone(),
                    rtt_ms: *rtt,
                    bandwidth_mbit_s,
                })
            })
            .collect();
    }
    let opts = halda::Options {
        device_selection: !r.use_all_devices,
        ..halda::Options::default()
    };
    Ok((mp, devices, opts))
}

/// The current plan's token time under today's profiles (ring model), or
/// None when it cannot run as it is (a device of it is gone, it is pinned,
/// or it is another model's).
fn predict(
    r: &Request,
    current: &RingPlan,
    mp: &halda::ModelProfile,
    devices: &[halda::DeviceProfile],
    opts: &halda::Options,
) -> Option<f64> {
    if current.pinned || current.sha256 != r.model.sha256 {
        return None;
    }
    evaluate_plan(r, current, mp, devices, opts).map(|(e, _)| e.ring.total_ms)
}

/// Halda's evaluation of `plan` over `devices` (candidates' order), and for
/// each of the plan's ranks its index in the evaluation's device list.
fn evaluate_plan(
    r: &Request,
    plan: &RingPlan,
    mp: &halda::ModelProfile,
    devices: &[halda::DeviceProfile],
    opts: &halda::Options,
) -> Option<(halda::cost::Evaluation, Vec<usize>)> {
    let at = |id: &str| r.candidates.iter().position(|c| c.id == id);
    let ranks: Vec<usize> = plan
        .devices
        .iter()
        .map(|d| at(&d.id))
        .collect::<Option<_>>()?;
    let n = devices.len();
    let perm: Vec<usize> = std::iter::once(ranks[0])
        .chain((0..n).filter(|&i| i != ranks[0]))
        .collect();
    let pos = |cand: usize| perm.iter().position(|&i| i == cand).expect("a permutation");
    let mut windows = vec![0; n];
    let mut gpu_layers = vec![0; n];
    for (d, &c) in plan.devices.iter().zip(&ranks) {
        windows[pos(c)] = d.window;
        gpu_layers[pos(c)] = d.gpu_layers;
    }
    let ring: Vec<usize> = ranks[1..]
        .iter()
        .map(|&c| pos(c))
        .chain(std::iter::once(0))
        .collect();
    let devs: Vec<halda::DeviceProfile> = perm.iter().map(|&i| devices[i].clone()).collect();
    let a = halda::cost::Assignment {
        k: plan.k,
        windows,
        gpu_layers,
        ring: Some(ring),
    };
    let e = halda::cost::evaluate(mp, &devs, r.n_ctx, opts, &a).ok()?;
    Some((e, ranks.iter().map(|&c| pos(c)).collect()))
}

/// Copies Halda's memory accounting of a device into the plan.
fn fill_memory(d: &mut PlanDevice, m: &halda::cost::DeviceMemory) {
    d.ram_bytes = Some(m.ram_demand_bytes as u64);
    d.ram_budget_bytes = Some(m.ram_budget_bytes as u64);
    d.anon_bytes = Some(m.ram_anonymous_bytes as u64);
    d.disk_bytes_per_token = Some(m.disk_bytes_per_token as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(i: usize) -> Candidate {
        Candidate {
            id: format!("12D3KooWpeer{i}"),
            name: format!("dev{i}"),
            device: None,
            cores: 4,
            ram_mb: 8192,
            links: vec![],
            memory_budget: None,
            draft_bytes: 0,
            bandwidth: vec![],
        }
    }

    #[test]
    fn pins_map_names_to_ranks_and_are_checked() {
        let model = ModelAd {
            name: "m".into(),
            sha256: "s".into(),
            n_layer: 30,
        };
        let cands = [cand(0), cand(1), cand(2)];
        let pin = Pin {
            k: 2,
            windows: vec![("dev2".into(), 3), ("dev0".into(), 7), ("dev1".into(), 5)],
            gpu_layers: vec![0, 2],
        };
        let req = Request {
            model: &model,
            path: Path::new("/nonexistent"),
            candidates: &cands,
            pin: Some(&pin),
            epoch: 9,
            coordinator: "12D3KooWpeer0",
            n_ctx: 512,
            use_all_devices: false,
            current: None,
        };
        let Planned::New(p) = make_plan(&req).unwrap() else {
            panic!("a pin is a new plan")
        };
        assert_eq!(p.head().name, "dev2");
        assert_eq!(p.windows(0), vec![12..15, 27..30]);
        assert!(p.pinned);
        let bad = Pin {
            k: 1,
            windows: vec![("dev0".into(), 10)],
            gpu_layers: vec![],
        };
        assert!(make_plan(&Request {
            pin: Some(&bad),
            ..req
        })
        .unwrap_err()
        .contains("30"));
        let gone = Pin {
            k: 1,
            windows: vec![("laptop".into(), 30)],
            gpu_layers: vec![],
        };
        assert!(make_plan(&Request {
            pin: Some(&gone),
            ..req
        })
        .unwrap_err()
        .contains("laptop"));
    }

    /// The real SmolLM2 file (Halda reads its profile) and its ad.
    fn smollm2() -> (std::path::PathBuf, ModelAd) {
        let path = prima_kernels::models_dir()
            .expect("a home directory")
            .join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-models",
            path.display()
        );
        let model = ModelAd {
            name: "smollm2".into(),
            sha256: "s".into(),
            n_layer: 30,
        };
        (path, model)
    }

    /// The memory a speculative draft takes is the head's, not the
    /// ring's: a device whose draft would leave no room for its window is
    /// not made the head.
    #[test]
    fn the_drafts_memory_counts_against_the_head() {
        let (path, model) = smollm2();
        let mut cands = [cand(0), cand(1)];
        let req = |cands: &[Candidate]| {
            let r = Request {
                model: &model,
                path: &path,
                candidates: cands,
                pin: None,
                epoch: 1,
                coordinator: "12D3KooWpeer0",
                n_ctx: 512,
                use_all_devices: false,
                current: None,
            };
            match make_plan(&r).unwrap() {
                Planned::New(p) => p.head().name.clone(),
                Planned::Keep { .. } => unreachable!("no current plan"),
            }
        };
        // Alike devices: the coordinator heads.
        assert_eq!(req(&cands), "dev0");
        // dev0's draft would take all but 8 MiB of the half of its RAM an
        // unprofiled device offers: dev1 heads.
        cands[0].draft_bytes = (8192u64 << 20) / 2 - (8 << 20);
        assert_eq!(req(&cands), "dev1");
    }

    /// A pinned plan carries Halda's memory accounting of its windows, and
    /// the anonymous memory Halda assumes includes the daemon's own
    /// runtime (more on the head), on top of the caches.
    #[test]
    fn pinned_plans_carry_haldas_memory_accounting() {
        let (path, model) = smollm2();
        let mut cands = [cand(0), cand(1), cand(2)];
        cands[2].memory_budget = Some(40 << 20);
        let pin = Pin {
            k: 1,
            windows: vec![("dev1".into(), 4), ("dev0".into(), 10), ("dev2".into(), 16)],
            gpu_layers: vec![],
        };
        let r = Request {
            model: &model,
            path: &path,
            candidates: &cands,
            pin: Some(&pin),
            epoch: 1,
            coordinator: "12D3KooWpeer0",
            n_ctx: 512,
            use_all_devices: false,
            current: None,
        };
        let Planned::New(p) = make_plan(&r).unwrap() else {
            panic!("a pin is a new plan")
        };
        let runtime = crate::modelprof::RUNTIME_BYTES;
        let head_extra = crate::modelprof::HEAD_RUNTIME_BYTES;
        let anon: Vec<u64> = p.devices.iter().map(|d| d.anon_bytes.unwrap()).collect();
        // SmolLM2: 3 x 64 f16 key and value dims per layer and position.
        let kv = |w: u64| w * 512 * 2 * 2 * 192;
        assert!(anon[0] >= runtime + head_extra + kv(4), "{anon:?}");
        assert!(
            anon[1] >= runtime + kv(10) && anon[1] < runtime + head_extra,
            "{anon:?}"
        );
        assert!(anon[2] > anon[1], "{anon:?}");
        // The 40 MiB device is over its budget and re-reads from disk.
        let d2 = &p.devices[2];
        assert_eq!(d2.ram_budget_bytes, Some(40 << 20));
        assert!(d2.ram_bytes.unwrap() > 40 << 20);
        assert!(d2.disk_bytes_per_token.unwrap() > 0);
        assert_eq!(p.devices[1].disk_bytes_per_token, Some(0));
    }
}
