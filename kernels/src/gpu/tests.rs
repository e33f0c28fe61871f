//! Every GPU kernel against the CPU reference, on whatever adapter this
//! machine has; CI installs Mesa's lavapipe (a software Vulkan device), so
//! these run without a GPU.

use std::sync::{Arc, OnceLock};

use half::f16;

use super::{
    window::{self, GpuWeight},
    Batch, Gpu, GpuOptions, Op,
};
use crate::{
    model::{ops, RopeKind},
    quant::{
        dequantize_row,
        testutil::{dequantize_acts, random_weight, Rng},
        ActRows, ActType, GgmlType,
    },
};

fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::open(&GpuOptions {
            adapter: None,
            allow_software: true,
        })
        .expect(
            "a Vulkan adapter: install Mesa's software one (apt install mesa-vulkan-drivers \
             libvulkan1), as .ci/run does",
        )
    })
    .clone()
}

/// Every weight type the GPU backend runs (all of ggml's but the
/// activation-only Q8_1 and Q8_K).
fn types() -> Vec<GgmlType> {
    let t: Vec<GgmlType> = GgmlType::ALL
        .into_iter()
        .filter(|&t| super::supports(t))
        .collect();
    assert_eq!(t.len(), 13);
    t
}

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.f32()).collect()
}

fn buffer_with(g: &Gpu, v: &[f32]) -> wgpu::Buffer {
    g.upload("test", bytemuck::cast_slice(v)).unwrap()
}

/// Runs one recorded dispatch and reads `n` floats of `out` back.
fn run(g: &Gpu, f: impl FnOnce(&mut Batch), out: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let mut b = Batch::new(g);
    f(&mut b);
    b.submit().unwrap();
    g.read(out, n).unwrap()
}

#[test]
fn lists_adapters_and_opens_one() {
    let all = super::adapters();
    assert!(!all.is_empty(), "no adapter");
    let g = gpu();
    assert!(all.contains(&g.report), "{all:?} {:?}", g.report);
    assert!(g.max_binding() >= 1 << 20);
}

#[test]
fn a_software_adapter_is_refused_unless_allowed() {
    let all = super::adapters();
    let r = Gpu::open(&GpuOptions::default());
    if all.iter().all(|a| a.kind == super::AdapterKind::Software) {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("only software adapters"), "{e}");
    } else {
        assert_ne!(r.unwrap().report.kind, super::AdapterKind::Software);
    }
    let e = Gpu::open(&GpuOptions {
        adapter: Some("no such adapter".into()),
        allow_software: true,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("none named like"), "{e}");
}

#[test]
fn matvec_matches_the_reference_for_every_type_and_shape() {
    let g = gpu();
    let mut rng = Rng(0x5eed);
    for ty in types() {
        let bs = ty.block_size();
        // Odd row counts, odd block counts, and for float types odd widths.
        let mut shapes = vec![(1, bs), (7, 3 * bs), (33, 2 * bs), (130, 5 * bs)];
        if bs == 1 {
            shapes.extend([(5, 37), (3, 1)]);
        }
        for (rows, cols) in shapes {
            for n in [1, 3] {
                let words = random_weight(ty, rows * cols, &mut rng);
                let bytes = &bytemuck::cast_slice::<u32, u8>(&words)[..ty.row_bytes(cols) * rows];
                let x = randn(n * cols, &mut rng);
                // Chunks of at most 4 rows once, to cover the chunked path.
                let chunk = if rows == 33 { Some(4) } else { None };
                let w =
                    GpuWeight::from_bytes_chunked(&g, "w", ty, rows, cols, bytes, chunk).unwrap();
                let acts = ActRows::quantize(ty.vec_dot_type(), &x, n, cols);
                let xb = buffer_with(&g, &x);
                let xq = g.buffer("xq", (n * cols * 4) as u64).unwrap();
                let xs = g.buffer("xs", (n * cols.div_ceil(32) * 4) as u64).unwrap();
                let yb = g.buffer("y", (n * rows * 4) as u64).unwrap();
                let got = run(
                    &g,
                    |b| {
                        window::act_quant(b, &xb, &xq, &xs, n, cols, w.act()).unwrap();
                        w.matvec(b, &xq, &xs, &yb, n).unwrap()
                    },
                    &yb,
                    n * rows,
                );
                let xr = dequantize_acts(&acts);
                let rb = ty.row_bytes(cols);
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    let wr = &bytes[r * rb..(r + 1) * rb];
                    dequantize_row(ty, wr, &mut row);
                    for t in 0..n {
                        // The CPU's own product: the same rounded activations,
                        // integer dot products within blocks.
                        let want = crate::cpu::vec_dot(ty, wr, &acts, t) as f64;
                        let xt = &xr[t * cols..(t + 1) * cols];
                        let mag: f64 = row
                            .iter()
                            .zip(xt)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let e = (got[t * rows + r] as f64 - want).abs();
                        assert!(
                            e <= 2e-5 * mag + 1e-6,
                            "{ty} {rows}x{cols} n={n} row {r} token {t}: {} vs {want} (|terms| {mag})",
                            got[t * rows + r]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn activations_are_rounded_as_the_cpu_rounds_them() {
    let g = gpu();
    let mut rng = Rng(21);
    let (n, cols) = (3, 512);
    let mut x: Vec<f32> = randn(n * cols, &mut rng).iter().map(|v| v * 7.0).collect();
    x[0..256].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
    for act in [
        ActType::F32,
        ActType::F16,
        ActType::BF16,
        ActType::Q8_0,
        ActType::Q8_1,
        ActType::Q8_K,
    ] {
        let xb = buffer_with(&g, &x);
        let xq = g.buffer("xq", (n * cols * 4) as u64).unwrap();
        let xs = g.buffer("xs", (n * cols / 32 * 4) as u64).unwrap();
        let got = run(
            &g,
            |b| window::act_quant(b, &xb, &xq, &xs, n, cols, act).unwrap(),
            &xq,
            n * cols,
        );
        let want = dequantize_acts(&ActRows::quantize(act, &x, n, cols));
        assert_eq!(got, want, "{act:?}");
    }
}

#[test]
fn embedding_lookup_matches_the_reference() {
    let g = gpu();
    let mut rng = Rng(77);
    for ty in types() {
        let (rows, cols) = (19, 2 * ty.block_size().max(32));
        let words = random_weight(ty, rows * cols, &mut rng);
        let bytes = &bytemuck::cast_slice::<u32, u8>(&words)[..ty.row_bytes(cols) * rows];
        let w = GpuWeight::from_bytes_chunked(&g, "embd", ty, rows, cols, bytes, Some(5)).unwrap();
        let ids: Vec<u32> = vec![0, 18, 7, 7, 11];
        let idb = g.upload("ids", bytemuck::cast_slice(&ids)).unwrap();
        let out = g.buffer("out", (ids.len() * cols * 4) as u64).unwrap();
        let got = run(
            &g,
            |b| w.get_rows(b, &idb, &out, ids.len(), 1.5).unwrap(),
            &out,
            ids.len() * cols,
        );
        let rb = ty.row_bytes(cols);
        let mut want = vec![0f32; cols];
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            dequantize_row(ty, &bytes[id * rb..(id + 1) * rb], &mut want);
            for (i, v) in want.iter().enumerate() {
                assert_eq!(got[t * cols + i], v * 1.5, "{ty} token {t} col {i}");
            }
        }
    }
}

#[test]
fn rms_norm_matches_the_reference() {
    let g = gpu();
    let mut rng = Rng(3);
    for (len, rows) in [(576, 3), (37, 5), (256, 1)] {
        let x = randn(len * rows, &mut rng);
        let w = randn(len, &mut rng);
        let mut want = x.clone();
        ops::rms_norm(&mut want, &w, 1e-5);
        let (xb, wb) = (buffer_with(&g, &x), buffer_with(&g, &w));
        let got = run(
            &g,
            |b| window::rms_norm(b, &xb, &wb, len, rows, 1e-5).unwrap(),
            &xb,
            len * rows,
        );
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{len}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn rope_matches_the_reference_in_both_conventions() {
    let g = gpu();
    let mut rng = Rng(11);
    for kind in [RopeKind::Normal, RopeKind::Neox] {
        // Three tokens of 3 heads of 64, rotating all 64 or only the first 32.
        for n_dims in [64, 32] {
            let (n, heads, hd, pos) = (3, 3, 64, 5);
            let x = randn(n * heads * hd, &mut rng);
            let rope = ops::Rope::new(kind, n_dims, 10_000.0, 1.0);
            let mut want = x.clone();
            let mut cs = Vec::new();
            for t in 0..n {
                let c = rope.cache(pos + t);
                rope.apply(&mut want[t * heads * hd..(t + 1) * heads * hd], hd, &c);
                cs.extend(c.iter().flat_map(|&(c, s)| [c, s]));
            }
            let (xb, csb) = (buffer_with(&g, &x), buffer_with(&g, &cs));
            let neox = u32::from(kind == RopeKind::Neox);
            let got = run(
                &g,
                |b| {
                    b.push(
                        Op::Rope,
                        None,
                        &[&xb, &csb],
                        &[
                            heads as u32,
                            hd as u32,
                            n_dims as u32,
                            neox,
                            (heads * hd) as u32,
                        ],
                        [(heads * n_dims / 2).div_ceil(64) as u32, n as u32, 1],
                    )
                    .unwrap()
                },
                &xb,
                x.len(),
            );
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6, "{kind:?} {n_dims} [{i}]: {a} vs {b}");
            }
        }
    }
}

/// Attention as the CPU forward pass computes it, for one batch.
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    n: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    pos: usize,
    window: Option<usize>,
    scale: f32,
) -> Vec<f32> {
    let (qd, kvd) = (n_head * hd, n_kv * hd);
    let mut out = vec![0f32; n * qd];
    for t in 0..n {
        for head in 0..n_head {
            let p = pos + t;
            let kvh = head / (n_head / n_kv);
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qh: Vec<f32> = q[t * qd + head * hd..][..hd]
                .iter()
                .map(|&x| f16::from_f32(x).to_f32())
                .collect();
            let mut scores: Vec<f32> = (first..=p)
                .map(|j| {
                    let k: Vec<f32> = kc[j * kvd + kvh * hd..][..hd]
                        .iter()
                        .map(|v| v.to_f32())
                        .collect();
                    ops::dot(&k, &qh) * scale
                })
                .collect();
            ops::softmax_row_body(&mut scores, first);
            let o = &mut out[t * qd + head * hd..][..hd];
            for (j, &pj) in (first..=p).zip(&scores) {
                let pj = f16::from_f32(pj).to_f32();
                for (d, o) in o.iter_mut().enumerate() {
                    *o += pj * vc[j * kvd + kvh * hd + d].to_f32();
                }
            }
        }
    }
    out
}

#[test]
fn attention_over_the_kv_cache_matches_the_reference() {
    let g = gpu();
    let mut rng = Rng(99);
    // (query heads, kv heads, head dim, window): GQA, a head wider than the
    // workgroup and not a multiple of it, a sliding window.
    for (n_head, n_kv, hd, window) in [(4, 2, 64, None), (3, 1, 80, None), (2, 2, 32, Some(3))] {
        let (qd, kvd, ctx) = (n_head * hd, n_kv * hd, 150);
        let scale = 1.0 / (hd as f32).sqrt();
        let kb = g.buffer("kc", (ctx * kvd * 2) as u64).unwrap();
        let vb = g.buffer("vc", (ctx * kvd * 2) as u64).unwrap();
        let mut kc = vec![f16::ZERO; ctx * kvd];
        let mut vc = vec![f16::ZERO; ctx * kvd];
        // A prompt of 130 tokens (more than two key tiles), then 1, then 3.
        let mut pos = 0;
        for n in [130, 1, 3] {
            let q = randn(n * qd, &mut rng);
            let k = randn(n * kvd, &mut rng);
            let v = randn(n * kvd, &mut rng);
            for i in 0..n * kvd {
                kc[pos * kvd + i] = f16::from_f32(k[i]);
                vc[pos * kvd + i] = f16::from_f32(v[i]);
            }
            let (qb, kb_, vb_) = (
                buffer_with(&g, &q),
                buffer_with(&g, &k),
                buffer_with(&g, &v),
            );
            let ob = g.buffer("o", (n * qd * 4) as u64).unwrap();
            let got = run(
                &g,
                |b| {
                    b.push(
                        Op::KvStore,
                        None,
                        &[&kb_, &vb_, &kb, &vb],
                        &[kvd as u32, pos as u32, n as u32],
                        [(kvd / 2).div_ceil(64) as u32, n as u32, 1],
                    )
                    .unwrap();
                    b.push(
                        Op::Attention,
                        None,
                        &[&qb, &kb, &vb, &ob],
                        &[
                            hd as u32,
                            qd as u32,
                            kvd as u32,
                            (n_head / n_kv) as u32,
                            pos as u32,
                            window.unwrap_or(0) as u32,
                            scale.to_bits(),
                        ],
                        [n_head as u32, n as u32, 1],
                    )
                    .unwrap();
                },
                &ob,
                n * qd,
            );
            let want = attention_reference(&q, &kc, &vc, n, n_head, n_kv, hd, pos, window, scale);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-3 * b.abs().max(0.05),
                    "heads {n_head}/{n_kv} hd {hd} window {window:?} pos {pos} [{i}]: {a} vs {b}"
                );
            }
            pos += n;
        }
    }
}

#[test]
fn gated_activations_match_the_reference() {
    let g = gpu();
    let mut rng = Rng(5);
    let len = 1000;
    let gate: Vec<f32> = randn(len, &mut rng).iter().map(|v| v * 12.0).collect();
    let up = randn(len, &mut rng);
    for gelu in [false, true] {
        let (gb, ub) = (buffer_with(&g, &gate), buffer_with(&g, &up));
        let (gx, gy) = super::grid(len, 64);
        let got = run(
            &g,
            |b| {
                b.push(
                    Op::FfnAct,
                    None,
                    &[&gb, &ub],
                    &[len as u32, u32::from(gelu), gx],
                    [gx, gy, 1],
                )
                .unwrap()
            },
            &gb,
            len,
        );
        for i in 0..len {
            let a = if gelu {
                ops::gelu(gate[i])
            } else {
                ops::silu(gate[i])
            };
            let want = a * up[i];
            // GELU goes through f16 on both sides: a tanh one ulp apart can
            // round to neighbouring halves.
            let tol = if gelu {
                2e-3 * want.abs() + 1e-6
            } else {
                1e-5 * want.abs().max(1e-3)
            };
            assert!(
                (got[i] - want).abs() <= tol,
                "gelu={gelu} {}: {} vs {want}",
                gate[i],
                got[i]
            );
        }
    }
}

#[test]
fn add_broadcasts_and_copy_copies() {
    let g = gpu();
    let a: Vec<f32> = (0..70).map(|i| i as f32).collect();
    let bias: Vec<f32> = (0..7).map(|i| i as f32 * 0.5).collect();
    let (ab, bb) = (buffer_with(&g, &a), buffer_with(&g, &bias));
    let got = run(&g, |b| window::add(b, &ab, &bb, 70, 7).unwrap(), &ab, 70);
    for i in 0..70 {
        assert_eq!(got[i], a[i] + bias[i % 7]);
    }
    let cb = g.buffer("c", 70 * 4).unwrap();
    let got = run(&g, |b| window::copy(b, &cb, &ab, 70).unwrap(), &cb, 70);
    assert_eq!(got[69], a[69] + bias[69 % 7]);
}

#[test]
fn an_unsupported_type_is_an_error_not_a_crash() {
    let g = gpu();
    let e = GpuWeight::from_bytes_chunked(&g, "blk.0.x", GgmlType::Q8_K, 1, 256, &[0; 292], None)
        .err()
        .expect("Q8_K is an activation format")
        .to_string();
    assert!(e.contains("blk.0.x") && e.contains("Q8_K"), "{e}");
}
