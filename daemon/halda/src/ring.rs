//! Ring order and the communication term.
//!
//! prima fixes the ring by rank: 1, 2, …, M−1 and the head last in every round
//! (spec §1.2), and charges no communication (ξ = 0, §4.2). primad measures
//! RTT and bandwidth between devices (§3, last paragraph) and charges one
//! decode hop i→j as
//!
//! ```text
//! hop(i, j) = rtt(i, j)/2 + 8·(4·n_embd) / (bandwidth_mbit_s(i, j)·1e3)   [ms]
//! ```
//!
//! (f32 activations of one token, spec §1.6). A round makes one hop per
//! active device, so C = Σ hops along the cycle. The head stays last so the
//! ring closes where the output layer lives (§8 "Ring order"); which order
//! the other devices take is a shortest Hamiltonian cycle through the head,
//! solved exactly by dynamic programming over subsets (Held–Karp) for up to
//! [`EXACT_RING_LIMIT`] devices and by nearest neighbour plus 2-opt beyond.

use crate::cost::Ctx;
use crate::profile::DeviceProfile;

/// Up to this many active devices the ring order is exact.
pub const EXACT_RING_LIMIT: usize = 13;

/// hop_ms[i][j] from the measured links. A link measured only in the
/// direction j→i is used for i→j too; unmeasured pairs cost `default_ms`.
pub(crate) fn hop_matrix(
    devices: &[DeviceProfile],
    act_bytes: f64,
    default_ms: f64,
) -> Vec<Vec<f64>> {
    let m = devices.len();
    let find = |from: usize, to: usize| {
        devices[from]
            .links
            .iter()
            .find(|l| l.peer == devices[to].name)
            .map(|l| {
                let transfer = if l.bandwidth_mbit_s > 0.0 {
                    8.0 * act_bytes / (l.bandwidth_mbit_s * 1e3)
                } else {
                    0.0
                };
                l.rtt_ms / 2.0 + transfer
            })
    };
    let mut hop = vec![vec![0.0; m]; m];
    for (i, row) in hop.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            if i != j {
                *cell = find(i, j).or_else(|| find(j, i)).unwrap_or(default_ms);
            }
        }
    }
    hop
}

/// prima's order: active non-head devices by index, then the head.
pub(crate) fn default_order(active: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = active.iter().copied().filter(|&i| i != 0).collect();
    order.push(0);
    order
}

/// Cheapest ring through `active` (which must contain the head, 0), head last.
pub(crate) fn best_order(ctx: &Ctx, active: &[usize]) -> (Vec<usize>, f64) {
    let workers: Vec<usize> = active.iter().copied().filter(|&i| i != 0).collect();
    if workers.len() <= 1 || ctx.comm_override.is_some() {
        let order = default_order(active);
        let c = ctx.comm_ms(&order);
        return (order, c);
    }
    let order = if workers.len() < EXACT_RING_LIMIT {
        held_karp(&ctx.hop_ms, &workers)
    } else {
        two_opt(&ctx.hop_ms, &workers)
    };
    let c = ctx.comm_ms(&order);
    (order, c)
}

/// Exact shortest cycle head → workers (some order) → head.
fn held_karp(hop: &[Vec<f64>], workers: &[usize]) -> Vec<usize> {
    let n = workers.len();
    let full = 1usize << n;
    let mut dp = vec![f64::INFINITY; full * n];
    let mut parent = vec![usize::MAX; full * n];
    for j in 0..n {
        dp[(1 << j) * n + j] = hop[0][workers[j]];
    }
    for mask in 1..full {
        for j in 0..n {
            if mask & (1 << j) == 0 {
                continue;
            }
            let cur = dp[mask * n + j];
            if !cur.is_finite() {
                continue;
            }
            for nx in 0..n {
                if mask & (1 << nx) != 0 {
                    continue;
                }
                let nm = mask | (1 << nx);
                let v = cur + hop[workers[j]][workers[nx]];
                if v < dp[nm * n + nx] {
                    dp[nm * n + nx] = v;
                    parent[nm * n + nx] = j;
                }
            }
        }
    }
    let last_mask = full - 1;
    let mut best = (f64::INFINITY, 0);
    for j in 0..n {
        let v = dp[last_mask * n + j] + hop[workers[j]][0];
        if v < best.0 {
            best = (v, j);
        }
    }
    let mut path = Vec::with_capacity(n + 1);
    let (mut mask, mut j) = (last_mask, best.1);
    loop {
        path.push(workers[j]);
        let p = parent[mask * n + j];
        mask &= !(1 << j);
        if p == usize::MAX {
            break;
        }
        j = p;
    }
    path.reverse();
    path.push(0);
    path
}

/// Nearest neighbour from the head, then 2-opt moves while they help.
fn two_opt(hop: &[Vec<f64>], workers: &[usize]) -> Vec<usize> {
    let mut left: Vec<usize> = workers.to_vec();
    let mut tour = vec![0usize];
    while !left.is_empty() {
        let cur = *tour.last().unwrap_or(&0);
        let (pos, _) = left
            .iter()
            .enumerate()
            .fold((0, f64::INFINITY), |acc, (p, &c)| {
                if hop[cur][c] < acc.1 {
                    (p, hop[cur][c])
                } else {
                    acc
                }
            });
        tour.push(left.swap_remove(pos));
    }
    let cost = |t: &[usize]| {
        (0..t.len())
            .map(|i| hop[t[i]][t[(i + 1) % t.len()]])
            .sum::<f64>()
    };
    let mut best = cost(&tour);
    let mut improved = true;
    let mut guard = 0;
    while improved && guard < 1000 {
        improved = false;
        guard += 1;
        for i in 1..tour.len() - 1 {
            for j in i + 1..tour.len() {
                tour[i..=j].reverse();
                let c = cost(&tour);
                if c + 1e-12 < best {
                    best = c;
                    improved = true;
                } else {
                    tour[i..=j].reverse();
                }
            }
        }
    }
    // Rotate so that the head is last.
    tour.rotate_left(1);
    tour
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(hop: &[Vec<f64>], workers: &[usize]) -> f64 {
        fn perms(v: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
            if k == v.len() {
                out.push(v.clone());
                return;
            }
            for i in k..v.len() {
                v.swap(k, i);
                perms(v, k + 1, out);
                v.swap(k, i);
            }
        }
        let mut all = vec![];
        perms(&mut workers.to_vec(), 0, &mut all);
        all.iter()
            .map(|p| {
                let mut t = p.clone();
                t.push(0);
                (0..t.len())
                    .map(|i| hop[t[i]][t[(i + 1) % t.len()]])
                    .sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn held_karp_matches_brute_force_on_asymmetric_hops() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 1000) as f64 / 10.0
        };
        for _ in 0..20 {
            let n = 6;
            let hop: Vec<Vec<f64>> = (0..n)
                .map(|i| (0..n).map(|j| if i == j { 0.0 } else { rnd() }).collect())
                .collect();
            let workers: Vec<usize> = (1..n).collect();
            let t = held_karp(&hop, &workers);
            assert_eq!(t.last(), Some(&0));
            let c: f64 = (0..t.len()).map(|i| hop[t[i]][t[(i + 1) % t.len()]]).sum();
            assert!((c - brute(&hop, &workers)).abs() < 1e-9);
            let t2 = two_opt(&hop, &workers);
            assert_eq!(t2.last(), Some(&0));
            assert_eq!(t2.len(), n);
        }
    }
}
