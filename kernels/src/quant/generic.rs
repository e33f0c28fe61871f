//! Portable scalar reference: dequantisation, activation quantisation and dot
//! products for every supported format. Integer arithmetic inside a block,
//! as ggml does, so results match llama.cpp's up to float summation order.

use half::{bf16, f16};

use super::blocks::*;

#[inline]
fn h(v: f16) -> f32 {
    v.to_f32()
}

// ---------------------------------------------------------------- dequantise

pub fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK4_0)) {
        let d = h(b.d);
        for j in 0..QK4_0 / 2 {
            y[j] = ((b.qs[j] & 0x0f) as i32 - 8) as f32 * d;
            y[j + QK4_0 / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(x: &[BlockQ4_1], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK4_1)) {
        let (d, m) = (h(b.d), h(b.m));
        for j in 0..QK4_1 / 2 {
            y[j] = (b.qs[j] & 0x0f) as f32 * d + m;
            y[j + QK4_1 / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// The two 5-bit values at position `j` of a Q5 block (low half, high half).
#[inline]
fn q5_pair(qs: &[u8; 16], qh: u32, j: usize) -> (i32, i32) {
    let xh0 = (((qh >> j) << 4) & 0x10) as u8;
    let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
    (((qs[j] & 0x0f) | xh0) as i32, ((qs[j] >> 4) | xh1) as i32)
}

pub fn dequantize_q5_0(x: &[BlockQ5_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK5_0)) {
        let d = h(b.d);
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK5_0 / 2 {
            let (x0, x1) = q5_pair(&b.qs, qh, j);
            y[j] = (x0 - 16) as f32 * d;
            y[j + QK5_0 / 2] = (x1 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(x: &[BlockQ5_1], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK5_1)) {
        let (d, m) = (h(b.d), h(b.m));
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK5_1 / 2 {
            let (x0, x1) = q5_pair(&b.qs, qh, j);
            y[j] = x0 as f32 * d + m;
            y[j + QK5_1 / 2] = x1 as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let d = h(b.d);
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

pub fn dequantize_q8_1(x: &[BlockQ8_1], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK8_1)) {
        let d = h(b.d);
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

pub fn dequantize_q8_k(x: &[BlockQ8K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * b.d;
        }
    }
}

/// Q2_K value of element `i` (0..256) and its sub-block (0..16).
#[inline]
fn q2k_value(b: &BlockQ2K, i: usize) -> (i32, usize) {
    let half = i / 128; // which 128-element half
    let r = i % 128;
    let j = r / 32; // shift step
    let l = r % 32; // position inside the 32 bytes
    let q = b.qs[half * 32 + l];
    (((q >> (2 * j)) & 3) as i32, i / 16)
}

pub fn dequantize_q2_k(x: &[BlockQ2K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (h(b.d), h(b.dmin));
        for (i, o) in y.iter_mut().enumerate() {
            let (q, is) = q2k_value(b, i);
            let sc = b.scales[is];
            *o = d * (sc & 0x0f) as f32 * q as f32 - dmin * (sc >> 4) as f32;
        }
    }
}

/// The sixteen 6-bit Q3_K scales, already offset by -32.
fn q3k_scales(b: &BlockQ3K) -> [i32; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let s = &b.scales;
    let mut aux = [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
        0,
    ];
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut out = [0i32; 16];
    for (k, o) in out.iter_mut().enumerate() {
        *o = (aux[k / 4] >> (8 * (k % 4))) as u8 as i8 as i32 - 32;
    }
    out
}

/// Q3_K value (-4..=3) of element `i`.
#[inline]
fn q3k_value(b: &BlockQ3K, i: usize) -> i32 {
    let half = i / 128;
    let r = i % 128;
    let j = r / 32;
    let l = r % 32;
    let low = ((b.qs[half * 32 + l] >> (2 * j)) & 3) as i32;
    let m = 1u8 << (half * 4 + j);
    low - if b.hmask[l] & m != 0 { 0 } else { 4 }
}

pub fn dequantize_q3_k(x: &[BlockQ3K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = h(b.d);
        let sc = q3k_scales(b);
        for (i, o) in y.iter_mut().enumerate() {
            *o = d * sc[i / 16] as f32 * q3k_value(b, i) as f32;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline]
fn q4k_value(b: &BlockQ4K, i: usize) -> i32 {
    let chunk = i / 64;
    let r = i % 64;
    let q = b.qs[chunk * 32 + r % 32];
    (if r < 32 { q & 0x0f } else { q >> 4 }) as i32
}

pub fn dequantize_q4_k(x: &[BlockQ4K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (h(b.d), h(b.dmin));
        for (i, o) in y.iter_mut().enumerate() {
            let (sc, m) = scale_min_k4(i / 32, &b.scales);
            *o = d * sc as f32 * q4k_value(b, i) as f32 - dmin * m as f32;
        }
    }
}

#[inline]
fn q5k_value(b: &BlockQ5K, i: usize) -> i32 {
    let chunk = i / 64;
    let r = i % 64;
    let l = r % 32;
    let q = b.qs[chunk * 32 + l];
    let (low, bit) = if r < 32 {
        (q & 0x0f, 1u8 << (2 * chunk))
    } else {
        (q >> 4, 2u8 << (2 * chunk))
    };
    low as i32 + if b.qh[l] & bit != 0 { 16 } else { 0 }
}

pub fn dequantize_q5_k(x: &[BlockQ5K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (h(b.d), h(b.dmin));
        for (i, o) in y.iter_mut().enumerate() {
            let (sc, m) = scale_min_k4(i / 32, &b.scales);
            *o = d * sc as f32 * q5k_value(b, i) as f32 - dmin * m as f32;
        }
    }
}

/// Q6_K value (-32..=31) of element `i`.
#[inline]
fn q6k_value(b: &BlockQ6K, i: usize) -> i32 {
    let n = i / 128;
    let p = i % 128;
    let l = p % 32;
    let quarter = p / 32; // 0..4
    let ql = b.ql[n * 64 + l + if quarter % 2 == 1 { 32 } else { 0 }];
    let low = if quarter < 2 { ql & 0x0f } else { ql >> 4 };
    let high = (b.qh[n * 32 + l] >> (2 * quarter)) & 3;
    (low | (high << 4)) as i32 - 32
}

pub fn dequantize_q6_k(x: &[BlockQ6K], y: &mut [f32]) {
    for (b, y) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = h(b.d);
        for (i, o) in y.iter_mut().enumerate() {
            *o = d * b.scales[i / 16] as f32 * q6k_value(b, i) as f32;
        }
    }
}

// ------------------------------------------------- quantise activation rows

/// Round half to even, as the x86 kernels (and ggml's `nearest_int`) do.
/// Adding 1.5 * 2^23 pushes the fraction out of the mantissa under the
/// default rounding mode; exact for |v| < 2^22, and callers pass |v| <= 127.
#[inline]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[inline]
fn round_i8(v: f32) -> i8 {
    round_half_even(v) as i8
}

pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (b, x) in y.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round_i8(v * id);
        }
    }
}

pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (b, x) in y.iter_mut().zip(x.chunks_exact(QK8_1)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round_i8(v * id);
            sum += *q as i32;
        }
        b.d = f16::from_f32(d);
        b.s = f16::from_f32(d * sum as f32);
    }
}

pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    for (b, x) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round_half_even(iscale * v).min(127.0) as i8;
        }
        for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

// ------------------------------------------------------------ dot products

pub fn dot_f32(w: &[f32], a: &[f32]) -> f32 {
    w.iter().zip(a).map(|(x, y)| x * y).sum()
}

pub fn dot_f16(w: &[f16], a: &[f16]) -> f32 {
    w.iter().zip(a).map(|(x, y)| x.to_f32() * y.to_f32()).sum()
}

pub fn dot_bf16(w: &[bf16], a: &[bf16]) -> f32 {
    w.iter().zip(a).map(|(x, y)| x.to_f32() * y.to_f32()).sum()
}

pub fn dot_q4_0_q8_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut sumi = 0i32;
        for j in 0..QK4_0 / 2 {
            let v0 = (x.qs[j] & 0x0f) as i32 - 8;
            let v1 = (x.qs[j] >> 4) as i32 - 8;
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + QK4_0 / 2] as i32;
        }
        sumf += sumi as f32 * (h(x.d) * h(y.d));
    }
    sumf
}

pub fn dot_q4_1_q8_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut sumi = 0i32;
        for j in 0..QK4_1 / 2 {
            let v0 = (x.qs[j] & 0x0f) as i32;
            let v1 = (x.qs[j] >> 4) as i32;
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + QK4_1 / 2] as i32;
        }
        sumf += (h(x.d) * h(y.d)) * sumi as f32 + h(x.m) * h(y.s);
    }
    sumf
}

pub fn dot_q5_0_q8_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let qh = u32::from_le_bytes(x.qh);
        let mut sumi = 0i32;
        for j in 0..QK5_0 / 2 {
            let (x0, x1) = q5_pair(&x.qs, qh, j);
            sumi += (x0 - 16) * y.qs[j] as i32 + (x1 - 16) * y.qs[j + QK5_0 / 2] as i32;
        }
        sumf += sumi as f32 * (h(x.d) * h(y.d));
    }
    sumf
}

pub fn dot_q5_1_q8_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let qh = u32::from_le_bytes(x.qh);
        let mut sumi = 0i32;
        for j in 0..QK5_1 / 2 {
            let (x0, x1) = q5_pair(&x.qs, qh, j);
            sumi += x0 * y.qs[j] as i32 + x1 * y.qs[j + QK5_1 / 2] as i32;
        }
        sumf += (h(x.d) * h(y.d)) * sumi as f32 + h(x.m) * h(y.s);
    }
    sumf
}

pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let sumi: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sumf += sumi as f32 * (h(x.d) * h(y.d));
    }
    sumf
}

pub fn dot_q2_k_q8_k(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut isum = 0i32;
        let mut summs = 0i32;
        for is in 0..QK_K / 16 {
            let sc = x.scales[is];
            summs += (sc >> 4) as i32 * y.bsums[is] as i32;
            let mut s = 0i32;
            for i in is * 16..is * 16 + 16 {
                s += q2k_value(x, i).0 * y.qs[i] as i32;
            }
            isum += (sc & 0x0f) as i32 * s;
        }
        sumf += y.d * h(x.d) * isum as f32 - y.d * h(x.dmin) * summs as f32;
    }
    sumf
}

pub fn dot_q3_k_q8_k(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let sc = q3k_scales(x);
        let mut isum = 0i32;
        for (is, &scale) in sc.iter().enumerate() {
            let mut s = 0i32;
            for i in is * 16..is * 16 + 16 {
                s += q3k_value(x, i) * y.qs[i] as i32;
            }
            isum += scale * s;
        }
        sumf += h(x.d) * y.d * isum as f32;
    }
    sumf
}

pub fn dot_q4_k_q8_k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut isum = 0i32;
        let mut summ = 0i32;
        for j in 0..QK_K / 32 {
            let (sc, m) = scale_min_k4(j, &x.scales);
            summ += m as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
            let mut s = 0i32;
            for i in j * 32..j * 32 + 32 {
                s += q4k_value(x, i) * y.qs[i] as i32;
            }
            isum += sc as i32 * s;
        }
        sumf += h(x.d) * y.d * isum as f32 - h(x.dmin) * y.d * summ as f32;
    }
    sumf
}

pub fn dot_q5_k_q8_k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut isum = 0i32;
        let mut summ = 0i32;
        for j in 0..QK_K / 32 {
            let (sc, m) = scale_min_k4(j, &x.scales);
            summ += m as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
            let mut s = 0i32;
            for i in j * 32..j * 32 + 32 {
                s += q5k_value(x, i) * y.qs[i] as i32;
            }
            isum += sc as i32 * s;
        }
        sumf += h(x.d) * y.d * isum as f32 - h(x.dmin) * y.d * summ as f32;
    }
    sumf
}

pub fn dot_q6_k_q8_k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut isum = 0i32;
        for is in 0..QK_K / 16 {
            let mut s = 0i32;
            for i in is * 16..is * 16 + 16 {
                s += q6k_value(x, i) * y.qs[i] as i32;
            }
            isum += x.scales[is] as i32 * s;
        }
        sumf += h(x.d) * y.d * isum as f32;
    }
    sumf
}
