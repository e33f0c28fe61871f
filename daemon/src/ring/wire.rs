//! Framing on `/prima/ring/1` streams.
//!
//! A frame is `u32 header length | header (JSON) | u32 payload length |
//! payload`, little-endian. The header says what the payload is; for
//! activations the payload is `n_tokens × n_embd` f32 (little-endian,
//! row-major), and its length must say exactly that. Lengths are checked
//! against limits before anything is allocated, so a hostile or broken peer
//! costs at most one bounded buffer and a logged error.

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// Largest header accepted.
pub const MAX_HEADER: usize = 4096;

/// KV-cache control that travels the ring so every device's cache of a
/// session stays consistent (spec §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum KvOp {
    /// Forget the session.
    Drop,
    /// Forget positions `from..` (a rollback).
    Truncate { from: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Header {
    /// Hidden states of `n_tokens` tokens at positions `pos..`, to be run
    /// through the receiver's window of `round`. `ctx` sizes a new
    /// session's cache; `rows` is how many of the batch's last tokens the
    /// head wants logits for (0 for all but a request's last micro-batch;
    /// more than 1 when it verifies speculative drafts); tokens from
    /// position `decoded_from` on are computed as decoded ones, not as
    /// prompt (see `prima_kernels::Hidden::decoded_from`).
    Act {
        /// The plan layout the session runs on ([`super::plan::RingPlan::layout_id`]).
        layout: u64,
        req: u64,
        round: u32,
        pos: u32,
        n_tokens: u32,
        ctx: u32,
        rows: u32,
        decoded_from: u32,
    },
    /// A cache command for session `req`; applied, then passed on.
    Kv { layout: u64, req: u64, op: KvOp },
    /// A device could not run session `req`; passed on to the head.
    Fail { layout: u64, req: u64, msg: String },
    /// A frame from `from` for `to` whose direct link is broken, passed
    /// through the receiving device (one relay at most).
    Relay {
        from: String,
        to: String,
        inner: Box<Header>,
    },
}

impl Header {
    pub fn layout(&self) -> u64 {
        match self {
            Header::Act { layout, .. }
            | Header::Kv { layout, .. }
            | Header::Fail { layout, .. } => *layout,
            Header::Relay { inner, .. } => inner.layout(),
        }
    }

    pub fn req(&self) -> u64 {
        match self {
            Header::Act { req, .. } | Header::Kv { req, .. } | Header::Fail { req, .. } => *req,
            Header::Relay { inner, .. } => inner.req(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub header: Header,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame header of {got} bytes (limit {limit})")]
    HeaderTooLong { got: usize, limit: usize },
    #[error("frame payload of {got} bytes (limit {limit})")]
    PayloadTooLong { got: usize, limit: usize },
    #[error("bad frame header: {0}")]
    BadHeader(String),
    #[error("activation frame: {n_tokens} tokens x {dim} floats need {want} bytes, got {got}")]
    ShapeMismatch {
        n_tokens: u32,
        dim: usize,
        want: usize,
        got: usize,
    },
    #[error("activation frame of {n_tokens} tokens asks for the logits of {rows}")]
    TooManyRows { n_tokens: u32, rows: u32 },
    #[error("{kind} frame with a {got}-byte payload (must be empty)")]
    UnexpectedPayload { kind: &'static str, got: usize },
    #[error("a relayed frame inside a relayed frame")]
    NestedRelay,
}

impl Frame {
    /// An activation frame carrying `hidden` (row-major f32).
    pub fn act(header: Header, hidden: &[f32]) -> Self {
        let mut payload = Vec::with_capacity(hidden.len() * 4);
        for v in hidden {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        Self { header, payload }
    }

    pub fn control(header: Header) -> Self {
        Self {
            header,
            payload: Vec::new(),
        }
    }

    /// The payload as f32 values.
    pub fn floats(&self) -> Vec<f32> {
        self.payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Checks the payload against the header for a model `dim` wide.
    pub fn check(&self, dim: usize) -> Result<(), WireError> {
        match &self.header {
            Header::Act { n_tokens, rows, .. } => {
                if rows > n_tokens {
                    return Err(WireError::TooManyRows {
                        n_tokens: *n_tokens,
                        rows: *rows,
                    });
                }
                let want = *n_tokens as usize * dim * 4;
                if *n_tokens == 0 || self.payload.len() != want {
                    return Err(WireError::ShapeMismatch {
                        n_tokens: *n_tokens,
                        dim,
                        want,
                        got: self.payload.len(),
                    });
                }
            }
            Header::Kv { .. } | Header::Fail { .. } => {
                if !self.payload.is_empty() {
                    return Err(WireError::UnexpectedPayload {
                        kind: "control",
                        got: self.payload.len(),
                    });
                }
            }
            // The inner frame is checked where it is unwrapped.
            Header::Relay { inner, .. } => {
                if matches!(**inner, Header::Relay { .. }) {
                    return Err(WireError::NestedRelay);
                }
            }
        }
        Ok(())
    }
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), WireError> {
    let header = serde_json::to_vec(&f.header).expect("headers serialise");
    let mut buf = Vec::with_capacity(8 + header.len() + f.payload.len());
    buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&(f.payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&f.payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame whose payload is at most `max_payload` bytes. Returns
/// None at a clean end of stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_payload: usize,
) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let hlen = u32::from_le_bytes(len) as usize;
    if hlen > MAX_HEADER {
        return Err(WireError::HeaderTooLong {
            got: hlen,
            limit: MAX_HEADER,
        });
    }
    let mut hbuf = vec![0u8; hlen];
    r.read_exact(&mut hbuf).await?;
    let header: Header =
        serde_json::from_slice(&hbuf).map_err(|e| WireError::BadHeader(e.to_string()))?;
    r.read_exact(&mut len).await?;
    let plen = u32::from_le_bytes(len) as usize;
    if plen > max_payload {
        return Err(WireError::PayloadTooLong {
            got: plen,
            limit: max_payload,
        });
    }
    let mut payload = vec![0u8; plen];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { header, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::io::Cursor;

    fn act(n: u32) -> Header {
        Header::Act {
            layout: 3,
            req: 7,
            round: 1,
            pos: 5,
            n_tokens: n,
            ctx: 64,
            rows: 1,
            decoded_from: 5,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn frames_round_trip() {
        block_on(async {
            let f = Frame::act(act(2), &[1.0, -2.5, 3.25, 0.0, 1e-9, -7.0]);
            let k = Frame::control(Header::Kv {
                layout: 3,
                req: 7,
                op: KvOp::Truncate { from: 4 },
            });
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, &f).await.unwrap();
            write_frame(&mut buf, &k).await.unwrap();
            let mut r = Cursor::new(buf.into_inner());
            let g = read_frame(&mut r, 1 << 20).await.unwrap().unwrap();
            assert_eq!(g, f);
            g.check(3).unwrap();
            assert_eq!(g.floats(), vec![1.0, -2.5, 3.25, 0.0, 1e-9, -7.0]);
            assert_eq!(read_frame(&mut r, 1 << 20).await.unwrap().unwrap(), k);
            assert!(read_frame(&mut r, 1 << 20).await.unwrap().is_none());
        });
    }

    #[test]
    fn hostile_frames_are_refused_without_allocating() {
        block_on(async {
            // Header length beyond the limit.
            let mut r = Cursor::new(u32::MAX.to_le_bytes().to_vec());
            assert!(matches!(
                read_frame(&mut r, 1024).await,
                Err(WireError::HeaderTooLong { .. })
            ));
            // Garbage header.
            let mut b = 5u32.to_le_bytes().to_vec();
            b.extend_from_slice(b"\xff\x00abc");
            assert!(matches!(
                read_frame(&mut Cursor::new(b), 1024).await,
                Err(WireError::BadHeader(_))
            ));
            // Unknown field in a header.
            let h = br#"{"t":"kv","layout":1,"req":1,"op":{"op":"drop"},"evil":1}"#;
            let mut b = (h.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(h);
            b.extend_from_slice(&0u32.to_le_bytes());
            assert!(matches!(
                read_frame(&mut Cursor::new(b), 1024).await,
                Err(WireError::BadHeader(_))
            ));
            // Payload beyond the limit.
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, &Frame::act(act(1), &[0.0; 600]))
                .await
                .unwrap();
            assert!(matches!(
                read_frame(&mut Cursor::new(buf.into_inner()), 1024).await,
                Err(WireError::PayloadTooLong { .. })
            ));
            // Truncated mid-frame.
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, &Frame::act(act(1), &[0.0; 8]))
                .await
                .unwrap();
            let mut v = buf.into_inner();
            v.truncate(v.len() - 3);
            assert!(matches!(
                read_frame(&mut Cursor::new(v), 1024).await,
                Err(WireError::Io(_))
            ));
        });
    }

    #[test]
    fn payload_must_match_the_header() {
        let f = Frame::act(act(2), &[0.0; 5]);
        assert!(matches!(
            f.check(3),
            Err(WireError::ShapeMismatch {
                want: 24,
                got: 20,
                ..
            })
        ));
        let mut k = Frame::control(Header::Fail {
            layout: 1,
            req: 1,
            msg: "x".into(),
        });
        k.check(3).unwrap();
        k.payload = vec![1];
        assert!(k.check(3).is_err());
        assert!(Frame::act(act(0), &[]).check(3).is_err());
        // Logits for more rows than the batch has.
        let mut h = act(2);
        if let Header::Act { rows, .. } = &mut h {
            *rows = 3;
        }
        assert!(matches!(
            Frame::act(h, &[0.0; 6]).check(3),
            Err(WireError::TooManyRows { .. })
        ));
    }

    #[test]
    fn relayed_frames_carry_their_sender_and_nest_once() {
        block_on(async {
            let inner = act(1);
            let f = Frame {
                header: Header::Relay {
                    from: "a".into(),
                    to: "b".into(),
                    inner: Box::new(inner.clone()),
                },
                payload: Frame::act(inner, &[1.0, 2.0, 3.0]).payload,
            };
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, &f).await.unwrap();
            let g = read_frame(&mut Cursor::new(buf.into_inner()), 1 << 20)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(g, f);
            g.check(3).unwrap();
            assert_eq!(
                (g.header.layout(), g.header.req()),
                (f.header.layout(), f.header.req())
            );
            let nested = Frame::control(Header::Relay {
                from: "a".into(),
                to: "b".into(),
                inner: Box::new(g.header.clone()),
            });
            assert!(matches!(nested.check(3), Err(WireError::NestedRelay)));
        });
    }
}
