//! SentencePiece-style tokenisation from a scored vocabulary, the way
//! llama.cpp does it for `llama` vocabularies: start from UTF-8 characters,
//! repeatedly merge the adjacent pair whose concatenation is the
//! highest-scoring vocabulary entry, and fall back to byte tokens for
//! anything left that is not in the vocabulary.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap},
};

use super::TokenKind;

pub(super) struct Spm {
    by_text: HashMap<String, u32>,
    scores: Vec<f32>,
    /// Byte-fallback token for each byte value.
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
}

/// Parses `<0xAB>` byte tokens.
pub(super) fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Highest score first; on ties, the leftmost pair first.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl Spm {
    pub(super) fn new(
        tokens: &[String],
        kinds: &[TokenKind],
        scores: Vec<f32>,
        add_space_prefix: bool,
    ) -> Self {
        let mut by_text = HashMap::with_capacity(tokens.len());
        let mut byte_tokens = [None; 256];
        for (i, (t, k)) in tokens.iter().zip(kinds).enumerate() {
            if *k == TokenKind::Byte {
                if let Some(b) = byte_token_value(t) {
                    byte_tokens[b as usize] = Some(i as u32);
                }
            }
            by_text.entry(t.clone()).or_insert(i as u32);
        }
        Self {
            by_text,
            scores,
            byte_tokens,
            add_space_prefix,
        }
    }

    /// Tokenises one raw-text fragment, appending to `out`.
    pub(super) fn encode(&self, text: &str, prev_special: bool, out: &mut Vec<u32>) {
        let mut s = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && prev_special {
            s.push(' ');
        }
        s.push_str(text);
        let s = s.replace(' ', "\u{2581}");
        if s.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in s.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let try_add = |l: usize, r: usize, syms: &[Symbol], q: &mut BinaryHeap<Bigram>| {
            let start = syms[l].start;
            let size = syms[l].len + syms[r].len;
            if let Some(&id) = self.by_text.get(&s[start..start + size]) {
                q.push(Bigram {
                    left: l,
                    right: r,
                    score: self.scores[id as usize],
                    size,
                });
            }
        };
        for i in 1..symbols.len() {
            try_add(i - 1, i, &symbols, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            // Skip pairs whose symbols changed since the pair was queued.
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != b.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            if let Some(p) = symbols[l].prev {
                try_add(p, l, &symbols, &mut queue);
            }
            if let Some(n) = symbols[l].next {
                try_add(l, n, &symbols, &mut queue);
            }
        }
        // Every merged symbol is a vocabulary entry by construction; single
        // characters that are not fall back to byte tokens.
        let mut i = Some(0);
        while let Some(cur) = i {
            let sym = &symbols[cur];
            let text = &s[sym.start..sym.start + sym.len];
            match self.by_text.get(text) {
                Some(&id) => out.push(id),
                None => out.extend(text.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            i = sym.next;
        }
    }
}
