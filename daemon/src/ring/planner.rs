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
}

pub struct Request<'a> {
    pub model: &'a ModelAd,
    pub path: &'a Path,
    /// Index 0 is the coordinator, which becomes the head under Halda.
    pub candidates: &'a [Candidate],
    pub pin: Option<&'a Pin>,
    pub epoch: u64,
    pub coordinator: &'a str,
    pub n_ctx: u32,
    pub use_all_devices: bool,
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
pub fn make_plan(r: &Request) -> Result<RingPlan, String> {
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
        let mut devices = Vec::new();
        for (name, w) in &pin.windows {
            let c = r
                .candidates
                .iter()
                .find(|c| &c.name == name || &c.id == name)
                .ok_or_else(|| {
                    format!("the pinned device '{name}' is not live or does not hold the model")
                })?;
            devices.push(PlanDevice::new(c.id.clone(), c.name.clone(), *w));
        }
        let dropped = r
            .candidates
            .iter()
            .filter(|c| !devices.iter().any(|d| d.id == c.id))
            .map(|c| Dropped {
                name: c.name.clone(),
                why: "not in the pinned plan".into(),
            })
            .collect();
        let p = RingPlan {
            k: pin.k,
            devices,
            pinned: true,
            dropped,
            ..base
        };
        p.validate()?;
        return Ok(p);
    }
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
        devices.push(d);
    }
    for (d, c) in devices.iter_mut().zip(r.candidates) {
        d.links = c
            .links
            .iter()
            .filter_map(|(peer, rtt)| {
                let i = r.candidates.iter().position(|o| &o.name == peer)?;
                Some(halda::Link {
                    peer: names[i].clone(),
                    rtt_ms: *rtt,
                    bandwidth_mbit_s: 0.0,
                })
            })
            .collect();
    }
    let opts = halda::Options {
        device_selection: !r.use_all_devices,
        ..halda::Options::default()
    };
    let hp = halda::plan(&mp, &devices, r.n_ctx, &opts).map_err(|e| e.to_string())?;
    // Halda's ring lists the active devices with the head last; ranks put
    // the head first.
    let mut order: Vec<usize> = vec![0];
    order.extend(hp.ring.iter().copied().filter(|&i| i != 0));
    if hp.devices[0].window == 0 {
        return Err("Halda left the coordinator out; it must be the head".into());
    }
    let devices_out = order
        .iter()
        .map(|&i| {
            let d = &hp.devices[i];
            PlanDevice {
                id: r.candidates[i].id.clone(),
                name: r.candidates[i].name.clone(),
                window: d.window,
                gpu_layers: d.gpu_layers,
                share: Some(d.time_share),
                set: d.set.map(|s| s.to_string()),
                ram_bytes: Some(d.memory.ram_demand_bytes as u64),
                ram_budget_bytes: Some(d.memory.ram_budget_bytes as u64),
                disk_bytes_per_token: Some(d.memory.disk_bytes_per_token as u64),
            }
        })
        .collect();
    let dropped = hp
        .devices
        .iter()
        .zip(r.candidates)
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
    Ok(p)
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
        };
        let p = make_plan(&req).unwrap();
        assert_eq!(p.head().name, "dev2");
        assert_eq!(p.windows(0), vec![12..15, 27..30]);
        assert!(p.pinned);
        let bad = Pin {
            k: 1,
            windows: vec![("dev0".into(), 10)],
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
        };
        assert!(make_plan(&Request {
            pin: Some(&gone),
            ..req
        })
        .unwrap_err()
        .contains("laptop"));
    }
}
