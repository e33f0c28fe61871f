//! Options and the plan returned by [`crate::plan()`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cost::{evaluate_ctx, Assignment, Ctx, DeviceMemory, MemorySet, TpotBreakdown};
use crate::error::{HaldaError, Result};

/// Which scheduler to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// prima.cpp's Halda exactly as spec §4.6–4.8 describes it (set
    /// iteration, calibration, rollback, device selection), every integer
    /// program solved to optimality. For comparison with prima.cpp.
    Shipped,
    /// The global optimum of the chosen cost model over k, windows, GPU
    /// layers, device selection and ring order.
    #[default]
    Optimal,
}

/// What [`Mode::Optimal`] minimises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// primad's ring model: prefetch overlap credit and communication.
    #[default]
    Ring,
    /// The shipped cost model (§4.5; no overlap, no communication). Its
    /// optimum is what the shipped local search should have found.
    Shipped,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shipped => "shipped",
            Mode::Optimal => "optimal",
        })
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Objective::Ring => "ring model",
            Objective::Shipped => "shipped model",
        })
    }
}

/// Scheduler options. Every field has a default, so `{}` is a valid JSON
/// options object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Algorithm (default: optimal).
    pub mode: Mode,
    /// Optimal mode's cost model (default: ring).
    pub objective: Objective,
    /// Force the number of rounds k (prima's `-k/--n-cycles`); must divide L.
    pub k: Option<u32>,
    /// Upper bound on k (e.g. a runtime's subgraph limit, spec §1.3).
    pub max_k: Option<u32>,
    /// The shipped objective divides the head's a_0 by this (prima's
    /// `--master-priority`, default 1.01). Shipped mode only.
    pub master_priority: f64,
    /// Drop devices that do not help (shipped: §4.8 heuristic; optimal:
    /// exact, a device is dropped only if the plan without it is faster).
    pub device_selection: bool,
    /// Ring model: credit prefetching the next window during the other
    /// devices' work (needs k ≥ 2 and room for two windows).
    pub prefetch: bool,
    /// Ring model: cost of a hop between devices with no measured link, ms.
    pub default_hop_ms: f64,
    /// Ring model: fixed communication time per round (ms) instead of the
    /// measured links (the fixture's `comm_ms_per_round`).
    pub comm_ms_per_round: Option<f64>,
    /// The output layer of a Metal head lives in its Metal working set, so
    /// the VRAM row reserves b_o for it (spec §4.6 z^gpu, `keep_out_in_metal`).
    /// On by default: Metal wraps the mapped file, output weights included,
    /// and with it the shipped mode reproduces the README plan (with it off,
    /// calibration sees a free GPU layer on the Mac and forces it into M4).
    pub keep_output_in_metal: bool,
    /// Optimal mode: for every dropped device, solve once more with it kept
    /// to report how much slower that is.
    pub explain: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Optimal,
            objective: Objective::Ring,
            k: None,
            max_k: None,
            master_priority: 1.01,
            device_selection: true,
            prefetch: true,
            default_hop_ms: 0.0,
            comm_ms_per_round: None,
            keep_output_in_metal: true,
            explain: true,
        }
    }
}

impl Options {
    /// Rejects non-finite or negative numbers.
    pub fn validate(&self) -> Result<()> {
        if !(self.master_priority.is_finite() && self.master_priority > 0.0) {
            return Err(HaldaError::InvalidOption {
                option: "master_priority",
                why: format!("must be finite and > 0, got {}", self.master_priority),
            });
        }
        if !(self.default_hop_ms.is_finite() && self.default_hop_ms >= 0.0) {
            return Err(HaldaError::InvalidOption {
                option: "default_hop_ms",
                why: format!("must be finite and >= 0, got {}", self.default_hop_ms),
            });
        }
        if let Some(c) = self.comm_ms_per_round {
            if !(c.is_finite() && c >= 0.0) {
                return Err(HaldaError::InvalidOption {
                    option: "comm_ms_per_round",
                    why: format!("must be finite and >= 0, got {c}"),
                });
            }
        }
        Ok(())
    }

    /// Candidate k values (spec §4.7 step 2): the forced k, or every divisor
    /// of L with k ≤ L/2 (so W ≥ 2; k = 1 when L = 1), capped by `max_k`.
    pub fn candidate_ks(&self, layers: u32) -> Result<Vec<u32>> {
        if let Some(k) = self.k {
            if k == 0 || !layers.is_multiple_of(k) {
                return Err(HaldaError::BadK {
                    k,
                    layers,
                    why: "a forced k must be a positive divisor of L (L = k·W)".into(),
                });
            }
            if let Some(mk) = self.max_k {
                if k > mk {
                    return Err(HaldaError::BadK {
                        k,
                        layers,
                        why: format!("exceeds max_k = {mk}"),
                    });
                }
            }
            return Ok(vec![k]);
        }
        let cap = self.max_k.unwrap_or(u32::MAX);
        if cap == 0 {
            return Err(HaldaError::BadK {
                k: 0,
                layers,
                why: "max_k must be at least 1".into(),
            });
        }
        let top = (layers / 2).max(1);
        Ok((1..=top.min(cap))
            .filter(|k| layers.is_multiple_of(*k))
            .collect())
    }
}

/// One device's part of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicePlan {
    /// Device name.
    pub name: String,
    /// w_m: layers per window (0 = not used).
    pub window: u32,
    /// n_m: GPU layers per window.
    pub gpu_layers: u32,
    /// k·w_m: layers on the device in total.
    pub total_layers: u32,
    /// Shipped memory set (§4.4) of the device under this plan; `None` if
    /// unused.
    pub set: Option<MemorySet>,
    /// Shipped mode only: the calibration forced the device into M4.
    pub forced_m4: bool,
    /// Memory use against the budgets.
    pub memory: DeviceMemory,
    /// Share of the ring-model TPOT spent in this device's compute and
    /// exposed disk reads.
    pub time_share: f64,
    /// Same under the shipped model.
    pub shipped_time_share: f64,
    /// Why the device holds no layers, if it was dropped.
    pub dropped: Option<String>,
}

/// A schedule: k, per-device windows and GPU layers, ring order, and the
/// predicted TPOT under both models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Algorithm that produced it.
    pub mode: Mode,
    /// Objective (meaningful for optimal mode).
    pub objective: Objective,
    /// Rounds per token.
    pub k: u32,
    /// W = Σ w_m = L / k.
    pub window_sum: u32,
    /// Ring order of the active devices (input indices), head last.
    pub ring: Vec<usize>,
    /// One entry per input device, in input order.
    pub devices: Vec<DevicePlan>,
    /// Predicted TPOT under the model this mode optimises (shipped mode and
    /// the shipped objective: shipped model; otherwise the ring model), ms.
    pub tpot_ms: f64,
    /// Shipped-model breakdown.
    pub shipped: TpotBreakdown,
    /// Ring-model breakdown; `None` if the plan breaks a ring-model hard
    /// limit (only possible for shipped-mode plans; see `notes`).
    pub ring_model: Option<TpotBreakdown>,
    /// What the algorithm did (iterations, calibrations, roll-backs, ...).
    pub notes: Vec<String>,
}

impl Plan {
    /// The plan as an [`Assignment`] (to re-evaluate it, e.g. with other
    /// options).
    pub fn assignment(&self) -> Assignment {
        Assignment {
            k: self.k,
            windows: self.devices.iter().map(|d| d.window).collect(),
            gpu_layers: self.devices.iter().map(|d| d.gpu_layers).collect(),
            ring: Some(self.ring.clone()),
        }
    }

    /// Ring-model TPOT, or +∞ when the ring model rejects the plan.
    pub fn ring_tpot_ms(&self) -> f64 {
        self.ring_model
            .as_ref()
            .map_or(f64::INFINITY, |r| r.total_ms)
    }

    /// Shipped-model TPOT.
    pub fn shipped_tpot_ms(&self) -> f64 {
        self.shipped.total_ms
    }
}

/// Assembles a [`Plan`] from a solution, evaluating it under both models.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_plan(
    ctx: &Ctx,
    mode: Mode,
    objective: Objective,
    k: u32,
    windows: Vec<u32>,
    gpu_layers: Vec<u32>,
    ring: Option<Vec<usize>>,
    forced: &[bool],
    dropped: Vec<Option<String>>,
    mut notes: Vec<String>,
) -> Result<Plan> {
    let a = Assignment {
        k,
        windows,
        gpu_layers,
        ring,
    };
    let (shipped, sets, ring_model, memory, order) = match evaluate_ctx(ctx, &a) {
        Ok((e, order)) => (e.shipped, e.sets, Some(e.ring), e.memory, order),
        Err(HaldaError::InvalidPlan(why))
            if mode == Mode::Shipped || objective == Objective::Shipped =>
        {
            // The shipped model lets KV overflow to disk; the ring model does
            // not. Report the plan anyway, with the shipped figures.
            notes.push(format!("ring model rejects this plan: {why}"));
            let (s, sets) = crate::cost::shipped_eval(ctx, a.k, &a.windows, &a.gpu_layers);
            let mem = (0..ctx.devs.len())
                .map(|m| {
                    crate::cost::ring_device_memory(ctx, m, a.k, a.windows[m], a.gpu_layers[m])
                })
                .collect();
            let active: Vec<usize> = (0..a.windows.len()).filter(|&i| a.windows[i] > 0).collect();
            (s, sets, None, mem, crate::ring::default_order(&active))
        }
        Err(e) => return Err(e),
    };
    let tpot_ms = match (mode, objective, &ring_model) {
        (Mode::Optimal, Objective::Ring, Some(r)) => r.total_ms,
        _ => shipped.total_ms,
    };
    let devices = ctx
        .devs
        .iter()
        .enumerate()
        .map(|(m, d)| DevicePlan {
            name: d.name.clone(),
            window: a.windows[m],
            gpu_layers: a.gpu_layers[m],
            total_layers: a.k * a.windows[m],
            set: sets[m],
            forced_m4: forced.get(m).copied().unwrap_or(false),
            memory: memory[m].clone(),
            time_share: ring_model.as_ref().map_or(0.0, |r| r.devices[m].share),
            shipped_time_share: shipped.devices[m].share,
            dropped: dropped.get(m).cloned().flatten(),
        })
        .collect();
    Ok(Plan {
        mode,
        objective,
        k: a.k,
        window_sum: a.windows.iter().sum(),
        ring: order,
        devices,
        tpot_ms,
        shipped,
        ring_model,
        notes,
    })
}

fn gb(x: f64) -> f64 {
    x / 1e9
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .ring
            .iter()
            .map(|&i| self.devices[i].name.as_str())
            .collect();
        let what = match self.mode {
            Mode::Shipped => "shipped".to_string(),
            Mode::Optimal => format!("optimal, objective {}", self.objective),
        };
        writeln!(
            f,
            "Halda plan ({what}): k = {}, W = {}, ring {}",
            self.k,
            self.window_sum,
            names.join(" -> ")
        )?;
        writeln!(
            f,
            "  {:<24} {:>3} {:>4} {:>4} {:>5}  {:>17}  {:>15}  {:>9}  {:>6} {:>6}",
            "device",
            "set",
            "w",
            "n",
            "k*w",
            "RAM dem/budg GB",
            "VRAM use/bud GB",
            "disk GB/t",
            "ring%",
            "ship%"
        )?;
        for d in &self.devices {
            let set = d.set.map_or("-".to_string(), |s| {
                if d.forced_m4 {
                    format!("{s}*")
                } else {
                    s.to_string()
                }
            });
            writeln!(
                f,
                "  {:<24} {:>3} {:>4} {:>4} {:>5}  {:>8.2}/{:<8.2}  {:>7.2}/{:<7.2}  {:>9.3}  {:>5.1}% {:>5.1}%",
                d.name,
                set,
                d.window,
                d.gpu_layers,
                d.total_layers,
                gb(d.memory.ram_demand_bytes),
                gb(d.memory.ram_budget_bytes),
                gb(d.memory.vram_used_bytes),
                gb(d.memory.vram_budget_bytes),
                gb(d.memory.disk_bytes_per_token),
                100.0 * d.time_share,
                100.0 * d.shipped_time_share
            )?;
            if let Some(r) = &d.dropped {
                writeln!(f, "      dropped: {r}")?;
            }
        }
        let s = &self.shipped;
        writeln!(
            f,
            "  shipped model: TPOT {:.1} ms = compute {:.1} + disk {:.1} + constant {:.1}",
            s.total_ms, s.compute_ms, s.disk_ms, s.constant_ms
        )?;
        match &self.ring_model {
            Some(r) => writeln!(
                f,
                "  ring model:    TPOT {:.1} ms = compute {:.1} + disk {:.1} - overlap {:.1} + comm {:.1} + constant {:.1}",
                r.total_ms, r.compute_ms, r.disk_ms, r.overlap_credit_ms, r.comm_ms, r.constant_ms
            )?,
            None => writeln!(f, "  ring model:    (plan outside the ring model's limits)")?,
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_ks_are_divisors_up_to_half() {
        let o = Options::default();
        assert_eq!(
            o.candidate_ks(80).unwrap(),
            vec![1, 2, 4, 5, 8, 10, 16, 20, 40]
        );
        assert_eq!(o.candidate_ks(1).unwrap(), vec![1]);
        let o = Options {
            max_k: Some(8),
            ..Options::default()
        };
        assert_eq!(o.candidate_ks(80).unwrap(), vec![1, 2, 4, 5, 8]);
        let o = Options {
            k: Some(3),
            ..Options::default()
        };
        let e = o.candidate_ks(80).unwrap_err();
        assert!(
            e.to_string().contains("k = 3") && e.to_string().contains("L = 80"),
            "{e}"
        );
    }

    #[test]
    fn options_json_defaults() {
        let o: Options = serde_json::from_str("{}").unwrap();
        assert_eq!(o, Options::default());
        let o: Options = serde_json::from_str(r#"{"mode":"shipped","k":2}"#).unwrap();
        assert_eq!(o.mode, Mode::Shipped);
        assert_eq!(o.k, Some(2));
    }
}
