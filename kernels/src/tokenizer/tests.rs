//! Unit tests on tiny vocabularies built in memory; the real models'
//! tokenizers are checked against llama.cpp in kernels/tests/real_models.rs.

use super::*;
use crate::gguf::Value;

fn md(entries: Vec<(&str, Value)>) -> Metadata {
    let mut m = Metadata::default();
    for (k, v) in entries {
        m.insert(k.to_string(), v);
    }
    m
}

fn strs(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A SentencePiece vocabulary: merges follow scores, unknown characters fall
/// back to bytes, and control tokens are only parsed when asked.
fn spm() -> Tokenizer {
    let tokens = [
        "<unk>", "<s>", "</s>", "<0x41>", "<0xC3>", "<0xA9>", "▁", "a", "b", "ab", "▁ab", "▁a",
        "<ctl>",
    ];
    let types = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1, 3];
    let scores = [
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -0.5, -0.1, -3.0, 0.0,
    ];
    Tokenizer::from_metadata(&md(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
    ]))
    .expect("tokenizer")
}

#[test]
fn spm_merges_by_score_and_falls_back_to_bytes() {
    let t = spm();
    // " ab" -> "▁ab" (the best-scoring merge chain), BOS first.
    assert_eq!(t.encode(" ab", true, false).unwrap(), vec![1, 10]);
    // "é" is not in the vocabulary: its two UTF-8 bytes.
    assert_eq!(t.encode("é", false, false).unwrap(), vec![4, 5]);
    assert_eq!(t.decode(&[10, 4, 5]), " abé");
}

#[test]
fn control_tokens_parse_only_when_asked() {
    let t = spm();
    let plain = t.encode("a<ctl>", false, false).unwrap();
    assert!(!plain.contains(&12), "{plain:?}");
    assert_eq!(t.encode("a<ctl>b", false, true).unwrap(), vec![7, 12, 8]);
    // Control tokens do not print unless asked.
    assert_eq!(t.decode(&[7, 12, 8]), "ab");
    assert_eq!(t.token_bytes(12, true), b"<ctl>");
    assert!(t.is_eog(2));
}

#[test]
fn unsupported_models_are_named() {
    let e = Tokenizer::from_metadata(&md(vec![
        ("tokenizer.ggml.model", Value::String("rwkv".into())),
        ("tokenizer.ggml.tokens", strs(&["a"])),
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("\"rwkv\""), "{e}");
    let e = Tokenizer::from_metadata(&md(vec![(
        "tokenizer.ggml.model",
        Value::String("gpt2".into()),
    )]))
    .unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
}

#[test]
fn chat_template_falls_back_to_chatml() {
    let t = spm();
    let s = t
        .apply_chat_template(&[Message::new("user", "hi")])
        .unwrap();
    assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

use super::chat::Message;
