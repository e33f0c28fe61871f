//! AVX2 + FMA dot products for x86-64. The only unsafe code of the CPU
//! kernels lives here; each function is checked against the scalar
//! reference in `quant::generic` by the tests in `cpu::tests`.
//!
//! Every entry point is a safe `pub(crate)` wrapper that the dispatcher calls
//! only after `is_x86_feature_detected!` confirmed AVX2 and FMA.

use std::arch::x86_64::*;

use crate::quant::blocks::*;

/// f16 to f32 with the F16C instruction (no run-time dispatch per call).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn h(v: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v.to_bits() as i32)))
}

/// Sum of the eight f32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of the eight i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_epi32(v: __m256i) -> i32 {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256(v, 1);
    let s = _mm_add_epi32(lo, hi);
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// 16 bytes of packed nibbles to 32 bytes: low nibbles first, then high.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: callers pass a pointer to 16 readable bytes.
    let tmp = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// Pairwise products of unsigned bytes `a` and signed bytes `b`, summed to
/// eight i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// Signed-by-signed byte dot product, to eight i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(a, a);
    let sy = _mm256_sign_epi8(b, a);
    dot_u8_i8(ax, sy)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load(p: &[i8; 32]) -> __m256i {
    // SAFETY: the array is 32 readable bytes.
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

/// `d(x) * d(y)` broadcast to all lanes, from one conversion of both f16s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale(x: half::f16, y: half::f16) -> __m256 {
    let p = pair(x, y);
    _mm256_broadcastss_ps(_mm_mul_ss(p, _mm_movehdup_ps(p)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        // SAFETY: both blocks hold 32 bytes of quants.
        let p = dot_i8_i8(unsafe { load(&x.qs) }, unsafe { load(&y.qs) });
        acc = _mm256_fmadd_ps(scale(x.d, y.d), _mm256_cvtepi32_ps(p), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_q8_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        // SAFETY: qs is 16 bytes; y.qs 32.
        let p = unsafe {
            let q = _mm256_sub_epi8(nibbles(x.qs.as_ptr()), _mm256_set1_epi8(8));
            dot_i8_i8(q, load(&y.qs))
        };
        acc = _mm256_fmadd_ps(scale(x.d, y.d), _mm256_cvtepi32_ps(p), acc);
    }
    hsum_ps(acc)
}

/// Both f16 halves of a (scale, min/sum) pair, converted together.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pair(a: half::f16, b: half::f16) -> __m128 {
    let bits = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_q8_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    // [d*d', m*s'] come from one conversion and one multiply per block.
    // Blocks are summed in order into one accumulator, as ggml does: the
    // summation order moves greedy choices at near-ties (see the golden tests).
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        let ds = _mm_mul_ps(pair(x.d, x.m), pair(y.d, y.s));
        summs = _mm_add_ps(summs, ds);
        let d = _mm256_broadcastss_ps(ds);
        // SAFETY: qs is 16 bytes; y.qs 32.
        let p = unsafe { dot_u8_i8(nibbles(x.qs.as_ptr()), load(&y.qs)) };
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    }
    // Lane 1 of `summs` holds the sum of m * s.
    hsum_ps(acc) + _mm_cvtss_f32(_mm_shuffle_ps(summs, summs, 0b01))
}

/// The 32 fifth bits of a Q5 block as bytes 0x00 (bit set) or 0xF0 (clear),
/// so that OR-ing them into the nibbles gives `q - 16` as signed bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q5_high(qh: [u8; 4]) -> __m256i {
    let bits = u32::from_le_bytes(qh) as i32;
    // Spread byte k of the mask to lanes 8k..8k+7, then test bit (i % 8).
    let shuffle = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0x0000_0000_0000_0000,
    );
    let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), shuffle);
    let bit = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, bit), _mm256_set1_epi64x(-1));
    _mm256_andnot_si256(set, _mm256_set1_epi8(0xf0u8 as i8))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q5_0_q8_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        // SAFETY: qs is 16 bytes; y.qs 32.
        let p = unsafe {
            let q = _mm256_or_si256(nibbles(x.qs.as_ptr()), q5_high(x.qh));
            dot_i8_i8(q, load(&y.qs))
        };
        acc = _mm256_fmadd_ps(scale(x.d, y.d), _mm256_cvtepi32_ps(p), acc);
    }
    hsum_ps(acc)
}

/// A Q4_K block's scales (as i16) and mins.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4_k_scales_mins(x: &BlockQ4K) -> ([i16; 8], [i32; 8]) {
    // The twelve bytes four at a time, as ggml unpacks them: six-bit
    // scales and mins 0-3 whole in the first eight bytes; 4-7 as low
    // nibbles in the last four plus the top two bits of the first eight.
    let word = |k: usize| {
        u32::from_le_bytes([
            x.scales[4 * k],
            x.scales[4 * k + 1],
            x.scales[4 * k + 2],
            x.scales[4 * k + 3],
        ])
    };
    let (u0, u1, u2) = (word(0), word(1), word(2));
    const SIX: u32 = 0x3f3f_3f3f;
    const NIBBLE: u32 = 0x0f0f_0f0f;
    const TWO: u32 = 0x0303_0303;
    let scales = [u0 & SIX, (u2 & NIBBLE) | (((u0 >> 6) & TWO) << 4)];
    let mins = [u1 & SIX, ((u2 >> 4) & NIBBLE) | (((u1 >> 6) & TWO) << 4)];
    let byte = |w: [u32; 2], j: usize| (w[j / 4] >> (8 * (j % 4))) as u8;
    (
        std::array::from_fn(|j| byte(scales, j) as i16),
        std::array::from_fn(|j| byte(mins, j) as i32),
    )
}

/// The minimum terms of each 64-value chunk: `m * (sum of y)` over its two
/// sub-blocks.
#[inline]
pub(super) fn q4_k_min_terms(mins: &[i32; 8], y: &BlockQ8K) -> [i32; 4] {
    let s = |j: usize| y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32;
    std::array::from_fn(|c| mins[2 * c] * s(2 * c) + mins[2 * c + 1] * s(2 * c + 1))
}

/// Sums of each pair of 16-value block sums of `y`: its eight 32-value
/// sub-block sums as i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q8_k_pair_sums(y: &BlockQ8K) -> __m256i {
    // SAFETY: bsums is 16 i16, 32 readable bytes.
    let b = unsafe { _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i) };
    _mm256_madd_epi16(b, _mm256_set1_epi16(1))
}

/// [`q4_k_min_terms`] for four tokens at once (their sub-block sums from
/// [`q8_k_pair_sums`]): entry `c` holds chunk `c`'s term for token `t` in
/// lane `t`. Integer sums, the same in any order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4_k_min_terms4(mins: &[i32; 8], sums: [__m256i; 4]) -> [__m128i; 4] {
    // SAFETY: `mins` is 32 readable bytes.
    let m = unsafe { _mm256_loadu_si256(mins.as_ptr() as *const __m256i) };
    // Per token [m0·s0, ..., m7·s7]; adjacent pairs added give lanes
    // [t0c0, t0c1, t1c0, t1c1 | t0c2, t0c3, t1c2, t1c3] and likewise for
    // tokens 2 and 3.
    let a = _mm256_hadd_epi32(
        _mm256_mullo_epi32(sums[0], m),
        _mm256_mullo_epi32(sums[1], m),
    );
    let b = _mm256_hadd_epi32(
        _mm256_mullo_epi32(sums[2], m),
        _mm256_mullo_epi32(sums[3], m),
    );
    let (alo, ahi) = (_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
    let (blo, bhi) = (_mm256_castsi256_si128(b), _mm256_extracti128_si256::<1>(b));
    let (alo, ahi, blo, bhi) = (
        _mm_castsi128_ps(alo),
        _mm_castsi128_ps(ahi),
        _mm_castsi128_ps(blo),
        _mm_castsi128_ps(bhi),
    );
    // Even lanes of both, then odd lanes of both.
    const EVEN: i32 = 0b10_00_10_00;
    const ODD: i32 = 0b11_01_11_01;
    [
        _mm_castps_si128(_mm_shuffle_ps::<EVEN>(alo, blo)),
        _mm_castps_si128(_mm_shuffle_ps::<ODD>(alo, blo)),
        _mm_castps_si128(_mm_shuffle_ps::<EVEN>(ahi, bhi)),
        _mm_castps_si128(_mm_shuffle_ps::<ODD>(ahi, bhi)),
    ]
}

/// Low and high nibbles of chunk `c` (64 values) of a Q4_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4_k_chunk(x: &BlockQ4K, c: usize) -> (__m256i, __m256i) {
    // SAFETY: 32 bytes of qs per chunk (c < 4).
    let raw = unsafe { _mm256_loadu_si256(x.qs[32 * c..].as_ptr() as *const __m256i) };
    let m4 = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(raw, m4),
        _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
    )
}

/// Chunk `c`'s scaled dot products with `y`, eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4_k_chunk_dot(
    lo: __m256i,
    hi: __m256i,
    sc: &[i16; 8],
    y: &BlockQ8K,
    c: usize,
) -> __m256i {
    // SAFETY: 64 bytes of q8 per chunk (c < 4).
    let (y0, y1) = unsafe {
        (
            _mm256_loadu_si256(y.qs[64 * c..].as_ptr() as *const __m256i),
            _mm256_loadu_si256(y.qs[64 * c + 32..].as_ptr() as *const __m256i),
        )
    };
    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16(sc[2 * c]));
    let p1 = _mm256_madd_epi16(
        _mm256_maddubs_epi16(hi, y1),
        _mm256_set1_epi16(sc[2 * c + 1]),
    );
    _mm256_add_epi32(p0, p1)
}

/// Q4_K against Q8_K in the order of llama.cpp's repacked x86 kernels
/// (see [`super::q4_k_accumulate`]).
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_q8_k(w: &[BlockQ4K], a: &[BlockQ8K], grouped: bool) -> f32 {
    let (mut acc, mut accm) = (0f32, 0f32);
    for (x, y) in w.iter().zip(a) {
        let (sc, mins) = q4_k_scales_mins(x);
        let mut isb = [0i32; 4];
        for (c, s) in isb.iter_mut().enumerate() {
            let (lo, hi) = q4_k_chunk(x, c);
            *s = hsum_epi32(q4_k_chunk_dot(lo, hi, &sc, y, c));
        }
        let imin = q4_k_min_terms(&mins, y);
        let (d, m) = (h(x.d) * y.d, h(x.dmin) * y.d);
        super::q4_k_accumulate(&mut acc, &mut accm, isb, imin, d, m, grouped);
    }
    acc - accm
}

/// Q6_K's four quarter-blocks of 32 six-bit values (unsigned, 0..63) in
/// one half-block: ggml's x86 layout.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6_k_quarters(ql0: __m256i, ql1: __m256i, qh: __m256i) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(0x03);
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4),
        ),
    ]
}

/// Half-block `n` of a Q6_K block as its four quarters.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6_k_half(x: &BlockQ6K, n: usize) -> [__m256i; 4] {
    // SAFETY: ql has 64 bytes and qh 32 per half (n < 2).
    unsafe {
        q6_k_quarters(
            _mm256_loadu_si256(x.ql[64 * n..].as_ptr() as *const __m256i),
            _mm256_loadu_si256(x.ql[64 * n + 32..].as_ptr() as *const __m256i),
            _mm256_loadu_si256(x.qh[32 * n..].as_ptr() as *const __m256i),
        )
    }
}

/// The two 16-value scales of quarter `k` of half `n`, one per 128-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6_k_scale(x: &BlockQ6K, n: usize, k: usize) -> __m256i {
    let s0 = x.scales[8 * n + 2 * k] as i16;
    let s1 = x.scales[8 * n + 2 * k + 1] as i16;
    _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0))
}

/// What the values' offset of 32 contributes, lane by lane as ggml's x86
/// kernel subtracts it: `32 * (scale * block sum)`, pairs of sub-blocks a
/// lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6_k_offset(x: &BlockQ6K, y: &BlockQ8K) -> __m256i {
    // SAFETY: bsums is 32 readable bytes, scales 16.
    let (bsums, scales) = unsafe {
        (
            _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
            _mm_loadu_si128(x.scales.as_ptr() as *const __m128i),
        )
    };
    _mm256_slli_epi32(_mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(scales)), 5)
}

/// 32 activation bytes of quarter `k` of half `n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q8_k_quarter(y: &BlockQ8K, n: usize, k: usize) -> __m256i {
    // SAFETY: 32 readable bytes (n < 2, k < 4).
    unsafe { _mm256_loadu_si256(y.qs[128 * n + 32 * k..].as_ptr() as *const __m256i) }
}

/// The eight i32 lanes of a vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn lanes_epi32(v: __m256i) -> [i32; 8] {
    let mut out = [0i32; 8];
    // SAFETY: `out` is 32 writable bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v) };
    out
}

/// The eight lanes added as ggml's `hsum_float_8` adds them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_lanes(acc: [f32; 8]) -> f32 {
    // SAFETY: `acc` is 32 readable bytes.
    hsum_ps(unsafe { _mm256_loadu_ps(acc.as_ptr()) })
}

/// One Q6_K block against one Q8_K block: eight i32 lanes, the offset of
/// 32 taken off (ggml's x86 lane layout).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6_k_lanes(x: &BlockQ6K, y: &BlockQ8K) -> __m256i {
    let mut sumi = _mm256_setzero_si256();
    for n in 0..2 {
        for (k, q) in q6_k_half(x, n).into_iter().enumerate() {
            let p = _mm256_maddubs_epi16(q, q8_k_quarter(y, n, k));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, q6_k_scale(x, n, k)));
        }
    }
    _mm256_sub_epi32(sumi, q6_k_offset(x, y))
}

/// Q6_K against Q8_K in llama.cpp's x86 order (see [`super::q6_k_block`]).
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_q8_k(w: &[BlockQ6K], a: &[BlockQ8K], tiled: bool) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in w.iter().zip(a) {
        super::q6_k_block(&mut acc, lanes_epi32(q6_k_lanes(x, y)), h(x.d), y.d, tiled);
    }
    if tiled {
        acc[0]
    } else {
        hsum_lanes(acc)
    }
}

// Safe wrappers. The dispatcher in `cpu::mod` calls them only when AVX2 and
// FMA were detected at run time.

pub(crate) fn dot_q6_k_q8_k(w: &[BlockQ6K], a: &[BlockQ8K], tiled: bool) -> f32 {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time; the slices
    // carry their own bounds.
    unsafe { q6_k_q8_k(w, a, tiled) }
}

pub(crate) fn dot_q4_k_q8_k(w: &[BlockQ4K], a: &[BlockQ8K], grouped: bool) -> f32 {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time; the slices
    // carry their own bounds.
    unsafe { q4_k_q8_k(w, a, grouped) }
}

macro_rules! safe {
    ($name:ident, $inner:ident, $w:ty, $a:ty) => {
        pub(crate) fn $name(w: &[$w], a: &[$a]) -> f32 {
            debug_assert!(super::avx2_available());
            // SAFETY: the dispatcher checked AVX2 and FMA at run time; the
            // slices carry their own bounds.
            unsafe { $inner(w, a) }
        }
    };
}

safe!(dot_q8_0_q8_0, q8_0_q8_0, BlockQ8_0, BlockQ8_0);
safe!(dot_q4_0_q8_0, q4_0_q8_0, BlockQ4_0, BlockQ8_0);
safe!(dot_q4_1_q8_1, q4_1_q8_1, BlockQ4_1, BlockQ8_1);
safe!(dot_q5_0_q8_0, q5_0_q8_0, BlockQ5_0, BlockQ8_0);

// ---------------------------------------------------------------------------
// Several activation rows against one weight row: each weight block is
// unpacked once and used for all rows (prefill, where tokens come in batches).

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_rows<const R: usize>(w: &[BlockQ8_0], a: [&[BlockQ8_0]; R]) -> [f32; R] {
    // One accumulator per row, summing blocks in the same order as the
    // one-row kernel (and ggml), so batched and single-token results are
    // bit-identical.
    let mut acc = [_mm256_setzero_ps(); R];
    for (i, x) in w.iter().enumerate() {
        // SAFETY: the block holds 32 bytes of quants.
        let qx = unsafe { load(&x.qs) };
        let ax = _mm256_sign_epi8(qx, qx);
        for r in 0..R {
            let y = &a[r][i];
            // SAFETY: as above.
            let qy = unsafe { load(&y.qs) };
            let p = dot_u8_i8(ax, _mm256_sign_epi8(qy, qx));
            acc[r] = _mm256_fmadd_ps(scale(x.d, y.d), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(acc[r]);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q5_0_rows<const R: usize>(w: &[BlockQ5_0], a: [&[BlockQ8_0]; R]) -> [f32; R] {
    // One accumulator per row, summing blocks in the same order as the
    // one-row kernel (and ggml), so batched and single-token results are
    // bit-identical.
    let mut acc = [_mm256_setzero_ps(); R];
    for (i, x) in w.iter().enumerate() {
        // SAFETY: qs is 16 bytes.
        let qx = _mm256_or_si256(unsafe { nibbles(x.qs.as_ptr()) }, q5_high(x.qh));
        let ax = _mm256_sign_epi8(qx, qx);
        for r in 0..R {
            let y = &a[r][i];
            // SAFETY: y.qs is 32 bytes.
            let qy = unsafe { load(&y.qs) };
            let p = dot_u8_i8(ax, _mm256_sign_epi8(qy, qx));
            acc[r] = _mm256_fmadd_ps(scale(x.d, y.d), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(acc[r]);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_rows<const R: usize>(w: &[BlockQ4_1], a: [&[BlockQ8_1]; R]) -> [f32; R] {
    // One accumulator per row, summing blocks in the same order as the
    // one-row kernel (and ggml), so batched and single-token results are
    // bit-identical.
    let mut acc = [_mm256_setzero_ps(); R];
    let mut summs = [0f32; R];
    for (i, x) in w.iter().enumerate() {
        // SAFETY: qs is 16 bytes.
        let qx = unsafe { nibbles(x.qs.as_ptr()) };
        for r in 0..R {
            let y = &a[r][i];
            summs[r] += h(x.m) * h(y.s);
            // SAFETY: y.qs is 32 bytes.
            let p = dot_u8_i8(qx, unsafe { load(&y.qs) });
            acc[r] = _mm256_fmadd_ps(scale(x.d, y.d), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(acc[r]) + summs[r];
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_rows<const R: usize>(w: &[BlockQ4K], a: [&[BlockQ8K]; R], grouped: bool) -> [f32; R] {
    // Per row exactly the one-row kernel's operations.
    let mut acc = [(0f32, 0f32); R];
    for (i, x) in w.iter().enumerate() {
        let (sc, mins) = q4_k_scales_mins(x);
        let mut isb = [[0i32; 4]; R];
        for c in 0..4 {
            let (lo, hi) = q4_k_chunk(x, c);
            for (sums, y) in isb.iter_mut().zip(&a) {
                sums[c] = hsum_epi32(q4_k_chunk_dot(lo, hi, &sc, &y[i], c));
            }
        }
        let (dx, mx) = (h(x.d), h(x.dmin));
        for r in 0..R {
            let y = &a[r][i];
            let imin = q4_k_min_terms(&mins, y);
            let (s, m) = &mut acc[r];
            super::q4_k_accumulate(s, m, isb[r], imin, dx * y.d, mx * y.d, grouped);
        }
    }
    acc.map(|(s, m)| s - m)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_rows<const R: usize>(w: &[BlockQ6K], a: [&[BlockQ8K]; R], tiled: [bool; R]) -> [f32; R] {
    // Per row exactly the one-row kernel's operations.
    let mut acc = [[0f32; 8]; R];
    for (i, x) in w.iter().enumerate() {
        let mut sumi = [_mm256_setzero_si256(); R];
        for n in 0..2 {
            for (k, q) in q6_k_half(x, n).into_iter().enumerate() {
                let scale = q6_k_scale(x, n, k);
                for r in 0..R {
                    let p = _mm256_maddubs_epi16(q, q8_k_quarter(&a[r][i], n, k));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, scale));
                }
            }
        }
        let dx = h(x.d);
        for r in 0..R {
            let y = &a[r][i];
            let l = lanes_epi32(_mm256_sub_epi32(sumi[r], q6_k_offset(x, y)));
            super::q6_k_block(&mut acc[r], l, dx, y.d, tiled[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = if tiled[r] {
            acc[r][0]
        } else {
            hsum_lanes(acc[r])
        };
    }
    out
}

/// Four activation rows at once; `None` when there is no multi-row kernel
/// for this pair of formats.
pub(crate) fn dot_rows4(
    ty: crate::quant::GgmlType,
    w: &[u8],
    acts: &crate::quant::ActRows,
    t0: usize,
) -> Option<[f32; 4]> {
    use crate::quant::{GgmlType as G, QuantActs as Q};
    use bytemuck::cast_slice as c;
    debug_assert!(super::avx2_available());
    let n = acts.cols;
    fn rows<T>(a: &[T], t0: usize, per: usize) -> [&[T]; 4] {
        std::array::from_fn(|r| &a[(t0 + r) * per..(t0 + r + 1) * per])
    }
    // SAFETY (all arms): the dispatcher checked AVX2, FMA and F16C at run
    // time; the slices carry their own bounds.
    unsafe {
        Some(match (ty, &acts.data) {
            (G::Q8_0, Q::Q8_0(a)) => q8_0_rows(c(w), rows(a, t0, n / 32)),
            (G::Q5_0, Q::Q8_0(a)) => q5_0_rows(c(w), rows(a, t0, n / 32)),
            (G::Q4_1, Q::Q8_1(a)) => q4_1_rows(c(w), rows(a, t0, n / 32)),
            (G::Q4_K, Q::Q8_K(a)) => q4_k_rows(c(w), rows(a, t0, n / 256), t0 < acts.grouped),
            (G::Q6_K, Q::Q8_K(a)) => q6_k_rows(
                c(w),
                rows(a, t0, n / 256),
                std::array::from_fn(|r| t0 + r < acts.tiled),
            ),
            _ => return None,
        })
    }
}

// Attention compiled for AVX2: the same code as the portable build, which
// the compiler vectorises eight lanes wide (every sum keeps its order, and
// Rust never fuses a multiply and an add on its own: the fused ones are
// written as `mul_add`, which FMA turns into one instruction instead of a
// call).

#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2(
    query: crate::model::ops::HeadQuery<'_>,
    cache: crate::model::ops::HeadCache<'_>,
    out: &mut [f32],
) {
    crate::model::ops::attend_body_with(query, cache, out, |h, f| widen_f16(h, f), |x| round_f16(x))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn attend_tiled_rows_avx2(
    q: &[f32],
    hd: usize,
    cells: &(dyn Fn(usize) -> std::ops::Range<usize> + Sync),
    scale: crate::model::ops::AttnScale,
    cache: crate::model::ops::HeadCache<'_>,
    out: &mut [f32],
) {
    crate::model::ops::attend_tiled_rows_with(q, hd, cells, scale, cache, out, |h, f| {
        widen_f16(h, f)
    })
}

pub(crate) fn attend_tiled_rows(
    q: &[f32],
    hd: usize,
    cells: &(dyn Fn(usize) -> std::ops::Range<usize> + Sync),
    scale: crate::model::ops::AttnScale,
    cache: crate::model::ops::HeadCache<'_>,
    out: &mut [f32],
) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2, FMA and F16C at run time.
    unsafe { attend_tiled_rows_avx2(q, hd, cells, scale, cache, out) }
}

/// Rounds f32 values to the nearest f16 (ties to even) in place, eight at
/// a time with F16C; the same rounding as the portable conversion.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round_f16(x: &mut [f32]) {
    let n = x.len();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within the slice.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
            _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for v in &mut x[i..] {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// f16 to f32, eight at a time with F16C (exact, as every conversion).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both slices.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = s.to_f32();
    }
}

pub(crate) fn attend(
    query: crate::model::ops::HeadQuery<'_>,
    cache: crate::model::ops::HeadCache<'_>,
    out: &mut [f32],
) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2, FMA and F16C at run time.
    unsafe { attend_avx2(query, cache, out) }
}

/// [`crate::quant::generic::quantize_row_q8_k`], eight values a step.
/// Bit-identical: the same maximum (the first value of the largest
/// magnitude), the same `-127 / max` scale and products, the same rounding
/// and cap.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_row_q8_k_avx2(x: &[f32], y: &mut [BlockQ8K]) {
    use crate::quant::QK_K;
    for (b, x) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let amax = max_magnitude(x);
        let Some(&max) = x.iter().find(|v| v.abs() == amax).filter(|_| amax > 0.0) else {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        };
        let iscale = -127.0 / max;
        for (q, x) in b.qs.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
            round32(x, iscale, q.try_into().expect("32 quants"));
        }
        for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// The largest magnitude of `x` (a multiple of eight floats; NaN passed
/// over, as `f32::max` and the scalar comparisons do).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn max_magnitude(x: &[f32]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for c in x.chunks_exact(8) {
        // SAFETY: eight readable floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        m = _mm256_max_ps(_mm256_andnot_ps(sign, v), m);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: eight writable floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    lanes.iter().fold(0f32, |a, &b| a.max(b))
}

/// `x` (32 floats) times `scale`, rounded half to even as the scalar
/// code's magic-number addition rounds (exact for these magnitudes),
/// capped at 127 as Q8_K's scalar code caps (for Q8_0 and Q8_1 the
/// products never pass 127.5, so there the cap changes nothing), as 32
/// signed bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round32(x: &[f32], scale: f32, out: &mut [i8; 32]) {
    let (is, cap) = (_mm256_set1_ps(scale), _mm256_set1_ps(127.0));
    let mut v = [_mm256_setzero_si256(); 4];
    for (k, v) in v.iter_mut().enumerate() {
        // SAFETY: eight readable floats at 8k (k < 4) of 32.
        let f = _mm256_mul_ps(unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) }, is);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
        *v = _mm256_cvtps_epi32(_mm256_min_ps(r, cap));
    }
    // Lane order after the two in-lane packs.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(v[0], v[1]),
        _mm256_packs_epi32(v[2], v[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: 32 writable bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, p) };
}

/// [`crate::quant::generic::quantize_row_q8_0`] and `_q8_1` eight values
/// a step, bit-identical: the same largest magnitude, scale, products and
/// rounding.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_row_q8_0_avx2(x: &[f32], y: &mut [BlockQ8_0]) {
    for (b, x) in y.iter_mut().zip(x.chunks_exact(32)) {
        let amax = max_magnitude(x);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = half::f16::from_f32(d);
        round32(x, id, &mut b.qs);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_row_q8_1_avx2(x: &[f32], y: &mut [BlockQ8_1]) {
    for (b, x) in y.iter_mut().zip(x.chunks_exact(32)) {
        let amax = max_magnitude(x);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        round32(x, id, &mut b.qs);
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        b.d = half::f16::from_f32(d);
        b.s = half::f16::from_f32(d * sum as f32);
    }
}

pub(crate) fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time.
    unsafe { quantize_row_q8_0_avx2(x, y) }
}

pub(crate) fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time.
    unsafe { quantize_row_q8_1_avx2(x, y) }
}

pub(crate) fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time.
    unsafe { quantize_row_q8_k_avx2(x, y) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn rope_fma(rope: &crate::model::ops::Rope, x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    rope.apply_body(x, head_dim, cs)
}

pub(crate) fn rope(
    rope: &crate::model::ops::Rope,
    x: &mut [f32],
    head_dim: usize,
    cs: &[(f32, f32)],
) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time.
    unsafe { rope_fma(rope, x, head_dim, cs) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn swiglu_fma(g: &mut [f32], u: &[f32]) {
    crate::model::ops::swiglu_body(g, u)
}

pub(crate) fn swiglu(g: &mut [f32], u: &[f32]) {
    debug_assert!(super::avx2_available());
    // SAFETY: the dispatcher checked AVX2 and FMA at run time.
    unsafe { swiglu_fma(g, u) }
}
