//! ggml quantisation formats: block layouts, scalar reference dequantisation
//! and dot products, and activation quantisation.
//!
//! Matrix products follow ggml: the activation row is quantised once into the
//! weight type's "vec-dot type" (Q8_0, Q8_1 or Q8_K, or f16/bf16/f32 for float
//! weights) and the dot product runs on integers within a block. That both is
//! the fast way to do it and reproduces llama.cpp's numerics.
//!
//! Everything in [`generic`] is the portable scalar reference; SIMD versions
//! (per-ISA files) are checked against it.

pub mod blocks;
pub mod generic;

use half::{bf16, f16};

pub use blocks::*;

/// The ggml tensor types this engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ];

    /// The type for ggml's on-disk type number, if this engine supports it.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == v)
    }

    /// ggml's type number.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => QK4_0,
            GgmlType::Q8_0 | GgmlType::Q8_1 => QK8_0,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        use std::mem::size_of;
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => size_of::<BlockQ4_0>(),
            GgmlType::Q4_1 => size_of::<BlockQ4_1>(),
            GgmlType::Q5_0 => size_of::<BlockQ5_0>(),
            GgmlType::Q5_1 => size_of::<BlockQ5_1>(),
            GgmlType::Q8_0 => size_of::<BlockQ8_0>(),
            GgmlType::Q8_1 => size_of::<BlockQ8_1>(),
            GgmlType::Q2_K => size_of::<BlockQ2K>(),
            GgmlType::Q3_K => size_of::<BlockQ3K>(),
            GgmlType::Q4_K => size_of::<BlockQ4K>(),
            GgmlType::Q5_K => size_of::<BlockQ5K>(),
            GgmlType::Q6_K => size_of::<BlockQ6K>(),
            GgmlType::Q8_K => size_of::<BlockQ8K>(),
        }
    }

    /// Alignment the block struct needs in memory.
    pub fn block_align(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::Q8_K => 4,
            _ => 2,
        }
    }

    /// Bytes for a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// The format activations are converted to before a dot product with a
    /// weight of this type (ggml's `vec_dot_type`).
    pub fn vec_dot_type(self) -> ActType {
        match self {
            GgmlType::F32 => ActType::F32,
            GgmlType::F16 => ActType::F16,
            GgmlType::BF16 => ActType::BF16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => ActType::Q8_1,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => ActType::Q8_K,
        }
    }

    /// Whether this type can be a matmul weight (Q8_1 and Q8_K are
    /// activation-only formats in ggml).
    pub fn is_weight_type(self) -> bool {
        !matches!(self, GgmlType::Q8_1 | GgmlType::Q8_K)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Formats an activation row is quantised into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum ActType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8_K,
}

impl ActType {
    pub fn as_ggml(self) -> GgmlType {
        match self {
            ActType::F32 => GgmlType::F32,
            ActType::F16 => GgmlType::F16,
            ActType::BF16 => GgmlType::BF16,
            ActType::Q8_0 => GgmlType::Q8_0,
            ActType::Q8_1 => GgmlType::Q8_1,
            ActType::Q8_K => GgmlType::Q8_K,
        }
    }
}

/// Activation rows quantised into one [`ActType`], `rows` rows of `cols`
/// elements each, stored contiguously.
#[derive(Debug, Clone)]
#[allow(non_camel_case_types)]
pub enum QuantActs {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q8_0(Vec<BlockQ8_0>),
    Q8_1(Vec<BlockQ8_1>),
    Q8_K(Vec<BlockQ8K>),
}

/// A batch of activation rows in a weight's vec-dot format.
#[derive(Debug, Clone)]
pub struct ActRows {
    pub data: QuantActs,
    pub rows: usize,
    pub cols: usize,
    /// For batches of Q8_0/Q8_1 rows: each block's scale (and, for Q8_1,
    /// its sum) as f32, block-major (`[block][row]`), so a kernel working
    /// on several rows reads one block's scales with one load instead of
    /// converting an f16 per row and block. Empty for single rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) block_scales: BlockScales,
    /// Rows before this one are summed as llama.cpp's 4-row gemm sums a
    /// prompt batch's rows for repacked formats (Q4_K), the rest as its
    /// gemv sums single tokens (see `cpu::q4_k_accumulate`). A multiple of
    /// four; by default every whole four of the batch, as for a prompt.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) grouped: usize,
    /// Rows before this one are summed as llama.cpp's tiled K-quant kernel
    /// (ggml-cpu/tiled) sums a prompt of eight or more tokens (Q6_K), the
    /// rest as its vec_dot (see `cpu::q6_k_block`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) tiled: usize,
}

/// See [`ActRows::block_scales`].
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockScales {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

impl BlockScales {
    fn of<B: Copy>(
        blocks: &[B],
        rows: usize,
        d: impl Fn(&B) -> f32,
        s: impl Fn(&B) -> f32,
    ) -> Self {
        if rows < 2 {
            return Self::default();
        }
        let per_row = blocks.len() / rows;
        let mut out = Self {
            d: vec![0.0; blocks.len()],
            s: vec![0.0; blocks.len()],
        };
        for (k, b) in blocks.iter().enumerate() {
            let (row, block) = (k / per_row, k % per_row);
            out.d[block * rows + row] = d(b);
            out.s[block * rows + row] = s(b);
        }
        out
    }
}

/// `rows` rows of `x` quantised into blocks of `qk` values by `f`, the
/// rows spread over the worker pool (each row's blocks are its own, so the
/// result is the same however they are spread).
fn quantize_rows<B: bytemuck::Zeroable + Clone + Send>(
    x: &[f32],
    rows: usize,
    qk: usize,
    f: fn(&[f32], &mut [B]),
) -> Vec<B> {
    let mut out = vec![B::zeroed(); x.len() / qk];
    if rows <= 1 {
        f(x, &mut out);
        return out;
    }
    let per_row = out.len() / rows;
    let chunk = per_row * rows.div_ceil(4 * crate::cpu::threads()).max(1);
    crate::cpu::pool::for_each_chunk_mut(crate::cpu::pool(), &mut out, chunk, |c, o| {
        let at = c * chunk * qk;
        f(&x[at..at + o.len() * qk], o);
    });
    out
}

impl ActRows {
    /// Quantises `rows` rows of `cols` floats (row-major) into `ty`.
    pub fn quantize(ty: ActType, x: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), rows * cols, "activation shape");
        let data = match ty {
            ActType::F32 => QuantActs::F32(x.to_vec()),
            ActType::F16 => QuantActs::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            ActType::BF16 => QuantActs::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
            ActType::Q8_0 => {
                QuantActs::Q8_0(quantize_rows(x, rows, QK8_0, crate::cpu::quantize_row_q8_0))
            }
            ActType::Q8_1 => {
                QuantActs::Q8_1(quantize_rows(x, rows, QK8_1, crate::cpu::quantize_row_q8_1))
            }
            ActType::Q8_K => {
                QuantActs::Q8_K(quantize_rows(x, rows, QK_K, crate::cpu::quantize_row_q8_k))
            }
        };
        let block_scales = match &data {
            QuantActs::Q8_0(b) => BlockScales::of(b, rows, |b| b.d.to_f32(), |_| 0.0),
            QuantActs::Q8_1(b) => BlockScales::of(b, rows, |b| b.d.to_f32(), |b| b.s.to_f32()),
            _ => BlockScales::default(),
        };
        Self {
            data,
            rows,
            cols,
            block_scales,
            grouped: rows - rows % 4,
            tiled: if rows >= 8 { rows } else { 0 },
        }
    }

    /// Only the first `rows` rows belong to a prompt, of `prompt_len`
    /// tokens in all; the others are decoded tokens. llama.cpp sums a
    /// prompt's rows in other orders than a decoded token's for some
    /// formats (see [`ActRows::grouped`], [`ActRows::tiled`]). By default
    /// every row is a prompt's, as in one prompt batch.
    pub fn prompt(mut self, rows: usize, prompt_len: usize) -> Self {
        let rows = rows.min(self.rows);
        self.grouped = rows - rows % 4;
        self.tiled = if prompt_len >= 8 { rows } else { 0 };
        self
    }

    pub fn act_type(&self) -> ActType {
        match self.data {
            QuantActs::F32(_) => ActType::F32,
            QuantActs::F16(_) => ActType::F16,
            QuantActs::BF16(_) => ActType::BF16,
            QuantActs::Q8_0(_) => ActType::Q8_0,
            QuantActs::Q8_1(_) => ActType::Q8_1,
            QuantActs::Q8_K(_) => ActType::Q8_K,
        }
    }
}

/// Errors from interpreting raw bytes as quantised blocks.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{ty} data of {len} bytes is not a whole number of {size}-byte blocks")]
    Ragged {
        ty: GgmlType,
        len: usize,
        size: usize,
    },
    #[error("{ty} data at address {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        ty: GgmlType,
        addr: usize,
        align: usize,
    },
    #[error("{ty} is an activation-only format and cannot be a weight")]
    NotAWeight { ty: GgmlType },
}

/// Checks that `bytes` can be viewed as blocks of `ty`.
pub fn check_blocks(ty: GgmlType, bytes: &[u8]) -> Result<(), QuantError> {
    let size = ty.type_size();
    if !bytes.len().is_multiple_of(size) {
        return Err(QuantError::Ragged {
            ty,
            len: bytes.len(),
            size,
        });
    }
    let addr = bytes.as_ptr() as usize;
    if !addr.is_multiple_of(ty.block_align()) {
        return Err(QuantError::Misaligned {
            ty,
            addr,
            align: ty.block_align(),
        });
    }
    Ok(())
}

/// Dequantises one row of `ty` data into `out` (scalar reference).
///
/// `bytes` must hold exactly `out.len()` elements and satisfy [`check_blocks`].
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    use bytemuck::cast_slice as c;
    match ty {
        GgmlType::F32 => out.copy_from_slice(c::<u8, f32>(bytes)),
        GgmlType::F16 => {
            for (o, v) in out.iter_mut().zip(c::<u8, f16>(bytes)) {
                *o = v.to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.iter_mut().zip(c::<u8, bf16>(bytes)) {
                *o = v.to_f32();
            }
        }
        GgmlType::Q4_0 => generic::dequantize_q4_0(c(bytes), out),
        GgmlType::Q4_1 => generic::dequantize_q4_1(c(bytes), out),
        GgmlType::Q5_0 => generic::dequantize_q5_0(c(bytes), out),
        GgmlType::Q5_1 => generic::dequantize_q5_1(c(bytes), out),
        GgmlType::Q8_0 => generic::dequantize_q8_0(c(bytes), out),
        GgmlType::Q8_1 => generic::dequantize_q8_1(c(bytes), out),
        GgmlType::Q2_K => generic::dequantize_q2_k(c(bytes), out),
        GgmlType::Q3_K => generic::dequantize_q3_k(c(bytes), out),
        GgmlType::Q4_K => generic::dequantize_q4_k(c(bytes), out),
        GgmlType::Q5_K => generic::dequantize_q5_k(c(bytes), out),
        GgmlType::Q6_K => generic::dequantize_q6_k(c(bytes), out),
        GgmlType::Q8_K => generic::dequantize_q8_k(c(bytes), out),
    }
}

/// Dot product of one weight row (`ty`, raw bytes) with one activation row
/// given as a block range of an [`ActRows`]. Scalar reference.
///
/// Panics if the activation format is not `ty.vec_dot_type()`: callers
/// quantise with the weight's own vec-dot type.
pub fn vec_dot(ty: GgmlType, w: &[u8], acts: &ActRows, row: usize) -> f32 {
    use bytemuck::cast_slice as c;
    let n = acts.cols;
    match (ty, &acts.data) {
        (GgmlType::F32, QuantActs::F32(a)) => generic::dot_f32(c(w), &a[row * n..][..n]),
        (GgmlType::F16, QuantActs::F16(a)) => generic::dot_f16(c(w), &a[row * n..][..n]),
        (GgmlType::BF16, QuantActs::BF16(a)) => generic::dot_bf16(c(w), &a[row * n..][..n]),
        (GgmlType::Q4_0, QuantActs::Q8_0(a)) => {
            generic::dot_q4_0_q8_0(c(w), blocks_of(a, row, n, QK8_0))
        }
        (GgmlType::Q5_0, QuantActs::Q8_0(a)) => {
            generic::dot_q5_0_q8_0(c(w), blocks_of(a, row, n, QK8_0))
        }
        (GgmlType::Q8_0, QuantActs::Q8_0(a)) => {
            generic::dot_q8_0_q8_0(c(w), blocks_of(a, row, n, QK8_0))
        }
        (GgmlType::Q4_1, QuantActs::Q8_1(a)) => {
            generic::dot_q4_1_q8_1(c(w), blocks_of(a, row, n, QK8_1))
        }
        (GgmlType::Q5_1, QuantActs::Q8_1(a)) => {
            generic::dot_q5_1_q8_1(c(w), blocks_of(a, row, n, QK8_1))
        }
        (GgmlType::Q2_K, QuantActs::Q8_K(a)) => {
            generic::dot_q2_k_q8_k(c(w), blocks_of(a, row, n, QK_K))
        }
        (GgmlType::Q3_K, QuantActs::Q8_K(a)) => {
            generic::dot_q3_k_q8_k(c(w), blocks_of(a, row, n, QK_K))
        }
        (GgmlType::Q4_K, QuantActs::Q8_K(a)) => {
            generic::dot_q4_k_q8_k(c(w), blocks_of(a, row, n, QK_K))
        }
        (GgmlType::Q5_K, QuantActs::Q8_K(a)) => {
            generic::dot_q5_k_q8_k(c(w), blocks_of(a, row, n, QK_K))
        }
        (GgmlType::Q6_K, QuantActs::Q8_K(a)) => {
            generic::dot_q6_k_q8_k(c(w), blocks_of(a, row, n, QK_K))
        }
        (ty, _) => panic!(
            "vec_dot: {ty} weights need {:?} activations, got {:?}",
            ty.vec_dot_type(),
            acts.act_type()
        ),
    }
}

/// The blocks of activation row `row` (`cols` elements, `bs` per block).
pub(crate) fn blocks_of<T>(a: &[T], row: usize, cols: usize, bs: usize) -> &[T] {
    let per_row = cols / bs;
    &a[row * per_row..][..per_row]
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
