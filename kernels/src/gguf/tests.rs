//! Hostile-input tests: every malformed header gives a clear error, never a
//! panic. Files are built byte by byte.

use super::*;

/// A little GGUF writer for tests.
#[derive(Default)]
struct Builder {
    version: u32,
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
    /// Overrides for the header counts.
    n_kv_override: Option<u64>,
    n_tensors_override: Option<u64>,
}

fn s(out: &mut Vec<u8>, v: &str) {
    out.extend((v.len() as u64).to_le_bytes());
    out.extend(v.as_bytes());
}

impl Builder {
    fn new() -> Self {
        Self {
            version: 3,
            ..Default::default()
        }
    }
    fn kv_u32(mut self, k: &str, v: u32) -> Self {
        s(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn kv_str(mut self, k: &str, v: &str) -> Self {
        s(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        s(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn kv_raw(mut self, k: &str, ty: u32, payload: &[u8]) -> Self {
        s(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(payload);
        self.n_kv += 1;
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        s(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    fn data(mut self, n: usize) -> Self {
        self.data = (0..n).map(|i| i as u8).collect();
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(
            self.n_tensors_override
                .unwrap_or(self.n_tensors)
                .to_le_bytes(),
        );
        out.extend(self.n_kv_override.unwrap_or(self.n_kv).to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
}

/// A small valid file: two keys, two F32 tensors.
fn valid() -> Builder {
    Builder::new()
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .tensor("a", &[8], 0, 0)
        .tensor("b", &[4, 2], 0, 32)
        .data(64)
}

fn err(bytes: Vec<u8>) -> GgufError {
    match Gguf::from_vec(bytes) {
        Ok(_) => panic!("hostile file was accepted"),
        Err(e) => e,
    }
}

#[test]
fn valid_file_parses_with_typed_metadata() {
    let g = Gguf::from_vec(valid().build()).expect("valid");
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.metadata.get_usize("llama.block_count", 10).unwrap(), 1);
    let b = g.tensor("b").expect("tensor b");
    assert_eq!((b.size, b.n_rows(), b.row_len()), (32, 2, 4));
    assert_eq!(g.tensor_data(b)[0], 32);
    let e = g.metadata.get_usize("llama.nope", 10).unwrap_err();
    assert_eq!(e.to_string(), "missing metadata key \"llama.nope\"");
    let e = g.metadata.get_str("llama.block_count").unwrap_err();
    assert!(
        e.to_string().contains("has type u32, expected string"),
        "{e}"
    );
    // Version 2 has the same layout.
    let mut v2 = valid();
    v2.version = 2;
    assert!(Gguf::from_vec(v2.build()).is_ok());
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = valid().build();
    for len in 0..full.len() {
        let e = err(full[..len].to_vec());
        let msg = e.to_string();
        assert!(!msg.is_empty());
    }
}

#[test]
fn wrong_magic() {
    let mut b = valid().build();
    b[..4].copy_from_slice(b"GGML");
    let e = err(b);
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"));
    assert!(matches!(err(b"GG".to_vec()), GgufError::BadMagic { .. }));
}

#[test]
fn unknown_and_big_endian_versions() {
    for v in [0u32, 1, 4, 99] {
        let mut b = valid();
        b.version = v;
        let e = err(b.build());
        assert!(
            matches!(e, GgufError::UnsupportedVersion(x) if x == v),
            "{e}"
        );
    }
    let mut b = valid();
    b.version = 3u32.swap_bytes();
    assert!(matches!(err(b.build()), GgufError::BigEndian(_)));
}

#[test]
fn tensor_beyond_eof() {
    let b = Builder::new().tensor("w", &[64], 0, 0).data(100);
    let e = err(b.build());
    match &e {
        GgufError::TensorOutOfBounds { name, needed, .. } => {
            assert_eq!(name, "w");
            assert_eq!(*needed, 256);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("needs 256 bytes"), "{e}");
    // An offset so large that offset + size overflows.
    let b = Builder::new().tensor("w", &[8], 0, u64::MAX - 31).data(64);
    assert!(matches!(
        err(b.build()),
        GgufError::TensorOutOfBounds { .. }
    ));
}

#[test]
fn absurd_dims() {
    let five = Builder::new().tensor("t", &[1, 1, 1, 1, 1], 0, 0).data(32);
    assert!(matches!(err(five.build()), GgufError::BadShape { .. }));
    let zero = Builder::new().tensor("t", &[0, 4], 0, 0).data(32);
    assert!(matches!(err(zero.build()), GgufError::BadShape { .. }));
    let none = Builder::new().tensor("t", &[], 0, 0).data(32);
    assert!(matches!(err(none.build()), GgufError::BadShape { .. }));
    let overflow = Builder::new()
        .tensor("t", &[1 << 32, 1 << 32, 1 << 32], 0, 0)
        .data(32);
    let e = err(overflow.build());
    assert!(e.to_string().contains("overflow"), "{e}");
    // Q4_0 rows must be a whole number of 32-element blocks.
    let ragged = Builder::new().tensor("t", &[33], 2, 0).data(64);
    let e = err(ragged.build());
    assert!(
        e.to_string()
            .contains("not a multiple of the Q4_0 block size 32"),
        "{e}"
    );
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    let mut b = valid();
    b.n_tensors_override = Some(u64::MAX);
    assert!(matches!(err(b.build()), GgufError::CountTooLarge { .. }));
    let mut b = valid();
    b.n_kv_override = Some(1 << 60);
    assert!(matches!(err(b.build()), GgufError::CountTooLarge { .. }));
    // An array claiming 2^62 u32 elements.
    let mut payload = 4u32.to_le_bytes().to_vec();
    payload.extend((1u64 << 62).to_le_bytes());
    let b = Builder::new().kv_raw("big", 9, &payload);
    let e = err(b.build());
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
}

#[test]
fn string_length_beyond_file() {
    let mut payload = (1u64 << 40).to_le_bytes().to_vec();
    payload.extend(b"short");
    let b = Builder::new().kv_raw("k", 8, &payload);
    let e = err(b.build());
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("value of \"k\""), "{e}");
    // A key name that claims to be huge.
    let mut bytes = Builder::new().build();
    bytes.truncate(24);
    bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend([0u8; 16]);
    assert!(matches!(err(bytes), GgufError::NameTooLong { .. }));
}

#[test]
fn invalid_utf8_strings() {
    let mut payload = 2u64.to_le_bytes().to_vec();
    payload.extend([0xff, 0xfe]);
    let b = Builder::new().kv_raw("k", 8, &payload);
    assert!(matches!(err(b.build()), GgufError::InvalidUtf8 { .. }));
}

#[test]
fn unknown_quant_and_value_types() {
    let b = Builder::new().tensor("w", &[256], 16, 0).data(256);
    let e = err(b.build());
    assert!(
        matches!(e, GgufError::UnknownTensorType { ty: 16, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("\"w\""));
    let b = Builder::new().tensor("w", &[8], 9999, 0).data(64);
    assert!(matches!(
        err(b.build()),
        GgufError::UnknownTensorType { .. }
    ));
    let b = Builder::new().kv_raw("k", 13, &[0; 8]);
    assert!(matches!(
        err(b.build()),
        GgufError::UnknownValueType { ty: 13, .. }
    ));
}

#[test]
fn nested_arrays_are_bounded() {
    // array of array of array ... each with one element.
    let mut payload = Vec::new();
    for _ in 0..10 {
        payload.extend(9u32.to_le_bytes());
        payload.extend(1u64.to_le_bytes());
    }
    payload.extend(4u32.to_le_bytes());
    payload.extend(1u64.to_le_bytes());
    payload.extend(7u32.to_le_bytes());
    let b = Builder::new().kv_raw("deep", 9, &payload);
    assert!(matches!(err(b.build()), GgufError::NestingTooDeep { .. }));
}

#[test]
fn duplicates_misalignment_and_bad_alignment() {
    let b = Builder::new().kv_u32("k", 1).kv_u32("k", 2);
    assert!(matches!(err(b.build()), GgufError::DuplicateKey(_)));
    let b = Builder::new()
        .tensor("t", &[8], 0, 0)
        .tensor("t", &[8], 0, 32)
        .data(64);
    assert!(matches!(err(b.build()), GgufError::DuplicateTensor(_)));
    let b = Builder::new().tensor("t", &[4], 0, 4).data(64);
    assert!(matches!(err(b.build()), GgufError::Misaligned { .. }));
    let b = Builder::new().kv_u32("general.alignment", 24);
    assert!(matches!(err(b.build()), GgufError::BadAlignment(24)));
    let b = Builder::new().kv_u32("general.alignment", 0);
    assert!(matches!(err(b.build()), GgufError::BadAlignment(0)));
}

/// Deterministic byte-flipping over a valid file: whatever comes out, the
/// reader returns instead of panicking, and accepted files have in-bounds
/// tensors.
#[test]
fn random_corruption_never_panics() {
    let base = valid().build();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..5000 {
        let mut b = base.clone();
        for _ in 0..1 + (state % 4) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state as usize) % b.len();
            b[at] = (state >> 32) as u8;
        }
        if let Ok(g) = Gguf::from_vec(b) {
            for t in &g.tensors {
                assert!(t.offset + t.size <= g.file_len());
            }
        }
    }
}

#[test]
fn open_reports_missing_file() {
    let e = Gguf::open("/nonexistent/model.gguf").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot open /nonexistent/model.gguf"),
        "{e}"
    );
}
