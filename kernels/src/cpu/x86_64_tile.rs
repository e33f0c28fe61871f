//! Prefill tiles for x86-64: two weight rows against four activation rows
//! per call. Each weight block is unpacked once for four tokens and each
//! activation block loaded once for two weight rows; activation scales come
//! as f32 from [`crate::quant::ActRows`]'s block-major copy instead of an
//! f16 conversion per row and block.
//!
//! Every (weight row, token) pair still sums its blocks in the one-row
//! kernels' order (ggml's) with the same float operations, so a tile's
//! results are bit-identical to [`super::x86_64`]'s; only integer sums,
//! which are exact in any order, are regrouped. `cpu::tests` asserts that.
//!
//! Each kernel is built twice: for AVX2 (`maddubs` + `madd`) and for
//! AVX-512 VNNI with VL (`vpdpbusd` in one instruction, and 32 vector
//! registers, so a tile's accumulators need not spill).
//!
//! With AVX-512 VNNI, VL and BW the formats with one scale a block (Q8_0,
//! Q4_0, Q5_0) go four weight rows at a time instead ([`quad`]): the rows
//! are unpacked once for all the batch's tokens, to biased unsigned bytes
//! that `vpdpbusd` takes as they are.

use std::arch::x86_64::*;

use super::x86_64::{
    dot_u8_i8, h, hsum_lanes, hsum_ps, lanes_epi32, load, nibbles, q4_k_chunk, q4_k_chunk_dot,
    q4_k_min_terms4, q4_k_scales_mins, q5_high, q6_k_half, q6_k_offset, q6_k_scale, q8_k_pair_sums,
    q8_k_quarter,
};
use crate::quant::blocks::*;

/// Pairwise u8 x i8 products summed to eight i32 lanes in one instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn dot_u8_i8_vnni(a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
}

// Weight blocks of the signed formats as 32 signed bytes.

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_q8_0(x: &BlockQ8_0) -> __m256i {
    // SAFETY: the block holds 32 bytes of quants.
    unsafe { load(&x.qs) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_q4_0(x: &BlockQ4_0) -> __m256i {
    // SAFETY: qs is 16 bytes.
    _mm256_sub_epi8(unsafe { nibbles(x.qs.as_ptr()) }, _mm256_set1_epi8(8))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_q5_0(x: &BlockQ5_0) -> __m256i {
    // SAFETY: qs is 16 bytes.
    _mm256_or_si256(unsafe { nibbles(x.qs.as_ptr()) }, q5_high(x.qh))
}

/// Four vectors of eight i32 lanes to the four lane sums, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum4_epi32(v: [__m256i; 4]) -> __m128i {
    let a = _mm256_hadd_epi32(v[0], v[1]);
    let b = _mm256_hadd_epi32(v[2], v[3]);
    let s = _mm256_hadd_epi32(a, b);
    _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1))
}

/// The four f32 lanes as an array.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes(v: __m128) -> [f32; 4] {
    let mut out = [0f32; 4];
    // SAFETY: `out` is four writable floats.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// Index vectors that broadcast lane 0, 1, 2 or 3 of a register with
/// `_mm256_permutevar8x32_ps`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane_picks() -> [__m256i; 4] {
    [
        _mm256_set1_epi32(0),
        _mm256_set1_epi32(1),
        _mm256_set1_epi32(2),
        _mm256_set1_epi32(3),
    ]
}

macro_rules! tiles {
    ($m:ident, $feat:literal, $dot:ident) => {
        pub(super) mod $m {
            use super::*;
            tiles!(@signed $feat, $dot, q8_0, BlockQ8_0, unpack_q8_0);
            tiles!(@signed $feat, $dot, q4_0, BlockQ4_0, unpack_q4_0);
            tiles!(@signed $feat, $dot, q5_0, BlockQ5_0, unpack_q5_0);
            tiles!(@q4_1 $feat, $dot);
            tiles!(@k $feat);
        }
    };

    // Signed quants with one f16 scale a block, against Q8_0.
    (@signed $feat:literal, $dot:ident, $name:ident, $b:ty, $unpack:ident) => {
        #[target_feature(enable = $feat)]
        pub(crate) fn $name(
            w: [&[$b]; 2],
            a: [&[BlockQ8_0]; 4],
            d: &[f32],
            t0: usize,
        ) -> [[f32; 4]; 2] {
            let nb = w[0].len();
            let rows = d.len() / nb;
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            for i in 0..nb {
                let yd = &d[i * rows + t0..][..4];
                // SAFETY: Q8_0 blocks hold 32 bytes of quants.
                let qy = unsafe {
                    [load(&a[0][i].qs), load(&a[1][i].qs), load(&a[2][i].qs), load(&a[3][i].qs)]
                };
                for r in 0..2 {
                    let x = &w[r][i];
                    // SAFETY: the block is whole.
                    let qx = unsafe { $unpack(x) };
                    let ax = _mm256_sign_epi8(qx, qx);
                    let xd = h(x.d);
                    for t in 0..4 {
                        let p = $dot(ax, _mm256_sign_epi8(qy[t], qx));
                        let s = _mm256_set1_ps(xd * yd[t]);
                        acc[r][t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
            let mut out = [[0f32; 4]; 2];
            for r in 0..2 {
                for t in 0..4 {
                    out[r][t] = hsum_ps(acc[r][t]);
                }
            }
            out
        }
    };

    // Q4_1 against Q8_1: the minimum times the activation block's sum is
    // summed apart, four tokens in the lanes of one register.
    (@q4_1 $feat:literal, $dot:ident) => {
        #[target_feature(enable = $feat)]
        pub(crate) fn q4_1(
            w: [&[BlockQ4_1]; 2],
            a: [&[BlockQ8_1]; 4],
            d: &[f32],
            s: &[f32],
            t0: usize,
        ) -> [[f32; 4]; 2] {
            let nb = w[0].len();
            let rows = d.len() / nb;
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            let mut summs = [_mm_setzero_ps(); 2];
            for i in 0..nb {
                let yd = &d[i * rows + t0..][..4];
                // SAFETY: four readable floats.
                let ys = unsafe { _mm_loadu_ps(s[i * rows + t0..][..4].as_ptr()) };
                // SAFETY: Q8_1 blocks hold 32 bytes of quants.
                let qy = unsafe {
                    [load(&a[0][i].qs), load(&a[1][i].qs), load(&a[2][i].qs), load(&a[3][i].qs)]
                };
                for r in 0..2 {
                    let x = &w[r][i];
                    summs[r] = _mm_add_ps(summs[r], _mm_mul_ps(_mm_set1_ps(h(x.m)), ys));
                    // SAFETY: qs is 16 bytes.
                    let qx = unsafe { nibbles(x.qs.as_ptr()) };
                    let xd = h(x.d);
                    for t in 0..4 {
                        let p = $dot(qx, qy[t]);
                        let sc = _mm256_set1_ps(xd * yd[t]);
                        acc[r][t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
            let mut out = [[0f32; 4]; 2];
            for r in 0..2 {
                let m = lanes(summs[r]);
                for t in 0..4 {
                    out[r][t] = hsum_ps(acc[r][t]) + m[t];
                }
            }
            out
        }
    };

    // The K-quants against Q8_K: integer sums per block, then the block's
    // float update for four tokens in the lanes of one register.
    (@k $feat:literal) => {
        #[target_feature(enable = $feat)]
        pub(crate) fn q4_k(
            w: [&[BlockQ4K]; 2],
            a: [&[BlockQ8K]; 4],
            grouped: bool,
        ) -> [[f32; 4]; 2] {
            // The four tokens in the lanes of one register: lane t runs
            // exactly the one-row kernel's float operations for token t.
            // A chunk is unpacked once for four tokens and its four sums
            // reduced together.
            let mut acc = [_mm_setzero_ps(); 2];
            let mut accm = [_mm_setzero_ps(); 2];
            for i in 0..w[0].len() {
                let y = [&a[0][i], &a[1][i], &a[2][i], &a[3][i]];
                let yd = _mm_set_ps(y[3].d, y[2].d, y[1].d, y[0].d);
                let bsums = [
                    q8_k_pair_sums(y[0]),
                    q8_k_pair_sums(y[1]),
                    q8_k_pair_sums(y[2]),
                    q8_k_pair_sums(y[3]),
                ];
                for r in 0..2 {
                    let x = &w[r][i];
                    let (sc, mins) = q4_k_scales_mins(x);
                    let mut isb = [_mm_setzero_si128(); 4];
                    for (c, sums) in isb.iter_mut().enumerate() {
                        let (lo, hi) = q4_k_chunk(x, c);
                        *sums = hsum4_epi32([
                            q4_k_chunk_dot(lo, hi, &sc, y[0], c),
                            q4_k_chunk_dot(lo, hi, &sc, y[1], c),
                            q4_k_chunk_dot(lo, hi, &sc, y[2], c),
                            q4_k_chunk_dot(lo, hi, &sc, y[3], c),
                        ]);
                    }
                    let imin = q4_k_min_terms4(&mins, bsums);
                    // d(x)·d(y) and dmin(x)·d(y) per token.
                    let d = _mm_mul_ps(_mm_set1_ps(h(x.d)), yd);
                    let m = _mm_mul_ps(_mm_set1_ps(h(x.dmin)), yd);
                    // `q4_k_accumulate`, four tokens at a time.
                    if grouped {
                        for c in 0..4 {
                            acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(isb[c]), d, acc[r]);
                            accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(imin[c]), m, accm[r]);
                        }
                    } else {
                        // Integer totals, exact in any order.
                        let s = _mm_add_epi32(_mm_add_epi32(isb[0], isb[1]), _mm_add_epi32(isb[2], isb[3]));
                        let n = _mm_add_epi32(_mm_add_epi32(imin[0], imin[1]), _mm_add_epi32(imin[2], imin[3]));
                        acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(s), d, acc[r]);
                        accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(n), m, accm[r]);
                    }
                }
            }
            [
                lanes(_mm_sub_ps(acc[0], accm[0])),
                lanes(_mm_sub_ps(acc[1], accm[1])),
            ]
        }

        #[target_feature(enable = $feat)]
        pub(crate) fn q6_k(
            w: [&[BlockQ6K]; 2],
            a: [&[BlockQ8K]; 4],
            tiled: [bool; 4],
        ) -> [[f32; 4]; 2] {
            // Per (weight row, token) exactly the one-row kernel's
            // operations; a quarter is unpacked once for four tokens.
            let mut acc = [[[0f32; 8]; 4]; 2];
            let mut vacc = [[_mm256_setzero_ps(); 4]; 2];
            let mut tot = [_mm_setzero_ps(); 2];
            for i in 0..w[0].len() {
                let y = [&a[0][i], &a[1][i], &a[2][i], &a[3][i]];
                let yd = _mm_set_ps(y[3].d, y[2].d, y[1].d, y[0].d);
                for r in 0..2 {
                    let x = &w[r][i];
                    let mut sumi = [_mm256_setzero_si256(); 4];
                    for n in 0..2 {
                        for (k, q) in q6_k_half(x, n).into_iter().enumerate() {
                            let scale = q6_k_scale(x, n, k);
                            for t in 0..4 {
                                let p = _mm256_maddubs_epi16(q, q8_k_quarter(y[t], n, k));
                                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, scale));
                            }
                        }
                    }
                    let dx = h(x.d);
                    let lanes = [
                        _mm256_sub_epi32(sumi[0], q6_k_offset(x, y[0])),
                        _mm256_sub_epi32(sumi[1], q6_k_offset(x, y[1])),
                        _mm256_sub_epi32(sumi[2], q6_k_offset(x, y[2])),
                        _mm256_sub_epi32(sumi[3], q6_k_offset(x, y[3])),
                    ];
                    // `q6_k_block` with the tokens in lanes where all four
                    // take the same path; one by one where they differ.
                    if tiled == [true; 4] {
                        let total = _mm_cvtepi32_ps(hsum4_epi32(lanes));
                        let t = _mm_mul_ps(total, _mm_set1_ps(dx));
                        tot[r] = _mm_fmadd_ps(t, yd, tot[r]);
                    } else if tiled == [false; 4] {
                        for t in 0..4 {
                            let d = _mm256_set1_ps(y[t].d * dx);
                            vacc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes[t]), d, vacc[r][t]);
                        }
                    } else {
                        for t in 0..4 {
                            let l = lanes_epi32(lanes[t]);
                            crate::cpu::q6_k_block(&mut acc[r][t], l, dx, y[t].d, tiled[t]);
                        }
                    }
                }
            }
            let mut out = [[0f32; 4]; 2];
            for r in 0..2 {
                if tiled == [true; 4] {
                    out[r] = lanes(tot[r]);
                } else if tiled == [false; 4] {
                    for t in 0..4 {
                        out[r][t] = hsum_ps(vacc[r][t]);
                    }
                } else {
                    for t in 0..4 {
                        out[r][t] = if tiled[t] { acc[r][t][0] } else { hsum_lanes(acc[r][t]) };
                    }
                }
            }
            out
        }
    };
}

tiles!(avx2, "avx2,fma,f16c", dot_u8_i8);
tiles!(vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_u8_i8_vnni);

/// Four weight rows × four tokens for the signed formats against Q8_0,
/// with AVX-512 VNNI, VL and BW. Weights are unpacked to unsigned bytes
/// with a bias (`x + B`), so `vpdpbusd` multiplies them with the signed
/// activations directly, starting from `-B · Σy` per lane, which leaves
/// each lane's exact integer sum, the same as the sign trick's. Per
/// (weight row, token) the float operations are the one-row kernel's.
pub(super) mod quad {
    use super::*;

    /// `-bias · Σ y` over each lane's four bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(super) fn bias_terms(bias: __m256i, y: __m256i) -> __m256i {
        let zero = _mm256_setzero_si256();
        _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, bias, y))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(super) unsafe fn biased_q8_0(x: &BlockQ8_0) -> __m256i {
        // SAFETY: the block holds 32 bytes of quants.
        _mm256_xor_si256(unsafe { load(&x.qs) }, _mm256_set1_epi8(0x80u8 as i8))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(super) unsafe fn biased_q4_0(x: &BlockQ4_0) -> __m256i {
        // SAFETY: qs is 16 bytes.
        unsafe { nibbles(x.qs.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(super) unsafe fn biased_q5_0(x: &BlockQ5_0) -> __m256i {
        // Value i is its nibble plus 16 where bit i of qh is set.
        let high = _mm256_maskz_mov_epi8(u32::from_le_bytes(x.qh), _mm256_set1_epi8(0x10));
        // SAFETY: qs is 16 bytes.
        _mm256_or_si256(unsafe { nibbles(x.qs.as_ptr()) }, high)
    }

    /// Four weight rows, unpacked once (biased bytes and f32 scales, row
    /// `r`'s block `i` at `r * nb + i`), against every whole four of
    /// tokens; results to `out[r * n + token]`. Returns the tokens done.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    fn gemm4(
        xu: &[__m256i],
        xd: &[f32],
        bias: u8,
        acts: &[BlockQ8_0],
        d: &[f32],
        out: &mut [f32],
    ) -> usize {
        let nb = xd.len() / 4;
        let rows = d.len() / nb;
        let n = out.len() / 4;
        let bias = _mm256_set1_epi8(bias as i8);
        let pick = lane_picks();
        let mut t0 = 0;
        while t0 + 4 <= n {
            let a: [&[BlockQ8_0]; 4] = [
                &acts[t0 * nb..][..nb],
                &acts[(t0 + 1) * nb..][..nb],
                &acts[(t0 + 2) * nb..][..nb],
                &acts[(t0 + 3) * nb..][..nb],
            ];
            let mut acc = [[_mm256_setzero_ps(); 4]; 4];
            for i in 0..nb {
                let yd = &d[i * rows + t0..][..4];
                // SAFETY: four readable floats.
                let yd = unsafe { _mm_loadu_ps(yd.as_ptr()) };
                // SAFETY: Q8_0 blocks hold 32 bytes of quants.
                let qy = unsafe {
                    [
                        load(&a[0][i].qs),
                        load(&a[1][i].qs),
                        load(&a[2][i].qs),
                        load(&a[3][i].qs),
                    ]
                };
                // Plain code, not `map`: a closure would not inherit the
                // target features, and every call would stay a call.
                let start = [
                    bias_terms(bias, qy[0]),
                    bias_terms(bias, qy[1]),
                    bias_terms(bias, qy[2]),
                    bias_terms(bias, qy[3]),
                ];
                for r in 0..4 {
                    let x = xu[r * nb + i];
                    // d(x) * d(y) for the four tokens, as the one-row kernel
                    // multiplies them, then one lane broadcast per token.
                    let s4 = _mm256_castps128_ps256(_mm_mul_ps(_mm_set1_ps(xd[r * nb + i]), yd));
                    for t in 0..4 {
                        let p = _mm256_dpbusd_epi32(start[t], x, qy[t]);
                        let s = _mm256_permutevar8x32_ps(s4, pick[t]);
                        acc[r][t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
            for r in 0..4 {
                for t in 0..4 {
                    out[r * n + t0 + t] = hsum_ps(acc[r][t]);
                }
            }
            t0 += 4;
        }
        t0
    }

    macro_rules! quad {
        ($name:ident, $b:ty, $bias:expr, $unpack:ident) => {
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
            pub(crate) fn $name(
                w: [&[$b]; 4],
                acts: &[BlockQ8_0],
                d: &[f32],
                out: &mut [f32],
            ) -> usize {
                let nb = w[0].len();
                let mut xu = Vec::with_capacity(4 * nb);
                let mut xd = Vec::with_capacity(4 * nb);
                for row in w {
                    for x in row {
                        // SAFETY: the block is whole.
                        xu.push(unsafe { $unpack(x) });
                        xd.push(h(x.d));
                    }
                }
                gemm4(&xu, &xd, $bias, acts, d, out)
            }
        };
    }

    quad!(q8_0, BlockQ8_0, 128u8, biased_q8_0);
    quad!(q4_0, BlockQ4_0, 8u8, biased_q4_0);
    quad!(q5_0, BlockQ5_0, 16u8, biased_q5_0);
}

/// Decoding: four weight rows against one activation row, with AVX-512
/// VNNI, VL and BW. The activation block is loaded (and its bias term
/// computed) once for the four rows, the four scales converted and
/// multiplied together; per row the float operations are the one-row
/// kernel's.
pub(super) mod gemv {
    use super::quad::{bias_terms, biased_q4_0, biased_q5_0, biased_q8_0};
    use super::*;

    /// Asks for the two cache lines at `at + 128 * i`, ahead of use. Rows
    /// lie one after another, so rows to come are found past these: read
    /// four rows side by side, the hardware prefetchers here fell behind
    /// (decoding ran at half speed) where one row at a time streamed
    /// well. A prefetch never faults, wherever it points.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    fn prefetch(at: *const u8, i: usize) {
        let p = at.wrapping_add(128 * i) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
    }

    /// How many groups of four rows past the next one the prefetch skips
    /// (measured: 1 did at least as well as 0 on both models).
    const PREFETCH_QUADS: usize = 1;

    /// The f16 scales of four blocks as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    fn four(h: [half::f16; 4]) -> __m128 {
        let b = |i: usize| h[i].to_bits() as u64;
        let packed = b(0) | b(1) << 16 | b(2) << 32 | b(3) << 48;
        _mm_cvtph_ps(_mm_set_epi64x(0, packed as i64))
    }

    macro_rules! gemv {
        ($name:ident, $b:ty, $bias:expr, $unpack:ident) => {
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
            pub(crate) fn $name(w: [&[$b]; 4], a: &[BlockQ8_0]) -> [f32; 4] {
                let bias = _mm256_set1_epi8($bias as u8 as i8);
                let pick = lane_picks();
                let mut acc = [_mm256_setzero_ps(); 4];
                let next = (w[3].as_ptr_range().end as *const u8)
                    .wrapping_add(PREFETCH_QUADS * 4 * std::mem::size_of_val(w[3]));
                for (i, y) in a.iter().enumerate() {
                    prefetch(next, i);
                    // SAFETY: Q8_0 blocks hold 32 bytes of quants.
                    let qy = unsafe { load(&y.qs) };
                    let start = bias_terms(bias, qy);
                    let xd = four([w[0][i].d, w[1][i].d, w[2][i].d, w[3][i].d]);
                    // d(x) * d(y) per row, as the one-row kernel multiplies.
                    let s4 = _mm256_castps128_ps256(_mm_mul_ps(xd, _mm_set1_ps(h(y.d))));
                    for r in 0..4 {
                        // SAFETY: the block is whole.
                        let xu = unsafe { $unpack(&w[r][i]) };
                        let p = _mm256_dpbusd_epi32(start, xu, qy);
                        let s = _mm256_permutevar8x32_ps(s4, pick[r]);
                        acc[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[r]);
                    }
                }
                [
                    hsum_ps(acc[0]),
                    hsum_ps(acc[1]),
                    hsum_ps(acc[2]),
                    hsum_ps(acc[3]),
                ]
            }
        };
    }

    gemv!(q8_0, BlockQ8_0, 128u8, biased_q8_0);
    gemv!(q4_0, BlockQ4_0, 8u8, biased_q4_0);
    gemv!(q5_0, BlockQ5_0, 16u8, biased_q5_0);

    /// The (scale, min) or (scale, sum) f16 pair at the head of a Q4_1 or
    /// Q8_1 block, as one 32-bit word (scale in the low half).
    #[inline]
    fn head<T>(b: &T) -> i32 {
        // SAFETY: both block types start with their two f16s (repr(C),
        // size asserted in `blocks`), so the first four bytes are readable.
        unsafe { (b as *const T as *const i32).read_unaligned() }
    }

    /// Q4_1 against Q8_1, four rows to a pair of 512-bit registers: the
    /// rows' 16 bytes of nibbles side by side, their low nibbles in one
    /// register (against the activation's first 16 bytes in every 128-bit
    /// lane), their high nibbles in the other (against its last 16). Each
    /// row's eight i32 lanes (four in each register, at the row's place),
    /// their conversion and their fused multiply-add by the block scale are
    /// the one-row kernel's in other lanes, so every lane sums the same
    /// values in the same order. The minimum times the activation block's
    /// sum goes to a running sum per row, from the same product
    /// `[d·d', m·s']` the one-row kernel forms.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(crate) fn q4_1(w: [&[BlockQ4_1]; 4], a: &[BlockQ8_1]) -> [f32; 4] {
        // From [d0·d', m0·s', d1·d', m1·s', ...]: row k's scale in the
        // four lanes of row k.
        let pick = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
        let low = _mm512_set1_epi8(0x0f);
        let mut lo_acc = _mm512_setzero_ps();
        let mut hi_acc = _mm512_setzero_ps();
        let mut summs = _mm256_setzero_ps();
        let next = (w[3].as_ptr_range().end as *const u8)
            .wrapping_add(PREFETCH_QUADS * 4 * std::mem::size_of_val(w[3]));
        let n = a
            .len()
            .min(w[0].len())
            .min(w[1].len())
            .min(w[2].len())
            .min(w[3].len());
        for i in 0..n {
            prefetch(next, i);
            let y = &a[i];
            let yq = y.qs.as_ptr() as *const __m128i;
            // SAFETY: Q8_1 blocks hold 32 bytes of quants, read as two 16s.
            let (ylo, yhi) = unsafe {
                (
                    _mm512_broadcast_i32x4(_mm_loadu_si128(yq)),
                    _mm512_broadcast_i32x4(_mm_loadu_si128(yq.wrapping_add(1))),
                )
            };
            let dsy = _mm256_cvtph_ps(_mm_set1_epi32(head(y)));
            let xdm = _mm_set_epi32(
                head(&w[3][i]),
                head(&w[2][i]),
                head(&w[1][i]),
                head(&w[0][i]),
            );
            let ds = _mm256_mul_ps(_mm256_cvtph_ps(xdm), dsy);
            summs = _mm256_add_ps(summs, ds);
            let scale = _mm512_permutexvar_ps(pick, _mm512_castps256_ps512(ds));
            let qs = [
                w[0][i].qs.as_ptr(),
                w[1][i].qs.as_ptr(),
                w[2][i].qs.as_ptr(),
                w[3][i].qs.as_ptr(),
            ]
            .map(|p| p as *const __m128i);
            // SAFETY: qs is 16 bytes in each block.
            let x = unsafe {
                _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_set_m128i(
                        _mm_loadu_si128(qs[1]),
                        _mm_loadu_si128(qs[0]),
                    )),
                    _mm256_set_m128i(_mm_loadu_si128(qs[3]), _mm_loadu_si128(qs[2])),
                    1,
                )
            };
            let xl = _mm512_and_si512(x, low);
            let xh = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
            let zero = _mm512_setzero_si512();
            let pl = _mm512_dpbusd_epi32(zero, xl, ylo);
            let ph = _mm512_dpbusd_epi32(zero, xh, yhi);
            lo_acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(pl), lo_acc);
            hi_acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(ph), hi_acc);
        }
        let mut m = [0f32; 8];
        let mut lo = [0f32; 16];
        let mut hi = [0f32; 16];
        // SAFETY: the arrays are 8, 16 and 16 writable floats.
        unsafe {
            _mm256_storeu_ps(m.as_mut_ptr(), summs);
            _mm512_storeu_ps(lo.as_mut_ptr(), lo_acc);
            _mm512_storeu_ps(hi.as_mut_ptr(), hi_acc);
        }
        let mut out = [0f32; 4];
        for (k, o) in out.iter_mut().enumerate() {
            // Row k's eight lanes in the one-row kernel's order.
            // SAFETY: 4k + 4 <= 16 floats of each array.
            let v = unsafe {
                _mm256_set_m128(
                    _mm_loadu_ps(hi.as_ptr().add(4 * k)),
                    _mm_loadu_ps(lo.as_ptr().add(4 * k)),
                )
            };
            *o = hsum_ps(v) + m[2 * k + 1];
        }
        out
    }

    /// Every whole four of the rows in `w` (`per` blocks each, one after
    /// another) against one activation row, in one call: results to `out`
    /// (one per row); returns the rows done.
    macro_rules! rows {
        ($name:ident, $four:ident, $b:ty, $a:ty) => {
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
            pub(crate) fn $name(w: &[$b], per: usize, a: &[$a], out: &mut [f32]) -> usize {
                let quads = (w.len() / per.max(1)).min(out.len()) / 4;
                for q in 0..quads {
                    let at = 4 * q * per;
                    let four = [
                        &w[at..at + per],
                        &w[at + per..at + 2 * per],
                        &w[at + 2 * per..at + 3 * per],
                        &w[at + 3 * per..at + 4 * per],
                    ];
                    out[4 * q..4 * q + 4].copy_from_slice(&$four(four, a));
                }
                4 * quads
            }
        };
    }

    rows!(q8_0_rows, q8_0, BlockQ8_0, BlockQ8_0);
    rows!(q4_0_rows, q4_0, BlockQ4_0, BlockQ8_0);
    rows!(q5_0_rows, q5_0, BlockQ5_0, BlockQ8_0);
    rows!(q4_1_rows, q4_1, BlockQ4_1, BlockQ8_1);
}

/// The leading whole fours of the weight rows in `w` (rows of type `ty`,
/// one after another) against activation row `row`, one result per row
/// to `out`; returns how many rows were done (0 where there is no
/// four-row kernel for the pair of formats or the CPU lacks what it needs).
pub(crate) fn gemv_rows(
    ty: crate::quant::GgmlType,
    w: &[u8],
    acts: &crate::quant::ActRows,
    row: usize,
    out: &mut [f32],
) -> usize {
    use crate::quant::{GgmlType as G, QuantActs as Q};
    use bytemuck::cast_slice as c;
    if !quad_available() {
        return 0;
    }
    let per = acts.cols / 32;
    // SAFETY: AVX2, FMA and F16C were checked by the dispatcher, AVX-512
    // F, BW, VNNI and VL just now; the slices carry their own bounds.
    unsafe {
        match (ty, &acts.data) {
            (G::Q8_0, Q::Q8_0(a)) => gemv::q8_0_rows(c(w), per, &a[row * per..][..per], out),
            (G::Q4_0, Q::Q8_0(a)) => gemv::q4_0_rows(c(w), per, &a[row * per..][..per], out),
            (G::Q5_0, Q::Q8_0(a)) => gemv::q5_0_rows(c(w), per, &a[row * per..][..per], out),
            (G::Q4_1, Q::Q8_1(a)) => gemv::q4_1_rows(c(w), per, &a[row * per..][..per], out),
            _ => 0,
        }
    }
}

/// Whether the four-row tiles can run: AVX-512 VNNI with VL and BW.
pub(super) fn quad_available() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| vnni() && is_x86_feature_detected!("avx512bw"))
}

/// Four weight rows of type `ty` against every whole four of the
/// activation rows, to `out[weight row * rows + token]`; returns the tokens
/// done (0 where there is no four-row tile for the pair of formats or the
/// CPU lacks what it needs).
pub(crate) fn rows4(
    ty: crate::quant::GgmlType,
    w: [&[u8]; 4],
    acts: &crate::quant::ActRows,
    out: &mut [f32],
) -> usize {
    use crate::quant::{GgmlType as G, QuantActs as Q};
    use bytemuck::cast_slice as c;
    let sc = &acts.block_scales;
    let (true, Q::Q8_0(a)) = (quad_available(), &acts.data) else {
        return 0;
    };
    if sc.d.is_empty() {
        return 0;
    }
    // SAFETY: AVX2, FMA and F16C were checked by the dispatcher, AVX-512
    // F, BW, VNNI and VL just now; the slices carry their own bounds.
    unsafe {
        match ty {
            G::Q8_0 => quad::q8_0(w.map(c), a, &sc.d, out),
            G::Q4_0 => quad::q4_0(w.map(c), a, &sc.d, out),
            G::Q5_0 => quad::q5_0(w.map(c), a, &sc.d, out),
            _ => 0,
        }
    }
}

/// Whether [`rows4`] has a tile for weights of type `ty`.
pub(crate) fn has_tile4(ty: crate::quant::GgmlType) -> bool {
    use crate::quant::GgmlType as G;
    quad_available() && matches!(ty, G::Q8_0 | G::Q4_0 | G::Q5_0)
}

/// Whether AVX-512 VNNI with VL is present.
pub(super) fn vnni() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    })
}

/// Weight rows `w` (two, of type `ty`) against activation rows
/// `t0..t0 + 4`; `None` when there is no tile for this pair of formats.
pub(crate) fn tile(
    ty: crate::quant::GgmlType,
    w: [&[u8]; 2],
    acts: &crate::quant::ActRows,
    t0: usize,
) -> Option<[[f32; 4]; 2]> {
    tile_with(vnni(), ty, w, acts, t0)
}

/// [`tile`] with the VNNI build chosen by the caller (`vnni` only where
/// [`vnni()`] said so), so that tests check both builds on one machine.
pub(crate) fn tile_with(
    use_vnni: bool,
    ty: crate::quant::GgmlType,
    w: [&[u8]; 2],
    acts: &crate::quant::ActRows,
    t0: usize,
) -> Option<[[f32; 4]; 2]> {
    use crate::quant::{GgmlType as G, QuantActs as Q};
    use bytemuck::cast_slice as c;
    debug_assert!(super::avx2_available() && (!use_vnni || vnni()));
    let n = acts.cols;
    fn rows<T>(a: &[T], t0: usize, per: usize) -> [&[T]; 4] {
        std::array::from_fn(|r| &a[(t0 + r) * per..(t0 + r + 1) * per])
    }
    let sc = &acts.block_scales;
    macro_rules! pick {
        ($f:ident ( $($arg:expr),* )) => {
            // SAFETY: AVX2, FMA and F16C were checked by the dispatcher and
            // VNNI with VL just now; the slices carry their own bounds.
            unsafe {
                if use_vnni {
                    vnni::$f($($arg),*)
                } else {
                    avx2::$f($($arg),*)
                }
            }
        };
    }
    Some(match (ty, &acts.data) {
        (G::Q8_0, Q::Q8_0(a)) if !sc.d.is_empty() => {
            pick!(q8_0([c(w[0]), c(w[1])], rows(a, t0, n / 32), &sc.d, t0))
        }
        (G::Q4_0, Q::Q8_0(a)) if !sc.d.is_empty() => {
            pick!(q4_0([c(w[0]), c(w[1])], rows(a, t0, n / 32), &sc.d, t0))
        }
        (G::Q5_0, Q::Q8_0(a)) if !sc.d.is_empty() => {
            pick!(q5_0([c(w[0]), c(w[1])], rows(a, t0, n / 32), &sc.d, t0))
        }
        (G::Q4_1, Q::Q8_1(a)) if !sc.d.is_empty() => {
            pick!(q4_1(
                [c(w[0]), c(w[1])],
                rows(a, t0, n / 32),
                &sc.d,
                &sc.s,
                t0
            ))
        }
        (G::Q4_K, Q::Q8_K(a)) => {
            pick!(q4_k(
                [c(w[0]), c(w[1])],
                rows(a, t0, n / 256),
                t0 < acts.grouped
            ))
        }
        (G::Q6_K, Q::Q8_K(a)) => {
            let tiled = std::array::from_fn(|r| t0 + r < acts.tiled);
            pick!(q6_k([c(w[0]), c(w[1])], rows(a, t0, n / 256), tiled))
        }
        _ => return None,
    })
}
