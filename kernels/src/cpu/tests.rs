//! Every SIMD kernel against the scalar reference.

use super::*;
use crate::quant::testutil::{random_weight, Rng};

#[test]
fn simd_kernels_match_the_scalar_reference() {
    if !avx2_available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so there is no SIMD kernel to check");
        return;
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let types = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    for ty in types {
        for &n in &[256usize, 768, 2048] {
            for _ in 0..8 {
                let words = random_weight(ty, n, &mut rng);
                let w = &bytemuck::cast_slice::<u32, u8>(&words)[..ty.row_bytes(n)];
                let x: Vec<f32> = (0..2 * n).map(|_| rng.f32() * 4.0).collect();
                let acts = ActRows::quantize(ty.vec_dot_type(), &x, 2, n);
                for row in 0..2 {
                    let want = quant::vec_dot(ty, w, &acts, row);
                    set_simd(true);
                    let got = vec_dot(ty, w, &acts, row);
                    let tol = 1e-5 * want.abs().max(1.0) * (n as f32 / 256.0);
                    assert!(
                        (got - want).abs() <= tol,
                        "{ty} n={n} row={row}: simd {got} vs scalar {want}"
                    );
                }
            }
        }
    }
}
