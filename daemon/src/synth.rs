//! `primad synth`: writes a valid llama-family GGUF of a chosen shape and
//! quantisation with random weights and a real tokenizer (copied from
//! another GGUF, SmolLM2's by default), so big-model behaviour (memory
//! limits, streaming, planning) can be tested without downloading one.
//! llama.cpp loads these files too, which is how prima is compared with it.
//!
//! Weights are random but scaled like a trained network's (about
//! 1/sqrt(fan-in) per element), so activations stay finite through any
//! number of layers and the output is gibberish, not NaN.

use std::{
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{bail, Context, Result};
use half::f16;
use prima_kernels::{
    gguf::{
        write::{GgufWriter, TensorSpec},
        Gguf, Value,
    },
    quant::GgmlType,
};
use rand::{rngs::StdRng, RngCore, SeedableRng};

/// A llama-family shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub n_layer: u64,
    pub n_embd: u64,
    pub n_ff: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
}

impl Shape {
    /// Named shapes: Llama 3.2 1B / 3B and Llama 3.1 8B geometry, and
    /// `ref`, the shape of the reference's bigger-than-memory model (the 3B
    /// geometry: 28 layers, d_model 3072, d_ff 8192, 24/8 heads).
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Shape {
                n_layer: 4,
                n_embd: 256,
                n_ff: 768,
                n_head: 4,
                n_head_kv: 2,
            },
            "1b" => Shape {
                n_layer: 16,
                n_embd: 2048,
                n_ff: 8192,
                n_head: 32,
                n_head_kv: 8,
            },
            "3b" | "ref" => Shape {
                n_layer: 28,
                n_embd: 3072,
                n_ff: 8192,
                n_head: 24,
                n_head_kv: 8,
            },
            "8b" => Shape {
                n_layer: 32,
                n_embd: 4096,
                n_ff: 14336,
                n_head: 32,
                n_head_kv: 8,
            },
            _ => return None,
        })
    }
}

/// Weight quantisations `synth` can write.
pub fn parse_quant(q: &str) -> Result<GgmlType> {
    Ok(match q.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlType::Q4_0,
        "q8_0" => GgmlType::Q8_0,
        "q4_k" => GgmlType::Q4_K,
        "f16" => GgmlType::F16,
        other => bail!("quantisation '{other}' is not one synth writes (q4_0, q8_0, q4_k, f16)"),
    })
}

/// The file `write` would produce, without writing it.
pub fn plan(shape: Shape, quant: GgmlType, tokenizer: &Gguf) -> Result<GgufWriter> {
    let s = shape;
    if !s.n_embd.is_multiple_of(s.n_head) || !s.n_head.is_multiple_of(s.n_head_kv) {
        bail!("heads must divide d_model and kv heads must divide heads");
    }
    let blk = quant.block_size() as u64;
    if !s.n_embd.is_multiple_of(blk) || !s.n_ff.is_multiple_of(blk) {
        bail!(
            "{} needs d_model and d_ff to be multiples of {blk}",
            quant.name()
        );
    }
    let tokens = tokenizer
        .metadata
        .get_str_array("tokenizer.ggml.tokens")
        .context("the tokenizer source has no tokenizer.ggml.tokens")?;
    let n_vocab = tokens.len() as u64;
    let head_dim = s.n_embd / s.n_head;
    let kv_dim = head_dim * s.n_head_kv;
    let mut w = GgufWriter::new();
    let a = "llama";
    w.kv("general.architecture", Value::String(a.into()))
        .kv(
            "general.name",
            Value::String(format!(
                "prima synthetic {}L-{}d {}",
                s.n_layer,
                s.n_embd,
                quant.name()
            )),
        )
        .kv(format!("{a}.block_count"), Value::U32(s.n_layer as u32))
        .kv(format!("{a}.context_length"), Value::U32(4096))
        .kv(format!("{a}.embedding_length"), Value::U32(s.n_embd as u32))
        .kv(
            format!("{a}.feed_forward_length"),
            Value::U32(s.n_ff as u32),
        )
        .kv(
            format!("{a}.attention.head_count"),
            Value::U32(s.n_head as u32),
        )
        .kv(
            format!("{a}.attention.head_count_kv"),
            Value::U32(s.n_head_kv as u32),
        )
        .kv(format!("{a}.rope.freq_base"), Value::F32(10000.0))
        .kv(
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        )
        .kv(
            format!("{a}.rope.dimension_count"),
            Value::U32(head_dim as u32),
        )
        .kv(format!("{a}.vocab_size"), Value::U32(n_vocab as u32));
    for (k, v) in tokenizer.metadata.iter() {
        if k.starts_with("tokenizer.") {
            w.kv(k.clone(), v.clone());
        }
    }
    let t = |name: String, dims: Vec<u64>, ty: GgmlType| TensorSpec { name, dims, ty };
    let emb_ty = if quant == GgmlType::F16 {
        GgmlType::F16
    } else {
        GgmlType::Q8_0
    };
    w.tensor(t(
        "token_embd.weight".into(),
        vec![s.n_embd, n_vocab],
        emb_ty,
    ));
    for il in 0..s.n_layer {
        let b = |n: &str| format!("blk.{il}.{n}.weight");
        w.tensor(t(b("attn_norm"), vec![s.n_embd], GgmlType::F32))
            .tensor(t(b("attn_q"), vec![s.n_embd, s.n_embd], quant))
            .tensor(t(b("attn_k"), vec![s.n_embd, kv_dim], quant))
            .tensor(t(b("attn_v"), vec![s.n_embd, kv_dim], quant))
            .tensor(t(b("attn_output"), vec![s.n_embd, s.n_embd], quant))
            .tensor(t(b("ffn_norm"), vec![s.n_embd], GgmlType::F32))
            .tensor(t(b("ffn_gate"), vec![s.n_embd, s.n_ff], quant))
            .tensor(t(b("ffn_up"), vec![s.n_embd, s.n_ff], quant))
            .tensor(t(b("ffn_down"), vec![s.n_ff, s.n_embd], quant));
    }
    w.tensor(t(
        "output_norm.weight".into(),
        vec![s.n_embd],
        GgmlType::F32,
    ))
    .tensor(t("output.weight".into(), vec![s.n_embd, n_vocab], emb_ty));
    Ok(w)
}

/// Fills `buf` with random blocks of `ty` whose elements have standard
/// deviation about `std`.
fn fill(ty: GgmlType, buf: &mut [u8], std: f32, rng: &mut StdRng) {
    rng.fill_bytes(buf);
    let put_f16 = |b: &mut [u8], v: f32| b.copy_from_slice(&f16::from_f32(v).to_le_bytes());
    match ty {
        GgmlType::F32 => {
            // Norm weights: ones.
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&1.0f32.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in buf.chunks_exact_mut(2) {
                // Uniform in [-sqrt(3) std, sqrt(3) std].
                let u = u16::from_le_bytes([c[0], c[1]]) as f32 / 65535.0 * 2.0 - 1.0;
                put_f16(c, u * std * 1.732);
            }
        }
        // (q - 8) * d with q uniform in 0..16: std = 4.61 d.
        GgmlType::Q4_0 => {
            for b in buf.chunks_exact_mut(18) {
                put_f16(&mut b[..2], std / 4.61);
            }
        }
        // q * d with q uniform in -128..128: std = 73.9 d.
        GgmlType::Q8_0 => {
            for b in buf.chunks_exact_mut(34) {
                put_f16(&mut b[..2], std / 73.9);
            }
        }
        // d * sc * q - dmin * m with 6-bit sc, m (mean 31.5) and q in
        // 0..16: std about d * 31.5 * 4.6; dmin = 7.5 d centres the
        // sub-blocks on average.
        GgmlType::Q4_K => {
            for b in buf.chunks_exact_mut(144) {
                let d = std / (31.5 * 4.61);
                put_f16(&mut b[..2], d);
                put_f16(&mut b[2..4], d * 7.5);
            }
        }
        _ => unreachable!("parse_quant allows only the types above"),
    }
}

/// Writes the synthetic model to `out` with weights from `seed`; calls
/// `progress(bytes_written)` as it goes.
pub fn write(w: &GgufWriter, out: &Path, seed: u64, mut progress: impl FnMut(u64)) -> Result<()> {
    let tmp = out.with_extension("gguf.partial");
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut bw = BufWriter::with_capacity(8 << 20, f);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut done = 0u64;
    let tensors = w.tensors().to_vec();
    w.write(&mut bw, |i, buf| {
        let t = &tensors[i];
        let fan_in = t.dims[0] as f32;
        // The embedding rows are looked up, not multiplied: unit scale.
        let std = if t.name == "token_embd.weight" {
            1.0
        } else {
            1.0 / fan_in.sqrt()
        };
        fill(t.ty, buf, std, &mut rng);
        done += buf.len() as u64;
        progress(done);
    })
    .with_context(|| format!("writing {} (is the disk full?)", tmp.display()))?;
    bw.flush()
        .with_context(|| format!("writing {} (is the disk full?)", tmp.display()))?;
    let f = bw.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_and_quant_names() {
        assert_eq!(Shape::named("ref").unwrap().n_embd, 3072);
        assert!(Shape::named("70b").is_none());
        assert_eq!(parse_quant("Q4_K").unwrap(), GgmlType::Q4_K);
        assert!(parse_quant("q3_k")
            .unwrap_err()
            .to_string()
            .contains("q4_0"));
    }
}
