//! prima.cpp's Halda as shipped (spec §4.6–4.8), reproduced step by step so
//! that primad's plans can be compared with prima.cpp's.
//!
//! * §4.7 step 1: memory-proportional initial windows, n = w on GPU devices.
//! * Loop: classify into M1..M4 (§4.4) from the current (w, n) and
//!   k_cur = L/W; stop when the sets repeat; build a, b, κ, z, z^gpu (§4.5,
//!   §4.6); solve the integer program of §4.6 for every candidate k with
//!   `good_lp` + `microlp` (to optimality); keep the k with the smallest
//!   objective (ties go to the smaller k); roll back if nothing is feasible;
//!   calibrate (force the slowest-disk non-M4 device into M4 and retry); adopt
//!   the solution and stop when it repeats.
//! * §4.8: drop every non-head device with w ≤ 1 and re-run on the survivors
//!   until the device list is stable.
//!
//! Where the spec leaves a detail open, the choice is documented at the
//! point of use and in the crate documentation.

use good_lp::{
    constraint, microlp, variable, Expression, ProblemVariables, ResolutionError, Solution,
    SolverModel,
};

use crate::cost::{classify, shipped_coeffs, Ctx, MemorySet};
use crate::error::{HaldaError, Result};
use crate::plan::Options;
use crate::profile::Os;

/// Safety net: the spec's loop has no iteration bound; a cycle of set
/// assignments would spin forever in prima.cpp. We stop after this many.
pub const MAX_ITERATIONS: usize = 64;

/// Result of the shipped algorithm on the full device list.
#[derive(Debug, Clone)]
pub(crate) struct ShippedOutcome {
    pub k: u32,
    pub w: Vec<u32>,
    pub n: Vec<u32>,
    pub forced: Vec<bool>,
    pub dropped: Vec<Option<String>>,
    pub notes: Vec<String>,
}

/// One ILP solution: objective (with the master-priority tweak), k, w, n over
/// the device subset.
#[derive(Debug, Clone)]
struct IlpSol {
    obj: f64,
    k: u32,
    w: Vec<u32>,
    n: Vec<u32>,
}

/// Runs §4.7 + §4.8.
pub(crate) fn run(ctx: &Ctx, opts: &Options) -> Result<ShippedOutcome> {
    let ks = opts.candidate_ks(ctx.layers)?;
    let total = ctx.devs.len();
    let mut idx: Vec<usize> = (0..total).collect();
    let mut dropped: Vec<Option<String>> = vec![None; total];
    let mut notes = Vec::new();
    let mut pass = 1;
    loop {
        let (sol, forced, mut pass_notes) = halda_once(ctx, &idx, &ks, opts)?;
        notes.extend(pass_notes.drain(..).map(|n| format!("pass {pass}: {n}")));
        let to_drop: Vec<usize> = (0..idx.len())
            .filter(|&i| idx[i] != 0 && sol.w[i] <= 1)
            .collect();
        if !opts.device_selection || to_drop.is_empty() {
            let mut w = vec![0; total];
            let mut n = vec![0; total];
            let mut f = vec![false; total];
            for (i, &m) in idx.iter().enumerate() {
                w[m] = sol.w[i];
                n[m] = sol.n[i];
                f[m] = forced[i];
            }
            return Ok(ShippedOutcome {
                k: sol.k,
                w,
                n,
                forced: f,
                dropped,
                notes,
            });
        }
        for &i in &to_drop {
            let m = idx[i];
            dropped[m] = Some(format!(
                "shipped device selection (spec §4.8): pass {pass} gave it w = {} (n = {}), and devices with w <= 1 are dropped",
                sol.w[i], sol.n[i]
            ));
        }
        idx = idx
            .iter()
            .enumerate()
            .filter(|(i, _)| !to_drop.contains(i))
            .map(|(_, &m)| m)
            .collect();
        pass += 1;
    }
}

/// §4.7 step 1 on the subset `idx`.
fn initial(ctx: &Ctx, idx: &[usize]) -> (Vec<i64>, Vec<i64>) {
    let l = ctx.layers as i64;
    let budgets: Vec<f64> = idx.iter().map(|&m| ctx.devs[m].shipped_budget()).collect();
    let sum: f64 = budgets.iter().sum();
    let mut w: Vec<i64> = budgets
        .iter()
        .map(|d| {
            if sum > 0.0 {
                (d / sum * l as f64).round() as i64
            } else {
                0
            }
        })
        .collect();
    if sum <= 0.0 {
        w[0] = l;
    }
    for i in 0..w.len() {
        if w[i] == 0 {
            w[i] = 1;
            let j = argmax_first(&w);
            if w[j] > 1 {
                w[j] -= 1;
            }
        }
    }
    let rem = l - w.iter().sum::<i64>();
    if rem > 0 {
        let j = argmax_first(&budgets);
        w[j] += rem;
    } else if rem < 0 {
        let j = argmin_first(&budgets);
        w[j] += rem;
        // Not in the spec: if that leaves the smallest device below one
        // layer, take the excess from the largest windows instead.
        while w[j] < 1 {
            w[j] += 1;
            let big = argmax_first(&w);
            w[big] -= 1;
        }
    }
    let n = idx
        .iter()
        .zip(&w)
        .map(|(&m, &wi)| if ctx.devs[m].has_gpu { wi } else { 0 })
        .collect();
    (w, n)
}

fn argmax_first<T: PartialOrd + Copy>(v: &[T]) -> usize {
    let mut best = 0;
    for i in 1..v.len() {
        if v[i] > v[best] {
            best = i;
        }
    }
    best
}

fn argmin_first<T: PartialOrd + Copy>(v: &[T]) -> usize {
    let mut best = 0;
    for i in 1..v.len() {
        if v[i] < v[best] {
            best = i;
        }
    }
    best
}

/// One run of §4.7 on the device subset `idx` (head first).
fn halda_once(
    ctx: &Ctx,
    idx: &[usize],
    ks: &[u32],
    opts: &Options,
) -> Result<(IlpSol, Vec<bool>, Vec<String>)> {
    let l = ctx.layers;
    if (l as usize) < idx.len() {
        return Err(HaldaError::Infeasible {
            mode: "shipped",
            detail: format!(
                "L = {l} layers cannot give each of the {} devices the w >= 1 the shipped algorithm requires",
                idx.len()
            ),
        });
    }
    let (w0, n0) = initial(ctx, idx);
    let mut w: Vec<u32> = w0.iter().map(|&x| x.max(0) as u32).collect();
    let mut n: Vec<u32> = n0.iter().map(|&x| x.max(0) as u32).collect();
    let mut forced = vec![false; idx.len()];
    let mut prev_sets: Option<Vec<MemorySet>> = None;
    let mut adopted: Option<IlpSol> = None;
    let mut last_best: Option<IlpSol> = None;
    let mut notes = vec![format!("initial windows {w:?}, GPU layers {n:?}")];
    for iter in 1..=MAX_ITERATIONS {
        let wsum: u32 = w.iter().sum();
        if wsum <= 1 || !l.is_multiple_of(wsum) {
            return Err(HaldaError::Infeasible {
                mode: "shipped",
                detail: format!("window sum W = {wsum} does not divide L = {l} (or is <= 1)"),
            });
        }
        let k_cur = l / wsum;
        let sets: Vec<MemorySet> = idx
            .iter()
            .enumerate()
            .map(|(i, &m)| classify(ctx, m, k_cur, w[i], n[i], forced[i], true))
            .collect();
        if prev_sets.as_ref() == Some(&sets) {
            notes.push(format!("iteration {iter}: sets unchanged, stop"));
            break;
        }
        prev_sets = Some(sets.clone());
        let mut best: Option<IlpSol> = None;
        for &k in ks {
            if let Some(sol) = solve_ilp(ctx, idx, &sets, k, opts)? {
                // Strictly smaller only (relative tolerance): k > 1 can at
                // best tie with k = 1 in this model, and a floating-point
                // tie must not flip the choice.
                let better = match &best {
                    None => true,
                    Some(b) => sol.obj < b.obj - 1e-9 * b.obj.abs().max(1.0),
                };
                if better {
                    best = Some(sol);
                }
            }
        }
        let Some(best) = best else {
            // §4.7 e: roll back, or fail where prima.cpp asserts.
            match last_best.or(adopted) {
                Some(prev) => {
                    notes.push(format!(
                        "iteration {iter}: no k feasible for sets {}; rolled back to the previous solution",
                        fmt_sets(&sets)
                    ));
                    return Ok((prev, forced, notes));
                }
                None => {
                    return Err(HaldaError::Infeasible {
                        mode: "shipped",
                        detail: diagnose(ctx, idx, &sets, ks),
                    })
                }
            }
        };
        notes.push(format!(
            "iteration {iter}: sets {} -> best k = {}, w = {:?}, n = {:?} (objective {:.1} ms)",
            fmt_sets(&sets),
            best.k,
            best.w,
            best.n,
            best.obj
        ));
        last_best = Some(best.clone());
        // §4.7 f: calibration.
        let weak = best
            .w
            .iter()
            .zip(&best.n)
            .any(|(&wi, &ni)| wi == 1 && ni == 0);
        let mut free_gpu = false;
        let mut gpu_over = false;
        let mut cpu_over = false;
        for (i, &m) in idx.iter().enumerate() {
            let d = &ctx.devs[m];
            if d.has_gpu {
                if best.n[i] < ctx.max_gpu_layers(m, best.k) {
                    free_gpu = true;
                }
                if best.w[i] > best.n[i] {
                    gpu_over = true;
                }
            } else if sets[i] != MemorySet::M4 {
                cpu_over = true;
            }
        }
        if !weak && free_gpu && (gpu_over || cpu_over) {
            let victim = (0..idx.len())
                .filter(|&i| sets[i] != MemorySet::M4)
                .min_by(|&a, &b| {
                    ctx.devs[idx[a]]
                        .disk_gbps
                        .total_cmp(&ctx.devs[idx[b]].disk_gbps)
                });
            if let Some(v) = victim {
                forced[v] = true;
                notes.push(format!(
                    "iteration {iter}: calibration forces {} (slowest disk outside M4) into M4",
                    ctx.devs[idx[v]].name
                ));
                continue;
            }
        }
        // §4.7 g: adopt.
        let same = best.w == w && best.n == n;
        w.clone_from(&best.w);
        n.clone_from(&best.n);
        adopted = Some(best);
        if same {
            notes.push(format!("iteration {iter}: solution repeated, stop"));
            break;
        }
        if iter == MAX_ITERATIONS {
            notes.push(format!(
                "stopped after {MAX_ITERATIONS} iterations (safety net)"
            ));
        }
    }
    match adopted.or(last_best) {
        Some(sol) => Ok((sol, forced, notes)),
        None => Err(HaldaError::Infeasible {
            mode: "shipped",
            detail: "the iteration ended without any feasible integer program".into(),
        }),
    }
}

fn fmt_sets(s: &[MemorySet]) -> String {
    s.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// W·z_m of the RAM row (§4.6), i.e. the row's right-hand side up to sign.
fn ram_rhs(ctx: &Ctx, m: usize, set: MemorySet, k: u32) -> f64 {
    let d = &ctx.devs[m];
    let bcio = d.h + d.c_cpu;
    let swap = if d.os == Os::Android { d.swap } else { 0.0 };
    // W·z = W·X/(L·b') = X/(k·b').
    let per = k as f64 * ctx.bp;
    match set {
        MemorySet::M1 => (d.ram_avail - bcio) / per,
        MemorySet::M2 => (d.vram_free - bcio - d.c_gpu) / per,
        MemorySet::M3 => (d.ram_avail + swap - bcio) / per,
        MemorySet::M4 => -(kind_budget(ctx, m) - bcio) / per,
    }
}

/// The budget of the M4 row for the device's kind (§4.6 z_m for M4): d on
/// macOS without Metal, g − c^gpu with Metal, otherwise d (+ swap on Android).
fn kind_budget(ctx: &Ctx, m: usize) -> f64 {
    let d = &ctx.devs[m];
    if d.metal_shared {
        d.vram_free - d.c_gpu
    } else if d.os == Os::Android {
        d.ram_avail + d.swap
    } else {
        d.ram_avail
    }
}

/// The integer program of §4.6 for one k and one classification.
fn solve_ilp(
    ctx: &Ctx,
    idx: &[usize],
    sets: &[MemorySet],
    k: u32,
    opts: &Options,
) -> Result<Option<IlpSol>> {
    let l = ctx.layers;
    let wsum = l / k;
    let mut pv = ProblemVariables::new();
    let mut wv = Vec::with_capacity(idx.len());
    let mut nv = Vec::with_capacity(idx.len());
    let mut obj = Expression::from(0.0);
    for (i, &m) in idx.iter().enumerate() {
        let (mut a, b, _) = shipped_coeffs(ctx, m, sets[i]);
        if m == 0 {
            a /= opts.master_priority;
        }
        let w = pv.add(variable().integer().min(1).max(l as f64));
        let n = pv.add(variable().integer().min(0).max(l as f64));
        obj += (k as f64 * a) * w + (k as f64 * b) * n;
        wv.push(w);
        nv.push(n);
    }
    let mut model = pv.minimise(obj.clone()).using(microlp);
    let total: Expression = wv.iter().copied().sum();
    model.add_constraint(constraint!(total == wsum as f64));
    for (i, &m) in idx.iter().enumerate() {
        let d = &ctx.devs[m];
        let (w, n) = (wv[i], nv[i]);
        model.add_constraint(constraint!(n - w <= 0.0));
        let rhs = ram_rhs(ctx, m, sets[i], k);
        let gpu = if d.has_gpu { 1.0 } else { 0.0 };
        match sets[i] {
            MemorySet::M1 | MemorySet::M2 => {
                model.add_constraint(constraint!(-1.0 * w <= -rhs));
            }
            MemorySet::M3 => {
                model.add_constraint(constraint!(-1.0 * w + gpu * n <= -rhs));
            }
            MemorySet::M4 => {
                let c = if d.has_gpu && d.os != Os::Macos {
                    1.0
                } else {
                    0.0
                };
                model.add_constraint(constraint!(w - c * n <= -rhs));
            }
        }
        let vram = ctx.vram_cap(m) / (k as f64 * ctx.bp);
        model.add_constraint(constraint!(n <= vram.max(0.0)));
    }
    match model.solve() {
        Ok(sol) => {
            let w: Vec<u32> = wv
                .iter()
                .map(|&v| sol.value(v).round().max(0.0) as u32)
                .collect();
            let n: Vec<u32> = nv
                .iter()
                .map(|&v| sol.value(v).round().max(0.0) as u32)
                .collect();
            let objv = idx
                .iter()
                .enumerate()
                .map(|(i, &m)| {
                    let (mut a, b, _) = shipped_coeffs(ctx, m, sets[i]);
                    if m == 0 {
                        a /= opts.master_priority;
                    }
                    k as f64 * (a * w[i] as f64 + b * n[i] as f64)
                })
                .sum();
            Ok(Some(IlpSol { obj: objv, k, w, n }))
        }
        Err(ResolutionError::Infeasible) => Ok(None),
        Err(e) => Err(HaldaError::Solver {
            k,
            message: e.to_string(),
        }),
    }
}

/// Explains why the first integer programs are infeasible, naming numbers.
fn diagnose(ctx: &Ctx, idx: &[usize], sets: &[MemorySet], ks: &[u32]) -> String {
    let mut parts = Vec::new();
    for &k in ks {
        let wsum = ctx.layers / k;
        if (wsum as usize) < idx.len() {
            parts.push(format!(
                "k = {k}: W = L/k = {wsum} layers per round is fewer than the {} devices, each of which must hold w >= 1",
                idx.len()
            ));
            continue;
        }
        let mut why = Vec::new();
        for (i, &m) in idx.iter().enumerate() {
            let d = &ctx.devs[m];
            let rhs = ram_rhs(ctx, m, sets[i], k);
            let maxn = ctx.max_gpu_layers(m, k).min(1) as f64;
            if sets[i] == MemorySet::M4 {
                let c = if d.has_gpu && d.os != Os::Macos {
                    maxn
                } else {
                    0.0
                };
                if 1.0 - c > -rhs + 1e-9 {
                    let need = k as f64 * ctx.bp * (1.0 - c) + d.h + d.c_cpu;
                    let budget = kind_budget(ctx, m);
                    why.push(format!(
                        "{} (M4) cannot hold one layer: k·b' + resident extras = {:.0} bytes > budget {:.0} bytes",
                        d.name, need, budget
                    ));
                }
            } else if rhs > (wsum as f64 - (idx.len() as f64 - 1.0)) + 1e-9 {
                why.push(format!(
                    "{} ({}) must stay memory-insufficient, which needs w >= {:.2}, more than the {} layers left for it",
                    d.name,
                    sets[i],
                    rhs,
                    wsum as usize - (idx.len() - 1)
                ));
            }
        }
        if why.is_empty() {
            why.push("the set rows of §4.6 cannot be met together".into());
        }
        parts.push(format!("k = {k} (W = {wsum}): {}", why.join("; ")));
    }
    format!(
        "every integer program of the first iteration is infeasible (prima.cpp asserts here): {}",
        parts.join(" | ")
    )
}
