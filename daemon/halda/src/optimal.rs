//! The optimal mode: the global optimum of the ring model (or of the shipped
//! model, with [`Objective::Shipped`]) over k, windows, GPU layers, device
//! selection and ring order.
//!
//! Instead of iterating on M1..M4 sets (which makes the shipped algorithm a
//! local search, halda README point 1), each device's disk term is modelled
//! directly, for every candidate k, in one mixed-integer program solved by
//! `good_lp` + `microlp`:
//!
//! ```text
//! variables  w_m ∈ {0..W} (head ≥ 1), n_m ∈ {0..n^max_m}, x_m ∈ {0,1} (in use),
//!            O_m ≥ 0 (disk bytes per token), e_m ∈ {0,1} (Metal working set
//!            exceeded), π_m ∈ {0,1} (two windows fit: prefetch overlaps),
//!            q_m, p_m ≥ 0 (load per round on / off the critical path), T
//! minimise   k·T
//! subject to Σ w_m = W;  x_m ≤ w_m ≤ W·x_m;  n_m ≤ w_m
//!            anonymous memory:  k·kv·(w_m − n_m) + c^cpu_m·x_m ≤ d_m
//!            overflow (Linux):  O_m ≥ k·b'·(w_m − n_m) + (h_m + c^cpu_m)·x_m − d_m
//!            Metal (M2 step):   k·b'·w_m + (h + c^cpu + c^gpu)·x_m − g_m ≤ M·e_m,
//!                               O_m ≥ k·b·w_m + h_m·x_m − M·(1 − e_m)
//!            load split:        q_m + p_m ≥ τ_m(O_m)/k,  p_m ≤ M·π_m
//!            pair fit:          2·b'·(w_m − n_m) + (h + c^cpu)·x_m − d_m ≤ M·(1 − π_m)
//!            ring round:        T ≥ Σ_m (α_m w_m + β_m n_m + q_m) + C
//!            own cycle:         T ≥ α_m w_m + β_m n_m + q_m + p_m      ∀m
//! ```
//!
//! (π only exists for k ≥ 2 with prefetch on; without it the whole load sits
//! in the round sum, which is the shipped model.) The VRAM row is the bound
//! n^max_m = ⌊(g − c^gpu)/(k·b')⌋. The MILP is exact for the ring model as
//! evaluated by [`crate::cost`], and every solution is re-scored by that
//! evaluator, which is what the returned plan reports.
//!
//! **Device selection** is the binaries x_m, so a device is dropped only
//! when the plan without it is better. **Communication** C depends on which
//! devices take part; the shortest ring through a set S is computed exactly
//! (Held–Karp). The MILP uses a linear lower bound
//! C ≥ Σ_m x_m·(min in-hop + min out-hop)/2; whenever the chosen set's true
//! ring costs more than the bound, the set is re-solved with its exact C and
//! excluded by a no-good cut, and the loop continues until the bound cannot
//! beat the incumbent (combinatorial Benders). Candidate k values are pruned
//! with an objective cut-off at the incumbent.

use good_lp::{
    constraint, microlp, variable, Expression, ProblemVariables, ResolutionError, Solution,
    SolverModel, Variable,
};

use crate::cost::{ring_total, Ctx};
use crate::error::{HaldaError, Result};
use crate::plan::{Objective, Options};
use crate::ring::best_order;

/// Result of the optimal search.
#[derive(Debug, Clone)]
pub(crate) struct OptOutcome {
    pub k: u32,
    pub w: Vec<u32>,
    pub n: Vec<u32>,
    pub order: Vec<usize>,
    pub dropped: Vec<Option<String>>,
    pub notes: Vec<String>,
}

/// Which devices may or must take part.
#[derive(Debug, Clone)]
enum Active {
    /// x_m free (head always in) when selection is on; all in otherwise.
    Free,
    /// Exactly these devices.
    Fixed(Vec<bool>),
}

/// Communication term of the MILP.
#[derive(Debug, Clone, Copy)]
enum Comm {
    /// C = 0 (shipped objective, or no hop costs).
    Zero,
    /// C = c whenever at least two devices take part.
    PerRound(f64),
    /// Linear lower bound from the hop matrix (needs a Benders check).
    LowerBound,
}

#[derive(Debug, Clone)]
struct MilpSol {
    w: Vec<u32>,
    n: Vec<u32>,
}

impl MilpSol {
    fn active(&self) -> Vec<bool> {
        self.w.iter().map(|&w| w > 0).collect()
    }
}

#[derive(Debug, Clone)]
struct Cand {
    total: f64,
    k: u32,
    w: Vec<u32>,
    n: Vec<u32>,
    order: Vec<usize>,
}

/// The context the MILP optimises: the ring model as configured, or the
/// shipped model (no overlap, no communication).
pub(crate) fn solving_ctx(ctx: &Ctx, objective: Objective) -> Ctx {
    let mut c = ctx.clone();
    if objective == Objective::Shipped {
        c.prefetch = false;
        c.anon_limit = false;
        c.comm_override = None;
        for row in &mut c.hop_ms {
            row.iter_mut().for_each(|h| *h = 0.0);
        }
    }
    c
}

/// Per-device lower bound of its hop contribution: (min in + min out)/2.
fn hop_lower_bounds(ctx: &Ctx) -> Vec<f64> {
    let m = ctx.devs.len();
    (0..m)
        .map(|i| {
            let min_in = (0..m)
                .filter(|&j| j != i)
                .map(|j| ctx.hop_ms[j][i])
                .fold(f64::INFINITY, f64::min);
            let min_out = (0..m)
                .filter(|&j| j != i)
                .map(|j| ctx.hop_ms[i][j])
                .fold(f64::INFINITY, f64::min);
            if min_in.is_finite() && min_out.is_finite() {
                (min_in + min_out) / 2.0
            } else {
                0.0
            }
        })
        .collect()
}

fn active_list(a: &[bool]) -> Vec<usize> {
    (0..a.len()).filter(|&i| a[i]).collect()
}

/// A cheap lower bound on the TPOT of any plan with this k: every layer runs
/// somewhere, at best on a GPU slot (device m has k·n^max_m of them, each
/// costing α_m + β_m) or on the fastest CPU; disk, communication and the
/// head's w ≥ 1 are ignored. Used to skip k values that cannot win.
fn compute_lower_bound(ctx: &Ctx, k: u32) -> f64 {
    let mut slots: Vec<(f64, u64)> = Vec::new();
    let mut cpu_best = f64::INFINITY;
    for (m, d) in ctx.devs.iter().enumerate() {
        cpu_best = cpu_best.min(d.alpha);
        if d.has_gpu {
            let n = ctx.max_gpu_layers(m, k).min(ctx.layers / k) as u64 * k as u64;
            if n > 0 {
                slots.push((d.alpha + d.beta, n));
            }
        }
    }
    slots.push((cpu_best, u64::MAX));
    slots.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut left = ctx.layers as u64;
    let mut total = 0.0;
    for (cost, cap) in slots {
        let take = left.min(cap);
        total += take as f64 * cost;
        left -= take;
        if left == 0 {
            break;
        }
    }
    total + ctx.ring_constant_ms()
}

/// Runs the optimal search on `ctx` (already the solving context).
pub(crate) fn run(ctx: &Ctx, opts: &Options) -> Result<OptOutcome> {
    let ks = opts.candidate_ks(ctx.layers)?;
    let m = ctx.devs.len();
    let select = opts.device_selection && m > 1;
    let hops_zero = ctx.hop_ms.iter().flatten().all(|&h| h == 0.0);
    let base_comm = match ctx.comm_override {
        Some(c) => Comm::PerRound(c),
        None if hops_zero => Comm::Zero,
        None if !select => Comm::PerRound(best_order(ctx, &(0..m).collect::<Vec<_>>()).1),
        None => Comm::LowerBound,
    };
    let lbs = hop_lower_bounds(ctx);
    let mut best: Option<Cand> = None;
    let mut milps = 0usize;
    let mut notes = Vec::new();
    // k = 1 first is as good an order as any: it is usually competitive and
    // gives the cut-off early.
    for &k in &ks {
        if let Some(b) = &best {
            if compute_lower_bound(ctx, k) >= b.total * (1.0 - 1e-9) {
                continue;
            }
        }
        let mut nogoods: Vec<Vec<bool>> = Vec::new();
        let max_rounds = if select {
            (1usize << (m - 1).min(20)) + 1
        } else {
            1
        };
        for _ in 0..max_rounds {
            let cutoff = best.as_ref().map(|b| b.total);
            milps += 1;
            let active = if select {
                Active::Free
            } else {
                Active::Fixed(vec![true; m])
            };
            let res = milp(ctx, k, &active, base_comm, &lbs, &nogoods, cutoff)?;
            let Some(sol) = res else {
                break;
            };
            let act = sol.active();
            let (order, c) = best_order(ctx, &active_list(&act));
            consider(ctx, &mut best, k, &sol, &order);
            let lb: f64 = if act.iter().filter(|&&a| a).count() >= 2 {
                (0..m).filter(|&i| act[i]).map(|i| lbs[i]).sum()
            } else {
                0.0
            };
            if !matches!(base_comm, Comm::LowerBound) || c <= lb + 1e-9 {
                break;
            }
            // The bound was loose for this set: solve it with its exact ring
            // cost, then exclude it and look for a better set.
            milps += 1;
            let cutoff = best.as_ref().map(|b| b.total);
            if let Some(sol2) = milp(
                ctx,
                k,
                &Active::Fixed(act.clone()),
                Comm::PerRound(c),
                &lbs,
                &[],
                cutoff,
            )? {
                consider(ctx, &mut best, k, &sol2, &order);
            }
            nogoods.push(act);
        }
    }
    let Some(best) = best else {
        return Err(HaldaError::Infeasible {
            mode: "optimal",
            detail: diagnose(ctx, &ks, select),
        });
    };
    let mut dropped = vec![None; m];
    if select {
        for (i, slot) in dropped.iter_mut().enumerate() {
            if best.w[i] > 0 {
                continue;
            }
            let why = if opts.explain {
                let mut act: Vec<bool> = best.w.iter().map(|&w| w > 0).collect();
                act[i] = true;
                let (order, c) = best_order(ctx, &active_list(&act));
                let comm = if hops_zero && ctx.comm_override.is_none() {
                    Comm::Zero
                } else {
                    Comm::PerRound(c)
                };
                milps += 1;
                match milp(ctx, best.k, &Active::Fixed(act), comm, &lbs, &[], None)? {
                    Some(sol) => {
                        let t = ring_total(ctx, best.k, &sol.w, &sol.n, &order)
                            .unwrap_or(f64::INFINITY);
                        format!(
                            "the plan is faster without it: keeping it (k = {}, same other devices) the best plan predicts {:.1} ms instead of {:.1} ms (+{:.1} ms); its CPU layer costs {:.1} ms",
                            best.k,
                            t,
                            best.total,
                            t - best.total,
                            ctx.devs[i].alpha
                        )
                    }
                    None => format!(
                        "it cannot take even one layer at k = {} within its memory limits",
                        best.k
                    ),
                }
            } else {
                "the plan is faster without it (device selection)".to_string()
            };
            *slot = Some(why);
        }
    }
    notes.push(format!(
        "{milps} mixed-integer programs solved over k in {ks:?}"
    ));
    Ok(OptOutcome {
        k: best.k,
        w: best.w,
        n: best.n,
        order: best.order,
        dropped,
        notes,
    })
}

fn consider(ctx: &Ctx, best: &mut Option<Cand>, k: u32, sol: &MilpSol, order: &[usize]) {
    let Some(total) = ring_total(ctx, k, &sol.w, &sol.n, order) else {
        return;
    };
    let better = match best {
        None => true,
        Some(b) => total < b.total - 1e-9 * b.total.abs().max(1.0),
    };
    if better {
        *best = Some(Cand {
            total,
            k,
            w: sol.w.clone(),
            n: sol.n.clone(),
            order: order.to_vec(),
        });
    }
}

/// Builds and solves the MILP for one k. `cutoff`: only accept plans whose
/// TPOT is below it. Returns `None` when infeasible (or nothing beats the
/// cut-off).
#[allow(clippy::too_many_arguments)]
fn milp(
    ctx: &Ctx,
    k: u32,
    active: &Active,
    comm: Comm,
    lbs: &[f64],
    nogoods: &[Vec<bool>],
    cutoff: Option<f64>,
) -> Result<Option<MilpSol>> {
    const GB: f64 = 1e9;
    let m = ctx.devs.len();
    let kf = k as f64;
    let wsum = ctx.layers / k;
    let wf = wsum as f64;
    let bp = ctx.bp / GB;
    let b = ctx.b / GB;
    let kv = ctx.kv_layer / GB;

    let mut pv = ProblemVariables::new();
    let t_var = pv.add(variable().min(0.0));
    // Per device: (w, n, x-expression, x variable if free)
    let mut wv: Vec<Option<Variable>> = vec![None; m];
    let mut nv: Vec<Option<Variable>> = vec![None; m];
    let mut xv: Vec<Option<Variable>> = vec![None; m];
    let mut rows: Vec<good_lp::Constraint> = Vec::new();
    let mut round_sum = Expression::from(0.0);
    let mut fixed_workers = 0usize;
    let mut any_free_x = false;
    let mut free_without_x: Vec<Variable> = Vec::new();

    for i in 0..m {
        let d = &ctx.devs[i];
        let (may, must) = match active {
            Active::Free => (true, i == 0),
            Active::Fixed(a) => (a[i], a[i]),
        };
        if !may {
            continue;
        }
        // Resident bytes a device needs as soon as it takes part (compute
        // buffers, head extras); the anonymous part must fit its budget.
        let (fixed_all, fixed_anon, budget_bytes) = if d.metal_shared {
            (d.h + d.c_cpu + d.c_gpu, d.c_cpu + d.c_gpu, d.vram_free)
        } else {
            let uma = if d.uma_gpu { d.c_gpu } else { 0.0 };
            (d.h + d.c_cpu + uma, d.c_cpu + uma, d.ram_budget())
        };
        if !must && ctx.anon_limit && fixed_anon > budget_bytes - 1.0 {
            continue; // can never take part
        }
        if must && i != 0 {
            fixed_workers += 1;
        }
        let w = pv.add(
            variable()
                .integer()
                .min(if must { 1.0 } else { 0.0 })
                .max(wf),
        );
        wv[i] = Some(w);
        let nmax = ctx.max_gpu_layers(i, k).min(wsum);
        let n = if nmax > 0 {
            Some(pv.add(variable().integer().min(0.0).max(nmax as f64)))
        } else {
            None
        };
        nv[i] = n;
        // A selection binary is only needed where taking part has a cost of
        // its own: in the communication bound, or when the fixed bytes alone
        // overflow the budget. Otherwise w = 0 already switches every term
        // of the device off (its rows are slack at w = n = 0).
        let need_x = !must && (matches!(comm, Comm::LowerBound) || fixed_all > budget_bytes);
        let x_expr: Expression = if need_x {
            let x = pv.add(variable().binary());
            xv[i] = Some(x);
            any_free_x = true;
            rows.push(constraint!(w - wf * x <= 0.0));
            rows.push(constraint!(w - x >= 0.0));
            Expression::from(x)
        } else {
            if !must {
                free_without_x.push(w);
            }
            Expression::from(1.0)
        };
        let n_expr: Expression = n.map_or(Expression::from(0.0), Expression::from);
        if let Some(n) = n {
            rows.push(constraint!(n - w <= 0.0));
        }
        let t_expr: Expression =
            d.alpha * w + if d.has_gpu { d.beta } else { 0.0 } * n_expr.clone();
        let (cc, cg, h) = (d.c_cpu / GB, d.c_gpu / GB, d.h / GB);
        let disk_ms_per_gb = 1e3 / d.disk_gbps; // τ of one GB, ms

        // Memory rows, the overflow O (GB per token) and the pair-fit row.
        // fit_o: the largest per-token re-read possible while two windows fit
        // (bounds the prefetched load p, which keeps the relaxation tight).
        let (budget, demand, max_demand, pair, max_pair, reread, max_o, fit_o): (
            f64,
            Expression,
            f64,
            Expression,
            f64,
            Option<Expression>,
            f64,
            f64,
        );
        if d.metal_shared {
            budget = d.vram_free / GB;
            let fixed = h + cc + cg;
            if ctx.anon_limit {
                rows.push(constraint!(
                    kf * kv * w + (cc + cg) * x_expr.clone() <= budget - 1.0 / GB
                ));
            }
            demand = kf * bp * w + fixed * x_expr.clone();
            max_demand = kf * bp * wf + fixed;
            pair = 2.0 * bp * w + fixed * x_expr.clone();
            max_pair = 2.0 * bp * wf + fixed;
            reread = Some(kf * b * w + h * x_expr.clone());
            max_o = kf * b * wf + h;
            // Pair fit: w ≤ (g − fixed)/(2b'); the re-read is then ≤ k·b·w + h.
            let c_max = ((budget - fixed) / (2.0 * bp)).floor().min(wf);
            fit_o = if c_max >= 1.0 {
                kf * b * c_max + h
            } else {
                0.0
            };
        } else {
            budget = d.ram_budget() / GB;
            let uma = if d.uma_gpu { 1.0 } else { 0.0 };
            let fixed = h + cc + uma * cg;
            let cpu_part = w - n_expr.clone();
            if ctx.anon_limit {
                rows.push(constraint!(
                    kf * kv * cpu_part.clone()
                        + uma * kf * bp * n_expr.clone()
                        + (cc + uma * cg) * x_expr.clone()
                        <= budget - 1.0 / GB
                ));
            }
            demand = kf * bp * cpu_part.clone()
                + uma * kf * bp * n_expr.clone()
                + fixed * x_expr.clone();
            max_demand = kf * bp * wf + fixed;
            pair = 2.0 * bp * cpu_part + uma * kf * bp * n_expr.clone() + fixed * x_expr.clone();
            max_pair = 2.0 * bp * wf + uma * kf * bp * nmax as f64 + fixed;
            reread = None;
            max_o = (max_demand - budget).max(0.0);
            // Pair fit: 2b'(w − n) + [uma]·k·b'·n + fixed ≤ d, hence the
            // overflow k·b'(w − n) + [uma]·k·b'·n + fixed − d ≤ (k − 2)·b'·(w − n).
            let c_max = ((budget - fixed) / (2.0 * bp)).floor().min(wf);
            fit_o = if c_max >= 0.0 {
                (kf - 2.0) * bp * c_max
            } else {
                0.0
            };
        }
        let can_over = max_demand > budget;
        let o_expr: Expression = if can_over {
            let o = pv.add(variable().min(0.0));
            match reread {
                None => rows.push(constraint!(o - demand >= -budget)),
                Some(rr) => {
                    let e = pv.add(variable().binary());
                    let big = max_demand - budget;
                    rows.push(constraint!(demand - big * e <= budget));
                    rows.push(constraint!(o - rr - max_o * e >= -max_o));
                }
            }
            Expression::from(o)
        } else {
            Expression::from(0.0)
        };
        let load = (disk_ms_per_gb / kf) * o_expr;
        if ctx.prefetch && k >= 2 && can_over && fit_o > 0.0 {
            let pi = pv.add(variable().binary());
            let q = pv.add(variable().min(0.0));
            let p = pv.add(variable().min(0.0));
            let p_max = disk_ms_per_gb / kf * fit_o.min(max_o) * (1.0 + 1e-9) + 1e-6;
            rows.push(constraint!(q + p - load >= 0.0));
            rows.push(constraint!(p - p_max * pi <= 0.0));
            let big = (max_pair - budget).max(0.0) + 1.0;
            rows.push(constraint!(pair + big * pi <= budget + big));
            rows.push(constraint!(t_var - t_expr.clone() - q - p >= 0.0));
            round_sum += t_expr + q;
        } else {
            round_sum += t_expr + load;
        }
    }

    // Σ w = W.
    let total_w: Expression = wv.iter().flatten().copied().sum();
    rows.push(constraint!(total_w == wf));

    // Communication.
    // 1 when at least two devices take part (then the ring has hops).
    let several: Expression = if matches!(comm, Comm::Zero) {
        Expression::from(0.0)
    } else if fixed_workers > 0 {
        Expression::from(1.0)
    } else if any_free_x || !free_without_x.is_empty() {
        let y = pv.add(variable().binary());
        for x in xv.iter().flatten() {
            rows.push(constraint!(y - *x >= 0.0));
        }
        for w in &free_without_x {
            rows.push(constraint!(*w - wf * y <= 0.0));
        }
        Expression::from(y)
    } else {
        Expression::from(0.0)
    };
    let c_expr: Expression = match comm {
        Comm::Zero => Expression::from(0.0),
        Comm::PerRound(c) => c * several,
        Comm::LowerBound => {
            let mut e = lbs[0] * several;
            for i in 1..m {
                match (xv[i], wv[i]) {
                    (Some(x), _) => e += lbs[i] * x,
                    (None, Some(_)) => e += lbs[i],
                    _ => {}
                }
            }
            e
        }
    };
    rows.push(constraint!(t_var - round_sum - c_expr >= 0.0));

    // No-good cuts on the selection.
    for ng in nogoods {
        let mut e = Expression::from(0.0);
        let mut constant = 0.0;
        let mut any = false;
        for i in 0..m {
            if let Some(x) = xv[i] {
                any = true;
                if ng[i] {
                    e -= x;
                    constant += 1.0;
                } else {
                    e += x;
                }
            }
        }
        if any {
            rows.push(constraint!(e >= 1.0 - constant));
        }
    }

    if let Some(c) = cutoff {
        let limit = (c - ctx.ring_constant_ms()) * (1.0 - 1e-9) - 1e-9;
        rows.push(constraint!(kf * t_var <= limit));
    }

    let mut model = pv.minimise(kf * t_var).using(microlp);
    for r in rows {
        model.add_constraint(r);
    }
    match model.solve() {
        Ok(sol) => {
            let get = |v: &Option<Variable>| v.map_or(0, |v| sol.value(v).round().max(0.0) as u32);
            let w: Vec<u32> = wv.iter().map(get).collect();
            let n: Vec<u32> = nv.iter().map(get).collect();
            if w.iter().sum::<u32>() != wsum {
                return Err(HaldaError::Solver {
                    k,
                    message: format!("solution {w:?} does not sum to W = {wsum}"),
                });
            }
            Ok(Some(MilpSol { w, n }))
        }
        Err(ResolutionError::Infeasible) => Ok(None),
        Err(e) => Err(HaldaError::Solver {
            k,
            message: e.to_string(),
        }),
    }
}

/// Names the binding numbers when no plan exists.
fn diagnose(ctx: &Ctx, ks: &[u32], select: bool) -> String {
    let mut parts = Vec::new();
    let m = ctx.devs.len();
    for &k in ks {
        let wsum = ctx.layers / k;
        if !select && (wsum as usize) < m {
            parts.push(format!(
                "k = {k}: W = L/k = {wsum} layers per round is fewer than the {m} devices, each of which must hold w >= 1 (device selection is off)"
            ));
            continue;
        }
        let mut why = Vec::new();
        for (i, d) in ctx.devs.iter().enumerate() {
            if i != 0 && select {
                continue;
            }
            let budget = if d.metal_shared {
                d.vram_free
            } else {
                d.ram_budget()
            };
            let anon = k as f64 * ctx.kv_layer
                + d.c_cpu
                + if d.metal_shared || d.uma_gpu {
                    d.c_gpu
                } else {
                    0.0
                };
            let on_gpu = ctx.max_gpu_layers(i, k) >= 1 && !d.metal_shared && !d.uma_gpu;
            let anon = if on_gpu {
                anon - k as f64 * ctx.kv_layer
            } else {
                anon
            };
            if anon > budget {
                why.push(format!(
                    "{} must be used but one layer's KV cache and its compute buffers need {:.0} bytes of anonymous memory, more than its budget of {:.0} bytes",
                    d.name, anon, budget
                ));
            }
        }
        if why.is_empty() {
            why.push(
                "the devices' anonymous-memory limits (KV cache and compute buffers) cannot hold all layers".into(),
            );
        }
        parts.push(format!("k = {k} (W = {wsum}): {}", why.join("; ")));
    }
    parts.join(" | ")
}
