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

#[test]
fn four_row_kernels_match_the_scalar_reference() {
    if !avx2_available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so there is no SIMD kernel to check");
        return;
    }
    let mut rng = Rng(0x0bad_cafe_dead_beef);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q4_0,
    ] {
        let n = 512;
        let words = random_weight(ty, n, &mut rng);
        let w = &bytemuck::cast_slice::<u32, u8>(&words)[..ty.row_bytes(n)];
        let x: Vec<f32> = (0..10 * n).map(|_| rng.f32() * 4.0).collect();
        // Rows 0..8 summed as a prompt batch's, 8 and 9 as single tokens'
        // (Q4_K's order depends on it): groups of four start at multiples
        // of four, as in a matmul.
        let acts = ActRows::quantize(ty.vec_dot_type(), &x, 10, n);
        set_simd(true);
        for t0 in [0, 4] {
            let mut got = [0f32; 4];
            vec_dot_rows(ty, w, &acts, t0, &mut got);
            for (k, g) in got.iter().enumerate() {
                // Bit-identical to the one-row kernel: batching a prompt
                // must not change the numbers.
                assert_eq!(
                    g.to_bits(),
                    vec_dot(ty, w, &acts, t0 + k).to_bits(),
                    "{ty} row {}",
                    t0 + k
                );
                let want = quant::vec_dot(ty, w, &acts, t0 + k);
                // The SIMD kernels sum in llama.cpp's x86 order (Q6_K: eight
                // float lanes across blocks), the reference in ggml's scalar
                // order: they part by rounding, a bug by far more.
                assert!(
                    (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{ty} row {}: {g} vs {want}",
                    t0 + k
                );
            }
        }
        // Fewer than four rows take the one-row path.
        let mut two = [0f32; 2];
        vec_dot_rows(ty, w, &acts, 8, &mut two);
        assert!((two[1] - quant::vec_dot(ty, w, &acts, 9)).abs() <= 2e-5 * two[1].abs().max(1.0));
    }
}

#[test]
fn tiles_are_bit_identical_to_the_one_row_kernels() {
    if !avx2_available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so there is no SIMD kernel to check");
        return;
    }
    let builds: &[bool] = if x86_64_tile::vnni() {
        &[false, true]
    } else {
        eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 tiles are checked");
        &[false]
    };
    let mut rng = Rng(0x7e57_0f71);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        for n in [256usize, 1536] {
            let words: Vec<Vec<u32>> = (0..2).map(|_| random_weight(ty, n, &mut rng)).collect();
            let w: [&[u8]; 2] = std::array::from_fn(|r| {
                &bytemuck::cast_slice::<u32, u8>(&words[r])[..ty.row_bytes(n)]
            });
            let x: Vec<f32> = (0..8 * n).map(|_| rng.f32() * 4.0 - 1.0).collect();
            // Rows 0..4 as a prompt batch's (a short and a long prompt:
            // llama.cpp sums them differently), 4..8 as decoded tokens'.
            let quantized = ActRows::quantize(ty.vec_dot_type(), &x, 8, n);
            set_simd(true);
            for (&vnni, prompt_len) in builds.iter().flat_map(|b| [(b, 4), (b, 8)]) {
                let acts = quantized.clone().prompt(4, prompt_len);
                for t0 in [0, 4] {
                    let got = x86_64_tile::tile_with(vnni, ty, w, &acts, t0)
                        .unwrap_or_else(|| panic!("{ty}: no tile"));
                    for (r, row) in got.iter().enumerate() {
                        for (t, g) in row.iter().enumerate() {
                            let want = vec_dot(ty, w[r], &acts, t0 + t);
                            assert_eq!(
                                g.to_bits(),
                                want.to_bits(),
                                "{ty} n={n} vnni={vnni} weight row {r} token {}: {g} vs {want}",
                                t0 + t,
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn attention_is_the_same_with_and_without_avx2() {
    // The AVX2+FMA build (FMA for the softmax's expf, F16C for the cache
    // rows, eight-lane sums) must round exactly as the portable one.
    if !avx2_available() {
        return; // nothing to compare against: the portable path is the only one
    }
    use crate::model::ops::{attend_body, AttnScale, HeadCache, HeadQuery};
    use half::f16;
    let mut rng = Rng(7);
    for hd in [64usize, 80, 256] {
        let cells = 130;
        let k: Vec<f16> = (0..cells * hd)
            .map(|_| f16::from_f32(rng.f32() * 4.0 - 2.0))
            .collect();
        let v: Vec<f16> = (0..cells * hd)
            .map(|_| f16::from_f32(rng.f32() * 4.0 - 2.0))
            .collect();
        let q: Vec<f32> = (0..hd).map(|_| rng.f32() * 8.0 - 4.0).collect();
        for (range, tiled) in [
            (0..1, false),
            (0..17, true),
            (3..100, false),
            (15..60, true),
            (0..100, true),
            (70..130, true),
            (60..130, false),
        ] {
            for scale in [AttnScale::Scores(0.125), AttnScale::Query(0.0625)] {
                let query = HeadQuery {
                    q: &q,
                    cells: range.clone(),
                    scale,
                    tiled,
                };
                let cache = HeadCache {
                    k: &k,
                    v: &v,
                    stride: hd,
                };
                let mut a = vec![0f32; hd];
                let mut b = vec![0f32; hd];
                x86_64::attend(query.clone(), cache, &mut a);
                attend_body(query, cache, &mut b);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&a),
                    bits(&b),
                    "hd {hd}, cells {range:?}, tiled {tiled}"
                );
            }
        }
    }
}

#[test]
fn tiled_attention_over_many_rows_equals_each_row_alone() {
    // Rows of one head share each tile's converted keys and values; each
    // row's result must be what it gets alone, with windows that start and
    // end in different tiles, in both builds.
    use crate::model::ops::{attend_body, AttnScale, HeadCache, HeadQuery};
    use half::f16;
    let mut rng = Rng(11);
    let (hd, cells) = (64usize, 200usize);
    let k: Vec<f16> = (0..cells * hd)
        .map(|_| f16::from_f32(rng.f32() * 4.0 - 2.0))
        .collect();
    let v: Vec<f16> = (0..cells * hd)
        .map(|_| f16::from_f32(rng.f32() * 4.0 - 2.0))
        .collect();
    let rows = 70;
    let q: Vec<f32> = (0..rows * hd).map(|_| rng.f32() * 8.0 - 4.0).collect();
    let cache = HeadCache {
        k: &k,
        v: &v,
        stride: hd,
    };
    // Row r is the token at position 100 + r with a window of 90 cells.
    let range = |r: usize| (100 + r + 1).saturating_sub(90)..100 + r + 1;
    for scale in [AttnScale::Scores(0.125), AttnScale::Query(0.0625)] {
        let mut all = vec![0f32; rows * hd];
        attend_tiled_rows(&q, hd, &range, scale, cache, &mut all);
        for r in 0..rows {
            let mut one = vec![0f32; hd];
            let query = HeadQuery {
                q: &q[r * hd..][..hd],
                cells: range(r),
                scale,
                tiled: true,
            };
            attend_body(query, cache, &mut one);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&all[r * hd..][..hd]), bits(&one), "row {r}");
        }
    }
}

/// Whether this CPU has the four-row kernels (AVX-512 VNNI+VL+BW); turns
/// the SIMD kernels on if so, says why the test is skipped if not.
fn four_row_kernels() -> bool {
    if !avx2_available() || !x86_64_tile::quad_available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI+VL+BW, so there are no four-row kernels");
        return false;
    }
    set_simd(true);
    true
}

/// Four random weight rows of `ty`, `n` wide, as words (see [`four_rows`]).
fn random_rows(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<Vec<u32>> {
    (0..4).map(|_| random_weight(ty, n, rng)).collect()
}

/// The rows' bytes.
fn four_rows(words: &[Vec<u32>], ty: GgmlType, n: usize) -> [&[u8]; 4] {
    std::array::from_fn(|r| &bytemuck::cast_slice::<u32, u8>(&words[r])[..ty.row_bytes(n)])
}

#[test]
fn four_row_tiles_are_bit_identical_to_the_one_row_kernels() {
    if !four_row_kernels() {
        return;
    }
    let mut rng = Rng(0x4a11_7e55);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0] {
        assert!(has_tile4(ty));
        for n in [256usize, 640] {
            let words = random_rows(ty, n, &mut rng);
            let w = four_rows(&words, ty, n);
            // Extremes too: activations that quantise to +-127 everywhere.
            let mut x: Vec<f32> = (0..8 * n).map(|_| rng.f32() * 4.0 - 1.0).collect();
            x[..n]
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = if i % 2 == 0 { 3.0 } else { -3.0 });
            let acts = ActRows::quantize(ty.vec_dot_type(), &x, 8, n);
            let mut got = vec![0f32; 4 * 8];
            assert_eq!(dot_rows4(ty, w, &acts, &mut got), 8, "{ty}: tokens done");
            for (r, row) in got.chunks_exact(8).enumerate() {
                for (t, g) in row.iter().enumerate() {
                    let want = vec_dot(ty, w[r], &acts, t);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{ty} n={n} weight row {r} token {t}: {g} vs {want}"
                    );
                }
            }
        }
    }
    assert!(!has_tile4(GgmlType::Q4_K));
}

#[test]
fn four_row_decoding_kernels_are_bit_identical_to_the_one_row_kernels() {
    if !four_row_kernels() {
        return;
    }
    let mut rng = Rng(0x6e3d_0004);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
    ] {
        for n in [256usize, 576, 640] {
            // Nine rows one after another, as in a weight matrix: two
            // whole fours for the kernel, one left over for the caller.
            let rb = ty.row_bytes(n);
            let words: Vec<Vec<u32>> = (0..9).map(|_| random_weight(ty, n, &mut rng)).collect();
            let w: Vec<u8> = words
                .iter()
                .flat_map(|r| bytemuck::cast_slice::<u32, u8>(r)[..rb].to_vec())
                .collect();
            let mut x: Vec<f32> = (0..2 * n).map(|_| rng.f32() * 4.0 - 1.0).collect();
            x[n..]
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = if i % 3 == 0 { 5.0 } else { -5.0 });
            let acts = ActRows::quantize(ty.vec_dot_type(), &x, 2, n);
            for row in 0..2 {
                let mut got = [f32::NAN; 9];
                let done = gemv_rows(ty, &w, &acts, row, &mut got);
                assert_eq!(done, 8, "{ty} n={n}: rows done");
                assert!(got[8].is_nan(), "{ty}: the ninth row is the caller's");
                for (r, g) in got[..done].iter().enumerate() {
                    let want = vec_dot(ty, &w[r * rb..][..rb], &acts, row);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{ty} n={n} weight row {r} token {row}: {g} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn simd_q8_k_quantisation_is_bit_identical_to_the_scalar_one() {
    if !avx2_available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so there is no SIMD kernel to check");
        return;
    }
    let mut rng = Rng(0x0a8c_0001);
    let n = 4 * quant::QK_K;
    let mut x: Vec<f32> = (0..n).map(|_| rng.f32() * 6.0 - 3.0).collect();
    // A block of zeros, a block whose largest magnitude comes twice with
    // both signs (the first wins), and one of exact half-steps (ties).
    x[256..512].iter_mut().for_each(|v| *v = 0.0);
    x[600] = -3.5;
    x[700] = 3.5;
    for (i, v) in x[768..].iter_mut().enumerate() {
        *v = (i as f32 - 127.0) * 0.5;
    }
    let mut want = vec![<quant::blocks::BlockQ8K as bytemuck::Zeroable>::zeroed(); 4];
    let mut got = want.clone();
    quant::generic::quantize_row_q8_k(&x, &mut want);
    set_simd(true);
    quantize_row_q8_k(&x, &mut got);
    for (b, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.d.to_bits(), g.d.to_bits(), "block {b}: scale");
        assert_eq!(w.qs, g.qs, "block {b}: quants");
        assert_eq!(w.bsums, g.bsums, "block {b}: sums");
    }
}

#[test]
fn simd_q8_0_and_q8_1_quantisation_is_bit_identical_to_the_scalar_one() {
    if !avx2_available() {
        eprintln!("skipped: this CPU has no AVX2+FMA, so there is no SIMD kernel to check");
        return;
    }
    let mut rng = Rng(0x0a8c_0002);
    let mut x: Vec<f32> = (0..8 * 32).map(|_| rng.f32() * 6.0 - 3.0).collect();
    // A block of zeros, one of exact half-steps (ties), one with NaN-free
    // extremes of both signs.
    x[32..64].iter_mut().for_each(|v| *v = 0.0);
    for (i, v) in x[64..96].iter_mut().enumerate() {
        *v = (i as f32 - 16.0) * 0.5;
    }
    x[100] = -1e6;
    x[101] = 1e6;
    set_simd(true);
    let mut want0 = vec![<quant::blocks::BlockQ8_0 as bytemuck::Zeroable>::zeroed(); 8];
    let mut got0 = want0.clone();
    quant::generic::quantize_row_q8_0(&x, &mut want0);
    quantize_row_q8_0(&x, &mut got0);
    let mut want1 = vec![<quant::blocks::BlockQ8_1 as bytemuck::Zeroable>::zeroed(); 8];
    let mut got1 = want1.clone();
    quant::generic::quantize_row_q8_1(&x, &mut want1);
    quantize_row_q8_1(&x, &mut got1);
    for b in 0..8 {
        assert_eq!(
            want0[b].d.to_bits(),
            got0[b].d.to_bits(),
            "q8_0 block {b}: scale"
        );
        assert_eq!(want0[b].qs, got0[b].qs, "q8_0 block {b}: quants");
        assert_eq!(
            want1[b].d.to_bits(),
            got1[b].d.to_bits(),
            "q8_1 block {b}: scale"
        );
        assert_eq!(
            want1[b].s.to_bits(),
            got1[b].s.to_bits(),
            "q8_1 block {b}: sum"
        );
        assert_eq!(want1[b].qs, got1[b].qs, "q8_1 block {b}: quants");
    }
}
