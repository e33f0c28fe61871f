//! Weight matrices viewed in place in the mapped GGUF file, and the matrix
//! products of the forward pass.

use std::sync::Arc;

use crate::{
    cpu::pool::for_each_chunk_mut,
    gguf::{Gguf, GgufError, TensorInfo},
    quant::{self, ActRows, GgmlType},
};

/// A 2-D weight matrix: `rows` output features, each a row of `cols` inputs,
/// stored as ggml blocks inside the mapped model file.
#[derive(Clone)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    offset: usize,
    len: usize,
    file: Arc<Gguf>,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({} {} {}x{})",
            self.name, self.ty, self.rows, self.cols
        )
    }
}

/// Errors building a weight view.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tensor {name:?} has shape {dims:?}, expected {expected}")]
    Shape {
        name: String,
        dims: Vec<u64>,
        expected: String,
    },
    #[error("tensor {name:?}: {source}")]
    Quant {
        name: String,
        #[source]
        source: quant::QuantError,
    },
}

impl Weight {
    /// Views tensor `t` of `file` as a `rows x cols` matrix (`cols` is ggml's
    /// `ne0`). `expect` gives the shape the architecture requires.
    pub fn new(file: &Arc<Gguf>, t: &TensorInfo, expect: [usize; 2]) -> Result<Self, WeightError> {
        let [cols, rows] = expect;
        let dims_ok = t.dims.len() <= 2
            && t.dims[0] as usize == cols
            && t.dims.get(1).copied().unwrap_or(1) as usize == rows;
        if !dims_ok {
            return Err(WeightError::Shape {
                name: t.name.clone(),
                dims: t.dims.clone(),
                expected: format!("[{cols}, {rows}]"),
            });
        }
        if !t.ty.is_weight_type() {
            return Err(WeightError::Quant {
                name: t.name.clone(),
                source: quant::QuantError::NotAWeight { ty: t.ty },
            });
        }
        let data = file.tensor_data(t);
        quant::check_blocks(t.ty, data).map_err(|source| WeightError::Quant {
            name: t.name.clone(),
            source,
        })?;
        Ok(Self {
            name: t.name.clone(),
            ty: t.ty,
            rows,
            cols,
            offset: t.offset as usize,
            len: t.size as usize,
            file: file.clone(),
        })
    }

    /// Where the matrix lies in the model file: (offset, length) in bytes.
    pub fn span(&self) -> (u64, u64) {
        (self.offset as u64, self.len as u64)
    }

    /// Raw bytes of the whole matrix.
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.offset..self.offset + self.len]
    }

    /// Raw bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.ty.row_bytes(self.cols);
        &self.bytes()[r * rb..(r + 1) * rb]
    }

    /// Dequantises row `r` into `out` (embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.ty, self.row(r), out);
    }

    /// `out[t][r] = dot(row r, x[t])` for `n` activation rows `x` of `cols`
    /// floats each; `out` is `n x rows`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let acts = ActRows::quantize(self.ty.vec_dot_type(), x, n, self.cols);
        self.matmul_quantized(&acts, out);
    }

    /// As [`Weight::matmul`] with activations already in this weight's vec-dot
    /// format (several weights reading the same input share one quantisation).
    pub fn matmul_quantized(&self, acts: &ActRows, out: &mut [f32]) {
        let n = acts.rows;
        assert_eq!(acts.cols, self.cols, "{}: activation width", self.name);
        assert_eq!(out.len(), n * self.rows, "{}: output size", self.name);
        let pool = crate::cpu::pool();
        if n == 1 {
            gemv_many(&mut [(self, acts, out)]);
            return;
        }
        // Prefill: chunks big enough to amortise the task overhead, small
        // enough to balance; each task reads its weight rows once for all
        // tokens.
        let chunk = (self.rows / (pool.threads() * 8)).clamp(16, 1024);
        // Compute transposed ([row][token]) so that tasks own contiguous
        // output, then transpose back. Every value of `tmp` is written
        // before it is read, so a reused buffer need not be cleared.
        let mut scratch = Scratch::take(n * self.rows);
        let tmp = scratch.get();
        // Weight rows go in fours (where the CPU has four-row tiles for the
        // format) or pairs, tokens in fours, where there is a tile kernel
        // for the format; the rest row by row.
        let quad = crate::cpu::has_tile4(self.ty);
        let group = if quad { 4 } else { 2 };
        for_each_chunk_mut(pool, tmp, chunk * n, |c, o| {
            for (p, rows) in o.chunks_mut(group * n).enumerate() {
                let r0 = c * chunk + group * p;
                let mut done = 0;
                if quad && rows.len() == 4 * n {
                    let w = std::array::from_fn(|i| self.row(r0 + i));
                    done = crate::cpu::dot_rows4(self.ty, w, acts, rows);
                } else if !quad && rows.len() == 2 * n {
                    let w = [self.row(r0), self.row(r0 + 1)];
                    let (a, b) = rows.split_at_mut(n);
                    while done + 4 <= n {
                        let Some(t) = crate::cpu::dot_tile(self.ty, w, acts, done) else {
                            break;
                        };
                        a[done..done + 4].copy_from_slice(&t[0]);
                        b[done..done + 4].copy_from_slice(&t[1]);
                        done += 4;
                    }
                }
                for (i, orow) in rows.chunks_exact_mut(n).enumerate() {
                    let w = self.row(r0 + i);
                    for (g, group) in orow[done..].chunks_mut(4).enumerate() {
                        crate::cpu::vec_dot_rows(self.ty, w, acts, done + 4 * g, group);
                    }
                }
            }
        });
        // Back to [token][row], on the pool too: done serially it was a few
        // per cent of a prefill, and more of it with every thread added.
        // In blocks of sixteen tokens by sixteen rows through a local tile,
        // so that every read and every write is a whole cache line: output
        // rows lie a power of two apart, and written a value at a time
        // their lines evicted each other from the same cache set (the
        // transpose had cost 5-10% of a Gemma prefill).
        const B: usize = 16;
        let rows = self.rows;
        let tmp = &*tmp;
        for_each_chunk_mut(pool, out, rows * B, |c, o| {
            let t0 = B * c;
            let nt = o.len() / rows;
            let mut tile = [[0f32; B]; B];
            for r0 in (0..rows).step_by(B) {
                let nr = B.min(rows - r0);
                for (i, line) in tile.iter_mut().enumerate().take(nr) {
                    line[..nt].copy_from_slice(&tmp[(r0 + i) * n + t0..][..nt]);
                }
                for t in 0..nt {
                    for (i, v) in o[t * rows + r0..][..nr].iter_mut().enumerate() {
                        *v = tile[i][t];
                    }
                }
            }
        });
    }
}

impl Weight {
    /// Rows a decoding task takes: two chunks a thread, whole fours of
    /// rows. Long contiguous runs keep each core's memory stream going;
    /// with eight chunks a thread two threads decoded SmolLM2 at 160-180
    /// tokens/s instead of 230-250. Two rather than one: a thread that
    /// joins late or runs slow (another program on its core) leaves its
    /// second chunk to the others.
    fn decode_chunk(&self, threads: usize) -> usize {
        self.rows.div_ceil(2 * threads).next_multiple_of(4).max(16)
    }

    /// Rows `r0..r0 + out.len()` against the one activation row: in fours
    /// in one call where there is a kernel for it (the activation row
    /// loaded once for four), the rest one by one.
    fn gemv_chunk(&self, acts: &ActRows, r0: usize, out: &mut [f32]) {
        let rb = self.ty.row_bytes(self.cols);
        let rows = &self.bytes()[r0 * rb..][..out.len() * rb];
        let done = crate::cpu::gemv_rows(self.ty, rows, acts, 0, out);
        for (k, v) in out.iter_mut().enumerate().skip(done) {
            *v = crate::cpu::vec_dot(self.ty, &rows[k * rb..][..rb], acts, 0);
        }
    }
}

/// Decoding one token through several weights (each with its activation
/// row, already in its vec-dot format, and its output): one job on the
/// pool for all of them, so that the threads meet once instead of once per
/// weight (a layer's q, k and v; gate and up).
pub fn gemv_many(jobs: &mut [(&Weight, &ActRows, &mut [f32])]) {
    let pool = crate::cpu::pool();
    type Piece<'a> = (&'a Weight, &'a ActRows, usize, &'a mut [f32]);
    let mut pieces: Vec<std::sync::Mutex<Piece<'_>>> = Vec::new();
    for (w, acts, out) in jobs.iter_mut() {
        assert_eq!(acts.rows, 1, "{}: one activation row", w.name);
        assert_eq!(acts.cols, w.cols, "{}: activation width", w.name);
        assert_eq!(out.len(), w.rows, "{}: output size", w.name);
        let chunk = w.decode_chunk(pool.threads());
        for (c, o) in out.chunks_mut(chunk).enumerate() {
            pieces.push(std::sync::Mutex::new((*w, *acts, c * chunk, o)));
        }
    }
    pool.run(pieces.len(), &|i| {
        let mut piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
        let (w, acts, r0, out) = &mut *piece;
        w.gemv_chunk(acts, *r0, out);
    });
}

/// A thread's reusable buffer for a prefill's transposed products: a
/// fresh zeroed vector per matmul cost a memset and page faults on the
/// calling thread while the workers waited (7% of a two-thread Gemma
/// prefill). Buffers above [`Scratch::KEEP`] floats (4 MB: a 512-token
/// batch through 2048 rows; not a perplexity run's logits, nor a big
/// model's long prompt) are freed after use as before, so what a device
/// holds between requests stays small next to the budget Halda plans.
struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Scratch {
    const KEEP: usize = 1 << 20;

    /// A buffer of at least `len` floats of unspecified contents.
    fn take(len: usize) -> Self {
        let mut buf = SCRATCH.with(|s| s.take());
        if buf.len() < len {
            buf = vec![0f32; len];
        }
        Self { buf, len }
    }

    fn get(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.buf.len() <= Self::KEEP {
            let buf = std::mem::take(&mut self.buf);
            SCRATCH.with(|s| s.set(buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{
        write::{GgufWriter, TensorSpec},
        Value,
    };
    use crate::quant::testutil::{random_weight, Rng};

    /// Weights of random valid blocks in an in-memory GGUF, with row
    /// counts that are not multiples of the kernels' groups (4 rows, 16 in
    /// the transpose) to reach every edge.
    fn weights(specs: &[(GgmlType, usize, usize)]) -> Vec<Weight> {
        let mut rng = Rng(0x7e45_0a11);
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::String("llama".into()));
        for (i, &(ty, cols, rows)) in specs.iter().enumerate() {
            w.tensor(TensorSpec {
                name: format!("w{i}"),
                dims: vec![cols as u64, rows as u64],
                ty,
            });
        }
        let mut bytes = Vec::new();
        w.write(&mut bytes, |i, buf| {
            let (ty, cols, _) = specs[i];
            for row in buf.chunks_exact_mut(ty.row_bytes(cols)) {
                let words = random_weight(ty, cols, &mut rng);
                row.copy_from_slice(&bytemuck::cast_slice::<u32, u8>(&words)[..row.len()]);
            }
        })
        .unwrap();
        let file = Arc::new(Gguf::from_vec(bytes).unwrap());
        file.tensors
            .iter()
            .zip(specs)
            .map(|(t, &(_, cols, rows))| Weight::new(&file, t, [cols, rows]).unwrap())
            .collect()
    }

    fn activations(n: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..n * cols).map(|_| rng.f32() * 4.0 - 2.0).collect()
    }

    #[test]
    fn batched_matmul_equals_the_one_row_kernel_for_every_row_and_token() {
        let ws = weights(&[
            (GgmlType::Q8_0, 256, 37),
            (GgmlType::Q5_0, 64, 45),
            (GgmlType::Q4_K, 256, 21),
            (GgmlType::Q6_K, 256, 19),
        ]);
        // A large batch, then a smaller one: the reused buffer of the first
        // must not show through in the second.
        for w in &ws {
            for n in [21usize, 9, 1] {
                let x = activations(n, w.cols, n as u64);
                let acts = ActRows::quantize(w.ty.vec_dot_type(), &x, n, w.cols);
                let mut out = vec![f32::NAN; n * w.rows];
                w.matmul_quantized(&acts, &mut out);
                for t in 0..n {
                    for r in 0..w.rows {
                        let want = crate::cpu::vec_dot(w.ty, w.row(r), &acts, t);
                        assert_eq!(
                            out[t * w.rows + r].to_bits(),
                            want.to_bits(),
                            "{w:?} n={n} token {t} row {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn several_weights_decoded_in_one_job_equal_each_alone() {
        let ws = weights(&[
            (GgmlType::Q4_1, 128, 45),
            (GgmlType::Q4_1, 128, 13),
            (GgmlType::Q8_0, 128, 70),
        ]);
        let x = activations(1, 128, 5);
        let a1 = ActRows::quantize(GgmlType::Q4_1.vec_dot_type(), &x, 1, 128);
        let a0 = ActRows::quantize(GgmlType::Q8_0.vec_dot_type(), &x, 1, 128);
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; w.rows]).collect();
        let [o0, o1, o2] = &mut outs[..] else {
            unreachable!()
        };
        gemv_many(&mut [
            (&ws[0], &a1, &mut o0[..]),
            (&ws[1], &a1, &mut o1[..]),
            (&ws[2], &a0, &mut o2[..]),
        ]);
        for ((w, out), acts) in ws.iter().zip(&outs).zip([&a1, &a1, &a0]) {
            for (r, v) in out.iter().enumerate() {
                let want = crate::cpu::vec_dot(w.ty, w.row(r), acts, 0);
                assert_eq!(v.to_bits(), want.to_bits(), "{w:?} row {r}");
            }
        }
    }
}
