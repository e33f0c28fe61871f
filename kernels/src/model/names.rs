//! GGUF tensor names, built in one place.

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";

pub const ATTN_NORM: &str = "attn_norm.weight";
pub const ATTN_Q: &str = "attn_q.weight";
pub const ATTN_K: &str = "attn_k.weight";
pub const ATTN_V: &str = "attn_v.weight";
pub const ATTN_OUT: &str = "attn_output.weight";
pub const ATTN_Q_BIAS: &str = "attn_q.bias";
pub const ATTN_K_BIAS: &str = "attn_k.bias";
pub const ATTN_V_BIAS: &str = "attn_v.bias";
pub const ATTN_Q_NORM: &str = "attn_q_norm.weight";
pub const ATTN_K_NORM: &str = "attn_k_norm.weight";
pub const POST_ATTN_NORM: &str = "post_attention_norm.weight";
pub const FFN_NORM: &str = "ffn_norm.weight";
pub const FFN_GATE: &str = "ffn_gate.weight";
pub const FFN_UP: &str = "ffn_up.weight";
pub const FFN_DOWN: &str = "ffn_down.weight";
pub const POST_FFN_NORM: &str = "post_ffw_norm.weight";

/// Full name of a per-layer tensor: `blk.{il}.{name}`.
pub fn layer(il: usize, name: &str) -> String {
    format!("blk.{il}.{name}")
}

/// The layer a tensor belongs to, if it is a per-layer tensor.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}
