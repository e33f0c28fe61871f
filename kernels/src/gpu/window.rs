//! A window of layers on the GPU: weights uploaded once, the KV cache on the
//! device, and the forward pass recorded as one submission per call.

use std::{ops::Range, sync::Arc};

use super::{grid, Batch, Gpu, GpuError, Op};
use crate::{
    model::{ops::Rope, Arch, Config, Hidden, KvCache, Model, RopeKind},
    quant::{ActType, GgmlType},
    tensor::Weight,
};

/// A weight matrix in GPU buffers: whole rows per chunk, each chunk under
/// the adapter's binding limit.
pub(crate) struct GpuWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    chunks: Vec<(wgpu::Buffer, usize, usize)>,
}

impl GpuWeight {
    pub(crate) fn upload(gpu: &Gpu, w: &Weight) -> Result<Self, GpuError> {
        Self::from_bytes_chunked(gpu, &w.name, w.ty, w.rows, w.cols, w.bytes(), None)
    }

    /// Uploads `rows x cols` of `ty` from `bytes`, at most `max_rows` rows
    /// per buffer (else as many as one binding holds).
    pub(crate) fn from_bytes_chunked(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_rows: Option<usize>,
    ) -> Result<Self, GpuError> {
        if !super::supports(ty) {
            return Err(GpuError::Unsupported {
                tensor: name.to_string(),
                ty,
            });
        }
        let row_bytes = ty.row_bytes(cols);
        let per_chunk = (gpu.max_binding() as usize / row_bytes.max(1))
            .min(rows.max(1))
            .min(max_rows.unwrap_or(usize::MAX));
        if per_chunk == 0 {
            return Err(GpuError::TooLarge {
                what: format!("one row of {name}"),
                need: row_bytes as u64,
                limit: gpu.max_binding(),
            });
        }
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = per_chunk.min(rows - row0);
            let data = &bytes[row0 * row_bytes..(row0 + n) * row_bytes];
            chunks.push((gpu.upload(name, data)?, row0, n));
            row0 += n;
        }
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            chunks,
        })
    }

    fn bytes(&self) -> u64 {
        (self.rows * self.row_bytes) as u64
    }

    /// The format activations are rounded to for this weight.
    pub(crate) fn act(&self) -> ActType {
        self.ty.vec_dot_type()
    }

    /// `y[t] = W x[t]` for `n` rows of `x` (rows of `cols`, rounded by
    /// [`act_quant`] for [`GpuWeight::act`], with block sums in `s`), `y`
    /// rows of `rows`.
    pub(crate) fn matvec(
        &self,
        b: &mut Batch,
        x: &wgpu::Buffer,
        s: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<(), GpuError> {
        for (buf, row0, rows) in &self.chunks {
            let (gx, gy) = grid(*rows, 1);
            b.push(
                Op::Matvec,
                Some(self.ty),
                &[buf, x, s, y],
                &[
                    *rows as u32,
                    self.cols as u32,
                    self.row_bytes as u32,
                    *row0 as u32,
                    self.cols as u32,
                    self.rows as u32,
                    gx,
                    (self.cols / 32) as u32,
                    n as u32,
                ],
                [gx, gy, n.div_ceil(8) as u32],
            )?;
        }
        Ok(())
    }

    /// Rows `ids` (u32s) of the table, times `scale`, into `y`.
    pub(crate) fn get_rows(
        &self,
        b: &mut Batch,
        ids: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
        scale: f32,
    ) -> Result<(), GpuError> {
        for (buf, row0, rows) in &self.chunks {
            b.push(
                Op::GetRows,
                Some(self.ty),
                &[buf, ids, y],
                &[
                    self.cols as u32,
                    self.row_bytes as u32,
                    *row0 as u32,
                    *rows as u32,
                    n as u32,
                    scale.to_bits(),
                ],
                [self.cols.div_ceil(64) as u32, n as u32, 1],
            )?;
        }
        Ok(())
    }
}

struct LayerBufs {
    attn_norm: wgpu::Buffer,
    wq: GpuWeight,
    wk: GpuWeight,
    wv: GpuWeight,
    wo: GpuWeight,
    bq: Option<wgpu::Buffer>,
    bk: Option<wgpu::Buffer>,
    bv: Option<wgpu::Buffer>,
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
    post_attn_norm: Option<wgpu::Buffer>,
    ffn_norm: wgpu::Buffer,
    gate: GpuWeight,
    up: GpuWeight,
    down: GpuWeight,
    post_ffn_norm: Option<wgpu::Buffer>,
}

/// The GPU half of a session's KV cache: per GPU layer, keys and values for
/// `ctx` positions of `kv_dim` f16s (packed two to a word).
pub struct GpuKv {
    layers: Range<usize>,
    ctx: usize,
    bufs: Vec<(wgpu::Buffer, wgpu::Buffer)>,
}

impl GpuKv {
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Device memory held, bytes.
    pub fn bytes(&self) -> u64 {
        self.bufs.iter().map(|(k, v)| k.size() + v.size()).sum()
    }
}

/// Activations for a batch of up to `n` tokens.
struct Scratch {
    n: usize,
    h: wgpu::Buffer,
    x: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    att: wgpu::Buffer,
    o: wgpu::Buffer,
    g: wgpu::Buffer,
    u: wgpu::Buffer,
    cs: wgpu::Buffer,
    cs_swa: wgpu::Buffer,
    /// Activations rounded for a matvec, and their Q8_1 block sums.
    xq: wgpu::Buffer,
    xs: wgpu::Buffer,
}

impl Scratch {
    /// `y = w src` for `n` rows, rounding `src` into `xq` first unless
    /// `have` says it already holds `src` rounded for `w` (reset `have` to
    /// `None` whenever `src` changes).
    fn matvec(
        &self,
        b: &mut Batch,
        have: &mut Option<ActType>,
        w: &GpuWeight,
        src: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<(), GpuError> {
        if *have != Some(w.act()) {
            act_quant(b, src, &self.xq, &self.xs, n, w.cols, w.act())?;
            *have = Some(w.act());
        }
        w.matvec(b, &self.xq, &self.xs, y, n)
    }
}

/// The output head (final norm and vocabulary projection) and the token
/// embedding, for a device that runs the ends of the model on the GPU.
struct Ends {
    output_norm: wgpu::Buffer,
    output: GpuWeight,
    embd: GpuWeight,
}

/// Layers `layers` of a model on the GPU; each session keeps its own
/// [`GpuKv`] for them.
pub struct GpuLayers {
    gpu: Arc<Gpu>,
    config: Config,
    layers: Range<usize>,
    ws: Vec<LayerBufs>,
    scratch: Option<Scratch>,
    ends: Option<Ends>,
    bytes: u64,
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl GpuLayers {
    /// Uploads `layers` of `model` (which must hold them).
    pub fn upload(gpu: &Arc<Gpu>, model: &Model, layers: Range<usize>) -> Result<Self, GpuError> {
        let c = model.config.clone();
        let mut bytes = 0u64;
        let mut ws = Vec::with_capacity(layers.len());
        for il in layers.clone() {
            let l = model.layer(il)?;
            let norm =
                |v: &[f32], what: &str| gpu.upload(&format!("blk.{il}.{what}"), f32_bytes(v));
            let opt =
                |v: &Option<Vec<f32>>, what: &str| -> Result<Option<wgpu::Buffer>, GpuError> {
                    v.as_deref().map(|v| norm(v, what)).transpose()
                };
            let w = |w: &Weight| GpuWeight::upload(gpu, w);
            let b = LayerBufs {
                attn_norm: norm(&l.attn_norm, "attn_norm")?,
                wq: w(&l.wq)?,
                wk: w(&l.wk)?,
                wv: w(&l.wv)?,
                wo: w(&l.wo)?,
                bq: opt(&l.bq, "bq")?,
                bk: opt(&l.bk, "bk")?,
                bv: opt(&l.bv, "bv")?,
                q_norm: opt(&l.q_norm, "q_norm")?,
                k_norm: opt(&l.k_norm, "k_norm")?,
                post_attn_norm: opt(&l.post_attn_norm, "post_attn_norm")?,
                ffn_norm: norm(&l.ffn_norm, "ffn_norm")?,
                gate: w(&l.ffn_gate)?,
                up: w(&l.ffn_up)?,
                down: w(&l.ffn_down)?,
                post_ffn_norm: opt(&l.post_ffn_norm, "post_ffn_norm")?,
            };
            bytes += [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down]
                .iter()
                .map(|w| w.bytes())
                .sum::<u64>();
            ws.push(b);
        }
        gpu.check()?;
        Ok(Self {
            gpu: gpu.clone(),
            config: c,
            layers,
            ws,
            scratch: None,
            ends: None,
            bytes,
        })
    }

    /// Also uploads the token embedding and the output head, for
    /// [`GpuLayers::embed`] and [`GpuLayers::head`].
    pub fn with_ends(mut self, model: &Model) -> Result<Self, GpuError> {
        let (embd, output, norm) = model.ends();
        let ends = Ends {
            output_norm: self.gpu.upload("output_norm", f32_bytes(norm))?,
            output: GpuWeight::upload(&self.gpu, output)?,
            embd: GpuWeight::upload(&self.gpu, embd)?,
        };
        self.bytes += ends.output.bytes() + ends.embd.bytes();
        self.ends = Some(ends);
        Ok(self)
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Whether the embedding and output head are on the GPU too.
    pub fn has_ends(&self) -> bool {
        self.ends.is_some()
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// A KV cache of `ctx` positions for these layers.
    pub fn new_kv(&self, ctx: usize) -> Result<GpuKv, GpuError> {
        let bytes = (ctx * self.config.kv_dim() * 2) as u64;
        let bufs = self
            .layers
            .clone()
            .map(|il| {
                Ok((
                    self.gpu.buffer(&format!("blk.{il}.k_cache"), bytes)?,
                    self.gpu.buffer(&format!("blk.{il}.v_cache"), bytes)?,
                ))
            })
            .collect::<Result<_, GpuError>>()?;
        Ok(GpuKv {
            layers: self.layers.clone(),
            ctx,
            bufs,
        })
    }

    /// Device memory held by weights, bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Most tokens one submission takes: every activation buffer must fit
    /// in one binding.
    fn max_tokens(&self) -> usize {
        let c = &self.config;
        let widest = [c.n_embd, c.q_dim(), c.n_ff].into_iter().max().unwrap_or(1) * 4;
        (self.gpu.max_binding() as usize / widest).clamp(1, 512)
    }

    fn ensure_scratch(&mut self, n: usize) -> Result<(), GpuError> {
        if self.scratch.as_ref().is_none_or(|s| s.n < n) {
            let c = &self.config;
            let widest = c.n_embd.max(c.q_dim()).max(c.n_ff);
            let f = |what: &str, per: usize| self.gpu.buffer(what, (n * per * 4) as u64);
            self.scratch = Some(Scratch {
                n,
                h: f("h", c.n_embd)?,
                x: f("x", c.n_embd)?,
                q: f("q", c.q_dim())?,
                k: f("k", c.kv_dim())?,
                v: f("v", c.kv_dim())?,
                att: f("att", c.q_dim())?,
                o: f("o", c.n_embd)?,
                g: f("g", c.n_ff)?,
                u: f("u", c.n_ff)?,
                cs: f("rope", c.rope_dim)?,
                cs_swa: f("rope_swa", c.rope_dim)?,
                xq: f("xq", widest)?,
                xs: f("xs", widest.div_ceil(32))?,
            });
        }
        Ok(())
    }

    /// Runs layers `range` (within [`GpuLayers::layers`]) over `h`, whose
    /// tokens sit at positions `pos..`, with the session's cache `kv`.
    pub fn forward(
        &mut self,
        range: Range<usize>,
        h: &mut Hidden,
        kv: &mut GpuKv,
        pos: usize,
    ) -> Result<(), GpuError> {
        use crate::model::ModelError;
        let c = &self.config;
        if h.dim != c.n_embd {
            return Err(ModelError::HiddenWidth {
                got: h.dim,
                want: c.n_embd,
            }
            .into());
        }
        if range.start < self.layers.start || range.end > self.layers.end {
            return Err(ModelError::LayerNotLoaded {
                layer: if range.start < self.layers.start {
                    range.start
                } else {
                    range.end - 1
                },
                loaded: self.layers.clone(),
            }
            .into());
        }
        if kv.layers != self.layers {
            return Err(ModelError::KvMissingLayer {
                layer: range.start,
                have: kv.layers.clone(),
            }
            .into());
        }
        if pos + h.n_tokens > kv.ctx {
            return Err(ModelError::ContextFull {
                start: pos,
                end: pos + h.n_tokens,
                ctx: kv.ctx,
            }
            .into());
        }
        let step = self.max_tokens();
        let d = c.n_embd;
        let mut t0 = 0;
        while t0 < h.n_tokens {
            let n = step.min(h.n_tokens - t0);
            let rows = &mut h.data[t0 * d..(t0 + n) * d];
            self.forward_chunk(range.clone(), rows, n, kv, pos + t0)?;
            t0 += n;
        }
        Ok(())
    }

    fn forward_chunk(
        &mut self,
        range: Range<usize>,
        rows: &mut [f32],
        n: usize,
        kv: &GpuKv,
        pos: usize,
    ) -> Result<(), GpuError> {
        let c = self.config.clone();
        let gpu = self.gpu.clone();
        self.ensure_scratch(n)?;
        let s = self.scratch.as_ref().expect("just made");
        let (d, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
        let table = |base: f32| -> Vec<f32> {
            let rope = Rope::new(c.rope, c.rope_dim, base, c.rope_scale);
            (0..n)
                .flat_map(|t| rope.cache(pos + t))
                .flat_map(|(cos, sin)| [cos, sin])
                .collect()
        };
        gpu.write(&s.h, rows);
        gpu.write(&s.cs, &table(c.rope_base));
        if c.sliding_window.is_some() {
            gpu.write(&s.cs_swa, &table(c.rope_base_swa));
        }
        let mut b = Batch::new(&gpu);
        let neox = u32::from(c.rope == RopeKind::Neox);
        for il in range {
            let l = &self.ws[il - self.layers.start];
            let (kc, vc) = &kv.bufs[il - self.layers.start];
            let swa = c.is_swa(il);
            copy(&mut b, &s.x, &s.h, n * d)?;
            rms_norm(&mut b, &s.x, &l.attn_norm, d, n, c.rms_eps)?;
            let mut have = None;
            for (w, y) in [(&l.wq, &s.q), (&l.wk, &s.k), (&l.wv, &s.v)] {
                s.matvec(&mut b, &mut have, w, &s.x, y, n)?;
            }
            for (buf, bias, width) in [(&s.q, &l.bq, qd), (&s.k, &l.bk, kvd), (&s.v, &l.bv, kvd)] {
                if let Some(bias) = bias {
                    add(&mut b, buf, bias, n * width, width)?;
                }
            }
            if let Some(w) = &l.q_norm {
                rms_norm(&mut b, &s.q, w, hd, n * c.n_head, c.rms_eps)?;
            }
            if let Some(w) = &l.k_norm {
                rms_norm(&mut b, &s.k, w, hd, n * c.n_head_kv, c.rms_eps)?;
            }
            let cs = if swa { &s.cs_swa } else { &s.cs };
            for (buf, heads, stride) in [(&s.q, c.n_head, qd), (&s.k, c.n_head_kv, kvd)] {
                let pairs = heads * c.rope_dim / 2;
                b.push(
                    Op::Rope,
                    None,
                    &[buf, cs],
                    &[
                        heads as u32,
                        hd as u32,
                        c.rope_dim as u32,
                        neox,
                        stride as u32,
                    ],
                    [pairs.div_ceil(64) as u32, n as u32, 1],
                )?;
            }
            b.push(
                Op::KvStore,
                None,
                &[&s.k, &s.v, kc, vc],
                &[kvd as u32, pos as u32, n as u32],
                [(kvd / 2).div_ceil(64) as u32, n as u32, 1],
            )?;
            let window = if swa {
                c.sliding_window.unwrap_or(0)
            } else {
                0
            };
            b.push(
                Op::Attention,
                None,
                &[&s.q, kc, vc, &s.att],
                &[
                    hd as u32,
                    qd as u32,
                    kvd as u32,
                    (c.n_head / c.n_head_kv) as u32,
                    pos as u32,
                    window as u32,
                    c.attn_scale.to_bits(),
                ],
                [c.n_head as u32, n as u32, 1],
            )?;
            s.matvec(&mut b, &mut None, &l.wo, &s.att, &s.o, n)?;
            if let Some(w) = &l.post_attn_norm {
                rms_norm(&mut b, &s.o, w, d, n, c.rms_eps)?;
            }
            add(&mut b, &s.h, &s.o, n * d, n * d)?;

            copy(&mut b, &s.x, &s.h, n * d)?;
            rms_norm(&mut b, &s.x, &l.ffn_norm, d, n, c.rms_eps)?;
            let mut have = None;
            s.matvec(&mut b, &mut have, &l.gate, &s.x, &s.g, n)?;
            s.matvec(&mut b, &mut have, &l.up, &s.x, &s.u, n)?;
            let (gx, gy) = grid(n * c.n_ff, 64);
            b.push(
                Op::FfnAct,
                None,
                &[&s.g, &s.u],
                &[(n * c.n_ff) as u32, u32::from(c.arch == Arch::Gemma3), gx],
                [gx, gy, 1],
            )?;
            s.matvec(&mut b, &mut None, &l.down, &s.g, &s.o, n)?;
            if let Some(w) = &l.post_ffn_norm {
                rms_norm(&mut b, &s.o, w, d, n, c.rms_eps)?;
            }
            add(&mut b, &s.h, &s.o, n * d, n * d)?;
        }
        b.submit()?;
        let out = gpu.read(&s.h, n * d)?;
        rows.copy_from_slice(&out);
        Ok(())
    }

    /// Token ids to hidden states on the GPU (needs [`GpuLayers::with_ends`]).
    pub fn embed(&mut self, tokens: &[u32]) -> Result<Hidden, GpuError> {
        let c = self.config.clone();
        for &id in tokens {
            if id as usize >= c.n_vocab {
                return Err(crate::model::ModelError::BadToken {
                    id,
                    n_vocab: c.n_vocab,
                }
                .into());
            }
        }
        let gpu = self.gpu.clone();
        let ends = self.ends.as_ref().ok_or_else(no_ends)?;
        let n = tokens.len();
        let ids = gpu.upload("ids", bytemuck::cast_slice(tokens))?;
        let out = gpu.buffer("embd", (n * c.n_embd * 4) as u64)?;
        let mut b = Batch::new(&gpu);
        ends.embd
            .get_rows(&mut b, &ids, &out, n, c.embed_scale.unwrap_or(1.0))?;
        b.submit()?;
        Ok(Hidden {
            data: gpu.read(&out, n * c.n_embd)?,
            n_tokens: n,
            dim: c.n_embd,
            decoded_from: usize::MAX,
        })
    }

    /// Final norm and logits of `rows` of `h` on the GPU (needs
    /// [`GpuLayers::with_ends`]); `rows.len() x n_vocab`.
    pub fn head(&mut self, h: &Hidden, rows: &[usize]) -> Result<Vec<f32>, GpuError> {
        let c = self.config.clone();
        let gpu = self.gpu.clone();
        let ends = self.ends.as_ref().ok_or_else(no_ends)?;
        let x: Vec<f32> = rows.iter().flat_map(|&r| h.row(r).to_vec()).collect();
        let xb = gpu.upload("head_x", f32_bytes(&x))?;
        let logits = gpu.buffer("logits", (rows.len() * c.n_vocab * 4) as u64)?;
        let mut b = Batch::new(&gpu);
        rms_norm(
            &mut b,
            &xb,
            &ends.output_norm,
            c.n_embd,
            rows.len(),
            c.rms_eps,
        )?;
        let n = rows.len();
        let xq = gpu.buffer("head_xq", (n * c.n_embd * 4) as u64)?;
        let xs = gpu.buffer("head_xs", (n * c.n_embd.div_ceil(32) * 4) as u64)?;
        act_quant(&mut b, &xb, &xq, &xs, n, c.n_embd, ends.output.act())?;
        ends.output.matvec(&mut b, &xq, &xs, &logits, n)?;
        b.submit()?;
        gpu.read(&logits, rows.len() * c.n_vocab)
    }
}

fn no_ends() -> GpuError {
    GpuError::Wgpu("the embedding and output head were not uploaded (with_ends)".into())
}

/// Rounds `n` rows of `cols` from `x` into `xq` as the CPU rounds
/// activations to `act` (block sums of Q8_1 into `s`).
pub(crate) fn act_quant(
    b: &mut Batch,
    x: &wgpu::Buffer,
    xq: &wgpu::Buffer,
    s: &wgpu::Buffer,
    n: usize,
    cols: usize,
    act: ActType,
) -> Result<(), GpuError> {
    let (mode, per) = match act {
        ActType::F32 => (0, 1),
        ActType::F16 => (1, 1),
        ActType::BF16 => (2, 1),
        ActType::Q8_0 => (3, 32),
        ActType::Q8_1 => (4, 32),
        ActType::Q8_K => (5, 256),
    };
    let (gx, gy) = grid((n * cols).div_ceil(per), 64);
    b.push(
        Op::ActQuant,
        None,
        &[x, xq, s],
        &[cols as u32, n as u32, mode, gx],
        [gx, gy, 1],
    )
}

pub(crate) fn copy(
    b: &mut Batch,
    dst: &wgpu::Buffer,
    src: &wgpu::Buffer,
    len: usize,
) -> Result<(), GpuError> {
    let (gx, gy) = grid(len, 64);
    b.push(
        Op::Copy,
        None,
        &[dst, src],
        &[len as u32, len as u32, gx],
        [gx, gy, 1],
    )
}

pub(crate) fn add(
    b: &mut Batch,
    dst: &wgpu::Buffer,
    src: &wgpu::Buffer,
    len: usize,
    src_len: usize,
) -> Result<(), GpuError> {
    let (gx, gy) = grid(len, 64);
    b.push(
        Op::Add,
        None,
        &[dst, src],
        &[len as u32, src_len as u32, gx],
        [gx, gy, 1],
    )
}

pub(crate) fn rms_norm(
    b: &mut Batch,
    x: &wgpu::Buffer,
    w: &wgpu::Buffer,
    len: usize,
    rows: usize,
    eps: f32,
) -> Result<(), GpuError> {
    let (gx, gy) = grid(rows, 1);
    b.push(
        Op::RmsNorm,
        None,
        &[x, w],
        &[len as u32, eps.to_bits(), rows as u32, gx],
        [gx, gy, 1],
    )
}

/// Runs layers `range` of `model` over `hidden`: the layers `gpu` holds on
/// the GPU (with the session's GPU cache), the rest on the CPU with `kv`,
/// with one copy of the activations at each switch.
pub fn forward_placed(
    model: &Model,
    mut gpu: Option<(&mut GpuLayers, &mut GpuKv)>,
    range: Range<usize>,
    hidden: &mut Hidden,
    kv: &mut KvCache,
    pos: usize,
) -> Result<(), GpuError> {
    let held = gpu.as_ref().map(|(g, _)| g.layers()).unwrap_or(0..0);
    let mut at = range.start;
    while at < range.end {
        let here = held.contains(&at);
        let mut end = at + 1;
        while end < range.end && held.contains(&end) == here {
            end += 1;
        }
        match (&mut gpu, here) {
            (Some((g, gkv)), true) => g.forward(at..end, hidden, gkv, pos)?,
            _ => model.forward_layers(at..end, hidden, kv, pos)?,
        }
        at = end;
    }
    Ok(())
}

/// GFLOPS of a one-token matvec with `w` (its first rows, up to 64 MiB of
/// them) on `gpu`, timed for about `budget` after a warm-up.
pub fn matvec_gflops(
    gpu: &Arc<Gpu>,
    w: &Weight,
    budget: std::time::Duration,
) -> Result<f64, GpuError> {
    let row_bytes = w.ty.row_bytes(w.cols);
    let rows = ((64usize << 20) / row_bytes.max(1)).clamp(1, w.rows);
    let gw = GpuWeight::from_bytes_chunked(
        gpu,
        &w.name,
        w.ty,
        rows,
        w.cols,
        &w.bytes()[..rows * row_bytes],
        None,
    )?;
    let x: Vec<f32> = (0..w.cols)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let xb = gpu.upload("x", f32_bytes(&x))?;
    let xq = gpu.buffer("xq", (w.cols * 4) as u64)?;
    let xs = gpu.buffer("xs", (w.cols.div_ceil(32) * 4) as u64)?;
    let y = gpu.buffer("y", (rows * 4) as u64)?;
    let run = |reps: usize| -> Result<(), GpuError> {
        let mut b = Batch::new(gpu);
        for _ in 0..reps {
            act_quant(&mut b, &xb, &xq, &xs, 1, w.cols, gw.act())?;
            gw.matvec(&mut b, &xq, &xs, &y, 1)?;
        }
        b.submit()?;
        gpu.wait()
    };
    run(1)?;
    let t = std::time::Instant::now();
    let mut n = 0;
    while t.elapsed() < budget || n < 4 {
        run(4)?;
        n += 4;
    }
    let secs = t.elapsed().as_secs_f64() / n as f64;
    Ok(2.0 * (rows * w.cols) as f64 / secs / 1e9)
}

/// Milliseconds to write one token's keys and values of one layer
/// (`kv_dim` each) into a GPU cache, as a dispatch among many.
pub fn kv_store_ms(gpu: &Arc<Gpu>, kv_dim: usize) -> Result<f64, GpuError> {
    let kv_dim = kv_dim.max(2) / 2 * 2;
    let src = gpu.buffer("kv_src", (kv_dim * 4) as u64)?;
    let kc = gpu.buffer("kc", (16 * kv_dim * 2) as u64)?;
    let vc = gpu.buffer("vc", (16 * kv_dim * 2) as u64)?;
    let reps = 64;
    let mut b = Batch::new(gpu);
    for i in 0..reps {
        b.push(
            Op::KvStore,
            None,
            &[&src, &src, &kc, &vc],
            &[kv_dim as u32, (i % 16) as u32, 1],
            [(kv_dim / 2).div_ceil(64) as u32, 1, 1],
        )?;
    }
    let t = std::time::Instant::now();
    b.submit()?;
    gpu.wait()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / reps as f64)
}
