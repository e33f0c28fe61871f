//! Exhaustive reference search for small instances, independent of the MILP:
//! it enumerates every k, every window vector (with device selection: w = 0
//! allowed except for the head), every GPU-layer count and every ring order,
//! and scores each plan with the evaluators of [`crate::cost`]. It exists to
//! verify [`crate::Mode::Optimal`] and is limited to
//! [`MAX_DEVICES`] devices and [`MAX_LAYERS`] layers.

use crate::cost::{ring_total, shipped_eval, Assignment, Ctx};
use crate::error::{HaldaError, Result};
use crate::plan::{Objective, Options};
use crate::profile::{DeviceProfile, ModelProfile};

/// Largest device count accepted.
pub const MAX_DEVICES: usize = 4;
/// Largest layer count accepted.
pub const MAX_LAYERS: u32 = 24;

/// Best plan found by enumeration and its TPOT under the objective's model
/// (the ring model, or the shipped model's §4.5 formula).
pub fn exhaustive(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    n_ctx: u32,
    options: &Options,
) -> Result<Option<(Assignment, f64)>> {
    let ctx = crate::optimal::solving_ctx(
        &Ctx::new(model, devices, n_ctx, options)?,
        options.objective,
    );
    let m = devices.len();
    if m > MAX_DEVICES || model.n_layers > MAX_LAYERS {
        return Err(HaldaError::InvalidOption {
            option: "exhaustive",
            why: format!(
                "limited to {MAX_DEVICES} devices and {MAX_LAYERS} layers, got {m} and {}",
                model.n_layers
            ),
        });
    }
    let select = options.device_selection && m > 1;
    let mut best: Option<(Assignment, f64)> = None;
    for k in options.candidate_ks(ctx.layers)? {
        let wsum = ctx.layers / k;
        let mut w = vec![0u32; m];
        windows(
            &ctx,
            k,
            wsum,
            select,
            0,
            &mut w,
            &mut best,
            options.objective,
        );
    }
    Ok(best)
}

#[allow(clippy::too_many_arguments)]
fn windows(
    ctx: &Ctx,
    k: u32,
    left: u32,
    select: bool,
    i: usize,
    w: &mut Vec<u32>,
    best: &mut Option<(Assignment, f64)>,
    objective: Objective,
) {
    let m = w.len();
    if i == m - 1 {
        let lo = if i == 0 || !select { 1 } else { 0 };
        if left < lo {
            return;
        }
        w[i] = left;
        let mut n = vec![0u32; m];
        gpu(ctx, k, 0, w, &mut n, best, objective);
        return;
    }
    let lo = if i == 0 || !select { 1 } else { 0 };
    for wi in lo..=left {
        w[i] = wi;
        windows(ctx, k, left - wi, select, i + 1, w, best, objective);
    }
}

fn gpu(
    ctx: &Ctx,
    k: u32,
    i: usize,
    w: &[u32],
    n: &mut Vec<u32>,
    best: &mut Option<(Assignment, f64)>,
    objective: Objective,
) {
    if i == w.len() {
        score(ctx, k, w, n, best, objective);
        return;
    }
    let top = w[i].min(ctx.max_gpu_layers(i, k));
    for ni in 0..=top {
        n[i] = ni;
        gpu(ctx, k, i + 1, w, n, best, objective);
    }
    n[i] = 0;
}

fn score(
    ctx: &Ctx,
    k: u32,
    w: &[u32],
    n: &[u32],
    best: &mut Option<(Assignment, f64)>,
    objective: Objective,
) {
    let workers: Vec<usize> = (1..w.len()).filter(|&i| w[i] > 0).collect();
    let mut orders = Vec::new();
    permutations(&mut workers.clone(), 0, &mut orders);
    for mut order in orders {
        order.push(0);
        let total = match objective {
            Objective::Ring => ring_total(ctx, k, w, n, &order),
            Objective::Shipped => Some(shipped_eval(ctx, k, w, n).0.total_ms),
        };
        let Some(total) = total else { continue };
        if best.as_ref().is_none_or(|b| total < b.1) {
            *best = Some((
                Assignment {
                    k,
                    windows: w.to_vec(),
                    gpu_layers: n.to_vec(),
                    ring: Some(order.clone()),
                },
                total,
            ));
        }
        if objective == Objective::Shipped {
            break; // order does not matter
        }
    }
}

fn permutations(v: &mut Vec<usize>, i: usize, out: &mut Vec<Vec<usize>>) {
    if i >= v.len() {
        out.push(v.clone());
        return;
    }
    for j in i..v.len() {
        v.swap(i, j);
        permutations(v, i + 1, out);
        v.swap(i, j);
    }
}
