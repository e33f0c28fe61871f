//! CPU kernel dispatch: SIMD implementations chosen at run time (packages
//! target baseline x86-64, so compile-time `target-cpu=native` is not an
//! option), with the scalar reference in `quant::generic` as the fallback
//! and as the ground truth the SIMD code is tested against.
//!
//! `PRIMA_SIMD=off` in the environment (or [`set_simd`]) forces the scalar
//! path, to check that outputs do not depend on it.

use std::sync::{
    atomic::{AtomicU8, Ordering},
    OnceLock,
};

#[cfg(target_arch = "x86_64")]
use crate::quant::QuantActs;
use crate::quant::{self, ActRows, GgmlType};

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
mod x86_64_tile;

pub mod pool;

static POOL: OnceLock<pool::Pool> = OnceLock::new();
static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Error from [`set_threads`].
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the worker pool already runs with {0} threads; set the count before the first forward pass")]
    AlreadyStarted(usize),
    #[error("thread count must be at least 1")]
    Zero,
}

/// Sets how many threads the forward pass uses (default: all cores).
/// Must be called before the first forward pass.
pub fn set_threads(n: usize) -> Result<(), PoolError> {
    if n == 0 {
        return Err(PoolError::Zero);
    }
    if let Some(p) = POOL.get() {
        if p.threads() != n {
            return Err(PoolError::AlreadyStarted(p.threads()));
        }
    }
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The process-wide worker pool of the forward pass.
pub fn pool() -> &'static pool::Pool {
    POOL.get_or_init(|| {
        let n = match THREADS.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        pool::Pool::new(n)
    })
}

/// Threads of the worker pool.
pub fn threads() -> usize {
    pool().threads()
}

/// 0 = follow detection and the environment, 1 = forced on, 2 = forced off.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Turns the SIMD kernels on or off for the whole process (tests, benches).
/// Turning them on has no effect where the CPU lacks the features.
pub fn set_simd(on: bool) {
    OVERRIDE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether AVX2, FMA and F16C are present (x86-64 only).
pub fn avx2_available() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

fn env_allows_simd() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| {
        !matches!(
            std::env::var("PRIMA_SIMD").as_deref(),
            Ok("off" | "0" | "false" | "no")
        )
    })
}

/// Whether the SIMD kernels are in use right now.
pub fn simd_enabled() -> bool {
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => avx2_available(),
        2 => false,
        _ => avx2_available() && env_allows_simd(),
    }
}

/// A short description of the kernels in use, for logs and benchmarks.
pub fn describe() -> &'static str {
    if simd_enabled() {
        #[cfg(target_arch = "x86_64")]
        if x86_64_tile::vnni() {
            return "x86-64 AVX2+FMA, AVX-512 VNNI tiles";
        }
        "x86-64 AVX2+FMA"
    } else {
        "portable scalar"
    }
}

/// Dot product of one weight row with activation row `row`, using the best
/// kernel available; same contract as [`quant::vec_dot`].
#[inline]
pub fn vec_dot(ty: GgmlType, w: &[u8], acts: &ActRows, row: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        use bytemuck::cast_slice as c;
        use quant::{blocks_of, QK8_0, QK_K};
        let n = acts.cols;
        match (ty, &acts.data) {
            (GgmlType::Q8_0, QuantActs::Q8_0(a)) => {
                return x86_64::dot_q8_0_q8_0(c(w), blocks_of(a, row, n, QK8_0));
            }
            (GgmlType::Q4_0, QuantActs::Q8_0(a)) => {
                return x86_64::dot_q4_0_q8_0(c(w), blocks_of(a, row, n, QK8_0));
            }
            (GgmlType::Q5_0, QuantActs::Q8_0(a)) => {
                return x86_64::dot_q5_0_q8_0(c(w), blocks_of(a, row, n, QK8_0));
            }
            (GgmlType::Q4_1, QuantActs::Q8_1(a)) => {
                return x86_64::dot_q4_1_q8_1(c(w), blocks_of(a, row, n, QK8_0));
            }
            (GgmlType::Q4_K, QuantActs::Q8_K(a)) => {
                let grouped = row < acts.grouped;
                return x86_64::dot_q4_k_q8_k(c(w), blocks_of(a, row, n, QK_K), grouped);
            }
            (GgmlType::Q6_K, QuantActs::Q8_K(a)) => {
                let tiled = row < acts.tiled;
                return x86_64::dot_q6_k_q8_k(c(w), blocks_of(a, row, n, QK_K), tiled);
            }
            _ => {}
        }
    }
    quant::vec_dot(ty, w, acts, row)
}

/// Weight rows of type `ty` (one after another in `w`) against activation
/// row `row`, one result per row to `out`, bit-identical to [`vec_dot`]
/// on each. Rows go four to a call of a kernel that loads each activation
/// block once for four; returns how many leading rows were done (a
/// multiple of four, 0 where there is no such kernel for the formats on
/// this CPU); the caller does the rest row by row.
#[inline]
pub fn gemv_rows(ty: GgmlType, w: &[u8], acts: &ActRows, row: usize, out: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64_tile::gemv_rows(ty, w, acts, row, out);
    }
    let _ = (ty, w, acts, row, out);
    0
}

/// Dot products of one weight row with activation rows `t0..t0 + out.len()`
/// (up to four), written to `out`. Uses a kernel that unpacks each weight
/// block once for all rows where there is one.
#[inline]
pub fn vec_dot_rows(ty: GgmlType, w: &[u8], acts: &ActRows, t0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if out.len() == 4 && simd_enabled() {
        if let Some(r) = x86_64::dot_rows4(ty, w, acts, t0) {
            out.copy_from_slice(&r);
            return;
        }
    }
    for (k, o) in out.iter_mut().enumerate() {
        *o = vec_dot(ty, w, acts, t0 + k);
    }
}

/// Dot products of two weight rows with activation rows `t0..t0 + 4`
/// (`out[weight row][token]`), bit-identical to [`vec_dot`] on each pair;
/// `None` where there is no such tile for these formats (the caller then
/// goes row by row).
#[inline]
pub fn dot_tile(ty: GgmlType, w: [&[u8]; 2], acts: &ActRows, t0: usize) -> Option<[[f32; 4]; 2]> {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64_tile::tile(ty, w, acts, t0);
    }
    let _ = (ty, w, acts, t0);
    None
}

/// Four weight rows against every whole four of the activation rows
/// (`out[weight row * acts.rows + token]`), bit-identical to [`vec_dot`]
/// on each pair; returns the tokens done, 0 where there is no such tile
/// (see [`has_tile4`]).
#[inline]
pub fn dot_rows4(ty: GgmlType, w: [&[u8]; 4], acts: &ActRows, out: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64_tile::rows4(ty, w, acts, out);
    }
    let _ = (ty, w, acts, out);
    0
}

/// Whether weights of type `ty` have a four-row tile ([`dot_rows4`]) on
/// this CPU.
pub fn has_tile4(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64_tile::has_tile4(ty);
    }
    let _ = ty;
    false
}

/// One query head's attention over cache cells `cells`; see
/// [`crate::model::ops::attend_body`].
pub fn attend(
    query: crate::model::ops::HeadQuery<'_>,
    cache: crate::model::ops::HeadCache<'_>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::attend(query, cache, out);
    }
    crate::model::ops::attend_body(query, cache, out)
}

/// One query head's attention for `q.len() / hd` tokens of a long prompt
/// batch; see [`crate::model::ops::attend_tiled_rows_with`].
pub fn attend_tiled_rows(
    q: &[f32],
    hd: usize,
    cells: &(dyn Fn(usize) -> std::ops::Range<usize> + Sync),
    scale: crate::model::ops::AttnScale,
    cache: crate::model::ops::HeadCache<'_>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::attend_tiled_rows(q, hd, cells, scale, cache, out);
    }
    crate::model::ops::attend_tiled_rows_with(q, hd, cells, scale, cache, out, |h, f| {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, f)
    })
}

/// Activations to Q8_0 blocks, bit-identical to
/// [`quant::generic::quantize_row_q8_0`].
pub fn quantize_row_q8_0(x: &[f32], y: &mut [quant::blocks::BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::quantize_row_q8_0(x, y);
    }
    quant::generic::quantize_row_q8_0(x, y)
}

/// Activations to Q8_1 blocks, bit-identical to
/// [`quant::generic::quantize_row_q8_1`] (every layer input of a Q4_1
/// model, decoding included).
pub fn quantize_row_q8_1(x: &[f32], y: &mut [quant::blocks::BlockQ8_1]) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::quantize_row_q8_1(x, y);
    }
    quant::generic::quantize_row_q8_1(x, y)
}

/// Activations to Q8_K blocks, bit-identical to
/// [`quant::generic::quantize_row_q8_k`] (the input of every K-quant
/// matmul, so worth its SIMD form in a prefill).
pub fn quantize_row_q8_k(x: &[f32], y: &mut [quant::blocks::BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::quantize_row_q8_k(x, y);
    }
    quant::generic::quantize_row_q8_k(x, y)
}

/// Rotary position embedding of `x`'s heads; see [`crate::model::ops::Rope`].
pub fn rope(rope: &crate::model::ops::Rope, x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::rope(rope, x, head_dim, cs);
    }
    rope.apply_body(x, head_dim, cs)
}

/// `g = silu(g) * u` as llama.cpp rounds it; see
/// [`crate::model::ops::swiglu_body`].
pub fn swiglu(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        return x86_64::swiglu(g, u);
    }
    crate::model::ops::swiglu_body(g, u)
}

/// Adds one Q4_K block's terms to a row's running sums (`acc - accm` is
/// the dot product) as llama.cpp's x86 build does: it repacks Q4_K
/// weights, and its 4-row gemm (`grouped`: the leading rows of a prompt
/// batch, in fours) adds each 64-value chunk's scaled dot `isb` and minimum
/// term `imin` with their own fused multiply-adds, while its gemv (other
/// rows, and single tokens) adds the block's totals. `d = d(x) * d(y)`,
/// `m = dmin(x) * d(y)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn q4_k_accumulate(
    acc: &mut f32,
    accm: &mut f32,
    isb: [i32; 4],
    imin: [i32; 4],
    d: f32,
    m: f32,
    grouped: bool,
) {
    if grouped {
        for (s, n) in isb.into_iter().zip(imin) {
            *acc = (s as f32).mul_add(d, *acc);
            *accm = (n as f32).mul_add(m, *accm);
        }
    } else {
        *acc = (isb.iter().sum::<i32>() as f32).mul_add(d, *acc);
        *accm = (imin.iter().sum::<i32>() as f32).mul_add(m, *accm);
    }
}

/// Adds one Q6_K block to a row's running sum as llama.cpp's x86 build
/// does. Its vec_dot (decoded tokens, short prompts) keeps the block's
/// eight i32 lanes `lanes` (offset already taken off) apart, scaled by
/// `d = d(y) * d(x)` into eight float lanes fused (`acc`, added up at the
/// end); its tiled kernel (prompts of eight tokens or more, `tiled`) takes
/// the block's exact total times `d(x)`, then times `d(y)` fused into
/// `acc[0]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn q6_k_block(acc: &mut [f32; 8], lanes: [i32; 8], dx: f32, dy: f32, tiled: bool) {
    if tiled {
        let total: i32 = lanes.iter().fold(0i32, |a, &b| a.wrapping_add(b));
        // `acc + (total * dx) * dy` in its intrinsics, which the compiler
        // contracts into one fused multiply-add.
        acc[0] = (total as f32 * dx).mul_add(dy, acc[0]);
    } else {
        let d = dy * dx;
        for (a, l) in acc.iter_mut().zip(lanes) {
            *a = (l as f32).mul_add(d, *a);
        }
    }
}

#[cfg(test)]
mod tests;
