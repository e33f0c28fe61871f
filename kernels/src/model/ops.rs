//! Element-wise and row operations of the forward pass, written to match
//! ggml's CPU numerics (where it sums in double, so do we).

use std::sync::OnceLock;

use half::f16;

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

    pub fn apply(&self, x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
        for head in x.chunks_exact_mut(head_dim) {
            match self.kind {
                RopeKind::Normal => {
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c - b * s;
                        head[2 * i + 1] = a * s + b * c;
                    }
                }
                RopeKind::Neox => {
                    let half = self.n_dims / 2;
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c - b * s;
                        head[i + half] = a * s + b * c;
                    }
                }
            }
        }
    }
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

const GELU_COEF_A: f32 = 0.044715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn gelu_exact_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// GELU (tanh approximation) through a table over every f16 input, as
/// ggml's CPU backend computes it: the input is rounded to f16 and the result
/// is an f16.
pub fn gelu(x: f32) -> f32 {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_f32(gelu_exact_tanh(f16::from_bits(b).to_f32())))
            .collect()
    });
    table[f16::from_f32(x).to_bits() as usize].to_f32()
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
    fn gelu_matches_formula_to_f16_precision() {
        for &x in &[-3.0f32, -0.5, 0.0, 0.1, 1.0, 2.5, 9.0] {
            let want = gelu_exact_tanh(x);
            assert!((gelu(x) - want).abs() <= want.abs() * 2e-3 + 1e-3, "{x}");
        }
        assert_eq!(gelu(-11.0), 0.0);
        assert_eq!(gelu(12.0), 12.0);
    }
}
