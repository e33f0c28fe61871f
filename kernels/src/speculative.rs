//! Speculative decoding: a cheap draft proposes the next few tokens, the
//! target model checks them all in one batch, and every proposal the
//! target would have produced itself is a token gained for one pass.
//!
//! [`Speculative`] is an [`Evaluator`]: generation drives it exactly as it
//! drives a plain session, sampling each token from the *target's* logits.
//! When the sampled token is the draft's proposal, the logits after it were
//! already computed by the verifying batch and are returned at once; when it
//! is not, the target's cache is rewound to the last agreed position and
//! drafting starts again from there. The output is therefore the target's,
//! token for token, greedy or sampled (a proposal counts only where the
//! sampler picks it from the target's own distribution).
//!
//! With sampling this is the standard rejection rule for a greedy draft:
//! the draft's distribution is one-hot on its proposal `x`, so the rule
//! accepts `x` with probability `p(x)` and otherwise samples from `p` with
//! `x` removed, renormalised; sampling `y ~ p` and keeping `x` exactly when
//! `y = x` does both at once.
//!
//! The target is anything that evaluates a batch with logits for its last
//! rows and can forget a tail ([`Target`]): a local [`Session`], or a
//! pipelined ring whose devices roll their caches back together.
//!
//! Drafts: [`SelfDraft`], the target's own first layers and output head (no
//! second model); [`ModelDraft`], a smaller model with the same vocabulary.
//! Drafting adapts: a draft stops proposing when its own confidence drops
//! below `p_min`, and one whose proposals keep being turned down rests for
//! a growing number of passes, so a poor draft costs little.

use std::collections::VecDeque;

use crate::{
    engine::{Evaluator, Session},
    model::{KvCache, Model, ModelError},
    sample::argmax,
};

/// What speculation verifies drafts on.
pub trait Target {
    type Error;
    /// Evaluates `tokens` at the current position as one batch and returns
    /// the logits of its last `rows` tokens, row after row.
    fn eval_rows(&mut self, tokens: &[u32], rows: usize) -> Result<Vec<f32>, Self::Error>;
    /// Forgets every position from `pos` on.
    fn rewind(&mut self, pos: usize);
    /// Context length in tokens.
    fn ctx(&self) -> usize;
    /// Most rows whose logits one batch may return (a ring computes them
    /// all in its last micro-batch).
    fn max_rows(&self) -> usize {
        usize::MAX
    }
}

impl Target for Session<'_> {
    type Error = ModelError;
    fn eval_rows(&mut self, tokens: &[u32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let rows: Vec<usize> = (tokens.len().saturating_sub(rows)..tokens.len()).collect();
        self.eval(tokens, &rows)
    }
    fn rewind(&mut self, pos: usize) {
        Session::rewind(self, pos)
    }
    fn ctx(&self) -> usize {
        Session::ctx(self)
    }
}

impl<T: Target + ?Sized> Target for &mut T {
    type Error = T::Error;
    fn eval_rows(&mut self, tokens: &[u32], rows: usize) -> Result<Vec<f32>, T::Error> {
        (**self).eval_rows(tokens, rows)
    }
    fn rewind(&mut self, pos: usize) {
        (**self).rewind(pos)
    }
    fn ctx(&self) -> usize {
        (**self).ctx()
    }
    fn max_rows(&self) -> usize {
        (**self).max_rows()
    }
}

/// A failure of the draft or of the target.
#[derive(Debug, thiserror::Error)]
pub enum SpecError<E> {
    #[error("the draft failed: {0}")]
    Draft(ModelError),
    #[error("{0}")]
    Target(E),
}

/// Proposes tokens to follow a history.
pub trait Drafter {
    /// Up to `max` tokens likely to follow `history`, stopping early where
    /// the draft's own confidence in its choice falls below `p_min`.
    fn draft(&mut self, history: &[u32], max: usize, p_min: f32) -> Result<Vec<u32>, ModelError>;
}

/// Probability of the most likely token under `logits`.
fn top_prob(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (1.0 / sum) as f32
}

/// Greedy drafting over an evaluator that keeps the tokens it was fed:
/// rewinds to what `history` shares with them, feeds the rest, proposes.
fn draft_with(
    fed: &mut Vec<u32>,
    mut eval: impl FnMut(&[u32], usize) -> Result<Vec<f32>, ModelError>,
    history: &[u32],
    max: usize,
    p_min: f32,
) -> Result<Vec<u32>, ModelError> {
    if max == 0 || history.is_empty() {
        return Ok(Vec::new());
    }
    let mut common = fed.iter().zip(history).take_while(|(a, b)| a == b).count();
    // Re-evaluate at least the last token: its logits are what drafting
    // starts from.
    common = common.min(history.len() - 1);
    fed.truncate(common);
    let mut logits = eval(&history[common..], common)?;
    fed.extend_from_slice(&history[common..]);
    let mut out = Vec::new();
    while out.len() < max && top_prob(&logits) >= p_min {
        let t = argmax(&logits);
        out.push(t);
        if out.len() == max {
            break;
        }
        logits = eval(&[t], fed.len())?;
        fed.push(t);
    }
    Ok(out)
}

/// The target's first `layers` layers and its output head as the draft.
pub struct SelfDraft<'m> {
    model: &'m Model,
    layers: usize,
    kv: KvCache,
    fed: Vec<u32>,
}

impl<'m> SelfDraft<'m> {
    /// A draft of `model`'s first `layers` layers (which `model` must hold)
    /// for a context of `ctx`.
    pub fn new(model: &'m Model, layers: usize, ctx: usize) -> Result<Self, ModelError> {
        let n = model.config.n_layer;
        if layers == 0 || layers >= n || !model.loaded_layers().contains(&0) {
            return Err(ModelError::LayerRange {
                start: 0,
                end: layers,
                n_layer: n,
            });
        }
        Ok(Self {
            model,
            layers,
            kv: KvCache::new(&model.config, 0..layers, ctx),
            fed: Vec::new(),
        })
    }
}

impl Drafter for SelfDraft<'_> {
    fn draft(&mut self, history: &[u32], max: usize, p_min: f32) -> Result<Vec<u32>, ModelError> {
        let (m, layers, kv) = (self.model, self.layers, &mut self.kv);
        let max = max.min(kv.ctx().saturating_sub(history.len()));
        draft_with(
            &mut self.fed,
            |toks, pos| {
                let mut h = m.embed(toks)?;
                m.forward_layers(0..layers, &mut h, kv, pos)?;
                Ok(m.head(&h, &[toks.len() - 1]))
            },
            history,
            max,
            p_min,
        )
    }
}

/// A separate, smaller model with the target's vocabulary as the draft.
pub struct ModelDraft<'m> {
    session: Session<'m>,
    fed: Vec<u32>,
}

impl<'m> ModelDraft<'m> {
    /// Whether `draft` can draft for `target`: their token ids must mean
    /// the same, so their vocabularies must be the same size.
    pub fn check(draft: &Model, target: &Model) -> Result<(), String> {
        if draft.config.n_vocab != target.config.n_vocab {
            return Err(format!(
                "it has a vocabulary of {} tokens and the model {}: a draft must share the \
                 model's vocabulary",
                draft.config.n_vocab, target.config.n_vocab
            ));
        }
        Ok(())
    }

    pub fn new(model: &'m Model, ctx: usize) -> Self {
        Self {
            session: Session::new(model, ctx),
            fed: Vec::new(),
        }
    }
}

impl Drafter for ModelDraft<'_> {
    fn draft(&mut self, history: &[u32], max: usize, p_min: f32) -> Result<Vec<u32>, ModelError> {
        let s = &mut self.session;
        let max = max.min(s.ctx().saturating_sub(history.len()));
        draft_with(
            &mut self.fed,
            |toks, pos| {
                s.rewind(pos);
                s.eval_last(toks)
            },
            history,
            max,
            p_min,
        )
    }
}

/// Either kind of draft.
pub enum Draft<'m> {
    Layers(SelfDraft<'m>),
    Model(Box<ModelDraft<'m>>),
}

impl Drafter for Draft<'_> {
    fn draft(&mut self, history: &[u32], max: usize, p_min: f32) -> Result<Vec<u32>, ModelError> {
        match self {
            Draft::Layers(d) => d.draft(history, max, p_min),
            Draft::Model(d) => d.draft(history, max, p_min),
        }
    }
}

/// How much to draft.
#[derive(Debug, Clone, Copy)]
pub struct SpecParams {
    /// Most tokens proposed per target pass.
    pub max_draft: usize,
    /// Stop proposing when the draft's top probability falls below this.
    pub p_min: f32,
}

impl Default for SpecParams {
    fn default() -> Self {
        Self {
            max_draft: 8,
            p_min: 0.6,
        }
    }
}

/// What speculation achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecStats {
    /// Tokens the draft proposed.
    pub drafted: usize,
    /// Proposals the target agreed with.
    pub accepted: usize,
    /// Batches the target evaluated (prompt included).
    pub target_passes: usize,
}

impl SpecStats {
    /// Accepted proposals per proposal.
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// A target driven with a draft; see the module docs.
pub struct Speculative<T, D> {
    target: T,
    drafter: D,
    params: SpecParams,
    /// Tokens the target has evaluated and generation has kept.
    history: Vec<u32>,
    /// Verified ahead: each proposal, and the target's logits after it.
    pending: VecDeque<(u32, Vec<f32>)>,
    /// Proposals of the latest round the draft ran, and how many were taken.
    round: Option<(usize, usize)>,
    /// Rounds in a row in which nothing was taken, and passes left to run
    /// without drafting: a draft that keeps missing costs its forward
    /// passes for nothing, so it rests for 2, 4, ... 64 passes before
    /// trying again.
    misses: u32,
    rest: usize,
    /// Positions the answer can reach ([`Speculative::set_end`]).
    end: usize,
    pub stats: SpecStats,
}

impl<T: Target, D: Drafter> Speculative<T, D> {
    /// `target` must be at position 0.
    pub fn new(target: T, drafter: D, params: SpecParams) -> Self {
        Self {
            target,
            drafter,
            params,
            history: Vec::new(),
            pending: VecDeque::new(),
            round: None,
            misses: 0,
            rest: 0,
            end: usize::MAX,
            stats: SpecStats::default(),
        }
    }

    /// The answer ends at `end` positions (prompt and tokens to generate):
    /// nothing is drafted past it, where no proposal could be used.
    pub fn set_end(&mut self, end: usize) {
        self.end = end;
    }
}

impl<T: Target, D: Drafter> Evaluator for Speculative<T, D> {
    type Error = SpecError<T::Error>;

    fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Self::Error> {
        if let ([t], Some((p, _))) = (tokens, self.pending.front()) {
            if t == p {
                let (t, logits) = self.pending.pop_front().expect("checked");
                self.history.push(t);
                self.stats.accepted += 1;
                if let Some(r) = &mut self.round {
                    r.1 += 1;
                }
                return Ok(logits);
            }
        }
        // A proposal was turned down (or this is new input): the target's
        // cache past the kept tokens is stale; later batches overwrite it.
        self.pending.clear();
        self.target.rewind(self.history.len());
        self.history.extend_from_slice(tokens);
        // The draft ran last round and nothing came of it (nothing proposed
        // or nothing taken): rest it, longer each time.
        match self.round.take() {
            Some((_, 0)) => {
                self.misses = (self.misses + 1).min(6);
                self.rest = 1 << self.misses;
            }
            Some(_) => self.misses = 0,
            None => {}
        }
        let room = self
            .target
            .ctx()
            .min(self.end)
            .saturating_sub(self.history.len() + 1)
            .min(self.target.max_rows().saturating_sub(1));
        let drafts = if self.rest > 0 {
            self.rest -= 1;
            Vec::new()
        } else {
            let d = self
                .drafter
                .draft(
                    &self.history,
                    self.params.max_draft.min(room),
                    self.params.p_min,
                )
                .map_err(SpecError::Draft)?;
            self.round = Some((d.len(), 0));
            d
        };
        self.stats.drafted += drafts.len();
        self.stats.target_passes += 1;
        let mut batch = tokens.to_vec();
        batch.extend_from_slice(&drafts);
        let n_rows = drafts.len() + 1;
        let all = self
            .target
            .eval_rows(&batch, n_rows)
            .map_err(SpecError::Target)?;
        let n_vocab = all.len() / n_rows;
        let mut rows = all.chunks_exact(n_vocab);
        let first = rows.next().expect("one row at least").to_vec();
        self.pending = drafts.into_iter().zip(rows.map(<[f32]>::to_vec)).collect();
        Ok(first)
    }

    fn pos(&self) -> usize {
        self.history.len()
    }

    fn ctx(&self) -> usize {
        self.target.ctx()
    }
}
