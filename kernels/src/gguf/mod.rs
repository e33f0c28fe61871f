//! GGUF reader (versions 2 and 3), bounded against hostile files.
//!
//! Every count, length, dimension and tensor extent read from the file is
//! checked against the bytes that are actually there before anything is
//! allocated or sliced, and each error names the key or tensor and the numbers
//! involved. Tensor data is never copied: [`Gguf::tensor_data`] returns a slice
//! of the memory map.

mod mmap;
mod value;
pub mod write;

use std::{collections::HashMap, fmt, path::Path, sync::Arc};

pub use value::{Metadata, Value, ValueType};

use crate::quant::GgmlType;

const MAGIC: [u8; 4] = *b"GGUF";
/// Default tensor-data alignment when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a ggml tensor can have.
pub const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are rejected: a crafted file cannot make the
/// parser recurse without bound.
pub const MAX_VALUE_DEPTH: usize = 4;
/// Longest accepted key or tensor name. ggml itself limits names to 64 bytes;
/// we allow more but refuse absurd values.
pub const MAX_NAME_LEN: u64 = 1 << 16;

/// Everything that can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },
    #[error("GGUF file is big-endian (version field reads {0:#x}); only little-endian files are supported")]
    BigEndian(u32),
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("file truncated reading {what} at offset {offset}: needs {needed} bytes, only {available} left (file is {file_len} bytes)")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
        file_len: u64,
    },
    #[error(
        "{what} count {count} is impossible: the remaining {available} bytes hold at most {max}"
    )]
    CountTooLarge {
        what: String,
        count: u64,
        max: u64,
        available: u64,
    },
    #[error("{what} is {len} bytes long, longer than the {max} allowed")]
    NameTooLong { what: String, len: u64, max: u64 },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key {key:?} has unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("metadata key {key:?} nests arrays deeper than {max}")]
    NestingTooDeep { key: String, max: usize },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("tensor {name:?}: {detail}")]
    BadShape { name: String, detail: String },
    #[error("tensor {name:?} has unknown or unsupported ggml type {ty}")]
    UnknownTensorType { name: String, ty: u32 },
    #[error("general.alignment is {0}; it must be a non-zero power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?} data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {name:?} needs {needed} bytes at file offset {offset}, only {available} remaining in file ({file_len} bytes)")]
    TensorOutOfBounds {
        name: String,
        offset: u64,
        needed: u64,
        available: u64,
        file_len: u64,
    },
    #[error("missing metadata key {0:?}")]
    MissingKey(String),
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("metadata key {key:?} value {value} is out of range: {detail}")]
    OutOfRange {
        key: String,
        value: String,
        detail: String,
    },
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One tensor's description from the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute offset of the tensor's bytes in the file.
    pub offset: u64,
    /// Size of the tensor's bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Elements per row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims[0] as usize
    }
    /// Number of rows (product of all dims after the first).
    pub fn n_rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }
}

/// Where the bytes of a GGUF file live.
enum Bytes {
    Mmap(mmap::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m.as_slice(),
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata, tensor table, and the (mapped) bytes.
pub struct Gguf {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    by_name: HashMap<String, usize>,
    bytes: Arc<Bytes>,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("n_keys", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("file_len", &self.file_len())
            .finish()
    }
}

impl Gguf {
    /// Opens and validates a GGUF file by memory-mapping it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let map = mmap::Mmap::open(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes_inner(Bytes::Mmap(map))
    }

    /// Parses a GGUF image held in memory (tests, fuzzing, small files).
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self> {
        Self::from_bytes_inner(Bytes::Owned(bytes))
    }

    fn from_bytes_inner(bytes: Bytes) -> Result<Self> {
        let header = parse_header(bytes.as_slice())?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
            by_name,
            bytes: Arc::new(bytes),
        })
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.as_slice().len() as u64
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The bytes of a tensor, a slice of the mapped file (bounds were checked
    /// when the file was opened).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes.as_slice()[t.offset as usize..(t.offset + t.size) as usize]
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Lets the OS drop this process's mapped pages of a byte range (they
    /// are read again on the next access). Together with
    /// `posix_fadvise(DONTNEED)` on the file this returns their memory.
    pub fn release(&self, offset: u64, len: u64) {
        if let Bytes::Mmap(m) = &*self.bytes {
            m.release(offset as usize, len as usize);
        }
    }

    /// Asks the OS to read a byte range of the file ahead of use (a hint).
    pub fn prefetch(&self, offset: u64, len: u64) {
        if let Bytes::Mmap(m) = &*self.bytes {
            m.will_need(offset as usize, len as usize);
        }
    }
}

struct Header {
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A cursor over the file that refuses to read past its end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
                file_len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in
    /// what is left of the file, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<()> {
        let max = self.remaining() / min_size.max(1);
        if count > max {
            return Err(GgufError::CountTooLarge {
                what: what(),
                count,
                max,
                available: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self, max_len: u64, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > max_len {
            return Err(GgufError::NameTooLong {
                what: what(),
                len,
                max: max_len,
            });
        }
        let at = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what(),
            offset: at,
        })
    }
}

fn parse_header(buf: &[u8]) -> Result<Header> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r
        .take(4, &|| "magic".into())
        .map_err(|_| GgufError::BadMagic {
            found: buf[..buf.len().min(4)].to_vec(),
        })?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = r.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => return Err(GgufError::BigEndian(v)),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    let n_tensors = r.u64(&|| "tensor count".into())?;
    let n_kv = r.u64(&|| "metadata key count".into())?;
    // Smallest possible key/value pair: 8-byte key length + 4-byte type + 1 byte.
    r.check_count(n_kv, 13, &|| "metadata key".into())?;

    let mut metadata = Metadata::default();
    for i in 0..n_kv {
        let key = r.string(MAX_NAME_LEN, &|| format!("metadata key #{i}"))?;
        let ty = r.u32(&|| format!("type of metadata key {key:?}"))?;
        let value = value::read_value(&mut r, &key, ty, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().ok_or_else(|| GgufError::WrongType {
                key: "general.alignment".into(),
                expected: "integer",
                found: v.type_name(),
            })?;
            if a == 0 || !a.is_power_of_two() || a > (1 << 20) {
                return Err(GgufError::BadAlignment(a));
            }
            a
        }
    };

    // Smallest tensor info: name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8.
    r.check_count(n_tensors, 32, &|| "tensor".into())?;
    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        rel_offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(MAX_NAME_LEN, &|| format!("name of tensor #{i}"))?;
        let n_dims = r.u32(&|| format!("dimension count of tensor {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadShape {
                name,
                detail: format!("{n_dims} dimensions, expected 1 to {MAX_DIMS}"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&|| format!("dimension {d} of tensor {name:?}"))?);
        }
        let ty_raw = r.u32(&|| format!("type of tensor {name:?}"))?;
        let ty = GgmlType::from_u32(ty_raw).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            ty: ty_raw,
        })?;
        let rel_offset = r.u64(&|| format!("data offset of tensor {name:?}"))?;
        if seen.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        raw.push(Raw {
            name,
            dims,
            ty,
            rel_offset,
        });
    }

    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let size = tensor_size(&t.name, &t.dims, t.ty)?;
        if t.rel_offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                name: t.name,
                offset: t.rel_offset,
                alignment,
            });
        }
        let offset = data_offset.checked_add(t.rel_offset);
        let end = offset.and_then(|o| o.checked_add(size));
        match (offset, end) {
            (Some(offset), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                name: t.name,
                dims: t.dims,
                ty: t.ty,
                offset,
                size,
            }),
            _ => {
                let offset = offset.unwrap_or(u64::MAX);
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name,
                    offset,
                    needed: size,
                    available: file_len.saturating_sub(offset),
                    file_len,
                });
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Byte size of a tensor, with every step checked for overflow and every
/// dimension checked against the type's block size.
fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
    let bad = |detail: String| GgufError::BadShape {
        name: name.to_string(),
        detail,
    };
    if dims.contains(&0) {
        return Err(bad(format!("has a zero dimension {dims:?}")));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let bs = ty.block_size() as u64;
    if !dims[0].is_multiple_of(bs) {
        return Err(bad(format!(
            "row length {} is not a multiple of the {} block size {bs}",
            dims[0],
            ty.name()
        )));
    }
    (n / bs)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(|| bad(format!("byte size of dimensions {dims:?} overflows")))
}

#[cfg(test)]
mod tests;
