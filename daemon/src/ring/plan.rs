//! The plan a ring runs: which devices, in which order, with which layer
//! windows; and the exact layer-to-device mapping of prima-spec §1.2.
//!
//! Devices are listed by rank; rank 0 is the **head** (it embeds, samples and
//! holds the last layer). In every round the ranks take their windows in the
//! order 1, 2, …, M−1, 0, so the head's window closes each round and the
//! model's last layer is always the head's. A token therefore travels
//! 0 → 1 → … → M−1 → 0, k times.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Most devices in one ring (prima.cpp's limit too).
pub const MAX_DEVICES: usize = 32;
/// Most rounds (prima.cpp: one subgraph per window, at most 32).
pub const MAX_ROUNDS: u32 = 32;

/// One device of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDevice {
    /// libp2p peer id.
    pub id: String,
    pub name: String,
    /// Layers per round (w_m ≥ 1).
    pub window: u32,
    /// Of those, how many run on a GPU (n_m).
    #[serde(default)]
    pub gpu_layers: u32,
    /// Halda's predicted share of the token time, when it planned.
    #[serde(default)]
    pub share: Option<f64>,
    /// Halda's memory case (M1-M4, prima-spec 4.4), when it planned.
    #[serde(default)]
    pub set: Option<String>,
    /// Memory the device would keep resident under the plan, and its
    /// budget, in bytes (Halda's accounting), when it planned.
    #[serde(default)]
    pub ram_bytes: Option<u64>,
    #[serde(default)]
    pub ram_budget_bytes: Option<u64>,
    /// Of `ram_bytes`, the anonymous part Halda assumed: caches at the
    /// plan's context, compute buffers and the daemon's own runtime.
    #[serde(default)]
    pub anon_bytes: Option<u64>,
    /// Bytes Halda expects the device to re-read from disk per token.
    #[serde(default)]
    pub disk_bytes_per_token: Option<u64>,
}

impl PlanDevice {
    /// A device with a window and nothing Halda would add.
    pub fn new(id: impl Into<String>, name: impl Into<String>, window: u32) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            window,
            gpu_layers: 0,
            share: None,
            set: None,
            ram_bytes: None,
            ram_budget_bytes: None,
            anon_bytes: None,
            disk_bytes_per_token: None,
        }
    }
}

/// A device left out of the plan, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropped {
    pub name: String,
    pub why: String,
}

/// The coordinator's plan, published with an epoch that only grows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingPlan {
    pub epoch: u64,
    /// The coordinator that made it.
    pub coordinator: String,
    /// Registered model name, and the file's sha256 every device must hold.
    pub model: String,
    pub sha256: String,
    pub n_layer: u32,
    /// Rounds per token.
    pub k: u32,
    /// By rank; `devices[0]` is the head.
    pub devices: Vec<PlanDevice>,
    /// Halda's predicted time per output token (ms), when it planned.
    #[serde(default)]
    pub tpot_ms: Option<f64>,
    /// Set by hand (`primactl plan set`), not by Halda.
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub dropped: Vec<Dropped>,
}

impl RingPlan {
    /// W = Σ w_m.
    pub fn window_sum(&self) -> u32 {
        self.devices.iter().map(|d| d.window).sum()
    }

    /// Checks the shape: devices present and distinct, every window ≥ 1,
    /// GPU layers within windows, and L = k·W.
    pub fn validate(&self) -> Result<(), String> {
        let m = self.devices.len();
        if m == 0 {
            return Err("the plan has no devices".into());
        }
        if m > MAX_DEVICES {
            return Err(format!("the plan has {m} devices; at most {MAX_DEVICES}"));
        }
        if self.k == 0 || self.k > MAX_ROUNDS {
            return Err(format!("k = {} rounds; must be 1..={MAX_ROUNDS}", self.k));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if d.window == 0 {
                return Err(format!("device '{}' has an empty window", d.name));
            }
            if d.gpu_layers > d.window {
                return Err(format!(
                    "device '{}' has {} GPU layers in a window of {}",
                    d.name, d.gpu_layers, d.window
                ));
            }
            if self.devices[..i].iter().any(|o| o.id == d.id) {
                return Err(format!("device '{}' appears twice", d.name));
            }
        }
        let w = self.window_sum() as u64;
        if w * self.k as u64 != self.n_layer as u64 {
            return Err(format!(
                "k x W = {} x {} = {} layers, but the model has {}",
                self.k,
                w,
                w * self.k as u64,
                self.n_layer
            ));
        }
        Ok(())
    }

    /// The rank of device `id`, if it is in the plan.
    pub fn rank_of(&self, id: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.id == id)
    }

    /// The name of device `id`, if it is in the plan.
    pub fn name_of(&self, id: &str) -> Option<&str> {
        self.devices
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.name.as_str())
    }

    /// Layer offset of `rank`'s window inside a round (order 1..M−1, 0).
    fn offset(&self, rank: usize) -> u32 {
        let m = self.devices.len();
        let before: Box<dyn Iterator<Item = usize>> = if rank == 0 {
            Box::new(1..m)
        } else {
            Box::new(1..rank)
        };
        before.map(|r| self.devices[r].window).sum()
    }

    /// The layers `rank` runs in each round, round 0 first.
    pub fn windows(&self, rank: usize) -> Vec<Range<usize>> {
        let w = self.window_sum() as usize;
        let off = self.offset(rank) as usize;
        let len = self.devices[rank].window as usize;
        (0..self.k as usize)
            .map(|r| r * w + off..r * w + off + len)
            .collect()
    }

    /// The device that owns global layer `layer` (spec §1.2).
    pub fn owner(&self, layer: usize) -> usize {
        let w = self.window_sum() as usize;
        let c = (layer % w) as u32;
        let m = self.devices.len();
        let mut sum = 0;
        for r in (1..m).chain([0]) {
            sum += self.devices[r].window;
            if c < sum {
                return r;
            }
        }
        0
    }

    /// Where a batch goes after `rank` finishes round `round`: the next
    /// rank and round, or None when the head finished the last round.
    pub fn next_stage(&self, rank: usize, round: u32) -> Option<(usize, u32)> {
        let m = self.devices.len();
        if rank == 0 {
            if round + 1 >= self.k {
                None
            } else if m == 1 {
                Some((0, round + 1))
            } else {
                Some((1, round + 1))
            }
        } else {
            Some(((rank + 1) % m, round))
        }
    }

    /// The first stage after the head embeds a batch.
    pub fn first_stage(&self) -> (usize, u32) {
        if self.devices.len() == 1 {
            (0, 0)
        } else {
            (1, 0)
        }
    }

    /// The rank that sends to `rank` (its predecessor in the ring).
    pub fn prev(&self, rank: usize) -> usize {
        let m = self.devices.len();
        (rank + m - 1) % m
    }

    /// The rank `rank` sends to.
    pub fn next(&self, rank: usize) -> usize {
        (rank + 1) % self.devices.len()
    }

    pub fn head(&self) -> &PlanDevice {
        &self.devices[0]
    }

    /// An id of the work this plan asks for (model, k, devices and windows
    /// in order), the same across epochs that only renumber it.
    pub fn layout_id(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.sha256.as_bytes());
        h.update(self.k.to_le_bytes());
        for d in &self.devices {
            h.update(d.id.as_bytes());
            h.update(d.window.to_le_bytes());
            h.update(d.gpu_layers.to_le_bytes());
        }
        let b = h.finalize();
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// True when `other` asks the devices for the same work (so a device
    /// need not reload): same model, k and windows in the same order.
    pub fn same_layout(&self, other: &RingPlan) -> bool {
        self.sha256 == other.sha256
            && self.k == other.k
            && self.devices.len() == other.devices.len()
            && self
                .devices
                .iter()
                .zip(&other.devices)
                .all(|(a, b)| a.id == b.id && a.window == b.window && a.gpu_layers == b.gpu_layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(windows: &[u32], n_layer: u32, k: u32) -> RingPlan {
        RingPlan {
            epoch: 1,
            coordinator: "c".into(),
            model: "m".into(),
            sha256: "s".into(),
            n_layer,
            k,
            devices: windows
                .iter()
                .enumerate()
                .map(|(i, &w)| PlanDevice::new(format!("p{i}"), format!("d{i}"), w))
                .collect(),
            tpot_ms: None,
            pinned: false,
            dropped: vec![],
        }
    }

    #[test]
    fn spec_worked_example() {
        // prima-spec §1.2: w = [4, 8, 12, 8], L = 64, k = 2.
        let p = plan(&[4, 8, 12, 8], 64, 2);
        p.validate().unwrap();
        assert_eq!(p.windows(1), vec![0..8, 32..40]);
        assert_eq!(p.windows(2), vec![8..20, 40..52]);
        assert_eq!(p.windows(3), vec![20..28, 52..60]);
        assert_eq!(p.windows(0), vec![28..32, 60..64]);
        for l in 0..64 {
            let r = p.owner(l);
            assert!(p.windows(r).iter().any(|w| w.contains(&l)), "layer {l}");
        }
        assert_eq!(p.owner(63), 0, "the head holds the last layer");
    }

    #[test]
    fn stages_walk_every_layer_once_in_order() {
        for (windows, l, k) in [
            (vec![30], 30, 1),
            (vec![5], 30, 6),
            (vec![10, 10, 10], 30, 1),
            (vec![1, 2, 2], 30, 6),
            (vec![3, 9, 3], 30, 2),
        ] {
            let p = plan(&windows, l, k);
            p.validate().unwrap();
            let mut layers = vec![];
            let mut stage = Some(p.first_stage());
            while let Some((rank, round)) = stage {
                layers.extend(p.windows(rank)[round as usize].clone());
                stage = p.next_stage(rank, round);
            }
            assert_eq!(
                layers,
                (0..l as usize).collect::<Vec<_>>(),
                "{windows:?} k={k}"
            );
        }
    }

    #[test]
    fn layout_ids_ignore_the_epoch_only() {
        let a = plan(&[10, 10, 10], 30, 1);
        let mut b = a.clone();
        b.epoch = 7;
        b.pinned = true;
        assert_eq!(a.layout_id(), b.layout_id());
        assert!(a.same_layout(&b));
        let c = plan(&[10, 12, 8], 30, 1);
        assert_ne!(a.layout_id(), c.layout_id());
        let d = plan(&[5, 5, 5], 30, 2);
        assert_ne!(plan(&[10, 10, 10], 30, 1).layout_id(), d.layout_id());
    }

    #[test]
    fn bad_shapes_are_refused_with_reasons() {
        assert!(plan(&[10, 10], 30, 1)
            .validate()
            .unwrap_err()
            .contains("30"));
        assert!(plan(&[10, 0, 20], 30, 1)
            .validate()
            .unwrap_err()
            .contains("empty"));
        assert!(plan(&[], 30, 1).validate().is_err());
        assert!(plan(&[15], 30, 0).validate().is_err());
        let mut p = plan(&[15, 15], 30, 1);
        p.devices[1].id = "p0".into();
        assert!(p.validate().unwrap_err().contains("twice"));
    }
}
