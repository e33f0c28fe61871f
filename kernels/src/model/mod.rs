//! The transformer forward pass, exposed over a layer range.
//!
//! A ring device runs only its windows of layers, so the pass is split in
//! three: [`Model::embed`] (token ids to hidden states), [`Model::forward_layers`]
//! (any contiguous range of layers, with a [`KvCache`] that holds only the
//! layers its owner runs) and [`Model::head`] (final norm and logits).

pub mod config;
pub mod names;
pub mod ops;

use std::{ops::Range, path::Path, sync::Arc};

use half::f16;

pub use config::{Arch, Config, RopeKind};

use crate::{
    gguf::{Gguf, GgufError},
    quant::{ActRows, GgmlType},
    tensor::{Weight, WeightError},
};

/// Largest attention head the forward pass supports (buffers on the stack).
pub const MAX_HEAD_DIM: usize = 512;

/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error("norm tensor {name:?} must be F32 with {expected} elements, found {ty} {dims:?}")]
    BadNorm {
        name: String,
        expected: usize,
        ty: GgmlType,
        dims: Vec<u64>,
    },
    #[error("layer range {start}..{end} is outside this model's {n_layer} layers")]
    LayerRange {
        start: usize,
        end: usize,
        n_layer: usize,
    },
    #[error("layer {layer} is not loaded here (loaded: {loaded:?})")]
    LayerNotLoaded { layer: usize, loaded: Range<usize> },
    #[error("KV cache holds layers {have:?}, not layer {layer}")]
    KvMissingLayer { layer: usize, have: Range<usize> },
    #[error("context full: positions {start}..{end} exceed the context of {ctx} tokens")]
    ContextFull {
        start: usize,
        end: usize,
        ctx: usize,
    },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    #[error("hidden state is {got} wide, the model needs {want}")]
    HiddenWidth { got: usize, want: usize },
    #[error("GPU: {0}")]
    Gpu(String),
}

/// Hidden states of a batch of tokens, row-major `[n_tokens][dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hidden {
    pub data: Vec<f32>,
    pub n_tokens: usize,
    pub dim: usize,
    /// The first position whose token counts as decoded rather than as part
    /// of the prompt: llama.cpp sums a prompt batch's attention in another
    /// order than a token decoded on its own (see [`ops::attend_body`]),
    /// and a token keeps its kind however it is batched later (verifying
    /// speculative drafts, resuming an answer, replaying a session on a new
    /// ring), so that those give plain decoding's logits bit for bit.
    pub decoded_from: usize,
}

impl Hidden {
    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.dim..(t + 1) * self.dim]
    }
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Weight,
    pub(crate) wk: Weight,
    pub(crate) wv: Weight,
    pub(crate) wo: Weight,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) post_attn_norm: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) ffn_gate: Weight,
    pub(crate) ffn_up: Weight,
    pub(crate) ffn_down: Weight,
    pub(crate) post_ffn_norm: Option<Vec<f32>>,
}

/// Called with each weight matrix of a layer right after the forward pass
/// has used it (a device that streams weights releases them here).
pub type WeightHook = dyn Fn(&Weight) + Send + Sync;

/// A loaded model: weights viewed in place in the mapped GGUF file.
pub struct Model {
    pub config: Config,
    pub file: Arc<Gguf>,
    loaded: Range<usize>,
    layers: Vec<Layer>,
    tok_embd: Weight,
    output_norm: Vec<f32>,
    output: Weight,
    after_weight: Option<std::sync::Arc<WeightHook>>,
}

impl Model {
    /// Opens a GGUF file and loads every layer.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let file = Arc::new(Gguf::open(path)?);
        let n = Config::from_metadata(&file.metadata)?.n_layer;
        Self::load(file, 0..n)
    }

    /// Builds a model over `file`, loading only `layers` (the embedding and
    /// output head are always available: they are views, not copies).
    pub fn load(file: Arc<Gguf>, layers: Range<usize>) -> Result<Self, ModelError> {
        let config = Config::from_metadata(&file.metadata)?;
        if layers.start > layers.end || layers.end > config.n_layer {
            return Err(ModelError::LayerRange {
                start: layers.start,
                end: layers.end,
                n_layer: config.n_layer,
            });
        }
        let c = &config;
        let tok_embd = Weight::new(
            &file,
            file.require_tensor(names::TOKEN_EMBD)?,
            [c.n_embd, c.n_vocab],
        )?;
        let output = match file.tensor(names::OUTPUT) {
            Some(t) => Weight::new(&file, t, [c.n_embd, c.n_vocab])?,
            None => tok_embd.clone(),
        };
        let output_norm = norm(&file, names::OUTPUT_NORM, c.n_embd)?;
        let mut out_layers = Vec::with_capacity(layers.len());
        for il in layers.clone() {
            let t = |name: &str| file.require_tensor(&names::layer(il, name));
            let w = |name: &str, cols: usize, rows: usize| -> Result<Weight, ModelError> {
                Ok(Weight::new(&file, t(name)?, [cols, rows])?)
            };
            let opt_norm = |name: &str, n: usize| -> Result<Option<Vec<f32>>, ModelError> {
                let full = names::layer(il, name);
                match file.tensor(&full) {
                    Some(_) => norm(&file, &full, n).map(Some),
                    None => Ok(None),
                }
            };
            let layer = Layer {
                attn_norm: norm(&file, &names::layer(il, names::ATTN_NORM), c.n_embd)?,
                wq: w(names::ATTN_Q, c.n_embd, c.q_dim())?,
                wk: w(names::ATTN_K, c.n_embd, c.kv_dim())?,
                wv: w(names::ATTN_V, c.n_embd, c.kv_dim())?,
                wo: w(names::ATTN_OUT, c.q_dim(), c.n_embd)?,
                bq: opt_norm(names::ATTN_Q_BIAS, c.q_dim())?,
                bk: opt_norm(names::ATTN_K_BIAS, c.kv_dim())?,
                bv: opt_norm(names::ATTN_V_BIAS, c.kv_dim())?,
                q_norm: opt_norm(names::ATTN_Q_NORM, c.head_dim)?,
                k_norm: opt_norm(names::ATTN_K_NORM, c.head_dim)?,
                post_attn_norm: opt_norm(names::POST_ATTN_NORM, c.n_embd)?,
                ffn_norm: norm(&file, &names::layer(il, names::FFN_NORM), c.n_embd)?,
                ffn_gate: w(names::FFN_GATE, c.n_embd, c.n_ff)?,
                ffn_up: w(names::FFN_UP, c.n_embd, c.n_ff)?,
                ffn_down: w(names::FFN_DOWN, c.n_ff, c.n_embd)?,
                post_ffn_norm: opt_norm(names::POST_FFN_NORM, c.n_embd)?,
            };
            out_layers.push(layer);
        }
        Ok(Self {
            config,
            file,
            loaded: layers,
            layers: out_layers,
            tok_embd,
            output_norm,
            output,
            after_weight: None,
        })
    }

    /// Sets the hook called after each layer weight is used.
    pub fn set_after_weight(&mut self, hook: std::sync::Arc<WeightHook>) {
        self.after_weight = Some(hook);
    }

    fn used(&self, w: &Weight) {
        if let Some(h) = &self.after_weight {
            h(w);
        }
    }

    /// The weights of layer `il`, which this model must hold.
    pub(crate) fn layer(&self, il: usize) -> Result<&Layer, ModelError> {
        if !self.loaded.contains(&il) {
            return Err(ModelError::LayerNotLoaded {
                layer: il,
                loaded: self.loaded.clone(),
            });
        }
        Ok(&self.layers[il - self.loaded.start])
    }

    /// Token embedding, output projection and final norm.
    pub(crate) fn ends(&self) -> (&Weight, &Weight, &[f32]) {
        (&self.tok_embd, &self.output, &self.output_norm)
    }

    /// Layers whose weights this model holds.
    pub fn loaded_layers(&self) -> Range<usize> {
        self.loaded.clone()
    }

    /// Token ids to hidden states (embedding lookup, scaled for gemma).
    pub fn embed(&self, tokens: &[u32]) -> Result<Hidden, ModelError> {
        let d = self.config.n_embd;
        let mut data = vec![0f32; tokens.len() * d];
        for (&id, row) in tokens.iter().zip(data.chunks_exact_mut(d)) {
            if id as usize >= self.config.n_vocab {
                return Err(ModelError::BadToken {
                    id,
                    n_vocab: self.config.n_vocab,
                });
            }
            self.tok_embd.dequantize_row(id as usize, row);
            if let Some(s) = self.config.embed_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        Ok(Hidden {
            data,
            n_tokens: tokens.len(),
            dim: d,
            decoded_from: usize::MAX,
        })
    }

    /// Runs layers `range` over `hidden`, whose tokens sit at positions
    /// `pos..pos + hidden.n_tokens`. Keys and values are written to `kv`.
    pub fn forward_layers(
        &self,
        range: Range<usize>,
        hidden: &mut Hidden,
        kv: &mut KvCache,
        pos: usize,
    ) -> Result<(), ModelError> {
        if hidden.dim != self.config.n_embd {
            return Err(ModelError::HiddenWidth {
                got: hidden.dim,
                want: self.config.n_embd,
            });
        }
        let end = pos + hidden.n_tokens;
        if end > kv.ctx {
            return Err(ModelError::ContextFull {
                start: pos,
                end,
                ctx: kv.ctx,
            });
        }
        for il in range {
            if !self.loaded.contains(&il) {
                return Err(ModelError::LayerNotLoaded {
                    layer: il,
                    loaded: self.loaded.clone(),
                });
            }
            let cache = kv.layer_mut(il)?;
            self.layer_forward(il, hidden, cache, pos);
        }
        Ok(())
    }

    /// Final norm and logits for the given token rows of `hidden`;
    /// returns `rows.len() x n_vocab` logits.
    pub fn head(&self, hidden: &Hidden, rows: &[usize]) -> Vec<f32> {
        let d = self.config.n_embd;
        let mut x = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            x.extend_from_slice(hidden.row(r));
        }
        ops::rms_norm(&mut x, &self.output_norm, self.config.rms_eps);
        let mut logits = vec![0f32; rows.len() * self.config.n_vocab];
        self.output.matmul(&x, rows.len(), &mut logits);
        logits
    }

    fn layer_forward(&self, il: usize, h: &mut Hidden, cache: &mut LayerCache, pos: usize) {
        let c = &self.config;
        let l = &self.layers[il - self.loaded.start];
        let n = h.n_tokens;
        let (d, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
        // The batch's prompt rows, which llama.cpp's matmuls sum in another
        // order than decoded tokens for some formats (see `ActRows::prompt`).
        let prompt = (
            h.decoded_from.saturating_sub(pos).min(n),
            if h.decoded_from == usize::MAX {
                n
            } else {
                h.decoded_from
            },
        );

        // --- attention
        let mut x = h.data.clone();
        ops::rms_norm(&mut x, &l.attn_norm, c.rms_eps);
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        matmul_shared(
            &mut [(&l.wq, &mut q), (&l.wk, &mut k), (&l.wv, &mut v)],
            &x,
            n,
            prompt,
        );
        for w in [&l.wq, &l.wk, &l.wv] {
            self.used(w);
        }
        for (buf, bias) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
            if let Some(b) = bias {
                for row in buf.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
            }
        }
        if let Some(w) = &l.q_norm {
            ops::rms_norm(&mut q, w, c.rms_eps);
        }
        if let Some(w) = &l.k_norm {
            ops::rms_norm(&mut k, w, c.rms_eps);
        }
        let swa = c.is_swa(il);
        let base = if swa { c.rope_base_swa } else { c.rope_base };
        let rope = ops::Rope::new(c.rope, c.rope_dim, base, c.rope_scale);
        for t in 0..n {
            let cs = rope.cache(pos + t);
            rope.apply(&mut q[t * qd..(t + 1) * qd], hd, &cs);
            rope.apply(&mut k[t * kvd..(t + 1) * kvd], hd, &cs);
        }
        // Gemma scales the queries (before they are rounded to f16, which
        // matters where they are tiny), llama the scores.
        let scale = match c.arch {
            Arch::Gemma3 => ops::AttnScale::Query(c.attn_scale),
            Arch::Llama | Arch::Qwen2 => ops::AttnScale::Scores(c.attn_scale),
        };
        for t in 0..n {
            let at = (pos + t) * kvd;
            for (dst, &src) in cache.k[at..at + kvd].iter_mut().zip(&k[t * kvd..]) {
                *dst = f16::from_f32(src);
            }
            for (dst, &src) in cache.v[at..at + kvd].iter_mut().zip(&v[t * kvd..]) {
                *dst = f16::from_f32(src);
            }
        }
        let window = if swa { c.sliding_window } else { None };
        let group = c.n_head / c.n_head_kv;
        let mut attn = vec![0f32; n * qd];
        let cache = &*cache;
        let cells = |p: usize| match window {
            Some(w) => (p + 1).saturating_sub(w)..p + 1,
            None => 0..p + 1,
        };
        let head_cache = |head: usize| ops::HeadCache {
            k: &cache.k[head / group * hd..],
            v: &cache.v[head / group * hd..],
            stride: kvd,
        };
        // The prompt batch's tokens, if the prompt had at least FA_TILE of
        // them, went through ggml's tiled flash attention: head by head,
        // sharing each tile of the cache. The rest one by one.
        let tiled = if prompt.1 >= ops::FA_TILE {
            prompt.0
        } else {
            0
        };
        if tiled > 0 {
            let mut heads = vec![0f32; c.n_head * tiled * hd];
            crate::cpu::pool::for_each_chunk_mut(
                crate::cpu::pool(),
                &mut heads,
                tiled * hd,
                |head, out| {
                    let mut qh = vec![0f32; tiled * hd];
                    for (t, r) in qh.chunks_exact_mut(hd).enumerate() {
                        r.copy_from_slice(&q[t * qd + head * hd..][..hd]);
                    }
                    let rows = |t: usize| cells(pos + t);
                    crate::cpu::attend_tiled_rows(&qh, hd, &rows, scale, head_cache(head), out);
                },
            );
            for (head, rows) in heads.chunks_exact(tiled * hd).enumerate() {
                for (t, r) in rows.chunks_exact(hd).enumerate() {
                    attn[t * qd + head * hd..][..hd].copy_from_slice(r);
                }
            }
        }
        crate::cpu::pool::for_each_chunk_mut(
            crate::cpu::pool(),
            &mut attn[tiled * qd..],
            hd,
            |th, out| {
                let (t, head) = (tiled + th / c.n_head, th % c.n_head);
                let query = ops::HeadQuery {
                    q: &q[t * qd + head * hd..][..hd],
                    cells: cells(pos + t),
                    scale,
                    tiled: false,
                };
                crate::cpu::attend(query, head_cache(head), out);
            },
        );
        let mut o = vec![0f32; n * d];
        matmul_shared(&mut [(&l.wo, &mut o)], &attn, n, prompt);
        self.used(&l.wo);
        if let Some(w) = &l.post_attn_norm {
            ops::rms_norm(&mut o, w, c.rms_eps);
        }
        h.data.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

        // --- feed-forward
        let mut x = h.data.clone();
        ops::rms_norm(&mut x, &l.ffn_norm, c.rms_eps);
        let mut gate = vec![0f32; n * c.n_ff];
        let mut up = vec![0f32; n * c.n_ff];
        matmul_shared(
            &mut [(&l.ffn_gate, &mut gate), (&l.ffn_up, &mut up)],
            &x,
            n,
            prompt,
        );
        self.used(&l.ffn_gate);
        self.used(&l.ffn_up);
        let gated = |g: &mut [f32], u: &[f32]| match c.arch {
            Arch::Gemma3 => ops::gelu_gate(g, u),
            Arch::Llama | Arch::Qwen2 => crate::cpu::swiglu(g, u),
        };
        if n == 1 {
            gated(&mut gate, &up);
        } else {
            // A prompt's tokens in parallel: n x n_ff activations are too
            // many to leave to one thread.
            let pool = crate::cpu::pool();
            crate::cpu::pool::for_each_chunk_mut(pool, &mut gate, c.n_ff, |t, g| {
                gated(g, &up[t * c.n_ff..(t + 1) * c.n_ff])
            });
        }
        let mut o = vec![0f32; n * d];
        matmul_shared(&mut [(&l.ffn_down, &mut o)], &gate, n, prompt);
        self.used(&l.ffn_down);
        if let Some(w) = &l.post_ffn_norm {
            ops::rms_norm(&mut o, w, c.rms_eps);
        }
        h.data.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
}

/// Several weights applied to the same input: the input is quantised once
/// per distinct vec-dot type, not once per weight. `prompt`: how many of
/// the rows are a prompt's, and its length (see `ActRows::prompt`).
fn matmul_shared(
    outs: &mut [(&Weight, &mut Vec<f32>)],
    x: &[f32],
    n: usize,
    prompt: (usize, usize),
) {
    let mut cached: Vec<ActRows> = Vec::new();
    let mut which = Vec::with_capacity(outs.len());
    for (w, _) in outs.iter() {
        let ty = w.ty.vec_dot_type();
        let idx = match cached.iter().position(|a| a.act_type() == ty) {
            Some(i) => i,
            None => {
                cached.push(ActRows::quantize(ty, x, n, w.cols).prompt(prompt.0, prompt.1));
                cached.len() - 1
            }
        };
        which.push(idx);
    }
    if n == 1 {
        // One token: all the weights in one job on the pool.
        let mut jobs: Vec<_> = outs
            .iter_mut()
            .zip(&which)
            .map(|((w, out), &i)| (*w, &cached[i], out.as_mut_slice()))
            .collect();
        crate::tensor::gemv_many(&mut jobs);
        return;
    }
    for ((w, out), &i) in outs.iter_mut().zip(&which) {
        w.matmul_quantized(&cached[i], out);
    }
}

/// Keys and values of one layer, `ctx` positions of `kv_dim` each, in f16.
pub struct LayerCache {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// The KV cache of the layers one device runs.
pub struct KvCache {
    layers: Range<usize>,
    ctx: usize,
    caches: Vec<LayerCache>,
}

impl KvCache {
    /// A cache for `layers` of a model with `config`, `ctx` positions long.
    pub fn new(config: &Config, layers: Range<usize>, ctx: usize) -> Self {
        let kvd = config.kv_dim();
        let caches = layers
            .clone()
            // Zeroed allocations: the OS commits a page only when a position
            // is first written, so a long context costs what is used.
            .map(|_| LayerCache {
                k: bytemuck::zeroed_vec(ctx * kvd),
                v: bytemuck::zeroed_vec(ctx * kvd),
            })
            .collect();
        Self {
            layers,
            ctx,
            caches,
        }
    }

    /// A cache of no layers (a placeholder while a real one is in use).
    pub fn empty() -> Self {
        Self {
            layers: 0..0,
            ctx: 0,
            caches: Vec::new(),
        }
    }

    /// Context length in tokens.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Layers this cache holds.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.caches
            .iter()
            .map(|c| (c.k.len() + c.v.len()) * 2)
            .sum()
    }

    fn layer_mut(&mut self, il: usize) -> Result<&mut LayerCache, ModelError> {
        if !self.layers.contains(&il) {
            return Err(ModelError::KvMissingLayer {
                layer: il,
                have: self.layers.clone(),
            });
        }
        Ok(&mut self.caches[il - self.layers.start])
    }
}

/// Checks a norm tensor and copies it out as f32.
fn norm(file: &Gguf, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let t = file.require_tensor(name)?;
    if t.ty != GgmlType::F32 || t.n_elements() != n as u64 {
        return Err(ModelError::BadNorm {
            name: name.to_string(),
            expected: n,
            ty: t.ty,
            dims: t.dims.clone(),
        });
    }
    let mut out = vec![0f32; n];
    for (o, b) in out.iter_mut().zip(file.tensor_data(t).chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(out)
}
