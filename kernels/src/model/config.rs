//! Hyper-parameters read from GGUF metadata, per architecture.

use crate::gguf::{GgufError, Metadata};

/// Architectures the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama`: Llama 2/3, Mistral-style, SmolLM2.
    Llama,
    /// `qwen2`: llama with QKV biases and NeoX rope.
    Qwen2,
    /// `gemma3`: sliding-window/global interleave, QK norms, sandwich norms,
    /// GELU, scaled embedding.
    Gemma3,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Rotary embedding layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// Rotate adjacent pairs (x[2i], x[2i+1]) — llama.
    Normal,
    /// Rotate halves (x[i], x[i + d/2]) — NeoX, qwen2, gemma.
    Neox,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub ctx_train: usize,
    pub rms_eps: f32,
    pub rope: RopeKind,
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rope_scale: f32,
    /// Rope base of sliding-window layers (gemma3), else `rope_base`.
    pub rope_base_swa: f32,
    /// Sliding-window size, for layers where [`Config::is_swa`] is true.
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer is global; the others slide.
    pub swa_pattern: usize,
    /// Multiplier on the queries before attention (applied with kq scale 1).
    pub attn_scale: f32,
    /// Multiplier on embeddings (gemma: sqrt(n_embd)).
    pub embed_scale: Option<f32>,
}

/// Sanity limit on any single dimension read from metadata.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 4096;

impl Config {
    pub fn from_metadata(md: &Metadata) -> Result<Self, GgufError> {
        let arch_name = md.get_str("general.architecture")?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| GgufError::OutOfRange {
            key: "general.architecture".into(),
            value: arch_name.into(),
            detail: "supported architectures are llama, qwen2 and gemma3".into(),
        })?;
        let k = |s: &str| format!("{arch_name}.{s}");
        let n_embd = md.get_usize(&k("embedding_length"), MAX_DIM)?;
        let n_head = md.get_usize(&k("attention.head_count"), MAX_DIM)?;
        let n_head_kv = md
            .opt_usize(&k("attention.head_count_kv"), MAX_DIM)?
            .unwrap_or(n_head);
        let head_dim = md
            .opt_usize(&k("attention.key_length"), MAX_DIM)?
            .unwrap_or(n_embd / n_head);
        if let Some(vl) = md.opt_usize(&k("attention.value_length"), MAX_DIM)? {
            if vl != head_dim {
                return Err(GgufError::OutOfRange {
                    key: k("attention.value_length"),
                    value: vl.to_string(),
                    detail: format!("must equal key_length {head_dim}"),
                });
            }
        }
        if head_dim > super::MAX_HEAD_DIM {
            return Err(GgufError::OutOfRange {
                key: k("attention.key_length"),
                value: head_dim.to_string(),
                detail: format!(
                    "heads larger than {} are not supported",
                    super::MAX_HEAD_DIM
                ),
            });
        }
        if n_head % n_head_kv != 0 {
            return Err(GgufError::OutOfRange {
                key: k("attention.head_count_kv"),
                value: n_head_kv.to_string(),
                detail: format!("must divide head_count {n_head}"),
            });
        }
        let tokens = md.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
        let n_vocab = match md.opt_usize(&k("vocab_size"), MAX_DIM * 16)? {
            Some(v) => v,
            None => tokens
                .map(|t| t.len())
                .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.tokens".into()))?,
        };
        let rope_dim = md
            .opt_usize(&k("rope.dimension_count"), MAX_DIM)?
            .unwrap_or(head_dim);
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(GgufError::OutOfRange {
                key: k("rope.dimension_count"),
                value: rope_dim.to_string(),
                detail: format!("must be even and at most the head size {head_dim}"),
            });
        }
        let rope_scale = match md.opt_f32(&k("rope.scaling.factor"))? {
            Some(f) if f > 0.0 && md.opt_str(&k("rope.scaling.type"))? != Some("none") => 1.0 / f,
            _ => 1.0,
        };
        let rope_base = md.opt_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0);
        let (rope, rope_base_swa, sliding_window, swa_pattern, attn_scale, embed_scale) = match arch
        {
            Arch::Llama => (
                RopeKind::Normal,
                rope_base,
                None,
                1,
                1.0 / (head_dim as f32).sqrt(),
                None,
            ),
            Arch::Qwen2 => (
                RopeKind::Neox,
                rope_base,
                None,
                1,
                1.0 / (head_dim as f32).sqrt(),
                None,
            ),
            // llama.cpp hard-codes these for gemma3: local layers use rope
            // base 10000, five local layers per global one.
            Arch::Gemma3 => (
                RopeKind::Neox,
                10_000.0,
                md.opt_usize(&k("attention.sliding_window"), MAX_DIM)?,
                6,
                1.0 / (head_dim as f32).sqrt(),
                Some((n_embd as f32).sqrt()),
            ),
        };
        Ok(Self {
            arch,
            n_layer: md.get_usize(&k("block_count"), MAX_LAYERS)?,
            n_embd,
            n_ff: md.get_usize(&k("feed_forward_length"), MAX_DIM)?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            ctx_train: md.opt_usize(&k("context_length"), 1 << 24)?.unwrap_or(4096),
            rms_eps: md.get_f32(&k("attention.layer_norm_rms_epsilon"))?,
            rope,
            rope_dim,
            rope_base,
            rope_scale,
            rope_base_swa,
            sliding_window,
            swa_pattern,
            attn_scale,
            embed_scale,
        })
    }

    /// Whether layer `il` uses sliding-window attention.
    pub fn is_swa(&self, il: usize) -> bool {
        self.sliding_window.is_some()
            && self.swa_pattern > 1
            && il % self.swa_pattern < self.swa_pattern - 1
    }

    /// Width of the K (and V) rows of one token.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of the Q rows of one token.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}
