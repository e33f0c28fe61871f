//! Single-device inference on top of the layer-range forward pass:
//! evaluation sessions, text generation with stop conditions, perplexity.

use std::time::{Duration, Instant};

use crate::{
    model::{Hidden, KvCache, Model, ModelError},
    sample::Sampler,
    tokenizer::Tokenizer,
};

/// A sequence being evaluated on the whole model, with its KV cache.
pub struct Session<'m> {
    model: &'m Model,
    kv: KvCache,
    pos: usize,
    /// Where the first batch (the prompt) ended: tokens from there on are
    /// computed as decoded ones (see [`Hidden::decoded_from`]).
    prompt_end: usize,
    /// Layers on the GPU and their cache (and, if uploaded, the embedding
    /// and output head there too).
    #[cfg(feature = "gpu")]
    gpu: Option<(crate::gpu::GpuLayers, crate::gpu::GpuKv)>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, ctx: usize) -> Self {
        let kv = KvCache::new(&model.config, model.loaded_layers(), ctx);
        Self {
            model,
            kv,
            pos: 0,
            prompt_end: 0,
            #[cfg(feature = "gpu")]
            gpu: None,
        }
    }

    /// A session that runs `gpu`'s layers on the GPU (the rest on the CPU).
    #[cfg(feature = "gpu")]
    pub fn with_gpu(
        model: &'m Model,
        ctx: usize,
        gpu: crate::gpu::GpuLayers,
    ) -> Result<Self, crate::gpu::GpuError> {
        let kv = gpu.new_kv(ctx)?;
        let mut s = Self::new(model, ctx);
        s.gpu = Some((gpu, kv));
        Ok(s)
    }

    /// Tokens evaluated so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// [`Hidden::decoded_from`] for a batch of `n` tokens at the current
    /// position; a batch at position 0 is the prompt.
    fn decoded_from(&mut self, n: usize) -> usize {
        if self.pos == 0 {
            self.prompt_end = n;
        }
        self.prompt_end
    }

    /// Forgets the tokens after the first `pos` (a rejected speculative
    /// tail): the next batch is evaluated at `pos` and overwrites them in
    /// the cache, and attention never reads past its own position.
    pub fn rewind(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    pub fn ctx(&self) -> usize {
        self.kv.ctx()
    }

    /// Evaluates `tokens` as one batch and returns the logits of the rows
    /// listed in `logit_rows` (indices into `tokens`).
    pub fn eval(&mut self, tokens: &[u32], logit_rows: &[usize]) -> Result<Vec<f32>, ModelError> {
        let layers = self.model.loaded_layers();
        let decoded_from = self.decoded_from(tokens.len());
        #[cfg(feature = "gpu")]
        if let Some((g, gkv)) = &mut self.gpu {
            let gpu_err = |e: crate::gpu::GpuError| match e {
                crate::gpu::GpuError::Model(m) => m,
                e => ModelError::Gpu(e.to_string()),
            };
            let ends = g.has_ends();
            let mut h = if ends {
                g.embed(tokens).map_err(gpu_err)?
            } else {
                self.model.embed(tokens)?
            };
            h.decoded_from = decoded_from;
            crate::gpu::forward_placed(
                self.model,
                Some((g, gkv)),
                layers,
                &mut h,
                &mut self.kv,
                self.pos,
            )
            .map_err(gpu_err)?;
            self.pos += tokens.len();
            return if ends {
                g.head(&h, logit_rows).map_err(gpu_err)
            } else {
                Ok(self.model.head(&h, logit_rows))
            };
        }
        let mut h: Hidden = self.model.embed(tokens)?;
        h.decoded_from = decoded_from;
        self.model
            .forward_layers(layers, &mut h, &mut self.kv, self.pos)?;
        self.pos += tokens.len();
        Ok(self.model.head(&h, logit_rows))
    }

    /// Evaluates `tokens` and returns the logits of the last one.
    pub fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let last = tokens.len().checked_sub(1).expect("eval of no tokens");
        self.eval(tokens, &[last])
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eog,
    /// A user stop string appeared.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    Context,
}

impl FinishReason {
    /// The OpenAI name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eog | FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::Context => "length",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    /// Most tokens in the answer (resumed ones included).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ctx: usize,
    /// Tokens of an answer begun elsewhere (a device that failed over):
    /// they are evaluated after the prompt and the answer goes on from them.
    pub resume: Vec<u32>,
    /// Bytes of the resumed tokens' text that were already delivered; only
    /// what follows is passed to `on_text`.
    pub resume_emitted: usize,
}

/// The outcome of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Something that turns tokens into next-token logits while keeping its
/// own position: a local [`Session`], or a ring of devices.
pub trait Evaluator {
    type Error;
    /// Evaluates `tokens` at the current position and returns the logits of
    /// the last one.
    fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Self::Error>;
    /// Tokens evaluated so far.
    fn pos(&self) -> usize;
    /// Context length in tokens.
    fn ctx(&self) -> usize;
}

impl Evaluator for Session<'_> {
    type Error = ModelError;
    fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        Session::eval_last(self, tokens)
    }
    fn pos(&self) -> usize {
        Session::pos(self)
    }
    fn ctx(&self) -> usize {
        Session::ctx(self)
    }
}

/// Checks that `prompt_ids` fits a context of `ctx` tokens with room for
/// at least one more.
pub fn check_prompt(prompt_ids: &[u32], ctx: usize) -> Result<(), ModelError> {
    if prompt_ids.is_empty() || prompt_ids.len() >= ctx {
        return Err(ModelError::ContextFull {
            start: 0,
            end: prompt_ids.len(),
            ctx,
        });
    }
    Ok(())
}

/// Generates from `prompt_ids`, calling `on_text` with each new piece of
/// text as soon as it is complete UTF-8 (and cannot be the start of a stop
/// string), along with the tokens generated since the previous call (what
/// another device needs to resume the answer). Returning `false` from
/// `on_text` cancels.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerateParams,
    sampler: &mut Sampler,
    on_text: impl FnMut(&str, &[u32]) -> bool,
) -> Result<Generation, ModelError> {
    let ctx = params.ctx.min(model.config.ctx_train).max(1);
    check_prompt(prompt_ids, ctx.saturating_sub(params.resume.len()))?;
    let mut session = Session::new(model, ctx);
    generate_with(&mut session, tok, prompt_ids, params, sampler, on_text)
}

/// [`generate`] over any [`Evaluator`] (which must be at position 0).
pub fn generate_with<E: Evaluator>(
    session: &mut E,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerateParams,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str, &[u32]) -> bool,
) -> Result<Generation, E::Error> {
    let mut history = prompt_ids.to_vec();
    history.extend_from_slice(&params.resume);
    let t0 = Instant::now();
    // The prompt alone first: a resumed answer's tokens were decoded one by
    // one, and their second evaluation must compute them that way.
    let mut logits = session.eval_last(prompt_ids)?;
    if !params.resume.is_empty() {
        logits = session.eval_last(&params.resume)?;
    }
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();

    let mut ids = params.resume.clone();
    let mut bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&t| tok.token_bytes(t, false))
        .collect();
    // Bytes of `bytes` already passed on (here or before the resume).
    let mut emitted = params.resume_emitted.min(bytes.len());
    let mut reported = ids.len(); // tokens of `ids` already passed on
    let mut finish = FinishReason::Length;
    let max_stop = params.stop.iter().map(String::len).max().unwrap_or(0);
    while ids.len() < params.max_tokens {
        let next = sampler.sample(&logits, &history);
        if tok.is_eog(next) {
            finish = FinishReason::Eog;
            break;
        }
        ids.push(next);
        history.push(next);
        bytes.extend(tok.token_bytes(next, false));
        // Stop strings end the text where they begin.
        let text = String::from_utf8_lossy(&bytes);
        if let Some(at) = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            let cut = text[..at].len();
            bytes.truncate(cut);
            finish = FinishReason::Stop;
            break;
        }
        // Emit what is complete UTF-8 and cannot be the start of a stop string.
        let valid = match std::str::from_utf8(&bytes) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        let hold = if max_stop > 0 {
            hold_back(&bytes[..valid], &params.stop)
        } else {
            0
        };
        let upto = valid - hold;
        if upto > emitted {
            let piece = std::str::from_utf8(&bytes[emitted..upto]).expect("validated");
            let new = &ids[reported..];
            reported = ids.len();
            if !on_text(piece, new) {
                finish = FinishReason::Stop;
                break;
            }
            emitted = upto;
        }
        // The last token is not evaluated: nothing would read its logits
        // (on a ring that is a trip saved per answer).
        if ids.len() >= params.max_tokens {
            break;
        }
        if session.pos() + 1 > session.ctx() {
            finish = FinishReason::Context;
            break;
        }
        logits = session.eval_last(&[next])?;
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if text.len() > emitted {
        on_text(&text[emitted.min(text.len())..], &ids[reported..]);
    }
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        ids,
        text,
        finish,
        prefill_time,
        decode_time: t1.elapsed(),
    })
}

/// Bytes at the end of `text` that could be the beginning of a stop string.
fn hold_back(text: &[u8], stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        let s = s.as_bytes();
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if text.ends_with(&s[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    hold
}

/// Result of a perplexity run.
#[derive(Debug, Clone)]
pub struct Perplexity {
    pub ppl: f64,
    /// Running perplexity after each chunk, as llama.cpp prints it.
    pub chunks: Vec<f64>,
    pub tokens: usize,
}

/// Perplexity the way llama.cpp's `perplexity` tool computes it: the text is
/// cut into non-overlapping chunks of `ctx` tokens, each evaluated from an
/// empty cache (its first token replaced by BOS when the model adds one), and
/// only the second half of each chunk is scored.
pub fn perplexity(
    model: &Model,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity, PerplexityError> {
    let tokens = tok
        .encode(text, true, false)
        .map_err(|e| PerplexityError::Tokenize(e.to_string()))?;
    if ctx < 4 {
        return Err(PerplexityError::TooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let n_chunk = tokens.len() / ctx;
    if n_chunk == 0 || tokens.len() < 2 * ctx {
        return Err(PerplexityError::TooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let first = ctx / 2;
    let mut nll = 0f64;
    let mut count = 0usize;
    let mut chunks = Vec::with_capacity(n_chunk);
    for c in 0..n_chunk {
        let mut batch = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if tok.add_bos {
            if let Some(bos) = tok.bos {
                batch[0] = bos;
            }
        }
        let mut session = Session::new(model, ctx);
        let rows: Vec<usize> = (first..ctx - 1).collect();
        let logits = session.eval(&batch, &rows)?;
        let nv = model.config.n_vocab;
        for (i, &r) in rows.iter().enumerate() {
            let l = &logits[i * nv..(i + 1) * nv];
            let target = tokens[c * ctx + r + 1] as usize;
            let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = l.iter().map(|&v| (v as f64 - max).exp()).sum();
            nll += -(l[target] as f64 - max - sum.ln());
            count += 1;
        }
        chunks.push((nll / count as f64).exp());
        progress(c + 1, n_chunk);
    }
    Ok(Perplexity {
        ppl: *chunks.last().expect("at least one chunk"),
        chunks,
        tokens: tokens.len(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("text is {tokens} tokens; perplexity with ctx {ctx} needs at least {} (two chunks)", 2 * ctx)]
    TooShort { tokens: usize, ctx: usize },
    #[error("tokenizing the text: {0}")]
    Tokenize(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

#[cfg(test)]
mod tests {
    use super::hold_back;

    #[test]
    fn hold_back_keeps_possible_stop_prefixes() {
        let stops = vec!["\n\nUser:".to_string()];
        assert_eq!(hold_back(b"hello\n", &stops), 1);
        assert_eq!(hold_back(b"hello\n\nUs", &stops), 4);
        assert_eq!(hold_back(b"hello", &stops), 0);
    }
}
