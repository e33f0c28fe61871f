//! Helpers shared by the kernel tests.

use half::{bf16, f16};

use super::{dequantize_row, ActRows, GgmlType, QuantActs};

/// Bytes aligned for any block type (the file's tensors are 32-aligned).
pub(crate) fn aligned(bytes: &[u8]) -> Vec<u32> {
    let mut v = vec![0u32; bytes.len().div_ceil(4)];
    bytemuck::cast_slice_mut::<u32, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
    v
}

/// A deterministic xorshift, so tests need no extra dependency.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random blocks of `ty` with sane (small, finite) f16 scales.
pub(crate) fn random_weight(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u32> {
    let bytes_len = ty.row_bytes(n);
    let mut bytes: Vec<u8> = (0..bytes_len).map(|_| rng.next() as u8).collect();
    let scale_offsets: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    let bs = ty.type_size();
    match ty {
        GgmlType::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f32().to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32(rng.f32()).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.f32()).to_le_bytes());
            }
        }
        _ => {
            for b in bytes.chunks_exact_mut(bs) {
                for &off in scale_offsets {
                    let v = f16::from_f32(0.001 + 0.02 * rng.f32().abs());
                    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    aligned(&bytes)
}

/// Dequantised values of quantised activation rows.
pub(crate) fn dequantize_acts(acts: &ActRows) -> Vec<f32> {
    let bytes: Vec<u8> = match &acts.data {
        QuantActs::F32(v) => bytemuck::cast_slice(v).to_vec(),
        QuantActs::F16(v) => bytemuck::cast_slice(v).to_vec(),
        QuantActs::BF16(v) => bytemuck::cast_slice(v).to_vec(),
        QuantActs::Q8_0(v) => bytemuck::cast_slice(v).to_vec(),
        QuantActs::Q8_1(v) => bytemuck::cast_slice(v).to_vec(),
        QuantActs::Q8_K(v) => bytemuck::cast_slice(v).to_vec(),
    };
    let words = aligned(&bytes);
    let mut out = vec![0f32; acts.rows * acts.cols];
    dequantize_row(
        acts.act_type().as_ggml(),
        &bytemuck::cast_slice::<u32, u8>(&words)[..bytes.len()],
        &mut out,
    );
    out
}
