//! prima's inference engine: GGUF models read in place by mmap, ggml quant
//! formats, tokenizers and chat templates from GGUF metadata, and the
//! transformer forward pass over a range of layers, which is what one device
//! of a pipelined ring runs.
//!
//! Layout:
//! - [`gguf`]: the bounded GGUF v2/v3 reader.
//! - [`quant`]: block layouts, scalar reference kernels, activation quantisation.
//! - [`cpu`]: run-time SIMD dispatch (AVX2/FMA kernels) over the scalar reference.
//! - [`tensor`]: weight views and matrix products.
//! - [`model`]: architectures (`llama`, `qwen2`, `gemma3`), KV cache, forward pass.
//! - [`tokenizer`]: byte-level BPE and SentencePiece vocabularies, chat templates.
//! - [`sample`]: token sampling.
//! - [`engine`]: single-device generation and perplexity on top of the above.
//! - [`speculative`]: drafts verified in one batch by the target.
//! - `gpu` (cargo feature `gpu`): the wgpu compute backend (Vulkan, Metal,
//!   DX12) for the layers of a window.

pub mod cpu;
pub mod engine;
pub mod gguf;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod model;
pub mod quant;
pub mod sample;
pub mod speculative;
pub mod tensor;
pub mod tokenizer;

pub use gguf::{Gguf, GgufError};
pub use model::{Config, Hidden, KvCache, Model, ModelError};
pub use sample::{Sampler, SamplerConfig};
pub use tokenizer::{chat::Message, Tokenizer};

/// Where `scripts/fetch-models` caches models: `$PRIMA_MODELS`, else
/// `$XDG_CACHE_HOME/prima/models`, else `~/.cache/prima/models`.
pub fn models_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("PRIMA_MODELS") {
        return Some(PathBuf::from(dir));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(cache.join("prima/models"))
}
