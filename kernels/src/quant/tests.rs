use super::{testutil::*, *};

fn golden() -> serde_json::Value {
    let text = include_str!("../../tests/data/dequant-golden.json");
    serde_json::from_str(text).expect("golden json")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn block_sizes_match_ggml() {
    let want = [
        (GgmlType::Q4_0, 18),
        (GgmlType::Q4_1, 20),
        (GgmlType::Q5_0, 22),
        (GgmlType::Q5_1, 24),
        (GgmlType::Q8_0, 34),
        (GgmlType::Q8_1, 36),
        (GgmlType::Q2_K, 84),
        (GgmlType::Q3_K, 110),
        (GgmlType::Q4_K, 144),
        (GgmlType::Q5_K, 176),
        (GgmlType::Q6_K, 210),
        (GgmlType::Q8_K, 292),
    ];
    for (t, size) in want {
        assert_eq!(t.type_size(), size, "{t}");
        assert_eq!(GgmlType::from_u32(t.id()), Some(t));
    }
    assert_eq!(GgmlType::from_u32(16), None, "IQ2_XXS is not supported");
}

/// Dequantisation of every type agrees with gguf-py's independent numpy
/// implementation on random blocks.
#[test]
fn dequantize_matches_gguf_py() {
    let g = golden();
    let types = g["types"].as_object().expect("types");
    assert_eq!(types.len(), 12);
    for (name, case) in types {
        let ty = GgmlType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .expect(name);
        let bytes = hex(case["hex"].as_str().expect("hex"));
        let want: Vec<f32> = case["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v.as_f64().expect("f") as f32)
            .collect();
        let words = aligned(&bytes);
        let data = &bytemuck::cast_slice::<u32, u8>(&words)[..bytes.len()];
        let mut got = vec![0f32; want.len()];
        dequantize_row(ty, data, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: {g} != {w}"
            );
        }
    }
}

/// For every weight type: the integer dot product against the quantised
/// activations equals the float dot product of the dequantised weights with
/// the dequantised activations, to float rounding.
#[test]
fn vec_dot_matches_dequantized_dot_for_every_type() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for ty in GgmlType::ALL.into_iter().filter(|t| t.is_weight_type()) {
        for &n in &[256usize, 512, 1024] {
            let words = random_weight(ty, n, &mut rng);
            let w = &bytemuck::cast_slice::<u32, u8>(&words)[..ty.row_bytes(n)];
            let x: Vec<f32> = (0..n).map(|_| rng.f32() * 3.0).collect();
            let acts = ActRows::quantize(ty.vec_dot_type(), &x, 1, n);
            let got = vec_dot(ty, w, &acts, 0);

            let mut wf = vec![0f32; n];
            dequantize_row(ty, w, &mut wf);
            let xf = dequantize_acts(&acts);
            let act_ty = ty.vec_dot_type().as_ggml();
            let want: f64 = wf.iter().zip(&xf).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = wf
                .iter()
                .zip(&xf)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            // Q8_1's precomputed sum is stored as f16, which costs a little more.
            let tol = if act_ty == GgmlType::Q8_1 { 2e-3 } else { 1e-5 };
            assert!(
                (got as f64 - want).abs() <= tol * mag + 1e-6,
                "{ty} n={n}: {got} vs {want} (magnitude {mag})"
            );
        }
    }
}

/// Activation quantisation error stays within ggml's bounds.
#[test]
fn activation_quantization_error_is_bounded() {
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..1024).map(|_| rng.f32() * 10.0).collect();
    for ty in [
        ActType::Q8_0,
        ActType::Q8_1,
        ActType::Q8_K,
        ActType::F16,
        ActType::BF16,
    ] {
        let q = ActRows::quantize(ty, &x, 1, x.len());
        let back = dequantize_acts(&q);
        let rmse = (x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / x.len() as f32)
            .sqrt();
        // 8-bit over a range of 10: one step is 10/127 ~ 0.079; rmse ~ step/sqrt(12).
        let bound = match ty {
            ActType::BF16 => 0.03,
            ActType::F16 => 0.003,
            _ => 0.03,
        };
        assert!(rmse < bound, "{ty:?}: rmse {rmse}");
    }
}

#[test]
fn ragged_or_misaligned_data_is_rejected() {
    let words = [0u32; 16];
    let bytes = bytemuck::cast_slice::<u32, u8>(&words);
    assert!(matches!(
        check_blocks(GgmlType::Q4_0, &bytes[..19]),
        Err(QuantError::Ragged { .. })
    ));
    assert!(matches!(
        check_blocks(GgmlType::Q4_0, &bytes[1..19]),
        Err(QuantError::Misaligned { .. })
    ));
    assert!(check_blocks(GgmlType::Q4_0, &bytes[..36]).is_ok());
}
