//! Tokenizers built from GGUF metadata, matching llama.cpp's.
//!
//! * `gpt2` vocabularies (byte-level BPE with merges) run on the `tokenizers`
//!   crate, with the pre-tokenizer the file names (`tokenizer.ggml.pre`).
//! * `llama` vocabularies (SentencePiece with scores, byte fallback; Gemma)
//!   use llama.cpp's score-driven bigram merge, in [`spm`].
//!
//! Special tokens are split out of the text first, as llama.cpp does:
//! user-defined tokens always, control tokens only when `parse_special`.

mod bytelevel;
pub mod chat;
mod spm;

use tokenizers::{
    models::bpe::BPE,
    pre_tokenizers::{
        byte_level::ByteLevel,
        digits::Digits,
        sequence::Sequence,
        split::{Split, SplitPattern},
        PreTokenizerWrapper,
    },
    SplitDelimiterBehavior,
};

use crate::gguf::{GgufError, Metadata};

/// Token kinds (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model {0:?} (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer {0:?} (supported: default, gpt2, smollm, starcoder, llama-bpe, llama3, qwen2)")]
    UnsupportedPre(String),
    #[error("tokenizer metadata is inconsistent: {0}")]
    Inconsistent(String),
    #[error("tokenizer failed: {0}")]
    Backend(String),
    #[error("chat template: {0}")]
    Template(String),
}

enum Engine {
    Bpe(Box<tokenizers::Tokenizer>),
    Spm(Box<spm::Spm>),
}

/// A tokenizer for one model.
pub struct Tokenizer {
    engine: Engine,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Special tokens to split out of raw text, longest first.
    specials: Vec<(String, u32, TokenKind)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End-of-generation tokens: EOS, EOT and friends.
    eog: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name())
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Self, TokenizerError> {
        let model = md.get_str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = md
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::Inconsistent("empty vocabulary".into()));
        }
        let kinds: Vec<TokenKind> = if md.has("tokenizer.ggml.token_type") {
            md.get_i64_array("tokenizer.ggml.token_type")?
                .into_iter()
                .map(TokenKind::from_i64)
                .collect()
        } else {
            vec![TokenKind::Normal; n]
        };
        if kinds.len() != n {
            return Err(TokenizerError::Inconsistent(format!(
                "{n} tokens but {} token types",
                kinds.len()
            )));
        }
        let engine = match model {
            "gpt2" => {
                let pre = md.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
                Engine::Bpe(Box::new(build_bpe(md, &tokens, &kinds, pre)?))
            }
            "llama" => {
                let scores = md.get_f32_array("tokenizer.ggml.scores")?;
                if scores.len() != n {
                    return Err(TokenizerError::Inconsistent(format!(
                        "{n} tokens but {} scores",
                        scores.len()
                    )));
                }
                let add_space_prefix = md
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                Engine::Spm(Box::new(spm::Spm::new(
                    &tokens,
                    &kinds,
                    scores,
                    add_space_prefix,
                )))
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let mut specials: Vec<(String, u32, TokenKind)> = tokens
            .iter()
            .zip(&kinds)
            .enumerate()
            .filter(|(_, (t, k))| {
                !t.is_empty()
                    && matches!(
                        k,
                        TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                    )
            })
            .map(|(i, (t, k))| (t.clone(), i as u32, *k))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let bos = md.opt_token("tokenizer.ggml.bos_token_id", n)?;
        let eos = md.opt_token("tokenizer.ggml.eos_token_id", n)?;
        let eot = md.opt_token("tokenizer.ggml.eot_token_id", n)?;
        let mut eog: Vec<u32> = eos.into_iter().chain(eot).collect();
        // Like llama.cpp, also stop on well-known end-of-turn control tokens.
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end|>",
        ] {
            if let Some(i) = tokens.iter().position(|t| t == name) {
                if kinds[i] == TokenKind::Control && !eog.contains(&(i as u32)) {
                    eog.push(i as u32);
                }
            }
        }
        Ok(Self {
            engine,
            tokens,
            kinds,
            specials,
            bos,
            eos,
            eog,
            add_bos: md
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(model == "llama"),
            add_eos: md
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            chat_template: md.opt_str("tokenizer.chat_template")?.map(str::to_owned),
        })
    }

    pub fn model_name(&self) -> &'static str {
        match self.engine {
            Engine::Bpe(_) => "gpt2 (byte-level BPE)",
            Engine::Spm(_) => "llama (SentencePiece)",
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// The vocabulary entry of `id`, as stored in the file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Whether `text` is the text of a control (special) token.
    pub fn is_special_text(&self, text: &str) -> bool {
        self.specials.iter().any(|(t, _, _)| t == text)
    }

    /// Whether generation should stop at `id`.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Tokenises `text`. `add_special` adds BOS/EOS as the model asks;
    /// `parse_special` turns control-token text (e.g. `<|im_start|>`) into
    /// the control token instead of plain text.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match &self.engine {
                        Engine::Bpe(tk) => {
                            let enc = tk
                                .encode_fast(t, false)
                                .map_err(|e| TokenizerError::Backend(e.to_string()))?;
                            out.extend_from_slice(enc.get_ids());
                        }
                        Engine::Spm(s) => s.encode(t, prev_special, &mut out),
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Splits text around special tokens (llama.cpp's `tokenizer_st_partition`).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        for (tok, id, kind) in &self.specials {
            if !parse_special && *kind != TokenKind::UserDefined {
                continue;
            }
            if !text.contains(tok.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Fragment::Text(mut s) => {
                        while let Some(at) = s.find(tok.as_str()) {
                            if at > 0 {
                                next.push(Fragment::Text(&s[..at]));
                            }
                            next.push(Fragment::Token(*id));
                            s = &s[at + tok.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Fragment::Text(s));
                        }
                    }
                    tok @ Fragment::Token(_) => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes token `id` stands for. Control tokens render as nothing
    /// unless `special` is set.
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.kinds[id as usize] {
            TokenKind::Control | TokenKind::Unknown | TokenKind::Unused if !special => Vec::new(),
            TokenKind::Control
            | TokenKind::Unknown
            | TokenKind::Unused
            | TokenKind::UserDefined => text.as_bytes().to_vec(),
            TokenKind::Byte => spm::byte_token_value(text)
                .map(|b| vec![b])
                .unwrap_or_default(),
            TokenKind::Normal => match &self.engine {
                Engine::Bpe(_) => bytelevel::decode(text),
                Engine::Spm(_) => text.replace('\u{2581}', " ").into_bytes(),
            },
        }
    }

    /// Decodes ids to text (invalid UTF-8 replaced), control tokens omitted.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id, false))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn build_bpe(
    md: &Metadata,
    tokens: &[String],
    kinds: &[TokenKind],
    pre: &str,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges: Vec<(String, String)> = md
        .get_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            // The split is at the first space after the first character.
            let at = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
                .ok_or_else(|| TokenizerError::Inconsistent(format!("merge {m:?} has no space")))?;
            Ok((m[..at].to_string(), m[at + 1..].to_string()))
        })
        .collect::<Result<_, TokenizerError>>()?;
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, (t, k)) in tokens.iter().zip(kinds).enumerate() {
        // Special tokens are split out before BPE runs; keep them out of the
        // BPE vocabulary only if their text would collide with a normal one.
        if *k == TokenKind::Normal || !vocab.contains_key(t) {
            vocab.insert(t.clone(), i as u32);
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Backend(e.to_string()))?;
    let regex = |p: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let split = Split::new(
            SplitPattern::Regex(p.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        Ok(split.into())
    };
    let bytes = |use_regex: bool| -> PreTokenizerWrapper {
        ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(false)
            .use_regex(use_regex)
            .into()
    };
    let pre_tok = match pre {
        "default" | "gpt2" => Sequence::new(vec![regex(GPT2_PATTERN)?, bytes(false)]),
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" => Sequence::new(vec![
            Digits::new(true).into(),
            regex(GPT2_PATTERN)?,
            bytes(false),
        ]),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
            Sequence::new(vec![regex(LLAMA3_PATTERN)?, bytes(false)])
        }
        "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![regex(QWEN2_PATTERN)?, bytes(false)]),
        other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
    };
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(pre_tok));
    Ok(tk)
}

#[cfg(test)]
mod tests;
