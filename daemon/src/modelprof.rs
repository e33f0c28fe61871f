//! The model's side of Halda's inputs, read from the GGUF: per-layer FLOPs
//! by weight type, bytes per layer, input/output bytes, KV bytes per token,
//! compute-buffer estimate (spec §3 "model statistics", §4.1).

use std::collections::BTreeMap;

use prima_kernels::{gguf::Gguf, model::Config};

/// Halda's key for a weight type: ggml's name in lower case.
pub fn type_key(ty: prima_kernels::quant::GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

/// Anonymous memory of the daemon itself on a ring device, beyond the
/// forward pass's activations and caches: its runtime, network, store and
/// the allocator's free lists. Halda counts it with the compute buffer, so
/// the memory it plans for a device is what the process really holds.
/// Measured on the bigger-than-memory benchmark's devices: 21-27 MB (the
/// caches Halda reserves for a whole context cover the rest, since a
/// session's cache holds only its prompt and answer).
pub const RUNTIME_BYTES: u64 = 24 << 20;

/// What the head holds beyond that: the tokenizer, the sampler, requests.
/// Measured: about 20 MB more than the other devices.
pub const HEAD_RUNTIME_BYTES: u64 = 20 << 20;

/// Builds the model profile for a context of `n_ctx` tokens.
pub fn model_profile(file: &Gguf, cfg: &Config, name: &str, n_ctx: u32) -> halda::ModelProfile {
    let l = cfg.n_layer.max(1) as u64;
    let mut layer_bytes = 0u64;
    let mut layer_flops: BTreeMap<String, f64> = BTreeMap::new();
    let (mut input_bytes, mut output_bytes) = (0u64, 0u64);
    let mut output_flops: BTreeMap<String, f64> = BTreeMap::new();
    let mut embd = None;
    let mut has_output = false;
    for t in &file.tensors {
        if t.name.starts_with("blk.") {
            layer_bytes += t.size;
            // A mat-vec does a multiply and an add per weight; 1-D tensors
            // (norms, biases) about as much per element.
            *layer_flops.entry(type_key(t.ty)).or_default() += 2.0 * t.n_elements() as f64;
        } else if t.name == "token_embd.weight" {
            input_bytes = t.size;
            embd = Some(t);
        } else if t.name == "output.weight" {
            has_output = true;
            output_bytes += t.size;
            *output_flops.entry(type_key(t.ty)).or_default() += 2.0 * t.n_elements() as f64;
        } else if t.name == "output_norm.weight" {
            output_bytes += t.size;
            *output_flops.entry(type_key(t.ty)).or_default() += 2.0 * t.n_elements() as f64;
        }
    }
    // Tied embeddings: the head multiplies by token_embd.
    if !has_output {
        if let Some(e) = embd {
            output_bytes += e.size;
            *output_flops.entry(type_key(e.ty)).or_default() += 2.0 * e.n_elements() as f64;
        }
    }
    for v in layer_flops.values_mut() {
        *v /= l as f64;
    }
    // Attention against an f16 cache of n_ctx positions: scores and the
    // weighted sum, a multiply-add each per head dimension.
    let attn = 4.0 * (cfg.n_head * cfg.head_dim) as f64 * n_ctx as f64;
    *layer_flops.entry("f16".into()).or_default() += attn;
    let kv_dim = (cfg.n_head_kv * cfg.head_dim) as u64;
    let f = 4u64; // f32 activations
    let per_token =
        (cfg.n_embd as u64 * 4 + cfg.n_ff as u64 * 3 + (cfg.n_head as u64 * n_ctx as u64)) * f;
    halda::ModelProfile {
        name: name.to_string(),
        n_layers: cfg.n_layer as u32,
        vocab_size: cfg.n_vocab as u32,
        hidden_size: cfg.n_embd as u32,
        layer_bytes: layer_bytes / l,
        input_bytes,
        output_bytes,
        kv_bytes_per_token: 2 * 2 * kv_dim,
        layer_flops,
        output_flops,
        compute_buffer: halda::ComputeBuffer {
            cpu_bytes: per_token + RUNTIME_BYTES,
            head_extra_cpu_bytes: cfg.n_vocab as u64 * f + HEAD_RUNTIME_BYTES,
            gpu_bytes: 0,
        },
    }
}
