//! Element-wise and row operations of the forward pass, written to match
//! ggml's CPU numerics (where it sums in double, so do we).

use std::sync::OnceLock;

use half::{f16, slice::HalfFloatSliceExt};

use super::config::RopeKind;

/// `x = x / rms(x) * w` for every row of `x` (row length `w.len()`).
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / row.len() as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = (*v * scale) * g;
        }
    }
}

/// Rotary position embedding, in place, for `n_heads` heads of `head_dim`
/// in one token's row, at position `pos`. Rotates the first `n_dims`
/// dimensions of each head.
pub struct Rope {
    kind: RopeKind,
    n_dims: usize,
    theta_scale: f32,
    freq_scale: f32,
}

impl Rope {
    pub fn new(kind: RopeKind, n_dims: usize, base: f32, freq_scale: f32) -> Self {
        Self {
            kind,
            n_dims,
            theta_scale: base.powf(-2.0 / n_dims as f32),
            freq_scale,
        }
    }

    /// cos/sin for each rotated pair at `pos`, as ggml computes them
    /// (theta multiplied up step by step in f32).
    pub fn cache(&self, pos: usize) -> Vec<(f32, f32)> {
        let mut theta = pos as f32;
        (0..self.n_dims / 2)
            .map(|_| {
                let t = theta * self.freq_scale;
                theta *= self.theta_scale;
                (t.cos(), t.sin())
            })
            .collect()
    }

    /// Rotates every head of `x` by `cs` (from [`Rope::cache`]), with the
    /// CPU's fused multiply-add where it has one (the portable build's
    /// `mul_add` is a library call per value).
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
        crate::cpu::rope(self, x, head_dim, cs)
    }

    /// [`Rope::apply`]'s body, inlined into each build; the results are the
    /// same in every build.
    #[inline(always)]
    pub fn apply_body(&self, x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            match self.kind {
                // ggml's C rotation `x0*cos - x1*sin`, `x0*sin + x1*cos`
                // as its compiler contracts it: the first product fused.
                RopeKind::Normal => {
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a.mul_add(c, -(b * s));
                        head[2 * i + 1] = a.mul_add(s, b * c);
                    }
                }
                RopeKind::Neox => {
                    let half = self.n_dims / 2;
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a.mul_add(c, -(b * s));
                        head[i + half] = a.mul_add(s, b * c);
                    }
                }
            }
        }
    }
}

/// One KV head's cache: row `j` of the keys is `k[j * stride..][..head_dim]`,
/// likewise the values.
#[derive(Clone, Copy)]
pub struct HeadCache<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub stride: usize,
}

/// One query head's attention task: its query, the cache cells it attends
/// to (causal and windowed masks are the caller's choice of cells), where
/// the scale applies, and which of llama.cpp's flash-attention kernels the
/// token went through (see [`attend_body`]).
#[derive(Clone, Debug)]
pub struct HeadQuery<'a> {
    pub q: &'a [f32],
    pub cells: std::ops::Range<usize>,
    pub scale: AttnScale,
    /// The token belongs to a prompt batch of at least [`FA_TILE`] tokens.
    pub tiled: bool,
}

/// llama.cpp's flash-attention tile (`GGML_FA_TILE_Q`, `GGML_FA_TILE_KV`):
/// a batch of at least this many tokens goes through its tiled kernel,
/// which takes the cache in tiles of this many cells.
pub const FA_TILE: usize = 64;

/// Where the attention scale applies: to the query before it is rounded to
/// f16 (Gemma), or to the scores (llama).
#[derive(Clone, Copy, Debug)]
pub enum AttnScale {
    Query(f32),
    Scores(f32),
}

impl AttnScale {
    /// The factors for the query and for the scores (one of them 1).
    pub fn factors(self) -> (f32, f32) {
        match self {
            AttnScale::Query(s) => (s, 1.0),
            AttnScale::Scores(s) => (1.0, s),
        }
    }
}

/// One query head's attention over the cache cells `cells`, written to
/// `out`, rounded as llama.cpp's CPU flash attention (its default) rounds
/// it. ggml has two kernels for it, and which one a token met depends on
/// its batch (`ggml_compute_forward_flash_attn_ext_f16`):
///
/// - `tiled` (a prompt batch of 64 tokens or more): the f32 query meets
///   the cache in tiles of 64 cells counted from cell 0. Each score is one
///   chain of fused multiply-adds over the head dimension. Per tile the
///   running maximum moves (the output and the sum are rescaled by
///   `expf(old - new)`), the tile's probabilities go through ggml's vector
///   expf and are summed in 16-lane trees added in double, and the output
///   gains `p * v` cell by cell, fused.
/// - otherwise (single tokens, short prompts): online softmax cell by cell.
///   The query is rounded to f16 and each score is ggml's f16 dot product
///   ([`dot_f16`]); the running output is an f16 vector, rounded after
///   every rescale and every fused `p * v`; the sum is `S*ms + vs`, fused.
///
/// Both end with the output times `1/S`. ggml's third path is not
/// followed: a single token whose view of the cache (llama.cpp pads it to
/// 256 cells) reaches 512 cells is split across threads and merged, so its
/// rounding depends on llama.cpp's thread count.
///
/// `inline(always)` so that a caller compiled for wider vectors and FMA
/// (`cpu::attend`) vectorises it; the float operations and their order are
/// the same in every build.
#[inline(always)]
pub fn attend_body(query: HeadQuery<'_>, cache: HeadCache<'_>, out: &mut [f32]) {
    attend_body_with(
        query,
        cache,
        out,
        |h, f| h.convert_to_f32_slice(f),
        |x| x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
    )
}

/// [`attend_body`] with the f16 conversions supplied by the caller: `widen`
/// turns cache rows into f32 (exact in any implementation), `round` rounds
/// f32 values to the nearest f16 in place (ties to even, as F16C does; a
/// SIMD build passes F16C's).
#[inline(always)]
pub fn attend_body_with(
    query: HeadQuery<'_>,
    cache: HeadCache<'_>,
    out: &mut [f32],
    widen: impl Fn(&[f16], &mut [f32]),
    round: impl Fn(&mut [f32]),
) {
    let HeadQuery {
        q,
        cells,
        scale,
        tiled,
    } = query;
    let hd = q.len();
    let out = &mut out[..hd];
    if tiled {
        return attend_tiled_rows_with(q, hd, |_| cells.clone(), scale, cache, out, widen);
    }
    let (q_scale, scale) = scale.factors();
    let mut qs = [0f32; super::MAX_HEAD_DIM];
    let qs = &mut qs[..hd];
    for (d, &x) in qs.iter_mut().zip(q) {
        *d = x * q_scale;
    }
    round(qs);
    attend_online(qs, cells, scale, cache, out, &widen, &round);
}

/// One query head's attention for tokens of a prompt batch of at least
/// [`FA_TILE`] tokens (ggml's tiled kernel, see [`attend_body`]): row `r`
/// of `q` (rows `hd` wide) attends to the cells `cells(r)`, and its output
/// goes to row `r` of `out`. The rows share each tile's keys and values,
/// converted once, as llama.cpp's kernel shares them across its query
/// tile; every row's arithmetic is its own. `scale` is applied here.
#[inline(always)]
pub fn attend_tiled_rows_with(
    q: &[f32],
    hd: usize,
    cells: impl Fn(usize) -> std::ops::Range<usize>,
    scale: AttnScale,
    cache: HeadCache<'_>,
    out: &mut [f32],
    widen: impl Fn(&[f16], &mut [f32]),
) {
    const T: usize = FA_TILE;
    let rows = q.len() / hd;
    let (q_scale, scale) = scale.factors();
    let mut qs = vec![0f32; rows * hd];
    for (d, &x) in qs.iter_mut().zip(q) {
        *d = x * q_scale;
    }
    let (mut lo_all, mut hi_all) = (usize::MAX, 0);
    for r in 0..rows {
        let c = cells(r);
        if !c.is_empty() {
            lo_all = lo_all.min(c.start);
            hi_all = hi_all.max(c.end);
        }
    }
    // One tile's keys transposed (`kt[d * T + slot]`), so that the score
    // chains of a tile's cells run side by side in vector lanes, and its
    // values as rows (`vt[slot * hd + d]`).
    let mut kt = vec![0f32; hd * T];
    let mut vt = vec![0f32; T * hd];
    let mut row = vec![0f32; hd];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut s = vec![0f32; rows];
    out[..rows * hd].fill(0.0);
    let mut t0 = if lo_all == usize::MAX {
        hi_all
    } else {
        lo_all / T * T
    };
    while t0 < hi_all {
        let (lo, hi) = (lo_all.max(t0), hi_all.min(t0 + T));
        for j in lo..hi {
            let c = j - t0;
            widen(&cache.k[j * cache.stride..][..hd], &mut row);
            for (d, &x) in row.iter().enumerate() {
                kt[d * T + c] = x;
            }
            widen(&cache.v[j * cache.stride..][..hd], &mut vt[c * hd..][..hd]);
        }
        for r in 0..rows {
            let c = cells(r);
            let (lo, hi) = (c.start.max(t0), c.end.min(t0 + T));
            if lo >= hi {
                continue;
            }
            let n = hi - lo;
            let first = lo - t0;
            let mut kq = [0f32; T];
            let kq = &mut kq[..n];
            for (d, &qd) in qs[r * hd..][..hd].iter().enumerate() {
                for (a, &k) in kq.iter_mut().zip(&kt[d * T + first..][..n]) {
                    *a = qd.mul_add(k, *a);
                }
            }
            let mut tile_max = f32::NEG_INFINITY;
            for a in kq.iter_mut() {
                *a *= scale;
                tile_max = tile_max.max(*a);
            }
            let o = &mut out[r * hd..][..hd];
            let m_new = m[r].max(tile_max);
            if m_new > m[r] {
                let ms = (m[r] - m_new).exp();
                for o in o.iter_mut() {
                    *o *= ms;
                }
                s[r] *= ms;
            }
            m[r] = m_new;
            // Probabilities at their slots in the tile (masked slots are 0).
            let mut p = [0f32; T];
            for (c, &a) in kq.iter().enumerate() {
                p[first + c] = ggml_expf(a - m_new);
            }
            let mut sum = 0f64;
            for chunk in p.chunks_exact(16) {
                sum += reduce16(chunk.try_into().expect("16 lanes")) as f64;
            }
            s[r] = (s[r] as f64 + sum) as f32;
            for c in first..first + n {
                let pc = p[c];
                for (o, &v) in o.iter_mut().zip(&vt[c * hd..][..hd]) {
                    *o = pc.mul_add(v, *o);
                }
            }
        }
        t0 += T;
    }
    for r in 0..rows {
        let inv = if s[r] == 0.0 { 0.0 } else { 1.0 / s[r] };
        for o in out[r * hd..][..hd].iter_mut() {
            *o *= inv;
        }
    }
}

/// ggml's one-row flash attention with its f16 accumulator (see
/// [`attend_body`]); `qh` is already rounded to f16.
#[inline(always)]
fn attend_online(
    qh: &[f32],
    cells: std::ops::Range<usize>,
    scale: f32,
    cache: HeadCache<'_>,
    out: &mut [f32],
    widen: &impl Fn(&[f16], &mut [f32]),
    round: &impl Fn(&mut [f32]),
) {
    let hd = qh.len();
    let mut row = [0f32; super::MAX_HEAD_DIM];
    let row = &mut row[..hd];
    out.fill(0.0);
    let (mut m, mut s) = (f32::NEG_INFINITY, 0f32);
    for j in cells {
        widen(&cache.k[j * cache.stride..][..hd], row);
        let x = dot_f16(row, qh) * scale;
        let (ms, vs);
        if x > m {
            ms = (m - x).exp();
            vs = 1.0;
            m = x;
            for o in out.iter_mut() {
                *o *= ms;
            }
            round(out);
        } else {
            ms = 1.0;
            vs = (x - m).exp();
        }
        widen(&cache.v[j * cache.stride..][..hd], row);
        for (o, &v) in out.iter_mut().zip(row.iter()) {
            *o = v.mul_add(vs, *o);
        }
        round(out);
        s = s.mul_add(ms, vs);
    }
    let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Dot product summed as ggml's `ggml_vec_dot_f16` sums it on AVX-512
/// (one token): steps of 64 terms into four 16-lane registers, registers
/// 0+2 and 1+3 added, then those two, then [`reduce16`]; terms past the
/// last whole step are added one by one in double.
#[inline(always)]
pub fn dot_f16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    let whole = a.len() / 64 * 64;
    for (x, y) in a[..whole].chunks_exact(64).zip(b[..whole].chunks_exact(64)) {
        for (r, reg) in acc.iter_mut().enumerate() {
            for ((s, x), y) in reg.iter_mut().zip(&x[16 * r..]).zip(&y[16 * r..]) {
                *s += x * y;
            }
        }
    }
    let x: [f32; 16] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let mut sum = reduce16(&x) as f64;
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum += (x * y) as f64;
    }
    sum as f32
}

/// Dot product of two f32 slices with eight independent partial sums, so the
/// compiler can keep them in one vector register.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// ggml's vector `expf` (its AVX-512 routine, adapted from Arm's optimized
/// routines: max error 1.45 ulp + 0.5), computed one lane at a time with the
/// same fused operations, so results match llama.cpp's bit for bit. ggml runs
/// softmax through it in 16-lane chunks.
#[inline(always)]
pub fn ggml_expf(x: f32) -> f32 {
    let c = |bits: u32| f32::from_bits(bits);
    let r = c(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x * log2(e)
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    if n.is_nan() {
        return n;
    }
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // _mm512_scalef_ps: j * 2^n with one rounding (exact in f64 first).
    // 2^n is built from its exponent bits: |n| <= 192 here, well inside
    // f64's normal range (and no call to a powi routine per value).
    let two_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (j as f64 * two_n) as f32
}

/// Softmax of one attention row whose first entry sits at cache cell
/// `first`, as ggml computes it over a row padded to whole 16-lane chunks
/// (masked cells add zeros): every value through [`ggml_expf`], each chunk
/// summed in `_mm512_reduce_add_ps`'s tree order, chunk sums added in
/// double.
#[inline(always)]
pub fn softmax_row_body(x: &mut [f32], first: usize) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in x.iter_mut() {
        *v = ggml_expf(*v - max);
    }
    let mut sum = 0f64;
    let mut lane = [0f32; 16];
    let mut at = 0;
    let mut cell = first;
    while at < x.len() {
        lane.fill(0.0);
        let start = cell % 16;
        let take = (16 - start).min(x.len() - at);
        lane[start..start + take].copy_from_slice(&x[at..at + take]);
        sum += reduce16(&lane) as f64;
        at += take;
        cell += take;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `_mm512_reduce_add_ps`: halves added pairwise down to one value.
#[inline(always)]
fn reduce16(a: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = a[i + 8] + a[i];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// Softmax in place; sums in double like ggml.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f64;
    for v in x.iter_mut() {
        let e = if *v == f32::NEG_INFINITY {
            0.0
        } else {
            (*v - max).exp()
        };
        *v = e;
        sum += e as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `g = silu(g) * u`, rounded as llama.cpp's x86 build computes it: whole
/// 16-lane chunks through its vector expf (`x / (1 + expf(0 - x))`), the
/// tail through libm. `inline(always)` so that `cpu::swiglu` can compile it
/// with FMA; the results are the same in every build.
#[inline(always)]
pub fn swiglu_body(g: &mut [f32], u: &[f32]) {
    let whole = g.len() / 16 * 16;
    let (head, tail) = g.split_at_mut(whole);
    for (g, u) in head.iter_mut().zip(u) {
        *g = *g / (1.0 + ggml_expf(0.0 - *g)) * u;
    }
    for (g, u) in tail.iter_mut().zip(&u[whole..]) {
        *g = silu(*g) * u;
    }
}

const GELU_COEF_A: f32 = 0.044715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// ggml's `ggml_gelu_f32` as its compiler contracts it: the inner
/// `1 + a*x*x` is one fused multiply-add.
fn gelu_exact_tanh(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * x * (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + inner.tanh())
}

/// GELU of every f16 value, as f32 (the f16 result widened), indexed by
/// the input's f16 bits.
fn gelu_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_f32(gelu_exact_tanh(f16::from_bits(b).to_f32())).to_f32())
            .collect()
    })
}

/// GELU (tanh approximation) through a table over every f16 input, as
/// ggml's CPU backend computes it: the input is rounded to f16 and the result
/// is an f16.
pub fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    gelu_table()[f16::from_f32(x).to_bits() as usize]
}

/// `g[i] = gelu(g[i]) * u[i]`, Gemma's gated feed-forward, with the inputs
/// rounded to f16 a few dozen at a time (one SIMD conversion) rather than
/// one by one.
pub fn gelu_gate(g: &mut [f32], u: &[f32]) {
    const STEP: usize = 64;
    let table = gelu_table();
    let mut bits = [f16::ZERO; STEP];
    for (g, u) in g.chunks_mut(STEP).zip(u.chunks(STEP)) {
        let bits = &mut bits[..g.len()];
        bits.convert_from_f32_slice(g);
        for ((g, &u), b) in g.iter_mut().zip(u).zip(bits.iter()) {
            let x = *g;
            let y = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                table[b.to_bits() as usize]
            };
            *g = y * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-3, "{} {want}", dot(&a, &b));
    }

    #[test]
    fn rms_norm_unit_weights_gives_unit_rms() {
        let mut x = vec![1.0, -2.0, 3.0, -4.0];
        rms_norm(&mut x, &[1.0; 4], 0.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6, "{rms}");
    }

    #[test]
    fn softmax_sums_to_one_and_masks() {
        let mut x = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        softmax(&mut x);
        assert_eq!(x[2], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[3]);
    }

    #[test]
    fn rope_at_zero_is_identity_and_preserves_norm() {
        for kind in [RopeKind::Normal, RopeKind::Neox] {
            let r = Rope::new(kind, 8, 10_000.0, 1.0);
            let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
            let mut x = orig.clone();
            r.apply(&mut x, 8, &r.cache(0));
            assert_eq!(x, orig);
            r.apply(&mut x, 8, &r.cache(17));
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3, "{n0} {n1}");
            assert_ne!(x, orig);
        }
    }

    #[test]
    fn ggml_expf_is_close_to_exp_and_saturates() {
        let mut x = -103.0f32;
        while x < 88.0 {
            let (got, want) = (ggml_expf(x), (x as f64).exp());
            let ulp = (want as f32).abs() * f32::EPSILON;
            if want > 1e-37 {
                assert!(
                    (got as f64 - want).abs() <= 2.0 * ulp as f64,
                    "{x}: {got} vs {want}"
                );
            }
            x += 0.37;
        }
        assert_eq!(ggml_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(ggml_expf(-1000.0), 0.0);
        assert_eq!(ggml_expf(1000.0), f32::INFINITY);
        assert_eq!(ggml_expf(0.0), 1.0);
        assert!(ggml_expf(f32::NAN).is_nan());
    }

    #[test]
    fn ggml_softmax_agrees_with_the_plain_one() {
        let mut a: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.3 - 3.0)
            .collect();
        let mut b = a.clone();
        softmax(&mut a);
        softmax_row_body(&mut b, 5);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} {y}");
        }
    }

    #[test]
    fn gelu_matches_formula_to_f16_precision() {
        for &x in &[-3.0f32, -0.5, 0.0, 0.1, 1.0, 2.5, 9.0] {
            let want = gelu_exact_tanh(x);
            assert!((gelu(x) - want).abs() <= want.abs() * 2e-3 + 1e-3, "{x}");
        }
        assert_eq!(gelu(-11.0), 0.0);
        assert_eq!(gelu(12.0), 12.0);
        // The slice form, gate times up, equals the one-value form.
        let xs: Vec<f32> = (0..300).map(|i| i as f32 * 0.09 - 13.0).collect();
        let up: Vec<f32> = (0..300).map(|i| 1.5 - i as f32 * 0.01).collect();
        let mut gated = xs.clone();
        gelu_gate(&mut gated, &up);
        for ((x, u), g) in xs.iter().zip(&up).zip(&gated) {
            assert_eq!(g.to_bits(), (gelu(*x) * u).to_bits(), "{x}");
        }
    }
}
